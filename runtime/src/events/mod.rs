//! Event state: the durable queues, blob receipts, timer status and blob
//! outbox behind [`store::EventStore`], the blobs behind
//! [`blobs::BlobStore`], and what an invocation's success or failure does to
//! them ([`Effects`]). Triggers and the admin API use these; the execution
//! core does not know them.

pub mod blobs;
pub mod envelope;
pub mod store;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

/// Now, in microseconds since the UNIX epoch (what the stores keep).
pub fn now_us() -> i64 {
    unix_us(SystemTime::now())
}

pub fn unix_us(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

pub fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// RFC 3339 (UTC, microseconds) of a UNIX-microseconds time.
pub fn rfc3339(us: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap_or(0));
    humantime::format_rfc3339_micros(t).to_string()
}

/// A queue message as a consumer or a peek sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: String,
    pub queue: String,
    pub body: Bytes,
    pub inserted_us: i64,
    /// Leases so far, this one included.
    pub dequeue_count: u32,
    /// The lease this consumer holds (empty in a peek).
    pub lease: String,
    /// When it is (or was) next visible to consumers.
    pub visible_us: i64,
}

/// A queue's state, for the API and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueStats {
    pub name: String,
    /// Messages in it, leased or not.
    pub depth: u64,
    /// Messages leased by a running function.
    pub leased: u64,
    /// When its oldest message was enqueued.
    pub oldest_us: Option<i64>,
}

/// A timer's last and next run, kept across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerStatus {
    /// The scheduled time of the last run.
    pub last_us: Option<i64>,
    /// The next scheduled time, as computed after the last run.
    pub next_us: i64,
}

/// What a function did with one version of a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub function: String,
    /// `container/name`.
    pub path: String,
    /// The version's content hash.
    pub etag: String,
    /// The write it came from ([`crate::events::blobs::BlobInfo::stamp`]):
    /// the same bytes written again are a new version. Empty in receipts
    /// from before stamps, which match any write of their bytes.
    pub stamp: String,
    pub state: ReceiptState,
    /// Failed attempts so far.
    pub attempts: u32,
    pub updated_us: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptState {
    /// Processed successfully: never again.
    Done,
    /// Failed; retried after a backoff.
    Failed,
    /// Failed too often: never again (until the blob changes).
    Poison,
}

impl ReceiptState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptState::Done => "done",
            ReceiptState::Failed => "failed",
            ReceiptState::Poison => "poison",
        }
    }

    pub fn parse(s: &str) -> ReceiptState {
        match s {
            "done" => ReceiptState::Done,
            "poison" => ReceiptState::Poison,
            _ => ReceiptState::Failed,
        }
    }
}

/// What happens to the message that triggered an invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageFate {
    /// Succeeded: deleted (if the lease is still held; the outputs are
    /// published only then).
    Complete { id: String, lease: String },
    /// Failed: visible again after `after`.
    Retry {
        id: String,
        lease: String,
        after: Duration,
    },
    /// Failed for the last time: moved to the poison queue `to`.
    Poison {
        id: String,
        lease: String,
        to: String,
    },
    /// Never ran (admission refused it): visible again at once, and this
    /// lease does not count as an attempt.
    Release { id: String, lease: String },
}

/// An output a successful invocation publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Publish {
    Message {
        queue: String,
        body: Bytes,
    },
    /// Through the outbox: written after the commit, again after a crash.
    Blob {
        path: String,
        body: Bytes,
    },
    /// An orchestration started, an event raised, an entity signalled.
    Durable(crate::durable::DurableOutput),
}

/// Everything an invocation changes in the event stores, committed in one
/// transaction with its record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    pub message: Option<MessageFate>,
    /// Published only if `message` is absent or its lease was still held.
    pub publish: Vec<Publish>,
    /// A timer's new status: `(function, status)`.
    pub timer: Option<(String, TimerStatus)>,
    pub receipt: Option<Receipt>,
}

/// A blob waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxBlob {
    pub id: String,
    pub path: String,
    pub body: Bytes,
    /// Failed writes so far.
    pub attempts: u32,
}

/// An outbox entry as the API lists it (without its bytes).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutboxEntry {
    pub id: String,
    pub path: String,
    pub size: u64,
    pub attempts: u32,
    /// `pending` (written soon, or retried) or `failed` (given up on: it
    /// waits for `kelvin blob outbox retry`).
    pub state: &'static str,
    /// Why the last write failed.
    pub error: Option<String>,
    pub created_us: i64,
}
