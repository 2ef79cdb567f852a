//! W3C trace context (`traceparent`) across messages, so that one trace
//! follows a request through every replica and service it reaches.
//!
//! A message carries a `traceparent` header only when there is a trace to
//! continue: one its handler received, or one a client set with
//! [`TraceParent::scope`]. Messages a handler sends continue its trace,
//! with the handler's own span id as their parent. Without a trace nothing
//! is added (a root command still carries no header at all).

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

tokio::task_local! {
    static CURRENT: TraceParent;
}

/// A W3C `traceparent`: version 00, a 16-byte trace id, the 8-byte id of
/// the parent span, and the flags (bit 0: sampled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: [u8; 16],
    parent_id: [u8; 8],
    flags: u8,
}

impl TraceParent {
    /// A new trace (random ids), sampled.
    pub fn new_root() -> TraceParent {
        let a = random_u64().to_be_bytes();
        let b = random_u64().to_be_bytes();
        let mut trace_id = [0; 16];
        trace_id[..8].copy_from_slice(&a);
        trace_id[8..].copy_from_slice(&b);
        TraceParent {
            trace_id,
            parent_id: span_id(),
            flags: 1,
        }
    }

    /// Parses a `traceparent` header value; `None` if it is not one
    /// (wrong length, not hex, an all-zero id, version `ff`).
    pub fn parse(value: &str) -> Option<TraceParent> {
        let mut parts = value.trim().split('-');
        let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        // Version 00 has exactly four parts; later versions may add more.
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        hex::<1>(version)?;
        let trace_id = hex::<16>(trace)?;
        let parent_id = hex::<8>(parent)?;
        let [flags] = hex::<1>(flags)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// The trace id, 32 lowercase hex digits.
    pub fn trace_id(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// The parent span id, 16 lowercase hex digits.
    pub fn parent_id(&self) -> String {
        to_hex(&self.parent_id)
    }

    /// The same trace with `span` (16 hex digits' worth) as the parent.
    pub(crate) fn with_parent(self, span: [u8; 8]) -> TraceParent {
        TraceParent {
            parent_id: span,
            ..self
        }
    }

    /// Runs `fut` with this trace as the current one: messages that
    /// clients send from inside it carry it.
    pub async fn scope<F: Future>(self, fut: F) -> F::Output {
        CURRENT.scope(self, fut).await
    }

    /// The trace set by [`scope`](Self::scope) around the running task
    /// or, with the `otlp` feature exporting spans, the OpenTelemetry
    /// context of the current `tracing` span.
    pub fn current() -> Option<TraceParent> {
        let scoped = CURRENT.try_with(|t| *t).ok();
        #[cfg(feature = "otlp")]
        let scoped = scoped.or_else(otel::current);
        scoped
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.parent_id),
            self.flags
        )
    }
}

/// The bridge to OpenTelemetry spans (the `otlp` feature): a handling's
/// `handle` span becomes the child of the trace its message continues, and
/// the span id catga propagates for it is the exported span's, so that a
/// trace reads as one tree in the collector.
#[cfg(feature = "otlp")]
pub(crate) mod otel {
    use std::sync::atomic::{AtomicBool, Ordering};

    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceParent;

    /// Set once an OpenTelemetry layer is installed: until then nothing
    /// here costs anything.
    pub(crate) static ON: AtomicBool = AtomicBool::new(false);

    fn on() -> bool {
        ON.load(Ordering::Relaxed)
    }

    fn from_context(sc: &SpanContext) -> Option<TraceParent> {
        sc.is_valid().then(|| TraceParent {
            trace_id: sc.trace_id().to_bytes(),
            parent_id: sc.span_id().to_bytes(),
            flags: sc.trace_flags().to_u8(),
        })
    }

    /// The current `tracing` span's OpenTelemetry context, if exported.
    pub(super) fn current() -> Option<TraceParent> {
        if !on() {
            return None;
        }
        let cx = tracing::Span::current().context();
        from_context(cx.span().span_context())
    }

    /// Makes `span` the child of `incoming` (the trace a message carries)
    /// and returns the trace and span id of the handling: the exported
    /// span's. A message without a trace starts one (the exported span is
    /// then a root), so that what its handler sends joins it.
    pub(crate) fn link(
        span: &tracing::Span,
        incoming: Option<TraceParent>,
    ) -> Option<(TraceParent, [u8; 8])> {
        if !on() || span.is_disabled() {
            return None;
        }
        if let Some(t) = incoming {
            let parent = SpanContext::new(
                TraceId::from_bytes(t.trace_id),
                SpanId::from_bytes(t.parent_id),
                TraceFlags::new(t.flags),
                true,
                TraceState::default(),
            );
            let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
        }
        let cx = span.context();
        let own = from_context(cx.span().span_context())?;
        Some((incoming.unwrap_or(own), own.parent_id))
    }
}

/// A new random span id.
pub(crate) fn span_id() -> [u8; 8] {
    let id = random_u64();
    // An all-zero id is invalid.
    if id == 0 { 1u64 } else { id }.to_be_bytes()
}

fn random_u64() -> u64 {
    // SipHash under keys chosen at random once per process, over a
    // counter: distinct, unpredictable enough for trace ids, no new
    // dependency.
    static KEYS: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = KEYS.get_or_init(Default::default).build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_w3c_example() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp = TraceParent::parse(text).expect("valid");
        assert_eq!(tp.to_string(), text);
        assert_eq!(tp.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id(), "00f067aa0ba902b7");
    }

    #[test]
    fn refuses_what_is_not_a_traceparent() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn new_roots_differ() {
        let (a, b) = (TraceParent::new_root(), TraceParent::new_root());
        assert_ne!(a.trace_id(), b.trace_id());
        assert!(TraceParent::parse(&a.to_string()).is_some());
    }
}
