//! A closed-loop HTTP/1.1 load generator: `connections` keep-alive
//! connections, each sending its next request as soon as the previous
//! response has been read in full, for a fixed time. Latency is measured per
//! request, from writing it to reading the end of its body.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HOST, HeaderName, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;

use super::Summary;
use crate::registry::micros;

/// What to request, and from where.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// The `Host` header.
    pub authority: String,
    pub method: Method,
    /// Paths (with query) to request; one is picked per request.
    pub paths: Vec<String>,
    /// Cumulative weights of `paths`, for a skewed mix; uniform if empty.
    cumulative: Vec<f64>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("`{0}` is not an http:// URL with a host")]
    BadUrl(String),
    #[error("cannot resolve `{0}`: {1}")]
    Resolve(String, std::io::Error),
}

impl Target {
    /// A GET of one path on a server at `addr`.
    pub fn new(addr: SocketAddr, path: &str) -> Target {
        Target {
            addr,
            authority: addr.to_string(),
            method: Method::GET,
            paths: vec![path.to_owned()],
            cumulative: Vec::new(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// A GET of an `http://host[:port]/path` URL.
    pub fn from_url(url: &str) -> Result<Target, TargetError> {
        let bad = || TargetError::BadUrl(url.to_owned());
        let uri: hyper::Uri = url.parse().map_err(|_| bad())?;
        if uri.scheme_str() != Some("http") {
            return Err(bad());
        }
        let authority = uri.authority().ok_or_else(bad)?.clone();
        let host_port = format!(
            "{}:{}",
            authority.host(),
            authority.port_u16().unwrap_or(80)
        );
        let addr = host_port
            .to_socket_addrs()
            .map_err(|e| TargetError::Resolve(host_port.clone(), e))?
            .next()
            .ok_or_else(bad)?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut target = Target::new(addr, path);
        target.authority = authority.to_string();
        Ok(target)
    }

    /// Requests `paths` with Zipf-distributed popularity: the k-th path is
    /// requested in proportion to 1/k^`s` (s = 1 is the classic skew of
    /// real traffic: a few hot functions, a long tail).
    pub fn zipf(mut self, paths: Vec<String>, s: f64) -> Target {
        let mut total = 0.0;
        self.cumulative = (1..=paths.len())
            .map(|k| {
                total += 1.0 / (k as f64).powf(s);
                total
            })
            .collect();
        self.paths = paths;
        self
    }

    fn pick(&self, rng: &mut u64) -> &str {
        // xorshift64*: plenty for choosing a path.
        *rng ^= *rng >> 12;
        *rng ^= *rng << 25;
        *rng ^= *rng >> 27;
        let r = rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let unit = (r >> 11) as f64 / (1u64 << 53) as f64;
        let i = match self.cumulative.last() {
            Some(total) => self.cumulative.partition_point(|&c| c < unit * total),
            None => (unit * self.paths.len() as f64) as usize,
        };
        &self.paths[i.min(self.paths.len() - 1)]
    }

    fn request(&self, path: &str) -> Request<Full<Bytes>> {
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(path)
            .header(HOST, &self.authority);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        req.body(Full::new(self.body.clone()))
            .expect("a request from checked parts is valid")
    }
}

/// What a run of load measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub connections: usize,
    pub duration_s: f64,
    /// Responses read in full, whatever their status.
    pub requests: u64,
    /// Connections that failed or closed mid-request.
    pub errors: u64,
    pub requests_per_second: f64,
    /// Responses by status code.
    pub status: BTreeMap<u16, u64>,
    /// Latency per request, in microseconds.
    pub latency: Option<Summary>,
}

#[derive(Default)]
struct ConnStats {
    latencies: Vec<u64>,
    status: BTreeMap<u16, u64>,
    errors: u64,
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> std::io::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends one request and reads its whole response; the latency in µs.
async fn exchange(sender: &mut Sender, req: Request<Full<Bytes>>) -> Result<(u16, u64), String> {
    let started = Instant::now();
    sender.ready().await.map_err(|e| e.to_string())?;
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, micros(started.elapsed())))
}

/// One request on a new connection: what a client arriving at an idle
/// server sees, connection set-up included. Returns the status and the
/// latency in microseconds.
pub async fn first_request(target: &Target) -> Result<(u16, u64), String> {
    let started = Instant::now();
    let mut sender = connect(target.addr).await.map_err(|e| e.to_string())?;
    let (status, _) = exchange(&mut sender, target.request(&target.paths[0])).await?;
    Ok((status, micros(started.elapsed())))
}

/// Runs `connections` closed-loop clients against `target` for `duration`.
pub async fn run(target: Arc<Target>, connections: usize, duration: Duration) -> LoadReport {
    let started = Instant::now();
    let deadline = started + duration;
    let clients: Vec<_> = (0..connections.max(1))
        .map(|c| {
            let target = target.clone();
            tokio::spawn(async move {
                let mut stats = ConnStats::default();
                let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (c as u64 + 1).wrapping_mul(0xff51_afd7);
                let mut sender = None;
                while Instant::now() < deadline {
                    let s = match sender.as_mut() {
                        Some(s) => s,
                        None => match connect(target.addr).await {
                            Ok(s) => sender.insert(s),
                            Err(_) => {
                                stats.errors += 1;
                                tokio::time::sleep(Duration::from_millis(10)).await;
                                continue;
                            }
                        },
                    };
                    let req = target.request(target.pick(&mut rng));
                    match exchange(s, req).await {
                        Ok((status, us)) => {
                            *stats.status.entry(status).or_default() += 1;
                            stats.latencies.push(us);
                        }
                        Err(_) => {
                            stats.errors += 1;
                            sender = None;
                        }
                    }
                }
                stats
            })
        })
        .collect();
    let mut all = ConnStats::default();
    for client in clients {
        if let Ok(stats) = client.await {
            all.latencies.extend(stats.latencies);
            all.errors += stats.errors;
            for (k, v) in stats.status {
                *all.status.entry(k).or_default() += v;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    LoadReport {
        connections: connections.max(1),
        duration_s: elapsed,
        requests: all.latencies.len() as u64,
        errors: all.errors,
        requests_per_second: all.latencies.len() as f64 / elapsed,
        status: all.status,
        latency: Summary::of(&all.latencies),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_become_targets() {
        let t = Target::from_url("http://127.0.0.1:8080/api/hello?x=1").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.paths, ["/api/hello?x=1"]);
        assert_eq!(t.authority, "127.0.0.1:8080");
        assert!(Target::from_url("https://127.0.0.1/").is_err());
        assert!(Target::from_url("/just/a/path").is_err());
    }

    #[test]
    fn zipf_prefers_the_first_paths() {
        let paths: Vec<String> = (0..100).map(|i| format!("/f{i}")).collect();
        let t = Target::new("127.0.0.1:1".parse().unwrap(), "/").zipf(paths, 1.0);
        let mut rng = 42;
        let mut hits = vec![0u32; 100];
        for _ in 0..100_000 {
            let p = t.pick(&mut rng);
            hits[p[2..].parse::<usize>().unwrap()] += 1;
        }
        // With s = 1 and 100 paths, the first takes 1/H(100) ~ 19%, the
        // second half, the last 1%.
        assert!((17_000..21_000).contains(&hits[0]), "{hits:?}");
        assert!((8_000..11_000).contains(&hits[1]), "{hits:?}");
        assert!(hits[99] > 0 && hits[99] < 400, "{hits:?}");
    }
}
