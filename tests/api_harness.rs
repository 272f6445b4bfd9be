//! A synced device serving its local API on a loopback port (real tokio server, real
//! HTTP), and a small blocking HTTP client for the tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use carecache::api::{Api, Listener};
use carecache::device::Device;
use serde_json::Value;
use sync_protocol::audit::{AuditEntry, AuditRecord};

use crate::device_harness::{Dev, TestHub, grant};
use sync_protocol::NhsNumber;

pub(crate) struct Served {
    pub(crate) device: Arc<Device>,
    pub(crate) addr: SocketAddr,
    pub(crate) clock: Arc<carecache::clock::ManualClock>,
    pub(crate) token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub(crate) config_path: std::path::PathBuf,
    root: carecache::crypto::RootKey,
    _tmp: tempfile::TempDir,
}

impl Served {
    /// Serves `dev` (already enrolled and synced) with one registered client `epcr`.
    pub(crate) fn start(dev: Dev) -> Self {
        Self::start_with(dev, Vec::new())
    }

    /// As [`Served::start`], also listening on the given extra listeners' paths.
    pub(crate) fn start_with(dev: Dev, sockets: Vec<std::path::PathBuf>) -> Self {
        let Dev {
            tmp,
            clock,
            device,
            config_path,
            root,
        } = dev;
        let token = device.add_client("epcr").unwrap().expose().to_owned();
        Self::serve(device, clock, token, config_path, root, tmp, sockets)
    }

    /// Stops the server and the device and starts both again from the same data
    /// directory (a daemon restart), keeping the clock and the client token.
    pub(crate) fn restart(mut self) -> Self {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let Self {
            clock,
            token,
            config_path,
            root,
            ..
        } = &self;
        let (clock, token, config_path, root) = (
            clock.clone(),
            token.clone(),
            config_path.clone(),
            root.clone(),
        );
        // Take the directory out of `self`; dropping the rest closes the store.
        let tmp = std::mem::replace(&mut self._tmp, tempfile::tempdir().unwrap());
        drop(self);
        let config = carecache::config::Config::load(&config_path).unwrap();
        let device = Device::open(config, &root, clock.clone()).unwrap();
        Self::serve(device, clock, token, config_path, root, tmp, Vec::new())
    }

    fn serve(
        device: Device,
        clock: Arc<carecache::clock::ManualClock>,
        token: String,
        config_path: std::path::PathBuf,
        root: carecache::crypto::RootKey,
        tmp: tempfile::TempDir,
        sockets: Vec<std::path::PathBuf>,
    ) -> Self {
        let device = Arc::new(device);
        let api = Api::new(&device);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let tcp = carecache::api::bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
                let addr = tcp.local_addr().unwrap();
                let mut listeners = vec![Listener::Tcp(tcp)];
                for p in sockets {
                    listeners.push(Listener::bind_unix(&p).unwrap());
                }
                addr_tx.send(addr).unwrap();
                carecache::api::serve(api, listeners, async move {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        Self {
            device,
            addr,
            clock,
            token,
            stop: Some(stop_tx),
            thread: Some(thread),
            config_path,
            root,
            _tmp: tmp,
        }
    }

    /// GET `path` as user `n1` for TREAT with the client token.
    pub(crate) fn get(&self, path: &str) -> Resp {
        self.get_as(path, &self.treat())
    }

    pub(crate) fn treat(&self) -> Vec<(String, String)> {
        vec![
            ("Authorization".into(), format!("Bearer {}", self.token)),
            ("X-Carecache-User".into(), "n1".into()),
            ("X-Carecache-Purpose".into(), "TREAT".into()),
        ]
    }

    pub(crate) fn get_as(&self, path: &str, headers: &[(String, String)]) -> Resp {
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        raw(self.addr, req.as_bytes())
    }

    /// Every audit entry on the device, checked to chain from the start.
    pub(crate) fn audit(&self) -> Vec<(AuditEntry, AuditRecord)> {
        audit_of(self.device.store())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every audit entry `store` still holds; panics unless they chain, with no gap, from
/// the last entry the hub acknowledged (the zero hash before any) to the stored head.
pub(crate) fn audit_of(store: &carecache::store::Store) -> Vec<(AuditEntry, AuditRecord)> {
    let acked = store.audit_acked().unwrap();
    let entries = store.audit_entries(0, usize::MAX).unwrap();
    let head = sync_protocol::audit::verify_chain(&acked.hash, &entries);
    assert!(head.is_ok(), "audit chain broken at {:?}", head.err());
    assert_eq!(head.unwrap(), store.audit_head().unwrap().hash);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, acked.seq + i as u64 + 1, "no gaps");
    }
    entries
        .into_iter()
        .map(|e| {
            let r = AuditRecord::decode(e.record.as_slice()).unwrap();
            (e, r)
        })
        .collect()
}

/// An HTTP answer.
#[derive(Debug)]
pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Resp {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub(crate) fn request_id(&self) -> u64 {
        self.header("x-request-id").unwrap().parse().unwrap()
    }
}

/// Sends raw request bytes on a new connection and reads the whole answer (the request
/// asks for `Connection: close`).
pub(crate) fn raw(addr: SocketAddr, request: &[u8]) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse(&buf)
}

/// As [`raw`], but `None` if the connection fails or the answer is cut (a killed server).
pub(crate) fn try_raw(addr: SocketAddr, request: &[u8]) -> Option<Resp> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    s.write_all(request).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let r = parse(&buf);
    let len: usize = r.header("content-length").and_then(|v| v.parse().ok())?;
    (buf.len() - split - 4 == len).then_some(r)
}

pub(crate) fn parse(buf: &[u8]) -> Resp {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect::<Vec<_>>();
    let mut body = buf[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

/// Validates FHIR resources with the real validator (`fhir.resources`): one NDJSON file
/// per resource type in `dir`; panics with the validator's words on any error.
pub(crate) fn validate_fhir(dir: &std::path::Path, resources: &[Value]) {
    use std::collections::BTreeMap;
    let mut by_type: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in resources {
        let t = r["resourceType"].as_str().unwrap().to_owned();
        by_type.entry(t).or_default().push(r.to_string());
    }
    let mut files = Vec::new();
    for (t, lines) in by_type {
        let p = dir.join(format!("{t}.ndjson"));
        std::fs::write(&p, lines.join("\n")).unwrap();
        files.push(p);
    }
    let (ok, text) = carecache_synth::fhir::validate(&files);
    assert!(ok, "FHIR validation failed: {text}");
}

/// A hub of `n` patients from `seed`, a device enrolled and granted every shareable one
/// (lease JSON overridden by `lease`), synced and serving.
pub(crate) fn served(n: usize, seed: u64, lease: Value) -> (TestHub, Served, Vec<NhsNumber>) {
    let hub = TestHub::start(n, seed);
    let dev = Dev::enrolled(&hub);
    let patients: Vec<NhsNumber> = hub
        .patients
        .iter()
        .filter(|p| p.shareable())
        .map(|p| p.nhs_number())
        .collect();
    grant(&hub, &dev.id(), &patients, lease);
    dev.sync().unwrap();
    (hub, Served::start(dev), patients)
}
