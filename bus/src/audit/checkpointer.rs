//! Signs a checkpoint of every partition that grew, after `checkpoint_records` new records or
//! `checkpoint_interval_ms` after its first unsigned record, whichever comes first; and once
//! more for everything unsigned at shutdown.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::checkpoint::{Checkpoint, Signer};
use super::{AuditSettings, Chains};
use crate::event::now_ms;
use crate::log::Log;
use crate::{Error, Result};

/// What the checkpointer knows of one partition.
#[derive(Debug, Clone, Copy, Default)]
struct Signed {
    /// The offset after the last signed one (0: none signed).
    covered: u64,
    /// Since when records past `covered` wait for a signature.
    pending_since: Option<Instant>,
}

/// Signs checkpoints of the partitions of one log.
pub struct Checkpointer {
    log: Arc<dyn Log>,
    chains: Arc<Chains>,
    signer: Arc<Signer>,
    settings: AuditSettings,
    partitions: Mutex<HashMap<(String, u32), Signed>>,
}

impl Checkpointer {
    /// A checkpointer for `log` (the log that stores the records, not a view over it).
    pub fn new(log: Arc<dyn Log>, chains: Arc<Chains>, signer: Arc<Signer>, settings: AuditSettings) -> Self {
        Checkpointer { log, chains, signer, settings, partitions: Mutex::new(HashMap::new()) }
    }

    /// The key that signs.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// Signs every partition that is due (all that have unsigned records when `all`); returns
    /// how many checkpoints were stored.
    pub async fn tick(&self, all: bool) -> Result<usize> {
        let mut made = 0;
        for topic in self.log.list_topics().await? {
            for (p, offsets) in topic.partitions.iter().enumerate() {
                // One partition that cannot be signed does not hold up the others.
                match self.tick_partition(&topic.name, p as u32, offsets.end, all).await {
                    Ok(signed) => made += usize::from(signed),
                    Err(e) => tracing::warn!(topic = %topic.name, partition = p, error = %e, "signing a checkpoint failed; retrying"),
                }
            }
        }
        Ok(made)
    }

    /// Signs one partition if it is due; true when it did.
    async fn tick_partition(&self, topic: &str, p: u32, end: u64, all: bool) -> Result<bool> {
        if end == 0 {
            return Ok(false);
        }
        let mut partitions = self.partitions.lock().await;
        let signed = self.known(&mut partitions, topic, p).await?;
        if end <= signed.covered {
            return Ok(false);
        }
        let since = *signed.pending_since.get_or_insert_with(Instant::now);
        let due = all
            || end - signed.covered >= self.settings.checkpoint_records.max(1)
            || since.elapsed() >= Duration::from_millis(self.settings.checkpoint_interval_ms);
        if due {
            self.sign(&mut partitions, topic, p, end - 1).await?;
        }
        Ok(due)
    }

    /// A checkpoint at or after `offset`: the first stored one, or one signed now.
    pub async fn covering(&self, topic: &str, partition: u32, offset: u64) -> Result<Checkpoint> {
        let mut partitions = self.partitions.lock().await;
        if let Some(cp) = self.log.list_checkpoints(topic, partition).await?.into_iter().find(|c| c.offset >= offset) {
            return Ok(cp);
        }
        let end = self.log.offsets(topic, partition).await?.end;
        if end <= offset {
            return Err(Error::OffsetOutOfRange { partition, offset, start: 0, end });
        }
        self.known(&mut partitions, topic, partition).await?;
        self.sign(&mut partitions, topic, partition, end - 1).await
    }

    /// The partition's entry, loaded from its stored checkpoints on first sight.
    async fn known<'a>(&self, partitions: &'a mut HashMap<(String, u32), Signed>, topic: &str, partition: u32) -> Result<&'a mut Signed> {
        let key = (topic.to_string(), partition);
        if !partitions.contains_key(&key) {
            let last = self.log.list_checkpoints(topic, partition).await?.last().map_or(0, |c| c.offset + 1);
            partitions.insert(key.clone(), Signed { covered: last, pending_since: None });
        }
        partitions.get_mut(&key).ok_or_else(|| Error::Internal("checkpoint state vanished".into()))
    }

    async fn sign(&self, partitions: &mut HashMap<(String, u32), Signed>, topic: &str, partition: u32, offset: u64) -> Result<Checkpoint> {
        let chain = self.chains.before(topic, partition, offset + 1).await?;
        let checkpoint = self.signer.sign(topic, partition, offset, &chain, now_ms());
        self.log.put_checkpoint(&checkpoint).await?;
        tracing::debug!(topic, partition, offset, chain = %checkpoint.chain, "checkpoint signed");
        partitions.insert((topic.to_string(), partition), Signed { covered: offset + 1, pending_since: None });
        Ok(checkpoint)
    }

    /// Runs until aborted: a tick every quarter of the interval (at most every second).
    pub async fn run(self: Arc<Self>) {
        let every = Duration::from_millis((self.settings.checkpoint_interval_ms / 4).clamp(20, 1000));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.tick(false).await {
                tracing::warn!(error = %e, "signing checkpoints failed; retrying");
            }
        }
    }
}
