//! The `kelvin` binary: parse arguments, run the command, report errors.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    pin_malloc_mmap_threshold();
    let cli = kelvin::commands::Cli::parse();
    let result = cli.execute();
    // A server's logs are batched: write what is pending before the error.
    kelvin::commands::flush_logs();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message and its causes; never a backtrace (RUST_BACKTRACE
            // is for panics, and a user's mistake is not one).
            eprintln!("Error: {e}");
            let mut causes = e.chain().skip(1).peekable();
            if causes.peek().is_some() {
                eprintln!("\nCaused by:");
                for cause in causes {
                    eprintln!("    {cause}");
                }
            }
            ExitCode::FAILURE
        }
    }
}

/// glibc raises its mmap threshold (up to 32 MiB) each time a larger
/// mmapped buffer is freed: one wasm file read at start-up was enough to
/// move every later 128 KiB+ allocation of the request path onto the
/// shared heap, and preview-1 `/hello` lost 11% of its requests/s to arena
/// locking and `malloc_consolidate` (benches/ab.sh, docs/performance.md).
/// Pinned at glibc's default, large buffers keep their own mappings.
fn pin_malloc_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called first thing
    // in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
