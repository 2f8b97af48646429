//! Command-line arguments (clap). No logic here; `main.rs` dispatches.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ftpx",
    version,
    about = "TLS file transfer with verified, resumable transfers, private homes and quotas"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Server settings file, which must exist [default: etc/ftpx.toml, or
    /// the built-in defaults when that is missing].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server in the foreground until SIGINT or SIGTERM.
    Serve {
        /// Address and port to listen on (overrides the config file).
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<std::net::SocketAddr>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Open a session: an interactive shell, or commands from -c or -b.
    Connect(ConnectArgs),
    /// Make a CA and a server certificate signed by it.
    GenCert {
        /// Directory to write ca.pem, ca.key, server.pem and server.key to.
        #[arg(long, value_name = "DIR", default_value = "certs")]
        dir: PathBuf,
        /// Host name or IP address the certificate is for (repeatable;
        /// default: localhost, 127.0.0.1, ::1).
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// Add a user and make its home.
    Useradd {
        name: String,
        /// Quota, e.g. 500k, 15MiB, 2GB (default: default_quota from the config).
        #[arg(long, value_name = "SIZE")]
        quota: Option<String>,
        /// Files plus directories the user may have (default: default_max_files from the config).
        #[arg(long, value_name = "N")]
        max_files: Option<u64>,
        /// Read the password as one line from standard input.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Remove a user. The home is kept unless --remove-home is given; while
    /// it is there, the name can't be registered by anyone else.
    Userdel {
        name: String,
        /// Remove the user's home, everything in it and its unfinished uploads too.
        #[arg(long)]
        remove_home: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Change a user's quota, file limit or password.
    Usermod {
        name: String,
        #[arg(long, value_name = "SIZE")]
        quota: Option<String>,
        /// Files plus directories the user may have.
        #[arg(long, value_name = "N")]
        max_files: Option<u64>,
        /// Set a new password, read as one line from standard input.
        #[arg(long)]
        password_stdin: bool,
        /// Set a new password, asked twice on the terminal.
        #[arg(long, conflicts_with = "password_stdin")]
        password: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List users with their quota, usage and files.
    Users {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Copy the accounts of a single node's users.toml into the cluster's
    /// database (`[cluster] database` or `FTPX_DATABASE_URL`); names already
    /// there are left as they are.
    ImportUsers {
        /// The file to read.
        #[arg(value_name = "FILE", default_value = "var/users.toml")]
        file: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List the sessions open on the running server and the transfers in
    /// progress: user, peer, since when, path, bytes done and total, rate.
    Status {
        /// Print the server's answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// End every session of USER on the running server (an upload that
    /// was running stays resumable).
    Kick {
        user: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print a completion script for SHELL to standard output.
    Completions {
        /// The shell the script is for.
        shell: clap_complete::Shell,
    },
    /// Print the man page, ftpx.1, to standard output.
    Man {
        /// Write ftpx.1 and a page for each subcommand (ftpx-serve.1, ...)
        /// into DIR instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct ConnectArgs {
    /// Server to connect to: [USER@]HOST[:PORT] (IPv6 as [ADDR]:PORT). USER defaults to $USER.
    pub target: String,
    /// CA certificate the server's certificate must chain to.
    #[arg(long, value_name = "FILE", default_value = "certs/ca.pem")]
    pub ca: PathBuf,
    /// Trust on first use instead of a CA: pin the server's certificate at the
    /// first contact (in known_hosts in the client state directory) and refuse
    /// it if it ever changes.
    #[arg(long, conflicts_with = "ca")]
    pub tofu: bool,
    /// Create the account first, then log in.
    #[arg(long)]
    pub register: bool,
    /// Read the password as one line from standard input.
    #[arg(long)]
    pub password_stdin: bool,
    /// Run these commands (separated by ;) and exit.
    #[arg(short = 'c', value_name = "COMMANDS", conflicts_with = "batch")]
    pub commands: Option<String>,
    /// Run the commands in FILE, one per line, and exit.
    #[arg(short = 'b', value_name = "FILE")]
    pub batch: Option<PathBuf>,
    /// Reconnect and resume this many times when a transfer's connection drops.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub retries: u32,
    /// Seconds one network read or write may stall before the connection counts as lost.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub timeout: u64,
}
