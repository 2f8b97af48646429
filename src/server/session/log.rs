//! What a session writes to the log: one line per request, in the log's
//! schema (see `logging::schema`). A command gets one `command` line from
//! the loop, with what its handler noted; a login, a registration and a
//! transfer write their own line instead, which the [`Note`] records so
//! that no request is logged twice.

use std::net::SocketAddr;
use std::time::Instant;

use tracing::info;

use crate::error::Error;
use crate::protocol::{self, VPath};
use crate::server::Server;
use crate::server::live::TransferInfo;

/// What the request being handled tells the log, beside its verb and how
/// it ended.
#[derive(Default)]
pub(super) struct Note {
    /// The first path the request named, and the second (a rename's target).
    pub path: Option<VPath>,
    pub to: Option<VPath>,
    /// Bytes the request moved or freed.
    pub bytes: Option<u64>,
    /// Entries a listing returned.
    pub entries: Option<u64>,
    /// A result that is neither `ok` nor a failure (a `STAT` of nothing: `absent`).
    pub result: Option<&'static str>,
    /// The handler wrote the request's line itself.
    pub logged: bool,
    /// A transfer id not yet announced to the client (see `protocol`).
    pub transfer: Option<String>,
}

impl Note {
    /// Records a path the request resolved.
    pub fn resolved(&mut self, path: &VPath) {
        match self.path {
            None => self.path = Some(path.clone()),
            Some(_) => self.to = Some(path.clone()),
        }
    }
}

/// Who a line is about.
#[derive(Clone, Copy)]
pub(super) struct Who<'a> {
    pub peer: SocketAddr,
    pub user: Option<&'a str>,
}

/// The `command` line of a request, ok or failed.
pub(super) fn command(who: Who<'_>, request: &str, note: &Note, ms: u64, failed: Option<&Error>) {
    let path = note.path.as_ref().map(VPath::to_string);
    let to = note.to.as_ref().map(VPath::to_string);
    let (peer, user) = (who.peer, who.user);
    let (path, to) = (path.as_deref(), to.as_deref());
    match failed {
        None => info!(event = "command", peer = %peer, user, request, path, to, bytes = note.bytes,
                      entries = note.entries, result = note.result.unwrap_or("ok"), ms, "command"),
        Some(e) => info!(event = "command", peer = %peer, user, request, path, to,
                         result = "failed", code = e.reply_code().number(), error = %e, ms, "command failed"),
    }
}

/// How a transfer ended: `ok`, `failed` (after it started) or `refused`
/// (before its first byte).
pub(super) struct Ended<'a> {
    pub result: &'static str,
    /// File bytes moved in this transfer (past its offset).
    pub bytes: u64,
    pub hash: Option<blake3::Hash>,
    pub error: Option<&'a Error>,
    pub ms: u64,
}

impl<'a> Ended<'a> {
    pub fn new(
        result: &'static str,
        bytes: u64,
        outcome: std::result::Result<blake3::Hash, &'a Error>,
        started: Instant,
    ) -> Ended<'a> {
        Ended {
            result,
            bytes,
            hash: outcome.ok(),
            error: outcome.err(),
            ms: started.elapsed().as_millis() as u64,
        }
    }
}

/// The one line of a transfer, and its count in the metrics.
pub(super) fn transfer(
    server: &Server,
    who: Who<'_>,
    request: &str,
    t: &TransferInfo,
    end: Ended<'_>,
) {
    server.metrics.transfer(t.direction, end.result);
    let (peer, user, id, path) = (who.peer, who.user, t.id.as_str(), t.path.as_str());
    let hash = end.hash.map(|h| protocol::hex(&h));
    let message = match (t.direction, end.result) {
        ("up", "refused") => "upload refused",
        ("up", _) => "upload",
        (_, "refused") => "download refused",
        _ => "download",
    };
    let code = end.error.map(|e| e.reply_code().number());
    let error = end.error.map(ToString::to_string);
    info!(event = "transfer", peer = %peer, user, request, id, path, size = t.size, offset = t.offset,
          bytes = end.bytes, hash = hash.as_deref(), ms = end.ms, result = end.result, code,
          error = error.as_deref(), message);
}
