//! Blobs: named bytes in containers, behind [`BlobStore`]. The embedded
//! store is a folder per container under the state dir ([`FsBlobs`]), so
//! files dropped there are blobs too; an S3-compatible store is another
//! implementation of the same four calls, held to [`conformance`].

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::trigger::config::check_container;

/// A validated blob path: a container and a name within it (which may
/// hold `/`, never `.` or `..` segments, nor segments starting with `.`,
/// which the store keeps for itself).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobPath {
    container: String,
    name: String,
}

/// The longest blob name (Azure's limit).
pub const MAX_NAME: usize = 1024;

/// The longest segment of a name: a file name's limit on the filesystems
/// the folder store runs on.
pub const MAX_SEGMENT: usize = 255;

/// Characters that reorder the text around them (bidirectional embeddings,
/// overrides and isolates): a name holding U+202E shows `gpj.exe` as
/// `exe.jpg` in every listing.
fn reorders_text(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

impl BlobPath {
    /// Parses `container/name`.
    pub fn parse(path: &str) -> Result<BlobPath, String> {
        let (container, name) = path
            .split_once('/')
            .ok_or_else(|| format!("{path:?} is not `container/name`"))?;
        BlobPath::new(container, name)
    }

    pub fn new(container: &str, name: &str) -> Result<BlobPath, String> {
        check_container(container)?;
        if name.is_empty() || name.len() > MAX_NAME {
            return Err(format!(
                "a blob name is 1 to {MAX_NAME} bytes, e.g. \"cat.ppm\" or \"2026/cat.ppm\""
            ));
        }
        for segment in name.split('/') {
            if segment.is_empty() || segment.starts_with('.') {
                return Err(format!(
                    "invalid blob name {name:?}: no empty segments, and none starting with `.`"
                ));
            }
            if segment.chars().any(|c| c.is_control() || c == '\\') {
                return Err(format!(
                    "invalid blob name {name:?}: no control characters or backslashes"
                ));
            }
            if segment.chars().any(reorders_text) {
                return Err(format!(
                    "invalid blob name {name:?}: no bidirectional control characters (U+202A to U+202E, U+2066 to U+2069, marks), which make a name show other than it is"
                ));
            }
            if segment.len() > MAX_SEGMENT {
                return Err(format!(
                    "invalid blob name {name:?}: a segment between `/`s is at most {MAX_SEGMENT} bytes"
                ));
            }
        }
        Ok(BlobPath {
            container: container.to_owned(),
            name: name.to_owned(),
        })
    }

    pub fn container(&self) -> &str {
        &self.container
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl std::fmt::Display for BlobPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.container, self.name)
    }
}

/// A blob in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// The name within its container.
    pub name: String,
    pub size: u64,
    pub modified: SystemTime,
    /// Which write this is, short of reading the bytes: it changes with
    /// every write, even of the same bytes with the same size and
    /// modification time (`cp -p`, `rsync -a`, `tar x`).
    pub stamp: String,
    /// Whether the write is whole: a file dropped into a container's
    /// folder may still be being written, so it is whole once it has been
    /// left alone for [`QUIET`]; a blob put through the store always is.
    pub complete: bool,
}

/// How long a dropped file must be left unchanged before it counts as
/// written whole.
pub const QUIET: Duration = Duration::from_secs(1);

/// A blob's version: the blake3 hash of its bytes.
pub fn etag(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex()[..32].to_owned()
}

#[async_trait::async_trait]
pub trait BlobStore: Send + Sync {
    /// Writes a blob whole and durably (readers see the old bytes or the
    /// new, never a part); its etag.
    async fn put(&self, path: &BlobPath, bytes: Bytes) -> std::io::Result<String>;
    async fn get(&self, path: &BlobPath) -> std::io::Result<Option<Bytes>>;
    /// Whether it was there.
    async fn delete(&self, path: &BlobPath) -> std::io::Result<bool>;
    /// The blobs of `container` whose names start with `prefix`, by name.
    async fn list(&self, container: &str, prefix: &str) -> std::io::Result<Vec<BlobInfo>>;
}

/// Blobs as files: `<root>/<container>/<name>`.
pub struct FsBlobs {
    root: PathBuf,
    /// The stamps of files this store wrote whole (renamed into place),
    /// until they are older than [`QUIET`] and need no vouching for.
    written: Arc<Mutex<HashMap<PathBuf, String>>>,
}

/// A file's stamp: its device, inode, size, and modification and status
/// change times in nanoseconds. The status change time moves with any
/// write, rename or `chmod`, even one that restores the modification time.
fn stamp(meta: &std::fs::Metadata) -> String {
    format!(
        "{:x}.{:x}.{}.{}.{}",
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
    )
}

/// When a file last changed in any way (its status change time).
fn changed(meta: &std::fs::Metadata) -> SystemTime {
    SystemTime::UNIX_EPOCH
        + Duration::new(
            meta.ctime().max(0) as u64,
            meta.ctime_nsec().clamp(0, 999_999_999) as u32,
        )
}

impl FsBlobs {
    pub fn new(root: PathBuf) -> FsBlobs {
        FsBlobs {
            root,
            written: Arc::default(),
        }
    }

    pub fn in_state_dir(state_dir: &Path) -> FsBlobs {
        FsBlobs::new(state_dir.join("blobs"))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn file(&self, path: &BlobPath) -> PathBuf {
        self.root.join(&path.container).join(&path.name)
    }
}

/// A name that cannot be written because of the blobs already there:
/// `a/b` while `a` is a blob, or `a` while blobs `a/...` exist. Such an
/// error is the caller's (400), and retrying it changes nothing.
pub fn is_clash(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::InvalidInput
}

fn clash(path: &Path, root: &Path, e: std::io::Error) -> std::io::Error {
    use std::io::ErrorKind::{AlreadyExists, IsADirectory, NotADirectory};
    if !matches!(e.kind(), AlreadyExists | IsADirectory | NotADirectory) {
        return e;
    }
    let name = path.strip_prefix(root).unwrap_or(path).display();
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!(
            "`{name}` clashes with the blobs there: a name cannot be both a blob and a folder of blobs"
        ),
    )
}

fn put_file(root: &Path, file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Written beside, then renamed: a scan never sees half a blob. `.tmp`
    // is no container name, so it is never scanned.
    let tmp_dir = root.join(".tmp");
    std::fs::create_dir_all(&tmp_dir)?;
    let dir = file.parent().expect("a blob file has a folder");
    std::fs::create_dir_all(dir).map_err(|e| clash(file, root, e))?;
    if file.is_dir() {
        return Err(clash(file, root, std::io::ErrorKind::IsADirectory.into()));
    }
    let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(file).map_err(|e| clash(file, root, e.error))?;
    std::fs::File::open(dir)?.sync_all()
}

fn list_dir(
    base: &Path,
    dir: &Path,
    prefix: &str,
    written: &Mutex<HashMap<PathBuf, String>>,
    out: &mut Vec<BlobInfo>,
) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        if file_name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            list_dir(base, &path, prefix, written, out)?;
        } else if kind.is_file() {
            let Ok(rel) = path.strip_prefix(base) else {
                continue;
            };
            let Some(name) = rel.to_str() else { continue };
            if !name.starts_with(prefix) {
                continue;
            }
            let meta = entry.metadata()?;
            let stamp = stamp(&meta);
            let quiet = changed(&meta).elapsed().is_ok_and(|since| since >= QUIET);
            let complete = {
                let mut written = written.lock().expect("written");
                if quiet {
                    written.remove(&path);
                    true
                } else {
                    written.get(&path) == Some(&stamp)
                }
            };
            out.push(BlobInfo {
                name: name.to_owned(),
                size: meta.len(),
                modified: meta.modified()?,
                stamp,
                complete,
            });
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl BlobStore for FsBlobs {
    async fn put(&self, path: &BlobPath, bytes: Bytes) -> std::io::Result<String> {
        let (root, file) = (self.root.clone(), self.file(path));
        let (tag, file, stamp) = tokio::task::spawn_blocking(move || {
            put_file(&root, &file, &bytes)?;
            // Renamed into place, so whole at once: vouched for until the
            // file is old enough to need no vouching. (Should another
            // writer replace it meanwhile, the stamp differs.)
            let stamp = stamp(&std::fs::symlink_metadata(&file)?);
            Ok::<_, std::io::Error>((etag(&bytes), file, stamp))
        })
        .await
        .map_err(std::io::Error::other)??;
        self.written.lock().expect("written").insert(file, stamp);
        Ok(tag)
    }

    async fn get(&self, path: &BlobPath) -> std::io::Result<Option<Bytes>> {
        match tokio::fs::read(self.file(path)).await {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::IsADirectory
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn delete(&self, path: &BlobPath) -> std::io::Result<bool> {
        let file = self.file(path);
        self.written.lock().expect("written").remove(&file);
        match tokio::fs::remove_file(file).await {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn list(&self, container: &str, prefix: &str) -> std::io::Result<Vec<BlobInfo>> {
        let base = self.root.join(container);
        let prefix = prefix.to_owned();
        let written = self.written.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            list_dir(&base, &base, &prefix, &written, &mut out)?;
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// The behaviour every [`BlobStore`] must have: run against an empty store.
pub async fn conformance(store: &dyn BlobStore) {
    let p = BlobPath::parse("images/a/cat.ppm").unwrap();
    let tag = store.put(&p, Bytes::from("meow")).await.unwrap();
    assert_eq!(tag, etag(b"meow"));
    assert_eq!(store.get(&p).await.unwrap().unwrap(), Bytes::from("meow"));
    // A put replaces the whole blob.
    store.put(&p, Bytes::from("purr")).await.unwrap();
    assert_eq!(store.get(&p).await.unwrap().unwrap(), Bytes::from("purr"));
    let other = BlobPath::parse("images/b.txt").unwrap();
    store.put(&other, Bytes::from("b")).await.unwrap();
    let listed = store.list("images", "").await.unwrap();
    let names: Vec<&str> = listed.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, vec!["a/cat.ppm", "b.txt"], "by name");
    assert_eq!(listed[0].size, 4);
    assert!(listed.iter().all(|b| b.complete), "a put is whole at once");
    // The same bytes written again are another write.
    let before = listed[1].stamp.clone();
    store.put(&other, Bytes::from("b")).await.unwrap();
    let again = store.list("images", "b").await.unwrap();
    assert_ne!(
        again[0].stamp, before,
        "a write of the same bytes has its own stamp"
    );
    assert_eq!(store.list("images", "a/").await.unwrap().len(), 1);
    assert!(store.list("none", "").await.unwrap().is_empty());
    // A name cannot be both a blob and a folder of blobs.
    let under_a_blob = BlobPath::parse("images/b.txt/x").unwrap();
    let e = store
        .put(&under_a_blob, Bytes::from("x"))
        .await
        .unwrap_err();
    assert!(is_clash(&e), "{e}");
    let over_a_folder = BlobPath::parse("images/a").unwrap();
    let e = store
        .put(&over_a_folder, Bytes::from("x"))
        .await
        .unwrap_err();
    assert!(is_clash(&e), "{e}");
    assert!(store.delete(&p).await.unwrap());
    assert!(!store.delete(&p).await.unwrap());
    assert_eq!(store.get(&p).await.unwrap(), None);
    assert_eq!(
        store
            .get(&BlobPath::parse("none/x").unwrap())
            .await
            .unwrap(),
        None
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_paths() {
        let p = BlobPath::parse("images/2026/cat.ppm").unwrap();
        assert_eq!((p.container(), p.name()), ("images", "2026/cat.ppm"));
        for bad in [
            "images",
            "images/",
            "images/../x",
            "images/a//b",
            "images/.hidden",
            "Images/a",
            "images/a\nb",
            "images/gpj\u{202E}.exe",
            "images/a\u{2066}b",
        ] {
            assert!(BlobPath::parse(bad).is_err(), "{bad:?}");
        }
        assert!(BlobPath::new("images", &"a".repeat(255)).is_ok());
        assert!(BlobPath::new("images", &"a".repeat(256)).is_err());
        assert!(BlobPath::new("images", &format!("x/{}", "a".repeat(300))).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_folder_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsBlobs::new(dir.path().to_owned());
        conformance(&store).await;
        // And a file dropped into a container's folder is a blob.
        std::fs::write(dir.path().join("images").join("dropped.txt"), "hi").unwrap();
        let names: Vec<String> = store
            .list("images", "")
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.name)
            .collect();
        assert!(names.contains(&"dropped.txt".to_owned()), "{names:?}");
    }
}
