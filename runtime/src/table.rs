//! What serves: each slot (`production`, `staging`, ...) maps every function
//! to one immutable version; the whole table is replaced in one step by a
//! deploy, a swap or a rollback, so a request sees one table from start to
//! end, and an invocation keeps the version it started on.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::cache::{WasmHash, WasmKind};
use crate::manifest::FunctionSpec;
use crate::trigger::TriggerConfig;

/// The slot every app has; triggers other than HTTP fire for it only.
pub const PRODUCTION: &str = "production";

/// A version: the wasm's hash and the function's configuration, hashed
/// together (16 hex digits). The same bytes and configuration always make
/// the same version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VersionId(String);

impl VersionId {
    pub fn of(wasm: &WasmHash, spec: &FunctionSpec) -> VersionId {
        let mut hasher = blake3::Hasher::new();
        hasher.update(wasm.hex().as_bytes());
        hasher.update(b"\n");
        hasher.update(fingerprint(spec).as_bytes());
        VersionId(hasher.finalize().to_hex()[..16].to_owned())
    }

    /// A version id as a client wrote it, if it is one.
    pub fn parse(s: &str) -> Option<VersionId> {
        (s.len() == 16
            && s.bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
        .then(|| VersionId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What of a function's configuration makes its version: everything that
/// changes how it runs or is reached, in a fixed order; not where its file
/// was or how it was built, nor where in a manifest it was written.
fn fingerprint(spec: &FunctionSpec) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "name={}", spec.name);
    for t in &spec.triggers {
        match t {
            TriggerConfig::Http(h) => {
                let _ = writeln!(
                    s,
                    "http route={} methods={} auth={:?}",
                    h.route.pattern(),
                    h.methods.allow_header(),
                    h.auth
                );
            }
            other => {
                let _ = writeln!(s, "{other:?}");
            }
        }
    }
    for o in &spec.outputs {
        let _ = writeln!(s, "output {o:?}");
    }
    let l = &spec.limits;
    let _ = writeln!(
        s,
        "timeout_ms={} memory={} fuel={:?}",
        l.timeout.as_millis(),
        l.memory,
        l.fuel
    );
    for (k, v) in &spec.env {
        let _ = writeln!(s, "env {k:?}={v:?}");
    }
    let c = &spec.concurrency;
    let _ = writeln!(
        s,
        "keep_warm_ms={} concurrency={} queue={} queue_timeout_ms={}",
        spec.keep_warm.as_millis(),
        c.max,
        c.queue,
        c.queue_timeout.as_millis()
    );
    for h in &spec.allowed_outbound_hosts {
        let _ = writeln!(s, "outbound {h:?}");
    }
    s
}

/// A function version as it serves.
#[derive(Debug)]
pub struct Unit {
    /// The function's name (what records and metrics are labelled with).
    pub function: String,
    pub version: VersionId,
    /// The registry key its code is loaded under.
    pub key: String,
    /// Module or component: known when the version was checked, so no
    /// request asks the registry.
    pub kind: WasmKind,
    pub spec: Arc<FunctionSpec>,
}

/// Production sends a share of its requests to another slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub slot: String,
    /// Percent of requests (1-99) that go to `slot`.
    pub percent: u8,
    /// A request header whose value picks the slot (so one client stays on
    /// one version); without it, a cookie does.
    pub affinity_header: Option<String>,
}

/// Every slot's functions.
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Bumped at every replacement, so derived views (a trigger's routes)
    /// know when to rebuild.
    pub generation: u64,
    pub slots: BTreeMap<String, BTreeMap<String, Arc<Unit>>>,
    pub split: Option<Split>,
}

impl Table {
    /// The unit serving `function` in `slot`.
    pub fn unit(&self, slot: &str, function: &str) -> Option<&Arc<Unit>> {
        self.slots.get(slot)?.get(function)
    }

    pub fn production(&self) -> impl Iterator<Item = &Arc<Unit>> {
        self.slots
            .get(PRODUCTION)
            .into_iter()
            .flat_map(|s| s.values())
    }
}

/// A slot's name: like a function's (lowercase letters, digits, `-`, `_`,
/// starting with a letter, at most 64 characters).
pub fn valid_slot_name(s: &str) -> bool {
    crate::manifest::Name::try_from(s.to_owned()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_ids_parse_only_their_own_shape() {
        assert!(VersionId::parse("0123456789abcdef").is_some());
        for bad in [
            "",
            "0123456789ABCDEF",
            "0123456789abcde",
            "0123456789abcdefg",
            "../etc/passwd",
        ] {
            assert!(VersionId::parse(bad).is_none(), "{bad}");
        }
    }
}
