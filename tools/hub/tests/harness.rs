//! A real hub on loopback TLS with a development CA and synthetic NDJSON, and a test
//! device that speaks the sync protocol over HTTPS with its enrolled certificate.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use carecache_hub::config::Limits;
use carecache_hub::pki::make_csr;
use carecache_hub::server::FRAME_CONTENT_TYPE;
use sync_protocol::message::{Batch, EnrolRequest, Hello, Message, MessageKind, Pull};
use sync_protocol::types::{Bytes, Capabilities, Cursor, EnrolmentToken, Text, Timestamp};
use sync_protocol::{Compression, decode_with_limit, encode};

pub use carecache_hub::testing::T0;

/// The shared test hub (`carecache_hub::testing`) with seed 11, plus the helpers these
/// tests use to speak the protocol by hand.
pub struct TestHub(carecache_hub::testing::TestHub);

impl std::ops::Deref for TestHub {
    type Target = carecache_hub::testing::TestHub;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl TestHub {
    /// A hub over `n` synthetic patients (seed 11), serving on 127.0.0.1:0.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, Limits::default())
    }

    pub fn start_with(n: usize, limits: Limits) -> Self {
        Self(carecache_hub::testing::TestHub::start_with(n, 11, &limits))
    }

    /// A hub over `n` synthetic patients (seed 11) whose state is in the PostgreSQL
    /// schema `store` names.
    pub fn start_on(n: usize, store: &carecache_hub::state::PgOptions) -> Self {
        Self(carecache_hub::testing::TestHub::start_on(n, 11, store))
    }

    /// Another instance of this hub on the same database (see
    /// `carecache_hub::testing::TestHub::another_instance`).
    pub fn another_instance(&self) -> Self {
        Self(self.0.another_instance())
    }

    /// Stops the hub and releases its database, for the `carecache-hub` command.
    pub fn close(self) -> carecache_hub::testing::Closed {
        self.0.close()
    }

    /// Every synthetic patient's NHS number, as the admin API takes them.
    pub fn all_nhs(&self) -> Vec<String> {
        self.patients
            .iter()
            .map(|p| p.nhs_number().digits())
            .collect()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// An HTTPS agent that trusts only the dev CA, with an optional client identity.
    pub fn agent(&self, identity: Option<(&[u8], &str)>) -> ureq::Agent {
        let ca = ureq::tls::Certificate::from_pem(self.ca_pem.as_bytes()).unwrap();
        let mut tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![ca])));
        if let Some((der, key_pem)) = identity {
            let cert = ureq::tls::Certificate::from_der(der).to_owned();
            let key = ureq::tls::PrivateKey::from_pem(key_pem.as_bytes()).unwrap();
            tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&[cert], key)));
        }
        ureq::Agent::config_builder()
            .tls_config(tls.build())
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into()
    }

    /// A one-time enrolment token.
    pub fn token(&self, team: Option<&str>) -> String {
        let (status, body) = self.admin(
            "POST",
            "/admin/v1/enrolment-tokens",
            Some(serde_json::json!({ "team": team })),
        );
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    /// Enrol a device with a fresh token.
    pub fn enrol(&self, team: Option<&str>) -> TestDevice {
        let token = self.token(team);
        TestDevice::enrol(self, &token).unwrap()
    }

    /// Grant a lease; returns its id.
    pub fn grant(&self, spec: serde_json::Value) -> u64 {
        let (status, body) = self.admin("POST", "/admin/v1/leases", Some(spec));
        assert_eq!(status, 201, "{body}");
        body["id"].as_u64().unwrap()
    }
}

/// A lease spec for the admin API.
pub fn lease_json(device: &str, patients: &[String]) -> serde_json::Value {
    serde_json::json!({
        "label": "Test caseload",
        "target": { "device": device },
        "view": "clinical",
        "not_before": "2026-11-24T00:00:00Z",
        "not_after": "2026-11-25T00:00:00Z",
        "max_offline_secs": 43200,
        "emergency_access": true,
        "patients": patients,
    })
}

pub struct TestDevice {
    pub id: String,
    pub agent: ureq::Agent,
    pub base: String,
    pub cert_der: Vec<u8>,
    pub key_pem: String,
}

/// A protocol answer: HTTP status and the decoded frame.
pub type Answer = (u16, Message);

impl TestDevice {
    pub fn enrol(hub: &TestHub, token: &str) -> Result<Self, Answer> {
        let (key_pem, csr) = make_csr("test device").unwrap();
        let req = Message::EnrolRequest(EnrolRequest {
            token: EnrolmentToken::new(token).unwrap(),
            csr_der: Bytes::try_from(csr).unwrap(),
            device_label: Text::new("Ambulance 7").unwrap(),
        });
        let anon = hub.agent(None);
        let (status, msg) = post(
            &anon,
            &hub.url("/ccsp/v1/enrol"),
            &req,
            MessageKind::EnrolResponse.max_payload(),
        );
        let Message::EnrolResponse(r) = msg else {
            return Err((status, msg));
        };
        let cert_der = r.certificate_der.as_slice().to_vec();
        let agent = hub.agent(Some((&cert_der, &key_pem)));
        Ok(Self {
            id: r.device_id.as_str().to_owned(),
            agent,
            base: hub.url(""),
            cert_der,
            key_pem,
        })
    }

    pub fn send(&self, path: &str, msg: &Message) -> Answer {
        post(
            &self.agent,
            &format!("{}{path}", self.base),
            msg,
            MessageKind::Batch.max_payload(),
        )
    }

    pub fn hello(&self) -> Answer {
        self.send(
            "/ccsp/v1/hello",
            &Message::Hello(Hello {
                min_version: 1,
                max_version: 1,
                capabilities: Capabilities(1),
                device_time: Timestamp::from_millis(T0).unwrap(),
                software: Text::new("carecache-test").unwrap(),
            }),
        )
    }

    pub fn pull(&self, cursor: Option<&Cursor>, max_bytes: u32) -> Answer {
        self.send(
            "/ccsp/v1/pull",
            &Message::Pull(Pull::new(cursor.cloned(), max_bytes)),
        )
    }

    /// Pull until `more` is false; the batches in order.
    pub fn pull_all(&self, cursor: Option<&Cursor>, max_bytes: u32) -> Vec<Batch> {
        let mut out = Vec::new();
        let mut cursor = cursor.cloned();
        for _ in 0..100_000 {
            let (status, msg) = self.pull(cursor.as_ref(), max_bytes);
            let Message::Batch(b) = msg else {
                panic!("pull answered {status} {msg:?}");
            };
            cursor = Some(b.next_cursor.clone());
            let more = b.more;
            out.push(b);
            if !more {
                return out;
            }
        }
        panic!("pull never finished");
    }
}

/// POST one frame; decode the answer (any status) as a frame.
pub fn post(agent: &ureq::Agent, url: &str, msg: &Message, limit: u32) -> Answer {
    let body = encode(msg, Compression::Zstd).unwrap();
    post_raw(agent, url, FRAME_CONTENT_TYPE, &body, limit)
}

pub fn post_raw(
    agent: &ureq::Agent,
    url: &str,
    content_type: &str,
    body: &[u8],
    limit: u32,
) -> Answer {
    // A pooled connection the hub closed after its last answer (it closes after refusing
    // a malformed frame) fails before any answer: sent again once on a fresh one, as any
    // HTTP client does.
    let send = || {
        agent
            .post(url)
            .header("Content-Type", content_type)
            .send(body)
    };
    let mut resp = match send() {
        Err(ureq::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            send().unwrap()
        }
        other => other.unwrap(),
    };
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert_eq!(ct, FRAME_CONTENT_TYPE, "status {status}");
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(u64::from(limit) + 16)
        .read_to_vec()
        .unwrap();
    (status, decode_with_limit(&bytes, limit).unwrap())
}

/// What a device holds after applying batches in order (a model of the device store).
#[derive(Default, Debug)]
pub struct Model {
    pub leases: std::collections::BTreeMap<u64, sync_protocol::message::Lease>,
    pub records: std::collections::BTreeMap<u64, sync_protocol::record::PatientRecord>,
    pub objected: std::collections::BTreeSet<u64>,
}

impl Model {
    pub fn apply(&mut self, b: &Batch) {
        use sync_protocol::message::{LeaseChange, ObjectionStatus};
        for o in &b.objections {
            let n = o.nhs_number.as_u64();
            if o.status == ObjectionStatus::Objected {
                self.objected.insert(n);
                self.records.remove(&n);
            } else {
                self.objected.remove(&n);
            }
        }
        for l in &b.leases {
            match l {
                LeaseChange::Granted(l) | LeaseChange::Changed(l) => {
                    self.leases.insert(l.id.0, l.clone());
                }
                LeaseChange::Revoked { id, .. } => {
                    self.leases.remove(&id.0);
                }
            }
        }
        let covered: std::collections::BTreeSet<u64> = self
            .leases
            .values()
            .flat_map(|l| l.patients.iter().map(|p| p.as_u64()))
            .collect();
        self.records.retain(|n, _| covered.contains(n));
        for r in &b.upserts {
            let n = r.nhs_number.as_u64();
            assert!(covered.contains(&n), "upsert outside the device's leases");
            assert!(!self.objected.contains(&n), "upsert of an objected patient");
            self.records.insert(n, r.clone());
        }
        for r in &b.removals {
            self.records.remove(&r.nhs_number.as_u64());
        }
    }

    pub fn digest(&self) -> sync_protocol::message::AllowedSetDigest {
        sync_protocol::digest::allowed_set_digest(
            self.records.values().map(|r| (r.nhs_number, r.version)),
        )
    }
}

/// Serialises tests that poke process-wide things.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// Run the FHIR validator script on NDJSON files: (passed, output).
pub fn validate(files: &[PathBuf]) -> (bool, String) {
    carecache_synth::fhir::validate(files)
}
