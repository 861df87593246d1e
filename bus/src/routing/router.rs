//! The router: reads the ingest topic and appends one delivery per recipient to that
//! recipient's mailbox, keyed by the case (DESIGN.md 5).
//!
//! - Recipients are the event's header addresses (`recipients`, routing keys such as
//!   `court:A1001S`) mapped through the directory, plus the directory's copy rules.
//! - Deliveries keep the event id, so the outbound side removes duplicates by event id; their
//!   record ids are `<event id>><participant>`, which the mailbox store deduplicates, so a
//!   router that crashes after appending and before storing its position appends nothing twice.
//! - The router reads every ingest partition in offset order from its stored position (kept as
//!   the reserved group `justizbus.router`, which `DescribeGroup` shows), routes a whole batch
//!   in one durable mailbox write, and only then stores the new positions: a crash routes some
//!   events again (deduplicated), never skips one.
//! - An address no participant answers to: the event goes to the unroutable topic
//!   (`<ingest>.unroutable`) and the sender's mailbox receives a `justizbus.routing.error`
//!   event naming the address (the bus's counterpart of XJustiz 0005007). Recipients that do
//!   resolve still get their delivery.
//! - Per-case order: a case lives in one ingest partition, read in order; a batch's appends
//!   keep their order in each mailbox, and a failed batch is retried before anything after it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use justizbus_proto::v1 as pb;
use prost::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::directory::{mailbox_topic, DirectoryHandle};
use super::mailbox::{apply_overlay, Content, MailboxLog, MailboxRecord};
use crate::audit::journal::{Entry as JournalEntry, Journal, Kind};
use crate::delivery::positions::PositionWriter;
use crate::event::{now_ms, now_timestamp, Event, SPEC_VERSION};
use crate::log::{Cursor, Log, NewRecord, StoredRecord, TopicConfig};
use crate::{Error, Result};

/// The router's consumer group on the ingest topic.
pub const ROUTER_GROUP: &str = "justizbus.router";
/// Event type of a routing error sent to the sender.
pub const ROUTING_ERROR_TYPE: &str = "justizbus.routing.error";
/// Event type of a receipt sent to the sender.
pub const RECEIPT_TYPE: &str = "justizbus.receipt";
/// Header naming the mailbox owner a delivery was made for.
pub const RECIPIENT_HEADER: &str = "justizbus.recipient";

/// Router settings (`[routing]` in the server config).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingSettings {
    /// Participants directory (TOML); routing is off when absent.
    pub directory: Option<std::path::PathBuf>,
    /// Topic the inbound adapters publish to.
    pub ingest_topic: String,
    /// Partitions of the ingest topic when the router creates it.
    pub ingest_partitions: u32,
    /// Partitions of the mailbox store (fixed once created). Each partition is a write lane
    /// with its own durable writes: on the embedded log every partition costs an `fdatasync`
    /// per group commit, so one partition (the largest group commits) routes fastest there.
    pub mailbox_partitions: u32,
    /// How long the mailbox store keeps deliveries, receipts and error events, in
    /// milliseconds, by their timestamps (0: forever). Whole store segments go at once, so
    /// records stay up to a segment's filling longer. A mailbox keeps its numbering when all
    /// its records are gone.
    pub mailbox_retention_ms: u64,
    /// Most ingest events routed in one batch (one durable mailbox write).
    pub batch: u32,
    /// How often the directory file is checked for changes.
    pub reload_ms: u64,
    /// This node runs the router and serves the mailboxes (true), or only uses the directory
    /// to know its callers (false). On a Kafka log shared by several nodes exactly one node
    /// may route: a mailbox's index lives in the node that writes it.
    pub mailboxes: bool,
}

impl Default for RoutingSettings {
    fn default() -> Self {
        RoutingSettings {
            directory: None,
            ingest_topic: "xjustiz.ingest".into(),
            ingest_partitions: 4,
            mailbox_partitions: 1,
            mailbox_retention_ms: 0,
            batch: 1000,
            reload_ms: 1000,
            mailboxes: true,
        }
    }
}

/// Name of the topic unroutable events go to.
pub fn unroutable_topic(ingest: &str) -> String {
    format!("{ingest}.unroutable")
}

/// What a routing error event carries (its `data`, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingError {
    /// The event that could not be delivered (to all its recipients).
    pub event_id: String,
    /// Addresses no participant answers to.
    pub unresolved: Vec<String>,
    /// Participants that did receive it.
    pub delivered_to: Vec<String>,
}

/// What a receipt event carries (its `data`, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The delivered event.
    pub event_id: String,
    /// The participant that acknowledged it.
    pub recipient: String,
    /// When it was acknowledged (RFC 3339).
    pub acknowledged_at: String,
    /// The mailbox and its offset the delivery had.
    pub mailbox: String,
    /// Offset in the mailbox.
    pub offset: u64,
}

/// A bus-made event (receipt, routing error) for a participant's mailbox.
fn notice(id: String, kind: &str, subject: &str, sender: &str, recipient: &str, data: &impl Serialize) -> NewRecord {
    let data = serde_json::to_vec(data).unwrap_or_default();
    let value = encode_notice(&id, kind, subject, sender, recipient, &data, &now_timestamp());
    NewRecord { id, key: Bytes::copy_from_slice(subject.as_bytes()), timestamp_ms: now_ms(), value: Bytes::from(value) }
}

/// A notice's `pb::Event`, encoded straight from borrowed fields: every acknowledgement makes
/// one (its receipt), and building the owned message first cost a string copy per field.
/// Byte-identical to prost's encoding of the same `pb::Event` (fields in number order, empty
/// scalars left out).
fn encode_notice(
    id: &str,
    kind: &str,
    subject: &str,
    sender: &str,
    recipient: &str,
    data: &[u8],
    time: &prost_types::Timestamp,
) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, message, WireType};
    // Field numbers of `justizbus.v1.Event` (event.proto).
    const ID: u32 = 1;
    const SOURCE: u32 = 2;
    const TYPE: u32 = 3;
    const SUBJECT: u32 = 5;
    const TIME: u32 = 6;
    const SENDER: u32 = 7;
    const RECIPIENTS: u32 = 8;
    const DATA: u32 = 9;
    const DATA_CONTENT_TYPE: u32 = 10;
    const SPEC: u32 = 14;
    fn put(tag: u32, value: &[u8], always: bool, buf: &mut Vec<u8>) {
        if always || !value.is_empty() {
            encode_key(tag, WireType::LengthDelimited, buf);
            encode_varint(value.len() as u64, buf);
            buf.extend_from_slice(value);
        }
    }
    let mut buf = Vec::with_capacity(96 + id.len() + kind.len() + subject.len() + sender.len() + recipient.len() + data.len());
    put(ID, id.as_bytes(), false, &mut buf);
    put(SOURCE, b"justizbus", false, &mut buf);
    put(TYPE, kind.as_bytes(), false, &mut buf);
    put(SUBJECT, subject.as_bytes(), false, &mut buf);
    message::encode(TIME, time, &mut buf);
    put(SENDER, sender.as_bytes(), false, &mut buf);
    // A repeated field's elements are written even when empty.
    put(RECIPIENTS, recipient.as_bytes(), true, &mut buf);
    put(DATA, data, false, &mut buf);
    put(DATA_CONTENT_TYPE, b"application/json", false, &mut buf);
    put(SPEC, SPEC_VERSION.as_bytes(), false, &mut buf);
    buf
}

/// What the receipt for a delivered event needs of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptHead {
    /// The event id.
    pub id: String,
    /// Its case.
    pub subject: String,
    /// The sender participant, who gets the receipt.
    pub sender: String,
    /// The recipient participant (the router's `justizbus.recipient` header).
    pub recipient: String,
}

impl ReceiptHead {
    /// Reads an encoded mailbox delivery's event, skipping what a receipt does not need (the
    /// payload above all, and every header but the recipient's, without allocating for
    /// them). `Ok(None)`: acknowledging it earns no receipt, because it is a notice of the bus
    /// itself, has no sender, or was not delivered by the router.
    pub fn decode(mut encoded: &[u8]) -> Result<Option<ReceiptHead>> {
        use prost::encoding::{decode_key, skip_field, DecodeContext, WireType};
        // Field numbers of `justizbus.v1.Event` (event.proto).
        const ID: u32 = 1;
        const SOURCE: u32 = 2;
        const SUBJECT: u32 = 5;
        const SENDER: u32 = 7;
        const HEADERS: u32 = 13;
        let (mut id, mut source, mut subject, mut sender): (&[u8], &[u8], &[u8], &[u8]) = (b"", b"", b"", b"");
        let mut recipient: Option<&[u8]> = None;
        while !encoded.is_empty() {
            let (tag, wire_type) = decode_key(&mut encoded).map_err(corrupt_delivery)?;
            let field = match (tag, wire_type) {
                (ID | SOURCE | SUBJECT | SENDER | HEADERS, WireType::LengthDelimited) => length_delimited(&mut encoded)?,
                _ => {
                    skip_field(wire_type, tag, &mut encoded, DecodeContext::default()).map_err(corrupt_delivery)?;
                    continue;
                }
            };
            // Protobuf keeps the last value of a field and of a map key.
            match tag {
                ID => id = field,
                SOURCE => source = field,
                SUBJECT => subject = field,
                SENDER => sender = field,
                _ => {
                    let (key, value) = map_entry(field)?;
                    // Checked as decoding the whole event would: what a client cannot decode
                    // goes out as an envelope of its id only (see `to_wire`).
                    if std::str::from_utf8(key).is_err() || std::str::from_utf8(value).is_err() {
                        return Err(corrupt_delivery("a header is not UTF-8"));
                    }
                    if key == RECIPIENT_HEADER.as_bytes() {
                        recipient = Some(value);
                    }
                }
            }
        }
        if std::str::from_utf8(source).is_err() {
            return Err(corrupt_delivery("the source is not UTF-8"));
        }
        let Some(recipient) = recipient else { return Ok(None) };
        if sender.is_empty() || source == b"justizbus" {
            return Ok(None);
        }
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| corrupt_delivery("a string field is not UTF-8"));
        Ok(Some(ReceiptHead { id: text(id)?, subject: text(subject)?, sender: text(sender)?, recipient: text(recipient)? }))
    }
}

fn corrupt_delivery(reason: impl ToString) -> Error {
    Error::Corrupt { path: "mailbox delivery".into(), reason: reason.to_string() }
}

/// Splits a length-delimited field's contents off `buf`.
fn length_delimited<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8]> {
    let len = prost::encoding::decode_varint(buf).map_err(corrupt_delivery)?;
    if len > buf.len() as u64 {
        return Err(corrupt_delivery("a field runs past the end"));
    }
    let (field, rest) = buf.split_at(len as usize);
    *buf = rest;
    Ok(field)
}

/// The key and value of an encoded `map<string, string>` entry.
fn map_entry(mut entry: &[u8]) -> Result<(&[u8], &[u8])> {
    use prost::encoding::{decode_key, skip_field, DecodeContext, WireType};
    let (mut key, mut value): (&[u8], &[u8]) = (b"", b"");
    while !entry.is_empty() {
        match decode_key(&mut entry).map_err(corrupt_delivery)? {
            (1, WireType::LengthDelimited) => key = length_delimited(&mut entry)?,
            (2, WireType::LengthDelimited) => value = length_delimited(&mut entry)?,
            (tag, wire_type) => skip_field(wire_type, tag, &mut entry, DecodeContext::default()).map_err(corrupt_delivery)?,
        }
    }
    Ok((key, value))
}

/// The receipt record for an acknowledged mailbox delivery, and the sender's mailbox it goes to.
pub fn receipt_for(mailbox: &str, offset: u64, head: &ReceiptHead) -> (String, NewRecord) {
    /// [`Receipt`] as it is written, borrowing its fields.
    #[derive(Serialize)]
    struct ReceiptOut<'a> {
        event_id: &'a str,
        recipient: &'a str,
        acknowledged_at: &'a str,
        mailbox: &'a str,
        offset: u64,
    }
    let acknowledged_at = crate::event::rfc3339(&now_timestamp());
    let receipt = ReceiptOut { event_id: &head.id, recipient: &head.recipient, acknowledged_at: &acknowledged_at, mailbox, offset };
    let id = format!("receipt.{}.{}", head.id, head.recipient);
    (mailbox_topic(&head.sender), notice(id, RECEIPT_TYPE, &head.subject, &head.recipient, &head.sender, &receipt))
}

/// Most bytes the router reads from one ingest partition per batch.
const MAX_READ_BYTES: usize = 16 << 20;

/// The running router.
pub struct RouterHandle {
    /// Tells the router to stop after the batch in hand.
    stop: watch::Sender<bool>,
    /// The router task.
    task: tokio::task::JoinHandle<()>,
}

impl RouterHandle {
    /// Stops the router and waits for it (a batch in hand is finished first).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// The router task.
pub struct Router {
    /// The mailboxes (and, through them, the rest of the log).
    pub mailboxes: Arc<MailboxLog>,
    /// The directory in force.
    pub directory: DirectoryHandle,
    /// Settings.
    pub settings: RoutingSettings,
    /// Where routing decisions are journaled, when on.
    pub journal: Option<Journal>,
}

impl Router {
    /// Creates the ingest and unroutable topics when missing.
    async fn prepare(&self) -> Result<()> {
        let s = &self.settings;
        for (topic, partitions) in [(s.ingest_topic.clone(), s.ingest_partitions), (unroutable_topic(&s.ingest_topic), s.ingest_partitions)]
        {
            match self.mailboxes.create_topic(&topic, TopicConfig { partitions, retention_ms: 0, retention_bytes: 0 }).await {
                Ok(_) | Err(Error::TopicExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Prepares the topics (errors surface here, at server start) and routes in a task until
    /// [`RouterHandle::stop`].
    pub async fn start(self) -> Result<RouterHandle> {
        self.prepare().await?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            if let Err(e) = self.run(stopped).await {
                tracing::error!(error = %e, "router stopped with an error");
            }
        });
        Ok(RouterHandle { stop, task })
    }

    /// Reads every ingest partition from its stored position, routes what it read in one
    /// durable mailbox write, then stores the new positions; waits for appends when idle.
    async fn run(self, mut stopped: watch::Receiver<bool>) -> Result<()> {
        let topic = self.settings.ingest_topic.clone();
        let log: Arc<dyn Log> = self.mailboxes.clone();
        let partitions = log.describe_topic(&topic).await?.config.partitions;
        // Deliveries reference the ingest record instead of copying it when the ingest topic
        // keeps every record; with retention, a delivery must outlive its ingest record.
        let by_reference = log.keeps_everything(&topic).await?;
        let mut next = Vec::with_capacity(partitions as usize);
        let mut ends = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            let start = log.offsets(&topic, p).await?.start;
            next.push(log.load_cursor(&topic, ROUTER_GROUP, p).await?.map_or(start, |c| c.committed.max(start)));
            ends.push(log.watch_end(&topic, p)?);
        }
        tracing::info!(topic, positions = ?next, by_reference, "router running");
        let positions = PositionWriter::start(log.clone(), topic.clone(), ROUTER_GROUP.into(), self.journal.clone());
        let mut failures = 0u32;
        while !*stopped.borrow() {
            let mut batch: Vec<StoredRecord> = Vec::new();
            let mut advanced: Vec<(u32, u64)> = Vec::new();
            let mut unreadable = None;
            for p in 0..partitions {
                let at = next[p as usize];
                if *ends[p as usize].borrow_and_update() <= at {
                    continue;
                }
                let records = match log.read_transient(&topic, p, at, self.settings.batch as usize, MAX_READ_BYTES).await {
                    Ok(r) => r,
                    // Retention removed events the router had not reached yet: go on from the
                    // oldest stored one, and say so.
                    Err(Error::OffsetOutOfRange { start, .. }) if start > at => {
                        tracing::error!(partition = p, from = at, to = start, "ingest events removed by retention before routing");
                        next[p as usize] = start;
                        continue;
                    }
                    Err(e) => {
                        unreadable = Some(e);
                        break;
                    }
                };
                if let Some(last) = records.last() {
                    advanced.push((p, last.offset + 1));
                    batch.extend(records);
                }
            }
            if batch.is_empty() && unreadable.is_none() {
                let changed = futures_util::future::select_all(ends.iter_mut().map(|w| Box::pin(w.changed())));
                tokio::select! {
                    _ = stopped.changed() => {}
                    (result, _, _) = changed => {
                        if result.is_err() {
                            break; // the log closed
                        }
                    }
                }
                continue;
            }
            let routing_started = std::time::Instant::now();
            let outcome = match unreadable {
                Some(e) => Err(e),
                None => self.route(&batch, by_reference).await,
            };
            if let Err(e) = outcome {
                // Nothing advances: the same events are read and routed again (the mailbox
                // store drops the deliveries that did get through).
                failures += 1;
                let wait = Duration::from_millis(100 * u64::from(failures.min(50)));
                tracing::error!(error = %e, events = batch.len(), retry_in_ms = wait.as_millis() as u64, "routing failed");
                tokio::select! { _ = stopped.changed() => {} _ = tokio::time::sleep(wait) => {} }
                continue;
            }
            failures = 0;
            let routed_ms = (routing_started.elapsed().as_secs_f64() * 1e5).round() / 100.0;
            let cursors: Vec<(u32, Cursor)> = advanced
                .iter()
                .map(|&(p, offset)| (p, Cursor { committed: offset, scanned: offset, unacked: Vec::new(), attempts: Vec::new() }))
                .collect();
            for &(p, offset) in &advanced {
                next[p as usize] = offset;
            }
            // A position lost in a crash only means routing some events again, which the
            // mailbox store deduplicates. The writer stores it once the journal is durable.
            positions.store(cursors, self.journal.is_some());
            tracing::debug!(events = batch.len(), routed_ms, "batch routed");
        }
        positions.close().await;
        tracing::info!("router stopped");
        Ok(())
    }

    /// Makes the deliveries, routing errors and unroutable copies of a batch durable. With
    /// `by_reference`, a delivery references its ingest record rather than copying it.
    async fn route(&self, batch: &[StoredRecord], by_reference: bool) -> Result<()> {
        let directory = self.directory.get();
        let mut deliveries: Vec<(String, MailboxRecord)> = Vec::new();
        let mut unroutable: Vec<NewRecord> = Vec::new();
        let mut journal: Vec<JournalEntry> = Vec::new();
        // (blob, recipient): who may fetch the attachments of what is delivered.
        let mut grants: Vec<(String, String)> = Vec::new();
        // The ingest record as it was, for the unroutable topic.
        let as_received = |r: &crate::log::StoredRecord| NewRecord {
            id: r.id.clone(),
            key: r.key.clone(),
            timestamp_ms: now_ms(),
            value: r.value.clone(),
        };
        for record in batch {
            let event = match Event::decode(&record.value) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(id = %record.id, error = %e, "undecodable event sent to the unroutable topic");
                    unroutable.push(as_received(record));
                    continue;
                }
            };
            let resolution = directory.route(&event.r#type, &event.sender, &event.recipients, &event.subject);
            let sender = resolution.sender.clone().unwrap_or_default();
            let topic = &self.settings.ingest_topic;
            if !resolution.recipients.is_empty() {
                let mut e = JournalEntry::now(Kind::Routed, topic, record.partition, record.offset, ROUTER_GROUP, &event.id);
                e.detail = Some(format!("to {}", resolution.recipients.join(", ")));
                journal.push(e);
            }
            if !resolution.unresolved.is_empty() || resolution.recipients.is_empty() {
                let mut e = JournalEntry::now(Kind::Unroutable, topic, record.partition, record.offset, ROUTER_GROUP, &event.id);
                e.detail = Some(format!("unresolved: {}", resolution.unresolved.join(", ")));
                journal.push(e);
            }
            let ingest = format!("{}/{}/{}", self.settings.ingest_topic, record.partition, record.offset);
            for recipient in &resolution.recipients {
                grants.extend(event.attachments.iter().map(|a| (a.sha256.clone(), recipient.clone())));
                // What a delivery changes of the event: sender and recipients resolved to
                // participants, and headers saying for whom, from which address, from where.
                let overlay = pb::Event {
                    sender: sender.clone(),
                    recipients: resolution.recipients.clone(),
                    headers: [
                        (RECIPIENT_HEADER.to_string(), recipient.clone()),
                        ("justizbus.sender_address".to_string(), event.sender.clone()),
                        ("justizbus.ingest".to_string(), ingest.clone()),
                    ]
                    .into(),
                    ..Default::default()
                };
                let overlay = Bytes::from(overlay.encode_to_vec());
                let content = if by_reference {
                    Content::Reference {
                        topic: self.settings.ingest_topic.clone(),
                        partition: record.partition,
                        offset: record.offset,
                        overlay,
                    }
                } else {
                    Content::Event(apply_overlay(&record.value, &overlay)?)
                };
                deliveries.push((
                    mailbox_topic(recipient),
                    MailboxRecord { id: format!("{}>{recipient}", event.id), key: record.key.clone(), timestamp_ms: now_ms(), content },
                ));
            }
            if resolution.recipients.is_empty() || !resolution.unresolved.is_empty() {
                let unresolved = if resolution.unresolved.is_empty() {
                    vec!["(the message names no recipient)".to_string()]
                } else {
                    resolution.unresolved.clone()
                };
                tracing::warn!(id = %event.id, ?unresolved, sender = %event.sender, "unroutable address");
                if resolution.recipients.is_empty() {
                    unroutable.push(as_received(record));
                }
                match &resolution.sender {
                    Some(sender) => {
                        let error = RoutingError { event_id: event.id.clone(), unresolved, delivered_to: resolution.recipients.clone() };
                        let id = format!("routing-error.{}", event.id);
                        deliveries.push((
                            mailbox_topic(sender),
                            notice(id, ROUTING_ERROR_TYPE, &event.subject, "justizbus", sender, &error).into(),
                        ));
                    }
                    None => {
                        tracing::warn!(id = %event.id, sender = %event.sender, "the sender is not in the directory either; nobody to notify")
                    }
                }
            }
        }
        if !unroutable.is_empty() {
            self.mailboxes.append(&unroutable_topic(&self.settings.ingest_topic), unroutable).await?;
        }
        // Granted first: a recipient may fetch the attachments as soon as it sees a delivery.
        if !grants.is_empty() {
            self.mailboxes.grant_blobs(&grants).await?;
        }
        if !deliveries.is_empty() {
            self.mailboxes.append_many(deliveries).await?;
        }
        if let Some(j) = &self.journal {
            journal.into_iter().for_each(|e| j.record(e));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LogSettings;
    use crate::log::embedded::EmbeddedLog;
    use crate::routing::directory::numbered_courts;
    use crate::routing::mailbox::STORE_TOPIC;

    #[test]
    fn a_notice_is_encoded_as_prost_encodes_the_same_event() {
        let time = prost_types::Timestamp { seconds: 1_795_000_000, nanos: 123_000_000 };
        for (id, subject, sender, data) in
            [("receipt.e1.P2", "case-1", "P2", &b"{}"[..]), ("", "", "", &b""[..]), ("r\u{e4}", "AG K\u{f6}ln", "x", &[0u8; 300][..])]
        {
            let expected = pb::Event {
                id: id.into(),
                source: "justizbus".into(),
                r#type: RECEIPT_TYPE.into(),
                subject: subject.into(),
                time: Some(time),
                sender: sender.into(),
                recipients: vec!["P1".into()],
                data: Bytes::copy_from_slice(data),
                data_content_type: "application/json".into(),
                spec_version: SPEC_VERSION.into(),
                ..Default::default()
            };
            assert_eq!(encode_notice(id, RECEIPT_TYPE, subject, sender, "P1", data, &time), expected.encode_to_vec(), "{id:?}");
        }
        // An empty recipient is still an element of the list.
        let expected = pb::Event {
            recipients: vec![String::new()],
            time: Some(time),
            source: "justizbus".into(),
            data_content_type: "application/json".into(),
            spec_version: SPEC_VERSION.into(),
            ..Default::default()
        };
        assert_eq!(encode_notice("", "", "", "", "", b"", &time), expected.encode_to_vec());
    }

    #[test]
    fn a_receipt_names_the_event_its_recipient_and_the_mailbox_position() {
        let head =
            ReceiptHead { id: "e1".into(), subject: "case-1".into(), sender: "DE.Justiz.a.1".into(), recipient: "DE.Justiz.b.1".into() };
        let (mailbox, record) = receipt_for("mailbox.DE.Justiz.b.1", 7, &head);
        assert_eq!(mailbox, mailbox_topic("DE.Justiz.a.1"));
        assert_eq!(record.id, "receipt.e1.DE.Justiz.b.1");
        let event = pb::Event::decode(record.value).expect("an event");
        assert_eq!((event.r#type.as_str(), event.subject.as_str(), event.sender.as_str()), (RECEIPT_TYPE, "case-1", "DE.Justiz.b.1"));
        assert_eq!(event.recipients, vec!["DE.Justiz.a.1".to_string()]);
        let receipt: Receipt = serde_json::from_slice(&event.data).expect("receipt JSON");
        assert_eq!(
            (receipt.event_id.as_str(), receipt.recipient.as_str(), receipt.mailbox.as_str(), receipt.offset),
            ("e1", "DE.Justiz.b.1", "mailbox.DE.Justiz.b.1", 7)
        );
        assert!(crate::event::parse_time(&receipt.acknowledged_at).is_ok(), "{}", receipt.acknowledged_at);
    }

    /// Routes one event from C0 to C1 with the ingest topic created with `retention_ms`;
    /// returns the delivery as read from the mailbox and the size of its store record.
    async fn route_one(retention_ms: u64) -> (pb::Event, usize) {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir.path(), LogSettings::default()).await.expect("open"));
        let directory = numbered_courts(2);
        let mailboxes = Arc::new(
            MailboxLog::open(inner, directory.clone(), &RoutingSettings::default(), &Default::default(), None).await.expect("mailboxes"),
        );
        let settings = RoutingSettings::default();
        let ingest = TopicConfig { partitions: 1, retention_ms, retention_bytes: 0 };
        mailboxes.create_topic(&settings.ingest_topic, ingest).await.expect("ingest topic");
        let event = pb::Event {
            id: "ev1".into(),
            r#type: "nachricht.gds.basisnachricht.0005006".into(),
            subject: "case-1".into(),
            sender: "court:C0".into(),
            recipients: vec!["court:C1".into()],
            data: Bytes::from(vec![7u8; 4000]),
            ..Default::default()
        };
        let record =
            NewRecord { id: "ev1".into(), key: Bytes::from("case-1"), timestamp_ms: now_ms(), value: event.encode_to_vec().into() };
        mailboxes.append(&settings.ingest_topic, vec![record]).await.expect("publish");
        let mailbox = mailbox_topic("DE.Justiz.p1.1");
        let mut end = mailboxes.watch_end(&mailbox, 0).expect("watch");
        let router =
            Router { mailboxes: mailboxes.clone(), directory, settings: settings.clone(), journal: None }.start().await.expect("router");
        tokio::time::timeout(Duration::from_secs(10), end.wait_for(|&e| e >= 1)).await.expect("routed in time").expect("watch");
        router.stop().await;
        let read = mailboxes.read(&mailbox, 0, 0, 10, 1 << 20).await.expect("read");
        let store = mailboxes.read(STORE_TOPIC, 0, 0, 10, 1 << 20).await.expect("store");
        (pb::Event::decode(read[0].value.clone()).expect("delivery"), store[0].value.len())
    }

    #[tokio::test]
    async fn deliveries_reference_a_keep_all_ingest_topic_and_copy_from_one_with_retention() {
        let (by_reference, reference_size) = route_one(0).await;
        let (copied, copy_size) = route_one(86_400_000).await;
        assert!(reference_size < 400, "a reference takes {reference_size} bytes");
        assert!(copy_size > 4000, "a copy takes {copy_size} bytes");
        // Either way the recipient gets the same delivery.
        assert_eq!(by_reference, copied);
        assert_eq!(by_reference.data, Bytes::from(vec![7u8; 4000]));
        assert_eq!((by_reference.sender.as_str(), &by_reference.recipients[..]), ("DE.Justiz.p0.1", &["DE.Justiz.p1.1".to_string()][..]));
        assert_eq!(by_reference.headers.get(RECIPIENT_HEADER).map(String::as_str), Some("DE.Justiz.p1.1"));
        assert_eq!(by_reference.headers.get("justizbus.sender_address").map(String::as_str), Some("court:C0"));
        assert_eq!(by_reference.headers.get("justizbus.ingest").map(String::as_str), Some("xjustiz.ingest/0/0"));
    }

    /// An event as a mailbox delivery carries it: a user header, then the router's.
    fn delivered(source: &str, sender: &str, recipient: Option<&str>) -> pb::Event {
        let mut e = pb::Event {
            id: "ev1".into(),
            source: source.into(),
            subject: "case-1".into(),
            sender: sender.into(),
            recipients: vec!["DE.Justiz.p1.1".into()],
            data: Bytes::from(vec![7u8; 100]),
            ..Default::default()
        };
        e.headers.insert("x-user".into(), "value".into());
        if let Some(r) = recipient {
            e.headers.insert(RECIPIENT_HEADER.into(), r.into());
        }
        e
    }

    #[test]
    fn a_receipt_head_is_read_from_a_delivery_and_only_where_a_receipt_is_due() {
        let head = |e: &pb::Event| ReceiptHead::decode(&e.encode_to_vec()).expect("decodes");
        let expected =
            ReceiptHead { id: "ev1".into(), subject: "case-1".into(), sender: "DE.Justiz.p0.1".into(), recipient: "DE.Justiz.p1.1".into() };
        assert_eq!(head(&delivered("land-a", "DE.Justiz.p0.1", Some("DE.Justiz.p1.1"))), Some(expected.clone()));
        // A delivery of the bus's own notice, one without sender, one not made by the router.
        assert_eq!(head(&delivered("justizbus", "DE.Justiz.p0.1", Some("DE.Justiz.p1.1"))), None);
        assert_eq!(head(&delivered("land-a", "", Some("DE.Justiz.p1.1"))), None);
        assert_eq!(head(&delivered("land-a", "DE.Justiz.p0.1", None)), None);
        // The overlay appends the router's fields after the event's: the last value wins, as
        // in protobuf decoding.
        let mut overlaid = delivered("land-a", "court:C0", Some("forged")).encode_to_vec();
        overlaid.extend(delivered("land-a", "DE.Justiz.p0.1", Some("DE.Justiz.p1.1")).encode_to_vec());
        assert_eq!(ReceiptHead::decode(&overlaid).expect("decodes"), Some(expected));
        let mut bad = delivered("land-a", "DE.Justiz.p0.1", Some("DE.Justiz.p1.1"));
        bad.headers.insert("x-bad".into(), "\u{e9}".into());
        let mut bad = bad.encode_to_vec();
        let at = bad.windows(2).position(|w| w == "\u{e9}".as_bytes()).expect("the header value");
        bad[at] = 0xff;
        assert!(ReceiptHead::decode(&bad).is_err(), "a header that is not UTF-8 is an error");
        let whole = delivered("land-a", "DE.Justiz.p0.1", Some("DE.Justiz.p1.1")).encode_to_vec();
        assert!(ReceiptHead::decode(&whole[..whole.len() - 3]).is_err(), "a cut event is an error");
    }
}
