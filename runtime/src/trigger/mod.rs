//! Triggers: what starts an invocation. Each kind has its manifest table, its
//! validated config, and a way to run; HTTP is the first, timers, queues and
//! blobs slot in beside it.

pub mod cgi;
pub mod http;

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
    Http(http::HttpTrigger),
}

impl TriggerConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            TriggerConfig::Http(_) => http::Http::TYPE,
        }
    }
}
