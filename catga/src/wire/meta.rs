//! What a handler knows about the message it handles.

use std::sync::OnceLock;

use super::deadline::Deadline;
use super::headers;
use super::trace::{TraceParent, span_id};

/// Identity of a message as seen by its handler, read from its headers on
/// demand (nothing is copied per message unless asked for).
#[derive(Debug, Clone)]
pub struct MessageMeta {
    subject: async_nats::Subject,
    headers: Option<async_nats::HeaderMap>,
    deadline: Option<Deadline>,
    delivery: u64,
    generated_id: OnceLock<InlineId>,
    /// The trace it continues (parsed on demand), and the span id of its
    /// handling, the parent of what the handler sends.
    trace: OnceLock<Option<(TraceParent, [u8; 8])>>,
}

/// A NUID kept inline (22 ASCII characters), so that making up an id
/// allocates nothing.
#[derive(Debug, Clone, Copy)]
struct InlineId([u8; 22]);

impl InlineId {
    fn new() -> InlineId {
        let mut buf = [b'0'; 22];
        let id = nuid::next();
        let bytes = id.as_str().as_bytes();
        let n = bytes.len().min(buf.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        InlineId(buf)
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("0000000000000000000000")
    }
}

impl MessageMeta {
    pub(crate) fn new(
        subject: async_nats::Subject,
        headers: Option<async_nats::HeaderMap>,
        deadline: Option<Deadline>,
        delivery: u64,
    ) -> MessageMeta {
        MessageMeta {
            subject,
            headers,
            deadline,
            delivery,
            generated_id: OnceLock::new(),
            trace: OnceLock::new(),
        }
    }

    fn header(&self, name: async_nats::HeaderName) -> Option<&str> {
        self.headers.as_ref()?.get(name).map(|v| v.as_str())
    }

    /// The version it was sent at (`Catga-Version`; 1 when absent or
    /// unreadable: the pipeline refuses those before a handler runs).
    pub fn version(&self) -> u32 {
        super::version_of(self.headers.as_ref())
    }

    /// Unique id of the message; one is made up (once) for a message sent
    /// without one, e.g. a root command or a message from a plain NATS
    /// client.
    pub fn message_id(&self) -> &str {
        match self.header(headers::MESSAGE_ID) {
            Some(id) => id,
            None => self.generated_id.get_or_init(InlineId::new).as_str(),
        }
    }

    /// Whether the sender chose the message id (it is not made up here).
    pub fn has_sender_id(&self) -> bool {
        self.header(headers::MESSAGE_ID).is_some()
    }

    /// Correlation id: the sender's, or the message id for a root message.
    pub fn correlation_id(&self) -> &str {
        match self.header(headers::CORRELATION_ID) {
            Some(id) => id,
            None => self.message_id(),
        }
    }

    /// Id of the message that caused this one, if any.
    pub fn causation_id(&self) -> Option<&str> {
        self.header(headers::CAUSATION_ID)
    }

    /// The subject it arrived on.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// When the sender stops waiting for the reply, if it said.
    pub fn deadline(&self) -> Option<Deadline> {
        self.deadline
    }

    /// Which delivery of the message this is: 1 for the first, more when a
    /// durable consumer redelivers it.
    pub fn delivery(&self) -> u64 {
        self.delivery
    }

    /// Settles the trace of this handling with `link`, which gets the
    /// trace the message continues (if any) and may return the trace and
    /// handling span id to use instead (the OpenTelemetry span's, when
    /// spans are exported). Call before anything reads the trace.
    #[cfg(feature = "otlp")]
    pub(crate) fn link_trace(
        &self,
        link: impl FnOnce(Option<TraceParent>) -> Option<(TraceParent, [u8; 8])>,
    ) {
        self.trace.get_or_init(|| {
            let incoming = self.header(headers::TRACEPARENT).and_then(TraceParent::parse);
            link(incoming).or_else(|| incoming.map(|t| (t, span_id())))
        });
    }

    fn trace(&self) -> Option<&(TraceParent, [u8; 8])> {
        self.trace
            .get_or_init(|| {
                self.header(headers::TRACEPARENT)
                    .and_then(TraceParent::parse)
                    .map(|t| (t, span_id()))
            })
            .as_ref()
    }

    /// The trace it continues, as its sender gave it (`traceparent`).
    pub fn traceparent(&self) -> Option<TraceParent> {
        self.trace().map(|(t, _)| *t)
    }

    /// Id of the trace it belongs to, if it continues one.
    pub fn trace_id(&self) -> Option<String> {
        self.trace().map(|(t, _)| t.trace_id())
    }

    /// Id of the span of its handling (the parent of what its handler
    /// sends), if it continues a trace.
    pub fn span_id(&self) -> Option<String> {
        self.trace().map(|(_, s)| super::trace::to_hex(s))
    }

    /// The trace for messages its handler sends: the same trace, with this
    /// handling as their parent.
    pub(crate) fn child_trace(&self) -> Option<TraceParent> {
        self.trace().map(|(t, s)| t.with_parent(*s))
    }

    /// The message's headers, as received.
    pub fn headers(&self) -> Option<&async_nats::HeaderMap> {
        self.headers.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_messages_correlate_to_themselves() {
        let meta = MessageMeta::new("s".into(), None, None, 1);
        assert_eq!(meta.message_id(), meta.correlation_id());
        assert_eq!(meta.message_id(), meta.message_id(), "a made-up id is stable");
        assert!(meta.causation_id().is_none());
        assert!(!meta.has_sender_id());
    }
}
