//! Several nodes, one service: real `ftpx serve` processes on loopback
//! sharing one `var_dir` and one PostgreSQL database.
//!
//! The tests run against the PostgreSQL server whose URL (with a user that
//! may create databases) is in `FTPX_TEST_DATABASE_URL`, as `.ci/run` sets
//! it; without it, against a throwaway server that the first test starts
//! with `scripts/pg-test.sh` (PostgreSQL's server programs must be
//! installed) and that is stopped when the tests end. Each test makes its
//! own database. The test that stops the database starts a private server
//! of its own with the same script.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;

/// Seconds of a node's lease in these tests.
const LEASE: u64 = 3;
const GUARD: Duration = Duration::from_secs(30);

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-test.sh");

/// The PostgreSQL server the tests run against.
fn admin_url() -> String {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| match std::env::var("FTPX_TEST_DATABASE_URL") {
        Ok(url) => url,
        Err(_) => throwaway_server(),
    })
    .clone()
}

/// Where the throwaway server lives, for its stop at exit.
static THROWAWAY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

extern "C" fn stop_throwaway() {
    if let Some(dir) = THROWAWAY.get() {
        let _ = std::process::Command::new(SCRIPT)
            .arg("stop")
            .arg(dir.join("pg"))
            .output();
        let _ = fs::remove_dir_all(dir);
    }
}

/// Starts a PostgreSQL server for this run of the tests, stopped at exit.
fn throwaway_server() -> String {
    let dir = tempfile::Builder::new()
        .prefix("ftpx-pg")
        .tempdir()
        .unwrap()
        .keep();
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let out = run(std::process::Command::new(SCRIPT)
        .arg("start")
        .arg(dir.join("pg"))
        .arg(free_port().to_string()));
    assert_eq!(
        out.status, 0,
        "the cluster tests need PostgreSQL (on Debian: apt-get install postgresql), \
         or FTPX_TEST_DATABASE_URL naming a server: {}",
        out.stderr
    );
    THROWAWAY.set(dir).unwrap();
    // SAFETY: registers a plain function to run at exit.
    unsafe { libc::atexit(stop_throwaway) };
    out.stdout.trim().to_string()
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// `url` with its database name replaced by `db`.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let cut = base
        .rfind('/')
        .filter(|&i| i > "postgres://".len())
        .unwrap_or(base.len());
    let query = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("{}/{db}{query}", &base[..cut])
}

async fn sql(url: &str, statement: &str) -> Vec<tokio_postgres::Row> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {url}: {e}"));
    tokio::spawn(conn);
    client.query(statement, &[]).await.unwrap()
}

/// A new, empty database on `server` (an admin URL); its URL.
async fn fresh_database(server: &str) -> String {
    let name = format!("ftpx_test_{:016x}", rand::random::<u64>());
    sql(server, &format!("CREATE DATABASE {name}")).await;
    with_database(server, &name)
}

/// One service: a shared directory, a database, and the nodes' own dirs.
struct Service {
    root: tempfile::TempDir,
    url: String,
    /// More `[cluster]` settings for every node.
    cluster: String,
    /// More `[defender]` settings for every node.
    defender: String,
}

impl Service {
    async fn new() -> Service {
        Service::on(&fresh_database(&admin_url()).await)
    }

    /// A service on the database at `url`, with a certificate all its nodes share.
    fn on(url: &str) -> Service {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("shared")).unwrap();
        let out = run(ftpx(root.path())
            .args(["gen-cert", "--dir"])
            .arg(root.path().join("shared/certs")));
        assert_eq!(out.status, 0, "{}", out.stderr);
        Service {
            root,
            url: url.to_string(),
            cluster: String::new(),
            defender: String::new(),
        }
    }

    fn shared(&self) -> PathBuf {
        self.root.path().join("shared")
    }

    fn ca(&self) -> PathBuf {
        self.shared().join("certs/ca.pem")
    }

    /// The directory of node `n`, with its config.
    fn node_dir(&self, n: usize) -> PathBuf {
        self.node_dir_with(n, "")
    }

    /// The same, with more sections for the config.
    fn node_dir_with(&self, n: usize, more: &str) -> PathBuf {
        let dir = self.root.path().join(format!("node{n}"));
        fs::create_dir_all(dir.join("etc")).unwrap();
        fs::write(
            dir.join("etc/ftpx.toml"),
            format!(
                "[server]\nlog_level = \"debug\"\nvar_dir = {var:?}\ncert_dir = {certs:?}\n\
                 log_file = \"log/ftpx.log\"\n\
                 [accounts]\nscrypt_log_n = 4\nscrypt_r = 1\nlogin_failure_delay_ms = 100\n\
                 [defender]\npair_max_failures = 3\nsource_max_accounts = 4\nregistrations_per_hour = 2\n{defender}\
                 [cluster]\ndatabase = {url:?}\nlease_secs = {LEASE}\n\
                 connect_timeout_ms = 1000\nstatement_timeout_ms = 2000\n{cluster}{more}",
                var = self.shared().join("var"),
                certs = self.shared().join("certs"),
                url = self.url,
                cluster = self.cluster,
                defender = self.defender,
            ),
        )
        .unwrap();
        dir
    }

    fn start(&self, n: usize) -> BinServer {
        BinServer::start_keeping_stderr(&self.node_dir(n), 0)
    }

    /// A client's working directory.
    fn work(&self) -> PathBuf {
        let dir = self.root.path().join("client");
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn useradd(&self, name: &str, quota: &str) {
        let out = run(ftpx(&self.node_dir(0))
            .args(["useradd", name, "--quota", quota, "--password-stdin"])
            .stdin(write_stdin(&format!("{PASSWORD}\n"))));
        assert_eq!(out.status, 0, "{}", out.stderr);
    }

    fn connect(&self, node: &BinServer, user: &str, commands: &str) -> Output {
        connect_c(&self.work(), &self.ca(), node.port, user, commands)
    }

    fn log(&self, n: usize) -> String {
        fs::read_to_string(self.node_dir(n).join("log/ftpx.log")).unwrap_or_default()
    }

    async fn query(&self, statement: &str) -> Vec<tokio_postgres::Row> {
        sql(&self.url, statement).await
    }
}

async fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + GUARD;
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Bytes in the partial files of `user`'s unfinished uploads.
fn partial_bytes(shared: &Path, user: &str) -> u64 {
    fs::read_dir(shared.join("var/partial").join(user))
        .map(|items| {
            items
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
                .map(|e| e.metadata().map_or(0, |m| m.len()))
                .sum()
        })
        .unwrap_or(0)
}

/// `put big` by ann through a relay in front of `node` that holds the
/// upload after `held` bytes: the upload stays under way until the test
/// lets it go (`relay.up.open()`) or kills what it runs on.
async fn held_upload(
    svc: &Service,
    node: &BinServer,
    held: u64,
) -> (crate::faults::Relay, std::process::Child) {
    let relay = crate::faults::Relay::start(node.port).await;
    relay.up.stop_after(held);
    let upload = ftpx(&svc.work())
        .args(["connect", &format!("ann@127.0.0.1:{}", relay.port)])
        .arg("--ca")
        .arg(svc.ca())
        .args(["--retries", "0", "-c", "put big"])
        .env("FTPX_PASSWORD", PASSWORD)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (relay, upload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_together_share_accounts_made_on_any_of_them() {
    let svc = Service::new().await;
    // Three nodes at once on an empty database: one of them creates the schema.
    let dirs: Vec<PathBuf> = (0..3).map(|n| svc.node_dir(n)).collect();
    let starts: Vec<_> = dirs
        .into_iter()
        .map(|d| std::thread::spawn(move || BinServer::start_keeping_stderr(&d, 0)))
        .collect();
    let nodes: Vec<BinServer> = starts.into_iter().map(|t| t.join().unwrap()).collect();
    let version = svc.query("SELECT max(version) FROM ftpx_schema").await;
    assert_eq!(version[0].get::<_, Option<i32>>(0), Some(1));

    // An account added by the admin logs in on every node.
    svc.useradd("ann", "1MiB");
    for node in &nodes {
        let out = svc.connect(node, "ann", "pwd");
        assert_eq!(out.status, 0, "node {}: {}", node.port, out.stderr);
    }
    // Nothing of it went to a users.toml.
    assert!(!svc.shared().join("var/users.toml").exists());

    // A user registered through one node logs in on another, with the same home.
    let work = svc.work();
    fs::write(work.join("note.txt"), b"from node 0").unwrap();
    let out = run(ftpx(&work)
        .args([
            "connect",
            "--register",
            &format!("newbie@127.0.0.1:{}", nodes[0].port),
        ])
        .arg("--ca")
        .arg(svc.ca())
        .args(["-c", "put note.txt"])
        .env("FTPX_PASSWORD", PASSWORD));
    assert_eq!(out.status, 0, "{}", out.stderr);
    let out = svc.connect(&nodes[2], "newbie", "ls; quota");
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(out.stdout.contains("note.txt"), "{}", out.stdout);
    assert!(out.stdout.contains("used 11 "), "{}", out.stdout);

    // A password changed on one node counts on all at the next login.
    let out = run(ftpx(&svc.node_dir(1))
        .args(["usermod", "ann", "--password-stdin"])
        .stdin(write_stdin("a new password 42\n")));
    assert_eq!(out.status, 0, "{}", out.stderr);
    let out = svc.connect(&nodes[2], "ann", "pwd");
    assert_ne!(out.status, 0, "the old password still works");
    // At log level debug, no statement's parameters reach a log: no hash.
    for n in 0..3 {
        assert!(
            !svc.log(n).contains("$scrypt$"),
            "node {n} logged a password hash"
        );
    }
    let users = run(ftpx(&svc.node_dir(2)).arg("users"));
    assert!(
        users.stdout.contains("ann") && users.stdout.contains("newbie"),
        "{}",
        users.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_sessions_on_two_nodes_share_one_quota() {
    let svc = Service::new().await;
    let nodes = [svc.start(0), svc.start(1)];
    let work = svc.work();
    // Four uploads of 4 MiB each against 10 MiB: at most two fit.
    for i in 0..4 {
        fs::write(work.join(format!("f{i}")), data(4 << 20, i as u8)).unwrap();
    }
    // Three rounds, a user each: a race lost once in a round is caught.
    for user in ["ann", "bob", "cat"] {
        svc.useradd(user, "10MiB");
        race_for_one_quota(&svc, &nodes, user).await;
    }
}

/// Four sessions of `user`, two on each node, each putting 4 MiB against
/// a quota of 10 MiB, all reaching the database at once.
async fn race_for_one_quota(svc: &Service, nodes: &[BinServer; 2], user: &str) {
    // The test holds the usage table while the four log in, so that they
    // all reach the database at once when it lets go.
    let (mut db, conn) = tokio_postgres::connect(&svc.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let hold = db.transaction().await.unwrap();
    hold.batch_execute("LOCK TABLE usage IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let clients: Vec<_> = (0..4)
        .map(|i| {
            ftpx(&svc.work())
                .args([
                    "connect",
                    &format!("{user}@127.0.0.1:{}", nodes[i % 2].port),
                ])
                .arg("--ca")
                .arg(svc.ca())
                .args(["-c", &format!("put f{i}")])
                .env("FTPX_PASSWORD", PASSWORD)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // Well below the nodes' lock timeout (2 s), which the last in the queue
    // also spends waiting for the three before it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    hold.commit().await.unwrap();
    let outs: Vec<_> = clients
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let ok = outs.iter().filter(|o| o.status.success()).count();
    let errors: Vec<_> = outs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert_eq!(ok, 2, "{user}: uploads that got in: {ok} of 4: {errors:?}");
    for o in outs.iter().filter(|o| !o.status.success()) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("quota"), "{err}");
    }
    let home: u64 = fs::read_dir(svc.shared().join("var/homes").join(user))
        .unwrap()
        .flatten()
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert_eq!(home, 8 << 20);
    // The database's numbers are the disk's, with nothing left reserved.
    let usage = svc
        .query(&format!(
            "SELECT bytes, entries FROM usage WHERE name = '{user}'"
        ))
        .await;
    assert_eq!(usage[0].get::<_, i64>(0), 8 << 20);
    assert_eq!(usage[0].get::<_, i64>(1), 2);
    let reserved = svc
        .query(&format!(
            "SELECT count(*) FROM reservations WHERE name = '{user}'"
        ))
        .await;
    assert_eq!(reserved[0].get::<_, i64>(0), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_by_sigkill_of_its_node_resumes_through_another() {
    let svc = Service::new().await;
    let (a, b) = (svc.start(0), svc.start(1));
    svc.useradd("ann", "100MiB");
    let work = svc.work();
    let big = data(24 << 20, 7);
    fs::write(work.join("big"), &big).unwrap();
    // Through a relay that holds the upload after 8 MiB, so that node A is
    // killed with the upload surely under way.
    let (_relay, mut upload) = held_upload(&svc, &a, 8 << 20).await;
    let shared = svc.shared();
    wait_for("the upload to get going", || {
        partial_bytes(&shared, "ann") >= 4 << 20
    })
    .await;
    a.kill9();
    // The client, stuck writing into the held relay, is of no more use.
    let _ = upload.kill();
    let _ = upload.wait();

    // Node B resumes it, once node A's lock on the path has lapsed with its lease.
    let started = Instant::now();
    let out = loop {
        let out = svc.connect(&b, "ann", "put big");
        if out.status == 0 || started.elapsed() > GUARD {
            break out;
        }
        assert!(out.stderr.contains("busy"), "{}", out.stderr);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(out.status, 0, "{}", out.stderr);
    let resumed: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("resumed at ")?.strip_suffix(" bytes"))
        .unwrap_or_else(|| panic!("the upload did not resume: {}", out.stdout))
        .parse()
        .unwrap();
    assert!(resumed > 0);
    assert!(fs::read(shared.join("var/homes/ann/big")).unwrap() == big);
    let usage = svc
        .query("SELECT bytes FROM usage WHERE name = 'ann'")
        .await;
    assert_eq!(usage[0].get::<_, i64>(0), 24 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_reservation_is_freed_when_its_lease_runs_out() {
    let svc = Service::new().await;
    let (a, b) = (svc.start(0), svc.start(1));
    // An upload of one chunk (256 KiB): no journal, nothing to resume, so
    // only its running reservation charges it once it is cut.
    svc.useradd("ann", "300KiB");
    let work = svc.work();
    fs::write(work.join("big"), data(200 << 10, 1)).unwrap();
    fs::write(work.join("mid"), data(150 << 10, 2)).unwrap();
    let (_relay, mut upload) = held_upload(&svc, &a, 100 << 10).await;
    let deadline = Instant::now() + GUARD;
    while svc
        .query("SELECT 1 FROM reservations WHERE node IS NOT NULL")
        .await
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the upload never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // While node A lives, its reservation of 200 KiB leaves no room for 150.
    let out = svc.connect(&b, "ann", "put mid");
    assert_ne!(out.status, 0, "{}", out.stdout);
    assert!(out.stderr.contains("quota"), "{}", out.stderr);

    a.kill9();
    // The client, stuck writing into the held relay, is of no more use.
    let _ = upload.kill();
    let _ = upload.wait();
    let killed = Instant::now();
    // Once A's lease is over, the reservation no longer counts.
    let out = loop {
        let out = svc.connect(&b, "ann", "put mid");
        if out.status == 0 || killed.elapsed() > GUARD {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(
        killed.elapsed() >= Duration::from_secs(LEASE) - Duration::from_millis(500),
        "freed after {:?}, before the lease of {LEASE} s ran out",
        killed.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_by_one_node_holds_on_another() {
    let svc = Service::new().await;
    let (a, b) = (svc.start(0), svc.start(1));
    svc.useradd("ann", "1MiB");
    svc.useradd("bob", "1MiB");
    // Three wrong passwords for ann through node A: the pair is banned.
    for _ in 0..3 {
        let out = run(ftpx(&svc.work())
            .args(["connect", &format!("ann@127.0.0.1:{}", a.port), "--ca"])
            .arg(svc.ca())
            .args(["-c", "pwd"])
            .env("FTPX_PASSWORD", "wrong password"));
        assert_ne!(out.status, 0);
    }
    wait_for("the ban to reach the database", || {
        svc.log(0).contains("banned on every node")
    })
    .await;
    // The right password for ann through node B is refused: the pair is banned there too.
    let out = svc.connect(&b, "ann", "pwd");
    assert_ne!(out.status, 0, "ann got in on node B: {}", out.stdout);
    assert!(svc.log(1).contains("result=\"banned\""), "{}", svc.log(1));
    // bob, from the same address, still gets in on both.
    for node in [&a, &b] {
        let out = svc.connect(node, "bob", "pwd");
        assert_eq!(out.status, 0, "{}", out.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_ride_out_the_database_stopping_and_starting() {
    // A private PostgreSQL server, since this test stops it.
    let pg = tempfile::tempdir().unwrap();
    // The server runs as the postgres user when the tests run as root.
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(pg.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let port = free_port();
    let script = SCRIPT;
    let pgdir = pg.path().join("pg");
    let start = || {
        let out = run(std::process::Command::new(script)
            .args(["start"])
            .arg(&pgdir)
            .arg(port.to_string()));
        assert_eq!(out.status, 0, "{}", out.stderr);
        out.stdout.trim().to_string()
    };
    let stop = || {
        run(std::process::Command::new(script)
            .args(["stop"])
            .arg(&pgdir));
    };
    let admin = start();
    struct Stop<F: Fn()>(F);
    impl<F: Fn()> Drop for Stop<F> {
        fn drop(&mut self) {
            (self.0)()
        }
    }
    let _stop = Stop(stop);

    let svc = Service::on(&fresh_database(&admin).await);
    let (a, b) = (svc.start(0), svc.start(1));
    svc.useradd("ann", "100MiB");
    assert_eq!(svc.connect(&a, "ann", "pwd").status, 0);

    // An upload under way through node A when the database goes away.
    let work = svc.work();
    let big = data(8 << 20, 3);
    fs::write(work.join("big"), &big).unwrap();
    let (relay, upload) = held_upload(&svc, &a, 2 << 20).await;
    let shared = svc.shared();
    wait_for("the upload to get going", || {
        partial_bytes(&shared, "ann") > 0
    })
    .await;

    (_stop.0)();
    // Node A can't renew its lease: within half of it, it cuts the upload
    // (no other node may take it over while A writes), which stops resumable.
    wait_for("node A to fence itself", || {
        svc.log(0).contains("may have lost its lease")
    })
    .await;
    let cut = || {
        svc.log(0).lines().any(|l| {
            l.contains("event=transfer") && l.contains("\"PUT\"") && l.contains("result=\"failed\"")
        })
    };
    wait_for("node A to cut the upload", cut).await;
    relay.up.open();
    let out = upload.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(!shared.join("var/homes/ann/big").exists());
    assert!(
        partial_bytes(&shared, "ann") > 0,
        "the partial upload was lost"
    );

    // Logins fail with a clear error; the nodes stay up.
    for node in [&a, &b] {
        let out = svc.connect(node, "ann", "pwd");
        assert_ne!(out.status, 0);
        assert!(out.stderr.contains("unavailable"), "{}", out.stderr);
    }
    let mut a = a;
    assert!(a.child.try_wait().unwrap().is_none(), "node A exited");

    // Started again (same data), the nodes work without a restart.
    start();
    let deadline = Instant::now() + GUARD;
    for node in [&a, &b] {
        loop {
            let out = svc.connect(node, "ann", "pwd");
            if out.status == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} never recovered: {}",
                node.port,
                out.stderr
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The upload resumes through node B from what had arrived, and its
    // usage is recorded once it lands.
    let out = svc.connect(&b, "ann", "put big");
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(out.stdout.contains("resumed at "), "{}", out.stdout);
    assert!(fs::read(shared.join("var/homes/ann/big")).unwrap() == big);
    let usage = svc
        .query("SELECT bytes FROM usage WHERE name = 'ann'")
        .await;
    assert_eq!(usage[0].get::<_, i64>(0), 8 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_connection_can_be_tls_with_its_certificate_checked() {
    // A private PostgreSQL server with TLS, its certificate from our own CA.
    let pg = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(pg.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let certs = pg.path().join("certs");
    let out = run(ftpx(pg.path()).args(["gen-cert", "--dir"]).arg(&certs));
    assert_eq!(out.status, 0, "{}", out.stderr);
    fs::set_permissions(&certs, fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(certs.join("server.pem"), fs::Permissions::from_mode(0o644)).unwrap();
    if unsafe { libc::geteuid() } == 0 {
        // The key must belong to the server's user, who runs it as root's tests do.
        let out = run(std::process::Command::new("chown")
            .arg("postgres")
            .arg(certs.join("server.key")));
        assert_eq!(out.status, 0, "{}", out.stderr);
    }
    let pgdir = pg.path().join("pg");
    let out = run(std::process::Command::new(SCRIPT)
        .arg("start")
        .arg(&pgdir)
        .arg(free_port().to_string())
        .env(
            "PG_TEST_OPTIONS",
            format!(
                "-c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                certs.join("server.pem").display(),
                certs.join("server.key").display()
            ),
        ));
    assert_eq!(out.status, 0, "{}", out.stderr);
    let admin = out.stdout.trim().to_string();
    struct Stop(PathBuf);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = std::process::Command::new(SCRIPT)
                .arg("stop")
                .arg(&self.0)
                .output();
        }
    }
    let _stop = Stop(pgdir);

    let url = format!("{}?sslmode=require", fresh_database(&admin).await);
    let mut svc = Service::on(&url);
    svc.cluster = format!("ca_file = {:?}\n", certs.join("ca.pem"));
    let node = svc.start(0);
    svc.useradd("ann", "1MiB");
    assert_eq!(svc.connect(&node, "ann", "pwd").status, 0);
    let plain = url.split('?').next().unwrap().to_string();
    let tls = sql(
        &plain,
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_ssl s
         JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'ftpx'",
    )
    .await;
    let (on_tls, all): (i64, i64) = (tls[0].get(0), tls[0].get(1));
    assert!(
        all > 0 && on_tls == all,
        "{on_tls} of {all} connections are TLS"
    );

    // A CA that did not sign the database's certificate: the node refuses
    // to start rather than talk to an unproven server.
    let other = pg.path().join("other");
    let out = run(ftpx(pg.path()).args(["gen-cert", "--dir"]).arg(&other));
    assert_eq!(out.status, 0, "{}", out.stderr);
    svc.cluster = format!("ca_file = {:?}\n", other.join("ca.pem"));
    let dir = svc.node_dir(1);
    let out = run(ftpx(&dir).args(["serve", "--listen", "127.0.0.1:0"]));
    assert_ne!(out.status, 0, "{}", out.stdout);
    assert!(
        out.stderr.contains("cannot start on the database"),
        "{}",
        out.stderr
    );
}

/// `n` logins of `user` with `password` through `nodes` in turn, all at once;
/// their exit statuses.
fn logins_at_once(
    svc: &Service,
    nodes: &[&BinServer],
    user: &str,
    password: &str,
    n: usize,
) -> Vec<i32> {
    let work = svc.work();
    let children: Vec<_> = (0..n)
        .map(|i| {
            ftpx(&work)
                .args([
                    "connect",
                    &format!("{user}@127.0.0.1:{}", nodes[i % nodes.len()].port),
                ])
                .arg("--ca")
                .arg(svc.ca())
                .args(["-c", "pwd"])
                .env("FTPX_PASSWORD", password)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|mut c| c.wait().unwrap().code().unwrap_or(-1))
        .collect()
}

/// Failed logins a node's log shows as evaluated (the password checked and wrong).
fn evaluated_failures(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("ann") && l.contains("result=\"failed\""))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guesses_sent_at_once_to_two_nodes_get_no_more_evaluated_than_one_by_one() {
    let svc = Service::new().await;
    let (a, b) = (svc.start(0), svc.start(1));
    svc.useradd("ann", "1MiB");
    // 16 wrong guesses at once, half to each node, against a limit of 3.
    let statuses = logins_at_once(&svc, &[&a, &b], "ann", "wrong password", 16);
    assert!(statuses.iter().all(|&s| s != 0));
    let evaluated = evaluated_failures(&svc.log(0)) + evaluated_failures(&svc.log(1));
    assert!(
        (1..=3).contains(&evaluated),
        "{evaluated} guesses were evaluated on the two nodes together; the limit is 3"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_from_one_address_count_on_all_nodes_together() {
    let svc = Service::new().await;
    let (a, b) = (svc.start(0), svc.start(1));
    let register = |node: &BinServer, name: &str| {
        run(ftpx(&svc.work())
            .args([
                "connect",
                "--register",
                &format!("{name}@127.0.0.1:{}", node.port),
            ])
            .arg("--ca")
            .arg(svc.ca())
            .args(["-c", "pwd"])
            .env("FTPX_PASSWORD", PASSWORD))
    };
    // Two an hour from one address: one on each node, then none on either.
    assert_eq!(register(&a, "reg1").status, 0);
    assert_eq!(register(&b, "reg2").status, 0);
    for (node, name) in [(&a, "reg3"), (&b, "reg4")] {
        let out = register(node, name);
        assert_ne!(out.status, 0, "{name} was registered");
        assert!(
            out.stderr.contains("too many registrations"),
            "{}",
            out.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_nodes_accounts_are_imported_into_the_cluster() {
    let svc = Service::new().await;
    // Accounts made on a single node, in its users.toml.
    let single = svc.root.path().join("single");
    fs::create_dir_all(single.join("etc")).unwrap();
    fs::write(single.join("etc/ftpx.toml"), test_config_toml()).unwrap();
    for name in ["ann", "bob"] {
        let out = run(ftpx(&single)
            .args(["useradd", name, "--quota", "2MiB", "--password-stdin"])
            .stdin(write_stdin(&format!("{PASSWORD}\n"))));
        assert_eq!(out.status, 0, "{}", out.stderr);
    }
    // bob is in the cluster already, with another password: he stays as he is.
    let out = run(ftpx(&svc.node_dir(0))
        .args(["useradd", "bob", "--quota", "5MiB", "--password-stdin"])
        .stdin(write_stdin("bobs own password\n")));
    assert_eq!(out.status, 0, "{}", out.stderr);
    let out = run(ftpx(&svc.node_dir(0))
        .arg("import-users")
        .arg(single.join("var/users.toml")));
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(out.stdout.contains("imported 1 of 2"), "{}", out.stdout);
    let node = svc.start(1);
    let out = svc.connect(&node, "ann", "quota");
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(out.stdout.contains("of 2097152"), "{}", out.stdout);
    assert_ne!(svc.connect(&node, "bob", "pwd").status, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_stuck_on_a_lock_gives_up_at_the_statement_timeout() {
    let svc = Service::new().await;
    // pool_size 2: more logins at once than connections wait for one.
    let dir = svc.node_dir_with(0, "pool_size = 2\n");
    let node = BinServer::start_keeping_stderr(&dir, 0);
    svc.useradd("ann", "1MiB");
    assert_eq!(svc.connect(&node, "ann", "pwd").status, 0);
    // Six logins at once through a pool of two connections all get in, and
    // the node never holds more than two.
    let statuses = logins_at_once(&svc, &[&node], "ann", PASSWORD, 6);
    assert!(statuses.iter().all(|&s| s == 0), "{statuses:?}");
    // The test holds the usage table: a login's statement waits for it no
    // longer than statement_timeout_ms (2 s here), then says why.
    let (mut db, conn) = tokio_postgres::connect(&svc.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let hold = db.transaction().await.unwrap();
    hold.batch_execute("LOCK TABLE usage IN EXCLUSIVE MODE")
        .await
        .unwrap();
    let started = Instant::now();
    let out = svc.connect(&node, "ann", "pwd");
    let took = started.elapsed();
    assert_ne!(out.status, 0);
    assert!(out.stderr.contains("unavailable"), "{}", out.stderr);
    assert!(
        took >= Duration::from_millis(1800) && took < Duration::from_secs(10),
        "the login gave up after {took:?}"
    );
    // The client is told the service is unavailable; the log says why.
    assert!(!out.stderr.contains("statement"), "{}", out.stderr);
    assert!(
        svc.log(0)
            .contains("canceling statement due to statement timeout"),
        "{}",
        svc.log(0)
    );
    let connections = svc
        .query("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'ftpx' AND datname = current_database()")
        .await;
    assert!(
        connections[0].get::<_, i64>(0) <= 2,
        "more connections than pool_size"
    );
    hold.rollback().await.unwrap();
    assert_eq!(svc.connect(&node, "ann", "pwd").status, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admins_change_on_one_node_reaches_sessions_open_on_another() {
    let svc = Service::new().await;
    let b = svc.start(1);
    svc.useradd("ann", "1MiB");
    let mut c = ftpx::client::Client::connect("127.0.0.1", b.port, &svc.ca(), GUARD)
        .await
        .unwrap()
        .with_journal_dir(svc.root.path().join("journals"));
    c.login("ann", PASSWORD, false).await.unwrap();
    let limit = |text: &str| text.split(' ').nth(1).map(str::to_string);
    let quota = ftpx::protocol::Request::Quota;
    let r = c.request(&quota).await.unwrap();
    assert_eq!(limit(&r.text).as_deref(), Some("1048576"));
    // Changed through node 0's config (no node 0 even runs).
    let out = run(ftpx(&svc.node_dir(0)).args(["usermod", "ann", "--quota", "2MiB"]));
    assert_eq!(out.status, 0, "{}", out.stderr);
    let deadline = Instant::now() + GUARD;
    loop {
        let r = c.request(&quota).await.unwrap();
        if limit(&r.text).as_deref() == Some("2097152") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the session never saw the new quota"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Removed, the account's open session ends at its next request.
    let out = run(ftpx(&svc.node_dir(0)).args(["userdel", "ann"]));
    assert_eq!(out.status, 0, "{}", out.stderr);
    let deadline = Instant::now() + GUARD;
    loop {
        match c.request(&ftpx::protocol::Request::Pwd).await {
            Ok(r) if r.code == 421 => break,
            Err(_) => break,
            Ok(_) => {}
        }
        assert!(
            Instant::now() < deadline,
            "the session outlived its account"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_spraying_passwords_through_one_node_is_banned_on_another() {
    let svc = Service::new().await;
    let (a, b) = (svc.start(0), svc.start(1));
    svc.useradd("bob", "1MiB");
    // One wrong guess each for four accounts through node A: spraying.
    for name in ["sp1", "sp2", "sp3", "sp4"] {
        let statuses = logins_at_once(&svc, &[&a], name, "wrong password", 1);
        assert_ne!(statuses[0], 0);
    }
    wait_for("the address's ban to reach the database", || {
        svc.log(0).contains("failed logins on many accounts")
    })
    .await;
    // bob's right password through node B: refused, his address is banned.
    let out = svc.connect(&b, "bob", "pwd");
    assert_ne!(out.status, 0, "bob got in through node B: {}", out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_ban_lasts_its_time_even_past_the_window_of_failures() {
    let mut svc = Service::new().await;
    svc.defender = "window_secs = 1\nban_secs = 60\n".into();
    let (a, b) = (svc.start(0), svc.start(1));
    svc.useradd("ann", "1MiB");
    for _ in 0..3 {
        assert_ne!(
            logins_at_once(&svc, &[&a], "ann", "wrong password", 1)[0],
            0
        );
    }
    wait_for("the ban", || svc.log(0).contains("banned on every node")).await;
    // The window of failures is over; the ban of 60 s is not.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let out = svc.connect(&b, "ann", "pwd");
    assert_ne!(
        out.status, 0,
        "ann got in on node B once the window was over"
    );
}
