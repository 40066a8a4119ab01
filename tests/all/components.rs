//! wasi:http components: the same `.wasm` `wasmtime serve` runs, beside
//! preview-1 functions, with the same limits, metering and temperatures.

use kelvin::metering::LoadSource;

use crate::util::{App, TestServer, invocation_id, invoke};

fn app(extra: &str) -> App {
    App::new(
        "",
        &format!(
            "[functions.hello]\nsource = \"{{guests}}/hello.wasm\"\n\
             [[functions.hello.http]]\nroute = \"/p1/hello\"\nauth = \"anonymous\"\n\
             [functions.hello-http]\nsource = \"{{components}}/hello_http.wasm\"\n\
             [[functions.hello-http.http]]\nroute = \"/p2/hello\"\nauth = \"anonymous\"\n\
             [functions.stream-echo]\nsource = \"{{components}}/stream_echo.wasm\"\n\
             [[functions.stream-echo.http]]\nroute = \"/p2/echo\"\nauth = \"anonymous\"\n\
             {extra}"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_and_a_preview1_function_side_by_side() {
    let server = TestServer::start(&app("")).await;
    let r = server.get("/p1/hello").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "Hello, world!\n");

    let r = server.get("/p2/hello?name=kelvin").await;
    assert_eq!(r.status(), 200);
    let id = invocation_id(&r);
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    let text = r.text().await.unwrap();
    assert_eq!(text, "Hello from wasi:http, kelvin!\n");

    let cold = server.record(&id).await;
    assert_eq!(cold.function, "hello-http");
    assert_eq!(cold.trigger, "http");
    assert_eq!(cold.outcome.as_str(), "ok", "{:?}", cold.reason);
    assert!(cold.cold);
    assert_eq!(cold.load.unwrap().source, LoadSource::Compile);
    assert!(cold.instantiate_us > 0 && cold.run_us > 0 && cold.cpu_us > 0);
    assert!(cold.peak_memory_bytes >= 64 * 1024 && cold.memory_kib_us > 0);
    assert_eq!(cold.bytes_out, text.len() as u64);

    let r = server.get("/p2/hello").await;
    let warm = server.record(&invocation_id(&r)).await;
    assert!(!warm.cold);
    assert!(warm.load.is_none());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_component_echoes_a_large_body_in_chunks() {
    let server = TestServer::start(&app("")).await;
    let body: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let r = server
        .client
        .post(server.url("/p2/echo"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = invocation_id(&r);
    let echoed = r.bytes().await.unwrap();
    assert_eq!(echoed.len(), body.len());
    assert!(echoed == body, "the echo differs from the request body");
    // The record is written once the body has been sent.
    let rec = server.record(&id).await;
    assert_eq!(rec.outcome.as_str(), "ok", "{:?}", rec.reason);
    assert_eq!(rec.bytes_in, body.len() as u64);
    assert_eq!(rec.bytes_out, body.len() as u64);
    // Chunked: the guest never held the whole 4 MiB.
    assert!(
        rec.peak_memory_bytes < 4 * 1024 * 1024,
        "peak {}",
        rec.peak_memory_bytes
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_client_did_not_take_whole_is_recorded_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(&App::new(
        "max_body = \"64MiB\"",
        "[functions.stream-echo]\nsource = \"{components}/stream_echo.wasm\"\n\
         [[functions.stream-echo.http]]\nroute = \"/p2/echo\"\nauth = \"anonymous\"\n",
    ))
    .await;
    // 24 MiB echoed back to a client that reads the head and hangs up: more
    // than the socket buffers hold, so the body cannot have been sent.
    let len = 24 << 20;
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!("POST /p2/echo HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&vec![b'x'; len]).await.unwrap();
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0; 1024];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the head");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("x-kelvin-invocation-id: "))
        .unwrap()
        .trim()
        .to_owned();
    drop(tcp);
    // The record says what the client got, whatever the guest did next
    // (here it fails writing to the gone client and panics).
    let rec = server.record(&id).await;
    assert_ne!(rec.outcome.as_str(), "ok", "{rec:?}");
    assert!(
        rec.reason.as_deref().unwrap().contains("not sent whole"),
        "{:?}",
        rec.reason
    );
    assert!(rec.bytes_out < len as u64, "{}", rec.bytes_out);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_requests_are_denied_unless_allowed() {
    // The upstream a guest would call: another server on loopback.
    let upstream = TestServer::start(&App::with_guests("", "", &["hello"])).await;
    let allowed = format!("http://{}", upstream.addr);
    let server = TestServer::start(&App::new(
        "",
        &format!(
            "[functions.fetch]\nsource = \"{{components}}/fetch.wasm\"\n\
             [[functions.fetch.http]]\nroute = \"/fetch\"\nauth = \"anonymous\"\n\
             [functions.fetch-allowed]\nsource = \"{{components}}/fetch.wasm\"\n\
             allowed_outbound_hosts = [\"{allowed}\"]\n\
             [[functions.fetch-allowed.http]]\nroute = \"/fetch-allowed\"\nauth = \"anonymous\"\n"
        ),
    ))
    .await;
    let target = format!("{allowed}/hello");

    let r = server.get(&format!("/fetch?url={target}")).await;
    assert_eq!(r.status(), 502);
    let text = r.text().await.unwrap();
    assert!(text.contains("HttpRequestDenied"), "{text}");
    assert!(
        upstream.sink.records().is_empty(),
        "a denied request never left the host"
    );

    let r = server.get(&format!("/fetch-allowed?url={target}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "upstream 200: Hello, world!\n");
    assert_eq!(upstream.sink.records().len(), 1);

    // Allowed means that host and port only.
    let other = format!("http://127.0.0.2:{}/hello", upstream.addr.port());
    let r = server.get(&format!("/fetch-allowed?url={other}")).await;
    assert_eq!(r.status(), 502);
    server.stop().await;
    upstream.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoke_hands_a_component_a_post_with_the_input() {
    let app = app("");
    let (runtime, _) = app.runtime();
    let r = invoke(&runtime, "stream-echo", "ping").await;
    assert_eq!(r.record.outcome.as_str(), "ok", "{:?}", r.record.reason);
    assert_eq!(&r.stdout[..], b"ping");
    assert!(r.record.cold);
    let r = invoke(&runtime, "stream-echo", "again").await;
    assert_eq!(&r.stdout[..], b"again");
    assert!(!r.record.cold);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_restarts_from_the_cache() {
    let app = app("");
    {
        let (runtime, _) = app.runtime();
        invoke(&runtime, "hello-http", "").await;
    }
    let (runtime, _) = app.runtime();
    let r = invoke(&runtime, "hello-http", "").await;
    assert_eq!(r.record.outcome.as_str(), "ok");
    assert_eq!(r.record.load.unwrap().source, LoadSource::Cache);
    assert_eq!(&r.stdout[..], b"Hello from wasi:http, world!\n");
}
