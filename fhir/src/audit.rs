//! Audit records for people: as FHIR R4 AuditEvent following IHE Basic Audit Log
//! Patterns (BALP), and as one line of text. A read is `type` rest / `subtype` read (a
//! caseload list or search is `search-type`), with the user as requestor and purpose of
//! use, the device as source, the patient as entity. Denied accesses are recorded with
//! outcome 4 and the reason; emergency access (ETREAT) carries the clinician's reason.
//! Other events (authentication failures, lease ends, syncs, key events) are DICOM
//! application activity. Used by the device (`carecache audit export|tail`) and the hub
//! (`carecache-hub audit export|review|patient`) alike.

use crate::codes;
use crate::model::{
    self, AuditAgent, AuditDetail, AuditEntity, AuditSource, CodeableConcept, Coding, Identifier,
    Meta, Reference,
};
use sync_protocol::audit::{
    Access, AdminCommand, AuditAction, AuditEvent, AuditOutcome, AuditRecord, DenyReason, KeyEvent,
    LeaseEnd, LookupEvent, LookupOutcome, ProvenStaff, Purpose, SectionKind, SectionShown,
    SessionEnd, SessionEvent, SessionRefusal, SignInRoute, SyncOutcome,
};

/// One audit entry as these renderings need it: the device that wrote it, its sequence
/// in that device's chain, and the record.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    /// The device id.
    pub device: &'a str,
    /// Sequence in the device's chain.
    pub seq: u64,
    /// The record.
    pub record: &'a AuditRecord,
}

/// The reason a denial gives, in words.
pub fn deny_text(r: DenyReason) -> &'static str {
    match r {
        DenyReason::NotOnCaseload => "not on the caller's caseload",
        DenyReason::LeaseNotYetValid => "lease not yet valid",
        DenyReason::LeaseExpired => "lease expired",
        DenyReason::Objected => "patient objected to sharing",
        DenyReason::UserNotPermitted => "user not permitted by the lease",
        DenyReason::ViewNotPermitted => "view does not include this data",
        DenyReason::OfflineTooLong => "device offline too long",
        DenyReason::EmergencyNotPermitted => "emergency access not permitted",
        DenyReason::ClientNotAuthorised => "client not authorised",
        DenyReason::UnknownPatient => "no record held",
        DenyReason::BadRequest => "incomplete or malformed request",
        DenyReason::StaffNotProven => "no valid staff session (identity not proven)",
        DenyReason::SessionOfAnotherClient => "staff session belongs to another client",
    }
}

/// Why an ID token or session step was refused, in words.
pub fn refusal_text(r: SessionRefusal) -> &'static str {
    match r {
        SessionRefusal::Malformed => "not a well-formed ID token",
        SessionRefusal::AlgorithmNotAllowed => "signing algorithm not allowed",
        SessionRefusal::UnknownKey => "signed with a key the issuer does not publish",
        SessionRefusal::BadSignature => "signature does not verify",
        SessionRefusal::WrongIssuer => "issued by another issuer",
        SessionRefusal::WrongAudience => "issued for another audience",
        SessionRefusal::Expired => "token expired",
        SessionRefusal::NotYetValid => "token not yet valid",
        SessionRefusal::TooOld => "token issued too long ago",
        SessionRefusal::Replayed => "token already used",
        SessionRefusal::NoStaffClaim => "token names no staff id",
        SessionRefusal::NoLease => "no lease on this device names this member of staff",
        SessionRefusal::BadPin => "PIN not acceptable",
        SessionRefusal::KeysUnavailable => "issuer's keys unavailable",
        SessionRefusal::NonceMismatch => "sign-in state or nonce mismatch",
    }
}

/// How the staff id of an access was vouched for, in words.
pub fn identity_text(staff: Option<&ProvenStaff>) -> String {
    match staff {
        None => "asserted by the client software".to_owned(),
        Some(p) => format!(
            "proven by OpenID Connect: issuer {}, subject {}, session {:016x}",
            p.issuer.as_str(),
            p.subject.as_str(),
            p.session
        ),
    }
}

fn session_text(s: &SessionEvent) -> String {
    match s {
        SessionEvent::Opened {
            session,
            client,
            user,
            role,
            staff,
            expires,
            route,
        } => format!(
            "staff session {session:016x} opened for {}{} via {} ({}), until {}; {}",
            user.as_str(),
            role.as_ref()
                .map(|r| format!(" ({})", r.as_str()))
                .unwrap_or_default(),
            client.as_str(),
            match route {
                SignInRoute::Client => "token from the client",
                SignInRoute::Viewer => "viewer sign-in",
            },
            expires.rfc3339(),
            identity_text(Some(staff))
        ),
        SessionEvent::Refused {
            client,
            session,
            reason,
        } => format!(
            "staff sign-in REFUSED via {}{}: {}",
            client.as_str(),
            session
                .map(|s| format!(" (session {s:016x})"))
                .unwrap_or_default(),
            refusal_text(*reason)
        ),
        SessionEvent::WrongPin { session, attempts } => {
            format!("staff session {session:016x}: WRONG PIN (attempt {attempts})")
        }
        SessionEvent::Confirmed { session } => {
            format!("staff session {session:016x} confirmed with its PIN")
        }
        SessionEvent::Ended { session, reason } => format!(
            "staff session {session:016x} ended ({})",
            match reason {
                SessionEnd::Expired => "expired",
                SessionEnd::SignedOut => "signed out",
                SessionEnd::LockedOut => "LOCKED OUT after wrong PINs",
            }
        ),
    }
}

/// True for an emergency (ETREAT) access.
pub fn is_emergency(record: &AuditRecord) -> bool {
    record
        .access()
        .is_some_and(|a| matches!(a.purpose, Some(Purpose::EmergencyTreat { .. })))
}

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const SOURCE_TYPE: &str = "http://terminology.hl7.org/CodeSystem/security-source-type";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";

fn device_agent(e: &Entry<'_>, client: Option<&str>) -> AuditAgent {
    let who = match client {
        Some(c) => format!("carecache device {} / client {c}", e.device),
        None => format!("carecache device {}", e.device),
    };
    AuditAgent {
        kind: CodeableConcept::coded(Coding::new(DCM, "110153").display("Source Role ID")),
        who: Reference::display(who),
        requestor: client.is_none(),
        ..AuditAgent::default()
    }
}

fn source(e: &Entry<'_>) -> AuditSource {
    AuditSource {
        observer: Reference::display(format!("carecache device {}", e.device)),
        kind: vec![Coding::new(SOURCE_TYPE, "1").display("User Device")],
    }
}

fn system_object(what: String) -> AuditEntity {
    AuditEntity {
        what: Reference::identified(Identifier {
            system: None,
            value: Some(what),
        }),
        kind: Coding::new(ENTITY_TYPE, "2").display("System Object"),
        ..AuditEntity::default()
    }
}

/// One stored entry as a FHIR AuditEvent: accesses as BALP patient reads/searches,
/// other events (authentication failures, lease ends, syncs, key events) as DICOM
/// application activity.
pub fn audit_event(e: &Entry<'_>) -> model::Resource {
    model::Resource::AuditEvent(event(e))
}

fn event(e: &Entry<'_>) -> model::AuditEvent {
    // (type, subtype code and display, outcome, client, description)
    let (kind, subtype, outcome, client, desc) = match &e.record.event {
        AuditEvent::Access(a) => return access_event(e, a, None),
        AuditEvent::ProvenAccess { access, staff } => return access_event(e, access, Some(staff)),
        AuditEvent::Session(s) => (
            "110114",
            match s {
                SessionEvent::Ended { .. } => ("110123", "Logout"),
                _ => ("110122", "Login"),
            },
            match s {
                SessionEvent::Refused { .. }
                | SessionEvent::WrongPin { .. }
                | SessionEvent::Ended {
                    reason: SessionEnd::LockedOut,
                    ..
                } => "4",
                _ => "0",
            },
            match s {
                SessionEvent::Opened { client, .. } | SessionEvent::Refused { client, .. } => {
                    Some(client.as_str())
                }
                _ => None,
            },
            session_text(s),
        ),
        AuditEvent::AuthFailure {
            request_id,
            client,
            reason,
        } => (
            "110114",
            ("110122", "Login"),
            "4",
            client.as_ref().map(|c| c.as_str()),
            format!("client not authenticated ({reason:?}), request {request_id}"),
        ),
        AuditEvent::LeaseEnded {
            lease,
            reason,
            purged,
        } => (
            "110100",
            ("110141", "Application Stop"),
            "0",
            None,
            format!(
                "lease {} ended ({reason:?}); {purged} patients purged",
                lease.0
            ),
        ),
        AuditEvent::Sync {
            outcome,
            batches,
            upserts,
            removals,
            lease_changes,
            resync,
        } => (
            "110107",
            ("110107", "Import"),
            if *outcome == SyncOutcome::Ok {
                "0"
            } else {
                "4"
            },
            None,
            format!(
                "sync {outcome:?}: {batches} batches, {upserts} records, {removals} removals, {lease_changes} lease changes{}",
                if *resync { ", full resync" } else { "" }
            ),
        ),
        AuditEvent::Key(k) => (
            "110113",
            ("110137", "User Security Attributes Changed"),
            "0",
            None,
            key_text(k),
        ),
        AuditEvent::AuthFailures {
            client,
            reason,
            minute,
            count,
        } => (
            "110114",
            ("110122", "Login"),
            "4",
            client.as_ref().map(|c| c.as_str()),
            format!(
                "{count} more requests not authenticated ({reason:?}) in the minute from {}",
                minute.rfc3339()
            ),
        ),
        AuditEvent::ClockCorrected {
            from,
            to,
            leases_reopened,
        } => (
            "110100",
            ("110120", "Application Start"),
            "0",
            None,
            clock_text(*from, *to, *leases_reopened),
        ),
        AuditEvent::Admin { command, uid, ok } => {
            let (kind, subtype) = match command {
                AdminCommand::AuditExport => ("110106", ("110106", "Export")),
                AdminCommand::SyncNow => ("110100", ("110100", "Application Activity")),
                _ => ("110112", ("110112", "Query")),
            };
            (
                kind,
                subtype,
                if *ok { "0" } else { "4" },
                None,
                admin_text(*command, *uid, *ok),
            )
        }
        AuditEvent::Lookup(l) => (
            "110112",
            ("110112", "Query"),
            match l.outcome {
                LookupOutcome::Granted { .. } => "0",
                _ => "4",
            },
            Some(l.client.as_str()),
            lookup_text(l),
        ),
    };
    let mut object = system_object(format!("{}#{}", e.device, e.seq));
    object.detail = vec![AuditDetail {
        kind: "device-wall-clock".into(),
        value_string: e.record.wall.rfc3339(),
    }];
    if let AuditEvent::Lookup(l) = &e.record.event {
        object.detail.push(AuditDetail {
            kind: "staff-identity".into(),
            value_string: identity_text(l.proven.as_ref()),
        });
    }
    let mut entity = vec![object];
    if let AuditEvent::Lookup(l) = &e.record.event {
        entity.push(AuditEntity {
            what: Reference::identified(Identifier::new(
                codes::NHS_NUMBER_SYSTEM,
                &l.patient.digits(),
            )),
            kind: Coding::new(ENTITY_TYPE, "1").display("Person"),
            role: Some(Coding::new(OBJECT_ROLE, "1").display("Patient")),
            ..AuditEntity::default()
        });
    }
    model::AuditEvent {
        id: format!("{}-{}", e.device, e.seq),
        meta: None,
        kind: Coding::new(DCM, kind),
        subtype: vec![Coding::new(DCM, subtype.0).display(subtype.1)],
        action: "E".into(),
        recorded: e.record.at.rfc3339(),
        outcome: outcome.into(),
        outcome_desc: Some(desc),
        purpose_of_event: Vec::new(),
        agent: vec![device_agent(e, client)],
        source: source(e),
        entity,
    }
}

/// A lookup, in words: who, which patient, under which lease, why, and what came of it
/// (flagged for review: a lookup is emergency access).
fn lookup_text(l: &LookupEvent) -> String {
    format!(
        "EMERGENCY LOOKUP of {} by {} via {} [{}]{}, reason: {}; {}",
        l.patient,
        l.user.as_str(),
        l.client.as_str(),
        identity_text(l.proven.as_ref()),
        l.under
            .map(|id| format!(" under lease {}", id.0))
            .unwrap_or_default(),
        l.reason.as_str(),
        match l.outcome {
            LookupOutcome::Granted { lease, not_after } =>
                format!("granted lease {} until {}", lease.0, not_after.rfc3339()),
            LookupOutcome::Offline => "refused: the device was offline".to_owned(),
            LookupOutcome::NotPermitted => {
                "refused: no lease of the caller allows emergency access".to_owned()
            }
            LookupOutcome::NotAvailable => "refused by the hub: not available".to_owned(),
            LookupOutcome::HubTooOld => "refused: the hub does not offer lookups".to_owned(),
            LookupOutcome::Failed => "failed".to_owned(),
        }
    )
}

fn key_text(k: &KeyEvent) -> String {
    match k {
        KeyEvent::Unlocked => "store unlocked".to_owned(),
        KeyEvent::Rekeyed => "root key rotated".to_owned(),
        KeyEvent::Enrolled => "device enrolled".to_owned(),
        KeyEvent::ClientAdded { name } => format!("client {} registered", name.as_str()),
        KeyEvent::ClientRevoked { name } => format!("client {} revoked", name.as_str()),
        KeyEvent::KeySourceChanged { from, to } => {
            format!(
                "root key source changed from {} to {}",
                from.as_str(),
                to.as_str()
            )
        }
        KeyEvent::WipeOrdered { backlog } => format!(
            "device revoked by the hub: wipe ordered, {backlog} audit entries waiting for upload"
        ),
        KeyEvent::CertificateRenewed { not_after } => format!(
            "device certificate renewed; the new one ends {}",
            not_after.rfc3339()
        ),
        KeyEvent::PinnedCasChanged { pinned } => {
            format!("hub CA pins changed: {pinned} CA certificates pinned")
        }
        KeyEvent::AnchorBound { kind } => {
            format!("store bound to the anti-rollback anchor ({})", kind.name())
        }
        KeyEvent::Restored {
            reason,
            patients,
            leases,
        } => format!(
            "restored or foreign copy of the data directory found ({}): {patients} patients and {leases} leases destroyed before anything was served; syncing from nothing",
            reason.name()
        ),
    }
}

fn admin_text(command: AdminCommand, uid: Option<u32>, ok: bool) -> String {
    let detail = match command {
        AdminCommand::AuditTail { lines } => format!(" (last {lines})"),
        _ => String::new(),
    };
    format!(
        "operator command `{}`{detail} {}, {}",
        command.words(),
        if ok { "carried out" } else { "failed" },
        uid.map_or_else(
            || "on the data directory (daemon stopped)".to_owned(),
            |u| format!("over the admin channel by user id {u}")
        )
    )
}

fn clock_text(
    from: sync_protocol::types::Timestamp,
    to: sync_protocol::types::Timestamp,
    leases_reopened: u32,
) -> String {
    format!(
        "trusted time corrected from {} to the hub's {} (nonce-bound); {leases_reopened} leases ended in the skipped time asked of the hub again",
        from.rfc3339(),
        to.rfc3339()
    )
}

fn access_event(e: &Entry<'_>, r: &Access, staff: Option<&ProvenStaff>) -> model::AuditEvent {
    let (subtype, subtype_display) = match r.action {
        AuditAction::ListCaseload | AuditAction::SearchPatient => ("search-type", "search"),
        _ => ("read", "read"),
    };
    let (purpose_code, purpose_display) = match &r.purpose {
        Some(Purpose::Treat) => ("TREAT", "treatment"),
        Some(Purpose::EmergencyTreat { .. }) => ("ETREAT", "Emergency Treatment"),
        None => ("TREAT", "treatment (not stated by the client)"),
    };
    let user = r.user.as_ref().map_or("unknown", |u| u.as_str());
    let requestor = AuditAgent {
        kind: CodeableConcept::coded(
            Coding::new(
                "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                "IRCP",
            )
            .display("information recipient"),
        ),
        role: r
            .role
            .iter()
            .map(|role| CodeableConcept::text(role.as_str()))
            .collect(),
        who: Reference::identified(Identifier::new(codes::SDS_USER_SYSTEM, user)),
        requestor: true,
        purpose_of_use: vec![CodeableConcept::coded(Coding::new(
            codes::ACT_REASON,
            purpose_code,
        ))],
    };
    let mut detail = vec![
        AuditDetail {
            kind: "chain-sequence".into(),
            value_string: format!("{}#{}", e.device, e.seq),
        },
        AuditDetail {
            kind: "staff-identity".into(),
            value_string: identity_text(staff),
        },
    ];
    detail.extend(r.shown.iter().map(|s| AuditDetail {
        kind: format!("{:?}", s.section),
        value_string: match s.shown {
            SectionShown::Items(n) => format!("{n} items"),
            SectionShown::NoneRecorded => "none recorded".to_owned(),
            SectionShown::NotAvailable => "not available".to_owned(),
        },
    }));
    if r.withheld > 0 {
        detail.push(AuditDetail {
            kind: "withheld".into(),
            value_string: format!("{} items", r.withheld),
        });
    }
    let mut request = system_object(format!("{}:{}", e.device, r.request_id));
    request.role = Some(Coding::new(OBJECT_ROLE, "4").display("Domain Resource"));
    request.description = Some(format!("{:?}", r.action));
    request.detail = detail;
    let mut entity = vec![request];
    entity.extend(
        r.patient
            .iter()
            .chain(r.listed.iter())
            .map(|nhs| AuditEntity {
                what: Reference::identified(Identifier::new(
                    codes::NHS_NUMBER_SYSTEM,
                    &nhs.digits(),
                )),
                kind: Coding::new(ENTITY_TYPE, "1").display("Person"),
                role: Some(Coding::new(OBJECT_ROLE, "1").display("Patient")),
                ..AuditEntity::default()
            }),
    );
    let mut outcome_desc = Vec::new();
    if let AuditOutcome::Denied(reason) = r.outcome {
        outcome_desc.push(format!("denied: {}", deny_text(reason)));
    }
    if let Some(Purpose::EmergencyTreat { reason }) = &r.purpose {
        outcome_desc.push(format!("emergency access: {}", reason.as_str()));
    }
    model::AuditEvent {
        id: format!("{}-{}", e.device, e.seq),
        meta: Some(Meta {
            profile: vec![
                "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead"
                    .into(),
            ],
            security: vec![Coding::new(codes::ACT_REASON, "HTEST")],
            ..Meta::default()
        }),
        kind: Coding::new(
            "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "rest",
        )
        .display("RESTful Operation"),
        subtype: vec![
            Coding::new("http://hl7.org/fhir/restful-interaction", subtype)
                .display(subtype_display),
        ],
        action: "R".into(),
        recorded: e.record.at.rfc3339(),
        outcome: match r.outcome {
            AuditOutcome::Served => "0",
            AuditOutcome::Denied(_) => "4",
        }
        .into(),
        outcome_desc: (!outcome_desc.is_empty()).then(|| outcome_desc.join("; ")),
        purpose_of_event: vec![CodeableConcept::coded(
            Coding::new(codes::ACT_REASON, purpose_code).display(purpose_display),
        )],
        agent: vec![requestor, device_agent(e, Some(r.client.as_str()))],
        source: source(e),
        entity,
    }
}

/// What an action is, in words.
pub fn action_text(a: AuditAction) -> &'static str {
    match a {
        AuditAction::ListCaseload => "listed caseload",
        AuditAction::SearchPatient => "searched for patient",
        AuditAction::ReadPatient => "read demographics",
        AuditAction::ReadAlerts => "read alerts",
        AuditAction::ReadAllergies => "read allergies",
        AuditAction::ReadMedications => "read medications",
        AuditAction::ReadContacts => "read contacts",
        AuditAction::ReadSummary => "read summary",
    }
}

fn section_text(s: SectionKind) -> &'static str {
    match s {
        SectionKind::Demographics => "demographics",
        SectionKind::Alerts => "alerts",
        SectionKind::Allergies => "allergies",
        SectionKind::Medications => "medications",
        SectionKind::Contacts => "contacts",
    }
}

/// One entry as a line of text for people: when (trusted time), which device and
/// sequence, and what happened. Patients appear by NHS number only (3-3-4), never by
/// name; no clinical content exists in a record to show.
pub fn describe(e: &Entry<'_>) -> String {
    let what = match &e.record.event {
        AuditEvent::Access(a) => describe_access(a, None),
        AuditEvent::ProvenAccess { access, staff } => describe_access(access, Some(staff)),
        AuditEvent::Session(s) => session_text(s),
        AuditEvent::AuthFailure {
            request_id,
            client,
            reason,
        } => format!(
            "authentication refused ({reason:?}){}, request {request_id}",
            client
                .as_ref()
                .map(|c| format!(" for client {}", c.as_str()))
                .unwrap_or_default()
        ),
        AuditEvent::LeaseEnded {
            lease,
            reason,
            purged,
        } => format!(
            "lease {} ended ({}); {purged} patients purged",
            lease.0,
            match reason {
                LeaseEnd::Expired => "expired".to_owned(),
                LeaseEnd::OfflineTooLong => "offline too long".to_owned(),
                LeaseEnd::Hub(r) => format!("ended by the hub: {r:?}"),
            }
        ),
        AuditEvent::Sync {
            outcome,
            batches,
            upserts,
            removals,
            lease_changes,
            resync,
        } => format!(
            "sync {}: {batches} batches, {upserts} records, {removals} removals, {lease_changes} lease changes{}",
            match outcome {
                SyncOutcome::Ok => "ok",
                SyncOutcome::Offline => "offline",
                SyncOutcome::Rejected => "REJECTED",
                SyncOutcome::Failed => "failed",
            },
            if *resync { ", full resync" } else { "" }
        ),
        AuditEvent::Key(k) => key_text(k),
        AuditEvent::Lookup(l) => lookup_text(l),
        AuditEvent::AuthFailures {
            client,
            reason,
            minute,
            count,
        } => format!(
            "{count} more requests refused authentication ({reason:?}){} in the minute from {}",
            client
                .as_ref()
                .map(|c| format!(" for client {}", c.as_str()))
                .unwrap_or_default(),
            minute.rfc3339()
        ),
        AuditEvent::ClockCorrected {
            from,
            to,
            leases_reopened,
        } => clock_text(*from, *to, *leases_reopened),
        AuditEvent::Admin { command, uid, ok } => admin_text(*command, *uid, *ok),
    };
    format!("{}  {}#{}  {what}", e.record.at.rfc3339(), e.device, e.seq)
}

fn describe_access(a: &Access, staff: Option<&ProvenStaff>) -> String {
    let mut out = action_text(a.action).to_owned();
    if let Some(p) = &a.patient {
        out.push_str(&format!(" {p}"));
    }
    if !a.listed.is_empty() {
        let listed: Vec<String> = a.listed.iter().map(ToString::to_string).collect();
        out.push_str(&format!(" ({} shown: {})", listed.len(), listed.join(", ")));
    }
    out.push_str(&format!(
        " by {}",
        a.user.as_ref().map_or("unknown user", |u| u.as_str())
    ));
    if let Some(role) = &a.role {
        out.push_str(&format!(" ({})", role.as_str()));
    }
    out.push_str(&format!(
        " via {} [{}]",
        a.client.as_str(),
        identity_text(staff)
    ));
    match &a.purpose {
        Some(Purpose::Treat) => out.push_str(", TREAT"),
        Some(Purpose::EmergencyTreat { reason }) => {
            out.push_str(&format!(", EMERGENCY (ETREAT): \"{}\"", reason.as_str()));
        }
        None => {}
    }
    match a.outcome {
        AuditOutcome::Served => {
            out.push_str(" — served");
            let shown: Vec<String> = a
                .shown
                .iter()
                .map(|s| {
                    format!(
                        "{} {}",
                        section_text(s.section),
                        match s.shown {
                            SectionShown::Items(n) => n.to_string(),
                            SectionShown::NoneRecorded => "none recorded".to_owned(),
                            SectionShown::NotAvailable => "not available".to_owned(),
                        }
                    )
                })
                .collect();
            if !shown.is_empty() {
                out.push_str(&format!(": {}", shown.join(", ")));
            }
            if a.withheld > 0 {
                out.push_str(&format!("; {} items withheld", a.withheld));
            }
        }
        AuditOutcome::Denied(r) => out.push_str(&format!(" — DENIED: {}", deny_text(r))),
    }
    out
}
