//! `ftpx status` and `ftpx kick`: the operator's view of a running server
//! and their hand on it, through its control socket (see
//! `server::control`).

use std::path::Path;

use crate::config::{Config, human_bytes};
use crate::server::control::{self, Answer};
use crate::server::live::SessionStatus;

/// The control socket of the server that `config_path` describes.
fn socket(config_path: Option<&Path>) -> Result<std::path::PathBuf, String> {
    let config = Config::from_arg(config_path)?;
    config
        .control_socket()
        .map(Path::to_path_buf)
        .ok_or_else(|| "control_socket is switched off in the settings".to_string())
}

/// `ftpx status`: the sessions open and the transfers running, one
/// session a line; with `json`, the server's answer as it came.
pub async fn status(config_path: Option<&Path>, json: bool) -> Result<(), String> {
    let answer = control::ask(&socket(config_path)?, "status").await?;
    let sessions = match answer {
        Answer::Status { sessions } => sessions,
        Answer::Error(e) => return Err(e),
        Answer::Kicked { .. } => return Err("unexpected answer from the server".into()),
    };
    if json {
        let text = serde_json::to_string_pretty(&sessions).map_err(|e| e.to_string())?;
        println!("{text}");
        return Ok(());
    }
    println!(
        "{:<20} {:<22} {:<20} {:<9} {:>21} {:>11}  PATH",
        "USER", "PEER", "SINCE", "TRANSFER", "DONE/SIZE", "RATE"
    );
    let now = crate::clock::now_secs();
    for s in &sessions {
        println!("{}", line(s, now));
    }
    let moving = sessions.iter().filter(|s| s.transfer.is_some()).count();
    println!("{} sessions, {moving} transferring", sessions.len());
    Ok(())
}

/// One session's line of `ftpx status`.
fn line(s: &SessionStatus, now: u64) -> String {
    let user = s.user.as_deref().unwrap_or("-");
    let since = format!("{} ago", duration(now.saturating_sub(s.since)));
    let head = format!("{user:<20} {:<22} {since:<20}", s.peer);
    match &s.transfer {
        None => format!("{head} -"),
        Some(t) => {
            let what = match t.direction.as_str() {
                "up" => "upload",
                _ => "download",
            };
            let done = format!("{}/{}", human_bytes(t.done), human_bytes(t.size));
            let rate = format!("{}/s", human_bytes(t.rate));
            let path = crate::protocol::quote(&t.path);
            format!(
                "{head} {what:<9} {done:>21} {rate:>11}  {path} (id {})",
                t.id
            )
        }
    }
}

/// `3725` → `1h02m05s`.
fn duration(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m{:02}s", s / 3600, s % 3600 / 60, s % 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// `ftpx kick USER`: ends the user's sessions.
pub async fn kick(config_path: Option<&Path>, user: &str) -> Result<(), String> {
    crate::store::users::check_name(user)?;
    match control::ask(&socket(config_path)?, &format!("kick {user}")).await? {
        Answer::Kicked { user, sessions } => {
            println!(
                "ended {sessions} session{} of {user}",
                if sessions == 1 { "" } else { "s" }
            );
            Ok(())
        }
        Answer::Error(e) => Err(e),
        Answer::Status { .. } => Err("unexpected answer from the server".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::live::TransferStatus;

    #[test]
    fn a_session_line_shows_its_transfer() {
        let s = SessionStatus {
            user: Some("ann".into()),
            peer: "127.0.0.1:4000".into(),
            since: 100,
            transfer: Some(TransferStatus {
                id: "00aa".into(),
                direction: "up".into(),
                path: "/big file".into(),
                done: 1 << 20,
                size: 4 << 20,
                rate: 2048,
            }),
        };
        let line = line(&s, 3825);
        assert!(line.starts_with("ann "), "{line}");
        assert!(line.contains("1h02m05s ago"), "{line}");
        assert!(
            line.contains("upload") && line.contains("1.0 MiB/4.0 MiB"),
            "{line}"
        );
        assert!(
            line.contains("2.0 KiB/s") && line.ends_with("\"/big file\" (id 00aa)"),
            "{line}"
        );
    }
}
