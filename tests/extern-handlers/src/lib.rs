//! Handlers that live in a library crate. A binary that never names this
//! crate loses them at link time; `catga::link!(catga_extern_handlers);`
//! keeps them.

use catga::{Result, command};
use serde::{Deserialize, Serialize};

/// Asks the library handler for a greeting.
#[command(subject = "extern.greet", reply = String)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Greet {
    /// Who to greet.
    pub name: String,
}

#[command(queue_group = "extern-workers")]
async fn greet(cmd: Greet) -> Result<String> {
    Ok(format!("hello, {}", cmd.name))
}
