//! One upload's life on the server, from the lock on its target to the file
//! in the home, and the sweeper that clears what uploads left behind.
//!
//! An [`Upload`] owns everything an upload holds while it lives: the lock on
//! its target (one upload per user and path), its quota reservation and its
//! staging files under `var/partial/USER/`: `KEY.part` (the partial file),
//! `KEY.journal` (how much of it is durable) and, for a small `SEND`,
//! `KEY.send`. KEY is derived from the target path, so an upload to a path
//! finds the partial an earlier attempt left. Every upload ends in one of
//! three ways:
//!
//! - [`Upload::land`]: the verified file is renamed onto its target, and the
//!   charge settled against what it replaces at that moment, under the
//!   account's lock; any other staging file of that path goes with it. The
//!   rename is durable once its directory is synced, which `land` leaves to
//!   the caller, so that small files landed together cost one sync per
//!   directory;
//! - [`Upload::park`]: the partial stays to be resumed, charged in full,
//!   if that fits the user's limits (else it is discarded);
//! - [`Upload::discard`]: its staging files are removed and its reservation
//!   dropped.
//!
//! Dropping an upload that did not end parks it if a journal on disk makes
//! it resumable, and discards it otherwise.
//!
//! The functions here block; the session runs them on tokio's blocking pool.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use crate::error::{Error, Result};
use crate::protocol::Candidate;
use crate::protocol::VPath;
use crate::store::jail::Home;
use crate::store::quota::{Ledger, Limits, UploadLock, Usage};
use crate::transfer::journal::{self, Journal, Record};
use crate::transfer::{self, Tree};

/// Whose uploads these are: what every upload of one logged-in user needs.
#[derive(Debug, Clone)]
pub struct Owner {
    pub ledger: Arc<Ledger>,
    pub name: String,
    pub home: Home,
    pub limits: Limits,
    /// `var/partial/USER`.
    pub staging: PathBuf,
}

/// The staging files of an upload to one path.
#[derive(Debug, Clone)]
pub struct Staging {
    pub part: PathBuf,
    pub journal: PathBuf,
    pub send: PathBuf,
}

impl Staging {
    pub fn of(staging: &Path, target: &VPath) -> Staging {
        let key = journal::key(&[&target.to_string()]);
        Staging {
            part: staging.join(format!("{key}.part")),
            journal: staging.join(format!("{key}.journal")),
            send: staging.join(format!("{key}.send")),
        }
    }

    fn remove(&self) {
        for f in [&self.journal, &self.part, &self.send] {
            remove_if_there(f);
        }
    }
}

fn remove_if_there(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        warn!(event = "error", file = %path.display(), error = %e, "cannot remove a staging file");
    }
}

#[derive(Debug)]
pub struct Upload {
    owner: Owner,
    path: VPath,
    size: u64,
    files: Staging,
    /// A journal on disk describes a partial of this path worth keeping.
    resumable: bool,
    /// An earlier partial of this path was on disk at begin: landing
    /// removes what is left of it. (Under the path's lock nobody else makes
    /// one, so without it a landing has nothing to clean up.)
    superseded: bool,
    ended: bool,
    _lock: UploadLock,
}

impl Upload {
    /// Checks the target and reserves what the upload will add, before its
    /// first byte. Nothing is created on disk yet, and a refusal leaves any
    /// earlier partial of the path as it was.
    pub fn begin(lock: UploadLock, owner: &Owner, path: VPath, size: u64) -> Result<Upload> {
        let replaced = owner.home.upload_target(&path)?;
        owner.ledger.with(&owner.name, |a| {
            a.reserve(&path, Usage::landing(size, replaced), owner.limits)
        })?;
        let files = Staging::of(&owner.staging, &path);
        let resumable = files.journal.exists();
        Ok(Upload {
            superseded: resumable || files.part.exists(),
            resumable,
            owner: owner.clone(),
            path,
            size,
            files,
            ended: false,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &VPath {
        &self.path
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn files(&self) -> &Staging {
        &self.files
    }

    /// Resume offers from the partial an earlier attempt left, if its
    /// journal describes this same upload.
    pub fn offers(&self, chunk: u64) -> Vec<Candidate> {
        match Journal::load(&self.files.journal) {
            Ok(Some(r))
                if r.kind == "upload"
                    && r.target == self.path.to_string()
                    && r.size == self.size =>
            {
                File::open(&self.files.part)
                    .and_then(|f| {
                        let len = f.metadata()?.len();
                        transfer::offer(&f, self.size, chunk, &[len, r.verified.min(len)])
                    })
                    .unwrap_or_default()
            }
            Ok(_) => vec![],
            Err(e) => {
                warn!(event = "error", error = %e, "discarding a damaged upload journal");
                vec![]
            }
        }
    }

    /// Opens the partial file, cut to `resume_at`. An upload of more than
    /// one chunk gets a journal, saved before the first byte; a smaller one
    /// starts again after a failure, and an older journal of the path goes.
    pub fn open(
        &mut self,
        chunk: u64,
        resume_at: u64,
    ) -> io::Result<(File, Tree, Option<Journal>)> {
        if let Some(dir) = self.files.part.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let (file, tree) = transfer::open_partial(&self.files.part, self.size, chunk, resume_at)?;
        let journal = if self.size > chunk {
            file.sync_data()?;
            let record = Record::new(
                "upload",
                String::new(),
                self.path.to_string(),
                self.size,
                chunk,
            );
            let mut j = Journal::new(self.files.journal.clone(), record);
            j.save(resume_at)?;
            self.resumable = true;
            Some(j)
        } else {
            remove_if_there(&self.files.journal);
            self.resumable = false;
            None
        };
        Ok((file, tree, journal))
    }

    /// Stores a small upload whose bytes are all here and verified. It
    /// lands as [`Upload::land`] does: the file is not durable
    /// until the directory returned is synced.
    pub fn store(self, data: &[u8]) -> Result<Unsynced> {
        let write = || -> io::Result<()> {
            if let Some(dir) = self.files.send.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut f = File::create(&self.files.send)?;
            f.write_all(data)?;
            f.sync_all()
        };
        write().map_err(|e| Error::fs(e, &self.path.to_string()))?;
        let send = self.files.send.clone();
        self.land(&send)
    }

    /// Moves the verified file `staged` onto the target, settling the
    /// charge against what it replaces now, under the account's lock. If
    /// the account can't be locked (a cluster's database is away), nothing
    /// moves and the upload stays resumable. Returns the target's
    /// directory unsynced: the caller syncs it, once for every upload
    /// landed there together, before it tells anyone the file is stored.
    pub fn land(mut self, staged: &Path) -> Result<Unsynced> {
        let dir = staged.parent().unwrap_or(Path::new("."));
        let staging = cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority())
            .map_err(Error::Storage)?;
        let name = staged.file_name().unwrap_or_default();
        let Owner {
            ledger,
            name: user,
            home,
            limits,
            ..
        } = &self.owner;
        let (path, size) = (&self.path, self.size);
        let files = &self.files;
        let resumable = &mut self.resumable;
        let unsynced = ledger.with(user, |a| {
            let replaced = home.upload_target(path)?;
            a.check_landing(path, size, replaced, *limits)?;
            // The file is renamed into this open directory, and this one is
            // synced, even if another session renames it meanwhile.
            let unsynced = Unsynced::open(home, path.parent())
                .map_err(|e| Error::fs(e, &path.parent().to_string()))?;
            let into = cap_std::fs::Dir::from_std_file(
                unsynced.handle.try_clone().map_err(Error::Storage)?,
            );
            // The journal goes first: a crash before the rename leaves a
            // partial without a journal, which the sweeper removes, and
            // never a journal that goes on charging a file already in the home.
            if *resumable {
                remove_if_there(&files.journal);
                *resumable = false;
            }
            staging
                .rename(name, &into, path.file_name().unwrap_or("."))
                .map_err(|e| Error::fs(e, &path.to_string()))?;
            a.landed(path, size, replaced);
            Ok::<_, Error>(unsynced)
        })?;
        self.ended = true;
        // A partial of this path that the landed file supersedes.
        if self.superseded {
            self.files.remove();
        }
        Ok(unsynced)
    }

    /// Keeps the partial to be resumed, charged in full from now on, if that
    /// fits the user's limits; otherwise discards it.
    pub fn park(mut self) {
        self.park_or_discard();
    }

    /// Removes the staging files and frees the reservation.
    pub fn discard(mut self) {
        self.resumable = false;
        self.park_or_discard();
    }

    fn park_or_discard(&mut self) {
        if self.ended {
            return;
        }
        self.ended = true;
        let record = match self.resumable {
            true => Journal::load(&self.files.journal).ok().flatten(),
            false => None,
        };
        let Owner {
            ledger,
            name,
            limits,
            ..
        } = &self.owner;
        let kept = record.is_some_and(|r| {
            match ledger.with(name, |a| a.park(&self.path, Usage::parked(r.size), *limits)) {
                Ok(()) => true,
                // The account can't be read (a cluster's database is away):
                // the partial is kept, charged again from the disk at the
                // user's next first login.
                Err(Error::Unavailable(e)) => {
                    warn!(event = "error", user = %name, path = %self.path, error = %e, "keeping a partial upload uncharged");
                    true
                }
                Err(e) => {
                    info!(event = "sweep", user = %name, path = %self.path, error = %e, "not keeping a partial upload");
                    false
                }
            }
        });
        if kept {
            remove_if_there(&self.files.send);
        } else {
            self.files.remove();
            ledger.release(name, &self.path);
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.park_or_discard();
    }
}

/// The directory of a home that an upload was renamed into, not synced
/// yet: the rename is durable only once it is. One sync covers every
/// rename into the directory before it. It is held open, so the sync
/// reaches the directory the file went into even if it was renamed since.
#[derive(Debug)]
#[must_use = "a landed file is not durable until its directory is synced"]
pub struct Unsynced {
    /// Where it was when the file landed, for the log.
    dir: VPath,
    handle: File,
    /// Device and inode: what makes two directories the same.
    id: (u64, u64),
}

impl Unsynced {
    fn open(home: &Home, dir: VPath) -> io::Result<Unsynced> {
        use std::os::unix::fs::MetadataExt;
        let handle = home.open_dir(&dir)?;
        let meta = handle.metadata()?;
        Ok(Unsynced {
            dir,
            handle,
            id: (meta.dev(), meta.ino()),
        })
    }

    /// The directory, in the home, as it was named when the file landed.
    pub fn dir(&self) -> &VPath {
        &self.dir
    }

    /// Whether `other` is the same directory, which one sync covers.
    pub fn same_dir(&self, other: &Unsynced) -> bool {
        self.id == other.id
    }

    /// Syncs the directory, making the renames into it durable.
    pub fn sync(&self) -> io::Result<()> {
        self.handle.sync_all()
    }

    /// Swaps the handle for one whose sync fails: a disk's fault, which a
    /// test cannot cause.
    #[cfg(test)]
    pub fn fail_sync(&mut self) {
        use std::os::unix::fs::OpenOptionsExt;
        let path = format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&self.handle)
        );
        // A handle opened with O_PATH can't be synced (EBADF).
        self.handle = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(path)
            .expect("an O_PATH handle");
    }
}

/// An unfinished upload, as `PARTS` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfinished {
    pub target: String,
    pub size: u64,
    pub verified: u64,
    /// Unix time of the last save.
    pub updated: u64,
}

/// The unfinished uploads of `owner` that a journal describes, by target.
pub fn unfinished(owner: &Owner) -> io::Result<Vec<Unfinished>> {
    let mut out = vec![];
    let items = match std::fs::read_dir(&owner.staging) {
        Ok(items) => items,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for item in items.flatten() {
        let path = item.path();
        if path.extension().is_none_or(|e| e != "journal") {
            continue;
        }
        if let Ok(Some(r)) = Journal::load(&path) {
            out.push(Unfinished {
                target: r.target,
                size: r.size,
                verified: r.verified,
                updated: r.updated,
            });
        }
    }
    out.sort_by(|a, b| a.target.cmp(&b.target));
    Ok(out)
}

/// Discards the unfinished upload to `path`: Busy while it runs, NotFound
/// when there is none.
pub fn discard(owner: &Owner, path: &VPath) -> Result<u64> {
    let lock = owner
        .ledger
        .lock_upload(&owner.name, path)?
        .ok_or_else(|| Error::Busy(path.to_string()))?;
    let files = Staging::of(&owner.staging, path);
    let record = Journal::load(&files.journal).ok().flatten();
    if record.is_none() && !files.part.exists() {
        return Err(Error::NotFound(format!("unfinished upload to {path}")));
    }
    files.remove();
    owner.ledger.release(&owner.name, path);
    drop(lock);
    Ok(record.map_or(0, |r| r.size))
}

/// What one sweep removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Partial uploads whose journal expired or was damaged.
    pub expired: usize,
    /// Journals of a partial that is gone, and staging files with no journal.
    pub orphans: usize,
}

/// Clears what uploads left under `root` (`var/partial`), for every user:
/// partials whose journal was last saved `ttl` or more ago, damaged
/// journals, journals whose partial is gone, and staging files without a
/// journal. Those are left by a crash, or are being written right now by an
/// upload of one chunk or a `SEND`: `at_start`, when no upload can be
/// running, they all go; later only once untouched for `ttl`. A partial whose
/// upload is running (its target locked) is never touched.
pub fn sweep(ledger: &Arc<Ledger>, root: &Path, ttl: Duration, at_start: bool) -> Swept {
    let mut swept = Swept::default();
    let Ok(users) = std::fs::read_dir(root) else {
        return swept;
    };
    let now = crate::clock::now_secs();
    for user_dir in users.flatten() {
        let user = user_dir.file_name().to_string_lossy().into_owned();
        let Ok(items) = std::fs::read_dir(user_dir.path()) else {
            continue;
        };
        let mut journals = std::collections::HashSet::new();
        let mut others = vec![];
        for item in items.flatten() {
            let path = item.path();
            if path.extension().is_some_and(|e| e == "journal") {
                journals.insert(path.with_extension(""));
                sweep_journal(ledger, &user, &path, now, ttl, &mut swept);
            } else {
                others.push(path);
            }
        }
        for path in others {
            // A journal's partial, kept or removed above with its journal.
            if journals.contains(&path.with_extension(""))
                && path.extension().is_some_and(|e| e == "part")
            {
                continue;
            }
            let old = std::fs::symlink_metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age >= ttl);
            if at_start || old {
                remove_if_there(&path);
                swept.orphans += 1;
            }
        }
    }
    if swept != Swept::default() {
        info!(
            event = "sweep",
            expired = swept.expired,
            orphans = swept.orphans,
            "swept unfinished uploads"
        );
    }
    swept
}

fn sweep_journal(
    ledger: &Arc<Ledger>,
    user: &str,
    journal: &Path,
    now: u64,
    ttl: Duration,
    swept: &mut Swept,
) {
    let part = journal.with_extension("part");
    let record = match Journal::load(journal) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            warn!(event = "sweep", user, error = %e, "removing a damaged upload journal");
            remove_if_there(journal);
            remove_if_there(&part);
            swept.expired += 1;
            return;
        }
    };
    let target = VPath::resolve(&VPath::root(), &record.target, usize::MAX).ok();
    let Some(target) =
        target.filter(|t| Staging::of(Path::new(""), t).journal.file_name() == journal.file_name())
    else {
        // Not the journal of the upload it names: nothing to resume, nothing charged.
        warn!(event = "sweep", user, journal = %journal.display(), "removing a journal filed under another upload's name");
        remove_if_there(journal);
        remove_if_there(&part);
        swept.orphans += 1;
        return;
    };
    let expired = now.saturating_sub(record.updated) >= ttl.as_secs();
    let orphan = !part.exists();
    if !expired && !orphan {
        return;
    }
    // Not while an upload of it runs (or a resume is starting).
    let Ok(Some(_lock)) = ledger.lock_upload(user, &target) else {
        return;
    };
    // Read again under the lock: an upload may have saved it meanwhile.
    match Journal::load(journal) {
        Ok(Some(r)) if r == record => {}
        _ => return,
    }
    if expired {
        info!(event = "sweep", user, path = %target, size = record.size, verified = record.verified, "removing an expired partial upload");
        swept.expired += 1;
    } else {
        swept.orphans += 1;
    }
    remove_if_there(journal);
    remove_if_there(&part);
    ledger.release(user, &target);
}
