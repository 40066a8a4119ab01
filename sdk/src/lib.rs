//! `kelvin-sdk`: write Kelvin functions for `wasm32-wasip1` without
//! boilerplate.
//!
//! A Kelvin function is a WASI command: the event arrives on stdin, metadata
//! in environment variables, the result goes to stdout and logs to stderr
//! (see `docs/guest-abi.md`). This crate wraps that contract:
//!
//! ```no_run
//! use kelvin_sdk::http::{Request, Response};
//!
//! fn main() {
//!     kelvin_sdk::http::serve(|req: Request| {
//!         let name = req.param("name").unwrap_or("world");
//!         Response::text(format!("Hello, {name}!\n"))
//!     });
//! }
//! ```
//!
//! Non-HTTP functions use [`run`]: bytes in, bytes out. Durable functions
//! (orchestrators, activities and entities, `docs/durable.md`) use
//! [`durable`]: orchestrators are async Rust, replayed deterministically.

pub mod durable;

use std::fmt::Display;
use std::io::{Read, Write};

/// Who is running and why: the invocation's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    /// The function's name in `functions.toml`.
    pub function: String,
    /// Unique per invocation; it also appears in Kelvin's logs and records.
    pub invocation_id: String,
    /// What started the invocation: `http`, `invoke`, ...
    pub trigger: String,
}

/// The current invocation's metadata.
pub fn context() -> Context {
    Context {
        function: var("KELVIN_FUNCTION").unwrap_or_default(),
        invocation_id: var("KELVIN_INVOCATION_ID").unwrap_or_default(),
        trigger: var("KELVIN_TRIGGER").unwrap_or_default(),
    }
}

/// An app setting from the function's `env` table.
pub fn setting(name: &str) -> Option<String> {
    var(name)
}

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The whole input event (stdin).
pub fn input() -> Vec<u8> {
    let mut buf = Vec::new();
    // Reading stdin can only fail if the host broke the contract; an empty
    // event is the honest answer then.
    let _ = std::io::stdin().read_to_end(&mut buf);
    buf
}

/// Writes `bytes` as (part of) the result.
pub fn output(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes);
    let _ = out.flush();
}

/// Writes a log line; Kelvin tags it with the invocation id.
pub fn log(message: impl Display) {
    eprintln!("{message}");
}

/// Runs a bytes-in, bytes-out function. An error is logged and the process
/// exits with code 1, which Kelvin records as a failed invocation.
pub fn run<E: Display>(f: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, E>) {
    match f(input()) {
        Ok(out) => output(&out),
        Err(e) => fail(e),
    }
}

/// Logs `error` and ends the invocation as failed (exit code 1).
pub fn fail(error: impl Display) -> ! {
    log(format_args!("error: {error}"));
    std::process::exit(1)
}

/// HTTP functions: the request from CGI variables and stdin, the response as
/// CGI output.
pub mod http {
    use std::fmt::Write as _;

    /// An HTTP request as Kelvin hands it to a function.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Request {
        pub method: String,
        pub path: String,
        /// The raw query string, without `?`.
        pub query: String,
        /// Headers, lowercase names.
        pub headers: Vec<(String, String)>,
        /// The route pattern that matched, e.g. `/hello/{name}`.
        pub route: String,
        /// Route parameters, e.g. `name` for `/hello/{name}`.
        pub params: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Request {
        /// Reads the current request. Outside HTTP (e.g. `kelvin invoke`) it
        /// is a `POST /` whose body is the input.
        pub fn from_env() -> Request {
            let mut headers = Vec::new();
            let mut params = Vec::new();
            for (k, v) in std::env::vars() {
                if let Some(h) = k.strip_prefix("HTTP_") {
                    headers.push((h.to_ascii_lowercase().replace('_', "-"), v));
                } else if k == "CONTENT_TYPE" {
                    headers.push(("content-type".into(), v));
                } else if let Some(p) = k.strip_prefix("KELVIN_PARAM_") {
                    params.push((p.to_owned(), v));
                }
            }
            let env = |k: &str| std::env::var(k).ok();
            Request {
                method: env("REQUEST_METHOD").unwrap_or_else(|| "POST".into()),
                path: env("PATH_INFO").unwrap_or_else(|| "/".into()),
                query: env("QUERY_STRING").unwrap_or_default(),
                headers,
                route: env("X_MATCHED_ROUTE").unwrap_or_default(),
                params,
                body: super::input(),
            }
        }

        /// A route parameter.
        pub fn param(&self, name: &str) -> Option<&str> {
            find(&self.params, name)
        }

        /// A header (case-insensitive name).
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        /// A query parameter, percent-decoded (`+` is a space).
        pub fn query_param(&self, name: &str) -> Option<String> {
            self.query.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (decode(k) == name).then(|| decode(v))
            })
        }

        /// The body as text (lossy).
        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }
    }

    fn find<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = |b: u8| (b as char).to_digit(16);
                    match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                        (Some(h), Some(l)) => {
                            out.push((h * 16 + l) as u8);
                            i += 2;
                        }
                        _ => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// An HTTP response, written as CGI output.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Response {
        pub status: u16,
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Response {
        pub fn new(status: u16) -> Response {
            Response {
                status,
                headers: Vec::new(),
                body: Vec::new(),
            }
        }

        /// 200 with a `text/plain` body.
        pub fn text(body: impl Into<String>) -> Response {
            Response::new(200)
                .header("content-type", "text/plain; charset=utf-8")
                .body(body.into().into_bytes())
        }

        pub fn header(mut self, name: &str, value: &str) -> Response {
            self.headers.push((name.to_owned(), value.to_owned()));
            self
        }

        pub fn body(mut self, body: impl Into<Vec<u8>>) -> Response {
            self.body = body.into();
            self
        }

        pub fn status(mut self, status: u16) -> Response {
            self.status = status;
            self
        }

        /// The CGI form: `Status:` and headers, a blank line, the body.
        pub fn to_cgi(&self) -> Vec<u8> {
            let mut head = format!("Status: {}\n", self.status);
            for (k, v) in &self.headers {
                let _ = writeln!(head, "{k}: {v}");
            }
            head.push('\n');
            let mut out = head.into_bytes();
            out.extend_from_slice(&self.body);
            out
        }
    }

    /// Reads the request, calls `handler`, writes its response.
    pub fn serve(handler: impl FnOnce(Request) -> Response) {
        let response = handler(Request::from_env());
        super::output(&response.to_cgi());
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn query_params_are_decoded() {
            let req = Request {
                method: "GET".into(),
                path: "/".into(),
                query: "a=1&name=J%C3%B6rg+B&flag&bad=%zz&end=%4".into(),
                headers: vec![],
                route: String::new(),
                params: vec![],
                body: vec![],
            };
            assert_eq!(req.query_param("a").as_deref(), Some("1"));
            assert_eq!(req.query_param("name").as_deref(), Some("Jörg B"));
            assert_eq!(req.query_param("flag").as_deref(), Some(""));
            assert_eq!(req.query_param("bad").as_deref(), Some("%zz"));
            assert_eq!(req.query_param("end").as_deref(), Some("%4"));
            assert_eq!(req.query_param("missing"), None);
        }

        #[test]
        fn cgi_output() {
            let r = Response::text("hi").status(201);
            assert_eq!(
                r.to_cgi(),
                b"Status: 201\ncontent-type: text/plain; charset=utf-8\n\nhi".to_vec()
            );
        }
    }
}
