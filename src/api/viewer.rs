//! The viewer page (`GET /`): server-rendered HTML for a crew member at a tablet or a
//! nurse at a laptop — no script, no external asset, works with no network. Sign in once
//! per browser session with a client token and a staff id (asserted identity mode) or,
//! in oidc mode, at the identity provider (authorization code with PKCE) with a PIN for
//! the staff session that follows (see [`crate::identity`]); pick a patient from the
//! caseload (or type an NHS number); see the banner, **alerts first**, then allergies,
//! medications and key contacts; freshness and access expiry always on screen; every
//! refusal explained in words.
//!
//! Every page that shows a patient goes through the same audited pipeline as the JSON
//! API (`/v1/patients`, `/v1/patients/{nhs}`): the session only supplies the headers a
//! client would send. Sessions live in memory (a daemon restart signs everyone out),
//! expire after [`IDLE`] without use or [`LIFETIME`] in all, and the cookie is
//! `HttpOnly; SameSite=Strict` with no expiry (it ends with the browser session). Pages
//! are `no-store`, so nothing of a patient is left in the browser's cache.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sync_protocol::types::{StaffId, Text};
use zeroize::Zeroizing;

use super::access::{self, ErrorInfo, Rendered};
use super::{Api, headers};

/// A session ends after this long without a page.
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// A session ends this long after sign-in, used or not (a shift).
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions held at once; signing in beyond this ends the least recently used.
const MAX_SESSIONS: usize = 256;
/// Largest sign-in form accepted.
pub const MAX_FORM_BYTES: usize = 4096;
/// Rows per caseload page.
const PAGE_ROWS: usize = 50;
const COOKIE: &str = "carecache_session";
/// Binds a viewer sign-in at the identity provider to the browser that started it.
const SIGN_IN_COOKIE: &str = "carecache_signin";

/// A signed-in browser: what it sends as a client would.
struct Session {
    signed: Signed,
    started: Instant,
    last_used: Instant,
}

/// What a signed-in browser's requests carry: the client token, the member of staff, and
/// in oidc mode the staff session's secret (which alone names them to the pipeline).
#[derive(Clone)]
pub(super) struct Signed {
    token: Zeroizing<String>,
    user: StaffId,
    staff_session: Option<Zeroizing<String>>,
}

/// The signed-in browsers, by SHA-256 of their cookie.
#[derive(Default)]
pub(super) struct Sessions(Mutex<HashMap<[u8; 32], Session>>);

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts a session; returns its cookie value.
    fn start(&self, signed: Signed) -> Option<String> {
        let mut id = [0u8; 32];
        getrandom::fill(&mut id).ok()?;
        let cookie = hex::encode(id);
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, s| live(s, now));
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.last_used).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(
            Sha256::digest(cookie.as_bytes()).into(),
            Session {
                signed,
                started: now,
                last_used: now,
            },
        );
        Some(cookie)
    }

    /// The session of this request's cookie, touched; `None` if absent or expired.
    fn find(&self, h: &HeaderMap) -> Option<Signed> {
        let key: [u8; 32] = Sha256::digest(cookie(h)?.as_bytes()).into();
        let now = Instant::now();
        let mut map = self.lock();
        let s = map.get_mut(&key)?;
        if !live(s, now) {
            map.remove(&key);
            return None;
        }
        s.last_used = now;
        Some(s.signed.clone())
    }

    fn end(&self, h: &HeaderMap) {
        if let Some(c) = cookie(h) {
            let key: [u8; 32] = Sha256::digest(c.as_bytes()).into();
            self.lock().remove(&key);
        }
    }
}

fn live(s: &Session, now: Instant) -> bool {
    now.duration_since(s.last_used) < IDLE && now.duration_since(s.started) < LIFETIME
}

fn cookie(h: &HeaderMap) -> Option<&str> {
    named_cookie(h, COOKIE).filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn named_cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// The headers a client would send for this session.
fn client_headers(signed: &Signed, emergency_reason: Option<&str>) -> Option<HeaderMap> {
    let mut h = HeaderMap::new();
    h.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {}", signed.token.as_str())).ok()?,
    );
    match &signed.staff_session {
        Some(secret) => {
            h.insert(headers::SESSION, HeaderValue::from_str(secret).ok()?);
        }
        None => {
            h.insert(
                headers::USER,
                HeaderValue::from_str(signed.user.as_str()).ok()?,
            );
        }
    }
    match emergency_reason {
        None => {
            h.insert(headers::PURPOSE, HeaderValue::from_static("TREAT"));
        }
        Some(r) => {
            h.insert(headers::PURPOSE, HeaderValue::from_static("ETREAT"));
            let encoded =
                percent_encoding::utf8_percent_encode(r, percent_encoding::NON_ALPHANUMERIC)
                    .to_string();
            h.insert(headers::REASON, HeaderValue::from_str(&encoded).ok()?);
        }
    }
    Some(h)
}

// ---- handlers -----------------------------------------------------------------------

#[derive(Deserialize)]
pub(super) struct ListQuery {
    page: Option<usize>,
}

/// `GET /`: the caseload, or the sign-in form.
pub(super) async fn home(
    State(api): State<Arc<Api>>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let Some(signed) = api.sessions.find(&h) else {
        return sign_in_page(&api, StatusCode::OK, None);
    };
    let user = signed.user.clone();
    let Some(headers) = client_headers(&signed, None) else {
        return sign_in_page(&api, StatusCode::OK, None);
    };
    let page = serde_urlencoded::from_str::<ListQuery>(q.as_deref().unwrap_or(""))
        .ok()
        .and_then(|q| q.page)
        .unwrap_or(0)
        .min(1_000_000);
    let query = format!(
        "_count={PAGE_ROWS}&_offset={}",
        page.saturating_mul(PAGE_ROWS)
    );
    let res = access::list(&api, &headers, Some(&query)).await;
    let status = res.status();
    if let Some(Rendered(body)) = res.extensions().get::<Rendered>() {
        let html = caseload_page(&api, &user, body, page);
        return page_response(status, html, &res);
    }
    refusal_page(&api, &user, None, &res)
}

/// `GET /find?nhs=`: to the patient's page (the number as typed; the page says if it is
/// not a valid NHS number).
pub(super) async fn find(RawQuery(q): RawQuery) -> Response {
    #[derive(Deserialize)]
    struct Find {
        nhs: String,
    }
    let typed = serde_urlencoded::from_str::<Find>(q.as_deref().unwrap_or(""))
        .map(|f| f.nhs)
        .unwrap_or_default();
    let digits: String = typed.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    let target = format!(
        "/patient/{}",
        percent_encoding::utf8_percent_encode(&digits, percent_encoding::NON_ALPHANUMERIC)
    );
    see_other(&target, None)
}

#[derive(Deserialize)]
pub(super) struct PatientQuery {
    reason: Option<String>,
}

/// `GET /patient/{nhs}` (with `?reason=` for emergency access).
pub(super) async fn patient(
    State(api): State<Arc<Api>>,
    h: HeaderMap,
    Path(nhs): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let Some(signed) = api.sessions.find(&h) else {
        return sign_in_page(
            &api,
            StatusCode::UNAUTHORIZED,
            Some("Please sign in to see patient records."),
        );
    };
    let user = signed.user.clone();
    // The emergency-access reason never travels in a URL (history, logs, referrers): a
    // link carrying one is refused, the reason unread.
    if serde_urlencoded::from_str::<PatientQuery>(q.as_deref().unwrap_or(""))
        .is_ok_and(|q| q.reason.is_some())
    {
        return message_page(
            &api,
            Some(&user),
            StatusCode::BAD_REQUEST,
            "Use the emergency-access form",
            "Emergency access is asked for with the form on the patient's page, not with a link.",
        );
    }
    show_patient(&api, &signed, &nhs, None).await
}

#[derive(Deserialize)]
struct EmergencyForm {
    #[serde(default)]
    reason: String,
}

/// `POST /patient/{nhs}` (form: `reason`): emergency access, from this page only.
pub(super) async fn patient_emergency(
    State(api): State<Arc<Api>>,
    Path(nhs): Path<String>,
    req: Request<Body>,
) -> Response {
    let Some(signed) = api.sessions.find(req.headers()) else {
        return sign_in_page(
            &api,
            StatusCode::UNAUTHORIZED,
            Some("Please sign in to see patient records."),
        );
    };
    if !same_origin(req.headers()) {
        return message_page(
            &api,
            Some(&signed.user),
            StatusCode::FORBIDDEN,
            "Emergency access refused",
            "The emergency-access form must be sent from this page.",
        );
    }
    let reason = match form::<EmergencyForm>(req.into_body()).await {
        Ok(f) => f.reason,
        Err(StatusCode::PAYLOAD_TOO_LARGE) => {
            return message_page(
                &api,
                Some(&signed.user),
                StatusCode::PAYLOAD_TOO_LARGE,
                "Reason not accepted",
                TOO_LARGE,
            );
        }
        // No reason: the pipeline refuses and explains.
        Err(_) => String::new(),
    };
    let Some(headers) = client_headers(&signed, Some(&reason)) else {
        return show_patient(&api, &signed, &nhs, Some(&reason)).await;
    };
    let res = access::summary(&api, &headers, &nhs).await;
    // Not on any caseload of this device: with signal, ask the hub for a one-off lookup
    // (SPEC.md §3.8), then show the patient; offline the page says why not.
    let not_here = res
        .extensions()
        .get::<ErrorInfo>()
        .is_some_and(|e| e.code == "not-on-caseload");
    if !not_here {
        return render_patient(&api, &signed.user, &nhs, &res);
    }
    let digits: String = nhs.chars().filter(|c| !matches!(c, ' ' | '-')).collect();
    let looked = access::lookup_patient(
        &api,
        &headers,
        sync_protocol::NhsNumber::parse(&digits).map_err(|_| "malformed NHS number".to_owned()),
    )
    .await;
    if looked.status().is_success() {
        return show_patient(&api, &signed, &nhs, Some(&reason)).await;
    }
    let why = looked
        .extensions()
        .get::<ErrorInfo>()
        .map(|e| e.message.clone())
        .unwrap_or_else(|| "the lookup failed".to_owned());
    message_page(
        &api,
        Some(&signed.user),
        looked.status(),
        "Patient not on this device",
        &format!(
            "This patient is not on any caseload held here, and a one-off lookup was not possible: {why}."
        ),
    )
}

/// A patient's page through the audited pipeline, with emergency access if `reason`.
async fn show_patient(api: &Api, signed: &Signed, nhs: &str, reason: Option<&str>) -> Response {
    let user = signed.user.clone();
    let Some(headers) = client_headers(signed, reason) else {
        return message_page(
            api,
            Some(&user),
            StatusCode::BAD_REQUEST,
            "Reason not accepted",
            "The emergency access reason could not be used; please type it again.",
        );
    };
    let res = access::summary(api, &headers, nhs).await;
    render_patient(api, &user, nhs, &res)
}

/// The patient page, or the refusal page explaining why not, for an API answer.
fn render_patient(api: &Api, user: &StaffId, nhs: &str, res: &Response) -> Response {
    let status = res.status();
    if let Some(Rendered(body)) = res.extensions().get::<Rendered>() {
        let html = patient_page(api, user, body);
        return page_response(status, html, res);
    }
    refusal_page(api, user, Some(nhs), res)
}

#[derive(Deserialize)]
struct SignIn {
    token: String,
    #[serde(default)]
    user: String,
    /// oidc mode: `resume` resumes a session with the PIN; anything else signs in with
    /// the identity provider.
    #[serde(default)]
    action: String,
    #[serde(default)]
    pin: Zeroizing<String>,
}

/// Starts a browser session for `signed` and sends it to the caseload.
fn signed_in(api: &Api, signed: Signed) -> Response {
    match api.sessions.start(signed) {
        Some(cookie) => see_other(
            "/",
            Some(&format!(
                "{COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict"
            )),
        ),
        None => message_page(
            api,
            None,
            StatusCode::SERVICE_UNAVAILABLE,
            "Sign-in failed",
            "No randomness for a session; try again.",
        ),
    }
}

const TOO_LARGE: &str = "The form was too large.";

/// A viewer form's fields; `Err` is 413 past [`MAX_FORM_BYTES`], 400 when malformed.
async fn form<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, StatusCode> {
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| StatusCode::PAYLOAD_TOO_LARGE)?;
    serde_urlencoded::from_bytes(&bytes).map_err(|_| StatusCode::BAD_REQUEST)
}

/// What to say about a form [`form`] refused with `status`.
fn form_problem(status: StatusCode, malformed: &'static str) -> &'static str {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        TOO_LARGE
    } else {
        malformed
    }
}

/// The words of a JSON refusal, as a sentence.
fn why(res: &Response, otherwise: &str) -> String {
    res.extensions()
        .get::<ErrorInfo>()
        .map_or_else(|| otherwise.to_owned(), |e| sentence(&e.message))
}

/// This request's `Host` if it names this machine's loopback (the only place the viewer's
/// sign-in may send the identity provider's answer back to).
fn loopback_host(h: &HeaderMap) -> Option<String> {
    let host = h.get(header::HOST)?.to_str().ok()?;
    // With no names allowed beyond the loopback ones.
    super::host_allowed(host, &[]).then(|| host.to_owned())
}

/// `POST /sign-in` (form: `token`, and `user` in asserted mode; in oidc mode either
/// nothing more — the identity provider's sign-in follows — or `action=resume` with
/// `user` and `pin`). The token is checked like any client's (a wrong one is audited as
/// an authentication failure).
pub(super) async fn sign_in(State(api): State<Arc<Api>>, req: Request<Body>) -> Response {
    if !same_origin(req.headers()) {
        return message_page(
            &api,
            None,
            StatusCode::FORBIDDEN,
            "Sign-in refused",
            "The sign-in form must be sent from this page.",
        );
    }
    let host = loopback_host(req.headers());
    let form = match form::<SignIn>(req.into_body()).await {
        Ok(f) => f,
        Err(status) => {
            let words = "Enter the client token and the other fields of the form.";
            return sign_in_page(&api, status, Some(form_problem(status, words)));
        }
    };
    let token = Zeroizing::new(form.token.trim().to_owned());
    let mut h = HeaderMap::new();
    let Ok(bearer) = HeaderValue::from_str(&format!("Bearer {}", token.as_str())) else {
        return sign_in_page(
            &api,
            StatusCode::UNAUTHORIZED,
            Some("That client token is not recognised."),
        );
    };
    h.insert(header::AUTHORIZATION, bearer);
    let rid = api.next_request_id();
    let client = match access::authenticate(&api, &h, rid, access::Format::Json).await {
        Ok(c) => c,
        Err(res) => {
            let why = why(&res, "Sign-in failed.");
            return sign_in_page(&api, res.status(), Some(&why));
        }
    };
    let oidc = api.device.identity().oidc().is_some();
    if !oidc || form.action == "resume" {
        let Ok(user) = StaffId::new(form.user.trim()) else {
            return sign_in_page(
                &api,
                StatusCode::BAD_REQUEST,
                Some("The staff id must be 1–32 letters, digits, '-', '.' or '_'."),
            );
        };
        if !oidc {
            return signed_in(
                &api,
                Signed {
                    token,
                    user,
                    staff_session: None,
                },
            );
        }
        return match super::session::resume_session(&api, &client, &user, form.pin).await {
            Ok(issued) => signed_in(
                &api,
                Signed {
                    token,
                    user: issued.staff,
                    staff_session: Some(issued.secret),
                },
            ),
            Err(res) => {
                let why = why(&res, "The session could not be resumed.");
                sign_in_page(&api, res.status(), Some(&why))
            }
        };
    }
    let Some(host) = host else {
        return sign_in_page(
            &api,
            StatusCode::BAD_REQUEST,
            Some("Open the viewer at its loopback address (http://127.0.0.1:…) to sign in."),
        );
    };
    let device = api.device.clone();
    let redirect = format!("http://{host}/viewer/oidc/callback");
    let name = client.as_str().to_owned();
    let started = tokio::task::spawn_blocking(move || {
        device
            .identity()
            .start_sign_in(device.store(), token, name, redirect)
    })
    .await;
    match started {
        Ok(Ok(start)) => see_other(
            &start.url,
            Some(&format!(
                "{SIGN_IN_COOKIE}={}; Path=/viewer/oidc/callback; HttpOnly; SameSite=Lax; Max-Age=600",
                start.browser.as_str()
            )),
        ),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "viewer sign-in could not start");
            sign_in_page(
                &api,
                StatusCode::SERVICE_UNAVAILABLE,
                Some(
                    "The identity provider cannot be reached. If you signed in on this device \
                     earlier in this shift, resume your session below with your staff id and PIN.",
                ),
            )
        }
        Err(_) => sign_in_page(
            &api,
            StatusCode::INTERNAL_SERVER_ERROR,
            Some("Sign-in failed."),
        ),
    }
}

#[derive(Deserialize)]
struct Callback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// `GET /viewer/oidc/callback?code=&state=`: the identity provider's answer; the code is
/// exchanged (with the PKCE verifier), the ID token verified (with the nonce), and the
/// member of staff asked for a PIN for offline use.
pub(super) async fn oidc_callback(
    State(api): State<Arc<Api>>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let browser = named_cookie(&h, SIGN_IN_COOKIE).map(str::to_owned);
    let cb: Callback = serde_urlencoded::from_str(q.as_deref().unwrap_or("")).unwrap_or(Callback {
        code: None,
        state: None,
        error: None,
    });
    if let Some(e) = cb.error {
        let e: String = e
            .chars()
            .take(64)
            .filter(|c| c.is_ascii_graphic())
            .collect();
        return sign_in_page(
            &api,
            StatusCode::UNAUTHORIZED,
            Some(&format!("The identity provider did not sign you in ({e}).")),
        );
    }
    let (Some(code), Some(state)) = (cb.code, cb.state) else {
        return sign_in_page(
            &api,
            StatusCode::BAD_REQUEST,
            Some("The identity provider's answer was incomplete; sign in again."),
        );
    };
    let device = api.device.clone();
    let done = tokio::task::spawn_blocking(move || {
        device.identity().finish_sign_in(
            device.store(),
            &state,
            &code,
            browser.as_deref(),
            device.now(),
        )
    })
    .await;
    match done {
        Ok(Ok(Ok(crate::identity::SignedIn { form, staff }))) => {
            pin_page(&api, StatusCode::OK, &form, &staff, None)
        }
        Ok(Ok(Err(crate::identity::SignInRefused { client, reason }))) => {
            let client = Text::new(client.unwrap_or_else(|| "viewer".into())).unwrap_or_default();
            let event = sync_protocol::audit::AuditEvent::Session(
                sync_protocol::audit::SessionEvent::Refused {
                    client,
                    session: None,
                    reason,
                },
            );
            let record = api.device.audit_record(event);
            if api.device.audit().write(record).await.is_err() {
                return message_page(
                    &api,
                    None,
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Sign-in refused",
                    "The audit log cannot be written; see /status.",
                );
            }
            sign_in_page(
                &api,
                StatusCode::UNAUTHORIZED,
                Some(&format!(
                    "Sign-in refused: {}.",
                    carecache_fhir::audit::refusal_text(reason)
                )),
            )
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "viewer sign-in could not finish");
            sign_in_page(
                &api,
                StatusCode::SERVICE_UNAVAILABLE,
                Some("The identity provider could not complete the sign-in; try again."),
            )
        }
        Err(_) => sign_in_page(
            &api,
            StatusCode::INTERNAL_SERVER_ERROR,
            Some("Sign-in failed."),
        ),
    }
}

fn pin_page(
    api: &Api,
    status: StatusCode,
    form: &str,
    staff: &StaffId,
    problem: Option<&str>,
) -> Response {
    let mut body = format!(
        "<h1>Choose a PIN</h1><p>Signed in as <strong>{}</strong>. Choose a PIN of 4 to 12 \
         digits: you will need it to carry on after a pause or when the device restarts, \
         also without signal.</p>",
        esc(staff.as_str())
    );
    if let Some(p) = problem {
        let _ = write!(body, "<p class=\"refusal\" role=\"alert\">{}</p>", esc(p));
    }
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/viewer/oidc/pin\">\
         <input type=\"hidden\" name=\"form\" value=\"{}\">\
         <label for=\"pin\">PIN</label>\
         <input id=\"pin\" name=\"pin\" type=\"password\" inputmode=\"numeric\" autocomplete=\"off\" required>\
         <label for=\"pin2\">PIN again</label>\
         <input id=\"pin2\" name=\"pin2\" type=\"password\" inputmode=\"numeric\" autocomplete=\"off\" required>\
         <button class=\"go\" type=\"submit\">Start my session</button></form>",
        esc(form)
    );
    html_response(status, frame(api, "Choose a PIN", None, "", &body))
}

#[derive(Deserialize)]
struct PinForm {
    form: String,
    pin: Zeroizing<String>,
    #[serde(default)]
    pin2: Zeroizing<String>,
}

/// `POST /viewer/oidc/pin`: opens the staff session of a verified viewer sign-in.
pub(super) async fn oidc_pin(State(api): State<Arc<Api>>, req: Request<Body>) -> Response {
    if !same_origin(req.headers()) {
        return message_page(
            &api,
            None,
            StatusCode::FORBIDDEN,
            "Sign-in refused",
            "The PIN form must be sent from this page.",
        );
    }
    let f = match form::<PinForm>(req.into_body()).await {
        Ok(f) => f,
        Err(status) => {
            let words = form_problem(status, "The PIN form was incomplete.");
            return sign_in_page(&api, status, Some(words));
        }
    };
    if !crate::identity::pin_ok(&f.pin) || f.pin != f.pin2 {
        let Some(staff) = api.device.identity().awaiting_staff(&f.form) else {
            return sign_in_page(
                &api,
                StatusCode::UNAUTHORIZED,
                Some("The sign-in has expired; sign in again."),
            );
        };
        return pin_page(
            &api,
            StatusCode::BAD_REQUEST,
            &f.form,
            &staff,
            Some(if f.pin == f.pin2 {
                "The PIN must be 4 to 12 digits."
            } else {
                "The two PINs differ."
            }),
        );
    }
    let Some(a) = api.device.identity().take_awaiting(&f.form) else {
        return sign_in_page(
            &api,
            StatusCode::UNAUTHORIZED,
            Some("The sign-in has expired; sign in again."),
        );
    };
    let client = Text::new(a.client.clone()).unwrap_or_default();
    match super::session::open(
        &api,
        client,
        super::session::Source::Verified(Box::new(a.verified)),
        f.pin,
        sync_protocol::audit::SignInRoute::Viewer,
    )
    .await
    {
        super::session::Opened::Ok(issued) => signed_in(
            &api,
            Signed {
                token: a.client_token,
                user: issued.staff,
                staff_session: Some(issued.secret),
            },
        ),
        super::session::Opened::Refused(r) => sign_in_page(
            &api,
            StatusCode::UNAUTHORIZED,
            Some(&format!(
                "Sign-in refused: {}.",
                carecache_fhir::audit::refusal_text(r)
            )),
        ),
        super::session::Opened::Failed(res) => {
            let why = why(&res, "Sign-in failed.");
            sign_in_page(&api, res.status(), Some(&why))
        }
    }
}

fn confirm_page(api: &Api, status: StatusCode, user: &StaffId, problem: Option<&str>) -> Response {
    let mut body = format!(
        "<h1>Confirm it is you</h1><p>Your session as <strong>{}</strong> is locked after a \
         pause. Enter your PIN to carry on.</p>",
        esc(user.as_str())
    );
    if let Some(p) = problem {
        let _ = write!(body, "<p class=\"refusal\" role=\"alert\">{}</p>", esc(p));
    }
    body.push_str(
        "<form method=\"post\" action=\"/viewer/confirm\">\
         <label for=\"pin\">PIN</label>\
         <input id=\"pin\" name=\"pin\" type=\"password\" inputmode=\"numeric\" autocomplete=\"off\" required>\
         <button class=\"go\" type=\"submit\">Confirm</button></form>",
    );
    html_response(
        status,
        frame(api, "Confirm it is you", Some(user), "", &body),
    )
}

#[derive(Deserialize)]
struct ConfirmForm {
    pin: Zeroizing<String>,
}

/// `POST /viewer/confirm`: unlocks this browser's staff session with the PIN.
pub(super) async fn confirm(State(api): State<Arc<Api>>, req: Request<Body>) -> Response {
    if !same_origin(req.headers()) {
        return message_page(
            &api,
            None,
            StatusCode::FORBIDDEN,
            "Refused",
            "The PIN form must be sent from this page.",
        );
    }
    let Some(signed) = api.sessions.find(req.headers()) else {
        return sign_in_page(&api, StatusCode::UNAUTHORIZED, Some("Please sign in."));
    };
    let Some(secret) = signed.staff_session.clone() else {
        return see_other("/", None);
    };
    let Some(h) = client_headers(&signed, None) else {
        return sign_in_page(&api, StatusCode::UNAUTHORIZED, Some("Please sign in."));
    };
    let f = match form::<ConfirmForm>(req.into_body()).await {
        Ok(f) => f,
        Err(StatusCode::PAYLOAD_TOO_LARGE) => {
            return confirm_page(&api, StatusCode::PAYLOAD_TOO_LARGE, &signed.user, None);
        }
        Err(status) => {
            return confirm_page(&api, status, &signed.user, Some("Enter your PIN."));
        }
    };
    let rid = api.next_request_id();
    let client = match access::authenticate(&api, &h, rid, access::Format::Json).await {
        Ok(c) => c,
        Err(res) => {
            let why = why(&res, "Sign-in failed.");
            return sign_in_page(&api, res.status(), Some(&why));
        }
    };
    let res = super::session::confirm_secret(&api, &client, &secret, f.pin).await;
    if res.status().is_success() {
        return see_other("/", None);
    }
    let code = res
        .extensions()
        .get::<ErrorInfo>()
        .map(|e| e.code.clone())
        .unwrap_or_default();
    let words = why(&res, "The PIN was not accepted.");
    if matches!(code.as_str(), "wrong-pin" | "pin-wait") {
        return confirm_page(&api, res.status(), &signed.user, Some(&words));
    }
    sign_in_page(&api, res.status(), Some(&words))
}

/// `POST /sign-out`.
pub(super) async fn sign_out(State(api): State<Arc<Api>>, h: HeaderMap) -> Response {
    if same_origin(&h) {
        // In oidc mode signing out of the viewer ends the staff session too (audited).
        if let Some(signed) = api.sessions.find(&h)
            && let Some(secret) = &signed.staff_session
            && let Some(ch) = client_headers(&signed, None)
        {
            let rid = api.next_request_id();
            if let Ok(client) = access::authenticate(&api, &ch, rid, access::Format::Json).await {
                let _ = super::session::end_session(&api, &client, secret).await;
            }
        }
        api.sessions.end(&h);
    }
    see_other(
        "/",
        Some(&format!(
            "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"
        )),
    )
}

/// A form post from another site is refused. Browsers say where a request comes from in
/// `Sec-Fetch-Site` (same-origin, or none for a typed address); older ones send an
/// `Origin` that must name this host. A request with neither is not from a browser form.
fn same_origin(h: &HeaderMap) -> bool {
    if let Some(site) = h.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        return site == "same-origin" || site == "none";
    }
    let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // The origin must be this very address; the middleware has already refused any
    // `Host` that is not a name of this device (DNS rebinding), so an origin naming
    // another site, another local port, or `null` is refused here.
    !host.is_empty()
        && origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|o| o == host)
}

fn see_other(to: &str, cookie: Option<&str>) -> Response {
    let mut res = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(c).ok()) {
        res.headers_mut().insert(header::SET_COOKIE, c);
    }
    res
}

// ---- pages ------------------------------------------------------------------------

/// The HTML answer, keeping the pipeline's request id.
fn page_response(status: StatusCode, html: String, from: &Response) -> Response {
    let mut res = html_response(status, html);
    if let Some(v) = from.headers().get(headers::REQUEST_ID) {
        res.headers_mut().insert(headers::REQUEST_ID, v.clone());
    }
    res
}

fn html_response(status: StatusCode, html: String) -> Response {
    let mut res = (status, html).into_response();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

/// Escapes text for HTML element content and quoted attributes.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// "1948-03-02" → "02-Mar-1948" (the NHS display format); anything else as it is.
pub fn nhs_date(iso: &str) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut parts = iso.get(..10).unwrap_or(iso).split('-');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(y), Some(m), Some(d)) if y.len() == 4 && d.len() == 2 => m
            .parse::<usize>()
            .ok()
            .and_then(|m| MONTHS.get(m.checked_sub(1)?))
            .map_or_else(|| iso.to_owned(), |mon| format!("{d}-{mon}-{y}")),
        _ => iso.to_owned(),
    }
}

/// An RFC 3339 instant as "02-Mar-2026 14:05 UTC".
fn when(rfc3339: &str) -> String {
    match (rfc3339.get(..10), rfc3339.get(11..16)) {
        (Some(d), Some(t)) => format!("{} {t} UTC", nhs_date(d)),
        _ => rfc3339.to_owned(),
    }
}

/// "end_of_life" → "End of life".
fn label(s: &str) -> String {
    let words = s.replace('_', " ");
    let mut c = words.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

fn sentence(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => format!("{}{}.", f.to_uppercase(), c.as_str().trim_end_matches('.')),
        None => String::new(),
    }
}

const STYLE: &str = r"
*{box-sizing:border-box}
body{margin:0;font:20px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif;background:#fff;color:#000}
header.bar{background:#002a5c;color:#fff;padding:.5rem 1rem;display:flex;flex-wrap:wrap;gap:.5rem 1.5rem;align-items:center}
header.bar a,header.bar button{color:#fff}
header.bar .brand{font-weight:700;font-size:1.1rem;text-decoration:none}
header.bar form{margin:0 0 0 auto}
header.bar button{background:none;border:2px solid #fff;border-radius:6px;font:inherit;padding:.2rem .8rem;cursor:pointer}
.fresh{padding:.5rem 1rem;font-weight:600;border-bottom:3px solid #000}
.fresh.ok{background:#e8f4ea}
.fresh.stale{background:#ffd200}
main{padding:1rem;max-width:60rem}
h1{font-size:1.6rem;margin:.5rem 0}
h2{font-size:1.35rem;margin:1.5rem 0 .5rem;border-bottom:3px solid #000;padding-bottom:.2rem}
.banner{border:3px solid #000;border-radius:8px;padding:.7rem 1rem;background:#f3f3f3}
.banner .name{font-size:1.7rem;font-weight:800}
.banner dl{display:flex;flex-wrap:wrap;gap:.2rem 2rem;margin:.3rem 0 0}
.banner dt{font-weight:400}.banner dd{margin:0;font-weight:800;font-size:1.25rem}
section.alerts{border:4px solid #b00020;border-radius:8px;padding:.5rem 1rem 1rem;margin-top:1rem}
section.alerts h2{color:#b00020;border-color:#b00020;margin-top:.3rem}
.alert{border-left:10px solid #000;padding:.4rem .8rem;margin:.6rem 0;background:#fff}
.alert.high_risk{border-color:#b00020;background:#fde8ea}
.alert.warning{border-color:#8a5300;background:#fff4d6}
.alert .sev{font-weight:800;text-transform:uppercase;letter-spacing:.03em}
.alert .what{font-size:1.25rem;font-weight:700}
ul.items{list-style:none;padding:0;margin:0}
ul.items li{border-bottom:1px solid #777;padding:.5rem 0}
.item{font-weight:700}
.meta{color:#333;font-size:.9rem}
.state{font-style:italic;padding:.4rem .6rem;border:2px dashed #000;display:inline-block}
.withheld,.emergency{border:3px solid #000;padding:.6rem 1rem;margin:1rem 0;font-weight:700;background:#ffd200}
.refusal{border:4px solid #000;border-radius:8px;padding:1rem;background:#f3f3f3}
.refusal h1{margin-top:0}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.55rem .4rem;border-bottom:1px solid #777;vertical-align:top}
td a{font-weight:700;color:#002a5c}
.badge{display:inline-block;background:#b00020;color:#fff;font-weight:800;border-radius:4px;padding:0 .4rem}
label{display:block;font-weight:700;margin:.8rem 0 .2rem}
input{font:inherit;padding:.5rem;border:2px solid #000;border-radius:6px;width:100%;max-width:32rem}
button.go{font:inherit;font-weight:700;margin-top:1rem;padding:.6rem 1.4rem;border:0;border-radius:6px;background:#002a5c;color:#fff;cursor:pointer}
button.danger{background:#b00020}
form.find{display:flex;gap:.5rem;align-items:flex-end;flex-wrap:wrap}
form.find input{max-width:16rem}
nav.pages{margin:1rem 0;display:flex;gap:1.5rem}
a{color:#002a5c}
:focus{outline:4px solid #ffbf47;outline-offset:2px}
";

/// The page frame: top bar (device, user, sign out), the freshness strip, then `body`.
fn frame(api: &Api, title: &str, user: Option<&StaffId>, extra_strip: &str, body: &str) -> String {
    let f = api.freshness();
    let label = api.device.config().device_label.clone();
    let mut out = String::with_capacity(body.len() + 4096);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en-GB\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{} — carecache</title><style>{STYLE}</style></head><body>\
         <header class=\"bar\"><a class=\"brand\" href=\"/\">carecache</a><span>{}</span>",
        esc(title),
        esc(&label),
    );
    if let Some(u) = user {
        let _ = write!(
            out,
            "<span>Signed in as <strong>{}</strong></span>\
             <form method=\"post\" action=\"/sign-out\"><button type=\"submit\">Sign out</button></form>",
            esc(u.as_str())
        );
    }
    out.push_str("</header>");
    let (class, words) = match f.last_sync {
        Some(t) if f.stale => (
            "stale",
            format!(
                "⚠ Data last updated {} — older than {} minutes; it may be out of date",
                when(&t.utc_seconds()),
                f.stale_after_secs / 60
            ),
        ),
        Some(t) => (
            "ok",
            format!("Data last updated {}", when(&t.utc_seconds())),
        ),
        None => (
            "stale",
            "⚠ This device has never synchronised: no data yet".to_owned(),
        ),
    };
    let _ = write!(
        out,
        "<div class=\"fresh {class}\" role=\"status\" id=\"freshness\">{}{extra_strip}</div><main>{body}</main></body></html>",
        esc(&words)
    );
    out
}

fn sign_in_page(api: &Api, status: StatusCode, problem: Option<&str>) -> Response {
    let mut body = String::from("<h1>Sign in</h1>");
    if let Some(p) = problem {
        let _ = write!(body, "<p class=\"refusal\" role=\"alert\">{}</p>", esc(p));
    }
    if api.device.identity().oidc().is_some() {
        body.push_str(
            "<p>Sign in with your identity provider (your smartcard or authenticator) and \
             the client token your IT team issued for this device. Every record you open is \
             audited under the identity the provider proves.</p>\
             <form method=\"post\" action=\"/sign-in\">\
             <label for=\"token\">Client token</label>\
             <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" required>\
             <button class=\"go\" type=\"submit\">Sign in with the identity provider</button></form>\
             <h2>Resume your shift session</h2>\
             <p>Signed in on this device earlier in your shift? Carry on with your staff id \
             and the PIN you chose, also without signal.</p>\
             <form method=\"post\" action=\"/sign-in\">\
             <input type=\"hidden\" name=\"action\" value=\"resume\">\
             <label for=\"rtoken\">Client token</label>\
             <input id=\"rtoken\" name=\"token\" type=\"password\" autocomplete=\"off\" required>\
             <label for=\"ruser\">Staff id</label>\
             <input id=\"ruser\" name=\"user\" autocomplete=\"username\" required maxlength=\"32\">\
             <label for=\"rpin\">PIN</label>\
             <input id=\"rpin\" name=\"pin\" type=\"password\" inputmode=\"numeric\" autocomplete=\"off\" required>\
             <button class=\"go\" type=\"submit\">Resume</button></form>",
        );
        let mut res = html_response(status, frame(api, "Sign in", None, "", &body));
        // The sign-in form is answered with a redirect to the identity provider, which
        // the form-action directive must allow (and nothing else).
        if let Some(origin) = api.device.identity().provider_origin()
            && let Ok(v) = HeaderValue::from_str(&format!(
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'self' {origin}; frame-ancestors 'none'; base-uri 'none'"
            ))
        {
            res.headers_mut().insert(header::CONTENT_SECURITY_POLICY, v);
        }
        return res;
    }
    body.push_str(
        "<p>Sign in once for this browser session with the client token your IT team \
         issued for this device and your own staff id. Every record you open is audited \
         under your staff id.</p>\
         <form method=\"post\" action=\"/sign-in\">\
         <label for=\"token\">Client token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" required>\
         <label for=\"user\">Staff id</label>\
         <input id=\"user\" name=\"user\" autocomplete=\"username\" required maxlength=\"32\">\
         <button class=\"go\" type=\"submit\">Sign in</button></form>",
    );
    html_response(status, frame(api, "Sign in", None, "", &body))
}

fn message_page(
    api: &Api,
    user: Option<&StaffId>,
    status: StatusCode,
    title: &str,
    words: &str,
) -> Response {
    let body = format!(
        "<div class=\"refusal\" role=\"alert\"><h1>{}</h1><p>{}</p><p><a href=\"/\">Back to the caseload</a></p></div>",
        esc(title),
        esc(words)
    );
    html_response(status, frame(api, title, user, "", &body))
}

fn find_form() -> &'static str {
    "<form class=\"find\" method=\"get\" action=\"/find\">\
     <div><label for=\"nhs\">Find by NHS number</label>\
     <input id=\"nhs\" name=\"nhs\" inputmode=\"numeric\" autocomplete=\"off\" placeholder=\"999 123 4567\"></div>\
     <button class=\"go\" type=\"submit\">Open</button></form>\
     <form class=\"find\" method=\"get\" action=\"/search\">\
     <div><label for=\"family\">Family name</label><input id=\"family\" name=\"family\" autocomplete=\"off\"></div>\
     <div><label for=\"given\">Given name</label><input id=\"given\" name=\"given\" autocomplete=\"off\"></div>\
     <div><label for=\"birthdate\">Date of birth</label><input id=\"birthdate\" name=\"birthdate\" autocomplete=\"off\" placeholder=\"DD/MM/YYYY\"></div>\
     <div><label for=\"postcode\">Postcode</label><input id=\"postcode\" name=\"postcode\" autocomplete=\"off\" placeholder=\"WV10 9QR\"></div>\
     <button class=\"go\" type=\"submit\">Search</button></form>"
}

/// `GET /search?family=&given=&birthdate=&postcode=`: the matches the caller may see,
/// best first, with why each matched and a reminder to check before relying on one.
pub(super) async fn search(
    State(api): State<Arc<Api>>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Response {
    let Some(signed) = api.sessions.find(&h) else {
        return sign_in_page(
            &api,
            StatusCode::UNAUTHORIZED,
            Some("Please sign in to search for patients."),
        );
    };
    let user = signed.user.clone();
    let Some(headers) = client_headers(&signed, None) else {
        return sign_in_page(&api, StatusCode::OK, None);
    };
    // Only the search terms pass through (empty fields dropped).
    let terms: Vec<(String, String)> =
        serde_urlencoded::from_str::<Vec<(String, String)>>(q.as_deref().unwrap_or(""))
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, v)| {
                matches!(k.as_str(), "family" | "given" | "birthdate" | "postcode")
                    && !v.trim().is_empty()
            })
            .collect();
    if terms.is_empty() {
        return see_other("/", None);
    }
    let query = serde_urlencoded::to_string(&terms).unwrap_or_default();
    let res = access::list(&api, &headers, Some(&query)).await;
    let status = res.status();
    if let Some(Rendered(body)) = res.extensions().get::<Rendered>() {
        let html = search_page(&api, &user, body);
        return page_response(status, html, &res);
    }
    if status == StatusCode::BAD_REQUEST {
        // The terms cannot be searched (too few, a date that is not one): say why, with
        // the form to try again.
        let why = res
            .extensions()
            .get::<ErrorInfo>()
            .map(|e| e.message.clone())
            .unwrap_or_else(|| "These search terms cannot be used.".to_owned());
        let body = format!(
            "{}<p class=\"state\" role=\"alert\">{}</p>",
            find_form(),
            esc(&why)
        );
        return html_response(status, frame(&api, "Search", Some(&user), "", &body));
    }
    refusal_page(&api, &user, None, &res)
}

/// The `patients` of a caseload or search answer.
fn patient_rows(body: &Value) -> &[Value] {
    body.get("patients")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
}

fn search_page(api: &Api, user: &StaffId, body: &Value) -> String {
    let rows = patient_rows(body);
    let mut out = String::new();
    out.push_str(find_form());
    let _ = write!(
        out,
        "<h1>Search <span class=\"meta\">({} found)</span></h1><p class=\"banner\" role=\"note\">{}</p>",
        rows.len(),
        esc(text(body, "notice"))
    );
    if rows.is_empty() {
        out.push_str(
            "<p class=\"state\">No patient you may see matches. Check the spelling, try \
             the date of birth the other way round, or search by NHS number.</p>",
        );
        return frame(api, "Search", Some(user), "", &out);
    }
    out.push_str(
        "<table><thead><tr><th>Name</th><th>Born</th><th>NHS number</th><th>Match</th><th>Why</th></tr></thead><tbody>",
    );
    for r in rows {
        let nhs = text(r, "nhs_number");
        let digits: String = nhs.chars().filter(char::is_ascii_digit).collect();
        let score = r.get("score").and_then(Value::as_f64).unwrap_or(0.0);
        let why: Vec<&str> = r
            .get("match")
            .and_then(Value::as_array)
            .map(|m| m.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let _ = write!(
            out,
            "<tr><td><a href=\"/patient/{digits}\">{}</a></td><td>{}</td><td>{}</td><td>{:.0}%</td><td>{}</td></tr>",
            esc(text(r, "name")),
            esc(&nhs_date(text(r, "birth_date"))),
            esc(nhs),
            score * 100.0,
            esc(&why.join("; ")),
        );
    }
    out.push_str("</tbody></table>");
    frame(api, "Search", Some(user), "", &out)
}

fn caseload_page(api: &Api, user: &StaffId, body: &Value, page: usize) -> String {
    let total = body.get("total").and_then(Value::as_u64).unwrap_or(0);
    let rows = patient_rows(body);
    let mut out = String::new();
    out.push_str(find_form());
    let _ = write!(
        out,
        "<h1>Your caseload <span class=\"meta\">({total} patients)</span></h1>"
    );
    if let Ok(c) = api.device().caseload()
        && !c.complete
    {
        let _ = write!(
            out,
            "<p class=\"state arriving\" role=\"status\">Still arriving: {}.{} Patients not yet here cannot be shown.</p>",
            esc(&c.words()),
            if c.syncing {
                ""
            } else {
                " (sync paused: it resumes with signal)"
            }
        );
    }
    if rows.is_empty() {
        out.push_str(
            "<p class=\"state\">No patients on your caseload on this device now. A lease \
             may not have started, may have ended, or may not have reached this device \
             yet (it needs a sync).</p>",
        );
    } else {
        out.push_str(
            "<table><thead><tr><th>Name</th><th>Born</th><th>NHS number</th><th>Alerts</th><th>Access until</th></tr></thead><tbody>",
        );
        for r in rows {
            let nhs = text(r, "nhs_number");
            let digits: String = nhs.chars().filter(char::is_ascii_digit).collect();
            let alerts = r.get("alert_count").and_then(Value::as_u64).unwrap_or(0);
            let high = r
                .get("high_risk_alert_count")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            let alert_cell = match (alerts, high) {
                (0, _) => "none".to_owned(),
                (n, 0) => n.to_string(),
                (n, h) => format!("{n} <span class=\"badge\">{h} high risk</span>"),
            };
            let _ = write!(
                out,
                "<tr><td><a href=\"/patient/{digits}\">{}</a></td><td>{}</td><td>{}</td><td>{alert_cell}</td><td>{}</td></tr>",
                esc(text(r, "name")),
                esc(&nhs_date(text(r, "birth_date"))),
                esc(nhs),
                esc(&when(text(r, "access_until"))),
            );
        }
        out.push_str("</tbody></table>");
    }
    let shown_to = page.saturating_mul(PAGE_ROWS).saturating_add(rows.len());
    out.push_str("<nav class=\"pages\">");
    if page > 0 {
        let _ = write!(out, "<a href=\"/?page={}\">← Previous</a>", page - 1);
    }
    if (shown_to as u64) < total {
        let _ = write!(out, "<a href=\"/?page={}\">Next →</a>", page + 1);
    }
    out.push_str("</nav>");
    frame(api, "Caseload", Some(user), "", &out)
}

/// The section's state in words ("not available", "none recorded", "withheld at the
/// patient's request"), and how many of its items could not be displayed — beside the
/// items that could, never instead of them.
fn state_note(section: &Value) -> Option<String> {
    let mut out = String::new();
    if text(section, "state") != "entries" {
        let _ = write!(
            out,
            "<p class=\"state\">{}</p>",
            esc(text(section, "message"))
        );
    }
    if let Some(n) = section.get("could_not_show") {
        let _ = write!(
            out,
            "<p class=\"state could-not-show\" role=\"alert\">{}</p>",
            esc(text(n, "message"))
        );
    }
    (!out.is_empty()).then_some(out)
}

fn items(section: &Value) -> &[Value] {
    section
        .get("items")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
}

/// Where an item came from, as the source said: organisation, recorder, update time —
/// whichever it gave.
fn source_line(item: &Value) -> String {
    let s = item.get("source").unwrap_or(&Value::Null);
    let mut parts = Vec::new();
    for key in ["organisation", "recorded_by"] {
        if let Some(v) = s.get(key).and_then(Value::as_str) {
            parts.push(esc(v));
        }
    }
    if parts.is_empty() {
        parts.push("not stated".to_owned());
    }
    let updated = s.get("last_updated").and_then(Value::as_str).map_or_else(
        || "update time not stated".to_owned(),
        |t| format!("updated {}", esc(&nhs_date(t))),
    );
    // Where the code came from, when it is not SNOMED CT: a local code or text alone
    // is shown as the source wrote it, and says so.
    let coded = item
        .get("coding")
        .and_then(|c| c.get("system_name"))
        .and_then(Value::as_str)
        .filter(|n| *n != "SNOMED CT")
        .map(|n| format!(" · {}", esc(&code_words(n))))
        .unwrap_or_default();
    format!(
        "<div class=\"meta\">Source: {}, {updated}{coded}</div>",
        parts.join(", ")
    )
}

/// A coding system's name as the viewer says it.
fn code_words(system_name: &str) -> String {
    match system_name {
        "text only" => "recorded as text only".to_owned(),
        "local" => "local code of the source system".to_owned(),
        other => format!("coded with {other}"),
    }
}

fn patient_page(api: &Api, user: &StaffId, p: &Value) -> String {
    let mut out = String::with_capacity(8192);
    let access = p.get("access").unwrap_or(&Value::Null);
    let until = when(text(access, "until"));
    let emergency = access
        .get("emergency")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if emergency {
        let _ = write!(
            out,
            "<div class=\"emergency\" role=\"alert\">Emergency access: this patient is not on your \
             caseload. This access is recorded with your reason and reviewed.</div>"
        );
    }
    let _ = write!(
        out,
        "<div class=\"banner\" id=\"banner\"><div class=\"name\">{}</div><dl>\
         <div><dt>Born</dt><dd>{}</dd></div><div><dt>NHS number</dt><dd>{}</dd></div>\
         <div><dt>Gender</dt><dd>{}</dd></div></dl></div>",
        esc(text(p, "name")),
        esc(&nhs_date(text(p, "birth_date"))),
        esc(text(p, "nhs_number")),
        esc(&label(text(p, "sex"))),
    );

    // Alerts first and prominent.
    let alerts = p.get("alerts").unwrap_or(&Value::Null);
    out.push_str("<section class=\"alerts\" id=\"alerts\"><h2>Alerts</h2>");
    if let Some(n) = state_note(alerts) {
        out.push_str(&n);
    }
    for a in items(alerts) {
        let sev = text(a, "severity");
        let _ = write!(
            out,
            "<div class=\"alert {}\"><div class=\"sev\">{}</div><div class=\"what\">{}</div><div class=\"meta\">{}{}</div>{}</div>",
            esc(sev),
            esc(&sev.replace('_', " ")),
            esc(text(a, "text")),
            esc(&label(text(a, "category"))),
            a.get("start")
                .and_then(Value::as_str)
                .map(|s| format!(" · since {}", esc(&nhs_date(s))))
                .unwrap_or_default(),
            source_line(a),
        );
    }
    out.push_str("</section>");

    let allergies = p.get("allergies").unwrap_or(&Value::Null);
    out.push_str("<section id=\"allergies\"><h2>Allergies and adverse reactions</h2>");
    if let Some(n) = state_note(allergies) {
        out.push_str(&n);
    }
    out.push_str("<ul class=\"items\">");
    for a in items(allergies) {
        let reactions: Vec<String> = a
            .get("reactions")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .map(|r| {
                let m = r
                    .get("manifestation")
                    .and_then(Value::as_str)
                    .or_else(|| r.get("description").and_then(Value::as_str))
                    .unwrap_or("reaction");
                match r.get("severity").and_then(Value::as_str) {
                    Some(s) => format!("{m} ({s})"),
                    None => m.to_owned(),
                }
            })
            .collect();
        let crit = match a.get("criticality").and_then(Value::as_str) {
            Some("high") => " <span class=\"badge\">high criticality</span>",
            _ => "",
        };
        // Verification as the source stated it: a confirmed allergy is never shown as
        // unconfirmed, and one not confirmed says so.
        let verification = match a.get("verification").and_then(Value::as_str) {
            Some("confirmed") => " · confirmed",
            Some("unconfirmed") => " · <strong>unconfirmed</strong>",
            Some("provisional") => " · <strong>provisional</strong>",
            Some("differential") => " · <strong>differential</strong>",
            _ => " · verification not stated",
        };
        let _ = write!(
            out,
            "<li><div class=\"item\">{}{crit}</div><div class=\"meta\">{}{verification}</div>{}{}{}</li>",
            esc(text(a, "substance")),
            esc(text(a, "status")),
            if reactions.is_empty() {
                String::new()
            } else {
                format!("<div>Reaction: {}</div>", esc(&reactions.join("; ")))
            },
            a.get("note")
                .and_then(Value::as_str)
                .map(|n| format!("<div>{}</div>", esc(n)))
                .unwrap_or_default(),
            source_line(a),
        );
    }
    out.push_str("</ul></section>");

    let meds = p.get("medications").unwrap_or(&Value::Null);
    out.push_str("<section id=\"medications\"><h2>Medications</h2>");
    if let Some(n) = state_note(meds) {
        out.push_str(&n);
    }
    out.push_str("<ul class=\"items\">");
    for m in items(meds) {
        let mut details = Vec::new();
        if let Some(c) = m.get("course").and_then(Value::as_str) {
            details.push(c.replace('-', " "));
        }
        if let Some(d) = m.get("last_issued").and_then(Value::as_str) {
            details.push(format!("last issued {}", nhs_date(d)));
        }
        if m.get("prescribed_elsewhere").and_then(Value::as_bool) == Some(true) {
            details.push("prescribed elsewhere".to_owned());
        }
        let _ = write!(
            out,
            "<li><div class=\"item\">{}</div>{}<div class=\"meta\">{}</div>{}</li>",
            esc(text(m, "medicine")),
            m.get("dose")
                .and_then(Value::as_str)
                .map(|d| format!("<div>{}</div>", esc(d)))
                .unwrap_or_default(),
            esc(&details.join(" · ")),
            source_line(m),
        );
    }
    out.push_str("</ul></section>");

    let contacts = p.get("contacts").unwrap_or(&Value::Null);
    out.push_str("<section id=\"contacts\"><h2>Key contacts</h2>");
    if let Some(n) = state_note(contacts) {
        out.push_str(&n);
    }
    out.push_str("<ul class=\"items\">");
    for c in items(contacts) {
        let _ = write!(
            out,
            "<li><div class=\"item\">{}</div><div>{}{}</div></li>",
            esc(text(c, "name")),
            esc(&text(c, "role").replace('_', " ")),
            [c.get("relationship"), c.get("phone")]
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(|t| format!(" · {}", esc(t)))
                .collect::<String>(),
        );
    }
    out.push_str("</ul></section>");

    if let Some(w) = p.get("withheld").filter(|w| !w.is_null()) {
        let _ = write!(
            out,
            "<div class=\"withheld\">{}</div>",
            esc(text(w, "warning"))
        );
    }
    let _ = write!(
        out,
        "<p class=\"meta\">Request {} · view: {}</p><p><a href=\"/\">← Back to the caseload</a></p>",
        esc(text(p, "request_id")),
        esc(&text(access, "view").replace('_', " ")),
    );
    let strip = format!(" · Your access to this record ends {}", esc(&until));
    frame(api, text(p, "name"), Some(user), &strip, &out)
}

/// Explains a refusal from the pipeline in words a crew member can act on.
fn refusal_page(api: &Api, user: &StaffId, nhs: Option<&str>, res: &Response) -> Response {
    let Some(info) = res.extensions().get::<ErrorInfo>() else {
        return message_page(
            api,
            Some(user),
            res.status(),
            "Something went wrong",
            "The page could not be shown.",
        );
    };
    if info.code == "session-locked" {
        return confirm_page(api, StatusCode::UNAUTHORIZED, user, None);
    }
    if res.status() == StatusCode::UNAUTHORIZED {
        return sign_in_page(
            api,
            StatusCode::UNAUTHORIZED,
            Some(&format!(
                "{} Please sign in again.",
                sentence(&info.message)
            )),
        );
    }
    let (title, explain, emergency_form) = match info.code.as_str() {
        "not-on-caseload" => (
            "Not on your caseload",
            "This patient is not on a caseload leased to you on this device. If you are \
             treating them now and need their record, you can use emergency access: give \
             your reason; it is recorded with your staff id and reviewed. A patient on no \
             caseload here is asked of the shared care record (this needs signal).",
            true,
        ),
        "objected" => (
            "Record not available",
            "This patient's record cannot be shown on this device. Treat the patient as \
             you would with no record available, and ask them or their carers directly.",
            false,
        ),
        "access-expired" => (
            "Your access has ended",
            "The time-boxed access to this record has ended, or this device has been out \
             of contact with the hub for too long. Connect the device so it can sync; if \
             you still need access, ask your coordinator to renew the caseload.",
            false,
        ),
        "not-yet-valid" => (
            "Access not started yet",
            "The caseload that includes this patient has not started yet.",
            false,
        ),
        "emergency-not-permitted" => (
            "Emergency access not permitted",
            "This device does not allow emergency access to this patient.",
            false,
        ),
        "reason-required" => (
            "A reason is needed",
            "Emergency access needs a reason (what you are doing for the patient).",
            true,
        ),
        "not-held" => (
            "No record on this device",
            "This patient is on your caseload but their record has not reached this \
             device yet. Connect the device so it can sync.",
            false,
        ),
        "not-yet-arrived" => (
            "Record still arriving",
            "This patient is on your caseload and the caseload is still arriving on this \
             device (patients with alerts come first). Try again in a moment; keep the \
             device connected.",
            false,
        ),
        "audit-unavailable" => (
            "Records cannot be shown",
            "The device cannot write its audit log, so no record is shown. Tell your IT \
             team; the device status page says why.",
            false,
        ),
        "bad-request" => ("Check the NHS number", "", false),
        _ => ("Cannot show this record", "", false),
    };
    let mut body = format!(
        "<div class=\"refusal\" role=\"alert\" id=\"refusal\" data-code=\"{}\"><h1>{}</h1>",
        esc(&info.code),
        esc(title),
    );
    if !info.message.eq_ignore_ascii_case(title) {
        let _ = write!(
            body,
            "<p><strong>{}</strong></p>",
            esc(&sentence(&info.message))
        );
    }
    if !explain.is_empty() {
        let _ = write!(body, "<p>{}</p>", esc(explain));
    }
    if emergency_form && let Some(n) = nhs {
        let digits: String = n.chars().filter(char::is_ascii_digit).collect();
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/patient/{digits}\">\
             <label for=\"reason\">Reason for emergency access</label>\
             <input id=\"reason\" name=\"reason\" required maxlength=\"500\" autocomplete=\"off\">\
             <button class=\"go danger\" type=\"submit\">Open with emergency access</button></form>"
        );
    }
    body.push_str("<p><a href=\"/\">← Back to the caseload</a></p></div>");
    body.push_str(find_form());
    let mut out = html_response(res.status(), frame(api, title, Some(user), "", &body));
    if let Some(v) = res.headers().get(headers::REQUEST_ID) {
        out.headers_mut().insert(headers::REQUEST_ID, v.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert("O'Brien & co")</script>"#),
            "&lt;script&gt;alert(&quot;O&#39;Brien &amp; co&quot;)&lt;/script&gt;"
        );
    }

    #[test]
    fn dates_in_nhs_display_format() {
        assert_eq!(nhs_date("1948-03-02"), "02-Mar-1948");
        assert_eq!(nhs_date("2026-12-31T23:59:00Z"), "31-Dec-2026");
        assert_eq!(nhs_date("1948-13-02"), "1948-13-02");
        assert_eq!(nhs_date("garbage"), "garbage");
        assert_eq!(when("2026-11-24T08:05:09Z"), "24-Nov-2026 08:05 UTC");
    }

    #[test]
    fn cookie_is_found_among_others_and_must_be_well_formed() {
        let mut h = HeaderMap::new();
        let good = "ab".repeat(32);
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=1; {COOKIE}={good}; b=2"))
                .unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(cookie(&h), Some(good.as_str()));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("carecache_session=../../etc"),
        );
        assert_eq!(cookie(&h), None);
    }

    #[test]
    fn sessions_expire_when_idle() {
        let sessions = Sessions::default();
        let user = StaffId::new("nurse.1").unwrap_or_else(|_| unreachable!());
        let c = sessions
            .start(Signed {
                token: Zeroizing::new("cct_x".into()),
                user,
                staff_session: None,
            })
            .unwrap_or_else(|| unreachable!());
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("{COOKIE}={c}")).unwrap_or_else(|_| unreachable!()),
        );
        assert!(sessions.find(&h).is_some());
        for s in sessions.lock().values_mut() {
            s.last_used = Instant::now()
                .checked_sub(IDLE)
                .unwrap_or_else(|| unreachable!());
        }
        assert!(sessions.find(&h).is_none(), "idle session must end");
        assert!(sessions.lock().is_empty(), "and be forgotten");
    }
}
