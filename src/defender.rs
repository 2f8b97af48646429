//! Throttling of password guessing and registration floods.
//!
//! Failed logins are counted per (source, account) pair, per source across
//! accounts, and per account across sources, over a sliding window:
//!
//! - a pair's failures slow its next replies (the failure delay doubles with
//!   each failure, up to `max_delay_ms`) and, at `pair_max_failures`, ban that
//!   pair for `ban_secs`: one person's typos, or an attack on one account,
//!   lock out only that account from that source;
//! - a source that fails on `source_max_accounts` different accounts is
//!   password spraying, and the whole source is banned;
//! - an account attacked from many sources is only slowed, never locked,
//!   so that an attacker cannot lock its owner out from everywhere.
//!
//! A source is an IPv4 address or an IPv6 /64. Registrations are limited per
//! source per hour. All times are monotonic. Every throttle, ban and release
//! is logged.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::DefenderSection;

/// An IPv4 address, or an IPv6 address cut to its /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    Source(IpAddr::V6(std::net::Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
            v4 => Source(v4),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(_) => write!(f, "{}/64", self.0),
            v4 => write!(f, "{v4}"),
        }
    }
}

/// Registrations are counted, and a source over its limit warned about, per hour.
const REGISTRATION_WINDOW: Duration = Duration::from_secs(3600);

#[derive(Debug, Default)]
struct State {
    /// Failure times per (source, account).
    pairs: HashMap<(Source, String), Vec<Instant>>,
    /// Accounts that failed from a source, with the last failure time.
    sources: HashMap<Source, HashMap<String, Instant>>,
    /// Failure times per account, from all sources.
    accounts: HashMap<String, Vec<Instant>>,
    banned_pairs: HashMap<(Source, String), Instant>,
    banned_sources: HashMap<Source, Instant>,
    registrations: HashMap<Source, Vec<Instant>>,
    /// When a source was last warned about for registering too often: one
    /// warning an hour, however often it tries.
    registrations_warned: HashMap<Source, Instant>,
}

#[derive(Debug, Default)]
pub struct Defender {
    settings: DefenderSection,
    state: Mutex<State>,
}

/// What to do with a login attempt before checking its password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused without looking at the password (answered like a failure).
    Banned,
}

impl Defender {
    pub fn new(settings: DefenderSection) -> Defender {
        Defender {
            settings,
            state: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.settings.window_secs)
    }

    /// Whether `user` may try a password from `ip` now.
    pub fn check(&self, ip: IpAddr, user: &str) -> Verdict {
        let source = Source::of(ip);
        let now = Instant::now();
        let ban = Duration::from_secs(self.settings.ban_secs);
        let mut s = self.lock();
        if let Some(&since) = s.banned_sources.get(&source) {
            if now.duration_since(since) < ban {
                return Verdict::Banned;
            }
            s.banned_sources.remove(&source);
            s.sources.remove(&source);
            warn!(source = %source, "ban lifted");
        }
        let key = (source, user.to_string());
        if let Some(&since) = s.banned_pairs.get(&key) {
            if now.duration_since(since) < ban {
                return Verdict::Banned;
            }
            s.banned_pairs.remove(&key);
            s.pairs.remove(&key);
            warn!(source = %source, user = ?user, "ban lifted");
        }
        Verdict::Allow
    }

    /// Records a failed login and returns how long to wait before replying,
    /// given the base delay.
    pub fn failed(&self, ip: IpAddr, user: &str, base: Duration) -> Duration {
        let source = Source::of(ip);
        let now = Instant::now();
        let window = self.window();
        let mut s = self.lock();
        if s.pairs.len() > 100_000 || s.accounts.len() > 100_000 {
            prune(&mut s, now, window);
        }
        let key = (source, user.to_string());
        let pair = s.pairs.entry(key.clone()).or_default();
        pair.retain(|t| now.duration_since(*t) < window);
        pair.push(now);
        let pair_failures = pair.len() as u32;

        let accounts = s.sources.entry(source).or_default();
        accounts.retain(|_, t| now.duration_since(*t) < window);
        accounts.insert(user.to_string(), now);
        let spread = accounts.len();

        let account = s.accounts.entry(user.to_string()).or_default();
        account.retain(|t| now.duration_since(*t) < window);
        account.push(now);
        let account_failures = account.len() as u32;

        if pair_failures >= self.settings.pair_max_failures && !s.banned_pairs.contains_key(&key) {
            s.banned_pairs.insert(key, now);
            warn!(source = %source, user = ?user, failures = pair_failures, ban_secs = self.settings.ban_secs,
                  "banned: too many failed logins for this account from this source");
        }
        if spread >= self.settings.source_max_accounts && !s.banned_sources.contains_key(&source) {
            s.banned_sources.insert(source, now);
            warn!(source = %source, accounts = spread, ban_secs = self.settings.ban_secs,
                  "banned: failed logins on many accounts from this source");
        }
        let mut doublings = pair_failures.saturating_sub(1).min(16);
        if account_failures > self.settings.account_slow_after {
            if account_failures == self.settings.account_slow_after + 1 {
                warn!(user = ?user, failures = account_failures, "throttled: failed logins on this account from many sources");
            }
            doublings = doublings.max(4);
        }
        let delay = base.saturating_mul(1 << doublings);
        delay
            .min(Duration::from_millis(self.settings.max_delay_ms))
            .max(base)
    }

    /// A successful login clears its pair's failures.
    pub fn succeeded(&self, ip: IpAddr, user: &str) {
        self.lock()
            .pairs
            .remove(&(Source::of(ip), user.to_string()));
    }

    /// Counts a registration from `ip`; false if the source is over its limit.
    pub fn register(&self, ip: IpAddr) -> bool {
        let source = Source::of(ip);
        let now = Instant::now();
        let mut s = self.lock();
        let times = s.registrations.entry(source).or_default();
        times.retain(|t| now.duration_since(*t) < REGISTRATION_WINDOW);
        if times.len() as u32 >= self.settings.registrations_per_hour {
            let limit = self.settings.registrations_per_hour;
            match s.registrations_warned.get(&source) {
                Some(t) if now.duration_since(*t) < REGISTRATION_WINDOW => {
                    info!(source = %source, limit, "throttled: registrations");
                }
                _ => {
                    warn!(source = %source, limit, "throttled: registrations");
                    s.registrations_warned.insert(source, now);
                }
            }
            return false;
        }
        times.push(now);
        true
    }
}

fn prune(s: &mut State, now: Instant, window: Duration) {
    s.pairs
        .retain(|_, v| v.last().is_some_and(|t| now.duration_since(*t) < window));
    s.accounts
        .retain(|_, v| v.last().is_some_and(|t| now.duration_since(*t) < window));
    s.sources
        .retain(|_, m| m.values().any(|t| now.duration_since(*t) < window));
    let keep: HashSet<Source> = s.banned_sources.keys().copied().collect();
    s.registrations.retain(|k, v| {
        keep.contains(k) || v.last().is_some_and(|t| now.duration_since(*t) < window)
    });
    s.registrations_warned
        .retain(|_, t| now.duration_since(*t) < REGISTRATION_WINDOW);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(pair: u32, spread: usize) -> Defender {
        Defender::new(DefenderSection {
            pair_max_failures: pair,
            source_max_accounts: spread,
            account_slow_after: 5,
            ..DefenderSection::default()
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_pair_is_banned_but_not_its_neighbours() {
        let d = d(3, 10);
        let base = Duration::from_millis(10);
        assert_eq!(d.failed(ip("10.0.0.1"), "ann", base), base);
        assert_eq!(d.failed(ip("10.0.0.1"), "ann", base), base * 2);
        assert_eq!(d.check(ip("10.0.0.1"), "ann"), Verdict::Allow);
        d.failed(ip("10.0.0.1"), "ann", base);
        assert_eq!(d.check(ip("10.0.0.1"), "ann"), Verdict::Banned);
        // Others behind the same address, and ann from elsewhere, still get in.
        assert_eq!(d.check(ip("10.0.0.1"), "bob"), Verdict::Allow);
        assert_eq!(d.check(ip("10.0.0.2"), "ann"), Verdict::Allow);
    }

    #[test]
    fn spraying_bans_the_source() {
        let d = d(100, 3);
        let base = Duration::from_millis(1);
        for user in ["a", "b", "c"] {
            d.failed(ip("2001:db8::1"), user, base);
        }
        assert_eq!(d.check(ip("2001:db8::1"), "zed"), Verdict::Banned);
        // The whole /64 is one source; another /64 is not.
        assert_eq!(d.check(ip("2001:db8::ffff"), "zed"), Verdict::Banned);
        assert_eq!(d.check(ip("2001:db8:0:1::1"), "zed"), Verdict::Allow);
    }

    #[test]
    fn an_account_attacked_from_everywhere_is_slowed_never_locked() {
        let d = d(3, 10);
        let base = Duration::from_millis(10);
        let mut last = Duration::ZERO;
        for i in 0..20 {
            last = d.failed(ip(&format!("10.1.0.{i}")), "ann", base);
        }
        assert!(last >= base * 16, "{last:?}");
        assert_eq!(d.check(ip("192.168.1.1"), "ann"), Verdict::Allow);
    }

    #[test]
    fn delays_are_capped_and_success_resets() {
        let d = Defender::new(DefenderSection {
            pair_max_failures: 100,
            max_delay_ms: 50,
            ..DefenderSection::default()
        });
        let base = Duration::from_millis(10);
        for _ in 0..30 {
            assert!(d.failed(ip("10.0.0.1"), "ann", base) <= Duration::from_millis(50));
        }
        d.succeeded(ip("10.0.0.1"), "ann");
        assert_eq!(d.failed(ip("10.0.0.1"), "ann", base), base);
    }

    #[test]
    fn bans_end_after_ban_secs() {
        let d = Defender::new(DefenderSection {
            pair_max_failures: 1,
            source_max_accounts: 1,
            ban_secs: 0,
            ..DefenderSection::default()
        });
        d.failed(ip("10.0.0.1"), "ann", Duration::ZERO);
        assert_eq!(d.check(ip("10.0.0.1"), "ann"), Verdict::Allow);
        let held = Defender::new(DefenderSection {
            pair_max_failures: 1,
            ..DefenderSection::default()
        });
        held.failed(ip("10.0.0.1"), "ann", Duration::ZERO);
        assert_eq!(held.check(ip("10.0.0.1"), "ann"), Verdict::Banned);
    }

    #[test]
    fn registrations_per_source() {
        let d = Defender::new(DefenderSection {
            registrations_per_hour: 2,
            ..DefenderSection::default()
        });
        assert!(d.register(ip("10.0.0.1")));
        assert!(d.register(ip("10.0.0.1")));
        assert!(!d.register(ip("10.0.0.1")));
        assert!(d.register(ip("10.0.0.2")));
    }

    #[test]
    fn a_source_that_keeps_registering_is_warned_about_once_an_hour() {
        let d = Defender::new(DefenderSection {
            registrations_per_hour: 1,
            ..DefenderSection::default()
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let file = std::fs::File::create(&path).unwrap();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            assert!(d.register(ip("10.0.0.1")));
            for _ in 0..5 {
                assert!(!d.register(ip("10.0.0.1")));
            }
        });
        let log = std::fs::read_to_string(&path).unwrap();
        let refusals: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("throttled: registrations"))
            .collect();
        assert_eq!(refusals.len(), 5, "{log}");
        assert_eq!(
            refusals.iter().filter(|l| l.contains(" WARN ")).count(),
            1,
            "{log}"
        );
    }
}
