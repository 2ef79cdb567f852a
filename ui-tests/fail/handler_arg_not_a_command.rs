include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[derive(Serialize, Deserialize)]
pub struct Plain {
    pub a: u64,
}

#[command]
async fn add(cmd: Plain) -> Result<u64> {
    Ok(cmd.a)
}

fn main() {}
