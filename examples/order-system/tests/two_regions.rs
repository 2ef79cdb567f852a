//! Drives `deploy/two-regions`: two regions (a NATS cluster each, joined
//! by gateways), one Redis and two replicas of the example per region, as
//! real processes on loopback. A load client in region b is served by
//! b's replicas; b's replicas are SIGKILLed while a load runs in b, and
//! region a serves it with nothing lost; b's replicas come back and serve
//! b again; the revenue ledger counts every payment once; `stop` leaves
//! nothing running.

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use catga_tests::process::DeployScript;
use catga_tests::servers::alive;
use order_system::orders::GetRevenue;

/// Orders `replica` created so far (its log says so per order).
fn created(regions: &DeployScript, replica: &str) -> usize {
    std::fs::read_to_string(regions.dir.path().join(format!("{replica}.log")))
        .unwrap_or_default()
        .matches("order created")
        .count()
}

fn loaded(out: &Output, orders: u32) {
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the load lost orders");
    assert!(text.contains(&format!("{orders} ok, 0 failed")), "{text}");
}

#[test]
fn two_regions_serve_locally_fail_over_and_stop_cleanly() {
    let regions = DeployScript::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/two-regions"),
        ("CATGA_REGIONS_DIR", "CATGA_REGIONS_BASE_PORT"),
        env!("CARGO_BIN_EXE_order-system"),
    );
    let started = regions.run(&["start"]);
    let status = String::from_utf8_lossy(&started.stdout).into_owned();
    assert!(
        status.contains("b2: running") && status.contains("region b"),
        "{status}"
    );
    let by_region = |r: char| -> usize { (1..=2).map(|n| created(&regions, &format!("{r}{n}"))).sum() };

    // Region b's callers are served in region b.
    loaded(&regions.run(&["load", "b", "100", "8"]), 100);
    assert_eq!((by_region('a'), by_region('b')), (0, 100));

    // b's replicas are SIGKILLed while a load runs in b: region a serves
    // it, nothing lost (the load client retries under the same ids).
    let load = regions
        .command(&["load", "b", "300", "8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("load");
    // Killed mid-load: once b took part of it, and before it is done.
    let b_before = by_region('b');
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while by_region('b') < b_before + 50 && std::time::Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(by_region('b') >= b_before + 50, "region b did not take the load");
    regions.run(&["kill", "b"]);
    loaded(&load.wait_with_output().expect("load ran"), 300);
    // The logs show who ran the handler, not what was committed (an
    // idempotent handler's writes commit after it returns, so a replica
    // killed in between logged an order its retry then created): the
    // ledger below counts each payment exactly.
    assert!(by_region('a') > 0, "region a took over");

    // b's replicas come back and serve b again.
    regions.run(&["revive", "b"]);
    let (a_before, b_before) = (by_region('a'), by_region('b'));
    loaded(&regions.run(&["load", "b", "100", "8"]), 100);
    assert_eq!(
        (by_region('a') - a_before, by_region('b') - b_before),
        (0, 100),
        "region b serves its own again"
    );

    // Every payment counted once, whichever region took it: 500 orders
    // of 4.50 each.
    let revenue = tokio::runtime::Runtime::new().expect("runtime").block_on(async {
        let client = catga::Client::connect(&format!("nats://127.0.0.1:{}", regions.base + 1))
            .await
            .expect("client");
        let until = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = client.send(GetRevenue).await.expect("revenue");
            if r.payments >= 500 || std::time::Instant::now() > until {
                // A late second count of a payment would show by now.
                tokio::time::sleep(Duration::from_millis(500)).await;
                return client.send(GetRevenue).await.expect("revenue");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    assert_eq!((revenue.payments, revenue.cents), (500, 500 * 450));

    // What runs now, the revived replicas included.
    let pids: Vec<u32> = ["nats-a", "nats-b", "redis", "a1", "a2", "b1", "b2"]
        .iter()
        .map(|n| regions.pid(n).expect("pid"))
        .collect();
    regions.run(&["stop"]);
    std::thread::sleep(Duration::from_millis(200));
    for pid in pids {
        assert!(!alive(pid), "pid {pid} still runs after stop");
    }
    assert!(String::from_utf8_lossy(&regions.run(&["status"]).stdout).contains("not running"));
}
