//! Retries with back-off (backon), circuit breakers, and the back-off of
//! redeliveries.

use std::sync::Mutex;
use std::time::Duration;

use backon::BackoffBuilder;
use tokio::time::Instant;

/// The back-off before attempt `attempt + 1` (`attempt` counts from 1):
/// `base` doubling per attempt, with jitter, at most 30 s.
pub(crate) fn backoff(base: Duration, attempt: u32) -> Duration {
    backon::ExponentialBuilder::default()
        .with_min_delay(base)
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempt.saturating_sub(1) as usize)
        .unwrap_or(base)
}

/// A circuit breaker per handler: after `threshold` failures in a row it
/// opens and refuses work for `open_for`; then it lets one message through
/// (half-open): a success closes it, a failure opens it again.
pub(crate) struct Breaker {
    threshold: u32,
    open_for: Duration,
    state: Mutex<BreakerState>,
    /// True while the state is `Closed { failures: 0 }`: the common case
    /// answers without the lock (two lock round trips per message showed
    /// in the fan-out profile).
    healthy: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen,
}

/// Whether a message may go to the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    Yes,
    /// Refused; the breaker lets one try in this long.
    No(Duration),
}

impl Breaker {
    /// A breaker; `threshold` 0 never opens.
    pub(crate) fn new(threshold: u32, open_for: Duration) -> Breaker {
        Breaker {
            threshold,
            open_for,
            state: Mutex::new(BreakerState::Closed { failures: 0 }),
            healthy: std::sync::atomic::AtomicBool::new(true),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut BreakerState) -> T) -> T {
        // The state is a small value set in one assignment: a poisoned lock
        // still holds a consistent one.
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let out = f(&mut s);
        self.healthy.store(
            *s == BreakerState::Closed { failures: 0 },
            std::sync::atomic::Ordering::Release,
        );
        out
    }

    fn is_healthy(&self) -> bool {
        self.threshold == 0 || self.healthy.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Asks to run a message.
    pub(crate) fn admit(&self) -> Admit {
        if self.is_healthy() {
            return Admit::Yes;
        }
        self.with(|s| match *s {
            BreakerState::Closed { .. } => Admit::Yes,
            BreakerState::Open { until } => {
                let now = Instant::now();
                if now >= until {
                    *s = BreakerState::HalfOpen;
                    Admit::Yes
                } else {
                    Admit::No(until - now)
                }
            }
            // One message is on trial; others wait for its verdict.
            BreakerState::HalfOpen => Admit::No(Duration::from_millis(100)),
        })
    }

    /// Whether it refuses work right now (without taking a trial slot).
    pub(crate) fn is_open(&self) -> Option<Duration> {
        if self.is_healthy() {
            return None;
        }
        self.with(|s| match *s {
            BreakerState::Open { until } => {
                let now = Instant::now();
                (now < until).then(|| until - now)
            }
            _ => None,
        })
    }

    /// Reports how a message went: `ok` when the handler did its job (a
    /// client error such as invalid input counts as ok: the handler works).
    /// Returns true when this report opened the breaker.
    pub(crate) fn record(&self, ok: bool) -> bool {
        if self.threshold == 0 || (ok && self.is_healthy()) {
            return false;
        }
        let (threshold, open_for) = (self.threshold, self.open_for);
        self.with(|s| match (*s, ok) {
            (_, true) => {
                *s = BreakerState::Closed { failures: 0 };
                false
            }
            (BreakerState::Closed { failures }, false) if failures + 1 < threshold => {
                *s = BreakerState::Closed {
                    failures: failures + 1,
                };
                false
            }
            (BreakerState::Open { .. }, false) => false,
            (_, false) => {
                *s = BreakerState::Open {
                    until: Instant::now() + open_for,
                };
                true
            }
        })
    }
}

/// `f`, failing with a retryable time-out naming `what` once `limit`
/// passed: a call to the broker or the store that must not wait for good.
pub(crate) async fn within<T>(
    limit: std::time::Duration,
    what: &str,
    f: impl std::future::Future<Output = crate::error::Result<T>>,
) -> crate::error::Result<T> {
    tokio::time::timeout(limit, f).await.unwrap_or_else(|_| {
        Err(crate::error::Error::new(
            crate::error::ErrorKind::Timeout,
            format!("{what} took longer than {limit:?}"),
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_bounded() {
        let base = Duration::from_millis(100);
        assert!(backoff(base, 1) >= base && backoff(base, 1) <= base * 2);
        assert!(backoff(base, 4) >= base * 8);
        assert!(backoff(base, 40) <= Duration::from_secs(60));
    }

    #[tokio::test]
    async fn the_breaker_opens_half_opens_and_closes() {
        let b = Breaker::new(3, Duration::from_millis(50));
        assert_eq!(b.admit(), Admit::Yes);
        assert!(!b.record(false));
        assert!(!b.record(false));
        assert!(b.record(false), "the third failure in a row opens it");
        assert!(matches!(b.admit(), Admit::No(_)));
        assert!(b.is_open().is_some());
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(b.admit(), Admit::Yes, "half-open: one trial");
        assert!(matches!(b.admit(), Admit::No(_)), "only one");
        assert!(b.record(false), "the trial failed: open again");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(b.admit(), Admit::Yes);
        assert!(!b.record(true), "the trial passed: closed");
        assert_eq!(b.admit(), Admit::Yes);
        assert!(Breaker::new(0, Duration::ZERO).is_open().is_none());
    }
}
