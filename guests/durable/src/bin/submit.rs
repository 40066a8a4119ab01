//! `submit`: the example app's client function (HTTP, CGI): validates a
//! job's parameters and starts the job's orchestration through its output
//! binding `start`.
//!
//! `?steps=N` (required, 1 to 20) and `?step_ms=MS` (optional, 0 to 60000,
//! default 1000). Bad parameters are the client's fault: 400 with
//! `{"error": "..."}`, and nothing starts.
//!
//! The `start` output binding starts an orchestration: its value
//! `{"instance_id": ID, "input": ...}` becomes a new instance of the
//! orchestrator the binding names in `functions.toml`, with that id and
//! input, and only if this invocation succeeds (with its record, like every
//! output). The id is this invocation's: unique, and the same one Kelvin's
//! logs and records carry. The client gets 202 with the job's id and where
//! to ask for its status, `/job/status/{id}` (the `status` function).

use kelvin_sdk::http::{Request, Response};
use serde_json::{Value, json};

const STEPS: std::ops::RangeInclusive<i64> = 1..=20;
const STEP_MS: std::ops::RangeInclusive<i64> = 0..=60_000;
const DEFAULT_STEP_MS: i64 = 1000;

fn main() {
    kelvin_sdk::http::serve(|req: Request| match validate(&req) {
        Ok(input) => start(input),
        Err(reason) => json_response(400, &json!({"error": reason})),
    });
}

/// The orchestration's input, `{"steps", "step_ms"}`, from the query.
fn validate(req: &Request) -> Result<Value, String> {
    let steps = match req.query_param("steps") {
        None => return Err("steps is required".into()),
        Some(steps) => integer(&steps, STEPS).ok_or("steps must be an integer from 1 to 20")?,
    };
    let step_ms = match req.query_param("step_ms") {
        None => DEFAULT_STEP_MS,
        Some(ms) => integer(&ms, STEP_MS).ok_or("step_ms must be an integer from 0 to 60000")?,
    };
    Ok(json!({"steps": steps, "step_ms": step_ms}))
}

fn integer(text: &str, range: std::ops::RangeInclusive<i64>) -> Option<i64> {
    text.parse().ok().filter(|n| range.contains(n))
}

fn start(input: Value) -> Response {
    let id = kelvin_sdk::context().invocation_id;
    if id.is_empty() {
        kelvin_sdk::fail("KELVIN_INVOCATION_ID is not set");
    }
    let status = format!("/job/status/{id}");
    let envelope = json!({
        "Outputs": {"start": {"instance_id": id, "input": input}},
        "ReturnValue": {"id": id, "status": status},
    });
    json_response(202, &envelope).header("location", &status)
}

fn json_response(status: u16, body: &Value) -> Response {
    Response::new(status)
        .header("content-type", "application/json")
        .body(body.to_string())
}
