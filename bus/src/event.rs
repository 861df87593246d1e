//! The core event: the envelope of DESIGN.md section 2, validated.
//!
//! The generated protobuf type (`justizbus_proto::v1::Event`) stays at the edge: requests are
//! converted with [`Event::from_wire`], which validates and fills in defaults, and stored records
//! hold the protobuf encoding of the envelope (so any gRPC client can decode a replayed record).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use justizbus_proto::v1 as pb;
use prost::Message;

use crate::{Error, Result};

/// Envelope version written into every event.
pub const SPEC_VERSION: &str = "justizbus.v1";
/// Longest accepted event id.
pub const MAX_ID_LEN: usize = 256;
/// Longest accepted subject (key).
pub const MAX_SUBJECT_LEN: usize = 1024;

/// A validated event, ready to be stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The wire form, with defaults filled in.
    pub wire: pb::Event,
}

impl Event {
    /// Validates a wire event and fills in what the bus assigns: a UUID v7 id when empty,
    /// the current time when absent, and the envelope version.
    pub fn from_wire(mut wire: pb::Event, max_event_bytes: usize) -> Result<Self> {
        if wire.id.is_empty() {
            wire.id = uuid::Uuid::now_v7().to_string();
        }
        validate_token("event.id", &wire.id, MAX_ID_LEN)?;
        if wire.subject.is_empty() {
            return Err(Error::invalid("event.subject", "the subject (case key) is required: it orders and routes the event"));
        }
        if wire.subject.len() > MAX_SUBJECT_LEN {
            return Err(Error::invalid("event.subject", format!("longer than {MAX_SUBJECT_LEN} bytes")));
        }
        if wire.subject.chars().any(char::is_control) {
            return Err(Error::invalid("event.subject", "contains control characters"));
        }
        if wire.data.is_empty() && wire.original.is_empty() && wire.attachments.is_empty() {
            return Err(Error::invalid("event.data", "the event is empty: data, original and attachments are all empty"));
        }
        if !wire.spec_version.is_empty() && wire.spec_version != SPEC_VERSION {
            return Err(Error::invalid(
                "event.spec_version",
                format!("unsupported envelope version {:?}; this bus speaks {SPEC_VERSION:?}", wire.spec_version),
            ));
        }
        wire.spec_version = SPEC_VERSION.to_string();
        match &wire.time {
            None => wire.time = Some(now_timestamp()),
            Some(t) if t.nanos < 0 || t.nanos >= 1_000_000_000 || t.seconds < 0 || t.seconds > 253_402_300_799 => {
                return Err(Error::invalid("event.time", "not a valid timestamp between 1970 and 9999"));
            }
            Some(_) => {}
        }
        for (i, a) in wire.attachments.iter().enumerate() {
            if a.sha256.len() != 64 || !a.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                return Err(Error::invalid(format!("event.attachments[{i}].sha256"), "must be 64 lower-case hex digits"));
            }
        }
        let size = wire.encoded_len();
        if size > max_event_bytes {
            return Err(Error::TooLarge { size, limit: max_event_bytes });
        }
        Ok(Event { wire })
    }

    /// Decodes a stored envelope; the event's data shares `bytes` instead of being copied.
    pub fn decode(bytes: &bytes::Bytes) -> Result<pb::Event> {
        pb::Event::decode(bytes.clone()).map_err(|e| Error::Corrupt { path: "event envelope".into(), reason: e.to_string() })
    }

    /// The protobuf encoding stored in the log.
    pub fn encode(&self) -> Vec<u8> {
        self.wire.encode_to_vec()
    }

    /// The event time in milliseconds since the Unix epoch.
    pub fn time_ms(&self) -> i64 {
        self.wire.time.as_ref().map(timestamp_ms).unwrap_or_else(now_ms)
    }
}

/// Checks an identifier-like string: non-empty, bounded, printable, not starting with NUL.
pub fn validate_token(field: &str, value: &str, max_len: usize) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > max_len {
        return Err(Error::invalid(field, format!("longer than {max_len} bytes")));
    }
    if value.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(Error::invalid(field, "must not contain whitespace or control characters"));
    }
    Ok(())
}

/// Longest topic or group name (Kafka's limit for topics).
pub const MAX_NAME_LEN: usize = 249;

/// Checks a topic or group name: 1-249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_name(field: &str, value: &str) -> Result<()> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(Error::invalid(field, format!("must be 1 to {MAX_NAME_LEN} characters long")));
    }
    if value == "." || value == ".." {
        return Err(Error::invalid(field, "must not be '.' or '..'"));
    }
    if let Some(c) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(Error::invalid(field, format!("may contain only letters, digits, '.', '_' and '-', not {c:?}")));
    }
    Ok(())
}

/// Whether a topic is the bus's own: `justizbus.*` (the delivery journal, the mailbox store) and
/// `__*` (Kafka's internal topics and, on Kafka, the bus's state, blob and checkpoint topics).
pub fn is_reserved_topic(topic: &str) -> bool {
    topic.starts_with("justizbus.") || topic.starts_with("__")
}

/// Refuses a reserved topic as the target of a client's publish, topic creation or retention
/// change: only the bus writes them (an event in the mailbox store would stop the next start;
/// one in the journal would forge the audit trail).
pub fn check_client_topic(field: &str, topic: &str) -> Result<()> {
    if is_reserved_topic(topic) {
        return Err(Error::invalid(field, format!("{topic} is reserved: topics named justizbus.* or __* are written by the bus itself")));
    }
    Ok(())
}

/// Current time as milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Current time as a protobuf timestamp.
pub fn now_timestamp() -> prost_types::Timestamp {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// Milliseconds since the epoch of a protobuf timestamp.
pub fn timestamp_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos) / 1_000_000)
}

/// A protobuf timestamp from milliseconds since the epoch.
pub fn ms_timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: (ms.rem_euclid(1000) * 1_000_000) as i32 }
}

/// RFC 3339 rendering (UTC, milliseconds) of a protobuf timestamp, for the command line.
pub fn rfc3339(t: &prost_types::Timestamp) -> String {
    t.to_string()
}

/// Parses an RFC 3339 time (e.g. `2026-11-26T10:00:00Z`) or milliseconds since the epoch.
pub fn parse_time(s: &str) -> Result<prost_types::Timestamp> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms_timestamp(ms));
    }
    s.parse::<prost_types::Timestamp>()
        .map_err(|e| Error::invalid("time", format!("{s:?} is neither RFC 3339 nor milliseconds since the epoch: {e}")))
}

/// The headers of an event in a stable order, for printing.
pub fn sorted_headers(e: &pb::Event) -> BTreeMap<&str, &str> {
    e.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> pb::Event {
        pb::Event { subject: "AG Köln 12 C 345/26".into(), data: bytes::Bytes::from_static(b"{}"), ..Default::default() }
    }

    #[test]
    fn fills_in_defaults() {
        let e = Event::from_wire(event(), 1024).expect("valid");
        assert_eq!(e.wire.spec_version, SPEC_VERSION);
        assert!(uuid::Uuid::parse_str(&e.wire.id).is_ok());
        assert!(e.wire.time.is_some());
    }

    #[test]
    fn rejects_bad_envelopes() {
        let mut e = event();
        e.subject.clear();
        assert!(matches!(Event::from_wire(e, 1024), Err(Error::InvalidArgument { .. })));
        let mut e = event();
        e.data.clear();
        assert!(matches!(Event::from_wire(e, 1024), Err(Error::InvalidArgument { .. })));
        let mut e = event();
        e.id = "has space".into();
        assert!(matches!(Event::from_wire(e, 1024), Err(Error::InvalidArgument { .. })));
        let mut e = event();
        e.data = vec![1; 2000].into();
        assert!(matches!(Event::from_wire(e, 1024), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn names() {
        assert!(validate_name("topic", "ingest.v1_x-2").is_ok());
        assert!(validate_name("topic", "a/b").is_err());
        assert!(validate_name("topic", "..").is_err());
        assert!(validate_name("topic", "").is_err());
        for reserved in ["justizbus.audit", "justizbus.mailboxes", "__justizbus_state", "__consumer_offsets"] {
            assert!(check_client_topic("topic", reserved).is_err(), "{reserved}");
        }
        for ordinary in ["xjustiz.ingest", "justizbus", "ingest.justizbus.x", "_single"] {
            assert!(check_client_topic("topic", ordinary).is_ok(), "{ordinary}");
        }
    }
}
