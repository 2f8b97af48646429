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

use crate::error::{Error, Result};
use crate::protocol::VPath;
use crate::protocol::{self, FrameKind, ParseError, Request};
use crate::server::Server;
use crate::store::jail::Home;
use crate::store::quota::{self, Limits, UploadLock, Usage};
use crate::store::upload::{self, Owner, Upload};
use crate::store::users::{self, Password, User};
use crate::transfer::connection::Connection;
use crate::transfer::{self, Checkpoints, Plan, Stopped};

pub struct Session<S> {
    conn: Connection<S>,
    peer: SocketAddr,
    server: Arc<Server>,
    user: Option<Owner>,
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

    fn logged_in(&self) -> Result<&Owner> {
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
            // Its frames follow at once: they are read (and the SEND refused)
            // before anything else, or they would be taken for request lines.
            Request::Send { path, size } => self.send_small(path, size).await,
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
                let owner = self.logged_in()?.clone();
                let p = path.clone();
                let one = Usage {
                    bytes: 0,
                    entries: 1,
                };
                blocking(move || {
                    owner.ledger.with(&owner.name, |a| {
                        a.check_add(one, owner.limits)?;
                        owner.home.mkdir(&p)?;
                        a.added(one);
                        Ok(())
                    })
                })
                .await?;
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
                let owner = self.logged_in()?.clone();
                let p = path.clone();
                blocking(move || {
                    owner.ledger.with(&owner.name, |a| {
                        owner.home.rmdir(&p)?;
                        a.removed(Usage {
                            bytes: 0,
                            entries: 1,
                        });
                        Ok(())
                    })
                })
                .await?;
                self.log_ok("RMD", &path, 0);
                self.conn.reply(200, "directory removed").await
            }
            Request::Dele(arg) => {
                let path = self.resolve(&arg)?;
                let owner = self.logged_in()?.clone();
                let _busy = self.lock_upload(&path)?;
                let p = path.clone();
                let freed = blocking(move || {
                    owner.ledger.with(&owner.name, |a| {
                        let bytes = owner.home.remove_file(&p)?;
                        a.removed(Usage { bytes, entries: 1 });
                        Ok(bytes)
                    })
                })
                .await?;
                self.log_ok("DELE", &path, freed);
                self.conn.reply(200, "file removed").await
            }
            Request::Rename { from, to } => {
                let (from, to) = (self.resolve(&from)?, self.resolve(&to)?);
                let owner = self.logged_in()?.clone();
                let _busy = self.lock_upload(&from)?;
                let f = from.clone();
                let target = blocking(move || {
                    owner.ledger.with(&owner.name, |a| {
                        let (target, replaced) = owner.home.rename(&f, &to)?;
                        if let Some(bytes) = replaced {
                            a.removed(Usage { bytes, entries: 1 });
                        }
                        Ok(target)
                    })
                })
                .await?;
                info!(peer = %self.peer, user = self.user_name(), request = "RENAME", from = %from, to = %target, result = "ok");
                self.conn
                    .reply(
                        200,
                        &format!("renamed to {}", protocol::quote(&target.to_string())),
                    )
                    .await
            }
            Request::Quota => {
                let owner = self.logged_in()?;
                let (used, (unfinished, count)) = owner
                    .ledger
                    .with(&owner.name, |a| (a.used(), a.unfinished()));
                let Limits { bytes, entries } = owner.limits;
                self.conn
                    .reply(
                        213,
                        &format!(
                            "{} {bytes} {} {entries} {} {count}",
                            used.bytes, used.entries, unfinished.bytes
                        ),
                    )
                    .await
            }
            Request::Parts => {
                let owner = self.logged_in()?.clone();
                let parts =
                    blocking(move || upload::unfinished(&owner).map_err(Error::Storage)).await?;
                for p in &parts {
                    self.conn
                        .write_line(&format!(
                            "213-{} {} {} {}",
                            p.size,
                            p.verified,
                            p.updated,
                            protocol::quote(&p.target)
                        ))
                        .await?;
                }
                self.conn
                    .reply(213, &format!("{} unfinished uploads", parts.len()))
                    .await
            }
            Request::Discard(arg) => {
                let path = self.resolve(&arg)?;
                let owner = self.logged_in()?.clone();
                let p = path.clone();
                let size = blocking(move || upload::discard(&owner, &p)).await?;
                self.log_ok("DISCARD", &path, size);
                self.conn.reply(200, "unfinished upload discarded").await
            }
            Request::Put { path, size, chunk } => {
                let path = self.resolve(&path)?;
                self.put(path, size, chunk).await
            }
            Request::Get { path, candidates } => {
                let path = self.resolve(&path)?;
                self.get(path, candidates).await
            }
        }
    }

    /// The one upload lock of `path`: an upload, a removal or a rename of it.
    fn lock_upload(&self, path: &VPath) -> Result<UploadLock> {
        let owner = self.logged_in()?;
        owner
            .ledger
            .lock_upload(&owner.name, path)
            .ok_or_else(|| Error::Busy(path.to_string()))
    }

    fn log_ok(&self, request: &'static str, path: &VPath, bytes: u64) {
        info!(peer = %self.peer, user = self.user_name(), request, path = %path, bytes, result = "ok");
    }

    async fn help(&mut self) -> Result<()> {
        let verbs = "LOGIN REGISTER PWD CWD LIST STAT HASH MKD RMD DELE RENAME QUOTA PARTS DISCARD PUT SEND GET NOOP HELP QUIT";
        self.conn.write_line(&format!("211-{verbs}")).await?;
        self.conn
            .reply(211, "see the protocol documentation in src/protocol/mod.rs")
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
            let partial_root = server.config.partial_dir();
            // A session of a deleted account of that name may still be open.
            if server.ledger.has_sessions(&name) {
                return Err(Error::NameRefused(format!("the name {name:?} is taken")));
            }
            let user = blocking(move || {
                let hash = users::hash_password(&password, &settings)
                    .map_err(|e| Error::Storage(std::io::Error::other(e)))?;
                let user = User {
                    name,
                    quota,
                    hash,
                    created: crate::clock::now_secs(),
                    max_files: Some(settings.registered_max_files),
                };
                db.register(user.clone(), &partial_root).map_err(|e| {
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
                info!(peer = %self.peer, user = ?shown(&name), result = "banned", "login");
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
                    info!(peer = %self.peer, user = ?shown(&name), result = "failed", delay_ms = delay.as_millis() as u64, "login");
                    return Err(Error::LoginFailed);
                }
            }
        };
        let home_path = server.users.home(&user.name);
        let name = user.name.clone();
        let home = blocking(move || {
            if !home_path.exists() {
                std::fs::create_dir_all(&home_path).map_err(Error::Storage)?;
            }
            Home::open(&home_path).map_err(Error::Storage)
        })
        .await
        .inspect_err(|e| warn!(user = %name, error = %e, "cannot open home"))?;
        let owner = Owner {
            ledger: server.ledger.clone(),
            staging: server.partial_dir(&name),
            limits: Limits {
                bytes: user.quota,
                entries: user.max_files(accounts),
            },
            name,
            home,
        };
        let (o, ttl) = (owner.clone(), server.config.partial_ttl());
        blocking(move || {
            o.ledger
                .open_session(&o.name, || quota::scan(&o.home, &o.staging, ttl))
                .map_err(Error::Storage)
        })
        .await?;
        info!(peer = %self.peer, user = %owner.name, result = "ok", ms = started.elapsed().as_millis() as u64, "login");
        self.user = Some(owner);
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
                warn!(user = ?shown(name), error = %e, "stored password hash refused");
                None
            }
            Err(_) => None,
        })
    }

    async fn put(&mut self, path: VPath, size: u64, chunk: u64) -> Result<()> {
        let owner = self.logged_in()?.clone();
        let name = owner.name.clone();
        if !protocol::valid_chunk_size(chunk) {
            return Err(Error::BadArgument(format!(
                "chunk size {chunk} is not a power of two from 1 KiB to 4 MiB"
            )));
        }
        let lock = self.lock_upload(&path)?;
        let started = Instant::now();

        // Check the target, reserve the space before the first byte, and
        // find what can be resumed.
        let p = path.clone();
        let (mut upload, offers) = blocking(move || {
            let upload = Upload::begin(lock, &owner, p, size)?;
            let offers = upload.offers(chunk);
            Ok((upload, offers))
        })
        .await
        .inspect_err(|e| {
            info!(peer = %self.peer, user = %name, request = "PUT", path = %path, size, error = %e, "upload refused");
        })?;
        self.conn
            .reply(
                150,
                &format!("ready{}", protocol::format_candidates(&offers)),
            )
            .await?;

        // A wrong start frame ends the session; the upload, dropped, keeps
        // an earlier partial of the path and frees the rest.
        let start = self.conn.read_frame_header().await?;
        let offered = start.offset == 0 || offers.iter().any(|c| c.offset == start.offset);
        if start.kind != FrameKind::Start || !offered {
            return Err(Error::Protocol(
                "expected a start frame at 0 or at an offered offset".into(),
            ));
        }
        let resume_at = start.offset;

        let opened = blocking(move || {
            let opened = upload.open(chunk, resume_at).map_err(Error::Storage);
            Ok((upload, opened))
        })
        .await;
        let (file, tree, mut journal, upload) = match opened {
            Ok((upload, Ok((file, tree, journal)))) => (Arc::new(file), tree, journal, upload),
            Ok((_, Err(e))) | Err(e) => {
                // The client is already sending: the session can't stay in step.
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
                let landed = blocking(move || {
                    file.sync_all().map_err(Error::Storage)?;
                    let part = upload.files().part.clone();
                    upload.land(&part)
                })
                .await;
                landed.map(|()| (hash, size)).map_err(|e| (e, size))
            }
            Err(Stopped { error, verified }) => {
                let keep =
                    journal.is_some() && !matches!(error, Error::HashMismatch | Error::StorageFull);
                // Keep what was verified for a later resume; a wrong whole, a
                // full disk or a small file is not worth resuming.
                let _ = blocking(move || {
                    if !keep {
                        upload.discard();
                        return Ok(());
                    }
                    let saved = file.sync_data().and_then(|()| match journal {
                        Some(mut j) => j.save(verified),
                        None => Ok(()),
                    });
                    match saved {
                        Ok(()) => upload.park(),
                        Err(e) => {
                            warn!(path = %upload.path(), error = %e, "cannot keep a partial upload");
                            upload.park();
                        }
                    }
                    Ok(())
                })
                .await;
                Err((error, verified))
            }
        };
        let ms = started.elapsed().as_millis() as u64;
        match outcome {
            Ok((hash, size)) => {
                info!(peer = %self.peer, user = %name, request = "PUT", path = %path, size, resumed_from = resume_at,
                      bytes = size - resume_at, hash = %protocol::hex(&hash), ms, result = "ok", "upload");
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
        let owner = self.logged_in()?.clone();
        let lock = match self.lock_upload(&path) {
            Ok(lock) => lock,
            Err(_) => {
                // Perhaps held by one of this session's own SENDs still being stored.
                self.answer_stores(Drain::All).await?;
                self.lock_upload(&path)?
            }
        };
        self.stores.push(Store {
            peer: self.peer,
            owner,
            path,
            data,
            hash,
            started,
            lock,
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

/// A small upload (SEND) that arrived whole and verified, waiting to be
/// written into its home.
struct Store {
    peer: SocketAddr,
    owner: Owner,
    path: VPath,
    data: Vec<u8>,
    hash: blake3::Hash,
    started: Instant,
    lock: UploadLock,
}

impl Store {
    /// Charges the quota, writes a staging file and moves it into place.
    /// Returns the text of the 226 reply.
    fn write(self) -> Result<String> {
        let Store {
            peer,
            owner,
            path,
            data,
            hash,
            started,
            lock,
        } = self;
        let size = data.len() as u64;
        let stored = Upload::begin(lock, &owner, path.clone(), size).and_then(|u| u.store(&data));
        let (ms, name) = (started.elapsed().as_millis() as u64, &owner.name);
        match stored {
            Ok(()) => {
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

/// A user name as sent, cut for a log line: a name that is not a valid user
/// name can be as long as a request line.
fn shown(name: &str) -> &str {
    match name.char_indices().nth(users::MAX_NAME_LEN) {
        Some((end, _)) => &name[..end],
        None => name,
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
