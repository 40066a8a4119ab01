//! Shared helpers for Kelvin's integration tests: the guests, built once per
//! test process from the real sources in `guests/` with the real toolchains
//! (installed first by `scripts/toolchains.sh`, so `cargo test` works on a
//! fresh machine).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

/// Every preview-1 test guest.
pub const GUESTS: &[&str] = &[
    "hello",
    "echo",
    "spin",
    "alloc",
    "trap",
    "loop",
    "hostile",
    "events",
    "cleanup",
    "thumbnail",
    "process-order",
    "submit-order",
    "durable",
];
/// Every wasi:http component test guest.
pub const COMPONENTS: &[&str] = &["hello-http", "stream-echo", "fetch", "hostile-http"];

/// The workspace root.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
}

/// Installs the guest toolchains and the tests' tools (the OpenAPI fuzzer)
/// at their pinned versions (once per process; quick when they are there
/// already).
pub fn toolchains() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let root = workspace_root();
        let status = Command::new("bash")
            .arg(root.join("scripts").join("toolchains.sh"))
            .args(["rust", "python", "node", "fuzz"])
            .current_dir(root)
            .status()
            .expect("failed to run scripts/toolchains.sh");
        assert!(status.success(), "scripts/toolchains.sh failed: {status}");
    });
}

/// Builds every Rust guest, preview-1 and component (once per process;
/// cargo makes it a no-op when nothing changed) and returns the folder
/// holding the preview-1 `.wasm`s.
pub fn guest_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        toolchains();
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
    // A package `guest-a-b` builds the binary `a_b`.
    let path = guest_dir().join(format!("{}.wasm", name.replace('-', "_")));
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

/// The folder holding the example app's Python model (`functions.toml`
/// mounts it at `/model` for `predict`).
pub fn predict_model_dir() -> PathBuf {
    workspace_root()
        .join("guests")
        .join("predict-py")
        .join("model")
}

/// The `.wasm` of a function of the example app (`functions.toml`) written
/// in another language than Rust, built by the app's own `build` command,
/// exactly as `kelvin up --build` runs it. A build is skipped when its
/// output is newer than the sources it names and the pinned toolchains.
pub fn example_guest(function: &str) -> PathBuf {
    toolchains();
    let root = workspace_root();
    let text = std::fs::read_to_string(root.join("functions.toml")).expect("read functions.toml");
    let manifest: toml::Table = text.parse().expect("functions.toml is TOML");
    let spec = manifest["functions"][function]
        .as_table()
        .unwrap_or_else(|| panic!("no function `{function}` in functions.toml"));
    let source = root.join(spec["source"].as_str().expect("a source"));
    let build = spec["build"].as_str().expect("a build command");
    if !fresh(&source, build) {
        // Builds of one function at a time: this process's tests may ask
        // for the same guest together.
        static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
        if !fresh(&source, build) {
            let status = Command::new("sh")
                .args(["-c", build])
                .current_dir(root)
                .status()
                .expect("failed to run a build command");
            assert!(status.success(), "`{build}` failed: {status}");
        }
    }
    assert!(
        source.exists(),
        "`{build}` did not write {}",
        source.display()
    );
    source
}

/// Whether `output` is newer than every file under the `guests/...`
/// folders `command` names, and than the toolchain pins.
fn fresh(output: &Path, command: &str) -> bool {
    let Ok(built) = std::fs::metadata(output).and_then(|m| m.modified()) else {
        return false;
    };
    let root = workspace_root();
    let mut inputs = vec![root.join("scripts").join("toolchains")];
    for word in command.split_whitespace() {
        if let Some(rest) = word.strip_prefix("guests/") {
            let dir = rest.split('/').next().unwrap_or(rest);
            inputs.push(root.join("guests").join(dir));
        }
    }
    inputs.iter().all(|p| newest(p) <= built)
}

/// The latest modification time of `path` or anything under it (links
/// followed).
fn newest(path: &Path) -> SystemTime {
    let own = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let children = std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| newest(&e.path()));
    children.fold(own, SystemTime::max)
}
