//! Framing and the codec: header, limits, compression, canonical postcard.
//!
//! ```text
//! offset size field
//!      0    4 magic "CCSP"
//!      4    2 version            u16 big-endian
//!      6    1 kind               MessageKind
//!      7    1 compression        0 none, 1 zstd
//!      8    4 payload length     u32 big-endian, bytes after the header
//!     12    4 content length     u32 big-endian, payload bytes after decompression
//!     16    … payload
//! ```
//!
//! Decoding checks, in order: magic, version, kind, compression, both lengths against
//! the kind's limit (before reading or inflating anything), the frame length, then
//! inflates into a buffer of exactly the declared size, decodes, refuses trailing
//! bytes, and refuses any encoding that is not the one the encoder would produce.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{DecodeError, EncodeError, clear_field_error, from_postcard};
use crate::message::{Message, MessageKind, PullV1, WireBatch};
use crate::record::PatientRecord;
use crate::record::{v1, v2};

/// The four magic bytes.
pub const MAGIC: [u8; 4] = *b"CCSP";
/// Header length in bytes.
pub const HEADER_LEN: usize = 16;
/// The protocol version this crate encodes by default.
pub const VERSION: u16 = 8;
/// The versions this crate decodes (and encodes, with [`encode_version`]).
pub const SUPPORTED_VERSIONS: std::ops::RangeInclusive<u16> = 1..=8;
/// zstd level used when compressing: fast to encode, and decoding speed does not
/// depend on it.
const ZSTD_LEVEL: i32 = 3;

/// Payload compression.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum Compression {
    /// Payload sent as is.
    None = 0,
    /// Payload is one zstd frame.
    Zstd = 1,
}

impl Compression {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::None),
            1 => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// A parsed frame header. Lengths are checked against the kind's limit when parsed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FrameHeader {
    /// Protocol version.
    pub version: u16,
    /// Message kind.
    pub kind: MessageKind,
    /// Payload compression.
    pub compression: Compression,
    /// Bytes of payload that follow the header.
    pub payload_len: u32,
    /// Bytes of payload after decompression.
    pub content_len: u32,
}

impl FrameHeader {
    /// Parse and check a header from the start of `bytes`, with `limit` as the most
    /// content bytes accepted (never more than the kind's own limit). A transport calls
    /// this on the first 16 bytes to learn how much more to read, and refuses at once
    /// if it is too much.
    pub fn parse(bytes: &[u8], limit: u32) -> Result<Self, DecodeError> {
        let n = bytes.len().min(MAGIC.len());
        if bytes.get(..n) != MAGIC.get(..n) {
            return Err(DecodeError::BadMagic);
        }
        let Some(h) = bytes.first_chunk::<HEADER_LEN>() else {
            return Err(DecodeError::Truncated {
                got: len64(bytes.len()),
                expected: HEADER_LEN as u64,
            });
        };
        let [
            _,
            _,
            _,
            _,
            v0,
            v1,
            kind,
            comp,
            p0,
            p1,
            p2,
            p3,
            c0,
            c1,
            c2,
            c3,
        ] = *h;
        let version = u16::from_be_bytes([v0, v1]);
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let kind = MessageKind::from_u8(kind).ok_or(DecodeError::UnknownKind(kind))?;
        let compression =
            Compression::from_u8(comp).ok_or(DecodeError::UnknownCompression(comp))?;
        if compression != Compression::None && !kind.compressible() {
            return Err(DecodeError::CompressionNotAllowed(kind));
        }
        let payload_len = u32::from_be_bytes([p0, p1, p2, p3]);
        let content_len = u32::from_be_bytes([c0, c1, c2, c3]);
        let limit = limit.min(kind.max_payload());
        for len in [content_len, payload_len] {
            if len > limit {
                return Err(DecodeError::Oversize {
                    kind,
                    len: len.into(),
                    limit: limit.into(),
                });
            }
        }
        if compression == Compression::None && payload_len != content_len {
            return Err(DecodeError::LengthMismatch);
        }
        Ok(Self {
            version,
            kind,
            compression,
            payload_len,
            content_len,
        })
    }

    /// The whole frame's length: header plus payload.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }

    /// The header's 16 bytes. Lengths are written as given: a caller building a frame
    /// by hand (tests, vectors) can declare lengths the decoder will refuse.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        let (magic, rest) = h.split_at_mut(4);
        magic.copy_from_slice(&MAGIC);
        let (version, rest) = rest.split_at_mut(2);
        version.copy_from_slice(&self.version.to_be_bytes());
        let (kc, rest) = rest.split_at_mut(2);
        kc.copy_from_slice(&[self.kind as u8, self.compression as u8]);
        let (payload, content) = rest.split_at_mut(4);
        payload.copy_from_slice(&self.payload_len.to_be_bytes());
        content.copy_from_slice(&self.content_len.to_be_bytes());
        h
    }
}

fn len64(n: usize) -> u64 {
    n as u64
}

/// Decode one frame with the kind's own limits.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    decode_with_limit(bytes, u32::MAX)
}

/// Decode one frame, accepting at most `limit` content bytes (a device passes the byte
/// budget it asked for). The whole of `bytes` must be the frame.
pub fn decode_with_limit(bytes: &[u8], limit: u32) -> Result<Message, DecodeError> {
    let header = FrameHeader::parse(bytes, limit)?;
    let payload = bytes.get(HEADER_LEN..).unwrap_or_default();
    let declared = header.payload_len as usize;
    if payload.len() < declared {
        return Err(DecodeError::Truncated {
            got: len64(bytes.len()),
            expected: len64(header.frame_len()),
        });
    }
    if payload.len() > declared {
        return Err(DecodeError::TrailingBytes(len64(payload.len() - declared)));
    }
    match header.compression {
        Compression::None => decode_payload(header.version, header.kind, payload),
        Compression::Zstd => {
            let content = inflate(payload, header.content_len)?;
            decode_payload(header.version, header.kind, &content)
        }
    }
}

/// Inflate into a buffer of exactly `declared` bytes; anything larger is refused by
/// zstd before it is written, so a bomb costs no more than the declared size.
fn inflate(payload: &[u8], declared: u32) -> Result<Vec<u8>, DecodeError> {
    let content = zstd::bulk::decompress(payload, declared as usize)
        .map_err(|_| DecodeError::DecompressionFailed)?;
    if content.len() != declared as usize {
        return Err(DecodeError::DecompressedLengthMismatch {
            declared: declared.into(),
            actual: len64(content.len()),
        });
    }
    Ok(content)
}

/// A batch differs between versions (its records; version 5's offers and progress), and
/// a pull in version 5 (holding and wants); every other kind is the same in all, and the
/// lookup kinds exist from version 5.
fn decode_payload(version: u16, kind: MessageKind, payload: &[u8]) -> Result<Message, DecodeError> {
    if version < kind.since_version() {
        return Err(DecodeError::UnknownKind(kind as u8));
    }
    Ok(match kind {
        MessageKind::Batch if (3..5).contains(&version) => Message::Batch(
            decode_canonical::<WireBatch<PatientRecord>>(payload)?
                .upgrade()
                .map_err(DecodeError::from)?,
        ),
        MessageKind::Pull if version < 5 => Message::Pull(
            decode_canonical::<PullV1>(payload)?
                .upgrade()
                .map_err(DecodeError::from)?,
        ),
        MessageKind::Batch if version == 1 => Message::Batch(
            decode_canonical::<WireBatch<v1::PatientRecord>>(payload)?
                .upgrade()
                .map_err(DecodeError::from)?,
        ),
        MessageKind::Batch if version == 2 => Message::Batch(
            decode_canonical::<WireBatch<v2::PatientRecord>>(payload)?
                .upgrade()
                .map_err(DecodeError::from)?,
        ),
        MessageKind::EnrolRequest => Message::EnrolRequest(decode_canonical(payload)?),
        MessageKind::EnrolResponse => Message::EnrolResponse(decode_canonical(payload)?),
        MessageKind::Hello => Message::Hello(decode_canonical(payload)?),
        MessageKind::Welcome => Message::Welcome(decode_canonical(payload)?),
        MessageKind::Pull => Message::Pull(decode_canonical(payload)?),
        MessageKind::Batch => Message::Batch(decode_canonical(payload)?),
        MessageKind::PushAudit => Message::PushAudit(decode_canonical(payload)?),
        MessageKind::AuditAck => Message::AuditAck(decode_canonical(payload)?),
        MessageKind::Error => Message::Error(decode_canonical(payload)?),
        MessageKind::Lookup => Message::Lookup(decode_canonical(payload)?),
        MessageKind::LookupGranted => Message::LookupGranted(Box::new(decode_canonical(payload)?)),
        MessageKind::Checkin if version < 8 => {
            Message::Checkin(decode_canonical::<crate::message::CheckinV6>(payload)?.upgrade())
        }
        MessageKind::Checkin => Message::Checkin(decode_canonical(payload)?),
        MessageKind::CheckinAnswer => Message::CheckinAnswer(decode_canonical(payload)?),
        MessageKind::Renew => Message::Renew(decode_canonical(payload)?),
        MessageKind::Renewed => Message::Renewed(decode_canonical(payload)?),
    })
}

/// Decode a postcard value that must fill `bytes` exactly and be the encoding the
/// encoder itself would produce.
pub(crate) fn decode_canonical<T: Serialize + DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, DecodeError> {
    clear_field_error();
    let (value, rest) = postcard::take_from_bytes::<T>(bytes).map_err(from_postcard)?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(len64(rest.len())));
    }
    let same = postcard::serialize_with_flavor(
        &value,
        SameAs {
            expected: bytes,
            pos: 0,
        },
    )
    .is_ok_and(|consumed| consumed == bytes.len());
    if !same {
        return Err(DecodeError::NonCanonical);
    }
    Ok(value)
}

/// A serializer output that compares with the bytes received instead of storing, so
/// the canonical check costs no allocation.
struct SameAs<'a> {
    expected: &'a [u8],
    pos: usize,
}

impl postcard::ser_flavors::Flavor for SameAs<'_> {
    type Output = usize;

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.try_extend(&[data])
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        let end = self.pos + data.len();
        if self.expected.get(self.pos..end) != Some(data) {
            return Err(postcard::Error::SerializeBufferFull);
        }
        self.pos = end;
        Ok(())
    }

    fn finalize(self) -> postcard::Result<usize> {
        Ok(self.pos)
    }
}

/// Encode a message as one frame of the current version — or of version 1 for `hello`,
/// `welcome` and `error`, which any peer must read (SPEC.md §5). `compression` is a
/// request: it is used only where the kind allows it and it makes the frame smaller.
pub fn encode(message: &Message, compression: Compression) -> Result<Vec<u8>, EncodeError> {
    let version = match message.kind() {
        MessageKind::Hello | MessageKind::Welcome | MessageKind::Error => 1,
        _ => VERSION,
    };
    encode_version(message, compression, version)
}

/// Encode a message as one frame of protocol `version` (a peer that negotiated an older
/// one). Refused if the version is not supported or the message uses what it cannot
/// carry.
pub fn encode_version(
    message: &Message,
    compression: Compression,
    version: u16,
) -> Result<Vec<u8>, EncodeError> {
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(EncodeError::NotRepresentable(version));
    }
    let kind = message.kind();
    if version < kind.since_version() {
        return Err(EncodeError::NotRepresentable(version));
    }
    let payload = match message {
        Message::Batch(m) if (3..5).contains(&version) => to_vec(
            &WireBatch::<PatientRecord>::downgrade(m)
                .map_err(|_| EncodeError::NotRepresentable(version))?,
        ),
        Message::Pull(m) if version < 5 => {
            to_vec(&PullV1::downgrade(m).map_err(|_| EncodeError::NotRepresentable(version))?)
        }
        Message::Batch(m) if version == 1 => to_vec(
            &WireBatch::<v1::PatientRecord>::downgrade(m)
                .map_err(|_| EncodeError::NotRepresentable(version))?,
        ),
        Message::Batch(m) if version == 2 => to_vec(
            &WireBatch::<v2::PatientRecord>::downgrade(m)
                .map_err(|_| EncodeError::NotRepresentable(version))?,
        ),
        Message::EnrolRequest(m) => to_vec(m),
        Message::EnrolResponse(m) => to_vec(m),
        Message::Hello(m) => to_vec(m),
        Message::Welcome(m) => to_vec(m),
        Message::Pull(m) => to_vec(m),
        Message::Batch(m) => to_vec(m),
        Message::PushAudit(m) => to_vec(m),
        Message::AuditAck(m) => to_vec(m),
        Message::Error(m) => to_vec(m),
        Message::Lookup(m) => to_vec(m),
        Message::LookupGranted(m) => to_vec(m.as_ref()),
        Message::Checkin(m) if version < 8 => to_vec(&crate::message::CheckinV6::downgrade(m)),
        Message::Checkin(m) => to_vec(m),
        Message::CheckinAnswer(m) => to_vec(m),
        Message::Renew(m) => to_vec(m),
        Message::Renewed(m) => to_vec(m),
    }?;
    let limit = kind.max_payload();
    let content_len = u32::try_from(payload.len())
        .ok()
        .filter(|&n| n <= limit)
        .ok_or(EncodeError::Oversize {
            kind,
            len: len64(payload.len()),
            limit: limit.into(),
        })?;
    let compressed = match compression {
        Compression::Zstd if kind.compressible() => zstd::bulk::compress(&payload, ZSTD_LEVEL)
            .ok()
            .filter(|c| c.len() < payload.len()),
        Compression::Zstd | Compression::None => None,
    };
    let (compression, body) = match compressed {
        Some(c) => (Compression::Zstd, c),
        None => (Compression::None, payload),
    };
    let header = FrameHeader {
        version,
        kind,
        compression,
        // Fits: compressed output is smaller than the payload, itself within u32.
        payload_len: u32::try_from(body.len()).map_err(|_| EncodeError::Internal)?,
        content_len,
    };
    let mut frame = Vec::with_capacity(HEADER_LEN + body.len());
    frame.extend_from_slice(&header.to_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

fn to_vec<T: Serialize>(value: &T) -> Result<Vec<u8>, EncodeError> {
    postcard::to_allocvec(value).map_err(|_| EncodeError::Internal)
}

/// The fuzzing and corpus-replay property: decoding never panics, and a frame that
/// decodes re-encodes to the same bytes (uncompressed frames) or to the same content
/// (compressed frames, whose zstd stream the encoder need not reproduce). Panics if the
/// property fails; returns whether the input was accepted.
#[doc(hidden)]
#[allow(clippy::expect_used)] // Panicking is how this check reports a broken property.
pub fn check_roundtrip(bytes: &[u8]) -> bool {
    let Ok(message) = decode(bytes) else {
        return false;
    };
    let Ok(header) = FrameHeader::parse(bytes, u32::MAX) else {
        panic!("decoded a frame whose header does not parse");
    };
    let v = header.version;
    match header.compression {
        Compression::None => {
            let again = encode_version(&message, Compression::None, v)
                .expect("accepted message re-encodes");
            assert_eq!(again, bytes, "accepted frame is not the canonical encoding");
        }
        Compression::Zstd => {
            let plain = encode_version(&message, Compression::None, v)
                .expect("accepted message re-encodes");
            let content = bytes
                .get(HEADER_LEN..)
                .and_then(|p| inflate(p, header.content_len).ok());
            assert_eq!(
                plain.get(HEADER_LEN..),
                content.as_deref(),
                "content is not canonical"
            );
            let recompressed =
                encode_version(&message, Compression::Zstd, v).expect("re-encodes compressed");
            assert_eq!(
                decode(&recompressed).as_ref(),
                Ok(&message),
                "recompressed frame differs"
            );
        }
    }
    true
}
