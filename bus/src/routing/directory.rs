//! The participants directory (DESIGN.md section 5): who takes part, and which XJustiz
//! addresses reach whom, plus copy rules. A TOML file, reloaded when it changes:
//!
//! ```toml
//! [[participant]]
//! id = "DE.Justiz.2b7e3c1a-0000-4000-8000-000000000001.1"
//! kind = "court"                      # court, prosecution, lawyer, notary, authority
//! name = "Amtsgericht Musterstadt"
//! land = "NW"
//! courts = ["A1001S"]                 # GDS.Gerichte codes (routing key court:CODE)
//! names = ["Testempfaenger-Sonstige"] # free text / SAFE-ID in absender/empfaenger.sonstige
//! authorities = ["rvtraeger:15"]      # other authority codes, as KIND:CODE
//!
//! [[rule]]                            # copy every criminal-law message to a prosecution office
//! message_type = "nachricht.straf.*"  # exact, or a prefix ending in '*'
//! copy_to = ["DE.Justiz.2b7e3c1a-0000-4000-8000-000000000009.1"]
//! ```
//!
//! Adapters put addresses into events as routing keys `KIND:VALUE` (`court:A1001S`,
//! `other:Testsender`, `rvtraeger:15`); [`Directory::resolve`] maps one to a participant. A
//! participant is also reachable by its own id (`other:<id>`), as SAFE-IDs appear in headers.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::event::validate_name;
use crate::{Error, Result};

/// What kind of participant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A court.
    Court,
    /// A public prosecution office.
    Prosecution,
    /// A lawyer or law firm.
    Lawyer,
    /// A notary.
    Notary,
    /// Any other authority.
    Authority,
}

/// Roles beyond sending and receiving (DESIGN.md section 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// May replay and verify.
    Auditor,
    /// May call the admin API.
    Admin,
}

/// One participant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Participant {
    /// SAFE-ID style id, e.g. `DE.Justiz.<uuid>.<n>`; names the mailbox `mailbox.<id>`.
    pub id: String,
    /// Kind.
    pub kind: Kind,
    /// Display name.
    pub name: String,
    /// Land (two-letter code, e.g. `NW`); empty for federal participants.
    #[serde(default)]
    pub land: String,
    /// `GDS.Gerichte` court codes that address it.
    #[serde(default)]
    pub courts: Vec<String>,
    /// Free-text or SAFE-ID values (as in `empfaenger.sonstige`) that address it.
    #[serde(default)]
    pub names: Vec<String>,
    /// Other authority codes, `KIND:CODE` as adapters write them (e.g. `rvtraeger:15`).
    #[serde(default)]
    pub authorities: Vec<String>,
    /// Extra roles.
    #[serde(default)]
    pub roles: Vec<Role>,
}

impl Participant {
    /// The participant's mailbox topic.
    pub fn mailbox(&self) -> String {
        mailbox_topic(&self.id)
    }

    /// The routing keys that reach it.
    fn routing_keys(&self) -> impl Iterator<Item = String> + '_ {
        let courts = self.courts.iter().map(|c| format!("court:{c}"));
        let names = self.names.iter().chain(std::iter::once(&self.id)).map(|n| format!("other:{}", normalize_text(n)));
        courts.chain(names).chain(self.authorities.iter().cloned())
    }
}

/// A copy rule: events matching every given condition also go to `copy_to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Message type, exact or a prefix ending in `*`.
    #[serde(default)]
    pub message_type: Option<String>,
    /// Sender participant id.
    #[serde(default)]
    pub sender: Option<String>,
    /// A court code among the recipients' addresses or in the case key.
    #[serde(default)]
    pub court: Option<String>,
    /// Participants that receive a copy.
    pub copy_to: Vec<String>,
}

impl Rule {
    fn matches(&self, message_type: &str, sender: Option<&str>, addresses: &[String], subject: &str) -> bool {
        let type_ok = match self.message_type.as_deref() {
            None => true,
            Some(p) => match p.strip_suffix('*') {
                Some(prefix) => message_type.starts_with(prefix),
                None => message_type == p,
            },
        };
        let sender_ok = self.sender.as_deref().is_none_or(|s| sender == Some(s));
        let court_ok = self.court.as_deref().is_none_or(|c| {
            let key = format!("court:{c}");
            addresses.contains(&key) || subject.split('|').next() == Some(key.as_str())
        });
        type_ok && sender_ok && court_ok
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectoryFile {
    #[serde(default, rename = "participant")]
    participants: Vec<Participant>,
    #[serde(default, rename = "rule")]
    rules: Vec<Rule>,
}

/// Name of a participant's mailbox topic.
pub fn mailbox_topic(participant: &str) -> String {
    format!("{MAILBOX_PREFIX}{participant}")
}

/// Mailbox topics are named `mailbox.<participant id>`.
pub const MAILBOX_PREFIX: &str = "mailbox.";

/// Free text compares after trimming and collapsing whitespace (headers wrap long names).
fn normalize_text(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Where an event goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resolution {
    /// Participant id of the sender, when the directory knows its address.
    pub sender: Option<String>,
    /// Recipient participant ids, each once, in header order, then rule copies.
    pub recipients: Vec<String>,
    /// Recipient addresses no participant answers to.
    pub unresolved: Vec<String>,
}

/// A loaded, checked directory.
#[derive(Debug, Default)]
pub struct Directory {
    participants: Vec<Participant>,
    by_id: crate::FastMap<String, usize>,
    by_address: crate::FastMap<String, usize>,
    rules: Vec<Rule>,
}

impl Directory {
    /// Parses and checks a directory: ids valid and unique, no address claimed twice, rules
    /// naming known participants.
    pub fn parse(text: &str) -> Result<Directory> {
        let file: DirectoryFile = toml::from_str(text).map_err(|e| Error::invalid("directory", e.to_string()))?;
        let mut dir = Directory { rules: file.rules, ..Directory::default() };
        for (i, p) in file.participants.into_iter().enumerate() {
            validate_name("participant id", &p.id)?;
            // Its mailbox would read as another mailbox's dead-letter topic (`<mailbox>.<group>.dlq`).
            if p.id.ends_with(".dlq") {
                return Err(Error::invalid("directory", format!("participant id {} ends in .dlq, as dead-letter topics do", p.id)));
            }
            if dir.by_id.insert(p.id.clone(), i).is_some() {
                return Err(Error::invalid("directory", format!("participant {} is listed twice", p.id)));
            }
            for key in p.routing_keys() {
                if let Some(other) = dir.by_address.insert(key.clone(), i) {
                    if other != i {
                        return Err(Error::invalid(
                            "directory",
                            format!("address {key} is claimed by {} and {}", dir.participants[other].id, p.id),
                        ));
                    }
                }
            }
            dir.participants.push(p);
        }
        for rule in &dir.rules {
            for id in rule.copy_to.iter().chain(rule.sender.iter()) {
                if !dir.by_id.contains_key(id) {
                    return Err(Error::invalid("directory", format!("a rule names the unknown participant {id}")));
                }
            }
        }
        Ok(dir)
    }

    /// Reads a directory file.
    pub fn load(path: &Path) -> Result<Directory> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading directory {}", path.display()), e))?;
        Directory::parse(&text).map_err(|e| Error::invalid("directory", format!("{}: {e}", path.display())))
    }

    /// All participants, in file order.
    pub fn participants(&self) -> &[Participant] {
        &self.participants
    }

    /// A participant by id.
    pub fn participant(&self, id: &str) -> Option<&Participant> {
        self.by_id.get(id).map(|&i| &self.participants[i])
    }

    /// The participant a routing key (`court:A1001S`, `other:Testsender`, `rvtraeger:15`) reaches.
    pub fn resolve(&self, address: &str) -> Option<&Participant> {
        let key = match address.split_once(':') {
            Some(("other", text)) => format!("other:{}", normalize_text(text)),
            _ => address.to_string(),
        };
        self.by_address.get(&key).map(|&i| &self.participants[i])
    }

    /// Recipients of an event: its header addresses mapped through the directory, plus rule copies.
    pub fn route(&self, message_type: &str, sender_address: &str, addresses: &[String], subject: &str) -> Resolution {
        let sender = self.resolve(sender_address).map(|p| p.id.clone());
        let mut out = Resolution { sender: sender.clone(), ..Resolution::default() };
        for a in addresses {
            match self.resolve(a) {
                Some(p) if !out.recipients.contains(&p.id) => out.recipients.push(p.id.clone()),
                Some(_) => {}
                None => out.unresolved.push(a.clone()),
            }
        }
        for rule in &self.rules {
            if rule.matches(message_type, sender.as_deref(), addresses, subject) {
                for id in &rule.copy_to {
                    if !out.recipients.contains(id) {
                        out.recipients.push(id.clone());
                    }
                }
            }
        }
        out
    }
}

/// The directory in force, reloaded from its file when the file changes. A file that fails to
/// parse leaves the previous directory in force (and says so in the log).
#[derive(Clone)]
pub struct DirectoryHandle {
    /// The current directory; replaced whole on reload, so readers never see half of one.
    current: Arc<RwLock<Arc<Directory>>>,
}

impl DirectoryHandle {
    /// A fixed directory (tests, benchmarks).
    pub fn fixed(directory: Directory) -> Self {
        DirectoryHandle { current: Arc::new(RwLock::new(Arc::new(directory))) }
    }

    /// Loads `path` and reloads it every `poll` when its modification time or size changes.
    /// The watcher stops when every handle is dropped.
    pub fn watch(path: PathBuf, poll: Duration) -> Result<Self> {
        let handle = DirectoryHandle::fixed(Directory::load(&path)?);
        tracing::info!(path = %path.display(), participants = handle.get().participants().len(), "participants directory loaded");
        let weak = Arc::downgrade(&handle.current);
        let mut seen = stamp(&path);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            loop {
                tick.tick().await;
                let Some(current) = weak.upgrade() else { return };
                let now = stamp(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                match Directory::load(&path) {
                    Ok(d) => {
                        tracing::info!(path = %path.display(), participants = d.participants().len(), "participants directory reloaded");
                        *current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(d);
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "participants directory not reloaded; keeping the previous one")
                    }
                }
            }
        });
        Ok(handle)
    }

    /// The directory in force now.
    pub fn get(&self) -> Arc<Directory> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// For tests: courts `DE.Justiz.p<i>.1` with court codes `C<i>`, for i in 0..n.
#[cfg(test)]
pub(crate) fn numbered_courts(n: usize) -> DirectoryHandle {
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!(
            "[[participant]]\nid = \"DE.Justiz.p{i}.1\"\nkind = \"court\"\nname = \"Gericht {i}\"\ncourts = [\"C{i}\"]\n"
        ));
    }
    DirectoryHandle::fixed(Directory::parse(&text).expect("directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[[participant]]
id = "DE.Justiz.court-a.1"
kind = "court"
name = "Amtsgericht A"
land = "NW"
courts = ["A1001S"]
names = ["Testempfaenger-Sonstige"]

[[participant]]
id = "DE.Justiz.firm.1"
kind = "lawyer"
name = "Joswig & Partner"
names = ["Joswig & Partner"]
authorities = ["rvtraeger:15"]

[[participant]]
id = "DE.Justiz.sta.1"
kind = "prosecution"
name = "Staatsanwaltschaft"

[[rule]]
message_type = "nachricht.straf.*"
copy_to = ["DE.Justiz.sta.1"]
"#;

    #[test]
    fn resolves_courts_names_authorities_and_ids() {
        let d = Directory::parse(EXAMPLE).expect("parses");
        assert_eq!(d.resolve("court:A1001S").map(|p| p.id.as_str()), Some("DE.Justiz.court-a.1"));
        assert_eq!(d.resolve("other:  Joswig &\n Partner ").map(|p| p.id.as_str()), Some("DE.Justiz.firm.1"));
        assert_eq!(d.resolve("rvtraeger:15").map(|p| p.id.as_str()), Some("DE.Justiz.firm.1"));
        assert_eq!(d.resolve("other:DE.Justiz.sta.1").map(|p| p.id.as_str()), Some("DE.Justiz.sta.1"));
        assert!(d.resolve("court:Z9999").is_none());
    }

    #[test]
    fn routes_with_rules_and_reports_unresolved() {
        let d = Directory::parse(EXAMPLE).expect("parses");
        let r = d.route(
            "nachricht.straf.anklage.1",
            "court:A1001S",
            &["rvtraeger:15".into(), "court:X1".into(), "other:Joswig & Partner".into()],
            "court:A1001S|1 Ds 1/26",
        );
        assert_eq!(r.sender.as_deref(), Some("DE.Justiz.court-a.1"));
        assert_eq!(r.recipients, vec!["DE.Justiz.firm.1".to_string(), "DE.Justiz.sta.1".to_string()]);
        assert_eq!(r.unresolved, vec!["court:X1".to_string()]);
        let plain = d.route("nachricht.gds.basisnachricht.0005006", "court:X1", &["court:A1001S".into()], "");
        assert_eq!(plain.sender, None);
        assert_eq!(plain.recipients, vec!["DE.Justiz.court-a.1".to_string()]);
    }

    #[test]
    fn refuses_inconsistent_directories() {
        let twice = format!("{EXAMPLE}\n[[participant]]\nid = \"DE.Justiz.firm.1\"\nkind = \"notary\"\nname = \"x\"\n");
        assert!(Directory::parse(&twice).expect_err("duplicate id").to_string().contains("twice"));
        let claimed =
            format!("{EXAMPLE}\n[[participant]]\nid = \"DE.Justiz.b.1\"\nkind = \"court\"\nname = \"x\"\ncourts = [\"A1001S\"]\n");
        assert!(Directory::parse(&claimed).expect_err("address twice").to_string().contains("claimed"));
        let rule = "[[rule]]\ncopy_to = [\"nobody\"]\n";
        assert!(Directory::parse(rule).expect_err("unknown").to_string().contains("unknown participant"));
        assert!(Directory::parse("[[participant]]\nid = \"a b\"\nkind = \"court\"\nname = \"x\"\n").is_err());
        assert!(Directory::parse("[[participant]]\nid = \"a\"\nkind = \"judge\"\nname = \"x\"\n").is_err());
        let dead_letters = "[[participant]]\nid = \"DE.Justiz.court-a.1.inbox.dlq\"\nkind = \"court\"\nname = \"x\"\n";
        assert!(Directory::parse(dead_letters).expect_err("looks like a dead-letter topic").to_string().contains(".dlq"));
    }

    #[tokio::test]
    async fn reloads_on_change_and_keeps_the_old_one_on_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("directory.toml");
        std::fs::write(&path, EXAMPLE).expect("write");
        let handle = DirectoryHandle::watch(path.clone(), Duration::from_millis(20)).expect("loads");
        assert_eq!(handle.get().participants().len(), 3);
        let more = format!("{EXAMPLE}\n[[participant]]\nid = \"DE.Justiz.new.1\"\nkind = \"notary\"\nname = \"Notar\"\n");
        std::fs::write(&path, &more).expect("write");
        wait_for(|| handle.get().participants().len() == 4).await;
        std::fs::write(&path, "[[participant]]\nbroken").expect("write");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(handle.get().participants().len(), 4, "a broken file keeps the previous directory");
    }

    async fn wait_for(mut ok: impl FnMut() -> bool) {
        for _ in 0..500 {
            if ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached");
    }
}
