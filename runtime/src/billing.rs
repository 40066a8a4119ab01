//! Billing: what invocations cost, computed from the ledger's raw
//! measurements by a policy. Prices live here, never in the ledger, so the
//! same ledger can be priced by any policy.
//!
//! All arithmetic is decimal: a total is the exact sum of its invocations'
//! costs, and rounding happens only when a number is shown.

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use rust_decimal::prelude::*;
use serde::Serialize;

use crate::metering::{InvocationRecord, Outcome};

/// Which memory figure a policy bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryBasis {
    /// The function's configured limit (AWS Lambda).
    Configured,
    /// The observed peak (Azure Functions' consumption plan).
    Peak,
    /// The exact memory-time integral: what was actually held, for how long.
    Integral,
}

/// A pricing policy. Every field can be overridden in `[billing]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    pub name: String,
    pub memory_basis: MemoryBasis,
    /// Billed memory is rounded up to a multiple of this (MB; 0: no rounding).
    pub memory_step_mb: Decimal,
    pub min_memory_mb: Decimal,
    /// Billed memory is capped here (MB), if set.
    pub max_memory_mb: Option<Decimal>,
    /// Billed duration is at least this (ms).
    pub min_duration_ms: Decimal,
    /// Billed duration is rounded up to a multiple of this (ms; 0: none).
    pub duration_step_ms: Decimal,
    pub price_per_gb_s: Decimal,
    pub price_per_million_executions: Decimal,
    pub price_per_million_cpu_ms: Decimal,
    /// Monthly free grants, deducted from a report's total.
    pub free_gb_s_per_month: Decimal,
    pub free_executions_per_month: Decimal,
    pub free_cpu_ms_per_month: Decimal,
}

/// The names of the built-in policies.
pub const PRESETS: &[&str] = &["azure-consumption", "aws-lambda", "cpu-time"];

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).expect("preset prices are valid decimals")
}

impl Policy {
    /// What makes a policy's billable quantities (GB-s, CPU ms) what they
    /// are, prices aside: its memory basis, steps, minimums and cap. Daily
    /// aggregates keep quantities per shape, and a report can price them
    /// only with a policy of a shape they were compacted for.
    pub fn shape(&self) -> String {
        let basis = match self.memory_basis {
            MemoryBasis::Configured => "configured",
            MemoryBasis::Peak => "peak",
            MemoryBasis::Integral => "integral",
        };
        format!(
            "{basis} memory, step {} MB, min {} MB, max {} MB; min {} ms, step {} ms",
            self.memory_step_mb.normalize(),
            self.min_memory_mb.normalize(),
            self.max_memory_mb
                .map_or_else(|| "none".to_owned(), |m| m.normalize().to_string()),
            self.min_duration_ms.normalize(),
            self.duration_step_ms.normalize()
        )
    }

    /// A built-in policy by name (sources in docs/billing.md).
    pub fn preset(name: &str) -> Option<Policy> {
        let zero = Decimal::ZERO;
        Some(match name {
            // Azure Functions consumption plan: observed memory rounded up
            // to 128 MB (at most 1,536 MB), at least 128 MB and 100 ms per
            // execution, $0.000016/GB-s, $0.20 per million executions,
            // 400,000 GB-s and 1 million executions free each month.
            "azure-consumption" => Policy {
                name: name.into(),
                memory_basis: MemoryBasis::Peak,
                memory_step_mb: d("128"),
                min_memory_mb: d("128"),
                max_memory_mb: Some(d("1536")),
                min_duration_ms: d("100"),
                duration_step_ms: d("1"),
                price_per_gb_s: d("0.000016"),
                price_per_million_executions: d("0.20"),
                price_per_million_cpu_ms: zero,
                free_gb_s_per_month: d("400000"),
                free_executions_per_month: d("1000000"),
                free_cpu_ms_per_month: zero,
            },
            // AWS Lambda (x86): configured memory x duration rounded up to
            // 1 ms, $0.0000166667/GB-s, $0.20 per million requests, 400,000
            // GB-s and 1 million requests free each month.
            "aws-lambda" => Policy {
                name: name.into(),
                memory_basis: MemoryBasis::Configured,
                memory_step_mb: zero,
                min_memory_mb: d("128"),
                max_memory_mb: None,
                min_duration_ms: d("1"),
                duration_step_ms: d("1"),
                price_per_gb_s: d("0.0000166667"),
                price_per_million_executions: d("0.20"),
                price_per_million_cpu_ms: zero,
                free_gb_s_per_month: d("400000"),
                free_executions_per_month: d("1000000"),
                free_cpu_ms_per_month: zero,
            },
            // Cloudflare Workers (Standard): CPU time only, $0.02 per million
            // CPU ms, $0.30 per million requests; 10 million requests and 30
            // million CPU ms included each month.
            "cpu-time" => Policy {
                name: name.into(),
                memory_basis: MemoryBasis::Peak,
                memory_step_mb: zero,
                min_memory_mb: zero,
                max_memory_mb: None,
                min_duration_ms: zero,
                duration_step_ms: d("1"),
                price_per_gb_s: zero,
                price_per_million_executions: d("0.30"),
                price_per_million_cpu_ms: d("0.02"),
                free_gb_s_per_month: zero,
                free_executions_per_month: d("10000000"),
                free_cpu_ms_per_month: d("30000000"),
            },
            _ => return None,
        })
    }
}

/// One invocation's price, and how it was reached.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Charge {
    /// 1, or 0 for invocations that never ran (rejected).
    pub executions: Decimal,
    pub gb_s: Decimal,
    pub cpu_ms: Decimal,
    pub cost: Decimal,
    /// Each step from the raw record to the price, in words.
    pub steps: Vec<String>,
}

const MIB: u64 = 1 << 20;

fn round_up(value: Decimal, step: Decimal) -> Decimal {
    if step.is_zero() {
        value
    } else {
        (value / step).ceil() * step
    }
}

/// Prices one invocation.
pub fn charge(policy: &Policy, r: &InvocationRecord) -> Charge {
    let mut steps = Vec::new();
    if r.outcome == Outcome::Rejected {
        steps.push("rejected before it ran: not billed".to_owned());
        return Charge {
            executions: Decimal::ZERO,
            gb_s: Decimal::ZERO,
            cpu_ms: Decimal::ZERO,
            cost: Decimal::ZERO,
            steps,
        };
    }
    let million = Decimal::from(1_000_000);

    // The function's own execution: Kelvin's loading or compiling it on a
    // cold start is the platform's cost, not the user's, and queueing is
    // not execution.
    let exec_us = r.instantiate_us + r.run_us;
    let exec_ms = Decimal::from(exec_us) / Decimal::from(1000);
    let ms = round_up(exec_ms.max(policy.min_duration_ms), policy.duration_step_ms);
    // Quantities are computed whatever the prices: a daily aggregate keeps
    // them, and another policy of the same shape may price them.
    let gb_s = if policy.memory_basis == MemoryBasis::Integral {
        // KiB x us to GB x s, with 1 GB = 1024 MB = 1024 x 1024 KiB.
        let gb_s = Decimal::from(r.memory_kib_us) / Decimal::from(1024u64 * 1024) / million;
        steps.push(format!(
            "memory-time: {} KiB-us integrated = {} GB-s",
            r.memory_kib_us,
            gb_s.normalize()
        ));
        gb_s
    } else {
        let (raw, what) = match policy.memory_basis {
            MemoryBasis::Configured => (r.memory_limit_bytes, "configured"),
            _ => (r.peak_memory_bytes, "peak"),
        };
        let mut mb = Decimal::from(raw) / Decimal::from(MIB);
        let mut step = format!("memory: {what} {} MB", mb.round_dp(3).normalize());
        mb = round_up(mb, policy.memory_step_mb).max(policy.min_memory_mb);
        if let Some(max) = policy.max_memory_mb {
            mb = mb.min(max);
        }
        step += &format!(
            " -> billed {} MB (step {} MB, min {} MB{})",
            mb.normalize(),
            policy.memory_step_mb.normalize(),
            policy.min_memory_mb.normalize(),
            policy
                .max_memory_mb
                .map_or(String::new(), |m| format!(", max {} MB", m.normalize()))
        );
        steps.push(step);
        steps.push(format!(
            "duration: instantiate + run {} ms -> billed {} ms (min {} ms, step {} ms)",
            exec_ms.normalize(),
            ms.normalize(),
            policy.min_duration_ms.normalize(),
            policy.duration_step_ms.normalize()
        ));
        let gb_s = mb / Decimal::from(1024) * ms / Decimal::from(1000);
        steps.push(format!(
            "GB-s: {} MB / 1024 x {} ms / 1000 = {}",
            mb.normalize(),
            ms.normalize(),
            gb_s.normalize()
        ));
        gb_s
    };
    let cpu_ms = {
        let cpu = round_up(
            Decimal::from(r.cpu_us) / Decimal::from(1000),
            policy.duration_step_ms,
        );
        steps.push(format!(
            "CPU: {} us -> billed {} ms",
            r.cpu_us,
            cpu.normalize()
        ));
        cpu
    };
    let memory_cost = gb_s * policy.price_per_gb_s;
    let execution_cost = policy.price_per_million_executions / million;
    let cpu_cost = cpu_ms * policy.price_per_million_cpu_ms / million;
    let cost = memory_cost + execution_cost + cpu_cost;
    steps.push(format!(
        "cost: {} GB-s x {} + 1 execution x {} / 1e6 + {} CPU ms x {} / 1e6 = {}",
        gb_s.normalize(),
        policy.price_per_gb_s.normalize(),
        policy.price_per_million_executions.normalize(),
        cpu_ms.normalize(),
        policy.price_per_million_cpu_ms.normalize(),
        cost.normalize()
    ));
    Charge {
        executions: Decimal::ONE,
        gb_s,
        cpu_ms,
        cost,
        steps,
    }
}

/// A report that cannot be priced as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error(transparent)]
    Compacted(Box<Unpriceable>),
}

/// Compacted days that a policy cannot price: they keep no quantities for
/// its shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{days} compacted day(s) in the range ({first} to {last}) have no aggregates for the pricing shape of policy `{policy}` ({shape}); they can be priced with: {available}"
)]
pub struct Unpriceable {
    pub policy: String,
    pub shape: String,
    pub days: usize,
    pub first: String,
    pub last: String,
    pub available: String,
}

/// A report request that could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error(
        "invalid date `{0}`; write YYYY-MM-DD or an RFC 3339 time such as 2026-11-21T10:00:00Z"
    )]
    Date(String),
    #[error("--since must be before --until")]
    Range,
    #[error("unknown billing policy `{0}`; use one of azure-consumption, aws-lambda, cpu-time")]
    Policy(String),
    #[error("unknown grouping `{0}`; use function, day, trigger or outcome")]
    GroupBy(String),
}

/// `YYYY-MM-DD` (midnight UTC) or RFC 3339, as UNIX microseconds.
pub fn parse_time(s: &str) -> Result<i64, QueryError> {
    let text = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_owned()
    };
    let t = humantime::parse_rfc3339_weak(&text).map_err(|_| QueryError::Date(s.to_owned()))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64))
}

/// The `[since, until)` range in UNIX microseconds; open ends are unbounded.
pub fn parse_range(since: Option<&str>, until: Option<&str>) -> Result<(i64, i64), QueryError> {
    let since = since.map(parse_time).transpose()?.unwrap_or(0);
    let until = until.map(parse_time).transpose()?.unwrap_or(i64::MAX);
    if since >= until {
        return Err(QueryError::Range);
    }
    Ok((since, until))
}

/// The start of the UTC calendar month that `unix_us` falls in.
pub fn month_start(unix_us: i64) -> i64 {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(unix_us.max(0) as u64);
    let month = humantime::format_rfc3339_seconds(t).to_string();
    parse_time(&format!("{}-01", &month[..7])).unwrap_or(0)
}

/// A preset by name, or the given default policy when no name is given.
pub fn policy_or(name: Option<&str>, default: &Policy) -> Result<Policy, QueryError> {
    match name {
        None => Ok(default.clone()),
        Some(n) => Policy::preset(n).ok_or_else(|| QueryError::Policy(n.to_owned())),
    }
}

/// How a report groups invocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Function,
    Day,
    Trigger,
    Outcome,
    /// The deployment version (`function@version`).
    Version,
    Slot,
    /// The durable instance an invocation worked for (`-` for others).
    Orchestration,
}

/// One day of a function's invocations (per trigger and outcome), rolled up
/// by `kelvin ledger compact`. It keeps billable quantities, not prices:
/// executions, GB-s and CPU ms as the policy in force at compaction shaped
/// them, so a compacted day can be priced again at any prices (but not with
/// another memory basis, step or minimum).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DailyAggregate {
    pub function: String,
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub trigger: String,
    pub outcome: String,
    /// The policy whose shape made `gb_s` and `cpu_ms`.
    pub policy: String,
    pub invocations: u64,
    pub cold_starts: u64,
    pub cpu_us: u64,
    pub executions: Decimal,
    pub gb_s: Decimal,
    pub cpu_ms: Decimal,
}

impl DailyAggregate {
    /// Adds one invocation, priced by `policy`.
    pub fn add(&mut self, r: &InvocationRecord, policy: &Policy) {
        let c = charge(policy, r);
        self.invocations += 1;
        self.cold_starts += u64::from(r.cold);
        self.cpu_us += r.cpu_us;
        self.executions += c.executions;
        self.gb_s += c.gb_s;
        self.cpu_ms += c.cpu_ms;
    }

    pub fn cost(&self, policy: &Policy) -> Decimal {
        self.gb_s * policy.price_per_gb_s
            + self.executions * policy.price_per_million_executions / Decimal::from(1_000_000)
            + self.cpu_ms * policy.price_per_million_cpu_ms / Decimal::from(1_000_000)
    }
}

/// One line of a report (or its total).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Line {
    pub key: String,
    pub invocations: u64,
    pub executions: Decimal,
    pub cold_starts: u64,
    pub gb_s: Decimal,
    pub cpu_s: Decimal,
    pub cost: Decimal,
}

impl Line {
    /// Equal values, shown without trailing zeros.
    fn normalized(self) -> Line {
        Line {
            executions: self.executions.normalize(),
            gb_s: self.gb_s.normalize(),
            cpu_s: self.cpu_s.normalize(),
            cost: self.cost.normalize(),
            ..self
        }
    }

    fn add_aggregate(&mut self, a: &DailyAggregate, cost: Decimal) {
        self.invocations += a.invocations;
        self.executions += a.executions;
        self.cold_starts += a.cold_starts;
        self.gb_s += a.gb_s;
        self.cpu_s += Decimal::from(a.cpu_us) / Decimal::from(1_000_000);
        self.cost += cost;
    }

    fn add(&mut self, r: &InvocationRecord, c: &Charge) {
        self.invocations += 1;
        self.executions += c.executions;
        self.cold_starts += u64::from(r.cold);
        self.gb_s += c.gb_s;
        self.cpu_s += Decimal::from(r.cpu_us) / Decimal::from(1_000_000);
        self.cost += c.cost;
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub policy: String,
    pub by: GroupBy,
    pub lines: Vec<Line>,
    pub total: Line,
    /// The monthly free grants, valued at the policy's prices.
    pub free_grant: Decimal,
    /// What is owed: the total less the free grant (never below zero).
    pub due: Decimal,
}

/// What a report prices: the invocations and compacted days in its range,
/// and those earlier in the range's first calendar month, which used up
/// that month's free grants first (so a month split into two reports owes
/// what it owes in one).
#[derive(Debug, Clone, Default)]
pub struct Usage {
    pub records: Vec<InvocationRecord>,
    pub aggregates: Vec<DailyAggregate>,
    pub earlier_records: Vec<InvocationRecord>,
    pub earlier_aggregates: Vec<DailyAggregate>,
    /// Invocation id to the durable instance it worked for.
    pub instances: std::collections::HashMap<String, String>,
}

impl Usage {
    /// Just these invocations, with nothing earlier in their month.
    pub fn of(records: Vec<InvocationRecord>) -> Usage {
        Usage {
            records,
            ..Usage::default()
        }
    }
}

/// Billable quantities: GB-s, executions, CPU ms.
type Quantities = (Decimal, Decimal, Decimal);

/// The aggregates that `policy` can price (those of its shape; rows from
/// before shapes were kept are named by their preset), or which compacted
/// days it cannot.
fn priceable<'a>(
    policy: &Policy,
    aggregates: impl Iterator<Item = &'a DailyAggregate>,
) -> Result<Vec<&'a DailyAggregate>, PricingError> {
    let shape = policy.shape();
    let shape_of = |a: &DailyAggregate| {
        Policy::preset(&a.policy).map_or_else(|| a.policy.clone(), |p| p.shape())
    };
    let mut usable = Vec::new();
    let mut days = std::collections::BTreeSet::new();
    let mut covered = std::collections::BTreeSet::new();
    let mut available = std::collections::BTreeSet::new();
    for a in aggregates {
        let key = (&a.function, &a.day, &a.trigger, &a.outcome);
        let own = shape_of(a);
        if own == shape {
            usable.push(a);
            covered.insert(key);
        }
        days.insert(key);
        available.insert(own);
    }
    let missing: std::collections::BTreeSet<&String> = days
        .difference(&covered)
        .map(|(_, day, _, _)| *day)
        .collect();
    if let (Some(first), Some(last)) = (missing.first(), missing.last()) {
        let named = |shape: &String| {
            let presets: Vec<&str> = PRESETS
                .iter()
                .copied()
                .filter(|p| Policy::preset(p).is_some_and(|p| &p.shape() == shape))
                .collect();
            if presets.is_empty() {
                format!("a policy with {shape}")
            } else {
                presets.join(" or ")
            }
        };
        return Err(PricingError::Compacted(Box::new(Unpriceable {
            policy: policy.name.clone(),
            shape,
            days: missing.len(),
            first: (*first).clone(),
            last: (*last).clone(),
            available: available.iter().map(named).collect::<Vec<_>>().join("; "),
        })));
    }
    Ok(usable)
}

/// Prices `usage` and groups it. Each month's free grants are applied once,
/// to the month's usage in order: what the range's first month used before
/// the range comes off its grants first.
/// A record from before deployments has no version id or slot.
fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "unknown" } else { s }
}

pub fn report(policy: &Policy, usage: &Usage, by: GroupBy) -> Result<Report, PricingError> {
    let aggregates = priceable(policy, usage.aggregates.iter())?;
    let earlier_aggregates = priceable(policy, usage.earlier_aggregates.iter())?;
    let mut lines: BTreeMap<String, Line> = BTreeMap::new();
    let mut total = Line {
        key: "total".into(),
        ..Line::default()
    };
    // Per calendar month, for the free grants.
    let mut months: BTreeMap<String, Quantities> = BTreeMap::new();
    let month_of = |date: &str| date.get(..7).unwrap_or("").to_owned();
    for r in &usage.records {
        let c = charge(policy, r);
        let key = match by {
            GroupBy::Function => r.function.clone(),
            GroupBy::Day => r.started_at.get(..10).unwrap_or("").to_owned(),
            GroupBy::Trigger => r.trigger.clone(),
            GroupBy::Outcome => r.outcome.as_str().to_owned(),
            GroupBy::Version => format!("{}@{}", r.function, or_unknown(&r.version_id)),
            GroupBy::Slot => or_unknown(&r.slot).to_owned(),
            GroupBy::Orchestration => usage
                .instances
                .get(&r.invocation_id)
                .map_or("-", String::as_str)
                .to_owned(),
        };
        lines
            .entry(key.clone())
            .or_insert_with(|| Line {
                key,
                ..Line::default()
            })
            .add(r, &c);
        total.add(r, &c);
        let m = months.entry(month_of(&r.started_at)).or_default();
        m.0 += c.gb_s;
        m.1 += c.executions;
        m.2 += c.cpu_ms;
    }
    for a in aggregates {
        let cost = a.cost(policy);
        let key = match by {
            GroupBy::Function => a.function.clone(),
            GroupBy::Day => a.day.clone(),
            GroupBy::Trigger => a.trigger.clone(),
            GroupBy::Outcome => a.outcome.clone(),
            // Compacted days keep neither: they are their own line.
            GroupBy::Version => format!("{}@compacted", a.function),
            GroupBy::Slot | GroupBy::Orchestration => "compacted".to_owned(),
        };
        lines
            .entry(key.clone())
            .or_insert_with(|| Line {
                key,
                ..Line::default()
            })
            .add_aggregate(a, cost);
        total.add_aggregate(a, cost);
        let m = months.entry(month_of(&a.day)).or_default();
        m.0 += a.gb_s;
        m.1 += a.executions;
        m.2 += a.cpu_ms;
    }
    // What each month used before the range: its grants are spent first.
    let mut earlier: BTreeMap<String, Quantities> = BTreeMap::new();
    for r in &usage.earlier_records {
        let c = charge(policy, r);
        let m = earlier.entry(month_of(&r.started_at)).or_default();
        m.0 += c.gb_s;
        m.1 += c.executions;
        m.2 += c.cpu_ms;
    }
    for a in earlier_aggregates {
        let m = earlier.entry(month_of(&a.day)).or_default();
        m.0 += a.gb_s;
        m.1 += a.executions;
        m.2 += a.cpu_ms;
    }
    let million = Decimal::from(1_000_000);
    let left = |grant: Decimal, used: Decimal| (grant - used).max(Decimal::ZERO);
    let free_grant: Decimal = months
        .iter()
        .map(|(month, (gb_s, executions, cpu_ms))| {
            let (e_gb_s, e_executions, e_cpu_ms) = earlier.get(month).cloned().unwrap_or_default();
            gb_s.min(&left(policy.free_gb_s_per_month, e_gb_s)) * policy.price_per_gb_s
                + executions.min(&left(policy.free_executions_per_month, e_executions))
                    * policy.price_per_million_executions
                    / million
                + cpu_ms.min(&left(policy.free_cpu_ms_per_month, e_cpu_ms))
                    * policy.price_per_million_cpu_ms
                    / million
        })
        .sum();
    let due = (total.cost - free_grant).max(Decimal::ZERO);
    Ok(Report {
        policy: policy.name.clone(),
        by,
        lines: lines.into_values().map(Line::normalized).collect(),
        total: total.normalized(),
        free_grant: free_grant.normalize(),
        due: due.normalize(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::InvocationRecord;

    fn rec(wall_us: u64, peak: u64, limit: u64, cpu_us: u64) -> InvocationRecord {
        InvocationRecord {
            invocation_id: "i".into(),
            function: "f".into(),
            trigger: "http".into(),
            started_at: "2026-11-21T10:00:00.000000Z".into(),
            outcome: Outcome::Ok,
            reason: None,
            wall_us,
            queued_us: 0,
            cpu_us,
            peak_memory_bytes: peak,
            memory_kib_us: 0,
            fuel_consumed: None,
            bytes_in: 0,
            bytes_out: 0,
            cold: false,
            load: None,
            instantiate_us: 0,
            run_us: wall_us,
            exit_code: None,
            version: String::new(),
            memory_limit_bytes: limit,
            version_id: String::new(),
            slot: String::new(),
        }
    }

    const MIB: u64 = 1 << 20;

    fn cost(policy: &str, r: &InvocationRecord) -> (Decimal, Decimal) {
        let c = charge(&Policy::preset(policy).unwrap(), r);
        (c.gb_s.normalize(), c.cost.normalize())
    }

    #[test]
    fn azure_minimums_steps_and_cap() {
        // 65 MiB, 12.345 ms: at least 128 MB and 100 ms.
        // 0.125 GB x 0.1 s = 0.0125 GB-s; x 0.000016 = 0.0000002; + 0.20/1e6.
        assert_eq!(
            cost("azure-consumption", &rec(12_345, 65 * MIB, 0, 0)),
            (d("0.0125"), d("0.0000004"))
        );
        // 129 MiB rounds up to 256 MB; 1500.2 ms rounds up to 1501 ms.
        // 0.25 x 1.501 = 0.37525 GB-s; x 0.000016 = 0.000006004; + 0.0000002.
        assert_eq!(
            cost("azure-consumption", &rec(1_500_200, 129 * MIB, 0, 0)),
            (d("0.37525"), d("0.000006204"))
        );
        // 2 GiB is capped at 1,536 MB: 1.5 GB x 0.1 s.
        assert_eq!(
            cost("azure-consumption", &rec(50_000, 2048 * MIB, 0, 0)).0,
            d("0.15")
        );
        // Exactly 128 MB and 100 ms stay as they are.
        assert_eq!(
            cost("azure-consumption", &rec(100_000, 128 * MIB, 0, 0)).0,
            d("0.0125")
        );
    }

    #[test]
    fn aws_bills_configured_memory_by_the_millisecond() {
        // 512 MB configured (peak ignored), 0.4 ms rounds up to 1 ms.
        // 0.5 GB x 0.001 s = 0.0005 GB-s; x 0.0000166667 = 0.00000000833335.
        assert_eq!(
            cost("aws-lambda", &rec(400, 10 * MIB, 512 * MIB, 0)),
            (d("0.0005"), d("0.00000020833335"))
        );
        assert_eq!(
            cost("aws-lambda", &rec(2_000_001, 10 * MIB, 1024 * MIB, 0)).0,
            d("2.001")
        );
    }

    #[test]
    fn cpu_time_bills_cpu_milliseconds_only() {
        // 2.5 ms of CPU rounds up to 3 ms: 3 x 0.02/1e6 + 0.30/1e6. Its
        // GB-s are counted (for aggregates) but priced at 0.
        assert_eq!(
            cost("cpu-time", &rec(90_000_000, 4096 * MIB, 0, 2_500)),
            (d("360"), d("0.00000036"))
        );
    }

    #[test]
    fn the_integral_basis_bills_exact_memory_time() {
        let mut policy = Policy::preset("azure-consumption").unwrap();
        policy.memory_basis = MemoryBasis::Integral;
        let mut r = rec(5_000_000, 2048 * MIB, 0, 0);
        // 1 GB held for 1 s, in KiB x us.
        r.memory_kib_us = 1024 * 1024 * 1_000_000;
        let c = charge(&policy, &r);
        assert_eq!(c.gb_s, d("1"));
        assert_eq!(c.cost.normalize(), d("0.0000162"));
    }

    #[test]
    fn rejected_invocations_cost_nothing() {
        let mut r = rec(1000, MIB, MIB, 10);
        r.outcome = Outcome::Rejected;
        for p in PRESETS {
            let c = charge(&Policy::preset(p).unwrap(), &r);
            assert_eq!((c.executions, c.cost), (Decimal::ZERO, Decimal::ZERO));
        }
    }

    #[test]
    fn free_grants_come_off_the_total_per_month() {
        let policy = Policy::preset("azure-consumption").unwrap();
        let records = vec![rec(12_345, 65 * MIB, 0, 0), rec(12_345, 65 * MIB, 0, 0)];
        let r = report(&policy, &Usage::of(records), GroupBy::Function).unwrap();
        assert_eq!(r.total.cost.normalize(), d("0.0000008"));
        assert_eq!(r.free_grant, r.total.cost, "well inside the monthly grant");
        assert_eq!(r.due, Decimal::ZERO);
        assert_eq!(r.lines.len(), 1);
        assert_eq!(r.total.executions, d("2"));
    }

    #[test]
    fn reports_group_by_version_and_slot() {
        let policy = Policy::preset("azure-consumption").unwrap();
        let at = |slot: &str, version: &str| {
            let mut r = rec(12_345, 65 * MIB, 0, 0);
            r.slot = slot.into();
            r.version_id = version.into();
            r
        };
        let records = vec![
            at("production", "aaaa"),
            at("production", "bbbb"),
            at("staging", "bbbb"),
            // From before deployments.
            at("", ""),
        ];
        let keys = |by| {
            let r = report(&policy, &Usage::of(records.clone()), by).unwrap();
            r.lines
                .iter()
                .map(|l| (l.key.clone(), l.executions))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            keys(GroupBy::Version),
            [
                ("f@aaaa".to_owned(), d("1")),
                ("f@bbbb".to_owned(), d("2")),
                ("f@unknown".to_owned(), d("1"))
            ]
        );
        assert_eq!(
            keys(GroupBy::Slot),
            [
                ("production".to_owned(), d("2")),
                ("staging".to_owned(), d("1")),
                ("unknown".to_owned(), d("1"))
            ]
        );
    }

    #[test]
    fn a_month_split_into_two_reports_owes_what_it_owes_in_one() {
        let mut policy = Policy::preset("azure-consumption").unwrap();
        policy.free_gb_s_per_month = d("0.05");
        policy.free_executions_per_month = d("3");
        let day = |n: u32| {
            let mut r = rec(12_345, 65 * MIB, 0, 0);
            r.started_at = format!("2026-11-{n:02}T10:00:00.000000Z");
            r
        };
        let (first, second): (Vec<_>, Vec<_>) = (1..=10)
            .map(day)
            .partition(|r| r.started_at.as_str() < "2026-11-08");
        let all: Vec<_> = first.iter().chain(&second).cloned().collect();
        let whole = report(&policy, &Usage::of(all), GroupBy::Function).unwrap();
        assert!(whole.due > Decimal::ZERO, "{whole:?}");
        let a = report(&policy, &Usage::of(first.clone()), GroupBy::Function).unwrap();
        let b = report(
            &policy,
            &Usage {
                records: second.clone(),
                earlier_records: first,
                ..Usage::default()
            },
            GroupBy::Function,
        )
        .unwrap();
        assert_eq!(a.due + b.due, whole.due);
        // Before, the second report got the whole grant again and the month
        // owed less split than whole.
        let again = report(&policy, &Usage::of(second), GroupBy::Function).unwrap();
        assert!(a.due + again.due < whole.due);
    }

    #[test]
    fn month_starts() {
        assert_eq!(
            month_start(parse_time("2026-11-21T10:00:00Z").unwrap()),
            parse_time("2026-11-01").unwrap()
        );
        assert_eq!(
            month_start(parse_time("2026-11-01").unwrap()),
            parse_time("2026-11-01").unwrap()
        );
        assert_eq!(month_start(0), 0);
    }

    #[test]
    fn unknown_presets_are_none() {
        assert!(Policy::preset("gcp").is_none());
        for p in PRESETS {
            assert!(Policy::preset(p).is_some());
        }
    }

    use proptest::prelude::*;

    fn arb_record() -> impl Strategy<Value = InvocationRecord> {
        (
            0usize..4,
            0u64..20_000_000,
            (1u64..32_768).prop_map(|pages| pages * 64 * 1024),
            0u64..20_000_000,
            0u64..u32::MAX as u64 * 1000,
            0usize..5,
            1u32..29,
            any::<bool>(),
        )
            .prop_map(|(f, wall, peak, cpu, kib_us, outcome, day, cold)| {
                let mut r = rec(wall, peak, peak.max(128 * MIB), cpu);
                r.function = ["a", "b", "c", "d"][f].into();
                r.memory_kib_us = kib_us;
                r.outcome = [
                    Outcome::Ok,
                    Outcome::Error,
                    Outcome::Timeout,
                    Outcome::Trap,
                    Outcome::Rejected,
                ][outcome];
                r.started_at = format!("2026-{:02}-{day:02}T10:00:00.000000Z", 1 + day % 12);
                r.cold = cold;
                r
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The lines of a report add up to its total exactly, and the total
        /// is exactly the sum of what each invocation's explanation says.
        #[test]
        fn reports_reconcile_exactly(records in prop::collection::vec(arb_record(), 0..3000)) {
            for preset in PRESETS {
                let mut policy = Policy::preset(preset).unwrap();
                let usage = Usage::of(records.clone());
                for basis in [MemoryBasis::Configured, MemoryBasis::Peak, MemoryBasis::Integral] {
                    policy.memory_basis = basis;
                    let explained: Decimal = records.iter().map(|r| charge(&policy, r).cost).sum();
                    for by in [GroupBy::Function, GroupBy::Day, GroupBy::Trigger, GroupBy::Outcome] {
                        let report = report(&policy, &usage, by).unwrap();
                        let lines: Decimal = report.lines.iter().map(|l| l.cost).sum();
                        prop_assert_eq!(lines, report.total.cost);
                        prop_assert_eq!(report.total.cost, explained);
                        prop_assert_eq!(report.lines.iter().map(|l| l.invocations).sum::<u64>(), records.len() as u64);
                        prop_assert!(report.due <= report.total.cost && report.due >= Decimal::ZERO);
                    }
                }
            }
        }
    }
}
