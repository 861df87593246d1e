//! Fault injection for tests, next to the real log: appends that are stored and then reported
//! failed, as a Kafka producer reports a batch it gave up waiting for that the broker stored.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{Appended, Cursor, GroupConfig, Log, NewRecord, PartitionOffsets, Quarantine, StoredRecord, TopicConfig, TopicInfo};
use crate::audit::checkpoint::Checkpoint;
use crate::{Error, Result};

/// A log whose next appends to one topic are stored and then answered with an error.
pub struct StoredButFailed {
    inner: Arc<dyn Log>,
    topic: String,
    failing: AtomicUsize,
}

impl StoredButFailed {
    /// Passes everything to `inner`; appends to `topic` fail after storing once armed.
    pub fn new(inner: Arc<dyn Log>, topic: &str) -> Self {
        StoredButFailed { inner, topic: topic.to_string(), failing: AtomicUsize::new(0) }
    }

    /// The next `appends` appends to the topic are stored and reported failed.
    pub fn fail_next(&self, appends: usize) {
        self.failing.store(appends, Ordering::SeqCst);
    }
}

#[async_trait]
impl Log for StoredButFailed {
    async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<TopicInfo> {
        self.inner.create_topic(name, config).await
    }
    async fn set_retention(&self, name: &str, retention_ms: u64, retention_bytes: u64) -> Result<TopicInfo> {
        self.inner.set_retention(name, retention_ms, retention_bytes).await
    }
    async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        self.inner.list_topics().await
    }
    async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        self.inner.describe_topic(name).await
    }
    async fn append(&self, topic: &str, records: Vec<NewRecord>) -> Result<Vec<Appended>> {
        let appended = self.inner.append(topic, records).await?;
        let armed = topic == self.topic && self.failing.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        if armed {
            return Err(Error::Unavailable("injected: the append timed out (it was stored)".into()));
        }
        Ok(appended)
    }
    async fn read(&self, topic: &str, partition: u32, from: u64, max_records: usize, max_bytes: usize) -> Result<Vec<StoredRecord>> {
        self.inner.read(topic, partition, from, max_records, max_bytes).await
    }
    async fn offsets(&self, topic: &str, partition: u32) -> Result<PartitionOffsets> {
        self.inner.offsets(topic, partition).await
    }
    async fn offset_for_time(&self, topic: &str, partition: u32, timestamp_ms: i64) -> Result<u64> {
        self.inner.offset_for_time(topic, partition, timestamp_ms).await
    }
    fn watch_end(&self, topic: &str, partition: u32) -> Result<watch::Receiver<u64>> {
        self.inner.watch_end(topic, partition)
    }
    async fn apply_retention(&self) -> Result<usize> {
        self.inner.apply_retention().await
    }
    async fn load_cursor(&self, topic: &str, group: &str, partition: u32) -> Result<Option<Cursor>> {
        self.inner.load_cursor(topic, group, partition).await
    }
    async fn store_cursors(&self, topic: &str, group: &str, cursors: &[(u32, Cursor)]) -> Result<()> {
        self.inner.store_cursors(topic, group, cursors).await
    }
    async fn store_group_config(&self, topic: &str, group: &str, config: &GroupConfig) -> Result<()> {
        self.inner.store_group_config(topic, group, config).await
    }
    async fn load_group_config(&self, topic: &str, group: &str) -> Result<Option<GroupConfig>> {
        self.inner.load_group_config(topic, group).await
    }
    async fn list_groups(&self) -> Result<Vec<(String, String)>> {
        self.inner.list_groups().await
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
    async fn grant_blobs(&self, grants: &[(String, String)]) -> Result<()> {
        self.inner.grant_blobs(grants).await
    }
    async fn blob_granted(&self, sha256: &str, participant: &str) -> Result<bool> {
        self.inner.blob_granted(sha256, participant).await
    }
    async fn put_checkpoint(&self, checkpoint: &Checkpoint) -> Result<()> {
        self.inner.put_checkpoint(checkpoint).await
    }
    async fn list_checkpoints(&self, topic: &str, partition: u32) -> Result<Vec<Checkpoint>> {
        self.inner.list_checkpoints(topic, partition).await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}
