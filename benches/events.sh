#!/usr/bin/env bash
# Event triggers on the durable store (SQLite, fsync'd group commit), with
# the no-op events guest (EVENTS_MODE=noop: it exits at once), so the host
# is measured, not the guest:
#
#   enqueue only: MESSAGES messages POSTed to /admin/queues/work/messages
#     over CONNECTIONS keep-alive HTTP/1.1 connections (python3 asyncio, one
#     request in flight per connection, retried if refused) to a server
#     where nothing consumes `work`: messages/s acknowledged (201).
#   drain: the server restarted with a consumer on `work` (batch_size 32,
#     new_batch_threshold 16): from the first invocation's start to the
#     queue's depth 0 (ledger rows and deletes commit together).
#   end to end: MESSAGES more, enqueued while the consumer runs: the
#     enqueue rate, and messages/s from the first POST to depth 0 with
#     MESSAGES `queue` records in the ledger; also MESSAGES / (last start -
#     first start), and the CPU split (server threads, client) over it.
#   enqueue to start: SAMPLES single messages ~20 ms apart on the idle
#     server: the invocation's started_unix_us (ledger) minus the client's
#     clock just before the POST, and minus the 201's arrival.
#   timer lateness: `ticker` runs every second ("* * * * * *"): its start
#     minus the whole second it was due, over TICKS idle ticks (and, apart,
#     the ticks that fell during the drain and end-to-end runs).
#   client ceiling: the same client against GET /healthz, to show it is not
#     what limits the enqueue rate.
#   fsync: a 4 KiB write + fsync in the state dir, the floor of a commit.
#
# Usage: benches/events.sh    (MESSAGES=20000 CONNECTIONS=64 SAMPLES=200 TICKS=10)
# Bounded: about a minute after the builds.
set -euo pipefail
cd "$(dirname "$0")/.."
messages=${MESSAGES:-20000} conns=${CONNECTIONS:-64}
samples=${SAMPLES:-200} ticks=${TICKS:-10}

. benches/common.sh
cargo build --quiet --release -p kelvin
cargo build --quiet --profile guest --target wasm32-wasip1 -p guest-events
kelvin=$PWD/target/release/kelvin
wasm=$PWD/target/wasm32-wasip1/guest/events.wasm
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
import asyncio, json, os, re, resource, socket, sqlite3, statistics, sys, time

phase, port, key, state, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
N, CONNS, SAMPLES, TICKS = map(int, sys.argv[6:10])
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

ENQUEUE = post_request("/admin/queues/work/messages", b'{"n":1}')
HEALTH = b"GET /healthz HTTP/1.1\r\nhost: bench\r\n\r\n"

# ---- the load client: CONNS connections, one request in flight each ----
class Load:
    def __init__(self, request, total, expect):
        self.request, self.total, self.expect = request, total, expect
        self.sent = self.ok = self.refused = 0
        self.first_error = None
        self.last_ok_ns = 0
        self.done = asyncio.get_running_loop().create_future()
        self.deadline = None

class Conn(asyncio.Protocol):
    def __init__(self, load):
        self.load, self.buf = load, b""
    def connection_made(self, transport):
        self.t = transport
        self.send()
    def send(self):
        l = self.load
        if l.sent >= l.total or (l.deadline and time.monotonic() > l.deadline):
            if l.ok + l.refused >= l.sent and not l.done.done():
                l.done.set_result(None)
            return
        l.sent += 1
        self.t.write(l.request)
    def data_received(self, data):
        self.buf += data
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i < 0:
                return
            head = self.buf[:i]
            m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            end = i + 4 + (int(m.group(1)) if m else 0)
            if len(self.buf) < end:
                return
            status, self.buf = head[9:12], self.buf[end:]
            l = self.load
            if status == l.expect:
                l.ok += 1
                l.last_ok_ns = time.time_ns()
            else:
                # Not enqueued: counted, and sent again.
                l.refused += 1
                l.sent -= 1
                l.first_error = l.first_error or head[:200]
            self.send()
    def connection_lost(self, exc):
        if not self.load.done.done():
            self.load.done.set_exception(ConnectionError(f"connection lost: {exc}"))

async def load(request, total, expect=b"201", seconds=None):
    loop = asyncio.get_running_loop()
    l = Load(request, total, expect)
    if seconds:
        l.deadline = time.monotonic() + seconds
    conns = []
    for _ in range(CONNS):
        t, _ = await loop.create_connection(lambda: Conn(l), "127.0.0.1", port)
        t.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(t)
    await l.done
    for t in conns:
        t.close()
    return l

def run_load(request, total, expect=b"201", seconds=None):
    start_ns = time.time_ns()
    c0 = resource.getrusage(resource.RUSAGE_SELF)
    l = asyncio.run(load(request, total, expect, seconds))
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = (c1.ru_utime - c0.ru_utime) + (c1.ru_stime - c0.ru_stime)
    return start_ns, l, client_cpu

# ---- the ledger and the queue, read-only (the server writes in WAL) ----
db = None
def q(sql, *args):
    global db
    if db is None:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    return db.execute(sql, args).fetchall()

def depth():
    return q("SELECT COUNT(*) FROM queue_messages WHERE queue = 'work'")[0][0]

def wait_depth0(timeout=120):
    end = time.monotonic() + timeout
    while depth() > 0:
        if time.monotonic() > end:
            sys.exit(f"the queue still holds {depth()} messages after {timeout} s")
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
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = open(f"/proc/{pid}/task/{tid}/stat").read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        f = stat[stat.rindex(")") + 2:].split()
        out[tid] = (name, (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK"))
    return out

def machine_busy():
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")

def own_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def watch():
    """Starts watching CPU use; call the result to end it and get a summary."""
    before, clock, busy0, own0 = threads(pid), time.monotonic(), machine_busy(), own_cpu()
    def done():
        wall = time.monotonic() - clock
        split = cpu_split(before, threads(pid), wall)
        server = sum(p for _, p in split)
        client = (own_cpu() - own0) / wall * 100
        others = (machine_busy() - busy0) / wall * 100 - server - client
        return (f"{wall:.2f} s, 100% = one core of {os.cpu_count()}: server {server:.0f}% ("
                + ", ".join(f"{n} {p:.0f}%" for n, p in split[:4] if p >= 0.5)
                + f"), client {client:.0f}%, other processes {max(others, 0):.0f}%")
    return done

def cpu_split(before, after, wall):
    by = {}
    for tid, (name, t) in after.items():
        name = re.sub(r"[-_ ]?\d+$", "", name)
        by[name] = by.get(name, 0) + t - before.get(tid, (name, 0))[1]
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
    t0, l, ccpu = run_load(ENQUEUE, N)
    cpu = cpu()
    secs = (l.last_ok_ns - t0) / 1e9
    row("enqueue only (no consumer)", f"{N / secs:,.0f} msg/s",
        f"{N} acked in {secs:.2f} s, client CPU {ccpu / secs * 100:.0f}%")
    note(f"CPU over the enqueue-only run: {cpu}")
    if l.refused:
        note(f"enqueue only: {l.refused} refused and resent; first: {l.first_error!r}")
    assert depth() == N, (depth(), N)

def run():
    # ---- 1b. drain what the fill left (the server just started) ----
    end_ns = wait_depth0()
    used = cpu_split({}, threads(pid), 100)  # seconds, not %
    recs = queue_records(0)
    assert len(recs) == N, (len(recs), N)
    first = recs[0][0]
    secs = (end_ns / 1e3 - first) / 1e6
    row("drain (pre-enqueued)", f"{N / secs:,.0f} msg/s", f"first start to depth 0: {secs:.2f} s")
    not_ok(recs, "drain")
    note(f"CPU of the server from its start to the drained queue ({secs:.2f} s drain): "
         + ", ".join(f"{n} {t:.2f} s" for n, t in used[:4] if t >= 0.005))
    busy_ticks = ticker(first, end_ns // 1000)

    # ---- 2. enqueue to start, idle: one message at a time ----
    idle_from = time.time_ns() // 1000
    time.sleep(0.5)
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rf = s.makefile("rb")
    to_start, ack_to_start = [], []
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
    s.close()
    row("enqueue->start p50/p99/max", ms3(to_start), "t0 before the POST; goal: p50 < 2 ms")
    row("201->start p50/p99/max", ms3(ack_to_start), "< 0: started before the 201 arrived")

    # ---- 3. timer lateness, idle: the ticks since the drain ----
    while len(ticker(idle_from, 1 << 62)) < TICKS:
        time.sleep(0.2)
    idle = [late(t) for t in ticker(idle_from, time.time_ns() // 1000)]
    row("timer lateness idle p50/max", f"{statistics.median(idle) / 1e3:.2f} / {max(idle) / 1e3:.2f} ms",
        f"{len(idle)} ticks; goal: within 50 ms")

    # ---- 1c. end to end: enqueued while the consumer runs ----
    cpu = watch()
    t0, l, ccpu = run_load(ENQUEUE, N)
    enq_secs = (l.last_ok_ns - t0) / 1e9
    end_ns = wait_depth0()
    cpu = cpu()
    recs = queue_records(t0 // 1000)
    assert len(recs) == N, (len(recs), N)
    work = next(x for x in json.loads(http("GET", "/admin/queues"))["queues"] if x["name"] == "work")
    assert work["depth"] == 0, work
    e2e = (end_ns - t0) / 1e9
    row("e2e: enqueue rate", f"{N / enq_secs:,.0f} msg/s",
        f"{N} acked in {enq_secs:.2f} s, client CPU {ccpu / enq_secs * 100:.0f}%")
    row("e2e: first POST to depth 0", f"{N / e2e:,.0f} msg/s", f"{e2e:.2f} s; goal: >= 5,000 msg/s")
    row("e2e: processing (first to last start)", f"{N / ((recs[-1][0] - recs[0][0]) / 1e6):,.0f} msg/s",
        f"invocation wall p50 {statistics.median(r[1] for r in recs)} us")
    if l.refused:
        note(f"end to end: {l.refused} refused and resent; first: {l.first_error!r}")
    not_ok(recs, "end to end")
    busy = [late(t) for t in busy_ticks + ticker(t0 // 1000, end_ns // 1000)]
    if busy:
        row("timer lateness loaded p50/max", f"{statistics.median(busy) / 1e3:.2f} / {max(busy) / 1e3:.2f} ms",
            f"{len(busy)} ticks during the drain and e2e runs")
    note(f"CPU over the e2e run: {cpu}")

    # ---- the client's ceiling: the same client, GET /healthz, 2 s ----
    t0, l, ccpu = run_load(HEALTH, 1 << 40, b"200", seconds=2)
    secs = (l.last_ok_ns - t0) / 1e9
    row("client ceiling (GET /healthz)", f"{l.ok / secs:,.0f} req/s", f"client CPU {ccpu / secs * 100:.0f}%")

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
python3 "$state/events.py" fill "$port" "$key" "$state" "$server" "$messages" "$conns" "$samples" "$ticks"
stop_server
start "$state/events.toml"
python3 "$state/events.py" run "$port" "$key" "$state" "$server" "$messages" "$conns" "$samples" "$ticks"
stop_server
python3 "$state/events.py" table "$port" "$key" "$state" 0 "$messages" "$conns" "$samples" "$ticks"
echo; echo "command: MESSAGES=$messages CONNECTIONS=$conns SAMPLES=$samples TICKS=$ticks benches/events.sh"
