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

catga_tests::on_both!(error_replies, undecodable_payload, undecodable_event_is_skipped);

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
