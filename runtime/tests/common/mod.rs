//! What the binary's test files share: running `kelvin` as a user does.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test: this build's, or `KELVIN_TEST_BIN` (another
/// build, to see a test fail on the code before a fix).
pub fn kelvin() -> Command {
    let bin = std::env::var_os("KELVIN_TEST_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_kelvin")),
        PathBuf::from,
    );
    let mut cmd = Command::new(bin);
    cmd.env_remove("RUST_LOG")
        .env_remove("KELVIN_MANIFEST")
        .env_remove("KELVIN_LOG_FORMAT");
    cmd
}

/// Starts `kelvin up` on port 0 and returns the child and its address, read
/// from the JSON log line announcing it.
pub fn up(
    manifest: &Path,
) -> (
    std::process::Child,
    String,
    BufReader<std::process::ChildStderr>,
) {
    let mut child = kelvin()
        .args([
            "up",
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "-f",
        ])
        .arg(manifest)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v["fields"]["message"] == "kelvin is serving" {
            let addr = v["fields"]["address"].as_str().unwrap().to_owned();
            return (child, addr, stderr);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("kelvin up did not announce its address; last line: {line}");
}

/// `kelvin bill ARGS -f MANIFEST`'s report, which must succeed.
pub fn bill(manifest: &Path, args: &[&str]) -> String {
    succeeded(
        kelvin()
            .arg("bill")
            .args(args)
            .arg("-f")
            .arg(manifest)
            .output()
            .unwrap(),
    )
}

/// The standard output of a command that must have succeeded (else the
/// test fails showing both of its outputs).
pub fn succeeded(out: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The master key of the app at `manifest`, as `kelvin keys list` prints it.
pub fn master_key(manifest: &Path) -> String {
    let out = kelvin()
        .args(["keys", "list", "-f"])
        .arg(manifest)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            (cols.first() == Some(&"master")).then(|| cols[2].to_owned())
        })
        .unwrap()
}

/// An app named `name` in a temp dir: `[server]` with `instance_slots` and
/// the `server` lines, then `functions`, where `{guests}` is the folder of
/// the built preview-1 guests.
pub fn app_in_temp_dir(
    name: &str,
    instance_slots: u32,
    server: &str,
    functions: &str,
) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let guests = kelvin_tests::guest_dir().display().to_string();
    let manifest = dir.path().join("functions.toml");
    std::fs::write(
        &manifest,
        format!(
            "version = 1\nname = \"{name}\"\n[server]\ninstance_slots = {instance_slots}\n{server}\n{}",
            functions.replace("{guests}", &guests)
        ),
    )
    .unwrap();
    (dir, manifest)
}

/// A running `kelvin up`: its address, master key and a client. SIGKILLed
/// when dropped.
pub struct Server {
    child: std::process::Child,
    pub base: String,
    pub key: String,
    pub client: reqwest::Client,
}

impl Server {
    pub fn start(manifest: &Path) -> Server {
        let (child, addr, stderr) = up(manifest);
        // Keep draining its logs so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in stderr.lines() {});
        Server {
            child,
            base: format!("http://{addr}"),
            key: master_key(manifest),
            client: reqwest::Client::new(),
        }
    }

    /// SIGKILL, as a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// One request with the master key: the status and the body's bytes.
    pub async fn api(&self, method: reqwest::Method, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        let r = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("x-kelvin-key", &self.key)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.bytes().await.unwrap().to_vec())
    }

    /// One request with the master key and a JSON body (if any): the status
    /// and the body as JSON (`null` if it is not).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let body = body.map_or_else(Vec::new, |b| b.to_string().into_bytes());
        let (status, bytes) = self.api(method, path, body).await;
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(
        &self,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::POST, path, body).await
    }

    pub async fn delete(&self, path: &str) -> (u16, serde_json::Value) {
        self.call(reqwest::Method::DELETE, path, None).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
