//! Limits: timeouts, memory caps, fuel, traps. Each is contained in its
//! invocation, reported, and metered; the host keeps serving.

use std::time::Duration;

use kelvin::engine::EPOCH_TICK;

use crate::util::{App, TestServer, invocation_id, invoke};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_stopped_at_its_timeout() {
    let _cpu = crate::util::cpu_heavy().await;
    let app = App::with_guests("", "timeout = \"200ms\"", &["loop", "hello"]);
    let server = TestServer::start(&app).await;
    // Warm it, so the measured run is all loop.
    let _ = server.get("/loop").await;
    let r = server.get("/loop").await;
    assert_eq!(r.status(), 504);
    let record = server.record(&invocation_id(&r));
    assert_eq!(record.outcome.as_str(), "timeout");
    assert!(
        record
            .reason
            .as_deref()
            .unwrap()
            .contains("timed out after 200ms")
    );
    let ran = Duration::from_micros(record.instantiate_us + record.run_us);
    let timeout = Duration::from_millis(200);
    assert!(
        ran >= timeout - Duration::from_millis(1),
        "stopped early: {ran:?}"
    );
    // Within two ticks of the deadline, plus scheduling slack for a busy
    // 2-core machine.
    assert!(
        ran <= timeout + 2 * EPOCH_TICK + Duration::from_millis(30),
        "stopped late: {ran:?}"
    );
    // The CPU time was billed: the loop burned most of it.
    assert!(record.cpu_us >= 100_000, "cpu {}us", record.cpu_us);
    assert_eq!(server.get("/hello").await.status(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_is_capped() {
    let app = App::with_guests("", "memory = \"32MiB\"", &["alloc", "hello"]);
    let server = TestServer::start(&app).await;
    let r = server.get("/alloc/8").await;
    assert_eq!(r.status(), 200);
    let r = server.get("/alloc/64").await;
    assert_eq!(r.status(), 500);
    let record = server.record(&invocation_id(&r));
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
async fn a_guest_waiting_in_a_host_call_is_stopped_too() {
    let _cpu = crate::util::cpu_heavy().await;
    // While a guest sleeps no wasm runs, so no epoch check fires; the
    // backstop timer stops it instead.
    let app = App::with_guests("", "timeout = \"200ms\"", &["spin"]);
    let (runtime, _) = app.runtime();
    assert_eq!(
        invoke(&runtime, "spin", "sleep 1")
            .await
            .record
            .outcome
            .as_str(),
        "ok"
    );
    let r = invoke(&runtime, "spin", "sleep 5000").await;
    assert_eq!(r.record.outcome.as_str(), "timeout");
    let ran = Duration::from_micros(r.record.instantiate_us + r.record.run_us);
    assert!(ran >= Duration::from_millis(199), "stopped early: {ran:?}");
    assert!(
        ran <= Duration::from_millis(200) + 2 * EPOCH_TICK + Duration::from_millis(30),
        "stopped late: {ran:?}"
    );
    // Waiting is not computing.
    assert!(r.record.cpu_us < 50_000, "cpu {}us", r.record.cpu_us);
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
