//! The on-disk cache of compiled artifacts, content-addressed by the wasm's
//! hash under a folder named for the engine's compatibility fingerprint.
//!
//! Each artifact has a checksum beside it, verified before the artifact is
//! mapped: a stale, truncated or corrupt entry is deleted and rebuilt, never
//! executed.

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
}

impl ArtifactCache {
    /// A cache under `root` for artifacts that `engine` can run.
    pub fn new(root: &Path, engine: &Engine) -> std::io::Result<ArtifactCache> {
        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let dir = root.join(format!("{:016x}", h.finish()));
        std::fs::create_dir_all(&dir)?;
        Ok(ArtifactCache { dir })
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

    /// Loads a verified artifact. A bad entry is removed so the caller's
    /// rebuild replaces it.
    pub fn load(
        &self,
        engine: &Engine,
        hash: &WasmHash,
        kind: WasmKind,
    ) -> Result<Compiled, CacheMiss> {
        let path = self.artifact_path(hash);
        let expected = match std::fs::read(self.checksum_path(hash)) {
            Ok(sum) => sum,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(CacheMiss::Absent),
            Err(e) => return Err(e.into()),
        };
        let result = (|| {
            let bytes = std::fs::read(&path)?;
            if blake3::hash(&bytes).as_bytes().as_slice() != expected.as_slice() {
                return Err(CacheMiss::Corrupt);
            }
            // SAFETY: the file is one this cache wrote with
            // `Module::serialize` for an engine with the same compatibility
            // fingerprint, and its checksum was just verified, so it is not
            // arbitrary bytes. Files in the cache are replaced by rename,
            // never modified in place, so the mapping stays consistent.
            let compiled = match kind {
                WasmKind::Module => {
                    unsafe { Module::deserialize_file(engine, &path) }.map(Compiled::Module)
                }
                // SAFETY: as above.
                WasmKind::Component => {
                    unsafe { Component::deserialize_file(engine, &path) }.map(Compiled::Component)
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
        write_atomic(&self.artifact_path(hash), &bytes)?;
        write_atomic(&self.checksum_path(hash), checksum.as_bytes())
    }

    fn remove(&self, hash: &WasmHash) {
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
