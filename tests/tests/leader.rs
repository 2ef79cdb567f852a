//! The leader lease against a real redis-server: a leader that dies
//! without giving the lease up is replaced within two leases, and a
//! leader that stalled past its lease cannot write once another replica
//! was granted it (its save is fenced in the same atomic operation).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use catga::{Context, Result, Runtime, State, Versioned, event};
use catga_tests::{NatsServer, RedisServer, run_id, until};
use serde::{Deserialize, Serialize};

/// A job for the leader.
#[event(subject = "tests.leader.job")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Job {
    /// Where its result is saved.
    pub key: String,
    /// Wait for the test's go before saving.
    pub hold: bool,
}

/// What a job saves.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Done {
    /// The replica that did it.
    pub by: String,
}

impl State for Done {
    const KIND: &'static str = "done";
}

/// Jobs started, by key (tests of this file run side by side under plain
/// `cargo test`: each looks at its own keys only).
static STARTED: catga_tests::Tally = catga_tests::Tally::new();
/// Keys whose held job may go on.
static GO: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn go(key: &str) {
    GO.lock().expect("go").push(key.to_owned());
}
/// What one job's save came to: its key, the replica, Ok or the error.
type Saved = (String, String, std::result::Result<(), String>);

static SAVES: Mutex<Vec<Saved>> = Mutex::new(Vec::new());
/// What a held job's publish and send came to: its key, then each error.
type Effects = (
    String,
    std::result::Result<(), String>,
    std::result::Result<(), String>,
);
static EFFECTS: Mutex<Vec<Effects>> = Mutex::new(Vec::new());

/// What a leader job announces.
#[event(subject = "tests.leader.announced")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Announced {
    /// The job's key.
    pub key: String,
}

/// What a leader job asks for.
#[catga::command(subject = "tests.leader.poke")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Poke {
    /// The job's key.
    pub key: String,
}

#[event(leader)]
async fn on_job(ctx: &Context, j: Job) -> Result<()> {
    STARTED.add(&j.key);
    if j.hold {
        while !GO.lock().expect("go").contains(&j.key) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Past its lease: what it would publish or send is refused before
        // it leaves, as its save is.
        let published = ctx
            .publish(Announced { key: j.key.clone() })
            .await
            .map_err(|e| e.to_string());
        let sent = ctx
            .send(Poke { key: j.key.clone() })
            .await
            .map_err(|e| e.to_string());
        EFFECTS
            .lock()
            .expect("effects")
            .push((j.key.clone(), published, sent));
    }
    let saved = ctx
        .save(Versioned::new(
            j.key.clone(),
            Done {
                by: ctx.instance_id().to_owned(),
            },
        ))
        .await;
    SAVES.lock().expect("saves").push((
        j.key,
        ctx.instance_id().to_owned(),
        saved.as_ref().map(|_| ()).map_err(ToString::to_string),
    ));
    saved.map(|_| ())
}

const LEASE: Duration = Duration::from_millis(400);

/// A job for a leader handler that cannot bind its consumer.
#[event(subject = "tests.leader.denied")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Denied;

#[event(leader, durable = "leader-denied")]
async fn on_denied(_d: Denied) -> Result<()> {
    Ok(())
}

/// The leader handler's durable consumer cannot be made (the broker
/// refuses this user the consumer API): the replica leads, stays ready
/// while the binding is within its 5 s grace, then says in its readiness
/// that what it serves under the lease is not live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_handler_that_cannot_subscribe_shows_in_readiness() {
    let nats = NatsServer::start_with(
        r#"
        authorization {
          users = [
            { user: "svc", password: "unused",
              permissions: {
                publish: { allow: ">", deny: ["$JS.API.CONSUMER.CREATE.>", "$JS.API.CONSUMER.DURABLE.CREATE.>"] },
                subscribe: ">" } }
          ]
        }
        no_auth_user: "svc"
        "#,
    );
    let redis = RedisServer::start();
    let rt = Runtime::builder()
        .service("denied")
        .instance_id("d1")
        .nats_url(nats.url())
        .redis_url(redis.url())
        .leader_lease(LEASE)
        .request_timeout(Duration::from_secs(1))
        .handlers(|s| s.name() == "leader::on_denied")
        .start()
        .await
        .expect("starts");
    catga_tests::ready_within(&rt, Duration::from_secs(10)).await;
    until("it leads", Duration::from_secs(5), || rt.is_leader()).await;
    let led = std::time::Instant::now();
    let failing = loop {
        let r = rt.readiness();
        if !r.ready {
            break r.failing;
        }
        assert!(led.elapsed() < Duration::from_secs(20), "still ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let after = led.elapsed();
    assert!(
        after >= Duration::from_millis(4500),
        "within the grace: {after:?} {failing:?}"
    );
    assert!(
        failing.iter().any(|f| f.contains("served under a lease")),
        "{failing:?}"
    );
    let _ = rt.shutdown().await;
}

async fn replica(nats: &NatsServer, redis: &RedisServer, id: &str) -> Runtime {
    let rt = Runtime::builder()
        .service("leaders")
        .instance_id(id)
        .nats_url(nats.url())
        .redis_url(redis.url())
        .leader_lease(LEASE)
        .handlers(|s| s.name() == "leader::on_job")
        .start()
        .await
        .expect("starts");
    catga_tests::ready_within(&rt, Duration::from_secs(10)).await;
    rt
}

/// Publishes a job that waits for [`go`] once started, and waits until it
/// started on the leader; its key.
async fn held_job(client: &catga::Client) -> String {
    let key = run_id();
    client
        .publish(Job {
            key: key.clone(),
            hold: true,
        })
        .await
        .expect("publish");
    until("the job started", Duration::from_secs(5), || {
        STARTED.get(&key) == 1
    })
    .await;
    key
}

/// What the save of job `key` came to, once it came back: the replica
/// and the outcome.
async fn save_of(key: &str) -> (String, std::result::Result<(), String>) {
    until("the save came back", Duration::from_secs(5), || {
        SAVES.lock().expect("saves").iter().any(|(k, _, _)| k == key)
    })
    .await;
    let saves = SAVES.lock().expect("saves").clone();
    let (_, by, outcome) = saves.into_iter().find(|(k, _, _)| k == key).expect("the save");
    (by, outcome)
}

/// A connection to `redis` for the test's own commands.
async fn redis_conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

/// The leader's process dies (its runtime is dropped: tasks aborted, the
/// lease not given up): the standby leads once the lease runs out, within
/// two leases, and stays ready all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_leader_is_replaced_within_two_leases() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let a = replica(&nats, &redis, "a").await;
    until("a leads", Duration::from_secs(5), || a.is_leader()).await;
    let b = replica(&nats, &redis, "b").await;
    tokio::time::sleep(2 * LEASE).await;
    assert!(a.is_leader() && !b.is_leader(), "one leader, kept by renewal");
    drop(a);
    // Readiness is watched closely while b takes over: gaining leadership
    // must not make a healthy replica look unready for a moment (it did
    // while the broker confirmed the leader handlers' subscriptions).
    let mut unready = Vec::new();
    let died = std::time::Instant::now();
    let mut led = None;
    while led.is_none_or(|at: std::time::Instant| at.elapsed() < Duration::from_millis(500)) {
        assert!(died.elapsed() < 3 * LEASE, "b leads: not within {:?}", 3 * LEASE);
        if led.is_none() && b.is_leader() {
            led = Some(std::time::Instant::now());
            let took = died.elapsed();
            assert!(took < 2 * LEASE, "took over after {took:?}");
        }
        let r = b.readiness();
        if !r.ready {
            unready.push(r.failing);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(
        unready.is_empty(),
        "b looked unready while it took over: {unready:?}"
    );
    b.shutdown().await.expect("clean shutdown");
}

/// The leader stalls with a job in hand past its lease (here: its lease
/// key is deleted, as when it ran out); another grant follows, and when
/// the stalled handler goes on, its save is refused: nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_leaders_write_is_fenced() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let a = replica(&nats, &redis, "a").await;
    until("a leads", Duration::from_secs(5), || a.is_leader()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let key = held_job(&a.client()).await;
    // The lease runs out under the stalled leader.
    let mut conn = redis_conn(&redis).await;
    let deleted: u64 = redis::cmd("DEL")
        .arg("catga:{leaders}:leader")
        .query_async(&mut conn)
        .await
        .expect("DEL");
    assert_eq!(deleted, 1, "the lease key is where the store keeps it");
    let b = replica(&nats, &redis, "b").await;
    until("a steps down", 3 * LEASE, || !a.is_leader()).await;
    until("someone leads again", 3 * LEASE, || {
        a.is_leader() || b.is_leader()
    })
    .await;
    // The stalled handler goes on: its save carries the old token.
    go(&key);
    let (by, outcome) = save_of(&key).await;
    assert_eq!(by, "a");
    let err = outcome.as_ref().expect_err("fenced");
    assert!(err.contains("fenced"), "{err}");
    let effects = EFFECTS.lock().expect("effects").clone();
    let (_, published, sent) = effects.iter().find(|(k, _, _)| *k == key).expect("the effects");
    for (what, outcome) in [("publish", published), ("send", sent)] {
        let err = outcome.as_ref().expect_err(what);
        assert!(err.contains("fenced"), "{what}: {err}");
    }
    let backlog: u64 = redis::cmd("XLEN")
        .arg("catga:{leaders}:outbox")
        .query_async(&mut conn)
        .await
        .expect("XLEN");
    assert_eq!(backlog, 0, "nothing reached the outbox");
    let stored: Option<String> = redis::cmd("HGET")
        .arg(format!("catga:{{leaders}}:state:done:{key}"))
        .arg("d")
        .query_async(&mut conn)
        .await
        .expect("HGET");
    assert!(stored.is_none(), "nothing written: {stored:?}");
    a.shutdown().await.expect("clean shutdown");
    b.shutdown().await.expect("clean shutdown");
}

/// A step of the sagas below: adds one to counter `key` in the store, once
/// per message id, after a short pause (so that sagas are in flight).
#[catga::command(reply = u64, subject = "tests.leader.bump", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Bump {
    /// The counter.
    pub key: String,
}

/// Reads counter `key`.
#[catga::command(reply = u64, subject = "tests.leader.count")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Count {
    /// The counter.
    pub key: String,
}

/// A counter in the store.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Counter {
    /// Its value.
    pub n: u64,
}

impl State for Counter {
    const KIND: &'static str = "counter";
}

/// Starts a saga of four steps.
#[event(subject = "tests.leader.order")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Order {
    /// The saga's counters' prefix.
    pub id: String,
}

#[catga::command(retry = 20)]
async fn bump(ctx: &Context, b: Bump) -> Result<u64> {
    tokio::time::sleep(Duration::from_millis(60)).await;
    let mut c = ctx
        .try_load::<Counter>(&b.key)
        .await?
        .unwrap_or_else(|| Versioned::new(b.key.clone(), Counter::default()));
    c.n += 1;
    Ok(ctx.save(c).await?.n)
}

#[catga::command]
async fn count(ctx: &Context, c: Count) -> Result<u64> {
    Ok(ctx.try_load::<Counter>(&c.key).await?.map_or(0, |c| c.n))
}

#[catga::saga(leader, concurrency = 2)]
async fn order_saga(saga: &catga::Saga, o: Order) -> Result<()> {
    for step in ["one", "two", "three", "done"] {
        saga.step(
            step,
            Bump {
                key: format!("{}:{step}", o.id),
            },
        )
        .await?;
    }
    Ok(())
}

/// The leader dies (its runtime dropped: tasks aborted, connections gone,
/// the lease not given up) with sagas in flight: the standby takes the
/// lease, the unacknowledged triggers come back to it, and every saga ends
/// with each step applied exactly once (counters in Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_survive_the_leaders_crash() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let start = |id: &'static str| {
        Runtime::builder()
            .service("leaders")
            .instance_id(id)
            .nats_url(nats.url())
            .redis_url(redis.url())
            .leader_lease(LEASE)
            .durable_defaults(Duration::from_millis(800), 50)
            .inbox(Duration::from_secs(600), Duration::from_millis(600))
            .retry_base(Duration::from_millis(20))
            .handlers(|s| ["leader::bump", "leader::count", "leader::order_saga"].contains(&s.name()))
            .start()
    };
    let a = start("a").await.expect("a starts");
    until("a leads", Duration::from_secs(5), || a.is_leader()).await;
    let b = start("b").await.expect("b starts");
    tokio::time::timeout(Duration::from_secs(10), b.ready())
        .await
        .expect("b ready in time")
        .expect("b ready");
    let client = b.client();
    let ids: Vec<String> = (0..20).map(|i| format!("{}-{i}", run_id())).collect();
    for id in &ids {
        client
            .publish_durable(Order { id: id.clone() })
            .await
            .expect("published");
    }
    let counter = |id: &str, step: &str| {
        client.send(Count {
            key: format!("{id}:{step}"),
        })
    };
    // Some sagas finished and one is half done (two run at a time): the
    // leader dies then.
    let started = Instant::now();
    loop {
        let (mut finished, mut half) = (0, 0);
        for id in &ids {
            let first = counter(id, "one").await.expect("count");
            let last = counter(id, "done").await.expect("count");
            finished += last;
            half += u64::from(first == 1 && last == 0);
        }
        if finished >= 3 && half >= 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no saga was half done"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(a);
    until("b leads", 3 * LEASE, || b.is_leader()).await;
    let started = Instant::now();
    for id in &ids {
        while counter(id, "done").await.expect("count") == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "saga {id} did not finish"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for step in ["one", "two", "three", "done"] {
            let n = counter(id, step).await.expect("count");
            assert_eq!(n, 1, "saga {id}, step {step}: applied once");
        }
    }
    b.shutdown().await.expect("clean shutdown");
}

/// A failover to a Redis replica that never saw the last grant, or an
/// eviction, loses the fence key: the next grant's token is still greater
/// than every earlier one (it follows the server's clock), so the old
/// holder's writes stay fenced. With `INCR` alone, the token was issued
/// again and the stalled leader's save went through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fencing_token_is_never_issued_twice_when_the_fence_key_is_lost() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let a = replica(&nats, &redis, "a").await;
    until("a leads", Duration::from_secs(5), || a.is_leader()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let key = held_job(&a.client()).await;
    let mut conn = redis_conn(&redis).await;
    let first: u64 = redis::cmd("GET")
        .arg("catga:{leaders}:leader:fence")
        .query_async(&mut conn)
        .await
        .expect("the fence");
    // The lease and its fence vanish, as after a failover that lost them.
    let _: u64 = redis::cmd("DEL")
        .arg("catga:{leaders}:leader")
        .arg("catga:{leaders}:leader:fence")
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let b = replica(&nats, &redis, "b").await;
    until("someone leads again", 3 * LEASE, || {
        (a.is_leader() || b.is_leader())
            && redis_get(&redis, "catga:{leaders}:leader:fence").is_some_and(|t| t != first)
    })
    .await;
    let second = redis_get(&redis, "catga:{leaders}:leader:fence").expect("a new grant");
    assert!(second > first, "tokens only grow: {first} then {second}");
    go(&key);
    let (_, outcome) = save_of(&key).await;
    let err = outcome.as_ref().expect_err("the stalled leader's save is fenced");
    assert!(err.contains("fenced"), "{err}");
    a.shutdown().await.expect("clean shutdown");
    b.shutdown().await.expect("clean shutdown");
}

fn redis_get(redis: &RedisServer, key: &str) -> Option<u64> {
    let mut c = redis::Client::open(redis.url())
        .expect("redis url")
        .get_connection()
        .expect("redis");
    redis::cmd("GET").arg(key).query(&mut c).expect("GET")
}

/// A Redis that may evict keys under memory pressure would lose fences,
/// leases and idempotency answers: the replica says so, loudly, in its
/// readiness (a warning: it still serves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_redis_is_reported() {
    let nats = NatsServer::start();
    let redis = RedisServer::start_with(false, &["--maxmemory-policy", "allkeys-lru"]);
    let rt = replica(&nats, &redis, "a").await;
    until("an eviction warning", Duration::from_secs(5), || {
        !rt.readiness().warnings.is_empty()
    })
    .await;
    let r = rt.readiness();
    assert!(r.ready, "a warning, not a failure: {r:?}");
    assert!(
        r.warnings[0].contains("allkeys-lru") && r.warnings[0].contains("noeviction"),
        "{:?}",
        r.warnings
    );
    rt.shutdown().await.expect("clean shutdown");
    let plain = RedisServer::start();
    let rt = replica(&nats, &plain, "b").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(rt.readiness().warnings.is_empty(), "{:?}", rt.readiness());
    rt.shutdown().await.expect("clean shutdown");
}

/// The fence key vanishes while the leader still holds its lease (an
/// eviction): the next renewal grants the lease anew with a new token,
/// and the leader's writes go through again, instead of every write being
/// refused while the lease is kept alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_lost_under_a_held_lease_is_granted_anew() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let a = replica(&nats, &redis, "a").await;
    until("a leads", Duration::from_secs(5), || a.is_leader()).await;
    let first = redis_get(&redis, "catga:{leaders}:leader:fence").expect("a fence");
    let mut conn = redis_conn(&redis).await;
    let _: u64 = redis::cmd("DEL")
        .arg("catga:{leaders}:leader:fence")
        .query_async(&mut conn)
        .await
        .expect("DEL");
    until("a new grant", 3 * LEASE, || {
        redis_get(&redis, "catga:{leaders}:leader:fence").is_some_and(|t| t > first)
    })
    .await;
    assert!(a.is_leader(), "still the leader, under a new token");
    let key = run_id();
    a.client()
        .publish(Job {
            key: key.clone(),
            hold: false,
        })
        .await
        .expect("publish");
    let (_, outcome) = save_of(&key).await;
    outcome.expect("saved under the new token");
    a.shutdown().await.expect("clean shutdown");
}
