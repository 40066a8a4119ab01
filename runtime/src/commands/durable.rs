//! `kelvin durable`: the durable management API of a running server, from
//! the command line (connection and key as `kelvin deploy`).

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Subcommand;
use serde_json::Value;

use super::deploy::{ServerArgs, run};
use super::events::{items, print_json, segment, text, time};
use crate::bench::table;

const API: &str = "/runtime/webhooks/durabletask";

/// Start, inspect, list, signal and end orchestrations of a running server.
#[derive(clap::Args, Debug)]
pub struct DurableCommand {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(subcommand)]
    pub action: DurableAction,
}

#[derive(Subcommand, Debug)]
pub enum DurableAction {
    /// Start an orchestration; prints its instance id.
    Start {
        orchestrator: String,
        /// Its input, as JSON (default: null).
        input: Option<String>,
        /// The instance id (default: a new one).
        #[arg(long)]
        id: Option<String>,
    },
    /// An instance's status (with its history on request).
    Status {
        id: String,
        #[arg(long)]
        history: bool,
        /// Print the server's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Instances, newest first.
    List {
        /// Only these statuses, e.g. `Running,Failed`.
        #[arg(long)]
        status: Option<String>,
        /// Only ids starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// At most this many.
        #[arg(short = 'n', long = "top", default_value_t = 100)]
        top: u32,
        #[arg(long)]
        json: bool,
    },
    /// Raise an event to a running instance.
    Raise {
        id: String,
        event: String,
        /// The event's input, as JSON (default: null).
        input: Option<String>,
    },
    /// Terminate a running instance.
    Terminate {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Suspend a running instance (events wait until it resumes).
    Suspend {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Resume a suspended instance.
    Resume {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Delete ended instances' state and history: one, or all that match.
    Purge {
        id: Option<String>,
        /// Only these ended statuses, e.g. `Completed`.
        #[arg(long, conflicts_with = "id")]
        status: Option<String>,
    },
    /// Signal an entity: `kelvin durable signal counter user-42 add 5`.
    Signal {
        entity: String,
        #[arg(value_name = "KEY")]
        entity_key: String,
        operation: String,
        /// The operation's input, as JSON (default: null).
        input: Option<String>,
    },
    /// An entity's state.
    Entity {
        entity: String,
        #[arg(value_name = "KEY")]
        entity_key: String,
    },
}

/// A JSON argument, checked here so a typo is not a server's 400.
fn json_arg(input: Option<&str>) -> Result<Bytes> {
    match input {
        None => Ok(Bytes::new()),
        Some(text) => {
            serde_json::from_str::<Value>(text).with_context(|| {
                format!("{text:?} is not JSON (a string is written '\"text\"')")
            })?;
            Ok(Bytes::from(text.to_owned()))
        }
    }
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", segment(v))))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// Sends `verb` (terminate, suspend, resume) to instance `id`.
fn command(
    post: &impl Fn(String, Bytes) -> Result<Value>,
    id: &str,
    verb: &str,
    reason: &str,
) -> Result<()> {
    let reason = query(&[("reason", Some(reason.to_owned()))]);
    post(
        format!("{API}/instances/{}/{verb}{reason}", segment(id)),
        Bytes::new(),
    )?;
    Ok(())
}

impl DurableCommand {
    pub fn execute(self) -> Result<()> {
        self.server.manifest.init_logging_at("warn");
        let admin = self.server.admin()?;
        let post = |path: String, body: Bytes| run(admin.call(hyper::Method::POST, &path, body));
        match self.action {
            DurableAction::Start {
                orchestrator,
                input,
                id,
            } => {
                let path = match &id {
                    Some(id) => format!(
                        "{API}/orchestrators/{}/{}",
                        segment(&orchestrator),
                        segment(id)
                    ),
                    None => format!("{API}/orchestrators/{}", segment(&orchestrator)),
                };
                let started = post(path, json_arg(input.as_deref())?)?;
                println!("{}", text(&started["id"]));
            }
            DurableAction::Status { id, history, json } => {
                let q = if history { "?showHistory=true" } else { "" };
                let s = run(admin.get(&format!("{API}/instances/{}{q}", segment(&id))))?;
                if json {
                    return print_json(&s);
                }
                for (label, key) in [
                    ("name", "name"),
                    ("id", "instanceId"),
                    ("status", "runtimeStatus"),
                    ("created", "createdTime"),
                    ("updated", "lastUpdatedTime"),
                ] {
                    let v = if key.ends_with("Time") {
                        time(&s[key])
                    } else {
                        text(&s[key])
                    };
                    println!("{label:<14}{v}");
                }
                for key in ["input", "customStatus", "output"] {
                    println!("{key:<14}{}", s[key]);
                }
                if history {
                    for e in items(&s["historyEvents"]) {
                        println!("  {e}");
                    }
                }
            }
            DurableAction::List {
                status,
                prefix,
                top,
                json,
            } => {
                let q = query(&[
                    ("runtimeStatus", status),
                    ("instanceIdPrefix", prefix),
                    ("top", Some(top.to_string())),
                    ("showInput", Some("false".into())),
                ]);
                let list = run(admin.get(&format!("{API}/instances{q}")))?;
                if json {
                    return print_json(&list);
                }
                let rows: Vec<Vec<String>> = items(&list)
                    .map(|i| {
                        vec![
                            text(&i["instanceId"]),
                            text(&i["name"]),
                            text(&i["runtimeStatus"]),
                            time(&i["createdTime"]),
                            time(&i["lastUpdatedTime"]),
                        ]
                    })
                    .collect();
                if rows.is_empty() {
                    println!("no instances");
                } else {
                    let header = ["ID", "NAME", "STATUS", "CREATED", "UPDATED"];
                    print!("{}", table(&header, &rows, header.len()));
                }
            }
            DurableAction::Raise { id, event, input } => {
                post(
                    format!(
                        "{API}/instances/{}/raiseEvent/{}",
                        segment(&id),
                        segment(&event)
                    ),
                    json_arg(input.as_deref())?,
                )?;
                println!("raised {event} to {id}");
            }
            DurableAction::Terminate { id, reason } => {
                command(&post, &id, "terminate", &reason)?;
                println!("terminating {id}");
            }
            DurableAction::Suspend { id, reason } => {
                command(&post, &id, "suspend", &reason)?;
                println!("suspending {id}");
            }
            DurableAction::Resume { id, reason } => {
                command(&post, &id, "resume", &reason)?;
                println!("resuming {id}");
            }
            DurableAction::Purge { id, status } => {
                let path = match &id {
                    Some(id) => format!("{API}/instances/{}", segment(id)),
                    None => format!("{API}/instances{}", query(&[("runtimeStatus", status)])),
                };
                let purged = run(admin.call(hyper::Method::DELETE, &path, Bytes::new()))?;
                println!("purged {} instance(s)", text(&purged["instancesDeleted"]));
            }
            DurableAction::Signal {
                entity,
                entity_key: key,
                operation,
                input,
            } => {
                post(
                    format!(
                        "{API}/entities/{}/{}{}",
                        segment(&entity),
                        segment(&key),
                        query(&[("op", Some(operation.clone()))])
                    ),
                    json_arg(input.as_deref())?,
                )?;
                println!("signalled @{entity}@{key} {operation}");
            }
            DurableAction::Entity {
                entity,
                entity_key: key,
            } => {
                let state = run(admin.get(&format!(
                    "{API}/entities/{}/{}",
                    segment(&entity),
                    segment(&key)
                )))?;
                println!("{state}");
            }
        }
        Ok(())
    }
}
