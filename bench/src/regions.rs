//! Section 15: two regions on loopback. One NATS server per region
//! (clusters A and B) joined by gateways through a proxy that holds every
//! byte for [`DELAY`] each way, so that a round trip across the regions
//! costs twice that more. Measures a command answered in the caller's
//! region against one answered across the gateway, catga against a raw
//! typed responder in the same place; then the failover: region a's
//! replica process SIGKILLed under load, and how long requests waited
//! until region b answered them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use catga::{Client, Result, command};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::measure::*;
use crate::reqreply::{Blob, serve_typed_echo, typed_request};

/// The one-way delay between the regions.
const DELAY: Duration = Duration::from_millis(10);

/// Answered in region a (the caller's).
#[command(subject = "bench.here", reply = Blob)]
#[derive(Serialize, Deserialize, Clone)]
pub struct HereEcho {
    /// Payload.
    pub data: std::borrow::Cow<'static, str>,
}

/// Answered in region b only: across the gateway.
#[command(subject = "bench.there", reply = Blob)]
#[derive(Serialize, Deserialize, Clone)]
pub struct ThereEcho {
    /// Payload.
    pub data: std::borrow::Cow<'static, str>,
}

#[command(queue_group = "bench")]
async fn here_echo(e: HereEcho) -> Result<Blob> {
    Ok(Blob { data: e.data })
}

#[command(queue_group = "bench")]
async fn there_echo(e: ThereEcho) -> Result<Blob> {
    Ok(Blob { data: e.data })
}

/// Forwards each connection to `listener` to port `to`, every chunk held
/// for `delay` in each direction (in order, throughput unbounded).
async fn delaying_proxy(listener: TcpListener, to: u16, delay: Duration) {
    while let Ok((inbound, _)) = listener.accept().await {
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(("127.0.0.1", to)).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::spawn(delayed_pipe(ri, wo, delay));
            tokio::spawn(delayed_pipe(ro, wi, delay));
        });
    }
}

async fn delayed_pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0
            || tx
                .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
        {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Two regions joined by gateways through delaying proxies; returns once
/// the gateways are up.
async fn two_regions() -> (catga_tests::NatsServer, catga_tests::NatsServer) {
    let base = catga_tests::servers::free_port_range(6);
    let (ga, gb, ra, rb, pa, pb) = (base + 1, base + 2, base + 3, base + 4, base + 5, base + 6);
    // Each server is reached by the other through its proxy, and says so
    // to the other (`advertise`), so that no gateway connection skips it.
    for (proxy, to) in [(pa, ga), (pb, gb)] {
        let listener = TcpListener::bind(("127.0.0.1", proxy)).await.expect("proxy port");
        tokio::spawn(delaying_proxy(listener, to, DELAY));
    }
    let region = |name: &str, route: u16, port: u16, proxy: u16, other: &str, other_proxy: u16| {
        format!(
            "server_name: {name}\ncluster {{ name: {name}, host: 127.0.0.1, port: {route}, routes: \
             [\"nats://127.0.0.1:{route}\"] }}\ngateway {{ name: {name}, host: 127.0.0.1, port: {port}, \
             advertise: \"127.0.0.1:{proxy}\", gateways: [ {{ name: {other}, url: \
             \"nats://127.0.0.1:{other_proxy}\" }} ] }}\n"
        )
    };
    let (config_a, config_b) = (region("A", ra, ga, pa, "B", pb), region("B", rb, gb, pb, "A", pa));
    let starting_a = std::thread::spawn(move || catga_tests::NatsServer::start_with(&config_a));
    let b = catga_tests::NatsServer::start_with(&config_b);
    let a = starting_a.join().expect("server A");
    let until = Instant::now() + Duration::from_secs(30);
    while !(a.log().contains("Outbound gateway connection to \"B\"")
        && b.log().contains("Outbound gateway connection to \"A\""))
    {
        assert!(Instant::now() < until, "the gateways did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (a, b)
}

/// A raw typed responder (decodes `Echo`, encodes `Blob`) on `subject`.
async fn raw_responder(url: &str, subject: &'static str) -> async_nats::Client {
    let nats = async_nats::connect(url).await.expect("raw responder");
    serve_typed_echo(&nats, subject).await;
    nats.flush().await.expect("flush");
    nats
}

pub(crate) async fn regions(duration: Duration, data: &'static str) {
    let (a, b) = two_regions().await;
    let _here = up(serving(&["regions::here_echo"])
        .nats_url(a.url())
        .service("bench-here")
        .instance_id("here")
        .concurrency(1024))
    .await;
    let _there = up(serving(&["regions::there_echo"])
        .nats_url(b.url())
        .service("bench-there")
        .instance_id("there")
        .concurrency(1024))
    .await;
    let _raw_here = raw_responder(&a.url(), "raw.here").await;
    let _raw_there = raw_responder(&b.url(), "raw.there").await;
    // Every caller is in region a.
    let client = Client::connect(&a.url()).await.expect("client");
    let raw = async_nats::connect(a.url()).await.expect("raw requester");
    // The queue subscriptions of b reach a across the gateway.
    let until = Instant::now() + Duration::from_secs(10);
    while !(client.send(ThereEcho { data: data.into() }).await.is_ok()
        && typed_request(raw.clone(), "raw.there", data).await)
    {
        assert!(Instant::now() < until, "region b does not answer region a");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    println!("## Two regions: answered in the caller's region vs across the gateway");
    println!();
    println!(
        "Two NATS servers (clusters A and B) joined by gateways through a proxy that holds every byte {} ms each way; every caller in region a. \"here\": the responder in a; \"there\": the responder in b only. catga `Client::send` to a `#[command]` vs a raw typed async-nats responder, in the same place, same payload.",
        DELAY.as_millis()
    );
    println!();
    println!(
        "| concurrency | answered | raw typed req/s | catga req/s | catga / raw (each round) | raw p50 µs | catga p50 µs | raw p99 µs | catga p99 µs | errors |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for concurrency in [1usize, 16] {
        for there in [false, true] {
            let mut cells: Vec<[Stats; 2]> = Vec::new();
            for round in 0..rounds() {
                let mut out: [Option<Stats>; 2] = [None, None];
                for k in 0..2 {
                    let which = (round + k) % 2;
                    let stats = if which == 0 {
                        let (c, subject) = (raw.clone(), if there { "raw.there" } else { "raw.here" });
                        measure(concurrency, duration, move || {
                            typed_request(c.clone(), subject, data)
                        })
                        .await
                    } else {
                        let c = client.clone();
                        measure(concurrency, duration, move || {
                            let c = c.clone();
                            async move {
                                if there {
                                    c.send(ThereEcho { data: data.into() }).await.is_ok()
                                } else {
                                    c.send(HereEcho { data: data.into() }).await.is_ok()
                                }
                            }
                        })
                        .await
                    };
                    out[which] = Some(stats);
                }
                let [Some(r), Some(c)] = out else {
                    unreachable!("two cells")
                };
                cells.push([r, c]);
            }
            let ratios: Vec<f64> = cells
                .iter()
                .map(|[r, c]| c.throughput() / r.throughput())
                .collect();
            let mid_ratio = median(ratios.clone());
            let [r, c] = cells
                .iter()
                .min_by(|x, y| {
                    let dx = (x[1].throughput() / x[0].throughput() - mid_ratio).abs();
                    let dy = (y[1].throughput() / y[0].throughput() - mid_ratio).abs();
                    dx.total_cmp(&dy)
                })
                .expect("a round");
            println!(
                "| {concurrency} | {} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
                if there { "there (b)" } else { "here (a)" },
                r.throughput(),
                c.throughput(),
                ratio_cell(ratios),
                r.p50_us,
                c.p50_us,
                r.p99_us,
                c.p99_us,
                r.errors + c.errors,
            );
        }
    }
    println!();
    failover(&a, &b).await;
}

/// Region a's replica process SIGKILLed while 8 callers in a send `IoWork`
/// (2 ms of waiting each); region b's replica takes over.
async fn failover(a: &catga_tests::NatsServer, b: &catga_tests::NatsServer) {
    use crate::cluster::{IoWork, Replica};

    let timeout = Duration::from_secs(1);
    let there = Replica::spawn_with("b1", "io", &b.url(), None, 64);
    let here = Replica::spawn_with("a1", "io", &a.url(), None, 64);
    let mut config = catga::Config::default();
    config.nats_url = Some(a.url());
    config.request_timeout = timeout;
    let client = Client::connect_with(&config).await.expect("client");
    let stop = Arc::new(AtomicBool::new(false));
    let mut lanes = tokio::task::JoinSet::new();
    for lane in 0..8u64 {
        let (client, stop) = (client.clone(), Arc::clone(&stop));
        lanes.spawn(async move {
            let mut out = Vec::new();
            let mut n = lane;
            while !stop.load(Ordering::Relaxed) {
                n += 8;
                let sent = Instant::now();
                let ok = client.send(IoWork { n }).await.is_ok();
                out.push((sent, Instant::now(), ok));
            }
            out
        });
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(here);
    let killed = Instant::now();
    // The callers above all wait on a request the kill lost, for its
    // time-out: a request every 10 ms, each on its own, shows what one
    // sent in that second meets.
    let mut probes = tokio::task::JoinSet::new();
    for n in 0..100u64 {
        let client = client.clone();
        probes.spawn(async move {
            let sent = Instant::now();
            let ok = client.send(IoWork { n }).await.is_ok();
            (sent, Instant::now(), ok)
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    while let Some(lane) = lanes.join_next().await {
        all.extend(lane.expect("lane"));
    }
    let mut probed = Vec::new();
    while let Some(probe) = probes.join_next().await {
        probed.push(probe.expect("probe"));
    }
    drop(there);
    let probe_failed = probed.iter().filter(|(_, _, ok)| !ok).count();
    let probe_waits: Vec<f64> = probed
        .iter()
        .filter(|(_, _, ok)| *ok)
        .map(|(sent, done, _)| done.duration_since(*sent).as_secs_f64() * 1e3)
        .collect();
    let probe_worst = probe_waits.iter().copied().fold(0.0, f64::max);
    let before: Vec<f64> = all
        .iter()
        .filter(|(sent, done, ok)| *ok && *done < killed && *sent > killed - Duration::from_secs(1))
        .map(|(sent, done, _)| done.duration_since(*sent).as_secs_f64() * 1e3)
        .collect();
    let in_flight: Vec<_> = all
        .iter()
        .filter(|(sent, done, _)| *sent <= killed && *done > killed)
        .collect();
    let failed_in_flight = in_flight.iter().filter(|(_, _, ok)| !ok).count();
    let after: Vec<_> = all.iter().filter(|(sent, _, _)| *sent > killed).collect();
    let failed_after = after.iter().filter(|(_, _, ok)| !ok).count();
    let first_answered = after
        .iter()
        .filter(|(_, _, ok)| *ok)
        .map(|(_, done, _)| done.duration_since(killed))
        .min()
        .unwrap_or_default();
    let waits: Vec<f64> = after
        .iter()
        .filter(|(_, _, ok)| *ok)
        .map(|(sent, done, _)| done.duration_since(*sent).as_secs_f64() * 1e3)
        .collect();
    let worst_after = waits.iter().copied().fold(0.0, f64::max);
    println!("### Failover to the other region");
    println!();
    println!(
        "One replica process per region (`IoWork`: 2 ms of waiting), 8 callers in region a, request time-out {} ms; a's replica SIGKILLed after 2 s, 3 s more measured; from the kill on, one more request every 10 ms for a second, each on its own.",
        timeout.as_millis()
    );
    println!();
    println!("| | value |");
    println!("|---|---:|");
    println!(
        "| latency before the kill (answered in a), median ms | {:.1} |",
        median(before)
    );
    println!(
        "| requests in flight at the kill / failed (their time-out) | {} / {} |",
        in_flight.len(),
        failed_in_flight
    );
    println!(
        "| requests sent after the kill / failed | {} / {} |",
        after.len(),
        failed_after
    );
    println!(
        "| first answer after the kill to a caller above (its lost request timed out first), ms after the kill | {:.1} |",
        first_answered.as_secs_f64() * 1e3
    );
    println!(
        "| requests sent one by one every 10 ms in the first second after the kill / failed | {} / {} |",
        probed.len(),
        probe_failed
    );
    println!(
        "| their latency (answered in b), median / worst ms | {:.1} / {:.1} |",
        median(probe_waits),
        probe_worst
    );
    println!(
        "| latency after the kill (answered in b), median / worst ms | {:.1} / {:.1} |",
        median(waits),
        worst_after
    );
    println!();
}
