//! Durable functions against the real binary: every pattern end to end
//! (chaining, fan-out/fan-in over 1,000 activities, a monitor, human
//! interaction as an event racing a timer, sub-orchestrations,
//! continue-as-new, an entity counter, activity retries), the management
//! API and its refusals, a determinism error naming its step, and 100
//! orchestrations through SIGKILLs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod common;
use common::Server;

use serde_json::{Value, json};

const API: &str = "/runtime/webhooks/durabletask";

/// The test app: every durable guest in its role.
const APP: &str = r#"
[functions.hello-cities]
source = "{guests}/hello_cities.wasm"
durable = "orchestrator"
[functions.fan-out]
source = "{guests}/fan_out.wasm"
durable = "orchestrator"
[functions.monitor]
source = "{guests}/monitor.wasm"
durable = "orchestrator"
[functions.approval]
source = "{guests}/approval.wasm"
durable = "orchestrator"
[functions.parent]
source = "{guests}/parent.wasm"
durable = "orchestrator"
[functions.countdown]
source = "{guests}/countdown.wasm"
durable = "orchestrator"
[functions.entity-user]
source = "{guests}/entity_user.wasm"
durable = "orchestrator"
[functions.retrying]
source = "{guests}/retrying.wasm"
durable = "orchestrator"
[functions.nondeterministic]
source = "{guests}/nondeterministic.wasm"
durable = "orchestrator"
[functions.say-hello]
source = "{guests}/say_hello.wasm"
durable = "activity"
[functions.work]
source = "{guests}/work.wasm"
durable = "activity"
max_concurrency = 32
[functions.counter]
source = "{guests}/counter.wasm"
durable = "entity"
"#;

fn app() -> (tempfile::TempDir, PathBuf) {
    common::app_in_temp_dir("durable", 64, "", APP)
}

impl Server {
    /// Starts `name` with `input`; its id.
    async fn start_orchestration(&self, name: &str, id: Option<&str>, input: Value) -> String {
        let path = match id {
            Some(id) => format!("{API}/orchestrators/{name}/{id}"),
            None => format!("{API}/orchestrators/{name}"),
        };
        let (status, v) = self.post(&path, Some(input)).await;
        assert_eq!(status, 202, "start {name}: {v}");
        v["id"].as_str().unwrap().to_owned()
    }

    async fn status(&self, id: &str) -> Value {
        let (status, v) = self.get(&format!("{API}/instances/{id}")).await;
        assert!(status == 200 || status == 202, "status {id}: {status} {v}");
        v
    }

    /// Waits until `id` has ended; its status.
    async fn ended(&self, id: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status(id).await;
            if ["Completed", "Failed", "Terminated"].contains(&s["runtimeStatus"].as_str().unwrap())
            {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{id} did not end within {within:?}: {s}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn output(&self, id: &str) -> Value {
        let s = self.ended(id, Duration::from_secs(60)).await;
        assert_eq!(s["runtimeStatus"], "Completed", "{s}");
        s["output"].clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_pattern_runs_end_to_end() {
    let (_dir, manifest) = app();
    let s = Server::start(&manifest);

    // Chaining (the HelloCities shape).
    let chain = s
        .start_orchestration("hello-cities", None, Value::Null)
        .await;
    // Fan-out/fan-in over 1,000 activities.
    let started = Instant::now();
    let fan = s
        .start_orchestration("fan-out", None, json!({"n": 1000}))
        .await;
    assert_eq!(s.output(&fan).await, json!(999_000));
    eprintln!("a 1,000-activity fan-out took {:?}", started.elapsed());
    assert_eq!(
        s.output(&chain).await,
        json!([
            "Hello, Tokyo!",
            "Hello, Seattle!",
            "Hello, London!",
            "Hello, Cairo!",
            "Hello, Lima!"
        ])
    );
    let history = s
        .get(&format!("{API}/instances/{fan}?showHistory=true"))
        .await
        .1;
    let events = history["historyEvents"].as_array().unwrap();
    let episodes = events
        .iter()
        .filter(|e| e["type"] == "OrchestratorStarted")
        .count();
    assert_eq!(
        events
            .iter()
            .filter(|e| e["type"] == "TaskCompleted")
            .count(),
        1000
    );
    // Completions are batched into episodes: far fewer than one per result.
    assert!(episodes < 500, "{episodes} episodes for 1,000 results");

    // A monitor: a loop with durable timers.
    let monitor = s
        .start_orchestration("monitor", None, json!({"polls": 3, "interval_ms": 100}))
        .await;
    // Human interaction: the approval arrives before the timeout...
    let approved = s
        .start_orchestration("approval", None, json!({"timeout_ms": 60_000}))
        .await;
    // ...or the timer wins.
    let timed_out = s
        .start_orchestration("approval", None, json!({"timeout_ms": 200}))
        .await;
    // Sub-orchestrations.
    let parent = s
        .start_orchestration("parent", None, json!({"cities": ["Oslo", "Rome", "Quito"]}))
        .await;
    // Continue-as-new.
    let countdown = s
        .start_orchestration("countdown", None, json!({"n": 3}))
        .await;
    // An entity counter: signals and calls, one operation at a time.
    let entity_user = s
        .start_orchestration("entity-user", None, json!({"key": "user-42"}))
        .await;
    // Activity retries: fails twice, succeeds on the third attempt; and a
    // call that fails on every attempt reaches the orchestrator.
    let retrying = s.start_orchestration("retrying", None, Value::Null).await;

    // The approval waits (custom status) until its event is raised.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = s.status(&approved).await;
        if st["customStatus"] == "waiting for approval" {
            assert_eq!(st["runtimeStatus"], "Running");
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = s
        .post(
            &format!("{API}/instances/{approved}/raiseEvent/approval"),
            Some(json!({"by": "ana"})),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(
        s.output(&approved).await,
        json!({"approved": {"by": "ana"}})
    );
    assert_eq!(s.output(&timed_out).await, json!({"timed_out": true}));
    assert_eq!(s.output(&monitor).await, json!({"polls": 3, "last": 6}));
    assert_eq!(
        s.output(&parent).await,
        json!(["Hello, Oslo!", "Hello, Rome!", "Hello, Quito!"])
    );
    assert_eq!(s.output(&countdown).await, json!({"total": 12}));
    assert_eq!(
        s.output(&entity_user).await,
        json!({"after_add": 13, "get": 13})
    );
    assert_eq!(
        s.output(&retrying).await,
        json!({"value": 14, "error": true})
    );

    // The entity's state, and a signal through the API.
    let (status, state) = s.get(&format!("{API}/entities/counter/user-42")).await;
    assert_eq!((status, state), (200, json!(13)));
    let (status, _) = s
        .post(
            &format!("{API}/entities/counter/user-42?op=add"),
            Some(json!(5)),
        )
        .await;
    assert_eq!(status, 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, state) = s.get(&format!("{API}/entities/counter/user-42")).await;
        if state == json!(18) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the signal was not applied: {state}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A decision that changed on replay fails the instance, naming the step.
    let broken = s
        .start_orchestration("nondeterministic", None, Value::Null)
        .await;
    let st = s.ended(&broken, Duration::from_secs(30)).await;
    assert_eq!(st["runtimeStatus"], "Failed", "{st}");
    let error = st["output"].as_str().unwrap();
    assert!(
        error.contains("non-deterministic orchestrator: step 0 was CallActivity \"say-hello\""),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_speaks_azures_shapes_and_refuses_clearly() {
    let (_dir, manifest) = app();
    let s = Server::start(&manifest);

    // Start with a chosen id: 202, the management URLs and Location.
    let r = s
        .client
        .post(format!("{}{API}/orchestrators/approval/order-7", s.base))
        .header("x-kelvin-key", &s.key)
        .body(r#"{"timeout_ms": 600000}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let urls: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(urls["id"], "order-7");
    assert_eq!(urls["statusQueryGetUri"], location);
    assert!(location.ends_with(&format!("{API}/instances/order-7")));
    for key in [
        "sendEventPostUri",
        "terminatePostUri",
        "suspendPostUri",
        "resumePostUri",
        "purgeHistoryDeleteUri",
    ] {
        assert!(
            urls[key].as_str().unwrap().contains("/instances/order-7"),
            "{key}"
        );
    }
    // The same id again while it runs: 409.
    let (status, v) = s
        .post(&format!("{API}/orchestrators/approval/order-7"), None)
        .await;
    assert_eq!(status, 409, "{v}");

    // Status: 202 while it runs, with Azure's fields.
    let (status, st) = s.get(&format!("{API}/instances/order-7")).await;
    assert_eq!(status, 202);
    for key in [
        "name",
        "instanceId",
        "runtimeStatus",
        "input",
        "customStatus",
        "output",
        "createdTime",
        "lastUpdatedTime",
    ] {
        assert!(st.get(key).is_some(), "{key} missing from {st}");
    }
    assert_eq!(st["input"], json!({"timeout_ms": 600000}));

    // Suspend, resume, terminate; then 410 for commands to it, 200 status.
    let post = |path: String| {
        let s = &s;
        async move { s.post(&path, None).await.0 }
    };
    let wait_for = |want: &'static str| {
        let s = &s;
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let st = s.status("order-7").await;
                if st["runtimeStatus"] == want {
                    return st;
                }
                assert!(Instant::now() < deadline, "never {want}: {st}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_for("Running").await;
    assert_eq!(
        post(format!("{API}/instances/order-7/suspend?reason=lunch")).await,
        202
    );
    wait_for("Suspended").await;
    // An event raised while suspended is kept until it resumes.
    assert_eq!(
        s.post(
            &format!("{API}/instances/order-7/raiseEvent/approval"),
            Some(json!("yes"))
        )
        .await
        .0,
        202
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(s.status("order-7").await["runtimeStatus"], "Suspended");
    assert_eq!(post(format!("{API}/instances/order-7/resume")).await, 202);
    assert_eq!(s.output("order-7").await, json!({"approved": "yes"}));

    let waiting = s
        .start_orchestration("approval", Some("order-8"), json!({"timeout_ms": 600000}))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        post(format!(
            "{API}/instances/{waiting}/terminate?reason=cancelled%20by%20ops"
        ))
        .await,
        202
    );
    let st = s.ended(&waiting, Duration::from_secs(10)).await;
    assert_eq!(st["runtimeStatus"], "Terminated");
    assert_eq!(st["output"], "cancelled by ops");
    assert_eq!(
        post(format!("{API}/instances/{waiting}/terminate")).await,
        410
    );
    assert_eq!(
        post(format!("{API}/instances/{waiting}/raiseEvent/x")).await,
        410
    );

    // History on request.
    let (_, h) = s
        .get(&format!("{API}/instances/order-7?showHistory=true"))
        .await;
    let types: Vec<&str> = h["historyEvents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    for t in [
        "ExecutionStarted",
        "TimerCreated",
        "ExecutionSuspended",
        "ExecutionResumed",
        "EventRaised",
        "ExecutionCompleted",
    ] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }

    // Lists filter by status and prefix.
    let (status, list) = s
        .get(&format!(
            "{API}/instances?runtimeStatus=Completed,Terminated&instanceIdPrefix=order-"
        ))
        .await;
    assert_eq!(status, 200);
    let mut ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instanceId"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["order-7", "order-8"]);
    let (status, _) = s
        .get(&format!("{API}/instances?runtimeStatus=Sleeping"))
        .await;
    assert_eq!(status, 400);

    // Purge: one, then 404.
    let (status, v) = s.delete(&format!("{API}/instances/order-7")).await;
    assert_eq!((status, v), (200, json!({"instancesDeleted": 1})));
    let (status, _) = s.get(&format!("{API}/instances/order-7")).await;
    assert_eq!(status, 404);
    // A running instance is not purged (409); by filter, only ended ones
    // that match go.
    s.start_orchestration("approval", Some("order-9"), json!({"timeout_ms": 600000}))
        .await;
    let (status, _) = s.delete(&format!("{API}/instances/order-9")).await;
    assert_eq!(status, 409);
    let (status, v) = s
        .delete(&format!("{API}/instances?runtimeStatus=Completed"))
        .await;
    assert_eq!((status, v), (404, json!({"instancesDeleted": 0})));
    let (status, v) = s
        .delete(&format!("{API}/instances?runtimeStatus=Terminated,Running"))
        .await;
    assert_eq!((status, v), (200, json!({"instancesDeleted": 1})));
    let (status, _) = s.get(&format!("{API}/instances/order-8")).await;
    assert_eq!(status, 404);
    let (status, _) = s.get(&format!("{API}/instances/order-9")).await;
    assert_eq!(status, 202);

    // Refusals: unknown orchestrator, unknown entity, bad input, no key.
    // A start naming no orchestrator is the request's fault: 400, as Azure.
    let (status, v) = s.post(&format!("{API}/orchestrators/nope"), None).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("nope"));
    let (status, _) = s.post(&format!("{API}/entities/nope/k?op=add"), None).await;
    assert_eq!(status, 404);
    let r = s
        .client
        .post(format!("{}{API}/orchestrators/hello-cities", s.base))
        .header("x-kelvin-key", &s.key)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = s
        .client
        .post(format!("{}{API}/orchestrators/hello-cities", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Azure's header works too.
    let r = s
        .client
        .get(format!("{}{API}/instances", s.base))
        .header("x-functions-key", &s.key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .client
        .get(format!("{}{API}/instances", s.base))
        .header("x-kelvin-key", "wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (status, _) = s.get(&format!("{API}/instances/missing")).await;
    assert_eq!(status, 404);
    // The 202s of a start and of a running instance's status say when to
    // poll again, as Azure's do.
    let started = s
        .client
        .post(format!("{}{API}/orchestrators/hello-cities", s.base))
        .header("x-kelvin-key", &s.key)
        .send()
        .await
        .unwrap();
    assert_eq!(started.status(), 202);
    assert_eq!(started.headers()["retry-after"], "1");
    let running = s
        .client
        .get(format!("{}{API}/instances/order-9", s.base))
        .header("x-kelvin-key", &s.key)
        .send()
        .await
        .unwrap();
    assert_eq!(running.status(), 202);
    assert_eq!(running.headers()["retry-after"], "1");
}

/// Events raised to an instance that never waits for them are bounded:
/// past 4 MiB of them (or 1,000) a raise is a clear 409 and the instance
/// runs on, its episodes no larger, and ends as asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_raised_to_an_instance_are_bounded_with_a_clear_refusal() {
    let (_dir, manifest) = app();
    let s = Server::start(&manifest);
    let id = s
        .start_orchestration("approval", Some("noisy"), json!({"timeout_ms": 600000}))
        .await;
    // 60 KB each: 69 fit in 4 MiB, the 70th does not.
    let noise = json!("x".repeat(60_000));
    let mut accepted = 0;
    let refusal = loop {
        let (status, v) = s
            .post(
                &format!("{API}/instances/{id}/raiseEvent/unrelated"),
                Some(noise.clone()),
            )
            .await;
        if status != 202 {
            break (status, v);
        }
        accepted += 1;
        assert!(accepted <= 70, "300 events of 60 KB were all taken");
    };
    assert_eq!(accepted, 69);
    assert_eq!(refusal.0, 409, "{}", refusal.1);
    let message = refusal.1["error"].as_str().unwrap();
    assert!(
        message.contains("4 MiB") && message.contains("continue as new"),
        "{message}"
    );
    // The instance still answers its commands.
    assert_eq!(s.status(&id).await["runtimeStatus"], "Running");
    let (status, _) = s
        .post(&format!("{API}/instances/{id}/terminate"), None)
        .await;
    assert_eq!(status, 202);
    assert_eq!(
        s.ended(&id, Duration::from_secs(10)).await["runtimeStatus"],
        "Terminated"
    );
}

/// Every instance's history, from the API: no decision twice, every result
/// once.
async fn check_history(s: &Server, id: &str) {
    let (_, h) = s
        .get(&format!("{API}/instances/{id}?showHistory=true"))
        .await;
    let mut scheduled = BTreeMap::new();
    let mut completed = BTreeMap::new();
    for e in h["historyEvents"].as_array().unwrap() {
        match e["type"].as_str().unwrap() {
            "TaskScheduled" => *scheduled.entry(e["task_id"].as_u64().unwrap()).or_insert(0) += 1,
            "TaskCompleted" => *completed.entry(e["task_id"].as_u64().unwrap()).or_insert(0) += 1,
            "TaskFailed" => panic!("{id}: a task failed: {e}"),
            _ => {}
        }
    }
    assert!(
        scheduled.values().all(|n| *n == 1),
        "{id}: a decision applied twice: {scheduled:?}"
    );
    assert!(
        completed.values().all(|n| *n == 1),
        "{id}: a result recorded twice: {completed:?}"
    );
    assert_eq!(
        scheduled.keys().collect::<Vec<_>>(),
        (0..scheduled.len() as u64)
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>(),
        "{id}: task ids not contiguous"
    );
    assert_eq!(scheduled.len(), completed.len(), "{id}: a result lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_orchestrations_survive_sigkills() {
    let (dir, manifest) = app();
    let mut s = Server::start(&manifest);
    let mut chains = Vec::new();
    let mut fans = Vec::new();
    for i in 0..50 {
        let cities: Vec<String> = (0..5).map(|c| format!("c{i}-{c}")).collect();
        chains.push((
            s.start_orchestration("hello-cities", Some(&format!("chain-{i}")), json!(cities))
                .await,
            cities,
        ));
        fans.push(
            s.start_orchestration("fan-out", Some(&format!("fan-{i}")), json!({"n": 20}))
                .await,
        );
    }
    // Kill it at moments spread over the run, three times, restarting each
    // time.
    let mut seed = std::process::id() as u64;
    for _ in 0..3 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let ms = 20 + (seed >> 33) % 300;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        s.kill();
        s = Server::start(&manifest);
    }
    for (id, cities) in &chains {
        let want: Vec<String> = cities.iter().map(|c| format!("Hello, {c}!")).collect();
        assert_eq!(s.output(id).await, json!(want), "{id}");
        check_history(&s, id).await;
    }
    for id in &fans {
        assert_eq!(s.output(id).await, json!(380), "{id}");
        check_history(&s, id).await;
    }
    // The ledger has every episode and activity, tagged with its instance.
    let text = common::bill(&manifest, &["--by", "orchestration"]);
    assert!(
        text.contains("chain-0") && text.contains("fan-49"),
        "{text}"
    );
    drop(dir);
}

/// The seed article's scenario, as the example app wires it: `submit`
/// validates and starts the JavaScript `job` orchestration through an
/// output binding, `status` reads it through an input binding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_apps_async_http_api_works_end_to_end() {
    let job = kelvin_tests::example_guest("job");
    let guests = kelvin_tests::guest_dir();
    let functions = format!(
        r#"
[functions.submit]
source = "{guests}/submit.wasm"
[[functions.submit.http]]
route = "/job"
methods = ["POST"]
auth = "anonymous"
[[functions.submit.output]]
name = "start"
orchestration = "job"
[functions.status]
source = "{guests}/status.wasm"
[[functions.status.http]]
route = "/job/status/{{id}}"
methods = ["GET"]
auth = "anonymous"
[[functions.status.input]]
name = "instance"
instance = "{{id}}"
[functions.job]
source = "{job}"
durable = "orchestrator"
[functions.job-step]
source = "{guests}/job_step.wasm"
durable = "activity"
"#,
        guests = guests.display(),
        job = job.display()
    );
    let (_dir, manifest) = common::app_in_temp_dir("example", 16, "", &functions);
    let s = Server::start(&manifest);
    let client = reqwest::Client::new();

    // The client function validates its query like the article's: 400.
    for (query, error) in [
        ("", "steps is required"),
        ("?steps=x", "steps must be an integer from 1 to 20"),
        ("?steps=21", "steps must be an integer from 1 to 20"),
        (
            "?steps=2&step_ms=-1",
            "step_ms must be an integer from 0 to 60000",
        ),
    ] {
        let r = client
            .post(format!("{}/job{query}", s.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{query}");
        let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
        assert_eq!(v, json!({"error": error}), "{query}");
    }
    // Nothing started.
    let (_, list) = s.get(&format!("{API}/instances")).await;
    assert_eq!(list, json!([]));

    // A valid job: 202, its id and status URL (and Location).
    let r = client
        .post(format!("{}/job?steps=4&step_ms=150", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let v: Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(v["status"], format!("/job/status/{id}"));
    assert_eq!(location, format!("/job/status/{id}"));

    // The status endpoint shows only id, status and result: Running...
    let get = |path: String| {
        let client = client.clone();
        let base = s.base.clone();
        async move {
            let r = client.get(format!("{base}{path}")).send().await.unwrap();
            let status = r.status().as_u16();
            (
                status,
                serde_json::from_slice::<Value>(&r.bytes().await.unwrap()).unwrap(),
            )
        }
    };
    let (status, first) = get(location.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(first["id"], id.as_str());
    assert!(
        ["Pending", "Running"].contains(&first["status"].as_str().unwrap()),
        "{first}"
    );
    assert_eq!(first["result"], Value::Null);
    assert_eq!(first.as_object().unwrap().len(), 3, "{first}");
    // ...then Completed with the sum of squares 1..4.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, st) = get(location.clone()).await;
        if st["status"] == "Completed" {
            assert_eq!(st, json!({"id": id, "status": "Completed", "result": 30}));
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The management API agrees, with the JavaScript orchestrator's
    // custom status.
    let full = s.status(&id).await;
    assert_eq!(full["name"], "job");
    assert_eq!(full["customStatus"], json!({"done": 3, "of": 4}));
    // An unknown job: 404 from the function.
    let (status, v) = get("/job/status/nope".into()).await;
    assert_eq!((status, v), (404, json!({"error": "no such job"})));
}

/// The version production serves of `function`.
async fn production_version(s: &Server, function: &str) -> Value {
    let (_, slots) = s.get("/admin/slots").await;
    slots["slots"]["production"][function].clone()
}

/// A deploy of a new orchestrator version, and a restart after it, never
/// break an instance already running: it stays on the version it started
/// with, while new instances run the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_instances_stay_on_their_version_across_a_deploy_and_a_restart() {
    let (_dir, manifest) = app();
    let mut s = Server::start(&manifest);
    let pinned = s
        .start_orchestration("approval", Some("pinned"), json!({"timeout_ms": 600_000}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.status(&pinned).await["runtimeStatus"] != "Running" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = production_version(&s, "approval").await;
    assert!(before.is_string(), "{before}");

    // Deploy: `approval` becomes other code (hello-cities' decisions): had
    // the running instance replayed on it, its first step would differ.
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replacen("/approval.wasm\"", "/hello_cities.wasm\"", 1),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while production_version(&s, "approval").await == before {
        assert!(Instant::now() < deadline, "the manifest was not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fresh = s.start_orchestration("approval", None, Value::Null).await;
    assert_eq!(s.output(&fresh).await.as_array().unwrap().len(), 5);

    // A crash and a restart: the old version comes back from the
    // deployment store for the instance pinned to it.
    s.kill();
    s = Server::start(&manifest);
    let (status, _) = s
        .post(
            &format!("{API}/instances/{pinned}/raiseEvent/approval"),
            Some(json!("ok")),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(s.output(&pinned).await, json!({"approved": "ok"}));
}

/// The JavaScript orchestrator's replay library passes its own tests
/// (node's test runner; node is what the toolchains script installs
/// componentize-js with).
#[test]
fn the_javascript_replay_library_passes_its_tests() {
    kelvin_tests::toolchains();
    let root = kelvin_tests::workspace_root();
    common::succeeded(
        std::process::Command::new("node")
            .args(["--test", "guests/durable-js/replay.test.mjs"])
            .current_dir(root)
            .output()
            .expect("node runs (scripts/toolchains.sh requires it)"),
    );
}

/// An ordinary HTTP function raises an event and signals an entity through
/// its output bindings, committed with its record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_raise_events_and_signal_entities() {
    let functions = format!(
        "{APP}\n[functions.notify]\nsource = \"{{guests}}/notify.wasm\"\n\
         [[functions.notify.http]]\nroute = \"/notify\"\nmethods = [\"POST\"]\nauth = \"anonymous\"\n\
         [[functions.notify.output]]\nname = \"approve\"\nraise_event = \"approval\"\n\
         [[functions.notify.output]]\nname = \"count\"\nentity = \"counter\"\n"
    );
    let (_dir, manifest) = common::app_in_temp_dir("durable", 64, "", &functions);
    let s = Server::start(&manifest);
    let id = s
        .start_orchestration("approval", Some("waiting"), json!({"timeout_ms": 600_000}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.status(&id).await["runtimeStatus"] != "Running" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = s
        .client
        .post(format!("{}/notify?instance={id}&key=k1", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    assert_eq!(
        s.output(&id).await,
        json!({"approved": "approved by notify"})
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, state) = s.get(&format!("{API}/entities/counter/k1")).await;
        if status == 200 && state == json!(1) {
            break;
        }
        assert!(Instant::now() < deadline, "{status} {state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An event for an instance that has ended is dropped; the function
    // still succeeds.
    let r = s
        .client
        .post(format!("{}/notify?instance={id}", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Hostile durable functions are contained and reported: an orchestrator
/// that traps, one whose answer is not the protocol's, an activity that
/// never returns (its timeout fails the call, and the orchestrator's error
/// says why); the server stays up and recorded every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_durable_functions_fail_their_instance_with_the_reason() {
    let functions = r#"
[functions.trapping]
source = "{guests}/trap.wasm"
durable = "orchestrator"
[functions.echoing]
source = "{guests}/echo.wasm"
durable = "orchestrator"
[functions.hello-cities]
source = "{guests}/hello_cities.wasm"
durable = "orchestrator"
[functions.say-hello]
source = "{guests}/loop.wasm"
durable = "activity"
timeout = "200ms"
"#;
    let (dir, manifest) = common::app_in_temp_dir("hostile", 16, "", functions);
    let s = Server::start(&manifest);
    let trapping = s.start_orchestration("trapping", None, Value::Null).await;
    let echoing = s.start_orchestration("echoing", None, Value::Null).await;
    let looping = s
        .start_orchestration("hello-cities", None, json!(["Oslo"]))
        .await;
    for (id, why) in [
        (&trapping, "trap"),
        (&echoing, "not the protocol's json"),
        (&looping, "timed out after 200ms"),
    ] {
        let st = s.ended(id, Duration::from_secs(30)).await;
        assert_eq!(st["runtimeStatus"], "Failed", "{st}");
        let error = st["output"].as_str().unwrap().to_lowercase();
        assert!(error.contains(why), "{id}: {error}");
    }
    assert_eq!(s.get("/healthz").await.0, 200);
    let text = common::bill(&manifest, &["--by", "trigger"]);
    assert!(
        text.contains("orchestration") && text.contains("activity"),
        "{text}"
    );
    drop(dir);
}
