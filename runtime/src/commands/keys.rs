//! `kelvin keys`: list, create and revoke access keys. A running server picks
//! changes up within a second.

use anyhow::Result;
use clap::Subcommand;

use super::ManifestArgs;
use crate::keys::{KeyStore, Scope};

/// Manage the access keys of HTTP routes with `auth = "function"` or `"admin"`.
#[derive(clap::Args, Debug)]
pub struct KeysCommand {
    #[command(flatten)]
    pub manifest: ManifestArgs,
    #[command(subcommand)]
    pub action: KeysAction,
}

#[derive(Subcommand, Debug)]
pub enum KeysAction {
    /// Print every key: scope, name, value, creation time.
    List,
    /// Create a key (for a function, for every function, or a new master key,
    /// which replaces the old one).
    New {
        #[command(flatten)]
        scope: ScopeArgs,
        /// The key's name.
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Revoke a key by scope and name.
    Revoke {
        #[command(flatten)]
        scope: ScopeArgs,
        /// The key's name.
        name: String,
    },
}

#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
pub struct ScopeArgs {
    /// A key for this function's routes.
    #[arg(long)]
    function: Option<String>,
    /// A host key: every function's routes.
    #[arg(long)]
    host: bool,
    /// The master key: admin routes and everything else.
    #[arg(long)]
    master: bool,
}

impl ScopeArgs {
    fn scope(&self) -> Scope {
        match (&self.function, self.host) {
            (Some(f), _) => Scope::Function(f.clone()),
            (None, true) => Scope::Host,
            (None, false) => Scope::Master,
        }
    }
}

impl KeysCommand {
    pub fn execute(self) -> Result<()> {
        let manifest = self.manifest.load()?;
        let names: Vec<&str> = manifest.functions.iter().map(|f| f.name.as_str()).collect();
        let store = KeyStore::open(&manifest.server.state_dir, &names)?;
        match self.action {
            KeysAction::List => {
                println!("{:<20} {:<16} {:<66} created", "scope", "name", "value");
                for k in store.list() {
                    println!(
                        "{:<20} {:<16} {:<66} {}",
                        k.scope.to_string(),
                        k.name,
                        k.value,
                        k.created_at
                    );
                }
            }
            KeysAction::New { scope, name } => {
                let scope = scope.scope();
                if let Scope::Function(f) = &scope {
                    anyhow::ensure!(
                        names.contains(&f.as_str()),
                        "no function named `{f}` in the manifest"
                    );
                }
                let key = store.create(&name, scope)?;
                println!("{}", key.value);
            }
            KeysAction::Revoke { scope, name } => {
                let scope = scope.scope();
                store.revoke(&name, scope.clone())?;
                eprintln!("revoked {scope} key `{name}`");
            }
        }
        Ok(())
    }
}
