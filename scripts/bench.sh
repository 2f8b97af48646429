#!/usr/bin/env bash
# Benchmark ftpx side by side with OpenSSH sftp, an FTPS server (vsftpd with
# explicit TLS, driven by curl), rsync over ssh, and the machine's ceilings,
# on this machine, in one run, over loopback or a modelled long link, with
# files on tmpfs.
#
#   scripts/bench.sh                       # loopback: 1 GiB file, 3 repeats, 2,000 small files, 200 logins
#   scripts/bench.sh --rtt 0,20,100        # the same cases at 0, 20 and 100 ms of round trip
#   BENCH_SIZE_MIB=256 BENCH_REPEAT=1 scripts/bench.sh --rtt 100   # a quick look
#
# --rtt MS[,MS...] (0): round trips to measure at. 0 is plain loopback; any
#   other goes through scripts/link.py, a relay on loopback that delays each
#   direction by RTT/2 and caps the bytes in flight, for every tool alike.
# --window BYTES (6291456): the relay's cap on bytes in flight per direction.
# --rate BYTES_PER_S (none): the relay's rate per direction.
#
# Settings (environment): BENCH_SIZE_MIB (1024), BENCH_REPEAT (3),
# BENCH_SMALL_FILES (2000, of 16 KiB), BENCH_MEDIUM_FILES (200, of 1 MiB),
# BENCH_BURST (200), BENCH_CASES (all of "big small medium login burst"),
# BENCH_FTPX (a binary to measure instead of building this checkout),
# BENCH_SFTP_SAMPLE (10: over a link, sftp copies 1 in this many of the
# small files, once, as it pays round trips per file), BENCH_DIR (a new
# directory under /dev/shm). It installs what it needs from Debian's
# packages, starts every server on 127.0.0.1 with its own config, stops
# them all at the end, and prints one table: median seconds and MiB/s
# (min-max), files/s, CPU seconds per GiB of both ends together, and the
# ratios ftpx/peer and ftpx/ceiling. curl's FTPS runs on loopback only: its
# data connections go to ports of their own, which the relay does not carry.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
REPEAT=${BENCH_REPEAT:-3}
SMALL=${BENCH_SMALL_FILES:-2000}
MEDIUM=${BENCH_MEDIUM_FILES:-200}
BURST=${BENCH_BURST:-200}
CASES=${BENCH_CASES:-big small medium login burst}
SFTP_SAMPLE=${BENCH_SFTP_SAMPLE:-10}
PASS=bench-password-1
RTTS=0 WINDOW=$((6 << 20)) RATE=0
while [ $# -gt 0 ]; do
    case $1 in
        --rtt) RTTS=$2; shift 2 ;;
        --window) WINDOW=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        *) echo "usage: scripts/bench.sh [--rtt MS[,MS...]] [--window BYTES] [--rate BYTES_PER_S]" >&2; exit 2 ;;
    esac
done
has() { [[ " $CASES " == *" $1 "* ]]; }

need() { command -v "$1" >/dev/null 2>&1; }
missing=()
for pair in sshd:openssh-server sftp:openssh-client vsftpd:vsftpd curl:curl socat:socat rsync:rsync \
            b3sum:b3sum openssl:openssl python3:python3; do
    cmd=${pair%%:*} pkg=${pair#*:}
    [ -x "$cmd" ] || need "$cmd" || [ -x "/usr/sbin/$cmd" ] || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ "$(id -u)" != 0 ]; then
    echo "bench.sh runs as root: it starts sshd and vsftpd with their own configs and a local user for FTPS" >&2
    exit 2
fi

if [ -n "${BENCH_FTPX:-}" ]; then
    FTPX=$BENCH_FTPX  # another build, to compare
else
    echo "building ftpx (release)" >&2
    (cd "$ROOT" && cargo build --release --quiet)
    FTPX="$ROOT/target/release/ftpx"
fi

W=${BENCH_DIR:-$(mktemp -d /dev/shm/ftpx-bench.XXXXXX)}
mkdir -p "$W"
chmod 755 "$W"  # the FTPS test user must reach its home inside
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    userdel ftpxbench 2>/dev/null || true
    [ -z "${BENCH_KEEP:-}" ] && rm -rf "$W"
}
trap cleanup EXIT
RESULTS=$W/results.tsv
: > "$RESULTS"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# utime+stime+cutime+cstime of a process, in seconds.
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{print ($14+$15+$16+$17)/hz}' "/proc/$1/stat"; }

echo "making test data in $W" >&2
head -c "$((SIZE_MIB << 20))" /dev/urandom > "$W/big.bin"
BIG_HASH=$(b3sum --no-names "$W/big.bin")
# tree DIR FILES SIZE [SAMPLE_DIR EVERY]: FILES random files of SIZE bytes
# in 20 directories; every EVERY-th file also goes into SAMPLE_DIR.
tree() {
    python3 - "$@" <<'EOF'
import os, sys
d, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sample, every = (sys.argv[4], int(sys.argv[5])) if len(sys.argv) > 5 else (None, 0)
for i in range(n):
    data = os.urandom(size)
    for root in [d] + ([sample] if sample and i % every == 0 else []):
        sub = os.path.join(root, f"d{i % 20:02d}")
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, f"f{i:05d}.bin"), "wb") as f:
            f.write(data)
EOF
}
tree "$W/small" "$SMALL" 16384 "$W/small-sample" "$SFTP_SAMPLE"
SAMPLE=$(find "$W/small-sample" -type f | wc -l)
if has medium; then tree "$W/medium" "$MEDIUM" $((1 << 20)); fi

# --- ftpx server -------------------------------------------------------------
mkdir -p "$W/ftpx/etc"
cat > "$W/ftpx/etc/ftpx.toml" <<EOF
[server]
log_level = "warn"
[limits]
max_sessions_per_ip = 1000
[defender]
registrations_per_hour = 1000
EOF
(cd "$W/ftpx" && echo "$PASS" | "$FTPX" useradd bench --quota 1TiB --password-stdin >/dev/null)
(cd "$W/ftpx" && exec "$FTPX" serve --listen 127.0.0.1:0 > "$W/ftpx/out" 2> "$W/ftpx/err") &
FTPX_PID=$!
PIDS+=("$FTPX_PID")
for _ in $(seq 100); do grep -q listening "$W/ftpx/out" 2>/dev/null && break; sleep 0.1; done
FTPX_PORT=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$W/ftpx/out")
export FTPX_STATE_DIR=$W/ftpx-client FTPX_PASSWORD=$PASS
# The ports the clients dial: the servers' own, or a relay's in front of them.
FTPX_DIAL=$FTPX_PORT
ftpx_c() { (cd "$W" && "$FTPX" connect "bench@127.0.0.1:$FTPX_DIAL" --ca "$W/ftpx/certs/ca.pem" -c "$1"); }

# --- sshd --------------------------------------------------------------------
SSH_PORT=$(free_port)
mkdir -p "$W/ssh" /run/sshd "$W/sftp-dst"
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/host_key"
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh/user_key"
cp "$W/ssh/user_key.pub" "$W/ssh/authorized_keys"
cat > "$W/ssh/sshd_config" <<EOF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $W/ssh/host_key
AuthorizedKeysFile $W/ssh/authorized_keys
PidFile $W/ssh/pid
UsePAM no
StrictModes no
PermitRootLogin yes
PasswordAuthentication no
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
/usr/sbin/sshd -f "$W/ssh/sshd_config" -D -e 2> "$W/ssh/log" &
SSHD_PID=$!
PIDS+=("$SSHD_PID")
SSH_OPTS=(-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR -i "$W/ssh/user_key")
SSH_DIAL=$SSH_PORT
sftp_b() { printf '%s\n' "$@" > "$W/sftp.batch"; sftp -q -b "$W/sftp.batch" -P "$SSH_DIAL" "${SSH_OPTS[@]}" "root@127.0.0.1" >/dev/null; }
rsync_e() { rsync -a -e "ssh -p $SSH_DIAL ${SSH_OPTS[*]}" "$@"; }

# link PORT: starts a relay in front of 127.0.0.1:PORT with the round trip
# $RTT and sets LINK_PORT to its port.
LINKS=()
link() {
    local out="$W/link-$1-$RTT"
    python3 "$ROOT/scripts/link.py" 0 "$1" --rtt "$RTT" --window "$WINDOW" --rate "$RATE" > "$out" &
    PIDS+=($!)
    LINKS+=($!)
    for _ in $(seq 100); do grep -q relaying "$out" 2>/dev/null && break; sleep 0.05; done
    LINK_PORT=$(awk '{print $2}' "$out")
}

# --- vsftpd with explicit TLS ------------------------------------------------
FTP_PORT=$(free_port)
PASV=$(free_port)
userdel ftpxbench 2>/dev/null || true
useradd -M -d "$W/ftp-home" -s /bin/bash ftpxbench
mkdir -p "$W/ftp-home" /var/run/vsftpd/empty
chown ftpxbench "$W/ftp-home"
echo "ftpxbench:$PASS" | chpasswd
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$W/ftp.key" -out "$W/ftp.pem" -days 2 -subj /CN=localhost 2>/dev/null
cat > "$W/vsftpd.conf" <<EOF
listen=YES
listen_ipv6=NO
listen_address=127.0.0.1
listen_port=$FTP_PORT
background=NO
anonymous_enable=NO
local_enable=YES
write_enable=YES
local_umask=022
pam_service_name=vsftpd
secure_chroot_dir=/var/run/vsftpd/empty
seccomp_sandbox=NO
ssl_enable=YES
force_local_data_ssl=YES
force_local_logins_ssl=YES
require_ssl_reuse=NO
rsa_cert_file=$W/ftp.pem
rsa_private_key_file=$W/ftp.key
pasv_enable=YES
pasv_address=127.0.0.1
pasv_min_port=$PASV
pasv_max_port=$((PASV + 40))
xferlog_enable=NO
EOF
/usr/sbin/vsftpd "$W/vsftpd.conf" &
VSFTPD_PID=$!
PIDS+=("$VSFTPD_PID")
CURL=(curl -sS --ssl-reqd -k --user "ftpxbench:$PASS")
sleep 0.5

# --- measuring -----------------------------------------------------------------
# run CASE TOOL SERVER_PID BYTES FILES CMD...: times CMD, adds the server's CPU.
run() {
    local case=$1 tool=$2 spid=$3 bytes=$4 files=$5; shift 5
    local before after
    before=$(cpu_of "$spid")
    local TIMEFORMAT="%R %U %S"
    if ! { time "$@" 2>"$W/command.err"; } 2> "$W/time"; then
        echo "FAILED: $case with $tool: $*" >&2
        cat "$W/command.err" >&2
        exit 1
    fi
    after=$(cpu_of "$spid")
    read -r wall user sys < "$W/time"
    echo -e "$RTT\t$case\t$tool\t$bytes\t$files\t$wall\t$(awk -v a="$user" -v b="$sys" 'BEGIN {print a + b}')\t$(awk -v a="$after" -v b="$before" 'BEGIN {print a - b}')" >> "$RESULTS"
}
check() { # check FILE: the copy must equal the source
    [ "$(b3sum --no-names "$1")" = "$BIG_HASH" ] || { echo "CORRUPT COPY: $1" >&2; exit 1; }
    rm -f "$1"
}
BYTES=$((SIZE_MIB << 20))

echo "warming up" >&2
ftpx_c "put big.bin warm.bin; rm warm.bin" >/dev/null
sftp_b "put $W/big.bin $W/sftp-dst/warm.bin" && rm -f "$W/sftp-dst/warm.bin"

# Every put writes a new file: the previous copy is deleted just before, for
# every tool. On this kind of VM, writing into memory freed a moment ago is
# about twice as cheap as writing into memory the host has taken back; an
# overwrite would hand the tools that truncate in place (sftp, vsftpd) the
# old file's warm pages, while ftpx, which replaces atomically, needs new
# ones while the old file still exists.
put_ftpx() {
    rm -f "$W/ftpx/var/homes/bench/big.bin"
    run put ftpx "$FTPX_PID" "$BYTES" 1 ftpx_c "put big.bin big.bin" >/dev/null
}
put_sftp() {
    rm -f "$W/sftp-dst/big.bin"
    run put sftp "$SSHD_PID" "$BYTES" 1 sftp_b "put $W/big.bin $W/sftp-dst/big.bin"
}
put_ftps() {
    rm -f "$W/ftp-home/big.bin"
    run put curl-ftps "$VSFTPD_PID" "$BYTES" 1 "${CURL[@]}" -T "$W/big.bin" "ftp://127.0.0.1:$FTP_PORT/big.bin"
}
get_ftpx() { run get ftpx "$FTPX_PID" "$BYTES" 1 ftpx_c "get big.bin $W/got-ftpx.bin" >/dev/null; check "$W/got-ftpx.bin"; }
get_sftp() { run get sftp "$SSHD_PID" "$BYTES" 1 sftp_b "get $W/sftp-dst/big.bin $W/got-sftp.bin"; check "$W/got-sftp.bin"; }
get_ftps() {
    run get curl-ftps "$VSFTPD_PID" "$BYTES" 1 "${CURL[@]}" -o "$W/got-ftps.bin" "ftp://127.0.0.1:$FTP_PORT/big.bin"
    check "$W/got-ftps.bin"
}
big_rounds() {
    local tools=(ftpx sftp) n rep k
    [ "$RTT" = 0 ] && tools+=(ftps)
    n=${#tools[@]}
    for rep in $(seq "$REPEAT"); do
        echo "1 GiB at $RTT ms, round $rep/$REPEAT" >&2
        # Each round starts with another tool: writing into memory the previous
        # run just freed is slow on this kind of VM, and no tool should always
        # come first or last.
        for k in $(seq 0 $((n - 1))); do "put_${tools[$(( (rep + k) % n ))]}"; done
        for k in $(seq 0 $((n - 1))); do "get_${tools[$(( (rep + k) % n ))]}"; done
        [ "$(b3sum --no-names "$W/ftpx/var/homes/bench/big.bin")" = "$BIG_HASH" ] || { echo "CORRUPT UPLOAD (ftpx)" >&2; exit 1; }
        [ "$(b3sum --no-names "$W/sftp-dst/big.bin")" = "$BIG_HASH" ] || { echo "CORRUPT UPLOAD (sftp)" >&2; exit 1; }
        if [ "$RTT" = 0 ]; then
            [ "$(b3sum --no-names "$W/ftp-home/big.bin")" = "$BIG_HASH" ] || { echo "CORRUPT UPLOAD (ftps)" >&2; exit 1; }
        fi
    done
}

same_tree() { diff -r "$1" "$2" >/dev/null || { echo "CORRUPT TREE: $2" >&2; exit 1; }; }
# tree_rounds NAME FILES BYTES_EACH: put -r and get -r of $W/NAME with each
# tool; over a link, sftp copies the sample of the small files, once.
tree_rounds() {
    local name=$1 files=$2 each=$3 rep src n dst
    for rep in $(seq "$REPEAT"); do
        echo "$name files at $RTT ms, round $rep/$REPEAT" >&2
        dst=$name-$RTT-$rep
        mkdir -p "$W/rsync-dst"
        run "$name-put" ftpx "$FTPX_PID" $((files * each)) "$files" ftpx_c "put -r $name $dst" >/dev/null
        rm -rf "$W/got-ftpx"
        run "$name-get" ftpx "$FTPX_PID" $((files * each)) "$files" ftpx_c "get -r $dst $W/got-ftpx" >/dev/null
        same_tree "$W/$name" "$W/got-ftpx"
        run "$name-put" rsync "$SSHD_PID" $((files * each)) "$files" rsync_e "$W/$name/" "root@127.0.0.1:$W/rsync-dst/$dst/"
        rm -rf "$W/got-rsync"
        run "$name-get" rsync "$SSHD_PID" $((files * each)) "$files" rsync_e "root@127.0.0.1:$W/rsync-dst/$dst/" "$W/got-rsync/"
        same_tree "$W/$name" "$W/got-rsync"
        src=$name n=$files
        if [ "$RTT" != 0 ] && [ "$name" = small ]; then
            [ "$rep" = 1 ] || continue
            src=small-sample n=$SAMPLE
        fi
        run "$name-put" sftp "$SSHD_PID" $((n * each)) "$n" sftp_b "put -r $W/$src $W/sftp-dst/$dst"
        rm -rf "$W/got-sftp"
        run "$name-get" sftp "$SSHD_PID" $((n * each)) "$n" sftp_b "get -r $W/sftp-dst/$dst $W/got-sftp"
        same_tree "$W/$src" "$W/got-sftp"
    done
}

# A login and one command: `pwd` for ftpx and sftp.
login_rounds() {
    local i
    echo "logins at $RTT ms" >&2
    for i in $(seq $((REPEAT * 3))); do
        run login ftpx "$FTPX_PID" 0 1 ftpx_c pwd >/dev/null
        run login sftp "$SSHD_PID" 0 1 sftp_b pwd
    done
}

for RTT in ${RTTS//,/ }; do
    if [ "$RTT" = 0 ]; then
        FTPX_DIAL=$FTPX_PORT SSH_DIAL=$SSH_PORT
    else
        link "$FTPX_PORT"
        FTPX_DIAL=$LINK_PORT
        link "$SSH_PORT"
        SSH_DIAL=$LINK_PORT
    fi
    if has login; then login_rounds; fi
    if has big; then big_rounds; fi
    if has small; then tree_rounds small "$SMALL" 16384; fi
    if has medium; then tree_rounds medium "$MEDIUM" $((1 << 20)); fi
    for p in "${LINKS[@]}"; do kill "$p" 2>/dev/null || true; done
    LINKS=()
    rm -rf "$W/ftpx/var/homes/bench/"{small,medium}-* "$W/rsync-dst" "$W/sftp-dst/"{small,medium}-*
done
RTT=0 FTPX_DIAL=$FTPX_PORT SSH_DIAL=$SSH_PORT

: > "$W/burst"
if has burst; then
    echo "login burst: $BURST clients at once" >&2
    grep VmHWM "/proc/$FTPX_PID/status" > "$W/hwm-before"
    python3 - "$FTPX" "$FTPX_PORT" "$W" "$BURST" > "$W/burst" <<'EOF'
import subprocess, sys, time, concurrent.futures as cf
ftpx, port, w, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def one(_):
    t = time.monotonic()
    r = subprocess.run([ftpx, "connect", f"bench@127.0.0.1:{port}", "--ca", f"{w}/ftpx/certs/ca.pem",
                        "--timeout", "300", "-c", "pwd"], capture_output=True)
    return time.monotonic() - t, r.returncode
with cf.ThreadPoolExecutor(n) as ex:
    res = list(ex.map(one, range(n)))
times = sorted(t for t, _ in res)
ok = sum(1 for _, c in res if c == 0)
p = lambda q: times[min(len(times) - 1, int(q * len(times)))]
print(f"{ok} {n} {p(0.5):.2f} {p(0.99):.2f}")
EOF
fi
HWM_KIB=$(awk '/VmHWM/ {print $2}' "/proc/$FTPX_PID/status")

echo "ceilings" >&2
CIPHER=$(grep -o 'cipher="[A-Z0-9_]*"' "$FTPX_STATE_DIR/ftpx.log" | tail -1 | cut -d'"' -f2)
case "$CIPHER" in
    *AES_128_GCM*) EVP=aes-128-gcm ;;
    *CHACHA20*) EVP=chacha20-poly1305 ;;
    *) EVP=aes-256-gcm ;;
esac
AEAD_MBS=$(openssl speed -evp "$EVP" -bytes 16384 -seconds 2 2>/dev/null | awk -v e="$EVP" 'tolower($1)==e {v=$NF} END {sub("k","",v); print v/1000}')
TIMEFORMAT="%R"
B3_S=$( { time b3sum --num-threads 1 --no-names "$W/big.bin" >/dev/null; } 2>&1 | tail -1)
TCP_PORT=$(free_port)
socat -u -b 131072 "TCP-LISTEN:$TCP_PORT,reuseaddr" OPEN:/dev/null &
sleep 0.3
TCP_S=$( { time socat -u -b 131072 "FILE:$W/big.bin" "TCP:127.0.0.1:$TCP_PORT"; } 2>&1 | tail -1)

python3 - "$RESULTS" "$SIZE_MIB" "$AEAD_MBS" "$EVP" "$B3_S" "$TCP_S" "$W/burst" "$HWM_KIB" "${CIPHER:-unknown}" "$WINDOW" "$RATE" <<'EOF'
import sys, statistics, collections
path, size_mib, aead, evp, b3s, tcps, burst, hwm, cipher, window, rate = sys.argv[1:]
size_mib = float(size_mib)
rows = collections.defaultdict(list)
for line in open(path):
    rtt, case, tool, nbytes, files, wall, cpu_c, cpu_s = line.rstrip("\n").split("\t")
    rows[(int(rtt), case, tool)].append((int(nbytes), int(files), float(wall), float(cpu_c), float(cpu_s)))
def stats(key):
    r = rows[key]
    secs = sorted(w for _, _, w, _, _ in r)
    mibs = sorted(b / (1 << 20) / max(w, 1e-9) for b, _, w, _, _ in r)
    cpu = statistics.median((c + s) / (b / (1 << 30)) for b, _, _, c, s in r) if r[0][0] else 0
    files = statistics.median(f / max(w, 1e-9) for _, f, w, _, _ in r)
    return dict(s=statistics.median(secs), mib=statistics.median(mibs), lo=mibs[0], hi=mibs[-1],
                cpu=cpu, fps=files, n=len(r), files=r[0][1])
link = f"window {int(window) >> 20} MiB" + (f", rate {float(rate) / (1 << 20):.0f} MiB/s" if float(rate) else "")
print(f"\nftpx benchmark: {size_mib:.0f} MiB file, tmpfs; 0 ms is loopback, other round trips go through scripts/link.py ({link})")
print(f"{'rtt':>5} {'case':<11} {'tool':<10} {'s median':>9} {'MiB/s median (min-max)':>24} {'files/s':>9} {'CPU s/GiB':>10} {'ftpx/peer':>10} {'CPU ftpx/peer':>14}")
order = ["login", "put", "get", "small-put", "small-get", "medium-put", "medium-get"]
for rtt in sorted({k[0] for k in rows}):
    for case in order:
        ftpx = stats((rtt, case, "ftpx")) if rows.get((rtt, case, "ftpx")) else None
        for key in sorted(k for k in rows if k[:2] == (rtt, case)):
            st = stats(key)
            tool = key[2]
            # Speed ratios by files/s for trees (a sample may hold fewer files), else by time.
            if tool == "ftpx" or not ftpx:
                ratio = cpu_ratio = ""
            else:
                ratio = f"{ftpx['fps'] / st['fps']:.2f}x" if st['files'] > 1 else f"{st['s'] / ftpx['s']:.2f}x"
                cpu_ratio = f"{ftpx['cpu'] / st['cpu']:.2f}" if st['cpu'] else ""
            speed = "" if case == "login" else f"{st['mib']:.0f} ({st['lo']:.0f}-{st['hi']:.0f})"
            fcol = f"{st['fps']:.0f}" if st['files'] > 1 else ""
            cpu = f"{st['cpu']:.2f}" if st['cpu'] else ""
            note = f"  ({st['files']} files, {st['n']} run{'s' if st['n'] > 1 else ''})" if tool == "sftp" and case.startswith("small") and rtt else ""
            print(f"{rtt:>5} {case:<11} {tool:<10} {st['s']:>9.2f} {speed:>24} {fcol:>9} {cpu:>10} {ratio:>10} {cpu_ratio:>14}{note}")
aead_mib = float(aead) * 1e6 / (1 << 20)
b3 = size_mib / float(b3s)
tcp = size_mib / float(tcps)
print(f"\nceilings: {evp} (ftpx negotiated {cipher}) {aead_mib:.0f} MiB/s per core; "
      f"BLAKE3 one thread {b3:.0f} MiB/s; raw TCP loopback copy {tcp:.0f} MiB/s")
for case in ["put", "get"]:
    if rows.get((0, case, "ftpx")):
        m = stats((0, case, "ftpx"))["mib"]
        print(f"ftpx {case} on loopback: {m / aead_mib:.2f} of the cipher, {m / b3:.2f} of BLAKE3, {m / tcp:.2f} of raw TCP")
    for rtt in sorted({k[0] for k in rows if k[0]}):
        if rows.get((rtt, case, "ftpx")):
            allowed = int(window) / (rtt / 1000) / (1 << 20)
            if float(rate):
                allowed = min(allowed, float(rate) / (1 << 20))
            m = stats((rtt, case, "ftpx"))["mib"]
            print(f"ftpx {case} at {rtt} ms: {m / allowed:.2f} of what the link allows ({allowed:.0f} MiB/s)")
words = open(burst).read().split()
if words:
    ok, n, p50, p99 = words
    print(f"\nlogin burst: {ok}/{n} succeeded, p50 {p50} s, p99 {p99} s, server peak RSS {int(hwm) / 1024:.0f} MiB")
EOF
