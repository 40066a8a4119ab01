//! `submit-order`: an HTTP-triggered CGI function (`POST /orders`) that
//! accepts an order and puts it on the `orders` queue via its `order` output
//! binding.
//!
//! The client gets 202 with `{"id", "status": "accepted"}` (the envelope's
//! `ReturnValue`) and the queue gets the order; `process-order` handles it
//! from there. Invalid orders are the client's fault: 400 with the reason, not
//! a failed invocation.

use std::io::Read;

use serde_json::{Value, json};

fn main() {
    let mut body = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut body) {
        fail(format_args!("reading the request body: {e}"));
    }
    let mut order: Value = match serde_json::from_slice(&body) {
        Ok(order) => order,
        Err(e) => bad_request(format_args!("the body is not JSON: {e}")),
    };
    if let Err(reason) = validate(&order) {
        bad_request(format_args!("invalid order: {reason}"));
    }
    let id = match &order["id"] {
        Value::String(id) => id.clone(),
        // No id from the client: the invocation id is unique and also names
        // this request in Kelvin's logs, so the two can be matched up.
        _ => match std::env::var("KELVIN_INVOCATION_ID") {
            Ok(id) if !id.is_empty() => id,
            _ => fail("KELVIN_INVOCATION_ID is not set"),
        },
    };
    order["id"] = json!(id);
    let envelope = json!({
        "Outputs": {"order": order},
        "ReturnValue": {"id": id, "status": "accepted"},
    });
    print!("Status: 202\nContent-Type: application/json\n\n{envelope}");
}

/// Answers 400 with a one-line reason. The invocation itself succeeded.
fn bad_request(reason: impl std::fmt::Display) -> ! {
    print!("Status: 400\nContent-Type: text/plain\n\n{reason}\n");
    std::process::exit(0)
}

/// Logs why and ends the invocation as failed (the client gets a 5xx).
fn fail(reason: impl std::fmt::Display) -> ! {
    eprintln!("submit-order: {reason}");
    std::process::exit(1)
}

/// The order's shape, as `process-order` will insist on it; the id may be
/// missing (or null) here, since it is assigned on submission.
fn validate(order: &Value) -> Result<(), String> {
    if !order.is_object() {
        return Err("not a JSON object".into());
    }
    match &order["id"] {
        Value::Null => {}
        Value::String(id) if !id.is_empty() => {}
        _ => return Err("`id` must be a non-empty string if given".into()),
    }
    let items = match order["items"].as_array() {
        Some(items) if !items.is_empty() => items,
        _ => return Err("`items` must be a non-empty array".into()),
    };
    for (i, item) in items.iter().enumerate() {
        if item["sku"].as_str().is_none_or(str::is_empty) {
            return Err(format!("items[{i}].sku must be a non-empty string"));
        }
        if item["qty"].as_u64().is_none_or(|qty| qty == 0) {
            return Err(format!("items[{i}].qty must be a positive integer"));
        }
        if !item["price"].as_f64().is_some_and(|price| price >= 0.0) {
            return Err(format!("items[{i}].price must be a non-negative number"));
        }
    }
    Ok(())
}
