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

/// Sends `CreateOrder` from 16 tasks until told to stop; counts replies
/// and failed attempts (each failed attempt is retried once if retryable).
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>,
}

impl Load {
    fn start(client: &Client) -> Load {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..16)
            .map(|t| {
                let (client, stop) = (client.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0u64, Vec::new());
                    let mut n = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let cmd = CreateOrder {
                            customer: format!("load-{t}-{n}"),
                            lines: vec![Line {
                                sku: "tea".into(),
                                quantity: 1,
                                unit_cents: 100,
                            }],
                        };
                        match client.send(cmd.clone()).await {
                            Ok(_) => ok += 1,
                            Err(e) => {
                                failed.push(e.to_string());
                                if e.is_retryable() && client.send(cmd).await.is_ok() {
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
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_work_survive_sigkill_and_drain_on_sigterm_under_load() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut replicas: Vec<Replica> = ["p1", "p2", "p3"]
        .iter()
        .map(|n| Replica::spawn(&server.url(), n, dir.path()))
        .collect();
    for r in &replicas {
        r.wait_ready().await;
    }
    let client = Client::connect(&server.url())
        .await
        .expect("client")
        .with_request_timeout(Duration::from_secs(3));

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
    // fail (and are retried); the others carry on.
    let load = Load::start(&client);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut p1 = replicas.remove(0);
    let mut child = p1.child.take().expect("running");
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (ok, failed) = load.stop().await;
    eprintln!(
        "SIGKILL of one of 3 replicas under load: {ok} orders created, {} attempts failed: {:?}",
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
