//! Keyed sagas (`#[saga(key = ...)]`): instances partitioned by key over
//! the live replicas, one owner per partition, a key's sagas in the order
//! their triggers were published, each step once; partitions move when a
//! replica leaves or joins.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use catga::{Result, Runtime, Saga, command, event, saga};
use catga_tests::{Backend, run_id};
use serde::{Deserialize, Serialize};

use crate::WAIT;

/// Posts an entry to an account (idempotent: once per saga).
#[command(subject = "tests.keyed.post", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Post {
    pub run: String,
    pub account: String,
    pub seq: u64,
}

/// Starts a saga keyed by its account.
#[event(subject = "tests.keyed.posted")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Posted {
    pub run: String,
    pub account: String,
    pub seq: u64,
}

/// (run, account) -> the seqs posted, in order.
static LEDGER: Mutex<BTreeMap<(String, String), Vec<u64>>> = Mutex::new(BTreeMap::new());
/// (run, account, seq) -> the replicas whose saga finished it.
static RAN_ON: Mutex<BTreeMap<(String, String, u64), Vec<String>>> = Mutex::new(BTreeMap::new());

#[command]
async fn post(p: Post) -> Result<()> {
    // A pause, as a remote call would take: sagas of one key overlap if
    // their order is not kept.
    tokio::time::sleep(Duration::from_millis(2)).await;
    LEDGER
        .lock()
        .expect("ledger")
        .entry((p.run, p.account))
        .or_default()
        .push(p.seq);
    Ok(())
}

#[saga(key = account, partitions = 8, concurrency = 4)]
async fn ledger(saga: &Saga, e: Posted) -> Result<()> {
    saga.step(
        "post",
        Post {
            run: e.run.clone(),
            account: e.account.clone(),
            seq: e.seq,
        },
    )
    .await?;
    RAN_ON
        .lock()
        .expect("ran on")
        .entry((e.run, e.account, e.seq))
        .or_default()
        .push(saga.context().instance_id().to_owned());
    Ok(())
}

/// Starts [`audit`], another keyed saga.
#[event(subject = "tests.keyed.audited")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Audited {
    pub account: String,
}

/// A second keyed saga, so that a replica can run one and not the other.
#[saga(key = account, partitions = 4)]
async fn audit(saga: &Saga, e: Audited) -> Result<()> {
    let _ = (saga, e);
    Ok(())
}

// Also with the store in 3 shards of a 3-master cluster: each
// partition's fence is copied to every shard when granted, and the
// journals (in the shards of the sagas' ids) check the copy in theirs.
catga_tests::on_both_and_sharded!(
    keyed_sagas_keep_key_order_while_replicas_leave_and_join,
    over_three_streams_keyed_sagas_keep_key_order_while_replicas_leave_and_join,
    three_router_shares_spread_and_a_new_share_starts_where_routing_stood,
    a_replica_without_the_saga_is_not_in_its_ring,
    a_keyed_saga_is_stopped_and_started_by_name
);

const ACCOUNTS: [&str; 6] = ["acct-a", "acct-b", "acct-c", "acct-d", "acct-e", "acct-f"];

async fn replica(b: &Backend, name: &str) -> Runtime {
    replica_over(b, name, 1).await
}

/// A replica whose keyed sagas' partitions spread over `streams` streams
/// (`CATGA_JS_SAGA_STREAMS`).
async fn replica_over(b: &Backend, name: &str, streams: u32) -> Runtime {
    replica_with(
        b,
        name,
        catga::StreamSettings {
            saga_streams: streams,
            ..Default::default()
        },
    )
    .await
}

async fn replica_with(b: &Backend, name: &str, streams: catga::StreamSettings) -> Runtime {
    b.started(
        b.builder(module_path!(), name)
            .membership(Duration::from_millis(100), Duration::from_millis(500))
            .retry_base(Duration::from_millis(20))
            .streams(streams),
    )
    .await
}

/// Waits until each of `replicas` runs exactly one of the saga's three
/// router shares.
async fn routers_spread(replicas: &[&Runtime]) {
    let started = Instant::now();
    loop {
        let mut shares = Vec::new();
        for rt in replicas {
            let routing = rt.routing().await;
            shares.push(
                routing
                    .iter()
                    .find(|(name, _)| name.ends_with("::ledger"))
                    .map(|(_, s)| s.clone())
                    .unwrap_or_default(),
            );
        }
        let all: BTreeSet<u32> = shares.iter().flatten().copied().collect();
        if shares.iter().all(|s| s.len() == 1) && all == BTreeSet::from([0, 1, 2]) {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "the router shares did not spread over the replicas: {shares:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `replicas` serve every partition of the saga, each once,
/// and every one of them serves some; returns who serves what.
async fn spread(replicas: &[&Runtime]) -> Vec<Vec<u32>> {
    let started = Instant::now();
    loop {
        let mut held = Vec::new();
        for rt in replicas {
            let parts = rt.partitions().await;
            held.push(
                parts
                    .iter()
                    .find(|(name, _)| name.ends_with("::ledger"))
                    .map(|(_, p)| p.clone())
                    .unwrap_or_default(),
            );
        }
        let all: Vec<u32> = held.iter().flatten().copied().collect();
        let distinct: BTreeSet<u32> = all.iter().copied().collect();
        if all.len() == 8 && distinct.len() == 8 && held.iter().all(|h| !h.is_empty()) {
            return held;
        }
        assert!(
            started.elapsed() < WAIT,
            "the partitions did not spread over {} replicas: {held:?}",
            replicas.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes `per_account` triggers per account (interleaved), from seq
/// `from`.
async fn publish(client: &catga::Client, run: &str, from: u64, per_account: u64) {
    for seq in from..from + per_account {
        for account in ACCOUNTS {
            client
                .publish_durable(Posted {
                    run: run.to_owned(),
                    account: account.to_owned(),
                    seq,
                })
                .await
                .expect("published");
        }
    }
}

/// [`publish`]es 10 triggers per account of `run` in the background.
fn publishing(client: &catga::Client, run: &str) -> tokio::task::JoinHandle<()> {
    let (client, run) = (client.clone(), run.to_owned());
    tokio::spawn(async move { publish(&client, &run, 0, 10).await })
}

/// Waits until every account of `run` has `n` entries; checks they are
/// 0..n in order (each once), and that each saga finished once.
async fn check(run: &str, n: u64) -> BTreeSet<String> {
    let started = Instant::now();
    loop {
        let done = {
            let ledger = LEDGER.lock().expect("ledger");
            ACCOUNTS.iter().all(|a| {
                ledger
                    .get(&(run.to_owned(), (*a).to_owned()))
                    .is_some_and(|l| l.len() as u64 >= n)
            })
        };
        if done {
            break;
        }
        assert!(
            started.elapsed() < WAIT * 2,
            "not every saga ran: {:?}",
            LEDGER.lock().expect("ledger")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ledger = LEDGER.lock().expect("ledger");
    let ran = RAN_ON.lock().expect("ran on");
    let mut replicas = BTreeSet::new();
    for a in ACCOUNTS {
        let entries = &ledger[&(run.to_owned(), a.to_owned())];
        assert_eq!(*entries, (0..n).collect::<Vec<_>>(), "{a}: in order, each once");
        for seq in 0..n {
            let on = &ran[&(run.to_owned(), a.to_owned(), seq)];
            assert_eq!(on.len(), 1, "{a}/{seq} finished once: {on:?}");
            replicas.insert(on[0].clone());
        }
    }
    replicas
}

async fn keyed_sagas_keep_key_order_while_replicas_leave_and_join(b: &Backend) {
    leave_and_join(b, 1).await;
}

/// The same with the partitions spread over three streams: on NATS,
/// partition `p` is stored in stream `p % 3`, so that no one stream
/// leader carries every partition, and every trigger is stored once.
async fn over_three_streams_keyed_sagas_keep_key_order_while_replicas_leave_and_join(b: &Backend) {
    leave_and_join(b, 3).await;
    let Some(url) = b.nats_url() else { return };
    let js = async_nats::jetstream::new(async_nats::connect(url).await.expect("raw client"));
    let base = "catga.saga.catga-tests.ledger";
    let mut streams: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for p in 0..8 {
        let name = js
            .stream_by_subject(format!("{base}.{p}"))
            .await
            .unwrap_or_else(|e| panic!("no stream stores partition {p}: {e}"));
        streams.entry(name).or_default().push(p);
    }
    let groups: Vec<Vec<u32>> = streams.values().cloned().collect();
    assert_eq!(
        BTreeSet::from_iter(groups.clone()),
        BTreeSet::from([vec![0, 3, 6], vec![1, 4, 7], vec![2, 5]]),
        "partition p in stream p % 3: {streams:?}"
    );
    let mut stored = 0;
    for name in streams.keys() {
        let mut stream = js.get_stream(name).await.expect("stream");
        stored += stream.info().await.expect("stream info").state.messages;
    }
    // 6 accounts x (10 + 10 + 15) triggers, each copy stored once.
    assert_eq!(stored, 6 * 35, "every trigger stored once over the streams");
}

/// Over three partition streams, three router shares route the triggers,
/// one per replica (no one replica routes them all), each trigger once and
/// in its key's order.
///
/// On NATS, the replicas then stop and the state an earlier layout leaves
/// is made: share 0's consumer records no layout (as one router's, or an
/// earlier release's), and the other shares' consumers stand at the
/// stream's start (left from long ago). Triggers are published while no
/// replica runs, and the streams' duplicate window passes. Share 0 makes
/// the other consumers again at its acknowledgement floor: no trigger
/// routed before is routed (and stored) again, and every one published
/// while the replicas were down is routed.
async fn three_router_shares_spread_and_a_new_share_starts_where_routing_stood(b: &Backend) {
    use async_nats::jetstream::consumer;
    let settings = catga::StreamSettings {
        saga_streams: 3,
        duplicate_window: Duration::from_secs(1),
        ..Default::default()
    };
    let mut replicas = Vec::new();
    for name in ["s1", "s2", "s3"] {
        replicas.push(replica_with(b, name, settings.clone()).await);
    }
    let client = b.client().await;
    spread(&replicas.iter().collect::<Vec<_>>()).await;
    routers_spread(&replicas.iter().collect::<Vec<_>>()).await;
    let run = run_id();
    publish(&client, &run, 0, 10).await;
    check(&run, 10).await;
    catga_tests::backend::shutdown_all(replicas).await;
    let Some(url) = b.nats_url() else { return };
    let js = async_nats::jetstream::new(async_nats::connect(url).await.expect("raw client"));
    let triggers = js
        .get_stream(catga::stream_name("tests.keyed.posted"))
        .await
        .expect("the trigger stream");
    let zero = triggers
        .consumer_info("ledger")
        .await
        .expect("share 0's consumer");
    assert_eq!(
        zero.config.description.as_deref(),
        Some("catga router shares: 3"),
        "share 0 records the layout"
    );
    let mut forgotten = zero.config.clone();
    forgotten.description = None;
    triggers
        .create_consumer(forgotten)
        .await
        .expect("share 0's layout forgotten");
    for share in ["ledger-r1", "ledger-r2"] {
        triggers
            .delete_consumer(share)
            .await
            .unwrap_or_else(|e| panic!("delete {share}: {e}"));
        triggers
            .create_consumer(consumer::pull::Config {
                durable_name: Some(share.to_owned()),
                filter_subject: "tests.keyed.posted".to_owned(),
                ack_policy: consumer::AckPolicy::Explicit,
                deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: 1 },
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{share} at the stream's start: {e}"));
    }
    let down = run_id();
    publish(&client, &down, 0, 3).await;
    // Past the duplicate window: a trigger routed again would be stored
    // again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut replicas = Vec::new();
    for name in ["s4", "s5", "s6"] {
        replicas.push(replica_with(b, name, settings.clone()).await);
    }
    routers_spread(&replicas.iter().collect::<Vec<_>>()).await;
    check(&down, 3).await;
    let run = run_id();
    publish(&client, &run, 0, 5).await;
    check(&run, 5).await;
    for share in ["ledger-r1", "ledger-r2"] {
        let info = triggers.consumer_info(share).await.expect("made again");
        assert_eq!(info.num_ack_pending, 0, "{share}: {info:?}");
        assert_eq!(info.num_pending, 0, "{share}: {info:?}");
    }
    let mut stored = 0;
    for group in 0..3 {
        let name = js
            .stream_by_subject(format!("catga.saga.catga-tests.ledger.{group}"))
            .await
            .expect("a partition stream");
        let mut stream = js.get_stream(&name).await.expect("stream");
        stored += stream.info().await.expect("stream info").state.messages;
    }
    assert_eq!(
        stored,
        6 * (10 + 3 + 5),
        "every trigger stored once over the streams"
    );
    catga_tests::backend::shutdown_all(replicas).await;
}

/// Three replicas serve the keyed saga; one leaves and one joins while
/// triggers arrive; every key's sagas run in order, each once.
async fn leave_and_join(b: &Backend, streams: u32) {
    let mut replicas = vec![
        replica_over(b, "r1", streams).await,
        replica_over(b, "r2", streams).await,
        replica_over(b, "r3", streams).await,
    ];
    let client = b.client().await;
    let held = spread(&replicas.iter().collect::<Vec<_>>()).await;
    let run = run_id();
    publish(&client, &run, 0, 10).await;
    let ran = check(&run, 10).await;
    assert!(
        ran.len() >= 2,
        "the sagas ran on more than one replica: {ran:?} ({held:?})"
    );

    // One leaves while triggers arrive: its partitions move to the others,
    // and no key's order breaks.
    let run = run_id();
    let load = publishing(&client, &run);
    tokio::time::sleep(Duration::from_millis(50)).await;
    replicas.remove(0).shutdown().await.expect("clean shutdown");
    load.await.expect("publisher");
    spread(&replicas.iter().collect::<Vec<_>>()).await;
    check(&run, 10).await;

    // One joins while triggers arrive: it takes a share.
    let run = run_id();
    let load = publishing(&client, &run);
    replicas.push(replica_over(b, "r4", streams).await);
    load.await.expect("publisher");
    let held = spread(&replicas.iter().collect::<Vec<_>>()).await;
    assert!(
        !held[2].is_empty(),
        "the new replica serves some partitions: {held:?}"
    );
    check(&run, 10).await;
    publish(&client, &run, 10, 5).await;
    check(&run, 15).await;
    catga_tests::backend::shutdown_all(replicas).await;
}

/// `stop_handler` on a keyed saga, while triggers arrive: its partitions
/// drain, the replica leaves the ring and its leases (the call returns
/// then), the other replica serves every partition, and no key's order
/// breaks. `start_handler` joins the ring again and takes a share.
async fn a_keyed_saga_is_stopped_and_started_by_name(b: &Backend) {
    let replicas = vec![replica(b, "r1").await, replica(b, "r2").await];
    let client = b.client().await;
    spread(&replicas.iter().collect::<Vec<_>>()).await;
    let name = *replicas[0]
        .partitions()
        .await
        .keys()
        .find(|n| n.ends_with("::ledger"))
        .expect("the saga");
    let run = run_id();
    let load = publishing(&client, &run);
    tokio::time::sleep(Duration::from_millis(50)).await;
    replicas[0].stop_handler(name).await.expect("left the saga");
    assert!(
        !replicas[0].partitions().await.contains_key(name),
        "no partition served once stop_handler returned: {:?}",
        replicas[0].partitions().await
    );
    let err = replicas[0]
        .stop_handler(name)
        .await
        .expect_err("not served any more");
    assert!(err.message().contains("not being served"), "{err}");
    load.await.expect("publisher");
    spread(&[&replicas[1]]).await;
    check(&run, 10).await;

    replicas[0].start_handler(name).await.expect("joins again");
    spread(&replicas.iter().collect::<Vec<_>>()).await;
    let run = run_id();
    publish(&client, &run, 0, 5).await;
    check(&run, 5).await;
    catga_tests::backend::shutdown_all(replicas).await;
}

/// A replica of the same service started without the saga (it runs
/// another keyed saga, and the step) is not a member of the saga's ring:
/// the other replica serves every partition and every saga runs.
async fn a_replica_without_the_saga_is_not_in_its_ring(b: &Backend) {
    let with = replica(b, "r1").await;
    let without = b
        .started(
            b.attach(
                catga::Runtime::builder()
                    .service("catga-tests")
                    .instance_id("r2")
                    .membership(Duration::from_millis(100), Duration::from_millis(500))
                    .handlers(|s| s.name().ends_with("keyed::post") || s.name().ends_with("keyed::audit")),
            ),
        )
        .await;
    // Two heartbeats of both, then the saga's partitions are all on r1.
    tokio::time::sleep(Duration::from_millis(300)).await;
    spread(&[&with]).await;
    let theirs = without.partitions().await;
    assert!(
        theirs.keys().all(|saga| saga.ends_with("::audit")),
        "r2 serves only the saga it runs: {theirs:?}"
    );
    let run = run_id();
    publish(&b.client().await, &run, 0, 3).await;
    check(&run, 3).await;
    catga_tests::backend::shutdown_all(vec![with, without]).await;
}

/// Triggers a plain client publishes without any header, over three
/// router shares: each runs once and in its key's order, and one whose
/// payload cannot be read is dead-lettered once, not once per share
/// (each share cannot tell whose it is, and names it by its place in the
/// stream and its payload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_triggers_without_ids_over_three_router_shares() {
    let b = Backend::nats();
    let mut replicas = Vec::new();
    for name in ["p1", "p2", "p3"] {
        replicas.push(replica_over(&b, name, 3).await);
    }
    spread(&replicas.iter().collect::<Vec<_>>()).await;
    routers_spread(&replicas.iter().collect::<Vec<_>>()).await;
    let js = async_nats::jetstream::new(
        async_nats::connect(b.nats_url().expect("nats"))
            .await
            .expect("raw client"),
    );
    let run = run_id();
    for seq in 0..3 {
        for account in ACCOUNTS {
            let payload = serde_json::to_vec(&Posted {
                run: run.clone(),
                account: account.to_owned(),
                seq,
            })
            .expect("json");
            js.publish("tests.keyed.posted", payload.into())
                .await
                .expect("published")
                .await
                .expect("stored");
        }
    }
    check(&run, 3).await;
    js.publish("tests.keyed.posted", "{not a trigger".into())
        .await
        .expect("published")
        .await
        .expect("stored");
    let letters = replicas[0].dead_letters();
    let started = Instant::now();
    loop {
        let found = letters.list(0, 100).await.expect("dead letters");
        if !found.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "the unreadable trigger was not dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every share has read it by now or soon: give them time to add theirs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let found = letters.list(0, 100).await.expect("dead letters");
    assert_eq!(found.len(), 1, "dead-lettered once: {found:?}");
    assert!(found[0].handler.ends_with("::ledger"), "{:?}", found[0]);
    catga_tests::backend::shutdown_all(replicas).await;
}

/// Triggers published by an ordinary client with JetStream directives in
/// their headers (`Nats-Expected-Stream` naming the trigger's own stream,
/// which accepts it): the router does not copy the broker's headers onto
/// the partition's copy, so the copy is stored and the saga runs, instead
/// of every copy being refused and the saga's routing stopping for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_broker_headers_do_not_stop_the_routing() {
    let b = Backend::nats();
    let rt = replica(&b, "r1").await;
    spread(&[&rt]).await;
    let Backend::Nats(server, _) = &b else {
        unreachable!("nats backend")
    };
    let nc = async_nats::connect(server.url()).await.expect("raw client");
    let js = async_nats::jetstream::new(nc);
    let stream = js
        .stream_by_subject("tests.keyed.posted")
        .await
        .expect("the triggers' stream");
    let run = run_id();
    for seq in 1..=3 {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("{run}-{seq}").as_str());
        h.insert("Nats-Expected-Stream", stream.as_str());
        let payload = serde_json::to_vec(&Posted {
            run: run.clone(),
            account: "acct-a".into(),
            seq,
        })
        .expect("json");
        js.publish_with_headers("tests.keyed.posted", h, payload.into())
            .await
            .expect("published")
            .await
            .expect("its own stream takes it");
    }
    let key = (run.clone(), "acct-a".to_owned());
    let started = Instant::now();
    loop {
        let posted = LEDGER
            .lock()
            .expect("ledger")
            .get(&key)
            .cloned()
            .unwrap_or_default();
        if posted.len() == 3 {
            assert_eq!(posted, [1, 2, 3], "in order");
            break;
        }
        assert!(started.elapsed() < WAIT, "no saga ran: the routing stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Triggers published normally afterwards still flow.
    let client = b.client().await;
    client
        .publish_durable(Posted {
            run: run.clone(),
            account: "acct-a".into(),
            seq: 10,
        })
        .await
        .expect("published");
    let started = Instant::now();
    while !LEDGER
        .lock()
        .expect("ledger")
        .get(&key)
        .is_some_and(|p| p.contains(&10))
    {
        assert!(started.elapsed() < WAIT, "the routing stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    rt.shutdown().await.expect("clean shutdown");
}

/// A replica started with another `CATGA_JS_SAGA_STREAMS` than the
/// partitions' streams were made with cannot make its streams (JetStream
/// refuses streams whose subjects overlap): its readiness says so and
/// names the setting, and it stays out of the saga's ring, so that the
/// replica with the right layout keeps serving every partition instead of
/// some stalling on the one that cannot serve them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_stream_layout_is_refused_clearly() {
    let b = Backend::nats();
    let first = replica(&b, "r1").await;
    spread(&[&first]).await;
    let other = b
        .builder(module_path!(), "r2")
        .membership(Duration::from_millis(100), Duration::from_millis(500))
        // Readiness names a saga's trouble after a hand-over's time:
        // the member time-out plus the drain deadline (a queue group's
        // hand-over on NATS waits up to 1 s of it).
        .drain_timeout(Duration::from_millis(1500))
        .streams(catga::StreamSettings {
            saga_streams: 3,
            ..Default::default()
        })
        .start()
        .await
        .expect("starts");
    let started = Instant::now();
    loop {
        let failing = other.readiness().failing;
        if failing.iter().any(|f| {
            f.contains("ledger") && f.contains("stored by stream") && f.contains("CATGA_JS_SAGA_STREAMS")
        }) {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "readiness does not name the layout: {failing:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Several heartbeats later, r1 still serves every partition.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(other.partitions().await.is_empty(), "r2 serves nothing");
    spread(&[&first]).await;
    let run = run_id();
    publish(&b.client().await, &run, 0, 3).await;
    check(&run, 3).await;
    other.shutdown().await.expect("r2 shuts down cleanly");
    first.shutdown().await.expect("r1 shuts down cleanly");
}
