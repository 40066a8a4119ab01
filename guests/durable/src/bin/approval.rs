//! `approval`: an orchestrator waiting for a human (the human-interaction
//! pattern): the external event `approval` raced against a durable timer.
//!
//! Input: `{"timeout_ms": T}`. Output: `{"approved": <the event's input>}`
//! if the event came first, else `{"timed_out": true}`.

use std::time::Duration;

use kelvin_sdk::durable::{self, json};
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    timeout_ms: u64,
}

fn main() {
    durable::orchestrator(|ctx| async move {
        let Input { timeout_ms } = ctx.input()?;
        ctx.set_custom_status("waiting for approval");
        let (winner, result) = durable::task_any(vec![
            ctx.wait_for_event("approval"),
            ctx.sleep(Duration::from_millis(timeout_ms)),
        ])
        .await;
        Ok(match winner {
            0 => json!({"approved": result?}),
            _ => json!({"timed_out": true}),
        })
    });
}
