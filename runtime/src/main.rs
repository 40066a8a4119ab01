//! The `kelvin` binary: parse arguments, run the command, report errors.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
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
