//! The Kafka backend end to end, on the real Kafka-protocol broker `scripts/test.sh` starts
//! (tansu): several bus nodes sharing a group while one is killed, a broker restart during
//! publishing and consuming, and topics that already exist in Kafka.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use justizbus::process::{free_port, ServerProcess};
use justizbus_e2e::*;
use justizbus_proto::v1 as pb;
use tonic::Code;

/// A bus node on the Kafka log under `prefix`, with its own (unused) data directory.
fn node(dir: &Path, name: &str, broker: &str, prefix: &str) -> ServerProcess {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, kafka_config(broker, prefix)).expect("config");
    let args = vec!["--config".to_string(), config.display().to_string()];
    ServerProcess::start(&binary(), &dir.join(name), &args).expect("node starts")
}

/// Two bus nodes on one Kafka log (the test broker, a fresh prefix) and a channel to each.
struct TwoNodes {
    dir: tempfile::TempDir,
    a: ServerProcess,
    b: ServerProcess,
    ca: tonic::transport::Channel,
    cb: tonic::transport::Channel,
}

async fn two_nodes() -> TwoNodes {
    let (broker, prefix) = (kafka_broker(), unique_prefix());
    let dir = tempfile::tempdir().expect("tempdir");
    let a = node(dir.path(), "a", &broker, &prefix);
    let b = node(dir.path(), "b", &broker, &prefix);
    let ca = justizbus::cli::connect(&a.url()).await.expect("connect to a");
    let cb = justizbus::cli::connect(&b.url()).await.expect("connect to b");
    TwoNodes { dir, a, b, ca, cb }
}

fn case_event(case: usize, seq: usize) -> pb::Event {
    event(&format!("c{case}-s{seq}"), &format!("case-{case}"), &format!("{case}:{seq}"))
}

/// (case, seq) of a delivered test event.
fn case_seq(d: &pb::Delivery) -> (usize, usize) {
    let data = String::from_utf8_lossy(&d.event.as_ref().expect("event").data).into_owned();
    let (c, s) = data.split_once(':').expect("case:seq");
    (c.parse().expect("case"), s.parse().expect("seq"))
}

/// Receives and acknowledges until `until` says stop or nothing came for `idle`; returns what
/// was received in order.
async fn receive_acking(sub: &mut Subscriber, idle: Duration, mut until: impl FnMut(&[(usize, usize)]) -> bool) -> Vec<(usize, usize)> {
    let mut got = Vec::new();
    while !until(&got) {
        let Some(d) = sub.next(idle).await else { break };
        got.push(case_seq(&d));
        sub.ack(&[d.delivery_id]).await;
    }
    got
}

/// Per case, the sequence numbers one subscriber received must rise: order per key.
fn assert_ordered_per_case(received: &[(usize, usize)], who: &str) {
    let mut last: BTreeMap<usize, usize> = BTreeMap::new();
    for &(case, seq) in received {
        if let Some(prev) = last.insert(case, seq) {
            assert!(seq > prev, "{who}: case {case} got seq {seq} after {prev}");
        }
    }
}

// tansu 0.6 keeps a killed member that was the group's leader: its Formed-state heartbeat
// handler drops the expired member but leaves the group Formed with the dead leader, and the
// rebalance that follows waits for that leader's assignment forever (tansu-broker 0.6.0,
// src/coordinator/group/administrator.rs, `Inner<Formed>::heartbeat` and `Forming::sync`). A
// real Kafka elects a new leader. So node a joins first and is the leader before node b joins;
// the node killed is the one that is not the leader, whose partitions tansu does move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_a_group_and_a_killed_nodes_partitions_move_to_the_other() {
    let TwoNodes { dir: _dir, mut a, mut b, ca, cb } = two_nodes().await;
    admin(ca.clone())
        .create_topic(pb::CreateTopicRequest { topic: "filings".into(), partitions: 4, ..Default::default() })
        .await
        .expect("create");

    // Subscribers of one group on two nodes.
    let mut sub_a = Subscriber::simple(&ca, "filings", "court", 20).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !a.log().contains("partitions assigned to this node") {
        assert!(Instant::now() < deadline, "node a never got partitions:\n{}", a.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut sub_b = Subscriber::simple(&cb, "filings", "court", 20).await;
    let (cases, per_case) = (16, 30);
    // The first half, published to both nodes alternately.
    for seq in 0..per_case / 2 {
        for case in 0..cases {
            let ch = if case % 2 == 0 { &ca } else { &cb };
            publish(ch, "filings", case_event(case, seq)).await.expect("publish");
        }
    }
    let half = cases * per_case / 2;
    // Both nodes serve a share of the partitions: together they deliver the first half.
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while got_a.iter().chain(&got_b).collect::<BTreeSet<_>>().len() < half && Instant::now() < deadline {
        got_a.extend(receive_acking(&mut sub_a, Duration::from_millis(200), |g| g.len() >= 50).await);
        got_b.extend(receive_acking(&mut sub_b, Duration::from_millis(200), |g| g.len() >= 50).await);
    }
    assert!(!got_a.is_empty() && !got_b.is_empty(), "both nodes deliver: a {} b {}", got_a.len(), got_b.len());
    assert_eq!(got_a.iter().chain(&got_b).collect::<BTreeSet<_>>().len(), half, "the first half is delivered");

    // Node b dies; the second half is published to node a while b's partitions move over.
    b.kill9();
    drop(sub_b);
    for seq in per_case / 2..per_case {
        for case in 0..cases {
            publish(&ca, "filings", case_event(case, seq)).await.expect("publish after the kill");
        }
    }
    let all: BTreeSet<(usize, usize)> = (0..cases).flat_map(|c| (0..per_case).map(move |s| (c, s))).collect();
    let mut after = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        let seen: BTreeSet<(usize, usize)> = got_a.iter().chain(&got_b).chain(&after).copied().collect();
        if seen == all {
            break;
        }
        after.extend(receive_acking(&mut sub_a, Duration::from_millis(500), |g| g.len() >= 100).await);
    }
    let seen: BTreeSet<(usize, usize)> = got_a.iter().chain(&got_b).chain(&after).copied().collect();
    let missing: Vec<_> = all.difference(&seen).collect();
    if !missing.is_empty() {
        eprintln!("node a log:\n{}", a.log());
    }
    assert!(
        missing.is_empty(),
        "nothing lost after node b was killed; missing {} e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    // Order per case: on each node the sequence rises; what a moved everything b delivered and
    // acknowledged but could not store yet comes again (at least once), never out of order.
    assert_ordered_per_case(&got_b, "node b");
    let a_all: Vec<(usize, usize)> = got_a.iter().chain(&after).copied().collect();
    let b_cases: BTreeSet<usize> = got_b.iter().map(|(c, _)| *c).collect();
    for case in b_cases {
        let on_a: Vec<usize> = after.iter().filter(|(c, _)| *c == case).map(|(_, s)| *s).collect();
        assert!(on_a.windows(2).all(|w| w[1] > w[0]), "case {case} in order on node a after the move: {on_a:?}");
    }
    assert_ordered_per_case(&got_a, "node a before the kill");
    assert!(a_all.len() >= all.len() - got_b.len(), "node a delivered the rest");
    a.stop().expect("stop a");
}

/// A tansu broker of this test's own, storing into SQLite so its data survives a restart.
struct Broker {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
}

impl Broker {
    fn start() -> Broker {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut broker = Broker { child: None, dir, port: free_port().expect("port") };
        broker.restart();
        broker
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let tansu = std::env::var("JUSTIZBUS_TANSU").expect("JUSTIZBUS_TANSU (set by scripts/test.sh)");
        let url = format!("tcp://{}", self.address());
        let log = std::fs::File::options().create(true).append(true).open(self.dir.path().join("broker.log")).expect("log");
        let child = Command::new(tansu)
            .args(["broker", "--storage-engine", "sqlite://broker.db", "--listener-url", &url, "--advertised-listener-url", &url])
            .current_dir(self.dir.path())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("starting tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(self.address()).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_nothing_acknowledged_and_subscribers_resume() {
    let mut broker = Broker::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bus = node(dir.path(), "bus", &broker.address(), "restart.");
    let ch = justizbus::cli::connect(&bus.url()).await.expect("connect");
    admin(ch.clone())
        .create_topic(pb::CreateTopicRequest { topic: "t".into(), partitions: 2, ..Default::default() })
        .await
        .expect("create");
    let mut sub = Subscriber::simple(&ch, "t", "g", 50).await;

    // Publish one by one while the broker is killed and restarted; a publish either succeeds
    // or fails with a retryable status (then it is retried with the same id).
    let total = 120;
    let publisher = {
        let ch = ch.clone();
        tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut refusals = Vec::new();
            for seq in 0..total {
                loop {
                    match publish(&ch, "t", case_event(seq % 4, seq)).await {
                        Ok(_) => {
                            acknowledged.push(seq);
                            break;
                        }
                        Err(status) => {
                            refusals.push(status.code());
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (acknowledged, refusals)
        })
    };
    let mut received = receive_acking(&mut sub, Duration::from_secs(5), |g| g.len() >= 30).await;
    broker.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart();
    let (acknowledged, refusals) = publisher.await.expect("publisher");
    assert_eq!(acknowledged.len(), total, "every publish succeeded in the end");
    assert!(refusals.iter().all(|c| *c == Code::Unavailable), "only retryable refusals: {refusals:?}");
    let deadline = Instant::now() + Duration::from_secs(90);
    while received.iter().map(|(_, s)| *s).collect::<BTreeSet<_>>().len() < total && Instant::now() < deadline {
        received.extend(receive_acking(&mut sub, Duration::from_secs(2), |g| g.len() >= 50).await);
    }
    let seqs: BTreeSet<usize> = received.iter().map(|(_, s)| *s).collect();
    if seqs.len() < total {
        eprintln!("bus log:\n{}", bus.log());
    }
    assert_eq!(seqs, (0..total).collect(), "the subscriber resumed without skipping");
    assert_ordered_per_case(&dedup_redeliveries(&received), "subscriber");
    // Stored exactly once each (idempotent publish across the restart).
    let replay = run_cli(&["replay".into(), "--topic".into(), "t".into(), "--server".into(), bus.url()], None);
    assert!(replay.ok, "{}\nbus log:\n{}", replay.stderr, bus.log());
    let ids: Vec<String> = replay.json_lines().iter().map(|e| e["id"].as_str().unwrap_or_default().to_string()).collect();
    assert_eq!(ids.len(), total, "each event stored once: {} records", ids.len());
    bus.stop().expect("stop");
}

/// Drops a delivery that repeats one already received (at least once), keeping first arrivals.
fn dedup_redeliveries(received: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut seen = BTreeSet::new();
    received.iter().filter(|x| seen.insert(**x)).copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_exists_in_kafka_with_another_partition_count_is_refused() {
    let broker = kafka_broker();
    let prefix = unique_prefix();
    // Created by some other Kafka client, with 3 partitions.
    create_kafka_topic(&broker, &format!("{prefix}elsewhere"), 3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bus = node(dir.path(), "bus", &broker, &prefix);
    let ch = justizbus::cli::connect(&bus.url()).await.expect("connect");
    let err = admin(ch.clone())
        .create_topic(pb::CreateTopicRequest { topic: "elsewhere".into(), partitions: 5, ..Default::default() })
        .await
        .expect_err("refused");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains("3 partitions"), "{}", err.message());
    // It is used as it is: 3 partitions, murmur2 of the key.
    let info =
        admin(ch.clone()).describe_topic(pb::DescribeTopicRequest { topic: "elsewhere".into() }).await.expect("describe").into_inner();
    assert_eq!(info.partitions, 3);
    let stored = publish(&ch, "elsewhere", event("e1", "AG-Berlin/1", "x")).await.expect("publish");
    assert_eq!(stored.partition, justizbus::partitioner::partition_for_key(b"AG-Berlin/1", 3));
    bus.stop().expect("stop");
}

async fn create_kafka_topic(broker: &str, name: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", broker).create().expect("admin client");
    let results =
        admin.create_topics([&NewTopic::new(name, partitions, TopicReplication::Fixed(1))], &AdminOptions::new()).await.expect("create");
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_uploaded_through_one_node_is_served_by_another() {
    use justizbus_xjustiz::client::{download, upload};
    let TwoNodes { dir: _dir, mut a, mut b, ca, cb } = two_nodes().await;
    // Larger than one chunk in Kafka, and not a multiple of it.
    let content: Vec<u8> = (0..1_300_000u32).map(|i| (i % 251) as u8).collect();
    let attachment = upload(&ca, "schriftsatz.pdf", "application/pdf", content.clone()).await.expect("upload to a");
    // Node a is gone: node b has the blob from Kafka (its own data directory never saw it).
    a.kill9();
    let stat = pb::blobs_client::BlobsClient::new(cb.clone())
        .stat(pb::DownloadRequest { sha256: attachment.sha256.clone() })
        .await
        .expect("stat on b")
        .into_inner();
    assert_eq!(stat.size, content.len() as u64);
    assert_eq!(download(&cb, &attachment).await.expect("download from b"), content);
    admin(cb.clone())
        .create_topic(pb::CreateTopicRequest { topic: "filed".into(), partitions: 1, ..Default::default() })
        .await
        .expect("create");
    let mut e = event("with-doc", "case-1", "{}");
    e.attachments.push(attachment.clone());
    publish(&cb, "filed", e).await.expect("an event referring to the blob is accepted on b");
    let unknown = pb::Attachment { sha256: "0".repeat(64), ..attachment };
    let mut e = event("with-unknown-doc", "case-1", "{}");
    e.attachments.push(unknown);
    assert_eq!(publish(&cb, "filed", e).await.expect_err("unknown blob").code(), Code::NotFound);
    b.stop().expect("stop b");
}
