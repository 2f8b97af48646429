//! Uploads from the client: one file with `PUT`, resumable, or many small
//! ones with `SEND`, pipelined.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indicatif::ProgressBar;
use tracing::{info, warn};

use crate::protocol::{self, Candidate, FrameHeader, Request, VPath};
use crate::transfer::journal::{self, Journal, Record};
use crate::transfer::{self, Known, Plan, Tree};

use super::error::local_err;
use super::{Client, ClientError, Reply, Result, Transferred};

/// Files `send_many` reads ahead of the sending (each at most 1 MiB).
const READ_AHEAD_FILES: usize = 16;
/// `SEND`s in flight at most: enough to fill a long link's window with
/// small files (512 of 16 KiB are 8 MiB, and from 256 to 512 are in flight
/// as they are refilled by halves). Replies that have arrived are read
/// between two SENDs, and all of them together (about 130 bytes each, 66
/// KiB) fit what the connection's buffers hold anyway.
const SEND_WINDOW: usize = 512;

impl Client {
    /// Uploads small files (each at most [`protocol::MAX_SEND`] bytes) with
    /// `SEND`, many in flight at once, and calls `done` with each file's
    /// index and outcome as its reply arrives. An error that breaks the
    /// session is returned; files not yet reported may or may not have been
    /// stored (sending them again overwrites them with the same bytes).
    ///
    /// A blocking task reads and hashes the files ahead of the sending. When
    /// [`SEND_WINDOW`] files are unanswered, the replies are read until
    /// half are, so files go out in bursts with one flush each.
    pub async fn send_many(
        &mut self,
        files: &[(PathBuf, VPath)],
        mut done: impl FnMut(usize, Result<Transferred>),
    ) -> Result<()> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(READ_AHEAD_FILES);
        let paths: Vec<PathBuf> = files.iter().map(|(local, _)| local.clone()).collect();
        tokio::task::spawn_blocking(move || {
            for (i, local) in paths.iter().enumerate() {
                if tx.blocking_send((i, read_small(local))).is_err() {
                    return; // The sending stopped.
                }
            }
        });
        let mut in_flight: std::collections::VecDeque<(usize, blake3::Hash, u64)> =
            Default::default();
        while let Some((i, read)) = rx.recv().await {
            let (data, hash) = match read {
                Ok(read) => read,
                Err(e) => {
                    done(i, Err(e));
                    continue;
                }
            };
            let size = data.len() as u64;
            self.in_data = true;
            let line = Request::Send {
                path: files[i].1.to_string(),
                size,
            };
            self.write_request(&line).await?;
            self.conn.write_frame(&FrameHeader::start(0), &[]).await?;
            if size > 0 {
                let chunk = FrameHeader {
                    kind: protocol::FrameKind::Chunk,
                    offset: 0,
                    len: u32::try_from(size).unwrap_or(u32::MAX),
                    hash: *hash.as_bytes(),
                };
                self.conn.write_frame(&chunk, &data).await?;
            }
            self.conn
                .write_frame(&FrameHeader::end(size, hash), &[])
                .await?;
            in_flight.push_back((i, hash, size));
            // Replies that have arrived are taken as they come, so the
            // server never waits to write them while the client writes.
            while !in_flight.is_empty() && self.conn.reply_waiting() {
                let (i, hash, size) = in_flight.pop_front().expect("not empty");
                let outcome = self.sent(&files[i], hash, size).await?;
                done(i, outcome);
            }
            if in_flight.len() >= SEND_WINDOW {
                self.send().await?;
                while in_flight.len() > SEND_WINDOW / 2 {
                    let (i, hash, size) = in_flight.pop_front().expect("queue is full");
                    let outcome = self.sent(&files[i], hash, size).await?;
                    done(i, outcome);
                }
            }
        }
        self.send().await?;
        while let Some((i, hash, size)) = in_flight.pop_front() {
            let outcome = self.sent(&files[i], hash, size).await?;
            done(i, outcome);
        }
        self.in_data = false;
        Ok(())
    }

    /// Reads the reply to one `SEND`.
    async fn sent(
        &mut self,
        (local, remote): &(PathBuf, VPath),
        hash: blake3::Hash,
        size: u64,
    ) -> Result<Result<Transferred>> {
        let reply = self.read_reply().await?;
        let id = reply.transfer_id();
        let theirs = reply.text.split(' ').next().unwrap_or_default();
        Ok(if reply.code == 226 && theirs == protocol::hex(&hash) {
            info!(local = %local.display(), remote = %remote, id, size, hash = ?theirs, "upload complete");
            Ok(Transferred {
                hash,
                size,
                resumed_at: 0,
            })
        } else if reply.code == 226 {
            Err(ClientError::Verify(format!(
                "server stored hash {theirs}, expected {}",
                protocol::hex(&hash)
            )))
        } else {
            info!(local = %local.display(), remote = %remote, id, code = reply.code, error = ?reply.text, "upload failed");
            Err(ClientError::Server {
                code: reply.code,
                text: reply.text,
            })
        })
    }

    /// Uploads `local` to `remote`, resuming an interrupted upload of the
    /// same unchanged file. The whole-file hash is checked on both ends.
    pub async fn put(
        &mut self,
        local: &Path,
        remote: &VPath,
        progress: &ProgressBar,
    ) -> Result<Transferred> {
        let started = std::time::Instant::now();
        let chunk = self.options.chunk_size;
        let (file, mut journal, resumable) = self.upload_journal(local, remote, chunk)?;
        let size = journal.record.size;
        let request = Request::Put {
            path: remote.to_string(),
            size,
            chunk,
        };
        let reply = self.exchange(&request).await?;
        let id = reply.transfer_id();
        if reply.code >= 400 {
            info!(local = %local.display(), remote = %remote, id, code = reply.code, error = ?reply.text, "upload refused");
            return Err(reply.into_error());
        }
        if reply.code != 150 {
            return Err(ClientError::Protocol(format!(
                "unexpected reply {} to PUT",
                reply.code
            )));
        }
        self.in_data = true;
        let offers = parse_offers(&reply.text)?;
        let file = Arc::new(file);
        let (offset, tree) = if resumable && !offers.is_empty() {
            let f = file.clone();
            tokio::task::spawn_blocking(move || {
                transfer::choose(&f, size, chunk, &offers, &Known::Nothing)
            })
            .await
            .map_err(|e| ClientError::Local(e.to_string()))?
            .map_err(|e| local_err(local, e))?
        } else {
            (0, Tree::default())
        };
        // A file of one chunk restarts after a failure: no journal needed.
        if size > chunk {
            journal
                .save(offset)
                .map_err(|e| ClientError::Local(format!("cannot write the journal: {e}")))?;
        }
        info!(local = %local.display(), remote = %remote, id, size, resumed_at = offset, "upload starts");
        self.conn
            .write_frame(&FrameHeader::start(offset), &[])
            .await?;
        progress.set_length(size);
        progress.set_position(offset);
        let plan = Plan {
            file,
            size,
            chunk,
            offset,
            tree,
        };
        let hash =
            transfer::send(&mut self.conn, plan, &mut Known::Nothing, None, progress).await?;
        self.conn.flush().await?;
        let reply = self.read_reply().await?;
        self.in_data = false;
        let ms = started.elapsed().as_millis() as u64;
        upload_answered(reply, hash, journal, (id, offset), ms)
    }

    /// Opens `local` and the journal of its upload to `remote`, and says
    /// whether an interrupted upload of this same unchanged file may be
    /// resumed.
    fn upload_journal(
        &self,
        local: &Path,
        remote: &VPath,
        chunk: u64,
    ) -> Result<(File, Journal, bool)> {
        let local_abs = std::path::absolute(local).map_err(|e| local_err(local, e))?;
        let file = File::open(&local_abs).map_err(|e| local_err(local, e))?;
        let meta = file.metadata().map_err(|e| local_err(local, e))?;
        if !meta.is_file() {
            return Err(ClientError::Local(format!(
                "{}: not a regular file",
                local.display()
            )));
        }
        let record = Record {
            mtime: meta.mtime(),
            inode: meta.ino(),
            ..Record::new(
                "upload",
                local_abs.to_string_lossy().into_owned(),
                remote.to_string(),
                meta.len(),
                chunk,
            )
        };
        let path = self.journal_dir.join(format!(
            "{}.toml",
            journal::key(&["upload", &record.source, &record.target])
        ));
        let same = |p: &Record| {
            (&p.kind, &p.source, &p.target, p.size, p.mtime, p.inode)
                == (
                    &record.kind,
                    &record.source,
                    &record.target,
                    record.size,
                    record.mtime,
                    record.inode,
                )
        };
        let resumable = match Journal::load(&path) {
            Ok(Some(prior)) if same(&prior) => true,
            Ok(Some(_)) => {
                info!(local = %local.display(), remote = %remote, "source changed since the interrupted upload; starting from 0");
                false
            }
            Ok(None) => false,
            Err(e) => {
                warn!(error = %e, "ignoring a damaged journal");
                false
            }
        };
        Ok((file, Journal::new(path, record), resumable))
    }
}

/// The end of a PUT: the server's verdict checked against the hash sent.
/// The journal goes once the file is stored, or when resuming is pointless.
fn upload_answered(
    reply: Reply,
    hash: blake3::Hash,
    journal: Journal,
    (id, offset): (Option<String>, u64),
    ms: u64,
) -> Result<Transferred> {
    let Record {
        source: local,
        target: remote,
        size,
        chunk,
        ..
    } = &journal.record;
    let (size, chunk) = (*size, *chunk);
    if reply.code != 226 {
        info!(local, remote, id, code = reply.code, error = ?reply.text, ms, "upload failed");
        if matches!(reply.code, 452 | 454) || size <= chunk {
            journal.remove();
        }
        return Err(ClientError::Server {
            code: reply.code,
            text: reply.text,
        });
    }
    let theirs = reply.text.split(' ').next().unwrap_or_default();
    if theirs != protocol::hex(&hash) {
        return Err(ClientError::Verify(format!(
            "server stored hash {theirs}, expected {}",
            protocol::hex(&hash)
        )));
    }
    info!(local, remote, id, size, resumed_at = offset, hash = %protocol::hex(&hash), ms, "upload complete");
    journal.remove();
    Ok(Transferred {
        hash,
        size,
        resumed_at: offset,
    })
}

/// Reads a file for `SEND` and hashes it; a file too large for `SEND` is an error.
fn read_small(local: &Path) -> Result<(Vec<u8>, blake3::Hash)> {
    use std::io::Read as _;
    let too_large = || ClientError::Local(format!("{}: too large to SEND", local.display()));
    let file = File::open(local).map_err(|e| local_err(local, e))?;
    let size = file.metadata().map_err(|e| local_err(local, e))?.len();
    if size > protocol::MAX_SEND {
        return Err(too_large());
    }
    let mut data = Vec::with_capacity(size as usize);
    // One byte past the limit tells a file that grew since.
    file.take(protocol::MAX_SEND + 1)
        .read_to_end(&mut data)
        .map_err(|e| local_err(local, e))?;
    if data.len() as u64 > protocol::MAX_SEND {
        return Err(too_large());
    }
    let hash = blake3::hash(&data);
    Ok((data, hash))
}

/// The resume offers in a `150 ready [OFFSET HASH]...` reply.
fn parse_offers(text: &str) -> Result<Vec<Candidate>> {
    let words: Vec<&str> = text.split(' ').filter(|w| !w.is_empty()).collect();
    let Some((&"ready", rest)) = words.split_first() else {
        return Err(ClientError::Protocol(format!("bad 150 reply {text:?}")));
    };
    let line = format!("GET x {}", rest.join(" "));
    match Request::parse(&line) {
        Ok(Request::Get { candidates, .. }) => Ok(candidates),
        _ => Err(ClientError::Protocol(format!("bad resume offers {text:?}"))),
    }
}
