//! Payload encoding. JSON (serde_json) so that the `nats` CLI can read and
//! write every message.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, ErrorKind, Result};

/// Encodes a value as JSON.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Bytes> {
    // serde_json starts at 128 bytes; most messages are a little larger, and
    // growing the buffer mid-way costs a reallocation and a copy.
    let mut buf = Vec::with_capacity(256);
    serde_json::to_writer(&mut buf, value)
        .map(|()| Bytes::from(buf))
        .map_err(|e| Error::new(ErrorKind::Internal, format!("cannot encode payload: {e}")))
}

/// Decodes JSON into `T`; the error names the expected type.
pub fn decode<T: DeserializeOwned>(payload: &[u8], type_name: &str) -> Result<T> {
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
        let bytes = encode(&Ping { n: 7 }).expect("encode");
        assert_eq!(&bytes[..], br#"{"n":7}"#);
        assert_eq!(decode::<Ping>(&bytes, "Ping").expect("decode"), Ping { n: 7 });
        let err = decode::<Ping>(b"not json", "Ping").expect_err("must fail");
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert!(err.message().contains("`Ping`"), "{err}");
        decode::<()>(b"", "()").expect("empty payload is unit");
    }
}
