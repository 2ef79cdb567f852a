//! Graceful shutdown under one deadline: readiness turns false first, every
//! serve loop drains at once (not one after another), and at the deadline
//! whatever still runs is aborted, awaited and reported. Flushing the last
//! replies shares the same deadline, so a broker that is down at SIGTERM
//! cannot stretch it.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Shared;
use super::served::Serving;
use crate::error::{Error, ErrorKind, Result};

/// Waits for SIGTERM or Ctrl-C.
pub(crate) async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The least time given to writing the last replies out, even past the
/// deadline: a round trip on loopback takes well under a millisecond, on
/// a loaded host tens of them.
const LAST_REPLIES_AT_LEAST: Duration = Duration::from_millis(200);

/// What stopping some serve loops came to.
pub(crate) struct Stopped {
    /// Loops still running at the deadline, aborted.
    pub cancelled: usize,
    /// Every subscription closed with the broker's confirmation that
    /// nothing more was on its way.
    pub handover_confirmed: bool,
}

/// Tells every loop of `serving` to drain, waits for them until
/// `deadline`, and aborts (and awaits) the rest.
pub(crate) async fn stop_serving(serving: Vec<Serving>, deadline: Instant) -> Stopped {
    let mut tasks: Vec<JoinHandle<super::serve::ServeReport>> = Vec::new();
    for s in serving {
        let _ = s.stop.send(true);
        tasks.extend(s.tasks);
    }
    let mut stopped = Stopped {
        cancelled: 0,
        handover_confirmed: true,
    };
    for task in &mut tasks {
        match tokio::time::timeout_at(deadline, &mut *task).await {
            Ok(Ok(report)) => stopped.handover_confirmed &= report.handover_confirmed,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "a serve loop failed");
                stopped.cancelled += 1;
            }
            Err(_) => {
                task.abort();
                stopped.cancelled += 1;
            }
        }
    }
    // An aborted task stops at its next await; wait for that, so that
    // nothing of this runtime runs after shutdown returns.
    for task in tasks.iter_mut().filter(|t| !t.is_finished()) {
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    stopped
}

pub(crate) async fn shutdown(
    shared: &std::sync::Arc<Shared>,
    serving: Vec<Serving>,
    draining: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
    deadline: Instant,
) -> Result<()> {
    shared.health.set_draining();
    let mut stopped = stop_serving(serving, deadline).await;
    // The routers and the partitions given up before the shutdown: the
    // same deadline, counted with the rest.
    for mut d in draining {
        if tokio::time::timeout_at(deadline, &mut d).await.is_err() {
            d.abort();
            let _ = d.await;
            stopped.cancelled += 1;
        }
    }
    for b in &background {
        b.abort();
    }
    for b in background {
        let _ = b.await;
    }
    // What the handlers saved to the outbox goes out before the
    // connection closes (Redis would keep it for another replica; the
    // in-memory store would not).
    super::outbox::flush(shared, &shared.relay, deadline).await;
    shared.relay.release(&shared.store, deadline).await;
    // Claims left (handlers cancelled at the deadline) lapse at once.
    let leave = shared
        .store
        .alive(shared.leadership.owner(), shared.config.inbox_lease, false);
    if !matches!(tokio::time::timeout_at(deadline, leave).await, Ok(Ok(()))) {
        tracing::debug!("could not say this replica leaves; its claims lapse with its liveness");
    }
    // The last replies: what is left of the deadline, but at least a
    // moment, and never long when the broker is away. The moment matters
    // when handlers were cancelled at the deadline: their senders'
    // "unavailable" answers were queued just now, and with no time left
    // they were never written out (one sender of 40 in a CI run waited
    // out its 20 s time-out instead of being answered at once).
    let left = deadline
        .saturating_duration_since(Instant::now())
        .clamp(LAST_REPLIES_AT_LEAST, Duration::from_secs(2));
    // A round trip, not only a flush: async-nats' flush writes the buffer
    // out but does not wait for the server, so a sender on another
    // connection could still reach a subscription whose UNSUB the server
    // had not read yet (seen in a full test run:
    // `shutdown::nats::graceful_shutdown` got "no reply" instead of "no
    // handler" right after shutdown returned).
    let transport = shared.client.transport();
    let flushed = transport.is_connected()
        && tokio::time::timeout(left, async {
            transport.flush(left).await.is_ok() && transport.round_trip(left).await.is_ok()
        })
        .await
        .unwrap_or(false);
    if !flushed {
        tracing::warn!("could not flush the last replies to the broker");
    }
    let clean = stopped.cancelled == 0 && stopped.handover_confirmed && flushed;
    tracing::info!(
        clean,
        cancelled = stopped.cancelled,
        handover_confirmed = stopped.handover_confirmed,
        "shutdown complete"
    );
    if stopped.cancelled > 0 {
        return Err(Error::new(
            ErrorKind::Unavailable,
            format!(
                "shutdown deadline passed with {} serve loops still running; they were cancelled",
                stopped.cancelled
            ),
        ));
    }
    Ok(())
}
