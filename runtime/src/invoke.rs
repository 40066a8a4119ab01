//! One invocation: a fresh instance from the pool, its limits (deadline,
//! memory, fuel), its input and output, and its measurements.
//!
//! This module knows nothing of queues or HTTP; it turns a loaded function and
//! an [`Event`] into an [`Execution`].

use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use wasmtime::{ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::{MemoryInputPipe, MemoryOutputPipe};
use wasmtime_wasi::{I32Exit, WasiCtxBuilder};

use crate::engine::{EPOCH_TICK, KelvinEngine};
use crate::metering::Outcome;
use crate::registry::LoadedFunction;

/// Guest stderr kept per invocation; the rest is dropped (logs are not a
/// data channel, and an unbounded buffer is a memory bomb).
const MAX_STDERR: usize = 256 * 1024;

/// What starts an invocation: the trigger's name, the input on stdin, and
/// trigger metadata as environment variables.
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub trigger: &'static str,
    pub input: Bytes,
    pub env: Vec<(String, String)>,
}

/// The store's data: WASI state and the memory meter.
pub struct Host {
    wasi: WasiP1Ctx,
    meter: MemoryMeter,
}

impl Host {
    pub(crate) fn wasi(&mut self) -> &mut WasiP1Ctx {
        &mut self.wasi
    }

    /// A host with no I/O, for linking checks.
    pub(crate) fn empty() -> Host {
        Host {
            wasi: WasiCtxBuilder::new().build_p1(),
            meter: MemoryMeter::new(0),
        }
    }
}

/// Caps linear memory and measures it: the peak, and the exact size-time
/// integral (linear memory only grows during an instance's life, so the
/// integral is a sum of rectangles between grow events).
struct MemoryMeter {
    limit: u64,
    current: u64,
    peak: u64,
    since: Option<Instant>,
    kib_us: u128,
    denied: Option<u64>,
}

impl MemoryMeter {
    fn new(limit: u64) -> MemoryMeter {
        MemoryMeter {
            limit,
            current: 0,
            peak: 0,
            since: None,
            kib_us: 0,
            denied: None,
        }
    }

    fn advance(&mut self, now: Instant) {
        if let Some(since) = self.since {
            let us = now.saturating_duration_since(since).as_micros();
            self.kib_us += u128::from(self.current / 1024) * us;
        }
        self.since = Some(now);
    }
}

impl ResourceLimiter for MemoryMeter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let desired = desired as u64;
        if desired > self.limit {
            // A failed grow, not a trap: the guest may handle it.
            self.denied = Some(desired);
            return Ok(false);
        }
        self.advance(Instant::now());
        self.current = desired;
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// The epoch callback's error when an invocation passes its deadline.
#[derive(Debug, thiserror::Error)]
#[error("deadline exceeded")]
struct DeadlineExceeded;

/// What running one invocation produced.
#[derive(Debug, Clone)]
pub struct Execution {
    pub outcome: Outcome,
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
    pub stdout: Bytes,
    pub stderr: Bytes,
    pub instantiate: Duration,
    pub run: Duration,
    pub cpu: Duration,
    pub peak_memory: u64,
    pub memory_kib_us: u64,
    pub fuel_consumed: Option<u64>,
}

/// Runs `f` once in a fresh instance.
pub async fn execute(
    engine: &KelvinEngine,
    f: &LoadedFunction,
    invocation_id: &str,
    event: &Event,
    max_output: usize,
) -> Execution {
    let spec = &f.spec;
    // One byte over the limit: a guest that writes more than `max_output`
    // fills it, which is how an overflow is told from output that fits.
    let stdout = MemoryOutputPipe::new(max_output.saturating_add(1));
    let stderr = MemoryOutputPipe::new(MAX_STDERR);
    let mut wasi = WasiCtxBuilder::new();
    wasi.stdin(MemoryInputPipe::new(event.input.clone()))
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .arg(spec.name.as_str())
        .env("KELVIN_FUNCTION", spec.name.as_str())
        .env("KELVIN_INVOCATION_ID", invocation_id)
        .env("KELVIN_TRIGGER", event.trigger)
        .envs(&spec.env)
        .envs(&event.env);
    let host = Host {
        wasi: wasi.build_p1(),
        meter: MemoryMeter::new(spec.limits.memory),
    };
    let mut store = Store::new(engine.engine(), host);
    store.limiter(|h| &mut h.meter);

    let fuel_budget = engine
        .fuel_enabled()
        .then(|| spec.limits.fuel.map_or(u64::MAX, |f| f.get()));
    if let Some(budget) = fuel_budget {
        store
            .set_fuel(budget)
            .expect("fuel is enabled on this engine");
    }

    let timeout = spec.limits.timeout;
    let deadline = Instant::now() + timeout;
    // Check the deadline at every tick; in between, yield so one busy guest
    // cannot hold a scheduler thread for its whole timeout.
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if Instant::now() >= deadline {
            Err(wasmtime::Error::new(DeadlineExceeded))
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });

    let mut instantiate = Duration::ZERO;
    let mut run = Duration::ZERO;
    let mut run_started = None;
    let mut cpu = Duration::ZERO;
    let result = {
        let work = async {
            let t = Instant::now();
            let instance = f.pre.instantiate_async(&mut store).await?;
            instantiate = t.elapsed();
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            let t = *run_started.insert(Instant::now());
            let r = cpu_timed(start.call_async(&mut store, ()), &mut cpu).await;
            run = t.elapsed();
            r
        };
        // Epoch checks stop guests that compute; this stops guests that wait
        // in a host call (a long sleep), where no epoch check runs.
        let backstop = tokio::time::Instant::from_std(deadline + 2 * EPOCH_TICK);
        tokio::time::timeout_at(backstop, work).await
    };
    if let (Err(_), Some(t)) = (&result, run_started) {
        // Stopped by the backstop mid-run: count the time it ran.
        run = t.elapsed();
    }

    let fuel_consumed = fuel_budget.map(|budget| budget - store.get_fuel().unwrap_or(0));
    let meter = &mut store.data_mut().meter;
    meter.advance(Instant::now());
    let (peak_memory, memory_kib_us, denied) = (meter.peak, meter.kib_us, meter.denied);
    drop(store);

    let stdout = stdout.contents();
    let stderr = stderr.contents();
    let mut exit_code = None;
    let (outcome, reason) = match result {
        Err(_elapsed) => (
            Outcome::Timeout,
            Some(format!(
                "timed out after {}",
                humantime::format_duration(timeout)
            )),
        ),
        Ok(Ok(())) => (Outcome::Ok, None),
        Ok(Err(e)) => {
            if let Some(exit) = e.downcast_ref::<I32Exit>() {
                exit_code = Some(exit.0);
                if exit.0 == 0 {
                    (Outcome::Ok, None)
                } else {
                    (
                        Outcome::Error,
                        Some(format!(
                            "exited with code {}{}",
                            exit.0,
                            last_words(&stderr)
                        )),
                    )
                }
            } else if e.downcast_ref::<DeadlineExceeded>().is_some() {
                (
                    Outcome::Timeout,
                    Some(format!(
                        "timed out after {}",
                        humantime::format_duration(timeout)
                    )),
                )
            } else if let Some(trap) = e.downcast_ref::<Trap>() {
                let reason = if let Some(asked) = denied {
                    format!(
                        "memory limit of {} exceeded (asked for {})",
                        human_size(spec.limits.memory),
                        human_size(asked)
                    )
                } else if *trap == Trap::OutOfFuel {
                    format!("fuel exhausted (limit {})", fuel_budget.unwrap_or(0))
                } else {
                    format!("{trap}{}", last_words(&stderr))
                };
                (Outcome::Trap, Some(reason))
            } else {
                (Outcome::Error, Some(format!("{e:#}")))
            }
        }
    };

    // Truncated output must never pass for a result, whatever the guest did
    // after its write failed.
    let (outcome, reason, stdout) = if stdout.len() > max_output {
        let why = format!(
            "output exceeded the {} limit (server.max_body)",
            human_size(max_output as u64)
        );
        (Outcome::Error, Some(why), Bytes::new())
    } else {
        (outcome, reason, stdout)
    };

    Execution {
        outcome,
        reason,
        exit_code,
        stdout,
        stderr,
        instantiate,
        run,
        cpu,
        peak_memory,
        memory_kib_us: u64::try_from(memory_kib_us).unwrap_or(u64::MAX),
        fuel_consumed,
    }
}

/// `32 MiB` for whole units, else the nearest IEC unit with a decimal.
pub(crate) fn human_size(bytes: u64) -> String {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    bytesize::ByteSize(bytes).display().iec().to_string()
}

/// The guest's own explanation, if it printed a Rust panic message.
fn last_words(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    match text.lines().find(|l| l.contains("panicked at")) {
        Some(line) => {
            // The message follows on the next line in recent Rust versions.
            let mut lines = text.lines().skip_while(|l| !l.contains("panicked at"));
            let at = lines.next().unwrap_or(line);
            let msg = lines.next().unwrap_or("");
            format!(" ({} {})", at.trim(), msg.trim()).replace("  ", " ")
        }
        None => String::new(),
    }
}

/// Polls `fut`, adding the calling thread's CPU time during each poll to
/// `cpu`. Summing per poll stays right when the invocation yields and resumes
/// on another thread.
async fn cpu_timed<F: Future>(fut: F, cpu: &mut Duration) -> F::Output {
    let mut fut = pin!(fut);
    std::future::poll_fn(|cx| {
        let before = thread_cpu_time();
        let r = fut.as_mut().poll(cx);
        *cpu += thread_cpu_time().saturating_sub(before);
        match r {
            Poll::Ready(v) => Poll::Ready(v),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; the clock id is
    // a constant every Linux supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}
