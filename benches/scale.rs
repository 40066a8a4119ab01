//! 1,000 deployed functions with a warm artifact cache: start-up time and
//! idle RSS of a fresh server process, then Zipf-distributed traffic (s = 1)
//! over all of them with an LRU capacity of 100 loaded functions.
//! `cargo bench -p kelvin-benches --bench scale`
//!
//! The functions are copies of the hello guest, each with a custom section
//! that makes its hash (and so its compiled artifact) its own. The first run
//! compiles all 1,000 into `target/bench-scale` (minutes on 2 cores); later
//! runs reuse them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kelvin::bench::human_us;
use kelvin::bench::load::{self, Target};
use kelvin::metering::JsonLinesSink;
use kelvin::trigger::http::HttpServer;
use kelvin::{Manifest, Runtime};

const FUNCTIONS: usize = 1_000;
const MAX_LOADED: usize = 100;
const CONNECTIONS: usize = 4;
const DURATION: Duration = Duration::from_secs(10);

fn main() {
    if std::env::var_os("KELVIN_SCALE_SERVE").is_some() {
        serve();
        return;
    }
    let dir = kelvin_tests::workspace_root().join("target/bench-scale");
    let manifest = prepare(&dir);
    println!("scale: {FUNCTIONS} functions, LRU capacity {MAX_LOADED}, warm cache");

    // A fresh process: start-up and idle RSS, then Zipf traffic.
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("KELVIN_SCALE_SERVE", &manifest)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines.next().unwrap().unwrap();
    println!("{ready}");
    let addr = ready
        .split("address=")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    let paths: Vec<String> = (0..FUNCTIONS).map(|i| format!("/f{i:04}")).collect();
    let target = Arc::new(Target::new(addr, &paths[0]).zipf(paths, 1.0));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(load::run(
        target.clone(),
        CONNECTIONS,
        Duration::from_secs(2),
    ));
    let report = rt.block_on(load::run(target, CONNECTIONS, DURATION));
    let rss_after = rss_kib(&format!("/proc/{}/status", child.id()));
    let _ = child.kill();
    let _ = child.wait();
    let l = report.latency.expect("some requests succeeded");
    println!(
        "zipf s=1, {CONNECTIONS} connections, {:?}: {:.0} requests/s, p50 {}, p90 {}, p99 {}, max {}; statuses {:?}, errors {}; RSS after {} MiB",
        DURATION,
        report.requests_per_second,
        human_us(l.p50),
        human_us(l.p90),
        human_us(l.p99),
        human_us(l.max),
        report.status,
        report.errors,
        rss_after / 1024
    );
}

/// The server half: start, report start-up time and idle RSS, serve.
fn serve() {
    let started = Instant::now();
    let manifest =
        Manifest::load(Path::new(&std::env::var("KELVIN_SCALE_SERVE").unwrap())).unwrap();
    let log = JsonLinesSink::open(&manifest.server.state_dir.join("invocations.jsonl")).unwrap();
    let runtime = Arc::new(Runtime::new(manifest, Arc::new(log)).unwrap());
    let server = HttpServer::new(runtime).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let startup = started.elapsed();
        // Let the allocator settle before reading RSS.
        tokio::time::sleep(Duration::from_millis(200)).await;
        println!(
            "start-up {} (nothing compiled), idle RSS {} MiB, address={addr}",
            human_us(startup.as_micros() as u64),
            rss_kib("/proc/self/status") / 1024
        );
        server
            .serve(listener, std::future::pending())
            .await
            .unwrap();
    });
}

fn rss_kib(status: &str) -> u64 {
    std::fs::read_to_string(status)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Writes the functions and the manifest, and compiles what is not cached.
fn prepare(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("wasm")).unwrap();
    let hello = std::fs::read(kelvin_tests::guest_dir().join("hello.wasm")).unwrap();
    let mut toml = format!(
        "version = 1\nname = \"scale\"\n[server]\nmax_loaded = {MAX_LOADED}\nstate_dir = \"state\"\n\n"
    );
    for i in 0..FUNCTIONS {
        let name = format!("f{i:04}");
        let path = dir.join("wasm").join(format!("{name}.wasm"));
        let wasm = with_custom_section(&hello, &name);
        if std::fs::read(&path).ok().as_deref() != Some(&wasm[..]) {
            std::fs::write(&path, &wasm).unwrap();
        }
        toml.push_str(&format!(
            "[functions.{name}]\nsource = \"wasm/{name}.wasm\"\n\
             [[functions.{name}.http]]\nroute = \"/{name}\"\nauth = \"anonymous\"\n"
        ));
    }
    let manifest = dir.join("functions.toml");
    std::fs::write(&manifest, toml).unwrap();
    let runtime = Runtime::new(
        Manifest::load(&manifest).unwrap(),
        kelvin::bench::cold::discard_sink(),
    )
    .unwrap();
    let started = Instant::now();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let compiled = rt.block_on(runtime.registry().precompile_all()).unwrap();
    if compiled > 0 {
        println!("compiled {compiled} functions in {:?}", started.elapsed());
    }
    manifest
}

/// `wasm` plus a custom section named `kelvin-scale` holding `tag`.
fn with_custom_section(wasm: &[u8], tag: &str) -> Vec<u8> {
    let name = b"kelvin-scale";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.extend_from_slice(tag.as_bytes());
    let mut out = wasm.to_vec();
    out.push(0); // custom section id
    let mut len = payload.len();
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(&payload);
    out
}
