//! `justizbus bench`: publish and delivery measured through a real gRPC server
//! (`justizbus bench routing`: see [`routing`]).
//!
//! Without `--server` it starts `justizbus serve` as a child process on a temporary data
//! directory (so the server's peak RSS can be read from /proc) and runs, in order:
//!
//! 1. batched publish (client-streamed `PublishBatch`, several streams at once);
//! 2. one-by-one publish (`Publish`, `--publishers` concurrent publishers);
//! 3. delivery: one subscriber drains everything published, acknowledging as it goes;
//! 4. latency: events published at a steady `--rate` while a subscriber measures
//!    publish-to-delivery time (from the publisher's send time carried in a header);
//! 5. optionally (`--large-log-gb`): fills the log to that size, reads the server's RSS while a
//!    subscriber drains it, then kills the server with SIGKILL and times the restart.
//!
//! Every event is durable before it is acknowledged (group commit); nothing is relaxed for the
//! benchmark. Client and server share the machine's cores.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Args;
use justizbus_proto::v1 as pb;
use serde_json::json;
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

use crate::cli::connect;
use crate::process::ServerProcess;

pub mod audit;
mod kafka_baseline;
pub mod routing;

/// `justizbus bench [routing]`: the core benchmark, or the routed one.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchCommand {
    /// A benchmark other than the core one.
    #[command(subcommand)]
    pub which: Option<Which>,
    /// Options of the core benchmark.
    #[command(flatten)]
    pub core: BenchArgs,
}

/// The benchmarks besides the core one.
#[derive(clap::Subcommand, Debug)]
pub enum Which {
    /// Routed throughput and latency: ingest -> router -> mailboxes -> subscribers, with a
    /// generated directory of many participants; and the cost of reading one mailbox.
    Routing(routing::RoutingBenchArgs),
    /// What the hash chain costs: batched publish with and without it, side by side in one run;
    /// then `audit verify` over the chained log (MB/s).
    Audit(audit::AuditBenchArgs),
}

/// Runs the benchmark the command names.
pub async fn run_command(command: BenchCommand) -> anyhow::Result<()> {
    match command.which {
        Some(Which::Routing(args)) => routing::run(args).await,
        Some(Which::Audit(args)) => audit::run(args).await,
        None => run(command.core).await,
    }
}

/// Options of `justizbus bench`.
#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Benchmark an already running server instead of starting one.
    #[arg(long)]
    pub server: Option<String>,
    /// Events for the batched publish phase.
    #[arg(long, default_value_t = 300_000)]
    pub events: u64,
    /// Events for the one-by-one publish phase.
    #[arg(long, default_value_t = 60_000)]
    pub single_events: u64,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Distinct keys (cases).
    #[arg(long, default_value_t = 64)]
    pub keys: u32,
    /// Partitions of the benchmark topics (4: about two per core on this 2-core machine; more
    /// partitions mean smaller group commits and more `fdatasync`s for the same events).
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Concurrent one-by-one publishers.
    #[arg(long, default_value_t = 64)]
    pub publishers: usize,
    /// Events per batch in the batched phase.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Concurrent batch streams.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Steady publish rate (events/s) of the latency phase.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Duration of the latency phase in seconds.
    #[arg(long, default_value_t = 10)]
    pub latency_secs: u64,
    /// Also fill the log to this many GB and measure RSS and restart time.
    #[arg(long)]
    pub large_log_gb: Option<f64>,
    /// Data directory of the started server (default: a temporary directory, removed after).
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// Log of the started server: `kafka://host:port` runs the bus on Kafka (its topics under a
    /// fresh prefix) and measures a plain rdkafka producer/consumer loop on the same broker
    /// beside it, with the same events.
    #[arg(long)]
    pub log: Option<String>,
    /// Configuration file for the started server (not with a `kafka://` log, which brings its own).
    #[arg(long, conflicts_with = "server")]
    pub server_config: Option<std::path::PathBuf>,
}

pub(crate) fn payload(size: usize, i: u64) -> Vec<u8> {
    const ALPHABET: &[u8; 26] = b"abcdefghijklmnopqrstuvwxyz";
    let mut v = format!("{{\"n\":{i},\"pad\":\"").into_bytes();
    v.reserve(size.saturating_sub(v.len()));
    while v.len() + 2 < size {
        let n = (size - 2 - v.len()).min(ALPHABET.len());
        v.extend_from_slice(&ALPHABET[..n]);
    }
    v.extend_from_slice(b"\"}");
    v
}

fn event(args: &BenchArgs, i: u64, sent_ns: Option<u128>) -> pb::Event {
    let mut e = pb::Event {
        id: format!("bench-{}-{i}", std::process::id()),
        source: "justizbus-bench".into(),
        r#type: "bench.event".into(),
        subject: format!("case-{}", i % u64::from(args.keys.max(1))),
        data: payload(args.size, i).into(),
        data_content_type: "application/json".into(),
        ..Default::default()
    };
    if let Some(ns) = sent_ns {
        e.headers.insert("bench.sent_ns".into(), ns.to_string());
        e.id = format!("lat-{}-{i}", std::process::id());
    }
    e
}

pub(crate) fn now_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
}

pub(crate) fn per_sec(n: u64, d: Duration) -> f64 {
    (n as f64 / d.as_secs_f64()).round()
}

/// Publishes `count` events (numbered from `first`) in client-streamed batches of
/// `args.batch`, `args.streams` streams at once; returns how many were published (a multiple
/// of the streams).
pub(crate) async fn publish_batched(
    channel: &tonic::transport::Channel,
    topic: &str,
    args: &BenchArgs,
    first: u64,
    count: u64,
) -> anyhow::Result<u64> {
    let streams = args.streams.max(1) as u64;
    let per_stream = count / streams;
    let mut tasks = Vec::new();
    for s in 0..streams {
        let (channel, args, topic) = (channel.clone(), args.clone(), topic.to_string());
        tasks.push(tokio::spawn(async move {
            let mut client = pb::publisher_client::PublisherClient::new(channel).max_encoding_message_size(usize::MAX);
            let mut i = first + s * per_stream;
            let end = i + per_stream;
            while i < end {
                let n = (args.batch as u64).min(end - i);
                let reqs: Vec<pb::PublishRequest> =
                    (i..i + n).map(|k| pb::PublishRequest { topic: topic.clone(), event: Some(event(&args, k, None)) }).collect();
                client.publish_batch(tokio_stream::iter(reqs)).await?;
                i += n;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(per_stream * streams)
}

/// Runs the benchmark and prints one JSON summary.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    // A temporary data directory (when none is given) is removed after the run.
    let mut temporary = None;
    let kafka = args.log.as_deref().and_then(|l| l.strip_prefix("kafka://")).map(str::to_string);
    let kafka_prefix = format!("bench{}.", std::process::id());
    let mut server = None;
    let url = match &args.server {
        Some(url) => url.clone(),
        None => {
            let dir = match &args.data_dir {
                Some(d) => d.clone(),
                None => temporary.insert(tempfile_dir()?).path().to_path_buf(),
            };
            let binary = std::env::current_exe().context("locating the justizbus binary")?;
            let mut extra = Vec::new();
            if let Some(brokers) = &kafka {
                let config = dir.join("kafka.toml");
                std::fs::write(&config, format!("log = \"kafka://{brokers}\"\n[kafka]\ntopic_prefix = \"{kafka_prefix}\"\n"))?;
                extra = vec!["--config".to_string(), config.display().to_string()];
            } else if let Some(log) = &args.log {
                extra = vec!["--log".to_string(), log.clone()];
            }
            if let Some(config) = &args.server_config {
                if kafka.is_some() {
                    bail!("--server-config cannot be combined with a kafka:// --log");
                }
                extra.extend(["--config".to_string(), config.display().to_string()]);
            }
            let p = ServerProcess::start(&binary, &dir.join("data"), &extra)?;
            let url = p.url();
            server = Some(p);
            url
        }
    };
    let channel = connect(&url).await?;
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
    let run_id = std::process::id();
    let topic = format!("bench-{run_id}");
    admin.create_topic(pb::CreateTopicRequest { topic: topic.clone(), partitions: args.partitions, ..Default::default() }).await?;

    // 1. Batched publish.
    let started = Instant::now();
    let batched = publish_batched(&channel, &topic, &args, 0, args.events).await?;
    let batched_elapsed = started.elapsed();

    // 2. One-by-one publish with concurrent publishers, each a client with its own connection
    //    (as separate adapters or applications would be).
    let per_publisher = args.single_events / args.publishers.max(1) as u64;
    let mut channels = Vec::new();
    for _ in 0..args.publishers.max(1) {
        channels.push(connect(&url).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (p, channel) in channels.into_iter().enumerate() {
        let p = p as u64;
        let (args, topic) = (args.clone(), topic.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = pb::publisher_client::PublisherClient::new(channel);
            let base = batched + p * per_publisher;
            for k in base..base + per_publisher {
                client.publish(pb::PublishRequest { topic: topic.clone(), event: Some(event(&args, k, None)) }).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let single = per_publisher * args.publishers.max(1) as u64;
    let single_elapsed = started.elapsed();

    // 3. Delivery of everything published so far.
    let total = batched + single;
    let started = Instant::now();
    let (delivered, _) = drain(channel.clone(), &topic, "bench-drain", total, Duration::from_secs(60), None).await?;
    let delivery_elapsed = started.elapsed();

    // 4. Latency at a steady rate.
    let lat_topic = format!("bench-latency-{run_id}");
    admin.create_topic(pb::CreateTopicRequest { topic: lat_topic.clone(), partitions: args.partitions, ..Default::default() }).await?;
    let lat_events = args.rate * args.latency_secs;
    let (lat_tx, mut lat_rx) = mpsc::unbounded_channel();
    let consumer = {
        let (channel, topic) = (channel.clone(), lat_topic.clone());
        tokio::spawn(async move { drain(channel, &topic, "bench-latency", lat_events, Duration::from_secs(30), Some(lat_tx)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let in_flight = Arc::new(Semaphore::new(512));
    let (rtt_tx, mut rtt_rx) = mpsc::unbounded_channel();
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(pb::publisher_client::PublisherClient::new(connect(&url).await?));
    }
    let (started, started_ns) = (Instant::now(), now_ns());
    for i in 0..lat_events {
        let client = &clients[i as usize % clients.len()];
        let due = started + Duration::from_secs_f64(i as f64 / args.rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let permit = in_flight.clone().acquire_owned().await?;
        let req = pb::PublishRequest { topic: lat_topic.clone(), event: Some(event(&args, i, Some(now_ns()))) };
        let mut c = client.clone();
        let rtt_tx = rtt_tx.clone();
        tokio::spawn(async move {
            let sent = Instant::now();
            let r = c.publish(req).await;
            let _ = rtt_tx.send(sent.elapsed().as_nanos());
            drop(permit);
            r
        });
    }
    drop(rtt_tx);
    let publish_elapsed = started.elapsed();
    let (lat_delivered, _) = consumer.await??;
    let (mut timed, latencies) = timed_samples(&mut lat_rx);
    let rtts = sorted(&mut rtt_rx);
    let pct = |q: f64| percentile_ms(&latencies, q);
    let rtt = |q: f64| percentile_ms(&rtts, q);

    let mut summary = json!({
        "server": url,
        "event_bytes": args.size,
        "keys": args.keys,
        "partitions": args.partitions,
        "publish_batched": {"events": batched, "batch": args.batch, "streams": args.streams, "seconds": batched_elapsed.as_secs_f64(), "events_per_sec": per_sec(batched, batched_elapsed)},
        "publish_single": {"events": single, "publishers": args.publishers, "seconds": single_elapsed.as_secs_f64(), "events_per_sec": per_sec(single, single_elapsed)},
        "delivery": {"events": delivered, "seconds": delivery_elapsed.as_secs_f64(), "events_per_sec": per_sec(delivered, delivery_elapsed)},
        "latency": {
            "target_rate": args.rate,
            "achieved_publish_rate": per_sec(lat_events, publish_elapsed),
            "events": lat_delivered,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "p999_ms": pct(0.999), "max_ms": pct(1.0),
            "publish_ack_p50_ms": rtt(0.50), "publish_ack_p99_ms": rtt(0.99),
            "slow_spells": slow_spells(&mut timed, started_ns, SLOW_LATENCY_NS),
        },
    });
    if let Some(p) = &server {
        if let Some((peak, rss)) = p.memory() {
            summary["server_rss"] = json!({"peak_mib": peak / (1 << 20), "current_mib": rss / (1 << 20)});
        }
    }

    // The plain rdkafka loop on the same broker, after the bus (which is idle by then).
    if let Some(brokers) = &kafka {
        let baseline = kafka_baseline::run(kafka_baseline::Baseline {
            brokers,
            topic: &format!("{kafka_prefix}baseline"),
            // As many as the bus's delivery phase read (tansu's fetch cost grows with the backlog).
            events: total,
            size: args.size,
            keys: args.keys,
            partitions: args.partitions,
            in_flight: args.batch * args.streams.max(1),
        })
        .await?;
        let ratio = |bus: &serde_json::Value, plain: &serde_json::Value| {
            (bus.as_f64().unwrap_or(0.0) / plain.as_f64().unwrap_or(f64::NAN) * 1000.0).round() / 1000.0
        };
        summary["kafka_plain_rdkafka"] = baseline.clone();
        summary["bus_vs_plain"] = json!({
            "publish_batched": ratio(&summary["publish_batched"]["events_per_sec"], &baseline["produce"]["events_per_sec"]),
            "delivery": ratio(&summary["delivery"]["events_per_sec"], &baseline["consume"]["events_per_sec"]),
        });
    }

    // 5. Large log: RSS while serving it, and restart time.
    if let (Some(gb), Some(p)) = (args.large_log_gb, server.as_mut()) {
        summary["large_log"] = large_log(&args, p, gb).await?;
    }
    if let Some(mut p) = server {
        p.stop()?;
    }
    if let Some(dir) = temporary {
        let path = dir.path().display().to_string();
        dir.close().with_context(|| format!("removing {path}"))?;
    }
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// Latency above which an event of the core latency phase counts as slow (its p99 target).
const SLOW_LATENCY_NS: u128 = 15_000_000;

/// When the slow events of a latency phase were sent: events (send time, latency) slower than
/// `slow_ns` (the bench's p99 target), grouped into spells (sent less than 100 ms apart), the
/// five largest each with its start (seconds into the phase, and UTC to match with the server's
/// log, e.g. its "slow group commit" warnings), length, count and worst latency. A p99 miss is
/// one long spell (a stall: every event sent during it waits) or slow events spread over the
/// phase.
pub(crate) fn slow_spells(timed: &mut [(u128, u128)], phase_started_ns: u128, slow_ns: u128) -> serde_json::Value {
    const GAP_NS: u128 = 100_000_000;
    timed.sort_unstable();
    let mut spells: Vec<(u128, u128, u64, u128)> = Vec::new(); // first sent, last sent, events, worst
    for &(sent, latency) in timed.iter().filter(|&&(_, latency)| latency > slow_ns) {
        match spells.last_mut() {
            Some(spell) if sent - spell.1 < GAP_NS => {
                spell.1 = sent;
                spell.2 += 1;
                spell.3 = spell.3.max(latency);
            }
            _ => spells.push((sent, sent, 1, latency)),
        }
    }
    let seconds = |ns: u128| (ns as f64 / 1e7).round() / 100.0;
    let mut largest_first = spells.clone();
    largest_first.sort_by_key(|s| std::cmp::Reverse(s.2));
    json!({
        "over_ms": slow_ns / 1_000_000,
        "events": spells.iter().map(|s| s.2).sum::<u64>(),
        "spells": spells.len(),
        "largest": largest_first.iter().take(5).map(|&(first, last, events, worst)| json!({
            "at_s": seconds(first.saturating_sub(phase_started_ns)),
            "at_utc": crate::event::rfc3339(&crate::event::ms_timestamp((first / 1_000_000) as i64)),
            "lasting_s": seconds(last - first),
            "events": events,
            "worst_ms": (worst as f64 / 1e4).round() / 100.0,
        })).collect::<Vec<_>>(),
    })
}

/// Drains a channel of (send time, latency) samples: the samples, and the latencies sorted.
pub(crate) fn timed_samples(rx: &mut mpsc::UnboundedReceiver<(u128, u128)>) -> (Vec<(u128, u128)>, Vec<u128>) {
    let timed = drained(rx);
    let mut latencies: Vec<u128> = timed.iter().map(|&(_, latency)| latency).collect();
    latencies.sort_unstable();
    (timed, latencies)
}

/// Everything a channel holds now.
fn drained<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Vec<T> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

/// Drains a channel of nanosecond samples into a sorted vector.
pub(crate) fn sorted(rx: &mut mpsc::UnboundedReceiver<u128>) -> Vec<u128> {
    let mut v = drained(rx);
    v.sort_unstable();
    v
}

/// The `q` quantile of sorted nanosecond samples, in milliseconds (two decimals).
pub(crate) fn percentile_ms(sorted: &[u128], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    (sorted[i] as f64 / 1e6 * 100.0).round() / 100.0
}

/// A temporary directory for a benchmark's servers, removed when dropped: also when the
/// benchmark fails half-way (a failed `--large-log-gb 5` run used to leave 5 GB behind).
pub(crate) fn tempfile_dir() -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new().prefix(&format!("justizbus-bench-{}-", std::process::id())).tempdir()?)
}

/// Subscribes and acknowledges until `expected` events arrived or `idle` passed without one.
/// With `latencies`, sends each event's send time and publish-to-delivery time in nanoseconds.
async fn drain(
    channel: tonic::transport::Channel,
    topic: &str,
    group: &str,
    expected: u64,
    idle: Duration,
    latencies: Option<mpsc::UnboundedSender<(u128, u128)>>,
) -> anyhow::Result<(u64, Duration)> {
    let mut client = pb::subscriber_client::SubscriberClient::new(channel).max_decoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::channel(1024);
    let init = pb::SubscribeInit { topic: topic.into(), group: group.into(), max_unacked: 2000, ..Default::default() };
    tx.send(pb::SubscribeRequest { request: Some(pb::subscribe_request::Request::Init(init)) }).await?;
    let mut stream = client.subscribe(ReceiverStream::new(rx)).await?.into_inner();
    let started = Instant::now();
    let mut got = 0u64;
    while got < expected {
        let msg = match tokio::time::timeout(idle, stream.message()).await {
            Ok(m) => m?,
            Err(_) => break,
        };
        let Some(msg) = msg else { break };
        if let Some(pb::subscribe_response::Response::Delivery(d)) = msg.response {
            if let (Some(tx), Some(sent)) =
                (&latencies, d.event.as_ref().and_then(|e| e.headers.get("bench.sent_ns")).and_then(|s| s.parse::<u128>().ok()))
            {
                let _ = tx.send((sent, now_ns().saturating_sub(sent)));
            }
            got += 1;
            // Acknowledge at once: the next event of a case waits for this ack.
            let ack = pb::Ack { delivery_ids: vec![d.delivery_id] };
            tx.send(pb::SubscribeRequest { request: Some(pb::subscribe_request::Request::Ack(ack)) }).await?;
        }
    }
    let elapsed = started.elapsed();
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(10), async { while let Ok(Some(_)) = stream.message().await {} }).await;
    Ok((got, elapsed))
}

fn dir_size(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_size(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

async fn large_log(args: &BenchArgs, server: &mut ServerProcess, gb: f64) -> anyhow::Result<serde_json::Value> {
    let target = (gb * 1e9) as u64;
    let channel = connect(&server.url()).await?;
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
    let topic = format!("bench-large-{}", std::process::id());
    admin.create_topic(pb::CreateTopicRequest { topic: topic.clone(), partitions: args.partitions, ..Default::default() }).await?;
    let log_dir = server.data_dir.join("log");
    let started = Instant::now();
    let mut next = 0u64;
    let mut tasks = Vec::new();
    let written = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for s in 0..args.streams.max(1) as u64 {
        let (channel, args, topic, done, log_dir) = (channel.clone(), args.clone(), topic.clone(), written.clone(), log_dir.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = pb::publisher_client::PublisherClient::new(channel).max_encoding_message_size(usize::MAX);
            let mut i = s * 1_000_000_000;
            let mut count = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let reqs: Vec<pb::PublishRequest> = (i..i + args.batch as u64)
                    .map(|k| pb::PublishRequest { topic: topic.clone(), event: Some(event(&args, k, None)) })
                    .collect();
                client.publish_batch(tokio_stream::iter(reqs)).await?;
                i += args.batch as u64;
                count += args.batch as u64;
                if s == 0 && count.is_multiple_of(50_000) && dir_size(&log_dir) >= target {
                    done.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            anyhow::Ok(count)
        }));
    }
    for t in tasks {
        next += t.await??;
    }
    let fill_secs = started.elapsed().as_secs_f64();
    let log_bytes = dir_size(&log_dir);
    // Serve the whole log to a subscriber for a while, then read the server's memory.
    let drained = drain(channel.clone(), &topic, "bench-large", 300_000, Duration::from_secs(20), None).await?.0;
    let (peak, rss) = server.memory().unwrap_or((0, 0));
    server.kill9();
    let restart = server.restart()?;
    let after = connect(&server.url()).await?;
    let info = pb::admin_client::AdminClient::new(after).describe_topic(pb::DescribeTopicRequest { topic }).await?.into_inner();
    let stored: u64 = info.partition_info.iter().map(|p| p.end_offset).sum();
    Ok(json!({
        "log_bytes": log_bytes,
        "events": next,
        "events_after_restart": stored,
        "fill_seconds": fill_secs,
        "drained_while_measuring": drained,
        "server_peak_rss_mib": peak / (1 << 20),
        "server_rss_mib": rss / (1 << 20),
        "restart_after_kill9_seconds": restart.as_secs_f64(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u128 = 1_000_000;

    #[test]
    fn slow_events_sent_close_together_form_one_spell_and_the_largest_come_first() {
        let start = 1_000 * MS;
        let mut timed = vec![
            (start + 2_000 * MS, 30 * MS), // a lone slow event at 2 s
            (start + 5_000 * MS, 40 * MS), // a spell at 5 s: three slow events < 100 ms apart,
            (start + 5_050 * MS, 3 * MS),  // a fast one among them,
            (start + 5_090 * MS, 60 * MS),
            (start + 5_150 * MS, 26 * MS),
            (start + 5_400 * MS, 2 * MS),  // then fast again
            (start + 9_000 * MS, 25 * MS), // exactly the limit is not slow
        ];
        timed.reverse(); // the subscribers report out of order
        let report = slow_spells(&mut timed, start, 25 * MS);
        assert_eq!(report["events"], 4);
        assert_eq!(report["spells"], 2);
        let largest = report["largest"].as_array().expect("a list");
        let at_utc = "1970-01-01T00:00:06Z";
        assert_eq!(largest[0], json!({"at_s": 5.0, "at_utc": at_utc, "lasting_s": 0.15, "events": 3, "worst_ms": 60.0}));
        assert_eq!(largest[1]["at_s"], 2.0);
        assert_eq!(largest[1]["events"], 1);
    }
}
