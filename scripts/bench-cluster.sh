#!/usr/bin/env bash
# Several nodes against one: a login burst and a small-file `put -r`, on a
# single node without a database, on one node of a cluster, and spread over
# two nodes of a cluster that share one var_dir and one PostgreSQL database
# (a throwaway server started by scripts/pg-test.sh). On loopback, files on
# tmpfs. All nodes run on this machine: two nodes share its cores, so the
# rows show what the database costs and what a second node adds on the same
# cores, not what a second machine would add.
#
#   scripts/bench-cluster.sh
#   BENCH_REPEAT=1 BENCH_BURST=50 BENCH_SMALL_FILES=400 scripts/bench-cluster.sh   # a quick look
#
# Settings (environment): BENCH_REPEAT (3), BENCH_BURST (200 logins at once),
# BENCH_SMALL_FILES (2000 files of 16 KiB, uploaded as two halves by two
# clients at once), BENCH_DIR (a new directory under /dev/shm).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPEAT=${BENCH_REPEAT:-3}
BURST=${BENCH_BURST:-200}
SMALL=${BENCH_SMALL_FILES:-2000}
PASS=bench-password-1

command -v python3 >/dev/null || { echo "bench-cluster.sh needs python3" >&2; exit 2; }
echo "building ftpx (release)" >&2
(cd "$ROOT" && cargo build --release --quiet)
FTPX="$ROOT/target/release/ftpx"

W=${BENCH_DIR:-$(mktemp -d /dev/shm/ftpx-cluster.XXXXXX)}
mkdir -p "$W"
chmod 755 "$W"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    "$ROOT/scripts/pg-test.sh" stop "$W/pg" || true
    [ -z "${BENCH_KEEP:-}" ] && rm -rf "$W"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "starting PostgreSQL" >&2
ADMIN_URL=$("$ROOT/scripts/pg-test.sh" start "$W/pg" "$(free_port)")

echo "making test data in $W" >&2
python3 - "$W/small" "$SMALL" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    half = os.path.join(d, f"h{i % 2}", f"d{i % 20:02d}")
    os.makedirs(half, exist_ok=True)
    with open(os.path.join(half, f"f{i:05d}.bin"), "wb") as f:
        f.write(os.urandom(16384))
EOF
"$FTPX" gen-cert --dir "$W/certs" >/dev/null

# setup NAME DATABASE NODES: a service of NODES nodes (DATABASE empty: a
# single node without one), each in $W/NAME/nodeK, printing their ports.
setup() {
    local name=$1 db=$2 nodes=$3 cluster=""
    if [ -n "$db" ]; then
        psql -q "$ADMIN_URL" -c "CREATE DATABASE $db"
        cluster="[cluster]
database = \"${ADMIN_URL%/*}/$db\""
    fi
    local ports=()
    for k in $(seq 0 $((nodes - 1))); do
        local d=$W/$name/node$k
        mkdir -p "$d/etc"
        cat > "$d/etc/ftpx.toml" <<EOF
[server]
log_level = "warn"
var_dir = "$W/$name/var"
cert_dir = "$W/certs"
control_socket = ""
[limits]
max_sessions_per_ip = 1000
$cluster
EOF
        if [ "$k" = 0 ]; then
            (cd "$d" && echo "$PASS" | "$FTPX" useradd bench --quota 1TiB --password-stdin >/dev/null)
        fi
        (cd "$d" && exec "$FTPX" serve --listen 127.0.0.1:0 > "$d/out" 2> "$d/err") &
        PIDS+=("$!")
        for _ in $(seq 100); do grep -q listening "$d/out" 2>/dev/null && break; sleep 0.1; done
        ports+=("$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$d/out")")
    done
    echo "${ports[*]}"
}

# measure NAME PORTS...: the login burst and the two-half put -r, spread
# round-robin over the ports; one line of results per round.
measure() {
    local name=$1; shift
    python3 - "$FTPX" "$W" "$BURST" "$REPEAT" "$name" "$@" <<'EOF' >> "$W/results"
import subprocess, sys, time, statistics, concurrent.futures as cf, os
ftpx, w, burst, repeat, name, *ports = sys.argv[1:]
burst, repeat = int(burst), int(repeat)
env = dict(os.environ, FTPX_PASSWORD="bench-password-1", FTPX_STATE_DIR=f"{w}/client-{name}")
def connect(port, cmds):
    return subprocess.run([ftpx, "connect", f"bench@127.0.0.1:{port}", "--ca", f"{w}/certs/ca.pem",
                           "--timeout", "300", "-c", cmds], cwd=w, env=env, capture_output=True)
for r in range(repeat):
    def one(i):
        t = time.monotonic()
        rc = connect(ports[i % len(ports)], "pwd").returncode
        return time.monotonic() - t, rc
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(burst) as ex:
        res = list(ex.map(one, range(burst)))
    wall = time.monotonic() - t0
    times = sorted(t for t, _ in res)
    ok = sum(1 for _, c in res if c == 0)
    p50, p99 = times[len(times) // 2], times[min(len(times) - 1, int(0.99 * len(times)))]
    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(2) as ex:
        puts = list(ex.map(lambda h: connect(ports[h % len(ports)], f"put -r small/h{h} r{r}-h{h}"), range(2)))
    put_wall = time.monotonic() - t0
    if any(p.returncode for p in puts):
        sys.exit("put -r failed: " + " ".join(p.stderr.decode() for p in puts))
    print(f"{name}\t{ok}\t{burst}\t{wall:.3f}\t{p50:.3f}\t{p99:.3f}\t{put_wall:.3f}")
EOF
}

: > "$W/results"
echo "one node, no database" >&2
read -r -a P <<< "$(setup single "" 1)"
measure "single node" "${P[@]}"
echo "one node of a cluster" >&2
read -r -a P <<< "$(setup one ftpx_one 1)"
measure "cluster, 1 node" "${P[@]}"
echo "two nodes of a cluster" >&2
read -r -a P <<< "$(setup two ftpx_two 2)"
measure "cluster, 2 nodes" "${P[@]}"

python3 - "$W/results" "$SMALL" <<'EOF'
import sys, statistics, collections
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    name, ok, n, wall, p50, p99, put = line.rstrip("\n").split("\t")
    rows.setdefault(name, []).append((int(ok), int(n), float(wall), float(p50), float(p99), float(put)))
small = int(sys.argv[2])
print(f"\nseveral nodes: login burst and put -r of {small} x 16 KiB (two clients at once), "
      f"{len(next(iter(rows.values())))} rounds, medians")
print(f"{'service':<18} {'logins ok':>10} {'burst s':>8} {'logins/s':>9} {'p50 s':>6} {'p99 s':>6} {'put -r files/s':>15}")
base = None
for name, r in rows.items():
    ok = min(x[0] for x in r); n = r[0][1]
    wall = statistics.median(x[2] for x in r)
    fps = statistics.median(small / x[5] for x in r)
    base = base or (n / wall, fps)
    print(f"{name:<18} {ok:>5}/{n:<4} {wall:>8.2f} {n / wall:>9.1f} {statistics.median(x[3] for x in r):>6.2f} "
          f"{statistics.median(x[4] for x in r):>6.2f} {fps:>15.0f}")
EOF
