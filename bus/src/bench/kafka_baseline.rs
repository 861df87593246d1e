//! The yardstick of `justizbus bench --log kafka://...`: a plain rdkafka producer and consumer
//! loop (no bus) on the same broker, with the same events (size, keys, partitions) and the same
//! guarantees as the bus's Kafka backend (idempotent producer, `acks=all`, every send awaited).

use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

use super::{payload, per_sec};
use crate::partitioner::partition_for_key;

/// What to send.
pub struct Baseline<'a> {
    /// `host:port,...`.
    pub brokers: &'a str,
    /// Kafka topic to create and use.
    pub topic: &'a str,
    /// Events.
    pub events: u64,
    /// Payload bytes.
    pub size: usize,
    /// Distinct keys.
    pub keys: u32,
    /// Partitions.
    pub partitions: u32,
    /// Sends awaited together (the bus bench's batch size times its streams).
    pub in_flight: usize,
}

/// Produces then consumes `events` records; returns both rates as JSON.
pub async fn run(b: Baseline<'_>) -> anyhow::Result<serde_json::Value> {
    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", b.brokers);
    let admin: AdminClient<DefaultClientContext> = base.create()?;
    let topic = NewTopic::new(b.topic, b.partitions as i32, TopicReplication::Fixed(1));
    for result in admin.create_topics([&topic], &AdminOptions::new()).await? {
        result.map_err(|(name, code)| anyhow::anyhow!("creating {name}: {code}"))?;
    }
    let producer: FutureProducer = base.clone().set("enable.idempotence", "true").set("acks", "all").set("linger.ms", "2").create()?;
    let started = Instant::now();
    let mut i = 0u64;
    while i < b.events {
        let n = (b.in_flight as u64).min(b.events - i);
        let mut futures = Vec::with_capacity(n as usize);
        let records: Vec<(String, Vec<u8>)> =
            (i..i + n).map(|k| (format!("case-{}", k % u64::from(b.keys.max(1))), payload(b.size, k))).collect();
        for (key, value) in &records {
            let p = partition_for_key(key.as_bytes(), b.partitions) as i32;
            let mut record = FutureRecord::to(b.topic).partition(p).key(key.as_str()).payload(value.as_slice());
            let future = loop {
                match producer.send_result(record) {
                    Ok(f) => break f,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        record = back;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            };
            futures.push(future);
        }
        for f in futures {
            f.await.context("producer stopped")?.map_err(|(e, _)| e)?;
        }
        i += n;
    }
    let produce_elapsed = started.elapsed();

    let consumer: StreamConsumer = base.set("group.id", "justizbus-bench-baseline").set("enable.auto.commit", "false").create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..b.partitions {
        tpl.add_partition_offset(b.topic, p as i32, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let mut consumed = 0u64;
    while consumed < b.events {
        match tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await {
            Ok(m) => {
                m?;
                consumed += 1;
            }
            Err(_) => break,
        }
    }
    let consume_elapsed = started.elapsed();
    Ok(json!({
        "produce": {"events": b.events, "seconds": produce_elapsed.as_secs_f64(), "events_per_sec": per_sec(b.events, produce_elapsed)},
        "consume": {"events": consumed, "seconds": consume_elapsed.as_secs_f64(), "events_per_sec": per_sec(consumed, consume_elapsed)},
    }))
}
