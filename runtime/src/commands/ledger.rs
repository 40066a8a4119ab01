//! `kelvin ledger compact`: roll old invocations into daily aggregates.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Subcommand;

use super::ManifestArgs;
use crate::ledger::{self, Ledger};

/// Maintain the invocation ledger.
#[derive(clap::Args, Debug)]
pub struct LedgerCommand {
    #[command(flatten)]
    pub manifest: ManifestArgs,
    #[command(subcommand)]
    pub action: LedgerAction,
}

#[derive(Subcommand, Debug)]
pub enum LedgerAction {
    /// Roll invocations older than a duration into per-function daily
    /// aggregates, shaped by the manifest's `[billing]` policy. Reports keep
    /// their totals; single invocations can no longer be explained.
    Compact {
        /// e.g. `30d`, `12h`.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Duration,
    },
}

impl LedgerCommand {
    pub fn execute(self) -> Result<()> {
        let manifest = self.manifest.load()?;
        let path = Ledger::path_in(&manifest.server.state_dir);
        match self.action {
            LedgerAction::Compact { older_than } => {
                let cutoff = SystemTime::now()
                    .checked_sub(older_than)
                    .context("--older-than reaches before 1970")?;
                let before = cutoff
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as i64);
                let done = ledger::compact(&path, before, &manifest.billing)?;
                println!(
                    "compacted {} invocations into {} daily aggregates (everything before {})",
                    done.invocations,
                    done.days,
                    humantime::format_rfc3339_seconds(cutoff)
                );
            }
        }
        Ok(())
    }
}
