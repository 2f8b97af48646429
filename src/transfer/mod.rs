//! Moving one file as chunk frames, in either direction, for the server and
//! the client alike.
//!
//! # Proof
//!
//! A file of SIZE bytes moves in chunks of a power-of-two CHUNK size (the
//! last may be shorter), each at an offset that is a multiple of CHUNK. Each
//! chunk is a subtree of the file's BLAKE3 tree, and its frame carries that
//! subtree's BLAKE3 chaining value ([`chunk_hash`]; for a file of one chunk,
//! simply its BLAKE3 hash). The receiver recomputes it before the bytes are
//! written or counted. Both ends then join the chunk hashes into the file's
//! BLAKE3 hash ([`Tree`]), the same value `b3sum` prints, and the receiver
//! compares it with the sender's in the end frame. Every byte is hashed
//! once per end.
//!
//! # Pipeline
//!
//! Disk, hashing and TLS overlap: the sender reads and hashes the next chunk
//! on the blocking pool while the current one goes to the connection; the
//! receiver verifies and writes one chunk on the blocking pool while it reads
//! the next from the connection. Two buffers per transfer, reused.
//!
//! # Resume
//!
//! The receiver offers offsets it holds (its partial file's length and the
//! journal's last durable offset, rounded down to whole chunks) with a proof
//! of the bytes before each: a digest of the hash tree built over them
//! ([`Tree::proof`]). The sender builds the same over its own bytes and
//! resumes at the highest offset whose proof matches, else at 0. Nothing is
//! ever appended to bytes that were not proven equal to the source.

pub mod cache;
pub mod connection;
pub mod error;
pub mod journal;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, merge_subtrees_non_root, merge_subtrees_root,
};
use indicatif::ProgressBar;
use tokio::task::JoinHandle;

use crate::protocol::{Candidate, FrameHeader, FrameKind, MAX_CANDIDATES, valid_chunk_size};
use crate::transfer::connection::{Connection, Stream};
use crate::transfer::journal::Journal;
pub use error::Error;
use error::Result;

/// The hash a chunk frame carries: the BLAKE3 chaining value of `data` as
/// the subtree at `offset` of a file of `size` bytes, or, when `data` is the
/// whole file, its BLAKE3 hash.
///
/// A chunk that cannot be a subtree there (empty, off the 1 KiB grid, or
/// larger than the offset allows) gets all zeros, which no real chunk has;
/// receivers check a chunk's place before its hash anyway.
pub fn chunk_hash(size: u64, offset: u64, data: &[u8]) -> ChainingValue {
    if offset == 0 && data.len() as u64 == size {
        return *blake3::hash(data).as_bytes();
    }
    let on_grid = offset.is_multiple_of(blake3::CHUNK_LEN as u64);
    let fits =
        || blake3::hazmat::max_subtree_len(offset).is_none_or(|max| data.len() as u64 <= max);
    if data.is_empty() || !on_grid || !fits() {
        return [0; 32];
    }
    blake3::Hasher::new()
        .set_input_offset(offset)
        .update(data)
        .finalize_non_root()
}

/// Joins chunk hashes, in file order, into the file's BLAKE3 hash. All
/// chunks but the last have the same power-of-two size.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    /// Roots of the completed subtrees to the left, largest first.
    stack: Vec<ChainingValue>,
    /// The newest chunk's hash: not merged until it is known not to be the last.
    last: Option<ChainingValue>,
    /// Chunks merged into the stack so far.
    merged: u64,
}

impl Tree {
    pub fn push(&mut self, chunk: ChainingValue) {
        if let Some(mut cv) = self.last.replace(chunk) {
            // The previous chunk is not the last one: fold the subtrees it completes.
            self.merged += 1;
            let mut total = self.merged;
            while total & 1 == 0 {
                let Some(left) = self.stack.pop() else { break };
                cv = merge_subtrees_non_root(&left, &cv, Mode::Hash);
                total >>= 1;
            }
            self.stack.push(cv);
        }
    }

    /// The BLAKE3 hash of the whole file.
    pub fn finalize(&self) -> blake3::Hash {
        let Some(mut cv) = self.last else {
            return blake3::hash(b"");
        };
        // A file of one chunk: its chunk hash is the file's hash.
        for (i, left) in self.stack.iter().enumerate().rev() {
            if i == 0 {
                return merge_subtrees_root(left, &cv, Mode::Hash);
            }
            cv = merge_subtrees_non_root(left, &cv, Mode::Hash);
        }
        blake3::Hash::from_bytes(cv)
    }

    /// A digest of the chunks pushed so far, to prove two prefixes equal.
    pub fn proof(&self) -> blake3::Hash {
        let mut h = blake3::Hasher::new_derive_key("ftpx 2026 resume proof");
        h.update(&self.merged.to_le_bytes());
        for cv in &self.stack {
            h.update(cv);
        }
        h.update(self.last.as_ref().map_or(&[0u8; 32][..], |l| &l[..]));
        h.finalize()
    }
}

/// The trees of `file`'s prefixes `[0, offset)` for each of `offsets` (each
/// a multiple of `chunk` within the file), in the order given, with one pass
/// over the longest prefix.
pub fn prefix_trees(
    file: &File,
    size: u64,
    chunk: u64,
    offsets: &[u64],
) -> std::io::Result<Vec<Tree>> {
    let mut order: Vec<usize> = (0..offsets.len()).collect();
    order.sort_by_key(|&i| offsets[i]);
    let mut out = vec![Tree::default(); offsets.len()];
    let mut tree = Tree::default();
    let mut pos = 0u64;
    let mut buf = vec![0u8; usize::try_from(chunk).unwrap_or(1 << 18)];
    for i in order {
        while pos < offsets[i] {
            let len = usize::try_from((offsets[i] - pos).min(chunk)).unwrap_or(buf.len());
            file.read_exact_at(&mut buf[..len], pos)?;
            tree.push(chunk_hash(size, pos, &buf[..len]));
            pos += len as u64;
        }
        out[i] = tree.clone();
    }
    Ok(out)
}

/// Opens (or creates) a receiver's partial file, cut to `offset` (where the
/// chunks will resume), with the tree of the bytes before it.
pub fn open_partial(
    path: &std::path::Path,
    size: u64,
    chunk: u64,
    offset: u64,
) -> std::io::Result<(File, Tree)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    resume_partial(file, size, chunk, offset)
}

/// Cuts an opened partial file to `offset` and builds the tree of the
/// bytes before it; for a receiver that opens its partial file itself.
pub fn resume_partial(
    file: File,
    size: u64,
    chunk: u64,
    offset: u64,
) -> std::io::Result<(File, Tree)> {
    file.set_len(offset)?;
    let tree = prefix_trees(&file, size, chunk, &[offset])?.remove(0);
    Ok((file, tree))
}

/// The receiver's resume offers: `offsets` rounded down to whole chunks,
/// highest first, with their proofs.
pub fn offer(
    file: &File,
    size: u64,
    chunk: u64,
    offsets: &[u64],
) -> std::io::Result<Vec<Candidate>> {
    if !valid_chunk_size(chunk) {
        return Ok(vec![]);
    }
    let mut offsets: Vec<u64> = offsets
        .iter()
        .map(|&o| o.min(size) / chunk * chunk)
        .filter(|&o| o > 0)
        .collect();
    offsets.sort_unstable_by(|a, b| b.cmp(a));
    offsets.dedup();
    offsets.truncate(MAX_CANDIDATES);
    let trees = prefix_trees(file, size, chunk, &offsets)?;
    Ok(offsets
        .into_iter()
        .zip(trees)
        .map(|(offset, t)| Candidate {
            offset,
            hash: t.proof(),
        })
        .collect())
}

/// The sender's choice: the highest candidate (a whole number of chunks
/// within `size`) whose proof matches `file`'s own prefix, with the tree
/// there; else 0 and an empty tree.
///
/// With `known`, the file's chunk hashes, nothing is read.
pub fn choose(
    file: &File,
    size: u64,
    chunk: u64,
    candidates: &[Candidate],
    known: &Known,
) -> std::io::Result<(u64, Tree)> {
    let usable: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.offset > 0 && c.offset <= size && c.offset % chunk == 0)
        .collect();
    let offsets: Vec<u64> = usable.iter().map(|c| c.offset).collect();
    let trees = match known {
        Known::All(chunks) => offsets
            .iter()
            .map(|&o| {
                let mut t = Tree::default();
                let before = usize::try_from(o / chunk)
                    .ok()
                    .and_then(|n| chunks.get(..n));
                before.unwrap_or_default().iter().for_each(|&cv| t.push(cv));
                t
            })
            .collect(),
        _ => prefix_trees(file, size, chunk, &offsets)?,
    };
    let best = usable
        .iter()
        .zip(trees)
        .filter(|(c, t)| t.proof() == c.hash)
        .max_by_key(|(c, _)| c.offset);
    Ok(match best {
        Some((c, t)) => (c.offset, t),
        None => (0, Tree::default()),
    })
}

/// One side of a transfer: the file, its size and chunk size.
#[derive(Debug, Clone)]
pub struct Plan {
    pub file: Arc<File>,
    pub size: u64,
    pub chunk: u64,
    /// Where the chunks start, and the tree of the bytes before.
    pub offset: u64,
    pub tree: Tree,
}

/// What a sender knows of its file's chunk hashes before reading it.
#[derive(Debug, Default)]
pub enum Known {
    /// Nothing: each chunk is hashed as it is read.
    #[default]
    Nothing,
    /// Nothing yet: each chunk is hashed as it is read, and every hash is
    /// kept here (for a send from offset 0).
    Collect(Vec<ChainingValue>),
    /// Every chunk's hash, from an earlier hashing of the same version of
    /// the file: nothing is hashed again. The receiver checks them all.
    All(cache::Chunks),
}

/// Reads the chunk at `at` into `buf` and gives its hash: the known one if
/// `all` has it, else computed.
fn read_chunk(
    plan: (&File, u64, u64),
    at: u64,
    all: Option<&cache::Chunks>,
    buf: &mut Vec<u8>,
) -> std::io::Result<ChainingValue> {
    let (file, size, chunk) = plan;
    buf.resize(usize::try_from((size - at).min(chunk)).unwrap_or(0), 0);
    file.read_exact_at(buf, at)?;
    let known = all.and_then(|c| c.get(usize::try_from(at / chunk).ok()?).copied());
    Ok(known.unwrap_or_else(|| chunk_hash(size, at, buf)))
}

/// The first chunk of a send, read with its plan: for a file of one chunk,
/// one trip to the blocking pool instead of two.
pub struct Ahead {
    data: Vec<u8>,
    hash: ChainingValue,
}

/// Reads the chunk at the plan's offset (on the blocking pool: it reads).
pub fn read_ahead(plan: &Plan, known: &Known) -> std::io::Result<Ahead> {
    let all = match known {
        Known::All(chunks) => Some(chunks),
        _ => None,
    };
    let mut data = Vec::new();
    let hash = read_chunk(
        (&plan.file, plan.size, plan.chunk),
        plan.offset,
        all,
        &mut data,
    )?;
    Ok(Ahead { data, hash })
}

/// Sends `file[offset..size]` as chunk frames and an end frame, starting
/// with `ahead` if the first chunk was read already. Returns the whole
/// file's hash. The caller flushes the connection.
pub async fn send<S: Stream>(
    conn: &mut Connection<S>,
    plan: Plan,
    known: &mut Known,
    ahead: Option<Ahead>,
    progress: &ProgressBar,
) -> Result<blake3::Hash> {
    struct Read {
        buf: Vec<u8>,
        tree: Tree,
        hash: std::io::Result<ChainingValue>,
    }
    enum Next {
        Reading(JoinHandle<Read>),
        Ready(Read),
    }
    let Plan {
        file,
        size,
        chunk,
        offset,
        mut tree,
    } = plan;
    let all = match known {
        Known::All(chunks) => Some(chunks.clone()),
        _ => None,
    };
    let read = |mut buf: Vec<u8>, mut tree: Tree, at: u64| {
        let (file, all) = (file.clone(), all.clone());
        Next::Reading(tokio::task::spawn_blocking(move || {
            let hash = read_chunk((&file, size, chunk), at, all.as_ref(), &mut buf);
            if let Ok(h) = hash {
                tree.push(h);
            }
            Read { buf, tree, hash }
        }))
    };

    let mut pos = offset;
    let mut spare = Vec::new();
    let mut pending = match ahead {
        _ if pos >= size => None,
        Some(Ahead { data, hash }) => {
            let mut tree = tree.clone();
            tree.push(hash);
            Some(Next::Ready(Read {
                buf: data,
                tree,
                hash: Ok(hash),
            }))
        }
        None => Some(read(Vec::new(), tree.clone(), pos)),
    };
    while let Some(next) = pending.take() {
        let done = match next {
            Next::Ready(done) => done,
            Next::Reading(task) => task
                .await
                .map_err(|e| Error::File(std::io::Error::other(e)))?,
        };
        let hash = match done.hash {
            Ok(hash) => hash,
            Err(e) => {
                // The source shrank or can't be read: tell the receiver, then report.
                let _ = conn.write_frame(&FrameHeader::abort(), &[]).await;
                let _ = conn.flush().await;
                return Err(Error::File(e));
            }
        };
        if let Known::Collect(hashes) = known {
            hashes.push(hash);
        }
        let at = pos;
        pos += done.buf.len() as u64;
        if pos < size {
            pending = Some(read(std::mem::take(&mut spare), done.tree, pos));
        } else {
            tree = done.tree;
        }
        let header = FrameHeader {
            kind: FrameKind::Chunk,
            offset: at,
            len: u32::try_from(done.buf.len()).unwrap_or(u32::MAX),
            hash,
        };
        conn.write_frame(&header, &done.buf).await?;
        progress.inc(done.buf.len() as u64);
        spare = done.buf;
    }
    let hash = tree.finalize();
    conn.write_frame(&FrameHeader::end(size, hash), &[]).await?;
    Ok(hash)
}

/// When the receiver makes its progress durable.
#[derive(Debug, Clone, Copy)]
pub struct Checkpoints {
    pub bytes: u64,
    pub interval: Duration,
}

/// Why a receive stopped short, and how many bytes of the partial file are
/// good (verified and written; the caller makes them durable).
#[derive(Debug)]
pub struct Stopped {
    pub error: Error,
    pub verified: u64,
}

/// A write of one verified chunk on the blocking pool, and what it hands back.
struct Write {
    buf: Vec<u8>,
    journal: Option<Journal>,
    result: std::io::Result<()>,
}

/// The receiving end of one transfer.
struct Receiver<'a> {
    plan: Plan,
    journal: &'a mut Option<Journal>,
    checkpoints: Checkpoints,
    /// Bytes received from the sender so far.
    pos: u64,
    /// Bytes verified and written.
    written: u64,
    /// Bytes the journal claims (fsynced).
    durable: u64,
    last_checkpoint: Instant,
    spare: Vec<u8>,
    pending: Option<(JoinHandle<Write>, u64)>,
    /// Once set, the rest of the stream is read and dropped.
    failed: Option<Error>,
}

impl Receiver<'_> {
    /// Waits for the write under way and takes back its buffer and journal.
    async fn settle(&mut self) {
        let Some((task, end)) = self.pending.take() else {
            return;
        };
        let done = match task.await {
            Ok(done) => done,
            Err(e) => {
                self.failed
                    .get_or_insert(Error::File(std::io::Error::other(e)));
                return;
            }
        };
        self.spare = done.buf;
        let checkpointed = done.journal.is_some();
        if let Some(j) = done.journal {
            *self.journal = Some(j);
        }
        match done.result {
            Ok(()) => {
                self.written = end;
                if checkpointed {
                    self.durable = end;
                }
            }
            Err(e) => {
                self.failed.get_or_insert(Error::File(e));
            }
        }
    }

    /// Checks a chunk's place and size; an error here means the peer is out of step.
    fn check_place(&self, header: &FrameHeader) -> Result<()> {
        let len = u64::from(header.len);
        let end = self.pos.checked_add(len);
        let fits = end.is_some_and(|end| end <= self.plan.size);
        let full_or_last =
            len == self.plan.chunk || (len < self.plan.chunk && end == Some(self.plan.size));
        if header.offset != self.pos || !fits || !full_or_last {
            return Err(Error::Protocol(format!(
                "chunk at {} of {} bytes does not follow {} in chunks of {} within {}",
                header.offset, len, self.pos, self.plan.chunk, self.plan.size
            )));
        }
        Ok(())
    }

    async fn chunk<S: Stream>(
        &mut self,
        conn: &mut Connection<S>,
        header: &FrameHeader,
        progress: &ProgressBar,
    ) -> Result<()> {
        self.check_place(header)?;
        let mut buf = std::mem::take(&mut self.spare);
        buf.resize(header.len as usize, 0);
        conn.read_payload(&mut buf).await?;
        let at = self.pos;
        self.pos += u64::from(header.len);
        if self.failed.is_some() {
            self.spare = buf;
            return Ok(());
        }
        let hash = chunk_hash(self.plan.size, at, &buf);
        if hash != header.hash {
            self.failed = Some(Error::BadChunk(at));
            self.spare = buf;
            return Ok(());
        }
        self.plan.tree.push(hash);
        self.settle().await;
        if self.failed.is_some() {
            return Ok(());
        }
        let end = self.pos;
        let checkpoint = end - self.durable >= self.checkpoints.bytes
            || self.last_checkpoint.elapsed() >= self.checkpoints.interval;
        let mut journal = if checkpoint {
            self.journal.take()
        } else {
            None
        };
        if checkpoint {
            self.last_checkpoint = Instant::now();
        }
        let file = self.plan.file.clone();
        let task = tokio::task::spawn_blocking(move || {
            let result = file
                .write_all_at(&buf, at)
                .and_then(|()| match journal.as_mut() {
                    Some(j) => {
                        file.sync_data()?;
                        j.save(end)
                    }
                    None => Ok(()),
                });
            Write {
                buf,
                journal,
                result,
            }
        });
        self.pending = Some((task, end));
        progress.inc(u64::from(header.len));
        Ok(())
    }
}

/// Receives chunk frames into the plan's file from its offset until the end
/// frame. Progress is made durable at `checkpoints` through `journal`.
/// Returns the whole file's hash once it matched the sender's.
///
/// A chunk whose hash does not match is never written, nor anything after
/// it; a write that fails stops the writing too. Either way the rest of the
/// stream is read and dropped, so the session stays in step, and the error
/// ([`Error::BadChunk`], [`Error::File`]...) returned with the good length. A
/// chunk out of place is a protocol error: the peer is out of step.
pub async fn receive<S: Stream>(
    conn: &mut Connection<S>,
    plan: Plan,
    journal: &mut Option<Journal>,
    checkpoints: Checkpoints,
    progress: &ProgressBar,
) -> std::result::Result<blake3::Hash, Stopped> {
    let offset = plan.offset;
    let mut r = Receiver {
        plan,
        journal,
        checkpoints,
        pos: offset,
        written: offset,
        durable: offset,
        last_checkpoint: Instant::now(),
        spare: Vec::new(),
        pending: None,
        failed: None,
    };
    let outcome = loop {
        let header = match conn.read_frame_header().await {
            Ok(h) => h,
            Err(e) => break Err(e),
        };
        match header.kind {
            FrameKind::Chunk => {
                if let Err(e) = r.chunk(conn, &header, progress).await {
                    break Err(e);
                }
            }
            FrameKind::End => {
                r.settle().await;
                if let Some(e) = r.failed.take() {
                    break Err(e);
                }
                if header.offset != r.plan.size || r.pos != r.plan.size {
                    break Err(Error::Protocol(format!(
                        "end frame at {} but {} of {} bytes arrived",
                        header.offset, r.pos, r.plan.size
                    )));
                }
                let hash = r.plan.tree.finalize();
                if hash.as_bytes() != &header.hash {
                    break Err(Error::HashMismatch);
                }
                break Ok(hash);
            }
            FrameKind::Abort => break Err(Error::Aborted),
            FrameKind::Start => break Err(Error::Protocol("unexpected start frame".into())),
        }
    };
    r.settle().await;
    outcome.map_err(|error| Stopped {
        error,
        verified: r.written,
    })
}

/// Receives a file of at most one chunk, from offset 0, into memory: its
/// chunk frame (none for an empty file) and its end frame, checked as
/// [`receive`] checks them, and with the same errors: a chunk that fails
/// its hash is read to the end frame and reported ([`Error::BadChunk`]),
/// leaving the session in step. For a receiver that then writes the whole
/// file in one go.
pub async fn receive_whole<S: Stream>(
    conn: &mut Connection<S>,
    size: u64,
    progress: &ProgressBar,
) -> Result<(Vec<u8>, blake3::Hash)> {
    let mut data = Vec::new();
    // A file of one chunk: the chunk's hash is the file's.
    let mut hash = blake3::hash(b"");
    let mut failed = None;
    loop {
        let header = conn.read_frame_header().await?;
        match header.kind {
            FrameKind::Chunk => {
                let len = u64::from(header.len);
                if header.offset != 0 || !data.is_empty() || len != size || size == 0 {
                    return Err(Error::Protocol(format!(
                        "chunk at {} of {len} bytes: expected the whole file of {size} bytes at 0",
                        header.offset
                    )));
                }
                data.resize(header.len as usize, 0);
                conn.read_payload(&mut data).await?;
                hash = blake3::hash(&data);
                if hash.as_bytes() != &header.hash {
                    failed.get_or_insert(Error::BadChunk(0));
                }
                progress.inc(len);
            }
            FrameKind::End => {
                if let Some(e) = failed {
                    return Err(e);
                }
                if header.offset != size || data.len() as u64 != size {
                    return Err(Error::Protocol(format!(
                        "end frame at {} but {} of {size} bytes arrived",
                        header.offset,
                        data.len()
                    )));
                }
                if hash.as_bytes() != &header.hash {
                    return Err(Error::HashMismatch);
                }
                return Ok((data, hash));
            }
            FrameKind::Abort => return Err(Error::Aborted),
            FrameKind::Start => return Err(Error::Protocol("unexpected start frame".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn tree_hash(data: &[u8], chunk: usize) -> blake3::Hash {
        let mut t = Tree::default();
        let size = data.len() as u64;
        for (i, c) in data.chunks(chunk).enumerate() {
            t.push(chunk_hash(size, (i * chunk) as u64, c));
        }
        t.finalize()
    }

    #[test]
    fn chunk_trees_give_the_plain_blake3_hash() {
        let data: Vec<u8> = (0..(9 << 16) + 77u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        for chunk in [1024, 4096, 65536] {
            for len in [
                0,
                1,
                1023,
                1024,
                1025,
                chunk - 1,
                chunk,
                chunk + 1,
                2 * chunk,
                3 * chunk + 7,
                5 * chunk,
                8 * chunk,
                data.len(),
            ] {
                let len = len.min(data.len());
                assert_eq!(
                    tree_hash(&data[..len], chunk),
                    blake3::hash(&data[..len]),
                    "len {len} chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn impossible_chunks_hash_to_zeros_without_panicking() {
        assert_eq!(chunk_hash(10_000, 0, &[]), [0; 32]);
        assert_eq!(chunk_hash(10_000, 1000, &[1; 10]), [0; 32]);
        assert_eq!(chunk_hash(1 << 20, 1024, &[1; 4096]), [0; 32]);
        assert_ne!(chunk_hash(1 << 20, 4096, &[1; 4096]), [0; 32]);
    }

    #[test]
    fn prefix_proofs() {
        let chunk = 4096u64;
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let size = data.len() as u64;
        f.write_all(&data).unwrap();
        let offers = offer(&f, size, chunk, &[50_000, 0, 50_000, 9000]).unwrap();
        assert_eq!(
            offers.iter().map(|c| c.offset).collect::<Vec<_>>(),
            vec![49_152, 8192]
        );
        // The sender with the same bytes takes the highest offer, and its tree continues correctly.
        let (at, mut tree) = choose(&f, size, chunk, &offers, &Known::Nothing).unwrap();
        assert_eq!(at, 49_152);
        for (i, c) in data[at as usize..].chunks(chunk as usize).enumerate() {
            tree.push(chunk_hash(size, at + (i as u64) * chunk, c));
        }
        assert_eq!(tree.finalize(), blake3::hash(&data));
        // A sender whose bytes differ after 8192 resumes there; before, at 0.
        let mut g = tempfile::tempfile().unwrap();
        let mut other = data.clone();
        other[20_000] ^= 1;
        g.write_all(&other).unwrap();
        assert_eq!(
            choose(&g, size, chunk, &offers, &Known::Nothing).unwrap().0,
            8192
        );
        other[5] ^= 1;
        g.write_all_at(&other, 0).unwrap();
        assert_eq!(
            choose(&g, size, chunk, &offers, &Known::Nothing).unwrap().0,
            0
        );
        // Offers beyond the sender's size or off the chunk grid are never taken.
        assert_eq!(
            choose(&f, 40_000, chunk, &offers, &Known::Nothing)
                .unwrap()
                .0,
            8192
        );
        assert_eq!(
            choose(&f, size, 8192 * 2, &offers, &Known::Nothing)
                .unwrap()
                .0,
            0
        );
        // Known chunk hashes give the same choice and tree without reading.
        let all: Vec<ChainingValue> = data
            .chunks(chunk as usize)
            .enumerate()
            .map(|(i, c)| chunk_hash(size, i as u64 * chunk, c))
            .collect();
        let known = Known::All(all.into());
        let empty = tempfile::tempfile().unwrap();
        let (at, tree) = choose(&empty, size, chunk, &offers, &known).unwrap();
        assert_eq!((at, tree.proof()), (49_152, offers[0].hash));
    }
}
