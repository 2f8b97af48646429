//! Hashing turns, shared fairly between sources.
//!
//! A password hash is expensive (128 MiB and a third of a second at the
//! default cost), so at most `hash_concurrency` run at once. When more
//! logins or registrations want one, the free turns go round-robin across
//! the sources waiting (a source is an IPv4 address or an IPv6 /64,
//! [`Source`]), each source's own waiters in arrival order: a source with
//! hundreds of logins queued delays another source's login by about one
//! turn per source waiting, not by its whole queue. No turn is kept free
//! while someone waits, so one source alone may use them all.
//!
//! A [`Turn`] gives itself back when dropped, to the next source in the
//! round. A waiter that gives up (its future dropped, as when the login
//! timeout passes) leaves the queue, and a turn handed to it in that
//! moment is passed on.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::server::defender::Source;

pub struct Turns {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Turns nobody holds. Never above zero while someone waits.
    free: usize,
    /// Sources with waiters, in the order of their next turn.
    round: VecDeque<Source>,
    /// Each waiting source's waiters, oldest first.
    waiting: HashMap<Source, VecDeque<Waiter>>,
    next_id: u64,
    granted: u64,
}

struct Waiter {
    id: u64,
    wake: oneshot::Sender<()>,
}

/// One turn to hash a password; given back when dropped.
#[must_use]
pub struct Turn<'a> {
    turns: &'a Turns,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.turns.lock().give_back();
    }
}

/// A place in the queue: leaves it when dropped, or, if a turn was handed
/// to it meanwhile, passes that turn on.
struct Place<'a> {
    turns: &'a Turns,
    source: Source,
    id: u64,
    done: bool,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut s = self.turns.lock();
        let Some(queue) = s.waiting.get_mut(&self.source) else {
            // Handed a turn already (only a turn's handing removes a waiter).
            s.give_back();
            return;
        };
        let before = queue.len();
        queue.retain(|w| w.id != self.id);
        if queue.len() == before {
            s.give_back();
        } else if queue.is_empty() {
            s.waiting.remove(&self.source);
            s.round.retain(|src| *src != self.source);
        }
    }
}

impl State {
    /// A turn comes back: to the next source in the round, or to the free ones.
    fn give_back(&mut self) {
        while let Some(source) = self.round.pop_front() {
            let Some(queue) = self.waiting.get_mut(&source) else {
                continue;
            };
            let waiter = queue.pop_front();
            if queue.is_empty() {
                self.waiting.remove(&source);
            } else {
                self.round.push_back(source);
            }
            // A waiter's place is removed from its queue before its
            // receiver goes, so this only fails if the waiter vanished
            // without its Drop; then the next one gets the turn.
            if let Some(w) = waiter
                && w.wake.send(()).is_ok()
            {
                self.granted += 1;
                return;
            }
        }
        self.free += 1;
    }
}

impl Turns {
    pub fn new(count: usize) -> Turns {
        Turns {
            state: Mutex::new(State {
                free: count,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a turn for `source`.
    pub async fn take(&self, source: Source) -> Turn<'_> {
        let (place, woken) = {
            let mut s = self.lock();
            if s.free > 0 {
                s.free -= 1;
                s.granted += 1;
                return Turn { turns: self };
            }
            let id = s.next_id;
            s.next_id += 1;
            let (wake, woken) = oneshot::channel();
            if !s.waiting.contains_key(&source) {
                s.round.push_back(source);
            }
            s.waiting
                .entry(source)
                .or_default()
                .push_back(Waiter { id, wake });
            let place = Place {
                turns: self,
                source,
                id,
                done: false,
            };
            (place, woken)
        };
        let mut place = place;
        // The sender is only dropped unsent with the whole Turns.
        let _ = woken.await;
        place.done = true;
        Turn { turns: self }
    }

    /// Logins and registrations waiting for a turn.
    pub fn waiting(&self) -> usize {
        self.lock().waiting.values().map(VecDeque::len).sum()
    }

    /// Turns handed out since the start: one per password hashed.
    pub fn granted(&self) -> u64 {
        self.lock().granted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::net::IpAddr;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::Poll;

    fn src(s: &str) -> Source {
        Source::of(s.parse::<IpAddr>().unwrap())
    }

    /// Polls a future once, so that it takes its place in the queue.
    async fn poll_once<F: Future>(f: &mut Pin<Box<F>>) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            Poll::Ready(match f.as_mut().poll(cx) {
                Poll::Ready(out) => Some(out),
                Poll::Pending => None,
            })
        })
        .await
    }

    fn free(t: &Turns) -> usize {
        t.lock().free
    }

    fn is_clean(t: &Turns) -> bool {
        let s = t.lock();
        s.waiting.is_empty() && s.round.is_empty()
    }

    #[tokio::test]
    async fn one_source_alone_takes_every_turn() {
        let t = Turns::new(3);
        let a = src("10.0.0.1");
        let held = [t.take(a).await, t.take(a).await, t.take(a).await];
        assert_eq!(free(&t), 0);
        let mut fourth = Box::pin(t.take(a));
        assert!(poll_once(&mut fourth).await.is_none());
        drop(held);
        let fourth = fourth.await;
        assert_eq!(free(&t), 2);
        drop(fourth);
        assert_eq!(free(&t), 3);
        assert!(is_clean(&t));
        assert_eq!(t.granted(), 4);
    }

    #[tokio::test]
    async fn turns_go_round_the_sources_waiting() {
        let t = Arc::new(Turns::new(1));
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = t.take(src("10.0.0.1")).await;
        let mut tasks = vec![];
        // A flood from one source queues first, then one from each of two others.
        let arrivals = ["flood"; 6].into_iter().chain(["b", "c"]);
        for (i, who) in arrivals.enumerate() {
            let (turns, order) = (t.clone(), order.clone());
            let ip = match who {
                "flood" => "10.0.0.1",
                "b" => "10.0.0.2",
                _ => "2001:db8::1",
            };
            tasks.push(tokio::spawn(async move {
                let turn = turns.take(src(ip)).await;
                order.lock().unwrap().push(format!("{who}{i}"));
                tokio::task::yield_now().await;
                drop(turn);
            }));
            while t.waiting() < i + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for task in tasks {
            task.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(
            order,
            [
                "flood0", "b6", "c7", "flood1", "flood2", "flood3", "flood4", "flood5"
            ]
        );
        assert!(is_clean(&t));
        assert_eq!(free(&t), 1);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_no_trace() {
        let t = Turns::new(1);
        let (a, b) = (src("10.0.0.1"), src("10.0.0.2"));
        let held = t.take(a).await;
        // Given up while queued: by timeout, and by being dropped.
        let late = tokio::time::timeout(std::time::Duration::from_millis(10), t.take(b)).await;
        assert!(late.is_err());
        let mut dropped = Box::pin(t.take(a));
        assert!(poll_once(&mut dropped).await.is_none());
        assert_eq!(t.waiting(), 1);
        drop(dropped);
        assert!(is_clean(&t));
        drop(held);
        assert_eq!(free(&t), 1);
    }

    #[tokio::test]
    async fn a_turn_handed_to_a_waiter_that_gives_up_is_passed_on() {
        let t = Turns::new(1);
        let (a, b) = (src("10.0.0.1"), src("10.0.0.2"));
        let held = t.take(a).await;
        let mut first = Box::pin(t.take(b));
        assert!(poll_once(&mut first).await.is_none());
        let mut second = Box::pin(t.take(a));
        assert!(poll_once(&mut second).await.is_none());
        // The turn goes to `first`, which gives up before it sees it...
        drop(held);
        drop(first);
        // ...so it is passed on to the next waiter.
        let turn = poll_once(&mut second)
            .await
            .expect("the turn was passed on");
        drop(turn);
        drop(second);
        assert!(is_clean(&t));
        assert_eq!(free(&t), 1);
        // The same when the waiter's source has others waiting.
        let held = t.take(b).await;
        let mut first = Box::pin(t.take(a));
        assert!(poll_once(&mut first).await.is_none());
        let mut second = Box::pin(t.take(a));
        assert!(poll_once(&mut second).await.is_none());
        drop(held);
        drop(first);
        let turn = poll_once(&mut second)
            .await
            .expect("the turn was passed on");
        drop(turn);
        drop(second);
        assert!(is_clean(&t));
        assert_eq!(free(&t), 1);
        // And with nobody waiting, it comes back free.
        let held = t.take(a).await;
        let mut gone = Box::pin(t.take(b));
        assert!(poll_once(&mut gone).await.is_none());
        drop(held);
        drop(gone);
        assert!(is_clean(&t));
        assert_eq!(free(&t), 1);
    }
}
