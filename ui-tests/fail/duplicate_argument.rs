include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[event(subject = "numbers.one", subject = "numbers.two")]
#[derive(Serialize, Deserialize)]
pub struct Twice;

fn main() {}
