//! Several OS processes of the example binary share the work over a real
//! nats-server; one is killed with SIGKILL and the others carry on; one is
//! stopped with SIGTERM and drains cleanly.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use catga::Client;
use catga_tests::NatsServer;
use order_system::orders::{CreateOrder, GetOrder, Line, OrderId, PayOrder, ShipOrder, Status};

struct Replica {
    name: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    fn spawn(nats_url: &str, name: &str, dir: &std::path::Path) -> Replica {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_order-system"))
            .env("NATS_URL", nats_url)
            .env("CATGA_INSTANCE_ID", name)
            .env("CATGA_SERVICE", "orders")
            .env("ORDER_DEMO", "0")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
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
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Retries only what a replica crash can cause (no responder, time-out).
async fn with_retry<T, F, Fut>(mut op: F) -> catga::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = catga::Result<T>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Err(e) if e.is_retryable() && attempt < 3 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return other,
        }
    }
}

async fn lifecycle(client: &Client, n: u32) -> OrderId {
    let id = with_retry(|| {
        client.send(CreateOrder {
            customer: format!("c{n}"),
            lines: vec![Line {
                sku: "tea".into(),
                quantity: 1 + n % 3,
                unit_cents: 300,
            }],
        })
    })
    .await
    .expect("create");
    let total = u64::from(1 + n % 3) * 300;
    with_retry(|| {
        client.send(PayOrder {
            id: id.clone(),
            amount_cents: total,
        })
    })
    .await
    .expect("pay");
    with_retry(|| client.send(ShipOrder { id: id.clone() }))
        .await
        .expect("ship");
    // The read model is eventually consistent: every replica applies the
    // events on its own, so the replica answering may lag an instant.
    for _ in 0..50 {
        let view = with_retry(|| client.send(GetOrder { id: id.clone() }))
            .await
            .expect("get");
        if view.status == Status::Shipped {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("order {id} never read back as shipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_work_survive_sigkill_and_drain_on_sigterm() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut replicas: Vec<Replica> = ["p1", "p2", "p3"]
        .iter()
        .map(|n| Replica::spawn(&server.url(), n, dir.path()))
        .collect();
    for r in &replicas {
        r.wait_ready().await;
    }
    let client = Client::connect(&server.url()).await.expect("client");

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

    // SIGKILL p1: the other two carry on.
    let mut p1 = replicas.remove(0);
    if let Some(mut child) = p1.child.take() {
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }
    let before: Vec<usize> = replicas.iter().map(Replica::created).collect();
    for n in 30..40 {
        lifecycle(&client, n).await;
    }
    let after: Vec<usize> = replicas.iter().map(Replica::created).collect();
    assert_eq!(
        after.iter().sum::<usize>() - before.iter().sum::<usize>(),
        10,
        "the survivors created every new order exactly once"
    );

    // SIGTERM p2: graceful drain and a clean exit.
    let mut p2 = replicas.remove(0);
    let mut child = p2.child.take().expect("running");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    let mut exited = None;
    for _ in 0..200 {
        if let Some(s) = child.try_wait().expect("wait") {
            exited = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let exited = exited.expect("p2 exits within 10 s of SIGTERM");
    assert!(exited.success(), "clean exit: {exited:?}");
    assert!(p2.log().contains("shutdown complete"), "{}", p2.log());

    // p3 alone still serves.
    lifecycle(&client, 40).await;
}
