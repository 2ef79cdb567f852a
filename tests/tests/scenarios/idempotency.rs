//! Idempotent commands and event handlers: one execution per message id,
//! the same answer to every retry, a retry during the first attempt waits
//! for it, and the handler's writes commit with its answer.

use std::time::Duration;

use catga::{Context, Error, ErrorKind, Result, State, Versioned, command, event};
use catga_tests::{Backend, Tally, run_id};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Account {
    pub cents: u64,
}

impl State for Account {
    const KIND: &'static str = "account";
}

/// Adds money, once per message id (its writes in the account's store
/// shard, which the `redis_sharded` runs need).
#[command(reply = u64, subject = "tests.idem.deposit", idempotent, key = account)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Deposit {
    pub account: String,
    pub cents: u64,
    pub hold_ms: u64,
}

/// Reads a balance.
#[command(reply = u64, subject = "tests.idem.balance")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Balance {
    pub account: String,
}

/// Counted by an idempotent event handler.
#[event(subject = "tests.idem.tick")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Tick {
    pub run: String,
}

/// Adds money once per id, holding for a minute on replica `stall_on`.
#[command(reply = u64, subject = "tests.idem.stalling", idempotent, key = account)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct StallingDeposit {
    pub account: String,
    pub cents: u64,
    pub stall_on: String,
}

/// Announces `seq` durably, then fails if asked to (idempotent).
#[command(subject = "tests.idem.announce", idempotent)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Announce {
    pub run: String,
    pub seq: u64,
    pub fail: bool,
}

/// What `Announce` publishes.
#[event(subject = "tests.idem.announced")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Announced {
    pub run: String,
    pub seq: u64,
}

static ANNOUNCED: catga_tests::Recorder = catga_tests::Recorder::new();

static RUNS: Tally = Tally::new();
static TICKS: Tally = Tally::new();

#[command]
async fn deposit(ctx: &Context, d: Deposit) -> Result<u64> {
    RUNS.add(&d.account);
    if d.cents == 0 {
        return Err(Error::invalid("a deposit needs an amount"));
    }
    tokio::time::sleep(Duration::from_millis(d.hold_ms)).await;
    let mut account = ctx
        .try_load::<Account>(&d.account)
        .await?
        .unwrap_or_else(|| Versioned::new(d.account.clone(), Account::default()));
    account.cents += d.cents;
    Ok(ctx.save(account).await?.cents)
}

#[command]
async fn stalling_deposit(ctx: &Context, d: StallingDeposit) -> Result<u64> {
    RUNS.add(&d.account);
    if ctx.instance_id() == d.stall_on {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
    let mut account = ctx
        .try_load::<Account>(&d.account)
        .await?
        .unwrap_or_else(|| Versioned::new(d.account.clone(), Account::default()));
    account.cents += d.cents;
    Ok(ctx.save(account).await?.cents)
}

#[command]
async fn announce(ctx: &Context, a: Announce) -> Result<()> {
    ctx.publish_durable(Announced {
        run: a.run.clone(),
        seq: a.seq,
    })
    .await?;
    if a.fail {
        return Err(Error::invalid("refused after announcing"));
    }
    Ok(())
}

#[event(durable = "idem-announced")]
async fn on_announced(ctx: &Context, a: Announced) -> Result<()> {
    ANNOUNCED.record(&a.run, "announced", ctx, a.seq);
    Ok(())
}

#[command]
async fn balance(ctx: &Context, b: Balance) -> Result<u64> {
    Ok(ctx.try_load::<Account>(&b.account).await?.map_or(0, |a| a.cents))
}

#[event(idempotent)]
async fn on_tick(t: Tick) -> Result<()> {
    TICKS.add(&t.run);
    Ok(())
}

catga_tests::on_every_store!(
    a_repeated_id_runs_once,
    a_retry_while_the_first_runs_waits_for_it,
    a_handler_outliving_its_lease_keeps_its_claim,
    client_errors_are_remembered,
    idempotent_event_handlers_run_once_per_id,
    a_used_id_under_another_payload_is_a_conflict,
    a_durable_publish_leaves_with_the_commit_or_not_at_all,
    a_dead_replicas_claims_lapse_within_about_a_second,
    a_cancelled_attempt_gives_its_claim_up
);

async fn a_repeated_id_runs_once(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let account = run_id();
    let d = Deposit {
        account: account.clone(),
        cents: 100,
        hold_ms: 0,
    };
    assert_eq!(client.send_with_id(d.clone(), "dep-1").await.expect("first"), 100);
    assert_eq!(
        client.send_with_id(d.clone(), "dep-1").await.expect("again"),
        100,
        "the same answer"
    );
    assert_eq!(RUNS.get(&account), 1, "ran once");
    assert_eq!(
        client
            .send(Balance {
                account: account.clone()
            })
            .await
            .expect("balance"),
        100
    );
    // `send` attaches a fresh id: a second send is a second deposit.
    assert_eq!(client.send(d.clone()).await.expect("new id"), 200);
    assert_eq!(client.send(d).await.expect("new id"), 300);
    assert_eq!(RUNS.get(&account), 3);
    rt.shutdown().await.expect("clean shutdown");
}

async fn a_retry_while_the_first_runs_waits_for_it(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let account = run_id();
    let d = Deposit {
        account: account.clone(),
        cents: 7,
        hold_ms: 600,
    };
    let first = {
        let (c, d) = (client.clone(), d.clone());
        tokio::spawn(async move { c.send_with_id(d, "slow-1").await })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = client
        .send_with_id(d, "slow-1")
        .await
        .expect("the retry gets the answer");
    let first = first.await.expect("task").expect("the first attempt");
    assert_eq!((first, second), (7, 7));
    assert_eq!(RUNS.get(&account), 1, "one execution");
    rt.shutdown().await.expect("clean shutdown");
}

/// A claim holds while its replica is alive (its liveness key, renewed
/// every third of the lease), however long the handler runs: a retry that
/// comes after two leases but before the answer still waits for it
/// instead of running the message again.
async fn a_handler_outliving_its_lease_keeps_its_claim(b: &Backend) {
    let mut replicas = Vec::new();
    for i in 1..=2 {
        let builder = b
            .builder(module_path!(), &format!("r{i}"))
            .inbox(Duration::from_secs(60), Duration::from_millis(300));
        replicas.push(b.started(builder).await);
    }
    let client = b.client().await;
    let account = run_id();
    let d = Deposit {
        account: account.clone(),
        cents: 5,
        hold_ms: 1500,
    };
    let first = {
        let (c, d) = (client.clone(), d.clone());
        tokio::spawn(async move { c.send_with_id(d, "long-1").await })
    };
    // Past two leases: without renewal the claim would have lapsed.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let second = client
        .send_with_id(d, "long-1")
        .await
        .expect("the retry gets the answer");
    let first = first.await.expect("task").expect("the first attempt");
    assert_eq!((first, second), (5, 5));
    assert_eq!(RUNS.get(&account), 1, "one execution");
    catga_tests::backend::shutdown_all(replicas).await;
}

async fn client_errors_are_remembered(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let account = run_id();
    let d = Deposit {
        account: account.clone(),
        cents: 0,
        hold_ms: 0,
    };
    for _ in 0..2 {
        let err = client.send_with_id(d.clone(), "zero").await.expect_err("invalid");
        assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
        assert!(err.message().contains("needs an amount"), "{err}");
    }
    assert_eq!(RUNS.get(&account), 1, "the answer was remembered, not recomputed");
    rt.shutdown().await.expect("clean shutdown");
}

async fn idempotent_event_handlers_run_once_per_id(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let run = run_id();
    for _ in 0..3 {
        client
            .publish_with_id(Tick { run: run.clone() }, &format!("{run}-a"))
            .await
            .expect("publish");
    }
    client
        .publish_with_id(Tick { run: run.clone() }, &format!("{run}-b"))
        .await
        .expect("publish");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while TICKS.get(&run) < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(TICKS.get(&run), 2, "once per id");
    rt.shutdown().await.expect("clean shutdown");
}

/// An id answers the payload it was first sent with: the same id under a
/// different payload (a forged or buggy retry) is refused as a conflict,
/// while the first answer stays for real retries.
async fn a_used_id_under_another_payload_is_a_conflict(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let account = run_id();
    let d = |cents| Deposit {
        account: account.clone(),
        cents,
        hold_ms: 0,
    };
    assert_eq!(client.send_with_id(d(10), "pay-1").await.expect("first"), 10);
    let err = client
        .send_with_id(d(99), "pay-1")
        .await
        .expect_err("another payload under a used id");
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    assert!(err.message().contains("another payload"), "{err}");
    assert!(!err.is_retryable());
    assert_eq!(client.send_with_id(d(10), "pay-1").await.expect("retry"), 10);
    assert_eq!(RUNS.get(&account), 1, "ran once");
    rt.shutdown().await.expect("clean shutdown");
}

/// A replica dies (its runtime dropped: every task aborted, nothing given
/// up) while it handles an idempotent command: a retry on another replica
/// runs it about a lease (`CATGA_INBOX_LEASE_MS`, 1 s) later, not after a
/// per-message lease.
async fn a_dead_replicas_claims_lapse_within_about_a_second(b: &Backend) {
    let r1 = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let account = run_id();
    let d = StallingDeposit {
        account: account.clone(),
        cents: 3,
        stall_on: "r1".into(),
    };
    let first = stalled(&client, &d, "crash-1").await;
    let r2 = b.runtime(module_path!(), "r2").await;
    let crashed = std::time::Instant::now();
    drop(r1);
    first.abort();
    // A request sent the moment r1 died may still reach its subscription
    // (the broker drops it a moment later) and go unanswered: the sender
    // retries after its time-out, as after a real crash.
    let client = client.with_request_timeout(Duration::from_millis(800));
    let answer = loop {
        match client.send_with_id(d.clone(), "crash-1").await {
            Ok(answer) => break answer,
            Err(e) if e.is_retryable() && crashed.elapsed() < Duration::from_secs(10) => {}
            Err(e) => panic!("the retry runs it: {e}"),
        }
    };
    let waited = crashed.elapsed();
    assert_eq!(answer, 3);
    assert_eq!(RUNS.get(&account), 2, "run again once, on r2");
    assert!(
        waited < Duration::from_millis(3000),
        "the dead replica's claim held the retry for {waited:?}"
    );
    r2.shutdown().await.expect("clean shutdown");
}

/// `publish_durable` in an idempotent handler leaves with the handler's
/// commit: a handler that fails after publishing publishes nothing.
/// Before, it was stored at once, for a message that then failed.
async fn a_durable_publish_leaves_with_the_commit_or_not_at_all(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let run = run_id();
    let a = |seq, fail| Announce {
        run: run.clone(),
        seq,
        fail,
    };
    let err = client.send(a(1, true)).await.expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    client.send(a(2, false)).await.expect("announced");
    let seen = ANNOUNCED.wait_for(&run, 1, crate::WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seqs: Vec<u64> = ANNOUNCED.of(&run).iter().map(|r| r.seq).collect();
    assert_eq!(seqs, [2], "only the committed one: {seen:?}");
    rt.shutdown().await.expect("clean shutdown");
}

/// An attempt cancelled half way on a replica that lives on (its handler
/// stopped, the drain deadline passed) gives its claim up: a retry on
/// another replica runs the message at once, instead of being told "busy"
/// for as long as the first replica lives.
async fn a_cancelled_attempt_gives_its_claim_up(b: &Backend) {
    let r1 = b
        .started(
            b.builder(module_path!(), "r1")
                .drain_timeout(Duration::from_millis(200)),
        )
        .await;
    let client = b.client().await;
    let account = run_id();
    let d = StallingDeposit {
        account: account.clone(),
        cents: 4,
        stall_on: "r1".into(),
    };
    let first = stalled(&client, &d, "cancel-1").await;
    let name = r1
        .serving()
        .await
        .into_iter()
        .find(|h| h.ends_with("::stalling_deposit"))
        .expect("served");
    let err = r1
        .stop_handler(name)
        .await
        .expect_err("cancelled at the drain deadline");
    assert!(err.message().contains("cancelled"), "{err}");
    first.abort();
    let r2 = b.runtime(module_path!(), "r2").await;
    let started = std::time::Instant::now();
    let answer = client
        .with_request_timeout(Duration::from_secs(3))
        .send_with_id(d, "cancel-1")
        .await
        .expect("the retry runs it");
    assert_eq!(answer, 4);
    assert_eq!(RUNS.get(&account), 2, "run again once, on r2");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "waited {:?}",
        started.elapsed()
    );
    assert!(r1.is_ready(), "r1 lives on");
    r2.shutdown().await.expect("clean shutdown");
    // Its 200 ms drain is shorter than a NATS hand-over wait: cut short.
    let _ = r1.shutdown().await;
}

/// Sends `d` under `id` from a task of its own and waits until its handler
/// started (and stalls, on the replica `d` names).
async fn stalled(
    client: &catga::Client,
    d: &StallingDeposit,
    id: &'static str,
) -> tokio::task::JoinHandle<catga::Result<u64>> {
    let first = {
        let (c, d) = (client.clone(), d.clone());
        tokio::spawn(async move { c.send_with_id(d, id).await })
    };
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while RUNS.get(&d.account) == 0 {
        assert!(
            tokio::time::Instant::now() < until,
            "the first attempt never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first
}

/// A store failover can bring back a claim whose end its live replica
/// had written (Redis replicates asynchronously; the fault simulator
/// found it). Such a claim names a replica that lives, so the replica
/// the message comes to next finds it busy for as long as that one
/// lives. It now tells the claimer, which finds that nothing in it holds
/// the claim and gives it up: the retry runs once, within an inbox lease
/// or so. Here the claimer serves no deposits, so only the doubt can
/// free the message; the claim is the one the failover would bring back
/// (this payload's digest, an attempt the claimer no longer runs), in
/// the account's shard.
async fn a_claim_a_failover_brought_back_is_given_up_for_another_replica(b: &Backend) {
    let lease = Duration::from_millis(600);
    let claimer = b
        .started(
            b.builder(module_path!(), "claimer")
                .handlers(|s| s.name().ends_with("::balance"))
                .inbox(Duration::from_secs(60), lease),
        )
        .await;
    let server = b
        .started(
            b.builder(module_path!(), "server")
                .handlers(|s| s.name().ends_with("::deposit"))
                .inbox(Duration::from_secs(60), lease),
        )
        .await;
    let client = b.client().await;
    let account = run_id();
    let first = Deposit {
        account: account.clone(),
        cents: 1,
        hold_ms: 0,
    };
    assert_eq!(client.send(first).await.expect("a first deposit"), 1);
    // The account's shard: the node and key prefix its state is under.
    let urls = match b {
        Backend::Nats(_, redis) => vec![redis.url()],
        Backend::RedisCluster(_, cluster, _) => cluster.urls(),
        _ => unreachable!("a backend with Redis"),
    };
    let mut found = None;
    for url in urls {
        let mut con = redis::Client::open(url)
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        let states: Vec<String> = redis::cmd("KEYS")
            .arg(format!("*:state:account:{account}"))
            .query_async(&mut con)
            .await
            .expect("state keys");
        if let [state] = states.as_slice() {
            let prefix = state.split_once(":state:").expect("a state key").0.to_owned();
            found = Some((con, prefix));
        }
    }
    let (mut con, prefix) = found.expect("the account's state in one shard");
    // The claimer's name, from its liveness key in that shard.
    let alive: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:alive:claimer/*"))
        .query_async(&mut con)
        .await
        .expect("liveness keys");
    let [alive] = alive.as_slice() else {
        panic!("one liveness key for the claimer: {alive:?}")
    };
    let member = alive.split_once(":alive:").expect("a liveness key").1;
    let d = Deposit {
        account: account.clone(),
        cents: 9,
        hold_ms: 0,
    };
    let payload = serde_json::to_vec(&d).expect("json");
    let digest: String = ring::digest::digest(&ring::digest::SHA256, &payload)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let id = "brought-back-1";
    let () = redis::cmd("SET")
        .arg(format!("{prefix}:inbox:tests.idem.deposit:{id}"))
        .arg(format!("P:{digest}:an-attempt-long-finished:{member}"))
        .arg("PX")
        .arg(60_000)
        .query_async(&mut con)
        .await
        .expect("the claim a failover brought back");
    let started = std::time::Instant::now();
    let answer = client
        .send_with_id(d.clone(), id)
        .await
        .expect("answered once the claimer gave its claim up");
    let waited = started.elapsed();
    assert_eq!(answer, 10);
    assert_eq!(
        client.send_with_id(d, id).await.expect("a retry"),
        10,
        "the retry gets the same answer"
    );
    assert_eq!(RUNS.get(&account), 2, "each deposit ran once");
    assert!(
        waited < Duration::from_secs(3),
        "freed about an inbox lease after the wait began, not when the claimer stops: {waited:?}"
    );
    server.shutdown().await.expect("clean shutdown");
    claimer.shutdown().await.expect("clean shutdown");
}

/// On one Redis server and in 3 shards of a Redis Cluster: the claims
/// are forged in the store (the embedded store's failovers are the
/// simulator's, in `simulation::a_store_failover_loses_writes_but_does_nothing_twice`).
mod brought_back {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats() {
        super::a_claim_a_failover_brought_back_is_given_up_for_another_replica(&catga_tests::Backend::nats())
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_sharded() {
        super::a_claim_a_failover_brought_back_is_given_up_for_another_replica(
            &catga_tests::Backend::redis_sharded(),
        )
        .await;
    }
}

/// The other side of the doubt: a claim whose attempt still runs is kept,
/// however often replicas that find it busy doubt it. The claimer's
/// deposit holds for longer than six of its looks at its doubts while
/// retries of it land on both replicas (with eight of them, all on the
/// claimer is a 1 in 256 chance); every retry gets the first answer and
/// the deposit runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_its_replica_still_runs_is_kept_when_another_doubts_it() {
    let b = Backend::nats();
    let lease = Duration::from_millis(600);
    let deposits = |instance: &str| {
        b.builder(module_path!(), instance)
            .handlers(|s| s.name().ends_with("::deposit"))
            .inbox(Duration::from_secs(60), lease)
    };
    // Alone at first, so that the first attempt is the claimer's.
    let claimer = b.started(deposits("claimer")).await;
    let client = b.client().await;
    let account = run_id();
    let d = Deposit {
        account: account.clone(),
        cents: 4,
        hold_ms: 2500,
    };
    let first = {
        let (c, d) = (client.clone(), d.clone());
        tokio::spawn(async move { c.send_with_id(d, "held-1").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let other = b.started(deposits("other")).await;
    let retries: Vec<_> = (0..8)
        .map(|_| {
            let (c, d) = (client.clone(), d.clone());
            tokio::spawn(async move { c.send_with_id(d, "held-1").await })
        })
        .collect();
    assert_eq!(first.await.expect("task").expect("the first attempt"), 4);
    for retry in retries {
        assert_eq!(
            retry.await.expect("task").expect("a retry waits for the first"),
            4
        );
    }
    assert_eq!(RUNS.get(&account), 1, "the deposit ran once");
    other.shutdown().await.expect("clean shutdown");
    claimer.shutdown().await.expect("clean shutdown");
}
