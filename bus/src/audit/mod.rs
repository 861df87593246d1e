//! Audit (DESIGN.md section 8): the per-partition hash chain, signed checkpoints, verification
//! offline and online, exports with proofs, and the delivery journal.
//!
//! - [`chain`]: the chain's definition, shared by both backends and every checker;
//! - [`checkpoint`]: Ed25519-signed checkpoints and key files;
//! - [`Chains`]: chain values of stored records, read where stored (embedded) or computed in
//!   offset order from the nearest checkpoint (Kafka);
//! - [`checkpointer`]: the task that signs checkpoints every N records or T seconds;
//! - [`verify`]: one checker that every verification feeds records and checkpoints into;
//! - [`offline`]: `audit verify --data-dir`, straight from segment files;
//! - [`export`]: the proof export format (`replay --with-proof`, `audit check-export`);
//! - [`journal`]: the delivery journal topic and `audit trail`.

pub mod chain;
pub mod checkpoint;
pub mod checkpointer;
pub mod export;
pub mod journal;
pub mod offline;
pub mod verify;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use self::chain::{ChainHash, GENESIS};
use crate::log::{Log, StoredRecord};
use crate::{Error, Result};

/// The `[audit]` section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// The Ed25519 signing key (PKCS#8 PEM). Without it the bus keeps the chain but signs no
    /// checkpoints.
    pub signing_key: Option<PathBuf>,
    /// A checkpoint after at most this many new records of a partition.
    pub checkpoint_records: u64,
    /// A checkpoint at most this long after a partition's last new record.
    pub checkpoint_interval_ms: u64,
    /// Write the delivery journal (acks, redeliveries, dead letters, quarantine, receipts).
    pub journal: bool,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings { signing_key: None, checkpoint_records: 10_000, checkpoint_interval_ms: 5_000, journal: true }
    }
}

/// The audit parts of a running bus, shared by the services.
pub struct Audit {
    /// The log as stored (not the mailbox view over it): what chains and checkpoints cover.
    pub log: Arc<dyn Log>,
    /// Chain values of stored records.
    pub chains: Arc<Chains>,
    /// Signs checkpoints, when a signing key is configured.
    pub checkpointer: Option<Arc<checkpointer::Checkpointer>>,
    /// The delivery journal, when on.
    pub journal: Option<journal::Journal>,
}

/// Most records read at once while computing a chain.
const CHAIN_READ: usize = 1024;

/// Chain values of stored records, for checkpoints and exports.
///
/// Where the log stores each record's chain value (embedded) they are read; otherwise (Kafka)
/// they are computed in offset order from the nearest checkpoint before, or from offset 0. The
/// last computed position of each partition is remembered, so following a growing partition
/// reads each record once.
pub struct Chains {
    log: Arc<dyn Log>,
    /// (topic, partition) -> (next offset, h(next offset - 1)).
    known: Mutex<HashMap<(String, u32), (u64, ChainHash)>>,
}

impl Chains {
    /// Chains of the records of `log`.
    pub fn new(log: Arc<dyn Log>) -> Self {
        Chains { log, known: Mutex::new(HashMap::new()) }
    }

    fn remember(&self, topic: &str, partition: u32, next: u64, chain: ChainHash) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let entry = known.entry((topic.to_string(), partition)).or_insert((next, chain));
        if next >= entry.0 {
            *entry = (next, chain);
        }
    }

    /// h(offset - 1): the chain value before `offset`.
    pub async fn before(&self, topic: &str, partition: u32, offset: u64) -> Result<ChainHash> {
        if offset == 0 {
            return Ok(GENESIS);
        }
        if let Some(h) = self.log.stored_chain_before(topic, partition, offset).await? {
            return Ok(h);
        }
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner()).get(&(topic.to_string(), partition)).copied();
        let mut anchor = known.filter(|(next, _)| *next <= offset);
        let checkpoints = self.log.list_checkpoints(topic, partition).await?;
        if let Some(cp) = checkpoints.iter().rev().find(|c| c.offset < offset) {
            if anchor.is_none_or(|(next, _)| cp.offset + 1 > next) {
                let chain = cp
                    .chain_hash()
                    .ok_or_else(|| Error::State(format!("checkpoint of {topic}/{partition} at {} is malformed", cp.offset)))?;
                anchor = Some((cp.offset + 1, chain));
            }
        }
        let (mut next, mut chain) = match anchor {
            Some(a) => a,
            None => {
                let start = self.log.offsets(topic, partition).await?.start;
                if start > 0 {
                    return Err(Error::State(format!(
                        "the chain of {topic}/{partition} before offset {offset} cannot be computed: the log starts at {start} and no checkpoint precedes"
                    )));
                }
                (0, GENESIS)
            }
        };
        while next < offset {
            let records = self.log.read(topic, partition, next, CHAIN_READ.min((offset - next) as usize), 4 << 20).await?;
            let Some(first) = records.first() else {
                return Err(Error::State(format!(
                    "{topic}/{partition}: offset {offset} is past the end (computing its chain reached {next})"
                )));
            };
            if first.offset != next {
                return Err(Error::State(format!("{topic}/{partition}: offset {next} is gone (log starts at {})", first.offset)));
            }
            for r in records.iter().take_while(|r| r.offset < offset) {
                chain = chain::next(&chain, r.offset, r.timestamp_ms, r.id.as_bytes(), &r.key, &r.value);
                next = r.offset + 1;
            }
        }
        self.remember(topic, partition, next, chain);
        Ok(chain)
    }

    /// Reads records like [`Log::read`], each with its chain value.
    pub async fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<(StoredRecord, ChainHash)>> {
        let records = self.log.read(topic, partition, from, max_records, max_bytes).await?;
        if records.first().is_some_and(|r| r.offset != from) {
            return Err(Error::State(format!(
                "{topic}/{partition}: records from {from} were removed (the log now starts at {})",
                records[0].offset
            )));
        }
        if records.iter().all(|r| r.chain.is_some()) {
            return Ok(records
                .into_iter()
                .map(|r| {
                    let h = r.chain.unwrap_or(GENESIS);
                    (r, h)
                })
                .collect());
        }
        let Some(first) = records.first() else { return Ok(Vec::new()) };
        let mut chain = self.before(topic, partition, first.offset).await?;
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            chain = chain::next(&chain, r.offset, r.timestamp_ms, r.id.as_bytes(), &r.key, &r.value);
            out.push((r, chain));
        }
        if let Some((r, h)) = out.last() {
            self.remember(topic, partition, r.offset + 1, *h);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::log::embedded::EmbeddedLog;
    use crate::log::{NewRecord, TopicConfig};

    /// An export from the middle of a 1,000,000-record partition finds its chain value and its
    /// records through the index: with the partition's first segment destroyed, it still works.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_range_in_the_middle_of_a_million_records_is_read_through_the_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = crate::config::LogSettings { segment_bytes: 8 << 20, ..Default::default() };
        let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir.path(), settings).await.expect("open"));
        log.create_topic("big", TopicConfig { partitions: 1, retention_ms: 0, retention_bytes: 0 }).await.expect("create");
        for batch in 0..100u64 {
            let records = (0..10_000u64)
                .map(|i| {
                    let n = batch * 10_000 + i;
                    NewRecord { id: format!("e{n}"), key: "k".into(), timestamp_ms: n as i64, value: n.to_le_bytes().to_vec().into() }
                })
                .collect();
            log.append("big", records).await.expect("append");
        }
        assert_eq!(log.offsets("big", 0).await.expect("offsets").end, 1_000_000);
        let first = dir.path().join("log/big/0/00000000000000000000.log");
        std::fs::OpenOptions::new().write(true).open(&first).expect("open segment").write_all_at(&vec![0u8; 1 << 20], 0).expect("damage");
        assert!(log.read("big", 0, 0, 10, 1 << 20).await.is_err(), "the damage is where a read from the start would go");

        let chains = Chains::new(log.clone());
        let before = chains.before("big", 0, 500_000).await.expect("chain before the range");
        let range = chains.read("big", 0, 500_000, 100, 1 << 20).await.expect("range");
        assert_eq!(range.len(), 100);
        let keys = checkpoint::TrustedKeys(vec![checkpoint::PublicKey([0u8; 32])]);
        let mut check = verify::PartitionCheck::new("big", 0, &keys, Vec::new(), 500_000, before);
        for (r, h) in &range {
            check.record(r.offset, r.timestamp_ms, r.id.as_bytes(), &r.key, &r.value, Some(*h));
        }
        let report = check.finish(false);
        assert!(report.ok(), "{:?}", report.findings);
        assert_eq!(report.end, 500_100);
        log.close().await.expect("close");
    }
}
