//! The `kelvin` binary as a user runs it: real processes, real guests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

mod common;
use common::{kelvin, master_key, succeeded, up};

/// A manifest in a temp dir wiring `hello` (and `trap`) to HTTP routes.
fn app() -> (tempfile::TempDir, PathBuf) {
    app_with(
        "",
        "[functions.hello]\nsource = \"{guests}/hello.wasm\"\n\
         [[functions.hello.http]]\nroute = \"/hello/{name}\"\nauth = \"anonymous\"\n\
         [functions.trap]\nsource = \"{guests}/trap.wasm\"\n",
    )
}

/// A manifest in a temp dir: `server` lines, then `functions`, where
/// `{guests}` is the folder of the built preview-1 guests.
fn app_with(server: &str, functions: &str) -> (tempfile::TempDir, PathBuf) {
    common::app_in_temp_dir("cli", 8, server, functions)
}

/// Runs `kelvin ARGS -f MANIFEST`, which must fail with status 1, and
/// returns its stderr.
fn fails(args: &[&str], manifest: &Path) -> String {
    let out = kelvin()
        .args(args)
        .arg("-f")
        .arg(manifest)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
    stderr
}

/// A manifest in `dir` whose one function, `b`, is `wasm` (unusable).
fn broken_app(dir: &Path, wasm: &[u8]) -> PathBuf {
    std::fs::write(dir.join("broken.wasm"), wasm).unwrap();
    let manifest = dir.join("broken.toml");
    std::fs::write(
        &manifest,
        "version = 1\nname = \"x\"\n[functions.b]\nsource = \"broken.wasm\"\n",
    )
    .unwrap();
    manifest
}

/// The pretty-printed JSON records in `kelvin invoke`'s stderr.
fn records(stderr: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in stderr.lines() {
        if line == "{" {
            current = Some(String::new());
        }
        if let Some(buf) = current.as_mut() {
            buf.push_str(line);
            buf.push('\n');
            if line == "}" {
                out.push(serde_json::from_str(buf).expect("a JSON record"));
                current = None;
            }
        }
    }
    out
}

#[test]
fn invoke_prints_output_and_records_cold_then_warm() {
    let (_dir, manifest) = app();
    let out = kelvin()
        .args(["invoke", "hello", "--repeat", "2", "-f"])
        .arg(&manifest)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.matches("Hello, world!").count(), 2, "{stdout}");
    let recs = records(&stderr);
    assert_eq!(recs.len(), 2, "{stderr}");
    assert_eq!(recs[0]["cold"], true);
    assert_eq!(recs[0]["load"]["source"], "compile");
    assert_eq!(recs[1]["cold"], false);
    assert_eq!(recs[0]["outcome"], "ok");
    // The guest's log line is attributed to its invocation.
    let id = recs[0]["invocation_id"].as_str().unwrap();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("greeting world") && l.contains(id)),
        "{stderr}"
    );

    // A second process finds the compiled artifact in the cache.
    let out = kelvin()
        .args(["invoke", "hello", "-f"])
        .arg(&manifest)
        .output()
        .unwrap();
    let recs = records(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(recs[0]["load"]["source"], "cache");
}

#[test]
fn invoke_reads_input_and_fails_loudly() {
    let (dir, manifest) = app();
    let input = dir.path().join("event.txt");
    std::fs::write(&input, "div").unwrap();
    let out = kelvin()
        .args(["invoke", "trap", "--input"])
        .arg(&input)
        .arg("-f")
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let recs = records(&stderr);
    assert_eq!(recs[0]["outcome"], "trap");
    assert!(
        recs[0]["reason"]
            .as_str()
            .unwrap()
            .contains("divide by zero"),
        "{stderr}"
    );
    assert!(stderr.contains("Error: the invocation failed"), "{stderr}");

    let out = kelvin()
        .args(["invoke", "nope", "-f"])
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no function named `nope`"));
}

#[test]
fn check_accepts_a_good_app_and_explains_a_bad_one() {
    let (dir, manifest) = app();
    let stdout = succeeded(
        kelvin()
            .args(["check", "-f"])
            .arg(&manifest)
            .output()
            .unwrap(),
    );
    assert!(stdout.contains("ok: app `cli`, 2 function(s) valid"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "version = 1\nname = \"x\"\n[functions.a]\nsource = \"a.wasm\"\nmemory = 5\n",
    )
    .unwrap();
    let stderr = fails(&["check"], &bad);
    assert!(stderr.starts_with("Error: "), "{stderr}");
    assert!(
        stderr.contains("bad.toml:5:10: `functions.a.memory`"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let stderr = fails(&["check"], Path::new("/nonexistent/functions.toml"));
    assert!(
        stderr.contains("failed to read manifest `/nonexistent/functions.toml`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("No such file"),
        "the cause is printed: {stderr}"
    );

    // Invalid wasm fails the check (and would fail start-up).
    let broken = broken_app(dir.path(), b"\0asm\x01\0\0\0garbage");
    assert!(fails(&["check"], &broken).contains("function `b`"));
}

#[test]
fn up_serves_and_shuts_down_gracefully_on_sigterm() {
    let (dir, manifest) = app();
    let (mut child, addr, mut stderr) = up(&manifest);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let body = rt.block_on(async {
        let r = reqwest::get(format!("http://{addr}/hello/cli"))
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("x-kelvin-invocation-id"));
        r.text().await.unwrap()
    });
    assert_eq!(body, "Hello, cli!\n");

    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "kelvin up exits 0 after SIGTERM: {status}"
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert!(rest.contains("stopped"), "{rest}");

    // The invocation was flushed to the JSON-lines log before exit.
    let log =
        std::fs::read_to_string(dir.path().join(".kelvin").join("invocations.jsonl")).unwrap();
    let rec: serde_json::Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
    assert_eq!(rec["function"], "hello");
    assert_eq!(rec["trigger"], "http");
}

#[test]
fn up_refuses_to_start_with_a_broken_function() {
    let (dir, _) = app();
    let manifest = broken_app(dir.path(), b"not wasm");
    let stderr = fails(&["up", "--listen", "127.0.0.1:0"], &manifest);
    assert!(
        stderr.contains("function `b`") && stderr.contains("not a wasm binary"),
        "{stderr}"
    );
    assert!(!stderr.contains("kelvin is serving"));
}

#[test]
fn acknowledged_invocations_survive_sigkill() {
    let (dir, manifest) = app();
    let (mut child, addr, stderr) = up(&manifest);
    // Keep the log pipe drained, or a chatty server would block on it.
    std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (acked, url) = (acked.clone(), format!("http://{addr}/hello/c{c}"));
            rt.spawn(async move {
                let client = reqwest::Client::new();
                // Until the server dies under us.
                while let Ok(r) = client.get(&url).send().await {
                    let id = r.headers()["x-kelvin-invocation-id"]
                        .to_str()
                        .unwrap()
                        .to_owned();
                    // Acknowledged: the client has the whole response.
                    if r.status() == 200 && r.bytes().await.is_ok() {
                        acked.lock().unwrap().push(id);
                    }
                }
            })
        })
        .collect();
    // A moment that differs from run to run, after some traffic.
    let jitter = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        % 400;
    std::thread::sleep(Duration::from_millis(300 + u64::from(jitter)));
    // SAFETY: plain kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGKILL) }, 0);
    child.wait().unwrap();
    for c in clients {
        rt.block_on(c).unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() >= 10,
        "too little traffic before the kill: {}",
        acked.len()
    );

    // It starts again on the same ledger and serves.
    let (mut again, addr, _stderr) = up(&manifest);
    let status = rt.block_on(async {
        reqwest::get(format!("http://{addr}/hello/after"))
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status, 200);

    // Read beside the running server: WAL lets a reader in.
    let ledger =
        kelvin::ledger::LedgerReader::open(&dir.path().join(".kelvin").join("ledger.sqlite3"))
            .unwrap();
    let lost: Vec<&String> = acked
        .iter()
        .filter(|id| ledger.count(id).unwrap() != 1)
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged invocations are not in the ledger exactly once: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(5)]
    );
    let first = ledger.get(&acked[0]).unwrap().unwrap();
    assert_eq!(first.function, "hello");
    assert_eq!(
        first.version.len(),
        64,
        "the deployment version is the wasm's hash"
    );

    // SAFETY: as above.
    unsafe { libc::kill(again.id() as i32, libc::SIGTERM) };
    assert!(again.wait().unwrap().success());
}

#[test]
fn bill_reports_explains_and_refuses_bad_input() {
    let (dir, manifest) = app();
    let (mut child, addr, _stderr) = up(&manifest);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ids: Vec<String> = rt.block_on(async {
        let mut ids = Vec::new();
        for i in 0..3 {
            let r = reqwest::get(format!("http://{addr}/hello/b{i}"))
                .await
                .unwrap();
            ids.push(
                r.headers()["x-kelvin-invocation-id"]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            );
        }
        ids
    });

    let bill = |args: &[&str]| {
        kelvin()
            .arg("bill")
            .args(args)
            .arg("-f")
            .arg(&manifest)
            .output()
            .unwrap()
    };
    let report: serde_json::Value =
        serde_json::from_str(&succeeded(bill(&["--format", "json"]))).unwrap();

    // The same report over HTTP, for the master key only; read while the
    // server is still serving (and writing).
    let keys = kelvin::keys::KeyStore::open(&dir.path().join(".kelvin"), &[]).unwrap();
    let master = keys.find(&kelvin::keys::Scope::Master).unwrap().value;
    let (served, unauthorised, bad) = rt.block_on(async {
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/admin/bill");
        let served = client
            .get(&url)
            .header("x-kelvin-key", &master)
            .send()
            .await
            .unwrap();
        assert_eq!(served.status(), 200);
        let served: serde_json::Value =
            serde_json::from_str(&served.text().await.unwrap()).unwrap();
        let unauthorised = client.get(&url).send().await.unwrap().status();
        let bad = client
            .get(format!("{url}?since=soon&code={master}"))
            .send()
            .await
            .unwrap();
        (
            served,
            unauthorised,
            (bad.status(), bad.text().await.unwrap()),
        )
    });
    assert_eq!(
        served, report,
        "GET /admin/bill serves what kelvin bill prints"
    );
    assert_eq!(unauthorised, 401);
    assert_eq!(bad.0, 400);
    assert!(bad.1.contains("invalid date `soon`"), "{}", bad.1);

    // A backup taken while the server writes holds everything it has
    // acknowledged (a plain copy of the file may miss its WAL).
    let backup = dir.path().join("backup.sqlite3");
    let out = succeeded(
        kelvin()
            .args(["ledger", "backup"])
            .arg(&backup)
            .arg("-f")
            .arg(&manifest)
            .output()
            .unwrap(),
    );
    assert!(out.contains("backed up"), "{out}");
    let from_backup: serde_json::Value = serde_json::from_str(&succeeded(bill(&[
        "--format",
        "json",
        "--ledger",
        backup.to_str().unwrap(),
    ])))
    .unwrap();
    assert_eq!(from_backup["total"]["invocations"], 3);
    let again = kelvin()
        .args(["ledger", "backup"])
        .arg(&backup)
        .arg("-f")
        .arg(&manifest)
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));

    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    assert_eq!(report["policy"], "azure-consumption");
    assert_eq!(report["total"]["invocations"], 3);
    assert_eq!(report["lines"][0]["key"], "hello");
    // Each hello bills the 128 MB x 100 ms minimum: 0.0125 GB-s, 0.0000004 USD.
    assert_eq!(report["total"]["gb_s"], "0.0375");
    assert_eq!(report["total"]["cost"], "0.0000012");

    let out = bill(&[
        "--format",
        "csv",
        "--by",
        "outcome",
        "--policy",
        "aws-lambda",
    ]);
    let csv = String::from_utf8_lossy(&out.stdout);
    assert!(csv.starts_with("outcome,invocations,"), "{csv}");
    assert!(csv.lines().any(|l| l.starts_with("ok,3,3,")), "{csv}");

    let out = bill(&["explain", &ids[1]]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains(&ids[1])
            && text.contains("billed 128 MB")
            && text.contains("price: 0.0000004 USD"),
        "{text}"
    );

    for (args, message) in [
        (
            &["--since", "2026-12-01", "--until", "2026-11-01"][..],
            "--since must be before --until",
        ),
        (&["--since", "yesterday"][..], "invalid date `yesterday`"),
        (&["--policy", "gcp"][..], "unknown billing policy `gcp`"),
        (
            &["--ledger", "/nonexistent/ledger.sqlite3"][..],
            "no ledger at `/nonexistent/ledger.sqlite3`",
        ),
        (&["explain", "nope"][..], "no invocation `nope`"),
    ] {
        let out = bill(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("backtrace"), "{stderr}");
    }
    // A dry run says what would go and changes nothing; the last day is
    // compacted only when asked for twice (no terminal to ask on: no).
    let compact = |extra: &[&str]| {
        kelvin()
            .args(["ledger", "compact", "--older-than", "0s", "-f"])
            .arg(&manifest)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let stdout = succeeded(compact(&["--dry-run"]));
    assert!(
        stdout.starts_with("would compact 3 invocations"),
        "{stdout}"
    );
    let refused = compact(&[]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("pass --yes"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(
        bill(&["explain", &ids[0]]).status.success(),
        "nothing compacted yet"
    );
    // Compaction keeps the totals; single invocations can no longer be explained.
    let stdout = succeeded(compact(&["--yes"]));
    assert!(stdout.starts_with("compacted 3 invocations into 1 daily aggregates"));
    let compacted: serde_json::Value =
        serde_json::from_slice(&bill(&["--format", "json"]).stdout).unwrap();
    assert_eq!(compacted["total"], report["total"]);
    let out = bill(&["explain", &ids[0]]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("rolled up into daily aggregates"));
    drop(dir);
}

#[test]
fn bench_cold_start_measures_four_temperatures_per_phase() {
    let (dir, manifest) = app();
    let json = dir.path().join("cold.json");
    let svg = dir.path().join("cold.svg");
    let out = kelvin()
        .args(["bench", "cold-start", "-n", "3", "--json"])
        .arg(&json)
        .arg("--svg")
        .arg(&svg)
        .arg("-f")
        .arg(&manifest)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for text in [
        "cold from scratch",
        "cold from cache, restart",
        "cold from cache, evicted",
        "warm",
        "p99",
        "instantiate",
    ] {
        assert!(stdout.contains(text), "{text} missing from\n{stdout}");
    }
    // `trap` cannot succeed: skipped, with its reason, not a failure.
    assert!(stdout.contains("skipped `trap`"), "{stdout}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let functions = report["functions"].as_array().unwrap();
    assert_eq!(functions.len(), 1, "{report}");
    assert_eq!(functions[0]["function"], "hello");
    let temps = functions[0]["temperatures"].as_array().unwrap();
    let names: Vec<&str> = temps
        .iter()
        .map(|t| t["temperature"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["scratch", "restart", "cache", "warm"]);
    let phase = |t: &serde_json::Value, name: &str| {
        t["phases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["phase"] == name)
            .cloned()
    };
    for t in temps {
        assert_eq!(t["total_us"].as_array().unwrap().len(), 3);
        assert_eq!(phase(t, "total").unwrap()["n"], 3);
        assert_eq!(
            phase(t, "load").is_some(),
            t["temperature"] != "warm",
            "{t}"
        );
    }
    // Compiling costs far more than mapping the cached artifact.
    let load_p50 = |i: usize| phase(&temps[i], "load").unwrap()["p50"].as_u64().unwrap();
    assert!(load_p50(0) > 5 * load_p50(1), "{report}");
    assert!(load_p50(0) > 5 * load_p50(2), "{report}");

    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 4);
    // The app's own state (cache, keys, ledger) is left alone.
    assert!(!dir.path().join(".kelvin").exists());

    let stderr = fails(&["bench", "cold-start", "nope"], &manifest);
    assert!(
        stderr.contains("no function `nope`") && stderr.contains("hello, trap"),
        "{stderr}"
    );
}

#[test]
fn bench_http_measures_first_requests_and_steady_load() {
    let (dir, manifest) = app();
    let json = dir.path().join("http.json");
    let out = kelvin()
        .args([
            "bench",
            "http",
            "--route",
            "/hello/bench",
            "-c",
            "2",
            "-d",
            "500ms",
            "--warmup",
            "100ms",
            "--cold-samples",
            "2",
            "--json",
        ])
        .arg(&json)
        .arg("-f")
        .arg(&manifest)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("first request after eviction"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["function"], "hello");
    for cold in ["startup", "first_after_start", "first_after_eviction"] {
        assert_eq!(report[cold]["n"], 2, "{report}");
    }
    let steady = &report["steady"];
    let requests = steady["requests"].as_u64().unwrap();
    assert!(requests > 0, "{report}");
    assert_eq!(steady["status"]["200"].as_u64(), Some(requests), "{report}");
    assert_eq!(steady["latency"]["n"].as_u64(), Some(requests));
    assert!(!dir.path().join(".kelvin").exists());

    // The same load generator against a server that is already running.
    let (mut child, addr, _stderr) = up(&manifest);
    let out = kelvin()
        .args(["bench", "http", "-d", "300ms", "--warmup", "0s", "--url"])
        .arg(format!("http://{addr}/hello/url"))
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("200: "), "{stdout}");

    let stderr = fails(&["bench", "http", "--route", "/nowhere"], &manifest);
    assert!(
        stderr.contains("no function answers GET /nowhere"),
        "{stderr}"
    );
}

/// A server's JSON log lines, read on a thread, to wait for one.
struct Logs(std::sync::mpsc::Receiver<serde_json::Value>);

impl Logs {
    fn watch(stderr: BufReader<std::process::ChildStderr>) -> Logs {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        Logs(rx)
    }

    /// The first line from now on with `message` whose fields include
    /// `fields`, within `within`.
    fn wait(&self, message: &str, fields: &[(&str, &str)], within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.0.recv_timeout(left) {
                Ok(v)
                    if v["fields"]["message"] == message
                        && fields.iter().all(|(k, want)| v["fields"][k] == *want) =>
                {
                    return v;
                }
                Ok(_) => {}
                Err(_) => panic!("no log line `{message}` {fields:?} within {within:?}"),
            }
        }
    }
}

/// The record of invocation `id` in an app's JSON-lines log (written in
/// batches, so this waits a little).
fn logged_record(state: &Path, id: &str) -> serde_json::Value {
    for _ in 0..100 {
        if let Ok(text) = std::fs::read_to_string(state.join("invocations.jsonl"))
            && let Some(r) = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|r| r["invocation_id"] == id)
        {
            return r;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no record of {id}");
}

/// GETs `url` and returns the invocation id of a 200.
fn get_ok(rt: &tokio::runtime::Runtime, url: String) -> String {
    rt.block_on(async {
        let r = reqwest::get(&url).await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let id = r.headers()["x-kelvin-invocation-id"]
            .to_str()
            .unwrap()
            .to_owned();
        r.bytes().await.unwrap();
        id
    })
}

#[test]
fn up_compiles_in_the_background_and_answers_with_baseline_code_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("functions.toml");
    std::fs::write(
        &manifest,
        format!(
            "version = 1\nname = \"large\"\n[server]\ninstance_slots = 8\n\
             [functions.predict]\nsource = \"{}\"\n\
             files = [{{ source = \"{}\", destination = \"/model\" }}]\n\
             [[functions.predict.http]]\nroute = \"/predict\"\nauth = \"anonymous\"\n\
             [functions.hello-js]\nsource = \"{}\"\n\
             [[functions.hello-js.http]]\nroute = \"/js/hello\"\nauth = \"anonymous\"\n",
            kelvin_tests::example_guest("predict").display(),
            kelvin_tests::predict_model_dir().display(),
            kelvin_tests::example_guest("hello-js").display(),
        ),
    )
    .unwrap();
    let state = dir.path().join(".kelvin");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let minutes = Duration::from_secs(300);

    let (mut child, addr, stderr) = up(&manifest);
    let logs = Logs::watch(stderr);
    // Asked before Cranelift is done with it: answered by Winch's code,
    // compiled several times faster, instead of waiting.
    let id = get_ok(&rt, format!("http://{addr}/js/hello?name=early"));
    let early = logged_record(&state, &id);
    assert_eq!(early["load"]["source"], "baseline", "{early}");
    // Cranelift's code replaces it when ready, and every function without
    // an artifact is compiled, in the background.
    logs.wait(
        "function moved to optimised code",
        &[("function", "hello-js")],
        minutes,
    );
    logs.wait("background precompile done", &[], minutes);
    let id = get_ok(&rt, format!("http://{addr}/js/hello?name=later"));
    let later = logged_record(&state, &id);
    assert_eq!(later["cold"], false, "{later}");
    // The first request for the large Python component finds the artifact
    // compiled in the background: a cold start from the cache.
    let id = get_ok(&rt, format!("http://{addr}/predict"));
    let first = logged_record(&state, &id);
    assert_eq!(first["load"]["source"], "cache", "{first}");
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());

    // A large artifact is checked whole just after its first load, off the
    // request path: one damaged in the middle is found, unloaded and
    // deleted (and rebuilt at the next start's background precompile).
    let predict = std::fs::read(kelvin_tests::example_guest("predict")).unwrap();
    let cache = std::fs::read_dir(state.join("cache"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let artifact = cache.join(format!(
        "{}.cwasm",
        kelvin::cache::WasmHash::of(&predict).hex()
    ));
    let mut bytes = std::fs::read(&artifact).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&artifact, &bytes).unwrap();
    let (mut child, addr, stderr) = up(&manifest);
    let logs = Logs::watch(stderr);
    let id = rt.block_on(async {
        let r = reqwest::get(format!("http://{addr}/predict"))
            .await
            .unwrap();
        r.headers()["x-kelvin-invocation-id"]
            .to_str()
            .unwrap()
            .to_owned()
    });
    let damaged = logged_record(&state, &id);
    assert_eq!(damaged["load"]["source"], "cache", "{damaged}");
    logs.wait(
        "function evicted",
        &[("function", "predict"), ("reason", "corrupt")],
        minutes,
    );
    assert!(!artifact.exists(), "the damaged artifact is deleted");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn logs_to_a_pipe_carry_no_colour() {
    let (_dir, manifest) = app();
    let out = kelvin()
        .args(["invoke", "hello", "-f"])
        .arg(&manifest)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("greeting world"), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI escapes in a pipe: {stderr:?}"
    );
}

/// Holds the write lock of the ledger at `path` for `secs` seconds, as
/// another process (a backup, a second writer) might.
fn hold_ledger(path: PathBuf, secs: u64) -> std::thread::JoinHandle<()> {
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_secs(secs));
        conn.execute_batch("COMMIT").unwrap();
    });
    locked.recv().unwrap();
    holder
}

#[test]
fn a_locked_ledger_delays_or_refuses_answers_but_never_loses_them() {
    let (dir, manifest) = app();
    let (mut child, addr, stderr) = up(&manifest);
    std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
    let ledger = dir.path().join(".kelvin").join("ledger.sqlite3");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let get = |path: &str| {
        rt.block_on(async {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap();
            let r = client
                .get(format!("http://{addr}{path}"))
                .send()
                .await
                .unwrap();
            let id = r.headers()["x-kelvin-invocation-id"]
                .to_str()
                .unwrap()
                .to_owned();
            (r.status().as_u16(), id)
        })
    };
    assert_eq!(get("/hello/warm").0, 200);

    // Locked for 7 s, past the writer's 5 s busy timeout: the answer waits
    // for the retried commit. Before, the client got a 200 at 5 s for an
    // invocation the ledger never stored.
    let holder = hold_ledger(ledger.clone(), 7);
    let started = Instant::now();
    let (status, id) = get("/hello/locked");
    holder.join().unwrap();
    assert_eq!(status, 200);
    assert!(
        started.elapsed() >= Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    let reader = kelvin::ledger::LedgerReader::open(&ledger).unwrap();
    assert_eq!(
        reader.count(&id).unwrap(),
        1,
        "an acknowledged invocation is stored"
    );

    // Locked past every retry: no answer the ledger does not know, a 503.
    let holder = hold_ledger(ledger.clone(), 18);
    let (status, id) = get("/hello/refused");
    holder.join().unwrap();
    assert_eq!(status, 503);
    assert_eq!(reader.count(&id).unwrap(), 0);
    // And it serves (and records) again once the lock is gone.
    let (status, id) = get("/hello/after");
    assert_eq!(status, 200);
    assert_eq!(reader.count(&id).unwrap(), 1);
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

/// The queue and blob API, when its store cannot write (the ledger's
/// database locked past every retry, as a full disk would): a 503 with
/// Retry-After and nothing changed, not a 500; the retry then succeeds.
#[test]
fn the_queue_and_blob_api_answers_503_with_retry_after_when_its_store_cannot_write() {
    let (dir, manifest) = app_with(
        "",
        "[functions.worker]\nsource = \"{guests}/events.wasm\"\n\
         [[functions.worker.queue_trigger]]\nname = \"jobs\"\n\
         [[functions.worker.output]]\nname = \"out\"\nblob = \"results/{invocation_id}.json\"\n",
    );
    let (mut child, addr, stderr) = up(&manifest);
    std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
    let key = master_key(&manifest);
    let ledger = dir.path().join(".kelvin").join("ledger.sqlite3");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let send = |body: &str| {
        rt.block_on(async {
            let r = reqwest::Client::new()
                .post(format!("http://{addr}/admin/queues/jobs/messages"))
                .header("x-kelvin-key", &key)
                .body(body.to_owned())
                .timeout(Duration::from_secs(60))
                .send()
                .await
                .unwrap();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            (r.status().as_u16(), retry, r.text().await.unwrap())
        })
    };
    let holder = hold_ledger(ledger.clone(), 18);
    let (status, retry, body) = send(r#"{"n": 1}"#);
    holder.join().unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(body.contains("nothing changed"), "{body}");
    // Tried again: taken, once.
    let (status, _, body) = send(r#"{"n": 1}"#);
    assert_eq!(status, 201, "{body}");
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn shutdown_past_the_drain_timeout_answers_nothing_unrecorded() {
    let (dir, manifest) = app_with(
        "drain_timeout = \"200ms\"",
        "[functions.spin]\nsource = \"{guests}/spin.wasm\"\n\
         [[functions.spin.http]]\nroute = \"/spin/{ms}\"\nauth = \"anonymous\"\n",
    );
    let (mut child, addr, stderr) = up(&manifest);
    std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Compile first, so the request below is in the guest when the
        // server stops.
        let r = reqwest::get(format!("http://{addr}/spin/1")).await.unwrap();
        assert_eq!(r.status(), 200);
    });
    let client = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = reqwest::get(format!("http://{addr}/spin/1500")).await?;
            let id = r.headers()["x-kelvin-invocation-id"]
                .to_str()
                .unwrap()
                .to_owned();
            Ok::<_, reqwest::Error>((r.status().as_u16(), id))
        })
    });
    std::thread::sleep(Duration::from_millis(400));
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let ledger =
        kelvin::ledger::LedgerReader::open(&dir.path().join(".kelvin").join("ledger.sqlite3"))
            .unwrap();
    match client.join().unwrap() {
        // Cut off at the drain timeout: no answer at all...
        Err(_) => {}
        // ...or one whose record is there.
        Ok((_, id)) => assert_eq!(ledger.count(&id).unwrap(), 1),
    }
    // The invocation under way ran to its record before the ledger closed:
    // before, the ledger closed under it and its record was lost.
    let records = ledger.records(0, i64::MAX).unwrap();
    let spun: Vec<_> = records.iter().filter(|r| r.run_us > 1_000_000).collect();
    assert_eq!(spun.len(), 1, "{records:?}");
    assert_eq!(spun[0].outcome.as_str(), "abandoned", "{:?}", spun[0]);
}

/// `hello` at `/hello/{name}`, greeting with `greeting` (its app setting).
fn hello_greeting(greeting: &str) -> String {
    format!(
        "[functions.hello]\nsource = \"{{guests}}/hello.wasm\"\nenv = {{ GREETING = \"{greeting}\" }}\n\
         [[functions.hello.http]]\nroute = \"/hello/{{name}}\"\nauth = \"anonymous\"\n"
    )
}

#[test]
fn up_applies_an_edited_manifest_and_refuses_a_broken_one() {
    let manifest_for = hello_greeting;
    let (dir, manifest) = app_with("", &manifest_for("Hello"));
    let (mut child, addr, stderr) = up(&manifest);
    let logs = Logs::watch(stderr);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let get = |rt: &tokio::runtime::Runtime| {
        rt.block_on(async {
            let r = reqwest::get(format!("http://{addr}/hello/cli"))
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let version = r.headers()["x-kelvin-version"].to_str().unwrap().to_owned();
            (version, r.text().await.unwrap())
        })
    };
    let (v1, body) = get(&rt);
    assert_eq!(body, "Hello, cli!\n");
    // Written whole and renamed into place, as editors do: the watcher
    // never reads half a file.
    let put = |text: &str| {
        let tmp = manifest.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &manifest).unwrap();
    };
    let rewrite = |greeting: &str| {
        let (other_dir, other) = app_with("", &manifest_for(greeting));
        put(&std::fs::read_to_string(&other).unwrap());
        drop(other_dir);
    };

    // Edited: applied to production without a restart.
    rewrite("Hi");
    logs.wait(
        "manifest applied to production",
        &[("who", "file change")],
        Duration::from_secs(20),
    );
    let (v2, body) = get(&rt);
    assert_eq!(body, "Hi, cli!\n");
    assert_ne!(v2, v1);

    // Broken: reported, and nothing changes.
    put("version = 1\nname = \"cli\"\n[functions.hello]\nsource = 7\n");
    let refused = logs.wait(
        "manifest reload refused; nothing changed",
        &[],
        Duration::from_secs(20),
    );
    assert!(
        refused["fields"]["error"]
            .as_str()
            .unwrap()
            .contains("functions.hello.source"),
        "{refused}"
    );
    assert_eq!(get(&rt).1, "Hi, cli!\n");

    // SIGHUP applies it too (the file written without changing its size
    // and time would not be noticed otherwise).
    rewrite("Hey");
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    logs.wait(
        "manifest applied to production",
        &[],
        Duration::from_secs(20),
    );
    assert_eq!(get(&rt).1, "Hey, cli!\n");

    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    drop(dir);
}

/// The master key of an app whose state is in `dir/.kelvin`.

#[test]
fn sigkill_during_uploads_and_swaps_leaves_one_state_or_the_other() {
    let (dir, manifest) = app_with(
        "",
        "[functions.hello]\nsource = \"{guests}/hello.wasm\"\n\
         [[functions.hello.http]]\nroute = \"/hello/{name}\"\nauth = \"anonymous\"\n",
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = reqwest::Client::new();
    let echo = std::fs::read(kelvin_tests::guest("echo")).unwrap();
    let key = master_key(&manifest);
    let admin = |addr: &str, method: reqwest::Method, path: &str, body: Vec<u8>| {
        let req = client
            .request(method, format!("http://{addr}{path}"))
            .header("x-kelvin-key", &key)
            .body(body);
        async move {
            let r = req.send().await.ok()?;
            let status = r.status().as_u16();
            let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.ok()?).ok()?;
            Some((status, body))
        }
    };
    let slots = |addr: &str| {
        rt.block_on(admin(addr, reqwest::Method::GET, "/admin/slots", vec![]))
            .unwrap()
            .1
    };

    // Production serves hello, staging echo.
    let (mut child, mut addr, stderr) = up(&manifest);
    std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
    let (_, wasm) = rt
        .block_on(admin(
            &addr,
            reqwest::Method::PUT,
            "/admin/wasm",
            echo.clone(),
        ))
        .unwrap();
    let body = serde_json::json!({ "wasm": wasm["wasm"], "slot": "staging" }).to_string();
    let (status, _) = rt
        .block_on(admin(
            &addr,
            reqwest::Method::POST,
            "/admin/functions/hello/versions",
            body.into_bytes(),
        ))
        .unwrap();
    assert_eq!(status, 201);
    let initial = slots(&addr);
    let (a, b) = (
        initial["slots"]["production"]["hello"].clone(),
        initial["slots"]["staging"]["hello"].clone(),
    );
    assert_ne!(a, b);

    for round in 0..8u64 {
        // A swap (and an upload) under way when the process is killed, at
        // a moment that differs from round to round.
        let swap = admin(
            &addr,
            reqwest::Method::POST,
            "/admin/swap",
            br#"{"source": "staging"}"#.to_vec(),
        );
        let mut big = echo.clone();
        big.extend(std::iter::repeat_n(0u8, 4 << 20));
        let upload = admin(&addr, reqwest::Method::PUT, "/admin/wasm", big);
        rt.block_on(async {
            let pid = child.id() as i32;
            let kill = async move {
                tokio::time::sleep(Duration::from_micros(300 + round * 700)).await;
                // SAFETY: plain kill(2) on our own child's pid.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            };
            tokio::join!(swap, upload, kill);
        });
        child.wait().unwrap();

        let (again, new_addr, stderr) = up(&manifest);
        std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
        child = again;
        let now = slots(&new_addr);
        let pair = (
            now["slots"]["production"]["hello"].clone(),
            now["slots"]["staging"]["hello"].clone(),
        );
        assert!(
            pair == (a.clone(), b.clone()) || pair == (b.clone(), a.clone()),
            "round {round}: a mix of two states: {now}"
        );
        // What production serves is what the store says.
        let served = rt.block_on(async {
            let r = reqwest::get(format!("http://{new_addr}/hello/kill"))
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.headers()["x-kelvin-version"].to_str().unwrap().to_owned()
        });
        assert_eq!(served, pair.0.as_str().unwrap());
        // No half-written wasm under its final name.
        for entry in std::fs::read_dir(dir.path().join(".kelvin/wasm")).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
            if path.extension().is_some_and(|e| e == "wasm") {
                let bytes = std::fs::read(&path).unwrap();
                assert_eq!(kelvin::cache::WasmHash::of(&bytes).hex(), name);
            }
        }
        // The next round works against the restarted server.
        addr = new_addr;
    }
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn the_deploy_commands_drive_a_running_server() {
    let hello = hello_greeting;
    let (dir, manifest) = app_with("", &hello("Hello"));
    // The next release: another manifest beside it (same state dir).
    let (next_dir, next_source) = app_with("", &hello("Next"));
    let next = dir.path().join("next.toml");
    std::fs::copy(&next_source, &next).unwrap();
    drop(next_dir);
    let (mut child, addr, stderr) = up(&manifest);
    std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
    let url = format!("http://{addr}");
    let cli = |args: &[&str]| {
        let out = kelvin()
            .args(args)
            .args(["-f"])
            .arg(&next)
            .args(["--url", &url])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stdout, stderr)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let get = || {
        rt.block_on(async {
            let r = reqwest::get(format!("{url}/hello/cli")).await.unwrap();
            r.text().await.unwrap()
        })
    };
    assert_eq!(get(), "Hello, cli!\n");

    let (code, out, err) = cli(&["deploy", "--slot", "staging"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("deployed to staging"), "{out}");
    let (_, out, _) = cli(&["deploy", "hello", "--slot", "staging"]);
    assert!(out.contains("already in staging"), "{out}");
    let (_, out, _) = cli(&["slots"]);
    assert!(
        out.contains("staging") && out.contains("production"),
        "{out}"
    );

    // Swap, rollback and traffic say what changed, not the whole table.
    let (code, out, err) = cli(&["swap", "staging"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(get(), "Next, cli!\n");
    let changed: Vec<&str> = out.lines().collect();
    assert_eq!(changed.len(), 2, "production's hello and staging's: {out}");
    assert!(
        changed.iter().any(|l| l.starts_with("production hello: "))
            && changed.iter().any(|l| l.starts_with("staging hello: "))
            && out.contains(" -> "),
        "{out}"
    );
    let (code, out, err) = cli(&["rollback", "hello"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("hello in production: now") && out.contains("(was "),
        "{out}"
    );
    assert_eq!(out.lines().count(), 1, "{out}");
    assert_eq!(get(), "Hello, cli!\n");

    let (code, out, err) = cli(&["traffic", "production=90", "staging=10"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "split: 10% to staging");
    let (_, out, _) = cli(&["traffic", "production=100"]);
    assert_eq!(out.trim(), "production serves every request (no split)");
    let (_, out, _) = cli(&["versions", "hello"]);
    assert_eq!(out.lines().count(), 3, "a header and two versions: {out}");

    // Refusals come back with the server's reason.
    let (code, _, err) = cli(&["swap", "nope"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("404") && err.contains("no slot named `nope`"),
        "{err}"
    );
    let (code, _, err) = cli(&["traffic", "production=90", "staging=20"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("adding up to 100"), "{err}");

    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

/// Runs `kelvin ARGS -f MANIFEST --url URL --key KEY`: its exit code,
/// stdout and stderr.
fn against<'a>(
    manifest: &'a Path,
    url: &'a str,
    key: &'a str,
) -> impl Fn(&[&str]) -> (Option<i32>, String, String) + 'a {
    move |args| {
        let out = kelvin()
            .args(args)
            .arg("-f")
            .arg(manifest)
            .args(["--url", url, "--key", key])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.code(), stdout, stderr)
    }
}

#[test]
fn the_queue_and_blob_commands_drive_a_running_server() {
    let (dir, manifest) = app_with(
        "",
        "[functions.worker]\nsource = \"{guests}/events.wasm\"\n\
         [[functions.worker.queue_trigger]]\nname = \"jobs\"\n\
         [[functions.worker.output]]\nname = \"out\"\nqueue = \"done\"\n\
         [functions.thumbs]\nsource = \"{guests}/events.wasm\"\n\
         [[functions.thumbs.blob]]\npath = \"images/{name}\"\n",
    );
    let key = master_key(&manifest);
    let (mut child, addr, stderr) = up(&manifest);
    std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
    let url = format!("http://{addr}");
    let cli = against(&manifest, &url, &key);

    // A message in `jobs` comes out of `worker` into `done`.
    let (code, out, err) = cli(&["queue", "send", "jobs", r#"{"n":1}"#]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        !out.trim().is_empty() && out.trim().lines().count() == 1,
        "{out}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, out, err) = cli(&["queue", "peek", "done", "--json"]);
        assert_eq!(code, Some(0), "{err}");
        let peeked: serde_json::Value = serde_json::from_str(&out).unwrap();
        let messages = peeked["messages"].as_array().unwrap();
        if messages.len() == 1 {
            assert!(
                messages[0]["body"].as_str().unwrap().contains(r#""n":1"#),
                "{out}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "nothing reached `done`: {out}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, out, _) = cli(&["queue", "peek", "done"]);
    assert!(out.contains(r#""n":1"#) && out.contains("BODY"), "{out}");
    let (code, out, err) = cli(&["queue", "list"]);
    assert_eq!(code, Some(0), "{err}");
    let names: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        out.starts_with("NAME") && names.contains(&"jobs") && names.contains(&"done"),
        "{out}"
    );
    let (code, out, _) = cli(&["queue", "requeue", "jobs"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("0 messages moved"), "{out}");
    let (code, _, err) = cli(&["queue", "send", "nosuch", "x"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("404") && err.contains("nosuch"), "{err}");

    // Blobs: put, list, get, delete.
    let file = dir.path().join("a.txt");
    std::fs::write(&file, "hello, blob\n").unwrap();
    let (code, out, err) = cli(&["blob", "put", "images/a.txt", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("images/a.txt") && out.contains("etag"),
        "{out}"
    );
    let (code, out, err) = cli(&["blob", "ls", "images"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("a.txt ") && l.contains(" 12 ")),
        "{out}"
    );
    let (code, out, err) = cli(&["blob", "get", "images/a.txt"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out, "hello, blob\n");
    let (code, out, err) = cli(&["blob", "rm", "images/a.txt"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("deleted images/a.txt"), "{out}");
    let (code, _, err) = cli(&["blob", "get", "images/a.txt"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("404") && err.contains("no blob images/a.txt"),
        "{err}"
    );

    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn the_durable_commands_drive_a_running_server() {
    let (_dir, manifest) = app_with(
        "",
        "[functions.approval]\nsource = \"{guests}/approval.wasm\"\ndurable = \"orchestrator\"\n\
         [functions.hello-cities]\nsource = \"{guests}/hello_cities.wasm\"\ndurable = \"orchestrator\"\n\
         [functions.say-hello]\nsource = \"{guests}/say_hello.wasm\"\ndurable = \"activity\"\n\
         [functions.counter]\nsource = \"{guests}/counter.wasm\"\ndurable = \"entity\"\n",
    );
    let key = master_key(&manifest);
    let (mut child, addr, stderr) = up(&manifest);
    std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
    let url = format!("http://{addr}");
    let cli = against(&manifest, &url, &key);
    let wait_for = |id: &str, status: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (code, out, err) = cli(&["durable", "status", id]);
            assert_eq!(code, Some(0), "{err}");
            if out
                .lines()
                .any(|l| l.starts_with("status") && l.ends_with(status))
            {
                return out;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never {status}: {out}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // start, status, raise: the approval completes with the event's input.
    let (code, out, err) = cli(&[
        "durable",
        "start",
        "approval",
        r#"{"timeout_ms": 600000}"#,
        "--id",
        "order-1",
    ]);
    assert_eq!((code, out.trim()), (Some(0), "order-1"), "{err}");
    wait_for("order-1", "Running");
    let (code, _, err) = cli(&["durable", "raise", "order-1", "approval", r#""yes""#]);
    assert_eq!(code, Some(0), "{err}");
    let out = wait_for("order-1", "Completed");
    assert!(out.contains(r#"{"approved":"yes"}"#), "{out}");

    // terminate, list, purge.
    let (code, out, _) = cli(&["durable", "start", "approval", r#"{"timeout_ms": 600000}"#]);
    assert_eq!(code, Some(0));
    let id = out.trim().to_owned();
    wait_for(&id, "Running");
    let (code, _, err) = cli(&["durable", "terminate", &id, "--reason", "no longer needed"]);
    assert_eq!(code, Some(0), "{err}");
    let out = wait_for(&id, "Terminated");
    assert!(out.contains("no longer needed"), "{out}");
    let (code, out, err) = cli(&["durable", "list", "--status", "Completed,Terminated"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("order-1") && out.contains(&id), "{out}");
    let (code, out, err) = cli(&["durable", "purge", "order-1"]);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(out.trim(), "purged 1 instance(s)");
    let (code, _, err) = cli(&["durable", "status", "order-1"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("404"), "{err}");

    // Entities: signal, then read the state.
    let (code, _, err) = cli(&["durable", "signal", "counter", "k", "add", "5"]);
    assert_eq!(code, Some(0), "{err}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, out, _) = cli(&["durable", "entity", "counter", "k"]);
        if code == Some(0) && out.trim() == "5" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{out}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Clear refusals: bad JSON before any request, an unknown orchestrator.
    let (code, _, err) = cli(&["durable", "start", "hello-cities", "{oops"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is not JSON"), "{err}");
    // (A start naming no orchestrator is a 400, as Azure answers.)
    let (code, _, err) = cli(&["durable", "start", "nope"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("400") && err.contains("nope"), "{err}");

    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn the_cli_finds_the_server_it_started_and_takes_its_url_in_any_form() {
    let (dir, manifest) = app();
    let (mut child, addr, stderr) = up(&manifest);
    std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
    let slots = |extra: &[&str], env: Option<&str>| {
        let mut cmd = kelvin();
        cmd.args(["slots", "-f"]).arg(&manifest).args(extra);
        if let Some(url) = env {
            cmd.env("KELVIN_URL", url);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The manifest says port 0; the server recorded where it really is.
    let recorded = std::fs::read_to_string(dir.path().join(".kelvin").join("address")).unwrap();
    assert_eq!(recorded.trim(), addr);
    for (extra, env) in [
        (vec![], None),
        (vec!["--url", addr.as_str()], None),
        (vec![], Some(addr.as_str())),
        (vec![], Some(&*format!("http://{addr}/"))),
    ] {
        let (code, out, err) = slots(&extra, env);
        assert_eq!(code, Some(0), "{extra:?} {env:?}: {err}");
        assert!(out.contains("production"), "{out}");
    }
    let (code, _, err) = slots(&["--url", "https://127.0.0.1:1"], None);
    assert_eq!(code, Some(1));
    assert!(err.contains("only http:// URLs"), "{err}");
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    // A stopped server's address is gone with it.
    assert!(!dir.path().join(".kelvin").join("address").exists());
}

#[test]
fn a_command_whose_reader_goes_away_ends_quietly() {
    let (_dir, manifest) = app();
    let (mut child, addr, stderr) = up(&manifest);
    std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
    // `kelvin versions hello | head -0`: the reader closes before the
    // output is written; no panic, no message.
    let mut cmd = kelvin()
        .args(["versions", "hello", "--url", &addr, "-f"])
        .arg(&manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(cmd.stdout.take());
    let out = cmd.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_function_whose_memory_limit_is_below_what_its_wasm_needs_is_refused() {
    // A Rust preview-1 module starts with 17 pages (its 1 MiB stack and
    // data): it can never instantiate in 64 KiB.
    let tight = "[functions.hello]\nsource = \"{guests}/hello.wasm\"\nmemory = \"64KiB\"\n\
                 [[functions.hello.http]]\nroute = \"/hello/{name}\"\nauth = \"anonymous\"\n";
    let (_tight_dir, tight_manifest) = app_with("", tight);
    let stderr = fails(&["check"], &tight_manifest);
    assert!(
        stderr.contains("function `hello`") && stderr.contains("raise `memory`"),
        "{stderr}"
    );
    // Start-up refuses it likewise (the check is no cached verdict).
    let out = kelvin()
        .args(["up", "--listen", "127.0.0.1:0", "-f"])
        .arg(&tight_manifest)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("raise `memory`"));

    // Deployed into a running server: refused, and production unchanged.
    let (dir, manifest) = app();
    let next = dir.path().join("tight.toml");
    std::fs::copy(&tight_manifest, &next).unwrap();
    let (mut child, addr, stderr) = up(&manifest);
    std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
    let out = kelvin()
        .args(["deploy", "hello", "--url", &addr, "-f"])
        .arg(&next)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("400") && err.contains("raise `memory`"),
        "{err}"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = rt.block_on(async {
        reqwest::get(format!("http://{addr}/hello/still"))
            .await
            .unwrap()
            .status()
    });
    assert_eq!(answer, 200);
    let versions = succeeded(
        kelvin()
            .args(["versions", "hello", "--url", &addr, "-f"])
            .arg(&manifest)
            .output()
            .unwrap(),
    );
    assert_eq!(
        versions.lines().count(),
        2,
        "a header and one version: {versions}"
    );
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

/// A build whose `watch` inputs and output are unchanged is skipped: no
/// new wasm, so no new version ("already deployed"); a changed input, a
/// changed or missing output, runs it again. A build without `watch` runs
/// every time.
#[test]
fn a_build_is_skipped_when_nothing_it_watches_changed() {
    let dir = tempfile::tempdir().unwrap();
    let guest = kelvin_tests::guest_dir().join("hello.wasm");
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("src/greeting.txt"), "hello").unwrap();
    let manifest = dir.path().join("functions.toml");
    std::fs::write(
        &manifest,
        format!(
            "version = 1\nname = \"watched\"\n[server]\ninstance_slots = 8\n\
             [functions.hello]\nsource = \"out/hello.wasm\"\n\
             build = \"mkdir -p out && cp {} out/hello.wasm && echo ran >> watched-runs\"\n\
             watch = [\"src/**/*.txt\"]\n\
             [[functions.hello.http]]\nroute = \"/hello/{{name}}\"\nauth = \"anonymous\"\n\
             [functions.plain]\nsource = \"out/plain.wasm\"\n\
             build = \"mkdir -p out && cp {} out/plain.wasm && echo ran >> plain-runs\"\n",
            guest.display(),
            guest.display()
        ),
    )
    .unwrap();
    let runs = |name: &str| {
        std::fs::read_to_string(dir.path().join(name))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let build = || {
        let out = kelvin()
            .args(["build", "-f"])
            .arg(&manifest)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    build();
    assert_eq!((runs("watched-runs"), runs("plain-runs")), (1, 1));
    let again = build();
    assert!(
        again.contains("skipping the build of `hello`: nothing it watches changed"),
        "{again}"
    );
    assert_eq!((runs("watched-runs"), runs("plain-runs")), (1, 2));
    // A watched file's bytes change: built again.
    std::fs::write(dir.path().join("src/greeting.txt"), "bonjour").unwrap();
    build();
    assert_eq!(runs("watched-runs"), 2);
    // A new watched file: built again.
    std::fs::create_dir(dir.path().join("src/more")).unwrap();
    std::fs::write(dir.path().join("src/more/other.txt"), "x").unwrap();
    build();
    assert_eq!(runs("watched-runs"), 3);
    build();
    assert_eq!(runs("watched-runs"), 3);
    // The output is gone or not what the build made: built again.
    std::fs::remove_file(dir.path().join("out/hello.wasm")).unwrap();
    build();
    assert_eq!(runs("watched-runs"), 4);
    std::fs::write(dir.path().join("out/hello.wasm"), b"not wasm").unwrap();
    build();
    assert_eq!(runs("watched-runs"), 5);

    // `watch` without `build` is a located error.
    std::fs::write(
        &manifest,
        "version = 1\nname = \"watched\"\n[functions.hello]\nsource = \"out/hello.wasm\"\nwatch = [\"src/*\"]\n",
    )
    .unwrap();
    let stderr = fails(&["check"], &manifest);
    assert!(
        stderr.contains("functions.hello.watch") && stderr.contains("has no `build`"),
        "{stderr}"
    );
}

/// A valid module whose one page of memory cannot hold its data segment
/// (at 70,000): every instantiation traps, which no static check sees.
/// `(module (memory (export "memory") 1) (data (i32.const 70000) "x")
/// (func (export "_start")))`
const OUT_OF_BOUNDS_DATA: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version
    0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // types: () -> ()
    0x03, 0x02, 0x01, 0x00, // functions: one of type 0
    0x05, 0x03, 0x01, 0x00, 0x01, // memory: min 1 page
    0x07, 0x13, 0x02, 0x06, b'_', b's', b't', b'a', b'r', b't', 0x00, 0x00, 0x06, b'm', b'e', b'm',
    b'o', b'r', b'y', 0x02, 0x00, // exports: _start, memory
    0x0a, 0x04, 0x01, 0x02, 0x00, 0x0b, // code: an empty body
    0x0b, 0x09, 0x01, 0x00, 0x41, 0xf0, 0xa2, 0x04, 0x0b, 0x01, b'x', // data at 70000
];

/// A version that passes every check but can never instantiate is refused
/// when it is created (instantiated once first), so nothing points at it;
/// production keeps serving.
#[test]
fn a_version_that_cannot_instantiate_is_refused_before_anything_points_at_it() {
    let (dir, manifest) = app();
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, OUT_OF_BOUNDS_DATA).unwrap();
    let next = dir.path().join("bad.toml");
    std::fs::write(
        &next,
        std::fs::read_to_string(&manifest).unwrap().replace(
            &format!("{}", kelvin_tests::guest_dir().join("hello.wasm").display()),
            &bad.display().to_string(),
        ),
    )
    .unwrap();
    assert!(std::fs::read_to_string(&next).unwrap().contains("bad.wasm"));
    // The static checks pass it.
    succeeded(kelvin().args(["check", "-f"]).arg(&next).output().unwrap());

    let (mut child, addr, stderr) = up(&manifest);
    std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
    for slot in ["production", "staging"] {
        let out = kelvin()
            .args(["deploy", "hello", "--slot", slot, "--url", &addr, "-f"])
            .arg(&next)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("400") && err.contains("cannot be instantiated"),
            "{err}"
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let answer = rt.block_on(async {
        reqwest::get(format!("http://{addr}/hello/still"))
            .await
            .unwrap()
            .status()
    });
    assert_eq!(answer, 200);
    let versions = succeeded(
        kelvin()
            .args(["versions", "hello", "--url", &addr, "-f"])
            .arg(&manifest)
            .output()
            .unwrap(),
    );
    assert_eq!(
        versions.lines().count(),
        2,
        "no version was made: {versions}"
    );
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_restart_undoes_no_deploy_swap_or_rollback_and_applies_a_changed_declaration() {
    let guests = kelvin_tests::guest_dir();
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("hello.wasm");
    std::fs::copy(guests.join("hello.wasm"), &wasm).unwrap();
    let manifest = dir.path().join("functions.toml");
    let write_manifest = |env: &str| {
        std::fs::write(
            &manifest,
            format!(
                "version = 1\nname = \"restart\"\n[server]\ninstance_slots = 8\n\
                 [functions.hello]\nsource = \"{}\"\nbuild = \"cp {} {}\"\n{env}\n\
                 [[functions.hello.http]]\nroute = \"/hello/{{name}}\"\nauth = \"anonymous\"\n",
                wasm.display(),
                guests.join("echo.wasm").display(),
                wasm.display()
            ),
        )
        .unwrap();
    };
    write_manifest("");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let serving = |addr: &str| {
        rt.block_on(async {
            let r = reqwest::get(format!("http://{addr}/hello/x"))
                .await
                .unwrap();
            let version = r.headers()["x-kelvin-version"].to_str().unwrap().to_owned();
            (version, r.text().await.unwrap())
        })
    };
    let cli = |addr: &str, args: &[&str]| {
        succeeded(
            kelvin()
                .args(args)
                .args(["--url", &format!("http://{addr}"), "-f"])
                .arg(&manifest)
                .output()
                .unwrap(),
        )
    };
    let stop = |mut child: std::process::Child| {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert!(child.wait().unwrap().success());
    };
    // `kelvin up` with every log line kept, those before it serves too.
    let start = || {
        let mut child = kelvin()
            .args([
                "up",
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "-f",
            ])
            .arg(&manifest)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut log = String::new();
        let addr = loop {
            let mut line = String::new();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "no start: {log}");
            log.push_str(&line);
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["fields"]["message"] == "kelvin is serving"
            {
                break v["fields"]["address"].as_str().unwrap().to_owned();
            }
        };
        std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
        (child, addr, log)
    };

    let (child, addr, _) = start();
    let (v1, body) = serving(&addr);
    assert_eq!(body, "Hello, x!\n");
    // A new build deployed to staging: production keeps v1, across a restart.
    let out = cli(&addr, &["deploy", "--build", "--slot", "staging"]);
    assert!(out.contains("deployed to staging"), "{out}");
    stop(child);
    let (child, addr, _) = start();
    assert_eq!(
        serving(&addr).0,
        v1,
        "a deploy to staging reached production"
    );
    // Swapped in, rolled back, restarted: still v1.
    cli(&addr, &["swap", "staging"]);
    let v2 = serving(&addr).0;
    assert_ne!(v2, v1);
    cli(&addr, &["rollback", "hello"]);
    assert_eq!(serving(&addr).0, v1);
    stop(child);
    let (child, addr, log) = start();
    assert_eq!(serving(&addr).0, v1, "a restart undid the rollback");
    assert!(
        log.contains("production keeps what was deployed"),
        "the difference from the manifest is logged: {log}"
    );
    stop(child);
    // The declaration changes (a new env value): the next start applies it.
    write_manifest("env = { GREETING = \"Hi\" }");
    let (child, addr, log) = start();
    let (v3, _) = serving(&addr);
    assert!(v3 != v1 && v3 != v2, "{v3}");
    assert!(
        log.contains("the manifest declares a new version; applied to production"),
        "{log}"
    );
    stop(child);
}
