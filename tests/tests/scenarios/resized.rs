//! A keyed saga whose `partitions` changed, over several streams: the
//! streams list the partitions' subjects, so a replica with the other
//! count is refused (not ready, naming both lists), instead of rewriting
//! the lists that the replicas with the first count use.

use std::time::{Duration, Instant};

use catga::{Result, Saga, event, saga};
use catga_tests::Backend;
use serde::{Deserialize, Serialize};

use crate::WAIT;

/// Starts [`ledger`] here: the same saga name as `keyed::ledger`, with 6
/// partitions instead of 8.
#[event(subject = "tests.resized.posted")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Resized {
    /// Whose.
    pub account: String,
}

#[saga(key = account, partitions = 6)]
async fn ledger(_saga: &Saga, _e: Resized) -> Result<()> {
    Ok(())
}

fn over_three(b: &Backend, module: &str, id: &str) -> catga::RuntimeBuilder {
    b.builder(module, id)
        .membership(Duration::from_millis(100), Duration::from_millis(500))
        .drain_timeout(Duration::from_millis(1500))
        .streams(catga::StreamSettings {
            saga_streams: 3,
            ..Default::default()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_partition_count_is_refused_over_several_streams() {
    let b = Backend::nats();
    // 8 partitions over 3 streams (`keyed::ledger`).
    let eight = b.started(over_three(&b, "scenarios::keyed", "r1")).await;
    let resized = over_three(&b, module_path!(), "r2")
        .start()
        .await
        .expect("starts");
    let started = Instant::now();
    loop {
        let failing = resized.readiness().failing;
        if failing.iter().any(|f| {
            f.contains("ledger") && f.contains("stores other saga partitions") && f.contains("`partitions`")
        }) {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "readiness does not name the partitions: {failing:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        eight.is_ready(),
        "the replica with the first count keeps serving: {:?}",
        eight.readiness()
    );
    resized.shutdown().await.expect("r2 shuts down cleanly");
    eight.shutdown().await.expect("r1 shuts down cleanly");
}
