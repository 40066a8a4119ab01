//! `kelvin check`: validate the manifest and every function's wasm.

use std::sync::Arc;

use anyhow::Result;

use super::ManifestArgs;
use crate::metering::MemorySink;
use crate::runtime::Runtime;

/// Validate the manifest and every wasm file; exit non-zero on the first error.
#[derive(clap::Args, Debug)]
pub struct CheckCommand {
    #[command(flatten)]
    pub manifest: ManifestArgs,
}

impl CheckCommand {
    pub fn execute(self) -> Result<()> {
        let manifest = self.manifest.load()?;
        let count = manifest.functions.len();
        let name = manifest.name.clone();
        Runtime::new(manifest, Arc::new(MemorySink::default()))?;
        println!("ok: app `{name}`, {count} function(s) valid");
        Ok(())
    }
}
