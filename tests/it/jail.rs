//! The jail catalogue (THREATS.md 2.A) run against every command that takes
//! a path: `..` clamping, host-absolute paths, backslashes, encodings,
//! control bytes, length bombs, look-alikes, symlinks planted by an admin,
//! special files, other tenants and degenerate names.
//!
//! Every test acts as `ann`, with `bob` as her neighbour. Canaries sit in
//! bob's home, in the homes directory, in `var/` and in a temp directory of
//! their own; after each test they must be byte-identical, no entry outside
//! the acting home may have appeared, changed or gone, and no canary token
//! (nor a host path the client did not send itself) may be in anything the
//! client received.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ftpx::client::{Client, unquote};
use ftpx::protocol::{FrameHeader, FrameKind, quote};
use tempfile::TempDir;

use crate::common::*;

/// Bound on any single request, FIFOs included: a hang is a failure, not a stall.
const HANG_GUARD: Duration = Duration::from_secs(20);

/// A server with `ann` (who acts) and `bob`, canaries outside ann's home, and
/// a snapshot of everything outside the acting homes.
struct Jail {
    s: TestServer,
    outside: TempDir,
    canaries: Canaries,
    acting: Vec<String>,
    before: BTreeMap<PathBuf, String>,
}

impl Jail {
    async fn start() -> Jail {
        Jail::start_acting(&["ann"]).await
    }

    /// `acting` are the users whose homes may change during the test.
    async fn start_acting(acting: &[&str]) -> Jail {
        // The catalogue sends hundreds of refused requests in one session.
        let s = TestServer::start_with(|c| c.limits.max_bad_requests = u32::MAX).await;
        s.add_user("ann", 1 << 20);
        s.add_user("bob", 1 << 20);
        let outside = tempfile::tempdir().unwrap();
        let var = s.config.server.var_dir.clone();
        let canaries = Canaries::plant(&[
            s.home("bob").join("secret.txt"),
            s.home("bob").join("private/deep.txt"),
            var.join("homes/canary.txt"),
            var.join("outside.txt"),
            outside.path().join("canary.txt"),
            outside.path().join("deep/canary.txt"),
        ]);
        let ann = s.home("ann");
        std::fs::write(ann.join("mine.txt"), b"mine").unwrap();
        std::fs::create_dir(ann.join("sub")).unwrap();
        std::fs::write(ann.join("sub/inner.txt"), b"inner").unwrap();
        let mut jail = Jail {
            s,
            outside,
            canaries,
            acting: acting.iter().map(|a| a.to_string()).collect(),
            before: BTreeMap::new(),
        };
        jail.before = jail.snapshot();
        jail
    }

    fn ann(&self) -> PathBuf {
        self.s.home("ann")
    }

    fn var(&self) -> PathBuf {
        self.s.config.server.var_dir.clone()
    }

    /// Makes each of `names` with MKD: each must be made under that very name
    /// right below ann's root.
    async fn made_as_named(&self, tx: &mut Tx, names: &[&str]) {
        for name in names {
            assert_eq!(
                path_in(&tx.expect(&format!("MKD {}", quote(name)), 257).await),
                format!("/{name}")
            );
            assert!(self.ann().join(name).is_dir(), "{name}");
        }
    }

    /// Runs the real client's shell in `dir` as ann with `commands`.
    fn shell(&self, dir: &Path, commands: &str) -> Output {
        connect_c(dir, &self.s.ca, self.s.addr.port(), "ann", commands)
    }

    /// Plants a symlink in ann's home, as an admin could.
    fn link(&self, name: &str, target: impl AsRef<Path>) {
        let at = self.ann().join(name);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        symlink(target, at).unwrap();
    }

    async fn tx(&self, user: &str) -> Tx {
        let mut raw = Raw::connect(&self.s).await;
        raw.login(user).await;
        Tx {
            raw,
            sent: String::new(),
            seen: String::new(),
        }
    }

    /// Everything under the server's directory and the outside directory,
    /// except the acting homes, the log and the upload staging area.
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        let var = self.var();
        let mut skip: Vec<PathBuf> = self.acting.iter().map(|u| self.s.home(u)).collect();
        skip.push(var.join("log"));
        skip.push(var.join("partial"));
        let mut out = BTreeMap::new();
        for root in [self.s.dir.path(), self.outside.path()] {
            walk(root, &skip, &mut out);
        }
        out
    }

    /// The shared oracles: canaries intact, nothing outside the acting homes
    /// changed, and no token or unsent host path in what the clients received.
    fn check(&self, transcripts: &[Tx]) {
        self.canaries.assert_intact();
        let after = self.snapshot();
        for (path, before) in &self.before {
            assert_eq!(
                after.get(path),
                Some(before),
                "{} changed outside the acting home",
                path.display()
            );
        }
        for path in after.keys() {
            assert!(
                self.before.contains_key(path),
                "{} appeared outside the acting home",
                path.display()
            );
        }
        for tx in transcripts {
            self.canaries.assert_not_in(&tx.seen);
            for host in [self.s.dir.path(), self.outside.path()] {
                let host = host.to_str().unwrap();
                if !tx.sent.contains(host) {
                    assert!(
                        !tx.seen.contains(host),
                        "a host path reached the client: {}",
                        tx.seen
                    );
                }
            }
        }
        assert!(Path::new("/etc/passwd").is_file());
    }

    /// Runs the shared oracles on `sessions`, closes them and stops the server.
    async fn finish(self, sessions: Vec<Tx>) {
        self.check(&sessions);
        drop(sessions);
        self.s.stop().await;
    }
}

/// Records every path under `dir` with its type and, for files, size and
/// mtime; for symlinks, the target. Symlinks are not followed.
fn walk(dir: &Path, skip: &[PathBuf], out: &mut BTreeMap<PathBuf, String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if skip.iter().any(|s| path.starts_with(s)) || name.as_bytes().starts_with(b"client-state-")
        {
            continue;
        }
        let m = std::fs::symlink_metadata(&path).unwrap();
        let desc = if m.is_dir() {
            walk(&path, skip, out);
            "dir".to_string()
        } else if m.is_symlink() {
            format!("link {:?}", std::fs::read_link(&path).unwrap())
        } else {
            format!("file {} {:?}", m.len(), m.modified().unwrap())
        };
        out.insert(path, desc);
    }
}

/// A logged-in raw session that keeps what it sent and everything it received.
struct Tx {
    raw: Raw,
    sent: String,
    seen: String,
}

impl Tx {
    /// Sends raw bytes (a line end included) and returns every line of the reply.
    async fn send_lines(&mut self, bytes: &[u8]) -> Vec<String> {
        self.sent.push_str(&String::from_utf8_lossy(bytes));
        self.raw.send(bytes).await;
        let mut lines = vec![];
        loop {
            let line = tokio::time::timeout(HANG_GUARD, self.raw.line())
                .await
                .expect("no reply within the hang guard")
                .expect("the server closed the session");
            self.seen.push_str(&line);
            self.seen.push('\n');
            let last = line.len() < 4 || line.as_bytes()[3] != b'-';
            lines.push(line);
            if last {
                return lines;
            }
        }
    }

    async fn lines(&mut self, line: &str) -> Vec<String> {
        self.send_lines(format!("{line}\n").as_bytes()).await
    }

    /// The final reply line.
    async fn ask(&mut self, line: &str) -> String {
        self.lines(line).await.pop().unwrap()
    }

    /// Asks and checks the reply code.
    async fn expect(&mut self, line: &str, want: u16) -> String {
        let reply = self.ask(line).await;
        assert_eq!(code(&reply), want, "{line:?} got {reply:?}");
        reply
    }

    /// Sends raw bytes as one request and checks the reply code.
    async fn expect_bytes(&mut self, bytes: &[u8], want: u16) {
        let reply = self.send_lines(bytes).await.pop().unwrap();
        assert_eq!(code(&reply), want, "{bytes:?} got {reply:?}");
    }

    /// Names in a listing of `arg` (None: the working directory); panics on an error reply.
    async fn names(&mut self, arg: Option<&str>) -> Vec<String> {
        let line = match arg {
            Some(a) => format!("LIST {}", quote(a)),
            None => "LIST".into(),
        };
        let lines = self.lines(&line).await;
        let last = lines.last().unwrap();
        assert_eq!(code(last), 213, "{line} got {last:?}");
        let mut names: Vec<String> = lines[..lines.len() - 1]
            .iter()
            .map(|l| {
                let entry = l.strip_prefix("213-").unwrap();
                unquote(entry.splitn(4, ' ').nth(3).unwrap()).unwrap()
            })
            .collect();
        names.sort();
        names
    }

    /// Uploads `body` to `arg` by hand: the request line, and after `150`
    /// a start frame, one chunk and an end frame. Returns the final reply.
    async fn put(&mut self, arg: &str, body: &[u8]) -> String {
        let reply = self
            .ask(&format!("PUT {} {}", quote(arg), body.len()))
            .await;
        if code(&reply) != 150 {
            return reply;
        }
        let mut frames = FrameHeader::start(0).encode().to_vec();
        frames.extend_from_slice(
            &FrameHeader {
                kind: FrameKind::Chunk,
                offset: 0,
                len: body.len() as u32,
                hash: *blake3::hash(body).as_bytes(),
            }
            .encode(),
        );
        frames.extend_from_slice(body);
        frames.extend_from_slice(&FrameHeader::end(body.len() as u64, blake3::hash(body)).encode());
        self.raw.send(&frames).await;
        let reply = tokio::time::timeout(HANG_GUARD, self.raw.reply())
            .await
            .expect("no reply to the upload")
            .expect("the server closed the session");
        self.seen.push_str(&reply);
        self.seen.push('\n');
        reply
    }
}

fn code(reply: &str) -> u16 {
    reply.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// The path in a `257 PATH` or `200 renamed to PATH` reply.
fn path_in(reply: &str) -> String {
    let text = &reply[4..];
    unquote(text.strip_prefix("renamed to ").unwrap_or(text)).unwrap()
}

/// Every command that takes a path, aimed at `arg` as written on the wire.
fn every_command(arg: &str) -> Vec<String> {
    vec![
        format!("CWD {arg}"),
        format!("LIST {arg}"),
        format!("STAT {arg}"),
        format!("HASH {arg}"),
        format!("MKD {arg}"),
        format!("RMD {arg}"),
        format!("DELE {arg}"),
        format!("RENAME {arg} jail-renamed"),
        format!("RENAME mine.txt {arg}"),
        format!("PUT {arg} 4"),
        format!("GET {arg}"),
    ]
}

/// Aims every command at each of `args`; each must be refused with `want`.
async fn every_command_refused(tx: &mut Tx, args: &[impl AsRef<str>], want: u16) {
    for arg in args {
        for line in every_command(arg.as_ref()) {
            tx.expect(&line, want).await;
        }
    }
}

/// Aims every command that only uses an existing path at each of `args`,
/// single names that do not exist: each must be refused as not found.
async fn reads_refused(tx: &mut Tx, args: &[&str]) {
    for arg in args {
        let q = quote(arg);
        for line in [
            format!("CWD {q}"),
            format!("LIST {q}"),
            format!("STAT {q}"),
            format!("HASH {q}"),
            format!("RMD {q}"),
            format!("DELE {q}"),
            format!("RENAME {q} jail-renamed"),
            format!("GET {q}"),
        ] {
            tx.expect(&line, 550).await;
        }
    }
}

/// Aims every command that looks up through `name` at it, a link that leads
/// nowhere it may go: each must be refused as not found.
async fn lookups_through_refused(tx: &mut Tx, name: &str) {
    for line in [
        format!("GET {name}"),
        format!("HASH {name}"),
        format!("CWD {name}"),
        format!("LIST {name}"),
        format!("RMD {name}"),
        format!("MKD {name}/x"),
        format!("PUT {name}/x 4"),
    ] {
        tx.expect(&line, 550).await;
    }
}

/// STAT of the link `name` must describe the link itself.
async fn stat_shows_a_link(tx: &mut Tx, name: &str) {
    let stat = tx.expect(&format!("STAT {name}"), 213).await;
    assert!(stat.starts_with("213 l 0 "), "{name}: {stat}");
}

/// Downloads `arg` by hand on a logged-in client: `Ok(bytes)` after `151`
/// and the frames, or `Err(code)` of the refusal.
async fn get_bytes(c: &mut Client, arg: &str) -> Result<Vec<u8>, u16> {
    let conn = c.connection();
    conn.write_line(&format!("GET {}", quote(arg)))
        .await
        .unwrap();
    conn.flush().await.unwrap();
    let reply = tokio::time::timeout(HANG_GUARD, c.read_reply())
        .await
        .expect("no reply to GET")
        .unwrap();
    if reply.code != 151 {
        return Err(reply.code);
    }
    let mut body = vec![];
    loop {
        let header = c.connection().read_frame_header().await.unwrap();
        match header.kind {
            FrameKind::Chunk => {
                let mut buf = vec![0; header.len as usize];
                c.connection().read_payload(&mut buf).await.unwrap();
                body.extend_from_slice(&buf);
            }
            FrameKind::End => return Ok(body),
            other => panic!("unexpected {other:?} frame in a download"),
        }
    }
}

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn is_link(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_symlink())
}

#[tokio::test(flavor = "multi_thread")]
async fn dot_dot_clamps_at_the_root_for_every_command() {
    let j = Jail::start().await;
    let mut tx = j.tx("ann").await;

    // cd and pwd: `..` stops at the virtual root, as under chroot.
    assert_eq!(path_in(&tx.expect("CWD ../../..", 257).await), "/");
    assert_eq!(path_in(&tx.expect("PWD", 257).await), "/");
    assert_eq!(path_in(&tx.expect("CWD sub", 257).await), "/sub");
    assert_eq!(path_in(&tx.expect("CWD a/b/../../..", 257).await), "/");
    tx.expect("CWD /sub", 257).await;
    assert_eq!(path_in(&tx.expect("CWD ../../../..", 257).await), "/");
    assert_eq!(path_in(&tx.expect("PWD", 257).await), "/");
    tx.expect("CWD /sub", 257).await;

    // Reads through `..` land on ann's own files, never on the homes directory.
    assert_eq!(tx.names(Some("../../..")).await, ["mine.txt", "sub"]);
    assert_eq!(tx.names(Some("..")).await, ["mine.txt", "sub"]);
    let stat = tx.expect("STAT ../../../mine.txt", 213).await;
    assert!(
        stat.starts_with("213 f 4 ") && stat.ends_with(" mine.txt"),
        "{stat}"
    );
    assert_eq!(
        tx.expect("HASH ../../mine.txt", 213).await,
        format!("213 {}", hex(b"mine"))
    );
    tx.expect("CWD /", 257).await;

    // Paths that would name something outside resolve inside and are not found,
    // for every command alike.
    every_command_refused(
        &mut tx,
        &[
            "../../etc/passwd",
            "../bob/secret.txt",
            "/../../bob/private/deep.txt",
            "../../../var/outside.txt",
            "sub/../../../../bob/secret.txt",
        ],
        550,
    )
    .await;
    tx.expect("STAT ../canary.txt", 550).await;
    tx.expect("HASH ../../outside.txt", 550).await;
    tx.expect("GET ../../outside.txt", 550).await;
    tx.expect("DELE ../canary.txt", 550).await;

    // Writes through `..` are created inside the home.
    assert_eq!(
        path_in(&tx.expect("MKD ../../escaped", 257).await),
        "/escaped"
    );
    assert!(j.ann().join("escaped").is_dir());
    assert_eq!(path_in(&tx.expect("MKD a/../../b", 257).await), "/b");
    assert!(j.ann().join("b").is_dir());
    tx.expect("RMD ../../escaped", 200).await;
    assert!(!j.ann().join("escaped").exists());
    let moved = tx
        .expect("RENAME ../../mine.txt ../../../moved.txt", 200)
        .await;
    assert_eq!(path_in(&moved), "/moved.txt");
    assert_eq!(std::fs::read(j.ann().join("moved.txt")).unwrap(), b"mine");
    let put = tx.put("../../../up.txt", b"uploaded").await;
    assert_eq!(code(&put), 226, "{put}");
    assert_eq!(std::fs::read(j.ann().join("up.txt")).unwrap(), b"uploaded");
    tx.expect("CWD sub", 257).await;
    let put = tx.put("../../sub/../../x.txt", b"x").await;
    assert_eq!(code(&put), 226, "{put}");
    assert_eq!(std::fs::read(j.ann().join("x.txt")).unwrap(), b"x");

    // The real client's shell: `cd ../../..; pwd; ls` shows ann's home.
    let cli = tempfile::tempdir().unwrap();
    let out = j.shell(
        cli.path(),
        "cd ../../..; pwd; ls; cd sub; cd ../../../..; pwd",
    );
    assert_eq!(out.status, 0, "{}", out.stderr);
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"/"), "{}", out.stdout);
    assert_eq!(lines.last(), Some(&"/"), "{}", out.stdout);
    assert!(!out.stdout.contains("bob"), "{}", out.stdout);
    j.canaries.assert_not_in(&out.stdout);
    j.canaries.assert_not_in(&out.stderr);

    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn host_absolute_paths_are_virtual_paths_inside_the_home() {
    let j = Jail::start().await;
    let mut tx = j.tx("ann").await;
    let outside_canary = j.outside.path().join("canary.txt");
    let bob_home = j.s.home("bob");
    every_command_refused(
        &mut tx,
        &[
            "/etc/passwd".to_string(),
            "/etc/shadow".to_string(),
            "/root/.ssh/authorized_keys".to_string(),
            "/etc/cron.d/x".to_string(),
            quote(outside_canary.to_str().unwrap()),
            quote(bob_home.join("secret.txt").to_str().unwrap()),
            quote(j.var().join("outside.txt").to_str().unwrap()),
        ],
        550,
    )
    .await;
    tx.expect("CWD /root", 550).await;
    tx.expect(&format!("LIST {}", quote(bob_home.to_str().unwrap())), 550)
        .await;
    tx.expect(
        &format!("CWD {}", quote(j.outside.path().to_str().unwrap())),
        550,
    )
    .await;

    // `/` is the home; making `/etc` makes a directory in the home.
    assert_eq!(tx.names(Some("/")).await, ["mine.txt", "sub"]);
    assert_eq!(path_in(&tx.expect("MKD /etc", 257).await), "/etc");
    assert!(j.ann().join("etc").is_dir());
    let put = tx.put("/etc/passwd", b"not the host's").await;
    assert_eq!(code(&put), 226, "{put}");
    assert_eq!(
        std::fs::read(j.ann().join("etc/passwd")).unwrap(),
        b"not the host's"
    );
    assert_eq!(
        tx.expect("HASH /etc/passwd", 213).await,
        format!("213 {}", hex(b"not the host's"))
    );
    assert_eq!(tx.names(Some("/etc")).await, ["passwd"]);
    tx.expect("DELE /etc/passwd", 200).await;
    tx.expect("RMD /etc", 200).await;

    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backslashes_are_refused_by_every_command() {
    let j = Jail::start().await;
    let mut tx = j.tx("ann").await;
    let before = listing(&j.ann());
    // On the wire a backslash outside quotes is an ordinary character, so
    // these reach the path check as written; quoted forms must fare the same.
    for arg in [
        r"..\..\etc\passwd",
        r"a\..\..\b",
        r"/sub\..\..\x",
        r"\\server\share",
        r"sub\inner.txt",
        r"mine.txt\",
    ] {
        every_command_refused(&mut tx, &[arg.to_string(), quote(arg)], 501).await;
    }
    tx.expect("NOOP", 200).await;
    assert_eq!(listing(&j.ann()), before);
    assert_eq!(std::fs::read(j.ann().join("mine.txt")).unwrap(), b"mine");
    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn percent_encodings_are_literal_names() {
    let j = Jail::start().await;
    let mut tx = j.tx("ann").await;

    // Never decoded: these name nothing that exists.
    every_command_refused(
        &mut tx,
        &[
            "%2e%2e/%2e%2e/outside.txt",
            "%c0%ae%c0%ae/bob/secret.txt",
            "..%2f/bob/secret.txt",
        ],
        550,
    )
    .await;
    reads_refused(
        &mut tx,
        &[
            "%2e%2e%2fbob%2fsecret.txt",
            "%252e%252e%252fbob",
            "..%2fbob%2fsecret.txt",
            "%2e%2e%5c%2e%2e%5cbob",
        ],
    )
    .await;

    // Made literally, inside the home.
    j.made_as_named(
        &mut tx,
        &["%2e%2e", "..%2f", "%c0%ae%c0%ae", "%252e%252e%252f"],
    )
    .await;
    assert_eq!(path_in(&tx.expect("CWD %2e%2e", 257).await), "/%2e%2e");
    assert_eq!(path_in(&tx.expect("PWD", 257).await), "/%2e%2e");
    let put = tx.put("%2e%2e%2fx.txt", b"pct").await;
    assert_eq!(code(&put), 226, "{put}");
    assert_eq!(
        std::fs::read(j.ann().join("%2e%2e/%2e%2e%2fx.txt")).unwrap(),
        b"pct"
    );
    tx.expect("CWD /", 257).await;
    let renamed = tx.expect("RENAME mine.txt %2e%2e%2fstolen", 200).await;
    assert_eq!(path_in(&renamed), "/%2e%2e%2fstolen");
    assert!(j.ann().join("%2e%2e%2fstolen").is_file());
    tx.expect("DELE %2e%2e/%2e%2e%2fx.txt", 200).await;
    tx.expect("RMD %2e%2e", 200).await;
    tx.expect("RMD ..%2f", 200).await;

    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn nul_and_control_bytes_are_refused_by_every_command() {
    let j = Jail::start().await;
    let mut tx = j.tx("ann").await;
    let before = listing(&j.ann());
    for bad in [
        "a\0b",
        "ok.txt\0.jpg",
        "\0/../../etc/passwd",
        "sub\0/../../bob",
        "a\rb",
        "a\x1b[2J",
        "a\x7fb",
        "a\u{85}b",
        "a\u{9b}2J",
        "a\x08b",
    ] {
        for line in every_command(bad) {
            tx.expect_bytes(format!("{line}\n").as_bytes(), 501).await;
        }
        // Inside quotes as well.
        for line in every_command(&format!("\"{bad}\"")) {
            tx.expect_bytes(format!("{line}\n").as_bytes(), 501).await;
        }
    }
    // The session is intact and nothing was made.
    tx.expect("NOOP", 200).await;
    assert_eq!(path_in(&tx.expect("PWD", 257).await), "/");
    assert_eq!(listing(&j.ann()), before);
    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn over_long_paths_and_names_are_refused_by_every_command() {
    let j = Jail::start().await;
    let mut tx = j.tx("ann").await;
    let max_path = j.s.config.limits.max_path;
    let long_path = "a/".repeat(max_path / 2 + 10);
    let long_dots = "../".repeat(max_path / 3 + 10);
    let long_name = "n".repeat(256);
    let nested_long_name = format!("sub/{}", "m".repeat(300));
    every_command_refused(
        &mut tx,
        &[&long_path, &long_dots, &long_name, &nested_long_name],
        501,
    )
    .await;

    // 255 bytes is the longest name there is; it works.
    let ok_name = "n".repeat(255);
    j.made_as_named(&mut tx, &[&ok_name]).await;

    // The folded path counts, not only the argument: a short name below a
    // deep working directory is refused once the whole is too long.
    let part = "d".repeat(250);
    let depth = max_path / (part.len() + 1);
    let deep: PathBuf = std::iter::repeat_n(part.as_str(), depth).collect();
    // Longer than PATH_MAX from the host's root, so made relative to the home.
    cap_std::fs::Dir::open_ambient_dir(j.ann(), cap_std::ambient_authority())
        .unwrap()
        .create_dir_all(&deep)
        .unwrap();
    let deep_arg = format!("/{}", deep.to_str().unwrap());
    assert!(deep_arg.len() <= max_path);
    tx.expect(&format!("CWD {deep_arg}"), 257).await;
    tx.expect(&format!("MKD {part}"), 501).await;
    tx.expect(&format!("PUT {part} 4"), 501).await;
    tx.expect(&format!("STAT {part}"), 501).await;
    tx.expect("STAT ..", 213).await;

    tx.expect("NOOP", 200).await;
    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unicode_look_alikes_are_literal_names() {
    let j = Jail::start().await;
    let mut tx = j.tx("ann").await;

    // Fullwidth dots and slashes, the two-dot leader and one-dot leaders are
    // no `..` and no `/`: they name nothing yet.
    every_command_refused(
        &mut tx,
        &[
            "．．/．．/outside.txt",
            "‥/bob/secret.txt",
            "․․/bob/secret.txt",
            "..／bob/secret.txt",
        ],
        550,
    )
    .await;
    reads_refused(
        &mut tx,
        &[
            "．．／bob／secret.txt",
            "‥／outside.txt",
            "..／..／canary.txt",
        ],
    )
    .await;
    j.made_as_named(&mut tx, &["．．", "‥", "․․", "．．／x", "..／x", "﹒﹒"])
        .await;
    assert_eq!(path_in(&tx.expect("CWD ．．", 257).await), "/．．");
    assert_eq!(path_in(&tx.expect("PWD", 257).await), "/．．");
    assert_eq!(path_in(&tx.expect("CWD /‥", 257).await), "/‥");
    tx.expect("CWD /", 257).await;

    // No normalisation: NFC and NFD spellings, and case, are different names.
    for name in ["caf\u{e9}", "cafe\u{301}", "Doc", "doc"] {
        tx.expect(&format!("MKD {name}"), 257).await;
    }
    let names = tx.names(None).await;
    for name in ["caf\u{e9}", "cafe\u{301}", "Doc", "doc"] {
        assert!(
            names.iter().any(|n| n == name),
            "{name} missing in {names:?}"
        );
    }
    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn symlinks_out_of_the_home_are_never_followed() {
    let j = Jail::start().await;
    let bob = j.s.home("bob");
    let outside = j.outside.path().to_path_buf();
    // Links to files outside: absolute, relative, into another user's home.
    let file_links = [
        ("canary", outside.join("canary.txt")),
        ("bobfile", PathBuf::from("../bob/secret.txt")),
        ("varfile", PathBuf::from("../../outside.txt")),
        ("homesfile", PathBuf::from("../canary.txt")),
    ];
    // Links to directories outside, with a file known to be in each.
    let dir_links = [
        ("etc", PathBuf::from("/etc"), "passwd", false),
        ("bob", PathBuf::from("../bob"), "secret.txt", true),
        ("bobabs", bob.clone(), "secret.txt", true),
        ("up", PathBuf::from("../../.."), "var/outside.txt", true),
        ("outdir", outside.clone(), "canary.txt", true),
        (
            "sub/deep",
            PathBuf::from("../../bob/private"),
            "deep.txt",
            true,
        ),
    ];
    for (name, target) in &file_links {
        j.link(name, target);
    }
    for (name, target, _, _) in &dir_links {
        j.link(name, target);
    }
    let mut tx = j.tx("ann").await;

    for (name, _) in &file_links {
        lookups_through_refused(&mut tx, name).await;
        stat_shows_a_link(&mut tx, name).await;
    }
    for (name, _, known, writable_target) in &dir_links {
        tx.expect(&format!("CWD {name}"), 550).await;
        tx.expect(&format!("LIST {name}"), 550).await;
        tx.expect(&format!("HASH {name}"), 550).await;
        tx.expect(&format!("GET {name}"), 550).await;
        tx.expect(&format!("RMD {name}"), 550).await;
        tx.expect(&format!("MKD {name}"), 553).await;
        stat_shows_a_link(&mut tx, name).await;
        let inside = format!("{name}/{known}");
        for line in [
            format!("GET {inside}"),
            format!("HASH {inside}"),
            format!("STAT {inside}"),
            format!("LIST {inside}"),
            format!("CWD {name}/.."),
        ] {
            if line.starts_with("CWD") {
                // Folded lexically before any lookup: `name/..` is the directory holding it.
                tx.expect(&line, 257).await;
                tx.expect("CWD /", 257).await;
            } else {
                tx.expect(&line, 550).await;
            }
        }
        // Writes are only aimed at targets in temp directories, never at the host's /etc.
        if *writable_target {
            for line in [
                format!("MKD {name}/made-through-link"),
                format!("RMD {inside}"),
                format!("DELE {inside}"),
                format!("RENAME {inside} stolen"),
                format!("RENAME mine.txt {name}/planted"),
                format!("RENAME mine.txt {inside}"),
                format!("PUT {name}/planted 4"),
                format!("PUT {inside} 4"),
            ] {
                tx.expect(&line, 550).await;
            }
            let put = tx.put(&format!("{name}/planted"), b"evil").await;
            assert_eq!(code(&put), 550, "{put}");
        }
    }
    assert_eq!(std::fs::read(j.ann().join("mine.txt")).unwrap(), b"mine");

    // The listing shows the links as links and nothing of their targets.
    let listed = tx.lines("LIST").await;
    for (name, _) in &file_links {
        assert!(
            listed
                .iter()
                .any(|l| l.starts_with("213-l 0 ") && l.ends_with(&format!(" {name}"))),
            "{name} in {listed:?}"
        );
    }

    // `rm link` removes the link, never its target.
    for (name, _) in &file_links {
        tx.expect(&format!("DELE {name}"), 200).await;
        assert!(!is_link(&j.ann().join(name)), "{name} still there");
    }
    for (name, target, known, _) in &dir_links {
        tx.expect(&format!("DELE {name}"), 200).await;
        assert!(!is_link(&j.ann().join(name)), "{name} still there");
        let target = if target.is_relative() {
            j.ann().join(name).parent().unwrap().join(target)
        } else {
            target.clone()
        };
        assert!(target.join(known).is_file(), "{}", target.display());
    }
    assert!(bob.join("secret.txt").is_file());
    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_onto_a_symlink_never_writes_its_target() {
    let j = Jail::start().await;
    j.link("canary", j.outside.path().join("canary.txt"));
    j.link("bobfile", "../bob/secret.txt");
    j.link("dangling", "../newfile");
    j.link("dangabs", j.outside.path().join("newfile"));
    let mut tx = j.tx("ann").await;
    for name in ["canary", "bobfile", "dangling", "dangabs"] {
        let reply = tx.put(name, b"overwritten").await;
        // Either refused, or stored in the home in place of the link.
        if code(&reply) == 226 {
            let m = std::fs::symlink_metadata(j.ann().join(name)).unwrap();
            assert!(m.is_file(), "{name} is still a link after {reply}");
            assert_eq!(std::fs::read(j.ann().join(name)).unwrap(), b"overwritten");
        } else {
            assert!(code(&reply) >= 400, "{name}: {reply}");
        }
    }
    assert!(!j.var().join("homes/newfile").exists());
    assert!(!j.outside.path().join("newfile").exists());
    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn symlink_as_an_intermediate_component() {
    let j = Jail::start().await;
    j.link("d", "..");
    j.link("sub/q", "..");
    j.link("dd", "sub/q/..");
    j.link("sub/qq", "q/../..");
    let mut tx = j.tx("ann").await;

    // `d -> ..` leads to the homes directory: every use is refused.
    every_command_refused(
        &mut tx,
        &["d/x", "d/bob/secret.txt", "d/bob", "d/ann/mine.txt"],
        550,
    )
    .await;
    let put = tx.put("d/x", b"evil").await;
    assert_eq!(code(&put), 550, "{put}");
    let put = tx.put("d/bob/x", b"evil").await;
    assert_eq!(code(&put), 550, "{put}");
    tx.expect("CWD d", 550).await;
    tx.expect("LIST d", 550).await;

    // `dd -> sub/q/..` and `sub/qq -> q/../..` climb above the home through an in-home link.
    for link in ["dd", "sub/qq"] {
        tx.expect(&format!("CWD {link}"), 550).await;
        tx.expect(&format!("LIST {link}"), 550).await;
        every_command_refused(
            &mut tx,
            &[format!("{link}/x"), format!("{link}/bob/secret.txt")],
            550,
        )
        .await;
    }

    // `sub/q -> ..` stays in the home: if it is followed, it shows ann's own files.
    let reply = tx.ask("LIST sub/q").await;
    if code(&reply) == 213 {
        assert_eq!(tx.names(Some("sub/q")).await, tx.names(Some("/")).await);
        let made = tx.ask("MKD sub/q/made").await;
        assert!(
            code(&made) >= 400 || j.ann().join("made").is_dir(),
            "{made}"
        );
    } else {
        assert!(code(&reply) >= 400, "{reply}");
    }

    assert!(!j.var().join("homes/x").exists());
    assert!(!j.s.home("bob").join("x").exists());
    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dangling_links_lead_nowhere() {
    let j = Jail::start().await;
    j.link("dangling", "../newfile");
    j.link("dangdir", "../newdir/x");
    j.link("dangabs", j.outside.path().join("newfile"));
    j.link("dangin", "not-yet");
    let mut tx = j.tx("ann").await;
    for name in ["dangling", "dangdir", "dangabs", "dangin"] {
        lookups_through_refused(&mut tx, name).await;
        tx.expect(&format!("MKD {name}"), 553).await;
        stat_shows_a_link(&mut tx, name).await;
    }
    for name in ["dangling", "dangdir", "dangabs", "dangin"] {
        tx.expect(&format!("DELE {name}"), 200).await;
        assert!(!is_link(&j.ann().join(name)));
    }
    assert!(!j.var().join("homes/newfile").exists());
    assert!(!j.var().join("homes/newdir").exists());
    assert!(!j.outside.path().join("newfile").exists());
    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rm_and_mv_of_a_link_act_on_the_link_only() {
    let j = Jail::start().await;
    let outside = j.outside.path().to_path_buf();
    j.link("f", outside.join("canary.txt"));
    j.link("dir", &outside);
    j.link("inl", "mine.txt");
    j.link("indir", "sub");
    let mut tx = j.tx("ann").await;

    // In-home links may be followed; they never lead out.
    tx.expect("RMD indir", 550).await;
    tx.expect("RMD dir", 550).await;
    assert!(j.ann().join("sub/inner.txt").is_file());

    tx.expect("RENAME dir moved", 200).await;
    assert!(is_link(&j.ann().join("moved")));
    assert!(outside.join("canary.txt").is_file());
    tx.expect("DELE moved", 200).await;
    tx.expect("DELE f", 200).await;
    tx.expect("DELE inl", 200).await;
    tx.expect("DELE indir", 200).await;
    for name in ["moved", "f", "inl", "indir"] {
        assert!(!is_link(&j.ann().join(name)), "{name}");
    }
    assert_eq!(std::fs::read(j.ann().join("mine.txt")).unwrap(), b"mine");
    assert_eq!(
        std::fs::read(j.ann().join("sub/inner.txt")).unwrap(),
        b"inner"
    );
    assert!(outside.join("deep/canary.txt").is_file());
    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fifos_and_devices_are_refused_without_blocking() {
    let j = Jail::start().await;
    let fifo = std::ffi::CString::new(j.ann().join("fifo").as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    j.link("fifolink", "fifo");
    // A /dev/zero look-alike, where the system lets us make one.
    let zero = std::ffi::CString::new(j.ann().join("zero").as_os_str().as_bytes()).unwrap();
    let have_device =
        unsafe { libc::mknod(zero.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 5)) } == 0;

    let mut tx = j.tx("ann").await;
    let mut specials = vec!["fifo", "fifolink"];
    if have_device {
        specials.push("zero");
    }
    for name in &specials {
        let started = std::time::Instant::now();
        tx.expect(&format!("GET {name}"), 550).await;
        tx.expect(&format!("HASH {name}"), 550).await;
        assert!(started.elapsed() < HANG_GUARD);
    }
    let stat = tx.expect("STAT fifo", 213).await;
    assert!(stat.starts_with("213 o 0 "), "{stat}");
    let listed = tx.lines("LIST").await;
    assert!(
        listed
            .iter()
            .any(|l| l.starts_with("213-o 0 ") && l.ends_with(" fifo")),
        "{listed:?}"
    );
    // The real client fails cleanly too, and the session goes on.
    let mut c = j.s.login("ann").await;
    for name in &specials {
        let got = tokio::time::timeout(HANG_GUARD, get_bytes(&mut c, name))
            .await
            .expect("GET of a special file hung");
        assert_eq!(got, Err(550), "{name}");
    }
    assert_eq!(get_bytes(&mut c, "mine.txt").await.unwrap(), b"mine");
    tx.expect("NOOP", 200).await;
    c.quit().await;
    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_tenant_cannot_reach_another() {
    let j = Jail::start().await;
    let bob = j.s.home("bob");
    let bob_before = listing(&bob);
    let mut tx = j.tx("ann").await;
    every_command_refused(
        &mut tx,
        &[
            "/../bob/secret.txt",
            "../bob/secret.txt",
            "../../homes/bob/secret.txt",
            "../bob/private/deep.txt",
            "../bob/private",
        ],
        550,
    )
    .await;
    for line in [
        "LIST ../bob",
        "CWD ../bob",
        "STAT ../bob",
        "RMD ../bob",
        "RENAME mine.txt ../bob/mine.txt",
        "RENAME sub ../bob/sub",
        "PUT ../bob/x 4",
        "MKD ../bob/private/x",
        "DELE ../bob/private/deep.txt",
    ] {
        tx.expect(line, 550).await;
    }
    let put = tx.put("../bob/x", b"evil").await;
    assert_eq!(code(&put), 550, "{put}");
    assert_eq!(listing(&bob), bob_before);

    // Through the shell and the real client the answer is the same.
    let cli = tempfile::tempdir().unwrap();
    let out = j.shell(cli.path(), "get ../bob/secret.txt stolen.txt");
    assert_ne!(out.status, 0);
    assert!(!cli.path().join("stolen.txt").exists());
    j.canaries.assert_not_in(&out.stdout);
    j.canaries.assert_not_in(&out.stderr);
    let out = j.shell(cli.path(), "ls ../bob");
    assert_ne!(out.status, 0);
    assert!(!out.stdout.contains("secret.txt"), "{}", out.stdout);

    // bob still has exactly his own files.
    let mut b = j.tx("bob").await;
    assert_eq!(b.names(None).await, ["private", "secret.txt"]);
    drop(b);
    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn degenerate_names() {
    let j = Jail::start().await;
    let mut tx = j.tx("ann").await;

    for (line, want) in [
        ("MKD .", 553),
        ("MKD ..", 553),
        ("MKD /", 553),
        ("MKD //", 553),
        ("MKD \"\"", 501),
        ("DELE /", 550),
        ("DELE .", 550),
        ("DELE ..", 550),
        ("DELE //", 550),
        ("DELE \"\"", 501),
        ("RMD /", 550),
        ("RMD .", 550),
        ("RMD ..", 550),
        ("RMD /./", 550),
        ("RMD \"\"", 501),
        ("RENAME / x", 550),
        ("RENAME . x", 550),
        ("RENAME .. x", 550),
        ("RENAME mine.txt /", 501),
        ("RENAME sub sub/x", 501),
        ("RENAME sub /", 501),
        ("RENAME \"\" x", 501),
        ("RENAME mine.txt \"\"", 501),
        ("PUT / 4", 550),
        ("PUT . 4", 550),
        ("PUT // 4", 550),
        ("PUT sub 4", 550),
        ("PUT sub/ 4", 550),
        ("PUT \"\" 4", 501),
        ("GET /", 550),
        ("GET .", 550),
        ("GET sub/", 550),
        ("GET \"\"", 501),
        ("HASH /", 550),
        ("HASH \"\"", 501),
        ("STAT \"\"", 501),
        ("CWD \"\"", 501),
        ("LIST \"\"", 501),
        ("CWD mine.txt", 550),
        ("CWD mine.txt/", 550),
    ] {
        tx.expect(line, want).await;
    }

    // Trailing slashes, `//` and `.` fold away.
    for arg in ["/", "//", "/./", "."] {
        let stat = tx.expect(&format!("STAT {arg}"), 213).await;
        assert!(stat.starts_with("213 d 0 "), "{arg}: {stat}");
    }
    for arg in ["sub/", "//sub//", "sub/.", "./sub/./"] {
        let stat = tx.expect(&format!("STAT {arg}"), 213).await;
        assert!(
            stat.starts_with("213 d ") && stat.ends_with(" sub"),
            "{arg}: {stat}"
        );
    }
    for arg in ["sub/./inner.txt", "//sub//inner.txt", "/sub/x/../inner.txt"] {
        let stat = tx.expect(&format!("STAT {arg}"), 213).await;
        assert!(
            stat.starts_with("213 f 5 ") && stat.ends_with(" inner.txt"),
            "{arg}: {stat}"
        );
    }
    assert_eq!(path_in(&tx.expect("CWD //", 257).await), "/");
    assert_eq!(path_in(&tx.expect("CWD sub/", 257).await), "/sub");
    assert_eq!(path_in(&tx.expect("CWD /sub/./", 257).await), "/sub");
    // The working directory (or one above it) can't be removed from under the session.
    tx.expect("RMD .", 501).await;
    tx.expect("RMD /sub", 501).await;
    tx.expect("CWD /", 257).await;
    assert_eq!(path_in(&tx.expect("MKD ...", 257).await), "/...");
    assert!(j.ann().join("...").is_dir());
    tx.expect("RMD ...", 200).await;
    assert_eq!(path_in(&tx.expect("MKD a/", 257).await), "/a");
    assert_eq!(path_in(&tx.expect("MKD a/./b", 257).await), "/a/b");
    tx.expect("MKD //a//b//", 553).await;
    assert!(j.ann().join("a/b").is_dir());
    tx.expect("RMD a/b/", 200).await;
    tx.expect("RMD a", 200).await;

    // Nothing of the home was lost.
    assert!(j.ann().is_dir());
    assert_eq!(listing(&j.ann()), ["mine.txt", "sub"]);
    assert_eq!(std::fs::read(j.ann().join("mine.txt")).unwrap(), b"mine");
    assert_eq!(
        std::fs::read(j.ann().join("sub/inner.txt")).unwrap(),
        b"inner"
    );
    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_users_at_once_each_see_only_their_own_files() {
    let j = Jail::start_acting(&["ann", "bob"]).await;
    let mut ann = j.tx("ann").await;
    let mut bob = j.tx("bob").await;
    let bob_before = bob.names(None).await;

    // Same names, different contents, interleaved.
    assert_eq!(code(&ann.put("same.txt", b"ann's").await), 226);
    assert_eq!(code(&bob.put("same.txt", b"bob's version").await), 226);
    ann.expect("MKD annonly", 257).await;
    bob.expect("MKD bobonly", 257).await;
    ann.expect("MKD shared-name", 257).await;
    bob.expect("MKD shared-name", 257).await;

    assert_eq!(
        ann.names(None).await,
        ["annonly", "mine.txt", "same.txt", "shared-name", "sub"]
    );
    let mut want_bob: Vec<String> = bob_before.clone();
    want_bob.extend(["bobonly", "same.txt", "shared-name"].map(String::from));
    want_bob.sort();
    assert_eq!(bob.names(None).await, want_bob);
    assert_eq!(
        ann.expect("HASH same.txt", 213).await,
        format!("213 {}", hex(b"ann's"))
    );
    assert_eq!(
        bob.expect("HASH same.txt", 213).await,
        format!("213 {}", hex(b"bob's version"))
    );
    ann.expect("STAT bobonly", 550).await;
    bob.expect("STAT annonly", 550).await;
    bob.expect("STAT mine.txt", 550).await;
    ann.expect("DELE secret.txt", 550).await;

    // The real client downloads each one's own file.
    let mut ca = j.s.login("ann").await;
    let mut cb = j.s.login("bob").await;
    assert_eq!(get_bytes(&mut ca, "same.txt").await.unwrap(), b"ann's");
    assert_eq!(
        get_bytes(&mut cb, "same.txt").await.unwrap(),
        b"bob's version"
    );
    assert_eq!(get_bytes(&mut ca, "secret.txt").await, Err(550));

    assert_eq!(std::fs::read(j.ann().join("same.txt")).unwrap(), b"ann's");
    assert_eq!(
        std::fs::read(j.s.home("bob").join("same.txt")).unwrap(),
        b"bob's version"
    );
    ca.quit().await;
    cb.quit().await;
    j.finish(vec![ann, bob]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_user_in_two_sessions_sees_the_other_sessions_changes() {
    let j = Jail::start().await;
    let mut a = j.tx("ann").await;
    let mut b = j.tx("ann").await;

    a.expect("MKD shared", 257).await;
    assert!(b.names(None).await.contains(&"shared".to_string()));
    assert_eq!(code(&b.put("shared/f.txt", &data(100, 1)).await), 226);
    let stat = a.expect("STAT shared/f.txt", 213).await;
    assert!(stat.starts_with("213 f 100 "), "{stat}");
    assert_eq!(
        a.expect("HASH shared/f.txt", 213).await,
        format!("213 {}", hex(&data(100, 1)))
    );
    // Both sessions count against the same quota.
    let used = |r: &str| -> u64 { r[4..].split(' ').next().unwrap().parse().unwrap() };
    let qa = a.expect("QUOTA", 213).await;
    let qb = b.expect("QUOTA", 213).await;
    assert_eq!(used(&qa), used(&qb));
    assert_eq!(used(&qa), 4 + 5 + 100);

    b.expect("RENAME shared/f.txt shared/g.txt", 200).await;
    a.expect("STAT shared/f.txt", 550).await;
    a.expect("STAT shared/g.txt", 213).await;
    a.expect("CWD shared", 257).await;
    assert_eq!(a.names(None).await, ["g.txt"]);
    b.expect("DELE shared/g.txt", 200).await;
    assert!(a.names(None).await.is_empty());
    // b may remove the directory a is in; a is then told it is gone.
    b.expect("RMD shared", 200).await;
    assert_eq!(path_in(&a.expect("PWD", 257).await), "/shared");
    a.expect("LIST", 550).await;
    a.expect("MKD x", 550).await;
    assert_eq!(path_in(&a.expect("CWD /", 257).await), "/");
    assert_eq!(used(&a.expect("QUOTA", 213).await), 4 + 5);
    assert!(!j.ann().join("shared").exists());
    j.finish(vec![a, b]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_in_flight_are_invisible_to_the_user() {
    let j = Jail::start().await;
    let mut a = j.tx("ann").await;
    let mut b = j.tx("ann").await;
    let body = data(300_000, 3);
    // Chunks of 64 KiB: the first two now, the rest once the checks are done.
    let reply = a.ask(&format!("PUT big.bin {} 65536", body.len())).await;
    assert_eq!(code(&reply), 150, "{reply}");
    let chunk = |at: usize, len: usize| {
        let part = &body[at..at + len];
        let mut out = FrameHeader {
            kind: FrameKind::Chunk,
            offset: at as u64,
            len: len as u32,
            hash: ftpx::transfer::chunk_hash(body.len() as u64, at as u64, part),
        }
        .encode()
        .to_vec();
        out.extend_from_slice(part);
        out
    };
    let mut first = FrameHeader::start(0).encode().to_vec();
    first.extend(chunk(0, 65_536));
    first.extend(chunk(65_536, 65_536));
    a.raw.send(&first).await;

    // Wait until the server holds part of the upload in its staging area.
    let staging = j.var().join("partial/ann");
    let deadline = std::time::Instant::now() + HANG_GUARD;
    loop {
        let held = std::fs::read_dir(&staging)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                e.path().extension().is_some_and(|x| x == "part")
                    && e.metadata().is_ok_and(|m| m.len() >= 131_072)
            });
        if held {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no partial upload appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The other session sees nothing of it and cannot touch it.
    assert_eq!(b.names(None).await, ["mine.txt", "sub"]);
    for line in [
        "STAT big.bin",
        "HASH big.bin",
        "GET big.bin",
        "LIST big.bin",
    ] {
        b.expect(line, 550).await;
    }
    for line in ["PUT big.bin 5", "DELE big.bin", "RENAME big.bin other.bin"] {
        b.expect(line, 450).await;
    }
    reads_refused(
        &mut b,
        &[
            "../partial",
            "../../partial/ann",
            "/partial/ann",
            "../ann/big.bin",
        ],
    )
    .await;

    // Finished, it appears whole.
    let mut rest = chunk(131_072, 65_536);
    rest.extend(chunk(196_608, 65_536));
    rest.extend(chunk(262_144, 300_000 - 262_144));
    rest.extend_from_slice(&FrameHeader::end(body.len() as u64, blake3::hash(&body)).encode());
    a.raw.send(&rest).await;
    let done = a.raw.reply().await.unwrap();
    assert_eq!(done, format!("226 {} {}", hex(&body), body.len()));
    assert_eq!(
        b.expect("HASH big.bin", 213).await,
        format!("213 {}", hex(&body))
    );
    assert_eq!(b.names(None).await, ["big.bin", "mine.txt", "sub"]);
    j.finish(vec![a, b]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn symlink_swap_race_never_escapes() {
    let mut j = Jail::start().await;
    let race = j.outside.path().join("race");
    let race_canaries = Canaries::plant(&[race.join("x"), race.join("secret")]);
    std::fs::create_dir(j.ann().join("a")).unwrap();
    std::fs::write(j.ann().join("a/x"), b"inside").unwrap();
    j.link("b", &race);
    j.before = j.snapshot();

    // A helper thread swaps the real directory `a` and the link `b -> outside`
    // atomically, over and over, while the client works on `a`.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cstr = |p: PathBuf| std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let (pa, pb) = (cstr(j.ann().join("a")), cstr(j.ann().join("b")));
    let flag = stop.clone();
    let swapper = std::thread::spawn(move || {
        let mut swaps = 0u64;
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let r = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    pa.as_ptr(),
                    libc::AT_FDCWD,
                    pb.as_ptr(),
                    libc::RENAME_EXCHANGE,
                )
            };
            assert_eq!(r, 0, "renameat2: {}", std::io::Error::last_os_error());
            swaps += 1;
        }
        swaps
    });

    let mut tx = j.tx("ann").await;
    let inside = format!("213 {}", hex(b"inside"));
    let started = std::time::Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_millis(1500) || rounds < 20 {
        assert!(started.elapsed() < HANG_GUARD, "only {rounds} rounds");
        let h = tx.ask("HASH a/x").await;
        assert!(h == inside || code(&h) >= 400, "{h}");
        let st = tx.ask("STAT a/x").await;
        assert!(st.starts_with("213 f 6 ") || code(&st) >= 400, "{st}");
        for line in tx.lines("LIST a").await {
            assert!(!line.contains("secret"), "{line}");
        }
        let put = tx.put("a/new", b"data").await;
        assert!(code(&put) == 226 || code(&put) >= 400, "{put}");
        let _ = tx.ask("MKD a/m").await;
        let _ = tx.ask("RMD a/m").await;
        let _ = tx.ask("DELE a/new").await;
        let _ = tx.ask("RENAME a/x a/y").await;
        let _ = tx.ask("RENAME a/y a/x").await;
        rounds += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 0, "{rounds} rounds, {swaps} swaps");

    race_canaries.assert_intact();
    race_canaries.assert_not_in(&tx.seen);
    for name in ["new", "m", "y"] {
        assert!(!race.join(name).exists(), "{name} was made outside");
    }
    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_home_replaced_by_a_symlink_is_never_entered() {
    let mut j = Jail::start_acting(&["ann", "ann-old"]).await;
    let outside = j.outside.path().to_path_buf();
    // A home that is a symlink at login is refused.
    j.s.add_user("cat", 1 << 20);
    std::fs::remove_dir(j.s.home("cat")).unwrap();
    symlink(&outside, j.s.home("cat")).unwrap();
    j.before = j.snapshot();
    let mut raw = Raw::connect(&j.s).await;
    let reply = raw.ask(&format!("LOGIN cat \"{PASSWORD}\"")).await;
    assert!(code(&reply) >= 400, "{reply}");
    assert!(raw.ask("LIST").await.starts_with("530"));
    j.canaries.assert_not_in(&reply);

    // A home swapped for a symlink under an open session: the session keeps
    // its own directory or fails, and never reaches the link's target.
    let mut tx = j.tx("ann").await;
    std::fs::rename(j.ann(), j.s.home("ann-old")).unwrap();
    symlink(&outside, j.ann()).unwrap();
    let listed = tx.lines("LIST").await;
    assert!(!listed.iter().any(|l| l.contains("canary")), "{listed:?}");
    let hash = tx.ask("HASH canary.txt").await;
    assert!(code(&hash) >= 400, "{hash}");
    let put = tx.put("new.txt", b"data").await;
    assert!(code(&put) == 226 || code(&put) >= 400, "{put}");
    let _ = tx.ask("MKD made").await;
    assert!(!outside.join("new.txt").exists());
    assert!(!outside.join("made").exists());

    // A fresh login now meets the symlink and is refused.
    let mut again = Raw::connect(&j.s).await;
    let reply = again.ask(&format!("LOGIN ann \"{PASSWORD}\"")).await;
    assert!(code(&reply) >= 400, "{reply}");
    drop((raw, again));
    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn symlink_loops_fail_cleanly() {
    let j = Jail::start().await;
    j.link("loop", "loop");
    j.link("l1", "l2");
    j.link("l2", "l1");
    j.link("sub/up", "../sub/up/x");
    let mut tx = j.tx("ann").await;
    for name in ["loop", "l1", "sub/up"] {
        lookups_through_refused(&mut tx, name).await;
        tx.expect(&format!("STAT {name}/x"), 550).await;
        stat_shows_a_link(&mut tx, name).await;
    }
    // The home is still listed, links shown as links.
    let names = tx.names(None).await;
    assert_eq!(names, ["l1", "l2", "loop", "mine.txt", "sub"]);
    for name in ["loop", "l1", "l2", "sub/up"] {
        tx.expect(&format!("DELE {name}"), 200).await;
    }
    j.finish(vec![tx]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_names_planted_in_a_home_cannot_forge_reply_lines() {
    let j = Jail::start().await;
    let hostile = [
        "evil\n213 0 entries",
        "x\r\n230 logged in",
        "\u{1b}[2Jclear",
        "tab\there",
        "quote\"d",
    ];
    for name in hostile {
        std::fs::write(j.ann().join(name), b"h").unwrap();
    }
    let mut tx = j.tx("ann").await;
    let lines = tx.lines("LIST").await;
    let entries = 2 + hostile.len();
    assert_eq!(lines.len(), entries + 1, "{lines:?}");
    assert_eq!(lines[entries], format!("213 {entries} entries"));
    for line in &lines[..entries] {
        assert!(line.starts_with("213-"), "{line:?}");
        assert!(!line.contains('\r') && !line.contains('\u{1b}'), "{line:?}");
    }
    // Each name comes back as one quoted word, control characters written as
    // `\u{..}` escapes, never raw.
    let names = tx.names(None).await;
    for name in hostile {
        let shown: String = name
            .chars()
            .map(|c| {
                if c.is_control() {
                    format!("\\u{{{:x}}}", c as u32)
                } else {
                    c.to_string()
                }
            })
            .collect();
        assert!(names.contains(&shown), "{shown:?} not in {names:?}");
    }
    j.finish(vec![tx]).await;
}
