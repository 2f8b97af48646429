//! Several nodes, one service: the state that every promise across sessions
//! rests on (accounts, quota usage and reservations, upload locks, sessions
//! per user, failure counters and bans, registration counts) kept in one
//! PostgreSQL database instead of `var/users.toml` and one process's memory.
//! The bytes stay on disk, under a `var_dir` that all nodes share.
//!
//! - Each node has a row in `nodes` with a lease it renews every third of
//!   `cluster.lease_secs` ([`Cluster::heartbeat`]). What a node holds for
//!   running work (reservations of running uploads, upload locks, session
//!   counts) names the node and counts only while its lease runs: a node
//!   killed outright holds quota and locks for one lease at most.
//! - A user's quota account is one row of `usage`: every change of what a
//!   home holds runs in a transaction that holds that row `FOR UPDATE`,
//!   checks the limits against the usage and the live reservations, makes
//!   the change on disk and writes the new numbers (see `ledger`).
//! - The schema is created and upgraded at start by versioned migrations
//!   under an advisory lock (`schema`), safe when several nodes start at once.
//! - The database failing is an error of the request at hand ("service
//!   unavailable"), never of the node: the pool opens new connections once
//!   the database is back.
//!
//! The store's code is synchronous (it runs on the blocking pool, beside the
//! file system calls it orders); [`Cluster::wait`] runs a query from there.

pub mod accounts;
pub mod defences;
pub mod ledger;
mod schema;

use std::future::Future;
use std::str::FromStr as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use tokio::runtime::Handle;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;
use tracing::{info, warn};

use crate::config::ClusterSection;

/// The database could not answer: the request fails, the node goes on.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the service is unavailable (its database: {0})")]
pub struct Unavailable(pub String);

impl From<tokio_postgres::Error> for Unavailable {
    fn from(e: tokio_postgres::Error) -> Unavailable {
        Unavailable(match e.as_db_error() {
            Some(db) => db.message().to_string(),
            None => e.to_string(),
        })
    }
}

impl From<deadpool_postgres::PoolError> for Unavailable {
    fn from(e: deadpool_postgres::PoolError) -> Unavailable {
        Unavailable(e.to_string())
    }
}

pub type Result<T, E = Unavailable> = std::result::Result<T, E>;

/// What a client is told when the database fails it: that the service is
/// unavailable, not the database's own words (the log has those).
pub const UNAVAILABLE: &str = "the service is unavailable; try again later";

impl From<Unavailable> for crate::error::Error {
    fn from(e: Unavailable) -> crate::error::Error {
        warn!(event = "cluster", error = %e, "a request failed on the database");
        crate::error::Error::Unavailable(UNAVAILABLE.into())
    }
}

/// A node's handle on the shared database.
pub struct Cluster {
    pool: Pool,
    heartbeat_pool: Pool,
    /// This node's id in `nodes`: random, new at each start.
    node: String,
    /// The runtime the pool's connections live on.
    handle: Handle,
    lease: Duration,
    /// The longest any one call waits for the database.
    deadline: Duration,
    /// When the last renewal of this node's lease that succeeded began.
    renewed: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.node).finish()
    }
}

impl Cluster {
    /// Connects to `url` and brings the schema up to date. Must run with
    /// the runtime entered.
    pub fn open(url: &str, settings: &ClusterSection) -> Result<Arc<Cluster>, String> {
        let mut pg = tokio_postgres::Config::from_str(url)
            .map_err(|e| format!("cluster.database is not a valid PostgreSQL URL: {e}"))?;
        let connect = Duration::from_millis(settings.connect_timeout_ms);
        // A connection to a database that vanished without a word (a
        // partition, a lost primary) is found dead within about 16 s, not
        // the kernel's 11 minutes: the pool then opens a new one.
        pg.connect_timeout(connect)
            .keepalives_idle(Duration::from_secs(10))
            .keepalives_interval(Duration::from_secs(2))
            .keepalives_retries(3)
            .options(format!(
                "-c statement_timeout={} -c lock_timeout={}",
                settings.statement_timeout_ms, settings.statement_timeout_ms
            ))
            .application_name("ftpx");
        let tls = tls(settings)?;
        let pool = |size: usize| {
            let manager_config = ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            };
            let manager = match tls.clone() {
                Some(tls) => Manager::from_config(pg.clone(), tls, manager_config),
                None => Manager::from_config(pg.clone(), tokio_postgres::NoTls, manager_config),
            };
            Pool::builder(manager)
                .max_size(size)
                .runtime(Runtime::Tokio1)
                .wait_timeout(Some(connect))
                .create_timeout(Some(connect))
                .recycle_timeout(Some(connect))
                .build()
                .map_err(|e| format!("cannot set up the database pool: {e}"))
        };
        let cluster = Arc::new(Cluster {
            pool: pool(settings.pool_size - 1)?,
            // The lease's own connection, one of pool_size: never queued
            // behind busy sessions.
            heartbeat_pool: pool(1)?,
            node: format!("{:016x}", rand::random::<u64>()),
            handle: Handle::current(),
            lease: Duration::from_secs(settings.lease_secs),
            deadline: connect + Duration::from_millis(settings.statement_timeout_ms),
            renewed: Mutex::new(None),
        });
        let c = cluster.clone();
        let started = cluster.wait(async move { schema::migrate(&*c.client().await?).await });
        started.map_err(|e| format!("cannot start on the database: {e}"))?;
        Ok(cluster)
    }

    /// Registers this node as one running the service, and keeps its lease
    /// renewed while the runtime runs.
    pub fn join(self: &Arc<Self>) -> Result<(), String> {
        self.wait(self.renew())
            .map_err(|e| format!("cannot join the cluster: {e}"))?;
        tokio::spawn(self.clone().heartbeat());
        Ok(())
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Runs `f` to its end from synchronous code: a blocking-pool thread, a
    /// thread of the (multi-threaded) runtime, which hands its tasks to the
    /// others meanwhile, or a thread outside it. Bounded by the connect plus the
    /// statement timeout.
    pub fn wait<T>(&self, f: impl Future<Output = Result<T>>) -> Result<T> {
        self.wait_unbounded(self.in_time(f))
    }

    /// `f`, or an error once the connect plus the statement timeout passed.
    async fn in_time<T>(&self, f: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.deadline, f).await {
            Ok(r) => r,
            Err(_) => Err(Unavailable("no answer in time".into())),
        }
    }

    /// [`Cluster::wait`] without its deadline, for work that must not be
    /// cut in the middle: each statement is still bounded by the database's
    /// statement timeout, and a dead connection by its keepalives.
    fn wait_unbounded<T>(&self, f: impl Future<Output = Result<T>>) -> Result<T> {
        match Handle::try_current() {
            // A runtime or blocking-pool thread: block it, not the runtime.
            Ok(_) => tokio::task::block_in_place(|| self.handle.block_on(f)),
            Err(_) => self.handle.block_on(f),
        }
    }

    /// A connection from the pool.
    async fn client(&self) -> Result<Object> {
        Ok(self.pool.get().await?)
    }

    /// Renews this node's lease (creating its row after a start, or after
    /// the others pruned it), and prunes nodes whose lease ran out long ago:
    /// with them go their reservations, locks and session counts.
    async fn renew(&self) -> Result<()> {
        let began = Instant::now();
        let client = self.heartbeat_pool.get().await?;
        let lease = self.lease.as_secs_f64();
        client
            .exec(
                "INSERT INTO nodes (id, lease_until) VALUES ($1, now() + make_interval(secs => $2))
                 ON CONFLICT (id) DO UPDATE SET lease_until = EXCLUDED.lease_until",
                &[&self.node, &lease],
            )
            .await?;
        client
            .exec(
                "DELETE FROM nodes WHERE lease_until < now() - make_interval(secs => $1)",
                &[&lease],
            )
            .await?;
        *self.renewed.lock().unwrap_or_else(|e| e.into_inner()) = Some(began);
        Ok(())
    }

    /// Whether this node may have lost its lease: half of it has passed
    /// since the last renewal that succeeded began (the database counts the
    /// lease from later still). A fenced node writes no upload: the others
    /// take its uploads over only a whole lease after its lease ended.
    pub fn fenced(&self) -> bool {
        let renewed = *self.renewed.lock().unwrap_or_else(|e| e.into_inner());
        renewed.is_none_or(|t| t.elapsed() >= self.lease / 2)
    }

    /// How long a dead node's upload locks hold after its lease ended.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Renews this node's lease every third of it, for as long as the
    /// server runs; a failure is logged once per outage.
    async fn heartbeat(self: Arc<Self>) {
        let mut failing = false;
        loop {
            tokio::time::sleep(self.lease / 3).await;
            match tokio::time::timeout(self.deadline, self.renew()).await {
                Ok(Ok(())) => {
                    if failing {
                        info!(event = "cluster", node = %self.node, "database reachable again");
                    }
                    failing = false;
                }
                Ok(Err(e)) if !failing => {
                    warn!(event = "cluster", node = %self.node, error = %e, "cannot renew this node's lease");
                    failing = true;
                }
                Err(_) if !failing => {
                    warn!(event = "cluster", node = %self.node, "cannot renew this node's lease: no answer in time");
                    failing = true;
                }
                _ => {}
            }
        }
    }
}

/// The TLS connector for the database, when `ca_file` names its CA.
fn tls(
    settings: &ClusterSection,
) -> Result<Option<tokio_postgres_rustls::MakeRustlsConnect>, String> {
    if settings.ca_file.as_os_str().is_empty() {
        return Ok(None);
    }
    let mut config = crate::tls::client_config(&settings.ca_file)?;
    config.alpn_protocols.clear();
    Ok(Some(tokio_postgres_rustls::MakeRustlsConnect::new(config)))
}

/// The queries of this module, each prepared once per connection and kept
/// (a statement sent as text is parsed and planned anew each time, one more
/// round trip).
pub(crate) trait Cached: deadpool_postgres::GenericClient + Sync {
    fn exec(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<u64>> + Send {
        async move {
            let statement = self.prepare_cached(sql).await?;
            Ok(self.execute(&statement, params).await?)
        }
    }

    fn rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Vec<Row>>> + Send {
        async move {
            let statement = self.prepare_cached(sql).await?;
            Ok(self.query(&statement, params).await?)
        }
    }

    fn row(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Row>> + Send {
        async move {
            let statement = self.prepare_cached(sql).await?;
            Ok(self.query_one(&statement, params).await?)
        }
    }

    fn row_opt(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> impl Future<Output = Result<Option<Row>>> + Send {
        async move {
            let statement = self.prepare_cached(sql).await?;
            Ok(self.query_opt(&statement, params).await?)
        }
    }
}

impl<T: deadpool_postgres::GenericClient + Sync> Cached for T {}
