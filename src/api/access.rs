//! The access pipeline shared by every patient route, and the handlers.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sync_protocol::NhsNumber;
use sync_protocol::audit::{
    Access, AuditAction, AuditEvent, AuditOutcome, DenyReason, SectionKind, Shown as ShownSection,
};
use sync_protocol::types::{BoundedVec, StaffId, Text};

use super::render::{self, Freshness};
use super::{Api, headers};
use crate::audit::AuditError;
use crate::identity::{Problem, Resolved};
use crate::policy::{self, Denial, Purpose, Shown};
use crate::search;

pub(super) const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";
use carecache_fhir::codes::NHS_NUMBER_SYSTEM as NHS_SYSTEM;
use carecache_fhir::model::{CodeableConcept, Coding, Resource};

/// Which error shape a route answers with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    Fhir,
    Json,
}

/// A refusal: status, stable code, words, and what the audit entry records.
#[derive(Clone)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    audit: DenyReason,
}

impl Refusal {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "bad-request",
            message: message.into(),
            audit: DenyReason::BadRequest,
        }
    }

    fn from_denial(d: &Denial) -> Self {
        let (status, audit) = match d {
            Denial::Objected => (StatusCode::NOT_FOUND, DenyReason::Objected),
            Denial::NotOnCaseload => (StatusCode::FORBIDDEN, DenyReason::NotOnCaseload),
            Denial::AccessEnded(policy::EndReason::OfflineTooLong) => {
                (StatusCode::FORBIDDEN, DenyReason::OfflineTooLong)
            }
            Denial::AccessEnded(_) => (StatusCode::FORBIDDEN, DenyReason::LeaseExpired),
            Denial::NotYetValid(_) => (StatusCode::FORBIDDEN, DenyReason::LeaseNotYetValid),
            Denial::EmergencyNotPermitted => {
                (StatusCode::FORBIDDEN, DenyReason::EmergencyNotPermitted)
            }
            Denial::ReasonRequired => (StatusCode::BAD_REQUEST, DenyReason::BadRequest),
            Denial::NotHeld => (StatusCode::NOT_FOUND, DenyReason::UnknownPatient),
        };
        Self {
            status,
            code: d.code(),
            message: d.to_string(),
            audit,
        }
    }
}

/// A JSON error body.
pub(super) fn json_error(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: Option<u64>,
) -> Response {
    let body = json!({
        "error": { "code": code, "message": message },
        "request_id": request_id.map(|r| r.to_string()),
    });
    let mut res = (status, axum::Json(body)).into_response();
    res.extensions_mut().insert(ErrorInfo {
        code: code.to_owned(),
        message: message.to_owned(),
    });
    res
}

fn fhir_json(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, FHIR_JSON)],
        serde_json::to_vec(body).unwrap_or_default(),
    )
        .into_response()
}

fn issue_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "login",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not-found",
        StatusCode::SERVICE_UNAVAILABLE => "transient",
        StatusCode::METHOD_NOT_ALLOWED => "not-supported",
        s if s.is_client_error() => "invalid",
        _ => "exception",
    }
}

/// What a refusal said, kept on the response for the viewer page to explain.
#[derive(Clone, Debug)]
pub(super) struct ErrorInfo {
    pub code: String,
    pub message: String,
}

/// What a patient route rendered, kept on the response for the viewer page.
#[derive(Clone, Debug)]
pub(super) struct Rendered(pub Value);

fn error(
    format: Format,
    status: StatusCode,
    code: &str,
    message: &str,
    rid: Option<u64>,
) -> Response {
    let mut res = match format {
        Format::Json => json_error(status, code, message, rid),
        Format::Fhir => {
            let mut oo =
                carecache_fhir::document::operation_outcome("error", issue_code(status), message);
            if let Some(issue) = oo.issue.first_mut() {
                issue.details = Some(
                    CodeableConcept::coded(Coding::new(
                        "https://carecache.invalid/fhir/CodeSystem/error",
                        code,
                    ))
                    .with_text(message),
                );
            }
            let oo = Resource::OperationOutcome(oo).to_json();
            fhir_json(status, &oo)
        }
    };
    if let Some(r) = rid
        && let Ok(v) = HeaderValue::from_str(&r.to_string())
    {
        res.headers_mut().insert(headers::REQUEST_ID, v);
    }
    if status == StatusCode::UNAUTHORIZED {
        res.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    res.extensions_mut().insert(ErrorInfo {
        code: code.to_owned(),
        message: message.to_owned(),
    });
    res
}

fn audit_failed(format: Format, e: &AuditError, rid: u64) -> Response {
    tracing::error!(error = %e, "access refused: its audit entry could not be committed");
    error(
        format,
        StatusCode::SERVICE_UNAVAILABLE,
        "audit-unavailable",
        "the audit log cannot be written, so no record can be shown; see /status",
        Some(rid),
    )
}

/// Who is asking: as the headers assert (asserted mode), or as the staff session the
/// request names proves (oidc mode).
struct Caller {
    client: Text<64>,
    user: Result<StaffId, Refusal>,
    role: Option<Text<64>>,
    purpose: Result<Purpose, String>,
    /// The proven staff session, in oidc mode.
    staff: Option<Resolved>,
}

/// The refusal for a request whose staff session does not let it in.
fn session_refusal(p: Problem) -> Refusal {
    Refusal {
        status: StatusCode::UNAUTHORIZED,
        code: p.code(),
        message: p.message().to_owned(),
        audit: match p {
            Problem::OtherClient(_) => DenyReason::SessionOfAnotherClient,
            _ => DenyReason::StaffNotProven,
        },
    }
}

fn header_text(h: &HeaderMap, name: &str) -> Result<Option<String>, String> {
    let Some(v) = h.get(name) else {
        return Ok(None);
    };
    let raw =
        std::str::from_utf8(v.as_bytes()).map_err(|_| format!("header {name} is not UTF-8"))?;
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| format!("header {name} is not valid percent-encoded UTF-8"))?;
    let t = decoded.trim();
    if t.is_empty() {
        return Ok(None);
    }
    if t.chars().any(char::is_control) {
        return Err(format!("header {name} has control characters"));
    }
    Ok(Some(t.to_owned()))
}

impl Caller {
    fn read(api: &Api, h: &HeaderMap, client: Text<64>) -> Self {
        let mut caller = Self::asserted(h, client);
        let identity = api.device.identity();
        if identity.oidc().is_some() {
            // The staff id and role come from the session alone; the asserted headers
            // are ignored.
            let secret = header_text(h, headers::SESSION).ok().flatten();
            match identity.resolve(secret.as_deref(), caller.client.as_str(), api.device.now()) {
                Ok(r) => {
                    caller.user = Ok(r.staff.clone());
                    caller.role = r.role.clone();
                    caller.staff = Some(r);
                }
                Err(p) => {
                    caller.user = Err(session_refusal(p));
                    caller.role = None;
                }
            }
        }
        caller
    }

    fn asserted(h: &HeaderMap, client: Text<64>) -> Self {
        let user = match header_text(h, headers::USER) {
            Ok(Some(u)) => StaffId::new(&u).map_err(|_| {
                format!(
                    "header {} must be a staff id: 1–32 of A-Z a-z 0-9 - . _",
                    headers::USER
                )
            }),
            Ok(None) => Err(format!(
                "missing header {}: the acting user's staff id",
                headers::USER
            )),
            Err(e) => Err(e),
        }
        .map_err(Refusal::bad_request);
        let role = header_text(h, headers::ROLE)
            .ok()
            .flatten()
            .and_then(|r| Text::new(r.chars().take(64).collect::<String>()).ok());
        let purpose = match header_text(h, headers::PURPOSE) {
            Ok(Some(p)) if p.eq_ignore_ascii_case("TREAT") => Ok(Purpose::Treat),
            Ok(Some(p)) if p.eq_ignore_ascii_case("ETREAT") => {
                match header_text(h, headers::REASON) {
                    Ok(Some(r)) => Ok(Purpose::Emergency(r)),
                    Ok(None) => Ok(Purpose::Emergency(String::new())),
                    Err(e) => Err(e),
                }
            }
            Ok(Some(_)) => Err(format!(
                "header {} must be TREAT or ETREAT",
                headers::PURPOSE
            )),
            Ok(None) => Err(format!(
                "missing header {}: TREAT, or ETREAT with {}",
                headers::PURPOSE,
                headers::REASON
            )),
            Err(e) => Err(e),
        };
        Self {
            client,
            user,
            role,
            purpose,
            staff: None,
        }
    }

    /// The policy's decision for this caller, with the grant narrowed to the view the
    /// proven role is limited to (if any).
    fn decide(
        &self,
        policy: &policy::Policy,
        store: &crate::store::Store,
        now: sync_protocol::types::Timestamp,
        user: &StaffId,
        purpose: &Purpose,
        nhs: &NhsNumber,
    ) -> Result<Result<policy::Grant, Denial>, crate::store::StoreError> {
        let cap = self.staff.as_ref().and_then(|s| s.view_cap);
        Ok(policy
            .decide(store, now, user, purpose, nhs)?
            .map(|g| g.narrowed(cap)))
    }

    fn access(&self, request_id: u64, action: AuditAction) -> Access {
        Access {
            request_id,
            client: self.client.clone(),
            user: self.user.as_ref().ok().cloned(),
            role: self.role.clone(),
            purpose: self.purpose.as_ref().ok().map(|p| match p {
                Purpose::Treat => sync_protocol::audit::Purpose::Treat,
                Purpose::Emergency(r) => sync_protocol::audit::Purpose::EmergencyTreat {
                    // Up to the audit field's size, on a character boundary.
                    reason: Text::new(truncate(r, 1024)).unwrap_or_default(),
                },
            }),
            action,
            patient: None,
            listed: BoundedVec::default(),
            lease: None,
            view: None,
            shown: BoundedVec::default(),
            withheld: 0,
            outcome: AuditOutcome::Served,
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default().to_owned()
}

/// Authenticates the client; an auth failure is audited before the 401 leaves.
pub(super) async fn authenticate(
    api: &Api,
    h: &HeaderMap,
    rid: u64,
    format: Format,
) -> Result<Text<64>, Response> {
    let token = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let clients = api.device.clients();
    match clients.authenticate(token) {
        Ok(c) => Ok(Text::new(c.name.clone()).unwrap_or_default()),
        Err((why, who)) => {
            let client = who.and_then(|c| Text::new(c.name.clone()).ok());
            let (seen, ended) = api
                .auth_failures
                .note(client.as_ref(), why, api.device.now());
            for event in ended {
                let record = api.device.audit_record(event);
                if let Err(e) = api.device.audit().write(record).await {
                    return Err(audit_failed(format, &e, rid));
                }
            }
            api.device
                .metrics()
                .auth_failures
                .get_or_create(&vec![(
                    "reason",
                    match why {
                        sync_protocol::audit::AuthFailure::NoToken => "no-token",
                        sync_protocol::audit::AuthFailure::UnknownToken => "unknown-token",
                        sync_protocol::audit::AuthFailure::RevokedToken => "revoked-token",
                    },
                )])
                .inc();
            match seen {
                // The first of its minute for this client and reason: audited now.
                super::auth_limit::Seen::First => {
                    let record = api.device.audit_record(AuditEvent::AuthFailure {
                        request_id: rid,
                        client,
                        reason: why,
                    });
                    if let Err(e) = api.device.audit().write(record).await {
                        return Err(audit_failed(format, &e, rid));
                    }
                }
                // Counted, and audited with the rest of the minute.
                super::auth_limit::Seen::Counted => {}
                super::auth_limit::Seen::Limited { retry_after_secs } => {
                    let mut res = error(
                        format,
                        StatusCode::TOO_MANY_REQUESTS,
                        "too-many-failed-authentications",
                        "too many requests without a valid client token this minute; they are counted in the audit log",
                        Some(rid),
                    );
                    if let Ok(v) = HeaderValue::from_str(&retry_after_secs.to_string()) {
                        res.headers_mut().insert(header::RETRY_AFTER, v);
                    }
                    return Err(res);
                }
            }
            let message = match why {
                sync_protocol::audit::AuthFailure::NoToken => {
                    "missing client token: send Authorization: Bearer <token from `carecache clients add`>"
                }
                sync_protocol::audit::AuthFailure::UnknownToken => "client token not recognised",
                sync_protocol::audit::AuthFailure::RevokedToken => "client token revoked",
            };
            Err(error(
                format,
                StatusCode::UNAUTHORIZED,
                "unauthorised",
                message,
                Some(rid),
            ))
        }
    }
}

/// The caller of a patient route: the device not wiped, the client authenticated (a
/// failure audited), the staff id, role and purpose read.
async fn caller(api: &Api, h: &HeaderMap, rid: u64, format: Format) -> Result<Caller, Response> {
    if api.device.is_wiped() {
        return Err(revoked(format, rid));
    }
    if api.device.anchor_held().is_some() {
        // Not a refusal of the caller: the device cannot vouch that this copy of the
        // data is the live one (SPEC: anti-rollback), so it serves no patient data.
        return Err(error(
            format,
            StatusCode::SERVICE_UNAVAILABLE,
            "rollback-check-failed",
            "the device cannot check that its data is current (its anti-rollback anchor could not be read), so it shows no patient data; the check is retried every minute — tell the IT team",
            Some(rid),
        ));
    }
    let client = authenticate(api, h, rid, format).await?;
    Ok(Caller::read(api, h, client))
}

/// The answer of a device the hub revoked (its data destroyed).
fn revoked(format: Format, rid: u64) -> Response {
    error(
        format,
        StatusCode::GONE,
        "device-revoked",
        "this device was revoked by the hub; its data has been destroyed",
        Some(rid),
    )
}

/// Commits `access` and answers with `ok` once it is durable; a refusal's entry is
/// committed the same way before its error leaves.
async fn finish(
    api: &Api,
    format: Format,
    mut access: Access,
    staff: Option<&Resolved>,
    outcome: Result<Response, Refusal>,
) -> Response {
    let rid = access.request_id;
    let (label_outcome, label_reason) = match &outcome {
        Ok(_) => ("served", "none"),
        Err(r) => {
            access.outcome = AuditOutcome::Denied(r.audit);
            access.shown = BoundedVec::default();
            access.listed = BoundedVec::default();
            ("denied", r.code)
        }
    };
    let event = match staff {
        Some(s) => AuditEvent::ProvenAccess {
            access,
            staff: s.proven.clone(),
        },
        None => AuditEvent::Access(access),
    };
    let record = api.device.audit_record(event);
    if let Err(e) = api.device.audit().write(record).await {
        api.device.metrics().audit_refusals.inc();
        return audit_failed(format, &e, rid);
    }
    api.device
        .metrics()
        .reads
        .get_or_create(&vec![("outcome", label_outcome), ("reason", label_reason)])
        .inc();
    match outcome {
        Ok(mut res) => {
            if let Ok(v) = HeaderValue::from_str(&rid.to_string()) {
                res.headers_mut().insert(headers::REQUEST_ID, v);
            }
            res
        }
        Err(r) => error(format, r.status, r.code, &r.message, Some(rid)),
    }
}

/// What a patient route renders from the record it may show.
type Renderer<'a> = Box<
    dyn FnOnce(&Shown, &Freshness, u64) -> Result<(Response, Vec<ShownSection>), Refusal>
        + Send
        + 'a,
>;

/// The pipeline for one patient: authenticate, caller, NHS number, policy, read,
/// render, audit, answer.
async fn patient_access(
    api: &Api,
    h: &HeaderMap,
    format: Format,
    action: AuditAction,
    patient: Result<NhsNumber, String>,
    render: Renderer<'_>,
) -> Response {
    let rid = api.next_request_id();
    let caller = match caller(api, h, rid, format).await {
        Ok(c) => c,
        Err(res) => return res,
    };
    let mut access = caller.access(rid, action);
    let outcome = decide_and_render(api, &caller, &mut access, patient, render);
    finish(api, format, access, caller.staff.as_ref(), outcome).await
}

fn decide_and_render(
    api: &Api,
    caller: &Caller,
    access: &mut Access,
    patient: Result<NhsNumber, String>,
    render: Renderer<'_>,
) -> Result<Response, Refusal> {
    let user = caller.user.as_ref().map_err(Clone::clone)?;
    let purpose = caller
        .purpose
        .as_ref()
        .map_err(|e| Refusal::bad_request(e.clone()))?;
    let nhs = patient.map_err(Refusal::bad_request)?;
    access.patient = Some(nhs);
    let device = &api.device;
    let now = device.now();
    let grant = caller
        .decide(&device.policy(), device.store(), now, user, purpose, &nhs)
        .map_err(|e| internal(&e))?
        .map_err(|d| Refusal::from_denial(&d))?;
    access.lease = Some(grant.lease());
    access.view = Some(grant.view());
    let shown = policy::open(device.store(), grant)
        .map_err(|e| internal(&e))?
        .ok_or_else(|| not_held(device))?;
    let (res, sections) = render(&shown, &api.freshness(), access.request_id)?;
    access.withheld = shown.withheld;
    access.shown = BoundedVec::try_from(sections).unwrap_or_default();
    Ok(res)
}

/// On the caseload but no record held: while the caseload is still arriving, the record
/// may simply not be here yet (a transient answer, with how much has arrived).
fn not_held(device: &crate::device::views::ReadView) -> Refusal {
    if device.arriving() {
        let words = device
            .caseload()
            .map(|c| c.words())
            .unwrap_or_else(|_| "some patients synced".to_owned());
        return Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "not-yet-arrived",
            message: format!(
                "this patient's record has not reached this device yet: the caseload is still arriving ({words}); try again shortly"
            ),
            audit: DenyReason::UnknownPatient,
        };
    }
    Refusal::from_denial(&Denial::NotHeld)
}

fn internal(e: &dyn std::fmt::Display) -> Refusal {
    tracing::error!(error = %e, "reading the store failed");
    Refusal {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "store-unavailable",
        message: "the local store could not be read; see /status".into(),
        audit: DenyReason::UnknownPatient,
    }
}

fn parse_nhs(text: &str) -> Result<NhsNumber, String> {
    if text.len() > 32 {
        return Err("malformed NHS number: too long".into());
    }
    let digits: String = text.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    if digits.len() != 10 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("malformed NHS number: it must be 10 digits".into());
    }
    NhsNumber::parse(&digits)
        .map_err(|_| "malformed NHS number: the check digit does not match (Modulus 11)".to_owned())
}

/// The token of an `Authorization: Bearer …` value. The scheme is matched
/// case-insensitively (RFC 9110 §11.1): `Bearer`, `bearer` and `BEARER` are the same.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Query parameters, refusing duplicates and anything not in `allowed` (`_format` is
/// accepted and ignored: the API speaks JSON only).
fn params(raw: Option<&str>, allowed: &[&str]) -> Result<Vec<(String, String)>, String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.unwrap_or(""))
        .map_err(|_| "malformed query string".to_owned())?;
    let mut seen: Vec<&str> = Vec::new();
    for (k, _) in &pairs {
        if k == "_format" {
            continue;
        }
        if !allowed.contains(&k.as_str()) {
            return Err(format!(
                "unsupported parameter {:?} (supported: {})",
                truncate(k, 40),
                allowed.join(", ")
            ));
        }
        if seen.contains(&k.as_str()) {
            return Err(format!("parameter {k} given more than once"));
        }
        seen.push(k);
    }
    Ok(pairs)
}

fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `?patient=` with the paging parameters of a searchset.
fn patient_param(raw: Option<&str>) -> Result<(NhsNumber, render::Paging), String> {
    let pairs = params(raw, &["patient", "_count", "_offset"])?;
    let p = param(&pairs, "patient").ok_or("missing parameter patient=Patient/{NHS number}")?;
    Ok((
        parse_nhs(p.strip_prefix("Patient/").unwrap_or(p))?,
        paging(&pairs)?,
    ))
}

/// `_count` (0 to 1,000; 0 asks for the total only) and `_offset` of a FHIR search.
fn paging(pairs: &[(String, String)]) -> Result<render::Paging, String> {
    let count = param(pairs, "_count")
        .map(|c| {
            c.parse::<usize>()
                .ok()
                .filter(|n| *n <= render::MAX_COUNT)
                .ok_or_else(|| format!("_count must be 0..={}", render::MAX_COUNT))
        })
        .transpose()?;
    let offset = param(pairs, "_offset")
        .map(|o| {
            o.parse::<usize>()
                .map_err(|_| "_offset must be a whole number".to_owned())
        })
        .transpose()?
        .unwrap_or(0);
    Ok(render::Paging { count, offset })
}

/// The base of this server's absolute URLs, from the request's `Host` (the API listens on
/// loopback over plain HTTP); empty (relative links) without one.
fn base_url(h: &HeaderMap) -> String {
    h.get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|host| {
            host.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b'-' | b'[' | b']'))
        })
        .map(|host| format!("http://{host}"))
        .unwrap_or_default()
}

fn fhir_ok(body: &Value) -> Response {
    fhir_json(StatusCode::OK, body)
}

fn view_refusal(what: &str) -> Refusal {
    Refusal {
        status: StatusCode::FORBIDDEN,
        code: "not-in-view",
        message: format!("{what} are not part of your view of this record"),
        audit: DenyReason::ViewNotPermitted,
    }
}

// ---- handlers -----------------------------------------------------------------------

pub(super) async fn metadata(State(api): State<Arc<Api>>) -> Response {
    fhir_ok(&render::capability_statement(api.device.now()))
}

pub(super) async fn fhir_patient_search(
    State(api): State<Arc<Api>>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    const ALLOWED: [&str; 8] = [
        "identifier",
        "_count",
        "_offset",
        "family",
        "given",
        "birthdate",
        "gender",
        "address-postalcode",
    ];
    let pairs = params(q.as_deref(), &ALLOWED);
    if let Ok(pairs) = &pairs
        && param(pairs, "identifier").is_none()
    {
        return fhir_demographic_search(&api, &h, pairs).await;
    }
    let mut page = render::Paging::default();
    let patient = pairs.and_then(|pairs| {
        let id = param(&pairs, "identifier").ok_or_else(|| {
            format!(
                "missing parameter identifier={NHS_SYSTEM}|{{NHS number}}, or at least two of family/given, birthdate, address-postalcode"
            )
        })?;
        if ALLOWED[3..].iter().any(|t| param(&pairs, t).is_some()) {
            return Err("search by identifier or by demographics, not both".to_owned());
        }
        let value = match id.split_once('|') {
            Some((system, value)) if system == NHS_SYSTEM || system.is_empty() => value,
            Some(_) => return Err(format!("only {NHS_SYSTEM} identifiers can be searched")),
            None => id,
        };
        page = paging(&pairs)?;
        parse_nhs(value)
    });
    let base = base_url(&h);
    let now = api.device.now();
    patient_access(
        &api,
        &h,
        Format::Fhir,
        AuditAction::SearchPatient,
        patient,
        Box::new(move |s, f, _| {
            Ok((
                fhir_ok(&render::patient_search(s, f, now, page, &base)),
                render::shown_one(SectionKind::Demographics, s),
            ))
        }),
    )
    .await
}

/// `GET /fhir/Patient?family=&given=&birthdate=&gender=&address-postalcode=`: a
/// searchset of the matches the caller may see, each with `search.score`.
async fn fhir_demographic_search(api: &Api, h: &HeaderMap, pairs: &[(String, String)]) -> Response {
    let rid = api.next_request_id();
    let caller = match caller(api, h, rid, Format::Fhir).await {
        Ok(c) => c,
        Err(res) => return res,
    };
    let mut access = caller.access(rid, AuditAction::SearchPatient);
    let base = base_url(h);
    let outcome = (|| {
        let query = search_query(pairs, "address-postalcode")
            .map_err(Refusal::bad_request)?
            .ok_or_else(|| Refusal::bad_request("no search terms"))?;
        let page = paging(pairs).map_err(Refusal::bad_request)?;
        let found = search(api, &caller, &mut access, &query)?;
        let results: Vec<(&Shown, f64)> = found.iter().map(|(m, s)| (s, m.score)).collect();
        // The paging links repeat the search the caller sent (to the caller only: the
        // terms are never logged or audited).
        let terms: Vec<&(String, String)> =
            pairs.iter().filter(|(k, _)| !k.starts_with('_')).collect();
        let query = format!(
            "/fhir/Patient?{}",
            serde_urlencoded::to_string(&terms).unwrap_or_default()
        );
        Ok(fhir_ok(&render::patient_matches(
            &results,
            &api.freshness(),
            api.device.now(),
            page,
            (&base, &query),
            SEARCH_NOTICE,
        )))
    })();
    finish(api, Format::Fhir, access, caller.staff.as_ref(), outcome).await
}

pub(super) async fn fhir_patient_read(
    State(api): State<Arc<Api>>,
    h: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    patient_access(
        &api,
        &h,
        Format::Fhir,
        AuditAction::ReadPatient,
        parse_nhs(&id),
        Box::new(|s, f, _| {
            Ok((
                fhir_ok(&render::patient(s, f)),
                render::shown_one(SectionKind::Demographics, s),
            ))
        }),
    )
    .await
}

pub(super) async fn fhir_patient_op(
    State(api): State<Arc<Api>>,
    h: HeaderMap,
    Path((id, op)): Path<(String, String)>,
) -> Response {
    if op != "$summary" {
        return error(
            Format::Fhir,
            StatusCode::NOT_FOUND,
            "not-found",
            "unknown operation (supported: $summary)",
            None,
        );
    }
    let now = api.device.now();
    let label = api.device.config().device_label.clone();
    patient_access(
        &api,
        &h,
        Format::Fhir,
        AuditAction::ReadSummary,
        parse_nhs(&id),
        Box::new(move |s, f, rid| {
            Ok((
                fhir_ok(&render::summary(s, f, now, &label, rid)),
                render::shown_all(s),
            ))
        }),
    )
    .await
}

pub(super) async fn fhir_flags(
    State(api): State<Arc<Api>>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    fhir_section(&api, &h, q.as_deref(), SectionKind::Alerts).await
}

pub(super) async fn fhir_allergies(
    State(api): State<Arc<Api>>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    fhir_section(&api, &h, q.as_deref(), SectionKind::Allergies).await
}

pub(super) async fn fhir_medications(
    State(api): State<Arc<Api>>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    fhir_section(&api, &h, q.as_deref(), SectionKind::Medications).await
}

/// One section's searchset for `?patient=`.
async fn fhir_section(api: &Api, h: &HeaderMap, q: Option<&str>, kind: SectionKind) -> Response {
    let now = api.device.now();
    let (action, what) = match kind {
        SectionKind::Allergies => (AuditAction::ReadAllergies, "Allergies"),
        SectionKind::Medications => (AuditAction::ReadMedications, "Medications"),
        _ => (AuditAction::ReadAlerts, "Alerts"),
    };
    let (patient, page) = match patient_param(q) {
        Ok((nhs, page)) => (Ok(nhs), page),
        Err(e) => (Err(e), render::Paging::default()),
    };
    let base = base_url(h);
    patient_access(
        api,
        h,
        Format::Fhir,
        action,
        patient,
        Box::new(move |s, f, _| {
            let b = render::section_bundle(kind, s, f, now, page, &base)
                .ok_or_else(|| view_refusal(what))?;
            Ok((fhir_ok(&b), render::shown_one(kind, s)))
        }),
    )
    .await
}

pub(super) async fn json_summary(
    State(api): State<Arc<Api>>,
    h: HeaderMap,
    Path(nhs): Path<String>,
) -> Response {
    summary(&api, &h, &nhs).await
}

/// The `/v1/patients/{nhs}` pipeline; the body is also kept on the response
/// ([`Rendered`]) for the viewer page.
pub(super) async fn summary(api: &Api, h: &HeaderMap, nhs: &str) -> Response {
    patient_access(
        api,
        h,
        Format::Json,
        AuditAction::ReadSummary,
        parse_nhs(nhs),
        Box::new(|s, f, rid| {
            Ok((
                json_keeping(render::json_summary(s, f, rid)),
                render::shown_all(s),
            ))
        }),
    )
    .await
}

/// A JSON answer that also keeps its body as [`Rendered`].
fn json_keeping(body: Value) -> Response {
    let mut res = axum::Json(&body).into_response();
    res.extensions_mut().insert(Rendered(body));
    res
}

/// Most rows per page of `GET /v1/patients`.
const PAGE_MAX: usize = sync_protocol::audit::MAX_LISTED;

/// `GET /v1/patients?_count=&_offset=`: the caller's own caseload, a page at a time,
/// objected patients left out. One audit entry names every patient listed.
pub(super) async fn json_list(
    State(api): State<Arc<Api>>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    list(&api, &h, q.as_deref()).await
}

/// The caseload pipeline; the body is also kept on the response ([`Rendered`]).
pub(super) async fn list(api: &Api, h: &HeaderMap, q: Option<&str>) -> Response {
    let rid = api.next_request_id();
    let client = match authenticate(api, h, rid, Format::Json).await {
        Ok(c) => c,
        Err(res) => return res,
    };
    let caller = Caller::read(api, h, client);
    let mut access = caller.access(rid, AuditAction::ListCaseload);
    let outcome = list_page(api, &caller, &mut access, q);
    finish(api, Format::Json, access, caller.staff.as_ref(), outcome).await
}

fn list_page(
    api: &Api,
    caller: &Caller,
    access: &mut Access,
    q: Option<&str>,
) -> Result<Response, Refusal> {
    let user = caller.user.as_ref().map_err(Clone::clone)?;
    caller
        .purpose
        .as_ref()
        .map_err(|e| Refusal::bad_request(e.clone()))?;
    let pairs = params(
        q,
        &[
            "_count",
            "_offset",
            "family",
            "given",
            "birthdate",
            "gender",
            "postcode",
        ],
    )
    .map_err(Refusal::bad_request)?;
    if let Some(query) = search_query(&pairs, "postcode").map_err(Refusal::bad_request)? {
        access.action = AuditAction::SearchPatient;
        let found = search(api, caller, access, &query)?;
        let rows: Vec<Value> = found
            .iter()
            .map(|(m, shown)| render::json_search_item(shown, m.score, &m.reasons))
            .collect();
        return Ok(json_keeping(json!({
            "search": true,
            "count": rows.len(),
            "patients": rows,
            "notice": SEARCH_NOTICE,
            "freshness": api.freshness().json(),
            "request_id": access.request_id.to_string(),
        })));
    }
    let count = match param(&pairs, "_count") {
        None => PAGE_MAX,
        Some(c) => c
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=PAGE_MAX).contains(n))
            .ok_or_else(|| Refusal::bad_request(format!("_count must be 1..={PAGE_MAX}")))?,
    };
    let offset = match param(&pairs, "_offset") {
        None => 0,
        Some(o) => o
            .parse::<usize>()
            .map_err(|_| Refusal::bad_request("_offset must be a whole number"))?,
    };
    let device = &api.device;
    let now = device.now();
    let policy = device.policy();
    let caseload = policy.caseload(now, user);
    let total = caseload.len();
    let mut rows = Vec::new();
    let mut listed = Vec::new();
    // The page is the next `count` listable patients from `offset`; `next` points at the
    // one after them, and is offered only if there is one (a page never leads to an
    // empty page past the last patient).
    let mut next = None;
    for (i, (nhs, _)) in caseload.iter().enumerate().skip(offset) {
        let Ok(grant) = caller
            .decide(&policy, device.store(), now, user, &Purpose::Treat, nhs)
            .map_err(|e| internal(&e))?
        else {
            continue; // objected since the lease was granted: not listed
        };
        let Some(shown) = policy::open(device.store(), grant).map_err(|e| internal(&e))? else {
            continue; // not held (yet)
        };
        if rows.len() == count {
            next = Some(format!("/v1/patients?_count={count}&_offset={i}"));
            break;
        }
        rows.push(render::json_list_item(&shown));
        listed.push(*nhs);
    }
    access.listed = BoundedVec::try_from(listed).unwrap_or_default();
    let body = json!({
        "total": total,
        "offset": offset,
        "count": rows.len(),
        "next": next,
        "patients": rows,
        "freshness": api.freshness().json(),
        "request_id": access.request_id.to_string(),
    });
    Ok(json_keeping(body))
}

/// What every search answer says beside its matches (HAZ-02).
pub(super) const SEARCH_NOTICE: &str = "Matches are ranked by how closely they fit what was typed; check the NHS number, date of birth and address with the patient or a relative before relying on a record.";

/// A demographic search from request parameters, if any search term is present
/// (`postcode_param` names the postcode: `postcode` in JSON, `address-postalcode` in
/// FHIR). `Err` says why the terms cannot be searched.
fn search_query(
    pairs: &[(String, String)],
    postcode_param: &str,
) -> Result<Option<search::Query>, String> {
    let terms = ["family", "given", "birthdate", "gender", postcode_param];
    if !terms.iter().any(|t| param(pairs, t).is_some()) {
        return Ok(None);
    }
    search::Query::new(
        param(pairs, "family"),
        param(pairs, "given"),
        param(pairs, "birthdate"),
        param(pairs, "gender"),
        param(pairs, postcode_param),
    )
    .map(Some)
    .map_err(|e| e.to_string())
}

/// The matches `query` finds that the caller may see, best first, at most
/// [`search::MAX_RESULTS`]: each decided by the policy as a read of that patient would
/// be (a patient the caller may not see is left out without a trace; with emergency
/// access and a reason, patients held under leases that allow it are included and marked).
/// Records the shown patients in `access`.
fn search(
    api: &Api,
    caller: &Caller,
    access: &mut Access,
    query: &search::Query,
) -> Result<Vec<(search::Match, Shown)>, Refusal> {
    let user = caller.user.as_ref().map_err(Clone::clone)?;
    let purpose = caller
        .purpose
        .as_ref()
        .map_err(|e| Refusal::bad_request(e.clone()))?;
    let device = &api.device;
    let now = device.now();
    let policy = device.policy();
    let matches = api
        .search_index(|index| index.search(query))
        .map_err(|e| internal(&e))?;
    let mut out = Vec::new();
    for m in matches {
        if out.len() == search::MAX_RESULTS {
            break;
        }
        let Ok(grant) = caller
            .decide(&policy, device.store(), now, user, purpose, &m.nhs)
            .map_err(|e| internal(&e))?
        else {
            continue;
        };
        let Some(shown) = policy::open(device.store(), grant).map_err(|e| internal(&e))? else {
            continue;
        };
        out.push((m, shown));
    }
    access.listed = BoundedVec::try_from(out.iter().map(|(m, _)| m.nhs).collect::<Vec<_>>())
        .unwrap_or_default();
    if let [(m, _)] = out.as_slice() {
        access.patient = Some(m.nhs);
    }
    Ok(out)
}

pub(super) async fn not_found(uri: axum::http::Uri) -> Response {
    let format = if uri.path().starts_with("/fhir") {
        Format::Fhir
    } else {
        Format::Json
    };
    error(
        format,
        StatusCode::NOT_FOUND,
        "not-found",
        "no such route",
        None,
    )
}

pub(super) async fn method_not_allowed(uri: axum::http::Uri) -> Response {
    let format = if uri.path().starts_with("/fhir") {
        Format::Fhir
    } else {
        Format::Json
    };
    error(
        format,
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this API is read-only: GET only",
        None,
    )
}

/// `POST /v1/lookup` `{"nhs_number": "…"}`, with `X-Carecache-Purpose: ETREAT` and a
/// reason: a one-off lookup of a patient on no caseload of this device (SPEC.md §3.8).
/// Online, the hub grants a short lease for the patient alone to this device and the
/// caller (`201`, then read the patient as any other, emergency access flagged); offline
/// it is refused at once (`503`, `offline`). Every lookup, granted or not, is audited
/// on the device before the answer leaves, and at the hub when granted.
pub(super) async fn lookup(
    State(api): State<Arc<Api>>,
    h: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        nhs_number: String,
    }
    let nhs = serde_json::from_slice::<Ask>(&body)
        .map_err(|_| "the body must be {\"nhs_number\": \"…\"}".to_owned())
        .and_then(|a| parse_nhs(&a.nhs_number));
    lookup_patient(&api, &h, nhs).await
}

/// A one-off lookup for `nhs` (the API route and the viewer's emergency form).
pub(super) async fn lookup_patient(
    api: &Api,
    h: &HeaderMap,
    nhs: Result<NhsNumber, String>,
) -> Response {
    let format = Format::Json;
    let rid = api.next_request_id();
    let caller = match caller(api, h, rid, format).await {
        Ok(c) => c,
        Err(res) => return res,
    };
    let refuse = |r: Refusal| error(format, r.status, r.code, &r.message, Some(rid));
    let user = match &caller.user {
        Ok(u) => u.clone(),
        Err(r) => return refuse(r.clone()),
    };
    let reason = match &caller.purpose {
        Ok(Purpose::Emergency(r))
            if !r.trim().is_empty() && r.trim().chars().count() <= policy::MAX_REASON_CHARS =>
        {
            r.trim().to_owned()
        }
        Ok(_) | Err(_) => {
            return refuse(Refusal {
                status: StatusCode::BAD_REQUEST,
                code: "reason-required",
                message: format!(
                    "a lookup is emergency access: send {}: ETREAT and {} (1–{} characters)",
                    headers::PURPOSE,
                    headers::REASON,
                    policy::MAX_REASON_CHARS
                ),
                audit: DenyReason::BadRequest,
            });
        }
    };
    let nhs = match nhs {
        Ok(n) => n,
        Err(m) => return refuse(Refusal::bad_request(m)),
    };
    let device = api.device.clone();
    let now = device.now();
    let policy = device.policy();
    // Already held and visible to this caller: nothing to ask.
    if let Ok(Ok(_)) = caller.decide(
        &policy,
        device.store(),
        now,
        &user,
        &Purpose::Emergency(reason.clone()),
        &nhs,
    ) {
        return (
            StatusCode::OK,
            axum::Json(json!({ "outcome": "held", "request_id": rid.to_string() })),
        )
            .into_response();
    }
    let under = policy.lookup_lease(&user, now);
    let result = match under {
        None => crate::device::LookupResult::NotPermitted,
        Some(lease) => {
            let (u, r) = (user.clone(), reason.clone());
            let door = api.lookup.clone();
            match tokio::task::spawn_blocking(move || door.lookup(nhs, lease, &u, &r)).await {
                Ok(Ok(r)) => r,
                Ok(Err(crate::device::DeviceError::Revoked)) => return revoked(format, rid),
                Ok(Err(e)) => crate::device::LookupResult::Failed(e.to_string()),
                Err(e) => crate::device::LookupResult::Failed(e.to_string()),
            }
        }
    };
    let event = sync_protocol::audit::LookupEvent {
        request_id: rid,
        client: caller.client.clone(),
        user: user.clone(),
        proven: caller.staff.as_ref().map(|s| s.proven.clone()),
        patient: nhs,
        under,
        reason: Text::new(truncate(&reason, 1024)).unwrap_or_default(),
        outcome: result.audit(),
    };
    let record = api.device.audit_record(AuditEvent::Lookup(event));
    if let Err(e) = api.device.audit().write(record).await {
        return audit_failed(format, &e, rid);
    }
    api.device
        .metrics()
        .lookups
        .get_or_create(&vec![("outcome", lookup_label(&result))])
        .inc();
    use crate::device::LookupResult as L;
    match result {
        L::Granted { lease, not_after } => (
            StatusCode::CREATED,
            axum::Json(json!({
                "outcome": "granted",
                "lease": lease.0,
                "until": not_after.rfc3339(),
                "request_id": rid.to_string(),
            })),
        )
            .into_response(),
        L::Offline(_) => error(
            format,
            StatusCode::SERVICE_UNAVAILABLE,
            "offline",
            "the hub cannot be reached: a lookup needs signal (patients on the caseload are still available offline)",
            Some(rid),
        ),
        L::NotPermitted => error(
            format,
            StatusCode::FORBIDDEN,
            "emergency-not-permitted",
            "no lease of yours on this device allows emergency access",
            Some(rid),
        ),
        L::NotAvailable => error(
            format,
            StatusCode::NOT_FOUND,
            "not-available",
            "the shared care record cannot give this patient",
            Some(rid),
        ),
        L::HubTooOld => error(
            format,
            StatusCode::NOT_IMPLEMENTED,
            "lookup-unsupported",
            "the hub does not offer one-off lookups (protocol version 5)",
            Some(rid),
        ),
        L::Failed(why) => {
            tracing::warn!(error = %why, "lookup failed");
            error(
                format,
                StatusCode::BAD_GATEWAY,
                "lookup-failed",
                "the lookup failed; see /status and the daemon's log",
                Some(rid),
            )
        }
    }
}

fn lookup_label(r: &crate::device::LookupResult) -> &'static str {
    use crate::device::LookupResult as L;
    match r {
        L::Granted { .. } => "granted",
        L::Offline(_) => "offline",
        L::NotPermitted => "not-permitted",
        L::NotAvailable => "not-available",
        L::HubTooOld => "hub-too-old",
        L::Failed(_) => "failed",
    }
}
