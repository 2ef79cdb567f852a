//! Delayed messages (`publish_after`, `publish_at`): each is published
//! once, not before its time and soon after it, to its durable handler;
//! one sent from an idempotent handler is committed with its answer; a
//! cancelled one is never published; they wait in the store, so they are
//! published by another replica when the one that sent them is gone.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use catga::{Context, Result, command, event};
use catga_tests::{Backend, run_id};
use serde::{Deserialize, Serialize};

/// How late past its time a delayed message may arrive in these tests:
/// the relay looks every 250 ms; the rest is a loaded host's slack.
const LATE: Duration = Duration::from_secs(3);

/// A reminder, due at `due_ms`.
#[event(subject = "tests.delayed.reminder")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Reminder {
    pub run: String,
    pub n: u64,
    pub due_ms: u64,
}

/// Schedules a reminder from an idempotent handler.
#[command(reply = String, subject = "tests.delayed.schedule", idempotent)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Schedule {
    pub run: String,
    pub n: u64,
    pub after_ms: u64,
}

/// Two handlers of one event each schedule a reminder.
#[event(subject = "tests.delayed.placed")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Placed {
    pub run: String,
}

/// Per run and reminder: when each delivery arrived (unix ms).
static ARRIVED: Mutex<BTreeMap<(String, u64), Vec<u64>>> = Mutex::new(BTreeMap::new());

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[event(durable = "reminders", idempotent)]
async fn on_reminder(r: Reminder) -> Result<()> {
    ARRIVED
        .lock()
        .expect("lock")
        .entry((r.run, r.n))
        .or_default()
        .push(now_ms());
    Ok(())
}

#[command]
async fn schedule(ctx: &Context, s: Schedule) -> Result<String> {
    let due_ms = now_ms() + s.after_ms;
    ctx.publish_after(
        Duration::from_millis(s.after_ms),
        Reminder {
            run: s.run,
            n: s.n,
            due_ms,
        },
    )
    .await
}

async fn remind_in(ctx: &Context, run: String, n: u64) -> Result<()> {
    let due_ms = now_ms() + 300;
    ctx.publish_after(Duration::from_millis(300), Reminder { run, n, due_ms })
        .await
        .map(|_| ())
}

#[event(durable = "placed-a", idempotent)]
async fn placed_a(ctx: &Context, p: Placed) -> Result<()> {
    remind_in(ctx, p.run, 10).await
}

#[event(durable = "placed-b", idempotent)]
async fn placed_b(ctx: &Context, p: Placed) -> Result<()> {
    remind_in(ctx, p.run, 11).await
}

catga_tests::on_every_store!(
    two_handlers_of_one_event_schedule_two_messages,
    delayed_messages_arrive_once_not_before_their_time,
    a_cancelled_delayed_message_is_never_published,
    delayed_messages_outlive_the_replica_that_sent_them,
    a_client_beside_the_replicas_sends_and_cancels_delayed_messages
);

fn arrivals(run: &str) -> BTreeMap<u64, Vec<u64>> {
    ARRIVED
        .lock()
        .expect("lock")
        .iter()
        .filter(|((r, _), _)| r == run)
        .map(|((_, n), at)| (*n, at.clone()))
        .collect()
}

/// Waits until `n` reminders of `run` arrived, then a moment more so
/// that a second delivery would show.
async fn until_arrived(run: &str, n: usize, timeout: Duration) -> BTreeMap<u64, Vec<u64>> {
    let start = std::time::Instant::now();
    while arrivals(run).len() < n && start.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    arrivals(run)
}

fn reminder(run: &str, n: u64, after: Duration) -> Reminder {
    Reminder {
        run: run.to_owned(),
        n,
        due_ms: now_ms() + after.as_millis() as u64,
    }
}

/// Reminders from outside a handler (`Runtime::publish_after` and
/// `publish_at`) and from an idempotent command handler (sent twice
/// under one id: one reminder): each arrives once, at or after its due
/// time and within `LATE` of it.
async fn delayed_messages_arrive_once_not_before_their_time(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let run = run_id();
    let mut due = BTreeMap::new();
    for (n, ms) in [(1u64, 300u64), (2, 800), (3, 1500)] {
        let r = reminder(&run, n, Duration::from_millis(ms));
        due.insert(n, r.due_ms);
        rt.publish_after(Duration::from_millis(ms), r)
            .await
            .expect("publish_after");
    }
    let r = reminder(&run, 4, Duration::from_millis(1000));
    due.insert(4, r.due_ms);
    rt.publish_at(SystemTime::now() + Duration::from_millis(1000), r)
        .await
        .expect("publish_at");
    let s = Schedule {
        run: run.clone(),
        n: 5,
        after_ms: 700,
    };
    let before = now_ms();
    let id = client
        .send_with_id(s.clone(), &format!("{run}-s5"))
        .await
        .expect("schedule");
    let again = client
        .send_with_id(s, &format!("{run}-s5"))
        .await
        .expect("schedule again");
    assert_eq!(id, again, "the retry is answered from the inbox");
    due.insert(5, before + 700);
    let pending = rt.delayed(100).await.expect("listing");
    assert!(
        pending.iter().any(|d| d.id == id),
        "listed while waiting: {pending:?}"
    );
    let seen = until_arrived(&run, 5, Duration::from_secs(15)).await;
    assert_eq!(seen.len(), 5, "{seen:?}");
    for (n, at) in &seen {
        assert_eq!(at.len(), 1, "reminder {n} arrived {} times", at.len());
        let due = due[n];
        assert!(at[0] >= due, "reminder {n} arrived {} ms early", due - at[0]);
        assert!(
            at[0] - due <= LATE.as_millis() as u64,
            "reminder {n} arrived {} ms late",
            at[0] - due
        );
    }
    let left = rt.delayed(100).await.expect("listing");
    assert!(
        left.iter().all(|d| d.id != id),
        "published, no longer listed: {left:?}"
    );
    rt.shutdown().await.expect("clean shutdown");
}

/// A cancelled reminder is never published; cancelling it again, or one
/// already published, says so.
async fn a_cancelled_delayed_message_is_never_published(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let run = run_id();
    let keep = rt
        .publish_after(
            Duration::from_millis(600),
            reminder(&run, 1, Duration::from_millis(600)),
        )
        .await
        .expect("publish");
    let drop = rt
        .publish_after(
            Duration::from_millis(600),
            reminder(&run, 2, Duration::from_millis(600)),
        )
        .await
        .expect("publish");
    let listed: Vec<String> = rt
        .delayed(100)
        .await
        .expect("listing")
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert!(listed.contains(&keep) && listed.contains(&drop), "{listed:?}");
    assert!(
        rt.cancel_delayed(&drop).await.expect("cancel"),
        "cancelled while waiting"
    );
    assert!(!rt.cancel_delayed(&drop).await.expect("cancel again"), "gone");
    let seen = until_arrived(&run, 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let seen_later = arrivals(&run);
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![1], "{seen:?}");
    assert_eq!(
        seen_later.len(),
        1,
        "the cancelled one never came: {seen_later:?}"
    );
    assert!(
        !rt.cancel_delayed(&keep).await.expect("cancel"),
        "published already"
    );
    rt.shutdown().await.expect("clean shutdown");
}

/// A reminder sent by a replica that then shuts down is published by the
/// next replica (it waits in the store, not in the sender's memory).
async fn delayed_messages_outlive_the_replica_that_sent_them(b: &Backend) {
    let run = run_id();
    let first = b.runtime(module_path!(), "r1").await;
    let r = reminder(&run, 1, Duration::from_millis(1500));
    let due = r.due_ms;
    first
        .publish_after(Duration::from_millis(1500), r)
        .await
        .expect("publish");
    first.shutdown().await.expect("clean shutdown");
    assert!(arrivals(&run).is_empty(), "not before its time");
    let second = b.runtime(module_path!(), "r2").await;
    let seen = until_arrived(&run, 1, Duration::from_secs(15)).await;
    assert_eq!(seen.get(&1).map(Vec::len), Some(1), "{seen:?}");
    assert!(seen[&1][0] >= due, "not before its time");
    second.shutdown().await.expect("clean shutdown");
}

/// Two idempotent handlers of one event each schedule a delayed message
/// as their first send: both arrive (their ids name the handler).
async fn two_handlers_of_one_event_schedule_two_messages(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let run = run_id();
    client
        .publish_durable(Placed { run: run.clone() })
        .await
        .expect("published");
    let seen = until_arrived(&run, 2, Duration::from_secs(15)).await;
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![10, 11], "{seen:?}");
    assert!(seen.values().all(|at| at.len() == 1), "{seen:?}");
    rt.shutdown().await.expect("clean shutdown");
}

/// A client that hosts no handlers, configured as the replicas are
/// (`Client::connect_with`, or the embedded bus's): its delayed messages
/// wait in the service's store and are published once by a replica, not
/// before their time; it cancels one. A client from a NATS URL alone has
/// no store: a configuration error, nothing sent.
async fn a_client_beside_the_replicas_sends_and_cancels_delayed_messages(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.store_client().await;
    let run = run_id();
    let first = reminder(&run, 1, Duration::from_millis(600));
    let due = first.due_ms;
    client
        .publish_after(Duration::from_millis(600), first)
        .await
        .expect("publish");
    let at = SystemTime::now() + Duration::from_millis(600);
    let second = client
        .publish_at(at, reminder(&run, 2, Duration::from_millis(600)))
        .await
        .expect("publish");
    assert!(client.cancel_delayed(&second).await.expect("cancel"), "waiting");
    let seen = until_arrived(&run, 1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let seen_later = arrivals(&run);
    assert_eq!(seen.get(&1).map(Vec::len), Some(1), "once: {seen:?}");
    assert!(seen[&1][0] >= due, "not before its time: {seen:?}");
    assert!(seen[&1][0] < due + LATE.as_millis() as u64, "{seen:?}");
    assert_eq!(
        seen_later.len(),
        1,
        "the cancelled one never came: {seen_later:?}"
    );
    if b.nats_url().is_some() {
        let bare = b.client().await;
        let e = bare
            .publish_after(Duration::from_millis(1), reminder(&run, 3, Duration::ZERO))
            .await
            .expect_err("no store");
        assert_eq!(e.kind(), catga::ErrorKind::Config, "{e}");
        assert!(e.message().contains("REDIS_URL"), "{e}");
    }
    rt.shutdown().await.expect("clean shutdown");
}
