//! `fan-out`: an orchestrator fanning out `n` calls of the `work` activity
//! at once and fanning in their sum.
//!
//! Input: `{"n": N}`. Output: the sum of `work`'s results for 0..N (so
//! `N * (N - 1)`).

use kelvin_sdk::durable::{self, json};
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    n: u64,
}

fn main() {
    durable::orchestrator(|ctx| async move {
        let Input { n } = ctx.input()?;
        let tasks = (0..n)
            .map(|i| ctx.call_activity("work", json!({"value": i})))
            .collect();
        let results = durable::task_all(tasks).await?;
        results
            .iter()
            .map(|r| {
                r.as_i64()
                    .ok_or(format!("work returned {r}, not an integer"))
            })
            .sum::<Result<i64, String>>()
    });
}
