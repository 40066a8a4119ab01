//! `hello-http`: a plain wasi:http/proxy component, the kind `wasmtime serve`
//! and Spin run. It greets by the `name` query parameter, with the
//! greeting in `GREETING_FILE` if that is set.
#![cfg(target_arch = "wasm32")]

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wasip2::http::proxy::export!(Hello);

struct Hello;

impl wasip2::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let query = request.path_with_query().unwrap_or_default();
        let name = query
            .split_once('?')
            .and_then(|(_, q)| q.split('&').find_map(|p| p.strip_prefix("name=")))
            .unwrap_or("world")
            .to_owned();
        let headers = Fields::from_list(&[(
            "content-type".to_owned(),
            b"text/plain; charset=utf-8".to_vec(),
        )])
        .expect("valid header");
        let response = OutgoingResponse::new(headers);
        let body = response.body().expect("body once");
        ResponseOutparam::set(response_out, Ok(response));
        let mut out = body.write().expect("stream once");
        // With `GREETING_FILE` (in a folder mounted with `files`), the
        // greeting is that file's, read at each request.
        let greeting = match std::env::var("GREETING_FILE") {
            Ok(path) => std::fs::read_to_string(&path)
                .map(|t| t.trim().to_owned())
                .unwrap_or_else(|e| format!("cannot read {path}: {e}")),
            Err(_) => "Hello from wasi:http".to_owned(),
        };
        out.write_all(format!("{greeting}, {name}!\n").as_bytes())
            .expect("write");
        out.flush().expect("flush");
        drop(out);
        OutgoingBody::finish(body, None).expect("finish");
    }
}
