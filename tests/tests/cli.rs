//! The operator CLI (`catga`, run here as `catga::cli::run`) against a
//! service of two replicas on real nats-server and redis-server: services
//! with their handlers, leader and keyed-saga partitions; dead letters
//! listed, shown, replayed and purged; sagas; the outbox (the replicas'
//! store in 3 shards, the CLI told none).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use catga::{Config, Error, Result, Runtime, Saga, command, event, job, saga};
use catga_tests::{NatsServer, RedisServer, until};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Answers.
#[command(subject = "tests.cli.hello", reply = String, idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Hello {
    /// Who.
    pub name: String,
}

#[command(queue_group = "greeters")]
async fn hello(h: Hello) -> Result<String> {
    Ok(format!("hello {}", h.name))
}

/// Fails (dead-lettered at once) while `FIXED` is 0.
#[event(subject = "tests.cli.fragile")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Fragile {
    /// A mark to find in the letter.
    pub mark: String,
}

static FIXED: AtomicU64 = AtomicU64::new(0);
static HANDLED: AtomicU64 = AtomicU64::new(0);

#[event(durable = "cli-fragile", max_deliver = 1)]
async fn fragile(_f: Fragile) -> Result<()> {
    if FIXED.load(Ordering::SeqCst) == 0 {
        return Err(Error::invalid("not yet"));
    }
    HANDLED.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

/// Keyed by account.
#[event(subject = "tests.cli.entry")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Entry {
    /// The key.
    pub account: String,
}

#[saga(key = account, partitions = 4)]
async fn ledger(saga: &Saga, e: Entry) -> Result<()> {
    let _ = (saga, e);
    Ok(())
}

/// Starts a plain saga.
#[event(subject = "tests.cli.trip")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Trip {
    /// Which one.
    pub n: u64,
}

#[saga]
async fn book(saga: &Saga, t: Trip) -> Result<()> {
    saga.step(
        "hello",
        Hello {
            name: t.n.to_string(),
        },
    )
    .await?;
    Ok(())
}

/// Something only the leader does.
#[event(subject = "tests.cli.tick")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Tick;

#[event(leader)]
async fn on_tick(_t: Tick) -> Result<()> {
    Ok(())
}

/// A recurring job, listed by `catga jobs` run from this binary.
#[job(every = "1s")]
async fn cli_tick() -> Result<()> {
    Ok(())
}

fn config(nats: &NatsServer, redis: &RedisServer) -> Config {
    let mut c = Config::default();
    c.nats_url = Some(nats.url());
    c.redis_url = Some(redis.url());
    c.service = "shop-cli".to_owned();
    c
}

async fn cli(args: &[&str], c: &Config) -> String {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    catga::cli::run(&args, c.clone())
        .await
        .unwrap_or_else(|e| panic!("catga {args:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_and_operates_a_running_service() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let c = config(&nats, &redis);
    let mut replicas = Vec::new();
    for id in ["r1", "r2"] {
        // The replicas keep their store in 3 shards; the operator's shell
        // (`c`) does not say so: the CLI reads the count the store is
        // marked with.
        let rt = Runtime::builder()
            .config(c.clone())
            .store_shards(3)
            .instance_id(id)
            .membership(Duration::from_millis(100), Duration::from_millis(600))
            .handlers(|s| s.name().starts_with("cli::"))
            .start()
            .await
            .expect("starts");
        catga_tests::ready_within(&rt, Duration::from_secs(10)).await;
        replicas.push(rt);
    }
    // Until the keyed saga's partitions are split between the two.
    let started = std::time::Instant::now();
    let services = loop {
        let out = cli(&["--json", "services"], &c).await;
        let v: Value = serde_json::from_str(&out).expect("JSON");
        let mine: Vec<Value> = v
            .as_array()
            .expect("a list")
            .iter()
            .filter(|s| s["name"] == "shop-cli")
            .cloned()
            .collect();
        let split = mine.len() == 2
            && mine.iter().all(|s| {
                s["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| e["metadata"]["kind"] == "keyed_saga" && e["metadata"]["partitions"] != "")
            });
        if split && mine.iter().any(|s| s["metadata"]["leader"] == "true") {
            break mine;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "{out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        services
            .iter()
            .filter(|s| s["metadata"]["leader"] == "true")
            .count(),
        1,
        "one leader: {services:?}"
    );
    let text = cli(&["services"], &c).await;
    assert!(text.contains("shop-cli r1 v0.0.0"), "{text}");
    assert!(
        text.contains("command cli::hello on tests.cli.hello (queue group greeters)"),
        "{text}"
    );
    assert!(
        text.contains("keyed saga cli::ledger on tests.cli.entry: partitions ["),
        "{text}"
    );
    assert!(text.contains(" leader"), "{text}");

    // Dead letters: one appears, is shown, replayed once fixed, purged.
    let client = replicas[0].client();
    client
        .publish_durable(Fragile {
            mark: "cli-mark".to_owned(),
        })
        .await
        .expect("stored");
    let list = {
        let started = std::time::Instant::now();
        loop {
            let out = cli(&["dlq", "list", "--json"], &c).await;
            let v: Value = serde_json::from_str(&out).expect("JSON");
            if v.as_array().is_some_and(|a| !a.is_empty()) {
                break v;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "no dead letter: {out}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let seq = list[0]["seq"].as_u64().expect("seq");
    assert_eq!(list[0]["handler"], "cli::fragile");
    assert_eq!(list[0]["authentic"], true);
    let shown = cli(&["dlq", "show", &seq.to_string()], &c).await;
    assert!(shown.contains("cli-mark") && shown.contains("not yet"), "{shown}");
    FIXED.store(1, Ordering::SeqCst);
    let replayed = cli(&["dlq", "replay", &seq.to_string()], &c).await;
    assert_eq!(replayed, format!("replayed #{seq}\n"));
    until("the replayed letter handled", Duration::from_secs(15), || {
        HANDLED.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(cli(&["dlq", "list"], &c).await, "", "a replayed letter leaves");
    FIXED.store(0, Ordering::SeqCst);
    client
        .publish_durable(Fragile {
            mark: "again".to_owned(),
        })
        .await
        .expect("stored");
    let started = std::time::Instant::now();
    while cli(&["dlq", "list"], &c).await.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(15), "no second letter");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cli(&["--json", "dlq", "purge-all"], &c).await, "{\"purged\":1}\n");
    assert_eq!(cli(&["dlq", "list"], &c).await, "");

    // Sagas and the outbox.
    client.publish_durable(Trip { n: 7 }).await.expect("stored");
    let started = std::time::Instant::now();
    loop {
        let out = cli(&["sagas", "5"], &c).await;
        if out.contains("book:") && out.contains("completed") && out.contains("hello (done)") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "{out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outbox: Value = serde_json::from_str(&cli(&["outbox", "--json"], &c).await).expect("JSON");
    assert_eq!(outbox["outbox_backlog"], 0);
    let shards = outbox["shards"].as_array().expect("the shards");
    assert_eq!(shards.len(), 3, "{outbox}");
    assert!(
        shards.iter().all(|s| s["waiting"] == 0 && s["oldest_ms"] == 0),
        "{outbox}"
    );
    let text = cli(&["outbox"], &c).await;
    assert!(
        text.starts_with("0 events saved and not yet published\nshard 0: none waiting\n"),
        "{text}"
    );

    // Delayed messages: listed soonest first, one cancelled.
    let later = replicas[0]
        .publish_after(Duration::from_secs(600), Tick)
        .await
        .expect("delayed");
    let sooner = replicas[0]
        .publish_after(Duration::from_secs(300), Tick)
        .await
        .expect("delayed");
    let listed: Value = serde_json::from_str(&cli(&["delayed", "--json"], &c).await).expect("JSON");
    let ids: Vec<&str> = listed
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, [sooner.as_str(), later.as_str()], "soonest first: {listed}");
    assert!(cli(&["delayed"], &c).await.contains("tests.cli.tick  due in 29"));
    let cancelled: Value =
        serde_json::from_str(&cli(&["--json", "delayed", "cancel", &later], &c).await).expect("JSON");
    assert_eq!(cancelled["cancelled"], true);
    assert!(
        cli(&["delayed", "cancel", &later], &c)
            .await
            .contains("no delayed message")
    );
    assert_eq!(replicas[0].delayed(10).await.expect("listing").len(), 1);

    // The jobs of this binary, with the last occurrence stored.
    let started = std::time::Instant::now();
    loop {
        let jobs: Value = serde_json::from_str(&cli(&["jobs", "--json"], &c).await).expect("JSON");
        let job = &jobs[0];
        assert_eq!(job["schedule"], "every 1s", "{jobs}");
        assert!(
            job["name"].as_str().is_some_and(|n| n.ends_with("cli_tick")),
            "{jobs}"
        );
        if job["last_ms"].is_u64() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{jobs}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A run on demand: stored now, listed as the last one stored.
    let run: Value =
        serde_json::from_str(&cli(&["--json", "jobs", "run", "cli_tick"], &c).await).expect("JSON");
    assert!(
        run["name"].as_str().is_some_and(|n| n.ends_with("::cli_tick")),
        "{run}"
    );
    let at = run["at_ms"].as_u64().expect("its time");
    let jobs: Value = serde_json::from_str(&cli(&["jobs", "--json"], &c).await).expect("JSON");
    assert!(
        jobs[0]["last_ms"].as_u64().is_some_and(|l| l >= at),
        "{jobs} after {run}"
    );
    assert!(
        cli(&["jobs", "run", "cli_tick"], &c)
            .await
            .contains("stored to run now")
    );
    let unknown = catga::cli::run(
        &["jobs".to_owned(), "run".to_owned(), "nope".to_owned()],
        c.clone(),
    )
    .await
    .expect_err("no such job");
    assert_eq!(unknown.kind(), catga::ErrorKind::NotFound, "{unknown}");

    // Misuse is a usage error, said before connecting.
    for bad in [
        &["dlq", "show"][..],
        &["dlq", "list", "abc"],
        &["dlq", "purge-all", "now"],
        &["services", "extra"],
        &["--jsn", "services"],
        &["sagas", "x"],
        &["delayed", "x"],
        &["delayed", "5", "junk"],
        &["delayed", "cancel"],
        &["jobs", "extra"],
        &["jobs", "run"],
        &["jobs", "run", "cli_tick", "extra"],
        &["--service"],
    ] {
        let args: Vec<String> = bad.iter().map(|a| (*a).to_owned()).collect();
        let err = catga::cli::run(&args, c.clone())
            .await
            .expect_err("a usage error");
        assert_eq!(err.kind(), catga::ErrorKind::Invalid, "{bad:?}: {err}");
    }
    for rt in replicas {
        rt.shutdown().await.expect("clean shutdown");
    }
}
