#!/usr/bin/env bash
# A large real component, the Python guest (componentize-py, 19 MB), under
# Kelvin and under `wasmtime serve`: the first response after the server is
# started, with and without a compiled artifact, and warm requests.
#
#   first response: from starting the server process to the first 200 of
#   GET /predict (the client retries until the port answers), and that
#   first request alone (from the connection the server accepted). Kelvin:
#     - fresh state, tiering on (the default): Winch's code answers while
#       Cranelift compiles in the background;
#     - fresh state, tiering off (KELVIN_TUNING=tiering=off): the request
#       waits for Cranelift;
#     - restarted, artifact cached (`kelvin build` before): cold from cache.
#   wasmtime serve compiles before it listens (from the .wasm, with its own
#   compile cache off: -C cache=n), or loads a `wasmtime compile`d .cwasm
#   (--allow-precompiled).
#   warm: `kelvin bench http --url` against each server, GET /predict.
#   Plus `kelvin bench cold-start predict`: the load phases in process.
#
# Usage: benches/large.sh    (ROUNDS=3 CONNECTIONS=1 DURATION=3s)
# Needs wasmtime 48 on PATH or in $WASMTIME (see benches/compare.sh).
# Bounded: about ROUNDS x 25 s for the first responses, plus the warm runs.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3} conns=${CONNECTIONS:-1} dur=${DURATION:-3s}
wasmtime=${WASMTIME:-$(command -v wasmtime || true)}
if [ -z "$wasmtime" ] || ! [ -x "$wasmtime" ]; then
  echo "large.sh needs wasmtime 48: cargo install wasmtime-cli --version 48.0.8 --locked," >&2
  echo "or point WASMTIME at a wasmtime binary." >&2
  exit 2
fi

. benches/common.sh
build_predict
state=$(mktemp -d)
trap 'rm -rf "$state"' EXIT
port=$((20000 + RANDOM % 20000))
url="http://127.0.0.1:$port/predict"
cat > "$state/functions.toml" <<EOF
version = 1
name = "large"
[server]
state_dir = "state"
[functions.predict]
source = "$wasm"
[[functions.predict.http]]
route = "/predict"
auth = "anonymous"
EOF
"$wasmtime" compile "$wasm" -o "$state/predict.cwasm"

# first ENV... -- CMD...: milliseconds from spawn to the first 200, and of
# the first request alone (sent once a connection is accepted).
first() {
  python3 - "$url" "$@" <<'PY'
import os, socket, subprocess, sys, time, urllib.parse
url, args = sys.argv[1], sys.argv[2:]
sep = args.index("--")
env = dict(os.environ, **dict(a.split("=", 1) for a in args[:sep]))
u = urllib.parse.urlparse(url)
request = f"GET {u.path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode()
start = time.perf_counter()
p = subprocess.Popen(args[sep + 1:], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    while True:
        if p.poll() is not None:
            sys.exit("the server exited")
        try:
            s = socket.create_connection((u.hostname, u.port))
            break
        except OSError:
            time.sleep(0.001)
    sent = time.perf_counter()
    s.sendall(request)
    reply = b""
    while chunk := s.recv(65536):
        reply += chunk
    done = time.perf_counter()
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    print(f"{(done - start) * 1000:.1f}\t{(done - sent) * 1000:.1f}")
finally:
    p.terminate(); p.wait()
PY
}

fresh() { rm -rf "$state/state"; }
cached() { rm -rf "$state/state"; "$kelvin" build -f "$state/functions.toml" > /dev/null 2>&1; }
serve=("$wasmtime" serve -S cli=y -O pooling-allocator=y --addr "127.0.0.1:$port")
scenarios=(
  "kelvin, no artifact, tiering on|fresh|-- $kelvin up -f $state/functions.toml --listen 127.0.0.1:$port"
  "kelvin, no artifact, tiering off|fresh|KELVIN_TUNING=tiering=off -- $kelvin up -f $state/functions.toml --listen 127.0.0.1:$port"
  "kelvin, artifact cached (restart)|cached|-- $kelvin up -f $state/functions.toml --listen 127.0.0.1:$port"
  "wasmtime serve, from .wasm|true|-- ${serve[*]} -C cache=n $wasm"
  "wasmtime serve, from .cwasm|true|-- ${serve[*]} --allow-precompiled $state/predict.cwasm"
)
echo "$("$wasmtime" --version); $(nproc) cores; $rounds rounds"
: > "$state/first.tsv"
for round in $(seq "$rounds"); do
  for s in "${scenarios[@]}"; do
    IFS='|' read -r name prep cmd <<< "$s"
    $prep
    # shellcheck disable=SC2086
    ms=$(first $cmd)
    printf '%s\t%s\n' "$name" "$ms" >> "$state/first.tsv"
    sleep 0.5
  done
done
python3 - "$state/first.tsv" <<'PY'
import statistics, sys, collections
runs = collections.OrderedDict()
for line in open(sys.argv[1]):
    name, total, alone = line.rstrip("\n").split("\t")
    runs.setdefault(name, []).append((float(total), float(alone)))
print(f"\n{'medians, ms':38} {'start to 1st response':>22} {'1st request alone':>18}")
for name, xs in runs.items():
    total = statistics.median(t for t, _ in xs)
    alone = statistics.median(a for _, a in xs)
    print(f"{name:38} {total:22.1f} {alone:18.1f}")
PY

echo; echo "warm: GET /predict, $conns connection(s), $dur"
cached
for s in "kelvin|$kelvin up -f $state/functions.toml --listen 127.0.0.1:$port" \
         "wasmtime serve|${serve[*]} --allow-precompiled $state/predict.cwasm"; do
  IFS='|' read -r name cmd <<< "$s"
  $cmd > /dev/null 2>&1 &
  pid=$!
  for _ in $(seq 200); do curl -fs "$url" > /dev/null 2>&1 && break; sleep 0.05; done
  echo "== $name"
  "$kelvin" bench http --url "$url" -c "$conns" -d "$dur" --warmup 1s | grep -E "steady|throughput"
  kill "$pid"; wait "$pid" 2>/dev/null || true
  sleep 0.5
done

echo; echo "in process: kelvin bench cold-start predict -n 5"
"$kelvin" bench cold-start predict -n 5 -f "$state/functions.toml"
