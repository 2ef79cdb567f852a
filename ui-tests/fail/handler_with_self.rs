include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

pub struct Service;

impl Service {
    #[command]
    async fn add(&self, cmd: Add) -> Result<u64> {
        Ok(cmd.a)
    }
}

fn main() {}
