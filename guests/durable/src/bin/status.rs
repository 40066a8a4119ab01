//! `status`: the example app's job status function (HTTP, CGI): what
//! became of a job `submit` started.
//!
//! Its input binding `instance` hands it the job's orchestration status (the
//! management API's status JSON, see docs/durable.md) in the environment
//! variable `KELVIN_INPUT_INSTANCE`, or `null` if there is no such instance.
//! Answers 404 `{"error": "no such job"}`, or 200 `{"id", "status",
//! "result"}` (`result` is the output once `Completed`, else null): the
//! client sees no more of the instance than that.

use kelvin_sdk::http::{Request, Response};
use serde_json::{Value, json};

fn main() {
    kelvin_sdk::http::serve(|_: Request| {
        let Ok(text) = std::env::var("KELVIN_INPUT_INSTANCE") else {
            kelvin_sdk::fail("KELVIN_INPUT_INSTANCE is not set: is the `instance` input bound?");
        };
        let instance: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            kelvin_sdk::fail(format_args!("KELVIN_INPUT_INSTANCE is not JSON: {e}"))
        });
        if instance.is_null() {
            return json_response(404, &json!({"error": "no such job"}));
        }
        let status = &instance["runtimeStatus"];
        let result = match status.as_str() {
            Some("Completed") => instance["output"].clone(),
            _ => Value::Null,
        };
        json_response(
            200,
            &json!({"id": instance["instanceId"], "status": status, "result": result}),
        )
    });
}

fn json_response(status: u16, body: &Value) -> Response {
    Response::new(status)
        .header("content-type", "application/json")
        .body(body.to_string())
}
