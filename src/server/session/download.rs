//! GET: the server's end of a download, from the offer the client's resume
//! candidates allow to the last frame.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use blake3::hazmat::ChainingValue;
use indicatif::ProgressBar;
use tokio::sync::OwnedSemaphorePermit;

use super::log::{self, Ended};
use super::{Session, blocking};
use crate::error::{Error, Result};
use crate::protocol::{Candidate, Code, Request, VPath};
use crate::server::Server;
use crate::server::live::{TransferInfo, new_transfer_id};
use crate::store::jail::Home;
use crate::transfer::cache::Key;
use crate::transfer::connection::Stream;
use crate::transfer::{self, Ahead, Known, Plan};

/// GETs planned ahead of their turn, at most, in one session.
const MAX_PLANNED: usize = 64;
/// Bytes of small files read ahead of their turn, at most, in one session.
const READ_AHEAD_BYTES: u64 = 4 << 20;
/// A GET planned before its turn: the request (its path resolved), its plan,
/// and its share of the server's budget for plans made ahead.
pub(super) struct Planned {
    request: (VPath, Vec<Candidate>),
    planned: Result<Prepared>,
    _budget: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

/// A download ready to start: the file open at its offset, what is known
/// of its hashes, and its only chunk if it was read already.
struct Prepared {
    plan: Plan,
    known: Known,
    ahead: Option<Ahead>,
    key: Key,
    /// When planning began: hashes kept from this send must be of a file
    /// that had settled by then.
    began: SystemTime,
}

/// Opens `path` in `home` and chooses where its download starts from the
/// client's resume `candidates` (on the blocking pool). A file of one chunk
/// is read now if `room` (bytes that may still be read ahead) allows.
fn prepare(
    server: &Server,
    home: &Home,
    path: &VPath,
    candidates: &[Candidate],
    room: &mut u64,
) -> Result<Prepared> {
    let chunk = server.config.transfer.chunk_size.0;
    let began = SystemTime::now();
    let file = home.open_read(path)?;
    let meta = file.metadata().map_err(Error::Storage)?;
    let key = Key::of(&meta, chunk);
    let mut known = match server.hashes.get(&key) {
        Some(chunks) => Known::All(chunks),
        None => Known::Nothing,
    };
    let size = meta.len();
    let (offset, tree) =
        transfer::choose(&file, size, chunk, candidates, &known).map_err(Error::Storage)?;
    let keep = offset == 0 && server.hashes.would_keep(&key) && key.settled_at(began);
    if matches!(known, Known::Nothing) && keep {
        known = Known::Collect(Vec::new());
    }
    let plan = Plan {
        file: Arc::new(file),
        size,
        chunk,
        offset,
        tree,
    };
    let left = size - offset;
    let ahead = match left {
        1.. if left <= chunk && left <= *room => {
            *room -= left;
            Some(transfer::read_ahead(&plan, &known).map_err(Error::Storage)?)
        }
        _ => None,
    };
    Ok(Prepared {
        plan,
        known,
        ahead,
        key,
        began,
    })
}

/// Plans the GETs of `paths` in order while each file is of one chunk
/// (read whole now) and the budgets allow: a GET of a bigger file is
/// planned at its own turn, and so is everything behind it. A GET that
/// fails (no such file) is answered from its plan.
fn plan_ahead(server: &Server, home: &Home, paths: Vec<VPath>, planned: &mut VecDeque<Planned>) {
    let mut room = READ_AHEAD_BYTES;
    for path in paths {
        let Ok(file) = server.read_ahead_files.clone().try_acquire_owned() else {
            return;
        };
        let prepared = prepare(server, home, &path, &[], &mut room);
        let bytes = match &prepared {
            Ok(p) if p.ahead.is_none() && p.plan.size > 0 => return,
            Ok(p) => p.plan.size,
            Err(_) => 0,
        };
        let kib = u32::try_from(bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
        let Ok(bytes) = server.read_ahead_kib.clone().try_acquire_many_owned(kib) else {
            return;
        };
        planned.push_back(Planned {
            request: (path, vec![]),
            planned: prepared,
            _budget: Some((file, bytes)),
        });
    }
}

impl<S: Stream> Session<S> {
    pub(super) async fn get(&mut self, arg: String, candidates: Vec<Candidate>) -> Result<()> {
        let path = self.resolve(&arg)?;
        let started = Instant::now();
        let mut info = TransferInfo {
            id: new_transfer_id(),
            path: path.to_string(),
            direction: "down",
            size: 0,
            offset: 0,
        };
        self.note.transfer = Some(info.id.clone());
        let planned = match self.planned.pop_front() {
            Some(p) if p.request.0 == path && p.request.1 == candidates => p.planned,
            _ => self.plan_batch(path, candidates).await,
        };
        let Prepared {
            plan,
            mut known,
            ahead,
            key,
            began,
        } = match planned {
            Ok(prepared) => prepared,
            Err(e) => {
                self.log_download(&info, started, Err(&e), 0);
                return Err(e);
            }
        };
        (info.size, info.offset) = (plan.size, plan.offset);
        // Sent with the first frames.
        self.announce(
            Code::Sending,
            &format!("{} {} {}", info.size, info.offset, plan.chunk),
        )
        .await?;
        self.in_transfer = true;
        let source = match known {
            Known::All(_) => "cached",
            _ => "computed",
        };
        self.server.metrics.download_hashed(source);
        let file = plan.file.clone();
        let progress = ProgressBar::hidden();
        let entry = self.seat.entry.clone();
        entry.transfer_started(&info, &progress, &self.server.metrics);
        let mut sent = transfer::send(&mut self.conn, plan, &mut known, ahead, &progress).await;
        if sent.is_ok()
            && let Err(e) = self.send_replies().await
        {
            sent = Err(e);
        }
        entry.transfer_stopped(&self.server.metrics);
        let bytes = progress.position().saturating_sub(info.offset);
        match sent {
            Ok(hash) => {
                self.in_transfer = false;
                if let Known::Collect(chunks) = known {
                    self.keep_hashes(&file, key, began, chunks).await;
                }
                self.log_download(&info, started, Ok(hash), bytes);
                Ok(())
            }
            Err(e) => {
                // After frames started, only a closed session keeps both ends in step.
                let e = Error::Unavailable(format!("download failed: {e}"));
                self.log_download(&info, started, Err(&e), bytes);
                Err(e)
            }
        }
    }

    /// Plans the GET of `path`, and if its file is of one chunk, the GETs
    /// of small files that arrived whole behind it (a client fetching a
    /// tree sends them without waiting), on one trip to the blocking pool;
    /// theirs wait in `planned` for their turn, which comes once the bytes
    /// before them are sent. Planned ahead are only GETs with nothing to
    /// resume (no hashing), of files of one chunk (read whole now), within
    /// [`MAX_PLANNED`] and [`READ_AHEAD_BYTES`] for the session and the
    /// server's budget for all (`limits.read_ahead_files`, `read_ahead`).
    async fn plan_batch(&mut self, path: VPath, candidates: Vec<Candidate>) -> Result<Prepared> {
        self.planned.clear();
        let max_path = self.server.config.limits.max_path;
        let cwd = self.cwd.clone();
        let behind: Vec<VPath> = self
            .conn
            .lines_waiting(MAX_PLANNED)
            .iter()
            .map_while(|line| match Request::parse(line) {
                Ok(Request::Get { path, candidates }) if candidates.is_empty() => {
                    VPath::resolve(&cwd, &path, max_path).ok()
                }
                _ => None,
            })
            .collect();
        let (server, home) = (self.server.clone(), self.logged_in()?.home.clone());
        let (first, planned) = blocking(move || {
            // The request's own file is read now if it is of one chunk.
            let mut room = u64::MAX;
            let first = prepare(&server, &home, &path, &candidates, &mut room);
            let mut planned = VecDeque::new();
            if first.as_ref().is_ok_and(|p| p.plan.size <= p.plan.chunk) {
                plan_ahead(&server, &home, behind, &mut planned);
            }
            Ok((first, planned))
        })
        .await?;
        self.planned = planned;
        first
    }

    /// Keeps the chunk hashes of a file just sent whole, if it did not
    /// change while it was read.
    async fn keep_hashes(
        &self,
        file: &Arc<File>,
        key: Key,
        began: SystemTime,
        chunks: Vec<ChainingValue>,
    ) {
        let (server, file) = (self.server.clone(), file.clone());
        let _ = blocking(move || {
            if file
                .metadata()
                .is_ok_and(|m| Key::of(&m, key.chunk()) == key)
            {
                server.hashes.put(key, began, chunks);
            }
            Ok(())
        })
        .await;
    }

    /// The download's one line: refused before its first frame, failed
    /// after, or ok.
    fn log_download(
        &mut self,
        info: &TransferInfo,
        started: Instant,
        outcome: std::result::Result<blake3::Hash, &Error>,
        bytes: u64,
    ) {
        self.note.logged = true;
        let result = match (&outcome, self.in_transfer) {
            (Ok(_), _) => "ok",
            (Err(_), true) => "failed",
            (Err(_), false) => "refused",
        };
        let end = Ended::new(result, bytes, outcome, started);
        log::transfer(&self.server, self.who(), "GET", info, end);
    }
}
