//! Cold-start measurement: each function started from scratch (compiled),
//! from the artifact cache (evicted, then loaded), and warm (instantiated
//! from the pool), per phase, in this process, with the event its first
//! trigger would give it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Serialize;

use super::{Summary, human_us, table};
use crate::events::envelope::{self, BlobMeta, TimerMeta};
use crate::invoke::Event;
use crate::metering::{Durable, InvocationRecord, LoadSource, Outcome, RecordSink};
use crate::registry::micros;
use crate::router::Method;
use crate::runtime::{Admit, Runtime};
use crate::trigger::cgi;
use crate::trigger::config::TriggerConfig;

/// How much of a function is ready when an invocation arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Temperature {
    /// No compiled artifact: compile + instantiate + run.
    Scratch,
    /// Artifact on disk, first load in the process (as after a restart):
    /// its checks + load + instantiate + run.
    Restart,
    /// Artifact on disk, checked by this process before it evicted the
    /// function: load + instantiate + run.
    Cache,
    /// Loaded: instantiate from the pool + run.
    Warm,
}

impl Temperature {
    pub const ALL: [Temperature; 4] = [
        Temperature::Scratch,
        Temperature::Restart,
        Temperature::Cache,
        Temperature::Warm,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Temperature::Scratch => "cold from scratch",
            Temperature::Restart => "cold from cache, restart",
            Temperature::Cache => "cold from cache, evicted",
            Temperature::Warm => "warm",
        }
    }
}

/// The phases of an invocation, in microseconds, one entry per sample.
#[derive(Debug, Default, Clone)]
struct Samples {
    load: Vec<u64>,
    instantiate: Vec<u64>,
    run: Vec<u64>,
    total: Vec<u64>,
}

/// One phase's percentiles.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseSummary {
    /// `load` (compile or load from cache, and link), `instantiate`, `run`,
    /// or `total` (as the caller saw it, including Kelvin's own work).
    pub phase: &'static str,
    #[serde(flatten)]
    pub summary: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct TemperatureReport {
    pub temperature: Temperature,
    pub phases: Vec<PhaseSummary>,
    /// Every total, in the order measured (for plots and your own analysis).
    pub total_us: Vec<u64>,
}

impl TemperatureReport {
    pub fn phase(&self, phase: &str) -> Option<&Summary> {
        self.phases
            .iter()
            .find(|p| p.phase == phase)
            .map(|p| &p.summary)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionReport {
    pub function: String,
    /// The event it was started with, as its first trigger gives it:
    /// `GET /hello/bench`, `queue orders`, `blob images/bench`, `timer`.
    pub event: String,
    /// `module` (preview 1) or `component` (wasi:http).
    pub kind: &'static str,
    pub temperatures: Vec<TemperatureReport>,
}

/// A function that could not be measured, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub function: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ColdStartReport {
    pub iterations: u32,
    pub functions: Vec<FunctionReport>,
    pub skipped: Vec<Skipped>,
}

/// A sink that keeps nothing: the bench times starts, not the ledger.
struct Discard;

impl RecordSink for Discard {
    fn record(&self, _: &InvocationRecord) -> Durable {
        Durable::now()
    }
}

/// The sink a benchmark's runtime should use.
pub fn discard_sink() -> std::sync::Arc<dyn RecordSink> {
    std::sync::Arc::new(Discard)
}

/// The sink of [`measure`]'s runtime: it keeps each record until the
/// bench takes it (a component's HTTP answer comes before its record).
#[derive(Default)]
pub struct Records(Mutex<HashMap<String, InvocationRecord>>);

impl Records {
    fn take(&self, invocation_id: &str) -> Option<InvocationRecord> {
        self.0.lock().expect("records lock").remove(invocation_id)
    }
}

impl RecordSink for Records {
    fn record(&self, r: &InvocationRecord) -> Durable {
        self.0
            .lock()
            .expect("records lock")
            .insert(r.invocation_id.clone(), r.clone());
        Durable::now()
    }
}

/// How a function is started: as its first trigger starts it.
enum Start {
    /// An event: a CGI request's environment and body, or a queue, blob
    /// or timer event's JSON.
    Event(Event),
    /// A wasi:http component's HTTP request.
    Request { method: Method, path: String },
}

impl Start {
    /// What `function`'s first trigger would give it, `input` as the
    /// request's body, the message's body or the blob's bytes; and its
    /// description.
    fn of(runtime: &Runtime, function: &str, input: &Bytes) -> Result<(Start, String), String> {
        let unit = runtime.production(function).map_err(|e| e.to_string())?;
        let event = |trigger, input| {
            Start::Event(Event {
                trigger,
                input,
                ..Event::default()
            })
        };
        let Some(trigger) = unit.spec.triggers.first() else {
            return Ok((event("bench", input.clone()), "its input".to_owned()));
        };
        let now = crate::events::now_us();
        Ok(match trigger {
            TriggerConfig::Http(http) => {
                // GET where the route takes it: what a browser or a probe
                // sends; else the first method it takes.
                let method = [
                    Method::Get,
                    Method::Post,
                    Method::Put,
                    Method::Patch,
                    Method::Delete,
                    Method::Options,
                ]
                .into_iter()
                .find(|m| http.methods.contains(*m))
                .unwrap_or(Method::Get);
                let path = http.route.example("bench");
                let what = format!("{} {path}", method.as_str());
                if runtime.is_component(&unit) {
                    (Start::Request { method, path }, what)
                } else {
                    let request = hyper::Request::builder()
                        .method(method.as_str())
                        .uri(&path)
                        .header(hyper::header::HOST, "localhost")
                        .body(())
                        .map_err(|e| e.to_string())?;
                    let (parts, ()) = request.into_parts();
                    let route = http.route.to_string();
                    let params: Vec<(String, String)> = http
                        .route
                        .params()
                        .map(|name| (name.to_owned(), "bench".to_owned()))
                        .collect();
                    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
                    let meta = cgi::Meta {
                        peer: local,
                        local,
                        route: &route,
                        params: &params,
                        query: "",
                    };
                    let env = cgi::env(&parts, input.len(), &meta);
                    (
                        Start::Event(Event {
                            trigger: "http",
                            input: input.clone(),
                            env,
                            files: Vec::new(),
                        }),
                        what,
                    )
                }
            }
            TriggerConfig::Queue(q) => {
                let message = crate::events::Message {
                    id: "bench".to_owned(),
                    queue: q.queue.to_string(),
                    body: input.clone(),
                    inserted_us: now,
                    dequeue_count: 1,
                    lease: String::new(),
                    visible_us: now,
                };
                (
                    event("queue", envelope::queue_event(&message, function)),
                    format!("queue {}", q.queue),
                )
            }
            TriggerConfig::Blob(b) => {
                let name = b.path.example("bench");
                let params = b.path.matches(&name).unwrap_or_default();
                let meta = BlobMeta {
                    container: b.path.container(),
                    name: &name,
                    etag: "bench",
                    params: &params,
                };
                (
                    event("blob", envelope::blob_event(&meta, input, function)),
                    format!("blob {}/{name}", b.path.container()),
                )
            }
            TriggerConfig::Timer(t) => {
                let meta = TimerMeta {
                    schedule: t.schedule.as_str(),
                    scheduled_us: now,
                    past_due: false,
                    last_us: None,
                    next_us: None,
                };
                (
                    event("timer", envelope::timer_event(&meta, function)),
                    format!("timer {}", t.schedule.as_str()),
                )
            }
            TriggerConfig::Durable(_) => {
                return Err(
                    "a durable function runs within an orchestration; `benches/durable.sh` measures those"
                        .to_owned(),
                );
            }
        })
    }
}

/// Measures `iterations` starts of each function at each temperature. The
/// temperatures alternate within an iteration, so drift (a busy machine,
/// thermal throttling) affects all three alike. `step` is called after
/// every invocation, with the function's name.
///
/// The runtime should have a scratch `state_dir` (cold-from-scratch
/// samples delete the function's compiled artifact) and `records` as its
/// sink. Outputs are not published: the bench measures starts.
pub async fn measure(
    runtime: &Arc<Runtime>,
    records: &Records,
    functions: &[String],
    iterations: u32,
    input: Bytes,
    step: &dyn Fn(&str),
) -> ColdStartReport {
    let mut report = ColdStartReport {
        iterations,
        functions: Vec::new(),
        skipped: Vec::new(),
    };
    for function in functions {
        match measure_one(runtime, records, function, iterations, &input, step).await {
            Ok(r) => report.functions.push(r),
            Err(reason) => report.skipped.push(Skipped {
                function: function.clone(),
                reason,
            }),
        }
    }
    report
}

async fn measure_one(
    runtime: &Arc<Runtime>,
    records: &Records,
    function: &str,
    iterations: u32,
    input: &Bytes,
    step: &dyn Fn(&str),
) -> Result<FunctionReport, String> {
    let (start, event) = Start::of(runtime, function, input)?;
    let invoke = async |temperature: Temperature| -> Result<(InvocationRecord, u64), String> {
        match temperature {
            Temperature::Scratch => drop(runtime.registry().unload(function, true)),
            Temperature::Restart => {
                runtime.registry().unload(function, false);
                runtime.registry().forget_verified();
            }
            Temperature::Cache => drop(runtime.registry().unload(function, false)),
            Temperature::Warm => {}
        }
        let started = Instant::now();
        let r = match &start {
            Start::Event(event) => {
                let invocation = runtime
                    .invoke(function, event.clone())
                    .await
                    .map_err(|e| e.to_string())?;
                records.take(&invocation.record.invocation_id);
                invocation.record
            }
            Start::Request { method, path } => {
                let ticket = match runtime.admit(function, "http").await {
                    Ok(Admit::Admitted(ticket)) => ticket,
                    Ok(Admit::Rejected(checked)) => {
                        return Err(format!(
                            "it was not admitted ({:?})",
                            checked.record.outcome
                        ));
                    }
                    Err(e) => return Err(e.to_string()),
                };
                let request = hyper::Request::builder()
                    .method(method.as_str())
                    .uri(format!("http://localhost{path}"))
                    .header(hyper::header::HOST, "localhost")
                    .body(Full::new(input.clone()))
                    .map_err(|e| e.to_string())?;
                let answer = runtime
                    .start_http(ticket, request, Vec::new(), false, ())
                    .await;
                let status = match answer.response {
                    Ok(response) => {
                        let status = response.status();
                        // Read to its end: the record is written then.
                        let _ = response.into_body().collect().await;
                        Some(status)
                    }
                    Err(_) => None,
                };
                let r = records
                    .take(&answer.invocation_id)
                    .ok_or("its invocation was not recorded")?;
                if let Some(status) = status.filter(|s| !s.is_success()) {
                    return Err(format!("it answered {status}"));
                }
                r
            }
        };
        let total = micros(started.elapsed());
        if r.outcome != Outcome::Ok {
            let why = r.reason.unwrap_or_else(|| r.outcome.as_str().to_owned());
            return Err(format!("it did not succeed ({why})"));
        }
        let expected = match temperature {
            Temperature::Scratch => Some(LoadSource::Compile),
            Temperature::Restart | Temperature::Cache => Some(LoadSource::Cache),
            Temperature::Warm => None,
        };
        if r.load.map(|l| l.source) != expected {
            return Err(format!(
                "a {} start was not one (is another process using the cache?)",
                temperature.label()
            ));
        }
        Ok((r, total))
    };

    // One untimed round: the first start in a process pays for more than the
    // function (lazy engine and allocator set-up).
    for t in Temperature::ALL {
        invoke(t).await?;
    }
    let mut samples: [Samples; 4] = Default::default();
    for _ in 0..iterations {
        for (i, t) in Temperature::ALL.into_iter().enumerate() {
            let (r, total) = invoke(t).await?;
            let s = &mut samples[i];
            if let Some(load) = r.load {
                s.load.push(load.load_us);
            }
            s.instantiate.push(r.instantiate_us);
            s.run.push(r.run_us);
            s.total.push(total);
            step(function);
        }
    }
    let kind = if runtime
        .production(function)
        .is_ok_and(|unit| runtime.is_component(&unit))
    {
        "component"
    } else {
        "module"
    };
    let temperatures = Temperature::ALL
        .into_iter()
        .zip(samples)
        .map(|(temperature, s)| {
            let phases = [
                ("load", &s.load),
                ("instantiate", &s.instantiate),
                ("run", &s.run),
                ("total", &s.total),
            ]
            .into_iter()
            .filter_map(|(phase, xs)| {
                Some(PhaseSummary {
                    phase,
                    summary: Summary::of(xs)?,
                })
            })
            .collect();
            TemperatureReport {
                temperature,
                phases,
                total_us: s.total,
            }
        })
        .collect();
    Ok(FunctionReport {
        function: function.to_owned(),
        event,
        kind,
        temperatures,
    })
}

impl ColdStartReport {
    /// The report as a table: one row per function, temperature and phase.
    pub fn table(&self) -> String {
        let mut rows = Vec::new();
        for f in &self.functions {
            for (ti, t) in f.temperatures.iter().enumerate() {
                for (pi, p) in t.phases.iter().enumerate() {
                    let s = &p.summary;
                    rows.push(vec![
                        if ti == 0 && pi == 0 {
                            f.function.clone()
                        } else if ti == 0 && pi == 1 {
                            format!("({})", f.event)
                        } else {
                            String::new()
                        },
                        if pi == 0 {
                            t.temperature.label().to_owned()
                        } else {
                            String::new()
                        },
                        p.phase.to_owned(),
                        human_us(s.p50),
                        human_us(s.p90),
                        human_us(s.p99),
                        human_us(s.max),
                    ]);
                }
            }
        }
        let mut out = table(
            &[
                "function",
                "temperature",
                "phase",
                "p50",
                "p90",
                "p99",
                "max",
            ],
            &rows,
            3,
        );
        for s in &self.skipped {
            out.push_str(&format!("skipped `{}`: {}\n", s.function, s.reason));
        }
        out
    }
}
