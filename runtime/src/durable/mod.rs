//! Durable functions' state and protocol: an instance's history events, the
//! orchestrator's answer, and [`episode::decide`], which turns an answer
//! into what changes (checking determinism). The store is
//! [`store::DurableStore`]; running episodes, activities and entities is
//! the durable trigger's (`trigger::durable`). docs/durable.md is the
//! contract.

pub mod episode;
pub mod store;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::events::{now_us, rfc3339};

/// Where a sub-orchestration reports to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Parent {
    pub instance_id: String,
    pub task_id: u32,
    /// The parent's generation (a parent that continued as new ignores it).
    #[serde(default)]
    pub generation: u32,
}

/// One event of an instance's history (docs/durable.md lists them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum HistoryEvent {
    OrchestratorStarted {
        timestamp: String,
    },
    ExecutionStarted {
        name: String,
        input: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<Parent>,
    },
    TaskScheduled {
        task_id: u32,
        name: String,
        input: Value,
    },
    TaskCompleted {
        task_id: u32,
        result: Value,
    },
    TaskFailed {
        task_id: u32,
        error: String,
    },
    SubOrchestrationCreated {
        task_id: u32,
        name: String,
        instance_id: String,
        input: Value,
    },
    SubOrchestrationCompleted {
        task_id: u32,
        result: Value,
    },
    SubOrchestrationFailed {
        task_id: u32,
        error: String,
    },
    TimerCreated {
        task_id: u32,
        fire_at: String,
    },
    TimerFired {
        task_id: u32,
        fire_at: String,
    },
    EntityCalled {
        task_id: u32,
        entity: String,
        operation: String,
        input: Value,
    },
    EntitySignaled {
        task_id: u32,
        entity: String,
        operation: String,
        input: Value,
    },
    EntityResponded {
        task_id: u32,
        result: Value,
    },
    EntityFailed {
        task_id: u32,
        error: String,
    },
    EventRaised {
        name: String,
        input: Value,
    },
    ExecutionSuspended {
        #[serde(default)]
        reason: String,
    },
    ExecutionResumed {
        #[serde(default)]
        reason: String,
    },
    ExecutionTerminated {
        #[serde(default)]
        reason: String,
    },
    ExecutionCompleted {
        status: RuntimeStatus,
        output: Value,
    },
}

impl HistoryEvent {
    /// The decision this event records, if it is one: `(task_id, step)`.
    fn decision(&self) -> Option<(u32, Step<'_>)> {
        Some(match self {
            HistoryEvent::TaskScheduled { task_id, name, .. } => {
                (*task_id, Step::Named("CallActivity", name))
            }
            HistoryEvent::SubOrchestrationCreated { task_id, name, .. } => {
                (*task_id, Step::Named("CallSubOrchestrator", name))
            }
            HistoryEvent::TimerCreated { task_id, .. } => (*task_id, Step::Timer),
            HistoryEvent::EntityCalled {
                task_id,
                entity,
                operation,
                ..
            } => (*task_id, Step::Entity("CallEntity", entity, operation)),
            HistoryEvent::EntitySignaled {
                task_id,
                entity,
                operation,
                ..
            } => (*task_id, Step::Entity("SignalEntity", entity, operation)),
            _ => return None,
        })
    }
}

/// What a decision is, as the determinism check compares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step<'a> {
    Named(&'static str, &'a str),
    Timer,
    Entity(&'static str, &'a str, &'a str),
}

impl std::fmt::Display for Step<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Named(kind, name) => write!(f, "{kind} {name:?}"),
            Step::Timer => f.write_str("CreateTimer"),
            Step::Entity(kind, entity, op) => write!(f, "{kind} {entity:?} {op:?}"),
        }
    }
}

/// The retry options of an activity call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    #[serde(default = "one")]
    pub max_attempts: u32,
    #[serde(default = "second")]
    pub first_retry_ms: u64,
    #[serde(default = "two")]
    pub backoff_coefficient: f64,
    #[serde(default = "hour")]
    pub max_retry_ms: u64,
}

fn one() -> u32 {
    1
}
fn second() -> u64 {
    1000
}
fn two() -> f64 {
    2.0
}
fn hour() -> u64 {
    3_600_000
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            max_attempts: 1,
            first_retry_ms: second(),
            backoff_coefficient: two(),
            max_retry_ms: hour(),
        }
    }
}

impl Retry {
    /// The wait after failed attempt `attempt` (1-based).
    pub fn delay_ms(&self, attempt: u32) -> u64 {
        let factor = self
            .backoff_coefficient
            .max(1.0)
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let ms = (self.first_retry_ms as f64 * factor).min(self.max_retry_ms as f64);
        if ms.is_finite() {
            ms as u64
        } else {
            self.max_retry_ms
        }
    }
}

/// One decision of an orchestrator's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Action {
    CallActivity {
        name: String,
        #[serde(default)]
        input: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry: Option<Retry>,
    },
    CallSubOrchestrator {
        name: String,
        #[serde(default)]
        input: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance_id: Option<String>,
    },
    CreateTimer {
        fire_at: String,
    },
    CallEntity {
        entity: String,
        operation: String,
        #[serde(default)]
        input: Value,
    },
    SignalEntity {
        entity: String,
        operation: String,
        #[serde(default)]
        input: Value,
    },
}

impl Action {
    fn step(&self) -> Step<'_> {
        match self {
            Action::CallActivity { name, .. } => Step::Named("CallActivity", name),
            Action::CallSubOrchestrator { name, .. } => Step::Named("CallSubOrchestrator", name),
            Action::CreateTimer { .. } => Step::Timer,
            Action::CallEntity {
                entity, operation, ..
            } => Step::Entity("CallEntity", entity, operation),
            Action::SignalEntity {
                entity, operation, ..
            } => Step::Entity("SignalEntity", entity, operation),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Done {
    #[serde(default)]
    pub output: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failed {
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContinueAsNew {
    #[serde(default)]
    pub input: Value,
}

/// An orchestrator's answer, as it comes (parsed, not yet checked).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    #[serde(default)]
    pub actions: Vec<Action>,
    #[serde(default)]
    pub custom_status: Option<Value>,
    #[serde(default)]
    pub done: Option<Done>,
    #[serde(default)]
    pub failed: Option<Failed>,
    #[serde(default)]
    pub continue_as_new: Option<ContinueAsNew>,
}

impl Answer {
    /// Parses an orchestrator's output; the error says what is wrong in
    /// words a guest author can act on.
    pub fn parse(bytes: &[u8]) -> Result<Answer, String> {
        let answer: Answer = serde_json::from_slice(bytes).map_err(|e| {
            format!("the orchestrator's answer is not the protocol's JSON (docs/durable.md): {e}")
        })?;
        let outcomes = [
            answer.done.is_some(),
            answer.failed.is_some(),
            answer.continue_as_new.is_some(),
        ]
        .iter()
        .filter(|o| **o)
        .count();
        if outcomes > 1 {
            return Err(
                "the orchestrator's answer has more than one of `done`, `failed` and `continue_as_new`"
                    .into(),
            );
        }
        Ok(answer)
    }
}

/// An entity operation's answer.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityAnswer {
    #[serde(default)]
    pub state: Value,
    #[serde(default)]
    pub result: Value,
    #[serde(default)]
    pub delete: bool,
}

impl EntityAnswer {
    pub fn parse(bytes: &[u8]) -> Result<EntityAnswer, String> {
        serde_json::from_slice(bytes).map_err(|e| {
            format!("the entity's answer is not the protocol's JSON (docs/durable.md): {e}")
        })
    }

    /// The state to keep: `None` deletes the entity.
    pub fn new_state(&self) -> Option<Value> {
        (!self.delete && !self.state.is_null()).then(|| self.state.clone())
    }
}

/// Parses a result (an activity's): empty is `null`.
pub fn parse_result(bytes: &[u8]) -> Result<Value, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(bytes).map_err(|e| format!("the result is not JSON: {e}"))
}

/// An instance's state, as the management API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RuntimeStatus {
    Pending,
    Running,
    Completed,
    ContinuedAsNew,
    Failed,
    Terminated,
    Suspended,
}

impl RuntimeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeStatus::Pending => "Pending",
            RuntimeStatus::Running => "Running",
            RuntimeStatus::Completed => "Completed",
            RuntimeStatus::ContinuedAsNew => "ContinuedAsNew",
            RuntimeStatus::Failed => "Failed",
            RuntimeStatus::Terminated => "Terminated",
            RuntimeStatus::Suspended => "Suspended",
        }
    }

    pub fn parse(s: &str) -> Option<RuntimeStatus> {
        Some(match s {
            "Pending" => RuntimeStatus::Pending,
            "Running" => RuntimeStatus::Running,
            "Completed" => RuntimeStatus::Completed,
            "ContinuedAsNew" => RuntimeStatus::ContinuedAsNew,
            "Failed" => RuntimeStatus::Failed,
            "Terminated" => RuntimeStatus::Terminated,
            "Suspended" => RuntimeStatus::Suspended,
            _ => return None,
        })
    }

    /// Whether the instance has ended (nothing more happens to it).
    pub fn ended(self) -> bool {
        matches!(
            self,
            RuntimeStatus::Completed | RuntimeStatus::Failed | RuntimeStatus::Terminated
        )
    }
}

/// An orchestration instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub id: String,
    pub name: String,
    /// The orchestrator version it is pinned to.
    pub version: String,
    pub status: RuntimeStatus,
    pub input: Value,
    pub output: Value,
    pub custom_status: Value,
    pub created_us: i64,
    pub updated_us: i64,
    /// Increases at each continue-as-new; results for an older generation
    /// are dropped.
    pub generation: u32,
    pub parent: Option<Parent>,
}

/// An entity id, `@name@key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityId {
    pub name: String,
    pub key: String,
}

impl EntityId {
    pub fn parse(s: &str) -> Result<EntityId, String> {
        let rest = s
            .strip_prefix('@')
            .ok_or_else(|| format!("entity id {s:?} must be `@name@key`"))?;
        let (name, key) = rest
            .split_once('@')
            .ok_or_else(|| format!("entity id {s:?} must be `@name@key`"))?;
        if name.is_empty() || key.is_empty() {
            return Err(format!("entity id {s:?} must be `@name@key`"));
        }
        Ok(EntityId {
            name: name.to_owned(),
            key: key.to_owned(),
        })
    }

    pub fn is_entity(target: &str) -> bool {
        target.starts_with('@')
    }
}

impl std::fmt::Display for EntityId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "@{}@{}", self.name, self.key)
    }
}

/// Who asked for an entity operation's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyTo {
    pub instance_id: String,
    pub generation: u32,
    pub task_id: u32,
}

/// A message waiting in an instance's or entity's inbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Message {
    /// For an orchestration: an event of its history to come (a completion,
    /// an event raised, a start) or a command (suspend, resume, terminate).
    Event { event: HistoryEvent },
    /// For an entity: an operation.
    Operation {
        operation: String,
        #[serde(default)]
        input: Value,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<ReplyTo>,
    },
}

/// A message in an inbox, as read.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxItem {
    pub id: String,
    pub target: String,
    /// The generation it is for; `None` for whichever is current.
    pub generation: Option<u32>,
    pub message: Message,
    pub visible_us: i64,
}

/// The events raised to one generation of an instance, counted against
/// its bound: each is in every step's episode, waited for or not, so an
/// instance sent events it never waits for would otherwise grow without
/// end (300 events of 60 KB made an 18 MB episode). Past
/// [`RaisedEvents::MAX_EVENTS`] events or [`RaisedEvents::MAX_BYTES`] of
/// input, a raise is refused; continuing as new starts the count again.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RaisedEvents {
    events: usize,
    bytes: usize,
}

impl RaisedEvents {
    pub const MAX_EVENTS: usize = 1_000;
    pub const MAX_BYTES: usize = 4 << 20;

    /// Counts `event` if it is a raised event.
    pub fn event(&mut self, event: &HistoryEvent) {
        if let HistoryEvent::EventRaised { input, .. } = event {
            self.add(input);
        }
    }

    /// Counts one raised event with this input.
    pub fn add(&mut self, input: &Value) {
        self.events += 1;
        self.bytes += serde_json::to_string(input).map_or(0, |s| s.len());
    }

    pub fn over(&self) -> bool {
        self.events > Self::MAX_EVENTS || self.bytes > Self::MAX_BYTES
    }
}

/// An activity call waiting to run (or to be retried).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkItem {
    pub id: String,
    pub instance_id: String,
    pub generation: u32,
    pub task_id: u32,
    pub name: String,
    pub input: Value,
    /// Attempts made so far.
    pub attempts: u32,
    pub retry: Retry,
    pub visible_us: i64,
}

/// What a function's durable output binding does once it succeeded
/// (committed with its record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurableOutput {
    /// Starts an orchestration (unless an instance with this id runs).
    Start {
        orchestration: String,
        instance_id: String,
        input: Value,
    },
    /// Raises an event to a running instance.
    Raise {
        instance_id: String,
        event: String,
        input: Value,
    },
    /// Signals an entity.
    Signal {
        entity: String,
        operation: String,
        input: Value,
    },
}

impl DurableOutput {
    /// The instance or entity it wakes.
    pub fn target(&self) -> &str {
        match self {
            DurableOutput::Start { instance_id, .. } | DurableOutput::Raise { instance_id, .. } => {
                instance_id
            }
            DurableOutput::Signal { entity, .. } => entity,
        }
    }
}

/// Parses an RFC 3339 time into UNIX microseconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_micros())
        .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))
}
