//! Every supported handler form registers in the handler table.

use catga::{Context, HandlerKind, Result, command, event};
use serde::{Deserialize, Serialize};

#[command(reply = u64)]
#[derive(Serialize, Deserialize)]
pub struct Add {
    pub a: u64,
    pub b: u64,
}

#[command]
#[derive(Serialize, Deserialize)]
pub struct Reset;

#[event(subject = "numbers.added")]
#[derive(Serialize, Deserialize)]
pub struct Added {
    pub sum: u64,
}

#[command(queue_group = "calculator", concurrency = 8, parallel = 2)]
async fn add(ctx: &Context, cmd: Add) -> Result<u64> {
    let sum = cmd.a + cmd.b;
    ctx.publish(Added { sum }).await?;
    Ok(sum)
}

#[command]
pub async fn reset(_: Reset) -> catga::Result<()> {
    Ok(())
}

#[event]
async fn log_sum(e: Added) -> Result<()> {
    let _ = e.sum;
    Ok(())
}

#[event(queue_group = "auditors")]
pub(crate) async fn audit(_ctx: &Context, Added { sum }: Added) -> Result<()> {
    let _ = sum;
    Ok(())
}

fn main() {
    let table = catga::handlers();
    let find = |name: &str| {
        table
            .iter()
            .find(|h| h.name().ends_with(name))
            .unwrap_or_else(|| panic!("{name} is not registered"))
    };
    let add = find("::add");
    assert_eq!(add.kind(), HandlerKind::Command);
    assert_eq!(add.subject(), "cmd.add");
    assert_eq!(add.queue_group(), Some("calculator"));
    assert_eq!(add.concurrency(), Some(8));
    assert_eq!(add.parallel(), Some(2));
    assert_eq!(add.message_type(), "Add");
    assert!(add.name().ends_with("::add"));

    let reset = find("::reset");
    assert_eq!(reset.queue_group(), Some("cmd.reset"), "commands default to their subject as group");
    assert_eq!(reset.declared_queue_group(), None);
    assert_eq!(reset.concurrency(), None);

    let log = find("::log_sum");
    assert_eq!(log.kind(), HandlerKind::Event);
    assert_eq!(log.queue_group(), None);
    assert_eq!(log.subject(), "numbers.added");

    assert_eq!(find("::audit").queue_group(), Some("auditors"));
    assert_eq!(table.len(), 4);
}
