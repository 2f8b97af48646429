//! The client library: one TLS session to a server, its requests, and the
//! client half of verified, resumable transfers. Used by the `connect` shell
//! (`shell.rs`) and by the tests.
//!
//! Client state lives in one directory, [`state_dir`]: the resume journals
//! (`journal/`), the shell history and the client log (`ftpx.log`). A
//! download arrives in a hidden partial file beside its target,
//! `.NAME.ftpx-part`, and is renamed onto the target only after its
//! whole-file hash matched.

pub mod shell;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{info, warn};

use crate::protocol::VPath;
use crate::protocol::{self, Candidate, FrameHeader, ReplyLine, Request};
use crate::tls::Trust;
use crate::transfer::connection::Connection;
use crate::transfer::journal::{self, Journal, Record};
use crate::transfer::{self, Checkpoints, Plan, Stopped, Tree};

// What a server sends is bounded whatever it claims: a reply, a listing and
// a download's plan are checked against these before anything is kept.

/// Longest reply line the client accepts. An honest line is at most a
/// quoted 4096-byte path and a few words.
pub const MAX_REPLY_LINE: usize = 64 * 1024;
/// Bytes of one reply other than a listing, all its lines together.
pub const MAX_REPLY_BYTES: usize = 1 << 20;
/// Continuation lines of one reply other than a listing.
pub const MAX_REPLY_LINES: usize = 1024;
/// Entries of one listing: the server's default `max_list_entries`.
pub const MAX_LIST_ENTRIES: usize = 100_000;
/// Bytes of one listing, all its lines together: [`MAX_LIST_ENTRIES`]
/// lines of the longest entry an honest server writes (a 255-byte name
/// quoted is at most 512 bytes, plus about 50 for the other words).
pub const MAX_LIST_BYTES: usize = 64 << 20;
/// Requests or small uploads sent before their replies are read.
const PIPELINE_WINDOW: usize = 64;
/// Files `send_many` reads ahead of the sending (each at most 1 MiB).
const READ_AHEAD_FILES: usize = 16;

/// How much of one reply the client reads before it gives up on the server.
#[derive(Debug, Clone, Copy)]
pub struct ReplyLimit {
    /// Bytes of all the reply's lines together.
    pub bytes: usize,
    /// Continuation lines.
    pub lines: usize,
}

impl ReplyLimit {
    /// Any reply but a listing.
    pub const REPLY: ReplyLimit = ReplyLimit {
        bytes: MAX_REPLY_BYTES,
        lines: MAX_REPLY_LINES,
    };
    /// The reply to `LIST`.
    pub const LISTING: ReplyLimit = ReplyLimit {
        bytes: MAX_LIST_BYTES,
        lines: MAX_LIST_ENTRIES,
    };

    /// The limit for the reply to `request`.
    pub fn of(request: &Request) -> ReplyLimit {
        match request {
            Request::List(_) => ReplyLimit::LISTING,
            _ => ReplyLimit::REPLY,
        }
    }
}

/// What went wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    /// The server answered with an error reply.
    #[error("{text} ({code})")]
    Server { code: u16, text: String },
    #[error("{0}")]
    Local(String),
    #[error("server broke the protocol: {0}")]
    Protocol(String),
    #[error("connection lost: {0}")]
    Connection(String),
    #[error("{0}")]
    Verify(String),
}

impl ClientError {
    /// Whether reconnecting and running the same transfer again may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Connection(_) | ClientError::Connect { .. } => true,
            // 450: the server still holds the file for a session it has not
            // yet noticed is dead; it lets go within its I/O timeout.
            ClientError::Server { code, .. } => matches!(code, 421 | 450 | 453),
            _ => false,
        }
    }
}

/// What stopped a transfer or the connection, as the client reports it.
impl From<transfer::Error> for ClientError {
    fn from(e: transfer::Error) -> ClientError {
        use transfer::Error as T;
        match e {
            T::Connection(io) => ClientError::Connection(io.to_string()),
            T::Timeout(what) => ClientError::Connection(format!("{what} timed out")),
            T::LineTooLong => ClientError::Protocol("reply line too long".into()),
            T::NotText => ClientError::Protocol("reply is not valid UTF-8".into()),
            T::Protocol(p) => ClientError::Protocol(p),
            // Like the server's 453: the next attempt resumes before it.
            T::BadChunk(at) => ClientError::Server {
                code: 453,
                text: format!("chunk at offset {at} failed its hash check"),
            },
            T::HashMismatch => {
                ClientError::Verify("downloaded file's hash did not match the server's".into())
            }
            T::Aborted => ClientError::Protocol("the server gave up sending the file".into()),
            T::File(io) if transfer::error::disk_full(&io) => {
                ClientError::Local(format!("the local disk is full: {io}"))
            }
            T::File(io) => ClientError::Local(format!("local file: {io}")),
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// A complete reply: its continuation lines and its final line.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub text: String,
    pub lines: Vec<String>,
}

/// One entry of a listing or `STAT` reply: `TYPE SIZE MTIME NAME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `d`, `f`, `l` or `o`.
    pub kind: char,
    pub size: u64,
    /// Unix seconds.
    pub mtime: i64,
    /// As the server sent it: to be checked before any local use, and
    /// escaped before it is printed.
    pub name: String,
}

impl Entry {
    pub fn parse(line: &str) -> Result<Entry> {
        let bad = || ClientError::Protocol(format!("bad listing line {line:?}"));
        let words = protocol::split_commands(line, false).map_err(|_| bad())?;
        let words = words.into_iter().next().ok_or_else(bad)?;
        let [kind, size, mtime, name] = &words[..] else {
            return Err(bad());
        };
        let kind = kind
            .chars()
            .next()
            .filter(|_| kind.len() == 1)
            .ok_or_else(bad)?;
        Ok(Entry {
            kind,
            size: size.parse().map_err(|_| bad())?,
            mtime: mtime.parse().map_err(|_| bad())?,
            name: name.clone(),
        })
    }
}

/// A parsed `LIST` reply.
#[derive(Debug, Clone)]
pub struct Listing {
    pub entries: Vec<Entry>,
    /// The server cut the listing at its own limit.
    pub truncated: bool,
    /// The final line's text (`N entries`).
    pub text: String,
}

/// Where the client keeps journals, history and its log:
/// `$FTPX_STATE_DIR`, else `$XDG_STATE_HOME/ftpx`, else `~/.local/state/ftpx`.
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FTPX_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("ftpx");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/state/ftpx"),
        None => PathBuf::from(".ftpx-state"),
    }
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
        let name = crate::tls::server_name(host).map_err(ClientError::Setup)?;
        let addr = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let (tls, pin) = match trust {
            Trust::Ca(ca_file) => (
                crate::tls::client_config(ca_file).map_err(ClientError::Setup)?,
                None,
            ),
            Trust::Pinned(known_hosts) => {
                let (config, verifier) = crate::tls::pinned_client_config(known_hosts, &addr)
                    .map_err(ClientError::Setup)?;
                let first = crate::tls::pinned_fingerprint(known_hosts, &addr)
                    .map_err(ClientError::Setup)?
                    .is_none();
                (config, first.then_some((verifier, known_hosts)))
            }
        };
        let tcp = tokio::time::timeout(io_timeout, TcpStream::connect(&addr))
            .await
            .map_err(|_| ClientError::Connect {
                addr: addr.clone(),
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let stream = tokio::time::timeout(
            io_timeout,
            TlsConnector::from(Arc::new(tls)).connect(name, tcp),
        )
        .await
        .map_err(|_| ClientError::Tls {
            addr: addr.clone(),
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| ClientError::Tls {
            addr: addr.clone(),
            source,
        })?;
        if stream.get_ref().1.alpn_protocol() != Some(protocol::ALPN) {
            return Err(ClientError::Protocol(
                "server did not agree to the ftpx protocol (ALPN)".into(),
            ));
        }
        if let Some((verifier, known_hosts)) = pin {
            // First contact, and the server proved it holds the key: pin it.
            let presented = verifier
                .presented
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(fp) = presented {
                crate::tls::pin(known_hosts, &addr, &fp).map_err(ClientError::Setup)?;
                eprintln!(
                    "ftpx: first contact with {addr}; pinned its certificate {fp} in {}",
                    known_hosts.display()
                );
                info!(server = %addr, fingerprint = %fp, "pinned server certificate");
            }
        }
        let mut client = Client {
            conn: Connection::new(stream, io_timeout),
            cwd: VPath::root(),
            journal_dir: state_dir().join("journal"),
            options: TransferOptions::default(),
            in_data: false,
            io_timeout,
            closed: false,
        };
        let greeting = client.read_reply().await?;
        if greeting.code != 220 {
            return Err(ClientError::Server {
                code: greeting.code,
                text: greeting.text,
            });
        }
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

    /// Keeps this client's journals in `dir` instead of the state directory.
    pub fn with_journal_dir(mut self, dir: PathBuf) -> Client {
        self.journal_dir = dir;
        self
    }

    /// The raw connection, for tests that must speak the protocol by hand.
    pub fn connection(&mut self) -> &mut Connection<TlsStream<TcpStream>> {
        &mut self.conn
    }

    /// Whether the session is in step and can take another request.
    pub fn is_usable(&self) -> bool {
        !self.in_data && !self.closed
    }

    pub fn cwd(&self) -> &VPath {
        &self.cwd
    }

    /// Reads one whole reply of at most [`ReplyLimit::REPLY`].
    pub async fn read_reply(&mut self) -> Result<Reply> {
        self.read_reply_within(ReplyLimit::REPLY).await
    }

    /// Reads one whole reply; a longer one is a protocol error.
    pub async fn read_reply_within(&mut self, limit: ReplyLimit) -> Result<Reply> {
        let mut lines = vec![];
        let (code, text) = self
            .read_reply_lines(limit, |line| {
                lines.push(line);
                Ok(())
            })
            .await?;
        Ok(Reply { code, text, lines })
    }

    /// Reads one reply, handing each continuation line's text to `each` as
    /// it arrives, and returns the final line's code and text. Past `limit`
    /// the reply is a protocol error, and the session is out of step.
    async fn read_reply_lines(
        &mut self,
        limit: ReplyLimit,
        mut each: impl FnMut(String) -> Result<()>,
    ) -> Result<(u16, String)> {
        let (mut count, mut bytes) = (0usize, 0usize);
        loop {
            // A server that goes silent mid-reply counts as a lost connection.
            let line = tokio::time::timeout(self.io_timeout, self.conn.read_line(MAX_REPLY_LINE))
                .await
                .map_err(|_| ClientError::Connection("no reply from the server".into()))??
                .ok_or_else(|| ClientError::Connection("server closed the connection".into()))?;
            bytes += line.len() + 1;
            if bytes > limit.bytes {
                return Err(ClientError::Protocol(format!(
                    "reply longer than {} bytes",
                    limit.bytes
                )));
            }
            let reply = ReplyLine::parse(&line)
                .ok_or_else(|| ClientError::Protocol(format!("bad reply line {line:?}")))?;
            if reply.last {
                self.closed |= reply.code == 421;
                return Ok((reply.code, reply.text));
            }
            count += 1;
            if count > limit.lines {
                return Err(ClientError::Protocol(format!(
                    "reply longer than {} lines",
                    limit.lines
                )));
            }
            each(reply.text)?;
        }
    }

    /// Sends a request and returns its reply; an error reply is an error.
    pub async fn request(&mut self, request: &Request) -> Result<Reply> {
        self.conn.write_line(&request.to_line()).await?;
        self.conn.flush().await?;
        let reply = self.read_reply_within(ReplyLimit::of(request)).await?;
        if reply.code >= 400 {
            return Err(ClientError::Server {
                code: reply.code,
                text: reply.text,
            });
        }
        Ok(reply)
    }

    pub async fn login(&mut self, user: &str, password: &str, register: bool) -> Result<()> {
        let (user, password) = (user.to_string(), password.to_string());
        let request = if register {
            Request::Register { user, password }
        } else {
            Request::Login { user, password }
        };
        self.request(&request).await.map(|_| ())
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

    /// Closes the session politely.
    pub async fn quit(mut self) {
        if self.conn.write_line(&Request::Quit.to_line()).await.is_ok()
            && self.conn.flush().await.is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.read_reply()).await;
        }
        self.conn.shutdown().await;
    }

    /// Sends `requests` without waiting between them and hands each reply,
    /// in order, to `each` with its request's index; an error reply is an
    /// `Err` there. Only one reply is held at a time. An error from `each`
    /// stops the run and leaves the session out of step.
    pub async fn request_many(
        &mut self,
        requests: &[Request],
        mut each: impl FnMut(usize, Result<Reply>) -> Result<()>,
    ) -> Result<()> {
        for (b, batch) in requests.chunks(PIPELINE_WINDOW).enumerate() {
            for r in batch {
                self.conn.write_line(&r.to_line()).await?;
            }
            self.conn.flush().await?;
            for (i, r) in batch.iter().enumerate() {
                let reply = self.read_reply_within(ReplyLimit::of(r)).await?;
                let reply = if reply.code >= 400 {
                    Err(ClientError::Server {
                        code: reply.code,
                        text: reply.text,
                    })
                } else {
                    Ok(reply)
                };
                if let Err(e) = each(b * PIPELINE_WINDOW + i, reply) {
                    self.in_data = true;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Lists a remote directory (or describes a file), at most
    /// [`MAX_LIST_ENTRIES`] entries in [`MAX_LIST_BYTES`]; each entry is
    /// parsed as it arrives, so only the parsed entries are kept.
    pub async fn list(&mut self, path: Option<&str>) -> Result<Listing> {
        let request = Request::List(path.map(str::to_string));
        self.conn.write_line(&request.to_line()).await?;
        self.conn.flush().await?;
        let mut entries = vec![];
        let mut bad = None;
        let (code, text) = self
            .read_reply_lines(ReplyLimit::LISTING, |line| {
                match Entry::parse(&line) {
                    Ok(e) => entries.push(e),
                    Err(e) => {
                        bad.get_or_insert(e);
                    }
                }
                Ok(())
            })
            .await?;
        if code >= 400 {
            return Err(ClientError::Server { code, text });
        }
        if let Some(e) = bad {
            return Err(e);
        }
        Ok(Listing {
            truncated: text.contains("truncated"),
            entries,
            text,
        })
    }

    /// Uploads small files (each at most [`protocol::MAX_SEND`] bytes) with
    /// `SEND`, many in flight at once, and calls `done` with each file's
    /// index and outcome as its reply arrives. An error that breaks the
    /// session is returned; files not yet reported may or may not have been
    /// stored (sending them again overwrites them with the same bytes).
    ///
    /// A blocking task reads and hashes the files ahead of the sending. When
    /// [`PIPELINE_WINDOW`] files are unanswered, the replies are read until
    /// half are, so files go out in bursts with one flush each.
    pub async fn send_many(
        &mut self,
        files: &[(PathBuf, VPath)],
        mut done: impl FnMut(usize, Result<Transferred>),
    ) -> Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(READ_AHEAD_FILES);
        let paths: Vec<PathBuf> = files.iter().map(|(local, _)| local.clone()).collect();
        tokio::task::spawn_blocking(move || {
            for (i, local) in paths.iter().enumerate() {
                if tx.blocking_send((i, read_small(local))).is_err() {
                    return; // The sending stopped.
                }
            }
        });
        let mut in_flight: std::collections::VecDeque<(usize, blake3::Hash, u64)> =
            Default::default();
        while let Some((i, read)) = rx.recv().await {
            let (data, hash) = match read {
                Ok(read) => read,
                Err(e) => {
                    done(i, Err(e));
                    continue;
                }
            };
            let size = data.len() as u64;
            self.in_data = true;
            let line = Request::Send {
                path: files[i].1.to_string(),
                size,
            };
            self.conn.write_line(&line.to_line()).await?;
            self.conn.write_frame(&FrameHeader::start(0), &[]).await?;
            if size > 0 {
                let chunk = FrameHeader {
                    kind: protocol::FrameKind::Chunk,
                    offset: 0,
                    len: u32::try_from(size).unwrap_or(u32::MAX),
                    hash: *hash.as_bytes(),
                };
                self.conn.write_frame(&chunk, &data).await?;
            }
            self.conn
                .write_frame(&FrameHeader::end(size, hash), &[])
                .await?;
            in_flight.push_back((i, hash, size));
            if in_flight.len() >= PIPELINE_WINDOW {
                self.conn.flush().await?;
                while in_flight.len() > PIPELINE_WINDOW / 2 {
                    let (i, hash, size) = in_flight.pop_front().expect("queue is full");
                    let outcome = self.sent(&files[i], hash, size).await?;
                    done(i, outcome);
                }
            }
        }
        self.conn.flush().await?;
        while let Some((i, hash, size)) = in_flight.pop_front() {
            let outcome = self.sent(&files[i], hash, size).await?;
            done(i, outcome);
        }
        self.in_data = false;
        Ok(())
    }

    /// Reads the reply to one `SEND`.
    async fn sent(
        &mut self,
        (local, remote): &(PathBuf, VPath),
        hash: blake3::Hash,
        size: u64,
    ) -> Result<Result<Transferred>> {
        let reply = self.read_reply().await?;
        let theirs = reply.text.split(' ').next().unwrap_or_default();
        Ok(if reply.code == 226 && theirs == protocol::hex(&hash) {
            info!(local = %local.display(), remote = %remote, size, hash = %theirs, "upload complete");
            Ok(Transferred {
                hash,
                size,
                resumed_at: 0,
            })
        } else if reply.code == 226 {
            Err(ClientError::Verify(format!(
                "server stored hash {theirs}, expected {}",
                protocol::hex(&hash)
            )))
        } else {
            info!(local = %local.display(), remote = %remote, code = reply.code, error = %reply.text, "upload failed");
            Err(ClientError::Server {
                code: reply.code,
                text: reply.text,
            })
        })
    }

    /// Uploads `local` to `remote`, resuming an interrupted upload of the
    /// same unchanged file. The whole-file hash is checked on both ends.
    pub async fn put(
        &mut self,
        local: &Path,
        remote: &VPath,
        progress: &ProgressBar,
    ) -> Result<Transferred> {
        let started = std::time::Instant::now();
        let local_abs = std::path::absolute(local).map_err(|e| local_err(local, e))?;
        let file = File::open(&local_abs).map_err(|e| local_err(local, e))?;
        let meta = file.metadata().map_err(|e| local_err(local, e))?;
        if !meta.is_file() {
            return Err(ClientError::Local(format!(
                "{}: not a regular file",
                local.display()
            )));
        }
        let size = meta.len();
        let chunk = self.options.chunk_size;
        let record = Record {
            mtime: meta.mtime(),
            inode: meta.ino(),
            ..Record::new(
                "upload",
                local_abs.to_string_lossy().into_owned(),
                remote.to_string(),
                size,
                chunk,
            )
        };
        let journal_path = self.journal_dir.join(format!(
            "{}.toml",
            journal::key(&["upload", &record.source, &record.target])
        ));
        let same_source = match Journal::load(&journal_path) {
            Ok(Some(prior)) => {
                let same = (
                    &prior.kind,
                    &prior.source,
                    &prior.target,
                    prior.size,
                    prior.mtime,
                    prior.inode,
                ) == (
                    &record.kind,
                    &record.source,
                    &record.target,
                    size,
                    record.mtime,
                    record.inode,
                );
                if !same {
                    info!(local = %local.display(), remote = %remote, "source changed since the interrupted upload; starting from 0");
                }
                same
            }
            Ok(None) => false,
            Err(e) => {
                warn!(error = %e, "ignoring a damaged journal");
                false
            }
        };

        let reply = self
            .request(&Request::Put {
                path: remote.to_string(),
                size,
                chunk,
            })
            .await?;
        if reply.code != 150 {
            return Err(ClientError::Protocol(format!(
                "unexpected reply {} to PUT",
                reply.code
            )));
        }
        self.in_data = true;
        let offers = parse_offers(&reply.text)?;
        let file = Arc::new(file);
        let (offset, tree) = if same_source && !offers.is_empty() {
            let f = file.clone();
            tokio::task::spawn_blocking(move || transfer::choose(&f, size, chunk, &offers))
                .await
                .map_err(|e| ClientError::Local(e.to_string()))?
                .map_err(|e| local_err(local, e))?
        } else {
            (0, Tree::default())
        };
        // A file of one chunk restarts after a failure: no journal needed.
        let mut journal = Journal::new(journal_path, record);
        if size > chunk {
            journal
                .save(offset)
                .map_err(|e| ClientError::Local(format!("cannot write the journal: {e}")))?;
        }
        info!(local = %local.display(), remote = %remote, size, resumed_at = offset, "upload starts");
        self.conn
            .write_frame(&FrameHeader::start(offset), &[])
            .await?;
        progress.set_length(size);
        progress.set_position(offset);
        let plan = Plan {
            file,
            size,
            chunk,
            offset,
            tree,
        };
        let hash = transfer::send(&mut self.conn, plan, progress).await?;
        let reply = self.read_reply().await?;
        self.in_data = false;
        let ms = started.elapsed().as_millis() as u64;
        match reply.code {
            226 => {
                let theirs = reply.text.split(' ').next().unwrap_or_default();
                if theirs != protocol::hex(&hash) {
                    return Err(ClientError::Verify(format!(
                        "server stored hash {theirs}, expected {}",
                        protocol::hex(&hash)
                    )));
                }
                journal.remove();
                info!(local = %local.display(), remote = %remote, size, resumed_at = offset,
                      hash = %protocol::hex(&hash), ms, "upload complete");
                Ok(Transferred {
                    hash,
                    size,
                    resumed_at: offset,
                })
            }
            code => {
                if matches!(code, 452 | 454) || size <= chunk {
                    journal.remove();
                }
                info!(local = %local.display(), remote = %remote, code, error = %reply.text, ms, "upload failed");
                Err(ClientError::Server {
                    code,
                    text: reply.text,
                })
            }
        }
    }

    /// Downloads `remote` to the local file `target`, resuming from a
    /// partial download that both ends prove equal.
    pub async fn get(
        &mut self,
        remote: &VPath,
        target: &Path,
        progress: &ProgressBar,
    ) -> Result<Transferred> {
        let started = std::time::Instant::now();
        let target_abs = std::path::absolute(target).map_err(|e| local_err(target, e))?;
        let name = target_abs
            .file_name()
            .ok_or_else(|| ClientError::Local(format!("{}: not a file name", target.display())))?
            .to_string_lossy()
            .into_owned();
        let dir = target_abs.parent().unwrap_or(Path::new("/")).to_path_buf();
        if target_abs.is_dir() {
            return Err(ClientError::Local(format!(
                "{}: is a directory",
                target.display()
            )));
        }
        if !dir.is_dir() {
            return Err(ClientError::Local(format!(
                "{}: no such directory",
                dir.display()
            )));
        }
        let partial = dir.join(format!(".{name}.ftpx-part"));
        let source = remote.to_string();
        let target_str = target_abs.to_string_lossy().into_owned();
        let journal_path = self.journal_dir.join(format!(
            "{}.toml",
            journal::key(&["download", &source, &target_str])
        ));

        // Offer what an earlier attempt left, in that attempt's chunk size.
        let (candidates, prior_chunk) = match Journal::load(&journal_path) {
            Ok(Some(prior))
                if prior.kind == "download"
                    && prior.source == source
                    && prior.target == target_str =>
            {
                let p = partial.clone();
                let offered =
                    tokio::task::spawn_blocking(move || -> std::io::Result<Vec<Candidate>> {
                        let f = open_nofollow(&p, false)?;
                        let len = f.metadata()?.len();
                        transfer::offer(
                            &f,
                            prior.size,
                            prior.chunk,
                            &[len, prior.verified.min(len)],
                        )
                    })
                    .await
                    .map_err(|e| ClientError::Local(e.to_string()))?
                    .unwrap_or_default();
                (offered, prior.chunk)
            }
            Ok(_) => (vec![], 0),
            Err(e) => {
                warn!(error = %e, "ignoring a damaged journal");
                (vec![], 0)
            }
        };
        let offered: Vec<u64> = candidates.iter().map(|c| c.offset).collect();
        let reply = self
            .request(&Request::Get {
                path: source.clone(),
                candidates,
            })
            .await?;
        let numbers: Vec<u64> = reply
            .text
            .split(' ')
            .map_while(|w| w.parse().ok())
            .collect();
        let (size, offset, chunk) = match (reply.code, numbers.as_slice()) {
            (151, &[size, offset, chunk]) => (size, offset, chunk),
            _ => {
                return Err(ClientError::Protocol(format!(
                    "unexpected reply to GET: {} {}",
                    reply.code, reply.text
                )));
            }
        };
        // From here the server is sending: any error but a server reply
        // tells the caller to drop this session.
        self.in_data = true;
        check_plan(size, offset, chunk, &offered, prior_chunk).map_err(|why| {
            ClientError::Protocol(format!("bad download plan {:?}: {why}", reply.text))
        })?;
        let free = free_space(&dir).map_err(|e| local_err(&dir, e))?;
        if size - offset > free {
            return Err(ClientError::Local(format!(
                "{}: the server offers {} bytes, but only {free} are free there",
                dir.display(),
                size - offset
            )));
        }
        let record = Record::new("download", source.clone(), target_str, size, chunk);
        // Open the partial file at the agreed offset, never through a link.
        let p = partial.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let file = open_nofollow(&p, offset == 0)?;
            transfer::resume_partial(file, size, chunk, offset)
        })
        .await
        .map_err(|e| ClientError::Local(e.to_string()))?;
        let (file, tree) = opened.map_err(|e| local_err(&partial, e))?;
        let mut journal = Journal::new(journal_path, record);
        if size > chunk {
            journal
                .save(offset)
                .map_err(|e| ClientError::Local(format!("cannot write the journal: {e}")))?;
        }
        info!(remote = %source, local = %target.display(), size, resumed_at = offset, "download starts");
        let mut journal = (size > chunk).then_some(journal);
        progress.set_length(size);
        progress.set_position(offset);
        let file = Arc::new(file);
        let plan = Plan {
            file: file.clone(),
            size,
            chunk,
            offset,
            tree,
        };
        let received = transfer::receive(
            &mut self.conn,
            plan,
            &mut journal,
            self.options.checkpoints,
            progress,
        )
        .await;
        let ms = started.elapsed().as_millis() as u64;
        match received {
            Ok(hash) => {
                self.in_data = false;
                let done = (|| -> std::io::Result<()> {
                    file.sync_all()?;
                    std::fs::rename(&partial, &target_abs)?;
                    File::open(&dir)?.sync_all()
                })();
                if let Some(j) = &journal {
                    j.remove();
                }
                done.map_err(|e| local_err(target, e))?;
                info!(remote = %source, local = %target.display(), size, resumed_at = offset,
                      hash = %protocol::hex(&hash), ms, "download complete");
                Ok(Transferred {
                    hash,
                    size,
                    resumed_at: offset,
                })
            }
            Err(Stopped { error, verified }) => {
                if matches!(error, transfer::Error::HashMismatch) || journal.is_none() {
                    let _ = std::fs::remove_file(&partial);
                    if let Some(j) = &journal {
                        j.remove();
                    }
                } else {
                    let _ = file.sync_data();
                    if let Some(j) = journal.as_mut() {
                        let _ = j.save(verified);
                    }
                }
                info!(remote = %source, local = %target.display(), verified, error = %error, ms, "download stopped");
                if error.in_step() {
                    // The stream was read to its end frame: still in step.
                    self.in_data = false;
                }
                if matches!(error, transfer::Error::Aborted) {
                    // The server gave up mid-file (its read failed); its reply says why.
                    let reply = self.read_reply().await?;
                    self.in_data = false;
                    return Err(ClientError::Server {
                        code: reply.code,
                        text: reply.text,
                    });
                }
                Err(error.into())
            }
        }
    }
}

/// Checks a `151 SIZE OFFSET CHUNK` plan against what the client asked:
/// a valid chunk size, and an offset that is 0 or one of the `offered`
/// candidates (made in chunks of `offered_chunk`), within the size.
fn check_plan(
    size: u64,
    offset: u64,
    chunk: u64,
    offered: &[u64],
    offered_chunk: u64,
) -> std::result::Result<(), String> {
    if !protocol::valid_chunk_size(chunk) {
        return Err(format!(
            "chunk size {chunk} is not a power of two from 1 KiB to 4 MiB"
        ));
    }
    if size > MAX_DOWNLOAD {
        return Err(format!(
            "size {size} is beyond any file this client can write"
        ));
    }
    if offset > size {
        return Err(format!("offset {offset} is beyond the size {size}"));
    }
    if offset != 0 && (!offered.contains(&offset) || chunk != offered_chunk) {
        return Err(format!("offset {offset} was not offered"));
    }
    Ok(())
}

/// Largest file a download may declare: the largest a file offset can be.
pub const MAX_DOWNLOAD: u64 = i64::MAX as u64;

/// Bytes an unprivileged user may still write in the file system of `dir`.
fn free_space(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `st` a valid out-parameter.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Opens a download's partial file for reading and writing without ever
/// following a symbolic link at `path`. With `fresh`, whatever is there
/// (our own leftover, or a link someone planted) is unlinked first and the
/// file is created anew, so nothing outside is read, cut or written.
fn open_nofollow(path: &Path, fresh: bool) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if fresh {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        // O_EXCL: a link planted again since is an error, not followed.
        options.create_new(true);
    }
    let file = options.open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            std::io::Error::other("is a symbolic link; refusing to follow it")
        } else {
            e
        }
    })?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(file)
}

/// Reads a file for `SEND` and hashes it; a file too large for `SEND` is an error.
fn read_small(local: &Path) -> Result<(Vec<u8>, blake3::Hash)> {
    use std::io::Read as _;
    let too_large = || ClientError::Local(format!("{}: too large to SEND", local.display()));
    let file = File::open(local).map_err(|e| local_err(local, e))?;
    let size = file.metadata().map_err(|e| local_err(local, e))?.len();
    if size > protocol::MAX_SEND {
        return Err(too_large());
    }
    let mut data = Vec::with_capacity(size as usize);
    // One byte past the limit tells a file that grew since.
    file.take(protocol::MAX_SEND + 1)
        .read_to_end(&mut data)
        .map_err(|e| local_err(local, e))?;
    if data.len() as u64 > protocol::MAX_SEND {
        return Err(too_large());
    }
    let hash = blake3::hash(&data);
    Ok((data, hash))
}

fn local_err(path: &Path, e: std::io::Error) -> ClientError {
    ClientError::Local(format!("{}: {e}", path.display()))
}

/// `"quoted path"` → the path.
pub fn unquote(text: &str) -> Result<String> {
    let words =
        protocol::split_commands(text, false).map_err(|e| ClientError::Protocol(e.to_string()))?;
    words
        .into_iter()
        .next()
        .and_then(|w| w.into_iter().next())
        .ok_or_else(|| ClientError::Protocol(format!("expected a path, got {text:?}")))
}

/// The resume offers in a `150 ready [OFFSET HASH]...` reply.
fn parse_offers(text: &str) -> Result<Vec<Candidate>> {
    let words: Vec<&str> = text.split(' ').filter(|w| !w.is_empty()).collect();
    let Some((&"ready", rest)) = words.split_first() else {
        return Err(ClientError::Protocol(format!("bad 150 reply {text:?}")));
    };
    let line = format!("GET x {}", rest.join(" "));
    match Request::parse(&line) {
        Ok(Request::Get { candidates, .. }) => Ok(candidates),
        _ => Err(ClientError::Protocol(format!("bad resume offers {text:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_plans_are_checked() {
        let ok = |size, offset, chunk| check_plan(size, offset, chunk, &[8192], 4096);
        assert!(ok(10_000, 0, 4096).is_ok());
        assert!(ok(10_000, 8192, 4096).is_ok());
        assert!(ok(0, 0, 1024).is_ok());
        // An offset not offered, or offered in another chunk size.
        assert!(ok(10_000, 4096, 4096).is_err());
        assert!(ok(10_000, 8192, 8192).is_err());
        // Beyond the size, a bad chunk size, a size no file can have.
        assert!(check_plan(4096, 8192, 4096, &[8192], 4096).is_err());
        for chunk in [0, 1, 1000, 3 << 10, 8 << 20, u64::MAX] {
            assert!(ok(10_000, 0, chunk).is_err(), "{chunk}");
        }
        assert!(ok(1 << 63, 0, 4096).is_err());
        assert!(ok(MAX_DOWNLOAD, 0, 4096).is_ok());
    }

    #[test]
    fn partial_files_never_follow_links() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep me").unwrap();
        let part = dir.path().join(".f.ftpx-part");
        std::os::unix::fs::symlink(&victim, &part).unwrap();
        // Resuming through the link is refused; starting afresh replaces it.
        assert!(open_nofollow(&part, false).is_err());
        let f = open_nofollow(&part, true).unwrap();
        f.set_len(0).unwrap();
        assert!(!std::fs::symlink_metadata(&part).unwrap().is_symlink());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        assert!(free_space(dir.path()).unwrap() > 0);
    }
}
