//! The runtime: ties a validated manifest to the engine, the registry,
//! admission control and the metering sink, and runs invocations end to end
//! (admit -> load -> execute -> record).
//!
//! Two promises hold here, for every trigger:
//!
//! - **Every started invocation runs to its record.** An admitted invocation
//!   runs in a task of its own, so a caller that goes away (a client that
//!   disconnects or times out) cannot stop it half-way: it finishes, is
//!   recorded (as `abandoned` if its answer had nobody to go to) and billed.
//! - **Nothing is answered without its record.** A result is handed back
//!   only once its record is durable; if the record cannot be made durable,
//!   the caller is told so ([`Checked::durable`]) and answers that instead
//!   (the HTTP trigger: 503).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::admission::Admission;
use crate::engine::{EngineSettings, KelvinEngine, Tuning};
use crate::invoke::{self, Event, Execution};
use crate::manifest::Manifest;
use crate::metering::{Durable, InvocationRecord, Outcome, RecordSink, Settled};
use crate::metrics::Metrics;
use crate::proxy::{self, Delivery, MeteredBody};
use crate::registry::{Capacity, LoadedFunction, Prepared, Registry, RegistryError, micros};
use crate::table::{PRODUCTION, Table, Unit, VersionId};

/// A runtime that could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("failed to create the wasm engine: {0}")]
    Engine(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("{0}")]
    Unsupported(String),
}

/// What a function of this kind cannot be configured to do: an HTTP-
/// triggered component streams its response to the client as the guest
/// writes it, so it cannot answer with an envelope of outputs.
pub fn check_kind(
    spec: &crate::manifest::FunctionSpec,
    kind: crate::cache::WasmKind,
) -> Result<(), String> {
    let http = spec.triggers.iter().any(|t| t.http().is_some());
    if kind == crate::cache::WasmKind::Component && http && !spec.outputs.is_empty() {
        return Err(format!(
            "function `{}`: a wasi:http component with an HTTP trigger cannot have outputs yet (its response streams to the client); use a preview-1 module, or move the outputs to a queue-triggered function",
            spec.name
        ));
    }
    Ok(())
}

/// An invocation of a function the manifest does not declare.
#[derive(Debug, thiserror::Error)]
#[error("no function named `{0}` in the manifest")]
pub struct UnknownFunction(pub String);

/// A component's answer to an HTTP request, or why there is none.
pub struct HttpInvocation {
    pub invocation_id: String,
    pub response: Result<hyper::Response<MeteredBody>, HttpFailure>,
}

/// Why a component gave no response.
#[derive(Debug)]
pub enum HttpFailure {
    /// It set an error code instead of a response.
    GuestError(String),
    /// It set a response the host will not pass on (a status outside
    /// 200-599), and why.
    Malformed(String),
    /// It ended (or was never run) without setting one.
    Ended(Outcome),
    /// Its record could not be made durable: no answer may be given.
    NotRecorded,
}

impl HttpFailure {
    /// The reason its record gives.
    fn reason(&self) -> String {
        match self {
            HttpFailure::GuestError(code) => format!("the guest answered with error code {code}"),
            HttpFailure::Malformed(why) => format!("malformed response: {why}"),
            HttpFailure::Ended(outcome) => {
                format!("ended without a response ({})", outcome.as_str())
            }
            HttpFailure::NotRecorded => "its record could not be made durable".into(),
        }
    }
}

/// What a component may not answer that wasmtime-wasi-http lets through:
/// its own checks already refuse hop-by-hop and framing headers, bound the
/// header block, and hold the body to its Content-Length.
fn check_component_response<B>(response: &hyper::Response<B>) -> Result<(), String> {
    let status = response.status().as_u16();
    if (200..=599).contains(&status) {
        Ok(())
    } else {
        Err(format!(
            "status {status} is not allowed (a function answers 200-599)"
        ))
    }
}

/// A record for an invocation that has not run yet.
fn new_record(
    invocation_id: &str,
    function: &str,
    (version, memory_limit_bytes): (String, u64),
    trigger: &str,
) -> InvocationRecord {
    InvocationRecord {
        version,
        memory_limit_bytes,
        version_id: String::new(),
        slot: String::new(),
        invocation_id: invocation_id.to_owned(),
        function: function.to_owned(),
        trigger: trigger.to_owned(),
        started_at: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        outcome: Outcome::Rejected,
        reason: None,
        wall_us: 0,
        queued_us: 0,
        cpu_us: 0,
        peak_memory_bytes: 0,
        memory_kib_us: 0,
        fuel_consumed: None,
        bytes_in: 0,
        bytes_out: 0,
        cold: false,
        load: None,
        instantiate_us: 0,
        run_us: 0,
        exit_code: None,
    }
}

/// The result of one invocation: its output and its metering record.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub record: InvocationRecord,
    pub stdout: Bytes,
    /// Whether the record is durable (see [`Checked::durable`]).
    pub durable: bool,
}

/// The result of an invocation started with [`Runtime::start`]: the
/// record, and the output as the trigger accepted it.
#[derive(Debug)]
pub struct Checked<T> {
    pub record: InvocationRecord,
    /// The accepted output; `None` if the run failed or its output was
    /// refused.
    pub output: Option<T>,
    /// Why a successful run's output was refused (the record says `error`).
    pub refused: Option<String>,
    /// Whether the record is durable. If not, the result must not be
    /// answered as if it were known: the ledger does not know it.
    pub durable: bool,
}

impl<T> Checked<T> {
    fn failed(record: InvocationRecord) -> Checked<T> {
        Checked {
            record,
            output: None,
            refused: None,
            durable: false,
        }
    }
}

/// An invocation admitted to run: it holds a concurrency slot of its
/// function until it has run (or is dropped, never run and never recorded).
pub struct Ticket {
    record: InvocationRecord,
    permit: OwnedSemaphorePermit,
    unit: Arc<Unit>,
    /// Admitted patiently: waits for a pool slot however long it takes.
    patient: bool,
}

impl Ticket {
    pub fn invocation_id(&self) -> &str {
        &self.record.invocation_id
    }

    /// The function version it runs.
    pub fn unit(&self) -> &Arc<Unit> {
        &self.unit
    }
}

/// What admission decided.
pub enum Admit {
    /// Run it with [`Runtime::start`] or [`Runtime::start_http`].
    Admitted(Ticket),
    /// Its queue was full or it waited past its queue timeout. The record
    /// (`rejected`) is written; `durable` says whether it was made durable.
    Rejected(Checked<()>),
}

/// An invocation under way in its own task; resolves to its result. Dropped
/// before it resolves, the invocation goes on and is recorded `abandoned`.
pub struct Started<T>(tokio::sync::oneshot::Receiver<Checked<T>>);

impl<T> Future for Started<T> {
    type Output = Checked<T>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Checked<T>> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.expect("an invocation task always sends its result"))
    }
}

/// Invocations started and not yet recorded, for draining at shutdown.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Counts an invocation in flight while it lives.
struct Flying(Arc<InFlight>);

impl Flying {
    fn new(in_flight: &Arc<InFlight>) -> Flying {
        in_flight.count.fetch_add(1, Ordering::SeqCst);
        Flying(in_flight.clone())
    }
}

impl Drop for Flying {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

pub struct Runtime {
    manifest: Arc<Manifest>,
    engine: Arc<KelvinEngine>,
    registry: Registry,
    admission: HashMap<String, Admission>,
    /// One permit per pooling-allocator instance slot.
    pool_slots: Arc<Semaphore>,
    sink: Arc<dyn RecordSink>,
    metrics: Metrics,
    in_flight: Arc<InFlight>,
    /// What serves: replaced whole, never changed in place.
    table: std::sync::RwLock<Arc<Table>>,
}

impl Runtime {
    /// Builds the engine and checks every function's wasm. Nothing is
    /// compiled yet; a broken function fails here, not at its first request.
    pub fn new(manifest: Manifest, sink: Arc<dyn RecordSink>) -> Result<Runtime, StartError> {
        let tuning = Tuning::from_env().map_err(StartError::Engine)?;
        Runtime::with_tuning(manifest, sink, tuning)
    }

    /// As [`Runtime::new`], with engine settings other than the defaults
    /// (for benchmarks; see [`Tuning`]).
    pub fn with_tuning(
        manifest: Manifest,
        sink: Arc<dyn RecordSink>,
        tuning: Tuning,
    ) -> Result<Runtime, StartError> {
        let max_memory = manifest
            .functions
            .iter()
            .map(|f| f.limits.memory)
            .max()
            .unwrap_or(64 << 10);
        let engine = KelvinEngine::new(EngineSettings {
            instance_slots: manifest.server.instance_slots.get(),
            max_memory,
            fuel: manifest.functions.iter().any(|f| f.limits.fuel.is_some()),
            tuning,
        })
        .map_err(|e| StartError::Engine(format!("{e:#}")))?;
        let engine = Arc::new(engine);
        let metrics = Metrics::new();
        metrics.start_at_zero(&manifest.functions);
        let registry = Registry::new(
            engine.clone(),
            &manifest.functions,
            manifest.server.state_dir.join("cache"),
            Capacity {
                max_loaded: manifest.server.max_loaded.get() as usize,
                memory_budget: manifest.server.memory_budget,
            },
            metrics.clone(),
        )?;
        let admission = manifest
            .functions
            .iter()
            .map(|f| {
                let depth = metrics.queue_depth.with_label_values(&[f.name.as_str()]);
                (f.name.to_string(), Admission::new(f.concurrency, depth))
            })
            .collect();
        let pool_slots = Arc::new(Semaphore::new(manifest.server.instance_slots.get() as usize));
        for f in &manifest.functions {
            check_kind(f, registry.kind(f.name.as_str()).expect("checked at start"))
                .map_err(StartError::Unsupported)?;
        }
        // The manifest's functions serve production, under their names.
        let production = manifest
            .functions
            .iter()
            .map(|f| {
                let hash = registry.hash(f.name.as_str()).expect("checked at start");
                let unit = Unit {
                    function: f.name.to_string(),
                    version: VersionId::of(&hash, f),
                    key: f.name.to_string(),
                    kind: registry.kind(f.name.as_str()).expect("checked at start"),
                    spec: registry.spec(f.name.as_str()).expect("checked at start"),
                };
                (f.name.to_string(), Arc::new(unit))
            })
            .collect();
        let table = Table {
            generation: 0,
            slots: [(PRODUCTION.to_owned(), production)].into(),
            split: None,
        };
        Ok(Runtime {
            manifest: Arc::new(manifest),
            engine,
            registry,
            admission,
            pool_slots,
            sink,
            metrics,
            in_flight: Arc::default(),
            table: std::sync::RwLock::new(Arc::new(table)),
        })
    }

    /// What serves now.
    pub fn table(&self) -> Arc<Table> {
        self.table.read().expect("table lock").clone()
    }

    /// Replaces what serves, in one step: requests from now on see `table`
    /// (with the next generation); invocations under way finish on the
    /// versions they started with. Every unit in it must be in the registry.
    pub fn replace_table(&self, mut table: Table) {
        let mut current = self.table.write().expect("table lock");
        table.generation = current.generation + 1;
        *current = Arc::new(table);
    }

    /// The production unit of `function`.
    pub fn production(&self, function: &str) -> Result<Arc<Unit>, UnknownFunction> {
        self.table()
            .unit(PRODUCTION, function)
            .cloned()
            .ok_or_else(|| UnknownFunction(function.to_owned()))
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where the default JSON-lines metering log of `manifest` lives.
    pub fn invocation_log_path(manifest: &Manifest) -> PathBuf {
        manifest.server.state_dir.join("invocations.jsonl")
    }

    /// Makes every record so far durable, and closes the sink: a record
    /// made after this is refused (and its answer with it).
    pub fn flush(&self) {
        self.sink.flush();
    }

    /// Waits until every started invocation has been recorded, or `within`
    /// has passed; whether none is left.
    pub async fn drained(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let idle = self.in_flight.idle.notified();
            if self.in_flight.count.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return self.in_flight.count.load(Ordering::SeqCst) == 0;
            }
        }
    }

    /// The longest `timeout` of any function: how long an invocation may
    /// still run after its caller stopped waiting.
    pub fn longest_timeout(&self) -> Duration {
        self.manifest
            .functions
            .iter()
            .map(|f| f.limits.timeout)
            .max()
            .unwrap_or_default()
    }

    /// Runs one invocation of `function`, here, and records it (for `kelvin
    /// invoke` and embedders; triggers use [`Runtime::start`], which keeps
    /// running when its caller goes away). A wasi:http component gets a
    /// `POST /` whose body is the input; its response body is the output.
    pub async fn invoke(
        &self,
        function: &str,
        event: Event,
    ) -> Result<Invocation, UnknownFunction> {
        let ticket = match self.admit(function, event.trigger).await? {
            Admit::Admitted(ticket) => ticket,
            Admit::Rejected(checked) => {
                return Ok(Invocation {
                    record: checked.record,
                    stdout: Bytes::new(),
                    durable: checked.durable,
                });
            }
        };
        let checked = self
            .run(ticket, event, Ok, |_, _| Settled::nothing(), || false)
            .await;
        Ok(Invocation {
            record: checked.record,
            stdout: checked.output.unwrap_or_default(),
            durable: checked.durable,
        })
    }

    /// Waits for a concurrency slot of `function`'s production version (in
    /// its bounded queue).
    pub async fn admit(
        &self,
        function: &str,
        trigger: &'static str,
    ) -> Result<Admit, UnknownFunction> {
        let unit = self.production(function)?;
        self.admit_unit(&unit, PRODUCTION, trigger).await
    }

    /// Waits for a concurrency slot of `unit`'s function (in its bounded
    /// queue; the versions of a function share it), for a request to
    /// `slot`. Triggers admit before
    /// they buffer an event, so a request that cannot run costs no memory,
    /// and one that waits holds none.
    pub async fn admit_unit(
        &self,
        unit: &Arc<Unit>,
        slot: &str,
        trigger: &'static str,
    ) -> Result<Admit, UnknownFunction> {
        let admission = self.admission_of(&unit.function)?;
        let invocation_id = uuid::Uuid::now_v7().to_string();
        let mut record = new_record(
            &invocation_id,
            &unit.function,
            self.deployment(unit),
            trigger,
        );
        record.version_id = unit.version.to_string();
        record.slot = slot.to_owned();
        let queued_from = Instant::now();
        let entered = admission.enter().await;
        record.queued_us = micros(queued_from.elapsed());
        Ok(match entered {
            Ok(permit) => Admit::Admitted(Ticket {
                record,
                permit,
                unit: unit.clone(),
                patient: false,
            }),
            Err(rejected) => {
                record.reason = Some(rejected.to_string());
                let (record, durable) = self.finish(record, false).await;
                let mut checked = Checked::failed(record);
                checked.durable = durable;
                Admit::Rejected(checked)
            }
        })
    }

    /// Waits for a concurrency slot of `unit`'s function however long it
    /// takes, outside its bounded queue, for the production slot: for
    /// triggers whose events wait in a store of their own (queue messages,
    /// blobs, durable work). Refusing them would only put the event back
    /// to be taken again at once, a loop that records a rejection each
    /// turn. Dropping the future leaves the line; nothing is recorded.
    pub async fn admit_patiently(
        &self,
        unit: &Arc<Unit>,
        trigger: &'static str,
    ) -> Result<Ticket, UnknownFunction> {
        let admission = self.admission_of(&unit.function)?;
        let queued_from = Instant::now();
        let permit = admission.enter_patiently().await;
        Ok(self.patient_ticket(unit, trigger, permit, queued_from))
    }

    /// A slot of `unit`'s function for the production slot if one is free
    /// now (as [`Runtime::admit_patiently`] would give); `None` records
    /// nothing.
    pub fn try_admit(
        &self,
        unit: &Arc<Unit>,
        trigger: &'static str,
    ) -> Result<Option<Ticket>, UnknownFunction> {
        let admission = self.admission_of(&unit.function)?;
        let queued_from = Instant::now();
        Ok(admission
            .try_enter()
            .map(|permit| self.patient_ticket(unit, trigger, permit, queued_from)))
    }

    fn patient_ticket(
        &self,
        unit: &Arc<Unit>,
        trigger: &'static str,
        permit: OwnedSemaphorePermit,
        queued_from: Instant,
    ) -> Ticket {
        let invocation_id = uuid::Uuid::now_v7().to_string();
        let mut record = new_record(
            &invocation_id,
            &unit.function,
            self.deployment(unit),
            trigger,
        );
        record.version_id = unit.version.to_string();
        record.slot = PRODUCTION.to_owned();
        record.queued_us = micros(queued_from.elapsed());
        Ticket {
            record,
            permit,
            unit: unit.clone(),
            patient: true,
        }
    }

    /// Starts an admitted invocation in its own task; `accept` turns a
    /// successful run's output into what the trigger answers, before the
    /// record is written, so output it refuses is recorded as the `error`
    /// its caller will see. `hold` lives until the invocation is recorded
    /// (a trigger's budget for the event's bytes).
    pub fn start<T: Send + 'static>(
        self: &Arc<Self>,
        ticket: Ticket,
        event: Event,
        accept: impl FnOnce(Bytes) -> Result<T, String> + Send + 'static,
        hold: impl Send + 'static,
    ) -> Started<T> {
        self.start_settled(ticket, event, accept, hold, |_, _| Settled::nothing())
    }

    /// As [`Runtime::start`], and `settle` commits what the invocation
    /// changes besides its record (a trigger's effects: a message deleted,
    /// outputs published), given the record and the accepted output. It is
    /// called once the outcome is known, before the record goes to the
    /// sink, and both must be durable before the result is handed back.
    pub fn start_settled<T: Send + 'static>(
        self: &Arc<Self>,
        ticket: Ticket,
        event: Event,
        accept: impl FnOnce(Bytes) -> Result<T, String> + Send + 'static,
        hold: impl Send + 'static,
        settle: impl FnOnce(&InvocationRecord, Option<&T>) -> Settled + Send + 'static,
    ) -> Started<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let runtime = self.clone();
        let flying = Flying::new(&self.in_flight);
        tokio::spawn(async move {
            // Boxed: an invocation's state machine is kilobytes, which the
            // task would otherwise copy when it is spawned and when it ends.
            let checked =
                Box::pin(runtime.run(ticket, event, accept, settle, || tx.is_closed())).await;
            drop(hold);
            let _ = tx.send(checked);
            drop(flying);
        });
        Started(rx)
    }

    async fn run<T>(
        &self,
        ticket: Ticket,
        event: Event,
        accept: impl FnOnce(Bytes) -> Result<T, String>,
        settle: impl FnOnce(&InvocationRecord, Option<&T>) -> Settled,
        abandoned: impl Fn() -> bool,
    ) -> Checked<T> {
        let Ticket {
            mut record,
            permit,
            unit,
            patient,
        } = ticket;
        record.bytes_in = event.input.len() as u64;
        let Some((slot, loaded, start)) = self.pool_and_load(&mut record, &unit, patient).await
        else {
            if abandoned() {
                mark_abandoned(&mut record);
            }
            let settled = settle(&record, None);
            let (record, durable) = self.finish(record, settled.recorded).await;
            let mut checked = Checked::failed(record);
            checked.durable = durable && settled.durable.wait().await.is_ok();
            return checked;
        };
        let invocation_id = record.invocation_id.clone();
        let max_output = usize::try_from(self.manifest.server.max_body).unwrap_or(usize::MAX);
        // A component's answer to an event that is not a 2xx: a failure.
        let refused_status = std::sync::Mutex::new(None::<u16>);
        let (exec, output) = match &loaded.prepared {
            Prepared::Module(pre) => {
                let exec = invoke::execute(
                    &self.engine,
                    unit_code(&unit, &loaded),
                    pre,
                    &invocation_id,
                    &event,
                    max_output,
                )
                .await;
                let stdout = exec.stdout.clone();
                (exec, stdout)
            }
            Prepared::Component(pre) => {
                // An event is a POST of its JSON, with headers naming the
                // trigger and the function.
                let request = hyper::Request::post("http://localhost/")
                    .header(hyper::header::HOST, "localhost")
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .header(proxy::TRIGGER_HEADER, event.trigger)
                    .header(proxy::FUNCTION_HEADER, unit.function.as_str())
                    .body(Full::new(event.input.clone()))
                    .expect("a static request is valid");
                let (tx, rx) = tokio::sync::oneshot::channel();
                let respond: proxy::Respond = Box::new(move |r| {
                    let _ = tx.send(r);
                });
                // The body must be read while the guest writes it: its
                // stream holds one chunk at a time.
                let read = async {
                    let Ok(Ok(response)) = rx.await else {
                        return Bytes::new();
                    };
                    let status = response.status();
                    if !status.is_success() {
                        *refused_status.lock().expect("lock") = Some(status.as_u16());
                    }
                    let limited = http_body_util::Limited::new(response.into_body(), max_output);
                    limited
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default()
                };
                tokio::join!(
                    proxy::execute(
                        &self.engine,
                        unit_code(&unit, &loaded),
                        pre,
                        &invocation_id,
                        request,
                        &event.files,
                        respond
                    ),
                    read
                )
            }
        };
        drop((slot, permit));
        record.wall_us = micros(start.elapsed());
        record.bytes_out = output.len() as u64;
        self.record_execution(&mut record, &unit, &exec);
        if let Some(status) = refused_status.into_inner().expect("lock")
            && record.outcome == Outcome::Ok
        {
            record.outcome = Outcome::Error;
            record.reason = Some(format!("the function answered status {status}"));
        }
        let mut checked = Checked::failed(record);
        if checked.record.outcome == Outcome::Ok {
            match accept(output) {
                Ok(t) => checked.output = Some(t),
                Err(why) => {
                    checked.record.outcome = Outcome::Error;
                    checked.record.reason = Some(format!("malformed response: {why}"));
                    checked.refused = Some(why);
                }
            }
        }
        if abandoned() {
            // Nobody is left to take the answer: that is what the record
            // says, besides how the run itself ended.
            mark_abandoned(&mut checked.record);
        }
        // Submitted before the sink's copy of the record: the effects are
        // committed with the record, never after it.
        let settled = settle(&checked.record, checked.output.as_ref());
        let (record, durable) = self.finish(checked.record, settled.recorded).await;
        checked.record = record;
        checked.durable = durable && settled.durable.wait().await.is_ok();
        checked
    }

    /// Loads `unit`'s version and instantiates it once with its limits,
    /// running none of its code but a module's start function, in a pool
    /// slot of its own: a version that can never instantiate is refused
    /// before anything points at it. Why not, if not.
    pub async fn instantiate_once(&self, unit: &Unit) -> Result<(), String> {
        let (loaded, _) = self
            .registry
            .acquire(&unit.key)
            .await
            .map_err(|e| e.reason)?;
        let _slot = self
            .pool_slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let code = unit_code(unit, &loaded);
        match &loaded.prepared {
            Prepared::Module(pre) => invoke::instantiate_once(&self.engine, code, pre).await,
            Prepared::Component(pre) => proxy::instantiate_once(&self.engine, code, pre).await,
        }
    }

    /// Whether `unit` is a wasi:http component (given HTTP requests
    /// directly) rather than a preview-1 command (spoken to with CGI).
    pub fn is_component(&self, unit: &Unit) -> bool {
        unit.kind == crate::cache::WasmKind::Component
    }

    /// Starts an admitted invocation of a wasi:http component for one HTTP
    /// request, in its own task. Returns as soon as the guest has set its
    /// response (whose body may still be streaming) or has ended without
    /// one. The record is written when the body is done; the body's end is
    /// held back until the record is durable, so a client never holds a
    /// whole response whose record could still be lost. `head` says the
    /// client asked with HEAD (and expects no body). `hold` lives until the
    /// invocation is recorded.
    pub async fn start_http(
        self: &Arc<Self>,
        ticket: Ticket,
        request: hyper::Request<Full<Bytes>>,
        files: Vec<crate::manifest::FileMount>,
        head: bool,
        hold: impl Send + 'static,
    ) -> HttpInvocation {
        let invocation_id = ticket.invocation_id().to_owned();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let runtime = self.clone();
        let flying = Flying::new(&self.in_flight);
        let task = tokio::spawn(async move {
            let record = runtime
                .serve_component(ticket, request, files, head, tx)
                .await;
            drop(hold);
            drop(flying);
            record
        });
        let response = match rx.await {
            Ok(answer) => answer,
            // The guest ended without a response: its record says why.
            Err(_) => Err(match task.await {
                Ok((_, false)) => HttpFailure::NotRecorded,
                Ok((record, true)) => HttpFailure::Ended(record.outcome),
                Err(_) => HttpFailure::Ended(Outcome::Error),
            }),
        };
        HttpInvocation {
            invocation_id,
            response,
        }
    }

    async fn serve_component(
        &self,
        ticket: Ticket,
        request: hyper::Request<Full<Bytes>>,
        files: Vec<crate::manifest::FileMount>,
        head: bool,
        respond_to: tokio::sync::oneshot::Sender<Result<hyper::Response<MeteredBody>, HttpFailure>>,
    ) -> (InvocationRecord, bool) {
        let Ticket {
            mut record,
            permit,
            unit,
            patient,
        } = ticket;
        record.bytes_in = request.body().size_hint().exact().unwrap_or(0);
        let Some((slot, loaded, start)) = self.pool_and_load(&mut record, &unit, patient).await
        else {
            drop(respond_to);
            return self.finish(record, false).await;
        };
        let Prepared::Component(pre) = &loaded.prepared else {
            unreachable!("the HTTP trigger sends only components here");
        };
        let (sent_tx, sent_rx) = tokio::sync::oneshot::channel::<Delivery>();
        let (ack_tx, ack_rx) = tokio::sync::oneshot::channel::<bool>();
        // What the client was told instead of the guest's response, if not it.
        let refused = Arc::new(std::sync::Mutex::new(None));
        let noted = refused.clone();
        let deadline = start + loaded.spec.limits.timeout;
        let respond: proxy::Respond = Box::new(move |r| {
            let answer = match r {
                Ok(response) => match check_component_response(&response) {
                    Ok(()) => Ok(MeteredBody::wrap(response, head, deadline, sent_tx, ack_rx)),
                    Err(why) => Err(HttpFailure::Malformed(why)),
                },
                Err(code) => Err(HttpFailure::GuestError(format!("{code:?}"))),
            };
            if let Err(failure) = &answer {
                *noted.lock().expect("lock") = Some(failure.reason());
            }
            let _ = respond_to.send(answer);
        });
        let invocation_id = record.invocation_id.clone();
        let exec = proxy::execute(
            &self.engine,
            unit_code(&unit, &loaded),
            pre,
            &invocation_id,
            request,
            &files,
            respond,
        )
        .await;
        // The guest is done: its slots are free while the client reads.
        drop((slot, permit));
        // Bytes out are those the client was sent: wait for the body to end
        // (or the client to leave), within the function's timeout; the body
        // ends itself at that deadline.
        let delivered = tokio::time::timeout_at(
            tokio::time::Instant::from_std(deadline + crate::engine::EPOCH_TICK),
            sent_rx,
        )
        .await;
        record.wall_us = micros(start.elapsed());
        self.record_execution(&mut record, &unit, &exec);
        let refused = refused.lock().expect("lock").take();
        if let Some(why) = refused {
            // What the client saw: the guest's answer refused (whatever the
            // guest did after, such as failing to write to the dropped body).
            record.outcome = Outcome::Error;
            record.reason = Some(why);
        } else if let Ok(Ok(delivery)) = delivered {
            record.bytes_out = delivery.bytes;
            if !delivery.whole {
                // Said whatever the guest did (it often fails writing to a
                // client that has gone): the client did not get it all.
                let cut = format!(
                    "the response was not sent whole ({} body bytes sent): the client went away, the body failed or it passed the timeout",
                    delivery.bytes
                );
                record.reason = Some(match record.reason.take() {
                    Some(why) => format!("{cut}; {why}"),
                    None => cut,
                });
                if record.outcome == Outcome::Ok {
                    record.outcome = Outcome::Error;
                }
            }
        } else if record.outcome == Outcome::Ok {
            // The guest set a response whose body was not done within the
            // timeout (a client not reading it): the body ends in an error.
            record.outcome = Outcome::Error;
            record.reason = Some("the response was not sent within the function's timeout".into());
        }
        let (record, durable) = self.finish(record, false).await;
        // The body's end waits for this: a response whose record was lost
        // is cut off instead of completed.
        let _ = ack_tx.send(durable);
        (record, durable)
    }

    /// The unit's wasm hash and memory limit, for its records.
    fn deployment(&self, unit: &Unit) -> (String, u64) {
        (self.registry.version(&unit.key), unit.spec.limits.memory)
    }

    fn admission_of(&self, function: &str) -> Result<&Admission, UnknownFunction> {
        self.admission
            .get(function)
            .ok_or_else(|| UnknownFunction(function.to_owned()))
    }

    /// Waits for a pool slot (within the function's queue timeout), then
    /// loads the function. `None` means the record now says why it cannot
    /// run.
    async fn pool_and_load(
        &self,
        record: &mut InvocationRecord,
        unit: &Unit,
        patient: bool,
    ) -> Option<(SlotInUse, Arc<LoadedFunction>, Instant)> {
        let admission = self.admission_of(&record.function).ok()?;
        let queued_from = Instant::now();
        let slot = admission.enter_pool(&self.pool_slots, patient).await;
        record.queued_us += micros(queued_from.elapsed());
        let slot = match slot {
            Ok(slot) => SlotInUse::hold(slot, &self.metrics.pool_slots_in_use),
            Err(rejected) => {
                record.reason = Some(rejected.to_string());
                return None;
            }
        };
        let start = Instant::now();
        match self.registry.acquire(&unit.key).await {
            Ok((loaded, cold)) => {
                record.cold = cold.is_some();
                record.load = cold;
                Some((slot, loaded, start))
            }
            Err(e) => {
                record.outcome = Outcome::Error;
                record.reason = Some(e.to_string());
                record.wall_us = micros(start.elapsed());
                None
            }
        }
    }

    /// Copies an execution's measurements into its record and forwards the
    /// guest's logs, attributed to the invocation.
    fn record_execution(&self, record: &mut InvocationRecord, unit: &Unit, exec: &Execution) {
        record.outcome = exec.outcome;
        record.reason = exec.reason.clone();
        record.exit_code = exec.exit_code;
        record.cpu_us = micros(exec.cpu);
        record.peak_memory_bytes = exec.peak_memory;
        record.memory_kib_us = exec.memory_kib_us;
        record.fuel_consumed = exec.fuel_consumed;
        record.instantiate_us = micros(exec.instantiate);
        record.run_us = micros(exec.run);
        let logs = match unit.kind {
            // A component's stdout is a log stream too.
            crate::cache::WasmKind::Component => vec![&exec.stdout, &exec.stderr],
            _ => vec![&exec.stderr],
        };
        for stream in logs {
            for line in String::from_utf8_lossy(stream).lines() {
                tracing::info!(
                    target: "kelvin::guest",
                    function = record.function.as_str(),
                    invocation_id = record.invocation_id.as_str(),
                    "{line}"
                );
            }
        }
    }

    /// Logs, counts and records an invocation, returning once its record is
    /// durable (`true`) or could not be made so (`false`): an answer is
    /// never sent for an invocation the ledger could still lose.
    /// Observes and records `record` (`recorded`: already committed to the
    /// ledger's database by a settle hook).
    async fn finish(&self, record: InvocationRecord, recorded: bool) -> (InvocationRecord, bool) {
        if record.outcome != Outcome::Ok {
            tracing::warn!(
                function = record.function.as_str(),
                invocation_id = record.invocation_id.as_str(),
                outcome = record.outcome.as_str(),
                reason = record.reason.as_deref().unwrap_or(""),
                "invocation failed"
            );
        }
        self.metrics.observe(&record);
        let durable = if !self.engine.tuning().metering {
            Durable::now()
        } else if recorded {
            self.sink.record_committed(&record)
        } else {
            self.sink.record(&record)
        };
        match durable.wait().await {
            Ok(()) => (record, true),
            Err(e) => {
                tracing::error!(
                    invocation_id = record.invocation_id.as_str(),
                    error = e.as_str(),
                    "the invocation's record could not be made durable; its answer is withheld"
                );
                (record, false)
            }
        }
    }
}

/// What an invocation of `unit` runs: the loaded code, with the unit's
/// configuration (a slot's settings over its version's).
fn unit_code<'a>(unit: &'a Unit, loaded: &'a LoadedFunction) -> invoke::Code<'a> {
    invoke::Code {
        spec: &unit.spec,
        engine: &loaded.engine,
    }
}

/// Records that the caller went away before the answer.
fn mark_abandoned(record: &mut InvocationRecord) {
    const GONE: &str = "the caller went away before the answer";
    record.reason = Some(match record.reason.take() {
        Some(why) => format!("{GONE}; {why}"),
        None => GONE.to_owned(),
    });
    if record.outcome == Outcome::Ok {
        record.outcome = Outcome::Abandoned;
    }
}

/// A pool slot held by a running invocation, counted in the gauge while held.
struct SlotInUse {
    _permit: OwnedSemaphorePermit,
    gauge: prometheus::IntGauge,
}

impl SlotInUse {
    fn hold(permit: OwnedSemaphorePermit, gauge: &prometheus::IntGauge) -> SlotInUse {
        gauge.inc();
        SlotInUse {
            _permit: permit,
            gauge: gauge.clone(),
        }
    }
}

impl Drop for SlotInUse {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
