//! The runtime: ties a validated manifest to the engine, the registry,
//! admission control and the metering sink, and runs invocations end to end
//! (admit -> load -> execute -> record).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;

use crate::admission::Admission;
use crate::engine::{EngineSettings, KelvinEngine};
use crate::invoke::{self, Event};
use crate::manifest::Manifest;
use crate::metering::{InvocationRecord, Outcome, RecordSink};
use crate::metrics::Metrics;
use crate::registry::{Capacity, Registry, RegistryError, micros};

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

/// The result of one invocation: its output and its metering record.
#[derive(Debug, Clone)]
pub struct Invocation {
    pub record: InvocationRecord,
    pub stdout: Bytes,
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
        })
        .map_err(|e| StartError::Engine(format!("{e:#}")))?;
        let engine = Arc::new(engine);
        let metrics = Metrics::new();
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

    /// Runs one invocation of `function` and records it.
    pub async fn invoke(
        &self,
        function: &str,
        event: Event,
    ) -> Result<Invocation, UnknownFunction> {
        let admission = self
            .admission
            .get(function)
            .ok_or_else(|| UnknownFunction(function.to_owned()))?;
        let invocation_id = uuid::Uuid::now_v7().to_string();
        let started_at = SystemTime::now();
        let queued_from = Instant::now();
        let mut record = InvocationRecord {
            invocation_id: invocation_id.clone(),
            function: function.to_owned(),
            trigger: event.trigger.to_owned(),
            started_at: humantime::format_rfc3339_micros(started_at).to_string(),
            outcome: Outcome::Rejected,
            reason: None,
            wall_us: 0,
            queued_us: 0,
            cpu_us: 0,
            peak_memory_bytes: 0,
            memory_kib_us: 0,
            fuel_consumed: None,
            bytes_in: event.input.len() as u64,
            bytes_out: 0,
            cold: false,
            load: None,
            instantiate_us: 0,
            run_us: 0,
            exit_code: None,
        };

        let admitted = match admission.enter().await {
            Ok(permit) => admission
                .enter_pool(&self.pool_slots)
                .await
                .map(|slot| (permit, slot)),
            Err(rejected) => Err(rejected),
        };
        record.queued_us = micros(queued_from.elapsed());
        let _permits = match admitted {
            Ok((permit, slot)) => (
                permit,
                SlotInUse::hold(slot, &self.metrics.pool_slots_in_use),
            ),
            Err(rejected) => {
                record.reason = Some(rejected.to_string());
                return Ok(self.finish(record, Bytes::new()));
            }
        };

        let start = Instant::now();
        let (loaded, cold) = match self.registry.acquire(function).await {
            Ok(l) => l,
            Err(e) => {
                record.outcome = Outcome::Error;
                record.reason = Some(e.to_string());
                record.wall_us = micros(start.elapsed());
                return Ok(self.finish(record, Bytes::new()));
            }
        };
        record.cold = cold.is_some();
        record.load = cold;

        let max_output = usize::try_from(self.manifest.server.max_body).unwrap_or(usize::MAX);
        let exec = invoke::execute(&self.engine, &loaded, &invocation_id, &event, max_output).await;
        record.wall_us = micros(start.elapsed());
        record.outcome = exec.outcome;
        record.reason = exec.reason;
        record.exit_code = exec.exit_code;
        record.cpu_us = micros(exec.cpu);
        record.peak_memory_bytes = exec.peak_memory;
        record.memory_kib_us = exec.memory_kib_us;
        record.fuel_consumed = exec.fuel_consumed;
        record.bytes_out = exec.stdout.len() as u64;
        record.instantiate_us = micros(exec.instantiate);
        record.run_us = micros(exec.run);

        // Guest logs, attributed to the invocation.
        for line in String::from_utf8_lossy(&exec.stderr).lines() {
            tracing::info!(target: "kelvin::guest", function, invocation_id = invocation_id.as_str(), "{line}");
        }
        Ok(self.finish(record, exec.stdout))
    }

    fn finish(&self, record: InvocationRecord, stdout: Bytes) -> Invocation {
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
        self.sink.record(&record);
        Invocation { record, stdout }
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
