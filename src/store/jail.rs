//! The jail: a user's home, and everything the server does in it.
//!
//! A client names files by virtual paths ([`VPath`]). The folded path is then used only relative to a [`cap_std::fs::Dir`] handle
//! on the home, opened once at login. cap-std resolves every path beneath
//! that handle (openat2 with RESOLVE_BENEATH where the kernel has it), so a
//! symlink an admin planted in a home, or one swapped in during a request,
//! can never lead outside it: such an access fails as permission denied.
//!
//! The functions on [`Home`] block; the session runs them on tokio's
//! blocking pool.

use std::io;
use std::path::Path;
use std::sync::Arc;

use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};

use crate::error::{Error, Result};
use crate::protocol::{Entry, VPath};

/// What `ls` and `STAT` show of one entry named `name`.
fn entry(name: String, m: &cap_std::fs::Metadata) -> Entry {
    let ft = m.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_file() {
        'f'
    } else if ft.is_symlink() {
        'l'
    } else {
        'o'
    };
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.into_std().duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    Entry {
        kind,
        size: if ft.is_file() { m.len() } else { 0 },
        mtime,
        name,
    }
}

/// A user's home, opened as a directory handle.
#[derive(Debug, Clone)]
pub struct Home {
    dir: Arc<Dir>,
}

impl Home {
    /// Opens a home. A home that is a symlink or not a directory is refused.
    pub fn open(path: &Path) -> io::Result<Home> {
        let m = std::fs::symlink_metadata(path)?;
        if !m.is_dir() {
            return Err(io::Error::other(format!(
                "home {} is not a plain directory",
                path.display()
            )));
        }
        let dir = Dir::open_ambient_dir(path, cap_std::ambient_authority())?;
        Ok(Home { dir: Arc::new(dir) })
    }

    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// Whether `other` is a clone of this same handle.
    pub fn is(&self, other: &Home) -> bool {
        Arc::ptr_eq(&self.dir, &other.dir)
    }

    /// Whether `path` is a directory (following in-home symlinks).
    pub fn check_dir(&self, path: &VPath) -> Result<()> {
        let m = self
            .dir
            .metadata(path.rel())
            .map_err(|e| Error::fs(e, &path.to_string()))?;
        if m.is_dir() {
            Ok(())
        } else {
            Err(Error::NotADirectory(path.to_string()))
        }
    }

    /// Entries of a directory, sorted by name, at most `max`; the flag says whether more were left out.
    pub fn list(&self, path: &VPath, max: usize) -> Result<(Vec<Entry>, bool)> {
        let vp = path.to_string();
        let m = self
            .dir
            .metadata(path.rel())
            .map_err(|e| Error::fs(e, &vp))?;
        if !m.is_dir() {
            // `ls FILE` shows the file, as ls(1) does.
            let name = path.file_name().unwrap_or("/").to_string();
            return Ok((vec![entry(name, &m)], false));
        }
        let mut entries = vec![];
        let mut truncated = false;
        for item in self
            .dir
            .read_dir(path.rel())
            .map_err(|e| Error::fs(e, &vp))?
        {
            let item = item.map_err(|e| Error::fs(e, &vp))?;
            if entries.len() >= max {
                truncated = true;
                break;
            }
            let name = item.file_name().to_string_lossy().into_owned();
            match item.metadata() {
                Ok(m) => entries.push(entry(name, &m)),
                // Gone between readdir and stat: leave it out.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::fs(e, &vp)),
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok((entries, truncated))
    }

    /// One entry, not following a final symlink.
    pub fn stat(&self, path: &VPath) -> Result<Entry> {
        let m = self
            .dir
            .symlink_metadata(path.rel())
            .map_err(|e| Error::fs(e, &path.to_string()))?;
        Ok(entry(path.file_name().unwrap_or("/").to_string(), &m))
    }

    pub fn mkdir(&self, path: &VPath) -> Result<()> {
        if path.is_root() {
            return Err(Error::Exists("/".into()));
        }
        self.dir
            .create_dir(path.rel())
            .map_err(|e| Error::fs(e, &path.to_string()))
    }

    pub fn rmdir(&self, path: &VPath) -> Result<()> {
        if path.is_root() {
            return Err(Error::PermissionDenied("/".into()));
        }
        self.dir
            .remove_dir(path.rel())
            .map_err(|e| Error::fs(e, &path.to_string()))
    }

    /// Removes a file or a symlink (never what it points to); not a directory.
    pub fn remove_file(&self, path: &VPath) -> Result<u64> {
        let vp = path.to_string();
        if path.is_root() {
            return Err(Error::IsADirectory(vp));
        }
        let m = self
            .dir
            .symlink_metadata(path.rel())
            .map_err(|e| Error::fs(e, &vp))?;
        if m.is_dir() {
            return Err(Error::IsADirectory(vp));
        }
        self.dir
            .remove_file(path.rel())
            .map_err(|e| Error::fs(e, &vp))?;
        Ok(if m.is_file() { m.len() } else { 0 })
    }

    /// Renames; onto an existing file replaces it, into an existing directory
    /// moves inside it. Returns the final path and what it replaced: None
    /// when the name was free, else the size of a regular file (0 for a
    /// link or an empty directory).
    pub fn rename(&self, from: &VPath, to: &VPath) -> Result<(VPath, Option<u64>)> {
        if from.is_root() {
            return Err(Error::PermissionDenied("/".into()));
        }
        self.dir
            .symlink_metadata(from.rel())
            .map_err(|e| Error::fs(e, &from.to_string()))?;
        let mut target = to.clone();
        if let Ok(m) = self.dir.metadata(to.rel())
            && m.is_dir()
        {
            target = to.join(from.file_name().unwrap_or_default());
        }
        if target.is_root() || target == *from {
            return Err(Error::BadArgument(format!(
                "cannot move {from} onto {target}"
            )));
        }
        if target.to_string().starts_with(&format!("{from}/")) {
            return Err(Error::BadArgument(format!(
                "cannot move {from} into itself"
            )));
        }
        let replaced = self.existing(&target);
        self.dir
            .rename(from.rel(), &self.dir, target.rel())
            .map_err(|e| Error::fs(e, &target.to_string()))?;
        Ok((target, replaced))
    }

    /// What is at `path`, not following a final symlink: None when nothing
    /// is, else the size of a regular file (0 for anything else).
    fn existing(&self, path: &VPath) -> Option<u64> {
        match self.dir.symlink_metadata(path.rel()) {
            Ok(m) if m.is_file() => Some(m.len()),
            Ok(_) => Some(0),
            Err(_) => None,
        }
    }

    /// Opens a regular file for reading. A FIFO or device is refused without
    /// blocking on it.
    pub fn open_read(&self, path: &VPath) -> Result<std::fs::File> {
        let vp = path.to_string();
        let mut opts = OpenOptions::new();
        opts.read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
        let file = self
            .dir
            .open_with(path.rel(), &opts)
            .map_err(|e| Error::fs(e, &vp))?;
        let m = file.metadata().map_err(|e| Error::fs(e, &vp))?;
        if m.is_dir() {
            return Err(Error::IsADirectory(vp));
        }
        if !m.is_file() {
            return Err(Error::NotAFile(vp));
        }
        Ok(file.into_std())
    }

    /// Sets the modification time of the regular file at `path` to `mtime`
    /// Unix seconds (at most `i64::MAX`, as file times are).
    pub fn set_mtime(&self, path: &VPath, mtime: u64) -> Result<()> {
        let file = self.open_read(path)?;
        let secs = i64::try_from(mtime)
            .map_err(|_| Error::BadArgument(format!("time {mtime} is out of range")))?;
        let when = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs.unsigned_abs());
        file.set_modified(when)
            .map_err(|e| Error::fs(e, &path.to_string()))
    }

    /// Checks that an upload may land at `path`: not the home itself, its
    /// directory exists, and it is not a directory. Returns what it would
    /// replace: None when the name is free, else the size of the file there
    /// (0 for a link or another kind of file, which the upload replaces).
    pub fn upload_target(&self, path: &VPath) -> Result<Option<u64>> {
        if path.is_root() {
            return Err(Error::IsADirectory("/".into()));
        }
        self.check_dir(&path.parent())?;
        if self.dir.metadata(path.rel()).is_ok_and(|m| m.is_dir()) {
            return Err(Error::IsADirectory(path.to_string()));
        }
        Ok(self.existing(path))
    }

    /// The directory at `path`, open: a handle that stays on it whatever
    /// is renamed later, to rename into and then sync.
    pub fn open_dir(&self, path: &VPath) -> io::Result<std::fs::File> {
        // Opened to read: cap-std's `open_dir` gives an O_PATH handle,
        // which can't be synced. Never waits on a FIFO put in its place.
        let mut options = OpenOptions::new();
        options
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NONBLOCK | libc::O_NOCTTY);
        Ok(self.dir.open_with(path.rel(), &options)?.into_std())
    }

    /// Bytes in regular files under the home, and the number of entries
    /// (files, directories, links) below it. Iterative, so a deep tree
    /// cannot overflow the stack; symlinks are not followed.
    pub fn usage(&self) -> io::Result<(u64, u64)> {
        let (mut bytes, mut entries) = (0u64, 0u64);
        let mut stack = vec![self.dir.try_clone()?];
        while let Some(dir) = stack.pop() {
            for item in dir.entries()? {
                let item = item?;
                entries += 1;
                let Ok(ft) = item.file_type() else { continue };
                if ft.is_dir() {
                    if let Ok(sub) = item.open_dir() {
                        stack.push(sub);
                    }
                } else if ft.is_file()
                    && let Ok(m) = item.metadata()
                {
                    bytes = bytes.saturating_add(m.len());
                }
            }
        }
        Ok((bytes, entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_open_to_be_synced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("/", dir.path().join("out")).unwrap();
        let home = Home::open(dir.path()).unwrap();
        let at = |p: &str| VPath::resolve(&VPath::root(), p, 99).unwrap();
        home.open_dir(&VPath::root()).unwrap().sync_all().unwrap();
        home.open_dir(&at("sub")).unwrap().sync_all().unwrap();
        assert!(home.open_dir(&at("none")).is_err());
        assert!(home.open_dir(&at("out")).is_err(), "a link out of the home");
        std::fs::write(dir.path().join("file"), b"").unwrap();
        assert!(home.open_dir(&at("file")).is_err());
        // A FIFO at a directory's name is refused at once, never waited on.
        let fifo = std::ffi::CString::new(
            dir.path()
                .join("fifo")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(home.open_dir(&at("fifo")).is_err()));
        let refused = rx.recv_timeout(std::time::Duration::from_secs(10));
        assert_eq!(refused, Ok(true), "opening a FIFO waited or succeeded");
    }
}
