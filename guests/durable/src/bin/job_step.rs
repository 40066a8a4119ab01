//! `job-step`: the example app's activity: one step of a job, which takes
//! `step_ms` and computes `i * i`.
//!
//! Input: `{"i": i, "step_ms": ms}`. Output: `i * i`.

use std::time::Duration;

use kelvin_sdk::durable;
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    i: i64,
    #[serde(default)]
    step_ms: u64,
}

fn main() {
    durable::activity(|ctx| {
        let Input { i, step_ms } = ctx.input()?;
        if step_ms > 0 {
            std::thread::sleep(Duration::from_millis(step_ms));
        }
        i.checked_mul(i)
            .ok_or_else(|| format!("{i} * {i} overflows"))
    });
}
