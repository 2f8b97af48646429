//! The quota ledger: what each user occupies on the server, in bytes and in
//! entries (files and directories), and which uploads are under way.
//!
//! A user's usage is what the home holds (the bytes of its regular files;
//! every file, directory and link as one entry) plus a charge for each
//! unfinished upload:
//!
//! - an upload that is running is charged what it will add when it lands:
//!   its declared size less the size of the file it replaces, and one entry
//!   if it makes a new name. Space is reserved before its first byte, under
//!   the account's lock, so concurrent sessions of one user cannot together
//!   pass the limit;
//! - when it lands, the charge is settled against what it really replaces
//!   at that moment, under the same lock as the rename: if the file it was
//!   to replace has gone (moved, deleted), the new file must fit on its own;
//! - a partial upload that outlives its session (kept to be resumed) is
//!   charged in full, its declared size and one entry, until it is resumed,
//!   discarded or expires: it occupies the disk beside whatever it was to
//!   replace. It is kept only if that full charge fits; otherwise it is
//!   removed when its session lets go of it.
//!
//! So at rest a user never occupies more than the limits. While uploads that
//! replace files run, the files they replace are on the disk beside their
//! partials: at most one running upload per path, so that is at most what
//! the home holds.
//!
//! Every change to a home that alters what it holds (an upload landing, a
//! file removed or renamed, a directory made or removed) is made under the
//! account's lock, so the numbers and the disk move together. Usage may
//! reach a limit exactly.
//!
//! The ledger is rebuilt from disk (a walk of the home and the user's upload
//! journals) when a user logs in with no other session open, so it stays
//! right across restarts, crashes and changes made by an admin.
//!
//! The ledger also holds the upload locks: one upload per user and path.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::protocol::VPath;
use crate::store::jail::Home;
use crate::transfer::journal::{self, Journal};

/// What a user occupies, or what an upload will add.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    /// Files, directories and other names.
    pub entries: u64,
}

impl Usage {
    fn plus(self, other: Usage) -> Usage {
        Usage {
            bytes: self.bytes.saturating_add(other.bytes),
            entries: self.entries.saturating_add(other.entries),
        }
    }

    fn minus(self, other: Usage) -> Usage {
        Usage {
            bytes: self.bytes.saturating_sub(other.bytes),
            entries: self.entries.saturating_sub(other.entries),
        }
    }

    /// What an upload of `size` bytes adds when it lands where `replaced`
    /// is (the size of a file there; None when the name is new).
    pub fn landing(size: u64, replaced: Option<u64>) -> Usage {
        Usage {
            bytes: size.saturating_sub(replaced.unwrap_or(0)),
            entries: u64::from(replaced.is_none()),
        }
    }

    /// What a partial upload of `size` bytes is charged once its session is gone.
    pub fn parked(size: u64) -> Usage {
        Usage {
            bytes: size,
            entries: 1,
        }
    }
}

/// A user's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The quota, in bytes.
    pub bytes: u64,
    /// Files plus directories.
    pub entries: u64,
}

/// One user's numbers.
#[derive(Debug, Default)]
pub struct Account {
    /// What the home holds.
    stored: Usage,
    /// Unfinished uploads (running or waiting to be resumed), by target path.
    reserved: HashMap<VPath, Usage>,
    /// Open sessions of this user.
    sessions: usize,
}

impl Account {
    /// Usage, unfinished uploads included.
    pub fn used(&self) -> Usage {
        self.reserved.values().fold(self.stored, |a, b| a.plus(*b))
    }

    /// What unfinished uploads are charged, and how many there are.
    pub fn unfinished(&self) -> (Usage, usize) {
        let charged = self
            .reserved
            .values()
            .fold(Usage::default(), |a, b| a.plus(*b));
        (charged, self.reserved.len())
    }

    /// Usage without the reservation of the upload to `path`.
    fn others(&self, path: &VPath) -> Usage {
        self.used()
            .minus(self.reserved.get(path).copied().unwrap_or_default())
    }

    /// Whether `base` plus `add` fits `limits`. Only what grows is checked:
    /// a change that shrinks usage is allowed even over a lowered limit.
    fn fits(base: Usage, add: Usage, limits: Limits) -> Result<()> {
        if add.bytes > 0
            && base
                .bytes
                .checked_add(add.bytes)
                .is_none_or(|b| b > limits.bytes)
        {
            return Err(Error::QuotaExceeded {
                needed: add.bytes,
                available: limits.bytes.saturating_sub(base.bytes),
            });
        }
        if add.entries > 0
            && base
                .entries
                .checked_add(add.entries)
                .is_none_or(|e| e > limits.entries)
        {
            return Err(Error::TooManyFiles(limits.entries));
        }
        Ok(())
    }

    /// Reserves `charge` for an upload to `path`, replacing what an earlier
    /// attempt at the same path held.
    pub fn reserve(&mut self, path: &VPath, charge: Usage, limits: Limits) -> Result<()> {
        Account::fits(self.others(path), charge, limits)?;
        self.reserved.insert(path.clone(), charge);
        Ok(())
    }

    /// Charges a partial upload to `path` that is to wait to be resumed, if
    /// it fits with the rest: a replacement is charged only what it adds
    /// while it runs, but kept alone it occupies its whole size.
    pub fn park(&mut self, path: &VPath, charge: Usage, limits: Limits) -> Result<()> {
        Account::fits(self.others(path), charge, limits)?;
        self.reserved.insert(path.clone(), charge);
        Ok(())
    }

    /// Drops the reservation for `path` (the partial upload is gone).
    pub fn release(&mut self, path: &VPath) {
        self.reserved.remove(path);
    }

    /// Whether an upload of `size` bytes may land on `path`, where
    /// `replaced` is now (see [`Usage::landing`]).
    pub fn check_landing(
        &self,
        path: &VPath,
        size: u64,
        replaced: Option<u64>,
        limits: Limits,
    ) -> Result<()> {
        Account::fits(self.others(path), Usage::landing(size, replaced), limits)
    }

    /// An upload to `path` became a file of `size` bytes where `replaced` was.
    pub fn landed(&mut self, path: &VPath, size: u64, replaced: Option<u64>) {
        self.reserved.remove(path);
        self.stored = self
            .stored
            .minus(Usage {
                bytes: replaced.unwrap_or(0),
                entries: 0,
            })
            .plus(Usage {
                bytes: size,
                entries: u64::from(replaced.is_none()),
            });
    }

    /// Whether `add` more fits (a new directory, say).
    pub fn check_add(&self, add: Usage, limits: Limits) -> Result<()> {
        Account::fits(self.used(), add, limits)
    }

    /// The home holds `add` more.
    pub fn added(&mut self, add: Usage) {
        self.stored = self.stored.plus(add);
    }

    /// The home holds `removed` less.
    pub fn removed(&mut self, removed: Usage) {
        self.stored = self.stored.minus(removed);
    }
}

/// A snapshot of what is on disk, to (re)build an account from.
pub struct Scan {
    pub stored: Usage,
    pub reserved: Vec<(VPath, Usage)>,
}

impl Scan {
    /// Usage, unfinished uploads included, as the ledger counts it.
    pub fn total(&self) -> Usage {
        self.reserved
            .iter()
            .fold(self.stored, |a, (_, r)| a.plus(*r))
    }
}

#[derive(Debug, Default)]
pub struct Ledger {
    accounts: Mutex<HashMap<String, Arc<Mutex<Account>>>>,
    /// Uploads under way, by user and target: one writer per file.
    uploads: Mutex<HashSet<(String, VPath)>>,
}

/// Marks an upload target busy; frees it when dropped.
#[derive(Debug)]
pub struct UploadLock {
    ledger: Arc<Ledger>,
    key: (String, VPath),
}

impl Drop for UploadLock {
    fn drop(&mut self) {
        lock(&self.ledger.uploads).remove(&self.key);
    }
}

/// A poisoned lock leaves plain numbers behind, still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ledger {
    fn account(&self, user: &str) -> Arc<Mutex<Account>> {
        lock(&self.accounts)
            .entry(user.to_string())
            .or_default()
            .clone()
    }

    /// Runs `f` on `user`'s account under its lock. Changes to the home
    /// that alter what it holds run inside `f`, so that nothing of the
    /// same user moves between a check and the change.
    pub fn with<R>(&self, user: &str, f: impl FnOnce(&mut Account) -> R) -> R {
        let account = self.account(user);
        let mut account = lock(&account);
        f(&mut account)
    }

    /// Registers a session of `user`. When it is the user's first, the
    /// account is rebuilt from `scan()`.
    pub fn open_session(
        &self,
        user: &str,
        scan: impl FnOnce() -> std::io::Result<Scan>,
    ) -> std::io::Result<()> {
        let first = self.with(user, |a| a.sessions == 0);
        // Scan outside the lock: a big home takes a while. Two first sessions
        // at once both scan; the second result is dropped.
        let fresh = if first { Some(scan()?) } else { None };
        self.with(user, |account| {
            if let Some(scan) = fresh
                && account.sessions == 0
            {
                account.stored = scan.stored;
                account.reserved = scan.reserved.into_iter().collect();
            }
            account.sessions += 1;
        });
        Ok(())
    }

    pub fn close_session(&self, user: &str) {
        self.with(user, |a| a.sessions = a.sessions.saturating_sub(1));
    }

    /// Whether `user` has a session open.
    pub fn has_sessions(&self, user: &str) -> bool {
        let account = lock(&self.accounts).get(user).cloned();
        account.is_some_and(|a| lock(&a).sessions > 0)
    }

    /// Usage, reservations included.
    pub fn used(&self, user: &str) -> Usage {
        self.with(user, |a| a.used())
    }

    /// Drops the reservation for `path` if the account is known (see [`Account::release`]).
    pub fn release(&self, user: &str, path: &VPath) {
        let account = lock(&self.accounts).get(user).cloned();
        if let Some(account) = account {
            lock(&account).release(path);
        }
    }

    /// Takes the one upload lock of `path`, or None while another holds it.
    pub fn lock_upload(self: &Arc<Self>, user: &str, path: &VPath) -> Option<UploadLock> {
        let key = (user.to_string(), path.clone());
        lock(&self.uploads).insert(key.clone()).then(|| UploadLock {
            ledger: self.clone(),
            key,
        })
    }
}

/// What a user occupies: the home, and a full charge for each unfinished
/// upload in `partial_dir` (a partial with its journal) whose journal was
/// saved less than `ttl` ago.
/// Nothing is changed on disk (the sweeper removes what expired).
pub fn scan(home: &Home, partial_dir: &Path, ttl: Duration) -> std::io::Result<Scan> {
    let (bytes, entries) = home.usage()?;
    let stored = Usage { bytes, entries };
    let mut reserved = vec![];
    let now = crate::clock::now_secs();
    let items = match std::fs::read_dir(partial_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Scan { stored, reserved }),
        Err(e) => return Err(e),
    };
    for item in items.flatten() {
        let path = item.path();
        // A journal counts with its partial; one left alone is the sweeper's.
        if path.extension().is_none_or(|e| e != "journal") || !path.with_extension("part").exists()
        {
            continue;
        }
        let Ok(Some(record)) = Journal::load(&path) else {
            continue;
        };
        if now.saturating_sub(record.updated) >= ttl.as_secs() {
            continue;
        }
        // Only the journal filed under its own target's name is that upload's.
        if let Ok(target) = VPath::resolve(&VPath::root(), &record.target, usize::MAX)
            && path.file_stem().and_then(|s| s.to_str())
                == Some(journal::key(&[&target.to_string()]).as_str())
        {
            reserved.push((target, Usage::parked(record.size)));
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

    fn bytes(n: u64) -> Usage {
        Usage {
            bytes: n,
            entries: 0,
        }
    }

    const MANY: u64 = 1000;

    fn limits(bytes: u64) -> Limits {
        Limits {
            bytes,
            entries: MANY,
        }
    }

    fn ledger(stored: u64) -> Ledger {
        let l = Ledger::default();
        l.open_session("u", || {
            Ok(Scan {
                stored: bytes(stored),
                reserved: vec![],
            })
        })
        .unwrap();
        l
    }

    #[test]
    fn reservations_reach_the_limit_exactly() {
        let l = ledger(40);
        l.with("u", |a| {
            a.reserve(&p("a"), bytes(30), limits(100)).unwrap();
            a.reserve(&p("b"), bytes(30), limits(100)).unwrap();
            assert!(matches!(
                a.reserve(&p("c"), bytes(1), limits(100)),
                Err(Error::QuotaExceeded {
                    needed: 1,
                    available: 0
                })
            ));
            // A second attempt at the same path replaces its own reservation.
            a.reserve(&p("b"), bytes(29), limits(100)).unwrap();
            a.reserve(&p("c"), bytes(1), limits(100)).unwrap();
        });
        assert_eq!(l.used("u").bytes, 100);
    }

    #[test]
    fn landing_is_settled_against_what_is_replaced_then() {
        let l = ledger(60);
        l.with("u", |a| {
            // An upload of 60 that replaces the file of 60 is charged nothing...
            a.reserve(&p("d/f"), Usage::landing(60, Some(60)), limits(64))
                .unwrap();
            assert_eq!(a.used().bytes, 60);
            // ...but if the file it replaces has gone, 60 more don't fit.
            assert!(matches!(
                a.check_landing(&p("d/f"), 60, None, limits(64)),
                Err(Error::QuotaExceeded { .. })
            ));
            a.check_landing(&p("d/f"), 60, Some(60), limits(64))
                .unwrap();
            a.landed(&p("d/f"), 60, Some(60));
            assert_eq!(
                a.used(),
                Usage {
                    bytes: 60,
                    entries: 0
                }
            );
            // A new name is one entry more.
            a.reserve(&p("g"), Usage::landing(4, None), limits(64))
                .unwrap();
            a.landed(&p("g"), 4, None);
            assert_eq!(
                a.used(),
                Usage {
                    bytes: 64,
                    entries: 1
                }
            );
        });
    }

    #[test]
    fn a_shrinking_change_is_allowed_over_a_lowered_limit() {
        let l = ledger(100);
        l.with("u", |a| {
            a.check_landing(&p("f"), 10, Some(50), limits(60)).unwrap();
            a.landed(&p("f"), 10, Some(50));
            assert_eq!(a.used().bytes, 60);
            assert!(a.check_landing(&p("f"), 11, Some(10), limits(60)).is_err());
        });
    }

    #[test]
    fn entries_are_limited_like_bytes() {
        let l = ledger(0);
        let two = Limits {
            bytes: 100,
            entries: 2,
        };
        l.with("u", |a| {
            a.check_add(
                Usage {
                    bytes: 0,
                    entries: 1,
                },
                two,
            )
            .unwrap();
            a.added(Usage {
                bytes: 0,
                entries: 1,
            });
            a.reserve(&p("x"), Usage::landing(0, None), two).unwrap();
            assert!(matches!(
                a.reserve(&p("y"), Usage::landing(0, None), two),
                Err(Error::TooManyFiles(2))
            ));
            assert!(
                a.check_add(
                    Usage {
                        bytes: 0,
                        entries: 1
                    },
                    two
                )
                .is_err()
            );
            // Replacing a file adds no entry.
            a.reserve(&p("y"), Usage::landing(0, Some(0)), two).unwrap();
            assert!(matches!(a.check_landing(&p("x"), 0, None, two), Ok(())));
            a.removed(Usage {
                bytes: 0,
                entries: 1,
            });
            a.reserve(&p("z"), Usage::landing(0, None), two).unwrap();
        });
    }

    #[test]
    fn a_parked_partial_counts_in_full() {
        let l = ledger(60);
        l.with("u", |a| {
            a.reserve(&p("f"), Usage::landing(60, Some(60)), limits(64))
                .unwrap();
            // Kept alone, it does not fit beside the file it was to replace...
            assert!(a.park(&p("f"), Usage::parked(60), limits(64)).is_err());
            // ...but it does where there is room for both.
            a.park(&p("f"), Usage::parked(60), limits(120)).unwrap();
            assert_eq!(
                a.used(),
                Usage {
                    bytes: 120,
                    entries: 1
                }
            );
            assert_eq!(a.unfinished(), (Usage::parked(60), 1));
            // The file it was to replace is deleted: the partial still counts.
            a.removed(Usage {
                bytes: 60,
                entries: 1,
            });
            assert!(a.reserve(&p("g"), bytes(5), limits(64)).is_err());
            // Resuming it charges it as a running upload again.
            a.reserve(&p("f"), Usage::landing(60, None), limits(64))
                .unwrap();
        });
    }

    #[test]
    fn no_overflow_at_the_edges() {
        let l = ledger(u64::MAX - 1);
        l.with("u", |a| {
            assert!(
                a.reserve(&p("a"), bytes(u64::MAX), limits(u64::MAX))
                    .is_err()
            );
            a.reserve(&p("a"), bytes(1), limits(u64::MAX)).unwrap();
        });
        let zero = ledger(0);
        zero.with("u", |a| {
            assert!(a.reserve(&p("a"), bytes(1), limits(0)).is_err());
            a.reserve(&p("a"), bytes(0), limits(0)).unwrap();
        });
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
                stored: bytes(9),
                reserved: vec![(p("x"), bytes(1))],
            })
        })
        .unwrap();
        assert_eq!(l.used("u").bytes, 10);
    }

    #[test]
    fn one_upload_per_user_and_path() {
        let l = Arc::new(Ledger::default());
        let held = l.lock_upload("u", &p("a")).unwrap();
        assert!(l.lock_upload("u", &p("a")).is_none());
        assert!(l.lock_upload("v", &p("a")).is_some());
        drop(held);
        assert!(l.lock_upload("u", &p("a")).is_some());
    }
}
