//! Shared helpers for Kelvin's integration tests: the guests, built once per
//! test process from the real crates in `guests/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Every test guest.
pub const GUESTS: &[&str] = &["hello", "echo", "spin", "alloc", "trap", "loop"];

/// The workspace root.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
}

/// Builds every guest to wasm32-wasip1 (once per process; cargo makes it a
/// no-op when nothing changed) and returns the folder holding the `.wasm`s.
pub fn guest_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = workspace_root();
        // A separate target dir: the outer `cargo test` may hold the lock on
        // the default one.
        let target = root.join("target").join("test-guests");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.current_dir(root)
            .args([
                "build",
                "--quiet",
                "--profile",
                "guest",
                "--target",
                "wasm32-wasip1",
                "--target-dir",
            ])
            .arg(&target);
        for g in GUESTS {
            cmd.args(["-p", &format!("guest-{g}")]);
        }
        let status = cmd
            .status()
            .expect("failed to run cargo to build the guests");
        assert!(status.success(), "building the guests failed: {status}");
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
