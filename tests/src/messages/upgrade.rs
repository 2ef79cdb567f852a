//! `upgrade_replica`: payments in version 1 and 2 (an amount with its
//! currency; version 1 reads as euros), and the count of an order's
//! payments.

use catga::command;
use serde::{Deserialize, Serialize};

/// Reads an order's count: (payments counted, cents), if any.
#[command(reply = Option<(u32, u64)>, subject = "upgrade.ledger")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReadLedger {
    /// Which.
    pub order: String,
}

/// Version 1 of the messages, as release N has them.
pub mod v1 {
    use catga::{command, event};
    use serde::{Deserialize, Serialize};

    /// Pays an order, in cents.
    #[command(subject = "upgrade.pay", reply = u64, idempotent)]
    #[derive(Serialize, Deserialize, Debug, Clone)]
    pub struct Pay {
        /// Which.
        pub order: String,
        /// How much.
        pub cents: u64,
    }

    /// An order was paid.
    #[event(subject = "upgrade.paid")]
    #[derive(Serialize, Deserialize, Debug, Clone)]
    pub struct Paid {
        /// Which.
        pub order: String,
        /// How much.
        pub cents: u64,
    }
}

/// Version 2: an amount with its currency; version 1 reads as euros.
pub mod v2 {
    use catga::{command, event};
    use serde::{Deserialize, Serialize};

    /// An amount.
    #[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
    pub struct Money {
        /// Cents of `currency`.
        pub cents: u64,
        /// ISO 4217.
        pub currency: String,
    }

    impl Money {
        /// `cents` euro cents.
        pub fn euros(cents: u64) -> Money {
            Money {
                cents,
                currency: "EUR".to_owned(),
            }
        }
    }

    /// Pays an order.
    #[command(subject = "upgrade.pay", reply = u64, idempotent, version = 2, upcast_from = super::v1::Pay)]
    #[derive(Serialize, Deserialize, Debug, Clone)]
    pub struct Pay {
        /// Which.
        pub order: String,
        /// How much.
        pub amount: Money,
    }

    impl From<super::v1::Pay> for Pay {
        fn from(p: super::v1::Pay) -> Pay {
            Pay {
                order: p.order,
                amount: Money::euros(p.cents),
            }
        }
    }

    /// An order was paid.
    #[event(subject = "upgrade.paid", version = 2, upcast_from = super::v1::Paid)]
    #[derive(Serialize, Deserialize, Debug, Clone)]
    pub struct Paid {
        /// Which.
        pub order: String,
        /// How much.
        pub amount: Money,
    }

    impl From<super::v1::Paid> for Paid {
        fn from(p: super::v1::Paid) -> Paid {
            Paid {
                order: p.order,
                amount: Money::euros(p.cents),
            }
        }
    }
}
