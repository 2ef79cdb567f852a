include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[command(queue_group = "adders")]
#[derive(Serialize, Deserialize)]
pub struct Sub {
    pub a: u64,
}

fn main() {}
