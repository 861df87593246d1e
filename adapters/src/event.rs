//! Turning a checked XJustiz message into a bus event (`justizbus.v1.Event`), and its JSON form.

use std::collections::HashMap;

use base64::Engine as _;
use justizbus_proto::v1 as pb;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::Message;

/// The envelope version.
pub const SPEC_VERSION: &str = "justizbus.v1";

/// Header keys the adapter sets.
pub mod headers {
    /// The sender's own message id.
    pub const MESSAGE_ID: &str = "xjustiz.message_id";
    /// The message id this one answers.
    pub const FOREIGN_MESSAGE_ID: &str = "xjustiz.foreign_message_id";
    /// `sendungsprioritaet` code.
    pub const PRIORITY: &str = "xjustiz.priority";
    /// The full routing metadata as JSON.
    pub const METADATA: &str = "xjustiz.metadata";
    /// The file name the message arrived under.
    pub const FILE_NAME: &str = "xjustiz.file_name";
}

/// Lower-case hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The event id: derived from the content, so publishing the same message again (after a
/// crash, from a second drop) yields the same id and the bus stores it once. The sender's
/// message id is the natural identity; the hash of the original bytes guards against two
/// different messages reusing one id.
pub fn event_id(message: &Message, original: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(message.metadata.message_id.as_deref().unwrap_or("").as_bytes());
    h.update([0]);
    h.update(original);
    let digest = h.finalize();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("xj-{hex}")
}

/// Builds the event for a message; `attachments` are blobs already stored in the bus.
pub fn build(message: &Message, original: &[u8], attachments: Vec<pb::Attachment>, source: &str) -> pb::Event {
    let m = &message.metadata;
    let mut headers = HashMap::new();
    if let Some(id) = &m.message_id {
        headers.insert(headers::MESSAGE_ID.to_string(), id.clone());
    }
    if let Some(id) = &m.foreign_message_id {
        headers.insert(headers::FOREIGN_MESSAGE_ID.to_string(), id.clone());
    }
    if let Some(p) = &m.priority {
        headers.insert(headers::PRIORITY.to_string(), p.clone());
    }
    headers.insert(headers::METADATA.to_string(), serde_json::to_string(m).unwrap_or_default());
    pb::Event {
        id: event_id(message, original),
        source: source.to_string(),
        r#type: message.message_type.clone(),
        schema_version: message.version.clone(),
        subject: m.case_key(),
        time: m.created.as_deref().and_then(parse_xsd_datetime),
        sender: m.sender.first().map(|a| a.routing_key()).unwrap_or_default(),
        recipients: m.recipients.iter().map(|a| a.routing_key()).collect(),
        data: serde_json::to_vec(&message.data).unwrap_or_default().into(),
        data_content_type: "application/json".into(),
        original: original.to_vec(),
        attachments,
        headers,
        spec_version: SPEC_VERSION.into(),
    }
}

/// The JSON form of an event (the envelope schema's shape).
pub fn to_json(e: &pb::Event) -> Value {
    let data: Value = serde_json::from_slice(&e.data).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&e.data).into_owned()));
    let metadata: Value = e.headers.get(headers::METADATA).and_then(|m| serde_json::from_str(m).ok()).unwrap_or(Value::Null);
    let headers: serde_json::Map<String, Value> =
        e.headers.iter().filter(|(k, _)| *k != headers::METADATA).map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    let mut out = json!({
        "spec_version": SPEC_VERSION,
        "id": e.id,
        "source": e.source,
        "type": e.r#type,
        "schema_version": e.schema_version,
        "subject": e.subject,
        "sender": e.sender,
        "recipients": e.recipients,
        "data_content_type": e.data_content_type,
        "data": data,
        "original_base64": base64::engine::general_purpose::STANDARD.encode(&e.original),
        "attachments": e.attachments.iter().map(|a| json!({
            "sha256": a.sha256, "size": a.size, "name": a.name, "media_type": a.media_type,
        })).collect::<Vec<_>>(),
        "headers": headers,
    });
    if let Some(t) = &e.time {
        out["time"] = json!(rfc3339(t));
    }
    if !metadata.is_null() {
        out["metadata"] = metadata;
    }
    out
}

fn rfc3339(t: &prost_types::Timestamp) -> String {
    let secs = t.seconds;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let ms = t.nanos / 1_000_000;
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Parses an `xs:dateTime` (a missing zone is taken as UTC).
pub fn parse_xsd_datetime(s: &str) -> Option<prost_types::Timestamp> {
    let s = s.trim();
    let (date, time) = s.split_once('T')?;
    let mut dp = date.splitn(3, '-');
    let (y, mo, d): (i64, u32, u32) = (dp.next()?.parse().ok()?, dp.next()?.parse().ok()?, dp.next()?.parse().ok()?);
    let (clock, offset_secs) = if let Some(c) = time.strip_suffix('Z') {
        (c, 0)
    } else if let Some(i) = time.rfind(['+', '-']).filter(|i| *i >= 8) {
        let (c, off) = time.split_at(i);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (h, m) = off[1..].split_once(':')?;
        (c, sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60))
    } else {
        (time, 0)
    };
    let mut cp = clock.splitn(3, ':');
    let (h, mi): (i64, i64) = (cp.next()?.parse().ok()?, cp.next()?.parse().ok()?);
    let sec = cp.next()?;
    let (whole, frac) = sec.split_once('.').unwrap_or((sec, ""));
    let whole: i64 = whole.parse().ok()?;
    let nanos: i32 = format!("{:0<9}", frac.chars().take(9).collect::<String>()).parse().ok()?;
    let days = days_from_civil(y, mo, d);
    Some(prost_types::Timestamp { seconds: days * 86_400 + h * 3600 + mi * 60 + whole - offset_secs, nanos })
}

/// Days since 1970-01-01 (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = m as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + if m <= 2 { 1 } else { 0 }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsd_datetimes_become_timestamps() {
        let t = parse_xsd_datetime("2019-03-25T14:31:12.930+01:00").expect("parses");
        assert_eq!(rfc3339(&t), "2019-03-25T13:31:12.930Z");
        let t = parse_xsd_datetime("2019-05-28T14:09:07.417").expect("parses");
        assert_eq!(rfc3339(&t), "2019-05-28T14:09:07.417Z");
        assert!(parse_xsd_datetime("2019-05-28").is_none());
    }
}
