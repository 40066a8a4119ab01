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
}

/// The engine and the thread that ticks its epoch; the thread stops on drop.
pub struct KelvinEngine {
    engine: Engine,
    fuel: bool,
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

        let mut config = Config::new();
        config
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            // Initial memory comes from a CoW mapping of the compiled
            // artifact instead of being copied in on every instantiation.
            .memory_init_cow(true)
            .epoch_interruption(true)
            .consume_fuel(settings.fuel)
            .parallel_compilation(true);
        let engine = Engine::new(&config)?;
        let ticker = EpochTicker::start(engine.clone());
        Ok(KelvinEngine {
            engine,
            fuel: settings.fuel,
            ticker: Some(ticker),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn fuel_enabled(&self) -> bool {
        self.fuel
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
    fn start(engine: Engine) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kelvin-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
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
