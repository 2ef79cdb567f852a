//! A running replica: [`Runtime`], what a service's `main` holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::endpoint::HttpEndpoint;
use super::handlers::{start_serving, stop_serving_one};
use super::served::Serving;
use super::{Readiness, RuntimeBuilder, Shared, keyed, lease, shutdown};
use crate::client::Client;
use crate::error::{Error, ErrorKind, Result};
use crate::registry::HandlerSpec;

/// A running replica. Dropping it without [`shutdown`](Self::shutdown)
/// aborts its handlers.
pub struct Runtime {
    pub(crate) shared: Arc<Shared>,
    pub(crate) handlers: Vec<&'static HandlerSpec>,
    /// One lock for starting and stopping handlers, held across the
    /// subscribing and the draining, so that they never interleave.
    pub(crate) serving: Arc<tokio::sync::Mutex<HashMap<&'static str, Serving>>>,
    pub(crate) background: Vec<JoinHandle<()>>,
    /// The recurring jobs' schedulers: stopped first at shutdown, so that
    /// no occurrence is stored while the replicas drain (it would run
    /// whenever the service next starts).
    pub(crate) schedulers: Vec<JoinHandle<()>>,
    /// The leadership loop, when some handler is `leader`.
    pub(crate) leader: Option<JoinHandle<()>>,
    /// The keyed sagas served: their ownership loop and partitions.
    pub(crate) keyed: keyed::Keyed,
    pub(crate) http: Option<HttpEndpoint>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("client", &self.shared.client)
            .field("handlers", &self.handlers.len())
            .field("ready", &self.is_ready())
            .finish()
    }
}

impl Runtime {
    /// A builder with the defaults of [`Config`](crate::Config) (not the
    /// environment).
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::new()
    }

    /// A client on this runtime's transport, carrying its service and
    /// instance id.
    pub fn client(&self) -> Client {
        self.shared.client.clone()
    }

    /// The AsyncAPI 3 document of the handlers this runtime serves (and
    /// of every message type linked into the binary): see
    /// [`schema`](crate::schema). Every replica also answers
    /// `$SRV.SCHEMA.<service>` on NATS with it.
    pub fn asyncapi(&self) -> serde_json::Value {
        self.shared.asyncapi()
    }

    /// The handlers this runtime was started with.
    pub fn handlers(&self) -> &[&'static HandlerSpec] {
        &self.handlers
    }

    /// True while the broker connection is up, every wanted subscription
    /// is live and confirmed by the broker (those served under a lease,
    /// the leader handlers' and keyed-saga partitions', count once they
    /// stay down for over 5 s), every keyed saga is served as its ring
    /// says (after the time a hand-over may take), and the runtime is
    /// neither draining nor stopped by a fatal error.
    pub fn is_ready(&self) -> bool {
        self.readiness().ready
    }

    /// Readiness with the reasons, for a readiness probe's body.
    pub fn readiness(&self) -> Readiness {
        self.shared.health.check(self.shared.client.transport())
    }

    /// The error that stopped the runtime, if one did.
    pub fn fatal_error(&self) -> Option<Error> {
        self.shared.health.fatal()
    }

    /// Messages dropped because a subscription was full (a slow consumer):
    /// counted exactly, one per message, and logged (at most once a second
    /// per subscription, with the count).
    pub fn dropped_messages(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed) + self.shared.client.transport().client_dropped()
    }

    /// Where the HTTP endpoint listens (`CATGA_HTTP_ADDR`, with the port
    /// chosen if it was 0), if it runs.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().map(|h| h.addr)
    }

    /// Events saved to the outbox and not yet published.
    pub async fn outbox_backlog(&self) -> Result<u64> {
        self.shared.store.outbox_backlog().await
    }

    /// Each store shard's outbox, in shard order (one with one shard or
    /// the embedded store): how many events wait and how long the oldest
    /// has waited, or why that shard did not answer within 2 s. A master
    /// that is away fails only its own shards.
    pub async fn outbox_shards(&self) -> Vec<Result<crate::OutboxShard>> {
        self.shared.store.outbox_waiting(Duration::from_secs(2)).await
    }

    /// Requests not started because their sender had stopped waiting.
    pub fn expired_requests(&self) -> u64 {
        self.shared.expired.load(Ordering::Relaxed)
    }

    /// Waits until the runtime is ready (see [`is_ready`](Self::is_ready));
    /// fails with the fatal error if one stops it first.
    pub async fn ready(&self) -> Result<()> {
        self.shared
            .health
            .wait_ready(self.shared.client.transport())
            .await
    }

    /// Starts serving a handler of this binary that is not being served
    /// (one this runtime was started with and later stopped, or any other
    /// registered one): e.g. on gaining leadership or a shard. For a keyed
    /// saga this replica joins the saga's ring and serves the partitions
    /// the ring gives it from its next heartbeat on.
    pub async fn start_handler(&self, name: &str) -> Result<()> {
        let spec = crate::registry::handlers()
            .iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| Error::new(ErrorKind::Config, format!("no handler named `{name}`")))?;
        if spec.partitions().is_none() {
            return start_serving(spec, &self.shared, &self.serving).await;
        }
        // A keyed saga: this replica joins its ring, and serves the
        // partitions the ring gives it from its next heartbeat on.
        let serving = self.serving.lock().await;
        if self.keyed.wanted().iter().any(|s| s.name() == name) {
            return Ok(());
        }
        if self.shared.health.fatal().is_some() || self.shared.health.is_draining() {
            return Err(Error::new(ErrorKind::Unavailable, "the runtime is stopping"));
        }
        let mut all: Vec<&'static HandlerSpec> = serving.values().map(|s| s.served.spec).collect();
        all.extend(self.keyed.wanted());
        all.push(spec);
        crate::registry::check(&all, true)?;
        self.keyed.join(&self.shared, spec);
        Ok(())
    }

    /// Stops serving a handler: its subscriptions drain and its messages in
    /// flight finish (bounded by the drain time-out). The rest of the
    /// runtime goes on. For a keyed saga its partitions drain, then this
    /// replica leaves the saga's ring and gives its leases up, so that the
    /// other replicas take the partitions over at once.
    pub async fn stop_handler(&self, name: &str) -> Result<()> {
        if !self.keyed.wanted().iter().any(|s| s.name() == name) {
            return stop_serving_one(name, &self.shared, &self.serving).await;
        }
        // A keyed saga: its partitions drain, then this replica leaves its
        // ring and gives its leases up, so that the others take over at
        // once. That takes up to a heartbeat to notice, the drain (and up
        // to 1 s more for a cancelled loop to stop), and a heartbeat to
        // give the leases up, each round up to a store time-out long.
        let c = &self.shared.config;
        self.keyed
            .part(
                name,
                c.drain_timeout + 3 * c.member_heartbeat + Duration::from_secs(1) + 3 * c.request_timeout,
            )
            .await
    }

    /// The service's sagas, newest first, at most `limit`, with their
    /// steps, as their journals in the store tell them.
    pub async fn sagas(&self, limit: usize) -> Result<Vec<crate::SagaInfo>> {
        let mut out = Vec::new();
        for id in self.shared.store.saga_list(limit).await? {
            let journal = self.shared.store.saga_load(&id).await?;
            out.push(crate::SagaInfo::from_journal(id, &journal));
        }
        Ok(out)
    }

    /// Publishes `event` once `delay` has passed; see
    /// [`publish_at`](Self::publish_at).
    pub async fn publish_after<E: crate::Event>(&self, delay: Duration, event: E) -> Result<String> {
        self.shared.client.publish_after(delay, event).await
    }

    /// Publishes `event` at `at`, not before, from outside a handler (in
    /// a handler, [`Context::publish_at`](crate::Context::publish_at)
    /// commits it with the handler's work). It waits in the service's
    /// store until the outbox relay stores it in its subject's stream;
    /// returns its message id, for [`cancel_delayed`](Self::cancel_delayed).
    pub async fn publish_at<E: crate::Event>(&self, at: std::time::SystemTime, event: E) -> Result<String> {
        self.shared.client.publish_at(at, event).await
    }

    /// Cancels a delayed message that has not come due: `true` if it was
    /// still waiting (it will not be published), `false` if no delayed
    /// message has that id any more (published already, or cancelled).
    pub async fn cancel_delayed(&self, id: &str) -> Result<bool> {
        self.shared.store.delayed_cancel(id).await
    }

    /// The delayed messages waiting, soonest first, at most `limit`.
    pub async fn delayed(&self, limit: usize) -> Result<Vec<super::DelayedInfo>> {
        Ok(self
            .shared
            .store
            .delayed_list(limit)
            .await?
            .into_iter()
            .map(|(id, subject, due)| super::DelayedInfo {
                id,
                subject,
                due: std::time::UNIX_EPOCH + Duration::from_millis(due),
            })
            .collect())
    }

    /// The recurring jobs this replica serves, with their next occurrence
    /// and the last one stored for a replica to run.
    pub async fn jobs(&self) -> Result<Vec<super::JobInfo>> {
        let mut out = Vec::new();
        for spec in &self.handlers {
            if let Some(info) = super::jobs::info(self.shared.client.transport(), spec).await? {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// Runs the job `name` now, outside its schedule, once (see
    /// [jobs](crate::guide::jobs)): an occurrence stored at this moment
    /// and run by one replica like a scheduled one. `name` is the job's
    /// path (`crate::module::fn`) or its function's name. Returns the
    /// occurrence's time, which [`Context::scheduled_at`](crate::Context::scheduled_at)
    /// shows. The scheduled occurrences are not moved.
    pub async fn run_job(&self, name: &str) -> Result<std::time::SystemTime> {
        let spec = super::jobs::find(self.handlers.iter().copied(), name)?;
        let config = &self.shared.config;
        let at = super::jobs::run_now(
            self.shared.client.transport(),
            &config.streams,
            config.request_timeout,
            spec,
        )
        .await?;
        Ok(std::time::UNIX_EPOCH + Duration::from_millis(at))
    }

    /// The service's dead letters, each checked against the record the
    /// replica that wrote it kept in the store (see [`crate::DeadLetters`]).
    pub fn dead_letters(&self) -> crate::DeadLetters {
        crate::DeadLetters::checked(
            self.shared.client.clone(),
            self.shared.config.service.clone(),
            self.shared.store.clone(),
        )
    }

    /// Whether this replica relays an outbox (holds the relay lease of at
    /// least one store shard, and stores those events in their streams).
    pub fn is_outbox_relay(&self) -> bool {
        !self.shared.relay.held().is_empty()
    }

    /// The store shards whose outbox this replica relays now (with one
    /// shard, `[0]` on the replica holding the relay lease): with
    /// `CATGA_STORE_SHARDS` above 1, the shards are spread over the
    /// replicas.
    pub fn relayed_shards(&self) -> Vec<u32> {
        self.shared.relay.held()
    }

    /// Whether this replica holds the service's leader lease (and serves
    /// the `leader` handlers).
    pub fn is_leader(&self) -> bool {
        self.shared.leadership.token().is_some()
    }

    /// The partitions of keyed sagas (`#[saga(key = ...)]`) this replica
    /// serves right now, per saga handler name.
    pub async fn partitions(&self) -> std::collections::BTreeMap<&'static str, Vec<u32>> {
        self.keyed.served().await
    }

    /// The router shares of keyed sagas whose leases this replica holds
    /// right now, per saga handler name: share `k` routes the triggers of
    /// the partitions stored in partition stream `k` (one share per
    /// stream: `CATGA_JS_SAGA_STREAMS`, at most one per partition). A
    /// share other than 0 waits, before it routes, until share 0's router
    /// has set its consumers up.
    pub async fn routing(&self) -> std::collections::BTreeMap<&'static str, Vec<u32>> {
        self.keyed.routing().await
    }

    /// The handlers being served right now, with the keyed sagas this
    /// replica runs (whichever of their partitions it holds).
    pub async fn serving(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.serving.lock().await.keys().copied().collect();
        names.extend(self.keyed.wanted().iter().map(|s| s.name()));
        names.sort_unstable();
        names
    }

    /// Serves until SIGTERM or Ctrl-C, then shuts down gracefully; or until
    /// a fatal error, then shuts down and returns it.
    pub async fn run_until_signal(self) -> Result<()> {
        let fatal = tokio::select! {
            () = shutdown::signal() => {
                tracing::info!("shutdown signal received: draining");
                None
            }
            e = self.shared.health.wait_fatal() => Some(e),
        };
        let drained = self.shutdown().await;
        match fatal {
            Some(e) => Err(e),
            None => drained,
        }
    }

    /// Stops taking work, drains every subscription, finishes the messages
    /// in flight and flushes their replies, all within one deadline (the
    /// drain time-out). At the deadline, whatever still runs is cancelled
    /// (its requests answer "unavailable") and an error is returned.
    ///
    /// Dropping the returned future (a time-out around it, a second
    /// signal) does not cut the shutdown short: it goes on in a task of
    /// its own, within the same deadline, and gives the leases and claims
    /// up. Cut short, the tasks it had taken over went on unowned: the
    /// holders of the leader and partition leases renewed them for as long
    /// as the process lived, and no other replica could lead (found by the
    /// fault simulator: the example's seed 2).
    pub async fn shutdown(self) -> Result<()> {
        // In the caller's span, as its logs were before.
        let shutting = tracing::Instrument::instrument(self.shut_down(), tracing::Span::current());
        match tokio::spawn(shutting).await {
            Ok(outcome) => outcome,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(Error::new(
                ErrorKind::Internal,
                format!("the shutdown stopped before its end: {e}"),
            )),
        }
    }

    /// [`shutdown`](Self::shutdown), in the caller's task.
    async fn shut_down(mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.shared.config.drain_timeout;
        for s in std::mem::take(&mut self.schedulers) {
            s.abort();
            let _ = s.await;
        }
        // No leader handler or partition may start while the rest drains.
        if let Some(leader) = self.leader.take() {
            leader.abort();
            let _ = leader.await;
        }

        let mut serving: Vec<Serving> = self.serving.lock().await.drain().map(|(_, s)| s).collect();
        let (partitions, draining, partition_leases) = self.keyed.stop().await;
        serving.extend(partitions);
        // What drains still runs under its leases: keep them until it is
        // done, so that they do not run out under it.
        let owner = self.shared.leadership.owner().to_owned();
        let holders = [
            (
                self.shared.leadership.lease().into_iter().collect::<Vec<_>>(),
                self.shared.config.leader_lease,
            ),
            (partition_leases, self.shared.config.member_timeout),
        ]
        .map(|(leases, ttl)| {
            tokio::spawn(lease::hold(self.shared.store.clone(), owner.clone(), leases, ttl))
        });
        let background = std::mem::take(&mut self.background);
        let outcome = shutdown::shutdown(&self.shared, serving, draining, background, deadline).await;
        for h in holders {
            h.abort();
            let _ = h.await;
        }
        // Given up within the same deadline: with the store away, the
        // leases run out by themselves.
        if tokio::time::timeout_at(deadline, self.shared.leadership.release(&self.shared))
            .await
            .is_err()
        {
            tracing::warn!("the leader lease could not be given up in time; it runs out by itself");
        }
        if tokio::time::timeout_at(deadline, self.keyed.leave(&self.shared))
            .await
            .is_err()
        {
            tracing::warn!(
                "the saga partitions could not be given up in time; their leases run out by themselves"
            );
        }
        if let Some(http) = self.http.take() {
            http.stop(deadline).await;
        }
        // The spans of the last messages are in the exporter's batch.
        #[cfg(feature = "otlp")]
        let _ = tokio::time::timeout_at(deadline, tokio::task::spawn_blocking(crate::ops::otel::flush)).await;
        outcome
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        for b in self.background.iter().chain(&self.schedulers) {
            b.abort();
        }
        if let Some(http) = &self.http {
            http.task.abort();
        }
        if let Some(leader) = &self.leader {
            leader.abort();
        }
        // The serve loops, and the keyed sagas' ownership loop, routers
        // and drains (see `Tasks`).
        self.shared.tasks.abort_all();
    }
}
