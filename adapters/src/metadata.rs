//! What routing needs from an XJustiz header, for every header generation:
//! - 2.x: `nachrichtenkopf` with `absender_Gericht`/`absender_Sonstige`/..., `empfaenger_*`,
//!   `aktenzeichen.absender`/`.empfaenger`, `eigene_`/`fremde_Nachrichten_ID`; the version on
//!   `grunddaten`;
//! - 3.0 to 3.5: `auswahl_absender`/`auswahl_empfaenger` choices (`absender.gericht`, ...),
//!   `eigeneNachrichtenID`/`fremdeNachrichtenID`;
//! - 3.6 and later (4.x): `absender`/`empfaenger` blocks holding `informationen` with
//!   `auswahl_kommunikationspartner` and the party's own `auswahl_aktenzeichen` and message id.
//!
//! The walk is by element names, not by release, so a header in any of these shapes yields the
//! same [`Metadata`].

use serde::{Deserialize, Serialize};

use crate::instance::Element;

/// A sender or recipient address as the header gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    /// `court`, `authority`, `other` (free text or SAFE-ID), or the element name for rarer kinds.
    pub kind: String,
    /// A code-list value (`GDS.Gerichte` court code, authority code).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// `listVersionID` of the code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_version: Option<String>,
    /// `listURI` of the code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_uri: Option<String>,
    /// Free text (e.g. a SAFE-ID or a name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl Address {
    /// The address as one routing string: `court:A1001S`, `other:DE.Justiz.x.1`.
    pub fn routing_key(&self) -> String {
        format!("{}:{}", self.kind, self.code.as_deref().or(self.text.as_deref()).unwrap_or(""))
    }
}

/// An Aktenzeichen with the court or authority that keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseNumber {
    /// The Aktenzeichen as written (whitespace collapsed).
    pub number: String,
    /// The court or authority, when the message names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<Address>,
}

/// Routing metadata of one message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    /// The sender's own message id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The message id this one answers (`fremdeNachrichtenID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreign_message_id: Option<String>,
    /// `erstellungszeitpunkt`, lexical.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// Sender addresses (normally one).
    pub sender: Vec<Address>,
    /// Recipient addresses.
    pub recipients: Vec<Address>,
    /// The sender's Aktenzeichen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_case: Option<String>,
    /// The recipient's Aktenzeichen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient_case: Option<String>,
    /// Aktenzeichen of the proceeding (`instanzdaten`), with the court that keeps it.
    pub proceeding_cases: Vec<CaseNumber>,
    /// `sendungsprioritaet` code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<String>,
}

impl Metadata {
    /// The ordering key of the case: court + Aktenzeichen of the proceeding, or else of the
    /// recipient, or else of the sender, normalised (upper case, single spaces); the message id
    /// when the message names no case.
    pub fn case_key(&self) -> String {
        let normal = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ").to_uppercase();
        if let Some(c) = self.proceeding_cases.first() {
            let court = c.authority.as_ref().map(Address::routing_key).unwrap_or_default();
            return format!("{court}|{}", normal(&c.number));
        }
        if let (Some(case), Some(to)) = (&self.recipient_case, self.recipients.first()) {
            return format!("{}|{}", to.routing_key(), normal(case));
        }
        if let (Some(case), Some(from)) = (&self.sender_case, self.sender.first()) {
            return format!("{}|{}", from.routing_key(), normal(case));
        }
        format!("message|{}", self.message_id.as_deref().unwrap_or(""))
    }
}

fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn child<'e, 'x>(e: &'e Element<'x>, local: &str) -> Option<&'e Element<'x>> {
    e.children.iter().find(|c| &*c.name.local == local)
}

fn descendant<'e, 'x>(e: &'e Element<'x>, local: &str) -> Option<&'e Element<'x>> {
    e.children.iter().find_map(|c| if &*c.name.local == local { Some(c) } else { descendant(c, local) })
}

fn text_of(e: &Element, names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| descendant(e, n)).map(|e| collapse(&e.text)).filter(|t| !t.is_empty())
}

/// The kind of a party from its element name.
fn kind_of(local: &str) -> String {
    let l = local.to_lowercase();
    let l = l.trim_start_matches("absender").trim_start_matches("empfaenger").trim_start_matches(['_', '.']);
    if l.contains("gericht") {
        "court".into()
    } else if l.contains("behoerde") {
        "authority".into()
    } else if l.contains("sonstig") {
        "other".into()
    } else {
        l.to_string()
    }
}

/// Addresses below a party element; stops at code-list values and free-text leaves.
fn addresses(e: &Element, out: &mut Vec<Address>) {
    const NOT_ADDRESSES: [&str; 4] = ["nachrichtenid", "aktenzeichen", "nachrichten_id", "herstellerinformation"];
    let lower = e.name.local.to_lowercase();
    if NOT_ADDRESSES.iter().any(|n| lower.contains(n)) {
        return;
    }
    if let Some(code) = child(e, "code") {
        out.push(Address {
            kind: kind_of(&e.name.local),
            code: Some(collapse(&code.text)),
            list_version: e.attribute("", "listVersionID").map(str::to_string),
            list_uri: e.attribute("", "listURI").map(str::to_string),
            text: None,
        });
        return;
    }
    if e.children.is_empty() {
        let text = collapse(&e.text);
        if !text.is_empty() {
            out.push(Address { kind: kind_of(&e.name.local), code: None, list_version: None, list_uri: None, text: Some(text) });
        }
        return;
    }
    e.children.iter().for_each(|c| addresses(c, out));
}

/// An Aktenzeichen below `e`: plain text, or the free-text/structured choice of 3.x.
fn case_number(e: &Element) -> Option<String> {
    if e.children.is_empty() {
        let t = collapse(&e.text);
        return (!t.is_empty()).then_some(t);
    }
    if let Some(t) = text_of(e, &["aktenzeichen.freitext"]) {
        return Some(t);
    }
    // Structured Aktenzeichen: the leaf values in document order.
    let mut parts = Vec::new();
    leaves(e, &mut parts);
    (!parts.is_empty()).then(|| parts.join(" "))
}

fn leaves(e: &Element, out: &mut Vec<String>) {
    if e.children.is_empty() {
        let t = collapse(&e.text);
        if !t.is_empty() {
            out.push(t);
        }
    }
    e.children.iter().for_each(|c| leaves(c, out));
}

/// Extracts the routing metadata of a message.
pub fn extract(root: &Element, _version: &str) -> Metadata {
    let mut m = Metadata::default();
    let Some(head) = child(root, "nachrichtenkopf") else { return m };
    m.created = text_of(head, &["erstellungszeitpunkt"]);
    m.message_id = text_of(head, &["eigeneNachrichtenID", "eigene_Nachrichten_ID"]);
    m.foreign_message_id = text_of(head, &["fremdeNachrichtenID", "fremde_Nachrichten_ID"]);
    m.priority = descendant(head, "sendungsprioritaet").and_then(|p| child(p, "code")).map(|c| collapse(&c.text));
    m.sender_case = child(head, "aktenzeichen.absender").and_then(case_number);
    m.recipient_case = child(head, "aktenzeichen.empfaenger").and_then(case_number);
    for c in &head.children {
        let local: &str = &c.name.local;
        let (is_sender, is_recipient) = (
            local.starts_with("absender") || local == "auswahl_absender",
            local.starts_with("empfaenger") || local == "auswahl_empfaenger",
        );
        if !is_sender && !is_recipient {
            continue;
        }
        let mut found = Vec::new();
        // 3.6+: the party block carries its own Aktenzeichen.
        if let Some(case) = descendant(c, "auswahl_aktenzeichen").and_then(case_number) {
            if is_sender {
                m.sender_case.get_or_insert(case);
            } else {
                m.recipient_case.get_or_insert(case);
            }
        }
        addresses(c, &mut found);
        if is_sender {
            m.sender.extend(found);
        } else {
            m.recipients.extend(found);
        }
    }
    if let Some(daten) = child(root, "grunddaten").and_then(|g| child(g, "verfahrensdaten")) {
        let mut instances = Vec::new();
        collect_named(daten, "instanzdaten", &mut instances);
        for inst in instances {
            let Some(number) = child(inst, "aktenzeichen").and_then(case_number) else { continue };
            let mut authority = Vec::new();
            if let Some(b) = child(inst, "instanzbehoerde").or_else(|| child(inst, "auswahl_instanzbehoerde")) {
                addresses(b, &mut authority);
            }
            m.proceeding_cases.push(CaseNumber { number, authority: authority.into_iter().next() });
        }
    }
    m
}

fn collect_named<'e, 'x>(e: &'e Element<'x>, local: &str, out: &mut Vec<&'e Element<'x>>) {
    for c in &e.children {
        if &*c.name.local == local {
            out.push(c);
        } else {
            collect_named(c, local, out);
        }
    }
}
