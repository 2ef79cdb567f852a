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

/// Adds one to counter `key` (idempotent: the saves commit with the
/// answer, so a stale one is found at the commit; in the key's store
/// shard).
#[command(reply = u64, subject = "tests.state.incr_once", idempotent, key = key)]
#[derive(Serialize, Deserialize, Debug)]
pub struct IncrOnce {
    pub key: String,
}

/// Always loses its race.
#[command(subject = "tests.state.lose")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Lose;

/// Saves a note with an event that only plain subscribers take (its
/// subject has no stream).
#[command(subject = "tests.state.note")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Note {
    pub key: String,
    pub seq: u64,
}

/// A note was saved.
#[event(subject = "tests.state.noted")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Noted {
    pub key: String,
    pub seq: u64,
}

/// Saves a note with an event of `size` bytes.
#[command(subject = "tests.state.big_note")]
#[derive(Serialize, Deserialize, Debug)]
pub struct BigNote {
    pub key: String,
    pub size: usize,
}

/// A big note was saved.
#[event(subject = "tests.state.big_noted")]
#[derive(Serialize, Deserialize, Debug)]
pub struct BigNoted {
    pub key: String,
    pub pad: String,
}

#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
pub struct Notes {
    pub last: u64,
}

impl State for Notes {
    const KIND: &'static str = "notes";
}

static SEEN: Recorder = Recorder::new();
static NOTED: Recorder = Recorder::new();
static PLAIN: Recorder = Recorder::new();

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

/// A plain subscriber next to the durable one: a JetStream publish reaches
/// it as a request, which it must not answer.
#[event]
async fn glance(ctx: &Context, e: Incremented) -> Result<()> {
    PLAIN.record(&e.key, "glanced", ctx, e.value);
    Ok(())
}

#[command(retry = 100)]
async fn incr_once(ctx: &Context, c: IncrOnce) -> Result<u64> {
    let mut counter = ctx
        .try_load::<Counter>(&c.key)
        .await?
        .unwrap_or_else(|| Versioned::new(c.key.clone(), Counter::default()));
    counter.value += 1;
    let value = counter.value;
    ctx.save(counter).await?;
    Ok(value)
}

#[command]
async fn lose(_: Lose) -> Result<()> {
    Err(Error::stale("lost the race"))
}

#[command]
async fn note(ctx: &Context, n: Note) -> Result<()> {
    let notes = ctx
        .try_load::<Notes>(&n.key)
        .await?
        .unwrap_or_else(|| Versioned::new(n.key.clone(), Notes::default()));
    let mut notes = notes;
    notes.last = n.seq;
    ctx.save(notes)
        .with_event(Noted {
            key: n.key,
            seq: n.seq,
        })
        .await?;
    Ok(())
}

#[command]
async fn big_note(ctx: &Context, n: BigNote) -> Result<()> {
    let notes = Versioned::new(n.key.clone(), Notes { last: 1 });
    ctx.save(notes)
        .with_event(BigNoted {
            key: n.key,
            pad: "x".repeat(n.size),
        })
        .await?;
    Ok(())
}

#[command]
async fn has_notes(ctx: &Context, p: HasNotes) -> Result<u64> {
    Ok(ctx.load::<Notes>(&p.key).await?.last)
}

/// Whether notes `key` exist.
#[command(reply = u64, subject = "tests.state.has_notes")]
#[derive(Serialize, Deserialize, Debug)]
pub struct HasNotes {
    pub key: String,
}

#[event]
async fn on_noted(ctx: &Context, e: Noted) -> Result<()> {
    NOTED.record(&e.key, "noted", ctx, e.seq);
    Ok(())
}

catga_tests::on_every_store!(
    concurrent_updates_lose_nothing,
    a_stale_save_is_a_retryable_stale_error,
    stale_commits_of_idempotent_handlers_are_retried,
    outbox_events_without_a_stream_reach_plain_subscribers_once,
    plain_event_subscribers_never_answer,
    an_event_the_broker_could_never_take_fails_the_save
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

async fn a_stale_save_is_a_retryable_stale_error(b: &Backend) {
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
    assert_eq!(kind, ErrorKind::Stale.as_str());
    assert_eq!(retryable, "true");
    assert!(message.contains("changed since it was loaded"), "{message}");
    let err = client
        .send(Peek { key: run_id() })
        .await
        .expect_err("unknown key");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    // Lost races are not failures of the handler: 30 in a row (the breaker
    // opens after 10 failures) still reach the sender as stale errors.
    for _ in 0..30 {
        let err = client.send(Lose).await.expect_err("stale");
        assert_eq!(err.kind(), ErrorKind::Stale, "{err}");
    }
    rt.shutdown().await.expect("clean shutdown");
}

/// 60 idempotent increments of one key, 20 at a time, over 3 replicas: the
/// saves commit with the answer, so a lost race shows at the commit as a
/// stale error; it is retried in the replica and none fails.
async fn stale_commits_of_idempotent_handlers_are_retried(b: &Backend) {
    let mut replicas = Vec::new();
    for i in 1..=3 {
        let builder = b
            .builder(module_path!(), &format!("r{i}"))
            .retry_base(Duration::from_millis(2));
        replicas.push(b.started(builder).await);
    }
    let client = b.client().await.with_request_timeout(Duration::from_secs(20));
    let key = run_id();
    let mut values = BTreeSet::new();
    for _ in 0..3 {
        let replies = join_all((0..20).map(|_| client.send(IncrOnce { key: key.clone() }))).await;
        for r in replies {
            values.insert(r.expect("every increment succeeds"));
        }
    }
    assert_eq!(
        values,
        (1..=60).collect(),
        "each increment once, at its own version"
    );
    shutdown_all(replicas).await;
}

/// Events saved with state go out through the outbox, always to a stream:
/// with none for their subject, the relay makes the subject's stream
/// before it publishes (a JetStream publish without a stream would reach
/// the plain subscribers and then wait for an acknowledgement nobody
/// sends). Plain subscribers get each event once.
async fn outbox_events_without_a_stream_reach_plain_subscribers_once(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let key = run_id();
    for seq in 1..=20 {
        client
            .send(Note {
                key: key.clone(),
                seq,
            })
            .await
            .expect("noted");
    }
    let seen = NOTED.wait_for(&key, 20, WAIT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen_later = NOTED.of(&key);
    assert_eq!(seen_later.len(), 20, "each event once: {:?}", seen_later);
    let seqs: BTreeSet<u64> = seen.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=20).collect());
    rt.shutdown().await.expect("clean shutdown");
}

/// Plain event subscribers never answer, even a message that came as a
/// request: a JetStream publish is one (its answer is the stream's
/// acknowledgement), and a subscriber answering first would spoil it. A
/// durable publish to a subject that also has a plain subscriber is
/// acknowledged by the stream, and both handlers get the event.
async fn plain_event_subscribers_never_answer(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await.with_request_timeout(Duration::from_secs(2));
    let key = run_id();
    let noted = serde_json::to_vec(&Noted {
        key: key.clone(),
        seq: 1,
    })
    .expect("encode");
    let asked = client
        .with_request_timeout(Duration::from_millis(500))
        .send_raw("tests.state.noted", noted.into())
        .await;
    assert_eq!(NOTED.wait_for(&key, 1, WAIT).await.len(), 1, "handled");
    // NATS: nobody answers, the request times out; the embedded bus sees
    // every receiver drop the request unanswered and says so at once.
    let err = asked.expect_err("an event handler does not answer");
    assert!(
        matches!(err.kind(), ErrorKind::Timeout | ErrorKind::Unavailable),
        "{err}"
    );
    for value in 1..=5 {
        client
            .publish_durable(Incremented {
                key: key.clone(),
                value,
            })
            .await
            .expect("stored and acknowledged");
    }
    assert_eq!(SEEN.wait_for(&key, 5, WAIT).await.len(), 5, "the durable handler");
    assert_eq!(PLAIN.wait_for(&key, 5, WAIT).await.len(), 5, "the plain one");
    rt.shutdown().await.expect("clean shutdown");
}

/// An event larger than the broker takes (with the ids the relay adds) is
/// refused when it is saved, with a 413 the handler sees and passes on,
/// and nothing is committed: not an event committed that could never be
/// published and would be retried forever.
async fn an_event_the_broker_could_never_take_fails_the_save(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let key = run_id();
    let err = client
        .send(BigNote {
            key: key.clone(),
            size: 1024 * 1024 - 300,
        })
        .await
        .expect_err("too large to publish");
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err}");
    assert!(err.message().contains("tests.state.big_noted"), "{err}");
    let missing = client
        .send(HasNotes { key: key.clone() })
        .await
        .expect_err("nothing saved");
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");
    client
        .send(BigNote {
            key: key.clone(),
            size: 1000,
        })
        .await
        .expect("a note that fits");
    assert_eq!(client.send(HasNotes { key }).await.expect("saved"), 1);
    rt.shutdown().await.expect("clean shutdown");
}
