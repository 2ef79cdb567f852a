//! catga on a 3-node nats-server cluster with JetStream: replicas
//! connected to different nodes, the node of one of them SIGKILLed while
//! commands and durable events flow. The replica reconnects to another
//! node, commands keep being answered, and durable events in streams with
//! 3 replicas are all handled, each once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use catga::{Client, Context, Result, Runtime, StreamSettings, command, event};
use catga_tests::{NatsCluster, Recorder, RedisServer, run_id};
use serde::{Deserialize, Serialize};

/// Answered by whichever replica takes it.
#[command(reply = String, subject = "cluster.ping")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Ping;

/// A durable event.
#[event(subject = "cluster.tick")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Tick {
    /// The run.
    pub run: String,
    /// Its number.
    pub seq: u64,
}

static TICKS: Recorder = Recorder::new();

#[command(queue_group = "pingers")]
async fn ping(ctx: &Context, _p: Ping) -> Result<String> {
    Ok(ctx.instance_id().to_owned())
}

#[event(durable = "cluster-ticks", idempotent)]
async fn tick(ctx: &Context, t: Tick) -> Result<()> {
    TICKS.record(&t.run, "tick", ctx, t.seq);
    Ok(())
}

async fn replica(nats_url: &str, redis: &RedisServer, id: &str) -> Runtime {
    let rt = Runtime::builder()
        .nats_url(nats_url)
        .redis_url(redis.url())
        .instance_id(id)
        .durable_defaults(Duration::from_secs(2), 20)
        .streams(StreamSettings {
            replicas: 3,
            ..StreamSettings::default()
        })
        .handlers(|s| matches!(s.name(), "cluster::ping" | "cluster::tick"))
        .start()
        .await
        .expect("starts");
    catga_tests::ready_within(&rt, Duration::from_secs(30)).await;
    rt
}

/// Retries a raw JetStream read for up to 30 s (the cluster elects
/// leaders after a node died); panics naming `what` past that.
async fn js_retry<T, E: std::fmt::Display, Fut: std::future::Future<Output = std::result::Result<T, E>>>(
    what: &str,
    op: impl Fn() -> Fut,
) -> T {
    match js_retry_unless(what, None, op).await {
        Some(v) => v,
        None => unreachable!("no error is an answer"),
    }
}

/// [`js_retry`], except that an error whose text contains `answer` is an
/// answer: `None`.
async fn js_retry_unless<
    T,
    E: std::fmt::Display,
    Fut: std::future::Future<Output = std::result::Result<T, E>>,
>(
    what: &str,
    answer: Option<&str>,
    op: impl Fn() -> Fut,
) -> Option<T> {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) if answer.is_some_and(|a| e.to_string().contains(a)) => return None,
            Err(e) if Instant::now() < until => {
                eprintln!("{what}: {e}; again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Retries what a node failure causes, for up to 15 s.
async fn retrying<T, Fut: std::future::Future<Output = Result<T>>>(op: impl Fn() -> Fut) -> Result<T> {
    let until = Instant::now() + Duration::from_secs(15);
    loop {
        match op().await {
            Err(e) if e.is_retryable() && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_under_load_loses_nothing() {
    let mut cluster = NatsCluster::start();
    let redis = RedisServer::start();
    // r1 knows only node 0 (it learns the others from the cluster); r2 is
    // given nodes 1 and 2 (async-nats picks among them at random), so the
    // two replicas sit on different nodes.
    let n = &cluster.nodes;
    let r1 = replica(&n[0].url(), &redis, "r1").await;
    let r2 = replica(&format!("{},{}", n[1].url(), n[2].url()), &redis, "r2").await;
    let client = Client::connect(&n[2].url())
        .await
        .expect("client")
        .with_request_timeout(Duration::from_secs(2));
    let run = run_id();

    // Load: 8 pingers and one publisher of durable ticks, until stopped.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let pingers: Vec<_> = (0..8)
        .map(|_| {
            let (client, stop, answered) = (client.clone(), stop.clone(), answered.clone());
            tokio::spawn(async move {
                let mut by = BTreeSet::new();
                while !stop.load(Ordering::Relaxed) {
                    let who = retrying(|| client.send(Ping)).await.expect("every ping answered");
                    answered.fetch_add(1, Ordering::Relaxed);
                    by.insert(who);
                }
                by
            })
        })
        .collect();
    let publisher = {
        let (client, stop, run) = (client.clone(), stop.clone(), run.clone());
        tokio::spawn(async move {
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                // Under one id per tick: a publish whose acknowledgement
                // was lost when the node died is stored already, and its
                // retry must be a repeat, not a second event (it was
                // handled twice once: 354 runs for 353 ticks).
                let id = format!("{run}-{seq}");
                retrying(|| {
                    client.publish_durable_with_id(
                        Tick {
                            run: run.clone(),
                            seq,
                        },
                        &id,
                    )
                })
                .await
                .expect("every tick stored");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            seq
        })
    };

    tokio::time::sleep(Duration::from_millis(800)).await;
    let before = answered.load(Ordering::Relaxed);
    cluster.nodes[0].kill();
    let killed_at = Instant::now();
    // r1 reconnects through another node and serves again.
    tokio::time::timeout(Duration::from_secs(15), r1.ready())
        .await
        .expect("r1 back within 15 s")
        .expect("ready");
    eprintln!(
        "r1 ready again {:?} after its node was killed",
        killed_at.elapsed()
    );
    let mut trace = Vec::new();
    for _ in 0..24 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        trace.push(answered.load(Ordering::Relaxed));
    }
    eprintln!("answered every 250 ms after the kill: {trace:?}");
    let after = answered.load(Ordering::Relaxed);
    // The replica on the surviving node goes on answering; what was in
    // flight at r1 waits for its time-out (2 s) and is retried. Answers
    // may pause while the pingers wait on r1 (all 8 at once, or the host
    // busy with the rest of the suite: a full run once paused 1.5 s), but
    // never past the time-out and a margin: that bound is what a replica
    // that did not recover, or a lost subscription, would break.
    let stalled = trace.windows(2).filter(|w| w[0] == w[1]).count();
    assert!(
        stalled <= 10,
        "answers stalled for {stalled} quarter seconds: {trace:?}"
    );
    stop.store(true, Ordering::Relaxed);
    let mut served_by = BTreeSet::new();
    for p in pingers {
        served_by.extend(p.await.expect("pinger"));
    }
    let published = publisher.await.expect("publisher");
    assert!(
        before > 50 && after > before + 50,
        "pings kept flowing: {before} then {after}"
    );
    assert_eq!(served_by.len(), 2, "both replicas answered: {served_by:?}");

    // Every tick stored is handled, once.
    let seen = TICKS
        .wait_for(&run, published as usize, Duration::from_secs(30))
        .await;
    let seqs: BTreeSet<u64> = seen.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=published).collect(), "no durable event lost");
    assert_eq!(seen.len(), published as usize, "each handled once");
    eprintln!("{published} durable events, {after} pings, while a node died");

    r1.shutdown().await.expect("r1 shutdown");
    r2.shutdown().await.expect("r2 shutdown");
    cluster.nodes[0].resume();
}

/// A deposit to an account, sent under an id of its own (idempotent: a
/// retry after a lost reply gets the first answer).
#[command(subject = "cluster.deposit", idempotent)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Deposit {
    /// The run.
    pub run: String,
    /// The account.
    pub account: String,
    /// Its number among the account's deposits.
    pub seq: u64,
}

/// Saved with the account's state: goes out through the outbox.
#[event(subject = "cluster.deposited")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Deposited {
    /// The run.
    pub run: String,
    /// The account.
    pub account: String,
    /// Its number among the account's deposits.
    pub seq: u64,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct Account {
    deposits: u64,
}

impl catga::State for Account {
    const KIND: &'static str = "cluster-account";
}

#[command(queue_group = "accounts", retry = 5)]
async fn deposit(ctx: &Context, d: Deposit) -> Result<()> {
    let key = format!("{}/{}", d.run, d.account);
    let mut account = match ctx.try_load::<Account>(&key).await? {
        Some(a) => a,
        None => catga::Versioned::new(key, Account::default()),
    };
    account.deposits += 1;
    ctx.save(account)
        .with_event(Deposited {
            run: d.run,
            account: d.account,
            seq: d.seq,
        })
        .await?;
    Ok(())
}

/// (run, account) -> the seqs whose saga ran, in the order they ran.
static BOOKED: std::sync::Mutex<std::collections::BTreeMap<(String, String), Vec<u64>>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

#[catga::saga(key = account, partitions = 4, concurrency = 4)]
async fn book(_saga: &catga::Saga, e: Deposited) -> Result<()> {
    BOOKED
        .lock()
        .expect("booked")
        .entry((e.run, e.account))
        .or_default()
        .push(e.seq);
    Ok(())
}

/// Sends deposit `seq` of `account` until it is answered, for up to 60 s
/// while the answer is a retryable error (a node dying), under one id.
async fn deposit_until_answered(client: &Client, run: &str, account: &str, seq: u64) {
    let id = format!("{run}-{account}-{seq}");
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let d = Deposit {
            run: run.to_owned(),
            account: account.to_owned(),
            seq,
        };
        match client.send_with_id(d, &id).await {
            Ok(()) => return,
            Err(e) if e.is_retryable() && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("deposit {id} failed for good: {e}"),
        }
    }
}

/// A plain async-nats JetStream context on every node of `cluster`.
async fn raw_jetstream(cluster: &NatsCluster) -> async_nats::jetstream::Context {
    let urls: Vec<async_nats::ServerAddr> = cluster
        .nodes
        .iter()
        .map(|n| n.url().parse().expect("a server address"))
        .collect();
    let nc = async_nats::connect(urls.as_slice()).await.expect("nats");
    async_nats::jetstream::new(nc)
}

/// Waits until `runtime`'s outbox is empty, failing after `within`.
async fn outbox_empties(runtime: &Runtime, within: Duration) {
    let until = Instant::now() + within;
    loop {
        let backlog = runtime.outbox_backlog().await.unwrap_or(u64::MAX);
        if backlog == 0 {
            return;
        }
        assert!(Instant::now() < until, "the outbox still holds {backlog} entries");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `Deposited` events of run `run` in the stream of
/// `cluster.deposited`, per account, in the stream's order. The cluster
/// may still be electing leaders after a node died: each read is retried
/// while it times out.
async fn deposited_in_stream(
    js: &async_nats::jetstream::Context,
    run: &str,
) -> std::collections::BTreeMap<String, Vec<u64>> {
    let name = js_retry("a stream stores the events", || {
        js.stream_by_subject("cluster.deposited")
    })
    .await;
    let stream = js_retry("the stream", || js.get_stream(&name)).await;
    let last = js_retry("its info", || {
        let mut stream = stream.clone();
        async move { stream.info().await.map(|i| i.state.last_sequence) }
    })
    .await;
    let mut in_stream: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for seq in 1..=last {
        let got = js_retry_unless("a stored event", Some("no message found"), || {
            stream.get_raw_message(seq)
        })
        .await;
        let Some(m) = got else {
            continue;
        };
        let e: Deposited = serde_json::from_slice(&m.payload).expect("an event");
        if e.run == run {
            in_stream.entry(e.account).or_default().push(e.seq);
        }
    }
    in_stream
}

async fn accounts_replica(nats_url: &str, redis: &RedisServer, id: &str) -> Runtime {
    let rt = Runtime::builder()
        .service("cluster-accounts")
        .nats_url(nats_url)
        .redis_url(redis.url())
        .instance_id(id)
        .durable_defaults(Duration::from_secs(2), 1000)
        // The saga's partitions over 3 streams, whose leaders JetStream
        // places one by one (usually on different nodes): the router's
        // copies chain per stream while nodes die.
        .streams(StreamSettings {
            replicas: 3,
            saga_streams: 3,
            ..StreamSettings::default()
        })
        .handlers(|s| matches!(s.name(), "cluster::deposit" | "cluster::book"))
        .start()
        .await
        .expect("starts");
    catga_tests::ready_within(&rt, Duration::from_secs(30)).await;
    rt
}

/// Events saved with state, on a 3-node cluster whose nodes are SIGKILLed
/// one after another while accounts take deposits: every committed
/// deposit's event is stored in its stream once, each account's events in
/// the order of its deposits, and the keyed saga runs each account's
/// events in that order. Before the outbox relayed to streams only, a
/// lookup answered "no stream" while a node restarted, and the events of
/// the next 10 s went to core NATS, out of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_saved_with_state_reach_their_stream_in_order_while_nodes_die() {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
        .with_writer(std::io::stderr)
        .try_init();
    let mut cluster = NatsCluster::start();
    let redis = RedisServer::start_persistent();
    let n = &cluster.nodes;
    let r1 = accounts_replica(&n[0].url(), &redis, "a1").await;
    let r2 = accounts_replica(&format!("{},{}", n[1].url(), n[2].url()), &redis, "a2").await;
    let client = Client::connect(&cluster.url())
        .await
        .expect("client")
        .with_request_timeout(Duration::from_secs(2));
    let run = run_id();
    const ACCOUNTS: usize = 6;

    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..ACCOUNTS)
        .map(|a| {
            let (client, stop, run) = (client.clone(), stop.clone(), run.clone());
            tokio::spawn(async move {
                let account = format!("acct-{a}");
                let mut seq = 0;
                // At most 1,500 deposits an account: under load for the
                // whole schedule of kills on this host, and few enough for
                // the sagas to catch up in bounded time.
                while !stop.load(Ordering::Relaxed) && seq < 1500 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    seq += 1;
                    deposit_until_answered(&client, &run, &account, seq).await;
                }
                (account, seq)
            })
        })
        .collect();

    // Kill each node in turn under load, and bring it back.
    for round in 0..4 {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let node = round % 3;
        cluster.nodes[node].kill();
        eprintln!("killed node {node}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.nodes[node].resume();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = std::collections::BTreeMap::new();
    for s in senders {
        let (account, last) = s.await.expect("sender");
        sent.insert(account, last);
    }
    let total: u64 = sent.values().sum();
    eprintln!("{total} deposits committed and answered: {sent:?}");
    assert!(total > 100, "the load ran: {sent:?}");

    // The outbox empties.
    outbox_empties(&r1, Duration::from_secs(60)).await;

    // Read the stream: every deposit's event once, each account's in order.
    let js = raw_jetstream(&cluster).await;
    let in_stream = deposited_in_stream(&js, &run).await;
    for (account, last) in &sent {
        // The last send of each account may have been cut short by the
        // stop: it is in the stream or not, but never out of order.
        let got = in_stream.get(account).cloned().unwrap_or_default();
        let expected: Vec<u64> = (1..=*last).collect();
        let answered: Vec<u64> = (1..*last).collect();
        assert!(
            got == expected || got == answered,
            "{account}: the stream holds {} events for {last} deposits; out of order or missing: {:?}",
            got.len(),
            got.iter()
                .zip(1..)
                .filter(|(g, i)| **g != *i)
                .take(10)
                .collect::<Vec<_>>()
        );
    }

    // The keyed saga ran each account's events in the stream's order.
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let booked = BOOKED.lock().expect("booked").clone();
        let done = in_stream.iter().all(|(account, events)| {
            booked
                .get(&(run.clone(), account.clone()))
                .is_some_and(|b| b.iter().collect::<BTreeSet<_>>().len() >= events.len())
        });
        if done || Instant::now() >= until {
            if !done {
                // Where the sagas stopped: every consumer's position.
                use futures_util::TryStreamExt;
                if let Ok(names) = js.stream_names().try_collect::<Vec<String>>().await {
                    for name in names {
                        let Ok(stream) = js.get_stream(&name).await else {
                            continue;
                        };
                        let Ok(consumers) = stream.consumers().try_collect::<Vec<_>>().await else {
                            continue;
                        };
                        for c in consumers {
                            eprintln!(
                                "consumer {name}/{}: pending {} ack pending {} redelivered {} delivered {:?} ack floor {:?} waiting {}",
                                c.name,
                                c.num_pending,
                                c.num_ack_pending,
                                c.num_redelivered,
                                c.delivered.stream_sequence,
                                c.ack_floor.stream_sequence,
                                c.num_waiting
                            );
                        }
                    }
                }
                let booked = BOOKED.lock().expect("booked").clone();
                for (account, events) in &in_stream {
                    let ran = booked.get(&(run.clone(), account.clone())).map_or(0, Vec::len);
                    eprintln!(
                        "{account} (partition {}): {} events, the saga ran {ran}",
                        catga::ring::partition_of(account, 4),
                        events.len()
                    );
                }
            }
            for (account, events) in &in_stream {
                let ran = booked
                    .get(&(run.clone(), account.clone()))
                    .cloned()
                    .unwrap_or_default();
                // A saga redelivered (its replica was cut off) runs again:
                // the order is that of first runs.
                let mut first = Vec::new();
                for s in ran {
                    if !first.contains(&s) {
                        first.push(s);
                    }
                }
                assert_eq!(&first, events, "{account}: the saga ran in the stream's order");
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    r1.shutdown().await.expect("r1 shutdown");
    r2.shutdown().await.expect("r2 shutdown");
}

/// Another writer cuts into the chains of the outbox relay (into the
/// events' stream) and of the keyed saga's router (into a partition's
/// stream) on a 3-node cluster, with replicated streams: each account's
/// events are stored in order, its saga runs each, and the streams go on
/// taking messages. When the chains expected the last message id, one
/// cut stopped the stream on every replica (nats-server checks that
/// expectation only when each replica applies the message, and takes a
/// mismatch there for a critical write error): the outbox never emptied
/// and every later publish timed out. With the relay's messages expecting
/// sequences instead, another writer's message in the place of one that
/// was refused let the next one through: events stored out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_writer_cutting_into_a_chain_leaves_the_replicated_streams_working() {
    let cluster = NatsCluster::start();
    let redis = RedisServer::start_persistent();
    let r1 = accounts_replica(&cluster.url(), &redis, "c1").await;
    let client = Client::connect(&cluster.url())
        .await
        .expect("client")
        .with_request_timeout(Duration::from_secs(5));
    let js = raw_jetstream(&cluster).await;
    let run = run_id();
    // Accounts whose partitions (0 or 3 of 4) are in stream 0 of 3, the
    // stream the other writer writes too.
    let accounts: Vec<String> = (0..)
        .map(|i| format!("acct-{i}"))
        .filter(|a| catga::ring::partition_of(a, 4).is_multiple_of(3))
        .take(3)
        .collect();
    const DEPOSITS: u64 = 150;

    // A first deposit makes the events' stream (the relay does, for the
    // first event).
    let first = Deposit {
        run: format!("{run}-first"),
        account: "first".into(),
        seq: 1,
    };
    let first_id = format!("{run}-first");
    retrying(|| client.send_with_id(first.clone(), &first_id))
        .await
        .expect("a first deposit");
    js_retry("the events' stream", || js.stream_by_subject("cluster.deposited")).await;

    // The other writer, while the deposits go: a message every
    // millisecond or so into the events' stream (as a client publishing
    // the same events durably would), and every fifth into partition 0's
    // stream (as a dead letter replayed into it would); a publish that
    // fails is counted.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let other = {
        let (js, stop, failed, run) = (js.clone(), stop.clone(), failed.clone(), run.clone());
        // An account in partition 0 of 4, so that the saga takes its copy.
        let account = (0..)
            .map(|i| format!("other-{i}"))
            .find(|a| catga::ring::partition_of(a, 4) == 0)
            .expect("an account in partition 0");
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let e = Deposited {
                    run: format!("{run}-other"),
                    account: account.clone(),
                    seq: n,
                };
                let payload: bytes::Bytes = serde_json::to_vec(&e).expect("json").into();
                let partition = n
                    .is_multiple_of(5)
                    .then_some("catga.saga.cluster-accounts.book.0");
                for subject in std::iter::once("cluster.deposited").chain(partition) {
                    // Sent again while the broker answers "no stream"
                    // for a moment (a stream just made, its interest on
                    // its way across the cluster) or is slow (a loaded
                    // host); a stream stopped times out for good.
                    let until = Instant::now() + Duration::from_secs(30);
                    let stored = loop {
                        let mut h = async_nats::HeaderMap::new();
                        h.insert("Nats-Msg-Id", format!("{run}-other-{subject}-{n}").as_str());
                        let stored = match js.publish_with_headers(subject, h, payload.clone()).await {
                            Ok(ack) => tokio::time::timeout(Duration::from_secs(5), ack).await,
                            Err(e) => Ok(Err(e)),
                        };
                        if matches!(stored, Ok(Ok(_))) || Instant::now() >= until {
                            break stored;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    };
                    if !matches!(stored, Ok(Ok(_))) && failed.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!("the other writer's publish {n} on {subject}: {stored:?}");
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            n
        })
    };

    // Deposits, each account's one after another, the accounts side by
    // side: their events go through the outbox relay, their sagas'
    // triggers through the router.
    let senders: Vec<_> = accounts
        .iter()
        .map(|account| {
            let (client, run, account) = (client.clone(), run.clone(), account.clone());
            tokio::spawn(async move {
                for seq in 1..=DEPOSITS {
                    deposit_until_answered(&client, &run, &account, seq).await;
                }
            })
        })
        .collect();
    for s in senders {
        s.await.expect("sender");
    }
    stop.store(true, Ordering::Relaxed);
    let others = other.await.expect("the other writer");
    let failed = failed.load(Ordering::Relaxed);
    eprintln!("the other writer sent {others} messages; {failed} failed");
    assert!(others > 50, "the other writer ran alongside: {others}");
    assert_eq!(failed, 0, "the streams took every message of the other writer");

    // The outbox empties.
    outbox_empties(&r1, Duration::from_secs(90)).await;
    // Every account's saga ran each of its deposits, in their order (a
    // saga run again after a redelivery counts where it first ran).
    let until = Instant::now() + Duration::from_secs(90);
    loop {
        let booked = BOOKED.lock().expect("booked").clone();
        let first_runs = |account: &String| {
            let mut first: Vec<u64> = Vec::new();
            for seq in booked.get(&(run.clone(), account.clone())).into_iter().flatten() {
                if !first.contains(seq) {
                    first.push(*seq);
                }
            }
            first
        };
        if accounts.iter().all(|a| first_runs(a).len() as u64 == DEPOSITS) {
            for a in &accounts {
                assert_eq!(
                    first_runs(a),
                    (1..=DEPOSITS).collect::<Vec<_>>(),
                    "{a}'s saga ran its deposits in order"
                );
            }
            break;
        }
        assert!(
            Instant::now() < until,
            "the sagas ran {:?} of {DEPOSITS} deposits each",
            accounts.iter().map(|a| first_runs(a).len()).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The events' stream holds each account's events once, in order.
    let mut in_stream = deposited_in_stream(&js, &run).await;
    for a in &accounts {
        let got = in_stream.remove(a).unwrap_or_default();
        assert_eq!(
            got,
            (1..=DEPOSITS).collect::<Vec<_>>(),
            "{a}'s events in the stream"
        );
    }
    r1.shutdown().await.expect("shutdown");
}
