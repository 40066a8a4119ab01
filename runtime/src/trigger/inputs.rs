//! Blob input bindings: the blobs an invocation reads besides its event,
//! handed to it as read-only files under `/inputs` (one per input, named
//! after it). Each set of blob versions is written once under the state
//! dir (`inputs/<hash>/`) and mounted from there, so an invocation pays for
//! reading and hashing its blobs, not for writing them.

use std::path::{Path, PathBuf};

use super::config::{INPUTS_DIR, InputBinding, InputSource};
use crate::events::blobs::{BlobPath, BlobStore, etag};
use crate::manifest::FileMount;

/// The folder under the state dir that holds the inputs' copies; emptied
/// when Kelvin starts (nothing in it is needed across a restart).
pub fn inputs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("inputs")
}

/// The mount holding `inputs`' blobs for one invocation, their patterns
/// filled from `value` (the trigger's parameters); `None` if the function
/// has no blob inputs. A blob that is missing, or that cannot be read (the
/// error is logged), is a missing file: the function decides what that
/// means.
pub async fn blob_inputs(
    blobs: &dyn BlobStore,
    state_dir: &Path,
    function: &str,
    inputs: &[InputBinding],
    value: impl Fn(&str) -> Option<String>,
) -> Option<FileMount> {
    let mut files = Vec::new();
    for input in inputs {
        let InputSource::Blob(pattern) = &input.source else {
            continue;
        };
        let bytes = match pattern.fill(&value).map(|p| BlobPath::parse(&p)) {
            Ok(Ok(path)) => match blobs.get(&path).await {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::error!(function, input = input.name.as_str(), blob = %path, error = %e, "a blob input cannot be read; the function sees no file");
                    None
                }
            },
            // A parameter value that makes no blob name: no such blob.
            _ => None,
        };
        files.push((input.name.as_str(), bytes));
    }
    if files.is_empty() {
        return None;
    }
    // The folder is named by what it holds: the same blobs, the same folder.
    let mut key = blake3::Hasher::new();
    key.update(function.as_bytes());
    for (name, bytes) in &files {
        key.update(b"\0");
        key.update(name.as_bytes());
        key.update(b"\0");
        key.update(bytes.as_deref().map_or("-".to_owned(), etag).as_bytes());
    }
    let dir = inputs_dir(state_dir).join(&key.finalize().to_hex()[..32]);
    if !dir.is_dir()
        && let Err(e) = write_once(&dir, &files).await
    {
        tracing::error!(function, error = %e, "the blob inputs cannot be written; the function sees none");
        return None;
    }
    Some(FileMount {
        source: dir,
        destination: INPUTS_DIR.to_owned(),
    })
}

/// Writes `files` into a fresh folder and renames it to `dir`, so no
/// invocation ever mounts a half-written one.
async fn write_once(dir: &Path, files: &[(&str, Option<bytes::Bytes>)]) -> std::io::Result<()> {
    let dir = dir.to_owned();
    let files: Vec<(String, bytes::Bytes)> = files
        .iter()
        .filter_map(|(n, b)| Some(((*n).to_owned(), b.clone()?)))
        .collect();
    tokio::task::spawn_blocking(move || {
        let parent = dir.parent().expect("under the inputs folder");
        std::fs::create_dir_all(parent)?;
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempdir_in(parent)?;
        for (name, bytes) in &files {
            std::fs::write(tmp.path().join(name), bytes)?;
        }
        match std::fs::rename(tmp.path(), &dir) {
            Ok(()) => {
                // Renamed: nothing left for the guard to remove.
                let _ = tmp.keep();
                Ok(())
            }
            // Another invocation wrote the same folder first.
            Err(_) if dir.is_dir() => Ok(()),
            Err(e) => Err(e),
        }
    })
    .await
    .map_err(std::io::Error::other)?
}
