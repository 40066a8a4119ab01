//! `trap`: fails on purpose: `panic` (default), `div` (integer division by
//! zero), `exit` (exit code 1), from the route `{kind}`, `?kind=` or the input.

use kelvin_sdk::http::{Request, Response};

fn main() {
    kelvin_sdk::http::serve(|req: Request| {
        let kind = req
            .param("kind")
            .map(str::to_owned)
            .or_else(|| req.query_param("kind"))
            .unwrap_or_else(|| req.text().trim().to_owned());
        match kind.as_str() {
            "div" => {
                // black_box hides the divisor so the compiler cannot reject
                // or fold the division: the trap happens at run time.
                let zero: u32 = std::hint::black_box(0);
                let n = 7 / zero;
                Response::text(format!("{n}\n"))
            }
            "exit" => kelvin_sdk::fail("exiting with an error on purpose"),
            _ => panic!("trap guest panicking on purpose"),
        }
    });
}
