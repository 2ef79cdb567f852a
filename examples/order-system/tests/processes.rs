//! Several OS processes of the example binary share the work over a real
//! nats-server and redis-server, the way it runs in production. Replicas
//! are killed with SIGKILL and stopped with SIGTERM while clients keep
//! sending; the clients count what they lost, and the store shows what was
//! done (each order once, each payment counted once).
//!
//! Every test runs twice: `one_server::*` on one redis-server (one store
//! shard), and `sharded_cluster::*` on a 3-master Redis Cluster with the
//! service's keys in 3 store shards (`CATGA_STORE_SHARDS=3`), the layout
//! that spreads one service over every master, and the keyed invoicing
//! saga over 3 partition streams with a router share each
//! (`CATGA_JS_SAGA_STREAMS=3`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use catga::{Client, ErrorKind};
use catga_tests::{NatsServer, RedisCluster, RedisServer};
use order_system::fulfilment::{Fulfilment, GetFulfilment, refused_at};
use order_system::invoicing::GetInvoices;
use order_system::orders::{
    CancelOrder, CountPayment, CreateOrder, GetOrder, GetRevenue, Line, MAX_TOTAL_CENTS, OrderId, OrderPaid,
    PayOrder, Revenue, ShipOrder, Status, ledger_of,
};

/// Short leases and ack waits, so that the work of a killed replica is
/// taken over within the test's patience (production keeps the defaults).
const LEASE_MS: &str = "1500";
const ACK_WAIT_MS: &str = "1500";
const LEADER_LEASE_MS: &str = "1500";
const MEMBER_HEARTBEAT_MS: &str = "300";
const MEMBER_TIMEOUT_MS: &str = "1500";
/// Percent of orders no courier takes (their fulfilment compensates).
const REFUSALS: u64 = 30;

fn refused(id: &OrderId) -> bool {
    refused_at(id, REFUSALS)
}

struct Replica {
    name: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    fn spawn(servers: &Servers, name: &str, dir: &Path) -> Replica {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_order-system"))
            .env("NATS_URL", servers.nats.url())
            .env("REDIS_URL", servers.redis.url())
            .envs(servers.redis.env())
            .env("CATGA_INSTANCE_ID", name)
            .env("CATGA_SERVICE", "orders")
            .env("CATGA_INBOX_LEASE_MS", LEASE_MS)
            .env("CATGA_ACK_WAIT_MS", ACK_WAIT_MS)
            .env("CATGA_LEADER_LEASE_MS", LEADER_LEASE_MS)
            .env("CATGA_MEMBER_HEARTBEAT_MS", MEMBER_HEARTBEAT_MS)
            .env("CATGA_MEMBER_TIMEOUT_MS", MEMBER_TIMEOUT_MS)
            .env("ORDER_COURIER_REFUSALS", REFUSALS.to_string())
            .env("ORDER_DEMO", "0")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(servers.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn order-system");
        Replica {
            name: name.to_owned(),
            log,
            child: Some(child),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn created(&self) -> usize {
        self.log().matches("order created").count()
    }

    async fn wait_ready(&self) {
        for _ in 0..300 {
            if self.log().contains("ready: every subscription is confirmed") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} not ready; log:\n{}", self.name, self.log());
    }

    fn sigkill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }
}

/// The warnings and errors in the replicas' logs, for a failure message.
fn trouble(replicas: &[Replica]) -> String {
    replicas
        .iter()
        .flat_map(|r| {
            r.log()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .map(|l| format!("{}: {l}", r.name))
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Where the replicas keep their state.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// One redis-server: one store shard.
    Server,
    /// A 3-master Redis Cluster, the service's keys in 3 store shards.
    Sharded,
}

/// The Redis of a [`Layout`].
enum Redis {
    Server(RedisServer),
    Cluster(RedisCluster),
}

impl Redis {
    fn start(layout: Layout) -> Redis {
        match layout {
            Layout::Server => Redis::Server(RedisServer::start()),
            Layout::Sharded => Redis::Cluster(RedisCluster::start()),
        }
    }

    /// `REDIS_URL`: the server, or the cluster's seed nodes.
    fn url(&self) -> String {
        match self {
            Redis::Server(s) => s.url(),
            Redis::Cluster(c) => c.urls().join(","),
        }
    }

    /// What a replica or a CLI run needs besides `REDIS_URL`.
    fn env(&self) -> Vec<(&'static str, &'static str)> {
        match self {
            Redis::Server(_) => Vec::new(),
            // And the invoicing saga's partitions over 3 streams, each
            // routed by its own router share, as in deploy/.
            Redis::Cluster(_) => vec![
                ("CATGA_REDIS_MODE", "cluster"),
                ("CATGA_STORE_SHARDS", "3"),
                ("CATGA_JS_SAGA_STREAMS", "3"),
            ],
        }
    }
}

struct Servers {
    nats: NatsServer,
    redis: Redis,
    dir: tempfile::TempDir,
    /// More variables for every replica.
    env: Vec<(&'static str, &'static str)>,
}

impl Servers {
    fn start(layout: Layout) -> Servers {
        Servers::start_with(layout, &[])
    }

    /// Servers whose replicas get `env` besides the test's settings.
    fn start_with(layout: Layout, env: &[(&'static str, &'static str)]) -> Servers {
        Servers {
            nats: NatsServer::start(),
            redis: Redis::start(layout),
            dir: tempfile::tempdir().expect("temp dir"),
            env: env.to_vec(),
        }
    }

    async fn replicas(&self, names: &[&str]) -> Vec<Replica> {
        let replicas: Vec<Replica> = names
            .iter()
            .map(|n| Replica::spawn(self, n, self.dir.path()))
            .collect();
        for r in &replicas {
            r.wait_ready().await;
        }
        replicas
    }

    async fn client(&self) -> Client {
        Client::connect(&self.nats.url())
            .await
            .expect("client")
            .with_request_timeout(Duration::from_secs(3))
    }

    /// Runs `order-system sagas N` against these servers; its stdout.
    fn sagas(&self, n: usize) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_order-system"))
            .args(["sagas", &n.to_string()])
            .env("NATS_URL", self.nats.url())
            .env("REDIS_URL", self.redis.url())
            .envs(self.redis.env())
            .env("CATGA_SERVICE", "orders")
            .env("CATGA_INSTANCE_ID", "saga-lister")
            .env("RUST_LOG", "error")
            .env("NO_COLOR", "1")
            .output()
            .expect("run sagas");
        assert!(
            out.status.success(),
            "sagas failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `order-system dlq ARGS` against these servers; its stdout.
    fn dlq(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_order-system"))
            .arg("dlq")
            .args(args)
            .env("NATS_URL", self.nats.url())
            .env("REDIS_URL", self.redis.url())
            .envs(self.redis.env())
            .env("CATGA_SERVICE", "orders")
            .env("NO_COLOR", "1")
            .output()
            .expect("run dlq");
        assert!(
            out.status.success(),
            "dlq {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Retries what a replica crash or a handover can cause (no responder,
/// time-out, "being handled right now"), always under the same message
/// id: an idempotent command runs once however often it is sent.
async fn with_retry<T, F, Fut>(mut op: F) -> catga::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = catga::Result<T>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Err(e) if e.is_retryable() && attempt < 40 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            other => return other,
        }
    }
}

fn lines(n: u32) -> Vec<Line> {
    vec![Line {
        sku: "tea".into(),
        quantity: 1 + n % 3,
        unit_cents: 300,
    }]
}

/// Create, pay, ship; each read back at once from whichever replica
/// answers (the store makes them agree).
async fn lifecycle(client: &Client, n: u32) -> OrderId {
    let create_id = format!("create-{n}-{}", catga::new_message_id());
    let id = with_retry(|| {
        client.send_with_id(
            CreateOrder {
                customer: format!("c{n}"),
                lines: lines(n),
            },
            &create_id,
        )
    })
    .await
    .expect("create");
    let view = with_retry(|| client.send(GetOrder { id: id.clone() }))
        .await
        .expect("get");
    assert_eq!(view.status, Status::Created);
    let pay_id = catga::new_message_id();
    with_retry(|| {
        client.send_with_id(
            PayOrder {
                id: id.clone(),
                amount_cents: view.total_cents,
            },
            &pay_id,
        )
    })
    .await
    .expect("pay");
    let ship_id = catga::new_message_id();
    let tracking = with_retry(|| client.send_with_id(ShipOrder { id: id.clone() }, &ship_id))
        .await
        .expect("ship");
    for _ in 0..3 {
        let view = with_retry(|| client.send(GetOrder { id: id.clone() }))
            .await
            .expect("get");
        assert_eq!(
            view.status,
            Status::Shipped,
            "read right after the reply: {view:?}"
        );
        assert_eq!(view.tracking.as_deref(), Some(tracking.as_str()));
    }
    id
}

/// Sends `CreateOrder` from 16 tasks until told to stop; counts replies
/// and failed attempts (each failed attempt is retried under its id).
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    fn start(client: &Client) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..16)
            .map(|t| {
                let (client, stop) = (client.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0u64, Vec::new());
                    let mut n = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let id = catga::new_message_id();
                        let cmd = CreateOrder {
                            customer: format!("load-{t}-{n}"),
                            lines: lines(1),
                        };
                        match client.send_with_id(cmd.clone(), &id).await {
                            Ok(_) => ok += 1,
                            Err(e) => {
                                failed.push(e.to_string());
                                if e.is_retryable()
                                    && with_retry(|| client.send_with_id(cmd.clone(), &id)).await.is_ok()
                                {
                                    ok += 1;
                                }
                            }
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failed) = (0, Vec::new());
        for t in self.tasks {
            let (o, f) = t.await.expect("load task");
            ok += o;
            failed.extend(f);
        }
        (ok, failed)
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([format!("-{sig}"), child.id().to_string()])
        .status()
        .expect("send signal");
    assert!(status.success());
}

async fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    for _ in 0..300 {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the replica did not exit within 15 s");
}

async fn replicas_share_work_survive_sigkill_and_drain_on_sigterm_under_load(layout: Layout) {
    let servers = Servers::start(layout);
    let mut replicas = servers.replicas(&["p1", "p2", "p3"]).await;
    let client = servers.client().await;

    for n in 0..30 {
        lifecycle(&client, n).await;
    }
    let created: Vec<usize> = replicas.iter().map(Replica::created).collect();
    assert_eq!(
        created.iter().sum::<usize>(),
        30,
        "each order created once: {created:?}"
    );
    assert!(
        created.iter().all(|&c| c > 0),
        "every replica took a share: {created:?}"
    );

    // SIGKILL p1 while 16 senders keep going: requests in flight at p1
    // fail and are retried under their id; the others carry on.
    let load = Load::start(&client);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut p1 = replicas.remove(0);
    p1.sigkill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ok, failed) = load.stop().await;
    eprintln!(
        "SIGKILL of one of 3 replicas under load: {ok} orders created, {} attempts failed first time: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert!(ok > 100, "the load was real and went on");
    assert!(
        failed.len() <= 64,
        "at most what was in flight at the killed replica failed"
    );

    // SIGTERM p2 while 16 senders keep going: it drains and hands over;
    // no sender sees a failure.
    let load = Load::start(&client);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut p2 = replicas.remove(0);
    let mut child = p2.child.take().expect("running");
    signal(&child, "TERM");
    let exited = wait_exit(&mut child).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, failed) = load.stop().await;
    eprintln!(
        "SIGTERM of one of 2 replicas under load: {ok} orders created, {} attempts failed",
        failed.len()
    );
    assert!(exited.success(), "clean exit: {exited:?}\n{}", p2.log());
    assert!(p2.log().contains("shutdown complete"), "{}", p2.log());
    assert!(failed.is_empty(), "a drained replica loses nothing: {failed:?}");
    assert!(ok > 100, "the load was real");

    // p3 alone still serves.
    lifecycle(&client, 40).await;
}

/// Payers create and pay orders while replicas are SIGKILLed and
/// restarted; each retries under its message ids until answered. No
/// payer gives up, every order is paid once, and the durable billing
/// ledger counts each payment exactly once, also after every redelivery
/// of the killed replicas' unacknowledged events is over.
async fn payments_are_counted_exactly_once_while_replicas_are_killed(layout: Layout) {
    let servers = Servers::start(layout);
    let mut replicas = servers.replicas(&["p1", "p2", "p3"]).await;
    let client = servers.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let payers: Vec<_> = (0..8u32)
        .map(|t| {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut paid: Vec<(OrderId, u64)> = Vec::new();
                let mut n = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let (create_id, pay_id) = (format!("c-{t}-{n}"), format!("p-{t}-{n}"));
                    let cmd = CreateOrder {
                        customer: format!("payer-{t}"),
                        lines: lines(n),
                    };
                    let id = with_retry(|| client.send_with_id(cmd.clone(), &create_id))
                        .await
                        .unwrap_or_else(|e| panic!("create {create_id} lost: {e}"));
                    let amount = u64::from(1 + n % 3) * 300;
                    let pay = PayOrder {
                        id: id.clone(),
                        amount_cents: amount,
                    };
                    with_retry(|| client.send_with_id(pay.clone(), &pay_id))
                        .await
                        .unwrap_or_else(|e| panic!("pay {pay_id} of {id} lost: {e}"));
                    paid.push((id, amount));
                }
                paid
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(700)).await;
    replicas[0].sigkill();
    tokio::time::sleep(Duration::from_millis(800)).await;
    replicas.push(Replica::spawn(&servers, "p1-again", servers.dir.path()));
    tokio::time::sleep(Duration::from_millis(700)).await;
    replicas[1].sigkill();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut paid = Vec::new();
    for p in payers {
        paid.extend(p.await.expect("payer"));
    }
    let expected = Revenue {
        payments: paid.len() as u64,
        cents: paid.iter().map(|(_, c)| c).sum(),
    };
    eprintln!("{} orders paid while 2 of 3 replicas were killed", paid.len());
    assert!(paid.len() > 50, "the load was real: {}", paid.len());

    // Every order reads back paid, from any replica.
    for (id, _) in &paid {
        let view = with_retry(|| client.send(GetOrder { id: id.clone() }))
            .await
            .expect("get");
        assert_eq!(view.status, Status::Paid, "{view:?}");
        assert_eq!(view.version, 2, "created once and paid once: {view:?}");
    }

    // The ledger catches up (events of the killed replicas are redelivered
    // after the ack wait) and then stays put: nothing counted twice.
    let mut revenue = Revenue::default();
    for _ in 0..200 {
        revenue = with_retry(|| client.send(GetRevenue)).await.expect("revenue");
        if revenue.payments >= expected.payments {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(revenue, expected, "every payment counted once");
    tokio::time::sleep(Duration::from_millis(3 * 1500)).await;
    let later = with_retry(|| client.send(GetRevenue)).await.expect("revenue");
    assert_eq!(later, expected, "and no redelivery counted again");

    // Counts sent from outside, as anyone on the bus may: a paid order's
    // count under another id (as a replayed dead letter past the inbox
    // window sends it) finds the order counted; a wrong amount, a wrong
    // ledger, an unpaid order and an unknown one are refused.
    let (id, amount) = paid[0].clone();
    let count = |id: &OrderId, ledger: String, amount_cents: u64| CountPayment {
        ledger,
        id: id.clone(),
        amount_cents,
    };
    with_retry(|| client.send_with_id(count(&id, ledger_of(&id), amount), "count-again"))
        .await
        .expect("a payment counted already");
    // Refusals are not retryable, so they come back at once; `with_retry`
    // rides out what is (a time-out, no responder), each try a new message.
    let refusal = |e: catga::Error| e.kind();
    let wrong_amount = with_retry(|| client.send(count(&id, ledger_of(&id), amount + 1))).await;
    assert_eq!(wrong_amount.map_err(refusal), Err(ErrorKind::Invalid));
    let other = (0..)
        .map(|n| format!("ledger-{n}"))
        .find(|l| *l != ledger_of(&id));
    let other = other.expect("another ledger");
    let wrong_ledger = with_retry(|| client.send(count(&id, other.clone(), amount))).await;
    assert_eq!(wrong_ledger.map_err(refusal), Err(ErrorKind::Invalid));
    let unpaid = with_retry(|| {
        client.send_with_id(
            CreateOrder {
                customer: "never-pays".into(),
                lines: lines(1),
            },
            "create-never-pays",
        )
    })
    .await
    .expect("create");
    let total = with_retry(|| client.send(GetOrder { id: unpaid.clone() }))
        .await
        .expect("get")
        .total_cents;
    let not_paid = with_retry(|| client.send(count(&unpaid, ledger_of(&unpaid), total))).await;
    assert_eq!(not_paid.map_err(refusal), Err(ErrorKind::Invalid));
    let nobody = OrderId("ord-{nobody}".into());
    let unknown = with_retry(|| client.send(count(&nobody, ledger_of(&nobody), 300))).await;
    assert_eq!(unknown.map_err(refusal), Err(ErrorKind::NotFound));
    let last = with_retry(|| client.send(GetRevenue)).await.expect("revenue");
    assert_eq!(last, expected, "nothing sent from outside was counted");
}

/// The order rules hold across replicas: of a ship and a cancel racing on
/// one paid order exactly one wins; creating again under the same id
/// answers the first order; bad input is a 400, an unknown order a 404;
/// an undecodable payment event becomes a dead letter that the `dlq`
/// command lists and purges.
async fn order_rules_hold_across_replicas(layout: Layout) {
    let servers = Servers::start(layout);
    let replicas = servers.replicas(&["p1", "p2", "p3"]).await;
    let client = servers.client().await;

    for n in 0..20u32 {
        let id = client
            .send(CreateOrder {
                customer: "racer".into(),
                lines: lines(n),
            })
            .await
            .expect("create");
        client
            .send(PayOrder {
                id: id.clone(),
                amount_cents: u64::from(1 + n % 3) * 300,
            })
            .await
            .expect("pay");
        let (ship, cancel) = tokio::join!(
            client.send(ShipOrder { id: id.clone() }),
            client.send(CancelOrder {
                id: id.clone(),
                reason: "race".into(),
            })
        );
        let view = client.send(GetOrder { id: id.clone() }).await.expect("get");
        match (&ship, &cancel) {
            (Ok(_), Err(e)) => {
                assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
                assert_eq!(view.status, Status::Shipped);
            }
            (Err(e), Ok(())) => {
                assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
                assert_eq!(view.status, Status::Cancelled);
            }
            other => panic!("exactly one of ship and cancel wins: {other:?}"),
        }
        assert_eq!(view.version, 3, "created, paid, then one of the two: {view:?}");
    }

    let first = client
        .send_with_id(
            CreateOrder {
                customer: "again".into(),
                lines: lines(1),
            },
            "same-create",
        )
        .await
        .expect("create");
    for _ in 0..5 {
        let again = client
            .send_with_id(
                CreateOrder {
                    customer: "again".into(),
                    lines: lines(1),
                },
                "same-create",
            )
            .await
            .expect("create again");
        assert_eq!(again, first, "the same id answers the first order");
    }

    let overflow = client
        .send(CreateOrder {
            customer: "big".into(),
            lines: vec![Line {
                sku: "gold".into(),
                quantity: u32::MAX,
                unit_cents: u64::MAX,
            }],
        })
        .await
        .expect_err("overflow");
    assert_eq!(overflow.kind(), ErrorKind::Invalid, "{overflow}");
    assert_eq!(overflow.code(), 400);
    assert!(
        overflow.to_string().contains(&MAX_TOTAL_CENTS.to_string()),
        "{overflow}"
    );

    let started = std::time::Instant::now();
    let missing = client
        .send(GetOrder {
            id: OrderId("ord-nope".into()),
        })
        .await
        .expect_err("unknown");
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered, not timed out"
    );

    // A payment event nobody can decode: billing, the fulfilment saga and
    // the invoicing saga's router (the durable consumers of it) give up on
    // it at once and keep it as a dead letter each, for an operator.
    client
        .publish_raw("orders.paid", bytes::Bytes::from_static(b"\xff not json"))
        .await
        .expect("publish");
    let mut listed = String::new();
    for _ in 0..100 {
        listed = servers.dlq(&["list"]);
        if listed.contains("record_payment") && listed.contains("fulfil") && listed.contains("invoice") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        listed.contains("orders.paid")
            && listed.contains("record_payment")
            && listed.contains("fulfil")
            && listed.contains("invoice"),
        "{listed}"
    );
    assert!(
        listed.contains("deliveries=1"),
        "undecodable is not retried: {listed}"
    );
    let shown = servers.dlq(&[
        "show",
        listed.trim_start_matches('#').split(' ').next().unwrap_or("1"),
    ]);
    assert!(shown.contains("not json"), "{shown}");
    assert!(
        shown.contains("authentic: yes") && !listed.contains("NOT WRITTEN"),
        "every letter checked against the store: {shown}"
    );
    assert_eq!(servers.dlq(&["purge-all"]).trim(), "purged 3");
    assert_eq!(servers.dlq(&["list"]).trim(), "");
    let mut revenue = Revenue::default();
    for _ in 0..100 {
        revenue = client.send(GetRevenue).await.expect("revenue");
        if revenue.payments >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        revenue.payments,
        20,
        "each real payment counted, the garbage not; {}",
        trouble(&replicas)
    );
}

/// Creates order `n` of `customer` and pays it, each under its own id
/// and retried until answered.
async fn create_and_pay(client: &Client, n: u32, customer: String) -> OrderId {
    let create_id = format!("create-{n}-{}", catga::new_message_id());
    let cmd = CreateOrder {
        customer,
        lines: lines(n),
    };
    let id = with_retry(|| client.send_with_id(cmd.clone(), &create_id))
        .await
        .expect("create");
    let pay_id = format!("pay-{n}-{}", catga::new_message_id());
    let pay = PayOrder {
        id: id.clone(),
        amount_cents: u64::from(1 + n % 3) * 300,
    };
    with_retry(|| client.send_with_id(pay.clone(), &pay_id))
        .await
        .expect("pay");
    id
}

/// Whether `replica` became the leader (by its log).
fn leads(replica: &Replica) -> bool {
    replica.log().contains("this replica is the leader now")
}

/// Orders are paid while the fulfilment sagas run on the leader; the
/// leader is SIGKILLed mid-way, then the next one is SIGSTOPped for two
/// leases and resumed (its writes are fenced, it steps down). Every order
/// ends fulfilled (stock reserved once, courier booked once) or, when no
/// courier takes it, with its stock reserved once and released once;
/// nothing twice.
async fn fulfilment_sagas_survive_a_killed_and_a_stalled_leader(layout: Layout) {
    let servers = Servers::start(layout);
    let mut replicas = servers.replicas(&["s1", "s2", "s3"]).await;
    let client = servers.client().await;
    // Orders are paid in the background while the sagas run.
    let paid: Arc<std::sync::Mutex<Vec<OrderId>>> = Arc::default();
    let payments = {
        let (client, paid) = (client.clone(), Arc::clone(&paid));
        tokio::spawn(async move {
            for n in 0..60u32 {
                let id = create_and_pay(&client, n, format!("f{n}")).await;
                paid.lock().expect("paid").push(id);
            }
        })
    };
    let state = |id: OrderId| {
        let client = client.clone();
        async move { with_retry(|| client.send(GetFulfilment { id: id.clone() })).await }
    };
    let terminal = |id: &OrderId, f: &Fulfilment| {
        if refused(id) { f.released > 0 } else { f.booked > 0 }
    };
    // Some sagas are done, more to come: the leader dies.
    let mut done = 0;
    for _ in 0..600 {
        done = 0;
        let so_far = paid.lock().expect("paid").clone();
        for id in &so_far {
            let f = state(id.clone()).await.expect("fulfilment");
            done += usize::from(terminal(id, &f));
        }
        if done >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        done >= 5 && !payments.is_finished(),
        "sagas done before the kill: {done}, payments still arriving"
    );
    let first = replicas.iter().position(leads).expect("a leader");
    replicas[first].sigkill();
    // The next leader, stalled for two leases, then resumed.
    let mut next = None;
    for _ in 0..200 {
        next = (0..replicas.len()).find(|&i| i != first && leads(&replicas[i]));
        if next.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let next = next.unwrap_or_else(|| panic!("no new leader:\n{}", trouble(&replicas)));
    let child = replicas[next].child.as_ref().expect("running");
    signal(child, "STOP");
    tokio::time::sleep(Duration::from_millis(3000)).await;
    signal(child, "CONT");
    payments.await.expect("payments");
    let ids = paid.lock().expect("paid").clone();
    assert_eq!(ids.len(), 60);
    // Every saga ends, each step applied once.
    for id in &ids {
        let mut f = Fulfilment::default();
        for _ in 0..600 {
            f = state(id.clone()).await.expect("fulfilment");
            if terminal(id, &f) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let expected = if refused(id) {
            Fulfilment {
                reserved: 1,
                released: 1,
                booked: 0,
            }
        } else {
            Fulfilment {
                reserved: 1,
                released: 0,
                booked: 1,
            }
        };
        let about = |id: &OrderId| {
            replicas
                .iter()
                .flat_map(|r| {
                    r.log()
                        .lines()
                        .filter(|l| l.contains(&id.0) || l.contains("leader"))
                        .map(|l| format!("{}: {l}", r.name))
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(f, expected, "order {}:\n{}", id.0, about(id));
    }
    assert!(
        ids.iter().any(refused) && ids.iter().any(|id| !refused(id)),
        "both outcomes exercised"
    );
    // The CLI lists them: one line per saga, compensated or completed
    // (besides the invoicing sagas of the same payments).
    let listed = servers.sagas(200);
    let lines: Vec<&str> = listed.lines().filter(|l| l.starts_with("fulfil:")).collect();
    assert_eq!(lines.len(), ids.len(), "{listed}");
    let compensated = lines.iter().filter(|l| l.contains(" compensated ")).count();
    assert_eq!(
        compensated,
        ids.iter().filter(|id| refused(id)).count(),
        "{listed}"
    );
    assert!(
        lines
            .iter()
            .filter(|l| l.contains(" compensated "))
            .all(|l| l.contains("reserve (done, compensation sent)") && l.contains("no courier")),
        "{listed}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains(" completed ")).count(),
        ids.len() - compensated,
        "{listed}"
    );
    // The stalled leader found it had lost the lease.
    assert!(
        replicas[next]
            .log()
            .contains("this replica is no longer the leader"),
        "the stalled leader stepped down:\n{}",
        replicas[next].log()
    );
}

/// The `orders.paid` events in the order their stream keeps them: the
/// order each customer's invoicing sagas must follow.
async fn paid_in_stream_order(nats_url: &str) -> Vec<OrderPaid> {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.expect("connect"));
    let name = js
        .stream_by_subject("orders.paid")
        .await
        .expect("the paid stream");
    let mut stream = js.get_stream(name).await.expect("stream");
    let last = stream.info().await.expect("info").state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.expect("message");
        out.push(serde_json::from_slice(&m.payload).expect("an OrderPaid"));
    }
    out
}

/// Invoicing sagas, keyed by customer over 16 partitions, run while
/// payments arrive; one replica is SIGKILLed mid-run and another joins.
/// Every paid order is invoiced once, and each customer's invoices follow
/// the order of the payments in the stream.
async fn invoices_follow_each_customers_payments_while_replicas_die_and_join(layout: Layout) {
    let servers = Servers::start(layout);
    let mut replicas = servers.replicas(&["k1", "k2", "k3"]).await;
    let client = servers.client().await;
    const ORDERS: u32 = 96;
    const CUSTOMERS: u32 = 6;
    let payments = {
        let client = client.clone();
        tokio::spawn(async move {
            for n in 0..ORDERS {
                create_and_pay(&client, n, format!("k{}", n % CUSTOMERS)).await;
                // Paced, so that payments still arrive when the first
                // invoices are out, however fast this host pays.
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };
    let invoiced = |client: Client| async move {
        let mut total = 0;
        for c in 0..CUSTOMERS {
            let customer = format!("k{c}");
            let got = with_retry(|| {
                client.send(GetInvoices {
                    customer: customer.clone(),
                })
            })
            .await
            .expect("invoices");
            total += got.orders.len();
        }
        total
    };
    // Some invoices are out: a replica dies with sagas in flight.
    for _ in 0..600 {
        if invoiced(client.clone()).await >= 8 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!payments.is_finished(), "payments still arriving at the kill");
    replicas[0].sigkill();
    // Another joins while they keep arriving.
    let joined = Replica::spawn(&servers, "k4", servers.dir.path());
    joined.wait_ready().await;
    replicas.push(joined);
    payments.await.expect("payments");
    let started = std::time::Instant::now();
    while invoiced(client.clone()).await < ORDERS as usize {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not every order invoiced:\n{}",
            trouble(&replicas)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let paid = paid_in_stream_order(&servers.nats.url()).await;
    assert_eq!(paid.len(), ORDERS as usize, "each payment's event stored once");
    for c in 0..CUSTOMERS {
        let customer = format!("k{c}");
        let expected: Vec<OrderId> = paid
            .iter()
            .filter(|p| p.customer == customer)
            .map(|p| p.id.clone())
            .collect();
        let got = with_retry(|| {
            client.send(GetInvoices {
                customer: customer.clone(),
            })
        })
        .await
        .expect("invoices");
        assert_eq!(
            got.orders,
            expected,
            "{customer}: each order invoiced once, in payment order:\n{}",
            trouble(&replicas)
        );
    }
    // The partitions moved: the survivors and the newcomer serve some.
    assert!(
        replicas[1..]
            .iter()
            .all(|r| r.log().contains("saga partitions served here")),
        "every live replica serves partitions:\n{}",
        trouble(&replicas)
    );
}

/// Orders left unpaid get their reminder (a delayed message committed
/// with the order) and are expired by the job, once each across two
/// replicas; a paid order is left alone. More than a batch of them wait
/// in one overdue list, and each is expired once (whether one occurrence
/// of the job takes them in two batches or two occurrences do: the test
/// does not tell which).
async fn unpaid_orders_are_reminded_then_expired_once(layout: Layout) {
    // The reminder comes 2 s after an order: time enough for the paid
    // one to be paid first on a loaded host.
    let servers = Servers::start_with(
        layout,
        &[
            ("ORDER_REMIND_AFTER_MS", "2000"),
            ("ORDER_EXPIRE_AFTER_MS", "3000"),
        ],
    );
    let replicas = servers.replicas(&["e1", "e2"]).await;
    let client = servers.client().await;
    // 3 orders anywhere, then a batch and 5 more in one overdue list.
    let crowded = order_system::expiry::overdue_list_of(&order_system::orders::order_id("create-crowded"));
    let mut create_ids: Vec<String> = (0..3)
        .map(|n| format!("create-{n}-{}", catga::new_message_id()))
        .collect();
    create_ids.extend(
        (3..)
            .map(|n| format!("create-{n}-{}", catga::new_message_id()))
            .filter(|id| {
                order_system::expiry::overdue_list_of(&order_system::orders::order_id(id)) == crowded
            })
            .take(order_system::expiry::EXPIRE_BATCH + 5),
    );
    let mut unpaid = Vec::new();
    for (n, create_id) in create_ids.iter().enumerate() {
        let n = n as u32 % 5;
        let cmd = CreateOrder {
            customer: format!("late-{n}"),
            lines: lines(n),
        };
        unpaid.push(
            with_retry(|| client.send_with_id(cmd.clone(), create_id))
                .await
                .expect("create"),
        );
    }
    let paid = create_and_pay(&client, 7, "prompt".to_owned()).await;
    // Reminded after 2 s, due to expire at 3 s, expired by the next
    // occurrence of the 5 s job.
    let start = std::time::Instant::now();
    loop {
        let mut cancelled = 0;
        for id in &unpaid {
            let view = with_retry(|| client.send(GetOrder { id: id.clone() }))
                .await
                .expect("get");
            cancelled += usize::from(view.status == Status::Cancelled);
        }
        if cancelled == unpaid.len() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{cancelled} of {} unpaid orders expired in 30 s; {}",
            unpaid.len(),
            trouble(&replicas)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let view = with_retry(|| client.send(GetOrder { id: paid.clone() }))
        .await
        .expect("get");
    assert_eq!(view.status, Status::Paid, "a paid order is not expired");
    let logs: String = replicas.iter().map(Replica::log).collect();
    // A log line can repeat when a commit lost a race and the handler
    // ran again; what counts is which orders it names.
    let reminded: std::collections::BTreeSet<&str> = logs
        .lines()
        .filter(|l| l.contains("payment reminder sent"))
        .filter_map(|l| l.split("order=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert_eq!(
        reminded.len(),
        unpaid.len(),
        "one reminder per unpaid order: {reminded:?}"
    );
    assert!(
        !reminded.iter().any(|o| paid.0.contains(o)),
        "the paid order is not reminded"
    );
    let expired: std::collections::BTreeSet<&str> = logs
        .lines()
        .filter(|l| l.contains("order cancelled: unpaid"))
        .filter_map(|l| l.split("order=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert_eq!(expired, reminded, "the reminded orders, and only those, expired");
}

/// Each test on both layouts: `one_server::<test>` and
/// `sharded_cluster::<test>`.
macro_rules! on_both_layouts {
    ($($test:ident),* $(,)?) => {
        mod one_server {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Layout::Server).await;
                }
            )*
        }

        mod sharded_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Layout::Sharded).await;
                }
            )*
        }
    };
}

on_both_layouts!(
    replicas_share_work_survive_sigkill_and_drain_on_sigterm_under_load,
    payments_are_counted_exactly_once_while_replicas_are_killed,
    order_rules_hold_across_replicas,
    fulfilment_sagas_survive_a_killed_and_a_stalled_leader,
    invoices_follow_each_customers_payments_while_replicas_die_and_join,
    unpaid_orders_are_reminded_then_expired_once,
);
