include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[command]
async fn add(ctx: Context, cmd: Add) -> Result<u64> {
    let _ = ctx;
    Ok(cmd.a)
}

fn main() {}
