//! Section 8: the cost of metrics, recorded spans and spans exported over
//! OTLP.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::time::Duration;

use catga::{Client, Result, command};
use serde::{Deserialize, Serialize};

use crate::measure::*;
use crate::reqreply::{Blob, Echo};

/// [`Echo`] on its own subject, served by the runtime whose metrics are on.
#[command(subject = "bench.echo_metered", reply = Blob)]
#[derive(Serialize, Deserialize, Clone)]
pub struct EchoMetered {
    /// Payload.
    pub data: Cow<'static, str>,
}

#[command(queue_group = "bench")]
async fn echo_metered(e: EchoMetered) -> Result<Blob> {
    Ok(Blob { data: e.data })
}

/// What the bench's tracing layers record (section 8 switches it between
/// measurements): 0 nothing, 2 every span into a fmt sink, 3 every span
/// exported over OTLP.
pub(crate) static TRACING: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Section 8's parent: runs an OTLP collector over TLS (it asks for a
/// client certificate, as a hardened collector does) and section 8 in a
/// child process that exports its spans to it.
pub(crate) async fn overhead_exported() {
    let pki = catga_tests::Pki::new(false);
    let (endpoint, bodies) =
        catga_tests::collector::collector(Some(catga_tests::collector::mutual_tls(&pki))).await;
    let path = |n: &str| pki.path(n).display().to_string();
    let out = tokio::process::Command::new(std::env::current_exe().expect("own path"))
        .arg("overhead")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_EXPORTER_OTLP_CERTIFICATE", path("ca.pem"))
        .env("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", path("client.pem"))
        .env("OTEL_EXPORTER_OTLP_CLIENT_KEY", path("client-key.pem"))
        .env_remove("OTEL_SDK_DISABLED")
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .expect("section 8 runs");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let bodies = bodies.lock().expect("bodies");
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    println!(
        "(The collector, in the parent process on the same 2 cores, received {} OTLP requests, {bytes} bytes.)",
        bodies.len()
    );
    println!();
}

/// Section 8: the same request/reply with observability off, with
/// Prometheus metrics on, with metrics plus tracing spans recorded, and
/// with metrics plus spans exported over OTLP/HTTPS.
pub(crate) async fn overhead(duration: Duration, data: &'static str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::{Layer, util::SubscriberInitExt};

    // A subscriber that records every INFO span (the `handle` span of
    // each message with its fields) into a sink when `TRACING` is 2 (the
    // cost of recording, without an exporter's I/O), and exports them
    // over OTLP when it is 3. A dynamic filter is asked per span (a plain
    // `filter_fn` is cached per call site), so switching takes effect at
    // once.
    let recorded = tracing_subscriber::fmt::layer()
        .with_writer(std::io::sink)
        .with_filter(tracing_subscriber::filter::dynamic_filter_fn(|m, _| {
            TRACING.load(Ordering::Relaxed) == 2 && *m.level() <= tracing::Level::INFO
        }));
    let exported = catga::otlp_layer("catga-bench").map(|l| {
        l.with_filter(tracing_subscriber::filter::dynamic_filter_fn(|m, _| {
            TRACING.load(Ordering::Relaxed) == 3 && *m.level() <= tracing::Level::INFO
        }))
    });
    let exporting = exported.is_some();
    let _ = tracing_subscriber::registry()
        .with(recorded)
        .with(exported)
        .try_init();

    let server = catga_tests::NatsServer::start();
    // Metrics are one recorder per process, installed by the first runtime
    // with an HTTP endpoint; a runtime started before that, and warmed up
    // before it, keeps no-op handles: that is the "off" one.
    let off = up(serving(&["reqreply::echo"])
        .nats_url(server.url())
        .instance_id("bench-off")
        .concurrency(1024))
    .await;
    let client = Client::connect(&server.url()).await.expect("client");
    client.send(Echo { data: data.into() }).await.expect("warm-up");
    let on = up(serving(&["overhead::echo_metered"])
        .nats_url(server.url())
        .instance_id("bench-on")
        .concurrency(1024)
        .http_addr("127.0.0.1:0"))
    .await;
    let metrics_addr = on.http_addr();

    println!("## Observability overhead: request/reply with metrics and tracing on vs off");
    println!();
    println!(
        "Off: no metrics recorder for this runtime, spans filtered out. Metrics: the Prometheus recorder of `CATGA_HTTP_ADDR` (per-handler counters, histogram, in-flight gauge). Metrics + spans: also every message's `handle` span recorded by a tracing-subscriber fmt layer into a sink (no exporter). Metrics + export: every `handle` span exported over OTLP/HTTP with TLS and a client certificate (the `otlp` feature's batch exporter) to a collector in another process."
    );
    println!();
    println!(
        "| concurrency | off req/s | metrics req/s | metrics + spans req/s | metrics + export req/s | metrics / off (each round) | metrics + spans / off (each round) | metrics + export / off (each round) | off CPU µs/req | metrics CPU µs/req | metrics + spans CPU µs/req | metrics + export CPU µs/req |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    if !exporting {
        println!("(no OTLP collector named: the export column measures nothing exported)");
    }
    let rounds = rounds();
    for concurrency in [16usize, 64] {
        let mut cells: Vec<[Stats; 4]> = Vec::with_capacity(rounds);
        for round in 0..rounds {
            let mut out: [Option<Stats>; 4] = [None, None, None, None];
            for k in 0..4 {
                let which = (round + k) % 4;
                TRACING.store(
                    match which {
                        2 => 2,
                        3 => 3,
                        _ => 0,
                    },
                    Ordering::Relaxed,
                );
                let c = client.clone();
                let stats = if which == 0 {
                    measure(concurrency, duration, move || {
                        let c = c.clone();
                        async move { c.send(Echo { data: data.into() }).await.is_ok() }
                    })
                    .await
                } else {
                    measure(concurrency, duration, move || {
                        let c = c.clone();
                        async move { c.send(EchoMetered { data: data.into() }).await.is_ok() }
                    })
                    .await
                };
                out[which] = Some(stats);
            }
            TRACING.store(0, Ordering::Relaxed);
            let [Some(o), Some(m), Some(t), Some(x)] = out else {
                unreachable!("four cells")
            };
            cells.push([o, m, t, x]);
        }
        let ratios = |i: usize| -> (f64, String) {
            let all: Vec<f64> = cells
                .iter()
                .map(|c| c[i].throughput() / c[0].throughput())
                .collect();
            let spread = per_round(&all);
            (median(all), spread)
        };
        let (m, m_spread) = ratios(1);
        let (t, t_spread) = ratios(2);
        let (x, x_spread) = ratios(3);
        let rate = |i: usize| median(cells.iter().map(|c| c[i].throughput()).collect());
        let cpu = |i: usize| median(cells.iter().map(|c| c[i].cpu_us_per_op).collect());
        println!(
            "| {concurrency} | {:.0} | {:.0} | {:.0} | {:.0} | {m:.2}x ({m_spread}) | {t:.2}x ({t_spread}) | {x:.2}x ({x_spread}) | {:.1} | {:.1} | {:.1} | {:.1} |",
            rate(0),
            rate(1),
            rate(2),
            rate(3),
            cpu(0),
            cpu(1),
            cpu(2),
            cpu(3),
        );
    }
    println!();
    // The metered runtime did count: read back what /metrics says.
    if let Some(addr) = metrics_addr {
        let (_, body) = tokio::task::spawn_blocking(move || catga_tests::http::get(addr, "/metrics"))
            .await
            .expect("scrape");
        let received = body
            .lines()
            .find(|l| {
                l.starts_with("catga_messages_received_total{handler=\"catga_bench::overhead::echo_metered\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("none");
        println!("(/metrics of the metered runtime: {received} messages received.)");
        println!();
    }
    on.shutdown().await.expect("shutdown");
    off.shutdown().await.expect("shutdown");
}
