//! Admission control: `max_concurrency`, the bounded queue, 503 when full.

use crate::util::{App, TestServer, invocation_id};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excess_requests_queue_and_only_a_full_queue_is_rejected() {
    let _cpu = crate::util::cpu_heavy().await;
    let app = App::with_guests("", "max_concurrency = 1\nqueue = 1", &["spin"]);
    let server = TestServer::start(&app).await;
    assert_eq!(server.get("/spin/0").await.status(), 200); // warm

    // One runs, one waits, the third finds the queue full.
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let client = server.client.clone();
        let url = server.url("/spin/300");
        tasks.push(tokio::spawn(async move {
            let r = client.get(url).send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (status, retry, invocation_id(&r))
        }));
        // Keep the arrival order deterministic.
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let statuses: Vec<u16> = results.iter().map(|r| r.0).collect();
    assert_eq!(statuses, vec![200, 200, 503]);
    assert_eq!(
        results[2].1.as_deref(),
        Some("1"),
        "503 carries Retry-After"
    );

    let queued = server.record(&results[1].2).await;
    assert!(
        queued.queued_us >= 200_000,
        "the second waited for the first: {}us",
        queued.queued_us
    );
    let rejected = server.record(&results[2].2).await;
    assert_eq!(rejected.outcome.as_str(), "rejected");
    assert!(rejected.reason.unwrap().contains("queue full"));
    assert_eq!(rejected.cpu_us, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_past_queue_timeout_is_rejected() {
    let _cpu = crate::util::cpu_heavy().await;
    let app = App::with_guests(
        "",
        "max_concurrency = 1\nqueue = 5\nqueue_timeout = \"100ms\"",
        &["spin"],
    );
    let server = TestServer::start(&app).await;
    assert_eq!(server.get("/spin/0").await.status(), 200);
    let client = server.client.clone();
    let url = server.url("/spin/500");
    let slow = tokio::spawn(async move { client.get(url).send().await.unwrap().status() });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let r = server.get("/spin/0").await;
    assert_eq!(r.status(), 503);
    let record = server.record(&invocation_id(&r)).await;
    assert!(record.reason.unwrap().contains("queue timeout"));
    assert_eq!(slow.await.unwrap(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_concurrency_than_pool_slots_waits_instead_of_failing() {
    let _cpu = crate::util::cpu_heavy().await;
    // Two functions may each run 4 at once, but the pool has 1 slot.
    let app = App::with_guests(
        "instance_slots = 1",
        "max_concurrency = 4",
        &["spin", "hello"],
    );
    let server = TestServer::start(&app).await;
    assert_eq!(server.get("/spin/0").await.status(), 200);
    assert_eq!(server.get("/hello").await.status(), 200);
    let client = server.client.clone();
    let url = server.url("/spin/300");
    let slow = tokio::spawn(async move { client.get(url).send().await.unwrap().status() });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let r = server.get("/hello").await;
    assert_eq!(r.status(), 200);
    let record = server.record(&invocation_id(&r)).await;
    assert!(
        record.queued_us >= 150_000,
        "waited for the slot: {}us",
        record.queued_us
    );
    assert_eq!(slow.await.unwrap(), 200);
    server.stop().await;
}
