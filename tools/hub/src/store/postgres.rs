//! The PostgreSQL engine: the hub's state in a schema of an existing database, shared by
//! any number of hub instances.
//!
//! - **Schema migrations** are numbered ([`MIGRATIONS`]) and run at start under an
//!   advisory lock, so instances starting together migrate once; a database migrated by
//!   a newer hub is refused with a message.
//! - **Ordering**: a write transaction that reads the change log's head locks its row
//!   (`FOR UPDATE`) until commit, so sequence numbers commit in order across instances:
//!   a device that read head `h` has seen every change up to `h` and can never skip one.
//!   Single rows read in a write transaction are locked likewise (an enrolment token is
//!   used once, an audit chain advances once, whichever instance is asked).
//! - **Snapshots**: a read transaction is `REPEATABLE READ READ ONLY`.
//! - **One ingest at a time** across instances: a session advisory lock held on its own
//!   connection; when an instance dies its connection closes and the lock passes on.
//! - **Errors** carry the server's severity, code and message, never its DETAIL line
//!   (which can quote key values).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use postgres::Row;
use postgres::types::{ToSql, Type};
use r2d2::PooledConnection;
use r2d2_postgres::PostgresConnectionManager;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::{AuditVisit, Engine, Guard, R, Read, Retained, Write, month_after, month_now};
use crate::audit::ChainHead;
use crate::fleet::{AnchorRow, HealthRow};
use crate::state::{
    DeviceRow, LeaseRow, LogKey, LookupRow, ObjectionRow, PatientRow, RenewalRow, StateError,
    TokenRow, dec, enc, summary_of,
};
use crate::store::redb::RECORDS_FORMAT;

/// Advisory lock keys (one namespace per hub schema: the key is hashed with it).
const LOCK_MIGRATE: i64 = 0x6361_7265_0001;
const LOCK_INGEST: i64 = 0x6361_7265_0002;
const LOCK_FORWARD: i64 = 0x6361_7265_0003;
const LOCK_PARTITION: i64 = 0x6361_7265_0004;

/// A change-log partition covers 2^20 sequence numbers.
const LOG_PARTITION_BITS: u32 = 20;
/// Partitions made ahead of the change log's head, and months of audit ahead of now.
const AHEAD: i64 = 2;

/// The schema, one step per entry; `schema_version` holds how many have run.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the hub's state.
    r"
    CREATE TABLE meta (key text PRIMARY KEY, value bytea NOT NULL);
    CREATE TABLE head (
        id int PRIMARY KEY CHECK (id = 1),
        seq bigint NOT NULL,
        next_lease bigint NOT NULL
    );
    INSERT INTO head VALUES (1, 0, 1);
    CREATE TABLE patients (
        nhs bigint PRIMARY KEY,
        seq bigint NOT NULL,
        fhir_id text NOT NULL,
        version bigint NOT NULL,
        alerts boolean NOT NULL,
        content bytea,
        row bytea NOT NULL
    );
    CREATE INDEX patients_held ON patients (nhs) WHERE version <> 0;
    CREATE TABLE objections (nhs bigint PRIMARY KEY, row bytea NOT NULL);
    CREATE TABLE log (seq bigint PRIMARY KEY, key bytea NOT NULL);
    CREATE TABLE leases (id bigint PRIMARY KEY, row bytea NOT NULL);
    CREATE TABLE lookups (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        lease bigint NOT NULL UNIQUE,
        row bytea NOT NULL
    );
    CREATE TABLE devices (id text PRIMARY KEY, row bytea NOT NULL);
    CREATE TABLE certificates (sha256 bytea PRIMARY KEY, device text NOT NULL);
    CREATE TABLE enrolment_tokens (sha256 bytea PRIMARY KEY, row bytea NOT NULL);
    CREATE TABLE renewal_tokens (sha256 bytea PRIMARY KEY, row bytea NOT NULL);
    CREATE TABLE source (key text PRIMARY KEY, value bytea NOT NULL);
    CREATE TABLE device_health (device text PRIMARY KEY, row bytea NOT NULL);
    CREATE TABLE device_anchor (device text PRIMARY KEY, row bytea NOT NULL);
    CREATE TABLE audit_heads (device text PRIMARY KEY, row bytea NOT NULL);
    CREATE TABLE audit (
        device text NOT NULL,
        seq bigint NOT NULL,
        at bigint NOT NULL,
        emergency boolean NOT NULL,
        entry bytea NOT NULL,
        PRIMARY KEY (device, seq)
    );
    CREATE INDEX audit_emergency ON audit (device, seq) WHERE emergency;
    CREATE TABLE audit_by_patient (
        nhs bigint NOT NULL,
        device text NOT NULL,
        seq bigint NOT NULL,
        PRIMARY KEY (nhs, device, seq)
    );
    ",
    // 2: what privacy officers did through the hub (audit views, clearances); how far
    // each device's audit is forwarded upstream; the change log partitioned by sequence
    // range and audit by month, so that retention is a partition drop.
    r"
    CREATE TABLE officer_log (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        at bigint NOT NULL,
        entry bytea NOT NULL
    );
    CREATE TABLE audit_forwarded (device text PRIMARY KEY, seq bigint NOT NULL);

    -- YYYYMM (UTC) of a time in ms; times past year 9999 count as 9999-12.
    CREATE FUNCTION month_of(at bigint) RETURNS int LANGUAGE sql IMMUTABLE AS $$
        SELECT to_char(to_timestamp(LEAST(GREATEST(at, 0), 253402300799999) / 1000.0)
                       AT TIME ZONE 'UTC', 'YYYYMM')::int
    $$;
    CREATE FUNCTION month_after(m int) RETURNS int LANGUAGE sql IMMUTABLE AS $$
        SELECT CASE WHEN m % 100 = 12 THEN m + 89 ELSE m + 1 END
    $$;

    ALTER TABLE log RENAME TO log_v1;
    ALTER INDEX log_pkey RENAME TO log_v1_pkey;
    CREATE TABLE log (seq bigint NOT NULL PRIMARY KEY, key bytea NOT NULL)
        PARTITION BY RANGE (seq);
    DO $$
    DECLARE p bigint;
    BEGIN
        FOR p IN SELECT DISTINCT seq >> 20 FROM log_v1
                 UNION SELECT ((SELECT seq FROM head) >> 20) + g FROM generate_series(0, 2) g
        LOOP
            EXECUTE format('CREATE TABLE %I PARTITION OF log FOR VALUES FROM (%s) TO (%s)',
                           'log_' || p, p << 20, (p + 1) << 20);
        END LOOP;
    END $$;
    CREATE TABLE log_default PARTITION OF log DEFAULT;
    INSERT INTO log SELECT seq, key FROM log_v1;
    DROP TABLE log_v1;

    ALTER TABLE audit RENAME TO audit_v1;
    ALTER INDEX audit_pkey RENAME TO audit_v1_pkey;
    DROP INDEX audit_emergency;
    CREATE TABLE audit (
        device text NOT NULL,
        seq bigint NOT NULL,
        month int NOT NULL,
        at bigint NOT NULL,
        emergency boolean NOT NULL,
        entry bytea NOT NULL,
        PRIMARY KEY (device, seq, month)
    ) PARTITION BY RANGE (month);
    CREATE INDEX audit_emergency ON audit (device, seq) WHERE emergency;
    ALTER TABLE audit_by_patient RENAME TO audit_by_patient_v1;
    ALTER INDEX audit_by_patient_pkey RENAME TO audit_by_patient_v1_pkey;
    CREATE TABLE audit_by_patient (
        nhs bigint NOT NULL,
        device text NOT NULL,
        seq bigint NOT NULL,
        month int NOT NULL,
        PRIMARY KEY (nhs, device, seq, month)
    ) PARTITION BY RANGE (month);
    DO $$
    DECLARE m int;
    BEGIN
        -- Entries stored before: by their own time (when they were stored is not known).
        FOR m IN SELECT DISTINCT month_of(at) FROM audit_v1
                 UNION SELECT month_of((extract(epoch FROM now()) * 1000)::bigint)
        LOOP
            EXECUTE format('CREATE TABLE %I PARTITION OF audit FOR VALUES FROM (%s) TO (%s)',
                           'audit_' || m, m, month_after(m));
            EXECUTE format('CREATE TABLE %I PARTITION OF audit_by_patient FOR VALUES FROM (%s) TO (%s)',
                           'audit_by_patient_' || m, m, month_after(m));
        END LOOP;
    END $$;
    CREATE TABLE audit_default PARTITION OF audit DEFAULT;
    CREATE TABLE audit_by_patient_default PARTITION OF audit_by_patient DEFAULT;
    INSERT INTO audit SELECT device, seq, month_of(at), at, emergency, entry FROM audit_v1;
    INSERT INTO audit_by_patient
        SELECT p.nhs, p.device, p.seq, month_of(a.at)
        FROM audit_by_patient_v1 p JOIN audit_v1 a USING (device, seq);
    DROP TABLE audit_by_patient_v1;
    DROP TABLE audit_v1;
    ",
];

/// How the hub reaches its database (`[store]` in `hub.toml`).
#[derive(Clone)]
pub struct PgOptions {
    /// A libpq-style connection string or `postgresql://` URL.
    pub url: String,
    /// The schema holding the hub's tables (created if missing).
    pub schema: String,
    /// Connections kept.
    pub pool_size: u32,
    /// PEM file of the CA that issued the database server's certificate, for TLS
    /// (`sslmode=require` in the URL); without it, only a server that does not offer
    /// TLS is reached.
    pub ca_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for PgOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("PgOptions")
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

type Manager = PostgresConnectionManager<MakeRustlsConnect>;
type Conn = PooledConnection<Manager>;

/// The hub's PostgreSQL database.
pub(crate) struct PgEngine {
    pool: r2d2::Pool<Manager>,
    /// For the ingest lock's own connection.
    config: postgres::Config,
    tls: MakeRustlsConnect,
    schema: String,
    hub_id: [u8; 8],
}

impl std::fmt::Debug for PgEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgEngine")
            .field("schema", &self.schema)
            .finish_non_exhaustive()
    }
}

/// A database error as the hub reports it: never the server's DETAIL (key values).
pub(crate) fn pg_err(e: &postgres::Error) -> StateError {
    match e.as_db_error() {
        Some(db) => StateError::Database(format!(
            "postgres {} {}: {}",
            db.severity(),
            db.code().code(),
            db.message()
        )),
        None => StateError::Database(format!("postgres: {e}")),
    }
}

/// r2d2 fails a checkout only when no connection came free within its timeout.
fn pool_err(e: &r2d2::Error) -> StateError {
    StateError::Busy(format!("postgres pool: {e}"))
}

#[derive(Debug)]
struct SearchPath(String);

impl r2d2::CustomizeConnection<postgres::Client, postgres::Error> for SearchPath {
    fn on_acquire(&self, conn: &mut postgres::Client) -> Result<(), postgres::Error> {
        conn.batch_execute(&format!("SET search_path TO {}", self.0))
    }
}

/// A schema name the hub will put in SQL: lower-case letters, digits and `_`.
pub(crate) fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn tls(ca_file: Option<&std::path::Path>) -> R<MakeRustlsConnect> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| StateError::Invalid(format!("store.ca_file {}: {e}", path.display())))?;
        let text = String::from_utf8_lossy(&pem);
        let certs = crate::pki::pem_certs(&text);
        if certs.is_empty() {
            return Err(StateError::Invalid(
                "store.ca_file holds no PEM certificate".into(),
            ));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| StateError::Invalid(format!("store.ca_file: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StateError::Invalid(format!("TLS to the database: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// An advisory lock key of this schema.
fn lock_key(schema: &str, base: i64) -> i64 {
    use sha2::Digest;
    let h: [u8; 32] = sha2::Sha256::digest(schema.as_bytes()).into();
    let [b0, b1, b2, b3, b4, b5, b6, b7, ..] = h;
    base ^ i64::from_be_bytes([b0, b1, b2, b3, b4, b5, b6, b7])
}

impl PgEngine {
    /// Connect, create the schema if missing and run the migrations this hub knows.
    pub(crate) fn open(opts: &PgOptions) -> R<Self> {
        if !valid_schema(&opts.schema) {
            return Err(StateError::Invalid(
                "store.schema must be lower-case letters, digits and _".into(),
            ));
        }
        let mut config: postgres::Config = opts
            .url
            .parse()
            .map_err(|_| StateError::Invalid("store.url is not a PostgreSQL URL".into()))?;
        // A database that does not answer is an error in seconds, not a hang: connecting
        // is bounded, and a connection whose peer vanished is found by keepalives.
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.keepalives_idle(Duration::from_secs(30));
        let tls = tls(opts.ca_file.as_deref())?;
        let manager = PostgresConnectionManager::new(config.clone(), tls.clone());
        let pool = r2d2::Pool::builder()
            .max_size(opts.pool_size.max(1))
            .min_idle(Some(1))
            .connection_timeout(Duration::from_secs(10))
            .connection_customizer(Box::new(SearchPath(opts.schema.clone())))
            .build(manager)
            .map_err(|e| pool_err(&e))?;
        let mut conn = pool.get().map_err(|e| pool_err(&e))?;
        let hub_id = migrate(&mut conn, &opts.schema)?;
        drop(conn);
        Ok(Self {
            pool,
            config,
            tls,
            schema: opts.schema.clone(),
            hub_id,
        })
    }

    fn conn(&self) -> R<Conn> {
        self.pool.get().map_err(|e| pool_err(&e))
    }
}

/// Run the migrations not yet run; the hub id.
fn migrate(conn: &mut Conn, schema: &str) -> R<[u8; 8]> {
    let e = |e: postgres::Error| pg_err(&e);
    let mut tx = conn.transaction().map_err(e)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&lock_key(schema, LOCK_MIGRATE)],
    )
    .map_err(e)?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {schema}.schema_version (version int NOT NULL);"
    ))
    .map_err(e)?;
    let found: i32 = tx
        .query_opt("SELECT version FROM schema_version", &[])
        .map_err(e)?
        .map_or(0, |r| r.get(0));
    let known = i32::try_from(MIGRATIONS.len()).unwrap_or(i32::MAX);
    if found > known {
        return Err(StateError::Database(format!(
            "the hub's database schema is version {found}, newer than this hub ({known}): \
             upgrade the hub"
        )));
    }
    for (i, step) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        tx.batch_execute(step).map_err(e)?;
        tracing::info!(version = i + 1, "hub database schema migrated");
    }
    tx.execute("DELETE FROM schema_version", &[]).map_err(e)?;
    tx.execute("INSERT INTO schema_version VALUES ($1)", &[&known])
        .map_err(e)?;
    let format = RECORDS_FORMAT.to_le_bytes();
    tx.execute(
        "INSERT INTO meta VALUES ('records', $1) ON CONFLICT DO NOTHING",
        &[&format.as_slice()],
    )
    .map_err(e)?;
    let stored: Vec<u8> = tx
        .query_one("SELECT value FROM meta WHERE key = 'records'", &[])
        .map_err(e)?
        .get(0);
    if stored != format {
        return Err(StateError::Database(
            "the hub's database holds records in another format than this hub's: upgrade \
             the hub"
                .into(),
        ));
    }
    let id = super::new_hub_id()?;
    tx.execute(
        "INSERT INTO meta VALUES ('hub_id', $1) ON CONFLICT DO NOTHING",
        &[&id.as_slice()],
    )
    .map_err(e)?;
    let stored: Vec<u8> = tx
        .query_one("SELECT value FROM meta WHERE key = 'hub_id'", &[])
        .map_err(e)?
        .get(0);
    tx.commit().map_err(e)?;
    <[u8; 8]>::try_from(stored.as_slice()).map_err(|_| StateError::Corrupt("meta"))
}

impl Engine for PgEngine {
    fn hub_id(&self) -> [u8; 8] {
        self.hub_id
    }

    fn read(&self) -> R<Box<dyn Read + '_>> {
        let mut conn = self.conn()?;
        conn.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .map_err(|e| pg_err(&e))?;
        Ok(Box::new(PgTx {
            conn,
            write: false,
            open: true,
            pending: Pending::default(),
        }))
    }

    fn write(&self) -> R<Box<dyn Write + '_>> {
        let mut conn = self.conn()?;
        conn.batch_execute("BEGIN").map_err(|e| pg_err(&e))?;
        Ok(Box::new(PgTx {
            conn,
            write: true,
            open: true,
            pending: Pending::default(),
        }))
    }

    fn ingest_guard(&self) -> R<Box<dyn Guard + '_>> {
        // Its own connection, not the pool's: the lock lives as long as the session, a
        // dead instance's session ends with its connection, and the ingest's batches
        // have the whole pool.
        let mut conn = self
            .config
            .connect(self.tls.clone())
            .map_err(|e| pg_err(&e))?;
        conn.execute(
            "SELECT pg_advisory_lock($1)",
            &[&lock_key(&self.schema, LOCK_INGEST)],
        )
        .map_err(|e| pg_err(&e))?;
        Ok(Box::new(AdvisoryGuard {
            conn,
            key: lock_key(&self.schema, LOCK_INGEST),
        }))
    }

    fn remote(&self) -> bool {
        true
    }

    fn try_forward_guard(&self) -> R<Option<Box<dyn Guard + '_>>> {
        let mut conn = self
            .config
            .connect(self.tls.clone())
            .map_err(|e| pg_err(&e))?;
        let key = lock_key(&self.schema, LOCK_FORWARD);
        let got: bool = conn
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .map_err(|e| pg_err(&e))?
            .get(0);
        Ok(got.then(|| Box::new(AdvisoryGuard { conn, key }) as Box<dyn Guard>))
    }

    fn maintain(&self) -> R<()> {
        let e = |e: postgres::Error| pg_err(&e);
        let mut conn = self.conn()?;
        let head: i64 = conn
            .query_one("SELECT seq FROM head", &[])
            .map_err(e)?
            .get(0);
        let mut wanted = Vec::new();
        let first = head >> LOG_PARTITION_BITS;
        for p in first..=first + AHEAD {
            wanted.push((
                format!("log_{p}"),
                format!(
                    "CREATE TABLE IF NOT EXISTS log_{p} PARTITION OF log FOR VALUES FROM ({}) TO ({})",
                    p << LOG_PARTITION_BITS,
                    (p + 1) << LOG_PARTITION_BITS
                ),
            ));
        }
        let mut m = month_now();
        for _ in 0..=AHEAD {
            for table in ["audit", "audit_by_patient"] {
                wanted.push((
                    format!("{table}_{m}"),
                    format!(
                        "CREATE TABLE IF NOT EXISTS {table}_{m} PARTITION OF {table} \
                         FOR VALUES FROM ({m}) TO ({})",
                        month_after(m)
                    ),
                ));
            }
            m = month_after(m);
        }
        let names: Vec<&str> = wanted.iter().map(|(n, _)| n.as_str()).collect();
        let existing: std::collections::HashSet<String> = conn
            .query(
                "SELECT c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = current_schema() AND c.relname = ANY($1)",
                &[&names],
            )
            .map_err(e)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (name, ddl) in wanted.iter().filter(|(n, _)| !existing.contains(n)) {
            // One creator at a time across instances; IF NOT EXISTS for the one that waited.
            let made = (|| {
                let mut tx = conn.transaction()?;
                tx.execute(
                    "SELECT pg_advisory_xact_lock($1)",
                    &[&lock_key(&self.schema, LOCK_PARTITION)],
                )?;
                tx.batch_execute(ddl)?;
                tx.commit()
            })();
            match made {
                Ok(()) => tracing::info!(partition = %name, "partition made"),
                // Rows for its range already in the default partition (the hub was not
                // running for months, say): they stay there and are served from there.
                Err(err) => {
                    tracing::warn!(partition = %name, error = %pg_err(&err), "partition not made")
                }
            }
        }
        Ok(())
    }

    fn retain(&self, before: i32, forwarding: bool) -> R<Retained> {
        let e = |e: postgres::Error| pg_err(&e);
        let mut conn = self.conn()?;
        let children = |conn: &mut Conn, parent: &str| -> R<Vec<String>> {
            Ok(conn
                .query(
                    "SELECT c.relname::text FROM pg_inherits i \
                     JOIN pg_class c ON c.oid = i.inhrelid \
                     JOIN pg_class p ON p.oid = i.inhparent \
                     JOIN pg_namespace n ON n.oid = p.relnamespace \
                     WHERE n.nspname = current_schema() AND p.relname = $1 ORDER BY 1",
                    &[&parent],
                )
                .map_err(e)?
                .iter()
                .map(|r| r.get(0))
                .collect())
        };
        let mut done = Retained::default();
        for name in children(&mut conn, "audit")? {
            let Some(month) = name
                .strip_prefix("audit_")
                .and_then(|m| m.parse::<i32>().ok())
            else {
                continue;
            };
            if month >= before {
                continue;
            }
            if forwarding {
                let waiting: i64 = conn
                    .query_one(
                        &format!(
                            "SELECT count(*) FROM {name} a LEFT JOIN audit_forwarded f \
                             ON f.device = a.device WHERE a.seq > COALESCE(f.seq, 0)"
                        ),
                        &[],
                    )
                    .map_err(e)?
                    .get(0);
                if waiting > 0 {
                    done.kept_unforwarded.push(month);
                    continue;
                }
            }
            let mut tx = conn.transaction().map_err(e)?;
            let n: i64 = tx
                .query_one(&format!("SELECT count(*) FROM {name}"), &[])
                .map_err(e)?
                .get(0);
            tx.batch_execute(&format!(
                "DROP TABLE {name}; DROP TABLE IF EXISTS audit_by_patient_{month};"
            ))
            .map_err(e)?;
            tx.commit().map_err(e)?;
            tracing::warn!(month, entries = n, "audit partition dropped (retention)");
            done.audit_months.push(month);
            done.audit_entries += u(n);
        }
        let head: i64 = conn
            .query_one("SELECT seq FROM head", &[])
            .map_err(e)?
            .get(0);
        for name in children(&mut conn, "log")? {
            let Some(p) = name
                .strip_prefix("log_")
                .and_then(|p| p.parse::<i64>().ok())
            else {
                continue;
            };
            // Below the head's partition nothing is ever added: an empty one stays empty.
            if p >= head >> LOG_PARTITION_BITS {
                continue;
            }
            let mut tx = conn.transaction().map_err(e)?;
            let empty: bool = tx
                .query_one(&format!("SELECT NOT EXISTS (SELECT 1 FROM {name})"), &[])
                .map_err(e)?
                .get(0);
            if empty {
                tx.batch_execute(&format!("DROP TABLE {name}")).map_err(e)?;
                tx.commit().map_err(e)?;
                done.log_partitions.push(u(p));
            }
        }
        Ok(done)
    }

    fn pool(&self) -> Option<(u32, u32)> {
        let state = self.pool.state();
        Some((state.connections, state.idle_connections))
    }

    fn describe(&self) -> String {
        format!("postgres (schema {})", self.schema)
    }
}

struct AdvisoryGuard {
    conn: postgres::Client,
    key: i64,
}

impl Drop for AdvisoryGuard {
    fn drop(&mut self) {
        if let Err(e) = self
            .conn
            .execute("SELECT pg_advisory_unlock($1)", &[&self.key])
        {
            tracing::warn!(error = %pg_err(&e), "releasing the ingest lock");
        }
    }
}

struct PgTx {
    conn: Conn,
    write: bool,
    open: bool,
    /// Change-log moves, patient and objection rows not yet sent: an ingest batch's
    /// thousand patients go as four statements, not thousands of round trips. Sent before any
    /// other statement of the transaction (so it reads its own writes) and at commit.
    pending: Pending,
}

/// Writes held back until the next statement (see [`PgTx::pending`]).
#[derive(Default)]
struct Pending {
    /// Log entries to delete (moved on).
    log_deleted: Vec<i64>,
    /// Log entries to insert, by sequence.
    log_added: BTreeMap<i64, Vec<u8>>,
    /// Patient rows to upsert, the last for each NHS number.
    patients: BTreeMap<i64, PendingPatient>,
    /// Objection rows to upsert, the last for each NHS number.
    objections: BTreeMap<i64, Vec<u8>>,
}

struct PendingPatient {
    seq: i64,
    fhir_id: String,
    version: i64,
    alerts: bool,
    content: Option<Vec<u8>>,
    row: Vec<u8>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.log_deleted.is_empty()
            && self.log_added.is_empty()
            && self.patients.is_empty()
            && self.objections.is_empty()
    }
}

impl Drop for PgTx {
    fn drop(&mut self) {
        if self.open
            && let Err(e) = self.conn.batch_execute("ROLLBACK")
        {
            tracing::debug!(error = %pg_err(&e), "rolling back");
        }
    }
}

fn i(x: u64) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

fn u(x: i64) -> u64 {
    u64::try_from(x).unwrap_or(0)
}

fn ids(xs: &[u64]) -> Vec<i64> {
    xs.iter().map(|&x| i(x)).collect()
}

type P<'a> = &'a [(&'a (dyn ToSql + Sync), Type)];

impl PgTx {
    /// Sends the held-back writes, as one statement per kind.
    fn flush(&mut self) -> R<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let p = std::mem::take(&mut self.pending);
        let e = |e: postgres::Error| pg_err(&e);
        if !p.log_deleted.is_empty() {
            self.conn
                .execute_typed(
                    "DELETE FROM log WHERE seq = ANY($1)",
                    &[(&p.log_deleted, Type::INT8_ARRAY)],
                )
                .map_err(e)?;
        }
        if !p.log_added.is_empty() {
            let (seqs, keys): (Vec<i64>, Vec<Vec<u8>>) = p.log_added.into_iter().unzip();
            self.conn
                .execute_typed(
                    "INSERT INTO log (seq, key) SELECT * FROM unnest($1::bigint[], $2::bytea[])",
                    &[(&seqs, Type::INT8_ARRAY), (&keys, Type::BYTEA_ARRAY)],
                )
                .map_err(e)?;
        }
        if !p.objections.is_empty() {
            let (nhs, rows): (Vec<i64>, Vec<Vec<u8>>) = p.objections.into_iter().unzip();
            self.conn
                .execute_typed(
                    "INSERT INTO objections (nhs, row) SELECT * FROM unnest($1::bigint[], $2::bytea[]) \
                     ON CONFLICT (nhs) DO UPDATE SET row = EXCLUDED.row",
                    &[(&nhs, Type::INT8_ARRAY), (&rows, Type::BYTEA_ARRAY)],
                )
                .map_err(e)?;
        }
        if !p.patients.is_empty() {
            let n = p.patients.len();
            let (mut nhs, mut seq, mut fhir, mut version, mut alerts, mut content, mut row) = (
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
                Vec::with_capacity(n),
            );
            for (k, v) in p.patients {
                nhs.push(k);
                seq.push(v.seq);
                fhir.push(v.fhir_id);
                version.push(v.version);
                alerts.push(v.alerts);
                content.push(v.content);
                row.push(v.row);
            }
            self.conn
                .execute_typed(
                    "INSERT INTO patients (nhs, seq, fhir_id, version, alerts, content, row) \
                     SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], \
                     $5::boolean[], $6::bytea[], $7::bytea[]) \
                     ON CONFLICT (nhs) DO UPDATE SET seq = EXCLUDED.seq, \
                     fhir_id = EXCLUDED.fhir_id, version = EXCLUDED.version, \
                     alerts = EXCLUDED.alerts, content = EXCLUDED.content, row = EXCLUDED.row",
                    &[
                        (&nhs, Type::INT8_ARRAY),
                        (&seq, Type::INT8_ARRAY),
                        (&fhir, Type::TEXT_ARRAY),
                        (&version, Type::INT8_ARRAY),
                        (&alerts, Type::BOOL_ARRAY),
                        (&content, Type::BYTEA_ARRAY),
                        (&row, Type::BYTEA_ARRAY),
                    ],
                )
                .map_err(e)?;
        }
        Ok(())
    }

    fn q(&mut self, sql: &str, params: P<'_>) -> R<Vec<Row>> {
        self.flush()?;
        self.conn.query_typed(sql, params).map_err(|e| pg_err(&e))
    }

    fn opt(&mut self, sql: &str, params: P<'_>) -> R<Option<Row>> {
        self.flush()?;
        self.conn
            .query_typed_opt(sql, params)
            .map_err(|e| pg_err(&e))
    }

    fn x(&mut self, sql: &str, params: P<'_>) -> R<u64> {
        self.flush()?;
        self.conn.execute_typed(sql, params).map_err(|e| pg_err(&e))
    }

    /// Each row of a query, as it arrives (not gathered in memory).
    fn each(&mut self, sql: &str, params: P<'_>, mut f: impl FnMut(&Row) -> R<()>) -> R<()> {
        use postgres::fallible_iterator::FallibleIterator;
        self.flush()?;
        let mut rows = self
            .conn
            .query_typed_raw(sql, params.iter().map(|(v, t)| (*v, t.clone())))
            .map_err(|e| pg_err(&e))?;
        while let Some(row) = rows.next().map_err(|e| pg_err(&e))? {
            f(&row)?;
        }
        Ok(())
    }

    /// ` FOR UPDATE` in a write transaction: a row read there is held until commit.
    fn lock(&self) -> &'static str {
        if self.write { " FOR UPDATE" } else { "" }
    }

    fn blob<T: serde::de::DeserializeOwned>(
        &mut self,
        sql: &str,
        params: P<'_>,
        table: &'static str,
    ) -> R<Option<T>> {
        match self.opt(sql, params)? {
            Some(row) => Ok(Some(dec(&row.get::<_, Vec<u8>>(0), table)?)),
            None => Ok(None),
        }
    }

    fn by_text<T: serde::de::DeserializeOwned>(
        &mut self,
        table: &'static str,
        key: &str,
        id: &str,
    ) -> R<Option<T>> {
        let sql = format!("SELECT row FROM {table} WHERE {key} = $1{}", self.lock());
        self.blob(&sql, &[(&id, Type::TEXT)], table)
    }

    fn all_by_text<T: serde::de::DeserializeOwned>(
        &mut self,
        table: &'static str,
        key: &str,
    ) -> R<Vec<(String, T)>> {
        let sql = format!("SELECT {key}, row FROM {table} ORDER BY {key}");
        let mut out = Vec::new();
        for row in self.q(&sql, &[])? {
            out.push((row.get(0), dec(&row.get::<_, Vec<u8>>(1), table)?));
        }
        Ok(out)
    }

    fn put_text(&mut self, table: &'static str, key: &str, id: &str, row: &[u8]) -> R<()> {
        let sql = format!(
            "INSERT INTO {table} ({key}, row) VALUES ($1, $2) \
             ON CONFLICT ({key}) DO UPDATE SET row = EXCLUDED.row"
        );
        self.x(&sql, &[(&id, Type::TEXT), (&row, Type::BYTEA)])?;
        Ok(())
    }

    fn visit_audit(&mut self, sql: &str, params: P<'_>, f: AuditVisit<'_>) -> R<()> {
        self.each(sql, params, |row| {
            let device: &str = row.get(0);
            f(device, u(row.get(1)), row.get::<_, &[u8]>(2))
        })
    }
}

impl Read for PgTx {
    fn head(&mut self) -> R<u64> {
        let sql = format!("SELECT seq FROM head WHERE id = 1{}", self.lock());
        let row = self.opt(&sql, &[])?.ok_or(StateError::Corrupt("head"))?;
        Ok(u(row.get(0)))
    }

    fn patient(&mut self, nhs: u64) -> R<Option<PatientRow>> {
        let sql = format!("SELECT row FROM patients WHERE nhs = $1{}", self.lock());
        self.blob(&sql, &[(&i(nhs), Type::INT8)], "patients")
    }

    fn summaries(&mut self, nhs: &[u64]) -> R<HashMap<u64, (u64, bool)>> {
        let mut out = HashMap::with_capacity(nhs.len());
        if nhs.is_empty() {
            return Ok(out);
        }
        let keys = ids(nhs);
        for row in self.q(
            "SELECT nhs, version, alerts FROM patients WHERE nhs = ANY($1)",
            &[(&keys, Type::INT8_ARRAY)],
        )? {
            out.insert(u(row.get(0)), (u(row.get(1)), row.get(2)));
        }
        Ok(out)
    }

    fn content_hashes(&mut self, nhs: &[u64]) -> R<HashMap<u64, [u8; 32]>> {
        let mut out = HashMap::with_capacity(nhs.len());
        if nhs.is_empty() {
            return Ok(out);
        }
        let keys = ids(nhs);
        for row in self.q(
            "SELECT nhs, content FROM patients WHERE nhs = ANY($1) AND content IS NOT NULL",
            &[(&keys, Type::INT8_ARRAY)],
        )? {
            if let Ok(h) = <[u8; 32]>::try_from(row.get::<_, &[u8]>(1)) {
                out.insert(u(row.get(0)), h);
            }
        }
        Ok(out)
    }

    fn held(&mut self, f: &mut dyn FnMut(u64) -> R<()>) -> R<()> {
        self.each(
            "SELECT nhs FROM patients WHERE version <> 0 ORDER BY nhs",
            &[],
            |row| f(u(row.get(0))),
        )
    }

    fn held_fhir_ids(&mut self, f: &mut dyn FnMut(u64, &str) -> R<()>) -> R<()> {
        self.each(
            "SELECT nhs, fhir_id FROM patients WHERE version <> 0 ORDER BY nhs",
            &[],
            |row| f(u(row.get(0)), row.get(1)),
        )
    }

    fn objection(&mut self, nhs: u64) -> R<Option<ObjectionRow>> {
        let sql = format!("SELECT row FROM objections WHERE nhs = $1{}", self.lock());
        self.blob(&sql, &[(&i(nhs), Type::INT8)], "objections")
    }

    fn objections(&mut self, nhs: &[u64]) -> R<HashMap<u64, ObjectionRow>> {
        let mut out = HashMap::new();
        if nhs.is_empty() {
            return Ok(out);
        }
        let keys = ids(nhs);
        for row in self.q(
            "SELECT nhs, row FROM objections WHERE nhs = ANY($1)",
            &[(&keys, Type::INT8_ARRAY)],
        )? {
            out.insert(u(row.get(0)), dec(&row.get::<_, Vec<u8>>(1), "objections")?);
        }
        Ok(out)
    }

    fn log_after(&mut self, seq: u64, f: &mut dyn FnMut(LogKey) -> R<()>) -> R<()> {
        self.each(
            "SELECT key FROM log WHERE seq > $1 ORDER BY seq",
            &[(&i(seq), Type::INT8)],
            |row| f(dec(row.get::<_, &[u8]>(0), "log")?),
        )
    }

    fn lease(&mut self, id: u64) -> R<Option<LeaseRow>> {
        let sql = format!("SELECT row FROM leases WHERE id = $1{}", self.lock());
        self.blob(&sql, &[(&i(id), Type::INT8)], "leases")
    }

    fn leases(&mut self) -> R<Vec<LeaseRow>> {
        let mut out = Vec::new();
        for row in self.q("SELECT row FROM leases ORDER BY id", &[])? {
            out.push(dec(&row.get::<_, Vec<u8>>(0), "leases")?);
        }
        Ok(out)
    }

    fn is_lookup_lease(&mut self, id: u64) -> R<bool> {
        Ok(self
            .opt(
                "SELECT 1 FROM lookups WHERE lease = $1",
                &[(&i(id), Type::INT8)],
            )?
            .is_some())
    }

    fn lookups(&mut self) -> R<Vec<LookupRow>> {
        let mut out = Vec::new();
        for row in self.q("SELECT row FROM lookups ORDER BY id", &[])? {
            out.push(
                serde_json::from_slice(row.get::<_, &[u8]>(0))
                    .map_err(|_| StateError::Corrupt("lookups"))?,
            );
        }
        Ok(out)
    }

    fn device(&mut self, id: &str) -> R<Option<DeviceRow>> {
        self.by_text("devices", "id", id)
    }

    fn devices(&mut self) -> R<BTreeMap<String, DeviceRow>> {
        Ok(self.all_by_text("devices", "id")?.into_iter().collect())
    }

    fn device_by_certificate(&mut self, fingerprint: &[u8; 32]) -> R<Option<String>> {
        let fp = fingerprint.as_slice();
        Ok(self
            .opt(
                "SELECT device FROM certificates WHERE sha256 = $1",
                &[(&fp, Type::BYTEA)],
            )?
            .map(|r| r.get(0)))
    }

    fn token(&mut self, hash: &[u8; 32]) -> R<Option<TokenRow>> {
        let sql = format!(
            "SELECT row FROM enrolment_tokens WHERE sha256 = $1{}",
            self.lock()
        );
        let h = hash.as_slice();
        self.blob(&sql, &[(&h, Type::BYTEA)], "tokens")
    }

    fn renewal(&mut self, hash: &[u8; 32]) -> R<Option<RenewalRow>> {
        let sql = format!(
            "SELECT row FROM renewal_tokens WHERE sha256 = $1{}",
            self.lock()
        );
        let h = hash.as_slice();
        self.blob(&sql, &[(&h, Type::BYTEA)], "renewal_tokens")
    }

    fn source_value(&mut self, key: &str) -> R<Option<Vec<u8>>> {
        Ok(self
            .opt(
                "SELECT value FROM source WHERE key = $1",
                &[(&key, Type::TEXT)],
            )?
            .map(|r| r.get(0)))
    }

    fn counts(&mut self) -> R<(u64, u64, u64)> {
        let row = self
            .opt(
                "SELECT (SELECT count(*) FROM patients), (SELECT count(*) FROM objections), \
                 (SELECT count(*) FROM leases)",
                &[],
            )?
            .ok_or(StateError::Corrupt("counts"))?;
        Ok((u(row.get(0)), u(row.get(1)), u(row.get(2))))
    }

    fn health(&mut self, device: &str) -> R<Option<HealthRow>> {
        self.by_text("device_health", "device", device)
    }

    fn health_rows(&mut self) -> R<Vec<(String, HealthRow)>> {
        self.all_by_text("device_health", "device")
    }

    fn anchor(&mut self, device: &str) -> R<Option<AnchorRow>> {
        self.by_text("device_anchor", "device", device)
    }

    fn anchors(&mut self) -> R<Vec<(String, AnchorRow)>> {
        self.all_by_text("device_anchor", "device")
    }

    fn audit_head(&mut self, device: &str) -> R<Option<ChainHead>> {
        if self.write {
            // A row to lock: two instances given the same device's first push wait for
            // each other here.
            let empty = ChainHead::default().encode();
            self.x(
                "INSERT INTO audit_heads (device, row) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                &[(&device, Type::TEXT), (&empty, Type::BYTEA)],
            )?;
        }
        let sql = format!(
            "SELECT row FROM audit_heads WHERE device = $1{}",
            self.lock()
        );
        match self.opt(&sql, &[(&device, Type::TEXT)])? {
            Some(row) => Ok(Some(ChainHead::decode(row.get::<_, &[u8]>(0))?)),
            None => Ok(None),
        }
    }

    fn audit_heads(&mut self) -> R<Vec<(String, ChainHead)>> {
        let mut out = Vec::new();
        for row in self.q("SELECT device, row FROM audit_heads ORDER BY device", &[])? {
            out.push((row.get(0), ChainHead::decode(row.get::<_, &[u8]>(1))?));
        }
        Ok(out)
    }

    fn officer_log(&mut self, f: &mut dyn FnMut(u64, &[u8]) -> R<()>) -> R<()> {
        self.each(
            "SELECT seq, entry FROM officer_log ORDER BY seq",
            &[],
            |row| f(u(row.get(0)), row.get::<_, &[u8]>(1)),
        )
    }

    fn audit_entry(&mut self, device: &str, seq: u64) -> R<Option<Vec<u8>>> {
        Ok(self
            .opt(
                "SELECT entry FROM audit WHERE device = $1 AND seq = $2",
                &[(&device, Type::TEXT), (&i(seq), Type::INT8)],
            )?
            .map(|r| r.get(0)))
    }

    fn audit(&mut self, device: Option<&str>, f: AuditVisit<'_>) -> R<()> {
        match device {
            Some(d) => self.visit_audit(
                "SELECT device, seq, entry FROM audit WHERE device = $1 ORDER BY seq",
                &[(&d, Type::TEXT)],
                f,
            ),
            None => self.visit_audit(
                "SELECT device, seq, entry FROM audit ORDER BY device, seq",
                &[],
                f,
            ),
        }
    }

    fn audit_after(&mut self, device: &str, after: u64, limit: u64, f: AuditVisit<'_>) -> R<()> {
        let (after, limit) = (i(after), i(limit));
        self.visit_audit(
            "SELECT device, seq, entry FROM audit WHERE device = $1 AND seq > $2 \
             ORDER BY seq LIMIT $3",
            &[
                (&device, Type::TEXT),
                (&after, Type::INT8),
                (&limit, Type::INT8),
            ],
            f,
        )
    }

    fn forwarded(&mut self) -> R<HashMap<String, u64>> {
        let mut out = HashMap::new();
        for row in self.q("SELECT device, seq FROM audit_forwarded", &[])? {
            out.insert(row.get(0), u(row.get(1)));
        }
        Ok(out)
    }

    fn audit_emergency(&mut self, f: AuditVisit<'_>) -> R<()> {
        self.visit_audit(
            "SELECT device, seq, entry FROM audit WHERE emergency ORDER BY device, seq",
            &[],
            f,
        )
    }

    fn audit_of_patient(&mut self, nhs: u64, f: AuditVisit<'_>) -> R<()> {
        self.visit_audit(
            "SELECT a.device, a.seq, a.entry FROM audit_by_patient p \
             JOIN audit a ON a.device = p.device AND a.seq = p.seq AND a.month = p.month \
             WHERE p.nhs = $1 ORDER BY a.device, a.seq",
            &[(&i(nhs), Type::INT8)],
            f,
        )
    }
}

impl Write for PgTx {
    fn set_head(&mut self, seq: u64) -> R<()> {
        self.x(
            "UPDATE head SET seq = $1 WHERE id = 1",
            &[(&i(seq), Type::INT8)],
        )?;
        Ok(())
    }

    fn put_patient(&mut self, nhs: u64, row: &PatientRow, hash: Option<[u8; 32]>) -> R<()> {
        let (version, alerts) = summary_of(row);
        self.pending.patients.insert(
            i(nhs),
            PendingPatient {
                seq: i(row.seq),
                fhir_id: row.fhir_id.clone(),
                version: i(version),
                alerts,
                content: hash.map(|h| h.to_vec()),
                row: enc(row),
            },
        );
        Ok(())
    }

    fn set_content_hash(&mut self, nhs: u64, hash: [u8; 32]) -> R<()> {
        let h = hash.as_slice();
        self.x(
            "UPDATE patients SET content = $2 WHERE nhs = $1",
            &[(&i(nhs), Type::INT8), (&h, Type::BYTEA)],
        )?;
        Ok(())
    }

    fn put_objection(&mut self, nhs: u64, row: &ObjectionRow) -> R<()> {
        self.pending.objections.insert(i(nhs), enc(row));
        Ok(())
    }

    fn relog(&mut self, old: Option<u64>, new: u64, key: LogKey) -> R<()> {
        let p = &mut self.pending;
        if let Some(old) = old.map(i) {
            // Added in this transaction: it never reaches the table.
            if p.log_added.remove(&old).is_none() {
                p.log_deleted.push(old);
            }
        }
        p.log_added.insert(i(new), enc(&key));
        Ok(())
    }

    fn next_lease_id(&mut self) -> R<u64> {
        let row = self
            .opt(
                "UPDATE head SET next_lease = next_lease + 1 WHERE id = 1 \
                 RETURNING next_lease - 1",
                &[],
            )?
            .ok_or(StateError::Corrupt("head"))?;
        Ok(u(row.get(0)))
    }

    fn put_lease(&mut self, id: u64, row: &LeaseRow) -> R<()> {
        let bytes = enc(row);
        self.x(
            "INSERT INTO leases (id, row) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET row = EXCLUDED.row",
            &[(&i(id), Type::INT8), (&bytes, Type::BYTEA)],
        )?;
        Ok(())
    }

    fn add_lookup(&mut self, row: &LookupRow) -> R<()> {
        let json =
            serde_json::to_vec(row).map_err(|e| StateError::Invalid(format!("lookup row: {e}")))?;
        self.x(
            "INSERT INTO lookups (lease, row) VALUES ($1, $2)",
            &[(&i(row.lease), Type::INT8), (&json, Type::BYTEA)],
        )?;
        Ok(())
    }

    fn put_device(&mut self, id: &str, row: &DeviceRow) -> R<()> {
        self.put_text("devices", "id", id, &enc(row))
    }

    fn put_certificate(&mut self, fingerprint: &[u8; 32], device: &str) -> R<()> {
        let fp = fingerprint.as_slice();
        self.x(
            "INSERT INTO certificates (sha256, device) VALUES ($1, $2) \
             ON CONFLICT (sha256) DO UPDATE SET device = EXCLUDED.device",
            &[(&fp, Type::BYTEA), (&device, Type::TEXT)],
        )?;
        Ok(())
    }

    fn put_token(&mut self, hash: &[u8; 32], row: &TokenRow) -> R<()> {
        let (h, bytes) = (hash.as_slice(), enc(row));
        self.x(
            "INSERT INTO enrolment_tokens (sha256, row) VALUES ($1, $2) \
             ON CONFLICT (sha256) DO UPDATE SET row = EXCLUDED.row",
            &[(&h, Type::BYTEA), (&bytes, Type::BYTEA)],
        )?;
        Ok(())
    }

    fn put_renewal(&mut self, hash: &[u8; 32], row: &RenewalRow) -> R<()> {
        let (h, bytes) = (hash.as_slice(), enc(row));
        self.x(
            "INSERT INTO renewal_tokens (sha256, row) VALUES ($1, $2) \
             ON CONFLICT (sha256) DO UPDATE SET row = EXCLUDED.row",
            &[(&h, Type::BYTEA), (&bytes, Type::BYTEA)],
        )?;
        Ok(())
    }

    fn set_source_value(&mut self, key: &str, value: &[u8]) -> R<()> {
        self.x(
            "INSERT INTO source (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            &[(&key, Type::TEXT), (&value, Type::BYTEA)],
        )?;
        Ok(())
    }

    fn put_health(&mut self, device: &str, row: &HealthRow) -> R<()> {
        self.put_text("device_health", "device", device, &enc(row))
    }

    fn put_anchor(&mut self, device: &str, row: &AnchorRow) -> R<()> {
        self.put_text("device_anchor", "device", device, &enc(row))
    }

    fn put_audit_head(&mut self, device: &str, head: &ChainHead) -> R<()> {
        self.put_text("audit_heads", "device", device, &head.encode())
    }

    fn set_forwarded(&mut self, device: &str, seq: u64) -> R<()> {
        let seq = i(seq);
        self.x(
            "INSERT INTO audit_forwarded (device, seq) VALUES ($1, $2) \
             ON CONFLICT (device) DO UPDATE SET seq = GREATEST(audit_forwarded.seq, EXCLUDED.seq)",
            &[(&device, Type::TEXT), (&seq, Type::INT8)],
        )?;
        Ok(())
    }

    fn log_officer(&mut self, at: u64, entry: &[u8]) -> R<u64> {
        let at = i(at);
        let row = self
            .opt(
                "INSERT INTO officer_log (at, entry) VALUES ($1, $2) RETURNING seq",
                &[(&at, Type::INT8), (&entry, Type::BYTEA)],
            )?
            .ok_or_else(|| StateError::Database("officer log: no sequence returned".into()))?;
        Ok(u(row.get(0)))
    }

    fn put_audit(
        &mut self,
        device: &str,
        seq: u64,
        bytes: &[u8],
        at: u64,
        patients: &[u64],
        emergency: bool,
    ) -> R<()> {
        // Stored once however often it is resent, whichever instance receives it.
        // Partitioned by the month stored, so the key includes it: that (device, seq) is
        // stored once rests on the device's chain head, locked while a push is checked
        // (an entry at or below the head is compared, never inserted).
        let month = month_now();
        let stored = self.x(
            "INSERT INTO audit (device, seq, month, at, emergency, entry) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            &[
                (&device, Type::TEXT),
                (&i(seq), Type::INT8),
                (&month, Type::INT4),
                (&i(at), Type::INT8),
                (&emergency, Type::BOOL),
                (&bytes, Type::BYTEA),
            ],
        )?;
        if stored > 0 && !patients.is_empty() {
            let keys = ids(patients);
            self.x(
                "INSERT INTO audit_by_patient (nhs, device, seq, month) \
                 SELECT DISTINCT n, $2, $3, $4 FROM unnest($1::bigint[]) AS n \
                 ON CONFLICT DO NOTHING",
                &[
                    (&keys, Type::INT8_ARRAY),
                    (&device, Type::TEXT),
                    (&i(seq), Type::INT8),
                    (&month, Type::INT4),
                ],
            )?;
        }
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> R<()> {
        self.flush()?;
        self.open = false;
        self.conn.batch_execute("COMMIT").map_err(|e| pg_err(&e))
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;

    /// The server's DETAIL line quotes key values (an NHS number, here): the hub's
    /// error keeps the code and message and drops it.
    #[test]
    fn database_errors_never_carry_the_key_values_postgres_quotes() {
        let cluster = crate::testing::PgCluster::start();
        let mut client = postgres::Client::connect(&cluster.url(), postgres::NoTls).unwrap();
        client
            .batch_execute(
                "CREATE TABLE t (nhs bigint PRIMARY KEY); INSERT INTO t VALUES (9990000018)",
            )
            .unwrap();
        let e = client
            .execute("INSERT INTO t VALUES (9990000018)", &[])
            .unwrap_err();
        let theirs = e.as_db_error().map(ToString::to_string).unwrap_or_default();
        assert!(
            theirs.contains("9990000018"),
            "postgres quotes it: {theirs}"
        );
        let ours = pg_err(&e).to_string();
        assert!(!ours.contains("9990000018"), "{ours}");
        assert!(ours.contains("23505"), "the SQLSTATE stays: {ours}");
    }

    #[test]
    fn a_schema_name_is_only_what_sql_can_take_verbatim() {
        for ok in ["carecache", "north_2", "_x"] {
            assert!(valid_schema(ok), "{ok}");
        }
        for bad in ["", "North", "a-b", "a;DROP", "2x", &"x".repeat(64)] {
            assert!(!valid_schema(bad), "{bad}");
        }
    }
}
