//! Moving one file as chunk frames, in either direction, for the server and
//! the client alike.
//!
//! The sender reads a chunk, hashes it with BLAKE3 and sends it with its
//! hash; the receiver checks that hash before the bytes are written or
//! counted. Both ends also hash the whole file as it passes, and the sender's
//! whole-file hash travels in the end frame for the receiver to compare.
//!
//! Disk, hashing and TLS overlap: the sender reads and hashes the next chunk
//! on the blocking pool while the current one is written to the connection;
//! the receiver verifies and writes one chunk on the blocking pool while it
//! reads the next from the connection. Two buffers per transfer, reused.
//!
//! Resuming: the receiver names offsets it holds (its partial file's length,
//! and the journal's last durable offset) with the BLAKE3 of the bytes before
//! each; the sender hashes its own prefix and resumes at the highest offset
//! that matches, else at 0. Nothing is ever appended to bytes that were not
//! proven equal to the source.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::connection::Connection;
use crate::error::{Error, Result};
use crate::journal::Journal;
use crate::protocol::{Candidate, FrameHeader, FrameKind};

/// When the receiver makes its progress durable.
#[derive(Debug, Clone, Copy)]
pub struct Checkpoints {
    pub bytes: u64,
    pub interval: Duration,
}

/// Hashes `file` from the start up to each of `offsets` (each at most the
/// file's length) and returns, for each, the BLAKE3 state at that point,
/// in the order given. One pass over the longest prefix.
pub fn prefix_hashers(file: &File, offsets: &[u64]) -> std::io::Result<Vec<blake3::Hasher>> {
    let mut order: Vec<usize> = (0..offsets.len()).collect();
    order.sort_by_key(|&i| offsets[i]);
    let mut out = vec![blake3::Hasher::new(); offsets.len()];
    let mut hasher = blake3::Hasher::new();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    for i in order {
        let target = offsets[i];
        while pos < target {
            let want = usize::try_from((target - pos).min(buf.len() as u64)).unwrap_or(buf.len());
            file.read_exact_at(&mut buf[..want], pos)?;
            hasher.update(&buf[..want]);
            pos += want as u64;
        }
        out[i] = hasher.clone();
    }
    Ok(out)
}

/// The receiver's resume offers: for each distinct offset, its prefix hash.
pub fn offer(file: &File, offsets: &[u64]) -> std::io::Result<Vec<Candidate>> {
    let mut offsets: Vec<u64> = offsets.iter().copied().filter(|&o| o > 0).collect();
    offsets.sort_unstable_by(|a, b| b.cmp(a));
    offsets.dedup();
    offsets.truncate(crate::protocol::MAX_CANDIDATES);
    let hashers = prefix_hashers(file, &offsets)?;
    Ok(offsets
        .into_iter()
        .zip(hashers)
        .map(|(offset, h)| Candidate {
            offset,
            hash: h.finalize(),
        })
        .collect())
}

/// The sender's choice: the highest candidate within `size` whose hash
/// matches `file`'s own prefix, with the hasher state there; else 0.
pub fn choose(
    file: &File,
    size: u64,
    candidates: &[Candidate],
) -> std::io::Result<(u64, blake3::Hasher)> {
    let usable: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.offset > 0 && c.offset <= size)
        .collect();
    let offsets: Vec<u64> = usable.iter().map(|c| c.offset).collect();
    let hashers = prefix_hashers(file, &offsets)?;
    let best = usable
        .iter()
        .zip(hashers)
        .filter(|(c, h)| h.finalize() == c.hash)
        .max_by_key(|(c, _)| c.offset);
    Ok(match best {
        Some((c, h)) => (c.offset, h),
        None => (0, blake3::Hasher::new()),
    })
}

/// Sends `file[offset..size]` as chunk frames and an end frame. `hasher`
/// holds the state after `[0, offset)`. Returns the whole file's hash.
#[allow(clippy::too_many_arguments)]
pub async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    file: Arc<File>,
    offset: u64,
    size: u64,
    hasher: blake3::Hasher,
    chunk_size: usize,
    progress: &ProgressBar,
) -> Result<blake3::Hash> {
    type Read = (Vec<u8>, blake3::Hasher, std::io::Result<blake3::Hash>);
    let read =
        |file: Arc<File>, mut buf: Vec<u8>, mut hasher: blake3::Hasher, at: u64, len: usize| {
            tokio::task::spawn_blocking(move || -> Read {
                buf.resize(len, 0);
                match file.read_exact_at(&mut buf, at) {
                    Ok(()) => {
                        let chunk_hash = blake3::hash(&buf);
                        hasher.update(&buf);
                        (buf, hasher, Ok(chunk_hash))
                    }
                    Err(e) => (buf, hasher, Err(e)),
                }
            })
        };
    let len_at =
        |at: u64| usize::try_from((size - at).min(chunk_size as u64)).unwrap_or(chunk_size);

    let mut pos = offset;
    let mut spare = Vec::with_capacity(chunk_size);
    let mut hasher = Some(hasher);
    let mut pending = if pos < size {
        Some(read(
            file.clone(),
            Vec::with_capacity(chunk_size),
            hasher.take().unwrap_or_default(),
            pos,
            len_at(pos),
        ))
    } else {
        None
    };
    while let Some(task) = pending.take() {
        let (buf, h, result) = task
            .await
            .map_err(|e| Error::Storage(std::io::Error::other(e)))?;
        let chunk_hash = match result {
            Ok(hash) => hash,
            Err(e) => {
                // The source shrank or can't be read: tell the receiver, then report.
                let _ = conn.write_frame(&FrameHeader::abort(), &[]).await;
                let _ = conn.flush().await;
                return Err(Error::Storage(e));
            }
        };
        let this = pos;
        pos += buf.len() as u64;
        if pos < size {
            pending = Some(read(
                file.clone(),
                std::mem::take(&mut spare),
                h,
                pos,
                len_at(pos),
            ));
        } else {
            hasher = Some(h);
        }
        let header = FrameHeader {
            kind: FrameKind::Chunk,
            offset: this,
            len: u32::try_from(buf.len()).unwrap_or(u32::MAX),
            hash: *chunk_hash.as_bytes(),
        };
        conn.write_frame(&header, &buf).await?;
        progress.inc(buf.len() as u64);
        spare = buf;
    }
    let hash = hasher.unwrap_or_default().finalize();
    conn.write_frame(&FrameHeader::end(size, hash), &[]).await?;
    conn.flush().await?;
    Ok(hash)
}

/// Why a receive stopped short, and how many bytes of the partial file are
/// good (verified and written; the caller makes them durable).
#[derive(Debug)]
pub struct Stopped {
    pub error: Error,
    pub verified: u64,
}

/// Receives chunk frames into `file` from `offset` until the end frame; a
/// file of exactly `size` bytes is expected. `hasher` holds the state after
/// `[0, offset)`. Progress is made durable at `checkpoints` through
/// `journal`. Returns the whole file's hash once it matched the sender's.
///
/// A chunk whose hash does not match is never written: the rest of the
/// stream is read and dropped, and [`Error::BadChunk`] returned, leaving the
/// partial file good up to that chunk. A chunk past `size` or out of order
/// is a protocol error (the connection cannot be trusted to be in step).
#[allow(clippy::too_many_arguments)]
pub async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    file: Arc<File>,
    offset: u64,
    size: u64,
    hasher: blake3::Hasher,
    journal: &mut Option<Journal>,
    checkpoints: Checkpoints,
    progress: &ProgressBar,
) -> std::result::Result<blake3::Hash, Stopped> {
    type Write = (
        Vec<u8>,
        blake3::Hasher,
        Option<Journal>,
        std::io::Result<()>,
    );
    let mut pos = offset;
    let mut written = offset;
    let mut durable = offset;
    let mut last_checkpoint = Instant::now();
    let mut hasher = Some(hasher);
    let mut spare: Vec<u8> = Vec::new();
    let mut pending: Option<(tokio::task::JoinHandle<Write>, u64)> = None;
    let mut bad_chunk: Option<u64> = None;

    // Waits for the write under way, and takes back its buffer and state.
    async fn settle(
        pending: &mut Option<(tokio::task::JoinHandle<Write>, u64)>,
        spare: &mut Vec<u8>,
        hasher: &mut Option<blake3::Hasher>,
        journal: &mut Option<Journal>,
        written: &mut u64,
        durable: &mut u64,
    ) -> std::io::Result<()> {
        let Some((task, end)) = pending.take() else {
            return Ok(());
        };
        let (buf, h, j, result) = task.await.map_err(std::io::Error::other)?;
        *spare = buf;
        *hasher = Some(h);
        let checkpointed = j.is_some();
        if let Some(j) = j {
            *journal = Some(j);
        }
        result?;
        *written = end;
        if checkpointed && journal.as_ref().is_some_and(|j| j.record.verified == end) {
            *durable = end;
        }
        Ok(())
    }

    let fail = |error: Error, verified: u64| Stopped { error, verified };
    loop {
        let header = match conn.read_frame_header().await {
            Ok(h) => h,
            Err(e) => {
                let _ = settle(
                    &mut pending,
                    &mut spare,
                    &mut hasher,
                    journal,
                    &mut written,
                    &mut durable,
                )
                .await;
                return Err(fail(e, written));
            }
        };
        match header.kind {
            FrameKind::Chunk => {
                let len = u64::from(header.len);
                if header.offset != pos || pos.checked_add(len).is_none_or(|end| end > size) {
                    let _ = settle(
                        &mut pending,
                        &mut spare,
                        &mut hasher,
                        journal,
                        &mut written,
                        &mut durable,
                    )
                    .await;
                    let why = format!(
                        "chunk at {} of {} bytes does not follow {} within {}",
                        header.offset, len, pos, size
                    );
                    return Err(fail(Error::Protocol(why), written));
                }
                let mut buf = std::mem::take(&mut spare);
                buf.resize(header.len as usize, 0);
                if let Err(e) = conn.read_payload(&mut buf).await {
                    let _ = settle(
                        &mut pending,
                        &mut spare,
                        &mut hasher,
                        journal,
                        &mut written,
                        &mut durable,
                    )
                    .await;
                    return Err(fail(e, written));
                }
                pos += len;
                if bad_chunk.is_some() {
                    spare = buf;
                    continue;
                }
                if blake3::hash(&buf).as_bytes() != &header.hash {
                    bad_chunk = Some(header.offset);
                    spare = buf;
                    continue;
                }
                if let Err(e) = settle(
                    &mut pending,
                    &mut spare,
                    &mut hasher,
                    journal,
                    &mut written,
                    &mut durable,
                )
                .await
                {
                    return Err(fail(Error::fs(e, "upload"), written));
                }
                let checkpoint = pos - durable >= checkpoints.bytes
                    || last_checkpoint.elapsed() >= checkpoints.interval;
                let journal_now = if checkpoint { journal.take() } else { None };
                if checkpoint {
                    last_checkpoint = Instant::now();
                }
                let file = file.clone();
                let mut h = hasher.take().unwrap_or_default();
                let at = header.offset;
                let end = pos;
                let task = tokio::task::spawn_blocking(move || -> Write {
                    let mut j = journal_now;
                    let result = file.write_all_at(&buf, at).and_then(|()| {
                        h.update(&buf);
                        match j.as_mut() {
                            Some(j) => {
                                file.sync_data()?;
                                j.save(end)
                            }
                            None => Ok(()),
                        }
                    });
                    (buf, h, j, result)
                });
                pending = Some((task, end));
                progress.inc(len);
            }
            FrameKind::End => {
                if let Err(e) = settle(
                    &mut pending,
                    &mut spare,
                    &mut hasher,
                    journal,
                    &mut written,
                    &mut durable,
                )
                .await
                {
                    return Err(fail(Error::fs(e, "upload"), written));
                }
                if let Some(at) = bad_chunk {
                    return Err(fail(Error::BadChunk(at), written));
                }
                if header.offset != size || pos != size {
                    let why = format!(
                        "end frame at {} but {} of {} bytes arrived",
                        header.offset, pos, size
                    );
                    return Err(fail(Error::Protocol(why), written));
                }
                let hash = hasher.take().unwrap_or_default().finalize();
                if hash.as_bytes() != &header.hash {
                    return Err(fail(Error::HashMismatch, written));
                }
                return Ok(hash);
            }
            FrameKind::Abort => {
                let _ = settle(
                    &mut pending,
                    &mut spare,
                    &mut hasher,
                    journal,
                    &mut written,
                    &mut durable,
                )
                .await;
                return Err(fail(
                    Error::Unavailable("the sender gave up".into()),
                    written,
                ));
            }
            FrameKind::Start => {
                let _ = settle(
                    &mut pending,
                    &mut spare,
                    &mut hasher,
                    journal,
                    &mut written,
                    &mut durable,
                )
                .await;
                return Err(fail(
                    Error::Protocol("unexpected start frame".into()),
                    written,
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn prefix_proofs() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let hs = prefix_hashers(&f, &[2_500_000, 10, 0]).unwrap();
        assert_eq!(hs[0].clone().finalize(), blake3::hash(&data[..2_500_000]));
        assert_eq!(hs[1].clone().finalize(), blake3::hash(&data[..10]));
        assert_eq!(hs[2].clone().finalize(), blake3::hash(b""));

        let offers = offer(&f, &[1000, 0, 1000, 20]).unwrap();
        assert_eq!(
            offers.iter().map(|c| c.offset).collect::<Vec<_>>(),
            vec![1000, 20]
        );
        // The sender with the same bytes takes the highest offer.
        let (at, h) = choose(&f, data.len() as u64, &offers).unwrap();
        assert_eq!(at, 1000);
        assert_eq!(h.finalize(), blake3::hash(&data[..1000]));
        // A sender whose bytes differ after 20 resumes at 20; before, at 0.
        let mut g = tempfile::tempfile().unwrap();
        let mut other = data.clone();
        other[500] ^= 1;
        g.write_all(&other).unwrap();
        assert_eq!(choose(&g, data.len() as u64, &offers).unwrap().0, 20);
        other[5] ^= 1;
        g.write_all_at(&other, 0).unwrap();
        assert_eq!(choose(&g, data.len() as u64, &offers).unwrap().0, 0);
        // An offer beyond the sender's size is never taken.
        assert_eq!(choose(&f, 999, &offers).unwrap().0, 20);
    }
}
