//! Server settings: one plain struct per section of `etc/ftpx.toml`, each
//! field with its default. A missing key, or a missing `etc/ftpx.toml`,
//! means the default; an unknown key, or a `--config` file that does not
//! exist, is an error, so that a typo never silently falls back.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub const DEFAULT_CONFIG: &str = "etc/ftpx.toml";
pub const DEFAULT_PORT: u16 = 2121;

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[derive(Default)]
pub struct Config {
    pub server: ServerSection,
    pub accounts: AccountsSection,
    pub limits: LimitsSection,
    pub transfer: TransferSection,
    pub defender: DefenderSection,
    pub cluster: ClusterSection,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Where the certificate, its key and the CA live.
    pub cert_dir: PathBuf,
    /// Mutable state: homes, the user database, journals, logs.
    pub var_dir: PathBuf,
    /// Log file; relative paths are under the working directory.
    pub log_file: PathBuf,
    /// tracing filter for the log file: error, warn, info, debug or trace.
    pub log_level: String,
    /// Lines of info and below the log file takes in one second, about (0:
    /// no cap); the rest are dropped and counted in the next line written.
    /// Warnings and errors always go in.
    pub log_max_lines_per_sec: u32,
    /// How log lines are written: `text` or `json` (one object a line).
    pub log_format: crate::logging::schema::LogFormat,
    /// Address of the Prometheus metrics listener (`GET /metrics`); empty:
    /// none. Plain HTTP with no login: keep it on loopback.
    pub metrics_listen: String,
    /// Unix socket of `ftpx status` and `ftpx kick`, readable and writable
    /// by the server's user only; empty: none.
    pub control_socket: PathBuf,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            cert_dir: "certs".into(),
            var_dir: "var".into(),
            log_file: "var/log/ftpx.log".into(),
            log_level: "info".into(),
            log_max_lines_per_sec: 10_000,
            log_format: crate::logging::schema::LogFormat::Text,
            metrics_listen: String::new(),
            control_socket: "var/ftpx.sock".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccountsSection {
    /// Whether clients may create accounts with `connect --register`.
    pub registration: bool,
    /// Quota of a self-registered user: drawn at random from this range.
    pub registered_quota_min: Size,
    pub registered_quota_max: Size,
    /// Quota of a user made by `useradd` without `--quota`.
    pub default_quota: Size,
    /// Files plus directories a self-registered user may have.
    pub registered_max_files: u64,
    /// Files plus directories of a user made by `useradd` without `--max-files`.
    pub default_max_files: u64,
    /// Password length in characters.
    pub password_min_len: usize,
    pub password_max_len: usize,
    /// scrypt cost for new hashes: N = 2^log_n, r, p. Stored hashes keep their own.
    pub scrypt_log_n: u8,
    pub scrypt_r: u32,
    pub scrypt_p: u32,
    /// Hashes with a higher cost than this are refused (a tampered database must not exhaust memory).
    pub scrypt_max_log_n: u8,
    /// Password hashes computed at the same time, at most; the turns go
    /// round-robin between sources.
    pub hash_concurrency: usize,
    /// Every failed login is answered after this long, whatever failed.
    pub login_failure_delay_ms: u64,
}

impl Default for AccountsSection {
    fn default() -> Self {
        AccountsSection {
            registration: true,
            registered_quota_min: Size(10 << 20),
            registered_quota_max: Size(20 << 20),
            default_quota: Size(100 << 20),
            registered_max_files: 10_000,
            default_max_files: 1_000_000,
            password_min_len: 8,
            password_max_len: 256,
            scrypt_log_n: 17,
            scrypt_r: 8,
            scrypt_p: 1,
            scrypt_max_log_n: 20,
            hash_concurrency: 2,
            login_failure_delay_ms: 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Sessions at once, in all.
    pub max_sessions: usize,
    /// Sessions at once from one address (an office behind one NAT counts as one).
    pub max_sessions_per_ip: usize,
    /// Time for a client to finish the TLS handshake.
    pub handshake_timeout_secs: u64,
    /// Time from connect to a successful login.
    pub login_timeout_secs: u64,
    /// A logged-in session with no request for this long is closed (never during a transfer).
    pub idle_timeout_secs: u64,
    /// One read or write that makes no progress for this long ends the session.
    pub io_timeout_secs: u64,
    /// Longest request line in bytes.
    pub max_line: usize,
    /// Longest path argument in bytes.
    pub max_path: usize,
    /// Entries one `ls` returns at most.
    pub max_list_entries: usize,
    /// Time running sessions get to finish after SIGINT or SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Malformed requests in one session, and requests refused before
    /// login, after which the session is closed (0: no limit).
    pub max_bad_requests: u32,
    /// Files all sessions together may hold open for downloads planned
    /// ahead of their turn (a tree's small files, read at once)...
    pub read_ahead_files: usize,
    /// ...and the bytes they may hold read (0 for either: none).
    pub read_ahead: Size,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_sessions: 1000,
            max_sessions_per_ip: 200,
            handshake_timeout_secs: 10,
            login_timeout_secs: 60,
            idle_timeout_secs: 900,
            io_timeout_secs: 60,
            max_line: 8192,
            max_path: 4096,
            max_list_entries: 100_000,
            shutdown_grace_secs: 10,
            max_bad_requests: 20,
            read_ahead_files: 1024,
            read_ahead: Size(64 << 20),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransferSection {
    /// Bytes per chunk frame (each verified by its own BLAKE3).
    pub chunk_size: Size,
    /// The receiver makes its progress durable (fsync, journal) after this many bytes...
    pub checkpoint_bytes: Size,
    /// ...or this many seconds, whichever comes first.
    pub checkpoint_secs: u64,
    /// Unfinished uploads not touched for this long are deleted.
    pub partial_ttl_hours: u64,
    /// How often the sweeper looks for expired unfinished uploads.
    pub partial_sweep_secs: u64,
    /// Bytes of chunk hashes kept of files sent, so that a download of an
    /// unchanged file is not hashed again; 0 keeps none.
    pub hash_cache: Size,
}

impl Default for TransferSection {
    fn default() -> Self {
        TransferSection {
            chunk_size: Size(256 << 10),
            checkpoint_bytes: Size(64 << 20),
            checkpoint_secs: 2,
            partial_ttl_hours: 24 * 7,
            partial_sweep_secs: 600,
            hash_cache: Size(32 << 20),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DefenderSection {
    /// Failures of one account from one source before that pair is banned.
    pub pair_max_failures: u32,
    /// Different accounts failing from one source before the source is banned.
    pub source_max_accounts: usize,
    /// Failures of one account from all sources before its failures are slowed further.
    pub account_slow_after: u32,
    /// Failures older than this are forgotten.
    pub window_secs: u64,
    /// How long a ban lasts.
    pub ban_secs: u64,
    /// Longest delay before a failed login is answered.
    pub max_delay_ms: u64,
    /// Registrations one source may make per hour.
    pub registrations_per_hour: u32,
}

impl Default for DefenderSection {
    fn default() -> Self {
        DefenderSection {
            pair_max_failures: 10,
            source_max_accounts: 20,
            account_slow_after: 50,
            window_secs: 900,
            ban_secs: 900,
            max_delay_ms: 10_000,
            registrations_per_hour: 20,
        }
    }
}

/// `[cluster]`: several nodes as one service, their shared state in one
/// PostgreSQL database (see [`crate::cluster`]). Off while `database` is empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// `postgres://USER:PASSWORD@HOST:PORT/DBNAME`; empty: a single node.
    /// The environment's `FTPX_DATABASE_URL` wins over it.
    pub database: String,
    /// PEM file of the CA that signed the database's certificate. With it,
    /// the connection is TLS (rustls) and the certificate is checked; the
    /// URL's `sslmode` says whether plain text is refused (`require`).
    pub ca_file: PathBuf,
    /// How long a node's reservations, upload locks and sessions count
    /// after it last renewed them; a node renews every third of this.
    pub lease_secs: u64,
    /// Longest wait to open a connection to the database.
    pub connect_timeout_ms: u64,
    /// Longest a statement may run (the database cancels it past this).
    pub statement_timeout_ms: u64,
    /// Connections to the database a node keeps open at most.
    pub pool_size: usize,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            database: String::new(),
            ca_file: PathBuf::new(),
            lease_secs: 30,
            connect_timeout_ms: 3000,
            statement_timeout_ms: 5000,
            pool_size: 16,
        }
    }
}

impl ClusterSection {
    /// The database URL in force: the environment's, else the file's; None
    /// for a single node.
    pub fn url(&self) -> Option<String> {
        std::env::var("FTPX_DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(|| Some(self.database.clone()).filter(|u| !u.is_empty()))
    }
}

impl Config {
    /// The settings a command runs on: the file given with `--config`,
    /// which must exist (a typo must not run a server on the defaults), else
    /// `etc/ftpx.toml`, whose absence means the defaults.
    pub fn from_arg(given: Option<&Path>) -> Result<Config, String> {
        match given {
            Some(path) => Config::read(path, false),
            None => Config::load(Path::new(DEFAULT_CONFIG)),
        }
    }

    /// Reads `path`; a missing file gives the defaults.
    pub fn load(path: &Path) -> Result<Config, String> {
        Config::read(path, true)
    }

    fn read(path: &Path, missing_is_default: bool) -> Result<Config, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if missing_is_default {
                    return Ok(Config::default());
                }
                return Err(format!("config file {} does not exist", path.display()));
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let config: Config =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        config
            .check()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        self.metrics_addr()?;
        let a = &self.accounts;
        if a.registered_quota_min.0 > a.registered_quota_max.0 {
            return Err("registered_quota_min is larger than registered_quota_max".into());
        }
        if a.password_min_len == 0 || a.password_min_len > a.password_max_len {
            return Err("password_min_len must be at least 1 and at most password_max_len".into());
        }
        if scrypt::Params::new(a.scrypt_log_n, a.scrypt_r, a.scrypt_p).is_err()
            || a.scrypt_log_n > a.scrypt_max_log_n
        {
            return Err("scrypt_log_n, scrypt_r, scrypt_p are not valid scrypt parameters within scrypt_max_log_n".into());
        }
        if a.hash_concurrency == 0 {
            return Err("hash_concurrency must be at least 1".into());
        }
        let chunk = self.transfer.chunk_size.0;
        if !crate::protocol::valid_chunk_size(chunk) {
            return Err(format!(
                "chunk_size must be a power of two from 1KiB to {}",
                Size(crate::protocol::MAX_CHUNK.into())
            ));
        }
        if self.transfer.partial_sweep_secs == 0 {
            return Err("partial_sweep_secs must be at least 1".into());
        }
        let c = &self.cluster;
        if c.lease_secs < 3
            || c.pool_size < 2
            || c.connect_timeout_ms == 0
            || c.statement_timeout_ms == 0
        {
            return Err("cluster: lease_secs must be at least 3, pool_size at least 2, the timeouts at least 1".into());
        }
        let l = &self.limits;
        if l.max_line < 256 || l.max_path == 0 || l.max_sessions == 0 || l.max_sessions_per_ip == 0
        {
            return Err("max_line must be at least 256; max_path, max_sessions and max_sessions_per_ip at least 1".into());
        }
        Ok(())
    }

    /// Where the metrics listener listens, if anywhere.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, String> {
        let listen = self.server.metrics_listen.trim();
        if listen.is_empty() {
            return Ok(None);
        }
        listen.parse().map(Some).map_err(|_| {
            format!("metrics_listen {listen:?} is not an ADDRESS:PORT (like 127.0.0.1:9121)")
        })
    }

    /// The control socket, if there is one.
    pub fn control_socket(&self) -> Option<&Path> {
        let path = &self.server.control_socket;
        (!path.as_os_str().is_empty()).then_some(path.as_path())
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.handshake_timeout_secs)
    }
    pub fn login_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.login_timeout_secs)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.idle_timeout_secs)
    }
    pub fn io_timeout(&self) -> Duration {
        Duration::from_secs(self.limits.io_timeout_secs)
    }
    pub fn users_file(&self) -> PathBuf {
        self.server.var_dir.join("users.toml")
    }
    pub fn homes_dir(&self) -> PathBuf {
        self.server.var_dir.join("homes")
    }
    pub fn partial_dir(&self) -> PathBuf {
        self.server.var_dir.join("partial")
    }
    pub fn partial_ttl(&self) -> Duration {
        Duration::from_secs(self.transfer.partial_ttl_hours.saturating_mul(3600))
    }
}

/// A byte count, written in the config as a number or with a unit (`"15MiB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&human_bytes(self.0))
    }
}

/// Parses `500k`, `15MiB`, `2GB`, `1024`: k/K/KiB… are powers of 1024,
/// kB/MB/GB/TB powers of 1000.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let bad = || format!("invalid size {s:?}: expected a byte count like 500k, 15MiB or 2GB");
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// `15728640` → `15.0 MiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("500k"), Ok(500 * 1024));
        assert_eq!(parse_size("15MiB"), Ok(15 << 20));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("7"), Ok(7));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("3 kB"), Ok(3000));
        for bad in [
            "",
            "MiB",
            "-1",
            "1.5M",
            "10 parsecs",
            "99999999999999999999",
            "20000000T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(human_bytes(15 << 20), "15.0 MiB");
        assert_eq!(human_bytes(12), "12 B");
    }

    #[test]
    fn shipped_config_is_the_default() {
        let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/etc/ftpx.toml");
        let text = std::fs::read_to_string(shipped).unwrap();
        // Every documented key, uncommented, must parse and equal the default.
        let uncommented: String = text
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|r| {
                        r.split_once(" = ").is_some_and(|(k, _)| {
                            k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                        })
                    })
                    .unwrap_or(l)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let parsed: Config = toml::from_str(&uncommented).unwrap();
        let d = Config::default();
        assert_eq!(format!("{parsed:?}"), format!("{d:?}"));
        assert!(
            uncommented.matches(" = ").count() >= 44,
            "a key is missing from etc/ftpx.toml"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        for bad in [
            "[limits]\nmax_lines = 3\n",
            "[transfer]\nchunk_size = \"9GiB\"\n",
            "[accounts]\nregistered_quota_min = \"30MiB\"\n",
            "[server]\nlog_format = \"xml\"\n",
            "[server]\nmetrics_listen = \"localhost\"\n",
            "x",
        ] {
            std::fs::write(&p, bad).unwrap();
            assert!(Config::load(&p).is_err(), "{bad}");
        }
        let missing = dir.path().join("missing.toml");
        assert!(Config::load(&missing).is_ok());
        let given = Config::from_arg(Some(&missing)).unwrap_err();
        assert!(
            given.contains("missing.toml") && given.contains("does not exist"),
            "{given}"
        );
    }
}
