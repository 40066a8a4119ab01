//! The durable invocation ledger: every metering record in SQLite (WAL), by
//! one writer thread that commits in groups ([`crate::commit`]), so the
//! request path waits for a shared fsync, never for one of its own. The same
//! database holds the event stores' tables, so an invocation's record and
//! its effects (a message deleted, outputs published) commit together.
//!
//! The ledger holds raw measurements only; prices are computed from it by a
//! billing policy, so the same ledger can be re-priced.
//!
//! # Guarantee
//!
//! A record is acknowledged (and the HTTP response sent) only after the
//! transaction holding it has committed with `synchronous = FULL`: the WAL
//! is fsynced. A crash of the process (or of the machine) after that point
//! loses nothing acknowledged. A crash before it can lose the records of the
//! batch being written, whose responses were never sent. A record is stored
//! at most once (the invocation id is the primary key).
//!
//! A batch that fails (the database locked by another process past the
//! busy timeout, a full disk) is retried for [`RETRY_FOR`]; if it still
//! fails, every record in it is acknowledged as failed, and the caller
//! answers 503 instead of the invocation's result. A record sent after the
//! ledger closed is refused the same way.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, params};

use crate::commit::GroupCommit;

use crate::billing::{DailyAggregate, Policy, Usage};
use crate::metering::{ColdStart, Durable, InvocationRecord, LoadSource, Outcome, RecordSink};

pub use crate::commit::RETRY_FOR;

/// The writer's wait for a lock held by another connection, per attempt.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("no ledger at `{0}` (it is created by `kelvin up`)")]
    Missing(PathBuf),
    #[error("failed to open the ledger `{path}`")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("ledger query failed")]
    Query(#[from] rusqlite::Error),
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS invocations (
    invocation_id     TEXT PRIMARY KEY,
    function          TEXT NOT NULL,
    version           TEXT NOT NULL,
    trigger           TEXT NOT NULL,
    started_at        TEXT NOT NULL,
    started_unix_us   INTEGER NOT NULL,
    outcome           TEXT NOT NULL,
    reason            TEXT,
    wall_us           INTEGER NOT NULL,
    queued_us         INTEGER NOT NULL,
    cpu_us            INTEGER NOT NULL,
    peak_memory_bytes INTEGER NOT NULL,
    memory_kib_us     INTEGER NOT NULL,
    fuel_consumed     INTEGER,
    bytes_in          INTEGER NOT NULL,
    bytes_out         INTEGER NOT NULL,
    cold              INTEGER NOT NULL,
    load_source       TEXT,
    load_us           INTEGER,
    instantiate_us    INTEGER NOT NULL,
    run_us            INTEGER NOT NULL,
    exit_code         INTEGER,
    memory_limit_bytes INTEGER NOT NULL,
    slot              TEXT NOT NULL DEFAULT '',
    version_id        TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS invocations_by_time ON invocations (started_unix_us);
CREATE TABLE IF NOT EXISTS daily (
    function    TEXT NOT NULL,
    day         TEXT NOT NULL,
    trigger     TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    policy      TEXT NOT NULL,
    invocations INTEGER NOT NULL,
    cold_starts INTEGER NOT NULL,
    cpu_us      INTEGER NOT NULL,
    executions  TEXT NOT NULL,
    gb_s        TEXT NOT NULL,
    cpu_ms      TEXT NOT NULL,
    PRIMARY KEY (function, day, trigger, outcome, policy)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS invocation_instances (
    invocation_id TEXT PRIMARY KEY,
    instance_id   TEXT NOT NULL
);
";

/// The ledger as a sink: records go to the database's group-commit writer,
/// which other stores of the same database share (see [`Ledger::writer`]).
pub struct Ledger {
    path: PathBuf,
    writer: Arc<GroupCommit>,
}

impl Ledger {
    pub fn path_in(state_dir: &Path) -> PathBuf {
        state_dir.join("ledger.sqlite3")
    }

    /// Opens (creating if needed) the ledger for writing.
    pub fn open(path: &Path) -> Result<Ledger, LedgerError> {
        let open_err = |source| LedgerError::Open {
            path: path.to_owned(),
            source,
        };
        let conn = open_for_writing(path).map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        migrate(&conn).map_err(open_err)?;
        let writer = GroupCommit::start(conn, "kelvin-ledger")
            .map_err(|e| open_err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok(Ledger {
            path: path.to_owned(),
            writer: Arc::new(writer),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database's writer: what commits with a record commits through it.
    pub fn writer(&self) -> Arc<GroupCommit> {
        self.writer.clone()
    }
}

/// A connection to the database for its writer: WAL (readers, such as
/// reports, run beside it), FULL (a commit is fsynced before it is
/// acknowledged) and a busy timeout for other processes' locks.
pub fn open_for_writing(path: &Path) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// Tags an invocation with the durable instance it worked for (an episode,
/// an activity, an entity operation), for `kelvin bill --by orchestration`.
pub fn tag_instance(
    tx: &Transaction<'_>,
    invocation_id: &str,
    instance_id: &str,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO invocation_instances (invocation_id, instance_id) VALUES (?1, ?2)",
    )?
    .execute(rusqlite::params![invocation_id, instance_id])?;
    Ok(())
}

/// Writes one record inside a transaction (at most once: the invocation id
/// is the primary key).
pub fn insert_record(tx: &Transaction<'_>, r: &InvocationRecord) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO invocations VALUES
         (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25)",
    )?;
    let started_unix_us = humantime::parse_rfc3339(&r.started_at)
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_micros() as i64);
    insert.execute(params![
        r.invocation_id,
        r.function,
        r.version,
        r.trigger,
        r.started_at,
        started_unix_us,
        r.outcome.as_str(),
        r.reason,
        r.wall_us as i64,
        r.queued_us as i64,
        r.cpu_us as i64,
        r.peak_memory_bytes as i64,
        r.memory_kib_us as i64,
        r.fuel_consumed.map(|f| f as i64),
        r.bytes_in as i64,
        r.bytes_out as i64,
        r.cold,
        r.load.map(|l| l.source.as_str()),
        r.load.map(|l| l.load_us as i64),
        r.instantiate_us as i64,
        r.run_us as i64,
        r.exit_code,
        r.memory_limit_bytes as i64,
        r.slot,
        r.version_id,
    ])?;
    Ok(())
}

impl RecordSink for Ledger {
    fn record(&self, record: &InvocationRecord) -> Durable {
        let record = record.clone();
        // Never answered as if it were recorded when the writer is closed:
        // the caller answers 503.
        self.writer
            .submit(Box::new(move |tx| insert_record(tx, &record)))
    }

    fn record_committed(&self, _: &InvocationRecord) -> Durable {
        // In this database already, with the trigger's effects.
        Durable::now()
    }

    fn flush(&self) {
        // Each record is acknowledged after its commit; closing the writer
        // commits whatever is still queued.
        self.writer.close();
    }
}

/// A read-only view of a ledger: for reports, beside a running server
/// (WAL lets readers and the writer proceed together) or on a copy.
pub struct LedgerReader {
    conn: Connection,
}

impl LedgerReader {
    pub fn open(path: &Path) -> Result<LedgerReader, LedgerError> {
        if !path.exists() {
            return Err(LedgerError::Missing(path.to_owned()));
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| LedgerError::Open {
            path: path.to_owned(),
            source,
        })?;
        conn.busy_timeout(Duration::from_secs(5))?;
        if !has_deployment_columns(&conn)? {
            // A ledger from before deployments, not yet opened for writing:
            // read it as if it had them (empty), without changing it.
            conn.execute_batch(
                "CREATE TEMP VIEW invocations AS
                 SELECT *, '' AS slot, '' AS version_id FROM main.invocations",
            )?;
        }
        Ok(LedgerReader { conn })
    }

    /// How many times each invocation id appears (always once, by the
    /// primary key; the crash test checks it anyway).
    pub fn count(&self, invocation_id: &str) -> Result<u64, LedgerError> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM invocations WHERE invocation_id = ?1",
            [invocation_id],
            |row| row.get::<_, i64>(0),
        )? as u64)
    }

    pub fn len(&self) -> Result<u64, LedgerError> {
        Ok(self
            .conn
            .query_row("SELECT COUNT(*) FROM invocations", [], |row| {
                row.get::<_, i64>(0)
            })? as u64)
    }

    pub fn is_empty(&self) -> Result<bool, LedgerError> {
        Ok(self.len()? == 0)
    }

    /// One invocation's record.
    pub fn get(&self, invocation_id: &str) -> Result<Option<InvocationRecord>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM invocations WHERE invocation_id = ?1"
        ))?;
        let mut rows = stmt.query([invocation_id])?;
        Ok(match rows.next()? {
            Some(row) => Some(from_row(row)?),
            None => None,
        })
    }

    /// Every record that started in `[since, until)` (UNIX microseconds),
    /// oldest first.
    pub fn records(
        &self,
        since_unix_us: i64,
        until_unix_us: i64,
    ) -> Result<Vec<InvocationRecord>, LedgerError> {
        records_in(&self.conn, since_unix_us, until_unix_us)
    }
}

fn records_in(
    conn: &Connection,
    since_unix_us: i64,
    until_unix_us: i64,
) -> Result<Vec<InvocationRecord>, LedgerError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM invocations
         WHERE started_unix_us >= ?1 AND started_unix_us < ?2
         ORDER BY started_unix_us, invocation_id"
    ))?;
    let rows = stmt.query_map([since_unix_us, until_unix_us], from_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn aggregates_in(
    conn: &Connection,
    since_unix_us: i64,
    until_unix_us: i64,
) -> Result<Vec<DailyAggregate>, LedgerError> {
    let mut stmt = conn.prepare_cached(
        "SELECT function, day, trigger, outcome, policy, invocations, cold_starts, cpu_us, executions, gb_s, cpu_ms
         FROM daily ORDER BY day, function",
    )?;
    let rows = stmt.query_map([], aggregate_from_row)?;
    let mut out = Vec::new();
    for a in rows {
        let a = a?;
        let start = humantime::parse_rfc3339(&format!("{}T00:00:00Z", a.day))
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_micros() as i64);
        if (since_unix_us..until_unix_us).contains(&start) {
            out.push(a);
        }
    }
    Ok(out)
}

impl LedgerReader {
    /// What a report over `[since, until)` prices (see [`Usage`]), read in
    /// one read transaction: a compaction committing meanwhile cannot make
    /// a day count twice (as records and as an aggregate) or not at all.
    pub fn usage(&mut self, since_unix_us: i64, until_unix_us: i64) -> Result<Usage, LedgerError> {
        let tx = self.conn.transaction()?;
        let month = crate::billing::month_start(since_unix_us);
        let usage = Usage {
            records: records_in(&tx, since_unix_us, until_unix_us)?,
            aggregates: aggregates_in(&tx, since_unix_us, until_unix_us)?,
            earlier_records: records_in(&tx, month, since_unix_us)?,
            earlier_aggregates: aggregates_in(&tx, month, since_unix_us)?,
            instances: instances_in(&tx, since_unix_us, until_unix_us)?,
        };
        tx.commit()?;
        Ok(usage)
    }

    /// The compacted days that fall in `[since, until)` (a day counts from
    /// its midnight, UTC), for every pricing shape they were kept for.
    pub fn aggregates(
        &self,
        since_unix_us: i64,
        until_unix_us: i64,
    ) -> Result<Vec<DailyAggregate>, LedgerError> {
        aggregates_in(&self.conn, since_unix_us, until_unix_us)
    }
}

/// Which durable instance each invocation in `[since, until)` worked for.
fn instances_in(
    conn: &Connection,
    since_unix_us: i64,
    until_unix_us: i64,
) -> rusqlite::Result<std::collections::HashMap<String, String>> {
    // A ledger from before durable functions has no such table.
    let exists: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'invocation_instances'",
        [],
        |row| row.get(0),
    )?;
    if !exists {
        return Ok(Default::default());
    }
    let mut stmt = conn.prepare(
        "SELECT t.invocation_id, t.instance_id FROM invocation_instances t
         JOIN invocations i ON i.invocation_id = t.invocation_id
         WHERE i.started_unix_us >= ?1 AND i.started_unix_us < ?2",
    )?;
    let rows = stmt.query_map([since_unix_us, until_unix_us], |row| {
        Ok((row.get(0)?, row.get(1)?))
    })?;
    rows.collect()
}

fn decimal(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<rust_decimal::Decimal> {
    let text: String = row.get(i)?;
    text.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn aggregate_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<DailyAggregate> {
    Ok(DailyAggregate {
        function: row.get(0)?,
        day: row.get(1)?,
        trigger: row.get(2)?,
        outcome: row.get(3)?,
        policy: row.get(4)?,
        invocations: row.get::<_, i64>(5)? as u64,
        cold_starts: row.get::<_, i64>(6)? as u64,
        cpu_us: row.get::<_, i64>(7)? as u64,
        executions: decimal(row, 8)?,
        gb_s: decimal(row, 9)?,
        cpu_ms: decimal(row, 10)?,
    })
}

/// What a compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub invocations: u64,
    /// Daily aggregates written or added to (per function, day, trigger and
    /// outcome; each kept for every pricing shape).
    pub days: u64,
}

/// Invocations one compaction step rolls up at most: memory stays bounded
/// however large the ledger is, and the step's write transaction holds the
/// lock for milliseconds, never near the writer's busy timeout.
const COMPACT_CHUNK: usize = 1000;

/// Rolls every invocation that started before `before_unix_us` into daily
/// aggregates, safe beside a running server: in short transactions of at
/// most [`COMPACT_CHUNK`] invocations, each deleting what it rolled up, with
/// a pause between them so the server's writer gets in.
///
/// Aggregates keep billable quantities, never prices, for every pricing
/// shape a report may ask for: the presets' and `policy`'s (see
/// [`Policy::shape`]). Reports priced with any of them stay exact.
pub fn compact(
    path: &Path,
    before_unix_us: i64,
    policy: &Policy,
) -> Result<Compacted, LedgerError> {
    if !path.exists() {
        return Err(LedgerError::Missing(path.to_owned()));
    }
    let mut conn = Connection::open(path).map_err(|source| LedgerError::Open {
        path: path.to_owned(),
        source,
    })?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.execute_batch(SCHEMA)?;
    migrate(&conn)?;
    let mut shapes: Vec<Policy> = crate::billing::PRESETS
        .iter()
        .filter_map(|p| Policy::preset(p))
        .collect();
    if !shapes.iter().any(|p| p.shape() == policy.shape()) {
        shapes.push(policy.clone());
    }
    let mut invocations = 0;
    let mut days = std::collections::BTreeSet::new();
    loop {
        let (rolled, touched) = compact_chunk(&mut conn, before_unix_us, &shapes)?;
        if rolled == 0 {
            return Ok(Compacted {
                invocations,
                days: days.len() as u64,
            });
        }
        invocations += rolled;
        days.extend(touched);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What [`compact`] would roll up before `before_unix_us`, changing
/// nothing: how many invocations, and the span they started in.
pub fn compactable(
    path: &Path,
    before_unix_us: i64,
) -> Result<(u64, Option<(i64, i64)>), LedgerError> {
    if !path.exists() {
        return Err(LedgerError::Missing(path.to_owned()));
    }
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|source| {
            LedgerError::Open {
                path: path.to_owned(),
                source,
            }
        })?;
    conn.busy_timeout(Duration::from_secs(30))?;
    let (n, first, last): (i64, Option<i64>, Option<i64>) = conn.query_row(
        "SELECT COUNT(*), MIN(started_unix_us), MAX(started_unix_us) FROM invocations
         WHERE started_unix_us < ?1",
        [before_unix_us],
        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
    )?;
    Ok((n as u64, first.zip(last)))
}

/// Writes a consistent copy of the ledger to `to` (a new file), safe beside
/// a running server: SQLite's `VACUUM INTO` copies one snapshot, WAL
/// included, which copying the file alone does not.
pub fn backup(path: &Path, to: &Path) -> Result<(), LedgerError> {
    if !path.exists() {
        return Err(LedgerError::Missing(path.to_owned()));
    }
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|source| {
            LedgerError::Open {
                path: path.to_owned(),
                source,
            }
        })?;
    conn.busy_timeout(Duration::from_secs(30))?;
    let to = to
        .to_str()
        .ok_or_else(|| LedgerError::Query(rusqlite::Error::InvalidPath(to.to_owned())))?;
    conn.execute("VACUUM INTO ?1", [to])?;
    Ok(())
}

/// One step of [`compact`]: the oldest invocations before the cutoff,
/// added to their days' aggregates and deleted. They are read and rolled up
/// before the write lock is taken (records never change once written), so
/// the write transaction holds only the upserts and deletes; if another
/// compaction took some of them meanwhile, the step is rolled back and
/// taken again.
fn compact_chunk(
    conn: &mut Connection,
    before_unix_us: i64,
    shapes: &[Policy],
) -> Result<(u64, Vec<Day>), LedgerError> {
    loop {
        let records: Vec<InvocationRecord> = {
            let mut stmt = conn.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM invocations WHERE started_unix_us < ?1
                 ORDER BY started_unix_us LIMIT {COMPACT_CHUNK}"
            ))?;
            stmt.query_map([before_unix_us], from_row)?
                .collect::<Result<_, _>>()?
        };
        if records.is_empty() {
            return Ok((0, Vec::new()));
        }
        let days = roll_up(&records, shapes);
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut deleted = 0;
        {
            let mut delete =
                tx.prepare_cached("DELETE FROM invocations WHERE invocation_id = ?1")?;
            for r in &records {
                deleted += delete.execute([&r.invocation_id])?;
            }
        }
        if deleted != records.len() {
            // Another compaction got there first: roll back, read again.
            drop(tx);
            continue;
        }
        for a in days.values() {
            // A day compacted before (late records, earlier steps) is added
            // to, not replaced.
            let existing: Option<DailyAggregate> = tx
                .query_row(
                    "SELECT function, day, trigger, outcome, policy, invocations, cold_starts, cpu_us, executions, gb_s, cpu_ms
                     FROM daily WHERE function = ?1 AND day = ?2 AND trigger = ?3 AND outcome = ?4 AND policy = ?5",
                    params![a.function, a.day, a.trigger, a.outcome, a.policy],
                    aggregate_from_row,
                )
                .optional()?;
            let mut merged = a.clone();
            if let Some(e) = existing {
                merged.invocations += e.invocations;
                merged.cold_starts += e.cold_starts;
                merged.cpu_us += e.cpu_us;
                merged.executions += e.executions;
                merged.gb_s += e.gb_s;
                merged.cpu_ms += e.cpu_ms;
            }
            tx.execute(
                "INSERT OR REPLACE INTO daily VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    merged.function,
                    merged.day,
                    merged.trigger,
                    merged.outcome,
                    merged.policy,
                    merged.invocations as i64,
                    merged.cold_starts as i64,
                    merged.cpu_us as i64,
                    merged.executions.to_string(),
                    merged.gb_s.to_string(),
                    merged.cpu_ms.to_string(),
                ],
            )?;
        }
        tx.commit()?;
        let touched = days
            .keys()
            .map(|(f, d, t, o, _)| (f.clone(), d.clone(), t.clone(), o.clone()))
            .collect();
        return Ok((records.len() as u64, touched));
    }
}

/// Aggregate rows, by function, day, trigger, outcome and pricing shape.
type DayKey = (String, String, String, String, String);

/// A compacted day of one function, trigger and outcome.
type Day = (String, String, String, String);

/// Rolls `records` up into one aggregate per day and pricing shape.
fn roll_up(
    records: &[InvocationRecord],
    shapes: &[Policy],
) -> std::collections::BTreeMap<DayKey, DailyAggregate> {
    let mut days = std::collections::BTreeMap::new();
    for r in records {
        let day = r.started_at.get(..10).unwrap_or("").to_owned();
        for shape in shapes {
            let key = (
                r.function.clone(),
                day.clone(),
                r.trigger.clone(),
                r.outcome.as_str().to_owned(),
                shape.shape(),
            );
            days.entry(key)
                .or_insert_with(|| DailyAggregate {
                    function: r.function.clone(),
                    day: day.clone(),
                    trigger: r.trigger.clone(),
                    outcome: r.outcome.as_str().to_owned(),
                    policy: shape.shape(),
                    invocations: 0,
                    cold_starts: 0,
                    cpu_us: 0,
                    executions: Default::default(),
                    gb_s: Default::default(),
                    cpu_ms: Default::default(),
                })
                .add(r, shape);
        }
    }
    days
}

const COLUMNS: &str =
    "invocation_id, function, version, trigger, started_at, outcome, reason, wall_us,
    queued_us, cpu_us, peak_memory_bytes, memory_kib_us, fuel_consumed, bytes_in, bytes_out, cold,
    load_source, load_us, instantiate_us, run_us, exit_code, memory_limit_bytes, slot, version_id";

fn from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<InvocationRecord> {
    let outcome: String = row.get(5)?;
    let load_source: Option<String> = row.get(16)?;
    let load_us: Option<i64> = row.get(17)?;
    let u = |i: usize| -> rusqlite::Result<u64> { Ok(row.get::<_, i64>(i)? as u64) };
    Ok(InvocationRecord {
        invocation_id: row.get(0)?,
        function: row.get(1)?,
        version: row.get(2)?,
        trigger: row.get(3)?,
        started_at: row.get(4)?,
        outcome: parse_outcome(&outcome),
        reason: row.get(6)?,
        wall_us: u(7)?,
        queued_us: u(8)?,
        cpu_us: u(9)?,
        peak_memory_bytes: u(10)?,
        memory_kib_us: u(11)?,
        fuel_consumed: row.get::<_, Option<i64>>(12)?.map(|f| f as u64),
        bytes_in: u(13)?,
        bytes_out: u(14)?,
        cold: row.get(15)?,
        load: load_source.map(|s| ColdStart {
            source: match s.as_str() {
                "cache" => LoadSource::Cache,
                "baseline" => LoadSource::Baseline,
                _ => LoadSource::Compile,
            },
            load_us: load_us.unwrap_or(0) as u64,
        }),
        instantiate_us: u(18)?,
        run_us: u(19)?,
        exit_code: row.get(20)?,
        memory_limit_bytes: u(21)?,
        slot: row.get(22)?,
        version_id: row.get(23)?,
    })
}

/// Whether the invocations table has the columns deployments added.
fn has_deployment_columns(conn: &Connection) -> rusqlite::Result<bool> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info('invocations')")?;
    let names: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(names.iter().any(|n| n == "slot"))
}

/// Brings a ledger written by an older Kelvin up to this schema.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    if !has_deployment_columns(conn)? {
        conn.execute_batch(
            "ALTER TABLE invocations ADD COLUMN slot TEXT NOT NULL DEFAULT '';
             ALTER TABLE invocations ADD COLUMN version_id TEXT NOT NULL DEFAULT '';",
        )?;
    }
    Ok(())
}

fn parse_outcome(s: &str) -> Outcome {
    match s {
        "ok" => Outcome::Ok,
        "timeout" => Outcome::Timeout,
        "trap" => Outcome::Trap,
        "rejected" => Outcome::Rejected,
        "abandoned" => Outcome::Abandoned,
        _ => Outcome::Error,
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    pub fn record(id: &str) -> crate::metering::InvocationRecord {
        super::tests::record(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn record(id: &str) -> InvocationRecord {
        InvocationRecord {
            invocation_id: id.to_owned(),
            function: "f".into(),
            trigger: "http".into(),
            started_at: "2026-11-21T10:00:00.000001Z".into(),
            outcome: Outcome::Trap,
            reason: Some("wasm trap".into()),
            wall_us: 1200,
            queued_us: 3,
            cpu_us: 900,
            peak_memory_bytes: 1 << 20,
            memory_kib_us: 1024 * 1200,
            fuel_consumed: Some(42),
            bytes_in: 5,
            bytes_out: 0,
            cold: true,
            load: Some(ColdStart {
                source: LoadSource::Cache,
                load_us: 500,
            }),
            instantiate_us: 40,
            run_us: 600,
            exit_code: None,
            version: "abc".into(),
            memory_limit_bytes: 128 << 20,
            slot: "production".into(),
            version_id: "0123456789abcdef".into(),
        }
    }

    #[tokio::test]
    async fn records_round_trip_and_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = Ledger::path_in(dir.path());
        let ledger = Ledger::open(&path).unwrap();
        let a = record("a");
        ledger.record(&a).wait().await.unwrap();
        // A duplicate (a retried write) is ignored, not stored twice.
        ledger.record(&a).wait().await.unwrap();
        let reader = LedgerReader::open(&path).unwrap();
        assert_eq!(reader.count("a").unwrap(), 1);
        assert_eq!(reader.get("a").unwrap().unwrap(), a);
        assert!(reader.get("nope").unwrap().is_none());

        // Many at once share transactions and all arrive.
        let waits: Vec<_> = (0..500)
            .map(|i| ledger.record(&record(&format!("r{i}"))))
            .collect();
        for w in waits {
            w.wait().await.unwrap();
        }
        assert_eq!(reader.len().unwrap(), 501);
    }

    #[tokio::test]
    async fn a_ledger_from_before_deployments_is_read_then_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = Ledger::path_in(dir.path());
        // The schema as it was, with one record.
        let old_schema = SCHEMA
            .replace(",\n    slot              TEXT NOT NULL DEFAULT ''", "")
            .replace(",\n    version_id        TEXT NOT NULL DEFAULT ''", "");
        assert!(!old_schema.contains("version_id"));
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&old_schema).unwrap();
            conn.execute(
                "INSERT INTO invocations VALUES ('old', 'f', 'abc', 'http',
                 '2026-11-01T00:00:00Z', 1, 'ok', NULL, 1, 0, 1, 1, 1, NULL, 0, 0, 0,
                 NULL, NULL, 1, 1, NULL, 1)",
                [],
            )
            .unwrap();
        }
        // Read as it is (read-only: not changed)...
        let old = LedgerReader::open(&path)
            .unwrap()
            .get("old")
            .unwrap()
            .unwrap();
        assert_eq!((old.slot.as_str(), old.version_id.as_str()), ("", ""));
        // ...and migrated by the writer, old rows kept, new ones whole.
        let ledger = Ledger::open(&path).unwrap();
        let new = record("new");
        ledger.record(&new).wait().await.unwrap();
        let reader = LedgerReader::open(&path).unwrap();
        assert_eq!(reader.get("new").unwrap().unwrap(), new);
        assert_eq!(reader.get("old").unwrap().unwrap().slot, "");
    }

    /// 300 records over 20 days of October, three functions and outcomes.
    async fn october(ledger: &Ledger) -> Vec<InvocationRecord> {
        let mut all = Vec::new();
        for i in 0..300u64 {
            let mut r = record(&format!("r{i}"));
            r.function = ["a", "b", "c"][(i % 3) as usize].into();
            r.started_at = format!("2026-10-{:02}T{:02}:00:00.000000Z", 1 + i % 20, i % 24);
            r.wall_us = 1_000 + i * 997;
            r.run_us = r.wall_us;
            r.peak_memory_bytes = (1 + i % 300) << 20;
            r.cpu_us = i * 311;
            r.outcome = [Outcome::Ok, Outcome::Trap, Outcome::Rejected][(i % 3) as usize];
            ledger.record(&r).wait().await.unwrap();
            all.push(r);
        }
        all
    }

    /// `n` invocations spread over September.
    async fn september(ledger: &Ledger, n: u64) {
        let waits: Vec<_> = (0..n)
            .map(|i| {
                let mut r = record(&format!("r{i}"));
                r.started_at = format!("2026-09-{:02}T10:00:00.000000Z", 1 + i % 28);
                ledger.record(&r)
            })
            .collect();
        for w in waits {
            w.wait().await.unwrap();
        }
    }

    fn unix_us(rfc3339: &str) -> i64 {
        humantime::parse_rfc3339(rfc3339)
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64
    }

    #[tokio::test]
    async fn compaction_preserves_report_totals_exactly() {
        use crate::billing::{GroupBy, report};
        let dir = tempfile::tempdir().unwrap();
        let path = Ledger::path_in(dir.path());
        let ledger = Ledger::open(&path).unwrap();
        let mut all = october(&ledger).await;
        let policy = Policy::preset("azure-consumption").unwrap();
        let mut reader = LedgerReader::open(&path).unwrap();
        let before =
            |all: &[InvocationRecord], by| report(&policy, &Usage::of(all.to_vec()), by).unwrap();
        let mut after = |by| report(&policy, &reader.usage(0, i64::MAX).unwrap(), by).unwrap();
        // Everything before Oct 11.
        let cutoff = unix_us("2026-10-11T00:00:00Z");
        let done = compact(&path, cutoff, &policy).unwrap();
        assert_eq!(done.invocations, 150);
        for by in [
            GroupBy::Function,
            GroupBy::Day,
            GroupBy::Trigger,
            GroupBy::Outcome,
        ] {
            assert_eq!(after(by), before(&all, by), "{by:?}");
        }
        // Again: nothing left to compact, nothing changes.
        assert_eq!(compact(&path, cutoff, &policy).unwrap().invocations, 0);
        assert_eq!(after(GroupBy::Day), before(&all, GroupBy::Day));

        // A late record for a compacted day is merged into its aggregate.
        let mut late = record("late");
        late.started_at = "2026-10-02T12:00:00.000000Z".into();
        ledger.record(&late).wait().await.unwrap();
        all.push(late);
        compact(&path, cutoff, &policy).unwrap();
        assert_eq!(after(GroupBy::Function), before(&all, GroupBy::Function));
        let mut reader = LedgerReader::open(&path).unwrap();
        assert_eq!(reader.len().unwrap(), 150);
        // Re-priced at other prices, compacted days stay exact.
        let mut cheaper = policy.clone();
        cheaper.price_per_gb_s = rust_decimal::Decimal::from_str_exact("0.00001").unwrap();
        let usage = reader.usage(0, i64::MAX).unwrap();
        assert_eq!(
            report(&cheaper, &usage, GroupBy::Function).unwrap().total,
            report(&cheaper, &Usage::of(all.clone()), GroupBy::Function)
                .unwrap()
                .total
        );
        // A date range selects whole compacted days.
        let days = reader
            .aggregates(unix_us("2026-10-05T00:00:00Z"), cutoff)
            .unwrap();
        assert!(
            days.iter()
                .all(|d| ("2026-10-05".."2026-10-11").contains(&d.day.as_str()))
        );
        assert!(!days.is_empty());
    }

    #[tokio::test]
    async fn compacted_days_price_exactly_under_every_preset_or_refuse() {
        use crate::billing::{GroupBy, PricingError, report};
        let dir = tempfile::tempdir().unwrap();
        let path = Ledger::path_in(dir.path());
        let ledger = Ledger::open(&path).unwrap();
        let all = october(&ledger).await;
        // Compacted under the default policy; priced under another. Before,
        // a cpu-time report of compacted days billed their CPU as 0.
        compact(
            &path,
            unix_us("2026-11-01T00:00:00Z"),
            &Policy::preset("azure-consumption").unwrap(),
        )
        .unwrap();
        let mut reader = LedgerReader::open(&path).unwrap();
        let usage = reader.usage(0, i64::MAX).unwrap();
        assert!(usage.records.is_empty());
        for preset in crate::billing::PRESETS {
            let policy = Policy::preset(preset).unwrap();
            let compacted = report(&policy, &usage, GroupBy::Function).unwrap();
            let raw = report(&policy, &Usage::of(all.clone()), GroupBy::Function).unwrap();
            assert_eq!(compacted, raw, "{preset}");
        }
        let cpu = report(
            &Policy::preset("cpu-time").unwrap(),
            &usage,
            GroupBy::Function,
        )
        .unwrap();
        assert!(cpu.total.cost > rust_decimal::Decimal::ZERO);
        // A shape nobody compacted for cannot be priced from aggregates:
        // said so, not billed wrong.
        let mut odd = Policy::preset("aws-lambda").unwrap();
        odd.min_duration_ms = rust_decimal::Decimal::from(50);
        let err = report(&odd, &usage, GroupBy::Function).unwrap_err();
        let PricingError::Compacted(unpriceable) = &err;
        assert_eq!(
            (
                unpriceable.days,
                unpriceable.first.as_str(),
                unpriceable.last.as_str()
            ),
            (20, "2026-10-01", "2026-10-20")
        );
        assert!(unpriceable.available.contains("azure-consumption"), "{err}");
    }

    #[tokio::test]
    async fn compaction_holds_the_write_lock_for_short_spells_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = Ledger::path_in(dir.path());
        let ledger = Ledger::open(&path).unwrap();
        // 40,000 old invocations (one transaction of them took seconds and
        // held every row in memory).
        september(&ledger, 40_000).await;
        drop(ledger);
        // A writer that waits at most 100 ms for the lock keeps writing
        // beside the compaction.
        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut conn = Connection::open(&path).unwrap();
                conn.busy_timeout(Duration::from_millis(100)).unwrap();
                let mut stored = 0;
                let started = std::time::Instant::now();
                while started.elapsed() < Duration::from_secs(2) {
                    let mut r = record(&format!("new{stored}"));
                    r.started_at = "2026-11-21T10:00:00.000000Z".into();
                    let tx = conn.transaction().unwrap();
                    insert_record(&tx, &r).expect("the lock came within 100 ms");
                    tx.commit().expect("the lock came within 100 ms");
                    stored += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                stored
            })
        };
        let policy = Policy::preset("azure-consumption").unwrap();
        let done = compact(&path, unix_us("2026-10-01T00:00:00Z"), &policy).unwrap();
        assert_eq!(done.invocations, 40_000);
        assert!(writer.join().unwrap() > 0);
    }

    #[tokio::test]
    async fn a_report_is_one_snapshot_while_compaction_commits() {
        use crate::billing::{GroupBy, report};
        let dir = tempfile::tempdir().unwrap();
        let path = Ledger::path_in(dir.path());
        let ledger = Ledger::open(&path).unwrap();
        september(&ledger, 20_000).await;
        let policy = Policy::preset("azure-consumption").unwrap();
        let mut reader = LedgerReader::open(&path).unwrap();
        let expected = report(
            &policy,
            &reader.usage(0, i64::MAX).unwrap(),
            GroupBy::Function,
        )
        .unwrap()
        .total;
        let compaction = {
            let (path, policy) = (path.clone(), policy.clone());
            std::thread::spawn(move || compact(&path, unix_us("2026-10-01T00:00:00Z"), &policy))
        };
        // Reports while it commits chunk after chunk: each sees the ledger
        // before or after a chunk, never a chunk's rows both as records and
        // as an aggregate (or as neither).
        while !compaction.is_finished() {
            let usage = reader.usage(0, i64::MAX).unwrap();
            let total = report(&policy, &usage, GroupBy::Function).unwrap().total;
            assert_eq!(total, expected);
        }
        compaction.join().unwrap().unwrap();
    }

    #[test]
    fn a_missing_ledger_is_a_clear_error() {
        let e = LedgerReader::open(Path::new("/nonexistent/ledger.sqlite3"))
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            "no ledger at `/nonexistent/ledger.sqlite3` (it is created by `kelvin up`)"
        );
    }
}
