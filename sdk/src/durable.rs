//! Durable functions: orchestrators (by replay), activities and entities.
//!
//! This module speaks the protocol of `docs/durable.md` so a function only
//! writes its logic. An **orchestrator** is ordinary async Rust whose
//! awaits are durable: each run replays the history and answers with every
//! decision the code made, so the code must be deterministic (read the time
//! with [`OrchestrationContext::current_time`], make ids with
//! [`OrchestrationContext::new_guid`], never read clocks, random numbers or
//! anything else outside the context).
//!
//! ```no_run
//! use kelvin_sdk::durable;
//!
//! fn main() {
//!     durable::orchestrator(|ctx| async move {
//!         let cities: Vec<String> = ctx.input()?;
//!         let mut greetings = Vec::new();
//!         for city in &cities {
//!             greetings.push(ctx.call_activity("say-hello", city).await?);
//!         }
//!         Ok(greetings)
//!     });
//! }
//! ```
//!
//! ```no_run
//! use kelvin_sdk::durable;
//!
//! fn main() {
//!     durable::activity(|ctx| {
//!         let name: String = ctx.input()?;
//!         Ok(format!("Hello, {name}!"))
//!     });
//! }
//! ```
//!
//! Every entry point reads the request as JSON on stdin and writes its
//! answer as JSON on stdout; a malformed request or an `Err` from an
//! activity or entity is written to stderr and ends the process with exit
//! code 1 (a failure, as the protocol says).

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
pub use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// Orchestrators
// ---------------------------------------------------------------------------

/// Runs an orchestrator: reads the request (stdin), replays `f` against its
/// history and writes the answer (stdout).
///
/// `f` gets the [`OrchestrationContext`] and returns the orchestration's
/// future: `Ok(output)` completes the orchestration (`"done"`), `Err(reason)`
/// fails it (`"failed"`). [`TaskError`] and the input's errors convert into
/// `String`, so `?` works on both. A request that is not the protocol's JSON
/// ends the process with exit code 1.
pub fn orchestrator<F, Fut, T>(f: F)
where
    F: FnOnce(OrchestrationContext) -> Fut,
    Fut: Future<Output = Result<T, String>>,
    T: Serialize,
{
    let answer = replay(&crate::input(), f);
    write_answer(answer);
}

/// The handle an orchestrator's code makes its decisions through. Cheap to
/// clone (every clone is the same orchestration).
#[derive(Clone)]
pub struct OrchestrationContext {
    shared: Rc<Shared>,
}

/// What does not change during a replay, and the state that does.
struct Shared {
    instance_id: String,
    name: String,
    input: Value,
    history_len: usize,
    /// When this execution began (its first `OrchestratorStarted`), in
    /// microseconds: it tells apart the ids of generations after
    /// continue-as-new.
    began_us: u128,
    state: RefCell<State>,
}

#[derive(Default)]
struct State {
    now: Option<SystemTime>,
    replaying: bool,
    /// Every decision so far; `actions[i]` is task `i`.
    actions: Vec<Value>,
    /// Task `i`'s result slot (`None` for a signal: it gets no answer).
    task_slots: Vec<Option<usize>>,
    /// Every awaitable result: tasks' and event waits'.
    slots: Vec<Slot>,
    /// Event waits not yet answered, oldest first, by event name.
    waiters: HashMap<String, VecDeque<usize>>,
    /// Events nobody waited for yet (their input and arrival), by name.
    buffered: HashMap<String, VecDeque<(Value, u64)>>,
    /// Counts resolutions, so that races are won in history order.
    seq: u64,
    guids: u64,
    custom_status: Option<Value>,
    continue_as_new: Option<Value>,
    /// A mistake in the code (an input that is not JSON): fails the
    /// orchestration.
    fatal: Option<String>,
}

enum Slot {
    Pending,
    Resolved {
        result: Result<Value, TaskError>,
        /// When it was resolved (history order).
        seq: u64,
    },
    /// Resolved and handed to whoever awaited it.
    Taken,
}

impl State {
    fn resolve(&mut self, slot: usize, result: Result<Value, TaskError>) -> bool {
        match self.slots.get_mut(slot) {
            Some(s @ Slot::Pending) => {
                self.seq += 1;
                *s = Slot::Resolved {
                    result,
                    seq: self.seq,
                };
                true
            }
            // A second result for one task: the first one stands.
            _ => false,
        }
    }

    fn resolve_task(&mut self, task_id: usize, result: Result<Value, TaskError>) -> bool {
        match self.task_slots.get(task_id) {
            Some(&Some(slot)) => self.resolve(slot, result),
            // Not a task of this replay (or a signal): nobody awaits it.
            _ => false,
        }
    }

    fn raise(&mut self, name: String, input: Value) -> bool {
        if let Some(slot) = self.waiters.get_mut(&name).and_then(VecDeque::pop_front) {
            return self.resolve(slot, Ok(input));
        }
        self.seq += 1;
        let seq = self.seq;
        self.buffered
            .entry(name)
            .or_default()
            .push_back((input, seq));
        false
    }

    /// Whether decisions are still recorded: not after `continue_as_new` or
    /// a mistake, which end the episode.
    fn deciding(&self) -> bool {
        self.continue_as_new.is_none() && self.fatal.is_none()
    }
}

impl OrchestrationContext {
    fn state(&self) -> std::cell::RefMut<'_, State> {
        self.shared.state.borrow_mut()
    }

    /// This instance's id.
    pub fn instance_id(&self) -> &str {
        &self.shared.instance_id
    }

    /// The orchestration's name (its function's).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The input, as `T`.
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, String> {
        T::deserialize(&self.shared.input).map_err(|e| format!("invalid input: {e}"))
    }

    /// The input as JSON.
    pub fn input_value(&self) -> &Value {
        &self.shared.input
    }

    /// The orchestration's current time: the start of the episode being
    /// replayed, from the history. Use it instead of a clock.
    pub fn current_time(&self) -> SystemTime {
        // A history without an `OrchestratorStarted` breaks the protocol;
        // the clock is the least surprising answer then.
        self.state().now.unwrap_or_else(SystemTime::now)
    }

    /// Whether the code is replaying what an earlier episode did already
    /// (useful to log only once).
    pub fn is_replaying(&self) -> bool {
        self.state().replaying
    }

    /// A new id, the same in every replay: `{instance_id}:{began}:{n}` for
    /// the `n`-th id (from 0) of the execution that began at `began`
    /// (microseconds since the epoch, from the history): unique across
    /// continue-as-new, and never a default sub-orchestration id
    /// (`{instance_id}:{task_id}`).
    pub fn new_guid(&self) -> String {
        let mut state = self.state();
        let n = state.guids;
        state.guids += 1;
        format!("{}:{}:{n}", self.shared.instance_id, self.shared.began_us)
    }

    /// The number of events in this episode's history. For tests and
    /// diagnostics only: an orchestrator that decides by it is not
    /// deterministic.
    pub fn history_len(&self) -> usize {
        self.shared.history_len
    }

    /// Sets the custom status the status API shows (the last one set wins).
    pub fn set_custom_status(&self, status: impl Serialize) {
        match serde_json::to_value(status) {
            Ok(status) => self.state().custom_status = Some(status),
            Err(e) => self.fail_with(format!("the custom status is not JSON: {e}")),
        }
    }

    /// Calls activity `name` with `input`.
    pub fn call_activity(&self, name: &str, input: impl Serialize) -> Task {
        self.call_activity_inner(name, input, None)
    }

    /// Calls activity `name` with `input`, retrying its failures as `retry`
    /// says; only the last failure reaches the orchestrator.
    pub fn call_activity_with_retry(
        &self,
        name: &str,
        input: impl Serialize,
        retry: RetryOptions,
    ) -> Task {
        self.call_activity_inner(name, input, Some(retry))
    }

    fn call_activity_inner(
        &self,
        name: &str,
        input: impl Serialize,
        retry: Option<RetryOptions>,
    ) -> Task {
        let Some(input) = self.json(input, || format!("the input of activity `{name}`")) else {
            return self.never();
        };
        let mut action = json!({"type": "CallActivity", "name": name, "input": input});
        if let Some(retry) = retry {
            action["retry"] = retry.to_json();
        }
        self.decide(action, true)
    }

    /// Starts sub-orchestration `name` with `input`, as instance
    /// `{instance_id}:{task_id}`; the task gets its output.
    pub fn call_sub_orchestrator(&self, name: &str, input: impl Serialize) -> Task {
        self.call_sub_orchestrator_inner(name, None, input)
    }

    /// Starts sub-orchestration `name` with `input`, as instance
    /// `instance_id`; the task gets its output.
    pub fn call_sub_orchestrator_with_id(
        &self,
        name: &str,
        instance_id: &str,
        input: impl Serialize,
    ) -> Task {
        self.call_sub_orchestrator_inner(name, Some(instance_id), input)
    }

    fn call_sub_orchestrator_inner(
        &self,
        name: &str,
        instance_id: Option<&str>,
        input: impl Serialize,
    ) -> Task {
        let Some(input) = self.json(input, || format!("the input of sub-orchestration `{name}`"))
        else {
            return self.never();
        };
        let mut action = json!({"type": "CallSubOrchestrator", "name": name, "input": input});
        if let Some(id) = instance_id {
            action["instance_id"] = json!(id);
        }
        self.decide(action, true)
    }

    /// A durable timer: the task completes (with `null`) at `fire_at`.
    pub fn create_timer(&self, fire_at: SystemTime) -> Task {
        self.decide(
            json!({"type": "CreateTimer", "fire_at": format_rfc3339(fire_at)}),
            true,
        )
    }

    /// A durable timer for `duration` from [`current_time`](Self::current_time).
    pub fn sleep(&self, duration: Duration) -> Task {
        self.create_timer(self.current_time() + duration)
    }

    /// Waits for the external event `name`; the task gets its input. Events
    /// raised before the wait are kept, and received in the order they came.
    pub fn wait_for_event(&self, name: &str) -> Task {
        let mut state = self.state();
        if !state.deciding() {
            drop(state);
            return self.never();
        }
        let slot = state.slots.len();
        match state.buffered.get_mut(name).and_then(VecDeque::pop_front) {
            Some((input, seq)) => state.slots.push(Slot::Resolved {
                result: Ok(input),
                seq,
            }),
            None => {
                state.slots.push(Slot::Pending);
                state
                    .waiters
                    .entry(name.to_owned())
                    .or_default()
                    .push_back(slot);
            }
        }
        drop(state);
        self.task(Some(slot))
    }

    /// Calls `operation` of entity `entity_id` (`@name@key`, see
    /// [`entity_id`]) with `input`; the task gets its result. Operations on
    /// one entity run one at a time, in the order they were sent.
    pub fn call_entity(&self, entity_id: &str, operation: &str, input: impl Serialize) -> Task {
        let Some(input) = self.json(input, || {
            format!("the input of `{operation}` on entity `{entity_id}`")
        }) else {
            return self.never();
        };
        self.decide(
            json!({"type": "CallEntity", "entity": entity_id, "operation": operation, "input": input}),
            true,
        )
    }

    /// Signals `operation` of entity `entity_id` with `input`: one-way, no
    /// answer comes back.
    pub fn signal_entity(&self, entity_id: &str, operation: &str, input: impl Serialize) {
        let Some(input) = self.json(input, || {
            format!("the input of `{operation}` on entity `{entity_id}`")
        }) else {
            return;
        };
        let _no_answer = self.decide(
            json!({"type": "SignalEntity", "entity": entity_id, "operation": operation, "input": input}),
            false,
        );
    }

    /// Ends this execution and starts the orchestration over with `input`
    /// and an empty history. **Call it and return**: whatever the code
    /// returns afterwards is ignored, and it makes no more decisions
    /// (calls after this one return tasks that never complete).
    pub fn continue_as_new(&self, input: impl Serialize) {
        let Some(input) = self.json(input, || "the input of continue_as_new".to_owned()) else {
            return;
        };
        let mut state = self.state();
        if state.deciding() {
            state.continue_as_new = Some(input);
        }
    }

    /// Records a decision; `answered`: whether a result will come back.
    fn decide(&self, action: Value, answered: bool) -> Task {
        let mut state = self.state();
        if !state.deciding() {
            drop(state);
            return self.never();
        }
        state.actions.push(action);
        let slot = answered.then(|| {
            state.slots.push(Slot::Pending);
            state.slots.len() - 1
        });
        state.task_slots.push(slot);
        drop(state);
        self.task(slot)
    }

    fn json(&self, value: impl Serialize, what: impl FnOnce() -> String) -> Option<Value> {
        match serde_json::to_value(value) {
            Ok(value) => Some(value),
            Err(e) => {
                self.fail_with(format!("{} is not JSON: {e}", what()));
                None
            }
        }
    }

    /// Fails the orchestration: a mistake in its code, not in its work.
    fn fail_with(&self, error: String) {
        let mut state = self.state();
        if state.deciding() {
            state.fatal = Some(error);
        }
    }

    fn task(&self, slot: Option<usize>) -> Task {
        Task {
            shared: self.shared.clone(),
            slot,
        }
    }

    /// A task that never completes.
    fn never(&self) -> Task {
        self.task(None)
    }
}

/// The id of entity `name`'s instance `key`: `@name@key`.
pub fn entity_id(name: &str, key: &str) -> String {
    format!("@{name}@{key}")
}

/// A durable task: an activity, a sub-orchestration, a timer, an event
/// wait or an entity call. Await it for its result (`null` for a timer).
#[must_use = "a task does nothing unless awaited (its decision is made already)"]
pub struct Task {
    shared: Rc<Shared>,
    /// `None`: it never completes.
    slot: Option<usize>,
}

/// Why a task failed: the activity's, sub-orchestration's or entity
/// operation's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskError {
    pub message: String,
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for TaskError {}

impl From<TaskError> for String {
    fn from(e: TaskError) -> String {
        e.message
    }
}

impl Task {
    /// Whether its result is in (and not yet taken).
    fn resolved_seq(&self) -> Option<u64> {
        let state = self.shared.state.borrow();
        match state.slots.get(self.slot?) {
            Some(Slot::Resolved { seq, .. }) => Some(*seq),
            _ => None,
        }
    }

    fn take(&self) -> Result<Value, TaskError> {
        let slot = self.slot.expect("a resolved task has a slot");
        let mut state = self.shared.state.borrow_mut();
        match std::mem::replace(&mut state.slots[slot], Slot::Taken) {
            Slot::Resolved { result, .. } => result,
            _ => panic!("a durable task was polled after it completed"),
        }
    }

    /// Awaits the result as `T`; a result that is not a `T` is an error.
    pub async fn json<T: DeserializeOwned>(self) -> Result<T, TaskError> {
        let value = self.await?;
        serde_json::from_value(value).map_err(|e| TaskError {
            message: format!("unexpected result: {e}"),
        })
    }
}

impl Future for Task {
    type Output = Result<Value, TaskError>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        match self.resolved_seq() {
            Some(_) => Poll::Ready(self.take()),
            None => Poll::Pending,
        }
    }
}

impl Drop for Task {
    /// An event wait nobody awaits any more (it lost a race) stops waiting,
    /// so the next event of its name goes to a live waiter.
    fn drop(&mut self) {
        let Some(slot) = self.slot else { return };
        let Ok(mut state) = self.shared.state.try_borrow_mut() else {
            return;
        };
        if matches!(state.slots.get(slot), Some(Slot::Pending)) {
            for waiters in state.waiters.values_mut() {
                waiters.retain(|&s| s != slot);
            }
        }
    }
}

/// Waits for every task; their results in the tasks' order, or the first
/// error in the tasks' order (once all have completed).
pub fn task_all(tasks: Vec<Task>) -> TaskAll {
    TaskAll { tasks }
}

/// The future of [`task_all`].
#[must_use = "futures do nothing unless awaited"]
pub struct TaskAll {
    tasks: Vec<Task>,
}

impl Future for TaskAll {
    type Output = Result<Vec<Value>, TaskError>;

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        if !self.tasks.iter().all(|t| t.resolved_seq().is_some()) {
            return Poll::Pending;
        }
        let results: Vec<_> = self.tasks.iter().map(Task::take).collect();
        Poll::Ready(results.into_iter().collect())
    }
}

/// Waits for the first of `tasks` to complete (the first in history order:
/// the same winner in every replay): its index and result. The others are
/// dropped; their results, when they come, are ignored.
///
/// # Panics
///
/// If `tasks` is empty.
pub fn task_any(tasks: Vec<Task>) -> TaskAny {
    assert!(!tasks.is_empty(), "task_any needs at least one task");
    TaskAny { tasks }
}

/// The future of [`task_any`].
#[must_use = "futures do nothing unless awaited"]
pub struct TaskAny {
    tasks: Vec<Task>,
}

impl Future for TaskAny {
    type Output = (usize, Result<Value, TaskError>);

    fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        let first = self
            .tasks
            .iter()
            .enumerate()
            .filter_map(|(i, t)| Some((t.resolved_seq()?, i)))
            .min();
        match first {
            Some((_, i)) => Poll::Ready((i, self.tasks[i].take())),
            None => Poll::Pending,
        }
    }
}

/// How an activity's failures are retried (`docs/durable.md`): attempt
/// `n`'s failure waits `first_retry * backoff_coefficient^(n-1)`, at most
/// `max_retry`, before the next attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryOptions {
    /// Attempts in all (1: no retry).
    pub max_attempts: u32,
    pub first_retry: Duration,
    pub backoff_coefficient: f64,
    pub max_retry: Duration,
}

impl RetryOptions {
    /// `max_attempts` attempts, the first retry after `first_retry`, then
    /// the defaults (backoff 2.0, at most an hour between attempts).
    pub fn new(max_attempts: u32, first_retry: Duration) -> RetryOptions {
        RetryOptions {
            max_attempts,
            first_retry,
            ..RetryOptions::default()
        }
    }

    fn to_json(self) -> Value {
        json!({
            "max_attempts": self.max_attempts,
            "first_retry_ms": millis(self.first_retry),
            "backoff_coefficient": self.backoff_coefficient,
            "max_retry_ms": millis(self.max_retry),
        })
    }
}

impl Default for RetryOptions {
    /// The protocol's defaults: one attempt, 1 s, 2.0, 1 h.
    fn default() -> RetryOptions {
        RetryOptions {
            max_attempts: 1,
            first_retry: Duration::from_secs(1),
            backoff_coefficient: 2.0,
            max_retry: Duration::from_secs(3600),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[derive(Deserialize)]
struct OrchestrationRequest {
    #[serde(default)]
    instance_id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    history: Vec<HistoryEvent>,
}

/// A history event, as the replay reads it: one flat struct, not an
/// internally tagged enum (serde would buffer each event into a tree before
/// choosing its variant). The fields an event does not have stay `None`;
/// those the replay never reads (`fire_at`, `entity`, ...) are skipped.
#[derive(Deserialize)]
struct HistoryEvent {
    #[serde(rename = "type")]
    kind: EventKind,
    task_id: Option<usize>,
    timestamp: Option<String>,
    /// An event's name (`EventRaised`).
    name: Option<String>,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    result: Value,
    #[serde(default)]
    error: Value,
}

/// The kinds the replay acts on; decisions and the rest are `Other`.
#[derive(Deserialize, Clone, Copy, PartialEq)]
enum EventKind {
    OrchestratorStarted,
    TaskCompleted,
    TaskFailed,
    SubOrchestrationCompleted,
    SubOrchestrationFailed,
    TimerFired,
    EntityResponded,
    EntityFailed,
    EventRaised,
    #[serde(other)]
    Other,
}

fn task_error(error: Value) -> TaskError {
    let message = match error {
        Value::String(s) => s,
        other => other.to_string(),
    };
    TaskError { message }
}

/// Replays `f` against `request`'s history (`docs/durable.md`, "How an SDK
/// replays") and returns the answer. `Err` only for a request that is not
/// the protocol's.
fn replay<F, Fut, T>(request: &[u8], f: F) -> Result<Value, String>
where
    F: FnOnce(OrchestrationContext) -> Fut,
    Fut: Future<Output = Result<T, String>>,
    T: Serialize,
{
    // Straight from the bytes: no `Value` tree of the whole history first.
    let request: OrchestrationRequest = serde_json::from_slice(request)
        .map_err(|e| format!("not an orchestration request: {e}"))?;
    let mut times = Vec::new();
    for (i, event) in request.history.iter().enumerate() {
        let needs_task = !matches!(
            event.kind,
            EventKind::OrchestratorStarted | EventKind::EventRaised | EventKind::Other
        );
        if needs_task && event.task_id.is_none() {
            return Err(format!("history[{i}]: a result without a `task_id`"));
        }
        if event.kind == EventKind::EventRaised && event.name.is_none() {
            return Err(format!("history[{i}]: an EventRaised without a `name`"));
        }
        if event.kind == EventKind::OrchestratorStarted {
            let timestamp = event.timestamp.as_deref().unwrap_or_default();
            let time = parse_rfc3339(timestamp)
                .map_err(|e| format!("history[{i}]: bad timestamp `{timestamp}`: {e}"))?;
            times.push((i, time));
        }
    }
    let last_start = times.last().map_or(0, |&(i, _)| i);
    let ctx = OrchestrationContext {
        shared: Rc::new(Shared {
            instance_id: request.instance_id,
            name: request.name,
            input: request.input,
            history_len: request.history.len(),
            began_us: times.first().map_or(0, |&(_, t)| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros())
            }),
            state: RefCell::new(State {
                now: times.first().map(|&(_, t)| t),
                replaying: last_start > 0,
                ..State::default()
            }),
        }),
    };
    let shared = ctx.shared.clone();
    let mut future = std::pin::pin!(f(ctx));
    let mut cx = Context::from_waker(Waker::noop());
    let mut poll = || -> Option<Result<T, String>> {
        match future.as_mut().poll(&mut cx) {
            Poll::Ready(outcome) => Some(outcome),
            Poll::Pending => None,
        }
    };
    let ended = |shared: &Shared| !shared.state.borrow().deciding();

    let mut outcome = poll();
    let mut times = times.into_iter().map(|(_, t)| t);
    for (i, event) in request.history.into_iter().enumerate() {
        if outcome.is_some() || ended(&shared) {
            break;
        }
        let mut state = shared.state.borrow_mut();
        // Checked above: every result has its task id, every event a name.
        let task_id = event.task_id.unwrap_or_default();
        let woke = match event.kind {
            EventKind::OrchestratorStarted => {
                state.now = times.next();
                state.replaying = i < last_start;
                false
            }
            EventKind::TaskCompleted
            | EventKind::SubOrchestrationCompleted
            | EventKind::EntityResponded => state.resolve_task(task_id, Ok(event.result)),
            EventKind::TaskFailed | EventKind::SubOrchestrationFailed | EventKind::EntityFailed => {
                state.resolve_task(task_id, Err(task_error(event.error)))
            }
            EventKind::TimerFired => state.resolve_task(task_id, Ok(Value::Null)),
            EventKind::EventRaised => state.raise(event.name.unwrap_or_default(), event.input),
            EventKind::Other => false,
        };
        drop(state);
        if woke {
            outcome = poll();
        }
    }

    let mut state = shared.state.borrow_mut();
    let mut answer = json!({"actions": std::mem::take(&mut state.actions)});
    if let Some(status) = state.custom_status.take() {
        answer["custom_status"] = status;
    }
    if let Some(error) = state.fatal.take() {
        answer["failed"] = json!({"error": error});
    } else if let Some(input) = state.continue_as_new.take() {
        answer["continue_as_new"] = json!({"input": input});
    } else if let Some(outcome) = outcome {
        let output = outcome.and_then(|output| {
            serde_json::to_value(output).map_err(|e| format!("the output is not JSON: {e}"))
        });
        match output {
            Ok(output) => answer["done"] = json!({"output": output}),
            Err(error) => answer["failed"] = json!({"error": error}),
        }
    }
    // Without an outcome, the orchestration waits for its tasks or events.
    drop(state);
    Ok(answer)
}

// ---------------------------------------------------------------------------
// Activities
// ---------------------------------------------------------------------------

/// Runs an activity: reads the request (stdin), calls `f`, writes its
/// result as JSON (stdout). `Err` fails this attempt (stderr, exit code 1);
/// the call's retry options say whether another comes.
pub fn activity<F, T>(f: F)
where
    F: FnOnce(ActivityContext) -> Result<T, String>,
    T: Serialize,
{
    let answer = read_request().and_then(|request| run_activity(request, f));
    write_answer(answer);
}

/// An activity's request.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ActivityContext {
    /// The calling orchestration's instance.
    #[serde(default)]
    pub instance_id: String,
    /// The activity's name.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub input: Value,
    /// This attempt, from 1.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
}

fn first_attempt() -> u32 {
    1
}

impl ActivityContext {
    /// The input, as `T`.
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, String> {
        T::deserialize(&self.input).map_err(|e| format!("invalid input: {e}"))
    }
}

fn run_activity<F, T>(request: Value, f: F) -> Result<Value, String>
where
    F: FnOnce(ActivityContext) -> Result<T, String>,
    T: Serialize,
{
    let ctx = ActivityContext::deserialize(request)
        .map_err(|e| format!("not an activity request: {e}"))?;
    let result = f(ctx)?;
    serde_json::to_value(result).map_err(|e| format!("the result is not JSON: {e}"))
}

// ---------------------------------------------------------------------------
// Entities
// ---------------------------------------------------------------------------

/// Runs one operation of an entity: reads the request (stdin), calls `f`
/// with the entity's state, writes the new state and `f`'s result (stdout).
/// `Err` fails the operation and leaves the state as it was (stderr, exit
/// code 1).
pub fn entity<F, T>(f: F)
where
    F: FnOnce(&mut EntityContext) -> Result<T, String>,
    T: Serialize,
{
    let answer = read_request().and_then(|request| run_entity(request, f));
    write_answer(answer);
}

/// One operation on an entity, and its state.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityContext {
    entity: String,
    name: String,
    key: String,
    operation: String,
    input: Value,
    state: Value,
    error: Option<String>,
}

#[derive(Deserialize)]
struct EntityRequest {
    entity: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    key: String,
    operation: String,
    #[serde(default)]
    input: Value,
    #[serde(default)]
    state: Value,
}

impl EntityContext {
    /// The entity's id, `@name@key`.
    pub fn entity_id(&self) -> &str {
        &self.entity
    }

    /// The entity's function name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The instance's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The operation asked for.
    pub fn operation(&self) -> &str {
        &self.operation
    }

    /// The operation's input, as `T`.
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, String> {
        T::deserialize(&self.input).map_err(|e| format!("invalid input: {e}"))
    }

    /// The operation's input as JSON.
    pub fn input_value(&self) -> &Value {
        &self.input
    }

    /// The state as `T`: `None` if the entity does not exist (or its state
    /// is not a `T`; [`state_value`](Self::state_value) has it as it is).
    pub fn state<T: DeserializeOwned>(&self) -> Option<T> {
        if self.state.is_null() {
            return None;
        }
        T::deserialize(&self.state).ok()
    }

    /// The state as JSON (`null`: the entity does not exist).
    pub fn state_value(&self) -> &Value {
        &self.state
    }

    /// Replaces the state (a state of `null` deletes the entity).
    pub fn set_state(&mut self, state: impl Serialize) {
        match serde_json::to_value(state) {
            Ok(state) => self.state = state,
            Err(e) => self.error = Some(format!("the state is not JSON: {e}")),
        }
    }

    /// Deletes the entity (after this operation).
    pub fn delete_state(&mut self) {
        self.state = Value::Null;
    }
}

fn run_entity<F, T>(request: Value, f: F) -> Result<Value, String>
where
    F: FnOnce(&mut EntityContext) -> Result<T, String>,
    T: Serialize,
{
    let request =
        EntityRequest::deserialize(request).map_err(|e| format!("not an entity request: {e}"))?;
    let mut ctx = EntityContext {
        entity: request.entity,
        name: request.name,
        key: request.key,
        operation: request.operation,
        input: request.input,
        state: request.state,
        error: None,
    };
    let result = f(&mut ctx)?;
    if let Some(error) = ctx.error {
        return Err(error);
    }
    let result =
        serde_json::to_value(result).map_err(|e| format!("the result is not JSON: {e}"))?;
    Ok(if ctx.state.is_null() {
        json!({"state": null, "delete": true, "result": result})
    } else {
        json!({"state": ctx.state, "result": result})
    })
}

// ---------------------------------------------------------------------------
// Plumbing
// ---------------------------------------------------------------------------

fn read_request() -> Result<Value, String> {
    serde_json::from_slice(&crate::input()).map_err(|e| format!("the request is not JSON: {e}"))
}

fn write_answer(answer: Result<Value, String>) {
    match answer {
        Ok(answer) => crate::output(answer.to_string().as_bytes()),
        Err(e) => crate::fail(e),
    }
}

/// `2026-11-22T10:00:00.004211Z` (or with nanoseconds, when it has them).
fn format_rfc3339(time: SystemTime) -> String {
    let (secs, nanos) = match time.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (s, n) = (-(d.as_secs() as i64), d.subsec_nanos());
            if n == 0 {
                (s, 0)
            } else {
                (s - 1, 1_000_000_000 - n)
            }
        }
    };
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (rem / 3600, rem / 60 % 60, rem % 60);
    let fraction = if nanos % 1000 == 0 {
        format!("{:06}", nanos / 1000)
    } else {
        format!("{nanos:09}")
    };
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{fraction}Z")
}

/// An RFC 3339 time: `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`.
fn parse_rfc3339(s: &str) -> Result<SystemTime, String> {
    let b = s.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
        let digits = b.get(range.clone()).ok_or("too short")?;
        if !digits.iter().all(u8::is_ascii_digit) {
            return Err(format!("expected digits at {}", range.start));
        }
        Ok(digits.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let sep = |i: usize, ok: &[u8]| -> Result<(), String> {
        match b.get(i) {
            Some(c) if ok.contains(c) => Ok(()),
            _ => Err(format!("unexpected character at {i}")),
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    sep(4, b"-")?;
    sep(7, b"-")?;
    sep(10, b"Tt ")?;
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    sep(13, b":")?;
    sep(16, b":")?;
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err("a field is out of range".into());
    }
    let mut i = 19;
    let mut nanos = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 9 {
                nanos = nanos * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return Err("empty fraction".into());
        }
        for _ in (i - start)..9 {
            nanos *= 10;
        }
    }
    let offset = match b.get(i) {
        Some(b'Z' | b'z') if i + 1 == b.len() => 0,
        Some(&c @ (b'+' | b'-')) if i + 6 == b.len() => {
            sep(i + 3, b":")?;
            let minutes = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if c == b'+' {
                minutes * 60
            } else {
                -minutes * 60
            }
        }
        _ => return Err("expected `Z` or an offset at the end".into()),
    };
    let secs =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second - offset;
    let nanos = nanos as u64;
    Ok(if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + Duration::from_nanos(nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nanos)
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: &str = "2026-11-22T10:00:00.000000Z";
    /// T0 in microseconds since the epoch.
    const T0_US: u64 = 1795341600000000;
    const T1: &str = "2026-11-22T10:00:00.004211Z";
    const T2: &str = "2026-11-22T10:00:05.500000Z";

    fn started(ts: &str) -> Value {
        json!({"type": "OrchestratorStarted", "timestamp": ts})
    }

    fn execution(input: Value) -> Value {
        json!({"type": "ExecutionStarted", "name": "test", "input": input})
    }

    fn scheduled(task_id: usize, name: &str, input: Value) -> Value {
        json!({"type": "TaskScheduled", "task_id": task_id, "name": name, "input": input})
    }

    fn completed(task_id: usize, result: Value) -> Value {
        json!({"type": "TaskCompleted", "task_id": task_id, "result": result})
    }

    fn timer_created(task_id: usize) -> Value {
        json!({"type": "TimerCreated", "task_id": task_id, "fire_at": T2})
    }

    fn timer_fired(task_id: usize) -> Value {
        json!({"type": "TimerFired", "task_id": task_id, "fire_at": T2})
    }

    fn raised(name: &str, input: Value) -> Value {
        json!({"type": "EventRaised", "name": name, "input": input})
    }

    fn bytes(request: Value) -> Vec<u8> {
        serde_json::to_vec(&request).expect("JSON")
    }

    fn request(input: Value, history: Vec<Value>) -> Value {
        json!({"instance_id": "i-1", "name": "test", "input": input, "history": history})
    }

    fn run<F, Fut, T>(input: Value, history: Vec<Value>, f: F) -> Value
    where
        F: FnOnce(OrchestrationContext) -> Fut,
        Fut: Future<Output = Result<T, String>>,
        T: Serialize,
    {
        replay(&bytes(request(input, history)), f).expect("a valid request")
    }

    fn activity(name: &str, input: Value) -> Value {
        json!({"type": "CallActivity", "name": name, "input": input})
    }

    /// The chaining orchestrator: one greeting after the other.
    async fn hello(ctx: OrchestrationContext) -> Result<Vec<Value>, String> {
        let cities: Vec<String> = ctx.input()?;
        let mut greetings = Vec::new();
        for city in &cities {
            greetings.push(ctx.call_activity("say-hello", city).await?);
        }
        Ok(greetings)
    }

    #[test]
    fn first_episode_makes_the_first_decision() {
        let input = json!(["Tokyo", "Seattle"]);
        let answer = run(input.clone(), vec![started(T0), execution(input)], hello);
        assert_eq!(
            answer,
            json!({"actions": [activity("say-hello", json!("Tokyo"))]})
        );
    }

    #[test]
    fn chaining_with_a_partial_history_answers_every_decision_so_far() {
        let input = json!(["Tokyo", "Seattle", "London"]);
        let history = vec![
            started(T0),
            execution(input.clone()),
            scheduled(0, "say-hello", json!("Tokyo")),
            started(T1),
            completed(0, json!("Hello, Tokyo!")),
        ];
        let answer = run(input, history, hello);
        assert_eq!(
            answer,
            json!({"actions": [
                activity("say-hello", json!("Tokyo")),
                activity("say-hello", json!("Seattle")),
            ]})
        );
    }

    #[test]
    fn chaining_with_the_full_history_is_done() {
        let input = json!(["Tokyo", "Seattle"]);
        let history = vec![
            started(T0),
            execution(input.clone()),
            scheduled(0, "say-hello", json!("Tokyo")),
            started(T1),
            completed(0, json!("Hello, Tokyo!")),
            scheduled(1, "say-hello", json!("Seattle")),
            started(T2),
            completed(1, json!("Hello, Seattle!")),
        ];
        let answer = run(input, history, hello);
        assert_eq!(
            answer,
            json!({
                "actions": [
                    activity("say-hello", json!("Tokyo")),
                    activity("say-hello", json!("Seattle")),
                ],
                "done": {"output": ["Hello, Tokyo!", "Hello, Seattle!"]},
            })
        );
    }

    async fn fan_out(ctx: OrchestrationContext) -> Result<i64, String> {
        let tasks = (0..3)
            .map(|i| ctx.call_activity("work", json!({"value": i})))
            .collect();
        let results = task_all(tasks).await?;
        Ok(results.iter().filter_map(Value::as_i64).sum())
    }

    #[test]
    fn task_all_waits_for_every_task() {
        let mut history = vec![started(T0), execution(Value::Null)];
        history.extend((0..3).map(|i| scheduled(i, "work", json!({"value": i}))));
        let actions: Vec<Value> = (0..3)
            .map(|i| activity("work", json!({"value": i})))
            .collect();

        let answer = run(Value::Null, history.clone(), fan_out);
        assert_eq!(answer, json!({"actions": actions}));

        // Two of three in, out of order: still waiting.
        history.extend([started(T1), completed(2, json!(4)), completed(0, json!(0))]);
        let answer = run(Value::Null, history.clone(), fan_out);
        assert_eq!(answer, json!({"actions": actions}));

        history.extend([started(T2), completed(1, json!(2))]);
        let answer = run(Value::Null, history, fan_out);
        assert_eq!(answer, json!({"actions": actions, "done": {"output": 6}}));
    }

    #[test]
    fn task_all_returns_the_first_error_in_task_order() {
        let mut history = vec![started(T0), execution(Value::Null)];
        history.extend((0..3).map(|i| scheduled(i, "work", json!({"value": i}))));
        history.extend([
            started(T1),
            json!({"type": "TaskFailed", "task_id": 2, "error": "two broke"}),
            json!({"type": "TaskFailed", "task_id": 1, "error": "one broke"}),
        ]);
        let answer = run(Value::Null, history.clone(), fan_out);
        assert!(answer.get("failed").is_none(), "waits for task 0: {answer}");
        history.push(completed(0, json!(0)));
        let answer = run(Value::Null, history, fan_out);
        assert_eq!(answer["failed"], json!({"error": "one broke"}));
    }

    /// The human-interaction race: an event against a timer.
    async fn approval(ctx: OrchestrationContext) -> Result<Value, String> {
        let (winner, result) = task_any(vec![
            ctx.wait_for_event("approval"),
            ctx.sleep(Duration::from_millis(5500)),
        ])
        .await;
        Ok(match winner {
            0 => json!({"approved": result?}),
            _ => json!({"timed_out": true}),
        })
    }

    #[test]
    fn task_any_the_event_wins() {
        let history = vec![
            started(T0),
            execution(Value::Null),
            timer_created(0),
            started(T1),
            raised("approval", json!("yes")),
            started(T2),
            timer_fired(0),
        ];
        let answer = run(Value::Null, history, approval);
        assert_eq!(
            answer,
            json!({
                "actions": [{"type": "CreateTimer", "fire_at": T2}],
                "done": {"output": {"approved": "yes"}},
            })
        );
    }

    #[test]
    fn task_any_the_timer_wins() {
        let history = vec![
            started(T0),
            execution(Value::Null),
            timer_created(0),
            started(T2),
            // Both in one episode: the first in history order wins.
            timer_fired(0),
            raised("approval", json!("too late")),
        ];
        let answer = run(Value::Null, history, approval);
        assert_eq!(answer["done"], json!({"output": {"timed_out": true}}));
    }

    #[test]
    fn task_any_prefers_the_earlier_result_among_resolved_tasks() {
        // Both results are in before the race is awaited.
        let f = |ctx: OrchestrationContext| async move {
            let a = ctx.call_activity("a", ());
            let b = ctx.call_activity("b", ());
            ctx.call_activity("gate", ()).await?;
            let (i, r) = task_any(vec![a, b]).await;
            Ok(json!([i, r?]))
        };
        let history = vec![
            started(T0),
            execution(Value::Null),
            started(T1),
            completed(1, json!("b")),
            completed(0, json!("a")),
            completed(2, Value::Null),
        ];
        let answer = run(Value::Null, history, f);
        assert_eq!(answer["done"], json!({"output": [1, "b"]}));
    }

    #[test]
    fn an_event_raised_before_the_wait_is_buffered() {
        let f = |ctx: OrchestrationContext| async move {
            let first = ctx.call_activity("first", ()).await?;
            let a = ctx.wait_for_event("go").await?;
            let b = ctx.wait_for_event("go").await?;
            Ok(json!([first, a, b]))
        };
        let mut history = vec![
            started(T0),
            execution(Value::Null),
            scheduled(0, "first", Value::Null),
            started(T1),
            raised("go", json!(1)),
            raised("other", json!("ignored")),
            raised("go", json!(2)),
        ];
        let answer = run(Value::Null, history.clone(), f);
        assert_eq!(answer, json!({"actions": [activity("first", Value::Null)]}));
        history.extend([started(T2), completed(0, json!("done"))]);
        let answer = run(Value::Null, history, f);
        assert_eq!(answer["done"], json!({"output": ["done", 1, 2]}));
    }

    #[test]
    fn a_wait_that_lost_a_race_does_not_take_the_next_event() {
        let f = |ctx: OrchestrationContext| async move {
            let (winner, _) = task_any(vec![
                ctx.wait_for_event("go"),
                ctx.sleep(Duration::from_secs(1)),
            ])
            .await;
            let next = ctx.wait_for_event("go").await?;
            Ok(json!([winner, next]))
        };
        let history = vec![
            started(T0),
            execution(Value::Null),
            timer_created(0),
            started(T1),
            timer_fired(0),
            started(T2),
            raised("go", json!("x")),
        ];
        let answer = run(Value::Null, history, f);
        assert_eq!(answer["done"], json!({"output": [1, "x"]}));
    }

    async fn countdown(ctx: OrchestrationContext) -> Result<Value, String> {
        let n: u64 = ctx.input()?;
        if n == 0 {
            return Ok(json!("liftoff"));
        }
        ctx.call_activity("tick", n).await?;
        ctx.continue_as_new(n - 1);
        // Ignored: the code should have returned.
        let _ignored = ctx.call_activity("after", ());
        Ok(json!("ignored"))
    }

    #[test]
    fn continue_as_new_replaces_the_outcome() {
        let history = vec![
            started(T0),
            execution(json!(3)),
            scheduled(0, "tick", json!(3)),
            started(T1),
            completed(0, Value::Null),
        ];
        let answer = run(json!(3), history, countdown);
        assert_eq!(
            answer,
            json!({
                "actions": [activity("tick", json!(3))],
                "continue_as_new": {"input": 2},
            })
        );
        let answer = run(json!(0), vec![started(T0), execution(json!(0))], countdown);
        assert_eq!(answer["done"], json!({"output": "liftoff"}));
    }

    #[test]
    fn the_last_custom_status_is_answered() {
        let f = |ctx: OrchestrationContext| async move {
            ctx.set_custom_status("starting");
            ctx.call_activity("a", ()).await?;
            ctx.set_custom_status(json!({"stage": 2}));
            ctx.call_activity("b", ()).await?;
            Ok(Value::Null)
        };
        let answer = run(Value::Null, vec![started(T0)], f);
        assert_eq!(answer["custom_status"], json!("starting"));
        let history = vec![started(T0), started(T1), completed(0, Value::Null)];
        let answer = run(Value::Null, history, f);
        assert_eq!(answer["custom_status"], json!({"stage": 2}));
        assert!(answer.get("done").is_none());
        let answer = run(Value::Null, vec![started(T0)], |_| async { Ok(()) });
        assert_eq!(answer, json!({"actions": [], "done": {"output": null}}));
    }

    #[test]
    fn current_time_and_is_replaying_come_from_the_history() {
        let seen = Rc::new(RefCell::new(Vec::new()));
        let log = seen.clone();
        let f = move |ctx: OrchestrationContext| async move {
            log.borrow_mut()
                .push((ctx.current_time(), ctx.is_replaying()));
            ctx.call_activity("a", ()).await?;
            log.borrow_mut()
                .push((ctx.current_time(), ctx.is_replaying()));
            ctx.sleep(Duration::from_secs(5)).await?;
            log.borrow_mut()
                .push((ctx.current_time(), ctx.is_replaying()));
            Ok(Value::Null)
        };
        let history = vec![
            started(T0),
            execution(Value::Null),
            scheduled(0, "a", Value::Null),
            started(T1),
            completed(0, Value::Null),
        ];
        let answer = run(Value::Null, history, f);
        assert_eq!(
            answer["actions"][1],
            json!({"type": "CreateTimer", "fire_at": "2026-11-22T10:00:05.004211Z"})
        );
        let t = |s: &str| parse_rfc3339(s).unwrap();
        assert_eq!(*seen.borrow(), [(t(T0), true), (t(T1), false)]);
    }

    #[test]
    fn a_failed_task_is_an_error() {
        let history = vec![
            started(T0),
            execution(json!(["Atlantis"])),
            scheduled(0, "say-hello", json!("Atlantis")),
            started(T1),
            json!({"type": "TaskFailed", "task_id": 0, "error": "no such city"}),
        ];
        let answer = run(json!(["Atlantis"]), history.clone(), hello);
        assert_eq!(answer["failed"], json!({"error": "no such city"}));

        // Caught, it is an ordinary value.
        let f = |ctx: OrchestrationContext| async move {
            match ctx.call_activity("say-hello", "Atlantis").await {
                Ok(_) => Ok("found".to_owned()),
                Err(e) => Ok(format!("lost: {e}")),
            }
        };
        let answer = run(json!(["Atlantis"]), history, f);
        assert_eq!(answer["done"], json!({"output": "lost: no such city"}));
    }

    #[test]
    fn other_failures_sub_orchestrations_and_entities() {
        let f = |ctx: OrchestrationContext| async move {
            let sub = ctx.call_sub_orchestrator("child", json!({"x": 1}));
            let named = ctx.call_sub_orchestrator_with_id("child", "kid", ());
            ctx.signal_entity("@counter@a", "add", 1);
            let called = ctx.call_entity("@counter@a", "get", ());
            let retried = ctx.call_activity_with_retry(
                "flaky",
                (),
                RetryOptions::new(3, Duration::from_millis(1500)),
            );
            let results = [sub.await, named.await, called.await, retried.await];
            Ok(results
                .into_iter()
                .map(|r| r.unwrap_or_else(|e| json!(format!("error: {e}"))))
                .collect::<Vec<_>>())
        };
        let history = vec![
            started(T0),
            started(T1),
            json!({"type": "SubOrchestrationCompleted", "task_id": 0, "result": "child done"}),
            json!({"type": "SubOrchestrationFailed", "task_id": 1, "error": "child broke"}),
            // Task 2 is the signal: an answer for it is nobody's.
            json!({"type": "EntityResponded", "task_id": 2, "result": "stray"}),
            json!({"type": "EntityFailed", "task_id": 3, "error": {"code": 7}}),
            completed(4, json!(42)),
            completed(99, json!("unknown task")),
            json!({"type": "ExecutionSuspended"}),
        ];
        let answer = run(Value::Null, history, f);
        assert_eq!(
            answer,
            json!({
                "actions": [
                    {"type": "CallSubOrchestrator", "name": "child", "input": {"x": 1}},
                    {"type": "CallSubOrchestrator", "name": "child", "input": null, "instance_id": "kid"},
                    {"type": "SignalEntity", "entity": "@counter@a", "operation": "add", "input": 1},
                    {"type": "CallEntity", "entity": "@counter@a", "operation": "get", "input": null},
                    {"type": "CallActivity", "name": "flaky", "input": null, "retry": {
                        "max_attempts": 3, "first_retry_ms": 1500,
                        "backoff_coefficient": 2.0, "max_retry_ms": 3_600_000,
                    }},
                ],
                "done": {"output": ["child done", "error: child broke", "error: {\"code\":7}", 42]},
            })
        );
    }

    #[test]
    fn guids_and_ids_are_deterministic() {
        let f = |ctx: OrchestrationContext| async move {
            assert_eq!(ctx.instance_id(), "i-1");
            assert_eq!(ctx.name(), "test");
            assert_eq!(ctx.history_len(), 1);
            Ok([ctx.new_guid(), ctx.new_guid(), entity_id("counter", "k")])
        };
        let answer = run(Value::Null, vec![started(T0)], f);
        assert_eq!(
            answer["done"]["output"],
            json!([
                format!("i-1:{T0_US}:0"),
                format!("i-1:{T0_US}:1"),
                "@counter@k"
            ])
        );
    }

    #[test]
    fn a_bad_input_fails_the_orchestration() {
        let answer = run(json!("not a list"), vec![started(T0)], hello);
        let error = answer["failed"]["error"].as_str().unwrap();
        assert!(error.starts_with("invalid input: "), "{error}");
    }

    #[test]
    fn an_input_that_is_not_json_fails_the_orchestration() {
        let f = |ctx: OrchestrationContext| async move {
            let mut bad = HashMap::new();
            bad.insert((1, 2), 3);
            ctx.call_activity("a", ()).await?;
            let _never = ctx.call_activity("b", bad);
            ctx.call_activity("c", ()).await?;
            Ok(Value::Null)
        };
        let history = vec![started(T0), started(T1), completed(0, Value::Null)];
        let answer = run(Value::Null, history, f);
        assert_eq!(answer["actions"], json!([activity("a", Value::Null)]));
        let error = answer["failed"]["error"].as_str().unwrap();
        assert!(
            error.starts_with("the input of activity `b` is not JSON"),
            "{error}"
        );
    }

    #[test]
    fn a_request_that_is_not_the_protocols_is_an_error() {
        let f = |_: OrchestrationContext| async { Ok(()) };
        assert!(replay(b"[1]", f).is_err());
        assert!(replay(b"{", f).is_err());
        let bad_time = request(Value::Null, vec![started("yesterday")]);
        assert!(replay(&bytes(bad_time), f).is_err());
        let no_task = request(Value::Null, vec![json!({"type": "TaskCompleted"})]);
        assert!(replay(&bytes(no_task), f).is_err());
        let no_name = request(Value::Null, vec![json!({"type": "EventRaised"})]);
        assert!(replay(&bytes(no_name), f).is_err());
    }

    #[test]
    fn rfc3339_round_trips() {
        let t = parse_rfc3339(T1).unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap(),
            Duration::new(1_795_341_600, 4_211_000)
        );
        assert_eq!(format_rfc3339(t), T1);
        for (text, canonical) in [
            ("1970-01-01T00:00:00Z", "1970-01-01T00:00:00.000000Z"),
            ("2000-02-29T23:59:59.5+01:00", "2000-02-29T22:59:59.500000Z"),
            (
                "1969-12-31t23:59:59.25-00:30",
                "1970-01-01T00:29:59.250000Z",
            ),
            (
                "1960-06-15T12:00:00.123456789Z",
                "1960-06-15T12:00:00.123456789Z",
            ),
            (
                "2026-11-22 10:00:00.1234567891Z",
                "2026-11-22T10:00:00.123456789Z",
            ),
        ] {
            let t = parse_rfc3339(text).unwrap();
            assert_eq!(format_rfc3339(t), canonical, "{text}");
        }
        for bad in [
            "",
            "2026-11-22",
            "2026-13-01T00:00:00Z",
            "2026-11-22T10:00:00",
            "2026-11-22T10:00:00.Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn activities() {
        let request =
            json!({"instance_id": "i-1", "name": "say-hello", "input": "Tokyo", "attempt": 2});
        let answer = run_activity(request, |ctx| {
            assert_eq!(
                (ctx.instance_id.as_str(), ctx.name.as_str(), ctx.attempt),
                ("i-1", "say-hello", 2)
            );
            let city: String = ctx.input()?;
            Ok(format!("Hello, {city}!"))
        });
        assert_eq!(answer, Ok(json!("Hello, Tokyo!")));
        let answer = run_activity(json!({"input": 1}), |ctx| {
            assert_eq!(ctx.attempt, 1);
            Err::<(), _>("broken".to_owned())
        });
        assert_eq!(answer, Err("broken".to_owned()));
    }

    fn counter(e: &mut EntityContext) -> Result<Value, String> {
        let value: i64 = e.state().unwrap_or(0);
        match e.operation() {
            "add" => {
                let n: i64 = e.input()?;
                e.set_state(value + n);
                Ok(json!(value + n))
            }
            "delete" => {
                e.delete_state();
                Ok(Value::Null)
            }
            "get" => Ok(json!(value)),
            op => Err(format!("no operation `{op}`")),
        }
    }

    fn entity_request(operation: &str, input: Value, state: Value) -> Value {
        json!({"entity": "@counter@k", "name": "counter", "key": "k",
               "operation": operation, "input": input, "state": state})
    }

    #[test]
    fn entities() {
        let answer = run_entity(entity_request("add", json!(5), json!(37)), counter);
        assert_eq!(answer, Ok(json!({"state": 42, "result": 42})));
        let answer = run_entity(entity_request("add", json!(5), Value::Null), counter);
        assert_eq!(answer, Ok(json!({"state": 5, "result": 5})));
        let answer = run_entity(entity_request("get", Value::Null, json!(3)), counter);
        assert_eq!(answer, Ok(json!({"state": 3, "result": 3})));
        let answer = run_entity(entity_request("delete", Value::Null, json!(3)), counter);
        assert_eq!(
            answer,
            Ok(json!({"state": null, "delete": true, "result": null}))
        );
        let answer = run_entity(entity_request("mul", json!(2), json!(3)), counter);
        assert_eq!(answer, Err("no operation `mul`".to_owned()));
        let answer = run_entity(entity_request("add", json!(2), json!(3)), |e| {
            assert_eq!(
                (e.entity_id(), e.name(), e.key()),
                ("@counter@k", "counter", "k")
            );
            assert_eq!(e.input_value(), &json!(2));
            assert_eq!(e.state_value(), &json!(3));
            assert_eq!(e.state::<String>(), None);
            Ok(())
        });
        assert_eq!(answer, Ok(json!({"state": 3, "result": null})));
    }
}
