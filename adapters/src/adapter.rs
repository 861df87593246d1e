//! The adapter processes (DESIGN.md section 6). They speak to the bus only over gRPC.
//!
//! Inbound: watches a legacy system's drop directory. An item is a bare XJustiz file or an EGVP
//! message folder (`attachments/xjustiz_nachricht.xml` beside `MsgProps.xml` and the
//! documents). An item counts once it is complete: its name does not start with `.` and does
//! not end in `.tmp` or `.part` (writers create it under such a name and rename it), and the
//! EGVP receiver's lock file (`--lock-file`) is absent. Each item is validated, its documents are
//! stored as blobs, the event is published, and only then the item moves to `done/`; a rejected
//! item moves to `rejected/` with `<name>.error.txt` beside it. The event id derives from the
//! content, so an item published before a crash and published again after it is stored once.
//!
//! Outbound: subscribes to a participant's mailbox and writes each message into the inbox as
//! a folder `<event id>/` holding the original XML (under its original relative name) and the
//! documents, written under a temporary name, fsynced and renamed; only then it acknowledges.
//! A folder that exists already (a redelivery) is acknowledged without writing again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use justizbus_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cli::ModelSource;
use crate::{client, event, Registry, Rejection};

/// The XJustiz file inside an EGVP message folder.
pub const EGVP_MESSAGE: &str = "attachments/xjustiz_nachricht.xml";

/// `justizbus adapter inbound`.
#[derive(Args, Debug, Clone)]
pub struct InboundArgs {
    /// Bus URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// TLS towards the bus.
    #[command(flatten)]
    pub tls: client::ClientTls,
    /// Drop directory of the legacy system.
    #[arg(long)]
    pub watch: PathBuf,
    /// Where the models come from.
    #[command(flatten)]
    pub source: ModelSource,
    /// Topic to publish to.
    #[arg(long, default_value = "xjustiz.ingest")]
    pub topic: String,
    /// Partitions when the topic has to be created.
    #[arg(long, default_value_t = 4)]
    pub partitions: u32,
    /// Name recorded as the events' source.
    #[arg(long, default_value = "adapter-inbound")]
    pub name: String,
    /// A file the legacy writer holds while it copies into the directory (EGVP receiver's `LockFile`).
    #[arg(long)]
    pub lock_file: Option<String>,
    /// Scan interval in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub poll_ms: u64,
    /// Process what is there, then exit.
    #[arg(long)]
    pub once: bool,
    /// Largest XJustiz document accepted, in bytes.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub max_document_bytes: usize,
    /// Deepest element nesting accepted.
    #[arg(long, default_value_t = 256)]
    pub max_depth: usize,
}

/// `justizbus adapter outbound`.
#[derive(Args, Debug, Clone)]
pub struct OutboundArgs {
    /// Bus URL.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub server: String,
    /// TLS towards the bus.
    #[command(flatten)]
    pub tls: client::ClientTls,
    /// Participant whose mailbox is read.
    #[arg(long)]
    pub participant: String,
    /// Consumer group.
    #[arg(long)]
    pub group: String,
    /// Inbox directory of the legacy system.
    #[arg(long)]
    pub out: PathBuf,
    /// Topic to read (default: `mailbox.<participant>`).
    #[arg(long)]
    pub topic: Option<String>,
    /// Unacknowledged deliveries in flight.
    #[arg(long, default_value_t = 16)]
    pub max_unacked: u32,
    /// Exit after this many messages (for tests and one-shot runs).
    #[arg(long)]
    pub max: Option<u64>,
}

/// One drop-directory item, read.
struct Item {
    /// The XJustiz bytes.
    xml: Vec<u8>,
    /// Relative name of the XJustiz file within the item.
    file_name: String,
    /// Other files: (relative name, content).
    documents: Vec<(String, Vec<u8>)>,
    /// Headers from the EGVP envelope.
    headers: HashMap<String, String>,
}

fn in_progress(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part")
}

/// Complete items waiting in the drop directory, oldest name first.
fn pending(watch: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut items = Vec::new();
    for entry in std::fs::read_dir(watch)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "done" || name == "rejected" || in_progress(&name) {
            continue;
        }
        items.push(entry.path());
    }
    items.sort();
    Ok(items)
}

fn read_item(path: &Path, limit: usize) -> Result<Item, String> {
    let too_big = |p: &Path, len: u64| format!("{} has {len} bytes, more than the limit of {limit}", p.display());
    if path.is_file() {
        let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
        if len > limit as u64 {
            return Err(too_big(path, len));
        }
        let xml = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        return Ok(Item { xml, file_name, documents: Vec::new(), headers: HashMap::new() });
    }
    let message = path.join(EGVP_MESSAGE);
    if !message.is_file() {
        return Err(format!("{} is a folder without {EGVP_MESSAGE}: not an EGVP message folder", path.display()));
    }
    let len = std::fs::metadata(&message).map_err(|e| e.to_string())?.len();
    if len > limit as u64 {
        return Err(too_big(&message, len));
    }
    let xml = std::fs::read(&message).map_err(|e| format!("cannot read {}: {e}", message.display()))?;
    let mut documents = Vec::new();
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))? {
            let entry = entry.map_err(|e| e.to_string())?;
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let relative = p.strip_prefix(path).map_err(|e| e.to_string())?.to_string_lossy().replace('\\', "/");
            if relative == EGVP_MESSAGE {
                continue;
            }
            documents.push((relative, std::fs::read(&p).map_err(|e| format!("cannot read {}: {e}", p.display()))?));
        }
    }
    documents.sort();
    let headers = std::fs::read(path.join("MsgProps.xml")).map(|props| egvp_headers(&props)).unwrap_or_default();
    Ok(Item { xml, file_name: EGVP_MESSAGE.to_string(), documents, headers })
}

/// A few fields of the EGVP envelope (`MsgProps.xml`) as headers.
fn egvp_headers(props: &[u8]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Ok(root) = crate::instance::parse(props, crate::instance::Limits::default()) else { return out };
    let find = |names: &[&str]| -> Option<String> {
        let mut e = &root;
        for n in names {
            e = e.children.iter().find(|c| &*c.name.local == *n)?;
        }
        Some(e.text.trim().to_string()).filter(|t| !t.is_empty())
    };
    for (key, path) in [
        ("egvp.message_id", &["MessageID"][..]),
        ("egvp.server_entry_time", &["ServerEntryTime"][..]),
        ("egvp.originator", &["Originator", "BusinessCard", "UserID"][..]),
        ("egvp.originator_name", &["Originator", "BusinessCard", "Name"][..]),
        ("egvp.subject", &["Subject"][..]),
    ] {
        if let Some(v) = find(path) {
            out.insert(key.to_string(), v);
        }
    }
    out
}

/// Moves `from` into `dir`, keeping its name unless taken.
fn move_into(from: &Path, dir: &Path) -> std::io::Result<PathBuf> {
    let name = from.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut target = dir.join(&name);
    if target.exists() {
        target = dir.join(format!("{name}.{}", uuid::Uuid::now_v7()));
    }
    std::fs::rename(from, &target)?;
    sync_dir(dir)?;
    Ok(target)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `content` to `path` durably (temporary file, fsync, rename).
fn write_atomically(path: &Path, content: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp-write");
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, content)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

fn reject(item: &Path, rejected: &Path, reason: &str) -> std::io::Result<()> {
    let name = item.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let report =
        format!("Justizbus inbound adapter: {name} was rejected and not published.\n\n{reason}\n\nFix the message and drop it again.\n");
    // The report first: a crash before the move leaves the item to be judged again.
    write_atomically(&rejected.join(format!("{name}.error.txt")), report.as_bytes())?;
    move_into(item, rejected)?;
    tracing::warn!(item = %name, reason = %reason.lines().next().unwrap_or(""), "rejected");
    Ok(())
}

/// Runs the inbound adapter until interrupted (or, with `--once`, until the directory is empty).
pub async fn inbound(args: InboundArgs) -> anyhow::Result<()> {
    let source = args.source.clone();
    let mut registry = tokio::task::spawn_blocking(move || source.load()).await??;
    registry.limits = crate::instance::Limits { max_bytes: args.max_document_bytes, max_depth: args.max_depth };
    let channel = client::connect(&args.server, &args.tls)?;
    let done = args.watch.join("done");
    let rejected = args.watch.join("rejected");
    for d in [&done, &rejected] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut topic_ready = false;
    tracing::info!(watch = %args.watch.display(), topic = %args.topic, versions = ?registry.versions(), "inbound adapter running");
    loop {
        if !topic_ready {
            match client::ensure_topic(&channel, &args.topic, args.partitions).await {
                Ok(()) => topic_ready = true,
                Err(s) => tracing::warn!(error = %s, "bus not reachable; retrying"),
            }
        }
        let locked = args.lock_file.as_ref().is_some_and(|l| args.watch.join(l).exists());
        let items = if topic_ready && !locked { pending(&args.watch)? } else { Vec::new() };
        let mut transport_failed = false;
        for item in &items {
            if let Err(e) = process(&registry, &channel, &args, item, &done, &rejected).await {
                tracing::warn!(item = %item.display(), error = %e, "publishing failed; the item stays and is tried again");
                transport_failed = true;
                break;
            }
        }
        if args.once && topic_ready && !transport_failed && pending(&args.watch)?.is_empty() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
    }
}

/// Handles one item. An `Err` is a failure to reach the bus: the item stays for the next round.
async fn process(
    registry: &Registry,
    channel: &tonic::transport::Channel,
    args: &InboundArgs,
    path: &Path,
    done: &Path,
    rejected: &Path,
) -> anyhow::Result<()> {
    let limit = registry.limits.max_bytes;
    let item = match read_item(path, limit) {
        Ok(item) => item,
        Err(reason) => return Ok(reject(path, rejected, &reason)?),
    };
    let message = match registry.read(&item.xml) {
        Ok(m) => m,
        Err(rejection) => return Ok(reject(path, rejected, &rejection_report(&item.file_name, &rejection))?),
    };
    if let Some(release) = registry.release(&message.version) {
        if let Err(errors) = registry.json.check(release, &message.message_type, &message.data) {
            return Ok(reject(path, rejected, &format!("canonical JSON does not match its schema:\n{}", errors.join("\n")))?);
        }
    }
    let mut attachments = Vec::with_capacity(item.documents.len());
    for (name, content) in item.documents {
        attachments.push(client::upload(channel, &name, client::media_type(&name), content).await?);
    }
    let mut e = event::build(&message, &item.xml, attachments, &args.name);
    e.headers.insert(event::headers::FILE_NAME.into(), item.file_name.clone());
    e.headers.extend(item.headers);
    let id = e.id.clone();
    let mut publisher = pb::publisher_client::PublisherClient::new(channel.clone());
    let reply = match publisher.publish(pb::PublishRequest { topic: args.topic.clone(), event: Some(e) }).await {
        Ok(r) => r.into_inner(),
        // The bus refused the event itself (not the transport): reject the item.
        Err(s) if matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted) => {
            return Ok(reject(path, rejected, &format!("the bus refused the event: {}", s.message()))?);
        }
        Err(s) => return Err(s.into()),
    };
    move_into(path, done)?;
    tracing::info!(
        item = %path.display(), id, message_type = %message.message_type, version = %message.version,
        partition = reply.partition, offset = reply.offset, duplicate = reply.duplicate, "published"
    );
    Ok(())
}

fn rejection_report(file: &str, rejection: &Rejection) -> String {
    match rejection {
        Rejection::Invalid(issues) => {
            let mut s = format!("{file}: not valid against its XJustiz schema ({} errors):\n", issues.len());
            for i in issues {
                s.push_str(&format!("  line {}: {}: {}\n", i.line, i.path, i.message));
            }
            s
        }
        other => format!("{file}: {other}"),
    }
}

/// A relative name from an event, made safe to join below the inbox (no `..`, no root).
fn safe_relative(name: &str) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for part in name.split(['/', '\\']) {
        match part {
            "" | "." => continue,
            ".." => return None,
            p if p.contains(':') => return None,
            p => out.push(p),
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// Writes one delivered event as `<out>/<event id>/` (see the module documentation).
async fn write_delivery(channel: &tonic::transport::Channel, out: &Path, e: &pb::Event) -> anyhow::Result<bool> {
    let id = safe_relative(&e.id).filter(|p| p.components().count() == 1).with_context(|| format!("unusable event id {:?}", e.id))?;
    let target = out.join(&id);
    if target.exists() {
        return Ok(false);
    }
    let tmp = out.join(format!(".tmp-{}", id.display()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let mut files: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    if !e.original.is_empty() {
        let name = e
            .headers
            .get(event::headers::FILE_NAME)
            .and_then(|n| safe_relative(n))
            .unwrap_or_else(|| PathBuf::from("xjustiz_nachricht.xml"));
        files.push((name, e.original.clone()));
    }
    for a in &e.attachments {
        let name = safe_relative(&a.name).unwrap_or_else(|| PathBuf::from(&a.sha256));
        files.push((name, client::download(channel, a).await?));
    }
    let mut envelope = event::to_json(e);
    if let Some(obj) = envelope.as_object_mut() {
        obj.remove("original_base64");
    }
    files.push((PathBuf::from("justizbus-event.json"), serde_json::to_vec_pretty(&envelope)?));
    let tmp_dir = tmp.clone();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let mut dirs = vec![tmp_dir.clone()];
        for (name, content) in files {
            let path = tmp_dir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
                dirs.push(parent.to_path_buf());
            }
            let mut f = std::fs::File::create(&path)?;
            std::io::Write::write_all(&mut f, &content)?;
            f.sync_all()?;
        }
        dirs.sort();
        dirs.dedup();
        for d in dirs {
            sync_dir(&d)?;
        }
        Ok(())
    })
    .await??;
    std::fs::rename(&tmp, &target)?;
    sync_dir(out)?;
    Ok(true)
}

/// Runs the outbound adapter until interrupted (or until `--max` messages).
pub async fn outbound(args: OutboundArgs) -> anyhow::Result<()> {
    let topic = args.topic.clone().unwrap_or_else(|| format!("mailbox.{}", args.participant));
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    // Half-written folders of a crash: written again on redelivery.
    for entry in std::fs::read_dir(&args.out)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let channel = client::connect(&args.server, &args.tls)?;
    let mut written = 0u64;
    let mut backoff = Duration::from_millis(200);
    loop {
        match session(&channel, &args, &topic, &mut written).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, topic, "subscription ended; reconnecting");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn session(channel: &tonic::transport::Channel, args: &OutboundArgs, topic: &str, written: &mut u64) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(64);
    tx.send(pb::SubscribeRequest {
        request: Some(pb::subscribe_request::Request::Init(pb::SubscribeInit {
            topic: topic.to_string(),
            group: args.group.clone(),
            max_unacked: args.max_unacked,
            ..Default::default()
        })),
    })
    .await?;
    let mut subscriber = pb::subscriber_client::SubscriberClient::new(channel.clone());
    let mut stream = subscriber.subscribe(ReceiverStream::new(rx)).await?.into_inner();
    tracing::info!(topic, group = %args.group, out = %args.out.display(), "outbound adapter subscribed");
    while let Some(message) = stream.message().await? {
        let delivery = match message.response {
            Some(pb::subscribe_response::Response::Delivery(d)) => d,
            Some(pb::subscribe_response::Response::AckError(e)) => {
                tracing::warn!(delivery_id = e.delivery_id, message = %e.message, "ack not applied");
                continue;
            }
            _ => continue,
        };
        let Some(e) = delivery.event.as_ref() else { continue };
        let request = match write_delivery(channel, &args.out, e).await {
            Ok(fresh) => {
                tracing::info!(id = %e.id, fresh, attempt = delivery.attempt, "delivered into the inbox");
                *written += 1;
                pb::subscribe_request::Request::Ack(pb::Ack { delivery_ids: vec![delivery.delivery_id] })
            }
            Err(err) => {
                tracing::error!(id = %e.id, error = %err, "cannot write into the inbox; nacking");
                pb::subscribe_request::Request::Nack(pb::Nack { delivery_ids: vec![delivery.delivery_id] })
            }
        };
        tx.send(pb::SubscribeRequest { request: Some(request) }).await?;
        if args.max.is_some_and(|m| *written >= m) {
            // Let the ack reach the server before the stream closes.
            drop(tx);
            while stream.message().await?.is_some() {}
            return Ok(());
        }
    }
    anyhow::bail!("the server closed the subscription")
}
