//! The accounts' [`Records`] in the shared database: one row per account in
//! `accounts`, and a revision number that every change or removal bumps in
//! the same transaction, which each node polls so that open sessions take a changed
//! quota in (as a single node notices a new `users.toml`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;

use super::{Cached as _, Cluster, Unavailable};
use crate::store::users::{Records, User};

/// How often a node reads the revision of the accounts.
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug)]
pub struct Accounts {
    cluster: Arc<Cluster>,
    /// The last revision read, plus one (0: none read yet).
    revision: AtomicU64,
}

fn text(e: Unavailable) -> String {
    e.to_string()
}

fn user_of(row: &Row) -> User {
    User {
        name: row.get(0),
        hash: row.get(1),
        quota: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
        max_files: row
            .get::<_, Option<i64>>(3)
            .map(|n| u64::try_from(n).unwrap_or(0)),
        created: u64::try_from(row.get::<_, i64>(4)).unwrap_or(0),
    }
}

fn i64_of(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

const COLUMNS: &str = "name, hash, quota, max_files, created";

async fn bump(client: &impl GenericClient) -> Result<(), Unavailable> {
    client
        .exec("UPDATE account_revision SET n = n + 1 WHERE id = 1", &[])
        .await?;
    Ok(())
}

/// Adds `user` unless the name is taken; 1 if added, else 0.
async fn insert_new(client: &impl GenericClient, user: &User) -> Result<u64, Unavailable> {
    client
        .exec(
            &format!(
                "INSERT INTO accounts ({COLUMNS}) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name) DO NOTHING"
            ),
            &[
                &user.name,
                &user.hash,
                &i64_of(user.quota),
                &user.max_files.map(i64_of),
                &i64_of(user.created),
            ],
        )
        .await
}

impl Accounts {
    pub fn new(cluster: Arc<Cluster>) -> Accounts {
        Accounts {
            cluster,
            revision: AtomicU64::new(0),
        }
    }

    async fn read_revision(&self) -> Result<u64, Unavailable> {
        let client = self.cluster.client().await?;
        let row = client
            .row("SELECT n FROM account_revision WHERE id = 1", &[])
            .await?;
        Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0) + 1)
    }

    /// Keeps the revision current, for as long as the server runs.
    pub async fn watch(self: Arc<Self>) {
        loop {
            if let Ok(n) = self.read_revision().await {
                self.revision.store(n, Ordering::Relaxed);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Adds the accounts of `users` whose names are not taken; returns how
    /// many were added.
    pub fn import(&self, users: &[User]) -> Result<usize, String> {
        let cluster = &self.cluster;
        cluster
            .wait(async {
                let mut client = cluster.client().await?;
                let tx = client.transaction().await?;
                let mut added = 0;
                for u in users {
                    added += insert_new(&tx, u).await? as usize;
                }
                bump(&tx).await?;
                tx.commit().await?;
                Ok(added)
            })
            .map_err(text)
    }
}

impl Records for Accounts {
    fn load(&self) -> Result<Vec<User>, String> {
        let cluster = &self.cluster;
        cluster
            .wait(async {
                let client = cluster.client().await?;
                let rows = client
                    .rows(
                        &format!("SELECT {COLUMNS} FROM accounts ORDER BY name"),
                        &[],
                    )
                    .await?;
                Ok(rows.iter().map(user_of).collect())
            })
            .map_err(text)
    }

    fn find(&self, name: &str) -> Result<Option<User>, String> {
        let cluster = &self.cluster;
        cluster
            .wait(async {
                let client = cluster.client().await?;
                let row = client
                    .row_opt(
                        &format!("SELECT {COLUMNS} FROM accounts WHERE name = $1"),
                        &[&name],
                    )
                    .await?;
                Ok(row.as_ref().map(user_of))
            })
            .map_err(text)
    }

    fn version(&self) -> Option<u64> {
        match self.revision.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }

    fn insert(&self, user: &User, free: &dyn Fn(&str) -> Result<(), String>) -> Result<(), String> {
        let cluster = &self.cluster;
        let inserted = cluster.wait(async {
            let mut client = cluster.client().await?;
            let tx = client.transaction().await?;
            if let Err(e) = free(&user.name) {
                return Ok(Err(e));
            }
            let n = insert_new(&tx, user).await?;
            if n == 0 {
                return Ok(Err(format!("user {:?} already exists", user.name)));
            }
            // A new account changes no open session: no revision bump.
            tx.commit().await?;
            Ok(Ok(()))
        });
        inserted.map_err(text)?
    }

    fn delete(&self, name: &str) -> Result<(), String> {
        let cluster = &self.cluster;
        let deleted = cluster.wait(async {
            let mut client = cluster.client().await?;
            let tx = client.transaction().await?;
            let n = tx
                .exec("DELETE FROM accounts WHERE name = $1", &[&name])
                .await?;
            bump(&tx).await?;
            tx.commit().await?;
            Ok(n)
        });
        match deleted.map_err(text)? {
            0 => Err(format!("no user {name:?}")),
            _ => Ok(()),
        }
    }

    fn update(&self, name: &str, f: &dyn Fn(&mut User)) -> Result<(), String> {
        let cluster = &self.cluster;
        let updated = cluster.wait(async {
            let mut client = cluster.client().await?;
            let tx = client.transaction().await?;
            let Some(row) = tx
                .row_opt(
                    &format!("SELECT {COLUMNS} FROM accounts WHERE name = $1 FOR UPDATE"),
                    &[&name],
                )
                .await?
            else {
                return Ok(false);
            };
            let mut user = user_of(&row);
            f(&mut user);
            tx.exec(
                "UPDATE accounts SET hash = $2, quota = $3, max_files = $4 WHERE name = $1",
                &[
                    &name,
                    &user.hash,
                    &i64_of(user.quota),
                    &user.max_files.map(i64_of),
                ],
            )
            .await?;
            bump(&tx).await?;
            tx.commit().await?;
            Ok(true)
        });
        match updated.map_err(text)? {
            true => Ok(()),
            false => Err(format!("no user {name:?}")),
        }
    }
}
