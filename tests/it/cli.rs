//! The real binary, used the way the README and the CLI contract describe.

use std::os::unix::fs::PermissionsExt;

use crate::common::*;

#[test]
fn gen_cert_writes_keys_for_the_owner_only_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(ftpx(dir.path()).args(["gen-cert"]));
    assert_eq!(out.status, 0, "{}", out.stderr);
    for (name, mode) in [
        ("ca.pem", 0o644),
        ("ca.key", 0o600),
        ("server.pem", 0o644),
        ("server.key", 0o600),
    ] {
        let m = std::fs::metadata(dir.path().join("certs").join(name)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, mode, "{name}");
    }
    let again = run(ftpx(dir.path()).args(["gen-cert"]));
    assert_ne!(again.status, 0);
    assert!(again.stderr.contains("--force"), "{}", again.stderr);
    let forced = run(ftpx(dir.path()).args([
        "gen-cert",
        "--dir",
        "other",
        "--host",
        "files.example",
        "--host",
        "10.1.2.3",
    ]));
    assert_eq!(forced.status, 0, "{}", forced.stderr);
    assert!(forced.stdout.contains("files.example, 10.1.2.3"));
}

#[test]
fn serve_makes_certificates_registers_and_walks_through() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(dir.path(), 0);
    assert!(server.ca().exists(), "serve made no certificate");

    // Register from the client, then use the shell.
    let reg = run(ftpx(dir.path())
        .args([
            "connect",
            &format!("newbie@127.0.0.1:{}", server.port),
            "--register",
            "-c",
            "pwd",
        ])
        .env("FTPX_PASSWORD", PASSWORD));
    assert_eq!(reg.status, 0, "{}", reg.stderr);
    assert_eq!(reg.stdout.trim(), "/");
    assert!(dir.path().join("var/homes/newbie").is_dir());

    std::fs::write(dir.path().join("hello.txt"), b"hello\n").unwrap();
    let out = connect_c(
        dir.path(),
        &server.ca(),
        server.port,
        "newbie",
        "mkdir \"my docs\"; cd \"my docs\"; pwd; put hello.txt; ls; quota; cd ..; ls",
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "/my docs");
    assert_eq!(lines[1], format!("{}  /my docs/hello.txt", hex(b"hello\n")));
    assert!(
        lines[2].starts_with('f') && lines[2].ends_with(" hello.txt"),
        "{}",
        lines[2]
    );
    assert!(lines[2].contains(" 6 "), "{}", lines[2]);
    assert!(lines[3].starts_with("used 6 (6 B) of "), "{}", lines[3]);
    // A registered user's file limit; the directory and the file count.
    assert_eq!(lines[4], "files 2 of 10000");
    assert_eq!(lines[5], "unfinished uploads 0, holding 0 (0 B)");
    assert!(
        lines[6].starts_with('d') && lines[6].ends_with(" my docs/"),
        "{}",
        lines[6]
    );

    // The registered quota is drawn from the shipped range.
    let users = run(ftpx(dir.path()).args(["users"]));
    assert_eq!(users.status, 0);
    let quota_line = users
        .stdout
        .lines()
        .find(|l| l.starts_with("newbie"))
        .unwrap()
        .to_string();
    let mib: f64 = quota_line
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!((10.0..=20.0).contains(&mib), "{quota_line}");

    // The server logged the events with user and peer, and no password.
    assert_eq!(server.terminate(), 0, "SIGTERM must exit 0");
    let log = std::fs::read_to_string(dir.path().join("var/log/ftpx.log")).unwrap();
    assert!(
        log.contains("registered event=register") && log.contains("user=\"newbie\""),
        "{log}"
    );
    assert!(log.contains("peer=\"127.0.0.1:"), "{log}");
    assert!(log.contains("request=\"PUT\""), "{log}");
    assert!(
        !log.contains(PASSWORD),
        "the password reached the server log"
    );
    let client_log = std::fs::read_to_string(dir.path().join("state/ftpx.log")).unwrap();
    assert!(client_log.contains("upload complete"), "{client_log}");
    assert!(
        !client_log.contains(PASSWORD),
        "the password reached the client log"
    );
}

#[test]
fn useradd_while_the_server_runs_takes_effect_at_the_next_login() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(dir.path(), 0);
    let before = connect_c(dir.path(), &server.ca(), server.port, "bob", "pwd");
    assert_eq!(before.status, exit::LOGIN, "{}", before.stderr);
    server.useradd("bob", "1MiB");
    let after = connect_c(dir.path(), &server.ca(), server.port, "bob", "quota");
    assert_eq!(after.status, 0, "{}", after.stderr);
    assert!(
        after.stdout.contains("of 1048576 (1.0 MiB)"),
        "{}",
        after.stdout
    );

    // usermod and userdel too, without a restart.
    let m = run(ftpx(dir.path()).args(["usermod", "bob", "--quota", "2MiB"]));
    assert_eq!(m.status, 0, "{}", m.stderr);
    let after = connect_c(dir.path(), &server.ca(), server.port, "bob", "quota");
    assert!(after.stdout.contains("of 2097152"), "{}", after.stdout);
    let d = run(ftpx(dir.path()).args(["userdel", "bob", "--remove-home"]));
    assert_eq!(d.status, 0, "{}", d.stderr);
    assert!(!dir.path().join("var/homes/bob").exists());
    let gone = connect_c(dir.path(), &server.ca(), server.port, "bob", "pwd");
    assert_eq!(gone.status, exit::LOGIN);
}

/// Exit statuses as documented in the README.
mod exit {
    pub const FAILED: i32 = 1;
    pub const CONNECT: i32 = 3;
    pub const LOGIN: i32 = 4;
}

#[test]
fn batch_modes_stop_at_the_first_failure() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(dir.path(), 0);
    server.useradd("cat", "1MiB");

    let out = connect_c(
        dir.path(),
        &server.ca(),
        server.port,
        "cat",
        "mkdir a; rm nothing-here; mkdir b",
    );
    assert_eq!(out.status, exit::FAILED);
    assert!(
        out.stderr
            .contains("nothing-here: no such file or directory"),
        "{}",
        out.stderr
    );
    assert!(dir.path().join("var/homes/cat/a").is_dir());
    assert!(
        !dir.path().join("var/homes/cat/b").exists(),
        "a command after the failure ran"
    );

    // A quoted ; is part of the argument.
    let out = connect_c(
        dir.path(),
        &server.ca(),
        server.port,
        "cat",
        "mkdir \"x;y\"; ls",
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(dir.path().join("var/homes/cat/x;y").is_dir());

    std::fs::write(
        dir.path().join("script"),
        "mkdir c\n\n  cd c  \npwd\nrmdir /no\nmkdir d\n",
    )
    .unwrap();
    let out = run(ftpx(dir.path())
        .args([
            "connect",
            &format!("cat@127.0.0.1:{}", server.port),
            "-b",
            "script",
        ])
        .env("FTPX_PASSWORD", PASSWORD));
    assert_eq!(out.status, exit::FAILED);
    assert_eq!(out.stdout.trim(), "/c");
    assert!(!dir.path().join("var/homes/cat/c/d").exists());

    let ok = connect_c(
        dir.path(),
        &server.ca(),
        server.port,
        "cat",
        "pwd; help; exit; mkdir never",
    );
    assert_eq!(ok.status, 0, "{}", ok.stderr);
    assert!(
        !dir.path().join("var/homes/cat/never").exists(),
        "exit did not stop the script"
    );

    // Unknown commands and bad usage fail too.
    assert_eq!(
        connect_c(dir.path(), &server.ca(), server.port, "cat", "frobnicate").status,
        exit::FAILED
    );
    assert_eq!(
        connect_c(dir.path(), &server.ca(), server.port, "cat", "mv onlyone").status,
        exit::FAILED
    );
}

#[test]
fn a_refused_login_with_a_command_sent_behind_it_ends_as_before() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("etc")).unwrap();
    // Two strikes end a session: the failed login is one, and the PWD
    // sent with it must not be the second.
    let config = format!("{}[limits]\nmax_bad_requests = 2\n", test_config_toml());
    std::fs::write(dir.path().join("etc/ftpx.toml"), config).unwrap();
    let server = BinServer::start(dir.path(), 0);
    server.useradd("eve", "1MiB");
    let wrong = |commands: &str| {
        run(ftpx(dir.path())
            .args(["connect", &format!("eve@127.0.0.1:{}", server.port), "--ca"])
            .arg(server.ca())
            .args(["-c", commands])
            .env("FTPX_PASSWORD", "not the password"))
    };
    // `pwd` goes out with the login; `lcd` is local, so the client waits
    // for the login's reply first, as it used to before any command.
    let sent = wrong("pwd");
    let waited = wrong("lcd /; pwd");
    for out in [&sent, &waited] {
        assert_eq!(out.status, exit::LOGIN, "{}", out.stderr);
        assert_eq!(
            out.stderr,
            "ftpx: login failed: unknown user or wrong password\n"
        );
        assert!(out.stdout.is_empty(), "{}", out.stdout);
    }
    server.terminate();
    let log = std::fs::read_to_string(dir.path().join("var/log/ftpx.log")).unwrap();
    let pwd: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("request=\"PWD\""))
        .collect();
    // Sent once, with the login, and refused: it did not run.
    assert_eq!(pwd.len(), 1, "{log}");
    assert!(pwd[0].contains("code=530"), "{}", pwd[0]);
    assert!(!log.contains("too many bad requests"), "{log}");
    assert_eq!(log.matches("event=login_failed").count(), 2, "{log}");
    // The QUIT sent with the PWD ended that session.
    assert_eq!(log.matches("reason=\"quit\"").count(), 1, "{log}");
}

#[test]
fn login_failures_look_the_same_and_exit_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(dir.path(), 0);
    server.useradd("dan", "1MiB");
    let unknown = connect_c(dir.path(), &server.ca(), server.port, "nobody-here", "pwd");
    let wrong = run(ftpx(dir.path())
        .args([
            "connect",
            &format!("dan@127.0.0.1:{}", server.port),
            "-c",
            "pwd",
        ])
        .env("FTPX_PASSWORD", "not the password"));
    assert_eq!(unknown.status, exit::LOGIN);
    assert_eq!(wrong.status, exit::LOGIN);
    assert_eq!(unknown.stderr, wrong.stderr);
    assert!(unknown.stdout.is_empty());

    // The password can come from standard input too.
    let stdin = run(ftpx(dir.path())
        .args([
            "connect",
            &format!("dan@127.0.0.1:{}", server.port),
            "--password-stdin",
            "-c",
            "pwd",
        ])
        .stdin(write_stdin(&format!("{PASSWORD}\n"))));
    assert_eq!(stdin.status, 0, "{}", stdin.stderr);
}

#[test]
fn the_client_refuses_servers_it_cannot_verify() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(dir.path(), 0);
    server.useradd("eve", "1MiB");

    // A CA that did not sign the server's certificate.
    let other = tempfile::tempdir().unwrap();
    assert_eq!(run(ftpx(other.path()).args(["gen-cert"])).status, 0);
    let out = connect_c(
        dir.path(),
        &other.path().join("certs/ca.pem"),
        server.port,
        "eve",
        "pwd",
    );
    assert_eq!(out.status, exit::CONNECT);
    assert!(out.stderr.contains("TLS handshake"), "{}", out.stderr);

    // The right CA but a certificate for another host name.
    let elsewhere = tempfile::tempdir().unwrap();
    assert_eq!(
        run(ftpx(elsewhere.path()).args(["gen-cert", "--host", "files.example"])).status,
        0
    );
    let named = BinServer::start(elsewhere.path(), 0);
    named.useradd("eve", "1MiB");
    let out = connect_c(elsewhere.path(), &named.ca(), named.port, "eve", "pwd");
    assert_eq!(out.status, exit::CONNECT, "{}", out.stderr);
    assert!(
        out.stderr.contains("not valid for name") || out.stderr.contains("NotValidForName"),
        "{}",
        out.stderr
    );

    // No server at all.
    let port = server.port;
    server.kill9();
    let out = connect_c(
        dir.path(),
        &dir.path().join("certs/ca.pem"),
        port,
        "eve",
        "pwd",
    );
    assert_eq!(out.status, exit::CONNECT, "{}", out.stderr);
    assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);
}

#[test]
fn a_damaged_user_database_stops_the_server_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("var")).unwrap();
    std::fs::write(
        dir.path().join("var/users.toml"),
        "[[user]]\nname = \"x\"\n",
    )
    .unwrap();
    let out = run(ftpx(dir.path()).args(["serve", "--listen", "127.0.0.1:0"]));
    assert_ne!(out.status, 0);
    assert!(out.stderr.contains("damaged"), "{}", out.stderr);
    let users = run(ftpx(dir.path()).args(["users"]));
    assert_ne!(users.status, 0);
}

#[test]
fn useradd_checks_its_input() {
    let dir = tempfile::tempdir().unwrap();
    let add =
        |args: &[&str], stdin: &str| run(ftpx(dir.path()).args(args).stdin(write_stdin(stdin)));
    assert_ne!(
        add(&["useradd", "../x", "--password-stdin"], "longenough\n").status,
        0
    );
    assert_ne!(
        add(&["useradd", "fay", "--password-stdin"], "short\n").status,
        0
    );
    assert_ne!(
        add(
            &["useradd", "fay", "--quota", "lots", "--password-stdin"],
            "longenough\n"
        )
        .status,
        0
    );
    let ok = add(
        &["useradd", "fay", "--quota", "500k", "--password-stdin"],
        "longenough\n",
    );
    assert_eq!(ok.status, 0, "{}", ok.stderr);
    assert!(ok.stdout.contains("quota 512000 bytes"), "{}", ok.stdout);
    let dup = add(&["useradd", "fay", "--password-stdin"], "longenough\n");
    assert_ne!(dup.status, 0);
    assert!(dup.stderr.contains("already exists"));
    // Without a terminal and without --password-stdin there is no way to ask.
    assert_ne!(add(&["useradd", "gus"], "").status, 0);
    let db = std::fs::read_to_string(dir.path().join("var/users.toml")).unwrap();
    assert!(db.contains("$scrypt$ln="), "{db}");
    assert!(!db.contains("longenough"));
}

#[test]
fn bans_are_logged_for_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("etc")).unwrap();
    let config = format!("{}[defender]\npair_max_failures = 2\n", test_config_toml());
    std::fs::write(dir.path().join("etc/ftpx.toml"), config).unwrap();
    let server = BinServer::start(dir.path(), 0);
    server.useradd("gil", "1MiB");
    for _ in 0..3 {
        let out = run(ftpx(dir.path())
            .args([
                "connect",
                &format!("gil@127.0.0.1:{}", server.port),
                "-c",
                "pwd",
            ])
            .env("FTPX_PASSWORD", "not the password"));
        assert_eq!(out.status, exit::LOGIN);
    }
    assert_eq!(
        connect_c(dir.path(), &server.ca(), server.port, "gil", "pwd").status,
        exit::LOGIN
    );
    server.terminate();
    let log = std::fs::read_to_string(dir.path().join("var/log/ftpx.log")).unwrap();
    let ban = log
        .lines()
        .find(|l| l.contains("banned: too many failed logins"))
        .expect("no ban line");
    assert!(
        ban.contains("WARN")
            && ban.contains("event=ban")
            && ban.contains("source=\"127.0.0.1\"")
            && ban.contains("user=\"gil\""),
        "{ban}"
    );
    assert!(log.contains("result=\"banned\""), "{log}");
    assert!(!log.contains("not the password"));
}

#[test]
fn a_name_as_long_as_a_request_line_is_cut_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(dir.path(), 0);
    let name = "x".repeat(4000);
    let out = connect_c(dir.path(), &server.ca(), server.port, &name, "pwd");
    assert_eq!(out.status, exit::LOGIN, "{}", out.stderr);
    server.terminate();
    let log = std::fs::read_to_string(dir.path().join("var/log/ftpx.log")).unwrap();
    let failed = log
        .lines()
        .find(|l| l.contains("result=\"failed\""))
        .expect("no failed login line");
    assert!(
        failed.contains(&format!("user=\"{}\"", "x".repeat(32))),
        "{failed}"
    );
    assert!(
        !log.contains(&"x".repeat(33)),
        "a whole name reached the log"
    );
}

#[test]
fn ctrl_c_stops_a_transfer_and_the_same_command_resumes_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(dir.path(), 0);
    server.useradd("hal", "1GiB");
    let content = data(96 << 20, 7);
    std::fs::write(dir.path().join("big.bin"), &content).unwrap();
    let child = ftpx(dir.path())
        .args([
            "connect",
            &format!("hal@127.0.0.1:{}", server.port),
            "-c",
            "put big.bin",
        ])
        .env("FTPX_PASSWORD", PASSWORD)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the server holds part of the file, then interrupt.
    let partial_dir = dir.path().join("var/partial/hal");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let grown = std::fs::read_dir(&partial_dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.path().extension().is_some_and(|x| x == "part")
                    && e.metadata().is_ok_and(|m| m.len() > 4 << 20)
            });
        if grown {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the upload never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    if out.status.code() == Some(0) {
        // The whole file went through before the signal landed: nothing to resume.
        return;
    }
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"));
    assert!(
        !dir.path().join("var/homes/hal/big.bin").exists(),
        "a half file is visible"
    );

    let again = connect_c(dir.path(), &server.ca(), server.port, "hal", "put big.bin");
    assert_eq!(again.status, 0, "{}", again.stderr);
    let resumed: u64 = again
        .stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("resumed at ")?
                .strip_suffix(" bytes")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no resume: {}", again.stdout));
    assert!(resumed > 0);
    assert!(again.stdout.contains(&hex(&content)));
    assert_eq!(
        std::fs::read(dir.path().join("var/homes/hal/big.bin")).unwrap(),
        content
    );
}

#[test]
fn a_closed_stdout_is_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(dir.path(), 0);
    server.useradd("ida", "1MiB");
    let mut child = ftpx(dir.path())
        .args([
            "connect",
            &format!("ida@127.0.0.1:{}", server.port),
            "-c",
            "pwd; pwd; pwd",
        ])
        .env("FTPX_PASSWORD", PASSWORD)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
}

#[test]
fn trust_on_first_use_pins_the_certificate_and_refuses_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(dir.path(), 0);
    server.useradd("jo", "1MiB");
    let tofu = |dir: &std::path::Path, port: u16| {
        run(ftpx(dir)
            .args([
                "connect",
                &format!("jo@127.0.0.1:{port}"),
                "--tofu",
                "-c",
                "pwd",
            ])
            .env("FTPX_PASSWORD", PASSWORD))
    };
    // A client with no CA file at all.
    let client = tempfile::tempdir().unwrap();
    let first = tofu(client.path(), server.port);
    assert_eq!(first.status, 0, "{}", first.stderr);
    assert!(first.stderr.contains("first contact"), "{}", first.stderr);
    let known = std::fs::read_to_string(client.path().join("state/known_hosts")).unwrap();
    assert!(
        known.starts_with(&format!("127.0.0.1:{} blake3:", server.port)),
        "{known}"
    );
    let second = tofu(client.path(), server.port);
    assert_eq!(second.status, 0, "{}", second.stderr);
    assert!(!second.stderr.contains("first contact"));

    // The server gets a new certificate: the client refuses, loudly.
    let port = server.port;
    server.kill9();
    assert_eq!(
        run(ftpx(dir.path()).args(["gen-cert", "--force"])).status,
        0
    );
    let server = BinServer::start(dir.path(), port);
    let changed = tofu(client.path(), server.port);
    assert_eq!(changed.status, exit::CONNECT);
    assert!(changed.stderr.contains("HAS CHANGED"), "{}", changed.stderr);
    assert_eq!(
        std::fs::read_to_string(client.path().join("state/known_hosts")).unwrap(),
        known
    );
}

#[test]
fn one_session_carries_many_transfers() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(dir.path(), 0);
    server.useradd("kim", "10MiB");
    std::fs::write(dir.path().join("a"), data(300_000, 1)).unwrap();
    std::fs::write(dir.path().join("b"), b"").unwrap();
    let out = connect_c(
        dir.path(),
        &server.ca(),
        server.port,
        "kim",
        "put a; put b; get a a2; get b b2; ls",
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(
        std::fs::read(dir.path().join("a2")).unwrap(),
        data(300_000, 1)
    );
    assert_eq!(std::fs::read(dir.path().join("b2")).unwrap(), b"");
    server.terminate();
    let log = std::fs::read_to_string(dir.path().join("var/log/ftpx.log")).unwrap();
    let logins = log
        .lines()
        .filter(|l| l.contains(" event=login ") && l.contains("result=\"ok\""))
        .count();
    assert_eq!(logins, 1, "{log}");
}

/// Runs `cmd` to its end, or kills it after `secs` seconds (then None).
fn run_within(cmd: &mut std::process::Command, secs: u64) -> Option<Output> {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Some(Output {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

#[test]
fn a_config_file_named_on_the_command_line_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("etc/ftpx-typo.toml");
    let serve = run_within(
        ftpx(dir.path())
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&typo),
        30,
    )
    .expect("serve ran on the defaults instead of refusing the missing config file");
    assert_eq!(serve.status, 1, "{}", serve.stderr);
    assert!(
        serve.stderr.contains(&typo.display().to_string())
            && serve.stderr.contains("does not exist"),
        "{}",
        serve.stderr
    );
    assert!(!serve.stdout.contains("listening"), "{}", serve.stdout);

    for args in [
        &["users", "--config", "nope.toml"][..],
        &[
            "useradd",
            "bob",
            "--password-stdin",
            "--config",
            "nope.toml",
        ],
        &["usermod", "bob", "--quota", "1MiB", "--config", "nope.toml"],
        &["userdel", "bob", "--config", "nope.toml"],
        &["status", "--config", "nope.toml"],
        &["kick", "bob", "--config", "nope.toml"],
    ] {
        let out = run(ftpx(dir.path()).args(args));
        assert_eq!(out.status, 1, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("nope.toml") && out.stderr.contains("does not exist"),
            "{args:?}: {}",
            out.stderr
        );
        assert_eq!(out.stdout, "", "{args:?}");
    }
    for made in ["var", "certs"] {
        assert!(!dir.path().join(made).exists(), "{made}/ was made");
    }

    // Without --config, a missing etc/ftpx.toml still means the defaults.
    let users = run(ftpx(dir.path()).args(["users"]));
    assert_eq!(users.status, 0, "{}", users.stderr);
    assert!(users.stdout.starts_with("USER"), "{}", users.stdout);
}

const SUBCOMMANDS: [&str; 11] = [
    "serve",
    "connect",
    "gen-cert",
    "useradd",
    "userdel",
    "usermod",
    "users",
    "status",
    "kick",
    "completions",
    "man",
];

#[test]
fn completions_for_each_shell_know_the_subcommands() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = run(ftpx(dir.path()).args(["completions", shell]));
        assert_eq!(out.status, 0, "{shell}: {}", out.stderr);
        assert!(!out.stdout.trim().is_empty(), "{shell}: empty script");
        for sub in SUBCOMMANDS {
            assert!(
                out.stdout.contains(sub),
                "{shell}: no {sub} in\n{}",
                out.stdout
            );
        }
        if shell == "bash" {
            let script = dir.path().join("ftpx.bash");
            std::fs::write(&script, &out.stdout).unwrap();
            match std::process::Command::new("bash")
                .arg("-n")
                .arg(&script)
                .output()
            {
                Ok(check) => assert!(
                    check.status.success(),
                    "bash -n: {}",
                    String::from_utf8_lossy(&check.stderr)
                ),
                Err(e) => println!("bash not run ({e}): the script's syntax is not checked"),
            }
        }
    }
    let bad = run(ftpx(dir.path()).args(["completions", "cmd.exe"]));
    assert_eq!(bad.status, 2, "{}", bad.stderr);
}

#[test]
fn man_prints_the_page_and_writes_one_per_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(ftpx(dir.path()).args(["man"]));
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(out.stdout.contains(".TH ftpx 1"), "{}", out.stdout);
    assert!(out.stdout.contains(".SH SUBCOMMANDS"), "{}", out.stdout);
    for sub in SUBCOMMANDS {
        // roff escapes the minus: ftpx\-gen\-cert(1).
        let reference = format!("ftpx-{sub}(1)").replace('-', "\\-");
        assert!(
            out.stdout.contains(&reference),
            "no {reference} in\n{}",
            out.stdout
        );
    }
    assert!(!out.stdout.contains("ftpx\\-help(1)"), "{}", out.stdout);

    // Every page ftpx.1 refers to can be installed beside it.
    let pages = dir.path().join("man1");
    std::fs::create_dir(&pages).unwrap();
    let wrote = run(ftpx(dir.path()).args(["man", "--dir", "man1"]));
    assert_eq!(wrote.status, 0, "{}", wrote.stderr);
    assert_eq!(
        std::fs::read_to_string(pages.join("ftpx.1")).unwrap(),
        out.stdout
    );
    for sub in SUBCOMMANDS {
        let page = std::fs::read_to_string(pages.join(format!("ftpx-{sub}.1"))).unwrap();
        assert!(page.contains(".TH ftpx-"), "{sub}: {page}");
    }
    let serve = std::fs::read_to_string(pages.join("ftpx-serve.1")).unwrap();
    assert!(serve.contains("\\-\\-config"), "{serve}");
}

/// The shipped systemd unit's `[Service]` settings, in order (a key may repeat).
fn shipped_unit() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/etc/ftpx.service")).unwrap();
    let mut section = "";
    let mut service = vec![];
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line;
        } else if section == "[Service]" {
            let (k, v) = line.split_once('=').unwrap();
            service.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    service
}

fn unit_value<'a>(unit: &'a [(String, String)], key: &str) -> &'a str {
    let mut values = unit.iter().filter(|(k, _)| k == key);
    let (_, v) = values
        .next()
        .unwrap_or_else(|| panic!("no {key}= in the unit"));
    assert!(values.next().is_none(), "{key}= twice");
    v
}

/// A systemd time span ("30", "30s", "1min 30s") in seconds.
fn time_span_secs(span: &str) -> f64 {
    let mut total = 0.0;
    for part in span.split_whitespace() {
        let digits = part
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(part.len());
        let n: f64 = part[..digits].parse().unwrap();
        total += n * match &part[digits..] {
            "" | "s" | "sec" => 1.0,
            "ms" | "msec" => 0.001,
            "m" | "min" => 60.0,
            "h" | "hr" => 3600.0,
            unit => panic!("unit {unit:?} in {span:?}"),
        };
    }
    total
}

#[test]
fn the_systemd_unit_runs_serve_and_waits_longer_than_the_grace() {
    use clap::Parser;
    let unit = shipped_unit();
    let exec: Vec<&str> = unit_value(&unit, "ExecStart").split_whitespace().collect();
    assert_eq!(exec[0], "/usr/local/bin/ftpx");
    let cli = ftpx::cli::Cli::try_parse_from(&exec)
        .unwrap_or_else(|e| panic!("ExecStart is no ftpx command line: {e}"));
    assert!(
        matches!(cli.command, ftpx::cli::Command::Serve { .. }),
        "{exec:?}"
    );
    assert_eq!(unit_value(&unit, "Type"), "simple");
    assert_eq!(unit_value(&unit, "KillSignal"), "SIGTERM");
    assert_ne!(unit_value(&unit, "User"), "root");

    let shipped = ftpx::config::Config::load(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/etc/ftpx.toml"
    )))
    .unwrap();
    let grace = shipped.limits.shutdown_grace_secs as f64;
    let stop = time_span_secs(unit_value(&unit, "TimeoutStopSec"));
    assert!(
        stop > grace,
        "TimeoutStopSec={stop} s does not exceed shutdown_grace_secs = {grace}"
    );
    let files: u64 = unit_value(&unit, "LimitNOFILE").parse().unwrap();
    assert!(files as usize > 2 * shipped.limits.max_sessions, "{files}");

    // What the server writes lies in ReadWritePaths, seen from WorkingDirectory;
    // everything else is read-only under ProtectSystem=strict.
    assert_eq!(unit_value(&unit, "ProtectSystem"), "strict");
    let work = std::path::Path::new(unit_value(&unit, "WorkingDirectory"));
    let writable: Vec<std::path::PathBuf> = unit_value(&unit, "ReadWritePaths")
        .split_whitespace()
        .map(|p| p.trim_start_matches('-').into())
        .collect();
    for wanted in [
        &shipped.server.var_dir,
        &shipped.server.cert_dir,
        &shipped.server.log_file,
    ] {
        let full = work.join(wanted);
        assert!(
            writable.iter().any(|w| full.starts_with(w)),
            "{} is not in ReadWritePaths {writable:?}",
            full.display()
        );
    }
    // logrotate rotates that log.
    let rotate =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/etc/ftpx.logrotate"))
            .unwrap();
    let log = work.join(&shipped.server.log_file);
    assert!(
        rotate.contains(&format!("{} {{", log.display())),
        "{rotate}"
    );
    // The server reopens its log on SIGHUP: no copytruncate, which can lose lines.
    assert!(!rotate.contains("copytruncate"), "{rotate}");
    assert!(
        rotate.contains("systemctl kill --signal=HUP --kill-whom=main ftpx.service"),
        "{rotate}"
    );
    assert_eq!(unit_value(&unit, "ExecReload"), "/bin/kill -HUP $MAINPID");
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    let Ok(version) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        println!("systemd-analyze is not installed: the unit was not verified");
        return;
    };
    assert!(version.status.success());
    // verify checks that ExecStart's binary exists: point it at the one built.
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/etc/ftpx.service")).unwrap();
    assert!(text.contains("ExecStart=/usr/local/bin/ftpx "));
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("ftpx.service");
    std::fs::write(
        &unit,
        text.replace(
            "ExecStart=/usr/local/bin/ftpx ",
            &format!("ExecStart={BIN} "),
        ),
    )
    .unwrap();
    // --man=no: Documentation= names the man page, installed beside the binary.
    let out = run(std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit));
    assert_eq!(out.status, 0, "{}{}", out.stdout, out.stderr);
    assert_eq!(out.stderr, "", "systemd-analyze verify warned");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_says_what_the_server_waits_for() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start_keeping_stderr(dir.path(), 0);
    server.useradd("lea", "1MiB");
    let mut session = ftpx::client::Client::connect(
        "127.0.0.1",
        server.port,
        &server.ca(),
        std::time::Duration::from_secs(20),
    )
    .await
    .unwrap()
    .with_journal_dir(dir.path().join("state"));
    session.login("lea", PASSWORD, false).await.unwrap();

    let stderr = dir.path().join("serve.stderr");
    assert_eq!(server.terminate(), 0);
    let said = std::fs::read_to_string(stderr).unwrap();
    let lines: Vec<&str> = said.lines().collect();
    assert!(
        lines.contains(&"ftpx: stopping: waiting up to 10 s for 1 session"),
        "{said}"
    );
    assert_eq!(lines.last(), Some(&"ftpx: stopped"), "{said}");
    drop(session);

    let log = std::fs::read_to_string(dir.path().join("var/log/ftpx.log")).unwrap();
    let shutting = log
        .lines()
        .find(|l| l.contains("shutting down"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(shutting.contains("sessions=1"), "{shutting}");
    assert!(log.lines().last().unwrap().contains("stopped"), "{log}");
}
