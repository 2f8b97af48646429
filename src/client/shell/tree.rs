//! `put -r` and `get -r`: whole trees, skipping what is already complete on
//! the other side, never writing outside the directory the user named.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::commands::remote_is_dir;
use super::output::{TreeProgress, printable, said};
use super::{Remote, Transfer, local_path};
use crate::client::{Client, ClientError};
use crate::protocol::{self, Entry, Request, VPath};

/// A name from a remote listing is used locally only if it is one plain
/// path component of at most [`crate::protocol::MAX_NAME`] bytes, without
/// control characters (NUL included): a hostile server can't make the
/// client write elsewhere.
pub(super) fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= crate::protocol::MAX_NAME
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.chars().any(char::is_control)
}

pub(super) fn local_hash(path: &Path) -> Option<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path).ok()?).ok()?;
    Some(h.finalize())
}

/// Whether the remote file `path` has `size` bytes and BLAKE3 `hash`.
pub(super) async fn remote_matches(
    client: &mut Client,
    path: &VPath,
    size: u64,
    hash: impl FnOnce() -> Option<blake3::Hash>,
) -> bool {
    let Ok(stat) = client.request(&Request::Stat(path.to_string())).await else {
        return false;
    };
    let Ok(entry) = Entry::parse(&stat.text) else {
        return false;
    };
    if entry.kind != 'f' || entry.size != size {
        return false;
    }
    let Ok(reply) = client.request(&Request::Hash(path.to_string())).await else {
        return false;
    };
    hash().is_some_and(|h| protocol::hex(&h) == reply.text)
}

/// A local file to upload: its path, its remote path and its size.
type LocalFile = (PathBuf, VPath, u64);

pub(super) async fn put_tree(
    remote: &mut Remote,
    local: &Path,
    dest: Option<&str>,
    keep_times: bool,
) -> Result<(), ClientError> {
    let meta = std::fs::metadata(local)
        .map_err(|e| ClientError::Local(format!("{}: {e}", local.display())))?;
    if !meta.is_dir() {
        return Err(ClientError::Local(format!(
            "{}: not a directory",
            local.display()
        )));
    }
    let base = std::path::absolute(local).map_err(|e| ClientError::Local(e.to_string()))?;
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let client = remote.client().await?;
    let mut root = client.remote_path(dest.unwrap_or(if name.is_empty() { "." } else { &name }))?;
    // Into an existing directory, as `cp -r` and sftp do; else by that name.
    if dest.is_some() && !name.is_empty() && remote_is_dir(client, &root).await {
        root = root.join(&name);
    }
    let (dirs, files) = local_tree(&base, &root)?;
    let complete = make_dirs_and_compare(remote.client().await?, &dirs, &files).await?;
    let times: Vec<(PathBuf, VPath)> = match keep_times {
        true => files
            .iter()
            .map(|(p, r, _)| (p.clone(), r.clone()))
            .collect(),
        false => vec![],
    };
    let skipped = complete.len();
    let (small, big): (Vec<_>, Vec<_>) = files
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !complete.contains(i))
        .map(|(_, f)| f)
        .partition(|(_, _, size)| *size <= protocol::MAX_SEND);

    let mut progress = TreeProgress::new();
    let bytes = small.iter().chain(&big).map(|(_, _, size)| size).sum();
    progress.add((small.len() + big.len()) as u64, bytes);
    let small = small.into_iter().map(|(p, r, _)| (p, r)).collect();
    let mut sent = send_small_files(remote, &mut progress, small).await?;
    for (path, rpath, size) in big {
        let bar = progress.file(&rpath.to_string(), size).clone();
        let t = progress
            .follow(remote.transfer(&Transfer::Put(path, rpath.clone()), &bar))
            .await?;
        progress.done(&t, &rpath.to_string());
        sent += 1;
    }
    progress.finish(&format!("{sent} files sent, {skipped} already complete"));
    set_remote_times(remote.client().await?, &times).await
}

/// `put -r -p`: each uploaded file gets its local file's modification
/// time, pipelined.
async fn set_remote_times(
    client: &mut Client,
    files: &[(PathBuf, VPath)],
) -> Result<(), ClientError> {
    let requests: Vec<Request> = files
        .iter()
        .filter_map(|(local, remote)| {
            let mtime = std::fs::metadata(local).and_then(|m| m.modified()).ok()?;
            let secs = mtime.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
            Some(Request::Mtime {
                path: remote.to_string(),
                mtime: secs,
            })
        })
        .collect();
    client
        .request_many(&requests, |_, reply| reply.map(|_| ()))
        .await
}

/// The local tree under `base`, to land under `root`: the directories to
/// make (`root` first) and the regular files to send.
fn local_tree(base: &Path, root: &VPath) -> Result<(Vec<VPath>, Vec<LocalFile>), ClientError> {
    let mut dirs = vec![root.clone()];
    let mut files = vec![];
    let mut stack = vec![(base.to_path_buf(), root.clone())];
    while let Some((dir, rdir)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| ClientError::Local(format!("{}: {e}", dir.display())))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                dirs.push(rdir.join(&name));
                stack.push((path, rdir.join(&name)));
            } else if let Ok(m) = std::fs::metadata(&path)
                .ok()
                .filter(|m| m.is_file())
                .ok_or(())
            {
                files.push((path, rdir.join(&name), m.len()));
            } else {
                eprintln!("ftpx: skipping {}: not a regular file", path.display());
            }
        }
    }
    Ok((dirs, files))
}

/// Makes the remote directories and finds which files are already there
/// complete (same size, same hash): pipelined, one round trip for each
/// kind of request, not one per file. Returns their indexes in `files`.
async fn make_dirs_and_compare(
    client: &mut Client,
    dirs: &[VPath],
    files: &[LocalFile],
) -> Result<HashSet<usize>, ClientError> {
    let mkdirs: Vec<Request> = dirs.iter().map(|d| Request::Mkd(d.to_string())).collect();
    client
        .request_many(&mkdirs, |_, reply| match reply {
            Ok(_) | Err(ClientError::Server { code: 553, .. }) => Ok(()),
            Err(e) => Err(e),
        })
        .await?;
    let lists: Vec<Request> = dirs
        .iter()
        .map(|d| Request::List(Some(d.to_string())))
        .collect();
    // Only the sizes of files we would send are kept, whatever the listings hold.
    let wanted: HashSet<&VPath> = files.iter().map(|f| &f.1).collect();
    let mut there = HashMap::new();
    client
        .request_many(&lists, |i, reply| {
            for line in reply.map(|r| r.lines).unwrap_or_default() {
                if let Ok(Entry {
                    kind: 'f',
                    size,
                    name,
                    ..
                }) = Entry::parse(&line)
                {
                    let path = dirs[i].join(&name);
                    if wanted.contains(&path) {
                        there.insert(path, size);
                    }
                }
            }
            Ok(())
        })
        .await?;
    // A file of the same size is complete if its hash matches too.
    let same: Vec<usize> = (0..files.len())
        .filter(|&i| there.get(&files[i].1) == Some(&files[i].2))
        .collect();
    let hashes: Vec<Request> = same
        .iter()
        .map(|&i| Request::Hash(files[i].1.to_string()))
        .collect();
    let mut complete = HashSet::new();
    client
        .request_many(&hashes, |k, reply| {
            let i = same[k];
            if reply
                .is_ok_and(|r| local_hash(&files[i].0).is_some_and(|h| protocol::hex(&h) == r.text))
            {
                complete.insert(i);
            }
            Ok(())
        })
        .await?;
    Ok(complete)
}

/// Sends small files many at a time; after a dropped connection, reconnects
/// and sends again those not yet stored. Returns how many were sent.
async fn send_small_files(
    remote: &mut Remote,
    progress: &mut TreeProgress,
    mut pending: Vec<(PathBuf, VPath)>,
) -> Result<usize, ClientError> {
    let mut sent = 0;
    let mut attempt = 0;
    while !pending.is_empty() {
        let mut stored = vec![false; pending.len()];
        let mut refused = None;
        let result = remote
            .client()
            .await?
            .send_many(&pending, |i, outcome| match outcome {
                Ok(t) => {
                    stored[i] = true;
                    progress.done(&t, &pending[i].1.to_string());
                }
                Err(e) => {
                    refused.get_or_insert(e);
                }
            })
            .await;
        sent += stored.iter().filter(|s| **s).count();
        if let Some(e) = refused {
            return Err(e);
        }
        match result {
            Ok(()) => break,
            Err(e) if e.is_retriable() && attempt < remote.retries => {
                attempt += 1;
                remote.client = None;
                progress.suspend(|| {
                    eprintln!(
                        "ftpx: {}; retrying ({attempt}/{})",
                        said(&e),
                        remote.retries
                    )
                });
                tokio::time::sleep(Duration::from_millis(500 * (1 << attempt.min(5)))).await;
                let mut keep = stored.iter().map(|s| !s);
                pending.retain(|_| keep.next().unwrap_or(true));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(sent)
}

/// Levels below the directory `get -r` copies, at most: an honest server's
/// paths have at most 4096 bytes, so at most 2048 levels.
pub(super) const MAX_TREE_DEPTH: usize = 2048;
/// Entries (files, directories and others) `get -r` takes from the remote
/// tree in one run, at most; beyond, copy the tree in parts.
pub(super) const MAX_TREE_ENTRIES: usize = 1_000_000;
/// Directories `get -r` has found and not yet copied, at most. Each is kept
/// as one name of at most [`crate::protocol::MAX_NAME`] bytes.
pub(super) const MAX_TREE_PENDING: usize = 100_000;

/// One directory of the tree `get -r` is copying, and its subdirectories
/// still to copy.
pub(super) struct Level {
    remote: VPath,
    local: PathBuf,
    subdirs: Vec<String>,
}

/// Copies a remote tree, one directory at a time as it walks: list it,
/// make its local directory, fetch its files, then go down. Only the
/// names of directories still to copy are kept, within the limits above.
pub(super) async fn get_tree(
    remote: &mut Remote,
    src: &str,
    dest: Option<&str>,
    keep_times: bool,
) -> Result<(), ClientError> {
    let root = remote.client().await?.remote_path(src)?;
    let name = root.file_name().unwrap_or("home").to_string();
    // Into an existing directory, as `cp -r` and sftp do; else by that name.
    let local_root = match dest.map(local_path) {
        Some(d) if d.is_dir() => d.join(&name),
        Some(d) => d,
        None => PathBuf::from(&name),
    };
    let mut walk = Walk {
        keep_times,
        ..Walk::default()
    };
    // The directory the user named is theirs to choose, even through a link.
    let subdirs = walk
        .copy_dir(remote, &root, &local_root, |d| std::fs::create_dir_all(d))
        .await?;
    let mut stack = vec![Level {
        remote: root,
        local: local_root,
        subdirs,
    }];
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.subdirs.pop() else {
            stack.pop();
            continue;
        };
        walk.pending -= 1;
        let (r, l) = (top.remote.join(&name), top.local.join(&name));
        if stack.len() >= MAX_TREE_DEPTH {
            return Err(ClientError::Protocol(format!(
                "{}: the remote tree is more than {MAX_TREE_DEPTH} levels deep",
                r
            )));
        }
        let subdirs = walk.copy_dir(remote, &r, &l, make_local_dir).await?;
        stack.push(Level {
            remote: r,
            local: l,
            subdirs,
        });
    }
    let line = format!(
        "{} files received, {} already complete",
        walk.got, walk.skipped
    );
    walk.progress.finish(&line);
    Ok(())
}

/// What `get -r` has done so far.
pub(super) struct Walk {
    entries: usize,
    pending: usize,
    got: usize,
    skipped: usize,
    progress: TreeProgress,
    /// `get -r -p`: each file gets its remote modification time.
    keep_times: bool,
}

impl Default for Walk {
    fn default() -> Walk {
        Walk {
            entries: 0,
            pending: 0,
            got: 0,
            skipped: 0,
            progress: TreeProgress::new(),
            keep_times: false,
        }
    }
}

impl Walk {
    /// Copies the files of the remote directory `rdir` into `ldir` (made
    /// by `make`) and returns the names of its subdirectories, last first.
    async fn copy_dir(
        &mut self,
        remote: &mut Remote,
        rdir: &VPath,
        ldir: &Path,
        make: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<Vec<String>, ClientError> {
        let listing = remote.client().await?.list(Some(&rdir.to_string())).await?;
        if listing.truncated {
            return Err(ClientError::Local(format!(
                "{rdir}: listing truncated by the server; copy it in parts"
            )));
        }
        self.entries += listing.entries.len();
        if self.entries > MAX_TREE_ENTRIES {
            return Err(ClientError::Local(format!(
                "the remote tree has more than {MAX_TREE_ENTRIES} entries; copy it in parts"
            )));
        }
        make(ldir).map_err(|e| ClientError::Local(format!("{}: {e}", ldir.display())))?;
        let mut subdirs = vec![];
        let mut files = vec![];
        for Entry {
            kind,
            size,
            mtime,
            name,
        } in listing.entries
        {
            if !safe_name(&name) {
                self.progress.suspend(|| {
                    eprintln!(
                        "ftpx: skipping {} in {}: not a usable file name",
                        printable(&format!("{name:?}")),
                        printable(&rdir.to_string())
                    )
                });
                continue;
            }
            match kind {
                'd' => subdirs.push(name),
                'f' => files.push((name, size, mtime)),
                _ => self.progress.suspend(|| {
                    eprintln!(
                        "ftpx: skipping {}: not a regular file",
                        printable(&rdir.join(&name).to_string())
                    )
                }),
            }
        }
        self.pending += subdirs.len();
        if self.pending > MAX_TREE_PENDING {
            return Err(ClientError::Local(format!(
                "the remote tree has more than {MAX_TREE_PENDING} directories waiting to be copied; copy it in parts"
            )));
        }
        self.copy_files(remote, rdir, ldir, files).await?;
        subdirs.reverse();
        Ok(subdirs)
    }

    /// Copies the files of one directory, skipping those already complete.
    async fn copy_files(
        &mut self,
        remote: &mut Remote,
        rdir: &VPath,
        ldir: &Path,
        files: Vec<(String, u64, i64)>,
    ) -> Result<(), ClientError> {
        let bytes = files.iter().map(|(_, size, _)| size).sum();
        self.progress.add(files.len() as u64, bytes);
        for (name, size, mtime) in files {
            let lpath = ldir.join(&name);
            self.copy_file(remote, rdir, ldir, &name, size).await?;
            if self.keep_times {
                let when = std::time::UNIX_EPOCH
                    + std::time::Duration::from_secs(mtime.max(0).unsigned_abs());
                std::fs::File::options()
                    .write(true)
                    .open(&lpath)
                    .and_then(|f| f.set_modified(when))
                    .map_err(|e| ClientError::Local(format!("{}: {e}", lpath.display())))?;
            }
        }
        Ok(())
    }

    /// Copies one file, unless it is already complete.
    async fn copy_file(
        &mut self,
        remote: &mut Remote,
        rdir: &VPath,
        ldir: &Path,
        name: &str,
        size: u64,
    ) -> Result<(), ClientError> {
        let (rpath, lpath) = (rdir.join(name), ldir.join(name));
        // Only a regular file (not a link) can already be complete.
        let local_size = std::fs::symlink_metadata(&lpath)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        let lp = lpath.clone();
        if local_size == Some(size)
            && remote_matches(remote.client().await?, &rpath, size, || local_hash(&lp)).await
        {
            self.skipped += 1;
            self.progress.skip(size);
            return Ok(());
        }
        let bar = self.progress.file(&rpath.to_string(), size).clone();
        let t = self
            .progress
            .follow(remote.transfer(&Transfer::Get(rpath, lpath.clone()), &bar))
            .await?;
        self.progress.done(&t, &lpath.display().to_string());
        self.got += 1;
        Ok(())
    }
}

/// Makes a directory below the one `get -r` copies into, or takes the one
/// there, but never a symbolic link: nothing is written through a link.
pub(super) fn make_local_dir(path: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(path)?;
            if meta.file_type().is_symlink() {
                Err(std::io::Error::other(
                    "is a symbolic link; refusing to write through it",
                ))
            } else if !meta.is_dir() {
                Err(std::io::Error::other("exists and is not a directory"))
            } else {
                Ok(())
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/etc/passwd",
            "a/b",
            "a\\b",
            "a\nb",
            "\u{1b}[2J",
            "a\0b",
            "\u{9b}",
            &"n".repeat(256),
        ] {
            assert!(!safe_name(bad), "{bad:?}");
        }
        assert!(safe_name("ok name.txt") && safe_name(&"n".repeat(255)));
    }
}
