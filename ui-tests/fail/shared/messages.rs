// Shared by the fail cases through `include!`: one command, one event, and
// the imports the cases use (not every case uses every import).

#[allow(unused_imports)]
use catga::{Context, Result, Saga, command, event, job, saga};
#[allow(unused_imports)]
use serde::{Deserialize, Serialize};

/// A command that replies with a `u64`.
#[command(reply = u64)]
#[derive(Serialize, Deserialize)]
pub struct Add {
    pub a: u64,
}

/// An event.
#[event]
#[derive(Serialize, Deserialize)]
pub struct Added {
    pub sum: u64,
}
