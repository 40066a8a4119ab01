//! `countdown`: an orchestrator looping by continue-as-new: one `work` call
//! per generation, each starting over with a smaller `n` (and an empty
//! history).
//!
//! Input: `{"n": N, "total"?: T}`. Output, when `n` reaches 0: `{"total":
//! <T plus work's results for N..=1>}`.

use kelvin_sdk::durable::{self, json};
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    n: u64,
    #[serde(default)]
    total: i64,
}

fn main() {
    durable::orchestrator(|ctx| async move {
        let Input { n, total } = ctx.input()?;
        if n == 0 {
            return Ok(json!({"total": total}));
        }
        let result: i64 = ctx
            .call_activity("work", json!({"value": n}))
            .json()
            .await?;
        ctx.continue_as_new(json!({"n": n - 1, "total": total + result}));
        Ok(durable::Value::Null)
    });
}
