//! The protocol on the wire, in one place: header names, id and subject
//! rules, the payload codec, error replies (NATS micro convention), the
//! version rule and request deadlines.
//!
//! A header is sent only when it says something the receiver cannot infer,
//! because each header costs allocations on both sides (one `Nats-Msg-Id`
//! header cost 11% of request/reply throughput in the benchmark, see
//! BENCHMARKS.md):
//! - `Nats-Msg-Id` on every event (its receivers must agree on its id), on
//!   every message sent from a handler, and on a command whose sender chose
//!   an id; a root command without one gets its id from its single receiver;
//! - correlation and causation ids only for a message sent from a handler
//!   (a root message's correlation id is its own id);
//! - `Catga-Version` only above version 1;
//! - no type header: a subject carries exactly one message type, fixed at
//!   compile time;
//! - a request's deadline travels in its reply subject (see [`deadline`]);
//! - `traceparent` only when there is a trace to continue (see [`trace`]).

pub(crate) mod codec;
pub(crate) mod deadline;
pub(crate) mod errors;
mod meta;
pub(crate) mod trace;

pub use meta::MessageMeta;

use crate::error::{Error, ErrorKind, Result};

/// Header names catga reads and writes: typed names, built at compile time,
/// so inserting or looking one up allocates nothing.
pub mod headers {
    use async_nats::HeaderName;

    /// Unique id of this message; also the JetStream de-duplication id.
    pub const MESSAGE_ID: HeaderName = HeaderName::from_static("Nats-Msg-Id");
    /// W3C trace context, when the message continues a trace.
    pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    /// Id shared by every message caused, directly or not, by one root message.
    pub const CORRELATION_ID: HeaderName = HeaderName::from_static("Catga-Correlation-Id");
    /// Id of the message whose handler sent this one.
    pub const CAUSATION_ID: HeaderName = HeaderName::from_static("Catga-Causation-Id");
    /// Schema version of the payload; absent means version 1.
    pub const VERSION: HeaderName = HeaderName::from_static("Catga-Version");
    /// Deadline of a request, in milliseconds since the Unix epoch, for
    /// clients that cannot put it in the reply subject (see [`Deadline`](crate::Deadline)).
    pub const DEADLINE: HeaderName = HeaderName::from_static("Catga-Deadline");
    /// NATS micro convention: error description of an error reply.
    pub const SERVICE_ERROR: HeaderName = HeaderName::from_static("Nats-Service-Error");
    /// NATS micro convention: status code of an error reply.
    pub const SERVICE_ERROR_CODE: HeaderName = HeaderName::from_static("Nats-Service-Error-Code");
    /// catga's error kind of an error reply (see [`ErrorKind`](crate::ErrorKind)).
    pub const ERROR_KIND: HeaderName = HeaderName::from_static("Catga-Error-Kind");
    /// Id under which a failure's full text was logged by the replica that
    /// failed.
    pub const ERROR_ID: HeaderName = HeaderName::from_static("Catga-Error-Id");
    /// Dead letter: the subject the message came on.
    pub const DLQ_SUBJECT: HeaderName = HeaderName::from_static("Catga-Dlq-Subject");
    /// Dead letter: the service whose handler gave up on it.
    pub const DLQ_SERVICE: HeaderName = HeaderName::from_static("Catga-Dlq-Service");
    /// Dead letter: the handler that gave up on it.
    pub const DLQ_HANDLER: HeaderName = HeaderName::from_static("Catga-Dlq-Handler");
    /// Dead letter: the error kind of the last attempt.
    pub const DLQ_ERROR_KIND: HeaderName = HeaderName::from_static("Catga-Dlq-Error-Kind");
    /// Dead letter: the error text of the last attempt.
    pub const DLQ_ERROR: HeaderName = HeaderName::from_static("Catga-Dlq-Error");
    /// Dead letter: how many times it was delivered.
    pub const DLQ_DELIVERIES: HeaderName = HeaderName::from_static("Catga-Dlq-Deliveries");
    /// Dead letter: its original `Nats-Msg-Id`.
    pub const DLQ_MESSAGE_ID: HeaderName = HeaderName::from_static("Catga-Dlq-Msg-Id");
    /// Dead letter: cut to fit the broker's limit; the original payload's
    /// size.
    pub const DLQ_TRUNCATED: HeaderName = HeaderName::from_static("Catga-Dlq-Truncated");
    /// Dead letter: its own id, under which its digest is recorded in the
    /// store.
    pub const DLQ_ID: HeaderName = HeaderName::from_static("Catga-Dlq-Id");
}

/// The longest message id catga accepts.
pub const MAX_ID_LEN: usize = 256;

/// `at` in milliseconds since the Unix epoch (0 before it); the one
/// conversion of wall-clock times the crate uses (deadlines, saga
/// timers, jobs, delayed messages).
pub(crate) fn unix_ms(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Now, in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    unix_ms(std::time::SystemTime::now())
}

/// The subjects of recurring jobs start with this
/// (`catga.job.<crate>.<fn>`).
pub(crate) const JOB_SUBJECT_PREFIX: &str = "catga.job.";

/// The time an occurrence of a job was scheduled for, read from its
/// message id (`<job>:<scheduled unix ms>`), when `subject` is a job's.
pub(crate) fn occurrence_of(subject: &str, id: &str) -> Option<std::time::SystemTime> {
    if !subject.starts_with(JOB_SUBJECT_PREFIX) {
        return None;
    }
    // A replayed dead letter's id is the occurrence's plus `.replay<n>`.
    let tail = id.rsplit_once(':')?.1;
    let digits = tail.split('.').next()?;
    occurrence_ms(&id[..id.len() - tail.len() + digits.len()])
        .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// The scheduled time (unix ms) an occurrence's message id carries, as
/// the scheduler stored it (`<job>:<ms>`, nothing after).
pub(crate) fn occurrence_ms(id: &str) -> Option<u64> {
    let digits = id.rsplit_once(':')?.1;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A fresh, unique message id (a NUID: 22 base-62 characters).
pub fn new_message_id() -> String {
    nuid::next().to_string()
}

/// `id` if it fits in [`MAX_ID_LEN`], else its start, `~` and a hash of
/// the whole (xxh3-128): ids derived from an incoming one (a saga's
/// `<fn>:<trigger id>`, a step's `<saga id>/<step>`) stay valid, and
/// distinct for distinct inputs. A trigger under a 250-character id once
/// made every step id too long: both sagas of the example ended
/// compensated without running a step.
pub(crate) fn bounded_id(id: String) -> String {
    if id.len() <= MAX_ID_LEN {
        return id;
    }
    let hash = format!("{:032x}", xxhash_rust::xxh3::xxh3_128(id.as_bytes()));
    let mut keep = MAX_ID_LEN - 1 - hash.len();
    while !id.is_char_boundary(keep) {
        keep -= 1;
    }
    format!("{}~{hash}", &id[..keep])
}

/// `text` as one subject token (and a name NATS micro and JetStream take):
/// anything but ASCII letters, digits, `-` and `_` becomes `_`. The one
/// sanitizer of the crate: stream names, dead-letter and partition
/// subjects, private queue groups and discovery names use it.
pub(crate) fn subject_token(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether a header is the broker's (`Nats-*`: a message id, or a
/// directive to JetStream such as `Nats-Expected-Stream`). Such headers of
/// an incoming message are never copied onto what catga publishes for it
/// (a routed copy, a dead letter): a client could otherwise make JetStream
/// refuse those publishes forever.
pub(crate) fn is_broker_header(name: &str) -> bool {
    name.len() >= 5 && name[..5].eq_ignore_ascii_case("nats-")
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Makes `text` a valid header value: line breaks and other control
/// characters become spaces (async-nats panics on some of them).
pub(crate) fn header_value(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Checks a message id chosen by a caller: 1 to [`MAX_ID_LEN`] visible
/// ASCII characters. Line breaks and other control characters would break
/// the header block (async-nats panics on some of them), and spaces are
/// trimmed by some clients, so both are refused.
pub(crate) fn check_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!("a message id must be 1 to {MAX_ID_LEN} characters long"),
        ));
    }
    if let Some(bad) = id.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "a message id may only contain visible ASCII characters, found {:?}",
                bad.escape_default().to_string()
            ),
        ));
    }
    Ok(())
}

/// Checks a subject given at run time (`send_raw`, `publish_raw`) with
/// the rules the macros apply at compile time, from the same code
/// (`catga-names`): dot-separated tokens of ASCII letters, digits, `_` and
/// `-`, no wildcards, not in the `$` or `_INBOX` name spaces. (They had
/// drifted: `a.b%` was refused at compile time and sent at run time.)
pub(crate) fn check_subject(subject: &str) -> Result<()> {
    catga_names::check_subject(subject)
        .map_err(|why| Error::new(ErrorKind::Invalid, format!("invalid subject {subject:?}: {why}")))
}

/// Where a new message comes from.
#[derive(Clone, Copy)]
pub(crate) enum Cause<'a> {
    /// Sent by a client, not caused by another message.
    Root,
    /// Sent by a client under a message id it chose.
    Id(&'a str),
    /// Sent from the handler of this message.
    Parent(&'a MessageMeta),
}

/// The headers of a new message (see the rules at the top of this module);
/// `event` says whether it is an event.
pub(crate) fn message_headers(event: bool, version: u32, cause: Cause<'_>) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    let trace = match cause {
        Cause::Parent(p) => {
            h.insert(headers::CORRELATION_ID, p.correlation_id());
            h.insert(headers::CAUSATION_ID, p.message_id());
            h.insert(headers::MESSAGE_ID, nuid::next().as_str());
            p.child_trace()
        }
        Cause::Id(id) => {
            h.insert(headers::MESSAGE_ID, id);
            trace::TraceParent::current()
        }
        Cause::Root if event => {
            h.insert(headers::MESSAGE_ID, nuid::next().as_str());
            trace::TraceParent::current()
        }
        Cause::Root => trace::TraceParent::current(),
    };
    if let Some(t) = trace {
        h.insert(headers::TRACEPARENT, t.to_string().as_str());
    }
    if version != 1 {
        h.insert(headers::VERSION, version.to_string());
    }
    h
}

/// The version a message was sent at: its `Catga-Version`, 1 when absent
/// or unreadable (the pipeline and the keyed router refuse an unreadable
/// one with [`check_version`] before anything decodes the payload).
pub(crate) fn version_of(headers: Option<&async_nats::HeaderMap>) -> u32 {
    headers
        .and_then(|h| h.get(headers::VERSION))
        .and_then(|v| parse_version(v.as_str()))
        .unwrap_or(1)
}

/// A `Catga-Version` value: a whole number from 1, in plain digits
/// (catga sends nothing else; `0`, `+2` or `2.0` are refused, not read
/// as something close).
fn parse_version(v: &str) -> Option<u32> {
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|v| *v >= 1)
}

/// Checks a message's `Catga-Version` against the newest version its
/// handler knows: absent means 1, newer is refused.
pub(crate) fn check_version(headers: Option<&async_nats::HeaderMap>, name: &str, known: u32) -> Result<()> {
    let Some(v) = headers.and_then(|h| h.get(headers::VERSION)) else {
        return Ok(());
    };
    match parse_version(v.as_str()) {
        Some(v) if v <= known => Ok(()),
        _ => Err(Error::new(
            ErrorKind::Invalid,
            format!(
                "unknown version {:?} of `{name}`: this service understands up to version {known}",
                v.as_str()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_plain_whole_numbers_from_1() {
        let with = |v: &str| {
            let mut h = async_nats::HeaderMap::new();
            h.insert(headers::VERSION, v);
            h
        };
        for ok in ["1", "2", " 2 ", "0002"] {
            assert!(check_version(Some(&with(ok)), "T", 2).is_ok(), "{ok:?}");
        }
        for bad in ["0", "+2", "-1", "2.0", "", "two", "4294967296", "3"] {
            let err = check_version(Some(&with(bad)), "T", 2).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::Invalid, "{bad:?}");
        }
        assert_eq!(version_of(Some(&with("2"))), 2);
        assert_eq!(version_of(None), 1);
        assert!(check_version(None, "T", 2).is_ok(), "absent means 1");
    }

    #[test]
    fn ids_are_visible_ascii() {
        assert!(check_id("order-42-attempt").is_ok());
        assert!(check_id(&new_message_id()).is_ok());
        for bad in ["", "a\nb", "a b", "é", "a\rb", &"x".repeat(MAX_ID_LEN + 1)] {
            let err = check_id(bad).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::Invalid);
        }
    }

    #[test]
    fn subject_tokens_keep_letters_digits_dashes_and_underscores() {
        assert_eq!(subject_token("orders-v2_x"), "orders-v2_x");
        assert_eq!(subject_token("a.b c/d:é"), "a_b_c_d__");
        assert_eq!(subject_token(""), "");
    }

    #[test]
    fn derived_ids_stay_within_the_limit_and_distinct() {
        let short = "fulfil:abc/reserve".to_owned();
        assert_eq!(bounded_id(short.clone()), short);
        let base = "x".repeat(MAX_ID_LEN);
        let a = bounded_id(format!("fulfil:{base}/reserve"));
        let b = bounded_id(format!("fulfil:{base}/courier"));
        assert!(a.len() <= MAX_ID_LEN && b.len() <= MAX_ID_LEN);
        assert_ne!(a, b);
        check_id(&a).expect("valid");
        assert_eq!(a, bounded_id(format!("fulfil:{base}/reserve")), "stable");
    }

    #[test]
    fn runtime_subjects_follow_the_macro_rules() {
        assert!(check_subject("orders.created").is_ok());
        assert!(check_subject("cmd.fail").is_ok());
        for bad in [
            "",
            "_INBOX.x",
            "_INBOX",
            "$JS.API.x",
            "a.*",
            "a.>",
            "a..b",
            ".a",
            "a.",
            "a b",
            "a\r\nb",
        ] {
            assert_eq!(
                check_subject(bad).expect_err(bad).kind(),
                ErrorKind::Invalid,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn versions_above_the_known_one_are_refused() {
        let mut h = async_nats::HeaderMap::new();
        assert!(check_version(None, "X", 1).is_ok());
        h.insert(headers::VERSION, "2");
        assert!(check_version(Some(&h), "X", 2).is_ok());
        let err = check_version(Some(&h), "X", 1).expect_err("newer");
        assert!(err.message().contains("unknown version \"2\" of `X`"), "{err}");
        h.insert(headers::VERSION, "two");
        assert!(check_version(Some(&h), "X", 9).is_err());
    }
}
