//! The test harness: a server in this process on 127.0.0.1:0 with its own
//! temp directory, certificates and cheap password hashing; clients for it;
//! and helpers to run the real `ftpx` binary, as a client or as a server
//! that a test can SIGKILL.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ftpx::client::Client;
use ftpx::config::Config;
use ftpx::server::Server;
use ftpx::store::users::{Password, User, UserDb};
use tempfile::TempDir;
use tokio::sync::oneshot;

pub const BIN: &str = env!("CARGO_BIN_EXE_ftpx");
pub const PASSWORD: &str = "correct horse";

/// Settings for tests: cheap scrypt, short failure delay, paths in `dir`.
pub fn test_config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.server.var_dir = dir.join("var");
    c.server.cert_dir = dir.join("certs");
    c.server.log_file = dir.join("var/log/ftpx.log");
    c.server.log_level = "debug".into();
    c.accounts.scrypt_log_n = 4;
    c.accounts.scrypt_r = 1;
    c.accounts.login_failure_delay_ms = 100;
    c
}

/// The same settings as a TOML file, for the binary.
pub fn test_config_toml() -> &'static str {
    "[server]\nlog_level = \"debug\"\n[accounts]\nscrypt_log_n = 4\nscrypt_r = 1\nlogin_failure_delay_ms = 100\n"
}

pub struct TestServer {
    pub dir: TempDir,
    pub addr: SocketAddr,
    pub ca: PathBuf,
    pub config: Config,
    pub server: Arc<Server>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        tweak(&mut config);
        std::fs::create_dir_all(config.homes_dir()).unwrap();
        ftpx::tls::gen_cert(&config.server.cert_dir, &ftpx::tls::default_hosts(), false).unwrap();
        let tls = Arc::new(ftpx::tls::server_config(&config.server.cert_dir).unwrap());
        let server = Arc::new(Server::new(config.clone()).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let s = server.clone();
        let task = tokio::spawn(async move {
            ftpx::server::run(listener, s, tls, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        TestServer {
            ca: config.server.cert_dir.join("ca.pem"),
            dir,
            addr,
            config,
            server,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn users(&self) -> UserDb {
        UserDb::new(&self.config.server.var_dir)
    }

    /// Adds a user with `PASSWORD` and `quota` bytes.
    pub fn add_user(&self, name: &str, quota: u64) {
        let hash =
            ftpx::store::users::hash_password(&Password::new(PASSWORD), &self.config.accounts)
                .unwrap();
        self.users()
            .add(User {
                name: name.into(),
                quota,
                hash,
                created: 0,
                max_files: None,
            })
            .unwrap();
    }

    pub fn home(&self, user: &str) -> PathBuf {
        self.users().home(user)
    }

    /// A connected client that has not logged in.
    pub async fn connect(&self) -> Client {
        let state = self
            .dir
            .path()
            .join(format!("client-state-{}", rand::random::<u32>()));
        Client::connect(
            "127.0.0.1",
            self.addr.port(),
            &self.ca,
            Duration::from_secs(20),
        )
        .await
        .unwrap()
        .with_journal_dir(state)
    }

    /// A client logged in as `user` with `PASSWORD`.
    pub async fn login(&self, user: &str) -> Client {
        let mut c = self.connect().await;
        c.login(user, PASSWORD, false).await.unwrap();
        c
    }

    /// Stops the server and waits for it to drain.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

/// The `ftpx` binary, run in `dir` with its client state under `dir/state`.
pub fn ftpx(dir: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(dir)
        .env("FTPX_STATE_DIR", dir.join("state"))
        .env_remove("FTPX_PASSWORD")
        .stdin(Stdio::null());
    c
}

/// What a finished command printed.
pub struct Output {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    Output {
        status: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `ftpx connect USER@127.0.0.1:PORT -c COMMANDS` in `dir`, password from the environment.
pub fn connect_c(dir: &Path, ca: &Path, port: u16, user: &str, commands: &str) -> Output {
    run(ftpx(dir)
        .args(["connect", &format!("{user}@127.0.0.1:{port}"), "--ca"])
        .arg(ca)
        .args(["-c", commands])
        .env("FTPX_PASSWORD", PASSWORD))
}

/// A real `ftpx serve` process in its own directory.
pub struct BinServer {
    pub dir: PathBuf,
    pub port: u16,
    pub child: Child,
}

impl BinServer {
    /// Starts `ftpx serve` in `dir` (which keeps its state between starts) on `port` (0: any).
    pub fn start(dir: &Path, port: u16) -> BinServer {
        BinServer::start_with_stderr(dir, port, Stdio::null())
    }

    /// [`BinServer::start`], with the server's standard error kept in
    /// `dir/serve.stderr`.
    pub fn start_keeping_stderr(dir: &Path, port: u16) -> BinServer {
        let file = std::fs::File::create(dir.join("serve.stderr")).unwrap();
        BinServer::start_with_stderr(dir, port, Stdio::from(file))
    }

    fn start_with_stderr(dir: &Path, port: u16, stderr: Stdio) -> BinServer {
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        if !dir.join("etc/ftpx.toml").exists() {
            std::fs::write(dir.join("etc/ftpx.toml"), test_config_toml()).unwrap();
        }
        let mut child = Command::new(BIN)
            .current_dir(dir)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening on 127.0.0.1:")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        BinServer {
            dir: dir.to_path_buf(),
            port,
            child,
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("certs/ca.pem")
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> i32 {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap().code().unwrap_or(-1)
    }

    pub fn useradd(&self, name: &str, quota: &str) {
        let out = run(ftpx(&self.dir)
            .args(["useradd", name, "--quota", quota, "--password-stdin"])
            .stdin(write_stdin(&format!("{PASSWORD}\n"))));
        assert_eq!(out.status, 0, "{}", out.stderr);
    }
}

impl Drop for BinServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A stdin that yields `text` (through a temp file).
pub fn write_stdin(text: &str) -> Stdio {
    let mut f = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0)).unwrap();
    Stdio::from(f)
}

/// Deterministic pseudo-random bytes.
pub fn data(len: usize, seed: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = 0x9e37_79b9_u32 ^ u32::from(seed);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// A TLS connection for speaking the protocol by hand: raw lines and bytes.
pub struct Raw {
    pub stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buf: Vec<u8>,
}

impl Raw {
    pub async fn connect(server: &TestServer) -> Raw {
        let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        Raw::over(server, tcp).await
    }

    /// [`Raw::connect`] with a receive buffer of a few KiB: a client that
    /// does not read stalls the server's sending at once.
    pub async fn connect_tight(server: &TestServer) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let tcp = socket.connect(server.addr).await.unwrap();
        Raw::over(server, tcp).await
    }

    async fn over(server: &TestServer, tcp: tokio::net::TcpStream) -> Raw {
        let tls = ftpx::tls::client_config(&server.ca).unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(ftpx::tls::server_name("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut raw = Raw {
            stream,
            buf: vec![],
        };
        assert!(raw.line().await.unwrap().starts_with("220 "));
        raw
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    /// Sends a line and returns the final reply line.
    pub async fn ask(&mut self, line: &str) -> String {
        self.send(format!("{line}\n").as_bytes()).await;
        self.reply().await.unwrap_or_default()
    }

    /// The next line, or None at the end of the stream.
    pub async fn line(&mut self) -> Option<String> {
        read_line(&mut self.stream, &mut self.buf).await
    }

    /// Reads lines up to a final reply line.
    pub async fn reply(&mut self) -> Option<String> {
        loop {
            let line = self.line().await?;
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                return Some(line);
            }
        }
    }

    /// Logs in as `user`.
    pub async fn login(&mut self, user: &str) {
        let r = self.ask(&format!("LOGIN {user} \"{PASSWORD}\"")).await;
        assert!(r.starts_with("230"), "{r}");
    }
}

/// The next line from `stream`, kept in `buf` until whole, or None at the
/// end of the stream (or a reset); fails if the server is silent for 20 s.
pub async fn read_line(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            return Some(String::from_utf8_lossy(&line[..i]).into_owned());
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut chunk))
            .await
            .expect("server did not answer")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A whole SEND request as a client puts it on the wire: the line, then the
/// start, chunk and end frames.
pub fn send_request(path: &str, body: &[u8]) -> Vec<u8> {
    use ftpx::protocol::{FrameHeader, FrameKind};
    let hash = blake3::hash(body);
    let mut wire = format!("SEND {} {}\n", ftpx::protocol::quote(path), body.len()).into_bytes();
    wire.extend_from_slice(&FrameHeader::start(0).encode());
    if !body.is_empty() {
        let chunk = FrameHeader {
            kind: FrameKind::Chunk,
            offset: 0,
            len: body.len() as u32,
            hash: *hash.as_bytes(),
        };
        wire.extend_from_slice(&chunk.encode());
        wire.extend_from_slice(body);
    }
    wire.extend_from_slice(&FrameHeader::end(body.len() as u64, hash).encode());
    wire
}

/// Files planted outside a user's home, each with a unique token; checks
/// that none changed and that no token reached the client.
pub struct Canaries {
    pub files: Vec<(PathBuf, Vec<u8>)>,
    pub token: String,
}

impl Canaries {
    pub fn plant(paths: &[PathBuf]) -> Canaries {
        let token = format!("CANARY-{:016x}", rand::random::<u64>());
        let files = paths
            .iter()
            .map(|p| {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                let content = format!("{token} {}", p.display()).into_bytes();
                std::fs::write(p, &content).unwrap();
                (p.clone(), content)
            })
            .collect();
        Canaries { files, token }
    }

    pub fn assert_intact(&self) {
        for (p, content) in &self.files {
            assert_eq!(
                &std::fs::read(p).unwrap_or_default(),
                content,
                "canary {} changed",
                p.display()
            );
        }
    }

    pub fn assert_not_in(&self, text: &str) {
        assert!(!text.contains(&self.token), "a canary leaked: {text}");
    }
}
