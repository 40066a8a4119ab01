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

use crate::cache::{ArtifactCache, CacheMiss, WasmHash};
use crate::engine::KelvinEngine;
use crate::invoke::Host;
use crate::manifest::FunctionSpec;
use crate::metering::{ColdStart, LoadSource};
use crate::metrics::Metrics;

/// The only import module a preview-1 function may use.
const WASI_P1: &str = "wasi_snapshot_preview1";

/// A function ready to instantiate: compiled, linked, pre-checked.
pub struct LoadedFunction {
    pub spec: Arc<FunctionSpec>,
    pub pre: InstancePre<Host>,
    /// Estimated resident cost: compiled code plus initial linear memory.
    pub footprint: u64,
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
}

impl EvictReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EvictReason::Idle => "idle",
            EvictReason::Capacity => "capacity",
            EvictReason::Memory => "memory",
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

/// Bounds on what stays loaded.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    pub max_loaded: usize,
    pub memory_budget: u64,
}

pub struct Registry {
    engine: Arc<KelvinEngine>,
    linker: Linker<Host>,
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
            check_shape(&bytes, &provided).map_err(invalid)?;
            // A cached artifact was validated when it was compiled; full
            // validation is only needed for wasm never compiled here.
            if !cache.contains(&hash) {
                Module::validate(engine.engine(), &bytes).map_err(|e| invalid(format!("{e:#}")))?;
            }
            slots.insert(
                spec.name.to_string(),
                Slot {
                    spec: Arc::new(spec.clone()),
                    hash: Mutex::new(hash),
                    load_lock: tokio::sync::Mutex::new(()),
                },
            );
        }
        Ok(Registry {
            engine,
            linker,
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
        let (module, source) = self.module(slot).await?;
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| LoadError {
                function: function.to_owned(),
                reason: format!("{e:#}"),
            })?;
        let load_us = micros(start.elapsed());
        let footprint = footprint(&module);
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
            pre,
            footprint,
        });
        self.insert(function, loaded.clone());
        Ok((loaded, Some(ColdStart { source, load_us })))
    }

    /// The compiled module: from the cache if a verified artifact is there,
    /// else compiled (off the async threads) and cached.
    async fn module(&self, slot: &Slot) -> Result<(Module, LoadSource), LoadError> {
        let function = slot.spec.name.to_string();
        let hash = *slot.hash.lock().expect("hash lock");
        match self.cache.load(self.engine.engine(), &hash) {
            Ok(module) => return Ok((module, LoadSource::Cache)),
            Err(CacheMiss::Absent) => {}
            Err(miss) => {
                tracing::warn!(function, reason = %miss, "discarding cached artifact; recompiling")
            }
        }
        let engine = self.engine.engine().clone();
        let path = slot.spec.source.clone();
        let compiled =
            tokio::task::spawn_blocking(move || -> Result<(Module, WasmHash), String> {
                let bytes = std::fs::read(&path)
                    .map_err(|e| format!("failed to read `{}`: {e}", path.display()))?;
                let module = Module::new(&engine, &bytes).map_err(|e| format!("{e:#}"))?;
                Ok((module, WasmHash::of(&bytes)))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .map_err(|reason| LoadError {
                function: function.clone(),
                reason,
            })?;
        let (module, new_hash) = compiled;
        if new_hash != hash {
            tracing::warn!(
                function,
                "the .wasm file changed since start-up; using the new contents"
            );
            *slot.hash.lock().expect("hash lock") = new_hash;
        }
        if let Err(e) = self.cache.store(&new_hash, &module) {
            // Serving goes on; the next cold start compiles again.
            tracing::warn!(function, error = %e, "failed to write compiled artifact to the cache");
        }
        Ok((module, LoadSource::Compile))
    }

    /// Compiles every function not in the cache yet (for `kelvin build` and
    /// `kelvin up --build`); returns how many were compiled.
    pub async fn precompile_all(&self) -> Result<usize, LoadError> {
        let mut compiled = 0;
        for slot in self.slots.values() {
            let hash = *slot.hash.lock().expect("hash lock");
            if self.cache.contains(&hash) && self.cache.load(self.engine.engine(), &hash).is_ok() {
                continue;
            }
            self.module(slot).await?;
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
                if let Some(e) = loaded.lru.pop(&name) {
                    loaded.bytes -= e.function.footprint;
                    evicted.push((name, EvictReason::Idle));
                }
            }
            self.metrics.loaded.set(loaded.lru.len() as i64);
        }
        self.report(&evicted);
        evicted
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

/// Compiled code plus the initial linear memory a warm slot keeps around.
fn footprint(module: &Module) -> u64 {
    let image = module.image_range();
    let code = (image.end as usize - image.start as usize) as u64;
    // Reported in wasm pages.
    let pages = module
        .resources_required()
        .max_initial_memory_size
        .unwrap_or(0);
    let memory = pages.saturating_mul(64 * 1024);
    code + memory
}

pub(crate) fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Checks what can be checked without compiling: a core module (not a
/// component), importing only WASI preview 1 functions the host provides,
/// exporting `_start`.
fn check_shape(bytes: &[u8], provided: &HashSet<String>) -> Result<(), String> {
    use wasmparser::{Parser, Payload, TypeRef};
    if wasmparser::Parser::is_component(bytes) {
        return Err("it is a component; this Kelvin runs wasm32-wasip1 command modules (components come with wasi:http support)".into());
    }
    if !wasmparser::Parser::is_core_wasm(bytes) {
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
        return Err(
            "it exports no `_start`; build it as a command (a `main` function) for wasm32-wasip1"
                .into(),
        );
    }
    Ok(())
}
