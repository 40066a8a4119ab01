//! Microbenchmarks of Kelvin's hot paths, in process (no HTTP):
//! instantiate, invoke (warm), load from the artifact cache, and metering
//! on vs off. `cargo bench -p kelvin-benches --bench micro`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use kelvin::engine::Tuning;
use kelvin::invoke::Host;
use kelvin::metering::JsonLinesSink;
use kelvin::registry::Prepared;
use kelvin::{Event, Manifest, Runtime};

/// A scratch app with the preview-1 and the wasi:http hello.
struct App {
    dir: tempfile::TempDir,
}

impl App {
    fn new() -> App {
        let dir = tempfile::tempdir().unwrap();
        let p1 = kelvin_tests::guest_dir().join("hello.wasm");
        let p2 = kelvin_tests::component_dir().join("hello_http.wasm");
        std::fs::write(
            dir.path().join("functions.toml"),
            format!(
                "version = 1\nname = \"micro\"\n\
                 [functions.hello]\nsource = \"{}\"\n\
                 [functions.hello-http]\nsource = \"{}\"\n",
                p1.display(),
                p2.display()
            ),
        )
        .unwrap();
        App { dir }
    }

    fn manifest(&self) -> Manifest {
        Manifest::load(&self.dir.path().join("functions.toml")).unwrap()
    }

    /// A runtime recording to a JSON-lines log, as `kelvin up --no-ledger`.
    fn runtime(&self, tuning: Tuning) -> Runtime {
        let log = JsonLinesSink::open(&self.dir.path().join("invocations.jsonl")).unwrap();
        Runtime::with_tuning(self.manifest(), Arc::new(log), tuning).unwrap()
    }
}

fn event() -> Event {
    Event {
        trigger: "bench",
        ..Event::default()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn benches(c: &mut Criterion) {
    let app = App::new();
    let rt = rt();
    let runtime = app.runtime(Tuning::default());
    // Load (and compile into the cache) both functions first.
    for f in ["hello", "hello-http"] {
        let inv = rt.block_on(runtime.invoke(f, event())).unwrap();
        assert_eq!(inv.record.outcome, kelvin::metering::Outcome::Ok);
    }

    // Instantiation alone: a store and an instance from the pool, dropped.
    let (loaded, _) = rt.block_on(runtime.registry().acquire("hello")).unwrap();
    let Prepared::Module(pre) = &loaded.prepared else {
        unreachable!("hello is a preview-1 module")
    };
    c.bench_function("instantiate/hello", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut store = wasmtime::Store::new(pre.module().engine(), Host::empty());
                pre.instantiate_async(&mut store).await.unwrap();
            })
        })
    });

    for f in ["hello", "hello-http"] {
        c.bench_function(&format!("invoke-warm/{f}"), |b| {
            b.iter(|| rt.block_on(runtime.invoke(f, event())).unwrap())
        });
    }

    for f in ["hello", "hello-http"] {
        c.bench_function(&format!("load-from-cache/{f}"), |b| {
            b.iter(|| {
                runtime.registry().unload(f, false);
                rt.block_on(runtime.registry().acquire(f)).unwrap()
            })
        });
    }

    // Metering: CPU time per poll plus a record to the log, vs neither.
    let off = app.runtime(Tuning {
        metering: false,
        ..Tuning::default()
    });
    let mut group = c.benchmark_group("metering");
    for (name, runtime) in [("on", &runtime), ("off", &off)] {
        group.bench_function(name, |b| {
            b.iter(|| rt.block_on(runtime.invoke("hello", event())).unwrap())
        });
    }
    group.finish();
}

criterion_group! {
    name = micro;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(micro);
