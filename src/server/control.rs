//! The control socket: a Unix socket (`server.control_socket`, mode 0600,
//! and only the server's own user, or root, is answered) through which
//! `ftpx status` and `ftpx kick` talk to a running server. Both ends are
//! here: one request line (`status`, or `kick USER`), one JSON line back.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use crate::server::Server;
use crate::server::live::SessionStatus;

/// What the server answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Answer {
    /// Every session open, oldest first.
    Status {
        sessions: Vec<SessionStatus>,
    },
    /// The sessions of `user` that were ended.
    Kicked {
        user: String,
        sessions: usize,
    },
    Error(String),
}

/// The bound socket, removed when dropped.
pub struct Socket {
    pub listener: UnixListener,
    path: PathBuf,
}

impl Drop for Socket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the control socket at `path`, replacing what a server that
/// stopped without cleaning up left there, and makes it owner-only.
pub fn bind(path: &Path) -> Result<Socket, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!(
            "{}: another server answers on this control socket",
            path.display()
        ));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", path.display())),
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    Ok(Socket {
        listener,
        path: path.to_path_buf(),
    })
}

/// Answers on `socket` until the task is dropped.
pub async fn serve(socket: Socket, server: Arc<Server>) {
    loop {
        let stream = match socket.listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(event = "error", error = %e, "control socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let server = server.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), answer(stream, &server)).await;
        });
    }
}

/// Whether the other end runs as this process's user, or as root.
fn trusted(stream: &UnixStream) -> bool {
    // SAFETY: geteuid has no preconditions and can't fail.
    let me = unsafe { libc::geteuid() };
    stream
        .peer_cred()
        .is_ok_and(|c| c.uid() == me || c.uid() == 0)
}

async fn answer(stream: UnixStream, server: &Arc<Server>) -> std::io::Result<()> {
    if !trusted(&stream) {
        return Ok(());
    }
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    BufReader::new(read.take(4096)).read_line(&mut line).await?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let answer = match words.as_slice() {
        ["status"] => Answer::Status {
            sessions: server.live.status(),
        },
        ["kick", user] => {
            let sessions = server.live.kick(user);
            info!(
                event = "kick",
                user = *user,
                sessions,
                "sessions ended by the admin"
            );
            Answer::Kicked {
                user: user.to_string(),
                sessions,
            }
        }
        _ => Answer::Error(format!("unknown request {:?}", line.trim_end())),
    };
    let mut text = serde_json::to_string(&answer).unwrap_or_default();
    text.push('\n');
    write.write_all(text.as_bytes()).await?;
    write.shutdown().await
}

/// Asks the server listening on `path`: the client end.
pub async fn ask(path: &Path, request: &str) -> Result<Answer, String> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        format!(
            "cannot reach the server's control socket {}: {e} (is the server running, with this --config?)",
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let talk = async {
        write.write_all(format!("{request}\n").as_bytes()).await?;
        let mut line = String::new();
        BufReader::new(read.take(64 << 20))
            .read_line(&mut line)
            .await?;
        Ok::<_, std::io::Error>(line)
    };
    let line = tokio::time::timeout(Duration::from_secs(10), talk)
        .await
        .map_err(|_| "the server did not answer in 10 s".to_string())?
        .map_err(|e| format!("control socket: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("unexpected answer from the server: {e}"))
}
