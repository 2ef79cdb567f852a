//! A replica for the process test of regions (`tests/regions.rs`): answers
//! `region.where` with its instance id, and says who handled each
//! queue-grouped `region.noted` and each durable `region.stored`.

use catga::{Context, Result, command, event};
use catga_tests::messages::region::{Noted, NotedBy, Stored, StoredBy, Where};

#[command(queue_group = "where")]
async fn answer(ctx: &Context, _w: Where) -> Result<String> {
    Ok(ctx.instance_id().to_owned())
}

#[event(queue_group = "noters")]
async fn noted(ctx: &Context, e: Noted) -> Result<()> {
    ctx.client()
        .publish(NotedBy {
            n: e.n,
            by: ctx.instance_id().to_owned(),
        })
        .await
}

#[event(durable = "region-stored")]
async fn stored(ctx: &Context, e: Stored) -> Result<()> {
    ctx.client()
        .publish(StoredBy {
            n: e.n,
            by: ctx.instance_id().to_owned(),
        })
        .await
}

#[tokio::main]
async fn main() -> Result<()> {
    catga::start().await?.run_until_signal().await
}
