//! Readiness: a replica is ready when every subscription it wants is live
//! and confirmed by the broker, the connection is up, it is not draining,
//! and nothing fatal happened. Liveness: its serve loops run and no fatal
//! error stopped it.
//!
//! Confirmation uses tickets: a subscription takes the next ticket after
//! its SUB is queued on the connection; a round trip started later proves
//! the broker has every subscription with a smaller ticket.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::error::{Error, ErrorKind, Result};
use crate::transport::Transport;

#[derive(Debug, Clone, Default)]
struct State {
    /// Subscriptions the runtime wants right now.
    wanted: usize,
    /// Subscriptions that are live (may still await confirmation).
    live: usize,
    /// The serve loops of what this replica serves while it holds a lease
    /// (the leader handlers, keyed-saga partitions) that have no live
    /// subscription yet (or lost theirs), by slot, since when. They come
    /// and go as leases move, so they take no confirmation ticket, and
    /// one counts only once it has waited longer than [`ELECTIVE_GRACE`]:
    /// a replica that gains leadership must not look unready to its load
    /// balancer while the broker confirms the new subscriptions.
    elective: std::collections::BTreeMap<u64, Instant>,
    /// The next elective slot's number.
    next_slot: u64,
    /// The next ticket to hand out.
    next_ticket: u64,
    /// Every ticket below this one is confirmed by the broker.
    confirmed_upto: u64,
    draining: bool,
    /// Why the state store failed its last ping, if it did (it is assumed
    /// to answer until it fails).
    store_down: Option<String>,
    /// What puts a promise at risk without stopping the replica, by
    /// source ("store", "broker").
    warnings: std::collections::BTreeMap<&'static str, String>,
    /// What keeps a keyed saga from being served here as its ring says,
    /// by saga (see [`KeyedTrouble`]).
    keyed: std::collections::BTreeMap<&'static str, KeyedTrouble>,
    fatal: Option<(ErrorKind, String)>,
}

/// What keeps a keyed saga from being served as its ring says.
#[derive(Debug, Clone)]
struct KeyedTrouble {
    /// From when it fails readiness (its start plus the grace).
    from: Instant,
    /// What it is now; `None` once it cleared.
    why: Option<String>,
    /// Since when it is clear. It is forgotten only once it stayed clear
    /// for a grace: a trouble that clears and comes back (a router that
    /// binds, then fails to route, again and again) keeps its start.
    clear_since: Option<Instant>,
    grace: Duration,
}

/// How long the subscriptions of a lease just won may take to go live
/// before readiness says so: more than the 3.2 s a durable consumer's
/// binding backs off at most between attempts.
const ELECTIVE_GRACE: Duration = Duration::from_secs(5);

/// One serve loop's place in readiness while it serves under a lease (see
/// [`State::elective`]): waiting for a subscription from its creation
/// until [`live`](Self::live), again after [`lost`](Self::lost), and out
/// of the count once it [`leaves`](Self::leave) (its drain began) or is
/// dropped (its loop ended or was cancelled), so that the count cannot
/// drift whatever way a loop ends.
pub(crate) struct ElectiveSlot {
    health: Health,
    id: u64,
}

impl ElectiveSlot {
    /// The loop has a live subscription.
    pub(crate) fn live(&self) {
        let id = self.id;
        self.health
            .state
            .send_if_modified(|s| s.elective.remove(&id).is_some());
    }

    /// The loop's subscription ended unexpectedly: it waits for another.
    pub(crate) fn lost(&self) {
        let id = self.id;
        self.health
            .state
            .send_if_modified(|s| match s.elective.entry(id) {
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(Instant::now());
                    true
                }
                std::collections::btree_map::Entry::Occupied(_) => false,
            });
    }

    /// The loop drains: what it serves is no longer meant to be served.
    pub(crate) fn leave(&self) {
        self.live();
    }
}

impl Drop for ElectiveSlot {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Why a replica is not ready, in words an operator can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Every check passed.
    pub ready: bool,
    /// The checks that failed, e.g. "subscriptions: 2 of 5 live".
    pub failing: Vec<String>,
    /// What does not stop the replica from serving but puts a promise at
    /// risk, e.g. a Redis that may evict keys under memory pressure.
    pub warnings: Vec<String>,
}

/// Shared readiness state of one runtime. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Health {
    state: Arc<watch::Sender<State>>,
}

impl Health {
    pub(crate) fn new() -> Health {
        Health {
            state: Arc::new(watch::Sender::new(State::default())),
        }
    }

    /// `n` more subscriptions are wanted (a handler starts).
    pub(crate) fn want(&self, n: usize) {
        self.state.send_modify(|s| s.wanted += n);
    }

    /// `n` fewer subscriptions are wanted (a handler stopped).
    pub(crate) fn unwant(&self, n: usize) {
        self.state.send_modify(|s| s.wanted = s.wanted.saturating_sub(n));
    }

    /// A subscription is live; its SUB is queued. Returns nothing: the
    /// ticket it takes is confirmed by the next round trip.
    pub(crate) fn subscribed(&self) {
        self.state.send_modify(|s| {
            s.live += 1;
            s.next_ticket += 1;
        });
    }

    /// A subscription ended (drained, or lost).
    pub(crate) fn unsubscribed(&self) {
        self.state.send_modify(|s| s.live = s.live.saturating_sub(1));
    }

    /// How many serve loops of what is served under a lease wait for a
    /// subscription right now.
    pub(crate) fn elective_waiting(&self) -> usize {
        self.state.borrow().elective.len()
    }

    /// A serve loop of something served under a lease starts: it waits
    /// for its subscription (see [`ElectiveSlot`]).
    pub(crate) fn elective_slot(&self) -> ElectiveSlot {
        let mut id = 0;
        self.state.send_modify(|s| {
            id = s.next_slot;
            s.next_slot += 1;
            s.elective.insert(id, Instant::now());
        });
        ElectiveSlot {
            health: self.clone(),
            id,
        }
    }

    /// The state store answers (`None`), or not, and why.
    pub(crate) fn set_store_down(&self, why: Option<String>) {
        self.state.send_if_modified(|s| {
            let changed = s.store_down != why;
            s.store_down = why;
            changed
        });
    }

    pub(crate) fn set_draining(&self) {
        self.state.send_modify(|s| s.draining = true);
    }

    /// Something the runtime cannot recover from: it stops being ready and
    /// live, and `run()` returns this error (so that the orchestrator
    /// restarts the process). The first one wins.
    pub(crate) fn set_fatal(&self, err: &Error) {
        self.state.send_if_modified(|s| {
            if s.fatal.is_some() {
                return false;
            }
            tracing::error!(error = %err, "fatal: the runtime stops serving and reports not ready");
            s.fatal = Some((err.kind(), err.message().to_owned()));
            true
        });
    }

    /// Whether a shutdown started.
    pub(crate) fn is_draining(&self) -> bool {
        self.state.borrow().draining
    }

    /// Sets (or clears) the warning of `source` (see
    /// [`Readiness::warnings`]).
    pub(crate) fn set_warning(&self, source: &'static str, why: Option<String>) {
        self.state.send_if_modified(|s| match why {
            Some(w) => s.warnings.insert(source, w.clone()) != Some(w),
            None => s.warnings.remove(source).is_some(),
        });
    }

    /// What keeps keyed saga `saga` from being served here as its ring
    /// says (`None`: nothing). It fails readiness once it has lasted
    /// `grace`, however its words change meanwhile.
    pub(crate) fn set_keyed(&self, saga: &'static str, trouble: Option<String>, grace: Duration) {
        let now = Instant::now();
        self.state
            .send_if_modified(|s| match (trouble, s.keyed.get_mut(saga)) {
                (Some(why), Some(t)) => {
                    let changed = t.why.as_ref() != Some(&why);
                    t.why = Some(why);
                    t.clear_since = None;
                    changed
                }
                (Some(why), None) => {
                    s.keyed.insert(
                        saga,
                        KeyedTrouble {
                            from: now + grace,
                            why: Some(why),
                            clear_since: None,
                            grace,
                        },
                    );
                    true
                }
                (None, Some(t)) => match t.clear_since {
                    None => {
                        t.why = None;
                        t.clear_since = Some(now);
                        true
                    }
                    Some(since) if now.duration_since(since) >= t.grace => {
                        s.keyed.remove(saga);
                        true
                    }
                    Some(_) => false,
                },
                (None, None) => false,
            });
    }

    /// Forgets keyed saga `saga`'s trouble at once (it is no longer run).
    pub(crate) fn forget_keyed(&self, saga: &'static str) {
        self.state.send_if_modified(|s| s.keyed.remove(saga).is_some());
    }

    /// Whether the state store failed its last ping.
    pub(crate) fn store_down(&self) -> bool {
        self.state.borrow().store_down.is_some()
    }

    pub(crate) fn fatal(&self) -> Option<Error> {
        self.state
            .borrow()
            .fatal
            .as_ref()
            .map(|(k, m)| Error::new(*k, m.clone()))
    }

    /// Waits until a fatal error is set.
    pub(crate) async fn wait_fatal(&self) -> Error {
        let mut rx = self.state.subscribe();
        loop {
            if let Some(e) = self.fatal() {
                return e;
            }
            if rx.changed().await.is_err() {
                return Error::new(ErrorKind::Internal, "the runtime's state went away");
            }
        }
    }

    pub(crate) fn check(&self, transport: &Transport) -> Readiness {
        let s = self.state.borrow().clone();
        let mut failing = Vec::new();
        if let Some((kind, msg)) = &s.fatal {
            failing.push(format!("fatal: {kind}: {msg}"));
        }
        if s.draining {
            failing.push("draining: shutting down".to_owned());
        }
        if !transport.is_connected() {
            match transport.refusal() {
                Some(why) => failing.push(format!("broker: refused: {why}")),
                None => failing.push("broker: not connected".to_owned()),
            }
        }
        if let Some(why) = &s.store_down {
            failing.push(format!("store: {why}"));
        }
        if s.live < s.wanted {
            failing.push(format!("subscriptions: {} of {} live", s.live, s.wanted));
        }
        if s.next_ticket > s.confirmed_upto {
            failing.push("subscriptions: waiting for the broker to confirm".to_owned());
        }
        for (saga, t) in &s.keyed {
            if let Some(why) = &t.why
                && Instant::now() >= t.from
            {
                failing.push(format!("keyed saga {saga}: {why}"));
            }
        }
        let waiting: Vec<Duration> = s
            .elective
            .values()
            .map(Instant::elapsed)
            .filter(|w| *w >= ELECTIVE_GRACE)
            .collect();
        if let Some(longest) = waiting.iter().max() {
            failing.push(format!(
                "subscriptions: {} served under a lease (leader handlers, saga partitions) not live for over {} s \
                 (the longest for {} s)",
                waiting.len(),
                ELECTIVE_GRACE.as_secs(),
                longest.as_secs()
            ));
        }
        Readiness {
            ready: failing.is_empty(),
            failing,
            warnings: s.warnings.iter().map(|(k, w)| format!("{k}: {w}")).collect(),
        }
    }

    /// Waits until ready, or fails with the fatal error.
    pub(crate) async fn wait_ready(&self, transport: &Transport) -> Result<()> {
        let mut rx = self.state.subscribe();
        loop {
            if let Some(e) = self.fatal() {
                return Err(e);
            }
            if self.check(transport).ready {
                return Ok(());
            }
            // The connection state is not part of the watched state: poll
            // it as well.
            let _ = tokio::time::timeout(Duration::from_millis(50), rx.changed()).await;
        }
    }

    /// Confirms new subscriptions by round trips, for as long as it runs.
    pub(crate) async fn confirm_loop(self, transport: Transport, instance: String) {
        let mut rx = self.state.subscribe();
        let mut announced = false;
        loop {
            let target = {
                let s = rx.borrow_and_update();
                (s.next_ticket > s.confirmed_upto).then_some(s.next_ticket)
            };
            let Some(target) = target else {
                if rx.changed().await.is_err() {
                    return;
                }
                continue;
            };
            match transport.round_trip(Duration::from_millis(500)).await {
                Ok(()) => {
                    // The server's refusal of a SUB (-ERR) comes before the
                    // round trip's message on the wire, but async-nats hands
                    // it to its event callback through a task of its own:
                    // the reply can win that race (seen: 1 start-up in 3
                    // ready with a refused subscription). A moment for the
                    // refusal to arrive, before confirming.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    self.state
                        .send_modify(|s| s.confirmed_upto = s.confirmed_upto.max(target));
                    if !announced && self.check(&transport).ready {
                        announced = true;
                        tracing::info!(%instance, "ready: every subscription is confirmed by the broker");
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "waiting for the broker to confirm subscriptions");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(h: &Health) -> usize {
        h.state.borrow().elective.len()
    }

    #[test]
    fn a_lease_slot_waits_until_live_and_leaves_the_count_however_its_loop_ends() {
        let health = Health::new();
        let a = health.elective_slot();
        let b = health.elective_slot();
        assert_eq!(waiting(&health), 2, "both wait for a subscription");
        a.live();
        assert_eq!(waiting(&health), 1);
        a.lost();
        let since = health.state.borrow().elective[&a.id];
        a.lost();
        assert_eq!(
            health.state.borrow().elective[&a.id],
            since,
            "timed from the first loss"
        );
        a.leave();
        assert_eq!(waiting(&health), 1, "a drain is not a shortfall");
        drop(b);
        assert_eq!(
            waiting(&health),
            0,
            "a loop cancelled while waiting leaves no trace"
        );
        drop(a);
        assert_eq!(waiting(&health), 0);
    }

    #[test]
    fn lease_slots_take_no_confirmation_ticket() {
        let health = Health::new();
        let slot = health.elective_slot();
        slot.live();
        health.want(1);
        health.subscribed();
        let s = health.state.borrow().clone();
        assert_eq!((s.live, s.wanted, s.next_ticket), (1, 1, 1));
    }

    #[test]
    fn a_keyed_trouble_that_clears_and_comes_back_keeps_its_start() {
        let health = Health::new();
        let grace = Duration::from_secs(60);
        health.set_keyed("s", Some("a".into()), grace);
        let from = health.state.borrow().keyed["s"].from;
        health.set_keyed("s", None, grace);
        assert!(
            health.state.borrow().keyed["s"].why.is_none(),
            "cleared, remembered"
        );
        health.set_keyed("s", Some("b".into()), grace);
        assert_eq!(health.state.borrow().keyed["s"].from, from);
        health.forget_keyed("s");
        assert!(health.state.borrow().keyed.is_empty());
    }
}
