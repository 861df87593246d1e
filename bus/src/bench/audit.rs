//! `justizbus bench audit`: the cost of the hash chain and the speed of verification.
//!
//! Two servers run side by side on one machine, one keeping the chain (and signing checkpoints),
//! one with `hash_chain = false`; batched publish alternates between them for `--rounds`
//! rounds (each going first every other round), so drift in the machine's speed hits both
//! alike. Then the chained server stops and
//! `audit verify --data-dir` runs over its log in this process.

use std::time::Instant;

use anyhow::Context;
use clap::Args;
use justizbus_proto::v1 as pb;
use serde_json::json;

use super::{per_sec, publish_batched, tempfile_dir, BenchArgs};
use crate::cli::connect;
use crate::process::ServerProcess;

/// Options of `justizbus bench audit`.
#[derive(Args, Debug, Clone)]
pub struct AuditBenchArgs {
    /// Publishing options (`--events` per server in all, `--size`, `--batch`, `--streams`, ...).
    #[command(flatten)]
    pub core: BenchArgs,
    /// Rounds of alternating publish.
    #[arg(long, default_value_t = 3)]
    pub rounds: u64,
}

/// Runs the audit benchmark and prints one JSON summary.
pub async fn run(args: AuditBenchArgs) -> anyhow::Result<()> {
    let dir = tempfile_dir()?;
    let result = measure(&args, dir.path()).await;
    drop(dir);
    let summary = result?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

async fn measure(args: &AuditBenchArgs, dir: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let binary = std::env::current_exe().context("locating the justizbus binary")?;
    let key_path = dir.join("signing.pem");
    let key = crate::audit::checkpoint::Signer::generate(&key_path)?.public_key();
    let chained_config = dir.join("chained.toml");
    std::fs::write(&chained_config, format!("[audit]\nsigning_key = \"{}\"\n", key_path.display()))?;
    let unchained_config = dir.join("unchained.toml");
    std::fs::write(&unchained_config, "[log_settings]\nhash_chain = false\n")?;
    let mut chained = ServerProcess::start(&binary, &dir.join("chained"), &["--config".into(), chained_config.display().to_string()])?;
    let mut unchained =
        ServerProcess::start(&binary, &dir.join("unchained"), &["--config".into(), unchained_config.display().to_string()])?;
    let topic = "bench-audit";
    let mut channels = Vec::new();
    for server in [&chained, &unchained] {
        let channel = connect(&server.url()).await?;
        pb::admin_client::AdminClient::new(channel.clone())
            .create_topic(pb::CreateTopicRequest { topic: topic.into(), partitions: args.core.partitions, ..Default::default() })
            .await?;
        channels.push(channel);
    }
    let per_round = args.core.events / args.rounds.max(1);
    let mut totals = [(0u64, std::time::Duration::ZERO); 2];
    for round in 0..args.rounds.max(1) {
        // Each goes first every other round.
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let channel = &channels[i];
            let started = Instant::now();
            let n = publish_batched(channel, topic, &args.core, round * per_round, per_round).await?;
            totals[i].0 += n;
            totals[i].1 += started.elapsed();
        }
    }
    let with = per_sec(totals[0].0, totals[0].1);
    let without = per_sec(totals[1].0, totals[1].1);
    chained.stop()?;
    unchained.stop()?;
    let data = dir.join("chained");
    let keys = key.into();
    let report = tokio::task::spawn_blocking(move || crate::audit::offline::verify_data_dir(&data, None, &keys)).await??;
    anyhow::ensure!(report.ok, "the chained log did not verify:\n{}", report.text());
    Ok(json!({
        "events_per_server": totals[0].0,
        "event_bytes": args.core.size,
        "rounds": args.rounds,
        "publish_batched_with_chain_per_sec": with,
        "publish_batched_without_chain_per_sec": without,
        "chain_cost_percent": ((1.0 - with / without) * 1000.0).round() / 10.0,
        "verify_bytes": report.bytes,
        "verify_records": report.records,
        "verify_seconds": (report.seconds * 1000.0).round() / 1000.0,
        "verify_mb_per_sec": (report.bytes as f64 / 1e6 / report.seconds).round(),
        "verify_checkpoints": report.partitions.iter().map(|p| p.checkpoints_checked).sum::<u64>(),
    }))
}
