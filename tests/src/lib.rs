//! Harness of the end-to-end tests: the real `justizbus` binary as a child process, and small
//! gRPC helpers. The tests themselves are in `tests/*.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use justizbus::process::ServerProcess;
use justizbus_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

pub use justizbus::process;

/// The `justizbus` binary next to the test executable (built by the test command; built here
/// once if missing, so a single `cargo test -p justizbus-e2e` works too).
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        let dir = exe.parent().and_then(|d| d.parent()).expect("target profile directory");
        let bin = dir.join("justizbus");
        if !bin.exists() {
            let status = Command::new(env!("CARGO"))
                .args(["build", "-p", "justizbus", "--bin", "justizbus"])
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("running cargo build");
            assert!(status.success(), "building the justizbus binary failed");
        }
        bin
    })
    .clone()
}

pub use justizbus_xjustiz::testdata::{samples_with_verdicts as xjustiz_samples, shared_xjustiz};

/// A server on a fresh temporary data directory, plus the directory's guard.
pub struct TestServer {
    /// The process.
    pub process: ServerProcess,
    /// Keeps the temporary directory alive.
    pub dir: tempfile::TempDir,
}

impl TestServer {
    /// Starts a server with extra `serve` arguments, on the backend the environment names
    /// (see [`kafka_backend`]).
    pub fn start(extra: &[&str]) -> Self {
        Self::start_configured("", extra)
    }

    /// Starts a server whose configuration file holds `config` (TOML sections), on the backend
    /// the environment names.
    pub fn start_configured(config: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let kafka = kafka_backend().map(|broker| kafka_config(&broker, &unique_prefix()));
        if kafka.is_some() || !config.is_empty() {
            assert!(!extra.iter().any(|a| a == "--config"), "give the configuration as text, not as --config");
            let path = dir.path().join("server.toml");
            std::fs::write(&path, format!("{}\n{config}", kafka.unwrap_or_default())).expect("writing the config");
            extra.extend(["--config".to_string(), path.display().to_string()]);
        }
        let process = ServerProcess::start(&binary(), &dir.path().join("data"), &extra).expect("server starts");
        if kafka_backend().is_some() {
            assert!(process.log().contains("Kafka log opened"), "the server did not open the Kafka log:\n{}", process.log());
        }
        TestServer { process, dir }
    }

    /// The server URL.
    pub fn url(&self) -> String {
        self.process.url()
    }

    /// A connected channel.
    pub async fn channel(&self) -> Channel {
        justizbus::cli::connect(&self.url()).await.expect("connect")
    }

    /// Runs the CLI with `--server` appended to the subcommand's arguments.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.push("--server".into());
        all.push(self.url());
        run_cli(&all, None)
    }

    /// Creates a topic through the admin API.
    pub async fn create_topic(&self, topic: &str, partitions: u32) {
        admin(self.channel().await)
            .create_topic(pb::CreateTopicRequest { topic: topic.into(), partitions, ..Default::default() })
            .await
            .expect("create topic");
    }
}

/// The Kafka broker (`host:port`) the tests run on when `JUSTIZBUS_TEST_BACKEND=kafka`
/// (set by `scripts/test.sh` for its second pass); None for the embedded backend.
pub fn kafka_backend() -> Option<String> {
    match std::env::var("JUSTIZBUS_TEST_BACKEND").as_deref() {
        Ok("kafka") => Some(kafka_broker()),
        Ok("embedded") | Err(_) => None,
        Ok(other) => panic!("JUSTIZBUS_TEST_BACKEND={other:?}: expected kafka or embedded"),
    }
}

/// The Kafka-protocol broker `scripts/test.sh` started (`JUSTIZBUS_TEST_KAFKA`).
pub fn kafka_broker() -> String {
    std::env::var("JUSTIZBUS_TEST_KAFKA")
        .expect("JUSTIZBUS_TEST_KAFKA is not set: run the tests with `bash scripts/test.sh`, which starts a Kafka-protocol broker")
}

/// A topic prefix no other test uses, so tests share one broker.
pub fn unique_prefix() -> String {
    format!("t{}.", uuid::Uuid::now_v7().simple())
}

/// A server config for the Kafka backend.
pub fn kafka_config(broker: &str, prefix: &str) -> String {
    format!("log = \"kafka://{broker}\"\n\n[kafka]\ntopic_prefix = \"{prefix}\"\n")
}

/// What a CLI run produced.
#[derive(Debug)]
pub struct CliOutput {
    /// Exit success.
    pub ok: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl CliOutput {
    /// Stdout parsed as JSON lines.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect()
    }
}

/// Runs the binary with arguments and optional standard input.
pub fn run_cli(args: &[String], stdin: Option<&[u8]>) -> CliOutput {
    use std::io::Write;
    let mut cmd = Command::new(binary());
    cmd.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    cmd.stdin(if stdin.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() });
    let mut child = cmd.spawn().expect("spawn justizbus");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin").write_all(input).expect("write stdin");
    }
    let out = child.wait_with_output().expect("wait");
    CliOutput {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// Admin client.
pub fn admin(channel: Channel) -> pb::admin_client::AdminClient<Channel> {
    pb::admin_client::AdminClient::new(channel)
}

/// Publisher client.
pub fn publisher(channel: Channel) -> pb::publisher_client::PublisherClient<Channel> {
    pb::publisher_client::PublisherClient::new(channel).max_encoding_message_size(usize::MAX)
}

/// A small event.
pub fn event(id: &str, subject: &str, data: &str) -> pb::Event {
    pb::Event {
        id: id.into(),
        subject: subject.into(),
        r#type: "test.event".into(),
        data: data.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

/// Publishes one event; returns (partition, offset).
pub async fn publish(channel: &Channel, topic: &str, e: pb::Event) -> Result<pb::PublishResponse, tonic::Status> {
    publisher(channel.clone()).publish(pb::PublishRequest { topic: topic.into(), event: Some(e) }).await.map(|r| r.into_inner())
}

/// A subscriber driven by the test: receive, ack, nack, change credit.
pub struct Subscriber {
    tx: mpsc::Sender<pb::SubscribeRequest>,
    stream: tonic::Streaming<pb::SubscribeResponse>,
    /// The server's `subscribed` answer.
    pub subscribed: pb::Subscribed,
}

impl Subscriber {
    /// Opens a subscription.
    pub async fn open(channel: &Channel, init: pb::SubscribeInit) -> Result<Self, tonic::Status> {
        let mut client = pb::subscriber_client::SubscriberClient::new(channel.clone());
        let (tx, rx) = mpsc::channel(1024);
        tx.send(pb::SubscribeRequest { request: Some(pb::subscribe_request::Request::Init(init)) }).await.expect("send init");
        let mut stream = client.subscribe(ReceiverStream::new(rx)).await?.into_inner();
        match stream.message().await?.and_then(|m| m.response) {
            Some(pb::subscribe_response::Response::Subscribed(subscribed)) => Ok(Subscriber { tx, stream, subscribed }),
            other => panic!("expected subscribed, got {other:?}"),
        }
    }

    /// Opens a subscription with common settings.
    pub async fn simple(channel: &Channel, topic: &str, group: &str, max_unacked: u32) -> Self {
        let init = pb::SubscribeInit { topic: topic.into(), group: group.into(), max_unacked, ..Default::default() };
        Self::open(channel, init).await.expect("subscribe")
    }

    /// The next server message within `wait`, or None on timeout. Panics when the stream fails.
    pub async fn next_message(&mut self, wait: Duration) -> Option<Result<pb::subscribe_response::Response, tonic::Status>> {
        match tokio::time::timeout(wait, self.stream.message()).await {
            Err(_) => None,
            Ok(Ok(Some(m))) => m.response.map(Ok),
            Ok(Ok(None)) => None,
            Ok(Err(status)) => Some(Err(status)),
        }
    }

    /// The next delivery within `wait` (ack errors are skipped), or None.
    pub async fn next(&mut self, wait: Duration) -> Option<pb::Delivery> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_message(left).await? {
                Ok(pb::subscribe_response::Response::Delivery(d)) => return Some(d),
                Ok(_) => continue,
                Err(status) => panic!("subscription failed: {status}"),
            }
        }
    }

    /// Collects deliveries until `n` arrived or `wait` passed without one.
    pub async fn take(&mut self, n: usize, wait: Duration) -> Vec<pb::Delivery> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next(wait).await {
                Some(d) => out.push(d),
                None => break,
            }
        }
        out
    }

    /// Sends a raw request.
    pub async fn send(&self, request: pb::subscribe_request::Request) {
        let _ = self.tx.send(pb::SubscribeRequest { request: Some(request) }).await;
    }

    /// Acknowledges.
    pub async fn ack(&self, ids: &[u64]) {
        self.send(pb::subscribe_request::Request::Ack(pb::Ack { delivery_ids: ids.to_vec() })).await;
    }

    /// Rejects.
    pub async fn nack(&self, ids: &[u64]) {
        self.send(pb::subscribe_request::Request::Nack(pb::Nack { delivery_ids: ids.to_vec() })).await;
    }

    /// Half-closes and waits for the server to end the stream (all acks applied).
    pub async fn close(mut self) {
        drop(self.tx);
        let _ = tokio::time::timeout(Duration::from_secs(10), async { while let Ok(Some(_)) = self.stream.message().await {} }).await;
    }
}

/// Short wait for "nothing more arrives" checks.
pub const QUIET: Duration = Duration::from_millis(700);
/// Long wait for things that must arrive.
pub const ARRIVES: Duration = Duration::from_secs(15);

/// Copies a directory tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// Drops an item the way a legacy writer should: under a temporary name, then renamed.
pub fn drop_item(watch: &Path, name: &str, write: impl FnOnce(&Path)) {
    let tmp = watch.join(format!(".{name}.part"));
    write(&tmp);
    std::fs::rename(&tmp, watch.join(name)).expect("rename into the drop directory");
}

/// Starts the `justizbus` binary with `args` (stderr captured).
pub fn spawn(args: &[String]) -> Child {
    Command::new(binary()).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn adapter")
}

/// Waits for a child to exit, failing the test after `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(start.elapsed() < limit, "adapter did not finish within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every file below `dir`, by relative path.
pub fn files_below(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(dir).expect("below").to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(e.path()).expect("read"));
            }
        }
    }
    out
}
