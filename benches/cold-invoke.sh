#!/usr/bin/env bash
# Cold and warm invocation times of one function, from `kelvin invoke`'s own
# metering records (until `kelvin bench` exists):
#   - cold from .wasm: a fresh process with an empty artifact cache (compile)
#   - cold from cache: a fresh process with the artifact cached (mmap load)
#   - warm: later invocations in the same process (instantiate from the pool)
# Usage: benches/cold-invoke.sh [FUNCTION] [RUNS]   (default: hello 20)
# Needs a release build (cargo build --release -p kelvin) and the guests
# (kelvin build). Prints medians in microseconds.
set -euo pipefail
cd "$(dirname "$0")/.."
fn=${1:-hello}
runs=${2:-20}
bin=target/release/kelvin
state=$(mktemp -d)
trap 'rm -rf "$state"' EXIT
# The example app, with its state (cache) in a scratch folder.
sed "s|^state_dir = .*|state_dir = \"$state\"|" functions.toml > "$state/functions.toml"
sed -i "s|\"target/|\"$PWD/target/|" "$state/functions.toml"
out="$state/records"
for i in $(seq "$runs"); do
  rm -rf "$state/cache"
  "$bin" invoke -f "$state/functions.toml" "$fn" --repeat 10 2>>"$out.compile" >/dev/null
  "$bin" invoke -f "$state/functions.toml" "$fn" --repeat 1 2>>"$out.cache" >/dev/null
done
python3 - "$out" <<'PY'
import json, statistics, sys
def records(path):
    text, recs, buf = open(path).read(), [], None
    for line in text.splitlines():
        if line == "{": buf = []
        if buf is not None:
            buf.append(line)
            if line == "}": recs.append(json.loads("\n".join(buf))); buf = None
    return recs
compile_recs, cache_recs = records(sys.argv[1] + ".compile"), records(sys.argv[1] + ".cache")
rows = {
    "cold from .wasm (compile)": [r for r in compile_recs if r["cold"]],
    "cold from cache (mmap)": [r for r in cache_recs if r["cold"]],
    "warm (pooled instance)": [r for r in compile_recs if not r["cold"]],
}
med = lambda xs: statistics.median(xs) if xs else 0
print(f"{'temperature':28} {'n':>4} {'load':>8} {'inst':>8} {'run':>8} {'wall':>8}   (median us)")
for name, rs in rows.items():
    load = med([r["load"]["load_us"] for r in rs if r["load"]])
    print(f"{name:28} {len(rs):>4} {load:>8.0f} {med([r['instantiate_us'] for r in rs]):>8.0f} "
          f"{med([r['run_us'] for r in rs]):>8.0f} {med([r['wall_us'] for r in rs]):>8.0f}")
PY
