//! Versioned encoding of protocol messages: compact bincode for machines,
//! JSON for humans. Both forms carry the message's format version; decoding
//! checks size limits first, then the version, then the body, then the
//! message's own semantic rules, so a value that decodes is a valid one.
//!
//! Binary form: `tag (4 bytes) || version (u32 LE) || bincode 2 body`
//! (standard configuration: little endian, variable-length integers).
//! JSON form: the message's fields plus `"version": N`.

use bincode::config::{Configuration, LittleEndian, Varint};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("{kind} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("not a {kind}: wrong tag")]
    WrongTag { kind: &'static str },
    #[error("unsupported {kind} version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        kind: &'static str,
        found: u64,
        supported: u32,
    },
    #[error("malformed {kind}: {reason}")]
    Malformed { kind: &'static str, reason: String },
    #[error("{kind} has {extra} unexpected trailing bytes")]
    TrailingBytes { kind: &'static str, extra: usize },
    #[error("invalid {kind}: {reason}")]
    Invalid { kind: &'static str, reason: String },
}

/// bincode configuration whose allocation budget is `N` bytes.
type Limited<const N: usize> = Configuration<LittleEndian, Varint, bincode::config::Limit<N>>;

/// Decodes a message body under an allocation budget that grows with the
/// input: about 64 bytes of memory per input byte for small inputs (a `None`
/// of a 40-byte value is 1 byte on the wire), so a few hostile bytes cannot
/// claim a large allocation, while a large valid message still decodes.
fn decode_body<M: Message>(body: &[u8]) -> Result<(M, usize), bincode::error::DecodeError> {
    const KIB: usize = 1024;
    const MIB: usize = 1024 * KIB;
    match body.len() {
        0..=16_384 => bincode::decode_from_slice(body, Limited::<MIB>::default()),
        16_385..=262_144 => bincode::decode_from_slice(body, Limited::<{ 16 * MIB }>::default()),
        262_145..=4_194_304 => {
            bincode::decode_from_slice(body, Limited::<{ 256 * MIB }>::default())
        }
        _ => bincode::decode_from_slice(body, Limited::<{ 1024 * MIB }>::default()),
    }
}

/// The two forms of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Binary,
    Json,
}

/// A protocol message with a binary and a JSON form.
pub trait Message:
    Sized + bincode::Encode + bincode::Decode<()> + Serialize + DeserializeOwned
{
    /// Human name, used in errors.
    const KIND: &'static str;
    /// First four bytes of the binary form.
    const TAG: [u8; 4];
    /// Format version this build writes and reads.
    const VERSION: u32;
    /// Largest encoded form accepted, in either encoding.
    const MAX_BYTES: usize;

    /// Semantic rules beyond the encoding (ranges, paths, sums, limits).
    fn validate(&self) -> Result<(), String>;

    /// Binary form.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&Self::TAG);
        out.extend_from_slice(&Self::VERSION.to_le_bytes());
        bincode::encode_into_std_write(self, &mut out, bincode::config::standard())
            .expect("writing to a Vec cannot fail");
        out
    }

    /// Parses and validates the binary form.
    fn from_bytes(bytes: &[u8]) -> Result<Self, MessageError> {
        let kind = Self::KIND;
        check_len::<Self>(bytes.len())?;
        if bytes.len() < 8 || bytes[..4] != Self::TAG {
            return Err(MessageError::WrongTag { kind });
        }
        let version = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        check_version::<Self>(version.into())?;
        let body = &bytes[8..];
        let (msg, used): (Self, usize) = decode_body(body).map_err(|e| {
            let reason = match e {
                bincode::error::DecodeError::LimitExceeded => {
                    "a length exceeds the decode limit for an input of this size".into()
                }
                other => other.to_string(),
            };
            MessageError::Malformed { kind, reason }
        })?;
        if used != body.len() {
            return Err(MessageError::TrailingBytes {
                kind,
                extra: body.len() - used,
            });
        }
        msg.validate()
            .map_err(|reason| MessageError::Invalid { kind, reason })?;
        Ok(msg)
    }

    /// JSON form.
    fn to_json(&self) -> String {
        let mut v = serde_json::to_value(self).expect("protocol types serialize");
        if let serde_json::Value::Object(map) = &mut v {
            map.insert("version".into(), Self::VERSION.into());
        }
        v.to_string()
    }

    /// Parses and validates the JSON form.
    fn from_json(text: &[u8]) -> Result<Self, MessageError> {
        let kind = Self::KIND;
        check_len::<Self>(text.len())?;
        let mut v: serde_json::Value =
            serde_json::from_slice(text).map_err(|e| MessageError::Malformed {
                kind,
                reason: e.to_string(),
            })?;
        let version = v
            .as_object_mut()
            .and_then(|m| m.remove("version"))
            .and_then(|v| v.as_u64())
            .ok_or_else(|| MessageError::Malformed {
                kind,
                reason: "missing numeric \"version\"".into(),
            })?;
        check_version::<Self>(version)?;
        let msg: Self = serde_json::from_value(v).map_err(|e| MessageError::Malformed {
            kind,
            reason: e.to_string(),
        })?;
        msg.validate()
            .map_err(|reason| MessageError::Invalid { kind, reason })?;
        Ok(msg)
    }

    /// The form `encoding` names.
    fn encode_as(&self, encoding: Encoding) -> Vec<u8> {
        match encoding {
            Encoding::Binary => self.to_bytes(),
            Encoding::Json => self.to_json().into_bytes(),
        }
    }

    /// Parses and validates the form `encoding` names.
    fn decode_as(bytes: &[u8], encoding: Encoding) -> Result<Self, MessageError> {
        match encoding {
            Encoding::Binary => Self::from_bytes(bytes),
            Encoding::Json => Self::from_json(bytes),
        }
    }
}

fn check_len<M: Message>(len: usize) -> Result<(), MessageError> {
    if len > M::MAX_BYTES {
        return Err(MessageError::TooLarge {
            kind: M::KIND,
            len,
            max: M::MAX_BYTES,
        });
    }
    Ok(())
}

fn check_version<M: Message>(found: u64) -> Result<(), MessageError> {
    if found != u64::from(M::VERSION) {
        return Err(MessageError::UnsupportedVersion {
            kind: M::KIND,
            found,
            supported: M::VERSION,
        });
    }
    Ok(())
}

/// Implements [`Message`] for a type with a `check` method; the version is
/// 1 unless given.
macro_rules! impl_message {
    ($ty:ty, $kind:literal, $tag:literal, $max:expr) => {
        $crate::codec::impl_message!($ty, $kind, $tag, $max, version 1);
    };
    ($ty:ty, $kind:literal, $tag:literal, $max:expr, version $version:literal) => {
        impl $crate::codec::Message for $ty {
            const KIND: &'static str = $kind;
            const TAG: [u8; 4] = *$tag;
            const VERSION: u32 = $version;
            const MAX_BYTES: usize = $max;

            fn validate(&self) -> Result<(), String> {
                <$ty>::check(self)
            }
        }
    };
}
pub(crate) use impl_message;
