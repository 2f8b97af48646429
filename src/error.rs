//! The server's error type, and the one table of replies: what went wrong,
//! which reply code it becomes and whether the session can go on. The
//! session turns every failure into a reply through [`Error::reply_code`]
//! and [`Error::ends_session`], and nowhere else.

use std::io;

use crate::protocol::{BadPath, Code, ParseError};
use crate::transfer;

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

/// What stopped a transfer or the connection, as the server replies to it.
impl From<transfer::Error> for Error {
    fn from(e: transfer::Error) -> Error {
        match e {
            transfer::Error::Connection(io) => Error::Connection(io),
            transfer::Error::Timeout(what) => Error::Timeout(what),
            transfer::Error::LineTooLong => Error::LineTooLong,
            transfer::Error::NotText => Error::Syntax("request is not valid UTF-8".into()),
            transfer::Error::Protocol(p) => Error::Protocol(p),
            transfer::Error::BadChunk(at) => Error::BadChunk(at),
            transfer::Error::HashMismatch => Error::HashMismatch,
            transfer::Error::Aborted => Error::Unavailable("the sender gave up".into()),
            transfer::Error::File(io) if transfer::error::disk_full(&io) => Error::StorageFull,
            transfer::Error::File(io) => Error::Storage(io),
        }
    }
}

impl From<BadPath> for Error {
    fn from(e: BadPath) -> Error {
        Error::BadArgument(e.0)
    }
}

impl Error {
    /// The reply code this error is sent as (see `protocol`).
    pub fn reply_code(&self) -> Code {
        match self {
            Error::Syntax(_) | Error::LineTooLong | Error::Protocol(_) => Code::Syntax,
            Error::BadArgument(_) => Code::BadArgument,
            Error::BadSequence(_) => Code::BadSequence,
            Error::NotLoggedIn => Code::NotLoggedIn,
            Error::LoginFailed => Code::LoginFailed,
            Error::NameRefused(_) | Error::Exists(_) => Code::NameRefused,
            Error::NotFound(_)
            | Error::NotADirectory(_)
            | Error::IsADirectory(_)
            | Error::NotAFile(_)
            | Error::NotEmpty(_)
            | Error::PermissionDenied(_) => Code::NotFound,
            Error::QuotaExceeded { .. } | Error::TooManyFiles(_) => Code::QuotaExceeded,
            Error::Busy(_) | Error::Throttled(_) => Code::Busy,
            Error::StorageFull => Code::StorageFull,
            Error::BadChunk(_) => Code::BadChunk,
            Error::HashMismatch => Code::HashMismatch,
            Error::Unavailable(_) | Error::Timeout(_) | Error::Connection(_) => Code::Unavailable,
            Error::Storage(_) => Code::LocalError,
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

    /// The reply to a request line that does not parse: a syntax error (500)
    /// when the line is no request at all, a bad argument (501) otherwise.
    pub fn from_parse(e: ParseError) -> Error {
        match e {
            ParseError::UnknownVerb(_) | ParseError::Empty | ParseError::UnterminatedQuote => {
                Error::Syntax(e.to_string())
            }
            _ => Error::BadArgument(e.to_string()),
        }
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
            _ if transfer::error::disk_full(&err) => Error::StorageFull,
            _ => Error::Storage(err),
        }
    }
}
