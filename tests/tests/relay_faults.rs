//! The outbox relays of a sharded store (`CATGA_STORE_SHARDS=3`) over
//! three replica processes (`relay_replica`) on a real nats-server and
//! redis-server: deposits on 30 accounts, each account's in sequence,
//! keep coming while one replica is SIGKILLed, another SIGSTOPped past its relay
//! lease and its membership and resumed, and the killed one started
//! again. Every deposit answered has its event in the stream exactly
//! once, and each account's events are in the order of its deposits.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use catga::Client;
use catga_tests::process::Replica;
use catga_tests::{NatsServer, RedisServer};

use catga_tests::messages::relay::{Deposit, Deposited};

/// The relay lease and the membership, short so that the test sees each
/// hand-over within seconds.
const LEASE_MS: &str = "1000";
const MEMBER_TIMEOUT_MS: &str = "1500";
const MEMBER_HEARTBEAT_MS: &str = "300";

fn spawn(nats: &str, redis: &str, name: &str, dir: &Path) -> Replica {
    let env = [
        ("NATS_URL", nats),
        ("REDIS_URL", redis),
        ("CATGA_SERVICE", "relays"),
        ("CATGA_STORE_SHARDS", "3"),
        ("CATGA_OUTBOX_LEASE_MS", LEASE_MS),
        ("CATGA_MEMBER_TIMEOUT_MS", MEMBER_TIMEOUT_MS),
        ("CATGA_MEMBER_HEARTBEAT_MS", MEMBER_HEARTBEAT_MS),
        ("RUST_LOG", "info"),
    ];
    Replica::spawn(env!("CARGO_BIN_EXE_relay_replica"), &env, name, dir)
}

/// Sends `account`'s deposits in order until `stop`, each under its own
/// id and retried until answered; returns how many were answered.
async fn deposits(client: Client, account: String, stop: Arc<AtomicBool>) -> u64 {
    let mut seq = 0;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let id = format!("{account}-{seq}");
        let started = Instant::now();
        loop {
            let d = Deposit {
                account: account.clone(),
                seq,
            };
            match client.send_with_id(d, &id).await {
                Ok(n) => {
                    assert_eq!(n, seq, "{id}");
                    break;
                }
                Err(e) if e.is_retryable() && started.elapsed() < Duration::from_secs(60) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("deposit {id}: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seq
}

/// Every `Deposited` in its stream, in stream order, by account.
async fn in_stream(nats_url: &str) -> BTreeMap<String, Vec<u64>> {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.expect("connect"));
    let name = js
        .stream_by_subject("relay.deposited")
        .await
        .expect("the stream of the events");
    let mut stream = js.get_stream(name).await.expect("stream");
    let info = stream.info().await.expect("info");
    let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let m = stream.get_raw_message(seq).await.expect("message");
        let d: Deposited = serde_json::from_slice(&m.payload).expect("a Deposited");
        out.entry(d.account).or_default().push(d.seq);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_leaves_once_in_order_while_the_relays_of_the_shards_die_and_stall() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut replicas: Vec<Replica> = ["s1", "s2", "s3"]
        .iter()
        .map(|n| spawn(&nats.url(), &redis.url(), n, dir.path()))
        .collect();
    let client = Client::connect(&nats.url()).await.expect("client");
    let logs = |replicas: &[Replica]| catga_tests::process::logs(replicas);
    // Every replica serves, and the shards' relays are spread: each one
    // took a relay lease.
    let began = Instant::now();
    while !replicas.iter().all(|r| r.log().contains("lease=relay:")) {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the relay leases were not spread; logs:\n{}",
            logs(&replicas)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let accounts: Vec<String> = (0..30).map(|i| format!("acct-{i}")).collect();
    let senders: Vec<_> = accounts
        .iter()
        .map(|a| {
            let task = tokio::spawn(deposits(client.clone(), a.clone(), Arc::clone(&stop)));
            (a.clone(), task)
        })
        .collect();

    // Under load: SIGKILL one relay, SIGSTOP another past its lease and
    // its membership, resume it, start the killed one again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    replicas[0].sigkill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    replicas[1].signal("STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    replicas[1].signal("CONT");
    replicas[0] = spawn(&nats.url(), &redis.url(), "s1b", dir.path());
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);

    let mut answered: BTreeMap<String, u64> = BTreeMap::new();
    for (account, sender) in senders {
        answered.insert(account, sender.await.expect("sender"));
    }
    let total: u64 = answered.values().sum();
    assert!(total >= 100, "deposits went on under the faults: {answered:?}");

    // Every answered deposit's event is in the stream once, in order.
    let began = Instant::now();
    let stored = loop {
        let stored = in_stream(&nats.url()).await;
        let complete = answered
            .iter()
            .all(|(a, n)| stored.get(a).map_or(0, Vec::len) as u64 >= *n);
        if complete || began.elapsed() > Duration::from_secs(30) {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (account, n) in &answered {
        let got = stored.get(account).cloned().unwrap_or_default();
        let expected: Vec<u64> = (1..=*n).collect();
        assert_eq!(
            got,
            expected,
            "{account}: each deposit's event once, in order; logs:\n{}",
            logs(&replicas)
        );
    }
    // Relaying moved: a replica took a shard's lease after the start.
    let takes = logs(&replicas).matches("lease taken").count();
    assert!(takes > 3, "the shards' relays moved; logs:\n{}", logs(&replicas));
    drop(replicas);
}
