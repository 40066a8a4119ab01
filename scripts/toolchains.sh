#!/usr/bin/env bash
# Installs what the example functions and the tests build with, at pinned
# versions, from the package registries only (crates.io's rustup mirror,
# PyPI, npm). Idempotent and quick when everything is there already; the
# README's commands, the tests and .ci/run all call it.
#
#   scripts/toolchains.sh            # what the example app builds with
#   scripts/toolchains.sh rust node  # a subset: rust, python, node, fuzz
#
# - rust:   the wasm32-wasip1 and wasm32-wasip2 targets of the toolchain in
#           rust-toolchain.toml. rustup adds a toolchain file's targets only
#           when it installs the toolchain itself, not to one already there.
# - python: a venv in .toolchains/python with componentize-py (Python
#           guests) and ziglang (zig cc, for C guests), hash-pinned in
#           scripts/toolchains/requirements.txt.
# - node:   .toolchains/node with @bytecodealliance/componentize-js
#           (JavaScript guests), from scripts/toolchains/package-lock.json.
# - fuzz:   a venv in .toolchains/fuzz with schemathesis (the tests' OpenAPI
#           fuzzer of the admin API), hash-pinned in
#           scripts/toolchains/fuzz-requirements.txt. Only the tests ask for it.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
pins=$root/scripts/toolchains
dest=$root/.toolchains

fail() {
    echo "toolchains: $*" >&2
    exit 1
}

# A digest of the files that pin a toolchain: a change reinstalls it.
digest() {
    cat "$@" | cksum | cut -d' ' -f1
}

install_rust() {
    command -v rustup >/dev/null ||
        fail "rustup is not installed; install it from https://rustup.rs, then run this again"
    # Any cargo call in the repo installs the pinned toolchain if missing
    # (with the file's targets); an existing toolchain keeps its own set.
    cargo --version >/dev/null
    local installed missing=()
    installed=$(rustup target list --installed)
    for target in wasm32-wasip1 wasm32-wasip2; do
        grep -qx "$target" <<<"$installed" || missing+=("$target")
    done
    if ((${#missing[@]})); then
        echo "toolchains: adding Rust targets ${missing[*]}" >&2
        rustup target add "${missing[@]}" >&2
    fi
}

# A venv in .toolchains/NAME with the hash-pinned REQUIREMENTS, for WHAT.
install_venv() {
    local name=$1 requirements=$2 what=$3
    local py=${PYTHON:-python3} stamp=$dest/$name/.kelvin-stamp want
    command -v "$py" >/dev/null || fail "$py not found; install Python 3.9 or newer"
    "$py" -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
        fail "$py is older than 3.9; $what needs 3.9 or newer"
    want="$(digest "$requirements") $("$py" -c 'import sys; print(sys.version.split()[0])')"
    if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
        return
    fi
    echo "toolchains: installing $what into .toolchains/$name" >&2
    rm -rf "${dest:?}/$name"
    "$py" -m venv "$dest/$name" ||
        fail "could not create a venv with $py (on Debian: apt-get install python3-venv)"
    "$dest/$name/bin/python" -m pip install --quiet --disable-pip-version-check \
        --require-hashes --only-binary :all: -r "$requirements" >&2
    echo "$want" >"$stamp"
}

install_python() {
    install_venv python "$pins/requirements.txt" "componentize-py and zig"
}

install_fuzz() {
    install_venv fuzz "$pins/fuzz-requirements.txt" "schemathesis"
}

install_node() {
    local stamp=$dest/node/.kelvin-stamp want
    command -v node >/dev/null && command -v npm >/dev/null ||
        fail "node and npm not found; install Node.js 18 or newer"
    node -e 'process.exit(Number(process.versions.node.split(".")[0] < 18))' ||
        fail "node is older than 18; componentize-js needs 18 or newer"
    want=$(digest "$pins/package.json" "$pins/package-lock.json")
    if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
        return
    fi
    echo "toolchains: installing componentize-js into .toolchains/node" >&2
    rm -rf "$dest/node"
    mkdir -p "$dest/node"
    cp "$pins/package.json" "$pins/package-lock.json" "$dest/node/"
    # The lock pins every version and its integrity hash. Not `npm ci`: npm
    # leaves other platforms' optional bindings out of lockfiles and then
    # `ci` refuses them as out of sync.
    (cd "$dest/node" && npm install --no-audit --no-fund --no-save --loglevel=error >&2)
    echo "$want" >"$stamp"
}

mkdir -p "$dest"
# Test binaries and a user's build may run this at once: one at a time.
if command -v flock >/dev/null; then
    exec 9>"$dest/.lock"
    flock 9
fi

wanted=("$@")
((${#wanted[@]})) || wanted=(rust python node)
for t in "${wanted[@]}"; do
    case $t in
    rust | python | node | fuzz) "install_$t" ;;
    *) fail "unknown toolchain '$t' (known: rust, python, node, fuzz)" ;;
    esac
done
