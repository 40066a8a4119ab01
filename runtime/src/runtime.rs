//! The runtime: ties a validated manifest to the engine, the registry,
//! admission control and the metering sink, and runs invocations end to end
//! (admit -> load -> execute -> record).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;

use crate::admission::Admission;
use crate::engine::{EngineSettings, KelvinEngine, Tuning};
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;

use crate::invoke::{self, Event, Execution};
use crate::manifest::Manifest;
use crate::metering::{Durable, InvocationRecord, Outcome, RecordSink};
use crate::metrics::Metrics;
use crate::proxy::{self, MeteredBody};
use crate::registry::{Capacity, Registry, RegistryError, micros};
use crate::registry::{LoadedFunction, Prepared};

/// A runtime that could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("failed to create the wasm engine: {0}")]
    Engine(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
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

type Permits<'a> = (tokio::sync::SemaphorePermit<'a>, SlotInUse<'a>);

/// A record for an invocation that has not run yet.
fn new_record(
    invocation_id: &str,
    function: &str,
    (version, memory_limit_bytes): (String, u64),
    trigger: &str,
    bytes_in: usize,
) -> InvocationRecord {
    InvocationRecord {
        version,
        memory_limit_bytes,
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
        bytes_in: bytes_in as u64,
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
}

/// The result of [`Runtime::invoke_as`]: the record, and the output as the
/// trigger accepted it.
#[derive(Debug)]
pub struct Checked<T> {
    pub record: InvocationRecord,
    /// The accepted output; `None` if the run failed or its output was
    /// refused.
    pub output: Option<T>,
    /// Why a successful run's output was refused (the record says `error`).
    pub refused: Option<String>,
}

impl<T> Checked<T> {
    fn failed(record: InvocationRecord) -> Checked<T> {
        Checked {
            record,
            output: None,
            refused: None,
        }
    }
}

pub struct Runtime {
    manifest: Arc<Manifest>,
    engine: Arc<KelvinEngine>,
    registry: Registry,
    admission: HashMap<String, Admission>,
    /// One permit per pooling-allocator instance slot.
    pool_slots: tokio::sync::Semaphore,
    sink: Arc<dyn RecordSink>,
    metrics: Metrics,
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
        let pool_slots = tokio::sync::Semaphore::new(manifest.server.instance_slots.get() as usize);
        Ok(Runtime {
            manifest: Arc::new(manifest),
            engine,
            registry,
            admission,
            pool_slots,
            sink,
            metrics,
        })
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

    /// Makes every record so far durable.
    pub fn flush(&self) {
        self.sink.flush();
    }

    /// Runs one invocation of `function` and records it. A wasi:http
    /// component gets a `POST /` whose body is the input; its response body
    /// is the output.
    pub async fn invoke(
        &self,
        function: &str,
        event: Event,
    ) -> Result<Invocation, UnknownFunction> {
        let checked = self.invoke_as(function, event, Ok).await?;
        Ok(Invocation {
            record: checked.record,
            stdout: checked.output.unwrap_or_default(),
        })
    }

    /// As [`Runtime::invoke`], with `accept` turning a successful run's
    /// output into what the trigger answers, before the record is written:
    /// output it refuses is recorded as the `error` its caller will see,
    /// with the reason, never as a success.
    pub async fn invoke_as<T>(
        &self,
        function: &str,
        event: Event,
        accept: impl FnOnce(Bytes) -> Result<T, String>,
    ) -> Result<Checked<T>, UnknownFunction> {
        let admission = self.admission_of(function)?;
        let invocation_id = uuid::Uuid::now_v7().to_string();
        let mut record = new_record(
            &invocation_id,
            function,
            self.deployment(function),
            event.trigger,
            event.input.len(),
        );
        let Some((_permits, loaded, start)) = self.admit_and_load(admission, &mut record).await
        else {
            return Ok(Checked::failed(self.finish(record).await));
        };
        let max_output = usize::try_from(self.manifest.server.max_body).unwrap_or(usize::MAX);
        let (exec, output) = match &loaded.prepared {
            Prepared::Module(pre) => {
                let exec = invoke::execute(
                    &self.engine,
                    &loaded,
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
                let request = hyper::Request::post("http://localhost/")
                    .header(hyper::header::HOST, "localhost")
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
                    let limited = http_body_util::Limited::new(response.into_body(), max_output);
                    limited
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default()
                };
                tokio::join!(
                    proxy::execute(&self.engine, &loaded, pre, &invocation_id, request, respond),
                    read
                )
            }
        };
        record.wall_us = micros(start.elapsed());
        record.bytes_out = output.len() as u64;
        self.record_execution(&mut record, &exec);
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
        checked.record = self.finish(checked.record).await;
        Ok(checked)
    }

    /// Whether `function` is a wasi:http component (given HTTP requests
    /// directly) rather than a preview-1 command (spoken to with CGI).
    pub fn is_component(&self, function: &str) -> bool {
        self.registry.kind(function) == Some(crate::cache::WasmKind::Component)
    }

    /// Runs `function`, a wasi:http component, for one HTTP request. Returns
    /// as soon as the guest has set its response (whose body may still be
    /// streaming) or has ended without one; the record is written when the
    /// invocation and its response body are done.
    pub async fn invoke_http(
        self: &Arc<Self>,
        function: &str,
        request: hyper::Request<Full<Bytes>>,
    ) -> Result<HttpInvocation, UnknownFunction> {
        self.admission_of(function)?;
        let invocation_id = uuid::Uuid::now_v7().to_string();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let runtime = self.clone();
        let (function, id) = (function.to_owned(), invocation_id.clone());
        let task =
            tokio::spawn(async move { runtime.serve_component(&function, &id, request, tx).await });
        let response = match rx.await {
            Ok(answer) => answer,
            // The guest ended without a response: its record says why.
            Err(_) => Err(match task.await {
                Ok(record) => HttpFailure::Ended(record.outcome),
                Err(_) => HttpFailure::Ended(Outcome::Error),
            }),
        };
        Ok(HttpInvocation {
            invocation_id,
            response,
        })
    }

    async fn serve_component(
        &self,
        function: &str,
        invocation_id: &str,
        request: hyper::Request<Full<Bytes>>,
        respond_to: tokio::sync::oneshot::Sender<Result<hyper::Response<MeteredBody>, HttpFailure>>,
    ) -> InvocationRecord {
        let admission = self.admission_of(function).expect("checked by the caller");
        let bytes_in = request.body().size_hint().exact().unwrap_or(0) as usize;
        let mut record = new_record(
            invocation_id,
            function,
            self.deployment(function),
            "http",
            bytes_in,
        );
        let Some((_permits, loaded, start)) = self.admit_and_load(admission, &mut record).await
        else {
            drop(respond_to);
            return self.finish(record).await;
        };
        let Prepared::Component(pre) = &loaded.prepared else {
            unreachable!("the HTTP trigger sends only components here");
        };
        let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
        // What the client was told instead of the guest's response, if not it.
        let refused = Arc::new(std::sync::Mutex::new(None));
        let noted = refused.clone();
        let deadline = start + loaded.spec.limits.timeout;
        let respond: proxy::Respond = Box::new(move |r| {
            let answer = match r {
                Ok(response) => match check_component_response(&response) {
                    Ok(()) => Ok(MeteredBody::wrap(response, deadline, sent_tx)),
                    Err(why) => Err(HttpFailure::Malformed(why)),
                },
                Err(code) => Err(HttpFailure::GuestError(format!("{code:?}"))),
            };
            if let Err(failure) = &answer {
                *noted.lock().expect("lock") = Some(failure.reason());
            }
            let _ = respond_to.send(answer);
        });
        let exec =
            proxy::execute(&self.engine, &loaded, pre, invocation_id, request, respond).await;
        // The guest is done: its slots are free while the client reads.
        drop(_permits);
        // Bytes out are those the client was sent: wait for the body to end
        // (or the client to leave), within the function's timeout; the body
        // ends itself at that deadline.
        let delivered = tokio::time::timeout_at(
            tokio::time::Instant::from_std(deadline + crate::engine::EPOCH_TICK),
            sent_rx,
        )
        .await;
        record.wall_us = micros(start.elapsed());
        self.record_execution(&mut record, &exec);
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
        self.finish(record).await
    }

    /// The function's deployment version and memory limit, for its records.
    fn deployment(&self, function: &str) -> (String, u64) {
        let memory = self.registry.spec(function).map_or(0, |s| s.limits.memory);
        (self.registry.version(function), memory)
    }

    fn admission_of(&self, function: &str) -> Result<&Admission, UnknownFunction> {
        self.admission
            .get(function)
            .ok_or_else(|| UnknownFunction(function.to_owned()))
    }

    /// Waits for a concurrency slot and a pool slot, then loads the function.
    /// `None` means the record now says why it cannot run.
    async fn admit_and_load<'a>(
        &'a self,
        admission: &'a Admission,
        record: &mut InvocationRecord,
    ) -> Option<(Permits<'a>, Arc<LoadedFunction>, Instant)> {
        let queued_from = Instant::now();
        let admitted = match admission.enter().await {
            Ok(permit) => admission
                .enter_pool(&self.pool_slots)
                .await
                .map(|slot| (permit, slot)),
            Err(rejected) => Err(rejected),
        };
        record.queued_us = micros(queued_from.elapsed());
        let permits = match admitted {
            Ok((permit, slot)) => (
                permit,
                SlotInUse::hold(slot, &self.metrics.pool_slots_in_use),
            ),
            Err(rejected) => {
                record.reason = Some(rejected.to_string());
                return None;
            }
        };
        let start = Instant::now();
        match self.registry.acquire(&record.function).await {
            Ok((loaded, cold)) => {
                record.cold = cold.is_some();
                record.load = cold;
                Some((permits, loaded, start))
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
    fn record_execution(&self, record: &mut InvocationRecord, exec: &Execution) {
        record.outcome = exec.outcome;
        record.reason = exec.reason.clone();
        record.exit_code = exec.exit_code;
        record.cpu_us = micros(exec.cpu);
        record.peak_memory_bytes = exec.peak_memory;
        record.memory_kib_us = exec.memory_kib_us;
        record.fuel_consumed = exec.fuel_consumed;
        record.instantiate_us = micros(exec.instantiate);
        record.run_us = micros(exec.run);
        let logs = match &self.registry.kind(&record.function) {
            // A component's stdout is a log stream too.
            Some(crate::cache::WasmKind::Component) => vec![&exec.stdout, &exec.stderr],
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
    /// durable: an answer is never sent for an invocation the ledger could
    /// still lose.
    async fn finish(&self, record: InvocationRecord) -> InvocationRecord {
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
        let durable = if self.engine.tuning().metering {
            self.sink.record(&record)
        } else {
            Durable::now()
        };
        if let Err(e) = durable.wait().await {
            tracing::error!(
                invocation_id = record.invocation_id.as_str(),
                error = e.as_str(),
                "the invocation's record could not be made durable"
            );
        }
        record
    }
}

/// A pool slot held by a running invocation, counted in the gauge while held.
struct SlotInUse<'a> {
    _permit: tokio::sync::SemaphorePermit<'a>,
    gauge: &'a prometheus::IntGauge,
}

impl<'a> SlotInUse<'a> {
    fn hold(
        permit: tokio::sync::SemaphorePermit<'a>,
        gauge: &'a prometheus::IntGauge,
    ) -> SlotInUse<'a> {
        gauge.inc();
        SlotInUse {
            _permit: permit,
            gauge,
        }
    }
}

impl Drop for SlotInUse<'_> {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}
