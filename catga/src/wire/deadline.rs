//! Request deadlines across processes.
//!
//! A request carries the moment its sender stops waiting, as milliseconds
//! since the Unix epoch. The receiver does not start a handler for a
//! request whose deadline passed (its sender already returned a time-out,
//! and may have retried), and a handler's nested sends get what is left of
//! it rather than a fresh time-out.
//!
//! catga puts the deadline in the last token of the reply subject
//! (`_INBOX.<id>.<seq>.dl<ms>`) instead of a header: the reply subject is
//! sent anyway, while a header costs about 11% of request/reply throughput
//! (async-nats builds and parses headers as a map of strings; measured in
//! BENCHMARKS.md). Other clients may send the `Catga-Deadline` header
//! instead; when both are present the earlier one counts.
//!
//! Deadlines compare wall clocks of different hosts, so replicas need
//! synchronized clocks (NTP, as every Kubernetes node has); a receiver whose
//! clock runs ahead by more than a request's time-out drops that request,
//! and logs it.

use std::time::Duration;

use super::headers;

/// The marker of the deadline token in a reply subject.
const TOKEN_PREFIX: &str = "dl";

/// A point in wall-clock time after which nobody waits for the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline {
    unix_ms: u64,
}

impl Deadline {
    /// `timeout` from now.
    pub fn after(timeout: Duration) -> Deadline {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        Deadline {
            unix_ms: super::now_ms().saturating_add(ms),
        }
    }

    /// The deadline at `unix_ms` milliseconds since the Unix epoch.
    pub fn from_unix_ms(unix_ms: u64) -> Deadline {
        Deadline { unix_ms }
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_ms(self) -> u64 {
        self.unix_ms
    }

    /// Time left, `None` once it passed.
    pub fn remaining(self) -> Option<Duration> {
        let now = super::now_ms();
        (self.unix_ms > now).then(|| Duration::from_millis(self.unix_ms - now))
    }

    /// Whether it passed.
    pub fn is_past(self) -> bool {
        self.remaining().is_none()
    }

    /// The sooner of `self` and `timeout` from now.
    pub fn min_after(self, timeout: Duration) -> Deadline {
        self.min(Deadline::after(timeout))
    }
}

/// The reply-subject token that carries `deadline`.
pub(crate) fn token(deadline: Deadline) -> String {
    format!("{TOKEN_PREFIX}{}", deadline.unix_ms)
}

/// The deadline of an incoming request: from its reply subject's last token
/// and from the `Catga-Deadline` header, the earlier of the two.
pub(crate) fn of_request(reply: Option<&str>, hdrs: Option<&async_nats::HeaderMap>) -> Option<Deadline> {
    let from_reply = reply.and_then(|r| r.rsplit('.').next()).and_then(parse_token);
    let from_header = hdrs
        .and_then(|h| h.get(headers::DEADLINE))
        .and_then(|v| v.as_str().trim().parse::<u64>().ok())
        .map(Deadline::from_unix_ms);
    match (from_reply, from_header) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn parse_token(token: &str) -> Option<Deadline> {
    let digits = token.strip_prefix(TOKEN_PREFIX)?;
    // Milliseconds since 1970 have 13 digits until the year 2286; anything
    // else is somebody else's inbox token that happens to start with "dl".
    if digits.len() != 13 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().map(Deadline::from_unix_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_travel_in_the_reply_subject_or_a_header() {
        let d = Deadline::after(Duration::from_secs(5));
        let reply = format!("_INBOX.abc.7.{}", token(d));
        assert_eq!(of_request(Some(&reply), None), Some(d));
        assert_eq!(of_request(Some("_INBOX.abc.7"), None), None);
        assert_eq!(of_request(Some("_INBOX.abc.dlx"), None), None);
        assert_eq!(of_request(Some("_INBOX.abc.dl12"), None), None);

        let mut h = async_nats::HeaderMap::new();
        let earlier = Deadline::from_unix_ms(d.unix_ms() - 1000);
        h.insert(headers::DEADLINE, earlier.unix_ms().to_string());
        assert_eq!(of_request(None, Some(&h)), Some(earlier));
        assert_eq!(
            of_request(Some(&reply), Some(&h)),
            Some(earlier),
            "the earlier wins"
        );
    }

    #[test]
    fn remaining_time() {
        let d = Deadline::after(Duration::from_secs(10));
        let left = d.remaining().expect("in the future");
        assert!(left > Duration::from_secs(9) && left <= Duration::from_secs(10));
        assert!(Deadline::from_unix_ms(1).is_past());
        assert!(d.min_after(Duration::from_secs(1)) < d);
    }
}
