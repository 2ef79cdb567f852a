//! A lease that one replica at a time holds in the store (the outbox
//! relay's), kept by a task of its own so that slow work under it does not
//! delay its renewal.
//!
//! Taken with `SET NX PX` and renewed every third of its time to live, in
//! the same script as the other leases (`Store::lease_sync`), each grant
//! with a fencing token. The holder counts the lease as its own until the
//! time it asked for the last successful grant or renewal, plus the time
//! to live, minus a margin for the clocks of the two hosts: it stops
//! before anyone else can be granted the lease.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::store::Store;

/// One lease, as this replica sees it.
pub(crate) struct Lease {
    name: String,
    owner: String,
    ttl: Duration,
    /// The token held and until when, if held.
    held: Mutex<Option<(u64, Instant)>>,
    /// Set to 1 while held, 0 otherwise; none for a lease among several
    /// counted together.
    gauge: Option<&'static str>,
}

impl Lease {
    /// Lease `name` for `owner`, lasting `ttl`; `gauge` is set to 1 while
    /// it is held.
    pub(crate) fn new(name: &str, owner: &str, ttl: Duration, gauge: &'static str) -> Lease {
        Lease {
            name: name.to_owned(),
            owner: owner.to_owned(),
            ttl: ttl.max(Duration::from_millis(30)),
            held: Mutex::new(None),
            gauge: Some(gauge),
        }
    }

    /// Lease `name` for `owner`, lasting `ttl`, without a gauge of its own.
    pub(crate) fn quiet(name: &str, owner: &str, ttl: Duration) -> Lease {
        Lease {
            gauge: None,
            ..Lease::new(name, owner, ttl, "")
        }
    }

    /// The lease's name in the store.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Who asks for it.
    pub(crate) fn owner(&self) -> &str {
        &self.owner
    }

    /// How long a grant lasts.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long before its end a grant asked for at `asked` is counted as
    /// over: the margin for the clocks of the two hosts.
    pub(crate) fn held_until(&self, asked: Instant) -> Instant {
        asked + self.ttl - (self.ttl / 10).min(Duration::from_millis(500))
    }

    /// The token, while the lease is surely held.
    pub(crate) fn held(&self) -> Option<u64> {
        let held = *self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.filter(|(_, until)| Instant::now() < *until).map(|(t, _)| t)
    }

    /// Records what the store granted: a token and until when it is
    /// surely held, or nothing.
    pub(crate) fn set(&self, held: Option<(u64, Instant)>) {
        let was = std::mem::replace(
            &mut *self
                .held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            held,
        );
        match (was.map(|(t, _)| t), held.map(|(t, _)| t)) {
            (None, Some(token)) => tracing::info!(lease = %self.name, token, "lease taken"),
            (Some(_), None) => tracing::info!(lease = %self.name, "lease no longer held"),
            _ => {}
        }
        if let Some(gauge) = self.gauge {
            metrics::gauge!(gauge).set(if held.is_some() { 1.0 } else { 0.0 });
        }
    }

    /// Takes the lease when it is free and keeps it; runs until aborted.
    pub(crate) async fn keep(self: Arc<Self>, store: Store) {
        let every = self.ttl / 3;
        loop {
            let asked = Instant::now();
            let wanted = [(self.name.clone(), true)];
            match store.lease_sync(&wanted, &self.owner, self.ttl).await {
                Ok(tokens) => match tokens.first().copied().unwrap_or(0) {
                    0 => self.set(None),
                    // Counted from before the request: the store may have
                    // granted it the moment the request arrived.
                    token => self.set(Some((token, self.held_until(asked)))),
                },
                Err(e) => {
                    tracing::debug!(lease = %self.name, error = %e, "the lease could not be renewed; it runs out unless renewed in time");
                    if self.held().is_none() {
                        self.set(None);
                    }
                }
            }
            tokio::time::sleep_until(asked + every).await;
        }
    }

    /// Gives the lease up if held (at shutdown, within `deadline`), so
    /// that another replica takes it at its next attempt.
    pub(crate) async fn release(&self, store: &Store, deadline: Instant) {
        if self.held().is_none() {
            return;
        }
        self.set(None);
        let unwanted = [(self.name.clone(), false)];
        match tokio::time::timeout_at(deadline, store.lease_sync(&unwanted, &self.owner, self.ttl)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(lease = %self.name, error = %e, "the lease could not be given up; it runs out by itself")
            }
            Err(_) => {
                tracing::warn!(lease = %self.name, "the lease could not be given up in time; it runs out by itself")
            }
        }
    }
}

pub(crate) use crate::store::Held;

/// A lease's name and what this replica holds of it.
pub(crate) type HeldLease = (String, Arc<Held>);

/// Keeps `leases` (a name and the token this replica holds, shared with
/// what runs under it) while what runs under them drains: renews them
/// every third of `ttl`; a lease that is lost, or cannot be renewed before
/// it would run out, gets token 0, so that what runs under it stops
/// sending and writing. Runs until aborted. Without it, the leases of
/// partitions draining at shutdown ran out while their sagas still ran.
pub(crate) async fn hold(store: Store, owner: String, leases: Vec<HeldLease>, ttl: Duration) {
    use std::sync::atomic::Ordering;
    if leases.is_empty() {
        return;
    }
    let every = ttl / 3;
    let wanted: Vec<(String, bool)> = leases.iter().map(|(name, _)| (name.clone(), true)).collect();
    loop {
        let asked = Instant::now();
        // Not renewed (an error): each runs out at its own time, which
        // `Held::token_now` tells.
        if let Ok(tokens) = store.lease_sync(&wanted, &owner, ttl).await {
            let mut taken_again = Vec::new();
            for ((name, held), token) in leases.iter().zip(tokens) {
                if token == held.token.load(Ordering::Acquire) && token != 0 {
                    held.grant(token, asked + ttl);
                } else {
                    held.token.store(0, Ordering::Release);
                    // It had lapsed and was taken anew: not wanted, since
                    // what runs under the old token cannot use it.
                    if token != 0 {
                        taken_again.push((name.clone(), false));
                    }
                }
            }
            if !taken_again.is_empty() {
                let _ = store.lease_sync(&taken_again, &owner, ttl).await;
            }
        }
        tokio::time::sleep_until(asked + every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_at_a_time_and_a_quick_hand_over_on_release() {
        let store: Store = crate::store::MemoryStore::new().into();
        let ttl = Duration::from_millis(300);
        let a = Arc::new(Lease::new("relay", "a", ttl, "catga_test_lease"));
        let b = Arc::new(Lease::new("relay", "b", ttl, "catga_test_lease"));
        let ka = tokio::spawn(Arc::clone(&a).keep(store.clone()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let kb = tokio::spawn(Arc::clone(&b).keep(store.clone()));
        tokio::time::sleep(Duration::from_millis(400)).await;
        let first = a.held().expect("a took it first and keeps it");
        assert!(b.held().is_none(), "never two holders");
        // a stops renewing (its process stalls): b takes it after the ttl,
        // with a greater token, and a no longer counts it as its own.
        ka.abort();
        tokio::time::sleep(ttl + Duration::from_millis(200)).await;
        assert!(a.held().is_none());
        let second = b.held().expect("b took it over");
        assert!(second > first, "tokens grow: {first} then {second}");
        kb.abort();
        b.release(&store, Instant::now() + Duration::from_secs(1)).await;
        assert!(b.held().is_none());
        let tokens = store
            .lease_sync(&[("relay".to_owned(), true)], "a", ttl)
            .await
            .expect("sync");
        assert!(tokens[0] > second, "released: taken at once, with a new token");
    }
}
