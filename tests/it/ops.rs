//! The operator's kit, against the real binary: the log's one schema (text
//! and JSON), its reopening on SIGHUP, the transfer id both ends log, the
//! metrics listener, `ftpx status` and `ftpx kick`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use ftpx::client::Client;
use ftpx::protocol::{FrameHeader, Request};
use serde_json::Value;

use crate::common::*;
use crate::transfer::{MIB, PIECE, put_request, send_chunks};

/// The test settings with `lines` added to `[server]`.
fn config_with(lines: &str) -> String {
    test_config_toml().replacen("[server]\n", &format!("[server]\n{lines}\n"), 1)
}

/// A server run by the binary in `dir` with `lines` in `[server]`.
fn start_with(dir: &Path, lines: &str) -> BinServer {
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(dir.join("etc/ftpx.toml"), config_with(lines)).unwrap();
    BinServer::start(dir, 0)
}

fn server_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("var/log/ftpx.log")).unwrap_or_default()
}

/// The lines of a JSON log, each parsed.
fn json_lines(log: &str) -> Vec<serde_json::Map<String, Value>> {
    log.lines()
        .map(|l| match serde_json::from_str(l) {
            Ok(Value::Object(o)) => o,
            _ => panic!("not a JSON object: {l}"),
        })
        .collect()
}

/// The JSON type of a value, by name.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::String(_) => "string",
        Value::Number(_) => "number",
        Value::Bool(_) => "bool",
        _ => "other",
    }
}

/// Our own lines: those that come from libraries (at debug level) name their `target`.
fn ours(lines: &[serde_json::Map<String, Value>]) -> Vec<&serde_json::Map<String, Value>> {
    lines.iter().filter(|l| !l.contains_key("target")).collect()
}

#[test]
fn a_json_log_of_a_real_session_keeps_one_schema() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), "log_format = \"json\"");
    server.useradd("ann", "1MiB");
    std::fs::write(dir.path().join("small.txt"), b"hello\n").unwrap();
    std::fs::write(dir.path().join("big.bin"), data(2 << 20, 3)).unwrap();
    let commands = "mkdir d; cd d; pwd; put small.txt copy.txt; ls; quota; get copy.txt back.txt; \
                    mv copy.txt c2.txt; -rm nothing.txt; -put big.bin big.bin; rm c2.txt";
    let out = connect_c(dir.path(), &server.ca(), server.port, "ann", commands);
    assert_eq!(out.status, 0, "{}", out.stderr);
    let bad = run(ftpx(dir.path())
        .args([
            "connect",
            &format!("ann@127.0.0.1:{}", server.port),
            "-c",
            "pwd",
        ])
        .env("FTPX_PASSWORD", "not the password"));
    assert_ne!(bad.status, 0);
    assert_eq!(server.terminate(), 0);

    let log = server_log(dir.path());
    assert!(!log.contains(PASSWORD) && !log.contains("not the password"));
    assert!(!log.contains("$scrypt$"), "a password hash reached the log");
    let lines = json_lines(&log);
    let mut types: HashMap<String, &'static str> = HashMap::new();
    for line in ours(&lines) {
        let event = line["event"].as_str().unwrap();
        assert!(ftpx::logging::schema::EVENTS.contains(&event), "{line:?}");
        assert_ne!(event, "other", "a line without its event: {line:?}");
        assert!(!line["message"].as_str().unwrap().is_empty(), "{line:?}");
        for (key, value) in line {
            let was = types.entry(key.clone()).or_insert(kind(value));
            assert_eq!(*was, kind(value), "{key} changes type: {line:?}");
        }
    }
    for (key, want) in [
        ("user", "string"),
        ("peer", "string"),
        ("path", "string"),
        ("id", "string"),
        ("result", "string"),
        ("bytes", "number"),
        ("entries", "number"),
        ("ms", "number"),
        ("code", "number"),
        ("size", "number"),
    ] {
        assert_eq!(types.get(key), Some(&want), "{key}");
    }
    assert_session_defects_fixed(&lines);
}

/// The defects the log had, each checked in a JSON log of a session.
fn assert_session_defects_fixed(lines: &[serde_json::Map<String, Value>]) {
    let request = |verb: &str| -> Vec<&serde_json::Map<String, Value>> {
        lines
            .iter()
            .filter(|l| l.get("request").and_then(Value::as_str) == Some(verb))
            .collect()
    };
    let list = request("LIST");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["entries"], 1);
    assert!(!list[0].contains_key("bytes"), "{:?}", list[0]);
    for verb in ["PWD", "QUOTA"] {
        // The wrong password's PWD, sent with its login, was refused (530)
        // for no user: not this session's.
        let logged: Vec<_> = request(verb)
            .into_iter()
            .filter(|l| l.contains_key("user"))
            .collect();
        assert_eq!(logged.len(), 1, "{verb}: {logged:?}");
        assert_eq!(logged[0]["event"], "command");
        assert_eq!(logged[0]["result"], "ok");
    }
    // `put FILE REMOTE` asks whether REMOTE is a directory: an answer, not a failure.
    for stat in request("STAT") {
        assert_ne!(stat["result"], "failed", "{stat:?}");
    }
    assert!(request("STAT").iter().any(|l| l["result"] == "absent"));
    // The refused upload is one line, with the code it was refused with.
    let big: Vec<_> = request("PUT")
        .into_iter()
        .filter(|l| l["path"] == "/d/big.bin")
        .collect();
    assert_eq!(big.len(), 1, "{big:?}");
    assert_eq!(big[0]["event"], "transfer");
    assert_eq!(big[0]["result"], "refused");
    assert_eq!(big[0]["code"], 552);
    let code = |l: &serde_json::Map<String, Value>| l.get("code").and_then(Value::as_u64);
    assert!(
        !lines
            .iter()
            .any(|l| l["event"] == "command" && code(l) == Some(552))
    );
    // A failed command is a command line that says so; a failed login its own event.
    let rm = request("DELE");
    assert!(
        rm.iter()
            .any(|l| l["result"] == "failed" && l["code"] == 550),
        "{rm:?}"
    );
    assert!(rm.iter().any(|l| l["result"] == "ok"), "{rm:?}");
    let failed = lines.iter().find(|l| l["event"] == "login_failed").unwrap();
    assert_eq!(failed["user"], "ann");
    let renamed = request("RENAME");
    assert_eq!(renamed[0]["to"], "/d/c2.txt");
}

#[test]
fn a_text_log_quotes_every_string_and_has_a_message_on_every_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(dir.path(), 0);
    server.useradd("bo", "1MiB");
    std::fs::write(dir.path().join("a b.txt"), b"x").unwrap();
    let out = connect_c(
        dir.path(),
        &server.ca(),
        server.port,
        "bo",
        "put \"a b.txt\"; pwd; ls",
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    server.terminate();
    let log = server_log(dir.path());
    for line in log.lines().filter(|l| !l.contains(" target=")) {
        // TIME LEVEL MESSAGE event=NAME ...: a message before the event.
        let head = line.split(" event=").next().unwrap();
        let words: Vec<&str> = head.split_whitespace().collect();
        assert!(words.len() >= 3, "no message: {line}");
        assert!(
            !line.contains("user=bo") && !line.contains("user=-"),
            "{line}"
        );
    }
    let upload = log.lines().find(|l| l.contains("event=transfer")).unwrap();
    assert!(upload.contains(" path=\"/a b.txt\" "), "{upload}");
    assert!(
        upload.contains(" user=\"bo\" ") && upload.contains(" bytes=1 "),
        "{upload}"
    );
}

#[test]
fn sighup_makes_the_server_write_to_a_fresh_log_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(dir.path(), 0);
    server.useradd("cy", "1MiB");
    assert_eq!(
        connect_c(dir.path(), &server.ca(), server.port, "cy", "pwd").status,
        0
    );
    let log = dir.path().join("var/log/ftpx.log");
    let rotated = dir.path().join("var/log/ftpx.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server_log(dir.path()).contains("log file reopened") {
        assert!(Instant::now() < deadline, "no fresh log file after SIGHUP");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        connect_c(dir.path(), &server.ca(), server.port, "cy", "quota").status,
        0
    );
    assert_eq!(server.terminate(), 0, "SIGHUP must not stop the server");
    let fresh = server_log(dir.path());
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(
        fresh.contains("request=\"QUOTA\"") && !old.contains("request=\"QUOTA\""),
        "{fresh}"
    );
    assert!(
        old.contains("request=\"PWD\"") && !fresh.contains("request=\"PWD\""),
        "{old}"
    );
}

/// The values of `id=` in the client log's lines that contain `what`.
fn client_ids(log: &str, what: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| l.split(" id=").nth(1))
        .map(|rest| {
            rest.split(' ')
                .next()
                .unwrap()
                .trim_matches('"')
                .to_string()
        })
        .collect()
}

#[test]
fn client_and_server_log_the_same_transfer_id() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), "log_format = \"json\"");
    server.useradd("di", "10MiB");
    std::fs::write(dir.path().join("big.bin"), data(3 << 20, 4)).unwrap();
    std::fs::create_dir(dir.path().join("tree")).unwrap();
    std::fs::write(dir.path().join("tree/small.bin"), data(1000, 5)).unwrap();
    let out = connect_c(
        dir.path(),
        &server.ca(),
        server.port,
        "di",
        "put big.bin; get big.bin big2.bin; put -r tree t",
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    server.terminate();
    let client_log = std::fs::read_to_string(dir.path().join("state/ftpx.log")).unwrap();
    let lines = json_lines(&server_log(dir.path()));
    let server_id = |request: &str, path: &str| -> String {
        let line = lines
            .iter()
            .find(|l| l["event"] == "transfer" && l["request"] == request && l["path"] == path)
            .unwrap_or_else(|| panic!("no {request} of {path}"));
        line["id"].as_str().unwrap().to_string()
    };
    let up = client_ids(&client_log, "upload complete");
    let down = client_ids(&client_log, "download complete");
    assert_eq!(up.len(), 2, "{client_log}");
    assert_eq!(up[0], server_id("PUT", "/big.bin"), "{client_log}");
    assert_eq!(down, vec![server_id("GET", "/big.bin")], "{client_log}");
    assert_eq!(up[1], server_id("SEND", "/t/small.bin"), "{client_log}");
    assert_ne!(up[0], down[0]);
}

/// Where the server's metrics listener listens, from its log.
fn metrics_addr(dir: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = server_log(dir);
        if let Some(line) = log.lines().find(|l| l.contains("metrics listening")) {
            let rest = line.split("address=\"").nth(1).unwrap();
            return rest.split('"').next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no metrics listener: {log}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `GET path` from the metrics listener: the status line and the body.
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the sample named `name` (with its labels) in `body`; 0 if absent.
fn sample(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A session of `user` on `server` whose upload of `size` bytes to `/big`
/// has sent its first `sent` bytes and waits: a transfer in flight.
async fn upload_in_flight(server: &BinServer, user: &str, bytes: &[u8], sent: usize) -> Client {
    let mut c = Client::connect(
        "127.0.0.1",
        server.port,
        &server.ca(),
        Duration::from_secs(20),
    )
    .await
    .unwrap()
    .with_journal_dir(server.dir.join("lib-state"));
    c.login(user, PASSWORD, false).await.unwrap();
    let ready = put_request(&mut c, "/big", bytes.len() as u64)
        .await
        .unwrap();
    assert_eq!(ready.code, 150);
    c.connection()
        .write_frame(&FrameHeader::start(0), &[])
        .await
        .unwrap();
    send_chunks(&mut c, bytes, 0, sent).await;
    c
}

/// Polls `f` until it is true, for at most 10 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_move_while_a_transfer_is_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), "metrics_listen = \"127.0.0.1:0\"");
    server.useradd("ed", "64MiB");
    let addr = metrics_addr(dir.path());
    let (status, before) = http_get(&addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        before.contains("# TYPE ftpx_sessions_open gauge"),
        "{before}"
    );
    assert_eq!(sample(&before, "ftpx_bytes_in_total"), 0.0);
    assert_eq!(http_get(&addr, "/other").0, "HTTP/1.1 404 Not Found");

    let bytes = data(8 * MIB, 6);
    let mut c = upload_in_flight(&server, "ed", &bytes, 2 * MIB).await;
    let mut during = String::new();
    eventually("2 MiB in, counted", || {
        during = http_get(&addr, "/metrics").1;
        sample(&during, "ftpx_bytes_in_total") >= (2 * MIB) as f64
    })
    .await;
    assert_eq!(
        sample(&during, "ftpx_transfers_active{direction=\"up\"}"),
        1.0,
        "{during}"
    );
    assert_eq!(sample(&during, "ftpx_sessions_open"), 1.0, "{during}");
    assert_eq!(
        sample(&during, "ftpx_logins_total{result=\"ok\"}"),
        1.0,
        "{during}"
    );
    assert_eq!(
        sample(&during, "ftpx_replies_total{code=\"150\"}"),
        1.0,
        "{during}"
    );
    assert!(
        sample(&during, "ftpx_partial_bytes") >= (2 * MIB) as f64,
        "{during}"
    );
    assert!(
        during.contains("ftpx_hash_wait_seconds_count 1"),
        "{during}"
    );

    send_chunks(&mut c, &bytes, 2 * MIB, bytes.len()).await;
    let end = crate::transfer::end(&mut c, bytes.len(), blake3::hash(&bytes))
        .await
        .unwrap();
    assert_eq!(end.code, 226);
    let refused = put_request(&mut c, "/huge", 1 << 40).await;
    assert!(matches!(
        refused,
        Err(ftpx::client::ClientError::Server { code: 552, .. })
    ));
    let after = http_get(&addr, "/metrics").1;
    assert_eq!(
        sample(&after, "ftpx_bytes_in_total"),
        bytes.len() as f64,
        "{after}"
    );
    assert_eq!(
        sample(&after, "ftpx_transfers_active{direction=\"up\"}"),
        0.0
    );
    let ok = "ftpx_transfers_total{direction=\"up\",result=\"ok\"}";
    assert_eq!(sample(&after, ok), 1.0, "{after}");
    let refused = "ftpx_transfers_total{direction=\"up\",result=\"refused\"}";
    assert_eq!(sample(&after, refused), 1.0, "{after}");
    assert_eq!(sample(&after, "ftpx_quota_refusals_total"), 1.0, "{after}");
    assert_eq!(sample(&after, "ftpx_partial_bytes"), 0.0, "{after}");
    drop(c);
    server.terminate();
}

/// Downloads `name` of `user` to `local` with the real client, and reads the
/// server's download counters: (computed, cached).
fn get_and_count(server: &BinServer, addr: &str, name: &str, local: &Path) -> (f64, f64) {
    let _ = std::fs::remove_file(local);
    let out = connect_c(
        &server.dir,
        &server.ca(),
        server.port,
        "hana",
        &format!("get {name} {}", local.display()),
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    let body = http_get(addr, "/metrics").1;
    (
        sample(&body, "ftpx_download_hashes_total{source=\"computed\"}"),
        sample(&body, "ftpx_download_hashes_total{source=\"cached\"}"),
    )
}

#[test]
fn a_file_changed_in_place_is_never_sent_with_its_old_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), "metrics_listen = \"127.0.0.1:0\"");
    server.useradd("hana", "64MiB");
    let addr = metrics_addr(dir.path());
    let remote = dir.path().join("var/homes/hana/f");
    let local = dir.path().join("f.down");
    let bytes = data(4 * MIB + 5, 11);
    std::fs::write(&remote, &bytes).unwrap();
    // Hashes of a file changed in the last two seconds are not kept.
    assert_eq!(get_and_count(&server, &addr, "f", &local), (1.0, 0.0));
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(get_and_count(&server, &addr, "f", &local), (2.0, 0.0));
    assert_eq!(get_and_count(&server, &addr, "f", &local), (2.0, 1.0));
    assert_eq!(std::fs::read(&local).unwrap(), bytes);

    // One byte changed in place, same size, the old modification time put
    // back: only the change time tells.
    let old = std::fs::metadata(&remote).unwrap().modified().unwrap();
    let mut changed = bytes.clone();
    changed[3 * MIB] ^= 0x5a;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&remote)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &changed[3 * MIB..3 * MIB + 1], 3 * MIB as u64)
        .unwrap();
    f.set_modified(old).unwrap();
    drop(f);
    assert_eq!(std::fs::metadata(&remote).unwrap().modified().unwrap(), old);
    assert_eq!(get_and_count(&server, &addr, "f", &local), (3.0, 1.0));
    assert_eq!(std::fs::read(&local).unwrap(), changed);
    server.terminate();
}

#[test]
fn no_hashes_are_kept_with_hash_cache_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("etc")).unwrap();
    let config =
        config_with("metrics_listen = \"127.0.0.1:0\"") + "[transfer]\nhash_cache = \"0\"\n";
    std::fs::write(dir.path().join("etc/ftpx.toml"), config).unwrap();
    let server = BinServer::start(dir.path(), 0);
    server.useradd("hana", "64MiB");
    let addr = metrics_addr(dir.path());
    let remote = dir.path().join("var/homes/hana/f");
    std::fs::write(&remote, data(MIB, 12)).unwrap();
    std::thread::sleep(Duration::from_millis(2200));
    let local = dir.path().join("f.down");
    assert_eq!(get_and_count(&server, &addr, "f", &local), (1.0, 0.0));
    assert_eq!(get_and_count(&server, &addr, "f", &local), (2.0, 0.0));
    server.terminate();
}

#[test]
fn put_r_of_many_small_files_syncs_each_directory_once_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), "metrics_listen = \"127.0.0.1:0\"");
    server.useradd("gus", "64MiB");
    let (dirs, per_dir) = (["a", "b", "c"], 100);
    let mut files = vec![];
    for (d, name) in dirs.iter().enumerate() {
        std::fs::create_dir_all(dir.path().join("tree").join(name)).unwrap();
        for i in 0..per_dir {
            let rel = format!("tree/{name}/f{i:03}");
            let bytes = data(i * 40, (d * per_dir + i) as u8);
            std::fs::write(dir.path().join(&rel), &bytes).unwrap();
            files.push((rel, bytes));
        }
    }
    let out = connect_c(dir.path(), &server.ca(), server.port, "gus", "put -r tree");
    assert_eq!(out.status, 0, "{}", out.stderr);
    let n = files.len();
    let sent = format!("{n} files sent, 0 already complete");
    assert!(out.stdout.contains(&sent), "{}", out.stdout);
    let home = dir.path().join("var/homes/gus");
    for (rel, bytes) in &files {
        assert!(std::fs::read(home.join(rel)).unwrap() == *bytes, "{rel}");
    }
    let metrics = http_get(&metrics_addr(dir.path()), "/metrics").1;
    let ok = "ftpx_transfers_total{direction=\"up\",result=\"ok\"}";
    assert_eq!(sample(&metrics, ok), n as f64, "{metrics}");
    // The renames of a batch share one sync per directory.
    let syncs = sample(&metrics, "ftpx_directory_syncs_total");
    assert!(
        syncs >= dirs.len() as f64 && syncs <= (n / 10) as f64,
        "{syncs} directory syncs for {n} files"
    );
    server.terminate();
}

#[tokio::test(flavor = "multi_thread")]
async fn status_lists_a_transfer_in_flight_and_kick_ends_it_resumably() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), "metrics_listen = \"127.0.0.1:0\"");
    server.useradd("flo", "64MiB");
    let socket = dir.path().join("var/ftpx.sock");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    let bytes = data(8 * MIB, 7);
    let mut c = upload_in_flight(&server, "flo", &bytes, 3 * MIB).await;
    let mut idle = Client::connect(
        "127.0.0.1",
        server.port,
        &server.ca(),
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    idle.login("flo", PASSWORD, false).await.unwrap();
    let mut status = String::new();
    eventually("3 MiB of /big in the status", || {
        status = run(ftpx(dir.path()).arg("status")).stdout;
        status.contains("3.0 MiB/8.0 MiB")
    })
    .await;
    let line = status.lines().find(|l| l.contains(" /big (id ")).unwrap();
    assert!(
        line.starts_with("flo ") && line.contains("127.0.0.1:") && line.contains("upload"),
        "{status}"
    );
    assert!(status.contains("2 sessions, 1 transferring"), "{status}");
    let json = run(ftpx(dir.path()).args(["status", "--json"])).stdout;
    let sessions: Vec<Value> = serde_json::from_str(&json).unwrap();
    let moving = sessions.iter().find(|s| !s["transfer"].is_null()).unwrap();
    assert_eq!(moving["transfer"]["done"], 3 * MIB);
    assert_eq!(moving["transfer"]["size"], 8 * MIB);

    let kicked = run(ftpx(dir.path()).args(["kick", "flo"]));
    assert_eq!(kicked.status, 0, "{}", kicked.stderr);
    assert_eq!(kicked.stdout.trim(), "ended 2 sessions of flo");
    // The idle session is told why; the upload's is cut.
    let told = idle.request(&Request::Noop).await.unwrap_err().to_string();
    assert!(told.contains("ended by the server's admin"), "{told}");
    assert!(
        crate::transfer::end(&mut c, bytes.len(), blake3::hash(&bytes))
            .await
            .is_err()
    );
    eventually("no session left", || {
        run(ftpx(dir.path()).arg("status"))
            .stdout
            .contains("0 sessions")
    })
    .await;

    // What the upload had verified is kept: a new PUT is offered to resume it.
    let mut again = Client::connect(
        "127.0.0.1",
        server.port,
        &server.ca(),
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    again.login("flo", PASSWORD, false).await.unwrap();
    let ready = put_request(&mut again, "/big", bytes.len() as u64)
        .await
        .unwrap();
    let offset: usize = ready.text.split(' ').nth(1).unwrap_or("0").parse().unwrap();
    assert!((PIECE..=3 * MIB).contains(&offset), "{}", ready.text);
    let start = FrameHeader::start(offset as u64);
    again.connection().write_frame(&start, &[]).await.unwrap();
    send_chunks(&mut again, &bytes, offset, bytes.len()).await;
    let end = crate::transfer::end(&mut again, bytes.len(), blake3::hash(&bytes)).await;
    assert_eq!(end.unwrap().code, 226);
    let metrics = http_get(&metrics_addr(dir.path()), "/metrics").1;
    let resumes = sample(&metrics, "ftpx_resumes_total{direction=\"up\"}");
    assert_eq!(resumes, 1.0, "{metrics}");
    drop(again);
    server.terminate();
    let log = server_log(dir.path());
    assert!(
        log.contains("sessions ended by the admin event=kick user=\"flo\" sessions=2"),
        "{log}"
    );
    assert!(
        log.contains("reason=\"kicked by the server's admin\""),
        "{log}"
    );
    assert!(!log.contains("event=bad_request"), "{log}");
    let resumed = format!("path=\"/big\" size={} offset={offset} ", bytes.len());
    assert!(
        log.lines()
            .any(|l| l.contains(&resumed) && l.contains("result=\"ok\"")),
        "{log}"
    );
}

#[test]
fn status_without_a_server_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(ftpx(dir.path()).arg("status"));
    assert_eq!(out.status, 1);
    assert!(
        out.stderr
            .contains("cannot reach the server's control socket"),
        "{}",
        out.stderr
    );
    let out = run(ftpx(dir.path()).args(["kick", "../x"]));
    assert_eq!(out.status, 1, "{}", out.stderr);
}

#[test]
fn the_shipped_logrotate_snippet_rotates_a_running_servers_log() {
    let Ok(found) = std::process::Command::new("logrotate")
        .arg("--version")
        .output()
    else {
        println!("logrotate is not installed: the snippet was not run");
        return;
    };
    assert!(found.status.success());
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(dir.path(), 0);
    server.useradd("gus", "1MiB");
    assert_eq!(
        connect_c(dir.path(), &server.ca(), server.port, "gus", "pwd").status,
        0
    );
    // The shipped snippet, aimed at this server: its log, its pid, no other user.
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/etc/ftpx.logrotate"))
            .unwrap();
    let log = dir.path().join("var/log/ftpx.log");
    let snippet = shipped
        .replace("/var/lib/ftpx/var/log/ftpx.log", &log.display().to_string())
        .replace(
            "systemctl kill --signal=HUP --kill-whom=main ftpx.service",
            &format!("kill -HUP {}", server.child.id()),
        )
        .replace("    su ftpx ftpx\n", "");
    assert_ne!(snippet, shipped);
    let conf = dir.path().join("logrotate.conf");
    std::fs::write(&conf, snippet).unwrap();
    let out = run(std::process::Command::new("logrotate")
        .arg("--force")
        .arg("--state")
        .arg(dir.path().join("logrotate.state"))
        .arg(&conf));
    assert_eq!(out.status, 0, "{}{}", out.stdout, out.stderr);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server_log(dir.path()).contains("log file reopened") {
        assert!(
            Instant::now() < deadline,
            "the server did not reopen its log"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        connect_c(dir.path(), &server.ca(), server.port, "gus", "quota").status,
        0
    );
    server.terminate();
    let rotated = std::fs::read_to_string(dir.path().join("var/log/ftpx.log.1")).unwrap();
    let fresh = server_log(dir.path());
    assert!(
        rotated.contains("request=\"PWD\"") && !rotated.contains("QUOTA"),
        "{rotated}"
    );
    assert!(
        fresh.contains("request=\"QUOTA\"") && !fresh.contains("PWD"),
        "{fresh}"
    );
}

#[test]
fn metrics_are_off_by_default_and_the_control_socket_can_be_switched_off() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(dir.path(), 0);
    let socket = dir.path().join("var/ftpx.sock");
    assert!(socket.exists());
    assert_eq!(server.terminate(), 0);
    assert!(!server_log(dir.path()).contains("metrics listening"));
    assert!(!socket.exists(), "the socket outlived the server");

    let dir = tempfile::tempdir().unwrap();
    let server = start_with(dir.path(), "control_socket = \"\"");
    assert!(!dir.path().join("var/ftpx.sock").exists());
    let out = run(ftpx(dir.path()).arg("status"));
    assert_eq!(out.status, 1);
    assert!(
        out.stderr.contains("control_socket is switched off"),
        "{}",
        out.stderr
    );
    server.terminate();
}
