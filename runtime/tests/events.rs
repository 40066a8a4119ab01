//! Event triggers and bindings against the real binary: queues through a
//! SIGKILL, poison messages, blobs once per version across a restart, a
//! timer's missed ticks, the API's refusals, outputs of HTTP functions,
//! and guests of every toolchain started by events.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod common;
use common::{Server, kelvin};

use serde_json::{Value, json};

/// An app in a temp dir; `{guests}` names the built preview-1 guests.
fn app(server: &str, functions: &str) -> (tempfile::TempDir, PathBuf) {
    common::app_in_temp_dir("events", 16, server, functions)
}

impl Server {
    async fn send(&self, queue: &str, body: impl Into<String>) -> reqwest::Response {
        self.client
            .post(format!("{}/admin/queues/{queue}/messages", self.base))
            .header("x-kelvin-key", &self.key)
            .body(body.into())
            .send()
            .await
            .unwrap()
    }

    async fn json(&self, path: &str) -> Value {
        let (status, body) = self.api(reqwest::Method::GET, path, Vec::new()).await;
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    /// A queue's line in the queue list.
    async fn queue(&self, name: &str) -> Value {
        let list = self.json("/admin/queues").await;
        list["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no queue {name} in {list}"))
    }

    /// The events the `events` guest published to `queue`.
    async fn published(&self, queue: &str) -> Vec<Value> {
        let peek = self
            .json(&format!("/admin/queues/{queue}/messages?limit=1000"))
            .await;
        peek["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| serde_json::from_str(m["body"].as_str().unwrap()).unwrap())
            .collect()
    }
}

async fn body_json(r: reqwest::Response) -> Value {
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

/// Polls `check` until it holds, within `within`.
async fn until<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every ledger record of `function`.
fn records(dir: &Path, function: &str) -> Vec<kelvin::metering::InvocationRecord> {
    let ledger =
        kelvin::ledger::LedgerReader::open(&dir.join(".kelvin").join("ledger.sqlite3")).unwrap();
    ledger
        .records(0, i64::MAX)
        .unwrap()
        .into_iter()
        .filter(|r| r.function == function)
        .collect()
}

const WORKER: &str = r#"
[functions.worker]
source = "{guests}/events.wasm"
[[functions.worker.queue_trigger]]
name = "jobs"
batch_size = 4
new_batch_threshold = 2
max_dequeue_count = 3
retry_delay = "20ms"
lease = "2s"
[[functions.worker.output]]
name = "out"
queue = "results"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_messages_run_loses_none_and_publishes_none_twice() {
    let (dir, manifest) = app("", WORKER);
    let server = Server::start(&manifest);
    let mut sent = BTreeSet::new();
    for n in 0..60 {
        let r = server
            .send("jobs", format!(r#"{{"n": {n}, "sleep_ms": 150}}"#))
            .await;
        assert_eq!(r.status(), 201);
        let v = body_json(r).await;
        sent.insert(v["id"].as_str().unwrap().to_owned());
    }
    // At most six run at once: killed with some done, some running.
    until(Duration::from_secs(30), "ten results", || async {
        server.queue("results").await["depth"].as_u64().unwrap() >= 10
    })
    .await;
    server.kill();

    let server = Server::start(&manifest);
    until(
        Duration::from_secs(60),
        "every message processed",
        || async {
            server.queue("jobs").await["depth"] == 0 && server.queue("results").await["depth"] == 60
        },
    )
    .await;
    let results = server.published("results").await;
    let processed: Vec<String> = results
        .iter()
        .map(|r| {
            let event: Value = r["event"].clone();
            event["Metadata"]["Id"].as_str().unwrap().to_owned()
        })
        .collect();
    let distinct: BTreeSet<String> = processed.iter().cloned().collect();
    assert_eq!(processed.len(), 60, "one output per message");
    assert_eq!(distinct, sent, "every message enqueued, each once");
    // The messages running at the kill ran again, their count intact.
    let retried = results
        .iter()
        .filter(|r| r["event"]["Metadata"]["DequeueCount"].as_u64().unwrap() >= 2)
        .count();
    assert!(retried >= 1, "the kill interrupted running messages");
    // Each published output's invocation is in the ledger, once.
    let ledger = records(dir.path(), "worker");
    let recorded: HashMap<&str, usize> = ledger.iter().fold(HashMap::new(), |mut m, r| {
        *m.entry(r.invocation_id.as_str()).or_default() += 1;
        m
    });
    for r in &results {
        let id = r["invocation_id"].as_str().unwrap();
        assert_eq!(recorded.get(id), Some(&1), "{id}");
        assert!(
            ledger
                .iter()
                .any(|l| l.invocation_id == id && l.trigger == "queue")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_message_is_poison_after_exactly_max_dequeue_count_attempts() {
    let (dir, manifest) = app("", WORKER);
    let server = Server::start(&manifest);
    let r = server.send("jobs", r#"{"fail": true}"#).await;
    let id = body_json(r).await["id"].as_str().unwrap().to_owned();
    until(
        Duration::from_secs(20),
        "the message in jobs-poison",
        || async { server.queue("jobs").await["poison"] == 1 },
    )
    .await;
    let attempts = records(dir.path(), "worker");
    assert_eq!(attempts.len(), 3, "max_dequeue_count = 3");
    assert!(attempts.iter().all(|r| r.outcome.as_str() == "error"));
    assert_eq!(server.queue("jobs").await["depth"], 0);
    assert!(
        server.published("results").await.is_empty(),
        "a failure publishes nothing"
    );
    let poison = server.json("/admin/queues/jobs-poison/messages").await;
    assert_eq!(poison["messages"][0]["id"], id.as_str());

    // Requeued, it gets three more attempts, then is poison again.
    let (status, _) = server
        .api(
            reqwest::Method::POST,
            &format!("/admin/queues/jobs/requeue/{id}"),
            Vec::new(),
        )
        .await;
    assert_eq!(status, 200);
    until(Duration::from_secs(20), "poison again", || async {
        records(dir.path(), "worker").len() == 6 && server.queue("jobs").await["poison"] == 1
    })
    .await;
    let (status, _) = server
        .api(
            reqwest::Method::POST,
            "/admin/queues/jobs/requeue/no-such-id",
            Vec::new(),
        )
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_version_is_processed_once_across_a_restart() {
    let functions = r#"
[functions.copier]
source = "{guests}/events.wasm"
[[functions.copier.blob]]
path = "images/{name}.{ext}"
max_attempts = 2
retry_delay = "20ms"
[[functions.copier.output]]
name = "out"
blob = "copies/{name}.{ext}.json"
"#;
    let (dir, manifest) = app("", functions);
    let server = Server::start(&manifest);
    let put = |path: &'static str, body: &'static str| {
        let server = &server;
        async move {
            let (status, reply) = server
                .api(
                    reqwest::Method::PUT,
                    &format!("/admin/blobs/{path}"),
                    body.into(),
                )
                .await;
            assert_eq!(status, 201, "{}", String::from_utf8_lossy(&reply));
        }
    };
    put("images/a.json", r#"{"x": 1}"#).await;
    // A file dropped into the container's folder is a blob too.
    let folder = dir.path().join(".kelvin").join("blobs").join("images");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("dropped.json"), r#"{"y": 2}"#).unwrap();
    put("images/bad.json", r#"{"fail": true}"#).await;
    let copy = |name: &'static str| {
        let server = &server;
        async move {
            server
                .api(
                    reqwest::Method::GET,
                    &format!("/admin/blobs/copies/{name}"),
                    Vec::new(),
                )
                .await
        }
    };
    until(
        Duration::from_secs(20),
        "both copies and two failures",
        || async {
            copy("a.json.json").await.0 == 200
                && copy("dropped.json.json").await.0 == 200
                && records(dir.path(), "copier").len() == 4
        },
    )
    .await;
    let (_, body) = copy("a.json.json").await;
    let copied: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(copied["event"]["Metadata"]["Parameters"]["name"], "a");
    assert_eq!(copied["event"]["Metadata"]["Parameters"]["ext"], "json");
    server.kill();

    // After a crash and a few scans: nothing again (bad.json is poison).
    let server = Server::start(&manifest);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(records(dir.path(), "copier").len(), 4);
    // A new version is processed again.
    let (status, _) = server
        .api(
            reqwest::Method::PUT,
            "/admin/blobs/images/a.json",
            br#"{"x": 2}"#.to_vec(),
        )
        .await;
    assert_eq!(status, 201);
    until(
        Duration::from_secs(20),
        "the new version copied",
        || async {
            let (status, body) = server
                .api(
                    reqwest::Method::GET,
                    "/admin/blobs/copies/a.json.json",
                    Vec::new(),
                )
                .await;
            status == 200 && String::from_utf8_lossy(&body).contains("eyJ4IjogMn0=")
        },
    )
    .await;
    assert_eq!(records(dir.path(), "copier").len(), 5);
    let outcomes: Vec<&str> = records(dir.path(), "copier")
        .iter()
        .map(|r| r.outcome.as_str())
        .collect();
    assert_eq!(outcomes.iter().filter(|o| **o == "error").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_that_missed_ticks_while_down_runs_once_past_due() {
    let functions = r#"
[functions.ticker]
source = "{guests}/events.wasm"
[[functions.ticker.timer]]
schedule = "*/2 * * * * *"
[[functions.ticker.output]]
name = "out"
queue = "ticks"
"#;
    let (_dir, manifest) = app("", functions);
    let server = Server::start(&manifest);
    until(Duration::from_secs(5), "a tick", || async {
        server.queue("ticks").await["depth"].as_u64().unwrap() >= 1
    })
    .await;
    server.kill();
    // Two ticks or more pass while it is down.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let server = Server::start(&manifest);
    until(
        Duration::from_secs(5),
        "a tick after the restart",
        || async { server.queue("ticks").await["depth"].as_u64().unwrap() >= 3 },
    )
    .await;
    let ticks = server.published("ticks").await;
    let past_due: Vec<&Value> = ticks
        .iter()
        .filter(|t| t["event"]["Data"]["IsPastDue"] == true)
        .collect();
    assert_eq!(
        past_due.len(),
        1,
        "one past-due run for the missed ticks: {ticks:?}"
    );
    assert!(
        ticks
            .iter()
            .all(|t| t["event"]["Metadata"]["Trigger"] == "timer")
    );
    // Runs never overlap and each names its scheduled time.
    let times: BTreeSet<&str> = ticks
        .iter()
        .map(|t| t["event"]["Data"]["ScheduledTime"].as_str().unwrap())
        .collect();
    assert_eq!(times.len(), ticks.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_bad_input_clearly() {
    let functions = format!(
        "{WORKER}\n[functions.copier]\nsource = \"{{guests}}/events.wasm\"\n[[functions.copier.blob]]\npath = \"images/{{name}}\"\n"
    );
    let (_dir, manifest) = app("max_message = \"1KiB\"\nmax_blob = \"2KiB\"", &functions);
    let server = Server::start(&manifest);
    let get = reqwest::Method::GET;
    let put = reqwest::Method::PUT;
    let post = reqwest::Method::POST;
    let cases: Vec<(reqwest::Method, &str, Vec<u8>, u16)> = vec![
        (
            post.clone(),
            "/admin/queues/nosuch/messages",
            b"x".to_vec(),
            404,
        ),
        (
            post.clone(),
            "/admin/queues/jobs/messages",
            vec![b'x'; 1025],
            413,
        ),
        (
            post.clone(),
            "/admin/queues/jobs/messages",
            vec![b'x'; 1024],
            201,
        ),
        (
            get.clone(),
            "/admin/queues/jobs/messages?limit=0",
            Vec::new(),
            400,
        ),
        (
            reqwest::Method::DELETE,
            "/admin/queues/jobs/messages",
            Vec::new(),
            405,
        ),
        (put.clone(), "/admin/blobs/nosuch/a.txt", b"x".to_vec(), 404),
        (
            put.clone(),
            "/admin/blobs/images/big.txt",
            vec![b'x'; 2049],
            413,
        ),
        (
            put.clone(),
            "/admin/blobs/images/.hidden",
            b"x".to_vec(),
            400,
        ),
        (
            put.clone(),
            "/admin/blobs/images/a%2F..%2Fb",
            b"x".to_vec(),
            400,
        ),
        (get.clone(), "/admin/blobs/images/none.txt", Vec::new(), 404),
        (get.clone(), "/admin/blobs/nosuch", Vec::new(), 404),
    ];
    for (method, path, body, want) in cases {
        let (status, reply) = server.api(method.clone(), path, body).await;
        assert_eq!(
            status,
            want,
            "{method} {path}: {}",
            String::from_utf8_lossy(&reply)
        );
        if status >= 400 {
            let v: Value = serde_json::from_slice(&reply).unwrap();
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
        }
    }
    // Without a key: 401, and nothing enqueued.
    let r = reqwest::Client::new()
        .post(format!("{}/admin/queues/jobs/messages", server.base))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_function_enqueues_and_a_queue_function_publishes() {
    let build = "";
    let functions = format!(
        r#"
[functions.submit-order]
source = "{{guests}}/submit_order.wasm"{build}
[[functions.submit-order.http]]
route = "/orders"
methods = ["POST"]
auth = "anonymous"
[[functions.submit-order.output]]
name = "order"
queue = "orders"
[functions.process-order]
source = "{{guests}}/process_order.wasm"
[[functions.process-order.queue_trigger]]
name = "orders"
[[functions.process-order.output]]
name = "processed"
queue = "orders-processed"
"#
    );
    kelvin_tests::guest("submit-order");
    kelvin_tests::guest("process-order");
    let (dir, manifest) = app("", &functions);
    let server = Server::start(&manifest);
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/orders", server.base))
        .body(r#"{"customer": "ada", "items": [{"sku": "tea", "qty": 2, "price": 3.5}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let accepted = body_json(r).await;
    assert_eq!(accepted["status"], "accepted");
    let r = client
        .post(format!("{}/orders", server.base))
        .body(r#"{"items": []}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        400,
        "an invalid order is refused and enqueues nothing"
    );
    until(Duration::from_secs(20), "the processed order", || async {
        server.queue("orders-processed").await["depth"] == 1
    })
    .await;
    let processed = server.published("orders-processed").await;
    assert_eq!(processed[0]["id"], accepted["id"]);
    assert_eq!(processed[0]["total"], 7.0);
    assert_eq!(server.queue("orders").await["depth"], 0);
    assert_eq!(records(dir.path(), "submit-order").len(), 2);
    assert_eq!(records(dir.path(), "process-order")[0].trigger, "queue");
    // The bill tells the triggers apart.
    let bill = common::bill(&manifest, &["--by", "trigger", "--format", "json"]);
    assert!(
        bill.contains("\"queue\"") && bill.contains("\"http\""),
        "{bill}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_of_every_toolchain_run_from_a_queue() {
    let component = kelvin_tests::component_dir().join("hello_http.wasm");
    let c = kelvin_tests::example_guest("wordcount");
    let js = kelvin_tests::example_guest("hello-js");
    let py = kelvin_tests::example_guest("predict");
    let mut functions = String::new();
    let model = format!(
        "files = [{{ source = \"{}\", destination = \"/model\" }}]\n",
        kelvin_tests::predict_model_dir().display()
    );
    for (name, source, extra) in [
        ("rust-http", component, ""),
        ("c", c, ""),
        ("js", js, ""),
        ("python", py, model.as_str()),
    ] {
        functions.push_str(&format!(
            "[functions.{name}]\nsource = \"{}\"\n{extra}[[functions.{name}.queue_trigger]]\nname = \"q-{name}\"\nmax_dequeue_count = 1\n",
            source.display()
        ));
    }
    let (dir, manifest) = app("", &functions);
    let server = Server::start(&manifest);
    for name in ["rust-http", "c", "js", "python"] {
        let r = server
            .send(
                &format!("q-{name}"),
                r#"{"name": "events", "features": [6.7, 3.0, 5.2, 2.3]}"#,
            )
            .await;
        assert_eq!(r.status(), 201);
    }
    until(Duration::from_secs(120), "every guest ran", || async {
        ["rust-http", "c", "js", "python"]
            .iter()
            .all(|f| !records(dir.path(), f).is_empty())
    })
    .await;
    for name in ["rust-http", "c", "js", "python"] {
        let r = &records(dir.path(), name)[0];
        assert_eq!(r.trigger, "queue");
        // The Python prediction API answers an event (not features) with 400:
        // a failure, said so; the others succeed.
        if name == "python" {
            assert_eq!(
                r.reason.as_deref(),
                Some("the function answered status 400"),
                "{r:?}"
            );
        } else {
            assert_eq!(r.outcome.as_str(), "ok", "{name}: {r:?}");
        }
    }
}

#[test]
fn an_http_component_with_outputs_is_refused_at_start() {
    let component = kelvin_tests::component_dir().join("hello_http.wasm");
    let (_dir, manifest) = app(
        "",
        &format!(
            "[functions.c]\nsource = \"{}\"\n[[functions.c.http]]\nroute = \"/c\"\n[[functions.c.output]]\nname = \"o\"\nqueue = \"q\"\n",
            component.display()
        ),
    );
    let out = kelvin()
        .args(["check", "-f"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot have outputs yet"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_runs_on_startup_when_asked() {
    let functions = r#"
[functions.yearly]
source = "{guests}/events.wasm"
[[functions.yearly.timer]]
schedule = "0 0 0 1 1 *"
time_zone = "Europe/Paris"
run_on_startup = true
[[functions.yearly.output]]
name = "out"
queue = "ticks"
"#;
    let (_dir, manifest) = app("", functions);
    let server = Server::start(&manifest);
    until(Duration::from_secs(5), "the start-up run", || async {
        server.queue("ticks").await["depth"] == 1
    })
    .await;
    let tick = &server.published("ticks").await[0];
    assert_eq!(tick["event"]["Data"]["IsPastDue"], false);
    assert_eq!(tick["event"]["Data"]["Schedule"], "0 0 0 1 1 *");
    assert!(
        tick["event"]["Data"]["Next"]
            .as_str()
            .unwrap()
            .ends_with("-12-31T23:00:00.000000Z"),
        "midnight on 1 January in Paris: {tick}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_function_with_one_slot_leases_one_message_at_a_time_and_records_no_rejection() {
    let functions = r#"
[functions.slow]
source = "{guests}/events.wasm"
max_concurrency = 1
[[functions.slow.queue_trigger]]
name = "slow"
[[functions.slow.output]]
name = "out"
queue = "slow-done"
"#;
    let (dir, manifest) = app("", functions);
    let server = Server::start(&manifest);
    for n in 0..4 {
        let r = server
            .send("slow", format!(r#"{{"n": {n}, "sleep_ms": 300}}"#))
            .await;
        assert_eq!(r.status(), 201);
    }
    // While one runs, the others wait unleased in the queue.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let leased = server.queue("slow").await["leased"].as_u64().unwrap();
    assert!(leased <= 1, "{leased} leased with max_concurrency = 1");
    until(Duration::from_secs(20), "four results", || async {
        server.queue("slow-done").await["depth"] == 4
    })
    .await;
    let recorded = records(dir.path(), "slow");
    let outcomes: Vec<&str> = recorded.iter().map(|r| r.outcome.as_str()).collect();
    assert_eq!(
        outcomes,
        vec!["ok"; 4],
        "one record per message, none rejected"
    );
    // Each message was leased once: waiting was not an attempt.
    for r in server.published("slow-done").await {
        assert_eq!(r["event"]["Metadata"]["DequeueCount"], 1, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_message_is_retried_after_its_retry_delay_not_its_lease() {
    let functions = r#"
[functions.flaky]
source = "{guests}/events.wasm"
[[functions.flaky.queue_trigger]]
name = "flaky"
max_dequeue_count = 4
retry_delay = "100ms"
max_retry_delay = "100ms"
lease = "30s"
"#;
    let (dir, manifest) = app("", functions);
    let server = Server::start(&manifest);
    let started = Instant::now();
    server.send("flaky", r#"{"fail": true}"#).await;
    until(Duration::from_secs(25), "four attempts", || async {
        server.queue("flaky").await["poison"] == 1
    })
    .await;
    let attempts = records(dir.path(), "flaky");
    assert_eq!(attempts.len(), 4);
    // Three backoffs of 100 ms, not three lease terms of 30 s; generous
    // for a busy machine, far below one lease.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let starts: Vec<String> = attempts.iter().map(|r| r.started_at.clone()).collect();
    let at = |s: &str| humantime::parse_rfc3339(s).unwrap();
    for pair in starts.windows(2) {
        let gap = at(&pair[1]).duration_since(at(&pair[0])).unwrap();
        assert!(gap >= Duration::from_millis(100), "{gap:?}: no backoff");
        assert!(
            gap < Duration::from_secs(10),
            "{gap:?}: waited for the lease"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_field_cannot_stand_in_for_a_host_parameter_in_an_output_path() {
    let functions = r#"
[functions.writer]
source = "{guests}/events.wasm"
[[functions.writer.queue_trigger]]
name = "writes"
[[functions.writer.output]]
name = "out"
blob = "results/{id}-{invocation_id}.json"
"#;
    let (dir, manifest) = app("", functions);
    let server = Server::start(&manifest);
    for n in 0..2 {
        server
            .send(
                "writes",
                format!(r#"{{"id": "m{n}", "invocation_id": "victim"}}"#),
            )
            .await;
    }
    until(Duration::from_secs(20), "two records", || async {
        records(dir.path(), "writer").len() == 2
    })
    .await;
    let ids: BTreeSet<String> = records(dir.path(), "writer")
        .into_iter()
        .map(|r| r.invocation_id)
        .collect();
    until(Duration::from_secs(10), "two result blobs", || async {
        let list = server.json("/admin/blobs/results").await;
        list["blobs"].as_array().unwrap().len() == 2
    })
    .await;
    let list = server.json("/admin/blobs/results").await;
    let names: BTreeSet<String> = list["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.contains("victim")),
        "a message named the output: {names:?}"
    );
    for id in &ids {
        assert!(
            names.iter().any(|n| n.ends_with(&format!("-{id}.json"))),
            "{id} not in {names:?}"
        );
    }
}

const COPIER: &str = r#"
[functions.copier]
source = "{guests}/events.wasm"
[[functions.copier.blob]]
path = "images/{name}"
retry_delay = "20ms"
[[functions.copier.output]]
name = "out"
blob = "copies/{name}.json"
"#;

/// The bytes the copier was handed in its last copy of `name`.
async fn copied(server: &Server, name: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    let (status, body) = server
        .api(
            reqwest::Method::GET,
            &format!("/admin/blobs/copies/{name}.json"),
            Vec::new(),
        )
        .await;
    if status != 200 {
        return None;
    }
    let copy: Value = serde_json::from_slice(&body).unwrap();
    let data = copy["event"]["Data"].as_str()?;
    Some(
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_replaced_with_the_same_size_and_mtime_is_processed_again() {
    let (dir, manifest) = app("", COPIER);
    let server = Server::start(&manifest);
    let folder = dir.path().join(".kelvin").join("blobs").join("images");
    std::fs::create_dir_all(&folder).unwrap();
    let file = folder.join("a.json");
    std::fs::write(&file, r#"{"v": 1}"#).unwrap();
    until(Duration::from_secs(20), "the first copy", || async {
        copied(&server, "a.json").await.as_deref() == Some(br#"{"v": 1}"#)
    })
    .await;
    // As `cp -p` does: the same file rewritten in place with bytes of the
    // same length, its modification time put back.
    let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
    {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&file)
            .unwrap();
        std::io::Write::write_all(&mut &f, br#"{"v": 2}"#).unwrap();
        f.set_modified(mtime).unwrap();
    }
    until(
        Duration::from_secs(20),
        "the replaced file copied",
        || async { copied(&server, "a.json").await.as_deref() == Some(br#"{"v": 2}"#) },
    )
    .await;
    assert_eq!(records(dir.path(), "copier").len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_still_being_written_is_processed_once_whole() {
    let (dir, manifest) = app("", COPIER);
    let server = Server::start(&manifest);
    let folder = dir.path().join(".kelvin").join("blobs").join("images");
    std::fs::create_dir_all(&folder).unwrap();
    let whole: Vec<u8> = format!(r#"{{"pad": "{}"}}"#, "x".repeat(19_989)).into_bytes();
    assert_eq!(whole.len(), 20_000);
    // Written in ten pieces, a scan's length apart or less.
    {
        let mut f = std::fs::File::create(folder.join("big.json")).unwrap();
        for piece in whole.chunks(2_000) {
            std::io::Write::write_all(&mut f, piece).unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    until(Duration::from_secs(20), "the whole file copied", || async {
        copied(&server, "big.json").await.is_some()
    })
    .await;
    // A few more scans: nothing else.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let recorded = records(dir.path(), "copier");
    assert_eq!(recorded.len(), 1, "one invocation, not one per size seen");
    assert_eq!(copied(&server, "big.json").await.unwrap(), whole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_put_back_to_earlier_bytes_or_deleted_and_put_again_is_processed_each_time() {
    let (dir, manifest) = app("", COPIER);
    let server = Server::start(&manifest);
    let put = |body: &'static str| {
        let server = &server;
        async move {
            let (status, reply) = server
                .api(
                    reqwest::Method::PUT,
                    "/admin/blobs/images/m.json",
                    body.into(),
                )
                .await;
            assert_eq!(status, 201, "{}", String::from_utf8_lossy(&reply));
        }
    };
    let processed = |n: usize, body: &'static str| {
        let server = &server;
        let dir = dir.path().to_owned();
        async move {
            until(Duration::from_secs(20), body, || async {
                records(&dir, "copier").len() == n
                    && copied(server, "m.json").await.as_deref() == Some(body.as_bytes())
            })
            .await;
        }
    };
    put(r#"{"model": 1}"#).await;
    processed(1, r#"{"model": 1}"#).await;
    put(r#"{"model": 2}"#).await;
    processed(2, r#"{"model": 2}"#).await;
    // Back to the first bytes: a write like any other.
    put(r#"{"model": 1}"#).await;
    processed(3, r#"{"model": 1}"#).await;
    // Deleted, then the same bytes put again.
    let (status, _) = server
        .api(
            reqwest::Method::DELETE,
            "/admin/blobs/images/m.json",
            Vec::new(),
        )
        .await;
    assert_eq!(status, 200);
    put(r#"{"model": 1}"#).await;
    processed(4, r#"{"model": 1}"#).await;
    // A restart changes no write: nothing again.
    server.kill();
    let _server = Server::start(&manifest);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(records(dir.path(), "copier").len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_blob_that_cannot_be_written_is_kept_as_failed_listed_and_retried() {
    let functions = r#"
[functions.writer]
source = "{guests}/events.wasm"
[[functions.writer.queue_trigger]]
name = "writes"
[[functions.writer.output]]
name = "out"
blob = "results/{dir}/{file}"
"#;
    let (dir, manifest) = app("", functions);
    let server = Server::start(&manifest);
    // `results/a` is a blob, so `results/a/zz` cannot be one.
    let (status, _) = server
        .api(
            reqwest::Method::PUT,
            "/admin/blobs/results/a",
            b"a file".to_vec(),
        )
        .await;
    assert_eq!(status, 201);
    // Put through the API: refused as the caller's mistake, like a name
    // with a segment over 255 bytes or a right-to-left override.
    for name in [
        "a/zz".to_owned(),
        format!("x/{}", "n".repeat(300)),
        "gpj%E2%80%AE.exe".to_owned(),
    ] {
        let (status, body) = server
            .api(
                reqwest::Method::PUT,
                &format!("/admin/blobs/results/{name}"),
                b"x".to_vec(),
            )
            .await;
        assert_eq!(status, 400, "{name}: {}", String::from_utf8_lossy(&body));
    }
    // Written as an output: the success stands, the blob waits as failed.
    server.send("writes", r#"{"dir": "a", "file": "zz"}"#).await;
    until(Duration::from_secs(20), "a failed outbox entry", || async {
        let listed = server.json("/admin/outbox").await;
        listed["outbox"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["state"] == "failed")
    })
    .await;
    let listed = server.json("/admin/outbox").await;
    let entry = &listed["outbox"][0];
    assert_eq!(entry["path"], "results/a/zz");
    assert_eq!(entry["attempts"], 1, "a clash is not retried: {entry}");
    assert!(
        entry["error"].as_str().unwrap().contains("clashes"),
        "{entry}"
    );
    assert_eq!(records(dir.path(), "writer").len(), 1);
    let metrics = server
        .client
        .get(format!("{}/metrics", server.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("kelvin_blob_outbox{state=\"failed\"} 1"),
        "{metrics}"
    );
    // Cleared up, and retried from the CLI: written.
    let (status, _) = server
        .api(
            reqwest::Method::DELETE,
            "/admin/blobs/results/a",
            Vec::new(),
        )
        .await;
    assert_eq!(status, 200);
    let out = kelvin()
        .args([
            "blob",
            "outbox",
            "list",
            "--url",
            &server.base,
            "--key",
            &server.key,
            "-f",
        ])
        .arg(&manifest)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("results/a/zz") && listing.contains("failed"),
        "{listing}"
    );
    let out = kelvin()
        .args([
            "blob",
            "outbox",
            "retry",
            "--url",
            &server.base,
            "--key",
            &server.key,
            "-f",
        ])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 failed entries pending again"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    until(Duration::from_secs(20), "the output written", || async {
        server
            .api(
                reqwest::Method::GET,
                "/admin/blobs/results/a/zz",
                Vec::new(),
            )
            .await
            .0
            == 200
    })
    .await;
    let listed = server.json("/admin/outbox").await;
    assert!(listed["outbox"].as_array().unwrap().is_empty(), "{listed}");
}

/// A blob bound as an input is the read-only file `/inputs/<name>`, read
/// at each invocation, in both contracts: the Python prediction API serves
/// whatever model blob is there now (no deploy for a new model), a missing
/// blob is a missing file, and the guest can change none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_bound_as_an_input_is_a_read_only_file_read_at_each_invocation() {
    let py = kelvin_tests::example_guest("predict");
    let functions = format!(
        r#"
[functions.predict]
source = "{}"
env = {{ MODEL_PATH = "/inputs/model" }}
[[functions.predict.http]]
route = "/predict/{{model}}"
auth = "anonymous"
[[functions.predict.input]]
name = "model"
blob = "models/{{model}}.json"

[functions.greeter]
source = "{{guests}}/hello.wasm"
env = {{ GREETING_FILE = "/inputs/greeting" }}
[[functions.greeter.http]]
route = "/greet/{{name}}"
auth = "anonymous"
[[functions.greeter.input]]
name = "greeting"
blob = "settings/greeting.txt"

[functions.hostile]
source = "{{guests}}/hostile.wasm"
env = {{ HOSTILE_MOUNTS = "/inputs" }}
[[functions.hostile.http]]
route = "/hostile/{{kind}}"
auth = "anonymous"
[[functions.hostile.input]]
name = "greeting"
blob = "settings/greeting.txt"
"#,
        py.display()
    );
    let (dir, manifest) = app("", &functions);
    let server = Server::start(&manifest);
    let put = |path: String, body: Vec<u8>| {
        let server = &server;
        async move {
            let (status, reply) = server
                .api(reqwest::Method::PUT, &format!("/admin/blobs/{path}"), body)
                .await;
            assert_eq!(status, 201, "{}", String::from_utf8_lossy(&reply));
        }
    };
    let features = json!({"features": [6.7, 3.0, 5.2, 2.3]});

    // No model blob yet: the function says it has no model.
    let (status, v) = server.post("/predict/iris", Some(features.clone())).await;
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("/inputs/model"),
        "{v}"
    );

    let model = std::fs::read(kelvin_tests::predict_model_dir().join("iris.json")).unwrap();
    put("models/iris.json".into(), model.clone()).await;
    let (status, v) = server.post("/predict/iris", Some(features.clone())).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["prediction"], "virginica");
    // A new model is a new blob, read by the next request.
    let mut renamed: Value = serde_json::from_slice(&model).unwrap();
    renamed["classes"] = json!(["first", "second", "third"]);
    put("models/iris.json".into(), renamed.to_string().into_bytes()).await;
    let (status, v) = server.post("/predict/iris", Some(features.clone())).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["prediction"], "third");
    // The route's parameter names the blob.
    let (status, _) = server.post("/predict/other", Some(features)).await;
    assert_eq!(status, 503);

    // A preview-1 module reads its blob the same way.
    let greet = || async {
        let r = reqwest::get(format!("{}/greet/ana", server.base))
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(greet().await.0, 500);
    put("settings/greeting.txt".into(), b"Salut\n".to_vec()).await;
    assert_eq!(greet().await, (200, "Salut, ana!\n".to_owned()));
    put("settings/greeting.txt".into(), b"Ciao\n".to_vec()).await;
    assert_eq!(greet().await, (200, "Ciao, ana!\n".to_owned()));

    // Read-only: the guest can neither add a file nor remove its input.
    let r = reqwest::get(format!("{}/hostile/write-files", server.base))
        .await
        .unwrap();
    let said = r.headers()["x-write"].to_str().unwrap().to_owned();
    assert!(
        said.starts_with("/inputs Err(") && said.contains("remove Some(Err("),
        "{said}"
    );
    assert_eq!(greet().await, (200, "Ciao, ana!\n".to_owned()));
    let blob = dir
        .path()
        .join(".kelvin")
        .join("blobs")
        .join("settings")
        .join("greeting.txt");
    assert_eq!(std::fs::read_to_string(blob).unwrap(), "Ciao\n");
}
