#!/usr/bin/env bash
# A/B throughput of two kelvin binaries on the example app, alternating
# A, B, A, B... so drift on the machine affects both alike. Each round starts
# `kelvin up --no-ledger` (or with the ledger: LEDGER=1) on a loopback port
# and measures it with the load generator of `kelvin bench http --url`.
# Usage: benches/ab.sh BIN_A BIN_B [PATH] [CONNECTIONS] [DURATION] [ROUNDS]
#   e.g. benches/ab.sh /tmp/kelvin-before target/release/kelvin /hello 1 5s 3
# Prints one line per run and the median requests/s and p50 of each binary.
set -euo pipefail
cd "$(dirname "$0")/.."
a=$1 b=$2 path=${3:-/hello} conns=${4:-1} dur=${5:-5s} rounds=${6:-3}
loadgen=${LOADGEN:-$b}
state=$(mktemp -d)
trap 'rm -rf "$state"; [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null || true' EXIT
. benches/common.sh
scratch_app "$b"
ledger_flag=--no-ledger
[ "${LEDGER:-0}" = 1 ] && ledger_flag=
port=$((20000 + RANDOM % 20000))
for round in $(seq "$rounds"); do
  for side in A B; do
    bin=$a; [ $side = B ] && bin=$b
    "$bin" up -f "$state/functions.toml" --listen 127.0.0.1:$port $ledger_flag > "$state/up.log" 2>&1 &
    pid=$!
    wait_ready "http://127.0.0.1:$port$path"
    "$loadgen" bench http --url "http://127.0.0.1:$port$path" -c "$conns" -d "$dur" --json "$state/$side.$round.json" > /dev/null 2>&1
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
    python3 - "$state/$side.$round.json" "$side round $round" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["steady"]
bad = {k: v for k, v in r["status"].items() if not k.startswith("2")}
print(f"{sys.argv[2]}: {r['requests_per_second']:9.0f} req/s  p50 {r['latency']['p50']} us  p99 {r['latency']['p99']} us")
if bad or r["errors"]:
    sys.exit(f"unexpected responses: {bad}, connection errors {r['errors']}")
PY
  done
done
python3 - "$state" "$rounds" <<'PY'
import json, statistics, sys
state, rounds = sys.argv[1], int(sys.argv[2])
med = {}
for side in "AB":
    rs = [json.load(open(f"{state}/{side}.{i}.json"))["steady"] for i in range(1, rounds + 1)]
    med[side] = (statistics.median(r["requests_per_second"] for r in rs),
                 statistics.median(r["latency"]["p50"] for r in rs))
    print(f"median {side}: {med[side][0]:9.0f} req/s  p50 {med[side][1]:.0f} us")
print(f"B/A: {med['B'][0] / med['A'][0]:.2f}x req/s, p50 {med['B'][1] / med['A'][1]:.2f}x")
PY
