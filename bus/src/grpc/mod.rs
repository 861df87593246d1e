//! The gRPC services of `justizbus.v1`: thin adapters from the generated types to the log and
//! the delivery engine. Conversions between generated and core types live here, at the edge.

pub mod admin;
pub mod audit;
pub mod blobs;
pub mod publish;
pub mod replay;
pub mod subscribe;

use std::sync::Arc;

use justizbus_proto::v1 as pb;

use crate::config::ServerConfig;
use crate::delivery::Delivery;
use crate::event::{ms_timestamp, Event};
use crate::log::{Log, StoredRecord};
use crate::Result;

/// What every service shares.
pub struct Bus {
    /// The log backend.
    pub log: Arc<dyn Log>,
    /// Consumer groups.
    pub delivery: Arc<Delivery>,
    /// Server configuration.
    pub config: ServerConfig,
    /// Attached documents.
    pub blobs: Arc<crate::blob::BlobStore>,
    /// Participants' mailboxes, when routing is on (the same store `log` serves them from).
    pub mailboxes: Option<Arc<crate::routing::mailbox::MailboxLog>>,
    /// Stores the receipts of mailbox subscriptions, when routing is on.
    pub receipts: Option<subscribe::ReceiptWriter>,
    /// Identifies callers and checks what they may do.
    pub gate: crate::security::auth::Gate,
    /// Hash chains, checkpoints and the delivery journal.
    pub audit: Arc<crate::audit::Audit>,
}

impl Bus {
    /// A blob's size: from this node's blob store, or from the log when another node of a
    /// shared log (Kafka) stored it.
    pub async fn blob_info(&self, sha256: &str) -> Result<Option<crate::blob::BlobInfo>> {
        if let Some(info) = self.blobs.stat(sha256)? {
            return Ok(Some(info));
        }
        Ok(self.log.blob_size(sha256).await?.map(|size| crate::blob::BlobInfo { sha256: sha256.to_string(), size }))
    }

    /// Allows `caller` to read blob `sha256`: one that reads every blob, or one it was granted
    /// ([`Log::grant_blobs`]). A blob that does not exist is refused alike, so a refusal tells
    /// nothing about what is stored.
    pub async fn check_blob_read(&self, caller: &crate::security::auth::Caller, call: &str, sha256: &str) -> Result<()> {
        if !crate::blob::is_sha256_hex(sha256) {
            return Err(crate::Error::invalid("sha256", "must be 64 lower-case hex digits"));
        }
        if caller.reads_every_blob() || self.log.blob_granted(sha256, caller.id()).await? {
            return Ok(());
        }
        Err(caller.blob_refused(call, sha256))
    }

    /// Opens a blob for reading; one that only the log holds (stored through another node) is
    /// fetched into this node's store first, and checked against its hash on the way.
    pub async fn open_blob(&self, sha256: &str) -> Result<Option<std::fs::File>> {
        if let Some(file) = self.blobs.open_blob(sha256)? {
            return Ok(Some(file));
        }
        let store = self.blobs.clone();
        let mut upload = store.begin()?;
        if !self.log.read_blob(sha256, &mut |chunk| upload.write(chunk)).await? {
            return Ok(None);
        }
        let wanted = sha256.to_string();
        tokio::task::spawn_blocking(move || {
            store.commit(upload, &wanted, 0)?;
            store.open_blob(&wanted)
        })
        .await
        .map_err(|e| crate::Error::Internal(format!("blob task: {e}")))?
    }
}

/// A stored record as the wire type replay and admin calls return.
pub fn replay_record(topic: &str, r: &StoredRecord) -> Result<pb::ReplayRecord> {
    Ok(pb::ReplayRecord {
        topic: topic.to_string(),
        partition: r.partition,
        offset: r.offset,
        key: String::from_utf8_lossy(&r.key).into_owned(),
        log_time: Some(ms_timestamp(r.timestamp_ms)),
        event: Some(Event::decode(&r.value)?),
    })
}
