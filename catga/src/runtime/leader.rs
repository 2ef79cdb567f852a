//! Leadership: the replica that holds the service's leader lease serves
//! the `leader` handlers (`#[event(leader)]`); the others stand by.
//!
//! The lease lives in the store (`SET NX PX` and a compare-and-extend
//! script on Redis), each grant with a fencing token from `INCR`. A
//! replica renews every third of the lease; when a renewal fails, or it
//! cannot renew before its lease would run out, it stops serving the
//! `leader` handlers. A replica that stalls past its lease (a long pause,
//! a partition) may still try to write: every save of a `leader` handler
//! carries the token it started under, and the store refuses it once a
//! newer lease was granted, in the same atomic operation as the write.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::Mutex;
use tokio::time::Instant;

use super::Shared;
use super::served::Serving;
use crate::registry::HandlerSpec;

/// This replica's side of the lease.
pub(crate) struct Leadership {
    /// Who holds it, to the store: the instance id and a nonce of this
    /// start, so that a restarted replica never inherits its old lease.
    owner: String,
    /// The fencing token of the lease held (0: not the leader) and until
    /// when it is surely held, shared with the leader handlers running,
    /// which check it before they send.
    token: Arc<super::lease::Held>,
    /// The lease's name, as fences carry it.
    lease: Arc<str>,
    /// The first attempt for the lease was answered (and, if it was won,
    /// the leader handlers started).
    asked: std::sync::atomic::AtomicBool,
}

impl Leadership {
    pub(crate) fn new(instance_id: &str) -> Leadership {
        Leadership {
            owner: format!("{instance_id}/{}", crate::wire::new_message_id()),
            token: Arc::new(super::lease::Held::default()),
            lease: crate::store::LEADER_LEASE.into(),
            asked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether the first attempt for the lease was answered.
    pub(crate) fn asked(&self) -> bool {
        self.asked.load(Ordering::Acquire)
    }

    /// This start's name in the store (also its name in the ring of
    /// keyed sagas).
    pub(crate) fn owner(&self) -> &str {
        &self.owner
    }

    /// The fencing token of the lease held, if this replica leads.
    pub(crate) fn token(&self) -> Option<u64> {
        let t = self.token.token.load(Ordering::Acquire);
        (t != 0).then_some(t)
    }

    /// The token held now, as the leader handlers see it.
    pub(crate) fn held(&self) -> Arc<super::lease::Held> {
        Arc::clone(&self.token)
    }

    /// The fence of a `leader` handler's message taken now, if this
    /// replica leads.
    pub(crate) fn fence(&self) -> Option<crate::store::Fence> {
        self.token().map(|token| crate::store::Fence {
            lease: Arc::clone(&self.lease),
            token,
        })
    }

    fn set(&self, token: u64) {
        self.token.token.store(token, Ordering::Release);
        metrics::gauge!("catga_leader").set(if token == 0 { 0.0 } else { 1.0 });
    }

    /// The lease's name and the token held, for holding it through a
    /// drain; `None` unless this replica leads.
    pub(crate) fn lease(&self) -> Option<super::lease::HeldLease> {
        self.token()
            .map(|_| (self.lease.to_string(), Arc::clone(&self.token)))
    }

    /// Gives the lease up (at shutdown), so that a standby takes over at
    /// its next attempt instead of after the lease runs out.
    pub(crate) async fn release(&self, shared: &Shared) {
        if self.token().is_some() {
            self.set(0);
            if let Err(e) = shared.store.leader_release(&self.owner).await {
                tracing::warn!(error = %e, "the leader lease could not be released; it runs out by itself");
            }
        }
    }
}

/// Tries for the lease, keeps it, and starts or stops `specs` as it is
/// won or lost; runs until aborted.
pub(crate) async fn run(
    shared: Arc<Shared>,
    serving: Arc<Mutex<HashMap<&'static str, Serving>>>,
    specs: Vec<&'static HandlerSpec>,
) {
    let lease = shared.config.leader_lease;
    let every = lease / 3;
    let me = &shared.leadership;
    // Until when this replica surely holds the lease: from before the
    // last successful grant or renewal was asked, plus the lease.
    let mut held_until = Instant::now();
    loop {
        let asked = Instant::now();
        if me.token().is_none() {
            match shared.store.leader_acquire(&me.owner, lease).await {
                Ok(Some(token)) => {
                    held_until = asked + lease;
                    me.token.grant(token, held_until);
                    me.set(token);
                    tracing::info!(
                        token,
                        "this replica is the leader now: serving the leader handlers"
                    );
                    super::handlers::start_leading(&specs, &shared, &serving, every).await;
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "the leader lease could not be asked for"),
            }
            me.asked.store(true, Ordering::Release);
        } else {
            // Renewed through the same script that grants it: a fence
            // key that vanished under the held lease (evicted) is granted
            // anew, and the handlers that started under the old token are
            // fenced, instead of every write being refused for good.
            let lost = match shared.store.leader_acquire(&me.owner, lease).await {
                Ok(Some(token)) => {
                    held_until = asked + lease;
                    if me.token() != Some(token) {
                        tracing::warn!(token, "the leader lease was granted anew (its fence was lost)");
                        me.set(token);
                    }
                    me.token.grant(token, held_until);
                    None
                }
                Ok(None) => Some("the lease passed to another replica".to_owned()),
                // Not renewed: the lease may still be ours until it runs
                // out; stop before it could be granted to another.
                Err(e) if Instant::now() + every >= held_until => {
                    Some(format!("the lease could not be renewed before it ran out: {e}"))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the leader lease could not be renewed; trying again");
                    None
                }
            };
            if let Some(why) = lost {
                // Fence first: from now on this replica's leader handlers
                // start nothing new, and what they save is refused once
                // another replica holds the lease.
                me.set(0);
                tracing::warn!(reason = %why, "this replica is no longer the leader: stopping the leader handlers");
                for spec in &specs {
                    if let Err(e) = super::handlers::stop_serving_one(spec.name(), &shared, &serving).await {
                        tracing::warn!(handler = spec.name(), error = %e, "a leader handler stopped uncleanly");
                    }
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}
