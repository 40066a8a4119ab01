//! What the event triggers (timer, queue, blob) share: the stores, the
//! wake-ups (a message enqueued starts its consumer at once, no polling),
//! the blob outbox's writer, the gauges, and `Events::invoke`, which runs
//! one event and commits its effects with its record. Non-HTTP triggers
//! fire for the production slot only.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use crate::events::blobs::{BlobPath, BlobStore};
use crate::events::envelope::{self, Limits};
use crate::events::store::{EventStore, StoreError};
use crate::events::{Effects, Publish, now_us};
use crate::invoke::Event;
use crate::metering::{InvocationRecord, Outcome};
use crate::runtime::Runtime;
use crate::table::PRODUCTION;
use crate::trigger::config::POISON_SUFFIX;

/// Why a producer's request was refused.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error(
        "no queue named {0:?} in this app (queues are named by the manifest's triggers and outputs)"
    )]
    UnknownQueue(String),
    #[error(
        "no container named {0:?} in this app (containers are named by the manifest's blob triggers, outputs and inputs)"
    )]
    UnknownContainer(String),
    #[error("{what} of {size} bytes is over the {limit}-byte limit ({setting})")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
        setting: &'static str,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("blob store: {0}")]
    Blob(#[from] std::io::Error),
}

/// Writes of one output blob before it is given up on (kept as failed).
pub const OUTBOX_ATTEMPTS: u32 = 8;

/// One event to run: the function, its input, and what its success, its
/// failure or its return unstarted (the server stopping while it waited
/// for a slot) changes.
pub(crate) struct Job {
    pub function: String,
    pub trigger: &'static str,
    pub input: Bytes,
    /// Values for output paths' parameters: the trigger's (a blob path's
    /// parameters, a message's fields); the host's own come first.
    pub params: Vec<(String, String)>,
    pub success: Effects,
    pub failure: Effects,
    pub unstarted: Effects,
}

/// How a job ended.
pub(crate) enum Ended {
    /// The server stopped before it could start (its effects: `unstarted`).
    Unstarted,
    /// It ran; its record.
    Recorded(Box<InvocationRecord>),
    /// Its record and effects could not be committed (nothing changed).
    NotCommitted,
}

pub struct Events {
    runtime: Arc<Runtime>,
    store: Arc<dyn EventStore>,
    blobs: Arc<dyn BlobStore>,
    queues: BTreeSet<String>,
    containers: BTreeSet<String>,
    queue_wakers: Mutex<HashMap<String, Vec<Arc<Notify>>>>,
    container_wakers: Mutex<HashMap<String, Vec<Arc<Notify>>>>,
    outbox: Notify,
    stopping: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Schedules a durable instance or entity that an output gave work.
    durable: std::sync::OnceLock<DurableWaker>,
}

/// Wakes a durable instance or entity by id (the durable trigger's).
pub type DurableWaker = Box<dyn Fn(&str) + Send + Sync>;

impl Events {
    pub fn new(
        runtime: Arc<Runtime>,
        store: Arc<dyn EventStore>,
        blobs: Arc<dyn BlobStore>,
    ) -> Arc<Events> {
        let manifest = runtime.manifest();
        let queues = manifest.queues();
        let containers = manifest.containers();
        Arc::new(Events {
            runtime,
            store,
            blobs,
            queues,
            containers,
            queue_wakers: Mutex::default(),
            container_wakers: Mutex::default(),
            outbox: Notify::new(),
            stopping: watch::channel(false).0,
            tasks: Mutex::default(),
            durable: std::sync::OnceLock::new(),
        })
    }

    /// Who to wake when an output starts an orchestration, raises an event
    /// or signals an entity (set once, by the serving process).
    pub fn on_durable(&self, wake: DurableWaker) {
        let _ = self.durable.set(wake);
    }

    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    pub fn blobs(&self) -> &Arc<dyn BlobStore> {
        &self.blobs
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The app's queues (with their poison queues), for the API.
    pub fn queues(&self) -> &BTreeSet<String> {
        &self.queues
    }

    pub fn containers(&self) -> &BTreeSet<String> {
        &self.containers
    }

    /// Opens for business: releases the leases a previous process held
    /// (on one node, nothing runs before this) and starts writing the
    /// blobs its outbox kept. The triggers themselves are started by
    /// [`super::listen::start`].
    pub async fn open(self: &Arc<Self>) -> Result<(), StoreError> {
        let released = self.store.release_all().await?;
        if released > 0 {
            tracing::info!(
                messages = released,
                "queue messages leased before the last stop are visible again"
            );
        }
        self.keep(tokio::spawn(self.clone().write_outbox()));
        self.keep(tokio::spawn(self.clone().refresh_gauges()));
        Ok(())
    }

    /// Keeps a trigger's task, to stop it with the rest.
    pub(crate) fn keep(&self, task: JoinHandle<()>) {
        self.tasks.lock().expect("tasks lock").push(task);
    }

    /// A wake-up for the consumers of `queue`.
    pub(crate) fn queue_waker(&self, queue: &str) -> Arc<Notify> {
        self.waker(&self.queue_wakers, queue)
    }

    /// A wake-up for the triggers on `container`.
    pub(crate) fn container_waker(&self, container: &str) -> Arc<Notify> {
        self.waker(&self.container_wakers, container)
    }

    /// Stops starting events (at shutdown); those under way finish and are
    /// recorded, like any invocation (the runtime drains them).
    pub fn stop(&self) {
        let _ = self.stopping.send(true);
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
    }

    /// Resolves once [`Events::stop`] was called.
    pub(crate) async fn stopped(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    pub(crate) fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    fn waker(&self, map: &Mutex<HashMap<String, Vec<Arc<Notify>>>>, name: &str) -> Arc<Notify> {
        let n = Arc::new(Notify::new());
        map.lock()
            .expect("wakers lock")
            .entry(name.to_owned())
            .or_default()
            .push(n.clone());
        n
    }

    fn wake(map: &Mutex<HashMap<String, Vec<Arc<Notify>>>>, name: &str) {
        if let Some(ws) = map.lock().expect("wakers lock").get(name) {
            for w in ws {
                // A permit is stored if the consumer is not waiting yet: a
                // message enqueued while it leases is never missed.
                w.notify_one();
            }
        }
    }

    pub fn wake_queue(&self, queue: &str) {
        Events::wake(&self.queue_wakers, queue);
    }

    pub fn wake_container(&self, container: &str) {
        Events::wake(&self.container_wakers, container);
    }

    /// Whether the API accepts messages for `queue`.
    pub fn check_queue(&self, queue: &str) -> Result<(), EventError> {
        if self.queues.contains(queue) {
            Ok(())
        } else {
            Err(EventError::UnknownQueue(queue.to_owned()))
        }
    }

    pub fn check_container(&self, container: &str) -> Result<(), EventError> {
        if self.containers.contains(container) {
            Ok(())
        } else {
            Err(EventError::UnknownContainer(container.to_owned()))
        }
    }

    /// Enqueues one message (durably) and wakes the queue's consumers.
    pub async fn send(&self, queue: &str, body: Bytes) -> Result<String, EventError> {
        self.check_queue(queue)?;
        let limit = self.runtime.manifest().server.max_message;
        if body.len() as u64 > limit {
            return Err(EventError::TooLarge {
                what: "a message",
                size: body.len() as u64,
                limit,
                setting: "server.max_message",
            });
        }
        let id = self.store.enqueue(queue, vec![body]).await?.remove(0);
        self.wake_queue(queue);
        Ok(id)
    }

    /// Writes a blob (durably) and wakes the container's triggers; its etag.
    pub async fn put_blob(&self, path: &BlobPath, body: Bytes) -> Result<String, EventError> {
        self.check_container(path.container())?;
        let limit = self.runtime.manifest().server.max_blob;
        if body.len() as u64 > limit {
            return Err(EventError::TooLarge {
                what: "a blob",
                size: body.len() as u64,
                limit,
                setting: "server.max_blob",
            });
        }
        let etag = self.blobs.put(path, body).await?;
        self.wake_container(path.container());
        Ok(etag)
    }

    /// The limits outputs are held to.
    pub(crate) fn limits(&self) -> Limits {
        let s = &self.runtime.manifest().server;
        Limits {
            max_message: s.max_message,
            max_blob: s.max_blob,
        }
    }

    /// After a commit that published: wakes whoever consumes what it
    /// published.
    pub(crate) fn published(&self, publish: &[Publish]) {
        let mut blobs = false;
        for p in publish {
            match p {
                Publish::Message { queue, .. } => self.wake_queue(queue),
                Publish::Blob { .. } => blobs = true,
                Publish::Durable(o) => {
                    if let Some(wake) = self.durable.get() {
                        wake(o.target());
                    }
                }
            }
        }
        if blobs {
            self.outbox.notify_one();
        }
    }

    /// Runs one event in production and commits its record with its
    /// effects (the outputs only on success, and only once).
    pub(crate) async fn invoke(self: &Arc<Self>, job: Job) -> Ended {
        let Job {
            function,
            trigger,
            input,
            mut params,
            success,
            failure,
            unstarted,
        } = job;
        let unit = match self.runtime.production(&function) {
            Ok(unit) => unit,
            Err(e) => {
                tracing::error!(error = %e, "an event trigger names a function that is not in production");
                return Ended::NotCommitted;
            }
        };
        // The event waits for a slot (its message stays leased, renewed);
        // a stop while it waits gives it back, unstarted and unrecorded.
        let admitted = tokio::select! {
            t = self.runtime.admit_patiently(&unit, trigger) => t,
            () = self.stopped() => {
                let (durable, _) = self.store.settle(None, unstarted);
                let _ = durable.wait().await;
                return Ended::Unstarted;
            }
        };
        let ticket = match admitted {
            Ok(ticket) => ticket,
            Err(e) => {
                tracing::error!(error = %e, "an event trigger names a function that is not in production");
                return Ended::NotCommitted;
            }
        };
        // Host parameters come first, and a value is looked up first come
        // first served: a message's own field cannot stand in for them.
        params.insert(
            0,
            ("invocation_id".into(), ticket.invocation_id().to_owned()),
        );
        let files: Vec<crate::manifest::FileMount> = {
            let value = |name: &str| super::config::param(&params, name);
            super::inputs::blob_inputs(
                &*self.blobs,
                &self.runtime.manifest().server.state_dir,
                &function,
                &ticket.unit().spec.inputs,
                value,
            )
            .await
            .into_iter()
            .collect()
        };
        let outputs = ticket.unit().spec.outputs.clone();
        let limits = self.limits();
        let function_name = function.clone();
        let accept = move |stdout: Bytes| -> Result<Vec<Publish>, String> {
            if outputs.is_empty() {
                return Ok(Vec::new());
            }
            let answer = envelope::parse(&stdout)?;
            for line in &answer.logs {
                tracing::info!(target: "kelvin::guest", function = function_name.as_str(), "{line}");
            }
            let value = |name: &str| super::config::param(&params, name);
            envelope::publish(&outputs, &answer, &value, &limits)
        };
        let store = self.store.clone();
        let published = Arc::new(Mutex::new(None));
        let flag = published.clone();
        let settle = move |record: &InvocationRecord, output: Option<&Vec<Publish>>| {
            let mut effects = if succeeded(record) { success } else { failure };
            if succeeded(record) {
                effects.publish = output.cloned().unwrap_or_default();
            }
            let (durable, was_published) = store.settle(Some(record.clone()), effects);
            *flag.lock().expect("flag lock") = Some(was_published);
            crate::metering::Settled::with_record(durable)
        };
        let event = Event {
            trigger,
            input,
            env: Vec::new(),
            files,
        };
        let checked = self
            .runtime
            .start_settled(ticket, event, accept, (), settle)
            .await;
        if !checked.durable {
            return Ended::NotCommitted;
        }
        let was_published = published
            .lock()
            .expect("flag lock")
            .take()
            .is_some_and(|p| p.load(std::sync::atomic::Ordering::SeqCst));
        if was_published && let Some(publish) = &checked.output {
            self.published(publish);
        }
        Ended::Recorded(Box::new(checked.record))
    }

    /// Writes the blobs committed as outputs, then forgets them: at least
    /// once (again after a crash), and a blob written twice is the same
    /// bytes.
    async fn write_outbox(self: Arc<Self>) {
        loop {
            let pending = match self.store.outbox().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "failed to read the blob outbox");
                    Vec::new()
                }
            };
            let mut done = Vec::new();
            for item in &pending {
                let written = match BlobPath::parse(&item.path) {
                    Ok(path) => match self.blobs.put(&path, item.body.clone()).await {
                        Ok(_) => {
                            self.wake_container(path.container());
                            true
                        }
                        Err(e) => {
                            self.outbox_failed(item, &e).await;
                            false
                        }
                    },
                    // Checked before it was committed; never retried.
                    Err(_) => true,
                };
                if written {
                    done.push(item.id.clone());
                }
            }
            let progressed = !done.is_empty();
            if progressed && let Err(e) = self.store.outbox_done(done).await {
                tracing::error!(error = %e, "failed to clear the blob outbox");
            }
            self.count_outbox().await;
            if progressed && pending.len() > 1 {
                continue;
            }
            tokio::select! {
                _ = self.outbox.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(if pending.is_empty() { 60 } else { 1 })) => {}
            }
        }
    }

    /// A failed write of an outbox blob: retried with backoff (1 s,
    /// doubling, at most a minute apart) up to [`OUTBOX_ATTEMPTS`] times;
    /// a name that clashes with the blobs there is given up on at once
    /// (writing it again changes nothing). Given up on, it stays in the
    /// outbox as failed, listed and retried by `kelvin blob outbox`.
    async fn outbox_failed(&self, item: &crate::events::OutboxBlob, e: &std::io::Error) {
        let attempts = item.attempts + 1;
        let permanent = crate::events::blobs::is_clash(e);
        let retry_at = (!permanent && attempts < OUTBOX_ATTEMPTS).then(|| {
            let backoff = Duration::from_secs(1 << attempts.min(6)).min(Duration::from_secs(60));
            now_us() + crate::events::micros(backoff)
        });
        if retry_at.is_some() {
            tracing::warn!(path = item.path.as_str(), attempts, error = %e, "failed to write an output blob; retrying");
        } else {
            tracing::error!(
                path = item.path.as_str(),
                outbox_id = item.id.as_str(),
                attempts,
                error = %e,
                "an output blob could not be written and is kept as failed in the outbox (`kelvin blob outbox list`, `retry`)"
            );
        }
        if let Err(se) = self
            .store
            .outbox_attempt(&item.id, e.to_string(), retry_at)
            .await
        {
            tracing::error!(error = %se, "failed to record an outbox attempt");
        }
    }

    /// Sets the outbox gauges.
    async fn count_outbox(&self) {
        let Ok(entries) = self.store.outbox_entries(100_000).await else {
            return;
        };
        let gauge = &self.runtime.metrics().events.blob_outbox;
        for state in ["pending", "failed"] {
            let n = entries.iter().filter(|e| e.state == state).count();
            gauge.with_label_values(&[state]).set(n as i64);
        }
    }

    /// The outbox, for the API.
    pub async fn outbox_entries(&self) -> Result<Vec<crate::events::OutboxEntry>, EventError> {
        Ok(self.store.outbox_entries(1000).await?)
    }

    /// Makes failed outbox entries (`ids`, or all) pending again and wakes
    /// the writer; how many.
    pub async fn retry_outbox(&self, ids: Option<Vec<String>>) -> Result<u64, EventError> {
        let n = self.store.outbox_retry(ids).await?;
        self.outbox.notify_one();
        Ok(n)
    }

    /// Keeps the queue gauges current (once a second).
    async fn refresh_gauges(self: Arc<Self>) {
        let gauges = self.runtime.metrics().events.clone();
        for q in self.queues.iter().filter(|q| !q.ends_with(POISON_SUFFIX)) {
            gauges.queue_messages.with_label_values(&[q]);
            gauges.queue_poison.with_label_values(&[q]);
            gauges.queue_leased.with_label_values(&[q]);
            gauges.queue_oldest_age.with_label_values(&[q]);
        }
        loop {
            if let Ok(stats) = self.store.stats().await {
                let now = now_us();
                for q in &self.queues {
                    let s = stats.iter().find(|s| s.name == *q);
                    let depth = s.map_or(0, |s| s.depth as i64);
                    if let Some(original) = q.strip_suffix(POISON_SUFFIX)
                        && self.queues.contains(original)
                    {
                        gauges
                            .queue_poison
                            .with_label_values(&[original])
                            .set(depth);
                        continue;
                    }
                    gauges.queue_messages.with_label_values(&[q]).set(depth);
                    gauges
                        .queue_leased
                        .with_label_values(&[q])
                        .set(s.map_or(0, |s| s.leased as i64));
                    let age = s
                        .and_then(|s| s.oldest_us)
                        .map_or(0.0, |o| (now - o).max(0) as f64 / 1e6);
                    gauges.queue_oldest_age.with_label_values(&[q]).set(age);
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Commits the outputs of an HTTP invocation with its record (the
    /// HTTP trigger's outputs): durable when the `Durable` resolves; then
    /// `Events::published` wakes their consumers if the flag is set.
    pub fn settle_http(
        &self,
        record: &InvocationRecord,
        publish: Vec<Publish>,
    ) -> (crate::metering::Durable, crate::events::store::Published) {
        let effects = Effects {
            publish: if succeeded(record) {
                publish
            } else {
                Vec::new()
            },
            ..Effects::default()
        };
        self.store.settle(Some(record.clone()), effects)
    }
}

/// Whether an invocation succeeded (an abandoned one ran to a success;
/// only its caller was gone).
pub(crate) fn succeeded(record: &InvocationRecord) -> bool {
    matches!(record.outcome, Outcome::Ok | Outcome::Abandoned)
}

/// The production slot's name (non-HTTP triggers fire for it only).
pub const SLOT: &str = PRODUCTION;
