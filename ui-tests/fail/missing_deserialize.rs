use catga::event;
use serde::Serialize;

// Only half of what a message needs.
#[event]
#[derive(Serialize)]
pub struct Shipped {
    pub id: u64,
}

fn main() {}
