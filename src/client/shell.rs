//! `ftpx connect`: the user's side. Reads commands from the interactive
//! line editor, `-c` or `-b`, runs each on a [`Client`], prints results to
//! standard output and errors to standard error, draws progress bars, and
//! reconnects and resumes when a transfer's connection drops.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tracing::info;

use crate::cli::ConnectArgs;
use crate::client::{Client, ClientError, Transferred, state_dir};
use crate::config::human_bytes;
use crate::protocol::{self, Entry, Request, VPath};
use crate::tls::Trust;

/// Prints a result line on standard output. A closed pipe (`| head`) is
/// not an error: the run ends quietly with success.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// `text` made safe for a terminal: control characters (C0, DEL, C1) and
/// the bidirectional overrides are written as escapes (`\x1b`, `\u{9b}`),
/// as OpenSSH's `fmprintf` does; printable text, UTF-8 included, is kept.
/// Everything a server sent goes through here before it is printed.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    use std::fmt::Write as _;
    let unsafe_char =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !text.chars().any(unsafe_char) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if !unsafe_char(c) {
            out.push(c);
        } else if c.is_ascii() {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    out.into()
}

/// Exit statuses of `ftpx connect`.
pub mod exit {
    pub const OK: u8 = 0;
    /// A command failed.
    pub const FAILED: u8 = 1;
    /// Bad usage (also clap's status for bad flags).
    pub const USAGE: u8 = 2;
    /// No session: the connection or the TLS handshake failed.
    pub const CONNECT: u8 = 3;
    /// Login or registration refused.
    pub const LOGIN: u8 = 4;
    /// Stopped by Ctrl-C.
    pub const INTERRUPTED: u8 = 130;
}

const HELP: &str = "\
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
struct Target {
    user: String,
    host: String,
    port: u16,
}

fn parse_target(s: &str) -> Result<Target, String> {
    let (user, rest) = match s.rsplit_once('@') {
        Some((u, r)) => (u.to_string(), r),
        None => (std::env::var("USER").unwrap_or_default(), s),
    };
    if user.is_empty() {
        return Err("no user name: write USER@HOST".into());
    }
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or("unclosed [ in the address")?;
        match after.strip_prefix(':') {
            Some(p) => (h.to_string(), p),
            None if after.is_empty() => (h.to_string(), ""),
            None => return Err(format!("bad address {s:?}")),
        }
    } else if rest.matches(':').count() == 1 {
        let (h, p) = rest.split_once(':').unwrap_or((rest, ""));
        (h.to_string(), p)
    } else {
        (rest.to_string(), "")
    };
    let port = if port.is_empty() {
        crate::config::DEFAULT_PORT
    } else {
        port.parse().map_err(|_| format!("bad port {port:?}"))?
    };
    if host.is_empty() {
        return Err("no host name".into());
    }
    Ok(Target { user, host, port })
}

/// Reads the password: `FTPX_PASSWORD`, else one line of stdin with
/// `--password-stdin`, else a prompt that does not echo.
fn read_password(args: &ConnectArgs, confirm: bool) -> Result<String, String> {
    if let Ok(p) = std::env::var("FTPX_PASSWORD") {
        return Ok(p);
    }
    if args.password_stdin {
        return read_stdin_line();
    }
    let p = rpassword::prompt_password("password: ")
        .map_err(|e| format!("cannot read the password: {e}"))?;
    if confirm && rpassword::prompt_password("password again: ").map_err(|e| e.to_string())? != p {
        return Err("the passwords differ".into());
    }
    Ok(p)
}

/// One line of standard input without its line end.
pub fn read_stdin_line() -> Result<String, String> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read standard input: {e}"))?;
    if line.is_empty() {
        return Err("no password on standard input".into());
    }
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// The session, remembered well enough to reconnect after a drop.
struct Remote {
    target: Target,
    password: String,
    trust: Trust,
    io_timeout: Duration,
    retries: u32,
    client: Option<Client>,
    /// Remote directory to return to after a reconnect.
    cwd: String,
}

impl Remote {
    async fn open(&mut self, register: bool) -> Result<&mut Client, ClientError> {
        if self.client.as_ref().is_some_and(|c| !c.is_usable()) {
            self.client = None;
        }
        if self.client.is_none() {
            let mut c = Client::connect_with(
                &self.target.host,
                self.target.port,
                &self.trust,
                self.io_timeout,
            )
            .await?;
            c.login(&self.target.user, &self.password, register).await?;
            info!(user = %self.target.user, register, "logged in");
            if self.cwd != "/" {
                c.cd(Some(&self.cwd)).await?;
            }
            self.client = Some(c);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    async fn client(&mut self) -> Result<&mut Client, ClientError> {
        self.open(false).await
    }

    /// Runs one transfer, reconnecting and resuming up to `retries` times
    /// when the connection drops or a chunk arrives damaged.
    async fn transfer(
        &mut self,
        op: &Transfer,
        bar: &ProgressBar,
    ) -> Result<Transferred, ClientError> {
        let mut attempt = 0;
        loop {
            let result = match self.client().await {
                Ok(c) => match op {
                    Transfer::Put(local, remote) => c.put(local, remote, bar).await,
                    Transfer::Get(remote, local) => c.get(remote, local, bar).await,
                },
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.is_retriable() && attempt < self.retries => {
                    attempt += 1;
                    if !matches!(e, ClientError::Server { .. }) {
                        self.client = None;
                    }
                    let wait = Duration::from_millis(500 * (1 << attempt.min(5)));
                    bar.suspend(|| {
                        eprintln!(
                            "{}; retrying in {:.1} s ({attempt}/{})",
                            printable(&e.to_string()),
                            wait.as_secs_f32(),
                            self.retries
                        )
                    });
                    info!(error = %e, attempt, "transfer interrupted; retrying");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }
}

enum Transfer {
    Put(PathBuf, VPath),
    Get(VPath, PathBuf),
}

/// Runs `ftpx connect`; returns the exit status.
pub async fn run(args: ConnectArgs) -> u8 {
    // A file-size limit (ulimit -f) must fail the one write, not kill the client.
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let target = match parse_target(&args.target) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ftpx: {e}");
            return exit::USAGE;
        }
    };
    let password = match read_password(&args, args.register) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ftpx: {e}");
            return exit::USAGE;
        }
    };
    let mut remote = Remote {
        target,
        password,
        trust: if args.tofu {
            Trust::Pinned(state_dir().join("known_hosts"))
        } else {
            Trust::Ca(args.ca.clone())
        },
        io_timeout: Duration::from_secs(args.timeout.max(1)),
        retries: args.retries,
        client: None,
        cwd: "/".into(),
    };
    if let Err(e) = remote.open(args.register).await {
        eprintln!("ftpx: {}", printable(&e.to_string()));
        info!(error = %e, "session not opened");
        return match e {
            ClientError::Server { code: 430, .. } => {
                eprintln!("ftpx: login failed: unknown user or wrong password");
                exit::LOGIN
            }
            ClientError::Server {
                code: 553 | 501, ..
            } => exit::LOGIN,
            _ => exit::CONNECT,
        };
    }
    let status = if let Some(commands) = &args.commands {
        run_script(&mut remote, std::iter::once(commands.clone()), true).await
    } else if let Some(file) = &args.batch {
        match std::fs::read_to_string(file) {
            Ok(text) => run_script(&mut remote, text.lines().map(str::to_string), false).await,
            Err(e) => {
                eprintln!("ftpx: cannot read {}: {e}", file.display());
                exit::USAGE
            }
        }
    } else {
        interactive(&mut remote).await
    };
    if let Some(c) = remote.client.take() {
        c.quit().await;
    }
    status
}

/// Runs commands until the first failure.
async fn run_script(
    remote: &mut Remote,
    lines: impl Iterator<Item = String>,
    semicolons: bool,
) -> u8 {
    for line in lines {
        let commands = match protocol::split_commands(&line, semicolons || line.contains(';')) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ftpx: {line:?}: {e}");
                return exit::FAILED;
            }
        };
        for words in commands {
            let outcome = tokio::select! {
                r = execute(remote, &words) => r,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("ftpx: interrupted; run the same command again to resume");
                    return exit::INTERRUPTED;
                }
            };
            match outcome {
                Ok(Flow::Continue) => {}
                Ok(Flow::Exit) => return exit::OK,
                Err(e) => {
                    eprintln!(
                        "ftpx: {}: {}",
                        printable(&words.join(" ")),
                        printable(&e.to_string())
                    );
                    return exit::FAILED;
                }
            }
        }
    }
    exit::OK
}

async fn interactive(remote: &mut Remote) -> u8 {
    let mut editor = match rustyline::DefaultEditor::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ftpx: cannot start the line editor: {e}");
            return exit::FAILED;
        }
    };
    let history = state_dir().join("history");
    let _ = editor.load_history(&history);
    let mut status = exit::OK;
    loop {
        let prompt = format!("ftpx:{}> ", printable(&remote.cwd));
        let line = match tokio::task::block_in_place(|| editor.readline(&prompt)) {
            Ok(l) => l,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => {
                eprintln!("ftpx: {e}");
                status = exit::FAILED;
                break;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let _ = editor.add_history_entry(line.as_str());
        let commands = match protocol::split_commands(&line, true) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ftpx: {e}");
                continue;
            }
        };
        for words in commands {
            let outcome = tokio::select! {
                r = execute(remote, &words) => r,
                _ = tokio::signal::ctrl_c() => {
                    // The session is out of step mid-transfer: reconnect on the next command.
                    remote.client = None;
                    eprintln!("interrupted; run the same command again to resume");
                    break;
                }
            };
            match outcome {
                Ok(Flow::Continue) => status = exit::OK,
                Ok(Flow::Exit) => {
                    let _ = std::fs::create_dir_all(state_dir());
                    let _ = editor.save_history(&history);
                    return exit::OK;
                }
                Err(e) => {
                    eprintln!("ftpx: {}", printable(&e.to_string()));
                    status = exit::FAILED;
                    break;
                }
            }
        }
    }
    let _ = std::fs::create_dir_all(state_dir());
    let _ = editor.save_history(&history);
    status
}

enum Flow {
    Continue,
    Exit,
}

fn usage(text: &str) -> ClientError {
    ClientError::Local(format!("usage: {text}"))
}

/// Runs one shell command. After any failure other than an error reply the
/// session's state is unknown, so the next command reconnects.
async fn execute(remote: &mut Remote, words: &[String]) -> Result<Flow, ClientError> {
    let result = execute_one(remote, words).await;
    if let Err(ClientError::Connection(_) | ClientError::Protocol(_)) = &result {
        remote.client = None;
    }
    result
}

async fn execute_one(remote: &mut Remote, words: &[String]) -> Result<Flow, ClientError> {
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
        ("lcd", dir) => {
            let dir = dir.first().map_or_else(
                || std::env::var("HOME").unwrap_or_else(|_| "/".into()),
                |d| d.to_string(),
            );
            std::env::set_current_dir(&dir)
                .map_err(|e| ClientError::Local(format!("{dir}: {e}")))?;
        }
        ("pwd", []) => {
            let reply = remote.client().await?.request(&Request::Pwd).await?;
            out!("{}", printable(&crate::client::unquote(&reply.text)?));
        }
        ("cd", [] | [_]) => {
            let dir = remote.client().await?.cd(args.first().copied()).await?;
            remote.cwd = dir;
        }
        ("ls" | "dir", [] | [_]) => {
            let listing = remote.client().await?.list(args.first().copied()).await?;
            for entry in &listing.entries {
                out!("{}", format_entry(entry));
            }
            if listing.truncated {
                eprintln!(
                    "ftpx: listing truncated by the server ({})",
                    printable(&listing.text)
                );
            }
        }
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
        ("quota", []) => {
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
        }
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
            put_tree(remote, Path::new(local), rest.first().copied()).await?
        }
        ("put", [local, rest @ ..]) if rest.len() <= 1 && *local != "-r" => {
            let local = Path::new(local);
            let name = local
                .file_name()
                .ok_or_else(|| ClientError::Local(format!("{}: not a file", local.display())))?
                .to_string_lossy()
                .into_owned();
            let client = remote.client().await?;
            let mut dest = client.remote_path(rest.first().copied().unwrap_or(&name))?;
            if !rest.is_empty() && remote_is_dir(client, &dest).await {
                dest = dest.join(&name);
            }
            let bar = file_bar(None, &name);
            let t = remote
                .transfer(&Transfer::Put(local.to_path_buf(), dest.clone()), &bar)
                .await;
            bar.finish_and_clear();
            report(&t?, &dest.to_string());
        }
        ("get", ["-r", src, rest @ ..]) if rest.len() <= 1 => {
            get_tree(remote, src, rest.first().copied()).await?
        }
        ("get", [src, rest @ ..]) if rest.len() <= 1 && *src != "-r" => {
            let source = remote.client().await?.remote_path(src)?;
            let name = source
                .file_name()
                .ok_or_else(|| ClientError::Local("get needs a file, not /".into()))?
                .to_string();
            let mut local = PathBuf::from(rest.first().copied().unwrap_or(&name));
            if local.is_dir() {
                local = local.join(&name);
            }
            let bar = file_bar(None, &name);
            let t = remote
                .transfer(&Transfer::Get(source, local.clone()), &bar)
                .await;
            bar.finish_and_clear();
            report(&t?, &local.display().to_string());
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

const KNOWN: &[&str] = &[
    "pwd", "cd", "ls", "dir", "mkdir", "rmdir", "rm", "delete", "mv", "rename", "quota", "uploads",
    "discard", "put", "get", "exit", "quit", "bye", "lpwd",
];

fn usage_of(cmd: &str) -> &'static str {
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

async fn simple(remote: &mut Remote, request: Request) -> Result<(), ClientError> {
    remote.client().await?.request(&request).await.map(|_| ())
}

fn report(t: &Transferred, name: &str) {
    if t.resumed_at > 0 {
        out!("resumed at {} bytes", t.resumed_at);
    }
    out!("{}  {}", protocol::hex(&t.hash), printable(name));
}

async fn remote_is_dir(client: &mut Client, path: &VPath) -> bool {
    client
        .request(&Request::Stat(path.to_string()))
        .await
        .is_ok_and(|reply| reply.text.starts_with('d'))
}

/// `f 12 1700000000 "a b"` → `f         12  2023-11-14 22:13  a b`, the
/// name escaped for the terminal.
fn format_entry(e: &Entry) -> String {
    let slash = if e.kind == 'd' { "/" } else { "" };
    format!(
        "{} {:>12}  {}  {}{slash}",
        printable(&e.kind.to_string()),
        e.size,
        format_time(e.mtime),
        printable(&e.name)
    )
}

/// One line of `uploads`: size, bytes stored so far, last saved, target
/// (escaped for the terminal).
fn format_unfinished(line: &str) -> Result<String, ClientError> {
    let bad = || ClientError::Protocol(format!("bad unfinished upload line {line:?}"));
    let words = protocol::split_commands(line, false).map_err(|_| bad())?;
    let words = words.into_iter().next().ok_or_else(bad)?;
    let [size, verified, updated, target] = &words[..] else {
        return Err(bad());
    };
    let number = |w: &str| w.parse::<u64>().map_err(|_| bad());
    let (size, verified, updated) = (number(size)?, number(verified)?, number(updated)?);
    Ok(format!(
        "{size:>12}  {:>12} stored  {}  {}",
        verified.min(size),
        format_time(i64::try_from(updated).unwrap_or(i64::MAX)),
        printable(target)
    ))
}

/// Unix seconds as `YYYY-MM-DD HH:MM` (UTC).
fn format_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn draw() -> bool {
    std::io::stderr().is_terminal()
}

fn file_bar(multi: Option<&MultiProgress>, name: &str) -> ProgressBar {
    if !draw() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{msg:24!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(printable(name).into_owned());
    match multi {
        Some(m) => m.add(bar),
        None => bar,
    }
}

fn total_bar(multi: &MultiProgress, total: u64) -> ProgressBar {
    if !draw() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("total {pos}/{len} files [{bar:30}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    multi.add(bar)
}

/// A name from a remote listing is used locally only if it is one plain
/// path component of at most [`crate::protocol::MAX_NAME`] bytes, without
/// control characters (NUL included): a hostile server can't make the
/// client write elsewhere.
fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= crate::protocol::MAX_NAME
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.chars().any(char::is_control)
}

fn local_hash(path: &Path) -> Option<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(path).ok()?).ok()?;
    Some(h.finalize())
}

/// Whether the remote file `path` has `size` bytes and BLAKE3 `hash`.
async fn remote_matches(
    client: &mut Client,
    path: &VPath,
    size: u64,
    hash: impl FnOnce() -> Option<blake3::Hash>,
) -> bool {
    let Ok(stat) = client.request(&Request::Stat(path.to_string())).await else {
        return false;
    };
    let Ok(entry) = Entry::parse(&stat.text) else {
        return false;
    };
    if entry.kind != 'f' || entry.size != size {
        return false;
    }
    let Ok(reply) = client.request(&Request::Hash(path.to_string())).await else {
        return false;
    };
    hash().is_some_and(|h| protocol::hex(&h) == reply.text)
}

async fn put_tree(
    remote: &mut Remote,
    local: &Path,
    dest: Option<&str>,
) -> Result<(), ClientError> {
    let meta = std::fs::metadata(local)
        .map_err(|e| ClientError::Local(format!("{}: {e}", local.display())))?;
    if !meta.is_dir() {
        return Err(ClientError::Local(format!(
            "{}: not a directory",
            local.display()
        )));
    }
    let base = std::path::absolute(local).map_err(|e| ClientError::Local(e.to_string()))?;
    let name = base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let root = remote
        .client()
        .await?
        .remote_path(dest.unwrap_or(if name.is_empty() { "." } else { &name }))?;

    // Walk the local tree first: directories to make, files to send.
    let mut dirs = vec![root.clone()];
    let mut files = vec![];
    let mut stack = vec![(base.clone(), root.clone())];
    while let Some((dir, rdir)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .map_err(|e| ClientError::Local(format!("{}: {e}", dir.display())))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                dirs.push(rdir.join(&name));
                stack.push((path, rdir.join(&name)));
            } else if let Ok(m) = std::fs::metadata(&path)
                .ok()
                .filter(|m| m.is_file())
                .ok_or(())
            {
                files.push((path, rdir.join(&name), m.len()));
            } else {
                eprintln!("ftpx: skipping {}: not a regular file", path.display());
            }
        }
    }
    // Make the directories and learn what is already there: one round trip
    // for all of them, not one per file.
    let client = remote.client().await?;
    let mkdirs: Vec<Request> = dirs.iter().map(|d| Request::Mkd(d.to_string())).collect();
    client
        .request_many(&mkdirs, |_, reply| match reply {
            Ok(_) | Err(ClientError::Server { code: 553, .. }) => Ok(()),
            Err(e) => Err(e),
        })
        .await?;
    let lists: Vec<Request> = dirs
        .iter()
        .map(|d| Request::List(Some(d.to_string())))
        .collect();
    // Only the sizes of files we would send are kept, whatever the listings hold.
    let wanted: std::collections::HashSet<&VPath> = files.iter().map(|f| &f.1).collect();
    let mut there = std::collections::HashMap::new();
    client
        .request_many(&lists, |i, reply| {
            for line in reply.map(|r| r.lines).unwrap_or_default() {
                if let Ok(Entry {
                    kind: 'f',
                    size,
                    name,
                    ..
                }) = Entry::parse(&line)
                {
                    let path = dirs[i].join(&name);
                    if wanted.contains(&path) {
                        there.insert(path, size);
                    }
                }
            }
            Ok(())
        })
        .await?;
    // A file of the same size is complete if its hash matches too.
    let same: Vec<usize> = (0..files.len())
        .filter(|&i| there.get(&files[i].1) == Some(&files[i].2))
        .collect();
    let hashes: Vec<Request> = same
        .iter()
        .map(|&i| Request::Hash(files[i].1.to_string()))
        .collect();
    let mut complete = std::collections::HashSet::new();
    client
        .request_many(&hashes, |k, reply| {
            let i = same[k];
            if reply
                .is_ok_and(|r| local_hash(&files[i].0).is_some_and(|h| protocol::hex(&h) == r.text))
            {
                complete.insert(i);
            }
            Ok(())
        })
        .await?;
    let skipped = complete.len();
    let (small, big): (Vec<_>, Vec<_>) = files
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !complete.contains(i))
        .map(|(_, f)| f)
        .partition(|(_, _, size)| *size <= protocol::MAX_SEND);

    let multi = MultiProgress::new();
    let total = total_bar(&multi, (small.len() + big.len()) as u64);
    let mut sent = 0;
    let mut pending: Vec<(PathBuf, VPath)> = small.into_iter().map(|(p, r, _)| (p, r)).collect();
    let mut attempt = 0;
    while !pending.is_empty() {
        let mut stored = vec![false; pending.len()];
        let mut refused = None;
        let result = remote
            .client()
            .await?
            .send_many(&pending, |i, outcome| match outcome {
                Ok(t) => {
                    stored[i] = true;
                    multi.suspend(|| report(&t, &pending[i].1.to_string()));
                    total.inc(1);
                }
                Err(e) => {
                    refused.get_or_insert(e);
                }
            })
            .await;
        sent += stored.iter().filter(|s| **s).count();
        if let Some(e) = refused {
            return Err(e);
        }
        match result {
            Ok(()) => break,
            Err(e) if e.is_retriable() && attempt < remote.retries => {
                attempt += 1;
                remote.client = None;
                multi.suspend(|| {
                    eprintln!(
                        "ftpx: {}; retrying ({attempt}/{})",
                        printable(&e.to_string()),
                        remote.retries
                    )
                });
                tokio::time::sleep(Duration::from_millis(500 * (1 << attempt.min(5)))).await;
                let mut keep = stored.iter().map(|s| !s);
                pending.retain(|_| keep.next().unwrap_or(true));
            }
            Err(e) => return Err(e),
        }
    }
    for (path, rpath, _) in big {
        let bar = file_bar(Some(&multi), &rpath.to_string());
        let t = remote
            .transfer(&Transfer::Put(path, rpath.clone()), &bar)
            .await;
        bar.finish_and_clear();
        let t = t?;
        multi.suspend(|| report(&t, &rpath.to_string()));
        sent += 1;
        total.inc(1);
    }
    total.finish_and_clear();
    out!("{sent} files sent, {skipped} already complete");
    Ok(())
}

/// Levels below the directory `get -r` copies, at most: an honest server's
/// paths have at most 4096 bytes, so at most 2048 levels.
const MAX_TREE_DEPTH: usize = 2048;
/// Entries (files, directories and others) `get -r` takes from the remote
/// tree in one run, at most; beyond, copy the tree in parts.
const MAX_TREE_ENTRIES: usize = 1_000_000;
/// Directories `get -r` has found and not yet copied, at most. Each is kept
/// as one name of at most [`crate::protocol::MAX_NAME`] bytes.
const MAX_TREE_PENDING: usize = 100_000;

/// One directory of the tree `get -r` is copying, and its subdirectories
/// still to copy.
struct Level {
    remote: VPath,
    local: PathBuf,
    subdirs: Vec<String>,
}

/// Copies a remote tree, one directory at a time as it walks: list it,
/// make its local directory, fetch its files, then go down. Only the
/// names of directories still to copy are kept, within the limits above.
async fn get_tree(remote: &mut Remote, src: &str, dest: Option<&str>) -> Result<(), ClientError> {
    let root = remote.client().await?.remote_path(src)?;
    let name = root.file_name().unwrap_or("home").to_string();
    let local_root = PathBuf::from(dest.unwrap_or(&name));
    let mut walk = Walk::default();
    // The directory the user named is theirs to choose, even through a link.
    let subdirs = walk
        .copy_dir(remote, &root, &local_root, |d| std::fs::create_dir_all(d))
        .await?;
    let mut stack = vec![Level {
        remote: root,
        local: local_root,
        subdirs,
    }];
    while let Some(top) = stack.last_mut() {
        let Some(name) = top.subdirs.pop() else {
            stack.pop();
            continue;
        };
        walk.pending -= 1;
        let (r, l) = (top.remote.join(&name), top.local.join(&name));
        if stack.len() >= MAX_TREE_DEPTH {
            return Err(ClientError::Protocol(format!(
                "{}: the remote tree is more than {MAX_TREE_DEPTH} levels deep",
                r
            )));
        }
        let subdirs = walk.copy_dir(remote, &r, &l, make_local_dir).await?;
        stack.push(Level {
            remote: r,
            local: l,
            subdirs,
        });
    }
    walk.total.finish_and_clear();
    out!(
        "{} files received, {} already complete",
        walk.got,
        walk.skipped
    );
    Ok(())
}

/// What `get -r` has done so far.
struct Walk {
    entries: usize,
    pending: usize,
    got: usize,
    skipped: usize,
    multi: MultiProgress,
    total: ProgressBar,
}

impl Default for Walk {
    fn default() -> Walk {
        let multi = MultiProgress::new();
        let total = total_bar(&multi, 0);
        Walk {
            entries: 0,
            pending: 0,
            got: 0,
            skipped: 0,
            multi,
            total,
        }
    }
}

impl Walk {
    /// Copies the files of the remote directory `rdir` into `ldir` (made
    /// by `make`) and returns the names of its subdirectories, last first.
    async fn copy_dir(
        &mut self,
        remote: &mut Remote,
        rdir: &VPath,
        ldir: &Path,
        make: impl FnOnce(&Path) -> std::io::Result<()>,
    ) -> Result<Vec<String>, ClientError> {
        let listing = remote.client().await?.list(Some(&rdir.to_string())).await?;
        if listing.truncated {
            return Err(ClientError::Local(format!(
                "{rdir}: listing truncated by the server; copy it in parts"
            )));
        }
        self.entries += listing.entries.len();
        if self.entries > MAX_TREE_ENTRIES {
            return Err(ClientError::Local(format!(
                "the remote tree has more than {MAX_TREE_ENTRIES} entries; copy it in parts"
            )));
        }
        make(ldir).map_err(|e| ClientError::Local(format!("{}: {e}", ldir.display())))?;
        let mut subdirs = vec![];
        let mut files = vec![];
        for Entry {
            kind, size, name, ..
        } in listing.entries
        {
            if !safe_name(&name) {
                self.multi.suspend(|| {
                    eprintln!(
                        "ftpx: skipping {} in {}: not a usable file name",
                        printable(&format!("{name:?}")),
                        printable(&rdir.to_string())
                    )
                });
                continue;
            }
            match kind {
                'd' => subdirs.push(name),
                'f' => files.push((name, size)),
                _ => self.multi.suspend(|| {
                    eprintln!(
                        "ftpx: skipping {}: not a regular file",
                        printable(&rdir.join(&name).to_string())
                    )
                }),
            }
        }
        self.pending += subdirs.len();
        if self.pending > MAX_TREE_PENDING {
            return Err(ClientError::Local(format!(
                "the remote tree has more than {MAX_TREE_PENDING} directories waiting to be copied; copy it in parts"
            )));
        }
        self.total.inc_length(files.len() as u64);
        for (name, size) in files {
            let (rpath, lpath) = (rdir.join(&name), ldir.join(&name));
            // Only a regular file (not a link) can already be complete.
            let local_size = std::fs::symlink_metadata(&lpath)
                .ok()
                .filter(|m| m.is_file())
                .map(|m| m.len());
            let lp = lpath.clone();
            if local_size == Some(size)
                && remote_matches(remote.client().await?, &rpath, size, || local_hash(&lp)).await
            {
                self.skipped += 1;
                self.total.inc(1);
                continue;
            }
            let bar = file_bar(Some(&self.multi), &rpath.to_string());
            let t = remote
                .transfer(&Transfer::Get(rpath, lpath.clone()), &bar)
                .await;
            bar.finish_and_clear();
            let t = t?;
            self.multi
                .suspend(|| report(&t, &lpath.display().to_string()));
            self.got += 1;
            self.total.inc(1);
        }
        subdirs.reverse();
        Ok(subdirs)
    }
}

/// Makes a directory below the one `get -r` copies into, or takes the one
/// there, but never a symbolic link: nothing is written through a link.
fn make_local_dir(path: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(path)?;
            if meta.file_type().is_symlink() {
                Err(std::io::Error::other(
                    "is a symbolic link; refusing to write through it",
                ))
            } else if !meta.is_dir() {
                Err(std::io::Error::other("exists and is not a directory"))
            } else {
                Ok(())
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = parse_target("ann@example.org:99").unwrap();
        assert_eq!(
            (t.user.as_str(), t.host.as_str(), t.port),
            ("ann", "example.org", 99)
        );
        let t = parse_target("ann@[::1]:7").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 7));
        let t = parse_target("bo@::1").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port),
            ("::1", crate::config::DEFAULT_PORT)
        );
        assert!(parse_target("ann@").is_err());
        assert!(parse_target("ann@h:x").is_err());
    }

    #[test]
    fn times_and_entries() {
        assert_eq!(format_time(0), "1970-01-01 00:00");
        assert_eq!(format_time(1_700_000_000), "2023-11-14 22:13");
        assert_eq!(format_time(951_782_400), "2000-02-29 00:00");
        let e = format_entry(&Entry::parse("d 0 1700000000 \"a b\"").unwrap());
        assert!(e.starts_with('d') && e.ends_with("a b/"), "{e}");
        assert!(Entry::parse("x y").is_err());
        // The wire refuses control characters in words; a name is escaped all the same.
        assert!(Entry::parse("f 1 0 \"\u{1b}[2J\"").is_err());
        let e = format_entry(&Entry {
            kind: 'f',
            size: 1,
            mtime: 0,
            name: "\u{1b}]0;pwned\u{7}".into(),
        });
        assert!(
            e.ends_with("\\x1b]0;pwned\\x07") && !e.contains('\u{1b}'),
            "{e}"
        );
    }

    #[test]
    fn printable_escapes_controls_only() {
        assert_eq!(printable("plain näme ✓.txt"), "plain näme ✓.txt");
        assert!(matches!(printable("ok"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(printable("\u{1b}[2Jhi"), "\\x1b[2Jhi");
        assert_eq!(
            printable("a\nb\rc\td\0e\u{7f}"),
            "a\\x0ab\\x0dc\\x09d\\x00e\\x7f"
        );
        // C1 controls (8-bit CSI) and bidirectional overrides.
        assert_eq!(printable("\u{9b}31m\u{202e}x"), "\\u{9b}31m\\u{202e}x");
        for c in (0u32..0x20).chain(0x7f..0xa0).filter_map(char::from_u32) {
            let p = printable(&c.to_string()).into_owned();
            assert!(!p.chars().any(char::is_control), "{c:?} -> {p:?}");
        }
    }

    #[test]
    fn hostile_names() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/etc/passwd",
            "a/b",
            "a\\b",
            "a\nb",
            "\u{1b}[2J",
            "a\0b",
            "\u{9b}",
            &"n".repeat(256),
        ] {
            assert!(!safe_name(bad), "{bad:?}");
        }
        assert!(safe_name("ok name.txt") && safe_name(&"n".repeat(255)));
    }
}
