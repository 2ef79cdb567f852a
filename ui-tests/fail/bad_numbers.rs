include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[command(concurrency = 0)]
async fn add(cmd: Add) -> Result<u64> {
    Ok(cmd.a)
}

#[event(version = 0)]
#[derive(Serialize, Deserialize)]
pub struct Zero;

#[event(parallel = 5000)]
async fn added(e: Added) -> Result<()> {
    let _ = e.sum;
    Ok(())
}

fn main() {}
