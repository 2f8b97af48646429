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

/// What an unfinished upload is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub charge: Usage,
    /// Waiting to be resumed (no session holds it), rather than running.
    pub parked: bool,
}

/// One user's numbers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Account {
    /// What the home holds.
    pub stored: Usage,
    /// Unfinished uploads (running or waiting to be resumed), by target path.
    pub reserved: HashMap<VPath, Reservation>,
}

impl Account {
    /// Usage, unfinished uploads included.
    pub fn used(&self) -> Usage {
        self.reserved
            .values()
            .fold(self.stored, |a, r| a.plus(r.charge))
    }

    /// What unfinished uploads are charged, and how many there are.
    pub fn unfinished(&self) -> (Usage, usize) {
        let charged = self
            .reserved
            .values()
            .fold(Usage::default(), |a, r| a.plus(r.charge));
        (charged, self.reserved.len())
    }

    /// Usage without the reservation of the upload to `path`.
    fn others(&self, path: &VPath) -> Usage {
        self.used().minus(
            self.reserved
                .get(path)
                .map(|r| r.charge)
                .unwrap_or_default(),
        )
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
        let parked = false;
        self.reserved
            .insert(path.clone(), Reservation { charge, parked });
        Ok(())
    }

    /// Charges a partial upload to `path` that is to wait to be resumed, if
    /// it fits with the rest: a replacement is charged only what it adds
    /// while it runs, but kept alone it occupies its whole size.
    pub fn park(&mut self, path: &VPath, charge: Usage, limits: Limits) -> Result<()> {
        Account::fits(self.others(path), charge, limits)?;
        let parked = true;
        self.reserved
            .insert(path.clone(), Reservation { charge, parked });
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
        self.account().used()
    }

    /// The account as the disk shows it: every unfinished upload parked.
    pub fn account(&self) -> Account {
        let reserved = self.reserved.iter().map(|(path, charge)| {
            let parked = true;
            (
                path.clone(),
                Reservation {
                    charge: *charge,
                    parked,
                },
            )
        });
        Account {
            stored: self.stored,
            reserved: reserved.collect(),
        }
    }
}

/// Where the ledger's numbers and locks live: this process's memory for a
/// single node ([`Local`]), the shared database for several
/// ([`crate::cluster::ledger`]). Either way, one account is changed by one
/// caller at a time, and one upload lock is held by one upload.
pub trait Book: Send + Sync + std::fmt::Debug {
    /// Runs `f` on `user`'s account, locked against every other change of
    /// it; what `f` changed is kept when it returns true.
    fn with_account(&self, user: &str, f: &mut dyn FnMut(&mut Account) -> bool) -> Result<()>;
    /// Counts a session of `user`. For the user's first session (on any
    /// node), the account is rebuilt from `scan()`.
    fn open_session(
        &self,
        user: &str,
        scan: &mut dyn FnMut() -> std::io::Result<Scan>,
    ) -> Result<()>;
    fn close_session(&self, user: &str);
    /// Whether `user` has a session open (on any node).
    fn has_sessions(&self, user: &str) -> Result<bool>;
    /// Drops the reservation for `path` (see [`Account::release`]).
    fn release(&self, user: &str, path: &VPath);
    /// Takes the one upload lock of `path`; false while another holds it.
    fn lock_upload(&self, user: &str, path: &VPath) -> Result<bool>;
    fn unlock_upload(&self, user: &str, path: &VPath);
    /// Whether this is the only node: then at its start no upload can be
    /// running, and the sweeper may clear every staging file left.
    fn alone(&self) -> bool;
}

/// The quota ledger and the upload locks, over a [`Book`].
#[derive(Debug)]
pub struct Ledger {
    book: Box<dyn Book>,
}

impl Default for Ledger {
    fn default() -> Ledger {
        Ledger::new(Box::new(Local::default()))
    }
}

/// Marks an upload target busy; frees it when dropped.
#[derive(Debug)]
pub struct UploadLock {
    ledger: Arc<Ledger>,
    user: String,
    path: VPath,
}

impl Drop for UploadLock {
    fn drop(&mut self) {
        self.ledger.book.unlock_upload(&self.user, &self.path);
    }
}

impl Ledger {
    pub fn new(book: Box<dyn Book>) -> Ledger {
        Ledger { book }
    }

    /// Runs `f` on `user`'s account under its lock. Changes to the home
    /// that alter what it holds run inside `f`, so that nothing of the
    /// same user moves between a check and the change; they are kept
    /// when `f` succeeds.
    pub fn with<T>(&self, user: &str, f: impl FnOnce(&mut Account) -> Result<T>) -> Result<T> {
        let mut f = Some(f);
        let mut out = None;
        self.book.with_account(user, &mut |account| {
            let result = f.take().map(|f| f(account));
            let ok = matches!(result, Some(Ok(_)));
            out = result;
            ok
        })?;
        out.unwrap_or_else(|| Err(Error::Unavailable("the account was not read".into())))
    }

    /// Registers a session of `user`; for the user's first, the account is
    /// rebuilt from `scan()`.
    pub fn open_session(
        &self,
        user: &str,
        scan: impl FnOnce() -> std::io::Result<Scan>,
    ) -> Result<()> {
        let mut scan = Some(scan);
        self.book.open_session(user, &mut || match scan.take() {
            Some(scan) => scan(),
            None => Err(std::io::Error::other("scanned twice")),
        })
    }

    pub fn close_session(&self, user: &str) {
        self.book.close_session(user)
    }

    /// Whether `user` has a session open.
    pub fn has_sessions(&self, user: &str) -> Result<bool> {
        self.book.has_sessions(user)
    }

    /// Usage, reservations included.
    pub fn used(&self, user: &str) -> Result<Usage> {
        self.with(user, |a| Ok(a.used()))
    }

    /// Drops the reservation for `path` (see [`Account::release`]).
    pub fn release(&self, user: &str, path: &VPath) {
        self.book.release(user, path)
    }

    /// Takes the one upload lock of `path`, or None while another holds it.
    pub fn lock_upload(self: &Arc<Self>, user: &str, path: &VPath) -> Result<Option<UploadLock>> {
        Ok(self.book.lock_upload(user, path)?.then(|| UploadLock {
            ledger: self.clone(),
            user: user.to_string(),
            path: path.clone(),
        }))
    }

    /// See [`Book::alone`].
    pub fn alone(&self) -> bool {
        self.book.alone()
    }
}

/// The book of a single node: accounts and locks in this process's memory.
#[derive(Debug, Default)]
pub struct Local {
    accounts: Mutex<HashMap<String, Arc<Mutex<LocalAccount>>>>,
    /// Uploads under way, by user and target: one writer per file.
    uploads: Mutex<HashSet<(String, VPath)>>,
}

#[derive(Debug, Default)]
struct LocalAccount {
    account: Account,
    /// Open sessions of this user.
    sessions: usize,
}

/// A poisoned lock leaves plain numbers behind, still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Local {
    fn account(&self, user: &str) -> Arc<Mutex<LocalAccount>> {
        lock(&self.accounts)
            .entry(user.to_string())
            .or_default()
            .clone()
    }

    fn known(&self, user: &str) -> Option<Arc<Mutex<LocalAccount>>> {
        lock(&self.accounts).get(user).cloned()
    }
}

impl Book for Local {
    fn with_account(&self, user: &str, f: &mut dyn FnMut(&mut Account) -> bool) -> Result<()> {
        let entry = self.account(user);
        f(&mut lock(&entry).account);
        Ok(())
    }

    fn open_session(
        &self,
        user: &str,
        scan: &mut dyn FnMut() -> std::io::Result<Scan>,
    ) -> Result<()> {
        let entry = self.account(user);
        let first = lock(&entry).sessions == 0;
        // Scan outside the lock: a big home takes a while. Two first sessions
        // at once both scan; the second result is dropped.
        let fresh = if first {
            Some(scan().map_err(Error::Storage)?)
        } else {
            None
        };
        let mut entry = lock(&entry);
        if let Some(scan) = fresh
            && entry.sessions == 0
        {
            entry.account = scan.account();
        }
        entry.sessions += 1;
        Ok(())
    }

    fn close_session(&self, user: &str) {
        if let Some(entry) = self.known(user) {
            let mut entry = lock(&entry);
            entry.sessions = entry.sessions.saturating_sub(1);
        }
    }

    fn has_sessions(&self, user: &str) -> Result<bool> {
        Ok(self.known(user).is_some_and(|a| lock(&a).sessions > 0))
    }

    fn release(&self, user: &str, path: &VPath) {
        if let Some(entry) = self.known(user) {
            lock(&entry).account.release(path);
        }
    }

    fn lock_upload(&self, user: &str, path: &VPath) -> Result<bool> {
        Ok(lock(&self.uploads).insert((user.to_string(), path.clone())))
    }

    fn unlock_upload(&self, user: &str, path: &VPath) {
        lock(&self.uploads).remove(&(user.to_string(), path.clone()));
    }

    fn alone(&self) -> bool {
        true
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

    /// Runs `f` on the account of "u".
    fn on(l: &Ledger, f: impl FnOnce(&mut Account)) {
        l.with("u", |a| {
            f(a);
            Ok(())
        })
        .unwrap()
    }

    impl Ledger {
        fn lock_upload_now(self: &Arc<Self>, user: &str, path: &VPath) -> Option<UploadLock> {
            self.lock_upload(user, path).unwrap()
        }
    }

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
        on(&l, |a| {
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
        assert_eq!(l.used("u").unwrap().bytes, 100);
    }

    #[test]
    fn landing_is_settled_against_what_is_replaced_then() {
        let l = ledger(60);
        on(&l, |a| {
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
        on(&l, |a| {
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
        on(&l, |a| {
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
        on(&l, |a| {
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
        on(&l, |a| {
            assert!(
                a.reserve(&p("a"), bytes(u64::MAX), limits(u64::MAX))
                    .is_err()
            );
            a.reserve(&p("a"), bytes(1), limits(u64::MAX)).unwrap();
        });
        let zero = ledger(0);
        on(&zero, |a| {
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
        assert_eq!(l.used("u").unwrap().bytes, 10);
    }

    #[test]
    fn one_upload_per_user_and_path() {
        let l = Arc::new(Ledger::default());
        let held = l.lock_upload_now("u", &p("a")).unwrap();
        assert!(l.lock_upload_now("u", &p("a")).is_none());
        assert!(l.lock_upload_now("v", &p("a")).is_some());
        drop(held);
        assert!(l.lock_upload_now("u", &p("a")).is_some());
    }
}
