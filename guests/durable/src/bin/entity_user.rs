//! `entity-user`: an orchestrator using the `counter` entity: three signals
//! (one-way) then two calls (request/response) to `@counter@{key}`.
//!
//! Input: `{"key": K}`. Output: `{"after_add": <the add call's result>,
//! "get": <the get call's result>}`: both 13 for a fresh counter, since one
//! entity's operations run in the order they were sent.

use kelvin_sdk::durable::{self, json};
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    key: String,
}

fn main() {
    durable::orchestrator(|ctx| async move {
        let Input { key } = ctx.input()?;
        let counter = durable::entity_id("counter", &key);
        for _ in 0..3 {
            ctx.signal_entity(&counter, "add", 1);
        }
        let after_add = ctx.call_entity(&counter, "add", 10).await?;
        let get = ctx.call_entity(&counter, "get", ()).await?;
        Ok(json!({"after_add": after_add, "get": get}))
    });
}
