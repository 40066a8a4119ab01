//! Cold-start measurement: each function started from scratch (compiled),
//! from the artifact cache (evicted, then loaded), and warm (instantiated
//! from the pool), per phase, in this process.

use std::time::Instant;

use bytes::Bytes;
use serde::Serialize;

use super::{Summary, human_us, table};
use crate::invoke::Event;
use crate::metering::{Durable, InvocationRecord, LoadSource, Outcome, RecordSink};
use crate::registry::micros;
use crate::runtime::Runtime;

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

/// Measures `iterations` starts of each function at each temperature. The
/// temperatures alternate within an iteration, so drift (a busy machine,
/// thermal throttling) affects all three alike. `step` is called after
/// every invocation, with the function's name.
///
/// The runtime should have a scratch `state_dir`: cold-from-scratch
/// samples delete the function's compiled artifact.
pub async fn measure(
    runtime: &Runtime,
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
        match measure_one(runtime, function, iterations, &input, step).await {
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
    runtime: &Runtime,
    function: &str,
    iterations: u32,
    input: &Bytes,
    step: &dyn Fn(&str),
) -> Result<FunctionReport, String> {
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
        let event = Event {
            trigger: "bench",
            input: input.clone(),
            env: Vec::new(),
        };
        let started = Instant::now();
        let invocation = runtime
            .invoke(function, event)
            .await
            .map_err(|e| e.to_string())?;
        let total = micros(started.elapsed());
        let r = invocation.record;
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
