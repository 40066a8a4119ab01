//! `parent`: an orchestrator running sub-orchestrations in parallel: two
//! `hello-cities`, each greeting half of the cities.
//!
//! Input: `{"cities": [...]}`. Output: all the greetings, in the cities'
//! order.

use kelvin_sdk::durable;
use serde::Deserialize;

#[derive(Deserialize)]
struct Input {
    cities: Vec<String>,
}

fn main() {
    durable::orchestrator(|ctx| async move {
        let Input { cities } = ctx.input()?;
        let (first, second) = cities.split_at(cities.len() / 2);
        let halves = durable::task_all(vec![
            ctx.call_sub_orchestrator("hello-cities", first),
            ctx.call_sub_orchestrator("hello-cities", second),
        ])
        .await?;
        let mut greetings = Vec::with_capacity(cities.len());
        for half in halves {
            match half {
                durable::Value::Array(items) => greetings.extend(items),
                other => return Err(format!("hello-cities returned {other}, not an array")),
            }
        }
        Ok(greetings)
    });
}
