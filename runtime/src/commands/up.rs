//! `kelvin up`: serve the manifest's functions over HTTP.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};

use super::{ManifestArgs, open_durable, open_events, record_sinks, run_builds, tokio_runtime};
use crate::runtime::Runtime;

/// Serve the functions in the manifest.
#[derive(clap::Args, Debug)]
pub struct UpCommand {
    #[command(flatten)]
    pub manifest: ManifestArgs,
    /// Run every function's build command before serving (functions are
    /// then compiled in the background, as always).
    #[arg(long)]
    pub build: bool,
    /// Listen here instead of the manifest's `server.listen`.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Keep records out of the ledger (to measure what it costs; nothing is
    /// billed then).
    #[arg(long)]
    pub no_ledger: bool,
}

impl UpCommand {
    pub fn execute(self) -> Result<()> {
        self.manifest.init_serving_logs();
        let manifest = self.manifest.load()?;
        if self.build {
            run_builds(&manifest)?;
        }
        let log = Runtime::invocation_log_path(&manifest);
        let (sink, db) = record_sinks(&manifest, !self.no_ledger)?;
        let listen = self.listen.unwrap_or(manifest.server.listen);
        // Everything is validated before the socket is bound: a broken
        // function stops start-up here, not at its first request.
        let runtime = Arc::new(Runtime::new(manifest, sink)?);
        let server = crate::trigger::http::HttpServer::new(runtime.clone())?;
        let rt = tokio_runtime()?;
        rt.block_on(async {
            let events = open_events(&runtime, &db, !self.no_ledger).await?;
            let durable = open_durable(&runtime, &db, !self.no_ledger).await?;
            durable.keep_versions_with(server.deployer());
            let waker = durable.clone();
            events.on_durable(Box::new(move |target| waker.wake(target)));
            let server = server
                .with_events(events.clone())
                .with_durable(durable.clone());
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("failed to listen on {listen}"))?;
            let mut slot_listeners = Vec::new();
            for (slot, addr) in &runtime.manifest().server.slot_listen {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("failed to listen on {addr} for slot `{slot}`"))?;
                tracing::info!(slot, address = %l.local_addr()?, "serving a slot on its own address");
                slot_listeners.push((l, slot.clone()));
            }
            let address = listener.local_addr()?;
            // Where the CLI finds this server (`kelvin slots` and the rest),
            // whatever port it was given, 0 included.
            let address_file = server_address_file(&runtime.manifest().server.state_dir);
            std::fs::write(&address_file, format!("{address}\n"))
                .with_context(|| format!("failed to write {}", address_file.display()))?;
            tracing::info!(
                address = %address,
                app = %runtime.manifest().name,
                functions = runtime.manifest().functions.len(),
                invocation_log = %log.display(),
                "kelvin is serving"
            );
            // Never on the request path: functions without an artifact are
            // compiled now, beside serving, and a request that cannot wait
            // for Cranelift is answered by Winch's code meanwhile.
            runtime.registry().serve_tiered();
            let precompile = runtime.registry().precompile_in_background();
            // Timers, queue consumers and blob scanners (production only).
            crate::trigger::listen::start(&events)
                .await
                .context("failed to start the event triggers")?;
            // Orchestrations, activities and entities pending since the
            // last stop resume.
            durable
                .start()
                .await
                .context("failed to start the durable functions")?;
            // The manifest is the app's declaration: edited (or on SIGHUP),
            // it is applied to production like a deploy.
            let watcher = tokio::spawn(crate::deploy::watch_manifest(server.deployer()));
            server
                .serve_slots(listener, slot_listeners, shutdown_signal())
                .await?;
            watcher.abort();
            precompile.abort();
            // Only our own: another server may have started on this state
            // dir since (it would have failed to open the ledger, but its
            // address is its own).
            if std::fs::read_to_string(&address_file).is_ok_and(|a| a.trim() == address.to_string()) {
                let _ = std::fs::remove_file(&address_file);
            }
            tracing::info!("stopped");
            anyhow::Ok(())
        })
    }
}

/// The file in the state dir where `kelvin up` writes the address it
/// serves on, for the CLI.
pub fn server_address_file(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("address")
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("failed to install the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
