//! A whole server session over an in-memory pipe: `session::run` reads a
//! valid `LOGIN`, then the fuzz input (request lines and binary frames, or
//! anything else), then the end of the stream.
//!
//! The home holds a few files, a directory, symlinks planted to outside the
//! jail, and an unfinished upload that can be resumed; the fixture also has
//! canary files outside the home. Each run starts from the same state (home
//! and upload staging rebuilt, a fresh `Server`), so a crash reproduces from
//! its input alone.
//!
//! Properties: nothing panics; the session ends soon after the end of input;
//! everything the server sent is well-formed (reply lines, and after a 151
//! chunk frames whose hashes match their payloads, then an end or abort
//! frame); no canary content and no host path reaches the client; nothing
//! outside the home and the user's upload staging changed.

#![no_main]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ftpx::config::{Config, Size};
use ftpx::transfer::connection::Connection;
use ftpx::transfer::journal::{self, Journal};
use ftpx::protocol::{FRAME_HEADER_LEN, FrameHeader, FrameKind, ReplyLine};
use ftpx::server::Server;
use ftpx::transfer::{Tree, chunk_hash};
use ftpx::store::users::{Password, User, UserDb};
use ftpx_fuzz::{CHUNK, DATA_LEN, PASSWORD, RESUME_HELD, RESUME_LEN, RESUME_TARGET, USER, pattern};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Small enough that uploads in the corpus can run into it.
const QUOTA: u64 = 16 << 10;
/// A run that takes longer than this after its input ended is a hang.
const RUN_LIMIT: Duration = Duration::from_secs(5);

struct Fixture {
    rt: tokio::runtime::Runtime,
    /// The whole fixture: canaries outside the server, and the server's var/.
    dir: tempfile::TempDir,
    config: Config,
    home: PathBuf,
    staging: PathBuf,
    /// Unique text in every canary file.
    token: String,
    /// Everything outside `home` and `staging`, as it was at the start.
    before: BTreeMap<PathBuf, String>,
    /// Print what the server sent (FTPX_FUZZ_TRANSCRIPT set), to see what an input does.
    transcript: bool,
}

fuzz_target!(|data: &[u8]| {
    fixture().run(data);
});

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        // Statics are never dropped: remove the temp directory when libFuzzer
        // exits normally. After a crash it stays, for a look at what the run left.
        extern "C" fn remove_fixture() {
            if let Some(f) = FIXTURE.get() {
                let _ = std::fs::remove_dir_all(f.dir.path());
            }
        }
        // SAFETY: registers a plain function with no arguments, as atexit requires.
        unsafe { libc::atexit(remove_fixture) };
        Fixture::new()
    })
}

impl Fixture {
    fn new() -> Fixture {
        // tmpfs where there is one: the server fsyncs, and there it costs nothing.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("ftpx-fuzz-")
                .tempdir_in(shm)
        } else {
            tempfile::Builder::new().prefix("ftpx-fuzz-").tempdir()
        }
        .expect("a temp directory");
        let root = dir.path();
        let token = format!(
            "CANARY-{:016x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64
                ^ u64::from(std::process::id())
        );

        let mut config = Config::default();
        let var = root.join("srv/var");
        config.server.var_dir = var.clone();
        config.server.cert_dir = root.join("srv/certs");
        config.server.log_file = var.join("log/ftpx.log");
        config.accounts.registration = false;
        config.accounts.scrypt_log_n = 4;
        config.accounts.scrypt_r = 1;
        config.accounts.login_failure_delay_ms = 0;
        config.limits.login_timeout_secs = 1;
        config.limits.idle_timeout_secs = 1;
        config.limits.io_timeout_secs = 1;
        // Small limits, so that inputs of a few KiB reach them.
        config.limits.max_line = 512;
        config.limits.max_path = 200;
        config.limits.max_list_entries = 4;
        config.transfer.chunk_size = Size(CHUNK);
        config.transfer.checkpoint_bytes = Size(CHUNK);

        // Canaries: beside the fixture, in another user's home, in var/.
        for (path, what) in [
            (root.join("outside/canary.txt"), "outside the server"),
            (var.join("homes/other/secret.txt"), "another user's home"),
            (var.join("canary.txt"), "the server's var directory"),
        ] {
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
            std::fs::write(&path, format!("{token} {what}\n")).expect("a canary");
        }
        let hash = ftpx::store::users::hash_password(&Password::new(PASSWORD), &config.accounts)
            .expect("a password hash");
        UserDb::new(&var)
            .add(User {
                name: USER.into(),
                quota: QUOTA,
                hash,
                created: 0,
                max_files: None,
            })
            .expect("the fuzz user");
        let db = UserDb::new(&var);
        let home = db.home(USER);
        let staging = var.join("partial").join(USER);

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let mut f = Fixture {
            rt,
            config,
            home,
            staging,
            token,
            before: BTreeMap::new(),
            transcript: std::env::var_os("FTPX_FUZZ_TRANSCRIPT").is_some(),
            dir,
        };
        f.reset();
        f.before = f.snapshot();
        f
    }

    /// Rebuilds the home and the upload staging directory.
    fn reset(&self) {
        let root = self.dir.path();
        for d in [&self.home, &self.staging] {
            match std::fs::remove_dir_all(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("cannot clear {}: {e}", d.display()),
            }
            std::fs::create_dir_all(d).expect("mkdir");
        }
        let h = &self.home;
        std::fs::write(h.join("hello.txt"), "hello, world\n").expect("write");
        std::fs::write(h.join("data.bin"), pattern(DATA_LEN)).expect("write");
        std::fs::write(h.join("empty"), "").expect("write");
        std::fs::create_dir(h.join("dir")).expect("mkdir");
        std::fs::write(h.join("dir/inner.txt"), "inner\n").expect("write");
        // Planted links out of the jail: every access through them must fail.
        let link = |target: &Path, name: &str| {
            std::os::unix::fs::symlink(target, h.join(name)).expect("symlink")
        };
        link(&root.join("outside"), "escape");
        link(&root.join("outside/canary.txt"), "leak.txt");
        link(Path::new("../other"), "neighbour");
        link(Path::new("../../../.."), "up");
        link(Path::new("hello.txt"), "inside");
        // An unfinished upload, part of it on disk and journaled.
        let key = journal::key(&[RESUME_TARGET]);
        std::fs::write(
            self.staging.join(format!("{key}.part")),
            &pattern(RESUME_LEN)[..RESUME_HELD],
        )
        .expect("write");
        // Written as text, the way the journal is stored, so that fields
        // added with a default later need no change here.
        let record = Journal::parse(
            format!(
                "version = {}\nkind = \"upload\"\nsource = \"\"\ntarget = \"{RESUME_TARGET}\"\n\
                 size = {RESUME_LEN}\nmtime = 0\ninode = 0\nchunk = {CHUNK}\nverified = 0\nupdated = 0\n",
                journal::VERSION
            )
            .as_bytes(),
        )
        .expect("a journal record");
        let mut j = Journal::new(self.staging.join(format!("{key}.journal")), record);
        j.save(RESUME_HELD as u64).expect("a journal");
    }

    /// Every entry under the fixture but the home and the staging
    /// directory: type, size, content or link target. Directory times are
    /// left out (the server may create the staging directory's entries).
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            let entries = std::fs::read_dir(&d).expect("readdir");
            for e in entries {
                let path = e.expect("an entry").path();
                if path == self.home || path == self.staging {
                    continue;
                }
                let m = std::fs::symlink_metadata(&path).expect("lstat");
                let what = if m.is_dir() {
                    stack.push(path.clone());
                    format!("dir {:o}", m.mode())
                } else if m.is_symlink() {
                    format!("link -> {:?}", std::fs::read_link(&path).expect("readlink"))
                } else if m.is_file() {
                    let bytes = std::fs::read(&path).expect("read");
                    format!(
                        "file {:o} {} {}",
                        m.mode(),
                        m.len(),
                        blake3::hash(&bytes).to_hex()
                    )
                } else {
                    format!("other {:o}", m.mode())
                };
                out.insert(path, what);
            }
        }
        out
    }

    fn run(&self, data: &[u8]) {
        self.reset();
        let server = Arc::new(Server::new(self.config.clone()).expect("a server"));
        let (client, server_end) = tokio::io::duplex(64 << 10);
        let conn = Connection::new(
            tokio::io::BufReader::new(server_end),
            self.config.io_timeout(),
        );
        let peer: SocketAddr = ([127, 0, 0, 1], 40000).into();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut input = format!("LOGIN {USER} \"{PASSWORD}\"\n").into_bytes();
        input.extend_from_slice(data);

        let received = self.rt.block_on(async {
            let (mut rd, mut wr) = tokio::io::split(client);
            let session = ftpx::server::session::run(conn, peer, server, stop_rx);
            let write = async move {
                // The session may end before it has read everything; the rest is dropped.
                let _ = wr.write_all(&input).await;
                let _ = wr.shutdown().await;
            };
            let read = async move {
                let mut out = Vec::new();
                let _ = rd.read_to_end(&mut out).await;
                out
            };
            let all = async { tokio::join!(session, write, read).2 };
            tokio::time::timeout(RUN_LIMIT, all).await
        });
        drop(stop_tx);
        let received = received.unwrap_or_else(|_| {
            panic!("the session was still running {RUN_LIMIT:?} after its input ended")
        });
        self.check(data, &received);
    }

    fn check(&self, data: &[u8], received: &[u8]) {
        if self.transcript {
            eprintln!("{}", String::from_utf8_lossy(received));
        }
        check_replies(received);
        let root = self.dir.path().to_string_lossy();
        for (secret, what) in [
            (self.token.as_bytes(), "canary content"),
            (root.as_bytes(), "a host path"),
        ] {
            if contains(received, secret) && !contains(data, secret) {
                panic!(
                    "{what} reached the client: {:?}",
                    String::from_utf8_lossy(received)
                );
            }
        }
        let after = self.snapshot();
        if after != self.before {
            let mut diff = String::new();
            for (p, w) in &self.before {
                match after.get(p) {
                    None => diff += &format!("  gone: {} ({w})\n", p.display()),
                    Some(a) if a != w => {
                        diff += &format!("  changed: {} ({w} -> {a})\n", p.display())
                    }
                    Some(_) => {}
                }
            }
            for (p, a) in &after {
                if !self.before.contains_key(p) {
                    diff += &format!("  new: {} ({a})\n", p.display());
                }
            }
            panic!("the session changed things outside the home:\n{diff}");
        }
        let home = std::fs::symlink_metadata(&self.home).expect("the home");
        assert!(home.is_dir(), "the home is no longer a directory");
    }
}

/// Checks what the server sent: a greeting, a successful login, then reply
/// lines, with the frames of each download after its 151 line.
fn check_replies(received: &[u8]) {
    let mut rest = received;
    let mut lines = 0;
    while !rest.is_empty() {
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            panic!("the server's output ends in an unterminated line: {rest:?}");
        };
        let line = std::str::from_utf8(&rest[..end])
            .unwrap_or_else(|_| panic!("a reply line is not UTF-8: {:?}", &rest[..end]));
        rest = &rest[end + 1..];
        let reply = ReplyLine::parse(line)
            .unwrap_or_else(|| panic!("the server sent a malformed reply line {line:?}"));
        match lines {
            0 => assert_eq!(reply.code, 220, "greeting: {line:?}"),
            1 => assert_eq!(reply.code, 230, "the fixture's login failed: {line:?}"),
            _ => {}
        }
        lines += 1;
        if reply.code == 151 {
            rest = check_download(line, &reply.text, rest);
        }
    }
    assert!(lines >= 2, "no greeting and login reply: {received:?}");
}

/// Reads the frames that follow `151 SIZE OFFSET CHUNK`; returns what is after them.
fn check_download<'a>(line: &str, text: &str, mut rest: &'a [u8]) -> &'a [u8] {
    let numbers: Vec<u64> = text
        .split(' ')
        .map(|w| {
            w.parse()
                .unwrap_or_else(|_| panic!("bad 151 line {line:?}"))
        })
        .collect();
    let [size, offset, chunk] = numbers[..] else {
        panic!("bad 151 line {line:?}");
    };
    assert!(offset <= size, "{line:?}");
    let mut pos = offset;
    // The whole-file hash can be checked only for a download from the start.
    let mut tree = (offset == 0).then(Tree::default);
    loop {
        assert!(
            rest.len() >= FRAME_HEADER_LEN,
            "the download after {line:?} stops inside a frame header"
        );
        let header_bytes: &[u8; FRAME_HEADER_LEN] =
            rest[..FRAME_HEADER_LEN].try_into().expect("a header");
        let header = FrameHeader::decode(header_bytes)
            .unwrap_or_else(|e| panic!("the server sent a bad frame header ({e}) after {line:?}"));
        rest = &rest[FRAME_HEADER_LEN..];
        match header.kind {
            FrameKind::Chunk => {
                let len = header.len as usize;
                assert!(rest.len() >= len, "a chunk after {line:?} is cut short");
                let payload = &rest[..len];
                rest = &rest[len..];
                assert_eq!(header.offset, pos, "chunks out of order after {line:?}");
                assert!(
                    len as u64 == chunk || pos + len as u64 == size,
                    "a chunk of {len} bytes at {pos} after {line:?}"
                );
                let hash = chunk_hash(size, pos, payload);
                assert_eq!(hash, header.hash, "a chunk's hash is wrong after {line:?}");
                if let Some(t) = tree.as_mut() {
                    t.push(hash);
                }
                pos += len as u64;
            }
            FrameKind::End => {
                assert_eq!(header.offset, size, "end frame after {line:?}");
                assert_eq!(pos, size, "the download after {line:?} ends early");
                if let Some(t) = tree {
                    assert_eq!(
                        t.finalize().as_bytes(),
                        &header.hash,
                        "the end frame's hash is wrong after {line:?}"
                    );
                }
                return rest;
            }
            FrameKind::Abort => return rest,
            FrameKind::Start => panic!("a start frame in a download after {line:?}"),
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
