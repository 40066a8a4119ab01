//! The durable trigger: runs orchestration episodes, activities and entity
//! operations from the durable store, and the client operations (start,
//! raise, terminate, ...) the management API and bindings use. An instance
//! or entity runs one step at a time; the messages that arrived while it
//! ran or waited are handed over together in its next episode. Each step
//! commits its record with its effects ([`DurableStore::commit`]), then
//! what it made ready is scheduled here, in memory; what becomes ready
//! later (timers, retries) is found by one loop that sleeps until then.
//! One node: an instance's exclusivity is this process's.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use super::config::DurableRole;
use crate::durable::episode::{self, Known, NewMessage};
use crate::durable::store::{
    Commit, Created, DurableError, DurableStore, Filter, InstanceChange, NewInstance,
};
use crate::durable::{
    Answer, EntityAnswer, EntityId, HistoryEvent, InboxItem, Instance, Message, RuntimeStatus,
    WorkItem, now_us, parse_result, rfc3339,
};
use crate::invoke::Event;
use crate::metering::{InvocationRecord, Settled};
use crate::runtime::{Runtime, Ticket};
use crate::table::Unit;

/// Episodes and entity steps running at once (each an invocation).
const STEPS: usize = 64;

/// Why a client operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no orchestrator function named {0:?} in this app")]
    UnknownOrchestrator(String),
    #[error("no entity function named {0:?} in this app")]
    UnknownEntity(String),
    #[error("no instance with id {0:?}")]
    NotFound(String),
    #[error("instance {0:?} has ended ({1})")]
    Ended(String, &'static str),
    #[error("{0}")]
    Invalid(String),
    #[error(
        "instance {0:?} holds as many raised events as one generation may (1,000 events, 4 MiB of input): an orchestration that takes events without end should continue as new"
    )]
    TooManyEvents(String),
    #[error(transparent)]
    Store(#[from] DurableError),
}

#[derive(Default)]
struct Sched {
    ready: VecDeque<String>,
    queued: HashSet<String>,
    running: HashSet<String>,
    /// Scheduled again while it ran: queued once it finishes.
    again: HashSet<String>,
    /// Work items handed to the activity loop and not yet settled.
    work: HashSet<String>,
}

pub struct DurableFunctions {
    runtime: Arc<Runtime>,
    store: Arc<dyn DurableStore>,
    roles: BTreeMap<String, DurableRole>,
    sched: Mutex<Sched>,
    ready: Notify,
    work_tx: mpsc::UnboundedSender<WorkItem>,
    work_rx: Mutex<Option<mpsc::UnboundedReceiver<WorkItem>>>,
    /// Per activity function: its concurrency, so a fan-out waits here and
    /// never overflows the function's admission queue.
    slots: HashMap<String, Arc<Semaphore>>,
    /// Wakes the loop that finds what became due (a new timer or retry).
    delayed: Notify,
    /// Per instance or entity: the messages committed for it since its
    /// last step began, when all of them came through this process
    /// (`Some`); `None` or absent: read the store.
    inboxes: Mutex<HashMap<String, Option<Vec<InboxItem>>>>,
    /// Instances' state and history as the last step left them: an episode
    /// reads only its inbox from the store.
    cache: Mutex<lru::LruCache<String, Arc<Loaded>>>,
    /// Orchestrator versions instances are pinned to, beside production.
    pinned: Arc<Mutex<HashMap<String, Arc<Unit>>>>,
    /// Where pinned versions are kept across deploys and restarts.
    deployer: std::sync::OnceLock<Arc<crate::deploy::Deployer>>,
    /// Slots won for a step that found its function busy: it waited for
    /// one outside the step (a step waiting inside would hold one of the
    /// `STEPS` that other functions' steps need), and runs with it next.
    reserved: Mutex<HashMap<String, Ticket>>,
    stopping: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// An instance as its last step left it.
struct Loaded {
    instance: Instance,
    history: Arc<Vec<HistoryEvent>>,
}

/// Instances whose state is kept in memory between steps.
const CACHED: usize = 10_000;

struct Roles<'a>(&'a BTreeMap<String, DurableRole>);

impl Known for Roles<'_> {
    fn activity(&self, name: &str) -> bool {
        self.0.get(name) == Some(&DurableRole::Activity)
    }
    fn orchestrator(&self, name: &str) -> bool {
        self.0.get(name) == Some(&DurableRole::Orchestrator)
    }
    fn entity(&self, name: &str) -> bool {
        self.0.get(name) == Some(&DurableRole::Entity)
    }
}

/// What a committed step made ready, to schedule once it is durable.
#[derive(Default)]
struct Next {
    /// Messages it committed, handed to their targets in memory.
    deliver: Vec<InboxItem>,
    /// Targets given messages only the store has (a sub-orchestration's
    /// start, a parent's failed child).
    targets: Vec<String>,
    work: Vec<WorkItem>,
    delayed: bool,
    /// Set by the store once the commit applied (an activity result whose
    /// work item was gone inserts nothing).
    inserted: Arc<AtomicBool>,
    /// The instance or entity whose step this commit is: read back from
    /// the store and stepped again if it did not apply (it acted on a
    /// message another step had consumed).
    step: Option<String>,
}

impl Next {
    fn applied(&self) -> bool {
        self.inserted.load(Ordering::SeqCst)
    }

    /// What `commit` makes ready once it is durable; `step`: the instance
    /// or entity it is a step of (`None`: an activity's result).
    fn of(commit: &mut Commit, step: Option<&str>) -> Next {
        let now = now_us();
        let mut next = Next {
            step: step.map(str::to_owned),
            ..Next::default()
        };
        for m in &commit.messages {
            if m.visible_us <= now {
                next.deliver.push(InboxItem {
                    id: m.id.clone(),
                    target: m.target.clone(),
                    generation: m.generation,
                    message: m.message.clone(),
                    visible_us: m.visible_us,
                });
            } else {
                next.delayed = true;
            }
        }
        for c in &commit.create {
            next.targets.push(c.id.clone());
            // A child whose id was taken fails its parent's task inside
            // the store: the parent has a message then.
            if let Some(p) = &c.parent {
                next.targets.push(p.instance_id.clone());
            }
        }
        for w in &commit.work {
            if w.visible_us <= now {
                next.work.push(w.clone());
            } else {
                next.delayed = true;
            }
        }
        next.delayed |= commit.work_retry.is_some();
        commit.inserted = Some(next.inserted.clone());
        next
    }
}

impl DurableFunctions {
    pub fn new(runtime: Arc<Runtime>, store: Arc<dyn DurableStore>) -> Arc<DurableFunctions> {
        let manifest = runtime.manifest();
        let roles = manifest.durable_roles();
        let slots = manifest
            .functions
            .iter()
            .filter(|f| roles.get(f.name.as_str()) == Some(&DurableRole::Activity))
            .map(|f| {
                (
                    f.name.to_string(),
                    Arc::new(Semaphore::new(f.concurrency.max.get() as usize)),
                )
            })
            .collect();
        let (work_tx, work_rx) = mpsc::unbounded_channel();
        Arc::new(DurableFunctions {
            runtime,
            store,
            roles,
            sched: Mutex::default(),
            ready: Notify::new(),
            work_tx,
            work_rx: Mutex::new(Some(work_rx)),
            slots,
            delayed: Notify::new(),
            inboxes: Mutex::default(),
            cache: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(CACHED).expect("non-zero"),
            )),
            pinned: Arc::default(),
            deployer: std::sync::OnceLock::new(),
            reserved: Mutex::default(),
            stopping: watch::channel(false).0,
            tasks: Mutex::default(),
        })
    }

    pub fn store(&self) -> &Arc<dyn DurableStore> {
        &self.store
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Keeps the orchestrator versions instances are pinned to through
    /// deploys (never pruned while pinned) and restarts (loaded from the
    /// deployment store).
    pub fn keep_versions_with(&self, deployer: Arc<crate::deploy::Deployer>) {
        let pinned = self.pinned.clone();
        deployer.retain_versions(Box::new(move |version| {
            pinned.lock().expect("pinned lock").contains_key(version)
        }));
        let _ = self.deployer.set(deployer);
    }

    /// The unit of a kept version (loaded once from the deployment store).
    fn pinned_unit(&self, version: &str) -> Option<Arc<Unit>> {
        if let Some(unit) = self.pinned.lock().expect("pinned lock").get(version) {
            return Some(unit.clone());
        }
        let unit = match self.deployer.get()?.unit_of_version(version) {
            Ok(unit) => unit,
            Err(e) => {
                tracing::warn!(version, error = %e, "a pinned orchestrator version could not be loaded");
                return None;
            }
        };
        self.pinned
            .lock()
            .expect("pinned lock")
            .insert(version.to_owned(), unit.clone());
        Some(unit)
    }

    /// Schedules `target` (an instance or entity id) that was given work
    /// outside this trigger (an output binding's commit).
    pub fn wake(&self, target: &str) {
        self.schedule(target);
    }

    /// Whether the app has any durable function.
    pub fn any(&self) -> bool {
        !self.roles.is_empty()
    }

    /// Starts running: what was pending when the last process stopped
    /// (every message and work item due; an activity that was running
    /// then runs again), then the loops.
    pub async fn start(self: &Arc<Self>) -> Result<(), DurableError> {
        // The versions running instances are pinned to, kept from the
        // first moment (a deploy could otherwise prune one).
        for version in self.store.live_versions().await? {
            let _ = self.pinned_unit(&version);
        }
        let now = now_us();
        let (targets, work) = self.store.due(i64::MIN, now).await?;
        if !targets.is_empty() || !work.is_empty() {
            tracing::info!(
                instances = targets.len(),
                activities = work.len(),
                "durable work pending since the last stop resumes"
            );
        }
        for t in targets {
            self.schedule(&t);
        }
        for w in work {
            self.dispatch_work(w);
        }
        let rx = self
            .work_rx
            .lock()
            .expect("work lock")
            .take()
            .expect("durable functions start once");
        let mut tasks = self.tasks.lock().expect("tasks lock");
        tasks.push(tokio::spawn(self.clone().run_steps()));
        tasks.push(tokio::spawn(self.clone().run_activities(rx)));
        tasks.push(tokio::spawn(self.clone().find_due(now)));
        Ok(())
    }

    /// Stops starting steps (at shutdown); those under way finish and are
    /// recorded, like any invocation.
    pub fn stop(&self) {
        let _ = self.stopping.send(true);
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
    }

    async fn stopped(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Queues `target` (an instance or entity id) for a step, its inbox to
    /// be read from the store (it has messages this process did not hand
    /// over: a start, an API call, an output, a timer due).
    fn schedule(&self, target: &str) {
        self.inboxes
            .lock()
            .expect("inboxes lock")
            .insert(target.to_owned(), None);
        self.queue(target);
    }

    /// Hands a committed message to its target in memory: its next step
    /// needs not read the store for it, if its inbox is known.
    fn deliver(&self, item: InboxItem) {
        let target = item.target.clone();
        if let Some(Some(items)) = self.inboxes.lock().expect("inboxes lock").get_mut(&target) {
            items.push(item);
        }
        self.queue(&target);
    }

    /// The messages for a step of `target`: those handed over in memory
    /// if its inbox is known (every message since its last step came that
    /// way), else the store's. From now on, it collects what arrives.
    async fn take_inbox(&self, target: &str, now: i64) -> Result<Vec<InboxItem>, DurableError> {
        let known = self
            .inboxes
            .lock()
            .expect("inboxes lock")
            .insert(target.to_owned(), Some(Vec::new()));
        if let Some(Some(items)) = known {
            return Ok(items);
        }
        let read = match self.store.inbox(target, now).await {
            Ok(read) => read,
            Err(e) => {
                self.forget_inbox(target);
                return Err(e);
            }
        };
        // Handed over while the store was read: those it returned already.
        if let Some(Some(items)) = self.inboxes.lock().expect("inboxes lock").get_mut(target) {
            let ids: HashSet<&str> = read.iter().map(|i| i.id.as_str()).collect();
            items.retain(|i| !ids.contains(i.id.as_str()));
        }
        Ok(read)
    }

    /// The next step of `target` reads its inbox from the store (this one
    /// left messages there, or it ended).
    fn forget_inbox(&self, target: &str) {
        self.inboxes.lock().expect("inboxes lock").remove(target);
    }

    fn queue(&self, target: &str) {
        let mut s = self.sched.lock().expect("sched lock");
        if s.running.contains(target) {
            s.again.insert(target.to_owned());
        } else if s.queued.insert(target.to_owned()) {
            s.ready.push_back(target.to_owned());
            drop(s);
            self.ready.notify_one();
        }
    }

    fn dispatch_work(&self, w: WorkItem) {
        if self
            .sched
            .lock()
            .expect("sched lock")
            .work
            .insert(w.id.clone())
        {
            let _ = self.work_tx.send(w);
        }
    }

    fn next(&self, next: Next) {
        let inserted = next.applied();
        if !inserted && let Some(target) = &next.step {
            // Nothing of the step applied: what it acted on is read back.
            tracing::debug!(
                target = target.as_str(),
                "a step acted on a message another step had consumed; it runs again from the store"
            );
            self.cache.lock().expect("cache lock").pop(target);
            self.schedule(target);
            return;
        }
        for item in next.deliver {
            if inserted {
                self.deliver(item);
            } else {
                self.schedule(&item.target);
            }
        }
        for t in &next.targets {
            self.schedule(t);
        }
        for w in next.work {
            self.dispatch_work(w);
        }
        if next.delayed {
            self.delayed.notify_one();
        }
    }

    /// Schedules `target` again after `delay` (its step could not run).
    fn later(self: &Arc<Self>, target: String, delay: Duration) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            me.schedule(&target);
        });
    }

    async fn run_steps(self: Arc<Self>) {
        let permits = Arc::new(Semaphore::new(STEPS));
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let target = loop {
                let popped = {
                    let mut s = self.sched.lock().expect("sched lock");
                    let t = s.ready.pop_front();
                    if let Some(t) = &t {
                        s.queued.remove(t);
                        s.running.insert(t.clone());
                    }
                    t
                };
                match popped {
                    Some(t) => break t,
                    None => tokio::select! {
                        _ = self.ready.notified() => {}
                        _ = self.stopped() => return,
                    },
                }
            };
            let me = self.clone();
            tokio::spawn(async move {
                // Boxed: a step's state machine is kilobytes, which the
                // task would otherwise copy when it is spawned and when it
                // ends.
                let result = if EntityId::is_entity(&target) {
                    Box::pin(me.entity_step(&target)).await
                } else {
                    Box::pin(me.episode(&target)).await
                };
                if let Err(e) = result {
                    tracing::error!(target = target.as_str(), error = %e, "a durable step failed; retrying in 1 s");
                    me.later(target.clone(), Duration::from_secs(1));
                }
                let again = {
                    let mut s = me.sched.lock().expect("sched lock");
                    s.running.remove(&target);
                    s.again.remove(&target)
                };
                if again {
                    // Queued, not scheduled: what was handed over meanwhile
                    // stays in memory (a `schedule` during the step has
                    // already sent the next one to the store).
                    me.queue(&target);
                }
                drop(permit);
            });
        }
    }

    /// The unit an instance runs: the version it is pinned to.
    fn unit_of(&self, instance: &Instance) -> Result<Arc<Unit>, DurableError> {
        let production = self
            .runtime
            .production(&instance.name)
            .map_err(|e| DurableError::Failed(e.to_string()))?;
        // Started by an output binding: its first episode pins it.
        if production.version.as_str() == instance.version || instance.version.is_empty() {
            return Ok(production);
        }
        if let Some(unit) = self.pinned_unit(&instance.version) {
            return Ok(unit);
        }
        tracing::warn!(
            instance = instance.id.as_str(),
            pinned = instance.version.as_str(),
            running = production.version.as_str(),
            "the orchestrator version this instance started with is no longer loaded; it continues on the current one"
        );
        Ok(production)
    }

    /// A slot of `unit`'s function for a step of `target`: the one won for
    /// it while it waited, or a free one; `None` if it must wait (a task
    /// waits for a slot outside the step, then schedules it again, so a
    /// busy function costs neither a rejection record nor a retry loop).
    fn admit(
        self: &Arc<Self>,
        unit: &Arc<Unit>,
        trigger: &'static str,
        target: &str,
    ) -> Result<Option<Ticket>, DurableError> {
        let won = self.reserved.lock().expect("reserved lock").remove(target);
        if let Some(ticket) = won {
            // Won for the version this step runs (a deploy may have moved
            // an entity meanwhile: the slot is the function's either way).
            if ticket.unit().key == unit.key {
                return Ok(Some(ticket));
            }
        }
        let failed = |e: crate::runtime::UnknownFunction| DurableError::Failed(e.to_string());
        if let Some(ticket) = self.runtime.try_admit(unit, trigger).map_err(failed)? {
            return Ok(Some(ticket));
        }
        let me = self.clone();
        let unit = unit.clone();
        let target = target.to_owned();
        tokio::spawn(async move {
            let ticket = tokio::select! {
                t = me.runtime.admit_patiently(&unit, trigger) => t,
                () = me.stopped() => return,
            };
            if let Ok(ticket) = ticket {
                me.reserved
                    .lock()
                    .expect("reserved lock")
                    .insert(target.clone(), ticket);
            }
            me.schedule(&target);
        });
        Ok(None)
    }

    /// One orchestration episode: the messages waiting for `id`, handed to
    /// its orchestrator with the history, and the answer committed.
    async fn episode(self: &Arc<Self>, id: &str) -> Result<(), DurableError> {
        let now = now_us();
        let inbox = self.take_inbox(id, now).await?;
        if inbox.is_empty() {
            return Ok(());
        }
        let cached = self.cache.lock().expect("cache lock").get(id).cloned();
        let instance = match &cached {
            Some(c) => Some(c.instance.clone()),
            None => self.store.instance(id).await?,
        };
        let Some(instance) = instance else {
            // Messages for an instance purged meanwhile.
            let commit = Commit {
                consumed: inbox.into_iter().map(|m| m.id).collect(),
                ..Commit::default()
            };
            self.store.commit(None, commit).wait().await?;
            self.forget_inbox(id);
            return Ok(());
        };
        let mut consumed = Vec::new();
        let mut new = Vec::new();
        let mut host_only = false;
        let mut runs = false;
        let mut status = instance.status;
        let mut terminated = None;
        let mut kept = false;
        for item in inbox {
            let Message::Event { event } = item.message else {
                consumed.push(item.id);
                continue;
            };
            let stale = item.generation.is_some_and(|g| g != instance.generation);
            if status.ended() || stale || terminated.is_some() {
                consumed.push(item.id);
                continue;
            }
            match event {
                HistoryEvent::ExecutionTerminated { reason } => {
                    consumed.push(item.id);
                    terminated = Some(reason);
                }
                HistoryEvent::ExecutionSuspended { reason } => {
                    consumed.push(item.id);
                    if status != RuntimeStatus::Suspended {
                        status = RuntimeStatus::Suspended;
                        new.push(HistoryEvent::ExecutionSuspended { reason });
                        host_only = true;
                    }
                }
                HistoryEvent::ExecutionResumed { reason } => {
                    consumed.push(item.id);
                    if status == RuntimeStatus::Suspended {
                        status = RuntimeStatus::Running;
                        new.push(HistoryEvent::ExecutionResumed { reason });
                        host_only = true;
                    }
                }
                // Kept until it resumes.
                _ if status == RuntimeStatus::Suspended => kept = true,
                event => {
                    consumed.push(item.id);
                    new.push(event);
                    runs = true;
                }
            }
        }
        // Events kept while it was suspended, and then it resumed: they
        // are the next episode's.
        if kept && status != RuntimeStatus::Suspended {
            self.schedule(id);
        }
        if !(runs || host_only || terminated.is_some()) {
            // Only dropped messages: nothing to append.
            let commit = Commit {
                consumed,
                ..Commit::default()
            };
            self.store.commit(None, commit).wait().await?;
            return Ok(());
        }
        let history = match cached {
            Some(c) => c.history.clone(),
            None => Arc::new(self.store.history(id).await?),
        };
        let from_seq = history.len() as u64;
        // Until this step is committed, the cached state is not the truth.
        self.cache.lock().expect("cache lock").pop(id);

        if let Some(reason) = terminated {
            new.push(HistoryEvent::ExecutionTerminated {
                reason: reason.clone(),
            });
            let commit = Commit {
                consumed,
                instance: Some(InstanceChange {
                    id: id.to_owned(),
                    status: RuntimeStatus::Terminated,
                    output: Some(Value::String(reason.clone())),
                    custom_status: None,
                    append: new,
                    from_seq,
                    restart: None,
                    pin: None,
                }),
                messages: episode::to_parent(
                    &instance,
                    Err(format!("the sub-orchestration was terminated: {reason}")),
                    now,
                ),
                ..Commit::default()
            };
            return self.commit_step(Some(id), None, commit).await.map(drop);
        }
        if !runs || status == RuntimeStatus::Suspended {
            let commit = Commit {
                consumed,
                instance: Some(InstanceChange {
                    id: id.to_owned(),
                    status,
                    output: None,
                    custom_status: None,
                    append: new,
                    from_seq,
                    restart: None,
                    pin: None,
                }),
                ..Commit::default()
            };
            return self.commit_step(Some(id), None, commit).await.map(drop);
        }

        // Run the orchestrator: an OrchestratorStarted first gives it the
        // time; the events it never sees are left out of its request.
        new.insert(
            0,
            HistoryEvent::OrchestratorStarted {
                timestamp: rfc3339(now),
            },
        );
        let unit = self.unit_of(&instance)?;
        let Some(ticket) = self.admit(&unit, DurableRole::Orchestrator.trigger(), id)? else {
            return Ok(());
        };
        let seen: Vec<&HistoryEvent> = history
            .iter()
            .chain(new.iter())
            .filter(|e| {
                !matches!(
                    e,
                    HistoryEvent::ExecutionSuspended { .. }
                        | HistoryEvent::ExecutionResumed { .. }
                        | HistoryEvent::ExecutionTerminated { .. }
                        | HistoryEvent::ExecutionCompleted { .. }
                )
            })
            .collect();
        // Serialised straight from the events: a `json!` value would copy
        // the whole history into a tree first.
        #[derive(serde::Serialize)]
        struct Request<'a> {
            instance_id: &'a str,
            name: &'a str,
            input: &'a Value,
            history: Vec<&'a HistoryEvent>,
        }
        let request = Request {
            instance_id: &instance.id,
            name: &instance.name,
            input: &instance.input,
            history: seen,
        };
        let input = Bytes::from(serde_json::to_vec(&request).expect("a request serialises"));
        let pin = instance.version.is_empty().then(|| self.pin(&unit));
        let me = self.clone();
        let next = Arc::new(Mutex::new(Next::default()));
        let slot = next.clone();
        let state = Arc::new(Mutex::new(None));
        let state_slot = state.clone();
        let settle = move |record: &InvocationRecord, answer: Option<&Answer>| -> Settled {
            let answer = answer.cloned().ok_or_else(|| failure_reason(record));
            let decided = episode::decide(&instance, &history, new, answer, &Roles(&me.roles), now);
            let mut messages = decided.messages;
            let restart = decided.restart.map(|input| {
                let generation = instance.generation + 1;
                messages.push(NewMessage::start(
                    instance.id.clone(),
                    generation,
                    instance.name.clone(),
                    input.clone(),
                    instance.parent.clone(),
                    now,
                ));
                (generation, input)
            });
            for c in &decided.children {
                // A child replacing an ended instance of the same id.
                me.cache.lock().expect("cache lock").pop(&c.id);
            }
            let create = decided
                .children
                .into_iter()
                .map(|c| NewInstance {
                    version: me.version_of(&c.name),
                    id: c.id,
                    name: c.name,
                    input: c.input,
                    parent: Some(c.parent),
                })
                .collect();
            // The state after this step, kept for the next one.
            let mut after = instance.clone();
            after.status = decided.status;
            if let Some(p) = &pin {
                after.version = p.clone();
            }
            if let Some(o) = &decided.output {
                after.output = o.clone();
            }
            if let Some(c) = &decided.custom_status {
                after.custom_status = c.clone();
            }
            let after_history = match &restart {
                Some((generation, input)) => {
                    after.generation = *generation;
                    after.input = input.clone();
                    after.output = Value::Null;
                    Vec::new()
                }
                // Appended to, not copied, when this episode holds the
                // only reference (the cache let go of it).
                None => {
                    let mut h = Arc::try_unwrap(history).unwrap_or_else(|shared| (*shared).clone());
                    h.extend(decided.append.iter().cloned());
                    h
                }
            };
            *state_slot.lock().expect("state lock") = Some(Arc::new(Loaded {
                instance: after,
                history: Arc::new(after_history),
            }));
            let mut commit = Commit {
                consumed,
                instance: Some(InstanceChange {
                    id: instance.id.clone(),
                    status: decided.status,
                    output: decided.output,
                    custom_status: decided.custom_status,
                    append: decided.append,
                    from_seq,
                    restart,
                    pin,
                }),
                create,
                messages,
                work: decided.work,
                instance_of_record: Some(instance.id.clone()),
                ..Commit::default()
            };
            let mut after = Next::of(&mut commit, Some(&instance.id));
            let durable = Settled::with_record(me.store.commit(Some(record.clone()), commit));
            // Activities start now, beside the commit: one submitted after
            // it commits after it (one writer, in order), and a result
            // whose decision never committed finds no work item and is
            // dropped (the episode runs again and decides again). Running
            // before the decision is durable is at-least-once either way.
            for w in std::mem::take(&mut after.work) {
                me.dispatch_work(w);
            }
            *slot.lock().expect("next lock") = after;
            durable
        };
        let event = Event {
            trigger: DurableRole::Orchestrator.trigger(),
            input,
            env: vec![("KELVIN_INSTANCE_ID".into(), id.to_owned())],
            files: Vec::new(),
        };
        let checked = self
            .runtime
            .start_settled(ticket, event, |out| Answer::parse(&out), (), settle)
            .await;
        if !checked.durable {
            return Err(DurableError::Failed(
                "an episode's decisions could not be committed".into(),
            ));
        }
        let next = std::mem::take(&mut *next.lock().expect("next lock"));
        if let Some(state) = state.lock().expect("state lock").take()
            && next.applied()
        {
            self.cache
                .lock()
                .expect("cache lock")
                .put(id.to_owned(), state);
        }
        self.next(next);
        Ok(())
    }

    /// Commits a step of `step` that ran no function (or an activity's
    /// settlement, `None`), then schedules what it made ready. Whether it
    /// applied.
    async fn commit_step(
        &self,
        step: Option<&str>,
        record: Option<InvocationRecord>,
        mut commit: Commit,
    ) -> Result<bool, DurableError> {
        let next = Next::of(&mut commit, step);
        self.store.commit(record, commit).wait().await?;
        let applied = next.applied();
        self.next(next);
        Ok(applied)
    }

    /// The production version of orchestrator `name` (what a new instance
    /// is pinned to); it stays loadable while instances use it.
    fn version_of(&self, name: &str) -> String {
        match self.runtime.production(name) {
            Ok(unit) => self.pin(&unit),
            Err(_) => String::new(),
        }
    }

    /// Keeps `unit` loadable (and unpruned) for the instances pinned to
    /// it; its version.
    fn pin(&self, unit: &Arc<Unit>) -> String {
        let version = unit.version.to_string();
        self.pinned
            .lock()
            .expect("pinned lock")
            .entry(version.clone())
            .or_insert_with(|| unit.clone());
        version
    }

    /// Runs work items as their activity's slots free up: each waits for
    /// its own function's slot, so a saturated activity (a fan-out) never
    /// holds up another's calls.
    async fn run_activities(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<WorkItem>) {
        while let Some(item) = rx.recv().await {
            let me = self.clone();
            let Some(slots) = self.slots.get(&item.name).cloned() else {
                // Its function is gone from the app: the call fails.
                tokio::spawn(async move {
                    let reason = format!("no activity function named {:?} in this app", item.name);
                    me.settle_activity(&item, None, Err(reason)).await;
                });
                continue;
            };
            tokio::spawn(async move {
                let Ok(_permit) = slots.acquire_owned().await else {
                    return;
                };
                Box::pin(me.activity(item)).await;
            });
        }
    }

    /// One attempt of an activity.
    async fn activity(self: &Arc<Self>, item: WorkItem) {
        let unit = match self.runtime.production(&item.name) {
            Ok(unit) => unit,
            Err(e) => {
                self.settle_activity(&item, None, Err(e.to_string())).await;
                return;
            }
        };
        // Its own task, already within the activity's concurrency: waiting
        // here (for a slot an HTTP caller of the same function holds)
        // holds up nothing else.
        let ticket = tokio::select! {
            t = self.runtime.admit_patiently(&unit, DurableRole::Activity.trigger()) => t,
            () = self.stopped() => return,
        };
        let ticket = match ticket {
            Ok(t) => t,
            Err(e) => {
                self.settle_activity(&item, None, Err(e.to_string())).await;
                return;
            }
        };
        // Serialised from borrows: a `json!` tree would copy the input.
        #[derive(serde::Serialize)]
        struct Request<'a> {
            instance_id: &'a str,
            name: &'a str,
            input: &'a Value,
            attempt: u32,
        }
        let request = Request {
            instance_id: &item.instance_id,
            name: &item.name,
            input: &item.input,
            attempt: item.attempts + 1,
        };
        let event = Event {
            trigger: DurableRole::Activity.trigger(),
            input: Bytes::from(serde_json::to_vec(&request).expect("a request serialises")),
            env: vec![("KELVIN_INSTANCE_ID".into(), item.instance_id.clone())],
            files: Vec::new(),
        };
        let me = self.clone();
        let settled = item.clone();
        let next = Arc::new(Mutex::new(Next::default()));
        let slot = next.clone();
        let settle = move |record: &InvocationRecord, result: Option<&Value>| -> Settled {
            let result = result.cloned().ok_or_else(|| failure_reason(record));
            let mut commit = activity_commit(&settled, result, Some(record));
            *slot.lock().expect("next lock") = Next::of(&mut commit, None);
            Settled::with_record(me.store.commit(Some(record.clone()), commit))
        };
        let checked = self
            .runtime
            .start_settled(ticket, event, |out| parse_result(&out), (), settle)
            .await;
        if checked.durable {
            let next = std::mem::take(&mut *next.lock().expect("next lock"));
            self.work_settled(&item.id);
            self.next(next);
        } else {
            tracing::error!(
                activity = item.name.as_str(),
                "an activity's result could not be committed; it runs again in 1 s"
            );
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = me.work_tx.send(item);
            });
        }
    }

    /// Settles a work item that could not run at all.
    async fn settle_activity(
        &self,
        item: &WorkItem,
        record: Option<InvocationRecord>,
        result: Result<Value, String>,
    ) {
        let mut item = item.clone();
        // No attempts left: a missing function does not come back by itself.
        item.retry.max_attempts = 0;
        let commit = activity_commit(&item, result, record.as_ref());
        if let Err(e) = self.commit_step(None, record, commit).await {
            tracing::error!(error = %e, "failed to settle an activity");
        }
        self.work_settled(&item.id);
    }

    fn work_settled(&self, id: &str) {
        self.sched.lock().expect("sched lock").work.remove(id);
    }

    /// One entity's waiting operations, one at a time, each committed with
    /// the state it leaves.
    async fn entity_step(self: &Arc<Self>, target: &str) -> Result<(), DurableError> {
        let inbox = self.take_inbox(target, now_us()).await?;
        if inbox.is_empty() {
            return Ok(());
        }
        let entity = EntityId::parse(target)
            .map_err(DurableError::Failed)
            .and_then(|id| {
                if Roles(&self.roles).entity(&id.name) {
                    Ok(id)
                } else {
                    Err(DurableError::Failed(format!(
                        "no entity function named {:?} in this app",
                        id.name
                    )))
                }
            });
        let entity = match entity {
            Ok(e) => e,
            Err(e) => {
                // Nobody can run these: callers are answered, signals dropped.
                let mut commit = Commit::default();
                for item in inbox {
                    if let Message::Operation {
                        reply_to: Some(r), ..
                    } = &item.message
                    {
                        commit.messages.push(reply(r, Err(e.to_string())));
                    }
                    commit.consumed.push(item.id);
                }
                return self.commit_step(Some(target), None, commit).await.map(drop);
            }
        };
        let mut state = self.store.entity(target).await?;
        for item in inbox {
            let Message::Operation {
                operation,
                input,
                reply_to,
            } = item.message
            else {
                let commit = Commit {
                    consumed: vec![item.id],
                    ..Commit::default()
                };
                if !self.commit_step(Some(target), None, commit).await? {
                    return Ok(());
                }
                continue;
            };
            let unit = self
                .runtime
                .production(&entity.name)
                .map_err(|e| DurableError::Failed(e.to_string()))?;
            let Some(ticket) = self.admit(&unit, DurableRole::Entity.trigger(), target)? else {
                return Ok(());
            };
            #[derive(serde::Serialize)]
            struct Request<'a> {
                entity: &'a str,
                name: &'a str,
                key: &'a str,
                operation: &'a str,
                input: &'a Value,
                state: &'a Option<Value>,
            }
            let request = Request {
                entity: target,
                name: &entity.name,
                key: &entity.key,
                operation: &operation,
                input: &input,
                state: &state,
            };
            let event = Event {
                trigger: DurableRole::Entity.trigger(),
                input: Bytes::from(serde_json::to_vec(&request).expect("a request serialises")),
                env: vec![("KELVIN_INSTANCE_ID".into(), target.to_owned())],
                files: Vec::new(),
            };
            let me = self.clone();
            let target_owned = target.to_owned();
            let kept = Arc::new(Mutex::new((Next::default(), state.clone())));
            let slot = kept.clone();
            let before = state.clone();
            let settle = move |record: &InvocationRecord, answer: Option<&EntityAnswer>| {
                let (entity, result) = match answer {
                    Some(a) => (
                        Some((target_owned.clone(), a.new_state())),
                        Ok(a.result.clone()),
                    ),
                    None => (None, Err(failure_reason(record))),
                };
                let after = entity.as_ref().map_or(before, |(_, s)| s.clone());
                let mut commit = Commit {
                    consumed: vec![item.id],
                    entity,
                    messages: reply_to.iter().map(|r| reply(r, result.clone())).collect(),
                    instance_of_record: Some(
                        reply_to
                            .as_ref()
                            .map_or(target_owned.clone(), |r| r.instance_id.clone()),
                    ),
                    ..Commit::default()
                };
                *slot.lock().expect("kept lock") =
                    (Next::of(&mut commit, Some(&target_owned)), after);
                Settled::with_record(me.store.commit(Some(record.clone()), commit))
            };
            let checked = self
                .runtime
                .start_settled(ticket, event, |out| EntityAnswer::parse(&out), (), settle)
                .await;
            if !checked.durable {
                return Err(DurableError::Failed(
                    "an entity operation could not be committed".into(),
                ));
            }
            let (next, after) = std::mem::take(&mut *kept.lock().expect("kept lock"));
            let applied = next.applied();
            self.next(next);
            if !applied {
                // Read back from the store and stepped again: the rest of
                // this inbox too.
                return Ok(());
            }
            state = after;
        }
        Ok(())
    }

    /// Finds what became due (timers fired, retries' backoffs over) and
    /// schedules it; sleeps until the next one, or until a step makes an
    /// earlier one.
    async fn find_due(self: Arc<Self>, mut watermark: i64) {
        loop {
            let next = match self.store.next_due(watermark).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "failed to read when durable work is due; retrying in 1 s");
                    Some(now_us() + 1_000_000)
                }
            };
            let wait = next.map_or(Duration::from_secs(60), |at| {
                Duration::from_micros(u64::try_from(at - now_us()).unwrap_or(0))
                    .min(Duration::from_secs(60))
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.delayed.notified() => continue,
                _ = self.stopped() => return,
            }
            let now = now_us();
            match self.store.due(watermark, now).await {
                Ok((targets, work)) => {
                    watermark = now;
                    for t in targets {
                        self.schedule(&t);
                    }
                    for w in work {
                        self.dispatch_work(w);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "failed to read due durable work; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    // The client operations (the management API, bindings, the CLI).

    /// Starts an orchestration; its instance id.
    pub async fn start_new(
        &self,
        name: &str,
        instance_id: Option<String>,
        input: Value,
    ) -> Result<String, ClientError> {
        if !Roles(&self.roles).orchestrator(name) {
            return Err(ClientError::UnknownOrchestrator(name.to_owned()));
        }
        let id = instance_id.unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
        valid_instance_id(&id)?;
        let created = self
            .store
            .create(NewInstance {
                id: id.clone(),
                name: name.to_owned(),
                version: self.version_of(name),
                input,
                parent: None,
            })
            .await?;
        self.started(created);
        Ok(id)
    }

    /// Schedules the first step of an instance just created, handing it
    /// its state and start message in memory: it reads nothing back.
    fn started(&self, created: Created) {
        let id = created.instance.id.clone();
        let fresh = match self.inboxes.lock().expect("inboxes lock").entry(id.clone()) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Some(vec![created.start]));
                true
            }
            // A step of the ended instance it replaced runs or is due: the
            // next one reads the store.
            std::collections::hash_map::Entry::Occupied(mut e) => {
                e.insert(None);
                false
            }
        };
        let mut cache = self.cache.lock().expect("cache lock");
        if fresh {
            cache.put(
                id.clone(),
                Arc::new(Loaded {
                    instance: created.instance,
                    history: Arc::default(),
                }),
            );
        } else {
            // An ended instance with this id was replaced.
            cache.pop(&id);
        }
        drop(cache);
        self.queue(&id);
    }

    /// An instance that has not ended, for a command to it.
    async fn live(&self, id: &str) -> Result<Instance, ClientError> {
        let instance = self
            .store
            .instance(id)
            .await?
            .ok_or_else(|| ClientError::NotFound(id.to_owned()))?;
        if instance.status.ended() {
            return Err(ClientError::Ended(id.to_owned(), instance.status.as_str()));
        }
        Ok(instance)
    }

    async fn command(&self, id: &str, event: HistoryEvent) -> Result<(), ClientError> {
        self.live(id).await?;
        self.store
            .send(vec![NewMessage::event(
                id.to_owned(),
                None,
                event,
                now_us(),
            )])
            .await?;
        self.schedule(id);
        Ok(())
    }

    /// Raises an event, unless the instance would hold more raised events
    /// than [`crate::durable::RaisedEvents`] allows one generation.
    pub async fn raise_event(&self, id: &str, name: &str, input: Value) -> Result<(), ClientError> {
        self.live(id).await?;
        let mut held = self.store.raised(id).await?;
        held.add(&input);
        if held.over() {
            return Err(ClientError::TooManyEvents(id.to_owned()));
        }
        self.command(
            id,
            HistoryEvent::EventRaised {
                name: name.to_owned(),
                input,
            },
        )
        .await
    }

    pub async fn terminate(&self, id: &str, reason: &str) -> Result<(), ClientError> {
        self.command(
            id,
            HistoryEvent::ExecutionTerminated {
                reason: reason.to_owned(),
            },
        )
        .await
    }

    pub async fn suspend(&self, id: &str, reason: &str) -> Result<(), ClientError> {
        self.command(
            id,
            HistoryEvent::ExecutionSuspended {
                reason: reason.to_owned(),
            },
        )
        .await
    }

    pub async fn resume(&self, id: &str, reason: &str) -> Result<(), ClientError> {
        self.command(
            id,
            HistoryEvent::ExecutionResumed {
                reason: reason.to_owned(),
            },
        )
        .await
    }

    pub async fn status(&self, id: &str) -> Result<Option<Instance>, ClientError> {
        Ok(self.store.instance(id).await?)
    }

    pub async fn history(&self, id: &str) -> Result<Vec<HistoryEvent>, ClientError> {
        Ok(self.store.history(id).await?)
    }

    pub async fn list(&self, filter: Filter) -> Result<Vec<Instance>, ClientError> {
        Ok(self.store.list(filter).await?)
    }

    pub async fn purge(&self, id: Option<String>, filter: Filter) -> Result<u64, ClientError> {
        let purged = self.store.purge(id, filter).await?;
        // Only ended instances go; their state is of no use to a step.
        self.cache.lock().expect("cache lock").clear();
        Ok(purged)
    }

    /// Signals an entity (one-way).
    pub async fn signal_entity(
        &self,
        entity: &EntityId,
        operation: &str,
        input: Value,
    ) -> Result<(), ClientError> {
        if !Roles(&self.roles).entity(&entity.name) {
            return Err(ClientError::UnknownEntity(entity.name.clone()));
        }
        if operation.is_empty() {
            return Err(ClientError::Invalid("an operation needs a name".into()));
        }
        let target = entity.to_string();
        self.store
            .send(vec![NewMessage::operation(
                target.clone(),
                operation.to_owned(),
                input,
                None,
                now_us(),
            )])
            .await?;
        self.schedule(&target);
        Ok(())
    }

    pub async fn entity_state(&self, entity: &EntityId) -> Result<Option<Value>, ClientError> {
        if !Roles(&self.roles).entity(&entity.name) {
            return Err(ClientError::UnknownEntity(entity.name.clone()));
        }
        Ok(self.store.entity(&entity.to_string()).await?)
    }
}

/// Instance ids go in URLs and logs: printable, no `/`, not too long.
fn valid_instance_id(id: &str) -> Result<(), ClientError> {
    let ok = !id.is_empty()
        && id.len() <= 256
        && !id.starts_with('@')
        && id
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '/' | '?' | '#' | '%'));
    if ok {
        Ok(())
    } else {
        Err(ClientError::Invalid(format!(
            "instance id {id:?} must be 1-256 printable ASCII characters without '/', '?', '#', '%' or a leading '@'"
        )))
    }
}

/// Why an invocation failed, for a `TaskFailed` or an instance's error.
fn failure_reason(record: &InvocationRecord) -> String {
    record
        .reason
        .clone()
        .unwrap_or_else(|| format!("the invocation ended {:?}", record.outcome))
}

/// The message answering an entity call.
fn reply(to: &crate::durable::ReplyTo, result: Result<Value, String>) -> NewMessage {
    let event = match result {
        Ok(result) => HistoryEvent::EntityResponded {
            task_id: to.task_id,
            result,
        },
        Err(error) => HistoryEvent::EntityFailed {
            task_id: to.task_id,
            error,
        },
    };
    NewMessage::event(to.instance_id.clone(), Some(to.generation), event, now_us())
}

/// What an activity attempt's result commits: the result to its instance,
/// or a retry after the backoff its call asked for, or the last failure.
fn activity_commit(
    item: &WorkItem,
    result: Result<Value, String>,
    record: Option<&InvocationRecord>,
) -> Commit {
    let attempts = item.attempts + 1;
    let now = now_us();
    let event = match result {
        Ok(result) => HistoryEvent::TaskCompleted {
            task_id: item.task_id,
            result,
        },
        Err(error) if attempts < item.retry.max_attempts => {
            tracing::info!(activity = item.name.as_str(), attempt = attempts, %error, "an activity failed; it is retried");
            let delay = i64::try_from(item.retry.delay_ms(attempts)).unwrap_or(i64::MAX / 2);
            return Commit {
                work_retry: Some((item.id.clone(), attempts, now + delay * 1000)),
                instance_of_record: record.map(|_| item.instance_id.clone()),
                ..Commit::default()
            };
        }
        Err(error) => HistoryEvent::TaskFailed {
            task_id: item.task_id,
            error,
        },
    };
    Commit {
        work_done: Some(item.id.clone()),
        messages: vec![NewMessage::event(
            item.instance_id.clone(),
            Some(item.generation),
            event,
            now,
        )],
        instance_of_record: Some(item.instance_id.clone()),
        ..Commit::default()
    }
}
