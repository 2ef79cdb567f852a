include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[event(subject = "numbers..added")]
#[derive(Serialize, Deserialize)]
pub struct Gap;

#[command(subject = "add numbers")]
#[derive(Serialize, Deserialize)]
pub struct Spaced;

fn main() {}
