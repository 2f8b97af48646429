//! The shell's commands: one match from words to what each does.

use std::path::{Path, PathBuf};

use tracing::info;

use super::output::{file_bar, format_entry, format_unfinished, printable, report_file};
use super::tree::{get_tree, put_tree};
use super::{Flow, Remote, Transfer, local_path};
use crate::client::{Client, ClientError};
use crate::config::human_bytes;
use crate::protocol::{Request, VPath};

pub(super) const HELP: &str = "\
commands (remote paths are relative to the remote directory; / is your home):
  pwd                      print the remote directory
  cd [PATH]                change the remote directory (no PATH: /)
  ls [PATH]                list a directory: type, size, modification time, name
  mkdir PATH, rmdir PATH   make or remove (an empty) directory
  rm PATH                  remove a file
  mv FROM TO               rename or move
  put [-r] LOCAL [REMOTE]  upload a file (-r: a directory tree)
  get [-r] REMOTE [LOCAL]  download a file (-r: a directory tree)
  quota                    bytes and files used, their limits, and what
                           unfinished uploads hold of them
  uploads                  list unfinished uploads (they count against the quota
                           until they finish, are discarded or expire)
  discard PATH             drop the unfinished upload to PATH
  lcd [DIR], lpwd          change or print the local directory
  help, exit";

/// Where to connect and as whom.
pub(super) fn usage(text: &str) -> ClientError {
    ClientError::Local(format!("usage: {text}"))
}

/// Runs one shell command. After any failure other than an error reply the
/// session's state is unknown, so the next command reconnects.
pub(super) async fn execute(remote: &mut Remote, words: &[String]) -> Result<Flow, ClientError> {
    let result = execute_one(remote, words).await;
    if let Err(ClientError::Connection(_) | ClientError::Protocol(_)) = &result {
        remote.client = None;
    }
    result
}

pub(super) async fn execute_one(
    remote: &mut Remote,
    words: &[String],
) -> Result<Flow, ClientError> {
    let (cmd, args) = words.split_first().ok_or_else(|| usage("empty command"))?;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    info!(command = %cmd, args = ?args, "command");
    match (cmd.as_str(), args.as_slice()) {
        ("help" | "?", _) => out!("{HELP}"),
        ("exit" | "quit" | "bye", []) => return Ok(Flow::Exit),
        ("lpwd", []) => out!(
            "{}",
            std::env::current_dir()
                .map_err(|e| ClientError::Local(e.to_string()))?
                .display()
        ),
        ("lcd", dir) => lcd(dir.first().copied())?,
        ("pwd", []) => {
            let reply = remote.client().await?.request(&Request::Pwd).await?;
            out!("{}", printable(&crate::client::unquote(&reply.text)?));
        }
        ("cd", [] | [_]) => {
            let dir = remote.client().await?.cd(args.first().copied()).await?;
            remote.cwd = dir;
        }
        ("ls" | "dir", [] | [_]) => ls(remote, args.first().copied()).await?,
        ("mkdir", [p]) => simple(remote, Request::Mkd(p.to_string())).await?,
        ("rmdir", [p]) => simple(remote, Request::Rmd(p.to_string())).await?,
        ("rm" | "delete", [p]) => simple(remote, Request::Dele(p.to_string())).await?,
        ("mv" | "rename", [from, to]) => {
            simple(
                remote,
                Request::Rename {
                    from: from.to_string(),
                    to: to.to_string(),
                },
            )
            .await?
        }
        ("quota", []) => quota(remote).await?,
        ("uploads", []) => {
            let reply = remote.client().await?.request(&Request::Parts).await?;
            for line in &reply.lines {
                out!("{}", format_unfinished(line)?);
            }
        }
        ("discard", [path]) => {
            let client = remote.client().await?;
            let path = client.remote_path(path)?;
            client.request(&Request::Discard(path.to_string())).await?;
        }
        ("put", ["-r", local, rest @ ..]) if rest.len() <= 1 => {
            put_tree(remote, &local_path(local), rest.first().copied()).await?
        }
        ("put", [local, rest @ ..]) if rest.len() <= 1 && *local != "-r" => {
            put_file(remote, &local_path(local), rest.first().copied()).await?
        }
        ("get", ["-r", src, rest @ ..]) if rest.len() <= 1 => {
            get_tree(remote, src, rest.first().copied()).await?
        }
        ("get", [src, rest @ ..]) if rest.len() <= 1 && *src != "-r" => {
            get_file(remote, src, rest.first().copied()).await?
        }
        (c, _) if KNOWN.contains(&c) => return Err(usage(usage_of(c))),
        (c, _) => {
            return Err(ClientError::Local(format!(
                "unknown command {c:?}; try help"
            )));
        }
    }
    Ok(Flow::Continue)
}

/// `lcd [DIR]`: no DIR is the home directory.
fn lcd(dir: Option<&str>) -> Result<(), ClientError> {
    let dir = local_path(dir.unwrap_or("~"));
    std::env::set_current_dir(&dir)
        .map_err(|e| ClientError::Local(format!("{}: {e}", dir.display())))
}

async fn ls(remote: &mut Remote, path: Option<&str>) -> Result<(), ClientError> {
    let listing = remote.client().await?.list(path).await?;
    for entry in &listing.entries {
        out!("{}", format_entry(entry));
    }
    if listing.truncated {
        eprintln!(
            "ftpx: listing truncated by the server ({})",
            printable(&listing.text)
        );
    }
    Ok(())
}

/// `quota`: bytes and files used and their limits, and what unfinished
/// uploads hold of them.
async fn quota(remote: &mut Remote) -> Result<(), ClientError> {
    let reply = remote.client().await?.request(&Request::Quota).await?;
    let nums: Vec<u64> = reply
        .text
        .split(' ')
        .map_while(|w| w.parse().ok())
        .collect();
    let [used, limit, files, max_files, unfinished, count, ..] = nums[..] else {
        return Err(ClientError::Protocol(format!(
            "bad quota reply {:?}",
            reply.text
        )));
    };
    out!(
        "used {used} ({}) of {limit} ({})",
        human_bytes(used),
        human_bytes(limit)
    );
    out!("files {files} of {max_files}");
    out!(
        "unfinished uploads {count}, holding {unfinished} ({})",
        human_bytes(unfinished)
    );
    Ok(())
}

/// `put LOCAL [REMOTE]`: into REMOTE when it is a directory.
async fn put_file(
    remote: &mut Remote,
    local: &Path,
    dest: Option<&str>,
) -> Result<(), ClientError> {
    let name = local
        .file_name()
        .ok_or_else(|| ClientError::Local(format!("{}: not a file", local.display())))?
        .to_string_lossy()
        .into_owned();
    let client = remote.client().await?;
    let mut target = client.remote_path(dest.unwrap_or(&name))?;
    if dest.is_some() && remote_is_dir(client, &target).await {
        target = target.join(&name);
    }
    let bar = file_bar(None, &name);
    let t = remote
        .transfer(&Transfer::Put(local.to_path_buf(), target.clone()), &bar)
        .await;
    bar.finish_and_clear();
    report_file(&t?, &target.to_string(), &bar);
    Ok(())
}

/// `get REMOTE [LOCAL]`: into LOCAL when it is a directory.
async fn get_file(remote: &mut Remote, src: &str, dest: Option<&str>) -> Result<(), ClientError> {
    let source = remote.client().await?.remote_path(src)?;
    let name = source
        .file_name()
        .ok_or_else(|| ClientError::Local("get needs a file, not /".into()))?
        .to_string();
    let mut local = dest.map_or_else(|| PathBuf::from(&name), local_path);
    if local.is_dir() {
        local = local.join(&name);
    }
    let bar = file_bar(None, &name);
    let t = remote
        .transfer(&Transfer::Get(source, local.clone()), &bar)
        .await;
    bar.finish_and_clear();
    report_file(&t?, &local.display().to_string(), &bar);
    Ok(())
}

pub(super) const KNOWN: &[&str] = &[
    "pwd", "cd", "ls", "dir", "mkdir", "rmdir", "rm", "delete", "mv", "rename", "quota", "uploads",
    "discard", "put", "get", "exit", "quit", "bye", "lpwd",
];

pub(super) fn usage_of(cmd: &str) -> &'static str {
    match cmd {
        "pwd" => "pwd",
        "cd" => "cd [PATH]",
        "ls" | "dir" => "ls [PATH]",
        "mkdir" => "mkdir PATH",
        "rmdir" => "rmdir PATH",
        "rm" | "delete" => "rm PATH",
        "mv" | "rename" => "mv FROM TO",
        "put" => "put [-r] LOCAL [REMOTE]",
        "get" => "get [-r] REMOTE [LOCAL]",
        "uploads" => "uploads",
        "discard" => "discard PATH",
        _ => "see help",
    }
}

pub(super) async fn simple(remote: &mut Remote, request: Request) -> Result<(), ClientError> {
    remote.client().await?.request(&request).await.map(|_| ())
}

pub(super) async fn remote_is_dir(client: &mut Client, path: &VPath) -> bool {
    client
        .request(&Request::Stat(path.to_string()))
        .await
        .is_ok_and(|reply| reply.text.starts_with('d'))
}
