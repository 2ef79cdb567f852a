//! Scenarios that run the same on NATS and on the embedded bus; the test
//! files `tests/nats.rs` and `tests/memory.rs` run each one on their backend
//! through [`scenario_tests!`](crate::scenario_tests).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use bytes::Bytes;
use catga::ErrorKind;
use futures_util::future::join_all;

use crate::backend::Backend;
use crate::handlers::{echo, fanout, faults, flood, groups, lb, slow};

const WAIT: Duration = Duration::from_secs(10);

fn run_id() -> String {
    catga::message::new_message_id()
}

async fn shutdown_all(replicas: Vec<catga::Runtime>) {
    for rt in replicas {
        rt.shutdown().await.expect("clean shutdown");
    }
}

/// A command goes to its handler and the reply comes back; ids propagate
/// from a handler's incoming message to what it sends.
pub async fn command_round_trip(b: &Backend) {
    let rt = b.runtime("echo", "r1").await;
    let client = b.client().await;
    let r = client
        .send(echo::Echo { text: "hi".into() })
        .await
        .expect("echo reply");
    assert_eq!(r.text, "hi");
    assert_eq!(r.instance, "r1");
    assert_eq!(
        r.correlation_id, r.message_id,
        "a root message correlates to itself"
    );
    assert!(!r.message_id.is_empty(), "the receiver made up an id");
    assert!(r.causation_id.is_none());

    let chosen = client
        .send_with_id(echo::Echo { text: "again".into() }, "order-42-attempt")
        .await
        .expect("echo reply");
    assert_eq!(
        chosen.message_id, "order-42-attempt",
        "the sender's id reaches the handler"
    );
    assert_eq!(chosen.correlation_id, "order-42-attempt");

    let relayed = client
        .send(echo::Relay { text: "x".into() })
        .await
        .expect("relay reply");
    assert_eq!(relayed.inner.text, "x");
    assert_eq!(
        relayed.inner.causation_id.as_deref(),
        Some(relayed.relay_message_id.as_str()),
        "the inner command is caused by the relay command"
    );
    assert_eq!(relayed.inner.correlation_id, relayed.relay_correlation_id);
    assert_ne!(relayed.inner.message_id, relayed.relay_message_id);
    rt.shutdown().await.expect("clean shutdown");
}

/// Commands spread over three replicas of one queue group, each handled
/// exactly once.
pub async fn queue_group_load_balancing(b: &Backend) {
    let replicas = b.replicas("lb", 3).await;
    let client = b.client().await;
    let run = run_id();
    let n = 90u64;
    let replies = join_all((0..n).map(|seq| {
        client.send(lb::Work {
            run: run.clone(),
            seq,
        })
    }))
    .await;
    let mut by_reply: BTreeMap<String, usize> = BTreeMap::new();
    for r in replies {
        *by_reply.entry(r.expect("work reply")).or_default() += 1;
    }
    let records = lb::HANDLED.wait_for(&run, n as usize, WAIT).await;
    assert_eq!(records.len(), n as usize, "each command handled exactly once");
    let seqs: BTreeSet<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (0..n).collect(), "no command lost or handled twice");
    let mut by_record: BTreeMap<String, usize> = BTreeMap::new();
    for r in &records {
        *by_record.entry(r.instance.clone()).or_default() += 1;
    }
    assert_eq!(by_record, by_reply, "replies name the replica that handled them");
    assert_eq!(by_record.len(), 3, "every replica got a share: {by_record:?}");
    shutdown_all(replicas).await;
}

/// Every replica receives every event of a plain `#[event]` handler.
pub async fn event_fan_out(b: &Backend) {
    let replicas = b.replicas("fanout", 3).await;
    let client = b.client().await;
    let run = run_id();
    for seq in 0..10 {
        client
            .publish(fanout::Tick {
                run: run.clone(),
                seq,
            })
            .await
            .expect("publish");
    }
    let records = fanout::RECEIVED.wait_for(&run, 30, WAIT).await;
    assert_eq!(records.len(), 30, "3 replicas x 10 events");
    let pairs: BTreeSet<(String, u64)> = records.iter().map(|r| (r.instance.clone(), r.seq)).collect();
    assert_eq!(pairs.len(), 30, "each replica got each event once");
    for seq in 0..10 {
        let ids: BTreeSet<&str> = records
            .iter()
            .filter(|r| r.seq == seq)
            .map(|r| r.message_id.as_str())
            .collect();
        assert_eq!(ids.len(), 1, "every replica sees one id for event {seq}: {ids:?}");
    }
    shutdown_all(replicas).await;
}

/// A queue-grouped event reaches one replica per group.
pub async fn queue_grouped_events(b: &Backend) {
    let replicas = b.replicas("groups", 3).await;
    let client = b.client().await;
    let run = run_id();
    let n = 20u64;
    for seq in 0..n {
        client
            .publish(groups::Job {
                run: run.clone(),
                seq,
            })
            .await
            .expect("publish");
    }
    let records = groups::RECEIVED.wait_for(&run, 2 * n as usize, WAIT).await;
    assert_eq!(records.len(), 2 * n as usize, "once per group, two groups");
    for group in ["billing", "shipping"] {
        let seqs: Vec<u64> = records.iter().filter(|r| r.tag == group).map(|r| r.seq).collect();
        let unique: BTreeSet<u64> = seqs.iter().copied().collect();
        assert_eq!(seqs.len(), n as usize, "{group}: each event once");
        assert_eq!(unique, (0..n).collect(), "{group}: every event");
    }
    let instances: BTreeSet<&str> = records.iter().map(|r| r.instance.as_str()).collect();
    assert!(instances.len() > 1, "groups spread over replicas: {instances:?}");
    shutdown_all(replicas).await;
}

/// Handler errors come back with their kind and message; a panic is
/// contained and answered with a 500-style error; the replica keeps serving.
pub async fn error_replies(b: &Backend) {
    let rt = b.runtime("faults", "r1").await;
    let client = b.client().await;
    let send = |mode: &str| client.send(faults::Fail { mode: mode.into() });
    assert_eq!(send("ok").await.expect("ok"), 7);
    for (mode, kind, code, text) in [
        ("not_found", ErrorKind::NotFound, 404, "no such thing"),
        ("invalid", ErrorKind::Invalid, 400, "mode is invalid"),
        ("conflict", ErrorKind::Conflict, 409, "already done"),
        ("error", ErrorKind::Handler, 500, "generic failure"),
        ("panic", ErrorKind::Panic, 500, "the handler blew up"),
    ] {
        let err = send(mode).await.expect_err(mode);
        assert_eq!(err.kind(), kind, "{mode}: {err}");
        assert_eq!(err.code(), code);
        assert!(err.message().contains(text), "{mode}: {err}");
        assert!(!err.is_retryable());
    }
    assert_eq!(send("ok").await.expect("still serving after a panic"), 7);
    rt.shutdown().await.expect("clean shutdown");
}

/// An undecodable payload gets a 400-style error naming the expected type;
/// the replica keeps serving.
pub async fn undecodable_payload(b: &Backend) {
    let rt = b.runtime("faults", "r1").await;
    let client = b.client().await;
    let err = client
        .send_raw("cmd.fail", Bytes::from_static(b"{not json"))
        .await
        .expect_err("garbage must be refused");
    assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
    assert_eq!(err.code(), 400);
    assert!(err.message().contains("`Fail`"), "names the type: {err}");
    let err = client
        .send_raw("cmd.fail", Bytes::from_static(br#"{"wrong":1}"#))
        .await
        .expect_err("wrong shape must be refused");
    assert_eq!(err.kind(), ErrorKind::Decode, "{err}");
    assert!(err.message().contains("mode"), "names the missing field: {err}");
    let ok = client
        .send_raw("cmd.fail", Bytes::from_static(br#"{"mode":"ok"}"#))
        .await
        .expect("raw JSON works");
    assert_eq!(&ok[..], b"7");
    rt.shutdown().await.expect("clean shutdown");
}

/// An event that cannot be decoded is refused (and logged) without taking
/// the handler down: the events after it are handled.
pub async fn undecodable_event_is_skipped(b: &Backend) {
    let rt = b.runtime("fanout", "r1").await;
    let client = b.client().await;
    let run = run_id();
    client
        .publish_raw("evt.tick", Bytes::from_static(b"{not json"))
        .await
        .expect("publish garbage");
    client
        .publish_raw("evt.tick", Bytes::from_static(br#"{"run":"x"}"#))
        .await
        .expect("publish a wrong shape");
    client
        .publish(fanout::Tick {
            run: run.clone(),
            seq: 1,
        })
        .await
        .expect("publish");
    let records = fanout::RECEIVED.wait_for(&run, 1, WAIT).await;
    assert_eq!(records.len(), 1, "the valid event after the bad ones is handled");
    rt.shutdown().await.expect("clean shutdown");
}

/// A command nobody handles fails at once with "no handler", not a time-out.
pub async fn no_handler_fails_fast(b: &Backend) {
    let client = b.client().await.with_request_timeout(Duration::from_secs(30));
    let started = std::time::Instant::now();
    let err = client
        .send(echo::Echo {
            text: "anyone?".into(),
        })
        .await
        .expect_err("nobody subscribes");
    assert_eq!(err.kind(), ErrorKind::NoHandler, "{err}");
    assert!(err.message().contains("no handler for subject cmd.echo"), "{err}");
    assert!(err.is_retryable());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "must not wait for the 30 s time-out"
    );
}

/// Shutdown stops taking work, finishes the handlers in flight and sends
/// their replies; afterwards the subject has no handler.
pub async fn graceful_shutdown(b: &Backend) {
    let rt = b.runtime("slow", "r1").await;
    let client = b.client().await;
    let run = run_id();
    let pending: Vec<_> = (0..2)
        .map(|seq| {
            let client = client.clone();
            let run = run.clone();
            tokio::spawn(async move { client.send(slow::Slow { run, seq, ms: 800 }).await })
        })
        .collect();
    let started = slow::STARTED.wait_for(&run, 2, WAIT).await;
    assert_eq!(started.len(), 2, "both in flight before shutdown");
    assert!(slow::FINISHED.of(&run).is_empty(), "none finished yet");
    rt.shutdown().await.expect("clean shutdown");
    assert_eq!(slow::FINISHED.of(&run).len(), 2, "shutdown waited for both");
    for (seq, p) in pending.into_iter().enumerate() {
        let reply = p.await.expect("task").expect("in-flight command answered");
        assert_eq!(reply, seq as u64);
    }
    let err = client
        .send(slow::Slow {
            run: run.clone(),
            seq: 99,
            ms: 0,
        })
        .await
        .expect_err("no handler after shutdown");
    assert_eq!(err.kind(), ErrorKind::NoHandler, "{err}");
}

/// A handler that outlives the drain deadline does not hold shutdown up:
/// shutdown returns an error in bounded time and the sender gets a
/// retryable error, not a hang.
pub async fn drain_deadline_is_enforced(b: &Backend) {
    let rt = b
        .builder("slow", "r1")
        .drain_timeout(Duration::from_millis(300))
        .start()
        .await
        .expect("starts");
    tokio::time::timeout(WAIT, rt.ready())
        .await
        .expect("ready in time")
        .expect("ready");
    let client = b.client().await.with_request_timeout(Duration::from_secs(2));
    let run = run_id();
    let pending = {
        let run = run.clone();
        tokio::spawn(async move {
            client
                .send(slow::Slow {
                    run,
                    seq: 0,
                    ms: 10_000,
                })
                .await
        })
    };
    assert_eq!(slow::STARTED.wait_for(&run, 1, WAIT).await.len(), 1, "in flight");
    let started = std::time::Instant::now();
    let err = rt
        .shutdown()
        .await
        .expect_err("the deadline passed with a handler running");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by the drain deadline"
    );
    let reply = pending
        .await
        .expect("task")
        .expect_err("the cancelled handler sends no reply");
    assert!(reply.is_retryable(), "{reply}");
    assert!(slow::FINISHED.of(&run).is_empty(), "the handler was cancelled");
}

/// `concurrency = 2` bounds the handlers in flight; the rest wait their turn.
pub async fn concurrency_limit(b: &Backend) {
    let rt = b.runtime("slow", "r1").await;
    let client = b.client().await;
    let run = run_id();
    let replies = join_all((0..6).map(|seq| {
        client.send(slow::Slow {
            run: run.clone(),
            seq,
            ms: 150,
        })
    }))
    .await;
    assert!(replies.iter().all(|r| r.is_ok()), "{replies:?}");
    assert_eq!(
        slow::MAX_IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "never more than the limit, and the limit is used"
    );
    rt.shutdown().await.expect("clean shutdown");
}

/// A subscription whose buffer is full drops further messages, and the drops
/// are counted (and logged), never silent.
pub async fn slow_consumer_drops_are_counted(b: &Backend) {
    let rt = b
        .builder("flood", "r1")
        .subscription_capacity(4)
        .start()
        .await
        .expect("starts");
    tokio::time::timeout(WAIT, rt.ready())
        .await
        .expect("ready in time")
        .expect("ready");
    let client = b.client().await;
    let run = run_id();
    let n = 100u64;
    for seq in 0..n {
        client
            .publish(flood::Flood {
                run: run.clone(),
                seq,
            })
            .await
            .expect("publish");
    }
    // Let the handler work through what was buffered.
    let mut handled = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = flood::HANDLED.of(&run).len();
        if now == handled && now > 0 {
            break;
        }
        handled = now;
    }
    let handled = flood::HANDLED.of(&run).len() as u64;
    let dropped = rt.dropped_messages();
    assert!(dropped > 0, "a 4-message buffer cannot take {n} at once");
    assert!(handled < n, "some were dropped: handled {handled}");
    match b {
        // The bus counts every dropped message: nothing is unaccounted for.
        Backend::Memory(_) => assert_eq!(handled + dropped, n, "handled {handled}, dropped {dropped}"),
        // NATS reports slow-consumer events, at least one per burst of drops.
        Backend::Nats(_) => assert!(handled + dropped <= n, "handled {handled}, events {dropped}"),
    }
    rt.shutdown().await.expect("clean shutdown");
}

/// Wiring mistakes stop start-up with a clear error.
pub async fn registry_checks(b: &Backend) {
    let err = b
        .builder("dup", "r1")
        .start()
        .await
        .expect_err("two handlers for one command");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.message().contains("catga_tests::handlers::dup::dup_first")
            && err.message().contains("catga_tests::handlers::dup::dup_second"),
        "names both handlers: {err}"
    );
    let err = b
        .builder("nothing_here", "r1")
        .start()
        .await
        .expect_err("no handlers");
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("no handlers registered"), "{err}");
    let client_only = b
        .builder("nothing_here", "r1")
        .client_only()
        .start()
        .await
        .expect("a pure client starts with no handlers");
    assert!(client_only.handlers().is_empty());
    client_only.shutdown().await.expect("clean shutdown");
}

/// Defines one `#[tokio::test]` per scenario on the given backend.
#[macro_export]
macro_rules! scenario_tests {
    ($backend:expr) => {
        $crate::scenario_tests!(@each $backend;
            command_round_trip,
            queue_group_load_balancing,
            event_fan_out,
            queue_grouped_events,
            error_replies,
            undecodable_payload,
            undecodable_event_is_skipped,
            no_handler_fails_fast,
            graceful_shutdown,
            drain_deadline_is_enforced,
            concurrency_limit,
            slow_consumer_drops_are_counted,
            registry_checks,
        );
    };
    (@each $backend:expr; $($name:ident,)+) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::scenarios::$name(&$backend).await;
            }
        )+
    };
}
