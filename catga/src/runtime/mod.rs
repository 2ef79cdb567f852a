//! Start-up, serving and graceful shutdown: [`run`], [`Runtime`] and
//! [`RuntimeBuilder`].
//!
//! - `builder`: settings, the handler selection and start-up;
//! - `serve`: one loop per subscription (take, bound, queue, resubscribe,
//!   drain);
//! - `pipeline`: the steps of one message;
//! - `ready`: readiness and fatal errors;
//! - `shutdown`: signals and the one-deadline drain.

mod builder;
mod discovery;
mod keyed;
mod leader;
mod lease;
mod outbox;
mod pipeline;
mod ready;
mod serve;
mod shutdown;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use builder::RuntimeBuilder;
pub use ready::Readiness;

use crate::client::Client;
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::registry::{HandlerKind, HandlerSpec};
use crate::transport::{DurableOptions, SubscribeTo};
use ready::Health;
use serve::ServeReport;

/// Runs the service: reads [`Config`] from the environment, serves every
/// registered handler and returns after a graceful drain on SIGTERM or
/// Ctrl-C, or with the error that stopped it (a subscription the broker
/// refused, one that keeps ending), so that the orchestrator restarts the
/// process.
///
/// Without `NATS_URL` it runs on the embedded in-memory transport and says so
/// in its log.
pub async fn run() -> Result<()> {
    start().await?.run_until_signal().await
}

/// What [`run`] does before it waits for a signal: reads the environment,
/// sets up logging (and span export, see [`init_telemetry`]), starts
/// serving, and returns the [`Runtime`] so that `main` can also use its
/// [`client`](Runtime::client).
pub async fn start() -> Result<Runtime> {
    let config = Config::from_env()?;
    init_telemetry(&config.service);
    Runtime::builder().config(config).start().await
}

/// Installs catga's log subscriber (filter from `RUST_LOG`, default
/// `info`) unless the application installed one. With the `otlp` feature
/// and `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) set, it
/// also exports spans to that OpenTelemetry collector over OTLP/HTTP,
/// named after `service` unless `OTEL_SERVICE_NAME` is set. [`run`] and
/// [`start`] call it; call it yourself when you build runtimes with
/// [`Runtime::builder`].
pub fn init_telemetry(service: &str) {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let logs = tracing_subscriber::registry().with(
        tracing_subscriber::fmt::layer().with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout())),
    );
    #[cfg(feature = "otlp")]
    let logs = logs.with(crate::ops::otel::layer(service));
    #[cfg(not(feature = "otlp"))]
    let _ = service;
    let _ = logs.with(filter).try_init();
}

/// What every serve loop of one runtime shares.
pub(crate) struct Shared {
    pub client: Client,
    pub config: Config,
    pub health: Health,
    pub store: crate::store::Store,
    /// Subjects with a durable handler in this process.
    pub durable_subjects: Arc<std::collections::HashSet<&'static str>>,
    /// The handlers being served, for NATS micro discovery.
    pub endpoints: std::sync::Mutex<HashMap<&'static str, Arc<Served>>>,
    /// What handlers that stage nothing work with (shared by all).
    pub plain_work: Arc<crate::store::Work>,
    /// This replica's side of the leader lease.
    pub leadership: leader::Leadership,
    /// This replica's side of the outbox relay's lease.
    pub relay: Arc<lease::Lease>,
    dropped: AtomicU64,
    expired: AtomicU64,
}

impl Shared {
    pub(crate) fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_expired(&self) {
        self.expired.fetch_add(1, Ordering::Relaxed);
    }
}

/// One handler as this runtime serves it.
pub(crate) struct Served {
    pub spec: &'static HandlerSpec,
    pub to: SubscribeTo,
    /// Handler invocations in flight per subscription.
    pub limit: usize,
    /// Messages queued per subscription beyond `limit`.
    pub capacity: usize,
    /// Bytes queued per subscription beyond `limit`.
    pub capacity_bytes: usize,
    /// Subscriptions (and tasks).
    pub parallel: usize,
    /// The durable consumer it pulls from, if any.
    pub durable: Option<(String, DurableOptions)>,
    /// The partition of a keyed saga it serves, if it does.
    pub partition: Option<Arc<keyed::Partition>>,
    /// How often to tell the broker a durable message is still being
    /// handled (a third of its ack wait).
    pub progress: Option<Duration>,
    /// Deliveries of a durable message before it is dead-lettered.
    pub max_deliver: u32,
    pub breaker: crate::resilience::Breaker,
    pub metrics: crate::ops::metrics::HandlerMetrics,
}

impl Served {
    fn new(spec: &'static HandlerSpec, config: &Config) -> Served {
        let parallel = spec.parallel().unwrap_or(config.parallel).max(1);
        let queue_group = match spec.queue_group() {
            Some(g) => Some(g.to_owned()),
            // Several subscriptions of a fan-out event handler would each
            // get every event: they share a queue group of their own, so
            // that this replica still gets every event once.
            None if parallel > 1 => Some(private_group(&config.instance_id, spec)),
            None => None,
        };
        let limit = spec.concurrency().unwrap_or(config.concurrency).max(1);
        let max_ack_pending = (limit * parallel * 4).max(256);
        let ack_wait = config.ack_wait;
        let max_deliver = spec.max_deliver().unwrap_or(config.max_deliver).max(1);
        let durable = spec.durable().map(|name| {
            (
                name.to_owned(),
                DurableOptions {
                    ack_wait,
                    max_ack_pending,
                    batch: limit,
                    stream: None,
                    pull_expires: Duration::from_secs(30),
                },
            )
        });
        // A durable message still being handled is kept by progress acks
        // (its ack wait starts again), so that the broker never hands it
        // to another replica while it runs: a saga running longer than the
        // ack wait was delivered again and ran twice at once.
        let progress = durable.as_ref().map(|_| ack_wait / 3);
        Served {
            spec,
            to: SubscribeTo {
                subject: spec.subject().to_owned(),
                queue_group,
            },
            limit,
            capacity: config.subscription_capacity,
            capacity_bytes: config.subscription_bytes,
            parallel,
            durable,
            partition: None,
            progress,
            max_deliver,
            breaker: crate::resilience::Breaker::new(config.breaker_failures, config.breaker_open),
            metrics: crate::ops::metrics::HandlerMetrics::new(spec),
        }
    }

    /// A partition of keyed saga `spec`: its own durable consumer on the
    /// partition's subject, one message at a time (the key's order).
    fn partition(spec: &'static HandlerSpec, config: &Config, partition: Arc<keyed::Partition>) -> Served {
        let mut served = Served::new(spec, config);
        let base = keyed::partition_base(&config.service, spec);
        served.to = SubscribeTo {
            subject: format!("{base}.{}", partition.index),
            queue_group: None,
        };
        served.limit = 1;
        served.parallel = 1;
        served.durable = Some((
            format!("{}-p{}", keyed::saga_name(spec), partition.index),
            DurableOptions {
                ack_wait: keyed::ack_wait(config),
                max_ack_pending: 1,
                batch: 1,
                stream: Some(partition.stream_subject.clone()),
                pull_expires: keyed::PULL_EXPIRES,
            },
        ));
        served.partition = Some(partition);
        served.progress = Some(keyed::ack_wait(config) / 3);
        served
    }

    /// Subscribes: a core subscription, or the durable consumer (creating
    /// its stream first).
    pub(crate) async fn subscribe(&self, shared: &Shared) -> Result<crate::transport::Subscription> {
        let transport = shared.client.transport();
        match &self.durable {
            None => transport.subscribe(&self.to).await,
            // Its stream was made by the ownership loop.
            Some((name, options)) if self.partition.is_some() => {
                transport.durable_subscribe(&self.to.subject, name, options).await
            }
            Some((name, options)) => {
                transport
                    .ensure_dead_letters(&shared.config.service, &shared.config.streams)
                    .await?;
                transport
                    .ensure_stream(&self.to.subject, &shared.config.streams)
                    .await?;
                transport.durable_subscribe(&self.to.subject, name, options).await
            }
        }
    }
}

/// A queue group that only this replica's subscriptions of `spec` join.
fn private_group(instance: &str, spec: &HandlerSpec) -> String {
    format!(
        "catga.{}.{}",
        subject_token(instance),
        spec.name().replace("::", ".")
    )
}

use crate::transport::subject_token;

/// The running serve loops of one handler.
struct Serving {
    served: Arc<Served>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<ServeReport>>,
}

/// A running replica. Dropping it without [`shutdown`](Self::shutdown)
/// aborts its handlers.
pub struct Runtime {
    shared: Arc<Shared>,
    handlers: Vec<&'static HandlerSpec>,
    /// One lock for starting and stopping handlers, held across the
    /// subscribing and the draining, so that they never interleave.
    serving: Arc<tokio::sync::Mutex<HashMap<&'static str, Serving>>>,
    background: Vec<JoinHandle<()>>,
    /// The leadership loop, when some handler is `leader`.
    leader: Option<JoinHandle<()>>,
    /// The ownership loop of keyed sagas, if any, their partitions served
    /// here, and the keyed sagas.
    keyed: Option<JoinHandle<()>>,
    owned: Arc<tokio::sync::Mutex<keyed::Owned>>,
    keyed_specs: Vec<&'static HandlerSpec>,
    http: Option<HttpEndpoint>,
}

/// The running HTTP endpoint: it answers until the shutdown is over, so
/// that `/ready` says "draining" while the replica drains.
struct HttpEndpoint {
    addr: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl HttpEndpoint {
    async fn start(addr: &str, shared: &Arc<Shared>) -> Result<HttpEndpoint> {
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
                }
            }),
            refresh: Arc::new(move || {
                let shared = Arc::clone(&refresh);
                Box::pin(async move {
                    let transport = shared.client.transport();
                    let backlog = tokio::time::timeout(
                        std::time::Duration::from_millis(500),
                        shared.store.outbox_backlog(),
                    )
                    .await
                    .ok()
                    .and_then(Result::ok);
                    crate::ops::metrics::replica(
                        shared.health.check(transport).ready,
                        transport.is_connected(),
                        !shared.health.store_down(),
                        transport.client_dropped(),
                        backlog,
                    );
                })
            }),
        };
        let (stop, stop_rx) = watch::channel(false);
        let (addr, task) = crate::ops::http::serve(addr, probes, stop_rx).await?;
        Ok(HttpEndpoint { addr, stop, task })
    }

    /// Stops answering, by `deadline` at the latest.
    async fn stop(self, deadline: tokio::time::Instant) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
            task.abort();
            let _ = task.await;
        }
    }
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
    /// A builder with the defaults of [`Config`] (not the environment).
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::new()
    }

    /// A client on this runtime's transport, carrying its service and
    /// instance id.
    pub fn client(&self) -> Client {
        self.shared.client.clone()
    }

    /// The handlers this runtime was started with.
    pub fn handlers(&self) -> &[&'static HandlerSpec] {
        &self.handlers
    }

    /// True while the broker connection is up, every wanted subscription
    /// is live and confirmed by the broker, and the runtime is neither
    /// draining nor stopped by a fatal error.
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
    /// registered one): e.g. on gaining leadership or a shard.
    pub async fn start_handler(&self, name: &str) -> Result<()> {
        let spec = crate::registry::handlers()
            .iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| Error::new(ErrorKind::Config, format!("no handler named `{name}`")))?;
        start_serving(spec, &self.shared, &self.serving).await
    }

    /// Stops serving a handler: its subscriptions drain and its messages in
    /// flight finish (bounded by the drain time-out). The rest of the
    /// runtime goes on.
    pub async fn stop_handler(&self, name: &str) -> Result<()> {
        stop_serving_one(name, &self.shared, &self.serving).await
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

    /// The service's dead letters, each checked against the record the
    /// replica that wrote it kept in the store (see [`crate::DeadLetters`]).
    pub fn dead_letters(&self) -> crate::DeadLetters {
        crate::DeadLetters::checked(
            self.shared.client.clone(),
            self.shared.config.service.clone(),
            self.shared.store.clone(),
        )
    }

    /// Whether this replica holds the outbox relay's lease (and stores the
    /// service's outbox events in their streams).
    pub fn is_outbox_relay(&self) -> bool {
        self.shared.relay.held().is_some()
    }

    /// Whether this replica holds the service's leader lease (and serves
    /// the `leader` handlers).
    pub fn is_leader(&self) -> bool {
        self.shared.leadership.token().is_some()
    }

    /// The partitions of keyed sagas (`#[saga(key = ...)]`) this replica
    /// serves right now, per saga handler name.
    pub async fn partitions(&self) -> std::collections::BTreeMap<&'static str, Vec<u32>> {
        self.owned.lock().await.served()
    }

    /// The handlers being served right now.
    pub async fn serving(&self) -> Vec<&'static str> {
        let mut names: Vec<&'static str> = self.serving.lock().await.keys().copied().collect();
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
    pub async fn shutdown(mut self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.shared.config.drain_timeout;
        // No leader handler or partition may start while the rest drains.
        if let Some(leader) = self.leader.take() {
            leader.abort();
            let _ = leader.await;
        }
        if let Some(keyed) = self.keyed.take() {
            keyed.abort();
            let _ = keyed.await;
        }
        let mut serving: Vec<Serving> = self.serving.lock().await.drain().map(|(_, s)| s).collect();
        let (partitions, draining, partition_leases) = self.owned.lock().await.take_all();
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
        if !self.keyed_specs.is_empty()
            && tokio::time::timeout_at(deadline, keyed::leave(&self.shared, &self.keyed_specs))
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
        for b in &self.background {
            b.abort();
        }
        if let Some(http) = &self.http {
            http.task.abort();
        }
        if let Some(leader) = &self.leader {
            leader.abort();
        }
        if let Some(keyed) = &self.keyed {
            keyed.abort();
        }
        if let Ok(owned) = self.owned.try_lock() {
            owned.abort_all();
        }
        if let Ok(serving) = self.serving.try_lock() {
            for s in serving.values() {
                for t in &s.tasks {
                    t.abort();
                }
            }
        }
    }
}

/// Starts serving `spec` unless it is served already (see
/// [`Runtime::start_handler`]).
async fn start_serving(
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
    if spec.partitions().is_some() {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "`{}` is a keyed saga: its partitions are served by the replicas that own them",
                spec.name()
            ),
        ));
    }
    let mut others: Vec<&'static HandlerSpec> = serving.values().map(|s| s.served.spec).collect();
    others.push(spec);
    crate::registry::check(&others, true)?;
    let started = spawn_handler(spec, shared).await?;
    serving.insert(spec.name(), started);
    Ok(())
}

/// Stops serving handler `name` (see [`Runtime::stop_handler`]).
async fn stop_serving_one(
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
    let wanted = serving.served.parallel;
    let outcome = shutdown::stop_serving(vec![serving], deadline).await;
    shared.health.unwant(wanted);
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
async fn spawn_handler(spec: &'static HandlerSpec, shared: &Arc<Shared>) -> Result<Serving> {
    let served = Arc::new(Served::new(spec, &shared.config));
    shared
        .endpoints
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(spec.name(), Arc::clone(&served));
    spawn_served(served, shared).await
}

/// Serves one partition of keyed saga `spec`.
async fn spawn_partition(
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

async fn spawn_served(served: Arc<Served>, shared: &Arc<Shared>) -> Result<Serving> {
    let mut subs = Vec::with_capacity(served.parallel);
    for _ in 0..served.parallel {
        subs.push(match served.durable {
            None => Some(served.subscribe(shared).await?),
            Some(_) => None,
        });
    }
    let (stop, stop_rx) = watch::channel(false);
    shared.health.want(served.parallel);
    let tasks = subs
        .into_iter()
        .map(|sub| {
            if sub.is_some() {
                shared.health.subscribed();
            }
            tokio::spawn(serve::serve(
                Arc::clone(&served),
                Arc::clone(shared),
                sub,
                stop_rx.clone(),
            ))
        })
        .collect();
    Ok(Serving { served, stop, tasks })
}

fn log_table(selected: &[&'static HandlerSpec], config: &Config) {
    tracing::info!(count = selected.len(), "handler table");
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

/// Makes `letter` ready to store: its own id, cut to fit the broker's
/// limit, and its digest recorded in the store for as long as letters are
/// kept, so that listings can tell it from a letter someone else
/// published (see [`crate::DeadLetters`]). An error means it was not
/// recorded: it is not stored either, and the message stays where it is.
pub(crate) async fn keep_letter(shared: &Shared, letter: &mut crate::transport::DeadLetter) -> Result<()> {
    if letter.letter_id.is_none() {
        letter.letter_id = Some(crate::wire::new_message_id());
    }
    *letter = letter.fit(shared.client.transport().max_payload());
    let keep = shared
        .config
        .streams
        .max_age
        .max(std::time::Duration::from_secs(30 * 24 * 3600));
    let id = letter.letter_id.clone().unwrap_or_default();
    Box::pin(shared.store.record_letter(&id, &letter.digest(), keep)).await
}

/// Says this replica is alive, every third of `CATGA_INBOX_LEASE_MS`:
/// its claims on the messages it handles hold while it does, and lapse
/// within that time once it stops (a crash, a stall), so that a retry
/// runs the message. One write per replica, not one renewal per message:
/// with a claim lease renewed per message, a retry after a SIGKILL waited
/// out the 5 s lease.
async fn keep_alive(shared: Arc<Shared>) {
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

/// Once the broker is connected: warns (in the log and readiness) when
/// it is a nats-server older than 2.11. Older clustered servers
/// acknowledged a repeat of a message they had not stored yet, which the
/// ordered relay and router depend on not happening (they also check the
/// acknowledgement's sequence).
async fn check_broker(shared: Arc<Shared>) {
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

/// Pings the store once a second: readiness requires it to answer, so
/// that Kubernetes stops routing to a replica that cannot reach Redis.
async fn watch_store(shared: Arc<Shared>) {
    let mut was: Option<String> = None;
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
        let now = match tokio::time::timeout(std::time::Duration::from_secs(2), shared.store.ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.message().to_owned()),
            Err(_) => Some("the state store does not answer within 2 s".to_owned()),
        };
        match (&was, &now) {
            (None, Some(why)) => {
                tracing::error!(error = %why, "the state store fails; not ready until it answers")
            }
            (Some(_), None) => tracing::info!("the state store answers again"),
            _ => {}
        }
        shared.health.set_store_down(now.clone());
        was = now;
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// Watches the broker's errors for a refused subscription of this
/// runtime: the broker keeps the connection and never delivers, so without
/// this the replica would look ready and be deaf.
async fn watch_refusals(
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
