//! The one error type of catga.

use std::fmt;

/// A `Result` whose error is [`catga::Error`](Error).
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarse enough to act on (retry, reject, page someone).
///
/// Each kind maps to a status code in the NATS micro convention
/// (`Nats-Service-Error-Code`), so other NATS clients understand error replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The payload could not be decoded into the expected message type (400).
    Decode,
    /// The message was decoded but is not acceptable: failed validation,
    /// unknown version, a malformed id or subject (400).
    Invalid,
    /// The broker or the store refused the credentials (401).
    Unauthorized,
    /// The thing the message refers to does not exist (404).
    NotFound,
    /// The message conflicts with the current state (409): the order is
    /// shipped already, the seat is taken. Not retryable: sending it again
    /// meets the same state.
    Conflict,
    /// The state changed since the handler loaded it (409): an
    /// optimistic-concurrency conflict on save. Retryable: a second attempt
    /// loads the new version and may pass (`retry = N` does that in the
    /// handler's replica).
    Stale,
    /// A message or reply is larger than the broker accepts (413). Sending
    /// it again cannot succeed.
    TooLarge,
    /// The handler failed (500).
    Handler,
    /// The handler panicked; the panic was contained (500).
    Panic,
    /// No replica subscribes to the subject (503). Retryable.
    NoHandler,
    /// No reply arrived in time (504). Retryable.
    Timeout,
    /// The broker or store connection failed or is gone (503). Retryable.
    Transport,
    /// The replica is shutting down, over its capacity, or a circuit breaker
    /// is open (503). Retryable.
    Unavailable,
    /// The configuration or the handler registry is wrong; fix and restart.
    Config,
    /// A bug in catga or an unexpected reply (500).
    Internal,
}

/// Every kind, for tables and tests.
pub(crate) const ALL_KINDS: [ErrorKind; 15] = [
    ErrorKind::Decode,
    ErrorKind::Invalid,
    ErrorKind::Unauthorized,
    ErrorKind::NotFound,
    ErrorKind::Conflict,
    ErrorKind::Stale,
    ErrorKind::TooLarge,
    ErrorKind::Handler,
    ErrorKind::Panic,
    ErrorKind::NoHandler,
    ErrorKind::Timeout,
    ErrorKind::Transport,
    ErrorKind::Unavailable,
    ErrorKind::Config,
    ErrorKind::Internal,
];

impl ErrorKind {
    /// The status code used in error replies (`Nats-Service-Error-Code`).
    pub fn code(self) -> u16 {
        match self {
            ErrorKind::Decode | ErrorKind::Invalid => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict | ErrorKind::Stale => 409,
            ErrorKind::TooLarge => 413,
            ErrorKind::Handler | ErrorKind::Panic | ErrorKind::Internal | ErrorKind::Config => 500,
            ErrorKind::NoHandler | ErrorKind::Transport | ErrorKind::Unavailable => 503,
            ErrorKind::Timeout => 504,
        }
    }

    /// The stable name carried in the `Catga-Error-Kind` header.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Decode => "decode",
            ErrorKind::Invalid => "invalid",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::Stale => "stale",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Handler => "handler",
            ErrorKind::Panic => "panic",
            ErrorKind::NoHandler => "no_handler",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Transport => "transport",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Config => "config",
            ErrorKind::Internal => "internal",
        }
    }

    /// Parses [`as_str`](Self::as_str); falls back on the status code for
    /// replies from non-catga services.
    pub fn from_wire(name: Option<&str>, code: Option<u16>) -> ErrorKind {
        if let Some(kind) = name.and_then(|n| ALL_KINDS.into_iter().find(|k| k.as_str() == n)) {
            return kind;
        }
        match code {
            Some(400) => ErrorKind::Invalid,
            Some(401 | 403) => ErrorKind::Unauthorized,
            Some(404) => ErrorKind::NotFound,
            Some(409) => ErrorKind::Conflict,
            Some(413) => ErrorKind::TooLarge,
            Some(503) => ErrorKind::Unavailable,
            Some(504) => ErrorKind::Timeout,
            _ => ErrorKind::Handler,
        }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::NoHandler
                | ErrorKind::Timeout
                | ErrorKind::Transport
                | ErrorKind::Unavailable
                | ErrorKind::Stale
        )
    }

    /// Whether an error reply of this kind carries the handler's own text.
    /// Client-side mistakes (4xx) do: the handler wrote them for the
    /// caller. Failures (5xx) do not by default: their text may hold
    /// internals (a database error with a password, a file path), so the
    /// reply names the kind and an error id and the text goes to the log.
    pub(crate) fn is_public(self) -> bool {
        self.code() < 500
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error of every catga operation and of every handler.
///
/// Handlers return it to produce an error reply; senders receive it with the
/// same kind across processes. The message of a 4xx error
/// ([`invalid`](Self::invalid), [`not_found`](Self::not_found),
/// [`conflict`](Self::conflict)) reaches the sender as written; the message
/// of a 5xx error is logged where it happened, under an error id, and the
/// sender gets the kind and that id.
pub struct Error {
    kind: ErrorKind,
    message: String,
    origin: Origin,
    /// Written by catga itself for the caller (an open breaker, a full
    /// subscription): safe to send as written, whatever the kind.
    exposed: bool,
    /// When a durable message that failed with it should come back (a
    /// saga waiting for a durable timer), instead of the back-off.
    retry_after: Option<std::time::Duration>,
    /// Whether what failed may have taken effect (a commit whose reply
    /// was lost): not run again in place, whatever the kind.
    in_doubt: bool,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Where an error was made.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    /// Here.
    Local,
    /// In the handler behind `subject`, decoded from its error reply, or
    /// met while calling it. `repeatable`: the command is idempotent, so
    /// sending it again under its id cannot run it twice. `answered`: its
    /// handler replied with this error (a "no handler" it replied is not
    /// the transport's: the handler ran).
    Remote {
        subject: String,
        repeatable: bool,
        answered: bool,
    },
}

impl Error {
    /// A new error of the given kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            origin: Origin::Local,
            exposed: false,
            retry_after: None,
            in_doubt: false,
            source: None,
        }
    }

    /// The same error, saying that what failed may have taken effect: the
    /// handler is not run again in place (a retry by the sender finds the
    /// answer if it did).
    pub(crate) fn in_doubt(mut self) -> Error {
        self.in_doubt = true;
        self
    }

    /// Whether what failed may have taken effect (see [`in_doubt`](Self::in_doubt)).
    pub(crate) fn is_in_doubt(&self) -> bool {
        self.in_doubt
    }

    /// The same error, asking a durable message to come back after `delay`.
    pub(crate) fn with_retry_after(mut self, delay: std::time::Duration) -> Error {
        self.retry_after = Some(delay);
        self
    }

    /// When the durable message should come back, if the error says.
    pub(crate) fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after
    }

    /// The same error, marked as written by catga for the caller.
    pub(crate) fn exposed(mut self) -> Error {
        self.exposed = true;
        self
    }

    /// Whether a caller may see the message as written: a 4xx error, or
    /// one catga wrote for the caller.
    pub(crate) fn is_public(&self) -> bool {
        self.exposed || self.kind.is_public()
    }

    /// A handler failure (500) with the given message.
    pub fn msg(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Handler, message)
    }

    /// A rejected message (400), e.g. failed validation.
    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Invalid, message)
    }

    /// The referenced entity does not exist (404).
    pub fn not_found(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::NotFound, message)
    }

    /// The message conflicts with the current state (409, not retryable).
    pub fn conflict(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Conflict, message)
    }

    /// The state changed since it was loaded (409, retryable); what a
    /// stale [`Context::save`](crate::Context::save) returns.
    pub fn stale(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Stale, message)
    }

    /// A transient failure the sender may retry (503), e.g. a dependency
    /// that is down.
    pub fn unavailable(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Unavailable, message)
    }

    /// Wraps any error as a handler failure, keeping it as the source.
    pub fn handler<E>(err: E) -> Error
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Error::new(ErrorKind::Handler, err.to_string()).with_source(err)
    }

    /// Attaches an underlying cause.
    pub fn with_source<E>(mut self, err: E) -> Error
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        self.source = Some(Box::new(err));
        self
    }

    /// An error decoded from the error reply of the handler behind `subject`.
    pub(crate) fn remote(kind: ErrorKind, message: String, subject: &str) -> Error {
        Error {
            kind,
            message,
            origin: Origin::Remote {
                subject: subject.to_owned(),
                repeatable: false,
                answered: true,
            },
            exposed: false,
            retry_after: None,
            in_doubt: false,
            source: None,
        }
    }

    /// Marks an error met while calling the handler behind `subject` from
    /// inside a handler (see [`into_handler_failure`](Self::into_handler_failure));
    /// `repeatable`: that command is idempotent.
    pub(crate) fn downstream(self, subject: &str, repeatable: bool) -> Error {
        let (subject, answered) = match self.origin {
            Origin::Remote {
                subject, answered, ..
            } => (subject, answered),
            Origin::Local => (subject.to_owned(), false),
        };
        Error {
            origin: Origin::Remote {
                subject,
                repeatable,
                answered,
            },
            ..self
        }
    }

    /// Whether this error came back from another handler (a nested send)
    /// rather than being made here.
    pub fn is_remote(&self) -> bool {
        matches!(self.origin, Origin::Remote { .. })
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The human-readable message (without the kind).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The status code in the NATS micro convention.
    pub fn code(&self) -> u16 {
        self.kind.code()
    }

    /// Whether retrying the same operation later may succeed.
    ///
    /// True for missing responders, time-outs, broker failures, replicas
    /// that are shutting down or over capacity, and version conflicts;
    /// false for bad input and handler failures.
    pub fn is_retryable(&self) -> bool {
        self.kind.is_retryable()
    }

    /// What the run of an event handler that holds its message's inbox
    /// claim comes to when it returns this error. An event has no caller to
    /// mislead, and such a handler runs again with nothing committed and
    /// under the same derived ids. So the failure of a nested send keeps its
    /// kind, named as downstream in the message, when the handler's run
    /// again cannot run the command twice (an idempotent command, or one no
    /// replica took) or is not tried at all (a refusal): a time-out or no
    /// replica is tried again (`retry`, then a durable redelivery), and a
    /// refusal is final. A retryable failure of any other command is the
    /// handler's own failure, as for a command
    /// ([`into_handler_failure`](Self::into_handler_failure)).
    /// A durable, idempotent billing handler whose command timed out was
    /// dead-lettered at its first delivery when every such failure was the
    /// handler's own 500.
    ///
    /// `sent_unrepeatable`: the handler sent a command that is not
    /// idempotent, which a run again would send again; then only a refusal
    /// keeps its kind.
    pub(crate) fn into_event_failure(self, sent_unrepeatable: bool) -> Error {
        match &self.origin {
            Origin::Local => self,
            Origin::Remote {
                subject,
                repeatable,
                answered,
            } if !self.kind.is_retryable()
                || (!sent_unrepeatable
                    && (*repeatable || (self.kind == ErrorKind::NoHandler && !*answered))) =>
            {
                Error::new(
                    self.kind,
                    format!("a downstream call failed: {subject} answered: {}", self.message),
                )
            }
            Origin::Remote { .. } => self.into_handler_failure(),
        }
    }

    /// What a handler's caller sees when the handler returns this error
    /// (see [`Error`]): a failure of a nested send is the handler's own
    /// failure, not the downstream kind, because the handler already ran.
    pub(crate) fn into_handler_failure(self) -> Error {
        match &self.origin {
            Origin::Local => self,
            Origin::Remote { subject, .. } => Error::new(
                ErrorKind::Handler,
                format!(
                    "a downstream call failed: {subject} answered {} ({}): {}",
                    self.kind,
                    self.kind.code(),
                    self.message
                ),
            ),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Origin::Remote { subject, .. } = &self.origin {
            d.field("from", subject);
        }
        if let Some(source) = &self.source {
            d.field("source", source);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.kind, self.kind.code(), self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Error {
        Error::new(ErrorKind::Decode, err.to_string()).with_source(err)
    }
}

/// The text of a caught panic (`&str` or `String` payloads).
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_wire_names() {
        for kind in ALL_KINDS {
            assert_eq!(ErrorKind::from_wire(Some(kind.as_str()), None), kind);
        }
        assert_eq!(ErrorKind::from_wire(None, Some(404)), ErrorKind::NotFound);
        assert_eq!(ErrorKind::from_wire(None, Some(413)), ErrorKind::TooLarge);
        assert_eq!(ErrorKind::from_wire(Some("???"), Some(500)), ErrorKind::Handler);
    }

    #[test]
    fn only_transient_kinds_are_retryable() {
        assert!(Error::new(ErrorKind::Timeout, "t").is_retryable());
        assert!(Error::new(ErrorKind::NoHandler, "n").is_retryable());
        assert!(Error::stale("stale version").is_retryable());
        assert!(!Error::conflict("already shipped").is_retryable());
        assert_eq!(Error::stale("s").code(), Error::conflict("c").code());
        assert!(!Error::invalid("bad").is_retryable());
        assert!(!Error::msg("boom").is_retryable());
        assert!(!Error::new(ErrorKind::TooLarge, "big").is_retryable());
        assert_eq!(Error::not_found("x").to_string(), "not_found (404): x");
    }

    #[test]
    fn a_downstream_failure_is_the_handlers_own() {
        let downstream = Error::remote(ErrorKind::NoHandler, "no handler".into(), "cmd.echo");
        assert!(downstream.is_retryable() && downstream.is_remote());
        let own = downstream.into_handler_failure();
        assert_eq!(own.kind(), ErrorKind::Handler);
        assert!(!own.is_retryable());
        assert!(
            own.message().contains("cmd.echo answered no_handler (503)"),
            "{own}"
        );
        let local = Error::invalid("x").into_handler_failure();
        assert_eq!(local.kind(), ErrorKind::Invalid);
    }

    #[test]
    fn an_event_handler_keeps_the_downstream_kind() {
        let timeout = Error::new(ErrorKind::Timeout, "no reply")
            .downstream("cmd.count", true)
            .into_event_failure(false);
        assert_eq!(timeout.kind(), ErrorKind::Timeout);
        assert!(timeout.is_retryable() && !timeout.is_remote());
        assert!(
            timeout.message().contains("cmd.count answered: no reply"),
            "{timeout}"
        );
        let refused = Error::remote(ErrorKind::Invalid, "bad".into(), "cmd.count")
            .downstream("cmd.count", true)
            .into_event_failure(false);
        assert_eq!(refused.kind(), ErrorKind::Invalid);
        // A command that is not idempotent may have run: sent again, it
        // could run twice. Unless no replica took it.
        let once = Error::new(ErrorKind::Timeout, "no reply")
            .downstream("cmd.once", false)
            .into_event_failure(false);
        assert_eq!(once.kind(), ErrorKind::Handler);
        let nobody = Error::new(ErrorKind::NoHandler, "no responders")
            .downstream("cmd.once", false)
            .into_event_failure(false);
        assert_eq!(nobody.kind(), ErrorKind::NoHandler);
        // A "no handler" its handler replied: the handler ran.
        let replied = Error::remote(ErrorKind::NoHandler, "no stream".into(), "cmd.once")
            .downstream("cmd.once", false)
            .into_event_failure(false);
        assert_eq!(replied.kind(), ErrorKind::Handler);
        let refused_once = Error::remote(ErrorKind::Invalid, "bad".into(), "cmd.once")
            .downstream("cmd.once", false)
            .into_event_failure(false);
        assert_eq!(refused_once.kind(), ErrorKind::Invalid);
        // Sent again, an earlier command that is not idempotent would run
        // twice: only a refusal keeps its kind then.
        let after_once = Error::new(ErrorKind::Timeout, "no reply")
            .downstream("cmd.count", true)
            .into_event_failure(true);
        assert_eq!(after_once.kind(), ErrorKind::Handler);
        let refused_after = Error::remote(ErrorKind::Invalid, "bad".into(), "cmd.count")
            .downstream("cmd.count", true)
            .into_event_failure(true);
        assert_eq!(refused_after.kind(), ErrorKind::Invalid);
        let local = Error::unavailable("x").into_event_failure(false);
        assert_eq!(local.message(), "x");
    }
}
