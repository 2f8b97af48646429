//! What can stop a transfer, or the connection it runs over, on either end.
//! Each end says it in its own words: the server turns it into a reply
//! (`crate::error`), the client into its own error (`client::ClientError`).

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection failed or closed.
    #[error("connection lost")]
    Connection(#[source] io::Error),
    #[error("{0} timed out")]
    Timeout(&'static str),
    /// A line longer than the limit the reader set.
    #[error("line too long")]
    LineTooLong,
    /// A line that is not UTF-8.
    #[error("line is not valid UTF-8")]
    NotText,
    /// The peer sent what the protocol does not allow here.
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("chunk at offset {0} failed its hash check")]
    BadChunk(u64),
    #[error("the whole file's hash did not match")]
    HashMismatch,
    /// The sender gave up (an abort frame).
    #[error("the sender gave up")]
    Aborted,
    /// This end's file could not be read or written.
    #[error("{0}")]
    File(#[source] io::Error),
}

impl Error {
    /// Whether both ends are still in step after it: the sender's frames
    /// were read to their end.
    pub fn in_step(&self) -> bool {
        matches!(
            self,
            Error::BadChunk(_) | Error::HashMismatch | Error::File(_)
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether an I/O error means the disk, or this process's share of it, is
/// full (ENOSPC, EDQUOT, or EFBIG under a file-size limit).
pub fn disk_full(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
    )
}
