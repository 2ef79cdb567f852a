//! A rolling upgrade of one service over two replica processes
//! (`upgrade_replica`) on a real nats-server and redis-server, under load
//! from clients of both releases. Release N (version 1 of `upgrade.pay`
//! and `upgrade.paid`) is replaced one replica at a time, each SIGTERMed
//! while requests are in flight, by release N+1 (reads version 2,
//! upcasting 1, still sends 1); once every replica runs N+1, clients
//! start sending version 2 too; then release N+2 (sends version 2
//! events) replaces N+1 the same way. No payment is refused, none is
//! lost, each is counted once, with the amount it was sent with.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use catga::Client;
use catga_tests::process::Replica;
use catga_tests::{NatsServer, RedisServer};

use catga_tests::messages::upgrade::{ReadLedger, v1, v2};

fn spawn(nats: &str, redis: &str, name: &str, release: &str, dir: &Path) -> Replica {
    let env = [
        ("NATS_URL", nats),
        ("REDIS_URL", redis),
        ("CATGA_SERVICE", "upgrade"),
        ("RELEASE", release),
        ("RUST_LOG", "info"),
    ];
    Replica::spawn(env!("CARGO_BIN_EXE_upgrade_replica"), &env, name, dir)
}

/// Pays orders `<prefix>-1`, `-2`, ... until `stop`, in version 2 when
/// `new`, each retried under its id until answered; a refusal fails the
/// test. The orders answered, with their cents.
async fn payments(
    client: Client,
    prefix: &'static str,
    new: bool,
    stop: Arc<AtomicBool>,
) -> Vec<(String, u64)> {
    let mut answered = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let order = format!("{prefix}-{n}");
        let cents = 100 + n * 7 % 900;
        let started = Instant::now();
        loop {
            let sent = if new {
                let pay = v2::Pay {
                    order: order.clone(),
                    amount: v2::Money {
                        cents,
                        currency: "EUR".to_owned(),
                    },
                };
                client.send_with_id(pay, &order).await
            } else {
                let pay = v1::Pay {
                    order: order.clone(),
                    cents,
                };
                client.send_with_id(pay, &order).await
            };
            match sent {
                Ok(got) => {
                    assert_eq!(got, cents, "{order}");
                    break;
                }
                Err(e) if e.is_retryable() && started.elapsed() < Duration::from_secs(60) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{order} was refused: {e}"),
            }
        }
        answered.push((order, cents));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_and_new_releases_side_by_side_refuse_nothing_under_load() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let (n, r) = (nats.url(), redis.url());
    let mut replicas = vec![
        spawn(&n, &r, "a1", "n", dir.path()),
        spawn(&n, &r, "a2", "n", dir.path()),
    ];
    let client = Client::connect(&n).await.expect("client");
    let began = Instant::now();
    let probe = || ReadLedger {
        order: "none".to_owned(),
    };
    while client.send(probe()).await.is_err() {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "release N did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let old = tokio::spawn(payments(client.clone(), "old", false, Arc::clone(&stop)));
    // SIGTERM, then the graceful shutdown: a blocking wait, off the
    // senders' way.
    let roll = |replicas: &mut Vec<Replica>, at: usize, name: &str, release: &str| {
        let status = tokio::task::block_in_place(|| replicas[at].terminate(Duration::from_secs(30)));
        assert!(
            status.success(),
            "{} drained and exited: {status}",
            replicas[at].name
        );
        replicas[at] = spawn(&n, &r, name, release, dir.path());
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    roll(&mut replicas, 0, "b1", "n1");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    roll(&mut replicas, 1, "b2", "n1");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    // Every replica reads version 2: new clients may send it.
    let new = tokio::spawn(payments(client.clone(), "new", true, Arc::clone(&stop)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    roll(&mut replicas, 0, "c1", "n2");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    roll(&mut replicas, 1, "c2", "n2");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut answered = old.await.expect("old clients");
    let new = new.await.expect("new clients");
    assert!(
        answered.len() >= 50 && new.len() >= 10,
        "load went on: {} old, {} new",
        answered.len(),
        new.len()
    );
    answered.extend(new);

    let logs = || catga_tests::process::logs(&replicas);
    let began = Instant::now();
    for (order, cents) in &answered {
        let counted = loop {
            let read = ReadLedger { order: order.clone() };
            let counted = client.send(read).await.ok().flatten();
            if counted.is_some() || began.elapsed() > Duration::from_secs(30) {
                break counted;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            counted,
            Some((1, *cents)),
            "{order}: counted once with its amount; logs:\n{}",
            logs()
        );
    }
    drop(replicas);
}
