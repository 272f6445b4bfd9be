//! The FHIR REST source: incremental polls by `_lastUpdated` with an overlap window,
//! de-duplicated by id + versionId, each affected patient re-read by patient search.
//! The FHIR server here is a small in-test server over the same synthetic resources
//! (a full FHIR server cannot be installed from this machine's registries).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::routing::get;
use serde_json::{Value, json};

use carecache_hub::source::FhirRest;
use carecache_hub::state::HubState;

type Store = Arc<Mutex<Vec<Value>>>;

fn last_updated(r: &Value) -> String {
    r["meta"]["lastUpdated"].as_str().unwrap_or("").to_owned()
}

async fn search(
    State(store): State<Store>,
    Path(kind): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> axum::Json<Value> {
    let all = store.lock().unwrap().clone();
    let mut hits: Vec<Value> = all
        .into_iter()
        .filter(|r| r["resourceType"] == kind.as_str())
        .filter(
            |r| match q.get("_lastUpdated").and_then(|v| v.strip_prefix("ge")) {
                // RFC 3339 instants in UTC with the same precision compare as strings.
                Some(since) => last_updated(r).as_str() >= since,
                None => true,
            },
        )
        .filter(|r| match q.get("patient") {
            Some(p) => p
                .split(',')
                .any(|p| r["subject"]["reference"] == p || r["patient"]["reference"] == p),
            None => true,
        })
        .filter(|r| match q.get("_id") {
            Some(ids) => ids.split(',').any(|id| r["id"] == id),
            None => true,
        })
        .collect();
    hits.sort_by_key(last_updated);
    let count: usize = q.get("_count").and_then(|c| c.parse().ok()).unwrap_or(50);
    let offset: usize = q.get("_offset").and_then(|c| c.parse().ok()).unwrap_or(0);
    let page: Vec<Value> = hits
        .iter()
        .skip(offset)
        .take(count)
        .map(|r| json!({ "resource": r }))
        .collect();
    let mut bundle = json!({ "resourceType": "Bundle", "type": "searchset", "total": hits.len(), "entry": page });
    if offset + count < hits.len() && !DROP_NEXT.load(std::sync::atomic::Ordering::SeqCst) {
        let mut params: Vec<String> = q
            .iter()
            .filter(|(k, _)| *k != "_offset")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        params.push(format!("_offset={}", offset + count));
        let base = store_base();
        bundle["link"] =
            json!([{ "relation": "next", "url": format!("{base}/{kind}?{}", params.join("&")) }]);
    }
    axum::Json(bundle)
}

static BASE_URL: Mutex<String> = Mutex::new(String::new());
/// A broken server: pages without their `next` link.
static DROP_NEXT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
fn store_base() -> String {
    BASE_URL.lock().unwrap().clone()
}

async fn read(
    State(store): State<Store>,
    Path((kind, id)): Path<(String, String)>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let all = store.lock().unwrap().clone();
    match all
        .into_iter()
        .find(|r| r["resourceType"] == kind.as_str() && r["id"] == id.as_str())
    {
        Some(r) => axum::Json(r).into_response(),
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

/// A type's history: only the deletions (a `__deleted` marker in the store per deleted
/// resource), as a server records them — `request.method` DELETE, no resource.
async fn history(State(store): State<Store>, Path(kind): Path<String>) -> axum::Json<Value> {
    let all = store.lock().unwrap().clone();
    let entries: Vec<Value> = all
        .iter()
        .filter(|r| r["resourceType"] == "__deleted" && r["kind"] == kind.as_str())
        .map(|r| {
            json!({
                "request": { "method": "DELETE", "url": format!("{kind}/{}", r["id"].as_str().unwrap()) },
                "response": { "status": "204" },
            })
        })
        .collect();
    axum::Json(
        json!({ "resourceType": "Bundle", "type": "history", "total": entries.len(), "entry": entries }),
    )
}

fn start_server(store: Store) -> String {
    let app = axum::Router::new()
        .route("/fhir/{kind}", get(search))
        .route("/fhir/{kind}/_history", get(history))
        .route("/fhir/{kind}/{id}", get(read))
        .with_state(store);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    let base = format!("http://{addr}/fhir");
    *BASE_URL.lock().unwrap() = base.clone();
    base
}

/// `n` synthetic patients from `seed` served by the in-test server, and an empty hub
/// database.
fn served_source(
    seed: u64,
    n: usize,
) -> (
    Vec<carecache_synth::SourcePatient>,
    Store,
    String,
    tempfile::TempDir,
    HubState,
) {
    let patients = carecache_synth::Generator::new(seed).source_patients(n);
    let resources: Vec<Value> = patients
        .iter()
        .flat_map(carecache_synth::fhir::resources)
        .collect();
    let store: Store = Arc::new(Mutex::new(resources));
    let base = start_server(store.clone());
    let dir = tempfile::tempdir().unwrap();
    let state = carecache_hub::testing::open_state(dir.path());
    (patients, store, base, dir, state)
}

#[test]
fn incremental_polls_dedupe_and_pick_up_changes() {
    let _serial = crate::harness::SERIAL
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let (patients, store, base, _dir, state) = served_source(21, 120);
    let rules = carecache_hub::testing::synthetic_rules();
    // Small pages so paging is exercised.
    let source = FhirRest::new(&base, 300, 37);

    let first = source.poll(&state, &rules).unwrap();
    assert_eq!(first.patients, 120);
    assert_eq!(first.stored.added, 120);
    // The only issues are the items the generator wrote unreadable, each reported once.
    let unreadable: usize = patients.iter().map(|p| p.unreadable.len()).sum();
    assert!(unreadable > 0);
    assert_eq!(first.issues.len(), unreadable, "{:?}", first.issues);
    assert!(
        first.issues.iter().all(|i| i.contains("-odd")),
        "{:?}",
        first.issues
    );

    // Nothing changed: the overlap window re-reads recent resources, dedupe skips them.
    let second = source.poll(&state, &rules).unwrap();
    assert_eq!(second.patients, 0, "seen versions are skipped");
    assert_eq!(second.stored.changed, 0);

    // One medication changes upstream (new version, later lastUpdated).
    let target = patients
        .iter()
        .find(|p| !p.expected.medications.entries().is_empty())
        .unwrap();
    {
        let mut s = store.lock().unwrap();
        let med = s
            .iter_mut()
            .find(|r| {
                r["resourceType"] == "MedicationStatement"
                    && r["subject"]["reference"] == format!("Patient/{}", target.fhir_id).as_str()
            })
            .unwrap();
        med["meta"]["versionId"] = json!("2");
        med["meta"]["lastUpdated"] = json!("2027-01-01T00:00:00.000Z");
        med["dosage"] = json!([{ "text": "Two tablets at night" }]);
    }
    let third = source.poll(&state, &rules).unwrap();
    assert_eq!(third.patients, 1, "only the affected patient is re-read");
    assert_eq!(third.stored.changed, 1);
    assert_eq!(third.stored.unchanged, 0);

    // A hostile paging link that leaves the server is refused.
    {
        let mut s = store.lock().unwrap();
        for r in s.iter_mut().filter(|r| r["resourceType"] == "Flag") {
            r["meta"]["versionId"] = json!("9");
            r["meta"]["lastUpdated"] = json!("2027-02-01T00:00:00.000Z");
        }
    }
    *BASE_URL.lock().unwrap() = "http://198.51.100.1/fhir".into();
    let err = FhirRest::new(&base, 300, 5)
        .poll(&state, &rules)
        .unwrap_err();
    assert!(
        err.to_string().contains("leaves the configured server"),
        "{err}"
    );
}

/// HAZ-15: a server that keeps deletions in `_history` gets them to the hub at the next
/// poll, with no reconciliation due: a deleted Flag leaves its patient's record, a
/// deleted Patient is deleted with its record.
#[test]
fn deletions_in_the_servers_history_reach_the_hub_at_the_next_poll() {
    let _serial = crate::harness::SERIAL
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let (patients, store, base, _dir, state) = served_source(22, 60);
    let rules = carecache_hub::testing::synthetic_rules();
    let source = FhirRest::new(&base, 300, 50).with_reconcile(86_400);
    let first = source.poll(&state, &rules).unwrap();
    assert_eq!(first.stored.added, 60);
    assert_eq!(first.history, Some(true));

    let with_alerts = patients
        .iter()
        .find(|p| p.shareable() && p.expected.alerts.entries().len() > 1)
        .unwrap();
    let flag = with_alerts.expected.alerts.entries()[0]
        .source_id
        .as_str()
        .to_owned();
    let gone = patients
        .iter()
        .rev()
        .find(|p| p.shareable() && p.fhir_id != with_alerts.fhir_id)
        .unwrap();
    {
        let mut s = store.lock().unwrap();
        s.retain(|r| !(r["resourceType"] == "Flag" && r["id"] == flag.as_str()));
        s.push(json!({ "resourceType": "__deleted", "kind": "Flag", "id": flag }));
        s.retain(|r| !(r["resourceType"] == "Patient" && r["id"] == gone.fhir_id.as_str()));
        s.push(json!({ "resourceType": "__deleted", "kind": "Patient", "id": gone.fhir_id }));
    }
    let second = source.poll(&state, &rules).unwrap();
    assert_eq!(second.reconciled, Some(false), "no reconciliation was due");
    assert_eq!(second.stored.changed, 1, "{second:?}");
    assert_eq!(second.stored.deleted, 1, "{second:?}");
    assert!(
        state
            .patient_fhir_ids()
            .unwrap()
            .iter()
            .all(|id| *id != gone.fhir_id)
    );
    let held = state.record(&with_alerts.nhs_number()).unwrap().unwrap();
    assert_eq!(
        held.alerts.entries().len(),
        with_alerts.expected.alerts.entries().len() - 1
    );
    assert!(
        held.alerts
            .entries()
            .iter()
            .all(|a| a.source_id.as_str() != flag)
    );
}

/// A server that says it matched more than it sent and offers no next page would make a
/// shorter record look complete: the poll fails with a clear error and stores nothing.
#[test]
fn a_server_that_drops_pages_fails_the_poll_and_nothing_is_stored() {
    let _serial = crate::harness::SERIAL
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let (_patients, _store, base, _dir, state) = served_source(26, 30);
    DROP_NEXT.store(true, std::sync::atomic::Ordering::SeqCst);
    let err = FhirRest::new(&base, 300, 5).poll(&state, &carecache_hub::testing::synthetic_rules());
    DROP_NEXT.store(false, std::sync::atomic::Ordering::SeqCst);
    let err = err.unwrap_err().to_string();
    assert!(err.contains("with no next page"), "{err}");
    assert_eq!(state.head().unwrap(), 0, "nothing stored");
    assert!(state.patient_fhir_ids().unwrap().is_empty());
}
