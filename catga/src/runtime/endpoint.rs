//! The HTTP endpoint of a replica (`/health`, `/ready`, `/metrics`), wired
//! to its health and gauges.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::Shared;
use crate::error::Result;

/// The running HTTP endpoint: it answers until the shutdown is over, so
/// that `/ready` says "draining" while the replica drains.
pub(crate) struct HttpEndpoint {
    pub addr: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    pub task: JoinHandle<()>,
}

impl HttpEndpoint {
    pub(crate) async fn start(addr: &str, shared: &Arc<Shared>) -> Result<HttpEndpoint> {
        let (live, ready, refresh) = (Arc::clone(shared), Arc::clone(shared), Arc::clone(shared));
        let probes = crate::ops::http::Probes {
            liveness: Arc::new(move || match live.health.fatal() {
                Some(e) => Err(e.to_string()),
                None => Ok(()),
            }),
            readiness: Arc::new(move || {
                let r = ready.health.check(ready.client.transport());
                crate::ops::http::Ready {
                    ready: r.ready,
                    failing: r.failing,
                    warnings: r.warnings,
                    region: ready.config.region.clone(),
                }
            }),
            refresh: Arc::new(move || {
                let shared = Arc::clone(&refresh);
                Box::pin(async move {
                    let transport = shared.client.transport();
                    // Both asked at once: a store away delays a scrape by
                    // one wait, not two.
                    let (outbox, delayed) = tokio::join!(
                        shared.store.outbox_waiting(std::time::Duration::from_millis(500)),
                        for_scrape(shared.store.delayed_count())
                    );
                    crate::ops::metrics::replica(
                        shared.health.check(transport).ready,
                        transport.is_connected(),
                        !shared.health.store_down(),
                        transport.client_dropped(),
                        &outbox,
                        delayed,
                    );
                    let c = &shared.config;
                    crate::ops::metrics::info(&c.service, &c.service_version, c.region.as_deref());
                })
            }),
        };
        let (stop, stop_rx) = watch::channel(false);
        let (addr, task) = crate::ops::http::serve(addr, probes, stop_rx).await?;
        Ok(HttpEndpoint { addr, stop, task })
    }

    /// Stops answering, by `deadline` at the latest.
    pub(crate) async fn stop(self, deadline: tokio::time::Instant) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            task.abort();
            let _ = task.await;
        }
    }
}

/// A figure the store gives for a scrape, or none when it does not answer
/// within 500 ms.
async fn for_scrape<T>(f: impl std::future::Future<Output = crate::error::Result<T>>) -> Option<T> {
    tokio::time::timeout(std::time::Duration::from_millis(500), f)
        .await
        .ok()
        .and_then(Result::ok)
}
