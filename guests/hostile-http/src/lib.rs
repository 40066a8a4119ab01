//! `hostile-http`: a wasi:http component whose answers try to hurt the host,
//! to test that they cannot. `?kind=` picks: `switch` (status 101),
//! `informational` (103), `status-999`, `loud` (1 MiB of logs on stdout and
//! stderr through Rust's `println!`, then a normal answer), `poll` (100,000
//! pollables and one poll over them), `late-body` (sets its response, then
//! writes the body 200 ms later: a HEAD's dropped body must not fail it).
#![cfg(target_arch = "wasm32")]

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wasip2::http::proxy::export!(Hostile);

struct Hostile;

impl wasip2::exports::http::incoming_handler::Guest for Hostile {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let query = request.path_with_query().unwrap_or_default();
        let kind = query
            .split_once('?')
            .and_then(|(_, q)| q.split('&').find_map(|p| p.strip_prefix("kind=")))
            .unwrap_or("")
            .to_owned();
        let status = match kind.as_str() {
            "switch" => 101,
            "informational" => 103,
            "status-999" => 999,
            "loud" => {
                // `println!` panics if a write fails: a host that refuses
                // logs past its cap would turn chattiness into a trap.
                let line = "x".repeat(1023);
                for _ in 0..1024 {
                    println!("{line}");
                    eprintln!("{line}");
                }
                200
            }
            "late-body" => 200,
            "poll" => {
                // 100,000 pollables, then one poll over them all.
                let pollables: Vec<_> = (0..100_000)
                    .map(|_| wasip2::clocks::monotonic_clock::subscribe_duration(1_000_000))
                    .collect();
                let refs: Vec<&_> = pollables.iter().collect();
                wasip2::io::poll::poll(&refs);
                200
            }
            _ => 400,
        };
        let headers = Fields::new();
        let response = OutgoingResponse::new(headers);
        response
            .set_status_code(status)
            .expect("a status in 100..=999");
        let body = response.body().expect("body once");
        ResponseOutparam::set(response_out, Ok(response));
        if kind == "late-body" {
            wasip2::clocks::monotonic_clock::subscribe_duration(200_000_000).block();
        }
        let mut out = body.write().expect("stream once");
        out.write_all(format!("{kind}\n").as_bytes())
            .expect("write");
        out.flush().expect("flush");
        drop(out);
        OutgoingBody::finish(body, None).expect("finish");
    }
}
