//! Helpers: write a manifest around built guests, start a runtime or a server.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kelvin::metering::{InvocationRecord, MemorySink};
use kelvin::{Event, Manifest, Runtime};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// An app in a temporary folder: its manifest and state live there.
pub struct App {
    pub dir: TempDir,
    pub manifest_path: PathBuf,
}

impl App {
    /// `body` is manifest text after the header; `{guests}` stands for the
    /// folder holding the built guests. `[server]` lines go in `server`.
    pub fn new(server: &str, body: &str) -> App {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::in_dir(dir, server, body)
    }

    pub fn in_dir(dir: TempDir, server: &str, body: &str) -> App {
        let guests = kelvin_tests::guest_dir().display().to_string();
        let components = kelvin_tests::component_dir().display().to_string();
        // A small pool keeps many test servers in one process cheap.
        let slots = if server.contains("instance_slots") {
            ""
        } else {
            "instance_slots = 16\n"
        };
        let text = format!(
            "version = 1\nname = \"test\"\n\n[server]\nstate_dir = \"state\"\n{slots}{server}\n\n{}",
            body.replace("{guests}", &guests)
                .replace("{components}", &components)
        );
        let manifest_path = dir.path().join("functions.toml");
        std::fs::write(&manifest_path, text).expect("write manifest");
        App { dir, manifest_path }
    }

    /// One function per guest name, each with an HTTP route `/<name>` plus
    /// `/<name>/{arg}` passing the argument under the guest's parameter name.
    pub fn with_guests(server: &str, extra: &str, names: &[&str]) -> App {
        let mut body = String::new();
        for name in names {
            let param = match *name {
                "spin" => "ms",
                "alloc" => "mib",
                "trap" => "kind",
                _ => "name",
            };
            body.push_str(&format!(
                "[functions.{name}]\nsource = \"{{guests}}/{name}.wasm\"\n{extra}\n\
                 [[functions.{name}.http]]\nroute = \"/{name}\"\nauth = \"anonymous\"\n\
                 [[functions.{name}.http]]\nroute = \"/{name}/{{{param}}}\"\nauth = \"anonymous\"\n\n"
            ));
        }
        App::new(server, &body)
    }

    pub fn manifest(&self) -> Manifest {
        Manifest::load(&self.manifest_path).expect("valid test manifest")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A runtime over this app, recording into memory.
    pub fn runtime(&self) -> (Runtime, Arc<MemorySink>) {
        let sink = Arc::new(MemorySink::default());
        let runtime = Runtime::new(self.manifest(), sink.clone()).expect("runtime starts");
        (runtime, sink)
    }
}

/// Invokes `function` directly (trigger `invoke`) with `input`.
pub async fn invoke(runtime: &Runtime, function: &str, input: &str) -> kelvin::Invocation {
    runtime
        .invoke(
            function,
            Event {
                trigger: "invoke",
                input: input.to_owned().into(),
                ..Event::default()
            },
        )
        .await
        .expect("function exists")
}

/// A server running on 127.0.0.1:0 until dropped or shut down.
pub struct TestServer {
    pub addr: SocketAddr,

    pub sink: Arc<MemorySink>,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start(app: &App) -> TestServer {
        Self::start_with_slots(app, &[]).await.0
    }

    /// As [`TestServer::start`], with one more address per slot in
    /// `slots`, serving that slot (returned in the same order).
    pub async fn start_with_slots(app: &App, slots: &[&str]) -> (TestServer, Vec<SocketAddr>) {
        let (runtime, sink) = app.runtime();
        let server = kelvin::trigger::http::HttpServer::new(Arc::new(runtime)).expect("keys open");
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let listener = bind().await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let mut slot_listeners = Vec::new();
        let mut slot_addrs = Vec::new();
        for slot in slots {
            let l = bind().await.expect("bind");
            slot_addrs.push(l.local_addr().expect("local addr"));
            slot_listeners.push((l, slot.to_string()));
        }
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.serve_slots(listener, slot_listeners, async move {
            let _ = rx.await;
        }));
        let server = TestServer {
            addr,
            sink,
            client: reqwest::Client::new(),
            shutdown: Some(tx),
            task: Some(task),
        };
        (server, slot_addrs)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request")
    }

    /// The status of a GET of `path` presenting `key` in `x-kelvin-key`.
    pub async fn status_with_key(&self, path: &str, key: &str) -> u16 {
        let r = self
            .client
            .get(self.url(path))
            .header("x-kelvin-key", key)
            .send()
            .await;
        r.expect("request").status().as_u16()
    }

    /// The record of the invocation with this id. A streamed response's
    /// record is written when its body is done, so this waits (a little).
    pub async fn record(&self, id: &str) -> InvocationRecord {
        for _ in 0..500 {
            if let Some(r) = self
                .sink
                .records()
                .into_iter()
                .find(|r| r.invocation_id == id)
            {
                return r;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("no record for invocation {id}")
    }

    /// Stops the server and waits for it to drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server ran");
        }
    }
}

/// The id header of a response.
pub fn invocation_id(r: &reqwest::Response) -> String {
    r.headers()
        .get("x-kelvin-invocation-id")
        .expect("every response has an invocation id")
        .to_str()
        .expect("ascii")
        .to_owned()
}

/// Replaces `path` with `bytes` by renaming a new file over it, as Kelvin's
/// cache does: a file truncated in place under a live mapping (a runtime
/// being dropped may still map an artifact) would fault on access (SIGBUS).
pub fn write(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("test-tmp");
    std::fs::write(&tmp, bytes).expect("write file");
    std::fs::rename(&tmp, path).expect("rename file");
}

/// Held by tests that burn CPU for long or assert on CPU time. On a 2-core
/// machine two such tests at once starve each other's guests, and a guest
/// that spins for 50 ms of wall time then honestly bills less CPU.
pub async fn cpu_heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}
