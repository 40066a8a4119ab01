//! `kelvin bill`: price the ledger by a billing policy; `kelvin bill explain`
//! shows one invocation's way from raw record to price.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use rust_decimal::Decimal;

use super::ManifestArgs;
use crate::billing::{self, GroupBy, Report};
use crate::ledger::{Ledger, LedgerReader};

/// Report what invocations cost, from the ledger (read-only: safe beside a
/// running server, or on a copy).
#[derive(clap::Args, Debug)]
pub struct BillCommand {
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// Only invocations started at or after this (YYYY-MM-DD or RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Only invocations started before this (YYYY-MM-DD or RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
    /// How to group the lines.
    #[arg(long, value_enum, default_value = "function")]
    pub by: GroupBy,
    /// A preset instead of the manifest's `[billing]` policy.
    #[arg(long)]
    pub policy: Option<String>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// A ledger file other than the manifest's (an offline copy, say).
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    #[command(subcommand)]
    pub action: Option<BillAction>,
}

#[derive(Subcommand, Debug)]
pub enum BillAction {
    /// One invocation's raw record and every step from it to its price.
    Explain { invocation_id: String },
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum Format {
    Table,
    Csv,
    Json,
}

impl BillCommand {
    pub fn execute(self) -> Result<()> {
        let manifest = self.manifest.load()?;
        let policy = billing::policy_or(self.policy.as_deref(), &manifest.billing)?;
        let path = self
            .ledger
            .clone()
            .unwrap_or_else(|| Ledger::path_in(&manifest.server.state_dir));
        let mut ledger = LedgerReader::open(&path)?;

        if let Some(BillAction::Explain { invocation_id }) = &self.action {
            let record = ledger.get(invocation_id)?.with_context(|| {
                format!(
                    "no invocation `{invocation_id}` in `{}` (invocations older than the last `kelvin ledger compact` are rolled up into daily aggregates)",
                    path.display()
                )
            })?;
            let charge = billing::charge(&policy, &record);
            println!("{}", serde_json::to_string_pretty(&record)?);
            println!(
                "\npolicy: {} (memory basis: {:?})",
                policy.name, policy.memory_basis
            );
            for step in &charge.steps {
                println!("  {step}");
            }
            println!("price: {} USD", charge.cost.normalize());
            return Ok(());
        }

        let (since, until) = billing::parse_range(self.since.as_deref(), self.until.as_deref())?;
        let usage = ledger.usage(since, until)?;
        let report = billing::report(&policy, &usage, self.by)?;
        match self.format {
            Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            Format::Csv => print_csv(&report),
            Format::Table => print_table(&report),
        }
        Ok(())
    }
}

fn by(r: &Report) -> String {
    format!("{:?}", r.by).to_lowercase()
}

fn print_csv(r: &Report) {
    println!(
        "{},invocations,executions,cold_starts,gb_s,cpu_s,cost_usd",
        by(r)
    );
    for l in r.lines.iter().chain(std::iter::once(&r.total)) {
        println!(
            "{},{},{},{},{},{},{}",
            l.key,
            l.invocations,
            l.executions,
            l.cold_starts,
            l.gb_s.normalize(),
            l.cpu_s.normalize(),
            l.cost.normalize()
        );
    }
    println!("free_grant,,,,,,{}", r.free_grant.normalize());
    println!("due,,,,,,{}", r.due.normalize());
}

fn print_table(r: &Report) {
    let show = |d: Decimal, dp: u32| d.round_dp(dp).to_string();
    // Instance ids (`--by orchestration`) are longer than function names.
    let w = r
        .lines
        .iter()
        .map(|l| l.key.len())
        .max()
        .unwrap_or(0)
        .max(24);
    println!("policy: {}   grouped by {}", r.policy, by(r));
    println!(
        "{:<w$} {:>12} {:>8} {:>16} {:>12} {:>16}",
        "", "invocations", "cold", "GB-s", "CPU-s", "cost (USD)"
    );
    for l in r.lines.iter().chain(std::iter::once(&r.total)) {
        println!(
            "{:<w$} {:>12} {:>8} {:>16} {:>12} {:>16}",
            l.key,
            l.invocations,
            l.cold_starts,
            show(l.gb_s, 6),
            show(l.cpu_s, 3),
            show(l.cost, 8)
        );
    }
    println!(
        "{:<w$} {:>83}",
        "free grant",
        format!("-{}", show(r.free_grant, 8))
    );
    println!("{:<w$} {:>83}", "due", show(r.due, 8));
}
