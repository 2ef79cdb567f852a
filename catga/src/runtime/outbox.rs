//! The outbox relay: publishes the events that handlers saved with their
//! state, in order, marks them sent, and takes over entries a crashed
//! relay left behind. Every replica runs one; the store hands each entry
//! to one relay at a time.

use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use tokio::time::Instant;

use super::Shared;
use crate::error::{ErrorKind, Result};
use crate::store::OutboxEntry;

struct Relay {
    shared: Arc<Shared>,
    name: String,
}

/// Runs the relay until the runtime stops it.
pub(crate) async fn run(shared: Arc<Shared>) {
    let name = shared.config.instance_id.clone();
    let mut relay = Relay { shared, name };
    let mut failures: u32 = 0;
    loop {
        match relay.round(Duration::from_secs(1)).await {
            Ok(_) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(20) {
                    tracing::warn!(error = %e, failures, "the outbox relay cannot publish; it keeps trying");
                }
                let pause = crate::resilience::backoff(Duration::from_millis(100), failures.min(6));
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Publishes what is in the outbox until it is empty or `deadline` passes
/// (shutdown: the embedded store's outbox dies with the process).
pub(crate) async fn flush(shared: Arc<Shared>, deadline: Instant) {
    let mut relay = Relay {
        name: shared.config.instance_id.clone(),
        shared,
    };
    while Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, relay.round(Duration::ZERO)).await {
            Ok(Ok(0)) | Err(_) => return,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the outbox could not be flushed; its entries wait in the store");
                return;
            }
        }
    }
}

impl Relay {
    /// Takes a batch (waiting up to `block` for one) and publishes it in
    /// order; returns how many went out.
    async fn round(&mut self, block: Duration) -> Result<usize> {
        let store = self.shared.store.clone();
        // Entries a relay took and never marked sent are taken over after
        // `outbox_stale`: long enough for a slow publish, short enough for a
        // crash to cost little.
        let stale = self.shared.config.outbox_stale;
        let batch = store.outbox_take(&self.name, 100, block, stale).await?;
        let mut sent = Vec::with_capacity(batch.len());
        let mut failure = None;
        for (id, entry) in batch {
            match self.publish(&entry).await {
                Ok(()) => sent.push(id),
                // Keep the order: the rest waits for the next round (and,
                // if this relay dies, for another one after STALE).
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let n = sent.len();
        store.outbox_done(&sent).await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }

    /// Publishes one entry: to its stream, acknowledged, if it has one
    /// (JetStream drops a second copy of the same message id, so an entry
    /// published twice after a crash is delivered once); on core NATS
    /// otherwise.
    async fn publish(&mut self, entry: &OutboxEntry) -> Result<()> {
        let mut headers = HeaderMap::new();
        for (k, v) in &entry.headers {
            headers.append(k.as_str(), v.as_str());
        }
        let payload = Bytes::copy_from_slice(&entry.payload);
        let transport = self.shared.client.transport();
        let timeout = self.shared.config.request_timeout;
        // The transport knows (and remembers a while) whether a stream
        // stores the subject; without one the event goes on core NATS.
        match transport
            .publish_durable(&entry.subject, headers.clone(), payload.clone(), timeout)
            .await
        {
            Err(e) if e.kind() == ErrorKind::NoHandler => {}
            other => return other,
        }
        transport
            .publish(&Subject::from(entry.subject.as_str()), headers, payload, timeout)
            .await
    }
}
