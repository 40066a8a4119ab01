//! `kelvin invoke`: run a function locally, print its output and record.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;

use super::{ManifestArgs, tokio_runtime};
use crate::invoke::Event;
use crate::metering::MemorySink;
use crate::runtime::Runtime;

/// Invoke a function once (or more) in this process: its output goes to
/// stdout, each metering record to stderr as JSON.
#[derive(clap::Args, Debug)]
pub struct InvokeCommand {
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// The function to invoke.
    pub function: String,
    /// The input event: a file, or `-` for stdin. Empty if omitted.
    #[arg(long, short)]
    pub input: Option<PathBuf>,
    /// Invoke this many times in one process (the first is cold, the rest warm).
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
}

impl InvokeCommand {
    pub fn execute(self) -> Result<()> {
        // Guest stderr reaches the terminal through the log.
        self.manifest.init_logging();
        let manifest = self.manifest.load()?;
        let input = match &self.input {
            None => Vec::new(),
            Some(p) if p.as_os_str() == "-" => {
                let mut buf = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut buf)
                    .context("failed to read the input from stdin")?;
                buf
            }
            Some(p) => std::fs::read(p)
                .with_context(|| format!("failed to read input `{}`", p.display()))?,
        };
        let runtime = Runtime::new(manifest, Arc::new(MemorySink::default()))?;
        let rt = tokio_runtime()?;
        let input = Bytes::from(input);
        let mut failed = false;
        for _ in 0..self.repeat.max(1) {
            let event = Event {
                trigger: "invoke",
                input: input.clone(),
                env: Vec::new(),
                files: Vec::new(),
            };
            let invocation = rt.block_on(runtime.invoke(&self.function, event))?;
            std::io::stdout().write_all(&invocation.stdout)?;
            std::io::stdout().flush()?;
            eprintln!("{}", serde_json::to_string_pretty(&invocation.record)?);
            failed |= invocation.record.outcome != crate::metering::Outcome::Ok;
        }
        if failed {
            anyhow::bail!("the invocation failed (see the record's outcome and reason)");
        }
        Ok(())
    }
}
