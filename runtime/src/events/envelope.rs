//! The JSON a function sees for an event and answers with, in Azure
//! Functions custom handlers' shapes (which users already know): the event
//! is `{"Data": ..., "Metadata": {...}}`; a function with output bindings
//! answers `{"Outputs": {...}, "Logs": [...], "ReturnValue": ...}`.
//! `docs/guest-abi.md` documents both.

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::{Message, Publish, rfc3339};
use crate::trigger::config::{OutputBinding, OutputTarget};

/// A message body as JSON: its value if it is JSON, else its text (or
/// base64 if it is not UTF-8, with `Encoding` saying so).
fn body_value(body: &[u8]) -> (Value, Option<&'static str>) {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return (v, None);
    }
    match std::str::from_utf8(body) {
        Ok(s) => (Value::String(s.to_owned()), None),
        Err(_) => (
            Value::String(base64::engine::general_purpose::STANDARD.encode(body)),
            Some("base64"),
        ),
    }
}

fn event(data: Value, metadata: Value) -> Bytes {
    Bytes::from(serde_json::to_vec(&json!({ "Data": data, "Metadata": metadata })).expect("JSON"))
}

/// A queue message's event.
pub fn queue_event(m: &Message, function: &str) -> Bytes {
    let (data, encoding) = body_value(&m.body);
    let mut meta = json!({
        "Trigger": "queue",
        "Function": function,
        "Queue": m.queue,
        "Id": m.id,
        "DequeueCount": m.dequeue_count,
        "InsertionTime": rfc3339(m.inserted_us),
    });
    if let Some(e) = encoding {
        meta["Encoding"] = json!(e);
    }
    event(data, meta)
}

/// What a blob event says of its blob.
pub struct BlobMeta<'a> {
    pub container: &'a str,
    pub name: &'a str,
    pub etag: &'a str,
    pub params: &'a [(String, String)],
}

/// A blob's event: its bytes in base64.
pub fn blob_event(blob: &BlobMeta<'_>, bytes: &[u8], function: &str) -> Bytes {
    let params: Map<String, Value> = blob
        .params
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    event(
        Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
        json!({
            "Trigger": "blob",
            "Function": function,
            "Container": blob.container,
            "Name": blob.name,
            "Path": format!("{}/{}", blob.container, blob.name),
            "ETag": blob.etag,
            "Length": bytes.len(),
            "Encoding": "base64",
            "Parameters": params,
        }),
    )
}

/// What a timer event says of its schedule.
pub struct TimerMeta<'a> {
    pub schedule: &'a str,
    pub scheduled_us: i64,
    pub past_due: bool,
    pub last_us: Option<i64>,
    pub next_us: Option<i64>,
}

pub fn timer_event(t: &TimerMeta<'_>, function: &str) -> Bytes {
    event(
        json!({
            "ScheduledTime": rfc3339(t.scheduled_us),
            "IsPastDue": t.past_due,
            "Schedule": t.schedule,
            "Last": t.last_us.map(rfc3339),
            "Next": t.next_us.map(rfc3339),
        }),
        json!({ "Trigger": "timer", "Function": function }),
    )
}

/// A function's answer with outputs.
#[derive(Debug, Default, PartialEq)]
pub struct Envelope {
    pub outputs: Map<String, Value>,
    pub logs: Vec<String>,
    pub return_value: Option<Value>,
}

/// Parses a function's answer. Empty output is an empty envelope (a
/// function that publishes nothing this time).
pub fn parse(output: &[u8]) -> Result<Envelope, String> {
    if output.iter().all(u8::is_ascii_whitespace) {
        return Ok(Envelope::default());
    }
    let value: Value = serde_json::from_slice(output).map_err(|e| {
        format!("a function with outputs answers a JSON object {{\"Outputs\": {{...}}}}; its answer is not JSON ({e})")
    })?;
    let Value::Object(mut top) = value else {
        return Err("a function with outputs answers a JSON object {\"Outputs\": {...}}".into());
    };
    let outputs = match top.remove("Outputs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => return Err("`Outputs` must be an object of output names to values".into()),
    };
    let logs = match top.remove("Logs") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(lines)) => lines
            .into_iter()
            .map(|l| match l {
                Value::String(s) => s,
                other => other.to_string(),
            })
            .collect(),
        Some(_) => return Err("`Logs` must be an array of strings".into()),
    };
    Ok(Envelope {
        outputs,
        logs,
        return_value: top.remove("ReturnValue").filter(|v| !v.is_null()),
    })
}

/// Limits on what outputs may publish.
pub struct Limits {
    pub max_message: u64,
    pub max_blob: u64,
}

fn text_of(v: &Value) -> Vec<u8> {
    match v {
        Value::String(s) => s.clone().into_bytes(),
        other => other.to_string().into_bytes(),
    }
}

/// What `envelope`'s outputs publish under the function's `bindings`;
/// `param` fills blob paths' parameters. Every problem is the function's,
/// said in words (the invocation then fails, and nothing is published).
pub fn publish(
    bindings: &[OutputBinding],
    envelope: &Envelope,
    param: &dyn Fn(&str) -> Option<String>,
    limits: &Limits,
) -> Result<Vec<Publish>, String> {
    let mut out = Vec::new();
    for (name, value) in &envelope.outputs {
        let Some(binding) = bindings.iter().find(|b| b.name == *name) else {
            let declared: Vec<&str> = bindings.iter().map(|b| b.name.as_str()).collect();
            return Err(format!(
                "`Outputs` has {name:?}, which the function does not declare (it declares {declared:?})"
            ));
        };
        if value.is_null() {
            continue;
        }
        match &binding.target {
            OutputTarget::Queue(queue) => {
                let items: Vec<&Value> = match value {
                    Value::Array(items) => items.iter().collect(),
                    one => vec![one],
                };
                for item in items {
                    let body = text_of(item);
                    if body.len() as u64 > limits.max_message {
                        return Err(format!(
                            "output {name:?}: a message of {} bytes is over the {}-byte limit (server.max_message)",
                            body.len(),
                            limits.max_message
                        ));
                    }
                    out.push(Publish::Message {
                        queue: queue.to_string(),
                        body: Bytes::from(body),
                    });
                }
            }
            OutputTarget::Blob(pattern) => {
                let path = pattern.fill(param).map_err(|p| {
                    format!("output {name:?}: the path {:?} needs {{{p}}}, which this event does not have", pattern.as_str())
                })?;
                super::blobs::BlobPath::parse(&path)
                    .map_err(|e| format!("output {name:?}: {e}"))?;
                let body = match value {
                    Value::Object(o) if o.len() == 1 && o.contains_key("base64") => {
                        let Some(Value::String(b)) = o.get("base64") else {
                            return Err(format!("output {name:?}: `base64` must be a string"));
                        };
                        base64::engine::general_purpose::STANDARD
                            .decode(b)
                            .map_err(|e| format!("output {name:?}: invalid base64 ({e})"))?
                    }
                    other => text_of(other),
                };
                if body.len() as u64 > limits.max_blob {
                    return Err(format!(
                        "output {name:?}: a blob of {} bytes is over the {}-byte limit (server.max_blob)",
                        body.len(),
                        limits.max_blob
                    ));
                }
                out.push(Publish::Blob {
                    path,
                    body: Bytes::from(body),
                });
            }
            OutputTarget::Orchestration(_)
            | OutputTarget::RaiseEvent(_)
            | OutputTarget::Entity(_) => {
                let items: Vec<&Value> = match value {
                    Value::Array(items) => items.iter().collect(),
                    one => vec![one],
                };
                for item in items {
                    out.push(Publish::Durable(durable_output(
                        name,
                        &binding.target,
                        item,
                        limits,
                    )?));
                }
            }
        }
    }
    Ok(out)
}

/// One value of a durable output binding, checked.
fn durable_output(
    name: &str,
    target: &OutputTarget,
    item: &Value,
    limits: &Limits,
) -> Result<crate::durable::DurableOutput, String> {
    use crate::durable::DurableOutput;
    let size = item.to_string().len() as u64;
    if size > limits.max_message {
        return Err(format!(
            "output {name:?}: a value of {size} bytes is over the {}-byte limit (server.max_message)",
            limits.max_message
        ));
    }
    let Value::Object(o) = item else {
        return Err(format!(
            "output {name:?}: each value is a JSON object (docs/durable.md, bindings)"
        ));
    };
    let text = |key: &str, required: bool| -> Result<Option<String>, String> {
        match o.get(key) {
            Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
            None | Some(Value::Null) if !required => Ok(None),
            _ => Err(format!(
                "output {name:?}: `{key}` must be a non-empty string"
            )),
        }
    };
    let input = o.get("input").cloned().unwrap_or(Value::Null);
    Ok(match target {
        OutputTarget::Orchestration(n) => DurableOutput::Start {
            orchestration: n.name.clone(),
            instance_id: text("instance_id", false)?
                .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string()),
            input,
        },
        OutputTarget::RaiseEvent(event) => DurableOutput::Raise {
            instance_id: text("instance_id", true)?.expect("required"),
            event: event.clone(),
            input,
        },
        OutputTarget::Entity(n) => DurableOutput::Signal {
            entity: format!("@{}@{}", n.name, text("key", true)?.expect("required")),
            operation: text("operation", true)?.expect("required"),
            input,
        },
        OutputTarget::Queue(_) | OutputTarget::Blob(_) => unreachable!("not a durable output"),
    })
}

/// What an HTTP function with outputs sends its client: the envelope's
/// `ReturnValue` (a string as is, anything else as JSON).
pub fn return_body(envelope: &Envelope) -> Bytes {
    match &envelope.return_value {
        None => Bytes::new(),
        Some(Value::String(s)) => Bytes::from(s.clone()),
        Some(v) => Bytes::from(v.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trigger::config::{BlobPattern, QueueName};

    fn bindings() -> Vec<OutputBinding> {
        vec![
            OutputBinding {
                name: "orders".into(),
                target: OutputTarget::Queue(QueueName::parse("orders").unwrap()),
            },
            OutputBinding {
                name: "thumb".into(),
                target: OutputTarget::Blob(BlobPattern::parse("thumbnails/{name}").unwrap()),
            },
        ]
    }

    const LIMITS: Limits = Limits {
        max_message: 16,
        max_blob: 8,
    };

    #[test]
    fn outputs_publish_messages_and_blobs() {
        let e = parse(
            br#"{"Outputs": {"orders": ["a", {"n": 1}], "thumb": {"base64": "aGk="}}, "Logs": ["x", 2], "ReturnValue": {"id": 7}}"#,
        )
        .unwrap();
        assert_eq!(e.logs, vec!["x", "2"]);
        assert_eq!(return_body(&e), Bytes::from(r#"{"id":7}"#));
        let p = publish(
            &bindings(),
            &e,
            &|n| (n == "name").then(|| "cat.ppm".into()),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(
            p,
            vec![
                Publish::Message {
                    queue: "orders".into(),
                    body: Bytes::from("a")
                },
                Publish::Message {
                    queue: "orders".into(),
                    body: Bytes::from(r#"{"n":1}"#)
                },
                Publish::Blob {
                    path: "thumbnails/cat.ppm".into(),
                    body: Bytes::from("hi")
                },
            ]
        );
    }

    #[test]
    fn bad_answers_are_explained() {
        assert!(parse(b"not json").unwrap_err().contains("not JSON"));
        assert!(parse(b"[1]").is_err());
        assert!(parse(br#"{"Outputs": 3}"#).is_err());
        assert_eq!(parse(b"  \n").unwrap(), Envelope::default());
        let none = |_: &str| None;
        let unknown = parse(br#"{"Outputs": {"nope": 1}}"#).unwrap();
        assert!(
            publish(&bindings(), &unknown, &none, &LIMITS)
                .unwrap_err()
                .contains("nope")
        );
        let big = parse(br#"{"Outputs": {"orders": "0123456789abcdefg"}}"#).unwrap();
        assert!(
            publish(&bindings(), &big, &none, &LIMITS)
                .unwrap_err()
                .contains("max_message")
        );
        let unbound = parse(br#"{"Outputs": {"thumb": "x"}}"#).unwrap();
        assert!(
            publish(&bindings(), &unbound, &none, &LIMITS)
                .unwrap_err()
                .contains("{name}")
        );
    }

    #[test]
    fn events_carry_data_and_metadata() {
        let m = Message {
            id: "m1".into(),
            queue: "orders".into(),
            body: Bytes::from(r#"{"id": "o-1"}"#),
            inserted_us: 0,
            dequeue_count: 2,
            lease: "l".into(),
            visible_us: 0,
        };
        let v: Value = serde_json::from_slice(&queue_event(&m, "f")).unwrap();
        assert_eq!(v["Data"]["id"], "o-1");
        assert_eq!(v["Metadata"]["DequeueCount"], 2);
        let text = Message {
            body: Bytes::from("plain"),
            ..m.clone()
        };
        let v: Value = serde_json::from_slice(&queue_event(&text, "f")).unwrap();
        assert_eq!(v["Data"], "plain");
        let binary = Message {
            body: Bytes::from_static(&[0xff, 0]),
            ..m
        };
        let v: Value = serde_json::from_slice(&queue_event(&binary, "f")).unwrap();
        assert_eq!(
            (v["Data"].as_str(), v["Metadata"]["Encoding"].as_str()),
            (Some("/wA="), Some("base64"))
        );
    }
}
