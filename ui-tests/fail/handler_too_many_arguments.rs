#![allow(unused_imports)] // the shared header imports more than each case uses

use catga::{Context, Result, command, event};
use serde::{Deserialize, Serialize};

#[command(reply = u64)]
#[derive(Serialize, Deserialize)]
pub struct Add {
    pub a: u64,
}

#[event]
#[derive(Serialize, Deserialize)]
pub struct Added {
    pub sum: u64,
}

#[command]
async fn add(ctx: &Context, cmd: Add, extra: u32) -> Result<u64> {
    Ok(cmd.a + u64::from(extra))
}
fn main() {}
