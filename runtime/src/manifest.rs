//! The `functions.toml` manifest: parsed with serde, then validated into
//! checked types in which no invalid state is representable.
//!
//! Every error names the file, the line and column, the field, and what to
//! write instead. The raw (serde) types are private; everything past
//! [`Manifest::load`] works with the checked ones.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::billing::{MemoryBasis, Policy};
use crate::keys::AuthLevel;
use crate::router::{Method, Route};
use crate::trigger::config::{
    BlobPattern, BlobTrigger, DurableName, DurableRole, HttpTrigger, InputBinding, InputSource,
    OutputBinding, OutputTarget, QueueName, QueueTrigger, Schedule, TimerTrigger, TriggerConfig,
};

/// The only manifest version this Kelvin understands.
pub const MANIFEST_VERSION: u32 = 1;

/// Paths Kelvin serves itself on the HTTP port; no function route may claim them.
pub const RESERVED_PATHS: &[&str] = &["/metrics", "/healthz", "/readyz", "/admin/bill"];

/// The deployment admin API: these paths and every path under them.
pub const ADMIN_API: &[&str] = &[
    "/admin/queues",
    "/admin/blobs",
    "/admin/wasm",
    "/admin/functions",
    "/admin/slots",
    "/admin/swap",
    "/admin/split",
    "/admin/history",
    "/admin/openapi.json",
    "/runtime/webhooks/durabletask",
];

/// Whether the deployment admin API owns `path`.
pub fn admin_api_owns(path: &str) -> bool {
    ADMIN_API.iter().any(|p| {
        path == *p
            || path
                .strip_prefix(p)
                .is_some_and(|rest| rest.starts_with('/'))
    })
}

/// A validated manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The file it was read from.
    pub path: PathBuf,
    /// The app's name.
    pub name: Name,
    /// Host-wide settings.
    pub server: ServerConfig,
    /// The functions, sorted by name.
    pub functions: Vec<FunctionSpec>,
    /// How `kelvin bill` prices the ledger.
    pub billing: Policy,
}

/// Host-wide settings (`[server]`).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address `kelvin up` listens on.
    pub listen: SocketAddr,
    /// More addresses, each serving one slot (`staging = "127.0.0.1:3001"`).
    pub slot_listen: Vec<(String, SocketAddr)>,
    /// Where compiled artifacts, keys and logs live.
    pub state_dir: PathBuf,
    /// At most this many functions stay loaded at once (LRU beyond).
    pub max_loaded: NonZeroU32,
    /// Loaded functions' estimated footprint stays under this (LRU beyond).
    pub memory_budget: u64,
    /// Largest request body accepted (413 beyond) and largest output kept.
    pub max_body: u64,
    /// Instance slots in the pooling allocator: the most invocations that can
    /// run at once across all functions.
    pub instance_slots: NonZeroU32,
    /// Largest request head (request line and headers); 431 beyond.
    pub max_header_size: u64,
    /// How long a client may take to send its request head.
    pub header_read_timeout: Duration,
    /// Open connections at most; more wait in the kernel's accept backlog.
    pub max_connections: NonZeroU32,
    /// How long in-flight requests may take to finish after shutdown begins.
    pub drain_timeout: Duration,
    /// How long a client may take to send a request's body (408 beyond).
    pub request_body_timeout: Duration,
    /// Request bodies held in memory at once, all connections together, in
    /// bytes (at least `max_body`).
    pub body_budget: u64,
    /// Who may read `/metrics`: anyone (functions only keys can call are
    /// hidden from callers without a host or master key), a host or master
    /// key, or the master key.
    pub metrics_auth: AuthLevel,
    /// Largest wasm a deploy may upload (413 beyond).
    pub max_upload: u64,
    /// Versions kept per function (besides those a slot points to).
    pub keep_versions: NonZeroU32,
    /// A path a swap first sends a GET to, on the slot swapped in.
    pub swap_warmup_path: Option<String>,
    /// The statuses that warm-up may answer (any below 500 if empty).
    pub swap_warmup_statuses: Vec<u16>,
    /// Largest queue message (413 beyond; 64 KiB, as Azure Storage queues).
    pub max_message: u64,
    /// Largest blob the API takes (413 beyond) and a trigger hands to a
    /// function (larger files dropped into a container are skipped).
    pub max_blob: u64,
}

/// One function, with every default already applied.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    pub name: Name,
    /// The `.wasm` file, resolved against the manifest's folder.
    pub source: PathBuf,
    /// A shell command that produces `source`, run from the manifest's folder.
    pub build: Option<String>,
    /// What `build` reads (glob patterns relative to the manifest's
    /// folder): when none of it changed and `source` is what the last
    /// build made, the build is skipped.
    pub watch: Vec<String>,
    pub triggers: Vec<TriggerConfig>,
    pub limits: Limits,
    /// App settings handed to the guest as environment variables.
    pub env: Vec<(String, String)>,
    /// Idle time after which the function is unloaded.
    pub keep_warm: Duration,
    pub concurrency: Concurrency,
    /// Where a wasi:http component may send requests; nowhere if empty.
    pub allowed_outbound_hosts: Vec<OutboundHost>,
    /// What a successful invocation publishes (queue messages, blobs,
    /// orchestrations started, events raised, entities signalled).
    pub outputs: Vec<OutputBinding>,
    /// What an HTTP invocation gets besides its request.
    pub inputs: Vec<InputBinding>,
    /// Folders of the host the guest reads, read-only, at paths of its own.
    pub files: Vec<FileMount>,
}

/// A host folder mounted read-only in the guest (`files = [{ source =
/// "model", destination = "/model" }]`), for both contracts: a function
/// opens `/model/iris.json` at request time. The folder is read where it
/// is, when the guest opens a file: its contents are not part of the
/// version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMount {
    /// The folder, resolved against the manifest's folder.
    pub source: PathBuf,
    /// Where the guest sees it: an absolute path, no trailing `/`.
    pub destination: String,
}

/// Mounts one function may have.
pub const MAX_FILE_MOUNTS: usize = 16;

/// A destination a component may call: `scheme://host[:port]`, where the
/// scheme, the host or the port may be `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundHost {
    scheme: Option<String>,
    host: Option<String>,
    port: Option<u16>,
}

impl OutboundHost {
    pub fn parse(s: &str) -> Result<OutboundHost, String> {
        let bad = || {
            format!(
                "invalid outbound host {s:?}; write `scheme://host[:port]`, e.g. \"https://api.example.com\" or \"http://127.0.0.1:8080\" (`*` matches any scheme, host or port)"
            )
        };
        let (scheme, rest) = s.split_once("://").ok_or_else(bad)?;
        let scheme = match scheme {
            "*" => None,
            "http" | "https" => Some(scheme.to_owned()),
            _ => return Err(bad()),
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, "*")) => (h, None),
            Some((h, p)) => (h, Some(p.parse::<u16>().map_err(|_| bad())?)),
            None => (
                rest,
                scheme
                    .as_deref()
                    .map(|s| if s == "https" { 443 } else { 80 }),
            ),
        };
        if host.is_empty() || host.contains(['/', '?', '#', '@']) {
            return Err(bad());
        }
        Ok(OutboundHost {
            scheme,
            host: (host != "*").then(|| host.to_ascii_lowercase()),
            port,
        })
    }

    /// Whether a request to `uri` may go out.
    pub fn allows(&self, uri: &hyper::Uri) -> bool {
        let scheme = uri.scheme_str().unwrap_or("https");
        let default_port = if scheme == "https" { 443 } else { 80 };
        self.scheme.as_deref().is_none_or(|s| s == scheme)
            && self
                .host
                .as_deref()
                .is_none_or(|h| uri.host().is_some_and(|u| u.eq_ignore_ascii_case(h)))
            && self
                .port
                .is_none_or(|p| uri.port_u16().unwrap_or(default_port) == p)
    }
}

/// What one invocation may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub timeout: Duration,
    /// Linear memory cap, in bytes (a multiple of the 64 KiB wasm page).
    pub memory: u64,
    /// Fuel (roughly, wasm instructions) per invocation, if metered.
    pub fuel: Option<NonZeroU64>,
}

/// Admission control: how many run at once, how many may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concurrency {
    pub max: NonZeroU32,
    /// Invocations allowed to wait for a slot; one more is rejected.
    pub queue: u32,
    /// How long one may wait before it is rejected.
    pub queue_timeout: Duration,
}

/// A validated app or function name: lowercase letters, digits, `-` and `_`,
/// starting with a letter, at most 64 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Name {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let ok_start = s.chars().next().is_some_and(|c| c.is_ascii_lowercase());
        let ok_chars = s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
        if ok_start && ok_chars && s.len() <= 64 {
            Ok(Name(s))
        } else {
            Err(format!(
                "invalid name {s:?}: use lowercase letters, digits, `-` and `_`, starting with a letter (at most 64 characters), e.g. \"hello-world\""
            ))
        }
    }
}

/// A manifest that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("failed to read manifest `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Box<Diagnostic>),
}

/// A located error in a manifest, rendered like a compiler diagnostic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the offending field, when known.
    pub field: Option<String>,
    pub message: String,
    /// The source line, for the caret display.
    pub snippet: String,
    pub width: usize,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if let Some(field) = &self.field {
            write!(f, "`{field}`: ")?;
        }
        writeln!(f, "{}", self.message)?;
        let gutter = self.line.to_string().len();
        writeln!(f, "{:gutter$} |", "")?;
        writeln!(f, "{} | {}", self.line, self.snippet)?;
        write!(
            f,
            "{:gutter$} | {}{}",
            "",
            " ".repeat(self.column.saturating_sub(1)),
            "^".repeat(self.width.max(1))
        )
    }
}

impl Manifest {
    /// Reads, parses and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        Manifest::parse(path, &text)
    }

    /// Parses and validates manifest text; `path` locates relative paths and
    /// names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Manifest, ManifestError> {
        let file = path.display().to_string();
        let located = |span: Option<Range<usize>>, field: Option<String>, message: String| {
            ManifestError::Invalid(Box::new(locate(&file, text, span, field, message)))
        };
        let raw: RawManifest = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_owned();
            let field = e
                .span()
                .and_then(|span| infer_field(text, span.start, &message));
            let hint = missing_field_hint(&message);
            located(e.span(), field, message + hint)
        })?;
        let dir = path
            .parent()
            .map(Path::to_owned)
            .unwrap_or_else(|| PathBuf::from("."));
        raw.validate(&dir, path)
            .map_err(|e| located(Some(e.span), Some(e.field), e.message))
    }

    /// The app's durable functions and their roles.
    pub fn durable_roles(&self) -> std::collections::BTreeMap<String, DurableRole> {
        self.functions
            .iter()
            .filter_map(|f| {
                f.triggers.iter().find_map(|t| match t {
                    TriggerConfig::Durable(role) => Some((f.name.to_string(), *role)),
                    _ => None,
                })
            })
            .collect()
    }

    /// Every queue the app names (triggers and outputs) and their poison
    /// queues: the queues the API knows.
    pub fn queues(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for f in &self.functions {
            let triggers = f.triggers.iter().filter_map(|t| match t {
                TriggerConfig::Queue(q) => Some(&q.queue),
                _ => None,
            });
            let outputs = f.outputs.iter().filter_map(|o| match &o.target {
                OutputTarget::Queue(q) => Some(q),
                _ => None,
            });
            for q in triggers.chain(outputs) {
                out.insert(q.to_string());
                out.insert(q.poison());
            }
        }
        out
    }

    /// Every blob container the app names (triggers, outputs and inputs).
    pub fn containers(&self) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        for f in &self.functions {
            for t in &f.triggers {
                if let TriggerConfig::Blob(b) = t {
                    out.insert(b.path.container().to_owned());
                }
            }
            for o in &f.outputs {
                if let OutputTarget::Blob(p) = &o.target {
                    out.insert(p.container().to_owned());
                }
            }
            for i in &f.inputs {
                if let InputSource::Blob(p) = &i.source {
                    out.insert(p.container().to_owned());
                }
            }
        }
        out
    }

    pub fn function(&self, name: &str) -> Option<&FunctionSpec> {
        self.functions.iter().find(|f| f.name.as_str() == name)
    }
}

fn locate(
    file: &str,
    text: &str,
    span: Option<Range<usize>>,
    field: Option<String>,
    message: String,
) -> Diagnostic {
    let span = span.unwrap_or(0..0);
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = text[..start].matches('\n').count() + 1;
    let column = text[line_start..start].chars().count() + 1;
    let snippet = text[line_start..line_end].trim_end_matches('\r').to_owned();
    let width = text[start..span.end.clamp(start, line_end)].chars().count();
    Diagnostic {
        file: file.to_owned(),
        line,
        column,
        field,
        message,
        snippet,
        width,
    }
}

/// The dotted path of the field at `offset`, from the table header above it
/// and the key on its line (serde's errors say what is wrong, not where in
/// the document's structure).
fn infer_field(text: &str, offset: usize, message: &str) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let header = |l: &str| {
        let l = l.trim();
        l.starts_with('[').then(|| {
            l.trim_matches(|c| c == '[' || c == ']')
                .replace('"', "")
                .trim()
                .to_owned()
        })
    };
    // The table the error is in: the header on this line or the last above.
    let table = header(line).or_else(|| text[..line_start].lines().rev().find_map(header));
    let join = |key: &str| match &table {
        Some(t) if !t.is_empty() => format!("{t}.{key}"),
        _ => key.to_owned(),
    };
    if let Some(missing) = message
        .strip_prefix("missing field `")
        .and_then(|m| m.split('`').next())
    {
        // Reported at the table that lacks it (or the document's start).
        return Some(if header(line).is_some() {
            join(missing)
        } else {
            missing.to_owned()
        });
    }
    if header(line).is_some() {
        return table;
    }
    let key = line.split('=').next()?.trim().trim_matches('"');
    (!key.is_empty()).then(|| join(key))
}

/// What to write when a required field is missing.
fn missing_field_hint(message: &str) -> &'static str {
    match message {
        "missing field `version`" => "; add `version = 1`",
        "missing field `name`" => "; add e.g. `name = \"my-app\"`",
        "missing field `source`" => {
            "; add e.g. `source = \"target/wasm32-wasip1/release/hello.wasm\"`"
        }
        "missing field `route`" => "; add e.g. `route = \"/hello\"`",
        _ => "",
    }
}

/// A validation error before it is located in the text.
struct FieldError {
    span: Range<usize>,
    field: String,
    message: String,
}

fn field_error(
    span: Range<usize>,
    field: impl Into<String>,
    message: impl Into<String>,
) -> FieldError {
    FieldError {
        span,
        field: field.into(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------
// Raw (serde) types. Strings that need checking stay `Spanned` so a
// validation error can point at them.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    version: Spanned<u32>,
    name: Spanned<String>,
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    functions: BTreeMap<Spanned<String>, RawFunction>,
    #[serde(default)]
    billing: RawBilling,
}

/// `[billing]`: a preset and overrides of any of its parameters.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBilling {
    policy: Option<Spanned<String>>,
    memory_basis: Option<MemoryBasis>,
    memory_step_mb: Option<Price>,
    min_memory_mb: Option<Price>,
    max_memory_mb: Option<Price>,
    min_duration_ms: Option<Price>,
    duration_step_ms: Option<Price>,
    price_per_gb_s: Option<Price>,
    price_per_million_executions: Option<Price>,
    price_per_million_cpu_ms: Option<Price>,
    free_gb_s_per_month: Option<Price>,
    free_executions_per_month: Option<Price>,
    free_cpu_ms_per_month: Option<Price>,
}

/// A non-negative decimal written as a string, so no float rounding ever
/// touches a price.
#[derive(Clone, Copy)]
struct Price(rust_decimal::Decimal);

impl<'de> Deserialize<'de> for Price {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "write decimals as strings, e.g. \"0.000016\" (a TOML float would round)",
            )
        })?;
        match s.parse::<rust_decimal::Decimal>() {
            Ok(v) if !v.is_sign_negative() => Ok(Price(v)),
            _ => Err(serde::de::Error::custom(format!(
                "invalid decimal {s:?}; write a non-negative number as a string, e.g. \"0.20\""
            ))),
        }
    }
}

impl RawBilling {
    fn validate(self) -> Result<Policy, FieldError> {
        let mut policy = match &self.policy {
            None => Policy::preset("azure-consumption").expect("a preset"),
            Some(name) => Policy::preset(name.get_ref()).ok_or_else(|| {
                field_error(
                    name.span(),
                    "billing.policy",
                    format!(
                        "unknown billing policy {:?}; use one of {}",
                        name.get_ref(),
                        crate::billing::PRESETS.join(", ")
                    ),
                )
            })?,
        };
        if let Some(b) = self.memory_basis {
            policy.memory_basis = b;
        }
        let set = |field: &mut rust_decimal::Decimal, v: Option<Price>| {
            if let Some(p) = v {
                *field = p.0;
            }
        };
        set(&mut policy.memory_step_mb, self.memory_step_mb);
        set(&mut policy.min_memory_mb, self.min_memory_mb);
        set(&mut policy.min_duration_ms, self.min_duration_ms);
        set(&mut policy.duration_step_ms, self.duration_step_ms);
        set(&mut policy.price_per_gb_s, self.price_per_gb_s);
        set(
            &mut policy.price_per_million_executions,
            self.price_per_million_executions,
        );
        set(
            &mut policy.price_per_million_cpu_ms,
            self.price_per_million_cpu_ms,
        );
        set(&mut policy.free_gb_s_per_month, self.free_gb_s_per_month);
        set(
            &mut policy.free_executions_per_month,
            self.free_executions_per_month,
        );
        set(
            &mut policy.free_cpu_ms_per_month,
            self.free_cpu_ms_per_month,
        );
        if let Some(max) = self.max_memory_mb {
            policy.max_memory_mb = Some(max.0);
        }
        Ok(policy)
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<String>>,
    slot_listen: Option<std::collections::BTreeMap<String, Spanned<String>>>,
    state_dir: Option<String>,
    max_loaded: Option<Spanned<u32>>,
    memory_budget: Option<Spanned<Size>>,
    max_body: Option<Spanned<Size>>,
    instance_slots: Option<Spanned<u32>>,
    max_header_size: Option<Spanned<Size>>,
    header_read_timeout: Option<Spanned<HumanDuration>>,
    max_connections: Option<Spanned<u32>>,
    drain_timeout: Option<HumanDuration>,
    request_body_timeout: Option<Spanned<HumanDuration>>,
    body_budget: Option<Spanned<Size>>,
    metrics_auth: Option<AuthLevel>,
    max_upload: Option<Spanned<Size>>,
    keep_versions: Option<Spanned<u32>>,
    swap_warmup_path: Option<Spanned<String>>,
    swap_warmup_statuses: Option<Spanned<Vec<u16>>>,
    max_message: Option<Spanned<Size>>,
    max_blob: Option<Spanned<Size>>,
}

/// Settings every function inherits unless it sets its own
/// (like `host.json`'s `functionTimeout`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    timeout: Option<Spanned<HumanDuration>>,
    memory: Option<Spanned<Size>>,
    fuel: Option<Spanned<u64>>,
    keep_warm: Option<Spanned<HumanDuration>>,
    max_concurrency: Option<Spanned<u32>>,
    queue: Option<u32>,
    queue_timeout: Option<Spanned<HumanDuration>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    source: Spanned<String>,
    build: Option<String>,
    watch: Option<Spanned<Vec<Spanned<String>>>>,
    timeout: Option<Spanned<HumanDuration>>,
    memory: Option<Spanned<Size>>,
    fuel: Option<Spanned<u64>>,
    keep_warm: Option<Spanned<HumanDuration>>,
    max_concurrency: Option<Spanned<u32>>,
    queue: Option<u32>,
    queue_timeout: Option<Spanned<HumanDuration>>,
    #[serde(default)]
    env: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    allowed_outbound_hosts: Vec<Spanned<String>>,
    #[serde(default)]
    http: Vec<RawHttpTrigger>,
    #[serde(default)]
    timer: Vec<RawTimerTrigger>,
    #[serde(default)]
    queue_trigger: Vec<RawQueueTrigger>,
    #[serde(default)]
    blob: Vec<RawBlobTrigger>,
    #[serde(default)]
    output: Vec<RawOutput>,
    #[serde(default)]
    input: Vec<RawInput>,
    files: Option<Spanned<Vec<RawFileMount>>>,
    durable: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFileMount {
    source: Spanned<String>,
    destination: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimerTrigger {
    schedule: Spanned<String>,
    time_zone: Option<Spanned<String>>,
    #[serde(default)]
    run_on_startup: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueueTrigger {
    name: Spanned<String>,
    batch_size: Option<Spanned<u32>>,
    new_batch_threshold: Option<u32>,
    max_dequeue_count: Option<Spanned<u32>>,
    lease: Option<Spanned<HumanDuration>>,
    retry_delay: Option<HumanDuration>,
    max_retry_delay: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlobTrigger {
    path: Spanned<String>,
    max_attempts: Option<Spanned<u32>>,
    retry_delay: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutput {
    name: Spanned<String>,
    queue: Option<Spanned<String>>,
    blob: Option<Spanned<String>>,
    orchestration: Option<Spanned<String>>,
    raise_event: Option<Spanned<String>>,
    entity: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInput {
    name: Spanned<String>,
    instance: Option<Spanned<String>>,
    blob: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpTrigger {
    route: Spanned<String>,
    #[serde(default)]
    methods: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    auth: AuthLevel,
}

/// A duration written as a human string: `"30s"`, `"500ms"`, `"5m"`.
#[derive(Clone, Copy)]
struct HumanDuration(Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a duration as a string with a unit, e.g. \"30s\", \"500ms\" or \"5m\"",
            )
        })?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {s:?} ({e}); write e.g. \"30s\", \"500ms\" or \"5m\""
                ))
            })
    }
}

/// A size written as a human string: `"128MiB"`, `"1GiB"`, `"512KiB"`.
#[derive(Clone, Copy)]
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a size as a string with a unit, e.g. \"128MiB\" or \"1GiB\"",
            )
        })?;
        // A bare number is ambiguous (bytes? pages? MB?), so a unit is required.
        let has_unit = s
            .trim()
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphabetic());
        match s.parse::<bytesize::ByteSize>() {
            Ok(size) if has_unit => Ok(Size(size.as_u64())),
            _ => Err(serde::de::Error::custom(format!(
                "invalid size {s:?}; write a number and a unit, e.g. \"128MiB\", \"1GiB\" or \"512KiB\""
            ))),
        }
    }
}

const WASM_PAGE: u64 = 64 * 1024;
/// wasm32 linear memory cannot exceed 4 GiB.
const MAX_MEMORY: u64 = 4 * 1024 * 1024 * 1024;

impl RawManifest {
    fn validate(self, dir: &Path, path: &Path) -> Result<Manifest, FieldError> {
        if *self.version.get_ref() != MANIFEST_VERSION {
            return Err(field_error(
                self.version.span(),
                "version",
                format!(
                    "unsupported manifest version {}; this Kelvin reads version = {MANIFEST_VERSION}",
                    self.version.get_ref()
                ),
            ));
        }
        let name = Name::try_from(self.name.get_ref().clone())
            .map_err(|m| field_error(self.name.span(), "name", m))?;
        let server = self.server.validate(dir)?;
        let defaults = self.defaults;

        let mut functions = Vec::with_capacity(self.functions.len());
        for (key, raw) in self.functions {
            functions.push(raw.validate(key, &defaults, dir)?);
        }
        check_routes(&functions)?;
        check_durable_outputs(&functions)?;
        let billing = self.billing.validate()?;
        Ok(Manifest {
            billing,
            path: path.to_owned(),
            name,
            server,
            functions,
        })
    }
}

/// Route conflicts are checked on validated routes, which keep their spans.
/// Outputs that start orchestrations or signal entities name durable
/// functions of the app in that role.
fn check_durable_outputs(functions: &[FunctionSpec]) -> Result<(), FieldError> {
    let role = |name: &str| {
        functions
            .iter()
            .find(|f| f.name.as_str() == name)
            .and_then(|f| {
                f.triggers.iter().find_map(|t| match t {
                    TriggerConfig::Durable(r) => Some(*r),
                    _ => None,
                })
            })
    };
    for f in functions {
        for o in &f.outputs {
            let (target, want, field) = match &o.target {
                OutputTarget::Orchestration(n) => (n, DurableRole::Orchestrator, "orchestration"),
                OutputTarget::Entity(n) => (n, DurableRole::Entity, "entity"),
                _ => continue,
            };
            if role(&target.name) != Some(want) {
                return Err(field_error(
                    target.span.clone(),
                    format!("functions.{}.output.{field}", f.name),
                    format!(
                        "no function {:?} with `durable = \"{}\"` in this app",
                        target.name,
                        want.as_str()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Input bindings: an instance's status by a route parameter, for HTTP
/// functions.
fn validate_inputs(
    raw: Vec<RawInput>,
    triggers: &[TriggerConfig],
    at: &str,
) -> Result<Vec<InputBinding>, FieldError> {
    let mut inputs: Vec<InputBinding> = Vec::with_capacity(raw.len());
    for i in raw {
        let name = i.name.get_ref();
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid || inputs.iter().any(|b| b.name == *name) {
            return Err(field_error(
                i.name.span(),
                format!("{at}.name"),
                "an input's name uses letters, digits, `_` and `-`, and is unique",
            ));
        }
        let source = match (&i.instance, &i.blob) {
            (Some(instance), None) => {
                InputSource::Instance(validate_instance_input(instance, triggers, at, &i.name)?)
            }
            (None, Some(blob)) => InputSource::Blob(validate_blob_input(blob, triggers, at)?),
            _ => {
                return Err(field_error(
                    i.name.span(),
                    at,
                    "an input needs exactly one of `instance = \"{id}\"` (a durable instance's status) or `blob = \"container/name\"` (a blob, as the file /inputs/<name>)",
                ));
            }
        };
        inputs.push(InputBinding {
            name: name.clone(),
            source,
        });
    }
    Ok(inputs)
}

/// A durable status input: for HTTP functions, its instance id a pattern
/// of every route's parameters.
fn validate_instance_input(
    instance: &Spanned<String>,
    triggers: &[TriggerConfig],
    at: &str,
    name: &Spanned<String>,
) -> Result<BlobPattern, FieldError> {
    let routes: Vec<&HttpTrigger> = triggers.iter().filter_map(TriggerConfig::http).collect();
    if routes.is_empty() {
        return Err(field_error(
            name.span(),
            at,
            "instance inputs are for HTTP functions: the instance id comes from a route parameter",
        ));
    }
    let pattern = BlobPattern::parse(&format!("x/{}", instance.get_ref()))
        .map_err(|m| field_error(instance.span(), format!("{at}.instance"), m))?;
    for p in pattern.params() {
        if let Some(r) = routes.iter().find(|r| !r.route.params().any(|rp| rp == p)) {
            return Err(field_error(
                instance.span(),
                format!("{at}.instance"),
                format!(
                    "{{{p}}} is not a parameter of the route {:?}",
                    r.route.pattern()
                ),
            ));
        }
    }
    Ok(pattern)
}

/// A blob input: `container/name`, its parameters given by every trigger
/// of the function (a route's, a blob trigger's; queues and timers give
/// none).
fn validate_blob_input(
    blob: &Spanned<String>,
    triggers: &[TriggerConfig],
    at: &str,
) -> Result<BlobPattern, FieldError> {
    let field = format!("{at}.blob");
    let pattern =
        BlobPattern::parse(blob.get_ref()).map_err(|m| field_error(blob.span(), &field, m))?;
    for t in triggers {
        let given: Vec<&str> = match t {
            TriggerConfig::Http(h) => h.route.params().collect(),
            TriggerConfig::Blob(b) => b.path.params().collect(),
            TriggerConfig::Queue(_) | TriggerConfig::Timer(_) => Vec::new(),
            TriggerConfig::Durable(_) => {
                return Err(field_error(
                    blob.span(),
                    &field,
                    "a durable function gets its inputs from its orchestration, not from input bindings",
                ));
            }
        };
        if let Some(p) = pattern.params().find(|p| !given.contains(p)) {
            return Err(field_error(
                blob.span(),
                &field,
                format!(
                    "{{{p}}} is not a parameter of the function's {} trigger",
                    t.kind()
                ),
            ));
        }
    }
    Ok(pattern)
}

fn check_routes(functions: &[FunctionSpec]) -> Result<(), FieldError> {
    let mut seen: Vec<(&HttpTrigger, &Name)> = Vec::new();
    for f in functions {
        for trigger in &f.triggers {
            let Some(http) = trigger.http() else {
                continue;
            };
            let pattern = http.route.pattern();
            if RESERVED_PATHS.contains(&pattern) || admin_api_owns(pattern) {
                return Err(field_error(
                    http.span.clone(),
                    format!("functions.{}.http.route", f.name),
                    format!(
                        "route {:?} is reserved by Kelvin (it serves {} and the deployment API under {} itself); choose another path",
                        http.route.pattern(),
                        RESERVED_PATHS.join(", "),
                        ADMIN_API.join(", ")
                    ),
                ));
            }
            for (other, other_name) in &seen {
                if http.route.same_shape(&other.route) && http.methods.overlaps(other.methods) {
                    return Err(field_error(
                        http.span.clone(),
                        format!("functions.{}.http.route", f.name),
                        format!(
                            "route {:?} conflicts with route {:?} of function `{other_name}` (same path shape and overlapping methods); make the paths differ or split the methods",
                            http.route.pattern(),
                            other.route.pattern()
                        ),
                    ));
                }
            }
            seen.push((http, &f.name));
        }
    }
    Ok(())
}

impl RawServer {
    fn validate(self, dir: &Path) -> Result<ServerConfig, FieldError> {
        let address = |s: &Spanned<String>, field: &str| {
            s.get_ref().parse::<SocketAddr>().map_err(|_| {
                field_error(
                    s.span(),
                    field,
                    format!(
                        "invalid listen address {:?}; write an IP and a port, e.g. \"127.0.0.1:3000\" or \"0.0.0.0:8080\"",
                        s.get_ref()
                    ),
                )
            })
        };
        let listen = match &self.listen {
            None => SocketAddr::from(([127, 0, 0, 1], 3000)),
            Some(s) => address(s, "server.listen")?,
        };
        let mut slot_listen = Vec::new();
        for (slot, addr) in self.slot_listen.iter().flatten() {
            let field = format!("server.slot_listen.{slot}");
            if Name::try_from(slot.clone()).is_err() {
                return Err(field_error(
                    addr.span(),
                    &field,
                    "a slot name is lowercase letters, digits, `-` and `_`, starting with a letter",
                ));
            }
            slot_listen.push((slot.clone(), address(addr, &field)?));
        }
        let positive = |v: Option<Spanned<u32>>, field: &str, default: u32| match v {
            None => Ok(NonZeroU32::new(default).expect("defaults are non-zero")),
            Some(s) => NonZeroU32::new(*s.get_ref())
                .ok_or_else(|| field_error(s.span(), field, "must be at least 1")),
        };
        let max_body = nonzero_size(self.max_body, "server.max_body", 16 << 20)?;
        let body_budget = match self.body_budget {
            None => max_body.max(256 << 20),
            Some(s) if s.get_ref().0 < max_body => {
                return Err(field_error(
                    s.span(),
                    "server.body_budget",
                    "must be at least server.max_body (one body must fit)",
                ));
            }
            Some(s) => s.get_ref().0,
        };
        let request_body_timeout = nonzero_duration(
            self.request_body_timeout,
            "server.request_body_timeout",
            Duration::from_secs(30),
        )?;
        Ok(ServerConfig {
            listen,
            slot_listen,
            state_dir: dir.join(self.state_dir.as_deref().unwrap_or(".kelvin")),
            max_loaded: positive(self.max_loaded, "server.max_loaded", 100)?,
            memory_budget: nonzero_size(self.memory_budget, "server.memory_budget", 2 << 30)?,
            max_body,
            max_upload: nonzero_size(self.max_upload, "server.max_upload", 256 << 20)?,
            keep_versions: positive(self.keep_versions, "server.keep_versions", 10)?,
            swap_warmup_path: match self.swap_warmup_path {
                None => None,
                Some(p)
                    if !p.get_ref().starts_with('/')
                        || p.get_ref().contains(char::is_whitespace) =>
                {
                    return Err(field_error(
                        p.span(),
                        "server.swap_warmup_path",
                        "must be a path starting with `/`, e.g. \"/health\"",
                    ));
                }
                Some(p) => Some(p.into_inner()),
            },
            swap_warmup_statuses: match self.swap_warmup_statuses {
                None => Vec::new(),
                Some(s) if s.get_ref().iter().any(|c| !(100..=599).contains(c)) => {
                    return Err(field_error(
                        s.span(),
                        "server.swap_warmup_statuses",
                        "statuses are 100 to 599, e.g. [200, 202]",
                    ));
                }
                Some(s) => s.into_inner(),
            },
            max_message: nonzero_size(self.max_message, "server.max_message", 64 << 10)?,
            max_blob: nonzero_size(self.max_blob, "server.max_blob", 64 << 20)?,
            instance_slots: positive(self.instance_slots, "server.instance_slots", 256)?,
            max_header_size: match self.max_header_size {
                None => 16 << 10,
                // hyper cannot buffer less than 8 KiB of request head.
                Some(s) if s.get_ref().0 < 8 << 10 => {
                    return Err(field_error(
                        s.span(),
                        "server.max_header_size",
                        "must be at least 8KiB",
                    ));
                }
                Some(s) => s.get_ref().0,
            },
            header_read_timeout: nonzero_duration(
                self.header_read_timeout,
                "server.header_read_timeout",
                Duration::from_secs(10),
            )?,
            max_connections: positive(self.max_connections, "server.max_connections", 1024)?,
            drain_timeout: self.drain_timeout.map_or(Duration::from_secs(30), |d| d.0),
            request_body_timeout,
            body_budget,
            metrics_auth: self.metrics_auth.unwrap_or(AuthLevel::Anonymous),
        })
    }
}

fn nonzero_size(v: Option<Spanned<Size>>, field: &str, default: u64) -> Result<u64, FieldError> {
    match v {
        None => Ok(default),
        Some(s) if s.get_ref().0 == 0 => {
            Err(field_error(s.span(), field, "must be larger than zero"))
        }
        Some(s) => Ok(s.get_ref().0),
    }
}

fn nonzero_duration(
    v: Option<Spanned<HumanDuration>>,
    field: &str,
    default: Duration,
) -> Result<Duration, FieldError> {
    match v {
        None => Ok(default),
        Some(s) if s.get_ref().0.is_zero() => Err(field_error(
            s.span(),
            field,
            format!(
                "must be longer than zero, e.g. \"{}\"",
                humantime::format_duration(default)
            ),
        )),
        Some(s) => Ok(s.get_ref().0),
    }
}

impl RawFunction {
    fn validate(
        self,
        key: Spanned<String>,
        defaults: &RawDefaults,
        dir: &Path,
    ) -> Result<FunctionSpec, FieldError> {
        let name = Name::try_from(key.get_ref().clone())
            .map_err(|m| field_error(key.span(), format!("functions.{}", key.get_ref()), m))?;
        let at = |field: &str| format!("functions.{name}.{field}");
        // A bad inherited value is reported where it is written.
        let from = |own: bool, field: &str| {
            if own {
                at(field)
            } else {
                format!("defaults.{field}")
            }
        };

        if self.source.get_ref().trim().is_empty() {
            return Err(field_error(
                self.source.span(),
                at("source"),
                "must name a .wasm file, e.g. \"target/wasm32-wasip1/release/hello.wasm\"",
            ));
        }
        let source = dir.join(self.source.get_ref());

        let timeout = pick(&self.timeout, &defaults.timeout)
            .map_or(Duration::from_secs(30), |d| d.get_ref().0);
        if timeout.is_zero() {
            let span = pick(&self.timeout, &defaults.timeout)
                .map(Spanned::span)
                .unwrap_or_default();
            return Err(field_error(
                span,
                from(self.timeout.is_some(), "timeout"),
                "must be longer than zero, e.g. \"30s\"",
            ));
        }
        let memory = match pick(&self.memory, &defaults.memory) {
            None => 128 << 20,
            Some(s) => {
                let bytes = s.get_ref().0;
                if !(WASM_PAGE..=MAX_MEMORY).contains(&bytes) {
                    return Err(field_error(
                        s.span(),
                        from(self.memory.is_some(), "memory"),
                        "must be between 64KiB (one wasm page) and 4GiB (the wasm32 maximum)",
                    ));
                }
                // Linear memory grows in whole pages; round down so the cap is exact.
                bytes / WASM_PAGE * WASM_PAGE
            }
        };
        let fuel = match pick(&self.fuel, &defaults.fuel) {
            None => None,
            Some(s) => Some(NonZeroU64::new(*s.get_ref()).ok_or_else(|| {
                field_error(
                    s.span(),
                    from(self.fuel.is_some(), "fuel"),
                    "must be at least 1 (omit it to turn fuel metering off)",
                )
            })?),
        };
        let keep_warm = pick(&self.keep_warm, &defaults.keep_warm)
            .map_or(Duration::from_secs(600), |d| d.get_ref().0);
        let max = match pick(&self.max_concurrency, &defaults.max_concurrency) {
            None => NonZeroU32::new(64).expect("non-zero"),
            Some(s) => NonZeroU32::new(*s.get_ref()).ok_or_else(|| {
                field_error(
                    s.span(),
                    from(self.max_concurrency.is_some(), "max_concurrency"),
                    "must be at least 1",
                )
            })?,
        };
        let queue = self
            .queue
            .or(defaults.queue)
            .unwrap_or(max.get().saturating_mul(4));
        let queue_timeout = pick(&self.queue_timeout, &defaults.queue_timeout)
            .map_or(Duration::from_secs(30), |d| d.get_ref().0);

        let mut env = Vec::with_capacity(self.env.len());
        for (k, v) in self.env {
            let valid = k
                .get_ref()
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.get_ref()
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(field_error(
                    k.span(),
                    at(&format!("env.{}", k.get_ref())),
                    "environment variable names use letters, digits and `_`, not starting with a digit",
                ));
            }
            if k.get_ref().starts_with("KELVIN_") {
                return Err(field_error(
                    k.span(),
                    at(&format!("env.{}", k.get_ref())),
                    "names starting with KELVIN_ are set by Kelvin itself; choose another name",
                ));
            }
            env.push((k.into_inner(), v));
        }

        let mut allowed_outbound_hosts = Vec::with_capacity(self.allowed_outbound_hosts.len());
        for h in &self.allowed_outbound_hosts {
            allowed_outbound_hosts.push(
                OutboundHost::parse(h.get_ref())
                    .map_err(|m| field_error(h.span(), at("allowed_outbound_hosts"), m))?,
            );
        }

        let mut triggers = Vec::with_capacity(self.http.len());
        for raw in self.http {
            triggers.push(TriggerConfig::Http(raw.validate(&at("http"))?));
        }
        for raw in self.timer {
            triggers.push(TriggerConfig::Timer(Box::new(raw.validate(&at("timer"))?)));
        }
        for raw in self.queue_trigger {
            triggers.push(TriggerConfig::Queue(raw.validate(&at("queue_trigger"))?));
        }
        for raw in self.blob {
            triggers.push(TriggerConfig::Blob(raw.validate(&at("blob"))?));
        }
        if let Some(role) = &self.durable {
            let parsed = DurableRole::parse(role.get_ref())
                .map_err(|m| field_error(role.span(), at("durable"), m))?;
            if !triggers.is_empty() || !self.output.is_empty() {
                return Err(field_error(
                    role.span(),
                    at("durable"),
                    format!(
                        "a durable {} has no other trigger and no outputs: Kelvin alone invokes it (docs/durable.md)",
                        parsed.as_str()
                    ),
                ));
            }
            triggers.push(TriggerConfig::Durable(parsed));
        }
        let outputs = validate_outputs(self.output, &triggers, &at("output"))?;
        let inputs = validate_inputs(self.input, &triggers, &at("input"))?;
        let files = validate_files(self.files, dir, &at("files"))?;
        let mut watch = Vec::new();
        if let Some(patterns) = self.watch {
            if self.build.is_none() {
                return Err(field_error(
                    patterns.span(),
                    at("watch"),
                    "`watch` lists what `build` reads; this function has no `build`",
                ));
            }
            for p in patterns.into_inner() {
                if let Err(e) = glob::Pattern::new(p.get_ref()) {
                    return Err(field_error(
                        p.span(),
                        at("watch"),
                        format!("not a glob pattern ({e}); e.g. \"src/**/*.py\""),
                    ));
                }
                watch.push(p.into_inner());
            }
        }

        Ok(FunctionSpec {
            name,
            source,
            build: self.build,
            watch,
            triggers,
            limits: Limits {
                timeout,
                memory,
                fuel,
            },
            env,
            keep_warm,
            concurrency: Concurrency {
                max,
                queue,
                queue_timeout,
            },
            allowed_outbound_hosts,
            outputs,
            inputs,
            files,
        })
    }
}

/// Checks `files`: each source an existing folder, each destination an
/// absolute path of plain segments, none twice.
fn validate_files(
    raw: Option<Spanned<Vec<RawFileMount>>>,
    dir: &Path,
    at: &str,
) -> Result<Vec<FileMount>, FieldError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let span = raw.span();
    let raw = raw.into_inner();
    if raw.len() > MAX_FILE_MOUNTS {
        return Err(field_error(
            span,
            at,
            format!("at most {MAX_FILE_MOUNTS} mounts; mount a common parent folder instead"),
        ));
    }
    let mut files: Vec<FileMount> = Vec::with_capacity(raw.len());
    for m in raw {
        let text = m.destination.get_ref();
        let trimmed = text.trim_end_matches('/');
        let plain = trimmed.strip_prefix('/').is_some_and(|rest| {
            rest.split('/')
                .all(|seg| !seg.is_empty() && seg != "." && seg != ".." && !seg.contains('\\'))
        });
        if !plain {
            return Err(field_error(
                m.destination.span(),
                format!("{at}.destination"),
                "must be an absolute path of plain segments, e.g. \"/model\" (not `/`, no `.` or `..`)",
            ));
        }
        let source = dir.join(m.source.get_ref());
        if m.source.get_ref().trim().is_empty() || !source.is_dir() {
            return Err(field_error(
                m.source.span(),
                format!("{at}.source"),
                format!(
                    "{} is not a folder; `files` mounts folders (put a single file in one), relative to the manifest's folder",
                    source.display()
                ),
            ));
        }
        if files.iter().any(|f| f.destination == trimmed) {
            return Err(field_error(
                m.destination.span(),
                format!("{at}.destination"),
                format!("{trimmed:?} is mounted twice"),
            ));
        }
        files.push(FileMount {
            source,
            destination: trimmed.to_owned(),
        });
    }
    Ok(files)
}

impl RawTimerTrigger {
    fn validate(self, at: &str) -> Result<TimerTrigger, FieldError> {
        let zone = self.time_zone.as_ref().map(|z| z.get_ref().as_str());
        let schedule =
            Schedule::parse(self.schedule.get_ref(), zone).map_err(|m| match &self.time_zone {
                Some(z) if m.starts_with("unknown time zone") => {
                    field_error(z.span(), format!("{at}.time_zone"), m)
                }
                _ => field_error(self.schedule.span(), format!("{at}.schedule"), m),
            })?;
        Ok(TimerTrigger {
            schedule,
            run_on_startup: self.run_on_startup,
        })
    }
}

impl RawQueueTrigger {
    fn validate(self, at: &str) -> Result<QueueTrigger, FieldError> {
        let queue = QueueName::parse(self.name.get_ref())
            .map_err(|m| field_error(self.name.span(), format!("{at}.name"), m))?;
        let batch_size = match self.batch_size {
            None => 16,
            Some(b) if (1..=32).contains(b.get_ref()) => *b.get_ref(),
            Some(b) => {
                return Err(field_error(
                    b.span(),
                    format!("{at}.batch_size"),
                    "must be 1 to 32 (Azure's range; the default is 16)",
                ));
            }
        };
        let max_dequeue_count = match self.max_dequeue_count {
            None => 5,
            Some(m) if *m.get_ref() >= 1 => *m.get_ref(),
            Some(m) => {
                return Err(field_error(
                    m.span(),
                    format!("{at}.max_dequeue_count"),
                    "must be at least 1 (the default is 5)",
                ));
            }
        };
        let lease = match self.lease {
            None => Duration::from_secs(30),
            Some(l) if l.get_ref().0 >= Duration::from_secs(1) => l.get_ref().0,
            Some(l) => {
                return Err(field_error(
                    l.span(),
                    format!("{at}.lease"),
                    "must be at least 1s (it is renewed at half its length while the function runs)",
                ));
            }
        };
        let retry_delay = self.retry_delay.map_or(Duration::from_secs(1), |d| d.0);
        let max_retry_delay = self
            .max_retry_delay
            .map_or(Duration::from_secs(60), |d| d.0)
            .max(retry_delay);
        Ok(QueueTrigger {
            queue,
            batch_size,
            new_batch_threshold: self.new_batch_threshold.unwrap_or(batch_size / 2),
            max_dequeue_count,
            lease,
            retry_delay,
            max_retry_delay,
        })
    }
}

impl RawBlobTrigger {
    fn validate(self, at: &str) -> Result<BlobTrigger, FieldError> {
        let path = BlobPattern::parse(self.path.get_ref())
            .map_err(|m| field_error(self.path.span(), format!("{at}.path"), m))?;
        if path.params().next().is_none() {
            return Err(field_error(
                self.path.span(),
                format!("{at}.path"),
                format!(
                    "{:?} has no parameter, so it matches one blob only; write e.g. \"{}/{{name}}\"",
                    path.as_str(),
                    path.container()
                ),
            ));
        }
        let max_attempts = match self.max_attempts {
            None => 5,
            Some(m) if *m.get_ref() >= 1 => *m.get_ref(),
            Some(m) => {
                return Err(field_error(
                    m.span(),
                    format!("{at}.max_attempts"),
                    "must be at least 1 (the default is 5)",
                ));
            }
        };
        Ok(BlobTrigger {
            path,
            max_attempts,
            retry_delay: self.retry_delay.map_or(Duration::from_secs(1), |d| d.0),
        })
    }
}

/// Parameters every output path may use, whatever the trigger.
pub const OUTPUT_PARAMS: &[&str] = &["invocation_id"];

fn validate_outputs(
    raw: Vec<RawOutput>,
    triggers: &[TriggerConfig],
    at: &str,
) -> Result<Vec<OutputBinding>, FieldError> {
    let mut outputs: Vec<OutputBinding> = Vec::with_capacity(raw.len());
    for o in raw {
        let name = o.name.get_ref();
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !valid {
            return Err(field_error(
                o.name.span(),
                format!("{at}.name"),
                "an output's name uses letters, digits, `_` and `-`, e.g. \"processed\"",
            ));
        }
        if outputs.iter().any(|b| b.name == *name) {
            return Err(field_error(
                o.name.span(),
                format!("{at}.name"),
                format!("two outputs are named {name:?}; names are the keys of `Outputs`"),
            ));
        }
        let durable = [&o.orchestration, &o.raise_event, &o.entity]
            .iter()
            .filter(|t| t.is_some())
            .count();
        if durable > 1 || (durable == 1 && (o.queue.is_some() || o.blob.is_some())) {
            return Err(field_error(
                o.name.span(),
                at,
                format!(
                    "output {name:?} needs exactly one of `queue`, `blob`, `orchestration`, `raise_event` or `entity`"
                ),
            ));
        }
        let durable_name = |n: &Spanned<String>| DurableName {
            name: n.get_ref().clone(),
            span: n.span(),
        };
        if let Some(n) = &o.orchestration {
            outputs.push(OutputBinding {
                name: name.clone(),
                target: OutputTarget::Orchestration(durable_name(n)),
            });
            continue;
        }
        if let Some(n) = &o.entity {
            outputs.push(OutputBinding {
                name: name.clone(),
                target: OutputTarget::Entity(durable_name(n)),
            });
            continue;
        }
        if let Some(e) = &o.raise_event {
            if e.get_ref().is_empty() || e.get_ref().contains('/') {
                return Err(field_error(
                    e.span(),
                    format!("{at}.raise_event"),
                    "an event name is not empty and has no `/`",
                ));
            }
            outputs.push(OutputBinding {
                name: name.clone(),
                target: OutputTarget::RaiseEvent(e.get_ref().clone()),
            });
            continue;
        }
        let target = match (o.queue, o.blob) {
            (Some(q), None) => OutputTarget::Queue(
                QueueName::parse(q.get_ref())
                    .map_err(|m| field_error(q.span(), format!("{at}.queue"), m))?,
            ),
            (None, Some(b)) => {
                let pattern = BlobPattern::parse(b.get_ref())
                    .map_err(|m| field_error(b.span(), format!("{at}.blob"), m))?;
                // Parameters come from a blob trigger's path (and the few
                // every invocation has); other triggers' values are only
                // known at run time.
                let blob_params: Vec<&str> = triggers
                    .iter()
                    .filter_map(|t| match t {
                        TriggerConfig::Blob(b) => Some(b.path.params()),
                        _ => None,
                    })
                    .flatten()
                    .collect();
                let only_blob = triggers.iter().all(|t| matches!(t, TriggerConfig::Blob(_)))
                    && !triggers.is_empty();
                if only_blob
                    && let Some(p) = pattern
                        .params()
                        .find(|p| !blob_params.contains(p) && !OUTPUT_PARAMS.contains(p))
                {
                    return Err(field_error(
                        b.span(),
                        format!("{at}.blob"),
                        format!(
                            "{{{p}}} is not a parameter of the function's blob trigger (it has {}), nor one of {}",
                            blob_params
                                .iter()
                                .map(|p| format!("{{{p}}}"))
                                .collect::<Vec<_>>()
                                .join(", "),
                            OUTPUT_PARAMS
                                .iter()
                                .map(|p| format!("{{{p}}}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
                OutputTarget::Blob(pattern)
            }
            _ => {
                return Err(field_error(
                    o.name.span(),
                    at,
                    format!(
                        "output {name:?} needs exactly one of `queue = \"name\"`, `blob = \"container/path\"`, `orchestration`, `raise_event` or `entity`"
                    ),
                ));
            }
        };
        outputs.push(OutputBinding {
            name: name.clone(),
            target,
        });
    }
    Ok(outputs)
}

fn pick<'a, T>(
    own: &'a Option<Spanned<T>>,
    default: &'a Option<Spanned<T>>,
) -> Option<&'a Spanned<T>> {
    own.as_ref().or(default.as_ref())
}

impl RawHttpTrigger {
    fn validate(self, at: &str) -> Result<HttpTrigger, FieldError> {
        let span = self.route.span();
        let route = Route::parse(self.route.get_ref())
            .map_err(|m| field_error(span.clone(), format!("{at}.route"), m))?;
        let methods = match self.methods {
            None => crate::router::MethodSet::ANY,
            Some(list) => {
                let mut set = crate::router::MethodSet::NONE;
                for m in list.get_ref() {
                    let method = Method::parse(m).ok_or_else(|| {
                        field_error(
                            list.span(),
                            format!("{at}.methods"),
                            format!(
                                "unknown method {m:?}; use GET, POST, PUT, PATCH, DELETE, HEAD or OPTIONS (or omit `methods` for all)"
                            ),
                        )
                    })?;
                    set = set.with(method);
                }
                if set.is_empty() {
                    return Err(field_error(
                        list.span(),
                        format!("{at}.methods"),
                        "must list at least one method (or omit `methods` for all)",
                    ));
                }
                set
            }
        };
        Ok(HttpTrigger {
            route,
            methods,
            auth: self.auth,
            span,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VALID: &str = r#"version = 1
name = "app"
[server]
listen = "127.0.0.1:3000"
max_body = "1MiB"
[defaults]
timeout = "5s"
[functions.hello]
source = "hello.wasm"
memory = "64MiB"
env = { GREETING = "Hi" }
[[functions.hello.http]]
route = "/hello/{name}"
methods = ["GET"]
"#;

    #[test]
    fn the_example_parses() {
        let m = Manifest::parse(Path::new("f.toml"), VALID).unwrap();
        assert_eq!(m.functions.len(), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Any text is a manifest or a located error, never a panic.
        #[test]
        fn any_text_parses_or_is_explained(text in "\\PC{0,400}") {
            check(&text);
        }

        /// The same for a valid manifest with a piece replaced: closer to
        /// the mistakes people make (and to the validation code).
        #[test]
        fn a_damaged_manifest_parses_or_is_explained(
            at in 0..VALID.len(),
            len in 0..40usize,
            with in "[\\PC\n]{0,40}",
        ) {
            let at = (0..=at).rev().find(|i| VALID.is_char_boundary(*i)).unwrap_or(0);
            let end = (at + len).min(VALID.len());
            let end = (end..=VALID.len()).find(|i| VALID.is_char_boundary(*i)).unwrap_or(VALID.len());
            let text = format!("{}{}{}", &VALID[..at], with, &VALID[end..]);
            check(&text);
        }
    }

    fn check(text: &str) {
        if let Err(ManifestError::Invalid(d)) = Manifest::parse(Path::new("f.toml"), text) {
            // The rendering walks the text by the location: it must hold.
            let shown = d.to_string();
            assert!(shown.starts_with("f.toml:"), "{shown}");
            assert!(d.line >= 1 && d.column >= 1);
        }
    }
}
