//! Bad input at start-up: manifests (golden files in `tests/ui/`: each bad
//! `*.toml` beside the exact `*.err` it must produce; refresh with `BLESS=1`)
//! and unusable wasm, which must fail start-up, not the first request.

use std::path::Path;

use kelvin::Manifest;

use crate::util::{App, write};

#[test]
fn bad_manifests_produce_their_golden_errors() {
    let dir = kelvin_tests::workspace_root().join("tests").join("ui");
    let bless = std::env::var_os("BLESS").is_some();
    let mut cases = 0;
    let mut failures = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
    {
        cases += 1;
        let text = std::fs::read_to_string(path).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        // Name the file without its folder so the output is the same anywhere.
        let actual = match Manifest::parse(Path::new(name), &text) {
            Ok(_) => format!("unexpectedly valid: {name}"),
            Err(e) => e.to_string(),
        } + "\n";
        let golden = path.with_extension("err");
        if bless {
            std::fs::write(&golden, &actual).unwrap();
        } else {
            let expected = std::fs::read_to_string(&golden).unwrap_or_default();
            if expected != actual {
                failures.push(format!(
                    "{name}:\n--- expected\n{expected}--- actual\n{actual}"
                ));
            }
        }
    }
    assert!(
        cases >= 10,
        "expected the golden cases in {}",
        dir.display()
    );
    assert!(
        failures.is_empty(),
        "{} golden mismatches (BLESS=1 to update):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_example_manifest_is_valid() {
    let m = Manifest::load(&kelvin_tests::workspace_root().join("functions.toml")).unwrap();
    let names: Vec<&str> = m.functions.iter().map(|f| f.name.as_str()).collect();
    for guest in kelvin_tests::GUESTS.iter().chain(kelvin_tests::COMPONENTS) {
        // A package of several functions (guests/durable) has one binary
        // per function.
        let bins = kelvin_tests::workspace_root()
            .join("guests")
            .join(guest)
            .join("src")
            .join("bin");
        let functions: Vec<String> = match std::fs::read_dir(&bins) {
            Ok(dir) => dir
                .map(|e| {
                    let path = e.unwrap().path();
                    let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
                    stem.replace('_', "-")
                })
                .collect(),
            Err(_) => vec![(*guest).to_owned()],
        };
        for function in &functions {
            assert!(
                names.contains(&function.as_str()),
                "the example app wires every guest; `{function}` is missing"
            );
        }
    }
    for f in &m.functions {
        assert!(!f.triggers.is_empty(), "`{}` has no trigger", f.name);
    }
}

#[test]
fn defaults_are_inherited_and_overridden() {
    let m = Manifest::parse(
        Path::new("functions.toml"),
        "version = 1\nname = \"d\"\n[defaults]\ntimeout = \"5s\"\nmemory = \"64MiB\"\nkeep_warm = \"1m\"\n\
         [functions.a]\nsource = \"a.wasm\"\n[functions.b]\nsource = \"b.wasm\"\ntimeout = \"1s\"\nmemory = \"100KiB\"\nfuel = 7\n",
    )
    .unwrap();
    let (a, b) = (&m.functions[0], &m.functions[1]);
    assert_eq!(a.limits.timeout.as_secs(), 5);
    assert_eq!(a.limits.memory, 64 << 20);
    assert_eq!(a.keep_warm.as_secs(), 60);
    assert_eq!(a.limits.fuel, None);
    assert_eq!(b.limits.timeout.as_secs(), 1);
    // Rounded down to whole 64 KiB pages.
    assert_eq!(b.limits.memory, 64 << 10);
    assert_eq!(b.limits.fuel.map(|f| f.get()), Some(7));
    assert_eq!(m.server.listen.to_string(), "127.0.0.1:3000");
}

/// The error of a runtime that must refuse to start.
fn refusal(app: &App) -> String {
    match kelvin::Runtime::new(
        app.manifest(),
        std::sync::Arc::new(kelvin::metering::MemorySink::default()),
    ) {
        Ok(_) => panic!("a runtime with an unusable function started"),
        Err(e) => format!("{e}"),
    }
}

fn start_error(wasm: &[u8]) -> String {
    let app = App::new("", "[functions.bad]\nsource = \"bad.wasm\"\n");
    write(&app.dir.path().join("bad.wasm"), wasm);
    refusal(&app)
}

#[test]
fn unusable_wasm_fails_at_start_up() {
    let header = b"\0asm\x01\0\0\0";
    let e = start_error(b"this is not wasm");
    assert!(
        e.contains("function `bad`") && e.contains("not a wasm binary"),
        "{e}"
    );

    let e = start_error(b"\0asm\x0d\0\x01\0");
    assert!(
        e.contains("exports no `wasi:http/incoming-handler@0.2`"),
        "{e}"
    );

    let e = start_error(header);
    assert!(e.contains("exports no `_start`"), "{e}");

    // (module (import "env" "f" (func)))
    let mut m = header.to_vec();
    m.extend_from_slice(&[0x01, 0x04, 0x01, 0x60, 0x00, 0x00]);
    m.extend_from_slice(&[
        0x02, 0x09, 0x01, 0x03, b'e', b'n', b'v', 0x01, b'f', 0x00, 0x00,
    ]);
    let e = start_error(&m);
    assert!(e.contains("imports `env::f`"), "{e}");

    // A function body that does not type-check: caught by full validation.
    // (module (func (export "_start") i32.const 1))  -- leaves a value
    let mut m = header.to_vec();
    m.extend_from_slice(&[0x01, 0x04, 0x01, 0x60, 0x00, 0x00]); // type () -> ()
    m.extend_from_slice(&[0x03, 0x02, 0x01, 0x00]); // func 0: type 0
    m.extend_from_slice(&[
        0x07, 0x0a, 0x01, 0x06, b'_', b's', b't', b'a', b'r', b't', 0x00, 0x00,
    ]);
    m.extend_from_slice(&[0x0a, 0x06, 0x01, 0x04, 0x00, 0x41, 0x01, 0x0b]);
    let e = start_error(&m);
    assert!(e.contains("not a usable wasm module"), "{e}");

    let app = App::new("", "[functions.gone]\nsource = \"missing.wasm\"\n");
    let e = refusal(&app);
    assert!(
        e.contains("function `gone`: failed to read") && e.contains("missing.wasm"),
        "{e}"
    );

    // With a build command, the error says how to produce the file.
    let app = App::new(
        "",
        "[functions.later]\nsource = \"later.wasm\"\nbuild = \"make\"\n",
    );
    let e = refusal(&app);
    assert!(
        e.contains("does not exist; build it with `kelvin build`"),
        "{e}"
    );
}
