//! The `kelvin` CLI: one file per subcommand, shared flags flattened in.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::manifest::Manifest;

mod bench;
mod bill;
mod build;
mod check;
mod deploy;
mod durable;
mod events;
mod invoke;
mod keys;
mod ledger;
mod up;

pub use bench::BenchCommand;
pub use bill::BillCommand;
pub use build::BuildCommand;
pub use check::CheckCommand;
pub use deploy::{
    DeployCommand, RollbackCommand, SlotsCommand, SwapCommand, TrafficCommand, VersionsCommand,
};
pub use durable::DurableCommand;
pub use events::{BlobCommand, QueueCommand};
pub use invoke::InvokeCommand;
pub use keys::KeysCommand;
pub use ledger::LedgerCommand;
pub use up::UpCommand;

#[derive(Parser, Debug)]
#[command(
    name = "kelvin",
    version,
    about = "A scale-to-zero WebAssembly function runtime"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Up(UpCommand),
    Build(BuildCommand),
    Check(CheckCommand),
    Invoke(InvokeCommand),
    Keys(KeysCommand),
    Bill(BillCommand),
    Ledger(LedgerCommand),
    Bench(BenchCommand),
    Deploy(DeployCommand),
    Slots(SlotsCommand),
    Swap(SwapCommand),
    Rollback(RollbackCommand),
    Traffic(TrafficCommand),
    Versions(VersionsCommand),
    Queue(QueueCommand),
    Blob(BlobCommand),
    Durable(DurableCommand),
}

/// Rust ignores SIGPIPE, so `println!` to a closed pipe (`kelvin slots |
/// head`) panics. A command that only prints ends as other Unix tools do,
/// silently, when its reader goes; the server (`up`) and `bench`, which
/// hold sockets and child processes, keep ignoring it and see EPIPE.
fn quit_quietly_on_a_closed_pipe() {
    // SAFETY: resets one signal's disposition to the default; no handler
    // runs Rust code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

impl Cli {
    pub fn execute(self) -> Result<()> {
        if !matches!(self.command, Command::Up(_) | Command::Bench(_)) {
            quit_quietly_on_a_closed_pipe();
        }
        match self.command {
            Command::Up(c) => c.execute(),
            Command::Build(c) => c.execute(),
            Command::Check(c) => c.execute(),
            Command::Invoke(c) => c.execute(),
            Command::Keys(c) => c.execute(),
            Command::Bill(c) => c.execute(),
            Command::Ledger(c) => c.execute(),
            Command::Bench(c) => c.execute(),
            Command::Deploy(c) => c.execute(),
            Command::Slots(c) => c.execute(),
            Command::Swap(c) => c.execute(),
            Command::Rollback(c) => c.execute(),
            Command::Traffic(c) => c.execute(),
            Command::Versions(c) => c.execute(),
            Command::Queue(c) => c.execute(),
            Command::Blob(c) => c.execute(),
            Command::Durable(c) => c.execute(),
        }
    }
}

/// Flags every command that reads the manifest shares.
#[derive(clap::Args, Debug, Clone)]
pub struct ManifestArgs {
    /// The manifest to use.
    #[arg(
        global = true,
        short = 'f',
        long = "manifest",
        default_value = "functions.toml",
        env = "KELVIN_MANIFEST"
    )]
    pub manifest: PathBuf,
    /// Log format.
    #[arg(
        global = true,
        long,
        value_enum,
        default_value = "human",
        env = "KELVIN_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum LogFormat {
    Human,
    Json,
}

impl ManifestArgs {
    pub fn load(&self) -> Result<Manifest> {
        // The diagnostic already names the file, line and field.
        Manifest::load(&self.manifest).map_err(anyhow::Error::new)
    }

    /// Logs go to stderr; `RUST_LOG` filters them (default `info`).
    pub fn init_logging(&self) {
        self.init_logging_at("info");
    }

    /// Logs at `level` unless `RUST_LOG` says otherwise.
    pub fn init_logging_at(&self, level: &str) {
        self.init(level, false);
    }

    /// Logs for a server: written in batches by a background thread, so a
    /// request never waits for stderr (guests that log a line per request
    /// served 30% fewer requests otherwise). [`flush_logs`] writes what is
    /// pending; `main` calls it before exiting.
    pub fn init_serving_logs(&self) {
        self.init("info", true);
    }

    fn init(&self, level: &str, batched: bool) {
        use tracing_subscriber::fmt::writer::BoxMakeWriter;
        // wasmtime-wasi opens an INFO span, its arguments formatted, for
        // every preview-1 call a guest makes: 23% of a warm preview-1
        // request's cost, and nothing a user reads. `RUST_LOG` can bring
        // them back.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(format!("{level},wasmtime_wasi=warn,wiggle=warn"))
        });
        let writer = match batched.then(batched_stderr).flatten() {
            Some(log) => BoxMakeWriter::new(crate::batch::BatchedLog(log)),
            None => BoxMakeWriter::new(std::io::stderr),
        };
        // Colour only for a person at a terminal: never in files or pipes,
        // never when NO_COLOR is set (https://no-color.org), never in JSON.
        let colour = matches!(self.log_format, LogFormat::Human)
            && std::io::IsTerminal::is_terminal(&std::io::stderr())
            && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(colour)
            .with_writer(writer);
        let _ = match self.log_format {
            LogFormat::Human => builder.try_init(),
            LogFormat::Json => builder.json().try_init(),
        };
    }
}

static STDERR_BATCH: std::sync::OnceLock<Option<crate::batch::BatchWriter>> =
    std::sync::OnceLock::new();

fn batched_stderr() -> Option<&'static crate::batch::BatchWriter> {
    STDERR_BATCH
        .get_or_init(|| {
            let log = crate::batch::BatchWriter::spawn("kelvin-log", Box::new(std::io::stderr()));
            // The lines leading up to a panic are the ones worth reading.
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                flush_logs();
                previous(info);
            }));
            log.ok()
        })
        .as_ref()
}

/// Writes log lines still waiting in memory (a server's logs are batched).
pub fn flush_logs() {
    if let Some(Some(log)) = STDERR_BATCH.get() {
        log.flush();
    }
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")
}

/// Runs each distinct `build` command once, in the manifest's folder. A
/// command whose functions declare `watch` is skipped when the files it
/// matches and the functions' `source` files are what they were after its
/// last run (recorded in `<state_dir>/builds.json`).
fn run_builds(manifest: &Manifest) -> Result<()> {
    let dir = manifest
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let stamps_path = manifest.server.state_dir.join("builds.json");
    let mut stamps: std::collections::BTreeMap<String, BuildStamp> = std::fs::read(&stamps_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut commands: Vec<(&str, Vec<&crate::manifest::FunctionSpec>)> = Vec::new();
    for f in &manifest.functions {
        let Some(cmd) = f.build.as_deref() else {
            continue;
        };
        match commands.iter_mut().find(|(c, _)| *c == cmd) {
            Some((_, fs)) => fs.push(f),
            None => commands.push((cmd, vec![f])),
        }
    }
    let mut changed = false;
    let mut failed = None;
    for (cmd, functions) in commands {
        let names = functions
            .iter()
            .map(|f| format!("`{}`", f.name))
            .collect::<Vec<_>>()
            .join(", ");
        let mut watch: Vec<&str> = functions
            .iter()
            .flat_map(|f| f.watch.iter().map(String::as_str))
            .collect();
        watch.sort_unstable();
        watch.dedup();
        let sources: Vec<&Path> = functions.iter().map(|f| f.source.as_path()).collect();
        let key = blake3::hash(cmd.as_bytes()).to_hex()[..16].to_owned();
        if !watch.is_empty()
            && let Some(stamp) = stamps.get(&key)
            && stamp.inputs == watched_digest(&dir, cmd, &watch)?
            && stamp.outputs == outputs_digest(&sources)
        {
            eprintln!(
                "skipping the build of {names}: nothing it watches changed since it made its output"
            );
            continue;
        }
        eprintln!("building {names}: {cmd}");
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(&dir)
            .status()
            .with_context(|| format!("failed to run the build command of {names}: {cmd}"))?;
        if !status.success() {
            changed |= stamps.remove(&key).is_some();
            failed = Some(anyhow::anyhow!(
                "the build command of {names} failed ({status}): {cmd}"
            ));
            break;
        }
        if !watch.is_empty() {
            // Digested after the build: what it wrote among its inputs
            // counts as its own.
            stamps.insert(
                key,
                BuildStamp {
                    inputs: watched_digest(&dir, cmd, &watch)?,
                    outputs: outputs_digest(&sources),
                },
            );
            changed = true;
        }
    }
    if changed {
        // Best effort: without it the next build only runs again.
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(&manifest.server.state_dir)?;
            let tmp = stamps_path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&stamps)?)?;
            std::fs::rename(&tmp, &stamps_path)
        };
        if let Err(e) = write() {
            tracing::warn!(file = %stamps_path.display(), error = %e, "the build stamps could not be written");
        }
    }
    failed.map_or(Ok(()), Err)
}

/// What a build command's last run read and made.
#[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
struct BuildStamp {
    inputs: String,
    outputs: String,
}

/// The command and every file its `watch` patterns match (names and bytes).
fn watched_digest(dir: &Path, cmd: &str, patterns: &[&str]) -> Result<String> {
    let mut files = std::collections::BTreeSet::new();
    for p in patterns {
        let full = dir.join(p);
        let full = full.to_string_lossy();
        let paths = glob::glob(&full).with_context(|| format!("bad watch pattern {p:?}"))?;
        files.extend(paths.filter_map(Result::ok).filter(|p| p.is_file()));
    }
    let mut h = blake3::Hasher::new();
    h.update(cmd.as_bytes());
    for f in &files {
        h.update(b"\0");
        h.update(f.to_string_lossy().as_bytes());
        h.update(b"\0");
        let bytes =
            std::fs::read(f).with_context(|| format!("failed to read `{}`", f.display()))?;
        h.update(blake3::hash(&bytes).as_bytes());
    }
    Ok(h.finalize().to_hex().to_string())
}

/// The functions' wasm files as they are (a missing one digests as such).
fn outputs_digest(sources: &[&Path]) -> String {
    let mut h = blake3::Hasher::new();
    for s in sources {
        h.update(s.to_string_lossy().as_bytes());
        match std::fs::read(s) {
            Ok(bytes) => h.update(blake3::hash(&bytes).as_bytes()),
            Err(_) => h.update(b"missing"),
        };
    }
    h.finalize().to_hex().to_string()
}

/// Where a serving process's records go: the JSON-lines log, and the ledger
/// unless `ledger` is false. The ledger's database is opened either way: the
/// event stores live in it.
fn record_sinks(
    manifest: &Manifest,
    ledger: bool,
) -> Result<(
    std::sync::Arc<dyn crate::metering::RecordSink>,
    std::sync::Arc<crate::ledger::Ledger>,
)> {
    use crate::metering::{JsonLinesSink, RecordSink, Tee};
    use std::sync::Arc;
    let log = crate::runtime::Runtime::invocation_log_path(manifest);
    let json =
        JsonLinesSink::open(&log).with_context(|| format!("failed to open `{}`", log.display()))?;
    let mut sinks: Vec<Arc<dyn RecordSink>> = vec![Arc::new(json)];
    let path = crate::ledger::Ledger::path_in(&manifest.server.state_dir);
    let db = Arc::new(crate::ledger::Ledger::open(&path)?);
    if ledger {
        sinks.push(db.clone());
    } else {
        tracing::warn!("invocations are not written to the ledger");
    }
    Ok((Arc::new(Tee(sinks)), db))
}

/// The durable functions of a serving process, on the ledger's database
/// (started by the caller).
async fn open_durable(
    runtime: &std::sync::Arc<crate::runtime::Runtime>,
    db: &crate::ledger::Ledger,
    ledger: bool,
) -> Result<std::sync::Arc<crate::trigger::durable::DurableFunctions>> {
    let store = crate::durable::store::SqliteDurable::open(db.path(), db.writer(), ledger)
        .await
        .context("failed to open the durable store")?;
    Ok(crate::trigger::durable::DurableFunctions::new(
        runtime.clone(),
        std::sync::Arc::new(store),
    ))
}

/// The event triggers of a serving process, on the ledger's database and
/// the state dir's blob folder (started by the caller).
async fn open_events(
    runtime: &std::sync::Arc<crate::runtime::Runtime>,
    db: &crate::ledger::Ledger,
    ledger: bool,
) -> Result<std::sync::Arc<crate::trigger::events::Events>> {
    use std::sync::Arc;
    let store = crate::events::store::SqliteEvents::open(db.path(), db.writer(), ledger)
        .await
        .context("failed to open the event store")?;
    let state_dir = &runtime.manifest().server.state_dir;
    let blobs = crate::events::blobs::FsBlobs::in_state_dir(state_dir);
    // Blob inputs' copies from an earlier run: none is needed now, and
    // the ones in use are written again on demand.
    let inputs = crate::trigger::inputs::inputs_dir(state_dir);
    if let Err(e) = std::fs::remove_dir_all(&inputs)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(folder = %inputs.display(), error = %e, "old blob inputs could not be removed");
    }
    Ok(crate::trigger::events::Events::new(
        runtime.clone(),
        Arc::new(store),
        Arc::new(blobs),
    ))
}
