//! A declared command and its handler serve a request on the embedded bus.

use catga::{Runtime, command};
use serde::{Deserialize, Serialize};

#[command(reply = String)]
#[derive(Serialize, Deserialize)]
pub struct Greet {
    pub name: String,
}

#[command]
async fn greet(cmd: Greet) -> catga::Result<String> {
    Ok(format!("hello {}", cmd.name))
}

#[tokio::main]
async fn main() {
    let bus = catga::MemoryBus::new();
    let rt = Runtime::builder().memory(bus.clone()).start().await.expect("start");
    let reply = catga::Client::memory(&bus)
        .send(Greet { name: "ui".into() })
        .await
        .expect("reply");
    assert_eq!(reply, "hello ui");
    rt.shutdown().await.expect("shutdown");
}
