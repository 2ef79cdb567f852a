//! The smallest catga service: one command, one event, one test.
//!
//! `cargo run -p hello` serves on the embedded transport (set `NATS_URL`
//! to serve over NATS), greets once to show it works, and serves until
//! Ctrl-C; `cargo test -p hello` runs its test.

use catga::{Context, Result, command, event};
use serde::{Deserialize, Serialize};

/// Asks for a greeting; the reply is the greeting.
#[command(reply = String)]
#[derive(Serialize, Deserialize)]
pub struct Greet {
    /// Who to greet.
    pub name: String,
}

/// Someone was greeted.
#[event(subject = "hello.greeted")]
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct Greeted {
    /// Who.
    pub name: String,
}

/// Answers one replica per command, and tells every replica about it.
#[command]
async fn greet(ctx: &Context, cmd: Greet) -> Result<String> {
    if cmd.name.trim().is_empty() {
        return Err(catga::Error::invalid("a greeting needs a name"));
    }
    ctx.publish(Greeted {
        name: cmd.name.clone(),
    })
    .await?;
    Ok(format!("hello, {}", cmd.name))
}

/// Every replica hears of every greeting.
#[event]
async fn on_greeted(e: Greeted) -> Result<()> {
    tracing::info!(name = %e.name, "greeted");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    catga::init_telemetry("hello");
    let runtime = catga::start().await?;
    runtime.ready().await?;
    let answer = runtime
        .client()
        .send(Greet {
            name: "world".to_owned(),
        })
        .await?;
    println!("{answer}");
    runtime.run_until_signal().await
}

#[cfg(test)]
mod tests {
    use super::*;

    use catga::testing::TestKit;

    /// With the test kit, on the embedded transport: send, wait until
    /// everything it set off settled, check the answer, the event it
    /// published, and the error.
    #[tokio::test]
    async fn greets_by_name_and_refuses_no_name() -> Result<()> {
        let kit = TestKit::start().await?;
        let client = kit.client();
        assert_eq!(
            client
                .send(Greet {
                    name: "Ada".to_owned()
                })
                .await?,
            "hello, Ada"
        );
        let err = client
            .send(Greet { name: " ".to_owned() })
            .await
            .expect_err("no name");
        assert_eq!(err.kind(), catga::ErrorKind::Invalid);
        kit.settled().await?;
        assert_eq!(
            kit.published::<Greeted>()?,
            [Greeted {
                name: "Ada".to_owned()
            }]
        );
        kit.shutdown().await
    }
}
