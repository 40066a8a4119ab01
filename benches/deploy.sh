#!/usr/bin/env bash
# Deploying a large real component (the Python guest, componentize-py,
# 19 MB) into a running server: how long a deploy takes (the version is
# checked, compiled and loaded before the call returns), and the first
# request after it, on the staging slot and then on production after the
# swap. Each round deploys bytes never seen before (the wasm with a custom
# section naming the round), so each compiles from scratch.
#
# Usage: benches/deploy.sh    (ROUNDS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}

. benches/common.sh
build_predict
state=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
cat > "$state/functions.toml" <<TOML
version = 1
name = "deploy"
[server]
state_dir = "state"
listen = "127.0.0.1:$port"
[functions.predict]
source = "$wasm"
[[functions.predict.http]]
route = "/predict"
auth = "anonymous"
TOML
"$kelvin" build -f "$state/functions.toml" >/dev/null
"$kelvin" up -f "$state/functions.toml" 2>"$state/log" &
server=$!
trap 'kill $server 2>/dev/null; rm -rf "$state"' EXIT
key=$("$kelvin" keys list -f "$state/functions.toml" | awk '$1 == "master" {print $3}')

python3 - "$port" "$key" "$wasm" "$rounds" <<'PY'
import json, statistics, sys, time, urllib.request
port, key, wasm, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
base = f"http://127.0.0.1:{port}"
def call(method, path, body=None, headers={}):
    req = urllib.request.Request(base + path, data=body, method=method,
                                 headers={"x-kelvin-key": key, **headers})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        data = r.read()
        return (time.perf_counter() - t) * 1000, r.status, r.headers, data
for _ in range(300):
    try:
        call("GET", "/healthz"); break
    except OSError:
        time.sleep(0.05)
original = open(wasm, "rb").read()
def leb(n):
    out = bytearray()
    while True:
        b = n & 0x7f; n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n: return bytes(out)
rows = {k: [] for k in ["upload", "deploy", "first staging", "swap", "first production", "warm production"]}
for i in range(rounds):
    name = b"kelvin-bench"
    payload = leb(len(name)) + name + f"{time.time_ns()}-{i}".encode()
    variant = original + b"\x00" + leb(len(payload)) + payload
    ms, status, _, body = call("PUT", "/admin/wasm", variant)
    assert status == 200, body
    rows["upload"].append(ms)
    wasm_hash = json.loads(body)["wasm"]
    ms, status, _, body = call("POST", "/admin/functions/predict/versions",
                               json.dumps({"wasm": wasm_hash, "slot": "staging"}).encode())
    assert status == 201, body
    rows["deploy"].append(ms)
    version = json.loads(body)["version"]
    ms, status, headers, _ = call("GET", "/predict", headers={"x-kelvin-slot": "staging"})
    assert status == 200 and headers["x-kelvin-version"] == version
    rows["first staging"].append(ms)
    ms, status, _, _ = call("POST", "/admin/swap", json.dumps({"source": "staging"}).encode())
    assert status == 200
    rows["swap"].append(ms)
    ms, status, headers, _ = call("GET", "/predict")
    assert status == 200 and headers["x-kelvin-version"] == version
    rows["first production"].append(ms)
    warm = [call("GET", "/predict")[0] for _ in range(20)]
    rows["warm production"].append(statistics.median(warm))
print(f"{'step':<18} {'median ms':>10}   all rounds (ms)")
for k, v in rows.items():
    print(f"{k:<18} {statistics.median(v):>10.1f}   " + " ".join(f"{x:.1f}" for x in v))
PY
