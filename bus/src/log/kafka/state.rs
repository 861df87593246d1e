//! The bus's small mutable state (cursors, group settings, quarantine, topic settings) as a
//! compacted one-partition Kafka topic: key = entry name, value = JSON, no value = deleted.
//!
//! Each node keeps the entries in memory and, before answering a read, catches up to the
//! topic's current end, so it sees what any node stored before (a node that takes over a group
//! reads the cursor the previous one wrote). A write returns once Kafka acknowledged it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Mutex;

use super::kafka_error;
use crate::{Error, Result};

/// Prefix of cursor entries.
pub(super) const CURSOR_PREFIX: &str = "cursor/";

pub(super) fn topic_key(topic: &str) -> String {
    format!("topic/{topic}")
}

pub(super) fn cursor_key(topic: &str, group: &str, partition: u32) -> String {
    // Topic and group names never contain '/' (validated names).
    format!("{CURSOR_PREFIX}{topic}/{group}/{partition:05}")
}

/// (topic, group) of a cursor entry.
pub(super) fn parse_cursor_key(key: &str) -> Option<(String, String)> {
    let mut parts = key.strip_prefix(CURSOR_PREFIX)?.split('/');
    Some((parts.next()?.to_string(), parts.next()?.to_string()))
}

pub(super) fn blob_key(sha256: &str) -> String {
    format!("blob/{sha256}")
}

pub(super) fn blob_grant_key(sha256: &str, participant: &str) -> String {
    format!("blob-grant/{sha256}/{participant}")
}

pub(super) fn group_config_key(topic: &str, group: &str) -> String {
    format!("group/{topic}/{group}")
}

pub(super) fn quarantine_prefix(topic: &str, group: &str) -> String {
    format!("quarantine/{topic}/{group}/")
}

pub(super) fn quarantine_key(topic: &str, group: &str, key: &[u8]) -> String {
    format!("{}{}", quarantine_prefix(topic, group), crate::audit::chain::hex(key))
}

pub(super) fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::Internal(format!("encoding state: {e}")))
}

/// The state topic of one node.
pub(super) struct StateTopic {
    name: String,
    config: ClientConfig,
    producer: FutureProducer,
    timeout: Duration,
    entries: SyncMutex<BTreeMap<String, Vec<u8>>>,
    /// The consumer (created at the first catch-up) and the offset up to which entries are applied.
    reader: Mutex<(Option<Arc<StreamConsumer>>, u64)>,
}

impl StateTopic {
    pub(super) fn new(name: String, base: ClientConfig, producer: FutureProducer, timeout: Duration) -> StateTopic {
        let mut config = base;
        config
            .set("group.id", "justizbus-state")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "10");
        StateTopic { name, config, producer, timeout, entries: SyncMutex::new(BTreeMap::new()), reader: Mutex::new((None, 0)) }
    }

    /// The Kafka topic's name.
    pub(super) fn topic(&self) -> &str {
        &self.name
    }

    /// Applies every entry up to the topic's current end.
    pub(super) async fn sync(&self) -> Result<()> {
        let mut reader = self.reader.lock().await;
        if reader.0.is_none() {
            let consumer: StreamConsumer = self.config.create().map_err(|e| kafka_error("creating the state consumer", e))?;
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&self.name, 0, Offset::Beginning).map_err(|e| kafka_error("assigning the state topic", e))?;
            consumer.assign(&tpl).map_err(|e| kafka_error("assigning the state topic", e))?;
            reader.0 = Some(Arc::new(consumer));
        }
        let (consumer, applied) = &mut *reader;
        let Some(consumer) = consumer.clone() else { return Ok(()) };
        let (name, timeout, c) = (self.name.clone(), self.timeout, consumer.clone());
        let (_, end) = super::blocking(move || c.client().fetch_watermarks(&name, 0, timeout))
            .await?
            .map_err(|e| kafka_error("reading the state topic's end", e))?;
        let end = end.max(0) as u64;
        let deadline = tokio::time::Instant::now() + self.timeout;
        while *applied < end {
            let message = match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) if super::transient(&e) => continue,
                Ok(Err(e)) => return Err(kafka_error("reading the state topic", e)),
                Err(_) => return Err(Error::Unavailable(format!("Kafka: state topic {} not read up to {end} in time", self.name))),
            };
            let Some(key) = message.key().and_then(|k| std::str::from_utf8(k).ok()) else {
                *applied = message.offset().max(0) as u64 + 1;
                continue;
            };
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            match message.payload() {
                Some(v) => entries.insert(key.to_string(), v.to_vec()),
                None => entries.remove(key),
            };
            *applied = message.offset().max(0) as u64 + 1;
        }
        Ok(())
    }

    /// One entry, as stored by any node.
    pub(super) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.sync().await?;
        Ok(self.entries.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned())
    }

    /// One JSON entry.
    pub(super) async fn get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.get(key).await? {
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::State(format!("entry {key}: {e}"))),
            None => Ok(None),
        }
    }

    /// Entries whose key starts with `prefix`, sorted by key.
    pub(super) async fn scan(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.sync().await?;
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        Ok(entries.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), v.clone())).collect())
    }

    /// Stores (or with None deletes) one entry.
    pub(super) async fn put(&self, key: String, value: Option<Vec<u8>>) -> Result<()> {
        self.put_all(vec![(key, value)]).await
    }

    /// Stores several entries; returns when Kafka acknowledged all of them.
    pub(super) async fn put_all(&self, entries: Vec<(String, Option<Vec<u8>>)>) -> Result<()> {
        let mut futures = Vec::with_capacity(entries.len());
        for (key, value) in &entries {
            let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.name).partition(0).key(key.as_str());
            if let Some(v) = value {
                record = record.payload(v.as_slice());
            }
            futures.push(self.producer.send_result(record).map_err(|(e, _)| kafka_error("storing state", e))?);
        }
        for f in futures {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(kafka_error("storing state", e)),
                Err(_) => return Err(Error::Unavailable("Kafka producer stopped".into())),
            }
        }
        let mut map = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for (key, value) in entries {
            match value {
                Some(v) => map.insert(key, v),
                None => map.remove(&key),
            };
        }
        Ok(())
    }
}
