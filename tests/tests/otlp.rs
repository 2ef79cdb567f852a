//! Spans exported to an OpenTelemetry collector (the `otlp` feature),
//! against a real nats-server and a collector that records what it is
//! sent over OTLP/HTTP: a command two hops deep reads as one trace, with
//! the client's trace as its root when it set one, and as a trace of its
//! own when it did not.
//!
//! The exporter is configured by the environment at start-up, so the
//! scenario runs in a child process (this test binary again) started with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at the collector.

use std::io::Write as _;
use std::sync::Mutex;
use std::time::Duration;

use catga::{Context, Result, TraceParent, command};
use catga_tests::Backend;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde::{Deserialize, Serialize};

/// First hop: asks [`Back`].
#[command(reply = String, subject = "tests.otlp.front")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Front {}

/// Second hop.
#[command(reply = String, subject = "tests.otlp.back")]
#[derive(Serialize, Deserialize, Debug)]
pub struct Back {}

#[command]
async fn front(ctx: &Context, _f: Front) -> Result<String> {
    ctx.send(Back {}).await
}

#[command]
async fn back(_b: Back) -> Result<String> {
    Ok("back".to_owned())
}

const CHILD: &str = "CATGA_OTLP_CHILD";

/// The scenario, in the child: prints the trace the client set.
async fn child() {
    catga::init_telemetry("otlp-tests");
    let b = Backend::nats();
    let rt = b.runtime(module_path!(), "r1").await;
    let client = b.client().await;
    let root = TraceParent::new_root();
    root.scope(client.send(Front {})).await.expect("traced");
    client.send(Front {}).await.expect("untraced");
    rt.shutdown().await.expect("clean shutdown");
    println!("ROOT {} {}", root.trace_id(), root.parent_id());
    std::io::stdout().flush().expect("flush");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(span: &Span, key: &str) -> String {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            other => format!("{other:?}"),
        })
        .unwrap_or_default()
}

/// Runs `test` again in a child process with `env` (the scenario), and
/// returns its standard output.
async fn run_child(test: &str, env: &[(&str, &str)]) -> String {
    let exe = std::env::current_exe().expect("own path");
    let mut command = tokio::process::Command::new(exe);
    command
        .args([test, "--exact", "--nocapture"])
        .env(CHILD, "1")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("OTEL_SDK_DISABLED")
        .env("RUST_LOG", "info");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("the child ends")
        .expect("the child runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The `handle` spans the collector received, with their service names.
fn handle_spans(bodies: &Mutex<Vec<Vec<u8>>>) -> Vec<(String, Span)> {
    let mut spans: Vec<(String, Span)> = Vec::new();
    for body in bodies.lock().expect("bodies").iter() {
        let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("an OTLP protobuf request");
        for rs in req.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans.into_iter().filter(|s| s.name == "handle") {
                    spans.push((service.clone(), s));
                }
            }
        }
    }
    spans
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_as_one_trace() {
    if std::env::var_os(CHILD).is_some() {
        return child().await;
    }
    let (endpoint, bodies) = catga_tests::collector::collector(None).await;
    let stdout = run_child(
        "spans_reach_the_collector_as_one_trace",
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)],
    )
    .await;
    let (root_trace, root_parent) = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ROOT "))
        .and_then(|l| l.split_once(' '))
        .map(|(t, p)| (t.to_owned(), p.to_owned()))
        .expect("the child's root trace");
    let spans = handle_spans(&bodies);
    assert!(
        spans.iter().all(|(service, _)| service == "otlp-tests"),
        "named after the service"
    );
    let find = |subject: &str, in_root: bool| -> Span {
        spans
            .iter()
            .map(|(_, s)| s)
            .find(|s| attribute(s, "subject") == subject && (hex(&s.trace_id) == root_trace) == in_root)
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "no `handle` span of {subject} (in the client's trace: {in_root}) among {} spans",
                    spans.len()
                )
            })
    };
    // The client's trace: front is the child of the client's span, back
    // the child of front's span.
    let front = find("tests.otlp.front", true);
    let back = find("tests.otlp.back", true);
    assert_eq!(hex(&front.parent_span_id), root_parent);
    assert_eq!(back.parent_span_id, front.span_id, "back is front's child");
    assert_eq!(attribute(&front, "handler"), "otlp::front");
    // No trace set: front starts one, back joins it.
    let front = find("tests.otlp.front", false);
    let back = find("tests.otlp.back", false);
    assert!(front.parent_span_id.is_empty(), "a root span");
    assert_eq!(back.trace_id, front.trace_id, "one trace");
    assert_eq!(back.parent_span_id, front.span_id, "back is front's child");
}

/// An `https://` collector that asks for a client certificate: the spans
/// reach it with the CA and the client certificate of the standard
/// variables; without the client certificate the handshake is refused
/// and nothing arrives, and without the CA the collector is not trusted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_https_collector_with_mutual_tls() {
    if std::env::var_os(CHILD).is_some() {
        return child().await;
    }
    let pki = catga_tests::Pki::new(false);
    let path = |n: &str| pki.path(n).display().to_string();
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client-key.pem"));
    let (endpoint, bodies) =
        catga_tests::collector::collector(Some(catga_tests::collector::mutual_tls(&pki))).await;
    assert!(endpoint.starts_with("https://"));
    let test = "spans_reach_an_https_collector_with_mutual_tls";
    run_child(
        test,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", &key),
        ],
    )
    .await;
    let spans = handle_spans(&bodies);
    for subject in ["tests.otlp.front", "tests.otlp.back"] {
        assert!(
            spans.iter().any(|(_, s)| attribute(s, "subject") == subject),
            "no `handle` span of {subject} among {} spans",
            spans.len()
        );
    }

    let (endpoint, bodies) =
        catga_tests::collector::collector(Some(catga_tests::collector::mutual_tls(&pki))).await;
    run_child(
        test,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
        ],
    )
    .await;
    assert!(
        bodies.lock().expect("bodies").is_empty(),
        "no client certificate, no spans"
    );

    // The collector's certificate is checked: without its CA (only the
    // system's roots), nothing is sent to it.
    let (endpoint, bodies) =
        catga_tests::collector::collector(Some(catga_tests::collector::mutual_tls(&pki))).await;
    run_child(
        test,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", &cert),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", &key),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
        ],
    )
    .await;
    assert!(
        bodies.lock().expect("bodies").is_empty(),
        "an untrusted collector gets no spans"
    );
}
