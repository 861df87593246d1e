//! The embedded log backend (`file://DIR`), the default.
//!
//! # Layout
//!
//! ```text
//! DIR/log/<topic>/<partition>/<base offset, 20 digits>.log     batches (see format)
//! DIR/log/<topic>/<partition>/<base offset, 20 digits>.index   sparse offset/time index
//! DIR/log/<topic>/<partition>/<base offset, 20 digits>.ids     id hashes for dedup
//! DIR/log/<topic>/<partition>/checkpoints.jsonl                signed hash chain checkpoints
//! DIR/state/                                                   sled: topics, cursors,
//!                                                              quarantine
//! ```
//!
//! # Invariants
//!
//! - A record is visible to readers (and its append acknowledged) only after the `fdatasync`
//!   of the batch that holds it: the high watermark never exceeds durable data.
//! - Offsets in a partition are dense and increase by one; segment `n + 1` starts where `n` ends.
//! - Recovery checks every batch of the active segment; the first batch that is short or fails
//!   its CRC and everything after it is cut off (a torn group commit was never acknowledged).
//! - Retention deletes whole sealed segments, never the active one.
//! - `sled` holds only small mutable state. Losing its last writes in a crash costs at most
//!   redeliveries (cursors); topic creation and quarantine changes are flushed.
//! - The dedup index is in memory per partition, reloaded from the `.ids` sidecars (the active
//!   segment's is rebuilt from its records), so no acknowledged id is forgotten by a crash.

pub mod dedup;
pub mod format;
pub mod partition;
pub mod segment;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use tokio::sync::watch;

use self::partition::Partition;
use self::segment::BatchCache;
use crate::audit::chain::ChainHash;
use crate::audit::checkpoint::Checkpoint;
use crate::config::LogSettings;
use crate::event::now_ms;
use crate::log::{Appended, Cursor, GroupConfig, Log, NewRecord, PartitionOffsets, Quarantine, StoredRecord, TopicConfig, TopicInfo};
use crate::partitioner::partition_for_key;
use crate::{Error, Result};

struct Topic {
    config: TopicConfig,
    partitions: Vec<Arc<Partition>>,
}

/// The embedded, file-based log.
pub struct EmbeddedLog {
    dir: PathBuf,
    settings: LogSettings,
    db: sled::Db,
    /// Topic name -> configuration (persistent).
    topic_configs: sled::Tree,
    /// `topic \0 group \0 partition` -> JSON [`Cursor`].
    cursors: sled::Tree,
    /// `topic \0 group \0 key` -> JSON [`Quarantine`].
    quarantine: sled::Tree,
    /// Blob grants: `<sha256>/<participant>`, no value.
    blob_grants: sled::Tree,
    /// `topic \0 group \0` -> JSON [`GroupConfig`].
    group_configs: sled::Tree,
    /// Recently read batches, shared by all partitions.
    cache: Arc<BatchCache>,
    /// Open topics. Written only by `create_topic` (which serializes through the lock).
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
}

/// How long opening waits for the state store's lock. A log reopened in the same process right
/// after the one holding it was dropped found it still taken once, under load (sled's
/// background threads are the likely holders; not reproduced alone); another server on the
/// directory keeps it, and is refused after the wait.
const STATE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Opens the state store (sled), waiting up to [`STATE_LOCK_WAIT`] for its lock.
async fn open_state(path: &Path, cache_bytes: u64) -> Result<sled::Db> {
    let started = std::time::Instant::now();
    loop {
        match sled::Config::new().path(path).cache_capacity(cache_bytes).open() {
            Ok(db) => return Ok(db),
            // sled reports a taken lock only in the message of an `Other` I/O error.
            Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") && started.elapsed() < STATE_LOCK_WAIT => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => {
                return Err(Error::State(format!("opening {} (is another justizbus serving this data directory?): {e}", path.display())))
            }
        }
    }
}

impl EmbeddedLog {
    /// Opens or creates the log in `dir`, recovering every partition.
    pub async fn open(dir: &Path, settings: LogSettings) -> Result<Self> {
        let dir = dir.to_path_buf();
        std::fs::create_dir_all(dir.join("log")).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let db = open_state(&dir.join("state"), settings.state_cache_bytes).await?;
        let log = EmbeddedLog {
            topic_configs: db.open_tree("topics")?,
            cursors: db.open_tree("cursors")?,
            quarantine: db.open_tree("quarantine")?,
            blob_grants: db.open_tree("blob_grants")?,
            group_configs: db.open_tree("group_configs")?,
            db,
            dir,
            cache: Arc::new(BatchCache::new(settings.read_cache_bytes)),
            settings,
            topics: RwLock::new(BTreeMap::new()),
        };
        let started = std::time::Instant::now();
        let mut opened = BTreeMap::new();
        for item in log.topic_configs.iter() {
            let (name, value) = item?;
            let name = String::from_utf8_lossy(&name).into_owned();
            let config: TopicConfig = serde_json::from_slice(&value)
                .map_err(|e| Error::Corrupt { path: format!("state/topics/{name}"), reason: e.to_string() })?;
            opened.insert(name.clone(), log.open_topic(&name, config)?);
        }
        tracing::info!(dir = %log.dir.display(), topics = opened.len(), elapsed_ms = started.elapsed().as_millis() as u64, "embedded log opened");
        *log.topics.write().unwrap_or_else(|e| e.into_inner()) = opened;
        Ok(log)
    }

    fn open_topic(&self, name: &str, config: TopicConfig) -> Result<Arc<Topic>> {
        let partitions = (0..config.partitions)
            .map(|p| Partition::open(name, p, &self.dir.join("log").join(name).join(p.to_string()), &self.settings, self.cache.clone()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(Topic { config, partitions }))
    }

    fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.topics.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned().ok_or_else(|| Error::UnknownTopic(name.to_string()))
    }

    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<Partition>> {
        let t = self.topic(topic)?;
        t.partitions.get(partition as usize).cloned().ok_or(Error::UnknownPartition {
            topic: topic.to_string(),
            partition,
            partitions: t.config.partitions,
        })
    }

    fn info(name: &str, t: &Topic) -> TopicInfo {
        TopicInfo {
            name: name.to_string(),
            config: t.config,
            partitions: t.partitions.iter().map(|p| PartitionOffsets { start: p.start_offset(), end: p.end_offset() }).collect(),
        }
    }
}

fn group_key(topic: &str, group: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + group.len() + 2);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

#[async_trait]
impl Log for EmbeddedLog {
    async fn create_topic(&self, name: &str, config: TopicConfig) -> Result<TopicInfo> {
        super::check_new_topic(name, &config)?;
        // The write lock serializes creations; opening empty partitions is quick.
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = topics.get(name) {
            return Err(Error::TopicExists { name: name.to_string(), partitions: t.config.partitions });
        }
        let topic = self.open_topic(name, config)?;
        self.topic_configs.insert(name.as_bytes(), json(&config))?;
        self.topic_configs.flush()?;
        tracing::info!(topic = name, partitions = config.partitions, "topic created");
        let info = Self::info(name, &topic);
        topics.insert(name.to_string(), topic);
        Ok(info)
    }

    async fn set_retention(&self, name: &str, retention_ms: u64, retention_bytes: u64) -> Result<TopicInfo> {
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        let old = topics.get(name).ok_or_else(|| Error::UnknownTopic(name.to_string()))?;
        let config = TopicConfig { retention_ms, retention_bytes, ..old.config };
        // Stored first: a crash between the two leaves the new setting, which was asked for.
        self.topic_configs.insert(name.as_bytes(), json(&config))?;
        self.topic_configs.flush()?;
        let topic = Arc::new(Topic { config, partitions: old.partitions.clone() });
        tracing::info!(topic = name, retention_ms, retention_bytes, "topic retention changed");
        let info = Self::info(name, &topic);
        topics.insert(name.to_string(), topic);
        Ok(info)
    }

    async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        Ok(topics.iter().map(|(n, t)| Self::info(n, t)).collect())
    }

    async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        let t = self.topic(name)?;
        Ok(Self::info(name, &t))
    }

    async fn append(&self, topic: &str, records: Vec<NewRecord>) -> Result<Vec<Appended>> {
        let t = self.topic(topic)?;
        if let Some(r) = records.iter().find(|r| r.id.is_empty() || r.id.len() > usize::from(u16::MAX)) {
            return Err(Error::invalid("id", format!("a record id must have 1 to 65535 bytes, not {}", r.id.len())));
        }
        let n = t.config.partitions;
        let mut per_partition: BTreeMap<u32, (Vec<usize>, Vec<NewRecord>)> = BTreeMap::new();
        for (i, r) in records.into_iter().enumerate() {
            let entry = per_partition.entry(partition_for_key(&r.key, n)).or_default();
            entry.0.push(i);
            entry.1.push(r);
        }
        let total = per_partition.values().map(|(idx, _)| idx.len()).sum();
        let mut calls = Vec::with_capacity(per_partition.len());
        for (p, (idx, recs)) in per_partition {
            let partition = t.partitions[p as usize].clone();
            calls.push(async move { partition.append(recs).await.map(|res| (idx, res)) });
        }
        let mut out = vec![Appended { partition: 0, offset: 0, duplicate: false }; total];
        for r in futures_util::future::join_all(calls).await {
            let (idx, res) = r?;
            for (i, a) in idx.into_iter().zip(res) {
                out[i] = a;
            }
        }
        Ok(out)
    }

    async fn read(&self, topic: &str, partition: u32, from: u64, max_records: usize, max_bytes: usize) -> Result<Vec<StoredRecord>> {
        let p = self.partition(topic, partition)?;
        p.read(from, max_records, max_bytes, false)
    }

    async fn read_transient(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>> {
        let p = self.partition(topic, partition)?;
        p.read(from, max_records, max_bytes, true)
    }

    async fn offsets(&self, topic: &str, partition: u32) -> Result<PartitionOffsets> {
        let p = self.partition(topic, partition)?;
        Ok(PartitionOffsets { start: p.start_offset(), end: p.end_offset() })
    }

    async fn offset_for_time(&self, topic: &str, partition: u32, timestamp_ms: i64) -> Result<u64> {
        self.partition(topic, partition)?.offset_for_time(timestamp_ms)
    }

    fn watch_end(&self, topic: &str, partition: u32) -> Result<watch::Receiver<u64>> {
        Ok(self.partition(topic, partition)?.watch_end())
    }

    async fn apply_retention(&self) -> Result<usize> {
        let topics: Vec<Arc<Topic>> = self.topics.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let now = now_ms();
        let mut removed = 0;
        for t in topics {
            for p in &t.partitions {
                removed += p.apply_retention(t.config.retention_ms, t.config.retention_bytes, now)?;
            }
        }
        Ok(removed)
    }

    async fn load_cursor(&self, topic: &str, group: &str, partition: u32) -> Result<Option<Cursor>> {
        let mut k = group_key(topic, group);
        k.extend_from_slice(&partition.to_be_bytes());
        match self.cursors.get(k)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| Error::Corrupt { path: format!("state/cursors/{topic}/{group}/{partition}"), reason: e.to_string() }),
        }
    }

    async fn store_cursors(&self, topic: &str, group: &str, cursors: &[(u32, Cursor)]) -> Result<()> {
        // One insert per partition, not a `sled::Batch`: sled writes out its log buffer before
        // and after every batch (two writes and range syncs each), which with a thousand
        // mailbox groups storing positions cost more than everything else sled does. A crash
        // between two inserts leaves some partitions at their older position: redelivery, which
        // at-least-once allows.
        for (p, c) in cursors {
            let mut k = group_key(topic, group);
            k.extend_from_slice(&p.to_be_bytes());
            self.cursors.insert(k, json(c))?;
        }
        Ok(())
    }

    async fn store_group_config(&self, topic: &str, group: &str, config: &GroupConfig) -> Result<()> {
        self.group_configs.insert(group_key(topic, group), json(config))?;
        self.group_configs.flush_async().await?;
        Ok(())
    }

    async fn load_group_config(&self, topic: &str, group: &str) -> Result<Option<GroupConfig>> {
        match self.group_configs.get(group_key(topic, group))? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| Error::Corrupt { path: format!("state/group_configs/{topic}/{group}"), reason: e.to_string() }),
        }
    }

    async fn list_groups(&self) -> Result<Vec<(String, String)>> {
        let mut out: Vec<(String, String)> = Vec::new();
        for item in self.cursors.iter() {
            let (k, _) = item?;
            let mut parts = k.splitn(3, |b| *b == 0);
            let (Some(t), Some(g)) = (parts.next(), parts.next()) else { continue };
            let pair = (String::from_utf8_lossy(t).into_owned(), String::from_utf8_lossy(g).into_owned());
            if out.last() != Some(&pair) {
                out.push(pair);
            }
        }
        Ok(out)
    }

    async fn grant_blobs(&self, grants: &[(String, String)]) -> Result<()> {
        if grants.is_empty() {
            return Ok(());
        }
        for (sha256, participant) in grants {
            self.blob_grants.insert(format!("{sha256}/{participant}"), &[])?;
        }
        self.blob_grants.flush_async().await?;
        Ok(())
    }

    async fn blob_granted(&self, sha256: &str, participant: &str) -> Result<bool> {
        Ok(self.blob_grants.contains_key(format!("{sha256}/{participant}"))?)
    }

    async fn put_quarantine(&self, topic: &str, group: &str, entry: &Quarantine) -> Result<()> {
        let mut k = group_key(topic, group);
        k.extend_from_slice(&entry.key);
        self.quarantine.insert(k, json(entry))?;
        self.quarantine.flush_async().await?;
        Ok(())
    }

    async fn remove_quarantine(&self, topic: &str, group: &str, key: &[u8]) -> Result<Option<Quarantine>> {
        let mut k = group_key(topic, group);
        k.extend_from_slice(key);
        let old = self.quarantine.remove(k)?;
        self.quarantine.flush_async().await?;
        Ok(old.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    async fn list_quarantine(&self, topic: &str, group: &str) -> Result<Vec<Quarantine>> {
        let prefix = group_key(topic, group);
        let mut out = Vec::new();
        for item in self.quarantine.scan_prefix(prefix) {
            let (_, v) = item?;
            if let Ok(q) = serde_json::from_slice(&v) {
                out.push(q);
            }
        }
        Ok(out)
    }

    async fn stored_chain_before(&self, topic: &str, partition: u32, offset: u64) -> Result<Option<ChainHash>> {
        let p = self.partition(topic, partition)?;
        tokio::task::spawn_blocking(move || p.chain_before(offset).map(Some))
            .await
            .map_err(|e| Error::Internal(format!("reading the chain: {e}")))?
    }

    async fn put_checkpoint(&self, checkpoint: &Checkpoint) -> Result<()> {
        let p = self.partition(&checkpoint.topic, checkpoint.partition)?;
        let checkpoint = checkpoint.clone();
        tokio::task::spawn_blocking(move || p.append_checkpoint(&checkpoint))
            .await
            .map_err(|e| Error::Internal(format!("storing a checkpoint: {e}")))?
    }

    async fn list_checkpoints(&self, topic: &str, partition: u32) -> Result<Vec<Checkpoint>> {
        self.partition(topic, partition)?.checkpoints()
    }

    async fn close(&self) -> Result<()> {
        let topics = std::mem::take(&mut *self.topics.write().unwrap_or_else(|e| e.into_inner()));
        for t in topics.values() {
            for p in &t.partitions {
                p.close().await;
            }
        }
        self.db.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::conformance;

    fn settings() -> LogSettings {
        LogSettings { segment_bytes: 4096, index_interval_bytes: 512, ..LogSettings::default() }
    }

    async fn open(dir: &Path) -> Arc<dyn Log> {
        Arc::new(EmbeddedLog::open(dir, settings()).await.expect("open"))
    }

    #[tokio::test]
    async fn conformance_suite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_path_buf();
        conformance::run_all(
            move || {
                let d = d.clone();
                async move { open(&d).await }
            },
            true,
        )
        .await;
    }

    #[tokio::test]
    async fn transient_reads_share_the_cache_and_outlive_its_eviction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = LogSettings { read_cache_bytes: 256 * 1024, ..settings() };
        let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir.path(), settings).await.expect("open"));
        log.create_topic("t", TopicConfig { partitions: 1, retention_ms: 0, retention_bytes: 0 }).await.expect("create");
        let record = |i: u32| NewRecord { id: format!("r{i}"), key: "k".into(), timestamp_ms: 1, value: vec![i as u8; 1000].into() };
        log.append("t", (0..10).map(record).collect()).await.expect("append");
        let shared = log.read_transient("t", 0, 0, 100, 1 << 20).await.expect("transient read");
        assert_eq!(shared, log.read("t", 0, 0, 100, 1 << 20).await.expect("read"));
        // Far more than the cache holds: the shared batch is evicted, its values stay intact.
        for round in 1..40u32 {
            log.append("t", (round * 10..round * 10 + 10).map(record).collect()).await.expect("append");
        }
        for (i, r) in shared.iter().enumerate() {
            assert_eq!(r.value, vec![i as u8; 1000]);
        }
        let again = log.read_transient("t", 0, 395, 100, 1 << 20).await.expect("transient read");
        assert_eq!(again.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["r395", "r396", "r397", "r398", "r399"]);
    }

    /// Bytes of `file` in the page cache, as util-linux's `fincore` reports them.
    fn resident_bytes(file: &Path) -> u64 {
        let out = std::process::Command::new("fincore")
            .args(["--bytes", "--raw", "--noheadings", "--output", "RES"])
            .arg(file)
            .output()
            .expect("running fincore (util-linux)");
        assert!(out.status.success(), "fincore: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("a byte count")
    }

    /// Appends 24 MiB in 64 KiB records with the given window and segment size; returns the
    /// bytes of the partition's segments left in the page cache, after checking every record
    /// reads back. The writer drops pages after acknowledging, so this waits up to 10 s for
    /// `expected`.
    async fn resident_after_writing(window: u64, segment_bytes: u64, expected: impl Fn(u64) -> bool) -> u64 {
        // On a disk file system: tmpfs keeps its pages whatever the advice.
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = LogSettings {
            segment_bytes,
            page_cache_window_bytes: window,
            read_cache_bytes: 0,
            dedup_window_ms: 0,
            ..LogSettings::default()
        };
        let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir.path(), settings).await.expect("open"));
        log.create_topic("t", TopicConfig { partitions: 1, retention_ms: 0, retention_bytes: 0 }).await.expect("create");
        let record = |i: u32| NewRecord { id: format!("r{i}"), key: "k".into(), timestamp_ms: 1, value: vec![i as u8; 64 << 10].into() };
        for i in 0..384 {
            log.append("t", vec![record(i)]).await.expect("append");
        }
        let resident = || {
            let mut bytes = 0;
            for entry in std::fs::read_dir(dir.path().join("log/t/0")).expect("list") {
                let path = entry.expect("entry").path();
                if path.extension().is_some_and(|e| e == "log") {
                    bytes += resident_bytes(&path);
                }
            }
            bytes
        };
        let waited = std::time::Instant::now();
        let mut cached = resident();
        while !expected(cached) && waited.elapsed() < std::time::Duration::from_secs(10) {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            cached = resident();
        }
        let mut next = 0;
        while next < 384 {
            let read = log.read("t", 0, next, 100, 8 << 20).await.expect("read");
            for r in &read {
                assert_eq!(r.value, vec![r.offset as u8; 64 << 10], "record {}", r.offset);
            }
            next += read.len() as u64;
        }
        log.close().await.expect("close");
        cached
    }

    #[tokio::test]
    async fn written_pages_beyond_the_window_leave_the_page_cache_and_still_read_back() {
        let (window, written) = (4u64 << 20, 24u64 << 20);
        // Without drop-behind the kernel keeps (nearly) everything on a machine with free memory.
        let kept = resident_after_writing(0, 6 << 20, |_| true).await;
        assert!(kept > written / 2, "without drop-behind {kept} bytes stayed cached");
        // With it: the window, one step (an eighth of it), the batch in hand, and the pages
        // the kernel keeps at the range's edges (a large folio is dropped only whole); and
        // nothing inside the window, also where segments are smaller than the window.
        let bound = window + window / 8 + (1 << 20);
        for segment_bytes in [6 << 20, 1 << 20] {
            let dropped = resident_after_writing(window, segment_bytes, |resident| resident <= bound).await;
            assert!(dropped <= bound, "with a {window}-byte window {dropped} bytes stayed cached ({segment_bytes}-byte segments)");
            assert!(
                dropped >= window - (512 << 10),
                "with a {window}-byte window only {dropped} bytes stayed cached ({segment_bytes}-byte segments)"
            );
        }
    }

    #[tokio::test]
    async fn a_data_directory_in_use_is_refused_and_free_again_once_its_log_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = open(dir.path()).await;
        let err = EmbeddedLog::open(dir.path(), settings()).await.err().expect("a second log on the directory is refused");
        assert!(err.to_string().contains("is another justizbus serving this data directory?"), "{err}");
        first.close().await.expect("close");
        drop(first);
        for _ in 0..20 {
            let log = open(dir.path()).await;
            log.close().await.expect("close");
        }
    }

    #[tokio::test]
    async fn a_segment_of_the_old_format_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path()).await;
        log.create_topic("t", TopicConfig { partitions: 1, retention_ms: 0, retention_bytes: 0 }).await.expect("create");
        let r = NewRecord { id: "id".into(), key: "k".into(), timestamp_ms: 1, value: "v".into() };
        log.append("t", vec![r]).await.expect("append");
        log.close().await.expect("close");
        drop(log);
        let seg = dir.path().join("log/t/0/00000000000000000000.log");
        let mut bytes = std::fs::read(&seg).expect("read");
        bytes[8] = format::OLD_VERSION;
        std::fs::write(&seg, &bytes).expect("write");
        let err = EmbeddedLog::open(dir.path(), settings()).await.err().expect("refused");
        assert!(err.to_string().contains("older justizbus"), "{err}");
        assert_eq!(std::fs::read(&seg).expect("read"), bytes, "nothing cut off");
    }

    #[tokio::test]
    async fn a_checkpoint_line_cut_short_by_a_crash_is_removed_before_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path()).await;
        log.create_topic("t", TopicConfig { partitions: 1, retention_ms: 0, retention_bytes: 0 }).await.expect("create");
        let signer = crate::audit::checkpoint::Signer::generate(&dir.path().join("k.pem")).expect("key");
        let first = signer.sign("t", 0, 0, &[1; 32], 1);
        log.put_checkpoint(&first).await.expect("put");
        let file = dir.path().join("log/t/0/checkpoints.jsonl");
        let mut text = std::fs::read_to_string(&file).expect("read");
        text.push_str("{\"topic\":\"t\",\"parti");
        std::fs::write(&file, &text).expect("write");
        assert_eq!(log.list_checkpoints("t", 0).await.expect("list"), vec![first.clone()], "the torn line is skipped");
        let second = signer.sign("t", 0, 5, &[2; 32], 2);
        log.put_checkpoint(&second).await.expect("put");
        assert_eq!(log.list_checkpoints("t", 0).await.expect("list"), vec![first, second]);
        let (good, bad) = crate::audit::checkpoint::parse_checkpoint_lines(&std::fs::read_to_string(&file).expect("read"));
        assert_eq!((good.len(), bad.len()), (2, 0));
    }

    #[tokio::test]
    async fn torn_tail_is_truncated_to_last_whole_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path()).await;
        log.create_topic("t", TopicConfig { partitions: 1, retention_ms: 0, retention_bytes: 0 }).await.expect("create");
        for i in 0..5 {
            let r = NewRecord { id: format!("id-{i}"), key: "k".into(), timestamp_ms: i, value: vec![b'x'; 100].into() };
            log.append("t", vec![r]).await.expect("append");
        }
        log.close().await.expect("close");
        drop(log);
        let seg = dir.path().join("log/t/0/00000000000000000000.log");
        let len = std::fs::metadata(&seg).expect("meta").len();
        // Cut the last record in half.
        let f = std::fs::OpenOptions::new().write(true).open(&seg).expect("open");
        f.set_len(len - 60).expect("truncate");
        drop(f);
        let log = open(dir.path()).await;
        let recs = log.read("t", 0, 0, 100, 1 << 20).await.expect("read");
        assert_eq!(recs.len(), 4);
        assert_eq!(log.offsets("t", 0).await.expect("offsets").end, 4);
        // The log keeps working after recovery.
        let r = NewRecord { id: "id-new".into(), key: "k".into(), timestamp_ms: 9, value: "v".into() };
        assert_eq!(log.append("t", vec![r]).await.expect("append")[0].offset, 4);
    }

    #[tokio::test]
    async fn time_retention_deletes_whole_old_segments_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path()).await;
        log.create_topic("old", TopicConfig { partitions: 1, retention_ms: 60_000, retention_bytes: 0 }).await.expect("create");
        let now = now_ms();
        // Old records fill sealed segments (4 KiB each); the last ones are recent.
        for i in 0..40 {
            let ts = if i < 30 { now - 3_600_000 } else { now };
            let r = NewRecord { id: format!("r{i}"), key: "k".into(), timestamp_ms: ts, value: vec![b'v'; 400].into() };
            log.append("old", vec![r]).await.expect("append");
        }
        let removed = log.apply_retention().await.expect("retention");
        assert!(removed > 0, "old segments are deleted");
        let offs = log.offsets("old", 0).await.expect("offsets");
        assert!(offs.start > 0 && offs.start <= 30, "start {} moves past old segments only", offs.start);
        assert_eq!(offs.end, 40);
        let recs = log.read("old", 0, 0, 100, 1 << 20).await.expect("read");
        assert_eq!(recs.first().map(|r| r.offset), Some(offs.start), "reading below the start begins at the start");
        assert_eq!(recs.len() as u64, 40 - offs.start);
        assert_eq!(log.apply_retention().await.expect("retention"), 0, "the active segment is never deleted");
    }

    mod model {
        use super::*;
        use bytes::Bytes;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            /// Append records: (key index, value length, reuse an earlier id).
            Append(Vec<(u8, u16, bool)>),
            Read(u8, u16),
            Restart,
            /// Apply the topic's size retention (6000 bytes per partition).
            Retention,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => proptest::collection::vec((0u8..6, 0u16..600, proptest::bool::weighted(0.1)), 1..12).prop_map(Op::Append),
                3 => (0u8..3, 0u16..200).prop_map(|(p, o)| Op::Read(p, o)),
                1 => Just(Op::Restart),
                1 => Just(Op::Retention),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
            /// The log behaves like a vector per partition whose front retention may cut.
            #[test]
            fn log_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
                let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
                rt.block_on(async move {
                    let dir = tempfile::tempdir().expect("tempdir");
                    let mut log = open(dir.path()).await;
                    log.create_topic("m", TopicConfig { partitions: 3, retention_ms: 0, retention_bytes: 6000 }).await.expect("create");
                    let mut model: Vec<Vec<(String, Bytes)>> = vec![Vec::new(); 3];
                    let mut start = [0u64; 3];
                    // Every id appended: (id, key, partition, offset).
                    let mut ids: Vec<(String, Bytes, usize, u64)> = Vec::new();
                    let mut fresh_ids = 0u64;
                    for op in ops {
                        match op {
                            Op::Append(recs) => {
                                let mut batch = Vec::new();
                                for (k, len, reuse) in recs {
                                    // A retry carries the same id and key.
                                    let (id, key) = if reuse && !ids.is_empty() {
                                        let (id, key, _, _) = &ids[len as usize % ids.len()];
                                        (id.clone(), key.clone())
                                    } else {
                                        fresh_ids += 1;
                                        (format!("id-{fresh_ids}"), Bytes::from(format!("key-{k}")))
                                    };
                                    batch.push(NewRecord { id, key, timestamp_ms: 5, value: Bytes::from(vec![k; len as usize]) });
                                }
                                let res = log.append("m", batch.clone()).await.expect("append");
                                let mut seen_in_batch: Vec<String> = Vec::new();
                                for (r, a) in batch.into_iter().zip(res) {
                                    let p = partition_for_key(&r.key, 3) as usize;
                                    // An id is remembered while its record is stored.
                                    let stored = ids.iter().any(|(i, _, ip, io)| *i == r.id && *io >= start[*ip]);
                                    let known = stored || seen_in_batch.contains(&r.id);
                                    assert_eq!(a.duplicate, known, "duplicate flag of {}", r.id);
                                    if !known {
                                        assert_eq!(a.offset, model[p].len() as u64);
                                        model[p].push((r.id.clone(), r.value.clone()));
                                        seen_in_batch.push(r.id.clone());
                                        ids.push((r.id, r.key, p, a.offset));
                                    }
                                }
                            }
                            Op::Read(p, from) => {
                                let got = log.read("m", u32::from(p), u64::from(from), 10_000, 1 << 30).await.expect("read");
                                let first = u64::from(from).max(start[p as usize]) as usize;
                                let want: Vec<_> = model[p as usize].iter().skip(first).collect();
                                assert_eq!(got.len(), want.len());
                                for (g, w) in got.iter().zip(want) {
                                    assert_eq!((&g.id, &g.value), (&w.0, &w.1));
                                }
                            }
                            Op::Restart => {
                                log.close().await.expect("close");
                                drop(log);
                                log = open(dir.path()).await;
                            }
                            Op::Retention => {
                                log.apply_retention().await.expect("retention");
                            }
                        }
                        for p in 0..3u32 {
                            let offs = log.offsets("m", p).await.expect("offsets");
                            assert!(offs.start >= start[p as usize] && offs.start <= offs.end);
                            assert_eq!(offs.end, model[p as usize].len() as u64);
                            start[p as usize] = offs.start;
                        }
                    }
                });
            }
        }
    }
}
