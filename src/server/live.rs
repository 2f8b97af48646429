//! Who is on: the sessions open now, each with its user and the transfer
//! it runs, for `ftpx status`, the metrics, and `ftpx kick`, which ends a
//! user's sessions through their [`Kick`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use crate::server::kick::Kick;
use crate::server::metrics::Metrics;

/// The sessions open now.
#[derive(Default)]
pub struct Live {
    sessions: Mutex<HashMap<u64, Arc<Entry>>>,
    next: AtomicU64,
}

/// One session, as the board shows it.
pub struct Entry {
    peer: SocketAddr,
    since: u64,
    user: Mutex<Option<String>>,
    transfer: Mutex<Option<Running>>,
    pub kick: Arc<Kick>,
}

/// A transfer running in a session.
struct Running {
    id: String,
    path: String,
    direction: &'static str,
    size: u64,
    offset: u64,
    started: Instant,
    /// Bytes done, from the transfer's own progress.
    progress: ProgressBar,
    /// Bytes past `offset` already added to the metrics' byte counters.
    counted: u64,
}

impl Running {
    /// Adds the bytes moved since the last count to the byte counters.
    fn count(&mut self, metrics: &Metrics) {
        let done = self.progress.position().saturating_sub(self.offset);
        metrics.moved(self.direction, done.saturating_sub(self.counted));
        self.counted = self.counted.max(done);
    }
}

/// A session's place on the board; leaves it when dropped.
pub struct Seat {
    live: Arc<Live>,
    id: u64,
    pub entry: Arc<Entry>,
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.live.lock().remove(&self.id);
    }
}

impl Seat {
    pub fn peer(&self) -> SocketAddr {
        self.entry.peer
    }
}

/// A new transfer id: 16 hex digits, random, so that ids from different
/// runs and nodes don't meet.
pub fn new_transfer_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Live {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Entry>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts a new session from `peer` on the board.
    pub fn join(self: &Arc<Self>, peer: SocketAddr) -> Seat {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            peer,
            since: crate::clock::now_secs(),
            user: Mutex::default(),
            transfer: Mutex::default(),
            kick: Arc::default(),
        });
        self.lock().insert(id, entry.clone());
        Seat {
            live: self.clone(),
            id,
            entry,
        }
    }

    /// Ends every session of `user`; returns how many there were.
    pub fn kick(&self, user: &str) -> usize {
        let sessions: Vec<Arc<Entry>> = self.lock().values().cloned().collect();
        let mine = sessions
            .iter()
            .filter(|e| e.user().as_deref() == Some(user));
        mine.map(|e| e.kick.kick()).count()
    }

    /// Ends every session with an upload running; returns how many.
    pub fn kick_uploads(&self) -> usize {
        let sessions: Vec<Arc<Entry>> = self.lock().values().cloned().collect();
        let uploading = sessions.iter().filter(|e| {
            let transfer = e.transfer.lock().unwrap_or_else(|e| e.into_inner());
            transfer.as_ref().is_some_and(|t| t.direction == "up")
        });
        uploading.map(|e| e.kick.kick()).count()
    }

    /// Adds the bytes the running transfers moved since the last count.
    pub fn account_bytes(&self, metrics: &Metrics) {
        for entry in self.lock().values() {
            if let Some(t) = entry.running().as_mut() {
                t.count(metrics);
            }
        }
    }

    /// Every session, oldest first.
    pub fn status(&self) -> Vec<SessionStatus> {
        let mut all: Vec<(u64, Arc<Entry>)> =
            self.lock().iter().map(|(id, e)| (*id, e.clone())).collect();
        all.sort_by_key(|(id, _)| *id);
        all.iter().map(|(_, e)| e.status()).collect()
    }
}

impl Entry {
    fn user(&self) -> Option<String> {
        self.user.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.transfer.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn logged_in(&self, user: &str) {
        *self.user.lock().unwrap_or_else(|e| e.into_inner()) = Some(user.to_string());
    }

    /// A transfer starts; `progress` counts its bytes from `offset` on.
    pub fn transfer_started(&self, t: &TransferInfo, progress: &ProgressBar, metrics: &Metrics) {
        progress.set_length(t.size);
        progress.set_position(t.offset);
        *self.running() = Some(Running {
            id: t.id.clone(),
            path: t.path.clone(),
            direction: t.direction,
            size: t.size,
            offset: t.offset,
            started: Instant::now(),
            progress: progress.clone(),
            counted: 0,
        });
        metrics.transfer_started(t.direction, t.offset > 0);
    }

    /// The transfer ended: its last bytes are counted.
    pub fn transfer_stopped(&self, metrics: &Metrics) {
        if let Some(mut t) = self.running().take() {
            t.count(metrics);
            metrics.transfer_stopped(t.direction);
        }
    }

    fn status(&self) -> SessionStatus {
        let transfer = self.running().as_ref().map(|t| {
            let done = t.progress.position();
            let secs = t.started.elapsed().as_secs_f64();
            let rate = match secs > 0.0 {
                true => (done.saturating_sub(t.offset) as f64 / secs) as u64,
                false => 0,
            };
            TransferStatus {
                id: t.id.clone(),
                direction: t.direction.to_string(),
                path: t.path.clone(),
                done,
                size: t.size,
                rate,
            }
        });
        SessionStatus {
            user: self.user(),
            peer: self.peer.to_string(),
            since: self.since,
            transfer,
        }
    }
}

/// What a transfer is, as the log, the board and the client see it.
pub struct TransferInfo {
    pub id: String,
    pub path: String,
    /// `up` or `down`.
    pub direction: &'static str,
    pub size: u64,
    pub offset: u64,
}

/// One session, as `ftpx status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionStatus {
    /// None before login.
    pub user: Option<String>,
    pub peer: String,
    /// Unix seconds when it connected.
    pub since: u64,
    pub transfer: Option<TransferStatus>,
}

/// A transfer running now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransferStatus {
    pub id: String,
    /// `up` or `down`.
    pub direction: String,
    pub path: String,
    /// Bytes of the file done (a resumed transfer starts at its offset).
    pub done: u64,
    pub size: u64,
    /// Bytes a second since it started.
    pub rate: u64,
}
