//! `Auditor`: the stored topics, exports with chain values and checkpoints, the signing key,
//! and an event's trail from the delivery journal. Auditor or admin role only.

use std::pin::Pin;
use std::sync::Arc;

use base64::Engine;
use justizbus_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::Bus;
use crate::audit::chain::{hex, record_digest};
use crate::audit::export::{ExportDigest, ExportLine, ExportRange, ExportRecord};
use crate::audit::journal;
use crate::routing::directory::Role;
use crate::{Error, Result};

/// The `Auditor` service.
pub struct AuditorService {
    bus: Arc<Bus>,
}

impl AuditorService {
    /// A service over the bus.
    pub fn new(bus: Arc<Bus>) -> Self {
        AuditorService { bus }
    }

    fn allow<T>(&self, request: &Request<T>, call: &str) -> Result<String, Status> {
        let caller = self.bus.gate.caller(request, call)?;
        caller.require_role(call, &[Role::Auditor, Role::Admin])?;
        Ok(caller.id().to_string())
    }
}

fn line(l: &ExportLine) -> Result<pb::ExportLine> {
    Ok(pb::ExportLine { json: serde_json::to_string(l).map_err(|e| Error::Internal(format!("encoding an export line: {e}")))? })
}

/// Records read per step of an export.
const EXPORT_READ: usize = 1024;

/// Streams an export of `range`; with a proof, continues by digest to the checkpoint at `cover`.
async fn export(
    audit: Arc<crate::audit::Audit>,
    range: ExportRange,
    cover: Option<u64>,
    tx: &mpsc::Sender<Result<pb::ExportLine, Status>>,
) -> Result<()> {
    let send = |l: ExportLine| async move { tx.send(line(&l).map_err(Status::from)).await.map_err(|_| Error::ShuttingDown) };
    let (topic, partition, from, to) = (range.topic.clone(), range.partition, range.from, range.to);
    let topic = topic.as_str();
    send(ExportLine::Range(range)).await?;
    let checkpoints = audit.log.list_checkpoints(topic, partition).await?;
    // Read after the checkpoints: a checkpoint is stored only after the records it covers.
    let end_now = audit.log.offsets(topic, partition).await?.end;
    for cp in checkpoints {
        let wanted = match cover {
            // A proof carries the checkpoints within it.
            Some(c) => cp.offset + 1 >= from && cp.offset <= c,
            // A whole export (verification) carries those of its range, and any beyond the
            // current end: evidence that records were removed. Those of records appended since
            // the range was fixed are not its business.
            None => cp.offset < to || cp.offset >= end_now,
        };
        if wanted {
            send(ExportLine::Checkpoint(cp)).await?;
        }
    }
    let end = cover.map_or(to, |c| c + 1).max(to);
    let mut next = from;
    while next < end {
        let records = audit.chains.read(topic, partition, next, EXPORT_READ, 4 << 20).await?;
        if records.is_empty() {
            break;
        }
        for (rec, chain) in records {
            if rec.offset >= end {
                break;
            }
            next = rec.offset + 1;
            let l = if rec.offset < to {
                ExportLine::Record(ExportRecord {
                    offset: rec.offset,
                    timestamp_ms: rec.timestamp_ms,
                    id: rec.id.clone(),
                    key_base64: base64::engine::general_purpose::STANDARD.encode(&rec.key),
                    value_base64: base64::engine::general_purpose::STANDARD.encode(&rec.value),
                    chain: hex(&chain),
                })
            } else {
                ExportLine::Digest(ExportDigest {
                    offset: rec.offset,
                    digest: hex(&record_digest(rec.timestamp_ms, rec.id.as_bytes(), &rec.key, &rec.value)),
                    chain: hex(&chain),
                })
            };
            send(l).await?;
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl pb::auditor_server::Auditor for AuditorService {
    type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportLine, Status>> + Send>>;

    async fn topics(&self, request: Request<pb::ListTopicsRequest>) -> Result<Response<pb::ListTopicsResponse>, Status> {
        self.allow(&request, "Auditor.Topics")?;
        let topics = self.bus.audit.log.list_topics().await?;
        Ok(Response::new(pb::ListTopicsResponse { topics: topics.into_iter().map(Into::into).collect() }))
    }

    async fn export(&self, request: Request<pb::ExportRequest>) -> Result<Response<Self::ExportStream>, Status> {
        let caller = self.allow(&request, "Auditor.Export")?;
        let r = request.into_inner();
        let audit = self.bus.audit.clone();
        let info = audit.log.describe_topic(&r.topic).await?;
        if r.partition >= info.config.partitions {
            return Err(Error::UnknownPartition { topic: r.topic, partition: r.partition, partitions: info.config.partitions }.into());
        }
        let offs = info.partitions[r.partition as usize];
        let mut from = r.from_offset.unwrap_or(offs.start);
        let to = r.to_offset.unwrap_or(offs.end);
        if from < offs.start || from > offs.end {
            return Err(Error::OffsetOutOfRange { partition: r.partition, offset: from, start: offs.start, end: offs.end }.into());
        }
        if to < from || to > offs.end {
            return Err(Error::invalid("to_offset", format!("must be between {from} and the end {}, not {to}", offs.end)).into());
        }
        // A proof ends at a signed checkpoint that covers the range: a stored one, or one
        // signed now.
        let cover = match (r.prove, to > from) {
            (true, true) => {
                let last = to - 1;
                match &audit.checkpointer {
                    Some(c) => Some(c.covering(&r.topic, r.partition, last).await?.offset),
                    None => match audit.log.list_checkpoints(&r.topic, r.partition).await?.into_iter().find(|c| c.offset >= last) {
                        Some(c) => Some(c.offset),
                        None => {
                            return Err(Status::failed_precondition(format!(
                                "no signed checkpoint covers offset {last} of {}/{} yet, and this server has no signing key",
                                r.topic, r.partition
                            )))
                        }
                    },
                }
            }
            _ => None,
        };
        let chain_before = match audit.chains.before(&r.topic, r.partition, from).await {
            Ok(h) => h,
            // Retention removed the records a computed chain (Kafka) would start from: a whole
            // export starts at the first checkpoint within what is stored.
            Err(e) if r.from_offset.is_none() && from > 0 => {
                let checkpoints = audit.log.list_checkpoints(&r.topic, r.partition).await?;
                let Some(cp) = checkpoints.into_iter().find(|c| c.offset + 1 >= from && c.offset < to) else { return Err(e.into()) };
                tracing::warn!(topic = %r.topic, partition = r.partition, from, verifiable_from = cp.offset + 1, "records before the first checkpoint after the log start cannot be chained");
                from = cp.offset + 1;
                cp.chain_hash().ok_or_else(|| Error::State(format!("checkpoint at {} is malformed", cp.offset)))?
            }
            Err(e) => return Err(e.into()),
        };
        tracing::info!(topic = %r.topic, partition = r.partition, from, to, ?cover, caller, "export started");
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let range = ExportRange { topic: r.topic, partition: r.partition, from, to, chain_before: hex(&chain_before) };
            if let Err(e) = export(audit, range, cover, &tx).await {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn signing_key(&self, request: Request<pb::SigningKeyRequest>) -> Result<Response<pb::SigningKeyResponse>, Status> {
        self.bus.gate.caller(&request, "Auditor.SigningKey")?;
        let public_key = self.bus.audit.checkpointer.as_ref().map(|c| c.signer().public_key().hex()).unwrap_or_default();
        Ok(Response::new(pb::SigningKeyResponse { public_key }))
    }

    async fn trail(&self, request: Request<pb::TrailRequest>) -> Result<Response<pb::TrailResponse>, Status> {
        self.allow(&request, "Auditor.Trail")?;
        let r = request.into_inner();
        if r.event_id.is_empty() || r.event_id.len() > 1024 {
            return Err(Error::invalid("event_id", "must be 1 to 1024 bytes long").into());
        }
        if self.bus.audit.journal.is_none() {
            return Err(Status::failed_precondition("the delivery journal is off on this server (audit.journal = false)"));
        }
        let since = r.since.as_ref().map(crate::event::timestamp_ms);
        let entries = journal::trail(self.bus.audit.log.as_ref(), &r.event_id, since).await?;
        let entries_json = entries.iter().map(|e| serde_json::to_string(e).unwrap_or_default()).collect();
        Ok(Response::new(pb::TrailResponse { entries_json }))
    }
}
