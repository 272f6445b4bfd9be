//! Bundle shells, OperationOutcomes, narratives and `$summary` section states: the
//! documents the device's FHIR routes answer with, built from typed resources.

use sha2::{Digest, Sha256};

use crate::codes;
use crate::model::{
    Bundle, BundleEntry, BundleLink, CodeableConcept, Coding, CompositionSection, EntrySearch,
    Issue, Narrative, OperationOutcome, Reference, Resource,
};

const XHTML: &str = "http://www.w3.org/1999/xhtml";

/// An OperationOutcome with one issue.
pub fn operation_outcome(severity: &str, code: &str, text: &str) -> OperationOutcome {
    OperationOutcome {
        issue: vec![Issue {
            severity: severity.to_owned(),
            code: code.to_owned(),
            diagnostics: Some(text.to_owned()),
            details: Some(CodeableConcept::text(text)),
        }],
    }
}

/// A generated narrative holding `text`, escaped.
pub fn narrative(text: &str) -> Narrative {
    let mut div = String::with_capacity(text.len() + 48);
    div.push_str("<div xmlns=\"");
    div.push_str(XHTML);
    div.push_str("\">");
    for c in text.chars() {
        match c {
            '<' => div.push_str("&lt;"),
            '>' => div.push_str("&gt;"),
            '&' => div.push_str("&amp;"),
            '"' => div.push_str("&quot;"),
            c => div.push(c),
        }
    }
    div.push_str("</div>");
    Narrative {
        status: "generated".into(),
        div,
    }
}

/// A deterministic `urn:uuid:` for a resource in a Bundle (SHA-256 of its type and id,
/// shaped as a version-8 UUID).
pub fn urn(kind: &str, id: &str) -> String {
    let h = Sha256::digest(format!("{kind}/{id}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(h.get(..16).unwrap_or(&[0; 16]));
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
    let part = |r: std::ops::Range<usize>| x.get(r).unwrap_or_default();
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        part(0..8),
        part(8..12),
        part(12..16),
        part(16..20),
        part(20..32)
    )
}

/// The `fullUrl` of a resource in carecache's Bundles.
pub fn full_url(r: &Resource) -> String {
    urn(r.kind(), r.id().unwrap_or(""))
}

/// Why a section is empty (list-empty-reason).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EmptyReason {
    /// `nilknown`: the source holds none (not a statement that the patient has none).
    NilKnown,
    /// `unavailable`: the source could not provide it.
    Unavailable,
    /// `withheld`: withheld (at the patient's request, for confidentiality, or outside
    /// the caller's view).
    Withheld,
}

impl EmptyReason {
    /// As a CodeableConcept.
    pub fn concept(self) -> CodeableConcept {
        let (code, display) = match self {
            Self::NilKnown => ("nilknown", "Nil Known"),
            Self::Unavailable => ("unavailable", "Unavailable"),
            Self::Withheld => ("withheld", "Information Withheld"),
        };
        CodeableConcept::coded(Coding::new(codes::LIST_EMPTY_REASON, code).display(display))
    }
}

/// A Composition section: its entries (references to `fullUrl`s in the same Bundle) or
/// why it is empty, with a narrative.
pub fn section(
    title: &str,
    code: Coding,
    narrative_text: &str,
    entries: Vec<String>,
    empty: Option<EmptyReason>,
) -> CompositionSection {
    CompositionSection {
        title: title.to_owned(),
        code: CodeableConcept::coded(code),
        text: Some(narrative(narrative_text)),
        entry: entries.into_iter().map(Reference::to).collect(),
        empty_reason: empty.map(EmptyReason::concept),
    }
}

/// A searchset page: `matches` (already cut to the page) with `total`, links, and
/// `notes` as OperationOutcome entries of mode `outcome`.
pub fn searchset(
    matches: Vec<Resource>,
    notes: Vec<OperationOutcome>,
    total: usize,
    links: Vec<BundleLink>,
    timestamp: String,
) -> Bundle<Resource> {
    let mut entry: Vec<BundleEntry<Resource>> =
        matches.into_iter().map(|r| entry(r, "match")).collect();
    for (i, n) in notes.into_iter().enumerate() {
        entry.push(BundleEntry {
            full_url: Some(urn("OperationOutcome", &format!("note-{i}"))),
            resource: Some(Resource::OperationOutcome(n)),
            search: Some(EntrySearch {
                mode: Some("outcome".into()),
                score: None,
            }),
            request: None,
            response: None,
        });
    }
    Bundle {
        meta: None,
        identifier: None,
        kind: Some("searchset".into()),
        timestamp: Some(timestamp),
        total: Some(u64::try_from(total).unwrap_or(u64::MAX)),
        link: links,
        entry,
    }
}

fn entry(r: Resource, mode: &str) -> BundleEntry<Resource> {
    BundleEntry {
        full_url: Some(full_url(&r)),
        resource: Some(r),
        search: Some(EntrySearch {
            mode: Some(mode.into()),
            score: None,
        }),
        request: None,
        response: None,
    }
}

/// A document Bundle: the Composition first, then every resource it references, each
/// under its [`full_url`].
pub fn document(
    identifier: &str,
    timestamp: String,
    composition: Resource,
    resources: Vec<Resource>,
) -> Bundle<Resource> {
    let entry = std::iter::once(composition)
        .chain(resources)
        .map(|r| BundleEntry {
            full_url: Some(full_url(&r)),
            resource: Some(r),
            search: None,
            request: None,
            response: None,
        })
        .collect();
    Bundle {
        meta: None,
        identifier: Some(crate::model::Identifier::new(
            "urn:ietf:rfc:3986",
            &urn("Bundle", identifier),
        )),
        kind: Some("document".into()),
        timestamp: Some(timestamp),
        total: None,
        link: Vec::new(),
        entry,
    }
}
