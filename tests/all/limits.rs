//! Limits: timeouts, memory caps, fuel, traps. Each is contained in its
//! invocation, reported, and metered; the host keeps serving.

use crate::util::{App, TestServer, invocation_id, invoke};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_is_capped() {
    let app = App::with_guests("", "memory = \"32MiB\"", &["alloc", "hello"]);
    let server = TestServer::start(&app).await;
    let r = server.get("/alloc/8").await;
    assert_eq!(r.status(), 200);
    let r = server.get("/alloc/64").await;
    assert_eq!(r.status(), 500);
    let record = server.record(&invocation_id(&r)).await;
    assert_eq!(record.outcome.as_str(), "trap");
    let reason = record.reason.unwrap();
    assert!(
        reason.contains("memory limit of 32 MiB exceeded"),
        "{reason}"
    );
    assert!(
        record.peak_memory_bytes <= 32 << 20,
        "peak {}",
        record.peak_memory_bytes
    );
    // The host is unharmed.
    assert_eq!(server.get("/hello").await.status(), 200);
    assert_eq!(server.get("/alloc/8").await.status(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuel_is_metered_and_enforced() {
    let _cpu = crate::util::cpu_heavy().await;
    let app = App::new(
        "",
        "[functions.spin]\nsource = \"{guests}/spin.wasm\"\nfuel = 100_000_000_000\n\
         [functions.loop]\nsource = \"{guests}/loop.wasm\"\nfuel = 10_000_000\ntimeout = \"10s\"\n\
         [functions.hello]\nsource = \"{guests}/hello.wasm\"\n",
    );
    let (runtime, _) = app.runtime();
    let r = invoke(&runtime, "spin", "10").await;
    assert_eq!(r.record.outcome.as_str(), "ok");
    let fuel = r.record.fuel_consumed.expect("fuel is metered");
    assert!(fuel > 100_000, "fuel {fuel}");

    let r = invoke(&runtime, "loop", "").await;
    assert_eq!(r.record.outcome.as_str(), "trap");
    assert!(
        r.record
            .reason
            .as_deref()
            .unwrap()
            .contains("fuel exhausted"),
        "{:?}",
        r.record.reason
    );
    assert_eq!(r.record.fuel_consumed, Some(10_000_000));
    // Long before the 10 s timeout.
    assert!(r.record.run_us < 5_000_000);

    // Functions without a fuel limit still run (and report what they used).
    let r = invoke(&runtime, "hello", "").await;
    assert_eq!(r.record.outcome.as_str(), "ok");
    assert!(r.record.fuel_consumed.unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_shorter_than_a_tick_still_fires() {
    let _cpu = crate::util::cpu_heavy().await;
    let app = App::with_guests("", "timeout = \"1ms\"", &["spin"]);
    let (runtime, _) = app.runtime();
    let r = invoke(&runtime, "spin", "1000").await;
    assert_eq!(r.record.outcome.as_str(), "timeout");
    assert!(r.record.run_us < 200_000, "run {}us", r.record.run_us);
}
