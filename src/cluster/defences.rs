//! The defender's shared half: failure counts and bans per (source,
//! account) pair and per source, and registration counts, in the shared
//! database, so that a ban by one node holds on all and a limit counts the
//! guesses of all. Each count moves in one atomic statement (an upsert with
//! its condition), never by reading then writing.
//!
//! A guess counts from its admission (`in_flight`) until it is settled: a
//! pair with `pair_max_failures` failures and guesses in flight gets no more
//! on any node until those land, so guesses sent at once to several nodes
//! get no more evaluated than the same guesses sent one by one. Counts run
//! over a window that starts at the pair's first failure (not a sliding
//! one), and start again when it is over or when a ban ends.
//!
//! Each node keeps its own defender too ([`crate::server::defender`]): it
//! slows failures down and bans first on its own; this half adds what the
//! nodes see together.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::{Cached as _, Cluster, Unavailable};
use crate::config::DefenderSection;

/// How a guess admitted by [`Defences::admit`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The password was right.
    Succeeded,
    Failed,
    /// Never evaluated (the client left, or no hashing turn came).
    Dropped,
}

/// What the shared counts say of a guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admitted,
    Banned,
    /// Over a limit only if the guesses in flight fail: ask again later.
    Wait,
}

#[derive(Debug)]
pub struct Defences {
    cluster: Arc<Cluster>,
    settings: DefenderSection,
}

impl Defences {
    pub fn new(cluster: Arc<Cluster>, settings: DefenderSection) -> Defences {
        Defences { cluster, settings }
    }

    fn window(&self) -> f64 {
        self.settings.window_secs as f64
    }

    fn ban(&self) -> f64 {
        self.settings.ban_secs as f64
    }

    fn pair_max(&self) -> i32 {
        self.settings.pair_max_failures.max(1) as i32
    }

    /// Counts a guess of `account` from `source` as in flight, if the pair
    /// and the source are not banned and the pair has room.
    pub async fn admit(&self, source: &str, account: &str) -> Result<Verdict, Unavailable> {
        let client = self.cluster.client().await?;
        let banned = client
            .row_opt(
                "SELECT 1 FROM source_bans WHERE source = $1 AND until > now()",
                &[&source],
            )
            .await?;
        if banned.is_some() {
            return Ok(Verdict::Banned);
        }
        // A window that is over, or a ban that ended, starts the counts again.
        // Over: a ban that ended, or a window with no ban that ended.
        let stale = "(guesses.banned_until <= now()
                      OR (guesses.banned_until IS NULL
                          AND guesses.window_start < now() - make_interval(secs => $3)))";
        let admitted = client
            .row_opt(
                &format!(
                    "INSERT INTO guesses (source, account, window_start, in_flight)
                     VALUES ($1, $2, now(), 1)
                     ON CONFLICT (source, account) DO UPDATE SET
                       window_start = CASE WHEN {stale} THEN now() ELSE guesses.window_start END,
                       failures = CASE WHEN {stale} THEN 0 ELSE guesses.failures END,
                       in_flight = CASE WHEN {stale} THEN 1 ELSE guesses.in_flight + 1 END,
                       banned_until = CASE WHEN {stale} THEN NULL ELSE guesses.banned_until END
                     WHERE {stale}
                        OR (guesses.banned_until IS NULL
                            AND guesses.failures + guesses.in_flight < $4)
                     RETURNING 1"
                ),
                &[&source, &account, &self.window(), &self.pair_max()],
            )
            .await?;
        if admitted.is_some() {
            return Ok(Verdict::Admitted);
        }
        let row = client
            .row(
                "SELECT banned_until IS NOT NULL AND banned_until > now()
                 FROM guesses WHERE source = $1 AND account = $2",
                &[&source, &account],
            )
            .await?;
        Ok(if row.get(0) {
            Verdict::Banned
        } else {
            Verdict::Wait
        })
    }

    /// Settles a guess admitted by [`Defences::admit`]: a failure counts,
    /// and may ban the pair or, failing on many accounts, the source; the
    /// right password clears the pair's failures, as on one node.
    pub async fn settle(
        &self,
        source: &str,
        account: &str,
        outcome: Outcome,
    ) -> Result<(), Unavailable> {
        let client = self.cluster.client().await?;
        let failed = outcome == Outcome::Failed;
        // 1 a failure, 0 a guess never evaluated, -1 the right password.
        let failures: i32 = match outcome {
            Outcome::Failed => 1,
            Outcome::Dropped => 0,
            Outcome::Succeeded => -1,
        };
        let row = client
            .row_opt(
                "UPDATE guesses SET
                   in_flight = greatest(in_flight - 1, 0),
                   failures = CASE WHEN $3 < 0 THEN 0 ELSE failures + $3 END,
                   banned_until = CASE
                     WHEN $3 > 0 AND failures + $3 >= $4 AND banned_until IS NULL
                     THEN now() + make_interval(secs => $5) ELSE banned_until END
                 WHERE source = $1 AND account = $2
                 RETURNING failures, banned_until IS NOT NULL AND failures = $4 AND $3 > 0",
                &[&source, &account, &failures, &self.pair_max(), &self.ban()],
            )
            .await?;
        if !failed {
            return Ok(());
        }
        if let Some(row) = row
            && row.get::<_, bool>(1)
        {
            warn!(event = "ban", source, user = %account, failures = row.get::<_, i32>(0), ban_secs = self.settings.ban_secs,
                  "banned on every node: too many failed logins for this account from this source");
        }
        client
            .exec(
                "INSERT INTO source_failures (source, account, at) VALUES ($1, $2, now())
                 ON CONFLICT (source, account) DO UPDATE SET at = now()",
                &[&source, &account],
            )
            .await?;
        let row = client
            .row(
                "SELECT count(*) FROM source_failures
                 WHERE source = $1 AND at > now() - make_interval(secs => $2)",
                &[&source, &self.window()],
            )
            .await?;
        let spread: i64 = row.get(0);
        if spread >= self.settings.source_max_accounts.max(1) as i64 {
            let banned = client
                .exec(
                    "INSERT INTO source_bans (source, until)
                     VALUES ($1, now() + make_interval(secs => $2))
                     ON CONFLICT (source) DO UPDATE SET until = EXCLUDED.until
                     WHERE source_bans.until <= now()",
                    &[&source, &self.ban()],
                )
                .await?;
            if banned > 0 {
                client
                    .exec("DELETE FROM source_failures WHERE source = $1", &[&source])
                    .await?;
                warn!(
                    event = "ban",
                    source,
                    accounts = spread,
                    ban_secs = self.settings.ban_secs,
                    "banned on every node: failed logins on many accounts from this source"
                );
            }
        }
        Ok(())
    }

    /// Drops the counts that no longer count, every minute, for as long as
    /// the server runs: the tables stay as small as the present attacks.
    pub async fn prune_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_secs(60)).await;
            if let Err(e) = self.prune().await {
                tracing::debug!(event = "cluster", error = %e, "cannot prune the shared counts");
            }
        }
    }

    async fn prune(&self) -> Result<(), Unavailable> {
        let client = self.cluster.client().await?;
        let window = self.window();
        client
            .exec(
                "DELETE FROM guesses WHERE in_flight = 0
                   AND (banned_until <= now()
                        OR (banned_until IS NULL
                            AND window_start < now() - make_interval(secs => $1)))",
                &[&window],
            )
            .await?;
        client
            .exec(
                "DELETE FROM source_failures WHERE at < now() - make_interval(secs => $1)",
                &[&window],
            )
            .await?;
        client
            .exec("DELETE FROM source_bans WHERE until <= now()", &[])
            .await?;
        client
            .exec(
                "DELETE FROM registrations WHERE window_start < now() - interval '1 hour'",
                &[],
            )
            .await?;
        Ok(())
    }

    /// Counts a registration from `source`; false if the source is over
    /// its limit per hour on all nodes together.
    pub async fn register(&self, source: &str) -> Result<bool, Unavailable> {
        let client = self.cluster.client().await?;
        let max = self.settings.registrations_per_hour as i32;
        let hour = Duration::from_secs(3600).as_secs_f64();
        let stale = "registrations.window_start < now() - make_interval(secs => $3)";
        let row = client
            .row_opt(
                &format!(
                    "INSERT INTO registrations (source, window_start, count)
                     SELECT $1, now(), 1 WHERE $2 > 0
                     ON CONFLICT (source) DO UPDATE SET
                       window_start = CASE WHEN {stale} THEN now() ELSE registrations.window_start END,
                       count = CASE WHEN {stale} THEN 1 ELSE registrations.count + 1 END
                     WHERE {stale} OR registrations.count < $2
                     RETURNING 1"
                ),
                &[&source, &max, &hour],
            )
            .await?;
        Ok(row.is_some())
    }
}
