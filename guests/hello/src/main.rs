//! `hello`: greets by route parameter, query parameter or app setting.

use kelvin_sdk::http::{Request, Response};

fn main() {
    kelvin_sdk::http::serve(|req: Request| {
        let greeting = kelvin_sdk::setting("GREETING").unwrap_or_else(|| "Hello".into());
        let name = req
            .param("name")
            .map(str::to_owned)
            .or_else(|| req.query_param("name"))
            .unwrap_or_else(|| "world".into());
        kelvin_sdk::log(format_args!("greeting {name}"));
        Response::text(format!("{greeting}, {name}!\n"))
    });
}
