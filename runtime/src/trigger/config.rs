//! Triggers as the manifest declares them: each kind's validated
//! configuration, with no knowledge of how it is served (so the manifest
//! can name them without depending on the servers, which depend on it).

use std::ops::Range;

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
}

impl TriggerConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            TriggerConfig::Http(_) => Http::TYPE,
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
