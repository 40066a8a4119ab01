//! Deployments while serving: immutable versions (wasm plus configuration,
//! content-addressed), slots pointing at them, swaps, rollbacks and traffic
//! splits. Every change is validated and warmed first, made durable in the
//! [`store`], then put into service in one step ([`Runtime::replace_table`]);
//! changes are serialized, and each is all or nothing.

pub mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::cache::{WasmHash, WasmKind};
use crate::manifest::{FunctionSpec, Manifest};
use crate::runtime::Runtime;
use crate::table::{PRODUCTION, Split, Table, Unit, VersionId, valid_slot_name};
use store::{Change, DeploymentStore, SettingsRow, SlotRow, SqliteStore, StoreError, VersionRow};

/// Why a deployment change was refused; nothing changed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// Bad input: invalid wasm or configuration, a malformed request.
    #[error("{0}")]
    Invalid(String),
    /// An unknown function, slot, version or wasm.
    #[error("{0}")]
    NotFound(String),
    /// The change cannot be made as things are (an empty slot, a failed
    /// warm-up).
    #[error("{0}")]
    Conflict(String),
    /// Kelvin failed (its store, its disk); logged in full, not shown.
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for DeployError {
    fn from(e: StoreError) -> DeployError {
        DeployError::Internal(e.to_string())
    }
}

/// An uploaded wasm.
#[derive(Debug, Clone, Serialize)]
pub struct WasmInfo {
    pub wasm: String,
    pub kind: &'static str,
    pub size: u64,
}

/// A version as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct VersionInfo {
    pub version: String,
    pub function: String,
    pub wasm: String,
    pub created_at: String,
    /// The slots that point to it.
    pub slots: Vec<String>,
}

/// What each slot serves, and the split.
#[derive(Debug, Clone, Serialize)]
pub struct SlotsInfo {
    pub slots: BTreeMap<String, BTreeMap<String, String>>,
    pub split: Option<SplitInfo>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SplitInfo {
    pub slot: String,
    pub percent: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_header: Option<String>,
}

/// A slot's settings for a function.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsInfo {
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HistoryInfo {
    pub seq: i64,
    pub at: String,
    pub action: String,
    pub detail: serde_json::Value,
    pub who: String,
}

/// A request for a new version of a function.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewVersion {
    /// The uploaded wasm's hash.
    pub wasm: String,
    /// A whole `functions.toml`, whose table for this function is the
    /// version's configuration (its `[server]` is not applied); without it,
    /// the configuration of the version `slot` (or production) serves.
    #[serde(default)]
    pub manifest: Option<String>,
    /// Point this slot at the new version once it is ready.
    #[serde(default)]
    pub slot: Option<String>,
    /// The manifest file this version was built from (`kelvin deploy`
    /// sends it). If it is the server's own, the version is what that
    /// manifest now declares, so a restart does not apply the declaration
    /// again over a swap or rollback made since.
    #[serde(default)]
    pub from_manifest: Option<PathBuf>,
}

type Store = Arc<Mutex<Box<dyn DeploymentStore>>>;

/// A check run before a swap switches (a warm-up request to the source
/// slot): `Err` says why the swap must not happen.
pub type WarmUp<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + 'a>>;

/// (slot, function) -> env over the version's.
type SlotSettings = BTreeMap<(String, String), Vec<(String, String)>>;

/// Deployments of one running app.
pub struct Deployer {
    runtime: Arc<Runtime>,
    store: Store,
    /// One change at a time.
    serial: tokio::sync::Mutex<()>,
    /// Uploaded wasm, by hash: `<hash>.wasm`, never changed once written.
    wasm_dir: PathBuf,
    /// Each slot's settings per function (env over the version's), which
    /// stay with the slot through swaps.
    settings: Mutex<SlotSettings>,
    /// Versions someone still runs though no slot points at them (durable
    /// instances pinned to their orchestrator's version): never pruned.
    retained: std::sync::OnceLock<Retained>,
}

/// Whether a version must be kept.
pub type Retained = Box<dyn Fn(&str) -> bool + Send + Sync>;

impl Deployer {
    /// Opens the deployment store of `runtime`'s state dir, records the
    /// manifest's functions as versions, and puts the stored slots into
    /// service. The manifest is the app's declaration: if its versions
    /// changed since the last start, it is applied to production (like a
    /// deploy); otherwise production keeps what was last deployed or
    /// swapped into it.
    pub fn open(runtime: Arc<Runtime>) -> Result<Deployer, DeployError> {
        let state_dir = runtime.manifest().server.state_dir.clone();
        let store = SqliteStore::open(&SqliteStore::path_in(&state_dir))?;
        Deployer::with_store(runtime, Box::new(store))
    }

    pub fn with_store(
        runtime: Arc<Runtime>,
        mut store: Box<dyn DeploymentStore>,
    ) -> Result<Deployer, DeployError> {
        let manifest = runtime.manifest().clone();
        let wasm_dir = manifest.server.state_dir.join("wasm");
        std::fs::create_dir_all(&wasm_dir)
            .map_err(|e| DeployError::Internal(format!("{}: {e}", wasm_dir.display())))?;
        let text: Arc<str> = std::fs::read_to_string(&manifest.path)
            .unwrap_or_default()
            .into();
        let table = runtime.table();
        let mut rows = Vec::new();
        for unit in table.production() {
            let hash = runtime
                .registry()
                .hash(&unit.key)
                .expect("production units are registered");
            keep_wasm(&unit.spec.source, &wasm_dir, &hash)?;
            rows.push(VersionRow {
                id: unit.version.to_string(),
                function: unit.function.clone(),
                wasm: hash.hex(),
                config: text.clone(),
                created_at: now(),
            });
        }
        store.put_versions(&rows)?;
        // The manifest (with the wasm it names) declares each function's
        // version. A declaration applies to production when it changes,
        // not at every start: a swap, rollback or API deploy since stands
        // until the function's declaration changes again.
        let declared_before =
            declared(&mut *store, table.production().map(|u| u.function.as_str()))?;
        let stored: BTreeMap<String, String> = store
            .slots()?
            .into_iter()
            .filter(|r| r.slot == PRODUCTION)
            .map(|r| (r.function, r.version))
            .collect();
        let mut changed = Vec::new();
        for unit in table.production() {
            let now_declared = unit.version.to_string();
            let before = declared_before.get(&unit.function);
            let serving = stored.get(&unit.function);
            if before == Some(&now_declared) || serving == Some(&now_declared) {
                if let Some(serving) = serving.filter(|v| **v != now_declared) {
                    tracing::info!(
                        function = unit.function.as_str(),
                        production = serving.as_str(),
                        declared = now_declared.as_str(),
                        "production keeps what was deployed, swapped or rolled back into it; the manifest's declaration is unchanged since"
                    );
                }
            } else {
                if let Some(serving) = serving {
                    tracing::info!(
                        function = unit.function.as_str(),
                        was = serving.as_str(),
                        now = now_declared.as_str(),
                        "the manifest declares a new version; applied to production"
                    );
                }
                changed.push(unit.clone());
            }
            store.set_meta(&declared_key(&unit.function), &now_declared)?;
        }
        if !changed.is_empty() {
            store.apply(&Change {
                set: slot_rows(PRODUCTION, changed.iter()),
                action: "manifest".into(),
                detail: serde_json::json!({ "manifest": manifest.path }).to_string(),
                who: "kelvin up".into(),
                ..Change::default()
            })?;
        }
        let settings = store
            .settings()?
            .into_iter()
            .map(|s| ((s.slot, s.function), s.env))
            .collect();
        let deployer = Deployer {
            runtime,
            store: Arc::new(Mutex::new(store)),
            serial: tokio::sync::Mutex::new(()),
            wasm_dir,
            settings: Mutex::new(settings),
            retained: std::sync::OnceLock::new(),
        };
        deployer.restore()?;
        Ok(deployer)
    }

    /// Keeps the versions `retained` says are in use from being pruned.
    pub fn retain_versions(&self, retained: Retained) {
        let _ = self.retained.set(retained);
    }

    /// A kept version of a function, ready to run though no slot points at
    /// it (an orchestrator version durable instances are pinned to).
    pub fn unit_of_version(&self, version: &str) -> Result<Arc<Unit>, DeployError> {
        let mut store = self.store.lock().expect("store lock");
        self.unit_from_store(&mut **store, version)
    }

    /// Puts the stored slots and split into service.
    fn restore(&self) -> Result<(), DeployError> {
        let mut store = self.store.lock().expect("store lock");
        let current = self.runtime.table();
        let mut table = Table::default();
        for row in store.slots()? {
            let unit = match current.unit(PRODUCTION, &row.function) {
                Some(u) if u.version.as_str() == row.version => u.clone(),
                _ => match self.unit_from_store(&mut **store, &row.version) {
                    Ok(unit) => unit,
                    Err(e) => {
                        // A function gone from the manifest, or a version
                        // whose files are gone: that slot entry is skipped.
                        tracing::warn!(slot = row.slot, function = row.function, version = row.version, error = %e, "not restoring a slot entry");
                        continue;
                    }
                },
            };
            let unit = self.in_slot(&row.slot, &unit);
            table
                .slots
                .entry(row.slot)
                .or_default()
                .insert(row.function, unit);
        }
        // Functions the store does not have in production (new in the
        // manifest) serve their manifest version.
        for unit in current.production() {
            let unit = self.in_slot(PRODUCTION, unit);
            table
                .slots
                .entry(PRODUCTION.into())
                .or_default()
                .entry(unit.function.clone())
                .or_insert(unit);
        }
        table.split = store
            .split()?
            .and_then(|s| serde_json::from_str::<SplitInfo>(&s).ok())
            .filter(|s| table.slots.contains_key(&s.slot))
            .map(|s| Split {
                slot: s.slot,
                percent: s.percent,
                affinity_header: s.affinity_header,
            });
        self.install(table);
        Ok(())
    }

    /// Compiles (if it never was) and loads `unit`'s version, so its first
    /// request is warm, and instantiates it once, so a version no request
    /// could run is never pointed at; why not, naming it.
    async fn load(&self, unit: &Unit) -> Result<(), String> {
        self.runtime
            .registry()
            .prepare(&unit.key)
            .await
            .map_err(|e| {
                format!(
                    "version {} of `{}` failed to load: {}",
                    unit.version, unit.function, e.reason
                )
            })?;
        self.runtime.instantiate_once(unit).await.map_err(|why| {
            format!(
                "version {} of `{}` failed to load: {why}",
                unit.version, unit.function
            )
        })
    }

    /// Puts `table` into service in one step, then unloads the versions it
    /// no longer serves: invocations under way hold their code, which is
    /// released when the last of them ends.
    fn install(&self, table: Table) {
        let keys = |t: &Table| -> std::collections::HashSet<String> {
            t.slots
                .values()
                .flat_map(|units| units.values().map(|u| u.key.clone()))
                .collect()
        };
        let before = keys(&self.runtime.table());
        let after = keys(&table);
        self.runtime.replace_table(table);
        for key in before.difference(&after) {
            self.runtime.registry().unload(key, false);
        }
    }

    /// `unit` as it serves in `slot`: with that slot's settings for its
    /// function over its version's configuration (the same code).
    fn in_slot(&self, slot: &str, unit: &Arc<Unit>) -> Arc<Unit> {
        let base = self
            .runtime
            .registry()
            .spec(&unit.key)
            .unwrap_or_else(|| unit.spec.clone());
        let settings = self.settings.lock().expect("settings lock");
        let spec = match settings.get(&(slot.to_owned(), unit.function.clone())) {
            None => base,
            Some(env) => {
                let mut spec = (*base).clone();
                for (name, value) in env {
                    spec.env.retain(|(k, _)| k != name);
                    spec.env.push((name.clone(), value.clone()));
                }
                Arc::new(spec)
            }
        };
        Arc::new(Unit {
            function: unit.function.clone(),
            version: unit.version.clone(),
            key: unit.key.clone(),
            kind: unit.kind,
            spec,
        })
    }

    /// `units` as they serve in `slot`.
    fn all_in_slot(
        &self,
        slot: &str,
        units: &BTreeMap<String, Arc<Unit>>,
    ) -> BTreeMap<String, Arc<Unit>> {
        units
            .iter()
            .map(|(f, u)| (f.clone(), self.in_slot(slot, u)))
            .collect()
    }

    /// A stored version, registered (not compiled) under its key.
    fn unit_from_store(
        &self,
        store: &mut dyn DeploymentStore,
        version: &str,
    ) -> Result<Arc<Unit>, DeployError> {
        let row = store
            .version(version)?
            .ok_or_else(|| DeployError::NotFound(format!("no version {version}")))?;
        if self.runtime.production(&row.function).is_err() {
            return Err(DeployError::NotFound(format!(
                "no function named `{}` in the app",
                row.function
            )));
        }
        let path = self.wasm_path(&row.wasm);
        let bytes = std::fs::read(&path)
            .map_err(|e| DeployError::NotFound(format!("{}: {e}", path.display())))?;
        let (hash, kind) = self
            .runtime
            .registry()
            .check_wasm(&bytes)
            .map_err(DeployError::Invalid)?;
        let spec = self.spec_from(&row.function, &row.config, &path)?;
        self.register(spec, kind, hash)
    }

    /// The configuration of `function` in a manifest's text, its wasm at
    /// `wasm`.
    fn spec_from(
        &self,
        function: &str,
        manifest: &str,
        wasm: &Path,
    ) -> Result<FunctionSpec, DeployError> {
        let label = Path::new("functions.toml");
        let parsed =
            Manifest::parse(label, manifest).map_err(|e| DeployError::Invalid(e.to_string()))?;
        let mut spec = parsed.function(function).cloned().ok_or_else(|| {
            DeployError::Invalid(format!(
                "the manifest declares no function named `{function}`"
            ))
        })?;
        spec.source = wasm.to_owned();
        spec.build = None;
        Ok(spec)
    }

    /// Registers a version's code under its own key.
    fn register(
        &self,
        spec: FunctionSpec,
        kind: WasmKind,
        hash: WasmHash,
    ) -> Result<Arc<Unit>, DeployError> {
        crate::runtime::check_kind(&spec, kind).map_err(DeployError::Invalid)?;
        let version = VersionId::of(&hash, &spec);
        let key = format!("{}@{version}", spec.name);
        self.runtime.registry().add(&key, spec, kind, hash);
        let spec = self.runtime.registry().spec(&key).expect("just added");
        Ok(Arc::new(Unit {
            function: spec.name.to_string(),
            version,
            key,
            kind,
            spec,
        }))
    }

    fn wasm_path(&self, hash: &str) -> PathBuf {
        self.wasm_dir.join(format!("{hash}.wasm"))
    }

    async fn stored<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn DeploymentStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, DeployError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&mut **store.lock().expect("store lock")))
            .await
            .map_err(|e| DeployError::Internal(e.to_string()))?
            .map_err(DeployError::from)
    }

    /// Checks and keeps an uploaded wasm (content-addressed: the same bytes
    /// again change nothing).
    pub async fn upload(&self, bytes: bytes::Bytes) -> Result<WasmInfo, DeployError> {
        let runtime = self.runtime.clone();
        let dir = self.wasm_dir.clone();
        tokio::task::spawn_blocking(move || {
            let (hash, kind) = runtime
                .registry()
                .check_wasm(&bytes)
                .map_err(|why| DeployError::Invalid(format!("not a usable wasm: {why}")))?;
            let path = dir.join(format!("{}.wasm", hash.hex()));
            if !path.exists() {
                write_durably(&path, &bytes)
                    .map_err(|e| DeployError::Internal(format!("{}: {e}", path.display())))?;
            }
            Ok(WasmInfo {
                wasm: hash.hex(),
                kind: kind_name(kind),
                size: bytes.len() as u64,
            })
        })
        .await
        .map_err(|e| DeployError::Internal(e.to_string()))?
    }

    /// Makes a version of `function` from uploaded wasm and a configuration,
    /// compiles and loads it (so its first request is warm), and stores it;
    /// with `slot`, points that slot at it. Whether it is new.
    pub async fn create_version(
        &self,
        function: &str,
        new: NewVersion,
        who: &str,
    ) -> Result<(VersionInfo, bool), DeployError> {
        let _serial = self.serial.lock().await;
        let base = self
            .runtime
            .production(function)
            .map_err(|e| DeployError::NotFound(e.to_string()))?;
        if WasmHash::parse(&new.wasm).is_none() {
            return Err(DeployError::Invalid(format!(
                "`wasm` must be the 64 hex digits an upload answered, not {:?}",
                new.wasm
            )));
        }
        if let Some(slot) = &new.slot {
            check_slot_name(slot)?;
        }
        let path = self.wasm_path(&new.wasm);
        let bytes = tokio::fs::read(&path).await.map_err(|_| {
            DeployError::NotFound(format!(
                "no uploaded wasm {}; upload it first (PUT /admin/wasm)",
                new.wasm
            ))
        })?;
        let (hash, kind) = self
            .runtime
            .registry()
            .check_wasm(&bytes)
            .map_err(DeployError::Invalid)?;
        let config = match new.manifest {
            Some(text) => Arc::<str>::from(text),
            None => {
                let table = self.runtime.table();
                let from = new
                    .slot
                    .as_deref()
                    .and_then(|s| table.unit(s, function))
                    .unwrap_or(&base);
                let id = from.version.to_string();
                self.stored(move |s| s.version(&id))
                    .await?
                    .map(|v| v.config)
                    .ok_or_else(|| {
                        DeployError::Internal(format!("version {} is not stored", from.version))
                    })?
            }
        };
        let spec = self.spec_from(function, &config, &path)?;
        // A version that can never instantiate is refused before it exists.
        crate::registry::Registry::check_fits(&bytes, &spec.limits)
            .map_err(|why| DeployError::Invalid(format!("function `{function}`: {why}")))?;
        let unit = self.register(spec, kind, hash)?;
        // A version that cannot load is the upload's fault: 400.
        self.load(&unit).await.map_err(DeployError::Invalid)?;
        let row = VersionRow {
            id: unit.version.to_string(),
            function: function.to_owned(),
            wasm: hash.hex(),
            config,
            created_at: now(),
        };
        let ours = new.from_manifest.as_deref().is_some_and(|p| {
            let canonical = |p: &Path| std::fs::canonicalize(p).ok();
            canonical(p).is_some() && canonical(p) == canonical(&self.runtime.manifest().path)
        });
        let declared = (declared_key(function), unit.version.to_string());
        let created = self
            .stored(move |s| {
                let created = s.put_version(&row)?;
                if ours {
                    s.set_meta(&declared.0, &declared.1)?;
                }
                Ok(created)
            })
            .await?;
        if let Some(slot) = &new.slot {
            self.point_unlocked(slot, unit.clone(), "deploy", who)
                .await?;
        }
        if created {
            self.prune(function).await?;
        }
        let info = self.version_info(&unit.version).await?;
        Ok((info, created))
    }

    /// Points `slot` (created as a copy of production if new) at
    /// `version` of `function`: a deploy to a slot, or a rollback.
    pub async fn point(
        &self,
        slot: &str,
        function: &str,
        version: &str,
        who: &str,
    ) -> Result<SlotsInfo, DeployError> {
        check_slot_name(slot)?;
        let _serial = self.serial.lock().await;
        self.runtime
            .production(function)
            .map_err(|e| DeployError::NotFound(e.to_string()))?;
        let id = version.to_owned();
        let row = self
            .stored(move |s| s.version(&id))
            .await?
            .filter(|v| v.function == function)
            .ok_or_else(|| {
                DeployError::NotFound(format!("no version {version} of function `{function}`"))
            })?;
        let unit = {
            let mut store = self.store.lock().expect("store lock");
            self.unit_from_store(&mut **store, &row.id)?
        };
        // A kept version that cannot load now: 409.
        self.load(&unit).await.map_err(DeployError::Conflict)?;
        self.point_unlocked(slot, unit, "point", who).await?;
        Ok(self.slots())
    }

    async fn point_unlocked(
        &self,
        slot: &str,
        unit: Arc<Unit>,
        action: &str,
        who: &str,
    ) -> Result<(), DeployError> {
        let mut table = (*self.runtime.table()).clone();
        let mut entries = match table.slots.get(slot) {
            Some(s) => s.clone(),
            // A new slot starts as a copy of production: a whole app.
            None => self.all_in_slot(slot, &table.slots[PRODUCTION]),
        };
        entries.insert(unit.function.clone(), self.in_slot(slot, &unit));
        let change = Change {
            set: slot_rows(slot, entries.values()),
            action: action.into(),
            detail: serde_json::json!({
                "slot": slot, "function": unit.function, "version": unit.version.as_str()
            })
            .to_string(),
            who: who.into(),
            ..Change::default()
        };
        self.stored(move |s| s.apply(&change)).await?;
        table.slots.insert(slot.to_owned(), entries);
        self.install(table);
        tracing::info!(slot, function = unit.function, version = %unit.version, action, "slot updated");
        Ok(())
    }

    /// Deletes the versions of `function` past the newest `keep_versions`
    /// that no slot points to, with their wasm unless another version
    /// uses it. Invocations under way finish on the code they hold.
    async fn prune(&self, function: &str) -> Result<(), DeployError> {
        let keep = self.runtime.manifest().server.keep_versions.get() as usize;
        let name = function.to_owned();
        let versions = self.stored(move |s| s.versions(Some(&name))).await?;
        let table = self.runtime.table();
        let pinned = |id: &str| {
            table.slots.values().any(|units| {
                units
                    .get(function)
                    .is_some_and(|u| u.version.as_str() == id)
            }) || self.retained.get().is_some_and(|retained| retained(id))
        };
        for old in versions.iter().skip(keep).filter(|v| !pinned(&v.id)) {
            let id = old.id.clone();
            if !self.stored(move |s| s.delete_version(&id)).await? {
                continue;
            }
            self.runtime
                .registry()
                .remove(&format!("{function}@{}", old.id));
            let wasm = old.wasm.clone();
            let used = self
                .stored(move |s| s.versions(None))
                .await?
                .iter()
                .any(|v| v.wasm == wasm);
            if !used {
                let _ = std::fs::remove_file(self.wasm_path(&old.wasm));
            }
            tracing::info!(
                function,
                version = old.id,
                "version no longer kept; deleted"
            );
        }
        Ok(())
    }

    /// Swaps two slots' versions: the versions that will serve `target`
    /// are loaded first; then both change in one step. Requests under way
    /// finish on the version they started on.
    /// `warm_up`, if given, runs after the versions are loaded and before
    /// the switch (the HTTP trigger sends the configured warm-up request to
    /// the source slot); its error refuses the swap.
    pub async fn swap(
        &self,
        source: &str,
        target: &str,
        who: &str,
        warm_up: Option<WarmUp<'_>>,
    ) -> Result<SlotsInfo, DeployError> {
        let _serial = self.serial.lock().await;
        if source == target {
            return Err(DeployError::Invalid(
                "a slot cannot be swapped with itself".into(),
            ));
        }
        let mut table = (*self.runtime.table()).clone();
        let missing = |s: &str| DeployError::NotFound(format!("no slot named `{s}`"));
        let incoming = table
            .slots
            .get(source)
            .ok_or_else(|| missing(source))?
            .clone();
        let outgoing = table
            .slots
            .get(target)
            .ok_or_else(|| missing(target))?
            .clone();
        if incoming.is_empty() {
            return Err(DeployError::Conflict(format!("slot `{source}` is empty")));
        }
        // Warm-up: every version that will serve the target is loaded.
        for unit in incoming.values() {
            self.load(unit)
                .await
                .map_err(|why| DeployError::Conflict(format!("warm-up failed: {why}")))?;
        }
        if let Some(warm_up) = warm_up {
            warm_up.await.map_err(|why| {
                DeployError::Conflict(format!(
                    "the warm-up request to slot `{source}` failed: {why}"
                ))
            })?;
        }
        let mut set = slot_rows(target, incoming.values());
        set.extend(slot_rows(source, outgoing.values()));
        let change = Change {
            delete_slots: vec![source.to_owned(), target.to_owned()],
            set,
            action: "swap".into(),
            detail: serde_json::json!({ "source": source, "target": target }).to_string(),
            who: who.into(),
            ..Change::default()
        };
        self.stored(move |s| s.apply(&change)).await?;
        // Versions move; each slot's settings stay.
        table
            .slots
            .insert(target.to_owned(), self.all_in_slot(target, &incoming));
        table
            .slots
            .insert(source.to_owned(), self.all_in_slot(source, &outgoing));
        self.install(table);
        tracing::info!(source, target, "slots swapped");
        Ok(self.slots())
    }

    /// Applies a manifest's text to production, like a deploy of every
    /// function at once: each function's wasm is read from its `source`,
    /// checked, kept and loaded, then production changes in one step. A
    /// manifest that fails any check changes nothing. Functions cannot be
    /// added or removed, nor `[server]` changed, without a restart.
    pub async fn apply_manifest(&self, text: &str, who: &str) -> Result<SlotsInfo, DeployError> {
        let _serial = self.serial.lock().await;
        let path = self.runtime.manifest().path.clone();
        let parsed =
            Manifest::parse(&path, text).map_err(|e| DeployError::Invalid(e.to_string()))?;
        let running: Vec<&str> = self
            .runtime
            .manifest()
            .functions
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        let wanted: Vec<&str> = parsed.functions.iter().map(|f| f.name.as_str()).collect();
        if running != wanted {
            return Err(DeployError::Conflict(format!(
                "the manifest's functions changed ({} -> {}); adding or removing functions takes a restart",
                running.join(", "),
                wanted.join(", ")
            )));
        }
        let mut units = BTreeMap::new();
        let mut rows = Vec::new();
        let shared: Arc<str> = text.into();
        for spec in &parsed.functions {
            let source = spec.source.clone();
            let bytes = tokio::fs::read(&source).await.map_err(|e| {
                DeployError::Invalid(format!(
                    "function `{}`: failed to read `{}`: {e}",
                    spec.name,
                    source.display()
                ))
            })?;
            let (hash, kind) = self.runtime.registry().check_wasm(&bytes).map_err(|why| {
                DeployError::Invalid(format!(
                    "function `{}`: `{}` is not a usable wasm: {why}",
                    spec.name,
                    source.display()
                ))
            })?;
            crate::registry::Registry::check_fits(&bytes, &spec.limits)
                .map_err(|why| DeployError::Invalid(format!("function `{}`: {why}", spec.name)))?;
            let kept = self.wasm_path(&hash.hex());
            if !kept.exists() {
                let path = kept.clone();
                tokio::task::spawn_blocking(move || write_durably(&path, &bytes))
                    .await
                    .map_err(|e| DeployError::Internal(e.to_string()))?
                    .map_err(|e| DeployError::Internal(format!("{}: {e}", kept.display())))?;
            }
            let mut spec = spec.clone();
            spec.source = kept;
            spec.build = None;
            let unit = self.register(spec, kind, hash)?;
            self.load(&unit).await.map_err(DeployError::Invalid)?;
            rows.push(VersionRow {
                id: unit.version.to_string(),
                function: unit.function.clone(),
                wasm: hash.hex(),
                config: shared.clone(),
                created_at: now(),
            });
            units.insert(unit.function.clone(), unit);
        }
        let digest: String = units
            .values()
            .map(|u| format!("{}={}\n", u.function, u.version))
            .collect();
        let change = Change {
            set: slot_rows(PRODUCTION, units.values()),
            action: "manifest".into(),
            detail: serde_json::json!({ "manifest": path }).to_string(),
            who: who.into(),
            ..Change::default()
        };
        let declared: Vec<(String, String)> = units
            .values()
            .map(|u| (declared_key(&u.function), u.version.to_string()))
            .collect();
        self.stored(move |s| {
            s.put_versions(&rows)?;
            s.apply(&change)?;
            for (key, version) in &declared {
                s.set_meta(key, version)?;
            }
            s.set_meta("manifest", &digest)
        })
        .await?;
        let mut table = (*self.runtime.table()).clone();
        table
            .slots
            .insert(PRODUCTION.into(), self.all_in_slot(PRODUCTION, &units));
        self.install(table);
        tracing::info!(manifest = %path.display(), who, "manifest applied to production");
        Ok(self.slots())
    }

    /// Replaces `slot`'s settings for `function`: env values over its
    /// version's, which stay with the slot when versions are swapped
    /// (Azure's slot settings). Applied at once to the version the slot
    /// serves.
    pub async fn set_settings(
        &self,
        slot: &str,
        function: &str,
        env: BTreeMap<String, String>,
        who: &str,
    ) -> Result<SettingsInfo, DeployError> {
        let _serial = self.serial.lock().await;
        let mut table = (*self.runtime.table()).clone();
        let unit = table.unit(slot, function).cloned().ok_or_else(|| {
            DeployError::NotFound(format!("no function `{function}` in a slot named `{slot}`"))
        })?;
        for name in env.keys() {
            if name.is_empty() || name.contains(['=', '\0']) {
                return Err(DeployError::Invalid(format!(
                    "{name:?} is not an environment variable name"
                )));
            }
            if name.starts_with("KELVIN_") {
                return Err(DeployError::Invalid(format!(
                    "{name}: names starting with KELVIN_ are set by Kelvin itself; choose another name"
                )));
            }
        }
        if env.values().any(|v| v.contains('\0')) {
            return Err(DeployError::Invalid(
                "a value cannot contain a NUL byte".into(),
            ));
        }
        let env: Vec<(String, String)> = env.into_iter().collect();
        let change = Change {
            settings: Some(SettingsRow {
                slot: slot.to_owned(),
                function: function.to_owned(),
                env: env.clone(),
            }),
            action: "settings".into(),
            detail: serde_json::json!({ "slot": slot, "function": function, "names": env.iter().map(|(k, _)| k).collect::<Vec<_>>() }).to_string(),
            who: who.into(),
            ..Change::default()
        };
        self.stored(move |s| s.apply(&change)).await?;
        {
            let mut settings = self.settings.lock().expect("settings lock");
            let key = (slot.to_owned(), function.to_owned());
            if env.is_empty() {
                settings.remove(&key);
            } else {
                settings.insert(key, env.clone());
            }
        }
        let served = self.in_slot(slot, &unit);
        table
            .slots
            .get_mut(slot)
            .expect("found above")
            .insert(function.to_owned(), served);
        self.install(table);
        Ok(SettingsInfo {
            env: env.into_iter().collect(),
        })
    }

    /// `slot`'s settings for `function`.
    pub fn settings(&self, slot: &str, function: &str) -> Result<SettingsInfo, DeployError> {
        if self.runtime.table().unit(slot, function).is_none() {
            return Err(DeployError::NotFound(format!(
                "no function `{function}` in a slot named `{slot}`"
            )));
        }
        let settings = self.settings.lock().expect("settings lock");
        Ok(SettingsInfo {
            env: settings
                .get(&(slot.to_owned(), function.to_owned()))
                .map(|env| env.iter().cloned().collect())
                .unwrap_or_default(),
        })
    }

    /// Sends `percent` of production's requests to `slot` (0 stops it).
    pub async fn split(&self, split: SplitInfo, who: &str) -> Result<SlotsInfo, DeployError> {
        let _serial = self.serial.lock().await;
        let mut table = (*self.runtime.table()).clone();
        if split.percent > 99 {
            return Err(DeployError::Invalid(
                "`percent` is the share for the other slot: 0 to 99 (swap to send it all)".into(),
            ));
        }
        if let Some(h) = &split.affinity_header
            && hyper::header::HeaderName::from_bytes(h.as_bytes()).is_err()
        {
            return Err(DeployError::Invalid(format!("{h:?} is not a header name")));
        }
        let new = if split.percent == 0 {
            None
        } else {
            if split.slot == PRODUCTION {
                return Err(DeployError::Invalid(
                    "production splits its traffic with another slot".into(),
                ));
            }
            if !table.slots.contains_key(&split.slot) {
                return Err(DeployError::NotFound(format!(
                    "no slot named `{}`",
                    split.slot
                )));
            }
            Some(split.clone())
        };
        let change = Change {
            split: Some(
                new.as_ref()
                    .map(|s| serde_json::to_string(s).expect("serialises")),
            ),
            action: "split".into(),
            detail: serde_json::to_string(&split).expect("serialises"),
            who: who.into(),
            ..Change::default()
        };
        self.stored(move |s| s.apply(&change)).await?;
        table.split = new.map(|s| Split {
            slot: s.slot,
            percent: s.percent,
            affinity_header: s.affinity_header.map(|h| h.to_ascii_lowercase()),
        });
        self.install(table);
        Ok(self.slots())
    }

    /// What each slot serves now.
    pub fn slots(&self) -> SlotsInfo {
        let table = self.runtime.table();
        SlotsInfo {
            slots: table
                .slots
                .iter()
                .map(|(slot, units)| {
                    let versions = units
                        .iter()
                        .map(|(f, u)| (f.clone(), u.version.to_string()))
                        .collect();
                    (slot.clone(), versions)
                })
                .collect(),
            split: table.split.as_ref().map(|s| SplitInfo {
                slot: s.slot.clone(),
                percent: s.percent,
                affinity_header: s.affinity_header.clone(),
            }),
        }
    }

    /// The stored versions of `function`, newest first.
    pub async fn versions(&self, function: &str) -> Result<Vec<VersionInfo>, DeployError> {
        self.runtime
            .production(function)
            .map_err(|e| DeployError::NotFound(e.to_string()))?;
        let name = function.to_owned();
        let rows = self.stored(move |s| s.versions(Some(&name))).await?;
        let table = self.runtime.table();
        Ok(rows.into_iter().map(|r| info(&table, r)).collect())
    }

    async fn version_info(&self, id: &VersionId) -> Result<VersionInfo, DeployError> {
        let id = id.to_string();
        let row = self
            .stored(move |s| s.version(&id))
            .await?
            .ok_or_else(|| DeployError::Internal("a stored version vanished".into()))?;
        Ok(info(&self.runtime.table(), row))
    }

    /// The newest `limit` changes.
    pub async fn history(&self, limit: usize) -> Result<Vec<HistoryInfo>, DeployError> {
        let rows = self.stored(move |s| s.history(limit)).await?;
        Ok(rows
            .into_iter()
            .map(|r| HistoryInfo {
                seq: r.seq,
                at: r.at,
                action: r.action,
                detail: serde_json::from_str(&r.detail).unwrap_or(serde_json::Value::Null),
                who: r.who,
            })
            .collect())
    }
}

/// Reloads the manifest into production on SIGHUP and whenever its file
/// changes (checked twice a second); a manifest that fails its checks
/// changes nothing and is reported in the log. Runs until dropped.
pub async fn watch_manifest(deployer: Arc<Deployer>) {
    let path = deployer.runtime.manifest().path.clone();
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch for SIGHUP; reloading on file changes only");
            None
        }
    };
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&path);
    let mut applied = std::fs::read_to_string(&path).ok();
    loop {
        let why = tokio::select! {
            Some(()) = async {
                match &mut hangup {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => "SIGHUP",
            () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {
                let now = stamp(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                "file change"
            }
        };
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(manifest = %path.display(), error = %e, "manifest reload failed: cannot read it; nothing changed");
                continue;
            }
        };
        if why == "file change" && applied.as_deref() == Some(text.as_str()) {
            continue;
        }
        match deployer.apply_manifest(&text, why).await {
            Ok(_) => applied = Some(text),
            Err(e) => {
                tracing::error!(manifest = %path.display(), trigger = why, error = %e, "manifest reload refused; nothing changed")
            }
        }
    }
}

fn info(table: &Table, row: VersionRow) -> VersionInfo {
    let slots = table
        .slots
        .iter()
        .filter(|(_, units)| {
            units
                .get(&row.function)
                .is_some_and(|u| u.version.as_str() == row.id)
        })
        .map(|(s, _)| s.clone())
        .collect();
    VersionInfo {
        version: row.id,
        function: row.function,
        wasm: row.wasm,
        created_at: row.created_at,
        slots,
    }
}

/// The store's rows for `units` serving in `slot`.
fn slot_rows<'a>(slot: &str, units: impl Iterator<Item = &'a Arc<Unit>>) -> Vec<SlotRow> {
    units
        .map(|u| SlotRow {
            slot: slot.to_owned(),
            function: u.function.clone(),
            version: u.version.to_string(),
        })
        .collect()
}

/// The store's key for the version the manifest last declared for
/// `function` (at a start, a reload, or a `kelvin deploy` from it).
fn declared_key(function: &str) -> String {
    format!("declared:{function}")
}

/// The versions last declared, by function: kept per function, or (from a
/// store written before that) read from the whole manifest's digest.
fn declared<'a>(
    store: &mut dyn DeploymentStore,
    functions: impl Iterator<Item = &'a str>,
) -> Result<BTreeMap<String, String>, StoreError> {
    let mut out: BTreeMap<String, String> = store
        .meta("manifest")?
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(f, v)| (f.to_owned(), v.to_owned()))
        .collect();
    for function in functions {
        if let Some(v) = store.meta(&declared_key(function))? {
            out.insert(function.to_owned(), v);
        }
    }
    Ok(out)
}

fn check_slot_name(slot: &str) -> Result<(), DeployError> {
    if valid_slot_name(slot) {
        Ok(())
    } else {
        Err(DeployError::Invalid(format!(
            "{slot:?} is not a slot name: lowercase letters, digits, `-` and `_`, starting with a letter, at most 64 characters"
        )))
    }
}

fn kind_name(kind: WasmKind) -> &'static str {
    match kind {
        WasmKind::Module => "module",
        WasmKind::Component => "component",
    }
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Keeps a copy of a manifest function's wasm under its hash, so the
/// version stays deployable after the file is rebuilt.
fn keep_wasm(source: &Path, dir: &Path, hash: &WasmHash) -> Result<(), DeployError> {
    let path = dir.join(format!("{}.wasm", hash.hex()));
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
    // Kept already, whole (a copy cut short by a crash has another length).
    if len(&path).is_some() && len(&path) == len(source) {
        return Ok(());
    }
    let bytes = std::fs::read(source)
        .map_err(|e| DeployError::Internal(format!("{}: {e}", source.display())))?;
    if WasmHash::of(&bytes) != *hash {
        // Rebuilt since start-up: this version's bytes are gone; its entry
        // stays usable only while this process runs.
        tracing::warn!(source = %source.display(), "the .wasm changed since start-up; not keeping a copy");
        return Ok(());
    }
    // Not fsynced (a first start of a large app would pay two per
    // function): a copy lost in a crash is made again at the next start,
    // or the slot entry that needed it is skipped with a warning.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| DeployError::Internal(format!("{}: {e}", path.display())))
}

/// Writes a file whole under its final name, then makes the name durable.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    crate::cache::write_atomic(path, bytes)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
