//! `Admin`: topics, groups, dead letters and quarantine.

use std::sync::Arc;

use bytes::Bytes;
use justizbus_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{replay_record, Bus};
use crate::delivery::{dead_letter_topic, GroupStatus};
use crate::event::{check_client_topic, ms_timestamp, validate_name};
use crate::log::{Quarantine, TopicConfig, TopicInfo};
use crate::routing::directory::Role;
use crate::Error;

/// The `Admin` service.
pub struct AdminService {
    bus: Arc<Bus>,
}

impl AdminService {
    /// A service over the bus.
    pub fn new(bus: Arc<Bus>) -> Self {
        AdminService { bus }
    }
}

/// Roles that may read the admin API (besides `DescribeTopic`, open to every participant).
const READERS: &[Role] = &[Role::Auditor, Role::Admin];
/// Roles that may change topics and quarantines.
const ADMINS: &[Role] = &[Role::Admin];

impl AdminService {
    /// Refuses the call unless the caller holds one of `roles` (none: any participant).
    fn allow<T>(&self, request: &Request<T>, call: &str, roles: &[Role]) -> Result<(), Status> {
        let caller = self.bus.gate.caller(request, call)?;
        if !roles.is_empty() {
            caller.require_role(call, roles)?;
        }
        Ok(())
    }

    /// Refuses a call on the groups of `topic` unless the caller holds one of `roles` or owns
    /// the mailbox `topic` is.
    fn allow_on<T>(&self, request: &Request<T>, call: &str, roles: &[Role], topic: &str) -> Result<(), Status> {
        self.bus.gate.caller(request, call)?.require_role_or_own_mailbox(call, roles, topic)?;
        Ok(())
    }

    /// Releases (`skip` false) or skips a quarantined key.
    async fn resolve(&self, r: pb::QuarantineActionRequest, skip: bool) -> Result<Response<pb::QuarantineActionResponse>, Status> {
        let q = self.bus.delivery.resolve_quarantine(&r.topic, &r.group, Bytes::from(r.key.into_bytes()), skip).await?;
        Ok(Response::new(pb::QuarantineActionResponse { released: Some(q.into()) }))
    }
}

impl From<TopicInfo> for pb::TopicInfo {
    fn from(t: TopicInfo) -> Self {
        pb::TopicInfo {
            name: t.name,
            partitions: t.config.partitions,
            retention_ms: t.config.retention_ms,
            retention_bytes: t.config.retention_bytes,
            partition_info: t
                .partitions
                .iter()
                .enumerate()
                .map(|(p, o)| pb::PartitionInfo { partition: p as u32, start_offset: o.start, end_offset: o.end })
                .collect(),
        }
    }
}

impl From<GroupStatus> for pb::GroupInfo {
    fn from(g: GroupStatus) -> Self {
        pb::GroupInfo {
            topic: g.topic,
            group: g.group,
            subscribers: g.subscribers,
            partitions: g
                .partitions
                .into_iter()
                .map(|p| pb::GroupPartition {
                    partition: p.partition,
                    committed_offset: p.committed,
                    end_offset: p.end,
                    lag: p.lag,
                    in_flight: p.in_flight,
                })
                .collect(),
            quarantined_keys: g.quarantined_keys,
            dead_letter_topic: g.dead_letter_topic,
        }
    }
}

impl From<Quarantine> for pb::QuarantinedKey {
    fn from(q: Quarantine) -> Self {
        pb::QuarantinedKey {
            key: String::from_utf8_lossy(&q.key).into_owned(),
            partition: q.partition,
            offset: q.offset,
            event_id: q.event_id,
            attempts: q.attempts,
            since: Some(ms_timestamp(q.since_ms)),
        }
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn create_topic(&self, request: Request<pb::CreateTopicRequest>) -> Result<Response<pb::TopicInfo>, Status> {
        self.allow(&request, "Admin.CreateTopic", ADMINS)?;
        let r = request.into_inner();
        check_client_topic("topic", &r.topic)?;
        let config = TopicConfig { partitions: r.partitions, retention_ms: r.retention_ms, retention_bytes: r.retention_bytes };
        Ok(Response::new(self.bus.log.create_topic(&r.topic, config).await?.into()))
    }

    async fn set_retention(&self, request: Request<pb::SetRetentionRequest>) -> Result<Response<pb::TopicInfo>, Status> {
        self.allow(&request, "Admin.SetRetention", ADMINS)?;
        let r = request.into_inner();
        check_client_topic("topic", &r.topic)?;
        let now = self.bus.log.describe_topic(&r.topic).await?.config;
        let (ms, bytes) = (r.retention_ms.unwrap_or(now.retention_ms), r.retention_bytes.unwrap_or(now.retention_bytes));
        Ok(Response::new(self.bus.log.set_retention(&r.topic, ms, bytes).await?.into()))
    }

    async fn list_topics(&self, request: Request<pb::ListTopicsRequest>) -> Result<Response<pb::ListTopicsResponse>, Status> {
        self.allow(&request, "Admin.ListTopics", READERS)?;
        let topics = self.bus.log.list_topics().await?.into_iter().map(Into::into).collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn describe_topic(&self, request: Request<pb::DescribeTopicRequest>) -> Result<Response<pb::TopicInfo>, Status> {
        self.allow(&request, "Admin.DescribeTopic", &[])?;
        Ok(Response::new(self.bus.log.describe_topic(&request.into_inner().topic).await?.into()))
    }

    async fn list_groups(&self, request: Request<pb::ListGroupsRequest>) -> Result<Response<pb::ListGroupsResponse>, Status> {
        self.allow(&request, "Admin.ListGroups", READERS)?;
        let groups = self.bus.delivery.list().await?.into_iter().map(Into::into).collect();
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn describe_group(&self, request: Request<pb::DescribeGroupRequest>) -> Result<Response<pb::GroupInfo>, Status> {
        self.allow_on(&request, "Admin.DescribeGroup", READERS, &request.get_ref().topic)?;
        let r = request.into_inner();
        Ok(Response::new(self.bus.delivery.describe(&r.topic, &r.group).await?.into()))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        self.allow_on(&request, "Admin.ListDeadLetters", READERS, &request.get_ref().topic)?;
        let r = request.into_inner();
        validate_name("topic", &r.topic)?;
        validate_name("group", &r.group)?;
        let dlq = dead_letter_topic(&r.topic, &r.group);
        let info = self.bus.log.describe_topic(&dlq).await.map_err(|e| match e {
            Error::UnknownTopic(_) => Error::UnknownGroup { topic: r.topic.clone(), group: r.group.clone() },
            other => other,
        })?;
        let max = if r.max == 0 { 100 } else { r.max as usize };
        let mut records = Vec::new();
        for (p, offs) in info.partitions.iter().enumerate() {
            for rec in self.bus.log.read(&dlq, p as u32, offs.start, max, 64 << 20).await? {
                records.push(replay_record(&dlq, &rec)?);
            }
        }
        records.sort_by_key(|r| r.log_time.as_ref().map(crate::event::timestamp_ms));
        records.truncate(max);
        Ok(Response::new(pb::ListDeadLettersResponse { dead_letter_topic: dlq, records }))
    }

    async fn list_quarantine(&self, request: Request<pb::ListQuarantineRequest>) -> Result<Response<pb::ListQuarantineResponse>, Status> {
        self.allow_on(&request, "Admin.ListQuarantine", READERS, &request.get_ref().topic)?;
        let r = request.into_inner();
        let keys = self.bus.delivery.quarantine(&r.topic, &r.group).await?.into_iter().map(Into::into).collect();
        Ok(Response::new(pb::ListQuarantineResponse { keys }))
    }

    async fn release_quarantine(
        &self,
        request: Request<pb::QuarantineActionRequest>,
    ) -> Result<Response<pb::QuarantineActionResponse>, Status> {
        self.allow_on(&request, "Admin.ReleaseQuarantine", ADMINS, &request.get_ref().topic)?;
        self.resolve(request.into_inner(), false).await
    }

    async fn skip_quarantine(
        &self,
        request: Request<pb::QuarantineActionRequest>,
    ) -> Result<Response<pb::QuarantineActionResponse>, Status> {
        self.allow_on(&request, "Admin.SkipQuarantine", ADMINS, &request.get_ref().topic)?;
        self.resolve(request.into_inner(), true).await
    }
}
