//! Shared consumer groups: each bus node with subscribers of a group joins a Kafka consumer
//! group of the same name, and Kafka's group protocol (cooperative-sticky assignment) decides
//! which node serves which partition. The membership consumer never fetches records (its
//! partitions are paused; the bus reads through its own readers); it exists for the protocol.
//!
//! A partition taken away from this node is handed over only after the node's group actor
//! stored its position and dropped its deliveries (the revoke callback waits for that), so the
//! next owner starts exactly where this one stopped. A node that dies (`kill -9`) loses its
//! partitions after `session_timeout_ms`; its successor resumes from the last stored position,
//! redelivering what was delivered since (at least once).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use tokio::sync::watch;

use super::kafka_error;
use crate::log::{Assignment, Membership};
use crate::Result;

/// How long a revocation waits for the group actor to release the partitions.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(20);

struct Shared {
    assignment: watch::Sender<Assignment>,
    /// Highest generation the actor confirmed.
    confirmed: Mutex<u64>,
    released: Condvar,
    /// Leaving: revocations need no confirmation (the actor already released everything).
    leaving: AtomicBool,
}

struct MembershipContext {
    shared: Arc<Shared>,
    topic: String,
}

impl ClientContext for MembershipContext {}

impl MembershipContext {
    fn change(&self, f: impl FnOnce(&mut BTreeSet<u32>)) -> u64 {
        let mut generation = 0;
        self.shared.assignment.send_modify(|a| {
            f(&mut a.partitions);
            a.generation += 1;
            generation = a.generation;
        });
        generation
    }

    fn partitions(&self, tpl: &rdkafka::TopicPartitionList) -> Vec<u32> {
        tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition().max(0) as u32).collect()
    }
}

impl ConsumerContext for MembershipContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else { return };
        let revoked = self.partitions(tpl);
        let generation = self.change(|set| revoked.iter().for_each(|p| _ = set.remove(p)));
        tracing::info!(topic = %self.topic, partitions = ?revoked, generation, "partitions revoked from this node");
        if self.shared.leaving.load(Ordering::SeqCst) {
            return;
        }
        // Hold the rebalance until the actor stored the positions of the revoked partitions.
        let confirmed = self.shared.confirmed.lock().unwrap_or_else(|e| e.into_inner());
        let (confirmed, timeout) =
            self.shared.released.wait_timeout_while(confirmed, RELEASE_TIMEOUT, |c| *c < generation).unwrap_or_else(|e| e.into_inner());
        if timeout.timed_out() {
            tracing::warn!(topic = %self.topic, generation, confirmed = *confirmed, "partitions handed over before their release was confirmed");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(tpl) = rebalance else { return };
        // Records are read by the bus's readers, never by this consumer.
        if let Err(e) = consumer.pause(tpl) {
            tracing::warn!(topic = %self.topic, error = %e, "pausing the membership consumer failed");
        }
        let assigned = self.partitions(tpl);
        let generation = self.change(|set| set.extend(assigned.iter().copied()));
        tracing::info!(topic = %self.topic, partitions = ?assigned, generation, "partitions assigned to this node");
    }
}

/// Joins `group_id` as a member subscribed to `kafka_topic`.
pub(super) fn join(base: &ClientConfig, kafka_topic: &str, group_id: &str, session_timeout_ms: u64) -> Result<Membership> {
    let (tx, rx) = watch::channel(Assignment::default());
    let shared = Arc::new(Shared { assignment: tx, confirmed: Mutex::new(0), released: Condvar::new(), leaving: AtomicBool::new(false) });
    let mut config = base.clone();
    config
        .set("group.id", group_id)
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (session_timeout_ms / 3).max(100).to_string())
        // The rebalance timeout: how long a rebalance waits for members to rejoin. Kafka's
        // default (5 minutes) would keep a dead member's partitions unserved that long on
        // brokers that wait for it (tansu does); this thread polls every 100 ms.
        .set("max.poll.interval.ms", (session_timeout_ms * 2).max(10_000).to_string())
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    let context = MembershipContext { shared: shared.clone(), topic: kafka_topic.to_string() };
    let consumer: BaseConsumer<MembershipContext> =
        config.create_with_context(context).map_err(|e| kafka_error("creating the group membership consumer", e))?;
    consumer.subscribe(&[kafka_topic]).map_err(|e| kafka_error("joining the consumer group", e))?;
    // The group protocol (heartbeats, rebalance callbacks) runs on this node's own thread, so a
    // revocation may wait for the async group actor without blocking the runtime.
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        let group = group_id.to_string();
        std::thread::Builder::new()
            .name("kafka-membership".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Some(Err(e)) = consumer.poll(Duration::from_millis(100)) {
                        tracing::debug!(group, error = %e, "group membership");
                    }
                }
                consumer.unsubscribe();
                drop(consumer);
                tracing::info!(group, "left the consumer group");
            })
            .map_err(|e| crate::Error::Internal(format!("starting the membership thread: {e}")))?
    };
    let confirm = {
        let shared = shared.clone();
        Box::new(move |generation: u64| {
            let mut confirmed = shared.confirmed.lock().unwrap_or_else(|e| e.into_inner());
            *confirmed = (*confirmed).max(generation);
            shared.released.notify_all();
        })
    };
    let leave = Leave { stop, shared, thread: Some(thread) };
    Ok(Membership::new(rx, confirm, Box::new(leave)))
}

/// Stops the membership thread (which leaves the group) when dropped.
struct Leave {
    stop: Arc<AtomicBool>,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.shared.leaving.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
        // Not joined: leaving the group may take a round trip; the thread ends by itself.
        drop(self.thread.take());
    }
}
