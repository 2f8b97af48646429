//! The client library: one TLS session to a server, its requests, and the
//! client half of verified, resumable transfers. Used by the `connect` shell
//! (`shell`) and by the tests.
//!
//! Client state lives in one directory, [`state_dir`]: the resume journals
//! (`journal/`), the shell history and the client log (`ftpx.log`). A
//! download arrives in a hidden partial file beside its target,
//! `.NAME.ftpx-part`, and is renamed onto the target only after its
//! whole-file hash matched.

mod connect;
mod download;
mod error;
mod reply;
pub mod shell;
mod upload;

pub use download::{Arrival, AskedGet, MAX_DOWNLOAD, Writing};
pub use error::{ClientError, Result};
pub use reply::{
    Listing, MAX_LIST_BYTES, MAX_LIST_ENTRIES, MAX_REPLY_BYTES, MAX_REPLY_LINE, MAX_REPLY_LINES,
    Reply, ReplyLimit, unquote,
};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::info;

use crate::protocol::Request;
use crate::protocol::VPath;
use crate::tls::Trust;
use crate::transfer::Checkpoints;
use crate::transfer::connection::Connection;

/// Where the client keeps journals, history and its log:
/// `$FTPX_STATE_DIR`, else `$XDG_STATE_HOME/ftpx`, else `~/.local/state/ftpx`.
/// Resolved once, at the first call (the client's start), to an absolute
/// path: an `lcd` later does not move it.
pub fn state_dir() -> PathBuf {
    static STATE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    STATE
        .get_or_init(|| {
            let dir = if let Some(d) = std::env::var_os("FTPX_STATE_DIR").filter(|d| !d.is_empty())
            {
                PathBuf::from(d)
            } else if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
                PathBuf::from(d).join("ftpx")
            } else {
                match std::env::var_os("HOME") {
                    Some(h) => PathBuf::from(h).join(".local/state/ftpx"),
                    None => PathBuf::from(".ftpx-state"),
                }
            };
            std::path::absolute(&dir).unwrap_or(dir)
        })
        .clone()
}

/// What was moved, for the caller to print.
#[derive(Debug, Clone)]
pub struct Transferred {
    pub hash: blake3::Hash,
    pub size: u64,
    /// Where the transfer resumed; 0 for a fresh start.
    pub resumed_at: u64,
}

/// How the client transfers: chunk size and checkpoints.
#[derive(Debug, Clone, Copy)]
pub struct TransferOptions {
    pub chunk_size: u64,
    pub checkpoints: Checkpoints,
}

impl Default for TransferOptions {
    fn default() -> Self {
        let t = crate::config::TransferSection::default();
        TransferOptions {
            chunk_size: t.chunk_size.0,
            checkpoints: Checkpoints {
                bytes: t.checkpoint_bytes.0,
                interval: Duration::from_secs(t.checkpoint_secs),
            },
        }
    }
}

pub struct Client {
    conn: Connection<TlsStream<TcpStream>>,
    /// The remote working directory, as the server last reported it.
    cwd: VPath,
    journal_dir: PathBuf,
    pub options: TransferOptions,
    io_timeout: Duration,
    /// Set when the server said it closes the session (421).
    closed: bool,
    /// Set while file data is in flight; still set after a failure there,
    /// when the two ends may be out of step and the session is unusable.
    in_data: bool,
    /// Requests written with [`Client::pipe`] whose replies were not yet
    /// read whole: while there are any, the session is not in step.
    unanswered: usize,
    /// What the client knows of its login: the one place that holds its
    /// outcome (see [`Client::logged_in`]).
    login: Login,
    /// `QUIT` goes out with the next [`Client::flush`]: the request it
    /// sends is the session's last.
    quit_next: bool,
    /// `QUIT` was sent; only its `221` is left to read.
    quit_sent: bool,
}

/// The login of a session.
#[derive(Debug)]
enum Login {
    /// Answered, or never asked for ([`Client::connect`]).
    Done,
    /// Sent with its greeting and reply still to read: they are read before
    /// any other reply. `ahead`: one request went out after it.
    Pending { ahead: bool },
    /// The greeting or the login refused the session, or the connection
    /// failed before they were read.
    Refused(Arc<ClientError>),
}

impl Client {
    /// Opens a TLS session to `host:port`, checking the server's certificate
    /// against `ca_file`, and reads the greeting.
    pub async fn connect(
        host: &str,
        port: u16,
        ca_file: &Path,
        io_timeout: Duration,
    ) -> Result<Client> {
        Client::connect_with(host, port, &Trust::Ca(ca_file.to_path_buf()), io_timeout).await
    }

    /// Like [`Client::connect`], trusting the server as `trust` says.
    pub async fn connect_with(
        host: &str,
        port: u16,
        trust: &Trust,
        io_timeout: Duration,
    ) -> Result<Client> {
        let mut client = Client::open(host, port, trust, io_timeout).await?;
        client.greeted().await?;
        Ok(client)
    }

    /// Like [`Client::connect_with`], then logs in (or registers) with the
    /// `LOGIN` written before the greeting arrives: a round trip less. A
    /// server that refuses the session in its greeting is reported as such.
    pub async fn connect_and_login(
        host: &str,
        port: u16,
        trust: &Trust,
        io_timeout: Duration,
        (user, password, register): (&str, &str, bool),
    ) -> Result<Client> {
        let mut client = Client::open(host, port, trust, io_timeout).await?;
        client.send_login(user, password, register).await?;
        client.read_login().await?;
        Ok(client)
    }

    /// Like [`Client::connect_and_login`], but returns once the `LOGIN` is
    /// sent: the first request goes out without waiting for its reply, and
    /// the greeting and the login's reply are read before that request's
    /// reply (see [`Client::logged_in`]). A script's login and first
    /// command so cost one round trip together.
    pub async fn connect_and_send_login(
        host: &str,
        port: u16,
        trust: &Trust,
        io_timeout: Duration,
        (user, password, register): (&str, &str, bool),
    ) -> Result<Client> {
        let mut client = Client::open(host, port, trust, io_timeout).await?;
        client.send_login(user, password, register).await?;
        client.login = Login::Pending { ahead: false };
        Ok(client)
    }

    /// Writes and sends `LOGIN` (or `REGISTER`), before the greeting came.
    /// Its reply is not counted as [`Client::pipe`]'s: the `login` field
    /// tracks it.
    async fn send_login(&mut self, user: &str, password: &str, register: bool) -> Result<()> {
        self.write_request(&login_request(user, password, register))
            .await?;
        self.flush().await
    }

    /// Reads the greeting and the reply to the login sent before it.
    async fn read_login(&mut self) -> Result<()> {
        self.greeted().await?;
        let reply = self.read_reply_now(ReplyLimit::REPLY).await?;
        if reply.code >= 400 {
            return Err(reply.into_error());
        }
        Ok(())
    }

    /// The outcome of the login: once it was sent with
    /// [`Client::connect_and_send_login`], reads its greeting and reply the
    /// first time (every reply read does so first). A refusal is kept:
    /// this and every later request return it, as [`ClientError::Login`].
    pub async fn logged_in(&mut self) -> Result<()> {
        match &self.login {
            Login::Done => Ok(()),
            Login::Refused(e) => Err(ClientError::Login(e.clone())),
            Login::Pending { .. } => {
                self.login = Login::Done;
                // What is written goes out; if it can't, what the server
                // said before (a greeting that refuses) is still read.
                let _ = self.conn.flush().await;
                match self.read_login().await {
                    Ok(()) => {
                        info!("logged in");
                        Ok(())
                    }
                    Err(e) => {
                        let e = Arc::new(e);
                        self.login = Login::Refused(e.clone());
                        Err(ClientError::Login(e))
                    }
                }
            }
        }
    }

    /// Whether the login's outcome is still to be read.
    pub fn login_pending(&self) -> bool {
        matches!(self.login, Login::Pending { .. })
    }

    /// The refusal of the session, if its login was refused.
    pub fn refusal(&self) -> Option<ClientError> {
        match &self.login {
            Login::Refused(e) => Some(ClientError::Login(e.clone())),
            _ => None,
        }
    }

    /// Writes a request line, not yet sent. While the login's outcome is
    /// still to come, one request goes out with it; the next one waits
    /// for it, so a refused login has at most one request refused behind
    /// it (which the server does not count against the session).
    async fn write_request(&mut self, request: &Request) -> Result<usize> {
        match self.login {
            Login::Pending { ahead: false } => self.login = Login::Pending { ahead: true },
            Login::Pending { ahead: true } | Login::Refused(_) => self.logged_in().await?,
            Login::Done => {}
        }
        let line = request.to_line();
        if let Err(e) = self.conn.write_line(&line).await {
            return Err(self.failed(e.into()).await);
        }
        Ok(line.len() + 1)
    }

    /// An error while the login's outcome is still to come: the session
    /// did not open, and is reported as its login's outcome says.
    async fn failed(&mut self, e: ClientError) -> ClientError {
        if self.login_pending()
            && let Err(refused) = self.logged_in().await
        {
            return refused;
        }
        e
    }

    /// The TLS session, before its greeting.
    async fn open(host: &str, port: u16, trust: &Trust, io_timeout: Duration) -> Result<Client> {
        let (stream, addr) = connect::tls_session(host, port, trust, io_timeout).await?;
        let client = Client {
            conn: Connection::new(stream, io_timeout),
            cwd: VPath::root(),
            journal_dir: state_dir().join("journal"),
            options: TransferOptions::default(),
            in_data: false,
            unanswered: 0,
            login: Login::Done,
            quit_next: false,
            quit_sent: false,
            io_timeout,
            closed: false,
        };
        let cipher = client
            .conn
            .get_ref()
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .map(|c| format!("{:?}", c.suite()))
            .unwrap_or_default();
        info!(server = %addr, cipher = cipher.as_str(), "connected");
        Ok(client)
    }

    /// Reads the greeting: anything but 220 refuses the session.
    async fn greeted(&mut self) -> Result<()> {
        let greeting = self.read_reply_now(ReplyLimit::REPLY).await?;
        if greeting.code != 220 {
            return Err(greeting.into_error());
        }
        Ok(())
    }

    /// Keeps this client's journals in `dir` instead of the state directory.
    pub fn with_journal_dir(mut self, dir: PathBuf) -> Client {
        self.journal_dir = dir;
        self
    }

    /// The raw connection, for tests that must speak the protocol by hand.
    pub fn connection(&mut self) -> &mut Connection<TlsStream<TcpStream>> {
        &mut self.conn
    }

    /// Whether the replies still to come can be read: no file data is
    /// half read and the server did not close (requests may be in flight).
    pub fn in_step(&self) -> bool {
        !self.in_data && !self.closed
    }

    /// Whether the session is in step and can take another request.
    pub fn is_usable(&self) -> bool {
        !self.in_data && !self.closed && self.unanswered == 0
    }

    pub fn cwd(&self) -> &VPath {
        &self.cwd
    }

    pub async fn login(&mut self, user: &str, password: &str, register: bool) -> Result<()> {
        self.request(&login_request(user, password, register))
            .await
            .map(|_| ())
    }

    /// Changes the remote directory and returns the new one.
    pub async fn cd(&mut self, path: Option<&str>) -> Result<String> {
        let reply = self
            .request(&Request::Cwd(path.map(str::to_string)))
            .await?;
        let dir = unquote(&reply.text)?;
        self.cwd = VPath::resolve(&VPath::root(), &dir, usize::MAX)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(dir)
    }

    /// Resolves a remote path against the remote working directory, by the
    /// same rules the server uses.
    pub fn remote_path(&self, arg: &str) -> Result<VPath> {
        VPath::resolve(&self.cwd, arg, usize::MAX).map_err(|e| ClientError::Local(e.to_string()))
    }

    /// Makes the next request the session's last: `QUIT` goes out with it
    /// (at the next [`Client::flush`]), and [`Client::quit`] then only
    /// reads the `221` that follows its reply, no round trip more. For a
    /// command of one request and its reply.
    pub fn quit_with_next(&mut self) {
        self.quit_next = true;
    }

    /// Closes the session politely. Waiting for the `221` costs a round
    /// trip unless `QUIT` went out with the last request
    /// ([`Client::quit_with_next`]), but once it came the server has
    /// logged every request before.
    pub async fn quit(mut self) {
        let sent = self.quit_sent
            || (self.conn.write_line(&Request::Quit.to_line()).await.is_ok()
                && self.conn.flush().await.is_ok());
        if sent {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.read_reply()).await;
        }
        self.conn.shutdown().await;
    }
}

/// `LOGIN`, or `REGISTER` to create the account first.
fn login_request(user: &str, password: &str, register: bool) -> Request {
    let (user, password) = (user.to_string(), password.to_string());
    if register {
        Request::Register { user, password }
    } else {
        Request::Login { user, password }
    }
}
