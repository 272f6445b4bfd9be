//! Audit records for people: as FHIR R4 AuditEvent following IHE Basic Audit Log
//! Patterns (BALP), and as one line of text. A read is `type` rest / `subtype` read (a
//! caseload list or search is `search-type`), with the user as requestor and purpose of
//! use, the device as source, the patient as entity. Denied accesses are recorded with
//! outcome 4 and the reason; emergency access (ETREAT) carries the clinician's reason.
//! Other events (authentication failures, lease ends, syncs, key events) are DICOM
//! application activity. Used by the device (`carecache audit export|tail`) and the hub
//! (`carecache-hub audit export|review|patient`) alike. Feature `fhir`.

use serde_json::{Value, json};

use crate::audit::{
    Access, AuditAction, AuditEvent, AuditOutcome, AuditRecord, DenyReason, KeyEvent, LeaseEnd,
    Purpose, SectionKind, SectionShown, SyncOutcome,
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
    }
}

/// True for an emergency (ETREAT) access.
pub fn is_emergency(record: &AuditRecord) -> bool {
    record
        .access()
        .is_some_and(|a| matches!(a.purpose, Some(Purpose::EmergencyTreat { .. })))
}

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";

fn device_agent(e: &Entry<'_>, client: Option<&str>) -> Value {
    let who = match client {
        Some(c) => format!("carecache device {} / client {c}", e.device),
        None => format!("carecache device {}", e.device),
    };
    json!({
        "type": { "coding": [{ "system": DCM, "code": "110153", "display": "Source Role ID" }] },
        "who": { "display": who },
        "requestor": client.is_none(),
    })
}

fn base(
    e: &Entry<'_>,
    kind: (&str, &str),
    subtype: Value,
    outcome: &str,
    agents: Vec<Value>,
) -> Value {
    json!({
        "resourceType": "AuditEvent",
        "id": format!("{}-{}", e.device, e.seq),
        "type": { "system": kind.0, "code": kind.1 },
        "subtype": [subtype],
        "action": "E",
        "recorded": e.record.at.rfc3339(),
        "outcome": outcome,
        "agent": agents,
        "source": {
            "observer": { "display": format!("carecache device {}", e.device) },
            "type": [{ "system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "1", "display": "User Device" }],
        },
        "entity": [{
            "what": { "identifier": { "value": format!("{}#{}", e.device, e.seq) } },
            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object" },
            "detail": [{ "type": "device-wall-clock", "valueString": e.record.wall.rfc3339() }],
        }],
    })
}

fn set(event: &mut Value, key: &str, value: Value) {
    if let Some(obj) = event.as_object_mut() {
        obj.insert(key.into(), value);
    }
}

/// One stored entry as a FHIR AuditEvent: accesses as BALP patient reads/searches,
/// other events (authentication failures, lease ends, syncs, key events) as DICOM
/// application activity.
pub fn audit_event(e: &Entry<'_>) -> Value {
    // (type, subtype code and display, outcome, client, description)
    let (kind, subtype, outcome, client, desc) = match &e.record.event {
        AuditEvent::Access(a) => return access_event(e, a),
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
            "110106",
            ("110106", "Import"),
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
    };
    let mut v = base(
        e,
        (DCM, kind),
        json!({ "system": DCM, "code": subtype.0, "display": subtype.1 }),
        outcome,
        vec![device_agent(e, client)],
    );
    set(&mut v, "outcomeDesc", json!(desc));
    v
}

fn key_text(k: &KeyEvent) -> String {
    match k {
        KeyEvent::Unlocked => "store unlocked".to_owned(),
        KeyEvent::Rekeyed => "root key rotated".to_owned(),
        KeyEvent::Enrolled => "device enrolled".to_owned(),
        KeyEvent::ClientAdded { name } => format!("client {} registered", name.as_str()),
        KeyEvent::ClientRevoked { name } => format!("client {} revoked", name.as_str()),
    }
}

fn access_event(e: &Entry<'_>, r: &Access) -> Value {
    let (subtype, subtype_display) = match r.action {
        AuditAction::ListCaseload | AuditAction::SearchPatient => ("search-type", "search"),
        _ => ("read", "read"),
    };
    let action = format!("{:?}", r.action);
    let (purpose_code, purpose_display) = match &r.purpose {
        Some(Purpose::Treat) => ("TREAT", "treatment"),
        Some(Purpose::EmergencyTreat { .. }) => ("ETREAT", "Emergency Treatment"),
        None => ("TREAT", "treatment (not stated by the client)"),
    };
    let user = r.user.as_ref().map_or("unknown", |u| u.as_str());
    let mut requestor = json!({
        "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP", "display": "information recipient" }] },
        "who": { "identifier": { "system": "https://fhir.nhs.uk/Id/sds-user-id", "value": user } },
        "requestor": true,
        "purposeOfUse": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose_code }] }],
    });
    if let Some(role) = &r.role {
        set(&mut requestor, "role", json!([{ "text": role.as_str() }]));
    }
    let shown: Vec<Value> = r
        .shown
        .iter()
        .map(|s| {
            json!({ "type": format!("{:?}", s.section), "valueString": match s.shown {
                SectionShown::Items(n) => format!("{n} items"),
                SectionShown::NoneRecorded => "none recorded".to_owned(),
                SectionShown::NotAvailable => "not available".to_owned(),
            }})
        })
        .collect();
    let mut detail =
        vec![json!({ "type": "chain-sequence", "valueString": format!("{}#{}", e.device, e.seq) })];
    detail.extend(shown);
    if r.withheld > 0 {
        detail.push(json!({ "type": "withheld", "valueString": format!("{} items", r.withheld) }));
    }
    let mut event = json!({
        "resourceType": "AuditEvent",
        "id": format!("{}-{}", e.device, e.seq),
        "meta": {
            "profile": ["https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit.PatientRead"],
            "security": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST" }],
        },
        "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest", "display": "RESTful Operation" },
        "subtype": [{ "system": "http://hl7.org/fhir/restful-interaction", "code": subtype, "display": subtype_display }],
        "action": "R",
        "recorded": e.record.at.rfc3339(),
        "outcome": match r.outcome { AuditOutcome::Served => "0", AuditOutcome::Denied(_) => "4" },
        "purposeOfEvent": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose_code, "display": purpose_display }] }],
        "agent": [requestor, device_agent(e, Some(r.client.as_str()))],
        "source": {
            "observer": { "display": format!("carecache device {}", e.device) },
            "type": [{ "system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "1", "display": "User Device" }],
        },
        "entity": [
            {
                "what": { "identifier": { "value": format!("{}:{}", e.device, r.request_id) } },
                "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object" },
                "role": { "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4", "display": "Domain Resource" },
                "description": action,
                "detail": detail,
            },
        ],
    });
    let mut outcome_desc = Vec::new();
    if let AuditOutcome::Denied(reason) = r.outcome {
        outcome_desc.push(format!("denied: {}", deny_text(reason)));
    }
    if let Some(Purpose::EmergencyTreat { reason }) = &r.purpose {
        outcome_desc.push(format!("emergency access: {}", reason.as_str()));
    }
    if !outcome_desc.is_empty() {
        set(&mut event, "outcomeDesc", json!(outcome_desc.join("; ")));
    }
    if let Some(entities) = event.get_mut("entity").and_then(Value::as_array_mut) {
        for nhs in r.patient.iter().chain(r.listed.iter()) {
            entities.push(json!({
                "what": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs.digits() } },
                "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person" },
                "role": { "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient" },
            }));
        }
    }
    event
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
        AuditEvent::Access(a) => describe_access(a),
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
    };
    format!("{}  {}#{}  {what}", e.record.at.rfc3339(), e.device, e.seq)
}

fn describe_access(a: &Access) -> String {
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
    out.push_str(&format!(" via {}", a.client.as_str()));
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
