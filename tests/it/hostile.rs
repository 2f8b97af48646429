//! THREATS 86 and 87: the real client against a hostile server. A fake
//! server speaks just enough ftpx over real TLS (ALPN `ftpx/1`) to log the
//! client in, then answers each request as the test scripts it: endless
//! listings, giant lines, escape sequences, names that climb out of the
//! target directory, download plans that lie. The `ftpx` binary must end
//! each command with a clear error, print nothing raw, keep its memory
//! bounded and write only inside the directory the user named.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ftpx::protocol::{FRAME_HEADER_LEN, FrameHeader, FrameKind};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufStream};

use crate::common::{BIN, PASSWORD};

/// What the fake server does with one request line.
enum Answer {
    /// Writes these bytes (after any held) and reads the next request.
    Send(Vec<u8>),
    /// Keeps these bytes to write before the next `Send`, and reads the
    /// next request: a server that answers only once more requests came.
    Hold(Vec<u8>),
    /// Writes `first`, then `again` over and over until the client hangs
    /// up or `cap` bytes are out.
    Forever {
        first: Vec<u8>,
        again: Vec<u8>,
        cap: u64,
    },
}

type Script = dyn Fn(&str) -> Answer + Send + Sync;

/// A fake server on 127.0.0.1:0 with its own certificates.
struct Fake {
    dir: tempfile::TempDir,
    ca: PathBuf,
    port: u16,
    /// Bytes written to clients after their login.
    sent: Arc<AtomicU64>,
}

impl Fake {
    /// Starts a server that greets with `greeting`, logs anyone in and
    /// answers every later request line with `script`.
    async fn start(
        greeting: &str,
        script: impl Fn(&str) -> Answer + Send + Sync + 'static,
    ) -> Fake {
        Fake::start_greeting(Greet::First, greeting, script).await
    }

    /// [`Fake::start`], greeting when `greet` says.
    async fn start_greeting(
        greet: Greet,
        greeting: &str,
        script: impl Fn(&str) -> Answer + Send + Sync + 'static,
    ) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        ftpx::tls::gen_cert(&certs, &ftpx::tls::default_hosts(), false).unwrap();
        let tls = Arc::new(ftpx::tls::server_config(&certs).unwrap());
        assert_eq!(tls.alpn_protocols, vec![b"ftpx/1".to_vec()]);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(AtomicU64::new(0));
        let script: Arc<Script> = Arc::new(script);
        let greeting = format!("{greeting}\n");
        let counter = sent.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, script, counter) =
                    (acceptor.clone(), script.clone(), counter.clone());
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let conn = BufStream::new(tls);
                    let _ = serve(conn, (greet, &greeting), &*script, &counter).await;
                });
            }
        });
        Fake {
            ca: certs.join("ca.pem"),
            dir,
            port,
            sent,
        }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }

    /// A fresh working directory for the client, inside the fake's temp dir.
    fn workdir(&self, name: &str) -> PathBuf {
        let w = self.dir.path().join(name);
        std::fs::create_dir_all(&w).unwrap();
        w
    }

    /// Runs `ftpx connect ann@127.0.0.1:PORT -c COMMANDS` in `work` and waits.
    async fn client(&self, work: &Path, commands: &str) -> Run {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(work)
            .env("FTPX_STATE_DIR", work.join(".state"))
            .env("FTPX_PASSWORD", PASSWORD)
            .args(["connect", &format!("ann@127.0.0.1:{}", self.port), "--ca"])
            .arg(&self.ca)
            .args(["--timeout", "10", "--retries", "0", "-c", commands]);
        tokio::task::spawn_blocking(move || run(cmd)).await.unwrap()
    }
}

/// When a fake server greets.
#[derive(Clone, Copy, PartialEq)]
enum Greet {
    /// At once, as a server must.
    First,
    /// Only once the client's first request came.
    AfterRequest,
    /// Only once the client's first two requests came: the login and the
    /// first command's.
    AfterTwoRequests,
}

async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut conn: BufStream<S>,
    (greet, greeting): (Greet, &str),
    script: &Script,
    sent: &AtomicU64,
) -> std::io::Result<()> {
    // Lines read before their turn, as a server that waits for more.
    let mut early = std::collections::VecDeque::new();
    if greet == Greet::AfterTwoRequests {
        for _ in 0..2 {
            let mut line = String::new();
            if conn.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            early.push_back(line);
        }
    }
    if matches!(greet, Greet::First | Greet::AfterTwoRequests) {
        conn.write_all(greeting.as_bytes()).await?;
        conn.flush().await?;
    }
    let mut line = String::new();
    let mut logged_in = false;
    let mut held = vec![];
    loop {
        line.clear();
        match early.pop_front() {
            Some(read) => line = read,
            None if conn.read_line(&mut line).await? == 0 => return Ok(()),
            None => {}
        }
        let request = line.trim_end();
        if greet == Greet::AfterRequest && !logged_in {
            conn.write_all(greeting.as_bytes()).await?;
        }
        let answer = if !logged_in {
            logged_in = request.starts_with("LOGIN ");
            Answer::Send(b"230 welcome\n".to_vec())
        } else if request == "QUIT" {
            // What was held goes out first: replies keep their order.
            let bytes = [std::mem::take(&mut held), b"221 bye\n".to_vec()].concat();
            conn.write_all(&bytes).await?;
            conn.flush().await?;
            return Ok(());
        } else {
            script(request)
        };
        match answer {
            Answer::Hold(bytes) => held.extend_from_slice(&bytes),
            Answer::Send(bytes) => {
                let bytes = [std::mem::take(&mut held), bytes].concat();
                conn.write_all(&bytes).await?;
                conn.flush().await?;
                sent.fetch_add(bytes.len() as u64, Ordering::SeqCst);
            }
            Answer::Forever { first, again, cap } => {
                conn.write_all(&first).await?;
                let mut out = first.len() as u64;
                while out < cap {
                    conn.write_all(&again).await?;
                    conn.flush().await?;
                    out += again.len() as u64;
                    sent.fetch_add(again.len() as u64, Ordering::SeqCst);
                }
                // Capped: let the client see the end of the stream.
                return Ok(());
            }
        }
    }
}

/// How the client ended.
struct Run {
    status: i32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Peak resident memory of the client process, as last seen.
    max_rss: u64,
}

impl Run {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Nothing the server sent reached the terminal raw: no ESC, BEL or
    /// other control byte but line ends, and no C1 control (U+0080..U+009F).
    fn assert_nothing_raw(&self) {
        for (what, bytes) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let text = String::from_utf8_lossy(bytes);
            let raw = text.chars().find(|&c| c.is_control() && c != '\n');
            assert!(raw.is_none(), "raw {raw:?} on {what}: {text:?}");
        }
    }
}

/// The peak resident memory of a running process (`VmHWM`), if it still runs.
fn vm_hwm(pid: libc::pid_t) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Runs a client process with a deadline and measures its peak memory:
/// its own `VmHWM`, polled while it runs. (The `ru_maxrss` of `wait4`
/// would count the test process's memory too, as the child had it
/// before its exec.)
fn run(mut cmd: Command) -> Run {
    let out = tempfile::tempfile().unwrap();
    let err = tempfile::tempfile().unwrap();
    // Reaped by wait4 below, which also reports its peak memory.
    #[allow(clippy::zombie_processes)]
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut status = 0;
    // SAFETY: plain wait4 on our own child; rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut max_rss = 0;
    loop {
        max_rss = max_rss.max(vm_hwm(pid).unwrap_or(0));
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break;
        }
        assert_eq!(r, 0, "wait4 failed");
        if Instant::now() > deadline {
            unsafe { libc::kill(pid, libc::SIGKILL) };
            unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            panic!("the client hung");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let read = |mut f: std::fs::File| {
        use std::io::{Read, Seek};
        let mut v = vec![];
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    Run {
        status: if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        },
        stdout: read(out),
        stderr: read(err),
        max_rss,
    }
}

// The client's documented limits, written out so that a test can't pass by
// a change of the constant it checks.
/// `client::MAX_LIST_BYTES`.
const MAX_LIST_BYTES: usize = 64 << 20;
/// `client::MAX_LIST_ENTRIES`.
const MAX_LIST_ENTRIES: usize = 100_000;
/// `client::MAX_REPLY_LINE`.
const MAX_REPLY_LINE: usize = 64 << 10;

/// Peak memory of a client that did little: the budgets come on top.
const BASE_RSS: u64 = 64 << 20;

/// Every file below `dir`, links included, relative to it.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The frames of a whole download of `body` in chunks of `chunk` bytes,
/// after its `151` line.
fn download(body: &[u8], chunk: usize) -> Vec<u8> {
    let size = body.len() as u64;
    let mut wire = format!("151 {size} 0 {chunk}\n").into_bytes();
    for (i, c) in body.chunks(chunk).enumerate() {
        let offset = (i * chunk) as u64;
        let header = FrameHeader {
            kind: FrameKind::Chunk,
            offset,
            len: c.len() as u32,
            hash: ftpx::transfer::chunk_hash(size, offset, c),
        };
        wire.extend_from_slice(&header.encode());
        wire.extend_from_slice(c);
    }
    wire.extend_from_slice(&FrameHeader::end(size, blake3::hash(body)).encode());
    wire
}

fn verb(request: &str) -> &str {
    request.split(' ').next().unwrap_or_default()
}

#[tokio::test]
async fn an_endless_listing_of_long_lines_stops_within_the_byte_budget() {
    // Lines just under the line limit, so only the listing's byte budget stops them.
    let name = "n".repeat(MAX_REPLY_LINE - 100);
    let cap = (MAX_LIST_BYTES + (64 << 20)) as u64;
    let fake = Fake::start("220 fake ready", move |req| match verb(req) {
        "LIST" => Answer::Forever {
            first: vec![],
            again: format!("213-f 1 0 {name}\n").into_bytes(),
            cap,
        },
        _ => Answer::Send(b"500 no\n".to_vec()),
    })
    .await;
    let work = fake.workdir("w");
    let run = fake.client(&work, "ls").await;
    assert_eq!(run.status, 1, "{}", run.err());
    assert!(run.err().contains("reply longer than"), "{}", run.err());
    // The budget, plus what the socket and TLS buffers held when the client hung up.
    let sent = fake.sent();
    assert!(
        sent < (MAX_LIST_BYTES + (16 << 20)) as u64,
        "the server sent {sent} bytes"
    );
    // The listing's names were kept: the peak shows them, within the budget.
    assert!(run.max_rss > (MAX_LIST_BYTES / 2) as u64, "{}", run.max_rss);
    assert!(
        run.max_rss < MAX_LIST_BYTES as u64 + BASE_RSS,
        "peak memory {} bytes",
        run.max_rss
    );
}

#[tokio::test]
async fn an_endless_listing_of_short_lines_stops_at_the_entry_limit() {
    let fake = Fake::start("220 fake ready", |req| match verb(req) {
        "LIST" => Answer::Forever {
            first: vec![],
            again: b"213-f 1 0 n\n".to_vec(),
            cap: 12 * 3_000_000,
        },
        _ => Answer::Send(b"500 no\n".to_vec()),
    })
    .await;
    let work = fake.workdir("w");
    let run = fake.client(&work, "ls").await;
    assert_eq!(run.status, 1, "{}", run.err());
    assert!(
        run.err()
            .contains(&format!("reply longer than {MAX_LIST_ENTRIES} lines")),
        "{}",
        run.err()
    );
    // Nothing was printed from a listing that never ended.
    assert!(run.stdout.is_empty(), "{}", run.out());
}

#[tokio::test]
async fn a_gigantic_reply_line_is_refused_early() {
    let cap = 256u64 << 20;
    let fake = Fake::start("220 fake ready", move |req| match verb(req) {
        "PWD" => Answer::Forever {
            first: b"257 \"/".to_vec(),
            again: vec![b'a'; 64 << 10],
            cap,
        },
        _ => Answer::Send(b"500 no\n".to_vec()),
    })
    .await;
    let work = fake.workdir("w");
    let run = fake.client(&work, "pwd").await;
    assert_eq!(run.status, 1, "{}", run.err());
    assert!(run.err().contains("too long"), "{}", run.err());
    let sent = fake.sent();
    assert!(sent < 32 << 20, "the server sent {sent} bytes");
    assert!(run.max_rss < BASE_RSS, "peak memory {} bytes", run.max_rss);
}

#[tokio::test]
async fn escape_sequences_from_the_server_are_escaped_on_the_terminal() {
    let fake = Fake::start("220 \x1b]0;owned\x07 ready", |req| match verb(req) {
        // A path is a quoted word, which can't hold control characters, but
        // it can hold a bidirectional override.
        "PWD" => Answer::Send("257 \"/home\u{202e}txt.exe\"\n".into()),
        "CWD" => Answer::Send("257 \"/\x1b[2J\"\n".into()),
        "DELE" => Answer::Send(b"550 \x1b[31mno such file\x1b[0m\x07\n".to_vec()),
        "LIST" if req.contains("bad") => Answer::Send(
            "213-f 1 0 \"\x1b]0;title\x07\"\n213 1 entries\n"
                .as_bytes()
                .to_vec(),
        ),
        "LIST" => Answer::Send(
            "213-f 1 0 plain\n213 1 entries (truncated) \x1b[2J\r\n"
                .as_bytes()
                .to_vec(),
        ),
        "STAT" => Answer::Send("213 f 1 0 \x1b[2J\n".into()),
        _ => Answer::Send(b"500 \x1b[5mno\n".to_vec()),
    })
    .await;
    let work = fake.workdir("w");
    for (commands, status, shown) in [
        ("pwd", 0, "/home\\u{202e}txt.exe"),
        ("cd x", 1, "control characters"),
        ("ls", 0, "(truncated) \\x1b[2J"),
        ("ls bad", 1, "\\u{1b}]0;title\\u{7}"),
        ("rm x", 1, "\\x1b[31mno such file\\x1b[0m\\x07"),
        ("mkdir x", 1, "\\x1b[5mno"),
    ] {
        let run = fake.client(&work, commands).await;
        assert_eq!(run.status, status, "{commands}: {}", run.err());
        run.assert_nothing_raw();
        let all = run.out() + &run.err();
        assert!(all.contains(shown), "{commands}: {all}");
    }
    // A greeting that refuses the session is printed, escaped.
    let busy = Fake::start("421 \x1b]0;owned\x07busy", |_| Answer::Send(vec![])).await;
    let run = busy.client(&work, "pwd").await;
    assert_eq!(run.status, 3, "{}", run.err());
    run.assert_nothing_raw();
    assert!(
        run.err().contains("\\x1b]0;owned\\x07busy"),
        "{}",
        run.err()
    );
}

/// A server whose tree `/tree` holds the names a hostile server would use
/// to climb out, and whose every file is `hello`.
fn climbing_server(names: &'static [&'static str]) -> impl Fn(&str) -> Answer + Send + Sync {
    move |req| match verb(req) {
        "LIST" => {
            let mut text = String::new();
            for name in names {
                let quoted = ftpx::protocol::quote(name);
                text += &format!("213-f 5 0 {quoted}\n213-d 0 0 {quoted}\n");
            }
            text += "213-f 5 0 ok\n213 many entries\n";
            Answer::Send(text.into_bytes())
        }
        "GET" => Answer::Send(download(b"hello", 1024)),
        "STAT" => Answer::Send(b"550 no\n".to_vec()),
        _ => Answer::Send(b"500 no\n".to_vec()),
    }
}

#[tokio::test]
async fn get_r_never_lets_a_name_from_the_wire_leave_the_target() {
    const NAMES: &[&str] = &["..", ".", "../../x", "/etc/x", "a/b", "..\\x", "/", ""];
    let fake = Fake::start("220 fake ready", climbing_server(NAMES)).await;
    let root = fake.workdir("root");
    let work = root.join("a/b/work");
    std::fs::create_dir_all(&work).unwrap();
    let before = tree(&root);
    let run = fake.client(&work, "get -r tree dest").await;
    assert_eq!(run.status, 0, "{}", run.err());
    run.assert_nothing_raw();
    assert!(
        run.err().contains("not a usable file name"),
        "{}",
        run.err()
    );
    let mut after = tree(&root);
    after.retain(|p| !p.starts_with("a/b/work/.state") && !before.contains(p));
    assert_eq!(
        after,
        vec![
            PathBuf::from("a/b/work/dest"),
            PathBuf::from("a/b/work/dest/ok")
        ]
    );
    assert_eq!(std::fs::read(work.join("dest/ok")).unwrap(), b"hello");
}

#[tokio::test]
async fn get_r_of_a_name_listed_many_times_lands_one_whole_file() {
    // One name listed again and again, and each GET of it a different file
    // of one chunk: the downloads to that name, written while the next
    // arrive, must never remove or move into place each other's partial.
    const TIMES: u64 = 300;
    let body = |n: u64| {
        let mut bytes = crate::common::data(64 << 10, n as u8);
        bytes[..8].copy_from_slice(&n.to_le_bytes());
        bytes
    };
    let served = Arc::new(AtomicU64::new(0));
    let counter = served.clone();
    let fake = Fake::start("220 fake ready", move |req| match verb(req) {
        "LIST" => {
            let mut text = "213-f 65536 0 same\n".repeat(TIMES as usize);
            text += "213 many entries\n";
            Answer::Send(text.into_bytes())
        }
        "GET" => Answer::Send(download(
            &body(counter.fetch_add(1, Ordering::SeqCst)),
            128 << 10,
        )),
        _ => Answer::Send(b"500 no\n".to_vec()),
    })
    .await;
    let work = fake.workdir("w");
    let run = fake.client(&work, "get -r tree dest").await;
    assert_eq!(run.status, 0, "{}", run.err());
    assert!(served.load(Ordering::SeqCst) >= TIMES);
    let got = std::fs::read(work.join("dest/same")).unwrap();
    assert!(
        (0..TIMES * 2).any(|n| got == body(n)),
        "a file that was never sent"
    );
    assert_eq!(
        std::fs::read_dir(work.join("dest")).unwrap().count(),
        1,
        "a partial file was left"
    );
}

#[tokio::test]
async fn get_r_refuses_names_with_control_characters() {
    let fake = Fake::start("220 fake ready", |req| match verb(req) {
        "LIST" => {
            Answer::Send(b"213-f 5 0 \"a\x00b\"\n213-f 5 0 \"\x1b[2J\"\n213 2 entries\n".to_vec())
        }
        "GET" => Answer::Send(download(b"hello", 1024)),
        _ => Answer::Send(b"500 no\n".to_vec()),
    })
    .await;
    let work = fake.workdir("w");
    let run = fake.client(&work, "get -r tree dest").await;
    assert_eq!(run.status, 1, "{}", run.err());
    run.assert_nothing_raw();
    assert!(run.err().contains("bad listing line"), "{}", run.err());
    assert!(!work.join("dest").exists());
}

#[tokio::test]
async fn get_r_does_not_write_through_a_linked_directory() {
    let fake = Fake::start("220 fake ready", |req| match verb(req) {
        "LIST" if req.ends_with("/tree") => {
            Answer::Send(b"213-d 0 0 sub\n213-f 5 0 top\n213 2 entries\n".to_vec())
        }
        "LIST" => Answer::Send(b"213-f 5 0 evil\n213 1 entries\n".to_vec()),
        "GET" => Answer::Send(download(b"hello", 1024)),
        _ => Answer::Send(b"550 no\n".to_vec()),
    })
    .await;
    let work = fake.workdir("w");
    let outside = fake.workdir("outside");
    // `dest` exists, so the tree lands in `dest/tree`, where `sub` is a link.
    std::fs::create_dir_all(work.join("dest/tree")).unwrap();
    std::os::unix::fs::symlink(&outside, work.join("dest/tree/sub")).unwrap();
    let run = fake.client(&work, "get -r tree dest").await;
    assert_eq!(run.status, 1, "{}", run.err());
    assert!(run.err().contains("symbolic link"), "{}", run.err());
    assert!(tree(&outside).is_empty(), "{:?}", tree(&outside));
    assert_eq!(std::fs::read(work.join("dest/tree/top")).unwrap(), b"hello");
}

#[tokio::test]
async fn a_planted_link_at_the_partial_file_or_target_is_replaced_not_followed() {
    // A file of several chunks, and one of a single chunk (landed whole).
    for size in [5000, 700] {
        let fake = Fake::start("220 fake ready", move |req| match verb(req) {
            "GET" => Answer::Send(download(&vec![7u8; size], 1024)),
            _ => Answer::Send(b"550 no\n".to_vec()),
        })
        .await;
        let work = fake.workdir("w");
        let outside = fake.workdir("outside");
        for victim in ["part-victim", "target-victim"] {
            std::fs::write(outside.join(victim), b"keep me").unwrap();
        }
        std::os::unix::fs::symlink(outside.join("part-victim"), work.join(".f.ftpx-part")).unwrap();
        std::os::unix::fs::symlink(outside.join("target-victim"), work.join("f")).unwrap();
        let run = fake.client(&work, "get f").await;
        assert_eq!(run.status, 0, "{size}: {}", run.err());
        for victim in ["part-victim", "target-victim"] {
            let kept = std::fs::read(outside.join(victim)).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&kept),
                "keep me",
                "{size}: {victim}"
            );
        }
        assert!(!work.join("f").is_symlink());
        assert_eq!(std::fs::read(work.join("f")).unwrap(), vec![7u8; size]);
        assert!(!work.join(".f.ftpx-part").exists());
    }
}

#[tokio::test]
async fn a_file_of_one_chunk_that_fails_its_hashes_leaves_nothing() {
    // A wrong chunk hash, then a right chunk with a wrong whole-file hash.
    let body = [9u8; 700];
    let wrong_chunk = {
        let mut wire = download(&body, 1024);
        let at = wire.iter().position(|&b| b == b'\n').unwrap() + 1;
        let mut header =
            FrameHeader::decode(wire[at..at + FRAME_HEADER_LEN].try_into().unwrap()).unwrap();
        header.hash[0] ^= 1;
        wire[at..at + FRAME_HEADER_LEN].copy_from_slice(&header.encode());
        wire
    };
    let wrong_whole = {
        let mut wire = download(&body, 1024);
        let end = wire.len() - FRAME_HEADER_LEN;
        let mut header = FrameHeader::decode(wire[end..].try_into().unwrap()).unwrap();
        header.hash[0] ^= 1;
        wire[end..].copy_from_slice(&header.encode());
        wire
    };
    for (wire, why) in [
        (wrong_chunk, "failed its hash check"),
        (wrong_whole, "hash did not match"),
    ] {
        let fake = Fake::start("220 fake ready", move |req| match verb(req) {
            "GET" => Answer::Send(wire.clone()),
            _ => Answer::Send(b"550 no\n".to_vec()),
        })
        .await;
        let work = fake.workdir("w");
        let run = fake.client(&work, "get f").await;
        assert_eq!(run.status, 1, "{why}: {}", run.err());
        assert!(run.err().contains(why), "{why}: {}", run.err());
        let left: Vec<_> = tree(&work)
            .into_iter()
            .filter(|p| !p.starts_with(".state"))
            .collect();
        assert!(left.is_empty(), "{why}: left {left:?}");
    }
}

/// Runs `get f` against a server that answers GET with `reply` and then
/// an end frame, and checks the client refused it cleanly.
async fn refuses_plan(reply: &'static str, why: &str) {
    let fake = Fake::start("220 fake ready", move |req| match verb(req) {
        "GET" => {
            let mut wire = reply.as_bytes().to_vec();
            wire.extend_from_slice(&FrameHeader::end(0, blake3::hash(b"")).encode());
            Answer::Send(wire)
        }
        _ => Answer::Send(b"550 no\n".to_vec()),
    })
    .await;
    let work = fake.workdir("w");
    let run = fake.client(&work, "get f").await;
    assert_eq!(run.status, 1, "{reply}: {}", run.err());
    assert!(run.err().contains(why), "{reply}: {}", run.err());
    assert!(
        run.max_rss < BASE_RSS,
        "{reply}: peak memory {}",
        run.max_rss
    );
    let left: Vec<_> = tree(&work)
        .into_iter()
        .filter(|p| !p.starts_with(".state"))
        .collect();
    assert!(left.is_empty(), "{reply}: left {left:?}");
}

#[tokio::test]
async fn download_plans_the_client_did_not_ask_for_are_refused() {
    refuses_plan("151 10000 2048 1024\n", "not offered").await;
    refuses_plan("151 10000 0 1000\n", "chunk size").await;
    refuses_plan("151 10000 0 8388608\n", "chunk size").await;
    refuses_plan("151 10000 20000 1024\n", "beyond the size").await;
    refuses_plan("151 9223372036854775808 0 1024\n", "beyond any file").await;
    refuses_plan("151 4611686018427387904 0 4194304\n", "free").await;
}

#[tokio::test]
async fn frames_beyond_the_plan_are_refused() {
    // A chunk frame claiming 2 GiB, one larger than the chunk size, and
    // one running past the declared size: each refused before its payload.
    for (size, len) in [(1u64 << 20, 1u32 << 31), (10_000, 2048), (100, 1024)] {
        let fake = Fake::start("220 fake ready", move |req| match verb(req) {
            "GET" => {
                let mut wire = format!("151 {size} 0 1024\n").into_bytes();
                let header = FrameHeader {
                    kind: FrameKind::Chunk,
                    offset: 0,
                    len,
                    hash: [0; 32],
                };
                wire.extend_from_slice(&header.encode());
                Answer::Send(wire)
            }
            _ => Answer::Send(b"550 no\n".to_vec()),
        })
        .await;
        let work = fake.workdir("w");
        let run = fake.client(&work, "get f").await;
        assert_eq!(run.status, 1, "{size} {len}: {}", run.err());
        assert!(
            run.err().contains("server broke the protocol"),
            "{}",
            run.err()
        );
        assert!(run.max_rss < BASE_RSS, "peak memory {}", run.max_rss);
        assert!(!work.join("f").exists());
    }
}

#[tokio::test]
async fn server_text_reaches_the_client_log_escaped() {
    let fake = Fake::start("220 fake ready", |req| match verb(req) {
        "GET" => Answer::Send(b"450 busy\r2026-01-01 INFO forged line \x1b[2J\n".to_vec()),
        _ => Answer::Send(b"500 no\n".to_vec()),
    })
    .await;
    let work = fake.workdir("w");
    let mut cmd = Command::new(BIN);
    cmd.current_dir(&work)
        .env("FTPX_STATE_DIR", work.join(".state"))
        .env("FTPX_PASSWORD", PASSWORD)
        .args(["connect", &format!("ann@127.0.0.1:{}", fake.port), "--ca"])
        .arg(&fake.ca)
        .args(["--timeout", "10", "--retries", "1", "-c", "get x"]);
    let run = tokio::task::spawn_blocking(move || run(cmd)).await.unwrap();
    assert_eq!(run.status, 1, "{}", run.err());
    let log = std::fs::read_to_string(work.join(".state/ftpx.log")).unwrap();
    assert!(log.contains("transfer interrupted"), "{log}");
    assert!(!log.contains('\r') && !log.contains('\x1b'), "{log:?}");
    assert!(log.lines().all(|l| !l.starts_with("2026-01-01")), "{log}");
}

#[tokio::test]
async fn get_r_asks_for_every_file_of_a_directory_before_the_first_arrives() {
    // This server answers no GET until it has all 50: a client that waits
    // for each file before asking for the next would wait for ever.
    const FILES: usize = 50;
    let gets = std::sync::atomic::AtomicUsize::new(0);
    let fake = Fake::start("220 fake ready", move |req| match verb(req) {
        "LIST" => {
            let mut text = String::new();
            for i in 0..FILES {
                text += &format!("213-f 5 0 f{i:02}\n");
            }
            Answer::Send(format!("{text}213 {FILES} entries\n").into_bytes())
        }
        "GET" if gets.fetch_add(1, Ordering::SeqCst) + 1 < FILES => {
            Answer::Hold(download(b"hello", 1024))
        }
        "GET" => Answer::Send(download(b"hello", 1024)),
        _ => Answer::Send(b"500 no\n".to_vec()),
    })
    .await;
    let work = fake.workdir("w");
    let run = fake.client(&work, "get -r tree").await;
    assert_eq!(run.status, 0, "{}", run.err());
    assert!(
        run.out()
            .contains(&format!("{FILES} files received, 0 already complete")),
        "{}",
        run.out()
    );
    for i in 0..FILES {
        assert_eq!(
            std::fs::read(work.join(format!("tree/f{i:02}"))).unwrap(),
            b"hello"
        );
    }
}

#[tokio::test]
async fn get_r_takes_only_a_few_listings_ahead_of_the_files() {
    // A tree of 2,000 directories of 50,000 long names each, whose files
    // are never there: the client may ask for a few listings at once, but
    // not hold the tree's million entries before it finds out.
    const PER_DIR: usize = 50_000;
    let name = "n".repeat(240);
    let listing: Arc<Vec<u8>> = Arc::new({
        let mut text = String::new();
        for i in 0..PER_DIR {
            text += &format!("213-f 5 0 {name}{i:05}\n");
        }
        format!("{text}213 {PER_DIR} entries\n").into_bytes()
    });
    let one_listing = listing.len() as u64;
    let fake = Fake::start("220 fake ready", move |req| match verb(req) {
        "LIST" if req.ends_with("/tree") => {
            let dirs: String = (0..2000).map(|i| format!("213-d 0 0 d{i:04}\n")).collect();
            Answer::Send(format!("{dirs}213 2000 entries\n").into_bytes())
        }
        "LIST" => Answer::Send(listing.to_vec()),
        _ => Answer::Send(b"550 no such file\n".to_vec()),
    })
    .await;
    let work = fake.workdir("w");
    let run = fake.client(&work, "get -r tree").await;
    assert_eq!(run.status, 1, "{}", run.err());
    assert!(run.err().contains("no such file"), "{}", run.err());
    let sent = fake.sent();
    assert!(
        sent < 6 * one_listing,
        "the server sent {sent} bytes, {} listings",
        sent / one_listing
    );
    assert!(
        run.max_rss < BASE_RSS + 6 * one_listing,
        "peak memory {} bytes",
        run.max_rss
    );
    // The directories were made; no file was.
    let files: Vec<_> = tree(&work.join("tree"))
        .into_iter()
        .filter(|p| p.components().count() > 1)
        .collect();
    assert!(files.is_empty(), "{files:?}");
}

#[tokio::test]
async fn the_login_goes_out_without_waiting_for_the_greeting() {
    // This server greets only once a request came: a client that waits
    // for the greeting before it logs in would wait for ever.
    let fake = Fake::start_greeting(Greet::AfterRequest, "220 fake ready", |req| {
        match verb(req) {
            "PWD" => Answer::Send(b"257 \"/\"\n".to_vec()),
            _ => Answer::Send(b"500 no\n".to_vec()),
        }
    })
    .await;
    let work = fake.workdir("w");
    let run = fake.client(&work, "pwd").await;
    assert_eq!(run.status, 0, "{}", run.err());
    assert_eq!(run.out(), "/\n");
}

#[tokio::test]
async fn a_script_sends_its_first_command_with_the_login() {
    // This server says nothing, not even its greeting, until the login
    // and the next request came: a client that waits for the login's
    // reply before its first command hangs until its timeout.
    let fake = Fake::start_greeting(
        Greet::AfterTwoRequests,
        "220 fake ready",
        |req| match verb(req) {
            "PWD" => Answer::Send(b"257 \"/\"\n".to_vec()),
            _ => Answer::Send(b"500 no\n".to_vec()),
        },
    )
    .await;
    let work = fake.workdir("w");
    let started = Instant::now();
    let run = fake.client(&work, "pwd").await;
    assert_eq!(run.status, 0, "{}", run.err());
    assert_eq!(run.out(), "/\n");
    // Well within the client's 10 s timeout: nothing waited for it.
    assert!(started.elapsed() < Duration::from_secs(5));

    // A transfer as the first command too: its GET goes with the login.
    let body = b"pipelined".to_vec();
    let wire = download(&body, 1024);
    let fake = Fake::start_greeting(
        Greet::AfterTwoRequests,
        "220 fake ready",
        move |req| match verb(req) {
            "GET" => Answer::Send(wire.clone()),
            _ => Answer::Send(b"500 no\n".to_vec()),
        },
    )
    .await;
    let work = fake.workdir("w");
    let run = fake.client(&work, "get f").await;
    assert_eq!(run.status, 0, "{}", run.err());
    assert_eq!(std::fs::read(work.join("f")).unwrap(), body);
}

#[tokio::test]
async fn a_script_sends_quit_with_its_last_command() {
    // This server answers PWD only once the next request came: a client
    // that waits for that reply before it sends QUIT hangs until its
    // timeout.
    let fake = Fake::start("220 fake ready", |req| match verb(req) {
        "PWD" => Answer::Hold(b"257 \"/\"\n".to_vec()),
        _ => Answer::Send(b"500 no\n".to_vec()),
    })
    .await;
    let work = fake.workdir("w");
    let started = Instant::now();
    let run = fake.client(&work, "pwd").await;
    assert_eq!(run.status, 0, "{}", run.err());
    assert_eq!(run.out(), "/\n");
    assert!(started.elapsed() < Duration::from_secs(5));
}
