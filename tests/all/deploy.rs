//! Deploying while serving, over real HTTP: versions, slots, a swap under
//! load with no failed request, rollback, traffic split, and bad input.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kelvin::keys::{KeyStore, Scope};
use serde_json::{Value, json};

use crate::util::{App, TestServer};

/// `greet` starts as the `spin` guest (it sleeps for `?ms=` with
/// `mode=sleep`); its next version is the `hello` guest. Both answer 200 to
/// `/greet?ms=1`.
fn app(server: &str) -> App {
    App::new(
        server,
        "[functions.greet]\nsource = \"{guests}/spin.wasm\"\ntimeout = \"20s\"\n\
         max_concurrency = 32\nqueue = 64\n\
         [[functions.greet.http]]\nroute = \"/greet\"\nauth = \"anonymous\"\n",
    )
}

/// `greet` as the `hello` guest at `/greet`, with `auth`.
fn hello_app(server: &str, auth: &str) -> App {
    App::new(
        server,
        &format!(
            "[functions.greet]\nsource = \"{{guests}}/hello.wasm\"\n\
             [[functions.greet.http]]\nroute = \"/greet\"\nauth = \"{auth}\"\n"
        ),
    )
}

/// A manifest to deploy `greet` with: its `GREETING` setting is `greeting`
/// (the `source` is not used: the wasm comes from the upload).
fn greeting_manifest(greeting: &str) -> String {
    format!(
        "version = 1\nname = \"test\"\n[functions.greet]\nsource = \"x.wasm\"\n\
         env = {{ GREETING = \"{greeting}\" }}\n\
         [[functions.greet.http]]\nroute = \"/greet\"\nauth = \"anonymous\"\n"
    )
}

fn master(app: &App) -> String {
    KeyStore::open(&app.state_dir(), &[])
        .unwrap()
        .find(&Scope::Master)
        .unwrap()
        .value
}

struct Admin<'a> {
    server: &'a TestServer,
    key: String,
}

impl<'a> Admin<'a> {
    fn of(server: &'a TestServer, app: &App) -> Admin<'a> {
        Admin {
            server,
            key: master(app),
        }
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .server
            .client
            .request(method, self.server.url(path))
            .header("x-kelvin-key", &self.key);
        if let Some(body) = body {
            req = req
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null),
        )
    }

    async fn upload(&self, bytes: Vec<u8>) -> (u16, Value) {
        let r = self
            .server
            .client
            .put(self.server.url("/admin/wasm"))
            .header("x-kelvin-key", &self.key)
            .body(bytes)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (
            status,
            serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null),
        )
    }

    async fn deploy(&self, guest: &str, extra: Value) -> (u16, Value) {
        let (status, wasm) = self
            .upload(std::fs::read(kelvin_tests::guest(guest)).unwrap())
            .await;
        assert_eq!(status, 200, "{wasm}");
        let mut body = json!({ "wasm": wasm["wasm"] });
        if let Value::Object(extra) = extra {
            body.as_object_mut().unwrap().extend(extra);
        }
        self.send(
            reqwest::Method::POST,
            "/admin/functions/greet/versions",
            Some(body),
        )
        .await
    }

    async fn swap(&self, source: &str) -> (u16, Value) {
        self.send(
            reqwest::Method::POST,
            "/admin/swap",
            Some(json!({ "source": source })),
        )
        .await
    }
}

/// A GET's status, the version that served it and its body.
async fn call(server: &TestServer, path: &str, slot: Option<&str>) -> (u16, String, String) {
    let mut req = server.client.get(server.url(path));
    if let Some(slot) = slot {
        req = req.header("x-kelvin-slot", slot);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let version = r
        .headers()
        .get("x-kelvin-version")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, version, r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_to_staging_swap_under_load_and_roll_back() {
    let _cpu = crate::util::cpu_heavy().await;
    let app = app("");
    let server = TestServer::start(&app).await;
    let admin = Admin::of(&server, &app);

    let (status, v1, _) = call(&server, "/greet?ms=1", None).await;
    assert_eq!(status, 200);
    assert_eq!(v1.len(), 16, "every response names its version");

    // A deploy needs the master key.
    let r = server
        .client
        .put(server.url("/admin/wasm"))
        .body(b"\0asm".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Deploy version 2 to staging: new, then the same again is no change.
    let (status, created) = admin.deploy("hello", json!({ "slot": "staging" })).await;
    assert_eq!(status, 201, "{created}");
    let v2 = created["version"].as_str().unwrap().to_owned();
    assert_ne!(v2, v1);
    assert_eq!(created["slots"], json!(["staging"]));
    let (status, again) = admin.deploy("hello", json!({ "slot": "staging" })).await;
    assert_eq!(
        (status, again["version"].as_str()),
        (200, Some(v2.as_str()))
    );

    // Staging answers by header or query parameter; production is unchanged.
    let (status, version, body) = call(&server, "/greet?ms=1", Some("staging")).await;
    assert_eq!((status, version.as_str()), (200, v2.as_str()));
    assert_eq!(body, "Hello, world!\n");
    let (_, version, _) = call(&server, "/greet?ms=1&kelvin-slot=staging", None).await;
    assert_eq!(version, v2);
    // Records say which slot and version served.
    let last = server.sink.records().pop().unwrap();
    assert_eq!(
        (last.slot.as_str(), last.version_id.as_str()),
        ("staging", v2.as_str())
    );
    assert_eq!(call(&server, "/greet?ms=1", None).await.1, v1);
    assert_eq!(call(&server, "/greet?ms=1", Some("nope")).await.0, 404);

    swap_under_load(&server, &admin, &v1, &v2).await;

    // Rollback the same way: swapped back under load...
    swap_under_load(&server, &admin, &v2, &v1).await;
    assert_eq!(call(&server, "/greet?ms=1", None).await.1, v1);
    // ...or production pointed at any kept version.
    let (status, _) = admin
        .send(
            reqwest::Method::PUT,
            "/admin/slots/production/functions/greet",
            Some(json!({ "version": v2 })),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(call(&server, "/greet?ms=1", None).await.1, v2);

    let (status, versions) = admin
        .send(
            reqwest::Method::GET,
            "/admin/functions/greet/versions",
            None,
        )
        .await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [v2.as_str(), v1.as_str()], "newest first");
    let (_, history) = admin
        .send(reqwest::Method::GET, "/admin/history", None)
        .await;
    let actions: Vec<&str> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["point", "swap", "swap", "deploy", "deploy", "manifest"]
    );
    server.stop().await;

    // A restart keeps what was deployed (the manifest did not change).
    let server = TestServer::start(&app).await;
    assert_eq!(call(&server, "/greet?ms=1", None).await.1, v2);
    assert_eq!(call(&server, "/greet?ms=1", Some("staging")).await.1, v2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_carries_its_configuration() {
    let app = app("");
    let server = TestServer::start(&app).await;
    let admin = Admin::of(&server, &app);
    let (status, hi) = admin
        .deploy(
            "hello",
            json!({ "slot": "staging", "manifest": greeting_manifest("Hi") }),
        )
        .await;
    assert_eq!(status, 201, "{hi}");
    let (_, version, body) = call(&server, "/greet", Some("staging")).await;
    assert_eq!(
        (version.as_str(), body.as_str()),
        (hi["version"].as_str().unwrap(), "Hi, world!\n")
    );
    // Same wasm, other configuration: another version.
    let (status, hey) = admin
        .deploy(
            "hello",
            json!({ "slot": "staging", "manifest": greeting_manifest("Hey") }),
        )
        .await;
    assert_eq!(status, 201);
    assert_ne!(hey["version"], hi["version"]);
    assert_eq!(
        call(&server, "/greet", Some("staging")).await.2,
        "Hey, world!\n"
    );

    // A broken configuration: 400 with where, and nothing changes.
    let (status, err) = admin
        .deploy(
            "hello",
            json!({ "slot": "staging", "manifest": greeting_manifest("Hey").replace("auth = \"anonymous\"", "auth = \"everyone\"") }),
        )
        .await;
    assert_eq!(status, 400, "{err}");
    let message = err["error"].as_str().unwrap();
    assert!(message.contains("functions.toml:8:8"), "{message}");
    assert!(message.contains("auth"), "{message}");
    // Metrics are labelled by function, whichever version loaded.
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("kelvin_function_loads_total{function=\"greet\",source=\"cache\"} 2"),
        "{metrics}"
    );
    assert!(!metrics.contains("greet@"), "{metrics}");
    assert_eq!(
        call(&server, "/greet", Some("staging")).await.2,
        "Hey, world!\n"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deployments_change_nothing() {
    let app = app("max_upload = \"1MiB\"");
    let server = TestServer::start(&app).await;
    let admin = Admin::of(&server, &app);
    let (_, v1, _) = call(&server, "/greet?ms=1", None).await;
    use reqwest::Method as M;

    // Invalid wasm, and wasm over the limit.
    let (status, err) = admin.upload(b"\0asm\x01\0\0\0garbage".to_vec()).await;
    assert_eq!(status, 400, "{err}");
    // Refused from its declared length, before any of it is read (sent as
    // a head only: a client still writing a body the server will not read
    // may see its connection closed before it reads the answer).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let head = format!(
            "PUT /admin/wasm HTTP/1.1\r\nhost: x\r\nx-kelvin-key: {}\r\ncontent-length: {}\r\n\r\n",
            admin.key,
            2 << 20
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0; 64];
        let n = tcp.read(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }
    // Unknown wasm, function, slot, version; malformed requests.
    let missing = json!({ "wasm": "0".repeat(64) });
    let cases = [
        (
            M::POST,
            "/admin/functions/greet/versions",
            Some(missing.clone()),
            404,
        ),
        (
            M::POST,
            "/admin/functions/nope/versions",
            Some(missing),
            404,
        ),
        (
            M::POST,
            "/admin/functions/greet/versions",
            Some(json!({ "wasm": "xyz" })),
            400,
        ),
        (
            M::POST,
            "/admin/functions/greet/versions",
            Some(json!({ "wasm": 1 })),
            400,
        ),
        (M::GET, "/admin/functions/nope/versions", None, 404),
        (
            M::POST,
            "/admin/swap",
            Some(json!({ "source": "nope" })),
            404,
        ),
        (
            M::POST,
            "/admin/swap",
            Some(json!({ "source": "production" })),
            400,
        ),
        (
            M::PUT,
            "/admin/slots/staging/functions/greet",
            Some(json!({ "version": "0123456789abcdef" })),
            404,
        ),
        (
            M::PUT,
            "/admin/slots/Bad%20Slot/functions/greet",
            Some(json!({ "version": v1 })),
            400,
        ),
        (
            M::PUT,
            "/admin/split",
            Some(json!({ "slot": "nope", "percent": 10 })),
            404,
        ),
        (
            M::PUT,
            "/admin/split",
            Some(json!({ "slot": "production", "percent": 100 })),
            400,
        ),
        (M::GET, "/admin/history?limit=0", None, 400),
        (M::DELETE, "/admin/slots", None, 405),
        (M::GET, "/admin/nothing-here", None, 404),
    ];
    for (method, path, body, expected) in cases {
        let (status, reply) = admin.send(method.clone(), path, body).await;
        assert_eq!(status, expected, "{method} {path}: {reply}");
        assert!(reply["error"].is_string(), "{method} {path}: {reply}");
    }
    let (_, slots) = admin.send(M::GET, "/admin/slots", None).await;
    assert_eq!(
        slots,
        json!({ "slots": { "production": { "greet": v1 } }, "split": null })
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_split_lands_near_its_weight_with_affinity() {
    let app = app("");
    let server = TestServer::start(&app).await;
    let admin = Admin::of(&server, &app);
    let (_, v1, _) = call(&server, "/greet?ms=1", None).await;
    let (_, created) = admin.deploy("hello", json!({ "slot": "canary" })).await;
    let v2 = created["version"].as_str().unwrap().to_owned();
    let (status, slots) = admin
        .send(
            reqwest::Method::PUT,
            "/admin/split",
            Some(json!({ "slot": "canary", "percent": 10 })),
        )
        .await;
    assert_eq!(status, 200, "{slots}");

    // New clients (no cookie) are placed at random: about 10% on canary.
    let mut canary = 0;
    let mut cookie_for = std::collections::HashMap::new();
    for _ in 0..1000 {
        let r = server.get("/greet?ms=1").await;
        assert_eq!(r.status(), 200);
        let version = r.headers()["x-kelvin-version"].to_str().unwrap().to_owned();
        let cookie = r.headers()["set-cookie"].to_str().unwrap().to_owned();
        if version == v2 {
            canary += 1;
        } else {
            assert_eq!(version, v1);
        }
        cookie_for.insert(version, cookie);
    }
    assert!(
        (60..=140).contains(&canary),
        "{canary} of 1000 on the 10% slot"
    );
    // A client that sends its cookie back stays where it was placed.
    for (version, cookie) in &cookie_for {
        let pair = cookie.split(';').next().unwrap();
        for _ in 0..20 {
            let r = server
                .client
                .get(server.url("/greet?ms=1"))
                .header("cookie", pair)
                .send()
                .await
                .unwrap();
            assert_eq!(r.headers()["x-kelvin-version"].to_str().unwrap(), version);
            assert!(r.headers().get("set-cookie").is_none());
        }
    }

    // Affinity by a header the operator names: one user, one version.
    let (status, _) = admin
        .send(
            reqwest::Method::PUT,
            "/admin/split",
            Some(json!({ "slot": "canary", "percent": 10, "affinity_header": "x-user" })),
        )
        .await;
    assert_eq!(status, 200);
    let mut canary = 0;
    for user in 0..1000 {
        let mut seen = None;
        for _ in 0..if user < 20 { 5 } else { 1 } {
            let r = server
                .client
                .get(server.url("/greet?ms=1"))
                .header("x-user", format!("user-{user}"))
                .send()
                .await
                .unwrap();
            let version = r.headers()["x-kelvin-version"].to_str().unwrap().to_owned();
            assert!(
                seen.is_none() || seen.as_ref() == Some(&version),
                "user-{user} moved"
            );
            seen = Some(version);
        }
        canary += usize::from(seen.unwrap() == v2);
    }
    assert!(
        (60..=140).contains(&canary),
        "{canary} of 1000 users on the 10% slot"
    );

    // Stopping the split sends everyone to production.
    assert_eq!(
        admin
            .send(reqwest::Method::DELETE, "/admin/split", None)
            .await
            .0,
        200
    );
    for _ in 0..20 {
        assert_eq!(call(&server, "/greet?ms=1", None).await.1, v1);
    }
    server.stop().await;
}

/// schemathesis (installed by scripts/toolchains.sh) fuzzes every admin
/// operation from the OpenAPI document the server serves: no 5xx, every
/// status and body as documented, and the server still serving after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_survives_an_openapi_fuzzer_and_keeps_to_its_schema() {
    kelvin_tests::toolchains();
    let _cpu = crate::util::cpu_heavy().await;
    let app = App::new(
        "",
        "[functions.hello]\nsource = \"{guests}/hello.wasm\"\n\
         [[functions.hello.http]]\nroute = \"/hello\"\nauth = \"anonymous\"\n",
    );
    let server = TestServer::start(&app).await;
    let key = master(&app);
    let served = server
        .client
        .get(server.url("/admin/openapi.json"))
        .header("x-kelvin-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    let schema = app.dir.path().join("openapi.json");
    std::fs::write(&schema, served.bytes().await.unwrap()).unwrap();
    // Real names, so the fuzzer gets past 404s into the handlers.
    let config = app.dir.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        "[parameters]\nfunction = \"hello\"\nslot = \"staging\"\n",
    )
    .unwrap();
    let fuzzer = kelvin_tests::workspace_root().join(".toolchains/fuzz/bin/schemathesis");
    let url = server.url("");
    let mut fuzz = std::process::Command::new(fuzzer);
    fuzz
        .current_dir(app.dir.path())
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(&schema)
        .args(["--url", &url, "-H", &format!("x-kelvin-key: {key}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "50",
            "--seed",
            "1",
            "--no-color",
        ]);
    // The fuzzer blocks; the server runs on this runtime's threads.
    let out = tokio::task::spawn_blocking(move || fuzz.output())
        .await
        .unwrap()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}"
    );
    assert!(report.contains("passed"), "{report}");
    assert_eq!(server.get("/hello").await.status(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_newest_versions_and_those_in_slots_are_kept() {
    let app = app("keep_versions = 2");
    let server = TestServer::start(&app).await;
    let admin = Admin::of(&server, &app);
    let (_, v1, _) = call(&server, "/greet?ms=1", None).await;
    let mut deployed = Vec::new();
    for greeting in ["One", "Two", "Three"] {
        let manifest = greeting_manifest(greeting);
        let (status, v) = admin
            .deploy("hello", json!({ "slot": "staging", "manifest": manifest }))
            .await;
        assert_eq!(status, 201, "{v}");
        deployed.push(v["version"].as_str().unwrap().to_owned());
    }
    let (_, versions) = admin
        .send(
            reqwest::Method::GET,
            "/admin/functions/greet/versions",
            None,
        )
        .await;
    let ids: Vec<&str> = versions["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap())
        .collect();
    // The newest two, and production's (older, but a slot points to it).
    assert_eq!(
        ids,
        [deployed[2].as_str(), deployed[1].as_str(), v1.as_str()]
    );
    // Only what a slot serves stays loaded: each deploy to staging
    // released the version it replaced.
    let metrics = server.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("kelvin_loaded_functions 2\n"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("loaded"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let (status, _) = admin
        .send(
            reqwest::Method::PUT,
            "/admin/slots/staging/functions/greet",
            Some(json!({ "version": deployed[0] })),
        )
        .await;
    assert_eq!(status, 404, "a version no longer kept is gone");
    assert_eq!(
        call(&server, "/greet", Some("staging")).await.2,
        "Three, world!\n"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slot_settings_stay_with_the_slot_through_a_swap() {
    let app = hello_app("", "anonymous");
    let server = TestServer::start(&app).await;
    let admin = Admin::of(&server, &app);
    let settings = |slot: &str, env: Value| {
        let path = format!("/admin/slots/{slot}/functions/greet/settings");
        let admin = &admin;
        async move {
            admin
                .send(reqwest::Method::PUT, &path, Some(json!({ "env": env })))
                .await
        }
    };
    let (_, v1, _) = call(&server, "/greet", None).await;
    assert_eq!(
        settings("production", json!({ "GREETING": "Prod" }))
            .await
            .0,
        200
    );
    assert_eq!(
        call(&server, "/greet", None).await,
        (200, v1.clone(), "Prod, world!\n".into())
    );

    let manifest = greeting_manifest("Version");
    let (status, v2) = admin
        .deploy("hello", json!({ "slot": "staging", "manifest": manifest }))
        .await;
    assert_eq!(status, 201);
    let v2 = v2["version"].as_str().unwrap().to_owned();
    assert_eq!(
        call(&server, "/greet", Some("staging")).await.2,
        "Version, world!\n"
    );
    assert_eq!(
        settings("staging", json!({ "GREETING": "Stage" })).await.0,
        200
    );
    assert_eq!(
        call(&server, "/greet", Some("staging")).await.2,
        "Stage, world!\n"
    );

    // Versions move; settings stay.
    assert_eq!(admin.swap("staging").await.0, 200);
    assert_eq!(
        call(&server, "/greet", None).await,
        (200, v2.clone(), "Prod, world!\n".into())
    );
    assert_eq!(
        call(&server, "/greet", Some("staging")).await,
        (200, v1.clone(), "Stage, world!\n".into())
    );
    // Cleared: the version's own configuration again.
    assert_eq!(settings("staging", json!({})).await.0, 200);
    assert_eq!(
        call(&server, "/greet", Some("staging")).await.2,
        "Hello, world!\n"
    );

    let (status, read) = admin
        .send(
            reqwest::Method::GET,
            "/admin/slots/production/functions/greet/settings",
            None,
        )
        .await;
    assert_eq!(
        (status, read),
        (200, json!({ "env": { "GREETING": "Prod" } }))
    );
    assert_eq!(
        settings("production", json!({ "KELVIN_TRIGGER": "x" }))
            .await
            .0,
        400
    );
    assert_eq!(settings("nope", json!({ "A": "b" })).await.0, 404);
    assert_eq!(settings("production", json!({ "A": 1 })).await.0, 400);
    server.stop().await;

    // A restart keeps them.
    let server = TestServer::start(&app).await;
    assert_eq!(
        call(&server, "/greet", None).await,
        (200, v2, "Prod, world!\n".into())
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_waits_for_its_warm_up_request_and_refuses_a_failed_one() {
    let app = hello_app(
        "swap_warmup_path = \"/greet\"\nswap_warmup_statuses = [200]",
        "function",
    );
    let server = TestServer::start(&app).await;
    let admin = Admin::of(&server, &app);
    let get = |slot: &'static str| {
        let req = server
            .client
            .get(server.url("/greet"))
            .header("x-kelvin-key", &admin.key)
            .header("x-kelvin-slot", slot);
        async move {
            let r = req.send().await.unwrap();
            (
                r.status().as_u16(),
                r.headers()["x-kelvin-version"].to_str().unwrap().to_owned(),
            )
        }
    };
    let (_, v1) = get("production").await;

    // spin answers 400 without `ms`: its warm-up fails, nothing changes.
    let (status, spin) = admin.deploy("spin", json!({ "slot": "staging" })).await;
    assert_eq!(status, 201);
    let (status, err) = admin.swap("staging").await;
    assert_eq!(status, 409, "{err}");
    assert!(
        err["error"].as_str().unwrap().contains("answered 400"),
        "{err}"
    );
    assert_eq!(get("production").await, (200, v1.clone()));
    assert_eq!(get("staging").await.1, spin["version"].as_str().unwrap());

    // hello answers 200: the swap goes ahead after it.
    let (_, hello) = admin.deploy("hello", json!({ "slot": "staging" })).await;
    let before = server.sink.records().len();
    assert_eq!(admin.swap("staging").await.0, 200);
    let warm = &server.sink.records()[before];
    assert_eq!(
        (warm.slot.as_str(), warm.function.as_str()),
        ("staging", "greet")
    );
    assert_eq!(warm.version_id, hello["version"].as_str().unwrap());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_can_have_an_address_of_its_own() {
    let app = hello_app("", "anonymous");
    let (server, slot_addrs) = TestServer::start_with_slots(&app, &["staging"]).await;
    let admin = Admin::of(&server, &app);
    let staging = format!("http://{}/greet", slot_addrs[0]);
    // No staging slot yet: its address says so.
    let r = server.client.get(&staging).send().await.unwrap();
    assert_eq!(r.status(), 404);

    let (_, v1, _) = call(&server, "/greet", None).await;
    let manifest = greeting_manifest("Staged");
    let (status, v2) = admin
        .deploy("hello", json!({ "slot": "staging", "manifest": manifest }))
        .await;
    assert_eq!(status, 201);
    // The slot's address serves the slot, whatever the request names.
    for named in [None, Some("production")] {
        let mut req = server.client.get(&staging);
        if let Some(slot) = named {
            req = req.header("x-kelvin-slot", slot);
        }
        let r = req.send().await.unwrap();
        assert_eq!(
            r.headers()["x-kelvin-version"],
            v2["version"].as_str().unwrap()
        );
        assert_eq!(r.text().await.unwrap(), "Staged, world!\n");
    }
    assert_eq!(call(&server, "/greet", None).await.1, v1);
    server.stop().await;
}

/// Swaps staging into production under load from four clients in a loop,
/// with a request across the swap (1.5 s long when `old` is the `spin`
/// guest, which sleeps for `ms` with `mode=sleep`; `hello` ignores them):
/// no request fails, each answer before the swap comes from `old` and each
/// after from `new`, and the long request finishes on the version it
/// started on.
async fn swap_under_load(server: &TestServer, admin: &Admin<'_>, old: &str, new: &str) {
    let stop = Arc::new(AtomicBool::new(false));
    let base = server.url("");
    let long = {
        let (client, base) = (server.client.clone(), base.clone());
        tokio::spawn(async move {
            let r = client
                .get(format!("{base}/greet?ms=1500&mode=sleep"))
                .send()
                .await
                .unwrap();
            let version = r.headers()["x-kelvin-version"].to_str().unwrap().to_owned();
            (r.status().as_u16(), version)
        })
    };
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (client, base, stop) = (server.client.clone(), base.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let r = client
                    .get(format!("{base}/greet?ms=1"))
                    .send()
                    .await
                    .unwrap();
                let version = r
                    .headers()
                    .get("x-kelvin-version")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .unwrap_or_default();
                seen.push((sent, Instant::now(), r.status().as_u16(), version));
            }
            seen
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let swap_sent = Instant::now();
    let (status, slots) = admin.swap("staging").await;
    let swap_done = Instant::now();
    assert_eq!(status, 200, "{slots}");
    assert_eq!(slots["slots"]["production"]["greet"], json!(new));
    assert_eq!(slots["slots"]["staging"]["greet"], json!(old));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut before = 0;
    let mut after = 0;
    for client in clients {
        for (sent, answered, status, version) in client.await.unwrap() {
            assert_eq!(status, 200, "no request fails across a swap");
            if answered < swap_sent {
                assert_eq!(version, old, "before the swap: the old version");
                before += 1;
            } else if sent > swap_done {
                assert_eq!(version, new, "after the swap: the new version");
                after += 1;
            } else {
                assert!(version == old || version == new);
            }
        }
    }
    assert!(before > 10 && after > 10, "{before} before, {after} after");
    assert_eq!(
        long.await.unwrap(),
        (200, old.to_owned()),
        "a request under way finishes on the version it started on"
    );
}
