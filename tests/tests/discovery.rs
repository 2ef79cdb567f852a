//! NATS micro discovery against a real nats-server, spoken by a plain
//! async-nats client: `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` for all
//! services, one service and one replica; `$SRV.SCHEMA`, catga's own verb,
//! with the replica's AsyncAPI document; and the start-up check that
//! refuses a second service on a command subject.

use std::time::Duration;

use catga::{Error, Result, Runtime, Saga, command, event, saga};
use catga_tests::{NatsServer, RedisServer};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Adds one.
#[command(reply = u64, subject = "shop.add")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Add {
    /// The number.
    pub n: u64,
}

/// Fails.
#[command(subject = "shop.fail")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Fail;

/// Something happened.
#[event(subject = "shop.happened")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Happened;

#[command(queue_group = "adders")]
async fn add(a: Add) -> Result<u64> {
    Ok(a.n + 1)
}

#[command]
async fn fail(_f: Fail) -> Result<()> {
    Err(Error::invalid("always"))
}

#[event]
async fn on_happened(_h: Happened) -> Result<()> {
    Ok(())
}

/// An entry in a ledger, keyed by account.
#[event(subject = "shop.entry")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Entry {
    /// The key.
    pub account: String,
}

/// Entries the ledger saga booked.
static BOOKED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[saga(key = account, partitions = 4)]
async fn ledger(saga: &Saga, e: Entry) -> Result<()> {
    let _ = (saga, e);
    BOOKED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

async fn shop(nats: &NatsServer, service: &str, id: &str) -> Result<Runtime> {
    let rt = Runtime::builder()
        .nats_url(nats.url())
        .service(service)
        .service_version("1.2.3")
        .instance_id(id)
        .handlers(|s| s.name().starts_with("discovery::") && s.name() != "discovery::ledger")
        .start()
        .await?;
    rt.ready().await?;
    Ok(rt)
}

/// Every answer to `subject` within half a second, as a plain client
/// collects them.
async fn ask(nats: &async_nats::Client, subject: &str) -> Vec<Value> {
    let inbox = nats.new_inbox();
    let mut sub = nats.subscribe(inbox.clone()).await.expect("sub");
    nats.publish_with_reply(subject.to_owned(), inbox, "".into())
        .await
        .expect("publish");
    let mut out = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some(m)) = tokio::time::timeout_at(until, sub.next()).await {
        // A status message ("no responders") is not an answer.
        if m.status.is_none() {
            out.push(serde_json::from_slice(&m.payload).unwrap_or_else(|e| panic!("{e}: {m:?}")));
        }
    }
    out.sort_by_key(|v: &Value| v["id"].as_str().unwrap_or_default().to_owned());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_answer_ping_info_and_stats() {
    let server = NatsServer::start();
    let r1 = shop(&server, "shop", "r1").await.expect("r1");
    let r2 = shop(&server, "shop", "r2").await.expect("r2");
    let plain = async_nats::connect(server.url()).await.expect("plain client");

    let pings = ask(&plain, "$SRV.PING").await;
    assert_eq!(pings.len(), 2, "{pings:?}");
    for (p, id) in pings.iter().zip(["r1", "r2"]) {
        assert_eq!(p["type"], "io.nats.micro.v1.ping_response");
        assert_eq!(p["name"], "shop");
        assert_eq!(p["id"], id);
        assert_eq!(p["version"], "1.2.3");
    }
    assert_eq!(ask(&plain, "$SRV.PING.shop.r2").await.len(), 1);
    assert!(ask(&plain, "$SRV.PING.other").await.is_empty());

    let infos = ask(&plain, "$SRV.INFO.shop").await;
    assert_eq!(infos.len(), 2);
    let info = &infos[0];
    assert_eq!(info["type"], "io.nats.micro.v1.info_response");
    let endpoints = info["endpoints"].as_array().expect("endpoints");
    let subjects: Vec<(&str, &str, &str)> = endpoints
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default(),
                e["subject"].as_str().unwrap_or_default(),
                e["queue_group"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        subjects,
        [("add", "shop.add", "adders"), ("fail", "shop.fail", "shop.fail")],
        "command handlers only, with their queue groups"
    );
    assert_eq!(endpoints[0]["metadata"]["handler"], "discovery::add");

    let client = catga::Client::connect(&server.url()).await.expect("client");
    for n in 0..6 {
        assert_eq!(client.send(Add { n }).await.expect("add"), n + 1);
    }
    for _ in 0..2 {
        client.send(Fail).await.expect_err("fails");
    }
    let stats = ask(&plain, "$SRV.STATS.shop").await;
    assert_eq!(stats.len(), 2);
    let total = |name: &str, field: &str| -> u64 {
        stats
            .iter()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["name"] == name)
            .map(|e| e[field].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(total("add", "num_requests"), 6);
    assert_eq!(total("add", "num_errors"), 0);
    assert_eq!(total("fail", "num_requests"), 2);
    assert_eq!(total("fail", "num_errors"), 2);
    let failing = stats
        .iter()
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .find(|e| e["name"] == "fail" && e["num_errors"].as_u64() > Some(0))
        .expect("a replica that failed");
    assert_eq!(failing["last_error"], "invalid");
    assert_eq!(stats[0]["type"], "io.nats.micro.v1.stats_response");
    assert!(stats[0]["started"].as_str().is_some_and(|s| s.ends_with('Z')));

    r1.shutdown().await.expect("shutdown");
    assert_eq!(ask(&plain, "$SRV.PING.shop").await.len(), 1, "r1 is gone");
    r2.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_service_on_a_command_subject_is_refused() {
    let server = NatsServer::start();
    let shop_rt = shop(&server, "shop", "s1").await.expect("first");
    let err = shop(&server, "not-shop", "n1").await.expect_err("refused");
    assert_eq!(err.kind(), catga::ErrorKind::Config, "{err}");
    let text = err.message();
    assert!(
        text.contains("shop.add (served by `shop`)") && text.contains("shop.fail"),
        "{text}"
    );
    assert!(text.contains("CATGA_SUBJECT_CONFLICT"), "{text}");
    // Another replica of the same service is no conflict.
    let second = shop(&server, "shop", "s2").await.expect("same service");
    // Told to warn, it starts.
    let warned = Runtime::builder()
        .nats_url(server.url())
        .service("not-shop")
        .refuse_subject_conflicts(false)
        .handlers(|s| s.name().starts_with("discovery::"))
        .start()
        .await
        .expect("starts with a warning");
    for rt in [shop_rt, second, warned] {
        rt.shutdown().await.expect("shutdown");
    }
}

/// A service that is not catga but speaks NATS micro (async-nats' own
/// `service` implementation) is found too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_micro_service_on_the_subject_is_found() {
    use async_nats::service::ServiceExt;
    let server = NatsServer::start();
    let plain = async_nats::connect(server.url()).await.expect("plain");
    let legacy = plain
        .service_builder()
        .description("an adder written on async-nats")
        .start("legacy-adder", "0.9.0")
        .await
        .expect("micro service");
    let _endpoint = legacy.endpoint("shop.add").await.expect("endpoint");
    plain.flush().await.expect("flush");
    let err = shop(&server, "shop", "s1").await.expect_err("refused");
    assert!(
        err.message().contains("shop.add (served by `legacy-adder`)"),
        "{err}"
    );
}

/// Keyed sagas are listed too: each replica names the partitions it
/// serves and whether it routes the triggers; together they serve every
/// partition once and one routes. Their statistics count what the
/// partitions served here handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_sagas_are_listed_with_their_partitions() {
    let server = NatsServer::start();
    let redis = RedisServer::start();
    let mut replicas = Vec::new();
    for id in ["k1", "k2"] {
        let rt = Runtime::builder()
            .nats_url(server.url())
            .redis_url(redis.url())
            .service("ledgers")
            .instance_id(id)
            .membership(Duration::from_millis(100), Duration::from_millis(600))
            .handlers(|s| s.name() == "discovery::ledger")
            .start()
            .await
            .expect("starts");
        catga_tests::ready_within(&rt, Duration::from_secs(10)).await;
        replicas.push(rt);
    }
    let plain = async_nats::connect(server.url()).await.expect("plain client");
    // Until the two replicas split the partitions between them.
    let started = std::time::Instant::now();
    let infos = loop {
        let infos = ask(&plain, "$SRV.INFO.ledgers").await;
        let served: Vec<String> = infos
            .iter()
            .map(|i| {
                i["endpoints"][0]["metadata"]["partitions"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect();
        if infos.len() == 2 && served.iter().all(|p| !p.is_empty()) {
            break infos;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{infos:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut all: Vec<u32> = Vec::new();
    let mut routing = 0;
    for info in &infos {
        let endpoints = info["endpoints"].as_array().expect("endpoints");
        assert_eq!(endpoints.len(), 1, "{info}");
        let e = &endpoints[0];
        assert_eq!(e["name"], "ledger");
        assert_eq!(e["subject"], "shop.entry");
        assert_eq!(e["metadata"]["handler"], "discovery::ledger");
        assert_eq!(e["metadata"]["kind"], "keyed_saga");
        assert_eq!(e["metadata"]["partitions_total"], "4");
        let served = e["metadata"]["partitions"].as_str().expect("partitions");
        all.extend(served.split(',').map(|p| p.parse::<u32>().expect("a number")));
        assert_eq!(
            e["metadata"]["router_shares_total"], "1",
            "one stream, one router share"
        );
        if e["metadata"]["routing"] == "true" {
            routing += 1;
            assert_eq!(e["metadata"]["routing_shares"], "0", "{info}");
        } else {
            assert_eq!(e["metadata"]["routing_shares"], "", "{info}");
        }
    }
    all.sort_unstable();
    assert_eq!(all, [0, 1, 2, 3], "every partition served once: {infos:?}");
    assert_eq!(routing, 1, "one router: {infos:?}");

    let client = replicas[0].client();
    for n in 0..12 {
        client
            .publish_durable(Entry {
                account: format!("a{n}"),
            })
            .await
            .expect("stored");
    }
    catga_tests::until("12 entries booked", Duration::from_secs(15), || {
        BOOKED.load(std::sync::atomic::Ordering::SeqCst) == 12
    })
    .await;
    let stats = ask(&plain, "$SRV.STATS.ledgers").await;
    let handled: u64 = stats
        .iter()
        .map(|s| s["endpoints"][0]["num_requests"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(handled, 12, "{stats:?}");
    for rt in replicas {
        rt.shutdown().await.expect("clean shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_answer_schema_with_their_asyncapi_document() {
    let server = NatsServer::start();
    let r1 = shop(&server, "shop", "r1").await.expect("r1");
    let plain = async_nats::connect(server.url()).await.expect("plain client");

    assert!(
        ask(&plain, "$SRV.SCHEMA").await.is_empty(),
        "asked without a name, no replica sends its whole document"
    );
    let docs = ask(&plain, "$SRV.SCHEMA.shop").await;
    assert_eq!(docs.len(), 1, "{docs:?}");
    let doc = &docs[0];
    assert_eq!(doc, &r1.asyncapi(), "the replica answers with its own document");
    let found = catga_tests::asyncapi::problems(doc);
    assert!(found.is_empty(), "{found:#?}");
    assert_eq!(
        (&doc["info"]["title"], &doc["info"]["version"]),
        (&"shop".into(), &"1.2.3".into())
    );
    // The replica's selection: the keyed saga it does not serve has no
    // operation, its event type is still listed as a channel.
    let ops: Vec<&String> = doc["operations"]
        .as_object()
        .expect("operations")
        .keys()
        .collect();
    assert_eq!(ops, ["discovery.add", "discovery.fail", "discovery.on_happened"]);
    assert_eq!(
        doc["operations"]["discovery.add"]["bindings"]["nats"]["queue"],
        "adders"
    );
    assert_eq!(
        doc["operations"]["discovery.fail"]["bindings"]["nats"]["queue"],
        "shop.fail"
    );
    assert!(
        doc["operations"]["discovery.on_happened"]
            .get("bindings")
            .is_none(),
        "fan-out"
    );
    assert_eq!(doc["channels"]["shop.entry"]["address"], "shop.entry");
    // `Add` derives no `JsonSchema`: any value, and said so; its reply
    // (`u64`) has a schema.
    let add = &doc["components"]["messages"]["Add"]["payload"];
    assert!(
        add["description"]
            .as_str()
            .is_some_and(|d| d.contains("does not derive")),
        "{add}"
    );
    assert_eq!(
        doc["components"]["messages"]["Add.reply"]["payload"]["type"],
        "integer"
    );

    // From code, and from the CLI as the standalone `catga` asks.
    let client = catga::Client::connect(&server.url()).await.expect("client");
    assert_eq!(&client.asyncapi("shop").await.expect("asked"), doc);
    let err = client.asyncapi("nobody").await.expect_err("no replica");
    assert_eq!(err.kind(), catga::ErrorKind::NoHandler, "{err}");
    let config = catga::Config::from_lookup(|k| (k == "NATS_URL").then(|| server.url())).expect("config");
    let args: Vec<String> = ["--service", "shop", "schema", "--live"]
        .map(String::from)
        .to_vec();
    let out = catga::cli::run(&args, config).await.expect("catga schema");
    assert_eq!(&serde_json::from_str::<Value>(&out).expect("JSON"), doc);
    r1.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn an_embedded_runtime_has_its_document_but_serves_none() {
    let rt = Runtime::builder()
        .service("shop")
        .handlers(|s| s.name() == "discovery::add")
        .start()
        .await
        .expect("embedded");
    let doc = rt.asyncapi();
    assert!(catga_tests::asyncapi::problems(&doc).is_empty());
    let ops: Vec<&String> = doc["operations"]
        .as_object()
        .expect("operations")
        .keys()
        .collect();
    assert_eq!(ops, ["discovery.add"]);
    let err = rt
        .client()
        .asyncapi("shop")
        .await
        .expect_err("no discovery without NATS");
    assert_eq!(err.kind(), catga::ErrorKind::Config, "{err}");
    rt.shutdown().await.expect("shutdown");
}

/// A document larger than the broker's `max_payload` is not sent: the
/// asker is told so, not that no replica answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_over_max_payload_is_refused_with_a_reason() {
    let server = NatsServer::start_with("max_payload: 4096");
    let r1 = shop(&server, "shop", "r1").await.expect("r1");
    assert!(
        r1.asyncapi().to_string().len() > 4096,
        "the test needs a larger document"
    );
    let client = catga::Client::connect(&server.url()).await.expect("client");
    let err = client.asyncapi("shop").await.expect_err("too large");
    assert_eq!(err.kind(), catga::ErrorKind::TooLarge, "{err}");
    assert!(err.message().contains("max_payload (4096)"), "{err}");
    r1.shutdown().await.expect("shutdown");
}
