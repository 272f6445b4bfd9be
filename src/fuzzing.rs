//! Properties checked by the coverage-guided fuzz targets in `tools/fuzz`, and by the
//! tests that replay their committed corpora on every run (`tests/fuzz_corpora.rs`).
//!
//! - [`HttpFixture::check`]: arbitrary bytes sent as an HTTP/1.1 connection to the real
//!   local API (the daemon's own hyper settings and router, over an in-memory pipe). The
//!   daemon never answers 500, every answer is well-formed HTTP, and no patient's name
//!   is ever in an answer to a request that did not carry the client token (unless the
//!   request itself carried the name).
//! - [`store_model::check`]: arbitrary bytes read as a sequence of batch applies, lease
//!   purges, patient purges, clean reopens and crashes (the disk stops taking writes part
//!   way through a commit, then the store is reopened), against a model of what the store
//!   must hold after each; any difference panics.
//!
//! Built with the `demo` feature (the fixtures use the reference hub and synthetic data).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a panic is how a fuzz property reports a failure; indices come from bounded choices"
)]

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::api::Api;
use crate::demo::{Options, Prepared, prepare};

/// Replaced in a fuzz input by the fixture's real client token, so corpus entries can
/// reach the authenticated routes.
pub const TOKEN_PLACEHOLDER: &[u8] = b"@TOKEN@";

/// A synced device with 20 synthetic patients serving its local API in memory.
pub struct HttpFixture {
    rt: tokio::runtime::Runtime,
    app: axum::Router,
    cfg: crate::config::ApiConfig,
    token: String,
    names: Vec<String>,
    _keep: (tempfile::TempDir, Arc<carecache_hub::server::Hub>),
}

impl std::fmt::Debug for HttpFixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpFixture").finish_non_exhaustive()
    }
}

impl HttpFixture {
    /// Sets up the demo's hub and device (seed 9: the corpus names its patients), then
    /// stops the hub: the API serves from the store alone.
    pub fn new() -> Self {
        let opts = Options {
            patients: 20,
            seed: 9,
            port: 0,
            exit_after_ready: true,
        };
        let Prepared {
            tmp,
            mut server,
            hub,
            device,
            token,
            patients,
            ..
        } = prepare(&opts, &mut |_| {}).expect("the fuzz fixture sets up");
        server.stop();
        // Every patient's family name, objectors' included: none may reach a request
        // without the token.
        let names = patients
            .iter()
            .map(|p| p.expected.demographics.name.family.as_str().to_owned())
            .filter(|n| n.len() >= 6)
            .collect();
        let cfg = device.config().api.clone();
        let app = crate::api::router(Api::new(&device));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        Self {
            rt,
            app,
            cfg,
            token,
            names,
            _keep: (tmp, hub),
        }
    }

    /// Sends `input` (with [`TOKEN_PLACEHOLDER`] replaced) as one connection and returns
    /// everything the daemon wrote back.
    pub fn exchange(&self, input: &[u8]) -> Vec<u8> {
        let bytes = replace_all(input, TOKEN_PLACEHOLDER, self.token.as_bytes());
        self.rt.block_on(async {
            let (client, server) = tokio::io::duplex(1 << 16);
            let app = self.app.clone();
            let cfg = self.cfg.clone();
            let conn = tokio::spawn(async move {
                let _ = crate::api::serve_connection(
                    app,
                    &cfg,
                    TokioIo::new(crate::api::HeadLimit::new(server)),
                )
                .await;
            });
            let (mut rx, mut tx) = tokio::io::split(client);
            let write = async {
                let _ = tx.write_all(&bytes).await;
                let _ = tx.shutdown().await;
            };
            let mut out = Vec::new();
            let read = rx.read_to_end(&mut out);
            let _ =
                tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(write, read) })
                    .await;
            conn.abort();
            out
        })
    }

    /// The property: see the module documentation. Returns the statuses answered.
    pub fn check(&self, input: &[u8]) -> Vec<u16> {
        let out = self.exchange(input);
        let statuses = statuses(&out);
        assert!(
            out.is_empty() || !statuses.is_empty(),
            "the daemon wrote something that is not an HTTP response"
        );
        assert!(
            !statuses.contains(&500),
            "the daemon answered 500 (an unhandled failure)"
        );
        if find(input, TOKEN_PLACEHOLDER).is_none() {
            // A name the request itself carries may be echoed back (a search that found
            // nothing, say): that discloses nothing.
            for name in self
                .names
                .iter()
                .filter(|n| find(input, n.as_bytes()).is_none())
            {
                assert!(
                    find(&out, name.as_bytes()).is_none(),
                    "a patient's name was answered to a request without the client token"
                );
            }
        }
        statuses
    }
}

impl Default for HttpFixture {
    fn default() -> Self {
        Self::new()
    }
}

/// The status of each `HTTP/1.x NNN` response line in `out`.
fn statuses(out: &[u8]) -> Vec<u16> {
    let mut found = Vec::new();
    let mut rest = out;
    while let Some(i) = find(rest, b"HTTP/1.") {
        let code = rest.get(i + 9..i + 12).unwrap_or_default();
        if let Some(s) = std::str::from_utf8(code)
            .ok()
            .and_then(|c| c.parse::<u16>().ok())
        {
            found.push(s);
        }
        rest = &rest[i + 7..];
    }
    found
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

fn replace_all(input: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = find(rest, from) {
        out.extend_from_slice(&rest[..i]);
        out.extend_from_slice(to);
        rest = &rest[i + from.len()..];
    }
    out.extend_from_slice(rest);
    out
}

pub mod store_model {
    //! Batch apply against a model, with crash-and-reopen as an operation.

    use std::collections::{BTreeMap, BTreeSet};
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::unix::fs::FileExt;
    use std::path::Path;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    use sync_protocol::NhsNumber;
    use sync_protocol::digest::allowed_set_digest;
    use sync_protocol::message::{
        Audience, Batch, Lease, LeaseChange, LeaseEndReason, ObjectionChange, ObjectionStatus,
        Removal, RemovalReason, View,
    };
    use sync_protocol::record::PatientRecord;
    use sync_protocol::types::{BoundedVec, Cursor, LeaseId, RecordVersion, Text, Timestamp};

    use crate::crypto::RootKey;
    use crate::keysource::SourceKind;
    use crate::store::{DATABASE_FILE, Store};

    const PATIENTS: usize = 6;
    /// Lease ids are 1..=LEASES.
    const LEASES: u8 = 3;

    /// A redb backend over the real file that loses power after a number of writes:
    /// from then on every write, resize and sync fails, as if the machine had stopped.
    #[derive(Debug)]
    struct PowerCut {
        file: File,
        writes_left: Arc<AtomicI64>,
    }

    impl PowerCut {
        fn alive(&self) -> io::Result<()> {
            if self.writes_left.fetch_sub(1, Ordering::SeqCst) <= 0 {
                return Err(io::Error::other("power lost"));
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for PowerCut {
        fn len(&self) -> Result<u64, io::Error> {
            Ok(self.file.metadata()?.len())
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
            self.file.read_exact_at(out, offset)
        }
        fn set_len(&self, len: u64) -> Result<(), io::Error> {
            self.alive()?;
            self.file.set_len(len)
        }
        fn sync_data(&self) -> Result<(), io::Error> {
            self.alive()?;
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
            self.alive()?;
            self.file.write_all_at(data, offset)
        }
    }

    /// What the store must hold.
    #[derive(Clone, Debug, Default, PartialEq)]
    struct Model {
        held: BTreeMap<NhsNumber, PatientRecord>,
        objected: BTreeSet<NhsNumber>,
        leases: BTreeMap<u64, BTreeSet<NhsNumber>>,
        cursor: Option<u64>,
    }

    impl Model {
        fn covered(&self) -> BTreeSet<NhsNumber> {
            self.leases.values().flatten().copied().collect()
        }

        /// The store's batch semantics: objections, then leases (purging the patients a
        /// change leaves uncovered), upserts (refused whole for an objected patient),
        /// removals, cursor.
        fn apply(&self, b: &Plan, pool: &[Vec<PatientRecord>]) -> Option<Self> {
            let mut m = self.clone();
            for &(p, objected) in &b.objections {
                let nhs = pool[p][0].nhs_number;
                if objected {
                    m.objected.insert(nhs);
                    m.held.remove(&nhs);
                } else {
                    m.objected.remove(&nhs);
                }
            }
            let mut uncovered = BTreeSet::new();
            for (id, patients) in &b.leases {
                let old = m.leases.remove(id).unwrap_or_default();
                match patients {
                    Some(now) => {
                        uncovered.extend(old.difference(now).copied());
                        m.leases.insert(*id, now.clone());
                    }
                    None => uncovered.extend(old),
                }
            }
            let covered = m.covered();
            for nhs in uncovered.difference(&covered) {
                m.held.remove(nhs);
            }
            for &(p, v) in &b.upserts {
                let r = &pool[p][v];
                if m.objected.contains(&r.nhs_number) {
                    return None;
                }
                m.held.insert(r.nhs_number, r.clone());
            }
            for &p in &b.removals {
                m.held.remove(&pool[p][0].nhs_number);
            }
            m.cursor = Some(b.cursor);
            Some(m)
        }

        fn purge_lease(&mut self, id: u64) {
            let patients = self.leases.remove(&id).unwrap_or_default();
            let covered = self.covered();
            for nhs in patients.difference(&covered) {
                self.held.remove(nhs);
            }
        }
    }

    /// One batch as the fuzzer chose it (indices into the record pool).
    #[derive(Debug, Default)]
    struct Plan {
        objections: Vec<(usize, bool)>,
        leases: Vec<(u64, Option<BTreeSet<NhsNumber>>)>,
        upserts: Vec<(usize, usize)>,
        removals: Vec<usize>,
        cursor: u64,
    }

    fn ts(ms: u64) -> Timestamp {
        Timestamp::from_millis(ms).unwrap()
    }

    impl Plan {
        fn batch(&self, pool: &[Vec<PatientRecord>]) -> Option<Batch> {
            let objections = self
                .objections
                .iter()
                .map(|&(p, o)| ObjectionChange {
                    nhs_number: pool[p][0].nhs_number,
                    status: if o {
                        ObjectionStatus::Objected
                    } else {
                        ObjectionStatus::Withdrawn
                    },
                    recorded_at: ts(1_800_000_000_000),
                })
                .collect::<Vec<_>>();
            let leases = self
                .leases
                .iter()
                .map(|(id, patients)| match patients {
                    Some(p) => LeaseChange::Changed(
                        Lease::new(
                            LeaseId(*id),
                            Text::new(format!("caseload {id}")).unwrap(),
                            Audience::Team,
                            View::Clinical,
                            ts(1_700_000_000_000),
                            ts(1_900_000_000_000),
                            86_400,
                            false,
                            BoundedVec::try_from(p.iter().copied().collect::<Vec<_>>()).unwrap(),
                        )
                        .unwrap(),
                    ),
                    None => LeaseChange::Revoked {
                        id: LeaseId(*id),
                        reason: LeaseEndReason::Revoked,
                    },
                })
                .collect::<Vec<_>>();
            let upserts: Vec<PatientRecord> = self
                .upserts
                .iter()
                .map(|&(p, v)| pool[p][v].clone())
                .collect();
            let allowed = allowed_set_digest(upserts.iter().map(|r| (r.nhs_number, r.version)));
            let removals = self
                .removals
                .iter()
                .map(|&p| Removal {
                    nhs_number: pool[p][0].nhs_number,
                    reason: RemovalReason::LeftCaseload,
                })
                .collect::<Vec<_>>();
            // The protocol's own checks (a patient twice, an objected patient upserted)
            // refuse some plans before they reach a store.
            Batch::new(
                BoundedVec::try_from(objections).ok()?,
                BoundedVec::try_from(leases).ok()?,
                BoundedVec::try_from(upserts).ok()?,
                BoundedVec::try_from(removals).ok()?,
                Cursor::new(self.cursor.to_be_bytes().to_vec()).ok()?,
                false,
                ts(1_800_000_000_000 + self.cursor),
                allowed,
            )
            .ok()
        }
    }

    /// Reads the fuzzer's bytes one at a time (zeros once they run out).
    struct Bytes<'a>(&'a [u8]);

    impl Bytes<'_> {
        fn next(&mut self) -> u8 {
            let Some((&b, rest)) = self.0.split_first() else {
                return 0;
            };
            self.0 = rest;
            b
        }
        fn below(&mut self, n: usize) -> usize {
            usize::from(self.next()) % n
        }
    }

    fn pool() -> &'static Vec<Vec<PatientRecord>> {
        static POOL: std::sync::OnceLock<Vec<Vec<PatientRecord>>> = std::sync::OnceLock::new();
        POOL.get_or_init(|| {
            carecache_synth::Generator::new(17)
                .patients(PATIENTS)
                .into_iter()
                .map(|r| {
                    (1..=3u64)
                        .map(|v| {
                            let mut r = r.clone();
                            r.version = RecordVersion(r.version.0 + v);
                            r
                        })
                        .collect()
                })
                .collect()
        })
    }

    fn plan(bytes: &mut Bytes<'_>, cursor: u64) -> Plan {
        let pool = pool();
        let mut p = Plan {
            cursor,
            ..Plan::default()
        };
        for _ in 0..bytes.below(3) {
            p.objections
                .push((bytes.below(PATIENTS), bytes.next() & 1 == 0));
        }
        for _ in 0..bytes.below(3) {
            let id = 1 + u64::from(bytes.next() % LEASES);
            let mask = bytes.next();
            let patients = (mask & 0x80 == 0).then(|| {
                (0..PATIENTS)
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| pool[i][0].nhs_number)
                    .collect()
            });
            p.leases.push((id, patients));
        }
        for _ in 0..bytes.below(4) {
            p.upserts.push((bytes.below(PATIENTS), bytes.below(3)));
        }
        for _ in 0..bytes.below(2) {
            p.removals.push(bytes.below(PATIENTS));
        }
        p
    }

    fn assert_matches(store: &Store, m: &Model, step: usize) {
        if let Some(why) = differs(store, m) {
            panic!("step {step}: {why}");
        }
    }

    /// How the store differs from the model, if it does.
    fn differs(store: &Store, m: &Model) -> Option<String> {
        let held: BTreeSet<NhsNumber> = match store.held_versions() {
            Ok(v) => v.into_iter().map(|(n, _)| n).collect(),
            Err(e) => return Some(format!("held records do not open: {e}")),
        };
        let want: BTreeSet<NhsNumber> = m.held.keys().copied().collect();
        if held != want {
            return Some(format!(
                "{} patients held, the model has {}",
                held.len(),
                want.len()
            ));
        }
        for (nhs, r) in &m.held {
            match store.record(nhs) {
                Ok(Some(got)) if got == *r => {}
                Ok(_) => return Some("a record differs from the model".into()),
                Err(e) => return Some(format!("a record does not open: {e}")),
            }
        }
        let cursor = store
            .cursor()
            .ok()?
            .map(|c| u64::from_be_bytes(c.as_bytes().try_into().unwrap_or_default()));
        if cursor != m.cursor {
            return Some(format!("cursor {cursor:?}, the model has {:?}", m.cursor));
        }
        let leases: BTreeMap<u64, BTreeSet<NhsNumber>> = match store.leases() {
            Ok(l) => l
                .into_iter()
                .map(|l| (l.id.0, l.patients.iter().copied().collect()))
                .collect(),
            Err(e) => return Some(format!("leases do not open: {e}")),
        };
        if leases != m.leases {
            return Some("leases differ from the model".into());
        }
        for row in pool() {
            let nhs = row[0].nhs_number;
            if store.objected(&nhs).ok() != Some(m.objected.contains(&nhs)) {
                return Some("an objection differs from the model".into());
            }
        }
        None
    }

    fn open_cut(dir: &Path, root: &RootKey, writes: i64) -> (Store, Arc<AtomicI64>) {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join(DATABASE_FILE))
            .unwrap();
        let left = Arc::new(AtomicI64::new(i64::MAX));
        let backend = PowerCut {
            file,
            writes_left: Arc::clone(&left),
        };
        let store = Store::open_with_backend(dir, root, backend).unwrap();
        left.store(writes, Ordering::SeqCst);
        (store, left)
    }

    /// Runs the operations `data` encodes (at most 24) on a fresh store in a temporary
    /// directory (under /dev/shm when there is one), checking it against the model after
    /// each. Returns how many crashes were taken.
    pub fn check(data: &[u8]) -> usize {
        let base = Path::new("/dev/shm");
        let tmp = if base.is_dir() {
            tempfile::tempdir_in(base)
        } else {
            tempfile::tempdir()
        }
        .unwrap();
        let dir = tmp.path().join("data");
        let root = RootKey::random().unwrap();
        let mut store = Some(Store::create(&dir, &root, SourceKind::KeyFile, None).unwrap());
        let mut model = Model::default();
        let mut bytes = Bytes(data);
        let mut crashes = 0;
        let mut cursor = 0;
        for step in 0..24 {
            if bytes.0.is_empty() {
                break;
            }
            match bytes.below(6) {
                0 | 1 => {
                    cursor += 1;
                    let p = plan(&mut bytes, cursor);
                    let Some(batch) = p.batch(pool()) else {
                        continue;
                    };
                    let s = store.as_ref().unwrap();
                    match (s.apply_batch(&batch), model.apply(&p, pool())) {
                        (Ok(_), Some(next)) => model = next,
                        (Err(_), None) => {}
                        (Ok(_), None) => {
                            panic!("step {step}: the store took a batch it must refuse")
                        }
                        (Err(e), Some(_)) => {
                            panic!("step {step}: the store refused a good batch: {e}")
                        }
                    }
                }
                2 => {
                    // Crash: power is lost after a few writes of the next commit.
                    cursor += 1;
                    let writes = i64::from(bytes.next() % 16);
                    let p = plan(&mut bytes, cursor);
                    let Some(batch) = p.batch(pool()) else {
                        continue;
                    };
                    drop(store.take());
                    let (cut, _left) = open_cut(&dir, &root, writes);
                    let applied = cut.apply_batch(&batch).is_ok();
                    drop(cut);
                    crashes += 1;
                    let reopened = Store::open(&dir, &root).unwrap();
                    // A commit whose last write or sync failed may still have reached
                    // the disk: the store must hold the state before or after it, whole.
                    if let Some(next) = model.apply(&p, pool())
                        && (applied || differs(&reopened, &model).is_some())
                    {
                        model = next;
                    }
                    store = Some(reopened);
                }
                3 => {
                    drop(store.take());
                    store = Some(Store::open(&dir, &root).unwrap());
                }
                4 => {
                    let id = 1 + u64::from(bytes.next() % LEASES);
                    store.as_ref().unwrap().purge_lease(LeaseId(id)).unwrap();
                    model.purge_lease(id);
                }
                _ => {
                    let p = bytes.below(PATIENTS);
                    let nhs = pool()[p][0].nhs_number;
                    store.as_ref().unwrap().purge_patients(&[nhs]).unwrap();
                    model.held.remove(&nhs);
                }
            }
            assert_matches(store.as_ref().unwrap(), &model, step);
        }
        crashes
    }
}
