//! The sync engine: one round of hello → pull … until `more = false`, as a state machine
//! with no I/O and no clock of its own (STYLE.md habit 6). The caller sends what it is
//! told to send, hands back what the hub answered with the trusted time, applies each
//! checked batch to the store in one transaction and reports the held digest when asked.
//!
//! Every batch is checked whole before anything of it is applied: hub time near trusted
//! time; every upserted patient named by a lease the device will hold after the batch;
//! no item carrying a code on the sensitive list. A batch that fails is rejected whole
//! and the round ends with the reason (SPEC.md §7). After the last batch the device's
//! holding is compared with the hub's allowed-set digest; on a mismatch the round starts
//! again from no cursor and, at its end, purges every patient the hub did not send.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sync_protocol::NhsNumber;
use sync_protocol::codec::SUPPORTED_VERSIONS;
use sync_protocol::message::{
    AllowedSetDigest, Batch, Checkin, ErrorCode, ErrorMessage, Health, Hello, Lease, LeaseChange,
    MAX_PULL_WANT, Message, MessageKind, Pull, Welcome,
};
use sync_protocol::sensitive::CodeList;
use sync_protocol::types::{
    BoundedVec, Capabilities, Cursor, DeviceId, Hash32, LeaseId, Text, Timestamp,
};

use crate::clock::{HubTimeError, check_hub_time};

/// Path of each exchange (SPEC.md §1).
pub mod path {
    /// Enrolment.
    pub const ENROL: &str = "/ccsp/v1/enrol";
    /// Hello.
    pub const HELLO: &str = "/ccsp/v1/hello";
    /// Pull.
    pub const PULL: &str = "/ccsp/v1/pull";
    /// Audit push.
    pub const AUDIT: &str = "/ccsp/v1/audit";
    /// Checkin (version 6).
    pub const CHECKIN: &str = "/ccsp/v1/checkin";
    /// Certificate renewal (version 6).
    pub const RENEW: &str = "/ccsp/v1/renew";
}

/// How far a batch's hub time may fall behind the last applied batch's before it is
/// taken for a replay (a hub's clock may be stepped back a little).
pub const REPLAY_TOLERANCE: Duration = Duration::from_secs(60);

/// Why a round stopped without finishing. Nothing of a rejected answer was applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    /// Hub: a batch named patients no lease on this device covers.
    #[error("batch rejected: {0} patient(s) outside this device's leases")]
    OutsideLeases(usize),
    /// Hub: a batch carried items coded on the sensitive list.
    #[error("batch rejected: {0} item(s) coded as sensitive")]
    Sensitive(usize),
    /// Hub or device clock: hub time too far from trusted time.
    #[error("answer rejected: {0}")]
    HubTime(HubTimeError),
    /// Hub: a batch older than one already committed (a replayed answer).
    #[error(
        "batch rejected: its hub time is {} older than a batch already applied (replayed?)",
        crate::clock::human(*.older_by_secs)
    )]
    Replayed {
        /// How much older, in seconds.
        older_by_secs: u64,
    },
    /// Hub: answered with a message of the wrong kind.
    #[error("hub answered {got} where {expected} was expected")]
    Unexpected {
        /// Expected kind.
        expected: MessageKind,
        /// Received kind.
        got: MessageKind,
    },
    /// Hub: speaks no protocol version this device does.
    #[error("hub chose protocol version {0}, which this device does not support")]
    Version(u16),
    /// Hub: the welcome named another device.
    #[error("hub identified this device as someone else")]
    WrongDevice,
    /// Hub: after a full resync the holding still differs from the allowed set.
    #[error(
        "holding differs from the hub's allowed set after a full resync ({held} held, {allowed} allowed)"
    )]
    DigestMismatch {
        /// Patients held.
        held: u32,
        /// Patients the hub allows.
        allowed: u32,
    },
    /// Hub: a checkin answer that does not carry the nonce sent, or a time correction
    /// the device will not take (the hub's time went back past its own earlier answers,
    /// or the hub's two times in the exchange disagree).
    #[error("answer rejected: {0}")]
    Checkin(&'static str),
    /// Hub: offered patients no lease on this device covers, or answered more wanted
    /// patients than were asked for, or ended the round with wanted records unsent.
    #[error("batch rejected: {0}")]
    Offers(&'static str),
    /// Hub: refused the request with a protocol error.
    #[error("hub refused: {code:?}: {message}")]
    Refused {
        /// The code.
        code: ErrorCode,
        /// The hub's text.
        message: String,
        /// When to retry, if the hub said.
        retry_after_secs: Option<u32>,
    },
    /// The engine was driven out of order (a bug in the caller).
    #[error("sync engine driven out of order")]
    OutOfOrder,
}

impl From<HubTimeError> for SyncError {
    fn from(e: HubTimeError) -> Self {
        Self::HubTime(e)
    }
}

impl SyncError {
    /// The hub's protocol error as a refusal.
    pub fn refused(e: &ErrorMessage) -> Self {
        Self::Refused {
            code: e.code,
            message: e.message.as_str().to_owned(),
            retry_after_secs: e.retry_after_secs,
        }
    }

    /// True when the answer was refused by the device's own checks (reported as a
    /// rejected batch; the hub or the clocks need attention).
    pub fn is_rejection(&self) -> bool {
        !matches!(self, Self::Refused { .. } | Self::OutOfOrder)
    }
}

/// The hello that opens every session with the hub (a sync round, an audit upload).
pub fn hello(now: Timestamp, software: &Text<64>) -> Message {
    Message::Hello(Hello {
        min_version: *SUPPORTED_VERSIONS.start(),
        max_version: *SUPPORTED_VERSIONS.end(),
        capabilities: Capabilities(Capabilities::ZSTD),
        device_time: now,
        software: software.clone(),
    })
}

/// Checks the hub's welcome: a version this device speaks, this device's id, and hub
/// time within `max_skew` of trusted time `now`.
pub fn check_welcome(
    w: &Welcome,
    device_id: &DeviceId,
    now: Timestamp,
    max_skew: Duration,
) -> Result<(), SyncError> {
    if !SUPPORTED_VERSIONS.contains(&w.version) {
        return Err(SyncError::Version(w.version));
    }
    if w.device_id != *device_id {
        return Err(SyncError::WrongDevice);
    }
    check_hub_time(w.hub_time, now, max_skew)?;
    Ok(())
}

/// What the caller must do next.
#[derive(Debug)]
pub enum Step {
    /// POST this message to this path and hand the answer to [`Round::on_answer`].
    Send(&'static str, Message),
    /// Apply this checked batch in one store transaction (with `keep_only` if set), then
    /// call [`Round::applied`] — with the held digest if `digest` is true.
    Apply(Box<Plan>),
    /// The round is over: the device holds what the hub allows.
    Finished(Summary),
    /// The hub says this device is revoked: destroy its keys and data.
    Wipe,
    /// The hub's time, bound to this round's nonce, is far from trusted time: set
    /// trusted time to it (audited), then begin the round again.
    CorrectClock(Timestamp),
}

/// A checked batch ready to apply.
#[derive(Debug)]
pub struct Plan {
    /// The batch.
    pub batch: Batch,
    /// After a full resync's last batch: purge every held patient not in this set.
    pub keep_only: Option<HashSet<NhsNumber>>,
    /// Whether the caller must compute the held digest after applying.
    pub digest: bool,
    /// Patients still wanted from earlier offers once this batch is applied, oldest
    /// first; the caller adds the batch's offers it lacks, stores the whole with the
    /// cursor, and hands it back to [`Round::applied`].
    pub want: Vec<NhsNumber>,
    /// Bytes of the batch frame on the wire.
    pub wire_bytes: usize,
}

/// Counts for one round (no patient data).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Batches applied.
    pub batches: u32,
    /// Records written.
    pub upserts: u64,
    /// Removals and objections received.
    pub removals: u64,
    /// Lease changes received.
    pub lease_changes: u64,
    /// Frame bytes received.
    pub bytes: u64,
    /// Whether a full resync was needed.
    pub resynced: bool,
}

/// What the round starts from.
#[derive(Debug)]
pub struct Start {
    /// This device.
    pub device_id: DeviceId,
    /// The last committed cursor, if any.
    pub cursor: Option<Cursor>,
    /// The hub time of the last committed batch: a batch older than this by more than
    /// [`REPLAY_TOLERANCE`] is a replay.
    pub last_batch_time: Option<Timestamp>,
    /// Pull everything again and purge what the hub no longer sends.
    pub resync: bool,
    /// The leases held.
    pub leases: Vec<Lease>,
    /// Byte budget per batch.
    pub max_bytes: u32,
    /// Largest accepted hub/trusted time difference.
    pub max_skew: Duration,
    /// The sensitive code list.
    pub sensitive: CodeList,
    /// Software name and version for the hello.
    pub software: Text<64>,
    /// Patients the store holds as the round starts (a device holding none is sent
    /// records rather than offers).
    pub holding: u32,
    /// Offered patients still wanted from an earlier, unfinished round.
    pub want: Vec<NhsNumber>,
    /// Fresh random bytes for this round's checkin (version 6).
    pub nonce: Hash32,
    /// The health report the checkin carries.
    pub health: Health,
    /// The anti-rollback report the checkin carries (version 8).
    pub anchor: Option<sync_protocol::message::AnchorReport>,
    /// Whether this round may correct trusted time from the hub's (not in a round begun
    /// again after a correction).
    pub may_correct_clock: bool,
    /// The device's wall clock, when trusted time discounts it after an earlier
    /// correction: a hub far ahead of trusted time that agrees with this clock corrects
    /// trusted time forward (the clock was repaired). A hub far ahead is otherwise
    /// refused, so a hub whose own clock is wrong cannot end every lease.
    pub discounted_wall: Option<Timestamp>,
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Welcome,
    /// Waiting for the checkin answer; `correct` when the welcome's hub time was too far
    /// from trusted time to accept without it.
    Checkin {
        correct: bool,
        welcome_time: Timestamp,
    },
    Batch,
    Applying {
        more: bool,
        allowed: AllowedSetDigest,
    },
    Done,
}

/// One sync round.
#[derive(Debug)]
pub struct Round {
    start: Start,
    state: State,
    leases: HashMap<LeaseId, Lease>,
    covered: HashSet<NhsNumber>,
    /// Leases as they will be once the batch being applied commits.
    pending: Option<(HashMap<LeaseId, Lease>, HashSet<NhsNumber>)>,
    seen: HashSet<NhsNumber>,
    summary: Summary,
    hub_time: Option<Timestamp>,
    raised_budget: bool,
    /// The objections of a batch refused for its other contents (see
    /// [`Round::take_objections`]).
    salvaged: Vec<sync_protocol::message::ObjectionChange>,
    /// How many wanted patients the last pull named.
    asked: usize,
    /// The CAs the hub's checkin answer said to pin, until the caller takes them.
    trust: Option<Vec<Vec<u8>>>,
    /// Patients the hub expects this device to hold when the round completes.
    expected: u32,
    /// The hub answered a checkin that carried the anti-rollback report (version 8).
    anchor_reported: bool,
    /// The version the welcome chose.
    version: u16,
}

impl Round {
    /// Begins a round; the first step is the hello.
    pub fn begin(start: Start, now: Timestamp) -> (Self, Step) {
        let leases: HashMap<LeaseId, Lease> =
            start.leases.iter().map(|l| (l.id, l.clone())).collect();
        let covered = covered(&leases);
        let hello = hello(now, &start.software);
        let summary = Summary {
            resynced: start.resync,
            ..Summary::default()
        };
        let round = Self {
            start,
            state: State::Welcome,
            leases,
            covered,
            pending: None,
            seen: HashSet::new(),
            summary,
            hub_time: None,
            raised_budget: false,
            salvaged: Vec::new(),
            asked: 0,
            expected: 0,
            trust: None,
            anchor_reported: false,
            version: 1,
        };
        (round, Step::Send(path::HELLO, hello))
    }

    /// The latest hub time accepted in this round (the caller moves trusted time to it).
    pub fn hub_time(&self) -> Option<Timestamp> {
        self.hub_time
    }

    /// The counts so far.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Whether the hub answered a checkin that carried the anti-rollback report (a
    /// restored copy reported is then the hub's to keep).
    pub fn anchor_reported(&self) -> bool {
        self.anchor_reported
    }

    /// Whether this round is a full resync.
    pub fn resyncing(&self) -> bool {
        self.start.resync
    }

    /// The objections (status `Objected`) of the last batch, if it was refused for its
    /// other contents: the caller records them and purges their patients all the same,
    /// for an objection must never wait on a neighbour item. A batch refused as a replay
    /// or for its hub time gives none (it is not the hub's word now).
    pub fn take_objections(&mut self) -> Vec<sync_protocol::message::ObjectionChange> {
        std::mem::take(&mut self.salvaged)
    }

    /// The CA certificates (DER) the hub's checkin answer said to pin, once: the caller
    /// compares them with its pins (a CA rollover).
    pub fn take_trust(&mut self) -> Option<Vec<Vec<u8>>> {
        self.trust.take()
    }

    /// Patients the hub said this device will hold when the round completes (0 until
    /// a version-5 hub has said).
    pub fn expected(&self) -> u32 {
        self.expected
    }

    /// Takes the hub's answer to the last `Send`. `now` is trusted time.
    pub fn on_answer(
        &mut self,
        msg: Message,
        wire_bytes: usize,
        now: Timestamp,
    ) -> Result<Step, SyncError> {
        self.summary.bytes += wire_bytes as u64;
        if let Message::Error(e) = &msg {
            return self.on_error(e);
        }
        match (&self.state, msg) {
            (State::Welcome, Message::Welcome(w)) => {
                let checked = check_welcome(&w, &self.start.device_id, now, self.start.max_skew);
                // From version 6 a hub time far from trusted time is asked again, bound
                // to a nonce, and corrects trusted time (SPEC.md §3.9).
                let correct = match checked {
                    Ok(()) => false,
                    Err(SyncError::HubTime(e))
                        if w.version >= 6
                            && self.start.may_correct_clock
                            && (!e.ahead
                                || self.start.discounted_wall.is_some_and(|wall| {
                                    check_hub_time(w.hub_time, wall, self.start.max_skew).is_ok()
                                })) =>
                    {
                        true
                    }
                    Err(e) => return Err(e),
                };
                self.start.max_bytes = self
                    .start
                    .max_bytes
                    .min(w.max_batch_bytes.max(Pull::MIN_BUDGET));
                self.version = w.version;
                if w.version < 6 {
                    self.hub_time = Some(w.hub_time);
                    self.state = State::Batch;
                    return Ok(self.pull());
                }
                if !correct {
                    self.hub_time = Some(w.hub_time);
                }
                self.state = State::Checkin {
                    correct,
                    welcome_time: w.hub_time,
                };
                Ok(Step::Send(
                    path::CHECKIN,
                    Message::Checkin(Checkin {
                        nonce: self.start.nonce,
                        health: self.start.health.clone(),
                        anchor: self.start.anchor.clone(),
                    }),
                ))
            }
            (
                State::Checkin {
                    correct,
                    welcome_time,
                },
                Message::CheckinAnswer(a),
            ) => {
                let (correct, welcome_time) = (*correct, *welcome_time);
                if a.nonce != self.start.nonce {
                    return Err(SyncError::Checkin(
                        "the checkin answer carries another nonce",
                    ));
                }
                self.anchor_reported = self.version >= 8 && self.start.anchor.is_some();
                if correct {
                    // The two hub times of this exchange agree with each other …
                    check_hub_time(a.hub_time, welcome_time, self.start.max_skew).map_err(
                        |_| SyncError::Checkin("the hub's times in one exchange disagree"),
                    )?;
                    // … and the hub's clock has not gone back past its own earlier answers.
                    if let Some(last) = self.start.last_batch_time
                        && u128::from(last.as_millis().saturating_sub(a.hub_time.as_millis()))
                            > REPLAY_TOLERANCE.as_millis()
                    {
                        return Err(SyncError::Checkin(
                            "the hub's time is behind a batch it sent before",
                        ));
                    }
                    self.state = State::Done;
                    return Ok(Step::CorrectClock(a.hub_time));
                }
                check_hub_time(a.hub_time, now, self.start.max_skew)?;
                self.hub_time = Some(a.hub_time);
                self.trust = Some(a.trust.iter().map(|c| c.as_slice().to_vec()).collect());
                self.state = State::Batch;
                Ok(self.pull())
            }
            (State::Batch, Message::Batch(b)) => self.on_batch(b, wire_bytes, now),
            (State::Checkin { .. }, other) => Err(SyncError::Unexpected {
                expected: MessageKind::CheckinAnswer,
                got: other.kind(),
            }),
            (State::Welcome, other) => Err(SyncError::Unexpected {
                expected: MessageKind::Welcome,
                got: other.kind(),
            }),
            (_, other) => Err(SyncError::Unexpected {
                expected: MessageKind::Batch,
                got: other.kind(),
            }),
        }
    }

    fn on_error(&mut self, e: &ErrorMessage) -> Result<Step, SyncError> {
        match e.code {
            ErrorCode::DeviceRevoked => {
                self.state = State::Done;
                Ok(Step::Wipe)
            }
            // The hub cannot resume from our cursor: start over, and drop at the end
            // whatever it no longer sends.
            ErrorCode::CursorInvalid if self.state == State::Batch && !self.start.resync => {
                self.start.resync = true;
                self.summary.resynced = true;
                self.start.cursor = None;
                self.start.want.clear();
                self.seen.clear();
                Ok(self.pull())
            }
            // A lease bigger than our budget: ask once for the largest batch allowed.
            ErrorCode::TooLarge if self.state == State::Batch && !self.raised_budget => {
                self.raised_budget = true;
                self.start.max_bytes = MessageKind::Batch.max_payload();
                Ok(self.pull())
            }
            _ => Err(SyncError::refused(e)),
        }
    }

    fn pull(&mut self) -> Step {
        let asked: Vec<NhsNumber> = self
            .start
            .want
            .iter()
            .take(MAX_PULL_WANT)
            .copied()
            .collect();
        self.asked = asked.len();
        let mut pull = Pull::new(self.start.cursor.clone(), self.start.max_bytes);
        pull.holding = self.start.holding;
        pull.want = BoundedVec::try_from(asked).unwrap_or_default();
        Step::Send(path::PULL, Message::Pull(pull))
    }

    fn on_batch(
        &mut self,
        batch: Batch,
        wire_bytes: usize,
        now: Timestamp,
    ) -> Result<Step, SyncError> {
        check_hub_time(batch.hub_time, now, self.start.max_skew)?;
        if let Some(last) = self.start.last_batch_time {
            let older = last.as_millis().saturating_sub(batch.hub_time.as_millis());
            if u128::from(older) > REPLAY_TOLERANCE.as_millis() {
                return Err(SyncError::Replayed {
                    older_by_secs: older / 1000,
                });
            }
        }
        // From here a refusal is for the batch's contents: its objections still count.
        let objections: Vec<_> = batch.objections.iter().cloned().collect();
        let checked = self.check_contents(batch, wire_bytes);
        if checked.is_err() {
            self.salvaged = objections;
        }
        checked
    }

    fn check_contents(&mut self, batch: Batch, wire_bytes: usize) -> Result<Step, SyncError> {
        // Leases as they will be after this batch.
        let (leases, covered) = if batch.leases.is_empty() {
            (None, None)
        } else {
            let mut next = self.leases.clone();
            for change in batch.leases.iter() {
                match change {
                    LeaseChange::Granted(l) | LeaseChange::Changed(l) => {
                        next.insert(l.id, l.clone());
                    }
                    LeaseChange::Revoked { id, .. } => {
                        next.remove(id);
                    }
                }
            }
            let c = covered(&next);
            (Some(next), Some(c))
        };
        let cover = covered.as_ref().unwrap_or(&self.covered);
        let outside = batch
            .upserts
            .iter()
            .filter(|r| !cover.contains(&r.nhs_number))
            .count();
        if outside > 0 {
            return Err(SyncError::OutsideLeases(outside));
        }
        let offered_outside = batch
            .offers
            .iter()
            .filter(|o| !cover.contains(&o.nhs_number))
            .count();
        if offered_outside > 0 {
            return Err(SyncError::OutsideLeases(offered_outside));
        }
        let done = usize::try_from(batch.wants_done).unwrap_or(usize::MAX);
        if done > self.asked {
            return Err(SyncError::Offers(
                "it answered more wanted patients than were asked for",
            ));
        }
        if !batch.offers.is_empty() && self.start.holding == 0 {
            return Err(SyncError::Offers(
                "it offered records to a device that holds none",
            ));
        }
        if !batch.more && done < self.asked {
            return Err(SyncError::Offers(
                "it ended the round with wanted records unsent",
            ));
        }
        let sensitive: usize = batch
            .upserts
            .iter()
            .map(|r| self.start.sensitive.listed_items(r))
            .sum();
        if sensitive > 0 {
            return Err(SyncError::Sensitive(sensitive));
        }
        self.hub_time = Some(batch.hub_time);
        self.start.last_batch_time = self.start.last_batch_time.max(Some(batch.hub_time));
        if self.start.resync {
            self.seen.extend(batch.upserts.iter().map(|r| r.nhs_number));
            self.seen.extend(batch.offers.iter().map(|o| o.nhs_number));
            for r in batch.removals.iter() {
                self.seen.remove(&r.nhs_number);
            }
        }
        if let (Some(l), Some(c)) = (leases, covered) {
            self.pending = Some((l, c));
        }
        if batch.expected > 0 {
            self.expected = batch.expected;
        }
        let want: Vec<NhsNumber> = self.start.want.get(done..).unwrap_or_default().to_vec();
        // The round is complete with this batch when the hub has nothing more and every
        // wanted record has come (more than one pull's worth may have been wanted).
        let more = batch.more || !want.is_empty();
        let keep_only = (!more && self.start.resync).then(|| std::mem::take(&mut self.seen));
        self.state = State::Applying {
            more,
            allowed: batch.allowed,
        };
        Ok(Step::Apply(Box::new(Plan {
            batch,
            keep_only,
            digest: !more,
            wire_bytes,
            want,
        })))
    }

    /// The pull that [`Self::applied`] will ask for once `plan` is applied, when it is
    /// known before applying: more is to come and the batch offers nothing (whose
    /// lack only applying finds out). The caller may send it while it applies the batch
    /// — a pull changes nothing at the hub — and use the answer if `applied` then asks
    /// for exactly this pull.
    pub fn pull_ahead(&self, plan: &Plan) -> Option<Message> {
        let State::Applying { more: true, .. } = self.state else {
            return None;
        };
        if !plan.batch.offers.is_empty() {
            return None;
        }
        let asked: Vec<NhsNumber> = plan.want.iter().take(MAX_PULL_WANT).copied().collect();
        let mut pull = Pull::new(Some(plan.batch.next_cursor.clone()), self.start.max_bytes);
        pull.holding = self.start.holding;
        pull.want = BoundedVec::try_from(asked).unwrap_or_default();
        Some(Message::Pull(pull))
    }

    /// The caller applied the plan's batch (committed with its cursor and `want`, the
    /// patients still wanted). `held` is the digest of what the store holds now,
    /// required when the plan asked for it.
    pub fn applied(
        &mut self,
        plan: &Plan,
        held: Option<AllowedSetDigest>,
        want: Vec<NhsNumber>,
    ) -> Result<Step, SyncError> {
        let State::Applying { more, allowed } = self.state else {
            return Err(SyncError::OutOfOrder);
        };
        if let Some((l, c)) = self.pending.take() {
            self.leases = l;
            self.covered = c;
        }
        let b = &plan.batch;
        self.summary.batches += 1;
        self.summary.upserts += b.upserts.len() as u64;
        self.summary.removals += (b.removals.len() + b.objections.len()) as u64;
        self.summary.lease_changes += b.leases.len() as u64;
        self.start.cursor = Some(b.next_cursor.clone());
        self.start.want = want;
        if more {
            self.state = State::Batch;
            return Ok(self.pull());
        }
        let held = held.ok_or(SyncError::OutOfOrder)?;
        if held == allowed {
            self.state = State::Done;
            return Ok(Step::Finished(self.summary.clone()));
        }
        if self.start.resync {
            self.state = State::Done;
            return Err(SyncError::DigestMismatch {
                held: held.patients,
                allowed: allowed.patients,
            });
        }
        tracing::warn!(
            held = held.patients,
            allowed = allowed.patients,
            "holding differs from the hub's allowed set; resynchronising"
        );
        self.start.resync = true;
        self.summary.resynced = true;
        self.start.cursor = None;
        self.start.want.clear();
        self.seen.clear();
        self.state = State::Batch;
        Ok(self.pull())
    }
}

fn covered(leases: &HashMap<LeaseId, Lease>) -> HashSet<NhsNumber> {
    leases
        .values()
        .flat_map(|l| l.patients.iter().copied())
        .collect()
}
