//! Durable events: at-least-once through a durable consumer, redelivery of
//! retryable failures, dead letters for poison and exhausted messages
//! (the messages behind them keep flowing), replay and purge, and a circuit
//! breaker that stops pulling while its handler fails.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use catga::{Context, Error, ErrorKind, Result, command, event};
use catga_tests::{Backend, Recorder, Tally, run_id};
use serde::{Deserialize, Serialize};

use crate::WAIT;

/// A job whose handler behaves as `mode` says.
#[event(subject = "tests.durable.job")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Job {
    pub run: String,
    pub seq: u64,
    /// `ok`, `fail_once`, `poison`, `retry_forever` or `until_fixed`.
    pub mode: String,
}

/// Handled while its run is not broken.
#[event(subject = "tests.durable.fragile")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Fragile {
    pub run: String,
    pub seq: u64,
}

/// A command whose handler fails while its run is broken.
#[command(subject = "tests.durable.flaky")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Flaky {
    pub run: String,
}

/// Handled by sending [`Unsteady`] (or, with `refuse`, [`Refused`]).
#[event(subject = "tests.durable.forward")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Forward {
    pub run: String,
    pub seq: u64,
    pub refuse: bool,
}

/// Handled by sending [`Flaky`] (not idempotent), then [`Unsteady`].
#[event(subject = "tests.durable.forward_both")]
#[derive(Serialize, Deserialize, Debug)]
pub struct ForwardBoth {
    pub run: String,
}

/// An idempotent command whose handler fails while its run is broken.
#[command(subject = "tests.durable.unsteady", idempotent)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Unsteady {
    pub run: String,
}

/// A command its handler always refuses.
#[command(subject = "tests.durable.refused")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Refused;

static HANDLED: Recorder = Recorder::new();
static ATTEMPTS: Tally = Tally::new();
static BROKEN: Mutex<BTreeMap<String, bool>> = Mutex::new(BTreeMap::new());

fn broken(run: &str) -> bool {
    BROKEN.lock().expect("lock").get(run).copied().unwrap_or(false)
}

fn set_broken(run: &str, b: bool) {
    BROKEN.lock().expect("lock").insert(run.to_owned(), b);
}

#[event(durable = "jobs", max_deliver = 3)]
async fn on_job(ctx: &Context, j: Job) -> Result<()> {
    ATTEMPTS.add(&format!("{}:{}", j.run, j.seq));
    let delivery = ctx.meta().delivery();
    match j.mode.as_str() {
        "fail_once" if delivery == 1 => return Err(Error::unavailable("not yet")),
        "poison" => return Err(Error::invalid("this job can never be done")),
        "retry_forever" => return Err(Error::unavailable("still down")),
        // Never answers: as a replica that crashes on this message.
        "hang" => std::future::pending::<()>().await,
        "crash" => return Err(Error::msg("a secret connection string in a crash")),
        "until_fixed" if broken(&j.run) => return Err(Error::unavailable("still down")),
        _ => {}
    }
    HANDLED.record(&j.run, "job", ctx, j.seq);
    Ok(())
}

#[event(durable = "fragile", max_deliver = 100)]
async fn on_fragile(ctx: &Context, f: Fragile) -> Result<()> {
    ATTEMPTS.add(&f.run);
    if broken(&f.run) {
        return Err(Error::unavailable("the database is down"));
    }
    HANDLED.record(&f.run, "fragile", ctx, f.seq);
    Ok(())
}

#[command]
async fn flaky(f: Flaky) -> Result<()> {
    ATTEMPTS.add(&f.run);
    if broken(&f.run) {
        return Err(Error::unavailable("the database is down"));
    }
    Ok(())
}

#[command]
async fn unsteady(u: Unsteady) -> Result<()> {
    ATTEMPTS.add(&u.run);
    if broken(&u.run) {
        return Err(Error::unavailable("the database is down"));
    }
    Ok(())
}

#[command]
async fn refused(_: Refused) -> Result<()> {
    Err(Error::invalid("refused for good"))
}

#[event(durable = "forwards", idempotent, max_deliver = 50)]
async fn on_forward(ctx: &Context, f: Forward) -> Result<()> {
    if f.refuse {
        ctx.send(Refused).await?;
    } else {
        ctx.send(Unsteady { run: f.run.clone() }).await?;
    }
    HANDLED.record(&f.run, "forward", ctx, f.seq);
    Ok(())
}

#[event(durable = "forwards-both", idempotent, max_deliver = 50)]
async fn on_forward_both(ctx: &Context, f: ForwardBoth) -> Result<()> {
    ctx.send(Flaky {
        run: format!("{}-flaky", f.run),
    })
    .await?;
    ctx.send(Unsteady { run: f.run }).await
}

fn job(run: &str, seq: u64, mode: &str) -> Job {
    Job {
        run: run.to_owned(),
        seq,
        mode: mode.to_owned(),
    }
}

async fn runtime(b: &Backend) -> catga::Runtime {
    b.started(
        b.builder(module_path!(), "r1")
            .retry_base(Duration::from_millis(20))
            .breaker(3, Duration::from_millis(400)),
    )
    .await
}

catga_tests::on_both!(
    durable_events_are_handled_and_redelivered,
    poison_and_exhausted_messages_are_dead_lettered,
    dead_letters_can_be_replayed_and_purged,
    an_open_breaker_stops_pulling,
    an_open_breaker_answers_commands_unavailable,
    a_replica_whose_breaker_is_open_shuts_down_at_once,
    poison_at_the_size_limit_is_dead_lettered_cut_to_fit,
    letters_are_per_service_and_keep_no_5xx_text,
    a_message_that_crashes_every_replica_ends_as_a_dead_letter,
    a_downstream_failure_for_now_is_delivered_again_and_a_refusal_is_final
);

// The scenarios with an inbox or dead letters to keep, on the sharded
// store too.
catga_tests::on_sharded!(
    durable_events_are_handled_and_redelivered,
    poison_and_exhausted_messages_are_dead_lettered,
    dead_letters_can_be_replayed_and_purged,
    a_downstream_failure_for_now_is_delivered_again_and_a_refusal_is_final
);

/// An idempotent event handler that passes on the failure of an
/// idempotent command it sent fails with the downstream kind: a 503 is
/// delivered again until the command goes through, a 400 is dead-lettered
/// at once under its own kind.
async fn a_downstream_failure_for_now_is_delivered_again_and_a_refusal_is_final(b: &Backend) {
    let rt = runtime(b).await;
    let client = b.client().await;
    let run = run_id();
    set_broken(&run, true);
    let forward = |seq, refuse| Forward {
        run: run.clone(),
        seq,
        refuse,
    };
    client.publish_durable(forward(1, false)).await.expect("stored");
    let until = Instant::now() + WAIT;
    while ATTEMPTS.get(&run) < 3 {
        assert!(Instant::now() < until, "the event was not delivered again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    set_broken(&run, false);
    let records = HANDLED.wait_for(&run, 1, WAIT).await;
    assert_eq!(records.len(), 1, "handled once the command went through");

    client.publish_durable(forward(2, true)).await.expect("stored");
    let letters = wait_letters(&rt, &run, 1).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.error_kind, ErrorKind::Invalid, "{letter:?}");
    assert_eq!(letter.deliveries, 1, "a refusal is not retried");
    assert!(
        letter
            .error
            .contains("tests.durable.refused answered: refused for good"),
        "{}",
        letter.error
    );

    // A handler that sent a command that is not idempotent is not run
    // again for a later command's failure: that command would run twice.
    let both = run_id();
    set_broken(&both, true);
    client
        .publish_durable(ForwardBoth { run: both.clone() })
        .await
        .expect("stored");
    let letters = wait_letters(&rt, &both, 1).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].error_kind, ErrorKind::Handler, "{:?}", letters[0]);
    assert_eq!(letters[0].deliveries, 1);
    assert_eq!(
        ATTEMPTS.get(&format!("{both}-flaky")),
        1,
        "the first command ran once"
    );
    rt.shutdown().await.expect("clean shutdown");
}

async fn durable_events_are_handled_and_redelivered(b: &Backend) {
    let rt = runtime(b).await;
    let client = b.client().await;
    let run = run_id();
    for seq in 0..10 {
        client
            .publish_durable(job(&run, seq, "ok"))
            .await
            .expect("stored");
    }
    client
        .publish_durable(job(&run, 10, "fail_once"))
        .await
        .expect("stored");
    let records = HANDLED.wait_for(&run, 11, WAIT).await;
    let seqs: BTreeSet<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (0..=10).collect(), "every job handled");
    assert_eq!(records.len(), 11, "each once");
    assert_eq!(
        ATTEMPTS.get(&format!("{run}:10")),
        2,
        "the failed one was delivered again"
    );
    rt.shutdown().await.expect("clean shutdown");
}

async fn poison_and_exhausted_messages_are_dead_lettered(b: &Backend) {
    let rt = runtime(b).await;
    let client = b.client().await;
    let run = run_id();
    client
        .publish_durable(job(&run, 1, "poison"))
        .await
        .expect("stored");
    client
        .publish_durable(job(&run, 2, "retry_forever"))
        .await
        .expect("stored");
    client
        .publish_raw(
            "tests.durable.job",
            Bytes::from(format!("{{\"run\":\"{run}\",\"garbage\":")),
        )
        .await
        .expect("stored");
    for seq in 10..15 {
        client
            .publish_durable(job(&run, seq, "ok"))
            .await
            .expect("stored");
    }
    let records = HANDLED.wait_for(&run, 5, WAIT).await;
    assert_eq!(records.len(), 5, "the messages behind the bad ones flow");
    let letters = wait_letters(&rt, &run, 3).await;
    let by_kind: std::collections::HashMap<ErrorKind, &catga::DeadLetter> =
        letters.iter().map(|l| (l.error_kind, l)).collect();
    let poison = by_kind.get(&ErrorKind::Invalid).expect("the poison job");
    assert_eq!(poison.deliveries, 1, "a non-retryable failure is not retried");
    assert!(poison.error.contains("can never be done"));
    assert!(poison.handler.ends_with("durable::on_job"));
    assert_eq!(poison.subject, "tests.durable.job");
    let exhausted = by_kind.get(&ErrorKind::Unavailable).expect("the exhausted job");
    assert_eq!(exhausted.deliveries, 3, "retried until max_deliver");
    assert_eq!(ATTEMPTS.get(&format!("{run}:2")), 3);
    let garbage = by_kind.get(&ErrorKind::Decode).expect("the undecodable one");
    assert!(garbage.error.contains("`Job`"), "{}", garbage.error);
    rt.shutdown().await.expect("clean shutdown");
}

/// The dead letters of `run` (their payload names it), once there are `n`.
async fn wait_letters(rt: &catga::Runtime, run: &str, n: usize) -> Vec<catga::DeadLetter> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let letters: Vec<catga::DeadLetter> = rt
            .dead_letters()
            .list(0, 10_000)
            .await
            .expect("list")
            .into_iter()
            .filter(|l| String::from_utf8_lossy(&l.payload).contains(run))
            .collect();
        if letters.len() >= n || tokio::time::Instant::now() >= deadline {
            return letters;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn dead_letters_can_be_replayed_and_purged(b: &Backend) {
    let rt = runtime(b).await;
    let client = b.client().await;
    let run = run_id();
    set_broken(&run, true);
    client
        .publish_durable(job(&run, 1, "until_fixed"))
        .await
        .expect("stored");
    client
        .publish_durable(job(&run, 2, "poison"))
        .await
        .expect("stored");
    let letters = wait_letters(&rt, &run, 2).await;
    assert_eq!(letters.len(), 2);
    let fixable = letters
        .iter()
        .find(|l| l.error_kind == ErrorKind::Unavailable)
        .expect("fixable");
    let one = rt.dead_letters().get(fixable.seq).await.expect("get");
    assert_eq!(one.authentic, Some(true), "written by catga: {one:?}");
    assert_eq!(&one, fixable);
    set_broken(&run, false);
    rt.dead_letters().replay(fixable.seq).await.expect("replayed");
    let handled = HANDLED.wait_for(&run, 1, WAIT).await;
    assert_eq!(
        handled.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![1],
        "handled after the fix"
    );
    let poison = letters
        .iter()
        .find(|l| l.error_kind == ErrorKind::Invalid)
        .expect("poison");
    rt.dead_letters().purge(poison.seq).await.expect("purged");
    assert!(wait_letters(&rt, &run, 0).await.is_empty(), "none left");
    let err = rt.dead_letters().get(poison.seq).await.expect_err("gone");
    assert_eq!(err.kind(), ErrorKind::NotFound);
    rt.shutdown().await.expect("clean shutdown");
}

async fn an_open_breaker_stops_pulling(b: &Backend) {
    let rt = runtime(b).await;
    let client = b.client().await;
    let run = run_id();
    set_broken(&run, true);
    for seq in 0..20 {
        client
            .publish_durable(Fragile {
                run: run.clone(),
                seq,
            })
            .await
            .expect("stored");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let attempts = ATTEMPTS.get(&run);
    assert!(attempts >= 3, "it tried: {attempts}");
    // Three failures open the breaker for 400 ms; then one trial, which
    // fails and opens it again: a handful of attempts in 1.5 s, not 20
    // messages times their redeliveries.
    assert!(
        attempts <= 12,
        "the open breaker stopped the pulling: {attempts} attempts"
    );
    set_broken(&run, false);
    let records = HANDLED.wait_for(&run, 20, Duration::from_secs(15)).await;
    assert_eq!(
        records.len(),
        20,
        "every message handled once the dependency is back"
    );
    rt.shutdown().await.expect("clean shutdown");
}

/// A durable handler's breaker is open (for a minute) when the replica
/// is told to stop: the drain does not wait for the breaker, so the
/// shutdown is clean and quick. It waited until the breaker closed, and
/// its drain was cut off at the deadline (found by the fault simulator).
async fn a_replica_whose_breaker_is_open_shuts_down_at_once(b: &Backend) {
    let rt = b
        .started(
            b.builder(module_path!(), "r1")
                .retry_base(Duration::from_millis(20))
                .breaker(3, Duration::from_secs(60))
                .drain_timeout(Duration::from_secs(10)),
        )
        .await;
    let client = b.client().await;
    let run = run_id();
    set_broken(&run, true);
    for seq in 0..5 {
        client
            .publish_durable(Fragile {
                run: run.clone(),
                seq,
            })
            .await
            .expect("stored");
    }
    let until = Instant::now() + WAIT;
    while ATTEMPTS.get(&run) < 3 {
        assert!(Instant::now() < until, "three failures open the breaker");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The breaker opened on the third failure.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let attempts = ATTEMPTS.get(&run);
    let started = Instant::now();
    rt.shutdown().await.expect("a clean shutdown, nothing cut off");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "shut down in {took:?}, not when the breaker closes"
    );
    assert_eq!(ATTEMPTS.get(&run), attempts, "nothing more was tried");
    set_broken(&run, false);
}

async fn an_open_breaker_answers_commands_unavailable(b: &Backend) {
    let rt = runtime(b).await;
    let client = b.client().await;
    let run = run_id();
    set_broken(&run, true);
    for _ in 0..3 {
        let err = client.send(Flaky { run: run.clone() }).await.expect_err("fails");
        assert_eq!(err.kind(), ErrorKind::Unavailable);
    }
    let err = client
        .send(Flaky { run: run.clone() })
        .await
        .expect_err("breaker open");
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.message().contains("circuit breaker is open"), "{err}");
    assert_eq!(ATTEMPTS.get(&run), 3, "the open breaker did not call the handler");
    set_broken(&run, false);
    tokio::time::sleep(Duration::from_millis(450)).await;
    client
        .send(Flaky { run: run.clone() })
        .await
        .expect("half-open trial passes, breaker closes");
    client.send(Flaky { run }).await.expect("closed");
    rt.shutdown().await.expect("clean shutdown");
}

/// An undecodable message a few hundred bytes under the broker's limit:
/// its letter (payload plus the `Catga-Dlq-*` headers) would be over it.
/// It is stored cut to fit, saying so, instead of being refused until the
/// message's deliveries ran out and it was neither handled nor kept.
async fn poison_at_the_size_limit_is_dead_lettered_cut_to_fit(b: &Backend) {
    let rt = runtime(b).await;
    let client = b.client().await;
    let run = run_id();
    let mut poison = format!("{{\"run\":\"{run}\",\"garbage\":");
    poison.push_str(&"x".repeat(1024 * 1024 - 400 - poison.len()));
    let size = poison.len() as u64;
    client
        .publish_raw("tests.durable.job", Bytes::from(poison))
        .await
        .expect("stored");
    let letters = wait_letters(&rt, &run, 1).await;
    let [letter] = &letters[..] else {
        panic!("one dead letter, not {}: {letters:?}", letters.len())
    };
    assert_eq!(letter.error_kind, ErrorKind::Decode, "{}", letter.error);
    assert_eq!(letter.truncated, Some(size), "it says what was cut");
    assert!(
        (letter.payload.len() as u64) < size && letter.payload.len() > 512 * 1024,
        "what fits is kept: {} of {size} bytes",
        letter.payload.len()
    );
    client.publish_durable(job(&run, 1, "ok")).await.expect("stored");
    assert_eq!(
        HANDLED.wait_for(&run, 1, WAIT).await.len(),
        1,
        "the next one flows"
    );
    rt.shutdown().await.expect("clean shutdown");
}

/// Each service has its own letters; the text of a 5xx failure is not
/// kept in a letter, only its error id; purging all of one service's
/// letters leaves another's.
async fn letters_are_per_service_and_keep_no_5xx_text(b: &Backend) {
    let rt = runtime(b).await;
    let client = b.client().await;
    let run = run_id();
    client
        .publish_durable(job(&run, 1, "poison"))
        .await
        .expect("stored");
    client
        .publish_durable(job(&run, 2, "crash"))
        .await
        .expect("stored");
    let letters = wait_letters(&rt, &run, 2).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert!(letters.iter().all(|l| l.authentic == Some(true)), "{letters:?}");
    let crashed = letters
        .iter()
        .find(|l| l.error_kind == ErrorKind::Handler)
        .expect("the 5xx one");
    assert!(
        crashed.error.contains("error id") && !crashed.error.contains("secret"),
        "a 5xx text stays in the log: {}",
        crashed.error
    );
    let other = client.dead_letters_of("another-service");
    assert!(other.list(0, 100).await.expect("list").is_empty());
    assert_eq!(other.purge_all().await.expect("purge"), 0);
    assert_eq!(wait_letters(&rt, &run, 2).await.len(), 2, "untouched");
    let purged = rt.dead_letters().purge_all().await.expect("purge");
    assert!(purged >= 2, "{purged}");
    assert!(wait_letters(&rt, &run, 0).await.is_empty());
    rt.shutdown().await.expect("clean shutdown");
}

/// A letter published by an ordinary NATS client on the dead-letter
/// subjects, naming a command that cancels an order (and borrowing a real
/// letter's id), is listed as not authentic and is not replayed; forced, it
/// goes only to a stream. (The embedded bus keeps letters in the process,
/// where nobody else can publish one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_letters_are_not_replayed() {
    let b = Backend::nats();
    let rt = runtime(&b).await;
    let client = b.client().await;
    let run = run_id();
    client
        .publish_durable(job(&run, 1, "poison"))
        .await
        .expect("stored");
    let real = wait_letters(&rt, &run, 1).await;
    let forged = format!("{{\"run\":\"{run}\",\"order\":\"o-1\"}}");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Catga-Dlq-Subject", "cmd.cancel_order");
    headers.insert("Catga-Dlq-Service", "catga-tests");
    headers.insert("Catga-Dlq-Handler", "durable::on_job");
    headers.insert("Catga-Dlq-Id", real[0].letter_id.clone().expect("an id").as_str());
    let Backend::Nats(server, _) = &b else {
        unreachable!("nats backend")
    };
    let nc = async_nats::connect(server.url()).await.expect("raw client");
    let js = async_nats::jetstream::new(nc);
    js.publish_with_headers(
        "catga.dead.catga-tests.cmd.cancel_order",
        headers,
        Bytes::from(forged),
    )
    .await
    .expect("published")
    .await
    .expect("stored");
    // A real letter of a message with headers of every kind (their order
    // is not kept by the broker) is authentic, read back from NATS.
    let mut with_headers = async_nats::HeaderMap::new();
    with_headers.insert("Catga-Correlation-Id", "corr-1");
    with_headers.insert("Catga-Causation-Id", "cause-1");
    with_headers.insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    with_headers.append("X-Tag", "a");
    with_headers.append("X-Tag", "b");
    with_headers.insert("Nats-Msg-Id", format!("{run}-headers").as_str());
    let poison = format!("{{\"run\":\"{run}\",\"seq\":7,\"mode\":\"poison\"}}");
    js.publish_with_headers("tests.durable.job", with_headers, Bytes::from(poison))
        .await
        .expect("published")
        .await
        .expect("stored");
    let letters = wait_letters(&rt, &run, 3).await;
    let headed = letters
        .iter()
        .find(|l| l.headers.iter().any(|(k, _)| k == "X-Tag"))
        .expect("the letter with headers");
    assert_eq!(headed.authentic, Some(true), "{headed:?}");
    let forged = letters
        .iter()
        .find(|l| l.subject == "cmd.cancel_order")
        .expect("the forged letter is listed");
    assert_eq!(forged.authentic, Some(false), "{forged:?}");
    let err = rt.dead_letters().replay(forged.seq).await.expect_err("refused");
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    // Read without the store, nothing is known to be authentic.
    let unchecked = client
        .dead_letters_of("catga-tests")
        .get(real[0].seq)
        .await
        .expect("get");
    assert_eq!(unchecked.authentic, None);
    let err = client
        .dead_letters_of("catga-tests")
        .replay(real[0].seq)
        .await
        .expect_err("not checked");
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err}");
    rt.shutdown().await.expect("clean shutdown");
}

/// A message whose replica dies every time it takes it (each runtime is
/// dropped while the handler runs: nothing settles it) comes back after
/// each ack wait; once it was delivered more often than `max_deliver`
/// (3), it is dead-lettered without running again. The broker does not
/// limit deliveries, so nothing else would end it; with the broker's
/// limit it used to end neither handled nor dead-lettered.
async fn a_message_that_crashes_every_replica_ends_as_a_dead_letter(b: &Backend) {
    let run = run_id();
    let client = b.client().await;
    let replica = |i: usize| {
        b.started(
            b.builder(module_path!(), &format!("crash-{i}"))
                .durable_defaults(Duration::from_millis(500), 3),
        )
    };
    let first = replica(0).await;
    client
        .publish_durable(job(&run, 1, "hang"))
        .await
        .expect("stored");
    let key = format!("{run}:1");
    let mut rt = first;
    // Each replica that runs the message "crashes" (is dropped) and a new
    // one starts. A redelivery can also go to the pull request a dropped
    // replica left on the server, and count as a delivery without a run:
    // so the test waits for runs, up to three, not for exact counts.
    let mut replaced = 0;
    let until = tokio::time::Instant::now() + 3 * WAIT;
    while replaced < 3 {
        let runs = ATTEMPTS.get(&key);
        if runs > replaced {
            replaced = runs;
            drop(rt);
            rt = replica(replaced as usize).await;
            continue;
        }
        let letters = rt.dead_letters().list(0, 10_000).await.expect("list");
        if letters
            .iter()
            .any(|l| String::from_utf8_lossy(&l.payload).contains(&run))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "no delivery after {runs} runs and no dead letter"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let letters = wait_letters(&rt, &run, 1).await;
    let [letter] = &letters[..] else {
        panic!("one dead letter, not {}: {letters:?}", letters.len())
    };
    assert!(letter.deliveries > 3, "{letter:?}");
    assert!(letter.error_kind == ErrorKind::Internal, "{letter:?}");
    let runs = ATTEMPTS.get(&key);
    assert!(
        (1..=3).contains(&runs),
        "run {runs} times: never more than its 3 deliveries"
    );
    // Nothing runs it after the letter.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        ATTEMPTS.get(&key),
        runs,
        "not run again after its deliveries ran out"
    );
    let _ = rt.shutdown().await;
}
