//! The admin's subcommands: `serve`, `gen-cert`, the user management
//! commands `useradd`, `userdel`, `usermod` and `users`, and `completions`
//! and `man`, which print what a package installs beside the binary.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::cli::Cli;
use crate::config::{Config, human_bytes, parse_size};
use crate::server::{Server, Stopping};
use crate::store::users::{self, Password, Records as _, User, UserDb};
use crate::tls;

/// `ftpx serve`: runs until SIGINT or SIGTERM.
pub async fn serve(config_path: Option<&Path>, listen: Option<SocketAddr>) -> Result<(), String> {
    let mut config = Config::from_arg(config_path)?;
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    let log = crate::logging::init_server(
        &config.server.log_file,
        &config.server.log_level,
        config.server.log_max_lines_per_sec,
        config.server.log_format,
    )?;
    // A file-size limit (ulimit -f) must fail the one write, not kill the server.
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    // Password hashes (up to 128 MiB each) run on whichever blocking thread
    // is free; without this, glibc keeps a freed hash buffer in each thread's
    // pool and a login burst holds far more than hash_concurrency of them.
    // SAFETY: mallopt only tunes the allocator; called before any hashing.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20)
    };
    for dir in [config.homes_dir(), config.partial_dir()] {
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let cert_dir = config.server.cert_dir.clone();
    if !tls::has_server_cert(&cert_dir) {
        let hosts = tls::default_hosts();
        tls::gen_cert(&cert_dir, &hosts, true)?;
        eprintln!(
            "ftpx: made a certificate for {} in {}; clients trust {}",
            hosts.join(", "),
            cert_dir.display(),
            cert_dir.join(tls::CA_FILE).display()
        );
    }
    let tls_config = tls::server_config(&cert_dir)?;
    let addr = config.server.listen;
    let server = Arc::new(Server::new(config)?);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let _beside = crate::server::Beside::start(&server, log).await?;
    let stop = shutdown_signal();
    tracing::info!(event = "start", address = %local, "listening");
    println!("listening on {local}");
    let _ = std::io::stdout().flush();
    crate::server::run_reporting(listener, server, Arc::new(tls_config), stop, say_stopping)
        .await
        .map_err(|e| e.to_string())?;
    eprintln!("ftpx: stopped");
    Ok(())
}

/// Tells the operator's terminal (or the journal) why a stop takes time.
fn say_stopping(stopping: Stopping) {
    let sessions = |n: usize| match n {
        1 => "1 session".to_string(),
        n => format!("{n} sessions"),
    };
    match stopping {
        Stopping::Waiting { sessions: 0, .. } => {
            eprintln!("ftpx: stopping: no sessions to wait for")
        }
        Stopping::Waiting { sessions: n, grace } => eprintln!(
            "ftpx: stopping: waiting up to {} s for {}",
            grace.as_secs(),
            sessions(n)
        ),
        Stopping::GraceOver { sessions: n } => {
            eprintln!("ftpx: grace period over: closing {}", sessions(n))
        }
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are in place once this
/// returns, before the server says it listens: a signal sent at once is
/// not taken for the default one, which would kill it.
fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            // Without signal handlers, run until killed.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }
}

/// `ftpx gen-cert`.
pub fn gen_cert(dir: &Path, hosts: Vec<String>, force: bool) -> Result<(), String> {
    let hosts = if hosts.is_empty() {
        tls::default_hosts()
    } else {
        hosts
    };
    let files = tls::gen_cert(dir, &hosts, force)?;
    for f in files {
        println!("wrote {}", f.display());
    }
    println!("certificate valid for: {}", hosts.join(", "));
    Ok(())
}

/// Reads a new password: one line of standard input, or twice on a terminal.
fn new_password(from_stdin: bool) -> Result<Password, String> {
    if from_stdin {
        return crate::client::shell::read_stdin_line().map(Password::new);
    }
    if !std::io::stdin().is_terminal() {
        return Err("standard input is not a terminal: use --password-stdin".into());
    }
    let p = rpassword::prompt_password("password: ")
        .map_err(|e| format!("cannot read the password: {e}"))?;
    let again = rpassword::prompt_password("password again: ")
        .map_err(|e| format!("cannot read the password: {e}"))?;
    if p != again {
        return Err("the passwords differ".into());
    }
    Ok(Password::new(p))
}

/// `ftpx useradd`.
pub fn useradd(
    config_path: Option<&Path>,
    name: &str,
    quota: Option<&str>,
    max_files: Option<u64>,
    password_stdin: bool,
) -> Result<(), String> {
    let config = Config::from_arg(config_path)?;
    users::check_name(name)?;
    let quota = match quota {
        Some(q) => parse_size(q)?,
        None => config.accounts.default_quota.0,
    };
    let db = user_db(&config)?;
    if db.find(name)?.is_some() {
        return Err(format!("user {name:?} already exists"));
    }
    let password = new_password(password_stdin)?;
    users::check_password(&password, &config.accounts)?;
    let hash = users::hash_password(&password, &config.accounts)?;
    let home = db.home(name);
    let revived = home.exists();
    let user = User {
        name: name.to_string(),
        quota,
        hash,
        created: crate::clock::now_secs(),
        max_files,
    };
    let files = user.max_files(&config.accounts);
    db.add(user)?;
    println!(
        "added {name}: quota {quota} bytes ({}), at most {files} files and directories, home {}{}",
        human_bytes(quota),
        home.display(),
        if revived { " (kept from before)" } else { "" }
    );
    Ok(())
}

/// The accounts the config names: `var/users.toml`, or with `[cluster]`
/// the shared database.
fn user_db(config: &Config) -> Result<UserDb, String> {
    match config.cluster.url() {
        None => Ok(UserDb::new(&config.server.var_dir)),
        Some(url) => {
            let cluster = crate::cluster::Cluster::open(&url, &config.cluster)?;
            let accounts = crate::cluster::accounts::Accounts::new(cluster);
            Ok(UserDb::with_records(
                &config.server.var_dir,
                Arc::new(accounts),
            ))
        }
    }
}

/// `ftpx import-users`: a single node's accounts into the cluster's database.
pub fn import_users(config_path: Option<&Path>, file: &Path) -> Result<(), String> {
    let config = Config::from_arg(config_path)?;
    let Some(url) = config.cluster.url() else {
        return Err(
            "no cluster database is configured ([cluster] database or FTPX_DATABASE_URL)".into(),
        );
    };
    if !file.exists() {
        return Err(format!("{} does not exist", file.display()));
    }
    let dir = file.parent().unwrap_or(Path::new("."));
    let users = crate::store::users::UsersFile::new(dir)
        .with_file(file)
        .load()?;
    let cluster = crate::cluster::Cluster::open(&url, &config.cluster)?;
    let added = crate::cluster::accounts::Accounts::new(cluster).import(&users)?;
    println!(
        "imported {added} of {} accounts from {}{}",
        users.len(),
        file.display(),
        match users.len() - added {
            0 => String::new(),
            n => format!(" ({n} already there, left as they are)"),
        }
    );
    Ok(())
}

/// `ftpx userdel`.
pub fn userdel(config_path: Option<&Path>, name: &str, remove_home: bool) -> Result<(), String> {
    let config = Config::from_arg(config_path)?;
    let db = user_db(&config)?;
    users::check_name(name)?;
    let (home, partial) = (db.home(name), config.partial_dir().join(name));
    match db.remove(name, remove_home) {
        Ok(()) => {}
        // What an account deleted earlier left behind can still be removed.
        Err(_) if remove_home && (home.exists() || partial.exists()) => {
            db.remove_home(name)?;
        }
        Err(e) => return Err(e),
    }
    if remove_home {
        match std::fs::remove_dir_all(&partial) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove {}: {e}", partial.display())),
        }
        println!("removed {name} and its home");
    } else {
        println!(
            "removed {name}; its home {} is kept, and until it is removed \
             (userdel --remove-home) the name can't be registered; \
             useradd {name} revives it",
            home.display()
        );
    }
    Ok(())
}

/// `ftpx usermod`.
pub fn usermod(
    config_path: Option<&Path>,
    name: &str,
    quota: Option<&str>,
    max_files: Option<u64>,
    set_password: bool,
    password_stdin: bool,
) -> Result<(), String> {
    let config = Config::from_arg(config_path)?;
    let db = user_db(&config)?;
    if db.find(name)?.is_none() {
        return Err(format!("no user {name:?}"));
    }
    if quota.is_none() && max_files.is_none() && !set_password {
        return Err(
            "nothing to change: give --quota, --max-files, --password or --password-stdin".into(),
        );
    }
    let quota = quota.map(parse_size).transpose()?;
    let hash = if set_password {
        let password = new_password(password_stdin)?;
        users::check_password(&password, &config.accounts)?;
        Some(users::hash_password(&password, &config.accounts)?)
    } else {
        None
    };
    db.modify(name, |u| {
        if let Some(q) = quota {
            u.quota = q;
        }
        if max_files.is_some() {
            u.max_files = max_files;
        }
        if let Some(h) = &hash {
            u.hash = h.clone();
        }
    })?;
    println!("changed {name}");
    Ok(())
}

/// `ftpx users`: name, quota, usage and files, one user a line.
pub fn users(config_path: Option<&Path>) -> Result<(), String> {
    let config = Config::from_arg(config_path)?;
    let db = user_db(&config)?;
    println!(
        "{:<32} {:>14} {:>14} {:>10} {:>10}",
        "USER", "QUOTA", "USED", "FILES", "MAX_FILES"
    );
    for u in db.load()? {
        // The same count as the server's quota: the home plus unfinished uploads.
        let used = crate::store::jail::Home::open(&db.home(&u.name)).and_then(|h| {
            crate::store::quota::scan(
                &h,
                &config.partial_dir().join(&u.name),
                config.partial_ttl(),
            )
        });
        let (bytes, files) = match used {
            Ok(s) => {
                let total = s.total();
                (human_bytes(total.bytes), total.entries.to_string())
            }
            Err(_) => ("-".to_string(), "-".to_string()),
        };
        println!(
            "{:<32} {:>14} {:>14} {:>10} {:>10}",
            u.name,
            human_bytes(u.quota),
            bytes,
            files,
            u.max_files(&config.accounts)
        );
    }
    Ok(())
}

/// `ftpx completions SHELL`: the shell's completion script, made from the
/// command-line definitions, so it never lags behind them.
pub fn completions(shell: clap_complete::Shell) -> Result<(), String> {
    use clap::CommandFactory;
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "ftpx", &mut script);
    print_all(&script)
}

/// `ftpx man`: the man page `ftpx.1`, in roff, made from the command-line
/// definitions; with a directory, it and one page per subcommand, which
/// `ftpx.1` refers to, are written there.
pub fn man(dir: Option<&Path>) -> Result<(), String> {
    use clap::CommandFactory;
    if let Some(dir) = dir {
        clap_mangen::generate_to(Cli::command(), dir)
            .map_err(|e| format!("cannot write the man pages to {}: {e}", dir.display()))?;
        println!("wrote the man pages to {}", dir.display());
        return Ok(());
    }
    let mut page = Vec::new();
    // As in the pages written to a directory: `help` is no page of its own.
    clap_mangen::Man::new(Cli::command().disable_help_subcommand(true))
        .render(&mut page)
        .map_err(|e| format!("cannot make the man page: {e}"))?;
    print_all(&page)
}

/// Writes `bytes` to standard output; a reader that stopped early
/// (`ftpx man | head`) is not an error.
fn print_all(bytes: &[u8]) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(format!("cannot write to standard output: {e}")),
    }
}
