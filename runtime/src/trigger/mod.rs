//! Triggers: what starts an invocation. Each kind has its manifest table and
//! validated config ([`config`]) and a way to run: [`http`] serves HTTP,
//! [`timer`], [`queue`] and [`blob`] run events, sharing [`events`], started
//! by [`listen`]; [`durable`] runs orchestrations, activities and entities.
//! The HTTP server also serves the deployment admin API ([`admin`]), the
//! queue and blob API ([`events_api`]) and the durable management API
//! ([`durable_api`]); [`headers`] names their headers.

pub mod admin;
pub mod blob;
pub mod cgi;
pub mod config;
pub mod durable;
pub mod durable_api;
pub mod events;
pub mod events_api;
pub mod headers;
pub mod http;
pub mod inputs;
pub mod listen;
pub mod queue;
pub mod timer;

pub use config::{Trigger, TriggerConfig};
