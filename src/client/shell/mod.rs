//! `ftpx connect`: the user's side. Reads commands from the interactive
//! line editor, `-c` or `-b`, runs each on a [`Client`], prints results to
//! standard output and errors to standard error, draws progress bars, and
//! reconnects and resumes when a transfer's connection drops.
//!
//! The parts: this loop and the connection it keeps (`Remote`), the
//! `commands`, the tree transfers of `put -r` (`tree`) and `get -r`
//! (`fetch`), and the `output`: what is printed, escaped, and the
//! progress bars.

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

mod commands;
mod complete;
mod fetch;
mod output;
mod tree;

use std::path::PathBuf;
use std::time::Duration;

use indicatif::ProgressBar;
use tracing::{info, warn};

use crate::cli::ConnectArgs;
use crate::client::{Client, ClientError, Transferred, state_dir};
use crate::protocol::{self, VPath};
use crate::tls::Trust;
use commands::{asks_first, execute, one_request};

pub use output::printable;
use output::said;

/// A local path as the user typed it, with `~` and `~/...` standing for
/// the home directory, as in a shell.
pub(super) fn local_path(arg: &str) -> PathBuf {
    let home = || std::env::var_os("HOME").map(PathBuf::from);
    match arg.strip_prefix('~') {
        Some("") => home().unwrap_or_else(|| PathBuf::from(arg)),
        Some(rest) if rest.starts_with('/') => home()
            .map(|h| h.join(rest.trim_start_matches('/')))
            .unwrap_or_else(|| PathBuf::from(arg)),
        _ => PathBuf::from(arg),
    }
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

/// Where to connect and as whom.
pub(super) struct Target {
    user: String,
    host: String,
    port: u16,
}

pub(super) fn parse_target(s: &str) -> Result<Target, String> {
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
pub(super) fn read_password(args: &ConnectArgs, confirm: bool) -> Result<String, String> {
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
pub(super) struct Remote {
    target: Target,
    password: String,
    trust: Trust,
    io_timeout: Duration,
    retries: u32,
    client: Option<Client>,
    /// Remote directory to return to after a reconnect.
    cwd: String,
    /// Where `cd -` goes.
    previous_cwd: String,
}

impl Remote {
    async fn open(&mut self, register: bool) -> Result<&mut Client, ClientError> {
        // A refused login is not tried again on a new connection.
        if let Some(refused) = self.client.as_ref().and_then(Client::refusal) {
            return Err(refused);
        }
        if self.client.as_ref().is_some_and(|c| !c.is_usable()) {
            self.client = None;
        }
        if self.client.is_none() {
            let mut c = Client::connect_and_login(
                &self.target.host,
                self.target.port,
                &self.trust,
                self.io_timeout,
                (&self.target.user, &self.password, register),
            )
            .await?;
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

    /// Opens a script's session: the login is sent, and its outcome read
    /// with the first command's reply (see [`Client::logged_in`]).
    async fn open_scripted(&mut self, register: bool) -> Result<(), ClientError> {
        let client = Client::connect_and_send_login(
            &self.target.host,
            self.target.port,
            &self.trust,
            self.io_timeout,
            (&self.target.user, &self.password, register),
        )
        .await?;
        info!(user = %self.target.user, register, "login sent");
        self.client = Some(client);
        Ok(())
    }

    /// The outcome of the login, read now if it is still to come.
    async fn logged_in(&mut self) -> Result<(), ClientError> {
        match &mut self.client {
            Some(c) => c.logged_in().await,
            None => Ok(()),
        }
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
                            said(&e),
                            wait.as_secs_f32(),
                            self.retries
                        )
                    });
                    info!(error = ?e.to_string(), attempt, "transfer interrupted; retrying");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }
}

pub(super) enum Transfer {
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
        // Fixed at start: a reconnect after `lcd` reads the same files.
        trust: if args.tofu {
            Trust::Pinned(state_dir().join("known_hosts"))
        } else {
            Trust::Ca(std::path::absolute(&args.ca).unwrap_or_else(|_| args.ca.clone()))
        },
        io_timeout: Duration::from_secs(args.timeout.max(1)),
        retries: args.retries,
        client: None,
        cwd: "/".into(),
        previous_cwd: "/".into(),
    };
    // A script's login goes out with its first command; a person at the
    // prompt hears at once of a wrong password.
    let script = match (&args.commands, &args.batch) {
        (Some(commands), _) => Some(Ok((vec![commands.clone()], true))),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file)
                .map(|text| (text.lines().map(str::to_string).collect(), false))
                .map_err(|e| format!("cannot read {}: {e}", file.display())),
        ),
        (None, None) => None,
    };
    let opened = match script {
        Some(_) => remote.open_scripted(args.register).await,
        None => remote.open(args.register).await.map(drop),
    };
    if let Err(e) = opened {
        return not_opened(&e);
    }
    let status = match script {
        Some(script) => run_script(&mut remote, script).await,
        None => interactive(&mut remote).await,
    };
    if let Some(c) = remote.client.take() {
        c.quit().await;
    }
    status
}

/// Reports a session that did not open (connection, TLS, greeting, login
/// or registration) and returns the exit status: the same whether the
/// login was answered before the first command or with it.
fn not_opened(e: &ClientError) -> u8 {
    let e = match e {
        ClientError::Login(refused) => refused.as_ref(),
        other => other,
    };
    info!(error = ?e.to_string(), "session not opened");
    if let ClientError::Server { code: 430, .. } = e {
        eprintln!("ftpx: login failed: unknown user or wrong password");
    } else {
        eprintln!("ftpx: {}", said(e));
    }
    match e {
        ClientError::Server { code: 430, .. } => exit::LOGIN,
        ClientError::Server {
            code: 553 | 501, ..
        } => exit::LOGIN,
        _ => exit::CONNECT,
    }
}

/// Runs a script (its lines, and whether `;` separates commands in all
/// of them) or reports the file that could not be read. The login was
/// sent with the session: if it was refused, that is all the run reports,
/// as when the login is answered before the first command.
async fn run_script(remote: &mut Remote, script: Result<(Vec<String>, bool), String>) -> u8 {
    let status = match &script {
        Ok((lines, semicolons)) => run_lines(remote, lines, *semicolons).await,
        Err(_) => exit::USAGE,
    };
    if status != exit::INTERRUPTED
        && let Err(e) = remote.logged_in().await
    {
        remote.client = None;
        return not_opened(&e);
    }
    if let Err(e) = &script {
        eprintln!("ftpx: {e}");
    }
    status
}

/// Runs commands until the first failure. A command that asks the server
/// first may start before the login is answered (its request goes out with
/// the login); any other waits for the login's outcome, and no command
/// runs after a refused login (its outcome is then reported by the caller).
/// The last command, if it is one request, sends `QUIT` with it.
async fn run_lines(remote: &mut Remote, lines: &[String], semicolons: bool) -> u8 {
    let split = |line: &str| protocol::split_words(line, semicolons || line.contains(';'));
    // The last line with a command (or one that does not parse).
    let last = lines
        .iter()
        .rposition(|l| split(l).map_or(true, |c| !c.is_empty()));
    for (at, line) in lines.iter().enumerate() {
        let commands = match split(line) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ftpx: {line:?}: {e}");
                return exit::FAILED;
            }
        };
        let last_line = last == Some(at);
        let count = commands.len();
        for (i, mut words) in commands.into_iter().enumerate() {
            // `-COMMAND`, as in sftp's batches: its failure does not end the run.
            let may_fail = match words.first_mut() {
                Some(first) if first.text.starts_with('-') => {
                    first.text.remove(0);
                    true
                }
                _ => false,
            };
            if !asks_first(&words) && remote.logged_in().await.is_err() {
                return exit::FAILED;
            }
            if last_line
                && i + 1 == count
                && one_request(&words)
                && let Some(c) = &mut remote.client
            {
                c.quit_with_next();
            }
            let outcome = tokio::select! {
                r = execute(remote, &words) => r,
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("ftpx: interrupted; run the same command again to resume");
                    return exit::INTERRUPTED;
                }
            };
            if remote.logged_in().await.is_err() {
                return exit::FAILED;
            }
            match outcome {
                Ok(Flow::Continue) => {}
                Ok(Flow::Exit) => return exit::OK,
                Err(e) => {
                    let typed: Vec<&str> = words.iter().map(|w| w.text.as_str()).collect();
                    warn!(command = ?typed.join(" "), error = ?e.to_string(), "command failed");
                    eprintln!("ftpx: {}: {}", printable(&typed.join(" ")), said(&e));
                    if !may_fail {
                        return exit::FAILED;
                    }
                }
            }
        }
    }
    exit::OK
}

pub(super) async fn interactive(remote: &mut Remote) -> u8 {
    let config = rustyline::Config::builder()
        .completion_type(rustyline::CompletionType::List)
        .build();
    let mut editor = match rustyline::Editor::with_config(config) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("ftpx: cannot start the line editor: {e}");
            return exit::FAILED;
        }
    };
    let completion = complete::Completion::new();
    editor.set_helper(Some(completion.clone()));
    let history = state_dir().join("history");
    let _ = editor.load_history(&history);
    let mut status = exit::OK;
    loop {
        let prompt = format!("ftpx:{}> ", printable(&remote.cwd));
        // The completer lists remote directories while the line is read.
        completion.lend(remote.client.take());
        let read = tokio::task::block_in_place(|| editor.readline(&prompt));
        remote.client = completion.take_back();
        let line = match read {
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
        // Written as it goes: a client killed keeps what was typed.
        let _ = std::fs::create_dir_all(state_dir());
        let _ = editor.append_history(&history);
        let commands = match protocol::split_words(&line, true) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ftpx: {e}");
                continue;
            }
        };
        for words in commands {
            completion.after(&words);
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
                    warn!(error = ?e.to_string(), "command failed");
                    eprintln!("ftpx: {}", said(&e));
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

pub(super) enum Flow {
    Continue,
    Exit,
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
}
