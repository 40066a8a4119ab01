//! Prometheus metrics: invocations, cold-start phases, loads, evictions.
//! Each [`Metrics`] has its own registry, so tests running several servers in
//! one process do not share counters.

use prometheus::{
    CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::metering::InvocationRecord;

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub invocations: IntCounterVec,
    pub duration: HistogramVec,
    pub cold_start_phase: HistogramVec,
    pub loads: IntCounterVec,
    pub evictions: IntCounterVec,
    pub loaded: IntGauge,
    pub queue_depth: IntGaugeVec,
    pub queue_wait: HistogramVec,
    pub pool_slots_in_use: IntGauge,
    pub guest_cpu_seconds: CounterVec,
    pub guest_memory_byte_seconds: CounterVec,
    pub log_lines_dropped: prometheus::IntCounter,
    /// Event triggers' state (see [`EventGauges`]).
    pub events: EventGauges,
}

/// Durable queues, timers and blob triggers.
#[derive(Clone)]
pub struct EventGauges {
    pub queue_messages: IntGaugeVec,
    pub queue_leased: IntGaugeVec,
    pub queue_oldest_age: prometheus::GaugeVec,
    pub queue_poison: IntGaugeVec,
    pub timer_lateness: HistogramVec,
    pub blob_backlog: IntGaugeVec,
    pub blob_outbox: IntGaugeVec,
}

impl EventGauges {
    fn new() -> EventGauges {
        let gauge = |name: &str, help: &str, label: &str| {
            IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric")
        };
        EventGauges {
            queue_messages: gauge(
                "kelvin_event_queue_messages",
                "Messages in a durable queue, leased or not (its depth)",
                "queue",
            ),
            queue_leased: gauge(
                "kelvin_event_queue_leased_messages",
                "Messages of a durable queue leased by a running function",
                "queue",
            ),
            queue_oldest_age: prometheus::GaugeVec::new(
                Opts::new(
                    "kelvin_event_queue_oldest_message_age_seconds",
                    "Age of a durable queue's oldest message (0 when empty)",
                ),
                &["queue"],
            )
            .expect("valid metric"),
            queue_poison: gauge(
                "kelvin_event_queue_poison_messages",
                "Messages in a queue's poison queue (<queue>-poison)",
                "queue",
            ),
            timer_lateness: HistogramVec::new(
                HistogramOpts::new(
                    "kelvin_timer_lateness_seconds",
                    "How long after its scheduled time a timer's run started",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["function"],
            )
            .expect("valid metric"),
            blob_backlog: gauge(
                "kelvin_blob_backlog",
                "Blobs a blob-triggered function has yet to process (new versions, retries)",
                "function",
            ),
            blob_outbox: gauge(
                "kelvin_blob_outbox",
                "Output blobs committed but not yet written: pending (written soon or retried) and failed (given up on)",
                "state",
            ),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.queue_messages.clone()),
            Box::new(self.queue_leased.clone()),
            Box::new(self.queue_oldest_age.clone()),
            Box::new(self.queue_poison.clone()),
            Box::new(self.timer_lateness.clone()),
            Box::new(self.blob_backlog.clone()),
            Box::new(self.blob_outbox.clone()),
        ]
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let invocations = IntCounterVec::new(
            Opts::new(
                "kelvin_invocations_total",
                "Invocations by function, trigger, outcome and temperature",
            ),
            &["function", "trigger", "outcome", "temperature"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new("kelvin_invocation_duration_seconds", "Invocation wall time")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["function"],
        )
        .expect("valid metric");
        let cold_start_phase = HistogramVec::new(
            HistogramOpts::new(
                "kelvin_cold_start_phase_seconds",
                "Cold-start phases: load (from cache), compile, baseline (Winch), instantiate",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["phase"],
        )
        .expect("valid metric");
        let loads = IntCounterVec::new(
            Opts::new(
                "kelvin_function_loads_total",
                "Functions loaded, by source (cache, compile or baseline)",
            ),
            &["function", "source"],
        )
        .expect("valid metric");
        let evictions = IntCounterVec::new(
            Opts::new(
                "kelvin_evictions_total",
                "Functions unloaded, by reason (idle, capacity, memory)",
            ),
            &["function", "reason"],
        )
        .expect("valid metric");
        let loaded = IntGauge::new("kelvin_loaded_functions", "Functions currently loaded")
            .expect("valid metric");
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "kelvin_queue_depth",
                "Invocations waiting for a concurrency slot",
            ),
            &["function"],
        )
        .expect("valid metric");
        let queue_wait = HistogramVec::new(
            HistogramOpts::new(
                "kelvin_queue_wait_seconds",
                "Time invocations waited for a concurrency slot",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["function"],
        )
        .expect("valid metric");
        let pool_slots_in_use = IntGauge::new(
            "kelvin_pool_slots_in_use",
            "Pooling-allocator instance slots held by running invocations",
        )
        .expect("valid metric");
        let guest_cpu_seconds = CounterVec::new(
            Opts::new("kelvin_guest_cpu_seconds_total", "CPU time spent in guests"),
            &["function"],
        )
        .expect("valid metric");
        let guest_memory_byte_seconds = CounterVec::new(
            Opts::new(
                "kelvin_guest_memory_byte_seconds_total",
                "Guest linear memory integrated over time (memory-time)",
            ),
            &["function"],
        )
        .expect("valid metric");
        let log_lines_dropped = prometheus::IntCounter::new(
            "kelvin_log_lines_dropped_total",
            "Log lines (and JSON-lines records) dropped because their output did not keep up",
        )
        .expect("valid metric");
        for c in [
            Box::new(log_lines_dropped.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(invocations.clone()),
            Box::new(duration.clone()),
            Box::new(cold_start_phase.clone()),
            Box::new(loads.clone()),
            Box::new(evictions.clone()),
            Box::new(loaded.clone()),
            Box::new(queue_depth.clone()),
            Box::new(queue_wait.clone()),
            Box::new(pool_slots_in_use.clone()),
            Box::new(guest_cpu_seconds.clone()),
            Box::new(guest_memory_byte_seconds.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        let events = EventGauges::new();
        for c in events.collectors() {
            registry.register(c).expect("metric names are unique");
        }
        Metrics {
            events,
            registry,
            invocations,
            duration,
            cold_start_phase,
            loads,
            evictions,
            loaded,
            queue_depth,
            queue_wait,
            pool_slots_in_use,
            guest_cpu_seconds,
            guest_memory_byte_seconds,
            log_lines_dropped,
        }
    }

    /// Creates every series whose labels are known at start-up, at 0, so
    /// a rate or an alert sees each one before its first event (as
    /// Prometheus' instrumentation guide advises): per function, its
    /// evictions by reason, loads by source, and invocations by each of
    /// its triggers, outcome and temperature.
    pub fn start_at_zero(&self, functions: &[crate::manifest::FunctionSpec]) {
        use crate::metering::Outcome;
        const OUTCOMES: [Outcome; 6] = [
            Outcome::Ok,
            Outcome::Error,
            Outcome::Timeout,
            Outcome::Trap,
            Outcome::Rejected,
            Outcome::Abandoned,
        ];
        for f in functions {
            let name = f.name.as_str();
            for reason in ["idle", "capacity", "memory"] {
                self.evictions.with_label_values(&[name, reason]);
            }
            for source in ["cache", "compile", "baseline"] {
                self.loads.with_label_values(&[name, source]);
            }
            let mut triggers: Vec<&str> = f.triggers.iter().map(|t| t.kind()).collect();
            triggers.dedup();
            for trigger in triggers {
                for outcome in OUTCOMES {
                    for temperature in ["cold", "warm"] {
                        self.invocations.with_label_values(&[
                            name,
                            trigger,
                            outcome.as_str(),
                            temperature,
                        ]);
                    }
                }
            }
            self.guest_cpu_seconds.with_label_values(&[name]);
            self.guest_memory_byte_seconds.with_label_values(&[name]);
            self.queue_depth.with_label_values(&[name]);
        }
    }

    pub fn observe(&self, r: &InvocationRecord) {
        let temperature = if r.cold { "cold" } else { "warm" };
        self.invocations
            .with_label_values(&[
                r.function.as_str(),
                r.trigger.as_str(),
                r.outcome.as_str(),
                temperature,
            ])
            .inc();
        self.duration
            .with_label_values(&[r.function.as_str()])
            .observe(r.wall_us as f64 / 1e6);
        let f = [r.function.as_str()];
        self.guest_cpu_seconds
            .with_label_values(&f)
            .inc_by(r.cpu_us as f64 / 1e6);
        // KiB x us to byte x s.
        self.guest_memory_byte_seconds
            .with_label_values(&f)
            .inc_by(r.memory_kib_us as f64 * 1024.0 / 1e6);
        self.queue_wait
            .with_label_values(&f)
            .observe(r.queued_us as f64 / 1e6);
        if let Some(load) = r.load {
            let phase = match load.source {
                crate::metering::LoadSource::Cache => "load",
                crate::metering::LoadSource::Compile => "compile",
                crate::metering::LoadSource::Baseline => "baseline",
            };
            self.cold_start_phase
                .with_label_values(&[phase])
                .observe(load.load_us as f64 / 1e6);
            self.cold_start_phase
                .with_label_values(&["instantiate"])
                .observe(r.instantiate_us as f64 / 1e6);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.render_without(&std::collections::HashSet::new())
    }

    /// The exposition without the series of the functions in `hidden` (a
    /// caller without a key sees no protected function's name or usage).
    pub fn render_without(&self, hidden: &std::collections::HashSet<String>) -> String {
        let dropped = crate::batch::dropped_total();
        let seen = self.log_lines_dropped.get();
        if dropped > seen {
            self.log_lines_dropped.inc_by(dropped - seen);
        }
        let mut families = self.registry.gather();
        if !hidden.is_empty() {
            for family in &mut families {
                family.mut_metric().retain(|m| {
                    !m.get_label()
                        .iter()
                        .any(|l| l.name() == "function" && hidden.contains(l.value()))
                });
            }
            families.retain(|f| !f.get_metric().is_empty());
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
