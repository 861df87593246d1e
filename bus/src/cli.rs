//! The `justizbus` command line (DESIGN.md section 7).
//!
//! Client commands print JSON on stdout (one object per line for streams) and errors on
//! stderr, exiting non-zero. `serve` logs with `tracing` to stderr (`JUSTIZBUS_LOG` or
//! `RUST_LOG` set the filter).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use clap::{Args, Parser, Subcommand, ValueEnum};
use justizbus_proto::v1 as pb;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::config::ServerConfig;
use crate::event::{parse_time, rfc3339};

/// Default server URL of client commands.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

#[derive(Parser, Debug)]
#[command(name = "justizbus", version, about = "Justizbus: the event bus of the justice cloud")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server (embedded log under ./justizbus-data, gRPC on 127.0.0.1:50051 by default).
    Serve(ServeArgs),
    /// Create, list and describe topics.
    Topics {
        #[command(subcommand)]
        command: TopicsCommand,
    },
    /// Publish one event; prints {"id","partition","offset"}.
    Publish(PublishArgs),
    /// Receive events of a consumer group, print one JSON object per line, acknowledge each.
    Subscribe(SubscribeArgs),
    /// Print stored events of a range without touching any consumer group.
    Replay(ReplayArgs),
    /// Audit: signing keys, verify hash chains and checkpoints, check exports, event trails.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// List and describe consumer groups.
    Groups {
        #[command(subcommand)]
        command: GroupsCommand,
    },
    /// List, release or skip quarantined keys (cases) of a group.
    Quarantine {
        #[command(subcommand)]
        command: QuarantineCommand,
    },
    /// List a group's dead-lettered events.
    DeadLetters(GroupArgs),
    /// Run the whole path on this machine: bus, Land-system adapter, two courts and a law firm.
    Demo(crate::demo::DemoArgs),
    /// Make a test CA, a server certificate and participant certificates for mTLS.
    Certs(crate::security::certs::CertsArgs),
    /// Measure publish and delivery through a real server; prints one JSON summary.
    Bench(crate::bench::BenchCommand),
    /// XJustiz adapter processes: inbound (drop directory -> bus) and outbound (mailbox -> inbox).
    Adapter {
        #[command(subcommand)]
        command: justizbus_xjustiz::cli::AdapterCommand,
    },
    /// XJustiz: validate, translate, convert back to XML, generate schemas.
    Xjustiz {
        #[command(subcommand)]
        command: justizbus_xjustiz::cli::XJustizCommand,
    },
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory of the embedded log.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC listen address.
    #[arg(long)]
    listen: Option<String>,
    /// Log URL: file://DIR (default: file://<data-dir>).
    #[arg(long)]
    log: Option<String>,
    /// Participants directory (TOML): turns on mailboxes and the router.
    #[arg(long)]
    directory: Option<PathBuf>,
    /// Server certificate (PEM): with --tls-key and --tls-client-ca turns on mTLS.
    #[arg(long, requires_all = ["tls_key", "tls_client_ca"])]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA certificates (PEM) client certificates must chain to.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
struct ServerArg {
    /// Server URL.
    #[arg(long, env = "JUSTIZBUS_SERVER", default_value = DEFAULT_SERVER)]
    server: String,
    /// TLS towards the server.
    #[command(flatten)]
    tls: justizbus_xjustiz::client::ClientTls,
}

impl ServerArg {
    /// A connected channel to the server.
    async fn connect(&self) -> anyhow::Result<Channel> {
        justizbus_xjustiz::client::connect_now(&self.server, &self.tls).await
    }
}

#[derive(Subcommand, Debug)]
enum TopicsCommand {
    /// Create a topic.
    Create {
        #[command(flatten)]
        server: ServerArg,
        /// Topic name.
        #[arg(long)]
        topic: String,
        /// Number of partitions (fixed).
        #[arg(long)]
        partitions: u32,
        /// Delete segments older than this many milliseconds (0: keep).
        #[arg(long, default_value_t = 0)]
        retention_ms: u64,
        /// Keep about this many bytes per partition (0: unlimited).
        #[arg(long, default_value_t = 0)]
        retention_bytes: u64,
    },
    /// Change a topic's retention (what is not given stays).
    SetRetention {
        #[command(flatten)]
        server: ServerArg,
        /// Topic name.
        #[arg(long)]
        topic: String,
        /// Delete segments older than this many milliseconds (0: keep).
        #[arg(long)]
        retention_ms: Option<u64>,
        /// Keep about this many bytes per partition (0: unlimited).
        #[arg(long)]
        retention_bytes: Option<u64>,
    },
    /// List topics, one JSON object per line.
    List {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Describe one topic.
    Describe {
        #[command(flatten)]
        server: ServerArg,
        /// Topic name.
        #[arg(long)]
        topic: String,
    },
}

#[derive(Args, Debug)]
struct PublishArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Topic.
    #[arg(long)]
    topic: String,
    /// Key (subject): the case the event belongs to.
    #[arg(long)]
    key: String,
    /// Event type.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// Event id (default: a new UUID v7).
    #[arg(long)]
    id: Option<String>,
    /// Source (publisher identity).
    #[arg(long, default_value = "justizbus-cli")]
    source: String,
    /// Media type of the payload (default: detected: JSON, XML or octet-stream).
    #[arg(long)]
    content_type: Option<String>,
    /// Header, as NAME=VALUE (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Payload file, or - for standard input.
    file: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Start {
    Earliest,
    Latest,
}

#[derive(Args, Debug)]
struct SubscribeArgs {
    #[command(flatten)]
    target: GroupArgs,
    /// Stop after this many events.
    #[arg(long)]
    max: Option<u64>,
    /// Stop after this many seconds without an event.
    #[arg(long)]
    timeout: Option<f64>,
    /// Credit: unacknowledged events the server may send ahead.
    #[arg(long, default_value_t = 16)]
    max_unacked: u32,
    /// Where a new group starts.
    #[arg(long, value_enum, default_value = "earliest")]
    start: Start,
    /// Group setting: ack deadline in milliseconds.
    #[arg(long)]
    ack_deadline_ms: Option<u32>,
    /// Group setting: failed deliveries before dead-lettering.
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Reject (nack) every event instead of acknowledging it (for testing redelivery).
    #[arg(long)]
    nack: bool,
}

#[derive(Args, Debug)]
struct ReplayArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Topic.
    #[arg(long)]
    topic: String,
    /// Only this partition (default: all, one after the other).
    #[arg(long)]
    partition: Option<u32>,
    /// First offset.
    #[arg(long, conflicts_with = "from_time")]
    from_offset: Option<u64>,
    /// First time (RFC 3339 or milliseconds since the epoch).
    #[arg(long)]
    from_time: Option<String>,
    /// End offset (exclusive).
    #[arg(long)]
    to_offset: Option<u64>,
    /// Write an export with hash chain values and signed checkpoints instead (needs
    /// --partition), for `justizbus audit check-export`.
    #[arg(long, requires = "partition")]
    with_proof: bool,
    /// Where the export goes (default: stdout).
    #[arg(long, requires = "with_proof")]
    output: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Create a checkpoint signing key (PKCS#8 PEM, mode 0600); prints its public key.
    Keygen {
        /// The key file to create (never overwritten).
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key that checks checkpoints: of a signing key file, a config's
    /// audit.signing_key, or a running server.
    Key {
        /// Signing key file.
        #[arg(long, conflicts_with_all = ["config", "server"])]
        signing_key: Option<PathBuf>,
        /// Server configuration whose audit.signing_key to read.
        #[arg(long, conflicts_with = "server")]
        config: Option<PathBuf>,
        /// Ask a running server.
        #[arg(long)]
        server: Option<String>,
        /// TLS towards the server.
        #[command(flatten)]
        tls: justizbus_xjustiz::client::ClientTls,
    },
    /// Recompute every hash chain and check every checkpoint: offline on a data directory
    /// (a copy will do) or online through a server. Exit 0 only when everything matches.
    Verify(VerifyArgs),
    /// Check an export made by `replay --with-proof`, without access to the bus.
    CheckExport {
        /// The export file.
        file: PathBuf,
        /// A trusted public key (64 hex digits, or a file holding them or a PEM PUBLIC KEY);
        /// repeat for several (a key change).
        #[arg(long, required = true)]
        key: Vec<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The life of one event: published, routed, delivered (attempts), acknowledged, receipts.
    Trail {
        #[command(flatten)]
        server: ServerArg,
        /// The event id.
        #[arg(long)]
        event: String,
        /// Only what happened at or after this time (RFC 3339 or ms since the epoch): reads the
        /// journal from there instead of from its start.
        #[arg(long)]
        since: Option<String>,
        /// Print one JSON object per entry.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct VerifyArgs {
    /// Verify the embedded log in this directory, reading its files only.
    #[arg(long, conflicts_with = "server", required_unless_present = "server")]
    data_dir: Option<PathBuf>,
    /// Verify through a running server (auditor or admin role).
    #[arg(long)]
    server: Option<String>,
    /// TLS towards the server.
    #[command(flatten)]
    tls: justizbus_xjustiz::client::ClientTls,
    /// A trusted public key (64 hex digits, or a file holding them, a PEM PUBLIC KEY or the
    /// signing key); repeat for several (a key change).
    #[arg(long, required = true)]
    key: Vec<String>,
    /// Only this topic.
    #[arg(long)]
    topic: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct GroupArgs {
    #[command(flatten)]
    server: ServerArg,
    /// Topic.
    #[arg(long)]
    topic: String,
    /// Consumer group.
    #[arg(long)]
    group: String,
}

#[derive(Subcommand, Debug)]
enum GroupsCommand {
    /// All groups, one JSON object per line.
    List {
        #[command(flatten)]
        server: ServerArg,
    },
    /// One group: positions, lag, in-flight deliveries, quarantined keys.
    Describe(GroupArgs),
}

#[derive(Subcommand, Debug)]
enum QuarantineCommand {
    /// Quarantined keys of a group.
    List(GroupArgs),
    /// Deliver the dead-lettered event of a key again (from attempt 1); the case flows on.
    Release {
        #[command(flatten)]
        group: GroupArgs,
        /// The quarantined key.
        #[arg(long)]
        key: String,
    },
    /// Treat the dead-lettered event of a key as handled; the case flows on.
    Skip {
        #[command(flatten)]
        group: GroupArgs,
        /// The quarantined key.
        #[arg(long)]
        key: String,
    },
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Serve(_) | Command::Adapter { .. });
    init_tracing(if serving { "info" } else { "warn" });
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().on_thread_park(crate::memory::release_if_due).build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe_error(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("JUSTIZBUS_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
}

/// A readable error: gRPC statuses as `CODE: message`, else the anyhow chain.
fn describe_error(e: &anyhow::Error) -> String {
    if let Some(status) = e.downcast_ref::<tonic::Status>() {
        return format!("{:?}: {}", status.code(), status.message());
    }
    format!("{e:#}")
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(args).await,
        Command::Topics { command } => topics(command).await,
        Command::Publish(args) => publish(args).await,
        Command::Subscribe(args) => subscribe(args).await,
        Command::Replay(args) if args.with_proof => replay_with_proof(args).await,
        Command::Replay(args) => replay(args).await,
        Command::Audit { command } => audit(command).await,
        Command::Groups { command } => groups(command).await,
        Command::Quarantine { command } => quarantine(command).await,
        Command::DeadLetters(args) => dead_letters(args).await,
        Command::Bench(args) => crate::bench::run_command(args).await,
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Certs(args) => print_json(&serde_json::to_value(crate::security::certs::run(&args)?)?),
        Command::Adapter { command } => {
            crate::memory::set_interval_ms(crate::memory::DEFAULT_INTERVAL_MS);
            justizbus_xjustiz::cli::run_adapter(command).await
        }
        Command::Xjustiz { command } => tokio::task::spawn_blocking(move || justizbus_xjustiz::cli::run(command)).await?,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => ServerConfig::load(path)?,
        None => ServerConfig::default(),
    };
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(log) = args.log {
        config.log = Some(log);
    }
    if let Some(directory) = args.directory {
        config.routing.directory = Some(directory);
    }
    if let (Some(cert), Some(key), Some(client_ca)) = (args.tls_cert, args.tls_key, args.tls_client_ca) {
        config.tls = Some(crate::security::tls::TlsSettings { cert, key, client_ca, handshake_timeout_ms: 10_000 });
    }
    config.validate()?;
    let listener = tokio::net::TcpListener::bind(&config.listen).await.with_context(|| format!("cannot listen on {}", config.listen))?;
    crate::server::run(config, listener, shutdown_signal()).await?;
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = ctrl_c => {}
        _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
    }
}

/// Connects to a server URL (`http://host:port`, or bare `host:port`) without TLS.
pub async fn connect(server: &str) -> anyhow::Result<Channel> {
    ServerArg { server: server.to_string(), tls: Default::default() }.connect().await
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

fn topic_json(t: &pb::TopicInfo) -> Value {
    json!({
        "topic": t.name,
        "partitions": t.partitions,
        "retention_ms": t.retention_ms,
        "retention_bytes": t.retention_bytes,
        "offsets": t.partition_info.iter().map(|p| json!({"partition": p.partition, "start": p.start_offset, "end": p.end_offset})).collect::<Vec<_>>(),
    })
}

async fn topics(command: TopicsCommand) -> anyhow::Result<()> {
    match command {
        TopicsCommand::Create { server, topic, partitions, retention_ms, retention_bytes } => {
            let mut admin = pb::admin_client::AdminClient::new(server.connect().await?);
            let t = admin.create_topic(pb::CreateTopicRequest { topic, partitions, retention_ms, retention_bytes }).await?.into_inner();
            print_json(&topic_json(&t))
        }
        TopicsCommand::SetRetention { server, topic, retention_ms, retention_bytes } => {
            if retention_ms.is_none() && retention_bytes.is_none() {
                anyhow::bail!("give --retention-ms, --retention-bytes or both");
            }
            let mut admin = pb::admin_client::AdminClient::new(server.connect().await?);
            let t = admin.set_retention(pb::SetRetentionRequest { topic, retention_ms, retention_bytes }).await?.into_inner();
            print_json(&topic_json(&t))
        }
        TopicsCommand::List { server } => {
            let mut admin = pb::admin_client::AdminClient::new(server.connect().await?);
            for t in admin.list_topics(pb::ListTopicsRequest {}).await?.into_inner().topics {
                print_json(&topic_json(&t))?;
            }
            Ok(())
        }
        TopicsCommand::Describe { server, topic } => {
            let mut admin = pb::admin_client::AdminClient::new(server.connect().await?);
            print_json(&topic_json(&admin.describe_topic(pb::DescribeTopicRequest { topic }).await?.into_inner()))
        }
    }
}

async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let data = if args.file == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).context("reading standard input")?;
        buf
    } else {
        std::fs::read(&args.file).with_context(|| format!("cannot read {}", args.file))?
    };
    let content_type = args.content_type.unwrap_or_else(|| detect_content_type(&data).to_string());
    let event = pb::Event {
        id: args.id.unwrap_or_default(),
        source: args.source,
        r#type: args.event_type.unwrap_or_default(),
        subject: args.key,
        data: data.into(),
        data_content_type: content_type,
        headers: args.headers.into_iter().collect(),
        ..Default::default()
    };
    let mut client = pb::publisher_client::PublisherClient::new(args.server.connect().await?);
    let r = client.publish(pb::PublishRequest { topic: args.topic, event: Some(event) }).await?.into_inner();
    print_json(&json!({"id": r.id, "partition": r.partition, "offset": r.offset, "duplicate": r.duplicate}))
}

fn detect_content_type(data: &[u8]) -> &'static str {
    if serde_json::from_slice::<Value>(data).is_ok() {
        "application/json"
    } else if data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'<') {
        "application/xml"
    } else {
        "application/octet-stream"
    }
}

/// The JSON line printed for an event by `subscribe` and `replay`.
pub fn event_json(topic: &str, partition: u32, offset: u64, key: &str, event: &pb::Event) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("topic".into(), json!(topic));
    m.insert("partition".into(), json!(partition));
    m.insert("offset".into(), json!(offset));
    m.insert("key".into(), json!(key));
    m.insert("id".into(), json!(event.id));
    m.insert("type".into(), json!(event.r#type));
    m.insert("source".into(), json!(event.source));
    m.insert("time".into(), json!(event.time.as_ref().map(rfc3339)));
    if !event.headers.is_empty() {
        m.insert("headers".into(), json!(crate::event::sorted_headers(event)));
    }
    match serde_json::from_slice::<Value>(&event.data) {
        Ok(v) if !event.data.is_empty() => {
            m.insert("data".into(), v);
        }
        _ => match std::str::from_utf8(&event.data) {
            Ok(s) => {
                m.insert("data".into(), json!(s));
            }
            Err(_) => {
                m.insert("data_base64".into(), json!(base64::engine::general_purpose::STANDARD.encode(&event.data)));
            }
        },
    }
    m
}

async fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    if args.max == Some(0) {
        return Ok(());
    }
    let GroupArgs { server, topic, group } = args.target;
    let mut client = pb::subscriber_client::SubscriberClient::new(server.connect().await?);
    let (tx, rx) = mpsc::channel(64);
    let init = pb::SubscribeInit {
        topic,
        group,
        max_unacked: args.max.map_or(args.max_unacked, |m| (m.min(u64::from(args.max_unacked))) as u32),
        ack_deadline_ms: args.ack_deadline_ms.unwrap_or(0),
        max_attempts: args.max_attempts.unwrap_or(0),
        start: match args.start {
            Start::Earliest => pb::StartPosition::Earliest as i32,
            Start::Latest => pb::StartPosition::Latest as i32,
        },
        ..Default::default()
    };
    tx.send(pb::SubscribeRequest { request: Some(pb::subscribe_request::Request::Init(init)) }).await?;
    let mut stream = client.subscribe(ReceiverStream::new(rx)).await?.into_inner();
    let idle = args.timeout.map(Duration::from_secs_f64);
    let mut received = 0u64;
    loop {
        let next = match idle {
            Some(d) => match tokio::time::timeout(d, stream.message()).await {
                Ok(r) => r,
                Err(_) => break,
            },
            None => stream.message().await,
        };
        let Some(msg) = next? else { break };
        match msg.response {
            Some(pb::subscribe_response::Response::Delivery(d)) => {
                let event = d.event.unwrap_or_default();
                let mut line = event_json(&d.topic, d.partition, d.offset, &d.key, &event);
                line.insert("attempt".into(), json!(d.attempt));
                print_json(&Value::Object(line))?;
                let ids = vec![d.delivery_id];
                let request = if args.nack {
                    pb::subscribe_request::Request::Nack(pb::Nack { delivery_ids: ids })
                } else {
                    pb::subscribe_request::Request::Ack(pb::Ack { delivery_ids: ids })
                };
                tx.send(pb::SubscribeRequest { request: Some(request) }).await.context("the server closed the subscription")?;
                received += 1;
                if args.max.is_some_and(|m| received >= m) {
                    break;
                }
            }
            Some(pb::subscribe_response::Response::AckError(e)) => {
                eprintln!("warning: ack of delivery {} failed: {}", e.delivery_id, e.message)
            }
            Some(pb::subscribe_response::Response::Subscribed(_)) | None => {}
        }
    }
    // Half-close and wait for the server to end the stream: it applies every ack sent before
    // it lets the subscriber go, so nothing printed is delivered again.
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(10), async { while let Ok(Some(_)) = stream.message().await {} }).await;
    Ok(())
}

async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let from_time = args.from_time.as_deref().map(parse_time).transpose()?;
    let mut client = pb::replayer_client::ReplayerClient::new(args.server.connect().await?);
    let request = pb::ReplayRequest {
        topic: args.topic,
        partition: args.partition,
        from_offset: args.from_offset,
        from_time,
        to_offset: args.to_offset,
    };
    let mut stream = client.replay(request).await?.into_inner();
    while let Some(r) = stream.message().await? {
        let event = r.event.unwrap_or_default();
        let mut line = event_json(&r.topic, r.partition, r.offset, &r.key, &event);
        line.insert("log_time".into(), json!(r.log_time.as_ref().map(rfc3339)));
        print_json(&Value::Object(line))?;
    }
    Ok(())
}

/// Writes an export of one partition's range with its proof.
async fn replay_with_proof(args: ReplayArgs) -> anyhow::Result<()> {
    let partition = args.partition.context("--with-proof needs --partition")?;
    let channel = args.server.connect().await?;
    // A start time becomes the offset of the first record at or after it.
    let from_offset = match (&args.from_time, args.from_offset) {
        (Some(t), _) => {
            let request = pb::ReplayRequest {
                topic: args.topic.clone(),
                partition: Some(partition),
                from_offset: None,
                from_time: Some(parse_time(t)?),
                to_offset: None,
            };
            let mut stream = pb::replayer_client::ReplayerClient::new(channel.clone()).replay(request).await?.into_inner();
            match stream.message().await? {
                Some(first) => Some(first.offset),
                None => anyhow::bail!("no record of {}/{partition} at or after {t}", args.topic),
            }
        }
        (None, o) => o,
    };
    let request = pb::ExportRequest { topic: args.topic.clone(), partition, from_offset, to_offset: args.to_offset, prove: true };
    let mut stream = pb::auditor_client::AuditorClient::new(channel).export(request).await?.into_inner();
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => {
            Box::new(std::io::BufWriter::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?))
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let (mut records, mut checkpoints) = (0u64, 0u64);
    while let Some(line) = stream.message().await? {
        records += u64::from(line.json.starts_with("{\"record\""));
        checkpoints += u64::from(line.json.starts_with("{\"checkpoint\""));
        out.write_all(line.json.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    eprintln!("exported {records} records of {}/{partition} with {checkpoints} signed checkpoints", args.topic);
    Ok(())
}

async fn audit(command: AuditCommand) -> anyhow::Result<()> {
    use crate::audit::checkpoint::{Signer, TrustedKeys};
    match command {
        AuditCommand::Keygen { out } => {
            let signer = Signer::generate(&out)?;
            print_json(&json!({"signing_key": out.display().to_string(), "public_key": signer.public_key().hex()}))
        }
        AuditCommand::Key { signing_key, config, server, tls } => {
            let key = match (signing_key, config, server) {
                (Some(path), _, _) => Signer::load(&path)?.public_key().hex(),
                (_, Some(config), _) => {
                    let config = ServerConfig::load(&config)?;
                    let path = config.audit.signing_key.context("the configuration sets no audit.signing_key")?;
                    Signer::load(&path)?.public_key().hex()
                }
                (_, _, Some(server)) => {
                    let channel = ServerArg { server, tls }.connect().await?;
                    let key = pb::auditor_client::AuditorClient::new(channel)
                        .signing_key(pb::SigningKeyRequest {})
                        .await?
                        .into_inner()
                        .public_key;
                    anyhow::ensure!(!key.is_empty(), "the server signs no checkpoints (no audit.signing_key)");
                    key
                }
                _ => anyhow::bail!("give --signing-key, --config or --server"),
            };
            println!("{key}");
            Ok(())
        }
        AuditCommand::Verify(args) => {
            let keys = TrustedKeys::parse(&args.key)?;
            let report = match (&args.data_dir, &args.server) {
                (Some(dir), _) => {
                    let (dir, topic) = (dir.clone(), args.topic.clone());
                    tokio::task::spawn_blocking(move || crate::audit::offline::verify_data_dir(&dir, topic.as_deref(), &keys)).await??
                }
                (_, Some(server)) => {
                    verify_online(ServerArg { server: server.clone(), tls: args.tls.clone() }, args.topic.as_deref(), &keys).await?
                }
                _ => anyhow::bail!("give --data-dir or --server"),
            };
            print_report(&report, args.json)?;
            let failed = report.partitions.iter().filter(|p| !p.ok()).count();
            anyhow::ensure!(report.ok, "verification failed: {failed} of {} partitions differ", report.partitions.len());
            Ok(())
        }
        AuditCommand::CheckExport { file, key, json } => {
            let keys = TrustedKeys::parse(&key)?;
            let reader = std::io::BufReader::new(std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?);
            let report = crate::audit::export::check_export(reader, keys)?;
            let ok = report.ok();
            let first = report.findings.first().map(|f| format!("offset {}: {}", f.offset, f.what));
            if json {
                print_json(&serde_json::to_value(&report)?)?;
            } else {
                println!("{}", report.line());
            }
            anyhow::ensure!(ok, "the export does not check out: {}", first.unwrap_or_default());
            Ok(())
        }
        AuditCommand::Trail { server, event, since, json } => {
            let since = since.as_deref().map(parse_time).transpose()?;
            let channel = server.connect().await?;
            let entries = pb::auditor_client::AuditorClient::new(channel)
                .trail(pb::TrailRequest { event_id: event.clone(), since })
                .await?
                .into_inner()
                .entries_json;
            anyhow::ensure!(!entries.is_empty(), "the journal has no entries for event {event:?}");
            for e in entries {
                if json {
                    println!("{e}");
                } else {
                    let v: Value = serde_json::from_str(&e)?;
                    let time = v["time_ms"].as_i64().map(|ms| rfc3339(&crate::event::ms_timestamp(ms))).unwrap_or_default();
                    let mut line = format!(
                        "{time}  {:<20} {}/{}@{}",
                        v["kind"].as_str().unwrap_or(""),
                        v["topic"].as_str().unwrap_or(""),
                        v["partition"],
                        v["offset"]
                    );
                    if let Some(g) = v["group"].as_str().filter(|g| !g.is_empty()) {
                        line.push_str(&format!("  group {g}"));
                    }
                    if let Some(a) = v["attempt"].as_u64() {
                        line.push_str(&format!("  attempt {a}"));
                    }
                    if let Some(d) = v["detail"].as_str() {
                        line.push_str(&format!("  {d}"));
                    }
                    println!("{line}");
                }
            }
            Ok(())
        }
    }
}

fn print_report(report: &crate::audit::verify::VerifyReport, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(&serde_json::to_value(report)?)
    } else {
        print!("{}", report.text());
        Ok(())
    }
}

/// Verifies through a server: exports every partition whole and checks it here, trusting
/// only the key.
async fn verify_online(
    server: ServerArg,
    topic: Option<&str>,
    keys: &crate::audit::checkpoint::TrustedKeys,
) -> anyhow::Result<crate::audit::verify::VerifyReport> {
    let started = std::time::Instant::now();
    let mut client = pb::auditor_client::AuditorClient::new(server.connect().await?).max_decoding_message_size(usize::MAX);
    let topics = client.topics(pb::ListTopicsRequest {}).await?.into_inner().topics;
    anyhow::ensure!(topic.is_none_or(|t| topics.iter().any(|x| x.name == t)), "topic {:?} does not exist", topic.unwrap_or_default());
    let mut reports = Vec::new();
    let mut bytes = 0;
    for t in topics.iter().filter(|t| topic.is_none_or(|x| x == t.name)) {
        for partition in 0..t.partitions {
            let request = pb::ExportRequest { topic: t.name.clone(), partition, from_offset: None, to_offset: None, prove: false };
            let mut stream = client.export(request).await?.into_inner();
            let mut check = crate::audit::export::ExportCheck::new(keys.clone());
            while let Some(line) = stream.message().await? {
                check.line(serde_json::from_str(&line.json).context("the server sent a malformed export line")?)?;
            }
            bytes += check.bytes;
            reports.push(check.finish(false)?);
        }
    }
    Ok(crate::audit::verify::VerifyReport::new(keys, reports, bytes, started.elapsed().as_secs_f64()))
}

fn group_json(g: &pb::GroupInfo) -> Value {
    json!({
        "topic": g.topic,
        "group": g.group,
        "subscribers": g.subscribers,
        "quarantined_keys": g.quarantined_keys,
        "dead_letter_topic": g.dead_letter_topic,
        "partitions": g.partitions.iter().map(|p| json!({"partition": p.partition, "committed": p.committed_offset, "end": p.end_offset, "lag": p.lag, "in_flight": p.in_flight})).collect::<Vec<_>>(),
    })
}

async fn groups(command: GroupsCommand) -> anyhow::Result<()> {
    match command {
        GroupsCommand::List { server } => {
            let mut admin = pb::admin_client::AdminClient::new(server.connect().await?);
            for g in admin.list_groups(pb::ListGroupsRequest {}).await?.into_inner().groups {
                print_json(&group_json(&g))?;
            }
            Ok(())
        }
        GroupsCommand::Describe(a) => {
            let mut admin = pb::admin_client::AdminClient::new(a.server.connect().await?);
            print_json(&group_json(&admin.describe_group(pb::DescribeGroupRequest { topic: a.topic, group: a.group }).await?.into_inner()))
        }
    }
}

fn quarantined_json(q: &pb::QuarantinedKey) -> Value {
    json!({"key": q.key, "partition": q.partition, "offset": q.offset, "event_id": q.event_id, "attempts": q.attempts, "since": q.since.as_ref().map(rfc3339)})
}

async fn quarantine(command: QuarantineCommand) -> anyhow::Result<()> {
    match command {
        QuarantineCommand::List(a) => {
            let mut admin = pb::admin_client::AdminClient::new(a.server.connect().await?);
            for q in admin.list_quarantine(pb::ListQuarantineRequest { topic: a.topic, group: a.group }).await?.into_inner().keys {
                print_json(&quarantined_json(&q))?;
            }
            Ok(())
        }
        QuarantineCommand::Release { group: a, key } => {
            let mut admin = pb::admin_client::AdminClient::new(a.server.connect().await?);
            let r = admin.release_quarantine(pb::QuarantineActionRequest { topic: a.topic, group: a.group, key }).await?.into_inner();
            print_json(&json!({"released": r.released.as_ref().map(quarantined_json)}))
        }
        QuarantineCommand::Skip { group: a, key } => {
            let mut admin = pb::admin_client::AdminClient::new(a.server.connect().await?);
            let r = admin.skip_quarantine(pb::QuarantineActionRequest { topic: a.topic, group: a.group, key }).await?.into_inner();
            print_json(&json!({"skipped": r.released.as_ref().map(quarantined_json)}))
        }
    }
}

async fn dead_letters(a: GroupArgs) -> anyhow::Result<()> {
    let mut admin = pb::admin_client::AdminClient::new(a.server.connect().await?);
    let r = admin.list_dead_letters(pb::ListDeadLettersRequest { topic: a.topic, group: a.group, max: 0 }).await?.into_inner();
    for rec in r.records {
        let event = rec.event.unwrap_or_default();
        print_json(&Value::Object(event_json(&rec.topic, rec.partition, rec.offset, &rec.key, &event)))?;
    }
    Ok(())
}
