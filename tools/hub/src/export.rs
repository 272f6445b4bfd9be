//! Audit as FHIR R4 AuditEvent, following IHE Basic Audit Log Patterns (BALP): a read
//! is `type` rest / `subtype` read (a caseload list or search is `search-type`), with the
//! user as requestor and purpose of use, the device as source, the patient as entity.
//! Denied accesses are recorded with outcome 4 and the reason; emergency access (ETREAT)
//! carries the clinician's reason and is what `audit review` lists.

use serde_json::{Value, json};
use sync_protocol::audit::{AuditAction, AuditOutcome, DenyReason, Purpose};

use crate::audit::StoredEntry;

/// RFC 3339 UTC instant with milliseconds, from milliseconds since the epoch.
pub fn instant(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
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
    }
}

/// True for an emergency (ETREAT) access.
pub fn is_emergency(e: &StoredEntry) -> bool {
    matches!(e.record.purpose, Purpose::EmergencyTreat { .. })
}

/// One stored entry as a FHIR AuditEvent.
pub fn audit_event(e: &StoredEntry) -> Value {
    let r = &e.record;
    let (subtype, subtype_display) = match r.action {
        AuditAction::ListCaseload | AuditAction::SearchPatient => ("search-type", "search"),
        _ => ("read", "read"),
    };
    let action = format!("{:?}", r.action);
    let (purpose_code, purpose_display) = match &r.purpose {
        Purpose::Treat => ("TREAT", "treatment"),
        Purpose::EmergencyTreat { .. } => ("ETREAT", "Emergency Treatment"),
    };
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
        "recorded": instant(r.at.as_millis()),
        "outcome": match r.outcome { AuditOutcome::Served => "0", AuditOutcome::Denied(_) => "4" },
        "purposeOfEvent": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose_code, "display": purpose_display }] }],
        "agent": [
            {
                "type": { "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "IRCP", "display": "information recipient" }] },
                "who": { "identifier": { "system": "https://fhir.nhs.uk/Id/sds-user-id", "value": r.user.as_str() } },
                "requestor": true,
                "purposeOfUse": [{ "coding": [{ "system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": purpose_code }] }],
            },
            {
                "type": { "coding": [{ "system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110153", "display": "Source Role ID" }] },
                "who": { "display": format!("carecache device {} / client {}", e.device, r.client.as_str()) },
                "requestor": false,
            },
        ],
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
                "detail": [{ "type": "chain-sequence", "valueString": format!("{}#{}", e.device, e.seq) }],
            },
        ],
    });
    let mut outcome_desc = Vec::new();
    if let AuditOutcome::Denied(reason) = r.outcome {
        outcome_desc.push(format!("denied: {}", deny_text(reason)));
    }
    if let Purpose::EmergencyTreat { reason } = &r.purpose {
        outcome_desc.push(format!("emergency access: {}", reason.as_str()));
    }
    if !outcome_desc.is_empty()
        && let Some(obj) = event.as_object_mut()
    {
        obj.insert("outcomeDesc".into(), json!(outcome_desc.join("; ")));
    }
    if let Some(nhs) = r.patient
        && let Some(entities) = event.get_mut("entity").and_then(Value::as_array_mut)
    {
        entities.push(json!({
            "what": { "identifier": { "system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs.digits() } },
            "type": { "system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person" },
            "role": { "system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient" },
        }));
    }
    event
}
