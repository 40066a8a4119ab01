//! The deployment admin API over HTTP (master key only): paths and JSON in,
//! a status and JSON out. The HTTP server authenticates, reads the body
//! within its limits and renders the reply; the work is [`Deployer`]'s.

use bytes::Bytes;
use hyper::StatusCode;
use serde_json::{Value, json};

use crate::deploy::{DeployError, Deployer, NewVersion, SettingsInfo, SplitInfo};

/// The OpenAPI document describing this API.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// Whether `path` is the admin API's.
pub fn owns(path: &str) -> bool {
    crate::manifest::admin_api_owns(path)
}

/// Whether a request to `path` uploads wasm (and may be as large as
/// `server.max_upload`, not a JSON body's 1 MiB).
pub fn is_upload(method: &hyper::Method, path: &str) -> bool {
    method == hyper::Method::PUT && path == "/admin/wasm"
}

/// A JSON body's limit.
pub const MAX_JSON: u64 = 1 << 20;

pub struct Reply {
    pub status: StatusCode,
    pub body: Value,
}

fn reply(status: StatusCode, body: impl serde::Serialize) -> Reply {
    Reply {
        status,
        body: serde_json::to_value(body).expect("replies serialise"),
    }
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Reply {
    reply(status, json!({ "error": message.into() }))
}

fn failed(e: DeployError) -> Reply {
    match e {
        DeployError::Invalid(m) => refuse(StatusCode::BAD_REQUEST, m),
        DeployError::NotFound(m) => refuse(StatusCode::NOT_FOUND, m),
        DeployError::Conflict(m) => refuse(StatusCode::CONFLICT, m),
        DeployError::Internal(m) => {
            tracing::error!(error = m, "deployment admin request failed");
            refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}

fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Reply> {
    serde_json::from_slice(body)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")))
}

fn query<'q>(q: &'q str, key: &str) -> Option<&'q str> {
    q.split('&').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        (k == key).then_some(v)
    })
}

/// Where a swap's warm-up request goes: this server's own address, with
/// the key that authorised the swap (routes may need one), and what it
/// must answer.
pub struct WarmUpTo<'a> {
    pub local: std::net::SocketAddr,
    pub key: &'a str,
    pub path: Option<&'a str>,
    pub statuses: &'a [u16],
}

/// Sends the warm-up GET to `slot` over loopback, as a client would, and
/// checks its status.
async fn warm_up(to: &WarmUpTo<'_>, path: &str, slot: &str) -> Result<(), String> {
    use http_body_util::{BodyExt, Empty};
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(to.local)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, to.local.to_string())
            .header(super::headers::SLOT_HEADER, slot)
            .header(super::headers::KEY_HEADER, to.key)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        // Read whole: the invocation is recorded like any other.
        let _ = response.into_body().collect().await;
        Ok::<u16, String>(status)
    };
    let status = tokio::time::timeout(std::time::Duration::from_secs(60), exchange)
        .await
        .map_err(|_| format!("GET {path} took longer than 60 s"))??;
    let accepted = if to.statuses.is_empty() {
        status < 500
    } else {
        to.statuses.contains(&status)
    };
    if accepted {
        Ok(())
    } else {
        Err(format!("GET {path} answered {status}"))
    }
}

/// Answers one admin request (already authenticated as `who`).
pub async fn handle(
    deployer: &Deployer,
    method: &hyper::Method,
    path: &str,
    query_string: &str,
    body: Bytes,
    who: &str,
    warm: WarmUpTo<'_>,
) -> Reply {
    use hyper::Method as M;
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let not_allowed = || {
        refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        )
    };
    match segments.as_slice() {
        ["admin", "openapi.json"] => match *method {
            M::GET => Reply {
                status: StatusCode::OK,
                body: serde_json::from_str(OPENAPI).expect("the OpenAPI document is JSON"),
            },
            _ => not_allowed(),
        },
        ["admin", "wasm"] => match *method {
            M::PUT => match deployer.upload(body).await {
                Ok(info) => reply(StatusCode::OK, info),
                Err(e) => failed(e),
            },
            _ => not_allowed(),
        },
        ["admin", "functions", function, "versions"] => match *method {
            M::GET => match deployer.versions(function).await {
                Ok(v) => reply(StatusCode::OK, json!({ "versions": v })),
                Err(e) => failed(e),
            },
            M::POST => {
                let new: NewVersion = match json_body(&body) {
                    Ok(n) => n,
                    Err(r) => return r,
                };
                match deployer.create_version(function, new, who).await {
                    Ok((info, true)) => reply(StatusCode::CREATED, info),
                    Ok((info, false)) => reply(StatusCode::OK, info),
                    Err(e) => failed(e),
                }
            }
            _ => not_allowed(),
        },
        ["admin", "slots"] => match *method {
            M::GET => reply(StatusCode::OK, deployer.slots()),
            _ => not_allowed(),
        },
        ["admin", "slots", slot, "functions", function] => match *method {
            M::PUT => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Point {
                    version: String,
                }
                let point: Point = match json_body(&body) {
                    Ok(p) => p,
                    Err(r) => return r,
                };
                match deployer.point(slot, function, &point.version, who).await {
                    Ok(s) => reply(StatusCode::OK, s),
                    Err(e) => failed(e),
                }
            }
            _ => not_allowed(),
        },
        ["admin", "slots", slot, "functions", function, "settings"] => match *method {
            M::GET => match deployer.settings(slot, function) {
                Ok(s) => reply(StatusCode::OK, s),
                Err(e) => failed(e),
            },
            M::PUT => {
                let settings: SettingsInfo = match json_body(&body) {
                    Ok(s) => s,
                    Err(r) => return r,
                };
                match deployer
                    .set_settings(slot, function, settings.env, who)
                    .await
                {
                    Ok(s) => reply(StatusCode::OK, s),
                    Err(e) => failed(e),
                }
            }
            _ => not_allowed(),
        },
        ["admin", "swap"] => match *method {
            M::POST => {
                #[derive(serde::Deserialize)]
                #[serde(deny_unknown_fields)]
                struct Swap {
                    source: String,
                    #[serde(default = "production")]
                    target: String,
                }
                fn production() -> String {
                    crate::table::PRODUCTION.into()
                }
                let swap: Swap = match json_body(&body) {
                    Ok(s) => s,
                    Err(r) => return r,
                };
                let warm_up = warm.path.map(|path| {
                    let (warm, source) = (&warm, swap.source.clone());
                    Box::pin(async move { warm_up(warm, path, &source).await })
                        as crate::deploy::WarmUp<'_>
                });
                match deployer
                    .swap(&swap.source, &swap.target, who, warm_up)
                    .await
                {
                    Ok(s) => reply(StatusCode::OK, s),
                    Err(e) => failed(e),
                }
            }
            _ => not_allowed(),
        },
        ["admin", "split"] => match *method {
            M::PUT => {
                let split: SplitInfo = match json_body(&body) {
                    Ok(s) => s,
                    Err(r) => return r,
                };
                match deployer.split(split, who).await {
                    Ok(s) => reply(StatusCode::OK, s),
                    Err(e) => failed(e),
                }
            }
            M::DELETE => {
                let off = SplitInfo {
                    slot: String::new(),
                    percent: 0,
                    affinity_header: None,
                };
                match deployer.split(off, who).await {
                    Ok(s) => reply(StatusCode::OK, s),
                    Err(e) => failed(e),
                }
            }
            _ => not_allowed(),
        },
        ["admin", "history"] => match *method {
            M::GET => {
                let limit = match query(query_string, "limit").map(str::parse::<usize>) {
                    None => 100,
                    Some(Ok(n)) if (1..=10_000).contains(&n) => n,
                    Some(_) => {
                        return refuse(StatusCode::BAD_REQUEST, "`limit` must be 1 to 10000");
                    }
                };
                match deployer.history(limit).await {
                    Ok(h) => reply(StatusCode::OK, json!({ "history": h })),
                    Err(e) => failed(e),
                }
            }
            _ => not_allowed(),
        },
        _ => refuse(StatusCode::NOT_FOUND, format!("no admin API at {path}")),
    }
}
