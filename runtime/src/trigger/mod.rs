//! Triggers: what starts an invocation. Each kind has its manifest table and
//! validated config ([`config`]) and a way to run; HTTP is the first, timers,
//! queues and blobs slot in beside it. The HTTP server also serves the
//! deployment admin API ([`admin`]); [`headers`] names the headers of both.

pub mod admin;
pub mod cgi;
pub mod config;
pub mod headers;
pub mod http;

pub use config::{Trigger, TriggerConfig};
