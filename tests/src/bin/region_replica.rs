//! A replica for the process test of regions (`tests/regions.rs`): answers
//! `region.where` with its instance id.

use catga::{Context, Result, command};
use catga_tests::messages::region::Where;

#[command(queue_group = "where")]
async fn answer(ctx: &Context, _w: Where) -> Result<String> {
    Ok(ctx.instance_id().to_owned())
}

#[tokio::main]
async fn main() -> Result<()> {
    catga::start().await?.run_until_signal().await
}
