//! The order service under the fault simulator: three replicas take
//! orders while requests, replies, deliveries and acks are lost and
//! replicas are killed or stopped and started again. Once healed and
//! settled, every order ends as its customer left it (paid or
//! cancelled), each paid order is in the revenue ledger once, its
//! fulfilment saga reserved its stock and booked its courier once, and
//! its customer's invoicing saga invoiced it once.
//!
//! Seed 2 found that a replica's shutdown cut short (the simulator's
//! restart task stopped while a replica drained) left its leader and
//! partition leases renewed forever: no replica led again. A few seeds
//! run here; `CATGA_SIM_SEEDS=500 cargo test -p order-system
//! --test simulation` runs more, and a failing seed is named with the way
//! to run it alone (`CATGA_SIM_SEED=n`).

use std::collections::BTreeMap;

use catga::testing::{Faults, Simulation, explore};
use catga::{Error, ErrorKind, Result};
use order_system::fulfilment::{Fulfilment, GetFulfilment};
use order_system::invoicing::GetInvoices;
use order_system::orders::{
    CancelOrder, CreateOrder, GetOrder, GetRevenue, Line, OrderId, PayOrder, Revenue, Status,
};

const ORDERS: u64 = 24;

/// Creates order `n` for one of three customers, then pays it (every
/// fourth is cancelled instead); each message sent until answered under
/// its own id. The order's id, customer, total and whether it was paid.
async fn one_order(sim: &Simulation, run: &str, n: u64) -> Result<(OrderId, String, u64, bool)> {
    let customer = format!("{run}-customer-{}", n % 3);
    let lines = vec![Line {
        sku: "tea".into(),
        quantity: 1 + (n % 3) as u32,
        unit_cents: 450,
    }];
    let total = 450 * (1 + n % 3);
    let create = CreateOrder {
        customer: customer.clone(),
        lines,
    };
    let id = sim.send(create, &format!("{run}-create-{n}")).await?;
    let paid = !n.is_multiple_of(4);
    if paid {
        let pay = PayOrder {
            id: id.clone(),
            amount_cents: total,
        };
        sim.send(pay, &format!("{run}-pay-{n}")).await?;
    } else {
        let cancel = CancelOrder {
            id: id.clone(),
            reason: "changed their mind".into(),
        };
        sim.send(cancel, &format!("{run}-cancel-{n}")).await?;
    }
    Ok((id, customer, total, paid))
}

/// Each customer's invoices are exactly its paid orders in `invoiced`,
/// each once; `context` goes into the failure's message.
async fn each_invoiced_once(
    sim: &Simulation,
    run: &str,
    invoiced: BTreeMap<String, Vec<OrderId>>,
    context: &str,
) -> Result<()> {
    for (customer, mut want) in invoiced {
        let ask = GetInvoices {
            customer: customer.clone(),
        };
        let mut got = sim.send(ask, &format!("{run}-invoices-{customer}")).await?.orders;
        got.sort_by(|a, b| a.0.cmp(&b.0));
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            got, want,
            "{customer}'s invoices, each paid order once: {context}"
        );
    }
    Ok(())
}

/// The example's handlers but its timers (the expiry job and the payment
/// reminders: an order here is paid or cancelled at once).
fn orders(b: catga::RuntimeBuilder) -> catga::RuntimeBuilder {
    // Twenty deliveries before a dead letter, as the bank's handlers have:
    // under 5 % of every loss, restarts and stalls, the five of the
    // default can all be spent (a CI run's seed 0 dead-lettered a
    // `fulfil` trigger after six deliveries, as designed).
    b.durable_defaults(std::time::Duration::from_secs(1), 20)
        .service("orders-sim")
        .handlers(|h| !h.name().contains("expir") && !h.name().contains("remind"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_order_ends_as_left_each_step_once_under_seeded_faults() {
    // `SIM_LOG=1`: the replicas' logs (`RUST_LOG` filters), to see what a
    // failing seed did.
    if std::env::var_os("SIM_LOG").is_some() {
        catga::init_telemetry("orders-sim");
    }
    explore(0..4, |seed| async move {
        let faults = Faults {
            lose_requests: 0.05,
            lose_replies: 0.05,
            lose_copies: 0.05,
            lose_deliveries: 0.05,
            lose_acks: 0.05,
            restarts: 3,
            stalls: 2,
            failovers: 0,
        };
        // Settled within 30 s, not the kit's 10: two CI runs on a loaded
        // host (this test beside the process tests) found 1 and 2
        // messages still being handled at 10 s (seeds 3 and 0), which
        // passed alone, under a CPU hog and side by side in every local
        // run. A handler retrying (`retry = 10`, backing off) through the
        // simulator's lost replies holds its message meanwhile; a message
        // stuck for good still fails here.
        let mut sim = Simulation::start(seed, 3, faults, orders)
            .await?
            .settle_within(std::time::Duration::from_secs(30));
        let run = format!("s{seed}");
        let placed =
            futures_util::future::try_join_all((1..=ORDERS).map(|n| one_order(&sim, &run, n))).await?;
        sim.settled().await?;
        let report = sim.report();

        let mut revenue = Revenue::default();
        let mut invoiced: BTreeMap<String, Vec<OrderId>> = BTreeMap::new();
        for (id, customer, total, paid) in &placed {
            let view = sim
                .send(GetOrder { id: id.clone() }, &format!("{run}-get-{}", id.0))
                .await?;
            let fulfilment = sim
                .send(
                    GetFulfilment { id: id.clone() },
                    &format!("{run}-fulfilment-{}", id.0),
                )
                .await?;
            if *paid {
                assert_eq!(view.status, Status::Paid, "order {}: {report}", id.0);
                let once = Fulfilment {
                    reserved: 1,
                    released: 0,
                    booked: 1,
                };
                assert_eq!(fulfilment, once, "order {}'s fulfilment: {report}", id.0);
                revenue.payments += 1;
                revenue.cents += total;
                invoiced.entry(customer.clone()).or_default().push(id.clone());
            } else {
                assert_eq!(view.status, Status::Cancelled, "order {}: {report}", id.0);
                assert_eq!(fulfilment, Fulfilment::default(), "order {}: {report}", id.0);
            }
        }
        let ledger = sim.send(GetRevenue, &format!("{run}-revenue")).await?;
        assert_eq!(ledger, revenue, "the revenue ledger: {report}");
        each_invoiced_once(&sim, &run, invoiced, &report.to_string()).await?;
        let letters = sim.dead_letters().await?;
        if !letters.is_empty() {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("{} dead letters: {letters:?}", letters.len()),
            ));
        }
        eprintln!("{report}");
        sim.shutdown().await
    })
    .await
    .expect("every seed keeps the orders right");
}

/// The invoicing saga's partitions, per replica slot (an empty list for
/// a replica down).
async fn partitions(sim: &Simulation) -> Vec<Vec<u32>> {
    let replicas = sim.replicas().await;
    let mut out = Vec::new();
    for r in replicas.iter() {
        let mut mine = Vec::new();
        if let Some(r) = r {
            for (saga, parts) in r.partitions().await {
                if saga.ends_with("invoice") {
                    mine.extend(parts);
                }
            }
        }
        out.push(mine);
    }
    out
}

/// Waits until `test` holds of the partitions, for up to 10 s.
async fn until_partitions(sim: &Simulation, what: &str, test: impl Fn(&[Vec<u32>]) -> bool) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let now = partitions(sim).await;
        if test(&now) {
            return;
        }
        assert!(std::time::Instant::now() < until, "{what}: {now:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A replica stalls past its leases while orders are paid: the two
/// others take its invoicing partitions over and invoice the orders; when
/// it goes on, it gives them up again instead of invoicing twice, and
/// every order is invoiced and fulfilled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_replica_loses_its_partitions_and_nothing_is_done_twice() {
    let mut sim = Simulation::start(7, 3, Faults::none(), orders)
        .await
        .expect("start");
    until_partitions(&sim, "spread over the three", |p| p.iter().all(|m| !m.is_empty())).await;
    // Long enough that the takeover (about a second) and six orders fit
    // in it on a loaded host.
    let stall = sim.stall(0, std::time::Duration::from_secs(6));
    let during = async {
        // Past the membership time-out (600 ms): the others hold every
        // partition.
        until_partitions(&sim, "taken over by the two others", |p| {
            let mut held: Vec<u32> = p[1..].iter().flatten().copied().collect();
            held.sort_unstable();
            held == (0..16).collect::<Vec<_>>()
        })
        .await;
        let mut placed = Vec::new();
        for n in 1..=6 {
            placed.push(one_order(&sim, "stall", n).await.expect("order"));
        }
        placed
    };
    let ((), placed) = tokio::join!(stall, during);
    sim.settled().await.expect("settled");
    until_partitions(&sim, "spread over the three again", |p| {
        p.iter().all(|m| !m.is_empty())
    })
    .await;
    let mut invoiced: BTreeMap<String, Vec<OrderId>> = BTreeMap::new();
    for (id, customer, _, paid) in &placed {
        let fulfilment = sim
            .send(
                GetFulfilment { id: id.clone() },
                &format!("stall-fulfilment-{}", id.0),
            )
            .await
            .expect("fulfilment");
        if *paid {
            let once = Fulfilment {
                reserved: 1,
                released: 0,
                booked: 1,
            };
            assert_eq!(fulfilment, once, "order {}", id.0);
            invoiced.entry(customer.clone()).or_default().push(id.clone());
        }
    }
    each_invoiced_once(&sim, "stall", invoiced, "after the stall")
        .await
        .expect("invoices");
    assert_eq!(sim.report().stalls, 1);
    sim.shutdown().await.expect("shutdown");
}
