//! The quota ledger: how many bytes each user stores, and how many are
//! promised to uploads under way.
//!
//! A user's usage is the bytes of the regular files in the home plus, for
//! each unfinished upload (running or waiting to be resumed), what it will
//! add: its declared size less the size of the file it replaces. Space is
//! reserved when an upload starts, before its first byte, under one lock, so
//! concurrent sessions of one user cannot together pass the limit. Usage may
//! reach the limit exactly.
//!
//! The ledger is rebuilt from disk (a walk of the home and the user's upload
//! journals) when a user logs in with no other session open, so it stays
//! right across restarts, crashes and changes made by an admin.

use std::collections::HashMap;
use std::sync::Mutex;

use std::path::Path;
use std::time::Duration;

use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::jail::{Home, VPath};
use crate::journal::Journal;

#[derive(Debug, Default)]
struct Account {
    /// Bytes in regular files in the home.
    stored: u64,
    /// Bytes promised to unfinished uploads, by target path.
    reserved: HashMap<VPath, u64>,
    /// Open sessions of this user.
    sessions: usize,
}

impl Account {
    fn used(&self) -> u64 {
        self.reserved
            .values()
            .fold(self.stored, |a, b| a.saturating_add(*b))
    }
}

#[derive(Debug, Default)]
pub struct Ledger {
    accounts: Mutex<HashMap<String, Account>>,
}

/// A snapshot of what is on disk, to (re)build an account from.
pub struct Scan {
    pub stored: u64,
    pub reserved: Vec<(VPath, u64)>,
}

impl Ledger {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Account>> {
        // A panic while holding the lock leaves plain numbers behind, still usable.
        self.accounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a session of `user`. When it is the user's first, the
    /// account is rebuilt from `scan()`.
    pub fn open_session(
        &self,
        user: &str,
        scan: impl FnOnce() -> std::io::Result<Scan>,
    ) -> std::io::Result<()> {
        let first = self.lock().get(user).is_none_or(|a| a.sessions == 0);
        // Scan outside the lock: a big home takes a while. Two first sessions
        // at once both scan; the second result simply replaces the first.
        let fresh = if first { Some(scan()?) } else { None };
        let mut accounts = self.lock();
        let account = accounts.entry(user.to_string()).or_default();
        if let Some(scan) = fresh
            && account.sessions == 0
        {
            account.stored = scan.stored;
            account.reserved = scan.reserved.into_iter().collect();
        }
        account.sessions += 1;
        Ok(())
    }

    pub fn close_session(&self, user: &str) {
        if let Some(a) = self.lock().get_mut(user) {
            a.sessions = a.sessions.saturating_sub(1);
        }
    }

    /// Bytes used, reservations included.
    pub fn used(&self, user: &str) -> u64 {
        self.lock().get(user).map_or(0, Account::used)
    }

    /// Reserves `charge` bytes for an upload to `path`, replacing what an
    /// earlier attempt at the same path had reserved.
    pub fn reserve(&self, user: &str, path: &VPath, charge: u64, quota: u64) -> Result<()> {
        let mut accounts = self.lock();
        let account = accounts.entry(user.to_string()).or_default();
        let others = account
            .used()
            .saturating_sub(account.reserved.get(path).copied().unwrap_or(0));
        let available = quota.saturating_sub(others);
        if charge > available {
            return Err(Error::QuotaExceeded {
                needed: charge,
                available,
            });
        }
        account.reserved.insert(path.clone(), charge);
        Ok(())
    }

    /// Drops the reservation for `path` (the partial upload is gone).
    pub fn release(&self, user: &str, path: &VPath) {
        if let Some(a) = self.lock().get_mut(user) {
            a.reserved.remove(path);
        }
    }

    /// An upload to `path` became a file of `size` bytes, replacing one of `replaced` bytes.
    pub fn commit(&self, user: &str, path: &VPath, size: u64, replaced: u64) {
        if let Some(a) = self.lock().get_mut(user) {
            a.reserved.remove(path);
            a.stored = a.stored.saturating_sub(replaced).saturating_add(size);
        }
    }

    /// Files of `bytes` bytes were removed.
    pub fn freed(&self, user: &str, bytes: u64) {
        if let Some(a) = self.lock().get_mut(user) {
            a.stored = a.stored.saturating_sub(bytes);
        }
    }
}

/// What a user stores: the home's bytes and a reservation for each
/// unfinished upload in `partial_dir`. With `ttl`, uploads untouched for
/// that long, damaged journals and partial files without one are deleted on
/// the way; without, nothing is changed.
pub fn scan(home: &Home, partial_dir: &Path, ttl: Option<Duration>) -> std::io::Result<Scan> {
    let stored = home.usage()?;
    let mut reserved = vec![];
    let now = crate::users::now_secs();
    let entries = match std::fs::read_dir(partial_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Scan { stored, reserved }),
        Err(e) => return Err(e),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "journal") {
            continue;
        }
        let part = path.with_extension("part");
        let record = match Journal::load(&path) {
            Ok(Some(r)) if ttl.is_none_or(|ttl| now.saturating_sub(r.updated) < ttl.as_secs()) => r,
            _ if ttl.is_none() => continue,
            other => {
                if let Err(e) = other {
                    warn!(error = %e, "removing a damaged upload journal");
                } else {
                    info!(journal = %path.display(), "removing an expired partial upload");
                }
                let _ = std::fs::remove_file(&part);
                let _ = std::fs::remove_file(&path);
                continue;
            }
        };
        if let Ok(target) = VPath::resolve(&VPath::root(), &record.target, usize::MAX) {
            let charge = record.size.saturating_sub(home.file_size(&target));
            reserved.push((target, charge));
        }
    }
    // Partial files with no journal are leftovers of a crash before the first save.
    if let (Some(_), Ok(entries)) = (ttl, std::fs::read_dir(partial_dir)) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "part")
                && !path.with_extension("journal").exists()
            {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(Scan { stored, reserved })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> VPath {
        VPath::resolve(&VPath::root(), s, 100).unwrap()
    }

    fn ledger(stored: u64) -> Ledger {
        let l = Ledger::default();
        l.open_session("u", || {
            Ok(Scan {
                stored,
                reserved: vec![],
            })
        })
        .unwrap();
        l
    }

    #[test]
    fn reservations_reach_the_limit_exactly() {
        let l = ledger(40);
        l.reserve("u", &p("a"), 30, 100).unwrap();
        l.reserve("u", &p("b"), 30, 100).unwrap();
        assert!(matches!(
            l.reserve("u", &p("c"), 1, 100),
            Err(Error::QuotaExceeded {
                needed: 1,
                available: 0
            })
        ));
        // A second attempt at the same path replaces its own reservation.
        l.reserve("u", &p("b"), 29, 100).unwrap();
        l.reserve("u", &p("c"), 1, 100).unwrap();
        assert_eq!(l.used("u"), 100);
    }

    #[test]
    fn commit_counts_the_difference() {
        let l = ledger(60);
        l.reserve("u", &p("f"), 10, 100).unwrap();
        l.commit("u", &p("f"), 70, 60);
        assert_eq!(l.used("u"), 70);
        l.freed("u", 70);
        assert_eq!(l.used("u"), 0);
        l.release("u", &p("none"));
    }

    #[test]
    fn no_overflow_at_the_edges() {
        let l = ledger(u64::MAX - 1);
        assert!(l.reserve("u", &p("a"), u64::MAX, u64::MAX).is_err());
        l.reserve("u", &p("a"), 1, u64::MAX).unwrap();
        let zero = ledger(0);
        assert!(zero.reserve("u", &p("a"), 1, 0).is_err());
        zero.reserve("u", &p("a"), 0, 0).unwrap();
    }

    #[test]
    fn rebuilt_only_when_no_session_is_open() {
        let l = ledger(5);
        l.open_session("u", || panic!("must not rescan while a session is open"))
            .unwrap();
        l.close_session("u");
        l.close_session("u");
        l.open_session("u", || {
            Ok(Scan {
                stored: 9,
                reserved: vec![(p("x"), 1)],
            })
        })
        .unwrap();
        assert_eq!(l.used("u"), 10);
    }
}
