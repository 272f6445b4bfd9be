//! HTTPS with mutual TLS: the sync protocol for devices (SPEC §1) and the admin API.
//!
//! The server takes its listener and shutdown signal from the caller (tests bind port 0).
//! Every connection is TLS; a client certificate is optional at the handshake (enrolment
//! has none) and required by every device route, which maps it to an enrolled device.
//! Logs carry device ids, routes, sizes and outcomes — never patient data.
#![allow(
    clippy::result_large_err,
    reason = "helpers return the axum Response as their error, answered at once; boxing it gains nothing"
)]

use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use sha2::{Digest, Sha256};
use sync_protocol::message::{
    AuditAck, EnrolResponse, ErrorCode, ErrorMessage, Message, MessageKind, Welcome,
};
use sync_protocol::types::{
    BoundedVec, Bytes as WireBytes, Capabilities, DeviceId, Text, Timestamp,
};
use sync_protocol::{Compression, decode_with_limit, encode, encode_version};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::audit::AuditError;
use crate::pki::DeviceCa;
use crate::pull::{PullError, Puller, Request as PullRequest, pull, shared_key};
use crate::state::{HubState, LeaseSpec, LookupRefusal, StateError};

/// Content type of sync-protocol frames.
pub const FRAME_CONTENT_TYPE: &str = "application/vnd.carecache.sync";
/// Protocol versions this hub speaks.
const VERSIONS: (u16, u16) = (
    *sync_protocol::codec::SUPPORTED_VERSIONS.start(),
    *sync_protocol::codec::SUPPORTED_VERSIONS.end(),
);

/// A source re-read the admin API can trigger; returns a JSON report.
pub type IngestHook = Arc<dyn Fn() -> Result<serde_json::Value, String> + Send + Sync>;

/// What a test hook does to a protocol answer before it leaves (hostile-hub tests).
#[derive(Debug)]
pub enum Tamper {
    /// Send it as it is.
    Pass,
    /// Send these bytes instead (same status and content type).
    Replace(Vec<u8>),
    /// Declare the full length, send this many bytes, then break the connection.
    CutAfter(usize),
}

/// A hook over each protocol answer: given the route (`hello`, `pull`, `audit`) and the encoded
/// frame, decides what is sent. Only tests set one.
pub type ResponseHook = Arc<dyn Fn(&str, &[u8]) -> Tamper + Send + Sync>;

/// What the server needs.
pub struct Hub {
    /// Durable state.
    pub state: HubState,
    /// Signs device certificates.
    pub ca: DeviceCa,
    /// SHA-256 of the admin token.
    admin_token_sha256: [u8; 32],
    /// The privacy officer's token (digest): only it clears a restored copy.
    privacy_token_sha256: Option<[u8; 32]>,
    /// Largest batch sent.
    pub max_batch_bytes: u32,
    limiter: DefaultKeyedRateLimiter<String>,
    /// Failed admin logins by address, forgotten [`ADMIN_LOCKOUT`] after the last.
    admin_failures: moka::sync::Cache<std::net::IpAddr, u32>,
    clock: Arc<dyn Fn() -> Timestamp + Send + Sync>,
    ingest: Mutex<Option<IngestHook>>,
    #[cfg(feature = "testing")]
    tamper: Mutex<Option<ResponseHook>>,
    /// Audit entries stored since start.
    pub audit_stored: std::sync::atomic::AtomicU64,
    /// Audit entries received again with equal hashes (resends after a lost ack) and
    /// acknowledged without storing.
    pub audit_repeated: std::sync::atomic::AtomicU64,
    /// Shared snapshots: encoded batches by [`crate::pull::shared_key`].
    shared: Option<moka::sync::Cache<[u8; 32], Arc<Vec<u8>>>>,
    /// Pulls answered from a shared snapshot, and pulls that built one.
    pub shared_hits: std::sync::atomic::AtomicU64,
    /// Pulls that built a batch.
    pub batches_built: std::sync::atomic::AtomicU64,
    /// Length of a lease granted by a lookup, in hours.
    pub lookup_hours: u32,
    /// How long a shared batch is served, in seconds of hub time and of real time.
    shared_secs: u64,
    /// When a device needs attention in the fleet view.
    pub fleet: crate::fleet::FleetLimits,
    /// SHA-256 of the token Prometheus scrapes `/metrics` with, if one is configured
    /// (the admin token also reads it).
    metrics_token_sha256: Option<[u8; 32]>,
    /// Counters since start, for `/metrics`.
    counters: Counters,
}

type Labels = Vec<(String, String)>;

/// What `/metrics` counts since the hub started.
#[derive(Default)]
struct Counters {
    /// Protocol requests by route and HTTP status.
    requests: CounterFamily,
    /// Source reads by outcome.
    ingests: CounterFamily,
    /// Audit forwarding passes by outcome.
    forward_passes: CounterFamily,
    /// Audit entries the upstream audit store accepted.
    forwarded: prometheus_client::metrics::counter::Counter,
    /// Whether this instance forwards audit (so `/metrics` shows what waits).
    forwarding: std::sync::atomic::AtomicBool,
}

type CounterFamily = prometheus_client::metrics::family::Family<
    Labels,
    prometheus_client::metrics::counter::Counter,
>;

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

/// The wall clock as a protocol timestamp.
pub fn system_clock() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    // Before year 10000 the conversion cannot fail; clamp rather than panic if it did.
    Timestamp::from_millis(ms)
        .or_else(|_| Timestamp::from_millis(253_402_300_799_999))
        .unwrap_or_else(|_| unreachable!("the largest valid timestamp"))
}

impl Hub {
    /// Run `f` on the hub's state from a request handler: a database across the network
    /// is waited for off the async workers (`block_in_place`); the embedded one answers
    /// in place.
    pub(crate) fn db<T>(&self, f: impl FnOnce(&HubState) -> T) -> T {
        if self.state.is_remote() {
            tokio::task::block_in_place(|| f(&self.state))
        } else {
            f(&self.state)
        }
    }

    /// A hub over `state`, issuing certificates with `ca`, with an admin token and a
    /// per-device rate limit.
    pub fn new(
        state: HubState,
        ca: DeviceCa,
        admin_token: &str,
        limits: &crate::config::Limits,
    ) -> Self {
        let rps = NonZeroU32::new(limits.requests_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.burst).unwrap_or(NonZeroU32::MIN);
        Self {
            state,
            ca,
            admin_token_sha256: Sha256::digest(admin_token.as_bytes()).into(),
            privacy_token_sha256: None,
            max_batch_bytes: limits.max_batch_bytes,
            limiter: RateLimiter::keyed(Quota::per_second(rps).allow_burst(burst)),
            admin_failures: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ADMIN_LOCKOUT)
                .build(),
            clock: Arc::new(system_clock),
            ingest: Mutex::new(None),
            #[cfg(feature = "testing")]
            tamper: Mutex::new(None),
            audit_stored: std::sync::atomic::AtomicU64::new(0),
            audit_repeated: std::sync::atomic::AtomicU64::new(0),
            shared: (limits.shared_snapshot_mib > 0).then(|| {
                moka::sync::Cache::builder()
                    .max_capacity(limits.shared_snapshot_mib.saturating_mul(1024 * 1024))
                    .weigher(|_, v: &Arc<Vec<u8>>| u32::try_from(v.len()).unwrap_or(u32::MAX))
                    .time_to_live(Duration::from_secs(
                        limits.shared_snapshot_secs.clamp(1, 50),
                    ))
                    .build()
            }),
            shared_hits: std::sync::atomic::AtomicU64::new(0),
            batches_built: std::sync::atomic::AtomicU64::new(0),
            lookup_hours: limits.lookup_lease_hours,
            shared_secs: limits.shared_snapshot_secs.clamp(1, 50),
            fleet: crate::fleet::FleetLimits::default(),
            metrics_token_sha256: None,
            counters: Counters::default(),
        }
    }

    /// The token Prometheus scrapes `/metrics` with (read-only: it opens nothing else).
    pub fn with_metrics_token(mut self, token: &str) -> Self {
        self.metrics_token_sha256 = Some(Sha256::digest(token.as_bytes()).into());
        self
    }

    /// One audit forwarding pass (see [`crate::forward`]), counted for `/metrics` and
    /// logged (counts and the error only).
    pub fn run_forward(&self, forwarder: &crate::forward::Forwarder) {
        use std::sync::atomic::Ordering::Relaxed;
        self.counters.forwarding.store(true, Relaxed);
        let outcome = forwarder.pass(&self.state);
        let label = match &outcome {
            Ok(f) if f.busy => "busy",
            Ok(_) => "ok",
            Err(_) => "failed",
        };
        self.counters
            .forward_passes
            .get_or_create(&vec![("outcome".into(), label.into())])
            .inc();
        match outcome {
            Ok(f) => {
                self.counters.forwarded.inc_by(f.accepted);
                if f.accepted > 0 {
                    tracing::info!(entries = f.accepted, bundles = f.bundles, "audit forwarded");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "audit forwarding stopped; it resumes at the next pass")
            }
        }
    }

    /// Reads the source once through the configured hook, counting the outcome for
    /// `/metrics`. `None` when no source is configured.
    pub fn run_ingest(&self) -> Option<Result<serde_json::Value, String>> {
        let hook = self.ingest.lock().ok().and_then(|h| h.clone())?;
        let outcome = hook();
        let label = if outcome.is_ok() { "ok" } else { "failed" };
        self.counters
            .ingests
            .get_or_create(&vec![("outcome".into(), label.into())])
            .inc();
        Some(outcome)
    }

    /// The privacy officer's token: the one credential that clears a device's restored
    /// copy (`POST /admin/v1/devices/{id}/clear-restored`). The admin token does not: the
    /// IT team that restores a device does not also close the question.
    pub fn with_privacy_officer_token(mut self, token: &str) -> Self {
        self.privacy_token_sha256 = Some(Sha256::digest(token.as_bytes()).into());
        self
    }

    /// Sets when a device needs attention in the fleet view.
    pub fn with_fleet(mut self, fleet: crate::fleet::FleetLimits) -> Self {
        self.fleet = fleet;
        self
    }

    /// Replace the clock (tests move hub time).
    pub fn with_clock(mut self, clock: Arc<dyn Fn() -> Timestamp + Send + Sync>) -> Self {
        self.clock = clock;
        self
    }

    /// Let `POST /admin/v1/ingest` re-read the source.
    pub fn set_ingest_hook(&self, hook: IngestHook) {
        if let Ok(mut slot) = self.ingest.lock() {
            *slot = Some(hook);
        }
    }

    /// Test support (feature `testing`): pass every protocol answer through `hook` (or
    /// stop, with `None`). A hub that lies is how devices are tested against a hostile hub.
    #[cfg(feature = "testing")]
    pub fn dangerous_set_response_hook(&self, hook: Option<ResponseHook>) {
        if let Ok(mut slot) = self.tamper.lock() {
            *slot = hook;
        }
    }

    /// Whether a test hook is set (never, outside the `testing` feature).
    fn tampering(&self) -> bool {
        #[cfg(feature = "testing")]
        return self.tamper.lock().ok().is_some_and(|h| h.is_some());
        #[cfg(not(feature = "testing"))]
        false
    }

    /// Encodes an answer.
    #[cfg(not(feature = "testing"))]
    fn answer(&self, _route: &str, status: StatusCode, msg: &Message) -> Response {
        frame_response(status, msg)
    }

    /// Encodes an answer and lets the test hook, if any, tamper with it.
    #[cfg(feature = "testing")]
    fn answer(&self, route: &str, status: StatusCode, msg: &Message) -> Response {
        let resp = frame_response(status, msg);
        let hook = self.tamper.lock().ok().and_then(|h| h.clone());
        let Some(hook) = hook else {
            return resp;
        };
        let (parts, _) = resp.into_parts();
        let Ok(bytes) = encode(msg, Compression::Zstd) else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        match hook(route, &bytes) {
            Tamper::Pass => Response::from_parts(parts, Body::from(bytes)),
            Tamper::Replace(other) => Response::from_parts(parts, Body::from(other)),
            Tamper::CutAfter(n) => {
                let full = bytes.len();
                let head = bytes.get(..n.min(full)).unwrap_or_default().to_vec();
                let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
                    Ok(head),
                    Err(std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "cut by test hook",
                    )),
                ];
                let mut resp = Response::from_parts(
                    parts,
                    Body::from_stream(futures_util::stream::iter(chunks)),
                );
                if let Ok(v) = HeaderValue::from_str(&full.to_string()) {
                    resp.headers_mut().insert(header::CONTENT_LENGTH, v);
                }
                resp
            }
        }
    }

    /// Hub time now.
    pub fn now(&self) -> Timestamp {
        (self.clock)()
    }
}

/// The rustls server configuration: the hub's certificate, client certificates verified
/// against the CA but optional at the handshake.
pub fn tls_config(
    ca_cert: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in ca_cert {
        roots
            .add(c.clone())
            .map_err(|e| format!("CA certificate: {e}"))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("client verifier: {e}"))?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("hub certificate: {e}"))?;
    Ok(Arc::new(config))
}

/// [`tls_config`] from PEM files: the CA that signs device certificates, the hub's
/// certificate chain and its key.
pub fn tls_from_files(
    ca_cert: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()))
    };
    let ca = crate::pki::pem_certs(&read(ca_cert)?);
    let chain = crate::pki::pem_certs(&read(cert)?);
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("reading the hub key {}: {e}", key.display()))?;
    tls_config(&ca, chain, key)
}

/// A hub served on a thread of its own (with its own runtime) until stopped or dropped:
/// for the demo and for tests, which run a hub beside a device in one process.
pub struct Background {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Background {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Background")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Background {
    /// Binds `bind` (port 0: any free port) and serves `hub` there.
    pub fn start(
        hub: Arc<Hub>,
        bind: SocketAddr,
        tls: Arc<ServerConfig>,
        header_timeout: Duration,
    ) -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hub")
            .enable_all()
            .build()?;
        let listener = rt.block_on(TcpListener::bind(bind))?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("hub".into())
            .spawn(move || {
                let served = rt.block_on(serve(hub, listener, tls, header_timeout, async {
                    let _ = rx.await;
                }));
                if let Err(e) = served {
                    tracing::error!(error = %e, "the hub stopped with an error");
                }
            })?;
        Ok(Self {
            addr,
            shutdown: Some(tx),
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for the connections in flight (also on drop).
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the hub thread panicked");
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The client certificate of a connection, if one was presented and verified.
#[derive(Clone, Debug)]
struct Peer {
    cert: Option<Arc<Vec<u8>>>,
    addr: SocketAddr,
}

/// Serve until `shutdown` resolves; connections in flight get `grace` to finish.
pub async fn serve(
    hub: Arc<Hub>,
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let acceptor = TlsAcceptor::from(tls);
    let app = router(hub);
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        let acceptor = acceptor.clone();
        let app = app.clone();
        tasks.spawn(async move {
            let tls = match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%addr, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%addr, "TLS handshake timed out");
                    return;
                }
            };
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Arc::new(c.to_vec()));
            let peer = Peer { cert, addr };
            let service =
                hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer.clone());
                    app.clone().oneshot(req.map(Body::new))
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(tls), service);
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "connection ended with an error");
            }
        });
    }
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    Ok(())
}

fn router(hub: Arc<Hub>) -> Router {
    let admin = Router::new()
        .route("/admin/v1/fleet", get(admin_fleet))
        .route("/admin/v1/fleet/metrics", get(admin_fleet_metrics))
        .route("/admin/v1/lookups", get(admin_lookups))
        .route("/admin/v1/status", get(admin_status))
        .route("/admin/v1/leases", get(admin_leases).post(admin_grant))
        .route(
            "/admin/v1/leases/{id}",
            axum::routing::put(admin_change).delete(admin_revoke),
        )
        .route("/admin/v1/enrolment-tokens", post(admin_token))
        .route("/admin/v1/devices", get(admin_devices))
        .route("/admin/v1/devices/{id}/revoke", post(admin_revoke_device))
        .route(
            "/admin/v1/devices/{id}/clear-restored",
            post(admin_clear_restored),
        )
        .route(
            "/admin/v1/devices/{id}/clear-audit-flag",
            post(admin_clear_audit_flag),
        )
        .route("/admin/v1/audit/review", get(admin_audit_review))
        .route("/admin/v1/audit/patients/{nhs}", get(admin_audit_patient))
        .route("/admin/v1/audit/export", get(admin_audit_export))
        .route("/admin/v1/audit/officer-log", get(admin_officer_log))
        .route(
            "/admin/v1/devices/{id}/renewal-token",
            post(admin_renewal_token),
        )
        .route("/admin/v1/ingest", post(admin_ingest))
        .route_layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            admin_throttle,
        ));
    let metrics = Router::new()
        .route("/metrics", get(metrics_route))
        .route_layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            admin_throttle,
        ));
    Router::new()
        .route("/ccsp/v1/enrol", post(enrol))
        .route("/ccsp/v1/hello", post(hello))
        .route("/ccsp/v1/pull", post(pull_route))
        .route("/ccsp/v1/audit", post(audit_route))
        .route("/ccsp/v1/lookup", post(lookup_route))
        .route("/ccsp/v1/checkin", post(checkin_route))
        .route("/ccsp/v1/renew", post(renew_route))
        .route_layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            count_requests,
        ))
        .merge(admin)
        .merge(metrics)
        .layer(axum::extract::DefaultBodyLimit::max(
            usize::try_from(MessageKind::PushAudit.max_payload()).unwrap_or(usize::MAX) + 16,
        ))
        .with_state(hub)
}

// ---- sync protocol -------------------------------------------------------------------

/// A protocol error answer.
fn error_frame(code: ErrorCode, message: &str, retry_after: Option<u32>) -> Response {
    let status = match code {
        ErrorCode::Malformed
        | ErrorCode::UnsupportedVersion
        | ErrorCode::CursorInvalid
        | ErrorCode::AuditGap
        | ErrorCode::AuditChainBroken => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::DeviceRevoked => StatusCode::FORBIDDEN,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::NotAvailable => StatusCode::NOT_FOUND,
        ErrorCode::NotPermitted => StatusCode::FORBIDDEN,
    };
    let text: String = message.chars().take(1000).collect();
    let msg = Message::Error(ErrorMessage {
        code,
        message: Text::new(text)
            .or_else(|_| Text::new("error"))
            .unwrap_or_else(|_| unreachable!("a short ASCII text")),
        retry_after_secs: retry_after,
    });
    let mut resp = frame_response(status, &msg);
    if let Some(secs) = retry_after
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

fn frame_response(status: StatusCode, msg: &Message) -> Response {
    match encode(msg, Compression::Zstd) {
        Ok(bytes) => (status, [(header::CONTENT_TYPE, FRAME_CONTENT_TYPE)], bytes).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding a response failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

/// Read a request frame of `kind`: content type, declared length and decoding checked
/// before anything is applied.
async fn read_frame(
    headers: &HeaderMap,
    body: Body,
    kind: MessageKind,
) -> Result<Message, Response> {
    read_frame_versioned(headers, body, kind)
        .await
        .map(|(m, _)| m)
}

/// [`read_frame`], with the protocol version the request was framed in: the hub answers
/// in it (SPEC.md §5).
async fn read_frame_versioned(
    headers: &HeaderMap,
    body: Body,
    kind: MessageKind,
) -> Result<(Message, u16), Response> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct != FRAME_CONTENT_TYPE {
        return Err(error_frame(
            ErrorCode::Malformed,
            "content type must be application/vnd.carecache.sync",
            None,
        ));
    }
    let limit = usize::try_from(kind.max_payload()).unwrap_or(usize::MAX) + 16;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(error_frame(
            ErrorCode::TooLarge,
            "request over the size limit",
            None,
        ));
    }
    let bytes = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| error_frame(ErrorCode::TooLarge, "request over the size limit", None))?;
    let msg = decode_with_limit(&bytes, kind.max_payload()).map_err(|e| {
        tracing::info!(
            kind = kind.name(),
            error = e.kind_name(),
            "malformed request"
        );
        error_frame(
            ErrorCode::Malformed,
            &format!("malformed {}: {}", kind.name(), e.kind_name()),
            None,
        )
    })?;
    if msg.kind() != kind {
        return Err(error_frame(
            ErrorCode::Malformed,
            &format!("expected {}", kind.name()),
            None,
        ));
    }
    // The header parsed once already: decoding succeeded.
    let version = bytes
        .get(4..6)
        .and_then(|v| <[u8; 2]>::try_from(v).ok())
        .map_or(1, u16::from_be_bytes);
    Ok((msg, version))
}

/// The enrolled, unrevoked device behind a request, within its rate limit.
fn device(hub: &Hub, peer: &Peer) -> Result<(String, Option<String>), Response> {
    match enrolled_device(hub, peer)? {
        (id, _, true) => {
            tracing::info!(device = %id, "revoked device refused");
            Err(error_frame(
                ErrorCode::DeviceRevoked,
                "this device has been revoked: wipe local data",
                None,
            ))
        }
        (id, team, false) => Ok((id, team)),
    }
}

/// The enrolled device behind a request, revoked or not (`true`), within its rate
/// limit: a revoked device may still upload its audit and report its wipe.
fn enrolled_device(hub: &Hub, peer: &Peer) -> Result<(String, Option<String>, bool), Response> {
    let Some(cert) = &peer.cert else {
        return Err(error_frame(
            ErrorCode::Unauthorized,
            "a device certificate is required",
            None,
        ));
    };
    let (id, row) = match hub.db(|s| s.device_by_certificate(cert)) {
        Ok(Some(d)) => d,
        Ok(None) => {
            return Err(error_frame(
                ErrorCode::Unauthorized,
                "certificate not issued to an enrolled device",
                None,
            ));
        }
        Err(e) => return Err(state_failure(&e)),
    };
    if hub.limiter.check_key(&id).is_err() {
        return Err(error_frame(ErrorCode::RateLimited, "slow down", Some(1)));
    }
    Ok((id, row.team, row.revoked))
}

fn internal(e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, "internal error");
    error_frame(ErrorCode::Internal, "internal error", Some(5))
}

/// A protocol request the hub's state failed: busy (every database connection in use,
/// or the database not answering) is `Unavailable`, to be retried in a moment; anything
/// else is internal.
fn state_failure(e: &StateError) -> Response {
    match e {
        StateError::Busy(why) => {
            tracing::warn!(error = %why, "request refused: database busy");
            error_frame(
                ErrorCode::Unavailable,
                "the hub is busy; retry shortly",
                Some(2),
            )
        }
        e => internal(e),
    }
}

fn peer_of(req: &Request<Body>) -> Peer {
    req.extensions().get::<Peer>().cloned().unwrap_or(Peer {
        cert: None,
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
    })
}

async fn enrol(State(hub): State<Arc<Hub>>, req: Request<Body>) -> Response {
    let peer = peer_of(&req);
    let (parts, body) = req.into_parts();
    let Message::EnrolRequest(r) =
        (match read_frame(&parts.headers, body, MessageKind::EnrolRequest).await {
            Ok(m) => m,
            Err(resp) => return resp,
        })
    else {
        return error_frame(ErrorCode::Malformed, "expected enrol-request", None);
    };
    let now = hub.now();
    let hub2 = hub.clone();
    let label = r.device_label.as_str().to_owned();
    let csr = r.csr_der.as_slice().to_vec();
    let token = r.token.expose().to_owned();
    let outcome = tokio::task::spawn_blocking(move || {
        hub2.state
            .enrol(&token, &label, now, |id| hub2.ca.issue(&csr, id))
    })
    .await;
    let (device_id, der) = match outcome {
        Ok(Ok(Ok(d))) => d,
        Ok(Ok(Err(e))) => return error_frame(ErrorCode::Malformed, &e.to_string(), None),
        Ok(Err(StateError::TokenRejected)) => {
            tracing::info!(addr = %peer.addr, "enrolment token refused");
            return error_frame(
                ErrorCode::Unauthorized,
                "enrolment token unknown, already used or expired",
                None,
            );
        }
        Ok(Err(e)) => return state_failure(&e),
        Err(e) => return internal(&e),
    };
    tracing::info!(device = %device_id, "device enrolled");
    let build = || -> Result<Message, String> {
        Ok(Message::EnrolResponse(EnrolResponse {
            device_id: DeviceId::new(device_id.as_str()).map_err(|e| e.to_string())?,
            certificate_der: WireBytes::try_from(der).map_err(|e| e.to_string())?,
            chain_der: BoundedVec::try_from(vec![
                WireBytes::try_from(hub.ca.cert_der().to_vec()).map_err(|e| e.to_string())?,
            ])
            .map_err(|e| e.to_string())?,
            hub_time: now,
        }))
    };
    match build() {
        Ok(m) => frame_response(StatusCode::OK, &m),
        Err(e) => internal(&e),
    }
}

async fn hello(State(hub): State<Arc<Hub>>, req: Request<Body>) -> Response {
    let peer = peer_of(&req);
    let (parts, body) = req.into_parts();
    let (id, _) = match device(&hub, &peer) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let Message::Hello(h) = (match read_frame(&parts.headers, body, MessageKind::Hello).await {
        Ok(m) => m,
        Err(resp) => return resp,
    }) else {
        return error_frame(ErrorCode::Malformed, "expected hello", None);
    };
    let version = h.max_version.min(VERSIONS.1);
    if version < h.min_version || version < VERSIONS.0 {
        return error_frame(
            ErrorCode::UnsupportedVersion,
            &format!(
                "this hub speaks protocol versions {}-{}",
                VERSIONS.0, VERSIONS.1
            ),
            None,
        );
    }
    let durable = match hub.db(|s| s.audit_head(&id)) {
        Ok(h) => h.seq,
        Err(e) => return state_failure(&e),
    };
    let welcome = Welcome {
        version,
        capabilities: Capabilities(1),
        hub_time: hub.now(),
        device_id: match DeviceId::new(id.as_str()) {
            Ok(d) => d,
            Err(e) => return internal(&e),
        },
        max_batch_bytes: hub.max_batch_bytes,
        audit_durable_through: durable,
    };
    hub.answer("hello", StatusCode::OK, &Message::Welcome(welcome))
}

async fn pull_route(State(hub): State<Arc<Hub>>, req: Request<Body>) -> Response {
    let peer = peer_of(&req);
    let (parts, body) = req.into_parts();
    let (id, team) = match device(&hub, &peer) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let (msg, version) = match read_frame_versioned(&parts.headers, body, MessageKind::Pull).await {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    let Message::Pull(p) = msg else {
        return error_frame(ErrorCode::Malformed, "expected pull", None);
    };
    let now = hub.now();
    let budget = p.max_bytes.min(hub.max_batch_bytes);
    let hub2 = hub.clone();
    let result = tokio::task::spawn_blocking(move || {
        let who = Puller {
            id: &id,
            team: team.as_deref(),
        };
        let req = PullRequest {
            cursor: p.cursor.as_ref(),
            max_bytes: budget,
            holding: p.holding,
            want: &p.want,
        };
        let frame = hub2.pull_frame(&who, &req, version, now);
        (id, frame)
    })
    .await;
    match result {
        Ok((_, Ok(bytes))) => {
            if hub.tampering() {
                // A test hook sees the answer as a message.
                return match sync_protocol::codec::decode(&bytes) {
                    Ok(msg) => hub.answer("pull", StatusCode::OK, &msg),
                    Err(e) => internal(&e),
                };
            }
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, FRAME_CONTENT_TYPE)],
                bytes.as_ref().clone(),
            )
                .into_response()
        }
        Ok((_, Err(PullError::CursorInvalid(why)))) => error_frame(
            ErrorCode::CursorInvalid,
            &format!("cursor invalid: {why}; pull with no cursor"),
            None,
        ),
        Ok((_, Err(e @ PullError::LeaseTooLarge { .. }))) => {
            error_frame(ErrorCode::TooLarge, &e.to_string(), None)
        }
        Ok((_, Err(PullError::State(e)))) => state_failure(&e),
        Err(e) => internal(&e),
    }
}

impl Hub {
    /// The encoded batch for a pull, in the version the pull was framed in (SPEC.md
    /// §5): from a shared snapshot when a device with the same leases asked the same at
    /// the same log head within `shared_snapshot_secs`, else built (once, however many
    /// ask at the same moment).
    fn pull_frame(
        &self,
        who: &Puller<'_>,
        req: &PullRequest<'_>,
        version: u16,
        now: Timestamp,
    ) -> Result<Arc<Vec<u8>>, PullError> {
        let build = || -> Result<Arc<Vec<u8>>, PullError> {
            let batch = pull(&self.state, who, req, now)?;
            self.batches_built
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                device = %who.id,
                objections = batch.objections.len(),
                leases = batch.leases.len(),
                upserts = batch.upserts.len(),
                removals = batch.removals.len(),
                offers = batch.offers.len(),
                wants_done = batch.wants_done,
                more = batch.more,
                "batch built"
            );
            encode_version(&Message::Batch(batch), Compression::Zstd, version)
                .map(Arc::new)
                .map_err(|e| PullError::State(StateError::Invalid(format!("encoding: {e}"))))
        };
        let Some(cache) = &self.shared else {
            return build();
        };
        let Some(key) = shared_key(&self.state, who, req, version, now, self.shared_secs)? else {
            return build();
        };
        let mut built = false;
        let frame = cache
            .try_get_with(key.0, || {
                built = true;
                build()
            })
            .map_err(|e| match &*e {
                PullError::CursorInvalid(why) => PullError::CursorInvalid(why),
                PullError::LeaseTooLarge { patients, needed } => PullError::LeaseTooLarge {
                    patients: *patients,
                    needed: *needed,
                },
                PullError::State(StateError::Busy(why)) => {
                    PullError::State(StateError::Busy(why.clone()))
                }
                PullError::State(s) => PullError::State(StateError::Invalid(s.to_string())),
            })?;
        if !built {
            self.shared_hits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(device = %who.id, "batch served from a shared snapshot");
        }
        Ok(frame)
    }
}

async fn lookup_route(State(hub): State<Arc<Hub>>, req: Request<Body>) -> Response {
    let peer = peer_of(&req);
    let (parts, body) = req.into_parts();
    let (id, team) = match device(&hub, &peer) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let (msg, version) = match read_frame_versioned(&parts.headers, body, MessageKind::Lookup).await
    {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    let Message::Lookup(l) = msg else {
        return error_frame(ErrorCode::Malformed, "expected lookup", None);
    };
    let now = hub.now();
    let hours = hub.lookup_hours;
    let hub2 = hub.clone();
    let device_id = id.clone();
    let result = tokio::task::spawn_blocking(move || {
        hub2.state.lookup(
            &device_id,
            team.as_deref(),
            l.nhs_number,
            l.lease.0,
            l.staff.as_str(),
            l.reason.as_str(),
            now,
            hours,
        )
    })
    .await;
    match result {
        Ok(Ok(Ok((lease, record)))) => {
            tracing::warn!(device = %id, lease = lease.id.0, "emergency lookup granted (flagged for review)");
            let granted = match sync_protocol::message::LookupGranted::try_from_parts(lease, record)
            {
                Ok(g) => g,
                Err(e) => return internal(&e),
            };
            match encode_version(
                &Message::LookupGranted(Box::new(granted)),
                Compression::Zstd,
                version,
            ) {
                Ok(bytes) => (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, FRAME_CONTENT_TYPE)],
                    bytes,
                )
                    .into_response(),
                Err(e) => internal(&e),
            }
        }
        Ok(Ok(Err(LookupRefusal::NotPermitted))) => {
            tracing::info!(device = %id, "lookup refused: not permitted");
            error_frame(
                ErrorCode::NotPermitted,
                "no active lease of this device allows this member of staff emergency access",
                None,
            )
        }
        Ok(Ok(Err(LookupRefusal::NotAvailable))) => {
            tracing::info!(device = %id, "lookup refused: not available");
            error_frame(
                ErrorCode::NotAvailable,
                "the shared care record cannot give this patient",
                None,
            )
        }
        Ok(Err(e)) => state_failure(&e),
        Err(e) => internal(&e),
    }
}

async fn admin_lookups(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Response {
    if let Err(r) = admin(&hub, &headers) {
        return r;
    }
    match hub.db(HubState::lookups) {
        Ok(rows) => axum::Json(serde_json::json!({ "lookups": rows, "flagged": rows.len() }))
            .into_response(),
        Err(e) => state_error(&e),
    }
}

async fn checkin_route(State(hub): State<Arc<Hub>>, req: Request<Body>) -> Response {
    let peer = peer_of(&req);
    let (parts, body) = req.into_parts();
    // A revoked device's last checkin confirms its wipe.
    let (id, _, revoked) = match enrolled_device(&hub, &peer) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let msg = match read_frame(&parts.headers, body, MessageKind::Checkin).await {
        Ok(m) => m,
        Err(resp) => return resp,
    };
    let Message::Checkin(c) = msg else {
        return error_frame(ErrorCode::Malformed, "expected checkin", None);
    };
    let now = hub.now();
    let hub2 = hub.clone();
    let device_id = id.clone();
    let health = c.health.clone();
    let anchor = c.anchor.clone();
    let stored = tokio::task::spawn_blocking(move || {
        hub2.state
            .record_checkin(&device_id, revoked, &health, anchor.as_ref(), now)
    })
    .await;
    match stored {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return state_failure(&e),
        Err(e) => return internal(&e),
    }
    if revoked && c.health.wiping {
        tracing::warn!(device = %id, audit_unsent = c.health.audit_backlog, "revoked device confirmed its wipe");
    } else if revoked {
        return error_frame(
            ErrorCode::DeviceRevoked,
            "this device has been revoked: wipe local data",
            None,
        );
    }
    let trust: Vec<WireBytes<{ sync_protocol::message::MAX_DER }>> = hub
        .ca
        .trust_der()
        .iter()
        .take(4)
        .filter_map(|c| WireBytes::try_from(c.to_vec()).ok())
        .collect();
    let Ok(trust) = BoundedVec::try_from(trust) else {
        return internal(&"the CA certificates do not fit a checkin answer");
    };
    let answer = Message::CheckinAnswer(sync_protocol::message::CheckinAnswer {
        nonce: c.nonce,
        hub_time: now,
        trust,
    });
    hub.answer("checkin", StatusCode::OK, &answer)
}

async fn renew_route(State(hub): State<Arc<Hub>>, req: Request<Body>) -> Response {
    let peer = peer_of(&req);
    let (parts, body) = req.into_parts();
    let (id, _) = match device(&hub, &peer) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let Message::Renew(r) = (match read_frame(&parts.headers, body, MessageKind::Renew).await {
        Ok(m) => m,
        Err(resp) => return resp,
    }) else {
        return error_frame(ErrorCode::Malformed, "expected renew", None);
    };
    let der = match hub.ca.issue(r.csr_der.as_slice(), &id) {
        Ok(der) => der,
        Err(e) => {
            return error_frame(
                ErrorCode::Malformed,
                &format!("certificate request refused: {e}"),
                None,
            );
        }
    };
    let hub2 = hub.clone();
    let (device_id, cert) = (id.clone(), der.clone());
    match tokio::task::spawn_blocking(move || hub2.state.renew_certificate(&device_id, &cert)).await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return state_failure(&e),
        Err(e) => return internal(&e),
    }
    let (Ok(device_id), Ok(certificate_der)) =
        (DeviceId::new(id.clone()), WireBytes::try_from(der))
    else {
        return internal(&"the renewed certificate does not fit the answer");
    };
    tracing::info!(device = %id, "device certificate renewed");
    hub.answer(
        "renew",
        StatusCode::OK,
        &Message::Renewed(sync_protocol::message::Renewed {
            device_id,
            certificate_der,
        }),
    )
}

async fn admin_fleet(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Response {
    if let Err(r) = admin(&hub, &headers) {
        return r;
    }
    let now = hub.now();
    match hub.db(|s| s.fleet(now, &hub.fleet)) {
        Ok(devices) => {
            let attention = devices.iter().filter(|d| !d.attention.is_empty()).count();
            axum::Json(serde_json::json!({ "devices": devices, "attention": attention }))
                .into_response()
        }
        Err(e) => state_error(&e),
    }
}

async fn admin_fleet_metrics(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Response {
    if let Err(r) = admin(&hub, &headers) {
        return r;
    }
    let now = hub.now();
    match hub.db(|s| s.fleet(now, &hub.fleet)) {
        Ok(devices) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            crate::fleet::metrics_text(&devices, now),
        )
            .into_response(),
        Err(e) => state_error(&e),
    }
}

async fn audit_route(State(hub): State<Arc<Hub>>, req: Request<Body>) -> Response {
    let peer = peer_of(&req);
    let (parts, body) = req.into_parts();
    // A revoked device uploads what it holds before it wipes.
    let (id, _, _) = match enrolled_device(&hub, &peer) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let Message::PushAudit(push) =
        (match read_frame(&parts.headers, body, MessageKind::PushAudit).await {
            Ok(m) => m,
            Err(resp) => return resp,
        })
    else {
        return error_frame(ErrorCode::Malformed, "expected push-audit", None);
    };
    let hub2 = hub.clone();
    let n = push.entries.len();
    let result = tokio::task::spawn_blocking(move || {
        let r = hub2.state.push_audit(&id, &push);
        (id, r)
    })
    .await;
    match result {
        Ok((id, Ok(pushed))) => {
            hub.audit_stored
                .fetch_add(pushed.stored, std::sync::atomic::Ordering::Relaxed);
            hub.audit_repeated
                .fetch_add(pushed.repeated, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(
                device = %id,
                entries = n,
                stored = pushed.stored,
                repeated = pushed.repeated,
                durable = pushed.durable,
                "audit stored"
            );
            hub.answer(
                "audit",
                StatusCode::OK,
                &Message::AuditAck(AuditAck {
                    durable_through: pushed.durable,
                }),
            )
        }
        Ok((_, Err(e @ AuditError::Gap { .. }))) => {
            error_frame(ErrorCode::AuditGap, &e.to_string(), None)
        }
        Ok((_, Err(e @ AuditError::ChainBroken { .. }))) => {
            error_frame(ErrorCode::AuditChainBroken, &e.to_string(), None)
        }
        Ok((_, Err(e @ AuditError::Malformed { .. }))) => {
            error_frame(ErrorCode::Malformed, &e.to_string(), None)
        }
        Ok((_, Err(AuditError::State(e)))) => state_failure(&e),
        Err(e) => internal(&e),
    }
}

// ---- admin API -----------------------------------------------------------------------

/// Failed admin logins (a token refused, 401) allowed from one address before its admin
/// requests are refused for [`ADMIN_LOCKOUT`] after the last failure.
pub const ADMIN_FAILURES_ALLOWED: u32 = 10;
/// How long an address that failed too often is refused.
pub const ADMIN_LOCKOUT: Duration = Duration::from_secs(15 * 60);

/// Every admin route: an address with too many failed logins is refused (429) before
/// its token is looked at; each refused token is counted and logged with the address.
async fn admin_throttle(
    State(hub): State<Arc<Hub>>,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let ip = peer_of(&req).addr.ip();
    let failures = hub.admin_failures.get(&ip).unwrap_or(0);
    if failures >= ADMIN_FAILURES_ALLOWED {
        tracing::warn!(addr = %ip, failures, "admin request refused: too many failed logins");
        let mut r = json_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed admin logins from this address; try again later",
        );
        if let Ok(v) = HeaderValue::from_str(&ADMIN_LOCKOUT.as_secs().to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    if resp.status() == StatusCode::UNAUTHORIZED {
        let failures = hub
            .admin_failures
            .entry(ip)
            .and_upsert_with(|n| n.map_or(1, |n| n.into_value().saturating_add(1)))
            .into_value();
        tracing::warn!(addr = %ip, path, failures, "admin login failed: token refused");
    }
    resp
}

/// Every protocol request, counted by route and status for `/metrics`.
async fn count_requests(
    State(hub): State<Arc<Hub>>,
    req: Request<Body>,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .uri()
        .path()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let resp = next.run(req).await;
    hub.counters
        .requests
        .get_or_create(&vec![
            ("route".into(), route),
            ("status".into(), resp.status().as_u16().to_string()),
        ])
        .inc();
    resp
}

/// `GET /metrics`: Prometheus (OpenMetrics) text — the change log, ingest, devices by
/// last contact, protocol requests by route and status, flagged devices, audit and the
/// database pool, with the fleet's per-device series. The metrics token or the admin
/// token; ids and counts only, never patient data.
async fn metrics_route(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Response {
    let scraper = hub
        .metrics_token_sha256
        .is_some_and(|d| bearer_is(&headers, &d));
    if !scraper && let Err(r) = admin(&hub, &headers) {
        return r;
    }
    let hub2 = hub.clone();
    match tokio::task::spawn_blocking(move || metrics_text(&hub2)).await {
        Ok(Ok(text)) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Ok(Err(e)) => state_error(&e),
        Err(e) => internal(&e),
    }
}

/// The hub's metrics as OpenMetrics text.
fn metrics_text(hub: &Hub) -> Result<String, StateError> {
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
    use prometheus_client::registry::Registry;
    use std::sync::atomic::Ordering::Relaxed;

    let now = hub.now();
    let state = &hub.state;
    let fleet = state.fleet(now, &hub.fleet)?;
    let mut registry = Registry::with_prefix("carecache_hub");
    crate::fleet::register_fleet(&mut registry, &fleet, now);

    let gauge = |v: u64| ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    let counter = |v: u64| ConstCounter::new(v);
    registry.register(
        "change_log_head",
        "Sequence number of the latest change",
        gauge(state.head()?),
    );
    let (patients, objections, leases) = state.counts()?;
    registry.register("patients", "Patients held", gauge(patients));
    registry.register(
        "objections",
        "Patients with an objection recorded",
        gauge(objections),
    );
    registry.register("leases", "Leases held (any state)", gauge(leases));
    registry.register(
        "flagged_devices",
        "Devices whose audit chain broke, waiting for a privacy officer",
        gauge(state.flagged_devices()?.len() as u64),
    );

    // Devices in service by how long since their last checkin.
    let contact = Family::<Labels, Gauge>::default();
    let buckets: [(&str, Option<u64>); 4] = [
        ("1h", Some(3_600_000)),
        ("24h", Some(86_400_000)),
        ("7d", Some(7 * 86_400_000)),
        ("older", None),
    ];
    for (name, _) in buckets.iter().chain([("never", None)].iter()) {
        contact
            .get_or_create(&vec![("within".into(), (*name).into())])
            .set(0);
    }
    for d in fleet.iter().filter(|d| !d.revoked) {
        let bucket = match d.last_checkin_ms {
            None => "never",
            Some(at) => {
                let age = now.as_millis().saturating_sub(at);
                buckets
                    .iter()
                    .find(|(_, limit)| limit.is_none_or(|l| age <= l))
                    .map_or("older", |(n, _)| n)
            }
        };
        contact
            .get_or_create(&vec![("within".into(), bucket.into())])
            .inc();
    }
    registry.register(
        "devices_by_last_contact",
        "Devices in service by time since their last checkin (1h, 24h, 7d, older, never)",
        contact,
    );

    // The last ingest: when it finished (wall clock), how old it is, what it changed.
    if let Some(last) = state
        .source_value("last_ingest")?
        .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v).ok())
    {
        if let Some(at) = last
            .pointer("/finished_at_ms")
            .and_then(serde_json::Value::as_u64)
        {
            let wall = system_clock().as_millis();
            registry.register(
                "ingest_last_success_timestamp_seconds",
                "When the last ingest finished (Unix time)",
                gauge(at / 1000),
            );
            registry.register(
                "ingest_age_seconds",
                "Seconds since the last ingest finished (the source's lag, at most)",
                gauge(wall.saturating_sub(at) / 1000),
            );
        }
        let changes = Family::<Labels, Gauge>::default();
        for kind in ["added", "changed", "unchanged", "deleted", "objections"] {
            let n = last
                .pointer(&format!("/stored/{kind}"))
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0);
            changes
                .get_or_create(&vec![("kind".into(), kind.into())])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        changes
            .get_or_create(&vec![("kind".into(), "unreadable".into())])
            .set(
                last.pointer("/issues_total")
                    .and_then(serde_json::Value::as_u64)
                    .map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)),
            );
        registry.register(
            "ingest_last_patients",
            "What the last ingest did, by kind (unreadable: resources that could not be read)",
            changes,
        );
    }
    registry.register(
        "ingest_runs",
        "Source reads by this instance since start, by outcome",
        hub.counters.ingests.clone(),
    );
    registry.register(
        "requests",
        "Protocol requests to this instance since start, by route and HTTP status",
        hub.counters.requests.clone(),
    );
    registry.register(
        "audit_entries_stored",
        "Audit entries stored by this instance since start",
        counter(hub.audit_stored.load(Relaxed)),
    );
    registry.register(
        "audit_entries_repeated",
        "Audit entries received again and acknowledged without storing, since start",
        counter(hub.audit_repeated.load(Relaxed)),
    );
    registry.register(
        "pull_batches_built",
        "Pull batches built since start",
        counter(hub.batches_built.load(Relaxed)),
    );
    registry.register(
        "pull_shared_hits",
        "Pulls answered from a shared batch since start",
        counter(hub.shared_hits.load(Relaxed)),
    );
    if hub.counters.forwarding.load(Relaxed) {
        registry.register(
            "audit_forward_pending",
            "Stored audit entries not yet accepted by the upstream audit store",
            gauge(state.forward_pending()?),
        );
        registry.register(
            "audit_forward_passes",
            "Audit forwarding passes by this instance since start, by outcome (busy: another instance was forwarding)",
            hub.counters.forward_passes.clone(),
        );
        registry.register(
            "audit_forwarded",
            "Audit entries this instance forwarded that the audit store accepted, since start",
            hub.counters.forwarded.clone(),
        );
    }
    if let Some((size, idle)) = state.pool() {
        let pool = Family::<Labels, Gauge>::default();
        pool.get_or_create(&vec![("state".into(), "idle".into())])
            .set(i64::from(idle));
        pool.get_or_create(&vec![("state".into(), "busy".into())])
            .set(i64::from(size.saturating_sub(idle)));
        registry.register(
            "database_connections",
            "This instance's PostgreSQL connections by state",
            pool,
        );
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .map_err(|e| StateError::Database(format!("encoding metrics: {e}")))?;
    Ok(out)
}

fn admin(hub: &Hub, headers: &HeaderMap) -> Result<(), Response> {
    if !bearer_is(headers, &hub.admin_token_sha256) {
        return Err(json_error(StatusCode::UNAUTHORIZED, "admin token required"));
    }
    Ok(())
}

/// Whether the request's bearer token is the one whose SHA-256 is `digest`. Comparing
/// digests: equal-length, and a timing difference reveals nothing about the token itself.
fn bearer_is(headers: &HeaderMap, digest: &[u8; 32]) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let hash: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    !presented.is_empty() && hash == *digest
}

fn json_error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

fn state_error(e: &StateError) -> Response {
    match e {
        StateError::NotFound(_) => json_error(StatusCode::NOT_FOUND, &e.to_string()),
        StateError::Busy(_) => {
            let mut r = json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the hub is busy; retry shortly",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
            r
        }
        StateError::Invalid(_) => json_error(StatusCode::UNPROCESSABLE_ENTITY, &e.to_string()),
        _ => {
            tracing::error!(error = %e, "admin request failed");
            json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, Response> {
    serde_json::from_slice(body)
        .map_err(|e| json_error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")))
}

async fn admin_status(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Response {
    if let Err(r) = admin(&hub, &headers) {
        return r;
    }
    let status = || -> Result<serde_json::Value, StateError> {
        let (patients, objections, leases) = hub.state.counts()?;
        Ok(serde_json::json!({
            "head": hub.state.head()?,
            "patients": patients,
            "objections": objections,
            "leases": leases,
            "devices": hub.state.devices()?.len(),
            "audit_stored_since_start": hub.audit_stored.load(std::sync::atomic::Ordering::Relaxed),
            "audit_repeats_since_start": hub.audit_repeated.load(std::sync::atomic::Ordering::Relaxed),
            "flagged_devices": hub.state.flagged_devices()?
                .into_iter()
                .map(|(d, at)| serde_json::json!({ "device": d, "broken_at": at }))
                .collect::<Vec<_>>(),
            "last_ingest": hub.state.source_value("last_ingest")?
                .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v).ok()),
        }))
    };
    match hub.db(|_| status()) {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => state_error(&e),
    }
}

async fn admin_leases(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Response {
    if let Err(r) = admin(&hub, &headers) {
        return r;
    }
    match hub.db(HubState::lease_summaries) {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => state_error(&e),
    }
}

async fn admin_grant(State(hub): State<Arc<Hub>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = admin(&hub, &headers) {
        return r;
    }
    let spec: LeaseSpec = match parse_json(&body) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match hub.db(|s| s.put_lease(&spec, None)) {
        Ok(id) => {
            tracing::info!(lease = id, patients = spec.patients.len(), "lease granted");
            (
                StatusCode::CREATED,
                axum::Json(serde_json::json!({ "id": id })),
            )
                .into_response()
        }
        Err(e) => state_error(&e),
    }
}

async fn admin_change(
    State(hub): State<Arc<Hub>>,
    UrlPath(id): UrlPath<u64>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = admin(&hub, &headers) {
        return r;
    }
    let spec: LeaseSpec = match parse_json(&body) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match hub.db(|s| s.put_lease(&spec, Some(id))) {
        Ok(id) => {
            tracing::info!(lease = id, "lease changed");
            axum::Json(serde_json::json!({ "id": id })).into_response()
        }
        Err(e) => state_error(&e),
    }
}

async fn admin_revoke(
    State(hub): State<Arc<Hub>>,
    UrlPath(id): UrlPath<u64>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = admin(&hub, &headers) {
        return r;
    }
    match hub.db(|s| s.end_lease(id, sync_protocol::message::LeaseEndReason::Revoked)) {
        Ok(()) => {
            tracing::info!(lease = id, "lease revoked");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => state_error(&e),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    #[serde(default)]
    team: Option<String>,
    #[serde(default = "default_token_ttl")]
    ttl_secs: u64,
}

fn default_token_ttl() -> u64 {
    86_400
}

async fn admin_token(State(hub): State<Arc<Hub>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = admin(&hub, &headers) {
        return r;
    }
    let r: TokenRequest = match parse_json(&body) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match hub.db(|s| s.issue_token(r.team, hub.now(), r.ttl_secs)) {
        Ok(token) => (
            StatusCode::CREATED,
            axum::Json(serde_json::json!({ "token": token, "ttl_secs": r.ttl_secs })),
        )
            .into_response(),
        Err(e) => state_error(&e),
    }
}

async fn admin_devices(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Response {
    if let Err(r) = admin(&hub, &headers) {
        return r;
    }
    match hub.db(HubState::devices) {
        Ok(d) => axum::Json(
            d.into_iter()
                .map(|(id, r)| {
                    serde_json::json!({
                        "id": id, "label": r.label, "team": r.team,
                        "enrolled_at": r.enrolled_at, "revoked": r.revoked,
                    })
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => state_error(&e),
    }
}

async fn admin_renewal_token(
    State(hub): State<Arc<Hub>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = admin(&hub, &headers) {
        return r;
    }
    let ttl = 86_400;
    match hub.db(|s| s.issue_renewal_token(&id, hub.now(), ttl)) {
        Ok(token) => {
            tracing::info!(device = %id, "renewal token issued");
            (
                StatusCode::CREATED,
                axum::Json(serde_json::json!({ "token": token, "ttl_secs": ttl })),
            )
                .into_response()
        }
        Err(e) => state_error(&e),
    }
}

async fn admin_revoke_device(
    State(hub): State<Arc<Hub>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = admin(&hub, &headers) {
        return r;
    }
    match hub.db(|s| s.revoke_device(&id)) {
        Ok(()) => {
            tracing::info!(device = %id, "device revoked");
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => state_error(&e),
    }
}

/// The privacy officer's token, or the answer refusing the request: 403 when none is
/// configured (the admin token never stands in for it), 401 when another is presented.
fn privacy_officer(hub: &Hub, headers: &HeaderMap, what: &str) -> Result<(), Response> {
    let Some(expected) = hub.privacy_token_sha256 else {
        return Err(json_error(
            StatusCode::FORBIDDEN,
            &format!(
                "no privacy officer token is configured (privacy_officer_token_file or CARECACHE_HUB_PRIVACY_TOKEN); the admin token does not {what}"
            ),
        ));
    };
    if !bearer_is(headers, &expected) {
        return Err(json_error(
            StatusCode::UNAUTHORIZED,
            &format!("the privacy officer's token is required to {what}"),
        ));
    }
    Ok(())
}

/// Header naming the privacy officer on an audit view.
pub const OFFICER_HEADER: &str = "x-carecache-officer";

/// The officer making an audit view: the privacy officer's token and a name in
/// [`OFFICER_HEADER`] (kept in the officers' log with the address).
fn viewing_officer(
    hub: &Hub,
    headers: &HeaderMap,
    peer: &Peer,
) -> Result<crate::officer::Officer, Response> {
    privacy_officer(hub, headers, "read the audit trail")?;
    let name = headers
        .get(OFFICER_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    crate::officer::Officer::new(name, &peer.addr.ip().to_string()).map_err(|_| {
        json_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "name who is reading in the {OFFICER_HEADER} header (1–128 printable characters)"
            ),
        )
    })
}

/// A clearance's body: who and why.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Clear {
    officer: String,
    reason: String,
}

/// The officer and reason of a clearance, or the answer refusing it.
fn clearance(
    hub: &Hub,
    headers: &HeaderMap,
    peer: &Peer,
    body: &Bytes,
    what: &str,
) -> Result<(crate::officer::Officer, String), Response> {
    privacy_officer(hub, headers, what)?;
    let Ok(clear) = serde_json::from_slice::<Clear>(body) else {
        return Err(json_error(
            StatusCode::BAD_REQUEST,
            "expected {\"officer\": \"…\", \"reason\": \"…\"}",
        ));
    };
    let officer = crate::officer::Officer::new(&clear.officer, &peer.addr.ip().to_string())
        .map_err(|e| state_error(&e))?;
    crate::officer::reason(&clear.reason).map_err(|e| state_error(&e))?;
    Ok((officer, clear.reason))
}

/// `POST /admin/v1/devices/{id}/clear-restored` with the privacy officer's token and
/// `{"officer": "…", "reason": "…"}`: the restored copies the device reported were looked
/// into (a genuine restore from backup, say); the device leaves the attention list. Kept
/// with the device in the fleet view and in the officers' log, with who and why.
async fn admin_clear_restored(
    State(hub): State<Arc<Hub>>,
    UrlPath(id): UrlPath<String>,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (officer, reason) = match clearance(&hub, &headers, &peer, &body, "clear a restored copy") {
        Ok(c) => c,
        Err(r) => return r,
    };
    let now = hub.now();
    match hub.db(|s| s.clear_restored(&id, &officer, &reason, now)) {
        Ok(n) => {
            tracing::warn!(device = %id, cleared = n, "restored copy cleared by the privacy officer");
            axum::Json(serde_json::json!({ "cleared": n })).into_response()
        }
        Err(e) => state_error(&e),
    }
}

/// `POST /admin/v1/devices/{id}/clear-audit-flag` with the privacy officer's token and
/// `{"officer": "…", "reason": "…"}`: the break in the device's audit chain was looked
/// into; the device's next entries are accepted again, the chain rejoined where they
/// start. Logged with who and why.
async fn admin_clear_audit_flag(
    State(hub): State<Arc<Hub>>,
    UrlPath(id): UrlPath<String>,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (officer, reason) =
        match clearance(&hub, &headers, &peer, &body, "clear a device's audit flag") {
            Ok(c) => c,
            Err(r) => return r,
        };
    let now = hub.now();
    match hub.db(|s| s.clear_audit_flag(&id, &officer, &reason, now)) {
        Ok(at) => axum::Json(serde_json::json!({ "device": id, "broken_at": at })).into_response(),
        Err(e) => state_error(&e),
    }
}

/// An audit entry for the admin API: where it came from, a line of text and the
/// FHIR AuditEvent.
fn entry_json(e: &crate::audit::StoredEntry) -> serde_json::Value {
    serde_json::json!({
        "device": e.device,
        "seq": e.seq,
        "at": e.record.at.rfc3339(),
        "text": crate::export::describe(e),
        "event": crate::export::audit_event(e),
    })
}

/// Runs a privacy officer's view off the async workers.
async fn officer_view<T: Send + 'static>(
    hub: &Arc<Hub>,
    f: impl FnOnce(&HubState, Timestamp) -> Result<T, StateError> + Send + 'static,
) -> Result<T, Response> {
    let hub = hub.clone();
    match tokio::task::spawn_blocking(move || f(&hub.state, hub.now())).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(state_error(&e)),
        Err(e) => Err(internal(&e)),
    }
}

/// `GET /admin/v1/audit/review`: devices whose audit chain broke, and every emergency
/// (ETREAT) access with the clinician's reason.
async fn admin_audit_review(
    State(hub): State<Arc<Hub>>,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    let officer = match viewing_officer(&hub, &headers, &peer) {
        Ok(o) => o,
        Err(r) => return r,
    };
    match officer_view(&hub, move |s, now| s.review(&officer, now)).await {
        Ok(r) => axum::Json(serde_json::json!({
            "flagged": r.flagged.iter()
                .map(|(d, at)| serde_json::json!({ "device": d, "broken_at": at }))
                .collect::<Vec<_>>(),
            "emergency": r.emergency.iter().map(entry_json).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(r) => r,
    }
}

/// `GET /admin/v1/audit/patients/{nhs}`: every access to one patient's record, on every
/// device, oldest first (a complaint, a subject access request).
async fn admin_audit_patient(
    State(hub): State<Arc<Hub>>,
    UrlPath(nhs): UrlPath<String>,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    let officer = match viewing_officer(&hub, &headers, &peer) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let Ok(nhs) = sync_protocol::NhsNumber::parse(&nhs) else {
        return json_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not a valid NHS number (10 digits, Modulus 11 check)",
        );
    };
    match officer_view(&hub, move |s, now| s.patient_history(&officer, nhs, now)).await {
        Ok(found) => {
            let devices: std::collections::BTreeSet<&str> =
                found.iter().map(|e| e.device.as_str()).collect();
            axum::Json(serde_json::json!({
                "accesses": found.iter().map(entry_json).collect::<Vec<_>>(),
                "devices": devices.len(),
            }))
            .into_response()
        }
        Err(r) => r,
    }
}

/// `GET /admin/v1/audit/export`: every stored entry as FHIR AuditEvent NDJSON, streamed
/// as it is read.
async fn admin_audit_export(
    State(hub): State<Arc<Hub>>,
    axum::Extension(peer): axum::Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    let officer = match viewing_officer(&hub, &headers, &peer) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let hub2 = hub.clone();
    tokio::task::spawn_blocking(move || {
        let mut chunk = Vec::with_capacity(64 * 1024);
        let now = hub2.now();
        let sent = hub2.state.export_audit(&officer, now, |e| {
            serde_json::to_writer(&mut chunk, &crate::export::audit_event(&e))?;
            chunk.push(b'\n');
            if chunk.len() >= 64 * 1024 {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(64 * 1024));
                tx.blocking_send(Ok(Bytes::from(full)))
                    .map_err(|_| std::io::Error::other("the reader went away"))?;
            }
            Ok(())
        });
        match sent {
            Ok(n) => {
                if !chunk.is_empty() {
                    let _ = tx.blocking_send(Ok(Bytes::from(chunk)));
                }
                tracing::info!(entries = n, "audit exported");
            }
            Err(e) => {
                tracing::error!(error = %e, "audit export ended early");
                // The body ends with an error: the reader sees a broken transfer, not a
                // short file that looks whole.
                let _ = tx.blocking_send(Err(std::io::Error::other("export failed")));
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/fhir+ndjson")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// `GET /admin/v1/audit/officer-log`: what privacy officers did through the hub
/// (views and clearances), oldest first. The privacy officer's token or the admin token.
async fn admin_officer_log(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Response {
    let privacy = hub
        .privacy_token_sha256
        .is_some_and(|d| bearer_is(&headers, &d));
    if !privacy && let Err(r) = admin(&hub, &headers) {
        return r;
    }
    match officer_view(&hub, |s, _| s.officer_log()).await {
        Ok(log) => axum::Json(serde_json::json!({
            "entries": log.iter().map(|(seq, l)| l.to_json(*seq)).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(r) => r,
    }
}

async fn admin_ingest(State(hub): State<Arc<Hub>>, headers: HeaderMap) -> Response {
    if let Err(r) = admin(&hub, &headers) {
        return r;
    }
    let hub2 = hub.clone();
    match tokio::task::spawn_blocking(move || hub2.run_ingest()).await {
        Ok(None) => json_error(StatusCode::CONFLICT, "no source configured"),
        Ok(Some(Ok(report))) => axum::Json(report).into_response(),
        Ok(Some(Err(e))) => json_error(StatusCode::BAD_GATEWAY, &e),
        Err(e) => internal(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every database connection busy (or the database not answering) is an answer to
    /// wait and retry — `Unavailable` with a retry time to a device, 503 with
    /// `Retry-After` to an operator — not an internal error; other failures stay internal.
    #[test]
    fn a_busy_database_is_an_answer_to_retry() {
        let busy = StateError::Busy("postgres pool: timed out waiting for connection".into());
        let r = state_failure(&busy);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let r = state_failure(&StateError::Database("disk".into()));
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let r = state_error(&busy);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }

    #[tokio::test]
    async fn the_busy_answer_tells_a_device_when_to_retry() {
        let r = state_failure(&StateError::Busy("pool".into()));
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        let Message::Error(e) = decode_with_limit(&body, MessageKind::Error.max_payload()).unwrap()
        else {
            panic!("not an error frame")
        };
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert_eq!(e.retry_after_secs, Some(2));
    }
}
