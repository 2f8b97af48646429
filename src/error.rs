//! The server's error type: what went wrong, which reply code it becomes and
//! whether the session can go on. `session.rs` turns every failure into a
//! reply through [`Error::reply_code`] and [`Error::ends_session`], and
//! nowhere else.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Syntax(String),
    #[error("request line too long")]
    LineTooLong,
    #[error("{0}")]
    BadArgument(String),
    #[error("{0}")]
    BadSequence(String),
    #[error("not logged in")]
    NotLoggedIn,
    #[error("login failed")]
    LoginFailed,
    #[error("{0}")]
    NameRefused(String),
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0}: already exists")]
    Exists(String),
    #[error("{0}: not a directory")]
    NotADirectory(String),
    #[error("{0}: is a directory")]
    IsADirectory(String),
    #[error("{0}: not a regular file")]
    NotAFile(String),
    #[error("{0}: directory not empty")]
    NotEmpty(String),
    #[error("{0}: permission denied")]
    PermissionDenied(String),
    #[error("quota exceeded: {needed} bytes needed, {available} available")]
    QuotaExceeded { needed: u64, available: u64 },
    #[error("file limit reached: at most {0} files and directories")]
    TooManyFiles(u64),
    #[error("server storage is full")]
    StorageFull,
    #[error("{0}")]
    Throttled(String),
    #[error("{0}: busy, another session is transferring it")]
    Busy(String),
    #[error("chunk at offset {0} failed its hash check")]
    BadChunk(u64),
    #[error("file hash mismatch: the upload was not stored")]
    HashMismatch,
    #[error("{0}")]
    Unavailable(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("storage error on the server")]
    Storage(#[source] io::Error),
    #[error("connection lost")]
    Connection(#[source] io::Error),
}

impl Error {
    /// The reply code this error is sent as (see `protocol`).
    pub fn reply_code(&self) -> u16 {
        match self {
            Error::Syntax(_) | Error::LineTooLong | Error::Protocol(_) => 500,
            Error::BadArgument(_) => 501,
            Error::BadSequence(_) => 503,
            Error::NotLoggedIn => 530,
            Error::LoginFailed => 430,
            Error::NameRefused(_) | Error::Exists(_) => 553,
            Error::NotFound(_)
            | Error::NotADirectory(_)
            | Error::IsADirectory(_)
            | Error::NotAFile(_)
            | Error::NotEmpty(_)
            | Error::PermissionDenied(_) => 550,
            Error::QuotaExceeded { .. } | Error::TooManyFiles(_) => 552,
            Error::Busy(_) | Error::Throttled(_) => 450,
            Error::StorageFull => 452,
            Error::BadChunk(_) => 453,
            Error::HashMismatch => 454,
            Error::Unavailable(_) | Error::Timeout(_) => 421,
            Error::Storage(_) => 451,
            Error::Connection(_) => 421,
        }
    }

    /// Whether the session must end after this error is replied.
    pub fn ends_session(&self) -> bool {
        matches!(
            self,
            Error::LineTooLong
                | Error::Protocol(_)
                | Error::Unavailable(_)
                | Error::Timeout(_)
                | Error::Connection(_)
        )
    }

    /// Maps a filesystem error on virtual path `vpath` to what the client is
    /// told. The message names only the virtual path, never a host path.
    pub fn fs(err: io::Error, vpath: &str) -> Error {
        let p = vpath.to_string();
        match err.kind() {
            io::ErrorKind::NotFound => Error::NotFound(p),
            io::ErrorKind::AlreadyExists => Error::Exists(p),
            io::ErrorKind::NotADirectory => Error::NotADirectory(p),
            io::ErrorKind::IsADirectory => Error::IsADirectory(p),
            io::ErrorKind::DirectoryNotEmpty => Error::NotEmpty(p),
            // cap-std reports a path that would leave the home (an escaping
            // symlink) as PermissionDenied: to the user it is simply out of reach.
            io::ErrorKind::PermissionDenied => Error::PermissionDenied(p),
            io::ErrorKind::InvalidFilename => Error::BadArgument(format!("{p}: invalid name")),
            _ if err.raw_os_error() == Some(libc::ELOOP) => Error::PermissionDenied(p),
            _ if matches!(
                err.raw_os_error(),
                Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
            ) =>
            {
                Error::StorageFull
            }
            _ => Error::Storage(err),
        }
    }
}
