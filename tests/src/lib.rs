//! Test harness of catga: real `nats-server` and `redis-server` processes on
//! free loopback ports, a [`Backend`] that builds runtimes on NATS or on the
//! embedded bus, per-run records for handlers, and [`on_both!`], which runs
//! a scenario on both transports.
//!
//! The scenarios live in `tests/scenarios/`, one file per topic holding its
//! handlers and its scenarios.

pub mod asyncapi;
pub mod backend;
pub mod collector;
pub mod http;
pub mod messages;
pub mod pki;
pub mod process;
pub mod record;
pub mod servers;

pub use backend::Backend;
pub use pki::Pki;
pub use record::{Gauge, Recorder, Tally, run_id};
pub use servers::{NatsCluster, NatsServer, RedisCluster, RedisSentinel, RedisServer, TlsSentinel};

/// Waits until `rt` is ready, for up to `within`; fails the test with its
/// readiness (what fails) otherwise.
pub async fn ready_within(rt: &catga::Runtime, within: std::time::Duration) {
    match tokio::time::timeout(within, rt.ready()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("the runtime stopped before it was ready: {e}"),
        Err(_) => panic!("not ready within {within:?}: {:?}", rt.readiness()),
    }
}

/// Waits until `ok` holds, checking every 10 ms; panics naming `what`
/// past `limit`. Returns how long it took.
pub async fn until(
    what: &str,
    limit: std::time::Duration,
    mut ok: impl FnMut() -> bool,
) -> std::time::Duration {
    let started = std::time::Instant::now();
    while !ok() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// Defines one test per scenario and backend: `nats::name` against a fresh
/// nats-server, `memory::name` on a fresh in-memory bus. Each scenario is an
/// `async fn name(b: &Backend)` in the calling module.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),+ $(,)?) => {
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&$crate::Backend::nats()).await;
                }
            )+
        }
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&$crate::Backend::memory()).await;
                }
            )+
        }
    };
}

/// `redis_sharded::name` alone: the scenario on NATS with the state store
/// on a 3-master Redis Cluster in 3 shards (`CATGA_STORE_SHARDS=3`), beside
/// an [`on_both!`] of the same names, for the scenarios whose store work
/// matters on the sharded layout but not on the other stores.
#[macro_export]
macro_rules! on_sharded {
    ($($name:ident),+ $(,)?) => {
        mod redis_sharded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&$crate::Backend::redis_sharded()).await;
                }
            )+
        }
    };
}

/// [`on_both!`] and [`on_sharded!`] of the same scenarios.
#[macro_export]
macro_rules! on_both_and_sharded {
    ($($name:ident),+ $(,)?) => {
        $crate::on_both!($($name),+);
        $crate::on_sharded!($($name),+);
    };
}

/// [`on_both!`], plus `redis_cluster::name`, `redis_sentinel::name` and
/// `redis_sharded::name`: the same scenario on NATS with the state store
/// on a 3-master Redis Cluster, on a master found through Redis Sentinel,
/// and on a 3-master Redis Cluster with the service's keys in 3 shards
/// (`CATGA_STORE_SHARDS=3`). For the scenarios that exercise the store.
#[macro_export]
macro_rules! on_every_store {
    ($($name:ident),+ $(,)?) => {
        $crate::on_both!($($name),+);
        mod redis_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&$crate::Backend::redis_cluster()).await;
                }
            )+
        }
        mod redis_sentinel {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&$crate::Backend::redis_sentinel()).await;
                }
            )+
        }
        mod redis_sharded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(&$crate::Backend::redis_sharded()).await;
                }
            )+
        }
    };
}
