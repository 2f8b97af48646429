//! Login and registration: the password checked on a fair hashing turn,
//! guesses counted by the defender, then the user's home opened and the
//! quota ledger told of the session.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{Session, blocking};
use crate::error::{Error, Result};
use crate::protocol::{Code, VPath};
use crate::store::jail::Home;
use crate::store::quota::{self, Limits};
use crate::store::upload::Owner;
use crate::store::users::{self, Password, User};
use crate::transfer::connection::Stream;

impl<S: Stream> Session<S> {
    pub(super) async fn login(
        &mut self,
        name: String,
        password: Password,
        register: bool,
    ) -> Result<()> {
        if self.user.is_some() {
            return Err(Error::BadSequence("already logged in".into()));
        }
        let started = Instant::now();
        // Read before the account: a change made meanwhile is seen later.
        let version = self.server.users.version();
        let tried = shown(&name).to_string();
        let user = match register {
            true => self.register(name, password).await,
            false => self.authenticate(name, password, started).await,
        };
        let user = match user {
            Ok(user) => user,
            Err(e) => {
                if register {
                    info!(event = "register", peer = %self.peer, user = tried.as_str(), result = "refused",
                          code = e.reply_code().number(), error = %e, "registration refused");
                }
                // A failed login has logged its own line.
                self.note.logged = register || matches!(e, Error::LoginFailed);
                return Err(e);
            }
        };
        let owner = self.open_account(&user).await?;
        self.note.logged = true;
        self.server.metrics.login("ok");
        self.seat.entry.logged_in(&owner.name);
        info!(event = "login", peer = %self.peer, user = owner.name.as_str(), result = "ok", ms = started.elapsed().as_millis() as u64, "logged in");
        self.user = Some(owner);
        self.counted = true;
        self.account_read = version;
        self.cwd = VPath::root();
        self.reply(Code::LoggedIn, "logged in").await
    }

    /// Creates an account for a stranger, with a quota drawn at random.
    async fn register(&self, name: String, password: Password) -> Result<User> {
        let server = self.server.clone();
        let accounts = &server.config.accounts;
        if !accounts.registration {
            return Err(Error::NameRefused(
                "registration is switched off on this server".into(),
            ));
        }
        users::check_name(&name).map_err(Error::NameRefused)?;
        users::check_password(&password, accounts).map_err(Error::BadArgument)?;
        if !server.may_register(self.peer.ip()).await? {
            return Err(Error::Throttled(
                "too many registrations from your address; try again later".into(),
            ));
        }
        let quota =
            rand::random_range(accounts.registered_quota_min.0..=accounts.registered_quota_max.0);
        let permit = server.hash_permit(self.peer.ip()).await?;
        let (db, settings) = (server.users.clone(), accounts.clone());
        let partial_root = server.config.partial_dir();
        // A session of a deleted account of that name may still be open.
        if server.ledger.has_sessions(&name)? {
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
        let user = user?;
        self.server.metrics.registered();
        info!(event = "register", peer = %self.peer, user = user.name.as_str(), quota = user.quota, result = "ok", "registered");
        Ok(user)
    }

    /// The account, if the password is right. Every failure, whatever its
    /// cause, is answered after the same delay, growing with repeated
    /// failures; a guess the defender refuses is not even checked.
    async fn authenticate(
        &self,
        name: String,
        password: Password,
        started: Instant,
    ) -> Result<User> {
        let server = self.server.clone();
        let base = Duration::from_millis(server.config.accounts.login_failure_delay_ms);
        // Counted in flight from here until settled below; a login that
        // ends in between (no hashing turn came) was never evaluated.
        let Ok(attempt) = server.admit(self.peer.ip(), &name).await? else {
            // Refused without hashing, answered like any other failure.
            tokio::time::sleep_until((started + base).into()).await;
            self.server.metrics.login("banned");
            info!(event = "login_failed", peer = %self.peer, user = shown(&name), result = "banned", "login refused: banned");
            return Err(Error::LoginFailed);
        };
        match self.check_login(&name, password).await? {
            Some(user) => {
                attempt.succeeded();
                Ok(user)
            }
            None => {
                let delay = attempt.failed(base);
                tokio::time::sleep_until((started + delay).into()).await;
                self.server.metrics.login("failed");
                info!(event = "login_failed", peer = %self.peer, user = shown(&name), result = "failed", delay_ms = delay.as_millis() as u64, "login failed");
                Err(Error::LoginFailed)
            }
        }
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
                    // Told as it is: the service, not the password, failed.
                    warn!(event = "error", error = %e, "cannot read the user database");
                    return Err(Error::Unavailable(crate::cluster::UNAVAILABLE.into()));
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
                warn!(event = "error", user = shown(name), error = %e, "stored password hash refused");
                None
            }
            Err(_) => None,
        })
    }

    /// Opens the user's home and registers the session with the quota
    /// ledger, which rebuilds the usage from disk for a first session.
    async fn open_account(&self, user: &User) -> Result<Owner> {
        let server = &self.server;
        let home_path = server.users.home(&user.name);
        let name = user.name.clone();
        let home = blocking(move || {
            if !home_path.exists() {
                std::fs::create_dir_all(&home_path).map_err(Error::Storage)?;
            }
            Home::open(&home_path).map_err(Error::Storage)
        })
        .await
        .inspect_err(
            |e| warn!(event = "error", user = user.name.as_str(), error = %e, "cannot open home"),
        )?;
        let owner = Owner {
            ledger: server.ledger.clone(),
            staging: server.partial_dir(&name),
            limits: Limits {
                bytes: user.quota,
                entries: user.max_files(&server.config.accounts),
            },
            name,
            home,
        };
        let (o, ttl) = (owner.clone(), server.config.partial_ttl());
        blocking(move || {
            o.ledger
                .open_session(&o.name, || quota::scan(&o.home, &o.staging, ttl))
        })
        .await?;
        Ok(owner)
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
