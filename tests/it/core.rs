//! Sessions, login, registration and the shell commands.

use crate::common::*;
use ftpx::protocol::Request;

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
