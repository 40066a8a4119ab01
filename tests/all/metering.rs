//! Every metering field, checked for plausibility against guests whose
//! behaviour is known.

use std::time::{Duration, SystemTime};

use crate::util::{App, TestServer, invocation_id, invoke};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alloc_64mib_peaks_above_64mib_and_integrates_memory_time() {
    let app = App::with_guests("", "memory = \"256MiB\"", &["alloc"]);
    let (runtime, _) = app.runtime();
    let r = invoke(&runtime, "alloc", "64").await;
    let rec = r.record;
    assert_eq!(rec.outcome.as_str(), "ok", "{:?}", rec.reason);
    assert!(
        rec.peak_memory_bytes >= 64 << 20,
        "peak {}",
        rec.peak_memory_bytes
    );
    assert!(
        rec.peak_memory_bytes < 100 << 20,
        "peak {}",
        rec.peak_memory_bytes
    );
    // Bounded above by peak x lifetime, below by 64 MiB x (a part of the run).
    let peak_kib = rec.peak_memory_bytes / 1024;
    let life_us = rec.instantiate_us + rec.run_us + 1_000;
    assert!(rec.memory_kib_us > 0);
    assert!(
        rec.memory_kib_us <= peak_kib * life_us,
        "{} > {} x {}",
        rec.memory_kib_us,
        peak_kib,
        life_us
    );

    // A small invocation integrates to much less.
    let small = invoke(&runtime, "alloc", "1").await.record;
    assert!(small.peak_memory_bytes < rec.peak_memory_bytes);
    assert!(small.memory_kib_us > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_invocation_record_has_every_field() {
    let app = App::with_guests("", "", &["echo"]);
    let server = TestServer::start(&app).await;
    let before = SystemTime::now();
    let r = server
        .client
        .post(server.url("/echo"))
        .body("twelve bytes")
        .send()
        .await
        .unwrap();
    let id = invocation_id(&r);
    let body = r.text().await.unwrap();
    assert_eq!(body, "twelve bytes");
    let rec = server.record(&id).await;

    assert_eq!(rec.function, "echo");
    assert_eq!(rec.trigger, "http");
    assert_eq!(rec.outcome.as_str(), "ok");
    assert_eq!(rec.reason, None);
    let started = humantime::parse_rfc3339(&rec.started_at).expect("RFC 3339 start time");
    assert!(started + Duration::from_millis(1) >= before && started <= SystemTime::now());
    assert_eq!(rec.bytes_in, 12);
    // CGI headers + body.
    assert!(
        rec.bytes_out > 12 && rec.bytes_out < 1024,
        "{}",
        rec.bytes_out
    );
    assert!(rec.cold);
    let load = rec.load.expect("cold start has a load phase");
    assert!(load.load_us > 0);
    assert!(rec.instantiate_us > 0);
    assert!(rec.run_us > 0);
    assert!(rec.wall_us >= load.load_us + rec.instantiate_us + rec.run_us);
    assert!(rec.cpu_us > 0 && rec.cpu_us <= rec.wall_us + 10_000);
    assert!(rec.peak_memory_bytes >= 64 * 1024);
    assert!(rec.memory_kib_us > 0);
    assert_eq!(rec.exit_code, None);

    let r = server
        .client
        .post(server.url("/echo"))
        .body("x")
        .send()
        .await
        .unwrap();
    let warm = server.record(&invocation_id(&r)).await;
    assert!(!warm.cold);
    assert!(warm.load.is_none());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_written_as_json_lines_by_kelvin_up_sink() {
    let app = App::with_guests("", "", &["hello"]);
    let path = app.state_dir().join("invocations.jsonl");
    let sink = std::sync::Arc::new(kelvin::metering::JsonLinesSink::open(&path).unwrap());
    let runtime = kelvin::Runtime::new(app.manifest(), sink.clone()).unwrap();
    let a = invoke(&runtime, "hello", "").await.record;
    let b = invoke(&runtime, "hello", "").await.record;
    runtime.flush();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<kelvin::metering::InvocationRecord> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("one record per line"))
        .collect();
    assert_eq!(lines, vec![a, b]);
}
