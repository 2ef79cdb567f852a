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
    /// The subscriptions of what this replica serves while it holds a
    /// lease (the leader handlers, keyed-saga partitions): wanted and
    /// live, and since when fewer are live than wanted. They come and go
    /// as leases move, so they take no confirmation ticket, and a
    /// shortfall counts only once it outlasts [`ELECTIVE_GRACE`]: a
    /// replica that gains leadership must not look unready to its load
    /// balancer while the broker confirms the new subscriptions.
    elective: Elective,
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
    /// by saga, and from when it counts.
    keyed: std::collections::BTreeMap<&'static str, (Instant, String)>,
    fatal: Option<(ErrorKind, String)>,
}

/// See [`State::elective`].
#[derive(Debug, Clone, Default)]
struct Elective {
    wanted: usize,
    live: usize,
    short_since: Option<Instant>,
}

impl Elective {
    fn update(&mut self) {
        if self.live >= self.wanted {
            self.short_since = None;
        } else if self.short_since.is_none() {
            self.short_since = Some(Instant::now());
        }
    }
}

/// How long the subscriptions of a lease just won may take to go live
/// before readiness says so: more than the 3.2 s a durable consumer's
/// binding backs off at most between attempts.
const ELECTIVE_GRACE: Duration = Duration::from_secs(5);

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

    /// `n` more subscriptions are wanted (a handler starts); `elective`:
    /// served under a lease (see [`State::elective`]).
    pub(crate) fn want(&self, n: usize, elective: bool) {
        self.state.send_modify(|s| {
            if elective {
                s.elective.wanted += n;
                s.elective.update();
            } else {
                s.wanted += n;
            }
        });
    }

    /// `n` fewer subscriptions are wanted (a handler stopped).
    pub(crate) fn unwant(&self, n: usize, elective: bool) {
        self.state.send_modify(|s| {
            if elective {
                s.elective.wanted = s.elective.wanted.saturating_sub(n);
                s.elective.update();
            } else {
                s.wanted = s.wanted.saturating_sub(n);
            }
        });
    }

    /// A subscription is live; its SUB is queued. Returns nothing: the
    /// ticket it takes is confirmed by the next round trip.
    pub(crate) fn subscribed(&self, elective: bool) {
        self.state.send_modify(|s| {
            if elective {
                s.elective.live += 1;
                s.elective.update();
            } else {
                s.live += 1;
                s.next_ticket += 1;
            }
        });
    }

    /// A subscription ended (drained, or lost).
    pub(crate) fn unsubscribed(&self, elective: bool) {
        self.state.send_modify(|s| {
            if elective {
                s.elective.live = s.elective.live.saturating_sub(1);
                s.elective.update();
            } else {
                s.live = s.live.saturating_sub(1);
            }
        });
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
        self.state.send_if_modified(|s| match trouble {
            Some(why) => match s.keyed.get_mut(saga) {
                Some((_, was)) if *was == why => false,
                Some((_, was)) => {
                    *was = why;
                    true
                }
                None => {
                    s.keyed.insert(saga, (Instant::now() + grace, why));
                    true
                }
            },
            None => s.keyed.remove(saga).is_some(),
        });
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
        for (saga, (from, why)) in &s.keyed {
            if Instant::now() >= *from {
                failing.push(format!("keyed saga {saga}: {why}"));
            }
        }
        if let Some(since) = s.elective.short_since
            && since.elapsed() >= ELECTIVE_GRACE
        {
            failing.push(format!(
                "subscriptions: {} of {} served under a lease (leader handlers, saga partitions) live for {} s",
                s.elective.live,
                s.elective.wanted,
                since.elapsed().as_secs()
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

    #[test]
    fn a_lease_shortfall_is_timed_from_its_start_and_cleared_when_live() {
        let health = Health::new();
        let short = |h: &Health| h.state.borrow().elective.short_since;
        health.want(2, true);
        let since = short(&health).expect("short of two");
        health.subscribed(true);
        assert_eq!(short(&health), Some(since), "still short: timed from the start");
        health.subscribed(true);
        assert_eq!(short(&health), None, "all live");
        health.unsubscribed(true);
        assert!(short(&health).is_some(), "short again");
        health.unwant(1, true);
        assert_eq!(short(&health), None, "no longer wanted");
    }

    #[test]
    fn lease_subscriptions_take_no_confirmation_ticket() {
        let health = Health::new();
        health.want(1, true);
        health.subscribed(true);
        health.want(1, false);
        health.subscribed(false);
        let s = health.state.borrow().clone();
        assert_eq!((s.live, s.wanted, s.next_ticket), (1, 1, 1));
        assert_eq!((s.elective.live, s.elective.wanted), (1, 1));
    }
}
