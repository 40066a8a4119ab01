//! The registry: every function the manifest declares, which of them are
//! loaded, and when they are unloaded.
//!
//! A function is checked at start-up (the wasm is read, hashed and
//! validated) but compiled only when first invoked, or by `kelvin build`.
//! Loaded functions sit in an LRU bounded by a count and by a memory budget;
//! one idle past its `keep_warm` is unloaded (scale to zero).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use wasmtime::{InstancePre, Linker, Module, Store};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use crate::cache::{ArtifactCache, CacheMiss, Compiled, WasmHash, WasmKind};
use crate::engine::KelvinEngine;
use crate::invoke::Host;
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
    /// Estimated resident cost: compiled code plus initial linear memory.
    pub footprint: u64,
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
    /// Unloaded on request (`kelvin bench` measuring cold starts).
    Requested,
}

impl EvictReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EvictReason::Idle => "idle",
            EvictReason::Capacity => "capacity",
            EvictReason::Memory => "memory",
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
#[derive(Debug, thiserror::Error)]
#[error("failed to load function `{function}`: {reason}")]
pub struct LoadError {
    pub function: String,
    pub reason: String,
}

struct Slot {
    spec: Arc<FunctionSpec>,
    kind: WasmKind,
    /// Hash of the wasm as last read; updated if the file changed when it is
    /// next compiled.
    hash: Mutex<WasmHash>,
    /// One load at a time per function: concurrent cold requests wait for it
    /// instead of compiling the same module twice.
    load_lock: tokio::sync::Mutex<()>,
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

pub struct Registry {
    engine: Arc<KelvinEngine>,
    linker: Linker<Host>,
    component_linker: wasmtime::component::Linker<HttpHost>,
    cache: ArtifactCache,
    slots: HashMap<String, Slot>,
    loaded: Mutex<Loaded>,
    capacity: Capacity,
    metrics: Metrics,
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

        let mut slots = HashMap::with_capacity(functions.len());
        for spec in functions {
            let invalid = |reason: String| RegistryError::Invalid {
                function: spec.name.to_string(),
                path: spec.source.clone(),
                reason,
            };
            let bytes = std::fs::read(&spec.source).map_err(|source| {
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
            })?;
            let hash = WasmHash::of(&bytes);
            let kind = check_shape(&bytes, &provided).map_err(invalid)?;
            // A cached artifact was validated when it was compiled; full
            // validation is only needed for wasm never compiled here.
            if !cache.contains(&hash) {
                match kind {
                    WasmKind::Module => Module::validate(engine.engine(), &bytes)
                        .map_err(|e| invalid(format!("{e:#}")))?,
                    WasmKind::Component => wasmparser::Validator::new()
                        .validate_all(&bytes)
                        .map(drop)
                        .map_err(|e| invalid(e.to_string()))?,
                }
            }
            slots.insert(
                spec.name.to_string(),
                Slot {
                    spec: Arc::new(spec.clone()),
                    kind,
                    hash: Mutex::new(hash),
                    load_lock: tokio::sync::Mutex::new(()),
                },
            );
        }
        let component_linker = crate::proxy::linker(engine.engine());
        Ok(Registry {
            engine,
            linker,
            component_linker,
            cache,
            slots,
            loaded: Mutex::new(Loaded {
                lru: LruCache::unbounded(),
                bytes: 0,
            }),
            capacity,
            metrics,
        })
    }

    /// The deployment version of `function`: its wasm's hash.
    pub fn version(&self, function: &str) -> String {
        self.slots
            .get(function)
            .map(|s| s.hash.lock().expect("hash lock").hex())
            .unwrap_or_default()
    }

    /// Whether `function` is a module or a component (known from start-up).
    pub fn kind(&self, function: &str) -> Option<WasmKind> {
        self.slots.get(function).map(|s| s.kind)
    }

    pub fn spec(&self, function: &str) -> Option<&Arc<FunctionSpec>> {
        self.slots.get(function).map(|s| &s.spec)
    }

    /// Names of the loaded functions, most recently used first.
    pub fn loaded(&self) -> Vec<String> {
        self.lock().lru.iter().map(|(k, _)| k.clone()).collect()
    }

    /// Where `function`'s compiled artifact lives (or would live).
    pub fn artifact_path(&self, function: &str) -> Option<PathBuf> {
        let slot = self.slots.get(function)?;
        Some(
            self.cache
                .artifact_path(&slot.hash.lock().expect("hash lock")),
        )
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

    /// The function ready to instantiate, loading it if needed. The second
    /// value describes the load when this call performed one (a cold start).
    pub async fn acquire(
        &self,
        function: &str,
    ) -> Result<(Arc<LoadedFunction>, Option<ColdStart>), LoadError> {
        if let Some(f) = self.get(function) {
            return Ok((f, None));
        }
        let slot = self.slots.get(function).ok_or_else(|| LoadError {
            function: function.to_owned(),
            reason: "no such function".into(),
        })?;
        let _loading = slot.load_lock.lock().await;
        if let Some(f) = self.get(function) {
            return Ok((f, None));
        }
        let start = Instant::now();
        let (compiled, source) = self.compiled(slot).await?;
        let link_error = |e: wasmtime::Error| LoadError {
            function: function.to_owned(),
            reason: format!("{e:#}"),
        };
        let prepared = match &compiled {
            Compiled::Module(m) => {
                Prepared::Module(self.linker.instantiate_pre(m).map_err(link_error)?)
            }
            Compiled::Component(c) => {
                let pre = self
                    .component_linker
                    .instantiate_pre(c)
                    .map_err(link_error)?;
                Prepared::Component(ProxyPre::new(pre).map_err(link_error)?)
            }
        };
        let load_us = micros(start.elapsed());
        let footprint = compiled.footprint();
        tracing::info!(
            function,
            source = source.as_str(),
            load_us,
            footprint,
            "function loaded"
        );
        self.metrics
            .loads
            .with_label_values(&[function, source.as_str()])
            .inc();
        let loaded = Arc::new(LoadedFunction {
            spec: slot.spec.clone(),
            prepared,
            footprint,
        });
        self.insert(function, loaded.clone());
        Ok((loaded, Some(ColdStart { source, load_us })))
    }

    /// The compiled code: from the cache if a verified artifact is there,
    /// else compiled (off the async threads) and cached.
    async fn compiled(&self, slot: &Slot) -> Result<(Compiled, LoadSource), LoadError> {
        let function = slot.spec.name.to_string();
        let hash = *slot.hash.lock().expect("hash lock");
        let kind = slot.kind;
        let mmap = self.engine.tuning().mmap_artifacts;
        match self.cache.load(self.engine.engine(), &hash, kind, mmap) {
            Ok(compiled) => return Ok((compiled, LoadSource::Cache)),
            Err(CacheMiss::Absent) => {}
            Err(miss) => {
                tracing::warn!(function, reason = %miss, "discarding cached artifact; recompiling")
            }
        }
        let engine = self.engine.engine().clone();
        let path = slot.spec.source.clone();
        let (compiled, new_hash) =
            tokio::task::spawn_blocking(move || -> Result<(Compiled, WasmHash), String> {
                let bytes = std::fs::read(&path)
                    .map_err(|e| format!("failed to read `{}`: {e}", path.display()))?;
                let compiled =
                    Compiled::compile(&engine, kind, &bytes).map_err(|e| format!("{e:#}"))?;
                Ok((compiled, WasmHash::of(&bytes)))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|reason| LoadError {
                function: function.clone(),
                reason,
            })?;
        if new_hash != hash {
            tracing::warn!(
                function,
                "the .wasm file changed since start-up; using the new contents"
            );
            *slot.hash.lock().expect("hash lock") = new_hash;
        }
        if let Err(e) = self.cache.store(&new_hash, &compiled) {
            // Serving goes on; the next cold start compiles again.
            tracing::warn!(function, error = %e, "failed to write compiled artifact to the cache");
        }
        Ok((compiled, LoadSource::Compile))
    }

    /// Compiles every function not in the cache yet (for `kelvin build` and
    /// `kelvin up --build`); returns how many were compiled.
    pub async fn precompile_all(&self) -> Result<usize, LoadError> {
        let mut compiled = 0;
        for slot in self.slots.values() {
            let hash = *slot.hash.lock().expect("hash lock");
            if self.cache.contains(&hash)
                && self
                    .cache
                    .load(self.engine.engine(), &hash, slot.kind, true)
                    .is_ok()
            {
                continue;
            }
            self.compiled(slot).await?;
            compiled += 1;
        }
        Ok(compiled)
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

    /// Unloads every function idle for longer than its `keep_warm` as of
    /// `now`. Time is passed in so tests can move it forward.
    pub fn evict_idle_at(&self, now: Instant) -> Vec<(String, EvictReason)> {
        let mut evicted = Vec::new();
        {
            let mut loaded = self.lock();
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
            self.metrics.loaded.set(loaded.lru.len() as i64);
        }
        self.report(&evicted);
        evicted
    }

    /// Unloads `function` now, and with `forget_artifact` also deletes its
    /// compiled artifact, so that its next invocation starts cold from the
    /// cache or from scratch. Returns whether it was loaded.
    pub fn unload(&self, function: &str, forget_artifact: bool) -> bool {
        let popped = {
            let mut loaded = self.lock();
            let popped = loaded.remove(function);
            self.metrics.loaded.set(loaded.lru.len() as i64);
            popped
        };
        if popped {
            self.report(&[(function.to_owned(), EvictReason::Requested)]);
        }
        if forget_artifact && let Some(slot) = self.slots.get(function) {
            self.cache.remove(&slot.hash.lock().expect("hash lock"));
        }
        popped
    }

    /// How long until the next idle eviction could be due, for the sweeper.
    pub fn next_idle_check(&self) -> Duration {
        let loaded = self.lock();
        let now = Instant::now();
        loaded
            .lru
            .iter()
            .map(|(_, e)| (e.last_used + e.function.spec.keep_warm).saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(50), Duration::from_secs(1))
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
                .with_label_values(&[function.as_str(), reason.as_str()])
                .inc();
        }
    }
}

fn pop_lru(loaded: &mut Loaded, reason: EvictReason) -> (String, EvictReason) {
    let (name, e) = loaded
        .lru
        .pop_lru()
        .expect("caller checked the LRU is not empty");
    loaded.bytes -= e.function.footprint;
    (name, reason)
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Checks what can be checked without compiling, and tells a module from a
/// component: a core module must import only WASI preview 1 functions the
/// host provides and export `_start`; a component must import only WASI
/// interfaces and export `wasi:http/incoming-handler`.
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
