//! Uploads: PUT, which streams a file of any size in verified chunks, and
//! SEND, a small file whose frames follow the request with no round trip.
//! Both hand the upload's life to a `store::upload::Upload`; SENDs are
//! written by one blocking task per session while the session reads on,
//! and answered in order. The SENDs that task writes in one run are
//! answered as a batch, once each directory they landed in is synced.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use tokio::sync::oneshot;
use tracing::warn;

use super::log::{self, Ended, Who};
use super::{Session, blocking};
use crate::error::{Error, Result};
use crate::protocol::{self, Code, FrameKind, VPath};
use crate::server::Server;
use crate::server::live::{TransferInfo, new_transfer_id};
use crate::server::metrics::Metrics;
use crate::store::quota::UploadLock;
use crate::store::upload::{Owner, Unsynced, Upload};
use crate::transfer::connection::Stream;
use crate::transfer::{self, Checkpoints, Plan, Stopped};

impl<S: Stream> Session<S> {
    pub(super) async fn put(&mut self, arg: String, size: u64, chunk: u64) -> Result<()> {
        let path = self.resolve(&arg)?;
        let started = Instant::now();
        let mut info = TransferInfo {
            id: new_transfer_id(),
            path: path.to_string(),
            direction: "up",
            size,
            offset: 0,
        };
        self.note.transfer = Some(info.id.clone());
        let (upload, offers) = match self.begin_upload(path, size, chunk).await {
            Ok(begun) => begun,
            Err(e) => {
                let end = Ended::new("refused", 0, Err(&e), started);
                self.log_upload(&info, end);
                return Err(e);
            }
        };
        let ready = format!("ready{}", protocol::format_candidates(&offers));
        self.reply(Code::Ready, &ready).await?;
        self.in_transfer = true;

        // A wrong start frame ends the session; the upload, dropped, keeps
        // an earlier partial of the path and frees the rest.
        let start = self.conn.read_frame_header().await?;
        let offered = start.offset == 0 || offers.iter().any(|c| c.offset == start.offset);
        if start.kind != FrameKind::Start || !offered {
            return Err(Error::Protocol(
                "expected a start frame at 0 or at an offered offset".into(),
            ));
        }
        info.offset = start.offset;
        let progress = ProgressBar::hidden();
        let entry = self.seat.entry.clone();
        entry.transfer_started(&info, &progress, &self.server.metrics);
        let outcome = self.receive(upload, chunk, info.offset, &progress).await;
        entry.transfer_stopped(&self.server.metrics);
        match outcome {
            Ok(hash) => {
                self.in_transfer = false;
                let end = Ended::new("ok", size - info.offset, Ok(hash), started);
                self.log_upload(&info, end);
                let stored = format!("{} {size}", protocol::hex(&hash));
                self.reply(Code::Stored, &stored).await
            }
            Err((error, verified)) => {
                // Out of step unless the error leaves the session going.
                self.in_transfer = error.ends_session();
                let bytes = verified.saturating_sub(info.offset);
                self.log_upload(&info, Ended::new("failed", bytes, Err(&error), started));
                Err(error)
            }
        }
    }

    /// Checks the target, takes its lock, reserves the space before the
    /// first byte, and finds what can be resumed.
    async fn begin_upload(
        &mut self,
        path: VPath,
        size: u64,
        chunk: u64,
    ) -> Result<(Upload, Vec<protocol::Candidate>)> {
        let owner = self.logged_in()?.clone();
        if !protocol::valid_chunk_size(chunk) {
            return Err(Error::BadArgument(format!(
                "chunk size {chunk} is not a power of two from 1 KiB to 4 MiB"
            )));
        }
        let lock = self.lock_upload(&path)?;
        blocking(move || {
            let upload = Upload::begin(lock, &owner, path, size)?;
            let offers = upload.offers(chunk);
            Ok((upload, offers))
        })
        .await
    }

    fn log_upload(&mut self, info: &TransferInfo, end: Ended<'_>) {
        self.note.logged = true;
        log::transfer(&self.server, self.who(), "PUT", info, end);
    }

    /// Receives an upload's chunks from `resume_at` into its partial file,
    /// then lands it, or keeps what was verified for a later resume. The
    /// error comes with the bytes verified.
    async fn receive(
        &mut self,
        mut upload: Upload,
        chunk: u64,
        resume_at: u64,
        progress: &ProgressBar,
    ) -> std::result::Result<blake3::Hash, (Error, u64)> {
        let size = upload.size();
        let opened = blocking(move || {
            let opened = upload.open(chunk, resume_at).map_err(Error::Storage);
            Ok((upload, opened))
        })
        .await;
        let (file, tree, mut journal, upload) = match opened {
            Ok((upload, Ok((file, tree, journal)))) => (Arc::new(file), tree, journal, upload),
            Ok((_, Err(e))) | Err(e) => {
                // The client is already sending: the session can't stay in step.
                let e = Error::Unavailable(format!("cannot store the upload: {e}"));
                return Err((e, resume_at));
            }
        };
        let t = &self.server.config.transfer;
        let checkpoints = Checkpoints {
            bytes: t.checkpoint_bytes.0.max(1),
            interval: Duration::from_secs(t.checkpoint_secs),
        };
        let plan = Plan {
            file: file.clone(),
            size,
            chunk,
            offset: resume_at,
            tree,
        };
        let received =
            transfer::receive(&mut self.conn, plan, &mut journal, checkpoints, progress).await;
        match received {
            Ok(hash) => {
                let server = self.server.clone();
                let landed = blocking(move || {
                    file.sync_all().map_err(Error::Storage)?;
                    let part = upload.files().part.clone();
                    let dir = upload.land(&part)?;
                    if sync_dir(&dir, &server.metrics) {
                        Ok(hash)
                    } else {
                        Err(not_durable())
                    }
                })
                .await;
                landed.map_err(|e| (e, size))
            }
            Err(Stopped { error, verified }) => {
                let error = Error::from(error);
                // Keep what was verified for a later resume; a wrong whole, a
                // full disk or a small file is not worth resuming.
                let keep =
                    journal.is_some() && !matches!(error, Error::HashMismatch | Error::StorageFull);
                let _ = blocking(move || {
                    if !keep {
                        upload.discard();
                        return Ok(());
                    }
                    let saved = file.sync_data().and_then(|()| match journal {
                        Some(mut j) => j.save(verified),
                        None => Ok(()),
                    });
                    if let Err(e) = saved {
                        warn!(event = "error", path = %upload.path(), error = %e, "cannot save the journal of a partial upload");
                    }
                    upload.park();
                    Ok(())
                })
                .await;
                Err((error, verified))
            }
        }
    }

    /// `SEND`: a small upload whose frames follow the request at once. They
    /// are all read first, so that any refusal leaves the session in step.
    pub(super) async fn send_small(&mut self, arg: String, size: u64) -> Result<()> {
        let started = Instant::now();
        let id = new_transfer_id();
        self.note.transfer = Some(id.clone());
        let queued = self.queue_send(&arg, size, started, &id).await;
        if let Err(e) = &queued {
            let info = TransferInfo {
                id,
                path: self.note.path.as_ref().map_or(arg, VPath::to_string),
                direction: "up",
                size,
                offset: 0,
            };
            let result = match e {
                Error::BadChunk(_) | Error::HashMismatch | Error::Protocol(_) => "failed",
                _ => "refused",
            };
            self.note.logged = true;
            let end = Ended::new(result, 0, Err(e), started);
            log::transfer(&self.server, self.who(), "SEND", &info, end);
        }
        queued
    }

    /// Reads a SEND's frames and hands the file to the session's store task.
    async fn queue_send(&mut self, arg: &str, size: u64, started: Instant, id: &str) -> Result<()> {
        if size > protocol::MAX_SEND {
            return Err(Error::Protocol(format!(
                "SEND carries at most {} bytes",
                protocol::MAX_SEND
            )));
        }
        let start = self.conn.read_frame_header().await?;
        if start.kind != FrameKind::Start || start.offset != 0 {
            return Err(Error::Protocol(
                "expected a start frame at 0 after SEND".into(),
            ));
        }
        let mut data = vec![0u8; usize::try_from(size).unwrap_or(0)];
        let mut chunk_hash = *blake3::hash(b"").as_bytes();
        if size > 0 {
            let chunk = self.conn.read_frame_header().await?;
            if chunk.kind != FrameKind::Chunk || chunk.offset != 0 || u64::from(chunk.len) != size {
                return Err(Error::Protocol("SEND carries its file as one chunk".into()));
            }
            self.conn.read_payload(&mut data).await?;
            chunk_hash = chunk.hash;
        }
        let end = self.conn.read_frame_header().await?;
        if end.kind != FrameKind::End || end.offset != size {
            return Err(Error::Protocol("expected the end frame of the SEND".into()));
        }
        // In step from here on, whatever happens.
        let hash = blake3::hash(&data);
        if hash.as_bytes() != &chunk_hash {
            return Err(Error::BadChunk(0));
        }
        if hash.as_bytes() != &end.hash {
            return Err(Error::HashMismatch);
        }
        let path = self.resolve(arg)?;
        let owner = self.logged_in()?.clone();
        let lock = match self.lock_upload(&path) {
            Ok(lock) => lock,
            Err(_) => {
                // Perhaps held by one of this session's own SENDs still being stored.
                self.answer_stores(Drain::All).await?;
                self.lock_upload(&path)?
            }
        };
        // The store's reply announces the id and its line is logged there.
        self.note.logged = true;
        self.note.transfer = None;
        self.stores.push(Store {
            server: self.server.clone(),
            id: id.to_string(),
            peer: self.peer,
            owner,
            path,
            data,
            hash,
            started,
            lock,
        });
        self.answer_stores(Drain::ToBound).await
    }

    /// Sends the replies of stored SENDs, in order, as they finish. Replies
    /// ready together go out together: the stream is flushed before waiting
    /// and when none is left, not per reply.
    pub(super) async fn answer_stores(&mut self, drain: Drain) -> Result<()> {
        loop {
            if matches!(drain, Drain::ToBound) && !self.stores.over_bound() {
                return Ok(());
            }
            let Some(reply) = self.stores.replies.front_mut() else {
                return Ok(self.send_replies().await?);
            };
            let outcome = match reply.outcome.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => {
                    self.conn.flush().await?;
                    match drain {
                        Drain::UntilInput => tokio::select! {
                            biased;
                            () = self.conn.input() => return Ok(()),
                            outcome = &mut reply.outcome => outcome.ok(),
                        },
                        _ => (&mut reply.outcome).await.ok(),
                    }
                }
                ready => ready.ok(),
            };
            self.stores.pop();
            let outcome = outcome.unwrap_or_else(|| {
                Err(Error::Storage(std::io::Error::other(
                    "the store task ended",
                )))
            });
            // A store that failed (quota, storage) leaves the stream in step:
            // the session goes on.
            let (code, text) = match outcome {
                Ok(text) => (Code::Stored, text),
                Err(e) => (e.reply_code(), e.to_string()),
            };
            self.server.metrics.reply(code.number());
            let id = protocol::transfer_line(code, &self.stores.answered_id());
            self.conn.write_line(&id).await?;
            self.conn.write_line(&code.line(&text)).await?;
        }
    }
}

/// A small upload (SEND) that arrived whole and verified, waiting to be
/// written into its home.
struct Store {
    server: Arc<Server>,
    id: String,
    peer: SocketAddr,
    owner: Owner,
    path: VPath,
    data: Vec<u8>,
    hash: blake3::Hash,
    started: Instant,
    lock: UploadLock,
}

impl Store {
    /// Charges the quota, writes a staging file and moves it into place.
    /// Returns the text of the 226 reply and the directory to sync before
    /// it is sent.
    fn write(self) -> Result<(String, Unsynced)> {
        let Store {
            server,
            id,
            peer,
            owner,
            path,
            data,
            hash,
            started,
            lock,
        } = self;
        let size = data.len() as u64;
        let info = TransferInfo {
            id,
            path: path.to_string(),
            direction: "up",
            size,
            offset: 0,
        };
        let stored = Upload::begin(lock, &owner, path, size).and_then(|u| u.store(&data));
        let who = Who {
            peer,
            user: Some(&owner.name),
        };
        let end = match &stored {
            Ok(_) => Ended::new("ok", size, Ok(hash), started),
            Err(e) => Ended::new("refused", 0, Err(e), started),
        };
        log::transfer(&server, who, "SEND", &info, end);
        stored.map(|unsynced| {
            server.metrics.moved("up", size);
            (format!("{} {size}", protocol::hex(&hash)), unsynced)
        })
    }
}

/// The SENDs of one session that are verified but not yet answered. One
/// task on the blocking pool at a time writes them, in the order they came,
/// while the session reads on, and releases their replies a [`Batch`] at a
/// time; they go out in the same order, before any other request is
/// handled. In flight: at most [`Stores::MAX_FILES`] files and
/// [`Stores::MAX_BYTES`] bytes.
#[derive(Default)]
pub(super) struct Stores {
    queue: Arc<Mutex<StoreQueue>>,
    replies: VecDeque<StoreReply>,
    bytes: u64,
    answered: String,
}

#[derive(Default)]
struct StoreQueue {
    jobs: VecDeque<(Store, oneshot::Sender<Result<String>>)>,
    writing: bool,
}

struct StoreReply {
    outcome: oneshot::Receiver<Result<String>>,
    bytes: u64,
    /// The SEND's transfer id.
    id: String,
}

/// How far [`Session::answer_stores`] goes.
#[derive(Clone, Copy)]
pub(super) enum Drain {
    /// Every SEND is answered.
    All,
    /// Until the SENDs in flight are within bounds.
    ToBound,
    /// Until the client has sent more, or every SEND is answered.
    UntilInput,
}

impl Stores {
    const MAX_FILES: usize = 64;
    const MAX_BYTES: u64 = 2 * protocol::MAX_SEND;

    fn push(&mut self, store: Store) {
        let bytes = store.data.len() as u64;
        let (done, outcome) = oneshot::channel();
        let id = store.id.clone();
        self.replies.push_back(StoreReply { outcome, bytes, id });
        self.bytes += bytes;
        let server = store.server.clone();
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        queue.jobs.push_back((store, done));
        if !queue.writing {
            queue.writing = true;
            let queue = self.queue.clone();
            tokio::task::spawn_blocking(move || write_stores(&queue, &server.metrics));
        }
    }

    fn pop(&mut self) {
        if let Some(reply) = self.replies.pop_front() {
            self.bytes -= reply.bytes;
            self.answered = reply.id;
        }
    }

    /// The id of the SEND last popped, whose reply goes out now.
    fn answered_id(&mut self) -> String {
        std::mem::take(&mut self.answered)
    }

    fn over_bound(&self) -> bool {
        self.replies.len() > Self::MAX_FILES || self.bytes > Self::MAX_BYTES
    }

    /// Waits until every store handed over has finished, without answering.
    pub(super) async fn finish(&mut self) {
        while let Some(reply) = self.replies.pop_front() {
            let _ = reply.outcome.await;
        }
        self.bytes = 0;
    }
}

/// The blocking side of [`Stores`]: writes queued stores until none is
/// left, committing a batch of them whenever the queue runs empty, or
/// [`Batch::MAX`] are written, or they landed in [`Batch::MAX_DIRS`]
/// directories.
fn write_stores(queue: &Mutex<StoreQueue>, metrics: &Metrics) {
    let lock = || queue.lock().unwrap_or_else(|e| e.into_inner());
    /// Should a store panic, the queue is left with no writer and no
    /// orphaned job (their replies turn into errors).
    struct Unwind<'a>(&'a Mutex<StoreQueue>);
    impl Drop for Unwind<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let mut queue = self.0.lock().unwrap_or_else(|e| e.into_inner());
                queue.writing = false;
                queue.jobs.clear();
            }
        }
    }
    let _unwind = Unwind(queue);
    let mut batch = Batch::default();
    loop {
        let next = if batch.len() < Batch::MAX && batch.dirs.len() < Batch::MAX_DIRS {
            let mut queue = lock();
            let next = queue.jobs.pop_front();
            // Under the same lock as the pop, so a push never finds a
            // writer that is leaving. One with a batch to commit stays.
            queue.writing = next.is_some() || !batch.is_empty();
            next
        } else {
            None
        };
        match next {
            Some((store, done)) => batch.add(done, store.write()),
            None if batch.is_empty() => return,
            None => std::mem::take(&mut batch).commit(metrics),
        }
    }
}

/// The stores written in one run of the writer, landed but not answered.
/// A 226 means the file is durable, and its rename is durable only once
/// its directory is synced: the replies wait here until [`Batch::commit`]
/// has synced each directory the batch landed in, once, and `commit` is
/// the only way they leave.
#[derive(Default)]
struct Batch {
    /// The directories to sync, each once.
    dirs: Vec<Unsynced>,
    /// The replies, in order.
    replies: Vec<Held>,
}

/// A store's reply, held in its [`Batch`].
struct Held {
    done: oneshot::Sender<Result<String>>,
    outcome: Result<String>,
    /// The index in the batch's `dirs` of the directory the file landed
    /// in; none for a store that failed.
    dir: Option<usize>,
}

impl Batch {
    /// The most stores in one batch: as many as a session has in flight.
    const MAX: usize = Stores::MAX_FILES;
    /// The most directories one batch holds open until its commit.
    const MAX_DIRS: usize = 8;

    fn len(&self) -> usize {
        self.replies.len()
    }

    fn is_empty(&self) -> bool {
        self.replies.is_empty()
    }

    /// Holds the reply of a store: the text of its 226 and the directory
    /// it landed in, or the error that refused it.
    fn add(&mut self, done: oneshot::Sender<Result<String>>, written: Result<(String, Unsynced)>) {
        let (outcome, dir) = match written {
            Ok((text, unsynced)) => {
                let at = match self.dirs.iter().position(|d| d.same_dir(&unsynced)) {
                    Some(at) => at,
                    None => {
                        self.dirs.push(unsynced);
                        self.dirs.len() - 1
                    }
                };
                (Ok(text), Some(at))
            }
            Err(e) => (Err(e), None),
        };
        self.replies.push(Held { done, outcome, dir });
    }

    /// Syncs each directory once, then releases the replies in order. A
    /// store whose directory could not be synced is answered with
    /// [`not_durable`].
    fn commit(self, metrics: &Metrics) {
        let synced: Vec<bool> = self.dirs.iter().map(|d| sync_dir(d, metrics)).collect();
        for Held { done, outcome, dir } in self.replies {
            let outcome = match (outcome, dir) {
                (Ok(_), Some(at)) if !synced[at] => Err(not_durable()),
                (outcome, _) => outcome,
            };
            let _ = done.send(outcome);
        }
    }
}

/// Syncs a directory that stores landed in, making their renames durable;
/// counted, and logged when it fails.
fn sync_dir(dir: &Unsynced, metrics: &Metrics) -> bool {
    metrics.directory_synced();
    let synced = dir.sync();
    if let Err(e) = &synced {
        warn!(event = "error", path = %dir.dir(), error = %e, "could not make the renames into a directory durable");
    }
    synced.is_ok()
}

/// The answer to a store whose directory could not be synced: its file is
/// in place, but might not survive a crash, and a 226 would promise that
/// it does.
fn not_durable() -> Error {
    Error::Storage(std::io::Error::other(
        "the directory of the stored file could not be synced",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::jail::Home;
    use crate::store::quota::{Ledger, Limits};

    /// A user's uploads in a fresh temp dir, whose home holds `dirs`.
    fn owner(root: &std::path::Path, dirs: &[&str]) -> Owner {
        let home = root.join("home");
        for d in dirs {
            std::fs::create_dir_all(home.join(d)).unwrap();
        }
        Owner {
            ledger: Arc::new(Ledger::default()),
            name: "u".into(),
            home: Home::open(&home).unwrap(),
            limits: Limits {
                bytes: 1 << 20,
                entries: 100,
            },
            staging: root.join("partial/u"),
        }
    }

    /// Stores `data` at `path` as a SEND does, adding its reply to `batch`.
    fn store(
        batch: &mut Batch,
        owner: &Owner,
        path: &str,
        data: &[u8],
    ) -> oneshot::Receiver<Result<String>> {
        let path = VPath::resolve(&VPath::root(), path, 99).unwrap();
        let lock = owner
            .ledger
            .lock_upload(&owner.name, &path)
            .unwrap()
            .unwrap();
        let written = Upload::begin(lock, owner, path, data.len() as u64)
            .and_then(|u| u.store(data))
            .map(|unsynced| ("stored".to_string(), unsynced));
        let (done, outcome) = oneshot::channel();
        batch.add(done, written);
        outcome
    }

    #[test]
    fn a_batch_releases_no_reply_before_its_commit() {
        let root = tempfile::tempdir().unwrap();
        let owner = owner(root.path(), &["a", "b"]);
        let mut batch = Batch::default();
        let mut replies = vec![];
        for i in 0..6 {
            let dir = ["a", "b"][i % 2];
            replies.push(store(&mut batch, &owner, &format!("/{dir}/f{i}"), b"bytes"));
        }
        // Over the quota: refused, and answered with the batch.
        replies.push(store(&mut batch, &owner, "/a/huge", &vec![0; 2 << 20]));
        assert_eq!(batch.dirs.len(), 2, "one sync per directory");
        for r in &mut replies {
            assert!(matches!(
                r.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            ));
        }
        assert!(root.path().join("home/b/f5").exists());
        batch.commit(&Metrics::new());
        let answers: Vec<_> = replies.iter_mut().map(|r| r.try_recv().unwrap()).collect();
        assert!(
            answers[..6]
                .iter()
                .all(|a| matches!(a.as_deref(), Ok("stored"))),
            "{answers:?}"
        );
        assert!(
            matches!(answers[6], Err(Error::QuotaExceeded { .. })),
            "{answers:?}"
        );
    }

    #[test]
    fn a_reply_waits_for_its_directory_sync_and_fails_with_it() {
        let root = tempfile::tempdir().unwrap();
        let owner = owner(root.path(), &["a", "b"]);
        let mut batch = Batch::default();
        let mut in_a = store(&mut batch, &owner, "/a/f", b"one");
        let mut in_b = store(&mut batch, &owner, "/b/f", b"two");
        // b's sync will fail: a reply released before it, or despite it,
        // would claim a durable file.
        batch.dirs[1].fail_sync();
        batch.commit(&Metrics::new());
        assert_eq!(in_a.try_recv().unwrap().unwrap(), "stored");
        assert!(matches!(in_b.try_recv().unwrap(), Err(Error::Storage(_))));
    }

    #[test]
    fn a_directory_renamed_before_its_sync_is_still_the_one_synced() {
        let root = tempfile::tempdir().unwrap();
        let owner = owner(root.path(), &["a"]);
        let mut batch = Batch::default();
        let mut first = store(&mut batch, &owner, "/a/f1", b"one");
        // The user's other session moves `a` away and makes a new `a`: the
        // sync by that name would miss the directory f1 went into.
        let home = root.path().join("home");
        std::fs::rename(home.join("a"), home.join("moved")).unwrap();
        std::fs::create_dir(home.join("a")).unwrap();
        let mut second = store(&mut batch, &owner, "/a/f2", b"two");
        assert_eq!(batch.dirs.len(), 2, "two directories, each to be synced");
        batch.commit(&Metrics::new());
        assert_eq!(first.try_recv().unwrap().unwrap(), "stored");
        assert_eq!(second.try_recv().unwrap().unwrap(), "stored");
        assert_eq!(std::fs::read(home.join("moved/f1")).unwrap(), b"one");
        assert_eq!(std::fs::read(home.join("a/f2")).unwrap(), b"two");
    }
}
