#!/usr/bin/env bash
# Durable functions in the shape of the published "HelloCities5" benchmark
# (Durable Functions' Netherite paper): orchestrations of 5 chained
# activities, here the `hello-cities` orchestrator and the `say-hello`
# activity of guests/durable (Rust, kelvin-sdk), on the durable store
# (SQLite in WAL, fsync'd group commit, the ledger on). In order:
#
#   latency: SAMPLES orchestrations one at a time (each started when the
#     last completed): start-to-completion (the instance's created and
#     last-updated times, the host's clock); per-step overhead from the
#     ledger: the time between one invocation's end and the next one's
#     start (episode -> activity -> episode: two hops per step).
#   throughput: ORCHESTRATIONS started at once over CONNECTIONS keep-alive
#     connections (events-load), run to completion: orchestrations/s and
#     events/s. Events as Durable Functions counts its work items: per
#     HelloCities5 orchestration the start, 5 activity calls and 5 results
#     (11), from the first start to the last completion.
#   fan-out: one `fan-out` orchestration of FAN activities (task_all):
#     start to completion, and how many episodes it took.
#
# Usage: benches/durable.sh   (ORCHESTRATIONS=2000 CONNECTIONS=64 SAMPLES=100 FAN=1000;
#   KELVIN=<binary> GUESTS=<dir of guest .wasm> to measure another build)
# Bounded: about 30 s after the builds.
set -euo pipefail
cd "$(dirname "$0")/.."
orchestrations=${ORCHESTRATIONS:-2000} conns=${CONNECTIONS:-64}
samples=${SAMPLES:-100} fan=${FAN:-1000}

. benches/common.sh
build_event_bench guest-durable
state=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null; rm -rf "$state"' EXIT
port=$((20000 + RANDOM % 20000))

cat > "$state/durable.toml" <<EOF
version = 1
name = "bench"
[server]
listen = "127.0.0.1:$port"
state_dir = "$state/state"
instance_slots = 256
[functions.hello-cities]
source = "$guests/hello_cities.wasm"
durable = "orchestrator"
max_concurrency = 64
[functions.say-hello]
source = "$guests/say_hello.wasm"
durable = "activity"
max_concurrency = 64
[functions.fan-out]
source = "$guests/fan_out.wasm"
durable = "orchestrator"
[functions.work]
source = "$guests/work.wasm"
durable = "activity"
max_concurrency = 64
EOF
# Precompiled, so the server measured compiles nothing.
"$kelvin" build -f "$state/durable.toml" > "$state/build.log" 2>&1 ||
  { cat "$state/build.log" >&2; exit 1; }
"$kelvin" up -f "$state/durable.toml" 2>>"$state/log" &
server=$!
wait_ready "http://127.0.0.1:$port/healthz" || { cat "$state/log" >&2; exit 1; }
key=$("$kelvin" keys list -f "$state/durable.toml" | awk '$1 == "master" { print $3 }')

python3 - "$port" "$key" "$state" "$orchestrations" "$conns" "$samples" "$fan" "$loader" <<'PY'
import json, socket, sqlite3, statistics, subprocess, sys, time

port, key, state = int(sys.argv[1]), sys.argv[2], sys.argv[3]
N, CONNS, SAMPLES, FAN = map(int, sys.argv[4:8])
loader = sys.argv[8]
API = "/runtime/webhooks/durabletask"
db = sqlite3.connect(f"file:{state}/state/ledger.sqlite3?mode=ro", uri=True, isolation_level=None)

def http(method, path, body=b""):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"{method} {path} HTTP/1.1\r\nhost: b\r\nx-kelvin-key: {key}\r\n"
              f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body or b"null")

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

def ended(iid):
    while True:
        status, s = http("GET", f"{API}/instances/{iid}")
        if s["runtimeStatus"] in ("Completed", "Failed", "Terminated"):
            assert s["runtimeStatus"] == "Completed", s
            return
        time.sleep(0.001)

def instance_times(ids):
    marks = ",".join("?" * len(ids))
    return db.execute(f"SELECT id, created_us, updated_us FROM durable_instances WHERE id IN ({marks})",
                      ids).fetchall()

rows = []
def row(name, value, goal=""):
    rows.append((name, value, goal))
    print(f"  {name}: {value}", file=sys.stderr)

# ---- latency: one at a time ----
ids = []
for i in range(SAMPLES):
    status, r = http("POST", f"{API}/orchestrators/hello-cities/lat-{i}")
    assert status == 202, r
    ended(r["id"])
    ids.append(r["id"])
times = instance_times(ids)
lat = [(u - c) / 1000 for _, c, u in times]
row("start to completion, one at a time (p50 / p99)", f"{pct(lat, 50):.2f} / {pct(lat, 99):.2f} ms")
hops, steps, to_activity, to_episode = [], [], [], []
for iid in ids:
    recs = db.execute(
        "SELECT i.started_unix_us, i.wall_us, i.trigger FROM invocations i "
        "JOIN invocation_instances t ON t.invocation_id = i.invocation_id "
        "WHERE t.instance_id = ? ORDER BY i.started_unix_us", (iid,)).fetchall()
    assert len(recs) == 11, (iid, len(recs))
    gaps = [recs[k + 1][0] - (recs[k][0] + recs[k][1]) for k in range(len(recs) - 1)]
    hops += gaps
    to_activity += gaps[0::2]
    to_episode += gaps[1::2]
    steps += [gaps[k] + gaps[k + 1] for k in range(0, len(gaps), 2)]
walls = db.execute(
    "SELECT i.trigger, i.wall_us FROM invocations i JOIN invocation_instances t "
    "ON t.invocation_id = i.invocation_id WHERE t.instance_id LIKE 'lat-%'").fetchall()
ep = [w for t, w in walls if t == "orchestration"]
act = [w for t, w in walls if t == "activity"]
row("step overhead: activity call to result in the next episode, minus the invocations (p50 / p99)",
    f"{pct(steps, 50) / 1000:.3f} / {pct(steps, 99) / 1000:.3f} ms", "p50 < 1 ms")
row("one hop: an invocation's end to the next one's start (p50 / p99)",
    f"{pct(hops, 50) / 1000:.3f} / {pct(hops, 99) / 1000:.3f} ms")
row("  of which episode -> activity / activity -> next episode (p50)",
    f"{pct(to_activity, 50) / 1000:.3f} / {pct(to_episode, 50) / 1000:.3f} ms")
row("an episode's invocation / an activity's (p50 wall)",
    f"{pct(ep, 50) / 1000:.3f} / {pct(act, 50) / 1000:.3f} ms")

# ---- throughput: N at once ----
t0 = time.time()
out = subprocess.run([loader, f"http://127.0.0.1:{port}{API}/orchestrators/hello-cities",
                      "--method", "POST", "--key", key, "-n", str(N), "-c", str(CONNS),
                      "--expect", "202"], check=True, capture_output=True, text=True).stdout
f = dict(kv.split("=", 1) for kv in out.split())
start_secs = (int(f["last_ok_ns"]) - int(f["start_ns"])) / 1e9
while True:
    # From the store itself, read-only: polling the API would cost the
    # server being measured.
    running, = db.execute("SELECT COUNT(*) FROM durable_instances "
                          "WHERE status IN ('Pending', 'Running')").fetchone()
    if running == 0:
        break
    if time.time() - t0 > 300:
        sys.exit("the orchestrations did not complete within 300 s")
    # Rarely: the times come from the store, and a poll costs the server.
    time.sleep(0.2)
first, last, failed = db.execute(
    "SELECT MIN(created_us), MAX(updated_us), SUM(status != 'Completed') FROM durable_instances "
    "WHERE name = 'hello-cities' AND id NOT LIKE 'lat-%'").fetchone()
assert failed == 0, f"{failed} orchestrations did not complete"
secs = (last - first) / 1e6
row(f"{N} HelloCities5 orchestrations: first start to last completion", f"{secs:.2f} s "
    f"(all {N} starts acknowledged in {start_secs:.2f} s)")
row("orchestrations/s", f"{N / secs:,.0f}")
row("events/s (11 per orchestration: start, 5 calls, 5 results)", f"{11 * N / secs:,.0f}", ">= 10,000")
row("invocations/s (6 episodes + 5 activities per orchestration)", f"{11 * N / secs:,.0f}")

# ---- a fan-out of FAN ----
status, r = http("POST", f"{API}/orchestrators/fan-out/fan", json.dumps({"n": FAN}).encode())
assert status == 202, r
ended("fan")
(_, c, u), = instance_times(["fan"])
status, h = http("GET", f"{API}/instances/fan?showHistory=true")
episodes = sum(1 for e in h["historyEvents"] if e["type"] == "OrchestratorStarted")
assert h["output"] == FAN * (FAN - 1), h["output"]
row(f"a fan-out of {FAN} activities (task_all): start to completion", f"{(u - c) / 1e6:.2f} s "
    f"in {episodes} episodes", "< 2 s")

print()
print("| measure | result | goal |")
print("|---|---|---|")
for name, value, goal in rows:
    print(f"| {name} | {value} | {goal} |")
PY
