//! Error replies in the NATS micro convention: `Nats-Service-Error` (the
//! description) and `Nats-Service-Error-Code` (the status code), plus
//! catga's `Catga-Error-Kind` and `Catga-Error-Id`; the body is empty.
//!
//! The text travels once, in the header, bounded to [`MAX_TEXT`] bytes, so
//! an error reply stays small even when it replaces a reply that was too
//! large to send.

use async_nats::HeaderMap;
use bytes::Bytes;

use super::headers;
use crate::error::{Error, ErrorKind};

/// Longest error description sent, in bytes.
pub(crate) const MAX_TEXT: usize = 1024;

/// What a caller is told about a failure: the text for 4xx kinds, the kind
/// and the error id for 5xx kinds (see [`Error`]).
pub(crate) fn public_text(err: &Error, error_id: Option<&str>) -> String {
    if err.is_public() {
        return err.message().to_owned();
    }
    let what = match err.kind() {
        ErrorKind::Panic => "the handler panicked",
        ErrorKind::Handler => "the handler failed",
        ErrorKind::Timeout => "the handler timed out",
        ErrorKind::NoHandler | ErrorKind::Transport | ErrorKind::Unavailable => {
            "the service is unavailable; retry later"
        }
        _ => "internal error",
    };
    match error_id {
        Some(id) => format!("{what} (error id {id})"),
        None => what.to_owned(),
    }
}

/// Makes `text` a valid header value: one line of printable characters, at
/// most [`MAX_TEXT`] bytes (cut at a character boundary).
fn header_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_TEXT));
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_TEXT {
            break;
        }
        out.push(c);
    }
    out
}

/// The headers and body of an error reply; `error_id` names the log line
/// that holds the full text of a 5xx error.
pub(crate) fn encode(err: &Error, error_id: Option<&str>) -> (HeaderMap, Bytes) {
    let mut h = HeaderMap::new();
    h.insert(headers::SERVICE_ERROR, header_text(&public_text(err, error_id)));
    h.insert(headers::SERVICE_ERROR_CODE, err.code().to_string());
    h.insert(headers::ERROR_KIND, err.kind().as_str());
    if let Some(id) = error_id {
        h.insert(headers::ERROR_ID, id);
    }
    (h, Bytes::new())
}

/// The error carried by a reply from `subject`, if it is an error reply
/// (catga's or any NATS micro service's).
pub(crate) fn decode(hdrs: Option<&HeaderMap>, payload: &[u8], subject: &str) -> Option<Error> {
    let h = hdrs?;
    let code = h.get(headers::SERVICE_ERROR_CODE)?;
    let code = code.as_str().trim().parse::<u16>().ok();
    let kind = ErrorKind::from_wire(h.get(headers::ERROR_KIND).map(|v| v.as_str()), code);
    let message = match h.get(headers::SERVICE_ERROR) {
        Some(m) if !m.as_str().is_empty() => m.as_str().to_owned(),
        _ => String::from_utf8_lossy(payload).into_owned(),
    };
    Some(Error::remote(kind, message, subject))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_round_trip_with_their_text() {
        let err = Error::not_found("order 7 does not exist\nreally");
        let (h, body) = encode(&err, None);
        assert!(body.is_empty(), "the text travels once, in the header");
        let back = decode(Some(&h), &body, "cmd.get").expect("error reply");
        assert_eq!(back.kind(), ErrorKind::NotFound);
        assert_eq!(back.message(), "order 7 does not exist really");
        assert!(back.is_remote());
    }

    #[test]
    fn failures_hide_their_text_behind_an_error_id() {
        let err = Error::msg("connect to postgres://admin:hunter2@db failed");
        let (h, _) = encode(&err, Some("E42"));
        let back = decode(Some(&h), &[], "cmd.x").expect("error reply");
        assert_eq!(back.kind(), ErrorKind::Handler);
        assert_eq!(back.message(), "the handler failed (error id E42)");
        assert_eq!(h.get(headers::ERROR_ID).map(|v| v.as_str()), Some("E42"));
    }

    #[test]
    fn long_texts_are_bounded() {
        let err = Error::invalid("é".repeat(5000));
        let (h, _) = encode(&err, None);
        let text = h.get(headers::SERVICE_ERROR).expect("text").as_str();
        assert!(text.len() <= MAX_TEXT && text.starts_with("éé"));
    }

    #[test]
    fn plain_micro_errors_map_by_code() {
        let mut h = HeaderMap::new();
        h.insert("Nats-Service-Error", "nope");
        h.insert("Nats-Service-Error-Code", "404");
        let e = decode(Some(&h), b"", "svc.x").expect("error");
        assert_eq!((e.kind(), e.message()), (ErrorKind::NotFound, "nope"));
        assert!(decode(None, b"{}", "svc.x").is_none());
    }
}
