//! Idempotent commands, durable and idempotent event handlers, retries,
//! leader-only event handlers, sagas.

use catga::{Command, Context, HandlerKind, Result, Saga, command, event, saga};
use serde::{Deserialize, Serialize};

#[command(reply = String, idempotent)]
#[derive(Serialize, Deserialize)]
pub struct Charge {
    pub cents: u64,
}

#[command]
#[derive(Serialize, Deserialize)]
pub struct Plain;

#[event]
#[derive(Serialize, Deserialize)]
pub struct Charged {
    pub cents: u64,
}

#[command(retry = 3)]
async fn charge(ctx: &Context, c: Charge) -> Result<String> {
    ctx.publish(Charged { cents: c.cents }).await?;
    Ok(ctx.message_id().to_owned())
}

#[command]
async fn plain(_: Plain) -> Result<()> {
    Ok(())
}

#[event(durable = "ledger", max_deliver = 7, idempotent)]
async fn ledger(e: Charged) -> Result<()> {
    let _ = e.cents;
    Ok(())
}

#[event(durable = "audit")]
async fn audit(e: Charged) -> Result<()> {
    let _ = e.cents;
    Ok(())
}

#[event(durable = "settle", leader)]
async fn settle(e: Charged) -> Result<()> {
    let _ = e.cents;
    Ok(())
}

#[saga(leader)]
async fn fulfil(saga: &Saga, e: Charged) -> Result<()> {
    saga.step("charge", Charge { cents: e.cents })
        .compensate(Charge { cents: 0 })
        .await?;
    Ok(())
}

#[saga(durable = "audit-trail", max_deliver = 9)]
async fn trail(saga: &Saga, e: Charged) -> Result<()> {
    let _ = (saga.id(), e.cents);
    Ok(())
}

fn main() {
    assert!(Charge::IDEMPOTENT);
    assert!(!Plain::IDEMPOTENT);
    let table = catga::handlers();
    let find = |name: &str| {
        table
            .iter()
            .find(|h| h.name().ends_with(name))
            .unwrap_or_else(|| panic!("{name} is not registered"))
    };
    let charge = find("::charge");
    assert!(charge.is_idempotent(), "from the command type");
    assert_eq!(charge.retries(), 3);
    assert!(!find("::plain").is_idempotent());
    let ledger = find("::ledger");
    assert_eq!(ledger.kind(), HandlerKind::Event);
    assert_eq!(ledger.durable(), Some("ledger"));
    assert_eq!(ledger.max_deliver(), Some(7));
    assert!(ledger.is_idempotent());
    let audit = find("::audit");
    assert_eq!(audit.durable(), Some("audit"));
    assert_eq!(audit.max_deliver(), None);
    assert!(!audit.is_idempotent());
    assert!(!audit.is_leader());
    assert!(find("::settle").is_leader());
    let fulfil = find("::fulfil");
    assert_eq!(fulfil.kind(), HandlerKind::Event);
    assert!(fulfil.is_leader());
    assert_eq!(fulfil.durable(), Some("fulfil"), "a saga's trigger is durable");
    let trail = find("::trail");
    assert!(!trail.is_leader());
    assert_eq!(trail.durable(), Some("audit-trail"));
    assert_eq!(trail.max_deliver(), Some(9));
}
