//! `say-hello`: an activity greeting its input (a string).

use kelvin_sdk::durable;

fn main() {
    durable::activity(|ctx| {
        let name: String = ctx.input()?;
        Ok(format!("Hello, {name}!"))
    });
}
