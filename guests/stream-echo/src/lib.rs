//! `stream-echo`: echoes the request body back in 64 KiB chunks, reading and
//! writing as it goes, so a large body never sits whole in guest memory.
#![cfg(target_arch = "wasm32")]

use std::io::Write as _;

use wasip2::http::types::{
    Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

wasip2::http::proxy::export!(Echo);

struct Echo;

impl wasip2::exports::http::incoming_handler::Guest for Echo {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let response = OutgoingResponse::new(Fields::new());
        let out_body = response.body().expect("body once");
        ResponseOutparam::set(response_out, Ok(response));

        let in_body = request.consume().expect("body once");
        let mut input = in_body.stream().expect("stream once");
        let mut output = out_body.write().expect("stream once");
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match std::io::Read::read(&mut input, &mut chunk) {
                Ok(0) => break,
                Ok(n) => output.write_all(&chunk[..n]).expect("write"),
                Err(e) => panic!("reading the request body failed: {e}"),
            }
        }
        output.flush().expect("flush");
        drop(input);
        drop(output);
        IncomingBody::finish(in_body);
        OutgoingBody::finish(out_body, None).expect("finish");
    }
}
