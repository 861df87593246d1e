//! The delivery journal: what happened to each event after it was stored — deliveries,
//! acknowledgements, redeliveries, dead-lettering, quarantine actions, receipts — on the topic
//! `justizbus.audit`. The topic is a topic like any other, so the hash chain and the
//! checkpoints cover it too.
//!
//! A record holds up to [`ENTRIES_PER_RECORD`] entries as JSON lines (an older journal's
//! records hold one each and read the same): a record per entry had made every routed delivery
//! three log records of its own (routed, acknowledged, receipt); packing them measured about a
//! tenth less server CPU per delivery (README, "Journal packed").
//!
//! Entries are appended by one writer task in batches, off the delivery path. A group stores
//! its position only after [`Journal::flush`], so every acknowledgement that a stored position
//! reflects is in the journal; what a crash loses beyond that is redelivered and journaled again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::event::now_ms;
use crate::log::{Log, NewRecord, StoredRecord, TopicConfig};
use crate::{Error, Result};

/// The journal's topic.
pub const JOURNAL_TOPIC: &str = "justizbus.audit";
/// Its partitions. One: a record holds entries of many events, and [`trail`] reads it all.
pub const JOURNAL_PARTITIONS: u32 = 1;
/// Most entries appended at once.
const MAX_BATCH: usize = 4096;
/// Most entries in one record (about 300 bytes each).
pub const ENTRIES_PER_RECORD: usize = 512;
/// How long the writer gathers entries (and flushes) before it appends them. Every append is
/// an `fdatasync` of the journal partition: without the wait, a thousand mailbox groups, each
/// flushing before it stores its position, had it append and sync about 230 times a second.
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);
/// Entries waiting for the writer beyond which groups hand out no new deliveries (about 60 MB).
const MAX_PENDING: usize = 200_000;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Stored in the log (`time_ms` is the record's log time); made up by [`trail`] from the
    /// record the first other entry names, not journaled itself.
    Published,
    /// The router stored a delivery in each recipient's mailbox (`detail` names them).
    Routed,
    /// The router could not resolve an address (`detail`); see the unroutable topic.
    Unroutable,
    /// Handed to a subscriber of a group (`attempt` counts from 1). Not journaled itself: the
    /// entry that ends a delivery (acknowledged, nacked, expired) carries its time, and
    /// [`trail`] shows it as an entry of its own. A delivery cut short by a crash shows as the
    /// next attempt.
    Delivered,
    /// Acknowledged by the subscriber.
    Acknowledged,
    /// Negatively acknowledged: will be redelivered or dead-lettered.
    Nacked,
    /// Not acknowledged within the deadline: will be redelivered or dead-lettered.
    Expired,
    /// Moved to the group's dead-letter topic after its last attempt; its key is quarantined.
    DeadLettered,
    /// An admin released the quarantined key: the event is delivered again.
    QuarantineReleased,
    /// An admin skipped the quarantined event.
    QuarantineSkipped,
    /// A receipt for the recipient's acknowledgement was stored in the sender's mailbox.
    Receipt,
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The event.
    pub event_id: String,
    /// What happened.
    pub kind: Kind,
    /// When (ms since the epoch).
    pub time_ms: i64,
    /// The topic the event was read from (a mailbox topic for deliveries to participants).
    pub topic: String,
    /// Its partition there.
    pub partition: u32,
    /// Its offset there.
    pub offset: u64,
    /// The consumer group (for receipts: the sender's mailbox).
    pub group: String,
    /// Delivery attempt, where it applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// When the delivery this entry ends was handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_ms: Option<i64>,
    /// More: the reason of a failure, the recipient of a receipt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Entry {
    /// An entry of now about the record `record_id` read from `topic`.
    pub fn now(kind: Kind, topic: &str, partition: u32, offset: u64, group: &str, record_id: &str) -> Entry {
        Entry {
            event_id: event_id_of(topic, record_id).to_string(),
            kind,
            time_ms: now_ms(),
            topic: topic.to_string(),
            partition,
            offset,
            group: group.to_string(),
            attempt: None,
            delivered_ms: None,
            detail: None,
        }
    }
}

/// The event id of a record: a mailbox record's id is `<event id>><participant>` (one record
/// per recipient); everywhere else the record id is the event id.
pub fn event_id_of<'a>(topic: &str, record_id: &'a str) -> &'a str {
    if topic.starts_with(crate::routing::directory::MAILBOX_PREFIX) {
        if let Some((event, _)) = record_id.split_once('>') {
            return event;
        }
    }
    record_id
}

enum Msg {
    Entry(Entry),
    Flush(oneshot::Sender<()>),
}

/// A handle to the journal writer; cheap to clone.
#[derive(Clone)]
pub struct Journal {
    tx: mpsc::UnboundedSender<Msg>,
    /// Entries recorded and not yet durable.
    pending: Arc<AtomicUsize>,
    /// Above this many pending entries the journal is congested.
    limit: usize,
}

impl Journal {
    /// Creates the journal topic if needed and starts the writer.
    pub async fn start(log: Arc<dyn Log>) -> Result<Journal> {
        Self::start_with_limit(log, MAX_PENDING).await
    }

    async fn start_with_limit(log: Arc<dyn Log>, limit: usize) -> Result<Journal> {
        match log.create_topic(JOURNAL_TOPIC, TopicConfig { partitions: JOURNAL_PARTITIONS, retention_ms: 0, retention_bytes: 0 }).await {
            Ok(_) | Err(Error::TopicExists { .. }) => {}
            Err(e) => return Err(e),
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(AtomicUsize::new(0));
        tokio::spawn(write(log, rx, pending.clone()));
        Ok(Journal { tx, pending, limit })
    }

    /// True while more entries wait for the writer than it should hold: groups then hand out
    /// no new deliveries (whose ends would add entries) until it caught up.
    pub fn congested(&self) -> bool {
        self.pending.load(Ordering::Relaxed) > self.limit
    }

    /// Records an entry (appended shortly after, in a batch).
    pub fn record(&self, entry: Entry) {
        if entry.topic == JOURNAL_TOPIC {
            return; // reading the journal is not journaled
        }
        if self.tx.send(Msg::Entry(entry)).is_ok() {
            self.pending.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Returns once every entry recorded before is durable (or the writer has stopped).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

async fn write(log: Arc<dyn Log>, mut rx: mpsc::UnboundedReceiver<Msg>, pending: Arc<AtomicUsize>) {
    let mut seq: u64 = 0;
    // Unique per writer run: the journal keeps every entry, also repeats.
    let id_prefix = format!("journal.{}.", uuid::Uuid::now_v7());
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::new();
        let mut waiting = Vec::new();
        let deadline = tokio::time::Instant::now() + LINGER;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Entry(e) => batch.push(e),
                Msg::Flush(done) => waiting.push(done),
            }
            if batch.len() < MAX_BATCH {
                next = match rx.try_recv() {
                    Ok(msg) => Some(msg),
                    Err(_) => tokio::time::timeout_at(deadline, rx.recv()).await.ok().flatten(),
                };
            }
        }
        if !batch.is_empty() {
            let records = records(&batch, &id_prefix, seq + 1);
            seq += records.len() as u64;
            let mut wait = std::time::Duration::from_millis(50);
            loop {
                // A few packed records whose values are shared, not copied: cheap to clone, and
                // a retry appends the same ids, which the log then stores once.
                match log.append(JOURNAL_TOPIC, records.clone()).await {
                    Ok(_) => {
                        pending.fetch_sub(batch.len(), Ordering::Relaxed);
                        break;
                    }
                    Err(Error::ShuttingDown) => return,
                    Err(e) => {
                        tracing::error!(error = %e, entries = batch.len(), "appending to the delivery journal failed; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(std::time::Duration::from_secs(5));
                    }
                }
            }
        }
        for done in waiting {
            let _ = done.send(());
        }
    }
}

/// The records of `entries`, [`ENTRIES_PER_RECORD`] to a record as JSON lines, numbered
/// from `first_seq` after `id_prefix`. A record is keyed by its first entry's event id and
/// stamped with its latest entry's time, so the time index finds every entry at or after a time.
fn records(entries: &[Entry], id_prefix: &str, first_seq: u64) -> Vec<NewRecord> {
    use std::fmt::Write as _;
    entries
        .chunks(ENTRIES_PER_RECORD)
        .zip(first_seq..)
        .map(|(chunk, seq)| {
            let mut id = String::with_capacity(id_prefix.len() + 20);
            id.push_str(id_prefix);
            let _ = write!(id, "{seq}");
            let mut value = Vec::with_capacity(chunk.len() * 320);
            for e in chunk {
                // Serializing plain strings and numbers to a Vec cannot fail.
                let _ = serde_json::to_writer(&mut value, e);
                value.push(b'\n');
            }
            let timestamp_ms = chunk.iter().map(|e| e.time_ms).max().unwrap_or_default();
            NewRecord { id, key: chunk[0].event_id.clone().into_bytes().into(), timestamp_ms, value: value.into() }
        })
        .collect()
}

/// The entries of `record` (JSON lines) about `event_id`, whose JSON form `needle` finds
/// (`"event_id":"..."`): only lines holding it are parsed. An unreadable line is skipped
/// with a warning.
fn entries_about(record: &StoredRecord, event_id: &str, needle: &memchr::memmem::Finder) -> Vec<Entry> {
    if needle.find(&record.value).is_none() {
        return Vec::new();
    }
    let lines = record.value.split(|b| *b == b'\n').filter(|line| needle.find(line).is_some());
    lines
        .filter_map(|line| match serde_json::from_slice::<Entry>(line) {
            Ok(entry) => Some(entry).filter(|e| e.event_id == event_id),
            Err(e) => {
                tracing::warn!(offset = record.offset, error = %e, "unreadable journal entry");
                None
            }
        })
        .collect()
}

/// The journal entries of one event, oldest first: reads the partition its id maps to, from
/// the first entry at or after `since_ms` (found through the time index) or from its start.
pub async fn trail(log: &dyn Log, event_id: &str, since_ms: Option<i64>) -> Result<Vec<Entry>> {
    let info = log.describe_topic(JOURNAL_TOPIC).await?;
    let partition = crate::partitioner::partition_for_key(event_id.as_bytes(), info.config.partitions);
    let offsets = info.partitions[partition as usize];
    let mut next = match since_ms {
        Some(ms) => log.offset_for_time(JOURNAL_TOPIC, partition, ms).await?,
        None => offsets.start,
    };
    let quoted = serde_json::to_string(event_id).map_err(|e| Error::Internal(e.to_string()))?;
    let needle = format!("\"event_id\":{quoted}");
    let finder = memchr::memmem::Finder::new(needle.as_bytes());
    let mut out = Vec::new();
    while next < offsets.end {
        let records = log.read(JOURNAL_TOPIC, partition, next, 4096, 8 << 20).await?;
        let Some(last) = records.last() else { break };
        next = last.offset + 1;
        for mut e in records.iter().flat_map(|r| entries_about(r, event_id, &finder)) {
            if let Some(at) = e.delivered_ms.take() {
                out.push(Entry { kind: Kind::Delivered, time_ms: at, detail: None, ..e.clone() });
            }
            out.push(e)
        }
    }
    // A record read from `since_ms` on may begin with earlier entries.
    if let Some(since) = since_ms {
        out.retain(|e| e.time_ms >= since);
    }
    // Stable: a delivery stays before its end when both fall in one millisecond.
    out.sort_by_key(|e| e.time_ms);
    // Where it was published: the record that the first entry outside a mailbox names.
    let origin = out.iter().find(|e| !e.topic.starts_with(crate::routing::directory::MAILBOX_PREFIX)).cloned();
    if let Some(first) = origin {
        if let Ok(records) = log.read(&first.topic, first.partition, first.offset, 1, 1).await {
            if let Some(r) = records.first().filter(|r| r.offset == first.offset) {
                let published =
                    Entry { kind: Kind::Published, time_ms: r.timestamp_ms, group: String::new(), attempt: None, detail: None, ..first };
                out.insert(0, published);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal (congested beyond `limit` entries) on an empty embedded log in a temporary
    /// directory, which lives as long as the returned guard.
    async fn fresh_journal(limit: usize) -> (tempfile::TempDir, Arc<dyn Log>, Journal) {
        let dir = tempfile::tempdir().expect("tempdir");
        let log: Arc<dyn Log> = Arc::new(crate::log::embedded::EmbeddedLog::open(dir.path(), Default::default()).await.expect("open"));
        let journal = Journal::start_with_limit(log.clone(), limit).await.expect("start");
        (dir, log, journal)
    }

    #[tokio::test]
    async fn a_journal_behind_its_writer_is_congested_until_it_caught_up() {
        let (_dir, log, journal) = fresh_journal(10).await;
        // The writer runs only when this task yields: the entries pile up.
        for i in 0..11 {
            journal.record(Entry::now(Kind::Acknowledged, "t", 0, i, "g", &format!("e{i}")));
        }
        assert!(journal.congested());
        journal.flush().await;
        assert!(!journal.congested());
        assert_eq!(trail(log.as_ref(), "e3", None).await.expect("trail").len(), 1);
        log.close().await.expect("close");
    }

    #[tokio::test]
    async fn entries_are_packed_many_to_a_record_and_the_trail_finds_each_events_own() {
        let (_dir, log, journal) = fresh_journal(MAX_PENDING).await;
        // An id that JSON escapes, to find it by its escaped form.
        let ids = ["e0", "e1", "e10", "say \"hi\"\\ \u{1}"];
        let total = 3 * ENTRIES_PER_RECORD + 1;
        for i in 0..total {
            let mut e = Entry::now(Kind::Acknowledged, "t", 0, i as u64, "g", ids[i % ids.len()]);
            e.time_ms = 1_000 + i as i64;
            journal.record(e);
        }
        journal.flush().await;
        let records: u64 = log.describe_topic(JOURNAL_TOPIC).await.expect("describe").partitions.iter().map(|p| p.end - p.start).sum();
        assert!(records <= 5, "{total} entries took {records} records");
        for (n, id) in ids.iter().enumerate() {
            let trail = trail(log.as_ref(), id, None).await.expect("trail");
            let offsets: Vec<u64> = trail.iter().map(|e| e.offset).collect();
            let expected: Vec<u64> = (0..total as u64).filter(|i| *i as usize % ids.len() == n).collect();
            assert_eq!(offsets, expected, "{id}: only its own entries, all of them, in time order");
        }
        // From a time on: a record holding earlier entries too gives only the later ones.
        let since = 1_000 + 2 * ENTRIES_PER_RECORD as i64 + 8;
        let later = trail(log.as_ref(), "e0", Some(since)).await.expect("trail");
        assert!(!later.is_empty() && later.iter().all(|e| e.time_ms >= since));
        assert_eq!(later.len(), (0..total as i64).filter(|i| i % 4 == 0 && 1_000 + i >= since).count());
        log.close().await.expect("close");
    }

    #[tokio::test]
    async fn a_journal_of_one_entry_per_record_reads_the_same() {
        let (_dir, log, _journal) = fresh_journal(MAX_PENDING).await;
        // As the journal stored entries before they were packed: one JSON object per record,
        // keyed by its event id, no line end.
        let old: Vec<NewRecord> = (0..3)
            .map(|i| {
                let e = Entry::now(Kind::Routed, "ingest", 0, i, "justizbus.router", &format!("old-{}", i % 2));
                NewRecord {
                    id: format!("journal.old.{i}"),
                    key: e.event_id.clone().into_bytes().into(),
                    timestamp_ms: e.time_ms,
                    value: serde_json::to_vec(&e).expect("json").into(),
                }
            })
            .collect();
        log.append(JOURNAL_TOPIC, old).await.expect("append");
        let trail = trail(log.as_ref(), "old-0", None).await.expect("trail");
        assert_eq!(trail.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![0, 2]);
        log.close().await.expect("close");
    }
}
