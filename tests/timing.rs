//! Tests whose assertions are about time: CPU billed, how soon a runaway
//! guest is stopped. They live in their own test binary because cargo runs
//! test binaries one after another: here nothing else competes for the two
//! cores, so a guest spinning 50 ms of wall time really gets 50 ms of CPU.
//! Within the binary, each test holds the CPU lock, so they run one by one.

#[path = "all/util.rs"]
#[allow(dead_code)]
mod util;

use std::time::Duration;

use kelvin::engine::EPOCH_TICK;

use util::{App, TestServer, invocation_id, invoke};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spin_50ms_bills_about_50ms_of_cpu() {
    let _alone = util::cpu_heavy().await;
    let app = App::with_guests("", "", &["spin"]);
    let (runtime, _) = app.runtime();
    invoke(&runtime, "spin", "0").await;
    let rec = invoke(&runtime, "spin", "50").await.record;
    assert_eq!(rec.outcome.as_str(), "ok");
    assert!(
        (40_000..=200_000).contains(&rec.cpu_us),
        "cpu {}us",
        rec.cpu_us
    );
    assert!(rec.run_us >= 50_000, "run {}us", rec.run_us);
    assert!(
        rec.cpu_us <= rec.run_us + 5_000,
        "one thread cannot bill more CPU than wall: {rec:?}"
    );
    assert!(rec.wall_us >= rec.run_us + rec.instantiate_us);
    assert!(!rec.cold);
    assert_eq!(
        rec.fuel_consumed, None,
        "fuel is off unless a function asks"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_is_stopped_at_its_timeout() {
    let _alone = util::cpu_heavy().await;
    let app = App::with_guests("", "timeout = \"200ms\"", &["loop", "hello"]);
    let server = TestServer::start(&app).await;
    // Warm it, so the measured run is all loop.
    let _ = server.get("/loop").await;
    let r = server.get("/loop").await;
    assert_eq!(r.status(), 504);
    let record = server.record(&invocation_id(&r)).await;
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
    // The CPU time was billed: the loop burned all of it.
    assert!(record.cpu_us >= 150_000, "cpu {}us", record.cpu_us);
    assert!(
        record.cpu_us <= record.run_us + 5_000,
        "cpu {}us > run {}us",
        record.cpu_us,
        record.run_us
    );
    assert_eq!(server.get("/hello").await.status(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_waiting_in_a_host_call_is_stopped_too() {
    let _alone = util::cpu_heavy().await;
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
