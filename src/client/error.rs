//! The client's own errors: what went wrong on this side, what the server
//! answered, and what stopped a transfer, in the client's words.

use std::path::Path;
use std::sync::Arc;

use crate::transfer;

/// What went wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    /// The server answered with an error reply.
    #[error("{text} ({code})")]
    Server { code: u16, text: String },
    #[error("{0}")]
    Local(String),
    #[error("server broke the protocol: {0}")]
    Protocol(String),
    #[error("connection lost: {0}")]
    Connection(String),
    #[error("{0}")]
    Verify(String),
    /// The session did not open: its greeting or the login (or
    /// registration) sent with the first request refused it, or the
    /// connection failed before they were read. The client keeps the
    /// error and gives it again for every later request.
    #[error("{0}")]
    Login(Arc<ClientError>),
}

impl ClientError {
    /// Whether reconnecting and running the same transfer again may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            ClientError::Connection(_) | ClientError::Connect { .. } => true,
            // 450: the server still holds the file for a session it has not
            // yet noticed is dead; it lets go within its I/O timeout.
            ClientError::Server { code, .. } => matches!(code, 421 | 450 | 453),
            _ => false,
        }
    }
}

/// What stopped a transfer or the connection, as the client reports it.
impl From<transfer::Error> for ClientError {
    fn from(e: transfer::Error) -> ClientError {
        use transfer::Error as T;
        match e {
            T::Connection(io) => ClientError::Connection(io.to_string()),
            T::Timeout(what) => ClientError::Connection(format!("{what} timed out")),
            T::LineTooLong => ClientError::Protocol("reply line too long".into()),
            T::NotText => ClientError::Protocol("reply is not valid UTF-8".into()),
            T::Protocol(p) => ClientError::Protocol(p),
            // Like the server's 453: the next attempt resumes before it.
            T::BadChunk(at) => ClientError::Server {
                code: 453,
                text: format!("chunk at offset {at} failed its hash check"),
            },
            T::HashMismatch => {
                ClientError::Verify("downloaded file's hash did not match the server's".into())
            }
            T::Aborted => ClientError::Protocol("the server gave up sending the file".into()),
            T::File(io) if transfer::error::disk_full(&io) => {
                ClientError::Local(format!("the local disk is full: {io}"))
            }
            T::File(io) => ClientError::Local(format!("local file: {io}")),
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

pub(super) fn local_err(path: &Path, e: std::io::Error) -> ClientError {
    ClientError::Local(format!("{}: {e}", path.display()))
}
