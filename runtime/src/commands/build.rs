//! `kelvin build`: run build commands, then precompile into the cache.

use std::sync::Arc;

use anyhow::Result;

use super::{ManifestArgs, run_builds, tokio_runtime};
use crate::metering::MemorySink;
use crate::runtime::Runtime;

/// Run every function's build command and precompile the results, so the
/// first invocation loads from the cache instead of compiling.
#[derive(clap::Args, Debug)]
pub struct BuildCommand {
    #[command(flatten)]
    pub manifest: ManifestArgs,
}

impl BuildCommand {
    pub fn execute(self) -> Result<()> {
        self.manifest.init_logging();
        let manifest = self.manifest.load()?;
        run_builds(&manifest)?;
        let runtime = Runtime::new(manifest, Arc::new(MemorySink::default()))?;
        let compiled = tokio_runtime()?.block_on(runtime.registry().precompile_all())?;
        eprintln!("precompiled {compiled} function(s); the others were already cached");
        Ok(())
    }
}
