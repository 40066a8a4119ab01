//! Kelvin: a scale-to-zero WebAssembly function runtime.
//!
//! # Layout
//!
//! Modules follow the path of a request:
//!
//! ```text
//! trigger (http) -> table (slot, version) -> router -> runtime -> admission (concurrency, queue)
//!     -> registry (load on demand: cache | compile; LRU + idle eviction)
//!     -> invoke (fresh pooled instance; deadline, memory, fuel; metering)
//!     -> response + metering record (sink) + metrics
//! ```
//!
//! - [`manifest`]: `functions.toml`, parsed then validated.
//! - [`trigger`]: what starts invocations: [`trigger::config`] as the
//!   manifest declares them, [`trigger::http`] serves HTTP (with
//!   [`trigger::cgi`] for preview-1 guests), [`trigger::timer`],
//!   [`trigger::queue`] and [`trigger::blob`] run events through
//!   [`trigger::events`].
//! - [`events`]: the event stores (queues, receipts, timer status, outbox;
//!   blobs), the events' and answers' JSON, and what an invocation changes.
//! - [`durable`]: durable functions' state and protocol: histories,
//!   answers, the determinism check, and their store.
//! - [`commit`]: the group-commit writer of the ledger's database.
//! - [`table`]: what serves: each slot's function versions, replaced whole.
//! - [`deploy`]: versions, slots, swaps, splits and their durable store;
//!   the admin API over it is [`trigger::admin`].
//! - [`router`]: method + path to function.
//! - [`runtime`]: ties the pieces together; [`runtime::Runtime::invoke`].
//! - [`admission`]: per-function concurrency and the bounded queue.
//! - [`registry`] and [`cache`]: loading, the compiled-artifact cache, eviction.
//! - [`engine`]: the one wasmtime engine and its epoch ticker.
//! - [`invoke`]: one invocation of a preview-1 command in a fresh instance.
//! - [`proxy`]: one invocation of a wasi:http/proxy component.
//! - [`keys`]: access keys for HTTP routes.
//! - [`ledger`]: the durable invocation ledger (SQLite, group commit).
//! - [`billing`]: prices computed from the ledger by a policy.
//! - [`metering`] and [`metrics`]: records per invocation, Prometheus metrics.
//! - [`pipe`]: guest stdout and stderr, capped without refusing writes.
//! - [`batch`]: logs written in batches by a background thread.
//! - [`bench`]: `kelvin bench`, cold-start and HTTP measurements.
//! - [`commands`]: the `kelvin` CLI.

pub mod admission;
pub mod batch;
pub mod bench;
pub mod billing;
pub mod cache;
pub mod commands;
pub mod commit;
pub mod deploy;
pub mod durable;
pub mod engine;
pub mod events;
pub mod invoke;
pub mod keys;
pub mod ledger;
pub mod manifest;
pub mod metering;
pub mod metrics;
pub mod pipe;
pub mod proxy;
pub mod registry;
pub mod router;
pub mod runtime;
pub mod table;
pub mod trigger;

pub use invoke::Event;
pub use manifest::Manifest;
pub use runtime::{Invocation, Runtime};
