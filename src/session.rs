//! One client on the server: greeting, login or registration, then a loop of
//! request → handler → reply until the client quits, idles out, breaks the
//! protocol or the server stops. Every error becomes a reply in one place,
//! [`Session::run_loop`], by [`Error::reply_code`] and [`Error::ends_session`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::jail::{Home, VPath};
use crate::journal::{self, Journal, Record};
use crate::protocol::{self, FrameKind, ParseError, Request};
use crate::quota;
use crate::server::{Server, UploadLock};
use crate::transfer::{self, Checkpoints, Plan, Stopped};
use crate::users::{self, Password, User};

struct LoggedIn {
    name: String,
    quota: u64,
    home: Home,
}

pub struct Session<S> {
    conn: Connection<S>,
    peer: SocketAddr,
    server: Arc<Server>,
    user: Option<LoggedIn>,
    cwd: VPath,
    stores: Stores,
}

/// Runs a session to its end.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    conn: Connection<S>,
    peer: SocketAddr,
    server: Arc<Server>,
    stop: watch::Receiver<bool>,
) {
    info!(peer = %peer, "connected");
    let mut session = Session {
        conn,
        peer,
        server,
        user: None,
        cwd: VPath::root(),
        stores: Stores::default(),
    };
    let reason = session.run_loop(stop).await;
    session.stores.finish().await;
    if let Some(user) = &session.user {
        session.server.ledger.close_session(&user.name);
    }
    session.conn.shutdown().await;
    info!(peer = %peer, user = session.user_name(), reason, "disconnected");
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    fn user_name(&self) -> &str {
        self.user.as_ref().map_or("-", |u| u.name.as_str())
    }

    fn logged_in(&self) -> Result<&LoggedIn> {
        self.user.as_ref().ok_or(Error::NotLoggedIn)
    }

    fn resolve(&self, arg: &str) -> Result<VPath> {
        VPath::resolve(&self.cwd, arg, self.server.config.limits.max_path)
    }

    /// The request loop; returns why the session ended.
    async fn run_loop(&mut self, mut stop: watch::Receiver<bool>) -> &'static str {
        let version = env!("CARGO_PKG_VERSION");
        if self
            .conn
            .reply(220, &format!("ftpx {version} ready"))
            .await
            .is_err()
        {
            return "greeting failed";
        }
        let login_deadline = Instant::now() + self.server.config.login_timeout();
        // Malformed requests, and requests refused before login.
        let mut strikes = 0;
        loop {
            let wait = match self.user {
                Some(_) => self.server.config.idle_timeout(),
                None => login_deadline.saturating_duration_since(Instant::now()),
            };
            let max_line = self.server.config.limits.max_line;
            let next_line = async {
                self.answer_stores(Drain::UntilInput).await?;
                self.conn.read_line(max_line).await
            };
            let line = tokio::select! {
                line = tokio::time::timeout(wait, next_line) => line,
                _ = stopped(&mut stop) => {
                    let _ = self.reply_in_turn(421, "server shutting down").await;
                    return "server shutting down";
                }
            };
            let line = match line {
                Err(_) => {
                    let what = if self.user.is_some() {
                        "idle timeout"
                    } else {
                        "login timeout"
                    };
                    let _ = self.reply_in_turn(421, &format!("{what}, closing")).await;
                    return what;
                }
                Ok(Ok(Some(line))) => line,
                Ok(Ok(None)) => {
                    // A client that closed only its sending side still gets its replies.
                    let _ = self.answer_stores(Drain::All).await;
                    return "client closed the connection";
                }
                Ok(Err(e)) => {
                    let sent = self.reply_in_turn(e.reply_code(), &e.to_string()).await;
                    info!(peer = %self.peer, user = self.user_name(), error = %e, "bad request line");
                    if e.ends_session() || sent.is_err() {
                        return "bad request line";
                    }
                    if self.strike(&mut strikes).await {
                        return "too many bad requests";
                    }
                    continue;
                }
            };
            let request = match Request::parse(&line) {
                Ok(r) => r,
                Err(e) => {
                    let code = match e {
                        ParseError::UnknownVerb(_)
                        | ParseError::Empty
                        | ParseError::UnterminatedQuote => 500,
                        _ => 501,
                    };
                    info!(peer = %self.peer, user = self.user_name(), error = %e, "malformed request");
                    if self.reply_in_turn(code, &e.to_string()).await.is_err() {
                        return "connection lost";
                    }
                    if self.strike(&mut strikes).await {
                        return "too many bad requests";
                    }
                    continue;
                }
            };
            if !matches!(request, Request::Send { .. })
                && let Err(e) = self.answer_stores(Drain::All).await
            {
                info!(peer = %self.peer, user = self.user_name(), error = %e, "could not answer uploads");
                return "connection lost";
            }
            if request == Request::Quit {
                let _ = self.conn.reply(221, "goodbye").await;
                return "quit";
            }
            let verb = request.verb();
            let started = Instant::now();
            let was_logged_in = self.user.is_some();
            let outcome = self.handle(request).await;
            match outcome {
                Ok(()) if !was_logged_in && self.user.is_some() => strikes = 0,
                Ok(()) => {}
                Err(e) => {
                    let code = e.reply_code();
                    if !matches!(
                        e,
                        Error::LoginFailed | Error::BadChunk(_) | Error::HashMismatch
                    ) {
                        // Logins and transfers log their own line with more detail.
                        info!(peer = %self.peer, user = self.user_name(), request = verb, code, error = %e,
                              ms = started.elapsed().as_millis() as u64, "request failed");
                    }
                    let sent = self.reply_in_turn(code, &e.to_string()).await;
                    if e.ends_session() || sent.is_err() {
                        return "error ends session";
                    }
                    if self.user.is_none() && self.strike(&mut strikes).await {
                        return "too many bad requests";
                    }
                }
            }
        }
    }

    /// Counts a bad request. Once there were `max_bad_requests`, tells the
    /// client so and returns true: the session ends.
    async fn strike(&mut self, strikes: &mut u32) -> bool {
        *strikes += 1;
        let max = self.server.config.limits.max_bad_requests;
        if max == 0 || *strikes < max {
            return false;
        }
        info!(peer = %self.peer, user = self.user_name(), strikes = *strikes, "too many bad requests, closing");
        let _ = self
            .reply_in_turn(421, "too many bad requests, closing")
            .await;
        true
    }

    /// Replies after every SEND before it has been answered: replies go
    /// out in the order of the requests.
    async fn reply_in_turn(&mut self, code: u16, text: &str) -> Result<()> {
        self.answer_stores(Drain::All).await?;
        self.conn.reply(code, text).await
    }

    async fn handle(&mut self, request: Request) -> Result<()> {
        let max_list = self.server.config.limits.max_list_entries;
        match request {
            Request::Login { user, password } => {
                self.login(user, Password::new(password), false).await
            }
            Request::Register { user, password } => {
                self.login(user, Password::new(password), true).await
            }
            Request::Noop => self.conn.reply(200, "ok").await,
            Request::Help => self.help().await,
            Request::Quit => unreachable!("handled by the loop"),
            _ if self.user.is_none() => Err(Error::NotLoggedIn),
            Request::Pwd => {
                self.conn
                    .reply(257, &protocol::quote(&self.cwd.to_string()))
                    .await
            }
            Request::Cwd(arg) => {
                let path = match arg {
                    Some(a) => self.resolve(&a)?,
                    None => VPath::root(),
                };
                let home = self.logged_in()?.home.clone();
                let p = path.clone();
                blocking(move || home.check_dir(&p)).await?;
                self.log_ok("CWD", &path, 0);
                self.cwd = path;
                self.conn
                    .reply(257, &protocol::quote(&self.cwd.to_string()))
                    .await
            }
            Request::List(arg) => {
                let path = match arg {
                    Some(a) => self.resolve(&a)?,
                    None => self.cwd.clone(),
                };
                let home = self.logged_in()?.home.clone();
                let p = path.clone();
                let (entries, truncated) = blocking(move || home.list(&p, max_list)).await?;
                for e in &entries {
                    self.conn
                        .write_line(&format!("213-{}", e.to_line()))
                        .await?;
                }
                let more = if truncated { " (truncated)" } else { "" };
                self.log_ok("LIST", &path, entries.len() as u64);
                self.conn
                    .reply(213, &format!("{} entries{more}", entries.len()))
                    .await
            }
            Request::Stat(arg) => {
                let path = self.resolve(&arg)?;
                let home = self.logged_in()?.home.clone();
                let entry = blocking(move || home.stat(&path)).await?;
                self.conn.reply(213, &entry.to_line()).await
            }
            Request::Hash(arg) => {
                let path = self.resolve(&arg)?;
                let home = self.logged_in()?.home.clone();
                let p = path.clone();
                let hash = blocking(move || {
                    let file = home.open_read(&p)?;
                    let mut h = blake3::Hasher::new();
                    h.update_reader(&file)
                        .map_err(|e| Error::fs(e, &p.to_string()))?;
                    Ok(h.finalize())
                })
                .await?;
                self.log_ok("HASH", &path, 0);
                self.conn.reply(213, &protocol::hex(&hash)).await
            }
            Request::Mkd(arg) => {
                let path = self.resolve(&arg)?;
                let home = self.logged_in()?.home.clone();
                let p = path.clone();
                blocking(move || home.mkdir(&p)).await?;
                self.log_ok("MKD", &path, 0);
                self.conn
                    .reply(257, &protocol::quote(&path.to_string()))
                    .await
            }
            Request::Rmd(arg) => {
                let path = self.resolve(&arg)?;
                // Removing the working directory (or one above it) would leave the session nowhere.
                if !path.is_root() && format!("{}/", self.cwd).starts_with(&format!("{path}/")) {
                    return Err(Error::BadArgument(format!(
                        "{path}: is the working directory"
                    )));
                }
                let home = self.logged_in()?.home.clone();
                let p = path.clone();
                blocking(move || home.rmdir(&p)).await?;
                self.log_ok("RMD", &path, 0);
                self.conn.reply(200, "directory removed").await
            }
            Request::Dele(arg) => {
                let path = self.resolve(&arg)?;
                let user = self.logged_in()?;
                let (home, name) = (user.home.clone(), user.name.clone());
                let _busy = self
                    .server
                    .lock_upload(&name, &path)
                    .ok_or_else(|| Error::Busy(path.to_string()))?;
                let p = path.clone();
                let freed = blocking(move || home.remove_file(&p)).await?;
                self.server.ledger.freed(&name, freed);
                self.log_ok("DELE", &path, freed);
                self.conn.reply(200, "file removed").await
            }
            Request::Rename { from, to } => {
                let (from, to) = (self.resolve(&from)?, self.resolve(&to)?);
                let user = self.logged_in()?;
                let (home, name) = (user.home.clone(), user.name.clone());
                let _busy = self
                    .server
                    .lock_upload(&name, &from)
                    .ok_or_else(|| Error::Busy(from.to_string()))?;
                let f = from.clone();
                let (target, replaced) = blocking(move || home.rename(&f, &to)).await?;
                self.server.ledger.freed(&name, replaced);
                info!(peer = %self.peer, user = %name, request = "RENAME", from = %from, to = %target, result = "ok");
                self.conn
                    .reply(
                        200,
                        &format!("renamed to {}", protocol::quote(&target.to_string())),
                    )
                    .await
            }
            Request::Quota => {
                let user = self.logged_in()?;
                let used = self.server.ledger.used(&user.name);
                let quota = user.quota;
                self.conn.reply(213, &format!("{used} {quota}")).await
            }
            Request::Put { path, size, chunk } => {
                let path = self.resolve(&path)?;
                self.put(path, size, chunk).await
            }
            Request::Send { path, size } => self.send_small(path, size).await,
            Request::Get { path, candidates } => {
                let path = self.resolve(&path)?;
                self.get(path, candidates).await
            }
        }
    }

    fn log_ok(&self, request: &'static str, path: &VPath, bytes: u64) {
        info!(peer = %self.peer, user = self.user_name(), request, path = %path, bytes, result = "ok");
    }

    async fn help(&mut self) -> Result<()> {
        let verbs = "LOGIN REGISTER PWD CWD LIST STAT HASH MKD RMD DELE RENAME QUOTA PUT SEND GET NOOP HELP QUIT";
        self.conn.write_line(&format!("211-{verbs}")).await?;
        self.conn
            .reply(211, "see the protocol documentation in src/protocol.rs")
            .await
    }

    async fn login(&mut self, name: String, password: Password, register: bool) -> Result<()> {
        if self.user.is_some() {
            return Err(Error::BadSequence("already logged in".into()));
        }
        let server = self.server.clone();
        let accounts = &server.config.accounts;
        let started = Instant::now();
        let user = if register {
            if !accounts.registration {
                return Err(Error::NameRefused(
                    "registration is switched off on this server".into(),
                ));
            }
            users::check_name(&name).map_err(Error::NameRefused)?;
            users::check_password(&password, accounts).map_err(Error::BadArgument)?;
            if !server.defender.register(self.peer.ip()) {
                return Err(Error::Throttled(
                    "too many registrations from your address; try again later".into(),
                ));
            }
            let quota = rand::random_range(
                accounts.registered_quota_min.0..=accounts.registered_quota_max.0,
            );
            let permit = server.hash_permit(self.peer.ip()).await?;
            let (db, settings) = (server.users.clone(), accounts.clone());
            let user = blocking(move || {
                let hash = users::hash_password(&password, &settings)
                    .map_err(|e| Error::Storage(std::io::Error::other(e)))?;
                let user = User {
                    name,
                    quota,
                    hash,
                    created: users::now_secs(),
                };
                db.add(user.clone()).map_err(|e| {
                    if e.contains("already exists") {
                        Error::NameRefused(format!("the name {:?} is taken", user.name))
                    } else {
                        Error::Storage(std::io::Error::other(e))
                    }
                })?;
                Ok(user)
            })
            .await;
            drop(permit);
            let user =
                user.inspect_err(|e| info!(peer = %self.peer, error = %e, "registration refused"))?;
            info!(peer = %self.peer, user = %user.name, quota = user.quota, "registered");
            user
        } else {
            let base = Duration::from_millis(accounts.login_failure_delay_ms);
            let ip = self.peer.ip();
            // Counted in flight from here until settled below; a login that
            // ends in between (no hashing turn came) was never evaluated.
            let Ok(attempt) = server.admit(ip, &name).await? else {
                // Refused without hashing, answered like any other failure.
                tokio::time::sleep_until((started + base).into()).await;
                info!(peer = %self.peer, user = ?name, result = "banned", "login");
                return Err(Error::LoginFailed);
            };
            match self.check_login(&name, password).await? {
                Some(user) => {
                    attempt.succeeded();
                    user
                }
                None => {
                    // Every failure, whatever its cause, is answered after the same delay,
                    // growing with repeated failures.
                    let delay = attempt.failed(base);
                    tokio::time::sleep_until((started + delay).into()).await;
                    info!(peer = %self.peer, user = ?name, result = "failed", delay_ms = delay.as_millis() as u64, "login");
                    return Err(Error::LoginFailed);
                }
            }
        };
        let home_path = server.users.home(&user.name);
        let name = user.name.clone();
        let partial_dir = server.partial_dir(&name);
        let ttl = Duration::from_secs(server.config.transfer.partial_ttl_hours * 3600);
        let home = blocking(move || {
            if !home_path.exists() {
                std::fs::create_dir_all(&home_path).map_err(Error::Storage)?;
            }
            Home::open(&home_path).map_err(Error::Storage)
        })
        .await
        .inspect_err(|e| warn!(user = %name, error = %e, "cannot open home"))?;
        let scan_home = home.clone();
        let ledger_server = server.clone();
        let ledger_name = name.clone();
        blocking(move || {
            ledger_server
                .ledger
                .open_session(&ledger_name, || {
                    quota::scan(&scan_home, &partial_dir, Some(ttl))
                })
                .map_err(Error::Storage)
        })
        .await?;
        info!(peer = %self.peer, user = %name, result = "ok", ms = started.elapsed().as_millis() as u64, "login");
        self.user = Some(LoggedIn {
            name,
            quota: user.quota,
            home,
        });
        self.cwd = VPath::root();
        self.conn.reply(230, "logged in").await
    }

    /// The account if `password` is right; None for any failure. An error
    /// only when the server is too busy to check at all.
    async fn check_login(&self, name: &str, password: Password) -> Result<Option<User>> {
        let accounts = &self.server.config.accounts;
        let length_ok =
            (1..=accounts.password_max_len).contains(&password.as_str().chars().count());
        let db = self.server.users.clone();
        let found = if users::check_name(name).is_ok() {
            let name = name.to_string();
            match tokio::task::spawn_blocking(move || db.find(&name)).await {
                Ok(Ok(found)) => found,
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot read the user database");
                    None
                }
                Err(_) => None,
            }
        } else {
            None
        };
        if !length_ok {
            return Ok(None);
        }
        // Unknown users are checked against a dummy hash of the same cost.
        let stored = found
            .as_ref()
            .map_or(self.server.dummy_hash.clone(), |u| u.hash.clone());
        let max_log_n = accounts.scrypt_max_log_n;
        let _permit = self.server.hash_permit(self.peer.ip()).await?;
        let verdict = tokio::task::spawn_blocking(move || {
            users::verify_password(&password, &stored, max_log_n)
        })
        .await;
        Ok(match verdict {
            Ok(Ok(true)) => found,
            Ok(Ok(false)) => None,
            Ok(Err(e)) => {
                warn!(user = ?name, error = %e, "stored password hash refused");
                None
            }
            Err(_) => None,
        })
    }

    async fn put(&mut self, path: VPath, size: u64, chunk: u64) -> Result<()> {
        let user = self.logged_in()?;
        let (home, name, quota) = (user.home.clone(), user.name.clone(), user.quota);
        if !transfer::valid_chunk_size(chunk) {
            return Err(Error::BadArgument(format!(
                "chunk size {chunk} is not a power of two from 1 KiB to 4 MiB"
            )));
        }
        let lock = self
            .server
            .lock_upload(&name, &path)
            .ok_or_else(|| Error::Busy(path.to_string()))?;
        let started = Instant::now();
        let staging = self.server.partial_dir(&name);
        let key = journal::key(&[&path.to_string()]);
        let part_path = staging.join(format!("{key}.part"));
        let journal_path = staging.join(format!("{key}.journal"));

        // Check the target and find what can be resumed.
        let (p, h, jp, pp) = (
            path.clone(),
            home.clone(),
            journal_path.clone(),
            part_path.clone(),
        );
        let (replaced, offers) = blocking(move || {
            let replaced = h.upload_target(&p)?;
            let offers = match Journal::load(&jp) {
                Ok(Some(r))
                    if r.kind == "upload" && r.target == p.to_string() && r.size == size =>
                {
                    std::fs::File::open(&pp)
                        .and_then(|f| {
                            let len = f.metadata()?.len();
                            transfer::offer(&f, size, chunk, &[len, r.verified.min(len)])
                        })
                        .unwrap_or_default()
                }
                Ok(_) => vec![],
                Err(e) => {
                    warn!(error = %e, "discarding a damaged upload journal");
                    vec![]
                }
            };
            Ok((replaced, offers))
        })
        .await?;
        // Reserve the space before the first byte.
        let charge = size.saturating_sub(replaced);
        self.server.ledger.reserve(&name, &path, charge, quota).inspect_err(|e| {
            info!(peer = %self.peer, user = %name, request = "PUT", path = %path, size, error = %e, "upload refused");
        })?;
        self.conn
            .reply(
                150,
                &format!("ready{}", protocol::format_candidates(&offers)),
            )
            .await?;

        let start = self.conn.read_frame_header().await.and_then(|start| {
            let offered = start.offset == 0 || offers.iter().any(|c| c.offset == start.offset);
            if start.kind == FrameKind::Start && offered {
                Ok(start)
            } else {
                Err(Error::Protocol(
                    "expected a start frame at 0 or at an offered offset".into(),
                ))
            }
        });
        let resume_at = match start {
            Ok(start) => start.offset,
            Err(e) => {
                if offers.is_empty() {
                    // No partial file exists for this path: nothing to keep space for.
                    self.server.ledger.release(&name, &path);
                }
                return Err(e);
            }
        };

        // Open the partial file at the agreed offset. A file of one chunk
        // is not worth a journal: after a failure it starts again.
        let journaled = size > chunk;
        let record = Record::new("upload", String::new(), path.to_string(), size, chunk);
        let (pp, jp) = (part_path.clone(), journal_path.clone());
        let opened = blocking(move || {
            let fail = Error::Storage;
            if let Some(dir) = pp.parent() {
                std::fs::create_dir_all(dir).map_err(fail)?;
            }
            let (file, tree) = transfer::open_partial(&pp, size, chunk, resume_at).map_err(fail)?;
            let journal = if journaled {
                file.sync_data().map_err(fail)?;
                let mut j = Journal::new(jp, record);
                j.save(resume_at).map_err(fail)?;
                Some(j)
            } else {
                None
            };
            Ok((Arc::new(file), tree, journal))
        })
        .await;
        let (file, tree, mut journal) = match opened {
            Ok(o) => o,
            Err(e) => {
                // The client is already sending: the session can't stay in step.
                self.server.ledger.release(&name, &path);
                return Err(Error::Unavailable(format!("cannot store the upload: {e}")));
            }
        };
        let t = &self.server.config.transfer;
        let checkpoints = Checkpoints {
            bytes: t.checkpoint_bytes.0.max(1),
            interval: Duration::from_secs(t.checkpoint_secs),
        };
        let plan = Plan {
            file: file.clone(),
            size,
            chunk,
            offset: resume_at,
            tree,
        };
        let received = transfer::receive(
            &mut self.conn,
            plan,
            &mut journal,
            checkpoints,
            &ProgressBar::hidden(),
        )
        .await;
        let outcome = match received {
            Ok(hash) => {
                let (h, p, pp) = (home.clone(), path.clone(), part_path.clone());
                let placed = blocking(move || {
                    file.sync_all().map_err(Error::Storage)?;
                    place(&pp, &h, &p)
                })
                .await;
                if let Some(j) = &journal {
                    j.remove();
                }
                match placed {
                    Ok(replaced) => {
                        self.server.ledger.commit(&name, &path, size, replaced);
                        Ok((hash, size))
                    }
                    Err(e) => {
                        let _ = std::fs::remove_file(&part_path);
                        self.server.ledger.release(&name, &path);
                        Err((e, size))
                    }
                }
            }
            Err(Stopped { error, verified }) => {
                let keep =
                    journal.is_some() && !matches!(error, Error::HashMismatch | Error::StorageFull);
                if keep {
                    // Keep what was verified for a later resume.
                    let _ = blocking(move || {
                        file.sync_data().map_err(Error::Storage)?;
                        if let Some(mut j) = journal {
                            j.save(verified).map_err(Error::Storage)?;
                        }
                        Ok(())
                    })
                    .await;
                } else {
                    // A wrong whole, a full disk or a small file: nothing worth resuming.
                    let _ = std::fs::remove_file(&part_path);
                    if let Some(j) = &journal {
                        j.remove();
                    }
                    self.server.ledger.release(&name, &path);
                }
                Err((error, verified))
            }
        };
        let ms = started.elapsed().as_millis() as u64;
        match outcome {
            Ok((hash, size)) => {
                info!(peer = %self.peer, user = %name, request = "PUT", path = %path, size, resumed_from = resume_at,
                      bytes = size - resume_at, hash = %protocol::hex(&hash), ms, result = "ok", "upload");
                drop(lock);
                self.conn
                    .reply(226, &format!("{} {size}", protocol::hex(&hash)))
                    .await
            }
            Err((error, verified)) => {
                info!(peer = %self.peer, user = %name, request = "PUT", path = %path, size, resumed_from = resume_at,
                      bytes = verified.saturating_sub(resume_at), ms, result = "failed", error = %error, "upload");
                Err(error)
            }
        }
    }

    /// `SEND`: a small upload whose frames follow the request at once. They
    /// are all read first, so that any refusal leaves the session in step.
    async fn send_small(&mut self, arg: String, size: u64) -> Result<()> {
        if size > protocol::MAX_SEND {
            return Err(Error::Protocol(format!(
                "SEND carries at most {} bytes",
                protocol::MAX_SEND
            )));
        }
        let started = Instant::now();
        let start = self.conn.read_frame_header().await?;
        if start.kind != FrameKind::Start || start.offset != 0 {
            return Err(Error::Protocol(
                "expected a start frame at 0 after SEND".into(),
            ));
        }
        let mut data = vec![0u8; usize::try_from(size).unwrap_or(0)];
        let mut chunk_hash = *blake3::hash(b"").as_bytes();
        if size > 0 {
            let chunk = self.conn.read_frame_header().await?;
            if chunk.kind != FrameKind::Chunk || chunk.offset != 0 || u64::from(chunk.len) != size {
                return Err(Error::Protocol("SEND carries its file as one chunk".into()));
            }
            self.conn.read_payload(&mut data).await?;
            chunk_hash = chunk.hash;
        }
        let end = self.conn.read_frame_header().await?;
        if end.kind != FrameKind::End || end.offset != size {
            return Err(Error::Protocol("expected the end frame of the SEND".into()));
        }
        // In step from here on, whatever happens.
        let hash = blake3::hash(&data);
        if hash.as_bytes() != &chunk_hash {
            return Err(Error::BadChunk(0));
        }
        if hash.as_bytes() != &end.hash {
            return Err(Error::HashMismatch);
        }
        let path = self.resolve(&arg)?;
        let user = self.logged_in()?;
        let (home, name, quota) = (user.home.clone(), user.name.clone(), user.quota);
        let lock = match self.server.lock_upload(&name, &path) {
            Some(lock) => lock,
            None => {
                // Perhaps held by one of this session's own SENDs still being stored.
                self.answer_stores(Drain::All).await?;
                self.server
                    .lock_upload(&name, &path)
                    .ok_or_else(|| Error::Busy(path.to_string()))?
            }
        };
        self.stores.push(Store {
            server: self.server.clone(),
            peer: self.peer,
            name,
            quota,
            home,
            path,
            data,
            hash,
            started,
            _lock: lock,
        });
        self.answer_stores(Drain::ToBound).await
    }

    /// Sends the replies of stored SENDs, in order, as they finish. Replies
    /// ready together go out together: the stream is flushed before waiting
    /// and when none is left, not per reply.
    async fn answer_stores(&mut self, drain: Drain) -> Result<()> {
        loop {
            if matches!(drain, Drain::ToBound) && !self.stores.over_bound() {
                return Ok(());
            }
            let Some(reply) = self.stores.replies.front_mut() else {
                return self.conn.flush().await;
            };
            let outcome = match reply.outcome.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => {
                    self.conn.flush().await?;
                    match drain {
                        Drain::UntilInput => tokio::select! {
                            biased;
                            () = self.conn.input() => return Ok(()),
                            outcome = &mut reply.outcome => outcome.ok(),
                        },
                        _ => (&mut reply.outcome).await.ok(),
                    }
                }
                ready => ready.ok(),
            };
            self.stores.pop();
            let outcome = outcome.unwrap_or_else(|| {
                Err(Error::Storage(std::io::Error::other(
                    "the store task ended",
                )))
            });
            // A store that failed (quota, storage) leaves the stream in step:
            // the session goes on.
            match outcome {
                Ok(text) => self.conn.write_line(&format!("226 {text}")).await?,
                Err(e) => self.conn.reply(e.reply_code(), &e.to_string()).await?,
            }
        }
    }

    async fn get(&mut self, path: VPath, candidates: Vec<protocol::Candidate>) -> Result<()> {
        let home = self.logged_in()?.home.clone();
        let name = self.user_name().to_string();
        let chunk = self.server.config.transfer.chunk_size.0;
        let started = Instant::now();
        let p = path.clone();
        let plan = blocking(move || {
            let file = home.open_read(&p)?;
            let size = file.metadata().map_err(Error::Storage)?.len();
            let (offset, tree) =
                transfer::choose(&file, size, chunk, &candidates).map_err(Error::Storage)?;
            Ok(Plan {
                file: Arc::new(file),
                size,
                chunk,
                offset,
                tree,
            })
        })
        .await?;
        let (size, offset) = (plan.size, plan.offset);
        self.conn
            .reply(151, &format!("{size} {offset} {chunk}"))
            .await?;
        let sent = transfer::send(&mut self.conn, plan, &ProgressBar::hidden()).await;
        let ms = started.elapsed().as_millis() as u64;
        match sent {
            Ok(hash) => {
                info!(peer = %self.peer, user = %name, request = "GET", path = %path, size, resumed_from = offset,
                      bytes = size - offset, hash = %protocol::hex(&hash), ms, result = "ok", "download");
                Ok(())
            }
            Err(e) => {
                info!(peer = %self.peer, user = %name, request = "GET", path = %path, size, resumed_from = offset,
                      ms, result = "failed", error = %e, "download");
                // After frames started, only a closed session keeps both ends in step.
                Err(Error::Unavailable(format!("download failed: {e}")))
            }
        }
    }
}

/// Moves a finished upload from the staging file `part` onto `target` in the
/// home, atomically, and makes the rename durable. Returns the size of the
/// file it replaced.
fn place(part: &std::path::Path, home: &Home, target: &VPath) -> Result<u64> {
    let staging_dir = part.parent().unwrap_or(std::path::Path::new("."));
    let staging = cap_std::fs::Dir::open_ambient_dir(staging_dir, cap_std::ambient_authority())
        .map_err(Error::Storage)?;
    let replaced = home.file_size(target);
    staging
        .rename(
            part.file_name().unwrap_or_default(),
            home.dir(),
            target.rel(),
        )
        .map_err(|e| Error::fs(e, &target.to_string()))?;
    if let Err(e) = home.sync_dir(&target.parent()) {
        warn!(path = %target, error = %e, "could not make the rename durable");
    }
    Ok(replaced)
}

/// A small upload (SEND) that arrived whole and verified, waiting to be
/// written into its home.
struct Store {
    server: Arc<Server>,
    peer: SocketAddr,
    name: String,
    quota: u64,
    home: Home,
    path: VPath,
    data: Vec<u8>,
    hash: blake3::Hash,
    started: Instant,
    _lock: UploadLock,
}

impl Store {
    /// Charges the quota, writes a staging file and moves it into place.
    /// Returns the text of the 226 reply.
    fn write(self) -> Result<String> {
        let Store {
            server,
            peer,
            name,
            quota,
            home,
            path,
            data,
            hash,
            started,
            _lock,
        } = self;
        let size = data.len() as u64;
        let stored = home.upload_target(&path).and_then(|replaced| {
            server
                .ledger
                .reserve(&name, &path, size.saturating_sub(replaced), quota)?;
            let part = server
                .partial_dir(&name)
                .join(format!("{}.part", journal::key(&[&path.to_string()])));
            let write = || -> std::io::Result<()> {
                if let Some(dir) = part.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let mut f = std::fs::File::create(&part)?;
                std::io::Write::write_all(&mut f, &data)?;
                f.sync_all()
            };
            let placed = write()
                .map_err(|e| Error::fs(e, &path.to_string()))
                .and_then(|()| place(&part, &home, &path));
            match placed {
                Ok(replaced) => server.ledger.commit(&name, &path, size, replaced),
                Err(_) => {
                    let _ = std::fs::remove_file(&part);
                    server.ledger.release(&name, &path);
                }
            }
            placed
        });
        let ms = started.elapsed().as_millis() as u64;
        match stored {
            Ok(_) => {
                info!(peer = %peer, user = %name, request = "SEND", path = %path, size,
                      bytes = size, hash = %protocol::hex(&hash), ms, result = "ok", "upload");
                Ok(format!("{} {size}", protocol::hex(&hash)))
            }
            Err(e) => {
                info!(peer = %peer, user = %name, request = "SEND", path = %path, size,
                      code = e.reply_code(), error = %e, ms, "request failed");
                Err(e)
            }
        }
    }
}

/// The SENDs of one session that are verified but not yet answered. One
/// task on the blocking pool at a time writes them, in the order they came,
/// while the session reads on; their replies go out in the same order,
/// before any other request is handled. In flight: at most
/// [`Stores::MAX_FILES`] files and [`Stores::MAX_BYTES`] bytes.
#[derive(Default)]
struct Stores {
    queue: Arc<Mutex<StoreQueue>>,
    replies: VecDeque<StoreReply>,
    bytes: u64,
}

#[derive(Default)]
struct StoreQueue {
    jobs: VecDeque<(Store, oneshot::Sender<Result<String>>)>,
    writing: bool,
}

struct StoreReply {
    outcome: oneshot::Receiver<Result<String>>,
    bytes: u64,
}

/// How far [`Session::answer_stores`] goes.
#[derive(Clone, Copy)]
enum Drain {
    /// Every SEND is answered.
    All,
    /// Until the SENDs in flight are within bounds.
    ToBound,
    /// Until the client has sent more, or every SEND is answered.
    UntilInput,
}

impl Stores {
    const MAX_FILES: usize = 64;
    const MAX_BYTES: u64 = 2 * protocol::MAX_SEND;

    fn push(&mut self, store: Store) {
        let bytes = store.data.len() as u64;
        let (done, outcome) = oneshot::channel();
        self.replies.push_back(StoreReply { outcome, bytes });
        self.bytes += bytes;
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.jobs.push_back((store, done));
        if !queue.writing {
            queue.writing = true;
            let queue = self.queue.clone();
            tokio::task::spawn_blocking(move || write_stores(&queue));
        }
    }

    fn pop(&mut self) {
        if let Some(reply) = self.replies.pop_front() {
            self.bytes -= reply.bytes;
        }
    }

    fn over_bound(&self) -> bool {
        self.replies.len() > Self::MAX_FILES || self.bytes > Self::MAX_BYTES
    }

    /// Waits until every store handed over has finished, without answering.
    async fn finish(&mut self) {
        while let Some(reply) = self.replies.pop_front() {
            let _ = reply.outcome.await;
        }
        self.bytes = 0;
    }
}

/// The blocking side of [`Stores`]: writes queued stores until none is left.
fn write_stores(queue: &Mutex<StoreQueue>) {
    let lock = || queue.lock().unwrap_or_else(|e| e.into_inner());
    /// Should a store panic, the queue is left with no writer and no
    /// orphaned job (their replies turn into errors).
    struct Unwind<'a>(&'a Mutex<StoreQueue>);
    impl Drop for Unwind<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let mut queue = self.0.lock().unwrap_or_else(|e| e.into_inner());
                queue.writing = false;
                queue.jobs.clear();
            }
        }
    }
    let _unwind = Unwind(queue);
    loop {
        let next = {
            let mut queue = lock();
            let next = queue.jobs.pop_front();
            // Under the same lock as the pop, so a push never finds a writer that is leaving.
            queue.writing = next.is_some();
            next
        };
        let Some((store, done)) = next else { return };
        let _ = done.send(store.write());
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
