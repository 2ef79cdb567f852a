include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[command]
async fn add<T: Default>(cmd: Add) -> Result<u64> {
    let _ = T::default();
    Ok(cmd.a)
}

fn main() {}
