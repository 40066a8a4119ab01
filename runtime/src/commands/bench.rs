//! `kelvin bench`: cold-start and HTTP benchmarks of the manifest's
//! functions, run in this process against a scratch state folder (the app's
//! own cache, keys and ledger are never touched).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use serde::Serialize;

use super::{ManifestArgs, record_sinks, tokio_runtime};
use crate::bench::cold::{self, ColdStartReport};
use crate::bench::load::{self, LoadReport, Target};
use crate::bench::{Summary, human_us, progress, svg, table};
use crate::keys::{AuthLevel, KeyStore, Scope};
use crate::manifest::Manifest;
use crate::registry::micros;
use crate::runtime::Runtime;
use crate::trigger::http::HttpServer;

/// Measure cold starts and HTTP serving of your functions.
#[derive(clap::Args, Debug)]
pub struct BenchCommand {
    #[command(subcommand)]
    command: BenchKind,
}

#[derive(clap::Subcommand, Debug)]
enum BenchKind {
    ColdStart(ColdStartCommand),
    Http(HttpCommand),
}

impl BenchCommand {
    pub fn execute(self) -> Result<()> {
        match self.command {
            BenchKind::ColdStart(c) => c.execute(),
            BenchKind::Http(c) => c.execute(),
        }
    }
}

/// Start each function cold from scratch (compile), cold from the artifact
/// cache (evicted), and warm (pooled instance), and print percentiles per
/// phase.
#[derive(clap::Args, Debug)]
pub struct ColdStartCommand {
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// Functions to measure (default: all of them). Functions that fail are
    /// reported and skipped.
    pub functions: Vec<String>,
    /// Starts per temperature and function.
    #[arg(long, short = 'n', default_value_t = 30)]
    pub iterations: u32,
    /// The input event for every invocation (a file). Empty if omitted.
    #[arg(long, short)]
    pub input: Option<PathBuf>,
    /// Also write the results, with every sample, as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also draw the latency distributions as an SVG plot.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

impl ColdStartCommand {
    pub fn execute(self) -> Result<()> {
        // Every start logs a line at `info`; the table is the output.
        self.manifest.init_logging_at("warn");
        let mut manifest = self.manifest.load()?;
        let functions = pick_functions(&manifest, &self.functions)?;
        let input = match &self.input {
            Some(p) => std::fs::read(p)
                .with_context(|| format!("failed to read input `{}`", p.display()))?,
            None => Vec::new(),
        };
        if self.iterations == 0 {
            bail!("--iterations must be at least 1");
        }
        let scratch = scratch_state(&mut manifest)?;
        let app = manifest.name.to_string();
        let records = Arc::new(cold::Records::default());
        let runtime = Arc::new(Runtime::new(manifest, records.clone())?);
        let rt = tokio_runtime()?;
        let bar = progress(
            functions.len() as u64
                * u64::from(self.iterations)
                * cold::Temperature::ALL.len() as u64,
        );
        let step = |f: &str| {
            bar.set_message(f.to_owned());
            bar.inc(1);
        };
        let report = rt.block_on(cold::measure(
            &runtime,
            &records,
            &functions,
            self.iterations,
            Bytes::from(input),
            &step,
        ));
        bar.finish_and_clear();
        drop(runtime);
        drop(scratch);

        println!(
            "kelvin bench cold-start: app `{app}`, {} starts per temperature, {} ({} cores)\n",
            self.iterations,
            std::env::consts::ARCH,
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );
        print!("{}", report.table());
        if let Some(path) = &self.json {
            write_json(path, &report)?;
        }
        if let Some(path) = &self.svg {
            write_file(path, cold_start_svg(&report, &app).as_bytes())?;
        }
        if report.functions.is_empty() {
            bail!("no function could be measured");
        }
        Ok(())
    }
}

fn cold_start_svg(report: &ColdStartReport, app: &str) -> String {
    let panels: Vec<svg::Panel<'_>> = report
        .functions
        .iter()
        .map(|f| svg::Panel {
            title: format!("{} ({})", f.function, f.kind),
            series: f
                .temperatures
                .iter()
                .map(|t| svg::Series {
                    label: t.temperature.label(),
                    samples: &t.total_us,
                })
                .collect(),
        })
        .collect();
    svg::render(
        &format!(
            "Kelvin start latency, app `{app}` ({} starts per temperature)",
            report.iterations
        ),
        &panels,
    )
}

/// Serve the app in this process and measure a route: the first request
/// after start-up and after eviction, then requests/s and latency under
/// steady load over loopback.
#[derive(clap::Args, Debug)]
pub struct HttpCommand {
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// The request path to measure with GET requests, e.g. `/api/hello`
    /// (a query string may follow).
    #[arg(long, required_unless_present = "url")]
    pub route: Option<String>,
    /// Measure steady load against a server that is already running
    /// instead (no start-up or eviction measurements).
    #[arg(long, conflicts_with = "route")]
    pub url: Option<String>,
    /// Concurrent keep-alive connections, each sending its next request when
    /// the previous answer is in.
    #[arg(long, short, default_value_t = 1)]
    pub connections: usize,
    /// How long to measure steady load.
    #[arg(long, short, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Load before measuring, to reach a steady state.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Server starts, and evictions, to measure first requests after.
    #[arg(long, default_value_t = 20)]
    pub cold_samples: u32,
    /// Keep records out of the (scratch) ledger, as `kelvin up --no-ledger`.
    #[arg(long)]
    pub no_ledger: bool,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What `kelvin bench http` measured.
#[derive(Debug, Serialize)]
pub struct HttpReport {
    pub target: String,
    pub function: Option<String>,
    /// Building the runtime and the HTTP trigger, up to listening.
    pub startup: Option<Summary>,
    /// A new connection's first request to a freshly started server.
    pub first_after_start: Option<Summary>,
    /// A new connection's first request after the function was evicted.
    pub first_after_eviction: Option<Summary>,
    /// A new connection's first request to the loaded function, for scale.
    pub warm_new_connection: Option<Summary>,
    pub warmup_s: f64,
    pub steady: LoadReport,
}

impl HttpCommand {
    pub fn execute(self) -> Result<()> {
        self.manifest.init_logging_at("warn");
        if self.connections == 0 {
            bail!("--connections must be at least 1");
        }
        let rt = tokio_runtime()?;
        let report = match &self.url {
            Some(url) => {
                let target = Arc::new(Target::from_url(url)?);
                let steady = rt.block_on(steady(&target, &self));
                HttpReport::new(url.clone(), None, steady, &self)
            }
            None => rt.block_on(self.in_process())?,
        };
        print!("{}", report.text());
        if let Some(path) = &self.json {
            write_json(path, &report)?;
        }
        if report.steady.requests == 0 {
            bail!("no request succeeded");
        }
        Ok(())
    }

    async fn in_process(&self) -> Result<HttpReport> {
        let route = self.route.as_deref().unwrap_or("/");
        let mut manifest = self.manifest.load()?;
        let _scratch = scratch_state(&mut manifest)?;
        if manifest.server.instance_slots.get() < self.connections as u32 {
            tracing::warn!(
                "more connections than server.instance_slots: requests will queue for a slot"
            );
        }
        // Compile once, untimed: a deployed app has its artifacts cached
        // (`kelvin build`), and compiling is `kelvin bench cold-start`'s job.
        let (function, key) = {
            let runtime = Arc::new(Runtime::new(manifest.clone(), cold::discard_sink())?);
            let server = HttpServer::new(runtime.clone())?;
            let (function, auth) = server
                .resolve("GET", route.split('?').next().unwrap_or(route))
                .with_context(|| format!("no function answers GET {route}"))?;
            let function = function.to_owned();
            runtime
                .registry()
                .acquire(&function)
                .await
                .map_err(anyhow::Error::new)?;
            let key = match auth {
                AuthLevel::Anonymous => None,
                _ => KeyStore::open(&manifest.server.state_dir, &[])?
                    .find(&Scope::Master)
                    .map(|k| k.value),
            };
            (function, key)
        };
        let target_for = |addr| {
            let mut t = Target::new(addr, route);
            if let Some(key) = &key {
                t.headers.push((
                    hyper::header::HeaderName::from_static("x-kelvin-key"),
                    key.parse().expect("keys are printable ASCII"),
                ));
            }
            t
        };

        // Fresh servers: start-up, then the first request.
        let mut startup = Vec::new();
        let mut after_start = Vec::new();
        for _ in 0..self.cold_samples {
            let started = Instant::now();
            let server = Served::start(&manifest, !self.no_ledger).await?;
            startup.push(micros(started.elapsed()));
            after_start.push(checked(
                load::first_request(&target_for(server.addr)).await,
            )?);
            server.stop().await;
        }

        // One server: evict, then ask again; and the warm answer for scale.
        let server = Served::start(&manifest, !self.no_ledger).await?;
        let target = Arc::new(target_for(server.addr));
        let mut after_eviction = Vec::new();
        let mut warm = Vec::new();
        checked(load::first_request(&target).await)?;
        for _ in 0..self.cold_samples {
            server.runtime.registry().unload(&function, false);
            after_eviction.push(checked(load::first_request(&target).await)?);
            warm.push(checked(load::first_request(&target).await)?);
        }
        let steady = steady(&target, self).await;
        server.stop().await;
        Ok(HttpReport {
            startup: Summary::of(&startup),
            first_after_start: Summary::of(&after_start),
            first_after_eviction: Summary::of(&after_eviction),
            warm_new_connection: Summary::of(&warm),
            ..HttpReport::new(
                format!("GET {route} (in-process server, function `{function}`)"),
                Some(function),
                steady,
                self,
            )
        })
    }
}

/// Warms up, then measures steady load.
async fn steady(target: &Arc<Target>, cmd: &HttpCommand) -> LoadReport {
    if !cmd.warmup.is_zero() {
        load::run(target.clone(), cmd.connections, cmd.warmup).await;
    }
    load::run(target.clone(), cmd.connections, cmd.duration).await
}

fn checked(r: Result<(u16, u64), String>) -> Result<u64> {
    match r {
        Ok((status, us)) if (200..300).contains(&status) => Ok(us),
        Ok((status, _)) => bail!("the route answered {status}; benchmark a route that succeeds"),
        Err(e) => bail!("request failed: {e}"),
    }
}

/// An HTTP server running in this process, stopped on request.
struct Served {
    runtime: Arc<Runtime>,
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    /// What `kelvin up` does, on a loopback port of the system's choosing.
    async fn start(manifest: &Manifest, ledger: bool) -> Result<Served> {
        let runtime = Arc::new(Runtime::new(
            manifest.clone(),
            record_sinks(manifest, ledger)?.0,
        )?);
        runtime.registry().serve_tiered();
        let server = HttpServer::new(runtime.clone())?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.serve(listener, async {
            let _ = stopped.await;
        }));
        Ok(Served {
            runtime,
            addr,
            stop,
            task,
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

impl HttpReport {
    fn new(
        target: String,
        function: Option<String>,
        steady: LoadReport,
        cmd: &HttpCommand,
    ) -> Self {
        HttpReport {
            target,
            function,
            startup: None,
            first_after_start: None,
            first_after_eviction: None,
            warm_new_connection: None,
            warmup_s: cmd.warmup.as_secs_f64(),
            steady,
        }
    }

    fn text(&self) -> String {
        let s = &self.steady;
        let mut out = format!(
            "kelvin bench http: {}\n{} connection(s), {:.1} s after {:.1} s of warm-up\n\n",
            self.target, s.connections, s.duration_s, self.warmup_s
        );
        let mut rows = Vec::new();
        let mut row = |name: &str, summary: &Option<Summary>| {
            if let Some(x) = summary {
                rows.push(vec![
                    name.to_owned(),
                    x.n.to_string(),
                    human_us(x.p50),
                    human_us(x.p90),
                    human_us(x.p99),
                    human_us(x.max),
                ]);
            }
        };
        row("server start-up", &self.startup);
        row("first request after start", &self.first_after_start);
        row("first request after eviction", &self.first_after_eviction);
        row("warm request, new connection", &self.warm_new_connection);
        row("steady state (keep-alive)", &s.latency);
        out.push_str(&table(
            &["measurement", "n", "p50", "p90", "p99", "max"],
            &rows,
            1,
        ));
        let statuses: Vec<String> = s.status.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        out.push_str(&format!(
            "\nthroughput: {:.0} requests/s; responses {}; connection errors {}\n",
            s.requests_per_second,
            if statuses.is_empty() {
                "none".to_owned()
            } else {
                statuses.join(", ")
            },
            s.errors
        ));
        out
    }
}

/// The functions to measure: those named (checked), or all of them.
fn pick_functions(manifest: &Manifest, names: &[String]) -> Result<Vec<String>> {
    let known: Vec<&str> = manifest.functions.iter().map(|f| f.name.as_str()).collect();
    if names.is_empty() {
        return Ok(known.iter().map(|s| (*s).to_owned()).collect());
    }
    for name in names {
        if !known.contains(&name.as_str()) {
            bail!(
                "no function `{name}` in `{}` (it has: {})",
                manifest.path.display(),
                known.join(", ")
            );
        }
    }
    Ok(names.to_vec())
}

/// Points the manifest's state at a new temporary folder, deleted when the
/// returned guard drops.
fn scratch_state(manifest: &mut Manifest) -> Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new()
        .prefix("kelvin-bench-")
        .tempdir()
        .context("failed to create a scratch state folder")?;
    manifest.server.state_dir = dir.path().to_owned();
    Ok(dir)
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_file(path, text.as_bytes())
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("failed to write `{}`", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
