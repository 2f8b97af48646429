//! `get -r`: a remote tree copied with its listings, its hash checks and
//! its files in flight together, as `put -r` sends small files. Requests go
//! out without waiting for the replies before them; the replies come back
//! in order, and each one's work (a listing's entries, a file to check or
//! fetch) makes the next requests. Each file still travels as its own
//! verified, resumable `GET` into a partial file renamed into place. A file
//! of one chunk is written to disk on the blocking pool while the next
//! replies are read; it counts as received once it is in place.
//!
//! What a server can make the client hold is bounded: one listing is read
//! within the reply limits, at most [`MAX_LISTINGS_IN_FLIGHT`] are asked
//! for at once and none while [`FILES_LOW`] files wait, and the tree as a
//! whole within [`MAX_TREE_ENTRIES`], [`MAX_TREE_PENDING`] and
//! [`MAX_TREE_DEPTH`]. Requests in flight stay within
//! [`MAX_IN_FLIGHT_BYTES`], which any connection's buffers hold, so the
//! client never waits to write while the server waits for it to read.
//! Files being written stay within [`MAX_WRITING`] and
//! [`MAX_WRITING_BYTES`].

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::output::{TreeProgress, printable, said};
use super::tree::{local_hash, make_local_dir, safe_name};
use super::{Remote, local_path};
use crate::client::{Arrival, AskedGet, Client, ClientError, Listing, Transferred, Writing};
use crate::protocol::{self, Entry, Request, VPath};

/// Levels below the directory `get -r` copies, at most: an honest server's
/// paths have at most 4096 bytes, so at most 2048 levels.
pub(super) const MAX_TREE_DEPTH: usize = 2048;
/// Entries (files, directories and others) `get -r` takes from the remote
/// tree in one run, at most; beyond, copy the tree in parts.
pub(super) const MAX_TREE_ENTRIES: usize = 1_000_000;
/// Directories `get -r` has found and not yet listed, at most. Each is kept
/// as one name of at most [`crate::protocol::MAX_NAME`] bytes.
pub(super) const MAX_TREE_PENDING: usize = 100_000;
/// Requests in flight at most.
const MAX_IN_FLIGHT: usize = 1024;
/// Bytes of the request lines in flight at most: far less than the socket
/// buffers of any connection hold.
const MAX_IN_FLIGHT_BYTES: usize = 32 << 10;
/// Listings asked for at once, at most.
const MAX_LISTINGS_IN_FLIGHT: usize = 4;
/// No listing is asked for while this many files wait to be fetched.
const FILES_LOW: usize = 4096;
/// Received files being written to disk at once, at most.
const MAX_WRITING: usize = 64;
/// Bytes of the received files being written to disk, at most (one file
/// of any size is let through).
const MAX_WRITING_BYTES: u64 = 16 << 20;

/// A directory of the tree, listed or about to be.
struct Dir {
    remote: VPath,
    local: PathBuf,
    /// Levels below the directory the user named.
    depth: usize,
}

/// A subdirectory found in a listing, not yet listed: only its name.
struct Subdir {
    parent: Arc<Dir>,
    name: String,
}

/// A regular file found in a listing.
struct File {
    dir: Arc<Dir>,
    name: String,
    size: u64,
    mtime: i64,
    /// Its local copy was compared already: fetch it without asking again.
    checked: bool,
}

impl File {
    fn remote(&self) -> VPath {
        self.dir.remote.join(&self.name)
    }

    fn local(&self) -> PathBuf {
        self.dir.local.join(&self.name)
    }
}

/// A request in flight, and what its reply is for.
enum Job {
    List(Arc<Dir>),
    /// `HASH` of a file whose local copy has the same size.
    Check(File),
    Get(File, AskedGet),
}

/// Copies a remote tree as `cp -r` and sftp do: into `dest` when it is an
/// existing directory, else to the new name `dest`.
pub(super) async fn get_tree(
    remote: &mut Remote,
    src: &str,
    dest: Option<&str>,
    keep_times: bool,
) -> Result<(), ClientError> {
    let root = remote.client().await?.remote_path(src)?;
    let name = root.file_name().unwrap_or("home").to_string();
    let local = match dest.map(local_path) {
        Some(d) if d.is_dir() => d.join(&name),
        Some(d) => d,
        None => PathBuf::from(&name),
    };
    let mut fetch = Fetch::new(keep_times);
    fetch.lists.push(Arc::new(Dir {
        remote: root,
        local,
        depth: 0,
    }));
    fetch.run(remote).await?;
    let line = format!(
        "{} files received, {} already complete",
        fetch.got, fetch.skipped
    );
    fetch.progress.finish(&line);
    Ok(())
}

/// What `get -r` has to do, has in flight, and has done.
struct Fetch {
    /// Directories to list before any in `subdirs`: the root, or a listing
    /// asked again after a reconnect.
    lists: Vec<Arc<Dir>>,
    /// Directories found and not yet listed, the last found first.
    subdirs: Vec<Subdir>,
    files: VecDeque<File>,
    in_flight: VecDeque<(Job, usize)>,
    /// Bytes of the request lines in flight.
    in_flight_bytes: usize,
    /// Received files on their way to the disk, the oldest first.
    writing: VecDeque<(File, Writing)>,
    writing_bytes: u64,
    listings: usize,
    /// The failure that ends the run once what is in flight has arrived.
    failed: Option<ClientError>,
    entries: usize,
    got: usize,
    skipped: usize,
    progress: TreeProgress,
    /// `get -r -p`: each file gets its remote modification time.
    keep_times: bool,
}

impl Fetch {
    fn new(keep_times: bool) -> Fetch {
        Fetch {
            lists: vec![],
            subdirs: vec![],
            files: VecDeque::new(),
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
            writing: VecDeque::new(),
            writing_bytes: 0,
            listings: 0,
            failed: None,
            entries: 0,
            got: 0,
            skipped: 0,
            progress: TreeProgress::new(),
            keep_times,
        }
    }

    /// Runs until every file is copied; after a dropped connection,
    /// reconnects and asks again for what was in flight, up to the
    /// session's retries in a row without progress.
    async fn run(&mut self, remote: &mut Remote) -> Result<(), ClientError> {
        let mut attempt = 0;
        let mut done_before = 0;
        loop {
            let result = match remote.client().await {
                Ok(client) => self.drain(client).await,
                Err(e) => Err(e),
            };
            // What was received lands whatever became of the session.
            let landed = self.land_all().await;
            let Err(e) = result.and(landed) else {
                return Ok(());
            };
            if self.got + self.skipped > done_before {
                (attempt, done_before) = (0, self.got + self.skipped);
            }
            if !e.is_retriable() || attempt >= remote.retries {
                return Err(e);
            }
            attempt += 1;
            remote.client = None;
            self.requeue();
            self.progress.suspend(|| {
                eprintln!(
                    "ftpx: {}; retrying ({attempt}/{})",
                    said(&e),
                    remote.retries
                )
            });
            tokio::time::sleep(Duration::from_millis(500 * (1 << attempt.min(5)))).await;
        }
    }

    /// On one session, until nothing is left: asks for what the bounds
    /// allow, then reads one reply and does its work. After a failure that
    /// leaves the session in step (a local error, a refusal), nothing more
    /// is asked for, what is in flight arrives, and the failure is returned.
    async fn drain(&mut self, client: &mut Client) -> Result<(), ClientError> {
        loop {
            if self.failed.is_none() {
                self.fill(client).await?;
            }
            let Some((job, bytes)) = self.in_flight.pop_front() else {
                return self.failed.take().map_or(Ok(()), Err);
            };
            self.in_flight_bytes -= bytes;
            let answered = match self.answer(client, job).await {
                Ok(()) => self.landed(MAX_WRITING).await,
                Err(e) => Err(e),
            };
            match answered {
                Ok(()) => {}
                Err(e) if self.failed.is_none() && !e.is_retriable() && client.in_step() => {
                    self.failed = Some(e);
                }
                Err(e) => return Err(self.failed.take().unwrap_or(e)),
            }
        }
    }

    /// Puts what was in flight back in the queues, to be asked again.
    fn requeue(&mut self) {
        while let Some((job, _)) = self.in_flight.pop_back() {
            match job {
                Job::List(dir) => self.lists.push(dir),
                Job::Check(file) | Job::Get(file, _) => self.files.push_front(file),
            }
        }
        (self.in_flight_bytes, self.listings) = (0, 0);
    }

    /// Writes requests while the bounds allow: listings first (they feed
    /// the queue), then the files waiting, and sends them.
    async fn fill(&mut self, client: &mut Client) -> Result<(), ClientError> {
        let mut wrote = false;
        while self.in_flight.len() < MAX_IN_FLIGHT && self.in_flight_bytes < MAX_IN_FLIGHT_BYTES {
            let (job, bytes) = if let Some(dir) = self.next_dir()? {
                let bytes = client
                    .pipe(&Request::List(Some(dir.remote.to_string())))
                    .await?;
                self.listings += 1;
                (Job::List(dir), bytes)
            } else if let Some(file) = self.files.pop_front() {
                self.ask_file(client, file).await?
            } else {
                break;
            };
            self.in_flight.push_back((job, bytes));
            self.in_flight_bytes += bytes;
            wrote = true;
        }
        if wrote {
            client.flush().await?;
        }
        Ok(())
    }

    /// The next directory to list, if the bounds allow one now.
    fn next_dir(&mut self) -> Result<Option<Arc<Dir>>, ClientError> {
        if self.listings >= MAX_LISTINGS_IN_FLIGHT || self.files.len() >= FILES_LOW {
            return Ok(None);
        }
        if let Some(dir) = self.lists.pop() {
            return Ok(Some(dir));
        }
        let Some(Subdir { parent, name }) = self.subdirs.pop() else {
            return Ok(None);
        };
        let remote = parent.remote.join(&name);
        if parent.depth + 1 >= MAX_TREE_DEPTH {
            return Err(ClientError::Protocol(format!(
                "{remote}: the remote tree is more than {MAX_TREE_DEPTH} levels deep"
            )));
        }
        Ok(Some(Arc::new(Dir {
            remote,
            local: parent.local.join(&name),
            depth: parent.depth + 1,
        })))
    }

    /// Asks for a file: its hash, when a local file of its size is there
    /// (only a regular file, not a link, can be complete), else the file.
    async fn ask_file(
        &mut self,
        client: &mut Client,
        file: File,
    ) -> Result<(Job, usize), ClientError> {
        let local_size = std::fs::symlink_metadata(file.local())
            .ok()
            .filter(|m| m.is_file())
            .map(|m| m.len());
        if !file.checked && local_size == Some(file.size) {
            let bytes = client
                .pipe(&Request::Hash(file.remote().to_string()))
                .await?;
            return Ok((Job::Check(file), bytes));
        }
        let asked = client.ask_get(&file.remote(), &file.local()).await?;
        let bytes = asked.request_len();
        Ok((Job::Get(file, asked), bytes))
    }

    /// Reads the reply to the oldest request in flight and does its work.
    /// What fails goes back in its queue, for a retry to ask again.
    async fn answer(&mut self, client: &mut Client, job: Job) -> Result<(), ClientError> {
        match job {
            Job::List(dir) => {
                self.listings -= 1;
                match client.read_listing().await {
                    Ok(listing) => self.listed(&dir, listing),
                    Err(e) => {
                        self.lists.push(dir);
                        Err(e)
                    }
                }
            }
            Job::Check(mut file) => {
                let reply = match client.read_answer().await {
                    Ok(reply) => reply,
                    Err(e) => {
                        self.files.push_front(file);
                        return Err(e);
                    }
                };
                let theirs = (reply.code < 400).then_some(reply.text);
                let local = file.local();
                if theirs
                    .is_some_and(|t| local_hash(&local).is_some_and(|h| protocol::hex(&h) == t))
                {
                    self.skipped += 1;
                    self.progress.skip(file.size);
                    return self.keep_time(&file);
                }
                file.checked = true;
                self.files.push_front(file);
                Ok(())
            }
            Job::Get(file, asked) => {
                let bar = self
                    .progress
                    .file(&file.remote().to_string(), file.size)
                    .clone();
                match self.progress.follow(client.get_answered(asked, &bar)).await {
                    Ok(Arrival::Landed(t)) => self.received(&file, &t),
                    Ok(Arrival::Writing(writing)) => {
                        self.writing_bytes += writing.size();
                        self.writing.push_back((file, writing));
                        Ok(())
                    }
                    Err(e) => {
                        self.files.push_front(file);
                        Err(e)
                    }
                }
            }
        }
    }

    /// Counts the files that have landed, in the order they were received,
    /// until at most `keep` are still being written (and within the bytes
    /// bound). A file that failed to land is fetched again on a retry.
    async fn landed(&mut self, keep: usize) -> Result<(), ClientError> {
        while let Some((_, writing)) = self.writing.front() {
            let over = self.writing.len() > keep || self.writing_bytes > MAX_WRITING_BYTES;
            if !over && !writing.is_finished() {
                break;
            }
            let Some((file, writing)) = self.writing.pop_front() else {
                break;
            };
            self.writing_bytes -= writing.size();
            match writing.landed().await {
                Ok(t) => self.received(&file, &t)?,
                Err(e) => {
                    self.files.push_front(file);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Waits until every received file has landed or failed to; the
    /// first failure is returned.
    async fn land_all(&mut self) -> Result<(), ClientError> {
        let mut first = Ok(());
        while !self.writing.is_empty() {
            if let Err(e) = self.landed(0).await {
                first = first.and(Err(e));
            }
        }
        first
    }

    /// A file is in place.
    fn received(&mut self, file: &File, t: &Transferred) -> Result<(), ClientError> {
        self.progress.done(t, &file.local().display().to_string());
        self.got += 1;
        self.keep_time(file)
    }

    /// A directory's listing: its local directory made, its files and
    /// subdirectories queued, within the tree's bounds.
    fn listed(&mut self, dir: &Arc<Dir>, listing: Listing) -> Result<(), ClientError> {
        if listing.truncated {
            return Err(ClientError::Local(format!(
                "{}: listing truncated by the server; copy it in parts",
                dir.remote
            )));
        }
        self.entries += listing.entries.len();
        if self.entries > MAX_TREE_ENTRIES {
            return Err(ClientError::Local(format!(
                "the remote tree has more than {MAX_TREE_ENTRIES} entries; copy it in parts"
            )));
        }
        // The directory the user named is theirs to choose, even through a
        // link; below it, nothing is written through one.
        let made = match dir.depth {
            0 => std::fs::create_dir_all(&dir.local),
            _ => make_local_dir(&dir.local),
        };
        made.map_err(|e| ClientError::Local(format!("{}: {e}", dir.local.display())))?;
        let (mut files, mut bytes) = (0, 0);
        let first_subdir = self.subdirs.len();
        for Entry {
            kind,
            size,
            mtime,
            name,
        } in listing.entries
        {
            if !safe_name(&name) {
                let shown = format!("{name:?} in {}", dir.remote);
                self.skip_entry(&shown, "not a usable file name");
                continue;
            }
            match kind {
                'd' => self.subdirs.push(Subdir {
                    parent: dir.clone(),
                    name,
                }),
                'f' => {
                    (files, bytes) = (files + 1, bytes + size);
                    self.files.push_back(File {
                        dir: dir.clone(),
                        name,
                        size,
                        mtime,
                        checked: false,
                    });
                }
                _ => self.skip_entry(&dir.remote.join(&name).to_string(), "not a regular file"),
            }
        }
        // Listed in the listing's order.
        self.subdirs[first_subdir..].reverse();
        if self.subdirs.len() > MAX_TREE_PENDING {
            return Err(ClientError::Local(format!(
                "the remote tree has more than {MAX_TREE_PENDING} directories waiting to be copied; copy it in parts"
            )));
        }
        self.progress.add(files, bytes);
        Ok(())
    }

    /// Says, escaped, that an entry of a listing is left out.
    fn skip_entry(&self, what: &str, why: &str) {
        self.progress
            .suspend(|| eprintln!("ftpx: skipping {}: {why}", printable(what)));
    }

    /// `get -r -p`: the local copy gets the remote file's modification time.
    fn keep_time(&self, file: &File) -> Result<(), ClientError> {
        if !self.keep_times {
            return Ok(());
        }
        let local = file.local();
        let when = std::time::UNIX_EPOCH + Duration::from_secs(file.mtime.max(0).unsigned_abs());
        std::fs::File::options()
            .write(true)
            .open(&local)
            .and_then(|f| f.set_modified(when))
            .map_err(|e| ClientError::Local(format!("{}: {e}", local.display())))
    }
}
