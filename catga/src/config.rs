//! Runtime configuration, read from the environment by [`catga::run`](crate::run).
//!
//! [`SETTINGS`] is the one table of variables: [`Config::from_lookup`]
//! reads exactly these names, and the configuration page of the guide (`catga/docs/configuration.md`) is
//! checked against it by a test. Defaults live here and nowhere else.

use std::time::Duration;

use crate::error::{Error, ErrorKind, Result};

/// Default time a `send` waits for a reply.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default in-flight limit per subscription.
pub const DEFAULT_CONCURRENCY: usize = 256;
/// Default number of messages a subscription buffers beyond its in-flight
/// limit before it drops (and counts) further ones.
pub const DEFAULT_CAPACITY: usize = 8192;
/// Default number of bytes a subscription buffers beyond its in-flight
/// limit: 8,192 messages of up to 1 MiB would be 8 GiB per subscription,
/// on every replica for a fan-out event.
pub const DEFAULT_CAPACITY_BYTES: usize = 64 * 1024 * 1024;
/// Default time shutdown waits for in-flight handlers.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of subscriptions (and tasks) per handler.
pub const DEFAULT_PARALLEL: usize = 1;

/// One environment variable: its name, what it means, its default and
/// how it is read. A setting is this one row plus its [`Config`] field:
/// [`Config::from_lookup`] reads the table, the guide's table is made
/// from it, and a test checks that each default written here is the one
/// [`Config::default`] holds.
#[derive(Clone, Copy)]
pub struct Setting {
    /// The variable.
    pub name: &'static str,
    /// What it sets.
    pub meaning: &'static str,
    /// Its value when unset.
    pub default: &'static str,
    /// Reads a (trimmed, non-empty) value into a config, given the
    /// variable's name for errors; `None` for variables read by others
    /// (the log filter, the OpenTelemetry SDK).
    read: Option<Read>,
}

/// How a [`Setting`] is read: `(config, name, value)`.
type Read = fn(&mut Config, &str, &str) -> Result<()>;

impl std::fmt::Debug for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Setting")
            .field("name", &self.name)
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

/// Every variable [`Config::from_env`] reads.
pub const SETTINGS: &[Setting] = &[
    Setting {
        name: "NATS_URL",
        meaning: "NATS server(s), comma separated",
        default: "unset: the embedded in-memory transport",
        read: Some(|c, _, v| set(&mut c.nats_url, Some(v.to_owned()))),
    },
    Setting {
        name: "NATS_CREDS",
        meaning: "path of a NATS `.creds` file (decentralized JWT auth)",
        default: "unset",
        read: Some(|c, _, v| set(&mut c.nats_security.creds_file, Some(v.into()))),
    },
    Setting {
        name: "NATS_NKEY",
        meaning: "an nkey seed (`SU...`), or the path of a file holding one",
        default: "unset",
        read: Some(|c, n, v| set(&mut c.nats_security.nkey_seed, Some(read_seed(n, v)?))),
    },
    Setting {
        name: "NATS_TLS_CA",
        meaning: "PEM file of the CA that signed the NATS server's certificate",
        default: "unset: the system's roots",
        read: Some(|c, _, v| set(&mut c.nats_security.tls_ca, Some(v.into()))),
    },
    Setting {
        name: "NATS_TLS_CERT",
        meaning: "PEM client certificate for mutual TLS (with `NATS_TLS_KEY`)",
        default: "unset",
        read: Some(|c, _, v| set(&mut c.nats_security.tls_cert, Some(v.into()))),
    },
    Setting {
        name: "NATS_TLS_KEY",
        meaning: "PEM private key of `NATS_TLS_CERT`",
        default: "unset",
        read: Some(|c, _, v| set(&mut c.nats_security.tls_key, Some(v.into()))),
    },
    Setting {
        name: "NATS_TLS_FIRST",
        meaning: "`true`: TLS handshake before the server's INFO (servers with `handshake_first`)",
        default: "false",
        read: Some(|c, n, v| set(&mut c.nats_security.tls_first, boolean(n, v)?)),
    },
    Setting {
        name: "REDIS_URL",
        meaning: "Redis for state, outbox and inbox (`redis://`, `rediss://`; `user:password@` for AUTH)",
        default: "unset: the in-memory store, one process",
        read: Some(|c, _, v| set(&mut c.redis_url, Some(v.to_owned()))),
    },
    Setting {
        name: "CATGA_REDIS_MODE",
        meaning: "`server`: `REDIS_URL` is one server; `cluster`: Redis Cluster, `REDIS_URL` lists seed nodes; `sentinel`: `REDIS_URL` lists the sentinels (comma separated), whose credentials are the master's too",
        default: "server",
        read: Some(|c, n, v| {
            set(
                &mut c.redis_mode,
                choice(
                    n,
                    v,
                    &[
                        ("server", RedisMode::Server),
                        ("cluster", RedisMode::Cluster),
                        ("sentinel", RedisMode::Sentinel),
                    ],
                )?,
            )
        }),
    },
    Setting {
        name: "CATGA_STORE_SHARDS",
        meaning: "shards a service's Redis keys are split into, each with its own hash tag, so that Redis Cluster spreads the service over its masters (one per master is a good start; at most 256); the same on every replica and for the store's life: a runtime refuses a store written with another count",
        default: "1 (every key under `catga:{<service>}`, the layout of earlier releases)",
        read: Some(|c, n, v| set(&mut c.store_shards, small(n, v)?)),
    },
    Setting {
        name: "CATGA_REDIS_SENTINEL_MASTER",
        meaning: "the master's name the sentinels monitor (`CATGA_REDIS_MODE=sentinel`)",
        default: "mymaster",
        read: Some(|c, _, v| set(&mut c.redis_sentinel_master, v.to_owned())),
    },
    Setting {
        name: "REDIS_TLS_CA",
        meaning: "PEM file of the CA that signed Redis' certificate (`rediss://`)",
        default: "unset: the system's roots",
        read: Some(|c, _, v| set(&mut c.redis_tls.ca, Some(v.into()))),
    },
    Setting {
        name: "REDIS_TLS_CERT",
        meaning: "PEM client certificate for Redis (with `REDIS_TLS_KEY`)",
        default: "unset",
        read: Some(|c, _, v| set(&mut c.redis_tls.cert, Some(v.into()))),
    },
    Setting {
        name: "REDIS_TLS_KEY",
        meaning: "PEM private key of `REDIS_TLS_CERT`",
        default: "unset",
        read: Some(|c, _, v| set(&mut c.redis_tls.key, Some(v.into()))),
    },
    Setting {
        name: "CATGA_SERVICE",
        meaning: "service name",
        default: "the executable's name",
        read: Some(|c, _, v| set(&mut c.service, v.to_owned())),
    },
    Setting {
        name: "HOSTNAME",
        meaning: "replica id when `CATGA_INSTANCE_ID` is unset (Kubernetes sets it to the pod name)",
        default: "unset",
        read: Some(|c, _, v| set(&mut c.instance_id, v.to_owned())),
    },
    Setting {
        name: "CATGA_INSTANCE_ID",
        meaning: "replica id, unique among the service's replicas",
        default: "`HOSTNAME` (the pod name), else a random id",
        read: Some(|c, _, v| set(&mut c.instance_id, v.to_owned())),
    },
    Setting {
        name: "CATGA_REQUEST_TIMEOUT_MS",
        meaning: "default reply time-out of `send`, and time-out of `publish`",
        default: "5000",
        read: Some(|c, n, v| set(&mut c.request_timeout, millis(n, v)?)),
    },
    Setting {
        name: "CATGA_DRAIN_TIMEOUT_MS",
        meaning: "one deadline for the whole graceful shutdown",
        default: "10000",
        read: Some(|c, n, v| set(&mut c.drain_timeout, millis(n, v)?)),
    },
    Setting {
        name: "CATGA_CONCURRENCY",
        meaning: "default in-flight limit per subscription (`concurrency = N` overrides)",
        default: "256",
        read: Some(|c, n, v| set(&mut c.concurrency, count(n, v)?)),
    },
    Setting {
        name: "CATGA_PARALLEL",
        meaning: "default subscriptions and tasks per handler (`parallel = N` overrides)",
        default: "1",
        read: Some(|c, n, v| set(&mut c.parallel, count(n, v)?)),
    },
    Setting {
        name: "CATGA_SUBSCRIPTION_CAPACITY",
        meaning: "messages a subscription buffers beyond its in-flight limit, then drops and counts",
        default: "8192",
        read: Some(|c, n, v| set(&mut c.subscription_capacity, count(n, v)?)),
    },
    Setting {
        name: "CATGA_SUBSCRIPTION_BYTES",
        meaning: "bytes (payloads and headers) a subscription buffers beyond its in-flight limit, then drops and counts; with `CATGA_SUBSCRIPTION_CAPACITY`, whichever is reached first",
        default: "67108864 (64 MiB)",
        read: Some(|c, n, v| set(&mut c.subscription_bytes, count(n, v)?)),
    },
    Setting {
        name: "CATGA_INBOX_WINDOW_MS",
        meaning: "how long an idempotent message's answer is kept for retries",
        default: "86400000 (a day)",
        read: Some(|c, n, v| set(&mut c.inbox_window, millis(n, v)?)),
    },
    Setting {
        name: "CATGA_INBOX_LEASE_MS",
        meaning: "how long a replica's claims on the messages it handles outlive its last sign of life (one liveness key per replica, renewed every third of this, not one renewal per message): a retry of a message whose replica died runs after at most this",
        default: "1000",
        read: Some(|c, n, v| set(&mut c.inbox_lease, millis(n, v)?)),
    },
    Setting {
        name: "CATGA_LEADER_LEASE_MS",
        meaning: "the leader lease: `#[event(leader)]` handlers run on the one replica holding it, renewed every third of it; a standby takes over within two leases of the leader's death",
        default: "10000",
        read: Some(|c, n, v| set(&mut c.leader_lease, millis(n, v)?)),
    },
    Setting {
        name: "CATGA_MEMBER_HEARTBEAT_MS",
        meaning: "how often a replica with keyed sagas (or relaying the outboxes of store shards) says it is alive, renews its partition leases and rebalances",
        default: "1000",
        read: Some(|c, n, v| set(&mut c.member_heartbeat, millis(n, v)?)),
    },
    Setting {
        name: "CATGA_MEMBER_TIMEOUT_MS",
        meaning: "a replica silent this long leaves the ring of keyed sagas (and of the store shards' relays); also their partition lease, so its partitions move within about this time of its death",
        default: "5000",
        read: Some(|c, n, v| set(&mut c.member_timeout, millis(n, v)?)),
    },
    Setting {
        name: "CATGA_MAX_DELIVER",
        meaning: "default deliveries of a durable event before it is dead-lettered (`max_deliver = N` overrides)",
        default: "5",
        read: Some(|c, n, v| set(&mut c.max_deliver, small(n, v)?)),
    },
    Setting {
        name: "CATGA_ACK_WAIT_MS",
        meaning: "how long JetStream waits for a durable handler before it redelivers",
        default: "30000",
        read: Some(|c, n, v| set(&mut c.ack_wait, millis(n, v)?)),
    },
    Setting {
        name: "CATGA_JS_STORAGE",
        meaning: "`file` or `memory`: where JetStream keeps the event streams catga creates",
        default: "file",
        read: Some(|c, n, v| {
            set(
                &mut c.streams.memory_storage,
                choice(n, v, &[("file", false), ("memory", true)])?,
            )
        }),
    },
    Setting {
        name: "CATGA_JS_REPLICAS",
        meaning: "replicas of each stream (3 on a 3-node cluster)",
        default: "1",
        read: Some(|c, n, v| set(&mut c.streams.replicas, count(n, v)?)),
    },
    Setting {
        name: "CATGA_JS_SAGA_STREAMS",
        meaning: "streams the partitions of each keyed saga spread over (at most one per partition), so that no one stream leader carries them all: 3 on a 3-node cluster; the same on every replica, changed only as the operations guide says (\"Keyed sagas on a NATS cluster\")",
        default: "1",
        read: Some(|c, n, v| set(&mut c.streams.saga_streams, small(n, v)?)),
    },
    Setting {
        name: "CATGA_JS_PLACEMENT",
        meaning: "where the streams catga creates are placed: `cluster=NAME`, `tags=A,B` or both separated by `;` (a stream that exists is not moved; see the operations guide, \"Streams\")",
        default: "unset: the servers choose",
        read: Some(|c, _, v| set(&mut c.streams.placement, Some(StreamPlacement::parse(v)?))),
    },
    Setting {
        name: "CATGA_JS_DOMAIN",
        meaning: "the JetStream domain catga uses (a replica behind a leaf node names the hub's)",
        default: "unset: the server's own",
        read: Some(|c, n, v| set(&mut c.streams.domain, Some(name_token(n, v)?))),
    },
    Setting {
        name: "CATGA_JS_MAX_AGE_MS",
        meaning: "how long a stream keeps events (dead letters: at least 30 days)",
        default: "604800000 (7 days)",
        read: Some(|c, n, v| set(&mut c.streams.max_age, millis(n, v)?)),
    },
    Setting {
        name: "CATGA_JS_DUPLICATE_WINDOW_MS",
        meaning: "how long JetStream remembers message ids to drop duplicates",
        default: "120000",
        read: Some(|c, n, v| set(&mut c.streams.duplicate_window, millis(n, v)?)),
    },
    Setting {
        name: "CATGA_OUTBOX_LEASE_MS",
        meaning: "the outbox relay's lease: one replica at a time stores an outbox's events in their streams (with store shards, each shard's, the shards spread over the replicas); when it dies, another takes over within this time (with store shards, once the relays' ring forgot it too: `CATGA_MEMBER_TIMEOUT_MS`)",
        default: "3000",
        read: Some(|c, n, v| set(&mut c.outbox_lease, millis(n, v)?)),
    },
    Setting {
        name: "CATGA_RETRY_BASE_MS",
        meaning: "first back-off of `retry = N` and of redeliveries, doubling with jitter",
        default: "100",
        read: Some(|c, n, v| set(&mut c.retry_base, millis(n, v)?)),
    },
    Setting {
        name: "CATGA_BREAKER_FAILURES",
        meaning: "failures in a row that open a handler's circuit breaker (0: no breaker)",
        default: "10",
        read: Some(|c, n, v| set(&mut c.breaker_failures, small(n, v)?)),
    },
    Setting {
        name: "CATGA_BREAKER_OPEN_MS",
        meaning: "how long an open breaker refuses work before it lets one message try",
        default: "5000",
        read: Some(|c, n, v| set(&mut c.breaker_open, millis(n, v)?)),
    },
    Setting {
        name: "CATGA_SERVICE_VERSION",
        meaning: "version the replica reports in NATS micro discovery (`$SRV.INFO`)",
        default: "0.0.0",
        read: Some(|c, _, v| set(&mut c.service_version, v.to_owned())),
    },
    Setting {
        name: "CATGA_REGION",
        meaning: "the region this replica runs in: NATS micro discovery, `/ready` and the start-up log name it; its durable consumers prefer the pulls of their stream's own NATS cluster (servers 2.12 and later; see the operations guide, \"Streams\", regions)",
        default: "unset",
        read: Some(|c, n, v| set(&mut c.region, Some(name_token(n, v)?))),
    },
    Setting {
        name: "CATGA_SUBJECT_CONFLICT",
        meaning: "`refuse` or `warn`: what start-up does when another service already serves one of its command subjects (found by NATS micro discovery)",
        default: "refuse",
        read: Some(|c, n, v| {
            set(
                &mut c.refuse_subject_conflicts,
                choice(n, v, &[("refuse", true), ("warn", false)])?,
            )
        }),
    },
    Setting {
        name: "CATGA_HTTP_ADDR",
        meaning: "address of the HTTP endpoint: `/health`, `/ready`, `/metrics` (e.g. `0.0.0.0:8080`)",
        default: "unset: no endpoint",
        read: Some(|c, _, v| set(&mut c.http_addr, Some(v.to_owned()))),
    },
    Setting {
        name: "CATGA_CLIENT_ONLY",
        meaning: "`true`: start with no handlers (a process that only sends)",
        default: "false",
        read: Some(|c, n, v| set(&mut c.client_only, boolean(n, v)?)),
    },
    Setting {
        name: "RUST_LOG",
        meaning: "log filter (`tracing_subscriber` targets syntax); also which spans are exported",
        default: "info",
        read: None,
    },
    Setting {
        name: "OTEL_EXPORTER_OTLP_ENDPOINT",
        meaning: "with the `otlp` feature: the OpenTelemetry collector spans are exported to over OTLP/HTTP (`http://collector:4318`, or `https://` over TLS); `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `_HEADERS`, `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SDK_DISABLED` are read by the OpenTelemetry SDK as usual",
        default: "unset: no export",
        read: None,
    },
    Setting {
        name: "OTEL_EXPORTER_OTLP_CERTIFICATE",
        meaning: "PEM file of the CA that signed an `https://` collector's certificate (also `OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE`)",
        default: "unset: the system's roots",
        read: None,
    },
    Setting {
        name: "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        meaning: "PEM client certificate for a collector that asks for one (with `OTEL_EXPORTER_OTLP_CLIENT_KEY`; also the `_TRACES_` forms)",
        default: "unset",
        read: None,
    },
    Setting {
        name: "OTEL_EXPORTER_OTLP_CLIENT_KEY",
        meaning: "PEM private key of `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE`",
        default: "unset",
        read: None,
    },
    Setting {
        name: "OTEL_EXPORTER_OTLP_TIMEOUT",
        meaning: "time-out of one export request, in milliseconds (also `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`)",
        default: "10000",
        read: None,
    },
    Setting {
        name: "OTEL_SERVICE_NAME",
        meaning: "the service name on exported spans",
        default: "`CATGA_SERVICE`",
        read: None,
    },
];

/// A secret setting: kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// How to authenticate to NATS and secure the connection, beyond what the
/// URL says (`user:password@` or `token@` in a URL is applied too).
#[derive(Debug, Clone, Default)]
pub struct NatsSecurity {
    /// `NATS_CREDS`: a `.creds` file.
    pub creds_file: Option<std::path::PathBuf>,
    /// `NATS_NKEY`: an nkey seed.
    pub nkey_seed: Option<Secret>,
    /// `NATS_TLS_CA`: the CA of the server's certificate.
    pub tls_ca: Option<std::path::PathBuf>,
    /// `NATS_TLS_CERT`: client certificate for mutual TLS.
    pub tls_cert: Option<std::path::PathBuf>,
    /// `NATS_TLS_KEY`: the key of `tls_cert`.
    pub tls_key: Option<std::path::PathBuf>,
    /// `NATS_TLS_FIRST`: TLS before the server's INFO.
    pub tls_first: bool,
}

/// Everything a runtime needs to start. Made by [`Config::from_env`] (or
/// [`Config::default`] and its fields); new settings may be added, so it
/// cannot be written as a struct literal outside catga.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// NATS URL(s); `None` runs on the embedded in-memory transport.
    pub nats_url: Option<String>,
    /// Credentials and TLS for NATS.
    pub nats_security: NatsSecurity,
    /// Service name.
    pub service: String,
    /// Replica id, unique among the service's replicas.
    pub instance_id: String,
    /// Default reply time-out of `send`.
    pub request_timeout: Duration,
    /// One deadline for the whole graceful shutdown.
    pub drain_timeout: Duration,
    /// Default in-flight limit per subscription.
    pub concurrency: usize,
    /// Default subscriptions and tasks per handler.
    pub parallel: usize,
    /// Messages buffered per subscription beyond its in-flight limit.
    pub subscription_capacity: usize,
    /// Bytes a subscription buffers beyond its in-flight limit.
    pub subscription_bytes: usize,
    /// Start with no handlers (a process that only sends).
    pub client_only: bool,
    /// Where `/health`, `/ready` and `/metrics` are served; `None`: nowhere.
    pub http_addr: Option<String>,
    /// The version reported in NATS micro discovery.
    pub service_version: String,
    /// The region this replica runs in (`CATGA_REGION`): discovery, `/ready`
    /// and the start-up log name it; its durable consumers prefer the
    /// pulls of their stream's own NATS cluster.
    pub region: Option<String>,
    /// Refuse to start (`true`) or only warn when another service serves
    /// one of this replica's command subjects.
    pub refuse_subject_conflicts: bool,
    /// Redis URL; `None` keeps state in memory. In cluster mode, seed
    /// nodes separated by commas.
    pub redis_url: Option<String>,
    /// What `REDIS_URL` names: one server, cluster nodes or sentinels.
    pub redis_mode: RedisMode,
    /// The master's name in Sentinel mode.
    pub redis_sentinel_master: String,
    /// How many shards the service's store keys are split into
    /// (`CATGA_STORE_SHARDS`).
    pub store_shards: u32,
    /// `REDIS_TLS_CA`, `REDIS_TLS_CERT`, `REDIS_TLS_KEY`.
    pub redis_tls: RedisTls,
    /// How long an idempotent message's answer is kept.
    pub inbox_window: Duration,
    /// How long a replica's claims outlive its last sign of life (its
    /// liveness key, renewed every third of this).
    pub inbox_lease: Duration,
    /// The leader lease (see `CATGA_LEADER_LEASE_MS`).
    pub leader_lease: Duration,
    /// How often a replica with keyed sagas heartbeats and rebalances.
    pub member_heartbeat: Duration,
    /// When a silent replica leaves the ring; its partition leases last as
    /// long.
    pub member_timeout: Duration,
    /// Default deliveries of a durable event before it is dead-lettered.
    pub max_deliver: u32,
    /// How long JetStream waits for an ack before it redelivers.
    pub ack_wait: Duration,
    /// Streams catga creates for durable events.
    pub streams: StreamSettings,
    /// The outbox relay's lease: one replica relays; another takes over
    /// within this time when it dies.
    pub outbox_lease: Duration,
    /// First back-off of retries and redeliveries.
    pub retry_base: Duration,
    /// Failures in a row that open a breaker (0: none).
    pub breaker_failures: u32,
    /// How long an open breaker refuses work.
    pub breaker_open: Duration,
}

/// How the state store reaches Redis (`CATGA_REDIS_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisMode {
    /// `REDIS_URL` is one server.
    Server,
    /// Redis Cluster: `REDIS_URL` lists seed nodes.
    Cluster,
    /// Redis Sentinel: `REDIS_URL` lists the sentinels.
    Sentinel,
}

/// TLS files for Redis (`rediss://`).
#[derive(Debug, Clone, Default)]
pub struct RedisTls {
    /// `REDIS_TLS_CA`.
    pub ca: Option<std::path::PathBuf>,
    /// `REDIS_TLS_CERT`.
    pub cert: Option<std::path::PathBuf>,
    /// `REDIS_TLS_KEY`.
    pub key: Option<std::path::PathBuf>,
}

/// How catga creates the JetStream streams of durable events.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// On disk (`file`) or in memory.
    pub memory_storage: bool,
    /// Replicas of each stream.
    pub replicas: usize,
    /// How long events are kept.
    pub max_age: Duration,
    /// How long message ids are remembered to drop duplicates.
    pub duplicate_window: Duration,
    /// Streams the partitions of each keyed saga spread over (at most
    /// one per partition): partition `p` is in stream `p % saga_streams`.
    pub saga_streams: u32,
    /// Where the streams catga creates are placed (`CATGA_JS_PLACEMENT`):
    /// a cluster and/or server tags; `None` leaves it to the servers.
    pub placement: Option<StreamPlacement>,
    /// The JetStream domain to reach (`CATGA_JS_DOMAIN`): a replica behind
    /// a leaf node names the hub's domain.
    pub domain: Option<String>,
}

/// Where JetStream places a stream: in a cluster, on servers with tags.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamPlacement {
    /// The cluster's name.
    pub cluster: Option<String>,
    /// Tags every server holding the stream must have.
    pub tags: Vec<String>,
}

impl StreamPlacement {
    /// Reads `cluster=east`, `tags=ssd,az1`, or both separated by `;`.
    pub fn parse(text: &str) -> Result<StreamPlacement> {
        let mut p = StreamPlacement::default();
        let mut tags_read = false;
        for part in text.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            match part.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
                Some(("cluster", v)) if !v.is_empty() && p.cluster.is_none() => {
                    p.cluster = Some(v.to_owned())
                }
                Some(("tags", v)) if !tags_read => {
                    tags_read = true;
                    p.tags = v
                        .split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(str::to_owned)
                        .collect();
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::Config,
                        format!(
                            "CATGA_JS_PLACEMENT: `{part}` is not `cluster=NAME` or `tags=A,B` (each once, \
                             separated by `;`)"
                        ),
                    ));
                }
            }
        }
        p.check()?;
        Ok(p)
    }

    /// Refuses a placement that names nothing, or a cluster or tag the
    /// servers could not match (empty, or with spaces, `=`, `,` or `;`):
    /// a stream placed by it could never be made, and its handlers would
    /// never get ready.
    pub(crate) fn check(&self) -> Result<()> {
        if self.cluster.is_none() && self.tags.is_empty() {
            return Err(Error::new(
                ErrorKind::Config,
                "CATGA_JS_PLACEMENT: name a cluster (`cluster=NAME`) or tags (`tags=A,B`)",
            ));
        }
        let odd = |v: &str| {
            v.is_empty()
                || v.chars()
                    .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '=' | ',' | ';'))
        };
        if let Some(bad) = self.cluster.iter().chain(&self.tags).find(|v| odd(v)) {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "CATGA_JS_PLACEMENT: `{bad}` is not a cluster name or tag (empty, or with spaces, `=`, \
                     `,` or `;`)"
                ),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for StreamPlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.cluster, self.tags.is_empty()) {
            (Some(c), true) => write!(f, "cluster={c}"),
            (None, _) => write!(f, "tags={}", self.tags.join(",")),
            (Some(c), false) => write!(f, "cluster={c};tags={}", self.tags.join(",")),
        }
    }
}

impl Default for StreamSettings {
    fn default() -> StreamSettings {
        StreamSettings {
            memory_storage: false,
            replicas: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            saga_streams: 1,
            placement: None,
            domain: None,
        }
    }
}

impl Default for Config {
    fn default() -> Config {
        let service = std::env::current_exe()
            .ok()
            .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "catga".to_owned());
        Config {
            nats_url: None,
            nats_security: NatsSecurity::default(),
            // A whole NUID: its first half is shared by every id of one process.
            instance_id: format!("{service}-{}", crate::wire::new_message_id()),
            service,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            concurrency: DEFAULT_CONCURRENCY,
            parallel: DEFAULT_PARALLEL,
            subscription_capacity: DEFAULT_CAPACITY,
            subscription_bytes: DEFAULT_CAPACITY_BYTES,
            client_only: false,
            http_addr: None,
            service_version: "0.0.0".to_owned(),
            region: None,
            refuse_subject_conflicts: true,
            redis_url: None,
            redis_mode: RedisMode::Server,
            redis_sentinel_master: "mymaster".to_owned(),
            store_shards: 1,
            redis_tls: RedisTls::default(),
            inbox_window: Duration::from_secs(24 * 3600),
            inbox_lease: Duration::from_secs(1),
            leader_lease: Duration::from_secs(10),
            member_heartbeat: Duration::from_secs(1),
            member_timeout: Duration::from_secs(5),
            max_deliver: 5,
            ack_wait: Duration::from_secs(30),
            streams: StreamSettings::default(),
            outbox_lease: Duration::from_secs(3),
            retry_base: Duration::from_millis(100),
            breaker_failures: 10,
            breaker_open: Duration::from_secs(5),
        }
    }
}

impl Config {
    /// Reads the variables of [`SETTINGS`]; unset ones keep their default.
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) over any lookup function (for tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let mut c = Config::default();
        // In the table's order: `HOSTNAME` comes before
        // `CATGA_INSTANCE_ID`, which overrides it.
        for setting in SETTINGS {
            let Some(read) = setting.read else { continue };
            let value = get(setting.name).map(|v| v.trim().to_owned());
            if let Some(v) = value.filter(|v| !v.is_empty()) {
                read(&mut c, setting.name, &v)?;
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks every setting's range: the same checks for the environment
    /// ([`from_lookup`](Self::from_lookup)) and for a builder
    /// ([`RuntimeBuilder::start`](crate::RuntimeBuilder::start)), each
    /// error naming the variable. (A builder's `.concurrency(0)` was
    /// silently 1 while `CATGA_CONCURRENCY=0` was an error.)
    pub fn validate(&self) -> Result<()> {
        // The service names its Redis hash tags (`catga:{orders}`, shard
        // tags `catga:{orders~1}`) and NATS subjects: braces, `~`,
        // wildcards or spaces would let one service's keys or subjects
        // pass for another's.
        if self.service.is_empty()
            || self
                .service
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '{' | '}' | '~' | '*' | '>'))
        {
            return Err(config_error(
                "CATGA_SERVICE",
                &self.service,
                "expected a name without spaces, braces, `~`, `*` or `>`",
            ));
        }
        let at_least_one = [
            ("CATGA_CONCURRENCY", self.concurrency),
            ("CATGA_PARALLEL", self.parallel),
            ("CATGA_SUBSCRIPTION_CAPACITY", self.subscription_capacity),
            ("CATGA_SUBSCRIPTION_BYTES", self.subscription_bytes),
            ("CATGA_MAX_DELIVER", self.max_deliver as usize),
            ("CATGA_JS_REPLICAS", self.streams.replicas),
            ("CATGA_JS_SAGA_STREAMS", self.streams.saga_streams as usize),
            ("CATGA_STORE_SHARDS", self.store_shards as usize),
        ];
        for (name, n) in at_least_one {
            if n == 0 {
                return Err(config_error(name, "0", "expected a whole number above 0"));
            }
        }
        if self.store_shards > MAX_STORE_SHARDS {
            return Err(config_error(
                "CATGA_STORE_SHARDS",
                &self.store_shards.to_string(),
                &format!("expected at most {}", MAX_STORE_SHARDS),
            ));
        }
        let at_least = [
            ("CATGA_REQUEST_TIMEOUT_MS", self.request_timeout, 1),
            ("CATGA_INBOX_LEASE_MS", self.inbox_lease, 30),
            ("CATGA_LEADER_LEASE_MS", self.leader_lease, 30),
            ("CATGA_MEMBER_HEARTBEAT_MS", self.member_heartbeat, 10),
            ("CATGA_OUTBOX_LEASE_MS", self.outbox_lease, 30),
        ];
        for (name, d, min_ms) in at_least {
            if d < Duration::from_millis(min_ms) {
                return Err(config_error(
                    name,
                    &d.as_millis().to_string(),
                    &format!("expected at least {min_ms} ms"),
                ));
            }
        }
        if self.member_timeout < self.member_heartbeat * 2 {
            return Err(config_error(
                "CATGA_MEMBER_TIMEOUT_MS",
                &self.member_timeout.as_millis().to_string(),
                "must be at least twice CATGA_MEMBER_HEARTBEAT_MS, or live replicas would drop out between heartbeats",
            ));
        }
        // Set through the builder, these skip the environment's reading:
        // the same rules here. The region labels metrics and discovery;
        // the domain becomes part of JetStream's API subjects.
        for (name, value) in [
            ("CATGA_REGION", &self.region),
            ("CATGA_JS_DOMAIN", &self.streams.domain),
        ] {
            if let Some(v) = value
                && name_token(name, v).ok().as_deref() != Some(v.as_str())
            {
                return Err(config_error(
                    name,
                    v,
                    "expected a name of letters, digits, `-` and `_`",
                ));
            }
        }
        if let Some(placement) = &self.streams.placement {
            placement.check()?;
        }
        let tls_files =
            self.redis_tls.ca.is_some() || self.redis_tls.cert.is_some() || self.redis_tls.key.is_some();
        if tls_files
            && let Some(url) = &self.redis_url
            && url.split(',').any(|u| !u.trim_start().starts_with("rediss://"))
        {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "REDIS_TLS_CA, REDIS_TLS_CERT and REDIS_TLS_KEY apply to rediss:// URLs only, and REDIS_URL \
                     ({}) lists another: it would connect without TLS",
                    redact_url(url)
                ),
            ));
        }
        Ok(())
    }

    /// The configuration table as Markdown (the guide's configuration page carries it).
    pub fn table_markdown() -> String {
        let mut out = String::from("| variable | meaning | default |\n|---|---|---|\n");
        for s in SETTINGS {
            out.push_str(&format!("| `{}` | {} | {} |\n", s.name, s.meaning, s.default));
        }
        out
    }
}

/// A server URL for logs: user names, passwords and tokens
/// (`nats://user:secret@host`) are replaced by `***`.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| match (one.find("://"), one.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => format!("{}***{}", &one[..scheme + 3], &one[at..]),
            (None, Some(at)) => format!("***{}", &one[at..]),
            _ => one.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// An nkey seed given directly or in a file. Errors name the variable, never
/// the value.
fn read_seed(name: &str, value: &str) -> Result<Secret> {
    let seed = if value.starts_with('S') && !value.contains(['/', '.']) {
        value.to_owned()
    } else {
        std::fs::read_to_string(value)
            .map(|s| s.trim().to_owned())
            .map_err(|e| {
                Error::new(
                    ErrorKind::Config,
                    format!(
                        "{name} is neither an nkey seed nor a readable file ({})",
                        e.kind()
                    ),
                )
            })?
    };
    if nkeys::KeyPair::from_seed(&seed).is_err() {
        return Err(Error::new(
            ErrorKind::Config,
            format!("{name} does not hold a valid nkey seed"),
        ));
    }
    Ok(Secret(seed))
}

impl NatsSecurity {
    /// Checks that the files exist and go together; errors name the
    /// variable and the path, never a secret.
    pub(crate) fn check(&self) -> Result<()> {
        let readable = |name: &str, path: &Option<std::path::PathBuf>| -> Result<()> {
            if let Some(p) = path {
                std::fs::metadata(p).map_err(|e| {
                    Error::new(
                        ErrorKind::Config,
                        format!("{name}: cannot read {}: {e}", p.display()),
                    )
                })?;
            }
            Ok(())
        };
        readable("NATS_CREDS", &self.creds_file)?;
        readable("NATS_TLS_CA", &self.tls_ca)?;
        readable("NATS_TLS_CERT", &self.tls_cert)?;
        readable("NATS_TLS_KEY", &self.tls_key)?;
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(Error::new(
                ErrorKind::Config,
                "NATS_TLS_CERT and NATS_TLS_KEY go together: set both or neither",
            ));
        }
        Ok(())
    }
}

/// A name that is one subject token (`[A-Za-z0-9_-]+`).
fn name_token(name: &str, v: &str) -> Result<String> {
    let v = v.trim();
    if !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(v.to_owned())
    } else {
        Err(Error::new(
            ErrorKind::Config,
            format!("{name}: `{v}` is not a name of letters, digits, `-` and `_`"),
        ))
    }
}

/// Stores a value read from the environment (keeps the table's rows on
/// one line each).
fn set<T>(field: &mut T, value: T) -> Result<()> {
    *field = value;
    Ok(())
}

fn count(name: &str, v: &str) -> Result<usize> {
    v.parse::<usize>()
        .map_err(|_| config_error(name, v, "expected a whole number"))
}

/// The most store shards a service may have (`CATGA_STORE_SHARDS`): each
/// lease grant copies its fence to every shard, and an idle relay polls
/// each shard.
pub(crate) const MAX_STORE_SHARDS: u32 = 256;

fn small(name: &str, v: &str) -> Result<u32> {
    v.parse::<u32>()
        .map_err(|_| config_error(name, v, "expected a whole number below 2^32"))
}

fn millis(name: &str, v: &str) -> Result<Duration> {
    v.parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| config_error(name, v, "expected a whole number of milliseconds"))
}

/// One of a few words (case-insensitive).
fn choice<T: Copy>(name: &str, v: &str, words: &[(&str, T)]) -> Result<T> {
    match words.iter().find(|(word, _)| word.eq_ignore_ascii_case(v)) {
        Some((_, value)) => Ok(*value),
        None => {
            let names: Vec<String> = words.iter().map(|(w, _)| format!("`{w}`")).collect();
            Err(config_error(name, v, &format!("expected {}", names.join(" or "))))
        }
    }
}

fn boolean(name: &str, v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(config_error(name, v, "expected true or false")),
    }
}

pub(crate) fn config_error(name: &str, value: &str, what: &str) -> Error {
    Error::new(ErrorKind::Config, format!("{name}={value:?}: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_with_a_plain_redis_url_are_refused() {
        let mut c = Config {
            redis_url: Some("rediss://a:6379,redis://b:6379".into()),
            ..Config::default()
        };
        c.redis_tls.ca = Some("ca.pem".into());
        let err = c.validate().expect_err("a plain URL");
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(err.message().contains("rediss://"), "{err}");
        c.redis_url = Some("rediss://a:6379,rediss://b:6379".into());
        c.validate().expect("TLS everywhere");
    }

    #[test]
    fn urls_in_logs_hide_credentials() {
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(redact_url("nats://app:s3cret@nats:4222"), "nats://***@nats:4222");
        assert_eq!(
            redact_url("nats://tok@a:4222,nats://b:4222"),
            "nats://***@a:4222,nats://b:4222"
        );
        assert_eq!(redact_url("user:pw@host:4222"), "***@host:4222");
    }

    #[test]
    fn reads_and_validates_variables() {
        let c = Config::from_lookup(|n| match n {
            "NATS_URL" => Some("nats://127.0.0.1:4222".into()),
            "CATGA_SERVICE" => Some("orders".into()),
            "CATGA_INSTANCE_ID" => Some("orders-7d9f".into()),
            "CATGA_REQUEST_TIMEOUT_MS" => Some("250".into()),
            "CATGA_PARALLEL" => Some("2".into()),
            _ => None,
        })
        .expect("valid");
        assert_eq!(c.nats_url.as_deref(), Some("nats://127.0.0.1:4222"));
        assert_eq!(c.service, "orders");
        assert_eq!(c.instance_id, "orders-7d9f");
        assert_eq!(c.request_timeout, Duration::from_millis(250));
        assert_eq!(c.parallel, 2);

        let err = Config::from_lookup(|n| (n == "CATGA_CONCURRENCY").then(|| "0".into())).expect_err("zero");
        assert!(err.message().contains("CATGA_CONCURRENCY"), "{err}");
        let err =
            Config::from_lookup(|n| (n == "CATGA_CLIENT_ONLY").then(|| "maybe".into())).expect_err("bool");
        assert!(err.message().contains("CATGA_CLIENT_ONLY"), "{err}");
        let memory = Config::from_lookup(|_| None).expect("defaults");
        assert!(memory.nats_url.is_none());
        assert!(memory.nats_security.creds_file.is_none());
    }

    #[test]
    fn the_environment_and_a_builder_are_checked_alike() {
        // The same value is refused the same way, naming the variable,
        // whichever way it was set.
        type Case = (&'static str, &'static str, fn(&mut Config));
        let cases: [Case; 9] = [
            ("CATGA_SERVICE", "orders~1", |c| c.service = "orders~1".into()),
            ("CATGA_SERVICE", "a{b}", |c| c.service = "a{b}".into()),
            ("CATGA_CONCURRENCY", "0", |c| c.concurrency = 0),
            ("CATGA_STORE_SHARDS", "0", |c| c.store_shards = 0),
            ("CATGA_STORE_SHARDS", "257", |c| c.store_shards = 257),
            ("CATGA_JS_SAGA_STREAMS", "0", |c| c.streams.saga_streams = 0),
            ("CATGA_SUBSCRIPTION_BYTES", "0", |c| c.subscription_bytes = 0),
            ("CATGA_LEADER_LEASE_MS", "5", |c| {
                c.leader_lease = Duration::from_millis(5)
            }),
            ("CATGA_MEMBER_TIMEOUT_MS", "1500", |c| {
                c.member_timeout = Duration::from_millis(1500)
            }),
        ];
        for (name, value, set) in cases {
            let from_env = Config::from_lookup(|n| (n == name).then(|| value.to_owned())).expect_err(name);
            let mut built = Config::default();
            set(&mut built);
            let from_builder = built.validate().expect_err(name);
            assert!(from_env.message().contains(name), "{from_env}");
            assert_eq!(from_env.message(), from_builder.message());
        }
        Config::default().validate().expect("the defaults are valid");
    }

    #[test]
    fn each_default_in_the_table_is_the_one_a_config_holds() {
        // Defaults that describe rather than state a value.
        const DESCRIBED: &[&str] = &[
            "NATS_URL",
            "NATS_CREDS",
            "NATS_NKEY",
            "NATS_TLS_CA",
            "NATS_TLS_CERT",
            "NATS_TLS_KEY",
            "REDIS_URL",
            "REDIS_TLS_CA",
            "REDIS_TLS_CERT",
            "REDIS_TLS_KEY",
            "CATGA_SERVICE",
            "HOSTNAME",
            "CATGA_INSTANCE_ID",
            "CATGA_HTTP_ADDR",
            "CATGA_REGION",
            "CATGA_JS_PLACEMENT",
            "CATGA_JS_DOMAIN",
        ];
        let base = Config::default();
        let mut checked = 0;
        for s in SETTINGS {
            let Some(read) = s.read else { continue };
            if DESCRIBED.contains(&s.name) {
                assert!(
                    s.default.starts_with("unset") || !s.default.starts_with(char::is_numeric),
                    "{} states a value: check it here",
                    s.name
                );
                continue;
            }
            // "67108864 (64 MiB)": the value, then a gloss.
            let value = s.default.split(" (").next().unwrap_or(s.default);
            let mut c = base.clone();
            read(&mut c, s.name, value).unwrap_or_else(|e| panic!("{}: {e}", s.name));
            assert_eq!(
                format!("{c:?}"),
                format!("{base:?}"),
                "{}'s default in the table is not Config::default()'s",
                s.name
            );
            checked += 1;
        }
        assert!(checked >= 25, "{checked}");
    }

    #[test]
    fn placements_read_a_cluster_and_tags() {
        let p = StreamPlacement::parse("cluster=east; tags=ssd, az1").expect("valid");
        assert_eq!(
            p,
            StreamPlacement {
                cluster: Some("east".into()),
                tags: vec!["ssd".into(), "az1".into()]
            }
        );
        assert_eq!(p.to_string(), "cluster=east;tags=ssd,az1");
        assert_eq!(
            StreamPlacement::parse("tags=a").expect("valid").to_string(),
            "tags=a"
        );
        for bad in [
            "",
            "east",
            "cluster=",
            "cluster=a;cluster=b",
            "zone=a",
            ";",
            "tags=;tags=ssd",
            "cluster=a=b",
            "cluster=east west",
        ] {
            assert!(StreamPlacement::parse(bad).is_err(), "{bad:?}");
        }
        // The builder's values are checked as the environment's are.
        let with = |f: &dyn Fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c.validate()
        };
        assert!(with(&|c| c.region = Some("eu-west".into())).is_ok());
        assert!(with(&|c| c.region = Some(String::new())).is_err());
        assert!(with(&|c| c.region = Some("eu west".into())).is_err());
        assert!(with(&|c| c.streams.domain = Some("hub.x".into())).is_err());
        assert!(
            with(&|c| c.streams.placement = Some(StreamPlacement {
                cluster: Some("a b".into()),
                tags: Vec::new()
            }))
            .is_err()
        );
        let c = Config::from_lookup(|n| (n == "CATGA_JS_PLACEMENT").then(|| "cluster=west".into()))
            .expect("valid");
        assert_eq!(
            c.streams.placement.map(|p| p.to_string()).as_deref(),
            Some("cluster=west")
        );
    }

    #[test]
    fn the_instance_id_is_the_hostname_unless_set() {
        let pod = Config::from_lookup(|n| (n == "HOSTNAME").then(|| "orders-7d9f".into())).expect("valid");
        assert_eq!(pod.instance_id, "orders-7d9f");
        let both = Config::from_lookup(|n| match n {
            "HOSTNAME" => Some("orders-7d9f".into()),
            "CATGA_INSTANCE_ID" => Some("orders-a".into()),
            _ => None,
        })
        .expect("valid");
        assert_eq!(both.instance_id, "orders-a");
    }

    #[test]
    fn the_table_lists_every_setting() {
        let table = Config::table_markdown();
        for s in SETTINGS {
            assert!(table.contains(&format!("`{}`", s.name)));
        }
    }
}

#[cfg(test)]
mod security_tests {
    use super::*;

    #[test]
    fn nkey_seeds_are_checked_and_never_shown() {
        let kp = nkeys::KeyPair::new_user();
        let seed = kp.seed().expect("seed");
        let c = Config::from_lookup(|n| (n == "NATS_NKEY").then(|| seed.clone())).expect("a seed");
        let shown = format!("{c:?}");
        assert!(!shown.contains(&seed), "the seed must not be printed: {shown}");
        assert_eq!(
            c.nats_security.nkey_seed.as_ref().map(Secret::expose),
            Some(seed.as_str())
        );

        let bad = "SUAAAAAAAAAAAAAAAAAAAAAA";
        let err = Config::from_lookup(|n| (n == "NATS_NKEY").then(|| bad.to_owned())).expect_err("bad seed");
        assert!(
            err.message().contains("NATS_NKEY") && !err.message().contains(bad),
            "{err}"
        );
        let err = Config::from_lookup(|n| (n == "NATS_NKEY").then(|| "/nonexistent/seed.nk".to_owned()))
            .expect_err("missing file");
        assert!(err.message().contains("NATS_NKEY"), "{err}");
    }

    #[test]
    fn files_must_exist_and_certificates_come_with_keys() {
        let missing = NatsSecurity {
            creds_file: Some("/nonexistent/app.creds".into()),
            ..NatsSecurity::default()
        };
        let err = missing.check().expect_err("missing creds");
        assert!(err.message().starts_with("NATS_CREDS"), "{err}");
        let half = NatsSecurity {
            tls_cert: Some(std::env::temp_dir()),
            ..NatsSecurity::default()
        };
        assert!(
            half.check()
                .expect_err("cert without key")
                .message()
                .contains("NATS_TLS_KEY")
        );
    }
}
