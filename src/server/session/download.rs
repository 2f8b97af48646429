//! GET: the server's end of a download, from the offer the client's resume
//! candidates allow to the last frame.

use std::sync::Arc;
use std::time::Instant;

use indicatif::ProgressBar;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use super::{Session, blocking};
use crate::error::{Error, Result};
use crate::protocol::{self, Candidate, Code};
use crate::transfer::{self, Plan};

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub(super) async fn get(&mut self, arg: String, candidates: Vec<Candidate>) -> Result<()> {
        let path = self.resolve(&arg)?;
        let home = self.logged_in()?.home.clone();
        let name = self.user_name().to_string();
        let chunk = self.server.config.transfer.chunk_size.0;
        let started = Instant::now();
        let p = path.clone();
        let plan = blocking(move || {
            let file = home.open_read(&p)?;
            let size = file.metadata().map_err(Error::Storage)?.len();
            let (offset, tree) =
                transfer::choose(&file, size, chunk, &candidates).map_err(Error::Storage)?;
            Ok(Plan {
                file: Arc::new(file),
                size,
                chunk,
                offset,
                tree,
            })
        })
        .await?;
        let (size, offset) = (plan.size, plan.offset);
        self.reply(Code::Sending, &format!("{size} {offset} {chunk}"))
            .await?;
        let sent = transfer::send(&mut self.conn, plan, &ProgressBar::hidden()).await;
        let ms = started.elapsed().as_millis() as u64;
        match sent {
            Ok(hash) => {
                info!(peer = %self.peer, user = %name, request = "GET", path = %path, size, resumed_from = offset,
                      bytes = size - offset, hash = %protocol::hex(&hash), ms, result = "ok", "download");
                Ok(())
            }
            Err(e) => {
                info!(peer = %self.peer, user = %name, request = "GET", path = %path, size, resumed_from = offset,
                      ms, result = "failed", error = %e, "download");
                // After frames started, only a closed session keeps both ends in step.
                Err(Error::Unavailable(format!("download failed: {e}")))
            }
        }
    }
}
