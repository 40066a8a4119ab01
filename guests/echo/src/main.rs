//! `echo`: answers with the request body and content type, plus what it saw.

use kelvin_sdk::http::{Request, Response};

fn main() {
    kelvin_sdk::http::serve(|req: Request| {
        let content_type = req
            .header("content-type")
            .unwrap_or("application/octet-stream")
            .to_owned();
        Response::new(200)
            .header("content-type", &content_type)
            .header("x-echo-method", &req.method)
            .header("x-echo-path", &req.path)
            .header("x-echo-query", &req.query)
            .header("x-echo-invocation", &kelvin_sdk::context().invocation_id)
            .body(req.body)
    });
}
