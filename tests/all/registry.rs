//! Loading on demand, the compiled-artifact cache, and eviction.

use std::time::{Duration, Instant};

use kelvin::metering::LoadSource;

use crate::util::{App, invoke, write};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_load_on_first_invocation_only() {
    let app = App::with_guests("", "", &["hello", "echo"]);
    let (runtime, _) = app.runtime();
    // Start-up validated both functions but compiled nothing.
    assert!(runtime.registry().loaded().is_empty());
    let artifact = runtime.registry().artifact_path("hello").unwrap();
    assert!(!artifact.exists());

    let first = invoke(&runtime, "hello", "").await;
    assert_eq!(first.record.outcome.as_str(), "ok");
    assert!(first.record.cold);
    assert_eq!(first.record.load.unwrap().source, LoadSource::Compile);
    assert_eq!(runtime.registry().loaded(), vec!["hello"]);
    assert!(artifact.exists(), "the compiled artifact was cached");

    let second = invoke(&runtime, "hello", "").await;
    assert!(!second.record.cold);
    assert!(second.record.load.is_none());
    assert_eq!(second.stdout, first.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_loads_from_the_cache_without_compiling() {
    let app = App::with_guests("", "", &["hello"]);
    {
        let (runtime, _) = app.runtime();
        let r = invoke(&runtime, "hello", "").await;
        assert_eq!(r.record.load.unwrap().source, LoadSource::Compile);
    }
    let (runtime, _) = app.runtime();
    let r = invoke(&runtime, "hello", "").await;
    assert_eq!(r.record.outcome.as_str(), "ok");
    assert!(r.record.cold);
    assert_eq!(r.record.load.unwrap().source, LoadSource::Cache);
    let text = runtime.metrics().render();
    assert!(
        text.contains("kelvin_function_loads_total{function=\"hello\",source=\"cache\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_truncated_artifact_is_rebuilt_not_run() {
    let app = App::with_guests("", "", &["hello"]);
    let artifact = {
        let (runtime, _) = app.runtime();
        invoke(&runtime, "hello", "").await;
        runtime.registry().artifact_path("hello").unwrap()
    };
    let good = std::fs::read(&artifact).unwrap();

    // One flipped byte in the code: the checksum catches it.
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    // Truncation and garbage: caught too.
    for bad in [
        flipped,
        good[..good.len() / 3].to_vec(),
        b"not an artifact".to_vec(),
    ] {
        write(&artifact, &bad);
        let (runtime, _) = app.runtime();
        let r = invoke(&runtime, "hello", "").await;
        assert_eq!(r.record.outcome.as_str(), "ok");
        assert_eq!(
            r.record.load.unwrap().source,
            LoadSource::Compile,
            "a bad entry is never trusted"
        );
        assert_eq!(
            String::from_utf8_lossy(&r.stdout).lines().last(),
            Some("Hello, world!")
        );
        // ...and rebuilt: the next start loads it from the cache again.
        let (runtime, _) = app.runtime();
        let r = invoke(&runtime, "hello", "").await;
        assert_eq!(r.record.load.unwrap().source, LoadSource::Cache);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_evicts_by_count() {
    let app = App::with_guests("max_loaded = 2", "", &["hello", "echo", "spin"]);
    let (runtime, _) = app.runtime();
    invoke(&runtime, "hello", "").await;
    invoke(&runtime, "echo", "").await;
    invoke(&runtime, "hello", "").await; // hello is now the most recent
    invoke(&runtime, "spin", "0").await;
    assert_eq!(runtime.registry().loaded(), vec!["spin", "hello"]);
    let text = runtime.metrics().render();
    assert!(
        text.contains("kelvin_evictions_total{function=\"echo\",reason=\"capacity\"} 1"),
        "{text}"
    );
    // An evicted function comes back cold, from the cache.
    let r = invoke(&runtime, "echo", "").await;
    assert!(r.record.cold);
    assert_eq!(r.record.load.unwrap().source, LoadSource::Cache);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_evicts_by_memory_budget() {
    // Each guest's footprint (code + initial memory) is over 1 MiB, so a 2 MiB
    // budget holds one function at a time.
    let app = App::with_guests("memory_budget = \"2MiB\"", "", &["hello", "echo"]);
    let (runtime, _) = app.runtime();
    invoke(&runtime, "hello", "").await;
    assert_eq!(runtime.registry().loaded(), vec!["hello"]);
    invoke(&runtime, "echo", "").await;
    assert_eq!(runtime.registry().loaded(), vec!["echo"]);
    let text = runtime.metrics().render();
    assert!(
        text.contains("kelvin_evictions_total{function=\"hello\",reason=\"memory\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_functions_scale_to_zero() {
    let app = App::new(
        "",
        "[functions.hello]\nsource = \"{guests}/hello.wasm\"\nkeep_warm = \"1m\"\n\
         [functions.echo]\nsource = \"{guests}/echo.wasm\"\nkeep_warm = \"5m\"\n",
    );
    let (runtime, _) = app.runtime();
    invoke(&runtime, "hello", "").await;
    invoke(&runtime, "echo", "").await;
    let now = Instant::now();
    // Time is injected: no test sleeps for a minute.
    assert!(runtime.registry().evict_idle_at(now).is_empty());
    assert!(
        runtime
            .registry()
            .evict_idle_at(now + Duration::from_secs(30))
            .is_empty()
    );
    let evicted = runtime
        .registry()
        .evict_idle_at(now + Duration::from_secs(61));
    assert_eq!(evicted.len(), 1);
    assert_eq!(evicted[0].0, "hello");
    assert_eq!(evicted[0].1.as_str(), "idle");
    assert_eq!(runtime.registry().loaded(), vec!["echo"]);
    let evicted = runtime
        .registry()
        .evict_idle_at(now + Duration::from_secs(301));
    assert_eq!(evicted.len(), 1);
    assert!(runtime.registry().loaded().is_empty());
    let text = runtime.metrics().render();
    assert!(
        text.contains("kelvin_evictions_total{function=\"hello\",reason=\"idle\"} 1"),
        "{text}"
    );
    assert!(text.contains("kelvin_loaded_functions 0"), "{text}");
    // Scaled to zero, the next invocation is a cold start from the cache.
    let r = invoke(&runtime, "hello", "").await;
    assert_eq!(r.record.load.unwrap().source, LoadSource::Cache);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_compile_once() {
    let app = App::with_guests("", "", &["hello"]);
    let (runtime, _) = app.runtime();
    let runtime = std::sync::Arc::new(runtime);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let rt = runtime.clone();
        tasks.push(tokio::spawn(async move {
            invoke(&rt, "hello", "").await.record
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.outcome.as_str(), "ok");
        // Each waited for the one compile: each was a cold start.
        if r.cold {
            assert_eq!(r.load.unwrap().source, LoadSource::Compile);
        }
    }
    let text = runtime.metrics().render();
    assert!(
        text.contains("kelvin_function_loads_total{function=\"hello\",source=\"compile\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_changed_after_it_was_verified_is_checked_again() {
    let app = App::with_guests("", "", &["hello"]);
    let (runtime, _) = app.runtime();
    invoke(&runtime, "hello", "").await;
    let artifact = runtime.registry().artifact_path("hello").unwrap();
    let good = std::fs::read(&artifact).unwrap();

    // A reload after eviction trusts the file this process verified...
    runtime.registry().unload("hello", false);
    let r = invoke(&runtime, "hello", "").await;
    assert_eq!(r.record.load.unwrap().source, LoadSource::Cache);

    // ...but not once it changed (a new mtime, here with the same size).
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    write(&artifact, &flipped);
    runtime.registry().unload("hello", false);
    let r = invoke(&runtime, "hello", "").await;
    assert_eq!(r.record.outcome.as_str(), "ok");
    assert_eq!(r.record.load.unwrap().source, LoadSource::Compile);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_nobody_waits_for_any_more_still_finishes_once() {
    let app = App::with_guests("", "", &["hello"]);
    let (runtime, _) = app.runtime();
    let runtime = std::sync::Arc::new(runtime);
    // Five requests that give up while the function compiles (a client
    // timing out): before, each threw its compile away.
    for _ in 0..5 {
        let gave_up =
            tokio::time::timeout(Duration::from_millis(1), invoke(&runtime, "hello", "")).await;
        assert!(gave_up.is_err());
    }
    // The one compile went on, was cached and loaded.
    let deadline = Instant::now() + Duration::from_secs(60);
    while runtime.registry().loaded().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the abandoned load never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(runtime.registry().artifact_path("hello").unwrap().exists());
    let r = invoke(&runtime, "hello", "").await;
    assert!(!r.record.cold);
    let text = runtime.metrics().render();
    assert!(
        text.contains("kelvin_function_loads_total{function=\"hello\",source=\"compile\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_rechecks_a_source_that_changed_since_the_last() {
    let app = App::with_guests("", "", &["hello"]);
    let source = app.dir.path().join("hello.wasm");
    write(
        &source,
        &std::fs::read(kelvin_tests::guest("hello")).unwrap(),
    );
    let manifest = app.manifest_path.clone();
    let text = std::fs::read_to_string(&manifest).unwrap();
    let guest = kelvin_tests::guest("hello").display().to_string();
    std::fs::write(&manifest, text.replace(&guest, "hello.wasm")).unwrap();
    let (runtime, _) = app.runtime();
    let hello = invoke(&runtime, "hello", "").await.record.version;
    drop(runtime);
    // Unchanged: known from the last start. Replaced: hashed and checked
    // again, so records carry the new version...
    write(
        &source,
        &std::fs::read(kelvin_tests::guest("echo")).unwrap(),
    );
    let (runtime, _) = app.runtime();
    let echo = invoke(&runtime, "hello", "").await.record.version;
    assert_ne!(hello, echo);
    drop(runtime);
    // ...and a broken file stops the start, as the first time.
    write(&source, b"\0asm\x01\0\0\0garbage");
    let err = kelvin::Runtime::new(
        app.manifest(),
        std::sync::Arc::new(kelvin::metering::MemorySink::default()),
    )
    .err()
    .expect("a broken wasm stops the start");
    assert!(err.to_string().contains("not a usable wasm"), "{err}");
}
