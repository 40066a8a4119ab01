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
use wasmtime::{InstancePre, ResourceLimiter, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{I32Exit, WasiCtxBuilder};

use crate::engine::{EPOCH_TICK, KelvinEngine};
use crate::manifest::{FunctionSpec, Limits};
use crate::metering::Outcome;
use crate::pipe::CappedPipe;

/// Guest stderr kept per invocation; the rest is accepted and dropped at
/// once (logs are not a data channel, and an unbounded buffer is a memory
/// bomb; see [`crate::pipe`]).
pub(crate) const MAX_STDERR: usize = 256 * 1024;

/// Host resources (pollables, streams) a preview-1 guest may hold at once.
/// Each `poll_oneoff` subscription is one: a guest polling 500,000 clocks
/// made the host allocate 275 MB outside its `memory` limit. Real programs
/// poll a handful; past this the call traps.
pub(crate) const MAX_P1_RESOURCES: usize = 1024;

/// The same for a component (fields, bodies, streams, pollables, outgoing
/// requests): more room, still bounded.
pub(crate) const MAX_COMPONENT_RESOURCES: usize = 16 * 1024;

/// Bytes a guest may hand the host in one call at least (wasmtime's
/// hostcall fuel; the default is 128 MiB). A preview-1 guest may write its
/// whole output in one call, so its budget is `max_body` when larger.
pub(crate) const MIN_HOSTCALL_BYTES: usize = 1 << 20;

/// The function an invocation runs: its spec and the engine its code
/// belongs to (stores are made there).
#[derive(Clone, Copy)]
pub struct Code<'a> {
    pub spec: &'a FunctionSpec,
    pub engine: &'a wasmtime::Engine,
}

/// What starts an invocation: the trigger's name, the input on stdin,
/// trigger metadata as environment variables, and its input bindings'
/// files, mounted read-only.
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub trigger: &'static str,
    pub input: Bytes,
    pub env: Vec<(String, String)>,
    pub files: Vec<crate::manifest::FileMount>,
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

    /// A host with no I/O and no memory, for linking checks and
    /// benchmarks of instantiation.
    pub fn empty() -> Host {
        Host {
            wasi: WasiCtxBuilder::new().build_p1(),
            meter: MemoryMeter::new(0),
        }
    }
}

/// Caps linear memory and measures it: the peak, and the exact size-time
/// integral (linear memory only grows during an instance's life, so the
/// integral is a sum of rectangles between grow events).
pub(crate) struct MemoryMeter {
    limit: u64,
    current: u64,
    peak: u64,
    since: Option<Instant>,
    kib_us: u128,
    denied: Option<u64>,
}

impl MemoryMeter {
    pub(crate) fn new(limit: u64) -> MemoryMeter {
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
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// The most elements a guest's table may hold.
pub const MAX_TABLE_ELEMENTS: usize = 1_000_000;

/// The epoch callback's error when an invocation passes its deadline.
#[derive(Debug, thiserror::Error)]
#[error("deadline exceeded")]
struct DeadlineExceeded;

/// Logs that the guest wrote past [`MAX_STDERR`] were dropped: say so once.
pub(crate) fn note_dropped_logs(function: &str, invocation_id: &str, dropped: u64) {
    if dropped > 0 {
        tracing::warn!(
            function,
            invocation_id,
            dropped_bytes = dropped,
            "guest logs past the {} cap were dropped",
            human_size(MAX_STDERR as u64)
        );
    }
}

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

impl Execution {
    /// An invocation that failed before its wasm ran, and why.
    pub(crate) fn not_started(reason: String) -> Execution {
        Execution {
            outcome: Outcome::Error,
            reason: Some(reason),
            exit_code: None,
            stdout: Bytes::new(),
            stderr: Bytes::new(),
            instantiate: Duration::ZERO,
            run: Duration::ZERO,
            cpu: Duration::ZERO,
            peak_memory: 0,
            memory_kib_us: 0,
            fuel_consumed: None,
        }
    }
}

/// Mounts `files` read-only in `wasi`; why not (a folder removed since the
/// manifest was checked).
pub(crate) fn mount_files<'a>(
    wasi: &mut WasiCtxBuilder,
    files: impl IntoIterator<Item = &'a crate::manifest::FileMount>,
) -> Result<(), String> {
    for m in files {
        wasi.preopened_dir(&m.source, &m.destination, wasmtime_wasi::FsPerms::ReadOnly)
            .map_err(|e| {
                format!(
                    "cannot mount {} at {}: {e}",
                    m.source.display(),
                    m.destination
                )
            })?;
    }
    Ok(())
}

/// Store data that carries a memory meter: preview-1 and component hosts.
pub(crate) trait Metered: Send + 'static {
    fn meter(&mut self) -> &mut MemoryMeter;
}

impl Metered for Host {
    fn meter(&mut self) -> &mut MemoryMeter {
        &mut self.meter
    }
}

/// The limits armed on one store.
pub(crate) struct Armed {
    pub deadline: Instant,
    pub fuel_budget: Option<u64>,
}

impl Armed {
    /// Epoch checks stop guests that compute; this timer stops guests that
    /// wait in a host call (a long sleep), where no epoch check runs.
    pub fn backstop(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.deadline + 2 * EPOCH_TICK)
    }
}

/// Arms a fresh store with a function's limits: the memory limiter, fuel,
/// the deadline, and `hostcall_bytes`, what the guest may hand the host in
/// one call (larger arrays fail the call instead of being copied).
pub(crate) fn arm<T: Metered>(
    engine: &KelvinEngine,
    store: &mut Store<T>,
    limits: &Limits,
    hostcall_bytes: usize,
) -> Armed {
    store.limiter(|h| h.meter());
    store.set_hostcall_fuel(hostcall_bytes);
    let fuel_budget = engine
        .fuel_enabled()
        .then(|| limits.fuel.map_or(u64::MAX, |f| f.get()));
    if let Some(budget) = fuel_budget {
        store
            .set_fuel(budget)
            .expect("fuel is enabled on this engine");
    }
    let deadline = Instant::now() + limits.timeout;
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
    Armed {
        deadline,
        fuel_budget,
    }
}

/// Phase timings of one run.
#[derive(Debug, Default)]
pub(crate) struct Timings {
    pub instantiate: Duration,
    pub run: Duration,
    pub run_started: Option<Instant>,
    pub cpu: Duration,
}

/// What the store measured, read once the run is over.
pub(crate) struct Measured {
    pub peak_memory: u64,
    pub memory_kib_us: u64,
    pub denied: Option<u64>,
    pub fuel_consumed: Option<u64>,
}

pub(crate) fn measure<T: Metered>(store: &mut Store<T>, armed: &Armed) -> Measured {
    let fuel_consumed = armed
        .fuel_budget
        .map(|budget| budget - store.get_fuel().unwrap_or(0));
    let meter = store.data_mut().meter();
    meter.advance(Instant::now());
    Measured {
        peak_memory: meter.peak,
        memory_kib_us: u64::try_from(meter.kib_us).unwrap_or(u64::MAX),
        denied: meter.denied,
        fuel_consumed,
    }
}

/// Turns how a run ended into an outcome, a reason and an exit code.
pub(crate) fn classify(
    result: Result<wasmtime::Result<()>, tokio::time::error::Elapsed>,
    limits: &Limits,
    armed: &Armed,
    measured: &Measured,
    stderr: &[u8],
) -> (Outcome, Option<String>, Option<i32>) {
    let timed_out = || {
        (
            Outcome::Timeout,
            Some(format!(
                "timed out after {}",
                humantime::format_duration(limits.timeout)
            )),
            None,
        )
    };
    let e = match result {
        Err(_elapsed) => return timed_out(),
        Ok(Ok(())) => return (Outcome::Ok, None, None),
        Ok(Err(e)) => e,
    };
    if let Some(exit) = e.downcast_ref::<I32Exit>() {
        return if exit.0 == 0 {
            (Outcome::Ok, None, Some(0))
        } else {
            let why = format!("exited with code {}{}", exit.0, last_words(stderr));
            (Outcome::Error, Some(why), Some(exit.0))
        };
    }
    if e.downcast_ref::<DeadlineExceeded>().is_some() {
        return timed_out();
    }
    let Some(trap) = e.downcast_ref::<Trap>() else {
        // A host call that failed: its causes, without the wasm backtrace
        // (which is in the log at debug level).
        tracing::debug!(
            error = format!("{e:?}"),
            "a host call failed the invocation"
        );
        let why: Vec<String> = e
            .chain()
            .map(ToString::to_string)
            .filter(|c| !c.starts_with("error while executing at wasm backtrace"))
            .collect();
        return (Outcome::Error, Some(why.join(": ")), None);
    };
    let reason = if let Some(asked) = measured.denied {
        format!(
            "memory limit of {} exceeded (asked for {})",
            human_size(limits.memory),
            human_size(asked)
        )
    } else if *trap == Trap::OutOfFuel {
        format!("fuel exhausted (limit {})", armed.fuel_budget.unwrap_or(0))
    } else {
        format!("{trap}{}", last_words(stderr))
    };
    (Outcome::Trap, Some(reason), None)
}

/// Ends a run: reads the store's measurements, drops the store (freeing its
/// pool slot) and describes what happened.
pub(crate) fn conclude<T: Metered>(
    mut store: Store<T>,
    armed: &Armed,
    mut t: Timings,
    result: Result<wasmtime::Result<()>, tokio::time::error::Elapsed>,
    limits: &Limits,
    stdout: Bytes,
    stderr: Bytes,
) -> Execution {
    if let (Err(_), Some(started)) = (&result, t.run_started) {
        // Stopped by the backstop mid-run: count the time it ran.
        t.run = started.elapsed();
    }
    let measured = measure(&mut store, armed);
    drop(store);
    let (outcome, reason, exit_code) = classify(result, limits, armed, &measured, &stderr);
    Execution {
        outcome,
        reason,
        exit_code,
        stdout,
        stderr,
        instantiate: t.instantiate,
        run: t.run,
        cpu: t.cpu,
        peak_memory: measured.peak_memory,
        memory_kib_us: measured.memory_kib_us,
        fuel_consumed: measured.fuel_consumed,
    }
}

/// Runs `f`, a preview-1 command, once in a fresh instance.
pub async fn execute(
    engine: &KelvinEngine,
    f: Code<'_>,
    pre: &InstancePre<Host>,
    invocation_id: &str,
    event: &Event,
    max_output: usize,
) -> Execution {
    let spec = f.spec;
    let stdout = CappedPipe::new(max_output);
    let stderr = CappedPipe::new(MAX_STDERR);
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
    if let Err(why) = mount_files(&mut wasi, spec.files.iter().chain(&event.files)) {
        return Execution::not_started(why);
    }
    let mut wasi = wasi.build_p1();
    wasmtime_wasi::WasiView::ctx(&mut wasi)
        .table
        .set_max_capacity(MAX_P1_RESOURCES);
    let host = Host {
        wasi,
        meter: MemoryMeter::new(spec.limits.memory),
    };
    let mut store = Store::new(f.engine, host);
    let hostcall_bytes = max_output.max(MIN_HOSTCALL_BYTES) + (64 << 10);
    let armed = arm(engine, &mut store, &spec.limits, hostcall_bytes);

    let mut t = Timings::default();
    let result = {
        let work = async {
            let started = Instant::now();
            let instance = pre.instantiate_async(&mut store).await?;
            t.instantiate = started.elapsed();
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            let started = *t.run_started.insert(Instant::now());
            let call = start.call_async(&mut store, ());
            let r = cpu_timed(engine.tuning().metering, call, &mut t.cpu).await;
            t.run = started.elapsed();
            r
        };
        tokio::time::timeout_at(armed.backstop(), work).await
    };
    let exec = conclude(
        store,
        &armed,
        t,
        result,
        &spec.limits,
        stdout.contents(),
        stderr.contents(),
    );
    note_dropped_logs(spec.name.as_str(), invocation_id, stderr.dropped());
    // Truncated output must never pass for a result.
    if stdout.dropped() > 0 {
        let why = format!(
            "output exceeded the {} limit (server.max_body)",
            human_size(max_output as u64)
        );
        return Execution {
            outcome: Outcome::Error,
            reason: Some(why),
            stdout: Bytes::new(),
            ..exec
        };
    }
    exec
}

/// Instantiates `f`, a preview-1 command, once in a fresh store with its
/// limits, and drops it without calling `_start`: what an invocation would
/// meet first (memory and tables over the limits, a data segment out of
/// bounds, a start function that traps), met before anything serves it.
pub async fn instantiate_once(
    engine: &KelvinEngine,
    f: Code<'_>,
    pre: &InstancePre<Host>,
) -> Result<(), String> {
    let host = Host {
        wasi: WasiCtxBuilder::new().build_p1(),
        meter: MemoryMeter::new(f.spec.limits.memory),
    };
    let mut store = Store::new(f.engine, host);
    let armed = arm(engine, &mut store, &f.spec.limits, MIN_HOSTCALL_BYTES);
    tried(tokio::time::timeout_at(armed.backstop(), pre.instantiate_async(&mut store)).await)
}

/// A trial instantiation's verdict, for [`instantiate_once`] and its
/// component twin.
pub(crate) fn tried<T>(
    r: Result<wasmtime::Result<T>, tokio::time::error::Elapsed>,
) -> Result<(), String> {
    match r {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(format!("it cannot be instantiated: {e:#}")),
        Err(_) => Err("instantiating it took longer than its timeout".to_owned()),
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
pub(crate) fn last_words(stderr: &[u8]) -> String {
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

/// A poll shorter than this counts its wall time as CPU time.
///
/// Reading a thread's CPU clock is a system call (no vDSO fast path; about
/// 1.5 µs in a VM), and it was 12% of a warm invocation when read before and
/// after every poll. Within a poll the thread runs the guest and nothing
/// else, so CPU time equals wall time unless the thread was preempted; a
/// preemption long enough to matter makes the poll longer than this, and
/// then the clock is read. The error is bounded by this per preempted poll.
pub(crate) const EXACT_CPU_ABOVE: Duration = Duration::from_micros(100);

/// Polls `fut`, adding the calling thread's CPU time during each poll to
/// `cpu` (if `metering`). Summing per poll stays right when the invocation
/// yields and resumes on another thread.
pub(crate) async fn cpu_timed<F: Future>(metering: bool, fut: F, cpu: &mut Duration) -> F::Output {
    if !metering {
        return fut.await;
    }
    let mut fut = pin!(fut);
    std::future::poll_fn(|cx| {
        let started = Instant::now();
        let before = thread_cpu_time();
        let r = fut.as_mut().poll(cx);
        let wall = started.elapsed();
        *cpu += if wall < EXACT_CPU_ABOVE {
            wall
        } else {
            thread_cpu_time().saturating_sub(before)
        };
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
