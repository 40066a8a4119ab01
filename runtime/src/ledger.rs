//! The durable invocation ledger: every metering record in SQLite (WAL), by
//! one writer thread that commits in groups, so the request path waits for
//! a shared fsync, never for one of its own.
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

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, UNIX_EPOCH};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::billing::{DailyAggregate, Policy};
use crate::metering::{ColdStart, Durable, InvocationRecord, LoadSource, Outcome, RecordSink};

/// Records written in one transaction at most.
const MAX_BATCH: usize = 4096;

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
    memory_limit_bytes INTEGER NOT NULL
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
";

type Ack = tokio::sync::oneshot::Sender<Result<(), String>>;

/// The ledger as a sink: records go to the writer thread.
pub struct Ledger {
    path: PathBuf,
    tx: Mutex<Option<mpsc::Sender<(InvocationRecord, Ack)>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
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
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path).map_err(open_err)?;
        // WAL: readers (reports) run beside the writer. FULL: a commit is
        // fsynced before it is acknowledged.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;

        let (tx, rx) = mpsc::channel::<(InvocationRecord, Ack)>();
        let writer = std::thread::Builder::new()
            .name("kelvin-ledger".into())
            .spawn(move || write_loop(conn, rx))
            .map_err(|e| open_err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        Ok(Ledger {
            path: path.to_owned(),
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Takes what has queued up, writes it in one transaction, acknowledges it.
fn write_loop(mut conn: Connection, rx: mpsc::Receiver<(InvocationRecord, Ack)>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let result = insert_batch(&mut conn, batch.iter().map(|(r, _)| r));
        if let Err(e) = &result {
            tracing::error!(error = %e, records = batch.len(), "failed to write invocation records to the ledger");
        }
        let result = result.map_err(|e| e.to_string());
        for (_, ack) in batch {
            let _ = ack.send(result.clone());
        }
    }
}

fn insert_batch<'a>(
    conn: &mut Connection,
    records: impl Iterator<Item = &'a InvocationRecord>,
) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO invocations VALUES
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23)",
        )?;
        for r in records {
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
            ])?;
        }
    }
    tx.commit()
}

impl RecordSink for Ledger {
    fn record(&self, record: &InvocationRecord) -> Durable {
        let (ack, done) = tokio::sync::oneshot::channel();
        match &*self.tx.lock().expect("ledger lock") {
            Some(tx) if tx.send((record.clone(), ack)).is_ok() => Durable::pending(done),
            _ => {
                tracing::error!(
                    invocation_id = record.invocation_id.as_str(),
                    "the ledger is closed; record lost"
                );
                Durable::now()
            }
        }
    }

    fn flush(&self) {
        // Each record is acknowledged after its commit; closing the channel
        // and joining the writer commits whatever is still queued.
        self.tx.lock().expect("ledger lock").take();
        if let Some(w) = self.writer.lock().expect("ledger lock").take() {
            let _ = w.join();
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.flush();
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
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM invocations
             WHERE started_unix_us >= ?1 AND started_unix_us < ?2
             ORDER BY started_unix_us, invocation_id"
        ))?;
        let rows = stmt.query_map([since_unix_us, until_unix_us], from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

impl LedgerReader {
    /// The compacted days that fall in `[since, until)` (a day counts from
    /// its midnight, UTC).
    pub fn aggregates(
        &self,
        since_unix_us: i64,
        until_unix_us: i64,
    ) -> Result<Vec<DailyAggregate>, LedgerError> {
        let mut stmt = self.conn.prepare_cached(
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
    pub days: u64,
}

/// Rolls every invocation that started before `before_unix_us` into daily
/// aggregates shaped by `policy`, in one transaction (safe beside a running
/// server: SQLite serialises the writers). Totals priced with that policy's
/// shape are preserved exactly.
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
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let records: Vec<InvocationRecord> = {
        let mut stmt = tx.prepare(&format!(
            "SELECT {COLUMNS} FROM invocations WHERE started_unix_us < ?1"
        ))?;
        stmt.query_map([before_unix_us], from_row)?
            .collect::<Result<_, _>>()?
    };
    let mut days: std::collections::BTreeMap<(String, String, String, String), DailyAggregate> =
        Default::default();
    for r in &records {
        let day = r.started_at.get(..10).unwrap_or("").to_owned();
        let key = (
            r.function.clone(),
            day.clone(),
            r.trigger.clone(),
            r.outcome.as_str().to_owned(),
        );
        days.entry(key)
            .or_insert_with(|| DailyAggregate {
                function: r.function.clone(),
                day,
                trigger: r.trigger.clone(),
                outcome: r.outcome.as_str().to_owned(),
                policy: policy.name.clone(),
                invocations: 0,
                cold_starts: 0,
                cpu_us: 0,
                executions: Default::default(),
                gb_s: Default::default(),
                cpu_ms: Default::default(),
            })
            .add(r, policy);
    }
    for a in days.values() {
        // A day compacted before (late records) is added to, not replaced.
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
    tx.execute(
        "DELETE FROM invocations WHERE started_unix_us < ?1",
        [before_unix_us],
    )?;
    tx.commit()?;
    Ok(Compacted {
        invocations: records.len() as u64,
        days: days.len() as u64,
    })
}

const COLUMNS: &str =
    "invocation_id, function, version, trigger, started_at, outcome, reason, wall_us,
    queued_us, cpu_us, peak_memory_bytes, memory_kib_us, fuel_consumed, bytes_in, bytes_out, cold,
    load_source, load_us, instantiate_us, run_us, exit_code, memory_limit_bytes";

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
    })
}

fn parse_outcome(s: &str) -> Outcome {
    match s {
        "ok" => Outcome::Ok,
        "timeout" => Outcome::Timeout,
        "trap" => Outcome::Trap,
        "rejected" => Outcome::Rejected,
        _ => Outcome::Error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> InvocationRecord {
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
    async fn compaction_preserves_report_totals_exactly() {
        use crate::billing::{GroupBy, report};
        let dir = tempfile::tempdir().unwrap();
        let path = Ledger::path_in(dir.path());
        let ledger = Ledger::open(&path).unwrap();
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
        let policy = Policy::preset("azure-consumption").unwrap();
        let reader = LedgerReader::open(&path).unwrap();
        let before = |all: &[InvocationRecord], by| report(&policy, all, &[], by);
        let after = |by| {
            let records = reader.records(0, i64::MAX).unwrap();
            let days = reader.aggregates(0, i64::MAX).unwrap();
            report(&policy, &records, &days, by)
        };
        // Everything before Oct 11.
        let cutoff = humantime::parse_rfc3339("2026-10-11T00:00:00Z").unwrap();
        let cutoff = cutoff.duration_since(UNIX_EPOCH).unwrap().as_micros() as i64;
        let done = compact(&path, cutoff, &policy).unwrap();
        assert_eq!(done.invocations, 150);
        assert_eq!(reader.len().unwrap(), 150);
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
        // Re-priced at other prices, compacted days stay exact.
        let mut cheaper = policy.clone();
        cheaper.price_per_gb_s = rust_decimal::Decimal::from_str_exact("0.00001").unwrap();
        let records = reader.records(0, i64::MAX).unwrap();
        let days = reader.aggregates(0, i64::MAX).unwrap();
        assert_eq!(
            report(&cheaper, &records, &days, GroupBy::Function).total,
            report(&cheaper, &all, &[], GroupBy::Function).total
        );
        // A date range selects whole compacted days.
        let oct_5 = humantime::parse_rfc3339("2026-10-05T00:00:00Z")
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap();
        let days = reader.aggregates(oct_5.as_micros() as i64, cutoff).unwrap();
        assert!(
            days.iter()
                .all(|d| ("2026-10-05".."2026-10-11").contains(&d.day.as_str()))
        );
        assert!(!days.is_empty());
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
