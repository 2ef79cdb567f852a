//! The handlers the integration tests serve, one module per scenario; a
//! runtime serves one module (see [`Backend::builder`](crate::Backend::builder)).
//!
//! Every message carries a `run` id so that tests sharing a process never see
//! each other's records.

use std::sync::Mutex;
use std::time::Duration;

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
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

/// Request/reply and id propagation.
pub mod echo {
    use catga::{Context, Result, command};
    use serde::{Deserialize, Serialize};

    /// Echoes its text back with what the handler saw.
    #[command(reply = Echoed)]
    #[derive(Serialize, Deserialize, Debug)]
    pub struct Echo {
        /// Text to echo.
        pub text: String,
    }

    /// The reply to [`Echo`].
    #[derive(Serialize, Deserialize, Debug, Clone)]
    pub struct Echoed {
        /// The text.
        pub text: String,
        /// Replica that answered.
        pub instance: String,
        /// Id of the `Echo` message.
        pub message_id: String,
        /// Its correlation id.
        pub correlation_id: String,
        /// Its causation id.
        pub causation_id: Option<String>,
    }

    /// Sends an [`Echo`] from inside its handler.
    #[command(subject = "tests.relay", reply = Relayed)]
    #[derive(Serialize, Deserialize, Debug)]
    pub struct Relay {
        /// Text to pass on.
        pub text: String,
    }

    /// The reply to [`Relay`].
    #[derive(Serialize, Deserialize, Debug)]
    pub struct Relayed {
        /// What the inner echo saw.
        pub inner: Echoed,
        /// Id of the `Relay` message.
        pub relay_message_id: String,
        /// Correlation id of the `Relay` message.
        pub relay_correlation_id: String,
    }

    #[command(queue_group = "echo")]
    async fn echo(ctx: &Context, cmd: Echo) -> Result<Echoed> {
        Ok(Echoed {
            text: cmd.text,
            instance: ctx.instance_id().to_owned(),
            message_id: ctx.message_id().to_owned(),
            correlation_id: ctx.correlation_id().to_owned(),
            causation_id: ctx.causation_id().map(str::to_owned),
        })
    }

    #[command]
    async fn relay(ctx: &Context, cmd: Relay) -> Result<Relayed> {
        let inner = ctx.send(Echo { text: cmd.text }).await?;
        Ok(Relayed {
            inner,
            relay_message_id: ctx.message_id().to_owned(),
            relay_correlation_id: ctx.correlation_id().to_owned(),
        })
    }
}

/// Queue-group load balancing.
pub mod lb {
    use catga::{Context, Result, command};
    use serde::{Deserialize, Serialize};

    use super::Recorder;

    /// Handled by exactly one replica.
    #[command(reply = String)]
    #[derive(Serialize, Deserialize, Debug)]
    pub struct Work {
        /// Test run.
        pub run: String,
        /// Sequence number.
        pub seq: u64,
    }

    /// Every handled `Work`.
    pub static HANDLED: Recorder = Recorder::new();

    #[command(queue_group = "lb-workers")]
    async fn work(ctx: &Context, w: Work) -> Result<String> {
        HANDLED.record(&w.run, "work", ctx, w.seq);
        // A little work, so that replicas overlap.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        Ok(ctx.instance_id().to_owned())
    }
}

/// Event fan-out to every replica.
pub mod fanout {
    use catga::{Context, Result, event};
    use serde::{Deserialize, Serialize};

    use super::Recorder;

    /// Every replica receives it.
    #[event]
    #[derive(Serialize, Deserialize, Debug)]
    pub struct Tick {
        /// Test run.
        pub run: String,
        /// Sequence number.
        pub seq: u64,
    }

    /// Every received `Tick`.
    pub static RECEIVED: Recorder = Recorder::new();

    #[event]
    async fn on_tick(ctx: &Context, t: Tick) -> Result<()> {
        RECEIVED.record(&t.run, "tick", ctx, t.seq);
        Ok(())
    }
}

/// Queue-grouped events: once per group.
pub mod groups {
    use catga::{Context, Result, event};
    use serde::{Deserialize, Serialize};

    use super::Recorder;

    /// Once per queue group.
    #[event(subject = "tests.jobs")]
    #[derive(Serialize, Deserialize, Debug)]
    pub struct Job {
        /// Test run.
        pub run: String,
        /// Sequence number.
        pub seq: u64,
    }

    /// Every received `Job`, tagged by group.
    pub static RECEIVED: Recorder = Recorder::new();

    #[event(queue_group = "billing")]
    async fn billing(ctx: &Context, j: Job) -> Result<()> {
        RECEIVED.record(&j.run, "billing", ctx, j.seq);
        Ok(())
    }

    #[event(queue_group = "shipping")]
    async fn shipping(ctx: &Context, j: Job) -> Result<()> {
        RECEIVED.record(&j.run, "shipping", ctx, j.seq);
        Ok(())
    }
}

/// Handler errors, panics and bad input.
pub mod faults {
    use catga::{Error, Result, command};
    use serde::{Deserialize, Serialize};

    /// Fails the way `mode` says.
    #[command(reply = u32)]
    #[derive(Serialize, Deserialize, Debug)]
    pub struct Fail {
        /// `ok`, `not_found`, `invalid`, `conflict`, `error` or `panic`.
        pub mode: String,
    }

    #[command]
    async fn fail(f: Fail) -> Result<u32> {
        match f.mode.as_str() {
            "ok" => Ok(7),
            "not_found" => Err(Error::not_found("no such thing")),
            "invalid" => Err(Error::invalid("mode is invalid")),
            "conflict" => Err(Error::conflict("already done")),
            "panic" => panic!("the handler blew up"),
            _ => Err(Error::msg("generic failure")),
        }
    }
}

/// Slow handlers: graceful drain and the in-flight limit.
pub mod slow {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use catga::{Context, Result, command};
    use serde::{Deserialize, Serialize};

    use super::Recorder;

    /// Sleeps `ms`, then answers with `seq`.
    #[command(reply = u64)]
    #[derive(Serialize, Deserialize, Debug)]
    pub struct Slow {
        /// Test run.
        pub run: String,
        /// Sequence number.
        pub seq: u64,
        /// How long to work.
        pub ms: u64,
    }

    /// Started `Slow`s.
    pub static STARTED: Recorder = Recorder::new();
    /// Finished `Slow`s.
    pub static FINISHED: Recorder = Recorder::new();
    /// Handlers in flight right now.
    pub static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
    /// Most handlers ever in flight at once.
    pub static MAX_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

    #[command(concurrency = 2)]
    async fn slow(ctx: &Context, s: Slow) -> Result<u64> {
        let now = IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;
        MAX_IN_FLIGHT.fetch_max(now, Ordering::SeqCst);
        STARTED.record(&s.run, "start", ctx, s.seq);
        tokio::time::sleep(Duration::from_millis(s.ms)).await;
        FINISHED.record(&s.run, "finish", ctx, s.seq);
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        Ok(s.seq)
    }
}

/// A slow event handler behind a small buffer: slow-consumer drops.
pub mod flood {
    use std::time::Duration;

    use catga::{Context, Result, event};
    use serde::{Deserialize, Serialize};

    use super::Recorder;

    /// Published faster than it is handled.
    #[event]
    #[derive(Serialize, Deserialize, Debug)]
    pub struct Flood {
        /// Test run.
        pub run: String,
        /// Sequence number.
        pub seq: u64,
    }

    /// Every handled `Flood`.
    pub static HANDLED: Recorder = Recorder::new();

    #[event(concurrency = 1)]
    async fn on_flood(ctx: &Context, f: Flood) -> Result<()> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        HANDLED.record(&f.run, "flood", ctx, f.seq);
        Ok(())
    }
}

/// Two handlers for one command subject: refused at start-up.
pub mod dup {
    use catga::{Result, command};
    use serde::{Deserialize, Serialize};

    /// Has two handlers: a wiring bug the runtime must refuse.
    #[command]
    #[derive(Serialize, Deserialize, Debug)]
    pub struct Dup;

    #[command]
    async fn dup_first(_: Dup) -> Result<()> {
        Ok(())
    }

    #[command]
    async fn dup_second(_: Dup) -> Result<()> {
        Ok(())
    }
}
