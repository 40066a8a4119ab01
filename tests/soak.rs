//! Soak: 10,000 mixed requests (successes, traps, timeouts, memory bombs,
//! a component, hostile output: 50 MB of logs, poll bombs, a component
//! logging 2 MiB, 100,000 header lines) over loopback against one server
//! whose log goes to an output that never drains (a stderr pipe nobody
//! reads), while other clients send bodies that never arrive and give up on
//! slow invocations. Afterwards it must still answer, its resident memory must
//! not have grown by more than 10% since warm-up, and every started
//! invocation (abandoned ones included) must have exactly one record.
//! Ignored by default (a few minutes on 2 cores); run it with
//!
//!     cargo test --release -p kelvin-tests --test soak -- --ignored --nocapture

#[path = "all/util.rs"]
#[allow(dead_code)]
mod util;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use util::App;

const WARMUP: usize = 1_000;
const REQUESTS: usize = 10_000;
const CLIENTS: usize = 16;
/// The whole test stops here even if the server misbehaves.
const BUDGET: Duration = Duration::from_secs(600);

/// Paths in proportion: mostly successes, with every kind of failure.
const MIX: &[(&str, u16)] = &[
    ("/hello/soak", 200),
    ("/hello/soak", 200),
    ("/hello/soak", 200),
    ("/echo", 200),
    ("/http/hello", 200),
    ("/http/hello", 200),
    ("/trap", 500),
    ("/trap/div", 500),
    ("/alloc/64", 500),
    ("/alloc/4", 200),
    ("/loop", 504),
    ("/hostile/stderr", 200),
    ("/hostile/poll", 200),
    ("/hostile/poll-100k", 500),
    ("/hostile/headers", 502),
    ("/http/hostile?kind=loud", 200),
];

/// Invocations whose clients give up before the answer.
const ABANDONED: usize = 50;
/// Requests whose bodies never arrive (408, never run, never recorded).
const STALLED: usize = 20;

/// An output whose writes never return: a pipe nobody reads.
struct Blocked;

impl std::io::Write for Blocked {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        loop {
            std::thread::park();
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status")
}

async fn drive(
    client: &reqwest::Client,
    base: &str,
    count: usize,
    started: Instant,
) -> Vec<(String, u16)> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (client, base, next) = (client.clone(), base.to_owned(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut wrong = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || started.elapsed() > BUDGET {
                    return wrong;
                }
                let (path, expected) = MIX[i % MIX.len()];
                let status = match client.get(format!("{base}{path}")).send().await {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        let _ = r.bytes().await;
                        s
                    }
                    Err(_) => 0,
                };
                if status != expected {
                    wrong.push((path.to_owned(), status));
                }
            }
        }));
    }
    let mut wrong = Vec::new();
    for t in tasks {
        wrong.extend(t.await.expect("client task"));
    }
    wrong
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak test: about a minute; run with --ignored"]
async fn ten_thousand_mixed_requests_leave_the_server_healthy() {
    let started = Instant::now();
    // The server's log, batched as `kelvin up` writes it, into an output
    // that blocks: what waits is capped, the rest dropped and counted.
    let log = Box::leak(Box::new(
        kelvin::batch::BatchWriter::spawn("soak-log", Box::new(Blocked)).unwrap(),
    ));
    tracing_subscriber::fmt()
        .with_writer(kelvin::batch::BatchedLog(log))
        .with_ansi(false)
        .init();
    let app = App::new(
        "max_connections = 64\nrequest_body_timeout = \"300ms\"",
        "[defaults]\nmax_concurrency = 8\nqueue = 64\n\
         [functions.hello]\nsource = \"{guests}/hello.wasm\"\n\
         [[functions.hello.http]]\nroute = \"/hello/{name}\"\nauth = \"anonymous\"\n\
         [functions.echo]\nsource = \"{guests}/echo.wasm\"\n\
         [[functions.echo.http]]\nroute = \"/echo\"\nauth = \"anonymous\"\n\
         [functions.trap]\nsource = \"{guests}/trap.wasm\"\n\
         [[functions.trap.http]]\nroute = \"/trap\"\nauth = \"anonymous\"\n\
         [[functions.trap.http]]\nroute = \"/trap/{kind}\"\nauth = \"anonymous\"\n\
         [functions.alloc]\nsource = \"{guests}/alloc.wasm\"\nmemory = \"32MiB\"\n\
         [[functions.alloc.http]]\nroute = \"/alloc/{mib}\"\nauth = \"anonymous\"\n\
         [functions.loop]\nsource = \"{guests}/loop.wasm\"\ntimeout = \"50ms\"\n\
         [[functions.loop.http]]\nroute = \"/loop\"\nauth = \"anonymous\"\n\
         [functions.hello-http]\nsource = \"{components}/hello_http.wasm\"\n\
         [[functions.hello-http.http]]\nroute = \"/http/hello\"\nauth = \"anonymous\"\n\
         [functions.hostile]\nsource = \"{guests}/hostile.wasm\"\ntimeout = \"5s\"\n\
         [[functions.hostile.http]]\nroute = \"/hostile/{kind}\"\nauth = \"anonymous\"\n\
         [functions.hostile-http]\nsource = \"{components}/hostile_http.wasm\"\n\
         [[functions.hostile-http.http]]\nroute = \"/http/hostile\"\nauth = \"anonymous\"\n\
         [functions.spin]\nsource = \"{guests}/spin.wasm\"\n\
         [[functions.spin.http]]\nroute = \"/spin/{ms}\"\nauth = \"anonymous\"\n",
    );
    // The real sink: records go to a file, not to memory that would grow.
    let log = app.state_dir().join("invocations.jsonl");
    let sink = Arc::new(kelvin::metering::JsonLinesSink::open(&log).unwrap());
    let runtime = Arc::new(kelvin::Runtime::new(app.manifest(), sink).unwrap());
    let server = kelvin::trigger::http::HttpServer::new(runtime.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listener, async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();

    let wrong = drive(&client, &base, WARMUP, started).await;
    assert!(
        wrong.is_empty(),
        "warm-up answered wrongly: {:?}",
        &wrong[..wrong.len().min(10)]
    );
    let warm_rss = rss_kib();

    let t = Instant::now();
    // Beside the mix: clients that give up on slow invocations, and ones
    // whose bodies never arrive.
    let quitters = {
        let base = base.clone();
        tokio::spawn(async move {
            let impatient = reqwest::Client::builder()
                .timeout(Duration::from_millis(50))
                .build()
                .unwrap();
            for _ in 0..ABANDONED {
                let gave_up = impatient.get(format!("{base}/spin/200")).send().await;
                assert!(gave_up.is_err(), "the client should have given up");
            }
        })
    };
    let stallers = {
        let addr = base.trim_start_matches("http://").to_owned();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            for _ in 0..STALLED {
                let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
                tcp.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\nab")
                    .await
                    .unwrap();
                let mut answer = Vec::new();
                let _ = tcp.read_to_end(&mut answer).await;
                assert!(
                    answer.starts_with(b"HTTP/1.1 408"),
                    "{}",
                    String::from_utf8_lossy(&answer)
                );
            }
        })
    };
    let wrong = drive(&client, &base, REQUESTS, started).await;
    quitters.await.unwrap();
    stallers.await.unwrap();
    let took = t.elapsed();
    assert!(started.elapsed() < BUDGET, "the soak ran out of time");
    assert!(
        wrong.is_empty(),
        "{} wrong answers, e.g. {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );

    // Still answering, promptly.
    let r = client
        .get(format!("{base}/hello/after"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let end_rss = rss_kib();
    let dropped = kelvin::batch::dropped_total();
    println!("log lines dropped while the log output was blocked: {dropped}");
    assert!(dropped > 0, "the blocked log was never full");
    println!(
        "{REQUESTS} requests in {took:?} ({:.0}/s); RSS after warm-up {warm_rss} KiB, at the end {end_rss} KiB ({:+.1}%)",
        REQUESTS as f64 / took.as_secs_f64(),
        (end_rss as f64 / warm_rss as f64 - 1.0) * 100.0
    );
    assert!(
        end_rss * 100 <= warm_rss * 110,
        "RSS grew more than 10%: {warm_rss} KiB -> {end_rss} KiB"
    );

    let _ = stop.send(());
    serving.await.unwrap().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect();
    let ids: std::collections::HashSet<&str> = records
        .iter()
        .map(|r| r["invocation_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), records.len(), "each invocation recorded once");
    // A client that gave up while its request still waited for admission
    // started nothing; every invocation that started is recorded (only the
    // impatient clients call `spin`). Most say their caller went away; one
    // whose client's disconnect the server only saw when it answered says
    // it was served.
    let impatient: Vec<&serde_json::Value> =
        records.iter().filter(|r| r["function"] == "spin").collect();
    let abandoned = impatient
        .iter()
        .filter(|r| r["outcome"] == "abandoned")
        .count();
    assert!(impatient.len() <= ABANDONED, "{}", impatient.len());
    assert!(
        abandoned * 2 >= impatient.len(),
        "{abandoned} of {}",
        impatient.len()
    );
    assert_eq!(
        records.len() - impatient.len(),
        WARMUP + REQUESTS + 1,
        "one record per invocation"
    );
}
