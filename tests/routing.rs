//! Routing end to end: inbound adapter -> bus -> router -> outbound adapters, with the valid
//! real samples of `../shared/xjustiz` and the example directory of the project; receipts back
//! to the senders; unroutable addresses answered with a routing error.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use justizbus::routing::directory::Directory;
use justizbus_e2e::{copy_dir, drop_item, files_below, shared_xjustiz, spawn, wait_exit, xjustiz_samples, Subscriber, TestServer, ARRIVES};
use justizbus_proto::v1 as pb;

fn example_directory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/directory.toml")
}

/// Every event of a topic, with its original bytes (gRPC replay).
async fn replay(server: &TestServer, topic: &str) -> Vec<pb::Event> {
    let mut client = pb::replayer_client::ReplayerClient::new(server.channel().await);
    let mut stream = client.replay(pb::ReplayRequest { topic: topic.into(), ..Default::default() }).await.expect("replay").into_inner();
    let mut out = Vec::new();
    while let Some(r) = stream.message().await.expect("replay stream") {
        out.push(r.event.expect("event"));
    }
    out
}

/// Reads `<inbox>/<folder>/justizbus-event.json` of every delivered folder.
fn inbox_events(inbox: &Path) -> BTreeMap<String, (serde_json::Value, BTreeMap<String, Vec<u8>>)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(inbox).expect("inbox").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let mut files = files_below(&entry.path());
        let envelope = files.remove("justizbus-event.json").expect("envelope");
        out.insert(name, (serde_json::from_slice(&envelope).expect("json"), files));
    }
    out
}

/// A pause of 150-900 ms, different each time.
fn random_pause() -> Duration {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    Duration::from_millis(150 + u64::from(nanos % 750))
}

/// Drops every valid sample (files and EGVP folders) into an inbound adapter, runs outbound
/// adapters for every participant of the example directory, kills the bus `kills` times with
/// `kill -9` meanwhile, and checks what each inbox holds.
/// How the bus goes down while it routes.
#[derive(Clone, Copy, PartialEq)]
enum Outage {
    /// SIGTERM: it writes its mailbox index file, which the next start reads.
    Stop,
    /// No chance to write anything: the next start reads the file of an earlier clean stop (if
    /// any) and the store records after it.
    Kill9,
}

async fn route_samples(outages: &[Outage]) {
    let directory = Directory::load(&example_directory()).expect("example directory");
    let mut server = TestServer::start(&["--directory", &example_directory().display().to_string()]);
    let work = tempfile::tempdir().expect("tempdir");
    let watch = work.path().join("drop");
    std::fs::create_dir_all(&watch).expect("mkdir");
    for (i, (path, valid)) in xjustiz_samples().iter().enumerate() {
        if *valid && !path.components().any(|c| c.as_os_str() == "EGVP-Enterprise-Receiver") {
            let name = format!("{i:02}-{}", path.file_name().expect("name").to_string_lossy());
            drop_item(&watch, &name, |tmp| {
                std::fs::copy(path, tmp).expect("copy");
            });
        }
    }
    let egvp = shared_xjustiz().join("samples/EGVP-Enterprise-Receiver");
    for name in EGVP_FOLDERS {
        drop_item(&watch, name, |tmp| copy_dir(&egvp.join(name), tmp));
    }
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // Outbound adapters first, for every participant; they run until the test ends.
    let mut adapters = Vec::new();
    for p in directory.participants() {
        let inbox = work.path().join("inbox").join(&p.id);
        let out = inbox.display().to_string();
        let child =
            spawn(&args(&["adapter", "outbound", "--server", &server.url(), "--participant", &p.id, "--group", "inbox", "--out", &out]));
        adapters.push((p.id.clone(), inbox, Killed(child)));
    }
    let mut inbound = spawn(&args(&[
        "adapter",
        "inbound",
        "--server",
        &server.url(),
        "--watch",
        &watch.display().to_string(),
        "--poll-ms",
        "50",
        "--once",
    ]));
    for outage in outages {
        std::thread::sleep(random_pause());
        match outage {
            Outage::Stop => server.process.stop().expect("stop"),
            Outage::Kill9 => server.process.kill9(),
        }
        server.process.restart().expect("restart");
    }
    if outages.contains(&Outage::Stop) {
        assert!(server.process.log().contains("from_file=true"), "a start after the clean stop read the index file");
    }
    assert!(wait_exit(&mut inbound, Duration::from_secs(120)).success());

    // What the headers say, resolved through the directory: deliveries and receipts per participant.
    let ingested = replay(&server, "xjustiz.ingest").await;
    assert!(ingested.len() >= 30, "{} events ingested", ingested.len());
    let mut deliveries: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut receipts: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut originals: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for e in &ingested {
        let route = directory.route(&e.r#type, &e.sender, &e.recipients, &e.subject);
        assert!(route.unresolved.is_empty() && !route.recipients.is_empty(), "{}: {:?} not in the example directory", e.id, e.recipients);
        let sender = route.sender.clone().unwrap_or_else(|| panic!("{}: sender {} not in the example directory", e.id, e.sender));
        for r in &route.recipients {
            deliveries.entry(r.clone()).or_default().insert(e.id.clone());
            receipts.entry(sender.clone()).or_default().insert(format!("receipt.{}.{r}", e.id));
        }
        assert!(originals.insert(e.id.clone(), e.original.clone()).is_none(), "{} ingested twice", e.id);
    }
    let expected = |p: &str| -> BTreeSet<String> { deliveries.get(p).into_iter().chain(receipts.get(p)).flatten().cloned().collect() };
    // Wait until every inbox holds its share (the adapters reconnect after each kill).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    for (p, inbox, _) in &adapters {
        loop {
            let got: BTreeSet<String> = if inbox.exists() { inbox_events(inbox).into_keys().collect() } else { BTreeSet::new() };
            if got == expected(p) {
                break;
            }
            assert!(got.is_subset(&expected(p)), "inbox of {p} holds what was not sent to it: {:?}", got.difference(&expected(p)));
            assert!(std::time::Instant::now() < deadline, "inbox of {p} incomplete: missing {:?}", expected(p).difference(&got));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    for (p, inbox, _) in &adapters {
        let got = inbox_events(inbox);
        for id in deliveries.get(p).into_iter().flatten() {
            let (envelope, files) = &got[id];
            assert_eq!(envelope["recipients"].as_array().map(|r| r.iter().any(|x| x == p.as_str())), Some(true), "{id}");
            assert!(files.values().any(|content| *content == originals[id]), "{p}/{id}: the original XML is not there byte for byte");
        }
        for id in receipts.get(p).into_iter().flatten() {
            let (envelope, _) = &got[id];
            assert_eq!(envelope["type"], "justizbus.receipt", "{id}");
            let data = &envelope["data"];
            assert!(id.ends_with(data["recipient"].as_str().expect("recipient")), "{id}: {data}");
            assert!(data["acknowledged_at"].is_string() && data["offset"].is_u64(), "{data}");
        }
    }
    // The journal tells each message's life: routed to its recipients, acknowledged by each
    // recipient's outbound adapter, a receipt for each.
    let mut recipients_of: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (p, ids) in &deliveries {
        for id in ids {
            recipients_of.entry(id.as_str()).or_default().insert(p.as_str());
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for (id, recipients) in &recipients_of {
        let mailboxes: BTreeSet<String> = recipients.iter().map(|r| format!("mailbox.{r}")).collect();
        // The last acks and receipts may still be on their way when the inboxes are complete.
        loop {
            let out = server.cli(&["audit", "trail", "--event", id, "--json"]);
            assert!(out.ok, "{}", out.stderr);
            let entries = out.json_lines();
            let topics_of = |kind: &str| -> BTreeSet<String> {
                entries.iter().filter(|e| e["kind"] == kind).map(|e| e["topic"].as_str().unwrap_or_default().to_string()).collect()
            };
            let complete = entries[0]["kind"] == "published"
                && topics_of("routed") == BTreeSet::from(["xjustiz.ingest".to_string()])
                && topics_of("acknowledged") == mailboxes
                && topics_of("receipt") == mailboxes;
            if complete {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{id}: the trail lacks a step: {entries:#?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // Order per case: in every mailbox, the deliveries of one case stand in the order the
    // ingest topic holds them (a case is one ingest partition, replayed in offset order).
    let position: BTreeMap<&str, usize> = ingested.iter().enumerate().map(|(i, e)| (e.id.as_str(), i)).collect();
    let mut cases_with_several = 0;
    for (p, _, _) in &adapters {
        let mut last: BTreeMap<String, usize> = BTreeMap::new();
        for e in replay(&server, &format!("mailbox.{p}")).await.iter().filter(|e| e.r#type != "justizbus.receipt") {
            let at = position[e.id.as_str()];
            if let Some(before) = last.insert(e.subject.clone(), at) {
                cases_with_several += 1;
                assert!(before < at, "mailbox of {p}: {} (case {}) came before an earlier event of its case", e.id, e.subject);
            }
        }
    }
    assert!(cases_with_several > 0, "the samples hold cases with several messages to one recipient");

    // EGVP folders arrive whole: every file of the folder, byte for byte, in each recipient's inbox.
    for name in EGVP_FOLDERS {
        let original = files_below(&egvp.join(name));
        let message = &original["attachments/xjustiz_nachricht.xml"];
        let id = originals.iter().find(|(_, o)| *o == message).map(|(id, _)| id.clone()).expect("ingested");
        for (p, inbox, _) in adapters.iter().filter(|(p, _, _)| deliveries.get(p).is_some_and(|d| d.contains(&id))) {
            let copy = files_below(&inbox.join(&id));
            for (rel, bytes) in &original {
                assert_eq!(copy.get(rel), Some(bytes), "{p}: {name}/{rel} differs");
            }
        }
    }
}

const EGVP_FOLDERS: [&str; 3] = ["Testnachricht_1", "Testnachricht_xjustiz321", "TestnachrichtEeb_1"];

/// A child process killed when the test ends (also when it fails).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn samples_reach_exactly_their_recipients_and_senders_get_receipts() {
    route_samples(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_bus_while_routing_loses_no_delivery_and_no_receipt() {
    // A clean stop first: the restarts after the kills start from its index file.
    route_samples(&[Outage::Stop, Outage::Kill9, Outage::Kill9, Outage::Kill9]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_addresses_go_to_the_dead_letter_topic_and_the_sender_hears_of_it() {
    let directory = Directory::load(&example_directory()).expect("example directory");
    let server = TestServer::start(&["--directory", &example_directory().display().to_string()]);
    let channel = server.channel().await;
    let sender = directory.resolve("court:F1106").expect("in the example").id.clone();
    let court = directory.resolve("court:T6076").expect("in the example").id.clone();
    let event = |id: &str, recipients: &[&str]| pb::Event {
        id: id.into(),
        r#type: "nachricht.gds.basisnachricht.0005006".into(),
        subject: "court:F1106|1 C 1/26".into(),
        sender: "court:F1106".into(),
        recipients: recipients.iter().map(|r| r.to_string()).collect(),
        data: b"{}".to_vec().into(),
        data_content_type: "application/json".into(),
        ..Default::default()
    };
    justizbus_e2e::publish(&channel, "xjustiz.ingest", event("nobody-home", &["court:Z9999"])).await.expect("publish");
    justizbus_e2e::publish(&channel, "xjustiz.ingest", event("half-known", &["court:T6076", "other:Unbekannte Kanzlei"]))
        .await
        .expect("publish");

    let mut inbox = Subscriber::simple(&channel, &format!("mailbox.{sender}"), "app", 10).await;
    let mut seen = BTreeMap::new();
    // Both events are of one case: the second error comes once the first is acknowledged.
    for _ in 0..2 {
        let d = inbox.next(ARRIVES).await.expect("a routing error");
        inbox.ack(&[d.delivery_id]).await;
        let e = d.event.as_ref().expect("event");
        assert_eq!(e.r#type, "justizbus.routing.error");
        let data: serde_json::Value = serde_json::from_slice(&e.data).expect("json");
        seen.insert(data["event_id"].as_str().expect("id").to_string(), data);
    }
    assert_eq!(seen["nobody-home"]["unresolved"], serde_json::json!(["court:Z9999"]));
    assert_eq!(seen["half-known"]["unresolved"], serde_json::json!(["other:Unbekannte Kanzlei"]));
    assert_eq!(seen["half-known"]["delivered_to"], serde_json::json!([court.clone()]));

    // The resolvable recipient got its copy; only the wholly unroutable event is dead-lettered.
    let mut court_inbox = Subscriber::simple(&channel, &format!("mailbox.{court}"), "app", 10).await;
    let got = court_inbox.take(1, ARRIVES).await;
    assert_eq!(got[0].event.as_ref().map(|e| e.id.as_str()), Some("half-known"));
    let dead = replay(&server, "xjustiz.ingest.unroutable").await;
    assert_eq!(dead.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), vec!["nobody-home"]);

    // Nobody may publish into a mailbox directly.
    let direct = justizbus_e2e::publish(&channel, &format!("mailbox.{court}"), event("forged", &[])).await;
    assert_eq!(direct.expect_err("refused").code(), tonic::Code::InvalidArgument);

    // The router's position is visible as the reserved group justizbus.router, at the end of
    // the ingest topic once everything is routed (stored shortly after the deliveries, once the
    // journal entries before it are durable); no client may join it.
    let mut admin = justizbus_e2e::admin(channel.clone());
    let started = std::time::Instant::now();
    let router = loop {
        let described =
            admin.describe_group(pb::DescribeGroupRequest { topic: "xjustiz.ingest".into(), group: "justizbus.router".into() }).await;
        match described {
            Ok(r) if r.get_ref().partitions.iter().map(|p| p.lag).sum::<u64>() == 0 => break r.into_inner(),
            Ok(_) | Err(_) if started.elapsed() < ARRIVES => tokio::time::sleep(Duration::from_millis(20)).await,
            other => panic!("the router's position did not reach the end: {other:?}"),
        }
    };
    assert_eq!(router.partitions.iter().map(|p| p.committed_offset).sum::<u64>(), 2, "{router:?}");
    let init = pb::SubscribeInit { topic: "xjustiz.ingest".into(), group: "justizbus.router".into(), max_unacked: 1, ..Default::default() };
    let hijack = Subscriber::open(&channel, init).await.err().expect("the router's group is reserved");
    assert_eq!(hijack.code(), tonic::Code::InvalidArgument, "{hijack}");
}

/// The stored range of a mailbox, through the admin API.
async fn mailbox_range(server: &TestServer, participant: &str) -> (u64, u64) {
    let topic = format!("mailbox.{participant}");
    let info = justizbus_e2e::admin(server.channel().await)
        .describe_topic(pb::DescribeTopicRequest { topic })
        .await
        .expect("describe the mailbox")
        .into_inner();
    (info.partition_info[0].start_offset, info.partition_info[0].end_offset)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_deliveries_leave_with_the_mailbox_retention_and_a_mailbox_keeps_its_numbering() {
    if justizbus_e2e::kafka_backend().is_some() {
        eprintln!("skipped on Kafka: the test broker (tansu 0.6) deletes nothing by retention");
        return;
    }
    // Small segments, so a few hundred deliveries fill several; retention checked every 100 ms.
    let config = "[log_settings]\nsegment_bytes = 4096\nmax_event_bytes = 3000\nretention_check_ms = 100\n\n[routing]\nmailbox_retention_ms = 1000\n";
    let mut server = TestServer::start_configured(config, &["--directory", &example_directory().display().to_string()]);
    let channel = server.channel().await;
    let directory = Directory::load(&example_directory()).expect("example directory");
    let court = directory.resolve("court:T6076").expect("in the example").id.clone();
    let event = |id: String, recipient: &str| pb::Event {
        subject: format!("court:F1106|{id}"),
        id,
        r#type: "nachricht.gds.basisnachricht.0005006".into(),
        sender: "court:F1106".into(),
        recipients: vec![recipient.to_string()],
        data: b"{}".to_vec().into(),
        data_content_type: "application/json".into(),
        ..Default::default()
    };
    // Ten deliveries to the court, read and acknowledged.
    for i in 0..10 {
        justizbus_e2e::publish(&channel, "xjustiz.ingest", event(format!("early-{i}"), "court:T6076")).await.expect("publish");
    }
    let mut inbox = Subscriber::simple(&channel, &format!("mailbox.{court}"), "app", 100).await;
    let early = inbox.take(10, ARRIVES).await;
    assert_eq!(early.len(), 10);
    inbox.ack(&early.iter().map(|d| d.delivery_id).collect::<Vec<_>>()).await;
    // Then deliveries to another court fill store segments after them.
    for i in 0..60 {
        justizbus_e2e::publish(&channel, "xjustiz.ingest", event(format!("fill-{i}"), "court:D6265")).await.expect("publish");
    }
    // Once the retention has passed, the court's deliveries leave the store; its mailbox is
    // empty then but keeps its numbering.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    justizbus_e2e::publish(&channel, "xjustiz.ingest", event("fill-last".into(), "court:D6265")).await.expect("publish");
    let started = std::time::Instant::now();
    while mailbox_range(&server, &court).await != (10, 10) {
        assert!(started.elapsed() < ARRIVES, "the court's old deliveries stayed: {:?}", mailbox_range(&server, &court).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = server.process.log();
    assert!(log.contains("mailbox index follows the store's retention"), "{log}");
    // Deliveries reference the ingest topic's records: it keeps everything while routed.
    let ingest_retention = pb::SetRetentionRequest { topic: "xjustiz.ingest".into(), retention_ms: Some(1000), retention_bytes: None };
    let refused = justizbus_e2e::admin(channel.clone()).set_retention(ingest_retention).await.expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    inbox.close().await;

    // Also after kill -9: the mailbox goes on at 10, and its group receives what comes next.
    server.process.kill9();
    server.process.restart().expect("restart after kill -9");
    assert_eq!(mailbox_range(&server, &court).await, (10, 10));
    let channel = server.channel().await;
    justizbus_e2e::publish(&channel, "xjustiz.ingest", event("late-0".into(), "court:T6076")).await.expect("publish");
    let mut inbox = Subscriber::simple(&channel, &format!("mailbox.{court}"), "app", 100).await;
    let late = inbox.take(1, ARRIVES).await;
    let got: Vec<(u64, &str)> = late.iter().map(|d| (d.offset, d.event.as_ref().map_or("", |e| e.id.as_str()))).collect();
    assert_eq!(got, vec![(10, "late-0")]);
    inbox.ack(&[late[0].delivery_id]).await;
    // A group reading from the start of the mailbox finds only what retention kept.
    let mut fresh = Subscriber::simple(&channel, &format!("mailbox.{court}"), "fresh", 100).await;
    let kept = fresh.take(1, ARRIVES).await;
    assert_eq!(kept.iter().map(|d| d.offset).collect::<Vec<_>>(), vec![10]);
    assert!(fresh.next(Duration::from_millis(300)).await.is_none(), "nothing older comes back");
}
