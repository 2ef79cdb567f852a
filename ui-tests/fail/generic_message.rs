include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

#[command]
#[derive(Serialize, Deserialize)]
pub struct Wrapper<T> {
    pub inner: T,
}

fn main() {}
