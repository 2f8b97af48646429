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
//! Guesses still being evaluated count as failures to come: a login is
//! admitted ([`Defender::admit`]) only if the failures and the guesses in
//! flight leave room under these limits, and otherwise waits for the guesses
//! in flight to land, so a burst of guesses sent at once gets no more
//! evaluated than the same guesses sent one by one.
//!
//! A source is an IPv4 address or an IPv6 /64. Registrations are limited per
//! source per hour. All times are monotonic. Every throttle, ban and release
//! is logged.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use tracing::{info, warn};

use crate::cluster::defences::{Defences, Outcome};
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

/// Past this many entries in all, the maps are pruned of everything that no
/// longer counts.
const MAX_ENTRIES: usize = 100_000;

/// The one key for every login name that is not a valid user name (too
/// long, bad characters, reserved): such a name can never log in, and the
/// maps never hold a key chosen freely by a client. No valid name has a
/// space or a parenthesis.
const INVALID_NAME: &str = "(invalid name)";

/// What the maps are keyed on for a login name: at most 32 bytes.
fn account_key(user: &str) -> &str {
    if crate::store::users::check_name(user).is_ok() {
        user
    } else {
        INVALID_NAME
    }
}

#[derive(Debug, Default)]
struct State {
    /// Failure times per (source, account).
    pairs: HashMap<(Source, String), Vec<Instant>>,
    /// Accounts that failed from a source, with the last failure time.
    sources: HashMap<Source, HashMap<String, Instant>>,
    /// Failure times per account, from all sources.
    accounts: HashMap<String, Vec<Instant>>,
    /// Guesses admitted and not yet settled, per (source, account).
    in_flight: HashMap<(Source, String), u32>,
    /// Accounts with guesses in flight from a source, with how many.
    sources_in_flight: HashMap<Source, HashMap<String, u32>>,
    banned_pairs: HashMap<(Source, String), Instant>,
    banned_sources: HashMap<Source, Instant>,
    registrations: HashMap<Source, Vec<Instant>>,
    /// When a source was last warned about for registering too often: one
    /// warning an hour, however often it tries.
    registrations_warned: HashMap<Source, Instant>,
}

impl State {
    fn entries(&self) -> usize {
        self.pairs.len()
            + self.sources.len()
            + self.accounts.len()
            + self.in_flight.len()
            + self.sources_in_flight.len()
            + self.banned_pairs.len()
            + self.banned_sources.len()
            + self.registrations.len()
            + self.registrations_warned.len()
    }

    /// Forgets one guess in flight.
    fn land(&mut self, key: &(Source, String)) {
        if let Some(n) = self.in_flight.get_mut(key) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(key);
            }
        }
        let (source, account) = key;
        if let Some(accounts) = self.sources_in_flight.get_mut(source) {
            if let Some(n) = accounts.get_mut(account) {
                *n -= 1;
                if *n == 0 {
                    accounts.remove(account);
                }
            }
            if accounts.is_empty() {
                self.sources_in_flight.remove(source);
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct Defender {
    settings: DefenderSection,
    state: Mutex<State>,
    /// Woken whenever a guess in flight lands.
    landed: Notify,
}

/// A login attempt refused without looking at its password (answered like
/// any failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Banned;

/// Why a guess is not admitted at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotNow {
    Banned,
    /// Admitted or banned once guesses in flight land: with all of them
    /// failing, this one would be over a limit.
    Wait,
}

/// A guess admitted for evaluation, counted as in flight until it is
/// settled by [`Attempt::succeeded`] or [`Attempt::failed`]. Dropped
/// unsettled (the client left, or no hashing turn came), it is forgotten:
/// it was never evaluated.
#[derive(Debug)]
pub struct Attempt<'a> {
    defender: &'a Defender,
    key: (Source, String),
    settled: bool,
    /// With several nodes, the shared counts, which also hold this guess.
    shared: Option<Arc<Defences>>,
}

impl Attempt<'_> {
    /// The source and the account key, as the shared counts name them.
    pub fn key(&self) -> (String, String) {
        (self.key.0.to_string(), self.key.1.clone())
    }

    /// Settles the guess in `shared` too, which has admitted it.
    pub fn share(&mut self, shared: Arc<Defences>) {
        self.shared = Some(shared);
    }

    /// Settles the guess in the shared counts, in the background: the next
    /// guess of the pair waits for it there.
    fn settle_shared(&mut self, outcome: Outcome) {
        if let Some(shared) = self.shared.take() {
            let (source, account) = self.key();
            tokio::spawn(async move {
                if let Err(e) = shared.settle(&source, &account, outcome).await {
                    warn!(source, user = ?account, error = %e, "cannot record a login on the shared counts");
                }
            });
        }
    }

    /// The password was right: the pair's failures are cleared.
    pub fn succeeded(mut self) {
        self.settle_shared(Outcome::Succeeded);
        self.settled = true;
        let mut s = self.defender.lock();
        s.land(&self.key);
        s.pairs.remove(&self.key);
        drop(s);
        self.defender.landed.notify_waiters();
    }

    /// The password was wrong (or could not be checked): records the
    /// failure and returns how long to wait before replying, given the base
    /// delay.
    pub fn failed(mut self, base: Duration) -> Duration {
        self.settle_shared(Outcome::Failed);
        self.settled = true;
        let mut s = self.defender.lock();
        s.land(&self.key);
        let delay = self.defender.record_failure(&mut s, &self.key, base);
        drop(s);
        self.defender.landed.notify_waiters();
        delay
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        self.settle_shared(Outcome::Dropped);
        if !self.settled {
            self.defender.lock().land(&self.key);
            self.defender.landed.notify_waiters();
        }
    }
}

impl Defender {
    pub fn new(settings: DefenderSection) -> Defender {
        Defender {
            settings,
            state: Mutex::default(),
            landed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.settings.window_secs)
    }

    fn ban(&self) -> Duration {
        Duration::from_secs(self.settings.ban_secs)
    }

    /// Admits a guess of `user`'s password from `ip`, or refuses it as
    /// banned. A guess that would be over a limit if the guesses in flight
    /// all failed waits for them to land, and is judged again: banned if
    /// they failed, admitted if they succeeded. So a burst of guesses sent
    /// at once gets no more of them evaluated than the same guesses sent one
    /// by one, while many right passwords at once (an office behind one
    /// address) all get in.
    pub async fn admit(&self, ip: IpAddr, user: &str) -> Result<Attempt<'_>, Banned> {
        loop {
            // Listening before looking, so that no landing is missed.
            let landed = self.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            match self.try_admit(ip, user) {
                Ok(attempt) => return Ok(attempt),
                Err(NotNow::Banned) => return Err(Banned),
                Err(NotNow::Wait) => landed.await,
            }
        }
    }

    /// [`Defender::admit`] without the wait: a pair with `pair_max_failures`
    /// failures and guesses in flight, or a source with
    /// `source_max_accounts` accounts failing or in flight, gets no more now.
    pub fn try_admit(&self, ip: IpAddr, user: &str) -> Result<Attempt<'_>, NotNow> {
        let source = Source::of(ip);
        let account = account_key(user);
        let now = Instant::now();
        let window = self.window();
        let ban = self.ban();
        let mut s = self.lock();
        if let Some(&since) = s.banned_sources.get(&source) {
            if now.duration_since(since) < ban {
                return Err(NotNow::Banned);
            }
            s.banned_sources.remove(&source);
            s.sources.remove(&source);
            warn!(event = "unban", source = %source, "ban lifted");
        }
        let key = (source, account.to_string());
        if let Some(&since) = s.banned_pairs.get(&key) {
            if now.duration_since(since) < ban {
                return Err(NotNow::Banned);
            }
            s.banned_pairs.remove(&key);
            s.pairs.remove(&key);
            warn!(event = "unban", source = %source, user = %account, "ban lifted");
        }
        let recent = |t: &Instant| now.duration_since(*t) < window;
        let failures = s
            .pairs
            .get(&key)
            .map_or(0, |v| v.iter().filter(|t| recent(t)).count());
        let in_flight = s.in_flight.get(&key).copied().unwrap_or(0) as usize;
        // A limit of 0 acts as 1, as it always did: one guess, then the ban.
        let pair_max = self.settings.pair_max_failures.max(1) as usize;
        if failures >= pair_max {
            return Err(NotNow::Banned);
        }
        if failures + in_flight >= pair_max {
            return Err(NotNow::Wait);
        }
        let failed_accounts = s.sources.get(&source);
        let failed_recently = |a: &str| failed_accounts.and_then(|m| m.get(a)).is_some_and(recent);
        let failed = failed_accounts.map_or(0, |m| m.values().filter(|t| recent(t)).count());
        let spread = failed
            + s.sources_in_flight
                .get(&source)
                .map_or(0, |m| m.keys().filter(|a| !failed_recently(a)).count());
        let spread_max = self.settings.source_max_accounts.max(1);
        if failed >= spread_max {
            return Err(NotNow::Banned);
        }
        if spread >= spread_max {
            return Err(NotNow::Wait);
        }
        *s.in_flight.entry(key.clone()).or_default() += 1;
        *s.sources_in_flight
            .entry(source)
            .or_default()
            .entry(key.1.clone())
            .or_default() += 1;
        Ok(Attempt {
            defender: self,
            key,
            settled: false,
            shared: None,
        })
    }

    fn record_failure(&self, s: &mut State, key: &(Source, String), base: Duration) -> Duration {
        let now = Instant::now();
        let window = self.window();
        if s.entries() > MAX_ENTRIES {
            prune(s, now, window, self.ban());
        }
        let (source, account) = (key.0, key.1.as_str());
        let pair = s.pairs.entry(key.clone()).or_default();
        pair.retain(|t| now.duration_since(*t) < window);
        pair.push(now);
        let pair_failures = pair.len() as u32;

        let accounts = s.sources.entry(source).or_default();
        accounts.retain(|_, t| now.duration_since(*t) < window);
        accounts.insert(account.to_string(), now);
        let spread = accounts.len();

        let failures = s.accounts.entry(account.to_string()).or_default();
        failures.retain(|t| now.duration_since(*t) < window);
        failures.push(now);
        let account_failures = failures.len() as u32;

        if pair_failures >= self.settings.pair_max_failures && !s.banned_pairs.contains_key(key) {
            s.banned_pairs.insert(key.clone(), now);
            warn!(event = "ban", source = %source, user = %account, failures = pair_failures, ban_secs = self.settings.ban_secs,
                  "banned: too many failed logins for this account from this source");
        }
        if spread >= self.settings.source_max_accounts && !s.banned_sources.contains_key(&source) {
            s.banned_sources.insert(source, now);
            warn!(event = "ban", source = %source, accounts = spread, ban_secs = self.settings.ban_secs,
                  "banned: failed logins on many accounts from this source");
        }
        let mut doublings = pair_failures.saturating_sub(1).min(16);
        if account_failures > self.settings.account_slow_after {
            if account_failures == self.settings.account_slow_after + 1 {
                warn!(event = "throttle", user = %account, failures = account_failures, "throttled: failed logins on this account from many sources");
            }
            doublings = doublings.max(4);
        }
        let delay = base.saturating_mul(1 << doublings);
        delay
            .min(Duration::from_millis(self.settings.max_delay_ms))
            .max(base)
    }

    /// Bans in force now: (source, account) pairs and whole sources.
    pub fn bans_active(&self) -> usize {
        let (now, ban) = (Instant::now(), self.ban());
        let s = self.lock();
        let live = |since: &Instant| now.duration_since(*since) < ban;
        s.banned_pairs.values().filter(|t| live(t)).count()
            + s.banned_sources.values().filter(|t| live(t)).count()
    }

    /// Counts a registration from `ip`; false if the source is over its limit.
    pub fn register(&self, ip: IpAddr) -> bool {
        let source = Source::of(ip);
        let now = Instant::now();
        let mut s = self.lock();
        if s.entries() > MAX_ENTRIES {
            prune(&mut s, now, self.window(), self.ban());
        }
        let times = s.registrations.entry(source).or_default();
        times.retain(|t| now.duration_since(*t) < REGISTRATION_WINDOW);
        if times.len() as u32 >= self.settings.registrations_per_hour {
            let limit = self.settings.registrations_per_hour;
            match s.registrations_warned.get(&source) {
                Some(t) if now.duration_since(*t) < REGISTRATION_WINDOW => {
                    info!(event = "throttle", source = %source, limit, "throttled: registrations");
                }
                _ => {
                    warn!(event = "throttle", source = %source, limit, "throttled: registrations");
                    s.registrations_warned.insert(source, now);
                }
            }
            return false;
        }
        times.push(now);
        true
    }
}

/// Drops what no longer counts: failures out of the window, bans that
/// ended, registrations older than an hour. Guesses in flight are dropped
/// when they land, so they are never stale.
fn prune(s: &mut State, now: Instant, window: Duration, ban: Duration) {
    let recent = |t: &Instant| now.duration_since(*t) < window;
    s.pairs.retain(|_, v| v.last().is_some_and(recent));
    s.accounts.retain(|_, v| v.last().is_some_and(recent));
    s.sources.retain(|_, m| m.values().any(recent));
    s.banned_pairs
        .retain(|_, since| now.duration_since(*since) < ban);
    s.banned_sources
        .retain(|_, since| now.duration_since(*since) < ban);
    s.registrations.retain(|_, v| {
        v.last()
            .is_some_and(|t| now.duration_since(*t) < REGISTRATION_WINDOW)
    });
    s.registrations_warned
        .retain(|_, t| now.duration_since(*t) < REGISTRATION_WINDOW);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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

    /// Whether a guess would be admitted now (it is not kept in flight).
    fn check(d: &Defender, ip: IpAddr, user: &str) -> Verdict {
        match d.try_admit(ip, user) {
            Ok(_) => Verdict::Allow,
            Err(NotNow::Banned) => Verdict::Banned,
            Err(NotNow::Wait) => Verdict::Wait,
        }
    }

    #[derive(Debug, PartialEq)]
    enum Verdict {
        Allow,
        Banned,
        Wait,
    }

    /// One guess admitted and failed.
    fn fail(d: &Defender, ip: IpAddr, user: &str, base: Duration) -> Duration {
        d.try_admit(ip, user).expect("admitted").failed(base)
    }

    #[test]
    fn a_pair_is_banned_but_not_its_neighbours() {
        let d = d(3, 10);
        let base = Duration::from_millis(10);
        assert_eq!(fail(&d, ip("10.0.0.1"), "ann", base), base);
        assert_eq!(fail(&d, ip("10.0.0.1"), "ann", base), base * 2);
        assert_eq!(check(&d, ip("10.0.0.1"), "ann"), Verdict::Allow);
        fail(&d, ip("10.0.0.1"), "ann", base);
        assert_eq!(check(&d, ip("10.0.0.1"), "ann"), Verdict::Banned);
        // Others behind the same address, and ann from elsewhere, still get in.
        assert_eq!(check(&d, ip("10.0.0.1"), "bob"), Verdict::Allow);
        assert_eq!(check(&d, ip("10.0.0.2"), "ann"), Verdict::Allow);
    }

    #[test]
    fn spraying_bans_the_source() {
        let d = d(100, 3);
        let base = Duration::from_millis(1);
        for user in ["a", "b", "c"] {
            fail(&d, ip("2001:db8::1"), user, base);
        }
        assert_eq!(check(&d, ip("2001:db8::1"), "zed"), Verdict::Banned);
        // The whole /64 is one source; another /64 is not.
        assert_eq!(check(&d, ip("2001:db8::ffff"), "zed"), Verdict::Banned);
        assert_eq!(check(&d, ip("2001:db8:0:1::1"), "zed"), Verdict::Allow);
    }

    #[test]
    fn an_account_attacked_from_everywhere_is_slowed_never_locked() {
        let d = d(3, 10);
        let base = Duration::from_millis(10);
        let mut last = Duration::ZERO;
        for i in 0..20 {
            last = fail(&d, ip(&format!("10.1.0.{i}")), "ann", base);
        }
        assert!(last >= base * 16, "{last:?}");
        assert_eq!(check(&d, ip("192.168.1.1"), "ann"), Verdict::Allow);
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
            assert!(fail(&d, ip("10.0.0.1"), "ann", base) <= Duration::from_millis(50));
        }
        d.try_admit(ip("10.0.0.1"), "ann").unwrap().succeeded();
        assert_eq!(fail(&d, ip("10.0.0.1"), "ann", base), base);
    }

    #[test]
    fn bans_end_after_ban_secs() {
        let d = Defender::new(DefenderSection {
            pair_max_failures: 1,
            source_max_accounts: 1,
            ban_secs: 0,
            ..DefenderSection::default()
        });
        fail(&d, ip("10.0.0.1"), "ann", Duration::ZERO);
        assert_eq!(check(&d, ip("10.0.0.1"), "ann"), Verdict::Allow);
        let held = Defender::new(DefenderSection {
            pair_max_failures: 1,
            ..DefenderSection::default()
        });
        fail(&held, ip("10.0.0.1"), "ann", Duration::ZERO);
        assert_eq!(check(&held, ip("10.0.0.1"), "ann"), Verdict::Banned);
    }

    #[test]
    fn guesses_in_flight_count_toward_the_pair_ban() {
        let d = d(3, 100);
        let base = Duration::from_millis(1);
        let a = ip("10.0.0.1");
        let first = d.try_admit(a, "ann").unwrap();
        let second = d.try_admit(a, "ann").unwrap();
        let third = d.try_admit(a, "ann").unwrap();
        // Three in flight: a fourth waits for them before any has failed.
        assert_eq!(d.try_admit(a, "ann").unwrap_err(), NotNow::Wait);
        // Others behind the address, and ann elsewhere, are not held up.
        assert!(d.try_admit(a, "bob").is_ok());
        assert!(d.try_admit(ip("10.0.0.2"), "ann").is_ok());
        // An attempt dropped unsettled (its client left) frees its place.
        drop(first);
        let fourth = d.try_admit(a, "ann").unwrap();
        second.failed(base);
        third.failed(base);
        // Two failures and one in flight.
        assert_eq!(d.try_admit(a, "ann").unwrap_err(), NotNow::Wait);
        fourth.failed(base);
        assert_eq!(check(&d, a, "ann"), Verdict::Banned);
        assert!(
            d.lock()
                .banned_pairs
                .contains_key(&(Source::of(a), "ann".into()))
        );
    }

    #[tokio::test]
    async fn a_guess_over_the_limit_waits_for_those_in_flight() {
        let d = Arc::new(d(2, 100));
        let a = ip("10.0.0.1");
        let waiter = |d: &Arc<Defender>, user: &'static str| {
            let d = d.clone();
            tokio::spawn(async move { d.admit(a, user).await.map(|at| at.succeeded()) })
        };
        // Both in flight fail: the one waiting is banned without evaluation.
        let (first, second) = (
            d.try_admit(a, "ann").unwrap(),
            d.try_admit(a, "ann").unwrap(),
        );
        let banned = waiter(&d, "ann");
        tokio::task::yield_now().await;
        first.failed(Duration::ZERO);
        tokio::task::yield_now().await;
        assert!(!banned.is_finished());
        second.failed(Duration::ZERO);
        assert_eq!(banned.await.unwrap(), Err(Banned));
        // One in flight succeeds: the ones waiting are admitted.
        let (first, second) = (
            d.try_admit(a, "bob").unwrap(),
            d.try_admit(a, "bob").unwrap(),
        );
        let admitted = [waiter(&d, "bob"), waiter(&d, "bob")];
        tokio::task::yield_now().await;
        first.succeeded();
        drop(second);
        for w in admitted {
            assert_eq!(w.await.unwrap(), Ok(()));
        }
        assert!(d.lock().in_flight.is_empty());
    }

    #[test]
    fn a_success_lands_its_guess_and_clears_the_pair() {
        let d = d(3, 100);
        let base = Duration::from_millis(1);
        let a = ip("10.0.0.1");
        fail(&d, a, "ann", base);
        fail(&d, a, "ann", base);
        let other = d.try_admit(a, "ann").unwrap();
        d.try_admit(a, "ann").unwrap_err();
        other.succeeded();
        for _ in 0..3 {
            drop(d.try_admit(a, "ann").unwrap());
        }
        let s = d.lock();
        assert!(s.pairs.is_empty() && s.in_flight.is_empty() && s.sources_in_flight.is_empty());
    }

    #[test]
    fn accounts_in_flight_count_toward_spraying() {
        let d = d(100, 3);
        let a = ip("2001:db8::1");
        let held: Vec<Attempt> = ["amy", "ben"]
            .iter()
            .map(|u| d.try_admit(a, u).unwrap())
            .collect();
        // Several guesses on one account are one account.
        let again = d.try_admit(a, "ben").unwrap();
        fail(&d, a, "cid", Duration::ZERO);
        // Three accounts failing or in flight: the source gets no more.
        assert_eq!(
            d.try_admit(ip("2001:db8::2"), "dan").unwrap_err(),
            NotNow::Wait
        );
        assert_eq!(d.try_admit(a, "amy").unwrap_err(), NotNow::Wait);
        assert!(d.try_admit(ip("2001:db8:1::1"), "dan").is_ok());
        drop(held);
        drop(again);
        assert!(d.try_admit(a, "dan").is_ok());
        assert!(d.lock().sources_in_flight.is_empty());
    }

    #[test]
    fn names_that_are_not_user_names_share_one_key() {
        let d = d(3, 100);
        let a = ip("10.0.0.1");
        let long = "a".repeat(8000);
        for name in [long.as_str(), "Ann", "../etc", "root"] {
            assert!(crate::store::users::check_name(name).is_err(), "{name}");
        }
        let held = d.try_admit(a, &long).unwrap();
        fail(&d, a, "Ann", Duration::ZERO);
        fail(&d, a, "../etc", Duration::ZERO);
        assert_eq!(d.try_admit(a, "root").unwrap_err(), NotNow::Wait);
        drop(held);
        fail(&d, a, "x y", Duration::ZERO);
        assert_eq!(check(&d, a, &long), Verdict::Banned);
        // Valid names are their own accounts.
        assert_eq!(check(&d, a, "ann"), Verdict::Allow);
        let s = d.lock();
        let keys = s
            .pairs
            .keys()
            .chain(s.banned_pairs.keys())
            .map(|(_, k)| k)
            .chain(s.accounts.keys())
            .chain(s.sources.values().flat_map(|m| m.keys()));
        for key in keys {
            assert!(key.len() <= crate::store::users::MAX_NAME_LEN, "{key}");
        }
        assert_eq!(s.accounts.len(), 1);
    }

    #[test]
    fn maps_are_pruned_of_what_no_longer_counts() {
        // Every failure is out of the window at once, and bans end at once.
        let d = Defender::new(DefenderSection {
            window_secs: 0,
            ban_secs: 0,
            pair_max_failures: 1,
            source_max_accounts: 1,
            ..DefenderSection::default()
        });
        let mut held = vec![];
        for i in 0..(MAX_ENTRIES / 4) as u32 {
            let a = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            fail(&d, a, &format!("u{i}"), Duration::ZERO);
            if i % 10_000 == 0 {
                held.push(d.try_admit(a, "ann").unwrap());
            }
            assert!(d.lock().entries() <= MAX_ENTRIES + 10, "at {i}");
        }
        // The guesses still in flight were kept, and go when they land.
        assert_eq!(d.lock().in_flight.len(), held.len());
        drop(held);
        let mut s = d.lock();
        assert!(s.in_flight.is_empty() && s.sources_in_flight.is_empty());
        // Nothing else counts any more: a prune leaves nothing.
        prune(&mut s, Instant::now(), d.window(), d.ban());
        assert_eq!(s.entries(), 0);
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
