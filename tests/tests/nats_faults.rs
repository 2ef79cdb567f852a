//! Broker faults and wire compatibility over a real nats-server.

use std::time::Duration;

use bytes::Bytes;
use catga::{Context, Error, Result, command};
use catga_tests::{Backend, NatsServer};
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
    tokio::time::timeout(Duration::from_secs(15), rt.ready())
        .await
        .expect("ready once NATS is up")
        .expect("readiness");
    assert!(rt.is_ready());
    let backend = Backend::Nats(server);
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

    let Backend::Nats(mut server) = backend else {
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
    let Backend::Nats(server) = &backend else {
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
