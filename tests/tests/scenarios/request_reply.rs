//! Request/reply: ids and their propagation, no responders.

use std::time::Duration;

use catga::{Context, ErrorKind, Result, command};
use catga_tests::{Backend, Tally, run_id};
use serde::{Deserialize, Serialize};

/// Echoes its text back with what the handler saw.
#[command(reply = Echoed)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Echo {
    pub text: String,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Echoed {
    pub text: String,
    pub instance: String,
    pub message_id: String,
    pub correlation_id: String,
    pub causation_id: Option<String>,
    /// Milliseconds the handler's sender still waits, if it said.
    pub deadline_left_ms: Option<u64>,
}

/// Sends an [`Echo`] from inside its handler.
#[command(subject = "tests.relay", reply = Relayed)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Relay {
    pub text: String,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct Relayed {
    pub inner: Echoed,
    pub relay_message_id: String,
    pub relay_correlation_id: String,
}

#[command(queue_group = "echo")]
async fn echo(ctx: &Context, cmd: Echo) -> Result<Echoed> {
    Ok(Echoed {
        text: cmd.text,
        instance: ctx.instance_id().to_owned(),
        message_id: ctx.message_id().to_owned(),
        correlation_id: ctx.correlation_id().to_owned(),
        causation_id: ctx.causation_id().map(str::to_owned),
        deadline_left_ms: ctx
            .deadline()
            .and_then(|d| d.remaining())
            .map(|d| d.as_millis() as u64),
    })
}

/// Nobody handles it.
#[command(subject = "tests.request_reply.nobody")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Nobody;

/// Relays to [`Nobody`].
#[command(subject = "tests.request_reply.relay_to_nobody")]
#[derive(Serialize, Deserialize, Debug)]
pub struct RelayToNobody;

#[command]
async fn relay_to_nobody(ctx: &Context, _: RelayToNobody) -> Result<()> {
    ctx.send(Nobody).await
}

/// Counted once per message id.
#[command(subject = "tests.request_reply.count_once", reply = u64, idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct CountOnce {
    pub run: String,
}

/// Sends a [`CountOnce`] under an id made from its run.
#[command(subject = "tests.request_reply.count_by_run", reply = u64)]
#[derive(Serialize, Deserialize, Debug)]
pub struct CountByRun {
    pub run: String,
}

static COUNTED: Tally = Tally::new();

#[command]
async fn count_once(c: CountOnce) -> Result<u64> {
    COUNTED.add(&c.run);
    Ok(COUNTED.get(&c.run))
}

#[command]
async fn count_by_run(ctx: &Context, c: CountByRun) -> Result<u64> {
    let id = format!("count-{}", c.run);
    ctx.send_with_id(CountOnce { run: c.run }, &id).await
}

#[command]
async fn relay(ctx: &Context, cmd: Relay) -> Result<Relayed> {
    let inner = ctx.send(Echo { text: cmd.text }).await?;
    Ok(Relayed {
        inner,
        relay_message_id: ctx.message_id().to_owned(),
        relay_correlation_id: ctx.correlation_id().to_owned(),
    })
}

catga_tests::on_both!(
    command_round_trip,
    no_handler_fails_fast,
    nested_sends_inherit_the_deadline,
    a_downstream_failure_is_the_handlers_own,
    a_command_sent_under_a_chosen_id_runs_once
);

/// `Context::send_with_id`: three messages that send one command under one
/// chosen id have it run once; an id past the length limit is cut the
/// same way each time; one that cannot be an id is refused.
async fn a_command_sent_under_a_chosen_id_runs_once(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let short = run_id();
    let long = format!("{short}-{}", "x".repeat(catga::MAX_ID_LEN));
    for run in [&short, &long] {
        for _ in 0..3 {
            let counted = client
                .send(CountByRun { run: run.clone() })
                .await
                .expect("counted");
            assert_eq!(counted, 1, "answered by the first run's inbox entry");
        }
        assert_eq!(COUNTED.get(run), 1, "{run}: ran once");
    }
    let err = client
        .send(CountByRun {
            run: format!("{short} with spaces"),
        })
        .await
        .expect_err("not an id");
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    rt.shutdown().await.expect("clean shutdown");
}

/// A command goes to its handler and the reply comes back; ids propagate
/// from a handler's incoming message to what it sends.
async fn command_round_trip(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let r = client.send(Echo { text: "hi".into() }).await.expect("echo reply");
    assert_eq!(r.text, "hi");
    assert_eq!(r.instance, "r1");
    assert_eq!(
        r.correlation_id, r.message_id,
        "a root message correlates to itself"
    );
    assert!(!r.message_id.is_empty(), "the receiver made up an id");
    assert!(r.causation_id.is_none());

    let chosen = client
        .send_with_id(Echo { text: "again".into() }, "order-42-attempt")
        .await
        .expect("echo reply");
    assert_eq!(
        chosen.message_id, "order-42-attempt",
        "the sender's id reaches the handler"
    );
    assert_eq!(chosen.correlation_id, "order-42-attempt");

    let relayed = client
        .send(Relay { text: "x".into() })
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

/// A command nobody handles fails at once with "no handler", not a time-out.
async fn no_handler_fails_fast(b: &Backend) {
    let client = b.client().await.with_request_timeout(Duration::from_secs(30));
    let started = std::time::Instant::now();
    let err = client
        .send(Echo {
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

/// A handler's nested send gets what is left of its caller's deadline, not
/// a fresh default time-out.
async fn nested_sends_inherit_the_deadline(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await.with_request_timeout(Duration::from_millis(1500));
    let relayed = client
        .send(Relay { text: "t".into() })
        .await
        .expect("relay reply");
    let left = relayed
        .inner
        .deadline_left_ms
        .expect("the nested send carries a deadline");
    assert!(
        left <= 1500,
        "no more than the caller's 1.5 s, not the 5 s default: {left} ms"
    );
    assert!(left > 500, "most of it is left: {left} ms");
    rt.shutdown().await.expect("clean shutdown");
}

/// A handler that passes on the failure of its nested send fails itself:
/// its caller gets a handler failure (500, not retryable: the handler ran),
/// not the downstream "no handler" (503, retryable).
async fn a_downstream_failure_is_the_handlers_own(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let err = client.send(RelayToNobody).await.expect_err("the relay fails");
    assert_eq!(err.kind(), ErrorKind::Handler, "{err}");
    assert_eq!(err.code(), 500);
    assert!(!err.is_retryable(), "{err}");
    assert!(
        err.message().contains("error id"),
        "the cause is in the replica's log: {err}"
    );
    rt.shutdown().await.expect("clean shutdown");
}
