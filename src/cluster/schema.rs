//! The tables, created and upgraded at start by numbered migrations. Each
//! runs once, in its own transaction, under an advisory lock, so that nodes
//! starting together apply it once; a database newer than this binary is
//! refused rather than misread.

use tokio_postgres::Client;

use super::{Result, Unavailable};

/// Any key: it only has to be the same on every node.
const MIGRATION_LOCK: i64 = 0x6674_7078_0001;

/// The migrations, in order; the schema's version is how many have run.
/// Never edit one that has shipped: add the next.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "
    CREATE TABLE nodes (
        id          text PRIMARY KEY,
        started     timestamptz NOT NULL DEFAULT now(),
        lease_until timestamptz NOT NULL
    );
    CREATE TABLE accounts (
        name      text PRIMARY KEY,
        hash      text NOT NULL,
        quota     bigint NOT NULL CHECK (quota >= 0),
        max_files bigint CHECK (max_files >= 0),
        created   bigint NOT NULL
    );
    -- Bumped by every change of an account: open sessions take the change in.
    CREATE TABLE account_revision (
        id integer PRIMARY KEY CHECK (id = 1),
        n  bigint NOT NULL
    );
    INSERT INTO account_revision VALUES (1, 0);
    -- What each home holds; the row each change of a home locks.
    -- generation: bumped by every change, so that a rebuild from a scan of
    -- the disk is applied only if nothing changed while it scanned.
    CREATE TABLE usage (
        name       text PRIMARY KEY,
        bytes      bigint NOT NULL DEFAULT 0,
        entries    bigint NOT NULL DEFAULT 0,
        generation bigint NOT NULL DEFAULT 0
    );
    -- Unfinished uploads: running on a node (node set, counted while its
    -- lease runs) or parked to be resumed (node null, charged in full).
    CREATE TABLE reservations (
        name    text NOT NULL,
        path    text NOT NULL,
        node    text REFERENCES nodes (id) ON DELETE CASCADE,
        bytes   bigint NOT NULL,
        entries bigint NOT NULL,
        updated timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (name, path)
    );
    CREATE TABLE upload_locks (
        name text NOT NULL,
        path text NOT NULL,
        node text NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
        taken timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (name, path)
    );
    CREATE TABLE sessions (
        node    text NOT NULL REFERENCES nodes (id) ON DELETE CASCADE,
        name    text NOT NULL,
        count   integer NOT NULL,
        updated timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (node, name)
    );
    -- Password guesses per (source, account) in the current window:
    -- failures, and guesses admitted and not yet settled.
    CREATE TABLE guesses (
        source       text NOT NULL,
        account      text NOT NULL,
        window_start timestamptz NOT NULL,
        failures     integer NOT NULL DEFAULT 0,
        in_flight    integer NOT NULL DEFAULT 0,
        banned_until timestamptz,
        PRIMARY KEY (source, account)
    );
    -- Accounts that failed from a source, for password spraying.
    CREATE TABLE source_failures (
        source text NOT NULL,
        account text NOT NULL,
        at timestamptz NOT NULL,
        PRIMARY KEY (source, account)
    );
    CREATE TABLE source_bans (
        source text PRIMARY KEY,
        until  timestamptz NOT NULL
    );
    CREATE TABLE registrations (
        source       text PRIMARY KEY,
        window_start timestamptz NOT NULL,
        count        integer NOT NULL
    );
    ",
];

/// Brings the schema up to date.
pub async fn migrate(client: &Client) -> Result<()> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply(client).await;
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    result?;
    unlocked?;
    Ok(())
}

async fn apply(client: &Client) -> Result<()> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS ftpx_schema (
                version integer PRIMARY KEY,
                applied timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await?;
    let row = client
        .query_one("SELECT coalesce(max(version), 0) FROM ftpx_schema", &[])
        .await?;
    let current: i32 = row.get(0);
    let known = MIGRATIONS.len() as i32;
    if current > known {
        return Err(Unavailable(format!(
            "the database's schema is version {current}, newer than this ftpx knows ({known}); upgrade ftpx"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i32 + 1;
        let sql =
            format!("BEGIN; {sql}; INSERT INTO ftpx_schema (version) VALUES ({version}); COMMIT;");
        if let Err(e) = client.batch_execute(&sql).await {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e.into());
        }
        tracing::info!(event = "cluster", version, "database schema upgraded");
    }
    Ok(())
}
