//! A replica shut down under load hands its work over without losing a
//! request: every request the broker routed to it before its unsubscribe
//! took effect is answered.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use catga::{Result, command};
use catga_tests::Backend;
use serde::{Deserialize, Serialize};

/// A little work.
#[command(reply = u64, subject = "tests.handover.work")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Chore {
    pub n: u64,
}

#[command(queue_group = "handover")]
async fn chore(c: Chore) -> Result<u64> {
    tokio::time::sleep(Duration::from_millis(1)).await;
    Ok(c.n)
}

catga_tests::on_both!(shutdown_under_load_loses_nothing);

/// Two replicas under continuous load from 32 senders; one of them is shut
/// down and started again, 20 times. No sender sees an error.
async fn shutdown_under_load_loses_nothing(b: &Backend) {
    let steady = b.runtime(module_path!(), "steady").await;
    let client = b.client().await.with_request_timeout(Duration::from_secs(3));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let senders: Vec<_> = (0..32)
        .map(|i| {
            let (client, stop, ok, failures) = (client.clone(), stop.clone(), ok.clone(), failures.clone());
            tokio::spawn(async move {
                let mut n = i;
                while !stop.load(Ordering::Relaxed) {
                    match client.send(Chore { n }).await {
                        Ok(r) if r == n => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failures
                            .lock()
                            .expect("lock")
                            .push(format!("wrong reply {r} for {n}")),
                        Err(e) => failures.lock().expect("lock").push(e.to_string()),
                    }
                    n += 32;
                }
            })
        })
        .collect();
    for round in 0..20 {
        let cycled = b.runtime(module_path!(), &format!("cycled-{round}")).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        cycled.shutdown().await.expect("clean shutdown under load");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.await.expect("sender");
    }
    let failures = failures.lock().expect("lock").clone();
    assert!(
        failures.is_empty(),
        "{} failed of {}: {:?}",
        failures.len(),
        ok.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    assert!(ok.load(Ordering::Relaxed) > 1000, "the load was real");
    steady.shutdown().await.expect("clean shutdown");
}
