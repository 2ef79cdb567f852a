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
    /// unknown version (400).
    Invalid,
    /// The thing the message refers to does not exist (404).
    NotFound,
    /// The message conflicts with the current state (409).
    Conflict,
    /// The handler failed (500).
    Handler,
    /// The handler panicked; the panic was contained (500).
    Panic,
    /// No replica subscribes to the subject (503). Retryable.
    NoHandler,
    /// No reply arrived in time (504). Retryable.
    Timeout,
    /// The broker connection failed or is gone (503). Retryable.
    Transport,
    /// The replica is shutting down or over its capacity (503). Retryable.
    Unavailable,
    /// The configuration or the handler registry is wrong; fix and restart.
    Config,
    /// A bug in catga or an unexpected reply (500).
    Internal,
}

impl ErrorKind {
    /// The status code used in error replies (`Nats-Service-Error-Code`).
    pub fn code(self) -> u16 {
        match self {
            ErrorKind::Decode | ErrorKind::Invalid => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
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
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
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
        let by_name = match name {
            Some("decode") => Some(ErrorKind::Decode),
            Some("invalid") => Some(ErrorKind::Invalid),
            Some("not_found") => Some(ErrorKind::NotFound),
            Some("conflict") => Some(ErrorKind::Conflict),
            Some("handler") => Some(ErrorKind::Handler),
            Some("panic") => Some(ErrorKind::Panic),
            Some("no_handler") => Some(ErrorKind::NoHandler),
            Some("timeout") => Some(ErrorKind::Timeout),
            Some("transport") => Some(ErrorKind::Transport),
            Some("unavailable") => Some(ErrorKind::Unavailable),
            Some("config") => Some(ErrorKind::Config),
            Some("internal") => Some(ErrorKind::Internal),
            _ => None,
        };
        by_name.unwrap_or(match code {
            Some(400) => ErrorKind::Invalid,
            Some(404) => ErrorKind::NotFound,
            Some(409) => ErrorKind::Conflict,
            Some(503) => ErrorKind::Unavailable,
            Some(504) => ErrorKind::Timeout,
            _ => ErrorKind::Handler,
        })
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
/// same kind and message, across processes.
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// A new error of the given kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
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

    /// The message conflicts with the current state (409).
    pub fn conflict(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Conflict, message)
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
    /// True for missing responders, time-outs, broker failures and replicas
    /// that are shutting down; false for bad input and handler failures.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::NoHandler | ErrorKind::Timeout | ErrorKind::Transport | ErrorKind::Unavailable
        )
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_wire_names() {
        for kind in [
            ErrorKind::Decode,
            ErrorKind::Invalid,
            ErrorKind::NotFound,
            ErrorKind::Conflict,
            ErrorKind::Handler,
            ErrorKind::Panic,
            ErrorKind::NoHandler,
            ErrorKind::Timeout,
            ErrorKind::Transport,
            ErrorKind::Unavailable,
            ErrorKind::Config,
            ErrorKind::Internal,
        ] {
            assert_eq!(ErrorKind::from_wire(Some(kind.as_str()), None), kind);
        }
        assert_eq!(ErrorKind::from_wire(None, Some(404)), ErrorKind::NotFound);
        assert_eq!(ErrorKind::from_wire(Some("???"), Some(500)), ErrorKind::Handler);
    }

    #[test]
    fn only_transient_kinds_are_retryable() {
        assert!(Error::new(ErrorKind::Timeout, "t").is_retryable());
        assert!(Error::new(ErrorKind::NoHandler, "n").is_retryable());
        assert!(!Error::invalid("bad").is_retryable());
        assert!(!Error::msg("boom").is_retryable());
        assert_eq!(Error::not_found("x").to_string(), "not_found (404): x");
    }
}
