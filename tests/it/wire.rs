//! The protocol by hand over real TLS (THREATS.md 2.B and 2.G): greeting,
//! the login state machine, syntax errors, line and credential limits,
//! frames out of place, registration, TLS-level refusals, timeouts and
//! session limits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ftpx::protocol::VPath;
use ftpx::protocol::{ALPN, FrameHeader, FrameKind};
use indicatif::ProgressBar;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::common::*;

/// Hang guard for anything the server must do on its own.
const GUARD: Duration = Duration::from_secs(20);

fn code(reply: &str) -> u16 {
    reply.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// A TLS connection made by hand: any ALPN list, any loopback source address.
struct Tls {
    stream: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl Tls {
    async fn connect(s: &TestServer, alpn: &[&[u8]], from: Option<&str>) -> std::io::Result<Tls> {
        let mut config = ftpx::tls::client_config(&s.ca).unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let tcp = tcp_from(s.addr, from).await;
        let stream = tokio::time::timeout(
            GUARD,
            TlsConnector::from(Arc::new(config))
                .connect(ftpx::tls::server_name("localhost").unwrap(), tcp),
        )
        .await
        .expect("TLS handshake hung")?;
        Ok(Tls {
            stream,
            buf: vec![],
        })
    }

    /// A greeted session from the loopback address `from`.
    async fn greeted(s: &TestServer, from: &str) -> Tls {
        let mut t = Tls::connect(s, &[ALPN], Some(from)).await.unwrap();
        let greeting = t.line().await.unwrap_or_default();
        assert!(greeting.starts_with("220 "), "{greeting}");
        t
    }

    /// Sends a line and returns the final reply line ("" if the session ended).
    async fn ask(&mut self, line: &str) -> String {
        self.send(line).await;
        self.reply().await
    }

    /// Sends a line without waiting for its reply.
    async fn send(&mut self, line: &str) {
        self.stream
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        self.stream.flush().await.unwrap();
    }

    /// The next final reply line ("" if the session ended).
    async fn reply(&mut self) -> String {
        loop {
            let Some(reply) = self.line().await else {
                return String::new();
            };
            if reply.len() < 4 || reply.as_bytes()[3] != b'-' {
                return reply;
            }
        }
    }

    /// The next line, or None at the end of the stream (or a reset).
    async fn line(&mut self) -> Option<String> {
        read_line(&mut self.stream, &mut self.buf).await
    }
}

async fn tcp_from(addr: SocketAddr, from: Option<&str>) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(ip) = from {
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    }
    socket.connect(addr).await.unwrap()
}

/// Reads whatever a raw TCP peer is sent until the server closes (or resets).
async fn read_until_closed(tcp: &mut TcpStream) -> Vec<u8> {
    let mut got = vec![];
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(GUARD, tcp.read(&mut chunk))
            .await
            .expect("the server kept the connection open")
        {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Everything under `dir`, with sizes: to show that nothing changed.
fn tree(dir: &std::path::Path) -> Vec<(PathBuf, u64)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            }
            out.push((e.path(), if m.is_file() { m.len() } else { 0 }));
        }
    }
    out.sort();
    out
}

/// The liveness oracle: a fresh, well-behaved client logs in as `user` and
/// round-trips a file.
async fn round_trip(s: &TestServer, user: &str) {
    let local = tempfile::tempdir().unwrap();
    let body = data(200_000, 9);
    std::fs::write(local.path().join("up.bin"), &body).unwrap();
    let mut c = s.login(user).await;
    let remote = VPath::resolve(&VPath::root(), "/round-trip.bin", 4096).unwrap();
    let up = c
        .put(
            &local.path().join("up.bin"),
            &remote,
            &ProgressBar::hidden(),
        )
        .await
        .unwrap();
    assert_eq!(up.hash, blake3::hash(&body));
    c.get(
        &remote,
        &local.path().join("down.bin"),
        &ProgressBar::hidden(),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(local.path().join("down.bin")).unwrap(), body);
    c.request(&ftpx::protocol::Request::Dele("/round-trip.bin".into()))
        .await
        .unwrap();
    c.quit().await;
}

const NEW_PASSWORD: &str = "a long new password";

#[tokio::test(flavor = "multi_thread")]
async fn greeting_and_the_always_allowed_verbs() {
    let s = TestServer::start().await;
    let mut t = Tls::connect(&s, &[ALPN], None).await.unwrap();
    let (_, conn) = t.stream.get_ref();
    assert_eq!(conn.alpn_protocol(), Some(ALPN));
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(
        t.line().await.unwrap(),
        format!("220 ftpx {} ready", env!("CARGO_PKG_VERSION"))
    );

    let mut raw = Raw::connect(&s).await;
    assert_eq!(raw.ask("NOOP").await, "200 ok");
    assert_eq!(raw.ask("noop").await, "200 ok");
    raw.send(b"HELP\n").await;
    let first = raw.line().await.unwrap();
    assert!(
        first.starts_with("211-") && first.contains("LOGIN"),
        "{first}"
    );
    assert!(raw.reply().await.unwrap().starts_with("211 "));
    assert_eq!(raw.ask("QUIT").await, "221 goodbye");
    assert_eq!(raw.line().await, None);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn file_commands_before_login_get_530_and_change_nothing() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    std::fs::write(s.home("ann").join("keep.txt"), b"keep").unwrap();
    std::fs::create_dir(s.home("ann").join("d")).unwrap();
    let var = s.config.server.var_dir.clone();
    let before = tree(&var);
    let h = hex(b"keep");

    let mut raw = Raw::connect(&s).await;
    for line in [
        "PWD".to_string(),
        "pwd".into(),
        "CWD".into(),
        "CWD d".into(),
        "LIST".into(),
        "LIST d".into(),
        "STAT keep.txt".into(),
        "HASH keep.txt".into(),
        "MKD newdir".into(),
        "RMD d".into(),
        "DELE keep.txt".into(),
        "RENAME keep.txt moved.txt".into(),
        "QUOTA".into(),
        "PUT up.txt 5".into(),
        "GET keep.txt".into(),
        format!("GET keep.txt 2 {h}"),
        "STAT ../ann/keep.txt".into(),
        "DELE /ann/keep.txt".into(),
    ] {
        let reply = raw.ask(&line).await;
        assert_eq!(code(&reply), 530, "{line:?} got {reply:?}");
    }
    // A SEND carries its frames: they are read before the 530, so that
    // none of their bytes is taken for a request line.
    let mut frames = send_request("up.txt", b"QUIT\nDELE keep.txt\n");
    frames.extend_from_slice(b"NOOP\n");
    raw.send(&frames).await;
    assert_eq!(code(&raw.reply().await.unwrap()), 530);
    assert_eq!(raw.reply().await.unwrap(), "200 ok");
    // Still reading lines: the refused PUT did not start a transfer.
    assert_eq!(raw.ask("NOOP").await, "200 ok");
    assert_eq!(tree(&var), before);

    // The same session can still log in, and finds everything as it was.
    raw.login("ann").await;
    let stat = raw.ask("STAT keep.txt").await;
    assert!(stat.starts_with("213 f 4 "), "{stat}");
    assert_eq!(raw.ask("STAT d").await.get(..6), Some("213 d "));
    drop(raw);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_verbs_and_empty_lines_are_500() {
    let s = TestServer::start_with(|c| c.limits.max_bad_requests = u32::MAX).await;
    s.add_user("ann", 1 << 20);
    let mut raw = Raw::connect(&s).await;
    let unknown = [
        "FOO",
        "XYZZY a b",
        "USER ann",
        "PASS secret",
        "RETR f",
        "SITE EXEC ls",
        "GET\u{a0}f",
        "",
        "   ",
        "\t",
    ];
    for line in unknown {
        assert_eq!(code(&raw.ask(line).await), 500, "{line:?}");
    }
    raw.login("ann").await;
    for line in unknown {
        assert_eq!(code(&raw.ask(line).await), 500, "{line:?}");
    }
    assert_eq!(raw.ask("NOOP").await, "200 ok");
    drop(raw);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_arguments_are_501_and_syntax_errors_500() {
    let s = TestServer::start_with(|c| c.limits.max_bad_requests = u32::MAX).await;
    s.add_user("ann", 1 << 20);
    std::fs::write(s.home("ann").join("f"), b"0123456789").unwrap();
    let h = hex(b"01234");
    let mut raw = Raw::connect(&s).await;
    // Argument counts are checked before login state.
    assert_eq!(code(&raw.ask("LOGIN ann").await), 501);
    assert_eq!(code(&raw.ask("REGISTER a b c").await), 501);
    raw.login("ann").await;
    for line in [
        "PUT x".to_string(),
        "PUT x -1".into(),
        "PUT x +1".into(),
        "PUT x 1e3".into(),
        "PUT x 0x10".into(),
        "PUT x 1.5".into(),
        "PUT x \"\"".into(),
        "PUT x 99999999999999999999999".into(),
        "PUT x 18446744073709551616".into(),
        "PUT x 5 6".into(),
        "GET".into(),
        "GET f 5".into(),
        "GET f 5 zz".into(),
        format!("GET f x {h}"),
        format!("GET f -5 {h}"),
        format!("GET f 5 {}", &h[..63]),
        format!("GET f 5 {h}0"),
        format!(
            "GET f 5 {}",
            h.to_uppercase().replace(char::is_numeric, "G")
        ),
        format!("GET f 1 {h} 2 {h} 3 {h}"),
        "PWD x".into(),
        "QUOTA x".into(),
        "NOOP x".into(),
        "HELP x".into(),
        "QUIT now".into(),
        "CWD a b".into(),
        "LIST a b".into(),
        "STAT".into(),
        "STAT a b".into(),
        "HASH".into(),
        "MKD".into(),
        "RMD".into(),
        "DELE".into(),
        "DELE a b".into(),
        "RENAME a".into(),
        "RENAME a b c".into(),
        "LOGIN".into(),
        "LIST a b c d e f g h i j".into(),
    ] {
        let reply = raw.ask(&line).await;
        assert_eq!(code(&reply), 501, "{line:?} got {reply:?}");
    }
    // An unterminated quote is a syntax error of the line (500 in the spec's table).
    for line in [
        "STAT \"abc",
        "STAT 'abc",
        "RENAME \"a b",
        "STAT \"abc\\",
        "PUT \"x 5",
    ] {
        let reply = raw.ask(line).await;
        assert_eq!(code(&reply), 500, "{line:?} got {reply:?}");
    }
    // None of it ended the session or changed the file.
    assert_eq!(raw.ask("NOOP").await, "200 ok");
    assert_eq!(
        std::fs::read(s.home("ann").join("f")).unwrap(),
        b"0123456789"
    );
    assert!(!s.home("ann").join("x").exists());
    drop(raw);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_line_longer_than_max_line_is_500_and_closes() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let max = s.config.limits.max_line;

    // Exactly max_line bytes, with LF or CRLF, is a line like any other.
    let mut raw = Raw::connect(&s).await;
    raw.login("ann").await;
    let fits = format!("NOOP{}", " ".repeat(max - 4));
    assert_eq!(raw.ask(&fits).await, "200 ok");
    raw.send(format!("{fits}\r\n").as_bytes()).await;
    assert_eq!(raw.reply().await.unwrap(), "200 ok");
    // One byte more is refused, and the session ends.
    let reply = raw.ask(&format!("NOOP{}", " ".repeat(max - 3))).await;
    assert_eq!(code(&reply), 500, "{reply}");
    assert_eq!(raw.line().await, None);

    // Without any line end, before login: the same.
    let mut raw = Raw::connect(&s).await;
    raw.send(&vec![b'a'; max + 100]).await;
    let reply = raw.reply().await.unwrap_or_default();
    assert_eq!(code(&reply), 500, "{reply}");
    assert_eq!(raw.line().await, None);

    round_trip(&s, "ann").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_utf8_gets_an_error_reply() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let bad: [&[u8]; 6] = [
        b"STAT \xc0\xae\xc0\xae/x\n",
        b"MKD \xed\xa0\x80\n",
        b"MKD \xe2\x82\n",
        b"\xff\xfe\n",
        b"MKD caf\xe9\n",
        b"LOGIN \xc3 x\n",
    ];
    for (i, line) in bad.iter().enumerate() {
        let mut raw = Raw::connect(&s).await;
        if i % 2 == 0 {
            raw.login("ann").await;
        }
        raw.send(line).await;
        let reply = raw.reply().await.unwrap_or_default();
        assert_eq!(code(&reply), 500, "{line:?} got {reply:?}");
    }
    // Nothing was made under a lossy name.
    assert!(tree(&s.home("ann")).is_empty());
    round_trip(&s, "ann").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_that_keeps_sending_bad_requests_is_closed() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let max = s.config.limits.max_bad_requests;
    assert_eq!(max, 20, "the test follows the default");
    // Before login, refused requests count as well as malformed ones.
    let mut raw = Raw::connect(&s).await;
    for i in 1..max {
        let line = if i % 2 == 0 { "PWD" } else { "FROB" };
        let r = raw.ask(line).await;
        assert!(r.starts_with("530 ") || r.starts_with("500 "), "{i}: {r}");
    }
    assert!(raw.ask("NOOP").await.starts_with("200 "));
    assert!(raw.ask("PWD").await.starts_with("530 "));
    assert_eq!(
        raw.line().await.as_deref(),
        Some("421 too many bad requests, closing")
    );
    assert!(raw.line().await.is_none(), "the session went on");
    // Strikes before a login are forgotten once it succeeds. After login, a
    // request that fails is no strike; a malformed one is.
    let mut raw = Raw::connect(&s).await;
    for _ in 1..max {
        assert!(raw.ask("PWD").await.starts_with("530 "));
    }
    raw.login("ann").await;
    for _ in 0..2 * max {
        assert!(raw.ask("STAT nothing").await.starts_with("550 "));
    }
    for _ in 1..max {
        assert!(raw.ask("STAT").await.starts_with("501 "));
    }
    assert!(raw.ask("STAT").await.starts_with("501 "));
    assert_eq!(
        raw.line().await.as_deref(),
        Some("421 too many bad requests, closing")
    );
    assert!(raw.line().await.is_none(), "the session went on");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_request_sent_with_a_failed_login_is_no_strike() {
    let s = TestServer::start_with(|c| c.limits.max_bad_requests = 3).await;
    s.add_user("ann", 1 << 20);
    let mut raw = Raw::connect(&s).await;
    // A script's client sends its first request with the login.
    raw.send(b"LOGIN ann \"not the password\"\nPWD\n").await;
    assert_eq!(code(&raw.reply().await.unwrap()), 430);
    assert_eq!(code(&raw.reply().await.unwrap()), 530);
    // The failed login was one strike; that PWD none. Only that one: the
    // next refused request counts, and the third strike closes.
    assert_eq!(code(&raw.ask("PWD").await), 530);
    assert_eq!(code(&raw.ask("PWD").await), 530);
    assert_eq!(
        raw.line().await.as_deref(),
        Some("421 too many bad requests, closing")
    );
    assert!(raw.line().await.is_none(), "the session went on");
    s.stop().await;
}

/// The spec closes a session on a 500 only for an over-long line; a whole
/// line that is not UTF-8 was read to its end, so the session can go on.
#[tokio::test(flavor = "multi_thread")]
async fn invalid_utf8_does_not_end_the_session() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let mut raw = Raw::connect(&s).await;
    raw.login("ann").await;
    raw.send(b"MKD caf\xe9\n").await;
    assert_eq!(code(&raw.reply().await.unwrap_or_default()), 500);
    assert_eq!(raw.ask("NOOP").await, "200 ok");
    assert_eq!(raw.ask("PWD").await, "257 /");
    drop(raw);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn frames_where_a_line_is_expected_are_errors_never_panics() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let payload = data(1000, 5);
    let chunk = FrameHeader {
        kind: FrameKind::Chunk,
        offset: 0,
        len: payload.len() as u32,
        hash: *blake3::hash(&payload).as_bytes(),
    };
    // Offset 10 puts an LF inside the header.
    let end = FrameHeader::end(10, blake3::hash(b"0123456789"));
    let mut streams: Vec<Vec<u8>> = vec![
        [&FrameHeader::start(0).encode()[..], b"\n"].concat(),
        [&FrameHeader::abort().encode()[..], b"\n"].concat(),
        [&end.encode()[..], b"\n"].concat(),
        [&chunk.encode()[..], &payload[..], b"\n"].concat(),
    ];
    let mut all = vec![];
    for part in &streams {
        all.extend_from_slice(part);
    }
    streams.push(all);

    for (i, junk) in streams.iter().enumerate() {
        for logged_in in [false, true] {
            let mut raw = Raw::connect(&s).await;
            if logged_in {
                raw.login("ann").await;
            }
            raw.send(junk).await;
            raw.send(b"\nNOOP\n").await;
            // Every reply up to the NOOP's is an error; the session may also end.
            let mut survived = false;
            while let Some(line) = raw.line().await {
                if line == "200 ok" {
                    survived = true;
                    break;
                }
                assert!(code(&line) >= 500, "stream {i}: {line:?}");
            }
            if survived {
                let pwd = raw.ask("PWD").await;
                assert_eq!(code(&pwd), if logged_in { 257 } else { 530 }, "{pwd}");
            }
        }
    }
    assert!(tree(&s.home("ann")).is_empty());
    round_trip(&s, "ann").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_logins_are_identical_and_take_the_configured_delay() {
    let s = TestServer::start_with(|c| {
        c.accounts.login_failure_delay_ms = 200;
        // Repeated failures are slowed further; cap that to keep the test short.
        c.defender.max_delay_ms = 400;
    })
    .await;
    s.add_user("ann", 1 << 20);
    let delay = Duration::from_millis(s.config.accounts.login_failure_delay_ms);
    let long = "p".repeat(s.config.accounts.password_max_len + 1);
    let attempts = [
        ("nobody", "wrong password"),
        ("ann", "wrong password"),
        ("ann", "correct horsE"),
        ("ann", ""),
        ("ann", long.as_str()),
        ("Ann", PASSWORD),
        ("bad/name", PASSWORD),
        ("root", PASSWORD),
    ];
    let mut replies = vec![];
    for (user, password) in attempts {
        let mut raw = Raw::connect(&s).await;
        let started = Instant::now();
        let reply = raw.ask(&format!("LOGIN \"{user}\" \"{password}\"")).await;
        let took = started.elapsed();
        assert!(took >= delay, "{user}: answered after {took:?}");
        // The connection is kept open alike.
        assert_eq!(raw.ask("NOOP").await, "200 ok", "{user}");
        assert_eq!(code(&raw.ask("PWD").await), 530);
        replies.push(reply);
    }
    assert_eq!(code(&replies[0]), 430, "{}", replies[0]);
    for (r, (user, _)) in replies.iter().zip(attempts) {
        assert_eq!(r.as_bytes(), replies[0].as_bytes(), "{user}");
    }
    // Nothing leaks which part was wrong.
    assert!(!replies[0].to_lowercase().contains("unknown"));
    assert!(!replies[0].to_lowercase().contains("password"));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_stored_hashes_fail_the_login_like_a_wrong_password() {
    // Many failures on one account from one address: keep them from banning it.
    let s = TestServer::start_with(|c| {
        c.defender.pair_max_failures = 1000;
        c.defender.max_delay_ms = c.accounts.login_failure_delay_ms;
    })
    .await;
    s.add_user("ann", 1 << 20);
    let good = s.users().find("ann").unwrap().unwrap().hash;
    let mut raw = Raw::connect(&s).await;
    let baseline = raw.ask("LOGIN ann \"wrong password\"").await;
    assert_eq!(code(&baseline), 430);
    let hostile = [
        good.replacen("ln=4", "ln=40", 1),
        good.replacen("ln=4", "ln=21", 1),
        good.replacen("r=1", "r=1048576", 1),
        good.replacen("p=1", "p=4294967295", 1),
        good.replacen("$scrypt$", "$argon2id$", 1),
        good[..good.len() - 10].to_string(),
        "$scrypt$ln=4,r=1,p=1$$".into(),
        "not a hash".into(),
        String::new(),
    ];
    for hash in hostile {
        assert_ne!(hash, good);
        let h = hash.clone();
        s.users()
            .modify("ann", move |u| u.hash = h.clone())
            .unwrap();
        // Even the right password is refused, the same way as a wrong one.
        let reply = raw.ask(&format!("LOGIN ann \"{PASSWORD}\"")).await;
        assert_eq!(reply, baseline, "{hash:?}");
    }
    s.users()
        .modify("ann", move |u| u.hash = good.clone())
        .unwrap();
    raw.login("ann").await;
    drop(raw);
    round_trip(&s, "ann").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_login_in_a_session_is_503() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    s.add_user("bob", 2 << 20);
    std::fs::write(s.home("bob").join("bobs.txt"), b"bob").unwrap();
    let mut raw = Raw::connect(&s).await;
    // A failed attempt leaves nothing behind: the next one starts afresh.
    assert_eq!(code(&raw.ask("LOGIN bob \"wrong password\"").await), 430);
    raw.login("ann").await;
    for line in [
        format!("LOGIN ann \"{PASSWORD}\""),
        format!("LOGIN bob \"{PASSWORD}\""),
        "LOGIN bob \"wrong password\"".into(),
        format!("REGISTER newbie \"{NEW_PASSWORD}\""),
    ] {
        let reply = raw.ask(&line).await;
        assert_eq!(code(&reply), 503, "{line:?} got {reply:?}");
    }
    // Still ann, in ann's home, and no account was made.
    assert!(
        raw.ask("QUOTA")
            .await
            .starts_with(&format!("213 0 {} ", 1 << 20))
    );
    assert_eq!(code(&raw.ask("STAT bobs.txt").await), 550);
    assert!(s.users().find("newbie").unwrap().is_none());
    assert!(!s.home("newbie").exists());
    drop(raw);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_credentials_within_the_line_limit_are_refused() {
    let s = TestServer::start_with(|c| c.limits.max_line = 256 << 10).await;
    s.add_user("ann", 1 << 20);
    let big = "a".repeat(100 << 10);
    let mut raw = Raw::connect(&s).await;
    let baseline = raw.ask("LOGIN ann \"wrong password\"").await;
    assert_eq!(code(&baseline), 430);
    assert_eq!(
        raw.ask(&format!("LOGIN {big} \"{PASSWORD}\"")).await,
        baseline
    );
    assert_eq!(raw.ask(&format!("LOGIN ann {big}")).await, baseline);
    assert_eq!(raw.ask(&format!("LOGIN {big} {big}")).await, baseline);
    assert_eq!(
        code(&raw.ask(&format!("REGISTER {big} \"{NEW_PASSWORD}\"")).await),
        553
    );
    let reply = raw.ask(&format!("REGISTER newbie {big}")).await;
    assert!(code(&reply) >= 500, "{reply}");
    assert_eq!(s.users().load().unwrap().len(), 1);
    assert!(!s.home("newbie").exists());
    // The session lives on and can still log in.
    raw.login("ann").await;
    drop(raw);
    round_trip(&s, "ann").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_credentials_over_the_line_limit_end_the_session() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let max = s.config.limits.max_line;
    let mut raw = Raw::connect(&s).await;
    let reply = raw.ask(&format!("LOGIN ann {}", "p".repeat(max))).await;
    assert_eq!(code(&reply), 500, "{reply}");
    assert_eq!(raw.line().await, None);

    // A whole MiB of user name: the server stops reading; no login happens.
    let mut raw = Raw::connect(&s).await;
    let line = format!("LOGIN {} \"{PASSWORD}\"\n", "a".repeat(1 << 20));
    let _ = raw.stream.write_all(line.as_bytes()).await;
    let _ = raw.stream.flush().await;
    while let Some(line) = raw.line().await {
        assert!(code(&line) >= 500, "{line}");
    }
    round_trip(&s, "ann").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn register_draws_a_quota_in_range_and_makes_the_home() {
    let s = TestServer::start_with(|c| {
        c.accounts.registered_quota_min.0 = 1_000;
        c.accounts.registered_quota_max.0 = 5_000;
    })
    .await;
    for name in ["newbie", "n2", "x_y-9"] {
        let mut raw = Raw::connect(&s).await;
        let reply = raw
            .ask(&format!("REGISTER {name} \"{NEW_PASSWORD}\""))
            .await;
        assert_eq!(code(&reply), 230, "{reply}");
        let user = s.users().find(name).unwrap().expect("no account made");
        assert!(
            (1_000..=5_000).contains(&user.quota),
            "quota {}",
            user.quota
        );
        assert!(user.hash.starts_with("$scrypt$"), "{}", user.hash);
        assert!(!user.hash.contains(NEW_PASSWORD));
        assert!(s.home(name).is_dir(), "no home for {name}");
        // Logged in at once, in the new (empty) home, with that quota.
        assert_eq!(raw.ask("PWD").await, "257 /");
        assert!(
            raw.ask("QUOTA")
                .await
                .starts_with(&format!("213 0 {} ", user.quota))
        );
        assert_eq!(raw.ask("LIST").await, "213 0 entries");
        drop(raw);
        // And the password works for a later login.
        let mut again = Raw::connect(&s).await;
        let reply = again.ask(&format!("LOGIN {name} \"{NEW_PASSWORD}\"")).await;
        assert_eq!(code(&reply), 230, "{reply}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn register_refuses_bad_names_with_553() {
    let s = TestServer::start_with(|c| c.limits.max_bad_requests = u32::MAX).await;
    let homes = s.config.homes_dir();
    let mut raw = Raw::connect(&s).await;
    let long = "a".repeat(33);
    for name in [
        "..",
        ".",
        "../admin",
        "a/b",
        "/abs",
        "a\\\\b",
        "",
        " ",
        "Admin",
        "ADMIN",
        "admin",
        "root",
        "ftpx",
        "partial",
        long.as_str(),
        "\u{430}dmin",
        "b\u{456}gb\u{456}rd",
        "ｂｉｇｂｉｒｄ",
        "bigbi\u{327}rd",
        "-lead",
        "_lead",
        "9lives",
        "%2e%2e",
        "a b",
        "\u{202e}nimda",
        "caf\u{e9}",
    ] {
        let reply = raw
            .ask(&format!("REGISTER \"{name}\" \"{NEW_PASSWORD}\""))
            .await;
        assert_eq!(code(&reply), 553, "{name:?} got {reply:?}");
    }
    // A name with a control byte never gets past the line parser.
    raw.send(format!("REGISTER \"a\0b\" \"{NEW_PASSWORD}\"\n").as_bytes())
        .await;
    assert!(code(&raw.reply().await.unwrap()) >= 500);
    // 32 characters is the longest name there is.
    let ok = "a".repeat(32);
    assert_eq!(
        code(&raw.ask(&format!("REGISTER {ok} \"{NEW_PASSWORD}\"")).await),
        230
    );
    drop(raw);
    let users = s.users().load().unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].name, ok);
    let made: Vec<_> = std::fs::read_dir(&homes).unwrap().flatten().collect();
    assert_eq!(made.len(), 1, "{made:?}");
    assert!(!s.config.server.var_dir.join("admin").exists());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn register_refuses_a_short_password() {
    let s = TestServer::start().await;
    let min = s.config.accounts.password_min_len;
    let mut raw = Raw::connect(&s).await;
    let short = "p".repeat(min - 1);
    for password in ["", "short", short.as_str()] {
        let reply = raw.ask(&format!("REGISTER shorty \"{password}\"")).await;
        assert!(code(&reply) >= 500, "{password:?} got {reply:?}");
    }
    assert!(s.users().find("shorty").unwrap().is_none());
    assert!(!s.home("shorty").exists());
    // Not logged in by a refused registration.
    assert_eq!(code(&raw.ask("PWD").await), 530);
    let reply = raw
        .ask(&format!("REGISTER shorty \"{}\"", "p".repeat(min)))
        .await;
    assert_eq!(code(&reply), 230, "{reply}");
    drop(raw);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn register_refuses_a_taken_name_and_keeps_the_account() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    std::fs::write(s.home("ann").join("keep.txt"), b"keep").unwrap();
    let before = s.users().find("ann").unwrap().unwrap();
    let home_before = tree(&s.home("ann"));

    let mut raw = Raw::connect(&s).await;
    let reply = raw.ask(&format!("REGISTER ann \"{NEW_PASSWORD}\"")).await;
    assert_eq!(code(&reply), 553, "{reply}");
    assert_eq!(code(&raw.ask("PWD").await), 530);
    assert_eq!(s.users().find("ann").unwrap().unwrap(), before);
    assert_eq!(s.users().load().unwrap().len(), 1);
    assert_eq!(tree(&s.home("ann")), home_before);
    // The old password still works, the new one does not.
    assert_eq!(
        code(&raw.ask(&format!("LOGIN ann \"{NEW_PASSWORD}\"")).await),
        430
    );
    raw.login("ann").await;
    drop(raw);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn register_is_refused_when_switched_off() {
    let s = TestServer::start_with(|c| c.accounts.registration = false).await;
    let mut raw = Raw::connect(&s).await;
    let reply = raw
        .ask(&format!("REGISTER newbie \"{NEW_PASSWORD}\""))
        .await;
    assert_eq!(code(&reply), 553, "{reply}");
    assert_eq!(code(&raw.ask("PWD").await), 530);
    assert!(s.users().load().unwrap().is_empty());
    assert!(!s.home("newbie").exists());
    drop(raw);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_registrations_of_one_name_make_exactly_one_account() {
    let s = TestServer::start().await;
    const N: usize = 20;
    let mut sessions = vec![];
    for _ in 0..N {
        sessions.push(Raw::connect(&s).await);
    }
    // All requests are in flight before any reply is read.
    for (i, raw) in sessions.iter_mut().enumerate() {
        raw.send(format!("REGISTER racer \"password number {i}\"\n").as_bytes())
            .await;
    }
    let mut winners = vec![];
    for (i, raw) in sessions.iter_mut().enumerate() {
        let reply = raw.reply().await.unwrap();
        match code(&reply) {
            230 => winners.push(i),
            553 => {}
            _ => panic!("session {i}: {reply}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let users = s.users().load().unwrap();
    assert_eq!(users.len(), 1);
    drop(sessions);
    // The account holds the winner's password, and only it.
    let mut raw = Raw::connect(&s).await;
    let winner = winners[0];
    let other = (winner + 1) % N;
    assert_eq!(
        code(
            &raw.ask(&format!("LOGIN racer \"password number {other}\""))
                .await
        ),
        430
    );
    assert_eq!(
        code(
            &raw.ask(&format!("LOGIN racer \"password number {winner}\""))
                .await
        ),
        230
    );
    drop(raw);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plaintext_client_gets_no_plaintext_reply() {
    let s = TestServer::start().await;
    s.add_user("x", 1 << 20);
    for hello in [
        format!("LOGIN x \"{PASSWORD}\"\n"),
        "NOOP\nHELP\n".into(),
        "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".into(),
    ] {
        let mut tcp = TcpStream::connect(s.addr).await.unwrap();
        tcp.write_all(hello.as_bytes()).await.unwrap();
        let got = read_until_closed(&mut tcp).await;
        // Nothing, or a TLS record (an alert: content type 21); never a reply line.
        assert!(got.is_empty() || got[0] == 0x15, "{got:?}");
        let text = String::from_utf8_lossy(&got);
        for word in ["220", "230", "430", "500", "530", "ftpx"] {
            assert!(!text.contains(word), "{text:?}");
        }
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_offering_another_alpn_is_refused() {
    let s = TestServer::start().await;
    let offers: [&[&[u8]]; 2] = [
        &[b"http/1.1".as_slice()],
        &[b"ftp".as_slice(), b"h2".as_slice()],
    ];
    for alpn in offers {
        if let Ok(mut t) = Tls::connect(&s, alpn, None).await {
            assert_eq!(t.line().await, None, "a session was served for {alpn:?}");
        }
    }
    // Offering ftpx/1 among others is fine: the server picks it.
    let mut t = Tls::connect(&s, &[b"http/1.1".as_slice(), ALPN], None)
        .await
        .unwrap();
    assert_eq!(t.stream.get_ref().1.alpn_protocol(), Some(ALPN));
    assert!(t.line().await.unwrap().starts_with("220 "));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_offering_no_alpn_is_refused() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    if let Ok(mut t) = Tls::connect(&s, &[], None).await {
        let first = t.line().await;
        assert_eq!(first, None, "a session was served without ALPN");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn early_data_is_never_accepted() {
    let s = TestServer::start().await;
    let config = ftpx::tls::server_config(&s.config.server.cert_dir).unwrap();
    assert_eq!(config.max_early_data_size, 0);
    assert_eq!(config.alpn_protocols, vec![ALPN.to_vec()]);

    // A client willing to use 0-RTT connects, then resumes: the server
    // accepts no early data, and the request runs exactly once.
    let mut cc = ftpx::tls::client_config(&s.ca).unwrap();
    cc.enable_early_data = true;
    let cc = Arc::new(cc);
    for _ in 0..2 {
        let tcp = TcpStream::connect(s.addr).await.unwrap();
        let mut stream = TlsConnector::from(cc.clone())
            .connect(ftpx::tls::server_name("localhost").unwrap(), tcp)
            .await
            .unwrap();
        stream.write_all(b"NOOP\n").await.unwrap();
        stream.flush().await.unwrap();
        let mut t = Tls {
            stream,
            buf: vec![],
        };
        assert!(t.line().await.unwrap().starts_with("220 "));
        assert_eq!(t.line().await.unwrap(), "200 ok");
        assert!(!t.stream.get_ref().1.is_early_data_accepted());
        t.stream.write_all(b"QUIT\n").await.unwrap();
        t.stream.flush().await.unwrap();
        assert_eq!(t.line().await.unwrap(), "221 goodbye");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_session_is_closed_after_the_login_timeout() {
    let s = TestServer::start_with(|c| c.limits.login_timeout_secs = 1).await;
    s.add_user("ann", 1 << 20);
    let limit = Duration::from_secs(1);

    let started = Instant::now();
    let mut raw = Raw::connect(&s).await;
    let line = raw.line().await;
    assert!(
        started.elapsed() >= limit,
        "closed after {:?}",
        started.elapsed()
    );
    assert_eq!(line.as_deref(), Some("421 login timeout, closing"));
    assert_eq!(raw.line().await, None);

    // Requests other than a login do not extend the deadline.
    let started = Instant::now();
    let mut raw = Raw::connect(&s).await;
    let end = loop {
        assert!(started.elapsed() < GUARD, "the session was never closed");
        match tokio::time::timeout(Duration::from_millis(200), raw.line()).await {
            Ok(line) => break line.unwrap_or_default(),
            Err(_) => {
                let reply = raw.ask("NOOP").await;
                if reply != "200 ok" {
                    break reply;
                }
            }
        }
    };
    assert!(started.elapsed() >= limit);
    assert!(end.is_empty() || end.starts_with("421 "), "{end}");

    // A login in time works as usual.
    let mut raw = Raw::connect(&s).await;
    raw.login("ann").await;
    assert_eq!(raw.ask("PWD").await, "257 /");
    drop(raw);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tcp_client_that_never_starts_tls_is_dropped() {
    let s = TestServer::start_with(|c| c.limits.handshake_timeout_secs = 1).await;
    let limit = Duration::from_secs(1);
    // Silent, and stalled in the middle of a ClientHello record.
    for hello in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]] {
        let started = Instant::now();
        let mut tcp = TcpStream::connect(s.addr).await.unwrap();
        if !hello.is_empty() {
            tcp.write_all(hello).await.unwrap();
        }
        let got = read_until_closed(&mut tcp).await;
        assert!(
            started.elapsed() >= limit,
            "dropped after {:?}",
            started.elapsed()
        );
        assert!(got.is_empty() || got[0] == 0x15, "{got:?}");
    }
    s.stop().await;
}

/// Connects until a session is admitted again (a closed session's place is
/// given back when its task ends).
async fn admitted(s: &TestServer, from: Option<&str>) -> Tls {
    let started = Instant::now();
    loop {
        let mut t = Tls::connect(s, &[ALPN], from).await.unwrap();
        match t.line().await {
            Some(l) if l.starts_with("220 ") => return t,
            other => {
                assert!(started.elapsed() < GUARD, "never admitted: {other:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_over_the_per_address_limit_get_421() {
    let s = TestServer::start_with(|c| c.limits.max_sessions_per_ip = 2).await;
    s.add_user("ann", 1 << 20);
    let mut a = Raw::connect(&s).await;
    a.login("ann").await;
    let b = Raw::connect(&s).await;
    let mut extra = Tls::connect(&s, &[ALPN], None).await.unwrap();
    assert_eq!(
        extra.line().await.as_deref(),
        Some("421 too many sessions from your address")
    );
    assert_eq!(extra.line().await, None);
    // The admitted sessions are unaffected; another address is not counted.
    assert_eq!(a.ask("PWD").await, "257 /");
    let other = admitted(&s, Some("127.0.0.2")).await;
    // Once one leaves, its place is free again.
    drop(b);
    let again = admitted(&s, None).await;
    drop((a, other, again));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_reports_a_full_server_though_its_login_was_already_sent() {
    let s = TestServer::start_with(|c| c.limits.max_sessions = 1).await;
    s.add_user("ann", 1 << 20);
    let held = s.login("ann").await;
    let work = tempfile::tempdir().unwrap();
    let out = connect_c(work.path(), &s.ca, s.addr.port(), "ann", "pwd");
    assert_eq!(out.status, 3, "{}", out.stderr);
    assert!(
        out.stderr.contains("too many sessions on this server"),
        "{}",
        out.stderr
    );
    drop(held);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_over_the_server_limit_get_421() {
    let s = TestServer::start_with(|c| c.limits.max_sessions = 2).await;
    let a = Raw::connect(&s).await;
    let b = admitted(&s, Some("127.0.0.2")).await;
    let mut extra = Tls::connect(&s, &[ALPN], Some("127.0.0.3")).await.unwrap();
    assert_eq!(
        extra.line().await.as_deref(),
        Some("421 too many sessions on this server")
    );
    assert_eq!(extra.line().await, None);
    drop(a);
    let again = admitted(&s, Some("127.0.0.3")).await;
    drop((b, again));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_is_closed_with_421() {
    let s = TestServer::start_with(|c| c.limits.idle_timeout_secs = 1).await;
    s.add_user("ann", 1 << 20);
    let mut raw = Raw::connect(&s).await;
    let started = Instant::now();
    raw.login("ann").await;
    let line = raw.line().await;
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(line.as_deref(), Some("421 idle timeout, closing"));
    assert_eq!(raw.line().await, None);
    round_trip(&s, "ann").await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_failures_ban_the_account_from_that_address_only() {
    let s = TestServer::start_with(|c| {
        c.defender.pair_max_failures = 3;
        c.defender.max_delay_ms = c.accounts.login_failure_delay_ms;
    })
    .await;
    s.add_user("ann", 1 << 20);
    s.add_user("bob", 1 << 20);
    let login = format!("LOGIN ann \"{PASSWORD}\"");
    let mut attacker = Tls::greeted(&s, "127.0.0.1").await;
    let baseline = attacker.ask("LOGIN ann \"wrong password\"").await;
    assert_eq!(code(&baseline), 430);
    for _ in 1..3 {
        assert_eq!(attacker.ask("LOGIN ann \"wrong password\"").await, baseline);
    }
    // Banned: even the right password is refused, in the same words, on a
    // new connection as well.
    assert_eq!(attacker.ask(&login).await, baseline);
    let mut again = Tls::greeted(&s, "127.0.0.1").await;
    assert_eq!(again.ask(&login).await, baseline);
    // Other accounts from that address, and the owner from elsewhere, get in.
    assert_eq!(
        code(&again.ask(&format!("LOGIN bob \"{PASSWORD}\"")).await),
        230
    );
    let mut owner = Tls::greeted(&s, "127.0.0.2").await;
    assert_eq!(code(&owner.ask(&login).await), 230);
    drop((attacker, again, owner));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_on_many_accounts_bans_the_address() {
    let s = TestServer::start_with(|c| {
        c.defender.source_max_accounts = 3;
        c.defender.max_delay_ms = c.accounts.login_failure_delay_ms;
    })
    .await;
    s.add_user("ann", 1 << 20);
    let mut sprayer = Tls::greeted(&s, "127.0.0.3").await;
    let baseline = sprayer.ask("LOGIN amy \"wrong password\"").await;
    assert_eq!(code(&baseline), 430);
    for user in ["ben", "cid"] {
        assert_eq!(
            sprayer
                .ask(&format!("LOGIN {user} \"wrong password\""))
                .await,
            baseline
        );
    }
    let login = format!("LOGIN ann \"{PASSWORD}\"");
    assert_eq!(sprayer.ask(&login).await, baseline);
    let mut elsewhere = Tls::greeted(&s, "127.0.0.1").await;
    assert_eq!(code(&elsewhere.ask(&login).await), 230);
    drop((sprayer, elsewhere));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn registrations_are_limited_per_address() {
    let s = TestServer::start_with(|c| c.defender.registrations_per_hour = 2).await;
    for name in ["reg-a", "reg-b"] {
        let mut t = Tls::greeted(&s, "127.0.0.4").await;
        let reply = t.ask(&format!("REGISTER {name} \"{NEW_PASSWORD}\"")).await;
        assert_eq!(code(&reply), 230, "{reply}");
    }
    let mut t = Tls::greeted(&s, "127.0.0.4").await;
    let reply = t.ask(&format!("REGISTER reg-c \"{NEW_PASSWORD}\"")).await;
    assert!(code(&reply) >= 400, "{reply}");
    assert_eq!(code(&t.ask("PWD").await), 530);
    assert!(s.users().find("reg-c").unwrap().is_none());
    assert!(!s.home("reg-c").exists());
    // Another address may still register.
    let mut other = Tls::greeted(&s, "127.0.0.5").await;
    let reply = other
        .ask(&format!("REGISTER reg-c \"{NEW_PASSWORD}\""))
        .await;
    assert_eq!(code(&reply), 230, "{reply}");
    assert_eq!(s.users().load().unwrap().len(), 3);
    drop((t, other));
    s.stop().await;
}

/// `n` greeted sessions from the loopback address `from`.
async fn sessions_from(s: &TestServer, from: &str, n: usize) -> Vec<Tls> {
    let mut out = vec![];
    for _ in 0..n {
        out.push(Tls::greeted(s, from).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn guesses_sent_at_once_are_evaluated_at_most_pair_max_failures_times() {
    let s = TestServer::start_with(|c| {
        // Hashes slow enough that every guess arrives before the first fails.
        c.accounts.scrypt_log_n = 12;
        c.accounts.scrypt_r = 8;
        c.defender.max_delay_ms = c.accounts.login_failure_delay_ms;
    })
    .await;
    s.add_user("ann", 1 << 20);
    let max = s.config.defender.pair_max_failures as u64;
    let mut guessers = sessions_from(&s, "127.0.0.1", 40).await;
    for g in &mut guessers {
        g.send("LOGIN ann \"wrong password\"").await;
    }
    let mut replies = vec![];
    for g in &mut guessers {
        replies.push(g.reply().await);
    }
    assert_eq!(code(&replies[0]), 430, "{}", replies[0]);
    assert!(replies.iter().all(|r| *r == replies[0]), "{replies:?}");
    // One hashing turn per password evaluated: no more than the ban allows.
    let evaluated = s.server.turns.granted();
    assert!(
        (1..=max).contains(&evaluated),
        "{evaluated} guesses evaluated"
    );
    // The pair is banned: the right password is refused, without a hash.
    let mut late = Tls::greeted(&s, "127.0.0.1").await;
    assert_eq!(
        late.ask(&format!("LOGIN ann \"{PASSWORD}\"")).await,
        replies[0]
    );
    assert_eq!(s.server.turns.granted(), evaluated);
    // The owner, elsewhere, gets in.
    let mut owner = Tls::greeted(&s, "127.0.0.2").await;
    assert_eq!(
        code(&owner.ask(&format!("LOGIN ann \"{PASSWORD}\"")).await),
        230
    );
    drop((guessers, late, owner));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_login_flood_from_one_address_does_not_starve_another() {
    const FLOOD: usize = 40;
    let s = TestServer::start_with(|c| {
        c.accounts.scrypt_log_n = 13;
        c.accounts.scrypt_r = 8;
        c.accounts.login_failure_delay_ms = 10;
        c.defender.max_delay_ms = 10;
        // Let the flood through the bans, so that it really queues for hashing.
        c.defender.pair_max_failures = 1000;
        c.defender.account_slow_after = 1000;
    })
    .await;
    s.add_user("ann", 1 << 20);
    s.add_user("bob", 1 << 20);
    let flood = sessions_from(&s, "127.0.0.2", FLOOD).await;
    let mut honest = Tls::greeted(&s, "127.0.0.1").await;
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut readers = vec![];
    for mut f in flood {
        f.send("LOGIN ann \"wrong password\"").await;
        let answered = answered.clone();
        readers.push(tokio::spawn(async move {
            let reply = f.reply().await;
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            reply
        }));
    }
    // Wait (without a clock) until most of the flood is queued for a turn.
    let started = Instant::now();
    while s.server.turns.waiting() < FLOOD / 2 {
        assert!(started.elapsed() < GUARD, "the flood never queued");
        tokio::task::yield_now().await;
    }
    let reply = honest.ask(&format!("LOGIN bob \"{PASSWORD}\"")).await;
    assert_eq!(code(&reply), 230, "{reply}");
    let before_honest = answered.load(std::sync::atomic::Ordering::SeqCst);
    for r in readers {
        assert_eq!(code(&r.await.unwrap()), 430);
    }
    // The honest login got one of the next turns, not the last.
    assert!(
        FLOOD - before_honest >= FLOOD / 4,
        "only {} of {FLOOD} flood logins were still waiting when the honest one was answered",
        FLOOD - before_honest
    );
    drop(honest);
    s.stop().await;
}
