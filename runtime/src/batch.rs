//! Batched background writing, for the invocation log and the server's own
//! log: callers append whole lines to a buffer in memory; one thread writes
//! the buffer out every interval, on [`BatchWriter::flush`], and when the
//! writer is dropped.
//!
//! Waking a writer thread for every line, or writing every line with its own
//! system call, cost a futex wake and a context switch (or a `write`) per
//! request: 18% of warm throughput for the invocation log, 30% for a guest
//! that logs a line per request (docs/performance.md).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a line may wait in memory before it is written.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// Bytes waiting to be written at most. Past it (the output blocks: a pipe
/// nobody reads, a stalled terminal), lines are dropped and counted instead
/// of growing the buffer without bound: clients drive what is logged.
pub const MAX_PENDING: usize = 16 << 20;

/// Appends dropped by every writer of this process (the
/// `kelvin_log_lines_dropped_total` metric).
static DROPPED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// How many log lines (or records of the JSON-lines log) this process
/// dropped because their output did not keep up.
pub fn dropped_total() -> u64 {
    DROPPED_TOTAL.load(Ordering::Relaxed)
}

pub struct BatchWriter {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    written: Condvar,
}

#[derive(Default)]
struct State {
    buffer: Vec<u8>,
    /// Appends dropped because the buffer was full.
    dropped: u64,
    flushes_asked: u64,
    flushes_done: u64,
    stop: bool,
    dead: bool,
}

impl BatchWriter {
    /// Starts the thread `name` that writes to `out`.
    pub fn spawn(name: &str, out: Box<dyn Write + Send>) -> std::io::Result<BatchWriter> {
        let shared = Arc::new(Shared::default());
        let writer = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || write_loop(out, &writer))?;
        Ok(BatchWriter {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `bytes` (whole lines) to what the next write sends, or
    /// drops them if [`MAX_PENDING`] bytes are waiting already.
    pub fn append(&self, bytes: &[u8]) {
        let mut state = self.lock();
        if state.dead {
            return;
        }
        if state.buffer.len() + bytes.len() > MAX_PENDING {
            state.dropped += 1;
            DROPPED_TOTAL.fetch_add(1, Ordering::Relaxed);
            return;
        }
        state.buffer.extend_from_slice(bytes);
    }

    /// How many appends were dropped because the output did not keep up.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Returns once everything appended so far is written.
    pub fn flush(&self) {
        let mut state = self.lock();
        state.flushes_asked += 1;
        let asked = state.flushes_asked;
        self.shared.wake.notify_one();
        while state.flushes_done < asked && !state.dead {
            state = self
                .shared
                .written
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn write_loop(mut out: Box<dyn Write + Send>, shared: &Shared) {
    let lock = || shared.state.lock().unwrap_or_else(|p| p.into_inner());
    let mut state = lock();
    loop {
        if !state.stop && state.flushes_asked == state.flushes_done {
            state = shared
                .wake
                .wait_timeout(state, INTERVAL)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let bytes = std::mem::take(&mut state.buffer);
        let asked = state.flushes_asked;
        let stop = state.stop;
        drop(state);
        if !bytes.is_empty() {
            // Nowhere to report a failure to write the log itself.
            let _ = out.write_all(&bytes).and_then(|()| out.flush());
        }
        state = lock();
        state.flushes_done = asked;
        shared.written.notify_all();
        if stop && state.buffer.is_empty() {
            state.dead = true;
            return;
        }
    }
}

impl Drop for BatchWriter {
    fn drop(&mut self) {
        self.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// A `tracing` writer over a [`BatchWriter`]: each event is collected whole,
/// then appended in one piece, so lines from different threads never mix.
#[derive(Clone, Copy)]
pub struct BatchedLog(pub &'static BatchWriter);

pub struct EventWriter {
    to: &'static BatchWriter,
    event: Vec<u8>,
}

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.event.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        self.to.append(&self.event);
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedLog {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter {
            to: self.0,
            event: Vec::with_capacity(256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` into shared memory, to look at what was written.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_written_on_flush_and_on_drop_in_order() {
        let sink = Sink::default();
        let w = BatchWriter::spawn("test-batch", Box::new(sink.clone())).unwrap();
        w.append(b"one\n");
        w.append(b"two\n");
        w.flush();
        assert_eq!(&*sink.0.lock().unwrap(), b"one\ntwo\n");
        w.append(b"three\n");
        drop(w);
        assert_eq!(&*sink.0.lock().unwrap(), b"one\ntwo\nthree\n");
    }

    /// An output that blocks until told to go on (a pipe nobody reads).
    struct Stuck(Arc<(Mutex<bool>, Condvar)>);

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (go, cv) = &*self.0;
            let mut go = go.lock().unwrap();
            while !*go {
                go = cv.wait(go).unwrap();
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_output_drops_lines_instead_of_growing() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let w = BatchWriter::spawn("test-batch", Box::new(Stuck(gate.clone()))).unwrap();
        let line = [b'x'; 1023]
            .iter()
            .chain(b"\n")
            .copied()
            .collect::<Vec<u8>>();
        // 64 MiB of lines against a writer that never finishes a write.
        for _ in 0..(64 << 10) {
            w.append(&line);
        }
        assert!(w.lock().buffer.len() <= MAX_PENDING);
        assert!(w.dropped() > 0);
        // Unblocked, it writes what it kept and exits cleanly.
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(w);
    }

    #[test]
    fn lines_are_written_within_the_interval_without_a_flush() {
        let sink = Sink::default();
        let w = BatchWriter::spawn("test-batch", Box::new(sink.clone())).unwrap();
        w.append(b"soon\n");
        let deadline = std::time::Instant::now() + 20 * INTERVAL;
        while sink.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written");
            std::thread::sleep(INTERVAL / 10);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"soon\n");
    }
}
