//! A recurring job over three replica processes (`job_replica`: every
//! 500 ms, idempotent, each run taking 300 ms) on a real nats-server and
//! redis-server, with the default settings. The replica running an
//! occurrence is SIGKILLed; later another one is SIGSTOPped while it runs
//! one, past the job's ack wait and its inbox lease, and resumed. Every
//! occurrence in the window ran exactly once (counted in the store,
//! committed with each run's inbox entry), none was skipped, and none
//! ran later than the bound the README states.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use catga::Client;
use catga_tests::process::Replica;
use catga_tests::{NatsServer, RedisServer};

/// The job's period.
const EVERY: u64 = 500;

/// How late an occurrence may run here: the README says an occurrence
/// whose replica dies or stalls mid-run runs again after the job's ack
/// wait (5 s), and the ones after it wait their turn. In this test one
/// occurrence meets both faults (10 s), plus its run (300 ms), plus slack
/// for a loaded host.
const LATEST_MS: u64 = 20_000;

fn spawn(nats: &str, redis: &str, name: &str, dir: &Path) -> Replica {
    let env = [
        ("NATS_URL", nats),
        ("REDIS_URL", redis),
        ("CATGA_SERVICE", "jobs"),
        ("RUST_LOG", "info"),
    ];
    Replica::spawn(env!("CARGO_BIN_EXE_job_replica"), &env, name, dir)
}

/// The occurrence `replica` started and has not finished, if any (it
/// prints `running <at>` and `ran <at>`).
fn running(replica: &Replica) -> Option<String> {
    let log = replica.log();
    let started = log.lines().rev().find_map(|l| l.strip_prefix("running "))?;
    (!log.contains(&format!("ran {started}"))).then(|| started.to_owned())
}

async fn runs(client: &Client) -> BTreeMap<u64, (u32, u64)> {
    client
        .send(catga_tests_job_replica::ReadRuns)
        .await
        .unwrap_or_default()
}

/// The runs' messages, declared as the replica binary declares them.
mod catga_tests_job_replica {
    use catga::command;
    use serde::{Deserialize, Serialize};

    #[command(reply = std::collections::BTreeMap<u64, (u32, u64)>, subject = "jobs.runs")]
    #[derive(Serialize, Deserialize, Debug, Clone)]
    pub struct ReadRuns;
}

/// Waits until a replica is in the middle of a run, and returns it.
async fn one_running(replicas: &[Replica], skip: &[&str]) -> usize {
    let start = Instant::now();
    loop {
        if let Some(i) = replicas
            .iter()
            .position(|r| r.is_running() && !skip.contains(&r.name.as_str()) && running(r).is_some())
        {
            return i;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no replica runs the job"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_occurrence_runs_once_while_the_replica_running_it_is_killed_or_stalled() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut replicas: Vec<Replica> = ["j1", "j2", "j3"]
        .iter()
        .map(|n| spawn(&nats.url(), &redis.url(), n, dir.path()))
        .collect();
    let client = Client::connect(&nats.url()).await.expect("client");
    let began = Instant::now();
    while runs(&client).await.len() < 4 {
        assert!(
            began.elapsed() < Duration::from_secs(30),
            "the job did not run; logs:\n{}",
            catga_tests::process::logs(&replicas)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGKILL the replica in the middle of a run.
    let killed = one_running(&replicas, &[]).await;
    let killed_at = running(&replicas[killed]);
    replicas[killed].sigkill();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // SIGSTOP another one in the middle of a run, past the job's ack wait
    // (5 s) and its inbox lease (1 s), then let it go on.
    let killed_name = replicas[killed].name.clone();
    let stalled = one_running(&replicas, &[&killed_name]).await;
    let stalled_at = running(&replicas[stalled]);
    replicas[stalled].signal("STOP");
    tokio::time::sleep(Duration::from_secs(7)).await;
    replicas[stalled].signal("CONT");

    // The window: every occurrence up to 2 s after the stall ended must
    // run (the ones after it may still be queued).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let window_end = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default();
    let began = Instant::now();
    let seen = loop {
        let seen = runs(&client).await;
        let first = seen.keys().next().copied().unwrap_or(u64::MAX);
        let complete = (first..=window_end)
            .step_by(EVERY as usize)
            .all(|t| seen.contains_key(&t));
        if complete || began.elapsed() > Duration::from_secs(30) {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let context = format!(
        "killed {killed_name} running {killed_at:?}, stalled {} running {stalled_at:?}; runs: {seen:?}; logs:\n{}",
        replicas[stalled].name,
        catga_tests::process::logs(&replicas)
    );
    let first = *seen.keys().next().expect("runs");
    assert!(
        window_end > first + 10_000,
        "a window of at least 10 s: {context}"
    );
    for t in (first..=window_end).step_by(EVERY as usize) {
        let Some((n, late)) = seen.get(&t) else {
            panic!("the occurrence at {t} never ran: {context}");
        };
        assert_eq!(*n, 1, "the occurrence at {t} ran {n} times: {context}");
        assert!(
            *late <= LATEST_MS,
            "the occurrence at {t} ran {late} ms late: {context}"
        );
    }
    for t in seen.keys() {
        assert_eq!(t % EVERY, 0, "an occurrence off the schedule: {context}");
    }
    drop(replicas);
}
