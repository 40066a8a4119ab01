//! `monitor`: an orchestrator polling on a schedule (the monitor pattern):
//! `work` every `interval_ms`, with a durable timer between polls and its
//! progress in the custom status.
//!
//! Input: `{"polls": N, "interval_ms": M}`. Output: `{"polls": N, "last":
//! <the last poll's result>}`.

use std::time::Duration;

use kelvin_sdk::durable::{self, Value, json};
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    polls: u64,
    interval_ms: u64,
}

fn main() {
    durable::orchestrator(|ctx| async move {
        let Input { polls, interval_ms } = ctx.input()?;
        let mut last = Value::Null;
        for i in 1..=polls {
            last = ctx.call_activity("work", json!({"value": i})).await?;
            ctx.set_custom_status(json!({"polls": i}));
            if i < polls {
                ctx.sleep(Duration::from_millis(interval_ms)).await?;
            }
        }
        Ok(json!({"polls": polls, "last": last}))
    });
}
