//! The durable store: instances, their histories, inboxes (completions,
//! events, timers as messages visible later, entity operations), activity
//! work items and entity state, behind [`DurableStore`]. The SQLite
//! implementation lives in the ledger's database and writes through its
//! group commit, so an episode's decisions commit in one transaction with
//! the messages it consumed and its invocation record. [`conformance`] is
//! what any backend must pass; the SQL is portable.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};
use serde_json::Value;

use super::episode::NewMessage;
use super::{
    HistoryEvent, InboxItem, Instance, Message, Parent, RaisedEvents, Retry, RuntimeStatus,
    WorkItem,
};
use crate::commit::GroupCommit;
use crate::events::now_us;
use crate::metering::{Durable, InvocationRecord};

#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    #[error("an instance with id {0:?} exists and has not ended")]
    Conflict(String),
    #[error("durable store: {0}")]
    Failed(String),
}

impl From<rusqlite::Error> for DurableError {
    fn from(e: rusqlite::Error) -> Self {
        DurableError::Failed(e.to_string())
    }
}

impl From<String> for DurableError {
    fn from(e: String) -> Self {
        DurableError::Failed(e)
    }
}

/// An instance to create (Pending, with its `ExecutionStarted` message).
#[derive(Debug, Clone, PartialEq)]
pub struct NewInstance {
    pub id: String,
    pub name: String,
    pub version: String,
    pub input: Value,
    pub parent: Option<Parent>,
}

/// An instance just created, and its start message.
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    pub instance: Instance,
    pub start: InboxItem,
}

/// What an episode changes in an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceChange {
    pub id: String,
    pub status: RuntimeStatus,
    /// Set when it ended (the output, the error, the reason).
    pub output: Option<Value>,
    pub custom_status: Option<Value>,
    pub append: Vec<HistoryEvent>,
    /// The history's length before `append`.
    pub from_seq: u64,
    /// Continue as new: the history is dropped, and this is the new
    /// generation and input.
    pub restart: Option<(u32, Value)>,
    /// The version it is pinned to, for an instance started without one
    /// (by an output binding): its first episode's.
    pub pin: Option<String>,
}

/// Everything one step of durable work changes, in one transaction.
#[derive(Debug, Clone, Default)]
pub struct Commit {
    /// Inbox messages handled (deleted). If one of them is gone, another
    /// step consumed it first, and nothing of this commit applies (but the
    /// record): the step acted on a message twice.
    pub consumed: Vec<String>,
    pub instance: Option<InstanceChange>,
    /// Instances to create; one whose id is taken by an instance that has
    /// not ended fails its parent's task instead.
    pub create: Vec<NewInstance>,
    pub messages: Vec<NewMessage>,
    pub work: Vec<WorkItem>,
    /// An activity's work item done (deleted).
    pub work_done: Option<String>,
    /// An activity's work item to retry: `(id, attempts so far, when)`.
    pub work_retry: Option<(String, u32, i64)>,
    /// An entity's new state (`None` deletes it).
    pub entity: Option<(String, Option<Value>)>,
    /// The instance the committed invocation record worked for.
    pub instance_of_record: Option<String>,
    /// Set once the commit applied: not for an activity's result whose
    /// work item was gone, nor for a step whose consumed messages were.
    pub inserted: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// Which instances a list or a purge is about.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    pub statuses: Vec<RuntimeStatus>,
    pub created_from_us: Option<i64>,
    pub created_to_us: Option<i64>,
    pub id_prefix: Option<String>,
    pub top: Option<u32>,
}

#[async_trait::async_trait]
pub trait DurableStore: Send + Sync {
    /// Creates an instance; an ended one with the same id is replaced.
    /// Returns it as stored and the message that starts it, so its first
    /// step needs not read them back.
    async fn create(&self, new: NewInstance) -> Result<Created, DurableError>;
    async fn instance(&self, id: &str) -> Result<Option<Instance>, DurableError>;
    async fn history(&self, id: &str) -> Result<Vec<HistoryEvent>, DurableError>;
    /// The messages of `target` visible at `now`, in order.
    async fn inbox(&self, target: &str, now: i64) -> Result<Vec<InboxItem>, DurableError>;
    /// What became visible in `(after, now]`: inbox targets and work items.
    async fn due(&self, after: i64, now: i64)
    -> Result<(Vec<String>, Vec<WorkItem>), DurableError>;
    /// When the next message or work item visible after `now` is.
    async fn next_due(&self, now: i64) -> Result<Option<i64>, DurableError>;
    /// Puts messages in inboxes (events raised, commands, signals).
    async fn send(&self, messages: Vec<NewMessage>) -> Result<(), DurableError>;
    /// The raised events `id` holds in its generation, in its history and
    /// its inbox, read at one instant (a step moving one from the inbox to
    /// the history is counted once).
    async fn raised(&self, id: &str) -> Result<RaisedEvents, DurableError>;
    /// Instances matching `filter`, newest first.
    async fn list(&self, filter: Filter) -> Result<Vec<Instance>, DurableError>;
    /// Deletes ended instances matching `filter` (or the one `id`), with
    /// their history and messages; how many.
    async fn purge(&self, id: Option<String>, filter: Filter) -> Result<u64, DurableError>;
    async fn entity(&self, id: &str) -> Result<Option<Value>, DurableError>;
    /// The versions instances that have not ended are pinned to.
    async fn live_versions(&self) -> Result<Vec<String>, DurableError>;
    /// Commits `commit` with `record` (if given) in one transaction.
    fn commit(&self, record: Option<InvocationRecord>, commit: Commit) -> Durable;
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS durable_instances (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    version       TEXT NOT NULL,
    status        TEXT NOT NULL,
    input         TEXT NOT NULL,
    output        TEXT NOT NULL,
    custom_status TEXT NOT NULL,
    created_us    INTEGER NOT NULL,
    updated_us    INTEGER NOT NULL,
    generation    INTEGER NOT NULL,
    parent        TEXT
);
CREATE INDEX IF NOT EXISTS durable_instances_created ON durable_instances (created_us);
CREATE INDEX IF NOT EXISTS durable_instances_status ON durable_instances (status, created_us);
CREATE TABLE IF NOT EXISTS durable_history (
    instance_id TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    event       TEXT NOT NULL,
    PRIMARY KEY (instance_id, seq)
);
CREATE TABLE IF NOT EXISTS durable_inbox (
    id         TEXT PRIMARY KEY,
    target     TEXT NOT NULL,
    generation INTEGER,
    message    TEXT NOT NULL,
    visible_us INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS durable_inbox_target ON durable_inbox (target, visible_us, id);
CREATE INDEX IF NOT EXISTS durable_inbox_visible ON durable_inbox (visible_us);
CREATE TABLE IF NOT EXISTS durable_work (
    id          TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    generation  INTEGER NOT NULL,
    task_id     INTEGER NOT NULL,
    name        TEXT NOT NULL,
    input       TEXT NOT NULL,
    attempts    INTEGER NOT NULL,
    retry       TEXT NOT NULL,
    visible_us  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS durable_work_visible ON durable_work (visible_us);
CREATE TABLE IF NOT EXISTS durable_entities (
    id         TEXT PRIMARY KEY,
    state      TEXT NOT NULL,
    updated_us INTEGER NOT NULL
);
";

/// The SQLite durable store, in the ledger's database.
pub struct SqliteDurable {
    writer: Arc<GroupCommit>,
    /// One per core: steps read their inbox concurrently.
    readers: Vec<Mutex<Connection>>,
    /// Whether `commit` writes the record too (not with `--no-ledger`).
    records: bool,
}

impl SqliteDurable {
    /// Creates the tables through `writer` (the ledger's) and opens a
    /// reader on `path`, the same database.
    pub async fn open(
        path: &Path,
        writer: Arc<GroupCommit>,
        records: bool,
    ) -> Result<SqliteDurable, DurableError> {
        writer.run(|tx| tx.execute_batch(SCHEMA)).await?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
        let mut readers = Vec::with_capacity(cores);
        for _ in 0..cores {
            let reader = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?;
            reader.busy_timeout(Duration::from_secs(5))?;
            // Pages mapped, not read(): every commit of the writer would
            // otherwise send the next read back to the kernel for pages.
            reader.pragma_update(None, "mmap_size", 256i64 << 20)?;
            readers.push(Mutex::new(reader));
        }
        Ok(SqliteDurable {
            writer,
            readers,
            records,
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, DurableError> {
        // A step's reads are a few indexed rows (tens of microseconds):
        // done in place on a free reader, cheaper than handing the thread's
        // other tasks away (`block_in_place`) or a hop to a pool.
        for r in &self.readers {
            if let Ok(conn) = r.try_lock() {
                return f(&conn).map_err(DurableError::from);
            }
        }
        let conn = self.readers[0].lock().expect("reader lock");
        f(&conn).map_err(DurableError::from)
    }
}

fn text(v: &Value) -> String {
    serde_json::to_string(v).expect("a JSON value serialises")
}

fn json_column(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or(Value::Null)
}

/// A stored JSON that no longer parses is a bug or a foreign write: an
/// error that names it, never a panic.
fn parse<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> rusqlite::Result<T> {
    serde_json::from_str(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("a stored {what} does not parse: {e}").into(),
        )
    })
}

const INSTANCE_COLUMNS: &str = "id, name, version, status, input, output, custom_status, created_us, updated_us, generation, parent";

fn instance_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Instance> {
    let parent: Option<String> = row.get(10)?;
    Ok(Instance {
        id: row.get(0)?,
        name: row.get(1)?,
        version: row.get(2)?,
        status: RuntimeStatus::parse(&row.get::<_, String>(3)?).unwrap_or(RuntimeStatus::Failed),
        input: json_column(&row.get::<_, String>(4)?),
        output: json_column(&row.get::<_, String>(5)?),
        custom_status: json_column(&row.get::<_, String>(6)?),
        created_us: row.get(7)?,
        updated_us: row.get(8)?,
        generation: row.get::<_, i64>(9)? as u32,
        parent: match parent {
            Some(p) => Some(parse(&p, "parent")?),
            None => None,
        },
    })
}

const WORK_COLUMNS: &str =
    "id, instance_id, generation, task_id, name, input, attempts, retry, visible_us";

fn work_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<WorkItem> {
    Ok(WorkItem {
        id: row.get(0)?,
        instance_id: row.get(1)?,
        generation: row.get::<_, i64>(2)? as u32,
        task_id: row.get::<_, i64>(3)? as u32,
        name: row.get(4)?,
        input: json_column(&row.get::<_, String>(5)?),
        attempts: row.get::<_, i64>(6)? as u32,
        retry: parse::<Retry>(&row.get::<_, String>(7)?, "retry")?,
        visible_us: row.get(8)?,
    })
}

fn insert_message(tx: &Transaction<'_>, m: &NewMessage, now: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO durable_inbox (id, target, generation, message, visible_us) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        m.id,
        m.target,
        m.generation,
        serde_json::to_string(&m.message).expect("a message serialises"),
        if m.visible_us == 0 { now } else { m.visible_us },
    ])?;
    Ok(())
}

/// The raised events `id` holds in its generation.
fn raised_held(tx: &Transaction<'_>, id: &str) -> rusqlite::Result<RaisedEvents> {
    let mut held = RaisedEvents::default();
    let mut stmt = tx.prepare_cached("SELECT event FROM durable_history WHERE instance_id = ?1")?;
    for event in stmt.query_map([id], |row| row.get::<_, String>(0))? {
        held.event(&parse::<HistoryEvent>(&event?, "history event")?);
    }
    let mut stmt = tx.prepare_cached("SELECT message FROM durable_inbox WHERE target = ?1")?;
    for message in stmt.query_map([id], |row| row.get::<_, String>(0))? {
        if let Message::Event { event } = parse::<Message>(&message?, "message")? {
            held.event(&event);
        }
    }
    Ok(held)
}

fn is_ended(tx: &Transaction<'_>, id: &str) -> rusqlite::Result<Option<bool>> {
    tx.prepare_cached("SELECT status FROM durable_instances WHERE id = ?1")?
        .query_row([id], |row| row.get::<_, String>(0))
        .optional()
        .map(|s| s.map(|s| RuntimeStatus::parse(&s).is_none_or(RuntimeStatus::ended)))
}

fn delete_instance(tx: &Transaction<'_>, id: &str) -> rusqlite::Result<()> {
    for sql in [
        "DELETE FROM durable_history WHERE instance_id = ?1",
        "DELETE FROM durable_inbox WHERE target = ?1",
        "DELETE FROM durable_work WHERE instance_id = ?1",
        "DELETE FROM durable_instances WHERE id = ?1",
    ] {
        tx.prepare_cached(sql)?.execute([id])?;
    }
    Ok(())
}

/// Creates `new` unless an instance with its id has not ended; the start
/// message if it did.
fn create(
    tx: &Transaction<'_>,
    new: &NewInstance,
    now: i64,
) -> rusqlite::Result<Option<NewMessage>> {
    match is_ended(tx, &new.id)? {
        Some(false) => return Ok(None),
        Some(true) => delete_instance(tx, &new.id)?,
        None => {}
    }
    tx.prepare_cached(&format!(
        "INSERT INTO durable_instances ({INSTANCE_COLUMNS}) VALUES (?1, ?2, ?3, 'Pending', ?4, 'null', 'null', ?5, ?5, 0, ?6)"
    ))?
    .execute(params![
        new.id,
        new.name,
        new.version,
        text(&new.input),
        now,
        new.parent
            .as_ref()
            .map(|p| serde_json::to_string(p).expect("a parent serialises")),
    ])?;
    let start = NewMessage::start(
        new.id.clone(),
        0,
        new.name.clone(),
        new.input.clone(),
        new.parent.clone(),
        now,
    );
    insert_message(tx, &start, now)?;
    Ok(Some(start))
}

/// Applies a function's durable output inside `tx` (another store's
/// transaction in the same database: the SQLite event store's). An
/// orchestration whose id runs already, or an event for an instance that
/// is gone or ended, is dropped with a warning: the function succeeded.
pub fn apply_output(
    tx: &Transaction<'_>,
    o: &super::DurableOutput,
    now: i64,
) -> rusqlite::Result<()> {
    use super::DurableOutput;
    match o {
        DurableOutput::Start {
            orchestration,
            instance_id,
            input,
        } => {
            let new = NewInstance {
                id: instance_id.clone(),
                name: orchestration.clone(),
                // Pinned by its first episode to the production version.
                version: String::new(),
                input: input.clone(),
                parent: None,
            };
            if create(tx, &new, now)?.is_none() {
                tracing::warn!(
                    instance = instance_id.as_str(),
                    "an output's orchestration was not started: an instance with its id runs"
                );
            }
        }
        DurableOutput::Raise {
            instance_id,
            event,
            input,
        } => {
            if is_ended(tx, instance_id)? != Some(false) {
                tracing::warn!(
                    instance = instance_id.as_str(),
                    event = event.as_str(),
                    "an output's event is dropped: no running instance has its id"
                );
                return Ok(());
            }
            let mut held = raised_held(tx, instance_id)?;
            held.add(input);
            if held.over() {
                tracing::warn!(
                    instance = instance_id.as_str(),
                    event = event.as_str(),
                    "an output's event is dropped: the instance holds as many raised events as one generation may (1,000 events, 4 MiB)"
                );
                return Ok(());
            }
            insert_message(
                tx,
                &NewMessage::event(
                    instance_id.clone(),
                    None,
                    HistoryEvent::EventRaised {
                        name: event.clone(),
                        input: input.clone(),
                    },
                    now,
                ),
                now,
            )?;
        }
        DurableOutput::Signal {
            entity,
            operation,
            input,
        } => insert_message(
            tx,
            &NewMessage::operation(entity.clone(), operation.clone(), input.clone(), None, now),
            now,
        )?,
    }
    Ok(())
}

fn apply(tx: &Transaction<'_>, c: &Commit) -> rusqlite::Result<()> {
    let now = now_us();
    // An activity's result counts only if its work item is still there: a
    // second run of it (at least once) or a run whose decision was never
    // committed finds none, and its result is dropped.
    if let Some(id) = &c.work_done
        && tx
            .prepare_cached("DELETE FROM durable_work WHERE id = ?1")?
            .execute([id])?
            == 0
    {
        return Ok(());
    }
    // A message can reach a step twice: read from the store while its
    // commit was being handed over in memory too. The second step to
    // consume it finds it gone; its decisions are a duplicate's and are
    // dropped (the dispatcher reads the instance back and steps again).
    for id in &c.consumed {
        if !tx
            .prepare_cached("SELECT 1 FROM durable_inbox WHERE id = ?1")?
            .exists([id])?
        {
            return Ok(());
        }
    }
    for id in &c.consumed {
        tx.prepare_cached("DELETE FROM durable_inbox WHERE id = ?1")?
            .execute([id])?;
    }
    if let Some(i) = &c.instance {
        let mut seq = i.from_seq as i64;
        if let Some((generation, input)) = &i.restart {
            tx.prepare_cached("DELETE FROM durable_history WHERE instance_id = ?1")?
                .execute([&i.id])?;
            tx.prepare_cached(
                "UPDATE durable_instances SET generation = ?2, input = ?3, output = 'null' WHERE id = ?1",
            )?
            .execute(params![i.id, generation, text(input)])?;
            seq = 0;
        } else {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO durable_history (instance_id, seq, event) VALUES (?1, ?2, ?3)",
            )?;
            for e in &i.append {
                stmt.execute(params![
                    i.id,
                    seq,
                    serde_json::to_string(e).expect("an event serialises")
                ])?;
                seq += 1;
            }
        }
        let _ = seq;
        tx.prepare_cached(
            "UPDATE durable_instances SET status = ?2, updated_us = ?3,
             output = COALESCE(?4, output), custom_status = COALESCE(?5, custom_status),
             version = COALESCE(?6, version)
             WHERE id = ?1",
        )?
        .execute(params![
            i.id,
            i.status.as_str(),
            now,
            i.output.as_ref().map(text),
            i.custom_status.as_ref().map(text),
            i.pin,
        ])?;
    }
    for new in &c.create {
        if create(tx, new, now)?.is_none()
            && let Some(p) = &new.parent
        {
            insert_message(
                tx,
                &NewMessage::event(
                    p.instance_id.clone(),
                    Some(p.generation),
                    HistoryEvent::SubOrchestrationFailed {
                        task_id: p.task_id,
                        error: DurableError::Conflict(new.id.clone()).to_string(),
                    },
                    now,
                ),
                now,
            )?;
        }
    }
    for m in &c.messages {
        insert_message(tx, m, now)?;
    }
    for w in &c.work {
        tx.prepare_cached(&format!(
            "INSERT INTO durable_work ({WORK_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
        ))?
        .execute(params![
            w.id,
            w.instance_id,
            w.generation,
            w.task_id,
            w.name,
            text(&w.input),
            w.attempts,
            serde_json::to_string(&w.retry).expect("retry options serialise"),
            w.visible_us,
        ])?;
    }
    if let Some((id, attempts, at)) = &c.work_retry {
        tx.prepare_cached("UPDATE durable_work SET attempts = ?2, visible_us = ?3 WHERE id = ?1")?
            .execute(params![id, attempts, at])?;
    }
    if let Some(flag) = &c.inserted {
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    match &c.entity {
        Some((id, Some(state))) => {
            tx.prepare_cached(
                "INSERT INTO durable_entities (id, state, updated_us) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET state = excluded.state, updated_us = excluded.updated_us",
            )?
            .execute(params![id, text(state), now])?;
        }
        Some((id, None)) => {
            tx.prepare_cached("DELETE FROM durable_entities WHERE id = ?1")?
                .execute([id])?;
        }
        None => {}
    }
    Ok(())
}

/// The `WHERE` clause and parameters of a filter (on ended instances only
/// when `ended`).
fn filter_sql(f: &Filter, ended: bool) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value as V;
    let mut clauses = vec!["1 = 1".to_owned()];
    let mut args: Vec<V> = Vec::new();
    let mut statuses: Vec<&str> = f.statuses.iter().map(|s| s.as_str()).collect();
    if ended {
        if statuses.is_empty() {
            statuses = vec!["Completed", "Failed", "Terminated"];
        }
        statuses.retain(|s| RuntimeStatus::parse(s).is_some_and(RuntimeStatus::ended));
        if statuses.is_empty() {
            clauses.push("1 = 0".into());
        }
    }
    if !statuses.is_empty() {
        let marks: Vec<String> = statuses
            .iter()
            .map(|s| {
                args.push(V::Text((*s).to_owned()));
                format!("?{}", args.len())
            })
            .collect();
        clauses.push(format!("status IN ({})", marks.join(", ")));
    }
    if let Some(from) = f.created_from_us {
        args.push(V::Integer(from));
        clauses.push(format!("created_us >= ?{}", args.len()));
    }
    if let Some(to) = f.created_to_us {
        args.push(V::Integer(to));
        clauses.push(format!("created_us <= ?{}", args.len()));
    }
    if let Some(prefix) = &f.id_prefix {
        args.push(V::Text(prefix.clone()));
        clauses.push(format!("substr(id, 1, length(?{0})) = ?{0}", args.len()));
    }
    (clauses.join(" AND "), args)
}

#[async_trait::async_trait]
impl DurableStore for SqliteDurable {
    async fn create(&self, new: NewInstance) -> Result<Created, DurableError> {
        let now = now_us();
        let instance = Instance {
            id: new.id.clone(),
            name: new.name.clone(),
            version: new.version.clone(),
            status: RuntimeStatus::Pending,
            input: new.input.clone(),
            output: Value::Null,
            custom_status: Value::Null,
            created_us: now,
            updated_us: now,
            generation: 0,
            parent: new.parent.clone(),
        };
        match self.writer.run(move |tx| create(tx, &new, now)).await? {
            Some(start) => Ok(Created {
                instance,
                start: start.into_item(),
            }),
            None => Err(DurableError::Conflict(instance.id)),
        }
    }

    async fn instance(&self, id: &str) -> Result<Option<Instance>, DurableError> {
        let id = id.to_owned();
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {INSTANCE_COLUMNS} FROM durable_instances WHERE id = ?1"
            ))?
            .query_row([id], instance_from_row)
            .optional()
        })
        .await
    }

    async fn history(&self, id: &str) -> Result<Vec<HistoryEvent>, DurableError> {
        let id = id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT event FROM durable_history WHERE instance_id = ?1 ORDER BY seq",
            )?;
            let rows = stmt.query_map([id], |row| row.get::<_, String>(0))?;
            rows.map(|r| parse(&r?, "history event")).collect()
        })
        .await
    }

    async fn inbox(&self, target: &str, now: i64) -> Result<Vec<InboxItem>, DurableError> {
        let target = target.to_owned();
        self.read(move |c| {
            // No bound on visible_us in SQL: a parameter in a range makes
            // SQLite (STAT4) re-prepare the statement at each new value, a
            // cost on every episode; the few future messages (timers) are
            // skipped here instead.
            let mut stmt = c.prepare_cached(
                "SELECT id, target, generation, message, visible_us FROM durable_inbox
                 WHERE target = ?1 ORDER BY visible_us, id",
            )?;
            let rows = stmt.query_map(params![target], |row| {
                let visible_us: i64 = row.get(4)?;
                if visible_us > now {
                    return Ok(None);
                }
                Ok(Some(InboxItem {
                    id: row.get(0)?,
                    target: row.get(1)?,
                    generation: row.get::<_, Option<i64>>(2)?.map(|g| g as u32),
                    message: parse(&row.get::<_, String>(3)?, "message")?,
                    visible_us,
                }))
            })?;
            rows.filter_map(Result::transpose).collect()
        })
        .await
    }

    async fn due(
        &self,
        after: i64,
        now: i64,
    ) -> Result<(Vec<String>, Vec<WorkItem>), DurableError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT DISTINCT target FROM durable_inbox WHERE visible_us > ?1 AND visible_us <= ?2",
            )?;
            let targets = stmt
                .query_map(params![after, now], |row| row.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {WORK_COLUMNS} FROM durable_work WHERE visible_us > ?1 AND visible_us <= ?2
                 ORDER BY visible_us, id"
            ))?;
            let work = stmt
                .query_map(params![after, now], work_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((targets, work))
        })
        .await
    }

    async fn next_due(&self, now: i64) -> Result<Option<i64>, DurableError> {
        self.read(move |c| {
            let inbox: Option<i64> = c
                .prepare_cached("SELECT MIN(visible_us) FROM durable_inbox WHERE visible_us > ?1")?
                .query_row([now], |row| row.get(0))?;
            let work: Option<i64> = c
                .prepare_cached("SELECT MIN(visible_us) FROM durable_work WHERE visible_us > ?1")?
                .query_row([now], |row| row.get(0))?;
            Ok(match (inbox, work) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            })
        })
        .await
    }

    async fn send(&self, messages: Vec<NewMessage>) -> Result<(), DurableError> {
        self.writer
            .run(move |tx| {
                let now = now_us();
                for m in &messages {
                    insert_message(tx, m, now)?;
                }
                Ok(())
            })
            .await?;
        Ok(())
    }

    async fn raised(&self, id: &str) -> Result<RaisedEvents, DurableError> {
        let id = id.to_owned();
        self.read(move |c| {
            // One read transaction: one snapshot of both tables.
            let tx = c.unchecked_transaction()?;
            raised_held(&tx, &id)
        })
        .await
    }

    async fn list(&self, filter: Filter) -> Result<Vec<Instance>, DurableError> {
        self.read(move |c| {
            let (clause, args) = filter_sql(&filter, false);
            let top = filter.top.map_or(i64::MAX, i64::from);
            let mut stmt = c.prepare(&format!(
                "SELECT {INSTANCE_COLUMNS} FROM durable_instances WHERE {clause}
                 ORDER BY created_us DESC, id DESC LIMIT {top}"
            ))?;
            let rows = stmt.query_map(rusqlite::params_from_iter(args), instance_from_row)?;
            rows.collect()
        })
        .await
    }

    async fn purge(&self, id: Option<String>, filter: Filter) -> Result<u64, DurableError> {
        Ok(self
            .writer
            .run(move |tx| {
                let ids: Vec<String> = match &id {
                    Some(id) => match is_ended(tx, id)? {
                        Some(true) => vec![id.clone()],
                        _ => Vec::new(),
                    },
                    None => {
                        let (clause, args) = filter_sql(&filter, true);
                        let mut stmt = tx
                            .prepare(&format!("SELECT id FROM durable_instances WHERE {clause}"))?;
                        stmt.query_map(rusqlite::params_from_iter(args), |row| row.get(0))?
                            .collect::<rusqlite::Result<Vec<String>>>()?
                    }
                };
                for id in &ids {
                    delete_instance(tx, id)?;
                }
                Ok(ids.len() as u64)
            })
            .await?)
    }

    async fn entity(&self, id: &str) -> Result<Option<Value>, DurableError> {
        let id = id.to_owned();
        self.read(move |c| {
            c.prepare_cached("SELECT state FROM durable_entities WHERE id = ?1")?
                .query_row([id], |row| row.get::<_, String>(0))
                .optional()
                .map(|s| s.map(|s| json_column(&s)))
        })
        .await
    }

    async fn live_versions(&self) -> Result<Vec<String>, DurableError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT DISTINCT version FROM durable_instances
                 WHERE status NOT IN ('Completed', 'Failed', 'Terminated') AND version != ''",
            )?;
            let rows = stmt.query_map([], |row| row.get(0))?;
            rows.collect()
        })
        .await
    }

    fn commit(&self, record: Option<InvocationRecord>, commit: Commit) -> Durable {
        let record = record.filter(|_| self.records);
        self.writer.submit(Box::new(move |tx| {
            if let Some(r) = &record {
                crate::ledger::insert_record(tx, r)?;
                if let Some(instance) = &commit.instance_of_record {
                    crate::ledger::tag_instance(tx, &r.invocation_id, instance)?;
                }
            }
            apply(tx, &commit)
        }))
    }
}

/// The behaviour every [`DurableStore`] must have: run against a fresh
/// store.
pub async fn conformance(store: &dyn DurableStore) {
    use serde_json::json;
    let now = now_us();
    let new = |id: &str| NewInstance {
        id: id.into(),
        name: "orch".into(),
        version: "v1".into(),
        input: json!({"n": 1}),
        parent: None,
    };

    // Create: Pending, with its ExecutionStarted message; a second create
    // of a live id is a conflict.
    // What `create` returns is what is stored: a dispatcher starts the
    // first step from it without reading the store.
    let created = store.create(new("a")).await.unwrap();
    assert_eq!(store.live_versions().await.unwrap(), vec!["v1".to_owned()]);
    let a = store.instance("a").await.unwrap().unwrap();
    assert_eq!(a.status, RuntimeStatus::Pending);
    assert_eq!(a.input, json!({"n": 1}));
    assert_eq!(created.instance, a);
    assert!(matches!(
        store.create(new("a")).await,
        Err(DurableError::Conflict(_))
    ));
    let inbox = store.inbox("a", now_us()).await.unwrap();
    assert_eq!(inbox, vec![created.start]);
    assert_eq!(store.raised("a").await.unwrap(), RaisedEvents::default());
    assert!(matches!(
        &inbox[0].message,
        Message::Event {
            event: HistoryEvent::ExecutionStarted { .. }
        }
    ));
    assert_eq!(store.due(i64::MIN, now_us()).await.unwrap().0, vec!["a"]);

    // An episode: consumes its message, appends, schedules work and a
    // timer, all at once.
    let later = now_us() + 60_000_000;
    let work = WorkItem {
        id: "w1".into(),
        instance_id: "a".into(),
        generation: 0,
        task_id: 0,
        name: "act".into(),
        input: json!("x"),
        attempts: 0,
        retry: Retry::default(),
        visible_us: now,
    };
    let commit = Commit {
        consumed: vec![inbox[0].id.clone()],
        instance: Some(InstanceChange {
            id: "a".into(),
            status: RuntimeStatus::Running,
            output: None,
            custom_status: Some(json!("busy")),
            append: vec![
                HistoryEvent::OrchestratorStarted {
                    timestamp: "2026-01-01T00:00:00Z".into(),
                },
                HistoryEvent::TaskScheduled {
                    task_id: 0,
                    name: "act".into(),
                    input: json!("x"),
                },
            ],
            from_seq: 0,
            restart: None,
            pin: None,
        }),
        messages: vec![NewMessage::event(
            "a",
            Some(0),
            HistoryEvent::TimerFired {
                task_id: 1,
                fire_at: "x".into(),
            },
            later,
        )],
        work: vec![work.clone()],
        ..Commit::default()
    };
    let mut twice = commit.clone();
    let applied = Arc::new(std::sync::atomic::AtomicBool::new(false));
    twice.inserted = Some(applied.clone());
    store.commit(None, commit).wait().await.unwrap();
    let a = store.instance("a").await.unwrap().unwrap();
    assert_eq!(a.status, RuntimeStatus::Running);
    assert_eq!(a.custom_status, json!("busy"));
    assert_eq!(store.history("a").await.unwrap().len(), 2);
    // The same step again (its message handed over twice): its message is
    // gone, nothing of it applies, and it says so.
    store.commit(None, twice).wait().await.unwrap();
    assert!(!applied.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(store.history("a").await.unwrap().len(), 2);
    assert!(store.inbox("a", now_us()).await.unwrap().is_empty());
    assert_eq!(store.next_due(now_us()).await.unwrap(), Some(later));
    let (targets, due_work) = store.due(i64::MIN, now_us()).await.unwrap();
    assert!(targets.is_empty());
    assert_eq!(due_work, vec![work.clone()]);
    // The timer's message is due once its time comes.
    assert_eq!(
        store.due(now_us(), later).await.unwrap().0,
        vec!["a".to_owned()]
    );

    // A retry moves the work item later; done deletes it with its result.
    store
        .commit(
            None,
            Commit {
                work_retry: Some(("w1".into(), 1, later)),
                ..Commit::default()
            },
        )
        .wait()
        .await
        .unwrap();
    assert!(store.due(i64::MIN, now_us()).await.unwrap().1.is_empty());
    store
        .commit(
            None,
            Commit {
                work_done: Some("w1".into()),
                messages: vec![NewMessage::event(
                    "a",
                    Some(0),
                    HistoryEvent::TaskCompleted {
                        task_id: 0,
                        result: json!(2),
                    },
                    now_us(),
                )],
                ..Commit::default()
            },
        )
        .wait()
        .await
        .unwrap();
    assert!(store.due(i64::MIN, later).await.unwrap().1.is_empty());
    assert_eq!(store.inbox("a", now_us()).await.unwrap().len(), 1);

    // Ending it; only ended instances are purged.
    assert_eq!(
        store
            .purge(Some("a".into()), Filter::default())
            .await
            .unwrap(),
        0
    );
    store
        .commit(
            None,
            Commit {
                instance: Some(InstanceChange {
                    id: "a".into(),
                    status: RuntimeStatus::Completed,
                    output: Some(json!(42)),
                    custom_status: None,
                    append: vec![],
                    from_seq: 2,
                    restart: None,
                    pin: None,
                }),
                ..Commit::default()
            },
        )
        .wait()
        .await
        .unwrap();
    let a = store.instance("a").await.unwrap().unwrap();
    assert_eq!((a.status, a.output), (RuntimeStatus::Completed, json!(42)));

    // Lists filter by status and prefix, newest first.
    store.create(new("b")).await.unwrap();
    let all = store.list(Filter::default()).await.unwrap();
    assert_eq!(
        all.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
        ["b", "a"]
    );
    let done = store
        .list(Filter {
            statuses: vec![RuntimeStatus::Completed],
            ..Filter::default()
        })
        .await
        .unwrap();
    assert_eq!(done.len(), 1);
    let prefixed = store
        .list(Filter {
            id_prefix: Some("b".into()),
            ..Filter::default()
        })
        .await
        .unwrap();
    assert_eq!(prefixed.len(), 1);

    // A completed instance's id can be reused; purge removes everything.
    assert_eq!(store.purge(None, Filter::default()).await.unwrap(), 1);
    assert!(store.instance("a").await.unwrap().is_none());
    assert!(store.history("a").await.unwrap().is_empty());
    assert!(store.inbox("a", later).await.unwrap().is_empty());

    // Continue as new drops the history and bumps the generation.
    store
        .commit(
            None,
            Commit {
                instance: Some(InstanceChange {
                    id: "b".into(),
                    status: RuntimeStatus::ContinuedAsNew,
                    output: None,
                    custom_status: None,
                    append: vec![],
                    from_seq: 0,
                    restart: Some((1, json!({"n": 2}))),
                    pin: None,
                }),
                ..Commit::default()
            },
        )
        .wait()
        .await
        .unwrap();
    let b = store.instance("b").await.unwrap().unwrap();
    assert_eq!((b.generation, b.input), (1, json!({"n": 2})));

    // A sub-orchestration whose id is taken fails its parent's task.
    let mut child = new("b");
    child.parent = Some(Parent {
        instance_id: "p".into(),
        task_id: 4,
        generation: 0,
    });
    store
        .commit(
            None,
            Commit {
                create: vec![child],
                ..Commit::default()
            },
        )
        .wait()
        .await
        .unwrap();
    let p = store.inbox("p", now_us()).await.unwrap();
    assert!(matches!(
        &p[0].message,
        Message::Event {
            event: HistoryEvent::SubOrchestrationFailed { task_id: 4, .. }
        }
    ));

    // Entities: state set, read, deleted.
    let set = |state: Option<Value>| Commit {
        entity: Some(("@counter@k".into(), state)),
        ..Commit::default()
    };
    assert_eq!(store.entity("@counter@k").await.unwrap(), None);
    store
        .commit(None, set(Some(json!(3))))
        .wait()
        .await
        .unwrap();
    assert_eq!(store.entity("@counter@k").await.unwrap(), Some(json!(3)));
    store.commit(None, set(None)).wait().await.unwrap();
    assert_eq!(store.entity("@counter@k").await.unwrap(), None);

    // Messages sent to any target (raise event, signal) are kept in order.
    store
        .send(vec![
            NewMessage::operation("@counter@k", "add", json!(1), None, now_us()),
            NewMessage::operation("@counter@k", "get", Value::Null, None, now_us()),
        ])
        .await
        .unwrap();
    let ops = store.inbox("@counter@k", now_us()).await.unwrap();
    assert!(matches!(&ops[0].message, Message::Operation { operation, .. } if operation == "add"));
    assert!(matches!(&ops[1].message, Message::Operation { operation, .. } if operation == "get"));

    // Raised events are counted wherever they are: the inbox, the history.
    store.create(new("r")).await.unwrap();
    let raise = |input: Value| {
        NewMessage::event(
            "r",
            None,
            HistoryEvent::EventRaised {
                name: "e".into(),
                input,
            },
            now_us(),
        )
    };
    store
        .send(vec![raise(json!("ab")), raise(json!(1))])
        .await
        .unwrap();
    let mut two = RaisedEvents::default();
    two.add(&json!("ab"));
    two.add(&json!(1));
    assert_eq!(store.raised("r").await.unwrap(), two);
    let inbox = store.inbox("r", now_us()).await.unwrap();
    let moved = inbox
        .iter()
        .filter_map(|m| match &m.message {
            Message::Event { event } => Some(event.clone()),
            Message::Operation { .. } => None,
        })
        .collect();
    store
        .commit(
            None,
            Commit {
                consumed: inbox.iter().map(|m| m.id.clone()).collect(),
                instance: Some(InstanceChange {
                    id: "r".into(),
                    status: RuntimeStatus::Running,
                    output: None,
                    custom_status: None,
                    append: moved,
                    from_seq: 0,
                    restart: None,
                    pin: None,
                }),
                ..Commit::default()
            },
        )
        .wait()
        .await
        .unwrap();
    assert!(store.inbox("r", now_us()).await.unwrap().is_empty());
    assert_eq!(store.raised("r").await.unwrap(), two);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.sqlite3");
        let ledger = crate::ledger::Ledger::open(&path).unwrap();
        let store = SqliteDurable::open(&path, ledger.writer(), true)
            .await
            .unwrap();
        conformance(&store).await;
    }
}
