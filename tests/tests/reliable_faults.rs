//! Reliable delivery under faults, against real nats-server and
//! redis-server processes: Redis stopped mid-run, nats-server restarted
//! with JetStream on disk, and an outbox relay that died between publishing
//! an event and marking it sent, and Redis killed while the inbox calls of
//! many senders are in flight together, and a commit failing on a key of
//! another type beside them or in its own outbox.

use std::collections::BTreeSet;
use std::time::Duration;

use catga::{Context, ErrorKind, Result, State, Versioned, command, event};
use catga_tests::{NatsServer, Recorder, RedisCluster, RedisSentinel, RedisServer, run_id};
use serde::{Deserialize, Serialize};

/// A counter kept in the store.
#[derive(Serialize, Deserialize, Debug, Default)]
pub struct Total {
    /// Its value.
    pub value: u64,
}

impl State for Total {
    const KIND: &'static str = "total";
}

/// Adds one to total `key`, once per message id.
#[command(reply = u64, subject = "tests.faults.add", idempotent)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Add {
    /// Which total.
    pub key: String,
}

/// Sets total `key` to 1 without reading it first: its commit is the
/// first to touch the key.
#[command(reply = u64, subject = "tests.faults.set_one", idempotent)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SetOne {
    /// Which total.
    pub key: String,
}

/// Adds one to total `key` and says so with an [`Entry`] of `run`, once
/// per message id.
#[command(reply = u64, subject = "tests.faults.note", idempotent)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Note {
    /// Which total.
    pub key: String,
    /// The test run, for the entry.
    pub run: String,
}

/// A durable event, recorded once per message id.
#[event(subject = "tests.faults.entry")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Entry {
    /// The test run.
    pub run: String,
    /// Its number in the run.
    pub seq: u64,
}

static ENTRIES: Recorder = Recorder::new();

#[command]
async fn add(ctx: &Context, a: Add) -> Result<u64> {
    let mut total = ctx
        .try_load::<Total>(&a.key)
        .await?
        .unwrap_or_else(|| Versioned::new(a.key.clone(), Total::default()));
    total.value += 1;
    Ok(ctx.save(total).await?.value)
}

#[command]
async fn set_one(ctx: &Context, s: SetOne) -> Result<u64> {
    Ok(ctx.save(Versioned::new(s.key, Total { value: 1 })).await?.value)
}

#[command]
async fn note(ctx: &Context, n: Note) -> Result<u64> {
    let mut total = ctx
        .try_load::<Total>(&n.key)
        .await?
        .unwrap_or_else(|| Versioned::new(n.key.clone(), Total::default()));
    total.value += 1;
    let value = ctx.save(total).await?.value;
    ctx.publish(Entry {
        run: n.run,
        seq: value,
    })
    .await?;
    Ok(value)
}

#[event(durable = "entries", idempotent)]
async fn on_entry(ctx: &Context, e: Entry) -> Result<()> {
    ENTRIES.record(&e.run, "entry", ctx, e.seq);
    Ok(())
}

/// A runtime of this file's handlers, its store still to choose.
fn base(nats: &NatsServer) -> catga::RuntimeBuilder {
    catga::Runtime::builder()
        .service("faults")
        .instance_id("r1")
        .nats_url(nats.url())
        .handlers(|s| s.name().starts_with("reliable_faults::"))
}

fn builder(nats: &NatsServer, redis: &RedisServer) -> catga::RuntimeBuilder {
    base(nats).redis_url(redis.url())
}

async fn ready(rt: &catga::Runtime) {
    catga_tests::ready_within(rt, Duration::from_secs(20)).await;
}

/// While Redis is away, handlers that need state fail with a retryable
/// error in bounded time and the replica is not ready; when it is back,
/// work resumes where it stopped: nothing lost, nothing doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_mid_run() {
    let nats = NatsServer::start();
    let mut redis = RedisServer::start_persistent();
    let b = builder(&nats, &redis);
    store_outage(&nats, b, false, |down| {
        if down {
            redis.kill();
        } else {
            redis.resume();
        }
    })
    .await;
}

/// The same on Redis Cluster: the node that holds the service's keys (one
/// slot: they share the service as hash tag) is killed and comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_node_stopped_mid_run() {
    let nats = NatsServer::start();
    let mut cluster = RedisCluster::start();
    let node = cluster.owner_of("catga:{faults}");
    let b = base(&nats).redis_cluster(&cluster.urls());
    store_outage(&nats, b, false, |down| {
        if down {
            cluster.nodes[node].kill();
        } else {
            cluster.nodes[node].resume();
            cluster.wait_ok();
        }
    })
    .await;
}

/// Redis Sentinel: the master is killed, the sentinel promotes its
/// replica, and the store follows it to the new master, which has
/// everything written before. Replication is asynchronous: a write the
/// master acknowledged in its last moments can be lost with it, as Redis
/// documents; the test lets the replica catch up before the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_follows_a_sentinel_failover() {
    let nats = NatsServer::start();
    let mut redis = RedisSentinel::start();
    let b = base(&nats).redis_sentinel(&[redis.url()], "mymaster");
    store_outage(&nats, b, true, |down| {
        if down {
            assert_eq!(redis.master_port(), redis.master.port());
            std::thread::sleep(Duration::from_millis(500));
            redis.master.kill();
        } else {
            let until = std::time::Instant::now() + Duration::from_secs(30);
            while redis.master_port() != redis.replica.port() {
                assert!(
                    std::time::Instant::now() < until,
                    "the sentinel promoted no replica"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    })
    .await;
}

/// `set_down(true)` stops the store, `set_down(false)` brings it back.
/// With `fails_over`, the store comes back by itself (a replica is
/// promoted), possibly within the sender's own retries of the command
/// sent during the outage (idempotent commands are retried by the client
/// until their deadline): that one may then succeed at once, and the
/// replica may be ready again before anyone looks.
async fn store_outage(
    nats: &NatsServer,
    b: catga::RuntimeBuilder,
    fails_over: bool,
    mut set_down: impl FnMut(bool),
) {
    let rt = b.start().await.expect("starts");
    ready(&rt).await;
    let client = catga::Client::connect(&nats.url())
        .await
        .expect("client")
        .with_request_timeout(Duration::from_secs(3));
    let key = run_id();
    for n in 1..=5 {
        assert_eq!(client.send(Add { key: key.clone() }).await.expect("add"), n);
    }
    set_down(true);
    let started = std::time::Instant::now();
    // The command sent during the outage has an id of its own; a sender
    // that did not get its answer asks again under the same id.
    let during = format!("{key}-during");
    match client.send_with_id(Add { key: key.clone() }, &during).await {
        Err(err) => assert!(err.is_retryable(), "{err}"),
        Ok(value) => assert!(fails_over && value == 6, "no store, yet {value}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded: {:?}",
        started.elapsed()
    );
    if !fails_over {
        let mut not_ready = false;
        for _ in 0..50 {
            if rt.readiness().failing.iter().any(|f| f.starts_with("store")) {
                not_ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(not_ready, "not ready while Redis is away: {:?}", rt.readiness());
    }
    set_down(false);
    ready(&rt).await;
    let mut value = 0;
    for _ in 0..50 {
        match client.send_with_id(Add { key: key.clone() }, &during).await {
            Ok(v) => {
                value = v;
                break;
            }
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert_eq!(
        value, 6,
        "the five before the outage kept, the one sent during it applied once"
    );
    assert_eq!(
        client
            .send_with_id(Add { key: key.clone() }, &during)
            .await
            .expect("again"),
        6,
        "asking again gets the same answer"
    );
    assert_eq!(client.send(Add { key: key.clone() }).await.expect("next"), 7);
    rt.shutdown().await.expect("clean shutdown");
}

/// nats-server restarted in the middle of a stream of durable events (its
/// JetStream store on disk): every event acknowledged by JetStream is
/// handled, once, and the consumer resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_stream_loses_no_durable_event() {
    let mut nats = NatsServer::start();
    let redis = RedisServer::start();
    let rt = builder(&nats, &redis).start().await.expect("starts");
    ready(&rt).await;
    let client = catga::Client::connect(&nats.url())
        .await
        .expect("client")
        .with_request_timeout(Duration::from_secs(2));
    let run = run_id();
    let mut stored = BTreeSet::new();
    for seq in 0..40u64 {
        if seq == 20 {
            nats.kill();
            tokio::time::sleep(Duration::from_millis(300)).await;
            nats.resume();
        }
        // A publish is stored once JetStream acknowledged it; retry until
        // the broker is back.
        for _ in 0..100 {
            match client
                .publish_durable(Entry {
                    run: run.clone(),
                    seq,
                })
                .await
            {
                Ok(()) => {
                    stored.insert(seq);
                    break;
                }
                Err(e) => {
                    assert!(e.is_retryable() || e.kind() == ErrorKind::NoHandler, "{e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
    assert_eq!(stored.len(), 40, "every publish eventually acknowledged");
    let records = ENTRIES.wait_for(&run, 40, Duration::from_secs(30)).await;
    let seen: BTreeSet<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seen, stored, "every stored event handled");
    assert_eq!(records.len(), 40, "each once");
    rt.shutdown().await.expect("clean shutdown");
}

/// A relay takes an outbox entry, publishes it and dies before marking it
/// sent. Another relay takes it over and publishes it again: JetStream
/// drops the copy (same message id), and the idempotent handler runs once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_died_between_publish_and_mark_delivers_once() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let run = run_id();
    // The stream and consumer exist first (a runtime made them), then the
    // runtime goes away, so that no relay runs while the dead one works.
    {
        let rt = builder(&nats, &redis).start().await.expect("starts");
        ready(&rt).await;
        rt.shutdown().await.expect("clean shutdown");
    }
    let message_id = format!("{run}-e1");
    let payload = serde_json::to_vec(&Entry {
        run: run.clone(),
        seq: 1,
    })
    .expect("json");
    let headers = serde_json::to_vec(&vec![("Nats-Msg-Id".to_owned(), message_id.clone())]).expect("json");
    let r = redis::Client::open(redis.url()).expect("redis url");
    let mut con = r.get_multiplexed_async_connection().await.expect("redis");
    let outbox = "catga:{faults}:outbox";
    let _: String = redis::cmd("XADD")
        .arg(outbox)
        .arg("*")
        .arg("id")
        .arg(&message_id)
        .arg("subject")
        .arg("tests.faults.entry")
        .arg("headers")
        .arg(headers)
        .arg("payload")
        .arg(&payload)
        .query_async(&mut con)
        .await
        .expect("XADD");
    // The dying relay: holds the relay lease, publishes the entry, dies
    // before removing it.
    let _: () = redis::cmd("SET")
        .arg("catga:{faults}:relay")
        .arg("dead-relay")
        .arg("PX")
        .arg(1000)
        .query_async(&mut con)
        .await
        .expect("SET");
    let nc = async_nats::connect(nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(nc);
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", message_id.as_str());
    js.publish_with_headers("tests.faults.entry", h, payload.into())
        .await
        .expect("publish")
        .await
        .expect("stored");
    // A live relay takes the lease over once it ran out, and publishes
    // the entry again; the stream drops the repeat.
    let rt = builder(&nats, &redis)
        .outbox_lease(Duration::from_millis(500))
        .start()
        .await
        .expect("starts");
    ready(&rt).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let backlog = rt.outbox_backlog().await.expect("backlog");
        if backlog == 0 || tokio::time::Instant::now() >= deadline {
            assert_eq!(
                backlog, 0,
                "the live relay took the entry over and marked it sent"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let records = ENTRIES.wait_for(&run, 1, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ENTRIES.of(&run).len(), 1, "delivered once: {records:?}");
    rt.shutdown().await.expect("clean shutdown");
}

/// `cmdstat_evalsha` calls so far, from `INFO commandstats`.
async fn script_calls(redis: &RedisServer) -> u64 {
    let r = redis::Client::open(redis.url()).expect("redis url");
    let mut con = r.get_multiplexed_async_connection().await.expect("redis");
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut con)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Idempotent commands from many senders at once go to Redis together
/// (their inbox claims in one script call, their commits in another), and
/// Redis SIGKILLed while such calls are in flight (its append-only file
/// synced on every write) loses and doubles none: every sender, sending
/// each of its ids until answered, gets 1, 2, ... in order from its own
/// total, and a total counts each id once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_commands_sent_together_survive_redis_killed_under_load() {
    const SENDERS: u64 = 24;
    const EACH: u64 = 40;
    let nats = NatsServer::start();
    let mut redis = RedisServer::start_persistent();
    let rt = builder(&nats, &redis).start().await.expect("starts");
    ready(&rt).await;
    let client = catga::Client::connect(&nats.url())
        .await
        .expect("client")
        .with_request_timeout(Duration::from_secs(3));
    let run = run_id();
    let before = script_calls(&redis).await;
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let (client, run, answered) = (client.clone(), run.clone(), answered.clone());
            tokio::spawn(async move {
                let key = format!("{run}-{s}");
                let mut answers = Vec::new();
                for n in 0..EACH {
                    let id = format!("{run}-{s}-{n}");
                    let until = std::time::Instant::now() + Duration::from_secs(60);
                    loop {
                        match client.send_with_id(Add { key: key.clone() }, &id).await {
                            Ok(v) => {
                                answers.push(v);
                                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                break;
                            }
                            Err(e) => {
                                assert!(e.is_retryable(), "{id}: {e}");
                                assert!(std::time::Instant::now() < until, "{id} never answered: {e}");
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                }
                answers
            })
        })
        .collect();
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while answered.load(std::sync::atomic::Ordering::Relaxed) < 200 {
        assert!(std::time::Instant::now() < until, "no progress before the kill");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let calls = script_calls(&redis).await - before;
    let done = answered.load(std::sync::atomic::Ordering::Relaxed);
    println!("{calls} script calls for {done} answered messages before the kill");
    // One claim and one commit per message would be two calls per answer
    // at least (more with the claims of messages still in flight, and the
    // runtime's own scripts: leases, delayed messages).
    assert!(
        calls < done * 2,
        "{calls} script calls for {done} answered messages: not sent together"
    );
    redis.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.resume();
    for (s, sender) in senders.into_iter().enumerate() {
        let answers = sender.await.expect("sender");
        assert_eq!(
            answers,
            (1..=EACH).collect::<Vec<_>>(),
            "sender {s}: each id applied once, in order"
        );
    }
    ready(&rt).await;
    for s in 0..SENDERS {
        assert_eq!(
            client
                .send(Add {
                    key: format!("{run}-{s}")
                })
                .await
                .expect("one more"),
            EACH + 1,
            "sender {s}'s total counts each id once, its last one too"
        );
    }
    rt.shutdown().await.expect("clean shutdown");
}

/// A commit that fails on a key of another type (state written by hand
/// into the service's key space) fails alone: the idempotent commits sent
/// together with it in one script call keep their outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_failing_on_a_key_of_another_type_fails_alone() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let rt = builder(&nats, &redis).start().await.expect("starts");
    ready(&rt).await;
    let client = catga::Client::connect(&nats.url())
        .await
        .expect("client")
        .with_request_timeout(Duration::from_secs(5));
    let run = run_id();
    let broken = format!("{run}-broken");
    let r = redis::Client::open(redis.url()).expect("redis url");
    let mut con = r.get_multiplexed_async_connection().await.expect("redis");
    let _: () = redis::cmd("SET")
        .arg(format!("catga:{{faults}}:state:{}:{broken}", Total::KIND))
        .arg("not a hash")
        .query_async(&mut con)
        .await
        .expect("SET");
    // Senders on good keys and on the broken one at once, so that their
    // commits share script calls.
    let senders: Vec<_> = (0..24u64)
        .map(|s| {
            let (client, run, broken) = (client.clone(), run.clone(), broken.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                // A broken commit fails after the handler's retries (about
                // a second): a few keep it busy while the others send.
                let sends = if s % 3 == 0 { 4 } else { 20 };
                for n in 0..sends {
                    let key = if s % 3 == 0 {
                        broken.clone()
                    } else {
                        format!("{run}-{s}-{n}")
                    };
                    let sent = client
                        .send_with_id(SetOne { key }, &format!("{run}-{s}-{n}"))
                        .await;
                    out.push(sent.map_err(|e| e.kind()));
                }
                (s, out)
            })
        })
        .collect();
    for sender in senders {
        let (s, out) = sender.await.expect("sender");
        if s % 3 == 0 {
            assert!(
                out.iter().all(Result::is_err),
                "sender {s} writes the broken key: {out:?}"
            );
        } else {
            assert_eq!(
                out,
                vec![Ok(1); 20],
                "sender {s}: its commits keep their outcome beside the broken one"
            );
        }
    }
    rt.shutdown().await.expect("clean shutdown");
}

/// A commit whose event cannot be written (the outbox key holds a value of
/// another type) writes nothing and keeps no answer: the sender is told it
/// failed, and the same id sent again once the outbox is repaired runs and
/// publishes its event, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_event_cannot_be_written_keeps_no_answer() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let rt = builder(&nats, &redis).start().await.expect("starts");
    ready(&rt).await;
    let client = catga::Client::connect(&nats.url())
        .await
        .expect("client")
        .with_request_timeout(Duration::from_secs(5));
    let r = redis::Client::open(redis.url()).expect("redis url");
    let mut con = r.get_multiplexed_async_connection().await.expect("redis");
    let outbox = "catga:{faults}:outbox";
    let _: () = redis::cmd("DEL")
        .arg(outbox)
        .query_async(&mut con)
        .await
        .expect("DEL");
    let _: () = redis::cmd("SET")
        .arg(outbox)
        .arg("not a stream")
        .query_async(&mut con)
        .await
        .expect("SET");
    let run = run_id();
    let note = Note {
        key: run.clone(),
        run: run.clone(),
    };
    let id = format!("{run}-note");
    let first = client.send_with_id(note.clone(), &id).await;
    assert!(first.is_err(), "its event was not written, yet {first:?}");
    let state: Option<String> = redis::cmd("HGET")
        .arg(format!("catga:{{faults}}:state:{}:{run}", Total::KIND))
        .arg("v")
        .query_async(&mut con)
        .await
        .expect("HGET");
    assert_eq!(state, None, "nothing of the failed commit is written");
    let _: () = redis::cmd("DEL")
        .arg(outbox)
        .query_async(&mut con)
        .await
        .expect("DEL");
    assert_eq!(
        client.send_with_id(note, &id).await.expect("runs once repaired"),
        1
    );
    let records = ENTRIES.wait_for(&run, 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ENTRIES.of(&run).len(), 1, "its event, once: {records:?}");
    rt.shutdown().await.expect("clean shutdown");
}
