//! The HTTP endpoint of a replica against real servers: `/health`,
//! `/ready` with the failing checks (broker down, Redis down, draining),
//! and `/metrics` counting what the handlers did.

use std::time::{Duration, Instant};

use catga::{Error, Result, Runtime, Saga, command, event, saga};
use catga_tests::http::{get, sample};
use catga_tests::{NatsServer, RedisServer};
use serde::{Deserialize, Serialize};

/// Sleeps `ms`, then succeeds or fails as told.
#[command(reply = u64)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Work {
    /// Fail with a 400.
    pub fail: bool,
    /// How long it takes.
    pub ms: u64,
}

#[command]
async fn work(w: Work) -> Result<u64> {
    tokio::time::sleep(Duration::from_millis(w.ms)).await;
    if w.fail {
        return Err(Error::invalid("told to fail"));
    }
    Ok(w.ms)
}

/// A durable job that always fails, retryably.
#[event(subject = "ops.job")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Job {
    /// Which one.
    pub n: u64,
}

#[event(durable = "ops-jobs", max_deliver = 2, retry = 1)]
async fn job(_j: Job) -> Result<()> {
    Err(Error::unavailable("the downstream is away"))
}

/// Starts [`nap`].
#[event(subject = "ops.nap")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Nap {
    /// Which one.
    pub n: u64,
}

/// Sagas that finished their nap.
static NAPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Waits 1.2 s durably (past the 1 s a saga waits in place, so that its
/// trigger goes back to the broker), then ends.
#[saga]
async fn nap(saga: &Saga, _n: Nap) -> Result<()> {
    saga.sleep("nap", Duration::from_millis(1200)).await?;
    NAPPED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    Ok(())
}

async fn runtime(nats: &NatsServer, redis: &RedisServer) -> Runtime {
    let rt = Runtime::builder()
        .nats_url(nats.url())
        .redis_url(redis.url())
        .http_addr("127.0.0.1:0")
        .instance_id("ops")
        .retry_base(Duration::from_millis(10))
        .durable_defaults(Duration::from_secs(2), 5)
        .handlers(|s| s.name().starts_with("ops::") && s.name() != "ops::nap")
        .start()
        .await
        .expect("starts");
    catga_tests::ready_within(&rt, Duration::from_secs(10)).await;
    rt
}

/// Polls `path` until `ok` accepts its answer (the endpoint is read from
/// a blocking socket: on the blocking pool).
async fn until(
    addr: std::net::SocketAddr,
    path: &'static str,
    what: &str,
    ok: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let started = Instant::now();
    loop {
        let (status, body) = tokio::task::spawn_blocking(move || get(addr, path))
            .await
            .expect("GET");
        if ok(status, &body) {
            return (status, body);
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{what}: still {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metrics(addr: std::net::SocketAddr) -> String {
    tokio::task::spawn_blocking(move || get(addr, "/metrics"))
        .await
        .expect("GET")
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_reports_health_readiness_and_metrics() {
    let mut nats = NatsServer::start();
    let mut redis = RedisServer::start();
    let rt = runtime(&nats, &redis).await;
    let addr = rt.http_addr().expect("endpoint");
    let client = rt.client();

    let (status, body) = tokio::task::spawn_blocking(move || get(addr, "/health"))
        .await
        .expect("GET");
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, body) = tokio::task::spawn_blocking(move || get(addr, "/ready"))
        .await
        .expect("GET");
    assert_eq!((status, body.as_str()), (200, r#"{"failing":[],"ready":true}"#));

    for _ in 0..5 {
        client.send(Work { fail: false, ms: 1 }).await.expect("ok");
    }
    for _ in 0..2 {
        client
            .send(Work { fail: true, ms: 1 })
            .await
            .expect_err("told to fail");
    }
    client.publish_durable(Job { n: 1 }).await.expect("stored");
    // One delayed message waiting (due in an hour), then cancelled.
    let waiting = rt
        .publish_after(Duration::from_secs(3600), Job { n: 2 })
        .await
        .expect("scheduled");
    let page = {
        let started = Instant::now();
        loop {
            let page = metrics(addr).await;
            if sample(&page, r#"catga_dead_letters_total{handler="ops::job"}"#) == Some(1.0) {
                break page;
            }
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "no dead letter:\n{page}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let at = |series: &str| sample(&page, series).unwrap_or_else(|| panic!("no {series} in\n{page}"));
    assert_eq!(
        at(r#"catga_messages_received_total{handler="ops::work",subject="cmd.work"}"#),
        7.0
    );
    assert_eq!(
        at(r#"catga_messages_handled_total{handler="ops::work",subject="cmd.work",outcome="ok"}"#),
        5.0
    );
    assert_eq!(
        at(r#"catga_messages_handled_total{handler="ops::work",subject="cmd.work",outcome="invalid"}"#),
        2.0
    );
    assert_eq!(
        at(r#"catga_handler_duration_seconds_count{handler="ops::work"}"#),
        7.0
    );
    assert_eq!(at(r#"catga_handler_in_flight{handler="ops::work"}"#), 0.0);
    // Two deliveries, each retried once in place; one redelivery between.
    assert_eq!(
        at(r#"catga_messages_received_total{handler="ops::job",subject="ops.job"}"#),
        2.0
    );
    assert_eq!(at(r#"catga_handler_retries_total{handler="ops::job"}"#), 2.0);
    assert_eq!(at(r#"catga_redeliveries_total{handler="ops::job"}"#), 1.0);
    assert_eq!(at("catga_ready"), 1.0);
    assert_eq!(at("catga_broker_connected"), 1.0);
    assert_eq!(at("catga_store_up"), 1.0);
    assert_eq!(at("catga_outbox_backlog"), 0.0);
    assert_eq!(at("catga_delayed_pending"), 1.0);
    assert!(rt.cancel_delayed(&waiting).await.expect("cancelled"));
    assert_eq!(sample(&metrics(addr).await, "catga_delayed_pending"), Some(0.0));
    assert!(!page.contains("message_id"), "no per-message labels");

    // Redis away: not ready, saying why; back: ready again.
    redis.kill();
    let (_, body) = until(addr, "/ready", "Redis down", |s, _| s == 503).await;
    assert!(body.contains("store:"), "{body}");
    assert_eq!(sample(&metrics(addr).await, "catga_store_up"), Some(0.0));
    redis.resume();
    until(addr, "/ready", "Redis back", |s, _| s == 200).await;

    // The broker away: not ready, saying why; back: ready again. Alive
    // all along.
    nats.kill();
    let (_, body) = until(addr, "/ready", "NATS down", |s, _| s == 503).await;
    assert!(body.contains("broker"), "{body}");
    assert_eq!(
        tokio::task::spawn_blocking(move || get(addr, "/health"))
            .await
            .expect("GET")
            .0,
        200
    );
    nats.resume();
    until(addr, "/ready", "NATS back", |s, _| s == 200).await;

    // Draining: /ready says so while a slow command finishes; the endpoint
    // closes when the shutdown is over.
    let slow = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .send(Work {
                    fail: false,
                    ms: 1500,
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = tokio::spawn(rt.shutdown());
    let (_, body) = until(addr, "/ready", "draining", |s, _| s == 503).await;
    assert!(body.contains("draining"), "{body}");
    assert_eq!(
        tokio::task::spawn_blocking(move || get(addr, "/health"))
            .await
            .expect("GET")
            .0,
        200
    );
    stopping.await.expect("task").expect("clean shutdown");
    assert_eq!(slow.await.expect("task").expect("answered"), 1500);
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "the endpoint is closed after shutdown"
    );
}

/// A replica whose subscription the broker refused is deaf: `/health`
/// fails with the reason, so that the orchestrator restarts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deaf_replica_is_not_healthy() {
    let nats = NatsServer::start_with(
        r#"
        authorization {
          users = [
            { user: "svc", password: "unused",
              permissions: { publish: ">", subscribe: { allow: ">", deny: "cmd.work" } } }
          ]
        }
        no_auth_user: "svc"
        "#,
    );
    let rt = Runtime::builder()
        .nats_url(nats.url())
        .http_addr("127.0.0.1:0")
        .handlers(|s| s.name() == "ops::work")
        .start()
        .await
        .expect("start-up itself succeeds");
    let addr = rt.http_addr().expect("endpoint");
    let (_, body) = until(addr, "/health", "refused subscription", |s, _| s == 503).await;
    assert!(body.contains("cmd.work"), "names the subject: {body}");
    let (status, _) = tokio::task::spawn_blocking(move || get(addr, "/ready"))
        .await
        .expect("GET");
    assert_eq!(status, 503);
    let _ = rt.shutdown().await;
}

/// An address that cannot be bound stops start-up with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_http_address_is_a_config_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let err = Runtime::builder()
        .http_addr(addr.to_string())
        .handlers(|s| s.name() == "ops::work")
        .start()
        .await
        .expect_err("the port is taken");
    assert_eq!(err.kind(), catga::ErrorKind::Config, "{err}");
    assert!(err.message().contains("CATGA_HTTP_ADDR"), "{err}");
}

/// A saga's durable wait is counted as `waiting`, not as a failure, and
/// does not open the handler's breaker: with a breaker that opens after 2
/// failures for 30 s, four sleeping sagas would otherwise stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_saga_is_counted_as_waiting_not_failed() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let rt = Runtime::builder()
        .nats_url(nats.url())
        .redis_url(redis.url())
        .http_addr("127.0.0.1:0")
        .instance_id("naps")
        .breaker(2, Duration::from_secs(30))
        .handlers(|s| s.name() == "ops::nap")
        .start()
        .await
        .expect("starts");
    catga_tests::ready_within(&rt, Duration::from_secs(10)).await;
    let addr = rt.http_addr().expect("endpoint");
    for n in 0..4 {
        rt.client().publish_durable(Nap { n }).await.expect("stored");
    }
    catga_tests::until("four naps done", Duration::from_secs(20), || {
        NAPPED.load(std::sync::atomic::Ordering::SeqCst) == 4
    })
    .await;
    let page = metrics(addr).await;
    let handled = |outcome: &str| {
        sample(
            &page,
            &format!(
                r#"catga_messages_handled_total{{handler="ops::nap",subject="ops.nap",outcome="{outcome}"}}"#
            ),
        )
    };
    assert_eq!(handled("waiting"), Some(4.0), "{page}");
    assert_eq!(handled("ok"), Some(4.0), "{page}");
    assert_eq!(handled("unavailable"), None, "a wait is no failure:\n{page}");
    assert_ne!(
        sample(&page, r#"catga_breaker_open{handler="ops::nap"}"#),
        Some(1.0),
        "{page}"
    );
    rt.shutdown().await.expect("clean shutdown");
}
