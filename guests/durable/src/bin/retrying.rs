//! `retrying`: an orchestrator whose activity calls fail and are retried
//! with the retry options the call sets.
//!
//! The first call of `work` fails on its first two attempts and succeeds on
//! the third (three allowed, 50 ms apart); the second fails on every
//! attempt (two allowed), and its last failure reaches the orchestrator.
//! Output: `{"value": 14, "error": true}`.

use std::time::Duration;

use kelvin_sdk::durable::{self, RetryOptions, json};

fn main() {
    durable::orchestrator(|ctx| async move {
        let value = ctx
            .call_activity_with_retry(
                "work",
                json!({"value": 7, "fail_attempts": 2}),
                RetryOptions::new(3, Duration::from_millis(50)),
            )
            .await?;
        let failed = ctx
            .call_activity_with_retry(
                "work",
                json!({"value": 1, "fail": true}),
                RetryOptions::new(2, Duration::from_millis(10)),
            )
            .await
            .is_err();
        Ok(json!({"value": value, "error": failed}))
    });
}
