//! Invoicing: a saga per paid order, keyed by customer. A customer's
//! invoices are numbered in the order the customer paid: the sagas of one
//! customer run one after another, on whichever replica owns the
//! customer's partition, while the customers are spread over every
//! replica. When a replica dies or joins, its partitions move; a saga cut
//! short resumes on the new owner, and its step (an idempotent command)
//! never issues an invoice twice.
//!
//! `GetInvoices` lists a customer's invoices.

use std::time::Duration;

use catga::{Context, Result, Saga, State, Versioned, command, saga};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::orders::{OrderId, OrderPaid};

/// A customer's invoices, numbered from 1 in the order they were issued.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Default, Clone, PartialEq, Eq)]
pub struct Invoices {
    /// The order of each invoice: invoice n is `orders[n - 1]`.
    pub orders: Vec<OrderId>,
}

impl State for Invoices {
    const KIND: &'static str = "invoices";
}

/// Issues the next invoice of a customer for an order. Keyed by the
/// customer: with store shards it commits in the customer's shard.
#[command(reply = u64, idempotent, key = customer)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct IssueInvoice {
    /// The customer.
    pub customer: String,
    /// The order paid.
    pub id: OrderId,
}

/// A customer's invoices.
#[command(subject = "orders.invoices", reply = Invoices)]
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone)]
pub struct GetInvoices {
    /// The customer.
    pub customer: String,
}

// The ledger is remote: issuing takes a moment.
const REMOTE_CALL: Duration = Duration::from_millis(10);

#[command(queue_group = "invoicing", retry = 10)]
async fn issue_invoice(ctx: &Context, cmd: IssueInvoice) -> Result<u64> {
    tokio::time::sleep(REMOTE_CALL).await;
    let mut invoices = ctx
        .try_load::<Invoices>(&cmd.customer)
        .await?
        .unwrap_or_else(|| Versioned::new(cmd.customer.clone(), Invoices::default()));
    invoices.orders.push(cmd.id);
    let number = invoices.orders.len() as u64;
    ctx.save(invoices).await?;
    Ok(number)
}

#[command(queue_group = "order-queries")]
async fn get_invoices(ctx: &Context, q: GetInvoices) -> Result<Invoices> {
    Ok(ctx
        .try_load::<Invoices>(&q.customer)
        .await?
        .map(Versioned::into_inner)
        .unwrap_or_default())
}

/// The invoicing saga: keyed by customer, 16 partitions over the
/// replicas, at most 4 sagas at once per replica.
#[saga(key = customer, partitions = 16, concurrency = 4)]
async fn invoice(saga: &Saga, paid: OrderPaid) -> Result<()> {
    let number = saga
        .step(
            "invoice",
            IssueInvoice {
                customer: paid.customer.clone(),
                id: paid.id.clone(),
            },
        )
        .await?;
    tracing::info!(order = %paid.id.0, customer = %paid.customer, number, "order invoiced");
    Ok(())
}
