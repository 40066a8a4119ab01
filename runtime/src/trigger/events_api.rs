//! The queue and blob API for producers and operators (a host or master
//! key): send, peek, list and requeue messages; put, get, list and delete
//! blobs. Paths and bytes in, a status and JSON (or a blob's bytes) out;
//! the work is [`Events`]'.

use base64::Engine as _;
use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use super::config::POISON_SUFFIX;
use super::events::{EventError, Events};
use crate::events::blobs::BlobPath;
use crate::events::{now_us, rfc3339};

/// Whether `path` is this API's.
pub fn owns(path: &str) -> bool {
    ["/admin/queues", "/admin/blobs", "/admin/outbox"]
        .iter()
        .any(|p| {
            path == *p
                || path
                    .strip_prefix(p)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
}

/// The largest body a request to `path` may send.
pub fn body_limit(events: &Events, method: &Method, path: &str) -> u64 {
    let server = &events.runtime().manifest().server;
    if method == Method::PUT && path.starts_with("/admin/blobs/") {
        server.max_blob
    } else {
        server.max_message
    }
}

pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: Bytes,
}

/// A JSON reply (shared with the durable management API).
pub(super) fn json_reply(status: StatusCode, body: Value) -> Reply {
    Reply {
        status,
        content_type: "application/json",
        body: Bytes::from(serde_json::to_string_pretty(&body).expect("JSON") + "\n"),
    }
}

/// `{"error": message}` with `status`.
pub(super) fn refuse(status: StatusCode, message: impl Into<String>) -> Reply {
    json_reply(status, json!({ "error": message.into() }))
}

fn failed(e: EventError) -> Reply {
    match e {
        EventError::UnknownQueue(_) | EventError::UnknownContainer(_) => {
            refuse(StatusCode::NOT_FOUND, e.to_string())
        }
        EventError::TooLarge { .. } => refuse(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()),
        EventError::Invalid(m) => refuse(StatusCode::BAD_REQUEST, m),
        EventError::Blob(io) if crate::events::blobs::is_clash(&io) => {
            refuse(StatusCode::BAD_REQUEST, io.to_string())
        }
        // A full disk, a locked database: nothing was changed, and the
        // client may try again (503 with Retry-After), as functions hear.
        EventError::Store(_) | EventError::Blob(_) => {
            tracing::error!(error = %e, "queue or blob request failed");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "the event store cannot write now; nothing changed, retry later",
            )
        }
    }
}

fn query<'q>(q: &'q str, key: &str) -> Option<&'q str> {
    q.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == key).then_some(v)
    })
}

fn decode(s: &str) -> Result<String, Reply> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| {
            refuse(
                StatusCode::BAD_REQUEST,
                "the path is not UTF-8 once decoded",
            )
        })
}

/// A message body as the API shows it: text, or base64 if it is not UTF-8.
fn shown(body: &[u8]) -> (Value, Option<&'static str>) {
    match std::str::from_utf8(body) {
        Ok(s) => (json!(s), None),
        Err(_) => (
            json!(base64::engine::general_purpose::STANDARD.encode(body)),
            Some("base64"),
        ),
    }
}

/// Serves one request.
pub async fn handle(events: &Events, method: &Method, path: &str, q: &str, body: Bytes) -> Reply {
    match route(events, method, path, q, body).await {
        Ok(r) | Err(r) => r,
    }
}

async fn route(
    events: &Events,
    method: &Method,
    path: &str,
    q: &str,
    body: Bytes,
) -> Result<Reply, Reply> {
    if let Some(rest) = path.strip_prefix("/admin/queues") {
        let parts: Vec<&str> = rest.split('/').filter(|p| !p.is_empty()).collect();
        return match (method.as_str(), parts.as_slice()) {
            ("GET", []) => list_queues(events).await,
            ("POST", [queue, "messages"]) => {
                let id = events.send(queue, body).await.map_err(failed)?;
                Ok(json_reply(
                    StatusCode::CREATED,
                    json!({ "queue": queue, "id": id }),
                ))
            }
            ("GET", [queue, "messages"]) => peek(events, queue, q).await,
            ("POST", [queue, "requeue"]) => requeue(events, queue, None).await,
            ("POST", [queue, "requeue", id]) => requeue(events, queue, Some(id)).await,
            (_, [_, "messages"] | [_, "requeue"] | [_, "requeue", _] | []) => Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}"),
            )),
            _ => Err(refuse(
                StatusCode::NOT_FOUND,
                format!("no such API path: {path}"),
            )),
        };
    }
    if let Some(rest) = path.strip_prefix("/admin/outbox") {
        return match (method.as_str(), rest.trim_end_matches('/')) {
            ("GET", "") => {
                let entries = events.outbox_entries().await.map_err(failed)?;
                Ok(json_reply(StatusCode::OK, json!({ "outbox": entries })))
            }
            ("POST", "/retry") => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Retry {
                    ids: Option<Vec<String>>,
                }
                let retry: Retry = if body.is_empty() {
                    Retry { ids: None }
                } else {
                    serde_json::from_slice(&body).map_err(|e| {
                        refuse(
                            StatusCode::BAD_REQUEST,
                            format!("expected {{\"ids\": [...]}} or no body: {e}"),
                        )
                    })?
                };
                let n = events.retry_outbox(retry.ids).await.map_err(failed)?;
                Ok(json_reply(StatusCode::OK, json!({ "retried": n })))
            }
            (_, "" | "/retry") => Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}"),
            )),
            _ => Err(refuse(
                StatusCode::NOT_FOUND,
                format!("no such API path: {path}"),
            )),
        };
    }
    let rest = path.strip_prefix("/admin/blobs").unwrap_or_default();
    let rest = rest.strip_prefix('/').unwrap_or(rest);
    let (container, name) = match rest.split_once('/') {
        Some((c, n)) if !n.is_empty() => (decode(c)?, Some(decode(n)?)),
        _ => (decode(rest.trim_end_matches('/'))?, None),
    };
    if container.is_empty() {
        return match method.as_str() {
            "GET" => Ok(json_reply(
                StatusCode::OK,
                json!({ "containers": events.containers() }),
            )),
            _ => Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}"),
            )),
        };
    }
    events.check_container(&container).map_err(failed)?;
    let Some(name) = name else {
        return match method.as_str() {
            "GET" => list_blobs(events, &container, q).await,
            _ => Err(refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}"),
            )),
        };
    };
    let blob = BlobPath::new(&container, &name).map_err(|m| refuse(StatusCode::BAD_REQUEST, m))?;
    match method.as_str() {
        "PUT" => {
            let etag = events.put_blob(&blob, body).await.map_err(failed)?;
            Ok(json_reply(
                StatusCode::CREATED,
                json!({ "path": blob.to_string(), "etag": etag }),
            ))
        }
        "GET" => match events.blobs().get(&blob).await {
            Ok(Some(bytes)) => Ok(Reply {
                status: StatusCode::OK,
                content_type: "application/octet-stream",
                body: bytes,
            }),
            Ok(None) => Err(refuse(StatusCode::NOT_FOUND, format!("no blob {blob}"))),
            Err(e) => Err(failed(e.into())),
        },
        "DELETE" => match events.blobs().delete(&blob).await {
            Ok(true) => Ok(json_reply(
                StatusCode::OK,
                json!({ "deleted": blob.to_string() }),
            )),
            Ok(false) => Err(refuse(StatusCode::NOT_FOUND, format!("no blob {blob}"))),
            Err(e) => Err(failed(e.into())),
        },
        _ => Err(refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        )),
    }
}

async fn list_queues(events: &Events) -> Result<Reply, Reply> {
    let stats = events.store().stats().await.map_err(|e| failed(e.into()))?;
    let now = now_us();
    let of = |q: &str| stats.iter().find(|s| s.name == q);
    let queues: Vec<Value> = events
        .queues()
        .iter()
        .filter(|q| !q.ends_with(POISON_SUFFIX) || !events.queues().contains(q.trim_end_matches(POISON_SUFFIX)))
        .map(|q| {
            let s = of(q);
            let poison = of(&format!("{q}{POISON_SUFFIX}")).map_or(0, |s| s.depth);
            json!({
                "name": q,
                "depth": s.map_or(0, |s| s.depth),
                "leased": s.map_or(0, |s| s.leased),
                "poison": poison,
                "oldest_age_seconds": s.and_then(|s| s.oldest_us).map_or(0.0, |o| (now - o).max(0) as f64 / 1e6),
            })
        })
        .collect();
    Ok(json_reply(StatusCode::OK, json!({ "queues": queues })))
}

async fn peek(events: &Events, queue: &str, q: &str) -> Result<Reply, Reply> {
    events.check_queue(queue).map_err(failed)?;
    let limit = match query(q, "limit") {
        None => 32,
        Some(n) => n
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| refuse(StatusCode::BAD_REQUEST, "limit is 1 to 1000"))?,
    };
    let messages = events
        .store()
        .peek(queue, limit)
        .await
        .map_err(|e| failed(e.into()))?;
    let now = now_us();
    let shown: Vec<Value> = messages
        .iter()
        .map(|m| {
            let (body, encoding) = shown(&m.body);
            let mut v = json!({
                "id": m.id,
                "body": body,
                "dequeue_count": m.dequeue_count,
                "inserted": rfc3339(m.inserted_us),
                "visible": rfc3339(m.visible_us),
                "leased": !m.lease.is_empty() && m.visible_us > now,
            });
            if let Some(e) = encoding {
                v["encoding"] = json!(e);
            }
            v
        })
        .collect();
    Ok(json_reply(
        StatusCode::OK,
        json!({ "queue": queue, "messages": shown }),
    ))
}

async fn requeue(events: &Events, queue: &str, id: Option<&str>) -> Result<Reply, Reply> {
    events.check_queue(queue).map_err(failed)?;
    if queue.ends_with(POISON_SUFFIX) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "name the queue the messages go back to, not its poison queue (e.g. {:?})",
                queue.trim_end_matches(POISON_SUFFIX)
            ),
        ));
    }
    let poison = format!("{queue}{POISON_SUFFIX}");
    let moved = events
        .store()
        .requeue(queue, &poison, id)
        .await
        .map_err(|e| failed(e.into()))?;
    if let Some(id) = id
        && moved == 0
    {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            format!("no message {id:?} in {poison}"),
        ));
    }
    if moved > 0 {
        events.wake_queue(queue);
    }
    Ok(json_reply(
        StatusCode::OK,
        json!({ "queue": queue, "requeued": moved }),
    ))
}

async fn list_blobs(events: &Events, container: &str, q: &str) -> Result<Reply, Reply> {
    let prefix = decode(query(q, "prefix").unwrap_or(""))?;
    let blobs = events
        .blobs()
        .list(container, &prefix)
        .await
        .map_err(|e| failed(e.into()))?;
    let shown: Vec<Value> = blobs
        .iter()
        .map(|b| {
            json!({
                "name": b.name,
                "size": b.size,
                "modified": rfc3339(crate::events::unix_us(b.modified)),
            })
        })
        .collect();
    Ok(json_reply(
        StatusCode::OK,
        json!({ "container": container, "blobs": shown }),
    ))
}
