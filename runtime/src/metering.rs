//! Metering: the one record every invocation produces, and the sinks records
//! flow to. The durable ledger is a sink too; for now records go to a
//! JSON-lines file.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::batch::BatchWriter;

use serde::{Deserialize, Serialize};

/// How an invocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Exit code 0 (or `_start` returned).
    Ok,
    /// The guest exited with a non-zero code, or could not be run.
    Error,
    /// Stopped at its timeout.
    Timeout,
    /// A wasm trap: panic, abort, out-of-bounds, out of fuel or memory.
    Trap,
    /// Not run: its queue was full or the wait timed out.
    Rejected,
    /// It ran, but its caller went away before the answer (a client that
    /// disconnected or timed out): run to its end and billed all the same.
    Abandoned,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::Trap => "trap",
            Outcome::Rejected => "rejected",
            Outcome::Abandoned => "abandoned",
        }
    }
}

/// Where a cold start got its compiled code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadSource {
    /// Mapped from the on-disk artifact cache.
    Cache,
    /// Compiled from the `.wasm` file by Cranelift (and then cached).
    Compile,
    /// Compiled by Winch, the baseline compiler, to answer while Cranelift
    /// compiles in the background (a serving process only; never cached).
    Baseline,
}

impl LoadSource {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadSource::Cache => "cache",
            LoadSource::Compile => "compile",
            LoadSource::Baseline => "baseline",
        }
    }
}

/// The load phase of a cold start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColdStart {
    pub source: LoadSource,
    /// Loading (or compiling) and linking, in microseconds.
    pub load_us: u64,
}

/// One invocation's measurements. Raw quantities only: prices are computed
/// from these by a billing policy, never stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InvocationRecord {
    pub invocation_id: String,
    pub function: String,
    /// `http`, `invoke`, ...
    pub trigger: String,
    /// Start time, RFC 3339 with microseconds, UTC.
    pub started_at: String,
    pub outcome: Outcome,
    /// Why it failed, in words; absent on success.
    pub reason: Option<String>,
    /// Wall time from admission to the end, excluding time queued.
    pub wall_us: u64,
    /// Time spent waiting for a concurrency slot.
    pub queued_us: u64,
    /// CPU time of the threads that ran the guest (thread CPU clock summed
    /// over every poll of the invocation; a poll under 100 µs counts its
    /// wall time, see `invoke::EXACT_CPU_ABOVE`).
    pub cpu_us: u64,
    /// Largest linear memory size reached, in bytes.
    pub peak_memory_bytes: u64,
    /// Linear memory size integrated over the instance's life, in
    /// KiB x microseconds: exact, since memory grows in 64 KiB pages and only
    /// grows during an instance's life. 1 GB-s = 976,562.5 x 10^6 KiB-us.
    pub memory_kib_us: u64,
    /// Fuel consumed, when the engine meters fuel.
    pub fuel_consumed: Option<u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Whether the function had to be loaded for this invocation.
    pub cold: bool,
    /// The load phase, on a cold start.
    pub load: Option<ColdStart>,
    pub instantiate_us: u64,
    pub run_us: u64,
    /// The guest's exit code, when it called `proc_exit`.
    pub exit_code: Option<i32>,
    /// The blake3 hash of the function's `.wasm`.
    #[serde(default)]
    pub version: String,
    /// The deployment version (wasm and configuration) that ran, as the
    /// response's `x-kelvin-version` says.
    #[serde(default)]
    pub version_id: String,
    /// The slot the request went to (`production` unless it named one).
    #[serde(default)]
    pub slot: String,
    /// The function's configured memory limit when it ran (for billing by
    /// configured memory without the manifest at hand).
    #[serde(default)]
    pub memory_limit_bytes: u64,
}

/// Receives every invocation record. Must not block the request path: a
/// sink that makes records durable does it in the background and says when
/// through the returned [`Durable`].
pub trait RecordSink: Send + Sync {
    fn record(&self, record: &InvocationRecord) -> Durable;
    /// A record a trigger's store has already committed to the ledger's
    /// database, in the transaction of its effects ([`Settled::recorded`]):
    /// a sink writing to that database has nothing left to do, others
    /// record it as usual.
    fn record_committed(&self, record: &InvocationRecord) -> Durable {
        self.record(record)
    }
    /// Makes everything recorded so far durable (on shutdown).
    fn flush(&self) {}
}

/// What a trigger's settle hook committed (see
/// `Runtime::start_settled`): when it is durable, and whether the record
/// itself went in with the effects.
pub struct Settled {
    pub durable: Durable,
    /// The record was committed to the ledger's database with the effects
    /// (or, with the ledger off, deliberately not): the ledger sink skips
    /// its own copy, one insert per invocation instead of two.
    pub recorded: bool,
}

impl Settled {
    /// No effects, nothing committed.
    pub fn nothing() -> Settled {
        Settled {
            durable: Durable::now(),
            recorded: false,
        }
    }

    /// Effects committed together with the record.
    pub fn with_record(durable: Durable) -> Settled {
        Settled {
            durable,
            recorded: true,
        }
    }
}

/// Resolves once a record is durable: at once for sinks that keep nothing,
/// after the group commit that contains it for the ledger.
#[derive(Debug, Default)]
pub struct Durable(Vec<tokio::sync::oneshot::Receiver<Result<(), String>>>);

impl Durable {
    /// Already as durable as it will get.
    pub fn now() -> Durable {
        Durable(Vec::new())
    }

    pub fn pending(rx: tokio::sync::oneshot::Receiver<Result<(), String>>) -> Durable {
        Durable(vec![rx])
    }

    /// Never durable, for `reason`.
    pub fn failed(reason: &str) -> Durable {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tx.send(Err(reason.to_owned()));
        Durable(vec![rx])
    }

    /// Waits for every sink; the first failure is returned.
    pub async fn wait(self) -> Result<(), String> {
        for rx in self.0 {
            rx.await
                .map_err(|_| "the sink stopped before writing the record".to_owned())??;
        }
        Ok(())
    }

    fn join(mut self, other: Durable) -> Durable {
        self.0.extend(other.0);
        self
    }
}

/// Appends records as JSON lines to a file. The request path only
/// serialises a record and appends it to a buffer; a background thread
/// writes the buffer out (see [`crate::batch`]).
pub struct JsonLinesSink {
    path: PathBuf,
    writer: BatchWriter,
}

impl JsonLinesSink {
    pub fn open(path: &Path) -> std::io::Result<JsonLinesSink> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(JsonLinesSink {
            path: path.to_owned(),
            writer: BatchWriter::spawn("kelvin-metering", Box::new(file))?,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl RecordSink for JsonLinesSink {
    fn record(&self, record: &InvocationRecord) -> Durable {
        let mut line = serde_json::to_vec(record).expect("records always serialise");
        line.push(b'\n');
        self.writer.append(&line);
        // A log, not a ledger: written soon, never waited for.
        Durable::now()
    }

    fn flush(&self) {
        self.writer.flush();
    }
}

/// Keeps records in memory; for `kelvin invoke` and for embedding.
#[derive(Default)]
pub struct MemorySink {
    records: Mutex<Vec<InvocationRecord>>,
}

impl MemorySink {
    pub fn records(&self) -> Vec<InvocationRecord> {
        self.records.lock().expect("sink lock").clone()
    }
}

impl RecordSink for MemorySink {
    fn record(&self, record: &InvocationRecord) -> Durable {
        self.records.lock().expect("sink lock").push(record.clone());
        Durable::now()
    }
}

/// Sends each record to several sinks.
pub struct Tee(pub Vec<std::sync::Arc<dyn RecordSink>>);

impl RecordSink for Tee {
    fn record(&self, record: &InvocationRecord) -> Durable {
        self.0
            .iter()
            .fold(Durable::now(), |d, s| d.join(s.record(record)))
    }

    fn record_committed(&self, record: &InvocationRecord) -> Durable {
        self.0
            .iter()
            .fold(Durable::now(), |d, s| d.join(s.record_committed(record)))
    }

    fn flush(&self) {
        for s in &self.0 {
            s.flush();
        }
    }
}
