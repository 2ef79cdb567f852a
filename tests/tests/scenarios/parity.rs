//! The embedded bus and NATS fail alike: one table of faults, each run on
//! both transports, each expecting the same error kind. (A full
//! subscription and a handler cancelled at the shutdown deadline are in
//! `back_pressure` and `shutdown`, also on both.)

use std::time::{Duration, Instant};

use bytes::Bytes;
use catga::{Client, Context, ErrorKind, Result, command, event};
use catga_tests::Backend;
use serde::{Deserialize, Serialize};

/// Replies with `len` bytes of text.
#[command(reply = String)]
#[derive(Serialize, Deserialize, Debug)]
pub struct Inflate {
    pub len: usize,
}

/// Publishes an event carrying `len` bytes of text.
#[command]
#[derive(Serialize, Deserialize, Debug)]
pub struct Announce {
    pub len: usize,
}

/// A large event.
#[event(subject = "tests.parity.announced")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Announced {
    pub text: String,
}

/// Accepts anything (a request's size is checked before it is sent).
#[command]
#[derive(Serialize, Deserialize, Debug)]
pub struct Swallow {
    pub text: String,
}

/// Nobody handles it.
#[command(subject = "tests.parity.nobody")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Nobody;

#[command]
async fn inflate(i: Inflate) -> Result<String> {
    Ok("x".repeat(i.len))
}

#[command]
async fn announce(ctx: &Context, a: Announce) -> Result<()> {
    ctx.publish(Announced {
        text: "x".repeat(a.len),
    })
    .await
}

#[command]
async fn swallow(_: Swallow) -> Result<()> {
    Ok(())
}

const MIB: usize = 1024 * 1024;

/// One row: what to do, and the error kind both transports must give.
struct Case {
    name: &'static str,
    expect: ErrorKind,
    retryable: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "request over the payload limit",
        expect: ErrorKind::TooLarge,
        retryable: false,
    },
    Case {
        name: "reply over the payload limit",
        expect: ErrorKind::TooLarge,
        retryable: false,
    },
    Case {
        name: "event from a handler over the limit",
        expect: ErrorKind::TooLarge,
        retryable: false,
    },
    Case {
        name: "send_raw to an _INBOX subject",
        expect: ErrorKind::Invalid,
        retryable: false,
    },
    Case {
        name: "publish_raw to a $ subject",
        expect: ErrorKind::Invalid,
        retryable: false,
    },
    Case {
        name: "send_raw to a wildcard",
        expect: ErrorKind::Invalid,
        retryable: false,
    },
    Case {
        name: "message id with a line break",
        expect: ErrorKind::Invalid,
        retryable: false,
    },
    Case {
        name: "undecodable payload",
        expect: ErrorKind::Decode,
        retryable: false,
    },
    Case {
        name: "no handler",
        expect: ErrorKind::NoHandler,
        retryable: true,
    },
];

async fn run_case(name: &str, client: &Client) -> catga::Error {
    let err = match name {
        "request over the payload limit" => client
            .send(Swallow {
                text: "x".repeat(MIB + 10),
            })
            .await
            .err(),
        "reply over the payload limit" => client.send(Inflate { len: 2 * MIB }).await.err(),
        "event from a handler over the limit" => client.send(Announce { len: MIB + 10 }).await.err(),
        "send_raw to an _INBOX subject" => client.send_raw("_INBOX.abc.1", Bytes::new()).await.err(),
        "publish_raw to a $ subject" => client
            .publish_raw("$SYS.REQ.SERVER.PING", Bytes::new())
            .await
            .err(),
        "send_raw to a wildcard" => client.send_raw("cmd.>", Bytes::new()).await.err(),
        "message id with a line break" => client
            .send_with_id(Swallow { text: "x".into() }, "a\r\nb")
            .await
            .err(),
        "undecodable payload" => client
            .send_raw("cmd.swallow", Bytes::from_static(b"\xff"))
            .await
            .err(),
        "no handler" => client.send(Nobody).await.err(),
        other => panic!("no such case {other}"),
    };
    err.unwrap_or_else(|| panic!("{name}: expected an error"))
}

catga_tests::on_both!(faults_give_the_same_errors_on_both_transports);

async fn faults_give_the_same_errors_on_both_transports(b: &Backend) {
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await.with_request_timeout(Duration::from_secs(10));
    for case in CASES {
        let started = Instant::now();
        let err = run_case(case.name, &client).await;
        assert_eq!(err.kind(), case.expect, "{} on {}: {err}", case.name, b.name());
        assert_eq!(err.is_retryable(), case.retryable, "{}: {err}", case.name);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{} on {}: answered at once, not after the 10 s time-out",
            case.name,
            b.name()
        );
    }
    assert_eq!(
        client.send(Inflate { len: 3 }).await.expect("still serving"),
        "xxx"
    );
    rt.shutdown().await.expect("clean shutdown");
}
