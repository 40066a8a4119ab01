//! The promises: every started invocation runs to its record, no client can
//! hold the server, no guest can make the host allocate or wait without
//! bound, and HTTP means what it says (HEAD, `code=`, headers, /metrics).

use std::time::{Duration, Instant};

use kelvin::keys::{KeyStore, Scope};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::util::{App, TestServer, invocation_id};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocation_whose_client_left_still_runs_to_its_record() {
    let server = TestServer::start(&App::with_guests("", "", &["spin"])).await;
    // A client that gives up while the guest spins: before, the invocation
    // vanished with the request (no record, no bill).
    let client = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let gave_up = client.get(server.url("/spin/1000")).send().await;
    assert!(gave_up.is_err(), "the client timed out");
    let deadline = Instant::now() + Duration::from_secs(20);
    let record = loop {
        if let Some(r) = server
            .sink
            .records()
            .into_iter()
            .find(|r| r.function == "spin")
        {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "no record of the abandoned invocation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(record.outcome.as_str(), "abandoned", "{record:?}");
    assert!(record.run_us >= 900_000, "it ran to its end: {record:?}");
    assert!(
        record.reason.as_deref().unwrap().contains("went away"),
        "{record:?}"
    );
    server.stop().await;
}

/// Sends a request head announcing a body of `len` bytes, then `sent` of
/// them, and stalls.
async fn stall(
    addr: std::net::SocketAddr,
    path: &str,
    len: usize,
    sent: usize,
) -> tokio::net::TcpStream {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&vec![b'x'; sent]).await.unwrap();
    tcp
}

/// Reads what the server answers on `tcp` (until it closes or 5 s pass).
async fn answer(mut tcp: tokio::net::TcpStream) -> String {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_cannot_hold_the_server() {
    let server = TestServer::start(&App::with_guests(
        "max_connections = 2\nrequest_body_timeout = \"1s\"",
        "",
        &["hello", "echo"],
    ))
    .await;
    // Two clients take every connection and send their bodies a byte at a
    // time (here: not at all). Before, every other client waited for as
    // long as they liked (70 s and more).
    let slow = [
        stall(server.addr, "/echo", 1000, 2).await,
        stall(server.addr, "/echo", 1000, 2).await,
    ];
    let started = Instant::now();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let r = client.get(server.url("/hello")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < Duration::from_secs(10));
    // The slow ones were told why they were cut off.
    for tcp in slow {
        let text = answer(tcp).await;
        assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    }
    // They never ran: nothing was recorded for them.
    assert!(server.sink.records().iter().all(|r| r.function == "hello"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_in_memory_are_bounded_all_together() {
    let server = TestServer::start(&App::with_guests(
        "max_body = \"1MiB\"\nbody_budget = \"1MiB\"\nrequest_body_timeout = \"1s\"",
        "timeout = \"3s\"",
        &["echo", "loop"],
    ))
    .await;
    // An invocation holds its 900 KiB body (of a 1 MiB budget) while it
    // runs, here for its whole 3 s timeout...
    let holder = {
        let (client, url) = (server.client.clone(), server.url("/loop"));
        tokio::spawn(async move {
            client
                .post(url)
                .body(vec![b'x'; 900 << 10])
                .send()
                .await
                .unwrap()
                .status()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let upload = || {
        server
            .client
            .post(server.url("/echo"))
            .body(vec![b'y'; 900 << 10])
            .send()
    };
    // ...so another 900 KiB is not buffered beside it: it waits for room,
    // and is refused when none comes within the body timeout. Before, any
    // number of bodies were held (48 uploads of 16 MiB: 827 MB of RSS).
    let r = upload().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(holder.await.unwrap(), 504);
    // With the room back, the same upload goes through.
    let r = upload().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 900 << 10);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_bombs_are_refused_before_the_host_allocates() {
    let server = TestServer::start(&App::new(
        "",
        "[functions.hostile]\nsource = \"{guests}/hostile.wasm\"\ntimeout = \"5s\"\n\
         [[functions.hostile.http]]\nroute = \"/hostile/{kind}\"\nauth = \"anonymous\"\n\
         [functions.hostile-http]\nsource = \"{components}/hostile_http.wasm\"\ntimeout = \"5s\"\n\
         [[functions.hostile-http.http]]\nroute = \"/http/hostile\"\nauth = \"anonymous\"\n",
    ))
    .await;
    // 500,000 subscriptions: more bytes than the guest may hand the host in
    // one call, so the call fails (ENOMEM) before anything is allocated.
    // Before, the host allocated about 275 MB for it.
    let r = server.get("/hostile/poll").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-errno"], "48", "ENOMEM");
    // 100,000: within that budget, but past the resources a guest may hold:
    // the call fails the invocation, contained.
    let r = server.get("/hostile/poll-100k").await;
    assert_eq!(r.status(), 500);
    let record = server.record(&invocation_id(&r)).await;
    assert_ne!(record.outcome.as_str(), "ok", "{record:?}");
    assert!(
        record.reason.as_deref().unwrap().contains("resource table"),
        "{record:?}"
    );
    // The same for a component's pollables.
    let r = server.get("/http/hostile?kind=poll").await;
    assert_eq!(r.status(), 500);
    let record = server.record(&invocation_id(&r)).await;
    assert_ne!(record.outcome.as_str(), "ok", "{record:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_is_get_without_a_body() {
    let server = TestServer::start(&App::new(
        "",
        "[functions.hello]\nsource = \"{guests}/hello.wasm\"\n\
         [[functions.hello.http]]\nroute = \"/hello\"\nmethods = [\"GET\"]\nauth = \"anonymous\"\n\
         [functions.echo]\nsource = \"{guests}/echo.wasm\"\n\
         [[functions.echo.http]]\nroute = \"/echo\"\nmethods = [\"POST\"]\nauth = \"anonymous\"\n\
         [functions.hello-http]\nsource = \"{components}/hello_http.wasm\"\n\
         [[functions.hello-http.http]]\nroute = \"/p2/hello\"\nmethods = [\"GET\"]\nauth = \"anonymous\"\n\
         [functions.late]\nsource = \"{components}/hostile_http.wasm\"\n\
         [[functions.late.http]]\nroute = \"/late\"\nmethods = [\"GET\"]\nauth = \"anonymous\"\n",
    ))
    .await;
    for path in ["/hello", "/p2/hello", "/healthz", "/late?kind=late-body"] {
        let r = server.client.head(server.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert!(r.bytes().await.unwrap().is_empty(), "{path}");
    }
    let r = server
        .client
        .head(server.url("/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST");
    let r = server
        .client
        .put(server.url("/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["allow"], "GET, HEAD");
    // A HEAD that ran is recorded like the GET it stands for.
    let hello = server
        .sink
        .records()
        .into_iter()
        .find(|r| r.function == "hello-http")
        .unwrap();
    assert_eq!(hello.outcome.as_str(), "ok", "{hello:?}");
    // A component still writing its body when hyper drops a HEAD's body
    // (every time, for this one) is not failed by it.
    let mut late = None;
    for _ in 0..100 {
        late = server
            .sink
            .records()
            .into_iter()
            .find(|r| r.function == "late");
        if late.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let late = late.expect("the late body's invocation is recorded");
    assert_eq!(late.outcome.as_str(), "ok", "{late:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_is_the_guests_unless_it_is_the_key() {
    let app = App::new(
        "",
        "[functions.echo]\nsource = \"{guests}/echo.wasm\"\n\
         [[functions.echo.http]]\nroute = \"/open\"\nauth = \"anonymous\"\n\
         [[functions.echo.http]]\nroute = \"/closed\"\n",
    );
    let server = TestServer::start(&app).await;
    let key = KeyStore::open(&app.state_dir(), &[])
        .unwrap()
        .find(&Scope::Function("echo".into()))
        .unwrap()
        .value;
    let query = |r: reqwest::Response| r.headers()["x-echo-query"].to_str().unwrap().to_owned();
    // An OAuth callback on an open route: before, its code was stripped.
    let r = server.get("/open?code=oauth-123&state=s").await;
    assert_eq!(query(r), "code=oauth-123&state=s");
    // On a protected route with the key in the header, `code` is the guest's.
    let r = server
        .client
        .get(server.url("/closed?code=oauth-123&state=s"))
        .header("x-kelvin-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(query(r), "code=oauth-123&state=s");
    // As the key itself, it never reaches the guest.
    let r = server.get(&format!("/closed?a=1&code={key}&b=2")).await;
    assert_eq!(query(r), "a=1&b=2");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cgi_headers_cannot_shadow_each_other() {
    let server = TestServer::start(&App::with_guests("", "", &["echo"])).await;
    // `Content_Type` came before `Content-Type` and won: the guest answered
    // text/html for a JSON request.
    let r = server
        .client
        .post(server.url("/echo"))
        .header("Content_Type", "text/html")
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "application/json");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_protected_functions_only_to_keys() {
    let body = "[functions.hello]\nsource = \"{guests}/hello.wasm\"\n\
                [[functions.hello.http]]\nroute = \"/hello\"\nauth = \"anonymous\"\n\
                [functions.secret]\nsource = \"{guests}/echo.wasm\"\n\
                [[functions.secret.http]]\nroute = \"/secret\"\n";
    let app = App::new("", body);
    let server = TestServer::start(&app).await;
    let keys = KeyStore::open(&app.state_dir(), &[]).unwrap();
    let host = keys.find(&Scope::Host).unwrap().value;
    let text = server.get("/metrics").await.text().await.unwrap();
    assert!(text.contains("function=\"hello\""), "{text}");
    assert!(
        !text.contains("secret"),
        "a protected function leaks:\n{text}"
    );
    let r = server
        .client
        .get(server.url("/metrics"))
        .header("x-kelvin-key", &host)
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("function=\"secret\""));
    server.stop().await;

    // Or closed to anyone without the master key.
    let app = App::new("metrics_auth = \"admin\"", body);
    let server = TestServer::start(&app).await;
    assert_eq!(server.get("/metrics").await.status(), 401);
    let master = KeyStore::open(&app.state_dir(), &[])
        .unwrap()
        .find(&Scope::Master)
        .unwrap()
        .value;
    assert_eq!(server.status_with_key("/metrics", &master).await, 200);
    server.stop().await;
}
