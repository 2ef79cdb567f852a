//! `crate = "..."` for users who re-export catga under another path.

mod framework {
    pub use catga as bus;
}

use serde::{Deserialize, Serialize};

#[catga::command(crate = "crate::framework::bus", reply = String)]
#[derive(Serialize, Deserialize)]
pub struct Hello;

#[catga::command(crate = "crate::framework::bus")]
async fn hello(_: Hello) -> framework::bus::Result<String> {
    Ok("hi".into())
}

fn main() {
    assert_eq!(<Hello as catga::Message>::SUBJECT, "cmd.hello");
    assert_eq!(catga::handlers().len(), 1);
}
