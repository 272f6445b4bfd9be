//! Audit forwarding upstream: stored device audit sent to a FHIR R4 audit store as
//! AuditEvent (IHE BALP), at least once.
//!
//! - **Idempotent**: each entry is a `PUT AuditEvent/{device}-{seq}` in a FHIR `batch`
//!   Bundle, so sending it again (after a crash between the send and the saved position,
//!   or from a second instance) replaces it with itself and never makes a second one.
//! - **Resumes** from a position kept per device in the hub's database, moved in one
//!   transaction after each Bundle, only as far as the entries the server accepted run
//!   unbroken from the last position: an entry the server refuses is sent again next
//!   pass, and so is everything after it on that device — the other devices' entries go
//!   on in the same pass. Nothing is ever skipped.
//! - **One forwarder at a time** across instances sharing a database (a PostgreSQL
//!   advisory lock; within one process, a mutex): the others' passes find it held and
//!   wait for the next.
//! - **Fails visibly**: an unreachable server, a refusal or an answer that is not a
//!   batch-response for the Bundle sent stops the pass with an error naming the status
//!   and FHIR issue codes only (a server's diagnostics can quote the resource, and so
//!   patients); `/metrics` shows what waits.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{Value, json};

use crate::audit::StoredEntry;
use crate::state::{HubState, StateError};

/// Why a pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// The audit store could not be reached or the connection broke.
    #[error("the audit store could not be reached: {0}")]
    Unreachable(String),
    /// The audit store refused the Bundle, or some entries in it.
    #[error("the audit store refused {refused} of {sent} entries (HTTP {status}; {issues})")]
    Refused {
        /// HTTP status of the answer (of the Bundle, or the first refused entry's).
        status: u16,
        /// Entries refused.
        refused: u64,
        /// Entries in the Bundle.
        sent: u64,
        /// The FHIR issue codes given, if any.
        issues: String,
    },
    /// The answer was not a batch-response for the Bundle sent.
    #[error("the audit store's answer is not a batch-response for the {0} entries sent")]
    BadAnswer(usize),
    /// The hub's database failed.
    #[error(transparent)]
    State(#[from] StateError),
}

/// What a pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Forwarded {
    /// Entries the audit store accepted.
    pub accepted: u64,
    /// Bundles sent.
    pub bundles: u64,
    /// Another instance (or pass) was forwarding: nothing done.
    pub busy: bool,
}

/// Sends stored audit to one FHIR R4 server.
pub struct Forwarder {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    batch: u64,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("base", &self.base)
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}

impl Forwarder {
    /// A forwarder to the FHIR base `url`, trusting `ca_pem` (else the public web roots),
    /// with an optional bearer `token`, `batch` entries a Bundle.
    pub fn new(
        url: &str,
        ca_pem: Option<&[u8]>,
        token: Option<String>,
        batch: u32,
    ) -> Result<Self, ForwardError> {
        let mut tls = ureq::tls::TlsConfig::builder();
        if let Some(pem) = ca_pem {
            let roots: Vec<_> = ureq::tls::parse_pem(pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if roots.is_empty() {
                return Err(ForwardError::Unreachable(
                    "forward.ca_file holds no certificate".into(),
                ));
            }
            tls = tls.root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(roots)));
        }
        let agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .timeout_global(Some(Duration::from_secs(120)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            agent,
            base: url.trim_end_matches('/').to_owned(),
            token,
            batch: u64::from(batch.clamp(1, 1000)),
        })
    }

    /// Forwards everything stored and not yet accepted upstream, a Bundle at a time,
    /// until none is left or a Bundle fails (progress up to then is kept).
    pub fn pass(&self, state: &HubState) -> Result<Forwarded, ForwardError> {
        let Some(_guard) = state.engine.try_forward_guard()? else {
            return Ok(Forwarded {
                busy: true,
                ..Forwarded::default()
            });
        };
        let mut done = Forwarded::default();
        // Devices with an entry refused this pass: nothing more of theirs is sent until
        // the next (their position stays before it), and the others go on.
        let mut blocked = std::collections::HashSet::new();
        let mut first_refusal = None;
        loop {
            let work = state.forward_work(self.batch, &blocked)?;
            if work.is_empty() {
                return first_refusal.map_or(Ok(done), Err);
            }
            let (accepted, refused) = self.send(&work)?;
            // Per device, how far the accepted entries run unbroken from its position.
            let mut reach: BTreeMap<&str, u64> = BTreeMap::new();
            for (e, ok) in work.iter().zip(&accepted) {
                if blocked.contains(&e.device) {
                    continue;
                }
                if *ok {
                    reach.insert(&e.device, e.seq);
                } else {
                    blocked.insert(e.device.clone());
                }
            }
            state.set_forwarded(&reach)?;
            done.accepted += accepted.iter().filter(|ok| **ok).count() as u64;
            done.bundles += 1;
            if first_refusal.is_none() {
                first_refusal = refused;
            }
        }
    }

    /// One batch Bundle: which entries the server accepted, and the error if any
    /// were refused.
    fn send(
        &self,
        work: &[StoredEntry],
    ) -> Result<(Vec<bool>, Option<ForwardError>), ForwardError> {
        let entries: Vec<Value> = work
            .iter()
            .map(|e| {
                let resource = crate::export::audit_event(e);
                let id = resource
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                json!({
                    "resource": resource,
                    "request": { "method": "PUT", "url": format!("AuditEvent/{id}") },
                })
            })
            .collect();
        let bundle = json!({ "resourceType": "Bundle", "type": "batch", "entry": entries });
        let mut req = self
            .agent
            .post(&self.base)
            .header("content-type", "application/fhir+json")
            .header("accept", "application/fhir+json");
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body =
            serde_json::to_vec(&bundle).map_err(|e| ForwardError::Unreachable(e.to_string()))?;
        let mut resp = req
            .send(&body[..])
            .map_err(|e| ForwardError::Unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .map_err(|e| ForwardError::Unreachable(e.to_string()))?;
        let answer: Option<Value> = serde_json::from_str(&text).ok();
        if !(200..300).contains(&status) {
            return Err(ForwardError::Refused {
                status,
                refused: work.len() as u64,
                sent: work.len() as u64,
                issues: answer
                    .as_ref()
                    .map_or_else(|| "no OperationOutcome".into(), issue_codes),
            });
        }
        let answer = answer.ok_or(ForwardError::BadAnswer(work.len()))?;
        let answered = answer
            .get("entry")
            .and_then(Value::as_array)
            .filter(|_| {
                answer.get("resourceType") == Some(&json!("Bundle"))
                    && answer.get("type") == Some(&json!("batch-response"))
            })
            .filter(|a| a.len() == work.len())
            .ok_or(ForwardError::BadAnswer(work.len()))?;
        let mut accepted = Vec::with_capacity(work.len());
        let mut first_refusal: Option<(u16, String)> = None;
        for entry in answered {
            let code = entry
                .pointer("/response/status")
                .and_then(Value::as_str)
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse::<u16>().ok());
            let ok = code.is_some_and(|c| (200..300).contains(&c));
            if !ok && first_refusal.is_none() {
                let issues = entry
                    .pointer("/response/outcome")
                    .map_or_else(|| "no OperationOutcome".into(), issue_codes);
                first_refusal = Some((code.unwrap_or(0), issues));
            }
            accepted.push(ok);
        }
        let refused = accepted.iter().filter(|ok| !**ok).count() as u64;
        let err = first_refusal.map(|(status, issues)| ForwardError::Refused {
            status,
            refused,
            sent: work.len() as u64,
            issues,
        });
        Ok((accepted, err))
    }
}

/// The issue codes of an OperationOutcome (`invalid, required`), never its text.
fn issue_codes(outcome: &Value) -> String {
    let codes: Vec<&str> = outcome
        .get("issue")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|i| i.get("code").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    if codes.is_empty() {
        "no issue codes".into()
    } else {
        format!("issues: {}", codes.join(", "))
    }
}

impl HubState {
    /// Up to `limit` stored entries not yet forwarded, device by device in order, none of
    /// the devices in `skip`.
    pub fn forward_work(
        &self,
        limit: u64,
        skip: &std::collections::HashSet<String>,
    ) -> Result<Vec<StoredEntry>, StateError> {
        let mut tx = self.engine.read()?;
        let done = tx.forwarded()?;
        let mut heads = tx.audit_heads()?;
        heads.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = Vec::new();
        for (device, head) in heads {
            let left = limit.saturating_sub(out.len() as u64);
            if left == 0 {
                break;
            }
            let after = done.get(&device).copied().unwrap_or(0);
            if head.seq <= after || skip.contains(&device) {
                continue;
            }
            tx.audit_after(&device, after, left, &mut |d, seq, bytes| {
                out.push(crate::audit::stored_entry(d, seq, bytes)?);
                Ok(())
            })?;
        }
        Ok(out)
    }

    /// Moves each device's forwarded position to the sequence given (never back).
    pub fn set_forwarded(&self, reach: &BTreeMap<&str, u64>) -> Result<(), StateError> {
        if reach.is_empty() {
            return Ok(());
        }
        let mut tx = self.engine.write()?;
        for (device, seq) in reach {
            tx.set_forwarded(device, *seq)?;
        }
        tx.commit()
    }

    /// How far each device's audit is forwarded.
    pub fn forwarded(&self) -> Result<HashMap<String, u64>, StateError> {
        self.engine.read()?.forwarded()
    }

    /// Stored entries not yet forwarded, in all.
    pub fn forward_pending(&self) -> Result<u64, StateError> {
        let mut tx = self.engine.read()?;
        let done = tx.forwarded()?;
        Ok(tx
            .audit_heads()?
            .iter()
            .map(|(d, h)| h.seq.saturating_sub(done.get(d).copied().unwrap_or(0)))
            .sum())
    }
}
