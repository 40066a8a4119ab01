//! Shared helpers for Kelvin's integration tests: the guests, built once per
//! test process from the real crates in `guests/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Every preview-1 test guest.
pub const GUESTS: &[&str] = &["hello", "echo", "spin", "alloc", "trap", "loop"];
/// Every wasi:http component test guest.
pub const COMPONENTS: &[&str] = &["hello-http", "stream-echo", "fetch"];

/// The workspace root.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
}

/// Builds every guest, preview-1 and component (once per process; cargo makes it a
/// no-op when nothing changed) and returns the folder holding the `.wasm`s.
pub fn guest_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = workspace_root();
        // A separate target dir: the outer `cargo test` may hold the lock on
        // the default one.
        let target = root.join("target").join("test-guests");
        for (triple, guests) in [("wasm32-wasip1", GUESTS), ("wasm32-wasip2", COMPONENTS)] {
            let mut cmd = Command::new(env!("CARGO"));
            cmd.current_dir(root)
                .args([
                    "build",
                    "--quiet",
                    "--profile",
                    "guest",
                    "--target",
                    triple,
                    "--target-dir",
                ])
                .arg(&target);
            for g in guests {
                cmd.args(["-p", &format!("guest-{g}")]);
            }
            let status = cmd
                .status()
                .expect("failed to run cargo to build the guests");
            assert!(
                status.success(),
                "building the {triple} guests failed: {status}"
            );
        }
        target.join("wasm32-wasip1").join("guest")
    })
}

/// The path of one built guest.
pub fn guest(name: &str) -> PathBuf {
    let path = guest_dir().join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "guest `{name}` was not built at {}",
        path.display()
    );
    path
}

/// The folder holding the built wasi:http components.
pub fn component_dir() -> PathBuf {
    guest_dir()
        .parent()
        .and_then(Path::parent)
        .expect("target/test-guests/<triple>/guest")
        .join("wasm32-wasip2")
        .join("guest")
}
