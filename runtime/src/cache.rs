//! The on-disk cache of compiled artifacts, content-addressed by the wasm's
//! hash under a folder named for the engine's compatibility fingerprint.
//!
//! # Integrity
//!
//! Beside each artifact, a `.sum` file holds its length and checksums
//! (blake3) of its first and last [`SYNC_CHECK`]/2 bytes and of the whole
//! file. Artifacts are written to a temporary file, fsynced and renamed, the
//! `.sum` last, so a crash never leaves an entry that passes its checks but
//! is incomplete.
//!
//! Before an artifact is first mapped in a process, its length, its head and
//! its tail are checked, and wasmtime checks its header and engine
//! compatibility: a truncated, foreign, stale or garbled file is deleted and
//! rebuilt, never run. An artifact of up to [`SYNC_CHECK`] bytes is thereby
//! checked whole. A larger one is checked whole off the request path, right
//! after its first load ([`ArtifactCache::verify_full`]): reading 35 MB before
//! the first request would cost tens of milliseconds warm and far more from
//! a cold disk. If that check fails, the registry unloads the function and
//! the file is rebuilt; invocations that started in the meantime (the
//! milliseconds the check takes) ran on it. docs/performance.md has the
//! numbers.
//!
//! A process checks each file once: a file it wrote itself or checked whole
//! counts as verified, and after an eviction the same file (same inode, size
//! and modification time) is mapped without reading it again.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use wasmtime::component::Component;
use wasmtime::{Engine, Module};

/// Artifacts up to this size are checked whole before their first load;
/// larger ones have their first and last half of it checked then, and the
/// rest just after.
pub const SYNC_CHECK: u64 = 1 << 20;

/// What a `.wasm` file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmKind {
    /// A core module: a wasm32-wasip1 command.
    Module,
    /// A component: a wasi:http/proxy.
    Component,
}

/// Compiled code of either kind.
#[derive(Clone)]
pub enum Compiled {
    Module(Module),
    Component(Component),
}

impl Compiled {
    pub fn compile(engine: &Engine, kind: WasmKind, bytes: &[u8]) -> wasmtime::Result<Compiled> {
        Ok(match kind {
            WasmKind::Module => Compiled::Module(Module::new(engine, bytes)?),
            WasmKind::Component => Compiled::Component(Component::new(engine, bytes)?),
        })
    }

    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        match self {
            Compiled::Module(m) => m.serialize(),
            Compiled::Component(c) => c.serialize(),
        }
    }

    /// Compiled code plus the initial linear memory a warm slot keeps around.
    pub fn footprint(&self) -> u64 {
        let (image, resources) = match self {
            Compiled::Module(m) => (m.image_range(), Some(m.resources_required())),
            Compiled::Component(c) => (c.image_range(), c.resources_required()),
        };
        let code = (image.end as usize - image.start as usize) as u64;
        // Reported in wasm pages.
        let pages = resources
            .and_then(|r| r.max_initial_memory_size)
            .unwrap_or(0);
        code + pages.saturating_mul(64 * 1024)
    }
}

/// The blake3 hash of a `.wasm` file's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WasmHash([u8; 32]);

impl WasmHash {
    pub fn of(bytes: &[u8]) -> WasmHash {
        WasmHash(*blake3::hash(bytes).as_bytes())
    }

    /// A hash as [`WasmHash::hex`] wrote it.
    pub fn parse(hex: &str) -> Option<WasmHash> {
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return None;
        }
        blake3::Hash::from_hex(hex)
            .ok()
            .map(|h| WasmHash(*h.as_bytes()))
    }

    pub fn hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }
}

/// Why a cache entry was not used.
#[derive(Debug, thiserror::Error)]
pub enum CacheMiss {
    #[error("no compiled artifact")]
    Absent,
    #[error("checksum mismatch (corrupt or partly written artifact)")]
    Corrupt,
    #[error("artifact rejected by the engine: {0}")]
    Incompatible(String),
    #[error("failed to read the artifact: {0}")]
    Io(#[from] std::io::Error),
}

/// An artifact loaded from the cache.
pub struct Cached {
    pub compiled: Compiled,
    /// Set when the file is larger than [`SYNC_CHECK`] and was not checked
    /// whole in this process yet: the caller runs [`ArtifactCache::verify_full`]
    /// off the request path.
    pub unverified: Option<FullCheck>,
}

/// A whole-file check still to do.
#[derive(Debug)]
pub struct FullCheck {
    hash: WasmHash,
    id: FileId,
    sum: Sum,
}

impl FullCheck {
    /// The wasm whose artifact this checks.
    pub fn hash(&self) -> WasmHash {
        self.hash
    }
}

pub struct ArtifactCache {
    dir: PathBuf,
    /// Files this process has verified whole, by hash and identity.
    verified: Mutex<HashMap<WasmHash, FileId>>,
    /// Whole-file checks under way, so a reload does not start another.
    checking: Mutex<HashSet<WasmHash>>,
}

/// What tells one file from another (or from itself, rewritten).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// The contents of a `.sum` file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sum {
    len: u64,
    head: [u8; 32],
    tail: [u8; 32],
    full: [u8; 32],
}

const SUM_MAGIC: &str = "kelvin-artifact 1";

impl Sum {
    fn of(bytes: &[u8]) -> Sum {
        let half = (SYNC_CHECK / 2) as usize;
        let head = &bytes[..bytes.len().min(half)];
        let tail = &bytes[bytes.len().saturating_sub(half)..];
        Sum {
            len: bytes.len() as u64,
            head: *blake3::hash(head).as_bytes(),
            tail: *blake3::hash(tail).as_bytes(),
            full: *blake3::hash(bytes).as_bytes(),
        }
    }

    fn render(&self) -> String {
        let hex = |h: &[u8; 32]| blake3::Hash::from_bytes(*h).to_hex().to_string();
        format!(
            "{SUM_MAGIC}\nlen {}\nhead {}\ntail {}\nfull {}\n",
            self.len,
            hex(&self.head),
            hex(&self.tail),
            hex(&self.full)
        )
    }

    fn parse(text: &str) -> Option<Sum> {
        let mut lines = text.lines();
        if lines.next()? != SUM_MAGIC {
            return None;
        }
        let mut field = |name: &str| -> Option<String> {
            let (key, value) = lines.next()?.split_once(' ')?;
            (key == name).then(|| value.to_owned())
        };
        let hash = |hex: String| blake3::Hash::from_hex(hex).ok().map(|h| *h.as_bytes());
        Some(Sum {
            len: field("len")?.parse().ok()?,
            head: hash(field("head")?)?,
            tail: hash(field("tail")?)?,
            full: hash(field("full")?)?,
        })
    }
}

/// Sources checked at an earlier start: `sources.json` in the cache folder.
/// A source whose file is unchanged (same device, inode, size and
/// modification time) is not read, hashed or checked again: for a 19 MB
/// component those were most of `kelvin up`'s start-up (docs/performance.md).
#[derive(Default, serde::Serialize, serde::Deserialize)]
pub struct SourceIndex {
    /// [`SOURCE_CHECKS`] when written: an index from other checks is ignored.
    #[serde(default)]
    checks: u32,
    sources: HashMap<PathBuf, KnownSource>,
    #[serde(skip)]
    changed: bool,
}

/// The version of the checks a source passes at start-up; change it when
/// they change, so sources are checked again.
const SOURCE_CHECKS: u32 = 2;

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct KnownSource {
    file: FileId,
    hash: String,
    component: bool,
    needs: Needs,
}

/// What a wasm needs before it runs a single instruction: its largest
/// initial linear memory and table. A function whose limits are below
/// these can never instantiate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Needs {
    /// In 64 KiB wasm pages.
    pub memory_pages: u64,
    /// In elements.
    pub table_elements: u64,
}

impl Needs {
    /// Reads them from the memory and table sections (and memory and table
    /// imports) of every module a wasm holds; `bytes` was checked already.
    pub fn of(bytes: &[u8]) -> Result<Needs, String> {
        use wasmparser::{Parser, Payload, TypeRef};
        let mut needs = Needs::default();
        let mut memory = |initial: u64| needs.memory_pages = needs.memory_pages.max(initial);
        let mut tables = Vec::new();
        for payload in Parser::new(0).parse_all(bytes) {
            match payload.map_err(|e| e.to_string())? {
                Payload::MemorySection(section) => {
                    for m in section {
                        memory(m.map_err(|e| e.to_string())?.initial);
                    }
                }
                Payload::TableSection(section) => {
                    for t in section {
                        tables.push(t.map_err(|e| e.to_string())?.ty.initial);
                    }
                }
                Payload::ImportSection(imports) => {
                    for import in imports.into_imports() {
                        match import.map_err(|e| e.to_string())?.ty {
                            TypeRef::Memory(m) => memory(m.initial),
                            TypeRef::Table(t) => tables.push(t.initial),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        needs.table_elements = tables.into_iter().max().unwrap_or(0);
        Ok(needs)
    }

    /// Whether a function with this memory limit (bytes) and table limit
    /// (elements) can instantiate the wasm; if not, why and what to change.
    pub fn fit(&self, memory_limit: u64, table_limit: u64) -> Result<(), String> {
        let memory = self.memory_pages.saturating_mul(64 * 1024);
        if memory > memory_limit {
            return Err(format!(
                "it needs {} pages ({} KiB) of linear memory before it runs, over its `memory` limit of {} KiB: raise `memory` to at least \"{}KiB\"",
                self.memory_pages,
                memory / 1024,
                memory_limit / 1024,
                memory / 1024
            ));
        }
        if self.table_elements > table_limit {
            return Err(format!(
                "it needs a table of {} elements before it runs, over the {table_limit} Kelvin allows",
                self.table_elements
            ));
        }
        Ok(())
    }
}

impl SourceIndex {
    /// The hash and kind of `path` as checked before, if the file has not
    /// changed since.
    pub fn known(
        &self,
        path: &Path,
        meta: &std::fs::Metadata,
    ) -> Option<(WasmHash, WasmKind, Needs)> {
        let known = self.sources.get(path)?;
        if known.file != FileId::of(meta) {
            return None;
        }
        let hash = blake3::Hash::from_hex(&known.hash).ok()?;
        let kind = if known.component {
            WasmKind::Component
        } else {
            WasmKind::Module
        };
        Some((WasmHash(*hash.as_bytes()), kind, known.needs))
    }

    /// Remembers that `path` (as `meta` describes it) passed the checks.
    pub fn remember(
        &mut self,
        path: &Path,
        meta: &std::fs::Metadata,
        hash: WasmHash,
        kind: WasmKind,
        needs: Needs,
    ) {
        let known = KnownSource {
            file: FileId::of(meta),
            hash: hash.hex(),
            component: kind == WasmKind::Component,
            needs,
        };
        self.sources.insert(path.to_owned(), known);
        self.changed = true;
    }
}

impl ArtifactCache {
    fn sources_path(&self) -> PathBuf {
        self.dir.join("sources.json")
    }

    /// The sources checked at earlier starts (empty if none, or unreadable).
    pub fn sources(&self) -> SourceIndex {
        std::fs::read(self.sources_path())
            .ok()
            .and_then(|b| serde_json::from_slice::<SourceIndex>(&b).ok())
            .filter(|index| index.checks == SOURCE_CHECKS)
            .unwrap_or(SourceIndex {
                checks: SOURCE_CHECKS,
                ..SourceIndex::default()
            })
    }

    /// Saves `index` if it changed. A failure only costs the next start
    /// its checks again.
    pub fn save_sources(&self, index: &SourceIndex) {
        if !index.changed {
            return;
        }
        let saved = serde_json::to_vec(index)
            .map_err(std::io::Error::other)
            .and_then(|bytes| write_atomic(&self.sources_path(), &bytes));
        if let Err(e) = saved {
            tracing::debug!(error = %e, "could not save the checked-sources index");
        }
    }
}

impl ArtifactCache {
    /// A cache under `root` for artifacts that `engine` can run.
    pub fn new(root: &Path, engine: &Engine) -> std::io::Result<ArtifactCache> {
        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let dir = root.join(format!("{:016x}", h.finish()));
        std::fs::create_dir_all(&dir)?;
        Ok(ArtifactCache {
            dir,
            verified: Mutex::default(),
            checking: Mutex::default(),
        })
    }

    pub fn artifact_path(&self, hash: &WasmHash) -> PathBuf {
        self.dir.join(format!("{}.cwasm", hash.hex()))
    }

    fn sum_path(&self, hash: &WasmHash) -> PathBuf {
        self.dir.join(format!("{}.sum", hash.hex()))
    }

    pub fn contains(&self, hash: &WasmHash) -> bool {
        self.sum_path(hash).exists() && self.artifact_path(hash).exists()
    }

    fn is_verified(&self, hash: &WasmHash, id: &FileId) -> bool {
        self.verified.lock().expect("cache lock").get(hash) == Some(id)
    }

    /// Loads an artifact after the checks before its first load (see the
    /// module docs), by mapping the file (`mmap`) or reading it. A bad
    /// entry is removed so the caller's rebuild replaces it.
    pub fn load(
        &self,
        engine: &Engine,
        hash: &WasmHash,
        kind: WasmKind,
        mmap: bool,
    ) -> Result<Cached, CacheMiss> {
        let result = self.load_checked(engine, hash, kind, mmap);
        if matches!(result, Err(CacheMiss::Corrupt | CacheMiss::Incompatible(_))) {
            self.remove(hash);
        }
        result
    }

    fn load_checked(
        &self,
        engine: &Engine,
        hash: &WasmHash,
        kind: WasmKind,
        mmap: bool,
    ) -> Result<Cached, CacheMiss> {
        let path = self.artifact_path(hash);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(CacheMiss::Absent),
            Err(e) => return Err(e.into()),
        };
        let id = FileId::of(&file.metadata()?);
        let mut unverified = None;
        if !self.is_verified(hash, &id) {
            let sum = match std::fs::read_to_string(self.sum_path(hash)) {
                Ok(text) => Sum::parse(&text).ok_or(CacheMiss::Corrupt)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(CacheMiss::Absent);
                }
                Err(e) => return Err(e.into()),
            };
            if sum.len != id.len || !ends_match(&mut file, &sum)? {
                return Err(CacheMiss::Corrupt);
            }
            if id.len <= SYNC_CHECK {
                // The head and tail cover the whole file: checked whole.
                self.verified.lock().expect("cache lock").insert(*hash, id);
            } else {
                unverified = Some(FullCheck {
                    hash: *hash,
                    id,
                    sum,
                });
            }
        }
        let compiled = if mmap {
            // SAFETY: the file is one this cache wrote with `serialize` for
            // an engine with the same compatibility fingerprint, its length
            // and ends match its checksums (the rest is checked whole before
            // any other load, or just after this one; see the module docs),
            // and wasmtime checks its header. Files in the cache are
            // replaced by rename, never modified in place, so the mapping
            // stays consistent.
            match kind {
                WasmKind::Module => {
                    unsafe { Module::deserialize_file(engine, &path) }.map(Compiled::Module)
                }
                // SAFETY: as above.
                WasmKind::Component => {
                    unsafe { Component::deserialize_file(engine, &path) }.map(Compiled::Component)
                }
            }
        } else {
            let bytes = std::fs::read(&path)?;
            // SAFETY: as above, for the bytes of that file.
            match kind {
                WasmKind::Module => {
                    unsafe { Module::deserialize(engine, &bytes) }.map(Compiled::Module)
                }
                // SAFETY: as above.
                WasmKind::Component => {
                    unsafe { Component::deserialize(engine, &bytes) }.map(Compiled::Component)
                }
            }
        };
        let compiled = compiled.map_err(|e| CacheMiss::Incompatible(format!("{e:#}")))?;
        // A whole-file check already under way covers this load too.
        let unverified =
            unverified.filter(|_| self.checking.lock().expect("cache lock").insert(*hash));
        Ok(Cached {
            compiled,
            unverified,
        })
    }

    /// Checks a loaded artifact whole (blocking: run it off the request
    /// path). On a mismatch the entry is removed, and the caller must stop
    /// using what it loaded.
    pub fn verify_full(&self, check: &FullCheck) -> Result<(), CacheMiss> {
        let result = (|| {
            let path = self.artifact_path(&check.hash);
            let mut file = std::fs::File::open(&path)?;
            let mut hasher = blake3::Hasher::new();
            let mut buf = vec![0; 1 << 20];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            // What was read is what was checked: the file must not have
            // changed meanwhile.
            if hasher.finalize().as_bytes() != &check.sum.full
                || FileId::of(&file.metadata()?) != check.id
            {
                return Err(CacheMiss::Corrupt);
            }
            Ok(())
        })();
        self.checking
            .lock()
            .expect("cache lock")
            .remove(&check.hash);
        match &result {
            Ok(()) => {
                self.verified
                    .lock()
                    .expect("cache lock")
                    .insert(check.hash, check.id);
            }
            Err(_) => self.remove(&check.hash),
        }
        result
    }

    /// Checks the artifact of `hash` whole, now (for `kelvin build`).
    pub fn verify_now(
        &self,
        engine: &Engine,
        hash: &WasmHash,
        kind: WasmKind,
    ) -> Result<(), CacheMiss> {
        let cached = self.load(engine, hash, kind, true)?;
        match cached.unverified {
            Some(check) => self.verify_full(&check),
            None => Ok(()),
        }
    }

    /// Writes an artifact and its checksums atomically (temp file + rename),
    /// checksums last, so a crash never leaves an entry that verifies but is
    /// incomplete.
    pub fn store(&self, hash: &WasmHash, compiled: &Compiled) -> std::io::Result<()> {
        let bytes = compiled
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        let sum = Sum::of(&bytes);
        let path = self.artifact_path(hash);
        write_atomic(&path, &bytes)?;
        write_atomic(&self.sum_path(hash), sum.render().as_bytes())?;
        // Written from these bytes by this process: verified already.
        let id = FileId::of(&std::fs::metadata(&path)?);
        self.verified.lock().expect("cache lock").insert(*hash, id);
        Ok(())
    }

    /// Deletes an entry (a no-op if absent).
    pub fn remove(&self, hash: &WasmHash) {
        self.verified.lock().expect("cache lock").remove(hash);
        let _ = std::fs::remove_file(self.sum_path(hash));
        let _ = std::fs::remove_file(self.artifact_path(hash));
    }

    /// Forgets which files this process verified, as a restarted process
    /// would (for `kelvin bench cold-start`).
    pub fn forget_verified(&self) {
        self.verified.lock().expect("cache lock").clear();
    }
}

/// Whether the first and last `SYNC_CHECK / 2` bytes of `file` match.
fn ends_match(file: &mut std::fs::File, sum: &Sum) -> std::io::Result<bool> {
    let half = SYNC_CHECK / 2;
    let head_len = sum.len.min(half) as usize;
    let mut buf = vec![0; head_len];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut buf)?;
    if blake3::hash(&buf).as_bytes() != &sum.head {
        return Ok(false);
    }
    let tail_start = sum.len.saturating_sub(half);
    let mut buf = vec![0; (sum.len - tail_start) as usize];
    file.seek(SeekFrom::Start(tail_start))?;
    file.read_exact(&mut buf)?;
    Ok(blake3::hash(&buf).as_bytes() == &sum.tail)
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_round_trip_and_refuse_garbage() {
        let bytes: Vec<u8> = (0..3 * SYNC_CHECK as usize).map(|i| i as u8).collect();
        let sum = Sum::of(&bytes);
        assert_eq!(Sum::parse(&sum.render()), Some(sum.clone()));
        assert_eq!(Sum::parse(""), None);
        assert_eq!(Sum::parse("kelvin-artifact 1\nlen x\n"), None);
        // A 32-byte checksum file from before is not a sum: rebuilt.
        assert_eq!(Sum::parse(&"\u{1}".repeat(32)), None);
        // Small files: the ends are the whole file.
        let small = Sum::of(b"tiny");
        assert_eq!(small.head, small.full);
        assert_eq!(small.tail, small.full);
    }
}
