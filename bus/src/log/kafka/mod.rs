//! The Apache Kafka backend (`kafka://host:port,...`), through `rdkafka` (librdkafka).
//!
//! Everything lives in Kafka, so a bus node keeps no state of its own:
//! - every bus topic is a Kafka topic of the same name (after [`KafkaSettings::topic_prefix`])
//!   and the same partition count; records carry their event id in the header `justizbus.id`,
//!   their key and timestamp as Kafka key and CreateTime. The partition is chosen by the bus
//!   with the same murmur2 partitioner as Kafka's default one, so a key lands in the same
//!   partition as on the embedded backend and as for any Kafka producer;
//! - consumer group cursors, group settings, quarantined keys and topic settings are entries of
//!   a compacted state topic (see [`state`]);
//! - retention is Kafka's own (`retention.ms`, `retention.bytes` set at creation).
//!
//! Appends go through one writer task per topic: concurrent appends are sent together by the
//! idempotent producer (`acks=all`), and each returns once Kafka's delivery reports give the
//! offsets. Idempotent publish by event id: before a batch is sent, the writer brings its window
//! of recent ids up to the partition's current end (reading what other nodes appended), so a
//! client retrying on another node is still answered with the first record's position.

mod membership;
mod reader;
mod state;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    Appended, Cursor, GroupConfig, Log, Membership, NewRecord, PartitionOffsets, Quarantine, StoredRecord, TopicConfig, TopicInfo,
};
use crate::audit::checkpoint::Checkpoint;
use crate::config::LogSettings;
use crate::event::{now_ms, validate_name};
use crate::partitioner::partition_for_key;
use crate::{Error, Result};

use reader::Readers;
use state::StateTopic;

/// Header holding a record's event id.
pub const ID_HEADER: &str = "justizbus.id";

/// Settings of the Kafka backend (`[kafka]` in the config file).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Prepended to every Kafka topic name, so several buses (or test runs) can share a cluster.
    pub topic_prefix: String,
    /// Replication factor of topics the bus creates (3 on a production cluster).
    pub replication_factor: i32,
    /// Timeout of one Kafka request (metadata, offsets, topic creation, a delivery report).
    pub request_timeout_ms: u64,
    /// How often the high watermarks of watched partitions are polled (appends of this node
    /// wake watchers at once; appends of other nodes are seen within this interval).
    pub watch_interval_ms: u64,
    /// A node that stops heartbeating (killed) loses its share of a consumer group after this
    /// long (Kafka's `session.timeout.ms`; brokers allow 6000 and more by default).
    pub session_timeout_ms: u64,
    /// When a node first appends to a partition, it reads the ids of this many of its latest
    /// records (at most `log_settings.dedup_max_ids`): an event id is recognised as a
    /// duplicate across node restarts and between nodes within that many records.
    pub dedup_reload_records: usize,
    /// Raw librdkafka options for every client (producer, consumers, admin), e.g.
    /// `"security.protocol" = "ssl"`; they override the bus's own choices.
    pub options: BTreeMap<String, String>,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        KafkaSettings {
            topic_prefix: String::new(),
            replication_factor: 1,
            request_timeout_ms: 30_000,
            watch_interval_ms: 50,
            dedup_reload_records: 100_000,
            session_timeout_ms: 6_000,
            options: BTreeMap::new(),
        }
    }
}

/// Maps a librdkafka error to the bus error: the broker's answers that concern the request
/// keep their meaning, everything else is a retryable "unavailable".
fn kafka_error(context: &str, e: KafkaError) -> Error {
    Error::Unavailable(format!("Kafka: {context}: {e}"))
}

/// A consumer error that reports a lost connection (librdkafka reconnects by itself and queues
/// such reports, so they may arrive well after the connection is back): not a read failure.
fn transient(e: &KafkaError) -> bool {
    matches!(
        e,
        KafkaError::MessageConsumption(
            RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure | RDKafkaErrorCode::NetworkException
        )
    )
}

/// How long a read waits for records the high watermark promised before it fails (and the
/// caller retries): short, so a group actor never stalls long on an unreachable broker.
const READ_WAIT: Duration = Duration::from_secs(5);

/// The Kafka backend.
pub struct KafkaLog {
    inner: Arc<Inner>,
    /// Watch poller; stops when the log is dropped or closed.
    poller: SyncMutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Inner {
    /// Signed hash chain checkpoints, keyed topic/partition/offset (a topic of their own).
    checkpoints: StateTopic,
    settings: KafkaSettings,
    log_settings: LogSettings,
    /// Settings every client starts from.
    client_config: ClientConfig,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    readers: Readers,
    state: StateTopic,
    /// Partition counts of known topics (a Kafka topic's partition count only grows, and the bus
    /// never grows it).
    partitions: SyncMutex<HashMap<String, u32>>,
    /// One writer task per topic.
    writers: SyncMutex<HashMap<String, mpsc::Sender<AppendRequest>>>,
    /// High-watermark watches.
    watches: SyncMutex<HashMap<(String, u32), watch::Sender<u64>>>,
    timeout: Duration,
}

struct AppendRequest {
    records: Vec<NewRecord>,
    reply: oneshot::Sender<Result<Vec<Appended>>>,
}

/// Where a blob's chunks are in the blobs topic.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredBlob {
    size: u64,
    /// Offsets of its chunks in partition 0, in content order.
    chunks: Vec<u64>,
}

/// Chunk size of blobs in Kafka (well below the default `message.max.bytes` of 1 MB).
const BLOB_CHUNK: usize = 512 * 1024;

/// What the bus stores about a topic beyond what Kafka's metadata says.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct StoredTopic {
    config: TopicConfig,
}

impl KafkaLog {
    /// Connects to the cluster named by `bootstrap` (`host:port,...`), creating the state topic
    /// if it is missing and reading it.
    pub async fn open(bootstrap: &str, log_settings: LogSettings, settings: KafkaSettings) -> Result<KafkaLog> {
        if bootstrap.is_empty() {
            return Err(Error::invalid("log", "kafka:// needs at least one broker: kafka://host:port[,host:port...]"));
        }
        let timeout = Duration::from_millis(settings.request_timeout_ms.max(100));
        let mut base = ClientConfig::new();
        base.set("bootstrap.servers", bootstrap)
            .set("socket.timeout.ms", timeout.as_millis().to_string())
            .set("allow.auto.create.topics", "false");
        for (k, v) in &settings.options {
            base.set(k, v);
        }
        let mut producer_config = base.clone();
        producer_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.max.bytes", (log_settings.max_event_bytes + 64 * 1024).to_string())
            .set("message.timeout.ms", timeout.as_millis().to_string());
        for (k, v) in &settings.options {
            producer_config.set(k, v);
        }
        let producer: FutureProducer = producer_config.create().map_err(|e| kafka_error("creating the producer", e))?;
        let admin: AdminClient<DefaultClientContext> = base.create().map_err(|e| kafka_error("creating the admin client", e))?;
        let readers = Readers::new(base.clone(), log_settings.max_event_bytes);
        let state_base = base.clone();
        let state_name = format!("{}__justizbus_state", settings.topic_prefix);
        let checkpoints_name = format!("{}__justizbus_checkpoints", settings.topic_prefix);
        let inner = Inner {
            checkpoints: StateTopic::new(checkpoints_name, state_base.clone(), producer.clone(), timeout),
            state: StateTopic::new(state_name, state_base, producer.clone(), timeout),
            settings,
            log_settings,
            client_config: base,
            producer,
            admin,
            readers,
            partitions: SyncMutex::new(HashMap::new()),
            writers: SyncMutex::new(HashMap::new()),
            watches: SyncMutex::new(HashMap::new()),
            timeout,
        };
        let inner = Arc::new(inner);
        inner.ensure_state_topic().await?;
        inner.state.sync().await?;
        tracing::info!(brokers = bootstrap, prefix = %inner.settings.topic_prefix, "Kafka log opened");
        let poller = tokio::spawn(poll_watches(Arc::downgrade(&inner)));
        Ok(KafkaLog { inner, poller: SyncMutex::new(Some(poller)) })
    }
}

impl Drop for KafkaLog {
    fn drop(&mut self) {
        if let Some(p) = self.poller.lock().unwrap_or_else(|e| e.into_inner()).take() {
            p.abort();
        }
    }
}

/// Runs a blocking librdkafka call on the blocking pool.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::Internal(format!("blocking Kafka call: {e}")))
}

impl Inner {
    fn kafka_name(&self, topic: &str) -> String {
        format!("{}{}", self.settings.topic_prefix, topic)
    }

    /// The broker settings of a bus topic (retention 0 is Kafka's -1, keep everything).
    fn topic_settings(&self, config: &TopicConfig) -> [(&'static str, String); 3] {
        let unlimited = |v: u64| if v == 0 { "-1".to_string() } else { v.to_string() };
        [
            ("retention.ms", unlimited(config.retention_ms)),
            ("retention.bytes", unlimited(config.retention_bytes)),
            ("max.message.bytes", (self.log_settings.max_event_bytes + 64 * 1024).to_string()),
        ]
    }

    async fn ensure_state_topic(&self) -> Result<()> {
        let name = self.state.topic().to_string();
        self.ensure_internal_topic(&name, "compact").await?;
        // Checkpoints are kept, never compacted: each has a key of its own.
        let name = self.checkpoints.topic().to_string();
        self.ensure_internal_topic(&name, "delete").await
    }

    fn blobs_topic(&self) -> String {
        format!("{}__justizbus_blobs", self.settings.topic_prefix)
    }

    /// Creates a one-partition topic of the bus's own unless it exists.
    async fn ensure_internal_topic(&self, name: &str, cleanup: &str) -> Result<()> {
        if self.fetch_partitions(name).await?.is_some() {
            return Ok(());
        }
        let topic = NewTopic::new(name, 1, TopicReplication::Fixed(self.settings.replication_factor))
            .set("cleanup.policy", cleanup)
            .set("retention.ms", "-1");
        match self.create(&topic).await {
            Ok(()) | Err(Error::TopicExists { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn create(&self, topic: &NewTopic<'_>) -> Result<()> {
        let options = AdminOptions::new().operation_timeout(Some(self.timeout)).request_timeout(Some(self.timeout));
        let results = self.admin.create_topics([topic], &options).await.map_err(|e| kafka_error("creating a topic", e))?;
        for result in results {
            match result {
                Ok(_) => {}
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    let partitions = self.fetch_partitions(&name).await?.unwrap_or(0);
                    return Err(Error::TopicExists { name, partitions });
                }
                Err((name, code)) => return Err(Error::Unavailable(format!("Kafka refused to create topic {name:?}: {code}"))),
            }
        }
        // Metadata reaches every broker a little after creation: wait until it is visible.
        let name = topic.name.to_string();
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            if self.fetch_partitions(&name).await?.is_some() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Unavailable(format!("Kafka: topic {name:?} created but not visible in metadata")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Partition count of a Kafka topic from the cluster's metadata; None when it does not exist.
    async fn fetch_partitions(&self, kafka_name: &str) -> Result<Option<u32>> {
        let producer = self.producer.clone();
        let name = kafka_name.to_string();
        let timeout = self.timeout;
        let metadata =
            blocking(move || producer.client().fetch_metadata(Some(&name), timeout)).await?.map_err(|e| kafka_error("metadata", e))?;
        Ok(metadata.topics().iter().find(|t| t.name() == kafka_name).and_then(|t| {
            let missing = matches!(t.error(), Some(e) if e == rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART);
            (!missing && !t.partitions().is_empty()).then_some(t.partitions().len() as u32)
        }))
    }

    /// Partition count of a bus topic (cached).
    async fn partitions(&self, topic: &str) -> Result<u32> {
        if let Some(p) = self.partitions.lock().unwrap_or_else(|e| e.into_inner()).get(topic) {
            return Ok(*p);
        }
        match self.fetch_partitions(&self.kafka_name(topic)).await? {
            Some(p) => {
                self.partitions.lock().unwrap_or_else(|e| e.into_inner()).insert(topic.to_string(), p);
                Ok(p)
            }
            None => Err(Error::UnknownTopic(topic.to_string())),
        }
    }

    async fn check_partition(&self, topic: &str, partition: u32) -> Result<()> {
        let partitions = self.partitions(topic).await?;
        if partition >= partitions {
            return Err(Error::UnknownPartition { topic: topic.to_string(), partition, partitions });
        }
        Ok(())
    }

    async fn watermarks(&self, topic: &str, partition: u32) -> Result<PartitionOffsets> {
        let producer = self.producer.clone();
        let name = self.kafka_name(topic);
        let timeout = self.timeout;
        let (low, high) = blocking(move || producer.client().fetch_watermarks(&name, partition as i32, timeout))
            .await?
            .map_err(|e| kafka_error("reading offsets", e))?;
        Ok(PartitionOffsets { start: low.max(0) as u64, end: high.max(0) as u64 })
    }

    async fn info(&self, topic: &str) -> Result<TopicInfo> {
        let partitions = self.partitions(topic).await?;
        let config = match self.state.get(&state::topic_key(topic)).await? {
            Some(bytes) => serde_json::from_slice::<StoredTopic>(&bytes).map(|s| s.config).unwrap_or(TopicConfig {
                partitions,
                retention_ms: 0,
                retention_bytes: 0,
            }),
            None => TopicConfig { partitions, retention_ms: 0, retention_bytes: 0 },
        };
        let mut offsets = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            offsets.push(self.watermarks(topic, p).await?);
        }
        Ok(TopicInfo { name: topic.to_string(), config: TopicConfig { partitions, ..config }, partitions: offsets })
    }

    /// Moves a partition's watch forward (never back).
    fn advance_watch(&self, topic: &str, partition: u32, end: u64) {
        let watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = watches.get(&(topic.to_string(), partition)) {
            tx.send_if_modified(|v| {
                let moved = end > *v;
                if moved {
                    *v = end;
                }
                moved
            });
        }
    }

    fn writer(self: &Arc<Self>, topic: &str, partitions: u32) -> mpsc::Sender<AppendRequest> {
        let mut writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = writers.get(topic) {
            if !tx.is_closed() {
                return tx.clone();
            }
        }
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(write_loop(Arc::downgrade(self), topic.to_string(), partitions, rx));
        writers.insert(topic.to_string(), tx.clone());
        tx
    }
}

/// Recent event ids of one partition, for idempotent publish.
struct IdWindow {
    ids: HashMap<String, u64>,
    /// (offset, id, time seen), oldest first.
    order: VecDeque<(u64, String, i64)>,
    /// Every record below this offset has been looked at.
    indexed_to: u64,
}

impl IdWindow {
    fn insert(&mut self, offset: u64, id: String, max_ids: usize, window_ms: i64, now: i64) {
        self.ids.insert(id.clone(), offset);
        self.order.push_back((offset, id, now));
        while self.order.len() > max_ids || self.order.front().is_some_and(|(_, _, t)| now - *t > window_ms) {
            if let Some((off, old, _)) = self.order.pop_front() {
                if self.ids.get(&old) == Some(&off) {
                    self.ids.remove(&old);
                }
            }
        }
    }
}

/// The writer of one topic: takes every queued append, deduplicates, sends, waits for the
/// delivery reports, answers; in order, so offsets of one partition follow the calls' order.
async fn write_loop(inner: std::sync::Weak<Inner>, topic: String, partitions: u32, mut rx: mpsc::Receiver<AppendRequest>) {
    let mut windows: HashMap<u32, IdWindow> = HashMap::new();
    while let Some(first) = rx.recv().await {
        let mut requests = vec![first];
        while let Ok(more) = rx.try_recv() {
            requests.push(more);
            if requests.len() >= 256 {
                break;
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        let result = write_batch(&inner, &topic, partitions, &mut windows, &requests).await;
        match result {
            Ok(mut per_request) => {
                for request in requests.into_iter().rev() {
                    let mine = per_request.pop().unwrap_or_default();
                    let _ = request.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                // What was sent may be partly stored: forget the windows, they are rebuilt from Kafka.
                windows.clear();
                // Every waiting append gets the same retryable error.
                let message = match e {
                    Error::Unavailable(m) => m,
                    other => other.to_string(),
                };
                for request in requests {
                    let _ = request.reply.send(Err(Error::Unavailable(message.clone())));
                }
            }
        }
    }
}

async fn write_batch(
    inner: &Arc<Inner>,
    topic: &str,
    partitions: u32,
    windows: &mut HashMap<u32, IdWindow>,
    requests: &[AppendRequest],
) -> Result<Vec<Vec<Appended>>> {
    let dedup = inner.log_settings.dedup_window_ms > 0 && inner.log_settings.dedup_max_ids > 0;
    let window_ms = inner.log_settings.dedup_window_ms.min(i64::MAX as u64) as i64;
    let max_ids = inner.log_settings.dedup_max_ids;
    let kafka_topic = inner.kafka_name(topic);
    // Bring the windows of the touched partitions up to the partitions' current ends.
    if dedup {
        let mut touched: Vec<u32> =
            requests.iter().flat_map(|r| r.records.iter().map(|rec| partition_for_key(&rec.key, partitions))).collect();
        touched.sort_unstable();
        touched.dedup();
        for p in touched {
            let end = inner.watermarks(topic, p).await?;
            let window = match windows.entry(p) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    // Record timestamps are the events' own, not append times, so the window
                    // starts by count: the last `dedup_reload_records` records.
                    let reload = inner.settings.dedup_reload_records.min(max_ids) as u64;
                    let from = end.start.max(end.end.saturating_sub(reload));
                    v.insert(IdWindow { ids: HashMap::new(), order: VecDeque::new(), indexed_to: from })
                }
            };
            while window.indexed_to < end.end {
                let records = inner.readers.read(&kafka_topic, p, window.indexed_to, 10_000, 16 << 20, inner.timeout).await?;
                let Some(last) = records.last().map(|r| r.offset) else { break };
                let now = now_ms();
                for r in records {
                    window.insert(r.offset, r.id, max_ids, window_ms, now);
                }
                window.indexed_to = last + 1;
            }
        }
    }
    // Decide per record: duplicate of a stored one, duplicate of an earlier one in this batch, or new.
    enum Slot {
        /// Stored before: its first position.
        Stored(Appended),
        /// Sent now, as send number n.
        Sent(usize),
        /// The same id as send number n earlier in this batch.
        Repeat(usize),
    }
    let mut slots: Vec<Vec<Slot>> = Vec::with_capacity(requests.len());
    let mut batch_ids: HashMap<(u32, &str), usize> = HashMap::new();
    let mut futures = Vec::new();
    let mut sent: Vec<(u32, &str)> = Vec::new();
    for request in requests {
        let mut mine = Vec::with_capacity(request.records.len());
        for rec in &request.records {
            let p = partition_for_key(&rec.key, partitions);
            if dedup {
                if let Some(&offset) = windows.get(&p).and_then(|w| w.ids.get(&rec.id)) {
                    mine.push(Slot::Stored(Appended { partition: p, offset, duplicate: true }));
                    continue;
                }
                if let Some(&i) = batch_ids.get(&(p, rec.id.as_str())) {
                    mine.push(Slot::Repeat(i));
                    continue;
                }
            }
            let headers = OwnedHeaders::new_with_capacity(1).insert(Header { key: ID_HEADER, value: Some(rec.id.as_bytes()) });
            let mut record = FutureRecord::to(&kafka_topic)
                .partition(p as i32)
                .key(rec.key.as_ref())
                .payload(rec.value.as_ref())
                .timestamp(rec.timestamp_ms)
                .headers(headers);
            let future = loop {
                match inner.producer.send_result(record) {
                    Ok(f) => break f,
                    // The producer's queue is full: wait for deliveries to drain it.
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(kafka_error("sending", e)),
                }
            };
            batch_ids.insert((p, rec.id.as_str()), futures.len());
            mine.push(Slot::Sent(futures.len()));
            futures.push(future);
            sent.push((p, rec.id.as_str()));
        }
        slots.push(mine);
    }
    // Wait for every delivery report, in order.
    let mut stored: Vec<Appended> = Vec::with_capacity(futures.len());
    let mut first_error = None;
    for (future, (p, _)) in futures.into_iter().zip(&sent) {
        match future.await {
            Ok(Ok(delivery)) => {
                stored.push(Appended { partition: delivery.partition as u32, offset: delivery.offset as u64, duplicate: false })
            }
            Ok(Err((e, _))) => {
                first_error.get_or_insert(kafka_error("delivery", e));
                stored.push(Appended { partition: *p, offset: u64::MAX, duplicate: false });
            }
            Err(_) => {
                first_error.get_or_insert(Error::Unavailable("Kafka producer stopped".into()));
                stored.push(Appended { partition: *p, offset: u64::MAX, duplicate: false });
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    // Remember the new ids; a window only moves past records it saw.
    let now = now_ms();
    let mut ends: BTreeMap<u32, u64> = BTreeMap::new();
    for (a, (p, id)) in stored.iter().zip(&sent) {
        if dedup {
            if let Some(w) = windows.get_mut(p) {
                if a.offset == w.indexed_to {
                    w.indexed_to += 1;
                }
                w.insert(a.offset, id.to_string(), max_ids, window_ms, now);
            }
        }
        let e = ends.entry(*p).or_default();
        *e = (*e).max(a.offset + 1);
    }
    for (p, end) in ends {
        inner.advance_watch(topic, p, end);
    }
    Ok(slots
        .into_iter()
        .map(|mine| {
            mine.into_iter()
                .map(|slot| match slot {
                    Slot::Stored(a) => a,
                    Slot::Repeat(i) => Appended { duplicate: true, ..stored[i] },
                    Slot::Sent(i) => stored[i],
                })
                .collect()
        })
        .collect())
}

impl Inner {
    async fn offset_for_time(&self, topic: &str, partition: u32, timestamp_ms: i64) -> Result<u64> {
        let kafka_topic = self.kafka_name(topic);
        let found = self.readers.offset_for_time(&kafka_topic, partition, timestamp_ms, self.timeout).await?;
        // Kafka answers "none" for a time after the last record; tansu 0.6 answers offset 0
        // instead. So the answer is checked: the record there must be at or after the time.
        if let Some(offset) = found {
            let at = self.readers.read(&kafka_topic, partition, offset, 1, 1, self.timeout).await?;
            if at.first().is_some_and(|r| r.offset == offset && r.timestamp_ms >= timestamp_ms) {
                return Ok(offset);
            }
        }
        Ok(self.watermarks(topic, partition).await?.end)
    }
}

/// Polls the high watermarks of watched partitions, so appends of other nodes wake watchers.
async fn poll_watches(inner: std::sync::Weak<Inner>) {
    loop {
        let (interval, watched) = {
            let Some(inner) = inner.upgrade() else { return };
            let mut watches = inner.watches.lock().unwrap_or_else(|e| e.into_inner());
            watches.retain(|_, tx| tx.receiver_count() > 0);
            (Duration::from_millis(inner.settings.watch_interval_ms.max(5)), watches.keys().cloned().collect::<Vec<_>>())
        };
        tokio::time::sleep(interval).await;
        let Some(inner) = inner.upgrade() else { return };
        for (topic, partition) in watched {
            match inner.watermarks(&topic, partition).await {
                Ok(offsets) => inner.advance_watch(&topic, partition, offsets.end),
                Err(e) => tracing::debug!(topic, partition, error = %e, "polling a high watermark failed"),
            }
        }
    }
}

#[async_trait]
impl Log for KafkaLog {
    async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<TopicInfo> {
        super::check_new_topic(name, &config)?;
        let inner = &self.inner;
        let kafka_name = inner.kafka_name(name);
        if let Some(partitions) = inner.fetch_partitions(&kafka_name).await? {
            return Err(Error::TopicExists { name: name.to_string(), partitions });
        }
        let settings = inner.topic_settings(&config);
        let replication = TopicReplication::Fixed(inner.settings.replication_factor);
        let topic = settings.iter().fold(NewTopic::new(&kafka_name, config.partitions as i32, replication), |t, (k, v)| t.set(k, v));
        match inner.create(&topic).await {
            Ok(()) => {}
            Err(Error::TopicExists { partitions, .. }) => return Err(Error::TopicExists { name: name.to_string(), partitions }),
            Err(e) => return Err(e),
        }
        inner
            .state
            .put(state::topic_key(name), Some(serde_json::to_vec(&StoredTopic { config }).map_err(|e| Error::Internal(e.to_string()))?))
            .await?;
        tracing::info!(topic = name, kafka_topic = %kafka_name, partitions = config.partitions, "topic created");
        inner.partitions.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), config.partitions);
        inner.info(name).await
    }

    async fn set_retention(&self, name: &str, retention_ms: u64, retention_bytes: u64) -> Result<TopicInfo> {
        let inner = &self.inner;
        let kafka_name = inner.kafka_name(name);
        let partitions = inner.fetch_partitions(&kafka_name).await?.ok_or_else(|| Error::UnknownTopic(name.to_string()))?;
        let config = TopicConfig { partitions, retention_ms, retention_bytes };
        // AlterConfigs replaces a topic's whole configuration: set all the bus sets at creation.
        let settings = inner.topic_settings(&config);
        let alter = settings.iter().fold(AlterConfig::new(ResourceSpecifier::Topic(&kafka_name)), |a, (k, v)| a.set(k, v));
        let options = AdminOptions::new().operation_timeout(Some(inner.timeout)).request_timeout(Some(inner.timeout));
        let results = inner.admin.alter_configs([&alter], &options).await.map_err(|e| match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::UnsupportedFeature) => Error::Unavailable(format!(
                "the Kafka broker cannot change topic settings (no AlterConfigs): set retention.ms / retention.bytes of {kafka_name:?} there"
            )),
            _ => kafka_error("changing a topic's retention", e),
        })?;
        if let Some(Err((_, code))) = results.into_iter().find(|r| r.is_err()) {
            return Err(Error::Unavailable(format!("Kafka refused to change the retention of topic {kafka_name:?}: {code}")));
        }
        inner
            .state
            .put(state::topic_key(name), Some(serde_json::to_vec(&StoredTopic { config }).map_err(|e| Error::Internal(e.to_string()))?))
            .await?;
        tracing::info!(topic = name, kafka_topic = %kafka_name, retention_ms, retention_bytes, "topic retention changed");
        inner.info(name).await
    }

    async fn keeps_everything(&self, topic: &str) -> Result<bool> {
        self.inner.check_partition(topic, 0).await?;
        // Only a topic the bus created is known to keep everything (it set retention to -1);
        // one created outside the bus is under the broker's retention, whatever that is.
        Ok(self
            .inner
            .state
            .get_json::<StoredTopic>(&state::topic_key(topic))
            .await?
            .is_some_and(|t| t.config.retention_ms == 0 && t.config.retention_bytes == 0))
    }

    async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        let inner = &self.inner;
        let producer = inner.producer.clone();
        let timeout = inner.timeout;
        let metadata = blocking(move || producer.client().fetch_metadata(None, timeout)).await?.map_err(|e| kafka_error("metadata", e))?;
        let prefix = &inner.settings.topic_prefix;
        let mut names: Vec<String> = metadata
            .topics()
            .iter()
            .filter_map(|t| t.name().strip_prefix(prefix.as_str()))
            .filter(|n| !n.starts_with("__") && validate_name("topic", n).is_ok())
            .map(str::to_string)
            .collect();
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            out.push(inner.info(&n).await?);
        }
        Ok(out)
    }

    async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        self.inner.info(name).await
    }

    async fn append(&self, topic: &str, records: Vec<NewRecord>) -> Result<Vec<Appended>> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let partitions = self.inner.partitions(topic).await?;
        let limit = self.inner.log_settings.max_event_bytes;
        if let Some(r) = records.iter().find(|r| r.value.len() > limit) {
            return Err(Error::TooLarge { size: r.value.len(), limit });
        }
        let (reply, answer) = oneshot::channel();
        self.inner.writer(topic, partitions).send(AppendRequest { records, reply }).await.map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    async fn read(&self, topic: &str, partition: u32, from: u64, max_records: usize, max_bytes: usize) -> Result<Vec<StoredRecord>> {
        let inner = &self.inner;
        inner.check_partition(topic, partition).await?;
        let mut records = inner.readers.read(&inner.kafka_name(topic), partition, from, max_records, max_bytes, inner.timeout).await?;
        for r in &mut records {
            r.partition = partition;
        }
        Ok(records)
    }

    async fn offsets(&self, topic: &str, partition: u32) -> Result<PartitionOffsets> {
        self.inner.check_partition(topic, partition).await?;
        self.inner.watermarks(topic, partition).await
    }

    async fn offset_for_time(&self, topic: &str, partition: u32, timestamp_ms: i64) -> Result<u64> {
        self.inner.check_partition(topic, partition).await?;
        self.inner.offset_for_time(topic, partition, timestamp_ms).await
    }

    fn watch_end(&self, topic: &str, partition: u32) -> Result<watch::Receiver<u64>> {
        let inner = &self.inner;
        let known = inner.partitions.lock().unwrap_or_else(|e| e.into_inner()).get(topic).copied();
        // A topic not yet looked up: check it on a blocking thread (this call is not async).
        let partitions = match known {
            Some(p) => p,
            None => {
                let producer = inner.producer.clone();
                let name = inner.kafka_name(topic);
                // Rare (the bus describes a topic before it watches it), so a short blocking call.
                let metadata = producer.client().fetch_metadata(Some(&name), inner.timeout).map_err(|e| kafka_error("metadata", e))?;
                let p = metadata.topics().iter().find(|t| t.name() == name).map(|t| t.partitions().len() as u32).unwrap_or(0);
                if p == 0 {
                    return Err(Error::UnknownTopic(topic.to_string()));
                }
                inner.partitions.lock().unwrap_or_else(|e| e.into_inner()).insert(topic.to_string(), p);
                p
            }
        };
        if partition >= partitions {
            return Err(Error::UnknownPartition { topic: topic.to_string(), partition, partitions });
        }
        let mut watches = inner.watches.lock().unwrap_or_else(|e| e.into_inner());
        let tx = watches.entry((topic.to_string(), partition)).or_insert_with(|| {
            let producer = inner.producer.clone();
            let name = inner.kafka_name(topic);
            // Once per partition and node: a short blocking call.
            let end =
                producer.client().fetch_watermarks(&name, partition as i32, inner.timeout).map(|(_, high)| high.max(0) as u64).unwrap_or(0);
            watch::channel(end).0
        });
        Ok(tx.subscribe())
    }

    async fn apply_retention(&self) -> Result<usize> {
        // Kafka applies retention.ms / retention.bytes itself.
        Ok(0)
    }

    async fn load_cursor(&self, topic: &str, group: &str, partition: u32) -> Result<Option<Cursor>> {
        self.inner.state.get_json(&state::cursor_key(topic, group, partition)).await
    }

    async fn store_cursors(&self, topic: &str, group: &str, cursors: &[(u32, Cursor)]) -> Result<()> {
        let mut entries = Vec::with_capacity(cursors.len());
        for (p, c) in cursors {
            entries.push((state::cursor_key(topic, group, *p), Some(state::to_json(c)?)));
        }
        self.inner.state.put_all(entries).await
    }

    async fn store_group_config(&self, topic: &str, group: &str, config: &GroupConfig) -> Result<()> {
        self.inner.state.put(state::group_config_key(topic, group), Some(state::to_json(config)?)).await
    }

    async fn load_group_config(&self, topic: &str, group: &str) -> Result<Option<GroupConfig>> {
        self.inner.state.get_json(&state::group_config_key(topic, group)).await
    }

    async fn list_groups(&self) -> Result<Vec<(String, String)>> {
        let mut groups: Vec<(String, String)> =
            self.inner.state.scan(state::CURSOR_PREFIX).await?.into_iter().filter_map(|(k, _)| state::parse_cursor_key(&k)).collect();
        groups.dedup();
        Ok(groups)
    }

    async fn put_quarantine(&self, topic: &str, group: &str, entry: &Quarantine) -> Result<()> {
        self.inner.state.put(state::quarantine_key(topic, group, &entry.key), Some(state::to_json(entry)?)).await
    }

    async fn remove_quarantine(&self, topic: &str, group: &str, key: &[u8]) -> Result<Option<Quarantine>> {
        let k = state::quarantine_key(topic, group, key);
        let existing: Option<Quarantine> = self.inner.state.get_json(&k).await?;
        if existing.is_some() {
            self.inner.state.put(k, None).await?;
        }
        Ok(existing)
    }

    async fn list_quarantine(&self, topic: &str, group: &str) -> Result<Vec<Quarantine>> {
        let entries = self.inner.state.scan(&state::quarantine_prefix(topic, group)).await?;
        entries.into_iter().map(|(_, v)| serde_json::from_slice(&v).map_err(|e| Error::State(format!("quarantine entry: {e}")))).collect()
    }

    async fn put_blob(&self, sha256: &str, size: u64, path: &std::path::Path) -> Result<()> {
        use tokio::io::AsyncReadExt;
        let inner = &self.inner;
        let key = state::blob_key(sha256);
        if inner.state.get(&key).await?.is_some() {
            return Ok(());
        }
        let topic = inner.blobs_topic();
        inner.ensure_internal_topic(&topic, "delete").await?;
        let mut file = tokio::fs::File::open(path).await.map_err(|e| Error::io(format!("reading blob {}", path.display()), e))?;
        let mut futures = Vec::new();
        loop {
            let mut chunk = vec![0u8; BLOB_CHUNK];
            let mut filled = 0;
            while filled < BLOB_CHUNK {
                match file.read(&mut chunk[filled..]).await.map_err(|e| Error::io(format!("reading blob {}", path.display()), e))? {
                    0 => break,
                    n => filled += n,
                }
            }
            if filled == 0 && !futures.is_empty() {
                break;
            }
            chunk.truncate(filled);
            let record = FutureRecord::to(&topic).partition(0).key(sha256).payload(chunk.as_slice());
            futures.push(inner.producer.send_result(record).map_err(|(e, _)| kafka_error("storing a blob", e))?);
            if filled < BLOB_CHUNK {
                break;
            }
        }
        let mut chunks = Vec::with_capacity(futures.len());
        for f in futures {
            match f.await {
                Ok(Ok(delivery)) => chunks.push(delivery.offset as u64),
                Ok(Err((e, _))) => return Err(kafka_error("storing a blob", e)),
                Err(_) => return Err(Error::Unavailable("Kafka producer stopped".into())),
            }
        }
        inner.state.put(key, Some(state::to_json(&StoredBlob { size, chunks })?)).await?;
        tracing::info!(sha256, size, "blob stored in Kafka");
        Ok(())
    }

    async fn grant_blobs(&self, grants: &[(String, String)]) -> Result<()> {
        // A value, not an empty one: an empty value could read back as a deletion.
        let entries =
            grants.iter().map(|(sha256, participant)| (state::blob_grant_key(sha256, participant), Some(b"1".to_vec()))).collect();
        self.inner.state.put_all(entries).await
    }

    async fn blob_granted(&self, sha256: &str, participant: &str) -> Result<bool> {
        Ok(self.inner.state.get(&state::blob_grant_key(sha256, participant)).await?.is_some())
    }

    async fn blob_size(&self, sha256: &str) -> Result<Option<u64>> {
        Ok(self.inner.state.get_json::<StoredBlob>(&state::blob_key(sha256)).await?.map(|b| b.size))
    }

    async fn read_blob(&self, sha256: &str, sink: &mut (dyn for<'c> FnMut(&'c [u8]) -> Result<()> + Send)) -> Result<bool> {
        let inner = &self.inner;
        let Some(blob) = inner.state.get_json::<StoredBlob>(&state::blob_key(sha256)).await? else { return Ok(false) };
        let topic = inner.blobs_topic();
        for offset in blob.chunks {
            let records = inner.readers.read(&topic, 0, offset, 1, 1, inner.timeout).await?;
            let chunk: Option<bytes::Bytes> =
                records.into_iter().next().filter(|r| r.offset == offset && r.key.as_ref() == sha256.as_bytes()).map(|r| r.value);
            let Some(chunk) = chunk else {
                return Err(Error::Corrupt { path: format!("{topic}/0@{offset}"), reason: format!("chunk of blob {sha256} missing") });
            };
            sink(chunk.as_ref())?;
        }
        Ok(true)
    }

    fn shares_groups(&self, _topic: &str) -> bool {
        true
    }

    async fn join_group(&self, topic: &str, group: &str) -> Result<Option<Membership>> {
        self.inner.partitions(topic).await?;
        // '/' never occurs in topic or group names, so the id is unambiguous.
        let group_id = format!("{}justizbus/{topic}/{group}", self.inner.settings.topic_prefix);
        let membership =
            membership::join(&self.inner.client_config, &self.inner.kafka_name(topic), &group_id, self.inner.settings.session_timeout_ms)?;
        tracing::info!(topic, group, kafka_group = %group_id, "joined the shared consumer group");
        Ok(Some(membership))
    }

    async fn partition_count(&self, name: &str) -> Result<u32> {
        self.inner.partitions(name).await
    }

    async fn put_checkpoint(&self, checkpoint: &Checkpoint) -> Result<()> {
        let key = format!("{}/{}/{:020}", checkpoint.topic, checkpoint.partition, checkpoint.offset);
        self.inner.checkpoints.put(key, Some(state::to_json(checkpoint)?)).await
    }

    async fn list_checkpoints(&self, topic: &str, partition: u32) -> Result<Vec<Checkpoint>> {
        let entries = self.inner.checkpoints.scan(&format!("{topic}/{partition}/")).await?;
        Ok(entries
            .into_iter()
            .filter_map(|(k, v)| match serde_json::from_slice(&v) {
                Ok(cp) => Some(cp),
                Err(e) => {
                    tracing::warn!(key = k, error = %e, "unreadable checkpoint entry skipped");
                    None
                }
            })
            .collect())
    }

    async fn close(&self) -> Result<()> {
        self.inner.writers.lock().unwrap_or_else(|e| e.into_inner()).clear();
        let producer = self.inner.producer.clone();
        let timeout = self.inner.timeout;
        blocking(move || producer.flush(timeout)).await?.map_err(|e| kafka_error("flushing the producer", e))?;
        if let Some(p) = self.poller.lock().unwrap_or_else(|e| e.into_inner()).take() {
            p.abort();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::conformance;

    /// The broker the test script started (`host:port`).
    pub(crate) fn test_broker() -> String {
        std::env::var("JUSTIZBUS_TEST_KAFKA").expect(
            "JUSTIZBUS_TEST_KAFKA is not set: run the tests with `bash scripts/test.sh`, which starts a Kafka-protocol broker (tansu)",
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn conformance_suite_on_a_real_broker() {
        // The test broker (tansu 0.6) has no AlterConfigs: changing retention must fail cleanly.
        let broker = test_broker();
        let settings = KafkaSettings { topic_prefix: format!("conf-{}.", uuid::Uuid::now_v7().simple()), ..KafkaSettings::default() };
        conformance::run_all(
            move || {
                let broker = broker.clone();
                let settings = settings.clone();
                async move { Arc::new(KafkaLog::open(&broker, LogSettings::default(), settings).await.expect("open")) as Arc<dyn Log> }
            },
            false,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_topics_the_bus_created_without_retention_keep_everything() {
        let settings = KafkaSettings { topic_prefix: format!("keep-{}.", uuid::Uuid::now_v7().simple()), ..KafkaSettings::default() };
        let log = KafkaLog::open(&test_broker(), LogSettings::default(), settings).await.expect("open");
        let keep = TopicConfig { partitions: 1, retention_ms: 0, retention_bytes: 0 };
        log.create_topic("kept", keep).await.expect("create");
        log.create_topic("expiring", TopicConfig { retention_ms: 86_400_000, ..keep }).await.expect("create");
        // Created in Kafka directly, as another tool would: its retention is the broker's.
        let foreign_name = log.inner.kafka_name("foreign");
        let foreign = NewTopic::new(&foreign_name, 1, TopicReplication::Fixed(1));
        log.inner.create(&foreign).await.expect("create in Kafka");
        assert!(log.keeps_everything("kept").await.expect("kept"));
        assert!(!log.keeps_everything("expiring").await.expect("expiring"));
        assert!(!log.keeps_everything("foreign").await.expect("foreign"));
    }
}
