//! CGI (RFC 3875, as WAGI speaks it) between the HTTP trigger and preview-1
//! guests: the request as meta-variables, and the guest's output parsed into
//! a response within bounds, so no output can make the host misbehave.
//!
//! What a guest may answer: a header block (at most [`MAX_HEADERS`] lines
//! and the server's `max_header_size` bytes), a blank line, the body; or
//! output without a header block, all body. It may not choose the framing or
//! the connection: `Status` must be 200-599; `Transfer-Encoding`, `Upgrade`
//! and a `Content-Length` that differs from the body are refused (502);
//! the hop-by-hop headers in [`DROPPED`] are dropped.

use std::net::SocketAddr;

use bytes::Bytes;
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Response, StatusCode};

/// Header lines a guest's response may have at most (hyper reads at most
/// 100 in a request; the same bound keeps a response sane).
pub const MAX_HEADERS: usize = 100;

/// Hop-by-hop headers a guest may write but that describe the connection,
/// which is the host's: dropped from the response.
pub const DROPPED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
];

/// Headers that would change how the response is framed or what protocol
/// follows: a response carrying one is refused.
const REFUSED: &[&str] = &["transfer-encoding", "upgrade"];

/// A guest response that cannot be passed on, and why (for the log and the
/// invocation's record; the client gets a generic 502).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("its header block is larger than {} (server.max_header_size)", crate::invoke::human_size(*.0 as u64))]
    HeadTooLarge(usize),
    #[error("it has more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("invalid Status header {0:?}")]
    BadStatus(String),
    #[error("status {0} is not allowed (a function answers 200-599)")]
    StatusNotAllowed(u16),
    #[error("more than one Status header")]
    TwoStatuses,
    #[error("invalid header name {0:?}")]
    BadName(String),
    #[error("invalid value for header {0}")]
    BadValue(String),
    #[error("the {0} header is the host's to set")]
    Refused(String),
    #[error("Content-Length {declared} does not match the body's {actual} bytes")]
    WrongLength { declared: String, actual: usize },
}

/// What a CGI request carries besides its headers and body.
pub struct Meta<'a> {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The route pattern that matched, and its parameters.
    pub route: &'a str,
    pub params: &'a [(String, String)],
    /// The query string the guest sees.
    pub query: &'a str,
}

/// CGI meta-variables (RFC 3875 section 4.1) plus Kelvin's route variables.
/// The caller has removed what the guest must not see (an access key).
pub fn env(
    parts: &hyper::http::request::Parts,
    body_len: usize,
    meta: &Meta<'_>,
) -> Vec<(String, String)> {
    let mut env = vec![
        ("GATEWAY_INTERFACE".into(), "CGI/1.1".into()),
        ("SERVER_PROTOCOL".into(), format!("{:?}", parts.version)),
        (
            "SERVER_SOFTWARE".into(),
            concat!("kelvin/", env!("CARGO_PKG_VERSION")).into(),
        ),
        ("SERVER_NAME".into(), meta.local.ip().to_string()),
        ("SERVER_PORT".into(), meta.local.port().to_string()),
        ("REMOTE_ADDR".into(), meta.peer.ip().to_string()),
        ("REMOTE_HOST".into(), meta.peer.ip().to_string()),
        ("REQUEST_METHOD".into(), parts.method.to_string()),
        ("SCRIPT_NAME".into(), String::new()),
        ("PATH_INFO".into(), parts.uri.path().to_owned()),
        ("QUERY_STRING".into(), meta.query.to_owned()),
        ("CONTENT_LENGTH".into(), body_len.to_string()),
        ("X_MATCHED_ROUTE".into(), meta.route.to_owned()),
    ];
    for (name, value) in meta.params {
        env.push((format!("KELVIN_PARAM_{name}"), value.clone()));
    }
    // Headers become HTTP_* variables. A name with `_` is dropped: mapped,
    // `X_Forwarded_For` would pose as `X-Forwarded-For` (Apache and nginx
    // drop them too). Repeated headers are joined with ", " (RFC 3875
    // 4.1.18) instead of shadowing each other. `Proxy` never becomes
    // HTTP_PROXY, which many HTTP clients take as their proxy (httpoxy).
    for name in parts.headers.keys() {
        if name.as_str().contains('_') || name.as_str() == "proxy" {
            continue;
        }
        let values: Vec<&str> = parts
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if values.is_empty() || name == hyper::header::CONTENT_LENGTH {
            continue;
        }
        let value = values.join(", ");
        if name == hyper::header::CONTENT_TYPE {
            env.push(("CONTENT_TYPE".into(), value));
        } else {
            let var = format!(
                "HTTP_{}",
                name.as_str().to_ascii_uppercase().replace('-', "_")
            );
            env.push((var, value));
        }
    }
    env
}

/// Turns a guest's stdout into a response. `max_head` bounds the header
/// block in bytes. The body type is left to the caller (`body` wraps bytes).
pub fn response<B>(
    stdout: Bytes,
    max_head: usize,
    body: impl FnOnce(Bytes) -> B,
) -> Result<Response<B>, Malformed> {
    let (headers, body_start) = match split_head(&stdout, max_head)? {
        Some(split) => split,
        None => return Ok(with_default_type(Response::new(body(stdout)))),
    };
    let body_len = stdout.len() - body_start;
    let mut status = None;
    let mut has_location = false;
    let mut map = hyper::HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("status") {
            if status.is_some() {
                return Err(Malformed::TwoStatuses);
            }
            status = Some(parse_status(value)?);
            continue;
        }
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Malformed::BadName(name.to_owned()))?;
        if DROPPED.contains(&name.as_str()) {
            continue;
        }
        if REFUSED.contains(&name.as_str()) {
            return Err(Malformed::Refused(name.to_string()));
        }
        if name == hyper::header::CONTENT_LENGTH && value.parse::<usize>().ok() != Some(body_len) {
            return Err(Malformed::WrongLength {
                declared: value.to_owned(),
                actual: body_len,
            });
        }
        has_location |= name == hyper::header::LOCATION;
        let value =
            HeaderValue::from_str(value).map_err(|_| Malformed::BadValue(name.to_string()))?;
        map.append(name, value);
    }
    let mut response = Response::new(body(stdout.slice(body_start..)));
    *response.headers_mut() = map;
    *response.status_mut() = match status {
        Some(s) => s,
        None if has_location => StatusCode::FOUND,
        None => StatusCode::OK,
    };
    Ok(with_default_type(response))
}

fn with_default_type<B>(mut response: Response<B>) -> Response<B> {
    if !response.headers().contains_key(hyper::header::CONTENT_TYPE) {
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    response
}

/// `Status: 404 Not Found` -> 404, if the code is one a function may send.
fn parse_status(value: &str) -> Result<StatusCode, Malformed> {
    let bad = || Malformed::BadStatus(value.chars().take(40).collect());
    let code = value.split_whitespace().next().ok_or_else(bad)?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let code: u16 = code.parse().map_err(|_| bad())?;
    if !(200..=599).contains(&code) {
        return Err(Malformed::StatusNotAllowed(code));
    }
    StatusCode::from_u16(code).map_err(|_| bad())
}

/// A header block's lines, and where the body starts.
type Head<'a> = (Vec<(&'a str, &'a str)>, usize);

/// Splits `Name: value` lines up to the first blank line, returning them and
/// where the body starts. `None` if the output does not start with such a
/// block (it is then all body); an error if it does but the block breaks
/// the bounds.
fn split_head(out: &[u8], max_head: usize) -> Result<Option<Head<'_>>, Malformed> {
    let mut headers = Vec::new();
    let mut pos = 0;
    loop {
        let Some(end) = out[pos..].iter().position(|&b| b == b'\n').map(|i| pos + i) else {
            // No blank line: not a header block, so all body. (Bytes sent
            // as body cannot hurt; only a head is bounded.)
            return Ok(None);
        };
        let line = &out[pos..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Ok((!headers.is_empty()).then_some((headers, end + 1)));
        }
        let Some(header) = header_line(line) else {
            // Text that is not a header block is all body.
            return Ok(None);
        };
        if end + 1 > max_head {
            return Err(Malformed::HeadTooLarge(max_head));
        }
        if headers.len() == MAX_HEADERS {
            return Err(Malformed::TooManyHeaders);
        }
        headers.push(header);
        pos = end + 1;
    }
}

fn header_line(line: &[u8]) -> Option<(&str, &str)> {
    let line = std::str::from_utf8(line).ok()?;
    let (name, value) = line.split_once(':')?;
    is_token(name.as_bytes()).then(|| (name, value.trim()))
}

/// An HTTP token (RFC 9110 5.6.2): what a header name is made of.
fn is_token(name: &[u8]) -> bool {
    !name.is_empty()
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 16 << 10;

    fn parse(out: &[u8]) -> Result<Response<Bytes>, Malformed> {
        response(Bytes::copy_from_slice(out), MAX, |b| b)
    }

    #[test]
    fn headers_status_and_body() {
        let r = parse(b"Status: 201 Created\r\nContent-Type: application/json\r\nX-A: 1\r\n\r\n{}")
            .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["content-type"], "application/json");
        assert_eq!(r.headers()["x-a"], "1");
        assert_eq!(r.body(), "{}");
    }

    #[test]
    fn location_without_status_redirects() {
        assert_eq!(parse(b"Location: /there\n\n").unwrap().status(), 302);
    }

    #[test]
    fn plain_output_is_all_body() {
        for out in [
            &b"Hello, world!\n"[..],
            b"no newline",
            b"a: b\nno blank line",
            b"",
            b"x y: z\n\nbody",
        ] {
            let r = parse(out).unwrap();
            assert_eq!(r.status(), 200);
            assert_eq!(r.body(), out);
        }
    }

    #[test]
    fn statuses_outside_200_to_599_are_refused() {
        for (out, want) in [
            (
                &b"Status: 101 Switching Protocols\nUpgrade: websocket\n\n"[..],
                Malformed::StatusNotAllowed(101),
            ),
            (b"Status: 103\n\n", Malformed::StatusNotAllowed(103)),
            (
                b"Status: 999 Whatever\n\n",
                Malformed::StatusNotAllowed(999),
            ),
            (b"Status: 600\n\n", Malformed::StatusNotAllowed(600)),
        ] {
            assert_eq!(parse(out).unwrap_err(), want);
        }
        for bad in [
            &b"Status: abc\n\n"[..],
            b"Status: 99\n\n",
            b"Status: 2000\n\n",
            b"Status:\n\n",
        ] {
            assert!(
                matches!(parse(bad).unwrap_err(), Malformed::BadStatus(_)),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse(b"Status: 200\nStatus: 500\n\n").unwrap_err(),
            Malformed::TwoStatuses
        );
        assert_eq!(parse(b"Status: 599\n\n").unwrap().status(), 599);
    }

    #[test]
    fn framing_is_the_hosts() {
        assert_eq!(
            parse(b"Content-Length: 5\n\n0123456789").unwrap_err(),
            Malformed::WrongLength {
                declared: "5".into(),
                actual: 10
            }
        );
        assert!(parse(b"Content-Length: 50\n\n0123456789").is_err());
        assert!(parse(b"Content-Length: -1\n\n").is_err());
        let r = parse(b"Content-Length: 10\n\n0123456789").unwrap();
        assert_eq!(r.headers()["content-length"], "10");
        assert_eq!(
            parse(b"Transfer-Encoding: chunked\n\nbody").unwrap_err(),
            Malformed::Refused("transfer-encoding".into())
        );
        assert_eq!(
            parse(b"Upgrade: websocket\n\n").unwrap_err(),
            Malformed::Refused("upgrade".into())
        );
        let r = parse(b"Connection: close\nKeep-Alive: timeout=5\nX-Kept: yes\n\nbody").unwrap();
        assert!(!r.headers().contains_key("connection"));
        assert!(!r.headers().contains_key("keep-alive"));
        assert_eq!(r.headers()["x-kept"], "yes");
    }

    #[test]
    fn the_head_is_bounded() {
        let many: Vec<u8> = (0..=MAX_HEADERS)
            .flat_map(|i| format!("X-{i}: v\n").into_bytes())
            .chain(*b"\nbody")
            .collect();
        assert_eq!(parse(&many).unwrap_err(), Malformed::TooManyHeaders);
        let huge: Vec<u8> = (0..100_000)
            .flat_map(|i| format!("X-Header-{i}: {i}\r\n").into_bytes())
            .chain(*b"\r\nbody")
            .collect();
        assert!(parse(&huge).is_err());
        let long = format!("X-Big: {}\r\n\r\nbody", "a".repeat(1 << 20));
        assert_eq!(
            parse(long.as_bytes()).unwrap_err(),
            Malformed::HeadTooLarge(MAX)
        );
        // Without a newline it is not a head: all body, which cannot hurt.
        let unended = format!("X-Big: {}", "a".repeat(1 << 20));
        assert_eq!(
            parse(unended.as_bytes()).unwrap().body().len(),
            unended.len()
        );
        // A long body without a head is fine.
        let text = "word ".repeat(100_000);
        assert_eq!(parse(text.as_bytes()).unwrap().body().len(), text.len());
    }

    #[test]
    fn headers_cannot_shadow_each_other_or_set_a_proxy() {
        let request = hyper::Request::get("/x?a=1")
            .header("X_Forwarded_For", "evil")
            .header("X-Forwarded-For", "10.0.0.1")
            .header("Content_Type", "text/html")
            .header("Content-Type", "application/json")
            .header("Accept", "text/plain")
            .header("Accept", "application/json")
            .header("Proxy", "http://evil.example")
            .body(())
            .unwrap();
        let (parts, ()) = request.into_parts();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let meta = Meta {
            peer: addr,
            local: addr,
            route: "/x",
            params: &[],
            query: "a=1",
        };
        let env = env(&parts, 0, &meta);
        let all = |k: &str| -> Vec<&str> {
            env.iter()
                .filter(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(all("HTTP_X_FORWARDED_FOR"), ["10.0.0.1"]);
        assert_eq!(all("CONTENT_TYPE"), ["application/json"]);
        assert_eq!(all("HTTP_ACCEPT"), ["text/plain, application/json"]);
        assert!(all("HTTP_PROXY").is_empty());
        assert!(all("HTTP_CONTENT_TYPE").is_empty());
    }

    #[test]
    fn bad_names_and_values_are_refused() {
        assert!(matches!(
            parse(b"X-Bad: a\x01b\n\n"),
            Err(Malformed::BadValue(_))
        ));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// No output panics the parser, and whatever it accepts is a
        /// response hyper can send: a status of 200-599, no framing headers
        /// but a Content-Length that matches.
        #[test]
        fn any_output_parses_or_is_refused(out in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
            check(&out);
        }

        /// The same, from output shaped like a header block.
        #[test]
        fn any_header_block_parses_or_is_refused(
            lines in proptest::collection::vec("[A-Za-z:\\- ]{0,12}(: ?[ -~]{0,20})?", 0..120),
            body in "[ -~\n]{0,40}",
            crlf in proptest::prelude::any::<bool>(),
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let out = lines.join(eol) + eol + eol + &body;
            check(out.as_bytes());
        }
    }

    fn check(out: &[u8]) {
        if let Ok(r) = parse(out) {
            assert!((200..=599).contains(&r.status().as_u16()));
            assert!(r.headers().len() <= MAX_HEADERS + 1);
            for name in REFUSED.iter().chain(DROPPED) {
                assert!(!r.headers().contains_key(*name), "{name}");
            }
            if let Some(len) = r.headers().get("content-length") {
                assert_eq!(len.to_str().unwrap(), r.body().len().to_string());
            }
        }
    }
}
