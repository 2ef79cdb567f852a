//! Keyed sagas against a real redis-server that is killed in the middle of
//! a run and started again: the replicas stop serving their partitions
//! when they cannot renew the leases, the sagas resume when Redis returns,
//! and every step took effect once, in each key's order.

use std::time::{Duration, Instant};

use catga::{Context, Result, Runtime, Saga, SagaStatus, State, Versioned, command, event, saga};
use catga_tests::{NatsServer, RedisServer, run_id};
use serde::{Deserialize, Serialize};

/// An account's entries, in the order they were applied.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Entries {
    /// The entries' numbers.
    pub seqs: Vec<u64>,
}

impl State for Entries {
    const KIND: &'static str = "entries";
}

/// Applies entry `seq` to `account` (once per saga).
#[command(subject = "tests.sagafaults.apply", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Apply {
    /// The account.
    pub account: String,
    /// The entry.
    pub seq: u64,
}

/// Starts a saga keyed by account.
#[event(subject = "tests.sagafaults.entry")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Entry {
    /// The account (the saga's key).
    pub account: String,
    /// The entry's number in its account.
    pub seq: u64,
}

#[command(retry = 5)]
async fn apply(ctx: &Context, a: Apply) -> Result<()> {
    tokio::time::sleep(Duration::from_millis(5)).await;
    let mut entries = ctx
        .try_load::<Entries>(&a.account)
        .await?
        .unwrap_or_else(|| Versioned::new(a.account.clone(), Entries::default()));
    entries.seqs.push(a.seq);
    ctx.save(entries).await?;
    Ok(())
}

#[saga(key = account, partitions = 4, concurrency = 2)]
async fn post(saga: &Saga, e: Entry) -> Result<()> {
    saga.step(
        "apply",
        Apply {
            account: e.account.clone(),
            seq: e.seq,
        },
    )
    .await?;
    Ok(())
}

/// A replica whose keyed saga's partitions spread over `streams`
/// partition streams, each routed by a router share of its own.
async fn replica_over(
    nats: &NatsServer,
    redis: &RedisServer,
    service: &str,
    id: &str,
    streams: u32,
) -> Runtime {
    let rt = Runtime::builder()
        .service(service)
        .streams(catga::StreamSettings {
            saga_streams: streams,
            ..Default::default()
        })
        .instance_id(id)
        .nats_url(nats.url())
        .redis_url(redis.url())
        .membership(Duration::from_millis(100), Duration::from_millis(600))
        .retry_base(Duration::from_millis(50))
        .durable_defaults(Duration::from_secs(2), 30)
        .handlers(|s| s.name().starts_with("saga_faults::"))
        .start()
        .await
        .expect("starts");
    catga_tests::ready_within(&rt, Duration::from_secs(10)).await;
    rt
}

const ACCOUNTS: usize = 4;
const PER_ACCOUNT: u64 = 15;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_sagas_resume_after_redis_restarts_with_nothing_doubled() {
    resume_after_redis_restarts(1).await;
}

/// The same with three partition streams: three router shares over the
/// two replicas lose and regain their leases with the partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_shares_resume_after_redis_restarts_with_nothing_doubled() {
    resume_after_redis_restarts(3).await;
}

async fn resume_after_redis_restarts(streams: u32) {
    let nats = NatsServer::start();
    let mut redis = RedisServer::start_persistent();
    let service = format!("sagafaults-{}", run_id());
    let replicas = vec![
        replica_over(&nats, &redis, &service, "r1", streams).await,
        replica_over(&nats, &redis, &service, "r2", streams).await,
    ];
    let client = catga::Client::connect(&nats.url())
        .await
        .expect("client")
        .with_request_timeout(Duration::from_secs(3));
    let run = run_id();
    let accounts: Vec<String> = (0..ACCOUNTS).map(|i| format!("{run}-{i}")).collect();
    let publish = |seqs: std::ops::Range<u64>| {
        let (client, accounts) = (client.clone(), accounts.clone());
        async move {
            for seq in seqs {
                for account in &accounts {
                    client
                        .publish_durable(Entry {
                            account: account.clone(),
                            seq,
                        })
                        .await
                        .expect("published");
                }
            }
        }
    };
    let applied = |rt: &Runtime| {
        let client = rt.client();
        let accounts = accounts.clone();
        async move {
            let mut n = 0;
            for a in &accounts {
                if let Ok(r) = client.send(GetEntries { account: a.clone() }).await {
                    n += r.seqs.len();
                }
            }
            n
        }
    };
    publish(0..PER_ACCOUNT).await;
    // Some sagas done, the rest to come: Redis dies.
    let started = Instant::now();
    while applied(&replicas[0]).await < 8 {
        assert!(started.elapsed() < Duration::from_secs(20), "no saga ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    redis.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.resume();
    let started = Instant::now();
    let total = ACCOUNTS * PER_ACCOUNT as usize;
    loop {
        let n = applied(&replicas[0]).await;
        if n >= total {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{n} of {total} applied after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for a in &accounts {
        let got = client
            .send(GetEntries { account: a.clone() })
            .await
            .expect("entries");
        assert_eq!(
            got.seqs,
            (0..PER_ACCOUNT).collect::<Vec<_>>(),
            "{a}: each entry once, in order"
        );
    }
    let sagas = replicas[0].sagas(200).await.expect("sagas");
    let ours: Vec<_> = sagas.iter().filter(|s| s.id.starts_with("post:")).collect();
    assert_eq!(ours.len(), total, "one saga per entry");
    assert!(
        ours.iter().all(|s| s.status == SagaStatus::Completed),
        "all completed: {ours:?}"
    );
    catga_tests::backend::shutdown_all(replicas).await;
}

/// Redis stalls (SIGSTOP) longer than the partition leases while keyed
/// sagas run on one replica: the router finds its hold on its lease lapsed
/// and stops; when Redis answers again the lease is renewed and the router
/// routes again, so the sagas published after the stall run too, each
/// account's entries once and in order. Before, the ended router was left
/// ended under a renewed lease, and no trigger was routed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_whose_lease_lapsed_routes_again() {
    routes_again_after_the_leases_lapsed(1).await;
}

/// The same with three router shares on the one replica: each ends when
/// its hold lapses and routes again once its lease is renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_shares_whose_leases_lapsed_route_again() {
    routes_again_after_the_leases_lapsed(3).await;
}

async fn routes_again_after_the_leases_lapsed(streams: u32) {
    let nats = NatsServer::start();
    let redis = RedisServer::start_persistent();
    let service = format!("sagafaults-{}", run_id());
    let rt = replica_over(&nats, &redis, &service, "r1", streams).await;
    let client = catga::Client::connect(&nats.url())
        .await
        .expect("client")
        .with_request_timeout(Duration::from_secs(3));
    let run = run_id();
    let accounts: Vec<String> = (0..2).map(|i| format!("{run}-{i}")).collect();
    let publish = |seqs: std::ops::Range<u64>| {
        let (client, accounts) = (client.clone(), accounts.clone());
        async move {
            for seq in seqs {
                for account in &accounts {
                    let e = Entry {
                        account: account.clone(),
                        seq,
                    };
                    client.publish_durable(e).await.expect("published");
                }
            }
        }
    };
    let applied = |upto: usize| {
        let (client, accounts) = (client.clone(), accounts.clone());
        async move {
            let started = Instant::now();
            loop {
                let mut all = Vec::new();
                for a in &accounts {
                    let got = client
                        .send(GetEntries { account: a.clone() })
                        .await
                        .map(|e| e.seqs);
                    all.push(got.unwrap_or_default());
                }
                if all.iter().all(|seqs| seqs.len() >= upto) {
                    return all;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "not every account reached {upto} entries: {all:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    publish(0..5).await;
    applied(5).await;
    // Longer than the leases (600 ms), shorter than a store call's
    // time-out (2 s): the renewal that waited comes back granted.
    redis.pause();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.unpause();
    publish(5..10).await;
    for seqs in applied(10).await {
        assert_eq!(seqs, (0..10).collect::<Vec<_>>(), "each entry once, in order");
    }
    rt.shutdown().await.expect("clean shutdown");
}

/// Reads an account's entries.
#[command(subject = "tests.sagafaults.get", reply = Entries)]
#[derive(Serialize, Deserialize, Debug)]
pub struct GetEntries {
    /// The account.
    pub account: String,
}

#[command]
async fn get_entries(ctx: &Context, q: GetEntries) -> Result<Entries> {
    Ok(ctx
        .try_load::<Entries>(&q.account)
        .await?
        .map(Versioned::into_inner)
        .unwrap_or_default())
}

/// A partition and the router that the ring gives a replica, held by a
/// replica that is gone from the ring but whose leases have not run out
/// (here: forged with a long time to live): the replica is ready at
/// first, then, once the hand-over has taken longer than it can
/// (member time-out plus drain deadline), readiness says which partition
/// is not served and why, and that the triggers are not routed. When the
/// leases are free, it takes them and is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_held_elsewhere_shows_in_readiness() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let mut conn = redis::Client::open(redis.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connected");
    let held = ["catga:{ghosts}:part:post:2", "catga:{ghosts}:part:post:router"];
    for key in held {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg("gone/replica")
            .arg("PX")
            .arg(60_000)
            .query_async(&mut conn)
            .await
            .expect("SET");
    }
    let rt = Runtime::builder()
        .service("ghosts")
        .instance_id("g1")
        .nats_url(nats.url())
        .redis_url(redis.url())
        .membership(Duration::from_millis(100), Duration::from_millis(600))
        .drain_timeout(Duration::from_millis(500))
        .handlers(|s| s.name() == "saga_faults::post")
        .start()
        .await
        .expect("starts");
    catga_tests::ready_within(&rt, Duration::from_secs(10)).await;
    let started = Instant::now();
    while rt.partitions().await.get("saga_faults::post").map(Vec::len) != Some(3) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            rt.partitions().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failing = loop {
        let r = rt.readiness();
        if !r.ready {
            break r.failing;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still ready without partition 2 and the router"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let text = failing.join("\n");
    eprintln!("readiness: {text}");
    assert!(
        text.contains("keyed saga saga_faults::post")
            && text.contains("partitions [2]")
            && text.contains("held by another replica")
            && text.contains("router"),
        "{text}"
    );
    let _: () = redis::cmd("DEL")
        .arg(&held[..])
        .query_async(&mut conn)
        .await
        .expect("DEL");
    catga_tests::ready_within(&rt, Duration::from_secs(10)).await;
    let served = rt.partitions().await;
    assert_eq!(
        served.get("saga_faults::post"),
        Some(&vec![0, 1, 2, 3]),
        "{served:?}"
    );
    rt.shutdown().await.expect("clean shutdown");
}
