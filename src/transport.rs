//! The only module that talks to the network: sync-protocol frames over HTTPS POST with
//! ureq and rustls. The hub's CA is pinned (no system roots); after enrolment the device
//! presents its certificate. Every response is capped in size before it is read whole
//! and decoded with the protocol's per-kind limit. Also: retry backoff with jitter, and a
//! cheap connectivity probe.

use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use sync_protocol::codec::HEADER_LEN;
use sync_protocol::{
    Compression, DecodeError, Message, MessageKind, decode_with_limit, encode, encode_version,
};
use zeroize::Zeroizing;

/// The content type of protocol frames (SPEC.md §1).
pub const FRAME_CONTENT_TYPE: &str = "application/vnd.carecache.sync";

/// A failed exchange. None of these carry patient data.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Network: the hub could not be reached (no route, refused, DNS, timeout).
    #[error("hub unreachable: {0}")]
    Unreachable(String),
    /// The hub's certificate did not verify against the pinned CA, or the TLS handshake
    /// failed otherwise. Nothing was sent.
    #[error("TLS with the hub failed: {0}")]
    Tls(String),
    /// The connection broke while the answer was arriving (nothing of it is used).
    #[error("connection cut while receiving: {0}")]
    Cut(String),
    /// The hub's answer was bigger than allowed for its kind.
    #[error("hub answer over the size limit ({limit} bytes)")]
    TooLarge {
        /// The cap.
        limit: u64,
    },
    /// The answer is not a protocol frame of an acceptable kind.
    #[error("hub answer is not a valid frame: {0}")]
    Decode(DecodeError),
    /// The answer was not a frame at all (HTTP status, content type).
    #[error("hub answered HTTP {status} without a protocol frame")]
    NotAFrame {
        /// HTTP status.
        status: u16,
    },
    /// Our own message could not be encoded (a bug).
    #[error("encoding a request failed")]
    Encode,
    /// The pinned CA or the device identity is unusable.
    #[error("TLS identity: {0}")]
    Identity(String),
}

impl From<DecodeError> for TransportError {
    fn from(e: DecodeError) -> Self {
        Self::Decode(e)
    }
}

impl TransportError {
    /// True when the network is the problem: probe and retry, the data is fine.
    pub fn is_offline(&self) -> bool {
        matches!(self, Self::Unreachable(_) | Self::Cut(_))
    }
}

/// The device's TLS client identity.
pub struct Identity {
    /// Its certificate (DER).
    pub cert_der: Vec<u8>,
    /// Its private key (PKCS#8 PEM), zeroized on drop.
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

/// An HTTPS client bound to one hub.
pub struct Transport {
    agent: ureq::Agent,
    base: String,
    /// The protocol version the hub chose at the last welcome: later requests are framed
    /// in it (SPEC.md §5), so a device still talks to a version-1 hub.
    version: std::sync::atomic::AtomicU16,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// What one exchange brought back.
#[derive(Debug)]
pub struct Answer {
    /// The decoded frame (an `Error` message for protocol errors).
    pub message: Message,
    /// HTTP status.
    pub status: u16,
    /// Bytes of the answer's frame on the wire.
    pub wire_bytes: usize,
    /// Bytes of the request's frame on the wire (after compression).
    pub sent_bytes: usize,
}

impl Transport {
    /// A client for `base` (`https://host:port`) trusting only `ca_pem`, presenting
    /// `identity` if given.
    pub fn new(
        base: &str,
        ca_pem: &str,
        identity: Option<&Identity>,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Result<Self, TransportError> {
        use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig, TlsProvider};
        let roots: Vec<Certificate<'static>> = ureq::tls::parse_pem(ca_pem.as_bytes())
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if roots.is_empty() {
            return Err(TransportError::Identity(
                "the hub CA file holds no certificate".into(),
            ));
        }
        let mut tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::Specific(Arc::new(roots)))
            .use_sni(true);
        if let Some(id) = identity {
            let cert = Certificate::from_der(&id.cert_der).to_owned();
            let key = PrivateKey::from_pem(id.key_pem.as_bytes())
                .map_err(|_| TransportError::Identity("the device key does not parse".into()))?
                .to_owned();
            tls = tls.client_cert(Some(ClientCert::new_with_certs(&[cert], key)));
        }
        let agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .http_status_as_error(false)
            .https_only(true)
            .max_redirects(0)
            .timeout_connect(Some(connect_timeout))
            .timeout_global(Some(connect_timeout + read_timeout))
            .user_agent(concat!("carecache/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Self {
            agent,
            base: base.trim_end_matches('/').to_owned(),
            version: std::sync::atomic::AtomicU16::new(sync_protocol::codec::VERSION),
        })
    }

    /// POSTs `msg` to `path` and decodes the answer, accepting at most the largest frame
    /// of `expect` (or an error frame). Nothing is decoded before the whole frame is in.
    pub fn exchange(
        &self,
        path: &str,
        msg: &Message,
        expect: MessageKind,
    ) -> Result<Answer, TransportError> {
        self.exchange_with(path, msg, expect, Compression::None)
    }

    /// [`Self::exchange`], compressing the request as asked (the encoder compresses only
    /// when that makes it smaller; only `push-audit` may be compressed by a device, and
    /// only when the hub said it supports zstd).
    pub fn exchange_with(
        &self,
        path: &str,
        msg: &Message,
        expect: MessageKind,
        compression: Compression,
    ) -> Result<Answer, TransportError> {
        let fetched = self.fetch(path, msg, expect, compression)?;
        self.decode(fetched)
    }

    /// The first half of an exchange: POSTs `msg` and reads the whole answer frame (size
    /// checked), without decoding it — so a sync can have the next batch arrive while it
    /// applies one, and hold it only as the compact frame the hub sent.
    pub fn fetch(
        &self,
        path: &str,
        msg: &Message,
        expect: MessageKind,
        compression: Compression,
    ) -> Result<Fetched, TransportError> {
        let body = match msg.kind() {
            // Always version-1 frames, so any hub can read them.
            MessageKind::Hello | MessageKind::Welcome | MessageKind::Error => {
                encode(msg, compression)
            }
            _ => encode_version(
                msg,
                compression,
                self.version.load(std::sync::atomic::Ordering::Relaxed),
            ),
        }
        .map_err(|_| TransportError::Encode)?;
        let url = format!("{}{path}", self.base);
        let mut resp = self
            .agent
            .post(&url)
            .header("Content-Type", FRAME_CONTENT_TYPE)
            .send(&body[..])
            .map_err(classify)?;
        let status = resp.status().as_u16();
        let is_frame = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == FRAME_CONTENT_TYPE);
        if !is_frame {
            return Err(TransportError::NotAFrame { status });
        }
        let limit = u64::from(expect.max_payload().max(MessageKind::Error.max_payload()))
            + HEADER_LEN as u64;
        if let Some(len) = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && len > limit
        {
            return Err(TransportError::TooLarge { limit });
        }
        let mut bytes = Vec::new();
        resp.body_mut()
            .as_reader()
            .take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| TransportError::Cut(e.to_string()))?;
        if bytes.len() as u64 > limit {
            return Err(TransportError::TooLarge { limit });
        }
        Ok(Fetched {
            bytes,
            status,
            sent_bytes: body.len(),
            expect,
        })
    }

    /// The second half of an exchange: decodes a fetched frame.
    pub fn decode(&self, fetched: Fetched) -> Result<Answer, TransportError> {
        let Fetched {
            bytes,
            status,
            sent_bytes,
            expect,
        } = fetched;
        let decode_limit = expect.max_payload().max(MessageKind::Error.max_payload());
        let message = decode_with_limit(&bytes, decode_limit)?;
        if let Message::Welcome(w) = &message
            && sync_protocol::codec::SUPPORTED_VERSIONS.contains(&w.version)
        {
            self.version
                .store(w.version, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Answer {
            message,
            status,
            wire_bytes: bytes.len(),
            sent_bytes,
        })
    }
}

/// An answer frame read whole but not yet decoded ([`Transport::fetch`]).
#[derive(Debug)]
pub struct Fetched {
    bytes: Vec<u8>,
    status: u16,
    sent_bytes: usize,
    expect: MessageKind,
}

/// Whether a TCP connection to the hub at `base` (`https://host[:port]`) opens now — no
/// TLS, nothing sent: the cheap check the daemon repeats while offline so a sync starts
/// as soon as the link is back.
pub fn probe(base: &str, timeout: Duration) -> bool {
    let Some(authority) = base.strip_prefix("https://") else {
        return false;
    };
    let target = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:443")
    };
    let Ok(addrs) = target.to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, timeout).is_ok())
}

fn classify(e: ureq::Error) -> TransportError {
    match e {
        // rustls reports a failed handshake (certificate not from the pinned CA, bad
        // signature, wrong name) as invalid data on the socket.
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::InvalidData => {
            TransportError::Tls(io.to_string())
        }
        ureq::Error::Io(io) => TransportError::Unreachable(io.to_string()),
        ureq::Error::Timeout(t) => TransportError::Unreachable(format!("timed out ({t})")),
        ureq::Error::HostNotFound => TransportError::Unreachable("host not found".into()),
        ureq::Error::ConnectionFailed => TransportError::Unreachable("connection failed".into()),
        ureq::Error::Tls(m) => TransportError::Tls(m.to_string()),
        ureq::Error::Rustls(r) => TransportError::Tls(r.to_string()),
        ureq::Error::BodyExceedsLimit(n) => TransportError::TooLarge { limit: n },
        other => TransportError::Unreachable(other.to_string()),
    }
}

/// Exponential backoff with full jitter: the n-th retry (from 0) waits a random time in
/// `[min, min(max, min·2ⁿ)]`. `unit` in `[0, 1)` is the random draw (the caller's, so
/// tests are deterministic).
pub fn backoff(attempt: u32, min: Duration, max: Duration, unit: f64) -> Duration {
    let cap = min
        .checked_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let span = cap.saturating_sub(min);
    min + span.mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_stays_within_bounds() {
        let (min, max) = (Duration::from_secs(5), Duration::from_secs(900));
        assert_eq!(backoff(0, min, max, 0.99), min);
        assert_eq!(backoff(3, min, max, 1.0), Duration::from_secs(40));
        assert_eq!(backoff(30, min, max, 1.0), max);
        for a in 0..40 {
            for u in [0.0, 0.3, 0.999] {
                let d = backoff(a, min, max, u);
                assert!(d >= min && d <= max, "{a} {u} {d:?}");
            }
        }
        assert!(
            backoff(6, min, max, 0.1) < backoff(6, min, max, 0.9),
            "jitter spreads"
        );
    }
}
