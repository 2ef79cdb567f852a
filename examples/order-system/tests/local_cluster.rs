//! Drives `deploy/local-cluster`: a 3-node nats-server cluster, a 3-master
//! Redis Cluster holding the service in 3 store shards, and two replicas
//! as real processes on loopback; a load client runs while the NATS node
//! it may be connected to is SIGKILLed; nothing is lost; every master
//! holds a share of the service's keys; `stop` leaves nothing running.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use catga_tests::process::DeployScript;
use catga_tests::servers::alive;

fn cluster() -> DeployScript {
    DeployScript::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/local-cluster"),
        ("CATGA_CLUSTER_DIR", "CATGA_CLUSTER_BASE_PORT"),
        env!("CARGO_BIN_EXE_order-system"),
    )
}

#[test]
fn local_cluster_serves_survives_a_nats_node_and_stops_cleanly() {
    let cluster = cluster();
    let started = cluster.run(&["start", "2"]);
    let status = String::from_utf8_lossy(&started.stdout).into_owned();
    for i in 1..=2 {
        let port = cluster.base + 40 + i;
        assert!(
            status.contains(&format!("http://127.0.0.1:{port}/metrics")),
            "{status}"
        );
        let addr = format!("127.0.0.1:{port}").parse().expect("addr");
        let (code, body) = catga_tests::http::get(addr, "/metrics");
        assert_eq!(code, 200);
        assert!(body.contains("catga_ready 1"), "{body}");
    }
    let pids: Vec<u32> = [
        "nats1", "nats2", "nats3", "redis1", "redis2", "redis3", "orders1", "orders2",
    ]
    .iter()
    .map(|n| cluster.pid(n).expect("pid"))
    .collect();

    // A load client while one NATS node is SIGKILLed.
    let load = cluster
        .command(&["load", "400", "8"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("load");
    std::thread::sleep(Duration::from_millis(500));
    let nats1 = cluster.pid("nats1").expect("pid");
    assert!(
        Command::new("kill")
            .args(["-KILL", &nats1.to_string()])
            .status()
            .expect("kill")
            .success()
    );
    let out = load.wait_with_output().expect("load ran");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the load lost orders");
    assert!(text.contains("400 ok, 0 failed"), "{text}");

    // The service's keys are spread over the three masters: each holds
    // orders (the 400 were placed in the shards of their message ids).
    for k in 0..3u16 {
        let port = (cluster.base + 30 + k).to_string();
        let out = Command::new("redis-cli")
            .args([
                "-p",
                &port,
                "--scan",
                "--pattern",
                "catga:{order-system~*}:state:order:*",
            ])
            .output()
            .expect("redis-cli");
        let orders = String::from_utf8_lossy(&out.stdout).lines().count();
        assert!(
            orders > 50,
            "the master on port {port} holds {orders} of the 400 orders"
        );
    }

    cluster.run(&["stop"]);
    std::thread::sleep(Duration::from_millis(200));
    for pid in pids {
        assert!(!alive(pid), "pid {pid} still runs after stop");
    }
    let status = cluster.run(&["status"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("not running"));
}
