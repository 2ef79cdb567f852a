include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[event]
async fn added(cmd: Add) -> Result<()> {
    let _ = cmd.a;
    Ok(())
}

fn main() {}
