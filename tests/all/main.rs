//! Kelvin's integration tests, one binary with a module per area. They start
//! the real runtime (and server, on 127.0.0.1:0), load real guests built from
//! `guests/`, and talk HTTP with a real client.

mod bench;
mod components;
mod concurrency;
mod deploy;
mod files;
mod hostile;
mod http;
mod keys;
mod languages;
mod limits;
mod manifest;
mod metering;
mod promises;
mod registry;
mod util;
