//! Background watchers of a replica: its liveness in the store, the
//! broker's version, the store's health and eviction policy, and the
//! broker's refusals of its subscriptions.

use std::sync::Arc;

use super::Shared;
use crate::error::{Error, ErrorKind};

/// Says this replica is alive, every third of `CATGA_INBOX_LEASE_MS`:
/// its claims on the messages it handles hold while it does, and lapse
/// within that time once it stops (a crash, a stall), so that a retry
/// runs the message. One write per replica, not one renewal per message:
/// with a claim lease renewed per message, a retry after a SIGKILL waited
/// out the 5 s lease.
pub(crate) async fn keep_alive(shared: Arc<Shared>) {
    let ttl = shared.config.inbox_lease;
    let me = shared.leadership.owner().to_owned();
    loop {
        let asked = tokio::time::Instant::now();
        if let Err(e) = Box::pin(shared.store.alive(&me, ttl, true)).await {
            tracing::debug!(error = %e, "could not say this replica is alive; its claims lapse unless it can");
        }
        tokio::time::sleep_until(asked + ttl / 3).await;
    }
}

/// Every third of `CATGA_INBOX_LEASE_MS`, [`answer_doubts`]: in a loop of
/// its own, so that a slow store or many claims to give up never hold up
/// the liveness write (its claims would lapse, and handlers still running
/// start again elsewhere). A round cut short leaves the rest to the
/// waiting replicas, which tell this one again.
pub(crate) async fn keep_answering_doubts(shared: Arc<Shared>) {
    let every = shared.config.inbox_lease / 3;
    let me = shared.leadership.owner().to_owned();
    loop {
        let asked = tokio::time::Instant::now();
        let _ = tokio::time::timeout(every, Box::pin(answer_doubts(&shared, &me))).await;
        tokio::time::sleep_until(asked + every).await;
    }
}

/// Gives up the claims of this replica's that other replicas found
/// keeping a message busy and that nothing here holds: their end was
/// written, then lost (a store failover to a copy that lagged, as Redis'
/// asynchronous replication can). Such a claim names a live replica, so
/// it would keep the message busy for as long as this replica lives; the
/// replica waiting on it cannot tell a lost end from a slow handler, only
/// this one can. A claim an attempt here holds, or whose id an attempt
/// here owns, is kept (see `Orphans::is_stale`).
pub(crate) async fn answer_doubts(shared: &Shared, me: &str) {
    let orphans = &shared.plain_work.orphans;
    for (shard, doubt) in shared.store.take_doubts(me).await {
        if !orphans.is_stale(&doubt.mark, me, &doubt.scope, &doubt.id) {
            continue;
        }
        tracing::warn!(
            message_id = %doubt.id,
            "a claim of this replica's that nothing here holds keeps the message busy on another replica \
             (its end was lost, as in a store failover): given up"
        );
        let given_up = shared
            .store
            .inbox_abandon_mark(shard, &doubt.scope, &doubt.id, &doubt.mark)
            .await;
        if let Err(e) = given_up {
            // The other replica doubts it again while it waits.
            tracing::debug!(error = %e, "a claim nothing here holds is not given up yet");
        }
    }
}

/// Once the broker is connected: warns (in the log and readiness) when
/// it is a nats-server older than 2.11. Older clustered servers
/// acknowledged a repeat of a message they had not stored yet, which the
/// ordered relay and router depend on not happening (they also check the
/// acknowledgement's sequence).
pub(crate) async fn check_broker(shared: Arc<Shared>) {
    let transport = shared.client.transport();
    if !transport.is_nats() {
        return;
    }
    loop {
        if let Some(version) = transport.server_version() {
            let parts: Vec<u32> = version
                .trim_start_matches('v')
                .split(['.', '-'])
                .take(2)
                .filter_map(|p| p.parse().ok())
                .collect();
            if parts.len() == 2 && (parts[0], parts[1]) < (2, 11) {
                let why = format!(
                    "nats-server {version} is older than 2.11: in a cluster it may acknowledge a repeated \
                     message it has not stored; run 2.11 or later"
                );
                tracing::error!(warning = %why, "the broker puts the delivery promises at risk");
                shared.health.set_warning("broker", Some(why));
            }
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Pings the store once a second: readiness requires the service's own
/// keys (leases, fences, dead-letter records, the shard-count mark) and
/// one shard to answer, so that Kubernetes stops routing to a replica
/// that cannot reach Redis; shards that do not answer while others do
/// are a warning.
pub(crate) async fn watch_store(shared: Arc<Shared>) {
    let mut was: Option<String> = None;
    let mut was_partly: Option<String> = None;
    let mut policy_checked = false;
    loop {
        // Once the store answers: whether it may evict what catga keeps.
        if !policy_checked && was.is_none() {
            let asked = tokio::time::timeout(std::time::Duration::from_secs(2), shared.store.eviction_risk());
            if let Ok(Ok(risk)) = asked.await {
                policy_checked = true;
                if let Some(why) = &risk {
                    tracing::error!(warning = %why, "the state store may lose what catga keeps in it");
                    metrics::gauge!("catga_store_eviction_risk").set(1.0);
                }
                shared.health.set_warning("store", risk);
            }
        }
        let pinged = shared.store.ping_shards(std::time::Duration::from_secs(2)).await;
        crate::ops::metrics::store_shards(&pinged.shards);
        let away: Vec<(usize, &String)> = pinged
            .shards
            .iter()
            .enumerate()
            .filter_map(|(shard, why)| why.as_ref().map(|why| (shard, why)))
            .collect();
        // Not ready when the service's own keys do not answer (the leases,
        // the relays' and the dead letters' records: every shard's work
        // pauses), or no shard does. A shard's master that is away fails
        // the keys of that shard on every replica alike, and the others
        // are still served here: a warning.
        let now = match &pinged.control {
            Some(why) => Some(why.clone()),
            None if away.len() == pinged.shards.len() => away.first().map(|(_, why)| (*why).clone()),
            None => None,
        };
        let partly = (!away.is_empty() && now.is_none()).then(|| {
            let shards: Vec<String> = away.iter().map(|(shard, _)| shard.to_string()).collect();
            format!(
                "shards {} of {} do not answer ({}): their keys fail until they do, the others are served",
                shards.join(", "),
                pinged.shards.len(),
                away.first().map_or("", |(_, why)| why.as_str())
            )
        });
        match (&was, &now) {
            (None, Some(why)) => {
                tracing::error!(error = %why, "the state store fails; not ready until it answers")
            }
            (Some(_), None) => tracing::info!("the state store answers again"),
            _ => {}
        }
        match (&was_partly, &partly) {
            (None, Some(why)) => tracing::error!(error = %why, "store shards fail"),
            (Some(_), None) if away.is_empty() => tracing::info!("every store shard answers again"),
            _ => {}
        }
        shared.health.set_warning("store shards", partly.clone());
        was_partly = partly;
        shared.health.set_store_down(now.clone());
        was = now;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Watches the broker's errors for a refused subscription of this
/// runtime: the broker keeps the connection and never delivers, so without
/// this the replica would look ready and be deaf.
pub(crate) async fn watch_refusals(
    shared: Arc<Shared>,
    errors: Option<tokio::sync::broadcast::Receiver<String>>,
    subjects: Vec<String>,
) {
    let Some(mut errors) = errors else {
        return;
    };
    loop {
        let text = match errors.recv().await {
            Ok(t) => t,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let lower = text.to_ascii_lowercase();
        if !lower.contains("permissions violation for subscription") {
            continue;
        }
        let refused = text.split('"').nth(1).unwrap_or_default();
        if subjects.iter().any(|s| s == refused) {
            shared.health.set_fatal(&Error::new(
                ErrorKind::Config,
                format!(
                    "the NATS server refused the subscription to \"{refused}\" ({text}); grant this \
                     user subscribe permission on it"
                ),
            ));
        }
    }
}
