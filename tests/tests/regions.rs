//! Toward regions: the streams catga creates are placed where
//! `CATGA_JS_PLACEMENT` says; a stream an operator created or changed is
//! used as it is, not rewritten, while one catga made is brought in line
//! (keeping what an operator added beside catga's settings); a stream of
//! another name storing a subject keeps its handler from binding; a
//! replica behind a leaf node reaches
//! the hub's JetStream through `CATGA_JS_DOMAIN`; the region is named in
//! discovery, `/ready` and the metrics. And two regions (two NATS clusters
//! joined by gateways, replica processes in each): a region's requests
//! are answered by its own replicas; when they are SIGKILLed under load
//! the other region answers, nothing lost after one retry; when they come
//! back they take their region's requests again. Durable events are
//! handled by the replicas of the region their stream lives in, by the
//! other region's while it has none, and there again once they are back.
//! A region whose NATS is killed leaves the other region answering its
//! own callers, and answers its own again when its NATS is back; with
//! three regions, JetStream keeps its quorum without it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use catga::{Result, Runtime, StreamPlacement, StreamSettings, event};
use catga_tests::messages::region::Where;
use catga_tests::process::{Replica, logs};
use catga_tests::{NatsServer, until};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Paid (its stream placed, then changed by an operator).
#[event(subject = "regions.paid")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Paid;

/// Shipped (its stream catga's, with an operator's limit added).
#[event(subject = "regions.shipped")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Shipped;

/// Refunded (its stream made by an operator before catga started).
#[event(subject = "regions.refunded")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Refunded;

#[event(durable = "regions-paid")]
async fn on_paid(_p: Paid) -> Result<()> {
    Ok(())
}

#[event(durable = "regions-shipped")]
async fn on_shipped(_s: Shipped) -> Result<()> {
    Ok(())
}

#[event(durable = "regions-refunded")]
async fn on_refunded(_r: Refunded) -> Result<()> {
    Ok(())
}

/// Voided (its subject stored by an operator's stream of another name).
#[event(subject = "regions.voided")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Voided;

#[event(durable = "regions-voided")]
async fn on_voided(_v: Voided) -> Result<()> {
    Ok(())
}

/// Billed behind a leaf node.
#[event(subject = "regions.billed")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Billed {
    /// Which one.
    pub n: u64,
}

static BILLED: AtomicU64 = AtomicU64::new(0);

#[event(durable = "regions-billed")]
async fn on_billed(b: Billed) -> Result<()> {
    BILLED.fetch_add(b.n, Ordering::SeqCst);
    Ok(())
}

/// Tallied by replicas with and without a region on one server.
#[event(subject = "regions.tallied")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Tallied {
    /// Which one.
    pub n: u64,
}

/// How often each `Tallied` was handled.
static TALLIED: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());

#[event(durable = "regions-tallied")]
async fn on_tallied(t: Tallied) -> Result<()> {
    TALLIED.lock().expect("tallied").push(t.n);
    Ok(())
}

const DAY: Duration = Duration::from_secs(24 * 3600);

fn settings(max_age: Duration, placement: Option<&str>) -> StreamSettings {
    StreamSettings {
        max_age,
        placement: placement.map(|p| StreamPlacement::parse(p).expect("placement")),
        ..StreamSettings::default()
    }
}

async fn replica(
    server: &NatsServer,
    id: &str,
    streams: StreamSettings,
    names: &'static [&'static str],
) -> Runtime {
    let rt = Runtime::builder()
        .nats_url(server.url())
        .service("regions")
        .instance_id(id)
        .streams(streams)
        .handlers(move |s| names.contains(&s.name()))
        .start()
        .await
        .expect("starts");
    catga_tests::ready_within(&rt, Duration::from_secs(20)).await;
    rt
}

async fn stream_of(
    js: &async_nats::jetstream::Context,
    subject: &str,
) -> async_nats::jetstream::stream::Config {
    let name = js
        .stream_by_subject(subject)
        .await
        .expect("a stream stores the subject");
    let mut stream = js.get_stream(&name).await.expect("stream");
    stream.info().await.expect("info").config.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_placed_and_an_operators_changes_are_kept() {
    let server = NatsServer::start_with("server_tags: [\"ssd\", \"az:1\"]\n");
    let plain = async_nats::connect(server.url()).await.expect("plain client");
    let js = async_nats::jetstream::new(plain);
    // An operator's stream, made before catga's first start under the
    // name catga gives it: placed, an hour of events.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: catga::stream_name("regions.refunded"),
        subjects: vec!["regions.refunded".into()],
        max_age: Duration::from_secs(3600),
        placement: Some(async_nats::jetstream::stream::Placement {
            cluster: None,
            tags: vec!["az:1".into()],
        }),
        ..Default::default()
    })
    .await
    .expect("the operator's stream");

    let names: &[&str] = &["regions::on_paid", "regions::on_shipped", "regions::on_refunded"];
    let first = replica(&server, "r1", settings(7 * DAY, Some("tags=ssd")), names).await;
    let paid = stream_of(&js, "regions.paid").await;
    assert_eq!(
        paid.placement.as_ref().map(|p| p.tags.clone()),
        Some(vec!["ssd".to_owned()])
    );
    assert!(
        paid.metadata.contains_key("catga.settings"),
        "{:?}",
        paid.metadata
    );
    let refunded = stream_of(&js, "regions.refunded").await;
    assert_eq!(refunded.name, catga::stream_name("regions.refunded"));
    assert_eq!(
        refunded.max_age,
        Duration::from_secs(3600),
        "the operator's stream is used as it is"
    );
    first.shutdown().await.expect("shutdown");

    // The operator shortens one of catga's streams and describes another
    // (a field catga does not set).
    js.update_stream(async_nats::jetstream::stream::Config {
        max_age: Duration::from_secs(3600),
        ..paid.clone()
    })
    .await
    .expect("operator's change");
    let shipped = stream_of(&js, "regions.shipped").await;
    js.update_stream(async_nats::jetstream::stream::Config {
        description: Some("billing's".into()),
        ..shipped
    })
    .await
    .expect("operator's description");

    // The replicas come back with two days of events.
    let second = replica(&server, "r2", settings(2 * DAY, Some("tags=ssd")), names).await;
    let paid = stream_of(&js, "regions.paid").await;
    assert_eq!(
        paid.max_age,
        Duration::from_secs(3600),
        "the operator's change is kept"
    );
    let shipped = stream_of(&js, "regions.shipped").await;
    assert_eq!(
        shipped.max_age,
        2 * DAY,
        "catga's own stream follows its settings"
    );
    assert_eq!(
        shipped.description.as_deref(),
        Some("billing's"),
        "and keeps what the operator added"
    );
    let refunded = stream_of(&js, "regions.refunded").await;
    assert_eq!(
        (refunded.max_age, refunded.placement.map(|p| p.tags)),
        (Duration::from_secs(3600), Some(vec!["az:1".to_owned()]))
    );
    // Events still flow through every one of them.
    let client = second.client();
    client.publish_durable(Paid).await.expect("paid");
    client.publish_durable(Refunded).await.expect("refunded");
    second.shutdown().await.expect("shutdown");

    // A third start with the same settings changes nothing more.
    let third = replica(&server, "r3", settings(2 * DAY, Some("tags=ssd")), names).await;
    assert_eq!(
        stream_of(&js, "regions.paid").await.max_age,
        Duration::from_secs(3600)
    );
    let shipped = stream_of(&js, "regions.shipped").await;
    assert_eq!(shipped.max_age, 2 * DAY);
    third.shutdown().await.expect("shutdown");

    // A subject an operator's stream of another name stores: the handler
    // does not bind (the log names both streams), rather than publish
    // into a stream catga did not make.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "OPS_VOIDS".into(),
        subjects: vec!["regions.voided".into()],
        ..Default::default()
    })
    .await
    .expect("the operator's stream");
    let refused = Runtime::builder()
        .nats_url(server.url())
        .service("regions")
        .handlers(|s| s.name() == "regions::on_voided")
        .start()
        .await
        .expect("starts");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = refused.readiness();
    assert!(!r.ready, "{r:?}");
    assert!(r.failing.iter().any(|f| f.contains("subscriptions")), "{r:?}");
    refused.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_a_leaf_node_serves_durable_events_from_the_hubs_jetstream() {
    let leaf_port = catga_tests::servers::free_port();
    let hub = NatsServer::start_with(&format!(
        "jetstream {{ domain: hub }}\nleafnodes {{ port: {leaf_port} }}\n"
    ));
    let leaf = NatsServer::start_with(&format!(
        "jetstream {{ domain: leaf }}\nleafnodes {{ remotes: [ {{ url: \"nats://127.0.0.1:{leaf_port}\" }} ] }}\n"
    ));
    let streams = StreamSettings {
        domain: Some("hub".into()),
        ..StreamSettings::default()
    };
    let rt = Runtime::builder()
        .nats_url(leaf.url())
        .service("regions-leaf")
        .streams(streams.clone())
        .handlers(|s| s.name() == "regions::on_billed")
        .start()
        .await
        .expect("starts");
    catga_tests::ready_within(&rt, Duration::from_secs(30)).await;
    let mut config = catga::Config::default();
    config.nats_url = Some(leaf.url());
    config.streams = streams;
    let client = catga::Client::connect_with(&config)
        .await
        .expect("client on the leaf");
    for n in 1..=20 {
        client.publish_durable(Billed { n }).await.expect("published");
    }
    until("every billed event handled", Duration::from_secs(20), || {
        BILLED.load(Ordering::SeqCst) >= 210
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(BILLED.load(Ordering::SeqCst), 210, "1 + ... + 20, each once");
    // The stream lives in the hub's domain, not in the leaf's own.
    let at_hub = async_nats::jetstream::new(async_nats::connect(hub.url()).await.expect("hub client"));
    assert!(at_hub.stream_by_subject("regions.billed").await.is_ok());
    let at_leaf = async_nats::jetstream::new(async_nats::connect(leaf.url()).await.expect("leaf client"));
    assert!(
        at_leaf.stream_by_subject("regions.billed").await.is_err(),
        "the leaf's own JetStream has no such stream"
    );
    rt.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_region_is_named_in_discovery_and_ready() {
    let server = NatsServer::start();
    let rt = Runtime::builder()
        .nats_url(server.url())
        .service("regions-named")
        .region("eu-west")
        .http_addr("127.0.0.1:0")
        .handlers(|s| s.name() == "regions::on_paid")
        .start()
        .await
        .expect("starts");
    catga_tests::ready_within(&rt, Duration::from_secs(20)).await;
    let addr = rt.http_addr().expect("endpoint");
    let (status, body) = catga_tests::http::get(addr, "/ready");
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["region"], "eu-west", "{body}");
    let (status, metrics) = catga_tests::http::get(addr, "/metrics");
    assert_eq!(status, 200, "{metrics}");
    let info = metrics
        .lines()
        .find(|l| l.starts_with("catga_replica_info{") && l.contains("service=\"regions-named\""))
        .unwrap_or_else(|| panic!("no catga_replica_info: {metrics}"));
    assert!(
        info.contains("region=\"eu-west\"") && info.ends_with(" 1"),
        "{info}"
    );
    let plain = async_nats::connect(server.url()).await.expect("plain");
    let inbox = plain.new_inbox();
    let mut sub = plain.subscribe(inbox.clone()).await.expect("sub");
    plain
        .publish_with_reply("$SRV.INFO.regions-named", inbox, "".into())
        .await
        .expect("ask");
    let m = tokio::time::timeout(Duration::from_secs(2), sub.next())
        .await
        .expect("an answer")
        .expect("message");
    let info: Value = serde_json::from_slice(&m.payload).expect("JSON");
    assert_eq!(info["metadata"]["region"], "eu-west", "{info}");
    assert!(catga::Config::from_lookup(|k| (k == "CATGA_REGION").then(|| "eu west".into())).is_err());
    rt.shutdown().await.expect("shutdown");
}

/// Two regions: one NATS server each (clusters A and B) joined by
/// gateways, JetStream in both; returns once the gateways are up (they
/// carry interest from then on: B answers a's callers when a has nobody).
async fn two_regions() -> (NatsServer, NatsServer) {
    let mut servers = regions(&["A", "B"]).await.into_iter();
    match (servers.next(), servers.next()) {
        (Some(a), Some(b)) => (a, b),
        _ => unreachable!("two regions"),
    }
}

/// One NATS server per region, clusters named `names`, every pair joined
/// by a gateway, JetStream in each; returns them in that order once every
/// gateway is up.
async fn regions(names: &[&'static str]) -> Vec<NatsServer> {
    // Below the ephemeral range the other tests' servers take ports from.
    let n = names.len() as u16;
    let base = catga_tests::servers::free_port_range(2 * n);
    let gateway = |i: usize| base + 1 + i as u16;
    let route = |i: usize| base + 1 + n + i as u16;
    // JetStream (which the harness turns on) over gateways refuses to
    // start without configured routes ("JetStream cluster requires
    // configured routes"): a one-node cluster routing to itself satisfies
    // the check.
    let configs: Vec<String> = (0..names.len())
        .map(|i| {
            let others: Vec<String> = (0..names.len())
                .filter(|&j| j != i)
                .map(|j| {
                    format!(
                        "{{ name: {}, url: \"nats://127.0.0.1:{}\" }}",
                        names[j],
                        gateway(j)
                    )
                })
                .collect();
            format!(
                "server_name: {name}\ncluster {{ name: {name}, host: 127.0.0.1, port: {route}, routes: \
                 [\"nats://127.0.0.1:{route}\"] }}\ngateway {{ name: {name}, host: 127.0.0.1, port: \
                 {port}, gateways: [ {others} ] }}\n",
                name = names[i],
                route = route(i),
                port = gateway(i),
                others = others.join(", ")
            )
        })
        .collect();
    // Started side by side: each may wait for the others.
    let starting: Vec<_> = configs
        .into_iter()
        .map(|config| std::thread::spawn(move || NatsServer::start_with(&config)))
        .collect();
    let servers: Vec<NatsServer> = starting
        .into_iter()
        .map(|s| s.join().expect("a region's server"))
        .collect();
    until("the gateways are up", Duration::from_secs(20), || {
        servers.iter().enumerate().all(|(i, server)| {
            let log = server.log();
            names.iter().enumerate().all(|(j, other)| {
                i == j || log.contains(&format!("Outbound gateway connection to \"{other}\""))
            })
        })
    })
    .await;
    servers
}

fn region_replica(nats: &str, region: &str, name: &str, dir: &std::path::Path) -> Replica {
    replica_in(nats, Some(region), "cluster=A", name, dir)
}

/// A replica connected to `nats`, naming `region` if given, whose
/// streams are placed by `placement` (`CATGA_JS_PLACEMENT`).
fn replica_in(
    nats: &str,
    region: Option<&str>,
    placement: &str,
    name: &str,
    dir: &std::path::Path,
) -> Replica {
    let mut env = vec![
        ("NATS_URL", nats),
        ("CATGA_SERVICE", "where"),
        ("CATGA_JS_PLACEMENT", placement),
        // What a killed replica took comes back within 2 s.
        ("CATGA_ACK_WAIT_MS", "2000"),
        ("RUST_LOG", "info"),
    ];
    if let Some(region) = region {
        env.push(("CATGA_REGION", region));
    }
    Replica::spawn(env!("CARGO_BIN_EXE_region_replica"), &env, name, dir)
}

/// A catga client connected to `url` (a region's server), with a 2 s
/// request time-out.
async fn client_in(url: String) -> catga::Client {
    let mut config = catga::Config::default();
    config.nats_url = Some(url);
    config.request_timeout = Duration::from_secs(2);
    catga::Client::connect_with(&config).await.expect("a client")
}

/// Two replicas in each region (a1, a2 on `a`; b1, b2 on `b`), ready.
async fn two_by_two(a: &NatsServer, b: &NatsServer, dir: &std::path::Path) -> Vec<Replica> {
    let replicas = vec![
        region_replica(&a.url(), "a", "a1", dir),
        region_replica(&a.url(), "a", "a2", dir),
        region_replica(&b.url(), "b", "b1", dir),
        region_replica(&b.url(), "b", "b2", dir),
    ];
    wait_ready(&replicas.iter().collect::<Vec<_>>()).await;
    replicas
}

/// Who handled each `Stored`, heard on `url` once the subscription's
/// interest has crossed the gateway.
async fn hear_stored_by(url: String) -> (async_nats::Client, async_nats::Subscriber) {
    let plain = async_nats::connect(url).await.expect("plain");
    let heard = plain.subscribe("region.stored_by").await.expect("sub");
    plain.flush().await.expect("flush");
    tokio::time::sleep(Duration::from_millis(300)).await;
    (plain, heard)
}

async fn wait_ready(replicas: &[&Replica]) {
    let limit = std::time::Instant::now() + Duration::from_secs(30);
    while !replicas
        .iter()
        .all(|r| r.log().contains("ready: every subscription"))
    {
        assert!(
            std::time::Instant::now() < limit,
            "replicas not ready:\n{}",
            replicas
                .iter()
                .map(|r| format!("--- {}\n{}", r.name, r.log()))
                .collect::<String>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `Where` requests, 8 at a time, until `stop`; each is retried once
/// if its first try fails. Returns, per request, who answered and how many
/// tries it took (a request answered by nobody after two tries is `None`).
async fn ask_until(
    client: catga::Client,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<(Option<String>, u32, std::time::Instant)> {
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..8u64 {
        let (client, stop) = (client.clone(), std::sync::Arc::clone(&stop));
        tasks.spawn(async move {
            let mut out = Vec::new();
            let mut n = lane;
            while !stop.load(Ordering::Relaxed) {
                n += 8;
                let mut answered = None;
                let mut tries = 0;
                while answered.is_none() && tries < 2 {
                    tries += 1;
                    answered = client.send(Where { n }).await.ok();
                }
                out.push((answered, tries, std::time::Instant::now()));
            }
            out
        });
    }
    let mut all = Vec::new();
    while let Some(done) = tasks.join_next().await {
        all.extend(done.expect("lane"));
    }
    all
}

/// Publishes 50 `Noted` from `client` and collects who handled each, as a
/// plain subscriber on `nats_url` hears it.
async fn noted_by(client: &catga::Client, nats_url: &str, round: u64) -> Vec<String> {
    use catga_tests::messages::region::{Noted, NotedBy};
    let plain = async_nats::connect(nats_url).await.expect("plain");
    let mut heard = plain.subscribe("region.noted_by").await.expect("sub");
    plain.flush().await.expect("flush");
    // The subscription's interest crosses the gateways before the events.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 0..50 {
        client
            .publish(Noted { n: round * 100 + n })
            .await
            .expect("published");
    }
    let mut by = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    while by.len() < 50 {
        match tokio::time::timeout_at(until, heard.next()).await {
            Ok(Some(m)) => {
                let e: NotedBy = serde_json::from_slice(&m.payload).expect("NotedBy");
                by.push(e.by);
            }
            _ => break,
        }
    }
    by
}

fn from_region(answers: &[(Option<String>, u32, std::time::Instant)], region: char) -> usize {
    answers
        .iter()
        .filter(|(who, _, _)| who.as_deref().is_some_and(|w| w.starts_with(region)))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_answer_locally_and_fail_over_when_one_loses_its_replicas() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    let (a, b) = two_regions().await;
    let dir = tempfile::tempdir().expect("dir");
    let mut replicas = two_by_two(&a, &b, dir.path()).await;
    let client = client_in(a.url()).await;
    let request_timeout = Duration::from_secs(2);

    // 1. Region a's requests are answered in region a.
    let stop = Arc::new(AtomicBool::new(false));
    let asking = tokio::spawn(ask_until(client.clone(), Arc::clone(&stop)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let local = asking.await.expect("asked");
    assert!(local.len() > 50, "{} requests", local.len());
    assert!(
        local.iter().all(|(who, _, _)| who.is_some()),
        "every request answered"
    );
    assert_eq!(from_region(&local, 'b'), 0, "none crossed the gateway: {local:?}");
    assert!(from_region(&local, 'a') == local.len());
    for replica in ["a1", "a2"] {
        assert!(
            local.iter().any(|(who, _, _)| who.as_deref() == Some(replica)),
            "{replica} answered none: the queue group spreads over the region"
        );
    }
    // And its queue-grouped events are handled in region a, once each.
    let by = noted_by(&client, &a.url(), 1).await;
    assert_eq!(by.len(), 50, "{by:?}");
    assert!(by.iter().all(|w| w.starts_with('a')), "{by:?}");

    // 2. Both of a's replicas are SIGKILLed under load: b answers, every
    //    request after at most one retry.
    let stop = Arc::new(AtomicBool::new(false));
    let asking = tokio::spawn(ask_until(client.clone(), Arc::clone(&stop)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = std::time::Instant::now();
    replicas[0].sigkill();
    replicas[1].sigkill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let failover = asking.await.expect("asked");
    let lost: Vec<_> = failover.iter().filter(|(who, _, _)| who.is_none()).collect();
    assert!(
        lost.is_empty(),
        "{} requests lost after one retry\n{}",
        lost.len(),
        logs(&replicas)
    );
    let first_b = failover
        .iter()
        .filter(|(who, _, _)| who.as_deref().is_some_and(|w| w.starts_with('b')))
        .map(|(_, _, at)| *at)
        .min()
        .expect("region b answered");
    let retried = failover.iter().filter(|(_, tries, _)| *tries > 1).count();
    eprintln!(
        "failover: region b answered {:?} after the kill; {} of {} requests needed their retry",
        first_b.saturating_duration_since(killed),
        retried,
        failover.len()
    );
    // A request in flight to a killed replica waits out its time-out,
    // then its retry is answered in b; one sent after the kill goes to b
    // at once. So b answers within a time-out of the kill.
    assert!(
        first_b.saturating_duration_since(killed) < request_timeout + Duration::from_millis(500),
        "region b answered {:?} after the kill",
        first_b.saturating_duration_since(killed)
    );

    // With a's replicas gone, b handles a's queue-grouped events.
    let by = noted_by(&client, &a.url(), 2).await;
    assert_eq!(by.len(), 50, "{by:?}");
    assert!(by.iter().all(|w| w.starts_with('b')), "{by:?}");

    // 3. a's replicas come back and take a's requests again.
    replicas[0] = region_replica(&a.url(), "a", "a1", dir.path());
    replicas[1] = region_replica(&a.url(), "a", "a2", dir.path());
    wait_ready(&[&replicas[0], &replicas[1]]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let asking = tokio::spawn(ask_until(client.clone(), Arc::clone(&stop)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let back = asking.await.expect("asked");
    assert!(back.iter().all(|(who, _, _)| who.is_some()));
    assert_eq!(
        from_region(&back, 'b'),
        0,
        "region a answers its own again: {back:?}"
    );
    let by = noted_by(&client, &a.url(), 3).await;
    assert_eq!(by.len(), 50, "{by:?}");
    assert!(by.iter().all(|w| w.starts_with('a')), "and its events: {by:?}");
}

/// Collects `StoredBy` from `heard` until every number in `want` was heard
/// or `within` passed: who handled each, and when it was first heard.
async fn stored_by(
    heard: &mut async_nats::Subscriber,
    want: &std::collections::BTreeSet<u64>,
    within: Duration,
) -> std::collections::BTreeMap<u64, (Vec<String>, std::time::Instant)> {
    use catga_tests::messages::region::StoredBy;
    let mut by = std::collections::BTreeMap::<u64, (Vec<String>, std::time::Instant)>::new();
    let until = tokio::time::Instant::now() + within;
    while !want.iter().all(|n| by.contains_key(n)) {
        match tokio::time::timeout_at(until, heard.next()).await {
            Ok(Some(m)) => {
                let e: StoredBy = serde_json::from_slice(&m.payload).expect("StoredBy");
                by.entry(e.n)
                    .or_insert_with(|| (Vec::new(), std::time::Instant::now()))
                    .0
                    .push(e.by);
            }
            _ => break,
        }
    }
    by
}

/// Publishes a `Stored` for each of `numbers`, each stored before the
/// next, and returns who handled each once every one was heard (fails
/// with the replicas' logs if one was not within 10 s).
async fn publish_stored(
    client: &catga::Client,
    heard: &mut async_nats::Subscriber,
    numbers: std::ops::Range<u64>,
    replicas: &[Replica],
) -> std::collections::BTreeMap<u64, (Vec<String>, std::time::Instant)> {
    use catga_tests::messages::region::Stored;
    let want: std::collections::BTreeSet<u64> = numbers.collect();
    for &n in &want {
        client.publish_durable(Stored { n }).await.expect("stored");
    }
    let by = stored_by(heard, &want, Duration::from_secs(10)).await;
    assert_eq!(by.len(), want.len(), "every event handled\n{}", logs(replicas));
    by
}

/// Durable events are handled in the region their stream lives in (a),
/// wherever they are published from: the replicas of the other region
/// (b) pull at a lower priority. When a's replicas are SIGKILLed under
/// load, b's take every event, nothing lost; when they come back, they
/// take the stream's events again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_events_are_handled_in_their_streams_region_and_fail_over() {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use catga_tests::messages::region::Stored;

    let (a, b) = two_regions().await;
    let dir = tempfile::tempdir().expect("dir");
    let mut replicas = two_by_two(&a, &b, dir.path()).await;
    for (i, replica) in replicas.iter().enumerate() {
        assert_eq!(
            replica.log().contains("pulls at a lower priority"),
            i >= 2,
            "only b's replicas pull at a lower priority\n{}",
            logs(&replicas)
        );
    }
    // Published in region b: where the stream lives decides, not where an
    // event comes from.
    let client = client_in(b.url()).await;
    let (_plain, mut heard) = hear_stored_by(a.url()).await;

    // 1. a's replicas handle every event, once.
    let by = publish_stored(&client, &mut heard, 0..100, &replicas).await;
    assert!(
        by.values()
            .all(|(who, _)| who.len() == 1 && who[0].starts_with('a')),
        "every event handled once, in region a: {by:?}"
    );

    // 2. a's replicas are SIGKILLed while events are published: b takes
    //    every event, the ones a took and never acknowledged included.
    let stop = Arc::new(AtomicBool::new(false));
    let publishing = tokio::spawn({
        let (client, stop) = (client.clone(), Arc::clone(&stop));
        async move {
            let mut sent = std::collections::BTreeMap::new();
            let mut n = 1000;
            while !stop.load(Ordering::Relaxed) {
                // A publish the broker did not confirm is sent again: the
                // stream keeps one copy per message id.
                let id = format!("stored-{n}");
                // When it was first sent: its acknowledgement may come back
                // (or this task run again) after the kill, while a's
                // replicas could have taken it before.
                let at = std::time::Instant::now();
                while client.publish_durable_with_id(Stored { n }, &id).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                sent.insert(n, at);
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sent
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    replicas[0].sigkill();
    replicas[1].sigkill();
    // Reaped: nothing published from now on can reach them.
    let killed = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = publishing.await.expect("published");
    let numbers: BTreeSet<u64> = sent.keys().copied().collect();
    let by = stored_by(&mut heard, &numbers, Duration::from_secs(20)).await;
    let lost: Vec<_> = numbers.iter().filter(|n| !by.contains_key(n)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} events never handled: {lost:?}\n{}",
        lost.len(),
        sent.len(),
        logs(&replicas)
    );
    // Every event published after the kill is handled in b, and how long
    // one waited at most is the failover time.
    let after: Vec<_> = sent.iter().filter(|(_, at)| **at > killed).collect();
    assert!(
        after.len() > 50,
        "{} events published after the kill",
        after.len()
    );
    let mut waited = Duration::ZERO;
    for (n, at) in &after {
        let (who, heard_at) = &by[n];
        assert!(who.iter().all(|w| w.starts_with('b')), "{n} handled by {who:?}");
        waited = waited.max(heard_at.saturating_duration_since(**at));
    }
    let from_b = by
        .values()
        .filter(|(who, _)| who.iter().any(|w| w.starts_with('b')))
        .count();
    eprintln!(
        "durable failover: an event published after the kill waited at most {waited:?}; {from_b} of {} \
         events handled in b",
        sent.len()
    );
    // What a's replicas took and never acknowledged comes back after the
    // ack wait (2 s); a pull of theirs the server still served after the
    // kill (it serves one less than 2 s old without interest behind a
    // gateway) took some of what came after it too.
    assert!(
        waited < Duration::from_secs(10),
        "an event waited {waited:?} after the kill"
    );

    // 3. a's replicas come back and take the stream's events again.
    replicas[0] = region_replica(&a.url(), "a", "a1", dir.path());
    replicas[1] = region_replica(&a.url(), "a", "a2", dir.path());
    wait_ready(&[&replicas[0], &replicas[1]]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let by = publish_stored(&client, &mut heard, 5000..5100, &replicas).await;
    assert!(
        by.values()
            .all(|(who, _)| who.len() == 1 && who[0].starts_with('a')),
        "region a handles its stream's events again: {by:?}"
    );
}

/// A region whose NATS is lost takes none of the other region with it:
/// region b's callers are answered by b's replicas, none lost, while
/// region a's only server is SIGKILLed and down; when it comes back, a's
/// replica reconnects and answers a's callers again. (JetStream's meta
/// group, a node in each region, has no quorum meanwhile: durable events
/// wait; commands do not need it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_that_loses_its_nats_leaves_the_other_answering() {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    let (mut a, b) = two_regions().await;
    let dir = tempfile::tempdir().expect("dir");
    let replicas = vec![
        region_replica(&a.url(), "a", "a1", dir.path()),
        region_replica(&b.url(), "b", "b1", dir.path()),
        region_replica(&b.url(), "b", "b2", dir.path()),
    ];
    wait_ready(&replicas.iter().collect::<Vec<_>>()).await;
    let in_b = client_in(b.url()).await;

    // Region b's callers, answered in b, before, while and after a's NATS
    // is killed.
    let stop = Arc::new(AtomicBool::new(false));
    let asking = tokio::spawn(ask_until(in_b.clone(), Arc::clone(&stop)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    a.kill();
    let killed = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let answers = asking.await.expect("asked");
    let lost = answers.iter().filter(|(who, _, _)| who.is_none()).count();
    assert_eq!(lost, 0, "{lost} of b's requests lost\n{}", logs(&replicas));
    assert_eq!(
        from_region(&answers, 'a'),
        0,
        "b's callers are answered in b: {answers:?}"
    );
    let after = answers.iter().filter(|(_, _, at)| *at > killed).count();
    assert!(after > 50, "{after} of b's requests answered after the kill");
    let retried = answers.iter().filter(|(_, tries, _)| *tries > 1).count();
    eprintln!(
        "region a's NATS killed: {} of b's requests answered ({after} after the kill), {retried} needed their retry",
        answers.len()
    );

    // a's NATS back: a's replica reconnects and answers a's callers.
    a.resume();
    let in_a = client_in(a.url()).await;
    let mut who = None;
    let limit = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < limit {
        match in_a.send(Where { n: 1 }).await {
            Ok(w) if w == "a1" => {
                who = Some(w);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    assert_eq!(
        who.as_deref(),
        Some("a1"),
        "a's replica answers a's callers once a's NATS is back\n{}",
        logs(&replicas)
    );
}

/// Replicas with and without `CATGA_REGION` on one durable consumer: each
/// binding makes it prioritized or plain again (a pull of the replica
/// without a region that a prioritized consumer refuses makes it bind
/// again), and every event is handled once, whoever bound it last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_and_without_a_region_keep_pulling() {
    let (a, b) = two_regions().await;
    let dir = tempfile::tempdir().expect("dir");
    let mut replicas = vec![
        replica_in(&a.url(), Some("a"), "cluster=A", "a1", dir.path()),
        replica_in(&b.url(), None, "cluster=A", "b1", dir.path()),
    ];
    wait_ready(&replicas.iter().collect::<Vec<_>>()).await;
    let client = client_in(b.url()).await;
    let (_plain, mut heard) = hear_stored_by(a.url()).await;
    let mut next = 0;
    for round in 0..3 {
        // Round 1: a1 binds again (prioritized); round 2: b1 (plain).
        if round > 0 {
            let (which, region) = if round == 1 { (0, Some("a")) } else { (1, None) };
            let (url, name) = if which == 0 {
                (a.url(), "a1")
            } else {
                (b.url(), "b1")
            };
            replicas[which].sigkill();
            replicas[which] = replica_in(&url, region, "cluster=A", name, dir.path());
            wait_ready(&[&replicas[which]]).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let by = publish_stored(&client, &mut heard, next..next + 50, &replicas).await;
        next += 50;
        assert!(
            by.values().all(|(who, _)| who.len() == 1),
            "round {round}: every event handled once: {by:?}"
        );
    }
}

/// Three regions keep JetStream's quorum when one loses its NATS (with a
/// node per region, the meta group has a member in each): region a's only
/// server is SIGKILLed, and a replica of region b binds its durable
/// consumer again (which needs the meta group), gets ready and handles the
/// events of its region's stream, published from region c.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_keep_durable_events_when_one_loses_its_nats() {
    let mut servers = regions(&["A", "B", "C"]).await;
    let (b, c) = (servers[1].url(), servers[2].url());
    let dir = tempfile::tempdir().expect("dir");
    let place = "cluster=B";
    let mut replicas = vec![
        replica_in(&b, Some("b"), place, "b1", dir.path()),
        replica_in(&c, Some("c"), place, "c1", dir.path()),
    ];
    wait_ready(&replicas.iter().collect::<Vec<_>>()).await;
    let client = client_in(c.clone()).await;
    let (_plain, mut heard) = hear_stored_by(b.clone()).await;
    let by = publish_stored(&client, &mut heard, 0..50, &replicas).await;
    assert!(
        by.values().all(|(who, _)| who.len() == 1 && who[0] == "b1"),
        "handled in the stream's region, once each: {by:?}"
    );

    servers[0].kill();
    replicas[0].sigkill();
    replicas[0] = replica_in(&b, Some("b"), place, "b1", dir.path());
    wait_ready(&[&replicas[0]]).await;
    let by = publish_stored(&client, &mut heard, 100..150, &replicas).await;
    assert!(
        by.values().all(|(who, _)| who.len() == 1 && who[0] == "b1"),
        "handled in the stream's region, once each, with region a's NATS gone: {by:?}"
    );
}

/// A replica without `CATGA_REGION` whose pull a consumer made prioritized
/// (by a region-aware replica) refuses binds the consumer again, plain,
/// instead of stalling (async-nats asks no more after a refused pull): it
/// bound first and pulls one message at a time, so it holds the oldest
/// waiting pull, takes the first event, and its next pull is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_without_a_region_refused_by_a_prioritized_consumer_binds_again() {
    use async_nats::jetstream::consumer::PriorityPolicy;

    let server = NatsServer::start();
    let start = |id: &'static str, region: Option<&'static str>, concurrency: usize| {
        let url = server.url();
        async move {
            let mut builder = Runtime::builder()
                .nats_url(url)
                .service("regions-tallied")
                .instance_id(id)
                .concurrency(concurrency)
                .handlers(|s| s.name() == "regions::on_tallied");
            if let Some(region) = region {
                builder = builder.region(region);
            }
            let rt = builder.start().await.expect("starts");
            catga_tests::ready_within(&rt, Duration::from_secs(20)).await;
            rt
        }
    };
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.expect("plain"));
    let policy = |js: async_nats::jetstream::Context| async move {
        let stream = js
            .get_stream(catga::stream_name("regions.tallied"))
            .await
            .expect("stream");
        let consumer: async_nats::jetstream::consumer::PullConsumer =
            stream.get_consumer("regions-tallied").await.expect("consumer");
        consumer.cached_info().config.priority_policy.clone()
    };
    let plain = start("x", None, 1).await;
    assert_eq!(policy(js.clone()).await, PriorityPolicy::None);
    let aware = start("y", Some("a"), 64).await;
    assert_eq!(policy(js.clone()).await, PriorityPolicy::Prioritized);
    let client = plain.client();
    for n in 0..20 {
        client.publish_durable(Tallied { n }).await.expect("stored");
    }
    until("every event handled", Duration::from_secs(10), || {
        TALLIED.lock().expect("tallied").len() >= 20
    })
    .await;
    // x bound the consumer again: plain once more.
    let limit = std::time::Instant::now() + Duration::from_secs(10);
    while policy(js.clone()).await != PriorityPolicy::None {
        assert!(
            std::time::Instant::now() < limit,
            "the replica without a region did not bind the consumer again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut tallied = TALLIED.lock().expect("tallied").clone();
    tallied.sort_unstable();
    assert_eq!(tallied, (0..20).collect::<Vec<_>>(), "every event handled once");
    plain.shutdown().await.expect("shutdown");
    aware.shutdown().await.expect("shutdown");
}
