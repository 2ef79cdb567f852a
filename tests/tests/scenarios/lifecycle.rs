//! Handlers started and stopped while the runtime serves (what leadership
//! and shard ownership will do).

use std::time::Duration;

use catga::{ErrorKind, Result, command};
use catga_tests::Backend;
use serde::{Deserialize, Serialize};

/// Served, then not, then again.
#[command(reply = String)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Toggled;

/// Served all along.
#[command(reply = String)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Steady;

#[command]
async fn toggled(_: Toggled) -> Result<String> {
    Ok("toggled".into())
}

#[command]
async fn steady(_: Steady) -> Result<String> {
    Ok("steady".into())
}

catga_tests::on_both!(handlers_start_and_stop_while_running);

async fn handlers_start_and_stop_while_running(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await.with_request_timeout(Duration::from_secs(3));
    let name = format!("{}::toggled", module_path!());
    assert_eq!(client.send(Toggled).await.expect("served"), "toggled");

    rt.stop_handler(&name).await.expect("stops");
    assert!(!rt.serving().await.contains(&name.as_str()));
    let err = client.send(Toggled).await.expect_err("no longer served");
    assert_eq!(err.kind(), ErrorKind::NoHandler, "{err}");
    assert_eq!(client.send(Steady).await.expect("the rest goes on"), "steady");
    assert!(
        rt.is_ready(),
        "a stopped handler is not a missing subscription: {:?}",
        rt.readiness()
    );

    rt.start_handler(&name).await.expect("starts again");
    tokio::time::timeout(Duration::from_secs(10), rt.ready())
        .await
        .expect("ready again")
        .expect("readiness");
    assert_eq!(client.send(Toggled).await.expect("served again"), "toggled");
    assert!(rt.start_handler("no::such::handler").await.is_err());
    rt.shutdown().await.expect("clean shutdown");
}
