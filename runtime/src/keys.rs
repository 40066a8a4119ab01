//! Access keys, with Azure Functions' semantics: a master key (admin
//! routes, and everything else), host keys (any function route) and function
//! keys (that function's routes). Kept in `state_dir/keys.json`, readable by
//! the owner only; compared in constant time.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// Who may call an HTTP route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthLevel {
    /// Anyone.
    Anonymous,
    /// The function's key, a host key, or the master key (Azure's default).
    #[default]
    Function,
    /// The master key only.
    Admin,
}

/// What a key opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Master,
    Host,
    Function(String),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Master => f.write_str("master"),
            Scope::Host => f.write_str("host"),
            Scope::Function(name) => write!(f, "function:{name}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Key {
    pub name: String,
    pub scope: Scope,
    pub value: String,
    /// RFC 3339.
    pub created_at: String,
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    version: u32,
    keys: Vec<Key>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("failed to read or write the key file `{path}`")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the key file `{path}` is not valid: {reason}; restore it from a backup or delete it to generate new keys"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("the system random number generator failed: {0}")]
    Random(String),
    #[error("no key named `{name}` with scope {scope}")]
    NotFound { name: String, scope: Scope },
    #[error(
        "a key named `{name}` with scope {scope} exists already; revoke it first or pick another name"
    )]
    Exists { name: String, scope: Scope },
}

/// The keys of one state directory, reloaded when the file changes (so
/// `kelvin keys` works against a running server).
pub struct KeyStore {
    path: PathBuf,
    /// The file's text as last read, and its keys.
    keys: RwLock<(String, Vec<Key>)>,
    last_check: Mutex<Instant>,
    reload_every: Duration,
}

/// How often a running server looks at the key file's modification time.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

impl KeyStore {
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("keys.json")
    }

    /// Opens the key file, creating it with a master key, a host key and a
    /// key per function on first start.
    pub fn open(state_dir: &Path, functions: &[&str]) -> Result<KeyStore, KeyError> {
        let path = Self::path_in(state_dir);
        let io = |source| KeyError::Io {
            path: path.clone(),
            source,
        };
        if !path.exists() {
            std::fs::create_dir_all(state_dir).map_err(io)?;
            let mut keys = vec![
                new_key("master", Scope::Master)?,
                new_key("default", Scope::Host)?,
            ];
            for f in functions {
                keys.push(new_key("default", Scope::Function((*f).to_owned()))?);
            }
            write_keys(&path, &keys)?;
            tracing::info!(path = %path.display(), "generated access keys (list them with `kelvin keys list`)");
        }
        let (text, keys) = read_keys(&path)?;
        Ok(KeyStore {
            path,
            keys: RwLock::new((text, keys)),
            last_check: Mutex::new(Instant::now()),
            reload_every: RELOAD_CHECK,
        })
    }

    /// Checks the file for changes at most this often (default: 1 s).
    pub fn reload_every(mut self, interval: Duration) -> KeyStore {
        self.reload_every = interval;
        self
    }

    /// True if `presented` opens a route of `function` at `level`.
    pub fn authorize(&self, level: AuthLevel, function: &str, presented: Option<&str>) -> bool {
        if level == AuthLevel::Anonymous {
            return true;
        }
        let Some(presented) = presented else {
            return false;
        };
        self.reload_if_changed();
        let keys = self.keys.read().expect("key lock");
        // Every candidate is compared, so timing says nothing about which
        // key (or how much of one) matched.
        let mut ok = false;
        for key in &keys.1 {
            let opens = match (&key.scope, level) {
                (Scope::Master, _) => true,
                (Scope::Host, AuthLevel::Function) => true,
                (Scope::Function(f), AuthLevel::Function) => f == function,
                _ => false,
            };
            ok |= opens
                & constant_time_eq::constant_time_eq(key.value.as_bytes(), presented.as_bytes());
        }
        ok
    }

    fn reload_if_changed(&self) {
        {
            let mut last = self.last_check.lock().expect("key lock");
            if last.elapsed() < self.reload_every {
                return;
            }
            *last = Instant::now();
        }
        // The contents, not the mtime: file times come from a coarse clock,
        // so two writes within a few milliseconds can share one.
        match read_keys(&self.path) {
            Ok(fresh) if fresh.0 == self.keys.read().expect("key lock").0 => {}
            Ok(fresh) => {
                tracing::info!(path = %self.path.display(), "access keys reloaded");
                *self.keys.write().expect("key lock") = fresh;
            }
            // Keep serving with the keys we have rather than lock everyone out.
            Err(e) => {
                tracing::error!(error = %e, "failed to reload access keys; keeping the previous ones")
            }
        }
    }

    /// The first key with this scope (for the master key: the one).
    pub fn find(&self, scope: &Scope) -> Option<Key> {
        self.keys
            .read()
            .expect("key lock")
            .1
            .iter()
            .find(|k| &k.scope == scope)
            .cloned()
    }

    pub fn list(&self) -> Vec<Key> {
        self.keys.read().expect("key lock").1.clone()
    }

    /// Adds a key; a new master key replaces the old one (rotation).
    pub fn create(&self, name: &str, scope: Scope) -> Result<Key, KeyError> {
        let (_, mut keys) = read_keys(&self.path)?;
        if scope == Scope::Master {
            keys.retain(|k| k.scope != Scope::Master);
        } else if keys.iter().any(|k| k.name == name && k.scope == scope) {
            return Err(KeyError::Exists {
                name: name.to_owned(),
                scope,
            });
        }
        let key = new_key(name, scope)?;
        keys.push(key.clone());
        write_keys(&self.path, &keys)?;
        *self.keys.write().expect("key lock") = read_keys(&self.path)?;
        Ok(key)
    }

    pub fn revoke(&self, name: &str, scope: Scope) -> Result<(), KeyError> {
        let (_, mut keys) = read_keys(&self.path)?;
        let before = keys.len();
        keys.retain(|k| !(k.name == name && k.scope == scope));
        if keys.len() == before {
            return Err(KeyError::NotFound {
                name: name.to_owned(),
                scope,
            });
        }
        write_keys(&self.path, &keys)?;
        *self.keys.write().expect("key lock") = read_keys(&self.path)?;
        Ok(())
    }
}

fn new_key(name: &str, scope: Scope) -> Result<Key, KeyError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(Key {
        name: name.to_owned(),
        scope,
        value: bytes.iter().map(|b| format!("{b:02x}")).collect(),
        created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    })
}

fn read_keys(path: &Path) -> Result<(String, Vec<Key>), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "the key file is readable by others; run `chmod 600` on it");
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    let file: KeyFile = serde_json::from_str(&text).map_err(|e| KeyError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    Ok((text, file.keys))
}

/// Writes owner-only, atomically (temp file + rename), so a reader never
/// sees half a file.
fn write_keys(path: &Path, keys: &[Key]) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    let text = serde_json::to_string_pretty(&KeyFile {
        version: 1,
        keys: keys.to_vec(),
    })
    .expect("keys serialise");
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_scopes() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::open(dir.path(), &["a", "b"]).unwrap();
        let value = |scope: &Scope| store.find(scope).unwrap().value;
        let master = value(&Scope::Master);
        let host = value(&Scope::Host);
        let a = value(&Scope::Function("a".into()));
        use AuthLevel::*;
        assert!(store.authorize(Anonymous, "a", None));
        assert!(!store.authorize(Function, "a", None));
        assert!(!store.authorize(Function, "a", Some("wrong")));
        assert!(store.authorize(Function, "a", Some(&a)));
        assert!(
            !store.authorize(Function, "b", Some(&a)),
            "a function key opens only its function"
        );
        assert!(store.authorize(Function, "b", Some(&host)));
        assert!(store.authorize(Function, "b", Some(&master)));
        assert!(!store.authorize(Admin, "a", Some(&host)));
        assert!(!store.authorize(Admin, "a", Some(&a)));
        assert!(store.authorize(Admin, "a", Some(&master)));
        assert!(
            !store.authorize(Function, "a", Some(&a[..10])),
            "a prefix is not a key"
        );

        let mode = std::fs::metadata(KeyStore::path_in(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(master.len(), 64);
    }

    #[test]
    fn rotate_and_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::open(dir.path(), &["a"]).unwrap();
        let old = store.find(&Scope::Master).unwrap().value;
        let new = store.create("master", Scope::Master).unwrap().value;
        assert_ne!(old, new);
        assert!(!store.authorize(AuthLevel::Admin, "a", Some(&old)));
        assert!(store.authorize(AuthLevel::Admin, "a", Some(&new)));

        let extra = store
            .create("ci", Scope::Function("a".into()))
            .unwrap()
            .value;
        assert!(store.authorize(AuthLevel::Function, "a", Some(&extra)));
        assert!(matches!(
            store.create("ci", Scope::Function("a".into())),
            Err(KeyError::Exists { .. })
        ));
        store.revoke("ci", Scope::Function("a".into())).unwrap();
        assert!(!store.authorize(AuthLevel::Function, "a", Some(&extra)));
        assert!(matches!(
            store.revoke("ci", Scope::Host),
            Err(KeyError::NotFound { .. })
        ));

        // Another process (`kelvin keys`) changes the file; a running server
        // sees it at its next check.
        let server = KeyStore::open(dir.path(), &["a"])
            .unwrap()
            .reload_every(Duration::ZERO);
        let cli = KeyStore::open(dir.path(), &["a"]).unwrap();
        let rotated = cli.create("rotated", Scope::Host).unwrap().value;
        assert!(server.authorize(AuthLevel::Function, "a", Some(&rotated)));
        cli.revoke("rotated", Scope::Host).unwrap();
        assert!(!server.authorize(AuthLevel::Function, "a", Some(&rotated)));

        // Keys survive a restart; nothing is regenerated.
        let again = KeyStore::open(dir.path(), &["a"]).unwrap();
        assert_eq!(again.list(), store.list());
    }
}
