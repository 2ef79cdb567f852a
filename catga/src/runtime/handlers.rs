//! Starting and stopping the serving of handlers: their subscriptions and
//! serve loops, and the handler table logged at start-up.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::served::{Served, Serving};
use super::{Shared, keyed, serve, shutdown};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::registry::{HandlerKind, HandlerSpec};

/// Starts serving `spec` unless it is served already (see
/// [`Runtime::start_handler`]).
pub(crate) async fn start_serving(
    spec: &'static HandlerSpec,
    shared: &Arc<Shared>,
    serving: &tokio::sync::Mutex<HashMap<&'static str, Serving>>,
) -> Result<()> {
    let mut serving = serving.lock().await;
    if serving.contains_key(spec.name()) {
        return Ok(());
    }
    if shared.health.fatal().is_some() || shared.health.is_draining() {
        return Err(Error::new(ErrorKind::Unavailable, "the runtime is stopping"));
    }
    let mut others: Vec<&'static HandlerSpec> = serving.values().map(|s| s.served.spec).collect();
    others.push(spec);
    crate::registry::check(&others, true)?;
    let started = spawn_handler(spec, shared).await?;
    serving.insert(spec.name(), started);
    Ok(())
}

/// Starts serving the leader handlers `specs` (this replica just won the
/// lease) and lists them as served once the broker has their
/// subscriptions, waiting at most `within` for that. What is served under
/// a lease takes no confirmation ticket (so that readiness does not dip
/// when leadership moves), so without this wait a standby that took over
/// under CI load was listed as serving while the 20 events published
/// right after reached no subscriber. One round trip for all of them,
/// bounded as a whole (the caller passes a third of the lease, so that a
/// slow broker cannot make the new leader miss its first renewal), and
/// none while disconnected: the client subscribes again on reconnecting.
pub(crate) async fn start_leading(
    specs: &[&'static HandlerSpec],
    shared: &Arc<Shared>,
    serving: &tokio::sync::Mutex<HashMap<&'static str, Serving>>,
    within: std::time::Duration,
) {
    // Listed in `serving` at once, and the lock held through the round
    // trip: `Runtime::serving` sees them only once confirmed, and a
    // shutdown that aborts the leader loop meanwhile finds them there and
    // drains them with the rest (held elsewhere, they would drain on
    // their own past the shutdown).
    let mut serving = serving.lock().await;
    let mut started = 0;
    for spec in specs {
        if serving.contains_key(spec.name()) {
            continue;
        }
        if shared.health.fatal().is_some() || shared.health.is_draining() {
            break;
        }
        let mut others: Vec<&'static HandlerSpec> = serving.values().map(|s| s.served.spec).collect();
        others.push(spec);
        let spawned = match crate::registry::check(&others, true) {
            Ok(()) => spawn_handler(spec, shared).await,
            Err(e) => Err(e),
        };
        match spawned {
            Ok(s) => {
                serving.insert(spec.name(), s);
                started += 1;
            }
            Err(e) => tracing::error!(handler = spec.name(), error = %e, "a leader handler could not start"),
        }
    }
    let transport = shared.client.transport();
    if started > 0
        && transport.is_connected()
        && let Err(e) = tokio::time::timeout(within, transport.round_trip(within))
            .await
            .unwrap_or_else(|_| Err(Error::new(ErrorKind::Timeout, "no round trip in time")))
    {
        tracing::debug!(error = %e, "the leader handlers' subscriptions are not confirmed yet");
    }
}

/// Stops serving handler `name` (see [`Runtime::stop_handler`]).
pub(crate) async fn stop_serving_one(
    name: &str,
    shared: &Arc<Shared>,
    serving: &tokio::sync::Mutex<HashMap<&'static str, Serving>>,
) -> Result<()> {
    let mut all = serving.lock().await;
    let Some(serving) = all.remove(name) else {
        return Err(Error::new(
            ErrorKind::Config,
            format!("handler `{name}` is not being served"),
        ));
    };
    shared
        .endpoints
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(name);
    let deadline = tokio::time::Instant::now() + shared.config.drain_timeout;
    let (wanted, elective) = (serving.served.parallel, serving.served.elective());
    let outcome = shutdown::stop_serving(vec![serving], deadline).await;
    // What is served under a lease is counted by its loops (see
    // `ElectiveSlot`).
    if !elective {
        shared.health.unwant(wanted);
    }
    drop(all);
    if outcome.cancelled > 0 {
        return Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "handler `{name}` stopped with {} loops cancelled at the drain deadline",
                outcome.cancelled
            ),
        ));
    }
    Ok(())
}

/// Subscribes one handler (the client queues core subscriptions while it
/// connects, so this fails only when the client is closed) and spawns its
/// serve loops. A durable handler subscribes in its loops, retrying until
/// JetStream answers: a broker that is down at start-up must not stop it.
pub(crate) async fn spawn_handler(spec: &'static HandlerSpec, shared: &Arc<Shared>) -> Result<Serving> {
    let served = Arc::new(Served::new(spec, &shared.config));
    shared
        .endpoints
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(spec.name(), Arc::clone(&served));
    spawn_served(served, shared).await
}

/// Serves one partition of keyed saga `spec`.
pub(crate) async fn spawn_partition(
    spec: &'static HandlerSpec,
    shared: &Arc<Shared>,
    partition: Arc<keyed::Partition>,
) -> Result<Serving> {
    spawn_served(
        Arc::new(Served::partition(spec, &shared.config, partition)),
        shared,
    )
    .await
}

pub(crate) async fn spawn_served(served: Arc<Served>, shared: &Arc<Shared>) -> Result<Serving> {
    let mut subs = Vec::with_capacity(served.parallel);
    for _ in 0..served.parallel {
        subs.push(match served.durable {
            None => Some(served.subscribe(shared).await?),
            Some(_) => None,
        });
    }
    let (stop, stop_rx) = watch::channel(false);
    let elective = served.elective();
    if !elective {
        shared.health.want(served.parallel);
    }
    let tasks = subs
        .into_iter()
        .map(|sub| {
            if sub.is_some() && !elective {
                shared.health.subscribed();
            }
            // Taken here, not in the loop: the embedded `start()` waits
            // for every elective slot to be bound, and a loop not polled
            // yet had none, so a durable leader handler could still be
            // binding its stream when `start()` returned (an event
            // published right then was lost, once in a CI run).
            let slot = elective.then(|| shared.health.elective_slot());
            shared.tasks.spawn(serve::serve(
                Arc::clone(&served),
                Arc::clone(shared),
                sub,
                stop_rx.clone(),
                slot,
            ))
        })
        .collect();
    Ok(Serving { served, stop, tasks })
}

pub(crate) fn log_table(selected: &[&'static HandlerSpec], config: &Config) {
    tracing::info!(
        count = selected.len(),
        region = config.region.as_deref().unwrap_or("-"),
        "handler table"
    );
    for s in selected {
        let served = Served::new(s, config);
        tracing::info!(
            kind = match s.kind() {
                HandlerKind::Command => "command",
                HandlerKind::Event => "event",
            },
            subject = s.subject(),
            queue_group = served.to.queue_group.as_deref().unwrap_or("-"),
            handler = s.name(),
            message_type = s.message_type(),
            concurrency = served.limit,
            parallel = served.parallel,
            "handler"
        );
    }
}
