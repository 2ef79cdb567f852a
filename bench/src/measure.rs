//! What every section measures with: the load loop and its statistics,
//! rounds and medians, the machine, and runtimes serving this crate's
//! handlers.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::ALLOCATIONS;
use catga::Runtime;

pub(crate) struct Stats {
    pub(crate) ops: u64,
    /// CPU time of this process (client and responder, all threads) per
    /// operation, in microseconds: far steadier on a shared machine than
    /// throughput, which other tenants' load moves.
    pub(crate) cpu_us_per_op: f64,
    /// Heap allocations per operation, over the whole process (client and
    /// responder), warm-up included.
    pub(crate) allocs_per_op: f64,
    pub(crate) errors: u64,
    pub(crate) seconds: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
}

impl Stats {
    pub(crate) fn throughput(&self) -> f64 {
        self.ops as f64 / self.seconds
    }
}

/// Runs `op` from `concurrency` tasks for `duration`, after a short warm-up.
pub(crate) async fn measure<F, Fut>(concurrency: usize, duration: Duration, op: F) -> Stats
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let allocs_before = ALLOCATIONS.load(Ordering::Relaxed);
    let cpu_before = process_cpu_seconds();
    let warm_until = Instant::now() + Duration::from_millis(500);
    let until = warm_until + duration;
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let op = Arc::clone(&op);
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(1 << 14);
                let mut errors = 0u64;
                let mut total = 0u64;
                loop {
                    let start = Instant::now();
                    if start >= until {
                        break;
                    }
                    let ok = op().await;
                    total += 1;
                    if start >= warm_until {
                        if ok {
                            lat.push(start.elapsed().as_nanos() as u64);
                        } else {
                            errors += 1;
                        }
                    }
                }
                (lat, errors, total)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    let mut total = 0;
    for t in tasks {
        let (lat, e, n) = t.await.expect("bench task");
        all.extend(lat);
        errors += e;
        total += n;
    }
    let allocs = ALLOCATIONS.load(Ordering::Relaxed) - allocs_before;
    let cpu = process_cpu_seconds() - cpu_before;
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            0.0
        } else {
            all[((all.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    Stats {
        cpu_us_per_op: cpu * 1e6 / total.max(1) as f64,
        ops: all.len() as u64,
        allocs_per_op: allocs as f64 / total.max(1) as f64,
        errors,
        seconds: duration.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

/// Rounds per cell (`BENCH_ROUNDS`, default 3).
pub(crate) fn rounds() -> usize {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
        .max(1)
}

/// Each round's ratio, as the tables print them: `0.91, 0.88, 0.93`.
pub(crate) fn per_round(rs: &[f64]) -> String {
    rs.iter()
        .map(|r| format!("{r:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A table cell of ratios: their median, then each round's.
pub(crate) fn ratio_cell(rs: Vec<f64>) -> String {
    let text = per_round(&rs);
    format!("{:.2}x ({text})", median(rs))
}

/// The median of some ratios.
pub(crate) fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

/// A builder serving only the named handlers of this crate.
pub(crate) fn serving(handlers: &'static [&'static str]) -> catga::RuntimeBuilder {
    Runtime::builder().handlers(move |s| {
        s.name()
            .strip_prefix("catga_bench::")
            .is_some_and(|name| handlers.contains(&name))
    })
}

/// Starts a runtime and waits until it serves.
pub(crate) async fn up(builder: catga::RuntimeBuilder) -> Runtime {
    let rt = builder.start().await.expect("runtime");
    rt.ready().await.expect("ready");
    rt
}

/// Whether `BENCH_ONLY` (comma separated) selects `section`; unset selects all.
pub(crate) fn selected(section: &str) -> bool {
    std::env::var("BENCH_ONLY")
        .map(|v| v.split(',').any(|s| s.trim() == section))
        .unwrap_or(true)
}

/// User plus system CPU time of this process so far, from /proc (clock
/// ticks of 10 ms: about 1% resolution over a cell of a second at full
/// load).
pub(crate) fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    (ticks(11) + ticks(12)) / 100.0
}

pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

pub(crate) fn nats_version() -> String {
    let bin = std::env::var("CATGA_NATS_SERVER").unwrap_or_else(|_| "nats-server".to_owned());
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "nats-server (version unknown)".to_owned())
}
