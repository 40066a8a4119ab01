//! `process-order`: a queue-triggered function that validates each order from
//! the `orders` queue and sends a summary to its `processed` output binding.
//!
//! An order is `{"id": "o-1", "customer": "ada", "items": [{"sku": "tea",
//! "qty": 2, "price": 3.5}]}`. An invalid one fails the invocation, so Kelvin
//! retries it and finally moves it to the poison queue, where someone can look
//! at it.

use std::io::Read;

use serde_json::{Value, json};

fn main() {
    let mut input = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut input) {
        fail(format_args!("reading the event: {e}"));
    }
    let event: Value = match serde_json::from_slice(&input) {
        Ok(event) => event,
        Err(e) => fail(format_args!("the event is not JSON: {e}")),
    };
    let order = &event["Data"];
    let total = match validate(order) {
        Ok(total) => total,
        Err(reason) => fail(format_args!("invalid order: {reason}")),
    };
    let id = order["id"].as_str().unwrap_or_default();
    let items = order["items"].as_array().map_or(0, Vec::len);
    let envelope = json!({
        "Outputs": {"processed": {
            "id": id,
            "customer": order["customer"],
            "items": items,
            "total": total,
            // How often this message was tried: 1 unless earlier tries failed.
            "dequeue_count": event["Metadata"]["DequeueCount"],
        }},
        "Logs": [format!("order {id}: total {total:.2}")],
    });
    println!("{envelope}");
}

/// Checks the order's shape and returns its total: the sum of `qty * price`,
/// rounded to cents.
fn validate(order: &Value) -> Result<f64, String> {
    if !order.is_object() {
        return Err("not a JSON object".into());
    }
    if order["id"].as_str().is_none_or(str::is_empty) {
        return Err("`id` must be a non-empty string".into());
    }
    let items = match order["items"].as_array() {
        Some(items) if !items.is_empty() => items,
        _ => return Err("`items` must be a non-empty array".into()),
    };
    let mut total = 0.0;
    for (i, item) in items.iter().enumerate() {
        if item["sku"].as_str().is_none_or(str::is_empty) {
            return Err(format!("items[{i}].sku must be a non-empty string"));
        }
        // `as_u64` is `None` for negative and fractional numbers alike.
        let qty = match item["qty"].as_u64() {
            Some(qty) if qty > 0 => qty,
            _ => return Err(format!("items[{i}].qty must be a positive integer")),
        };
        let price = match item["price"].as_f64() {
            Some(price) if price >= 0.0 => price,
            _ => return Err(format!("items[{i}].price must be a non-negative number")),
        };
        total += qty as f64 * price;
    }
    // JSON has no infinity: a total that overflowed could not be sent on.
    if !total.is_finite() {
        return Err("the total is too large".into());
    }
    Ok((total * 100.0).round() / 100.0)
}

/// Logs why and ends the invocation as failed.
fn fail(reason: impl std::fmt::Display) -> ! {
    eprintln!("process-order: {reason}");
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_valid_orders_to_the_cent() {
        let order = json!({"id": "o-1", "items": [
            {"sku": "tea", "qty": 2, "price": 3.5},
            {"sku": "bun", "qty": 3, "price": 0.1},
        ]});
        assert_eq!(validate(&order), Ok(7.3));
    }

    #[test]
    fn rejects_invalid_orders() {
        let item = json!({"sku": "tea", "qty": 1, "price": 1});
        let bad = [
            json!("o-1"),
            json!({"items": [item]}),
            json!({"id": "", "items": [item]}),
            json!({"id": "o-1", "items": []}),
            json!({"id": "o-1", "items": [{"sku": "", "qty": 1, "price": 1}]}),
            json!({"id": "o-1", "items": [{"sku": "tea", "qty": 0, "price": 1}]}),
            json!({"id": "o-1", "items": [{"sku": "tea", "qty": 1.5, "price": 1}]}),
            json!({"id": "o-1", "items": [{"sku": "tea", "qty": 1, "price": -1}]}),
            json!({"id": "o-1", "items": [{"sku": "tea", "qty": 1, "price": "1"}]}),
        ];
        for order in bad {
            assert!(validate(&order).is_err(), "{order}");
        }
    }
}
