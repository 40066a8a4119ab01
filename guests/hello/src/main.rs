//! `hello`: greets by route parameter, query parameter or app setting. With
//! `GREETING_FILE` set (a file in a folder the manifest mounts with
//! `files`), the greeting is read from that file at every request, so it
//! changes with the file and no deploy.

use kelvin_sdk::http::{Request, Response};

fn main() {
    kelvin_sdk::http::serve(|req: Request| {
        let greeting = match kelvin_sdk::setting("GREETING_FILE") {
            Some(path) => match std::fs::read_to_string(&path) {
                Ok(text) => text.trim().to_owned(),
                Err(e) => {
                    return Response::text(format!("cannot read {path}: {e}\n")).status(500);
                }
            },
            None => kelvin_sdk::setting("GREETING").unwrap_or_else(|| "Hello".into()),
        };
        let name = req
            .param("name")
            .map(str::to_owned)
            .or_else(|| req.query_param("name"))
            .unwrap_or_else(|| "world".into());
        kelvin_sdk::log(format_args!("greeting {name}"));
        Response::text(format!("{greeting}, {name}!\n"))
    });
}
