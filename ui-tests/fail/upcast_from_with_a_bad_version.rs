include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

/// What release 1 published.
#[derive(Deserialize)]
pub struct AddedV1 {
    pub total: u64,
}

// One mistake, one error: the version, not also `upcast_from`.
#[event(subject = "added.v", version = 0, upcast_from = AddedV1)]
#[derive(Serialize, Deserialize)]
pub struct AddedNow {
    pub sum: u64,
}

fn main() {}
