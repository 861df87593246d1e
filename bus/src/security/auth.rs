//! Who is calling, and what they may do.
//!
//! | call | operator (no TLS, loopback) | participant (mTLS) |
//! |---|---|---|
//! | `Publish*` | any sender | only senders the directory maps to the participant, and only attachments it may read |
//! | `Subscribe` | any topic | its own mailbox and its dead letters; other topics need `admin` |
//! | `Replay` | yes | `auditor` or `admin` |
//! | `Admin.DescribeTopic` | yes | yes (clients learn partition counts) |
//! | other `Admin` reads | yes | `auditor` or `admin`; a group's description, dead letters and quarantine also the mailbox's owner |
//! | `Admin` changes | yes | `admin`; releasing and skipping quarantined cases of its mailbox's groups also the owner |
//! | `Blobs.Upload` | yes | yes |
//! | `Blobs.Download`, `Blobs.Stat` | yes | blobs it uploaded or that came with its deliveries; `auditor` or `admin`: all |
//!
//! Every refusal is logged (participant, call, reason) and answered with `PERMISSION_DENIED`,
//! or `UNAUTHENTICATED` when the certificate names no known participant.

use tonic::Request;

use crate::routing::directory::{DirectoryHandle, Participant, Role};
use crate::{Error, Result};

/// Who made a call.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A local client of a server without TLS (which listens on loopback only).
    Operator,
    /// An authenticated participant.
    Participant(Participant),
}

/// Identifies callers: from the client certificate when the server runs mTLS.
#[derive(Clone)]
pub struct Gate {
    /// The directory participants are looked up in; `None` without TLS.
    directory: Option<DirectoryHandle>,
}

impl Gate {
    /// Every caller is the operator (no TLS).
    pub fn open() -> Self {
        Gate { directory: None }
    }

    /// Callers are the participants their certificates name.
    pub fn mtls(directory: DirectoryHandle) -> Self {
        Gate { directory: Some(directory) }
    }

    /// Whether calls are authenticated.
    pub fn is_mtls(&self) -> bool {
        self.directory.is_some()
    }

    /// The caller of `request`; `call` names it in the log of a refusal.
    pub fn caller<T>(&self, request: &Request<T>, call: &str) -> Result<Caller> {
        let Some(directory) = &self.directory else { return Ok(Caller::Operator) };
        let refuse = |reason: String| {
            tracing::warn!(call, reason, "call refused: unauthenticated");
            Error::Unauthenticated(reason)
        };
        let certs = request.peer_certs().ok_or_else(|| refuse("no client certificate".into()))?;
        let first = certs.first().ok_or_else(|| refuse("no client certificate".into()))?;
        let id = super::tls::participant_id(first).map_err(|e| refuse(e.to_string()))?;
        match directory.get().participant(&id) {
            Some(p) => Ok(Caller::Participant(p.clone())),
            None => Err(refuse(format!("the certificate names {id:?}, which is not in the participants directory"))),
        }
    }

    /// The caller, who must be allowed to publish an event with `sender` (a routing key such
    /// as `court:A1001S`, or a participant id).
    pub fn check_sender(&self, caller: &Caller, call: &str, sender: &str) -> Result<()> {
        let (Caller::Participant(p), Some(directory)) = (caller, &self.directory) else { return Ok(()) };
        if sender.is_empty() {
            return Err(deny(p, call, "an event must name its sender".into()));
        }
        if sender == p.id {
            return Ok(());
        }
        match directory.get().resolve(sender) {
            Some(owner) if owner.id == p.id => Ok(()),
            Some(owner) => Err(deny(p, call, format!("sender {sender:?} belongs to {}, not to {}", owner.id, p.id))),
            None => Err(deny(p, call, format!("sender {sender:?} is not an address of {} in the participants directory", p.id))),
        }
    }
}

fn deny(p: &Participant, call: &str, reason: String) -> Error {
    tracing::warn!(participant = %p.id, call, reason, "call refused: permission denied");
    Error::PermissionDenied(reason)
}

impl Caller {
    /// The participant id, or `operator`.
    pub fn id(&self) -> &str {
        match self {
            Caller::Operator => "operator",
            Caller::Participant(p) => &p.id,
        }
    }

    /// Allowed when the caller is the operator or holds one of `roles`.
    pub fn require_role(&self, call: &str, roles: &[Role]) -> Result<()> {
        match self {
            Caller::Operator => Ok(()),
            Caller::Participant(p) if p.roles.iter().any(|r| roles.contains(r)) => Ok(()),
            Caller::Participant(p) => {
                let names: Vec<String> = roles.iter().map(|r| format!("{r:?}").to_lowercase()).collect();
                Err(deny(p, call, format!("{call} needs the role {}", names.join(" or "))))
            }
        }
    }

    /// Allowed a call on the groups of `topic`: the operator, a holder of one of `roles`, or the
    /// participant whose mailbox `topic` is (it runs its own mailbox's groups).
    pub fn require_role_or_own_mailbox(&self, call: &str, roles: &[Role], topic: &str) -> Result<()> {
        match self {
            Caller::Participant(p) if topic == p.mailbox() => Ok(()),
            _ => self.require_role(call, roles),
        }
    }

    /// Whether the caller may read every blob: the operator, an auditor or an admin. Other
    /// participants read the blobs granted to them (those they uploaded, and those that came
    /// with their deliveries).
    pub fn reads_every_blob(&self) -> bool {
        match self {
            Caller::Operator => true,
            Caller::Participant(p) => p.roles.iter().any(|r| matches!(r, Role::Auditor | Role::Admin)),
        }
    }

    /// The refusal of blob `sha256`, which was not granted to the caller (logged).
    pub fn blob_refused(&self, call: &str, sha256: &str) -> Error {
        match self {
            Caller::Participant(p) => {
                deny(p, call, format!("{} may read only blobs it uploaded or that came with its deliveries, not {sha256}", p.id))
            }
            Caller::Operator => Error::Internal("the operator reads every blob".into()),
        }
    }

    /// Allowed to subscribe to `topic`: a participant's own mailbox and its dead letters
    /// (`<mailbox>.<group>.dlq`, for a group name without dots: no participant id ends in
    /// `.dlq`, so no other mailbox has such a name); any other topic needs `admin`.
    pub fn check_read(&self, call: &str, topic: &str) -> Result<()> {
        let Caller::Participant(p) = self else { return Ok(()) };
        let own = p.mailbox();
        let own_dead_letters = topic
            .strip_prefix(own.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|rest| rest.strip_suffix(".dlq"))
            .is_some_and(|group| !group.is_empty() && !group.contains('.'));
        if topic == own || own_dead_letters || p.roles.contains(&Role::Admin) {
            return Ok(());
        }
        Err(deny(p, call, format!("{} may read only its own mailbox {own:?} and its dead letters, not {topic:?}", p.id)))
    }
}
