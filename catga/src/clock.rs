//! The clock of the times catga keeps for later: saga time-outs and
//! durable timers, delayed messages, job occurrences. It reads the
//! system's clock; on an embedded bus a test kit can move it forward
//! (`TestKit::advance`), so that a
//! test of "compensate after 30 minutes" takes milliseconds. Leases,
//! heartbeats, ack waits and request time-outs keep the real time: a
//! replica's liveness is not what a test skips.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

/// The system's clock, plus what a test kit moved it forward by.
#[derive(Debug)]
pub(crate) struct Clock {
    ahead_ms: AtomicU64,
    /// Counts the moves: sleepers wake at each one and look again.
    moved: watch::Sender<u64>,
}

/// The clock of everything outside an embedded bus: never moved.
static SYSTEM: LazyLock<Clock> = LazyLock::new(Clock::new);

impl Default for Clock {
    fn default() -> Clock {
        Clock::new()
    }
}

impl Clock {
    /// A clock at the system's time.
    pub(crate) fn new() -> Clock {
        Clock {
            ahead_ms: AtomicU64::new(0),
            moved: watch::Sender::new(0),
        }
    }

    /// The system's clock.
    pub(crate) fn system() -> &'static Clock {
        &SYSTEM
    }

    /// Now, in milliseconds since the Unix epoch.
    pub(crate) fn now_ms(&self) -> u64 {
        crate::wire::now_ms().saturating_add(self.ahead_ms.load(Ordering::Relaxed))
    }

    /// Now.
    pub(crate) fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.now_ms())
    }

    /// Moves it forward by `by`, and wakes whoever sleeps on it.
    pub(crate) fn advance(&self, by: Duration) {
        let ms = u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        self.ahead_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                Some(a.saturating_add(ms))
            })
            .ok();
        self.moved.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Sleeps for `wait` of real time, or until the clock is moved,
    /// whichever comes first: for loops that look at the time again when
    /// they wake.
    #[cfg(test)]
    pub(crate) async fn nap(&self, wait: Duration) {
        Clock::nap_watching(&mut self.watch(), wait).await;
    }

    /// A watch of the clock's moves, for [`nap_watching`](Self::nap_watching):
    /// kept across a loop, it also sees a move made while the loop was
    /// not napping.
    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
        self.moved.subscribe()
    }

    /// Sleeps for `wait` of real time, or until the clock moved since
    /// `moved` last saw it.
    pub(crate) async fn nap_watching(moved: &mut watch::Receiver<u64>, wait: Duration) {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = moved.changed() => {}
        }
    }

    /// Waits until the clock reads `at_ms` (unix ms), by real time or by
    /// moves.
    pub(crate) async fn until_ms(&self, at_ms: u64) {
        let mut moved = self.watch();
        loop {
            let now = self.now_ms();
            if now >= at_ms {
                return;
            }
            Clock::nap_watching(&mut moved, Duration::from_millis(at_ms - now)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_moved_clock_reads_ahead_and_wakes_its_sleepers() {
        let clock = std::sync::Arc::new(Clock::new());
        let before = clock.now_ms();
        let sleeper = {
            let clock = std::sync::Arc::clone(&clock);
            tokio::spawn(async move { clock.nap(Duration::from_secs(3600)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        clock.advance(Duration::from_secs(1800));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("woken by the move")
            .expect("joined");
        assert!(clock.now_ms() >= before + 1_800_000);
        assert!(
            Clock::system().now_ms() < before + 1_000_000,
            "the system's clock is not moved"
        );
    }
}
