//! `kelvin deploy`, `slots`, `swap`, `rollback`, `traffic`, `versions`: the
//! deployment admin API of a running server, from the command line.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::{ManifestArgs, run_builds, tokio_runtime};
use crate::cache::WasmHash;
use crate::keys::{KeyStore, Scope};
use crate::table::{PRODUCTION, VersionId};

/// Where the server is, and the key to present.
#[derive(clap::Args, Debug)]
pub struct ServerArgs {
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// The running server, `http://HOST:PORT` or `HOST:PORT` (default: the
    /// address `kelvin up` recorded in the state dir, else the manifest's
    /// `[server] listen`).
    #[arg(long, global = true, env = "KELVIN_URL")]
    pub url: Option<String>,
    /// The master key (default: the one in the manifest's state dir).
    #[arg(long, global = true, env = "KELVIN_KEY", hide_env_values = true)]
    pub key: Option<String>,
}

/// A connection to the admin API.
pub(super) struct Admin {
    pub(super) authority: String,
    pub(super) key: String,
}

impl ServerArgs {
    pub(super) fn admin(&self) -> Result<Admin> {
        let manifest = self.manifest.load()?;
        let authority = match &self.url {
            Some(url) => authority(url)?,
            None => recorded_address(&manifest.server.state_dir)
                .unwrap_or_else(|| manifest.server.listen.to_string()),
        };
        let key = match &self.key {
            Some(k) => k.clone(),
            None => KeyStore::open(&manifest.server.state_dir, &[])
                .context("failed to open the key store; pass --key")?
                .find(&Scope::Master)
                .map(|k| k.value)
                .context("no master key in the state dir; pass --key")?,
        };
        Ok(Admin { authority, key })
    }
}

/// `HOST:PORT` of `http://HOST:PORT[/]` or of `HOST:PORT`.
fn authority(url: &str) -> Result<String> {
    let rest = match url.split_once("://") {
        Some(("http", rest)) => rest,
        Some(_) => bail!("{url}: only http:// URLs are supported"),
        None => url,
    };
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') {
        bail!("{url}: expected http://HOST:PORT or HOST:PORT");
    }
    Ok(rest.to_owned())
}

/// The address a `kelvin up` on this state dir recorded, if that server
/// still answers there (one that was killed leaves its file behind).
fn recorded_address(state_dir: &std::path::Path) -> Option<String> {
    let file = super::up::server_address_file(state_dir);
    let address: std::net::SocketAddr = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
    std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_millis(500)).ok()?;
    Some(address.to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn server_urls_with_or_without_a_scheme() {
        for (url, want) in [
            ("http://127.0.0.1:3917", "127.0.0.1:3917"),
            ("http://127.0.0.1:3917/", "127.0.0.1:3917"),
            ("127.0.0.1:3917", "127.0.0.1:3917"),
            ("localhost:3000", "localhost:3000"),
        ] {
            assert_eq!(super::authority(url).unwrap(), want, "{url}");
        }
        for bad in [
            "https://127.0.0.1:1",
            "http://127.0.0.1:1/admin",
            "",
            "http://",
        ] {
            assert!(super::authority(bad).is_err(), "{bad:?}");
        }
    }
}

impl Admin {
    /// One request; the JSON answer of a 2xx, else the server's error.
    pub(super) async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Bytes,
    ) -> Result<Value> {
        let bytes = self.exchange(method, path, body).await?;
        Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }

    /// One request; the body of a 2xx, else the server's error.
    pub(super) async fn exchange(
        &self,
        method: hyper::Method,
        path: &str,
        body: Bytes,
    ) -> Result<Bytes> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .with_context(|| format!("no server at {}: is `kelvin up` running?", self.authority))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        let request = hyper::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, &self.authority)
            .header(crate::trigger::headers::KEY_HEADER, &self.key)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let why = value["error"].as_str().unwrap_or("no reason given");
            bail!("{method} {path}: {status}: {why}");
        }
        Ok(bytes)
    }

    pub(super) async fn get(&self, path: &str) -> Result<Value> {
        self.call(hyper::Method::GET, path, Bytes::new()).await
    }

    async fn send(&self, method: hyper::Method, path: &str, body: Value) -> Result<Value> {
        self.call(method, path, Bytes::from(body.to_string())).await
    }
}

pub(super) fn run<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio_runtime()?.block_on(f)
}

/// Deploy the manifest's functions (all, or those named) to a slot of a
/// running server: each version is checked, compiled and loaded before the
/// slot points at it. Functions whose version is already there are skipped.
#[derive(clap::Args, Debug)]
pub struct DeployCommand {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The functions to deploy (default: all).
    pub functions: Vec<String>,
    /// The slot to deploy to.
    #[arg(long, default_value = PRODUCTION)]
    pub slot: String,
    /// Run the build commands first.
    #[arg(long)]
    pub build: bool,
}

impl DeployCommand {
    pub fn execute(self) -> Result<()> {
        self.server.manifest.init_logging_at("warn");
        let manifest = self.server.manifest.load()?;
        let text = std::fs::read_to_string(&manifest.path)?;
        if self.build {
            run_builds(&manifest)?;
        }
        for name in &self.functions {
            if manifest.function(name).is_none() {
                bail!("no function named `{name}` in {}", manifest.path.display());
            }
        }
        let admin = self.server.admin()?;
        run(async {
            let slots = admin.get("/admin/slots").await?;
            for spec in &manifest.functions {
                let name = spec.name.as_str();
                if !self.functions.is_empty() && !self.functions.iter().any(|f| f == name) {
                    continue;
                }
                let bytes = std::fs::read(&spec.source).with_context(|| {
                    format!(
                        "function `{name}`: failed to read `{}`",
                        spec.source.display()
                    )
                })?;
                let version = VersionId::of(&WasmHash::of(&bytes), spec);
                if slots["slots"][&self.slot][name] == version.as_str() {
                    println!("{name}: {version} already in {}", self.slot);
                    continue;
                }
                let wasm = admin
                    .call(hyper::Method::PUT, "/admin/wasm", Bytes::from(bytes))
                    .await?;
                let made = admin
                    .send(
                        hyper::Method::POST,
                        &format!("/admin/functions/{name}/versions"),
                        json!({
                            "wasm": wasm["wasm"],
                            "manifest": text,
                            "slot": self.slot,
                            // If the server runs this manifest, this version
                            // is now what it declares (docs/deploy.md).
                            "from_manifest": std::fs::canonicalize(&manifest.path).ok(),
                        }),
                    )
                    .await?;
                println!(
                    "{name}: {} deployed to {}",
                    made["version"].as_str().unwrap_or("?"),
                    self.slot
                );
            }
            Ok(())
        })
    }
}

/// Show what every slot serves, and the traffic split.
#[derive(clap::Args, Debug)]
pub struct SlotsCommand {
    #[command(flatten)]
    pub server: ServerArgs,
}

impl SlotsCommand {
    pub fn execute(self) -> Result<()> {
        self.server.manifest.init_logging_at("warn");
        let admin = self.server.admin()?;
        let slots = run(admin.get("/admin/slots"))?;
        print_slots(&slots);
        Ok(())
    }
}

fn print_slots(slots: &Value) {
    println!("{:<16} {:<24} version", "slot", "function");
    for (slot, functions) in slots["slots"].as_object().into_iter().flatten() {
        for (function, version) in functions.as_object().into_iter().flatten() {
            println!(
                "{slot:<16} {function:<24} {}",
                version.as_str().unwrap_or("")
            );
        }
    }
    if slots["split"].is_object() {
        print_split(slots);
    }
}

/// What a change of slots did: each function whose version moved, and the
/// split if it changed; never the whole table (`kelvin slots` shows that).
fn print_changes(before: &Value, after: &Value) {
    let mut changed = false;
    for (slot, functions) in after["slots"].as_object().into_iter().flatten() {
        for (function, version) in functions.as_object().into_iter().flatten() {
            let new = version.as_str().unwrap_or("");
            let old = before["slots"][slot][function].as_str().unwrap_or("(none)");
            if old != new {
                println!("{slot} {function}: {old} -> {new}");
                changed = true;
            }
        }
    }
    if before["split"] != after["split"] {
        print_split(after);
        changed = true;
    }
    if !changed {
        println!("nothing changed");
    }
}

/// The traffic split, in one line.
fn print_split(slots: &Value) {
    match slots["split"].as_object() {
        Some(split) => println!(
            "split: {}% to {}{}",
            split["percent"],
            split["slot"].as_str().unwrap_or(""),
            split
                .get("affinity_header")
                .and_then(Value::as_str)
                .map(|h| format!(" (affinity by {h})"))
                .unwrap_or_default()
        ),
        None => println!("production serves every request (no split)"),
    }
}

/// Swap two slots' versions (loaded and warmed up first; nothing dropped).
#[derive(clap::Args, Debug)]
pub struct SwapCommand {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The slot whose versions go live.
    pub source: String,
    /// The slot they replace.
    #[arg(default_value = PRODUCTION)]
    pub target: String,
}

impl SwapCommand {
    pub fn execute(self) -> Result<()> {
        self.server.manifest.init_logging_at("warn");
        let admin = self.server.admin()?;
        let (before, after) = run(async {
            let before = admin.get("/admin/slots").await?;
            let after = admin
                .send(
                    hyper::Method::POST,
                    "/admin/swap",
                    json!({ "source": self.source, "target": self.target }),
                )
                .await?;
            anyhow::Ok((before, after))
        })?;
        print_changes(&before, &after);
        Ok(())
    }
}

/// Point a slot's function back at the version before the one it serves
/// (or at `--to VERSION`).
#[derive(clap::Args, Debug)]
pub struct RollbackCommand {
    #[command(flatten)]
    pub server: ServerArgs,
    pub function: String,
    #[arg(long, default_value = PRODUCTION)]
    pub slot: String,
    /// The version to go back to (default: the one made before the current).
    #[arg(long)]
    pub to: Option<String>,
}

impl RollbackCommand {
    pub fn execute(self) -> Result<()> {
        self.server.manifest.init_logging_at("warn");
        let admin = self.server.admin()?;
        run(async {
            let (function, slot) = (&self.function, &self.slot);
            let slots = admin.get("/admin/slots").await?;
            let current = slots["slots"][slot][function]
                .as_str()
                .with_context(|| format!("no function `{function}` in slot `{slot}`"))?
                .to_owned();
            let to = match &self.to {
                Some(v) => v.clone(),
                None => {
                    let versions = admin
                        .get(&format!("/admin/functions/{function}/versions"))
                        .await?;
                    let ids: Vec<&str> = versions["versions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|v| v["version"].as_str())
                        .collect();
                    let at = ids.iter().position(|v| *v == current);
                    match at.and_then(|i| ids.get(i + 1)) {
                        Some(older) => older.to_string(),
                        None => bail!(
                            "`{function}` in `{slot}` serves its oldest kept version ({current}): nothing to roll back to"
                        ),
                    }
                }
            };
            admin
                .send(
                    hyper::Method::PUT,
                    &format!("/admin/slots/{slot}/functions/{function}"),
                    json!({ "version": to }),
                )
                .await?;
            println!("{function} in {slot}: now {to} (was {current})");
            Ok(())
        })
    }
}

/// Split production's traffic: `kelvin traffic production=90 staging=10`
/// (`production=100` stops the split).
#[derive(clap::Args, Debug)]
pub struct TrafficCommand {
    #[command(flatten)]
    pub server: ServerArgs,
    /// `SLOT=PERCENT` pairs: production and at most one other slot,
    /// adding up to 100.
    #[arg(required = true)]
    pub weights: Vec<String>,
    /// Keep each client on one slot by this request header's value
    /// (default: a cookie).
    #[arg(long)]
    pub affinity_header: Option<String>,
}

impl TrafficCommand {
    pub fn execute(self) -> Result<()> {
        self.server.manifest.init_logging_at("warn");
        let mut weights = BTreeMap::new();
        for pair in &self.weights {
            let (slot, percent) = pair
                .split_once('=')
                .and_then(|(s, p)| Some((s.to_owned(), p.parse::<u8>().ok()?)))
                .with_context(|| format!("{pair:?}: write SLOT=PERCENT, e.g. staging=10"))?;
            weights.insert(slot, percent);
        }
        let total: u32 = weights.values().map(|p| u32::from(*p)).sum();
        let others: Vec<(&String, &u8)> =
            weights.iter().filter(|(s, _)| *s != PRODUCTION).collect();
        if total != 100 || others.len() > 1 {
            bail!(
                "give production and at most one other slot, adding up to 100 (e.g. production=90 staging=10)"
            );
        }
        let admin = self.server.admin()?;
        let slots = run(async {
            match others.first() {
                Some((slot, percent)) if **percent > 0 => {
                    let mut body = json!({ "slot": slot, "percent": percent });
                    if let Some(h) = &self.affinity_header {
                        body["affinity_header"] = json!(h);
                    }
                    admin.send(hyper::Method::PUT, "/admin/split", body).await
                }
                _ => {
                    admin
                        .call(hyper::Method::DELETE, "/admin/split", Bytes::new())
                        .await
                }
            }
        })?;
        print_split(&slots);
        Ok(())
    }
}

/// List a function's kept versions, newest first, with the slots on each.
#[derive(clap::Args, Debug)]
pub struct VersionsCommand {
    #[command(flatten)]
    pub server: ServerArgs,
    pub function: String,
}

impl VersionsCommand {
    pub fn execute(self) -> Result<()> {
        self.server.manifest.init_logging_at("warn");
        let admin = self.server.admin()?;
        let versions = run(admin.get(&format!("/admin/functions/{}/versions", self.function)))?;
        println!("{:<18} {:<22} {:<14} slots", "version", "created", "wasm");
        for v in versions["versions"].as_array().into_iter().flatten() {
            let slots: Vec<&str> = v["slots"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            println!(
                "{:<18} {:<22} {:<14} {}",
                v["version"].as_str().unwrap_or(""),
                v["created_at"].as_str().unwrap_or(""),
                &v["wasm"].as_str().unwrap_or("")[..12.min(v["wasm"].as_str().unwrap_or("").len())],
                slots.join(", ")
            );
        }
        Ok(())
    }
}
