//! Mailboxes: one virtual topic per participant, `mailbox.<participant id>`, stored together.
//!
//! Ten thousand participants cannot each have their own files and `fdatasync`s, yet reading a
//! mailbox must cost what that mailbox holds, not what all of them hold. So [`MailboxLog`]
//! wraps the log (it implements the same [`Log`] trait, as a cross-cutting layer) and serves
//! every topic named `mailbox.*` from one physical store topic:
//!
//! - An append to a mailbox becomes one record of the store topic whose key is the mailbox
//!   name (so a mailbox lives in one store partition), whose id is `<mailbox>/<id>` (the log
//!   deduplicates ids per partition; mailboxes may share ids) and whose value carries the
//!   mailbox sequence number, the record's own key (the case) and its content. Appends to many
//!   mailboxes go down in one group commit ([`MailboxLog::append_many`]).
//! - The content is either the event itself or, for the router's deliveries, a reference to the
//!   ingest record it delivers plus the delivery's own fields (sender, recipients, headers):
//!   the payload is stored once, however many mailboxes it goes to, and a read puts the
//!   delivery together from the ingest record ([`Content::Reference`]).
//! - An in-memory index maps each mailbox's sequence numbers to store offsets; it is rebuilt at
//!   start from the store records (which carry their sequence numbers, so it comes out the same),
//!   or read from the file a clean shutdown wrote plus the store records after it ([`snapshot`]).
//!   Reads of a mailbox follow its index: cost proportional to that mailbox's traffic.
//! - A mailbox looks like a one-partition topic whose offsets are its sequence numbers, so
//!   `Subscribe`, `Replay`, cursors, dead letters and quarantine work on it unchanged. Its dead
//!   letter topic (`mailbox.<id>.<group>.dlq`) is a virtual topic of the same store.
//!
//! - Retention (`routing.mailbox_retention_ms`) is the store topic's: the log deletes its old
//!   segments, and the index follows the store's start, dropping the mailboxes' records below
//!   it and their ids. A mailbox whose records are all gone keeps its numbering: before the
//!   log may delete a mailbox's last record, its next sequence number is kept in the log's
//!   cursor store (group [`END_MARK_GROUP`]), and the rebuild starts such a mailbox there.
//!
//! Invariants: appends to the store go through one lock per store partition (sequence numbers
//! are assigned and made durable in order, so a mailbox's visible end only grows over durable
//! records; after a failed append the index first takes in whatever of it the store holds); an
//! id stored in a mailbox within the id window (at least the log's own dedup window of the
//! store) is answered as a duplicate without appending, which makes router retries after a
//! crash idempotent; a mailbox's sequence numbers never go back, also across retention and
//! restarts.

mod snapshot;

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};

use async_trait::async_trait;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use hashbrown::hash_table::Entry;
use tokio::sync::{oneshot, watch, Mutex};

use super::directory::{DirectoryHandle, MAILBOX_PREFIX};
use super::router::RoutingSettings;
use crate::audit::chain::ChainHash;
use crate::audit::checkpoint::Checkpoint;
use crate::config::LogSettings;
use crate::log::{Appended, Cursor, GroupConfig, Log, NewRecord, PartitionOffsets, Quarantine, StoredRecord, TopicConfig, TopicInfo};
use crate::partitioner::partition_for_key;
use crate::sharded::ShardedTable;
use crate::FastMap;
use crate::{Error, Result};

/// The physical topic that holds every mailbox.
pub const STORE_TOPIC: &str = "justizbus.mailboxes";
/// The file in the data directory that holds the mailbox index between a clean shutdown and the
/// next start.
pub const MAILBOX_INDEX_FILE: &str = "mailbox-index";

/// The reserved group under which the cursor store keeps a mailbox's end mark: a sequence
/// number its next record gets at least, written before retention may delete its last record.
pub const END_MARK_GROUP: &str = "justizbus.mailbox-end";

/// How far ahead of the retention horizon end marks are written at least: on Kafka the broker
/// deletes on its own schedule, so a mark must be in place before a record can become due
/// between two retention passes of the bus; with passes further apart than a third of this,
/// three pass intervals ([`end_mark_ahead_ms`]).
const END_MARK_AHEAD_MS: i64 = 10 * 60 * 1000;

/// How far ahead of the retention horizon end marks are written when the bus runs retention
/// every `retention_check_ms`.
fn end_mark_ahead_ms(retention_check_ms: u64) -> i64 {
    END_MARK_AHEAD_MS.max(retention_check_ms.saturating_mul(3).min(i64::MAX as u64) as i64)
}

/// Bits of a store position that hold the offset; the store partition is above them.
const POSITION_OFFSET_BITS: u32 = 48;

/// The store offset of a [`store_position`].
fn position_offset(position: u64) -> u64 {
    position & ((1 << POSITION_OFFSET_BITS) - 1)
}

/// A store record's position in one number: partition and offset.
fn store_position(partition: u32, offset: u64) -> u64 {
    debug_assert!(offset < 1 << POSITION_OFFSET_BITS);
    (u64::from(partition) << POSITION_OFFSET_BITS) | offset
}

/// The id of a mailbox record in the store: `<mailbox>/<id>`. The log deduplicates ids per
/// store partition, and two mailboxes may hold records of the same id (mailbox names have no
/// `/`). Stores written before carry the bare id, which [`mailbox_id`] leaves as it is.
fn store_id(mailbox: &str, id: &str) -> String {
    format!("{mailbox}/{id}")
}

/// The mailbox record id of a store record of `mailbox`.
fn mailbox_id<'a>(mailbox: &str, stored: &'a str) -> &'a str {
    stored.strip_prefix(mailbox).and_then(|rest| rest.strip_prefix('/')).unwrap_or(stored)
}

/// Format byte of a store record whose value holds the event itself.
const ENTRY_FORMAT: u8 = 1;
/// Format byte of a store record whose value references a record of another topic.
const REFERENCE_FORMAT: u8 = 2;

/// Whether a topic name is served by the mailbox store.
pub fn is_mailbox_topic(topic: &str) -> bool {
    topic.starts_with(MAILBOX_PREFIX)
}

/// One mailbox (or mailbox dead-letter topic) in the index.
struct Mailbox {
    /// Sequence number of `entries[0]`.
    start: u64,
    /// Store offset and timestamp of each sequence number from `start` on.
    entries: Vec<(u64, i64)>,
    /// Watchers of the end (next sequence number).
    end: watch::Sender<u64>,
}

impl Mailbox {
    fn new() -> Self {
        Self::starting_at(0)
    }

    /// An empty mailbox whose next record gets sequence number `seq`.
    fn starting_at(seq: u64) -> Self {
        Mailbox { start: seq, entries: Vec::new(), end: watch::channel(seq).0 }
    }

    fn next_seq(&self) -> u64 {
        self.start + self.entries.len() as u64
    }
}

/// What the index holds of one store partition.
#[derive(Default)]
struct StorePartition {
    /// The store start the index follows: nothing below it is indexed.
    start: u64,
    /// The store offset after the last record indexed.
    end: u64,
    /// Records indexed.
    records: u64,
    /// (records indexed before it, offset) of every [`Index::mark_every`]-th record indexed:
    /// where the ids older than the id window begin.
    marks: std::collections::VecDeque<(u64, u64)>,
    /// Records indexed before the oldest record whose id is kept.
    ids_forgotten: u64,
}

/// Records per store partition whose ids the index keeps: at least the log's own dedup window
/// of the store topic (`dedup_max_ids` records per partition, on both backends), so an id the
/// log would call a duplicate is always known here (else the log would drop a record the index
/// had numbered, leaving a gap), and never fewer than [`MIN_ID_WINDOW`].
fn id_window(log_settings: &LogSettings) -> u64 {
    let log_window = if log_settings.dedup_window_ms == 0 { 0 } else { log_settings.dedup_max_ids as u64 };
    log_window.max(MIN_ID_WINDOW)
}

/// Fewest records per store partition whose ids are kept: many router batches (a router that
/// failed mid-batch routes the batch again) and the receipts of as many acknowledgements.
const MIN_ID_WINDOW: u64 = 10_000;

#[derive(Default)]
struct Index {
    mailboxes: FastMap<String, Mailbox>,
    /// (hash of (mailbox, record id), [`store_position`]) of the records in each store
    /// partition's id window: what a retry finds stored. Sharded: it takes every delivery
    /// and receipt, under the lock every append takes.
    ids: ShardedTable<(u64, u64)>,
    /// Seeds `hasher`: chosen at random when the index is built from the store, and kept in
    /// the index file (ids from clients must not be able to aim at one hash bucket).
    seed: u64,
    /// Hashes the ids.
    hasher: foldhash::fast::FixedState,
    /// What the index holds of each store partition.
    store: Vec<StorePartition>,
    /// Records per store partition whose ids are kept, at least (see [`id_window`]).
    id_window: u64,
    /// End marks in the cursor store, by mailbox.
    end_marks: FastMap<String, u64>,
}

impl Index {
    /// An empty index whose ids are hashed with `seed`, keeping `id_window` records' ids.
    fn seeded(seed: u64, id_window: u64) -> Self {
        Index { seed, hasher: foldhash::fast::FixedState::with_seed(seed), id_window, ..Index::default() }
    }

    fn id_hash(&self, mailbox: &str, id: &str) -> u64 {
        self.hasher.hash_one((mailbox, id))
    }

    /// The sequence number in `mailbox` of the record whose id hash is `h`, if stored.
    fn stored(&self, mailbox: &str, h: u64) -> Option<u64> {
        let position = self.ids.shard(h).find(h, |&(k, _)| k == h).map(|&(_, position)| position)?;
        let offset = position_offset(position);
        // A mailbox's entries are in store order (one partition, appended in order).
        let mb = self.mailboxes.get(mailbox)?;
        mb.entries.binary_search_by_key(&offset, |&(o, _)| o).ok().map(|i| mb.start + i as u64)
    }

    /// Indexes a record read from store partition `partition` (at start, or catching up after
    /// a write whose outcome was unknown), checking that it continues its mailbox's numbering.
    fn index_stored(&mut self, partition: u32, r: &StoredRecord) -> Result<()> {
        let (seq, _, _) = decode_entry(&r.value)?;
        let name = String::from_utf8_lossy(&r.key).into_owned();
        let h = self.id_hash(&name, mailbox_id(&name, &r.id));
        self.indexed(partition, r.offset, h);
        let mb = self.mailboxes.entry(name).or_insert_with(Mailbox::new);
        if mb.entries.is_empty() {
            mb.start = seq;
        }
        if seq != mb.next_seq() {
            return Err(Error::State(format!("mailbox store: sequence {seq} found where {} was expected", mb.next_seq())));
        }
        mb.entries.push((r.offset, r.timestamp_ms));
        Ok(())
    }

    /// Marks go this many records apart: the ids kept exceed the window by a sixteenth at most
    /// between passes.
    fn mark_every(&self) -> u64 {
        (self.id_window / 16).max(1)
    }

    /// Takes the record at `offset` of store partition `partition`, whose id hash is `h`.
    fn indexed(&mut self, partition: u32, offset: u64, h: u64) {
        self.remember(h, store_position(partition, offset));
        let every = self.mark_every();
        let store = &mut self.store[partition as usize];
        store.end = store.end.max(offset + 1);
        if store.records.is_multiple_of(every) {
            store.marks.push_back((store.records, offset));
        }
        store.records += 1;
    }

    /// The offset below which the ids of store partition `partition` have left the id window,
    /// once a quarter of the window has left it since the last pass (a pass reads every id).
    fn ids_due(&mut self, partition: u32) -> Option<u64> {
        let window = self.id_window;
        let store = &mut self.store[partition as usize];
        let mut due = None;
        while let Some(&(before, offset)) = store.marks.front() {
            if store.records - before < window {
                break;
            }
            due = Some((before, offset));
            store.marks.pop_front();
        }
        let (before, offset) = due?;
        if before < store.ids_forgotten + window / 4 {
            store.marks.push_front((before, offset));
            return None;
        }
        store.ids_forgotten = before;
        Some(offset)
    }

    /// Records that the record whose id hash is `h` is stored at `position`.
    fn remember(&mut self, h: u64, position: u64) {
        match self.ids.shard_mut(h).entry(h, |&(k, _)| k == h, |&(k, _)| k) {
            Entry::Occupied(mut stored) => stored.get_mut().1 = position,
            Entry::Vacant(free) => {
                free.insert((h, position));
            }
        }
    }
}

/// The log with mailboxes layered on top; everything else passes through.
pub struct MailboxLog {
    inner: Arc<dyn Log>,
    directory: DirectoryHandle,
    partitions: u32,
    /// The index; locked briefly, never across an await.
    index: SyncMutex<Index>,
    /// How long the store keeps records (0: forever).
    retention_ms: u64,
    /// How far ahead of the retention horizon end marks are written.
    end_mark_ahead_ms: i64,
    /// The router's input, whose records deliveries reference: it must keep everything.
    ingest_topic: String,
    /// One write lane per store partition. A mailbox lives in one store partition, so its
    /// sequence numbers are assigned in one lane; lanes write independently, so a receipt
    /// waits only for the writes of its own partition.
    lanes: Vec<Lane>,
    /// Where the index is written at a clean shutdown and read at start (see [`snapshot`]).
    index_file: Option<PathBuf>,
    /// How the index was built at start.
    built: std::sync::OnceLock<IndexBuilt>,
}

/// How the index was built at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IndexBuilt {
    /// From the index file (and the store records after it).
    from_file: bool,
    /// Store records read.
    store_records_read: usize,
}

/// The writes of one store partition.
struct Lane {
    /// Serializes this partition's appends, so sequence numbers become durable in order.
    writer: Mutex<()>,
    /// Appends waiting for the writer: whoever holds it next writes them all at once, so
    /// concurrent appends (receipts from many subscribers, the router) share one durable
    /// write instead of queueing for one each.
    waiting: SyncMutex<Vec<AppendJob>>,
    /// A store append failed: the store may hold some of its records anyway (a Kafka producer
    /// that timed out, say), which the index must take in before numbering anything more.
    unsure: AtomicBool,
}

/// Records, each with the mailbox it goes to.
type Addressed = Vec<(String, MailboxRecord)>;

/// What a mailbox record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// The encoded event itself.
    Event(Bytes),
    /// A delivery of the event stored at `topic`/`partition`/`offset` (a topic that keeps
    /// everything: the ingest topic). A read takes that event and replaces its sender and
    /// recipients with the overlay's, and adds the overlay's headers; the overlay is an encoded
    /// event holding only those fields.
    Reference {
        /// The topic holding the event.
        topic: String,
        /// Its partition there.
        partition: u32,
        /// Its offset there.
        offset: u64,
        /// The delivery's own sender, recipients and headers (an encoded `pb::Event`).
        overlay: Bytes,
    },
}

/// A record to append to a mailbox.
#[derive(Debug, Clone)]
pub struct MailboxRecord {
    /// Unique id within the mailbox: an id the mailbox holds already is not appended again.
    pub id: String,
    /// The case: ordering key.
    pub key: Bytes,
    /// Milliseconds since the epoch.
    pub timestamp_ms: i64,
    /// The event or where to find it.
    pub content: Content,
}

impl From<NewRecord> for MailboxRecord {
    fn from(r: NewRecord) -> Self {
        MailboxRecord { id: r.id, key: r.key, timestamp_ms: r.timestamp_ms, content: Content::Event(r.value) }
    }
}

/// One caller's records, waiting to be written.
struct AppendJob {
    records: Addressed,
    reply: oneshot::Sender<Result<Vec<Appended>>>,
}

/// An error of a shared write, for each of the callers it failed.
fn shared_error(e: &Error) -> Error {
    match e {
        Error::ShuttingDown => Error::ShuttingDown,
        other => Error::State(format!("mailbox store append failed: {other}")),
    }
}

fn encode_entry(seq: u64, key: &[u8], content: &Content) -> Bytes {
    let body = match content {
        Content::Event(payload) => payload.len(),
        Content::Reference { topic, overlay, .. } => 14 + topic.len() + overlay.len(),
    };
    let mut b = BytesMut::with_capacity(13 + key.len() + body);
    b.put_u8(match content {
        Content::Event(_) => ENTRY_FORMAT,
        Content::Reference { .. } => REFERENCE_FORMAT,
    });
    b.put_u64_le(seq);
    b.put_u32_le(key.len() as u32);
    b.put_slice(key);
    match content {
        Content::Event(payload) => b.put_slice(payload),
        Content::Reference { topic, partition, offset, overlay } => {
            b.put_u16_le(topic.len() as u16);
            b.put_slice(topic.as_bytes());
            b.put_u32_le(*partition);
            b.put_u64_le(*offset);
            b.put_slice(overlay);
        }
    }
    b.freeze()
}

/// (sequence number, key, content) of a store record's value.
fn decode_entry(value: &Bytes) -> Result<(u64, Bytes, Content)> {
    let corrupt = || Error::State("a mailbox store record has an unknown format".into());
    let mut v = value.clone();
    if v.remaining() < 13 {
        return Err(corrupt());
    }
    let format = v.get_u8();
    let seq = v.get_u64_le();
    let key_len = v.get_u32_le() as usize;
    if v.remaining() < key_len {
        return Err(corrupt());
    }
    let key = v.split_to(key_len);
    let content = match format {
        ENTRY_FORMAT => Content::Event(v),
        REFERENCE_FORMAT => {
            if v.remaining() < 2 {
                return Err(corrupt());
            }
            let topic_len = v.get_u16_le() as usize;
            if v.remaining() < topic_len + 12 {
                return Err(corrupt());
            }
            let topic = String::from_utf8(v.split_to(topic_len).to_vec()).map_err(|_| corrupt())?;
            let (partition, offset) = (v.get_u32_le(), v.get_u64_le());
            Content::Reference { topic, partition, offset, overlay: v }
        }
        _ => return Err(corrupt()),
    };
    Ok((seq, key, content))
}

/// Event fields (numbers as in `event.proto`) a delivery's overlay sets: sender and recipients
/// replace the event's, headers are added.
const OVERLAY_REPLACES: [u32; 2] = [7, 8];
const OVERLAY_HEADERS: u32 = 13;

/// The delivery an encoded overlay describes, made of an encoded event: the overlay's sender
/// and recipients replace the event's, its headers are added (and win over equal keys).
///
/// Works on the encodings, without decoding the event: its fields but sender and recipients
/// are copied, then the overlay's sender, recipients and headers appended. Protobuf decoding
/// keeps the last value of a field and of a map key.
pub fn apply_overlay(event: &[u8], overlay: &[u8]) -> Result<Bytes> {
    let mut delivery = Vec::with_capacity(event.len() + overlay.len());
    copy_fields(event, &mut delivery, |tag| !OVERLAY_REPLACES.contains(&tag))?;
    copy_fields(overlay, &mut delivery, |tag| OVERLAY_REPLACES.contains(&tag) || tag == OVERLAY_HEADERS)?;
    Ok(delivery.into())
}

/// Appends the fields of the encoded message `encoded` whose number `keep` accepts to `out`.
fn copy_fields(encoded: &[u8], out: &mut Vec<u8>, keep: impl Fn(u32) -> bool) -> Result<()> {
    use prost::encoding::{decode_key, skip_field, DecodeContext};
    let corrupt = |e: prost::DecodeError| Error::Corrupt { path: "event envelope".into(), reason: e.to_string() };
    let mut rest = encoded;
    while !rest.is_empty() {
        let start = encoded.len() - rest.len();
        let (tag, wire_type) = decode_key(&mut rest).map_err(corrupt)?;
        skip_field(wire_type, tag, &mut rest, DecodeContext::default()).map_err(corrupt)?;
        if keep(tag) {
            out.extend_from_slice(&encoded[start..encoded.len() - rest.len()]);
        }
    }
    Ok(())
}

impl MailboxLog {
    /// Wraps `inner`, creating the store topic with `settings.mailbox_partitions` partitions if
    /// needed (existing stores keep theirs), giving it `settings.mailbox_retention_ms`, and
    /// building the index: from `index_file` (written at the last clean shutdown) and the store
    /// records after it, or else from the whole store. The bus applies retention every
    /// `log_settings.retention_check_ms`.
    pub async fn open(
        inner: Arc<dyn Log>,
        directory: DirectoryHandle,
        settings: &RoutingSettings,
        log_settings: &LogSettings,
        index_file: Option<PathBuf>,
    ) -> Result<Self> {
        let (partitions, retention_ms) = (settings.mailbox_partitions, settings.mailbox_retention_ms);
        let config = match inner.describe_topic(STORE_TOPIC).await {
            Ok(info) => info.config,
            Err(Error::UnknownTopic(_)) => {
                inner.create_topic(STORE_TOPIC, TopicConfig { partitions, retention_ms, retention_bytes: 0 }).await?.config
            }
            Err(e) => return Err(e),
        };
        let partitions = config.partitions;
        let lanes = (0..partitions)
            .map(|_| Lane { writer: Mutex::new(()), waiting: SyncMutex::new(Vec::new()), unsure: Default::default() })
            .collect();
        let ingest_topic = settings.ingest_topic.clone();
        let end_mark_ahead_ms = end_mark_ahead_ms(log_settings.retention_check_ms);
        let seed = std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now());
        let index = SyncMutex::new(Index::seeded(seed, id_window(log_settings)));
        let log = MailboxLog {
            inner,
            directory,
            partitions,
            index,
            retention_ms,
            end_mark_ahead_ms,
            ingest_topic,
            lanes,
            index_file,
            built: Default::default(),
        };
        log.rebuild().await?;
        if (config.retention_ms, config.retention_bytes) != (retention_ms, 0) {
            // Marks first: once set, the log may delete at once (a Kafka broker does).
            log.mark_ends_at_risk(crate::event::now_ms()).await?;
            log.inner.set_retention(STORE_TOPIC, retention_ms, 0).await.map_err(|e| {
                Error::State(format!(
                    "the mailbox store's retention could not be set to routing.mailbox_retention_ms = {retention_ms}: {e}"
                ))
            })?;
            tracing::info!(retention_ms, was = config.retention_ms, "mailbox store retention changed");
        }
        Ok(log)
    }

    async fn rebuild(&self) -> Result<()> {
        let started = std::time::Instant::now();
        let mut records = 0;
        let loaded = self.load_index_file().await;
        let from_file = loaded.is_some();
        match loaded {
            Some(index) => *self.lock() = index,
            None => self.lock().store = (0..self.partitions).map(|_| StorePartition::default()).collect(),
        }
        for p in 0..self.partitions {
            let start = self.inner.offsets(STORE_TOPIC, p).await?.start;
            if from_file {
                // Retention deleted records since the file was written.
                self.trim(p, start);
            } else {
                let mut index = self.lock();
                index.store[p as usize].start = start;
                index.store[p as usize].end = start;
            }
            records += self.index_store_tail(p).await?;
        }
        // Mailboxes whose records retention deleted start at their end marks.
        let mut marks = Vec::new();
        for (topic, group) in self.inner.list_groups().await? {
            if group == END_MARK_GROUP && is_mailbox_topic(&topic) {
                if let Some(cursor) = self.inner.load_cursor(&topic, END_MARK_GROUP, 0).await? {
                    marks.push((topic, cursor.committed));
                }
            }
        }
        let mut index = self.lock();
        for (topic, seq) in marks {
            index.mailboxes.entry(topic.clone()).or_insert_with(|| Mailbox::starting_at(seq));
            index.end_marks.insert(topic, seq);
        }
        for mb in index.mailboxes.values_mut() {
            mb.end.send_replace(mb.next_seq());
        }
        tracing::info!(
            mailboxes = index.mailboxes.len(),
            from_file,
            store_records_read = records,
            end_marks = index.end_marks.len(),
            ms = started.elapsed().as_millis() as u64,
            "mailbox index rebuilt"
        );
        let _ = self.built.set(IndexBuilt { from_file, store_records_read: records });
        Ok(())
    }

    /// The index in `index_file`, if there is one and the store still holds what it ends with
    /// (the same records, none of those after it deleted); None (and why, logged) otherwise.
    async fn load_index_file(&self) -> Option<Index> {
        let path = self.index_file.as_ref()?;
        if !path.exists() {
            return None;
        }
        let id_window = self.lock().id_window;
        let checked = async {
            let (index, last_ids) = snapshot::read(path, self.partitions, id_window)?;
            for (p, (store, last_id)) in (0..self.partitions).zip(index.store.iter().zip(&last_ids)) {
                let offsets = self.inner.offsets(STORE_TOPIC, p).await?;
                if store.end > offsets.end {
                    return Err(Error::State(format!("store partition {p} ends at {}, before the file's {}", offsets.end, store.end)));
                }
                if store.end == 0 {
                    continue;
                }
                let last = store.end - 1;
                let stored = if last >= offsets.start { self.inner.read(STORE_TOPIC, p, last, 1, 1 << 20).await? } else { Vec::new() };
                if stored.first().is_none_or(|r| r.offset != last || &r.id != last_id) {
                    return Err(Error::State(format!("store partition {p} no longer holds record {last} as the file knew it")));
                }
            }
            Ok(index)
        };
        match checked.await {
            Ok(index) => Some(index),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "mailbox index file not used: reading the whole store");
                None
            }
        }
    }

    /// Writes the index to `index_file`. Callers hold every lane's writer: nothing is appended
    /// meanwhile, so the file matches the store up to its ends.
    async fn write_index_file(&self, path: &std::path::Path) -> Result<()> {
        let ends: Vec<u64> = self.lock().store.iter().map(|s| s.end).collect();
        let mut last_ids = Vec::with_capacity(ends.len());
        for (p, &end) in (0..self.partitions).zip(&ends) {
            let last = match end {
                0 => None,
                end => self.inner.read(STORE_TOPIC, p, end - 1, 1, 1 << 20).await?.into_iter().next().filter(|r| r.offset == end - 1),
            };
            last_ids.push(last.map(|r| r.id).unwrap_or_default());
        }
        let bytes = snapshot::write(path, &self.lock(), &last_ids)?;
        tracing::info!(path = %path.display(), bytes, "mailbox index written");
        Ok(())
    }

    /// Indexes the records of store partition `partition` from where the index ends to the
    /// store's end; returns how many. Callers hold the partition's writer (or are the start).
    async fn index_store_tail(&self, partition: u32) -> Result<usize> {
        let offsets = self.inner.offsets(STORE_TOPIC, partition).await?;
        let mut from = self.lock().store[partition as usize].end.max(offsets.start);
        let mut records = 0;
        while from < offsets.end {
            let batch = self.inner.read(STORE_TOPIC, partition, from, 4096, 16 * 1024 * 1024).await?;
            let Some(last) = batch.last() else { break };
            from = last.offset + 1;
            let due = {
                let mut index = self.lock();
                for r in &batch {
                    index.index_stored(partition, r)?;
                }
                index.ids_due(partition)
            };
            self.forget_old_ids(partition, due);
            records += batch.len();
        }
        Ok(records)
    }

    /// Writes the end mark of every mailbox whose last record retention could delete before
    /// the next pass (older than the retention horizon, with `end_mark_ahead_ms` to spare).
    async fn mark_ends_at_risk(&self, now_ms: i64) -> Result<()> {
        if self.retention_ms == 0 {
            return Ok(());
        }
        let horizon = now_ms.saturating_add(self.end_mark_ahead_ms).saturating_sub(self.retention_ms.min(i64::MAX as u64) as i64);
        let due: Vec<(String, u64)> = {
            let index = self.lock();
            index
                .mailboxes
                .iter()
                .filter(|(name, mb)| {
                    mb.entries.last().is_some_and(|&(_, ts)| ts < horizon) && index.end_marks.get(*name) != Some(&mb.next_seq())
                })
                .map(|(name, mb)| (name.clone(), mb.next_seq()))
                .collect()
        };
        for (name, seq) in due {
            let mark = Cursor { committed: seq, scanned: seq, unacked: Vec::new(), attempts: Vec::new() };
            self.inner.store_cursors(&name, END_MARK_GROUP, &[(0, mark)]).await?;
            tracing::debug!(mailbox = %name, seq, "mailbox end marked");
            self.lock().end_marks.insert(name, seq);
        }
        Ok(())
    }

    /// Drops from the index what the store no longer holds; returns the records dropped.
    async fn follow_store_start(&self) -> Result<usize> {
        let mut dropped = 0;
        for p in 0..self.partitions {
            let start = self.inner.offsets(STORE_TOPIC, p).await?.start;
            dropped += self.trim(p, start);
        }
        Ok(dropped)
    }

    /// Drops the records of store partition `partition` below `start` from the index: the
    /// mailboxes' entries (their start moves up) and their ids. Returns the records dropped.
    fn trim(&self, partition: u32, start: u64) -> usize {
        let mut dropped = 0;
        {
            let mut index = self.lock();
            if index.store[partition as usize].start >= start {
                return 0;
            }
            index.store[partition as usize].start = start;
            for (name, mb) in index.mailboxes.iter_mut() {
                if partition_for_key(name.as_bytes(), self.partitions) != partition {
                    continue;
                }
                let gone = mb.entries.partition_point(|&(offset, _)| offset < start);
                if gone > 0 {
                    mb.entries.drain(..gone);
                    mb.start += gone as u64;
                    if mb.entries.capacity() > 4 * mb.entries.len() + 64 {
                        mb.entries.shrink_to_fit();
                    }
                    dropped += gone;
                }
            }
        }
        let ids = self.forget_ids(partition, start);
        tracing::info!(store_partition = partition, start, dropped, ids, "mailbox index follows the store's retention");
        dropped
    }

    /// Forgets the ids of store partition `partition`'s records below `offset`; returns the ids
    /// kept (all partitions). A shard at a time: an append waits for one shard's pass at most.
    fn forget_ids(&self, partition: u32, offset: u64) -> usize {
        for shard in 0..crate::sharded::SHARDS {
            let mut index = self.lock();
            index.ids.shard_at_mut(shard).retain(|&mut (_, position)| {
                position >> POSITION_OFFSET_BITS != u64::from(partition) || position_offset(position) >= offset
            });
        }
        let mut index = self.lock();
        index.ids.shrink_sparse(0, |&(h, _)| h);
        index.ids.len()
    }

    /// Forgets the ids of store partition `partition` that left its id window, when
    /// [`Index::ids_due`] said enough have (`due`).
    fn forget_old_ids(&self, partition: u32, due: Option<u64>) {
        if let Some(offset) = due {
            let ids = self.forget_ids(partition, offset);
            tracing::debug!(store_partition = partition, below = offset, ids, "mailbox ids older than the id window forgotten");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a mailbox topic exists: its participant is in the directory, or it holds records
    /// or was created (a dead-letter topic).
    pub fn exists(&self, topic: &str) -> bool {
        if !is_mailbox_topic(topic) {
            return false;
        }
        self.lock().mailboxes.contains_key(topic) || self.directory.get().participant(&topic[MAILBOX_PREFIX.len()..]).is_some()
    }

    fn check(&self, topic: &str, partition: u32) -> Result<()> {
        if !self.exists(topic) {
            return Err(Error::UnknownTopic(topic.to_string()));
        }
        if partition != 0 {
            return Err(Error::UnknownPartition { topic: topic.to_string(), partition, partitions: 1 });
        }
        Ok(())
    }

    fn info(&self, topic: &str) -> TopicInfo {
        let index = self.lock();
        let (start, end) = index.mailboxes.get(topic).map(|m| (m.start, m.next_seq())).unwrap_or((0, 0));
        TopicInfo {
            name: topic.to_string(),
            config: TopicConfig { partitions: 1, retention_ms: self.retention_ms, retention_bytes: 0 },
            partitions: vec![PartitionOffsets { start, end }],
        }
    }

    /// Appends records to several mailboxes in one durable write; results in input order. A
    /// record whose id the mailbox already holds is not appended again (`duplicate`).
    pub async fn append_many<R: Into<MailboxRecord>>(&self, records: Vec<(String, R)>) -> Result<Vec<Appended>> {
        // Each mailbox once: a router batch names few mailboxes many times.
        let topics: std::collections::BTreeSet<&String> = records.iter().map(|(t, _)| t).collect();
        if let Some(unknown) = topics.into_iter().find(|t| !self.exists(t)) {
            return Err(Error::UnknownTopic(unknown.clone()));
        }
        // Store partition -> (positions in `records`, those records).
        let mut by_lane: BTreeMap<u32, (Vec<usize>, Addressed)> = BTreeMap::new();
        let count = records.len();
        for (i, (topic, r)) in records.into_iter().enumerate() {
            let lane = by_lane.entry(partition_for_key(topic.as_bytes(), self.partitions)).or_default();
            lane.0.push(i);
            lane.1.push((topic, r.into()));
        }
        let lanes = by_lane.into_iter().map(|(lane, (indexes, records))| async move { (indexes, self.append_lane(lane, records).await) });
        let mut results: Vec<Option<Appended>> = vec![None; count];
        for (indexes, appended) in futures_util::future::join_all(lanes).await {
            for (i, a) in indexes.into_iter().zip(appended?) {
                results[i] = Some(a);
            }
        }
        results.into_iter().map(|r| r.ok_or_else(|| Error::Internal("a mailbox append lost a record".into()))).collect()
    }

    /// Appends records of one store partition, together with whatever else waits for it.
    async fn append_lane(&self, partition: u32, records: Addressed) -> Result<Vec<Appended>> {
        let lane = &self.lanes[partition as usize];
        let (reply, answer) = oneshot::channel();
        lane.waiting.lock().unwrap_or_else(|e| e.into_inner()).push(AppendJob { records, reply });
        {
            let _writer = lane.writer.lock().await;
            let jobs = std::mem::take(&mut *lane.waiting.lock().unwrap_or_else(|e| e.into_inner()));
            // Empty when an earlier holder of the writer took this caller's job along.
            if !jobs.is_empty() {
                let lengths: Vec<usize> = jobs.iter().map(|j| j.records.len()).collect();
                let (records, replies): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| (j.records, j.reply)).unzip();
                match self.write(partition, records.into_iter().flatten().collect()).await {
                    Ok(results) => {
                        let mut results = results.into_iter();
                        for (reply, n) in replies.into_iter().zip(lengths) {
                            let _ = reply.send(Ok(results.by_ref().take(n).collect()));
                        }
                    }
                    Err(e) => {
                        for reply in replies {
                            let _ = reply.send(Err(shared_error(&e)));
                        }
                    }
                }
            }
        }
        answer.await.map_err(|_| Error::Internal("a mailbox append was abandoned".into()))?
    }

    /// Assigns sequence numbers, writes the fresh records in one store append, and indexes
    /// them. Callers hold the writer of store partition `partition`.
    async fn write(&self, partition: u32, records: Addressed) -> Result<Vec<Appended>> {
        let lane = &self.lanes[partition as usize];
        if lane.unsure.load(Ordering::Acquire) {
            // What the failed append stored has the numbers this write would give again.
            let found = self.index_store_tail(partition).await?;
            for mb in self.lock().mailboxes.values() {
                let next = mb.next_seq();
                mb.end.send_if_modified(|end| std::mem::replace(end, next) != next);
            }
            lane.unsure.store(false, Ordering::Release);
            tracing::warn!(store_partition = partition, records = found, "mailbox index took in what a failed store append stored");
        }
        let mut results: Vec<Option<Appended>> = vec![None; records.len()];
        let mut fresh = Vec::new();
        let mut placed = Vec::new();
        {
            let index = self.lock();
            let mut next: FastMap<&str, u64> = FastMap::default();
            let mut batch_ids: FastMap<u64, u64> = FastMap::default();
            for (i, (topic, r)) in records.iter().enumerate() {
                let h = index.id_hash(topic, &r.id);
                if let Some(seq) = index.stored(topic, h).or_else(|| batch_ids.get(&h).copied()) {
                    results[i] = Some(Appended { partition: 0, offset: seq, duplicate: true });
                    continue;
                }
                let seq = next.entry(topic.as_str()).or_insert_with(|| index.mailboxes.get(topic.as_str()).map_or(0, Mailbox::next_seq));
                batch_ids.insert(h, *seq);
                fresh.push(NewRecord {
                    id: store_id(topic, &r.id),
                    key: Bytes::copy_from_slice(topic.as_bytes()),
                    timestamp_ms: r.timestamp_ms,
                    value: encode_entry(*seq, &r.key, &r.content),
                });
                placed.push((i, topic.clone(), *seq, h, r.timestamp_ms));
                *seq += 1;
            }
        }
        if !fresh.is_empty() {
            let stored = self.inner.append(STORE_TOPIC, fresh).await.inspect_err(|_| lane.unsure.store(true, Ordering::Release))?;
            let due = {
                let mut index = self.lock();
                for ((i, topic, seq, h, ts), a) in placed.into_iter().zip(stored) {
                    if a.duplicate {
                        // Cannot happen while the id window covers the log's dedup window.
                        tracing::error!(mailbox = %topic, seq, store_offset = a.offset, "the mailbox store held a record the index did not know");
                    }
                    let mb = index.mailboxes.entry(topic).or_insert_with(Mailbox::new);
                    debug_assert_eq!(seq, mb.next_seq());
                    mb.entries.push((a.offset, ts));
                    mb.end.send_replace(mb.next_seq());
                    index.indexed(partition, a.offset, h);
                    results[i] = Some(Appended { partition: 0, offset: seq, duplicate: false });
                }
                index.ids_due(partition)
            };
            self.forget_old_ids(partition, due);
        }
        Ok(results.into_iter().map(|r| r.expect("every record placed")).collect())
    }

    /// The delivery `id` that references `source`/`partition`/`offset`, put together.
    async fn referenced(&self, id: &str, source: &str, partition: u32, offset: u64, overlay: &Bytes) -> Result<Bytes> {
        let gone = || Error::State(format!("delivery {id} references {source}/{partition}/{offset}, which is no longer stored"));
        let record = match self.inner.read_transient(source, partition, offset, 1, 1).await {
            Ok(records) => records.into_iter().next().filter(|r| r.offset == offset).ok_or_else(gone)?,
            Err(Error::OffsetOutOfRange { .. }) => return Err(gone()),
            Err(e) => return Err(e),
        };
        // Delivery ids are `<event id>><participant>`.
        if id.strip_prefix(record.id.as_str()).is_none_or(|rest| !rest.starts_with('>')) {
            return Err(Error::State(format!("delivery {id} references {source}/{partition}/{offset}, which holds {}", record.id)));
        }
        apply_overlay(&record.value, overlay)
    }

    /// Store offsets of `topic`'s sequence numbers from `from`, at most `max`.
    fn positions(&self, topic: &str, from: u64, max: usize) -> (u64, Vec<(u64, i64)>) {
        let index = self.lock();
        match index.mailboxes.get(topic) {
            Some(mb) => {
                let from = from.max(mb.start);
                let skip = (from - mb.start) as usize;
                (from, mb.entries.iter().skip(skip).take(max).copied().collect())
            }
            None => (from, Vec::new()),
        }
    }

    /// Reads the records at `positions` (store offsets of `topic`'s sequence numbers from
    /// `first`), at least one and up to `max_bytes`. `Err(offset)` when the store no longer
    /// holds the record at `offset`.
    async fn read_positions(
        &self,
        topic: &str,
        store_partition: u32,
        first: u64,
        positions: &[(u64, i64)],
        max_bytes: usize,
    ) -> Result<std::result::Result<Vec<StoredRecord>, u64>> {
        let mut out = Vec::with_capacity(positions.len());
        let mut bytes = 0usize;
        let mut i = 0;
        // Runs of consecutive store offsets are read in one call.
        while i < positions.len() && (out.is_empty() || bytes < max_bytes) {
            let start = positions[i].0;
            let mut run = 1;
            while i + run < positions.len() && positions[i + run].0 == start + run as u64 {
                run += 1;
            }
            let records = self.inner.read(STORE_TOPIC, store_partition, start, run, max_bytes.saturating_sub(bytes).max(1)).await?;
            if records.is_empty() {
                break;
            }
            for r in records {
                if r.offset > positions[i].0 {
                    return Ok(Err(positions[i].0));
                }
                if r.offset != positions[i].0 || r.key != topic.as_bytes() {
                    return Err(Error::State(format!("mailbox index of {topic} points at a foreign store record {}", r.offset)));
                }
                let (seq, key, content) = decode_entry(&r.value)?;
                debug_assert_eq!(seq, first + i as u64);
                let mut id = r.id;
                id.drain(..id.len() - mailbox_id(topic, &id).len());
                let value = match content {
                    Content::Event(value) => value,
                    Content::Reference { topic: source, partition, offset, overlay } => {
                        self.referenced(&id, &source, partition, offset, &overlay).await?
                    }
                };
                bytes += value.len();
                out.push(StoredRecord { partition: 0, offset: seq, timestamp_ms: r.timestamp_ms, id, key, value, chain: None });
                i += 1;
            }
        }
        Ok(Ok(out))
    }
}

#[async_trait]
impl Log for MailboxLog {
    async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<TopicInfo> {
        if !is_mailbox_topic(name) {
            return self.inner.create_topic(name, config).await;
        }
        crate::event::validate_name("topic", name)?;
        if self.exists(name) {
            return Err(Error::TopicExists { name: name.to_string(), partitions: 1 });
        }
        if config.partitions != 1 {
            return Err(Error::invalid("partitions", "mailbox topics have exactly one partition"));
        }
        self.lock().mailboxes.insert(name.to_string(), Mailbox::new());
        Ok(self.info(name))
    }

    async fn set_retention(&self, name: &str, retention_ms: u64, retention_bytes: u64) -> Result<TopicInfo> {
        if is_mailbox_topic(name) {
            self.check(name, 0)?;
        }
        if is_mailbox_topic(name) || name == STORE_TOPIC {
            return Err(Error::invalid("topic", "mailboxes keep what routing.mailbox_retention_ms says"));
        }
        if name == self.ingest_topic && (retention_ms, retention_bytes) != (0, 0) {
            return Err(Error::invalid("topic", format!("{name} keeps everything while it is routed: deliveries reference its records")));
        }
        self.inner.set_retention(name, retention_ms, retention_bytes).await
    }

    async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        let mut topics = self.inner.list_topics().await?;
        let mut names: Vec<String> = self.lock().mailboxes.keys().cloned().collect();
        names.extend(self.directory.get().participants().iter().map(|p| p.mailbox()));
        names.sort();
        names.dedup();
        topics.extend(names.iter().map(|n| self.info(n)));
        topics.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(topics)
    }

    async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        if !is_mailbox_topic(name) {
            return self.inner.describe_topic(name).await;
        }
        self.check(name, 0)?;
        Ok(self.info(name))
    }

    async fn partition_count(&self, name: &str) -> Result<u32> {
        if !is_mailbox_topic(name) {
            return self.inner.partition_count(name).await;
        }
        Ok(self.describe_topic(name).await?.config.partitions)
    }

    async fn append(&self, topic: &str, records: Vec<NewRecord>) -> Result<Vec<Appended>> {
        if !is_mailbox_topic(topic) {
            return self.inner.append(topic, records).await;
        }
        self.append_many(records.into_iter().map(|r| (topic.to_string(), r)).collect()).await
    }

    async fn read(&self, topic: &str, partition: u32, from: u64, max_records: usize, max_bytes: usize) -> Result<Vec<StoredRecord>> {
        if !is_mailbox_topic(topic) {
            return self.inner.read(topic, partition, from, max_records, max_bytes).await;
        }
        self.check(topic, partition)?;
        let store_partition = partition_for_key(topic.as_bytes(), self.partitions);
        loop {
            let (first, positions) = self.positions(topic, from, max_records.max(1));
            match self.read_positions(topic, store_partition, first, &positions, max_bytes).await? {
                Ok(records) => return Ok(records),
                // Retention deleted store records the index still pointed at: follow it, again.
                Err(missing) => {
                    let start = self.inner.offsets(STORE_TOPIC, store_partition).await?.start;
                    if start <= missing {
                        return Err(Error::State(format!("mailbox index of {topic} points at store record {missing}, which is missing")));
                    }
                    self.trim(store_partition, start);
                }
            }
        }
    }

    async fn read_transient(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>> {
        if !is_mailbox_topic(topic) {
            return self.inner.read_transient(topic, partition, from, max_records, max_bytes).await;
        }
        self.read(topic, partition, from, max_records, max_bytes).await
    }

    async fn keeps_everything(&self, topic: &str) -> Result<bool> {
        if !is_mailbox_topic(topic) {
            return self.inner.keeps_everything(topic).await;
        }
        self.check(topic, 0)?;
        Ok(self.retention_ms == 0)
    }

    async fn offsets(&self, topic: &str, partition: u32) -> Result<PartitionOffsets> {
        if !is_mailbox_topic(topic) {
            return self.inner.offsets(topic, partition).await;
        }
        self.check(topic, partition)?;
        Ok(self.info(topic).partitions[0])
    }

    async fn offset_for_time(&self, topic: &str, partition: u32, timestamp_ms: i64) -> Result<u64> {
        if !is_mailbox_topic(topic) {
            return self.inner.offset_for_time(topic, partition, timestamp_ms).await;
        }
        self.check(topic, partition)?;
        let index = self.lock();
        Ok(match index.mailboxes.get(topic) {
            Some(mb) => mb.start + mb.entries.iter().position(|&(_, t)| t >= timestamp_ms).unwrap_or(mb.entries.len()) as u64,
            None => 0,
        })
    }

    fn watch_end(&self, topic: &str, partition: u32) -> Result<watch::Receiver<u64>> {
        if !is_mailbox_topic(topic) {
            return self.inner.watch_end(topic, partition);
        }
        self.check(topic, partition)?;
        Ok(self.lock().mailboxes.entry(topic.to_string()).or_insert_with(Mailbox::new).end.subscribe())
    }

    async fn apply_retention(&self) -> Result<usize> {
        // No deletion before the marks are stored: a mailbox must not lose its numbering.
        self.mark_ends_at_risk(crate::event::now_ms()).await?;
        let removed = self.inner.apply_retention().await?;
        self.follow_store_start().await?;
        Ok(removed)
    }

    async fn load_cursor(&self, topic: &str, group: &str, partition: u32) -> Result<Option<Cursor>> {
        self.inner.load_cursor(topic, group, partition).await
    }

    async fn store_cursors(&self, topic: &str, group: &str, cursors: &[(u32, Cursor)]) -> Result<()> {
        if group == END_MARK_GROUP {
            return Err(Error::invalid("group", format!("{END_MARK_GROUP} holds the mailboxes' end marks")));
        }
        self.inner.store_cursors(topic, group, cursors).await
    }

    async fn store_group_config(&self, topic: &str, group: &str, config: &GroupConfig) -> Result<()> {
        self.inner.store_group_config(topic, group, config).await
    }

    async fn load_group_config(&self, topic: &str, group: &str) -> Result<Option<GroupConfig>> {
        self.inner.load_group_config(topic, group).await
    }

    async fn list_groups(&self) -> Result<Vec<(String, String)>> {
        // The end marks are kept as cursors, but belong to no group anyone reads with.
        Ok(self.inner.list_groups().await?.into_iter().filter(|(_, group)| group != END_MARK_GROUP).collect())
    }

    async fn put_quarantine(&self, topic: &str, group: &str, entry: &Quarantine) -> Result<()> {
        self.inner.put_quarantine(topic, group, entry).await
    }

    async fn remove_quarantine(&self, topic: &str, group: &str, key: &[u8]) -> Result<Option<Quarantine>> {
        self.inner.remove_quarantine(topic, group, key).await
    }

    async fn list_quarantine(&self, topic: &str, group: &str) -> Result<Vec<Quarantine>> {
        self.inner.list_quarantine(topic, group).await
    }

    async fn put_blob(&self, sha256: &str, size: u64, path: &std::path::Path) -> Result<()> {
        self.inner.put_blob(sha256, size, path).await
    }

    async fn blob_size(&self, sha256: &str) -> Result<Option<u64>> {
        self.inner.blob_size(sha256).await
    }

    async fn read_blob(&self, sha256: &str, sink: &mut (dyn for<'c> FnMut(&'c [u8]) -> Result<()> + Send)) -> Result<bool> {
        self.inner.read_blob(sha256, sink).await
    }

    async fn grant_blobs(&self, grants: &[(String, String)]) -> Result<()> {
        self.inner.grant_blobs(grants).await
    }

    async fn blob_granted(&self, sha256: &str, participant: &str) -> Result<bool> {
        self.inner.blob_granted(sha256, participant).await
    }

    fn shares_groups(&self, topic: &str) -> bool {
        !is_mailbox_topic(topic) && self.inner.shares_groups(topic)
    }

    async fn join_group(&self, topic: &str, group: &str) -> Result<Option<crate::log::Membership>> {
        // Mailboxes live in this node's index: their groups are this node's alone.
        if is_mailbox_topic(topic) {
            return Ok(None);
        }
        self.inner.join_group(topic, group).await
    }

    async fn stored_chain_before(&self, topic: &str, partition: u32, offset: u64) -> Result<Option<ChainHash>> {
        self.inner.stored_chain_before(topic, partition, offset).await
    }

    async fn put_checkpoint(&self, checkpoint: &Checkpoint) -> Result<()> {
        self.inner.put_checkpoint(checkpoint).await
    }

    async fn list_checkpoints(&self, topic: &str, partition: u32) -> Result<Vec<Checkpoint>> {
        self.inner.list_checkpoints(topic, partition).await
    }

    async fn close(&self) -> Result<()> {
        let mut writers = Vec::with_capacity(self.lanes.len());
        for lane in &self.lanes {
            writers.push(lane.writer.lock().await);
        }
        if let Some(path) = &self.index_file {
            // Not fatal: the next start reads the store instead.
            if let Err(e) = self.write_index_file(path).await {
                tracing::error!(path = %path.display(), error = %e, "mailbox index not written");
            }
        }
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use justizbus_proto::v1 as pb;
    use prost::Message;

    use super::*;
    use crate::log::embedded::EmbeddedLog;
    use crate::routing::directory::numbered_courts;

    async fn open(dir: &Path, participants: usize) -> Arc<MailboxLog> {
        let settings = RoutingSettings { mailbox_partitions: 4, ..RoutingSettings::default() };
        open_with(dir, participants, &settings, 60_000).await
    }

    /// Settings with one store partition, keeping records for `retention_ms`.
    fn retaining(retention_ms: i64) -> RoutingSettings {
        RoutingSettings { mailbox_partitions: 1, mailbox_retention_ms: retention_ms as u64, ..RoutingSettings::default() }
    }

    /// Mailboxes over an embedded log of 64 KiB segments, retention applied every `check_ms`.
    async fn open_with(dir: &Path, participants: usize, settings: &RoutingSettings, check_ms: u64) -> Arc<MailboxLog> {
        open_on(dir, participants, settings, LogSettings { retention_check_ms: check_ms, ..small_segments() }).await
    }

    fn small_segments() -> LogSettings {
        LogSettings { segment_bytes: 64 * 1024, index_interval_bytes: 512, ..LogSettings::default() }
    }

    async fn open_on(dir: &Path, participants: usize, settings: &RoutingSettings, log_settings: LogSettings) -> Arc<MailboxLog> {
        let inner: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir, log_settings.clone()).await.expect("open"));
        Arc::new(MailboxLog::open(inner, numbered_courts(participants), settings, &log_settings, None).await.expect("mailboxes"))
    }

    /// Mailboxes (one store partition) that keep their index in `dir`/mailbox-index between a
    /// clean shutdown and the next start.
    async fn open_indexed(dir: &Path) -> Arc<MailboxLog> {
        open_indexed_with(dir, small_segments()).await
    }

    async fn open_indexed_with(dir: &Path, log_settings: LogSettings) -> Arc<MailboxLog> {
        let settings = RoutingSettings { mailbox_partitions: 1, ..RoutingSettings::default() };
        let inner: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir, log_settings.clone()).await.expect("open"));
        let file = Some(dir.join(MAILBOX_INDEX_FILE));
        Arc::new(MailboxLog::open(inner, numbered_courts(3), &settings, &log_settings, file).await.expect("mailboxes"))
    }

    fn record(id: &str, case: &str) -> NewRecord {
        NewRecord {
            id: id.into(),
            key: Bytes::copy_from_slice(case.as_bytes()),
            timestamp_ms: 1000,
            value: Bytes::from(format!("payload {id}")),
        }
    }

    #[tokio::test]
    async fn non_mailbox_topics_pass_through_the_conformance_suite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_path_buf();
        crate::log::conformance::run_all(
            move || {
                let d = d.clone();
                async move { open(&d, 2).await as Arc<dyn Log> }
            },
            true,
        )
        .await;
    }

    #[tokio::test]
    async fn an_append_stored_despite_its_error_keeps_the_numbering_dense() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = RoutingSettings { mailbox_partitions: 1, ..RoutingSettings::default() };
        let embedded: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir.path(), LogSettings::default()).await.expect("open"));
        let faulty = Arc::new(crate::log::fault::StoredButFailed::new(embedded, STORE_TOPIC));
        let log = MailboxLog::open(faulty.clone(), numbered_courts(2), &settings, &LogSettings::default(), None).await.expect("mailboxes");
        let a = "mailbox.DE.Justiz.p0.1";
        let mut end = log.watch_end(a, 0).expect("watch");
        log.append(a, vec![record("d1", "case-1")]).await.expect("append");
        // Stored, but the caller hears of a failure (a Kafka producer that timed out).
        faulty.fail_next(1);
        assert!(log.append(a, vec![record("d2", "case-1")]).await.is_err());
        // The next record follows what is stored: it must not get the number d2 holds.
        let r1 = log.append(a, vec![record("r1", "case-2")]).await.expect("append");
        assert_eq!((r1[0].offset, r1[0].duplicate), (2, false));
        // The retry of the failed append finds d2 stored.
        let d2 = log.append(a, vec![record("d2", "case-1")]).await.expect("retry");
        assert_eq!((d2[0].offset, d2[0].duplicate), (1, true));
        end.mark_unchanged();
        assert_eq!(*end.borrow(), 3, "subscribers see every stored record");
        let ids = |records: Vec<StoredRecord>| records.iter().map(|r| (r.offset, r.id.clone())).collect::<Vec<_>>();
        let expected = vec![(0, "d1".to_string()), (1, "d2".to_string()), (2, "r1".to_string())];
        assert_eq!(ids(log.read(a, 0, 0, 10, 1 << 20).await.expect("read")), expected);
        log.close().await.expect("close");
        drop((log, faulty));
        // The index rebuilt from the store agrees (a store with a number twice would not open).
        let log = open_with(dir.path(), 2, &settings, 60_000).await;
        assert_eq!(ids(log.read(a, 0, 0, 10, 1 << 20).await.expect("read after restart")), expected);
    }

    #[tokio::test]
    async fn the_id_table_keeps_the_log_s_dedup_window_and_forgets_older_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = RoutingSettings { mailbox_partitions: 1, ..RoutingSettings::default() };
        let log_settings = LogSettings { dedup_max_ids: 10_000, ..small_segments() };
        let (a, b) = ("mailbox.DE.Justiz.p0.1", "mailbox.DE.Justiz.p1.1");
        let mailbox = |i: u32| if i.is_multiple_of(2) { a } else { b };
        let log = open_on(dir.path(), 2, &settings, log_settings.clone()).await;
        for batch in 0..30u32 {
            let records = (batch * 1000..(batch + 1) * 1000).map(|i| (mailbox(i).to_string(), record(&format!("e{i}"), "case"))).collect();
            log.append_many(records).await.expect("append");
        }
        // The last 10,000 records' ids at least, and not many more.
        let kept = log.lock().ids.len();
        assert!((10_000..=14_000).contains(&kept), "{kept} ids kept");
        let retries: Vec<(String, NewRecord)> =
            (20_000..30_000).map(|i| (mailbox(i).to_string(), record(&format!("e{i}"), "case"))).collect();
        let again = log.append_many(retries.clone()).await.expect("retry");
        assert!(again.iter().all(|r| r.duplicate), "a retry within the window is stored once");
        assert_eq!(again.last().map(|r| r.offset), Some(14_999), "with its number in its mailbox");
        // An id older than the window (and the log's): at least once, stored again, numbered on.
        let old = log.append(a, vec![record("e0", "case")]).await.expect("append");
        assert_eq!((old[0].offset, old[0].duplicate), (15_000, false));
        log.close().await.expect("close");
        drop(log);
        // The rebuild keeps the same window while it reads the store.
        let log = open_on(dir.path(), 2, &settings, log_settings).await;
        let kept = log.lock().ids.len();
        assert!((10_000..=14_000).contains(&kept), "{kept} ids kept after the rebuild");
        assert!(log.append_many(retries).await.expect("retry").iter().all(|r| r.duplicate));
        assert_eq!(log.offsets(a, 0).await.expect("offsets"), PartitionOffsets { start: 0, end: 15_001 });
    }

    /// Appends records `ids` to mailboxes a and b alternately.
    async fn append_alternately(log: &MailboxLog, ids: std::ops::Range<u32>) {
        let (a, b) = ("mailbox.DE.Justiz.p0.1", "mailbox.DE.Justiz.p1.1");
        let records = ids.map(|i| ((if i.is_multiple_of(2) { a } else { b }).to_string(), record(&format!("e{i}"), "case"))).collect();
        log.append_many(records).await.expect("append");
    }

    /// (end, ids in order) of mailboxes a and b; and whether retrying `e{retry}` stores nothing.
    async fn contents(log: &MailboxLog, retry: u32) -> (Vec<(u64, Vec<String>)>, bool) {
        let mut out = Vec::new();
        for mailbox in ["mailbox.DE.Justiz.p0.1", "mailbox.DE.Justiz.p1.1"] {
            let records = log.read(mailbox, 0, 0, 10_000, 1 << 24).await.expect("read");
            out.push((log.offsets(mailbox, 0).await.expect("offsets").end, records.into_iter().map(|r| r.id).collect()));
        }
        let mailbox = if retry.is_multiple_of(2) { "mailbox.DE.Justiz.p0.1" } else { "mailbox.DE.Justiz.p1.1" };
        let again = log.append(mailbox, vec![record(&format!("e{retry}"), "case")]).await.expect("retry");
        (out, again[0].duplicate)
    }

    #[tokio::test]
    async fn a_clean_shutdown_keeps_the_index_and_the_next_start_reads_only_the_records_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open_indexed(dir.path()).await;
        append_alternately(&log, 0..300).await;
        let before = contents(&log, 7).await;
        assert!(before.1, "a retry is a duplicate");
        log.close().await.expect("close");
        drop(log);
        assert!(dir.path().join(MAILBOX_INDEX_FILE).exists(), "written at the clean shutdown");

        let log = open_indexed(dir.path()).await;
        assert_eq!(log.built.get(), Some(&IndexBuilt { from_file: true, store_records_read: 0 }));
        assert_eq!(contents(&log, 7).await, before, "the same index, the same duplicates");
        // More records, then a crash: no new file, the old one and the records after it.
        append_alternately(&log, 300..340).await;
        let after = contents(&log, 320).await;
        drop(log);
        let log = open_indexed(dir.path()).await;
        assert_eq!(log.built.get(), Some(&IndexBuilt { from_file: true, store_records_read: 40 }));
        assert_eq!(contents(&log, 320).await, after);
        assert!(contents(&log, 3).await.1, "ids from the file are known too");
        log.close().await.expect("close");
        drop(log);

        // A damaged file, or one of another store, is not used: the whole store is read.
        let file = dir.path().join(MAILBOX_INDEX_FILE);
        let mut damaged = std::fs::read(&file).expect("file");
        let middle = damaged.len() / 2;
        damaged[middle] ^= 1;
        std::fs::write(&file, &damaged).expect("damage");
        let log = open_indexed(dir.path()).await;
        assert_eq!(log.built.get(), Some(&IndexBuilt { from_file: false, store_records_read: 340 }));
        assert_eq!(contents(&log, 320).await, after);
        log.close().await.expect("close");
        drop(log);
        let whole = std::fs::read(&file).expect("file");
        std::fs::write(&file, &whole[..whole.len() - 100]).expect("truncate");
        let log = open_indexed(dir.path()).await;
        assert_eq!(log.built.get(), Some(&IndexBuilt { from_file: false, store_records_read: 340 }));
        log.close().await.expect("close");
        drop(log);
        assert_eq!(std::fs::read(&file).expect("file").len(), whole.len(), "written whole again");
        // A file of a smaller id window forgot ids the log (configured with a larger one now)
        // may still deduplicate: not used.
        let log = open_indexed_with(dir.path(), LogSettings { dedup_max_ids: 2_000_000, ..small_segments() }).await;
        assert_eq!(log.built.get(), Some(&IndexBuilt { from_file: false, store_records_read: 340 }));
        log.close().await.expect("close");
        drop(log);
        let other = tempfile::tempdir().expect("tempdir");
        let log = open_indexed(other.path()).await;
        append_alternately(&log, 1000..1340).await;
        log.close().await.expect("close");
        drop(log);
        std::fs::copy(&file, other.path().join(MAILBOX_INDEX_FILE)).expect("copy");
        let log = open_indexed(other.path()).await;
        assert_eq!(log.built.get(), Some(&IndexBuilt { from_file: false, store_records_read: 340 }));
    }

    #[tokio::test]
    async fn mailboxes_are_dense_ordered_deduplicated_and_survive_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path(), 3).await;
        let (a, b) = ("mailbox.DE.Justiz.p0.1", "mailbox.DE.Justiz.p1.1");
        assert_eq!(log.describe_topic(a).await.expect("exists").partitions[0], PartitionOffsets { start: 0, end: 0 });
        let mut end = log.watch_end(b, 0).expect("watch");
        let batch = vec![
            (a.to_string(), record("e1", "case-1")),
            (b.to_string(), record("e1", "case-1")),
            (a.to_string(), record("e2", "case-2")),
            (a.to_string(), record("e1", "case-1")),
        ];
        let placed = log.append_many(batch).await.expect("append");
        let offsets: Vec<(u64, bool)> = placed.iter().map(|p| (p.offset, p.duplicate)).collect();
        assert_eq!(offsets, vec![(0, false), (0, false), (1, false), (0, true)]);
        end.changed().await.expect("end moves");
        assert_eq!(*end.borrow(), 1);
        // A retry of the same ids (a router restarted mid-batch) stores nothing.
        let again = log.append(a, vec![record("e2", "case-2"), record("e3", "case-1")]).await.expect("append");
        assert_eq!(again.iter().map(|p| (p.offset, p.duplicate)).collect::<Vec<_>>(), vec![(1, true), (2, false)]);
        let read = log.read(a, 0, 0, 100, 1 << 20).await.expect("read");
        let seen: Vec<(u64, &str, &[u8])> = read.iter().map(|r| (r.offset, r.id.as_str(), &r.key[..])).collect();
        assert_eq!(seen, vec![(0, "e1", &b"case-1"[..]), (1, "e2", &b"case-2"[..]), (2, "e3", &b"case-1"[..])]);
        assert_eq!(read[2].value, Bytes::from("payload e3"));
        assert_eq!(log.read(a, 0, 1, 1, 1 << 20).await.expect("read").len(), 1);
        assert!(matches!(log.read("mailbox.DE.Justiz.nobody.1", 0, 0, 10, 1 << 20).await, Err(Error::UnknownTopic(_))));
        assert!(matches!(log.read(a, 1, 0, 10, 1 << 20).await, Err(Error::UnknownPartition { .. })));
        log.close().await.expect("close");
        drop(log);

        let log = open(dir.path(), 3).await;
        assert_eq!(log.offsets(a, 0).await.expect("offsets"), PartitionOffsets { start: 0, end: 3 });
        assert_eq!(log.offsets(b, 0).await.expect("offsets"), PartitionOffsets { start: 0, end: 1 });
        let dup = log.append(b, vec![record("e1", "case-1")]).await.expect("append");
        assert!(dup[0].duplicate, "the rebuilt index still knows stored ids");
        let read = log.read(a, 0, 0, 100, 1 << 20).await.expect("read");
        assert_eq!(read.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["e1", "e2", "e3"]);
        // Dead-letter topics of mailbox groups are virtual topics too.
        let dlq = "mailbox.DE.Justiz.p0.1.outbound.dlq";
        log.create_topic(dlq, TopicConfig { partitions: 1, retention_ms: 0, retention_bytes: 0 }).await.expect("dlq");
        log.append(dlq, vec![record("e1", "case-1")]).await.expect("append");
        assert_eq!(log.read(dlq, 0, 0, 10, 1 << 20).await.expect("read").len(), 1);
    }

    /// A record of about 1 KB with the given timestamp.
    fn stamped(id: &str, timestamp_ms: i64) -> NewRecord {
        NewRecord { id: id.into(), key: Bytes::from_static(b"case"), timestamp_ms, value: vec![b'x'; 1000].into() }
    }

    async fn append_stamped(log: &MailboxLog, mailbox: &str, prefix: &str, range: std::ops::Range<u32>, timestamp_ms: i64) {
        let records = range.map(|i| (mailbox.to_string(), stamped(&format!("{prefix}-{i}"), timestamp_ms))).collect();
        log.append_many::<NewRecord>(records).await.expect("append");
    }

    #[tokio::test]
    async fn retention_drops_old_records_and_their_ids_and_mailboxes_keep_their_numbering() {
        const HOUR_MS: i64 = 3_600_000;
        let dir = tempfile::tempdir().expect("tempdir");
        // Retention set on a store created without: the setting reaches the existing store.
        open_with(dir.path(), 4, &retaining(0), 60_000).await.close().await.expect("close");
        let log = open_with(dir.path(), 4, &retaining(HOUR_MS), 60_000).await;
        assert_eq!(log.inner.describe_topic(STORE_TOPIC).await.expect("store").config.retention_ms, HOUR_MS as u64);
        let (a, b, c) = ("mailbox.DE.Justiz.p0.1", "mailbox.DE.Justiz.p1.1", "mailbox.DE.Justiz.p2.1");
        let now = crate::event::now_ms();
        // Two hours old: a's first 300, all 50 of b, a's next 200; then recent ones for a and c.
        // The old records fill sealed 64 KiB segments, which retention deletes whole.
        append_stamped(&log, a, "old", 0..300, now - 2 * HOUR_MS).await;
        append_stamped(&log, b, "old", 0..50, now - 2 * HOUR_MS).await;
        append_stamped(&log, a, "old", 300..500, now - 2 * HOUR_MS).await;
        append_stamped(&log, a, "new", 0..10, now).await;
        append_stamped(&log, c, "new", 0..5, now).await;
        let ids_before = log.lock().ids.len();
        assert_eq!(ids_before, 565);

        assert!(log.apply_retention().await.expect("retention") > 0, "old segments are deleted");
        let a_offsets = log.offsets(a, 0).await.expect("offsets");
        assert!(a_offsets.start > 300 && a_offsets.start <= 500, "a's start {} moved past b's records", a_offsets.start);
        assert_eq!(a_offsets.end, 510);
        assert_eq!(
            log.offsets(b, 0).await.expect("offsets"),
            PartitionOffsets { start: 50, end: 50 },
            "b is empty and keeps its numbering"
        );
        assert_eq!(log.offsets(c, 0).await.expect("offsets"), PartitionOffsets { start: 0, end: 5 });
        let read = log.read(a, 0, 0, 1000, 1 << 30).await.expect("read");
        assert_eq!(read.first().map(|r| r.offset), Some(a_offsets.start), "reading below the start begins at the start");
        assert_eq!(read.len() as u64, 510 - a_offsets.start);
        let kept = (510 - a_offsets.start + 5) as usize;
        assert_eq!(log.lock().ids.len(), kept, "the ids of deleted records are forgotten");
        let again = log.append(a, vec![stamped("new-3", now), stamped("old-0", now)]).await.expect("append");
        assert_eq!((again[0].offset, again[0].duplicate), (503, true), "kept ids are still known, with their numbers");
        assert_eq!((again[1].offset, again[1].duplicate), (510, false), "a deleted id is new again");
        log.close().await.expect("close");
        drop(log);

        // After a restart the index is what it was, and b goes on from its end mark.
        let log = open_with(dir.path(), 4, &retaining(HOUR_MS), 60_000).await;
        assert_eq!(log.offsets(a, 0).await.expect("offsets"), PartitionOffsets { start: a_offsets.start, end: 511 });
        assert_eq!(log.offsets(b, 0).await.expect("offsets"), PartitionOffsets { start: 50, end: 50 });
        assert_eq!(log.append(b, vec![stamped("late", now)]).await.expect("append")[0].offset, 50);
        assert!(log.list_groups().await.expect("groups").iter().all(|(_, g)| g != END_MARK_GROUP), "end marks are no group");
        assert!(log.store_cursors(b, END_MARK_GROUP, &[]).await.is_err(), "nobody else writes end marks");
        for topic in [a, STORE_TOPIC] {
            assert!(matches!(log.set_retention(topic, 1, 0).await, Err(Error::InvalidArgument { .. })), "{topic} follows the setting");
        }
        let ingest = RoutingSettings::default().ingest_topic;
        log.create_topic(&ingest, TopicConfig { partitions: 1, retention_ms: 0, retention_bytes: 0 }).await.expect("ingest");
        let refused = log.set_retention(&ingest, HOUR_MS as u64, 0).await;
        assert!(matches!(refused, Err(Error::InvalidArgument { .. })), "deliveries reference the ingest topic: {refused:?}");
        assert!(log.keeps_everything(&ingest).await.expect("keeps everything"));
        log.set_retention(&ingest, 0, 0).await.expect("keeping everything is allowed");
        assert_eq!(log.describe_topic(a).await.expect("describe").config.retention_ms, HOUR_MS as u64);
    }

    #[tokio::test]
    async fn end_marks_run_three_retention_passes_ahead_when_passes_are_far_apart() {
        const HOUR_MS: i64 = 3_600_000;
        assert_eq!(end_mark_ahead_ms(60_000), END_MARK_AHEAD_MS);
        assert_eq!(end_mark_ahead_ms(HOUR_MS as u64), 3 * HOUR_MS);
        let now = crate::event::now_ms();
        // Retention two hours, the last record half an hour old: hourly passes could miss the
        // moment it becomes due, so it is marked now; passes every minute mark it later.
        for (check_ms, marked) in [(60_000, None), (HOUR_MS as u64, Some(3))] {
            let dir = tempfile::tempdir().expect("tempdir");
            let log = open_with(dir.path(), 2, &retaining(2 * HOUR_MS), check_ms).await;
            let a = "mailbox.DE.Justiz.p0.1";
            append_stamped(&log, a, "r", 0..3, now - HOUR_MS / 2).await;
            log.apply_retention().await.expect("retention");
            assert_eq!(log.lock().end_marks.get(a).copied(), marked, "retention every {check_ms} ms");
        }
    }

    #[tokio::test]
    async fn a_read_follows_deletions_the_index_has_not_seen() {
        const HOUR_MS: i64 = 3_600_000;
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open_with(dir.path(), 4, &retaining(HOUR_MS), 60_000).await;
        let (a, c) = ("mailbox.DE.Justiz.p0.1", "mailbox.DE.Justiz.p2.1");
        let now = crate::event::now_ms();
        // In batches of 50 KB: a batch goes into one segment, so the last shares one with a's.
        for from in (0..200).step_by(50) {
            append_stamped(&log, c, "old", from..from + 50, now - 2 * HOUR_MS).await;
        }
        append_stamped(&log, a, "new", 0..5, now).await;
        // The log deletes segments the index still points at, as a Kafka broker does on its own
        // schedule: a read follows the store's new start instead of failing.
        assert!(log.inner.apply_retention().await.expect("retention") > 0);
        assert_eq!(log.lock().store[0].start, 0, "the index has not followed yet");
        let read = log.read(c, 0, 0, 1000, 1 << 30).await.expect("read after a deletion behind the index");
        let c_start = log.offsets(c, 0).await.expect("offsets").start;
        assert!(c_start > 0 && c_start < 200, "c's start {c_start} moved to its first kept record");
        assert_eq!(read.first().map(|r| r.offset), Some(c_start));
        assert_eq!(read.last().map(|r| r.offset), Some(199));
        assert_eq!(log.read(a, 0, 0, 10, 1 << 20).await.expect("read").len(), 5);
    }

    #[tokio::test]
    async fn one_id_in_two_mailboxes_of_one_store_partition_is_two_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = ("mailbox.DE.Justiz.p0.1", "mailbox.DE.Justiz.p1.1");
        for round in 0..2 {
            // The second round after a restart, from the rebuilt index.
            let log = open_with(dir.path(), 3, &retaining(0), 60_000).await;
            let first = log.append(a, vec![record("e1", "case-a")]).await.expect("append")[0];
            let second = log.append(b, vec![record("e1", "case-b")]).await.expect("append")[0];
            assert_eq!((first.offset, first.duplicate, second.offset, second.duplicate), (0, round == 1, 0, round == 1));
            for (mailbox, case) in [(a, &b"case-a"[..]), (b, &b"case-b"[..])] {
                let read = log.read(mailbox, 0, 0, 10, 1 << 20).await.expect("read");
                assert_eq!(read.iter().map(|r| (r.id.as_str(), &r.key[..])).collect::<Vec<_>>(), vec![("e1", case)], "{mailbox}");
            }
            log.close().await.expect("close");
        }
    }

    #[tokio::test]
    async fn reading_a_mailbox_reads_only_its_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path(), 1000).await;
        // 999 busy mailboxes share the store with one quiet one.
        let mut batch = Vec::new();
        for round in 0..5 {
            for p in 1..1000 {
                batch.push((format!("mailbox.DE.Justiz.p{p}.1"), record(&format!("e{round}"), "case")));
            }
            log.append_many(std::mem::take(&mut batch)).await.expect("append");
            log.append("mailbox.DE.Justiz.p0.1", vec![record(&format!("q{round}"), "case")]).await.expect("append");
        }
        let quiet = log.read("mailbox.DE.Justiz.p0.1", 0, 0, 100, 1 << 20).await.expect("read");
        assert_eq!(quiet.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["q0", "q1", "q2", "q3", "q4"]);
        assert_eq!(log.describe_topic("mailbox.DE.Justiz.p999.1").await.expect("exists").partitions[0].end, 5);
    }

    #[test]
    fn an_overlay_replaces_sender_and_recipients_and_adds_headers_on_the_encoding() {
        let event = pb::Event {
            id: "ev1".into(),
            r#type: "nachricht.test".into(),
            subject: "case-1".into(),
            time: Some(prost_types::Timestamp { seconds: 1, nanos: 2 }),
            sender: "court:C0".into(),
            recipients: vec!["court:C1".into(), "court:C2".into()],
            data: Bytes::from(vec![7u8; 3000]),
            attachments: vec![pb::Attachment { sha256: "ab".into(), size: 3, name: "a.pdf".into(), media_type: "application/pdf".into() }],
            // A header the overlay sets too: the overlay's value wins.
            headers: [("origin".to_string(), "land".to_string()), ("justizbus.recipient".to_string(), "forged".to_string())].into(),
            spec_version: "justizbus.v1".into(),
            ..Default::default()
        };
        let overlay = pb::Event {
            id: "not taken".into(),
            sender: "DE.Justiz.p0.1".into(),
            recipients: vec!["DE.Justiz.p1.1".into()],
            headers: [("justizbus.recipient".to_string(), "DE.Justiz.p1.1".to_string())].into(),
            ..Default::default()
        };
        let delivery = apply_overlay(&event.encode_to_vec(), &overlay.encode_to_vec()).expect("overlay");
        let expected = pb::Event {
            sender: overlay.sender.clone(),
            recipients: overlay.recipients.clone(),
            headers: [("origin".to_string(), "land".to_string()), ("justizbus.recipient".to_string(), "DE.Justiz.p1.1".to_string())].into(),
            ..event.clone()
        };
        assert_eq!(pb::Event::decode(delivery).expect("decodes"), expected);
        // An overlay without a sender leaves none.
        let no_sender = pb::Event { recipients: vec!["DE.Justiz.p1.1".into()], ..Default::default() };
        let delivery = apply_overlay(&event.encode_to_vec(), &no_sender.encode_to_vec()).expect("overlay");
        assert_eq!(pb::Event::decode(delivery).expect("decodes").sender, "");
        assert!(matches!(apply_overlay(&[0x0a, 0x05, b'a'], &[]), Err(Error::Corrupt { .. })), "a truncated event is refused");
    }

    #[tokio::test]
    async fn a_delivery_by_reference_reads_as_the_referenced_event_under_its_overlay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path(), 2).await;
        let ingest = TopicConfig { partitions: 1, retention_ms: 0, retention_bytes: 0 };
        log.create_topic("ingest", ingest).await.expect("ingest topic");
        let event = pb::Event {
            id: "ev1".into(),
            sender: "court:C0".into(),
            recipients: vec!["court:C1".into()],
            headers: [("origin".to_string(), "land".to_string())].into(),
            data: Bytes::from(vec![7u8; 5000]),
            ..Default::default()
        };
        let stored = NewRecord { id: "ev1".into(), key: Bytes::from("case-1"), timestamp_ms: 1000, value: event.encode_to_vec().into() };
        log.append("ingest", vec![stored]).await.expect("ingest append");
        let overlay = pb::Event {
            sender: "DE.Justiz.p0.1".into(),
            recipients: vec!["DE.Justiz.p1.1".into()],
            headers: [("justizbus.recipient".to_string(), "DE.Justiz.p1.1".to_string())].into(),
            ..Default::default()
        };
        let reference = |id: &str, offset: u64| MailboxRecord {
            id: id.into(),
            key: Bytes::from("case-1"),
            timestamp_ms: 1001,
            content: Content::Reference { topic: "ingest".into(), partition: 0, offset, overlay: overlay.encode_to_vec().into() },
        };
        let mailbox = "mailbox.DE.Justiz.p1.1";
        log.append_many(vec![(mailbox.to_string(), reference("ev1>DE.Justiz.p1.1", 0))]).await.expect("append");

        let expected = pb::Event {
            sender: "DE.Justiz.p0.1".into(),
            recipients: vec!["DE.Justiz.p1.1".into()],
            headers: [("origin".to_string(), "land".to_string()), ("justizbus.recipient".to_string(), "DE.Justiz.p1.1".to_string())].into(),
            ..event.clone()
        };
        let read = log.read(mailbox, 0, 0, 10, 1 << 20).await.expect("read");
        assert_eq!(read.len(), 1);
        assert_eq!((read[0].id.as_str(), &read[0].key[..]), ("ev1>DE.Justiz.p1.1", &b"case-1"[..]));
        assert_eq!(pb::Event::decode(read[0].value.clone()).expect("event"), expected);
        // The store holds the reference, not a second copy of the payload.
        let raw = log.read(STORE_TOPIC, partition_for_key(mailbox.as_bytes(), 4), 0, 10, 1 << 20).await.expect("store");
        assert!(raw[0].value.len() < 200, "store record of {} bytes", raw[0].value.len());
        log.close().await.expect("close");
        drop(log);

        let log = open(dir.path(), 2).await;
        let read = log.read(mailbox, 0, 0, 10, 1 << 20).await.expect("read after restart");
        assert_eq!(pb::Event::decode(read[0].value.clone()).expect("event"), expected);
        // A reference to a record that is not there, or that is another event, is refused.
        log.append_many(vec![(mailbox.to_string(), reference("ev9>DE.Justiz.p1.1", 5))]).await.expect("append");
        let err = log.read(mailbox, 0, 1, 10, 1 << 20).await.expect_err("dangling");
        assert!(err.to_string().contains("no longer stored"), "{err}");
        log.append_many(vec![(mailbox.to_string(), reference("ev8>DE.Justiz.p1.1", 0))]).await.expect("append");
        let err = log.read(mailbox, 0, 2, 10, 1 << 20).await.expect_err("foreign");
        assert!(err.to_string().contains("which holds ev1"), "{err}");
    }
}
