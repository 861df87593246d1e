//! The partitioned log: one trait, backends chosen by URL.
//!
//! - `file://DIR` (default): the embedded backend in [`embedded`]: segment files per partition
//!   with a sparse index, group commit, torn-tail recovery, and `sled` for small mutable state.
//! - `kafka://host:port,...`: Apache Kafka in [`kafka`], through `rdkafka`.
//!
//! Besides records the trait stores the small mutable state of consumer groups (cursors and
//! quarantined keys), because on Kafka that state lives in Kafka too: a bus node keeps none.
//! The generic conformance suite in [`conformance`] runs against every backend.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::audit::chain::ChainHash;
use crate::audit::checkpoint::Checkpoint;
use crate::{Error, Result};

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
pub mod embedded;
#[cfg(test)]
pub mod fault;
pub mod kafka;

/// A record to append. The log assigns partition (from the key) and offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    /// Unique id: appending a record again (same id, same key, as a retry does) within the dedup
    /// window stores nothing and returns the first one's position.
    pub id: String,
    /// Partitioning and ordering key.
    pub key: Bytes,
    /// Milliseconds since the epoch.
    pub timestamp_ms: i64,
    /// The payload (an encoded envelope, for the bus).
    pub value: Bytes,
}

/// A record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Partition it is stored in.
    pub partition: u32,
    /// Its offset in the partition.
    pub offset: u64,
    /// Milliseconds since the epoch (as appended).
    pub timestamp_ms: i64,
    /// Unique id.
    pub id: String,
    /// Key.
    pub key: Bytes,
    /// Payload.
    pub value: Bytes,
    /// Its hash chain value where the backend stores one with the record (embedded); None
    /// where it is computed on demand (Kafka, see [`crate::audit`]).
    pub chain: Option<crate::audit::chain::ChainHash>,
}

/// Where an appended record is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Appended {
    /// Partition.
    pub partition: u32,
    /// Offset.
    pub offset: u64,
    /// True when the id was already stored: nothing was appended.
    pub duplicate: bool,
}

/// Settings of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// Fixed number of partitions.
    pub partitions: u32,
    /// Delete whole segments older than this (milliseconds); 0 keeps everything.
    #[serde(default)]
    pub retention_ms: u64,
    /// Keep at most about this many bytes per partition; 0 is unlimited.
    #[serde(default)]
    pub retention_bytes: u64,
}

/// A topic with its per-partition offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// Name.
    pub name: String,
    /// Settings.
    pub config: TopicConfig,
    /// Offsets of each partition, index = partition.
    pub partitions: Vec<PartitionOffsets>,
}

/// The stored range of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartitionOffsets {
    /// First stored offset (log start; grows with retention).
    pub start: u64,
    /// The offset of the next record (high watermark): everything below is durable.
    pub end: u64,
}

/// The persisted position of a consumer group in one partition.
///
/// `committed` is the lowest unacknowledged offset. Offsets at or above `scanned` were never
/// handed out; below it, only those in `unacked` still need delivery. So a restart redelivers
/// exactly what was not acknowledged, and never skips.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    /// Lowest unacknowledged offset.
    pub committed: u64,
    /// First offset never read by the group.
    pub scanned: u64,
    /// Unacknowledged offsets in `[committed, scanned)`, ascending.
    pub unacked: Vec<u64>,
    /// Deliveries made so far of unacknowledged offsets that were delivered: (offset, attempts).
    /// Kept so that `max_attempts` holds across restarts (a poison event that crashes its
    /// consumer and the bus alike still ends in the dead-letter topic).
    #[serde(default)]
    pub attempts: Vec<(u64, u32)>,
}

/// Settings a group's subscribers gave it; unset fields use the server defaults. Stored, so a
/// restarted bus keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GroupConfig {
    /// Ack deadline in milliseconds.
    pub ack_deadline_ms: Option<u32>,
    /// Failed deliveries before dead-lettering.
    pub max_attempts: Option<u32>,
    /// First redelivery backoff in milliseconds.
    pub min_backoff_ms: Option<u32>,
    /// Longest redelivery backoff in milliseconds.
    pub max_backoff_ms: Option<u32>,
}

impl GroupConfig {
    /// This configuration with the set fields of `newer` taking precedence.
    pub fn merged(self, newer: GroupConfig) -> GroupConfig {
        GroupConfig {
            ack_deadline_ms: newer.ack_deadline_ms.or(self.ack_deadline_ms),
            max_attempts: newer.max_attempts.or(self.max_attempts),
            min_backoff_ms: newer.min_backoff_ms.or(self.min_backoff_ms),
            max_backoff_ms: newer.max_backoff_ms.or(self.max_backoff_ms),
        }
    }
}

/// A key whose event went to the dead-letter topic; its later events wait.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// The key (case).
    pub key: Vec<u8>,
    /// Partition of the dead-lettered event.
    pub partition: u32,
    /// Offset of the dead-lettered event.
    pub offset: u64,
    /// Id of the dead-lettered event.
    pub event_id: String,
    /// Delivery attempts made.
    pub attempts: u32,
    /// When it was quarantined (ms since epoch).
    pub since_ms: i64,
}

/// The partitions of a shared group this node serves, as of one rebalance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assignment {
    /// Grows with every change.
    pub generation: u64,
    /// Partitions this node serves.
    pub partitions: std::collections::BTreeSet<u32>,
}

/// This node's membership in a consumer group that several bus nodes share (Kafka's group
/// protocol): which partitions it serves, changing as nodes come and go. Leaves when dropped.
pub struct Membership {
    /// The current assignment.
    pub assignment: watch::Receiver<Assignment>,
    /// Called with a generation once every partition taken away up to it is released (its
    /// position stored, its deliveries dropped): only then may another node take it over.
    confirm: Box<dyn Fn(u64) + Send + Sync>,
    /// Leaves the group when dropped.
    _leave: Box<dyn Send + Sync>,
}

impl Membership {
    /// A membership from its parts (for backends).
    pub fn new(assignment: watch::Receiver<Assignment>, confirm: Box<dyn Fn(u64) + Send + Sync>, leave: Box<dyn Send + Sync>) -> Self {
        Membership { assignment, confirm, _leave: leave }
    }

    /// Confirms that partitions revoked up to `generation` are released.
    pub fn confirm(&self, generation: u64) {
        (self.confirm)(generation)
    }
}

/// The partitioned log: records, plus the small mutable state of consumer groups.
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// Creates a topic. Fails with [`Error::TopicExists`] if it exists (whatever its settings).
    async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<TopicInfo>;
    /// Changes a topic's retention (0 keeps everything); its partitions stay. What a later
    /// [`Log::apply_retention`] deletes follows the new setting.
    async fn set_retention(&self, name: &str, retention_ms: u64, retention_bytes: u64) -> Result<TopicInfo>;
    /// All topics, sorted by name.
    async fn list_topics(&self) -> Result<Vec<TopicInfo>>;
    /// One topic.
    async fn describe_topic(&self, name: &str) -> Result<TopicInfo>;
    /// A topic's partition count ([`Error::UnknownTopic`] when it does not exist): what a publish
    /// checks, so backends where [`Log::describe_topic`] asks a remote for every partition's
    /// offsets (Kafka) answer it from what they know.
    async fn partition_count(&self, name: &str) -> Result<u32> {
        Ok(self.describe_topic(name).await?.config.partitions)
    }
    /// Appends records (partition chosen by [`crate::partitioner`]) and returns only when they
    /// are durable. Results are in input order.
    async fn append(&self, topic: &str, records: Vec<NewRecord>) -> Result<Vec<Appended>>;
    /// Reads up to `max_records` records (and about `max_bytes`) from `from`, up to the high
    /// watermark. Starting below the log start yields records from the log start.
    async fn read(&self, topic: &str, partition: u32, from: u64, max_records: usize, max_bytes: usize) -> Result<Vec<StoredRecord>>;
    /// [`Log::read`] for records the caller drops soon (it routes or converts them at once):
    /// a backend may hand out its cached buffers instead of copies, which would keep those
    /// buffers alive as long as a record is kept.
    async fn read_transient(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>> {
        self.read(topic, partition, from, max_records, max_bytes).await
    }
    /// Whether `topic` is known to keep every record (no retention), so that a record of it
    /// may be referenced instead of copied.
    async fn keeps_everything(&self, topic: &str) -> Result<bool> {
        let config = self.describe_topic(topic).await?.config;
        Ok(config.retention_ms == 0 && config.retention_bytes == 0)
    }
    /// The stored range of a partition.
    async fn offsets(&self, topic: &str, partition: u32) -> Result<PartitionOffsets>;
    /// The first offset whose record has a timestamp at or after `timestamp_ms` (the end if none).
    async fn offset_for_time(&self, topic: &str, partition: u32, timestamp_ms: i64) -> Result<u64>;
    /// A watch of the partition's high watermark, changed after each durable append.
    fn watch_end(&self, topic: &str, partition: u32) -> Result<watch::Receiver<u64>>;
    /// Deletes whole segments past their topic's retention; returns how many.
    async fn apply_retention(&self) -> Result<usize>;

    /// Loads a group's cursor for one partition.
    async fn load_cursor(&self, topic: &str, group: &str, partition: u32) -> Result<Option<Cursor>>;
    /// Stores cursors of a group (atomically for the batch).
    async fn store_cursors(&self, topic: &str, group: &str, cursors: &[(u32, Cursor)]) -> Result<()>;
    /// Stores a group's configuration.
    async fn store_group_config(&self, topic: &str, group: &str, config: &GroupConfig) -> Result<()>;
    /// Loads a group's configuration.
    async fn load_group_config(&self, topic: &str, group: &str) -> Result<Option<GroupConfig>>;
    /// All (topic, group) pairs with stored cursors.
    async fn list_groups(&self) -> Result<Vec<(String, String)>>;
    /// Records (or replaces) a quarantined key.
    async fn put_quarantine(&self, topic: &str, group: &str, entry: &Quarantine) -> Result<()>;
    /// Removes a quarantined key; returns it if it was there.
    async fn remove_quarantine(&self, topic: &str, group: &str, key: &[u8]) -> Result<Option<Quarantine>>;
    /// All quarantined keys of a group.
    async fn list_quarantine(&self, topic: &str, group: &str) -> Result<Vec<Quarantine>>;

    /// Whether several bus nodes may serve a consumer group of `topic` on this storage (Kafka);
    /// then a group serves only the partitions [`Log::join_group`] assigns to this node.
    fn shares_groups(&self, topic: &str) -> bool {
        let _ = topic;
        false
    }
    /// Joins the group for this node; None where groups are not shared (every partition is
    /// this node's).
    async fn join_group(&self, topic: &str, group: &str) -> Result<Option<Membership>> {
        let _ = (topic, group);
        Ok(None)
    }

    /// Stores a blob (the verified local file at `path`) where every node can read it; where
    /// each node has the whole storage (embedded), the local blob store already is that place
    /// and nothing needs doing. Idempotent; returns once the blob is durable.
    async fn put_blob(&self, sha256: &str, size: u64, path: &std::path::Path) -> Result<()> {
        let _ = (sha256, size, path);
        Ok(())
    }
    /// The size of a blob stored with [`Log::put_blob`]; None when it is not stored.
    async fn blob_size(&self, sha256: &str) -> Result<Option<u64>> {
        let _ = sha256;
        Ok(None)
    }
    /// Hands a blob stored with [`Log::put_blob`] to `sink` chunk by chunk; false when it is
    /// not stored.
    async fn read_blob(&self, sha256: &str, sink: &mut (dyn for<'c> FnMut(&'c [u8]) -> Result<()> + Send)) -> Result<bool> {
        let _ = (sha256, sink);
        Ok(false)
    }
    /// Lets each participant read the blob paired with it, `(sha256, participant)`; durable
    /// when it returns (the router grants before it stores the deliveries that carry a blob).
    async fn grant_blobs(&self, grants: &[(String, String)]) -> Result<()>;
    /// Whether `participant` was granted blob `sha256` (see [`Log::grant_blobs`]).
    async fn blob_granted(&self, sha256: &str, participant: &str) -> Result<bool>;

    /// The hash chain value before `offset` where the backend stores the chain with its
    /// records (embedded); None where it must be computed ([`crate::audit::Chains`]).
    async fn stored_chain_before(&self, topic: &str, partition: u32, offset: u64) -> Result<Option<ChainHash>> {
        let _ = (topic, partition, offset);
        Ok(None)
    }
    /// Stores a signed checkpoint durably (embedded: beside the partition; Kafka: in the
    /// checkpoint topic).
    async fn put_checkpoint(&self, checkpoint: &Checkpoint) -> Result<()>;
    /// The checkpoints of a partition, ascending by offset.
    async fn list_checkpoints(&self, topic: &str, partition: u32) -> Result<Vec<Checkpoint>>;

    /// Finishes queued appends, stops accepting new ones and flushes state. Called on shutdown;
    /// afterwards the same storage may be opened again.
    async fn close(&self) -> Result<()>;
}

/// Most partitions a topic may have, on every backend.
pub const MAX_PARTITIONS: u32 = 1024;

/// Checks the name and settings of a topic to create (the same rules on every backend).
pub fn check_new_topic(name: &str, config: &TopicConfig) -> Result<()> {
    crate::event::validate_name("topic", name)?;
    if config.partitions == 0 || config.partitions > MAX_PARTITIONS {
        return Err(Error::invalid("partitions", format!("must be between 1 and {MAX_PARTITIONS}, not {}", config.partitions)));
    }
    Ok(())
}

/// Opens the backend a URL names: `file://DIR` (embedded) or `kafka://host:port,...`.
pub async fn open(url: &str, settings: &crate::config::LogSettings, kafka_settings: &kafka::KafkaSettings) -> Result<Arc<dyn Log>> {
    if let Some(dir) = url.strip_prefix("file://") {
        let log = embedded::EmbeddedLog::open(dir.as_ref(), settings.clone()).await?;
        Ok(Arc::new(log))
    } else if let Some(brokers) = url.strip_prefix("kafka://") {
        let log = kafka::KafkaLog::open(brokers.trim_end_matches('/'), settings.clone(), kafka_settings.clone()).await?;
        Ok(Arc::new(log))
    } else {
        Err(Error::invalid("log", format!("unsupported log URL {url:?}: expected file://DIR or kafka://host:port")))
    }
}
