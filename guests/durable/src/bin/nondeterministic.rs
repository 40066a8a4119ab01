//! `nondeterministic`: a deliberately broken orchestrator, for the test of
//! Kelvin's determinism check: its first decision depends on the length of
//! the history, so its second episode calls `work` where the first called
//! `say-hello`. Kelvin must fail the instance, naming step 0.

use kelvin_sdk::durable::{self, json};

fn main() {
    durable::orchestrator(|ctx| async move {
        // Never do this: the history grows between episodes.
        let task = if ctx.history_len() <= 3 {
            ctx.call_activity("say-hello", "first")
        } else {
            ctx.call_activity("work", json!({"value": 0}))
        };
        Ok(task.await?)
    });
}
