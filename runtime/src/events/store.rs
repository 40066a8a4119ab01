//! The event store: durable queues (lease, renew, retry, poison), timer
//! status, blob receipts and the blob outbox, behind [`EventStore`]; the
//! SQLite implementation lives in the ledger's database and writes through
//! its group commit, so [`EventStore::settle`] commits an invocation's
//! record and effects in one transaction. [`conformance`] is what any
//! backend must pass. The SQL is kept portable (no SQLite-only types; the
//! lease's `UPDATE ... RETURNING` is the one statement a Postgres backend
//! writes with `FOR UPDATE SKIP LOCKED`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};

use super::{
    Effects, Message, MessageFate, OutboxBlob, OutboxEntry, Publish, QueueStats, Receipt,
    ReceiptState, TimerStatus, micros, now_us,
};
use crate::commit::GroupCommit;
use crate::metering::{Durable, InvocationRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("event store: {0}")]
    Failed(String),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Failed(e.to_string())
    }
}

impl From<String> for StoreError {
    fn from(e: String) -> Self {
        StoreError::Failed(e)
    }
}

/// Set by [`EventStore::settle`] once committed: whether the effects'
/// outputs were published (the triggering message's lease was still held).
pub type Published = Arc<AtomicBool>;

#[async_trait::async_trait]
pub trait EventStore: Send + Sync {
    /// Adds messages to `queue`, durably; their ids, in order.
    async fn enqueue(&self, queue: &str, bodies: Vec<Bytes>) -> Result<Vec<String>, StoreError>;
    /// Leases up to `max` visible messages of `queue`, oldest first, for
    /// `lease`; each lease counts as an attempt (the dequeue count is
    /// durable before the message is handed out).
    async fn lease(
        &self,
        queue: &str,
        max: u32,
        lease: Duration,
    ) -> Result<Vec<Message>, StoreError>;
    /// Extends held leases (`(id, lease)`) to `lease` from now.
    async fn renew(&self, held: Vec<(String, String)>, lease: Duration) -> Result<(), StoreError>;
    /// Makes every leased message visible again (on one node, at start:
    /// nothing runs yet, so no lease is held). Dequeue counts stay.
    async fn release_all(&self) -> Result<u64, StoreError>;
    /// When the next message of `queue` that is not visible now becomes
    /// visible (a retry's backoff, a lease's end).
    async fn next_visible(&self, queue: &str) -> Result<Option<i64>, StoreError>;
    /// Up to `max` messages of `queue` in lease order, without leasing them.
    async fn peek(&self, queue: &str, max: u32) -> Result<Vec<Message>, StoreError>;
    /// Every queue with at least one message.
    async fn stats(&self) -> Result<Vec<QueueStats>, StoreError>;
    /// Moves one message (or all) from `<queue>-poison` back to `queue`,
    /// with its dequeue count reset; how many moved.
    async fn requeue(&self, queue: &str, poison: &str, id: Option<&str>)
    -> Result<u64, StoreError>;
    async fn timer(&self, function: &str) -> Result<Option<TimerStatus>, StoreError>;
    /// Every receipt of `function`.
    async fn receipts(&self, function: &str) -> Result<Vec<Receipt>, StoreError>;
    /// Blobs committed as outputs and not yet written.
    async fn outbox(&self) -> Result<Vec<OutboxBlob>, StoreError>;
    async fn outbox_done(&self, ids: Vec<String>) -> Result<(), StoreError>;
    /// A failed write of an outbox blob: retried from `retry_at_us`, or
    /// with `None` given up on (failed, kept until retried by hand).
    async fn outbox_attempt(
        &self,
        id: &str,
        error: String,
        retry_at_us: Option<i64>,
    ) -> Result<(), StoreError>;
    /// Every outbox entry, oldest first (at most `limit`).
    async fn outbox_entries(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Makes failed entries (those of `ids`, or all) pending again, due
    /// now; how many.
    async fn outbox_retry(&self, ids: Option<Vec<String>>) -> Result<u64, StoreError>;
    /// Commits an invocation's record (if given) with its effects in one
    /// transaction. Submitted at once (a sink's own copy of the record,
    /// submitted after, is then a no-op); the [`Durable`] resolves when it
    /// is committed, and [`Published`] then says whether the outputs were
    /// published.
    fn settle(&self, record: Option<InvocationRecord>, effects: Effects) -> (Durable, Published);
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS queue_messages (
    id            TEXT PRIMARY KEY,
    queue         TEXT NOT NULL,
    body          BLOB NOT NULL,
    inserted_us   INTEGER NOT NULL,
    visible_us    INTEGER NOT NULL,
    dequeue_count INTEGER NOT NULL,
    lease         TEXT
);
CREATE INDEX IF NOT EXISTS queue_messages_ready ON queue_messages (queue, visible_us, id);
CREATE TABLE IF NOT EXISTS timer_status (
    function   TEXT PRIMARY KEY,
    last_us    INTEGER,
    next_us    INTEGER NOT NULL,
    updated_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS blob_receipts (
    function   TEXT NOT NULL,
    path       TEXT NOT NULL,
    etag       TEXT NOT NULL,
    state      TEXT NOT NULL,
    attempts   INTEGER NOT NULL,
    updated_us INTEGER NOT NULL,
    stamp      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (function, path, etag)
);
CREATE TABLE IF NOT EXISTS blob_outbox (
    id         TEXT PRIMARY KEY,
    path       TEXT NOT NULL,
    body       BLOB NOT NULL,
    created_us INTEGER NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    next_us    INTEGER NOT NULL DEFAULT 0,
    failed     INTEGER NOT NULL DEFAULT 0,
    error      TEXT
);
";

/// The SQLite event store, in the ledger's database.
pub struct SqliteEvents {
    writer: Arc<GroupCommit>,
    reader: Mutex<Connection>,
    /// Whether `settle` writes the record too (not with `--no-ledger`).
    records: bool,
}

impl SqliteEvents {
    /// Creates the tables through `writer` (the ledger's) and opens a
    /// reader on `path`, the same database.
    pub async fn open(
        path: &Path,
        writer: Arc<GroupCommit>,
        records: bool,
    ) -> Result<SqliteEvents, StoreError> {
        writer
            .run(|tx| {
                tx.execute_batch(SCHEMA)?;
                migrate(tx)
            })
            .await
            .map_err(StoreError::Failed)?;
        let reader = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        reader.busy_timeout(Duration::from_secs(5))?;
        Ok(SqliteEvents {
            writer,
            reader: Mutex::new(reader),
            records,
        })
    }

    /// Runs a read on the reader connection, off the async threads.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        // The reader is behind a mutex; reads are short, so a blocking
        // section (which needs the multi-threaded runtime) is cheaper than
        // a pool.
        let conn = &self.reader;
        tokio::task::block_in_place(|| {
            let conn = conn.lock().expect("reader lock");
            f(&conn).map_err(StoreError::from)
        })
    }
}

/// Brings tables written by an older Kelvin up to this schema.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let has_stamp = conn
        .prepare("SELECT name FROM pragma_table_info('blob_receipts')")?
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .any(|c| c == "stamp");
    if !has_stamp {
        conn.execute_batch("ALTER TABLE blob_receipts ADD COLUMN stamp TEXT NOT NULL DEFAULT ''")?;
    }
    let has_attempts = conn
        .prepare("SELECT name FROM pragma_table_info('blob_outbox')")?
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .any(|c| c == "attempts");
    if !has_attempts {
        conn.execute_batch(
            "ALTER TABLE blob_outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE blob_outbox ADD COLUMN next_us INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE blob_outbox ADD COLUMN failed INTEGER NOT NULL DEFAULT 0;
             ALTER TABLE blob_outbox ADD COLUMN error TEXT;",
        )?;
    }
    Ok(())
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn message_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        id: row.get(0)?,
        queue: row.get(1)?,
        body: Bytes::from(row.get::<_, Vec<u8>>(2)?),
        inserted_us: row.get(3)?,
        dequeue_count: row.get::<_, i64>(4)? as u32,
        lease: row.get::<_, Option<String>>(5)?.unwrap_or_default(),
        visible_us: row.get(6)?,
    })
}

const MESSAGE_COLUMNS: &str = "id, queue, body, inserted_us, dequeue_count, lease, visible_us";

fn insert_message(
    tx: &Transaction<'_>,
    id: &str,
    queue: &str,
    body: &[u8],
    now: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO queue_messages (id, queue, body, inserted_us, visible_us, dequeue_count, lease)
         VALUES (?1, ?2, ?3, ?4, ?4, 0, NULL)",
    )?
    .execute(params![id, queue, body, now])?;
    Ok(())
}

/// Applies `effects` inside `tx`; whether the outputs were published.
fn apply(tx: &Transaction<'_>, effects: &Effects) -> rusqlite::Result<bool> {
    let now = now_us();
    let held = match &effects.message {
        None => true,
        Some(MessageFate::Complete { id, lease }) => {
            tx.prepare_cached("DELETE FROM queue_messages WHERE id = ?1 AND lease = ?2")?
                .execute(params![id, lease])?
                == 1
        }
        Some(MessageFate::Retry { id, lease, after }) => {
            tx.prepare_cached(
                "UPDATE queue_messages SET lease = NULL, visible_us = ?3 WHERE id = ?1 AND lease = ?2",
            )?
            .execute(params![id, lease, now + micros(*after)])?;
            false
        }
        Some(MessageFate::Poison { id, lease, to }) => {
            tx.prepare_cached(
                "UPDATE queue_messages SET queue = ?3, lease = NULL, visible_us = ?4, dequeue_count = 0
                 WHERE id = ?1 AND lease = ?2",
            )?
            .execute(params![id, lease, to, now])?;
            false
        }
        Some(MessageFate::Release { id, lease }) => {
            tx.prepare_cached(
                "UPDATE queue_messages SET lease = NULL, visible_us = ?3,
                 dequeue_count = CASE WHEN dequeue_count > 0 THEN dequeue_count - 1 ELSE 0 END
                 WHERE id = ?1 AND lease = ?2",
            )?
            .execute(params![id, lease, now])?;
            false
        }
    };
    if held {
        for p in &effects.publish {
            match p {
                Publish::Message { queue, body } => {
                    insert_message(tx, &new_id(), queue, body, now)?
                }
                Publish::Blob { path, body } => {
                    tx.prepare_cached(
                        "INSERT INTO blob_outbox (id, path, body, created_us) VALUES (?1, ?2, ?3, ?4)",
                    )?
                    .execute(params![new_id(), path, body.as_ref(), now])?;
                }
                // The same database: the durable store's own statements,
                // so the start (event, signal) commits with the record.
                Publish::Durable(o) => crate::durable::store::apply_output(tx, o, now)?,
            }
        }
    }
    if let Some((function, status)) = &effects.timer {
        tx.prepare_cached(
            "INSERT INTO timer_status (function, last_us, next_us, updated_us) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (function) DO UPDATE SET last_us = excluded.last_us,
             next_us = excluded.next_us, updated_us = excluded.updated_us",
        )?
        .execute(params![function, status.last_us, status.next_us, now])?;
    }
    if let Some(r) = &effects.receipt {
        // One receipt per path: its latest version's. An earlier version's
        // bytes written again are a new write, processed again.
        tx.prepare_cached(
            "DELETE FROM blob_receipts WHERE function = ?1 AND path = ?2 AND etag <> ?3",
        )?
        .execute(params![r.function, r.path, r.etag])?;
        tx.prepare_cached(
            "INSERT INTO blob_receipts (function, path, etag, state, attempts, updated_us, stamp)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (function, path, etag) DO UPDATE SET state = excluded.state,
             attempts = excluded.attempts, updated_us = excluded.updated_us,
             stamp = excluded.stamp",
        )?
        .execute(params![
            r.function,
            r.path,
            r.etag,
            r.state.as_str(),
            r.attempts,
            now,
            r.stamp
        ])?;
    }
    Ok(held)
}

#[async_trait::async_trait]
impl EventStore for SqliteEvents {
    async fn enqueue(&self, queue: &str, bodies: Vec<Bytes>) -> Result<Vec<String>, StoreError> {
        let queue = queue.to_owned();
        let ids: Vec<String> = bodies.iter().map(|_| new_id()).collect();
        let written = ids.clone();
        self.writer
            .run(move |tx| {
                let now = now_us();
                for (id, body) in written.iter().zip(&bodies) {
                    insert_message(tx, id, &queue, body, now)?;
                }
                Ok(())
            })
            .await?;
        Ok(ids)
    }

    async fn lease(
        &self,
        queue: &str,
        max: u32,
        lease: Duration,
    ) -> Result<Vec<Message>, StoreError> {
        let queue = queue.to_owned();
        let lease_us = micros(lease);
        Ok(self
            .writer
            .run(move |tx| {
                let now = now_us();
                let token = new_id();
                let mut stmt = tx.prepare_cached(&format!(
                    "UPDATE queue_messages SET lease = ?1, visible_us = ?2, dequeue_count = dequeue_count + 1
                     WHERE id IN (SELECT id FROM queue_messages WHERE queue = ?3 AND visible_us <= ?4
                                  ORDER BY visible_us, id LIMIT ?5)
                     RETURNING {MESSAGE_COLUMNS}"
                ))?;
                let rows = stmt.query_map(
                    params![token, now + lease_us, queue, now, max],
                    message_from_row,
                )?;
                let mut out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
                out.sort_by(|a, b| a.id.cmp(&b.id));
                Ok(out)
            })
            .await?)
    }

    async fn renew(&self, held: Vec<(String, String)>, lease: Duration) -> Result<(), StoreError> {
        let lease_us = micros(lease);
        self.writer
            .run(move |tx| {
                let until = now_us() + lease_us;
                let mut stmt = tx.prepare_cached(
                    "UPDATE queue_messages SET visible_us = ?3 WHERE id = ?1 AND lease = ?2",
                )?;
                for (id, lease) in &held {
                    stmt.execute(params![id, lease, until])?;
                }
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn release_all(&self) -> Result<u64, StoreError> {
        Ok(self
            .writer
            .run(|tx| {
                Ok(tx.execute(
                    "UPDATE queue_messages SET lease = NULL, visible_us = ?1 WHERE lease IS NOT NULL",
                    [now_us()],
                )? as u64)
            })
            .await?)
    }

    async fn next_visible(&self, queue: &str) -> Result<Option<i64>, StoreError> {
        let queue = queue.to_owned();
        self.read(move |c| {
            c.query_row(
                "SELECT MIN(visible_us) FROM queue_messages WHERE queue = ?1 AND visible_us > ?2",
                params![queue, now_us()],
                |row| row.get(0),
            )
        })
        .await
    }

    async fn peek(&self, queue: &str, max: u32) -> Result<Vec<Message>, StoreError> {
        let queue = queue.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {MESSAGE_COLUMNS} FROM queue_messages WHERE queue = ?1
                 ORDER BY visible_us, id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![queue, max], message_from_row)?;
            let mut out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
            for m in &mut out {
                // A peek holds no lease; whether one is held is `leased`.
                if !m.lease.is_empty() && m.visible_us <= now_us() {
                    m.lease.clear();
                }
            }
            Ok(out)
        })
        .await
    }

    async fn stats(&self) -> Result<Vec<QueueStats>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT queue, COUNT(*),
                        SUM(CASE WHEN lease IS NOT NULL AND visible_us > ?1 THEN 1 ELSE 0 END),
                        MIN(inserted_us)
                 FROM queue_messages GROUP BY queue ORDER BY queue",
            )?;
            let rows = stmt.query_map([now_us()], |row| {
                Ok(QueueStats {
                    name: row.get(0)?,
                    depth: row.get::<_, i64>(1)? as u64,
                    leased: row.get::<_, i64>(2)? as u64,
                    oldest_us: row.get(3)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn requeue(
        &self,
        queue: &str,
        poison: &str,
        id: Option<&str>,
    ) -> Result<u64, StoreError> {
        let (queue, poison, id) = (queue.to_owned(), poison.to_owned(), id.map(str::to_owned));
        Ok(self
            .writer
            .run(move |tx| {
                Ok(tx.execute(
                    "UPDATE queue_messages SET queue = ?1, dequeue_count = 0, lease = NULL, visible_us = ?3
                     WHERE queue = ?2 AND (?4 IS NULL OR id = ?4)",
                    params![queue, poison, now_us(), id],
                )? as u64)
            })
            .await?)
    }

    async fn timer(&self, function: &str) -> Result<Option<TimerStatus>, StoreError> {
        let function = function.to_owned();
        self.read(move |c| {
            c.query_row(
                "SELECT last_us, next_us FROM timer_status WHERE function = ?1",
                [function],
                |row| {
                    Ok(TimerStatus {
                        last_us: row.get(0)?,
                        next_us: row.get(1)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn receipts(&self, function: &str) -> Result<Vec<Receipt>, StoreError> {
        let function = function.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT function, path, etag, state, attempts, updated_us, stamp
                 FROM blob_receipts WHERE function = ?1",
            )?;
            let rows = stmt.query_map([function], |row| {
                Ok(Receipt {
                    function: row.get(0)?,
                    path: row.get(1)?,
                    etag: row.get(2)?,
                    state: ReceiptState::parse(&row.get::<_, String>(3)?),
                    attempts: row.get::<_, i64>(4)? as u32,
                    updated_us: row.get(5)?,
                    stamp: row.get(6)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn outbox(&self) -> Result<Vec<OutboxBlob>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                   "SELECT id, path, body, attempts FROM blob_outbox WHERE failed = 0 AND next_us <= ?1
                 ORDER BY created_us, id LIMIT 64",
            )?;
            let rows = stmt.query_map([now_us()], |row| {
                Ok(OutboxBlob {
                    id: row.get(0)?,
                    path: row.get(1)?,
                    body: Bytes::from(row.get::<_, Vec<u8>>(2)?),
                    attempts: row.get::<_, i64>(3)? as u32,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn outbox_done(&self, ids: Vec<String>) -> Result<(), StoreError> {
        self.writer
            .run(move |tx| {
                let mut stmt = tx.prepare_cached("DELETE FROM blob_outbox WHERE id = ?1")?;
                for id in &ids {
                    stmt.execute([id])?;
                }
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn outbox_attempt(
        &self,
        id: &str,
        error: String,
        retry_at_us: Option<i64>,
    ) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.writer
            .run(move |tx| {
                tx.prepare_cached(
                    "UPDATE blob_outbox SET attempts = attempts + 1, error = ?2,
                     next_us = COALESCE(?3, next_us), failed = (?3 IS NULL) WHERE id = ?1",
                )?
                .execute(params![id, error, retry_at_us])?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn outbox_entries(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, path, length(body), attempts, failed, error, created_us FROM blob_outbox
                 ORDER BY created_us, id LIMIT ?1",
            )?;
            let rows = stmt.query_map([limit as i64], |row| {
                Ok(OutboxEntry {
                    id: row.get(0)?,
                    path: row.get(1)?,
                    size: row.get::<_, i64>(2)? as u64,
                    attempts: row.get::<_, i64>(3)? as u32,
                    state: if row.get::<_, i64>(4)? != 0 {
                        "failed"
                    } else {
                        "pending"
                    },
                    error: row.get(5)?,
                    created_us: row.get(6)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn outbox_retry(&self, ids: Option<Vec<String>>) -> Result<u64, StoreError> {
        let n = self
            .writer
            .run(move |tx| {
                let reset = "UPDATE blob_outbox SET failed = 0, attempts = 0, next_us = 0";
                Ok(match &ids {
                    None => tx.execute(&format!("{reset} WHERE failed = 1"), [])? as u64,
                    Some(ids) => {
                        let mut stmt =
                            tx.prepare_cached(&format!("{reset} WHERE failed = 1 AND id = ?1"))?;
                        let mut n = 0;
                        for id in ids {
                            n += stmt.execute([id])? as u64;
                        }
                        n
                    }
                })
            })
            .await?;
        Ok(n)
    }

    fn settle(&self, record: Option<InvocationRecord>, effects: Effects) -> (Durable, Published) {
        let published: Published = Arc::new(AtomicBool::new(false));
        let flag = published.clone();
        let record = record.filter(|_| self.records);
        let durable = self.writer.submit(Box::new(move |tx| {
            if let Some(r) = &record {
                crate::ledger::insert_record(tx, r)?;
            }
            let held = apply(tx, &effects)?;
            flag.store(held && !effects.publish.is_empty(), Ordering::SeqCst);
            Ok(())
        }));
        (durable, published)
    }
}

/// The behaviour every [`EventStore`] must have: run against a fresh store.
pub async fn conformance(store: &dyn EventStore) {
    let long = Duration::from_secs(60);
    // Enqueue, lease in order, the dequeue count counts leases.
    let ids = store
        .enqueue(
            "orders",
            vec![Bytes::from("a"), Bytes::from("b"), Bytes::from("c")],
        )
        .await
        .unwrap();
    assert_eq!(ids.len(), 3);
    let first = store.lease("orders", 2, long).await.unwrap();
    assert_eq!(
        first.iter().map(|m| m.body.clone()).collect::<Vec<_>>(),
        vec![Bytes::from("a"), Bytes::from("b")]
    );
    assert!(
        first
            .iter()
            .all(|m| m.dequeue_count == 1 && !m.lease.is_empty())
    );
    assert_eq!(first[0].id, ids[0]);
    // Leased messages are hidden; the third is not.
    let second = store.lease("orders", 10, long).await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].body, Bytes::from("c"));
    assert!(store.lease("orders", 10, long).await.unwrap().is_empty());
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!((stats[0].depth, stats[0].leased), (3, 3));

    // Complete publishes outputs in the same commit; a lost lease does not.
    let (durable, published) = store.settle(
        None,
        Effects {
            message: Some(MessageFate::Complete {
                id: first[0].id.clone(),
                lease: first[0].lease.clone(),
            }),
            publish: vec![
                Publish::Message {
                    queue: "done".into(),
                    body: Bytes::from("A"),
                },
                Publish::Blob {
                    path: "out/a.txt".into(),
                    body: Bytes::from("blob"),
                },
            ],
            ..Effects::default()
        },
    );
    durable.wait().await.unwrap();
    assert!(published.load(Ordering::SeqCst));
    let (durable, published) = store.settle(
        None,
        Effects {
            message: Some(MessageFate::Complete {
                id: first[1].id.clone(),
                lease: "not-the-lease".into(),
            }),
            publish: vec![Publish::Message {
                queue: "done".into(),
                body: Bytes::from("B"),
            }],
            ..Effects::default()
        },
    );
    durable.wait().await.unwrap();
    assert!(!published.load(Ordering::SeqCst));
    let done = store.peek("done", 10).await.unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].body, Bytes::from("A"));
    let outbox = store.outbox().await.unwrap();
    assert_eq!(outbox.len(), 1);
    assert_eq!(
        (outbox[0].path.as_str(), outbox[0].body.as_ref()),
        ("out/a.txt", &b"blob"[..])
    );
    store.outbox_done(vec![outbox[0].id.clone()]).await.unwrap();
    assert!(store.outbox().await.unwrap().is_empty());

    // Retry: visible again after the backoff, with its count.
    let (durable, _) = store.settle(
        None,
        Effects {
            message: Some(MessageFate::Retry {
                id: first[1].id.clone(),
                lease: first[1].lease.clone(),
                after: Duration::from_millis(300),
            }),
            ..Effects::default()
        },
    );
    durable.wait().await.unwrap();
    assert!(store.lease("orders", 10, long).await.unwrap().is_empty());
    let next = store.next_visible("orders").await.unwrap().unwrap();
    assert!(next > now_us() - 1_000_000);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let again = store.lease("orders", 10, long).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].id.as_str(), again[0].dequeue_count),
        (first[1].id.as_str(), 2)
    );

    // Poison: moved, count reset; requeue moves it back.
    let (durable, _) = store.settle(
        None,
        Effects {
            message: Some(MessageFate::Poison {
                id: again[0].id.clone(),
                lease: again[0].lease.clone(),
                to: "orders-poison".into(),
            }),
            ..Effects::default()
        },
    );
    durable.wait().await.unwrap();
    let poison = store.peek("orders-poison", 10).await.unwrap();
    assert_eq!(poison.len(), 1);
    assert_eq!(poison[0].body, Bytes::from("b"));
    assert_eq!(
        store
            .requeue("orders", "orders-poison", Some(&poison[0].id))
            .await
            .unwrap(),
        1
    );
    assert!(store.peek("orders-poison", 10).await.unwrap().is_empty());
    let back = store.lease("orders", 10, long).await.unwrap();
    assert_eq!((back.len(), back[0].dequeue_count), (1, 1));

    // Release: not an attempt. release_all: every lease dropped, counts kept.
    let (durable, _) = store.settle(
        None,
        Effects {
            message: Some(MessageFate::Release {
                id: back[0].id.clone(),
                lease: back[0].lease.clone(),
            }),
            ..Effects::default()
        },
    );
    durable.wait().await.unwrap();
    assert_eq!(
        store.release_all().await.unwrap(),
        1,
        "`c` was still leased"
    );
    let all = store.lease("orders", 10, long).await.unwrap();
    let counts: Vec<(Bytes, u32)> = all
        .iter()
        .map(|m| (m.body.clone(), m.dequeue_count))
        .collect();
    assert_eq!(counts, vec![(Bytes::from("b"), 1), (Bytes::from("c"), 2)]);
    // Renewal keeps a lease past its first term.
    store
        .renew(
            all.iter()
                .map(|m| (m.id.clone(), m.lease.clone()))
                .collect(),
            long,
        )
        .await
        .unwrap();
    assert!(store.lease("orders", 10, long).await.unwrap().is_empty());

    // Timers and receipts.
    assert_eq!(store.timer("cleanup").await.unwrap(), None);
    let status = TimerStatus {
        last_us: Some(1),
        next_us: 2,
    };
    let receipt = Receipt {
        function: "thumbnail".into(),
        path: "images/a".into(),
        etag: "e1".into(),
        stamp: "s1".into(),
        state: ReceiptState::Failed,
        attempts: 1,
        updated_us: 0,
    };
    let (durable, _) = store.settle(
        None,
        Effects {
            timer: Some(("cleanup".into(), status)),
            receipt: Some(receipt.clone()),
            ..Effects::default()
        },
    );
    durable.wait().await.unwrap();
    assert_eq!(store.timer("cleanup").await.unwrap(), Some(status));
    let done = Receipt {
        state: ReceiptState::Done,
        attempts: 1,
        ..receipt.clone()
    };
    let (durable, _) = store.settle(
        None,
        Effects {
            receipt: Some(done.clone()),
            ..Effects::default()
        },
    );
    durable.wait().await.unwrap();
    let got = store.receipts("thumbnail").await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].state, got[0].attempts), (ReceiptState::Done, 1));
    assert_eq!(got[0].stamp, "s1");
    assert!(store.receipts("other").await.unwrap().is_empty());
    // A path keeps one receipt: its latest version's.
    let (durable, _) = store.settle(
        None,
        Effects {
            receipt: Some(Receipt {
                etag: "e2".into(),
                stamp: "s2".into(),
                ..done.clone()
            }),
            ..Effects::default()
        },
    );
    durable.wait().await.unwrap();
    let got = store.receipts("thumbnail").await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].etag.as_str(), got[0].stamp.as_str()), ("e2", "s2"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite3");
        let ledger = crate::ledger::Ledger::open(&path).unwrap();
        let store = SqliteEvents::open(&path, ledger.writer(), true)
            .await
            .unwrap();
        conformance(&store).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_and_its_effects_commit_together() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite3");
        let ledger = crate::ledger::Ledger::open(&path).unwrap();
        let store = SqliteEvents::open(&path, ledger.writer(), true)
            .await
            .unwrap();
        store.enqueue("q", vec![Bytes::from("x")]).await.unwrap();
        let m = store
            .lease("q", 1, Duration::from_secs(60))
            .await
            .unwrap()
            .remove(0);
        let mut record = crate::ledger::tests_support::record("inv-1");
        record.trigger = "queue".into();
        let (durable, published) = store.settle(
            Some(record),
            Effects {
                message: Some(MessageFate::Complete {
                    id: m.id,
                    lease: m.lease,
                }),
                publish: vec![Publish::Message {
                    queue: "out".into(),
                    body: Bytes::from("y"),
                }],
                ..Effects::default()
            },
        );
        durable.wait().await.unwrap();
        assert!(published.load(Ordering::SeqCst));
        let reader = crate::ledger::LedgerReader::open(&path).unwrap();
        assert_eq!(reader.count("inv-1").unwrap(), 1);
        assert!(store.peek("q", 1).await.unwrap().is_empty());
        assert_eq!(store.peek("out", 1).await.unwrap().len(), 1);
    }
}
