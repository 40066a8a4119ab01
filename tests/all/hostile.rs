//! Guest output that tries to hurt the host: refused with a 502 (or cut off
//! cheaply), recorded as the error the client saw, the server unharmed.

use crate::util::{App, TestServer, invocation_id};

fn app() -> App {
    App::new(
        "",
        "[functions.hostile]\nsource = \"{guests}/hostile.wasm\"\ntimeout = \"5s\"\n\
         [[functions.hostile.http]]\nroute = \"/hostile/{kind}\"\nauth = \"anonymous\"\n\
         [functions.hostile-http]\nsource = \"{components}/hostile_http.wasm\"\ntimeout = \"5s\"\n\
         [[functions.hostile-http.http]]\nroute = \"/http/hostile\"\nauth = \"anonymous\"\n\
         [functions.hello]\nsource = \"{guests}/hello.wasm\"\n\
         [[functions.hello.http]]\nroute = \"/hello\"\nauth = \"anonymous\"\n",
    )
}

/// GETs `path`, which must be answered 502 with the public error, and
/// returns the invocation's record reason.
async fn refused(server: &TestServer, path: &str) -> String {
    let r = server.get(path).await;
    assert_eq!(r.status(), 502, "{path}");
    let id = invocation_id(&r);
    assert_eq!(r.headers()["content-type"], "application/json", "{path}");
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .ends_with("returned a malformed response"),
        "{path}: {body}"
    );
    let record = server.record(&id).await;
    assert_eq!(record.outcome.as_str(), "error", "{path}");
    record.reason.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgi_output_that_would_hurt_the_host_is_refused() {
    let server = TestServer::start(&app()).await;
    for (kind, why) in [
        // 100,000 header lines once panicked a worker (HeaderMap's limit).
        ("headers", "more than 100 header lines"),
        ("big-header", "header block is larger than 16 KiB"),
        ("switch", "status 101 is not allowed"),
        ("informational", "status 103 is not allowed"),
        ("status-999", "status 999 is not allowed"),
        (
            "short-length",
            "Content-Length 5 does not match the body's 10 bytes",
        ),
        ("long-length", "Content-Length 50 does not match"),
        ("chunked", "transfer-encoding header is the host's"),
    ] {
        let reason = refused(&server, &format!("/hostile/{kind}")).await;
        assert!(
            reason.starts_with("malformed response: ") && reason.contains(why),
            "{kind}: {reason}"
        );
    }
    // Hop-by-hop headers are dropped; the rest of the response stands.
    let r = server.get("/hostile/hop").await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("keep-alive").is_none());
    assert_eq!(r.headers()["x-kept"], "yes");
    assert_eq!(r.text().await.unwrap(), "0123456789");
    // The server is unharmed.
    assert_eq!(server.get("/hello").await.status(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_statuses_outside_200_to_599_are_refused() {
    let server = TestServer::start(&app()).await;
    for (kind, status) in [("switch", 101), ("informational", 103), ("status-999", 999)] {
        let reason = refused(&server, &format!("/http/hostile?kind={kind}")).await;
        assert!(
            reason.contains(&format!("status {status} is not allowed")),
            "{kind}: {reason}"
        );
    }
    assert_eq!(server.get("/hello").await.status(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_past_the_cap_are_dropped_at_once_not_waited_for() {
    let server = TestServer::start(&app()).await;
    // 50 MB of stderr: before, the guest waited on a full pipe for its whole
    // 5 s timeout (504). Now the bytes past 256 KiB are dropped as written.
    let r = server.get("/hostile/stderr").await;
    let id = invocation_id(&r);
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "0123456789");
    let record = server.record(&id).await;
    assert_eq!(record.outcome.as_str(), "ok", "{:?}", record.reason);

    // A component that logs 2 MiB through `println!`: before, a write past
    // the cap failed and `println!` panicked (500).
    let r = server.get("/http/hostile?kind=loud").await;
    let id = invocation_id(&r);
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "loud\n");
    let record = server.record(&id).await;
    assert_eq!(record.outcome.as_str(), "ok", "{:?}", record.reason);
    server.stop().await;
}
