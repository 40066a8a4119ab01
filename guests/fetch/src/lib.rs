//! `fetch`: makes one outbound GET to the `url` query parameter and answers
//! with the upstream status and body, or with the error when the host (or the
//! network) refuses.
#![cfg(target_arch = "wasm32")]

use std::io::{Read as _, Write as _};

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingRequest, OutgoingResponse, ResponseOutparam,
    Scheme,
};

wasip2::http::proxy::export!(Fetch);

struct Fetch;

impl wasip2::exports::http::incoming_handler::Guest for Fetch {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let query = request.path_with_query().unwrap_or_default();
        let url = query
            .split_once('?')
            .and_then(|(_, q)| q.split('&').find_map(|p| p.strip_prefix("url=")))
            .unwrap_or("")
            .to_owned();
        let (status, text) = match fetch(&url) {
            Ok((status, body)) => (200, format!("upstream {status}: {body}")),
            Err(e) => (502, format!("outbound request failed: {e}")),
        };
        let response = OutgoingResponse::new(Fields::new());
        response.set_status_code(status).expect("valid status");
        let body = response.body().expect("body once");
        ResponseOutparam::set(response_out, Ok(response));
        let mut out = body.write().expect("stream once");
        out.write_all(text.as_bytes()).expect("write");
        out.flush().expect("flush");
        drop(out);
        OutgoingBody::finish(body, None).expect("finish");
    }
}

fn fetch(url: &str) -> Result<(u16, String), String> {
    let (scheme, rest) = url.split_once("://").ok_or("url needs a scheme")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let req = OutgoingRequest::new(Fields::new());
    req.set_scheme(Some(&if scheme == "https" {
        Scheme::Https
    } else {
        Scheme::Http
    }))
    .map_err(|()| "bad scheme")?;
    req.set_authority(Some(authority))
        .map_err(|()| "bad authority")?;
    req.set_path_with_query(Some(path))
        .map_err(|()| "bad path")?;
    let pending = outgoing_handler::handle(req, None).map_err(|e| format!("{e:?}"))?;
    pending.subscribe().block();
    let response = pending
        .get()
        .ok_or("no response")?
        .map_err(|()| "response taken twice")?
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status();
    let body = response.consume().map_err(|()| "body taken twice")?;
    let mut text = String::new();
    body.stream()
        .map_err(|()| "stream taken twice")?
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    Ok((status, text))
}
