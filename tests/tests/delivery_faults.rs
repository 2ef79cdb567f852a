//! Delivery promises under faults at the worst moment, against real
//! nats-server and redis-server processes: a commit whose reply is lost
//! when Redis dies, an outbox entry the broker can never take, the outbox
//! relay's replica dying while events are committed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use catga::{Context, Error, ErrorKind, Result, Runtime, State, Versioned, command, event};
use catga_tests::{NatsServer, RedisServer, run_id};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Default)]
struct Order {
    paid: bool,
}

impl State for Order {
    const KIND: &'static str = "df-order";
}

/// Pays an order, once per message id.
#[command(subject = "tests.df.pay", idempotent)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Pay {
    /// The order.
    pub order: String,
}

#[command(queue_group = "df-payers", retry = 5)]
async fn pay(ctx: &Context, p: Pay) -> Result<()> {
    let mut order = ctx
        .try_load::<Order>(&p.order)
        .await?
        .unwrap_or_else(|| Versioned::new(p.order.clone(), Order::default()));
    if order.paid {
        return Err(Error::conflict(format!("order {} is paid already", p.order)));
    }
    order.paid = true;
    ctx.save(order).await?;
    Ok(())
}

/// Saved with state, in the order of each key's commits.
#[event(subject = "tests.df.noted")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Noted {
    /// The run.
    pub run: String,
    /// The key.
    pub key: String,
    /// Its number among the key's notes.
    pub seq: u64,
}

#[derive(Serialize, Deserialize, Debug, Default)]
struct Notes {
    count: u64,
}

impl State for Notes {
    const KIND: &'static str = "df-notes";
}

/// Notes `seq` on `key`.
#[command(subject = "tests.df.note")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Note {
    /// The run.
    pub run: String,
    /// The key.
    pub key: String,
    /// Its number among the key's notes.
    pub seq: u64,
}

#[command(queue_group = "df-notes", retry = 20)]
async fn note(ctx: &Context, n: Note) -> Result<()> {
    let key = format!("{}/{}", n.run, n.key);
    let mut notes = ctx
        .try_load::<Notes>(&key)
        .await?
        .unwrap_or_else(|| Versioned::new(key.clone(), Notes::default()));
    notes.count += 1;
    ctx.save(notes)
        .with_event(Noted {
            run: n.run,
            key: n.key,
            seq: n.seq,
        })
        .await?;
    Ok(())
}

async fn replica(nats: &NatsServer, redis: &RedisServer, id: &str) -> Runtime {
    let rt = Runtime::builder()
        .service("df")
        .instance_id(id)
        .nats_url(nats.url())
        .redis_url(redis.url())
        .request_timeout(Duration::from_secs(10))
        .outbox_lease(Duration::from_millis(600))
        .handlers(|s| s.name().starts_with("delivery_faults::"))
        .start()
        .await
        .expect("starts");
    catga_tests::ready_within(&rt, Duration::from_secs(20)).await;
    rt
}

/// Payers pay fresh orders, each under its own id, retrying until they get
/// an answer, while redis-server (AOF, fsync always) is SIGKILLed and
/// restarted again and again. A commit can be applied with its reply
/// lost; the handler must not run again before the inbox says whether it
/// went through. Before, it ran again, found its own order paid, answered
/// 409, and that 409 replaced the success: the payer was told its
/// successful payment had failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_reply_was_lost_gives_the_committed_answer() {
    let nats = NatsServer::start();
    let mut redis = RedisServer::start_persistent();
    let rt = replica(&nats, &redis, "p1").await;
    let client = catga::Client::connect(&nats.url())
        .await
        .expect("client")
        .with_request_timeout(Duration::from_secs(10));
    let run = run_id();
    let stop = Arc::new(AtomicBool::new(false));
    let payers: Vec<_> = (0..8)
        .map(|p| {
            let (client, stop, run) = (client.clone(), stop.clone(), run.clone());
            tokio::spawn(async move {
                let mut outcomes: BTreeMap<String, std::result::Result<(), String>> = BTreeMap::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let order = format!("{run}-{p}-{n}");
                    let until = Instant::now() + Duration::from_secs(60);
                    let outcome = loop {
                        match client.send_with_id(Pay { order: order.clone() }, &order).await {
                            Ok(()) => break Ok(()),
                            Err(e) if e.is_retryable() && Instant::now() < until => {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Err(e) => break Err(format!("{} {}", e.kind(), e.message())),
                        }
                    };
                    outcomes.insert(order, outcome);
                }
                outcomes
            })
        })
        .collect();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        redis.kill();
        tokio::time::sleep(Duration::from_millis(200)).await;
        redis.resume();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = BTreeMap::new();
    for p in payers {
        all.extend(p.await.expect("payer"));
    }
    let failed: Vec<_> = all.iter().filter(|(_, o)| o.is_err()).collect();
    eprintln!("{} payments, {} failed", all.len(), failed.len());
    assert!(all.len() > 50, "the load ran: {}", all.len());
    assert!(
        failed.is_empty(),
        "payers told their own payment failed: {:?}",
        failed.iter().take(5).collect::<Vec<_>>()
    );
    rt.shutdown().await.expect("clean shutdown");
}

/// An entry in the outbox that the broker can never take (committed before
/// the limit was checked, or by a replica on a broker with a larger limit)
/// is dead-lettered with what fits of it, and the entries behind it go
/// out: it neither blocks the outbox nor is retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_entry_the_broker_refuses_is_dead_lettered_and_the_rest_goes_out() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let run = run_id();
    let r = redis::Client::open(redis.url()).expect("redis url");
    let mut con = r.get_multiplexed_async_connection().await.expect("redis");
    let entry = |seq: u64, pad: usize| {
        let payload = serde_json::json!({"run": run, "key": "k", "seq": seq, "pad": "x".repeat(pad)});
        let id = format!("{run}-{seq}");
        let headers = serde_json::to_vec(&vec![("Nats-Msg-Id".to_owned(), id.clone())]).expect("json");
        (id, headers, serde_json::to_vec(&payload).expect("json"))
    };
    for (seq, pad) in [(1, 0), (2, 2 * 1024 * 1024), (3, 0), (4, 0)] {
        let (id, headers, payload) = entry(seq, pad);
        let _: String = redis::cmd("XADD")
            .arg("catga:{df}:outbox")
            .arg("*")
            .arg("id")
            .arg(id)
            .arg("subject")
            .arg("tests.df.noted")
            .arg("headers")
            .arg(headers)
            .arg("payload")
            .arg(payload)
            .query_async(&mut con)
            .await
            .expect("XADD");
    }
    let rt = replica(&nats, &redis, "o1").await;
    let until = Instant::now() + Duration::from_secs(20);
    while rt.outbox_backlog().await.expect("backlog") > 0 {
        assert!(Instant::now() < until, "the outbox is stuck");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seqs = stream_seqs(&nats, &run).await;
    assert_eq!(seqs.get("k"), Some(&vec![1, 3, 4]), "the rest went out, in order");
    let client = rt.client();
    let letters = client.dead_letters().list(0, 100).await.expect("letters");
    let letter = letters
        .iter()
        .find(|l| l.message_id.as_deref() == Some(&format!("{run}-2")))
        .expect("the refused entry is a dead letter");
    assert_eq!(letter.handler, "outbox");
    assert_eq!(letter.error_kind, ErrorKind::TooLarge, "{letter:?}");
    assert!(
        letter.truncated.is_some_and(|n| n > 2 * 1024 * 1024),
        "{:?}",
        letter.truncated
    );
    assert!(!letter.payload.is_empty() && letter.payload.len() < 1024 * 1024);
    rt.shutdown().await.expect("clean shutdown");
}

/// Each key's `Noted` events in the stream, in stream order, for `run`.
async fn stream_seqs(nats: &NatsServer, run: &str) -> BTreeMap<String, Vec<u64>> {
    let nc = async_nats::connect(nats.url()).await.expect("nats");
    let js = async_nats::jetstream::new(nc);
    let name = js
        .stream_by_subject("tests.df.noted")
        .await
        .expect("a stream stores the events");
    let mut stream = js.get_stream(&name).await.expect("stream");
    let last = stream.info().await.expect("info").state.last_sequence;
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for seq in 1..=last {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        let e: Noted = serde_json::from_slice(&m.payload).expect("an event");
        if e.run == run {
            out.entry(e.key).or_default().push(e.seq);
        }
    }
    out
}

/// Two replicas: one relays (it holds the relay lease; a client-only
/// runtime, so that no command is lost with it), the other commits events
/// under load. The relay's replica dies (its runtime dropped: no
/// hand-over); the other takes the lease over within about a lease and
/// relays the rest: every event in the stream once, each key's in commit
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_moves_when_its_replica_dies_and_keeps_each_keys_order() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let relay = Runtime::builder()
        .service("df")
        .instance_id("relay")
        .nats_url(nats.url())
        .redis_url(redis.url())
        .outbox_lease(Duration::from_millis(600))
        .client_only()
        .start()
        .await
        .expect("starts");
    catga_tests::until("the relay lease taken", Duration::from_secs(10), || {
        relay.is_outbox_relay()
    })
    .await;
    let standby = replica(&nats, &redis, "n2").await;
    assert!(!standby.is_outbox_relay());
    let client = standby.client();
    let run = run_id();
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..4)
        .map(|k| {
            let (client, stop, run) = (client.clone(), stop.clone(), run.clone());
            tokio::spawn(async move {
                let key = format!("k{k}");
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let n = Note {
                        run: run.clone(),
                        key: key.clone(),
                        seq,
                    };
                    client.send(n).await.expect("noted");
                }
                (key, seq)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    drop(relay);
    let took = catga_tests::until(
        "the standby taking the relay over",
        Duration::from_secs(5),
        || standby.is_outbox_relay(),
    )
    .await;
    eprintln!("relay taken over {took:?} after its replica died");
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = BTreeMap::new();
    for s in senders {
        let (key, last) = s.await.expect("sender");
        sent.insert(key, last);
    }
    let until = Instant::now() + Duration::from_secs(20);
    while standby.outbox_backlog().await.expect("backlog") > 0 {
        assert!(Instant::now() < until, "the outbox is stuck");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seqs = stream_seqs(&nats, &run).await;
    for (key, last) in &sent {
        assert_eq!(
            seqs.get(key).cloned().unwrap_or_default(),
            (1..=*last).collect::<Vec<_>>(),
            "{key}: every event once, in commit order"
        );
    }
    standby.shutdown().await.expect("clean shutdown");
}
