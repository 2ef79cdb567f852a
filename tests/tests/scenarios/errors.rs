//! Handler errors, panics and bad input: the right kind reaches the sender,
//! internals do not, and the replica keeps serving.

use bytes::Bytes;
use catga::{Context, Error, ErrorKind, Result, command, event};
use catga_tests::{Backend, Recorder, run_id};
use serde::{Deserialize, Serialize};

use crate::WAIT;

/// Fails the way `mode` says.
#[command(reply = u32)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Fail {
    /// `ok`, `not_found`, `invalid`, `conflict`, `error` or `panic`.
    pub mode: String,
}

/// An event whose handler records it.
#[event(subject = "tests.errors.noted")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Noted {
    pub run: String,
    pub seq: u64,
}

static NOTED: Recorder = Recorder::new();

#[command]
async fn fail(f: Fail) -> Result<u32> {
    match f.mode.as_str() {
        "ok" => Ok(7),
        "not_found" => Err(Error::not_found("no such thing")),
        "invalid" => Err(Error::invalid("mode is invalid")),
        "conflict" => Err(Error::conflict("already done")),
        "panic" => panic!("the handler blew up with secret s3cr3t"),
        _ => Err(Error::msg("generic failure: postgres://admin:s3cr3t@db")),
    }
}

#[event]
async fn noted(ctx: &Context, n: Noted) -> Result<()> {
    NOTED.record(&n.run, "noted", ctx, n.seq);
    Ok(())
}

/// An event whose handler finishes at once, later, fails or panics, as
/// its `mode` says.
#[event(subject = "tests.errors.paced")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Paced {
    pub run: String,
    pub seq: u64,
    /// `now`, `later`, `fail`, `panic`, or `gate` (later, once the test
    /// opened its run's gate).
    pub mode: String,
}

static PACED: Recorder = Recorder::new();

/// The runs whose `gate` events may finish.
static OPEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// One at a time: a handler still running holds the only slot.
#[event(concurrency = 1)]
async fn paced(ctx: &Context, p: Paced) -> Result<()> {
    match p.mode.as_str() {
        "later" => tokio::time::sleep(std::time::Duration::from_millis(3)).await,
        "gate" => {
            while !OPEN.lock().unwrap_or_else(|e| e.into_inner()).contains(&p.run) {
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        }
        "fail" => return Err(Error::msg("a plain event handler failed")),
        "panic" => panic!("a plain event handler blew up"),
        _ => {}
    }
    PACED.record(&p.run, "paced", ctx, p.seq);
    Ok(())
}

/// A command whose handler answers at once, later, fails or panics, as
/// its `mode` says (the modes of [`Paced`]).
#[command(reply = u64)]
#[derive(Serialize, Deserialize, Debug)]
pub struct PacedCommand {
    pub run: String,
    pub seq: u64,
    pub mode: String,
}

/// Per run: handlers of [`PacedCommand`] running now, and the most at once.
static RUNNING: std::sync::Mutex<Vec<(String, usize, usize)>> = std::sync::Mutex::new(Vec::new());

fn running(run: &str, by: isize) {
    let mut all = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    let at = match all.iter().position(|(r, ..)| r == run) {
        Some(at) => at,
        None => {
            all.push((run.to_owned(), 0, 0));
            all.len() - 1
        }
    };
    let entry = &mut all[at];
    entry.1 = entry.1.saturating_add_signed(by);
    entry.2 = entry.2.max(entry.1);
}

/// One at a time, as [`paced`].
#[command(concurrency = 1)]
async fn paced_command(c: PacedCommand) -> Result<u64> {
    running(&c.run, 1);
    let ended = async {
        match c.mode.as_str() {
            "later" => tokio::time::sleep(std::time::Duration::from_millis(3)).await,
            "gate" => {
                while !OPEN.lock().unwrap_or_else(|e| e.into_inner()).contains(&c.run) {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            }
            "fail" => return Err(Error::msg("a plain command handler failed")),
            "panic" => {
                running(&c.run, -1);
                panic!("a plain command handler blew up")
            }
            _ => {}
        }
        Ok(c.seq)
    }
    .await;
    if c.mode != "panic" {
        running(&c.run, -1);
    }
    ended
}

catga_tests::on_both!(
    error_replies,
    undecodable_payload,
    undecodable_event_is_skipped,
    plain_events_run_in_order_one_at_a_time,
    plain_commands_run_one_at_a_time_and_answer
);

/// Handler errors come back with their kind; 4xx texts as written, 5xx texts
/// replaced by an error id (the text stays in the replica's log); a panic
/// is contained; the replica keeps serving.
async fn error_replies(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let send = |mode: &str| client.send(Fail { mode: mode.into() });
    assert_eq!(send("ok").await.expect("ok"), 7);
    for (mode, kind, code, text) in [
        ("not_found", ErrorKind::NotFound, 404, "no such thing"),
        ("invalid", ErrorKind::Invalid, 400, "mode is invalid"),
        ("conflict", ErrorKind::Conflict, 409, "already done"),
        ("error", ErrorKind::Handler, 500, "the handler failed (error id "),
        ("panic", ErrorKind::Panic, 500, "the handler panicked (error id "),
    ] {
        let err = send(mode).await.expect_err(mode);
        assert_eq!(err.kind(), kind, "{mode}: {err}");
        assert_eq!(err.code(), code);
        assert!(err.message().contains(text), "{mode}: {err}");
        assert!(
            !err.message().contains("s3cr3t"),
            "{mode}: internals leaked: {err}"
        );
        assert!(
            !err.message().contains("errors::fail"),
            "{mode}: the handler path leaked: {err}"
        );
    }
    assert_eq!(send("ok").await.expect("still serving after a panic"), 7);
    rt.shutdown().await.expect("clean shutdown");
}

/// An undecodable payload gets a 400-style error naming the expected type;
/// the replica keeps serving.
async fn undecodable_payload(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
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
async fn undecodable_event_is_skipped(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let run = run_id();
    client
        .publish_raw("tests.errors.noted", Bytes::from_static(b"{not json"))
        .await
        .expect("publish garbage");
    client
        .publish_raw("tests.errors.noted", Bytes::from_static(br#"{"run":"x"}"#))
        .await
        .expect("publish a wrong shape");
    client
        .publish(Noted {
            run: run.clone(),
            seq: 1,
        })
        .await
        .expect("publish");
    let records = NOTED.wait_for(&run, 1, WAIT).await;
    assert_eq!(records.len(), 1, "the valid event after the bad ones is handled");
    rt.shutdown().await.expect("clean shutdown");
}

/// A plain event handler runs in place when it finishes at once, and in
/// the set in flight when it does not (`pipeline::process_in_place`):
/// either way its `concurrency` holds (one at a time here, so nothing
/// overtakes a handler still sleeping, and every event is handled in the
/// order published), and failures and panics are contained.
async fn plain_events_run_in_order_one_at_a_time(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let run = run_id();
    let modes = ["now", "later", "now", "fail", "now", "panic", "later", "now"];
    let mut kept = Vec::new();
    for seq in 0..64u64 {
        // The first holds the only slot until every event is published:
        // they all wait behind it, whatever the timing.
        let mode = if seq == 0 {
            "gate"
        } else {
            modes[seq as usize % modes.len()]
        };
        if mode != "fail" && mode != "panic" {
            kept.push(seq);
        }
        client
            .publish(Paced {
                run: run.clone(),
                seq,
                mode: mode.to_owned(),
            })
            .await
            .expect("publish");
    }
    OPEN.lock().unwrap_or_else(|e| e.into_inner()).push(run.clone());
    let records = PACED.wait_for(&run, kept.len(), WAIT).await;
    let seen: Vec<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(
        seen, kept,
        "every event that succeeds is handled once, in the order published"
    );
    rt.shutdown().await.expect("clean shutdown");
}

/// A plain command handler runs in place too (its reply sent on the serve
/// loop's poll when the client's queue takes it): `concurrency = 1` holds
/// (never two at once, though one sleeps while the rest wait), and every
/// request gets its own answer, failures and panics included.
async fn plain_commands_run_one_at_a_time_and_answer(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let run = run_id();
    let modes = ["now", "later", "now", "fail", "now", "panic", "later", "now"];
    let mode_of = |seq: u64| {
        if seq == 0 {
            "gate"
        } else {
            modes[seq as usize % modes.len()]
        }
    };
    let sends = (0..64u64).map(|seq| {
        client.send(PacedCommand {
            run: run.clone(),
            seq,
            mode: mode_of(seq).to_owned(),
        })
    });
    let opener = async {
        // The first holds the only slot while the others arrive.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        OPEN.lock().unwrap_or_else(|e| e.into_inner()).push(run.clone());
    };
    let (answers, ()) = tokio::join!(futures_util::future::join_all(sends), opener);
    for (seq, answer) in answers.into_iter().enumerate() {
        let seq = seq as u64;
        match (mode_of(seq), answer) {
            ("fail", Err(e)) => assert_eq!(e.kind(), ErrorKind::Handler, "{seq}: {e}"),
            ("panic", Err(e)) => assert_eq!(e.kind(), ErrorKind::Panic, "{seq}: {e}"),
            (_, Ok(n)) => assert_eq!(n, seq, "each request gets its own answer"),
            (mode, other) => panic!("{seq} ({mode}): {other:?}"),
        }
    }
    let most = RUNNING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(r, ..)| *r == run)
        .map(|(_, _, most)| *most);
    assert_eq!(most, Some(1), "never two handlers at once");
    rt.shutdown().await.expect("clean shutdown");
}
