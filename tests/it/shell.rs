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
    // The client's log has each failure too.
    let log = std::fs::read_to_string(work.path().join("state/ftpx.log")).unwrap();
    for command in ["get nothere", "put /nothere"] {
        assert!(
            log.lines()
                .any(|l| l.contains("command failed") && l.contains(command)),
            "{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dash_before_a_batch_command_lets_the_run_go_on_past_its_failure() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let work = tempfile::tempdir().unwrap();
    let batch = work.path().join("batch");
    std::fs::write(&batch, "-rm nothere\nmkdir d\nrm nothere\nmkdir never\n").unwrap();
    let out = run(ftpx(work.path())
        .args([
            "connect",
            &format!("ann@127.0.0.1:{}", s.addr.port()),
            "--ca",
        ])
        .arg(&s.ca)
        .arg("-b")
        .arg(&batch)
        .env("FTPX_PASSWORD", PASSWORD));
    assert_eq!(out.status, 1, "{}", out.stderr);
    assert_eq!(out.stderr.lines().count(), 2, "{}", out.stderr);
    assert!(s.home("ann").join("d").is_dir());
    assert!(!s.home("ann").join("never").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn cd_dash_mkdir_p_df_and_the_local_commands() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let work = tempfile::tempdir().unwrap();
    let commands = "mkdir -p a/b/c; mkdir -p a/b; cd a/b; cd /; cd -; pwd; df; \
                    lmkdir here; lls; !echo from a shell";
    let out = connect_c(work.path(), &s.ca, s.addr.port(), "ann", commands);
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(s.home("ann").join("a/b/c").is_dir());
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "/a/b");
    let df: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        ["Size", "Used", "Avail", "Use%", "Files", "Max", "Use%"]
    );
    assert_eq!(
        df,
        [
            "1.0", "MiB", "0", "B", "1.0", "MiB", "0%", "3", "1000000", "1%"
        ]
    );
    assert!(work.path().join("here").is_dir());
    assert!(
        lines[3].starts_with('d') && lines[3].ends_with(" here/"),
        "{}",
        out.stdout
    );
    assert!(lines[4].ends_with(" state/"), "{}", out.stdout);
    assert_eq!(lines[5], "from a shell");
    // mkdir -p over a file is an error, as mkdir(1) says.
    std::fs::write(s.home("ann").join("f"), b"x").unwrap();
    let out = connect_c(work.path(), &s.ca, s.addr.port(), "ann", "mkdir -p f/g");
    assert_eq!(out.status, 1, "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_interactive_history_is_written_as_it_goes() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let work = tempfile::tempdir().unwrap();
    let mut child = ftpx(work.path())
        .args([
            "connect",
            &format!("ann@127.0.0.1:{}", s.addr.port()),
            "--ca",
        ])
        .arg(&s.ca)
        .env("FTPX_PASSWORD", PASSWORD)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    use std::io::{BufRead, Write};
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"mkdir kept\npwd\n")
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "/\n");
    // Killed, not exited: what was typed is in the history all the same.
    child.kill().unwrap();
    child.wait().unwrap();
    let history = std::fs::read_to_string(work.path().join("state/history")).unwrap();
    assert!(
        history.contains("mkdir kept") && history.contains("pwd"),
        "{history}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn wildcards_expand_where_the_files_are_and_never_inside_quotes() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    for name in ["a.jpg", "b.jpg", "c.txt", ".hidden.jpg", "*.txt"] {
        std::fs::write(w.join(name), name).unwrap();
    }
    std::fs::create_dir(w.join("got")).unwrap();
    let commands = "mkdir pics; put *.jpg pics; put *.jpg; ls pics/*.jpg; \
                    get pics/?.jpg got; rm *.jpg; put \"*.txt\"";
    let out = connect_c(w, &s.ca, s.addr.port(), "ann", commands);
    assert_eq!(out.status, 0, "{}", out.stderr);
    let home = s.home("ann");
    for name in ["a.jpg", "b.jpg"] {
        assert!(home.join("pics").join(name).is_file(), "pics/{name}");
        assert!(!home.join(name).exists(), "{name} was removed");
        assert_eq!(
            std::fs::read(w.join("got").join(name)).unwrap(),
            name.as_bytes()
        );
    }
    assert!(!home.join("pics/.hidden.jpg").exists());
    assert!(!home.join("c.txt").exists());
    // Quoted: the file named `*.txt`, not the .txt files.
    assert_eq!(std::fs::read(home.join("*.txt")).unwrap(), b"*.txt");
    let listed: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("f ")).collect();
    assert_eq!(listed.len(), 2, "{}", out.stdout);

    let out = connect_c(w, &s.ca, s.addr.port(), "ann", "get *.png");
    assert_eq!(out.status, 1);
    assert!(out.stderr.contains("*.png: no match"), "{}", out.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn rm_r_removes_a_directory_and_all_in_it() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("x"), b"x").unwrap();
    let commands = "mkdir -p d/e/f; mkdir -p d/g; put x d/e/f/x; put x d/x; put x kept; \
                    rm -r d; rm -r kept; quota";
    let out = connect_c(work.path(), &s.ca, s.addr.port(), "ann", commands);
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(!s.home("ann").join("d").exists());
    assert!(!s.home("ann").join("kept").exists());
    assert!(out.stdout.contains("files 0 of "), "{}", out.stdout);
    let out = connect_c(work.path(), &s.ca, s.addr.port(), "ann", "rm -r nothere");
    assert_eq!(out.status, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn put_p_and_get_p_keep_the_modification_time() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let work = tempfile::tempdir().unwrap();
    let then = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    let mtime = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let old = work.path().join("old");
    std::fs::write(&old, b"from 2001").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(then)
        .unwrap();
    let commands = "put -p old; ls old; get -p old back; put old plain";
    let out = connect_c(work.path(), &s.ca, s.addr.port(), "ann", commands);
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(mtime(&s.home("ann").join("old")), then);
    assert!(
        out.stdout.contains("2001-09-09 01:46  old"),
        "{}",
        out.stdout
    );
    assert_eq!(mtime(&work.path().join("back")), then);
    assert_ne!(mtime(&s.home("ann").join("plain")), then);
    let out = connect_c(work.path(), &s.ca, s.addr.port(), "ann", "put -p nothere");
    assert_eq!(out.status, 1);
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

#[tokio::test(flavor = "multi_thread")]
async fn ls_shows_every_name_and_sorts_as_told() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let home = s.home("ann");
    let at = |secs: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    for (name, size, secs) in [
        ("a", 300, 3_000),
        ("b", 100, 1_000),
        ("c", 2_000_000, 2_000),
    ] {
        std::fs::write(home.join(name), vec![0u8; size]).unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(home.join(name))
            .unwrap();
        f.set_modified(at(secs)).unwrap();
    }
    std::fs::write(home.join(".hidden"), b"").unwrap();
    let work = tempfile::tempdir().unwrap();
    let names = |commands: &str| -> Vec<String> {
        let out = connect_c(work.path(), &s.ca, s.addr.port(), "ann", commands);
        assert_eq!(out.status, 0, "{}", out.stderr);
        out.stdout
            .lines()
            .map(|l| l.rsplit("  ").next().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("ls"), [".hidden", "a", "b", "c"]);
    assert_eq!(names("ls -a"), [".hidden", "a", "b", "c"]);
    assert_eq!(names("ls -t"), [".hidden", "a", "c", "b"]);
    assert_eq!(names("ls -S"), ["c", "a", "b", ".hidden"]);
    assert_eq!(names("ls -Sr"), [".hidden", "b", "a", "c"]);
    let out = connect_c(work.path(), &s.ca, s.addr.port(), "ann", "ls -lh c; ls -x");
    assert!(out.stdout.contains("1.9 MiB"), "{}", out.stdout);
    assert_eq!(out.status, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("usage: ls [-lhtSr] [PATH]"),
        "{}",
        out.stderr
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn put_r_p_and_get_r_p_keep_the_modification_times_of_a_tree() {
    let s = TestServer::start().await;
    s.add_user("ann", 4 << 20);
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let then = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    let mtime = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
    std::fs::create_dir_all(w.join("tree/sub")).unwrap();
    // A small file (SEND) and one of several chunks (PUT).
    for (name, len) in [("tree/a", 10), ("tree/sub/big", 600_000)] {
        std::fs::write(w.join(name), vec![7u8; len]).unwrap();
        let f = std::fs::File::options()
            .write(true)
            .open(w.join(name))
            .unwrap();
        f.set_modified(then).unwrap();
    }
    std::fs::create_dir(w.join("back")).unwrap();
    let out = connect_c(
        w,
        &s.ca,
        s.addr.port(),
        "ann",
        "put -rp tree; get -r -p tree back",
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    for name in ["tree/a", "tree/sub/big"] {
        assert_eq!(
            mtime(&s.home("ann").join(name)),
            then,
            "{name} on the server"
        );
        assert_eq!(mtime(&w.join("back").join(name)), then, "{name} back here");
    }
    let out = connect_c(w, &s.ca, s.addr.port(), "ann", "put -rx tree");
    assert_eq!(out.status, 1);
}
