//! `hello-cities`: an orchestrator chaining activity calls (the
//! "HelloCities" shape): `say-hello` for each city, one after the other.
//!
//! Input: an array of city names, or `null` for five of them. Output: the
//! greetings, in order.

use kelvin_sdk::durable;

const CITIES: [&str; 5] = ["Tokyo", "Seattle", "London", "Cairo", "Lima"];

fn main() {
    durable::orchestrator(|ctx| async move {
        let cities: Option<Vec<String>> = ctx.input()?;
        let cities = cities.unwrap_or_else(|| CITIES.map(String::from).to_vec());
        let mut greetings = Vec::with_capacity(cities.len());
        for city in &cities {
            greetings.push(ctx.call_activity("say-hello", city).await?);
        }
        Ok(greetings)
    });
}
