//! The one wasmtime [`Engine`] of a Kelvin process, configured for serving:
//! pooling instance allocator, copy-on-write memory images, epoch
//! interruption driven by a single ticker thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances. A runaway guest is stopped at the first tick
/// past its deadline, and a busy guest yields to the scheduler every tick.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// What the engine must be sized for.
#[derive(Debug, Clone, Copy)]
pub struct EngineSettings {
    /// Concurrent instances across all functions (pool slots).
    pub instance_slots: u32,
    /// The largest linear memory any function may have, in bytes.
    pub max_memory: u64,
    /// Whether any function meters fuel (it costs every function some speed,
    /// so it is on only when asked for).
    pub fuel: bool,
    pub tuning: Tuning,
}

/// Engine and cache settings whose defaults were chosen by measurement
/// (docs/performance.md). `KELVIN_TUNING` overrides them, to re-run those
/// measurements: `KELVIN_TUNING="cow=off,keep_resident=0"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Initial linear memory as a copy-on-write mapping of the artifact.
    pub cow: bool,
    /// Bytes of each linear memory and table reset with `memset` (kept
    /// resident) instead of `madvise` when an instance ends.
    pub keep_resident: usize,
    /// Reset only the pages an instance touched (Linux 6.7+ `PAGEMAP_SCAN`).
    pub pagemap_scan: bool,
    /// Freed slots kept warm (their memory mapped) for reuse.
    pub max_unused_warm_slots: u32,
    /// Decommits batched together (one TLB shootdown per batch).
    pub decommit_batch: usize,
    /// Load cached artifacts by mapping the file (`true`) or by reading it.
    pub mmap_artifacts: bool,
    /// Meter invocations: CPU time per poll, and a record to the ledger and
    /// log. Off only to measure what metering costs: nothing is billed.
    pub metering: bool,
    /// In a serving process, answer requests for a function that has no
    /// optimised (Cranelift) code yet with code from Winch, a baseline
    /// compiler several times faster to compile, until Cranelift's is ready.
    pub tiering: bool,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            cow: true,
            // Measured together: resetting only touched pages, and keeping up to
            // 1 MiB of them mapped, took a wasi:http hello from 6.6k to 21k
            // requests/s at 16 connections (no page faults or TLB shootdowns
            // per instance). 16 MiB was no faster and keeps more memory.
            keep_resident: 1 << 20,
            pagemap_scan: true,
            max_unused_warm_slots: 100,
            decommit_batch: 1,
            mmap_artifacts: true,
            metering: true,
            tiering: true,
        }
    }
}

impl Tuning {
    /// The defaults, overridden by `KELVIN_TUNING` if set.
    pub fn from_env() -> Result<Tuning, String> {
        match std::env::var("KELVIN_TUNING") {
            Ok(spec) => Tuning::parse(&spec),
            Err(_) => Ok(Tuning::default()),
        }
    }

    /// `key=value` pairs separated by commas; sizes like `1MiB`.
    pub fn parse(spec: &str) -> Result<Tuning, String> {
        let mut t = Tuning::default();
        for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("KELVIN_TUNING: `{pair}` is not key=value"))?;
            let bad = || format!("KELVIN_TUNING: bad value for `{key}`: `{value}`");
            let flag = || match value {
                "on" | "true" | "yes" => Ok(true),
                "off" | "false" | "no" => Ok(false),
                _ => Err(bad()),
            };
            let size = || {
                value
                    .parse::<bytesize::ByteSize>()
                    .map(|b| b.as_u64() as usize)
                    .map_err(|_| bad())
            };
            match key {
                "cow" => t.cow = flag()?,
                "keep_resident" => t.keep_resident = size()?,
                "pagemap_scan" => t.pagemap_scan = flag()?,
                "max_unused_warm_slots" => {
                    t.max_unused_warm_slots = value.parse().map_err(|_| bad())?
                }
                "decommit_batch" => t.decommit_batch = value.parse().map_err(|_| bad())?,
                "mmap_artifacts" => t.mmap_artifacts = flag()?,
                "metering" => t.metering = flag()?,
                "tiering" => t.tiering = flag()?,
                _ => {
                    return Err(format!(
                        "KELVIN_TUNING: unknown setting `{key}` (known: cow, keep_resident, pagemap_scan, max_unused_warm_slots, decommit_batch, mmap_artifacts, metering, tiering)"
                    ));
                }
            }
        }
        Ok(t)
    }
}

/// The engine and the thread that ticks its epoch; the thread stops on drop.
pub struct KelvinEngine {
    engine: Engine,
    baseline: Option<Engine>,
    fuel: bool,
    tuning: Tuning,
    ticker: Option<EpochTicker>,
}

impl KelvinEngine {
    pub fn new(settings: EngineSettings) -> wasmtime::Result<KelvinEngine> {
        let mut pool = PoolingAllocationConfig::default();
        let slots = settings.instance_slots;
        // A component instance holds several core instances and tables
        // (the main module, shims, fix-ups), so those pools are larger.
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(8))
            .total_memories(slots.saturating_mul(2))
            .total_tables(slots.saturating_mul(4))
            .total_stacks(slots)
            // Each slot reserves address space for the largest memory; a
            // function's own, smaller cap is enforced by its limiter.
            .max_memory_size(usize::try_from(settings.max_memory).unwrap_or(usize::MAX));
        let t = settings.tuning;
        pool.linear_memory_keep_resident(t.keep_resident)
            .table_keep_resident(t.keep_resident)
            .pagemap_scan(if t.pagemap_scan {
                wasmtime::Enabled::Auto
            } else {
                wasmtime::Enabled::No
            })
            .max_unused_warm_slots(t.max_unused_warm_slots)
            .decommit_batch_size(t.decommit_batch.max(1));

        let mut config = Config::new();
        config
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            // Initial memory comes from a CoW mapping of the compiled
            // artifact instead of being copied in on every instantiation.
            .memory_init_cow(t.cow)
            .epoch_interruption(true)
            .consume_fuel(settings.fuel)
            .parallel_compilation(true);
        let engine = Engine::new(&config)?;
        // The baseline tier: the same semantics (epochs, fuel, CoW images),
        // compiled by Winch. It serves only while Cranelift compiles, so its
        // instances are allocated on demand instead of reserving a pool.
        let baseline = t.tiering.then(|| {
            config
                .strategy(wasmtime::Strategy::Winch)
                .allocation_strategy(InstanceAllocationStrategy::OnDemand);
            Engine::new(&config)
                .inspect_err(
                    |e| tracing::debug!(error = %e, "no Winch on this machine; tiering is off"),
                )
                .ok()
        });
        let baseline = baseline.flatten();
        let mut ticked = vec![engine.clone()];
        ticked.extend(baseline.clone());
        let ticker = EpochTicker::start(ticked);
        Ok(KelvinEngine {
            engine,
            baseline,
            fuel: settings.fuel,
            tuning: settings.tuning,
            ticker: Some(ticker),
        })
    }

    /// The engine of optimised (Cranelift) code, and of the artifact cache.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine of baseline (Winch) code, if tiering is on and Winch
    /// runs on this machine.
    pub fn baseline(&self) -> Option<&Engine> {
        self.baseline.as_ref()
    }

    pub fn fuel_enabled(&self) -> bool {
        self.fuel
    }

    pub fn tuning(&self) -> &Tuning {
        &self.tuning
    }
}

impl Drop for KelvinEngine {
    fn drop(&mut self) {
        if let Some(t) = self.ticker.take() {
            t.stop();
        }
    }
}

struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl EpochTicker {
    fn start(engines: Vec<Engine>) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kelvin-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    for engine in &engines {
                        engine.increment_epoch();
                    }
                }
            })
            .expect("failed to spawn the epoch ticker thread");
        EpochTicker { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_overrides_parse_and_bad_ones_are_named() {
        assert_eq!(Tuning::parse("").unwrap(), Tuning::default());
        let t = Tuning::parse("cow=off, keep_resident=16MiB,pagemap_scan=no,metering=off").unwrap();
        assert!(!t.cow && !t.pagemap_scan && !t.metering);
        assert_eq!(t.keep_resident, 16 << 20);
        assert_eq!(
            t.max_unused_warm_slots,
            Tuning::default().max_unused_warm_slots
        );
        let e = Tuning::parse("cow=maybe").unwrap_err();
        assert!(e.contains("`cow`") && e.contains("maybe"), "{e}");
        let e = Tuning::parse("fast=yes").unwrap_err();
        assert!(e.contains("unknown setting `fast`"), "{e}");
        assert!(Tuning::parse("cow").unwrap_err().contains("key=value"));
    }
}
