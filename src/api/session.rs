//! Staff sessions over the local API (oidc mode; see [`crate::identity`]):
//!
//! - `POST /v1/session` `{"id_token", "pin"}`: a verified ID token opens a session for
//!   the calling client; the answer carries its secret once.
//! - `GET /v1/session`: the session named by `X-Carecache-Session`.
//! - `POST /v1/session/confirm` `{"pin"}`: unlocks a session locked after a pause or a
//!   restart (works offline).
//! - `POST /v1/session/resume` `{"staff", "pin"}`: the client lost the secret (restarted
//!   offline): the PIN gives a new secret for the same session.
//! - `DELETE /v1/session`: signs out.
//!
//! Every step, refused or not, is audited before it is answered.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use sync_protocol::audit::{AuditEvent, SessionEnd, SessionEvent, SessionRefusal, SignInRoute};
use sync_protocol::types::{StaffId, Text};
use zeroize::Zeroizing;

use super::access::{self, Format, json_error};
use super::{Api, headers};
use crate::identity::{Issued, PinError, Verified};

/// Largest session request body (an ID token is at most 16 KiB).
pub(super) const MAX_BODY: usize = 32 * 1024;

/// Writes `event` durably; `Err` is the answer to give when it cannot be.
async fn audit(api: &Api, event: AuditEvent) -> Result<(), Response> {
    let record = api.device.audit_record(event);
    match api.device.audit().write(record).await {
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::error!(error = %e, "staff-session step refused: its audit entry could not be committed");
            Err(json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit-unavailable",
                "the audit log cannot be written; see /status",
                None,
            ))
        }
    }
}

fn not_oidc() -> Response {
    json_error(
        StatusCode::CONFLICT,
        "identity-asserted",
        "this device is in asserted identity mode: the client software names the member of staff (X-Carecache-User); there are no staff sessions",
        None,
    )
}

async fn body_json<T: serde::de::DeserializeOwned>(req: Request<Body>) -> Result<T, Response> {
    let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY)
        .await
        .map_err(|_| {
            json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too-large",
                "the request body is too large",
                None,
            )
        })?;
    serde_json::from_slice(&bytes).map_err(|_| {
        json_error(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "the body must be JSON with the fields this route documents",
            None,
        )
    })
}

/// The answer for an opened or resumed session (its secret, shown this once).
pub(super) fn issued_json(i: &Issued, idle_lock_secs: u64) -> serde_json::Value {
    json!({
        "session": i.secret.as_str(),
        "session_id": format!("{:016x}", i.id),
        "staff": i.staff.as_str(),
        "role": i.role.as_ref().map(|r| r.as_str()),
        "issuer": i.proven.issuer.as_str(),
        "expires": i.expires.rfc3339(),
        "idle_lock_secs": idle_lock_secs,
    })
}

fn created(body: &serde_json::Value) -> Response {
    let mut res = (StatusCode::CREATED, axum::Json(body)).into_response();
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

#[derive(Deserialize)]
struct OpenBody {
    id_token: Zeroizing<String>,
    pin: Zeroizing<String>,
}

/// What opening a session came to.
pub(crate) enum Opened {
    /// Opened (and audited).
    Ok(Issued),
    /// Refused (and audited).
    Refused(SessionRefusal),
    /// Could not be done (store, audit): the response to give.
    Failed(Response),
}

/// What opens a session: an ID token to verify, or one the viewer's sign-in verified.
pub(crate) enum Source {
    /// From the client software.
    Token(Zeroizing<String>),
    /// Verified by the viewer's own sign-in (with its nonce).
    Verified(Box<Verified>),
}

/// Verifies the token and opens a session for `client`, auditing either outcome.
pub(crate) async fn open(
    api: &Arc<Api>,
    client: Text<64>,
    source: Source,
    pin: Zeroizing<String>,
    route: SignInRoute,
) -> Opened {
    let device = api.device.clone();
    let name = client.as_str().to_owned();
    let done = tokio::task::spawn_blocking(move || {
        let now = device.now();
        let identity = device.identity();
        let verified = match source {
            Source::Verified(v) => Ok(*v),
            Source::Token(t) => identity.verify_online(device.store(), &t, now, None),
        };
        match verified {
            Err(r) => Ok(Err(r)),
            Ok(v) => identity.open_session(device.store(), &device.policy(), &v, &name, &pin, now),
        }
    })
    .await;
    let result = match done {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "a staff session could not be opened");
            return Opened::Failed(json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store-unavailable",
                "the session could not be recorded; see /status",
                None,
            ));
        }
        Err(_) => {
            return Opened::Failed(json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "opening the session failed",
                None,
            ));
        }
    };
    match result {
        Ok(issued) => {
            let event = AuditEvent::Session(SessionEvent::Opened {
                session: issued.id,
                client,
                user: issued.staff.clone(),
                role: issued.role.clone(),
                staff: issued.proven.clone(),
                expires: issued.expires,
                route,
            });
            if let Err(res) = audit(api, event).await {
                // Not audited, so not usable: end it again.
                let _ = api.device.identity().end(api.device.store(), issued.id);
                return Opened::Failed(res);
            }
            Opened::Ok(issued)
        }
        Err(reason) => {
            api.device
                .metrics()
                .auth_failures
                .get_or_create(&vec![("reason", "id-token-refused")])
                .inc();
            let event = AuditEvent::Session(SessionEvent::Refused {
                client,
                session: None,
                reason,
            });
            if let Err(res) = audit(api, event).await {
                return Opened::Failed(res);
            }
            Opened::Refused(reason)
        }
    }
}

/// The answer for a refused ID token or PIN at sign-in.
pub(crate) fn refused(reason: SessionRefusal) -> Response {
    let (status, code) = match reason {
        SessionRefusal::BadPin => (StatusCode::BAD_REQUEST, "bad-pin"),
        SessionRefusal::NoLease => (StatusCode::FORBIDDEN, "no-lease"),
        SessionRefusal::KeysUnavailable => {
            (StatusCode::SERVICE_UNAVAILABLE, "issuer-keys-unavailable")
        }
        _ => (StatusCode::UNAUTHORIZED, "id-token-refused"),
    };
    let words = match reason {
        SessionRefusal::BadPin => "choose a PIN of 4 to 12 digits".to_owned(),
        SessionRefusal::KeysUnavailable => "the identity provider's keys are not held and it cannot be reached: sign in when the device has signal".to_owned(),
        r => format!(
            "ID token refused: {}",
            carecache_fhir::audit::refusal_text(r)
        ),
    };
    json_error(status, code, &words, None)
}

/// A session route's idle-lock seconds (oidc mode only), authenticated client and JSON
/// body, or the answer refusing it.
async fn client_and_body<T: serde::de::DeserializeOwned>(
    api: &Api,
    req: Request<Body>,
) -> Result<(u64, Text<64>, T), Response> {
    let Some(idle) = api.device.identity().oidc().map(|c| c.idle_lock.as_secs()) else {
        return Err(not_oidc());
    };
    let rid = api.next_request_id();
    let client = access::authenticate(api, req.headers(), rid, Format::Json).await?;
    Ok((idle, client, body_json(req).await?))
}

/// `POST /v1/session`.
pub(super) async fn open_route(State(api): State<Arc<Api>>, req: Request<Body>) -> Response {
    let (idle, client, body): (_, _, OpenBody) = match client_and_body(&api, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    match open(
        &api,
        client,
        Source::Token(body.id_token),
        body.pin,
        SignInRoute::Client,
    )
    .await
    {
        Opened::Ok(issued) => created(&issued_json(&issued, idle)),
        Opened::Refused(r) => refused(r),
        Opened::Failed(res) => res,
    }
}

fn session_secret(h: &HeaderMap) -> Option<String> {
    h.get(headers::SESSION)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The client and the session secret of a session route, or the answer refusing it.
async fn client_and_secret(api: &Api, h: &HeaderMap) -> Result<(Text<64>, String), Response> {
    if api.device.identity().oidc().is_none() {
        return Err(not_oidc());
    }
    let rid = api.next_request_id();
    let client = access::authenticate(api, h, rid, Format::Json).await?;
    let secret = session_secret(h).ok_or_else(|| {
        json_error(
            StatusCode::UNAUTHORIZED,
            "session-required",
            "send X-Carecache-Session with the session from POST /v1/session",
            None,
        )
    })?;
    Ok((client, secret))
}

/// `GET /v1/session`.
pub(super) async fn show(State(api): State<Arc<Api>>, h: HeaderMap) -> Response {
    let (client, secret) = match client_and_secret(&api, &h).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    match api
        .device
        .identity()
        .resolve(Some(&secret), client.as_str(), api.device.now())
    {
        Ok(r) => axum::Json(json!({
            "session_id": format!("{:016x}", r.id),
            "staff": r.staff.as_str(),
            "role": r.role.as_ref().map(|x| x.as_str()),
            "issuer": r.proven.issuer.as_str(),
            "expires": r.expires.rfc3339(),
            "view": r.view_cap.map(|v| match v {
                sync_protocol::message::View::SocialCare => "social-care",
                sync_protocol::message::View::Clinical => "clinical",
            }),
        }))
        .into_response(),
        Err(p) => json_error(StatusCode::UNAUTHORIZED, p.code(), p.message(), None),
    }
}

#[derive(Deserialize)]
struct PinBody {
    pin: Zeroizing<String>,
    #[serde(default)]
    staff: Option<String>,
}

/// Audits and answers a failed PIN step.
pub(crate) async fn pin_failed(api: &Api, client: &Text<64>, e: PinError) -> Response {
    match e {
        PinError::Unknown => {
            let event = AuditEvent::Session(SessionEvent::Refused {
                client: client.clone(),
                session: None,
                reason: SessionRefusal::BadPin,
            });
            if let Err(res) = audit(api, event).await {
                return res;
            }
            json_error(
                StatusCode::UNAUTHORIZED,
                "session-unknown",
                "no live staff session matches: sign in again",
                None,
            )
        }
        PinError::Expired(session) => {
            if api
                .device
                .identity()
                .end(api.device.store(), session)
                .unwrap_or(false)
            {
                let event = AuditEvent::Session(SessionEvent::Ended {
                    session,
                    reason: SessionEnd::Expired,
                });
                if let Err(res) = audit(api, event).await {
                    return res;
                }
            }
            json_error(
                StatusCode::UNAUTHORIZED,
                "session-expired",
                "your staff session has ended (shift or lease over): sign in again",
                None,
            )
        }
        PinError::TooSoon { retry_after } => {
            let mut res = json_error(
                StatusCode::TOO_MANY_REQUESTS,
                "pin-wait",
                &format!("wait {retry_after} s before trying the PIN again"),
                None,
            );
            if let Ok(v) = HeaderValue::from_str(&retry_after.to_string()) {
                res.headers_mut().insert(header::RETRY_AFTER, v);
            }
            res
        }
        PinError::Wrong {
            session,
            attempts,
            ended,
        } => {
            if let Err(res) = audit(
                api,
                AuditEvent::Session(SessionEvent::WrongPin { session, attempts }),
            )
            .await
            {
                return res;
            }
            if ended {
                if let Err(res) = audit(
                    api,
                    AuditEvent::Session(SessionEvent::Ended {
                        session,
                        reason: SessionEnd::LockedOut,
                    }),
                )
                .await
                {
                    return res;
                }
                return json_error(
                    StatusCode::UNAUTHORIZED,
                    "session-locked-out",
                    "too many wrong PINs: the staff session has ended; sign in again with your identity provider",
                    None,
                );
            }
            let limit = api.device.identity().oidc().map_or(5, |c| c.pin_attempts);
            json_error(
                StatusCode::UNAUTHORIZED,
                "wrong-pin",
                &format!(
                    "wrong PIN ({} of {limit} attempts left)",
                    limit.saturating_sub(attempts)
                ),
                None,
            )
        }
    }
}

/// `POST /v1/session/confirm` `{"pin"}`.
pub(super) async fn confirm(State(api): State<Arc<Api>>, req: Request<Body>) -> Response {
    let (client, secret) = match client_and_secret(&api, req.headers()).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    let body: PinBody = match body_json(req).await {
        Ok(b) => b,
        Err(res) => return res,
    };
    confirm_secret(&api, &client, &secret, body.pin).await
}

/// Confirms the session `secret` of `client` with `pin` (audited either way).
pub(crate) async fn confirm_secret(
    api: &Arc<Api>,
    client: &Text<64>,
    secret: &str,
    pin: Zeroizing<String>,
) -> Response {
    let device = api.device.clone();
    let name = client.as_str().to_owned();
    let secret = Zeroizing::new(secret.to_owned());
    let done = tokio::task::spawn_blocking(move || {
        device
            .identity()
            .confirm(device.store(), &secret, &name, &pin, device.now())
    })
    .await;
    match done {
        Ok(Ok(Ok(session))) => {
            if let Err(res) = audit(
                api,
                AuditEvent::Session(SessionEvent::Confirmed { session }),
            )
            .await
            {
                return res;
            }
            axum::Json(json!({ "session_id": format!("{session:016x}"), "confirmed": true }))
                .into_response()
        }
        Ok(Ok(Err(e))) => pin_failed(api, client, e).await,
        _ => json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store-unavailable",
            "the session could not be updated; see /status",
            None,
        ),
    }
}

/// `POST /v1/session/resume` `{"staff", "pin"}`.
pub(super) async fn resume(State(api): State<Arc<Api>>, req: Request<Body>) -> Response {
    let (idle, client, body): (_, _, PinBody) = match client_and_body(&api, req).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    let Some(staff) = body
        .staff
        .as_deref()
        .and_then(|s| StaffId::new(s.trim()).ok())
    else {
        return json_error(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "name the member of staff (\"staff\") whose session to resume",
            None,
        );
    };
    match resume_session(&api, &client, &staff, body.pin).await {
        Ok(issued) => created(&issued_json(&issued, idle)),
        Err(res) => res,
    }
}

/// Resumes `staff`'s session of `client` with the PIN (audited either way).
pub(crate) async fn resume_session(
    api: &Arc<Api>,
    client: &Text<64>,
    staff: &StaffId,
    pin: Zeroizing<String>,
) -> Result<Issued, Response> {
    let device = api.device.clone();
    let name = client.as_str().to_owned();
    let who = staff.clone();
    let done = tokio::task::spawn_blocking(move || {
        device
            .identity()
            .resume(device.store(), &name, &who, &pin, device.now())
    })
    .await;
    match done {
        Ok(Ok(Ok(issued))) => {
            audit(
                api,
                AuditEvent::Session(SessionEvent::Confirmed { session: issued.id }),
            )
            .await?;
            Ok(issued)
        }
        Ok(Ok(Err(e))) => Err(pin_failed(api, client, e).await),
        _ => Err(json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store-unavailable",
            "the session could not be updated; see /status",
            None,
        )),
    }
}

/// `DELETE /v1/session`.
pub(super) async fn sign_out(State(api): State<Arc<Api>>, h: HeaderMap) -> Response {
    let (client, secret) = match client_and_secret(&api, &h).await {
        Ok(x) => x,
        Err(res) => return res,
    };
    end_session(&api, &client, &secret).await
}

/// Ends the session `secret` names for `client` (audited).
pub(crate) async fn end_session(api: &Api, client: &Text<64>, secret: &str) -> Response {
    let identity = api.device.identity();
    let id = match identity.resolve(Some(secret), client.as_str(), api.device.now()) {
        Ok(r) => r.id,
        Err(crate::identity::Problem::Locked(id) | crate::identity::Problem::Expired(id)) => id,
        Err(p) => return json_error(StatusCode::UNAUTHORIZED, p.code(), p.message(), None),
    };
    if identity.end(api.device.store(), id).unwrap_or(false)
        && let Err(res) = audit(
            api,
            AuditEvent::Session(SessionEvent::Ended {
                session: id,
                reason: SessionEnd::SignedOut,
            }),
        )
        .await
    {
        return res;
    }
    StatusCode::NO_CONTENT.into_response()
}
