//! Triggers and output bindings as the manifest declares them: each kind's
//! validated configuration, with no knowledge of how it is served (so the
//! manifest can name them without depending on the servers, which depend on
//! it).

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::keys::AuthLevel;
use crate::router::{MethodSet, Route};

/// A kind of trigger. `TYPE` is the manifest key (`[[functions.NAME.http]]`)
/// and the value of `KELVIN_TRIGGER` the guest sees.
pub trait Trigger {
    const TYPE: &'static str;
    /// The validated per-function configuration.
    type Config;
}

/// A validated trigger attached to a function.
#[derive(Debug, Clone)]
pub enum TriggerConfig {
    Http(HttpTrigger),
    Timer(Box<TimerTrigger>),
    Queue(QueueTrigger),
    Blob(BlobTrigger),
    /// An orchestrator, activity or entity: invoked by Kelvin's durable
    /// functions alone.
    Durable(DurableRole),
}

impl TriggerConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            TriggerConfig::Durable(role) => role.trigger(),
            TriggerConfig::Http(_) => Http::TYPE,
            TriggerConfig::Timer(_) => Timer::TYPE,
            TriggerConfig::Queue(_) => Queue::TYPE,
            TriggerConfig::Blob(_) => Blob::TYPE,
        }
    }

    pub fn http(&self) -> Option<&HttpTrigger> {
        match self {
            TriggerConfig::Http(h) => Some(h),
            _ => None,
        }
    }
}

/// A durable function's role (`durable = "orchestrator"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurableRole {
    Orchestrator,
    Activity,
    Entity,
}

impl DurableRole {
    pub fn parse(s: &str) -> Result<DurableRole, String> {
        match s {
            "orchestrator" => Ok(DurableRole::Orchestrator),
            "activity" => Ok(DurableRole::Activity),
            "entity" => Ok(DurableRole::Entity),
            other => Err(format!(
                "unknown durable role {other:?}; expected \"orchestrator\", \"activity\" or \"entity\""
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DurableRole::Orchestrator => "orchestrator",
            DurableRole::Activity => "activity",
            DurableRole::Entity => "entity",
        }
    }

    /// The trigger name its invocations are recorded with.
    pub fn trigger(self) -> &'static str {
        match self {
            DurableRole::Orchestrator => "orchestration",
            DurableRole::Activity => "activity",
            DurableRole::Entity => "entity",
        }
    }
}

/// The HTTP trigger kind.
pub struct Http;

impl Trigger for Http {
    const TYPE: &'static str = "http";
    type Config = HttpTrigger;
}

/// A function's HTTP route (`[[functions.NAME.http]]`).
#[derive(Debug, Clone)]
pub struct HttpTrigger {
    pub route: Route,
    pub methods: MethodSet,
    /// Who may call it (`auth`: anonymous, function or admin).
    pub auth: AuthLevel,
    /// Where the route is written in the manifest, for conflict errors.
    pub(crate) span: Range<usize>,
}

/// The timer trigger kind.
pub struct Timer;

impl Trigger for Timer {
    const TYPE: &'static str = "timer";
    type Config = TimerTrigger;
}

/// A schedule (`[[functions.NAME.timer]]`).
#[derive(Debug, Clone)]
pub struct TimerTrigger {
    pub schedule: Schedule,
    /// Run once when Kelvin starts, besides the schedule.
    pub run_on_startup: bool,
}

/// A six-field NCRONTAB schedule (`second minute hour day month
/// day-of-week`, Sunday = 0) in a time zone (UTC unless one is given).
#[derive(Clone)]
pub struct Schedule {
    text: String,
    cron: croner::Cron,
    zone: chrono_tz::Tz,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.text, self.zone)
    }
}

impl Schedule {
    /// Parses `text` (exactly six fields) in `zone` (an IANA name such as
    /// `Europe/Paris`; UTC if `None`).
    pub fn parse(text: &str, zone: Option<&str>) -> Result<Schedule, String> {
        let fields = text.split_whitespace().count();
        if fields != 6 {
            return Err(format!(
                "{text:?} has {fields} field(s); a schedule has six: second minute hour day month day-of-week, e.g. \"0 */5 * * * *\" (every five minutes)"
            ));
        }
        // NCRONTAB (Azure's) requires both the day of the month and the day
        // of the week to match when both are restricted.
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .year(croner::parser::Year::Disallowed)
            .dom_and_dow(true)
            .build()
            .parse(text)
            .map_err(|e| {
                format!("invalid schedule {text:?}: {e}; write six fields, e.g. \"0 */5 * * * *\"")
            })?;
        let zone = match zone {
            None => chrono_tz::UTC,
            Some(z) => z.parse::<chrono_tz::Tz>().map_err(|_| {
                format!("unknown time zone {z:?}; use an IANA name such as \"Europe/Paris\" (or omit it for UTC)")
            })?,
        };
        let schedule = Schedule {
            text: text.to_owned(),
            cron,
            zone,
        };
        if schedule.next_after(Utc::now()).is_none() {
            return Err(format!("schedule {text:?} never fires"));
        }
        Ok(schedule)
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn zone(&self) -> &str {
        self.zone.name()
    }

    /// The first time the schedule fires strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&t.with_timezone(&self.zone), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// The queue trigger kind.
pub struct Queue;

impl Trigger for Queue {
    const TYPE: &'static str = "queue";
    type Config = QueueTrigger;
}

/// A queue a function consumes (`[[functions.NAME.queue]]`).
#[derive(Debug, Clone)]
pub struct QueueTrigger {
    pub queue: QueueName,
    /// Messages leased at once (Azure's `batchSize`, 16).
    pub batch_size: u32,
    /// A new batch is leased when this few are still running (Azure's
    /// `newBatchThreshold`, half the batch): at most `batch_size +
    /// new_batch_threshold` run at once.
    pub new_batch_threshold: u32,
    /// Attempts before a message moves to `<queue>-poison` (5).
    pub max_dequeue_count: u32,
    /// How long a lease hides a message from other consumers; renewed
    /// while the function runs (30 s).
    pub lease: Duration,
    /// The delay before a failed message is retried, doubled with each
    /// attempt up to `max_retry_delay` (1 s, 1 min).
    pub retry_delay: Duration,
    pub max_retry_delay: Duration,
}

impl QueueTrigger {
    /// How long after its `attempt`-th failure (1-based) a message waits.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doubled = self
            .retry_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        doubled.min(self.max_retry_delay)
    }
}

/// A queue's name: lowercase letters, digits and `-`, 1 to 63 characters,
/// starting with a letter or digit (Azure Storage's rule, so names move).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(String);

/// What a queue's poison queue is called after it.
pub const POISON_SUFFIX: &str = "-poison";

impl QueueName {
    pub fn parse(s: &str) -> Result<QueueName, String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if ok {
            Ok(QueueName(s.to_owned()))
        } else {
            Err(format!(
                "invalid queue name {s:?}: use 1 to 63 lowercase letters, digits and `-`, starting with a letter or digit"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Where its messages go after too many failed attempts.
    pub fn poison(&self) -> String {
        format!("{}{POISON_SUFFIX}", self.0)
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The blob trigger kind.
pub struct Blob;

impl Trigger for Blob {
    const TYPE: &'static str = "blob";
    type Config = BlobTrigger;
}

/// Blobs a function processes (`[[functions.NAME.blob]]`).
#[derive(Debug, Clone)]
pub struct BlobTrigger {
    pub path: BlobPattern,
    /// Failed attempts on one version before it is recorded as poison (5).
    pub max_attempts: u32,
    /// The delay before a failed version is retried, doubled with each
    /// attempt up to a minute (1 s).
    pub retry_delay: Duration,
}

impl BlobTrigger {
    /// How long after its `attempt`-th failure (1-based) a version waits.
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.retry_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20))
            .min(Duration::from_secs(60).max(self.retry_delay))
    }
}

/// A container and a pattern for the blob names in it:
/// The value of `name` among a trigger's parameters, the first one given
/// (host parameters come first, so nothing later stands in for them).
pub fn param(params: &[(String, String)], name: &str) -> Option<String> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

/// `images/{name}`, `uploads/{name}.{ext}`. A `{parameter}` matches one or
/// more characters; matched, the parameters are the event's and can name
/// outputs (`thumbnails/{name}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobPattern {
    text: String,
    container: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Param(String),
}

/// A container's name: lowercase letters, digits and `-`, 1 to 63.
pub fn check_container(s: &str) -> Result<(), String> {
    QueueName::parse(s).map(|_| ()).map_err(|_| {
        format!(
            "invalid container name {s:?}: use 1 to 63 lowercase letters, digits and `-`, starting with a letter or digit"
        )
    })
}

impl BlobPattern {
    pub fn parse(text: &str) -> Result<BlobPattern, String> {
        let Some((container, rest)) = text.split_once('/') else {
            return Err(format!(
                "{text:?} has no container; write `container/pattern`, e.g. \"images/{{name}}\""
            ));
        };
        check_container(container)?;
        if rest.is_empty() {
            return Err(format!(
                "{text:?} has no blob name pattern after the container; e.g. \"{container}/{{name}}\""
            ));
        }
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = rest.chars();
        while let Some(c) = chars.next() {
            match c {
                '{' => {
                    let mut name = String::new();
                    let mut closed = false;
                    for c in chars.by_ref() {
                        if c == '}' {
                            closed = true;
                            break;
                        }
                        name.push(c);
                    }
                    if !closed {
                        return Err(format!("unmatched `{{` in {text:?}"));
                    }
                    let valid = !name.is_empty()
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !valid {
                        return Err(format!(
                            "invalid parameter {{{name}}} in {text:?}: a parameter is a name of letters, digits and `_` in braces, e.g. {{name}}"
                        ));
                    }
                    if matches!(parts.last(), Some(Part::Param(_))) && literal.is_empty() {
                        return Err(format!(
                            "{text:?} has two parameters in a row; separate them with text, e.g. {{name}}.{{ext}}"
                        ));
                    }
                    if parts
                        .iter()
                        .any(|p| matches!(p, Part::Param(n) if *n == name))
                    {
                        return Err(format!("parameter {{{name}}} appears twice in {text:?}"));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Param(name));
                }
                '}' => return Err(format!("unmatched `}}` in {text:?}")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(BlobPattern {
            text: text.to_owned(),
            container: container.to_owned(),
            parts,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn container(&self) -> &str {
        &self.container
    }

    /// A blob name in the container this pattern matches, each parameter
    /// `value` (`uploads/{name}.{ext}`: `bench.bench`).
    pub fn example(&self, value: &str) -> String {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Literal(l) => l.as_str(),
                Part::Param(_) => value,
            })
            .collect()
    }

    /// Its parameters' names, in order.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Param(n) => Some(n.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Matches a blob name within the container; the parameters if it
    /// matches. An earlier parameter takes as much as it can
    /// (`{name}.{ext}` on `a.tar.gz`: `a.tar`, `gz`).
    pub fn matches(&self, name: &str) -> Option<Vec<(String, String)>> {
        let mut out = Vec::new();
        match_parts(&self.parts, name, &mut out).then_some(out)
    }

    /// The blob path (`container/name`) with its parameters filled in by
    /// `value`; the first parameter it cannot fill otherwise.
    pub fn fill(&self, value: impl Fn(&str) -> Option<String>) -> Result<String, String> {
        let mut s = format!("{}/", self.container);
        for p in &self.parts {
            match p {
                Part::Literal(l) => s.push_str(l),
                Part::Param(n) => s.push_str(&value(n).ok_or_else(|| n.clone())?),
            }
        }
        Ok(s)
    }
}

fn match_parts(parts: &[Part], s: &str, out: &mut Vec<(String, String)>) -> bool {
    match parts.split_first() {
        None => s.is_empty(),
        Some((Part::Literal(l), rest)) => s
            .strip_prefix(l.as_str())
            .is_some_and(|s| match_parts(rest, s, out)),
        Some((Part::Param(n), rest)) => {
            // Longest first, at least one character.
            let ends: Vec<usize> = s
                .char_indices()
                .map(|(i, c)| i + c.len_utf8())
                .rev()
                .collect();
            for end in ends {
                let before = out.len();
                out.push((n.clone(), s[..end].to_owned()));
                if match_parts(rest, &s[end..], out) {
                    return true;
                }
                out.truncate(before);
            }
            false
        }
    }
}

/// An output binding (`[[functions.NAME.output]]`): a value the function
/// returns under `name`, published when (and only when) it succeeds.
#[derive(Debug, Clone)]
pub struct OutputBinding {
    pub name: String,
    pub target: OutputTarget,
}

#[derive(Debug, Clone)]
pub enum OutputTarget {
    /// Each value becomes a message on this queue.
    Queue(QueueName),
    /// The value is written to this blob path (parameters from the trigger).
    Blob(BlobPattern),
    /// Each value (`{"instance_id"?, "input"}`) starts this orchestrator.
    Orchestration(DurableName),
    /// Each value (`{"instance_id", "input"}`) raises this event.
    RaiseEvent(String),
    /// Each value (`{"key", "operation", "input"}`) signals an entity of
    /// this entity function.
    Entity(DurableName),
}

/// A durable function an output names, and where (checked against the
/// app's functions once they are all read).
#[derive(Debug, Clone)]
pub struct DurableName {
    pub name: String,
    pub(crate) span: Range<usize>,
}

/// An input binding (`[[functions.NAME.input]]`): what a function gets
/// besides its event.
#[derive(Debug, Clone)]
pub struct InputBinding {
    pub name: String,
    pub source: InputSource,
}

#[derive(Debug, Clone)]
pub enum InputSource {
    /// A durable instance's status, in `KELVIN_INPUT_<NAME>` (HTTP
    /// modules): a pattern of the route's parameters, e.g. `{id}`, behind
    /// a placeholder container `x/`.
    Instance(BlobPattern),
    /// A blob's bytes, as the read-only file `/inputs/<name>` (both
    /// contracts, every trigger): `models/iris.json`, or a pattern of the
    /// trigger's parameters, `models/{model}.json`.
    Blob(BlobPattern),
}

/// Where blob inputs are mounted in the guest.
pub const INPUTS_DIR: &str = "/inputs";

impl InputBinding {
    /// The environment variable the function reads it from.
    pub fn variable(&self) -> String {
        format!(
            "KELVIN_INPUT_{}",
            self.name.to_ascii_uppercase().replace('-', "_")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ncrontab_schedules() {
        let s = Schedule::parse("0 */5 * * * *", None).unwrap();
        let t: DateTime<Utc> = "2026-01-01T10:02:03Z".parse().unwrap();
        assert_eq!(
            s.next_after(t).unwrap(),
            "2026-01-01T10:05:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        // Sunday = 0; 2026-01-04 is a Sunday.
        let sunday = Schedule::parse("0 30 9 * * 0", None).unwrap();
        assert_eq!(
            sunday.next_after(t).unwrap(),
            "2026-01-04T09:30:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        let every_second = Schedule::parse("* * * * * *", None).unwrap();
        assert_eq!(
            every_second.next_after(t).unwrap(),
            "2026-01-01T10:02:04Z".parse::<DateTime<Utc>>().unwrap()
        );
        let paris = Schedule::parse("0 0 9 * * *", Some("Europe/Paris")).unwrap();
        assert_eq!(
            paris.next_after(t).unwrap(),
            "2026-01-02T08:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        for bad in [
            "*/5 * * * *",
            "0 */5 * * * * 2026",
            "61 * * * * *",
            "x * * * * *",
            "",
        ] {
            assert!(Schedule::parse(bad, None).is_err(), "{bad:?}");
        }
        assert!(Schedule::parse("0 0 9 * * *", Some("Mars/Olympus")).is_err());
    }

    #[test]
    fn blob_patterns() {
        let p = BlobPattern::parse("images/{name}").unwrap();
        assert_eq!(p.container(), "images");
        assert_eq!(
            p.matches("cat.ppm").unwrap(),
            vec![("name".into(), "cat.ppm".into())]
        );
        assert_eq!(p.matches("a/b.ppm").unwrap()[0].1, "a/b.ppm");
        let p = BlobPattern::parse("uploads/{name}.{ext}").unwrap();
        assert_eq!(
            p.matches("a.tar.gz").unwrap(),
            vec![("name".into(), "a.tar".into()), ("ext".into(), "gz".into())]
        );
        assert!(p.matches("noext").is_none());
        let p = BlobPattern::parse("in/raw-{id}.json").unwrap();
        assert_eq!(p.matches("raw-7.json").unwrap()[0].1, "7");
        assert!(p.matches("raw-.json").is_none());
        assert!(p.matches("cooked-7.json").is_none());
        let out = BlobPattern::parse("thumbnails/{name}").unwrap();
        assert_eq!(
            out.fill(|n| (n == "name").then(|| "cat.ppm".into()))
                .unwrap(),
            "thumbnails/cat.ppm"
        );
        assert_eq!(out.fill(|_| None).unwrap_err(), "name");
        for bad in [
            "images",
            "images/",
            "Images/{name}",
            "images/{}",
            "images/{a}{b}",
            "images/{a",
            "images/a}",
            "images/{a}/{a}",
        ] {
            assert!(BlobPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn queue_names_and_backoff() {
        assert!(QueueName::parse("orders").is_ok());
        assert_eq!(
            QueueName::parse("orders").unwrap().poison(),
            "orders-poison"
        );
        for bad in ["", "Orders", "-x", "a_b", &"x".repeat(64)] {
            assert!(QueueName::parse(bad).is_err(), "{bad:?}");
        }
        let q = QueueTrigger {
            queue: QueueName::parse("q").unwrap(),
            batch_size: 16,
            new_batch_threshold: 8,
            max_dequeue_count: 5,
            lease: Duration::from_secs(30),
            retry_delay: Duration::from_secs(1),
            max_retry_delay: Duration::from_secs(5),
        };
        assert_eq!(q.backoff(1), Duration::from_secs(1));
        assert_eq!(q.backoff(2), Duration::from_secs(2));
        assert_eq!(q.backoff(3), Duration::from_secs(4));
        assert_eq!(q.backoff(4), Duration::from_secs(5));
        assert_eq!(q.backoff(99), Duration::from_secs(5));
    }
}
