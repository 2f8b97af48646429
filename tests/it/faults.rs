//! Faults and load (THREATS.md 2.E and 2.F): a full disk under an upload,
//! file descriptors run out, a listing past `max_list_entries`, peers that
//! stop reading, a burst of expensive logins, a client killed while it
//! registers, SIGTERM with sessions under way, an office of users behind
//! one address, and a flood of failed handshakes against the log's cap.
//!
//! Most tests run the real `ftpx serve` process, because they need what only
//! a process has: rlimits, its own memory and CPU figures in /proc, signals,
//! and its log. Files move only through `Client::put`/`get` or the real
//! `ftpx connect`; the wire protocol is spoken by hand only for `LIST`.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use ftpx::client::{Client, ClientError};
use ftpx::protocol::Request;
use ftpx::protocol::VPath;
use indicatif::ProgressBar;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

use crate::common::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Hang guard for anything the server must do on its own.
const GUARD: Duration = Duration::from_secs(30);
/// Password hashing as cheap as the harness makes it.
const CHEAP_HASHES: &str = "scrypt_log_n = 4\nscrypt_r = 1\nlogin_failure_delay_ms = 100\n";

// ---------------------------------------------------------------------------
// Server processes, their files and their figures in /proc

/// Makes `root/server` with an `etc/ftpx.toml` of the given `[accounts]`,
/// `[limits]` and `[transfer]` lines; the log goes to `log/ftpx.log`, outside
/// `var/`, so that a full `var/` never touches it.
fn server_dir(root: &Path, accounts: &str, limits: &str, transfer: &str) -> PathBuf {
    let dir = root.join("server");
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(
        dir.join("etc/ftpx.toml"),
        format!(
            "[server]\nlog_level = \"debug\"\nlog_file = \"log/ftpx.log\"\n\
             [accounts]\n{accounts}\n[limits]\n{limits}\n[transfer]\n{transfer}\n"
        ),
    )
    .unwrap();
    dir
}

fn server_log(dir: &Path) -> String {
    fs::read_to_string(dir.join("log/ftpx.log")).unwrap_or_default()
}

/// Lines of the server's log that end a session of `user`.
fn disconnects(dir: &Path, user: &str) -> usize {
    let who = format!(" user=\"{user}\" ");
    server_log(dir)
        .lines()
        .filter(|l| l.contains(" disconnected ") && l.contains(&who))
        .count()
}

/// A line of /proc/PID/status in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, key: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix(" kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// User plus system CPU time of a process so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses: utime and
    // stime are the 14th and 15th fields of the whole line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split(' ')
        .skip(11)
        .take(2)
        .map(|v| v.parse().unwrap())
        .collect();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis((f[0] + f[1]) * 1000 / hz)
}

fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

/// Sets a resource limit of a running process (prlimit(2)).
fn set_rlimit(pid: u32, resource: libc::__rlimit_resource_t, soft: u64, hard: u64) {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `limit` outlives the call and the old value is not asked for.
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, resource, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

/// A temp directory on tmpfs where there is one: quick to fill with files.
fn scratch() -> tempfile::TempDir {
    match tempfile::tempdir_in("/dev/shm") {
        Ok(dir) => dir,
        Err(_) => tempfile::tempdir().unwrap(),
    }
}

/// The most one TCP socket here buffers for sending (`net.ipv4.tcp_wmem`):
/// what a server can write before a peer that does not read stops it.
fn send_buffer_max() -> u64 {
    fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|t| t.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 * MIB)
}

/// Polls `ready` until it holds; fails after `GUARD`.
async fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + GUARD;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for a child process to exit, killing it after `limit`.
async fn wait_exit(child: &mut Child, limit: Duration, what: &str) -> (i32, Duration) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code().unwrap_or(-1), started.elapsed());
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: kill(2) on a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

// ---------------------------------------------------------------------------
// Clients

fn vp(path: &str) -> VPath {
    VPath::resolve(&VPath::root(), path, 4096).unwrap()
}

/// A session logged in as `user` with `PASSWORD`, journals in `journals`.
async fn login_at(port: u16, ca: &Path, user: &str, journals: &Path) -> Client {
    let mut c = Client::connect("127.0.0.1", port, ca, Duration::from_secs(60))
        .await
        .unwrap()
        .with_journal_dir(journals.to_path_buf());
    c.login(user, PASSWORD, false).await.unwrap();
    c
}

/// Uploads `bytes` as `remote` and downloads it again; both must verify.
async fn round_trip(c: &mut Client, work: &Path, remote: &str, bytes: &[u8]) {
    let bar = ProgressBar::hidden();
    let (up, down) = (
        work.join(format!("{remote}.up")),
        work.join(format!("{remote}.down")),
    );
    fs::create_dir_all(work).unwrap();
    fs::write(&up, bytes).unwrap();
    let sent = c.put(&up, &vp(remote), &bar).await.unwrap();
    assert_eq!(sent.hash.to_hex().as_str(), hex(bytes));
    let got = c.get(&vp(remote), &down, &bar).await.unwrap();
    assert_eq!(got.hash.to_hex().as_str(), hex(bytes));
    assert!(
        fs::read(&down).unwrap() == bytes,
        "{remote} came back different"
    );
}

/// A fresh session as `user` that round-trips a small file.
async fn fresh_round_trip(port: u16, ca: &Path, user: &str, work: &Path, tag: &str) {
    let mut c = login_at(port, ca, user, &work.join("journal")).await;
    round_trip(&mut c, work, tag, &data(100 * KIB as usize, 7)).await;
    c.quit().await;
}

async fn used_quota(c: &mut Client) -> u64 {
    let r = c.request(&Request::Quota).await.unwrap();
    r.text.split(' ').next().unwrap().parse().unwrap()
}

/// A TLS session spoken by hand whose socket buffers a little only, so that
/// a peer that stops reading stops the server's writes soon.
struct Slow {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
}

impl Slow {
    async fn connect(port: u16, ca: &Path) -> Slow {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(64 * 1024).unwrap();
        let tcp = socket
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .unwrap();
        let tls = ftpx::tls::client_config(ca).unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(ftpx::tls::server_name("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut s = Slow { stream };
        let greeting = s.read_some().await;
        assert!(greeting.starts_with(b"220 "), "{greeting:?}");
        s
    }

    async fn send(&mut self, line: &str) {
        self.stream.write_all(line.as_bytes()).await.unwrap();
        self.stream.write_all(b"\n").await.unwrap();
        self.stream.flush().await.unwrap();
    }

    async fn read_some(&mut self) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(GUARD, self.stream.read(&mut buf))
            .await
            .expect("server did not answer")
            .unwrap_or(0);
        buf.truncate(n);
        buf
    }

    /// Everything up to the end of the stream, whether clean or not.
    async fn read_to_end(&mut self) -> Vec<u8> {
        let mut all = vec![];
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let read = tokio::time::timeout(GUARD, self.stream.read(&mut buf))
                .await
                .expect("the stream neither ended nor went on");
            match read {
                Ok(0) | Err(_) => return all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
            }
        }
    }
}

/// A TCP relay in front of a server. Each direction can be held back after
/// a number of bytes or paced, so a test decides when a peer stops reading
/// or writing without depending on how fast the machine moves data. Its
/// server-side sockets buffer little, for the same reason.
pub(crate) struct Relay {
    pub(crate) port: u16,
    /// Client to server.
    pub(crate) up: Arc<Pace>,
    /// Server to client.
    pub(crate) down: Arc<Pace>,
    task: tokio::task::JoinHandle<()>,
}

pub(crate) struct Pace {
    /// Bytes forwarded so far, over all connections.
    passed: AtomicU64,
    /// Forwarding stops while `passed` has reached this.
    limit: AtomicU64,
    /// Bytes per second; 0 for as fast as it goes.
    rate: AtomicU64,
}

impl Pace {
    fn new() -> Arc<Pace> {
        Arc::new(Pace {
            passed: AtomicU64::new(0),
            limit: AtomicU64::new(u64::MAX),
            rate: AtomicU64::new(0),
        })
    }

    /// Forwards `bytes` more, then holds back.
    pub(crate) fn stop_after(&self, bytes: u64) {
        self.limit.store(self.passed.load(SeqCst) + bytes, SeqCst);
    }

    fn held(&self) -> bool {
        self.passed.load(SeqCst) >= self.limit.load(SeqCst)
    }

    pub(crate) fn open(&self) {
        self.limit.store(u64::MAX, SeqCst);
        self.rate.store(0, SeqCst);
    }
}

impl Relay {
    pub(crate) async fn start(port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay_port = listener.local_addr().unwrap().port();
        let (up, down) = (Pace::new(), Pace::new());
        let (u, d) = (up.clone(), down.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let socket = TcpSocket::new_v4().unwrap();
                socket.set_recv_buffer_size(64 * 1024).unwrap();
                socket.set_send_buffer_size(64 * 1024).unwrap();
                let Ok(server) = socket
                    .connect(SocketAddr::from(([127, 0, 0, 1], port)))
                    .await
                else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, u.clone()));
                tokio::spawn(pump(sr, cw, d.clone()));
            }
        });
        Relay {
            port: relay_port,
            up,
            down,
            task,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, pace: Arc<Pace>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let room = loop {
            let (passed, limit) = (pace.passed.load(SeqCst), pace.limit.load(SeqCst));
            if passed < limit {
                break (limit - passed).min(buf.len() as u64) as usize;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let n = match from.read(&mut buf[..room]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        pace.passed.fetch_add(n as u64, SeqCst);
        let rate = pace.rate.load(SeqCst);
        if rate > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
    }
    let _ = to.shutdown().await;
}

// ---------------------------------------------------------------------------
// A small disk for the server's var/

/// How a test makes the server's storage run out.
enum SmallDisk {
    /// A tmpfs of a few MiB mounted on `var/`: writes fail with ENOSPC.
    Tmpfs(PathBuf),
    /// No mount allowed: the server process gets RLIMIT_FSIZE, so a write
    /// past that size fails with EFBIG (the server ignores SIGXFSZ).
    FileSizeLimit,
}

impl SmallDisk {
    fn mount(dir: &Path, size: u64) -> SmallDisk {
        fs::create_dir_all(dir).unwrap();
        let mounted = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={}k", size / KIB),
                "tmpfs",
            ])
            .arg(dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if mounted {
            SmallDisk::Tmpfs(dir.to_path_buf())
        } else {
            println!("cannot mount a tmpfs here; limiting the server's file size instead");
            SmallDisk::FileSizeLimit
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if let SmallDisk::Tmpfs(dir) = self {
            let _ = Command::new("umount").arg("-l").arg(dir).status();
        }
    }
}

// ---------------------------------------------------------------------------
// 2.E 62: disk full on the client

#[tokio::test(flavor = "multi_thread")]
async fn a_full_local_disk_during_get_is_said_to_be_the_local_disk() {
    let root = scratch();
    let sdir = server_dir(root.path(), CHEAP_HASHES, "", "");
    let srv = BinServer::start(&sdir, 0);
    srv.useradd("ann", "100MiB");
    let work = root.path().join("client");
    fs::create_dir_all(&work).unwrap();
    fs::write(work.join("big"), data(4 * MIB as usize, 1)).unwrap();
    let out = connect_c(&work, &srv.ca(), srv.port, "ann", "put big");
    assert_eq!(out.status, 0, "{}", out.stderr);

    // The client may write files of at most 1 MiB: its disk fills under
    // the download (EFBIG, as ENOSPC), after the check for free space.
    let down = root.path().join("down");
    fs::create_dir_all(&down).unwrap();
    let mut get = ftpx(&down);
    get.args(["connect", &format!("ann@127.0.0.1:{}", srv.port), "--ca"])
        .arg(srv.ca())
        .args(["--retries", "0", "-c", "get big"])
        .env("FTPX_PASSWORD", PASSWORD)
        .env("FTPX_STATE_DIR", work.join("state"));
    // SAFETY: setrlimit only, in the child between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut get, || {
            let limit = libc::rlimit {
                rlim_cur: MIB,
                rlim_max: libc::RLIM_INFINITY,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &limit);
            Ok(())
        });
    }
    let out = run(&mut get);
    assert_eq!(out.status, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("the local disk is full"),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("server"), "{}", out.stderr);
    assert!(!down.join("big").exists());
}

// ---------------------------------------------------------------------------
// 2.E 59: disk full under an upload

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_the_upload_with_452_and_everything_else_survives() {
    let root = scratch();
    let sdir = server_dir(root.path(), CHEAP_HASHES, "", "");
    let work = root.path().join("client");
    let journals = work.join("journal");
    fs::create_dir_all(&work).unwrap();
    // 8 MiB of disk; `f` (1 MiB) and `ballast` (4 MiB) leave about 3 MiB, too
    // little for a new `f` of 4 MiB until `ballast` goes. With a file-size
    // limit instead, the limit is 3 MiB and is lifted to free the space.
    let disk = SmallDisk::mount(&sdir.join("var"), 8 * MIB);
    let srv = BinServer::start(&sdir, 0);
    let (port, ca) = (srv.port, srv.ca());
    srv.useradd("ann", "100MiB");
    srv.useradd("bob", "100MiB");

    let old = data(MIB as usize, 1);
    let new = data(4 * MIB as usize, 2);
    let shared = data(200 * KIB as usize, 3);
    fs::write(work.join("old"), &old).unwrap();
    fs::write(work.join("new"), &new).unwrap();
    fs::write(work.join("ballast"), data(4 * MIB as usize, 4)).unwrap();
    fs::write(work.join("shared"), &shared).unwrap();
    let bar = ProgressBar::hidden();
    let mut ann = login_at(port, &ca, "ann", &journals).await;
    ann.put(&work.join("old"), &vp("/f"), &bar).await.unwrap();
    ann.put(&work.join("ballast"), &vp("/ballast"), &bar)
        .await
        .unwrap();
    let mut bob = login_at(port, &ca, "bob", &journals).await;
    bob.put(&work.join("shared"), &vp("/shared"), &bar)
        .await
        .unwrap();
    if matches!(disk, SmallDisk::FileSizeLimit) {
        set_rlimit(
            srv.child.id(),
            libc::RLIMIT_FSIZE,
            3 * MIB,
            libc::RLIM_INFINITY,
        );
    }

    // The disk fills during the upload: a clear error, the old file intact.
    let r = ann.put(&work.join("new"), &vp("/f"), &bar).await;
    match &r {
        Err(ClientError::Server { code: 452, text }) => {
            assert!(text.contains("server storage is full"), "{text}")
        }
        other => panic!("expected 452 server storage is full, got {other:?}"),
    }
    let home = sdir.join("var/homes/ann");
    assert!(
        fs::read(home.join("f")).unwrap() == old,
        "the old /f changed"
    );

    // Other users are served: a download needs no space.
    let got = bob
        .get(&vp("/shared"), &work.join("shared.down"), &bar)
        .await
        .unwrap();
    assert_eq!(got.hash.to_hex().as_str(), hex(&shared));

    // Nothing of the failed upload is kept: it cannot be resumed into a full
    // disk, and it would keep the disk full for everyone.
    let staging = sdir.join("var/partial/ann");
    let left: Vec<_> = fs::read_dir(&staging)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "the failed upload left {left:?} in var/partial/ann"
    );
    assert_eq!(
        used_quota(&mut ann).await,
        5 * MIB,
        "quota after the failure"
    );

    // With the partial file gone there is room again for small files.
    round_trip(&mut bob, &work, "small", &data(64 * KIB as usize, 5)).await;

    // Once space is freed the same upload succeeds.
    match disk {
        SmallDisk::Tmpfs(_) => {
            ann.request(&Request::Dele("/ballast".into()))
                .await
                .unwrap();
        }
        SmallDisk::FileSizeLimit => set_rlimit(
            srv.child.id(),
            libc::RLIMIT_FSIZE,
            libc::RLIM_INFINITY,
            libc::RLIM_INFINITY,
        ),
    }
    let t = ann.put(&work.join("new"), &vp("/f"), &bar).await.unwrap();
    assert_eq!(t.hash.to_hex().as_str(), hex(&new));
    assert!(fs::read(home.join("f")).unwrap() == new);
    ann.quit().await;
    bob.quit().await;
    srv.kill9();
    drop(disk);
}

// ---------------------------------------------------------------------------
// 2.E 64: file descriptors run out

#[tokio::test(flavor = "multi_thread")]
async fn out_of_file_descriptors_the_server_backs_off_and_recovers() {
    let root = scratch();
    let sdir = server_dir(root.path(), CHEAP_HASHES, "", "");
    let work = root.path().join("client");
    let srv = BinServer::start(&sdir, 0);
    let (port, ca, pid) = (srv.port, srv.ca(), srv.child.id());
    srv.useradd("ann", "100MiB");
    srv.useradd("bob", "100MiB");
    let mut ann = login_at(port, &ca, "ann", &work.join("journal")).await;
    let baseline = open_fds(pid);
    set_rlimit(pid, libc::RLIMIT_NOFILE, 64, 64);

    // 200 connections at once that never start TLS: the server takes what
    // its descriptors allow and accept fails for the rest (of which the
    // listen backlog holds 128; the others wait in SYN retries).
    let mut flood = JoinSet::new();
    for _ in 0..200 {
        flood.spawn(TcpStream::connect(("127.0.0.1", port)));
    }
    wait_for("accept to fail for lack of descriptors", || {
        server_log(&sdir).contains("accept failed")
    })
    .await;

    // A server that retries accept at once spins on one core; one that
    // backs off stays nearly idle.
    let before = cpu_time(pid);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = cpu_time(pid) - before;
    assert!(
        spent < Duration::from_millis(400),
        "the server used {spent:?} of CPU in one idle second at the descriptor limit"
    );
    // The session that was in keeps working.
    assert_eq!(ann.request(&Request::Noop).await.unwrap().code, 200);
    assert_eq!(ann.request(&Request::Pwd).await.unwrap().code, 257);

    drop(flood);
    wait_for("the server to close the flood's connections", || {
        open_fds(pid) <= baseline + 2
    })
    .await;
    round_trip(&mut ann, &work, "after", &data(300 * KIB as usize, 8)).await;
    fresh_round_trip(port, &ca, "bob", &work, "fresh").await;
    ann.quit().await;
}

// ---------------------------------------------------------------------------
// 2.F 71: max_list_entries

#[tokio::test(flavor = "multi_thread")]
async fn a_listing_past_max_list_entries_is_cut_and_says_so() {
    let s = TestServer::start_with(|c| c.limits.max_list_entries = 5).await;
    s.add_user("ann", 100 * MIB);
    let home = s.home("ann");
    for (dir, n) in [("many", 20), ("five", 5)] {
        fs::create_dir_all(home.join(dir)).unwrap();
        for i in 0..n {
            fs::write(home.join(format!("{dir}/f{i:02}")), format!("{i}")).unwrap();
        }
    }
    let mut c = s.login("ann").await;
    let r = c
        .request(&Request::List(Some("/many".into())))
        .await
        .unwrap();
    assert_eq!(r.lines.len(), 5, "{:?}", r.lines);
    assert_eq!(r.text, "5 entries (truncated)");
    let r = c
        .request(&Request::List(Some("/five".into())))
        .await
        .unwrap();
    assert_eq!((r.lines.len(), r.text.as_str()), (5, "5 entries"));
    c.quit().await;

    let work = s.dir.path().join("client");
    fs::create_dir_all(&work).unwrap();
    let port = s.addr.port();
    let out = connect_c(&work, &s.ca, port, "ann", "ls many");
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 5, "{}", out.stdout);
    assert!(out.stderr.contains("truncated"), "{}", out.stderr);
    let out = connect_c(&work, &s.ca, port, "ann", "ls five");
    assert_eq!(out.stdout.lines().count(), 5, "{}", out.stdout);
    assert!(!out.stderr.contains("truncated"), "{}", out.stderr);

    // A tree copy from a cut listing would silently miss files: refused.
    let out = connect_c(&work, &s.ca, port, "ann", "get -r many");
    assert_ne!(out.status, 0, "{}", out.stdout);
    assert!(out.stderr.contains("truncated"), "{}", out.stderr);
    let fetched = fs::read_dir(work.join("many"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(fetched, 0, "files were copied from a cut listing");
    let out = connect_c(&work, &s.ca, port, "ann", "get -r five");
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(fs::read_dir(work.join("five")).unwrap().count(), 5);
    s.stop().await;
}

// ---------------------------------------------------------------------------
// 2.F 69: peers that stop reading after login

/// A server whose I/O timeout is one second, with `ann` and `bob`.
fn impatient_server(root: &Path) -> BinServer {
    let sdir = server_dir(root, CHEAP_HASHES, "io_timeout_secs = 1\n", "");
    let srv = BinServer::start(&sdir, 0);
    srv.useradd("ann", "100MiB");
    srv.useradd("bob", "100MiB");
    srv
}

#[tokio::test(flavor = "multi_thread")]
async fn a_download_that_is_not_read_is_dropped_after_the_io_timeout() {
    let root = scratch();
    let srv = impatient_server(root.path());
    let (port, ca, sdir) = (srv.port, srv.ca(), srv.dir.clone());
    let work = root.path().join("client");
    fs::create_dir_all(&work).unwrap();
    // Far more than the sockets on the way can hold.
    let big = data((2 * send_buffer_max() + 16 * MIB) as usize, 9);
    fs::create_dir_all(sdir.join("var/homes/ann")).unwrap();
    fs::write(sdir.join("var/homes/ann/big"), &big).unwrap();

    let relay = Relay::start(port).await;
    let mut ann = login_at(relay.port, &ca, "ann", &work.join("journal")).await;
    // The client takes the first MiB of the download, then reads no more.
    relay.down.stop_after(MIB);
    let target = work.join("big");
    let download = tokio::spawn(async move {
        let r = ann.get(&vp("/big"), &target, &ProgressBar::hidden()).await;
        (r, ann)
    });
    wait_for("the download to stall", || relay.down.held()).await;
    // Others are served while that session is stuck.
    fresh_round_trip(port, &ca, "bob", &work, "during").await;
    wait_for("the server to drop the stalled session", || {
        disconnects(&sdir, "ann") == 1
    })
    .await;
    fresh_round_trip(port, &ca, "bob", &work, "after").await;

    // What the server had sent before is delivered, then the stream ends
    // short of the file: the download fails instead of completing.
    relay.down.open();
    let (r, _) = tokio::time::timeout(GUARD, download)
        .await
        .expect("the client hung")
        .unwrap();
    assert!(r.is_err(), "the download completed: {r:?}");
    assert!(!work.join("big").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_listing_that_is_not_read_is_dropped_after_the_io_timeout() {
    let root = scratch();
    let srv = impatient_server(root.path());
    let (port, ca, sdir) = (srv.port, srv.ca(), srv.dir.clone());
    let work = root.path().join("client");
    // Entries of more than 240 bytes each, twice what the sockets on the way
    // can hold and more.
    let dir = sdir.join("var/homes/ann/crowd");
    fs::create_dir_all(&dir).unwrap();
    let stem = "n".repeat(240);
    for i in 0..(2 * send_buffer_max() + MIB) / 240 {
        fs::File::create(dir.join(format!("{stem}{i:06}"))).unwrap();
    }

    let mut slow = Slow::connect(port, &ca).await;
    slow.send(&format!("LOGIN ann \"{PASSWORD}\"")).await;
    let reply = slow.read_some().await;
    assert!(reply.starts_with(b"230 "), "{reply:?}");
    slow.send("LIST crowd").await;
    // Others are served while the listing is stuck.
    fresh_round_trip(port, &ca, "bob", &work, "during").await;
    wait_for("the server to drop the session that does not read", || {
        disconnects(&sdir, "ann") == 1
    })
    .await;
    fresh_round_trip(port, &ca, "bob", &work, "after").await;

    // The listing never reached its final line.
    let got = String::from_utf8_lossy(&slow.read_to_end().await).into_owned();
    assert!(got.contains("213-"), "no entry arrived: {got:?}");
    assert!(
        !got.lines().any(|l| l.starts_with("213 ")),
        "the listing was completed"
    );
}

// ---------------------------------------------------------------------------
// 2.F 67: a burst of logins at a real password-hashing cost

#[tokio::test(flavor = "multi_thread")]
async fn a_login_burst_stays_within_the_hashing_memory_bound() {
    const LOGINS: usize = 60;
    const CONCURRENCY: u64 = 2;
    // scrypt needs 128 * r * N bytes: 128 * 8 * 2^14 = 16 MiB per hash.
    const PER_HASH: u64 = 16 * MIB;
    let root = scratch();
    let sdir = server_dir(
        root.path(),
        &format!("scrypt_log_n = 14\nscrypt_r = 8\nhash_concurrency = {CONCURRENCY}\n"),
        "",
        "",
    );
    let work = root.path().join("client");
    let srv = BinServer::start(&sdir, 0);
    let (port, ca, pid) = (srv.port, srv.ca(), srv.child.id());
    srv.useradd("ann", "100MiB");
    srv.useradd("bob", "100MiB");
    let mut bob = login_at(port, &ca, "bob", &work.join("journal")).await;
    let baseline = status_kib(pid, "VmRSS") * KIB;

    let mut logins = JoinSet::new();
    for i in 0..LOGINS {
        let (ca, journals) = (ca.clone(), work.join(format!("j{i}")));
        logins.spawn(async move {
            let mut c = Client::connect("127.0.0.1", port, &ca, Duration::from_secs(120))
                .await
                .unwrap()
                .with_journal_dir(journals);
            let r = c.login("ann", PASSWORD, false).await;
            (r, c)
        });
    }
    let payload = data(8 * MIB as usize, 10);
    let transfer = round_trip(&mut bob, &work, "during", &payload);
    tokio::time::timeout(Duration::from_secs(120), transfer)
        .await
        .expect("the transfer hung during the login burst");
    let mut sessions = vec![];
    while let Some(done) = logins.join_next().await {
        let (r, c) = done.unwrap();
        r.unwrap();
        sessions.push(c);
    }
    assert_eq!(sessions.len(), LOGINS);

    // Beyond the baseline: the hashes allowed at once, one more for the
    // allocator keeping a freed hash buffer, and a margin for 60 sessions'
    // buffers (2 x 64 KiB plus TLS, about 12 MiB together) and the
    // transfer's chunks in flight (a few MiB).
    let peak = status_kib(pid, "VmHWM") * KIB;
    let bound = baseline + (CONCURRENCY + 1) * PER_HASH + 24 * MIB;
    println!(
        "login burst: baseline {} MiB, peak {} MiB, bound {} MiB",
        baseline / MIB,
        peak / MIB,
        bound / MIB
    );
    assert!(
        peak < bound,
        "peak RSS {} MiB over the bound of {} MiB (baseline {} MiB)",
        peak / MIB,
        bound / MIB,
        baseline / MIB
    );
    for c in sessions {
        c.quit().await;
    }
    bob.quit().await;
}

// ---------------------------------------------------------------------------
// 2.E: a client killed while it registers

#[tokio::test(flavor = "multi_thread")]
async fn a_client_killed_while_registering_leaves_a_whole_account_or_none() {
    let root = scratch();
    // A real hashing cost (about 50 ms) so that kills land before, during
    // and after the work of registering.
    let sdir = server_dir(root.path(), "scrypt_log_n = 14\nscrypt_r = 8\n", "", "");
    let work = root.path().join("client");
    fs::create_dir_all(&work).unwrap();
    let srv = BinServer::start(&sdir, 0);
    let (port, ca) = (srv.port, srv.ca());
    let sessions = || server_log(&sdir).matches(" connected peer=").count();
    // Half the clients are killed a few milliseconds after they start (some
    // before they ever ask), half at steps through the server's work on the
    // request: the hash takes about 50 ms, then the database and the home.
    let names: Vec<String> = (0..16).map(|i| format!("reg{i:02}")).collect();
    for (i, name) in names.iter().enumerate() {
        let seen = sessions();
        let mut child = ftpx(&work)
            .args(["connect", "--register", &format!("{name}@127.0.0.1:{port}")])
            .arg("--ca")
            .arg(&ca)
            .args(["-c", "pwd"])
            .env("FTPX_PASSWORD", PASSWORD)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let step = Duration::from_millis(4 * (i as u64 % 8));
        if i >= 8 {
            let deadline = Instant::now() + GUARD;
            while sessions() == seen && child.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "the client never connected");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(step * 4).await;
        } else {
            tokio::time::sleep(step).await;
        }
        let _ = child.kill();
        child.wait().unwrap();
    }
    // Let the server finish whatever the killed clients started.
    wait_for("every session to end", || {
        let log = server_log(&sdir);
        log.matches(" connected peer=").count() == log.matches(" disconnected peer=").count()
    })
    .await;

    let out = run(ftpx(&sdir).arg("users"));
    assert_eq!(out.status, 0, "ftpx users: {}", out.stderr);
    let mut made = 0;
    for name in &names {
        let listed = out
            .stdout
            .lines()
            .any(|l| l.split_whitespace().next() == Some(name.as_str()));
        let home = sdir.join("var/homes").join(name).is_dir();
        assert_eq!(listed, home, "{name}: listed {listed}, home {home}");
        if listed {
            made += 1;
            let out = connect_c(&work, &ca, port, name, "pwd");
            assert_eq!(out.status, 0, "{name} cannot log in: {}", out.stderr);
        }
    }
    println!(
        "{made} of {} killed registrations made an account",
        names.len()
    );
    // The database still loads at a start, and the server serves.
    srv.kill9();
    let srv = BinServer::start(&sdir, port);
    srv.useradd("ann", "10MiB");
    fresh_round_trip(port, &ca, "ann", &work, "after").await;
}

// ---------------------------------------------------------------------------
// 2.E 63: SIGTERM with sessions under way

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_ends_sessions_within_the_grace_and_the_upload_resumes() {
    const GRACE: u64 = 2;
    let root = scratch();
    let sdir = server_dir(
        root.path(),
        CHEAP_HASHES,
        &format!("shutdown_grace_secs = {GRACE}\n"),
        "checkpoint_secs = 1\n",
    );
    let work = root.path().join("client");
    fs::create_dir_all(&work).unwrap();
    let mut srv = BinServer::start(&sdir, 0);
    let (port, ca) = (srv.port, srv.ca());
    srv.useradd("ann", "200MiB");
    srv.useradd("bob", "100MiB");
    let big = data(64 * MIB as usize, 11);
    fs::write(work.join("big"), &big).unwrap();

    // An idle session, and an upload paced at 4 MiB/s through a relay.
    let mut bob = login_at(port, &ca, "bob", &work.join("journal")).await;
    let relay = Relay::start(port).await;
    relay.up.rate.store(4 * MIB, SeqCst);
    let mut upload = ftpx(&work)
        .args(["connect", &format!("ann@127.0.0.1:{}", relay.port), "--ca"])
        .arg(&ca)
        .args(["-c", "put big", "--retries", "0"])
        .env("FTPX_PASSWORD", PASSWORD)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let staging = sdir.join("var/partial/ann");
    let part_len = || {
        fs::read_dir(&staging)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
            .map(|e| e.metadata().map_or(0, |m| m.len()))
            .sum::<u64>()
    };
    wait_for("the upload to get going", || part_len() >= 6 * MIB).await;

    signal(&srv.child, libc::SIGTERM);
    let (status, took) = wait_exit(
        &mut srv.child,
        Duration::from_secs(GRACE + 20),
        "the server after SIGTERM",
    )
    .await;
    assert_eq!(status, 0, "the server's exit status after SIGTERM");
    assert!(
        took < Duration::from_secs(GRACE + 10),
        "the server took {took:?} to stop with a grace of {GRACE} s"
    );
    assert!(
        bob.request(&Request::Noop).await.is_err(),
        "the idle session outlived the server"
    );
    let (status, _) = wait_exit(&mut upload, GUARD, "the interrupted upload").await;
    assert_ne!(status, 0, "the upload cannot have completed");
    assert!(!sdir.join("var/homes/ann/big").exists());

    // After a restart the same command continues where the upload stopped.
    let _srv = BinServer::start(&sdir, port);
    relay.up.open();
    let out = run(ftpx(&work)
        .args(["connect", &format!("ann@127.0.0.1:{}", relay.port), "--ca"])
        .arg(&ca)
        .args(["-c", "put big"])
        .env("FTPX_PASSWORD", PASSWORD));
    assert_eq!(out.status, 0, "{}", out.stderr);
    let resumed: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("resumed at ")?.strip_suffix(" bytes"))
        .unwrap_or_else(|| panic!("the upload did not resume: {}", out.stdout))
        .parse()
        .unwrap();
    assert!(resumed > 0);
    assert!(out.stdout.contains(&hex(&big)), "{}", out.stdout);
    assert!(fs::read(sdir.join("var/homes/ann/big")).unwrap() == big);
}

// ---------------------------------------------------------------------------
// 2.F 70: an office behind one address

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_sessions_from_one_address_all_log_in_with_the_default_limits() {
    const SESSIONS: usize = 100;
    let s = TestServer::start().await;
    let shipped = ftpx::config::Config::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/etc/ftpx.toml"
    )))
    .unwrap();
    assert_eq!(
        format!("{:?}", s.config.limits),
        format!("{:?}", shipped.limits)
    );
    for u in 0..20 {
        s.add_user(&format!("u{u:02}"), 10 * MIB);
    }
    let mut logins = JoinSet::new();
    for i in 0..SESSIONS {
        let (port, ca) = (s.addr.port(), s.ca.clone());
        let state = s.dir.path().join(format!("state{i}"));
        logins.spawn(async move {
            let mut c = Client::connect("127.0.0.1", port, &ca, Duration::from_secs(60))
                .await
                .unwrap()
                .with_journal_dir(state);
            c.login(&format!("u{:02}", i % 20), PASSWORD, false)
                .await
                .map(|()| c)
        });
    }
    let mut sessions = vec![];
    while let Some(done) = logins.join_next().await {
        sessions.push(done.unwrap().unwrap());
    }
    // All of them at once, each still usable.
    for c in &mut sessions {
        assert_eq!(c.request(&Request::Pwd).await.unwrap().code, 257);
    }
    for c in sessions {
        c.quit().await;
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------
// Log volume (THREATS 90)

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_failed_handshakes_fills_the_log_only_up_to_its_cap() {
    let root = scratch();
    let sdir = server_dir(root.path(), CHEAP_HASHES, "", "");
    let config = fs::read_to_string(sdir.join("etc/ftpx.toml")).unwrap();
    fs::write(
        sdir.join("etc/ftpx.toml"),
        config.replace("[server]\n", "[server]\nlog_max_lines_per_sec = 2\n"),
    )
    .unwrap();
    let srv = BinServer::start(&sdir, 0);
    let addr = SocketAddr::from(([127, 0, 0, 1], srv.port));
    // The flood starts in a second of its own, with the whole cap to use.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // 200 clients that speak anything but TLS: each is one log line.
    let flood = 200;
    let started = Instant::now();
    for _ in 0..flood {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let _ = tcp.write_all(b"GET / HTTP/1.0\r\n\r\n").await;
        let mut sink = Vec::new();
        let _ = tokio::time::timeout(GUARD, tcp.read_to_end(&mut sink)).await;
    }
    let seconds = started.elapsed().as_secs() + 1;
    // In a later second the server still serves, and its next line says
    // how many were dropped.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    srv.useradd("ann", "1MiB");
    let work = root.path().join("client");
    fs::create_dir_all(&work).unwrap();
    let out = connect_c(&work, &srv.ca(), srv.port, "ann", "pwd");
    assert_eq!(out.status, 0, "{}", out.stderr);
    let log = server_log(&sdir);
    let written = log.matches("TLS handshake failed").count() as u64;
    assert!(
        written >= 2 && written <= 2 * (seconds + 1),
        "{written} handshake lines in about {seconds} s with a cap of 2 a second"
    );
    let dropped: u64 = log
        .lines()
        .filter(|l| l.contains("log lines dropped"))
        .filter_map(|l| {
            l.split("dropped=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(
        written + dropped >= flood,
        "{written} written and {dropped} counted as dropped of {flood}:\n{log}"
    );
}
