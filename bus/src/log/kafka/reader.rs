//! Reading partitions: one assigned consumer per (topic, partition), kept between reads so a
//! reader that continues where it stopped gets the already fetched records at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex as SyncMutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Mutex;

use super::{blocking, kafka_error, transient, ID_HEADER, READ_WAIT};
use crate::log::StoredRecord;
use crate::{Error, Result};

/// A consumer assigned to one partition and the offset its next record has.
struct PartitionReader {
    consumer: Arc<StreamConsumer>,
    next: Option<u64>,
    /// The partition's (start, end) as last asked: while a reader is behind it, no need to ask
    /// again (the offsets below a known end only ever become readable or deleted).
    known: (u64, u64),
}

/// A shared reader, by (Kafka topic, partition).
type ReaderMap = HashMap<(String, u32), Arc<Mutex<PartitionReader>>>;

/// The readers of one bus node.
pub(super) struct Readers {
    config: ClientConfig,
    readers: SyncMutex<ReaderMap>,
    /// For offset lookups by time.
    lookup: OnceLock<Arc<BaseConsumer>>,
}

impl Readers {
    pub(super) fn new(base: ClientConfig, max_event_bytes: usize) -> Readers {
        let mut config = base;
        config
            .set("group.id", "justizbus-reader")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "10")
            .set("fetch.max.bytes", (max_event_bytes + (1 << 20)).max(52_428_800).to_string())
            .set("receive.message.max.bytes", (max_event_bytes + (2 << 20)).max(100_000_000).to_string())
            // Prefetch per reader stays small: a node may hold many readers.
            .set("queued.max.messages.kbytes", "4096");
        Readers { config, readers: SyncMutex::new(HashMap::new()), lookup: OnceLock::new() }
    }

    fn reader(&self, topic: &str, partition: u32) -> Result<Arc<Mutex<PartitionReader>>> {
        let mut readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = readers.get(&(topic.to_string(), partition)) {
            return Ok(r.clone());
        }
        let consumer: StreamConsumer = self.config.create().map_err(|e| kafka_error("creating a consumer", e))?;
        let reader = Arc::new(Mutex::new(PartitionReader { consumer: Arc::new(consumer), next: None, known: (0, 0) }));
        readers.insert((topic.to_string(), partition), reader.clone());
        Ok(reader)
    }

    /// Reads up to `max_records` records (about `max_bytes`, at least one) from `from` up to the
    /// partition's high watermark. The records' `partition` field is set.
    pub(super) async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_records: usize,
        max_bytes: usize,
        timeout: Duration,
    ) -> Result<Vec<StoredRecord>> {
        let reader = self.reader(topic, partition)?;
        let mut reader = reader.lock().await;
        let cached = from >= reader.known.0 && from < reader.known.1;
        let (low, mut high) = if cached {
            reader.known
        } else {
            let (consumer, t, p) = (reader.consumer.clone(), topic.to_string(), partition as i32);
            let watermarks = blocking(move || consumer.client().fetch_watermarks(&t, p, timeout)).await?;
            let (low, high) = watermarks.map_err(|e| kafka_error("reading offsets", e))?;
            reader.known = (low.max(0) as u64, high.max(0) as u64);
            reader.known
        };
        let from = from.max(low);
        tracing::trace!(topic, partition, from, low, high, "read");
        if from >= high || max_records == 0 {
            return Ok(Vec::new());
        }
        if reader.next != Some(from) {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, partition as i32, Offset::Offset(from as i64)).map_err(|e| kafka_error("assigning", e))?;
            reader.consumer.assign(&tpl).map_err(|e| kafka_error("assigning", e))?;
            reader.next = Some(from);
        }
        let deadline = tokio::time::Instant::now() + timeout.min(READ_WAIT);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while out.len() < max_records && (out.is_empty() || bytes < max_bytes) {
            let next = reader.next.unwrap_or(from);
            if next >= high {
                // The cached end is reached: ask once whether the partition grew meanwhile.
                if cached && high == reader.known.1 {
                    let (consumer, t, p) = (reader.consumer.clone(), topic.to_string(), partition as i32);
                    let watermarks = blocking(move || consumer.client().fetch_watermarks(&t, p, timeout)).await?;
                    let (low, now) = watermarks.map_err(|e| kafka_error("reading offsets", e))?;
                    reader.known = (low.max(0) as u64, now.max(0) as u64);
                    if reader.known.1 > high {
                        high = reader.known.1;
                        continue;
                    }
                }
                break;
            }
            let message = match tokio::time::timeout_at(deadline, reader.consumer.recv()).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) if transient(&e) => {
                    tracing::debug!(topic, partition, error = %e, "connection report while reading");
                    continue;
                }
                Ok(Err(e)) => {
                    reader.next = None;
                    return Err(kafka_error("reading", e));
                }
                Err(_) if !out.is_empty() => break,
                // The fetch goes on: the next read from here takes what it brings (a slow broker
                // is waited for, not asked again from scratch).
                Err(_) => {
                    return Err(Error::Unavailable(format!("Kafka: no record of {topic}/{partition} from offset {next} arrived in time")))
                }
            };
            let offset = message.offset().max(0) as u64;
            if offset < next {
                continue; // fetched before the last assignment
            }
            let id = message
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == ID_HEADER).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned()))
                .unwrap_or_else(|| format!("{topic}-{partition}-{offset}"));
            let value = Bytes::copy_from_slice(message.payload().unwrap_or_default());
            bytes += value.len();
            out.push(StoredRecord {
                partition,
                offset,
                timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
                id,
                key: Bytes::copy_from_slice(message.key().unwrap_or_default()),
                value,
                chain: None,
            });
            reader.next = Some(offset + 1);
        }
        Ok(out)
    }

    /// The first offset with a timestamp at or after `timestamp_ms`; None if there is none.
    pub(super) async fn offset_for_time(&self, topic: &str, partition: u32, timestamp_ms: i64, timeout: Duration) -> Result<Option<u64>> {
        let lookup = match self.lookup.get() {
            Some(c) => c.clone(),
            None => {
                let c: BaseConsumer = self.config.create().map_err(|e| kafka_error("creating a consumer", e))?;
                self.lookup.get_or_init(|| Arc::new(c)).clone()
            }
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition as i32, Offset::Offset(timestamp_ms.max(0)))
            .map_err(|e| kafka_error("offset lookup", e))?;
        let found = blocking(move || lookup.offsets_for_times(tpl, timeout)).await?.map_err(|e| kafka_error("offset lookup", e))?;
        let offset = found.elements().first().map(|e| e.offset());
        Ok(match offset {
            Some(Offset::Offset(o)) if o >= 0 => Some(o as u64),
            _ => None,
        })
    }
}
