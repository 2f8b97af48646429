//! The shell as a newcomer uses it: `lcd` and reconnecting, `~` in local
//! paths, and where `put -r` and `get -r` put a tree.

use crate::common::*;

/// `ftpx connect -c COMMANDS` as ann, in `dir`, with `HOME` set to `home`.
fn shell_at(
    s: &TestServer,
    dir: &std::path::Path,
    home: &std::path::Path,
    commands: &str,
) -> Output {
    run(ftpx(dir)
        .args([
            "connect",
            &format!("ann@127.0.0.1:{}", s.addr.port()),
            "--ca",
        ])
        .arg(&s.ca)
        .args(["-c", commands])
        .env("FTPX_PASSWORD", PASSWORD)
        .env("HOME", home))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tilde_in_a_local_path_is_the_home_directory() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let (work, home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(home.path().join("notes"), b"mine").unwrap();
    std::fs::create_dir(home.path().join("in")).unwrap();
    let out = shell_at(
        &s,
        work.path(),
        home.path(),
        "lcd ~; lpwd; put notes; get notes ~/in; lcd; lpwd",
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    let home_line = home.path().canonicalize().unwrap().display().to_string();
    assert_eq!(
        out.stdout.lines().filter(|l| *l == home_line).count(),
        2,
        "{}",
        out.stdout
    );
    assert_eq!(
        std::fs::read(home.path().join("in/notes")).unwrap(),
        b"mine"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn trees_land_inside_an_existing_directory_as_with_cp_r() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::create_dir_all(w.join("sub/deeper")).unwrap();
    std::fs::write(w.join("sub/a.txt"), b"a").unwrap();
    std::fs::write(w.join("sub/deeper/b.txt"), b"b").unwrap();
    std::fs::create_dir(w.join("into")).unwrap();
    let commands =
        "mkdir docs; put -r sub docs; put -r sub fresh; get -r docs into; get -r fresh new";
    let out = connect_c(w, &s.ca, s.addr.port(), "ann", commands);
    assert_eq!(out.status, 0, "{}", out.stderr);
    let home = s.home("ann");
    // Into the existing remote directory `docs`; as the new name `fresh`.
    assert_eq!(
        std::fs::read(home.join("docs/sub/deeper/b.txt")).unwrap(),
        b"b"
    );
    assert!(!home.join("docs/a.txt").exists());
    assert_eq!(std::fs::read(home.join("fresh/a.txt")).unwrap(), b"a");
    // Into the existing local directory `into`; as the new name `new`.
    assert_eq!(std::fs::read(w.join("into/docs/sub/a.txt")).unwrap(), b"a");
    assert!(!w.join("into/sub").exists());
    assert_eq!(std::fs::read(w.join("new/deeper/b.txt")).unwrap(), b"b");
}

#[tokio::test(flavor = "multi_thread")]
async fn errors_are_said_once_without_codes_or_os_numbers() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let work = tempfile::tempdir().unwrap();
    let wrong = run(ftpx(work.path())
        .args([
            "connect",
            &format!("ann@127.0.0.1:{}", s.addr.port()),
            "--ca",
        ])
        .arg(&s.ca)
        .args(["-c", "pwd"])
        .env("FTPX_PASSWORD", "not the password"));
    assert_eq!(wrong.status, 4);
    assert_eq!(
        wrong.stderr,
        "ftpx: login failed: unknown user or wrong password\n"
    );
    for (command, said) in [
        (
            "get nothere",
            "ftpx: get nothere: /nothere: no such file or directory\n",
        ),
        (
            "put /nothere",
            "ftpx: put /nothere: /nothere: No such file or directory\n",
        ),
    ] {
        let out = connect_c(work.path(), &s.ca, s.addr.port(), "ann", command);
        assert_eq!(out.status, 1);
        assert_eq!(out.stderr, said);
    }
}

/// `size: … in … s, …/s`: what a summary on stderr says after the name.
fn is_summary(line: &str, head: &str, size: &str) -> bool {
    line.strip_prefix(&format!("{head}: {size} in "))
        .and_then(|rest| rest.split_once(" s, "))
        .is_some_and(|(secs, rate)| secs.parse::<f64>().is_ok() && rate.ends_with("/s"))
}

#[tokio::test(flavor = "multi_thread")]
async fn each_transfer_ends_with_one_summary_line_on_stderr() {
    let s = TestServer::start().await;
    s.add_user("ann", 64 << 20);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    std::fs::write(w.join("big"), data(3 << 20, 1)).unwrap();
    std::fs::create_dir(w.join("tree")).unwrap();
    for i in 0..4 {
        std::fs::write(w.join(format!("tree/{i}")), data(1024, i)).unwrap();
    }
    let out = connect_c(
        w,
        &s.ca,
        s.addr.port(),
        "ann",
        "put big; get big copy; put -r tree; put -r tree; get -r tree back",
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    // Standard output as before: hash lines and the tree lines.
    let trees: Vec<_> = out
        .stdout
        .lines()
        .filter(|l| l.contains(" files "))
        .collect();
    assert_eq!(
        trees,
        [
            "4 files sent, 0 already complete",
            "0 files sent, 4 already complete",
            "4 files received, 0 already complete"
        ],
        "{}",
        out.stdout
    );
    assert_eq!(out.stdout.lines().count(), 2 + 4 + 3 + 4, "{}", out.stdout);
    // Standard error: one line for each transfer and nothing else.
    let err: Vec<_> = out.stderr.lines().collect();
    assert_eq!(err.len(), 5, "{}", out.stderr);
    assert!(is_summary(err[0], "big", "3.0 MiB"), "{}", out.stderr);
    assert!(is_summary(err[1], "big", "3.0 MiB"), "{}", out.stderr);
    assert!(is_summary(err[2], trees[0], "4.0 KiB"), "{}", out.stderr);
    assert!(is_summary(err[3], trees[1], "0 B"), "{}", out.stderr);
    assert!(is_summary(err[4], trees[2], "4.0 KiB"), "{}", out.stderr);
}
