//! `events`: a test guest for Kelvin's event triggers; it sends the event it
//! got to its `out` output binding and misbehaves on request.
//!
//! A JSON object in the event's `Data` (for blob events: in the decoded blob)
//! steers it: `"sleep_ms": N` sleeps first, then `"fail": true` exits 1 and
//! `"trap": true` panics. `EVENTS_MODE=noop` skips everything, for throughput
//! benchmarks that measure the host, not the guest.

use std::io::Read;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value};

fn main() {
    if std::env::var("EVENTS_MODE").as_deref() == Ok("noop") {
        return;
    }
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        fail(format_args!("events: reading the event: {e}"));
    }
    let event: Value = match serde_json::from_slice(&input) {
        Ok(event) => event,
        Err(e) => fail(format_args!("events: the event is not JSON: {e}")),
    };

    let blob = std::env::var("KELVIN_TRIGGER").as_deref() == Ok("blob");
    if let Some(controls) = controls(&event["Data"], blob) {
        if let Some(ms) = controls.get("sleep_ms").and_then(Value::as_u64) {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if controls.get("fail") == Some(&Value::Bool(true)) {
            fail("failing as asked");
        }
        if controls.get("trap") == Some(&Value::Bool(true)) {
            panic!("trapping as asked");
        }
    }

    // The event goes out as the exact text that came in (it parsed, so it is
    // valid JSON), not re-serialised: tests see precisely what the host sent,
    // numbers and all.
    let text = String::from_utf8_lossy(&input);
    let invocation_id = match std::env::var("KELVIN_INVOCATION_ID") {
        Ok(id) => Value::String(id),
        Err(_) => Value::Null,
    };
    println!(
        r#"{{"Outputs": {{"out": {{"event": {}, "invocation_id": {invocation_id}}}}}}}"#,
        text.trim()
    );
}

/// The object that steers this invocation: `Data` itself, or for blob events
/// the blob's bytes if they are a JSON object.
fn controls(data: &Value, blob: bool) -> Option<Map<String, Value>> {
    if blob {
        let bytes = STANDARD.decode(data.as_str()?).ok()?;
        match serde_json::from_slice(&bytes).ok()? {
            Value::Object(map) => Some(map),
            _ => None,
        }
    } else {
        data.as_object().cloned()
    }
}

/// Logs why and ends the invocation as failed.
fn fail(reason: impl std::fmt::Display) -> ! {
    eprintln!("{reason}");
    std::process::exit(1)
}
