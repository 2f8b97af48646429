#!/usr/bin/env bash
# Benchmark ftpx side by side with OpenSSH sftp, an FTPS server (vsftpd with
# explicit TLS, driven by curl), rsync over ssh, and the machine's ceilings,
# on this machine, in one run, over loopback, with files on tmpfs.
#
#   scripts/bench.sh            # the full run: 1 GiB file, 3 repeats, 2,000 small files, 200 logins
#   BENCH_SIZE_MIB=256 BENCH_REPEAT=1 scripts/bench.sh   # a quick look
#
# Settings (environment): BENCH_SIZE_MIB (1024), BENCH_REPEAT (3),
# BENCH_SMALL_FILES (2000), BENCH_BURST (200), BENCH_DIR (a new directory
# under /dev/shm). It installs what it needs from Debian's packages, starts
# every server on 127.0.0.1 with its own config, stops them all at the end,
# and prints one table: median MiB/s (min-max), CPU seconds per GiB of both
# ends together, and the ratios ftpx/peer and ftpx/ceiling.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MIB=${BENCH_SIZE_MIB:-1024}
REPEAT=${BENCH_REPEAT:-3}
SMALL=${BENCH_SMALL_FILES:-2000}
BURST=${BENCH_BURST:-200}
PASS=bench-password-1

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

echo "building ftpx (release)" >&2
(cd "$ROOT" && cargo build --release --quiet)
FTPX="$ROOT/target/release/ftpx"

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
mkdir -p "$W/small"
python3 - "$W/small" "$SMALL" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    sub = os.path.join(d, f"d{i % 20:02d}")
    os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f"f{i:05d}.bin"), "wb") as f:
        f.write(os.urandom(16384))
EOF

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
ftpx_c() { (cd "$W" && "$FTPX" connect "bench@127.0.0.1:$FTPX_PORT" --ca "$W/ftpx/certs/ca.pem" -c "$1"); }

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
sftp_b() { printf '%s\n' "$@" > "$W/sftp.batch"; sftp -q -b "$W/sftp.batch" -P "$SSH_PORT" "${SSH_OPTS[@]}" "root@127.0.0.1" >/dev/null; }

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
    echo -e "$case\t$tool\t$bytes\t$files\t$wall\t$(awk -v a="$user" -v b="$sys" 'BEGIN {print a + b}')\t$(awk -v a="$after" -v b="$before" 'BEGIN {print a - b}')" >> "$RESULTS"
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
TOOLS=(ftpx sftp ftps)
for rep in $(seq "$REPEAT"); do
    echo "1 GiB round $rep/$REPEAT" >&2
    # Each round starts with another tool: writing into memory the previous
    # run just freed is slow on this kind of VM, and no tool should always
    # come first or last.
    for k in 0 1 2; do "put_${TOOLS[$(( (rep + k) % 3 ))]}"; done
    for k in 0 1 2; do "get_${TOOLS[$(( (rep + k) % 3 ))]}"; done
    [ "$(b3sum --no-names "$W/ftpx/var/homes/bench/big.bin")" = "$BIG_HASH" ] || { echo "CORRUPT UPLOAD (ftpx)" >&2; exit 1; }
    [ "$(b3sum --no-names "$W/sftp-dst/big.bin")" = "$BIG_HASH" ] || { echo "CORRUPT UPLOAD (sftp)" >&2; exit 1; }
    [ "$(b3sum --no-names "$W/ftp-home/big.bin")" = "$BIG_HASH" ] || { echo "CORRUPT UPLOAD (ftps)" >&2; exit 1; }
done

SMALL_BYTES=$((SMALL * 16384))
for rep in $(seq "$REPEAT"); do
    echo "small files round $rep/$REPEAT" >&2
    run small-put ftpx "$FTPX_PID" "$SMALL_BYTES" "$SMALL" ftpx_c "put -r small small-$rep" >/dev/null
    run small-put sftp "$SSHD_PID" "$SMALL_BYTES" "$SMALL" sftp_b "put -r $W/small $W/sftp-dst/small-$rep"
    run small-put rsync "$SSHD_PID" "$SMALL_BYTES" "$SMALL" \
        rsync -a -e "ssh -p $SSH_PORT ${SSH_OPTS[*]}" "$W/small/" "root@127.0.0.1:$W/rsync-dst-$rep/"
done

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

python3 - "$RESULTS" "$SIZE_MIB" "$AEAD_MBS" "$EVP" "$B3_S" "$TCP_S" "$W/burst" "$HWM_KIB" "${CIPHER:-unknown}" <<'EOF'
import sys, statistics, collections
path, size_mib, aead, evp, b3s, tcps, burst, hwm, cipher = sys.argv[1:]
size_mib = float(size_mib)
rows = collections.defaultdict(list)
for line in open(path):
    case, tool, nbytes, files, wall, cpu_c, cpu_s = line.rstrip("\n").split("\t")
    rows[(case, tool)].append((int(nbytes), int(files), float(wall), float(cpu_c), float(cpu_s)))
def stats(case, tool):
    r = rows[(case, tool)]
    mibs = sorted(b / (1 << 20) / max(w, 1e-9) for b, _, w, _, _ in r)
    cpu = statistics.median((c + s) / (b / (1 << 30)) for b, _, _, c, s in r)
    files = statistics.median(f / max(w, 1e-9) for _, f, w, _, _ in r)
    return statistics.median(mibs), mibs[0], mibs[-1], cpu, files
print(f"\nftpx benchmark: {size_mib:.0f} MiB file, {len(rows[('put','ftpx')])} repeats, loopback, tmpfs")
print(f"{'case':<10} {'tool':<10} {'MiB/s median (min-max)':>26} {'files/s':>9} {'CPU s/GiB':>10} {'ftpx/peer':>10} {'CPU ftpx/peer':>14}")
for case in ["put", "get", "small-put"]:
    ftpx = stats(case, "ftpx") if rows[(case, "ftpx")] else None
    for (c, tool) in sorted(k for k in rows if k[0] == case):
        med, lo, hi, cpu, fps = stats(c, tool)
        ratio = "" if tool == "ftpx" or not ftpx else f"{ftpx[0] / med:.2f}x"
        cpu_ratio = "" if tool == "ftpx" or not ftpx else f"{ftpx[3] / cpu:.2f}"
        fcol = f"{fps:.0f}" if case == "small-put" else ""
        print(f"{case:<10} {tool:<10} {med:>10.0f} ({lo:.0f}-{hi:.0f}){'':>6} {fcol:>9} {cpu:>10.2f} {ratio:>10} {cpu_ratio:>14}")
aead_mib = float(aead) * 1e6 / (1 << 20)
b3 = size_mib / float(b3s)
tcp = size_mib / float(tcps)
print(f"\nceilings: {evp} (ftpx negotiated {cipher}) {aead_mib:.0f} MiB/s per core; "
      f"BLAKE3 one thread {b3:.0f} MiB/s; raw TCP loopback copy {tcp:.0f} MiB/s")
for case in ["put", "get"]:
    if rows[(case, "ftpx")]:
        m = stats(case, "ftpx")[0]
        print(f"ftpx {case}: {m / aead_mib:.2f} of the cipher, {m / b3:.2f} of BLAKE3, {m / tcp:.2f} of raw TCP")
ok, n, p50, p99 = open(burst).read().split()
print(f"\nlogin burst: {ok}/{n} succeeded, p50 {p50} s, p99 {p99} s, server peak RSS {int(hwm) / 1024:.0f} MiB")
EOF
