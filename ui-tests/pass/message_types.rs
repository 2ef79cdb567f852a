//! Every form of message type declaration.

use catga::{Command, Event, Message, MessageKind, command, event};
use serde::{Deserialize, Serialize};

#[command]
#[derive(Serialize, Deserialize)]
pub struct CreateOrder {
    pub customer: String,
}

#[derive(Serialize, Deserialize)]
pub struct OrderId(pub String);

#[command(subject = "orders.pay", reply = OrderId, version = 3)]
#[derive(Serialize, Deserialize)]
pub struct PayOrder;

#[command(reply = Vec<(String, u64)>)]
#[derive(Serialize, Deserialize)]
pub enum Query {
    All,
    ByCustomer(String),
}

#[event]
#[derive(Serialize, Deserialize)]
pub struct OrderCreated {
    pub id: u64,
}

#[event(subject = "orders.v2.paid", version = 2)]
#[derive(Serialize, Deserialize)]
pub enum PaymentOutcome {
    Paid { cents: u64 },
    Declined,
}

mod v1 {
    /// What release 1 published.
    #[derive(serde::Deserialize)]
    pub struct Refund {
        pub euros: u64,
    }
}

/// Release 2 reads release 1's refunds (a path to the old type).
#[event(subject = "orders.refunded", version = 2, upcast_from = v1::Refund)]
#[derive(Serialize, Deserialize, Debug, PartialEq)]
pub struct Refund {
    pub cents: u64,
}

impl From<v1::Refund> for Refund {
    fn from(r: v1::Refund) -> Refund {
        Refund { cents: r.euros * 100 }
    }
}

/// Its handler's writes commit in the store shard of `account`.
#[command(key = account, idempotent)]
#[derive(Serialize, Deserialize)]
pub struct Deposit {
    pub account: String,
    pub cents: u64,
}

/// Events may name a key too; any `Display` field will do.
#[event(key = order)]
#[derive(Serialize, Deserialize)]
pub struct Shipped {
    pub order: u64,
}

fn reply_of<C: Command>() -> &'static str {
    std::any::type_name::<C::Reply>()
}

fn main() {
    assert_eq!(CreateOrder::SUBJECT, "cmd.create_order");
    assert_eq!(CreateOrder::NAME, "CreateOrder");
    assert_eq!(CreateOrder::VERSION, 1);
    assert_eq!(CreateOrder::KIND, MessageKind::Command);
    assert_eq!(reply_of::<CreateOrder>(), "()");

    assert_eq!(PayOrder::SUBJECT, "orders.pay");
    assert_eq!(PayOrder::VERSION, 3);
    assert!(reply_of::<PayOrder>().ends_with("OrderId"));
    assert_eq!(Query::SUBJECT, "cmd.query");

    assert_eq!(OrderCreated::SUBJECT, "evt.order_created");
    assert_eq!(OrderCreated::KIND, MessageKind::Event);
    assert_eq!(PaymentOutcome::SUBJECT, "orders.v2.paid");
    assert_eq!(PaymentOutcome::VERSION, 2);

    fn is_event<E: Event>() {}
    is_event::<OrderCreated>();

    assert_eq!(Refund::VERSION, 2);
    let upcast = <Refund as Message>::__catga_upcast(1, br#"{"euros":3}"#).map(|r| r.ok());
    assert_eq!(upcast, Some(Some(Refund { cents: 300 })));
    assert!(<Refund as Message>::__catga_upcast(2, b"{}").is_none(), "version 2 is read as it is");
    assert!(<OrderCreated as Message>::__catga_upcast(1, b"{}").is_none(), "no upcast declared");

    let d = Deposit {
        account: "acct-7".into(),
        cents: 5,
    };
    assert!(<Deposit as Message>::__CATGA_KEYED);
    assert_eq!(d.__catga_key().as_deref(), Some("acct-7"));
    assert_eq!(Shipped { order: 42 }.__catga_key().as_deref(), Some("42"));
    assert!(!<OrderCreated as Message>::__CATGA_KEYED);
    assert_eq!(OrderCreated { id: 1 }.__catga_key(), None);
}
