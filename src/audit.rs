//! The device's audit log: one writer thread that seals, chains and commits entries,
//! batching whatever is pending into one durable redb commit (group commit). A caller
//! learns its entry's sequence only once the commit holding it is on disk; the local API
//! answers after that, and refuses (503) when the commit fails. DESIGN.md invariant 2.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use sync_protocol::audit::{AuditEntry, AuditRecord};
use sync_protocol::types::Timestamp;
use tokio::sync::oneshot;

use crate::store::{AuditHead, Store, StoreError};

/// Most entries in one commit.
const MAX_GROUP: usize = 4_096;

/// Why an entry was not committed. No patient data.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    /// The commit failed (disk full, I/O error); the access must be refused.
    #[error("the audit log cannot be written: {0}")]
    Unwritable(String),
    /// The log has stopped (the daemon is shutting down).
    #[error("the audit log is closed")]
    Closed,
}

/// The log's health and counters, for status and metrics.
#[derive(Debug, Default)]
pub struct AuditHealth {
    /// Entries committed since start.
    pub committed: AtomicU64,
    /// Commits (fsyncs) since start.
    pub commits: AtomicU64,
    /// Entries refused because their commit failed.
    pub failed: AtomicU64,
    /// The last committed sequence.
    pub head_seq: AtomicU64,
    /// Why the last commit failed, while the log is failing (cleared by a success).
    failing: Mutex<Option<String>>,
    /// What waits for upload. Changed under this lock by the writer (after a commit) and
    /// the uploader (after an acknowledgement), so the oldest time stays right.
    backlog: Mutex<BacklogState>,
}

#[derive(Debug, Default)]
struct BacklogState {
    acked: u64,
    oldest: Option<Timestamp>,
}

/// Entries written but not yet acknowledged by the hub.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backlog {
    /// How many.
    pub entries: u64,
    /// Trusted time of the oldest (none when there are none).
    pub oldest: Option<Timestamp>,
    /// The last sequence the hub acknowledged.
    pub acked: u64,
}

impl AuditHealth {
    /// The reason the log is failing, if its last commit failed.
    pub fn failing(&self) -> Option<String> {
        self.failing.lock().map_or(None, |g| g.clone())
    }

    /// What waits for upload.
    pub fn backlog(&self) -> Backlog {
        let Ok(g) = self.backlog.lock() else {
            return Backlog::default();
        };
        let head = self.head_seq.load(Ordering::Acquire);
        Backlog {
            entries: head.saturating_sub(g.acked),
            oldest: g.oldest,
            acked: g.acked,
        }
    }

    /// The hub acknowledged through `acked` and the store dropped those entries; the
    /// oldest remaining entry's time is read from `store`.
    pub(crate) fn acknowledged(&self, acked: u64, store: &Store) {
        let Ok(mut g) = self.backlog.lock() else {
            return;
        };
        g.acked = g.acked.max(acked);
        // The writer moves the head under this lock after its commit: if the head is
        // still at or below the acknowledgement, nothing newer is waiting, and a commit
        // in flight sets its own time when it takes the lock.
        g.oldest = if self.head_seq.load(Ordering::Acquire) <= g.acked {
            None
        } else {
            match store.audit_backlog() {
                Ok((_, oldest)) => oldest,
                Err(e) => {
                    tracing::error!(error = %e, "reading the oldest waiting audit entry failed");
                    g.oldest
                }
            }
        };
    }

    fn committed(&self, head: u64, first_at: Timestamp) {
        if let Ok(mut g) = self.backlog.lock() {
            self.head_seq.store(head, Ordering::Release);
            if g.oldest.is_none() && head > g.acked {
                g.oldest = Some(first_at);
            }
        }
    }

    fn set_failing(&self, why: Option<String>) {
        if let Ok(mut g) = self.failing.lock() {
            *g = why;
        }
    }
}

struct Pending {
    record: AuditRecord,
    done: oneshot::Sender<Result<u64, AuditError>>,
}

/// Handle to the writer. Dropping the last handle stops the writer after it has
/// committed what was already sent.
pub struct AuditLog {
    tx: Mutex<Option<Sender<Pending>>>,
    health: Arc<AuditHealth>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("head_seq", &self.health.head_seq.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Starts the writer over `store`, continuing the chain from its stored head.
    pub fn start(store: Arc<Store>) -> Result<Self, StoreError> {
        let head = store.audit_head()?;
        let acked = store.audit_acked()?;
        let oldest = store.audit_backlog().map_or_else(
            |e| {
                tracing::error!(error = %e, "reading the oldest waiting audit entry failed; run `carecache audit verify`");
                None
            },
            |(_, oldest)| oldest,
        );
        let health = Arc::new(AuditHealth {
            backlog: Mutex::new(BacklogState {
                acked: acked.seq,
                oldest,
            }),
            ..AuditHealth::default()
        });
        health.head_seq.store(head.seq, Ordering::Relaxed);
        let (tx, rx) = channel();
        let h = Arc::clone(&health);
        let writer = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || write_loop(&store, head, &rx, &h))
            .map_err(|_| StoreError::Poisoned)?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            health,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// The health counters.
    pub fn health(&self) -> &Arc<AuditHealth> {
        &self.health
    }

    /// Queues `record`; the receiver yields its sequence once it is durable.
    pub fn submit(&self, record: AuditRecord) -> oneshot::Receiver<Result<u64, AuditError>> {
        let (done, rx) = oneshot::channel();
        let pending = Pending { record, done };
        let tx = self.tx.lock().ok().and_then(|g| g.clone());
        match tx {
            Some(tx) => {
                if let Err(std::sync::mpsc::SendError(p)) = tx.send(pending) {
                    let _ = p.done.send(Err(AuditError::Closed));
                }
            }
            None => {
                let _ = pending.done.send(Err(AuditError::Closed));
            }
        }
        rx
    }

    /// Writes `record` durably, waiting for the commit (for threads outside the async
    /// runtime: the sync loop, CLI commands).
    pub fn write_blocking(&self, record: AuditRecord) -> Result<u64, AuditError> {
        self.submit(record)
            .blocking_recv()
            .unwrap_or(Err(AuditError::Closed))
    }

    /// Writes `record` durably.
    pub async fn write(&self, record: AuditRecord) -> Result<u64, AuditError> {
        self.submit(record).await.unwrap_or(Err(AuditError::Closed))
    }

    /// Stops accepting entries and waits for the writer to commit what it holds.
    pub fn close(&self) {
        if let Ok(mut g) = self.tx.lock() {
            g.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut g| g.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn write_loop(store: &Store, mut head: AuditHead, rx: &Receiver<Pending>, health: &AuditHealth) {
    let mut group: Vec<Pending> = Vec::new();
    while let Ok(first) = rx.recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(p) => group.push(p),
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let mut entries = Vec::with_capacity(group.len());
        let mut waiting = Vec::with_capacity(group.len());
        let mut next = head;
        let first_at = group.first().map(|p| p.record.at);
        for p in group.drain(..) {
            let seq = next.seq.saturating_add(1);
            match AuditEntry::seal(&next.hash, seq, &p.record) {
                Ok(e) => {
                    next = AuditHead { seq, hash: e.hash };
                    entries.push(e);
                    waiting.push((seq, p.done));
                }
                Err(e) => {
                    // A record over the size limit is a bug; its access is refused.
                    tracing::error!(error = %e, "audit record could not be sealed");
                    let _ = p
                        .done
                        .send(Err(AuditError::Unwritable("record too large".into())));
                }
            }
        }
        if entries.is_empty() {
            continue;
        }
        match store.append_audit_many(&entries) {
            Ok(()) => {
                head = next;
                if let Some(at) = first_at {
                    health.committed(head.seq, at);
                }
                health.commits.fetch_add(1, Ordering::Relaxed);
                health
                    .committed
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
                health.set_failing(None);
                for (seq, done) in waiting {
                    let _ = done.send(Ok(seq));
                }
            }
            Err(e) => {
                let why = e.to_string();
                tracing::error!(error = %why, entries = entries.len(), "audit commit failed; accesses refused");
                health.set_failing(Some(why.clone()));
                health
                    .failed
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
                // The stored head may have moved if the failure came after the commit
                // point; re-read it so the chain continues from what is on disk.
                if let Ok(h) = store.audit_head() {
                    head = h;
                }
                for (_, done) in waiting {
                    let _ = done.send(Err(AuditError::Unwritable(why.clone())));
                }
            }
        }
    }
}
