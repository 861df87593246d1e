//! `Replayer`: streams stored events of a range without touching any consumer group.

use std::pin::Pin;
use std::sync::Arc;

use justizbus_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{replay_record, Bus};
use crate::event::timestamp_ms;
use crate::routing::directory::Role;
use crate::{Error, Result};

/// The `Replayer` service.
pub struct ReplayerService {
    bus: Arc<Bus>,
}

impl ReplayerService {
    /// A service over the bus.
    pub fn new(bus: Arc<Bus>) -> Self {
        ReplayerService { bus }
    }
}

/// One partition's range to stream: `[from, to)`.
struct Range {
    partition: u32,
    from: u64,
    to: u64,
}

impl ReplayerService {
    /// Resolves the request into ranges, checking everything before streaming starts.
    async fn ranges(&self, req: &pb::ReplayRequest) -> Result<Vec<Range>> {
        let info = self.bus.log.describe_topic(&req.topic).await?;
        if req.from_offset.is_some() && req.from_time.is_some() {
            return Err(Error::invalid("from_time", "give from_offset or from_time, not both"));
        }
        let partitions: Vec<u32> = match req.partition {
            Some(p) if p >= info.config.partitions => {
                return Err(Error::UnknownPartition { topic: req.topic.clone(), partition: p, partitions: info.config.partitions })
            }
            Some(p) => vec![p],
            None => (0..info.config.partitions).collect(),
        };
        let mut ranges = Vec::with_capacity(partitions.len());
        for p in partitions {
            let offs = info.partitions[p as usize];
            let from = match (&req.from_offset, &req.from_time) {
                // For one partition an offset outside the stored range is an error; across all
                // partitions it is clamped to each partition's range.
                (Some(o), _) if req.partition.is_some() && (*o < offs.start || *o > offs.end) => {
                    return Err(Error::OffsetOutOfRange { partition: p, offset: *o, start: offs.start, end: offs.end });
                }
                (Some(o), _) => (*o).clamp(offs.start, offs.end),
                (None, Some(t)) => self.bus.log.offset_for_time(&req.topic, p, timestamp_ms(t)).await?,
                (None, None) => offs.start,
            };
            let to = req.to_offset.map_or(offs.end, |t| t.min(offs.end));
            ranges.push(Range { partition: p, from, to });
        }
        Ok(ranges)
    }
}

#[tonic::async_trait]
impl pb::replayer_server::Replayer for ReplayerService {
    type ReplayStream = Pin<Box<dyn Stream<Item = Result<pb::ReplayRecord, Status>> + Send>>;

    async fn replay(&self, request: Request<pb::ReplayRequest>) -> Result<Response<Self::ReplayStream>, Status> {
        let caller = self.bus.gate.caller(&request, "Replay")?;
        caller.require_role("Replay", &[Role::Auditor, Role::Admin])?;
        let req = request.into_inner();
        let ranges = self.ranges(&req).await?;
        let (tx, rx) = mpsc::channel(256);
        let log = self.bus.log.clone();
        let topic = req.topic;
        tracing::info!(topic, partitions = ranges.len(), caller = caller.id(), "replay started");
        tokio::spawn(async move {
            for range in ranges {
                let mut next = range.from;
                while next < range.to {
                    let batch = match log.read(&topic, range.partition, next, 512, 4 << 20).await {
                        Ok(b) if !b.is_empty() => b,
                        Ok(_) => break,
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    };
                    for r in batch.iter().filter(|r| r.offset < range.to) {
                        let item = replay_record(&topic, r).map_err(Status::from);
                        if tx.send(item).await.is_err() {
                            return; // client went away
                        }
                    }
                    next = batch.last().map_or(range.to, |r| r.offset + 1);
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
