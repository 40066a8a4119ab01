//! One orchestration episode's decisions, as a pure function: given the
//! instance, its history, the events this episode consumed and the
//! orchestrator's answer, what to append, schedule and change. Determinism
//! is checked here, so every language's SDK gets it.

use serde_json::Value;

use super::{
    Action, Answer, EntityId, HistoryEvent, InboxItem, Instance, Message, Parent, ReplyTo,
    RuntimeStatus, WorkItem, parse_time,
};

/// A message to put in an inbox.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    /// Chosen here, so whoever is handed the message in memory after its
    /// commit consumes the same row.
    pub id: String,
    pub target: String,
    /// `None`: for whichever generation is current when it is read.
    pub generation: Option<u32>,
    pub message: Message,
    pub visible_us: i64,
}

impl NewMessage {
    /// As its target's inbox holds it once committed.
    pub fn into_item(self) -> InboxItem {
        InboxItem {
            id: self.id,
            target: self.target,
            generation: self.generation,
            message: self.message,
            visible_us: self.visible_us,
        }
    }

    /// An event for an orchestration instance.
    pub fn event(
        target: impl Into<String>,
        generation: Option<u32>,
        event: HistoryEvent,
        visible_us: i64,
    ) -> NewMessage {
        NewMessage {
            id: message_id(),
            target: target.into(),
            generation,
            message: Message::Event { event },
            visible_us,
        }
    }

    /// The message that starts `generation` of instance `id` (at its
    /// creation, or a continue-as-new).
    pub fn start(
        id: impl Into<String>,
        generation: u32,
        name: impl Into<String>,
        input: Value,
        parent: Option<Parent>,
        visible_us: i64,
    ) -> NewMessage {
        NewMessage::event(
            id,
            Some(generation),
            HistoryEvent::ExecutionStarted {
                name: name.into(),
                input,
                parent,
            },
            visible_us,
        )
    }

    /// An operation for an entity.
    pub fn operation(
        target: impl Into<String>,
        operation: impl Into<String>,
        input: Value,
        reply_to: Option<ReplyTo>,
        visible_us: i64,
    ) -> NewMessage {
        NewMessage {
            id: message_id(),
            target: target.into(),
            generation: None,
            message: Message::Operation {
                operation: operation.into(),
                input,
                reply_to,
            },
            visible_us,
        }
    }
}

/// A new message's id (time-ordered, as the inbox orders them).
pub fn message_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A sub-orchestration to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewChild {
    pub id: String,
    pub name: String,
    pub input: Value,
    pub parent: Parent,
}

/// What an episode changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    /// Appended to the history (the consumed events first).
    pub append: Vec<HistoryEvent>,
    pub status: RuntimeStatus,
    /// The output (completed), the error (failed): set when it ended.
    pub output: Option<Value>,
    pub custom_status: Option<Value>,
    pub work: Vec<WorkItem>,
    pub messages: Vec<NewMessage>,
    pub children: Vec<NewChild>,
    /// Continue as new with this input: the history starts over.
    pub restart: Option<Value>,
}

/// What the episode may call: the app's durable functions by role.
pub trait Known {
    fn activity(&self, name: &str) -> bool;
    fn orchestrator(&self, name: &str) -> bool;
    fn entity(&self, name: &str) -> bool;
}

/// The events of `history` that are decisions, as `(task_id, step)`.
fn recorded(history: &[HistoryEvent]) -> Vec<(u32, super::Step<'_>)> {
    history.iter().filter_map(HistoryEvent::decision).collect()
}

/// Checks that `answer` repeats every recorded decision; the error names
/// the first step that differs.
pub fn check_determinism(history: &[HistoryEvent], actions: &[Action]) -> Result<(), String> {
    for (n, (task_id, step)) in recorded(history).into_iter().enumerate() {
        if task_id as usize != n {
            return Err(format!(
                "the history's decisions are out of order at step {n} (task {task_id})"
            ));
        }
        match actions.get(n) {
            None => {
                return Err(format!(
                    "non-deterministic orchestrator: step {n} ({step}) is in the history, but the orchestrator no longer makes it"
                ));
            }
            Some(a) if a.step() != step => {
                return Err(format!(
                    "non-deterministic orchestrator: step {n} was {step} in the history, now {}",
                    a.step()
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The orchestration's failure: appended, reported to a parent.
fn fail(instance: &Instance, mut append: Vec<HistoryEvent>, error: String, now: i64) -> Decided {
    append.push(HistoryEvent::ExecutionCompleted {
        status: RuntimeStatus::Failed,
        output: Value::String(error.clone()),
    });
    Decided {
        append,
        status: RuntimeStatus::Failed,
        output: Some(Value::String(error.clone())),
        custom_status: None,
        work: Vec::new(),
        messages: to_parent(instance, Err(error), now),
        children: Vec::new(),
        restart: None,
    }
}

/// The message that tells a parent how its sub-orchestration ended.
pub fn to_parent(instance: &Instance, result: Result<Value, String>, now: i64) -> Vec<NewMessage> {
    let Some(p) = &instance.parent else {
        return Vec::new();
    };
    let event = match result {
        Ok(result) => HistoryEvent::SubOrchestrationCompleted {
            task_id: p.task_id,
            result,
        },
        Err(error) => HistoryEvent::SubOrchestrationFailed {
            task_id: p.task_id,
            error,
        },
    };
    vec![NewMessage::event(
        p.instance_id.clone(),
        Some(p.generation),
        event,
        now,
    )]
}

/// Decides an episode. `history` is what was recorded before it, `new`
/// what it consumed (an `OrchestratorStarted` first), `answer` the
/// orchestrator's answer or why there is none; `now` stamps new messages.
pub fn decide(
    instance: &Instance,
    history: &[HistoryEvent],
    new: Vec<HistoryEvent>,
    answer: Result<Answer, String>,
    known: &dyn Known,
    now: i64,
) -> Decided {
    let mut append = new;
    let answer = match answer {
        Ok(a) => a,
        Err(e) => return fail(instance, append, e, now),
    };
    // Decisions are never in `new` (only completions and events are), so
    // the history before the episode holds them all.
    if let Err(e) = check_determinism(history, &answer.actions) {
        return fail(instance, append, e, now);
    }
    let first_new = history.iter().filter_map(HistoryEvent::decision).count();
    let mut d = Decided {
        append: Vec::new(),
        status: RuntimeStatus::Running,
        output: None,
        custom_status: answer.custom_status.clone(),
        work: Vec::new(),
        messages: Vec::new(),
        children: Vec::new(),
        restart: None,
    };
    let me = |event: HistoryEvent| {
        NewMessage::event(instance.id.clone(), Some(instance.generation), event, now)
    };
    for (task_id, action) in answer.actions.iter().enumerate().skip(first_new) {
        let task_id = task_id as u32;
        match action {
            Action::CallActivity { name, input, retry } => {
                append.push(HistoryEvent::TaskScheduled {
                    task_id,
                    name: name.clone(),
                    input: input.clone(),
                });
                if known.activity(name) {
                    d.work.push(WorkItem {
                        id: uuid::Uuid::now_v7().to_string(),
                        instance_id: instance.id.clone(),
                        generation: instance.generation,
                        task_id,
                        name: name.clone(),
                        input: input.clone(),
                        attempts: 0,
                        retry: retry.clone().unwrap_or_default(),
                        visible_us: now,
                    });
                } else {
                    d.messages.push(me(HistoryEvent::TaskFailed {
                        task_id,
                        error: format!("no activity function named {name:?} in this app"),
                    }));
                }
            }
            Action::CallSubOrchestrator {
                name,
                input,
                instance_id,
            } => {
                let id = instance_id
                    .clone()
                    .unwrap_or_else(|| format!("{}:{task_id}", instance.id));
                append.push(HistoryEvent::SubOrchestrationCreated {
                    task_id,
                    name: name.clone(),
                    instance_id: id.clone(),
                    input: input.clone(),
                });
                if known.orchestrator(name) {
                    d.children.push(NewChild {
                        id,
                        name: name.clone(),
                        input: input.clone(),
                        parent: Parent {
                            instance_id: instance.id.clone(),
                            task_id,
                            generation: instance.generation,
                        },
                    });
                } else {
                    d.messages.push(me(HistoryEvent::SubOrchestrationFailed {
                        task_id,
                        error: format!("no orchestrator function named {name:?} in this app"),
                    }));
                }
            }
            Action::CreateTimer { fire_at } => {
                let at = match parse_time(fire_at) {
                    Ok(at) => at,
                    Err(e) => {
                        return fail(
                            instance,
                            append,
                            format!("step {task_id}: CreateTimer's fire_at: {e}"),
                            now,
                        );
                    }
                };
                append.push(HistoryEvent::TimerCreated {
                    task_id,
                    fire_at: fire_at.clone(),
                });
                let mut m = me(HistoryEvent::TimerFired {
                    task_id,
                    fire_at: fire_at.clone(),
                });
                m.visible_us = at.max(now);
                d.messages.push(m);
            }
            Action::CallEntity {
                entity,
                operation,
                input,
            }
            | Action::SignalEntity {
                entity,
                operation,
                input,
            } => {
                let call = matches!(action, Action::CallEntity { .. });
                append.push(if call {
                    HistoryEvent::EntityCalled {
                        task_id,
                        entity: entity.clone(),
                        operation: operation.clone(),
                        input: input.clone(),
                    }
                } else {
                    HistoryEvent::EntitySignaled {
                        task_id,
                        entity: entity.clone(),
                        operation: operation.clone(),
                        input: input.clone(),
                    }
                });
                let target = EntityId::parse(entity).and_then(|id| {
                    if known.entity(&id.name) {
                        Ok(id)
                    } else {
                        Err(format!(
                            "no entity function named {:?} in this app",
                            id.name
                        ))
                    }
                });
                match target {
                    Ok(id) => d.messages.push(NewMessage::operation(
                        id.to_string(),
                        operation.clone(),
                        input.clone(),
                        call.then(|| ReplyTo {
                            instance_id: instance.id.clone(),
                            generation: instance.generation,
                            task_id,
                        }),
                        now,
                    )),
                    Err(error) if call => {
                        d.messages
                            .push(me(HistoryEvent::EntityFailed { task_id, error }));
                    }
                    Err(error) => {
                        tracing::warn!(instance = instance.id.as_str(), %error, "a signal to an unknown entity is dropped");
                    }
                }
            }
        }
    }
    if let Some(done) = answer.done {
        append.push(HistoryEvent::ExecutionCompleted {
            status: RuntimeStatus::Completed,
            output: done.output.clone(),
        });
        d.status = RuntimeStatus::Completed;
        d.messages
            .extend(to_parent(instance, Ok(done.output.clone()), now));
        d.output = Some(done.output);
        // Work scheduled by the last answer still runs (at least once);
        // its result finds an ended instance and is dropped.
    } else if let Some(failed) = answer.failed {
        let mut f = fail(instance, append, failed.error, now);
        f.work = d.work;
        f.children = d.children;
        f.messages.splice(0..0, d.messages);
        f.custom_status = d.custom_status;
        return f;
    } else if let Some(next) = answer.continue_as_new {
        d.status = RuntimeStatus::ContinuedAsNew;
        d.restart = Some(next.input);
        // Timers and calls of the generation that ends would only be
        // dropped; signals are sent (they are one-way and already decided).
        d.work.clear();
        d.children.clear();
        d.messages.retain(|m| m.target != instance.id);
    }
    d.append = append;
    d
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    struct All;
    impl Known for All {
        fn activity(&self, name: &str) -> bool {
            name != "missing"
        }
        fn orchestrator(&self, _: &str) -> bool {
            true
        }
        fn entity(&self, name: &str) -> bool {
            name == "counter"
        }
    }

    fn instance() -> Instance {
        Instance {
            id: "i1".into(),
            name: "o".into(),
            version: "v".into(),
            status: RuntimeStatus::Running,
            input: Value::Null,
            output: Value::Null,
            custom_status: Value::Null,
            created_us: 0,
            updated_us: 0,
            generation: 0,
            parent: None,
        }
    }

    fn call(name: &str) -> Action {
        Action::CallActivity {
            name: name.into(),
            input: json!(1),
            retry: None,
        }
    }

    fn started() -> Vec<HistoryEvent> {
        vec![
            HistoryEvent::OrchestratorStarted {
                timestamp: "2026-01-01T00:00:00Z".into(),
            },
            HistoryEvent::ExecutionStarted {
                name: "o".into(),
                input: Value::Null,
                parent: None,
            },
        ]
    }

    #[test]
    fn new_decisions_are_scheduled_and_old_ones_are_not_repeated() {
        let mut history = started();
        history.push(HistoryEvent::TaskScheduled {
            task_id: 0,
            name: "a".into(),
            input: json!(1),
        });
        let new = vec![HistoryEvent::TaskCompleted {
            task_id: 0,
            result: json!(2),
        }];
        let answer = Answer {
            actions: vec![call("a"), call("b")],
            ..Answer::default()
        };
        let d = decide(&instance(), &history, new, Ok(answer), &All, 5);
        assert_eq!(d.status, RuntimeStatus::Running);
        assert_eq!(d.work.len(), 1);
        assert_eq!(d.work[0].task_id, 1);
        assert_eq!(d.work[0].name, "b");
        assert!(matches!(
            d.append.last(),
            Some(HistoryEvent::TaskScheduled { task_id: 1, .. })
        ));
    }

    #[test]
    fn a_changed_decision_fails_the_instance_naming_the_step() {
        let mut history = started();
        history.push(HistoryEvent::TaskScheduled {
            task_id: 0,
            name: "a".into(),
            input: json!(1),
        });
        let answer = Answer {
            actions: vec![call("b")],
            ..Answer::default()
        };
        let d = decide(&instance(), &history, vec![], Ok(answer), &All, 5);
        assert_eq!(d.status, RuntimeStatus::Failed);
        let error = d.output.unwrap();
        assert_eq!(
            error,
            json!(
                "non-deterministic orchestrator: step 0 was CallActivity \"a\" in the history, now CallActivity \"b\""
            )
        );
        let missing = decide(
            &instance(),
            &history,
            vec![],
            Ok(Answer::default()),
            &All,
            5,
        );
        assert!(
            missing
                .output
                .unwrap()
                .as_str()
                .unwrap()
                .contains("step 0 (CallActivity \"a\") is in the history")
        );
    }

    #[test]
    fn timers_are_delayed_messages_and_unknown_activities_fail_their_task() {
        let answer = Answer {
            actions: vec![
                Action::CreateTimer {
                    fire_at: "1970-01-01T00:00:01Z".into(),
                },
                call("missing"),
            ],
            ..Answer::default()
        };
        let d = decide(&instance(), &started(), vec![], Ok(answer), &All, 5);
        assert_eq!(d.messages.len(), 2);
        assert_eq!(d.messages[0].visible_us, 1_000_000);
        assert!(matches!(
            &d.messages[1].message,
            Message::Event { event: HistoryEvent::TaskFailed { task_id: 1, error } } if error.contains("missing")
        ));
    }

    #[test]
    fn completion_reports_to_the_parent_and_entities_get_operations() {
        let mut child = instance();
        child.parent = Some(Parent {
            instance_id: "p".into(),
            task_id: 3,
            generation: 0,
        });
        let answer = Answer {
            actions: vec![Action::SignalEntity {
                entity: "@counter@k".into(),
                operation: "add".into(),
                input: json!(1),
            }],
            done: Some(super::super::Done { output: json!(7) }),
            ..Answer::default()
        };
        let d = decide(&child, &started(), vec![], Ok(answer), &All, 5);
        assert_eq!(d.status, RuntimeStatus::Completed);
        assert_eq!(d.messages.len(), 2);
        assert_eq!(d.messages[0].target, "@counter@k");
        assert_eq!(d.messages[1].target, "p");
        assert!(matches!(
            d.append.last(),
            Some(HistoryEvent::ExecutionCompleted { .. })
        ));
    }

    #[test]
    fn answers_parse_strictly() {
        assert!(Answer::parse(br#"{"actions": [], "done": {"output": 1}}"#).is_ok());
        assert!(Answer::parse(br#"{"done": {}, "failed": {"error": "x"}}"#).is_err());
        assert!(Answer::parse(br#"{"actions": [{"type": "Nope"}]}"#).is_err());
        assert!(Answer::parse(b"not json").is_err());
    }
}
