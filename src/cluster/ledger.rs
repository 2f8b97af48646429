//! The quota ledger's [`Book`] in the shared database.
//!
//! A change of a user's account runs in one transaction that locks the
//! user's `usage` row (`SELECT … FOR UPDATE`): it reads what the home holds
//! and the reservations that count (parked ones, and running ones of nodes
//! whose lease runs), lets the caller check its limits and change the disk,
//! then writes what changed. Every node's changes of one account queue on
//! that row, so no two can both pass a limit; the reservation of an upload
//! and its settlement when the file lands are each one such transaction.
//!
//! Upload locks are rows of `upload_locks` naming their node: taken by an
//! insert that fails while a live node holds the row, and taken over from a
//! node only a whole lease after its lease ran out. A node that can't
//! renew its lease fences itself long before that ([`Cluster::fenced`]):
//! it cuts its uploads and changes no home, so two nodes never write one
//! upload. Session counts are rows per node and user.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use deadpool_postgres::Transaction;
use tokio_postgres::types::ToSql;
use tracing::warn;

use super::{Cached as _, Cluster, Unavailable};
use crate::error::{Error, Result};
use crate::protocol::VPath;
use crate::store::quota::{Account, Book, Reservation, Scan, Usage};

/// Rows of nodes whose lease runs: whose running work still counts.
const LIVE: &str = "SELECT id FROM nodes WHERE lease_until > now()";

/// The ledger's book in the database. Clones share one state.
#[derive(Debug, Clone)]
pub struct Shared {
    cluster: Arc<Cluster>,
    /// The upload locks this node holds: checked first, so that two
    /// sessions on this node never both take one.
    held: Arc<Mutex<HashSet<(String, VPath)>>>,
    /// Open sessions on this node, per user: what its rows in `sessions`
    /// must say.
    sessions: Arc<Mutex<HashMap<String, i32>>>,
    /// Users whose home changed while their numbers could not be written:
    /// rebuilt from the disk at their next login here.
    dirty: Arc<Mutex<HashSet<String>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn new(cluster: Arc<Cluster>) -> Shared {
        Shared {
            cluster,
            held: Arc::default(),
            sessions: Arc::default(),
            dirty: Arc::default(),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashSet<(String, VPath)>> {
        lock(&self.held)
    }

    /// An error while this node may have lost its lease (see
    /// [`Cluster::fenced`]): no home changes, no upload starts or lands.
    fn not_fenced(&self) -> Result<()> {
        match self.cluster.fenced() {
            true => Err(Error::Unavailable(crate::cluster::UNAVAILABLE.into())),
            false => Ok(()),
        }
    }

    /// Counts `by` more sessions of `user` here; returns how many there were.
    fn count_session(&self, user: &str, by: i32) -> i32 {
        let mut sessions = lock(&self.sessions);
        let n = sessions.entry(user.to_string()).or_default();
        let before = *n;
        *n += by;
        if *n <= 0 {
            sessions.remove(user);
        }
        before
    }

    fn sessions_here(&self, user: &str) -> i32 {
        lock(&self.sessions).get(user).copied().unwrap_or(0)
    }

    /// Records a session of `user` in the database. For the user's first
    /// session on this node (or after a change whose numbers were lost),
    /// the account is rebuilt from a scan of the disk first (see [`rebuild`]).
    fn open_session_row(
        &self,
        user: &str,
        first_here: bool,
        scan: &mut dyn FnMut() -> std::io::Result<Scan>,
    ) -> Result<()> {
        let cluster = &self.cluster;
        if first_here || lock(&self.dirty).contains(user) {
            let generation = cluster
                .wait(async {
                    let client = cluster.client().await?;
                    let row = client
                        .row_opt("SELECT generation FROM usage WHERE name = $1", &[&user])
                        .await?;
                    Ok(row.map(|r| r.get::<_, i64>(0)))
                })
                .map_err(unavailable)?;
            // Scanned outside any lock: a big home takes a while.
            let fresh = scan().map_err(Error::Storage)?;
            let rebuilt = cluster
                .wait(rebuild(cluster, user, generation, &fresh))
                .map_err(unavailable)?;
            if rebuilt {
                lock(&self.dirty).remove(user);
            }
        }
        cluster
            .wait(async {
                let client = cluster.client().await?;
                client
                    .exec(
                        "INSERT INTO sessions (node, name, count) VALUES ($1, $2, 1)
                         ON CONFLICT (node, name)
                         DO UPDATE SET count = sessions.count + 1, updated = now()",
                        &[&cluster.node(), &user],
                    )
                    .await?;
                Ok(())
            })
            .map_err(unavailable)
    }

    /// Brings this node's rows in line with what it really holds, every
    /// third of its lease: a write lost while the database was away (a
    /// session's end, a released lock or reservation) would otherwise hold
    /// for as long as this node lives.
    pub async fn reconcile_forever(self) {
        loop {
            tokio::time::sleep(self.cluster.lease / 3).await;
            if let Err(e) = self.reconcile().await {
                tracing::debug!(event = "cluster", error = %e, "cannot reconcile this node's rows");
            }
        }
    }

    async fn reconcile(&self) -> Result<(), Unavailable> {
        let client = self.cluster.client().await?;
        // Rows written from here on are the present's; older ones must
        // match what this node holds (taken before `since` if they do).
        let since: std::time::SystemTime = client.row("SELECT now()", &[]).await?.get(0);
        let (names, paths): (Vec<String>, Vec<String>) = self
            .held()
            .iter()
            .map(|(u, p)| (u.clone(), p.to_string()))
            .unzip();
        let sessions: Vec<(String, i32)> = lock(&self.sessions)
            .iter()
            .map(|(u, n)| (u.clone(), *n))
            .collect();
        let node = self.cluster.node();
        let not_held = "NOT EXISTS (SELECT 1 FROM unnest($3::text[], $4::text[]) AS h (name, path)
                         WHERE h.name = t.name AND h.path = t.path)";
        for (table, stamp) in [("upload_locks", "taken"), ("reservations", "updated")] {
            client
                .exec(
                    &format!(
                        "DELETE FROM {table} AS t WHERE t.node = $1 AND t.{stamp} < $2 AND {not_held}"
                    ),
                    &[&node, &since, &names, &paths],
                )
                .await?;
        }
        let (users, counts): (Vec<String>, Vec<i32>) = sessions.into_iter().unzip();
        // Session rows written since `since` are newer than the snapshot.
        client
            .exec(
                "DELETE FROM sessions
                 WHERE node = $1 AND NOT (name = ANY($2)) AND updated < $3",
                &[&node, &users, &since],
            )
            .await?;
        client
            .exec(
                "INSERT INTO sessions (node, name, count)
                 SELECT $1, u.name, u.count FROM unnest($2::text[], $3::int[]) AS u (name, count)
                 ON CONFLICT (node, name) DO UPDATE SET count = EXCLUDED.count
                 WHERE sessions.updated < $4",
                &[&node, &users, &counts, &since],
            )
            .await?;
        Ok(())
    }
}

fn unavailable(e: Unavailable) -> Error {
    e.into()
}

fn u64_of(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Locks `user`'s row and reads the account as it stands.
async fn read_account(tx: &Transaction<'_>, user: &str) -> Result<Account, Unavailable> {
    // One statement makes the row if need be and locks it either way (an
    // upsert's update locks the row as FOR UPDATE would).
    let lock = "INSERT INTO usage (name) VALUES ($1)
         ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
         RETURNING bytes, entries";
    let reservations = format!(
        "SELECT path, bytes, entries, node IS NULL FROM reservations
         WHERE name = $1 AND (node IS NULL OR node IN ({LIVE}))"
    );
    let (lock, reservations) =
        tokio::join!(tx.prepare_cached(lock), tx.prepare_cached(&reservations));
    let (lock, reservations) = (lock?, reservations?);
    // Both prepared, each query goes out when first polled, and `join`
    // polls them in order: the reservations are read after the lock is
    // taken (statements on one connection run in the order sent), in one
    // round trip. Sent the other way round, they would be read before
    // the lock, from an older snapshot than the row: a landing that
    // committed meanwhile would count twice.
    let name: [&(dyn ToSql + Sync); 1] = [&user];
    let (row, rows) =
        futures_util::future::join(tx.query_one(&lock, &name), tx.query(&reservations, &name))
            .await;
    // The first statement's error is the cause; the second's would only
    // say the transaction was aborted.
    let (row, rows) = (row?, rows?);
    let stored = Usage {
        bytes: u64_of(row.get(0)),
        entries: u64_of(row.get(1)),
    };
    let mut reserved = HashMap::new();
    for row in rows {
        let path: String = row.get(0);
        let Ok(path) = VPath::resolve(&VPath::root(), &path, usize::MAX) else {
            continue;
        };
        let charge = Usage {
            bytes: u64_of(row.get(1)),
            entries: u64_of(row.get(2)),
        };
        reserved.insert(
            path,
            Reservation {
                charge,
                parked: row.get(3),
            },
        );
    }
    Ok(Account { stored, reserved })
}

/// Writes what changed from `before` to `after`.
async fn write_account(
    tx: &Transaction<'_>,
    node: &str,
    user: &str,
    before: &Account,
    after: &Account,
) -> Result<(), Unavailable> {
    if before == after {
        return Ok(());
    }
    let (bytes, entries) = (i64_of(after.stored.bytes), i64_of(after.stored.entries));
    let usage: [&(dyn ToSql + Sync); 3] = [&user, &bytes, &entries];
    let stored = tx.exec(
        "UPDATE usage SET bytes = $2, entries = $3, generation = generation + 1
         WHERE name = $1",
        &usage,
    );
    let gone: Vec<String> = before
        .reserved
        .keys()
        .filter(|path| !after.reserved.contains_key(*path))
        .map(VPath::to_string)
        .collect();
    // (path, holder, bytes, entries) of each reservation made or changed.
    let changed: Vec<(String, Option<&str>, i64, i64)> = after
        .reserved
        .iter()
        .filter(|(path, r)| before.reserved.get(*path) != Some(*r))
        .map(|(path, r)| {
            let holder = (!r.parked).then_some(node);
            (
                path.to_string(),
                holder,
                i64_of(r.charge.bytes),
                i64_of(r.charge.entries),
            )
        })
        .collect();
    let gone: Vec<[&(dyn ToSql + Sync); 2]> = gone.iter().map(|p| [&user as _, p as _]).collect();
    let changed: Vec<[&(dyn ToSql + Sync); 5]> = changed
        .iter()
        .map(|(p, h, b, e)| [&user as _, p as _, h as _, b as _, e as _])
        .collect();
    let deletes = gone.iter().map(|params| {
        tx.exec(
            "DELETE FROM reservations WHERE name = $1 AND path = $2",
            params,
        )
    });
    let upserts = changed.iter().map(|params| {
        tx.exec(
            "INSERT INTO reservations (name, path, node, bytes, entries)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (name, path) DO UPDATE
             SET node = EXCLUDED.node, bytes = EXCLUDED.bytes, entries = EXCLUDED.entries,
                 updated = now()",
            params,
        )
    });
    // Sent together on the transaction's one connection: one round trip
    // for them all (they touch different rows: their order does not matter).
    let (stored, deletes, upserts) = tokio::join!(
        stored,
        futures_util::future::join_all(deletes),
        futures_util::future::join_all(upserts),
    );
    // In order: the first error is the cause.
    stored?;
    for done in deletes.into_iter().chain(upserts) {
        done?;
    }
    Ok(())
}

/// Live sessions of `user` on the nodes other than `node`.
async fn sessions_elsewhere(
    tx: &Transaction<'_>,
    user: &str,
    node: &str,
) -> Result<i64, Unavailable> {
    let row = tx
        .row(
            &format!(
                "SELECT coalesce(sum(count), 0)::bigint FROM sessions
                 WHERE name = $1 AND node <> $2 AND node IN ({LIVE})"
            ),
            &[&user, &node],
        )
        .await?;
    Ok(row.get(0))
}

/// Rebuilds `user`'s account from `scan` of the disk, if nothing changed
/// it since `generation` was read (before the scan): what the home holds,
/// and a full charge for each unfinished upload with a journal. Running
/// uploads of live nodes keep their reservations. Returns whether it was
/// applied (if not, a change meanwhile kept the numbers right anyway).
async fn rebuild(
    cluster: &Cluster,
    user: &str,
    generation: Option<i64>,
    scan: &Scan,
) -> Result<bool, Unavailable> {
    let mut client = cluster.client().await?;
    let tx = client.transaction().await?;
    let before = read_account(&tx, user).await?;
    let row = tx
        .row("SELECT generation FROM usage WHERE name = $1", &[&user])
        .await?;
    if generation.is_some_and(|g| g != row.get::<_, i64>(0)) {
        return Ok(false);
    }
    let mut after = scan.account();
    for (path, r) in &before.reserved {
        if !r.parked {
            after.reserved.insert(path.clone(), *r);
        }
    }
    // Rows of dead nodes are not in `before`: they go with the parked ones.
    tx.exec(
        &format!(
            "DELETE FROM reservations WHERE name = $1 AND (node IS NULL OR node NOT IN ({LIVE}))"
        ),
        &[&user],
    )
    .await?;
    let parked = Account {
        stored: before.stored,
        reserved: before
            .reserved
            .into_iter()
            .filter(|(_, r)| !r.parked)
            .collect(),
    };
    write_account(&tx, cluster.node(), user, &parked, &after).await?;
    tx.commit().await?;
    Ok(true)
}

impl Book for Shared {
    fn with_account(&self, user: &str, f: &mut dyn FnMut(&mut Account) -> bool) -> Result<()> {
        let cluster = &self.cluster;
        self.not_fenced()?;
        let node = cluster.node();
        let mut applied = false;
        let result = cluster.wait_unbounded(async {
            // Waiting for a connection and the account's lock is bounded;
            // once `f` changed the disk, the numbers are written to the end.
            let mut client = cluster.in_time(cluster.client()).await?;
            let tx = cluster
                .in_time(async { Ok(client.transaction().await?) })
                .await?;
            let before = cluster.in_time(read_account(&tx, user)).await?;
            let mut after = before.clone();
            applied = true;
            if f(&mut after) {
                write_account(&tx, node, user, &before, &after).await?;
                tx.commit().await?;
            }
            Ok(())
        });
        match result {
            Ok(()) => Ok(()),
            // The change on disk is made; only its numbers were not written.
            // The account is rebuilt from the disk at the user's next login here.
            Err(e) if applied => {
                warn!(event = "error", user, error = %e, "a change of a home was made but its usage not recorded");
                lock(&self.dirty).insert(user.to_string());
                Ok(())
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    fn open_session(
        &self,
        user: &str,
        scan: &mut dyn FnMut() -> std::io::Result<Scan>,
    ) -> Result<()> {
        // Counted here first: this node's count is never below its row's.
        let first_here = self.count_session(user, 1) == 0;
        let opened = self.open_session_row(user, first_here, scan);
        if opened.is_err() {
            self.count_session(user, -1);
        }
        opened
    }

    fn close_session(&self, user: &str) {
        let cluster = &self.cluster;
        let closed = cluster.wait(async {
            let client = cluster.client().await?;
            client
                .exec(
                    "UPDATE sessions SET count = count - 1, updated = now()
                     WHERE node = $1 AND name = $2",
                    &[&cluster.node(), &user],
                )
                .await?;
            client
                .exec(
                    "DELETE FROM sessions WHERE node = $1 AND name = $2 AND count <= 0",
                    &[&cluster.node(), &user],
                )
                .await?;
            Ok(())
        });
        self.count_session(user, -1);
        if let Err(e) = closed {
            warn!(event = "error", user, error = %e, "cannot record the end of a session");
        }
    }

    fn has_sessions(&self, user: &str) -> Result<bool> {
        if self.sessions_here(user) > 0 {
            return Ok(true);
        }
        let cluster = &self.cluster;
        cluster
            .wait(async {
                let mut client = cluster.client().await?;
                let tx = client.transaction().await?;
                Ok(sessions_elsewhere(&tx, user, cluster.node()).await? > 0)
            })
            .map_err(unavailable)
    }

    fn release(&self, user: &str, path: &VPath) {
        let cluster = &self.cluster;
        let released = cluster.wait(async {
            let client = cluster.client().await?;
            client
                .exec(
                    "DELETE FROM reservations WHERE name = $1 AND path = $2",
                    &[&user, &path.to_string()],
                )
                .await?;
            Ok(())
        });
        if let Err(e) = released {
            warn!(event = "error", user, path = %path, error = %e, "cannot release a reservation");
        }
    }

    fn lock_upload(&self, user: &str, path: &VPath) -> Result<bool> {
        self.not_fenced()?;
        let key = (user.to_string(), path.clone());
        if !self.held().insert(key.clone()) {
            return Ok(false);
        }
        let cluster = &self.cluster;
        // A row of this node not in `held` is left from a release that
        // failed: it is taken back like a dead node's.
        let taken = cluster.wait(async {
            let client = cluster.client().await?;
            let rows = client
                .rows(
                    "INSERT INTO upload_locks (name, path, node) VALUES ($1, $2, $3)
                     ON CONFLICT (name, path) DO UPDATE SET node = EXCLUDED.node, taken = now()
                     WHERE upload_locks.node = EXCLUDED.node
                        OR upload_locks.node NOT IN (
                            SELECT id FROM nodes
                            WHERE lease_until > now() - make_interval(secs => $4))
                     RETURNING 1",
                    &[
                        &user,
                        &path.to_string(),
                        &cluster.node(),
                        &cluster.lease().as_secs_f64(),
                    ],
                )
                .await?;
            Ok(!rows.is_empty())
        });
        if !matches!(taken, Ok(true)) {
            self.held().remove(&key);
        }
        taken.map_err(unavailable)
    }

    fn unlock_upload(&self, user: &str, path: &VPath) {
        let cluster = &self.cluster;
        let freed = cluster.wait(async {
            let client = cluster.client().await?;
            client
                .exec(
                    "DELETE FROM upload_locks WHERE name = $1 AND path = $2 AND node = $3",
                    &[&user, &path.to_string(), &cluster.node()],
                )
                .await?;
            Ok(())
        });
        if let Err(e) = freed {
            // The row stays until this node takes it again or its lease ends.
            warn!(event = "error", user, path = %path, error = %e, "cannot release an upload lock");
        }
        self.held().remove(&(user.to_string(), path.clone()));
    }

    fn alone(&self) -> bool {
        false
    }
}
