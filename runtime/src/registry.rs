//! The registry: every function the manifest declares, which of them are
//! loaded, and when they are unloaded.
//!
//! A function is checked at start-up (the wasm is read, hashed and
//! validated) but compiled only when first invoked, by `kelvin build`, or
//! in the background after `kelvin up` starts ([`Registry::precompile_in_background`]).
//! Loaded functions sit in an LRU bounded by a count and by a memory budget;
//! one idle past its `keep_warm` is unloaded (scale to zero).
//!
//! Loads and compiles are shared tasks: every request for a function that
//! is loading waits for the one load under way, never starts a second, and
//! the load finishes (and caches its artifact) even when every request that
//! waited for it has gone.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio::sync::watch;
use wasmtime::{InstancePre, Linker, Module, Store};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::cache::{
    ArtifactCache, CacheMiss, Cached, Compiled, FullCheck, Needs, WasmHash, WasmKind,
};
use crate::engine::KelvinEngine;
use crate::invoke::{Host, MAX_TABLE_ELEMENTS};
use crate::manifest::FunctionSpec;
use crate::metering::{ColdStart, LoadSource};
use crate::metrics::Metrics;
use crate::proxy::HttpHost;

/// The only import module a preview-1 function may use.
const WASI_P1: &str = "wasi_snapshot_preview1";

/// A function ready to instantiate: compiled, linked, pre-checked.
pub struct LoadedFunction {
    pub spec: Arc<FunctionSpec>,
    pub prepared: Prepared,
    /// The engine its code belongs to: its stores are made there.
    pub engine: wasmtime::Engine,
    /// Estimated resident cost: compiled code plus initial linear memory.
    pub footprint: u64,
    /// The wasm it was compiled from.
    hash: WasmHash,
    tier: Tier,
}

impl LoadedFunction {
    /// What an invocation of it runs.
    pub fn code(&self) -> crate::invoke::Code<'_> {
        crate::invoke::Code {
            spec: &self.spec,
            engine: &self.engine,
        }
    }
}

/// Which compiler's code a loaded function runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    /// Cranelift: optimised, cached on disk.
    Optimised,
    /// Winch: compiled several times faster, slower to run; only until the
    /// optimised code is ready.
    Baseline,
}

/// A linked pre-instance of either kind.
pub enum Prepared {
    /// A preview-1 command, run with CGI for HTTP.
    Module(InstancePre<Host>),
    /// A wasi:http/proxy component, handed HTTP requests directly.
    Component(ProxyPre<HttpHost>),
}

/// Why a function was unloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictReason {
    /// Unused for longer than its `keep_warm`.
    Idle,
    /// More than `max_loaded` functions were loaded.
    Capacity,
    /// Loaded functions' footprints exceeded `memory_budget`.
    Memory,
    /// Its artifact failed the whole-file check after it was loaded.
    Corrupt,
    /// Unloaded on request (`kelvin bench` measuring cold starts).
    Requested,
}

impl EvictReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EvictReason::Idle => "idle",
            EvictReason::Capacity => "capacity",
            EvictReason::Memory => "memory",
            EvictReason::Corrupt => "corrupt",
            EvictReason::Requested => "requested",
        }
    }
}

/// A function whose wasm cannot be used; found at start-up.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "function `{function}`: `{path}` does not exist; build it with `kelvin build` (or `kelvin up --build`)"
    )]
    NotBuilt { function: String, path: PathBuf },
    #[error("function `{function}`: failed to read `{path}`")]
    Read {
        function: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("function `{function}`: `{path}` is not a usable wasm module: {reason}")]
    Invalid {
        function: String,
        path: PathBuf,
        reason: String,
    },
    #[error("failed to prepare the artifact cache in `{path}`")]
    Cache {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A function that could not be loaded at invocation time.
#[derive(Debug, Clone, thiserror::Error)]
#[error("failed to load function `{function}`: {reason}")]
pub struct LoadError {
    pub function: String,
    pub reason: String,
}

/// Who is waiting for a compile: it runs on every core for a request, and
/// on a niced pool that leaves a core for serving in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Priority {
    Now,
    Background,
}

/// A shared task's result, once it is there.
type Shared<T> = watch::Receiver<Option<Result<T, LoadError>>>;

/// What a load gives every request that waited for it.
type Load = (Arc<LoadedFunction>, LoadSource);

struct Slot {
    spec: Arc<FunctionSpec>,
    kind: WasmKind,
    /// Size of the wasm at start-up (the background precompile goes
    /// smallest first).
    wasm_len: u64,
    /// Hash of the wasm as last read; updated if the file changed when it is
    /// next compiled.
    hash: Mutex<WasmHash>,
    /// The load under way, if any: requests wait for it.
    loading: Mutex<Option<Shared<Load>>>,
    /// The compile under way, if any: loads and the background precompile
    /// wait for it.
    compiling: Mutex<Option<Shared<Compiled>>>,
}

struct Entry {
    function: Arc<LoadedFunction>,
    last_used: Instant,
}

struct Loaded {
    lru: LruCache<String, Entry>,
    bytes: u64,
}

impl Loaded {
    /// Unloads `name`, keeping the byte count right; whether it was loaded.
    fn remove(&mut self, name: &str) -> bool {
        let Some(e) = self.lru.pop(name) else {
            return false;
        };
        self.bytes -= e.function.footprint;
        true
    }
}

/// Bounds on what stays loaded.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub max_loaded: usize,
    pub memory_budget: u64,
}

/// The registry; cheap to share with the tasks it starts.
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Arc<KelvinEngine>,
    linker: Linker<Host>,
    component_linker: wasmtime::component::Linker<HttpHost>,
    /// The same linkers for the baseline engine, when there is one.
    baseline_linkers: Option<(Linker<Host>, wasmtime::component::Linker<HttpHost>)>,
    /// Whether loads that must compile are served by baseline code first
    /// (in a serving process; see [`Registry::serve_tiered`]).
    tiered: std::sync::atomic::AtomicBool,
    cache: ArtifactCache,
    /// Every function version the registry knows, by key: a function's
    /// name for the manifest's functions at start-up, `name@version` for
    /// deployed versions. Added to while serving, never changed in place.
    slots: std::sync::RwLock<HashMap<String, Arc<Slot>>>,
    /// The wasm imports preview-1 functions may use.
    provided: HashSet<String>,
    loaded: Mutex<Loaded>,
    capacity: Capacity,
    metrics: Metrics,
    /// Threads for background compiles: one fewer than the
    /// cores (at least one), at a lower scheduling priority.
    background: rayon::ThreadPool,
}

impl Registry {
    /// Checks every function's wasm; nothing is compiled.
    pub fn new(
        engine: Arc<KelvinEngine>,
        functions: &[FunctionSpec],
        cache_dir: PathBuf,
        capacity: Capacity,
        metrics: Metrics,
    ) -> Result<Registry, RegistryError> {
        let mut linker = Linker::new(engine.engine());
        wasmtime_wasi::p1::add_to_linker_async(&mut linker, Host::wasi)
            .expect("WASI links into a fresh linker");
        let cache = ArtifactCache::new(&cache_dir, engine.engine()).map_err(|source| {
            RegistryError::Cache {
                path: cache_dir.clone(),
                source,
            }
        })?;
        let provided: HashSet<String> = {
            let mut store = Store::new(engine.engine(), Host::empty());
            linker
                .iter(&mut store)
                .filter(|(module, _, _)| *module == WASI_P1)
                .map(|(_, name, _)| name.to_owned())
                .collect()
        };

        let mut sources = cache.sources();
        let mut slots = HashMap::with_capacity(functions.len());
        for spec in functions {
            let invalid = |reason: String| RegistryError::Invalid {
                function: spec.name.to_string(),
                path: spec.source.clone(),
                reason,
            };
            let not_read = |source: std::io::Error| {
                let function = spec.name.to_string();
                let path = spec.source.clone();
                // The usual first-run mistake deserves the usual fix.
                if source.kind() == std::io::ErrorKind::NotFound && spec.build.is_some() {
                    RegistryError::NotBuilt { function, path }
                } else {
                    RegistryError::Read {
                        function,
                        path,
                        source,
                    }
                }
            };
            let meta = std::fs::metadata(&spec.source).map_err(not_read)?;
            let (hash, kind, len, needs) = match sources.known(&spec.source, &meta) {
                // Checked at an earlier start and unchanged since.
                Some((hash, kind, needs)) => (hash, kind, meta.len(), needs),
                None => {
                    let bytes = std::fs::read(&spec.source).map_err(not_read)?;
                    let hash = WasmHash::of(&bytes);
                    let kind = check_shape(&bytes, &provided).map_err(invalid)?;
                    // A cached artifact was validated when it was compiled;
                    // full validation is only needed for wasm never
                    // compiled here.
                    if !cache.contains(&hash) {
                        validate(engine.engine(), kind, &bytes).map_err(invalid)?;
                    }
                    let needs = Needs::of(&bytes).map_err(invalid)?;
                    sources.remember(&spec.source, &meta, hash, kind, needs);
                    (hash, kind, bytes.len() as u64, needs)
                }
            };
            // Limits may change while the wasm does not: checked every time.
            needs
                .fit(spec.limits.memory, MAX_TABLE_ELEMENTS as u64)
                .map_err(invalid)?;
            slots.insert(
                spec.name.to_string(),
                Arc::new(Slot::new(spec.clone(), kind, len, hash)),
            );
        }
        cache.save_sources(&sources);
        let component_linker = crate::proxy::linker(engine.engine());
        let baseline_linkers = engine.baseline().map(|baseline| {
            let mut linker = Linker::new(baseline);
            wasmtime_wasi::p1::add_to_linker_async(&mut linker, Host::wasi)
                .expect("WASI links into a fresh linker");
            (linker, crate::proxy::linker(baseline))
        });
        Ok(Registry {
            inner: Arc::new(Inner {
                engine,
                linker,
                component_linker,
                baseline_linkers,
                tiered: std::sync::atomic::AtomicBool::new(false),
                cache,
                slots: std::sync::RwLock::new(slots),
                provided,
                loaded: Mutex::new(Loaded {
                    lru: LruCache::unbounded(),
                    bytes: 0,
                }),
                capacity,
                metrics,
                background: background_pool(),
            }),
        })
    }

    /// The deployment version of `function`: its wasm's hash.
    pub fn version(&self, function: &str) -> String {
        self.inner
            .slot(function)
            .map(|s| s.hash().hex())
            .unwrap_or_default()
    }

    /// Whether `function` is a module or a component (known from start-up).
    pub fn kind(&self, function: &str) -> Option<WasmKind> {
        self.inner.slot(function).ok().map(|s| s.kind)
    }

    pub fn spec(&self, function: &str) -> Option<Arc<FunctionSpec>> {
        self.inner.slot(function).ok().map(|s| s.spec.clone())
    }

    /// The wasm's hash of `function` (a registry key).
    pub fn hash(&self, function: &str) -> Option<WasmHash> {
        self.inner.slot(function).ok().map(|s| s.hash())
    }

    /// Checks `bytes` as a function's wasm (its shape, the imports it
    /// needs, and validation), as start-up does: its hash and kind, or why
    /// it cannot be used.
    pub fn check_wasm(&self, bytes: &[u8]) -> Result<(WasmHash, WasmKind), String> {
        let hash = WasmHash::of(bytes);
        let kind = check_shape(bytes, &self.inner.provided)?;
        if !self.inner.cache.contains(&hash) {
            validate(self.inner.engine.engine(), kind, bytes)?;
        }
        Ok((hash, kind))
    }

    /// Checks that a function with `limits` can instantiate `bytes` (already
    /// through [`Registry::check_wasm`]): its initial memory and tables fit.
    pub fn check_fits(bytes: &[u8], limits: &crate::manifest::Limits) -> Result<(), String> {
        Needs::of(bytes)?.fit(limits.memory, MAX_TABLE_ELEMENTS as u64)
    }

    /// Adds a function version under `key`, its wasm at `spec.source`
    /// already checked by [`Registry::check_wasm`] and never changed after.
    /// A key already known keeps what it has (a key names one version).
    pub fn add(&self, key: &str, spec: FunctionSpec, kind: WasmKind, hash: WasmHash) {
        let len = std::fs::metadata(&spec.source).map_or(0, |m| m.len());
        let mut slots = self.inner.slots.write().expect("slots lock");
        slots
            .entry(key.to_owned())
            .or_insert_with(|| Arc::new(Slot::new(spec, kind, len, hash)));
    }

    /// Forgets `key` (a version no longer kept): unloaded, and no longer
    /// loadable. Invocations under way keep the code they hold.
    pub fn remove(&self, key: &str) {
        self.inner.slots.write().expect("slots lock").remove(key);
        let mut loaded = self.inner.lock();
        loaded.remove(key);
        self.inner.metrics.loaded.set(loaded.lru.len() as i64);
    }

    /// Whether `key` is known.
    pub fn contains(&self, key: &str) -> bool {
        self.inner.slot(key).is_ok()
    }

    /// Compiles `key` if its artifact is not cached (on every core), and
    /// loads it: when this returns, its first request is warm.
    pub async fn prepare(&self, key: &str) -> Result<(), LoadError> {
        let slot = self.inner.slot(key)?;
        if !self.inner.cache.contains(&slot.hash()) {
            outcome(key, Inner::start_compile(&self.inner, key, Priority::Now)).await?;
        }
        self.acquire(key).await.map(drop)
    }

    /// Names of the loaded functions, most recently used first.
    pub fn loaded(&self) -> Vec<String> {
        self.inner
            .lock()
            .lru
            .iter()
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Where `function`'s compiled artifact lives (or would live).
    pub fn artifact_path(&self, function: &str) -> Option<PathBuf> {
        let slot = self.inner.slot(function).ok()?;
        Some(self.inner.cache.artifact_path(&slot.hash()))
    }

    /// Unloads every function idle for longer than its `keep_warm` as of
    /// `now`. Time is passed in so tests can move it forward.
    pub fn evict_idle_at(&self, now: Instant) -> Vec<(String, EvictReason)> {
        let mut evicted = Vec::new();
        {
            let mut loaded = self.inner.lock();
            let idle: Vec<String> = loaded
                .lru
                .iter()
                .filter(|(_, e)| {
                    now.saturating_duration_since(e.last_used) >= e.function.spec.keep_warm
                })
                .map(|(k, _)| k.clone())
                .collect();
            for name in idle {
                if loaded.remove(&name) {
                    evicted.push((name, EvictReason::Idle));
                }
            }
            self.inner.metrics.loaded.set(loaded.lru.len() as i64);
        }
        self.inner.report(&evicted);
        evicted
    }

    /// Unloads `function` now, and with `forget_artifact` also deletes its
    /// compiled artifact, so that its next invocation starts cold from the
    /// cache or from scratch. Returns whether it was loaded.
    pub fn unload(&self, function: &str, forget_artifact: bool) -> bool {
        let popped = {
            let mut loaded = self.inner.lock();
            let popped = loaded.remove(function);
            self.inner.metrics.loaded.set(loaded.lru.len() as i64);
            popped
        };
        if popped {
            self.inner
                .report(&[(function.to_owned(), EvictReason::Requested)]);
        }
        if forget_artifact && let Ok(slot) = self.inner.slot(function) {
            self.inner.cache.remove(&slot.hash());
        }
        popped
    }

    /// Makes the next loads check their artifacts as a restarted process
    /// would (for `kelvin bench cold-start`).
    pub fn forget_verified(&self) {
        self.inner.cache.forget_verified();
    }

    /// How long until the next idle eviction could be due, for the sweeper.
    pub fn next_idle_check(&self) -> Duration {
        let loaded = self.inner.lock();
        let now = Instant::now();
        loaded
            .lru
            .iter()
            .map(|(_, e)| (e.last_used + e.function.spec.keep_warm).saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// From now on, a request for a function with no optimised code yet is
    /// served by baseline (Winch) code, compiled several times faster,
    /// while Cranelift compiles in the background; the function moves to
    /// the optimised code when it is ready. For processes that serve: they
    /// live long enough for the optimised compile to finish and be cached.
    pub fn serve_tiered(&self) {
        if self.inner.baseline_linkers.is_some() {
            self.inner
                .tiered
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The function ready to instantiate, loading it if needed. The second
    /// value describes the load when this call waited for one (a cold
    /// start): where the code came from, and how long this call waited.
    pub async fn acquire(
        &self,
        function: &str,
    ) -> Result<(Arc<LoadedFunction>, Option<ColdStart>), LoadError> {
        if let Some(f) = self.inner.get(function) {
            return Ok((f, None));
        }
        let started = Instant::now();
        let slot = self.inner.slot(function)?;
        let load = {
            let mut loading = slot.loading.lock().expect("slot lock");
            // Loaded while this call took the lock: warm after all.
            if let Some(f) = self.inner.get(function) {
                return Ok((f, None));
            }
            match &*loading {
                Some(load) => load.clone(),
                None => {
                    let load = Inner::start_load(&self.inner, function);
                    *loading = Some(load.clone());
                    load
                }
            }
        };
        let (loaded, source) = outcome(function, load).await?;
        let load_us = micros(started.elapsed());
        Ok((loaded, Some(ColdStart { source, load_us })))
    }

    /// Compiles, in the background, every function whose artifact is not in
    /// the cache, smallest first, one at a time on the background pool (so a
    /// core stays free for serving). A request for a function being
    /// compiled waits for that compile. Returns how many were compiled.
    pub fn precompile_in_background(&self) -> tokio::task::JoinHandle<usize> {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut todo: Vec<(u64, String)> = inner
                .slots
                .read()
                .expect("slots lock")
                .iter()
                .filter(|(_, slot)| !inner.cache.contains(&slot.hash()))
                .map(|(name, slot)| (slot.wasm_len, name.clone()))
                .collect();
            todo.sort();
            if todo.is_empty() {
                return 0;
            }
            tracing::info!(
                functions = todo.len(),
                "precompiling functions without a cached artifact in the background"
            );
            let started = Instant::now();
            let mut compiled = 0;
            for (_, name) in todo {
                let Ok(slot) = inner.slot(&name) else {
                    continue;
                };
                // Compiled meanwhile (by a request that needed it).
                if inner.cache.contains(&slot.hash()) {
                    continue;
                }
                match outcome(
                    &name,
                    Inner::start_compile(&inner, &name, Priority::Background),
                )
                .await
                {
                    Ok(_) => compiled += 1,
                    Err(e) => {
                        tracing::warn!(function = name.as_str(), error = %e.reason, "background precompile failed")
                    }
                }
            }
            tracing::info!(
                compiled,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "background precompile done"
            );
            compiled
        })
    }

    /// Compiles every function not in the cache yet, and checks whole the
    /// artifacts that are (for `kelvin build`); returns how many were
    /// compiled.
    pub async fn precompile_all(&self) -> Result<usize, LoadError> {
        let mut compiled = 0;
        let mut names: Vec<String> = self
            .inner
            .slots
            .read()
            .expect("slots lock")
            .keys()
            .cloned()
            .collect();
        names.sort();
        for name in &names {
            let slot = self.inner.slot(name)?;
            if self
                .inner
                .cache
                .verify_now(self.inner.engine.engine(), &slot.hash(), slot.kind)
                .is_ok()
            {
                continue;
            }
            outcome(name, Inner::start_compile(&self.inner, name, Priority::Now)).await?;
            compiled += 1;
        }
        Ok(compiled)
    }
}

impl Inner {
    fn slot(&self, function: &str) -> Result<Arc<Slot>, LoadError> {
        let slots = self.slots.read().expect("slots lock");
        slots.get(function).cloned().ok_or_else(|| LoadError {
            function: function.to_owned(),
            reason: "no such function".into(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.loaded.lock().expect("registry lock poisoned")
    }

    /// The loaded function, marking it used now.
    fn get(&self, function: &str) -> Option<Arc<LoadedFunction>> {
        let mut loaded = self.lock();
        let entry = loaded.lru.get_mut(function)?;
        entry.last_used = Instant::now();
        Some(entry.function.clone())
    }

    /// Starts loading `function` in a task of its own; the caller has made
    /// sure no other load of it is under way.
    fn start_load(inner: &Arc<Inner>, function: &str) -> Shared<Load> {
        let (tx, rx) = watch::channel(None);
        let (inner, name) = (inner.clone(), function.to_owned());
        tokio::spawn(async move {
            let result = inner.load(&name).await;
            // Loaded (or failed) before the slot forgets the task: a request
            // finds it in the LRU or waits for this result.
            if let Ok(slot) = inner.slot(&name) {
                *slot.loading.lock().expect("slot lock") = None;
            }
            let _ = tx.send(Some(result));
        });
        rx
    }

    /// Loads `function`: from the cache if its artifact is there and sound,
    /// else compiled (waiting for a compile already under way), or first
    /// from baseline code when serving tiered.
    async fn load(
        self: &Arc<Self>,
        function: &str,
    ) -> Result<(Arc<LoadedFunction>, LoadSource), LoadError> {
        let slot = self.slot(function)?;
        let start = Instant::now();
        let hash = slot.hash();
        let mmap = self.engine.tuning().mmap_artifacts;
        let (compiled, source, unverified) = match self.cache.load(
            self.engine.engine(),
            &hash,
            slot.kind,
            mmap,
        ) {
            Ok(Cached {
                compiled,
                unverified,
            }) => (compiled, LoadSource::Cache, unverified),
            Err(miss) => {
                if !matches!(miss, CacheMiss::Absent) {
                    tracing::warn!(function, reason = %miss, "discarding cached artifact; recompiling");
                }
                let (compiled, source) = self.compile_for_load(function).await?;
                (compiled, source, None)
            }
        };
        let tier = if source == LoadSource::Baseline {
            Tier::Baseline
        } else {
            Tier::Optimised
        };
        let loaded = Arc::new(self.link(function, &compiled, tier)?);
        tracing::info!(
            function,
            source = source.as_str(),
            load_us = micros(start.elapsed()),
            footprint = loaded.footprint,
            "function loaded"
        );
        self.metrics
            .loads
            .with_label_values(&[function_of(function), source.as_str()])
            .inc();
        self.insert(function, loaded.clone());
        if let Some(check) = unverified {
            self.check_in_background(function, check);
        }
        Ok((loaded, source))
    }

    /// The compiled code a load without a cached artifact uses: Cranelift's,
    /// or when serving tiered, Winch's if it is ready first (the function
    /// then moves to Cranelift's code when that is ready).
    async fn compile_for_load(
        self: &Arc<Self>,
        function: &str,
    ) -> Result<(Compiled, LoadSource), LoadError> {
        let tiered = self.tiered.load(std::sync::atomic::Ordering::Relaxed);
        let Some(baseline) = self.engine.baseline().filter(|_| tiered) else {
            let compiled = outcome(
                function,
                Inner::start_compile(self, function, Priority::Now),
            )
            .await?;
            return Ok((compiled, LoadSource::Compile));
        };
        // Cranelift runs (or goes on running) in the background, leaving a
        // core to Winch and to serving.
        let optimised = Inner::start_compile(self, function, Priority::Background);
        let slot = self.slot(function)?;
        let (path, kind, engine) = (slot.spec.source.clone(), slot.kind, baseline.clone());
        let quick = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
            Compiled::compile(&engine, kind, &bytes).map_err(|e| format!("{e:#}"))
        });
        let mut optimised_done = std::pin::pin!(outcome(function, optimised.clone()));
        tokio::select! {
            biased;
            compiled = &mut optimised_done => Ok((compiled?, LoadSource::Compile)),
            quick = quick => match quick.map_err(|e| e.to_string()).and_then(|r| r) {
                Ok(compiled) => {
                    self.tier_up_when_ready(function, optimised);
                    Ok((compiled, LoadSource::Baseline))
                }
                Err(why) => {
                    tracing::debug!(function, why, "Winch could not compile it; waiting for Cranelift");
                    Ok((optimised_done.await?, LoadSource::Compile))
                }
            },
        }
    }

    /// Once `optimised` is compiled, moves `function` from its baseline code
    /// to it, if the baseline code is still what is loaded (invocations
    /// under way finish on the code they started with).
    fn tier_up_when_ready(self: &Arc<Self>, function: &str, optimised: Shared<Compiled>) {
        let (inner, name) = (self.clone(), function.to_owned());
        tokio::spawn(async move {
            let linked = match outcome(&name, optimised).await {
                Ok(compiled) => inner.link(&name, &compiled, Tier::Optimised),
                Err(e) => Err(e),
            };
            let optimised = match linked {
                Ok(f) => Arc::new(f),
                Err(e) => {
                    tracing::warn!(function = name, error = %e.reason, "optimised compile failed; staying on baseline code");
                    return;
                }
            };
            let moved = {
                let mut loaded = inner.lock();
                let Loaded { lru, bytes } = &mut *loaded;
                match lru.peek_mut(&name) {
                    Some(entry) if entry.function.tier == Tier::Baseline => {
                        *bytes = *bytes - entry.function.footprint + optimised.footprint;
                        entry.function = optimised;
                        true
                    }
                    _ => false,
                }
            };
            if moved {
                tracing::info!(function = name, "function moved to optimised code");
                inner
                    .metrics
                    .loads
                    .with_label_values(&[function_of(&name), LoadSource::Compile.as_str()])
                    .inc();
            }
        });
    }

    /// Links compiled code of `tier` into a function ready to instantiate.
    fn link(
        &self,
        function: &str,
        compiled: &Compiled,
        tier: Tier,
    ) -> Result<LoadedFunction, LoadError> {
        let slot = self.slot(function)?;
        let link_error = |e: wasmtime::Error| LoadError {
            function: function.to_owned(),
            reason: format!("{e:#}"),
        };
        let (linker, component_linker, engine) = match (tier, &self.baseline_linkers) {
            (Tier::Baseline, Some((l, c))) => (l, c, self.engine.baseline()),
            _ => (
                &self.linker,
                &self.component_linker,
                Some(self.engine.engine()),
            ),
        };
        let engine = engine
            .expect("baseline code comes from the baseline engine")
            .clone();
        let prepared = match compiled {
            Compiled::Module(m) => Prepared::Module(linker.instantiate_pre(m).map_err(link_error)?),
            Compiled::Component(c) => {
                let pre = component_linker.instantiate_pre(c).map_err(link_error)?;
                Prepared::Component(ProxyPre::new(pre).map_err(link_error)?)
            }
        };
        Ok(LoadedFunction {
            spec: slot.spec.clone(),
            prepared,
            engine,
            footprint: compiled.footprint(),
            hash: slot.hash(),
            tier,
        })
    }

    /// Starts compiling `function` unless a compile is under way, and
    /// returns that compile: it stores the artifact in the cache, and
    /// finishes even if nobody waits for it any more.
    fn start_compile(inner: &Arc<Inner>, function: &str, priority: Priority) -> Shared<Compiled> {
        let slot = inner.slot(function).expect("compiles start for known keys");
        let mut compiling = slot.compiling.lock().expect("slot lock");
        if let Some(compile) = &*compiling {
            return compile.clone();
        }
        let (tx, rx) = watch::channel(None);
        *compiling = Some(rx.clone());
        let (inner, name) = (inner.clone(), function.to_owned());
        tokio::spawn(async move {
            let result = inner.compile(&name, priority).await;
            if let Ok(slot) = inner.slot(&name) {
                *slot.compiling.lock().expect("slot lock") = None;
            }
            let _ = tx.send(Some(result));
        });
        rx
    }

    /// Compiles `function` off the async threads and stores its artifact.
    async fn compile(
        self: &Arc<Self>,
        function: &str,
        priority: Priority,
    ) -> Result<Compiled, LoadError> {
        let slot = self.slot(function)?;
        let hash = slot.hash();
        let (path, kind) = (slot.spec.source.clone(), slot.kind);
        let inner = self.clone();
        let name = function.to_owned();
        let job = move || -> Result<(Compiled, WasmHash), String> {
            let started = Instant::now();
            let bytes = std::fs::read(&path)
                .map_err(|e| format!("failed to read `{}`: {e}", path.display()))?;
            let compiled = Compiled::compile(inner.engine.engine(), kind, &bytes)
                .map_err(|e| format!("{e:#}"))?;
            let new_hash = WasmHash::of(&bytes);
            if let Err(e) = inner.cache.store(&new_hash, &compiled) {
                // Serving goes on; the next cold start compiles again.
                tracing::warn!(function = name, error = %e, "failed to write compiled artifact to the cache");
            }
            tracing::info!(
                function = name,
                compile_ms = started.elapsed().as_millis() as u64,
                background = priority == Priority::Background,
                "function compiled"
            );
            Ok((compiled, new_hash))
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let run = move || {
            let _ = tx.send(job());
        };
        match priority {
            Priority::Now => drop(tokio::task::spawn_blocking(run)),
            Priority::Background => self.background.spawn(run),
        }
        let (compiled, new_hash) = rx
            .await
            .map_err(|_| "the compile stopped without a result".to_owned())
            .and_then(|r| r)
            .map_err(|reason| LoadError {
                function: function.to_owned(),
                reason,
            })?;
        if new_hash != hash {
            tracing::warn!(
                function,
                "the .wasm file changed since start-up; using the new contents"
            );
            *slot.hash.lock().expect("hash lock") = new_hash;
        }
        Ok(compiled)
    }

    /// Checks a loaded artifact whole, off the request path (on a blocking
    /// thread, not the background pool: a compile there could hold it up
    /// for seconds); if it fails, the function is unloaded (its next
    /// request compiles it again).
    fn check_in_background(self: &Arc<Self>, function: &str, check: FullCheck) {
        let (inner, name) = (self.clone(), function.to_owned());
        tokio::task::spawn_blocking(move || {
            let Err(e) = inner.cache.verify_full(&check) else {
                return;
            };
            tracing::error!(
                function = name,
                error = %e,
                "a loaded artifact failed its whole-file check; unloading it (it is rebuilt at the next request)"
            );
            let removed = {
                let mut loaded = inner.lock();
                let ours = loaded
                    .lru
                    .peek(&name)
                    .is_some_and(|e| e.function.hash == check.hash());
                let removed = ours && loaded.remove(&name);
                inner.metrics.loaded.set(loaded.lru.len() as i64);
                removed
            };
            if removed {
                inner.report(&[(name, EvictReason::Corrupt)]);
            }
        });
    }

    fn insert(&self, function: &str, f: Arc<LoadedFunction>) {
        let mut evicted = Vec::new();
        {
            let mut loaded = self.lock();
            loaded.bytes += f.footprint;
            if let Some(old) = loaded.lru.put(
                function.to_owned(),
                Entry {
                    function: f,
                    last_used: Instant::now(),
                },
            ) {
                loaded.bytes -= old.function.footprint;
            }
            while loaded.lru.len() > self.capacity.max_loaded {
                evicted.push(pop_lru(&mut loaded, EvictReason::Capacity));
            }
            // The newest function stays even if it alone exceeds the budget.
            while loaded.bytes > self.capacity.memory_budget && loaded.lru.len() > 1 {
                evicted.push(pop_lru(&mut loaded, EvictReason::Memory));
            }
            self.metrics.loaded.set(loaded.lru.len() as i64);
        }
        self.report(&evicted);
    }

    fn report(&self, evicted: &[(String, EvictReason)]) {
        for (function, reason) in evicted {
            tracing::info!(
                function = function.as_str(),
                reason = reason.as_str(),
                "function evicted"
            );
            self.metrics
                .evictions
                .with_label_values(&[function_of(function), reason.as_str()])
                .inc();
        }
    }
}

impl Slot {
    fn new(spec: FunctionSpec, kind: WasmKind, wasm_len: u64, hash: WasmHash) -> Slot {
        Slot {
            spec: Arc::new(spec),
            kind,
            wasm_len,
            hash: Mutex::new(hash),
            loading: Mutex::new(None),
            compiling: Mutex::new(None),
        }
    }

    fn hash(&self) -> WasmHash {
        *self.hash.lock().expect("hash lock")
    }
}

/// Waits for a shared task's result.
async fn outcome<T: Clone>(function: &str, mut task: Shared<T>) -> Result<T, LoadError> {
    match task.wait_for(Option::is_some).await {
        Ok(result) => result.clone().expect("waited for a result"),
        Err(_) => Err(LoadError {
            function: function.to_owned(),
            reason: "the load stopped without a result".into(),
        }),
    }
}

/// The pool background compiles run on: all cores but one (at
/// least one thread), each thread niced, so serving keeps a core and wins
/// the others when it needs them.
fn background_pool() -> rayon::ThreadPool {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    rayon::ThreadPoolBuilder::new()
        .num_threads(cores.saturating_sub(1).max(1))
        .thread_name(|i| format!("kelvin-background-{i}"))
        .start_handler(|_| {
            // SAFETY: setpriority on the calling thread (a Linux thread id
            // is a process id for PRIO_PROCESS); it only lowers priority.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::setpriority(libc::PRIO_PROCESS, tid, 10);
            }
        })
        .build()
        .expect("failed to start the background compile threads")
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn pop_lru(loaded: &mut Loaded, reason: EvictReason) -> (String, EvictReason) {
    let (name, e) = loaded
        .lru
        .pop_lru()
        .expect("caller checked the LRU is not empty");
    loaded.bytes -= e.function.footprint;
    (name, reason)
}

/// Checks what can be checked without compiling, and tells a module from a
/// component: a core module must import only WASI preview 1 functions the
/// host provides and export `_start`; a component must import only WASI
/// interfaces and export `wasi:http/incoming-handler`.
/// The function a registry key belongs to (`name` or `name@version`):
/// metrics are labelled by function, whatever version loaded.
fn function_of(key: &str) -> &str {
    key.split_once('@').map_or(key, |(function, _)| function)
}

/// Validates wasm never compiled here (compiling validates too, later).
fn validate(engine: &wasmtime::Engine, kind: WasmKind, bytes: &[u8]) -> Result<(), String> {
    match kind {
        WasmKind::Module => Module::validate(engine, bytes).map_err(|e| format!("{e:#}")),
        WasmKind::Component => wasmparser::Validator::new()
            .validate_all(bytes)
            .map(drop)
            .map_err(|e| e.to_string()),
    }
}

fn check_shape(bytes: &[u8], provided: &HashSet<String>) -> Result<WasmKind, String> {
    use wasmparser::{Parser, Payload, TypeRef};
    if Parser::is_component(bytes) {
        return check_component(bytes).map(|()| WasmKind::Component);
    }
    if !Parser::is_core_wasm(bytes) {
        return Err("not a wasm binary (bad magic number or version)".into());
    }
    let mut has_start = false;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| e.to_string())? {
            Payload::ImportSection(imports) => {
                for import in imports.into_imports() {
                    let import = import.map_err(|e| e.to_string())?;
                    let known = import.module == WASI_P1
                        && matches!(import.ty, TypeRef::Func(_))
                        && provided.contains(import.name);
                    if !known {
                        return Err(format!(
                            "it imports `{}::{}`, which Kelvin does not provide (only `{WASI_P1}` functions are available)",
                            import.module, import.name
                        ));
                    }
                }
            }
            Payload::ExportSection(exports) => {
                for export in exports {
                    let export = export.map_err(|e| e.to_string())?;
                    has_start |= export.name == "_start";
                }
            }
            _ => {}
        }
    }
    if !has_start {
        return Err("it exports no `_start`; build it as a command (a `main` function) for wasm32-wasip1, or as a wasi:http component for wasm32-wasip2".into());
    }
    Ok(WasmKind::Module)
}

fn check_component(bytes: &[u8]) -> Result<(), String> {
    use wasmparser::{Parser, Payload};
    let mut handler = false;
    // Nested modules and components have imports of their own; only the
    // outermost component's face the host.
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload.map_err(|e| e.to_string())? {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(imports) if depth == 0 => {
                for import in imports {
                    let name = import.map_err(|e| e.to_string())?.name.name;
                    if !name.starts_with("wasi:") {
                        return Err(format!(
                            "it imports `{name}`, which Kelvin does not provide (a wasi:http/proxy component may import WASI interfaces only)"
                        ));
                    }
                }
            }
            Payload::ComponentExportSection(exports) if depth == 0 => {
                for export in exports {
                    let name = export.map_err(|e| e.to_string())?.name.name;
                    handler |= name.starts_with("wasi:http/incoming-handler@0.2");
                }
            }
            _ => {}
        }
    }
    if !handler {
        return Err("it is a component but exports no `wasi:http/incoming-handler@0.2`; Kelvin runs wasi:http/proxy components (as `wasmtime serve` does)".into());
    }
    Ok(())
}
