#!/usr/bin/env bash
# Event triggers on the durable store (SQLite in WAL, fsync'd group commit),
# with the no-op events guest (EVENTS_MODE=noop: it exits at once), so the
# host is measured, not the guest. In order:
#
#   fsync: a 4 KiB write + fsync in the state dir (the floor of a commit).
#   enqueue only: MESSAGES messages POSTed to /admin/queues/work/messages
#     over CONNECTIONS keep-alive HTTP/1.1 connections (events-load,
#     benches/src/events_load.rs: hyper on one thread, one request in
#     flight per connection, sent again if refused) to a server where
#     nothing consumes `work`: messages/s acknowledged (201).
#   drain: the server restarted with a consumer on `work` (batch_size 32,
#     new_batch_threshold 16): MESSAGES / (first invocation's start to the
#     queue's depth 0); ledger rows and deletes commit together.
#   enqueue to start: SAMPLES single messages ~20 ms apart on the quiet
#     server: the invocation's started_unix_us (ledger) minus the client's
#     clock just before the POST, split at the 201's arrival.
#   timer lateness: `ticker` runs every second ("* * * * * *"): its start
#     minus the whole second it was due, over the TICKS (at least) ticks
#     since the drain; apart, the ticks during the drain and end to end.
#   end to end: MESSAGES more, enqueued while the consumer runs: the
#     enqueue rate; MESSAGES / (first POST to depth 0 with MESSAGES `queue`
#     records in the ledger); MESSAGES / (first to last start); how fast
#     invocations started while the POSTs went on, and after.
#   client ceiling: the same client, GET /healthz for 2 s: what it and the
#     HTTP stack reach without the store.
#   Notes: the CPU split over each load (per server thread, the client,
#   other processes: other work on the machine skews every number here),
#   and where the group-commit writer thread's time went.
#
# Usage: benches/events.sh    (MESSAGES=20000 CONNECTIONS=256 SAMPLES=200 TICKS=10;
#   KELVIN=<binary> GUESTS=<dir of guest .wasm> to measure another build)
# Bounded: about 20 s after the builds.
set -euo pipefail
cd "$(dirname "$0")/.."
messages=${MESSAGES:-20000} conns=${CONNECTIONS:-256}
samples=${SAMPLES:-200} ticks=${TICKS:-10}

. benches/common.sh
build_event_bench guest-events
wasm=$guests/events.wasm
state=$(mktemp -d)
server=
stop_server() {
  if [ -n "$server" ]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=
  fi
}
trap 'stop_server; rm -rf "$state"' EXIT
port=$((20000 + RANDOM % 20000))

# fill.toml declares `work` (an output names it) but nothing consumes it;
# events.toml consumes it, and runs `ticker` every second. Same state.
head="version = 1
name = \"bench\"
[server]
listen = \"127.0.0.1:$port\"
state_dir = \"$state/state\"
instance_slots = 64"
cat > "$state/fill.toml" <<EOF
$head
[functions.noop]
source = "$wasm"
env = { EVENTS_MODE = "noop" }
[[functions.noop.output]]
name = "out"
queue = "work"
EOF
cat > "$state/events.toml" <<EOF
$head
[functions.noop]
source = "$wasm"
env = { EVENTS_MODE = "noop" }
max_concurrency = 64
[[functions.noop.queue_trigger]]
name = "work"
batch_size = 32
new_batch_threshold = 16
[functions.ticker]
source = "$wasm"
env = { EVENTS_MODE = "noop" }
[[functions.ticker.timer]]
schedule = "* * * * * *"
EOF
# Precompiled, so no server here compiles anything.
"$kelvin" build -f "$state/events.toml" > "$state/build.log" 2>&1 ||
  { cat "$state/build.log" >&2; exit 1; }

# start MANIFEST: serves it in the background ($server), once ready.
start() {
  "$kelvin" up -f "$1" 2>>"$state/log" &
  server=$!
  wait_ready "http://127.0.0.1:$port/healthz" || { cat "$state/log" >&2; exit 1; }
}

cat > "$state/events.py" <<'PY'
import json, os, re, resource, socket, sqlite3, statistics, subprocess, sys, time

phase, port, key, state, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
N, CONNS, SAMPLES, TICKS = map(int, sys.argv[6:10])
loader = sys.argv[10]
db_path = f"{state}/state/ledger.sqlite3"

# Rows and notes for the table, kept across the two phases.
def row(name, value, goal=""):
    with open(f"{state}/results.jsonl", "a") as f:
        f.write(json.dumps(["row", name, value, goal]) + "\n")

def note(text):
    with open(f"{state}/results.jsonl", "a") as f:
        f.write(json.dumps(["note", text]) + "\n")

def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]

def post_request(path, body=b"x"):
    return (f"POST {path} HTTP/1.1\r\nhost: bench\r\nx-kelvin-key: {key}\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body

QUEUE = "/admin/queues/work/messages"
ENQUEUE = post_request(QUEUE, b'{"n":1}')

class Load:
    """What a run of the load client (target/release/events-load) did."""
    def __init__(self, out, cpu):
        f = dict(kv.split("=", 1) for kv in out.split())
        self.ok, self.refused = int(f["ok"]), int(f["refused"])
        self.start_ns, self.last_ok_ns = int(f["start_ns"]), int(f["last_ok_ns"])
        self.first_refusal, self.cpu = f["first_refusal"], cpu
        self.secs = (self.last_ok_ns - self.start_ns) / 1e9

def run_load(path, total=None, method="POST", expect=201, seconds=None):
    """CONNS keep-alive connections, one request in flight on each."""
    cmd = [loader, f"http://127.0.0.1:{port}{path}", "--method", method, "--key", key,
           "-c", str(CONNS), "--expect", str(expect)]
    if method == "POST":
        cmd += ["--body", '{"n":1}']
    if total:
        cmd += ["-n", str(total)]
    if seconds:
        cmd += ["--seconds", str(seconds)]
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    l = Load(out, (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime))
    if l.refused:
        note(f"{method} {path}: {l.refused} refused and sent again; first: {l.first_refusal}")
    return l

# ---- the ledger and the queue, read-only (the server writes in WAL) ----
db = None
def q(sql, *args):
    global db
    if db is None:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    return db.execute(sql, args).fetchall()

def depth():
    return q("SELECT COUNT(*) FROM queue_messages WHERE queue = 'work'")[0][0]

def wait_depth0(timeout=60):
    end = time.monotonic() + timeout
    while depth() > 0:
        if time.monotonic() > end or not os.path.exists(f"/proc/{pid}"):
            sys.exit(f"the queue still holds {depth()} messages (server gone, or {timeout} s passed)")
        time.sleep(0.005)
    return time.time_ns()

def queue_records(since_us, until_us=1 << 62):
    return q("SELECT started_unix_us, wall_us, outcome FROM invocations WHERE function = 'noop'"
             " AND trigger = 'queue' AND started_unix_us >= ? AND started_unix_us < ?"
             " ORDER BY started_unix_us", since_us, until_us)

def http(method, path):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"{method} {path} HTTP/1.1\r\nhost: b\r\nx-kelvin-key: {key}\r\n"
              "connection: close\r\ncontent-length: 0\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return data.split(b"\r\n\r\n", 1)[1]

# ---- server CPU, per thread (from /proc) ----
def threads(pid):
    """Per thread of the server: its name, seconds on a CPU and seconds
    runnable but waiting for one (/proc/PID/task/TID/schedstat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name = open(f"/proc/{pid}/task/{tid}/comm").read().strip()
            run, wait = open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[:2]
        except OSError:
            continue
        out[tid] = (name, int(run) / 1e9, int(wait) / 1e9)
    return out

def writer(before, after, wall):
    """Where the group-commit writer thread's time went."""
    run = wait = 0
    for tid, (name, r, w) in after.items():
        if name == "kelvin-ledger":
            _, r0, w0 = before.get(tid, (name, 0, 0))
            run, wait = r - r0, w - w0
    return (f"the writer (kelvin-ledger) ran {run / wall * 100:.0f}%, waited for a core "
            f"{wait / wall * 100:.0f}%, was off CPU (fsync, or no work) {max(wall - run - wait, 0) / wall * 100:.0f}%")

def machine_busy():
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")

def own_cpu():
    """This script's CPU and its finished children's (the load client)."""
    return sum(r.ru_utime + r.ru_stime for r in
               (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))

def watch():
    """Starts watching CPU use; call the result to end it and get a summary."""
    before, clock, busy0, own0 = threads(pid), time.monotonic(), machine_busy(), own_cpu()
    def done():
        wall = time.monotonic() - clock
        after = threads(pid)
        split = cpu_split(before, after, wall)
        server = sum(p for _, p in split)
        client = (own_cpu() - own0) / wall * 100
        others = (machine_busy() - busy0) / wall * 100 - server - client
        return (f"{wall:.2f} s, 100% = one core of {os.cpu_count()}: server {server:.0f}% ("
                + ", ".join(f"{n} {p:.0f}%" for n, p in split[:4] if p >= 0.5)
                + f"), client {client:.0f}%, other processes {max(others, 0):.0f}%; "
                + writer(before, after, wall))
    return done

def cpu_split(before, after, wall):
    by = {}
    for tid, (name, t, _) in after.items():
        name = re.sub(r"[-_ ]?\d+$", "", name)
        by[name] = by.get(name, 0) + t - before.get(tid, (name, 0, 0))[1]
    return sorted(((n, t / wall * 100) for n, t in by.items() if t > 0), key=lambda x: -x[1])

def ticker(since_us, until_us):
    return [r[0] for r in q("SELECT started_unix_us FROM invocations WHERE function = 'ticker'"
                            " AND started_unix_us >= ? AND started_unix_us < ?", since_us, until_us)]

# Signed distance to the nearest whole second (a per-second tick is due on one).
def late(us):
    return ((us + 500_000) % 1_000_000) - 500_000

def ms3(xs):
    return " / ".join(f"{pct(xs, p) / 1e3:.2f}" for p in (50, 99, 100)) + " ms"

def not_ok(recs, what):
    bad = sum(1 for r in recs if r[2] != "ok")
    if bad:
        note(f"{what}: {bad} records not ok")

def fill():
    """fsync floor; 1a. enqueue with nothing consuming `work`."""
    fd = os.open(f"{state}/fsync.probe", os.O_WRONLY | os.O_CREAT)
    lat = []
    for i in range(50):
        os.pwrite(fd, os.urandom(4096), 4096 * i)
        t = time.perf_counter()
        os.fsync(fd)
        lat.append((time.perf_counter() - t) * 1e3)
    os.close(fd)
    row("fsync 4 KiB p50/p99/max", " / ".join(f"{pct(lat, p):.2f}" for p in (50, 99, 100)) + " ms",
        "the floor of one group commit")

    cpu = watch()
    l = run_load(QUEUE, N)
    cpu = cpu()
    row("enqueue only (no consumer)", f"{N / l.secs:,.0f} msg/s",
        f"{N} acked in {l.secs:.2f} s, client CPU {l.cpu / l.secs * 100:.0f}%")
    note(f"CPU over the enqueue-only run: {cpu}")
    assert depth() == N, (depth(), N)

def run():
    # ---- 1b. drain what the fill left (the server just started) ----
    cpu, watched_from = watch(), time.time_ns() // 1000
    end_ns = wait_depth0()
    cpu = cpu()
    recs = queue_records(0)
    assert len(recs) == N, (len(recs), N)
    first = recs[0][0]
    secs = (end_ns / 1e3 - first) / 1e6
    row("drain (pre-enqueued)", f"{N / secs:,.0f} msg/s", f"first start to depth 0: {secs:.2f} s")
    not_ok(recs, "drain")
    note(f"CPU over the drain, from {(watched_from - first) / 1e3:.0f} ms after it began: {cpu}")
    busy_ticks = ticker(first, end_ns // 1000)

    # ---- 2. enqueue to start, idle: one message at a time ----
    idle_from = time.time_ns() // 1000
    time.sleep(0.5)
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rf = s.makefile("rb")
    to_start, ack_to_start, to_ack = [], [], []
    prev = q("SELECT COALESCE(MAX(started_unix_us), 0) FROM invocations WHERE function = 'noop'")[0][0]
    for i in range(SAMPLES):
        t_send = time.time_ns()
        s.sendall(ENQUEUE)
        status = rf.readline()
        length = 0
        while (line := rf.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        rf.read(length)
        t_ack = time.time_ns()
        assert status.startswith(b"HTTP/1.1 201"), status
        time.sleep(0.02)
        deadline = time.monotonic() + 5
        while True:
            new = q("SELECT started_unix_us FROM invocations WHERE function = 'noop'"
                    " AND trigger = 'queue' AND started_unix_us > ?", prev)
            if new or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        assert len(new) == 1, f"sample {i}: {len(new)} new records"
        prev = new[0][0]
        to_start.append(prev - t_send / 1e3)
        ack_to_start.append(prev - t_ack / 1e3)
        to_ack.append((t_ack - t_send) / 1e3)
    s.close()
    row("enqueue->start p50/p99/max", ms3(to_start), "t0 before the POST; goal: p50 < 2 ms")
    row("  POST->201 p50/p99/max", ms3(to_ack), "the enqueue's commit and the HTTP round trip")
    row("  201->start p50/p99/max", ms3(ack_to_start), "< 0: started before the 201 arrived")

    # ---- 3. timer lateness, idle: the ticks since the drain ----
    while len(ticker(idle_from, 1 << 62)) < TICKS:
        time.sleep(0.2)
    idle = [late(t) for t in ticker(idle_from, time.time_ns() // 1000)]
    row("timer lateness idle p50/max", f"{statistics.median(idle) / 1e3:.2f} / {max(idle) / 1e3:.2f} ms",
        f"{len(idle)} ticks; goal: within 50 ms")

    # ---- 1c. end to end: enqueued while the consumer runs ----
    cpu = watch()
    l = run_load(QUEUE, N)
    t0 = l.start_ns
    end_ns = wait_depth0()
    cpu = cpu()
    recs = queue_records(t0 // 1000)
    assert len(recs) == N, (len(recs), N)
    work = next(x for x in json.loads(http("GET", "/admin/queues"))["queues"] if x["name"] == "work")
    assert work["depth"] == 0, work
    e2e = (end_ns - t0) / 1e9
    row("e2e: enqueue rate", f"{N / l.secs:,.0f} msg/s",
        f"{N} acked in {l.secs:.2f} s, client CPU {l.cpu / l.secs * 100:.0f}%")
    row("e2e: first POST to depth 0", f"{N / e2e:,.0f} msg/s", f"{e2e:.2f} s; goal: >= 5,000 msg/s")
    row("e2e: processing (first to last start)", f"{N / ((recs[-1][0] - recs[0][0]) / 1e6):,.0f} msg/s",
        f"invocation wall p50 {statistics.median(r[1] for r in recs)} us")
    during = sum(1 for r in recs if r[0] <= l.last_ok_ns // 1000)
    row("  started while / after enqueueing", f"{during / l.secs:,.0f} / {(N - during) / ((end_ns - l.last_ok_ns) / 1e9):,.0f} msg/s",
        f"{during} started before the last 201, {N - during} after")
    not_ok(recs, "end to end")
    busy = [late(t) for t in busy_ticks + ticker(t0 // 1000, end_ns // 1000)]
    if busy:
        row("timer lateness loaded p50/max", f"{statistics.median(busy) / 1e3:.2f} / {max(busy) / 1e3:.2f} ms",
            f"{len(busy)} ticks during the drain and e2e runs")
    note(f"CPU over the e2e run: {cpu}")

    # ---- the client's ceiling: the same client, GET /healthz, 2 s ----
    l = run_load("/healthz", method="GET", expect=200, seconds=2)
    row("client ceiling (GET /healthz)", f"{l.ok / l.secs:,.0f} req/s", f"client CPU {l.cpu / l.secs * 100:.0f}%")

def table():
    print(f"\nevents: {N} messages, {CONNS} connections, {SAMPLES} samples, {os.cpu_count()} cores, "
          f"load average {open('/proc/loadavg').read().split()[0]}")
    print(f"{'measurement':<38} {'value':>24}   notes")
    notes = []
    for line in open(f"{state}/results.jsonl"):
        kind, *rest = json.loads(line)
        if kind == "row":
            print(f"{rest[0]:<38} {rest[1]:>24}   {rest[2]}")
        else:
            notes.append(rest[0])
    for n in notes:
        print("note:", n)

{"fill": fill, "run": run, "table": table}[phase]()
PY

# The load: fill a queue nothing consumes, then restart with the consumer.
start "$state/fill.toml"
key=$("$kelvin" keys list -f "$state/events.toml" | awk '$1 == "master" {print $3}')
python3 "$state/events.py" fill "$port" "$key" "$state" "$server" "$messages" "$conns" "$samples" "$ticks" "$loader"
stop_server
start "$state/events.toml"
python3 "$state/events.py" run "$port" "$key" "$state" "$server" "$messages" "$conns" "$samples" "$ticks" "$loader"
stop_server
python3 "$state/events.py" table "$port" "$key" "$state" 0 "$messages" "$conns" "$samples" "$ticks" "$loader"
echo; echo "command: MESSAGES=$messages CONNECTIONS=$conns SAMPLES=$samples TICKS=$ticks benches/events.sh"
