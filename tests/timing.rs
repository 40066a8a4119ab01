//! Tests whose assertions are about time: CPU billed, how soon a runaway
//! guest is stopped. They must hold on a machine doing other work too (a
//! build beside `cargo test`, both cores busy), where a thread that is
//! preempted burns less CPU than the wall time it spends: so CPU is checked
//! against work done (a fixed number of rounds costs about the same CPU
//! however busy the machine), bounded above by wall time, and never
//! expected to fill a wall-clock interval. Within the binary, each test
//! holds the CPU lock, so they run one by one.

#[path = "all/util.rs"]
#[allow(dead_code)]
mod util;

use std::time::Duration;

use kelvin::engine::EPOCH_TICK;

use util::{App, TestServer, invocation_id, invoke};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_billed_follows_the_work_done() {
    let _alone = util::cpu_heavy().await;
    let app = App::with_guests("", "", &["spin"]);
    let (runtime, _) = app.runtime();
    invoke(&runtime, "spin", "work 1").await;
    // The same work twice and four times as much: CPU time measures work,
    // so a busy machine stretches the wall time, not the CPU billed.
    let mut cpu = Vec::new();
    for rounds in [20_000, 20_000, 80_000] {
        let rec = invoke(&runtime, "spin", &format!("work {rounds}"))
            .await
            .record;
        assert_eq!(rec.outcome.as_str(), "ok");
        assert!(rec.cpu_us > 0, "{rec:?}");
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
        cpu.push(rec.cpu_us as f64);
    }
    let same = cpu[1] / cpu[0];
    let four = cpu[2] / ((cpu[0] + cpu[1]) / 2.0);
    assert!((0.5..=2.0).contains(&same), "the same work billed {cpu:?}");
    assert!(
        (2.5..=6.0).contains(&four),
        "four times the work billed {cpu:?}"
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
    // Within two ticks of the deadline, plus scheduling slack for a 2-core
    // machine with both cores busy elsewhere.
    assert!(
        ran <= timeout + 2 * EPOCH_TICK + Duration::from_millis(100),
        "stopped late: {ran:?}"
    );
    // The CPU time was billed: as much as the loop got, which on a busy
    // machine is less than its wall time, never more.
    assert!(record.cpu_us >= 20_000, "cpu {}us", record.cpu_us);
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
        ran <= Duration::from_millis(200) + 2 * EPOCH_TICK + Duration::from_millis(100),
        "stopped late: {ran:?}"
    );
    // Waiting is not computing.
    assert!(r.record.cpu_us < 50_000, "cpu {}us", r.record.cpu_us);
}
