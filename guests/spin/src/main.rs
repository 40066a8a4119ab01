//! `spin`: burns CPU for N milliseconds (route `{ms}`, `?ms=`, or the input).
//! With `?mode=sleep` (or the input `sleep N`) it waits instead, idle in a
//! host call, which no epoch check can interrupt. The input `work N` does a
//! fixed amount of work instead (N rounds), however long that takes: what
//! it costs in CPU does not depend on what else the machine is doing.

use std::time::{Duration, Instant};

use kelvin_sdk::http::{Request, Response};

fn main() {
    kelvin_sdk::http::serve(|req: Request| {
        let input = req.text();
        if let Some(n) = input.trim().strip_prefix("work ") {
            let Ok(n) = n.trim().parse::<u64>() else {
                return Response::text("give a number of rounds\n").status(400);
            };
            let x = (0..n).fold(1u64, |x, _| round(x));
            return Response::text(format!("worked {n} rounds ({x:x})\n"));
        }
        let (sleep_input, input_ms) = match input.trim().strip_prefix("sleep ") {
            Some(ms) => (true, ms.trim().to_owned()),
            None => (false, input.trim().to_owned()),
        };
        let sleep = sleep_input || req.query_param("mode").as_deref() == Some("sleep");
        let ms = req
            .param("ms")
            .map(str::to_owned)
            .or_else(|| req.query_param("ms"))
            .unwrap_or(input_ms);
        let Ok(ms) = ms.parse::<u64>() else {
            return Response::text("give a number of milliseconds\n").status(400);
        };
        if sleep {
            std::thread::sleep(Duration::from_millis(ms));
            return Response::text(format!("slept {ms} ms\n"));
        }
        let until = Instant::now() + Duration::from_millis(ms);
        let mut x: u64 = 1;
        let mut rounds: u64 = 0;
        while Instant::now() < until {
            x = round(x);
            rounds += 1;
        }
        Response::text(format!("spun {ms} ms ({rounds} rounds, {x:x})\n"))
    });
}

/// One round of work: a thousand steps of a linear congruential generator.
fn round(mut x: u64) -> u64 {
    for _ in 0..1000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
    }
    x
}
