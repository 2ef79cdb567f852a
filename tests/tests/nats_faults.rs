//! Broker faults and wire compatibility over a real nats-server.

use std::time::Duration;

use bytes::Bytes;
use catga::{Context, Error, Result, command};
use catga_tests::{Backend, NatsServer};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

mod echo {
    use super::*;

    /// Echoes its text back with the replica that answered.
    #[command(reply = Echoed)]
    #[derive(Serialize, Deserialize, Debug)]
    pub struct Echo {
        pub text: String,
    }

    #[derive(Serialize, Deserialize, Debug)]
    pub struct Echoed {
        pub text: String,
        pub instance: String,
    }

    #[command(queue_group = "echo")]
    async fn echo(ctx: &Context, cmd: Echo) -> Result<Echoed> {
        Ok(Echoed {
            text: cmd.text,
            instance: ctx.instance_id().to_owned(),
        })
    }
}

mod faults {
    use super::*;

    /// Fails the way `mode` says.
    #[command(reply = u32)]
    #[derive(Serialize, Deserialize, Debug)]
    pub struct Fail {
        pub mode: String,
    }

    #[command]
    async fn fail(f: Fail) -> Result<u32> {
        match f.mode.as_str() {
            "ok" => Ok(7),
            "not_found" => Err(Error::not_found("no such thing")),
            _ => Err(Error::msg("generic failure")),
        }
    }
}

/// Sends until it succeeds or `within` passes; returns the last error.
async fn send_until_ok(client: &catga::Client, within: Duration) -> Result<echo::Echoed, catga::Error> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let r = client
            .send_with_timeout(echo::Echo { text: "again".into() }, Duration::from_millis(500))
            .await;
        match r {
            Ok(v) => return Ok(v),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(e) => {
                assert!(
                    e.is_retryable(),
                    "only transient errors while the broker is away: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_while_nats_is_down_then_serves_when_it_comes_up() {
    let mut server = NatsServer::reserve();
    let rt = catga::Runtime::builder()
        .nats_url(server.url())
        .instance_id("early")
        .handlers(|s| s.name().starts_with("nats_faults::echo::"))
        .start()
        .await
        .expect("start-up does not fail while NATS is down");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!rt.is_ready(), "not ready without a broker");

    server.resume();
    catga_tests::ready_within(&rt, Duration::from_secs(15)).await;
    assert!(rt.is_ready());
    let backend = Backend::Nats(server, catga_tests::RedisServer::start());
    let client = backend.client().await;
    let r = send_until_ok(&client, Duration::from_secs(10))
        .await
        .expect("served");
    assert_eq!(r.instance, "early");
    rt.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_mid_run_and_the_runtime_recovers() {
    let backend = Backend::nats();
    let rt = backend.runtime("nats_faults::echo", "survivor").await;
    let client = backend.client().await;
    send_until_ok(&client, Duration::from_secs(5))
        .await
        .expect("served before the crash");

    let Backend::Nats(mut server, _redis) = backend else {
        unreachable!("nats backend")
    };
    server.kill();
    let err = client
        .send_with_timeout(echo::Echo { text: "lost".into() }, Duration::from_millis(500))
        .await
        .expect_err("the broker is down");
    assert!(err.is_retryable(), "a broker outage is retryable: {err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!rt.is_ready(), "not ready while disconnected");

    server.resume();
    let r = send_until_ok(&client, Duration::from_secs(20))
        .await
        .expect("served again after the broker came back");
    assert_eq!(r.instance, "survivor");
    assert!(rt.is_ready(), "ready again");
    rt.shutdown().await.expect("clean shutdown");
}

/// Error replies follow the NATS micro convention, so plain NATS clients
/// (and `nats req`) understand them; plain clients without catga headers
/// are served too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_format_is_plain_nats() {
    let backend = Backend::nats();
    let rt = backend.runtime("nats_faults::faults", "r1").await;
    let Backend::Nats(server, _) = &backend else {
        unreachable!("nats backend")
    };
    let nats = async_nats::connect(server.url()).await.expect("raw client");

    let ok = nats
        .request("cmd.fail", Bytes::from_static(br#"{"mode":"ok"}"#))
        .await
        .expect("reply");
    assert_eq!(&ok.payload[..], b"7");
    assert!(ok.headers.is_none(), "a success reply carries no error headers");

    let err = nats
        .request("cmd.fail", Bytes::from_static(br#"{"mode":"not_found"}"#))
        .await
        .expect("reply");
    let h = err.headers.expect("error headers");
    assert_eq!(h.get("Nats-Service-Error-Code").map(|v| v.as_str()), Some("404"));
    assert_eq!(
        h.get("Nats-Service-Error").map(|v| v.as_str()),
        Some("no such thing")
    );
    assert_eq!(h.get("Catga-Error-Kind").map(|v| v.as_str()), Some("not_found"));

    let bad = nats
        .request("cmd.fail", Bytes::from_static(b"\xff\xfe"))
        .await
        .expect("reply");
    let h = bad.headers.expect("error headers");
    assert_eq!(h.get("Nats-Service-Error-Code").map(|v| v.as_str()), Some("400"));
    assert!(
        h.get("Nats-Service-Error")
            .is_some_and(|v| v.as_str().contains("cannot decode payload as `Fail`")),
        "{h:?}"
    );

    // An id that cannot be used is refused on arrival, with a 400 that
    // says why; the handler does not run.
    for (header, bad) in [
        ("Nats-Msg-Id", "x".repeat(257)),
        ("Nats-Msg-Id", "x".repeat(10_000)),
        ("Nats-Msg-Id", "a\u{7f}b".to_owned()),
        // Copied onto all the handler sends and saves: limited as ids are.
        ("Catga-Correlation-Id", "x".repeat(70_000)),
    ] {
        let mut h = async_nats::HeaderMap::new();
        h.insert(header, bad.as_str());
        let refused = nats
            .request_with_headers("cmd.fail", h, Bytes::from_static(br#"{"mode":"ok"}"#))
            .await
            .expect("reply");
        let h = refused.headers.expect("error headers");
        assert_eq!(h.get("Nats-Service-Error-Code").map(|v| v.as_str()), Some("400"));
        assert!(
            h.get("Nats-Service-Error")
                .is_some_and(|v| v.as_str().contains("cannot be used")),
            "{h:?}"
        );
    }

    let mut newer = async_nats::HeaderMap::new();
    newer.insert("Catga-Version", "9");
    let future = nats
        .request_with_headers("cmd.fail", newer, Bytes::from_static(br#"{"mode":"ok"}"#))
        .await
        .expect("reply");
    let h = future.headers.expect("error headers");
    assert_eq!(h.get("Nats-Service-Error-Code").map(|v| v.as_str()), Some("400"));
    assert!(
        h.get("Nats-Service-Error")
            .is_some_and(|v| v.as_str().contains("unknown version \"9\" of `Fail`")
                && !v.as_str().contains("nats_faults::")),
        "{h:?}"
    );
    rt.shutdown().await.expect("clean shutdown");
}

/// A URL that cannot be parsed is a configuration error at start-up, and the
/// error does not repeat the credentials in it.
#[tokio::test]
async fn invalid_nats_url_is_a_config_error_without_credentials() {
    let err = catga::Runtime::builder()
        .nats_url("nats://app:s3cret@127.0.0.1:not-a-port")
        .client_only()
        .start()
        .await
        .expect_err("unparsable URL");
    assert_eq!(err.kind(), catga::ErrorKind::Config, "{err}");
    assert!(!err.to_string().contains("s3cret"), "{err}");
    assert!(err.to_string().contains("***"), "{err}");
}

/// Sends raw protocol lines to the server over TCP, as a hostile or broken
/// client would, and returns what the server answered.
fn raw_nats(url: &str, frames: &[&[u8]]) -> String {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("nats://");
    let mut s = std::net::TcpStream::connect(addr).expect("tcp connect");
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let mut buf = vec![0u8; 4096];
    let _ = s.read(&mut buf); // INFO
    s.write_all(
        b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"protocol\":1}\r\nPING\r\n",
    )
    .expect("connect");
    for f in frames {
        s.write_all(f).expect("frame");
    }
    s.write_all(b"PING\r\n").expect("ping");
    std::thread::sleep(Duration::from_millis(300));
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// An HPUB whose header block is malformed, to a command subject.
fn hpub(subject: &str, header_block: &[u8]) -> Vec<u8> {
    let payload = b"{\"text\":\"x\"}";
    let mut frame = format!(
        "HPUB {subject} {} {}\r\n",
        header_block.len(),
        header_block.len() + payload.len()
    )
    .into_bytes();
    frame.extend_from_slice(header_block);
    frame.extend_from_slice(payload);
    frame.extend_from_slice(b"\r\n");
    frame
}

/// Malformed headers from the wire must never leave a replica that reports
/// ready but answers nothing: after each frame, it either still answers
/// commands, or it is not ready and its `run` ends with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_headers_never_leave_a_deaf_ready_replica() {
    let backend = Backend::nats();
    let Backend::Nats(server, _) = &backend else {
        unreachable!("nats backend")
    };
    let url = server.url();
    let rt = backend.runtime("nats_faults::echo", "target").await;
    let client = backend.client().await;
    let blocks: [&[u8]; 4] = [
        b"NATS/1.0\r\nX-Bad: a\rb\r\n\r\n",
        b"NATS/1.0\r\nX-Bad: \xff\xfe\r\n\r\n",
        b"NATS/1.0\r\nno colon here\r\n\r\n",
        b"NATS/1.0\r\n: empty name\r\n\r\n",
    ];
    for block in blocks {
        let frame = hpub("cmd.echo", block);
        let url2 = url.clone();
        let answered = tokio::task::spawn_blocking(move || raw_nats(&url2, &[&frame]))
            .await
            .expect("raw client");
        eprintln!("server answered the raw client: {answered:?}");
        // Give the replica time to notice and recover.
        tokio::time::sleep(Duration::from_millis(500)).await;
        match send_until_ok(&client, Duration::from_secs(5)).await {
            Ok(r) => assert_eq!(r.instance, "target"),
            Err(e) => {
                assert!(
                    !rt.is_ready(),
                    "the replica answers nothing ({e}) yet reports ready after {:?}",
                    String::from_utf8_lossy(block)
                );
                assert!(
                    rt.fatal_error().is_some(),
                    "a deaf replica must stop with an error"
                );
                return;
            }
        }
    }
    assert!(rt.is_ready());
    rt.shutdown().await.expect("clean shutdown");
}

mod stale {
    use super::*;

    /// Records that it ran.
    #[command]
    #[derive(Serialize, Deserialize, Debug)]
    pub struct Mark {
        pub run: String,
    }

    pub static MARKED: catga_tests::Recorder = catga_tests::Recorder::new();

    #[command]
    async fn mark(ctx: &Context, m: Mark) -> Result<()> {
        MARKED.record(&m.run, "mark", ctx, 0);
        Ok(())
    }
}

/// `NATS_URL` with several servers: a dead one first does not keep the
/// runtime from the live one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_comma_separated_url_is_tried() {
    let live = NatsServer::start();
    let dead = format!("nats://127.0.0.1:{}", catga_tests::servers::free_port());
    let rt = catga::Runtime::builder()
        .nats_url(format!("{dead},{}", live.url()))
        .handlers(|s| s.name().starts_with("nats_faults::echo::"))
        .start()
        .await
        .expect("starts");
    catga_tests::ready_within(&rt, Duration::from_secs(15)).await;
    let backend = Backend::Nats(live, catga_tests::RedisServer::start());
    let client = backend.client().await;
    let served = send_until_ok(&client, Duration::from_secs(5)).await;
    assert_eq!(
        served.map(|r| r.text).map_err(|e| e.to_string()),
        Ok("again".to_owned())
    );
    rt.shutdown().await.expect("clean shutdown");
}

/// A subscription the server refuses (permissions) stops the runtime with
/// an error naming the subject, instead of a ready replica that hears
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_stops_the_runtime() {
    let server = NatsServer::start_with(
        r#"
        authorization {
          users = [
            { user: "svc", password: "unused",
              permissions: { publish: ">", subscribe: { allow: ">", deny: "cmd.echo" } } }
          ]
        }
        no_auth_user: "svc"
        "#,
    );
    let rt = catga::Runtime::builder()
        .nats_url(server.url())
        .handlers(|s| s.name().starts_with("nats_faults::echo::"))
        .start()
        .await
        .expect("start-up itself succeeds");
    let err = tokio::time::timeout(Duration::from_secs(10), rt.ready())
        .await
        .expect("decided within 10 s")
        .expect_err("never ready");
    assert_eq!(err.kind(), catga::ErrorKind::Config, "{err}");
    assert!(err.message().contains("\"cmd.echo\""), "names the subject: {err}");
    assert!(!rt.is_ready());
    assert!(rt.fatal_error().is_some());
    let _ = rt.shutdown().await;
}

/// A request whose sender gave up is not run later: the server is frozen
/// while the request is in its socket; when it wakes, the request reaches
/// the replica past its deadline and is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_timed_out_is_not_run_later() {
    let backend = Backend::nats();
    let rt = backend.runtime("nats_faults::stale", "r1").await;
    let client = backend
        .client()
        .await
        .with_request_timeout(Duration::from_millis(500));
    let fresh = catga_tests::run_id();
    client
        .send(stale::Mark { run: fresh.clone() })
        .await
        .expect("served while all is well");
    let Backend::Nats(server, _) = &backend else {
        unreachable!("nats backend")
    };
    server.pause();
    let run = catga_tests::run_id();
    let started = std::time::Instant::now();
    let err = client
        .send(stale::Mark { run: run.clone() })
        .await
        .expect_err("frozen server");
    assert!(err.is_retryable(), "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "returned in about its time-out"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.unpause();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        stale::MARKED.of(&run).is_empty(),
        "the stale request must not run"
    );
    assert!(rt.expired_requests() >= 1, "it arrived and was dropped");
    client
        .send(stale::Mark { run: fresh })
        .await
        .expect("served again");
    rt.shutdown().await.expect("clean shutdown");
}

/// While the broker is away, sends and publishes return within their
/// time-out with a retryable error (nothing queues up to be sent later),
/// and once it is back, nothing from the outage reaches a handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_and_publishes_return_in_time_during_an_outage() {
    let mut backend = Backend::nats();
    let rt = backend.runtime("nats_faults::stale", "r1").await;
    let client = backend
        .client()
        .await
        .with_request_timeout(Duration::from_millis(500));
    backend.nats_server().expect("nats").kill();
    let run = catga_tests::run_id();
    let started = std::time::Instant::now();
    let publishes =
        futures_util::future::join_all((0..2000).map(|_| client.publish_raw("tests.outage", Bytes::new())))
            .await;
    assert!(
        publishes.iter().all(|r| matches!(r, Err(e) if e.is_retryable())),
        "every publish fails, retryably"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "2000 publishes in about 500 ms: {:?}",
        started.elapsed()
    );
    let started = std::time::Instant::now();
    let err = client
        .send(stale::Mark { run: run.clone() })
        .await
        .expect_err("broker away");
    assert!(err.is_retryable(), "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "about its 500 ms time-out: {:?}",
        started.elapsed()
    );
    backend.nats_server().expect("nats").resume();
    catga_tests::ready_within(&rt, Duration::from_secs(20)).await;
    let fresh = catga_tests::run_id();
    let client = client.with_request_timeout(Duration::from_secs(5));
    send_until(&client, &fresh).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(stale::MARKED.of(&run).is_empty(), "nothing from the outage ran");
    rt.shutdown().await.expect("clean shutdown");
}

async fn send_until(client: &catga::Client, run: &str) {
    for _ in 0..50 {
        if client.send(stale::Mark { run: run.to_owned() }).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("never served after the broker came back");
}

/// Shutdown with the broker gone is bounded by the drain deadline too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_the_broker_gone_is_bounded() {
    let mut backend = Backend::nats();
    let rt = backend
        .started(
            backend
                .builder("nats_faults::echo", "r1")
                .drain_timeout(Duration::from_millis(500)),
        )
        .await;
    backend.nats_server().expect("nats").kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let _ = rt.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "500 ms deadline plus at most the bounded flush: {:?}",
        started.elapsed()
    );
}

/// Requests that are never answered leave nothing behind in the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_requests_leave_nothing_behind() {
    let backend = Backend::nats();
    let Backend::Nats(server, _) = &backend else {
        unreachable!("nats backend")
    };
    // Takes every request and never answers.
    let nats = async_nats::connect(server.url()).await.expect("raw client");
    let mut sink = nats.subscribe("tests.black_hole").await.expect("sub");
    let drained = tokio::spawn(async move { while sink.next().await.is_some() {} });
    nats.flush().await.expect("flush");
    let client = backend
        .client()
        .await
        .with_request_timeout(Duration::from_millis(200));
    let results =
        futures_util::future::join_all((0..3000).map(|_| client.send_raw("tests.black_hole", Bytes::new())))
            .await;
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(e) if e.kind() == catga::ErrorKind::Timeout))
    );
    assert_eq!(
        client.requests_in_flight(),
        0,
        "every timed-out request left the pending map"
    );
    drained.abort();
}

/// Error replies of a plain NATS micro service map to the right kinds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn micro_service_errors_map_to_kinds() {
    use async_nats::service::ServiceExt;
    let backend = Backend::nats();
    let Backend::Nats(server, _) = &backend else {
        unreachable!("nats backend")
    };
    let nats = async_nats::connect(server.url()).await.expect("raw client");
    let service = nats
        .service_builder()
        .start("plain", "1.0.0")
        .await
        .expect("micro service");
    let mut endpoint = service.endpoint("plain.lookup").await.expect("endpoint");
    tokio::spawn(async move {
        while let Some(req) = endpoint.next().await {
            let (code, status) = match &req.message.payload[..] {
                b"missing" => (404, "no such item"),
                b"bad" => (400, "bad input"),
                b"busy" => (503, "try later"),
                _ => (500, "exploded"),
            };
            let _ = req
                .respond(Err(async_nats::service::error::Error {
                    code,
                    status: status.into(),
                }))
                .await;
        }
    });
    nats.flush().await.expect("flush");
    let client = backend.client().await;
    for (body, kind, text) in [
        ("missing", catga::ErrorKind::NotFound, "no such item"),
        ("bad", catga::ErrorKind::Invalid, "bad input"),
        ("busy", catga::ErrorKind::Unavailable, "try later"),
        ("boom", catga::ErrorKind::Handler, "exploded"),
    ] {
        let err = client
            .send_raw("plain.lookup", Bytes::from(body))
            .await
            .expect_err("an error reply");
        assert_eq!(err.kind(), kind, "{body}: {err}");
        assert_eq!(err.message(), text);
    }
}

mod versions {
    use super::*;

    /// Version 2 of a command.
    #[command(version = 2)]
    #[derive(Serialize, Deserialize, Debug)]
    pub struct Renamed {
        pub name: String,
    }

    /// Version 1.
    #[command]
    #[derive(Serialize, Deserialize, Debug)]
    pub struct Plain;
}

/// `Catga-Version` goes out only above version 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_version_header_is_sent_above_version_1() {
    let backend = Backend::nats();
    let Backend::Nats(server, _) = &backend else {
        unreachable!("nats backend")
    };
    let nats = async_nats::connect(server.url()).await.expect("raw client");
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    for subject in ["cmd.renamed", "cmd.plain"] {
        let mut sub = nats.subscribe(subject).await.expect("sub");
        let (answer, seen_tx) = (nats.clone(), seen_tx.clone());
        tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                let version = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Catga-Version"))
                    .map(|v| v.as_str().to_owned());
                let _ = seen_tx.send((subject, version));
                if let Some(reply) = m.reply {
                    let _ = answer.publish(reply, Bytes::new()).await;
                }
            }
        });
    }
    nats.flush().await.expect("flush");
    let client = backend.client().await;
    client
        .send(versions::Renamed { name: "n".into() })
        .await
        .expect("answered");
    client.send(versions::Plain).await.expect("answered");
    assert_eq!(seen.recv().await, Some(("cmd.renamed", Some("2".to_owned()))));
    assert_eq!(
        seen.recv().await,
        Some(("cmd.plain", None)),
        "no header at version 1"
    );
}
