//! The dedup index of a topic: event id -> position, for idempotent publish within a window.
//!
//! One sled tree per topic with three kinds of keys, written in one atomic batch per commit:
//! `i<id>` -> partition, offset, time recorded; `t<timestamp><id>` (expiry order); and
//! `u<partition>` -> the offset up to which the partition's ids are recorded. The ids are
//! recorded after the log sync, and sled may lose its last writes in a crash, so on open each
//! partition re-records the ids of the records after its `u` mark: the log is the truth.

use std::sync::Arc;

use sled::Tree;

use super::partition::Partition;
use crate::event::now_ms;
use crate::log::NewRecord;
use crate::Result;

/// Handle to a topic's dedup tree (cheap to clone).
#[derive(Clone, Debug)]
pub struct DedupIndex {
    tree: Tree,
    window_ms: u64,
}

impl DedupIndex {
    /// Wraps a tree; a window of 0 disables deduplication.
    pub fn new(tree: Tree, window_ms: u64) -> Self {
        DedupIndex { tree, window_ms }
    }

    fn id_key(id: &str) -> Vec<u8> {
        let mut k = Vec::with_capacity(id.len() + 1);
        k.push(b'i');
        k.extend_from_slice(id.as_bytes());
        k
    }

    fn mark_key(partition: u32) -> [u8; 5] {
        let mut k = [b'u', 0, 0, 0, 0];
        k[1..].copy_from_slice(&partition.to_be_bytes());
        k
    }

    /// The stored position of `id`, if it was appended within the window.
    pub fn lookup(&self, id: &str) -> Result<Option<(u32, u64)>> {
        if self.window_ms == 0 {
            return Ok(None);
        }
        let Some(v) = self.tree.get(Self::id_key(id))? else { return Ok(None) };
        if v.len() != 20 {
            return Ok(None);
        }
        let partition = u32::from_be_bytes([v[0], v[1], v[2], v[3]]);
        let offset = u64::from_be_bytes(v[4..12].try_into().unwrap_or_default());
        let ts = i64::from_be_bytes(v[12..20].try_into().unwrap_or_default());
        if ts < now_ms().saturating_sub(self.window_ms as i64) {
            return Ok(None);
        }
        Ok(Some((partition, offset)))
    }

    /// Records the ids of records stored at `base..next` of a partition.
    pub fn record(&self, partition: u32, records: &[&NewRecord], base: u64, next: u64) -> Result<()> {
        if self.window_ms == 0 {
            return Ok(());
        }
        // The window runs from when the bus stored the id, whatever the record's own time.
        let now = now_ms();
        let mut batch = sled::Batch::default();
        for (i, r) in records.iter().enumerate() {
            let mut v = [0u8; 20];
            v[0..4].copy_from_slice(&partition.to_be_bytes());
            v[4..12].copy_from_slice(&(base + i as u64).to_be_bytes());
            v[12..20].copy_from_slice(&now.to_be_bytes());
            batch.insert(Self::id_key(&r.id), &v[..]);
            let mut t = Vec::with_capacity(9 + r.id.len());
            t.push(b't');
            t.extend_from_slice(&(now.max(0) as u64).to_be_bytes());
            t.extend_from_slice(r.id.as_bytes());
            batch.insert(t, &[][..]);
        }
        batch.insert(&Self::mark_key(partition)[..], &next.to_be_bytes()[..]);
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// Re-records the ids of the partition's records that sled may have lost in a crash.
    pub fn recover(&self, partition: &Arc<Partition>, log_start: u64, end: u64) -> Result<()> {
        if self.window_ms == 0 {
            return Ok(());
        }
        let mark =
            self.tree.get(Self::mark_key(partition.id))?.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map_or(0, u64::from_be_bytes);
        let mut from = mark.max(log_start);
        let mut recovered = 0usize;
        while from < end {
            let records = partition.read(from, 4096, 16 << 20)?;
            let Some(last) = records.last() else { break };
            let next = last.offset + 1;
            let as_new: Vec<NewRecord> = records
                .iter()
                .map(|r| NewRecord { id: r.id.clone(), key: r.key.clone(), timestamp_ms: r.timestamp_ms, value: bytes::Bytes::new() })
                .collect();
            let refs: Vec<&NewRecord> = as_new.iter().collect();
            // Offsets are consecutive within a partition, so base = first offset.
            self.record(partition.id, &refs, records[0].offset, next)?;
            recovered += records.len();
            from = next;
        }
        if recovered > 0 {
            tracing::info!(topic = %partition.topic, partition = partition.id, recovered, "dedup index: re-recorded ids after the last recorded mark");
        }
        Ok(())
    }

    /// Forgets ids older than the window; returns how many.
    pub fn purge(&self) -> Result<usize> {
        if self.window_ms == 0 {
            return Ok(0);
        }
        let cutoff = now_ms().saturating_sub(self.window_ms as i64).max(0) as u64;
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self.tree.range(&b"t"[..]..) {
            let (k, _) = item?;
            if k.first() != Some(&b't') || k.len() < 9 {
                break;
            }
            let ts = u64::from_be_bytes(k[1..9].try_into().unwrap_or_default());
            if ts >= cutoff {
                break;
            }
            batch.remove(k.clone());
            let mut id_key = vec![b'i'];
            id_key.extend_from_slice(&k[9..]);
            batch.remove(id_key);
            n += 1;
        }
        self.tree.apply_batch(batch)?;
        Ok(n)
    }
}
