//! The quota as a hostile user attacks it: replacing a file while another
//! session moves it away, abandoning replacements round after round, filling
//! the server with entries, inheriting a deleted user's home; and the
//! sweeper that clears what uploads left, for users who never come back.

use std::path::Path;
use std::time::{Duration, SystemTime};

use ftpx::client::Client;
use ftpx::protocol::{FrameHeader, Request};
use ftpx::transfer::journal::Journal;
use indicatif::ProgressBar;

use crate::common::*;
use crate::transfer::{
    MIB, PIECE, code, end, entries, frame, put_request, send_chunks, staged, staging_of, vp,
    wait_for, wait_upload_free,
};

/// `USED LIMIT FILES MAX_FILES UNFINISHED_BYTES UNFINISHED` of `QUOTA`.
async fn usage(c: &mut Client) -> [u64; 6] {
    let r = c.request(&Request::Quota).await.unwrap();
    let n: Vec<u64> = r.text.split(' ').map(|w| w.parse().unwrap()).collect();
    n.try_into().unwrap()
}

/// Bytes of the regular files under `dir`, and every file and directory below it.
fn on_disk(dir: &Path) -> (u64, u64) {
    let (mut bytes, mut names) = (0, 0);
    for e in std::fs::read_dir(dir).into_iter().flatten() {
        let e = e.unwrap();
        names += 1;
        let m = e.metadata().unwrap();
        if m.is_dir() {
            let (b, n) = on_disk(&e.path());
            bytes += b;
            names += n;
        } else {
            bytes += m.len();
        }
    }
    (bytes, names)
}

async fn put_bytes(c: &mut Client, work: &Path, remote: &str, bytes: &[u8]) {
    let local = work.join("upload");
    std::fs::write(&local, bytes).unwrap();
    c.put(&local, &vp(remote), &ProgressBar::hidden())
        .await
        .unwrap();
}

/// Starts a PUT of `bytes` to `remote` by hand and sends its first `sent` bytes.
async fn start_put(c: &mut Client, remote: &str, bytes: &[u8], sent: usize) {
    assert_eq!(code(&put_request(c, remote, bytes.len() as u64).await), 150);
    assert!(frame(c, FrameHeader::start(0), &[]).await);
    send_chunks(c, bytes, 0, sent).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn moving_the_parent_of_a_file_being_replaced_does_not_pass_the_quota() {
    let s = TestServer::start().await;
    s.add_user("ann", MIB as u64);
    let work = tempfile::tempdir().unwrap();
    let mut c = s.login("ann").await;
    c.request(&Request::Mkd("d".into())).await.unwrap();
    let old = data(900_000, 1);
    put_bytes(&mut c, work.path(), "/d/f", &old).await;

    // Replacing /d/f with as much again is charged nothing: it replaces.
    let new = data(900_000, 2);
    let mut uploader = s.login("ann").await;
    start_put(&mut uploader, "/d/f", &new, 4 * PIECE).await;
    // Meanwhile the file it replaces is moved away, with its directory.
    c.request(&Request::Rename {
        from: "d".into(),
        to: "e".into(),
    })
    .await
    .unwrap();
    c.request(&Request::Mkd("d".into())).await.unwrap();
    send_chunks(&mut uploader, &new, 4 * PIECE, new.len()).await;
    let landed = end(&mut uploader, new.len(), blake3::hash(&new)).await;

    // It would be a new file now, and 900 KB more don't fit in 1 MiB.
    assert_eq!(code(&landed), 552, "{landed:?}");
    let home = s.home("ann");
    assert_eq!(std::fs::read(home.join("e/f")).unwrap(), old);
    assert!(!home.join("d/f").exists());
    assert!(on_disk(&home).0 <= MIB as u64);
    assert_eq!(
        usage(&mut c).await[..4],
        [900_000, MIB as u64, 3, 1_000_000]
    );
    assert_eq!(entries(&staging_of(&s)), Vec::<std::path::PathBuf>::new());

    // Where the replaced file is still there when it lands, it may.
    let mut uploader = s.login("ann").await;
    start_put(&mut uploader, "/e/f", &new, PIECE).await;
    send_chunks(&mut uploader, &new, PIECE, new.len()).await;
    let landed = end(&mut uploader, new.len(), blake3::hash(&new)).await;
    assert_eq!(code(&landed), 226, "{landed:?}");
    assert_eq!(usage(&mut c).await[0], 900_000);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_abandoned_replacement_counts_until_it_is_discarded() {
    let s = TestServer::start().await;
    s.add_user("ann", MIB as u64);
    let work = tempfile::tempdir().unwrap();
    // This session stays open, so usage is never rebuilt from disk in between.
    let mut watcher = s.login("ann").await;
    let f = data(400_000, 1);
    put_bytes(&mut watcher, work.path(), "/f0", &f).await;

    // Replace /f0, drop the connection half way, delete /f0.
    let mut c = s.login("ann").await;
    start_put(&mut c, "/f0", &data(400_000, 2), 4 * PIECE).await;
    drop(c);
    wait_upload_free(&s, "/f0").await;
    watcher.request(&Request::Dele("f0".into())).await.unwrap();

    // The partial is still on the server, and still counts, in full.
    let (part, journal) = staged(&staging_of(&s), "/f0");
    assert!(part.exists() && journal.exists());
    assert_eq!(
        usage(&mut watcher).await,
        [400_000, MIB as u64, 1, 1_000_000, 400_000, 1]
    );
    // So the next round of the attack does not fit.
    let r = put_request(&mut watcher, "/f1", 700_000).await;
    assert_eq!(code(&r), 552, "{r:?}");

    // The user sees it and can drop it.
    let parts = watcher.request(&Request::Parts).await.unwrap();
    assert_eq!(parts.lines.len(), 1, "{parts:?}");
    assert!(parts.lines[0].starts_with("400000 "), "{parts:?}");
    assert!(parts.lines[0].ends_with(" /f0"), "{parts:?}");
    assert_eq!(parts.text, "1 unfinished uploads");
    watcher
        .request(&Request::Discard("/f0".into()))
        .await
        .unwrap();
    assert!(!part.exists() && !journal.exists());
    assert_eq!(
        usage(&mut watcher).await,
        [0, MIB as u64, 0, 1_000_000, 0, 0]
    );
    let again = watcher.request(&Request::Discard("/f0".into())).await;
    assert_eq!(code(&again), 550);
    put_bytes(&mut watcher, work.path(), "/f1", &data(700_000, 3)).await;
    s.stop().await;
}

/// Bytes of every file under the home and the user's staging directory.
fn occupied(s: &TestServer) -> u64 {
    on_disk(&s.home("ann")).0 + on_disk(&staging_of(s)).0
}

#[tokio::test(flavor = "multi_thread")]
async fn replacements_abandoned_round_after_round_stay_within_the_limits() {
    let s = TestServer::start().await;
    s.add_user("ann", MIB as u64);
    s.users().modify("ann", |u| u.max_files = Some(2)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let mut watcher = s.login("ann").await;
    put_bytes(&mut watcher, work.path(), "/f0", &data(600_000, 1)).await;
    // Each round: replace the file (charged nothing while it runs), drop
    // the connection, then rename the file so that the next round has a
    // fresh one to replace.
    for round in 0..6 {
        let name = format!("/f{round}");
        let mut c = s.login("ann").await;
        start_put(&mut c, &name, &data(600_000, 2 + round), 8 * PIECE).await;
        drop(c);
        wait_upload_free(&s, &name).await;
        watcher
            .request(&Request::Rename {
                from: name.clone(),
                to: format!("/f{}", round + 1),
            })
            .await
            .unwrap();
        let [used, limit, files, max_files, ..] = usage(&mut watcher).await;
        assert!(
            used <= limit && files <= max_files,
            "round {round}: {used} of {limit}, {files} of {max_files}"
        );
        assert!(
            occupied(&s) <= limit,
            "round {round}: {} bytes on disk",
            occupied(&s)
        );
    }
    // A replacement that fits beside its file when kept is kept, to be resumed.
    s.users()
        .modify("ann", |u| u.quota = 2 * MIB as u64)
        .unwrap();
    let mut c = s.login("ann").await;
    start_put(&mut c, "/f6", &data(600_000, 9), 8 * PIECE).await;
    drop(c);
    wait_upload_free(&s, "/f6").await;
    assert!(staged(&staging_of(&s), "/f6").1.exists());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_is_not_registered_while_a_deleted_account_of_it_is_logged_in() {
    let s = TestServer::start().await;
    s.add_user("alice", MIB as u64);
    let old = s.login("alice").await;
    s.users().remove("alice", true).unwrap();
    let register = || async {
        let mut raw = Raw::connect(&s).await;
        raw.ask("REGISTER alice \"a stranger's password\"").await
    };
    let refused = register().await;
    assert!(refused.starts_with("553 "), "{refused}");
    old.quit().await;
    wait_for("the old session to end", || {
        !s.server.ledger.has_sessions("alice").unwrap()
    })
    .await;
    let accepted = register().await;
    assert!(accepted.starts_with("230 "), "{accepted}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_upload_cannot_be_discarded() {
    let s = TestServer::start().await;
    s.add_user("ann", MIB as u64);
    let mut c = s.login("ann").await;
    start_put(&mut c, "/big", &data(500_000, 1), PIECE).await;
    let mut other = s.login("ann").await;
    let r = other.request(&Request::Discard("/big".into())).await;
    assert_eq!(code(&r), 450, "{r:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_small_upload_supersedes_a_partial_of_its_path() {
    let s = TestServer::start().await;
    s.add_user("ann", MIB as u64);
    let mut watcher = s.login("ann").await;
    let work = tempfile::tempdir().unwrap();
    let (part, journal) = staged(&staging_of(&s), "/x");
    for (i, small) in ["SEND", "one-chunk PUT"].into_iter().enumerate() {
        let mut c = s.login("ann").await;
        start_put(&mut c, "/x", &data(500_000, i as u8), 2 * PIECE).await;
        drop(c);
        wait_upload_free(&s, "/x").await;
        assert!(journal.exists(), "{small}");
        assert_eq!(usage(&mut watcher).await[4..], [500_000, 1], "{small}");
        match small {
            "SEND" => {
                let mut raw = Raw::connect(&s).await;
                raw.login("ann").await;
                raw.send(&send_request("/x", b"small")).await;
                let reply = raw.reply().await.unwrap();
                assert!(reply.starts_with("226 "), "{reply}");
            }
            _ => put_bytes(&mut watcher, work.path(), "/x", b"one chunk").await,
        }
        // Nothing of the partial is left to be charged, now or after a rescan.
        assert!(!part.exists() && !journal.exists(), "{small}");
        assert_eq!(usage(&mut watcher).await[4..], [0, 0], "{small}");
    }
    s.stop().await;
}

/// Makes a journal look last saved `ago` before now, and its partial as old.
fn age(journal: &Path, ago: Duration) {
    let mut record = Journal::load(journal).unwrap().unwrap();
    record.updated -= ago.as_secs();
    std::fs::write(journal, toml::to_string(&record).unwrap()).unwrap();
    let then = SystemTime::now() - ago;
    for f in [journal.to_path_buf(), journal.with_extension("part")] {
        if let Ok(file) = std::fs::File::options().write(true).open(&f) {
            file.set_modified(then).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sweeper_clears_expired_partials_of_every_user_on_its_own() {
    let s = TestServer::start_with(|c| {
        c.transfer.partial_ttl_hours = 1;
        c.transfer.partial_sweep_secs = 1;
    })
    .await;
    s.add_user("ann", MIB as u64);
    let mut watcher = s.login("ann").await;
    let staging = staging_of(&s);
    // Two abandoned uploads; one running, whose journal looks just as old.
    for path in ["/old", "/young"] {
        let mut c = s.login("ann").await;
        start_put(&mut c, path, &data(300_000, 1), 2 * PIECE).await;
        drop(c);
        wait_upload_free(&s, path).await;
    }
    let mut running = s.login("ann").await;
    start_put(&mut running, "/running", &data(300_000, 2), 2 * PIECE).await;
    let (_, running_journal) = staged(&staging, "/running");
    wait_for("the running upload's journal", || running_journal.exists()).await;
    assert_eq!(usage(&mut watcher).await[4..], [600_000 + 300_000, 3]);

    let hour = Duration::from_secs(3600);
    age(&staged(&staging, "/old").1, hour);
    age(&running_journal, hour);
    // Left by a crash: a journal whose partial is gone, a partial with no
    // journal, a damaged journal.
    let (_, lone_journal) = staged(&staging, "/lone");
    std::fs::copy(staged(&staging, "/young").1, &lone_journal).unwrap();
    let orphan = staging.join("0123456789abcdef0123456789abcdef.part");
    std::fs::write(&orphan, b"crash").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&orphan)
        .unwrap()
        .set_modified(SystemTime::now() - hour)
        .unwrap();
    let damaged = staging.join("fedcba9876543210fedcba9876543210.journal");
    std::fs::write(&damaged, b"not a journal").unwrap();

    wait_for("the sweeper", || {
        !staged(&staging, "/old").0.exists()
            && !lone_journal.exists()
            && !orphan.exists()
            && !damaged.exists()
    })
    .await;
    // Gone and no longer charged, with the user's session open all along.
    assert!(!staged(&staging, "/old").1.exists());
    assert_eq!(usage(&mut watcher).await[4..], [300_000 + 300_000, 2]);
    // The young one stays; the running one was never touched.
    assert!(staged(&staging, "/young").0.exists());
    assert!(running_journal.exists() && staged(&staging, "/running").0.exists());
    let new = data(300_000, 2);
    send_chunks(&mut running, &new, 2 * PIECE, new.len()).await;
    let landed = end(&mut running, new.len(), blake3::hash(&new)).await;
    assert_eq!(code(&landed), 226, "{landed:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn what_a_crash_left_in_staging_is_cleared_at_start() {
    let s = TestServer::start_with(|c| {
        let staging = c.partial_dir().join("ann");
        std::fs::create_dir_all(&staging).unwrap();
        for name in ["a.part", "b.send", "c.tmp"] {
            std::fs::write(staging.join(name), b"left by a crash").unwrap();
        }
    })
    .await;
    // The first session is served after the sweep.
    drop(Raw::connect(&s).await);
    assert_eq!(entries(&staging_of(&s)), Vec::<std::path::PathBuf>::new());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn files_and_directories_are_limited_per_user() {
    let s = TestServer::start().await;
    s.add_user("ann", MIB as u64);
    s.users().modify("ann", |u| u.max_files = Some(5)).unwrap();
    let mut c = s.login("ann").await;
    c.request(&Request::Mkd("d".into())).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    for i in 0..3 {
        put_bytes(&mut c, work.path(), &format!("/d/{i}"), b"").await;
    }
    // Replacing a file adds no entry.
    put_bytes(&mut c, work.path(), "/d/0", b"").await;
    // The fifth entry is the last.
    let mut raw = Raw::connect(&s).await;
    raw.login("ann").await;
    raw.send(&send_request("/d/3", b"")).await;
    assert!(raw.reply().await.unwrap().starts_with("226 "));
    raw.send(&send_request("/d/4", b"")).await;
    let refused = raw.reply().await.unwrap();
    assert!(
        refused.starts_with("552 file limit reached: at most 5 files and directories"),
        "{refused}"
    );
    assert_eq!(code(&c.request(&Request::Mkd("e".into())).await), 552);
    assert_eq!(code(&put_request(&mut c, "/d/5", 1).await), 552);
    assert_eq!(usage(&mut c).await[2..4], [5, 5]);
    assert_eq!(on_disk(&s.home("ann")).1, 5);
    // Removing one makes room for one.
    c.request(&Request::Dele("d/3".into())).await.unwrap();
    c.request(&Request::Mkd("e".into())).await.unwrap();
    assert_eq!(code(&c.request(&Request::Mkd("f".into())).await), 552);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn put_r_over_the_file_limit_fails_with_a_clear_message() {
    let srv_dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(srv_dir.path(), 0);
    let out = run(ftpx(srv_dir.path())
        .args(["useradd", "ann", "--max-files", "10", "--password-stdin"])
        .stdin(write_stdin(&format!("{PASSWORD}\n"))));
    assert_eq!(out.status, 0, "{}", out.stderr);
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    for i in 0..30 {
        std::fs::write(tree.join(format!("{i:02}")), b"").unwrap();
    }
    let out = connect_c(work.path(), &server.ca(), server.port, "ann", "put -r tree");
    assert_eq!(out.status, 1, "{}", out.stdout);
    assert!(
        out.stderr
            .contains("file limit reached: at most 10 files and directories"),
        "{}",
        out.stderr
    );
    assert!(on_disk(&srv_dir.path().join("var/homes/ann")).1 <= 10);
    let users = run(ftpx(srv_dir.path()).args(["users"]));
    let ann = users
        .stdout
        .lines()
        .find(|l| l.starts_with("ann "))
        .unwrap();
    assert!(
        ann.split_whitespace().rev().take(2).all(|w| w == "10"),
        "{ann}"
    );
    let out = run(ftpx(srv_dir.path()).args(["usermod", "ann", "--max-files", "100"]));
    assert_eq!(out.status, 0, "{}", out.stderr);
    let out = connect_c(
        work.path(),
        &server.ca(),
        server.port,
        "ann",
        "put -r tree; quota",
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(out.stdout.contains("files 31 of 100"), "{}", out.stdout);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stranger_cannot_register_the_name_of_a_deleted_user_with_a_kept_home() {
    let srv_dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(srv_dir.path(), 0);
    server.useradd("alice", "1MiB");
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("secret"), b"alice's").unwrap();
    let out = connect_c(
        work.path(),
        &server.ca(),
        server.port,
        "alice",
        "put secret",
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    let out = run(ftpx(srv_dir.path()).args(["userdel", "alice"]));
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert!(out.stdout.contains("can't be registered"), "{}", out.stdout);

    let register = || {
        run(ftpx(work.path())
            .args([
                "connect",
                &format!("alice@127.0.0.1:{}", server.port),
                "--ca",
            ])
            .arg(server.ca())
            .args(["--register", "--password-stdin", "-c", "ls"])
            .stdin(write_stdin("a stranger's password\n")))
    };
    let out = register();
    assert_eq!(out.status, 4, "{}\n{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("taken"), "{}", out.stderr);
    assert!(!out.stdout.contains("secret"), "{}", out.stdout);

    // The admin can revive the account with its home...
    server.useradd("alice", "1MiB");
    let out = connect_c(work.path(), &server.ca(), server.port, "alice", "ls");
    assert!(out.stdout.contains("secret"), "{}", out.stdout);
    // ...or remove it all; then the name is free, and empty.
    let out = run(ftpx(srv_dir.path()).args(["userdel", "alice", "--remove-home"]));
    assert_eq!(out.status, 0, "{}", out.stderr);
    let out = register();
    assert_eq!(out.status, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "", "a new account starts empty");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_s_change_reaches_open_sessions_at_their_next_request() {
    let s = TestServer::start().await;
    s.add_user("ann", 1000);
    let mut c = s.login("ann").await;
    assert_eq!(usage(&mut c).await[..4], [0, 1000, 0, 1_000_000]);
    assert_eq!(code(&put_request(&mut c, "/f", 5000).await), 552);
    s.users()
        .modify("ann", |u| {
            u.quota = 10_000;
            u.max_files = Some(7);
        })
        .unwrap();
    assert_eq!(usage(&mut c).await[..4], [0, 10_000, 0, 7]);
    let work = tempfile::tempdir().unwrap();
    put_bytes(&mut c, work.path(), "/f", &data(5000, 1)).await;
    // An account removed ends its sessions.
    s.users().remove("ann", false).unwrap();
    let r = c.request(&Request::Pwd).await;
    assert_eq!(code(&r), 421, "{r:?}");
    assert!(c.request(&Request::Noop).await.is_err());
    s.stop().await;
}
