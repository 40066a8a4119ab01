//! The docs cannot drift from Kelvin: every link to a local file or heading
//! in README.md and docs/*.md resolves, and every ```console block runs
//! against the example app, its output compared with the doc's, in
//! trycmd's conventions (`$ ` starts a command, `> ` continues it; what
//! follows is its output, stdout and stderr together; a `...` line stands
//! for any lines and `[..]` for any text within a line).
//!
//! The example app runs from a temp dir, its wasm taken from the suite's
//! guest builds, its state dir its own: a walkthrough's `localhost:3000` is
//! that server's address, `kelvin` and `cargo run -q -p kelvin --` are the
//! binary under test, and the working directory is the app's.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod common;

/// The Markdown files whose walkthroughs and links are checked.
fn docs() -> Vec<PathBuf> {
    let root = kelvin_tests::workspace_root();
    let mut files = vec![root.join("README.md")];
    let mut more: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    more.sort();
    files.extend(more);
    files
}

/// GitHub's anchor for a heading: lower case, punctuation but `-` and `_`
/// dropped, spaces as `-`.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a Markdown file's headings (outside code blocks).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced && line.starts_with('#') {
            let heading = line.trim_start_matches('#');
            let mut s = slug(heading);
            // GitHub numbers repeated headings: -1, -2, ...
            let base = s.clone();
            let mut n = 0;
            while out.contains(&s) {
                n += 1;
                s = format!("{base}-{n}");
            }
            out.insert(s);
        }
    }
    out
}

/// `(target, line)` of every inline link `](target)` outside code.
fn links(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut fenced = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            out.push((after[..end].to_owned(), i + 1));
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn every_local_link_and_anchor_in_the_docs_resolves() {
    let mut broken = Vec::new();
    for file in docs() {
        let text = std::fs::read_to_string(&file).unwrap();
        let dir = file.parent().unwrap();
        for (target, line) in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (target.as_str(), None),
            };
            let linked = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            let at = format!("{}:{line}: {target}", file.display());
            if !linked.exists() {
                broken.push(format!("{at}: no such file"));
                continue;
            }
            if let Some(anchor) = anchor
                && linked.extension().is_some_and(|e| e == "md")
                && !anchors(&std::fs::read_to_string(&linked).unwrap()).contains(anchor)
            {
                broken.push(format!("{at}: no such heading"));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// One command of a walkthrough and the output the doc shows for it.
struct Step {
    line: usize,
    command: String,
    expected: Vec<String>,
}

/// The ```console blocks of `text`, in order.
fn console_blocks(text: &str) -> Vec<Vec<Step>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<Step>> = None;
    for (i, line) in text.lines().enumerate() {
        match &mut current {
            None if line.trim() == "```console" => current = Some(Vec::new()),
            None => {}
            Some(_) if line.trim() == "```" => blocks.push(current.take().unwrap()),
            Some(steps) => {
                if let Some(cmd) = line.strip_prefix("$ ") {
                    steps.push(Step {
                        line: i + 1,
                        command: cmd.to_owned(),
                        expected: Vec::new(),
                    });
                } else if let (Some(cmd), Some(step)) = (line.strip_prefix("> "), steps.last_mut())
                    && step.expected.is_empty()
                {
                    step.command.push('\n');
                    step.command.push_str(cmd);
                } else if let Some(step) = steps.last_mut() {
                    step.expected.push(line.to_owned());
                }
            }
        }
    }
    blocks
}

/// Whether `actual` matches the pattern line `expected` (`[..]` is any text).
fn line_matches(expected: &str, actual: &str) -> bool {
    let parts: Vec<&str> = expected.split("[..]").collect();
    if parts.len() == 1 {
        return expected == actual;
    }
    let Some(mut rest) = actual.strip_prefix(parts[0]) else {
        return false;
    };
    for (i, part) in parts.iter().enumerate().skip(1) {
        if i == parts.len() - 1 {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

/// Whether `actual` lines match `expected` (`...` is any lines).
fn matches(expected: &[String], actual: &[&str]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((first, rest)) if first.trim() == "..." => {
            (0..=actual.len()).any(|skip| matches(rest, &actual[skip..]))
        }
        Some((first, rest)) => actual
            .split_first()
            .is_some_and(|(a, more)| line_matches(first, a) && matches(rest, more)),
    }
}

/// The example app in a temp dir, its wasm from the suite's guest builds.
fn example_app() -> (tempfile::TempDir, PathBuf) {
    let root = kelvin_tests::workspace_root();
    let text = std::fs::read_to_string(root.join("functions.toml")).unwrap();
    let guests = kelvin_tests::guest_dir();
    let components = kelvin_tests::component_dir();
    let mut out = String::new();
    let mut function = String::new();
    for line in text.lines() {
        if let Some(name) = line
            .strip_prefix("[functions.")
            .and_then(|l| l.strip_suffix(']'))
        {
            function = name.to_owned();
        }
        if line.starts_with("build = ") || line.starts_with("watch = ") {
            continue;
        }
        let line = if let Some(wasm) = line
            .strip_prefix("source = \"target/wasm32-wasip1/guest/")
            .and_then(|l| l.strip_suffix('"'))
        {
            format!("source = \"{}\"", guests.join(wasm).display())
        } else if let Some(wasm) = line
            .strip_prefix("source = \"target/wasm32-wasip2/guest/")
            .and_then(|l| l.strip_suffix('"'))
        {
            format!("source = \"{}\"", components.join(wasm).display())
        } else if line.starts_with("source = \"target/guests/") {
            format!(
                "source = \"{}\"",
                kelvin_tests::example_guest(&function).display()
            )
        } else {
            line.replace(
                "source = \"guests/",
                &format!("source = \"{}/guests/", root.display()),
            )
        };
        out.push_str(&line);
        out.push('\n');
    }
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("functions.toml");
    std::fs::write(&manifest, out).unwrap();
    (dir, manifest)
}

/// Runs the walkthroughs of `files`, in order, against one example app
/// (its background compile of the whole app is paid once); the mismatches.
fn run_walkthroughs(files: &[PathBuf]) -> Vec<String> {
    let mut blocks = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).unwrap();
        blocks.extend(console_blocks(&text).into_iter().map(|b| (file.clone(), b)));
    }
    if blocks.is_empty() {
        return Vec::new();
    }
    let (dir, manifest) = example_app();
    let (mut child, addr, mut stderr) = common::up(&manifest);
    // A reader follows the walkthroughs some time after `kelvin up`: by
    // then its background compile of the app is done. Waiting for it here
    // keeps a swap's warm-up (every version loaded) from compiling the
    // 19 MB Python component under the walkthrough on a busy machine.
    let deadline = Instant::now() + Duration::from_secs(900);
    let mut line = String::new();
    loop {
        line.clear();
        use std::io::BufRead as _;
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("kelvin up ended before its background compile was done");
        }
        if line.contains("background precompile done") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the example app's background compile took over 15 minutes"
        );
    }
    std::thread::spawn(move || std::io::copy(&mut { stderr }, &mut std::io::sink()));
    // `kelvin` on the PATH is the binary under test.
    let bin = dir.path().join(".bin");
    std::fs::create_dir(&bin).unwrap();
    let exe = std::env::var_os("KELVIN_TEST_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_kelvin")),
        PathBuf::from,
    );
    std::os::unix::fs::symlink(exe, bin.join("kelvin")).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // curl as at a terminal: no progress meter when its output is piped.
    std::fs::write(dir.path().join(".curlrc"), "--silent\n--show-error\n").unwrap();
    let mut failures = Vec::new();
    let run = |command: &str| -> Vec<String> {
        let out = std::process::Command::new("timeout")
            .arg("300")
            .arg("bash")
            .arg("-c")
            .arg(command)
            .current_dir(dir.path())
            .env("PATH", &path)
            .env("CURL_HOME", dir.path())
            .env_remove("RUST_LOG")
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .env_remove("KELVIN_URL")
            .env_remove("KELVIN_KEY")
            .output()
            .unwrap();
        let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim_end().to_owned())
            .collect();
        while lines.last().is_some_and(String::is_empty) {
            lines.pop();
        }
        lines
    };
    for (file, steps) in blocks {
        // Each command in its own shell, the variables the block sets
        // (`KEY=...`) carried to the next through a file.
        let vars = dir.path().join(".doc-vars");
        std::fs::write(&vars, "").unwrap();
        let mut names: Vec<String> = Vec::new();
        for step in &steps {
            let command = step
                .command
                .replace("cargo run -q -p kelvin --", "kelvin")
                .replace("localhost:3000", &addr);
            for part in command.split(['\n', ';']) {
                let part = part.trim_start();
                if let Some((name, _)) = part.split_once('=')
                    && !name.is_empty()
                    && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                    && !names.contains(&name.to_owned())
                {
                    names.push(name.to_owned());
                }
            }
            let save: String = names
                .iter()
                .map(|n| format!("printf '%s=%q\\n' {n} \"${n}\" >> .doc-vars.next\n"))
                .collect();
            let script = format!(
                ". ./.doc-vars\n{{\n{command}\n}} 2>&1\n: > .doc-vars.next\n{save}mv .doc-vars.next .doc-vars\n"
            );
            let mut expected: Vec<String> = step
                .expected
                .iter()
                .map(|l| l.trim_end().to_owned())
                .collect();
            while expected.last().is_some_and(String::is_empty) {
                expected.pop();
            }
            // A step that waits (`sleep 1; ...`) is a read of something
            // that happens in the background: on a busy machine it may
            // need longer, so it is tried again, for up to a minute.
            let patient = step.command.starts_with("sleep ");
            let deadline = Instant::now() + Duration::from_secs(60);
            let actual = loop {
                let actual = run(&script);
                let refs: Vec<&str> = actual.iter().map(String::as_str).collect();
                if matches(&expected, &refs) || !patient || Instant::now() > deadline {
                    break actual;
                }
            };
            let refs: Vec<&str> = actual.iter().map(String::as_str).collect();
            if !matches(&expected, &refs) {
                failures.push(format!(
                    "{}:{}: $ {}\n--- the doc shows:\n{}\n--- it printed:\n{}",
                    file.display(),
                    step.line,
                    step.command,
                    expected.join("\n"),
                    actual.join("\n")
                ));
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    failures
}

#[test]
fn every_console_walkthrough_in_the_docs_prints_what_it_shows() {
    for tool in ["curl", "bash", "timeout"] {
        assert!(
            std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .output()
                .is_ok_and(|o| o.status.success()),
            "the docs' walkthroughs need `{tool}` on the PATH"
        );
    }
    let files = docs();
    let blocks: usize = files
        .iter()
        .map(|f| console_blocks(&std::fs::read_to_string(f).unwrap()).len())
        .sum();
    assert!(blocks > 0, "no ```console block found");
    let failures = run_walkthroughs(&files);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn the_matcher_follows_trycmds_conventions() {
    let e = |s: &[&str]| s.iter().map(|l| (*l).to_owned()).collect::<Vec<_>>();
    assert!(matches(&e(&["a", "...", "d"]), &["a", "b", "c", "d"]));
    assert!(matches(&e(&["a", "...", "d"]), &["a", "d"]));
    assert!(!matches(&e(&["a", "d"]), &["a", "b", "d"]));
    assert!(matches(
        &e(&["x-kelvin-version: [..]"]),
        &["x-kelvin-version: 3f9c"]
    ));
    assert!(matches(&e(&["[..] ok [..]"]), &["a ok b"]));
    assert!(!matches(&e(&["[..] ok"]), &["a ok b"]));
    assert!(!matches(&e(&["a"]), &[]));
    assert_eq!(
        slug("`[[functions.NAME.input]]`: input bindings"),
        "functionsnameinput-input-bindings"
    );
    assert_eq!(slug("The management API"), "the-management-api");
}
