#!/usr/bin/env bash
# Load test: N users at once (default 200) against one ftpx server on this
# machine, over loopback, with files on tmpfs.
#
#   scripts/load.sh         # 200 users
#   scripts/load.sh 50      # fewer
#
# It builds ftpx (release), starts its own server in a new directory under
# /dev/shm with the shipped etc/ftpx.toml (only the session limits are raised
# when N needs more than they allow), and makes N users with `ftpx useradd`.
# Then, in two phases:
#
# 1. Idle sessions: N sessions log in and stay idle; the server's RSS with
#    them open, less its RSS before, divided by N, is the memory one idle
#    session costs. (Measured after the runtime's spare blocking threads have
#    retired, so that only what the sessions hold is counted.)
# 2. Transfers: N `ftpx connect` clients at once, each logging in, uploading
#    its own file of 2 to 4 MiB and downloading it again; every downloaded
#    file's BLAKE3 is checked against the original's (b3sum).
#
# It prints successes, failures, the median and 99th percentile of the
# per-client time, the server's peak RSS (VmHWM) during the transfers, and
# the memory per idle session. Every process it started is stopped at the
# end, and the directory removed (keep it with LOAD_KEEP=1).
set -euo pipefail

N=${1:-200}
if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: scripts/load.sh [N]   (N users at once, default 200)" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PASS=load-test-password-1

if ! command -v b3sum >/dev/null 2>&1; then
    echo "installing b3sum" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq b3sum >/dev/null
fi
command -v python3 >/dev/null 2>&1 || { echo "load.sh needs python3" >&2; exit 2; }

echo "building ftpx (release)" >&2
(cd "$ROOT" && cargo build --release --quiet)
FTPX="$ROOT/target/release/ftpx"

W=$(mktemp -d /dev/shm/ftpx-load.XXXXXX)
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ -z "${LOAD_KEEP:-}" ]; then rm -rf "$W"; else echo "kept $W" >&2; fi
}
trap cleanup EXIT

# --- server: the shipped settings; session limits raised only if N needs it --
mkdir -p "$W/server/etc"
cp "$ROOT/etc/ftpx.toml" "$W/server/etc/ftpx.toml"
if [ "$N" -gt 200 ]; then
    sed -i "s/^# max_sessions_per_ip = 200\$/max_sessions_per_ip = $N/" "$W/server/etc/ftpx.toml"
fi
if [ "$N" -gt 1000 ]; then
    sed -i "s/^# max_sessions = 1000\$/max_sessions = $N/" "$W/server/etc/ftpx.toml"
fi
(cd "$W/server" && exec "$FTPX" serve --listen 127.0.0.1:0 >"$W/server.out" 2>"$W/server.err") &
SERVER_PID=$!
PORT=
for _ in $(seq 600); do
    PORT=$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\)$/\1/p' "$W/server.out")
    [ -n "$PORT" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$W/server.err" >&2; exit 1; }
    sleep 0.1
done
[ -n "$PORT" ] || { echo "the server did not start" >&2; exit 1; }
echo "server pid $SERVER_PID on port $PORT in $W/server" >&2

# --- users and their files ---------------------------------------------------
echo "adding $N users (at the shipped password-hashing cost)" >&2
seq 0 $((N - 1)) | xargs -P "$(nproc)" -I{} sh -c \
    'cd "$1/server" && printf "%s\n" "$2" | "$3" useradd "user{}" --password-stdin >/dev/null' \
    _ "$W" "$PASS" "$FTPX"
echo "making $N files of 2 to 4 MiB" >&2
for i in $(seq 0 $((N - 1))); do
    mkdir -p "$W/clients/$i"
    head -c $(( (2 << 20) + (i % 3) * (1 << 20) + i * 4096 )) /dev/urandom >"$W/clients/$i/file.bin"
done

# --- the two phases ----------------------------------------------------------
python3 - "$FTPX" "$PORT" "$W" "$N" "$PASS" "$SERVER_PID" <<'EOF'
import os, socket, ssl, subprocess, sys, threading, time

ftpx, port, w, n, password, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], int(sys.argv[6])
ca = os.path.join(w, "server/certs/ca.pem")

def status_kib(key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise SystemExit(f"no {key} for the server")

def fds():
    return len(os.listdir(f"/proc/{pid}/fd"))

def mib(kib):
    return f"{kib / 1024:.1f} MiB"

# Phase 1: N idle sessions, logged in by hand over TLS (LOGIN only).
def idle_session(i, out):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["ftpx/1"])
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=300)
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        reader = tls.makefile("rb")
        if not reader.readline().startswith(b"220 "):
            raise RuntimeError("no greeting")
        tls.sendall(f'LOGIN user{i} "{password}"\n'.encode())
        reply = reader.readline()
        if not reply.startswith(b"230 "):
            raise RuntimeError(reply.decode(errors="replace").strip())
        out[i] = (tls, reader)
    except Exception as e:
        out[i] = e

time.sleep(1)
base_rss, base_fds = status_kib("VmRSS"), fds()
print(f"idle phase: {n} sessions log in at once", file=sys.stderr)
sessions = [None] * n
threads = [threading.Thread(target=idle_session, args=(i, sessions)) for i in range(n)]
for t in threads: t.start()
for t in threads: t.join()
failed = [s for s in sessions if isinstance(s, Exception)]
if failed:
    print(f"{len(failed)} idle sessions failed to log in, e.g. {failed[0]}", file=sys.stderr)
# The runtime keeps a spare blocking thread for 10 s after its last task.
time.sleep(11)
idle_rss = status_kib("VmRSS")
held = n - len(failed)
for s in sessions:
    if isinstance(s, tuple):
        tls, reader = s
        try:
            tls.sendall(b"QUIT\n")
            reader.readline()
        except OSError:
            pass
        tls.close()
deadline = time.time() + 30
while fds() > base_fds + 2 and time.time() < deadline:
    time.sleep(0.1)

# Phase 2: N real clients at once, each a put and a get of its own file.
try:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    peak_scope = "during the transfers"
except OSError:
    peak_scope = "since the server started"
print(f"transfer phase: {n} clients at once", file=sys.stderr)
log_path = os.path.join(w, "server/var/log/ftpx.log")
log_from = os.path.getsize(log_path)
env = dict(os.environ, FTPX_PASSWORD=password)
procs = []
for i in range(n):
    d = os.path.join(w, "clients", str(i))
    e = dict(env, FTPX_STATE_DIR=os.path.join(d, "state"))
    out = open(os.path.join(d, "out"), "wb")
    err = open(os.path.join(d, "err"), "wb")
    start = time.monotonic()
    p = subprocess.Popen([ftpx, "connect", f"user{i}@127.0.0.1:{port}", "--ca", ca,
                          "-c", "put file.bin; get file.bin back.bin"],
                         cwd=d, env=e, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
    procs.append((i, p, start, out, err))
times, codes = {}, {}
pending = list(procs)
while pending:
    still = []
    for i, p, start, out, err in pending:
        rc = p.poll()
        if rc is None:
            still.append((i, p, start, out, err))
        else:
            times[i], codes[i] = time.monotonic() - start, rc
            out.close(); err.close()
    pending = still
    time.sleep(0.02)
peak = status_kib("VmHWM")

def b3(paths):
    r = subprocess.run(["b3sum", "--no-names", *paths], capture_output=True, text=True)
    return r.stdout.split()

ok, failures = 0, []
for i in range(n):
    d = os.path.join(w, "clients", str(i))
    back = os.path.join(d, "back.bin")
    if codes[i] != 0:
        with open(os.path.join(d, "err"), errors="replace") as f:
            failures.append(f"user{i}: exit {codes[i]}: {f.read().strip()[-200:]}")
    elif not os.path.exists(back):
        failures.append(f"user{i}: no downloaded file")
    else:
        src, got = b3([os.path.join(d, "file.bin"), back])
        if src == got:
            ok += 1
        else:
            failures.append(f"user{i}: BLAKE3 {got} differs from the original's {src}")

def pct(values, p):
    v = sorted(values)
    return v[max(0, min(len(v) - 1, -(-len(v) * p // 100) - 1))]

# How long each login of the transfer phase took on the server (the queue
# for the password-hashing pool included), from its log.
logins = []
with open(log_path, errors="replace") as f:
    f.seek(log_from)
    for line in f:
        if " login " in line and 'result="ok"' in line:
            ms = [x for x in line.split() if x.startswith("ms=")]
            if ms:
                logins.append(int(ms[0][3:]) / 1000)

t = list(times.values())
print(f"N                        {n}")
print(f"successes                {ok}")
print(f"failures                 {len(failures)}")
for f in failures[:5]:
    print(f"  {f}")
print(f"per-client time p50      {pct(t, 50):.2f} s")
print(f"per-client time p99      {pct(t, 99):.2f} s   (max {max(t):.2f} s)")
if logins:
    print(f"login on the server p50  {pct(logins, 50):.2f} s, p99 {pct(logins, 99):.2f} s"
          f"   ({len(logins)} logins, hashing queue included)")
print(f"server peak RSS (VmHWM)  {mib(peak)} {peak_scope}")
per = (idle_rss - base_rss) / held if held else float("nan")
print(f"idle sessions            {held} held: RSS {mib(idle_rss)} vs {mib(base_rss)} before, "
      f"{per:.0f} KiB per idle session")
sys.exit(0 if not failures and not failed else 1)
EOF
