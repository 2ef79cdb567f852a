include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[command]
async fn add(ctx: &Context, cmd: Add, extra: u32) -> Result<u64> {
    Ok(cmd.a + u64::from(extra))
}

fn main() {}
