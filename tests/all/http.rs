//! The HTTP trigger over real sockets: routing, CGI in and out, errors.

use crate::util::{App, TestServer, invocation_id};

fn app() -> App {
    App::with_guests("max_body = \"4KiB\"", "", &["hello", "echo", "trap"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_params_and_query_reach_the_guest() {
    let server = TestServer::start(&app()).await;

    let r = server.get("/hello/kelvin").await;
    assert_eq!(r.status(), 200);
    let id = invocation_id(&r);
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(r.text().await.unwrap(), "Hello, kelvin!\n");
    assert_eq!(server.record(&id).await.function, "hello");

    let r = server.get("/hello?name=J%C3%B6rg").await;
    assert_eq!(r.text().await.unwrap(), "Hello, Jörg!\n");
    let r = server.get("/hello/a%20b").await;
    assert_eq!(r.text().await.unwrap(), "Hello, a b!\n");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_headers_and_method_round_trip_through_cgi() {
    let server = TestServer::start(&app()).await;
    let r = server
        .client
        .post(server.url("/echo/x?a=1&b=2"))
        .header("content-type", "application/json")
        .body("{\"k\": 1}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = invocation_id(&r);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.headers()["x-echo-method"], "POST");
    assert_eq!(r.headers()["x-echo-path"], "/echo/x");
    assert_eq!(r.headers()["x-echo-query"], "a=1&b=2");
    // The guest sees the same id the client gets.
    assert_eq!(r.headers()["x-echo-invocation"].to_str().unwrap(), id);
    assert_eq!(r.text().await.unwrap(), "{\"k\": 1}");
    let record = server.record(&id).await;
    assert_eq!(record.trigger, "http");
    assert_eq!(record.bytes_in, 8);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_route_is_404_and_wrong_method_405() {
    let server = TestServer::start(&App::new(
        "",
        "[functions.echo]\nsource = \"{guests}/echo.wasm\"\n[[functions.echo.http]]\nroute = \"/echo\"\nauth = \"anonymous\"\nmethods = [\"POST\", \"PUT\"]\n",
    ))
    .await;
    let r = server.get("/nowhere").await;
    assert_eq!(r.status(), 404);
    invocation_id(&r);
    let body: serde_json::Value = r.json_body().await;
    assert_eq!(body["error"], "no route for GET /nowhere");

    let r = server.get("/echo").await;
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "POST, PUT");
    invocation_id(&r);
    // Nothing reached a function, so nothing was metered.
    assert!(server.sink.records().is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_413_and_never_reaches_the_guest() {
    let server = TestServer::start(&app()).await;
    let big = vec![b'x'; 5 * 1024];
    let r = server
        .client
        .post(server.url("/echo"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Without a content-length (chunked), the limit applies while reading.
    let reply = raw_chunked_post(server.addr, "/echo", &big).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(server.sink.records().is_empty());
    // Under the limit is fine.
    let r = server
        .client
        .post(server.url("/echo"))
        .body(vec![b'y'; 3000])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 3000);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_over_the_limit_fails_instead_of_being_truncated() {
    let server = TestServer::start(&app()).await;
    // 4 KiB in is allowed; echoed back with CGI headers it is over 4 KiB out.
    let r = server
        .client
        .post(server.url("/echo"))
        .body(vec![b'y'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let record = server.record(&invocation_id(&r)).await;
    assert_eq!(record.outcome.as_str(), "error");
    assert!(
        record
            .reason
            .unwrap()
            .contains("output exceeded the 4 KiB limit")
    );
    assert_eq!(record.bytes_out, 0);
    server.stop().await;
}

/// Sends `body` chunked over a plain socket and returns the raw reply.
async fn raw_chunked_post(addr: std::net::SocketAddr, path: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: test\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for chunk in body.chunks(1024) {
        // The server may answer 413 and close before the last chunks.
        if stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .is_err()
            || stream.write_all(chunk).await.is_err()
            || stream.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply).await;
    String::from_utf8_lossy(&reply).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_get_public_messages_and_the_host_keeps_serving() {
    let server = TestServer::start(&app()).await;
    for (path, outcome, reason) in [
        ("/trap", "trap", "trap guest panicking on purpose"),
        ("/trap/div", "trap", "divide by zero"),
        ("/trap/exit", "error", "exited with code 1"),
    ] {
        let r = server.get(path).await;
        assert_eq!(r.status(), 500, "{path}");
        let id = invocation_id(&r);
        let body: serde_json::Value = r.json_body().await;
        assert_eq!(body["error"], "function `trap` failed");
        assert_eq!(body["invocation_id"], id.as_str());
        // The detail is in the record (and the log), not in the response.
        let record = server.record(&id).await;
        assert_eq!(record.outcome.as_str(), outcome, "{path}");
        let why = record.reason.unwrap();
        assert!(why.contains(reason), "{path}: {why}");
        assert!(!body.to_string().contains(reason));
    }
    let r = server.get("/hello").await;
    assert_eq!(r.status(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_carry_every_series() {
    let server =
        TestServer::start(&App::with_guests("max_loaded = 1", "", &["hello", "trap"])).await;
    assert_eq!(server.get("/hello").await.status(), 200);
    assert_eq!(server.get("/hello").await.status(), 200);
    assert_eq!(server.get("/trap").await.status(), 500);
    assert_eq!(server.get("/healthz").await.status(), 200);
    assert_eq!(server.get("/readyz").await.status(), 200);
    let r = server.get("/metrics").await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("valid Prometheus text");
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no sample {name} {labels:?} in:\n{text}"));
        match &sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            // A histogram's +Inf bucket is its count.
            prometheus_parse::Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
            other => panic!("unexpected {other:?}"),
        }
    };
    let inv = |outcome, temperature, function| {
        value(
            "kelvin_invocations_total",
            &[
                ("function", function),
                ("outcome", outcome),
                ("temperature", temperature),
                ("trigger", "http"),
            ],
        )
    };
    assert_eq!(inv("ok", "cold", "hello"), 1.0);
    assert_eq!(inv("ok", "warm", "hello"), 1.0);
    assert_eq!(inv("trap", "cold", "trap"), 1.0);
    assert_eq!(
        value(
            "kelvin_invocation_duration_seconds",
            &[("function", "hello")]
        ),
        2.0
    );
    assert_eq!(
        value("kelvin_cold_start_phase_seconds", &[("phase", "compile")]),
        2.0
    );
    assert_eq!(
        value(
            "kelvin_cold_start_phase_seconds",
            &[("phase", "instantiate")]
        ),
        2.0
    );
    assert_eq!(
        value(
            "kelvin_function_loads_total",
            &[("function", "hello"), ("source", "compile")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "kelvin_evictions_total",
            &[("function", "hello"), ("reason", "capacity")]
        ),
        1.0
    );
    assert_eq!(value("kelvin_loaded_functions", &[]), 1.0);
    assert_eq!(value("kelvin_queue_depth", &[("function", "hello")]), 0.0);
    assert_eq!(
        value("kelvin_queue_wait_seconds", &[("function", "hello")]),
        2.0
    );
    assert_eq!(value("kelvin_pool_slots_in_use", &[]), 0.0);
    assert!(value("kelvin_guest_cpu_seconds_total", &[("function", "hello")]) > 0.0);
    assert!(
        value(
            "kelvin_guest_memory_byte_seconds_total",
            &[("function", "hello")]
        ) > 0.0
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_request_finish() {
    let _cpu = crate::util::cpu_heavy().await;
    let server = TestServer::start(&App::with_guests("", "", &["spin"])).await;
    assert_eq!(server.get("/spin/0").await.status(), 200);
    let client = server.client.clone();
    let url = server.url("/spin/300");
    let slow = tokio::spawn(async move { client.get(url).send().await.unwrap() });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let sink = server.sink.clone();
    server.stop().await;
    let r = slow.await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().starts_with("spun 300 ms"));
    assert_eq!(sink.records().len(), 2);
}

/// Reads a JSON body.
trait JsonBody {
    async fn json_body(self) -> serde_json::Value;
}

impl JsonBody for reqwest::Response {
    async fn json_body(self) -> serde_json::Value {
        assert_eq!(self.headers()["content-type"], "application/json");
        serde_json::from_str(&self.text().await.unwrap()).expect("JSON body")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_sees_its_contract_and_nothing_of_the_host() {
    let app = App::new(
        "",
        "[functions.echo]\nsource = \"{guests}/echo.wasm\"\nenv = { SETTING = \"on\" }\n\
         [[functions.echo.http]]\nroute = \"/echo\"\nauth = \"anonymous\"\n",
    );
    // SAFETY: set before the server starts; nothing else reads it concurrently.
    unsafe { std::env::set_var("KELVIN_TEST_HOST_SECRET", "leak") };
    let server = TestServer::start(&app).await;
    let r = server
        .client
        .get(server.url("/echo?inspect"))
        .header("x-custom", "1")
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    for expected in [
        "env KELVIN_FUNCTION",
        "env KELVIN_INVOCATION_ID",
        "env KELVIN_TRIGGER",
        "env SETTING",
        "env REQUEST_METHOD",
        "env HTTP_X_CUSTOM",
        "fs / hidden",
        "fs /etc/passwd hidden",
        "fs . hidden",
        "args echo",
    ] {
        assert!(
            text.lines().any(|l| l == expected),
            "missing `{expected}` in:\n{text}"
        );
    }
    for leaked in ["env PATH", "env HOME", "env KELVIN_TEST_HOST_SECRET"] {
        assert!(
            !text.lines().any(|l| l == leaked),
            "host `{leaked}` leaked:\n{text}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_head_is_431() {
    let server = TestServer::start(&App::with_guests(
        "max_header_size = \"8KiB\"",
        "",
        &["hello"],
    ))
    .await;
    let r = server
        .client
        .get(server.url("/hello"))
        .header("x-big", "a".repeat(10_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 431);
    assert!(server.sink.records().is_empty());
    assert_eq!(server.get("/hello").await.status(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_is_cut_off_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(&App::with_guests(
        "header_read_timeout = \"200ms\"",
        "",
        &["hello"],
    ))
    .await;
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // Never finish the head: the server must give up on its own.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        slow.read_to_end(&mut buf),
    )
    .await;
    assert!(
        read.is_ok(),
        "the server kept a slow client's connection open"
    );
    // Others are served meanwhile and after.
    assert_eq!(server.get("/hello").await.status(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_for_a_free_one() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(&App::with_guests("max_connections = 1", "", &["hello"])).await;
    // One idle keep-alive connection holds the only slot.
    let mut held = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    held.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = held.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let client = server.client.clone();
    let url = server.url("/hello");
    let waiting = tokio::spawn(async move { client.get(url).send().await.unwrap().status() });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "a second connection was served past max_connections = 1"
    );
    drop(held);
    let status = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn series_with_known_labels_start_at_zero() {
    let server = TestServer::start(&App::with_guests("", "", &["hello"])).await;
    // Before any invocation, load or eviction: an alert on a rate needs the
    // series to exist.
    let text = server.get("/metrics").await.text().await.unwrap();
    for series in [
        r#"kelvin_evictions_total{function="hello",reason="idle"} 0"#,
        r#"kelvin_evictions_total{function="hello",reason="memory"} 0"#,
        r#"kelvin_function_loads_total{function="hello",source="cache"} 0"#,
        r#"kelvin_invocations_total{function="hello",outcome="ok",temperature="cold",trigger="http"} 0"#,
        r#"kelvin_invocations_total{function="hello",outcome="timeout",temperature="warm",trigger="http"} 0"#,
        r#"kelvin_guest_cpu_seconds_total{function="hello"} 0"#,
    ] {
        assert!(text.contains(series), "{series} missing from\n{text}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_with_prior_knowledge_is_served_beside_http1() {
    let app = App::new(
        "max_body = \"4KiB\"\nmax_header_size = \"8KiB\"",
        "[functions.echo]\nsource = \"{guests}/echo.wasm\"\n\
         [[functions.echo.http]]\nroute = \"/echo\"\nauth = \"anonymous\"\n\
         [functions.hello-http]\nsource = \"{components}/hello_http.wasm\"\n\
         [[functions.hello-http.http]]\nroute = \"/p2/hello\"\nauth = \"anonymous\"\n",
    );
    let server = TestServer::start(&app).await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    // A preview-1 function over CGI...
    let r = h2
        .post(server.url("/echo"))
        .header("content-type", "text/plain")
        .body("over h2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let id = invocation_id(&r);
    assert_eq!(r.text().await.unwrap(), "over h2");
    assert_eq!(server.record(&id).await.outcome.as_str(), "ok");
    // ...a component...
    let r = h2
        .get(server.url("/p2/hello?name=h2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.text().await.unwrap(), "Hello from wasi:http, h2!\n");
    // ...and the same limits: the body, the head.
    let r = h2
        .post(server.url("/echo"))
        .body(vec![b'x'; 5 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let big = h2
        .get(server.url("/echo"))
        .header("x-big", "a".repeat(10_000))
        .send()
        .await;
    assert!(
        big.as_ref().map_or(true, |r| r.status() == 431),
        "an oversized head got through: {big:?}"
    );
    // HTTP/1.1 on the same port still works.
    assert_eq!(
        server.get("/p2/hello").await.version(),
        reqwest::Version::HTTP_11
    );
    server.stop().await;
}
