//! Staff identity (DESIGN.md invariant 10): who is looking, proven rather than asserted.
//!
//! Two modes, chosen in `carecache.toml` `[identity]`:
//!
//! - **asserted**: the client software names the member of staff (`X-Carecache-User`);
//!   the device trusts it. Every access entry says so (an `Access` audit event).
//! - **oidc**: the staff id comes only from an OpenID Connect ID token issued by the
//!   configured issuer and verified here — signature against the issuer's published keys
//!   (JWKS, held in the sealed store, refreshed at every sync and on an unknown `kid`),
//!   `iss`, `aud`, `exp`/`iat`/`nbf` against the device's trusted time, the configured
//!   staff and role claims. Algorithms: the asymmetric ones configured (RS256 and ES256
//!   by default); `none` and HMAC never.
//!
//! A verified token opens a **staff session**: bound to the client registration that
//! presented it and to the staff id, lasting at most a shift and never past the last
//! lease naming that member of staff, sealed in the store so a restart keeps it. The
//! session's secret (`ccs_…`, 256 random bits) is shown once; only its SHA-256 is kept.
//! At sign-in the member of staff sets a PIN (Argon2id); after `idle_lock_secs` without
//! use, and after a restart of the daemon, the session must be confirmed with it — which
//! works offline. Wrong PINs wait longer each time and end the session at the limit.
//! Each ID token opens one session only.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use argon2::{PasswordHasher, PasswordVerifier};
use base64::Engine as _;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sync_protocol::audit::{ProvenStaff, SessionRefusal};
use sync_protocol::message::View;
use sync_protocol::types::{StaffId, Text, Timestamp};
use zeroize::Zeroizing;

use crate::policy::Policy;
use crate::store::{Extras, Store, StoreError};

/// Every session secret starts with this, so a leaked one is recognisable.
pub const SESSION_PREFIX: &str = "ccs_";
/// Device-state key of the sessions and the ID tokens already used.
const STATE_KEY: &str = "staff_sessions";
/// Device-state key of the issuer's metadata and keys (JSON).
const KEYS_KEY: &str = "identity_keys";
/// Longest ID token accepted.
const MAX_TOKEN: usize = 16 * 1024;
/// Largest issuer document (discovery, JWKS, token response) read.
const MAX_DOCUMENT: u64 = 256 * 1024;
/// Clock tolerance for `exp`, `iat`, `nbf`.
const LEEWAY_MS: u64 = 60_000;
/// An unknown `kid` fetches the keys again at most this often.
const REFETCH_EVERY: Duration = Duration::from_secs(30);
/// Live sessions held at once (the oldest ends beyond this).
const MAX_SESSIONS: usize = 512;
/// Viewer sign-ins waiting for the identity provider or for a PIN.
const MAX_PENDING: usize = 64;
/// A viewer sign-in must come back within this.
const PENDING_FOR: Duration = Duration::from_secs(600);

/// The identity mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The client software vouches for the staff id.
    Asserted,
    /// ID tokens from an OpenID Connect provider, verified on the device.
    Oidc(Box<OidcConfig>),
}

/// `[identity]` in `oidc` mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OidcConfig {
    /// The issuer (`iss`), exactly as the provider names itself.
    pub issuer: String,
    /// Accepted audiences (`aud`): the client ids of the crew software and of the
    /// device's own viewer.
    pub client_ids: Vec<String>,
    /// The client id the viewer signs in as (the first of `client_ids` unless set).
    pub viewer_client_id: String,
    /// Scopes the viewer asks for.
    pub scopes: String,
    /// The claim naming the member of staff (becomes the staff id).
    pub staff_claim: String,
    /// The claim naming the role chosen at sign-in, if the provider gives one.
    pub role_claim: Option<String>,
    /// Roles whose view is narrower than the lease's.
    pub role_views: Vec<(String, View)>,
    /// Accepted signing algorithms (asymmetric only).
    pub algorithms: Vec<Algorithm>,
    /// Longest staff session (a shift).
    pub max_session: Duration,
    /// Unused this long, a session needs its PIN again.
    pub idle_lock: Duration,
    /// An ID token older than this (`iat`) opens no session.
    pub max_token_age: Duration,
    /// Wrong PINs that end a session.
    pub pin_attempts: u8,
}

/// What a verified ID token proves.
#[derive(Clone)]
pub struct Verified {
    /// The staff id (from the staff claim).
    pub staff: StaffId,
    /// The role (from the role claim).
    pub role: Option<Text<64>>,
    /// `iss`.
    pub issuer: Text<256>,
    /// `sub`.
    pub subject: Text<256>,
    /// `exp`.
    pub expires: Timestamp,
    /// SHA-256 of the token, so each opens one session.
    token_hash: [u8; 32],
}

impl fmt::Debug for Verified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verified")
            .field("staff", &self.staff)
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

/// A session as sealed in the store.
#[derive(Clone, Serialize, Deserialize)]
struct StaffSession {
    id: u64,
    secret_hash: [u8; 32],
    client: String,
    staff: String,
    role: Option<String>,
    issuer: String,
    subject: String,
    opened: Timestamp,
    expires: Timestamp,
    /// Argon2id PHC string of the PIN.
    pin_hash: String,
    wrong_pins: u8,
    /// No PIN is tried before this (trusted time), after a wrong one.
    next_pin_at: Option<Timestamp>,
}

#[derive(Default, Serialize, Deserialize)]
struct Persisted {
    sessions: Vec<StaffSession>,
    /// ID tokens that opened a session, until they expire.
    used: Vec<([u8; 32], Timestamp)>,
}

/// A request's session, resolved.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The session's public id.
    pub id: u64,
    /// The proven staff id.
    pub staff: StaffId,
    /// The role the token carried.
    pub role: Option<Text<64>>,
    /// For the audit entry.
    pub proven: ProvenStaff,
    /// A narrower view for this role, if configured.
    pub view_cap: Option<View>,
    /// When the session ends.
    pub expires: Timestamp,
}

/// Why a request's session does not let it in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// No session named.
    Missing,
    /// Not a session this device holds (never opened, ended, or replaced).
    Unknown,
    /// Opened by another client registration.
    OtherClient(u64),
    /// Its time is over.
    Expired(u64),
    /// Idle too long, or the daemon restarted: confirm with the PIN.
    Locked(u64),
}

impl Problem {
    /// A stable code for the error body.
    pub fn code(self) -> &'static str {
        match self {
            Self::Missing => "session-required",
            Self::Unknown => "session-unknown",
            Self::OtherClient(_) => "session-of-another-client",
            Self::Expired(_) => "session-expired",
            Self::Locked(_) => "session-locked",
        }
    }

    /// Words for the member of staff.
    pub fn message(self) -> &'static str {
        match self {
            Self::Missing => {
                "this device proves staff identity: send X-Carecache-Session with the session from POST /v1/session (sign in with your identity provider)"
            }
            Self::Unknown => {
                "staff session not recognised (ended, replaced or never opened): sign in again"
            }
            Self::OtherClient(_) => "this staff session belongs to another client registration",
            Self::Expired(_) => "your staff session has ended (shift or lease over): sign in again",
            Self::Locked(_) => {
                "your staff session is locked after a pause: confirm it with your PIN (POST /v1/session/confirm)"
            }
        }
    }
}

/// Why a PIN step failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinError {
    /// No such session (or not this client's).
    Unknown,
    /// Wrong PIN; `ended` when that was the last allowed.
    Wrong {
        /// The session.
        session: u64,
        /// Wrong attempts so far.
        attempts: u8,
        /// The session ended (locked out).
        ended: bool,
    },
    /// Too soon after a wrong PIN.
    TooSoon {
        /// Seconds to wait.
        retry_after: u64,
    },
    /// The session is over.
    Expired(u64),
}

/// A session just opened or resumed: its secret is shown once.
pub struct Issued {
    /// The session secret for `X-Carecache-Session`.
    pub secret: Zeroizing<String>,
    /// The session's public id.
    pub id: u64,
    /// The staff id.
    pub staff: StaffId,
    /// The role.
    pub role: Option<Text<64>>,
    /// Issuer and subject.
    pub proven: ProvenStaff,
    /// When it ends.
    pub expires: Timestamp,
}

impl fmt::Debug for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issued")
            .field("id", &self.id)
            .field("staff", &self.staff)
            .finish_non_exhaustive()
    }
}

/// The identity provider could not be used (network, or its documents).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// This device is in asserted mode.
    #[error("this device is in asserted identity mode: it opens no staff sessions")]
    Asserted,
    /// The provider could not be reached or answered badly.
    #[error("the identity provider could not be used: {0}")]
    Provider(String),
    /// The store could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No randomness.
    #[error("no system randomness")]
    NoRandomness,
}

#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Metadata {
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

#[derive(Default)]
struct Keys {
    metadata: Option<Metadata>,
    jwks: Option<JwkSet>,
    /// The JWKS as held in the store, to skip rewriting it when a fetch finds no change.
    jwks_text: String,
}

#[derive(Serialize, Deserialize)]
struct StoredKeys {
    /// The issuer they were fetched for: keys of another issuer are never used.
    issuer: String,
    metadata: Metadata,
    jwks: String,
}

/// A viewer sign-in under way.
pub struct Pending {
    /// The client token the browser signed in with.
    pub client_token: Zeroizing<String>,
    /// Its registration's name.
    pub client: String,
    verifier: Zeroizing<String>,
    nonce: String,
    redirect_uri: String,
    /// SHA-256 of the secret in the browser's sign-in cookie: the provider's answer is
    /// taken only from the browser that started the sign-in (no login CSRF).
    browser: [u8; 32],
    created: Instant,
}

/// A viewer sign-in started: where to send the browser, and the secret its sign-in
/// cookie carries.
pub struct SignInStart {
    /// The provider's authorization URL.
    pub url: String,
    /// The value of the browser's sign-in cookie.
    pub browser: Zeroizing<String>,
}

impl fmt::Debug for SignInStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignInStart").finish_non_exhaustive()
    }
}

impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// A viewer sign-in verified by the provider: the id of its PIN form, and who it is.
#[derive(Debug)]
pub struct SignedIn {
    /// The PIN form's id.
    pub form: String,
    /// The member of staff.
    pub staff: StaffId,
}

/// A viewer sign-in refused: the client registration it was for (if known), and why.
#[derive(Debug)]
pub struct SignInRefused {
    /// The client registration's name.
    pub client: Option<String>,
    /// Why.
    pub reason: SessionRefusal,
}

/// A viewer sign-in whose token is verified, waiting for the PIN.
pub struct AwaitingPin {
    /// The client token.
    pub client_token: Zeroizing<String>,
    /// Its registration's name.
    pub client: String,
    /// The verified token.
    pub verified: Verified,
    created: Instant,
}

impl fmt::Debug for AwaitingPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwaitingPin")
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// The device's staff identity: mode, issuer keys, sessions.
pub struct Identity {
    mode: Mode,
    keys: RwLock<Keys>,
    last_fetch: Mutex<Option<Instant>>,
    state: Mutex<Persisted>,
    /// Last use of each session (trusted time) since this process started; a session
    /// absent here is locked (the daemon restarted since it was used).
    used: Mutex<HashMap<u64, Timestamp>>,
    pending: Mutex<HashMap<String, Pending>>,
    awaiting: Mutex<HashMap<String, AwaitingPin>>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn random_bytes<const N: usize>() -> Result<[u8; N], IdentityError> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|_| IdentityError::NoRandomness)?;
    Ok(b)
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Argon2id with the lowest-memory of OWASP's equivalent settings for interactive
/// logins (7 MiB, 5 passes): a PIN is checked in a daemon that should stay small, and
/// its strength against guessing is the wait after each wrong PIN and the lock-out, with
/// the hash itself sealed in the store.
fn argon() -> argon2::Argon2<'static> {
    argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(7 * 1024, 5, 1, None).unwrap_or_default(),
    )
}

/// A PIN is 4 to 12 digits.
pub fn pin_ok(pin: &str) -> bool {
    (4..=12).contains(&pin.len()) && pin.bytes().all(|b| b.is_ascii_digit())
}

impl Identity {
    /// The identity of a device in `mode`, with what its store holds.
    pub fn open(mode: Mode, store: &Store) -> Result<Self, StoreError> {
        let persisted: Persisted = store.device_state(STATE_KEY)?.unwrap_or_default();
        let stored: Option<StoredKeys> = store.device_state(KEYS_KEY)?;
        let issuer = match &mode {
            Mode::Oidc(c) => Some(c.issuer.as_str()),
            Mode::Asserted => None,
        };
        let keys = match stored {
            // Held for the issuer configured now (a changed issuer starts afresh).
            Some(k) if Some(k.issuer.as_str()) == issuer => Keys {
                jwks: serde_json::from_str(&k.jwks).ok(),
                metadata: Some(k.metadata),
                jwks_text: k.jwks,
            },
            _ => Keys::default(),
        };
        Ok(Self {
            mode,
            keys: RwLock::new(keys),
            last_fetch: Mutex::new(None),
            state: Mutex::new(persisted),
            used: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            awaiting: Mutex::new(HashMap::new()),
        })
    }

    /// The OpenID Connect settings, in `oidc` mode.
    pub fn oidc(&self) -> Option<&OidcConfig> {
        match &self.mode {
            Mode::Oidc(c) => Some(c),
            Mode::Asserted => None,
        }
    }

    /// Live sessions (for status).
    pub fn session_count(&self) -> usize {
        lock(&self.state).sessions.len()
    }

    /// The origin (`scheme://host[:port]`) of the provider's authorization endpoint (the
    /// issuer's until its metadata is held), for the viewer's content security policy.
    pub fn provider_origin(&self) -> Option<String> {
        let c = self.oidc()?;
        let endpoint = self
            .keys
            .read()
            .ok()
            .and_then(|k| {
                k.metadata
                    .as_ref()
                    .map(|m| m.authorization_endpoint.clone())
            })
            .unwrap_or_else(|| c.issuer.clone());
        let (scheme, rest) = endpoint.split_once("://")?;
        let host = rest.split(['/', '?', '#']).next()?;
        let ok = matches!(scheme, "https" | "http")
            && !host.is_empty()
            && host.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b'-' | b'[' | b']')
            });
        ok.then(|| format!("{scheme}://{host}"))
    }

    /// Whether the issuer's keys are held.
    pub fn has_keys(&self) -> bool {
        self.keys.read().map(|k| k.jwks.is_some()).unwrap_or(false)
    }

    // ---- the issuer --------------------------------------------------------------------

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .max_redirects(0)
            .build()
            .into()
    }

    fn get_json(agent: &ureq::Agent, url: &str) -> Result<Value, IdentityError> {
        let res = agent
            .get(url)
            .header("accept", "application/json")
            .call()
            .map_err(|e| IdentityError::Provider(format!("GET {url}: {e}")))?;
        Self::read_json(res, &format!("GET {url}"))
    }

    /// A provider's answer as JSON: HTTP 200, at most [`MAX_DOCUMENT`] bytes.
    fn read_json(
        mut res: ureq::http::Response<ureq::Body>,
        what: &str,
    ) -> Result<Value, IdentityError> {
        if res.status() != 200 {
            return Err(IdentityError::Provider(format!(
                "{what}: HTTP {}",
                res.status().as_u16()
            )));
        }
        let bytes = res
            .body_mut()
            .with_config()
            .limit(MAX_DOCUMENT)
            .read_to_vec()
            .map_err(|e| IdentityError::Provider(format!("{what}: {e}")))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| IdentityError::Provider(format!("{what}: not JSON ({e})")))
    }

    /// Fetches the issuer's metadata and keys and seals them in the store (at every sync,
    /// and on an unknown key). Nothing changes when the issuer cannot be used.
    pub fn refresh_keys(&self, store: &Store) -> Result<(), IdentityError> {
        let Some(c) = self.oidc() else {
            return Ok(());
        };
        let agent = Self::agent();
        let doc = Self::get_json(
            &agent,
            &format!("{}/.well-known/openid-configuration", c.issuer),
        )?;
        if doc.get("issuer").and_then(Value::as_str) != Some(c.issuer.as_str()) {
            return Err(IdentityError::Provider(
                "the discovery document names another issuer".into(),
            ));
        }
        let field = |k: &str| {
            doc.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| IdentityError::Provider(format!("discovery document has no {k}")))
        };
        let metadata = Metadata {
            authorization_endpoint: field("authorization_endpoint")?,
            token_endpoint: field("token_endpoint")?,
            jwks_uri: field("jwks_uri")?,
        };
        let jwks_value = Self::get_json(&agent, &metadata.jwks_uri)?;
        let jwks: JwkSet = serde_json::from_value(jwks_value.clone())
            .map_err(|e| IdentityError::Provider(format!("the issuer's JWKS: {e}")))?;
        let jwks_text = jwks_value.to_string();
        if self
            .keys
            .read()
            .is_ok_and(|k| k.metadata.as_ref() == Some(&metadata) && k.jwks_text == jwks_text)
        {
            // Unchanged (the usual case at a sync): nothing to write.
            return Ok(());
        }
        let mut extras = Extras::default();
        extras.set(
            KEYS_KEY,
            &StoredKeys {
                issuer: c.issuer.clone(),
                metadata: metadata.clone(),
                jwks: jwks_text.clone(),
            },
        )?;
        store.put_device_state(&extras)?;
        let mut k = self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        k.metadata = Some(metadata);
        k.jwks = Some(jwks);
        k.jwks_text = jwks_text;
        tracing::info!(
            keys = k.jwks.as_ref().map_or(0, |j| j.keys.len()),
            "identity provider keys refreshed"
        );
        Ok(())
    }

    /// Verifies an ID token with the keys held; on an unknown key, fetches them again
    /// (at most every 30 s) and tries once more. Blocking (network).
    pub fn verify_online(
        &self,
        store: &Store,
        token: &str,
        now: Timestamp,
        nonce: Option<&str>,
    ) -> Result<Verified, SessionRefusal> {
        match self.verify(token, now, nonce) {
            Err(SessionRefusal::UnknownKey | SessionRefusal::KeysUnavailable) => {
                // A token naming an unknown key fetches the keys at most every 30 s, so
                // forged tokens cannot make the device hammer the provider.
                let recent = {
                    let mut last = lock(&self.last_fetch);
                    let recent = last.is_some_and(|t| t.elapsed() < REFETCH_EVERY);
                    if !recent {
                        *last = Some(Instant::now());
                    }
                    recent
                };
                if !recent && let Err(e) = self.refresh_keys(store) {
                    tracing::warn!(error = %e, "identity provider keys could not be refreshed");
                }
                self.verify(token, now, nonce)
            }
            other => other,
        }
    }

    /// Verifies an ID token against the keys held, in trusted time `now`.
    pub fn verify(
        &self,
        token: &str,
        now: Timestamp,
        nonce: Option<&str>,
    ) -> Result<Verified, SessionRefusal> {
        let Some(c) = self.oidc() else {
            return Err(SessionRefusal::Malformed);
        };
        let token = token.trim();
        if token.is_empty() || token.len() > MAX_TOKEN {
            return Err(SessionRefusal::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(head), Some(body), Some(_sig), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(SessionRefusal::Malformed);
        };
        let part = |p: &str| -> Result<serde_json::Map<String, Value>, SessionRefusal> {
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .map_err(|_| SessionRefusal::Malformed)?;
            serde_json::from_slice(&bytes).map_err(|_| SessionRefusal::Malformed)
        };
        // The algorithm first, from the header as written: `none`, HMAC and anything not
        // configured are refused before any key is chosen.
        let header = part(head)?;
        let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
        let alg = c
            .algorithms
            .iter()
            .copied()
            .find(|a| format!("{a:?}") == alg)
            .ok_or(SessionRefusal::AlgorithmNotAllowed)?;
        // The issuer next (unverified, to name the fault): a token of another issuer is
        // never checked against this issuer's keys.
        let unverified = part(body)?;
        if unverified.get("iss").and_then(Value::as_str) != Some(c.issuer.as_str()) {
            return Err(SessionRefusal::WrongIssuer);
        }
        let kid = header.get("kid").and_then(Value::as_str);
        let keys = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let jwks = keys.jwks.as_ref().ok_or(SessionRefusal::KeysUnavailable)?;
        let candidates: Vec<&jsonwebtoken::jwk::Jwk> = jwks
            .keys
            .iter()
            .filter(|k| kid.is_none() || k.common.key_id.as_deref() == kid)
            .filter(|k| {
                !matches!(
                    k.common.public_key_use,
                    Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
                )
            })
            .filter(|k| {
                k.common
                    .key_algorithm
                    .is_none_or(|ka| format!("{ka:?}") == format!("{alg:?}"))
            })
            .collect();
        if candidates.is_empty() {
            return Err(SessionRefusal::UnknownKey);
        }
        let mut validation = Validation::new(alg);
        validation.algorithms = vec![alg];
        validation.set_issuer(&[c.issuer.as_str()]);
        validation.set_audience(&c.client_ids);
        validation.set_required_spec_claims(&["iss", "aud", "exp", "sub"]);
        // Times are checked below against trusted time, not the wall clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let mut last = SessionRefusal::UnknownKey;
        let mut claims = None;
        for k in candidates {
            let Ok(key) = DecodingKey::from_jwk(k) else {
                continue;
            };
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(token, &key, &validation) {
                Ok(d) => {
                    claims = Some(d.claims);
                    break;
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    last = match e.kind() {
                        K::InvalidSignature | K::InvalidEcdsaKey | K::InvalidRsaKey(_) => {
                            SessionRefusal::BadSignature
                        }
                        K::InvalidAlgorithm | K::InvalidAlgorithmName | K::MissingAlgorithm => {
                            SessionRefusal::AlgorithmNotAllowed
                        }
                        K::InvalidIssuer => SessionRefusal::WrongIssuer,
                        K::InvalidAudience => SessionRefusal::WrongAudience,
                        K::ExpiredSignature => SessionRefusal::Expired,
                        K::ImmatureSignature => SessionRefusal::NotYetValid,
                        _ => SessionRefusal::Malformed,
                    };
                }
            }
        }
        drop(keys);
        let claims = claims.ok_or(last)?;
        let secs = |k: &str| claims.get(k).and_then(Value::as_u64);
        let now_ms = now.as_millis();
        let exp = secs("exp").ok_or(SessionRefusal::Malformed)?;
        if exp.saturating_mul(1000).saturating_add(LEEWAY_MS) <= now_ms {
            return Err(SessionRefusal::Expired);
        }
        if let Some(nbf) = secs("nbf")
            && nbf.saturating_mul(1000) > now_ms.saturating_add(LEEWAY_MS)
        {
            return Err(SessionRefusal::NotYetValid);
        }
        let iat = secs("iat").ok_or(SessionRefusal::Malformed)?;
        if iat.saturating_mul(1000) > now_ms.saturating_add(LEEWAY_MS) {
            return Err(SessionRefusal::NotYetValid);
        }
        let age_limit = u64::try_from(c.max_token_age.as_millis()).unwrap_or(u64::MAX);
        if iat.saturating_mul(1000).saturating_add(age_limit) < now_ms {
            return Err(SessionRefusal::TooOld);
        }
        if let Some(n) = nonce
            && claims.get("nonce").and_then(Value::as_str) != Some(n)
        {
            return Err(SessionRefusal::NonceMismatch);
        }
        let text_claim = |k: &str| match claims.get(k) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let staff = text_claim(&c.staff_claim)
            .and_then(|s| StaffId::new(s.trim()).ok())
            .ok_or(SessionRefusal::NoStaffClaim)?;
        let role = c
            .role_claim
            .as_deref()
            .and_then(text_claim)
            .and_then(|r| Text::new(r.chars().take(64).collect::<String>()).ok());
        let subject = text_claim("sub")
            .and_then(|s| Text::new(s.chars().take(256).collect::<String>()).ok())
            .ok_or(SessionRefusal::Malformed)?;
        Ok(Verified {
            staff,
            role,
            issuer: Text::new(c.issuer.clone()).map_err(|_| SessionRefusal::Malformed)?,
            subject,
            expires: Timestamp::from_millis(exp.saturating_mul(1000))
                .map_err(|_| SessionRefusal::Malformed)?,
            token_hash: Sha256::digest(token.as_bytes()).into(),
        })
    }

    // ---- sessions ----------------------------------------------------------------------

    fn save(store: &Store, state: &Persisted) -> Result<(), StoreError> {
        let mut extras = Extras::default();
        extras.set(STATE_KEY, state)?;
        store.put_device_state(&extras)
    }

    /// The view a role is limited to. Where roles narrow views, a token that names no
    /// readable role fails closed: the narrowest view (it may be a social-care role).
    fn view_cap(&self, role: Option<&str>) -> Option<View> {
        let c = self.oidc()?;
        if c.role_views.is_empty() {
            return None;
        }
        let Some(role) = role else {
            return Some(View::SocialCare);
        };
        c.role_views
            .iter()
            .find(|(r, _)| r == role)
            .map(|(_, v)| *v)
    }

    fn issue(&self, s: &StaffSession, secret: Zeroizing<String>) -> Result<Issued, IdentityError> {
        Ok(Issued {
            secret,
            id: s.id,
            staff: StaffId::new(&s.staff).map_err(|_| IdentityError::NoRandomness)?,
            role: s.role.clone().and_then(|r| Text::new(r).ok()),
            proven: proven(s),
            expires: s.expires,
        })
    }

    /// Opens a staff session for a verified token, bound to `client`, with `pin` to
    /// confirm it later. Blocking (Argon2id, a durable store write).
    pub fn open_session(
        &self,
        store: &Store,
        policy: &Policy,
        verified: &Verified,
        client: &str,
        pin: &str,
        now: Timestamp,
    ) -> Result<Result<Issued, SessionRefusal>, IdentityError> {
        let Some(c) = self.oidc() else {
            return Err(IdentityError::Asserted);
        };
        if !pin_ok(pin) {
            return Ok(Err(SessionRefusal::BadPin));
        }
        let Some(lease_end) = policy.access_ends(now, &verified.staff) else {
            return Ok(Err(SessionRefusal::NoLease));
        };
        let shift = u64::try_from(c.max_session.as_millis()).unwrap_or(u64::MAX);
        let expires = Timestamp::from_millis(now.as_millis().saturating_add(shift))
            .unwrap_or(lease_end)
            .min(lease_end);
        let pin_hash = argon()
            .hash_password_with_salt(pin.as_bytes(), &random_bytes::<16>()?)
            .map_err(|_| IdentityError::NoRandomness)?
            .to_string();
        let secret = Zeroizing::new(format!(
            "{SESSION_PREFIX}{}",
            hex::encode(random_bytes::<32>()?)
        ));
        let id = u64::from_le_bytes(random_bytes::<8>()?);
        let session = StaffSession {
            id,
            secret_hash: Sha256::digest(secret.as_bytes()).into(),
            client: client.to_owned(),
            staff: verified.staff.as_str().to_owned(),
            role: verified.role.as_ref().map(|r| r.as_str().to_owned()),
            issuer: verified.issuer.as_str().to_owned(),
            subject: verified.subject.as_str().to_owned(),
            opened: now,
            expires,
            pin_hash,
            wrong_pins: 0,
            next_pin_at: None,
        };
        let mut state = lock(&self.state);
        prune(&mut state, now);
        if state.used.iter().any(|(h, _)| *h == verified.token_hash) {
            return Ok(Err(SessionRefusal::Replayed));
        }
        // The token may be presented again until it is old enough to be refused anyway.
        let age = u64::try_from(c.max_token_age.as_millis()).unwrap_or(u64::MAX);
        let keep_until = Timestamp::from_millis(
            verified
                .expires
                .as_millis()
                .max(now.as_millis().saturating_add(age))
                .saturating_add(LEEWAY_MS),
        )
        .unwrap_or(verified.expires);
        state.used.push((verified.token_hash, keep_until));
        if state.sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = state
                .sessions
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.opened)
                .map(|(i, _)| i)
        {
            state.sessions.remove(oldest);
        }
        state.sessions.push(session.clone());
        Self::save(store, &state)?;
        drop(state);
        lock(&self.used).insert(id, now);
        Ok(Ok(self.issue(&session, secret)?))
    }

    /// The session a request names, for `client`, at trusted time `now`.
    pub fn resolve(
        &self,
        secret: Option<&str>,
        client: &str,
        now: Timestamp,
    ) -> Result<Resolved, Problem> {
        let Some(c) = self.oidc() else {
            return Err(Problem::Unknown);
        };
        let secret = secret
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or(Problem::Missing)?;
        let hash: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let state = lock(&self.state);
        let s = state
            .sessions
            .iter()
            .find(|s| s.secret_hash == hash)
            .ok_or(Problem::Unknown)?;
        // A session proven by an issuer this device no longer trusts is void.
        if s.issuer != c.issuer {
            return Err(Problem::Unknown);
        }
        if s.client != client {
            return Err(Problem::OtherClient(s.id));
        }
        if now >= s.expires {
            return Err(Problem::Expired(s.id));
        }
        let mut used = lock(&self.used);
        let idle = u64::try_from(c.idle_lock.as_millis()).unwrap_or(u64::MAX);
        match used.get(&s.id) {
            Some(t) if now.as_millis().saturating_sub(t.as_millis()) < idle => {}
            _ => return Err(Problem::Locked(s.id)),
        }
        used.insert(s.id, now);
        Ok(Resolved {
            id: s.id,
            staff: StaffId::new(&s.staff).map_err(|_| Problem::Unknown)?,
            role: s.role.clone().and_then(|r| Text::new(r).ok()),
            proven: proven(s),
            view_cap: self.view_cap(s.role.as_deref()),
            expires: s.expires,
        })
    }

    /// Ends session `id` (expiry, sign-out); `true` if it was live. Blocking.
    pub fn end(&self, store: &Store, id: u64) -> Result<bool, StoreError> {
        let mut state = lock(&self.state);
        let before = state.sessions.len();
        state.sessions.retain(|s| s.id != id);
        if state.sessions.len() == before {
            return Ok(false);
        }
        Self::save(store, &state)?;
        lock(&self.used).remove(&id);
        Ok(true)
    }

    /// Trusted time was corrected back by `back_ms` (SPEC.md §3.9): every time a session
    /// holds moves back with it, so a session opened on the wrong clock keeps the time it
    /// had left, no more. Blocking.
    pub fn move_back(&self, store: &Store, back_ms: u64) -> Result<(), StoreError> {
        let back = |t: Timestamp| {
            Timestamp::from_millis(t.as_millis().saturating_sub(back_ms)).unwrap_or(t)
        };
        let mut state = lock(&self.state);
        if state.sessions.is_empty() && state.used.is_empty() {
            return Ok(());
        }
        for s in &mut state.sessions {
            s.opened = back(s.opened);
            s.expires = back(s.expires);
            s.next_pin_at = s.next_pin_at.map(back);
        }
        for (_, until) in &mut state.used {
            *until = back(*until);
        }
        Self::save(store, &state)?;
        for t in lock(&self.used).values_mut() {
            *t = back(*t);
        }
        Ok(())
    }

    /// Ends every session past its time; returns their ids. Blocking.
    pub fn end_expired(&self, store: &Store, now: Timestamp) -> Result<Vec<u64>, StoreError> {
        let mut state = lock(&self.state);
        let ended: Vec<u64> = state
            .sessions
            .iter()
            .filter(|s| now >= s.expires)
            .map(|s| s.id)
            .collect();
        if ended.is_empty() {
            return Ok(ended);
        }
        state.sessions.retain(|s| now < s.expires);
        prune(&mut state, now);
        Self::save(store, &state)?;
        Ok(ended)
    }

    /// Checks `pin` against the session chosen by `pick` and counts a wrong one (ending
    /// the session at the limit); on success the session is unlocked. Returns the
    /// session's id. The PIN is checked without holding the sessions (Argon2id takes tens
    /// of milliseconds; requests go on meanwhile). Blocking.
    fn check_pin(
        &self,
        store: &Store,
        now: Timestamp,
        pin: &str,
        pick: impl Fn(&StaffSession) -> bool,
    ) -> Result<Result<u64, PinError>, StoreError> {
        let Some(c) = self.oidc() else {
            return Ok(Err(PinError::Unknown));
        };
        let found = lock(&self.state)
            .sessions
            .iter()
            .find(|s| s.issuer == c.issuer && pick(s))
            .cloned();
        let Some(s) = found else {
            return Ok(Err(PinError::Unknown));
        };
        if now >= s.expires {
            return Ok(Err(PinError::Expired(s.id)));
        }
        if let Some(at) = s.next_pin_at
            && now < at
        {
            return Ok(Err(PinError::TooSoon {
                retry_after: (at.as_millis() - now.as_millis()).div_ceil(1000),
            }));
        }
        let right = argon()
            .verify_password(pin.as_bytes(), s.pin_hash.as_str())
            .is_ok();
        let mut state = lock(&self.state);
        let Some(i) = state.sessions.iter().position(|x| x.id == s.id) else {
            // Ended meanwhile.
            return Ok(Err(PinError::Unknown));
        };
        let Some(live) = state.sessions.get_mut(i) else {
            return Ok(Err(PinError::Unknown));
        };
        if right {
            let had_wrong = live.wrong_pins > 0;
            live.wrong_pins = 0;
            live.next_pin_at = None;
            if had_wrong {
                Self::save(store, &state)?;
            }
            lock(&self.used).insert(s.id, now);
            return Ok(Ok(s.id));
        }
        let attempts = live.wrong_pins.saturating_add(1);
        let ended = attempts >= c.pin_attempts;
        if ended {
            state.sessions.remove(i);
            lock(&self.used).remove(&s.id);
        } else {
            live.wrong_pins = attempts;
            // 1, 2, 4, 8 … seconds before the next try.
            let wait = 1000u64 << u32::from(attempts.saturating_sub(1)).min(10);
            live.next_pin_at = Timestamp::from_millis(now.as_millis().saturating_add(wait)).ok();
        }
        Self::save(store, &state)?;
        Ok(Err(PinError::Wrong {
            session: s.id,
            attempts,
            ended,
        }))
    }

    /// Confirms a locked session with its PIN. Blocking.
    pub fn confirm(
        &self,
        store: &Store,
        secret: &str,
        client: &str,
        pin: &str,
        now: Timestamp,
    ) -> Result<Result<u64, PinError>, StoreError> {
        let hash: [u8; 32] = Sha256::digest(secret.trim().as_bytes()).into();
        self.check_pin(store, now, pin, |s| {
            s.secret_hash == hash && s.client == client
        })
    }

    /// Resumes `staff`'s session of `client` with the PIN when its secret is lost (a
    /// restarted browser or crew application, offline): a new secret replaces the old.
    /// Blocking.
    pub fn resume(
        &self,
        store: &Store,
        client: &str,
        staff: &StaffId,
        pin: &str,
        now: Timestamp,
    ) -> Result<Result<Issued, PinError>, IdentityError> {
        let id = match self.check_pin(store, now, pin, |s| {
            s.client == client && s.staff == staff.as_str() && now < s.expires
        })? {
            Ok(id) => id,
            Err(e) => return Ok(Err(e)),
        };
        let secret = Zeroizing::new(format!(
            "{SESSION_PREFIX}{}",
            hex::encode(random_bytes::<32>()?)
        ));
        let mut state = lock(&self.state);
        let Some(s) = state.sessions.iter_mut().find(|s| s.id == id) else {
            return Ok(Err(PinError::Unknown));
        };
        s.secret_hash = Sha256::digest(secret.as_bytes()).into();
        let s = s.clone();
        Self::save(store, &state)?;
        drop(state);
        Ok(Ok(self.issue(&s, secret)?))
    }

    // ---- the viewer's own sign-in (authorization code with PKCE) -------------------------

    /// Starts a viewer sign-in: returns the provider's authorization URL to send the
    /// browser to. Blocking (fetches the issuer's metadata if not held).
    pub fn start_sign_in(
        &self,
        store: &Store,
        client_token: Zeroizing<String>,
        client: String,
        redirect_uri: String,
    ) -> Result<SignInStart, IdentityError> {
        let Some(c) = self.oidc() else {
            return Err(IdentityError::Asserted);
        };
        let have = self.keys.read().map(|k| k.metadata.clone()).ok().flatten();
        let metadata = match have {
            Some(m) => m,
            None => {
                self.refresh_keys(store)?;
                self.keys
                    .read()
                    .ok()
                    .and_then(|k| k.metadata.clone())
                    .ok_or_else(|| IdentityError::Provider("no issuer metadata".into()))?
            }
        };
        let state = b64url(&random_bytes::<24>()?);
        let nonce = b64url(&random_bytes::<24>()?);
        let verifier = Zeroizing::new(b64url(&random_bytes::<32>()?));
        let challenge = b64url(&Sha256::digest(verifier.as_bytes()));
        let browser = Zeroizing::new(b64url(&random_bytes::<32>()?));
        let query = serde_urlencoded::to_string([
            ("response_type", "code"),
            ("client_id", c.viewer_client_id.as_str()),
            ("redirect_uri", redirect_uri.as_str()),
            ("scope", c.scopes.as_str()),
            ("state", state.as_str()),
            ("nonce", nonce.as_str()),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
            ("prompt", "login"),
        ])
        .map_err(|e| IdentityError::Provider(e.to_string()))?;
        let mut pending = lock(&self.pending);
        pending.retain(|_, p| p.created.elapsed() < PENDING_FOR);
        if pending.len() >= MAX_PENDING {
            return Err(IdentityError::Provider(
                "too many sign-ins under way; try again in a few minutes".into(),
            ));
        }
        pending.insert(
            state,
            Pending {
                client_token,
                client,
                verifier,
                nonce,
                redirect_uri,
                browser: Sha256::digest(browser.as_bytes()).into(),
                created: Instant::now(),
            },
        );
        let sep = if metadata.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        Ok(SignInStart {
            url: format!("{}{sep}{query}", metadata.authorization_endpoint),
            browser,
        })
    }

    /// Finishes a viewer sign-in: exchanges `code` at the token endpoint and verifies the
    /// ID token (with the sign-in's nonce). On success returns an id for the PIN form.
    /// Blocking (network).
    pub fn finish_sign_in(
        &self,
        store: &Store,
        state: &str,
        code: &str,
        browser: Option<&str>,
        now: Timestamp,
    ) -> Result<Result<SignedIn, SignInRefused>, IdentityError> {
        let Some(c) = self.oidc() else {
            return Err(IdentityError::Asserted);
        };
        let Some(p) = lock(&self.pending).remove(state) else {
            return Ok(Err(SignInRefused {
                client: None,
                reason: SessionRefusal::NonceMismatch,
            }));
        };
        let same_browser =
            browser.is_some_and(|b| <[u8; 32]>::from(Sha256::digest(b.as_bytes())) == p.browser);
        if p.created.elapsed() >= PENDING_FOR || !same_browser {
            return Ok(Err(SignInRefused {
                client: Some(p.client),
                reason: SessionRefusal::NonceMismatch,
            }));
        }
        let token_endpoint = self
            .keys
            .read()
            .ok()
            .and_then(|k| k.metadata.as_ref().map(|m| m.token_endpoint.clone()))
            .ok_or_else(|| IdentityError::Provider("no issuer metadata".into()))?;
        let res = Self::agent()
            .post(&token_endpoint)
            .header("accept", "application/json")
            .send_form([
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", p.redirect_uri.as_str()),
                ("client_id", c.viewer_client_id.as_str()),
                ("code_verifier", p.verifier.as_str()),
            ])
            .map_err(|e| IdentityError::Provider(format!("token endpoint: {e}")))?;
        let body = Self::read_json(res, "token endpoint")?;
        let Some(id_token) = body.get("id_token").and_then(Value::as_str) else {
            return Err(IdentityError::Provider(
                "the token endpoint gave no ID token".into(),
            ));
        };
        let verified = match self.verify_online(store, id_token, now, Some(&p.nonce)) {
            Ok(v) => v,
            Err(reason) => {
                return Ok(Err(SignInRefused {
                    client: Some(p.client),
                    reason,
                }));
            }
        };
        let form = b64url(&random_bytes::<24>()?);
        let staff = verified.staff.clone();
        let mut awaiting = lock(&self.awaiting);
        awaiting.retain(|_, a| a.created.elapsed() < PENDING_FOR);
        if awaiting.len() >= MAX_PENDING {
            return Err(IdentityError::Provider(
                "too many sign-ins under way; try again in a few minutes".into(),
            ));
        }
        awaiting.insert(
            form.clone(),
            AwaitingPin {
                client_token: p.client_token,
                client: p.client,
                verified,
                created: Instant::now(),
            },
        );
        Ok(Ok(SignedIn { form, staff }))
    }

    /// The member of staff of the sign-in waiting for its PIN under `form`.
    pub fn awaiting_staff(&self, form: &str) -> Option<StaffId> {
        lock(&self.awaiting)
            .get(form)
            .filter(|a| a.created.elapsed() < PENDING_FOR)
            .map(|a| a.verified.staff.clone())
    }

    /// Takes the verified sign-in waiting for its PIN under `form`.
    pub fn take_awaiting(&self, form: &str) -> Option<AwaitingPin> {
        let a = lock(&self.awaiting).remove(form)?;
        (a.created.elapsed() < PENDING_FOR).then_some(a)
    }
}

fn proven(s: &StaffSession) -> ProvenStaff {
    ProvenStaff {
        issuer: Text::new(s.issuer.clone()).unwrap_or_default(),
        subject: Text::new(s.subject.clone()).unwrap_or_default(),
        session: s.id,
    }
}

fn prune(state: &mut Persisted, now: Timestamp) {
    state.used.retain(|(_, until)| now < *until);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_four_to_twelve_digits() {
        assert!(pin_ok("1234"));
        assert!(pin_ok("123456789012"));
        assert!(!pin_ok("123"));
        assert!(!pin_ok("1234567890123"));
        assert!(!pin_ok("12a4"));
        assert!(!pin_ok(""));
    }

    #[test]
    fn problems_name_the_fix_and_carry_no_secret() {
        for p in [
            Problem::Missing,
            Problem::Unknown,
            Problem::OtherClient(1),
            Problem::Expired(1),
            Problem::Locked(1),
        ] {
            assert!(!p.message().contains(SESSION_PREFIX));
            assert!(p.code().starts_with("session-"));
        }
    }
}
