//! `kelvin ledger compact` and `backup`: roll old invocations into daily
//! aggregates; copy the ledger consistently.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
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
        /// Say what would be compacted, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Compact invocations of the last day without asking.
        #[arg(long, short)]
        yes: bool,
    },
    /// Write a consistent copy of the ledger to a new file, safe beside a
    /// running server (a plain copy of the file misses what is still in
    /// its write-ahead log). `kelvin bill --ledger FILE` reads it.
    Backup {
        /// The copy to write; it must not exist.
        file: PathBuf,
    },
}

/// Compacting closer to now than this asks first.
const RECENT: Duration = Duration::from_secs(24 * 3600);

impl LedgerCommand {
    pub fn execute(self) -> Result<()> {
        let manifest = self.manifest.load()?;
        let path = Ledger::path_in(&manifest.server.state_dir);
        match self.action {
            LedgerAction::Backup { file } => {
                if file.exists() {
                    bail!("{} exists; name a new file", file.display());
                }
                ledger::backup(&path, &file).with_context(|| {
                    format!("failed to back up the ledger to {}", file.display())
                })?;
                println!("ledger backed up to {}", file.display());
            }
            LedgerAction::Compact {
                older_than,
                dry_run,
                yes,
            } => {
                let cutoff = SystemTime::now()
                    .checked_sub(older_than)
                    .context("--older-than reaches before 1970")?;
                let before = cutoff
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as i64);
                let at = |us: i64| {
                    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_micros(us as u64))
                };
                let (count, span) = ledger::compactable(&path, before)?;
                let what = match span {
                    Some((first, last)) => {
                        format!("{count} invocations, started {} to {}", at(first), at(last))
                    }
                    None => "no invocations".to_owned(),
                };
                if dry_run {
                    println!(
                        "would compact {what} (everything before {}); nothing changed",
                        humantime::format_rfc3339_seconds(cutoff)
                    );
                    return Ok(());
                }
                if older_than < RECENT && count > 0 && !yes {
                    let question = format!(
                        "compact {what}, some from the last day? Their single records can no longer be explained."
                    );
                    if !confirm(&question)? {
                        bail!(
                            "nothing compacted (pass --yes to compact the last day without asking)"
                        );
                    }
                }
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

/// Asks on the terminal; without one, the answer is no.
fn confirm(question: &str) -> Result<bool> {
    if !std::io::stdin().is_terminal() {
        return Ok(false);
    }
    eprint!("{question} [y/N] ");
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}
