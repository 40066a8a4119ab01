//! The deployment store: versions, what each slot points to, and the
//! history of changes, durable and changed all or nothing. A small trait
//! free of SQLite types with portable SQL, so a Postgres backend can follow;
//! [`conformance`] is what any backend must pass.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

/// A stored version: the function, its wasm, and the manifest text its
/// configuration comes from (configurations are stored once per text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub id: String,
    pub function: String,
    /// blake3 of the wasm, hex.
    pub wasm: String,
    /// Shared: a manifest's functions all come from one text.
    pub config: std::sync::Arc<str>,
    /// RFC 3339, UTC.
    pub created_at: String,
}

/// One slot's pointer: `function` in `slot` is served by `version`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SlotRow {
    pub slot: String,
    pub function: String,
    pub version: String,
}

/// A change to the slots, applied all or nothing and logged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// Pointers to set (replacing what the slot had for that function).
    pub set: Vec<SlotRow>,
    /// Slots to delete whole, before `set` applies.
    pub delete_slots: Vec<String>,
    /// The traffic split to store: `Some(None)` clears it.
    pub split: Option<Option<String>>,
    /// A slot's settings for one function, replacing what it had.
    pub settings: Option<SettingsRow>,
    /// What the history says: the action (`deploy`, `swap`, ...) and its
    /// details as JSON.
    pub action: String,
    pub detail: String,
    pub who: String,
}

/// Settings that stay with a slot (through swaps) for one function: env
/// values over the version's own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SettingsRow {
    pub slot: String,
    pub function: String,
    pub env: Vec<(String, String)>,
}

/// One entry of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRow {
    pub seq: i64,
    pub at: String,
    pub action: String,
    pub detail: String,
    pub who: String,
}

#[derive(Debug, thiserror::Error)]
#[error("deployment store: {0}")]
pub struct StoreError(String);

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError(e.to_string())
    }
}

/// Where deployments are kept. Every method is one transaction.
pub trait DeploymentStore: Send {
    /// Stores versions in one transaction; for each, `false` if it was
    /// already there (unchanged).
    fn put_versions(&mut self, versions: &[VersionRow]) -> Result<Vec<bool>, StoreError>;

    /// Stores a version; `false` if it was already there (unchanged).
    fn put_version(&mut self, v: &VersionRow) -> Result<bool, StoreError> {
        Ok(self.put_versions(std::slice::from_ref(v))?[0])
    }
    fn version(&mut self, id: &str) -> Result<Option<VersionRow>, StoreError>;
    /// Versions, newest first; of one function if named.
    fn versions(&mut self, function: Option<&str>) -> Result<Vec<VersionRow>, StoreError>;
    /// Deletes a version no slot points to; whether it was deleted.
    fn delete_version(&mut self, id: &str) -> Result<bool, StoreError>;
    /// Every slot's pointers, sorted.
    fn slots(&mut self) -> Result<Vec<SlotRow>, StoreError>;
    /// The stored traffic split (JSON), if any.
    fn split(&mut self) -> Result<Option<String>, StoreError>;
    /// Every slot's settings, sorted by slot and function (env in name
    /// order).
    fn settings(&mut self) -> Result<Vec<SettingsRow>, StoreError>;
    /// Applies `change` and appends it to the history, all or nothing.
    fn apply(&mut self, change: &Change) -> Result<(), StoreError>;
    /// The newest `limit` history entries, newest first.
    fn history(&mut self, limit: usize) -> Result<Vec<HistoryRow>, StoreError>;
    fn meta(&mut self, key: &str) -> Result<Option<String>, StoreError>;
    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError>;
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS configs (
    hash TEXT PRIMARY KEY,
    text TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    id         TEXT PRIMARY KEY,
    function   TEXT NOT NULL,
    wasm       TEXT NOT NULL,
    config     TEXT NOT NULL REFERENCES configs (hash),
    created_at TEXT NOT NULL,
    seq        INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS slots (
    slot     TEXT NOT NULL,
    function TEXT NOT NULL,
    version  TEXT NOT NULL REFERENCES versions (id),
    PRIMARY KEY (slot, function)
);
CREATE TABLE IF NOT EXISTS history (
    seq    INTEGER PRIMARY KEY,
    at     TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    who    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS slot_settings (
    slot     TEXT NOT NULL,
    function TEXT NOT NULL,
    name     TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (slot, function, name)
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// The embedded store: one SQLite file in the state dir.
pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    pub fn path_in(state_dir: &Path) -> std::path::PathBuf {
        state_dir.join("deployments.sqlite3")
    }

    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError(e.to_string()))?;
        }
        let conn = Connection::open(path)?;
        // WAL with FULL sync: a change acknowledged is on disk; a crash
        // leaves the state before it or after it.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(SqliteStore { conn })
    }

    /// A store in memory, for tests.
    pub fn in_memory() -> Result<SqliteStore, StoreError> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(SqliteStore { conn })
    }
}

fn now() -> String {
    humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string()
}

fn version_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<VersionRow> {
    Ok(VersionRow {
        id: row.get(0)?,
        function: row.get(1)?,
        wasm: row.get(2)?,
        config: row.get::<_, String>(3)?.into(),
        created_at: row.get(4)?,
    })
}

const SELECT_VERSION: &str = "SELECT v.id, v.function, v.wasm, c.text, v.created_at
     FROM versions v JOIN configs c ON c.hash = v.config";

impl DeploymentStore for SqliteStore {
    fn put_versions(&mut self, versions: &[VersionRow]) -> Result<Vec<bool>, StoreError> {
        let tx = self.conn.transaction()?;
        let mut seq: i64 =
            tx.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM versions", [], |r| {
                r.get(0)
            })?;
        // A manifest's functions share one text: hashed and stored once.
        let mut hashed: Option<(&str, String)> = None;
        let mut added = Vec::with_capacity(versions.len());
        for v in versions {
            let config = match &hashed {
                Some((text, hash)) if **text == *v.config => hash.clone(),
                _ => {
                    let hash = blake3::hash(v.config.as_bytes()).to_hex().to_string();
                    tx.execute(
                        "INSERT INTO configs (hash, text) VALUES (?1, ?2) ON CONFLICT (hash) DO NOTHING",
                        params![hash, &*v.config],
                    )?;
                    hashed = Some((&v.config, hash.clone()));
                    hash
                }
            };
            let new = tx.execute(
                "INSERT INTO versions (id, function, wasm, config, created_at, seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO NOTHING",
                params![v.id, v.function, v.wasm, config, v.created_at, seq],
            )? == 1;
            seq += i64::from(new);
            added.push(new);
        }
        tx.commit()?;
        Ok(added)
    }

    fn version(&mut self, id: &str) -> Result<Option<VersionRow>, StoreError> {
        Ok(self
            .conn
            .query_row(
                &format!("{SELECT_VERSION} WHERE v.id = ?1"),
                [id],
                version_row,
            )
            .optional()?)
    }

    fn versions(&mut self, function: Option<&str>) -> Result<Vec<VersionRow>, StoreError> {
        let mut stmt = self.conn.prepare(&format!(
            "{SELECT_VERSION} WHERE ?1 IS NULL OR v.function = ?1 ORDER BY v.seq DESC"
        ))?;
        let rows = stmt.query_map([function], version_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn delete_version(&mut self, id: &str) -> Result<bool, StoreError> {
        let tx = self.conn.transaction()?;
        let deleted = tx.execute(
            "DELETE FROM versions WHERE id = ?1
             AND NOT EXISTS (SELECT 1 FROM slots WHERE version = ?1)",
            [id],
        )?;
        tx.execute(
            "DELETE FROM configs WHERE NOT EXISTS
             (SELECT 1 FROM versions WHERE versions.config = configs.hash)",
            [],
        )?;
        tx.commit()?;
        Ok(deleted == 1)
    }

    fn slots(&mut self) -> Result<Vec<SlotRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT slot, function, version FROM slots ORDER BY slot, function")?;
        let rows = stmt.query_map([], |r| {
            Ok(SlotRow {
                slot: r.get(0)?,
                function: r.get(1)?,
                version: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn split(&mut self) -> Result<Option<String>, StoreError> {
        self.meta("split")
    }

    fn settings(&mut self) -> Result<Vec<SettingsRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT slot, function, name, value FROM slot_settings ORDER BY slot, function, name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out: Vec<SettingsRow> = Vec::new();
        for row in rows {
            let (slot, function, name, value) = row?;
            match out.last_mut() {
                Some(last) if last.slot == slot && last.function == function => {
                    last.env.push((name, value));
                }
                _ => out.push(SettingsRow {
                    slot,
                    function,
                    env: vec![(name, value)],
                }),
            }
        }
        Ok(out)
    }

    fn apply(&mut self, change: &Change) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        if let Some(settings) = &change.settings {
            tx.execute(
                "DELETE FROM slot_settings WHERE slot = ?1 AND function = ?2",
                params![settings.slot, settings.function],
            )?;
            for (name, value) in &settings.env {
                tx.execute(
                    "INSERT INTO slot_settings (slot, function, name, value) VALUES (?1, ?2, ?3, ?4)",
                    params![settings.slot, settings.function, name, value],
                )?;
            }
        }
        for slot in &change.delete_slots {
            tx.execute("DELETE FROM slots WHERE slot = ?1", [slot])?;
        }
        for row in &change.set {
            let known: bool = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM versions WHERE id = ?1 AND function = ?2)",
                params![row.version, row.function],
                |r| r.get(0),
            )?;
            if !known {
                // Dropping `tx` rolls back what this change did so far.
                return Err(StoreError(format!(
                    "no version {} of function `{}`",
                    row.version, row.function
                )));
            }
            tx.execute(
                "INSERT INTO slots (slot, function, version) VALUES (?1, ?2, ?3)
                 ON CONFLICT (slot, function) DO UPDATE SET version = excluded.version",
                params![row.slot, row.function, row.version],
            )?;
        }
        match &change.split {
            Some(Some(split)) => {
                tx.execute(
                    "INSERT INTO meta (key, value) VALUES ('split', ?1)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    [split],
                )?;
            }
            Some(None) => {
                tx.execute("DELETE FROM meta WHERE key = 'split'", [])?;
            }
            None => {}
        }
        let seq: i64 = tx.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM history", [], |r| {
            r.get(0)
        })?;
        tx.execute(
            "INSERT INTO history (seq, at, action, detail, who) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![seq, now(), change.action, change.detail, change.who],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn history(&mut self, limit: usize) -> Result<Vec<HistoryRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT seq, at, action, detail, who FROM history ORDER BY seq DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok(HistoryRow {
                seq: r.get(0)?,
                at: r.get(1)?,
                action: r.get(2)?,
                detail: r.get(3)?,
                who: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn meta(&mut self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?)
    }

    fn set_meta(&mut self, key: &str, value: &str) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }
}

/// What every backend must do: run it against a fresh, empty store.
pub fn conformance(store: &mut dyn DeploymentStore) {
    let v = |id: &str, function: &str, config: &str| VersionRow {
        id: id.into(),
        function: function.into(),
        wasm: format!("wasm-of-{id}"),
        config: config.into(),
        created_at: "2026-11-21T00:00:00Z".into(),
    };
    let row = |slot: &str, function: &str, version: &str| SlotRow {
        slot: slot.into(),
        function: function.into(),
        version: version.into(),
    };
    let change = |set: Vec<SlotRow>| Change {
        set,
        action: "deploy".into(),
        detail: "{}".into(),
        who: "test".into(),
        ..Change::default()
    };

    // Versions: stored once, read back whole, newest first.
    assert!(store.versions(None).unwrap().is_empty());
    assert!(store.put_version(&v("a1", "hello", "config one")).unwrap());
    assert!(
        !store.put_version(&v("a1", "hello", "config one")).unwrap(),
        "the same version again is no change"
    );
    assert_eq!(
        store
            .put_versions(&[
                v("a2", "hello", "config two"),
                v("a1", "hello", "config one"),
                v("b1", "echo", "config one"),
            ])
            .unwrap(),
        [true, false, true]
    );
    assert_eq!(
        store.version("a2").unwrap(),
        Some(v("a2", "hello", "config two"))
    );
    assert_eq!(store.version("zz").unwrap(), None);
    let ids = |rows: Vec<VersionRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(store.versions(Some("hello")).unwrap()), ["a2", "a1"]);
    assert_eq!(ids(store.versions(None).unwrap()), ["b1", "a2", "a1"]);

    // Slots: set together, replaced per function.
    store
        .apply(&change(vec![
            row("production", "hello", "a1"),
            row("production", "echo", "b1"),
        ]))
        .unwrap();
    store
        .apply(&change(vec![row("staging", "hello", "a2")]))
        .unwrap();
    assert_eq!(
        store.slots().unwrap(),
        [
            row("production", "echo", "b1"),
            row("production", "hello", "a1"),
            row("staging", "hello", "a2"),
        ]
    );
    // A swap: both pointers change in one step.
    store
        .apply(&change(vec![
            row("production", "hello", "a2"),
            row("staging", "hello", "a1"),
        ]))
        .unwrap();
    assert_eq!(store.slots().unwrap()[1], row("production", "hello", "a2"));

    // All or nothing: a change naming an unknown version changes nothing,
    // not even the pointers listed before it.
    let before = store.slots().unwrap();
    let history_before = store.history(100).unwrap().len();
    assert!(
        store
            .apply(&change(vec![
                row("production", "hello", "a1"),
                row("production", "echo", "nope"),
            ]))
            .is_err()
    );
    assert!(
        store
            .apply(&change(vec![row("production", "echo", "a1")]))
            .is_err(),
        "a version of another function"
    );
    assert_eq!(store.slots().unwrap(), before);
    assert_eq!(store.history(100).unwrap().len(), history_before);

    // A version a slot points to is kept; others can go.
    assert!(!store.delete_version("a1").unwrap());
    store
        .apply(&Change {
            delete_slots: vec!["staging".into()],
            ..change(vec![])
        })
        .unwrap();
    assert!(store.delete_version("a1").unwrap());
    assert_eq!(store.version("a1").unwrap(), None);
    assert_eq!(&*store.version("b1").unwrap().unwrap().config, "config one");

    // The split.
    assert_eq!(store.split().unwrap(), None);
    store
        .apply(&Change {
            split: Some(Some("{\"slot\":\"staging\"}".into())),
            ..change(vec![])
        })
        .unwrap();
    assert_eq!(
        store.split().unwrap().as_deref(),
        Some("{\"slot\":\"staging\"}")
    );
    store
        .apply(&Change {
            split: Some(None),
            ..change(vec![])
        })
        .unwrap();
    assert_eq!(store.split().unwrap(), None);

    // Settings: replaced whole per slot and function, kept apart.
    assert!(store.settings().unwrap().is_empty());
    let settings = |slot: &str, env: &[(&str, &str)]| SettingsRow {
        slot: slot.into(),
        function: "hello".into(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    store
        .apply(&Change {
            settings: Some(settings("staging", &[("B", "2"), ("A", "1")])),
            ..change(vec![])
        })
        .unwrap();
    store
        .apply(&Change {
            settings: Some(settings("production", &[("A", "p")])),
            ..change(vec![])
        })
        .unwrap();
    store
        .apply(&Change {
            settings: Some(settings("staging", &[("A", "3")])),
            ..change(vec![])
        })
        .unwrap();
    assert_eq!(
        store.settings().unwrap(),
        [
            settings("production", &[("A", "p")]),
            settings("staging", &[("A", "3")])
        ]
    );
    store
        .apply(&Change {
            settings: Some(settings("staging", &[])),
            ..change(vec![])
        })
        .unwrap();
    assert_eq!(
        store.settings().unwrap(),
        [settings("production", &[("A", "p")])]
    );

    // History: every applied change, newest first.
    let history = store.history(100).unwrap();
    assert_eq!(history.len(), 10);
    assert!(history.windows(2).all(|w| w[0].seq > w[1].seq));
    assert_eq!(history[0].who, "test");
    assert_eq!(store.history(2).unwrap().len(), 2);

    // Meta.
    assert_eq!(store.meta("k").unwrap(), None);
    store.set_meta("k", "1").unwrap();
    store.set_meta("k", "2").unwrap();
    assert_eq!(store.meta("k").unwrap().as_deref(), Some("2"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_store_conforms() {
        conformance(&mut SqliteStore::in_memory().unwrap());
    }

    #[test]
    fn sqlite_store_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = SqliteStore::path_in(dir.path());
        let mut store = SqliteStore::open(&path).unwrap();
        conformance(&mut store);
        drop(store);
        let mut again = SqliteStore::open(&path).unwrap();
        assert_eq!(again.slots().unwrap().len(), 2);
        assert_eq!(again.history(100).unwrap().len(), 10);
        assert_eq!(again.settings().unwrap().len(), 1);
    }
}
