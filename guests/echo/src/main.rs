//! `echo`: answers with the request body and content type, plus what it saw.
//! With `?inspect`, it reports what the sandbox lets it reach instead.

use kelvin_sdk::http::{Request, Response};

fn main() {
    kelvin_sdk::http::serve(|req: Request| {
        if req.query_param("inspect").is_some() {
            return Response::text(inspect());
        }
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

/// One line per probe: every environment variable name, then whether the
/// filesystem and arguments are visible.
fn inspect() -> String {
    let mut out = String::new();
    for (k, _) in std::env::vars() {
        out.push_str(&format!("env {k}\n"));
    }
    for path in ["/", "/etc/passwd", "."] {
        let seen = std::fs::metadata(path).is_ok();
        out.push_str(&format!(
            "fs {path} {}\n",
            if seen { "visible" } else { "hidden" }
        ));
    }
    out.push_str(&format!(
        "args {}\n",
        std::env::args().collect::<Vec<_>>().join(" ")
    ));
    out
}
