//! `hostile`: CGI output that tries to hurt the host, to test that it
//! cannot. The kind comes from the route `{kind}` (`KELVIN_PARAM_kind`) or
//! the input. No SDK on purpose: it writes raw bytes.

use std::io::{Read, Write};

fn main() {
    let kind = std::env::var("KELVIN_PARAM_kind").unwrap_or_else(|_| {
        let mut input = String::new();
        let _ = std::io::stdin().read_to_string(&mut input);
        input.trim().to_owned()
    });
    let mut out = std::io::stdout().lock();
    let head: Vec<u8> = match kind.as_str() {
        // A header block no client could want: 100,000 lines.
        "headers" => (0..100_000)
            .flat_map(|i| format!("X-Header-{i}: {i}\r\n").into_bytes())
            .collect(),
        // One header line of 1 MiB.
        "big-header" => format!("X-Big: {}\r\n", "a".repeat(1 << 20)).into_bytes(),
        // Statuses a CGI script must not choose.
        "switch" => {
            b"Status: 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                .to_vec()
        }
        "informational" => b"Status: 103 Early Hints\r\n".to_vec(),
        "status-999" => b"Status: 999 Whatever\r\n".to_vec(),
        // Framing the host owns.
        "short-length" => b"Content-Length: 5\r\n".to_vec(),
        "long-length" => b"Content-Length: 50\r\n".to_vec(),
        "chunked" => b"Transfer-Encoding: chunked\r\n".to_vec(),
        // Hop-by-hop headers that are only dropped.
        "hop" => b"Connection: close\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\n".to_vec(),
        // 50 MB of logs, then a normal answer.
        "stderr" => {
            let chunk = vec![b'e'; 1 << 20];
            let mut err = std::io::stderr().lock();
            for _ in 0..50 {
                if err.write_all(&chunk).is_err() {
                    break;
                }
            }
            Vec::new()
        }
        // One poll_oneoff on 500,000 (or 100,000) clocks: host memory the
        // guest's `memory` limit does not count.
        "poll" => poll(500_000),
        "poll-100k" => poll(100_000),
        // Writes into, and deletes from, every folder mounted read-only
        // (`HOSTILE_MOUNTS`, `:`-separated); says what each attempt did.
        "write-files" => {
            let mut said = String::new();
            for dir in std::env::var("HOSTILE_MOUNTS")
                .unwrap_or_default()
                .split(':')
            {
                let path = format!("{dir}/written-by-guest");
                let wrote = std::fs::write(&path, b"x").map_err(|e| e.kind());
                let existing = std::fs::read_dir(dir)
                    .ok()
                    .and_then(|mut d| d.next())
                    .and_then(Result::ok)
                    .map(|e| e.path());
                let removed = existing.map(|p| std::fs::remove_file(p).map_err(|e| e.kind()));
                said.push_str(&format!("X-Write: {dir} {wrote:?} remove {removed:?}\r\n"));
            }
            said.into_bytes()
        }
        _ => b"Status: 400\r\n\r\nunknown kind\n".to_vec(),
    };
    let _ = out.write_all(&head);
    let _ = out.write_all(b"Content-Type: text/plain\r\n\r\n0123456789");
    let _ = out.flush();
}

/// Calls `poll_oneoff` on `n` relative clock subscriptions and says what it
/// returned (as a header block with the body to come).
#[cfg(target_arch = "wasm32")]
fn poll(n: usize) -> Vec<u8> {
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    unsafe extern "C" {
        fn poll_oneoff(subs: *const u8, events: *mut u8, n: u32, nevents: *mut u32) -> u16;
    }
    // A subscription is 48 bytes: userdata (8), tag 0 = clock (1), and at
    // 16 the clock: id (4, 1 = monotonic), timeout (8 at 24), precision (8),
    // flags (2 at 40; 0 = relative). An event is 32 bytes.
    let mut subs = vec![0u8; n * 48];
    for (i, sub) in subs.chunks_mut(48).enumerate() {
        sub[..8].copy_from_slice(&(i as u64).to_le_bytes());
        sub[16..20].copy_from_slice(&1u32.to_le_bytes());
        sub[24..32].copy_from_slice(&1_000_000u64.to_le_bytes());
    }
    let mut events = vec![0u8; n * 32];
    let mut nevents = 0u32;
    // SAFETY: both buffers are as large as the call says.
    let errno = unsafe { poll_oneoff(subs.as_ptr(), events.as_mut_ptr(), n as u32, &mut nevents) };
    format!("X-Errno: {errno}\r\nX-Events: {nevents}\r\n").into_bytes()
}

#[cfg(not(target_arch = "wasm32"))]
fn poll(_: usize) -> Vec<u8> {
    b"Status: 400\r\n".to_vec()
}
