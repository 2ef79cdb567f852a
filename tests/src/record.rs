//! What handlers saw, kept per test run: every message carries a `run` id,
//! so that tests running side by side in one process (plain `cargo test`
//! runs them on threads) never see each other's records.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// A fresh id for one test run.
pub fn run_id() -> String {
    catga::new_message_id()
}

/// What a handler saw: which run, which replica, which message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The test run.
    pub run: String,
    /// A tag chosen by the handler (e.g. its queue group).
    pub tag: &'static str,
    /// The replica that handled it.
    pub instance: String,
    /// The message's sequence number in the run.
    pub seq: u64,
    /// The message's id as the handler saw it.
    pub message_id: String,
}

/// A shared log of [`Record`]s.
pub struct Recorder(Mutex<Vec<Record>>);

impl Recorder {
    /// An empty log.
    pub const fn new() -> Recorder {
        Recorder(Mutex::new(Vec::new()))
    }

    /// Appends what the handler with `ctx` saw of message `seq` of `run`.
    pub fn record(&self, run: &str, tag: &'static str, ctx: &catga::Context, seq: u64) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(Record {
            run: run.to_owned(),
            tag,
            instance: ctx.instance_id().to_owned(),
            seq,
            message_id: ctx.message_id().to_owned(),
        });
    }

    /// The records of one run.
    pub fn of(&self, run: &str) -> Vec<Record> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|r| r.run == run)
            .cloned()
            .collect()
    }

    /// Waits until `run` has at least `n` records (or `timeout` passed), then
    /// waits a little more so that extra deliveries would show, and returns
    /// them.
    pub async fn wait_for(&self, run: &str, n: usize, timeout: Duration) -> Vec<Record> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.of(run).len() < n && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.of(run)
    }

    /// Waits until the count of `run` stops changing for `quiet`, and
    /// returns it.
    pub async fn settle(&self, run: &str, quiet: Duration, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = self.of(run).len();
        loop {
            tokio::time::sleep(quiet).await;
            let now = self.of(run).len();
            if (now == last && now > 0) || tokio::time::Instant::now() >= deadline {
                return now;
            }
            last = now;
        }
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

/// Per-run counters of things in progress: how many now, how many at most.
pub struct Gauge(Mutex<Option<HashMap<String, (usize, usize)>>>);

impl Gauge {
    /// No runs yet.
    pub const fn new() -> Gauge {
        Gauge(Mutex::new(None))
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, (usize, usize)>) -> T) -> T {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(g.get_or_insert_with(HashMap::new))
    }

    /// One more in progress for `run`.
    pub fn enter(&self, run: &str) {
        self.with(|m| {
            let e = m.entry(run.to_owned()).or_default();
            e.0 += 1;
            e.1 = e.1.max(e.0);
        });
    }

    /// One fewer in progress for `run`.
    pub fn leave(&self, run: &str) {
        self.with(|m| {
            if let Some(e) = m.get_mut(run) {
                e.0 = e.0.saturating_sub(1);
            }
        });
    }

    /// In progress now for `run`.
    pub fn now(&self, run: &str) -> usize {
        self.with(|m| m.get(run).map_or(0, |e| e.0))
    }

    /// Most ever in progress at once for `run`.
    pub fn max(&self, run: &str) -> usize {
        self.with(|m| m.get(run).map_or(0, |e| e.1))
    }
}

impl Default for Gauge {
    fn default() -> Self {
        Gauge::new()
    }
}

/// Per-run event counts.
pub struct Tally(Mutex<Option<HashMap<String, u64>>>);

impl Tally {
    /// Nothing counted.
    pub const fn new() -> Tally {
        Tally(Mutex::new(None))
    }

    /// Counts one for `run`.
    pub fn add(&self, run: &str) {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *g.get_or_insert_with(HashMap::new)
            .entry(run.to_owned())
            .or_default() += 1;
    }

    /// The count of `run`.
    pub fn get(&self, run: &str) -> u64 {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().and_then(|m| m.get(run).copied()).unwrap_or(0)
    }
}

impl Default for Tally {
    fn default() -> Self {
        Tally::new()
    }
}
