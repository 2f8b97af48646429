//! Sessions, login, registration and the shell commands.

use std::time::{Duration, Instant};

use crate::common::*;
use ftpx::protocol::Request;

/// A server where `ann` has 10 MiB, and a raw session logged in as her.
async fn ann_raw() -> (TestServer, Raw) {
    let s = TestServer::start().await;
    s.add_user("ann", 10 << 20);
    let mut raw = Raw::connect(&s).await;
    raw.login("ann").await;
    (s, raw)
}

/// `n` SEND requests back to back: `f{i}` with `data(len, i)`.
fn numbered_sends(n: usize, len: usize) -> Vec<u8> {
    let mut wire = Vec::new();
    for i in 0..n {
        wire.extend(send_request(&format!("f{i}"), &data(len, i as u8)));
    }
    wire
}

#[tokio::test(flavor = "multi_thread")]
async fn login_and_pwd() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let mut c = s.login("ann").await;
    let r = c.request(&Request::Pwd).await.unwrap();
    assert_eq!(r.code, 257);
    assert_eq!(r.text, "/");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn guessing_one_account_bans_that_pair_only() {
    let s = TestServer::start_with(|c| {
        c.accounts.login_failure_delay_ms = 10;
        c.defender.pair_max_failures = 3;
    })
    .await;
    s.add_user("ann", 1 << 20);
    s.add_user("bob", 1 << 20);
    let mut c = s.connect().await;
    for _ in 0..3 {
        let e = c.login("ann", "wrong password", false).await.unwrap_err();
        assert!(e.to_string().contains("430"), "{e}");
    }
    // Banned: even the right password is refused, with the same reply.
    let e = c.login("ann", PASSWORD, false).await.unwrap_err();
    assert!(e.to_string().contains("login failed (430)"), "{e}");
    // Another person behind the same address still gets in.
    c.login("bob", PASSWORD, false).await.unwrap();
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn spraying_many_accounts_bans_the_address() {
    let s = TestServer::start_with(|c| {
        c.accounts.login_failure_delay_ms = 1;
        c.defender.source_max_accounts = 4;
    })
    .await;
    s.add_user("ann", 1 << 20);
    let mut c = s.connect().await;
    for user in ["u1", "u2", "u3", "u4"] {
        assert!(c.login(user, "guess-guess", false).await.is_err());
    }
    assert!(
        c.login("ann", PASSWORD, false).await.is_err(),
        "a sprayer's address must be banned"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failure_delays_grow_for_repeated_failures() {
    let s = TestServer::start_with(|c| {
        c.accounts.login_failure_delay_ms = 100;
        c.defender.pair_max_failures = 100;
    })
    .await;
    let mut c = s.connect().await;
    let mut times = vec![];
    for _ in 0..4 {
        let t = std::time::Instant::now();
        assert!(c.login("nobody", "guess-guess", false).await.is_err());
        times.push(t.elapsed());
    }
    // 100, 200, 400, 800 ms at least: the fourth is slower than the first three together.
    assert!(
        times[3] >= std::time::Duration::from_millis(800),
        "{times:?}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn registrations_are_limited_per_address() {
    let s = TestServer::start_with(|c| c.defender.registrations_per_hour = 2).await;
    for (i, ok) in [(1, true), (2, true), (3, false)] {
        let mut c = s.connect().await;
        let r = c.login(&format!("new{i}"), PASSWORD, true).await;
        assert_eq!(r.is_ok(), ok, "{r:?}");
    }
    assert!(s.home("new2").is_dir());
    assert!(!s.home("new3").exists());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn small_files_go_many_at_once_and_refusals_keep_the_session_in_step() {
    let s = TestServer::start().await;
    s.add_user("ann", 100_000);
    let work = tempfile::tempdir().unwrap();
    let mut files = vec![];
    for i in 0..150 {
        let local = work.path().join(format!("f{i}"));
        std::fs::write(&local, data(i * 7, i as u8)).unwrap();
        files.push((
            local,
            ftpx::protocol::VPath::resolve(&ftpx::protocol::VPath::root(), &format!("/f{i}"), 99)
                .unwrap(),
        ));
    }
    // One into a directory that does not exist, one that does not fit.
    let big = work.path().join("big");
    std::fs::write(&big, data(90_000, 9)).unwrap();
    files.push((
        work.path().join("f1"),
        ftpx::protocol::VPath::resolve(&ftpx::protocol::VPath::root(), "/no/such", 99).unwrap(),
    ));
    files.push((
        big,
        ftpx::protocol::VPath::resolve(&ftpx::protocol::VPath::root(), "/big", 99).unwrap(),
    ));
    // One that can't be read here, and one too large for SEND.
    files.push((
        work.path().join("missing"),
        ftpx::protocol::VPath::resolve(&ftpx::protocol::VPath::root(), "/missing", 99).unwrap(),
    ));
    let huge = work.path().join("huge");
    std::fs::write(&huge, data(ftpx::protocol::MAX_SEND as usize + 1, 3)).unwrap();
    files.push((
        huge,
        ftpx::protocol::VPath::resolve(&ftpx::protocol::VPath::root(), "/huge", 99).unwrap(),
    ));
    let mut c = s.login("ann").await;
    let mut outcomes = vec![None; files.len()];
    c.send_many(&files, |i, r| {
        outcomes[i] = Some(r.map_err(|e| e.to_string()))
    })
    .await
    .unwrap();
    for (i, outcome) in outcomes.iter().enumerate().take(150) {
        let t = outcome.clone().unwrap().unwrap();
        assert_eq!(t.hash, blake3::hash(&data(i * 7, i as u8)));
        assert_eq!(
            std::fs::read(s.home("ann").join(format!("f{i}"))).unwrap(),
            data(i * 7, i as u8)
        );
    }
    assert!(
        outcomes[150].clone().unwrap().unwrap_err().contains("550"),
        "{:?}",
        outcomes[150]
    );
    assert!(
        outcomes[151].clone().unwrap().unwrap_err().contains("552"),
        "{:?}",
        outcomes[151]
    );
    assert!(!s.home("ann").join("big").exists());
    let missing = outcomes[152].clone().unwrap().unwrap_err();
    assert!(missing.contains("missing"), "{missing}");
    let huge = outcomes[153].clone().unwrap().unwrap_err();
    assert!(huge.contains("too large"), "{huge}");
    assert!(!s.home("ann").join("missing").exists() && !s.home("ann").join("huge").exists());
    // Still in step.
    let used: u64 = (0..150).map(|i| (i * 7) as u64).sum();
    let q = c.request(&Request::Quota).await.unwrap();
    assert!(q.text.starts_with(&format!("{used} 100000 ")), "{}", q.text);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_send_with_a_bad_chunk_stores_nothing_and_an_oversized_one_is_cut_off() {
    use ftpx::protocol::{FrameHeader, FrameKind, MAX_SEND};
    let (s, mut raw) = ann_raw().await;
    let body = data(5000, 1);
    let mut wire = b"SEND f 5000\n".to_vec();
    wire.extend_from_slice(&FrameHeader::start(0).encode());
    let mut chunk = FrameHeader {
        kind: FrameKind::Chunk,
        offset: 0,
        len: 5000,
        hash: *blake3::hash(&body).as_bytes(),
    };
    chunk.hash[0] ^= 1;
    wire.extend_from_slice(&chunk.encode());
    wire.extend_from_slice(&body);
    wire.extend_from_slice(&FrameHeader::end(5000, blake3::hash(&body)).encode());
    raw.send(&wire).await;
    let r = raw.reply().await.unwrap();
    assert!(r.starts_with("453 "), "{r}");
    assert!(!s.home("ann").join("f").exists());
    assert!(raw.ask("NOOP").await.starts_with("200"));
    let r = raw.ask(&format!("SEND g {}", MAX_SEND + 1)).await;
    assert!(r.starts_with("500 "), "{r}");
    assert!(raw.line().await.is_none(), "the session went on");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_sends_are_answered_in_order_before_the_next_request() {
    let (s, mut raw) = ann_raw().await;
    // More SENDs than the server keeps in flight, two in a row to one path,
    // then a listing, all written before any reply is read.
    let mut wire = Vec::new();
    for i in 0..100 {
        wire.extend(send_request(&format!("f{i}"), &data(1000 + i, i as u8)));
        if i == 7 {
            wire.extend(send_request("f7", b"second"));
        }
    }
    wire.extend(b"LIST\n");
    raw.send(&wire).await;
    for i in 0..100 {
        let r = raw.reply().await.unwrap();
        let want = format!(
            "226 {} {}",
            blake3::hash(&data(1000 + i, i as u8)),
            1000 + i
        );
        assert_eq!(r, want, "reply {i}");
        if i == 7 {
            let r = raw.reply().await.unwrap();
            assert_eq!(r, format!("226 {} 6", blake3::hash(b"second")));
        }
    }
    // The listing already sees every file.
    let mut listed = 0;
    loop {
        let line = raw.line().await.unwrap();
        if line.starts_with("213 ") {
            assert_eq!(line, "213 100 entries");
            break;
        }
        listed += 1;
    }
    assert_eq!(listed, 100);
    assert_eq!(std::fs::read(s.home("ann").join("f7")).unwrap(), b"second");
    let used: usize = (0..100)
        .filter(|&i| i != 7)
        .map(|i| 1000 + i)
        .sum::<usize>()
        + 6;
    assert!(
        raw.ask("QUOTA")
            .await
            .starts_with(&format!("213 {used} {} ", 10 << 20))
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_send_or_a_bad_line_is_answered_after_the_sends_before_it() {
    let (s, mut raw) = ann_raw().await;
    let mut wire = Vec::new();
    for i in 0..20 {
        wire.extend(send_request(&format!("f{i}"), &data(3000, i as u8)));
    }
    // Its end frame names another file's hash.
    let mut bad = send_request("bad", &data(3000, 99));
    let len = bad.len();
    bad[len - 32..].copy_from_slice(blake3::hash(b"other").as_bytes());
    wire.extend(bad);
    wire.extend(b"FROB\n");
    wire.extend(send_request("last", b"last"));
    raw.send(&wire).await;
    for i in 0..20 {
        let r = raw.reply().await.unwrap();
        assert!(r.starts_with("226 "), "reply {i}: {r}");
    }
    let r = raw.reply().await.unwrap();
    assert!(r.starts_with("454 "), "{r}");
    let r = raw.reply().await.unwrap();
    assert!(r.starts_with("500 "), "{r}");
    let r = raw.reply().await.unwrap();
    assert_eq!(r, format!("226 {} 4", blake3::hash(b"last")));
    assert!(!s.home("ann").join("bad").exists());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_sending_still_gets_every_reply() {
    use tokio::io::AsyncWriteExt;
    let (s, mut raw) = ann_raw().await;
    raw.send(&numbered_sends(30, 5000)).await;
    raw.stream.shutdown().await.unwrap();
    for i in 0..30 {
        let r = raw.reply().await;
        assert_eq!(
            r,
            Some(format!("226 {} 5000", blake3::hash(&data(5000, i as u8)))),
            "reply {i}"
        );
    }
    assert_eq!(raw.line().await, None);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sends_in_flight_when_the_client_leaves_are_stored_and_counted() {
    let (s, mut raw) = ann_raw().await;
    raw.send(&numbered_sends(50, 2000)).await;
    drop(raw);
    // A new session sees all of them, counted once, and no staging file is left.
    let mut c = s.login("ann").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(s.home("ann")).unwrap().count() < 50 {
        assert!(Instant::now() < deadline, "the SENDs were not all stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..50 {
        assert_eq!(
            std::fs::read(s.home("ann").join(format!("f{i}"))).unwrap(),
            data(2000, i as u8)
        );
    }
    let q = c.request(&Request::Quota).await.unwrap();
    assert!(
        q.text.starts_with(&format!("{} {} ", 50 * 2000, 10 << 20)),
        "{}",
        q.text
    );
    let partial = s.config.partial_dir().join("ann");
    let left: Vec<_> = std::fs::read_dir(&partial)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_that_waits_too_long_for_hashing_is_told_the_server_is_busy() {
    let s = TestServer::start_with(|c| {
        c.accounts.hash_concurrency = 1;
        c.limits.login_timeout_secs = 1;
    })
    .await;
    s.add_user("ann", 1 << 20);
    // Every hashing turn is taken.
    let elsewhere = ftpx::server::defender::Source::of("10.9.9.9".parse().unwrap());
    let held = s.server.turns.take(elsewhere).await;
    let mut c = s.connect().await;
    let e = c.login("ann", PASSWORD, false).await.unwrap_err();
    assert!(
        e.to_string().contains("busy") && e.to_string().contains("421"),
        "{e}"
    );
    drop(held);
    s.login("ann").await;
    s.stop().await;
}
