//! The file and directory commands. Each resolves its paths in the user's
//! home and does its work on the blocking pool; the ones that change what
//! the home holds do it under the account's lock (see `store::quota`).

use super::{Session, blocking, quoted};
use crate::error::{Error, Result};
use crate::protocol::{self, Code, VPath};
use crate::store::quota::{Limits, Usage};
use crate::store::upload;
use crate::transfer::connection::Stream;

/// One file or directory, as the entry limit counts it.
const ONE_ENTRY: Usage = Usage {
    bytes: 0,
    entries: 1,
};

impl<S: Stream> Session<S> {
    pub(super) async fn pwd(&mut self) -> Result<()> {
        self.note.path = Some(self.cwd.clone());
        self.reply(Code::Path, &quoted(&self.cwd)).await
    }

    pub(super) async fn cwd(&mut self, arg: Option<String>) -> Result<()> {
        let path = match arg {
            Some(a) => self.resolve(&a)?,
            None => VPath::root(),
        };
        self.note.path = Some(path.clone());
        let home = self.logged_in()?.home.clone();
        let p = path.clone();
        blocking(move || home.check_dir(&p)).await?;
        self.cwd = path;
        self.reply(Code::Path, &quoted(&self.cwd)).await
    }

    pub(super) async fn list(&mut self, arg: Option<String>) -> Result<()> {
        let path = match arg {
            Some(a) => self.resolve(&a)?,
            None => self.cwd.clone(),
        };
        self.note.path = Some(path.clone());
        let max = self.server.config.limits.max_list_entries;
        let home = self.logged_in()?.home.clone();
        let (entries, truncated) = blocking(move || home.list(&path, max)).await?;
        for e in &entries {
            self.conn
                .write_line(&Code::Status.continued(&e.to_line()))
                .await?;
        }
        let more = if truncated { " (truncated)" } else { "" };
        self.note.entries = Some(entries.len() as u64);
        self.reply(Code::Status, &format!("{} entries{more}", entries.len()))
            .await
    }

    /// `STAT`: a path that names nothing is answered 550, as an answer
    /// (`absent` in the log), not as a failure: clients ask to learn
    /// whether something is there.
    pub(super) async fn stat(&mut self, arg: String) -> Result<()> {
        let path = self.resolve(&arg)?;
        let home = self.logged_in()?.home.clone();
        match blocking(move || home.stat(&path)).await {
            Ok(entry) => self.reply(Code::Status, &entry.to_line()).await,
            Err(e @ (Error::NotFound(_) | Error::NotADirectory(_))) => {
                self.note.result = Some("absent");
                self.reply(e.reply_code(), &e.to_string()).await
            }
            Err(e) => Err(e),
        }
    }

    pub(super) async fn hash(&mut self, arg: String) -> Result<()> {
        let path = self.resolve(&arg)?;
        let home = self.logged_in()?.home.clone();
        let hash = blocking(move || {
            let file = home.open_read(&path)?;
            let mut h = blake3::Hasher::new();
            h.update_reader(&file)
                .map_err(|e| Error::fs(e, &path.to_string()))?;
            Ok(h.finalize())
        })
        .await?;
        self.reply(Code::Status, &protocol::hex(&hash)).await
    }

    pub(super) async fn mkd(&mut self, arg: String) -> Result<()> {
        let path = self.resolve(&arg)?;
        let owner = self.logged_in()?.clone();
        let p = path.clone();
        blocking(move || {
            owner.ledger.with(&owner.name, |a| {
                a.check_add(ONE_ENTRY, owner.limits)?;
                owner.home.mkdir(&p)?;
                a.added(ONE_ENTRY);
                Ok(())
            })
        })
        .await?;
        self.reply(Code::Path, &quoted(&path)).await
    }

    pub(super) async fn rmd(&mut self, arg: String) -> Result<()> {
        let path = self.resolve(&arg)?;
        // Removing the working directory (or one above it) would leave the session nowhere.
        if !path.is_root() && format!("{}/", self.cwd).starts_with(&format!("{path}/")) {
            return Err(Error::BadArgument(format!(
                "{path}: is the working directory"
            )));
        }
        let owner = self.logged_in()?.clone();
        blocking(move || {
            owner.ledger.with(&owner.name, |a| {
                owner.home.rmdir(&path)?;
                a.removed(ONE_ENTRY);
                Ok(())
            })
        })
        .await?;
        self.reply(Code::Ok, "directory removed").await
    }

    pub(super) async fn dele(&mut self, arg: String) -> Result<()> {
        let path = self.resolve(&arg)?;
        let owner = self.logged_in()?.clone();
        let _busy = self.lock_upload(&path)?;
        let freed = blocking(move || {
            owner.ledger.with(&owner.name, |a| {
                let bytes = owner.home.remove_file(&path)?;
                a.removed(Usage { bytes, entries: 1 });
                Ok(bytes)
            })
        })
        .await?;
        self.note.bytes = Some(freed);
        self.reply(Code::Ok, "file removed").await
    }

    pub(super) async fn rename(&mut self, from: String, to: String) -> Result<()> {
        let (from, to) = (self.resolve(&from)?, self.resolve(&to)?);
        let owner = self.logged_in()?.clone();
        let _busy = self.lock_upload(&from)?;
        let f = from.clone();
        let target = blocking(move || {
            owner.ledger.with(&owner.name, |a| {
                let (target, replaced) = owner.home.rename(&f, &to)?;
                if let Some(bytes) = replaced {
                    a.removed(Usage { bytes, entries: 1 });
                }
                Ok(target)
            })
        })
        .await?;
        self.note.to = Some(target.clone());
        self.reply(Code::Ok, &format!("renamed to {}", quoted(&target)))
            .await
    }

    pub(super) async fn quota(&mut self) -> Result<()> {
        let owner = self.logged_in()?;
        let (used, (unfinished, count)) = owner
            .ledger
            .with(&owner.name, |a| Ok((a.used(), a.unfinished())))?;
        let Limits { bytes, entries } = owner.limits;
        let text = format!(
            "{} {bytes} {} {entries} {} {count}",
            used.bytes, used.entries, unfinished.bytes
        );
        self.reply(Code::Status, &text).await
    }

    pub(super) async fn parts(&mut self) -> Result<()> {
        let owner = self.logged_in()?.clone();
        let parts = blocking(move || upload::unfinished(&owner).map_err(Error::Storage)).await?;
        for p in &parts {
            let line = format!(
                "{} {} {} {}",
                p.size,
                p.verified,
                p.updated,
                protocol::quote(&p.target)
            );
            self.conn.write_line(&Code::Status.continued(&line)).await?;
        }
        self.reply(Code::Status, &format!("{} unfinished uploads", parts.len()))
            .await
    }

    pub(super) async fn mtime(&mut self, arg: String, mtime: u64) -> Result<()> {
        let path = self.resolve(&arg)?;
        let home = self.logged_in()?.home.clone();
        blocking(move || home.set_mtime(&path, mtime)).await?;
        self.reply(Code::Ok, "modification time set").await
    }

    pub(super) async fn discard(&mut self, arg: String) -> Result<()> {
        let path = self.resolve(&arg)?;
        let owner = self.logged_in()?.clone();
        let size = blocking(move || upload::discard(&owner, &path)).await?;
        self.note.bytes = Some(size);
        self.reply(Code::Ok, "unfinished upload discarded").await
    }
}
