//! `Publisher`: unary and client-streamed batch publish.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use justizbus_proto::v1 as pb;
use tonic::{Request, Response, Status, Streaming};

use super::Bus;
use crate::event::{now_ms, Event};
use crate::log::NewRecord;
use crate::security::auth::Caller;
use crate::Error;

/// Most events in one `PublishBatch` stream.
pub const MAX_BATCH_EVENTS: usize = 100_000;
/// Most bytes in one `PublishBatch` stream.
pub const MAX_BATCH_BYTES: usize = 256 * 1024 * 1024;

/// The `Publisher` service.
pub struct PublisherService {
    bus: Arc<Bus>,
}

impl PublisherService {
    /// A service over the bus.
    pub fn new(bus: Arc<Bus>) -> Self {
        PublisherService { bus }
    }

    /// Validates one request into (topic, record).
    async fn record(
        &self,
        caller: &Caller,
        call: &str,
        req: pb::PublishRequest,
        index: Option<usize>,
    ) -> Result<(String, NewRecord), Error> {
        let at = |field: &str| index.map_or_else(|| field.to_string(), |i| format!("events[{i}].{field}"));
        if req.topic.is_empty() {
            return Err(Error::invalid(at("topic"), "the topic is required"));
        }
        if crate::routing::mailbox::is_mailbox_topic(&req.topic) {
            return Err(Error::invalid(at("topic"), "mailbox topics are written by the router: publish to the ingest topic"));
        }
        crate::event::check_client_topic(&at("topic"), &req.topic)?;
        let wire = req.event.ok_or_else(|| Error::invalid(at("event"), "the event is required"))?;
        let event = Event::from_wire(wire, self.bus.config.log_settings.max_event_bytes).map_err(|e| match e {
            Error::InvalidArgument { field, reason } => Error::invalid(at(&field), reason),
            other => other,
        })?;
        self.bus.gate.check_sender(caller, call, &event.wire.sender)?;
        // Attachments must reference stored blobs of the stated size (a stat per attachment)
        // that the caller may read: routing hands them to the recipients.
        for (i, a) in event.wire.attachments.iter().enumerate() {
            self.bus.check_blob_read(caller, call, &a.sha256).await?;
            match self.bus.blob_info(&a.sha256).await? {
                None => return Err(Error::UnknownBlob(a.sha256.clone())),
                Some(info) if info.size != a.size => {
                    return Err(Error::invalid(at(&format!("event.attachments[{i}].size")), format!("the blob has {} bytes", info.size)))
                }
                Some(_) => {}
            }
        }
        let record = NewRecord {
            id: event.wire.id.clone(),
            key: Bytes::from(event.wire.subject.clone().into_bytes()),
            timestamp_ms: now_ms(),
            value: Bytes::from(event.encode()),
        };
        Ok((req.topic, record))
    }
}

fn response(id: String, a: crate::log::Appended) -> pb::PublishResponse {
    pb::PublishResponse { id, partition: a.partition, offset: a.offset, duplicate: a.duplicate }
}

#[tonic::async_trait]
impl pb::publisher_server::Publisher for PublisherService {
    async fn publish(&self, request: Request<pb::PublishRequest>) -> Result<Response<pb::PublishResponse>, Status> {
        let caller = self.bus.gate.caller(&request, "Publish")?;
        let (topic, record) = self.record(&caller, "Publish", request.into_inner(), None).await?;
        let id = record.id.clone();
        let appended = self.bus.log.append(&topic, vec![record]).await?;
        let a = appended.into_iter().next().ok_or_else(|| Status::internal("append returned no result"))?;
        tracing::trace!(topic, id, partition = a.partition, offset = a.offset, duplicate = a.duplicate, "published");
        Ok(Response::new(response(id, a)))
    }

    async fn publish_batch(&self, request: Request<Streaming<pb::PublishRequest>>) -> Result<Response<pb::PublishBatchResponse>, Status> {
        let caller = self.bus.gate.caller(&request, "PublishBatch")?;
        let mut stream = request.into_inner();
        // Validate the whole batch before storing any of it.
        let mut by_topic: BTreeMap<String, (Vec<usize>, Vec<NewRecord>)> = BTreeMap::new();
        let (mut count, mut bytes) = (0usize, 0usize);
        while let Some(req) = stream.message().await? {
            if count >= MAX_BATCH_EVENTS {
                return Err(Error::invalid("events", format!("a batch holds at most {MAX_BATCH_EVENTS} events")).into());
            }
            let (topic, record) = self.record(&caller, "PublishBatch", req, Some(count)).await?;
            bytes += record.value.len();
            if bytes > MAX_BATCH_BYTES {
                return Err(Error::invalid("events", format!("a batch holds at most {MAX_BATCH_BYTES} bytes")).into());
            }
            let entry = by_topic.entry(topic).or_default();
            entry.0.push(count);
            entry.1.push(record);
            count += 1;
        }
        // Every topic must exist before anything is appended.
        for topic in by_topic.keys() {
            self.bus.log.partition_count(topic).await?;
        }
        let mut results = vec![pb::PublishResponse::default(); count];
        for (topic, (indexes, records)) in by_topic {
            let ids: Vec<String> = records.iter().map(|r| r.id.clone()).collect();
            let appended = self.bus.log.append(&topic, records).await?;
            for ((i, id), a) in indexes.into_iter().zip(ids).zip(appended) {
                results[i] = response(id, a);
            }
        }
        Ok(Response::new(pb::PublishBatchResponse { results }))
    }
}
