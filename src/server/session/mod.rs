//! One client on the server: greeting, login or registration, then a loop of
//! request → handler → reply until the client quits, idles out, breaks the
//! protocol or the server stops. Every error becomes a reply in one place,
//! [`Session::answer`], by [`Error::reply_code`] and [`Error::ends_session`].
//!
//! The handlers live beside this loop, by what they do: `auth` (login and
//! registration), `files` (the file and directory commands), `upload` (PUT,
//! and the SEND pipeline), `download` (GET); `log` writes each request's
//! one line.

mod auth;
pub(super) mod download;
mod files;
mod log;
mod upload;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::protocol::{self, Code, Request, VPath};
use crate::server::Server;
use crate::server::live::Seat;
use crate::store::quota::UploadLock;
use crate::store::upload::Owner;
use crate::store::users::Password;
use crate::transfer::connection::{Connection, Stream};

use log::{Note, Who};
use upload::{Drain, Stores};

pub struct Session<S> {
    conn: Connection<S>,
    peer: SocketAddr,
    server: Arc<Server>,
    /// Its place on the board of who is on (and its kick switch).
    seat: Seat,
    user: Option<Owner>,
    /// The user database's version when this session last read its account.
    account_read: Option<u64>,
    cwd: VPath,
    stores: Stores,
    /// GETs planned before their turn, in the order they came.
    planned: VecDeque<download::Planned>,
    /// What the request being handled tells the log.
    note: Note,
    /// A transfer's frames are on the wire: no reply can be put between them.
    in_transfer: bool,
    /// The ledger counts this session for its user until it is closed.
    counted: bool,
}

impl<S> Drop for Session<S> {
    /// A session that ends without closing (its task panicked) is not left
    /// counted: with several nodes, a count never closed would keep its
    /// user's name from being taken again and hold the user's rows.
    fn drop(&mut self) {
        if let (true, Some(user)) = (self.counted, &self.user) {
            self.server.ledger.close_session(&user.name);
        }
    }
}

/// Runs a session to its end.
pub async fn run<S: Stream>(
    conn: Connection<S>,
    peer: SocketAddr,
    server: Arc<Server>,
    stop: watch::Receiver<bool>,
) {
    let seat = server.live.join(peer);
    run_seated(conn, seat, server, stop).await
}

/// Runs a session that already has its `seat` on the board (whose kick
/// cuts `conn`'s stream, see `server::kick`).
pub async fn run_seated<S: Stream>(
    conn: Connection<S>,
    seat: Seat,
    server: Arc<Server>,
    stop: watch::Receiver<bool>,
) {
    let peer = seat.peer();
    server.metrics.session_opened();
    info!(event = "connect", peer = %peer, result = "ok", "connected");
    let mut session = Session {
        conn,
        peer,
        server,
        seat,
        user: None,
        account_read: None,
        cwd: VPath::root(),
        stores: Stores::default(),
        planned: VecDeque::new(),
        note: Note::default(),
        in_transfer: false,
        counted: false,
    };
    let mut reason = session.run_loop(stop).await;
    session.stores.finish().await;
    if session.seat.entry.kick.kicked() {
        reason = session.farewell().await;
    }
    if let (true, Some(user)) = (session.counted, &session.user) {
        session.server.ledger.close_session(&user.name);
        session.counted = false;
    }
    session.conn.shutdown().await;
    session.server.metrics.session_closed();
    info!(event = "disconnect", peer = %peer, user = session.user_name(), reason, "disconnected");
}

/// What the client sent next.
enum Next {
    Request(Request),
    /// A request that could not be read or parsed, already answered.
    Bad,
    /// The session ends, for this reason.
    End(&'static str),
}

impl<S: Stream> Session<S> {
    fn user_name(&self) -> Option<&str> {
        self.user.as_ref().map(|u| u.name.as_str())
    }

    fn who(&self) -> Who<'_> {
        Who {
            peer: self.peer,
            user: self.user_name(),
        }
    }

    /// A kicked session: told why, unless a transfer's frames are on the
    /// wire (then it just closes, and the transfer can be resumed).
    async fn farewell(&mut self) -> &'static str {
        if !self.in_transfer {
            self.seat.entry.kick.farewell();
            let _ = self
                .reply(Code::Unavailable, "session ended by the server's admin")
                .await;
        }
        "kicked by the server's admin"
    }

    fn logged_in(&self) -> Result<&Owner> {
        self.user.as_ref().ok_or(Error::NotLoggedIn)
    }

    /// The virtual path `arg` names, noted for the request's log line.
    fn resolve(&mut self, arg: &str) -> Result<VPath> {
        let path = VPath::resolve(&self.cwd, arg, self.server.config.limits.max_path)?;
        self.note.resolved(&path);
        Ok(path)
    }

    /// The request loop; returns why the session ended.
    async fn run_loop(&mut self, mut stop: watch::Receiver<bool>) -> &'static str {
        let version = env!("CARGO_PKG_VERSION");
        let greeting = format!("ftpx {version} ready");
        if self.reply(Code::Greeting, &greeting).await.is_err() {
            return "greeting failed";
        }
        let login_deadline = Instant::now() + self.server.config.login_timeout();
        // Malformed requests, and requests refused before login.
        let mut strikes = 0;
        // The last request was a login that failed: a client may have sent
        // the next request with it, before it could know (the `ftpx`
        // client's scripts do). That one request, refused only for want
        // of the login, is not counted: the failed login was.
        let mut login_failed = false;
        loop {
            let request = match self.next_request(&mut stop, login_deadline).await {
                Next::Request(request) => request,
                Next::Bad => {
                    login_failed = false;
                    match self.strike(&mut strikes).await {
                        true => return "too many bad requests",
                        false => continue,
                    }
                }
                Next::End(why) => return why,
            };
            if !matches!(request, Request::Send { .. })
                && let Err(e) = self.answer_stores(Drain::All).await
            {
                info!(event = "error", peer = %self.peer, user = self.user_name(), error = %e, "could not answer uploads");
                return "connection lost";
            }
            if request == Request::Quit {
                let _ = self.reply(Code::Goodbye, "goodbye").await;
                return "quit";
            }
            let verb = request.verb();
            let started = Instant::now();
            let was_logged_in = self.user.is_some();
            let is_login = matches!(request, Request::Login { .. } | Request::Register { .. });
            let after_failed_login = std::mem::take(&mut login_failed);
            self.note = Note::default();
            let handled = self.handle(request).await;
            if handled.is_ok() && !self.note.logged {
                let ms = started.elapsed().as_millis() as u64;
                log::command(self.who(), verb, &self.note, ms, None);
            }
            match handled {
                Ok(()) if !was_logged_in && self.user.is_some() => strikes = 0,
                Ok(()) => {}
                Err(e) => {
                    let forgiven = after_failed_login && matches!(e, Error::NotLoggedIn);
                    login_failed = is_login && self.user.is_none();
                    if !self.answer(verb, started, e).await {
                        return "error ends session";
                    }
                    if self.user.is_none() && !forgiven && self.strike(&mut strikes).await {
                        return "too many bad requests";
                    }
                }
            }
        }
    }

    /// Reads and parses the next request, waiting at most the idle (or,
    /// before login, the login) timeout, and answering SENDs meanwhile.
    async fn next_request(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        login_deadline: Instant,
    ) -> Next {
        let wait = match self.user {
            Some(_) => self.server.config.idle_timeout(),
            None => login_deadline.saturating_duration_since(Instant::now()),
        };
        let max_line = self.server.config.limits.max_line;
        let next_line = async {
            self.answer_stores(Drain::UntilInput).await?;
            Ok::<_, Error>(self.conn.read_line(max_line).await?)
        };
        let line = tokio::select! {
            line = tokio::time::timeout(wait, next_line) => line,
            _ = stopped(stop) => {
                let _ = self.reply_in_turn(Code::Unavailable, "server shutting down").await;
                return Next::End("server shutting down");
            }
        };
        let line = match line {
            Err(_) => {
                let what = match self.user {
                    Some(_) => "idle timeout",
                    None => "login timeout",
                };
                let _ = self
                    .reply_in_turn(Code::Unavailable, &format!("{what}, closing"))
                    .await;
                return Next::End(what);
            }
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) => {
                // A client that closed only its sending side still gets its replies.
                let _ = self.answer_stores(Drain::All).await;
                return Next::End("client closed the connection");
            }
            // Reset, or cut by a kick: no request was there to be bad.
            Ok(Err(Error::Connection(_))) => return Next::End("connection lost"),
            Ok(Err(e)) => {
                let sent = self.reply_in_turn(e.reply_code(), &e.to_string()).await;
                info!(event = "bad_request", peer = %self.peer, user = self.user_name(), code = e.reply_code().number(), error = %e, "bad request line");
                return match e.ends_session() || sent.is_err() {
                    true => Next::End("bad request line"),
                    false => Next::Bad,
                };
            }
        };
        match Request::parse(&line) {
            Ok(request) => Next::Request(request),
            Err(e) => {
                let e = Error::from_parse(e);
                info!(event = "bad_request", peer = %self.peer, user = self.user_name(), code = e.reply_code().number(), error = %e, "malformed request");
                match self.reply_in_turn(e.reply_code(), &e.to_string()).await {
                    Ok(()) => Next::Bad,
                    Err(_) => Next::End("connection lost"),
                }
            }
        }
    }

    /// Replies to a request that failed; false if the session must end.
    async fn answer(&mut self, verb: &'static str, started: Instant, e: Error) -> bool {
        let code = e.reply_code();
        if !self.note.logged {
            let ms = started.elapsed().as_millis() as u64;
            log::command(self.who(), verb, &self.note, ms, Some(&e));
        }
        let sent = self.reply_in_turn(code, &e.to_string()).await;
        !e.ends_session() && sent.is_ok()
    }

    /// Counts a bad request. Once there were `max_bad_requests`, tells the
    /// client so and returns true: the session ends.
    async fn strike(&mut self, strikes: &mut u32) -> bool {
        *strikes += 1;
        let max = self.server.config.limits.max_bad_requests;
        if max == 0 || *strikes < max {
            return false;
        }
        info!(event = "bad_request", peer = %self.peer, user = self.user_name(), strikes = *strikes, "too many bad requests, closing");
        let _ = self
            .reply_in_turn(Code::Unavailable, "too many bad requests, closing")
            .await;
        true
    }

    /// Sends a final reply line, after the line that announces a
    /// transfer's id if one is waiting (see `protocol`).
    async fn reply(&mut self, code: Code, text: &str) -> Result<()> {
        self.announce(code, text).await?;
        match code {
            // The client waits for it before its frames.
            Code::Ready => Ok(self.conn.flush().await?),
            _ => Ok(self.send_replies().await?),
        }
    }

    /// Sends the replies written so far, unless another request has
    /// arrived whole: its reply goes out with them. A client that sends
    /// requests without waiting (`get -r`, a login with its first command)
    /// gets its replies in a few writes instead of one each.
    async fn send_replies(&mut self) -> crate::transfer::error::Result<()> {
        if self.conn.line_waiting() {
            return Ok(());
        }
        self.conn.flush().await
    }

    /// [`Session::reply`] without sending it yet: for a reply that data
    /// frames follow at once (151), which go out with it.
    async fn announce(&mut self, code: Code, text: &str) -> Result<()> {
        if let Some(id) = self.note.transfer.take() {
            self.conn
                .write_line(&protocol::transfer_line(code, &id))
                .await?;
        }
        self.server.metrics.reply(code.number());
        Ok(self.conn.write_line(&code.line(text)).await?)
    }

    /// Replies after every SEND before it has been answered: replies go
    /// out in the order of the requests.
    async fn reply_in_turn(&mut self, code: Code, text: &str) -> Result<()> {
        self.answer_stores(Drain::All).await?;
        self.reply(code, text).await
    }

    /// The one match: each request to its handler.
    async fn handle(&mut self, request: Request) -> Result<()> {
        self.reread_account()?;
        match request {
            Request::Login { user, password } => {
                self.login(user, Password::new(password), false).await
            }
            Request::Register { user, password } => {
                self.login(user, Password::new(password), true).await
            }
            Request::Noop => self.reply(Code::Ok, "ok").await,
            Request::Help => self.help().await,
            Request::Quit => unreachable!("handled by the loop"),
            // Its frames follow at once: they are read (and the SEND refused)
            // before anything else, or they would be taken for request lines.
            Request::Send { path, size } => self.send_small(path, size).await,
            _ if self.user.is_none() => Err(Error::NotLoggedIn),
            Request::Pwd => self.pwd().await,
            Request::Cwd(path) => self.cwd(path).await,
            Request::List(path) => self.list(path).await,
            Request::Stat(path) => self.stat(path).await,
            Request::Hash(path) => self.hash(path).await,
            Request::Mkd(path) => self.mkd(path).await,
            Request::Rmd(path) => self.rmd(path).await,
            Request::Dele(path) => self.dele(path).await,
            Request::Rename { from, to } => self.rename(from, to).await,
            Request::Quota => self.quota().await,
            Request::Parts => self.parts().await,
            Request::Discard(path) => self.discard(path).await,
            Request::Mtime { path, mtime } => self.mtime(path, mtime).await,
            Request::Put { path, size, chunk } => self.put(path, size, chunk).await,
            Request::Get { path, candidates } => self.get(path, candidates).await,
        }
    }

    /// Takes in what the admin changed in the user's account since this
    /// session last read it: a new quota or file limit counts from the next
    /// request. An account removed ends the session.
    fn reread_account(&mut self) -> Result<()> {
        let Some(owner) = &self.user else {
            return Ok(());
        };
        let version = self.server.users.version();
        if version.is_none() || version == self.account_read {
            return Ok(());
        }
        let user = match self.server.users.find(&owner.name) {
            Ok(Some(user)) => user,
            Ok(None) => return Err(Error::Unavailable("your account was removed".into())),
            Err(e) => {
                // Out of descriptors, say: the limits read before still hold.
                warn!(event = "error", user = %owner.name, error = %e, "cannot read the user database");
                return Ok(());
            }
        };
        let accounts = &self.server.config.accounts;
        let limits = crate::store::quota::Limits {
            bytes: user.quota,
            entries: user.max_files(accounts),
        };
        if limits != owner.limits {
            info!(event = "account_changed", peer = %self.peer, user = %owner.name, quota = limits.bytes, max_files = limits.entries, "account changed");
        }
        if let Some(owner) = &mut self.user {
            owner.limits = limits;
        }
        self.account_read = version;
        Ok(())
    }

    /// The one upload lock of `path`: an upload, a removal or a rename of it.
    fn lock_upload(&self, path: &VPath) -> Result<UploadLock> {
        let owner = self.logged_in()?;
        owner
            .ledger
            .lock_upload(&owner.name, path)?
            .ok_or_else(|| Error::Busy(path.to_string()))
    }

    async fn help(&mut self) -> Result<()> {
        let verbs = "LOGIN REGISTER PWD CWD LIST STAT HASH MKD RMD DELE RENAME QUOTA PARTS DISCARD MTIME PUT SEND GET NOOP HELP QUIT";
        self.conn.write_line(&Code::Help.continued(verbs)).await?;
        self.reply(
            Code::Help,
            "see the protocol documentation in src/protocol/mod.rs",
        )
        .await
    }
}

/// Runs filesystem work on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(Error::Storage(std::io::Error::other(e))))
}

/// Resolves once the server is stopping.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            // The server is gone without a word: treat as stopping.
            return;
        }
    }
}

/// `"PATH"`, as replies quote a path.
fn quoted(path: &VPath) -> String {
    protocol::quote(&path.to_string())
}
