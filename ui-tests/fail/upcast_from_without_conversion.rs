include!("shared/messages.rs"); // Add (a command replying u64), Added (an event)

/// What release 1 published.
#[derive(Deserialize)]
pub struct AddedV1 {
    pub total: u64,
}

// Release 2 reads release 1's events as `AddedV1`, but says nowhere how
// an `AddedV1` becomes an `AddedNow` (`impl From<AddedV1> for AddedNow`).
#[event(subject = "added.v", version = 2, upcast_from = AddedV1)]
#[derive(Serialize, Deserialize)]
pub struct AddedNow {
    pub sum: u64,
}

fn main() {}
