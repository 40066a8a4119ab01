//! Azure's HTTP management API for durable functions, same routes and JSON
//! shapes, under `/runtime/webhooks/durabletask` (a host or master key):
//! start, status, list, raise event, terminate, suspend, resume, purge,
//! entity signal and state. The work is [`DurableFunctions`]'.

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use super::durable::{ClientError, DurableFunctions};
use super::events_api::{Reply, json_reply, refuse};
use crate::durable::store::Filter;
use crate::durable::{EntityId, HistoryEvent, Instance, RuntimeStatus, parse_time, rfc3339};

pub const PREFIX: &str = "/runtime/webhooks/durabletask";

/// Whether `path` is this API's.
pub fn owns(path: &str) -> bool {
    path == PREFIX
        || path
            .strip_prefix(PREFIX)
            .is_some_and(|rest| rest.starts_with('/'))
}

fn failed(e: ClientError) -> Reply {
    match &e {
        // As Azure answers a start naming no orchestrator function.
        ClientError::UnknownOrchestrator(_) => refuse(StatusCode::BAD_REQUEST, e.to_string()),
        ClientError::UnknownEntity(_) | ClientError::NotFound(_) => {
            refuse(StatusCode::NOT_FOUND, e.to_string())
        }
        ClientError::Ended(..) => refuse(StatusCode::GONE, e.to_string()),
        ClientError::TooManyEvents(_) => refuse(StatusCode::CONFLICT, e.to_string()),
        ClientError::Invalid(_) => refuse(StatusCode::BAD_REQUEST, e.to_string()),
        ClientError::Store(crate::durable::store::DurableError::Conflict(_)) => {
            refuse(StatusCode::CONFLICT, e.to_string())
        }
        ClientError::Store(_) => {
            tracing::error!(error = %e, "a durable management request failed");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the durable store cannot write now; nothing changed, retry later",
            )
        }
    }
}

fn query(q: &str, key: &str) -> Option<String> {
    q.split('&').find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        k.eq_ignore_ascii_case(key).then(|| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// A request body as a JSON input: empty is `null`.
fn input(body: &[u8]) -> Result<Value, Reply> {
    crate::durable::parse_result(body).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            format!("the body must be JSON (or empty): {e}"),
        )
    })
}

/// The management URLs of instance `id`, on `base` (`http://host`).
pub fn management_urls(base: &str, id: &str) -> Value {
    let instance = format!("{base}{PREFIX}/instances/{id}");
    json!({
        "id": id,
        "statusQueryGetUri": instance,
        "sendEventPostUri": format!("{instance}/raiseEvent/{{eventName}}"),
        "terminatePostUri": format!("{instance}/terminate?reason={{text}}"),
        "suspendPostUri": format!("{instance}/suspend?reason={{text}}"),
        "resumePostUri": format!("{instance}/resume?reason={{text}}"),
        "purgeHistoryDeleteUri": instance,
    })
}

/// An instance's status in Azure's shape.
pub fn status_json(i: &Instance, show_input: bool, history: Option<&[HistoryEvent]>) -> Value {
    let mut v = json!({
        "name": i.name,
        "instanceId": i.id,
        "runtimeStatus": i.status.as_str(),
        "input": if show_input { i.input.clone() } else { Value::Null },
        "customStatus": i.custom_status,
        "output": i.output,
        "createdTime": rfc3339(i.created_us),
        "lastUpdatedTime": rfc3339(i.updated_us),
    });
    if let Some(h) = history {
        v["historyEvents"] = json!(h);
    }
    v
}

fn filter(q: &str) -> Result<Filter, Reply> {
    let mut f = Filter::default();
    if let Some(s) = query(q, "runtimeStatus") {
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            f.statuses.push(RuntimeStatus::parse(part).ok_or_else(|| {
                refuse(
                    StatusCode::BAD_REQUEST,
                    format!("unknown runtimeStatus {part:?}; expected Pending, Running, Completed, ContinuedAsNew, Failed, Terminated or Suspended"),
                )
            })?);
        }
    }
    let time = |key: &str| -> Result<Option<i64>, Reply> {
        query(q, key)
            .map(|t| {
                parse_time(&t).map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("{key}: {e}")))
            })
            .transpose()
    };
    f.created_from_us = time("createdTimeFrom")?;
    f.created_to_us = time("createdTimeTo")?;
    f.id_prefix = query(q, "instanceIdPrefix");
    if let Some(top) = query(q, "top") {
        f.top = Some(top.parse().map_err(|_| {
            refuse(
                StatusCode::BAD_REQUEST,
                format!("top must be a number, not {top:?}"),
            )
        })?);
    }
    Ok(f)
}

/// Serves one request; `base` is `http://host` for the URLs it answers.
pub async fn handle(
    durable: &DurableFunctions,
    method: &Method,
    path: &str,
    q: &str,
    body: Bytes,
    base: &str,
) -> (Reply, Option<String>) {
    match route(durable, method, path, q, body, base).await {
        Ok(r) => r,
        Err(r) => (r, None),
    }
}

async fn route(
    durable: &DurableFunctions,
    method: &Method,
    path: &str,
    q: &str,
    body: Bytes,
    base: &str,
) -> Result<(Reply, Option<String>), Reply> {
    let rest = path.strip_prefix(PREFIX).unwrap_or("");
    let parts: Vec<String> = rest
        .split('/')
        .filter(|p| !p.is_empty())
        .map(decode)
        .collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    let reason = query(q, "reason").unwrap_or_default();
    let accepted = || json_reply(StatusCode::ACCEPTED, Value::Null);
    Ok(match (method.as_str(), parts.as_slice()) {
        ("POST", ["orchestrators", name]) | ("POST", ["orchestrators", name, _]) => {
            let id = parts.get(2).map(|s| (*s).to_owned());
            let id = durable
                .start_new(name, id, input(&body)?)
                .await
                .map_err(failed)?;
            let urls = management_urls(base, &id);
            let location = urls["statusQueryGetUri"].as_str().map(str::to_owned);
            (json_reply(StatusCode::ACCEPTED, urls), location)
        }
        ("GET", ["instances"]) => {
            let list = durable.list(filter(q)?).await.map_err(failed)?;
            let show_input = query(q, "showInput").as_deref() != Some("false");
            let items: Vec<Value> = list
                .iter()
                .map(|i| status_json(i, show_input, None))
                .collect();
            (json_reply(StatusCode::OK, json!(items)), None)
        }
        ("DELETE", ["instances"]) => {
            let n = durable.purge(None, filter(q)?).await.map_err(failed)?;
            let status = if n == 0 {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::OK
            };
            (json_reply(status, json!({ "instancesDeleted": n })), None)
        }
        ("GET", ["instances", id]) => {
            let Some(i) = durable.status(id).await.map_err(failed)? else {
                return Err(refuse(
                    StatusCode::NOT_FOUND,
                    format!("no instance with id {id:?}"),
                ));
            };
            let history = if query(q, "showHistory").as_deref() == Some("true") {
                Some(durable.history(id).await.map_err(failed)?)
            } else {
                None
            };
            let show_input = query(q, "showInput").as_deref() != Some("false");
            // Azure answers 202 while it runs, 200 once it has ended.
            let status = if i.status.ended() {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            let reply = json_reply(status, status_json(&i, show_input, history.as_deref()));
            let location =
                (!i.status.ended()).then(|| format!("{base}{PREFIX}/instances/{}", i.id));
            (reply, location)
        }
        ("DELETE", ["instances", id]) => {
            let n = durable
                .purge(Some((*id).to_owned()), Filter::default())
                .await
                .map_err(failed)?;
            if n == 0 {
                return Err(match durable.status(id).await.map_err(failed)? {
                    Some(_) => refuse(
                        StatusCode::CONFLICT,
                        format!("instance {id:?} has not ended; terminate it first"),
                    ),
                    None => refuse(StatusCode::NOT_FOUND, format!("no instance with id {id:?}")),
                });
            }
            (
                json_reply(StatusCode::OK, json!({ "instancesDeleted": n })),
                None,
            )
        }
        ("POST", ["instances", id, "raiseEvent", event]) => {
            durable
                .raise_event(id, event, input(&body)?)
                .await
                .map_err(failed)?;
            (accepted(), None)
        }
        ("POST", ["instances", id, "terminate"]) => {
            durable.terminate(id, &reason).await.map_err(failed)?;
            (accepted(), None)
        }
        ("POST", ["instances", id, "suspend"]) => {
            durable.suspend(id, &reason).await.map_err(failed)?;
            (accepted(), None)
        }
        ("POST", ["instances", id, "resume"]) => {
            durable.resume(id, &reason).await.map_err(failed)?;
            (accepted(), None)
        }
        ("POST", ["entities", name, key]) => {
            let entity = EntityId {
                name: (*name).to_owned(),
                key: (*key).to_owned(),
            };
            let op = query(q, "op").unwrap_or_default();
            durable
                .signal_entity(&entity, &op, input(&body)?)
                .await
                .map_err(failed)?;
            (accepted(), None)
        }
        ("GET", ["entities", name, key]) => {
            let entity = EntityId {
                name: (*name).to_owned(),
                key: (*key).to_owned(),
            };
            match durable.entity_state(&entity).await.map_err(failed)? {
                Some(state) => (json_reply(StatusCode::OK, state), None),
                None => {
                    return Err(refuse(
                        StatusCode::NOT_FOUND,
                        format!("entity {entity} has no state"),
                    ));
                }
            }
        }
        (_, ["orchestrators", ..]) | (_, ["instances", ..]) | (_, ["entities", ..]) => {
            return Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed here (docs/durable.md lists the routes)"),
            ));
        }
        _ => {
            return Err(refuse(
                StatusCode::NOT_FOUND,
                "no such route of the durable management API (docs/durable.md lists them)",
            ));
        }
    })
}
