//! GET: the server's end of a download, from the offer the client's resume
//! candidates allow to the last frame.

use std::fs::File;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use blake3::hazmat::ChainingValue;

use indicatif::ProgressBar;
use tokio::io::{AsyncRead, AsyncWrite};

use super::log::{self, Ended};
use super::{Session, blocking};
use crate::error::{Error, Result};
use crate::protocol::{Candidate, Code};
use crate::server::live::{TransferInfo, new_transfer_id};
use crate::transfer::cache::Key;
use crate::transfer::{self, Known, Plan};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) async fn get(&mut self, arg: String, candidates: Vec<Candidate>) -> Result<()> {
        let path = self.resolve(&arg)?;
        let home = self.logged_in()?.home.clone();
        let chunk = self.server.config.transfer.chunk_size.0;
        let started = Instant::now();
        let mut info = TransferInfo {
            id: new_transfer_id(),
            path: path.to_string(),
            direction: "down",
            size: 0,
            offset: 0,
        };
        self.note.transfer = Some(info.id.clone());
        let p = path.clone();
        let server = self.server.clone();
        let plan = blocking(move || {
            let began = SystemTime::now();
            let file = home.open_read(&p)?;
            let meta = file.metadata().map_err(Error::Storage)?;
            let key = Key::of(&meta, chunk);
            let mut known = match server.hashes.get(&key) {
                Some(chunks) => Known::All(chunks),
                None => Known::Nothing,
            };
            let size = meta.len();
            let (offset, tree) = transfer::choose(&file, size, chunk, &candidates, &known)
                .map_err(Error::Storage)?;
            let keep = offset == 0 && server.hashes.would_keep(&key) && key.settled_at(began);
            if matches!(known, Known::Nothing) && keep {
                known = Known::Collect(Vec::new());
            }
            let plan = Plan {
                file: Arc::new(file),
                size,
                chunk,
                offset,
                tree,
            };
            Ok((plan, known, key, began))
        })
        .await;
        let (plan, mut known, key, began) = match plan {
            Ok(planned) => planned,
            Err(e) => {
                self.log_download(&info, started, Err(&e), 0);
                return Err(e);
            }
        };
        (info.size, info.offset) = (plan.size, plan.offset);
        // Sent with the first frames.
        self.announce(
            Code::Sending,
            &format!("{} {} {chunk}", info.size, info.offset),
        )
        .await?;
        self.in_transfer = true;
        let source = match known {
            Known::All(_) => "cached",
            _ => "computed",
        };
        self.server.metrics.download_hashed(source);
        let file = plan.file.clone();
        let progress = ProgressBar::hidden();
        let entry = self.seat.entry.clone();
        entry.transfer_started(&info, &progress, &self.server.metrics);
        let sent = transfer::send(&mut self.conn, plan, &mut known, &progress).await;
        entry.transfer_stopped(&self.server.metrics);
        let bytes = progress.position().saturating_sub(info.offset);
        match sent {
            Ok(hash) => {
                self.in_transfer = false;
                if let Known::Collect(chunks) = known {
                    self.keep_hashes(&file, key, began, chunks).await;
                }
                self.log_download(&info, started, Ok(hash), bytes);
                Ok(())
            }
            Err(e) => {
                // After frames started, only a closed session keeps both ends in step.
                let e = Error::Unavailable(format!("download failed: {e}"));
                self.log_download(&info, started, Err(&e), bytes);
                Err(e)
            }
        }
    }

    /// Keeps the chunk hashes of a file just sent whole, if it did not
    /// change while it was read.
    async fn keep_hashes(
        &self,
        file: &Arc<File>,
        key: Key,
        began: SystemTime,
        chunks: Vec<ChainingValue>,
    ) {
        let (server, file) = (self.server.clone(), file.clone());
        let _ = blocking(move || {
            if file
                .metadata()
                .is_ok_and(|m| Key::of(&m, key.chunk()) == key)
            {
                server.hashes.put(key, began, chunks);
            }
            Ok(())
        })
        .await;
    }

    /// The download's one line: refused before its first frame, failed
    /// after, or ok.
    fn log_download(
        &mut self,
        info: &TransferInfo,
        started: Instant,
        outcome: std::result::Result<blake3::Hash, &Error>,
        bytes: u64,
    ) {
        self.note.logged = true;
        let result = match (&outcome, self.in_transfer) {
            (Ok(_), _) => "ok",
            (Err(_), true) => "failed",
            (Err(_), false) => "refused",
        };
        let end = Ended::new(result, bytes, outcome, started);
        log::transfer(&self.server, self.who(), "GET", info, end);
    }
}
