//! `justizbus bench routing`: what routing costs, measured through a real server.
//!
//! Starts `justizbus serve` as a child process with a generated directory of `--participants`
//! courts, subscribes one client per recipient mailbox of `--cases` active cases (each case
//! has a sender and a recipient participant), and runs, in order:
//!
//! 1. mailbox read cost, small store: 20 deliveries to a quiet mailbox are read while the
//!    mailbox store holds (almost) nothing else;
//! 2. throughput: `--events` events of `--size` bytes published in batches to the ingest
//!    topic; the router appends them to the recipients' mailboxes and the subscribers receive
//!    and acknowledge them (every acknowledgement also appends a receipt to the sender's
//!    mailbox). Routed deliveries/s = events delivered / time from first publish to last
//!    delivery;
//! 3. latency: events published one by one at `--rate`/s; publish-to-delivery time measured
//!    at the subscribers (from the publisher's send time carried in a header);
//! 4. mailbox read cost, large store: the same read as 1. on another quiet mailbox, now that
//!    the store holds every delivery and receipt of 2. and 3.
//!
//! Phase 2 also reports the CPU time server and client used per delivery, which compares
//! builds more steadily than time does on a shared machine, and the server's page faults per
//! delivery (the allocator's churn), which vary less still.
//!
//! Everything is durable before it is acknowledged; client and server share the cores.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use futures_util::FutureExt;
use justizbus_proto::v1 as pb;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::{now_ns, payload, per_sec, percentile_ms, slow_spells, tempfile_dir, timed_samples};
use crate::cli::connect;
use crate::process::{cpu_time_of, ServerProcess};
use crate::routing::directory::mailbox_topic;
use crate::routing::mailbox::STORE_TOPIC;

/// Options of `justizbus bench routing`.
#[derive(Args, Debug, Clone)]
pub struct RoutingBenchArgs {
    /// Participants in the generated directory.
    #[arg(long, default_value_t = 10_000)]
    pub participants: u32,
    /// Active cases; each has its own sender and recipient (needs participants >= 2 x cases + 2).
    #[arg(long, default_value_t = 1_000)]
    pub cases: u32,
    /// Event payload in bytes.
    #[arg(long, default_value_t = 5 * 1024)]
    pub size: usize,
    /// Events of the throughput phase.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// Events per `PublishBatch` call.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Concurrent batch streams (4 publish faster than the bus routes, so routing is measured).
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Steady publish rate (events/s) of the latency phase.
    #[arg(long, default_value_t = 2_000)]
    pub rate: u64,
    /// Duration of the latency phase in seconds.
    #[arg(long, default_value_t = 10)]
    pub latency_secs: u64,
    /// gRPC connections the subscribers share.
    #[arg(long, default_value_t = 8)]
    pub connections: usize,
    /// Data directory of the started server (default: a temporary directory, removed after).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Configuration file for the started server (its `[routing] directory` is replaced).
    #[arg(long)]
    pub server_config: Option<PathBuf>,
}

/// Deliveries a read-cost probe reads.
const PROBE_EVENTS: u64 = 20;

fn participant(i: u32) -> String {
    format!("DE.Justiz.bench-{i:05}.1")
}

fn address(i: u32) -> String {
    format!("court:BX{i:05}")
}

/// A directory of `n` courts.
fn directory_toml(n: u32) -> String {
    let mut s = String::with_capacity(n as usize * 100);
    for i in 0..n {
        s.push_str(&format!(
            "[[participant]]\nid = \"{}\"\nkind = \"court\"\nname = \"Bench court {i}\"\ncourts = [\"BX{i:05}\"]\n\n",
            participant(i)
        ));
    }
    s
}

/// Case `c` goes from participant 2c to participant 2c + 1.
fn case_event(args: &RoutingBenchArgs, prefix: &str, i: u64, sent_ns: Option<u128>) -> pb::Event {
    let c = (i % u64::from(args.cases)) as u32;
    let mut e = pb::Event {
        id: format!("{prefix}-{}-{i}", std::process::id()),
        source: "justizbus-bench".into(),
        r#type: "nachricht.bench.0000000".into(),
        subject: format!("case-{c}"),
        sender: address(2 * c),
        recipients: vec![address(2 * c + 1)],
        data: payload(args.size, i).into(),
        data_content_type: "application/json".into(),
        ..Default::default()
    };
    if let Some(ns) = sent_ns {
        e.headers.insert("bench.sent_ns".into(), ns.to_string());
    }
    e
}

/// What the subscribers share.
#[derive(Default)]
struct Counters {
    /// Deliveries received (and acknowledged).
    delivered: AtomicU64,
    /// Subscriptions confirmed by the server.
    subscribed: AtomicU64,
}

/// One mailbox subscriber: acknowledges what it received in one `Ack` as soon as no further
/// delivery is ready (as an efficient client does; an ack per delivery costs a message each
/// way), and reports (send time, latency) of events that carry a send time.
async fn subscriber(
    channel: Channel,
    topic: String,
    counters: Arc<Counters>,
    latencies: mpsc::UnboundedSender<(u128, u128)>,
) -> anyhow::Result<()> {
    let mut client = pb::subscriber_client::SubscriberClient::new(channel).max_decoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::channel(256);
    let init = pb::SubscribeInit { topic, group: "bench".into(), max_unacked: 100, ..Default::default() };
    tx.send(pb::SubscribeRequest { request: Some(pb::subscribe_request::Request::Init(init)) }).await?;
    let mut stream = client.subscribe(ReceiverStream::new(rx)).await?.into_inner();
    let mut received = Vec::new();
    let mut next = stream.message().await?;
    while let Some(msg) = next {
        match msg.response {
            Some(pb::subscribe_response::Response::Subscribed(_)) => {
                counters.subscribed.fetch_add(1, Ordering::Relaxed);
            }
            Some(pb::subscribe_response::Response::Delivery(d)) => {
                if let Some(sent) = d.event.as_ref().and_then(|e| e.headers.get("bench.sent_ns")).and_then(|s| s.parse::<u128>().ok()) {
                    let _ = latencies.send((sent, now_ns().saturating_sub(sent)));
                }
                counters.delivered.fetch_add(1, Ordering::Relaxed);
                received.push(d.delivery_id);
            }
            _ => {}
        }
        next = match stream.message().now_or_never() {
            Some(ready) => ready?,
            None => {
                if !received.is_empty() {
                    let ack = pb::Ack { delivery_ids: std::mem::take(&mut received) };
                    tx.send(pb::SubscribeRequest { request: Some(pb::subscribe_request::Request::Ack(ack)) }).await?;
                }
                stream.message().await?
            }
        };
    }
    Ok(())
}

/// Latency above which a routed event counts as slow in the spells report (the p99 target).
const ROUTED_SLOW_LATENCY_NS: u128 = 25_000_000;

/// Waits until `counter` reaches `target`; fails when it stops moving for `idle`.
async fn wait_for(counter: &AtomicU64, target: u64, idle: Duration, what: &str) -> anyhow::Result<()> {
    let (mut last, mut moved) = (counter.load(Ordering::Relaxed), Instant::now());
    loop {
        let now = counter.load(Ordering::Relaxed);
        if now >= target {
            return Ok(());
        }
        if now != last {
            (last, moved) = (now, Instant::now());
        } else if moved.elapsed() > idle {
            bail!("{what}: stuck at {now} of {target}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn topic_end(channel: &Channel, topic: &str) -> anyhow::Result<u64> {
    let info = pb::admin_client::AdminClient::new(channel.clone()).describe_topic(pb::DescribeTopicRequest { topic: topic.into() }).await;
    match info {
        Ok(info) => Ok(info.into_inner().partition_info.iter().map(|p| p.end_offset).sum()),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(0),
        Err(s) => Err(s.into()),
    }
}

/// Routes `PROBE_EVENTS` events to the quiet participant `who`, then times a fresh
/// subscription reading them all.
async fn probe_read(channel: &Channel, args: &RoutingBenchArgs, who: u32, tag: &str) -> anyhow::Result<serde_json::Value> {
    let mut publisher = pb::publisher_client::PublisherClient::new(channel.clone()).max_encoding_message_size(usize::MAX);
    let reqs: Vec<pb::PublishRequest> = (0..PROBE_EVENTS)
        .map(|i| {
            let mut e = case_event(args, tag, i, None);
            e.subject = format!("probe-{tag}");
            e.recipients = vec![address(who)];
            pb::PublishRequest { topic: "xjustiz.ingest".into(), event: Some(e) }
        })
        .collect();
    publisher.publish_batch(tokio_stream::iter(reqs)).await?;
    let mailbox = mailbox_topic(&participant(who));
    let started = Instant::now();
    while topic_end(channel, &mailbox).await? < PROBE_EVENTS {
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the probe events did not reach {mailbox}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let store_records = topic_end(channel, STORE_TOPIC).await?;
    let counters = Arc::new(Counters::default());
    let (lat_tx, _lat_rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let task = tokio::spawn(subscriber(channel.clone(), mailbox, counters.clone(), lat_tx));
    wait_for(&counters.delivered, PROBE_EVENTS, Duration::from_secs(30), "probe read").await?;
    let read = started.elapsed();
    task.abort();
    Ok(json!({
        "mailbox_store_records": store_records,
        "mailbox_deliveries": PROBE_EVENTS,
        "subscribe_and_read_ms": (read.as_secs_f64() * 1e5).round() / 100.0,
    }))
}

/// Runs the routed benchmark and prints one JSON summary.
pub async fn run(args: RoutingBenchArgs) -> anyhow::Result<()> {
    if args.cases == 0 || u64::from(args.participants) < 2 * u64::from(args.cases) + 2 {
        bail!("--participants must be at least 2 x --cases + 2 (each case has its own sender and recipient, plus two quiet mailboxes)");
    }
    // Removed when dropped, also when the benchmark fails half-way.
    let temporary = args.data_dir.is_none().then(tempfile_dir).transpose()?;
    let dir = match &temporary {
        Some(t) => t.path().to_path_buf(),
        None => args.data_dir.clone().unwrap_or_default(),
    };
    std::fs::create_dir_all(&dir)?;
    let directory = dir.join("directory.toml");
    std::fs::write(&directory, directory_toml(args.participants))?;
    let binary = std::env::current_exe().context("locating the justizbus binary")?;
    let mut serve_args = vec!["--directory".to_string(), directory.display().to_string()];
    if let Some(config) = &args.server_config {
        serve_args.extend(["--config".to_string(), config.display().to_string()]);
    }
    let mut server = ServerProcess::start(&binary, &dir.join("data"), &serve_args)?;
    let url = server.url();
    let channel = connect(&url).await?;

    // 1. Reading a quiet mailbox while the store is nearly empty.
    let read_small = probe_read(&channel, &args, args.participants - 1, "probe-a").await?;

    // Subscribers: one per recipient mailbox, spread over a few connections.
    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(connect(&url).await?);
    }
    let counters = Arc::new(Counters::default());
    let (lat_tx, mut lat_rx) = mpsc::unbounded_channel();
    let mut subscribers = Vec::new();
    for c in 0..args.cases {
        let topic = mailbox_topic(&participant(2 * c + 1));
        let ch = channels[c as usize % channels.len()].clone();
        subscribers.push(tokio::spawn(subscriber(ch, topic, counters.clone(), lat_tx.clone())));
    }
    drop(lat_tx);
    wait_for(&counters.subscribed, u64::from(args.cases), Duration::from_secs(60), "subscribing").await?;

    // 2. Throughput.
    let cpu_before = (server.cpu_time(), cpu_time_of("self"));
    let faults_before = server.page_faults();
    let started = Instant::now();
    let router_done = {
        let (channel, target) = (channel.clone(), args.events / args.streams.max(1) as u64 * args.streams.max(1) as u64);
        tokio::spawn(async move {
            let mut admin = pb::admin_client::AdminClient::new(channel);
            loop {
                let req = pb::DescribeGroupRequest { topic: "xjustiz.ingest".into(), group: crate::routing::router::ROUTER_GROUP.into() };
                if let Ok(g) = admin.describe_group(req).await {
                    // The probe events of phase 1 were routed before.
                    if g.into_inner().partitions.iter().map(|p| p.committed_offset).sum::<u64>() >= target + PROBE_EVENTS {
                        return started.elapsed();
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let streams = args.streams.max(1) as u64;
    let per_stream = args.events / streams;
    let mut tasks = Vec::new();
    for s in 0..streams {
        let (channel, args) = (channels[s as usize % channels.len()].clone(), args.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = pb::publisher_client::PublisherClient::new(channel).max_encoding_message_size(usize::MAX);
            let (mut i, end) = (s * per_stream, (s + 1) * per_stream);
            while i < end {
                let n = (args.batch as u64).min(end - i);
                let reqs: Vec<pb::PublishRequest> = (i..i + n)
                    .map(|k| pb::PublishRequest { topic: "xjustiz.ingest".into(), event: Some(case_event(&args, "tp", k, None)) })
                    .collect();
                client.publish_batch(tokio_stream::iter(reqs)).await?;
                i += n;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let published = per_stream * streams;
    let publish_elapsed = started.elapsed();
    wait_for(&counters.delivered, published, Duration::from_secs(60), "routed deliveries").await?;
    let routed_elapsed = started.elapsed();
    let cpu_used = |before: Option<Duration>, after: Option<Duration>| after.zip(before).map(|(a, b)| (a - b).as_secs_f64());
    let (server_cpu, client_cpu) = (cpu_used(cpu_before.0, server.cpu_time()), cpu_used(cpu_before.1, cpu_time_of("self")));
    let server_faults = server.page_faults().zip(faults_before).map(|(after, before)| after.saturating_sub(before));
    let router_elapsed = router_done.await?;

    // 3. Latency at a steady rate.
    let lat_events = args.rate * args.latency_secs;
    let in_flight = Arc::new(Semaphore::new(512));
    let mut clients = Vec::new();
    for ch in &channels {
        clients.push(pb::publisher_client::PublisherClient::new(ch.clone()));
    }
    let (started, started_ns) = (Instant::now(), now_ns());
    for i in 0..lat_events {
        let due = started + Duration::from_secs_f64(i as f64 / args.rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let permit = in_flight.clone().acquire_owned().await?;
        let req = pb::PublishRequest { topic: "xjustiz.ingest".into(), event: Some(case_event(&args, "lat", i, Some(now_ns()))) };
        let mut c = clients[i as usize % clients.len()].clone();
        tokio::spawn(async move {
            let r = c.publish(req).await;
            drop(permit);
            r
        });
    }
    let lat_publish_elapsed = started.elapsed();
    wait_for(&counters.delivered, published + lat_events, Duration::from_secs(60), "latency deliveries").await?;
    for s in &subscribers {
        s.abort();
    }
    let (mut timed, latencies) = timed_samples(&mut lat_rx);
    let pct = |q: f64| percentile_ms(&latencies, q);

    // 4. Reading a quiet mailbox again, now that the store is full.
    let read_large = probe_read(&channel, &args, args.participants - 2, "probe-b").await?;

    let mut summary = json!({
        "participants": args.participants,
        "active_cases": args.cases,
        "subscribed_mailboxes": args.cases,
        "event_bytes": args.size,
        "throughput": {
            "events": published,
            "publish_seconds": publish_elapsed.as_secs_f64(),
            "publish_events_per_sec": per_sec(published, publish_elapsed),
            "router_seconds": router_elapsed.as_secs_f64(),
            "routed_seconds": routed_elapsed.as_secs_f64(),
            "routed_deliveries_per_sec": per_sec(published, routed_elapsed),
            // CPU per delivery varies less than time on a shared machine: it compares builds.
            "server_cpu_seconds": server_cpu,
            "client_cpu_seconds": client_cpu,
            "cpu_us_per_delivery": server_cpu.zip(client_cpu).map(|(s, c)| ((s + c) * 1e6 / published as f64).round()),
            "server_cpu_us_per_delivery": server_cpu.map(|s| (s * 1e6 / published as f64).round()),
            // Memory the allocator gave back and the server touched again (or for the first
            // time): counts barely vary between runs of one build, unlike time.
            "server_page_faults_per_delivery": server_faults.map(|f| (f as f64 / published as f64 * 100.0).round() / 100.0),
        },
        "latency": {
            "target_rate": args.rate,
            "achieved_publish_rate": per_sec(lat_events, lat_publish_elapsed),
            "events": latencies.len(),
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "p999_ms": pct(0.999), "max_ms": pct(1.0),
            "slow_spells": slow_spells(&mut timed, started_ns, ROUTED_SLOW_LATENCY_NS),
        },
        "mailbox_read": {"small_store": read_small, "large_store": read_large},
    });
    if let Some((peak, rss)) = server.memory() {
        summary["server_rss"] = json!({"peak_mib": peak / (1 << 20), "current_mib": rss / (1 << 20)});
    }
    server.stop()?;
    if let Some(t) = temporary {
        t.close().with_context(|| format!("removing {}", dir.display()))?;
    }
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
