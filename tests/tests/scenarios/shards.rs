//! Store shards (`CATGA_STORE_SHARDS=3`): a keyed command's inbox entry,
//! saves and outbox entries commit in its key's shard; a save of a key in
//! another shard is refused with nothing written; keys with a `{tag}`
//! commit together; sagas and the outbox backlog are read across shards.
//! The same on the embedded store (which refuses what a sharded Redis
//! would) and on NATS with Redis.

use std::collections::{BTreeMap, BTreeSet};

use catga::{Context, ErrorKind, Result, Saga, State, Versioned, command, event, saga};
use catga_tests::backend::shutdown_all;
use catga_tests::{Backend, Recorder, run_id};
use serde::{Deserialize, Serialize};

use crate::WAIT;

/// The shard count of these scenarios.
const SHARDS: u32 = 3;

#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
pub struct Account {
    pub cents: u64,
}

impl State for Account {
    const KIND: &'static str = "shard-account";
}

#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
pub struct Line {
    pub cents: u64,
}

impl State for Line {
    const KIND: &'static str = "shard-line";
}

/// Adds cents to an account; its writes commit in the account's shard.
#[command(reply = u64, subject = "tests.shards.deposit", idempotent, key = account)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Deposit {
    pub run: String,
    pub account: String,
    pub cents: u64,
}

/// Published with each deposit, through its shard's outbox.
#[event(subject = "tests.shards.deposited")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Deposited {
    pub run: String,
    pub account: String,
    pub cents: u64,
}

/// Moves everything from one account to another in one handler.
#[command(reply = u64, subject = "tests.shards.sweep", idempotent, key = from)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Sweep {
    pub from: String,
    pub to: String,
}

/// Adds a line to an account: `order-{account}-<n>` and the account
/// commit together.
#[command(reply = u64, subject = "tests.shards.add_line", key = account)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct AddLine {
    pub account: String,
    pub n: u64,
    pub cents: u64,
}

/// Reads an account (a keyed command without an inbox).
#[command(reply = Option<u64>, subject = "tests.shards.balance", key = account)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Balance {
    pub account: String,
}

/// Reads a line.
#[command(reply = Option<u64>, subject = "tests.shards.line")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LineOf {
    pub key: String,
}

/// Starts a saga (its journal goes to the shard of its id).
#[event(subject = "tests.shards.opened")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Opened {
    pub run: String,
    pub n: u64,
}

/// Adds a cent to an account and publishes three steps with it, in one
/// commit (their ids `<message id>.<n>`, n from 0).
#[command(reply = u64, subject = "tests.shards.burst", idempotent, key = account)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Burst {
    pub run: String,
    pub account: String,
}

/// One of a burst's steps, on a stream catga makes.
#[event(subject = "tests.shards.stepped")]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Stepped {
    pub run: String,
    pub account: String,
    pub n: u64,
}

/// A burst's steps on a stream an operator made, without `allow_atomic`.
#[command(reply = u64, subject = "tests.shards.noted_burst", key = account)]
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct NotedBurst {
    pub run: String,
    pub account: String,
}

/// One of a noted burst's steps.
#[event(subject = "tests.shards.noted")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Noted {
    pub run: String,
    pub account: String,
    pub n: u64,
}

static DEPOSITED: Recorder = Recorder::new();
static STEPPED: Recorder = Recorder::new();
static OPENED: Recorder = Recorder::new();

async fn credit(ctx: &Context, account: &str, cents: u64) -> Result<Versioned<Account>> {
    let mut a = ctx
        .try_load::<Account>(account)
        .await?
        .unwrap_or_else(|| Versioned::new(account.to_owned(), Account::default()));
    a.cents += cents;
    Ok(a)
}

#[command]
async fn deposit(ctx: &Context, d: Deposit) -> Result<u64> {
    let a = credit(ctx, &d.account, d.cents).await?;
    let saved = ctx
        .save(a)
        .with_event(Deposited {
            run: d.run,
            account: d.account,
            cents: d.cents,
        })
        .await?;
    Ok(saved.cents)
}

#[command]
async fn sweep(ctx: &Context, s: Sweep) -> Result<u64> {
    let mut from = ctx.load::<Account>(&s.from).await?;
    let moved = std::mem::take(&mut from.cents);
    let to = credit(ctx, &s.to, moved).await?;
    ctx.save(from).await?;
    ctx.save(to).await?;
    Ok(moved)
}

#[command]
async fn add_line(ctx: &Context, l: AddLine) -> Result<u64> {
    let line = Versioned::new(
        format!("order-{{{}}}-{}", l.account, l.n),
        Line { cents: l.cents },
    );
    ctx.save(line).await?;
    let a = credit(ctx, &l.account, l.cents).await?;
    Ok(ctx.save(a).await?.cents)
}

#[command]
async fn balance(ctx: &Context, b: Balance) -> Result<Option<u64>> {
    Ok(ctx.try_load::<Account>(&b.account).await?.map(|a| a.cents))
}

#[command]
async fn line_of(ctx: &Context, l: LineOf) -> Result<Option<u64>> {
    Ok(ctx.try_load::<Line>(&l.key).await?.map(|l| l.cents))
}

#[command]
async fn burst(ctx: &Context, b: Burst) -> Result<u64> {
    let a = credit(ctx, &b.account, 1).await?;
    let steps = (1..=3).map(|n| Stepped {
        run: b.run.clone(),
        account: b.account.clone(),
        n,
    });
    Ok(ctx.save(a).with_events(steps).await?.cents)
}

#[command]
async fn noted_burst(ctx: &Context, b: NotedBurst) -> Result<u64> {
    let a = credit(ctx, &b.account, 1).await?;
    let steps = (1..=3).map(|n| Noted {
        run: b.run.clone(),
        account: b.account.clone(),
        n,
    });
    Ok(ctx.save(a).with_events(steps).await?.cents)
}

#[event]
async fn on_stepped_plainly(ctx: &Context, s: Stepped) -> Result<()> {
    STEPPED.record(&format!("{}/{}", s.run, s.account), "stepped plainly", ctx, s.n);
    Ok(())
}

#[event(durable = "shard-steps")]
async fn on_stepped(ctx: &Context, s: Stepped) -> Result<()> {
    STEPPED.record(&format!("{}/{}", s.run, s.account), "stepped", ctx, s.n);
    Ok(())
}

#[event]
async fn on_noted(ctx: &Context, s: Noted) -> Result<()> {
    STEPPED.record(&format!("{}/{}", s.run, s.account), "noted", ctx, s.n);
    Ok(())
}

#[event]
async fn on_deposited(ctx: &Context, d: Deposited) -> Result<()> {
    DEPOSITED.record(&format!("{}/{}", d.run, d.account), "deposited", ctx, d.cents);
    Ok(())
}

#[saga]
async fn opening(saga: &Saga, o: Opened) -> Result<()> {
    OPENED.record(&o.run, "opened", saga.context(), o.n);
    Ok(())
}

catga_tests::on_both_and_sharded!(
    keyed_writes_commit_in_their_shard_and_their_events_leave,
    a_save_in_another_shard_is_refused_with_nothing_written,
    keys_with_one_tag_commit_together,
    sagas_are_listed_across_shards,
    the_shards_outboxes_are_relayed_by_every_replica,
    events_sent_again_are_stored_once_and_in_order
);

fn sharded(b: &Backend, instance: &str) -> catga::RuntimeBuilder {
    b.builder(module_path!(), instance).store_shards(SHARDS)
}

/// Accounts spread over every shard: each deposit answers once per id,
/// each account's balance adds up, and every deposit's event is
/// published once (the relay drains every shard's outbox).
async fn keyed_writes_commit_in_their_shard_and_their_events_leave(b: &Backend) {
    let rt = b.started(sharded(b, "r1")).await;
    let client = b.client().await;
    let run = run_id();
    // Four accounts in each shard (12 drawn at random missed one about
    // once in 40 runs).
    let mut per_shard = vec![0; SHARDS as usize];
    let accounts: Vec<String> = (0..)
        .map(|i| format!("{run}-acct-{i}"))
        .filter(|a| {
            let shard = catga::ring::partition_of(a, SHARDS) as usize;
            per_shard[shard] += 1;
            per_shard[shard] <= 4
        })
        .take(4 * SHARDS as usize)
        .collect();
    let shards: BTreeSet<u64> = accounts
        .iter()
        .map(|a| catga::ring::partition_of(a, SHARDS) as u64)
        .collect();
    assert_eq!(shards.len(), SHARDS as usize, "the accounts cover every shard");
    for round in 1..=3u64 {
        for a in &accounts {
            let d = Deposit {
                run: run.clone(),
                account: a.clone(),
                cents: 10,
            };
            let id = format!("{a}-{round}");
            assert_eq!(
                client.send_with_id(d.clone(), &id).await.expect("deposit"),
                10 * round
            );
            assert_eq!(
                client.send_with_id(d, &id).await.expect("the same deposit again"),
                10 * round,
                "answered from the inbox of the account's shard"
            );
        }
    }
    for a in &accounts {
        let got: Vec<u64> = DEPOSITED
            .wait_for(&format!("{run}/{a}"), 3, WAIT)
            .await
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(got, vec![10, 10, 10], "{a}: each event once");
    }
    assert_eq!(rt.outbox_backlog().await.expect("backlog"), 0);
    shutdown_all(vec![rt]).await;
}

/// A handler that saves a key of another shard is refused at that save:
/// the client gets an internal error, and neither account changed.
async fn a_save_in_another_shard_is_refused_with_nothing_written(b: &Backend) {
    let rt = b.started(sharded(b, "r1")).await;
    let client = b.client().await;
    let run = run_id();
    let account = |i: u32| format!("{run}-sweep-{i}");
    let shard = |k: &str| catga::ring::partition_of(k, SHARDS);
    let from = account(0);
    let near = (1..)
        .map(account)
        .find(|k| shard(k) == shard(&from))
        .expect("a key in the same shard");
    let far = (1..)
        .map(account)
        .find(|k| shard(k) != shard(&from))
        .expect("a key in another shard");
    for k in [&from, &near, &far] {
        let d = Deposit {
            run: run.clone(),
            account: k.clone(),
            cents: 5,
        };
        client.send(d).await.expect("deposit");
    }
    let refused = client
        .send(Sweep {
            from: from.clone(),
            to: far.clone(),
        })
        .await
        .expect_err("a save in another shard");
    assert_eq!(refused.kind(), ErrorKind::Internal, "{refused}");
    let balance = |account: &String| {
        client.send(Balance {
            account: account.clone(),
        })
    };
    assert_eq!(
        balance(&from).await.expect("balance"),
        Some(5),
        "nothing was taken from {from}"
    );
    assert_eq!(balance(&far).await.expect("balance"), Some(5));
    // Within one shard it goes through.
    let moved = client
        .send(Sweep {
            from: from.clone(),
            to: near.clone(),
        })
        .await
        .expect("a sweep within one shard");
    assert_eq!(moved, 5);
    assert_eq!(balance(&near).await.expect("balance"), Some(10));
    shutdown_all(vec![rt]).await;
}

/// `order-{acct}-<n>` is placed by `acct`: a line and its account commit
/// together whatever the line's number.
async fn keys_with_one_tag_commit_together(b: &Backend) {
    let rt = b.started(sharded(b, "r1")).await;
    let client = b.client().await;
    let account = format!("{}-lines", run_id());
    for n in 1..=9 {
        let total = client
            .send(AddLine {
                account: account.clone(),
                n,
                cents: 1,
            })
            .await
            .expect("a line and its account");
        assert_eq!(total, n);
    }
    let line = client
        .send(LineOf {
            key: format!("order-{{{account}}}-9"),
        })
        .await
        .expect("a line");
    assert_eq!(line, Some(1));
    shutdown_all(vec![rt]).await;
}

/// Sagas whose journals are in different shards are all listed, newest
/// first.
async fn sagas_are_listed_across_shards(b: &Backend) {
    let rt = b.started(sharded(b, "r1")).await;
    let client = b.client().await;
    let run = run_id();
    // Message ids chosen so that the journals fall in every shard (a
    // journal's shard is that of the saga's id, `opening:<message id>`).
    let mut per_shard = [0u32; SHARDS as usize];
    let message_ids: Vec<String> = (0..)
        .map(|i| format!("{run}-{i}"))
        .filter(|id| {
            let shard = catga::ring::partition_of(&format!("opening:{id}"), SHARDS) as usize;
            per_shard[shard] += 1;
            per_shard[shard] <= 3
        })
        .take(9)
        .collect();
    for (n, id) in (0..).zip(&message_ids) {
        client
            .publish_with_id(Opened { run: run.clone(), n }, id)
            .await
            .expect("publish");
    }
    let records = OPENED.wait_for(&run, 9, WAIT).await;
    let ids: BTreeSet<String> = records
        .iter()
        .map(|r| format!("opening:{}", r.message_id))
        .collect();
    assert_eq!(
        (records.len(), ids.len()),
        (9, 9),
        "each saga opened once: {records:?}"
    );
    let mut listed = BTreeSet::new();
    let until = std::time::Instant::now() + WAIT;
    while listed.len() < ids.len() {
        assert!(
            std::time::Instant::now() < until,
            "listed {} of {} sagas",
            listed.len(),
            ids.len()
        );
        listed = rt
            .sagas(1000)
            .await
            .expect("sagas")
            .into_iter()
            .map(|s| s.id)
            .filter(|id| ids.contains(id))
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let shards: BTreeSet<u32> = listed
        .iter()
        .map(|id| catga::ring::partition_of(id, SHARDS))
        .collect();
    assert_eq!(
        shards.len(),
        SHARDS as usize,
        "the journals are in every shard: {shards:?}"
    );
    shutdown_all(vec![rt]).await;
}

/// Until the replicas' relayed shards are `expected`, each shard by one
/// replica and each replica relaying `each` shards at most.
async fn until_relayed(replicas: &[catga::Runtime], expected: &[u32], each: usize) -> Vec<Vec<u32>> {
    let start = std::time::Instant::now();
    loop {
        let held: Vec<Vec<u32>> = replicas.iter().map(catga::Runtime::relayed_shards).collect();
        let mut all = held.concat();
        all.sort_unstable();
        if all == expected && held.iter().all(|h| h.len() <= each) {
            return held;
        }
        assert!(start.elapsed() < WAIT, "relayed {held:?}, expected {expected:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Four accounts of `run` in each shard.
fn accounts_in_every_shard(run: &str) -> Vec<String> {
    let mut per_shard = vec![0; SHARDS as usize];
    (0..)
        .map(|i| format!("{run}-acct-{i}"))
        .filter(|a| {
            let n = &mut per_shard[catga::ring::partition_of(a, SHARDS) as usize];
            *n += 1;
            *n <= 4
        })
        .take(4 * SHARDS as usize)
        .collect()
}

/// Deposits on accounts in every shard; each one's event arrives once.
async fn deposit_everywhere(client: &catga::Client, run: &str, round: u64) {
    for account in accounts_in_every_shard(run) {
        let d = Deposit {
            run: run.to_owned(),
            account: account.clone(),
            cents: 10,
        };
        client
            .send_with_id(d, &format!("{account}-{round}"))
            .await
            .expect("deposit");
    }
    // Every replica receives each event (a plain subscriber): `round`
    // events each, none twice.
    for account in accounts_in_every_shard(run) {
        let key = format!("{run}/{account}");
        let start = std::time::Instant::now();
        loop {
            let got = DEPOSITED.of(&key);
            let ids: BTreeSet<&str> = got.iter().map(|r| r.message_id.as_str()).collect();
            if ids.len() as u64 == round || start.elapsed() > WAIT {
                assert_eq!(ids.len() as u64, round, "{account}: {got:?}");
                let mut seen = BTreeSet::new();
                for r in &got {
                    assert!(
                        seen.insert((&r.instance, &r.message_id)),
                        "{account}: twice to {}: {got:?}",
                        r.instance
                    );
                }
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// Three replicas share the relaying of the three shards' outboxes (one
/// each, on Redis; one replica holds the single outbox of the embedded
/// store); when the replica relaying shard 0 shuts down, the others take
/// its shard, and every event still leaves once.
async fn the_shards_outboxes_are_relayed_by_every_replica(b: &Backend) {
    let mut replicas = vec![
        b.started(sharded(b, "r1")).await,
        b.started(sharded(b, "r2")).await,
        b.started(sharded(b, "r3")).await,
    ];
    let expected: Vec<u32> = if b.nats_url().is_some() {
        (0..SHARDS).collect()
    } else {
        vec![0]
    };
    until_relayed(&replicas, &expected, 1).await;
    let client = b.client().await;
    let run = run_id();
    deposit_everywhere(&client, &run, 1).await;
    let first = replicas
        .iter()
        .position(|r| r.relayed_shards().contains(&0))
        .expect("shard 0 is relayed");
    replicas.remove(first).shutdown().await.expect("clean shutdown");
    until_relayed(&replicas, &expected, expected.len()).await;
    deposit_everywhere(&client, &run, 2).await;
    shutdown_all(replicas).await;
}

/// The steps of `account` a handler tagged `tag` heard, in order.
fn heard(run: &str, account: &str, tag: &str) -> Vec<u64> {
    STEPPED
        .of(&format!("{run}/{account}"))
        .iter()
        .filter(|r| r.tag == tag)
        .map(|r| r.seq)
        .collect()
}

/// Until the handler tagged `tag` heard `n` steps of each account.
async fn until_heard(run: &str, accounts: &[String], tag: &str, n: usize) {
    let start = std::time::Instant::now();
    while accounts.iter().any(|a| heard(run, a, tag).len() < n) {
        let got: Vec<Vec<u64>> = accounts.iter().map(|a| heard(run, a, tag)).collect();
        assert!(start.elapsed() < WAIT, "{tag}: not every step heard: {got:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The steps of `run`'s accounts as their streams store them (stream
/// order), each with whether it came in an atomic batch.
async fn stored_steps(nats_url: &str, subject: &str, run: &str) -> BTreeMap<String, Vec<(u64, bool)>> {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.expect("connect"));
    let name = js.stream_by_subject(subject).await.expect("the steps' stream");
    let mut stream = js.get_stream(name).await.expect("stream");
    let info = stream.info().await.expect("info");
    let mut out: BTreeMap<String, Vec<(u64, bool)>> = BTreeMap::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        let m = stream.get_raw_message(seq).await.expect("message");
        let step: Stepped = serde_json::from_slice(&m.payload).expect("a step");
        let batched = m.headers.get("Nats-Batch-Id").is_some();
        if step.run == run {
            out.entry(step.account).or_default().push((step.n, batched));
        }
    }
    out
}

/// With store shards, a relay sends each stream's events as atomic
/// batches: every burst (three steps saved with one deposit) is stored in
/// one, and its steps reach the durable handler once and in order. A
/// batch holding events the stream stored already (as a relay that died
/// before it removed what it sent leaves them) is refused whole, and the
/// relay sends it again an event at a time: the stored ones are
/// acknowledged as duplicates, the rest stored after them. On a stream an
/// operator made without `allow_atomic`, the steps go one at a time (its
/// plain subscriber hears each once), and the stream is left as made. The
/// same bursts on the embedded store and bus.
async fn events_sent_again_are_stored_once_and_in_order(b: &Backend) {
    if let Some(url) = b.nats_url() {
        let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.expect("connect"));
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "OPERATORS_NOTES".to_owned(),
            subjects: vec!["tests.shards.noted".to_owned()],
            ..Default::default()
        })
        .await
        .expect("the operator's stream");
        // The steps' stream as an earlier release made it: no record, no
        // `allow_atomic`; a replica with store shards turns it on.
        js.create_stream(async_nats::jetstream::stream::Config {
            name: catga::stream_name("tests.shards.stepped"),
            subjects: vec!["tests.shards.stepped".to_owned()],
            ..Default::default()
        })
        .await
        .expect("an earlier release's stream");
    }
    let rt = b.started(sharded(b, "r1")).await;
    let expected: Vec<u32> = if b.nats_url().is_some() {
        (0..SHARDS).collect()
    } else {
        vec![0]
    };
    until_relayed(std::slice::from_ref(&rt), &expected, expected.len()).await;
    let client = b.client().await;
    let run = run_id();
    // A relay that took a shard goes one at a time until it knows nothing
    // it reads was stored before: a probe in every shard, once heard, was
    // such a round (it read less than a page); after it, batches.
    let mut shards_probed = BTreeSet::new();
    let probes: Vec<String> = accounts_in_every_shard(&format!("{run}-probe"))
        .into_iter()
        .filter(|a| shards_probed.insert(catga::ring::partition_of(a, SHARDS)))
        .collect();
    for a in &probes {
        let probe = Burst {
            run: run.clone(),
            account: a.clone(),
        };
        client
            .send_with_id(probe, &format!("{a}-probe"))
            .await
            .expect("probe");
    }
    until_heard(&run, &probes, "stepped", 3).await;
    let accounts = accounts_in_every_shard(&run);
    // The first two steps of shard 0's accounts are in the stream already,
    // under the ids the deposit's events get (`<message id>.<n>`).
    let stored_before: Vec<&String> = accounts
        .iter()
        .filter(|a| catga::ring::partition_of(a, SHARDS) == 0)
        .collect();
    if let Some(url) = b.nats_url() {
        let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.expect("connect"));
        for a in &stored_before {
            for n in 1..=2u64 {
                let step = Stepped {
                    run: run.clone(),
                    account: (*a).clone(),
                    n,
                };
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("{a}-1.{}", n - 1).as_str());
                js.publish_with_headers(
                    "tests.shards.stepped",
                    headers,
                    serde_json::to_vec(&step).expect("json").into(),
                )
                .await
                .expect("publish")
                .await
                .expect("stored");
            }
        }
    }
    for round in 1..=2 {
        for a in &accounts {
            let burst = Burst {
                run: run.clone(),
                account: a.clone(),
            };
            client
                .send_with_id(burst, &format!("{a}-{round}"))
                .await
                .expect("burst");
        }
    }
    for a in &accounts {
        let noted = NotedBurst {
            run: run.clone(),
            account: a.clone(),
        };
        client
            .send_with_id(noted, &format!("{a}-n"))
            .await
            .expect("noted burst");
    }
    until_heard(&run, &accounts, "stepped", 6).await;
    until_heard(&run, &accounts, "noted", 3).await;
    let start = std::time::Instant::now();
    while rt.outbox_backlog().await.expect("backlog") > 0 {
        assert!(start.elapsed() < WAIT, "the outbox did not drain");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    for a in &accounts {
        assert_eq!(
            heard(&run, a, "stepped"),
            vec![1, 2, 3, 1, 2, 3],
            "{a}: two bursts, each step once, in order"
        );
        assert_eq!(
            heard(&run, a, "noted"),
            vec![1, 2, 3],
            "{a}: each step once, in order"
        );
        if !stored_before.contains(&a) {
            // No batch refused: a plain subscriber heard each step once.
            assert_eq!(
                heard(&run, a, "stepped plainly"),
                vec![1, 2, 3, 1, 2, 3],
                "{a}: heard plainly once each"
            );
        }
    }
    if let Some(url) = b.nats_url() {
        let stored = stored_steps(&url, "tests.shards.stepped", &run).await;
        let noted = stored_steps(&url, "tests.shards.noted", &run).await;
        for a in &accounts {
            let steps: Vec<u64> = stored[a].iter().map(|(n, _)| *n).collect();
            assert_eq!(steps, vec![1, 2, 3, 1, 2, 3], "{a}: stored once each, in order");
            let batched: Vec<bool> = stored[a].iter().map(|(_, batched)| *batched).collect();
            if stored_before.contains(&a) {
                // A batch holding them was refused: the rest of it went one
                // at a time, and it may have held others of the shard.
                assert_eq!(
                    batched[..3],
                    [false, false, false],
                    "{a}: the burst with steps stored before went one at a time"
                );
            } else {
                assert_eq!(batched, vec![true; 6], "{a}: each burst in one atomic batch");
            }
            assert_eq!(
                noted[a],
                vec![(1, false), (2, false), (3, false)],
                "{a}: stored one at a time on the operator's stream"
            );
        }
        let js = async_nats::jetstream::new(async_nats::connect(url.as_str()).await.expect("connect"));
        let name = catga::stream_name("tests.shards.stepped");
        let ours = js.get_stream(&name).await.expect("catga's stream");
        let mut config = ours.cached_info().config.clone();
        assert!(
            config.allow_atomic_publish,
            "the earlier release's stream takes atomic batches"
        );
        let operators = js
            .get_stream("OPERATORS_NOTES")
            .await
            .expect("the operator's stream");
        assert!(
            !operators.cached_info().config.allow_atomic_publish,
            "the operator's stream is left as made"
        );
        // An operator turns batches off on catga's stream: a replica that
        // starts leaves them off, and its relay sends one at a time.
        config.allow_atomic_publish = false;
        js.update_stream(&config).await.expect("turned off");
        shutdown_all(vec![rt]).await;
        let rt = b.started(sharded(b, "r2")).await;
        until_relayed(std::slice::from_ref(&rt), &expected, expected.len()).await;
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let later: Vec<String> = accounts.iter().map(|a| format!("{a}-later")).collect();
        for a in &later {
            let burst = Burst {
                run: run.clone(),
                account: a.clone(),
            };
            client
                .send_with_id(burst, &format!("{a}-1"))
                .await
                .expect("burst");
        }
        until_heard(&run, &later, "stepped", 3).await;
        let stored = stored_steps(&url, "tests.shards.stepped", &run).await;
        for a in &later {
            assert_eq!(
                stored[a],
                vec![(1, false), (2, false), (3, false)],
                "{a}: one at a time on the stream the operator changed"
            );
        }
        let ours = js.get_stream(&name).await.expect("catga's stream");
        assert!(
            !ours.cached_info().config.allow_atomic_publish,
            "the operator's change is kept"
        );
        shutdown_all(vec![rt]).await;
    } else {
        shutdown_all(vec![rt]).await;
    }
}
