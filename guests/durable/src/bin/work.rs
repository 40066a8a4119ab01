//! `work`: a configurable activity for tests: doubles `value`, optionally
//! after a sleep, or fails on demand.
//!
//! Input: `{"value": v, "sleep_ms"?: ms, "fail_attempts"?: k, "fail"?: bool}`.
//! It sleeps `sleep_ms`, then fails if `fail` is true or while the attempt
//! is at most `fail_attempts` (so retries can be tested); otherwise it
//! returns `v * 2`.

use std::time::Duration;

use kelvin_sdk::durable;
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    value: i64,
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    fail_attempts: u32,
    #[serde(default)]
    fail: bool,
}

fn main() {
    durable::activity(|ctx| {
        let input: Input = ctx.input()?;
        if input.sleep_ms > 0 {
            std::thread::sleep(Duration::from_millis(input.sleep_ms));
        }
        if input.fail {
            return Err(format!("work on {} failed, as asked", input.value));
        }
        if ctx.attempt <= input.fail_attempts {
            return Err(format!("attempt {} failed, as asked", ctx.attempt));
        }
        input
            .value
            .checked_mul(2)
            .ok_or_else(|| format!("{} * 2 overflows", input.value))
    });
}
