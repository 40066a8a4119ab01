//! The on-disk cache of compiled artifacts, content-addressed by the wasm's
//! hash under a folder named for the engine's compatibility fingerprint.
//!
//! Each artifact has a checksum beside it, verified before the artifact is
//! first mapped: a stale, truncated or corrupt entry is deleted and rebuilt,
//! never executed. A process verifies each file once (a file it wrote itself
//! counts as verified); after an eviction the same file (same inode, size and
//! modification time) is mapped without reading it again (docs/performance.md).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use wasmtime::component::Component;
use wasmtime::{Engine, Module};

/// What a `.wasm` file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmKind {
    /// A core module: a wasm32-wasip1 command.
    Module,
    /// A component: a wasi:http/proxy.
    Component,
}

/// Compiled code of either kind.
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

pub struct ArtifactCache {
    dir: PathBuf,
    /// Files this process has verified, by hash and identity.
    verified: std::sync::Mutex<std::collections::HashMap<WasmHash, FileId>>,
}

/// What tells one file from another (or from itself, rewritten).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

impl ArtifactCache {
    /// A cache under `root` for artifacts that `engine` can run.
    pub fn new(root: &Path, engine: &Engine) -> std::io::Result<ArtifactCache> {
        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let dir = root.join(format!("{:016x}", h.finish()));
        std::fs::create_dir_all(&dir)?;
        Ok(ArtifactCache {
            dir,
            verified: Default::default(),
        })
    }

    pub fn artifact_path(&self, hash: &WasmHash) -> PathBuf {
        self.dir.join(format!("{}.cwasm", hash.hex()))
    }

    fn checksum_path(&self, hash: &WasmHash) -> PathBuf {
        self.dir.join(format!("{}.b3", hash.hex()))
    }

    pub fn contains(&self, hash: &WasmHash) -> bool {
        self.checksum_path(hash).exists() && self.artifact_path(hash).exists()
    }

    /// Loads a verified artifact, by mapping the file (`mmap`) or reading
    /// it. A bad entry is removed so the caller's rebuild replaces it.
    pub fn load(
        &self,
        engine: &Engine,
        hash: &WasmHash,
        kind: WasmKind,
        mmap: bool,
    ) -> Result<Compiled, CacheMiss> {
        let path = self.artifact_path(hash);
        let result = (|| {
            let id = match std::fs::metadata(&path) {
                Ok(meta) => FileId::of(&meta),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(CacheMiss::Absent);
                }
                Err(e) => return Err(e.into()),
            };
            let known = self.verified.lock().expect("cache lock").get(hash) == Some(&id);
            let mut bytes = None;
            if !known {
                let expected = match std::fs::read(self.checksum_path(hash)) {
                    Ok(sum) => sum,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(CacheMiss::Absent);
                    }
                    Err(e) => return Err(e.into()),
                };
                let read = std::fs::read(&path)?;
                if blake3::hash(&read).as_bytes().as_slice() != expected.as_slice() {
                    return Err(CacheMiss::Corrupt);
                }
                // What was read is what was checked: the identity must not
                // have changed meanwhile.
                if FileId::of(&std::fs::metadata(&path)?) != id {
                    return Err(CacheMiss::Corrupt);
                }
                self.verified.lock().expect("cache lock").insert(*hash, id);
                bytes = Some(read);
            }
            let compiled = if mmap {
                // SAFETY: the file is one this cache wrote with `serialize`
                // for an engine with the same compatibility fingerprint, and
                // this process verified its checksum (now or at an earlier
                // load of the same inode, size and mtime), so it is not
                // arbitrary bytes. Files in the cache are replaced by rename,
                // never modified in place, so the mapping stays consistent.
                match kind {
                    WasmKind::Module => {
                        unsafe { Module::deserialize_file(engine, &path) }.map(Compiled::Module)
                    }
                    // SAFETY: as above.
                    WasmKind::Component => unsafe { Component::deserialize_file(engine, &path) }
                        .map(Compiled::Component),
                }
            } else {
                let bytes = match bytes {
                    Some(b) => b,
                    None => std::fs::read(&path)?,
                };
                // SAFETY: as above; the bytes are the verified file's.
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
            compiled.map_err(|e| CacheMiss::Incompatible(format!("{e:#}")))
        })();
        if matches!(result, Err(CacheMiss::Corrupt | CacheMiss::Incompatible(_))) {
            self.remove(hash);
        }
        result
    }

    /// Writes an artifact and its checksum atomically (temp file + rename),
    /// checksum last, so a crash never leaves an entry that verifies but is
    /// incomplete.
    pub fn store(&self, hash: &WasmHash, compiled: &Compiled) -> std::io::Result<()> {
        let bytes = compiled
            .serialize()
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        let checksum = blake3::hash(&bytes);
        let path = self.artifact_path(hash);
        write_atomic(&path, &bytes)?;
        write_atomic(&self.checksum_path(hash), checksum.as_bytes())?;
        // Written from these bytes by this process: verified already.
        let id = FileId::of(&std::fs::metadata(&path)?);
        self.verified.lock().expect("cache lock").insert(*hash, id);
        Ok(())
    }

    /// Deletes an entry (a no-op if absent).
    pub fn remove(&self, hash: &WasmHash) {
        self.verified.lock().expect("cache lock").remove(hash);
        let _ = std::fs::remove_file(self.checksum_path(hash));
        let _ = std::fs::remove_file(self.artifact_path(hash));
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
