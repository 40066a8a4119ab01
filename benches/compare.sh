#!/usr/bin/env bash
# The same wasi:http hello component under Kelvin and under `wasmtime serve`,
# and a plain hyper hello-world server as the floor: one load generator
# (`kelvin bench http --url`), the same connections and duration, servers
# alternating round by round, loopback only. Prints requests/s, p50 and p99
# per server (medians over rounds) and the ratios.
#
# Usage: benches/compare.sh            (CONNECTIONS=16 DURATION=5s ROUNDS=3)
# Needs wasmtime 48 on PATH or in $WASMTIME. To install it (about 15 minutes
# on 2 cores): cargo install wasmtime-cli --version 48.0.8 --locked
# Bounded: about ROUNDS x 5 x (DURATION + 2 s), plus the first build.
set -euo pipefail
cd "$(dirname "$0")/.."
conns=${CONNECTIONS:-16} dur=${DURATION:-5s} rounds=${ROUNDS:-3}
wasmtime=${WASMTIME:-$(command -v wasmtime || true)}
if [ -z "$wasmtime" ] || ! [ -x "$wasmtime" ]; then
  echo "compare.sh needs wasmtime 48: install it with" >&2
  echo "  cargo install wasmtime-cli --version 48.0.8 --locked" >&2
  echo "or point WASMTIME at a wasmtime binary." >&2
  exit 2
fi
version=$("$wasmtime" --version)
case $version in
  "wasmtime 48."*) ;;
  *) echo "warning: $version is not wasmtime 48; results are not comparable" >&2 ;;
esac

cargo build --quiet --release -p kelvin -p kelvin-benches --bin kelvin --bin hyper-hello
kelvin=target/release/kelvin
state=$(mktemp -d)
pid=
trap 'rm -rf "$state"; [ -n "$pid" ] && kill "$pid" 2>/dev/null; true' EXIT
. benches/common.sh
scratch_app "$kelvin"
component=target/wasm32-wasip2/guest/hello_http.wasm
port=$((20000 + RANDOM % 20000))

# name | command | path
servers=(
  "hyper floor|target/release/hyper-hello 127.0.0.1:$port|/"
  "wasmtime serve|$wasmtime serve -S cli=y -O pooling-allocator=y --addr 127.0.0.1:$port $component|/"
  "kelvin (component)|$kelvin up -f $state/functions.toml --listen 127.0.0.1:$port --no-ledger|/http/hello"
  "kelvin (component, ledger)|$kelvin up -f $state/functions.toml --listen 127.0.0.1:$port|/http/hello"
  "kelvin (preview 1)|$kelvin up -f $state/functions.toml --listen 127.0.0.1:$port --no-ledger|/hello"
)
echo "$version; $conns connections, $dur per run, $rounds rounds, $(nproc) cores"
for round in $(seq "$rounds"); do
  for i in "${!servers[@]}"; do
    IFS='|' read -r name cmd path <<< "${servers[$i]}"
    $cmd > "$state/server.log" 2>&1 &
    pid=$!
    wait_ready "http://127.0.0.1:$port$path"
    "$kelvin" bench http --url "http://127.0.0.1:$port$path" -c "$conns" -d "$dur" \
      --json "$state/$i.$round.json" > /dev/null 2>&1 || echo "run failed: $name" >&2
    kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
    sleep 0.5
  done
done
names=$(printf '%s\n' "${servers[@]}" | cut -d'|' -f1)
python3 - "$state" "$rounds" "$names" <<'PY'
import json, statistics, sys
state, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3].splitlines()
rows = []
for i, name in enumerate(names):
    runs = [json.load(open(f"{state}/{i}.{r}.json"))["steady"] for r in range(1, rounds + 1)]
    bad = sum(n for r in runs for k, n in r["status"].items() if not k.startswith("2"))
    rows.append((name, statistics.median(r["requests_per_second"] for r in runs),
                 statistics.median(r["latency"]["p50"] for r in runs),
                 statistics.median(r["latency"]["p99"] for r in runs), bad))
floor, wt = rows[0][1], rows[1][1]
print(f"{'server':28} {'req/s':>9} {'p50 us':>8} {'p99 us':>8} {'vs wasmtime':>12} {'vs floor':>9}")
for name, rps, p50, p99, bad in rows:
    note = f"  ({bad} non-2xx!)" if bad else ""
    print(f"{name:28} {rps:9.0f} {p50:8.0f} {p99:8.0f} {rps / wt:11.2f}x {rps / floor:8.2f}x{note}")
PY
