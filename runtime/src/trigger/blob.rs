//! The blob trigger: a scanner per function that processes each write of
//! each blob matching its path pattern once. A write is told apart by its
//! stamp (a file's inode, size and change times; see
//! [`crate::events::blobs::BlobInfo::stamp`]), so the same bytes written
//! again are processed again, as Azure's trigger fires per write; a
//! restart changes no stamp. What the function did with a path's latest
//! write is its receipt, committed with the record, so a restart neither
//! repeats a success nor forgets a failure. A write that failed
//! `max_attempts` times is recorded as poison and left alone. Blobs put
//! through the API (or written as outputs) wake the scanner and are
//! processed at once; files dropped into the container's folder are found
//! by a scan each second and processed once left unchanged for
//! [`QUIET`](crate::events::blobs::QUIET), so never half-written.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

use super::config::{Blob, BlobTrigger, Trigger};
use super::events::{Ended, Events, Job};
use crate::events::blobs::{BlobPath, etag};
use crate::events::envelope::{self, BlobMeta};
use crate::events::{Effects, Receipt, ReceiptState, micros, now_us};

/// How often a container's folder is scanned for dropped files.
pub const SCAN_EVERY: Duration = Duration::from_secs(1);

/// At most this many blobs of one function are processed at once.
const AT_ONCE: usize = 8;

struct State {
    /// The latest receipt of each path.
    receipts: HashMap<String, Receipt>,
    /// The hash of each file seen, by path, with the stamp it was read at.
    hashes: HashMap<String, (String, String)>,
    /// Paths being processed (one write of a path at a time).
    running: HashSet<String>,
    /// Files too large to hand to a function (warned once per write).
    too_large: HashSet<(String, String)>,
}

/// Runs until the events stop.
pub(crate) async fn scan(
    events: Arc<Events>,
    function: String,
    trigger: BlobTrigger,
    wake: Arc<Notify>,
) {
    let receipts = match events.store().receipts(&function).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(function, error = %e, "failed to read blob receipts; the blob trigger is off");
            return;
        }
    };
    let state = Arc::new(Mutex::new(State {
        receipts: receipts.into_iter().map(|r| (r.path.clone(), r)).collect(),
        hashes: HashMap::new(),
        running: HashSet::new(),
        too_large: HashSet::new(),
    }));
    let trigger = Arc::new(trigger);
    let at_once = Arc::new(Semaphore::new(AT_ONCE));
    let backlog = events
        .runtime()
        .metrics()
        .events
        .blob_backlog
        .with_label_values(&[function.as_str()]);
    loop {
        if events.is_stopping() {
            return;
        }
        match pass(&events, &function, &trigger, &state, &at_once).await {
            Ok(waiting) => backlog.set(waiting as i64),
            Err(e) => tracing::error!(function, error = %e, "failed to scan a blob container"),
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(SCAN_EVERY) => {}
            _ = events.stopped() => return,
        }
    }
}

/// One scan: starts every version due; how many are not done (the backlog).
async fn pass(
    events: &Arc<Events>,
    function: &str,
    trigger: &Arc<BlobTrigger>,
    state: &Arc<Mutex<State>>,
    at_once: &Arc<Semaphore>,
) -> std::io::Result<usize> {
    let container = trigger.path.container();
    let max_blob = events.runtime().manifest().server.max_blob;
    let listed = events.blobs().list(container, "").await?;
    {
        // Forget the hashes of files that are gone.
        let names: HashSet<&str> = listed.iter().map(|b| b.name.as_str()).collect();
        let prefix = format!("{container}/");
        state.lock().expect("state").hashes.retain(|full, _| {
            full.strip_prefix(&prefix)
                .is_some_and(|name| names.contains(name))
        });
    }
    let mut waiting = 0;
    for info in listed {
        let Some(params) = trigger.path.matches(&info.name) else {
            continue;
        };
        let Ok(path) = BlobPath::new(container, &info.name) else {
            continue;
        };
        let full = path.to_string();
        if !info.complete {
            // Still being written, as far as anyone can tell: a later scan.
            waiting += 1;
            continue;
        }
        let stamp = info.stamp;
        if info.size > max_blob {
            if state
                .lock()
                .expect("state")
                .too_large
                .insert((full.clone(), stamp))
            {
                tracing::warn!(
                    function,
                    path = full.as_str(),
                    size = info.size,
                    max_blob,
                    "a blob is over server.max_blob; it is not processed"
                );
            }
            continue;
        }
        let known = {
            let s = state.lock().expect("state");
            s.hashes
                .get(&full)
                .filter(|(st, _)| *st == stamp)
                .map(|(_, e)| e.clone())
        };
        // Only a file not seen like this before is read to learn its hash.
        let (tag, bytes) = match known {
            Some(tag) => (tag, None),
            None => {
                let Some(bytes) = events.blobs().get(&path).await? else {
                    continue;
                };
                let tag = etag(&bytes);
                state
                    .lock()
                    .expect("state")
                    .hashes
                    .insert(full.clone(), (stamp.clone(), tag.clone()));
                (tag, Some(bytes))
            }
        };
        let attempts = {
            let s = state.lock().expect("state");
            if s.running.contains(&full) {
                waiting += 1;
                continue;
            }
            // The receipt is this write's if it has its bytes and its
            // stamp (a receipt from before stamps matches its bytes).
            let this_write =
                |r: &&Receipt| r.etag == tag && (r.stamp.is_empty() || r.stamp == stamp);
            match s.receipts.get(&full).filter(this_write) {
                Some(r) if r.state != ReceiptState::Failed => continue,
                Some(r) => {
                    waiting += 1;
                    let due = r.updated_us + micros(trigger.backoff(r.attempts));
                    if due > now_us() {
                        continue;
                    }
                    r.attempts
                }
                None => {
                    waiting += 1;
                    0
                }
            }
        };
        let Ok(permit) = at_once.clone().acquire_owned().await else {
            break;
        };
        let bytes = match bytes {
            Some(b) => b,
            None => match events.blobs().get(&path).await? {
                Some(b) if etag(&b) == tag => b,
                // Changed or gone since the listing: the next pass sees it.
                _ => continue,
            },
        };
        state.lock().expect("state").running.insert(full.clone());
        let events = events.clone();
        let function = function.to_owned();
        let trigger = trigger.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let receipt = |state: ReceiptState, attempts: u32| Receipt {
                function: function.clone(),
                path: full.clone(),
                etag: tag.clone(),
                stamp: stamp.clone(),
                state,
                attempts,
                updated_us: now_us(),
            };
            let failed = attempts + 1;
            let failure = if failed >= trigger.max_attempts {
                receipt(ReceiptState::Poison, failed)
            } else {
                receipt(ReceiptState::Failed, failed)
            };
            let success = receipt(ReceiptState::Done, attempts);
            let input = envelope::blob_event(
                &BlobMeta {
                    container: path.container(),
                    name: path.name(),
                    etag: &tag,
                    params: &params,
                },
                &bytes,
                &function,
            );
            drop(bytes);
            let job = Job {
                function: function.clone(),
                trigger: Blob::TYPE,
                input,
                params,
                success: Effects {
                    receipt: Some(success.clone()),
                    ..Effects::default()
                },
                failure: Effects {
                    receipt: Some(failure.clone()),
                    ..Effects::default()
                },
                unstarted: Effects::default(),
            };
            let ran = events.invoke(job).await;
            let mut s = state.lock().expect("state");
            s.running.remove(&full);
            match ran {
                Ended::Recorded(record) => {
                    let r = if super::events::succeeded(&record) {
                        success
                    } else {
                        if failure.state == ReceiptState::Poison {
                            tracing::warn!(
                                function,
                                path = full.as_str(),
                                attempts = failed,
                                "a blob failed on every attempt and is recorded as poison"
                            );
                        }
                        failure
                    };
                    s.receipts.insert(full, r);
                }
                // Not started or not committed: the next pass tries again.
                Ended::Unstarted | Ended::NotCommitted => {}
            }
            drop(permit);
        });
    }
    Ok(waiting)
}
