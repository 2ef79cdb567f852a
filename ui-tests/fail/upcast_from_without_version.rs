include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

/// What release 1 published.
#[derive(Deserialize)]
pub struct AddedV1 {
    pub total: u64,
}

// Which versions would be upcast? The type is version 1.
#[event(subject = "added.v", upcast_from = AddedV1)]
#[derive(Serialize, Deserialize)]
pub struct AddedNow {
    pub sum: u64,
}

fn main() {}
