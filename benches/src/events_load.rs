//! The load client of `benches/events.sh`: sends one request over and over
//! on CONNECTIONS keep-alive HTTP/1.1 connections (one in flight on each),
//! on a single thread so it leaves the other core to the server. A request
//! answered with another status than the expected one is counted and sent
//! again, so TOTAL are acknowledged in the end.
//!
//! Usage: `events-load URL [--method POST] [--key KEY] [--body TEXT]
//! [-n TOTAL] [-c CONNECTIONS] [--expect 201] [--seconds S]`
//! (`--seconds`: stop sending after S seconds, for TOTAL unbounded).
//! Prints `ok=N refused=N start_ns=T last_ok_ns=T first_refusal=TEXT`,
//! times in nanoseconds since the UNIX epoch.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

struct Options {
    url: String,
    method: String,
    key: Option<String>,
    body: Bytes,
    total: u64,
    connections: usize,
    expect: u16,
    seconds: Option<f64>,
}

fn options() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut o = Options {
        url: String::new(),
        method: "POST".into(),
        key: None,
        body: Bytes::new(),
        total: u64::MAX,
        connections: 64,
        expect: 201,
        seconds: None,
    };
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        let bad = |e: std::num::ParseIntError| e.to_string();
        match a.as_str() {
            "--method" => o.method = value()?,
            "--key" => o.key = Some(value()?),
            "--body" => o.body = Bytes::from(value()?),
            "-n" => o.total = value()?.parse().map_err(bad)?,
            "-c" => o.connections = value()?.parse().map_err(bad)?,
            "--expect" => o.expect = value()?.parse().map_err(bad)?,
            "--seconds" => o.seconds = Some(value()?.parse().map_err(|_| "bad --seconds")?),
            _ if o.url.is_empty() && a.starts_with("http://") => o.url = a,
            _ => return Err(format!("unexpected argument {a:?}")),
        }
    }
    if o.url.is_empty() {
        return Err("usage: events-load URL [--method M] [--key K] [--body B] [-n N] [-c C] [--expect S] [--seconds S]".into());
    }
    Ok(o)
}

#[derive(Default)]
struct Tally {
    claimed: Cell<u64>,
    ok: Cell<u64>,
    refused: Cell<u64>,
    last_ok_ns: Cell<u128>,
    first_refusal: RefCell<Option<String>>,
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: &str) -> std::io::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::task::spawn_local(conn);
    Ok(sender)
}

fn main() {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("events-load: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let local = tokio::task::LocalSet::new();
    if let Err(e) = local.block_on(&rt, run(o)) {
        eprintln!("events-load: {e}");
        std::process::exit(1);
    }
}

async fn run(o: Options) -> Result<(), String> {
    let rest = o.url.strip_prefix("http://").ok_or("an http:// URL")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path }.to_owned();
    let authority = authority.to_owned();
    // Every connection is open before the clock starts.
    let mut senders = Vec::with_capacity(o.connections);
    for _ in 0..o.connections {
        senders.push(connect(&authority).await.map_err(|e| e.to_string())?);
    }
    let o = Rc::new(o);
    let tally = Rc::new(Tally::default());
    let start_ns = now_ns();
    let deadline = o
        .seconds
        .map(|s| Instant::now() + Duration::from_secs_f64(s));
    let mut tasks = Vec::new();
    for mut sender in senders {
        let (o, tally, path, authority) =
            (o.clone(), tally.clone(), path.clone(), authority.clone());
        tasks.push(tokio::task::spawn_local(async move {
            loop {
                if tally.claimed.get() >= o.total || deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok::<(), String>(());
                }
                tally.claimed.set(tally.claimed.get() + 1);
                // Sent until it is acknowledged.
                loop {
                    let mut req = Request::builder()
                        .method(o.method.as_str())
                        .uri(path.as_str())
                        .header("host", authority.as_str());
                    if let Some(key) = &o.key {
                        req = req.header("x-kelvin-key", key.as_str());
                    }
                    let req = req
                        .body(Full::new(o.body.clone()))
                        .map_err(|e| e.to_string())?;
                    sender.ready().await.map_err(|e| e.to_string())?;
                    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
                    let status = res.status().as_u16();
                    let body = res.into_body().collect().await.map_err(|e| e.to_string())?;
                    if status == o.expect {
                        tally.ok.set(tally.ok.get() + 1);
                        tally.last_ok_ns.set(now_ns());
                        break;
                    }
                    tally.refused.set(tally.refused.get() + 1);
                    tally.first_refusal.borrow_mut().get_or_insert_with(|| {
                        format!("{status} {}", String::from_utf8_lossy(&body.to_bytes()))
                    });
                }
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let refusal = tally.first_refusal.borrow().clone().unwrap_or_default();
    println!(
        "ok={} refused={} start_ns={start_ns} last_ok_ns={} first_refusal={}",
        tally.ok.get(),
        tally.refused.get(),
        tally.last_ok_ns.get(),
        refusal.replace(char::is_whitespace, "_")
    );
    Ok(())
}
