//! The local HTTP endpoint for crew software (DESIGN.md "Local API"): FHIR R4 under
//! `/fhir`, plain JSON under `/v1`, `/status` and `/metrics`.
//!
//! Every patient route runs the same pipeline ([`access`]): client token → acting user
//! and purpose → NHS number → policy → read under the grant → render → **audit entry
//! committed durably** → answer. Denials are audited the same way and answered only
//! after their entry is on disk; if the audit log cannot be written the answer is 503
//! and nothing is shown. Every answer carries the freshness headers and `Cache-Control:
//! no-store`.
//!
//! The server takes its listeners and shutdown from the caller (tests bind port 0),
//! caps connections (more wait in the accept queue), bounds the request head, and
//! times requests out.

mod access;
mod auth_limit;
mod head_limit;
pub mod render;
mod session;
pub mod viewer;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::device::Device;
use crate::device::views::{LookupDoor, ReadView};
use render::Freshness;

/// Header: the client token (`Authorization: Bearer cct_…`) is standard; these are ours.
pub mod headers {
    /// The acting user's staff id (required on patient routes in asserted mode; ignored
    /// in oidc mode).
    pub const USER: &str = "x-carecache-user";
    /// The staff session (`ccs_…`, from `POST /v1/session`): required on patient routes
    /// in oidc mode, where it alone names the member of staff and role.
    pub const SESSION: &str = "x-carecache-session";
    /// The acting user's role, free text (optional, audited).
    pub const ROLE: &str = "x-carecache-role";
    /// `TREAT` or `ETREAT` (required on patient routes).
    pub const PURPOSE: &str = "x-carecache-purpose";
    /// The emergency-access reason (required with ETREAT; percent-encoded UTF-8 allowed).
    pub const REASON: &str = "x-carecache-reason";
    /// Answer: when the data was last synchronised (RFC 3339), or `never`.
    pub const LAST_SYNC: &str = "x-carecache-last-sync";
    /// Answer: `true` when that is older than the configured threshold.
    pub const STALE: &str = "x-carecache-stale";
    /// Answer, only while the audit backlog is older than `audit.warn_backlog_age_secs`:
    /// how many entries wait for upload and since when.
    pub const AUDIT_BACKLOG: &str = "x-carecache-audit-backlog";
    /// Answer, only while the caseload is still arriving (a first sync, a new lease, or a
    /// round cut short): `arriving; held=412; expected=2000`.
    pub const CASELOAD: &str = "x-carecache-caseload";
    /// Answer, only within 30 days of the device certificate's end (or past it): what
    /// to do, in words.
    pub const CERTIFICATE: &str = "x-carecache-certificate";
    /// Answer: the request id, also in the audit entry.
    pub const REQUEST_ID: &str = "x-request-id";
}

/// Shared state of the endpoint.
pub struct Api {
    /// Reads, decisions and audit: the API has no other way to the device, so serving a
    /// read never waits on the hub.
    device: ReadView,
    /// The emergency lookup route's one way to the hub.
    lookup: LookupDoor,
    request_base: u64,
    request_seq: AtomicU64,
    started: Instant,
    sessions: viewer::Sessions,
    /// The demographic search index, rebuilt after any store commit (`search_index`).
    search: std::sync::Mutex<crate::search::Index>,
    /// Failed authentications of the minute under way, counted (see [`auth_limit`]).
    auth_failures: auth_limit::AuthFailures,
    /// A search has been made: from then on the index is kept fresh in the background
    /// after each sync, so the first search after one does not wait for the rebuild.
    search_used: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").finish_non_exhaustive()
    }
}

impl Api {
    /// Runs `f` over the search index of the patients held now: rebuilt from the store
    /// when a commit happened since it was built (so a purged patient is not found; the
    /// policy check on every match is the guard if a commit lands meanwhile).
    pub(crate) fn search_index<T>(
        &self,
        f: impl FnOnce(&crate::search::Index) -> T,
    ) -> Result<T, crate::store::StoreError> {
        self.search_used.store(true, Ordering::Relaxed);
        self.refresh_search_index()?;
        let index = self
            .search
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(f(&index))
    }

    /// Rebuilds the search index if the store changed since it was built. The store is
    /// read without holding the index, so searches go on meanwhile.
    pub(crate) fn refresh_search_index(&self) -> Result<(), crate::store::StoreError> {
        let store = self.device.store();
        let current = store.generation();
        let built = self
            .search
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .generation();
        if built == Some(current) {
            return Ok(());
        }
        let fresh = crate::search::Index::from_store(store)?;
        let mut index = self
            .search
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if index
            .generation()
            .is_none_or(|g| Some(g) < fresh.generation())
        {
            *index = fresh;
        }
        Ok(())
    }

    /// The endpoint over `device`.
    pub fn new(device: &Arc<Device>) -> Arc<Self> {
        let mut b = [0u8; 4];
        let _ = getrandom::fill(&mut b);
        Arc::new(Self {
            device: ReadView::of(device),
            lookup: LookupDoor::of(device),
            // Unique across restarts with high probability: a random high half per
            // process, a counter below it.
            request_base: u64::from(u32::from_le_bytes(b)) << 32,
            request_seq: AtomicU64::new(1),
            started: Instant::now(),
            search: std::sync::Mutex::new(crate::search::Index::default()),
            search_used: std::sync::atomic::AtomicBool::new(false),
            sessions: viewer::Sessions::default(),
            auth_failures: auth_limit::AuthFailures::default(),
        })
    }

    /// Audits the counts of failed authentications whose minute is over (every one with
    /// `everything`).
    async fn audit_auth_failures(&self, everything: bool) {
        for event in self.auth_failures.ended(self.device.now(), everything) {
            let record = self.device.audit_record(event);
            if let Err(e) = self.device.audit().write(record).await {
                tracing::error!(error = %e, "a count of failed authentications was not audited");
            }
        }
    }

    /// The device served, as the API sees it.
    pub fn device(&self) -> &ReadView {
        &self.device
    }

    fn next_request_id(&self) -> u64 {
        self.request_base | (self.request_seq.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff)
    }

    /// Freshness now.
    pub fn freshness(&self) -> Freshness {
        let now = self.device.now();
        let threshold = self.device.config().api.stale_after;
        let last_sync = self.device.last_success();
        let stale = last_sync.is_none_or(|t| {
            now.as_millis().saturating_sub(t.as_millis()) / 1000 > threshold.as_secs()
        });
        Freshness {
            last_sync,
            stale,
            stale_after_secs: threshold.as_secs(),
        }
    }
}

/// The router, without limits (see [`serve`]).
pub fn router(api: Arc<Api>) -> Router {
    let timeout = api.device.config().api.request_timeout;
    let hosts = Arc::new(api.device.config().api.allowed_hosts.clone());
    Router::new()
        .route("/fhir/metadata", get(access::metadata))
        .route("/fhir/Patient", get(access::fhir_patient_search))
        .route("/fhir/Patient/{id}", get(access::fhir_patient_read))
        .route("/fhir/Patient/{id}/{op}", get(access::fhir_patient_op))
        .route("/fhir/Flag", get(access::fhir_flags))
        .route("/fhir/AllergyIntolerance", get(access::fhir_allergies))
        .route("/fhir/MedicationStatement", get(access::fhir_medications))
        .route("/v1/patients", get(access::json_list))
        .route("/v1/patients/{nhs}", get(access::json_summary))
        .route("/v1/lookup", post(access::lookup))
        .route(
            "/v1/session",
            post(session::open_route)
                .get(session::show)
                .delete(session::sign_out),
        )
        .route("/v1/session/confirm", post(session::confirm))
        .route("/v1/session/resume", post(session::resume))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/", get(viewer::home))
        .route("/find", get(viewer::find))
        .route("/search", get(viewer::search))
        .route(
            "/patient/{nhs}",
            get(viewer::patient).post(viewer::patient_emergency),
        )
        .route("/sign-in", post(viewer::sign_in))
        .route("/sign-out", post(viewer::sign_out))
        .route("/viewer/oidc/callback", get(viewer::oidc_callback))
        .route("/viewer/oidc/pin", post(viewer::oidc_pin))
        .route("/viewer/confirm", post(viewer::confirm))
        .fallback(access::not_found)
        .method_not_allowed_fallback(access::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&api),
            common_headers,
        ))
        .layer(axum::middleware::from_fn(
            move |req: Request, next: Next| limit(req, next, timeout, Arc::clone(&hosts)),
        ))
        .with_state(api)
}

/// The name a `Host` header (or an `Origin`'s authority) gives, without its port,
/// lower-cased; `None` if it is not a well-formed host.
pub(crate) fn host_name(host: &str) -> Option<String> {
    let name = match host.strip_prefix('[') {
        Some(rest) => {
            let (name, after) = rest.split_once(']')?;
            if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
                return None;
            }
            name
        }
        None => match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return None,
            None => host,
        },
    };
    let name = name.trim_end_matches('.');
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
    ok.then(|| name.to_ascii_lowercase())
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit())
}

/// Whether `host` names this device: `localhost`, a loopback address, or one of
/// `api.allowed_hosts`. A web page whose own name was rebound to 127.0.0.1 still sends
/// that name, and is refused.
pub(crate) fn host_allowed(host: &str, allowed: &[String]) -> bool {
    host_name(host).is_some_and(|n| {
        n == "localhost"
            || n.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
            || allowed.contains(&n)
    })
}

/// Refuses requests addressed to another host (DNS rebinding) and bodies (every route
/// but the viewer's forms and the staff-session routes is a GET), and times requests
/// out.
async fn limit(req: Request, next: Next, timeout: Duration, hosts: Arc<Vec<String>>) -> Response {
    // A request without `Host` is not from a browser (HTTP/1.0 tools); one with a name
    // that is not this device's is a page that rebound its name to the loopback address.
    if let Some(host) = req.headers().get(header::HOST) {
        let ok = host.to_str().is_ok_and(|h| host_allowed(h, &hosts));
        if !ok {
            let text = "this API answers only requests addressed to this device (Host: localhost, a loopback address, or a name in api.allowed_hosts)";
            return if req.uri().path().starts_with("/fhir") {
                (
                    StatusCode::MISDIRECTED_REQUEST,
                    [(header::CONTENT_TYPE, access::FHIR_JSON)],
                    serde_json::to_vec(&render::operation_outcome("error", "forbidden", text))
                        .unwrap_or_default(),
                )
                    .into_response()
            } else {
                (StatusCode::MISDIRECTED_REQUEST, format!("{text}\n")).into_response()
            };
        }
    }
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().parse::<usize>().unwrap_or(usize::MAX));
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    let post = req.method() == axum::http::Method::POST;
    let form = post
        && (matches!(
            req.uri().path(),
            "/sign-in" | "/viewer/oidc/pin" | "/viewer/confirm"
        ) || req.uri().path().starts_with("/patient/"));
    // The staff-session routes take a small JSON body (an ID token at most 16 KiB), and
    // a lookup a smaller one.
    let session =
        post && (req.uri().path().starts_with("/v1/session") || req.uri().path() == "/v1/lookup");
    let refused = if form {
        chunked || length.is_some_and(|n| n > viewer::MAX_FORM_BYTES)
    } else if session {
        chunked || length.is_some_and(|n| n > session::MAX_BODY)
    } else {
        chunked || length.is_some_and(|n| n != 0)
    };
    // FHIR routes answer every error as an OperationOutcome, these included.
    let fhir = req.uri().path().starts_with("/fhir");
    let answer = |status: StatusCode, code: &str, text: &str| -> Response {
        if fhir {
            (
                status,
                [(header::CONTENT_TYPE, access::FHIR_JSON)],
                serde_json::to_vec(&render::operation_outcome("error", code, text))
                    .unwrap_or_default(),
            )
                .into_response()
        } else {
            (status, format!("{text}\n")).into_response()
        }
    };
    if refused {
        return answer(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-costly",
            "this API takes no request bodies",
        );
    }
    if fhir && !accepts_json(req.headers()) {
        return answer(
            StatusCode::NOT_ACCEPTABLE,
            "not-supported",
            "this API answers application/fhir+json only",
        );
    }
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "request timed out",
        ),
    }
}

/// Whether the `Accept` header (absent: yes) takes JSON: `application/fhir+json`,
/// `application/json`, `application/*` or `*/*`, not at `q=0`.
fn accepts_json(h: &axum::http::HeaderMap) -> bool {
    let Some(accept) = h.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return h.get(header::ACCEPT).is_none();
    };
    accept.split(',').any(|range| {
        let mut parts = range.split(';');
        let kind = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let refused = parts.any(|p| {
            p.trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        !refused
            && matches!(
                kind.as_str(),
                "application/fhir+json" | "application/json" | "application/*" | "*/*"
            )
    })
}

/// Freshness, no-store and latency on every answer.
async fn common_headers(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| route_label(m.as_str()));
    let mut res = next.run(req).await;
    let f = api.freshness();
    let h = res.headers_mut();
    let last = f.last_sync.map_or_else(
        || "never".to_owned(),
        sync_protocol::types::Timestamp::utc_seconds,
    );
    if let Ok(v) = HeaderValue::from_str(&last) {
        h.insert(headers::LAST_SYNC, v);
    }
    h.insert(
        headers::STALE,
        HeaderValue::from_static(if f.stale { "true" } else { "false" }),
    );
    // Past the configured age, every answer says the audit trail has not reached the hub.
    let (backlog, age, overdue) = api.device.audit_backlog();
    if overdue
        && let (Some(oldest), Some(age)) = (backlog.oldest, age)
        && let Ok(v) = HeaderValue::from_str(&format!(
            "{} entries not uploaded, oldest {} ({}s ago)",
            backlog.entries,
            oldest.utc_seconds(),
            age
        ))
    {
        h.insert(headers::AUDIT_BACKLOG, v);
    }
    // Near its end, every answer says the device certificate needs renewing.
    if let Some(left) = api.device.certificate_warning()
        && let Ok(v) = HeaderValue::from_str(&crate::device::certificate_words(left))
    {
        h.insert(headers::CERTIFICATE, v);
    }
    // While the caseload is still arriving, every answer says how much of it is here.
    if api.device.arriving()
        && let Ok(c) = api.device.caseload()
        && let Ok(v) = HeaderValue::from_str(&match c.expected {
            Some(e) => format!("arriving; held={}; expected={e}", c.held),
            None => format!("arriving; held={}", c.held),
        })
    {
        h.insert(headers::CASELOAD, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    api.device
        .metrics()
        .latency
        .get_or_create(&vec![("route", route)])
        .observe(started.elapsed().as_secs_f64());
    res
}

fn route_label(path: &str) -> &'static str {
    match path {
        "/fhir/metadata" => "fhir_metadata",
        "/fhir/Patient" => "fhir_patient_search",
        "/fhir/Patient/{id}" => "fhir_patient_read",
        "/fhir/Patient/{id}/{op}" => "fhir_patient_summary",
        "/fhir/Flag" => "fhir_flag",
        "/fhir/AllergyIntolerance" => "fhir_allergy",
        "/fhir/MedicationStatement" => "fhir_medication",
        "/v1/patients" => "v1_patients",
        "/v1/patients/{nhs}" => "v1_patient",
        "/status" => "status",
        "/metrics" => "metrics",
        "/v1/session" | "/v1/session/confirm" | "/v1/session/resume" => "v1_session",
        "/"
        | "/find"
        | "/patient/{nhs}"
        | "/sign-in"
        | "/sign-out"
        | "/search"
        | "/viewer/oidc/callback"
        | "/viewer/oidc/pin"
        | "/viewer/confirm" => "viewer",
        _ => "other",
    }
}

/// `GET /status`: without a client token, readiness alone (`{"ready": …}`, for a
/// monitor or load balancer: nothing about the device's leases, patients or hub); with
/// one, the device status plus freshness, the audit log's health and the endpoint's
/// uptime. No patient data either way.
async fn status(State(api): State<Arc<Api>>, h: axum::http::HeaderMap) -> Response {
    let ready = api.device.audit().health().failing().is_none()
        && !api.device.is_wiped()
        && api.device.anchor_held().is_none();
    if !h.contains_key(header::AUTHORIZATION) {
        return axum::Json(serde_json::json!({ "ready": ready })).into_response();
    }
    let rid = api.next_request_id();
    if let Err(refused) = access::authenticate(&api, &h, rid, access::Format::Json).await {
        return refused;
    }
    match api.device.status() {
        Ok(s) => {
            let mut v = serde_json::to_value(&s).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                obj.insert("freshness".into(), api.freshness().json());
                obj.insert("uptime_secs".into(), api.started.elapsed().as_secs().into());
                obj.insert(
                    "ready".into(),
                    (s.audit_error.is_none() && !api.device.is_wiped() && !s.anchor.holding).into(),
                );
            }
            axum::Json(v).into_response()
        }
        Err(e) => access::json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
            None,
        ),
    }
}

/// `GET /metrics`, for a client token (a Prometheus scrape sends it as a bearer token).
async fn metrics(State(api): State<Arc<Api>>, h: axum::http::HeaderMap) -> Response {
    let rid = api.next_request_id();
    if let Err(refused) = access::authenticate(&api, &h, rid, access::Format::Json).await {
        return refused;
    }
    let d = &api.device;
    let m = d.metrics();
    let health = d.audit().health();
    let (backlog, age, overdue) = d.audit_backlog();
    m.audit_backlog
        .set(i64::try_from(backlog.entries).unwrap_or(i64::MAX));
    m.audit_backlog_age
        .set(age.map_or(0, |a| i64::try_from(a).unwrap_or(i64::MAX)));
    m.audit_backlog_overdue.set(i64::from(overdue));
    m.audit_committed
        .set(i64::try_from(health.committed.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
    m.audit_commits
        .set(i64::try_from(health.commits.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
    m.audit_failing.set(i64::from(health.failing().is_some()));
    let identity = d.identity();
    m.staff_sessions
        .set(i64::try_from(identity.session_count()).unwrap_or(i64::MAX));
    m.identity_keys_held.set(i64::from(identity.has_keys()));
    if let Ok(Some((_, until))) = d.certificate_validity() {
        let left = (i128::from(until.as_millis()) - i128::from(d.now().as_millis())) / 1000;
        m.certificate_expiry
            .set(i64::try_from(left).unwrap_or(i64::MAX));
    }
    let age = d.last_success().map_or(-1, |t| {
        i64::try_from(d.now().as_millis().saturating_sub(t.as_millis()) / 1000).unwrap_or(i64::MAX)
    });
    m.data_age.set(age);
    if let Ok(c) = d.caseload() {
        m.patients_held
            .set(i64::try_from(c.held).unwrap_or(i64::MAX));
        m.patients_expected.set(c.expected.map_or(0, i64::from));
        m.caseload_arriving.set(i64::from(!c.complete));
        m.sync_round_bytes
            .set(i64::try_from(c.round_bytes).unwrap_or(i64::MAX));
        m.sync_eta.set(
            c.eta_secs
                .map_or(-1, |t| i64::try_from(t).unwrap_or(i64::MAX)),
        );
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

/// Binds a TCP listener with a deep accept queue (1,024: connections beyond the
/// connection cap wait there rather than being refused).
pub fn bind_tcp(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Where the endpoint listens.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A unix socket, and its path (removed at shutdown).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds a unix socket at `path` with mode 0660, replacing a stale socket file (and
    /// refusing to replace anything else).
    pub fn bind_unix(path: &Path) -> std::io::Result<Self> {
        let l = bind_socket_file(path, 0o660)?;
        l.set_nonblocking(true)?;
        Ok(Self::Unix(UnixListener::from_std(l)?, path.to_owned()))
    }
}

/// Binds a unix socket at `path` with `mode`, replacing a stale socket file and refusing
/// to replace anything else (the local API's socket and the admin channel's).
pub(crate) fn bind_socket_file(
    path: &Path,
    mode: u32,
) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}

/// Serves `listeners` until `shutdown` resolves; connections in flight get a few
/// seconds to finish.
pub async fn serve(
    api: Arc<Api>,
    listeners: Vec<Listener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let cfg = api.device.config().api.clone();
    // Keep the search index fresh once it is in use (built lazily: startup and memory
    // stay as they were for a device nobody searches on).
    let warm = {
        let api = Arc::clone(&api);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                if api.search_used.load(Ordering::Relaxed) {
                    let api = Arc::clone(&api);
                    let _ = tokio::task::spawn_blocking(move || {
                        if let Err(e) = api.refresh_search_index() {
                            tracing::warn!(error = %e, "search index not refreshed");
                        }
                    })
                    .await;
                }
            }
        })
    };
    // Counts of failed authentications go to the audit log when their minute is over.
    let counts = {
        let api = Arc::clone(&api);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(15)).await;
                api.audit_auth_failures(false).await;
            }
        })
    };
    let flush = Arc::clone(&api);
    let app = router(api);
    let permits = Arc::new(Semaphore::new(cfg.max_connections));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut loops = tokio::task::JoinSet::new();
    let mut sockets = Vec::new();
    for l in listeners {
        if let Listener::Unix(_, p) = &l {
            sockets.push(p.clone());
        }
        let app = app.clone();
        let permits = Arc::clone(&permits);
        let mut stop = stop_rx.clone();
        let cfg = cfg.clone();
        loops.spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                // Wait for a free slot before accepting: excess connections wait in the
                // kernel's accept queue, so memory stays bounded.
                let permit = tokio::select! {
                    _ = stop.changed() => break,
                    p = Arc::clone(&permits).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                };
                let accepted = tokio::select! {
                    _ = stop.changed() => break,
                    a = accept(&l) => a,
                };
                while conns.try_join_next().is_some() {}
                let io = match accepted {
                    Ok(io) => io,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let app = app.clone();
                let cfg = cfg.clone();
                conns.spawn(async move {
                    let _permit = permit;
                    if let Err(e) = serve_connection(app, &cfg, io).await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            let drain = async { while conns.join_next().await.is_some() {} };
            if tokio::time::timeout(Duration::from_secs(5), drain)
                .await
                .is_err()
            {
                conns.abort_all();
            }
        });
    }
    shutdown.await;
    warm.abort();
    counts.abort();
    let _ = stop_tx.send(true);
    while loops.join_next().await.is_some() {}
    // The minute under way too: a count is never lost at shutdown.
    flush.audit_auth_failures(true).await;
    for p in sockets {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// HTTP/1.1 on one accepted connection with the daemon's limits (header read timeout,
/// header buffer, at most 64 headers; answers a client that half-closed). The stream is
/// wrapped in [`HeadLimit`] so a head over the limits is answered in the route's format. [`serve`] runs it per connection; the
/// request-parsing fuzz target runs it over an in-memory pipe.
pub async fn serve_connection<I>(
    app: Router,
    cfg: &crate::config::ApiConfig,
    io: I,
) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        app.clone().oneshot(req.map(axum::body::Body::new))
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.request_timeout)
        .max_buf_size(cfg.max_header_bytes)
        .max_headers(64)
        // A client that half-closes after its request (`nc -N`, scripts) still gets its
        // answer.
        .half_close(true)
        .serve_connection(io, service)
        .await
}

pub use head_limit::HeadLimit;

enum Io {
    Tcp(TokioIo<HeadLimit<tokio::net::TcpStream>>),
    Unix(TokioIo<HeadLimit<tokio::net::UnixStream>>),
}

async fn accept(l: &Listener) -> std::io::Result<Io> {
    Ok(match l {
        Listener::Tcp(t) => {
            let (s, _) = t.accept().await?;
            let _ = s.set_nodelay(true);
            Io::Tcp(TokioIo::new(HeadLimit::new(s)))
        }
        Listener::Unix(u, _) => {
            let (s, _) = u.accept().await?;
            Io::Unix(TokioIo::new(HeadLimit::new(s)))
        }
    })
}

impl hyper::rt::Read for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(t) => std::pin::Pin::new(t).poll_read(cx, buf),
            Self::Unix(u) => std::pin::Pin::new(u).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Self::Tcp(t) => std::pin::Pin::new(t).poll_write(cx, buf),
            Self::Unix(u) => std::pin::Pin::new(u).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(t) => std::pin::Pin::new(t).poll_flush(cx),
            Self::Unix(u) => std::pin::Pin::new(u).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Self::Tcp(t) => std::pin::Pin::new(t).poll_shutdown(cx),
            Self::Unix(u) => std::pin::Pin::new(u).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{host_allowed, host_name};

    #[test]
    fn only_this_devices_names_are_hosts_it_answers() {
        let allowed = vec!["tablet-7.trust.example".to_owned()];
        for ok in [
            "localhost",
            "localhost:7380",
            "LocalHost.",
            "127.0.0.1",
            "127.8.9.10:80",
            "[::1]",
            "[::1]:7380",
            "tablet-7.trust.example:443",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for bad in [
            "attacker.example",
            "127.0.0.1.nip.io",
            "localhost.attacker.example",
            "tablet-7.trust.example.attacker.example",
            "[::2]:80",
            "10.0.0.1",
            "127.0.0.1:port",
            "[::1]x",
            "",
            "::1",
        ] {
            assert!(!host_allowed(bad, &allowed), "{bad}");
        }
        assert_eq!(
            host_name("Example.ORG:8443").as_deref(),
            Some("example.org")
        );
    }
}
