//! The actor that owns one consumer group's delivery state.
//!
//! Per partition it keeps the events read but not yet acknowledged (`entries`) and, per key,
//! the queue of their offsets (`keys`). Only the head of a key's queue is ever eligible, which
//! is what orders delivery per key; the heads of all keys are eligible at once, which is what
//! keeps one slow case from blocking the others. Eligible heads wait in `ready` until a
//! subscriber has credit.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::{StreamExt, StreamMap};

use super::positions::PositionWriter;
use super::{dead_letter_topic, Delivered, GroupOverrides, Outgoing, StartPosition};
use crate::audit::journal::{Entry as JournalEntry, Journal, Kind};
use crate::config::DeliverySettings;
use crate::event::now_ms;
use crate::log::{Cursor, GroupConfig, Log, NewRecord, Quarantine, StoredRecord, TopicConfig};
use crate::FastMap;
use crate::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Commands to a group actor.
pub enum Command {
    /// A subscriber joins; answered with the topic's partition count.
    Join {
        /// Subscriber id.
        sub: u64,
        /// Credit.
        max_unacked: u32,
        /// Group settings to apply.
        overrides: GroupOverrides,
        /// Where its messages go.
        out: mpsc::Sender<Outgoing>,
        /// Answer.
        reply: oneshot::Sender<Result<u32>>,
    },
    /// A subscriber left (stream ended); its deliveries become redeliverable at once.
    Leave {
        /// Subscriber id.
        sub: u64,
    },
    /// Acknowledgements.
    Ack {
        /// Subscriber id.
        sub: u64,
        /// Delivery ids.
        ids: Vec<u64>,
    },
    /// Acknowledgements whose effects are still being made durable: the deliveries are done
    /// and their keys move on, but the group's position keeps them until `Settle`.
    Release {
        /// Subscriber id.
        sub: u64,
        /// Delivery ids.
        ids: Vec<u64>,
    },
    /// The effects of released deliveries are durable: they may be committed.
    Settle {
        /// Delivery ids given to `Release`.
        ids: Vec<u64>,
    },
    /// Negative acknowledgements.
    Nack {
        /// Subscriber id.
        sub: u64,
        /// Delivery ids.
        ids: Vec<u64>,
    },
    /// New credit.
    Flow {
        /// Subscriber id.
        sub: u64,
        /// Credit.
        max_unacked: u32,
    },
    /// Report the group's state.
    Describe {
        /// Answer.
        reply: oneshot::Sender<GroupStatus>,
    },
    /// Release or skip a quarantined key.
    Resolve {
        /// The key.
        key: Bytes,
        /// Skip (true) or release (false).
        skip: bool,
        /// Answer.
        reply: oneshot::Sender<Result<Quarantine>>,
    },
    /// Persist and stop.
    Shutdown {
        /// Answered when stopped.
        reply: oneshot::Sender<()>,
    },
}

/// A group's state as reported to admins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    /// Topic.
    pub topic: String,
    /// Group.
    pub group: String,
    /// Connected subscribers.
    pub subscribers: u32,
    /// Per partition.
    pub partitions: Vec<PartitionStatus>,
    /// Quarantined keys.
    pub quarantined_keys: u32,
    /// Dead-letter topic.
    pub dead_letter_topic: String,
}

/// One partition of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionStatus {
    /// Partition.
    pub partition: u32,
    /// Lowest unacknowledged offset.
    pub committed: u64,
    /// High watermark.
    pub end: u64,
    /// Unacknowledged events (read or not).
    pub lag: u64,
    /// Deliveries awaiting acknowledgement.
    pub in_flight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Behind an earlier event of its key.
    Waiting,
    /// In `ready`.
    Ready,
    /// Handed out under this delivery id.
    InFlight(u64),
    /// Redelivery after this time.
    Backoff(Instant),
    /// Dead-lettered; its key waits for an operator.
    Quarantined,
    /// Acknowledged, and its key has moved on, but not yet committed: it waits until what the
    /// acknowledgement caused (a receipt) is durable, so a crash before that redelivers it.
    Settling,
}

struct Entry {
    record: Arc<StoredRecord>,
    /// Deliveries made so far.
    attempts: u32,
    state: State,
}

#[derive(Default)]
struct Part {
    /// Served by this node: always, unless the group is shared with other nodes and the
    /// partition is assigned elsewhere (then everything else here is empty).
    owned: bool,
    next_read: u64,
    end: u64,
    entries: BTreeMap<u64, Entry>,
    keys: FastMap<Bytes, VecDeque<u64>>,
    /// Payload bytes of `entries`.
    buffered_bytes: usize,
    dirty: bool,
}

struct Sub {
    /// Where this subscriber's deliveries and ack errors go.
    out: mpsc::Sender<Outgoing>,
    max_unacked: u32,
    outstanding: u32,
}

struct InFlight {
    partition: u32,
    offset: u64,
    sub: u64,
    deadline: Instant,
    /// When it was handed out (ms since the epoch), for the journal.
    delivered_ms: i64,
}

#[derive(Clone, Copy)]
struct Settings {
    ack_deadline: Duration,
    max_attempts: u32,
    min_backoff: Duration,
    max_backoff: Duration,
}

impl Settings {
    /// The server defaults, overridden by the group's configuration.
    fn from(defaults: &DeliverySettings, c: GroupConfig) -> Self {
        let ms = |v: u32| Duration::from_millis(v.into());
        Settings {
            ack_deadline: ms(c.ack_deadline_ms.unwrap_or(defaults.ack_deadline_ms)),
            max_attempts: c.max_attempts.unwrap_or(defaults.max_attempts).max(1),
            min_backoff: ms(c.min_backoff_ms.unwrap_or(defaults.min_backoff_ms)),
            max_backoff: ms(c.max_backoff_ms.unwrap_or(defaults.max_backoff_ms)),
        }
    }
}

struct Actor {
    /// Where deliveries, acks and failures are journaled (DESIGN.md section 8).
    journal: Option<Journal>,
    /// Stores the group's positions.
    positions: PositionWriter,
    /// Whether journal entries were recorded since positions were last handed over.
    journaled: std::sync::atomic::AtomicBool,
    /// Read-ahead bytes of all groups together.
    budget: Arc<Budget>,
    /// The last fill stopped at the budget: try again soon (freed budget wakes nobody).
    held_back: bool,
    topic: String,
    group: String,
    dlq: String,
    log: Arc<dyn Log>,
    limits: DeliverySettings,
    /// Settings given by subscribers (stored).
    config: GroupConfig,
    /// `limits` overridden by `config`.
    settings: Settings,
    parts: Vec<Part>,
    subs: BTreeMap<u64, Sub>,
    /// Round-robin position among subscribers.
    rr: u64,
    inflight: FastMap<u64, InFlight>,
    /// Released deliveries (id -> partition, offset) waiting for `Settle`.
    settling: FastMap<u64, (u32, u64)>,
    /// Ack deadlines of `inflight`, earliest first: the actor sleeps until the first one
    /// instead of polling.
    deadlines: BTreeSet<(Instant, u64)>,
    ready: VecDeque<(u32, u64)>,
    backoff: BTreeSet<(Instant, u32, u64)>,
    quarantined: FastMap<Bytes, Quarantine>,
    next_delivery: u64,
    last_commit: Instant,
    /// Where a group without a stored position starts.
    start: StartPosition,
    /// Several bus nodes serve this group (Kafka): partitions are served as assigned.
    shared: bool,
    /// This node's share of a shared group, while it has subscribers.
    membership: Option<crate::log::Membership>,
    /// The partitions' ends when a shared group was joined: where a group that starts at the
    /// latest event begins, however long the assignment takes.
    ends_at_join: Vec<u64>,
    /// Assigned partitions whose loading failed are tried again at this time.
    load_retry: Option<Instant>,
    /// A read failed (the log's backend is unreachable): reading is tried again at this time.
    read_retry: Option<Instant>,
}

/// How soon a group tries to read again after a read failed.
const READ_RETRY: Duration = Duration::from_millis(500);

/// How soon a group held back by the budget of all groups tries to read again.
const BUDGET_RETRY: Duration = Duration::from_millis(50);

/// Events a group reads while the budget of all groups is used up and it holds none.
const STARVED_READ: usize = 16;

/// The read-ahead of all groups together (`delivery.max_buffered_bytes_total`): a soft
/// limit, so thousands of mailbox groups cannot buffer without bound.
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Budget { used: AtomicUsize::new(0), limit }
    }

    fn exhausted(&self) -> bool {
        self.used() >= self.limit
    }

    fn take(&self, bytes: usize) {
        self.used.fetch_add(bytes, Relaxed);
    }

    fn give(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Relaxed);
    }

    /// Bytes buffered by all groups now.
    pub fn used(&self) -> usize {
        self.used.load(Relaxed)
    }
}

impl Drop for Actor {
    fn drop(&mut self) {
        // What the actor still buffers goes back to the budget when it stops.
        self.budget.give(self.parts.iter().map(|p| p.buffered_bytes).sum());
    }
}

/// Loads a group's state and starts its actor.
pub async fn spawn(
    log: Arc<dyn Log>,
    topic: &str,
    group: &str,
    limits: DeliverySettings,
    start: StartPosition,
    budget: Arc<Budget>,
    journal: Option<Journal>,
) -> Result<mpsc::Sender<Command>> {
    let info = log.describe_topic(topic).await?;
    let dlq = dead_letter_topic(topic, group);
    let config = log.load_group_config(topic, group).await?.unwrap_or_default();
    match log.create_topic(&dlq, TopicConfig { partitions: info.config.partitions, retention_ms: 0, retention_bytes: 0 }).await {
        Ok(_) | Err(Error::TopicExists { .. }) => {}
        Err(e) => return Err(e),
    }
    let commit_interval_ms = limits.commit_interval_ms;
    let mut actor = Actor {
        positions: PositionWriter::start(log.clone(), topic.to_string(), group.to_string(), journal.clone()),
        journaled: std::sync::atomic::AtomicBool::new(false),
        journal,
        topic: topic.to_string(),
        group: group.to_string(),
        dlq,
        settings: Settings::from(&limits, config),
        config,
        limits,
        log: log.clone(),
        budget,
        held_back: false,
        parts: Vec::new(),
        subs: BTreeMap::new(),
        rr: 0,
        inflight: FastMap::default(),
        ready: VecDeque::new(),
        backoff: BTreeSet::new(),
        deadlines: BTreeSet::new(),
        settling: FastMap::default(),
        quarantined: FastMap::default(),
        next_delivery: 1,
        start,
        shared: log.shares_groups(topic),
        membership: None,
        ends_at_join: Vec::new(),
        load_retry: None,
        read_retry: None,
        // Spread over the interval, so that groups started together do not all store their
        // positions in the same instant (a thousand mailbox groups would stall the workers).
        last_commit: {
            use std::hash::BuildHasher;
            let spread = std::collections::hash_map::RandomState::new().hash_one((topic, group)) % commit_interval_ms.max(1);
            Instant::now().checked_sub(Duration::from_millis(spread)).unwrap_or_else(Instant::now)
        },
    };
    for q in log.list_quarantine(topic, group).await? {
        actor.quarantined.insert(Bytes::from(q.key.clone()), q);
    }
    let mut ends = StreamMap::new();
    for p in 0..info.config.partitions {
        actor.parts.push(Part { end: info.partitions[p as usize].end, ..Part::default() });
        ends.insert(p, WatchStream::new(log.watch_end(topic, p)?));
    }
    // A group of this node alone serves every partition from the start; a shared one serves
    // what the group protocol assigns once it has subscribers.
    if !actor.shared {
        for p in 0..info.config.partitions {
            actor.load_partition(p).await?;
        }
    }
    actor.commit_now().await;
    tracing::info!(topic, group, partitions = info.config.partitions, quarantined = actor.quarantined.len(), "group loaded");
    let (tx, rx) = mpsc::channel(4096);
    tokio::spawn(actor.run(rx, ends));
    Ok(tx)
}

impl Actor {
    /// Starts serving partition `p` from its stored position (or the group's start).
    async fn load_partition(&mut self, p: u32) -> Result<()> {
        let (topic, group) = (self.topic.clone(), self.group.clone());
        let offsets = self.log.offsets(&topic, p).await?;
        let cursor = self.log.load_cursor(&topic, &group, p).await?;
        // Another node may have quarantined keys of this partition while it served it.
        for q in self.log.list_quarantine(&topic, &group).await? {
            if q.partition == p {
                self.quarantined.insert(Bytes::from(q.key.clone()), q);
            }
        }
        let end = self.parts[p as usize].end.max(offsets.end);
        self.parts[p as usize] = Part { owned: true, end, ..Part::default() };
        match cursor {
            Some(cursor) => {
                self.parts[p as usize].next_read = cursor.scanned.max(offsets.start);
                // Read the unacknowledged events back in runs, not one read per offset.
                let mut wanted: BTreeSet<u64> = cursor.unacked.into_iter().filter(|o| *o >= offsets.start).collect();
                while let Some(&from) = wanted.first() {
                    let records = self.log.read(&topic, p, from, 1024, 4 << 20).await?;
                    let Some(last) = records.last().map(|r| r.offset) else { break };
                    for rec in records.into_iter().filter(|r| wanted.contains(&r.offset)) {
                        self.insert(Arc::new(rec));
                    }
                    wanted = wanted.split_off(&(last + 1));
                }
                for (off, attempts) in cursor.attempts {
                    if let Some(entry) = self.parts[p as usize].entries.get_mut(&off) {
                        entry.attempts = attempts;
                    }
                }
            }
            None => {
                let part = &mut self.parts[p as usize];
                part.next_read = match self.start {
                    StartPosition::Earliest => offsets.start,
                    StartPosition::Latest => self.ends_at_join.get(p as usize).copied().unwrap_or(offsets.end).max(offsets.start),
                };
                part.dirty = true;
            }
        }
        Ok(())
    }

    /// Stops serving partition `p` (another node takes it over): its deliveries are dropped
    /// (acks for them are refused as unknown; the next owner delivers them again).
    fn release_partition(&mut self, p: u32) {
        let ids: Vec<u64> = self.inflight.iter().filter(|(_, f)| f.partition == p).map(|(id, _)| *id).collect();
        for id in ids {
            if let Some(f) = self.inflight.remove(&id) {
                self.deadlines.remove(&(f.deadline, id));
                if let Some(s) = self.subs.get_mut(&f.sub) {
                    s.outstanding = s.outstanding.saturating_sub(1);
                }
            }
        }
        self.settling.retain(|_, (sp, _)| *sp != p);
        self.ready.retain(|(rp, _)| *rp != p);
        self.backoff.retain(|(_, bp, _)| *bp != p);
        self.quarantined.retain(|_, q| q.partition != p);
        let part = &mut self.parts[p as usize];
        self.budget.give(part.buffered_bytes);
        *part = Part { end: part.end, ..Part::default() };
    }

    /// Follows a new assignment of a shared group: stores and releases what was taken away,
    /// confirms, then loads what was added.
    async fn rebalance(&mut self) {
        let Some(membership) = &mut self.membership else { return };
        let assignment = membership.assignment.borrow_and_update().clone();
        let revoked: Vec<u32> =
            (0..self.parts.len() as u32).filter(|p| self.parts[*p as usize].owned && !assignment.partitions.contains(p)).collect();
        if !revoked.is_empty() {
            self.commit_now().await;
            for p in &revoked {
                self.release_partition(*p);
            }
            tracing::info!(topic = %self.topic, group = %self.group, partitions = ?revoked, "partitions released to other nodes");
        }
        if let Some(m) = &self.membership {
            m.confirm(assignment.generation);
        }
        self.load_assigned().await;
    }

    /// Loads assigned partitions not served yet; a failure is retried a second later.
    async fn load_assigned(&mut self) {
        self.load_retry = None;
        let Some(membership) = &self.membership else { return };
        let assigned: Vec<u32> = membership.assignment.borrow().partitions.iter().copied().collect();
        for p in assigned {
            if self.parts.get(p as usize).is_none_or(|part| part.owned) {
                continue;
            }
            match self.load_partition(p).await {
                Ok(()) => tracing::info!(topic = %self.topic, group = %self.group, partition = p, "serving partition"),
                Err(e) => {
                    tracing::warn!(topic = %self.topic, group = %self.group, partition = p, error = %e, "loading an assigned partition failed; retrying");
                    self.parts[p as usize].owned = false;
                    self.load_retry = Some(Instant::now() + Duration::from_secs(1));
                }
            }
        }
    }

    /// Joins the shared group when the first subscriber arrives.
    async fn join_shared(&mut self) -> Result<()> {
        if !self.shared || self.membership.is_some() {
            return Ok(());
        }
        if self.start == StartPosition::Latest {
            let mut ends = Vec::with_capacity(self.parts.len());
            for p in 0..self.parts.len() as u32 {
                ends.push(self.log.offsets(&self.topic, p).await?.end);
            }
            self.ends_at_join = ends;
        }
        match self.log.join_group(&self.topic, &self.group).await? {
            Some(membership) => self.membership = Some(membership),
            None => {
                self.shared = false;
                for p in 0..self.parts.len() as u32 {
                    self.load_partition(p).await?;
                }
            }
        }
        Ok(())
    }

    /// Leaves the shared group when the last subscriber is gone, so other nodes' subscribers
    /// get every partition.
    async fn leave_shared(&mut self) {
        if self.membership.is_none() || !self.subs.is_empty() {
            return;
        }
        self.commit_now().await;
        for p in 0..self.parts.len() as u32 {
            if self.parts[p as usize].owned {
                self.release_partition(p);
            }
        }
        self.membership = None;
        tracing::info!(topic = %self.topic, group = %self.group, "left the shared group (no subscribers on this node)");
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>, mut ends: StreamMap<u32, WatchStream<u64>>) {
        let far = Duration::from_secs(3600);
        loop {
            if self.membership.as_ref().is_some_and(|m| m.assignment.has_changed().unwrap_or(false)) {
                self.rebalance().await;
            }
            if self.load_retry.is_some_and(|t| t <= Instant::now()) {
                self.load_assigned().await;
            }
            self.fill().await;
            self.dispatch();
            // Sleep until the next thing due: an ack deadline, the end of a backoff, a commit.
            let commit_due =
                self.parts.iter().any(|p| p.dirty).then(|| self.last_commit + Duration::from_millis(self.limits.commit_interval_ms));
            let retry = self.held_back.then(|| Instant::now() + BUDGET_RETRY);
            let due = [
                self.deadlines.first().map(|d| d.0),
                self.backoff.first().map(|b| b.0),
                commit_due,
                retry,
                self.load_retry,
                self.read_retry,
            ]
            .into_iter()
            .flatten()
            .min();
            let tick = due.map_or(far, |t| t.saturating_duration_since(Instant::now()));
            let mut assignment = self.membership.as_ref().map(|m| m.assignment.clone());
            let assignment_changed = async {
                let changed = match assignment.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => false,
                };
                if !changed {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = assignment_changed => {}
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    if self.handle(cmd).await {
                        return;
                    }
                    // Take what else is waiting before reading and dispatching again.
                    for _ in 0..1024 {
                        match rx.try_recv() {
                            Ok(cmd) => if self.handle(cmd).await { return },
                            Err(_) => break,
                        }
                    }
                    self.leave_shared().await;
                }
                Some((p, end)) = ends.next() => {
                    if let Some(part) = self.parts.get_mut(p as usize) {
                        part.end = part.end.max(end);
                    }
                }
                _ = tokio::time::sleep(tick) => {}
            }
            self.expire().await;
            if self.last_commit.elapsed() >= Duration::from_millis(self.limits.commit_interval_ms) {
                self.commit();
            }
        }
        self.commit_now().await;
    }

    /// Returns true when the actor must stop.
    async fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Join { sub, max_unacked, overrides, out, reply } => {
                if let Err(e) = self.apply(overrides).await {
                    let _ = reply.send(Err(e));
                    return false;
                }
                if let Err(e) = self.join_shared().await {
                    let _ = reply.send(Err(e));
                    return false;
                }
                self.subs.insert(sub, Sub { out, max_unacked, outstanding: 0 });
                tracing::debug!(topic = %self.topic, group = %self.group, sub, max_unacked, "subscriber joined");
                let _ = reply.send(Ok(self.parts.len() as u32));
            }
            Command::Leave { sub } => self.leave(sub),
            Command::Ack { sub, ids } => {
                for id in ids {
                    match self.take_inflight(sub, id) {
                        Ok((p, off, delivered_ms)) => {
                            self.journal(Kind::Acknowledged, p, off, Some(delivered_ms), None);
                            self.acked(p, off)
                        }
                        Err(e) => self.tell(sub, id, e),
                    }
                }
            }
            Command::Release { sub, ids } => {
                for id in ids {
                    match self.take_inflight(sub, id) {
                        Ok((p, off, delivered_ms)) => {
                            self.journal(Kind::Acknowledged, p, off, Some(delivered_ms), None);
                            self.release_key(p, off);
                            if let Some(e) = self.parts[p as usize].entries.get_mut(&off) {
                                e.state = State::Settling;
                            }
                            self.settling.insert(id, (p, off));
                        }
                        Err(e) => self.tell(sub, id, e),
                    }
                }
            }
            Command::Settle { ids } => {
                for id in ids {
                    if let Some((p, off)) = self.settling.remove(&id) {
                        self.forget(p, off);
                    }
                }
            }
            Command::Nack { sub, ids } => {
                for id in ids {
                    match self.take_inflight(sub, id) {
                        Ok((p, off, delivered_ms)) => {
                            self.journal(Kind::Nacked, p, off, Some(delivered_ms), None);
                            self.failed(p, off, "negative acknowledgement").await
                        }
                        Err(e) => self.tell(sub, id, e),
                    }
                }
            }
            Command::Flow { sub, max_unacked } => {
                if let Some(s) = self.subs.get_mut(&sub) {
                    s.max_unacked = max_unacked;
                }
            }
            Command::Describe { reply } => {
                let _ = reply.send(self.status().await);
            }
            Command::Resolve { key, skip, reply } => {
                let _ = reply.send(self.resolve(key, skip).await);
            }
            Command::Shutdown { reply } => {
                self.commit_now().await;
                let _ = reply.send(());
                return true;
            }
        }
        false
    }

    /// Applies settings a subscriber gave, storing them when they change.
    async fn apply(&mut self, given: GroupOverrides) -> Result<()> {
        let merged = self.config.merged(given);
        if merged != self.config {
            self.log.store_group_config(&self.topic, &self.group, &merged).await?;
            tracing::info!(topic = %self.topic, group = %self.group, config = ?merged, "group settings changed");
            self.config = merged;
            self.settings = Settings::from(&self.limits, merged);
        }
        Ok(())
    }

    fn tell(&mut self, sub: u64, delivery_id: u64, error: Error) {
        if let Some(s) = self.subs.get(&sub) {
            // Full means the subscriber does not read; an ack error is then not worth waiting for.
            let _ = s.out.try_send(Outgoing::AckError { delivery_id, error });
        }
    }

    /// Reads more events while the buffer has room. Each partition gets an equal share of the
    /// buffer, so one partition's backlog cannot crowd out the keys of the others.
    async fn fill(&mut self) {
        self.held_back = false;
        self.read_retry = None;
        // Read-ahead is for subscribers (see `drop_read_ahead`).
        if self.subs.is_empty() {
            return;
        }
        let share_events = (self.limits.max_buffered_events / self.parts.len().max(1)).max(64);
        let share_bytes = (self.limits.max_buffered_bytes / self.parts.len().max(1)).max(1 << 20);
        for p in 0..self.parts.len() {
            loop {
                let part = &self.parts[p];
                if !part.owned || part.next_read >= part.end || part.entries.len() >= share_events || part.buffered_bytes >= share_bytes {
                    break;
                }
                // Over the budget of all groups, a group still reads a little while it holds
                // nothing, so that every group makes progress.
                let room = match self.budget.exhausted() {
                    false => (share_events - part.entries.len()).min(1024),
                    true if self.parts.iter().all(|q| q.entries.is_empty()) => STARVED_READ,
                    true => {
                        self.held_back = true;
                        break;
                    }
                };
                let from = part.next_read;
                let records = match self.log.read(&self.topic, p as u32, from, room, 1 << 20).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(topic = %self.topic, group = %self.group, partition = p, from, error = %e, "reading for delivery failed; retrying");
                        self.read_retry = Some(Instant::now() + READ_RETRY);
                        break;
                    }
                };
                let Some(last) = records.last() else {
                    // Nothing below the end: retention moved the start past us, or a race.
                    match self.log.offsets(&self.topic, p as u32).await {
                        Ok(o) if o.start > from => {
                            tracing::warn!(topic = %self.topic, group = %self.group, partition = p, from, start = o.start, "events before the log start were deleted by retention before delivery");
                            self.parts[p].next_read = o.start;
                            continue;
                        }
                        _ => break,
                    }
                };
                let next = last.offset + 1;
                for r in records {
                    self.insert(Arc::new(r));
                }
                let part = &mut self.parts[p];
                part.next_read = next;
                part.dirty = true;
            }
        }
    }

    /// Adds a read event behind the earlier events of its key.
    fn insert(&mut self, record: Arc<StoredRecord>) {
        let (p, off) = (record.partition, record.offset);
        let key = record.key.clone();
        let part = &mut self.parts[p as usize];
        part.buffered_bytes += record.value.len() + record.key.len();
        self.budget.take(record.value.len() + record.key.len());
        part.entries.insert(off, Entry { record, attempts: 0, state: State::Waiting });
        let queue = part.keys.entry(key).or_default();
        queue.push_back(off);
        if queue.len() == 1 {
            self.make_head_eligible(p, off);
        }
    }

    /// A key's new head becomes ready, unless its key is quarantined.
    fn make_head_eligible(&mut self, p: u32, off: u64) {
        let Some(entry) = self.parts[p as usize].entries.get_mut(&off) else { return };
        match self.quarantined.get(&entry.record.key) {
            Some(q) if q.offset == off && q.partition == p => entry.state = State::Quarantined,
            Some(q) if q.partition == p && off > q.offset => entry.state = State::Waiting,
            _ => {
                entry.state = State::Ready;
                self.ready.push_back((p, off));
            }
        }
    }

    /// Hands ready events to subscribers with credit, round robin.
    fn dispatch(&mut self) {
        // A journal far behind holds new deliveries back (their ends would add to it).
        if self.journal.as_ref().is_some_and(Journal::congested) {
            self.held_back = true;
            return;
        }
        while let Some(&(p, off)) = self.ready.front() {
            let Some(sub_id) = self.pick_subscriber() else { return };
            self.ready.pop_front();
            let Some(entry) = self.parts[p as usize].entries.get_mut(&off) else { continue };
            if entry.state != State::Ready {
                continue;
            }
            let delivery_id = self.next_delivery;
            self.next_delivery += 1;
            entry.attempts += 1;
            let delivered = Delivered { delivery_id, record: entry.record.clone(), attempt: entry.attempts };
            let Some(sub) = self.subs.get_mut(&sub_id) else { continue };
            if sub.out.try_send(Outgoing::Delivery(delivered)).is_err() {
                // The subscriber is gone (its Leave is on the way): put the event back and
                // release what it holds now.
                entry.attempts -= 1;
                self.ready.push_front((p, off));
                self.leave(sub_id);
                continue;
            }
            entry.state = State::InFlight(delivery_id);
            sub.outstanding += 1;
            // The attempt count is part of the stored position.
            self.parts[p as usize].dirty = true;
            let deadline = Instant::now() + self.settings.ack_deadline;
            self.deadlines.insert((deadline, delivery_id));
            self.inflight.insert(delivery_id, InFlight { partition: p, offset: off, sub: sub_id, deadline, delivered_ms: now_ms() });
        }
    }

    fn pick_subscriber(&mut self) -> Option<u64> {
        let has_room = |s: &Sub| s.outstanding < s.max_unacked;
        let found = self
            .subs
            .range(self.rr + 1..)
            .find(|(_, s)| has_room(s))
            .or_else(|| self.subs.range(..=self.rr).find(|(_, s)| has_room(s)))
            .map(|(id, _)| *id);
        if let Some(id) = found {
            self.rr = id;
        }
        found
    }

    /// Takes a delivery back from its subscriber: (partition, offset, when it was delivered).
    fn take_inflight(&mut self, sub: u64, id: u64) -> Result<(u32, u64, i64)> {
        if self.inflight.get(&id).is_none_or(|f| f.sub != sub) {
            return Err(Error::UnknownDelivery(id));
        }
        let f = self.inflight.remove(&id).ok_or(Error::UnknownDelivery(id))?;
        self.deadlines.remove(&(f.deadline, id));
        if let Some(s) = self.subs.get_mut(&sub) {
            s.outstanding = s.outstanding.saturating_sub(1);
        }
        Ok((f.partition, f.offset, f.delivered_ms))
    }

    /// Removes an acknowledged (or skipped) event; the next event of its key becomes eligible.
    fn acked(&mut self, p: u32, off: u64) {
        self.release_key(p, off);
        self.forget(p, off);
    }

    /// Drops a finished event from the buffer; the group's position may pass it.
    fn forget(&mut self, p: u32, off: u64) {
        let part = &mut self.parts[p as usize];
        if let Some(entry) = part.entries.remove(&off) {
            part.dirty = true;
            part.buffered_bytes -= entry.record.value.len() + entry.record.key.len();
            self.budget.give(entry.record.value.len() + entry.record.key.len());
        }
    }

    /// Takes a finished event off its key's queue: the key's next event becomes eligible.
    fn release_key(&mut self, p: u32, off: u64) {
        let part = &mut self.parts[p as usize];
        let Some(key) = part.entries.get(&off).map(|e| e.record.key.clone()) else { return };
        let next = match part.keys.get_mut(&key) {
            Some(queue) => {
                // Only a key's head is ever handed out, so it is almost always the front.
                if queue.front() == Some(&off) {
                    queue.pop_front();
                } else {
                    queue.retain(|o| *o != off);
                }
                let next = queue.front().copied();
                if next.is_none() {
                    part.keys.remove(&key);
                }
                next
            }
            None => None,
        };
        if let Some(next) = next {
            if part.entries.get(&next).is_some_and(|e| e.state == State::Waiting) {
                self.make_head_eligible(p, next);
            }
        }
    }

    /// A delivery failed (nack or deadline): back off, or dead-letter after the last attempt.
    async fn failed(&mut self, p: u32, off: u64, reason: &str) {
        let Some(entry) = self.parts[p as usize].entries.get_mut(&off) else { return };
        if entry.attempts >= self.settings.max_attempts {
            self.dead_letter(p, off, reason).await;
            return;
        }
        let exp = entry.attempts.saturating_sub(1).min(20);
        let delay = self.settings.min_backoff.saturating_mul(1 << exp).min(self.settings.max_backoff);
        let until = Instant::now() + delay;
        entry.state = State::Backoff(until);
        tracing::debug!(topic = %self.topic, group = %self.group, partition = p, offset = off, attempts = entry.attempts, ?delay, reason, "redelivery scheduled");
        self.backoff.insert((until, p, off));
    }

    /// Moves an event that failed its last attempt to the dead-letter topic and quarantines
    /// its key. If the dead-letter append fails, the event is retried later instead.
    async fn dead_letter(&mut self, p: u32, off: u64, reason: &str) {
        let Some(entry) = self.parts[p as usize].entries.get(&off) else { return };
        let record = entry.record.clone();
        let attempts = entry.attempts;
        let mut event = crate::event::Event::decode(&record.value).unwrap_or_default();
        let h = &mut event.headers;
        h.insert("justizbus.dlq.topic".into(), self.topic.clone());
        h.insert("justizbus.dlq.group".into(), self.group.clone());
        h.insert("justizbus.dlq.partition".into(), p.to_string());
        h.insert("justizbus.dlq.offset".into(), off.to_string());
        h.insert("justizbus.dlq.attempts".into(), attempts.to_string());
        h.insert("justizbus.dlq.reason".into(), reason.to_string());
        h.insert("justizbus.dlq.event_id".into(), record.id.clone());
        let now = now_ms();
        let dlq_record = NewRecord {
            id: format!("{}#dlq@{}:{}:{}", record.id, p, off, now),
            key: record.key.clone(),
            timestamp_ms: now,
            value: event.encode_to_vec().into(),
        };
        let q = Quarantine { key: record.key.to_vec(), partition: p, offset: off, event_id: record.id.clone(), attempts, since_ms: now };
        let stored = match self.log.append(&self.dlq, vec![dlq_record]).await {
            Ok(_) => self.log.put_quarantine(&self.topic, &self.group, &q).await,
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            tracing::error!(topic = %self.topic, group = %self.group, partition = p, offset = off, error = %e, "dead-lettering failed; retrying later");
            let until = Instant::now() + self.settings.max_backoff;
            if let Some(entry) = self.parts[p as usize].entries.get_mut(&off) {
                entry.state = State::Backoff(until);
            }
            self.backoff.insert((until, p, off));
            return;
        }
        tracing::warn!(topic = %self.topic, group = %self.group, partition = p, offset = off, event_id = %record.id,
            key = %String::from_utf8_lossy(&record.key), attempts, reason, dead_letter_topic = %self.dlq, "event dead-lettered; its key is quarantined");
        self.journal(Kind::DeadLettered, p, off, None, Some(format!("{reason}; to {}", self.dlq)));
        if let Some(entry) = self.parts[p as usize].entries.get_mut(&off) {
            entry.state = State::Quarantined;
        }
        self.quarantined.insert(record.key.clone(), q);
    }

    async fn resolve(&mut self, key: Bytes, skip: bool) -> Result<Quarantine> {
        let Some(q) = self.quarantined.get(&key).cloned() else {
            return Err(Error::NotQuarantined { group: self.group.clone(), key: String::from_utf8_lossy(&key).into_owned() });
        };
        self.log.remove_quarantine(&self.topic, &self.group, &key).await?;
        self.quarantined.remove(&key);
        let (p, off) = (q.partition, q.offset);
        let is_quarantined =
            self.parts.get(p as usize).and_then(|part| part.entries.get(&off)).is_some_and(|e| e.state == State::Quarantined);
        tracing::info!(topic = %self.topic, group = %self.group, key = %String::from_utf8_lossy(&key), partition = p, offset = off, skip, "quarantine resolved");
        if let Some(journal) = &self.journal {
            let kind = if skip { Kind::QuarantineSkipped } else { Kind::QuarantineReleased };
            journal.record(JournalEntry::now(kind, &self.topic, p, off, &self.group, &q.event_id));
            self.journaled.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if is_quarantined && skip {
            self.acked(p, off);
        } else if is_quarantined {
            if let Some(e) = self.parts[p as usize].entries.get_mut(&off) {
                e.attempts = 0;
            }
            self.make_head_eligible(p, off);
        } else if let Some(head) = self.parts.get(p as usize).and_then(|part| part.keys.get(&key)).and_then(|q| q.front().copied()) {
            // The quarantined event was not buffered; wake whatever heads the key now.
            if self.parts[p as usize].entries.get(&head).is_some_and(|e| e.state == State::Waiting) {
                self.make_head_eligible(p, head);
            }
        }
        Ok(q)
    }

    fn leave(&mut self, sub: u64) {
        if self.subs.remove(&sub).is_none() {
            return;
        }
        let mine: Vec<u64> = self.inflight.iter().filter(|(_, f)| f.sub == sub).map(|(id, _)| *id).collect();
        for id in mine {
            if let Some(f) = self.inflight.remove(&id) {
                self.deadlines.remove(&(f.deadline, id));
                if let Some(e) = self.parts[f.partition as usize].entries.get_mut(&f.offset) {
                    e.state = State::Ready;
                    self.ready.push_front((f.partition, f.offset));
                }
            }
        }
        tracing::debug!(topic = %self.topic, group = %self.group, sub, "subscriber left");
        if self.subs.is_empty() {
            self.drop_read_ahead();
        }
    }

    /// With no subscriber left, read-ahead only holds budget that groups with subscribers
    /// need (think of thousands of mailboxes whose owners are offline). Each partition drops
    /// the events at the end of its buffer that were never handed out and reads them again
    /// from there when a subscriber comes back; what was delivered, settles, waits for a
    /// backoff or is quarantined stays.
    fn drop_read_ahead(&mut self) {
        for p in 0..self.parts.len() {
            let part = &mut self.parts[p];
            let untouched = |e: &Entry| e.attempts == 0 && matches!(e.state, State::Waiting | State::Ready);
            let kept_below = part.entries.iter().rev().find(|(_, e)| !untouched(e)).map_or(0, |(o, _)| o + 1);
            let dropped = part.entries.split_off(&kept_below);
            let Some(&first) = dropped.keys().next() else { continue };
            let bytes: usize = dropped.values().map(|e| e.record.value.len() + e.record.key.len()).sum();
            part.buffered_bytes -= bytes;
            part.next_read = first;
            part.dirty = true;
            for queue in part.keys.values_mut() {
                while queue.back().is_some_and(|o| *o >= first) {
                    queue.pop_back();
                }
            }
            part.keys.retain(|_, q| !q.is_empty());
            self.budget.give(bytes);
            self.ready.retain(|&(rp, o)| rp != p as u32 || o < first);
        }
    }

    /// Expired deliveries fail; backoffs that are over become ready.
    async fn expire(&mut self) {
        let now = Instant::now();
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(f) = self.inflight.remove(&id) {
                if let Some(s) = self.subs.get_mut(&f.sub) {
                    s.outstanding = s.outstanding.saturating_sub(1);
                }
                self.journal(Kind::Expired, f.partition, f.offset, Some(f.delivered_ms), None);
                self.failed(f.partition, f.offset, "ack deadline expired").await;
            }
        }
        while let Some(&(until, p, off)) = self.backoff.first() {
            if until > now {
                break;
            }
            self.backoff.pop_first();
            if let Some(e) = self.parts[p as usize].entries.get_mut(&off) {
                if e.state == State::Backoff(until) {
                    e.state = State::Ready;
                    self.ready.push_back((p, off));
                }
            }
        }
    }

    /// Journals what happened to the buffered event at `p`/`off`, with its attempt count and,
    /// for the end of a delivery, when it was delivered (one entry per delivery, not two).
    fn journal(&self, kind: Kind, p: u32, off: u64, delivered_ms: Option<i64>, detail: Option<String>) {
        let Some(journal) = &self.journal else { return };
        let Some(entry) = self.parts.get(p as usize).and_then(|part| part.entries.get(&off)) else { return };
        let mut e = JournalEntry::now(kind, &self.topic, p, off, &self.group, &entry.record.id);
        e.attempt = Some(entry.attempts);
        e.delivered_ms = delivered_ms;
        e.detail = detail;
        journal.record(e);
        self.journaled.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Hands the positions of changed partitions to the position writer, which stores them
    /// once the journal entries they reflect are durable (without holding up deliveries).
    fn commit(&mut self) {
        self.last_commit = Instant::now();
        let cursors: Vec<(u32, Cursor)> = self
            .parts
            .iter()
            .enumerate()
            .filter(|(_, part)| part.dirty)
            .map(|(p, part)| {
                let unacked: Vec<u64> = part.entries.keys().copied().collect();
                let attempts = part.entries.iter().filter(|(_, e)| e.attempts > 0).map(|(o, e)| (*o, e.attempts)).collect();
                let committed = unacked.first().copied().unwrap_or(part.next_read);
                (p as u32, Cursor { committed, scanned: part.next_read, unacked, attempts })
            })
            .collect();
        self.parts.iter_mut().for_each(|p| p.dirty = false);
        self.positions.store(cursors, self.journaled.swap(false, std::sync::atomic::Ordering::Relaxed));
    }

    /// [`Actor::commit`], then waits until the positions are stored (before partitions are
    /// given up, and at shutdown).
    async fn commit_now(&mut self) {
        self.commit();
        if !self.positions.sync().await {
            tracing::warn!(topic = %self.topic, group = %self.group, "group position not stored yet; the position writer retries");
        }
    }

    async fn status(&self) -> GroupStatus {
        let mut partitions = Vec::with_capacity(self.parts.len());
        for (p, part) in self.parts.iter().enumerate() {
            let status = if part.owned {
                let committed = part.entries.keys().next().copied().unwrap_or(part.next_read);
                let in_flight = part.entries.values().filter(|e| matches!(e.state, State::InFlight(_))).count() as u32;
                let lag = part.entries.len() as u64 + part.end.saturating_sub(part.next_read);
                PartitionStatus { partition: p as u32, committed, end: part.end, lag, in_flight }
            } else {
                // Served by another node (or by none right now): its stored position.
                let cursor = self.log.load_cursor(&self.topic, &self.group, p as u32).await.ok().flatten();
                let committed = cursor.as_ref().map_or(0, |c| c.committed);
                let lag = cursor.map_or(part.end, |c| c.unacked.len() as u64 + part.end.saturating_sub(c.scanned));
                PartitionStatus { partition: p as u32, committed, end: part.end, lag, in_flight: 0 }
            };
            partitions.push(status);
        }
        GroupStatus {
            topic: self.topic.clone(),
            group: self.group.clone(),
            subscribers: self.subs.len() as u32,
            partitions,
            quarantined_keys: self.quarantined.len() as u32,
            dead_letter_topic: self.dlq.clone(),
        }
    }
}
