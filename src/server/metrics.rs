//! The server's metrics, in the Prometheus text exposition format (written
//! by the `prometheus-client` crate). Counters move as events happen;
//! gauges of state kept elsewhere (sessions, bans, the hashing queue, the
//! bytes of unfinished uploads, transfers running) are read when scraped.
//! [`serve`] answers `GET /metrics` on `server.metrics_listen`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

use crate::server::Server;

/// Labels of a family: pairs of name and value.
type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    sessions_open: Gauge,
    logins: Family<Labels, Counter>,
    bans_active: Gauge,
    registrations: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
    transfers: Family<Labels, Counter>,
    transfers_active: Family<Labels, Gauge>,
    resumes: Family<Labels, Counter>,
    replies: Family<Labels, Counter>,
    hash_queue: Gauge,
    hash_wait: Histogram,
    quota_refusals: Counter,
    partial_bytes: Gauge,
    download_hashes: Family<Labels, Counter>,
    directory_syncs: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut m = Metrics {
            registry: Registry::with_prefix("ftpx"),
            sessions_open: Gauge::default(),
            logins: Family::default(),
            bans_active: Gauge::default(),
            registrations: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            transfers: Family::default(),
            transfers_active: Family::default(),
            resumes: Family::default(),
            replies: Family::default(),
            hash_queue: Gauge::default(),
            hash_wait: Histogram::new(exponential_buckets(0.001, 4.0, 9)),
            quota_refusals: Counter::default(),
            partial_bytes: Gauge::default(),
            download_hashes: Family::default(),
            directory_syncs: Counter::default(),
        };
        m.register();
        m
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "sessions_open",
            "Sessions open now (connected, logged in or not)",
            self.sessions_open.clone(),
        );
        r.register(
            "logins",
            "Logins, by result: ok, failed, banned",
            self.logins.clone(),
        );
        r.register(
            "bans_active",
            "Bans in force: (address, account) pairs and whole addresses",
            self.bans_active.clone(),
        );
        r.register(
            "registrations",
            "Accounts registered by clients",
            self.registrations.clone(),
        );
        r.register(
            "bytes_in",
            "File bytes received in uploads",
            self.bytes_in.clone(),
        );
        r.register(
            "bytes_out",
            "File bytes sent in downloads",
            self.bytes_out.clone(),
        );
        r.register(
            "transfers",
            "Transfers ended, by direction (up, down) and result (ok, failed, refused)",
            self.transfers.clone(),
        );
        r.register(
            "transfers_active",
            "Transfers running now, by direction",
            self.transfers_active.clone(),
        );
        r.register(
            "resumes",
            "Transfers that resumed from a verified offset, by direction",
            self.resumes.clone(),
        );
        r.register(
            "replies",
            "Final replies sent, by code",
            self.replies.clone(),
        );
        r.register(
            "hash_queue_length",
            "Logins and registrations waiting for a password hashing turn",
            self.hash_queue.clone(),
        );
        r.register(
            "hash_wait_seconds",
            "Time a login or registration waited for its hashing turn",
            self.hash_wait.clone(),
        );
        r.register(
            "quota_refusals",
            "Uploads and new entries refused by a quota or file limit",
            self.quota_refusals.clone(),
        );
        r.register(
            "partial_bytes",
            "Bytes held in unfinished uploads and their journals on disk",
            self.partial_bytes.clone(),
        );
        r.register(
            "download_hashes",
            "Downloads by where their chunk hashes came from: cached or computed",
            self.download_hashes.clone(),
        );
        r.register(
            "directory_syncs",
            "Directory fsyncs made to land uploads (small files landed together share one)",
            self.directory_syncs.clone(),
        );
    }

    pub fn session_opened(&self) {
        self.sessions_open.inc();
    }

    pub fn session_closed(&self) {
        self.sessions_open.dec();
    }

    /// A login's result: `ok`, `failed` or `banned`.
    pub fn login(&self, result: &'static str) {
        self.logins
            .get_or_create(&vec![("result", result.into())])
            .inc();
    }

    pub fn registered(&self) {
        self.registrations.inc();
    }

    /// File bytes moved: `up` (received) or `down` (sent).
    pub fn moved(&self, direction: &str, bytes: u64) {
        match direction {
            "up" => self.bytes_in.inc_by(bytes),
            _ => self.bytes_out.inc_by(bytes),
        };
    }

    /// A transfer began (`resumed`: from an offset past 0).
    pub fn transfer_started(&self, direction: &'static str, resumed: bool) {
        let labels = vec![("direction", direction.into())];
        self.transfers_active.get_or_create(&labels).inc();
        if resumed {
            self.resumes.get_or_create(&labels).inc();
        }
    }

    /// A transfer that was running ended.
    pub fn transfer_stopped(&self, direction: &'static str) {
        let labels = vec![("direction", direction.into())];
        self.transfers_active.get_or_create(&labels).dec();
    }

    /// A transfer's outcome: `ok`, `failed` or `refused`.
    pub fn transfer(&self, direction: &'static str, result: &'static str) {
        let labels = vec![("direction", direction.into()), ("result", result.into())];
        self.transfers.get_or_create(&labels).inc();
    }

    pub fn reply(&self, code: u16) {
        self.replies
            .get_or_create(&vec![("code", code.to_string())])
            .inc();
        if code == crate::protocol::Code::QuotaExceeded.number() {
            self.quota_refusals.inc();
        }
    }

    /// A download's chunk hashes: `cached` or `computed`.
    pub fn download_hashed(&self, source: &'static str) {
        self.download_hashes
            .get_or_create(&vec![("source", source.into())])
            .inc();
    }

    /// A directory was synced to make the uploads landed in it durable.
    pub fn directory_synced(&self) {
        self.directory_syncs.inc();
    }

    pub fn hash_waited(&self, wait: Duration) {
        self.hash_wait.observe(wait.as_secs_f64());
    }

    /// The exposition text, with the gauges of state read now.
    pub async fn render(server: &Arc<Server>) -> String {
        let m = &server.metrics;
        server.live.account_bytes(m);
        m.bans_active.set(server.defender.bans_active() as i64);
        m.hash_queue.set(server.turns.waiting() as i64);
        let root = server.config.partial_dir();
        let held = tokio::task::spawn_blocking(move || bytes_under(&root, 2))
            .await
            .unwrap_or(0);
        m.partial_bytes.set(i64::try_from(held).unwrap_or(i64::MAX));
        let mut text = String::new();
        if encode(&mut text, &m.registry).is_err() {
            text.clear();
        }
        text
    }
}

/// Bytes of the regular files under `dir`, `depth` levels down at most.
fn bytes_under(dir: &Path, depth: u32) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        match entry.file_type() {
            Ok(t) if t.is_file() => total += entry.metadata().map_or(0, |m| m.len()),
            Ok(t) if t.is_dir() && depth > 0 => total += bytes_under(&entry.path(), depth - 1),
            _ => {}
        }
    }
    total
}

/// Answers `GET /metrics` on `listener` until the task is dropped: one
/// request per connection, plain HTTP/1.1, at most [`MAX_SCRAPES`] at once
/// and each within 10 s.
pub async fn serve(listener: TcpListener, server: Arc<Server>) {
    let scrapes = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    loop {
        let Ok(permit) = scrapes.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(event = "error", error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &server)).await;
            drop(permit);
        });
    }
}

/// Connections to the metrics listener served at once.
const MAX_SCRAPES: usize = 16;

/// Binds the metrics listener, if one is set.
pub async fn bind(server: &Arc<Server>) -> Result<Option<TcpListener>, String> {
    let Some(addr) = server.config.metrics_addr()? else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    info!(event = "start", address = %local, "metrics listening");
    Ok(Some(listener))
}

/// Reads one request head (at most 8 KiB) and answers it.
async fn answer(mut stream: TcpStream, server: &Arc<Server>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > 8192 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let first = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let words: Vec<&[u8]> = first.split(|&b| b == b' ').collect();
    let (status, kind, body) = match words.as_slice() {
        [b"GET", b"/metrics", _] => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            Metrics::render(server).await,
        ),
        [b"GET", ..] => (
            "404 Not Found",
            "text/plain",
            "only /metrics is here\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
