//! Client registrations for the local API: each piece of crew software gets a named
//! bearer token, shown once when issued; only its SHA-256 is stored (sealed, in the
//! store's device state). 256 random bits need no slow hash: the digest cannot be
//! reversed and cannot be guessed.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sync_protocol::audit::AuthFailure;
use sync_protocol::types::{Text, Timestamp};
use zeroize::Zeroizing;

/// Every token starts with this, so a leaked one is recognisable in a secret scan.
pub const TOKEN_PREFIX: &str = "cct_";

/// Longest client name.
pub const MAX_NAME: usize = 64;

/// One registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    /// Its name (unique on this device).
    pub name: String,
    /// SHA-256 of the token.
    hash: [u8; 32],
    /// When it was issued.
    pub created: Timestamp,
    /// When it was revoked, if it was.
    pub revoked: Option<Timestamp>,
}

/// Why a client registration change was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The name is empty, too long or has characters other than `A-Z a-z 0-9 - _ .`.
    #[error("a client name is 1–{MAX_NAME} of A-Z a-z 0-9 - _ . (got {0:?})")]
    BadName(String),
    /// A live registration has that name already.
    #[error("a client named {0:?} exists; revoke it first or choose another name")]
    Exists(String),
    /// The system gave no randomness for a token.
    #[error("no system randomness to make a token; nothing was registered")]
    NoRandomness,
    /// No live registration has that name.
    #[error("no client named {0:?} is registered")]
    Unknown(String),
}

/// A freshly issued token: printed once, never stored.
pub struct IssuedToken(Zeroizing<String>);

impl IssuedToken {
    /// The token text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IssuedToken([redacted])")
    }
}

/// The registrations, indexed by token hash.
#[derive(Clone, Debug, Default)]
pub struct Clients {
    list: Vec<Client>,
    by_hash: HashMap<[u8; 32], usize>,
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Checks a client name.
pub fn check_name(name: &str) -> Result<Text<MAX_NAME>, ClientError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(ClientError::BadName(name.chars().take(80).collect()));
    }
    Text::new(name).map_err(|_| ClientError::BadName(name.to_owned()))
}

impl Clients {
    /// From the stored list.
    pub fn new(list: Vec<Client>) -> Self {
        let by_hash = list.iter().enumerate().map(|(i, c)| (c.hash, i)).collect();
        Self { list, by_hash }
    }

    /// The registrations, revoked ones included.
    pub fn list(&self) -> &[Client] {
        &self.list
    }

    /// Who a token belongs to, or why it is not accepted.
    pub fn authenticate(
        &self,
        token: Option<&str>,
    ) -> Result<&Client, (AuthFailure, Option<&Client>)> {
        let Some(token) = token else {
            return Err((AuthFailure::NoToken, None));
        };
        match self
            .by_hash
            .get(&digest(token))
            .and_then(|i| self.list.get(*i))
        {
            None => Err((AuthFailure::UnknownToken, None)),
            Some(c) if c.revoked.is_some() => Err((AuthFailure::RevokedToken, Some(c))),
            Some(c) => Ok(c),
        }
    }

    /// Adds a registration with a new random token.
    pub fn add(
        &self,
        name: &str,
        now: Timestamp,
    ) -> Result<(Vec<Client>, IssuedToken), ClientError> {
        check_name(name)?;
        if self
            .list
            .iter()
            .any(|c| c.name == name && c.revoked.is_none())
        {
            return Err(ClientError::Exists(name.to_owned()));
        }
        let mut raw = Zeroizing::new([0u8; 32]);
        if getrandom::fill(raw.as_mut()).is_err() {
            // Refuse rather than issue a guessable token.
            return Err(ClientError::NoRandomness);
        }
        let token = Zeroizing::new(format!("{TOKEN_PREFIX}{}", hex::encode(raw.as_ref())));
        let mut list = self.list.clone();
        list.push(Client {
            name: name.to_owned(),
            hash: digest(&token),
            created: now,
            revoked: None,
        });
        Ok((list, IssuedToken(token)))
    }

    /// Revokes the live registration named `name`.
    pub fn revoke(&self, name: &str, now: Timestamp) -> Result<Vec<Client>, ClientError> {
        let mut list = self.list.clone();
        let c = list
            .iter_mut()
            .find(|c| c.name == name && c.revoked.is_none())
            .ok_or_else(|| ClientError::Unknown(name.chars().take(80).collect()))?;
        c.revoked = Some(now);
        Ok(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms).unwrap()
    }

    #[test]
    fn tokens_authenticate_until_revoked_and_are_stored_only_as_hashes() {
        let (list, token) = Clients::default().add("epcr", t(1)).unwrap();
        let clients = Clients::new(list);
        assert!(token.expose().starts_with(TOKEN_PREFIX));
        assert_eq!(token.expose().len(), TOKEN_PREFIX.len() + 64);
        assert_eq!(
            clients.authenticate(Some(token.expose())).unwrap().name,
            "epcr"
        );
        let stored = postcard::to_allocvec(clients.list()).unwrap();
        assert!(
            !stored
                .windows(16)
                .any(|w| token.expose().as_bytes().windows(16).any(|x| x == w))
        );
        assert_eq!(
            clients.authenticate(None).unwrap_err().0,
            AuthFailure::NoToken
        );
        assert_eq!(
            clients.authenticate(Some("cct_00")).unwrap_err().0,
            AuthFailure::UnknownToken
        );
        let revoked = Clients::new(clients.revoke("epcr", t(2)).unwrap());
        let (why, who) = revoked.authenticate(Some(token.expose())).unwrap_err();
        assert_eq!(why, AuthFailure::RevokedToken);
        assert_eq!(who.unwrap().name, "epcr");
        assert!(format!("{token:?}").contains("redacted"));
    }

    #[test]
    fn names_are_checked_and_unique_among_live_registrations() {
        let (list, _) = Clients::default().add("epcr", t(1)).unwrap();
        let c = Clients::new(list);
        assert_eq!(
            c.add("epcr", t(2)).unwrap_err(),
            ClientError::Exists("epcr".into())
        );
        assert!(matches!(c.add("", t(2)), Err(ClientError::BadName(_))));
        assert!(matches!(c.add("a b", t(2)), Err(ClientError::BadName(_))));
        assert!(matches!(
            c.add(&"x".repeat(65), t(2)),
            Err(ClientError::BadName(_))
        ));
        let c = Clients::new(c.revoke("epcr", t(3)).unwrap());
        assert!(c.add("epcr", t(4)).is_ok(), "a revoked name can be reused");
        assert!(matches!(
            c.revoke("nope", t(4)),
            Err(ClientError::Unknown(_))
        ));
    }
}
