//! `alloc`: grows linear memory by N MiB and touches every page (route
//! `{mib}`, `?mib=`, or the input).

use kelvin_sdk::http::{Request, Response};

fn main() {
    kelvin_sdk::http::serve(|req: Request| {
        let mib = req
            .param("mib")
            .map(str::to_owned)
            .or_else(|| req.query_param("mib"))
            .unwrap_or_else(|| req.text().trim().to_owned());
        let Ok(mib) = mib.parse::<usize>() else {
            return Response::text("give a number of MiB\n").status(400);
        };
        // A failed grow aborts here (Rust's allocation-failure handler):
        // that is the memory bomb the host must contain.
        let mut block = vec![0u8; mib << 20];
        for page in block.chunks_mut(4096) {
            page[0] = 1;
        }
        let touched: usize = block.iter().step_by(4096).map(|&b| b as usize).sum();
        Response::text(format!("allocated {mib} MiB ({touched} pages touched)\n"))
    });
}
