//! [`RuntimeBuilder`]: the settings of [`Config`] in code, the handler
//! selection, and start-up.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::handlers::{log_table, spawn_handler};
use super::watch::{check_broker, keep_alive, keep_answering_doubts, watch_refusals, watch_store};
use super::{Runtime, Shared, ready::Health};
use crate::client::Client;
use crate::config::{Config, redact_url};
use crate::error::{ErrorKind, Result};
use crate::registry::{self, HandlerSpec};
use crate::store::{MemoryStore, RedisConnect, RedisStore, Store};
use crate::transport::Transport;
use crate::transport::memory::MemoryBus;
use crate::transport::nats::{NatsConnect, NatsTransport};

type Filter = Box<dyn Fn(&HandlerSpec) -> bool + Send + Sync>;

/// Builds a [`Runtime`] in code: the same settings as the environment
/// variables of [`Config`], for tests and embedding.
pub struct RuntimeBuilder {
    config: Config,
    bus: Option<MemoryBus>,
    filter: Option<Filter>,
    /// Whether the transport's tap is on from the start (a test kit on
    /// real servers).
    tapped: bool,
}

impl std::fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("config", &self.config)
            .field("memory", &self.bus.is_some())
            .field("filtered", &self.filter.is_some())
            .finish()
    }
}

impl RuntimeBuilder {
    pub(super) fn new() -> RuntimeBuilder {
        RuntimeBuilder {
            config: Config::default(),
            bus: None,
            filter: None,
            tapped: false,
        }
    }

    /// Replaces every setting with `config`.
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Serves over NATS at `url` (several servers comma separated).
    pub fn nats_url(mut self, url: impl Into<String>) -> Self {
        self.config.nats_url = Some(url.into());
        self
    }

    /// Keeps state, outbox and inbox in Redis at `url` (`redis://` or
    /// `rediss://`).
    pub fn redis_url(mut self, url: impl Into<String>) -> Self {
        self.config.redis_url = Some(url.into());
        self
    }

    /// Uses Redis Cluster, `nodes` being seed nodes (as
    /// `CATGA_REDIS_MODE=cluster` with `REDIS_URL`).
    pub fn redis_cluster<S: AsRef<str>>(mut self, nodes: &[S]) -> Self {
        let urls: Vec<&str> = nodes.iter().map(AsRef::as_ref).collect();
        self.config.redis_url = Some(urls.join(","));
        self.config.redis_mode = crate::config::RedisMode::Cluster;
        self
    }

    /// Splits the service's store keys into `n` shards (as
    /// `CATGA_STORE_SHARDS`).
    pub fn store_shards(mut self, n: u32) -> Self {
        self.config.store_shards = n;
        self
    }

    /// Uses the master that Redis Sentinel names `master`, asking
    /// `sentinels` (as `CATGA_REDIS_MODE=sentinel` with `REDIS_URL` and
    /// `CATGA_REDIS_SENTINEL_MASTER`).
    pub fn redis_sentinel<S: AsRef<str>>(mut self, sentinels: &[S], master: impl Into<String>) -> Self {
        let urls: Vec<&str> = sentinels.iter().map(AsRef::as_ref).collect();
        self.config.redis_url = Some(urls.join(","));
        self.config.redis_mode = crate::config::RedisMode::Sentinel;
        self.config.redis_sentinel_master = master.into();
        self
    }

    /// Sets the leader lease (`CATGA_LEADER_LEASE_MS`): how long a leader
    /// that stopped renewing keeps it; renewed every third of it.
    pub fn leader_lease(mut self, lease: Duration) -> Self {
        self.config.leader_lease = lease;
        self
    }

    /// Sets how often a replica with keyed sagas heartbeats and rebalances
    /// (`CATGA_MEMBER_HEARTBEAT_MS`) and when a silent one leaves the ring
    /// and its partition leases run out (`CATGA_MEMBER_TIMEOUT_MS`).
    pub fn membership(mut self, heartbeat: Duration, timeout: Duration) -> Self {
        self.config.member_heartbeat = heartbeat;
        self.config.member_timeout = timeout;
        self
    }

    /// Sets how long an idempotent message's answer is kept, and how long a
    /// replica's claims on the messages it handles outlive its last sign
    /// of life (`CATGA_INBOX_LEASE_MS`).
    pub fn inbox(mut self, window: Duration, lease: Duration) -> Self {
        self.config.inbox_window = window;
        self.config.inbox_lease = lease;
        self
    }

    /// Sets the ack wait of durable consumers and the default number of
    /// deliveries before a dead letter.
    pub fn durable_defaults(mut self, ack_wait: Duration, max_deliver: u32) -> Self {
        self.config.ack_wait = ack_wait;
        self.config.max_deliver = max_deliver;
        self
    }

    /// Sets the circuit breakers: failures in a row that open one (0: none),
    /// and how long it stays open.
    pub fn breaker(mut self, failures: u32, open_for: Duration) -> Self {
        self.config.breaker_failures = failures;
        self.config.breaker_open = open_for;
        self
    }

    /// Sets the first back-off of retries and redeliveries.
    pub fn retry_base(mut self, base: Duration) -> Self {
        self.config.retry_base = base;
        self
    }

    /// Sets how catga creates JetStream streams.
    pub fn streams(mut self, settings: crate::config::StreamSettings) -> Self {
        self.config.streams = settings;
        self
    }

    /// Sets the outbox relay's lease (`CATGA_OUTBOX_LEASE_MS`): when the
    /// replica relaying dies, another takes over within it.
    pub fn outbox_lease(mut self, lease: Duration) -> Self {
        self.config.outbox_lease = lease;
        self
    }

    /// Sets how to log in to NATS and secure the connection (the
    /// `NATS_CREDS`, `NATS_NKEY` and `NATS_TLS_*` settings).
    pub fn nats_security(mut self, security: crate::config::NatsSecurity) -> Self {
        self.config.nats_security = security;
        self
    }

    /// Whether start-up refuses (`true`, the default) or only logs that
    /// another service already serves one of its command subjects
    /// (`CATGA_SUBJECT_CONFLICT`).
    pub fn refuse_subject_conflicts(mut self, refuse: bool) -> Self {
        self.config.refuse_subject_conflicts = refuse;
        self
    }

    /// Sets the version reported in NATS micro discovery
    /// (`CATGA_SERVICE_VERSION`).
    pub fn service_version(mut self, version: impl Into<String>) -> Self {
        self.config.service_version = version.into();
        self
    }

    /// Names the region this replica runs in (`CATGA_REGION`): NATS micro
    /// discovery, `/ready` and the start-up log say it.
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.config.region = Some(region.into());
        self
    }

    /// Serves `/health`, `/ready` and `/metrics` on `addr` (port 0: a free
    /// one, see [`Runtime::http_addr`](super::Runtime::http_addr)).
    pub fn http_addr(mut self, addr: impl Into<String>) -> Self {
        self.config.http_addr = Some(addr.into());
        self
    }

    /// Sets the TLS files for a `rediss://` store (the `REDIS_TLS_*`
    /// settings).
    pub fn redis_tls(mut self, tls: crate::config::RedisTls) -> Self {
        self.config.redis_tls = tls;
        self
    }

    /// Serves on the given in-memory bus (share it between runtimes and
    /// clients of one process). Takes precedence over a NATS URL.
    pub fn memory(mut self, bus: MemoryBus) -> Self {
        self.bus = Some(bus);
        self
    }

    /// Serves on `bus` with the bus's store, whatever the builder says
    /// about NATS and Redis (the test kit: a kit's store must not be
    /// shared with other kits of the same service through Redis).
    pub(crate) fn embedded(mut self, bus: MemoryBus) -> Self {
        self.config.redis_url = None;
        self.bus = Some(bus);
        self
    }

    /// Records what the runtime sends and counts its deliveries from the
    /// start (a test kit on real servers: `TestKit::on_servers`).
    pub(crate) fn tapped(mut self) -> Self {
        self.tapped = true;
        self
    }

    /// Whether the runtime would run on NATS (a URL is set and no bus
    /// given).
    pub(crate) fn on_nats(&self) -> bool {
        self.bus.is_none() && self.config.nats_url.is_some()
    }

    /// Sets the service name.
    pub fn service(mut self, name: impl Into<String>) -> Self {
        self.config.service = name.into();
        self
    }

    /// Sets the replica id.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.config.instance_id = id.into();
        self
    }

    /// Sets the default reply time-out of `send` (and time-out of `publish`).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// Sets the one deadline of a graceful shutdown.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// Sets the default in-flight limit per subscription.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    /// Sets the default number of subscriptions (and tasks) per handler.
    pub fn parallel(mut self, n: usize) -> Self {
        self.config.parallel = n;
        self
    }

    /// Sets how many messages each subscription queues beyond its in-flight
    /// limit before it drops (and counts) further ones; see
    /// [`Runtime::dropped_messages`].
    pub fn subscription_capacity(mut self, n: usize) -> Self {
        self.config.subscription_capacity = n;
        self
    }

    /// Sets how many bytes (payloads and headers) each subscription queues
    /// beyond its in-flight limit before it drops (and counts) further
    /// messages.
    pub fn subscription_bytes(mut self, n: usize) -> Self {
        self.config.subscription_bytes = n;
        self
    }

    /// Starts without handlers: a process that only sends and publishes.
    pub fn client_only(mut self) -> Self {
        self.config.client_only = true;
        self
    }

    /// Serves only the handlers for which `keep` returns true (several
    /// runtimes in one process, or a binary that splits its handlers over
    /// deployments). A selection of none is an error unless the runtime is
    /// a pure client.
    pub fn handlers(mut self, keep: impl Fn(&HandlerSpec) -> bool + Send + Sync + 'static) -> Self {
        self.filter = Some(Box::new(keep));
        self
    }

    /// Checks the handler table, connects and subscribes.
    ///
    /// Over NATS, returns as soon as the subscriptions are requested: a
    /// broker that is down is retried in the background, and
    /// [`Runtime::ready`] tells when the server confirmed every
    /// subscription. On the embedded transport, returns once the runtime
    /// serves (its durable consumers bound, its leader handlers and keyed
    /// sagas' partitions started), so that what is sent next is handled.
    pub async fn start(self) -> Result<Runtime> {
        // Boxed: setting up awaits a long chain of broker and store calls,
        // and inline its future weighs on the caller's stack (a debug
        // build's test thread, 2 MiB, overflowed in
        // `cli::the_cli_shows_and_operates_a_running_service` once the
        // stream set-up asked for atomic batches).
        Box::pin(self.start_here()).await
    }

    /// [`start`](Self::start)'s work.
    async fn start_here(self) -> Result<Runtime> {
        let RuntimeBuilder {
            config,
            bus,
            filter,
            tapped,
        } = self;
        // The same checks as for the environment, naming the variable.
        config.validate()?;
        // Before any handler registers its metrics: a handle registered
        // without the recorder stays a no-op.
        if config.http_addr.is_some() {
            crate::ops::metrics::install();
        }
        let selected = select(&config, filter.as_ref())?;
        let (transport, mode, bus_store) = connect_transport(&config, bus).await?;
        if tapped {
            transport.tap().turn_on();
        }
        let store = connect_store(&config, bus_store)?;
        // A store written with another shard count is refused here when it
        // answers now; one that does not answer yet is checked before its
        // first write, and readiness says why it is refused.
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), store.check_layout()).await
            && e.kind() == ErrorKind::Config
        {
            return Err(e);
        }
        tracing::info!(
            service = %config.service,
            instance = %config.instance_id,
            nats_url = %config.nats_url.as_deref().map(redact_url).unwrap_or_default(),
            store = store.name(),
            redis_url = %config.redis_url.as_deref().map(redact_url).unwrap_or_default(),
            "running on {mode}"
        );
        log_table(&selected, &config);
        let (shared, orphan_queue) = shared(config, transport.clone(), store, &selected);
        super::discovery::check_conflicts(&shared, &selected).await?;
        // Listen for the broker's refusals before the first SUB goes out:
        // a connected client gets the refusal back within a millisecond.
        let refusals = shared.client.transport().server_errors();
        let mut serving = HashMap::with_capacity(selected.len());
        // `leader` handlers start when this replica wins the lease.
        // Keyed sagas are served through their router and partitions (see
        // `keyed`).
        for spec in selected
            .iter()
            .filter(|s| !s.is_leader() && s.partitions().is_none())
        {
            serving.insert(spec.name(), spawn_handler(spec, &shared).await?);
        }
        let serving = Arc::new(tokio::sync::Mutex::new(serving));
        let leaders: Vec<&'static HandlerSpec> = selected.iter().copied().filter(|s| s.is_leader()).collect();
        let leader = (!leaders.is_empty()).then(|| {
            tokio::spawn(super::leader::run(
                Arc::clone(&shared),
                Arc::clone(&serving),
                leaders,
            ))
        });
        let keyed_specs: Vec<&'static HandlerSpec> = selected
            .iter()
            .copied()
            .filter(|s| s.partitions().is_some())
            .collect();
        let keyed = super::keyed::Keyed::start(&shared, keyed_specs);
        let subjects = registry::handlers()
            .iter()
            .map(|s| s.subject().to_owned())
            .collect();
        let background = vec![
            tokio::spawn(
                shared
                    .health
                    .clone()
                    .confirm_loop(transport, shared.config.instance_id.clone()),
            ),
            tokio::spawn(watch_refusals(Arc::clone(&shared), refusals, subjects)),
            tokio::spawn(watch_store(Arc::clone(&shared))),
            tokio::spawn(check_broker(Arc::clone(&shared))),
            tokio::spawn(
                Arc::clone(&shared.relay).keep(shared.store.clone(), shared.config.member_heartbeat),
            ),
            tokio::spawn(keep_alive(Arc::clone(&shared))),
            tokio::spawn(keep_answering_doubts(Arc::clone(&shared))),
            tokio::spawn(crate::store::clean_orphans(shared.store.clone(), orphan_queue)),
            tokio::spawn(super::outbox::run(Arc::clone(&shared), Arc::clone(&shared.relay))),
            tokio::spawn(super::discovery::serve(Arc::clone(&shared))),
        ];
        // Every replica schedules every job it serves (see `jobs`).
        let schedulers = selected
            .iter()
            .copied()
            .filter(|s| s.job().is_some())
            .map(|spec| tokio::spawn(super::jobs::schedule(Arc::clone(&shared), spec)))
            .collect();
        let http = match shared.config.http_addr.clone() {
            Some(addr) => Some(super::endpoint::HttpEndpoint::start(&addr, &shared).await?),
            None => None,
        };
        let runtime = Runtime {
            shared,
            handlers: selected,
            serving,
            background,
            schedulers,
            leader,
            keyed,
            http,
        };
        // On the embedded transport nothing is away: return once the
        // runtime serves, so that what is sent right after `start()`
        // finds every subscription, durable consumers and their streams
        // included (a test that sent a command at once, whose handler
        // published to a saga, failed 6 runs in 6 before: the saga's
        // stream did not exist yet). Over NATS the broker may be down at
        // start-up: `Runtime::ready` tells when it serves.
        if !runtime.shared.client.transport().is_nats() {
            let serves = async {
                runtime.ready().await?;
                // The leader handlers and keyed sagas' partitions start in
                // their loops: the first round of each.
                if runtime.leader.is_some() {
                    while !runtime.shared.leadership.asked() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                runtime.keyed.first_round().await;
                // Their loops bind their durable consumers themselves, and
                // readiness gives those a grace: wait for them here. (On the
                // embedded bus they were bound by now in every run measured;
                // without the wait for the lease above, a job published
                // right after `start()` was lost 3 runs in 3:
                // `first_test::a_durable_event_published_right_after_start_reaches_the_leader`.)
                while runtime.shared.health.elective_waiting() > 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                runtime.ready().await
            };
            match tokio::time::timeout(EMBEDDED_READY, serves).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => tracing::warn!(
                    readiness = ?runtime.readiness(),
                    "the embedded runtime is not ready {EMBEDDED_READY:?} after start; serving anyway"
                ),
            }
        }
        Ok(runtime)
    }
}

/// How long `start()` waits for an embedded runtime to serve.
const EMBEDDED_READY: Duration = Duration::from_secs(5);

/// The handlers this replica serves: the registry, through the builder's
/// filter; none for a client-only process.
fn select(config: &Config, filter: Option<&Filter>) -> Result<Vec<&'static HandlerSpec>> {
    let selected: Vec<&'static HandlerSpec> = if config.client_only {
        Vec::new()
    } else {
        registry::handlers()
            .iter()
            .filter(|s| filter.is_none_or(|f| f(s)))
            .collect()
    };
    registry::check(&selected, config.client_only)?;
    Ok(selected)
}

/// The embedded bus's store, and the stall switch of the bus handle the
/// runtime was given (the fault simulator's).
type BusStore = (Arc<MemoryStore>, Option<Arc<crate::stall::Gate>>);

/// The transport (a given bus, NATS, or a new embedded bus), what to call
/// it in the log, and the embedded bus's store when there is one.
async fn connect_transport(
    config: &Config,
    bus: Option<MemoryBus>,
) -> Result<(Transport, &'static str, Option<BusStore>)> {
    Ok(match (bus, &config.nats_url) {
        (Some(bus), _) => {
            let store = (Arc::clone(bus.store()), bus.gate().cloned());
            (bus.into(), "a shared in-memory bus", Some(store))
        }
        (None, Some(url)) => {
            let nats = NatsTransport::connect(&NatsConnect {
                url: url.clone(),
                name: format!("{}/{}", config.service, config.instance_id),
                security: config.nats_security.clone(),
                js_domain: config.streams.domain.clone(),
                region: config.region.clone(),
            })
            .await?;
            (nats.into(), "NATS", None)
        }
        (None, None) => {
            let bus = MemoryBus::new();
            let store = (Arc::clone(bus.store()), None);
            (
                bus.into(),
                "the embedded in-memory transport, one process (NATS_URL is not set)",
                Some(store),
            )
        }
    })
}

/// The store: Redis when configured, else the embedded bus's, else one of
/// this process only.
fn connect_store(config: &Config, bus_store: Option<BusStore>) -> Result<Store> {
    Ok(match (RedisConnect::from_config(config), bus_store) {
        (Some(redis), _) => RedisStore::connect(&redis, &config.service, config.store_shards)?.into(),
        (None, Some((bus_store, gate))) => Store::memory_gated(bus_store, config.store_shards, gate),
        (None, None) => {
            tracing::warn!(
                "REDIS_URL is not set: state, outbox and inbox are kept in this process only; \
                 replicas do not share them"
            );
            Store::memory(Arc::new(MemoryStore::new()), config.store_shards)
        }
    })
}

/// What every task of the runtime shares, and the queue of claims whose
/// futures were dropped (for their cleaner).
fn shared(
    config: Config,
    transport: Transport,
    store: Store,
    selected: &[&'static HandlerSpec],
) -> (Arc<Shared>, crate::store::OrphanQueue) {
    // The outbox relay sends each stream's events as atomic batches
    // (others may write the same stream: the relays of other shards, a
    // durable publish of the same event; see `Transport::store_in_order`).
    transport.want_batches(true);
    let client = Client::from_transport(
        transport,
        config.service.clone(),
        config.instance_id.clone(),
        config.request_timeout,
        crate::client::StoreAccess::Ready(store.clone()),
    );
    let durable_subjects = selected
        .iter()
        .filter(|s| s.durable().is_some())
        .map(|s| s.subject())
        .collect();
    let durable_subjects = Arc::new(durable_subjects);
    let leadership = super::leader::Leadership::new(&config.instance_id);
    let (orphans, orphan_queue) = crate::store::Orphans::new();
    let plain_work = Arc::new(crate::store::Work {
        store: store.clone(),
        orphans,
        staged: None,
        durable_subjects: Arc::clone(&durable_subjects),
        sent: Default::default(),
        sent_unrepeatable: Default::default(),
        fence: None,
        held: None,
        member: leadership.owner().into(),
        alive_for: config.inbox_lease,
        last_delivery: false,
        saga_timeout: None,
        home: None,
        events_home: None,
    });
    let relay = Arc::new(super::outbox::RelayLeases::new(
        store.outbox_shards(),
        leadership.owner(),
        config.outbox_lease,
        config.member_timeout,
    ));
    let shared = Arc::new(Shared {
        client,
        config,
        health: Health::new(),
        store,
        plain_work,
        durable_subjects,
        endpoints: std::sync::Mutex::new(HashMap::new()),
        keyed_view: std::sync::Mutex::new(Vec::new()),
        leadership,
        relay,
        dropped: AtomicU64::new(0),
        expired: AtomicU64::new(0),
        handlers: selected.to_vec(),
        asyncapi: std::sync::OnceLock::new(),
        tasks: super::shared::Tasks::default(),
    });
    (shared, orphan_queue)
}
