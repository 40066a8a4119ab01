//! `counter`: an entity holding an integer (absent: 0).
//!
//! Operations: `add` (input: an integer; returns the new value), `get`
//! (returns the value), `reset` (sets 0; returns 0) and `delete` (deletes the
//! entity; returns null). Any other operation fails.

use kelvin_sdk::durable::{self, Value, json};

fn main() {
    durable::entity(|entity| {
        let value: i64 = entity.state().unwrap_or(0);
        match entity.operation() {
            "add" => {
                let amount: i64 = entity.input()?;
                let value = value
                    .checked_add(amount)
                    .ok_or_else(|| format!("{value} + {amount} overflows"))?;
                entity.set_state(value);
                Ok(json!(value))
            }
            "get" => Ok(json!(value)),
            "reset" => {
                entity.set_state(0);
                Ok(json!(0))
            }
            "delete" => {
                entity.delete_state();
                Ok(Value::Null)
            }
            other => Err(format!("counter has no operation `{other}`")),
        }
    });
}
