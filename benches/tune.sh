#!/bin/bash
# Engine settings, measured: `kelvin bench http` (in process, scratch state,
# no ledger) once per KELVIN_TUNING variant, alternating, ROUNDS times; prints
# the median requests/s, p50 and p99 of steady load, and the p50 of the first
# request after an eviction. Needs a release build and the guests
# (cargo build --release -p kelvin && target/release/kelvin build).
# Usage: benches/tune.sh ROUTE CONNECTIONS DURATION ROUNDS VARIANT...
#   e.g. benches/tune.sh /http/hello 16 3s 2 "" "pagemap_scan=off,keep_resident=0"
# ("" is the defaults; variants are KELVIN_TUNING values, see
# runtime/src/engine.rs and docs/performance.md.)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
route=$1 c=$2 d=$3 rounds=$4; shift 4
for r in $(seq $rounds); do
  for v in "$@"; do
    name=${v:-default}
    KELVIN_TUNING="${v}" ./target/release/kelvin bench http --route $route -c $c -d $d --warmup 1s --cold-samples 5 --no-ledger --json "$out/$(echo "$name$route$c" | tr '/=,' '___').$r.json" > /dev/null 2>&1 || echo "FAIL $v"
  done
done
for v in "$@"; do
  name=${v:-default}
  python3 - "$name" "$rounds" "$out/$(echo "$name$route$c" | tr '/=,' '___')" <<'PY'
import json, statistics, sys
name, rounds, base = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rs = [json.load(open(f"{base}.{i}.json")) for i in range(1, rounds + 1)]
rps = statistics.median(r["steady"]["requests_per_second"] for r in rs)
p50 = statistics.median(r["steady"]["latency"]["p50"] for r in rs)
p99 = statistics.median(r["steady"]["latency"]["p99"] for r in rs)
ev = statistics.median(r["first_after_eviction"]["p50"] for r in rs)
print(f"{name:45} {rps:8.0f} req/s  p50 {p50:5.0f} us  p99 {p99:6.0f} us  evicted-first p50 {ev:5.0f} us")
PY
done
