//! Downloads to the client: the server's plan checked, the partial file
//! beside the target opened without following links, verified, resumable.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indicatif::ProgressBar;
use tracing::{info, warn};

use crate::protocol::{self, Candidate, Request, VPath};
use crate::transfer::journal::{self, Journal, Record};
use crate::transfer::{self, Plan, Stopped, Tree};

use super::error::local_err;
use super::{Client, ClientError, Result, Transferred};

/// A `GET` written and not yet answered: where its file lands and what
/// the request offered to resume from.
pub struct AskedGet {
    landing: Landing,
    offered: Vec<u64>,
    prior_chunk: u64,
    started: std::time::Instant,
    /// Bytes of the request line.
    request_len: usize,
}

impl AskedGet {
    /// Bytes the request took on the wire.
    pub fn request_len(&self) -> usize {
        self.request_len
    }
}

impl Client {
    /// Downloads `remote` to the local file `target`, resuming from a
    /// partial download that both ends prove equal.
    pub async fn get(
        &mut self,
        remote: &VPath,
        target: &Path,
        progress: &ProgressBar,
    ) -> Result<Transferred> {
        let asked = self.ask_get(remote, target).await?;
        self.flush().await?;
        self.get_answered(asked, progress).await?.landed().await
    }

    /// Writes the `GET` of `remote` to `target` with the resume candidates
    /// an earlier attempt left, without waiting for its reply (see
    /// [`Client::pipe`]); [`Client::get_answered`] reads it.
    pub async fn ask_get(&mut self, remote: &VPath, target: &Path) -> Result<AskedGet> {
        let started = std::time::Instant::now();
        let landing = Landing::new(&self.journal_dir, remote, target)?;
        let (candidates, prior_chunk) = landing.offers().await?;
        let offered: Vec<u64> = candidates.iter().map(|c| c.offset).collect();
        let request = Request::Get {
            path: landing.source.clone(),
            candidates,
        };
        let request_len = self.pipe(&request).await?;
        Ok(AskedGet {
            landing,
            offered,
            prior_chunk,
            started,
            request_len,
        })
    }

    /// Reads the reply to the oldest piped `GET` and receives its file,
    /// verified, into place; a file of one chunk may still be on its way
    /// to the disk when this returns, while the session goes on.
    pub async fn get_answered(
        &mut self,
        asked: AskedGet,
        progress: &ProgressBar,
    ) -> Result<Arrival> {
        let AskedGet {
            landing,
            offered,
            prior_chunk,
            started,
            ..
        } = asked;
        let target = landing.target.clone();
        let reply = self.read_reply().await?;
        self.answered();
        let id = reply.transfer_id();
        if reply.code >= 400 {
            info!(remote = %landing.source, local = %target.display(), id, code = reply.code, error = ?reply.text, "download refused");
            return Err(reply.into_error());
        }
        let numbers: Vec<u64> = reply
            .text
            .split(' ')
            .map_while(|w| w.parse().ok())
            .collect();
        let (size, offset, chunk) = match (reply.code, numbers.as_slice()) {
            (151, &[size, offset, chunk]) => (size, offset, chunk),
            _ => {
                return Err(ClientError::Protocol(format!(
                    "unexpected reply to GET: {} {}",
                    reply.code, reply.text
                )));
            }
        };
        // From here the server is sending: any error but a server reply
        // tells the caller to drop this session.
        self.in_data = true;
        check_plan(size, offset, chunk, &offered, prior_chunk).map_err(|why| {
            ClientError::Protocol(format!("bad download plan {:?}: {why}", reply.text))
        })?;
        landing.check_room(size - offset)?;
        if offset == 0 && size <= chunk {
            return self
                .get_whole(landing, (size, id.clone()), started, progress)
                .await;
        }
        let (file, tree, mut journal) = landing.open(size, chunk, offset).await?;
        info!(remote = %landing.source, local = %target.display(), id, size, resumed_at = offset, "download starts");
        progress.set_length(size);
        progress.set_position(offset);
        let file = Arc::new(file);
        let plan = Plan {
            file: file.clone(),
            size,
            chunk,
            offset,
            tree,
        };
        let checkpoints = self.options.checkpoints;
        let received =
            transfer::receive(&mut self.conn, plan, &mut journal, checkpoints, progress).await;
        let ms = started.elapsed().as_millis() as u64;
        match received {
            Ok(hash) => {
                self.in_data = false;
                let done = by_name(|| landing.finish(&file));
                if let Some(j) = &journal {
                    j.remove();
                }
                done.map_err(|e| local_err(&target, e))?;
                info!(remote = %landing.source, local = %target.display(), id, size, resumed_at = offset,
                      hash = %protocol::hex(&hash), ms, "download complete");
                Ok(Arrival::Landed(Transferred {
                    hash,
                    size,
                    resumed_at: offset,
                }))
            }
            Err(Stopped { error, verified }) => {
                landing.stopped(&file, journal, &error, verified);
                info!(remote = %landing.source, local = %target.display(), id, verified, error = ?error.to_string(), ms, "download stopped");
                Err(self.download_stopped(error).await)
            }
        }
    }

    /// Receives a file of one chunk into memory and sends it to the
    /// blocking pool to be written, made durable and renamed into place,
    /// in one trip. It has no journal: after a failure it starts again.
    async fn get_whole(
        &mut self,
        landing: Landing,
        (size, id): (u64, Option<String>),
        started: std::time::Instant,
        progress: &ProgressBar,
    ) -> Result<Arrival> {
        let target = landing.target.clone();
        info!(remote = %landing.source, local = %target.display(), id, size, "download starts");
        progress.set_length(size);
        progress.set_position(0);
        let (data, hash) = match transfer::receive_whole(&mut self.conn, size, progress).await {
            Ok(received) => received,
            Err(error) => {
                info!(remote = %landing.source, local = %target.display(), id, verified = 0, error = ?error.to_string(), "download stopped");
                return Err(self.download_stopped(error).await);
            }
        };
        self.in_data = false;
        let source = landing.source.clone();
        let writing = tokio::task::spawn_blocking(move || landing.land_whole(&data));
        Ok(Arrival::Writing(Writing {
            writing,
            source,
            target,
            id,
            hash,
            size,
            started,
        }))
    }

    /// The error of a download that stopped, with the session back in step
    /// where it still can be.
    async fn download_stopped(&mut self, error: transfer::Error) -> ClientError {
        if error.in_step() {
            // The stream was read to its end frame: still in step.
            self.in_data = false;
        }
        if matches!(error, transfer::Error::Aborted) {
            // The server gave up mid-file (its read failed); its reply says why.
            let reply = match self.read_reply().await {
                Ok(reply) => reply,
                Err(e) => return e,
            };
            self.in_data = false;
            return ClientError::Server {
                code: reply.code,
                text: reply.text,
            };
        }
        error.into()
    }
}

/// A downloaded file: in place, or verified and on its way to the disk.
pub enum Arrival {
    Landed(Transferred),
    Writing(Writing),
}

impl Arrival {
    /// Waits until the file is in place, durably, or its landing failed.
    pub async fn landed(self) -> Result<Transferred> {
        match self {
            Arrival::Landed(transferred) => Ok(transferred),
            Arrival::Writing(writing) => writing.landed().await,
        }
    }
}

/// A verified file of one chunk being written, synced and renamed into
/// place on the blocking pool while the session goes on. It is there once
/// [`Writing::landed`] says so; dropped, it still lands, unreported.
pub struct Writing {
    writing: tokio::task::JoinHandle<std::io::Result<()>>,
    source: String,
    target: PathBuf,
    id: Option<String>,
    hash: blake3::Hash,
    size: u64,
    started: std::time::Instant,
}

impl Writing {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether [`Writing::landed`] would answer without waiting.
    pub fn is_finished(&self) -> bool {
        self.writing.is_finished()
    }

    /// Waits until the file is in place, durably, or its landing failed.
    pub async fn landed(self) -> Result<Transferred> {
        let written = self
            .writing
            .await
            .map_err(|e| ClientError::Local(e.to_string()))?;
        written.map_err(|e| local_err(&self.target, e))?;
        let ms = self.started.elapsed().as_millis() as u64;
        info!(remote = %self.source, local = %self.target.display(), id = self.id, size = self.size,
              resumed_at = 0, hash = %protocol::hex(&self.hash), ms, "download complete");
        Ok(Transferred {
            hash: self.hash,
            size: self.size,
            resumed_at: 0,
        })
    }
}

/// Where a download lands: the target, the hidden partial file beside it
/// (`.NAME.ftpx-part`), and the resume journal in the client's state.
struct Landing {
    /// The target, absolute.
    target: PathBuf,
    dir: PathBuf,
    partial: PathBuf,
    journal: PathBuf,
    /// The remote path, as the journal records it.
    source: String,
}

impl Landing {
    fn new(journal_dir: &Path, remote: &VPath, target: &Path) -> Result<Landing> {
        let target_abs = std::path::absolute(target).map_err(|e| local_err(target, e))?;
        let name = target_abs
            .file_name()
            .ok_or_else(|| ClientError::Local(format!("{}: not a file name", target.display())))?
            .to_string_lossy()
            .into_owned();
        let dir = target_abs.parent().unwrap_or(Path::new("/")).to_path_buf();
        if target_abs.is_dir() {
            return Err(ClientError::Local(format!(
                "{}: is a directory",
                target.display()
            )));
        }
        if !dir.is_dir() {
            return Err(ClientError::Local(format!(
                "{}: no such directory",
                dir.display()
            )));
        }
        let source = remote.to_string();
        let key = journal::key(&["download", &source, &target_abs.to_string_lossy()]);
        Ok(Landing {
            partial: dir.join(format!(".{name}.ftpx-part")),
            journal: journal_dir.join(format!("{key}.toml")),
            target: target_abs,
            dir,
            source,
        })
    }

    fn record(&self, size: u64, chunk: u64) -> Record {
        let target = self.target.to_string_lossy().into_owned();
        Record::new("download", self.source.clone(), target, size, chunk)
    }

    /// What an earlier attempt left, offered in that attempt's chunk size.
    async fn offers(&self) -> Result<(Vec<Candidate>, u64)> {
        let prior = match Journal::load(&self.journal) {
            Ok(Some(prior)) => prior,
            Ok(None) => return Ok((vec![], 0)),
            Err(e) => {
                warn!(error = %e, "ignoring a damaged journal");
                return Ok((vec![], 0));
            }
        };
        let mine = self.record(prior.size, prior.chunk);
        if (&prior.kind, &prior.source, &prior.target) != (&mine.kind, &mine.source, &mine.target) {
            return Ok((vec![], 0));
        }
        let (partial, chunk) = (self.partial.clone(), prior.chunk);
        let offered = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<Candidate>> {
            let f = open_nofollow(&partial, false)?;
            let len = f.metadata()?.len();
            let offsets = [len, prior.verified.min(len)];
            transfer::offer(&f, prior.size, prior.chunk, &offsets)
        })
        .await
        .map_err(|e| ClientError::Local(e.to_string()))?
        .unwrap_or_default();
        Ok((offered, chunk))
    }

    /// Whether `bytes` more fit in the target's file system.
    fn check_room(&self, bytes: u64) -> Result<()> {
        let free = free_space(&self.dir).map_err(|e| local_err(&self.dir, e))?;
        if bytes > free {
            return Err(ClientError::Local(format!(
                "{}: the server offers {bytes} bytes, but only {free} are free there",
                self.dir.display(),
            )));
        }
        Ok(())
    }

    /// Opens the partial file at the agreed offset, never through a link,
    /// and the journal (none for a file of one chunk: it restarts).
    async fn open(
        &self,
        size: u64,
        chunk: u64,
        offset: u64,
    ) -> Result<(File, Tree, Option<Journal>)> {
        let p = self.partial.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let file = by_name(|| open_nofollow(&p, offset == 0))?;
            transfer::resume_partial(file, size, chunk, offset)
        })
        .await
        .map_err(|e| ClientError::Local(e.to_string()))?;
        let (file, tree) = opened.map_err(|e| local_err(&self.partial, e))?;
        if size <= chunk {
            return Ok((file, tree, None));
        }
        let mut journal = Journal::new(self.journal.clone(), self.record(size, chunk));
        journal
            .save(offset)
            .map_err(|e| ClientError::Local(format!("cannot write the journal: {e}")))?;
        Ok((file, tree, Some(journal)))
    }

    /// Writes a whole verified file as the partial and moves it onto the
    /// target, durably; on failure the partial goes.
    fn land_whole(&self, data: &[u8]) -> std::io::Result<()> {
        by_name(|| {
            let written = open_nofollow(&self.partial, true).and_then(|mut file| {
                std::io::Write::write_all(&mut file, data)?;
                self.finish(&file)
            });
            if written.is_err() {
                let _ = std::fs::remove_file(&self.partial);
            }
            written
        })
    }

    /// Moves the verified partial onto the target, durably. Only under
    /// [`by_name`].
    fn finish(&self, file: &File) -> std::io::Result<()> {
        file.sync_all()?;
        std::fs::rename(&self.partial, &self.target)?;
        File::open(&self.dir)?.sync_all()
    }

    /// Keeps what was verified for a resume, or drops the partial when it
    /// is worth nothing (a wrong whole, or a file of one chunk).
    fn stopped(
        &self,
        file: &File,
        mut journal: Option<Journal>,
        error: &transfer::Error,
        verified: u64,
    ) {
        if matches!(error, transfer::Error::HashMismatch) || journal.is_none() {
            let _ = by_name(|| std::fs::remove_file(&self.partial));
            if let Some(j) = &journal {
                j.remove();
            }
        } else {
            let _ = file.sync_data();
            if let Some(j) = journal.as_mut() {
                let _ = j.save(verified);
            }
        }
    }
}

/// Runs `f`, which makes, removes or renames a download's partial file
/// by its name, while no other download of this process does. Two
/// downloads to one name (a name a server lists twice, two names one
/// case-insensitive disk takes for the same, a run after an interrupted
/// one whose last files are still being written) then never remove or
/// move into place each other's unfinished partial: whatever has a
/// target's name is a whole, verified file.
fn by_name<T>(f: impl FnOnce() -> T) -> T {
    static BY_NAME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _alone = BY_NAME.lock().unwrap_or_else(|e| e.into_inner());
    f()
}

/// Checks a `151 SIZE OFFSET CHUNK` plan against what the client asked:
/// a valid chunk size, and an offset that is 0 or one of the `offered`
/// candidates (made in chunks of `offered_chunk`), within the size.
fn check_plan(
    size: u64,
    offset: u64,
    chunk: u64,
    offered: &[u64],
    offered_chunk: u64,
) -> std::result::Result<(), String> {
    if !protocol::valid_chunk_size(chunk) {
        return Err(format!(
            "chunk size {chunk} is not a power of two from 1 KiB to 4 MiB"
        ));
    }
    if size > MAX_DOWNLOAD {
        return Err(format!(
            "size {size} is beyond any file this client can write"
        ));
    }
    if offset > size {
        return Err(format!("offset {offset} is beyond the size {size}"));
    }
    if offset != 0 && (!offered.contains(&offset) || chunk != offered_chunk) {
        return Err(format!("offset {offset} was not offered"));
    }
    Ok(())
}

/// Largest file a download may declare: the largest a file offset can be.
pub const MAX_DOWNLOAD: u64 = i64::MAX as u64;

/// Bytes an unprivileged user may still write in the file system of `dir`.
fn free_space(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated string and `st` a valid out-parameter.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Opens a download's partial file for reading and writing without ever
/// following a symbolic link at `path`. With `fresh`, whatever is there
/// (our own leftover, or a link someone planted) is unlinked first and the
/// file is created anew, so nothing outside is read, cut or written.
fn open_nofollow(path: &Path, fresh: bool) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = std::fs::OpenOptions::new();
    options
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    if fresh {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        // O_EXCL: a link planted again since is an error, not followed.
        options.create_new(true);
    }
    let file = options.open(path).map_err(|e| {
        if e.raw_os_error() == Some(libc::ELOOP) {
            std::io::Error::other("is a symbolic link; refusing to follow it")
        } else {
            e
        }
    })?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_plans_are_checked() {
        let ok = |size, offset, chunk| check_plan(size, offset, chunk, &[8192], 4096);
        assert!(ok(10_000, 0, 4096).is_ok());
        assert!(ok(10_000, 8192, 4096).is_ok());
        assert!(ok(0, 0, 1024).is_ok());
        // An offset not offered, or offered in another chunk size.
        assert!(ok(10_000, 4096, 4096).is_err());
        assert!(ok(10_000, 8192, 8192).is_err());
        // Beyond the size, a bad chunk size, a size no file can have.
        assert!(check_plan(4096, 8192, 4096, &[8192], 4096).is_err());
        for chunk in [0, 1, 1000, 3 << 10, 8 << 20, u64::MAX] {
            assert!(ok(10_000, 0, chunk).is_err(), "{chunk}");
        }
        assert!(ok(1 << 63, 0, 4096).is_err());
        assert!(ok(MAX_DOWNLOAD, 0, 4096).is_ok());
    }

    #[test]
    fn partial_files_never_follow_links() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep me").unwrap();
        let part = dir.path().join(".f.ftpx-part");
        std::os::unix::fs::symlink(&victim, &part).unwrap();
        // Resuming through the link is refused; starting afresh replaces it.
        assert!(open_nofollow(&part, false).is_err());
        let f = open_nofollow(&part, true).unwrap();
        f.set_len(0).unwrap();
        assert!(!std::fs::symlink_metadata(&part).unwrap().is_symlink());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        assert!(free_space(dir.path()).unwrap() > 0);
    }
}
