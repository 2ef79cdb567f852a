//! One test, two transports: a [`Backend`] builds runtimes and clients either
//! on a real nats-server or on one shared in-memory bus.

use std::time::Duration;

use catga::{Client, MemoryBus, Runtime, RuntimeBuilder};

use crate::servers::{NatsServer, RedisCluster, RedisSentinel, RedisServer};

/// Where the runtimes of a test talk to each other and keep their state.
// One per test: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Backend {
    /// A real nats-server (with JetStream) and a real redis-server, killed
    /// when the backend is dropped.
    Nats(NatsServer, RedisServer),
    /// The embedded bus and its in-memory store.
    Memory(MemoryBus),
    /// A real nats-server and the state store on a 3-master Redis Cluster,
    /// the service's keys split into this many shards
    /// (`CATGA_STORE_SHARDS`; 1: all on one master).
    RedisCluster(NatsServer, RedisCluster, u32),
    /// A real nats-server and the state store on the master that Redis
    /// Sentinel names.
    RedisSentinel(NatsServer, RedisSentinel),
}

impl Backend {
    /// A fresh nats-server and redis-server.
    pub fn nats() -> Backend {
        Backend::Nats(NatsServer::start(), RedisServer::start())
    }

    /// A fresh nats-server and Redis Cluster.
    pub fn redis_cluster() -> Backend {
        Backend::RedisCluster(NatsServer::start(), RedisCluster::start(), 1)
    }

    /// A fresh nats-server and Redis Cluster, the service's keys in 3
    /// shards (one per master).
    pub fn redis_sharded() -> Backend {
        Backend::RedisCluster(NatsServer::start(), RedisCluster::start(), 3)
    }

    /// A fresh nats-server and Redis master, replica and sentinel.
    pub fn redis_sentinel() -> Backend {
        Backend::RedisSentinel(NatsServer::start(), RedisSentinel::start())
    }

    /// A fresh in-memory bus.
    pub fn memory() -> Backend {
        Backend::Memory(MemoryBus::new())
    }

    /// Which transport, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Nats(..) => "nats",
            Backend::Memory(_) => "memory",
            Backend::RedisCluster(_, _, 1) => "nats with Redis Cluster",
            Backend::RedisCluster(..) => "nats with Redis Cluster in shards",
            Backend::RedisSentinel(..) => "nats with Redis Sentinel",
        }
    }

    /// The nats-server's URL, on the NATS backends.
    pub fn nats_url(&self) -> Option<String> {
        match self {
            Backend::Nats(s, _) | Backend::RedisCluster(s, ..) | Backend::RedisSentinel(s, _) => {
                Some(s.url())
            }
            Backend::Memory(_) => None,
        }
    }

    /// The nats-server, on the NATS backend.
    pub fn nats_server(&mut self) -> Option<&mut NatsServer> {
        match self {
            Backend::Nats(s, _) | Backend::RedisCluster(s, ..) | Backend::RedisSentinel(s, _) => Some(s),
            Backend::Memory(_) => None,
        }
    }

    /// The redis-server, on the NATS backend.
    pub fn redis_server(&mut self) -> Option<&mut RedisServer> {
        match self {
            Backend::Nats(_, r) => Some(r),
            Backend::Memory(_) | Backend::RedisCluster(..) | Backend::RedisSentinel(..) => None,
        }
    }

    /// A runtime builder on this backend serving the handlers defined in
    /// module `module` (pass `module_path!()`). A module without handlers
    /// makes `start` fail: a selection is never silently empty.
    pub fn builder(&self, module: &str, instance: &str) -> RuntimeBuilder {
        let prefix = format!("{module}::");
        let b = Runtime::builder()
            .service("catga-tests")
            .instance_id(instance)
            .handlers(move |s| s.name().starts_with(&prefix));
        self.attach(b)
    }

    /// Points a builder at this backend.
    pub fn attach(&self, b: RuntimeBuilder) -> RuntimeBuilder {
        match self {
            Backend::Nats(s, r) => b.nats_url(s.url()).redis_url(r.url()),
            Backend::Memory(bus) => b.memory(bus.clone()),
            Backend::RedisCluster(s, r, shards) => {
                b.nats_url(s.url()).redis_cluster(&r.urls()).store_shards(*shards)
            }
            Backend::RedisSentinel(s, r) => b.nats_url(s.url()).redis_sentinel(&[r.url()], "mymaster"),
        }
    }

    /// Starts a built runtime and waits until it is ready.
    pub async fn started(&self, b: RuntimeBuilder) -> Runtime {
        let rt = b
            .start()
            .await
            .unwrap_or_else(|e| panic!("runtime failed to start: {e}"));
        crate::ready_within(&rt, Duration::from_secs(10)).await;
        rt
    }

    /// Starts a runtime serving `module`'s handlers and waits until it is
    /// ready.
    pub async fn runtime(&self, module: &str, instance: &str) -> Runtime {
        self.started(self.builder(module, instance)).await
    }

    /// Starts `n` ready replicas `r1`..`rn` serving `module`'s handlers.
    pub async fn replicas(&self, module: &str, n: usize) -> Vec<Runtime> {
        let mut out = Vec::with_capacity(n);
        for i in 1..=n {
            out.push(self.runtime(module, &format!("r{i}")).await);
        }
        out
    }

    /// The settings a process beside the replicas reads to reach them and
    /// their store (NATS and Redis URLs, the Redis mode, the service's
    /// name and shard count); `None` on the embedded bus.
    pub fn config(&self) -> Option<catga::Config> {
        let mut c = catga::Config::default();
        c.service = "catga-tests".to_owned();
        match self {
            Backend::Nats(s, r) => {
                c.nats_url = Some(s.url());
                c.redis_url = Some(r.url());
            }
            Backend::RedisCluster(s, r, shards) => {
                c.nats_url = Some(s.url());
                c.redis_url = Some(r.urls().join(","));
                c.redis_mode = catga::RedisMode::Cluster;
                c.store_shards = *shards;
            }
            Backend::RedisSentinel(s, r) => {
                c.nats_url = Some(s.url());
                c.redis_url = Some(r.url());
                c.redis_mode = catga::RedisMode::Sentinel;
                c.redis_sentinel_master = "mymaster".to_owned();
            }
            Backend::Memory(_) => return None,
        }
        Some(c)
    }

    /// A client that hosts no handlers and reaches the replicas' store
    /// (for delayed messages): from [`config`](Self::config), or the
    /// embedded bus's.
    pub async fn store_client(&self) -> Client {
        match (self, self.config()) {
            (Backend::Memory(bus), _) => Client::memory(bus),
            (_, Some(c)) => Client::connect_with(&c).await.expect("client connects"),
            (_, None) => unreachable!("every NATS backend has a configuration"),
        }
    }

    /// A client that hosts no handlers.
    pub async fn client(&self) -> Client {
        match self {
            Backend::Nats(s, _) | Backend::RedisCluster(s, ..) | Backend::RedisSentinel(s, _) => {
                let c = Client::connect(&s.url()).await.expect("client connects");
                // Wait for the first connection so that tests start clean.
                for _ in 0..200 {
                    if c.is_connected() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                c
            }
            Backend::Memory(bus) => Client::memory(bus),
        }
    }
}

/// Shuts every runtime down, expecting a clean drain.
pub async fn shutdown_all(replicas: Vec<Runtime>) {
    for rt in replicas {
        rt.shutdown().await.expect("clean shutdown");
    }
}
