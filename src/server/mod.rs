//! The server: accepts TCP connections, enforces the session limits, runs
//! the TLS handshake under its deadline and hands each client to a
//! [`session`](crate::server::session) task. Beside them, the sweeper clears expired
//! unfinished uploads on a timer. On the stop signal it stops accepting,
//! tells idle sessions, gives running transfers a grace period, and returns,
//! saying what it waits for (in the log, and to the caller of
//! [`run_reporting`]).

pub mod control;
pub mod defender;
pub mod kick;
pub mod live;
pub mod metrics;
pub mod session;
pub mod turns;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::cluster::Cluster;
use crate::cluster::defences::{Defences, Verdict};
use crate::config::Config;
use crate::server::defender::{Attempt, Banned, Defender, Source};
use crate::server::turns::{Turn, Turns};
use crate::store::quota::Ledger;
use crate::store::users::UserDb;
use crate::transfer::cache::ChunkCache;

/// What all sessions share.
pub struct Server {
    pub config: Config,
    pub users: UserDb,
    /// Quotas, and the one upload lock per user and path.
    pub ledger: Arc<Ledger>,
    pub defender: Defender,
    /// With several nodes: the shared database, and the defender's shared half.
    pub cluster: Option<Arc<Cluster>>,
    defences: Option<Arc<Defences>>,
    /// Turns to hash a password, shared fairly between sources: bounds the
    /// hashes computed at once (each takes 128 MiB at the default cost).
    pub turns: Turns,
    sessions: Mutex<Sessions>,
    /// The sessions open now, for `ftpx status` and `ftpx kick`.
    pub live: Arc<live::Live>,
    pub metrics: metrics::Metrics,
    /// Chunk hashes of files sent, for downloads of unchanged files.
    pub hashes: ChunkCache,
    /// The budget of all sessions for downloads planned ahead of their
    /// turn: files open, and KiB read.
    pub read_ahead_files: Arc<tokio::sync::Semaphore>,
    pub read_ahead_kib: Arc<tokio::sync::Semaphore>,
    /// A hash with the configured cost, checked for unknown users so that
    /// they cost the same as a wrong password.
    pub dummy_hash: String,
}

#[derive(Default)]
struct Sessions {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Holds a session's place in the limits; gives it back when dropped.
pub struct SessionSlot {
    server: Arc<Server>,
    ip: IpAddr,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        let mut s = self
            .server
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                s.per_ip.remove(&self.ip);
            }
        }
    }
}

impl Server {
    /// The server of `config`; with `[cluster]`, connected to its database
    /// (which must be reachable at start). Runs inside the runtime.
    pub fn new(config: Config) -> Result<Server, String> {
        let cluster = match config.cluster.url() {
            Some(url) => Some(Cluster::open(&url, &config.cluster)?),
            None => None,
        };
        let (users, ledger, defences) = match &cluster {
            None => (UserDb::new(&config.server.var_dir), Ledger::default(), None),
            Some(c) => {
                let accounts = Arc::new(crate::cluster::accounts::Accounts::new(c.clone()));
                c.join()?;
                tokio::spawn(accounts.clone().watch());
                info!(event = "cluster", node = c.node(), "joined the cluster");
                (
                    UserDb::with_records(&config.server.var_dir, accounts),
                    {
                        let book = crate::cluster::ledger::Shared::new(c.clone());
                        tokio::spawn(book.clone().reconcile_forever());
                        Ledger::new(Box::new(book))
                    },
                    {
                        let defences = Arc::new(Defences::new(c.clone(), config.defender.clone()));
                        tokio::spawn(defences.clone().prune_forever());
                        Some(defences)
                    },
                )
            }
        };
        // A damaged user database stops the server at start, with the reason.
        if cluster.is_none() {
            users.load()?;
        }
        let dummy_hash = crate::store::users::hash_password(
            &crate::store::users::Password::new("ftpx-dummy"),
            &config.accounts,
        )?;
        Ok(Server {
            turns: Turns::new(config.accounts.hash_concurrency),
            users,
            ledger: Arc::new(ledger),
            defender: Defender::new(config.defender.clone()),
            cluster,
            defences,
            sessions: Mutex::new(Sessions::default()),
            live: Arc::default(),
            metrics: metrics::Metrics::new(),
            hashes: ChunkCache::new(config.transfer.hash_cache.0),
            read_ahead_files: Arc::new(tokio::sync::Semaphore::new(
                config
                    .limits
                    .read_ahead_files
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            read_ahead_kib: Arc::new(tokio::sync::Semaphore::new(
                usize::try_from(config.limits.read_ahead.0 / 1024)
                    .unwrap_or(usize::MAX)
                    .min(tokio::sync::Semaphore::MAX_PERMITS),
            )),
            dummy_hash,
            config,
        })
    }

    fn take_slot(self: &Arc<Self>, ip: IpAddr) -> Result<SessionSlot, &'static str> {
        let mut s = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if s.total >= self.config.limits.max_sessions {
            return Err("too many sessions on this server");
        }
        let n = s.per_ip.entry(ip).or_default();
        if *n >= self.config.limits.max_sessions_per_ip {
            return Err("too many sessions from your address");
        }
        *n += 1;
        s.total += 1;
        Ok(SessionSlot {
            server: self.clone(),
            ip,
        })
    }

    /// A turn to hash a password for a client at `ip`, in its source's turn
    /// (see [`crate::server::turns`]). A login that can't get one within the login
    /// timeout is told the server is busy, rather than queueing on after its
    /// client has given up.
    pub async fn hash_permit(&self, ip: IpAddr) -> crate::error::Result<Turn<'_>> {
        let asked = std::time::Instant::now();
        let turn =
            tokio::time::timeout(self.config.login_timeout(), self.turns.take(Source::of(ip)))
                .await;
        self.metrics.hash_waited(asked.elapsed());
        turn.map_err(|_| busy())
    }

    /// Admits a guess of `user`'s password from `ip`, or refuses it as
    /// banned (see [`Defender::admit`]). A guess that waits longer than the
    /// login timeout for the guesses before it is told the server is busy.
    /// With several nodes the guess must also be admitted by the shared
    /// counts ([`Defences::admit`]), waiting as the local defender does.
    pub async fn admit(
        &self,
        ip: IpAddr,
        user: &str,
    ) -> crate::error::Result<Result<Attempt<'_>, Banned>> {
        let admit = async {
            let mut attempt = match self.defender.admit(ip, user).await {
                Ok(attempt) => attempt,
                Err(banned) => return Ok(Err(banned)),
            };
            if let Some(shared) = &self.defences {
                let (source, account) = attempt.key();
                loop {
                    let verdict = shared
                        .admit(&source, &account)
                        .await
                        .map_err(crate::error::Error::from)?;
                    match verdict {
                        Verdict::Admitted => break,
                        Verdict::Banned => return Ok(Err(Banned)),
                        Verdict::Wait => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                attempt.share(shared.clone());
            }
            Ok(Ok(attempt))
        };
        tokio::time::timeout(self.config.login_timeout(), admit)
            .await
            .map_err(|_| busy())?
    }

    /// Counts a registration from `ip`: false when its source is over the
    /// hourly limit (on this node, or on all nodes together).
    pub async fn may_register(&self, ip: IpAddr) -> crate::error::Result<bool> {
        if !self.defender.register(ip) {
            return Ok(false);
        }
        match &self.defences {
            None => Ok(true),
            Some(shared) => shared
                .register(&Source::of(ip).to_string())
                .await
                .map_err(crate::error::Error::from),
        }
    }

    /// Where a user's unfinished uploads and their journals live.
    pub fn partial_dir(&self, user: &str) -> PathBuf {
        self.config.partial_dir().join(user)
    }
}

/// What runs beside the sessions: for the operator, the metrics listener,
/// the control socket, and the log file's reopening on SIGHUP; with several
/// nodes, the [`fence`]. Stopped
/// (and the socket removed) when dropped.
pub struct Beside {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Beside {
    pub async fn start(
        server: &Arc<Server>,
        log: crate::logging::CappedFile,
    ) -> Result<Beside, String> {
        let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| format!("cannot handle SIGHUP: {e}"))?;
        let mut tasks = vec![tokio::spawn(reopen_on_sighup(hup, log))];
        if let Some(listener) = metrics::bind(server).await? {
            tasks.push(tokio::spawn(metrics::serve(listener, server.clone())));
        }
        if server.cluster.is_some() {
            tasks.push(tokio::spawn(fence(server.clone())));
        }
        if let Some(path) = server.config.control_socket() {
            let socket = control::bind(path)?;
            tasks.push(tokio::spawn(control::serve(socket, server.clone())));
        }
        Ok(Beside { tasks })
    }
}

impl Drop for Beside {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// With several nodes: while this node may have lost its lease (see
/// [`Cluster::fenced`]), cuts every upload running here, each within a
/// second, so that no other node can take one over while this one writes.
/// They stay resumable, through any node.
async fn fence(server: Arc<Server>) {
    let Some(cluster) = server.cluster.clone() else {
        return;
    };
    let mut fenced = false;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if !cluster.fenced() {
            fenced = false;
            continue;
        }
        let cut = server.live.kick_uploads();
        if !fenced || cut > 0 {
            warn!(
                event = "cluster",
                node = cluster.node(),
                uploads = cut as u64,
                "this node may have lost its lease: its uploads are cut until it renews it"
            );
        }
        fenced = true;
    }
}

/// Reopens the log file at each SIGHUP (logrotate moved it away).
async fn reopen_on_sighup(mut hup: tokio::signal::unix::Signal, log: crate::logging::CappedFile) {
    while hup.recv().await.is_some() {
        match log.reopen() {
            Ok(()) => info!(event = "log_reopened", "log file reopened"),
            Err(e) => warn!(event = "error", error = %e, "cannot reopen the log file"),
        }
    }
}

fn busy() -> crate::error::Error {
    crate::error::Error::Unavailable("server busy checking passwords; try again later".into())
}

/// What [`run_reporting`] tells its caller while it stops, for the
/// operator's terminal (the log has the same, always).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopping {
    /// The stop signal came; `sessions` still run and get up to `grace`.
    Waiting { sessions: usize, grace: Duration },
    /// The grace period is over; the `sessions` still running are closed.
    GraceOver { sessions: usize },
}

/// Serves on `listener` until `shutdown` resolves, then drains sessions.
pub async fn run(
    listener: TcpListener,
    server: Arc<Server>,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    run_reporting(listener, server, tls, shutdown, |_| {}).await
}

/// [`run`], telling `report` what it waits for once `shutdown` resolves.
pub async fn run_reporting(
    listener: TcpListener,
    server: Arc<Server>,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
    mut report: impl FnMut(Stopping),
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let (stop_tx, stop_rx) = watch::channel(false);
    // Before the first client: no upload can be running, so whatever a
    // crash left behind goes.
    // At the start of the only node no upload runs; another node's may.
    sweep(&server, server.ledger.alone()).await;
    let sweeper = tokio::spawn(sweep_on_a_timer(server.clone()));
    let mut sessions = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let (server, acceptor, stop) = (server.clone(), acceptor.clone(), stop_rx.clone());
                    sessions.spawn(async move { handle(tcp, peer, server, acceptor, stop).await });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(event = "error", error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    drop(listener);
    sweeper.abort();
    // Sessions that ended but were not collected yet are not waited for.
    while sessions.try_join_next().is_some() {}
    let grace = Duration::from_secs(server.config.limits.shutdown_grace_secs);
    info!(
        event = "shutdown",
        sessions = sessions.len(),
        grace_secs = grace.as_secs(),
        "shutting down"
    );
    report(Stopping::Waiting {
        sessions: sessions.len(),
        grace,
    });
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(grace, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            event = "shutdown",
            sessions = sessions.len(),
            "grace period over, closing the remaining sessions"
        );
        report(Stopping::GraceOver {
            sessions: sessions.len(),
        });
        sessions.shutdown().await;
    }
    info!(event = "shutdown", "stopped");
    Ok(())
}

/// Sweeps the unfinished uploads of every user (see [`crate::store::upload::sweep`]).
async fn sweep(server: &Arc<Server>, at_start: bool) {
    let s = server.clone();
    let _ = tokio::task::spawn_blocking(move || {
        crate::store::upload::sweep(
            &s.ledger,
            &s.config.partial_dir(),
            s.config.partial_ttl(),
            at_start,
        )
    })
    .await;
}

/// Sweeps every `partial_sweep_secs`.
async fn sweep_on_a_timer(server: Arc<Server>) {
    let every = std::time::Duration::from_secs(server.config.transfer.partial_sweep_secs);
    loop {
        tokio::time::sleep(every).await;
        sweep(&server, false).await;
    }
}

async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    server: Arc<Server>,
    acceptor: TlsAcceptor,
    stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let slot = server.take_slot(peer.ip());
    let handshake =
        tokio::time::timeout(server.config.handshake_timeout(), acceptor.accept(tcp)).await;
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            info!(event = "connect", peer = %peer, result = "failed", error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            info!(event = "connect", peer = %peer, result = "failed", error = "timed out", "TLS handshake timed out");
            return;
        }
    };
    if tls.get_ref().1.alpn_protocol() != Some(crate::protocol::ALPN) {
        // A client of another protocol (or none named): never answer it (ALPACA).
        info!(event = "connect", peer = %peer, result = "failed", error = "no ALPN ftpx/1",
              "TLS client did not ask for the ftpx protocol (ALPN); closing");
        return;
    }
    let seat = server.live.join(peer);
    let stream = kick::Kickable::new(tls, seat.entry.kick.clone());
    let mut conn = crate::transfer::connection::Connection::new(stream, server.config.io_timeout());
    let slot = match slot {
        Ok(slot) => slot,
        Err(why) => {
            info!(event = "connect", peer = %peer, result = "refused", error = why, "session refused");
            server
                .metrics
                .reply(crate::protocol::Code::Unavailable.number());
            let _ = conn.reply(crate::protocol::Code::Unavailable, why).await;
            conn.shutdown().await;
            return;
        }
    };
    crate::server::session::run_seated(conn, seat, server, stop).await;
    drop(slot);
}
