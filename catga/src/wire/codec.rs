//! Payload encoding: JSON (serde_json), so that the `nats` CLI and clients
//! in any language can read and write every message.
//!
//! The message traits require [`Encode`] and [`Decode`] rather than serde's
//! traits directly: each has one blanket implementation over serde, so a
//! type without the derive gets one short error that names the derive to
//! add, instead of a page about sealed traits.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, ErrorKind, Result};

/// A value catga can put on the wire: every `serde::Serialize` type.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be sent by catga: it does not implement `serde::Serialize`",
    label = "needs `#[derive(serde::Serialize)]`",
    note = "add `#[derive(serde::Serialize, serde::Deserialize)]` to `{Self}`"
)]
pub trait Encode {
    /// The JSON encoding of `self`.
    fn encode(&self) -> Result<Bytes>;
}

#[diagnostic::do_not_recommend]
impl<T: Serialize + ?Sized> Encode for T {
    fn encode(&self) -> Result<Bytes> {
        encode(self)
    }
}

/// A value catga can read from the wire: every `serde::de::DeserializeOwned`
/// type.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be received by catga: it does not implement `serde::Deserialize`",
    label = "needs `#[derive(serde::Deserialize)]`",
    note = "add `#[derive(serde::Serialize, serde::Deserialize)]` to `{Self}`"
)]
pub trait Decode: Sized {
    /// Decodes a JSON payload; the error names `type_name`.
    fn decode(payload: &[u8], type_name: &str) -> Result<Self>;
}

#[diagnostic::do_not_recommend]
impl<T: DeserializeOwned> Decode for T {
    fn decode(payload: &[u8], type_name: &str) -> Result<Self> {
        decode(payload, type_name)
    }
}

/// Encodes a value as JSON.
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes> {
    // serde_json starts at 128 bytes; most messages are a little larger, and
    // growing the buffer mid-way costs a reallocation and a copy.
    let mut buf = Vec::with_capacity(256);
    serde_json::to_writer(&mut buf, value)
        .map(|()| Bytes::from(buf))
        .map_err(|e| Error::new(ErrorKind::Internal, format!("cannot encode payload: {e}")))
}

/// Decodes JSON into `T`; the error names the expected type.
pub(crate) fn decode<T: DeserializeOwned>(payload: &[u8], type_name: &str) -> Result<T> {
    // An empty payload is decoded as JSON `null`, so unit replies travel as
    // empty bodies and `()`/`Option` types still decode.
    let payload: &[u8] = if payload.is_empty() { b"null" } else { payload };
    serde_json::from_slice(payload).map_err(|e| {
        Error::new(
            ErrorKind::Decode,
            format!("cannot decode payload as `{type_name}`: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Ping {
        n: u32,
    }

    #[test]
    fn round_trip_and_errors_name_the_type() {
        let bytes = Ping { n: 7 }.encode().expect("encode");
        assert_eq!(&bytes[..], br#"{"n":7}"#);
        assert_eq!(Ping::decode(&bytes, "Ping").expect("decode"), Ping { n: 7 });
        let err = Ping::decode(b"not json", "Ping").expect_err("must fail");
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert!(err.message().contains("`Ping`"), "{err}");
        <()>::decode(b"", "()").expect("empty payload is unit");
    }
}
