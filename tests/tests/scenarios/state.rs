//! Typed state with optimistic versions and the outbox: concurrent updates
//! from several replicas lose nothing, reads right after a reply agree, and
//! every event saved with the state is published once.

use std::collections::BTreeSet;
use std::time::Duration;

use catga::{Context, Error, ErrorKind, Result, State, Versioned, command, event};
use catga_tests::backend::shutdown_all;
use catga_tests::{Backend, Recorder, run_id};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};

use crate::WAIT;

#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
pub struct Counter {
    pub value: u64,
}

impl State for Counter {
    const KIND: &'static str = "counter";
}

/// Adds `by` to counter `key`.
#[command(reply = u64, subject = "tests.state.incr")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Incr {
    pub key: String,
    pub by: u64,
}

/// Reads counter `key`.
#[command(reply = u64, subject = "tests.state.peek")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Peek {
    pub key: String,
}

/// Loads a counter twice and saves both copies: the second must conflict.
#[command(reply = String, subject = "tests.state.race")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Race {
    pub key: String,
}

/// A counter moved.
#[event(subject = "tests.state.incremented")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Incremented {
    pub key: String,
    pub value: u64,
}

static SEEN: Recorder = Recorder::new();

#[command(retry = 100)]
async fn incr(ctx: &Context, c: Incr) -> Result<u64> {
    let mut counter = ctx
        .try_load::<Counter>(&c.key)
        .await?
        .unwrap_or_else(|| Versioned::new(c.key.clone(), Counter::default()));
    counter.value += c.by;
    let value = counter.value;
    ctx.save(counter)
        .with_event(Incremented { key: c.key, value })
        .await?;
    Ok(value)
}

#[command]
async fn peek(ctx: &Context, p: Peek) -> Result<u64> {
    Ok(ctx.load::<Counter>(&p.key).await?.value)
}

#[command]
async fn race(ctx: &Context, r: Race) -> Result<String> {
    let a = ctx.load::<Counter>(&r.key).await?;
    let b = a.clone();
    ctx.save(a).await?;
    match ctx.save(b).await {
        Ok(_) => Err(Error::msg("the stale save went through")),
        Err(e) => Ok(format!("{}|{}|{}", e.kind(), e.is_retryable(), e.message())),
    }
}

#[event(durable = "state-watch")]
async fn watch(ctx: &Context, e: Incremented) -> Result<()> {
    SEEN.record(&e.key, "incremented", ctx, e.value);
    Ok(())
}

catga_tests::on_both!(
    concurrent_updates_lose_nothing,
    a_stale_save_is_a_retryable_conflict
);

/// 60 increments of one counter, 20 at a time, over 3 replicas: every
/// conflict is retried, none is lost, each increment's event is published
/// once, and every replica reads the same value right after.
async fn concurrent_updates_lose_nothing(b: &Backend) {
    let replicas = {
        let mut out = Vec::new();
        for i in 1..=3 {
            let builder = b
                .builder(module_path!(), &format!("r{i}"))
                .retry_base(Duration::from_millis(2));
            out.push(b.started(builder).await);
        }
        out
    };
    let client = b.client().await.with_request_timeout(Duration::from_secs(20));
    let key = run_id();
    let n = 60u64;
    let mut replies = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(20) {
        replies.extend(
            join_all(chunk.iter().map(|_| {
                client.send(Incr {
                    key: key.clone(),
                    by: 1,
                })
            }))
            .await,
        );
    }
    let values: BTreeSet<u64> = replies
        .into_iter()
        .map(|r| r.expect("every increment succeeds"))
        .collect();
    assert_eq!(values, (1..=n).collect(), "each increment saw its own version");
    for _ in 0..3 {
        assert_eq!(
            client.send(Peek { key: key.clone() }).await.expect("peek"),
            n,
            "read right after agrees"
        );
    }
    let seen = SEEN.wait_for(&key, n as usize, WAIT).await;
    let published: BTreeSet<u64> = seen.iter().map(|r| r.seq).collect();
    assert_eq!(seen.len(), n as usize, "each event once");
    assert_eq!(published, (1..=n).collect());
    shutdown_all(replicas).await;
}

async fn a_stale_save_is_a_retryable_conflict(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let key = run_id();
    client
        .send(Incr {
            key: key.clone(),
            by: 5,
        })
        .await
        .expect("created");
    let report = client.send(Race { key: key.clone() }).await.expect("raced");
    let [kind, retryable, message] = report.splitn(3, '|').collect::<Vec<_>>()[..] else {
        panic!("{report}")
    };
    assert_eq!(kind, ErrorKind::Conflict.as_str());
    assert_eq!(retryable, "true");
    assert!(message.contains("changed since it was loaded"), "{message}");
    let err = client
        .send(Peek { key: run_id() })
        .await
        .expect_err("unknown key");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    rt.shutdown().await.expect("clean shutdown");
}
