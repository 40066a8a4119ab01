//! Group commit for a SQLite database: one writer thread takes every job
//! that has queued up and runs them in one transaction, so callers share an
//! fsync instead of paying one each. The ledger's records, queue messages,
//! leases, blob receipts, timer status and outputs all go through the same
//! writer, which is what lets an invocation's record and its effects commit
//! together.

use std::sync::Mutex;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, Transaction};

use crate::metering::Durable;

/// Jobs written in one transaction at most.
const MAX_BATCH: usize = 4096;

/// How long a failed batch is retried before its jobs are given up as not
/// durable: longer than the busy timeout, so another process holding the
/// database for a few seconds (a backup, a compaction) delays callers
/// instead of failing them.
pub const RETRY_FOR: Duration = Duration::from_secs(15);

/// Work done inside a group's transaction. It may run more than once (a
/// failed batch is rolled back and retried), so it must only write through
/// `tx` and keep any result it computes until the last run. An error fails
/// (and retries) the whole batch: logical outcomes ("the lease was lost")
/// are values the job keeps, not errors.
pub type Job = Box<dyn FnMut(&Transaction<'_>) -> rusqlite::Result<()> + Send>;

type Ack = tokio::sync::oneshot::Sender<Result<(), String>>;

/// The writer of one database.
pub struct GroupCommit {
    tx: Mutex<Option<mpsc::Sender<(Job, Ack)>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl GroupCommit {
    /// Starts the writer thread over `conn` (opened in WAL mode with
    /// `synchronous = FULL` by the caller: a commit is fsynced before it is
    /// acknowledged).
    pub fn start(conn: Connection, name: &str) -> std::io::Result<GroupCommit> {
        let (tx, rx) = mpsc::channel::<(Job, Ack)>();
        let writer = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || write_loop(conn, rx))?;
        Ok(GroupCommit {
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Queues `job`; the result resolves once its transaction committed
    /// (or was given up).
    pub fn submit(&self, job: Job) -> Durable {
        let (ack, done) = tokio::sync::oneshot::channel();
        match &*self.tx.lock().expect("writer lock") {
            Some(tx) if tx.send((job, ack)).is_ok() => Durable::pending(done),
            _ => Durable::failed("the database is closed"),
        }
    }

    /// Runs `f` in a group's transaction and returns what it computed once
    /// that transaction is durable.
    pub async fn run<T: Send + 'static>(
        &self,
        mut f: impl FnMut(&Transaction<'_>) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, String> {
        let out = std::sync::Arc::new(Mutex::new(None));
        let slot = out.clone();
        self.submit(Box::new(move |tx| {
            let v = f(tx)?;
            *slot.lock().expect("result lock") = Some(v);
            Ok(())
        }))
        .wait()
        .await?;
        let v = out.lock().expect("result lock").take();
        v.ok_or_else(|| "the job did not run".to_owned())
    }

    /// Commits whatever is queued and stops the writer (at shutdown); jobs
    /// submitted after are refused.
    pub fn close(&self) {
        self.tx.lock().expect("writer lock").take();
        if let Some(w) = self.writer.lock().expect("writer lock").take() {
            let _ = w.join();
        }
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.close();
    }
}

/// Takes what has queued up, runs it in one transaction (retrying a failed
/// one for [`RETRY_FOR`]), acknowledges it.
fn write_loop(mut conn: Connection, rx: mpsc::Receiver<(Job, Ack)>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let mut backoff = Duration::from_millis(20);
        let result = loop {
            match run_batch(&mut conn, &mut batch) {
                Ok(()) => break Ok(()),
                Err(e) if started.elapsed() + backoff < RETRY_FOR => {
                    tracing::warn!(error = %e, jobs = batch.len(), "failed to write to the database; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    tracing::error!(error = %e, jobs = batch.len(), "failed to write to the database; giving the writes up as not durable");
                    break Err(e.to_string());
                }
            }
        };
        for (_, ack) in batch {
            let _ = ack.send(result.clone());
        }
    }
}

fn run_batch(conn: &mut Connection, batch: &mut [(Job, Ack)]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    for (job, _) in batch.iter_mut() {
        job(&tx)?;
    }
    tx.commit()
}
