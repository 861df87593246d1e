//! Delivery: consumer groups with per-key ordered, at-least-once delivery (DESIGN.md section 4).
//!
//! Each (topic, group) pair is served by one actor task ([`group`]) that owns all of the
//! group's delivery state; subscribers talk to it through a channel. The [`Delivery`] manager
//! finds or starts the actor for a group.
//!
//! Semantics, in short:
//! - For one key, event n+1 is not handed out before event n is acknowledged (or skipped);
//!   different keys of a partition flow in parallel.
//! - Every delivery has an ack deadline; expiry or a nack redelivers after an exponential
//!   backoff. After `max_attempts` failed deliveries the event goes to the group's dead-letter
//!   topic and its key is quarantined until an operator releases or skips it.
//! - A subscriber's credit (`max_unacked`) bounds what it holds; the group's read buffer is
//!   bounded in events and bytes, so memory stays bounded however slow the subscribers are.
//! - The persisted position of a partition is its lowest unacknowledged offset plus the set of
//!   unacknowledged offsets above it, so a crash redelivers and never skips.

pub mod group;
pub mod positions;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::config::DeliverySettings;
use crate::event::validate_name;
use crate::log::{Log, Quarantine, StoredRecord};
use crate::{Error, Result};

pub use group::{GroupStatus, PartitionStatus};

/// Where a group without a stored position starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartPosition {
    /// At the log start.
    #[default]
    Earliest,
    /// At the current end: only new events.
    Latest,
}

/// Group settings a subscriber may set; `None` keeps the current value (the gRPC edge maps
/// the wire's 0 to `None`).
pub type GroupOverrides = crate::log::GroupConfig;

/// What a subscriber asks for.
#[derive(Debug, Clone)]
pub struct SubscribeParams {
    /// Topic.
    pub topic: String,
    /// Consumer group.
    pub group: String,
    /// Credit: most unacknowledged deliveries at once (0: server default).
    pub max_unacked: u32,
    /// Group settings to apply.
    pub overrides: GroupOverrides,
    /// Start of a new group.
    pub start: StartPosition,
}

/// One event handed to a subscriber.
#[derive(Debug, Clone)]
pub struct Delivered {
    /// Id to acknowledge with.
    pub delivery_id: u64,
    /// The record.
    pub record: Arc<StoredRecord>,
    /// 1 for the first delivery.
    pub attempt: u32,
}

/// Messages from a group to one subscriber.
#[derive(Debug)]
pub enum Outgoing {
    /// An event.
    Delivery(Delivered),
    /// An ack or nack that could not be applied.
    AckError {
        /// The delivery id named.
        delivery_id: u64,
        /// Why.
        error: Error,
    },
}

/// A joined subscriber: receives [`Outgoing`] messages; acks through [`Subscription::control`].
pub struct Subscription {
    /// Partitions of the topic.
    pub partitions: u32,
    /// Credit in force.
    pub max_unacked: u32,
    /// Messages for this subscriber.
    pub receiver: mpsc::Receiver<Outgoing>,
    /// Sends acks, nacks, credit; leaves the group when dropped.
    pub control: SubscriberControl,
}

/// Acks, nacks and credit of one subscriber. Leaves the group when dropped.
pub struct SubscriberControl {
    id: u64,
    /// The group actor's command channel.
    group: mpsc::Sender<group::Command>,
    max_unacked_limit: u32,
}

impl SubscriberControl {
    /// Acknowledges deliveries.
    pub async fn ack(&self, delivery_ids: Vec<u64>) -> Result<()> {
        self.send(group::Command::Ack { sub: self.id, ids: delivery_ids }).await
    }

    /// Acknowledges deliveries whose consequences are still being made durable: the
    /// subscriber's credit and the cases' next events are freed now, but the group's stored
    /// position keeps the deliveries until [`Settler::settle`] (so a crash redelivers them).
    pub async fn release(&self, delivery_ids: Vec<u64>) -> Result<()> {
        self.send(group::Command::Release { sub: self.id, ids: delivery_ids }).await
    }

    /// A handle that settles released deliveries, usable after the subscriber has left.
    pub fn settler(&self) -> Settler {
        Settler { group: self.group.clone() }
    }

    /// Rejects deliveries: they are redelivered after a backoff.
    pub async fn nack(&self, delivery_ids: Vec<u64>) -> Result<()> {
        self.send(group::Command::Nack { sub: self.id, ids: delivery_ids }).await
    }

    /// Changes the credit. More than the server limit is refused.
    pub async fn set_credit(&self, max_unacked: u32) -> Result<()> {
        check_credit(max_unacked, self.max_unacked_limit)?;
        self.send(group::Command::Flow { sub: self.id, max_unacked }).await
    }

    async fn send(&self, cmd: group::Command) -> Result<()> {
        self.group.send(cmd).await.map_err(|_| Error::ShuttingDown)
    }
}

/// Settles deliveries released with [`SubscriberControl::release`].
#[derive(Clone)]
pub struct Settler {
    /// The group's command channel.
    group: mpsc::Sender<group::Command>,
}

impl Settler {
    /// The consequences of these released deliveries are durable: they may be committed.
    /// Does not wait: when the group's queue is full, a task waits for room, so one busy group
    /// holds up nobody else's settles. A group that has stopped has nothing to settle.
    pub fn settle_soon(&self, delivery_ids: Vec<u64>) {
        match self.group.try_send(group::Command::Settle { ids: delivery_ids }) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(cmd)) => {
                let group = self.group.clone();
                tokio::spawn(async move {
                    let _ = group.send(cmd).await;
                });
            }
        }
    }
}

impl Drop for SubscriberControl {
    fn drop(&mut self) {
        let group = self.group.clone();
        let sub = self.id;
        // Leaving must not be lost when the channel is momentarily full.
        if let Err(mpsc::error::TrySendError::Full(cmd)) = group.try_send(group::Command::Leave { sub }) {
            tokio::spawn(async move {
                let _ = group.send(cmd).await;
            });
        }
    }
}

fn check_credit(max_unacked: u32, limit: u32) -> Result<()> {
    if max_unacked > limit {
        return Err(Error::invalid(
            "max_unacked",
            format!("{max_unacked} exceeds the server limit of {limit} unacknowledged deliveries per subscriber"),
        ));
    }
    Ok(())
}

/// Finds or starts group actors.
pub struct Delivery {
    log: Arc<dyn Log>,
    settings: DeliverySettings,
    /// (topic, group) -> the actor's command channel. Locked only to look up or start actors.
    groups: Mutex<HashMap<(String, String), mpsc::Sender<group::Command>>>,
    next_subscriber: AtomicU64,
    /// Read-ahead bytes of all groups together.
    budget: Arc<group::Budget>,
    /// The delivery journal, when on.
    journal: Option<crate::audit::journal::Journal>,
}

/// Group names the bus keeps for its own readers (the router); clients cannot join them.
pub const RESERVED_GROUP_PREFIX: &str = "justizbus.";

/// Whether `group` is one of the bus's own.
pub fn is_reserved_group(group: &str) -> bool {
    group.starts_with(RESERVED_GROUP_PREFIX)
}

/// Name of a group's dead-letter topic.
pub fn dead_letter_topic(topic: &str, group: &str) -> String {
    format!("{topic}.{group}.dlq")
}

impl Delivery {
    /// A manager over a log.
    pub fn new(log: Arc<dyn Log>, settings: DeliverySettings) -> Self {
        Self::with_journal(log, settings, None)
    }

    /// A manager whose groups journal what they do.
    pub fn with_journal(log: Arc<dyn Log>, settings: DeliverySettings, journal: Option<crate::audit::journal::Journal>) -> Self {
        let budget = Arc::new(group::Budget::new(settings.max_buffered_bytes_total));
        Delivery { log, settings, groups: Mutex::new(HashMap::new()), next_subscriber: AtomicU64::new(1), budget, journal }
    }

    async fn group(&self, topic: &str, group: &str, create: Option<StartPosition>) -> Result<mpsc::Sender<group::Command>> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        if is_reserved_group(group) {
            return Err(Error::invalid("group", format!("group names beginning with {RESERVED_GROUP_PREFIX:?} belong to the bus itself")));
        }
        if dead_letter_topic(topic, group).len() > crate::event::MAX_NAME_LEN {
            return Err(Error::invalid(
                "group",
                "topic and group names together are too long to name the dead-letter topic <topic>.<group>.dlq",
            ));
        }
        let mut groups = self.groups.lock().await;
        if let Some(tx) = groups.get(&(topic.to_string(), group.to_string())) {
            if !tx.is_closed() {
                return Ok(tx.clone());
            }
        }
        let start = match create {
            Some(start) => start,
            None => {
                let known = self.log.list_groups().await?;
                if !known.iter().any(|(t, g)| t == topic && g == group) {
                    return Err(Error::UnknownGroup { topic: topic.into(), group: group.into() });
                }
                StartPosition::Earliest
            }
        };
        let tx =
            group::spawn(self.log.clone(), topic, group, self.settings.clone(), start, self.budget.clone(), self.journal.clone()).await?;
        groups.insert((topic.to_string(), group.to_string()), tx.clone());
        Ok(tx)
    }

    /// Joins a subscriber to a group (creating the group if new).
    pub async fn subscribe(&self, params: SubscribeParams) -> Result<Subscription> {
        check_credit(params.max_unacked, self.settings.max_unacked_limit)?;
        let max_unacked = if params.max_unacked == 0 { self.settings.default_max_unacked } else { params.max_unacked };
        let tx = self.group(&params.topic, &params.group, Some(params.start)).await?;
        let id = self.next_subscriber.fetch_add(1, Ordering::Relaxed);
        // Room for every delivery the credit allows plus some ack errors.
        let (out, receiver) = mpsc::channel(self.settings.max_unacked_limit as usize + 64);
        let (reply, rx) = oneshot::channel();
        tx.send(group::Command::Join { sub: id, max_unacked, overrides: params.overrides, out, reply })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let partitions = rx.await.map_err(|_| Error::ShuttingDown)??;
        Ok(Subscription {
            partitions,
            max_unacked,
            receiver,
            control: SubscriberControl { id, group: tx, max_unacked_limit: self.settings.max_unacked_limit },
        })
    }

    /// State of a group.
    pub async fn describe(&self, topic: &str, group: &str) -> Result<GroupStatus> {
        if is_reserved_group(group) {
            return self.reader_status(topic, group).await;
        }
        let tx = self.group(topic, group, None).await?;
        let (reply, rx) = oneshot::channel();
        tx.send(group::Command::Describe { reply }).await.map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)
    }

    /// State of one of the bus's own readers (the router): its stored positions, no actor.
    async fn reader_status(&self, topic: &str, group: &str) -> Result<GroupStatus> {
        let info = self.log.describe_topic(topic).await?;
        let (mut partitions, mut known) = (Vec::with_capacity(info.partitions.len()), false);
        for (p, offsets) in info.partitions.iter().enumerate() {
            let cursor = self.log.load_cursor(topic, group, p as u32).await?;
            known |= cursor.is_some();
            let committed = cursor.map_or(offsets.start, |c| c.committed);
            partitions.push(group::PartitionStatus {
                partition: p as u32,
                committed,
                end: offsets.end,
                lag: offsets.end.saturating_sub(committed),
                in_flight: 0,
            });
        }
        if !known {
            return Err(Error::UnknownGroup { topic: topic.into(), group: group.into() });
        }
        Ok(GroupStatus {
            topic: topic.into(),
            group: group.into(),
            subscribers: 0,
            partitions,
            quarantined_keys: 0,
            dead_letter_topic: String::new(),
        })
    }

    /// All groups, described.
    pub async fn list(&self) -> Result<Vec<GroupStatus>> {
        let mut pairs = self.log.list_groups().await?;
        for (t, g) in self.groups.lock().await.keys() {
            if !pairs.iter().any(|(pt, pg)| pt == t && pg == g) {
                pairs.push((t.clone(), g.clone()));
            }
        }
        pairs.sort();
        let mut out = Vec::with_capacity(pairs.len());
        for (t, g) in pairs {
            out.push(self.describe(&t, &g).await?);
        }
        Ok(out)
    }

    /// Releases (redeliver from attempt 1) or skips a quarantined key.
    pub async fn resolve_quarantine(&self, topic: &str, group: &str, key: Bytes, skip: bool) -> Result<Quarantine> {
        let tx = self.group(topic, group, None).await?;
        let (reply, rx) = oneshot::channel();
        tx.send(group::Command::Resolve { key, skip, reply }).await.map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Quarantined keys of a group.
    pub async fn quarantine(&self, topic: &str, group: &str) -> Result<Vec<Quarantine>> {
        validate_name("topic", topic)?;
        validate_name("group", group)?;
        self.log.list_quarantine(topic, group).await
    }

    /// Persists every group's position and stops the actors.
    pub async fn shutdown(&self) {
        let groups: Vec<_> = self.groups.lock().await.drain().collect();
        for ((topic, group), tx) in groups {
            let (reply, rx) = oneshot::channel();
            if tx.send(group::Command::Shutdown { reply }).await.is_ok() {
                let _ = rx.await;
            }
            tracing::debug!(topic, group, "group stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::log::{NewRecord, TopicConfig};

    async fn next_delivery(sub: &mut Subscription) -> Delivered {
        match tokio::time::timeout(Duration::from_secs(5), sub.receiver.recv()).await {
            Ok(Some(Outgoing::Delivery(d))) => d,
            other => panic!("expected a delivery, got {other:?}"),
        }
    }

    /// A log in `dir` with topic `t` of `partitions` partitions holding `n` records of
    /// `size` bytes, record i under key `case-<i % keys>`.
    async fn log_with(dir: &std::path::Path, partitions: u32, n: usize, keys: usize, size: usize) -> Arc<dyn Log> {
        let url = format!("file://{}", dir.display());
        let log = crate::log::open(&url, &crate::config::LogSettings::default(), &Default::default()).await.expect("log");
        log.create_topic("t", TopicConfig { partitions, retention_ms: 0, retention_bytes: 0 }).await.expect("topic");
        let records = (0..n)
            .map(|i| NewRecord {
                id: format!("e{i}"),
                key: Bytes::from(format!("case-{}", i % keys)),
                timestamp_ms: 0,
                value: Bytes::from(vec![i as u8; size]),
            })
            .collect();
        log.append("t", records).await.expect("append");
        log
    }

    /// Leaves the group and stops the engine, as a server shutdown does.
    async fn stop(delivery: &Delivery, sub: Subscription) {
        drop(sub);
        delivery.shutdown().await;
    }

    fn params() -> SubscribeParams {
        SubscribeParams {
            topic: "t".into(),
            group: "g".into(),
            max_unacked: 10,
            overrides: GroupOverrides::default(),
            start: StartPosition::Earliest,
        }
    }

    /// With the read-ahead budget of all groups used up, every group still delivers
    /// everything (a group that holds nothing reads a little), and gives its bytes back.
    #[tokio::test]
    async fn groups_make_progress_over_the_shared_budget() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = log_with(dir.path(), 2, 200, 7, 1000).await;
        let settings = DeliverySettings { max_buffered_bytes_total: 1, ..DeliverySettings::default() };
        let delivery = Delivery::new(log.clone(), settings);
        let mut subs = Vec::new();
        for group in ["g1", "g2"] {
            subs.push(delivery.subscribe(SubscribeParams { group: group.into(), ..params() }).await.expect("subscribe"));
        }
        for sub in &mut subs {
            let mut seen = std::collections::BTreeSet::new();
            while seen.len() < 200 {
                let d = next_delivery(sub).await;
                seen.insert(d.record.id.clone());
                sub.control.ack(vec![d.delivery_id]).await.expect("ack");
            }
        }
        drop(subs);
        delivery.shutdown().await;
        // An actor answers the shutdown just before it is dropped.
        for _ in 0..100 {
            if delivery.budget.used() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(delivery.budget.used(), 0, "stopped groups give their read-ahead back");
        log.close().await.expect("close");
    }

    /// A group whose last subscriber left gives back the read-ahead it never handed out, reads
    /// nothing more while it has no subscriber, and delivers everything, in order, to the next.
    #[tokio::test]
    async fn a_group_without_subscribers_holds_no_read_ahead() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = log_with(dir.path(), 1, 200, 1, 1000).await;
        let delivery = Delivery::new(log.clone(), DeliverySettings::default());
        let mut sub = delivery.subscribe(SubscribeParams { max_unacked: 2, ..params() }).await.expect("subscribe");
        let first = next_delivery(&mut sub).await;
        assert_eq!(first.record.id, "e0");
        assert!(delivery.budget.used() >= 100 * 1000, "the group read ahead: {}", delivery.budget.used());
        drop(sub);
        // Only the delivery handed out (back in the buffer, attempt 1) stays.
        let mut used = delivery.budget.used();
        for _ in 0..100 {
            if used <= 2 * 1010 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            used = delivery.budget.used();
        }
        assert!(used <= 2 * 1010, "read-ahead given back, {used} bytes still held");
        // New events do not make it read again while nobody subscribes.
        let more = (200..260).map(|i| NewRecord {
            id: format!("e{i}"),
            key: Bytes::from("case-0"),
            timestamp_ms: 0,
            value: Bytes::from(vec![1u8; 1000]),
        });
        log.append("t", more.collect()).await.expect("append");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(delivery.budget.used() <= 2 * 1010, "no read-ahead without subscribers: {}", delivery.budget.used());
        // The next subscriber gets every event once more from e0, in order.
        let mut sub = delivery.subscribe(params()).await.expect("subscribe again");
        for i in 0..260 {
            let d = next_delivery(&mut sub).await;
            assert_eq!(d.record.id, format!("e{i}"));
            sub.control.ack(vec![d.delivery_id]).await.expect("ack");
        }
        stop(&delivery, sub).await;
        log.close().await.expect("close");
    }

    /// A released delivery frees its case at once but is committed only when settled: a
    /// restart before that redelivers it (and only it).
    #[tokio::test]
    async fn released_deliveries_are_committed_only_when_settled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let settings = DeliverySettings { commit_interval_ms: 10, ..DeliverySettings::default() };
        let log = log_with(dir.path(), 1, 3, 1, 1).await;

        let delivery = Delivery::new(log.clone(), settings.clone());
        let mut sub = delivery.subscribe(params()).await.expect("subscribe");
        let first = next_delivery(&mut sub).await;
        sub.control.release(vec![first.delivery_id]).await.expect("release");
        // The case moves on without the settle.
        let second = next_delivery(&mut sub).await;
        assert_eq!(second.record.id, "e1");
        sub.control.ack(vec![second.delivery_id]).await.expect("ack");
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop(&delivery, sub).await;

        // After a restart: e0 (never settled) comes again, e1 does not; then e2.
        let delivery = Delivery::new(log.clone(), settings.clone());
        let mut sub = delivery.subscribe(params()).await.expect("subscribe again");
        let again = next_delivery(&mut sub).await;
        assert_eq!(again.record.id, "e0", "an unsettled delivery is redelivered");
        let settler = sub.control.settler();
        sub.control.release(vec![again.delivery_id]).await.expect("release");
        settler.settle_soon(vec![again.delivery_id]);
        let third = next_delivery(&mut sub).await;
        assert_eq!(third.record.id, "e2");
        sub.control.ack(vec![third.delivery_id]).await.expect("ack");
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop(&delivery, sub).await;

        // Settled and acknowledged: nothing comes again.
        let delivery = Delivery::new(log.clone(), settings);
        let mut sub = delivery.subscribe(params()).await.expect("subscribe a third time");
        assert!(tokio::time::timeout(Duration::from_millis(300), sub.receiver.recv()).await.is_err(), "everything was committed");
        stop(&delivery, sub).await;
        log.close().await.expect("close");
    }
}
