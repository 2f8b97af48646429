//! `put -r`: a whole tree, skipping what is already complete on the
//! server; and what `get -r` (`fetch`) shares with it: which names from the
//! wire are usable, local hashes, local directories never made through a link.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::commands::remote_is_dir;
use super::output::{TreeProgress, said};
use super::{Remote, Transfer};
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
    // Each directory made, then listed, all in one round trip: a listing
    // is answered after the MKD before it.
    let mut requests: Vec<Request> = dirs.iter().map(|d| Request::Mkd(d.to_string())).collect();
    requests.extend(dirs.iter().map(|d| Request::List(Some(d.to_string()))));
    // Only the sizes of files we would send are kept, whatever the listings hold.
    let wanted: HashSet<&VPath> = files.iter().map(|f| &f.1).collect();
    let mut there = HashMap::new();
    client
        .request_many(&requests, |i, reply| {
            let Some(listed) = i.checked_sub(dirs.len()) else {
                return match reply {
                    Ok(_) | Err(ClientError::Server { code: 553, .. }) => Ok(()),
                    Err(e) => Err(e),
                };
            };
            for line in reply.map(|r| r.lines).unwrap_or_default() {
                if let Ok(Entry {
                    kind: 'f',
                    size,
                    name,
                    ..
                }) = Entry::parse(&line)
                {
                    let path = dirs[listed].join(&name);
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
