//! Decode and encode errors.
//!
//! No error carries a value taken from the message: only kinds, lengths and limits. A
//! rejected frame can therefore be logged without leaking patient data.

use std::cell::Cell;
use std::fmt;

use crate::message::MessageKind;

/// Why a frame was rejected. The whole frame is rejected; nothing of it may be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The frame does not start with `CCSP`: usually a misrouted request, or a proxy's
    /// error page where a frame was expected.
    #[error("not a carecache sync frame (bad magic)")]
    BadMagic,
    /// The peer speaks a protocol version this build does not (peer too new or too old).
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u16),
    /// The kind byte names no message of this version (peer bug or corruption).
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The compression byte names no algorithm this version knows (peer bug).
    #[error("unknown compression algorithm {0}")]
    UnknownCompression(u8),
    /// The message kind may not be compressed (peer bug).
    #[error("{0} messages may not be compressed")]
    CompressionNotAllowed(MessageKind),
    /// A declared length is over the limit for the message kind (hostile or buggy peer,
    /// or a device budget smaller than the hub honoured).
    #[error("{kind} message of {len} bytes is over the limit of {limit} bytes")]
    Oversize {
        /// The kind named in the header.
        kind: MessageKind,
        /// The declared length that was refused.
        len: u64,
        /// The limit in force.
        limit: u64,
    },
    /// Fewer bytes arrived than the header declares (connection cut, proxy truncation).
    #[error("frame truncated: {got} of {expected} bytes")]
    Truncated {
        /// Bytes present.
        got: u64,
        /// Bytes the header promised (or the header length, if even that is missing).
        expected: u64,
    },
    /// More bytes arrived than the header declares, or bytes follow the message inside
    /// the payload (peer bug, or an attempt to smuggle data past the authenticated part).
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(u64),
    /// An uncompressed frame whose two length fields differ (peer bug).
    #[error("uncompressed frame with inconsistent length fields")]
    LengthMismatch,
    /// The compressed payload is not a valid zstd stream, or it inflates past the
    /// declared size (decompression bomb).
    #[error("compressed payload is corrupt or larger than declared")]
    DecompressionFailed,
    /// The payload inflated to a different size than declared (peer bug or tampering).
    #[error("compressed payload inflated to {actual} bytes, {declared} declared")]
    DecompressedLengthMismatch {
        /// Size in the header.
        declared: u64,
        /// Size produced.
        actual: u64,
    },
    /// An enum tag outside this version's variants (peer newer than its version claims,
    /// or corruption).
    #[error("unknown enum tag in message")]
    UnknownEnumTag,
    /// An NHS number failed the format or Modulus 11 check (upstream data error).
    #[error("invalid NHS number in message")]
    InvalidNhsNumber,
    /// A field broke its rule (length, character set, range, date, code check digit).
    #[error("invalid field: {0}")]
    InvalidField(&'static str),
    /// A list holds more items than its limit.
    #[error("list of more than {max} items")]
    TooManyItems {
        /// The limit for that list.
        max: u64,
    },
    /// Fields that are each valid contradict one another (e.g. a patient both objected
    /// and upserted in one batch).
    #[error("inconsistent message: {0}")]
    Inconsistent(&'static str),
    /// The bytes are not a postcard encoding of the message (bad varint, bad bool,
    /// bad UTF-8, message ends early).
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// The bytes decode, but are not the unique encoding of what they decode to
    /// (overlong varint). Refused so that every message has exactly one encoding.
    #[error("non-canonical encoding")]
    NonCanonical,
}

impl DecodeError {
    /// A stable, lower-case name for the error kind, used by the test vectors
    /// (`expect: error <name>`) and in metrics labels.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::BadMagic => "bad-magic",
            Self::UnsupportedVersion(_) => "unsupported-version",
            Self::UnknownKind(_) => "unknown-kind",
            Self::UnknownCompression(_) => "unknown-compression",
            Self::CompressionNotAllowed(_) => "compression-not-allowed",
            Self::Oversize { .. } => "oversize",
            Self::Truncated { .. } => "truncated",
            Self::TrailingBytes(_) => "trailing-bytes",
            Self::LengthMismatch => "length-mismatch",
            Self::DecompressionFailed => "decompression-failed",
            Self::DecompressedLengthMismatch { .. } => "decompressed-length-mismatch",
            Self::UnknownEnumTag => "unknown-enum-tag",
            Self::InvalidNhsNumber => "invalid-nhs-number",
            Self::InvalidField(_) => "invalid-field",
            Self::TooManyItems { .. } => "too-many-items",
            Self::Inconsistent(_) => "inconsistent",
            Self::Malformed(_) => "malformed",
            Self::NonCanonical => "non-canonical",
        }
    }
}

/// Why a message could not be encoded. Encoding only fails on size: every value that
/// can be built is valid by construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded message is over its kind's limit (the caller must split it, e.g.
    /// send fewer records per batch).
    #[error("{kind} message of {len} bytes is over the limit of {limit} bytes")]
    Oversize {
        /// The message kind.
        kind: MessageKind,
        /// Its encoded length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The serializer or compressor failed (a bug: should not happen).
    #[error("encoder failure")]
    Internal,
    /// The message uses what the requested protocol version cannot carry.
    #[error("message cannot be written in protocol version {0}")]
    NotRepresentable(u16),
}

/// A field-level rule that a value broke. Raised by constructors (`TryFrom`, `new`) and,
/// during decoding, turned into the matching [`DecodeError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FieldError {
    /// Not a valid NHS number (format or Modulus 11).
    #[error("invalid NHS number")]
    NhsNumber,
    /// A field broke its rule; the text names the rule, never the value.
    #[error("{0}")]
    Invalid(&'static str),
    /// A list is over its limit.
    #[error("list of more than {max} items")]
    TooManyItems {
        /// The limit.
        max: u64,
    },
    /// Fields contradict one another.
    #[error("{0}")]
    Inconsistent(&'static str),
}

impl From<FieldError> for DecodeError {
    fn from(e: FieldError) -> Self {
        match e {
            FieldError::NhsNumber => Self::InvalidNhsNumber,
            FieldError::Invalid(what) => Self::InvalidField(what),
            FieldError::TooManyItems { max } => Self::TooManyItems { max },
            FieldError::Inconsistent(what) => Self::Inconsistent(what),
        }
    }
}

// postcard drops the text of custom serde errors (`SerdeDeCustom` carries nothing), so
// the typed reason is parked here by `field_error` and collected by the decoder on the
// same thread, within the same call. It is cleared before each decode.
thread_local! {
    static LAST_FIELD_ERROR: Cell<Option<FieldError>> = const { Cell::new(None) };
}

/// Turn a field error into a serde error, remembering its kind for [`take_field_error`].
pub(crate) fn field_error<E: serde::de::Error>(e: FieldError) -> E {
    LAST_FIELD_ERROR.with(|c| c.set(Some(e)));
    E::custom(e)
}

pub(crate) fn clear_field_error() {
    LAST_FIELD_ERROR.with(|c| c.set(None));
}

pub(crate) fn take_field_error() -> Option<FieldError> {
    LAST_FIELD_ERROR.with(Cell::take)
}

/// Map a postcard error to a decode error, using the parked field error if any.
pub(crate) fn from_postcard(e: postcard::Error) -> DecodeError {
    use postcard::Error as P;
    match e {
        // Every check of ours parks its reason before raising a custom error; the only
        // other custom error postcard can surface is serde-derive's "invalid value" for
        // a variant index past the last variant.
        P::SerdeDeCustom => {
            take_field_error().map_or(DecodeError::UnknownEnumTag, DecodeError::from)
        }
        P::DeserializeUnexpectedEnd => DecodeError::Malformed("message ends early"),
        P::DeserializeBadVarint => DecodeError::Malformed("bad varint"),
        P::DeserializeBadBool => DecodeError::Malformed("bad bool"),
        P::DeserializeBadChar => DecodeError::Malformed("bad char"),
        P::DeserializeBadUtf8 => DecodeError::Malformed("bad UTF-8"),
        P::DeserializeBadOption => DecodeError::Malformed("bad option tag"),
        P::DeserializeBadEnum => DecodeError::UnknownEnumTag,
        _ => DecodeError::Malformed("undecodable"),
    }
}

/// Writes "N bytes" for redacted `Debug` output.
pub(crate) struct Redacted(pub(crate) usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<redacted {} bytes>", self.0)
    }
}
