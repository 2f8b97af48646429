//! The shell's commands: one match from words to what each does.

use std::path::{Path, PathBuf};

use tracing::info;

use super::fetch::get_tree;
use super::output::{
    file_bar, format_entry, format_entry_as, format_unfinished, printable, report_file,
};
use super::tree::put_tree;
use super::{Flow, Remote, Transfer, local_path};
use crate::client::{Client, ClientError};
use crate::config::human_bytes;
use crate::protocol::{Entry, Request, VPath, Word};

pub(super) const HELP: &str = "\
commands (remote paths are relative to the remote directory; / is your home):
  pwd                      print the remote directory
  cd [PATH]                change the remote directory (no PATH: /; -: the one before)
  ls [-lhtSr] [PATH]       list a directory: type, size, modification time (UTC),
                           name; -l local time and human sizes, -h human sizes,
                           -t newest or -S largest first, -r reversed
  mkdir [-p] PATH          make a directory (-p: and its parents, if missing)
  rmdir PATH               remove an empty directory
  rm [-r] PATH             remove a file (-r: a directory and all in it; asks first
                           in the interactive shell)
  mv FROM TO               rename or move
  put [-r] [-p] LOCAL [REMOTE]  upload a file (-r: a directory tree; -p: keep
                           modification times)
  get [-r] [-p] REMOTE [LOCAL]  download a file (-r: a directory tree; -p: keep
                           modification times)
  put, get, rm, ls with *, ? or [...]: every match (quote a name to take it as it is)
  quota                    bytes and files used, their limits, and what
                           unfinished uploads hold of them
  df                       the same, in the shape of df(1)
  uploads                  list unfinished uploads (they count against the quota
                           until they finish, are discarded or expire)
  discard PATH             drop the unfinished upload to PATH
  lcd [DIR], lpwd          change or print the local directory (~: your home)
  lls [PATH], lmkdir PATH  list a local directory, make one
  !COMMAND                 run COMMAND in a local shell
  help, exit
Tab completes commands and local and remote paths; Tab twice lists the choices.
In a batch (-b) or -c, a command written -COMMAND may fail without ending the run.";

/// A usage error: how the command is written.
pub(super) fn usage(text: &str) -> ClientError {
    ClientError::Local(format!("usage: {text}"))
}

/// Runs one shell command. After any failure other than an error reply the
/// session's state is unknown, so the next command reconnects.
pub(super) async fn execute(remote: &mut Remote, words: &[Word]) -> Result<Flow, ClientError> {
    let result = match glob_command(words) {
        Some((cmd, patterns)) => wildcards(remote, cmd, patterns)
            .await
            .map(|()| Flow::Continue),
        None => {
            let words: Vec<String> = words.iter().map(|w| w.text.clone()).collect();
            execute_one(remote, &words).await
        }
    };
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
    if let Some(command) = cmd.strip_prefix('!') {
        return local_shell(command, args).map(|()| Flow::Continue);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    info!(command = ?cmd, args = ?args, "command");
    match (cmd.as_str(), args.as_slice()) {
        ("help" | "?", _) => out!("{HELP}"),
        ("exit" | "quit" | "bye", []) => return Ok(Flow::Exit),
        ("lpwd", []) => lpwd()?,
        ("lcd", dir) => lcd(dir.first().copied())?,
        ("pwd", []) => {
            let reply = remote.client().await?.request(&Request::Pwd).await?;
            out!("{}", printable(&crate::client::unquote(&reply.text)?));
        }
        ("cd", ["-"]) => {
            let back = remote.previous_cwd.clone();
            cd(remote, Some(&back)).await?
        }
        ("cd", [] | [_]) => cd(remote, args.first().copied()).await?,
        ("ls" | "dir", args) => ls(remote, args).await?,
        ("mkdir", ["-p", p]) => mkdir_parents(remote.client().await?, p).await?,
        ("mkdir", [p]) if *p != "-p" => simple(remote, Request::Mkd(p.to_string())).await?,
        ("rmdir", [p]) => simple(remote, Request::Rmd(p.to_string())).await?,
        ("rm" | "delete", ["-r", p]) => remove_tree(remote, p).await?,
        ("rm" | "delete", [p]) if *p != "-r" => {
            simple(remote, Request::Dele(p.to_string())).await?
        }
        ("mv" | "rename", [from, to]) => simple(remote, rename(from, to)).await?,
        ("quota", []) => quota(remote).await?,
        ("df", []) => df(remote).await?,
        ("lls", [] | [_]) => lls(args.first().copied())?,
        ("lmkdir", [p]) => std::fs::create_dir(local_path(p))
            .map_err(|e| ClientError::Local(format!("{p}: {e}")))?,
        ("uploads", []) => uploads(remote).await?,
        ("discard", [path]) => simple(remote, Request::Discard(path.to_string())).await?,
        ("put" | "get", args) => transfer(remote, cmd, args).await?,
        (c, _) if KNOWN.contains(&c) => return Err(usage(usage_of(c))),
        (c, _) => {
            return Err(ClientError::Local(format!(
                "unknown command {c:?}; try help"
            )));
        }
    }
    Ok(Flow::Continue)
}

fn lpwd() -> Result<(), ClientError> {
    let dir = std::env::current_dir().map_err(|e| ClientError::Local(e.to_string()))?;
    out!("{}", dir.display());
    Ok(())
}

fn rename(from: &str, to: &str) -> Request {
    Request::Rename {
        from: from.to_string(),
        to: to.to_string(),
    }
}

/// `uploads`: the unfinished uploads, one a line.
async fn uploads(remote: &mut Remote) -> Result<(), ClientError> {
    let reply = remote.client().await?.request(&Request::Parts).await?;
    for line in &reply.lines {
        out!("{}", format_unfinished(line)?);
    }
    Ok(())
}

/// `cd [PATH]`, remembering where it was for `cd -`.
async fn cd(remote: &mut Remote, path: Option<&str>) -> Result<(), ClientError> {
    let dir = remote.client().await?.cd(path).await?;
    remote.previous_cwd = std::mem::replace(&mut remote.cwd, dir);
    Ok(())
}

/// `mkdir -p PATH`: each missing directory on the way, as mkdir(1) does.
async fn mkdir_parents(client: &mut Client, path: &str) -> Result<(), ClientError> {
    let target = client.remote_path(path)?;
    let mut at = VPath::root();
    for name in target.to_string().split('/').filter(|n| !n.is_empty()) {
        at = at.join(name);
        match client.request(&Request::Mkd(at.to_string())).await {
            Ok(_) => {}
            // There already: fine if it is a directory.
            Err(ClientError::Server { code: 553, .. }) if remote_is_dir(client, &at).await => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `!COMMAND`: a local shell command, its output straight to the terminal.
fn local_shell(command: &str, args: &[String]) -> Result<(), ClientError> {
    let line = std::iter::once(command.to_string())
        .chain(args.iter().map(|a| crate::protocol::quote(a)))
        .collect::<Vec<_>>()
        .join(" ");
    let status = std::process::Command::new("sh")
        .args(["-c", &line])
        .status()
        .map_err(|e| ClientError::Local(format!("cannot run sh: {e}")))?;
    match status.success() {
        true => Ok(()),
        false => Err(ClientError::Local(format!("!{line}: {status}"))),
    }
}

/// `lls [PATH]`: a local directory, as `ls` shows a remote one.
fn lls(path: Option<&str>) -> Result<(), ClientError> {
    let dir = local_path(path.unwrap_or("."));
    let bad = |e: std::io::Error| ClientError::Local(format!("{}: {e}", dir.display()));
    let mut entries: Vec<crate::protocol::Entry> = std::fs::read_dir(&dir)
        .map_err(bad)?
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            let mtime = m
                .modified()
                .ok()?
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?;
            Some(crate::protocol::Entry {
                kind: if m.is_dir() {
                    'd'
                } else if m.is_file() {
                    'f'
                } else {
                    'o'
                },
                size: if m.is_file() { m.len() } else { 0 },
                mtime: i64::try_from(mtime.as_secs()).unwrap_or(i64::MAX),
                name: e.file_name().to_string_lossy().into_owned(),
            })
        })
        .collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    for e in &entries {
        out!("{}", format_entry(e));
    }
    Ok(())
}

/// `lcd [DIR]`: no DIR is the home directory.
fn lcd(dir: Option<&str>) -> Result<(), ClientError> {
    let dir = local_path(dir.unwrap_or("~"));
    std::env::set_current_dir(&dir)
        .map_err(|e| ClientError::Local(format!("{}: {e}", dir.display())))
}

/// How `ls` shows a listing: `-l` local time and human sizes, `-h` human
/// sizes, `-t` newest
/// first, `-S` largest first, `-r` the other way round. Every entry is
/// shown, names starting with `.` too, as the contract of `ls` says; `-a`
/// is taken for the habit of other clients and changes nothing.
#[derive(Debug, Default, Clone, Copy)]
struct LsOptions {
    local_time: bool,
    human: bool,
    by_time: bool,
    by_size: bool,
    reverse: bool,
}

/// `ls [-alhtSr] [PATH]`: the options and the path.
fn ls_arguments<'a>(args: &[&'a str]) -> Result<(LsOptions, Option<&'a str>), ClientError> {
    let mut o = LsOptions::default();
    let mut path = None;
    for arg in args {
        match arg.strip_prefix('-') {
            Some(flags) if !flags.is_empty() => {
                for f in flags.chars() {
                    match f {
                        'a' => {}
                        'l' => o.local_time = true,
                        'h' => o.human = true,
                        't' => o.by_time = true,
                        'S' => o.by_size = true,
                        'r' => o.reverse = true,
                        _ => return Err(usage(usage_of("ls"))),
                    }
                }
            }
            _ if path.is_none() => path = Some(*arg),
            _ => return Err(usage(usage_of("ls"))),
        }
    }
    Ok((o, path))
}

async fn ls(remote: &mut Remote, args: &[&str]) -> Result<(), ClientError> {
    let (o, path) = ls_arguments(args)?;
    let listing = remote.client().await?.list(path).await?;
    let mut entries: Vec<_> = listing.entries.iter().collect();
    if o.by_time {
        entries.sort_by(|a, b| b.mtime.cmp(&a.mtime).then(a.name.cmp(&b.name)));
    } else if o.by_size {
        entries.sort_by(|a, b| b.size.cmp(&a.size).then(a.name.cmp(&b.name)));
    }
    if o.reverse {
        entries.reverse();
    }
    for entry in entries {
        // The long form reads as people read: local time, human sizes.
        out!(
            "{}",
            format_entry_as(entry, o.local_time, o.human || o.local_time)
        );
    }
    if listing.truncated {
        eprintln!(
            "ftpx: listing truncated by the server ({})",
            printable(&listing.text)
        );
    }
    Ok(())
}

/// The six numbers of the `QUOTA` reply: bytes used and the quota, files
/// and their limit, what unfinished uploads hold and how many there are.
async fn quota_numbers(remote: &mut Remote) -> Result<[u64; 6], ClientError> {
    let reply = remote.client().await?.request(&Request::Quota).await?;
    let nums: Vec<u64> = reply
        .text
        .split(' ')
        .map_while(|w| w.parse().ok())
        .collect();
    nums.get(..6)
        .and_then(|n| <[u64; 6]>::try_from(n).ok())
        .ok_or_else(|| ClientError::Protocol(format!("bad quota reply {:?}", reply.text)))
}

/// `quota`: bytes and files used and their limits, and what unfinished
/// uploads hold of them.
async fn quota(remote: &mut Remote) -> Result<(), ClientError> {
    let [used, limit, files, max_files, unfinished, count] = quota_numbers(remote).await?;
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

/// `rm -r PATH`: a remote directory and everything in it, files first,
/// then directories from the deepest up. In the interactive shell it asks
/// first, saying how much would go.
async fn remove_tree(remote: &mut Remote, path: &str) -> Result<(), ClientError> {
    let client = remote.client().await?;
    let root = client.remote_path(path)?;
    if !remote_is_dir(client, &root).await {
        return client
            .request(&Request::Dele(root.to_string()))
            .await
            .map(|_| ());
    }
    let (mut files, mut dirs) = (vec![], vec![root.clone()]);
    let mut next = 0;
    while let Some(dir) = dirs.get(next).cloned() {
        next += 1;
        for entry in client.list(Some(&dir.to_string())).await?.entries {
            let path = dir.join(&entry.name);
            match entry.kind {
                'd' => dirs.push(path),
                _ => files.push(path),
            }
            if files.len() + dirs.len() > super::fetch::MAX_TREE_ENTRIES {
                return Err(ClientError::Local(format!(
                    "{root}: more than {} entries; remove it in parts",
                    super::fetch::MAX_TREE_ENTRIES
                )));
            }
        }
    }
    let question = format!(
        "remove {} and all in it: {} files, {} directories? [y/N] ",
        printable(&root.to_string()),
        files.len(),
        dirs.len() - 1
    );
    if !confirmed(&question) {
        return Err(ClientError::Local("not removed".into()));
    }
    let client = remote.client().await?;
    let dele: Vec<Request> = files.iter().map(|f| Request::Dele(f.to_string())).collect();
    // Parents were listed before their children: the reverse is deepest first.
    let rmd: Vec<Request> = dirs
        .iter()
        .rev()
        .map(|d| Request::Rmd(d.to_string()))
        .collect();
    for batch in [dele, rmd] {
        client
            .request_many(&batch, |_, reply| reply.map(|_| ()))
            .await?;
    }
    Ok(())
}

/// Asks `question` on the terminal; without one (a script), the answer is yes.
fn confirmed(question: &str) -> bool {
    use std::io::{IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return true;
    }
    eprint!("{question}");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    let read = tokio::task::block_in_place(|| std::io::stdin().read_line(&mut answer));
    read.is_ok() && matches!(answer.trim(), "y" | "Y" | "yes")
}

/// `df`: the quota in the shape of df(1), bytes and files.
async fn df(remote: &mut Remote) -> Result<(), ClientError> {
    let [used, limit, files, max_files, ..] = quota_numbers(remote).await?;
    let percent = |used: u64, of: u64| match of {
        0 => "-".to_string(),
        _ => format!("{}%", (u128::from(used) * 100).div_ceil(u128::from(of))),
    };
    out!(
        "{:>12} {:>12} {:>12} {:>5} {:>10} {:>10} {:>5}",
        "Size",
        "Used",
        "Avail",
        "Use%",
        "Files",
        "Max",
        "Use%"
    );
    out!(
        "{:>12} {:>12} {:>12} {:>5} {:>10} {:>10} {:>5}",
        human_bytes(limit),
        human_bytes(used),
        human_bytes(limit.saturating_sub(used)),
        percent(used, limit),
        files,
        max_files,
        percent(files, max_files)
    );
    Ok(())
}

/// `put LOCAL [REMOTE]`: into REMOTE when it is a directory.
async fn put_file(
    remote: &mut Remote,
    local: &Path,
    dest: Option<&str>,
) -> Result<VPath, ClientError> {
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
    Ok(target)
}

/// `put [-r] [-p] LOCAL [REMOTE]` and `get [-r] [-p] REMOTE [LOCAL]`
/// (flags also together: `-rp`).
async fn transfer(remote: &mut Remote, cmd: &str, args: &[&str]) -> Result<(), ClientError> {
    let (mut recursive, mut keep_times) = (false, false);
    let mut rest = args;
    while let Some((flag, more)) = rest.split_first() {
        let Some(letters) = flag.strip_prefix('-').filter(|l| !l.is_empty()) else {
            break;
        };
        for letter in letters.chars() {
            match letter {
                'r' => recursive = true,
                'p' => keep_times = true,
                _ => return Err(usage(usage_of(cmd))),
            }
        }
        rest = more;
    }
    let (from, to) = match rest {
        [from] => (*from, None),
        [from, to] => (*from, Some(*to)),
        _ => return Err(usage(usage_of(cmd))),
    };
    match (cmd, recursive) {
        ("put", true) => put_tree(remote, &local_path(from), to, keep_times).await,
        ("get", true) => get_tree(remote, from, to, keep_times).await,
        ("put", false) => {
            let local = local_path(from);
            let target = put_file(remote, &local, to).await?;
            match keep_times {
                true => keep_mtime_up(remote, &local, &target).await,
                false => Ok(()),
            }
        }
        _ => {
            let local = get_file(remote, from, to).await?;
            match keep_times {
                true => keep_mtime_down(remote, from, &local).await,
                false => Ok(()),
            }
        }
    }
}

/// `put -p`: the uploaded file gets the local file's modification time.
async fn keep_mtime_up(
    remote: &mut Remote,
    local: &Path,
    target: &VPath,
) -> Result<(), ClientError> {
    let mtime = std::fs::metadata(local)
        .and_then(|m| m.modified())
        .map_err(|e| ClientError::Local(format!("{}: {e}", local.display())))?;
    let secs = mtime
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let request = Request::Mtime {
        path: target.to_string(),
        mtime: secs,
    };
    remote.client().await?.request(&request).await.map(|_| ())
}

/// `get -p`: the downloaded file gets the remote file's modification time.
async fn keep_mtime_down(remote: &mut Remote, src: &str, local: &Path) -> Result<(), ClientError> {
    let client = remote.client().await?;
    let path = client.remote_path(src)?;
    let stat = client.request(&Request::Stat(path.to_string())).await?;
    let entry = Entry::parse(&stat.text)
        .map_err(|_| ClientError::Protocol(format!("bad STAT reply {:?}", stat.text)))?;
    let when =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(entry.mtime.max(0).unsigned_abs());
    std::fs::File::options()
        .write(true)
        .open(local)
        .and_then(|f| f.set_modified(when))
        .map_err(|e| ClientError::Local(format!("{}: {e}", local.display())))
}

/// `get REMOTE [LOCAL]`: into LOCAL when it is a directory.
async fn get_file(
    remote: &mut Remote,
    src: &str,
    dest: Option<&str>,
) -> Result<PathBuf, ClientError> {
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
    Ok(local)
}

/// Whether a script's command asks the server before it does anything
/// else: it may start while the login sent with the session is still
/// unanswered, its first request going out with the login. Any other
/// command (`lcd`, `!`, `help`...) waits for the login's outcome: nothing
/// it does may come before a refused login.
pub(super) fn asks_first(words: &[Word]) -> bool {
    let cmd = words.first().map_or("", |w| w.text.as_str());
    matches!(
        cmd,
        "pwd"
            | "cd"
            | "ls"
            | "dir"
            | "mkdir"
            | "rmdir"
            | "rm"
            | "delete"
            | "mv"
            | "rename"
            | "quota"
            | "df"
            | "uploads"
            | "discard"
            | "put"
            | "get"
    )
}

/// Whether a command is one request and its reply, nothing after it: the
/// last of a script sends the session's `QUIT` with its request. (A
/// transfer is not: it may retry, or send frames after its request.)
pub(super) fn one_request(words: &[Word]) -> bool {
    if glob_command(words).is_some() {
        return false;
    }
    let words: Vec<&str> = words.iter().map(|w| w.text.as_str()).collect();
    match words.as_slice() {
        ["pwd" | "quota" | "df" | "uploads" | "cd"] => true,
        ["cd" | "rmdir" | "discard", _] | ["mv" | "rename", _, _] => true,
        ["mkdir", p] => *p != "-p",
        ["rm" | "delete", p] => *p != "-r",
        ["ls" | "dir", args @ ..] => ls_arguments(args).is_ok(),
        _ => false,
    }
}

pub(super) const KNOWN: &[&str] = &[
    "pwd", "cd", "ls", "dir", "mkdir", "rmdir", "rm", "delete", "mv", "rename", "quota", "df",
    "uploads", "discard", "put", "get", "exit", "quit", "bye", "lpwd", "lls", "lmkdir",
];

pub(super) fn usage_of(cmd: &str) -> &'static str {
    match cmd {
        "pwd" => "pwd",
        "cd" => "cd [PATH]",
        "ls" | "dir" => "ls [-lhtSr] [PATH]",
        "mkdir" => "mkdir [-p] PATH",
        "lls" => "lls [PATH]",
        "lmkdir" => "lmkdir PATH",
        "rmdir" => "rmdir PATH",
        "rm" | "delete" => "rm [-r] PATH",
        "mv" | "rename" => "mv FROM TO",
        "put" => "put [-r] [-p] LOCAL [REMOTE]",
        "get" => "get [-r] [-p] REMOTE [LOCAL]",
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

/// A command whose arguments hold wildcards: `put`, `get`, `rm` or `ls`
/// with a pattern, and its arguments.
fn glob_command(words: &[Word]) -> Option<(&str, &[Word])> {
    let (cmd, args) = words.split_first()?;
    let globs = matches!(cmd.text.as_str(), "put" | "get" | "rm" | "ls")
        && args.iter().any(|a| a.pattern.is_some());
    globs.then_some((cmd.text.as_str(), args))
}

/// `put`, `get`, `rm` and `ls` with wildcards. A pattern matches names in
/// one directory, on the side where the files are: local files for `put`,
/// remote names (from a listing) for the others; a name that starts with
/// `.` only matches a pattern that does too, as in a shell. `put` and `get`
/// of several files go into a directory: the last argument if it is one,
/// else the working directory.
async fn wildcards(remote: &mut Remote, cmd: &str, args: &[Word]) -> Result<(), ClientError> {
    let (sources, dest) = match (cmd, args) {
        ("put" | "get", [sources @ .., last]) if !sources.is_empty() && last.pattern.is_none() => {
            (sources, Some(last.text.as_str()))
        }
        _ => (args, None),
    };
    let mut matched = vec![];
    for word in sources {
        let found = match (&word.pattern, cmd) {
            (None, _) => vec![word.text.clone()],
            (Some(p), "put") => local_matches(p)?,
            (Some(p), _) => remote_matches_of(remote, p).await?,
        };
        if found.is_empty() {
            return Err(ClientError::Local(format!("{}: no match", word.text)));
        }
        matched.extend(found);
    }
    for name in matched {
        match cmd {
            "put" => drop(put_file(remote, &local_path(&name), Some(dest.unwrap_or("."))).await?),
            "get" => drop(get_file(remote, &name, Some(dest.unwrap_or("."))).await?),
            "rm" => simple(remote, Request::Dele(name)).await?,
            _ => ls(remote, &[&name]).await?,
        }
    }
    Ok(())
}

/// As a shell matches: a leading `.` only by a pattern that has one.
fn glob_options() -> glob::MatchOptions {
    glob::MatchOptions {
        require_literal_leading_dot: true,
        ..glob::MatchOptions::new()
    }
}

/// Local paths matching `pattern`, sorted; regular files only.
fn local_matches(pattern: &str) -> Result<Vec<String>, ClientError> {
    let pattern = local_path(pattern).to_string_lossy().into_owned();
    let paths = glob::glob_with(&pattern, glob_options())
        .map_err(|e| ClientError::Local(format!("{pattern}: {e}")))?
        .flatten()
        .filter(|p| p.is_file())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    Ok(paths)
}

/// Remote paths whose last name matches the last name of `pattern`, in the
/// directory the rest of it names (no wildcards there).
async fn remote_matches_of(remote: &mut Remote, pattern: &str) -> Result<Vec<String>, ClientError> {
    let (dir, name) = match pattern.rsplit_once('/') {
        Some((dir, name)) => (Some(if dir.is_empty() { "/" } else { dir }), name),
        None => (None, pattern),
    };
    if dir.is_some_and(|d| d.contains(['*', '?', '['])) {
        return Err(ClientError::Local(format!(
            "{pattern}: wildcards only in the last name of a remote path"
        )));
    }
    let pattern =
        glob::Pattern::new(name).map_err(|e| ClientError::Local(format!("{pattern}: {e}")))?;
    let options = glob_options();
    let listing = remote.client().await?.list(dir).await?;
    let mut names: Vec<String> = listing
        .entries
        .into_iter()
        .filter(|e| pattern.matches_with(&e.name, options))
        .map(|e| match dir {
            Some("/") => format!("/{}", e.name),
            Some(d) => format!("{d}/{}", e.name),
            None => e.name,
        })
        .collect();
    names.sort();
    Ok(names)
}
