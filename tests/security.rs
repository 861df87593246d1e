//! Identities and authorization end to end (DESIGN.md section 9): a server with mTLS and the
//! example directory, real gRPC clients with certificates made by `justizbus certs`, and an
//! outbound adapter that reads its mailbox over mTLS.

use std::path::{Path, PathBuf};
use std::time::Duration;

use justizbus::routing::directory::{mailbox_topic, Directory};
use justizbus::security::certs::{self, Authority, CertsArgs, Validity};
use justizbus_e2e::{files_below, run_cli, spawn, wait_exit, Subscriber, TestServer, ARRIVES};
use justizbus_proto::v1 as pb;
use justizbus_xjustiz::client::ClientTls;
use tonic::transport::Channel;
use tonic::Code;

fn example_directory() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/directory.toml")
}

/// The participant of the example directory a court code addresses.
fn court(directory: &Directory, code: &str) -> String {
    directory.resolve(&format!("court:{code}")).expect("court in the example directory").id.clone()
}

fn with_role(directory: &Directory, role: &str) -> String {
    let p = directory.participants().iter().find(|p| p.roles.iter().any(|r| format!("{r:?}").eq_ignore_ascii_case(role)));
    p.expect("role in the example directory").id.clone()
}

/// Client TLS settings for participant certificate `name` of `dir`, trusting `ca_dir`'s CA.
fn tls(ca_dir: &Path, dir: &Path, name: &str) -> ClientTls {
    let (cert, key) = certs::paths(dir, name);
    ClientTls { tls_ca: Some(certs::paths(ca_dir, "ca").0), tls_cert: Some(cert), tls_key: Some(key) }
}

/// A channel as clients make it (through the coalescing connector, TLS on top).
async fn channel(server: &TestServer, tls: &ClientTls) -> Channel {
    justizbus_xjustiz::client::connect(&server.url(), tls).expect("channel")
}

fn xjustiz_event(id: &str, sender: &str, recipient: &str) -> pb::Event {
    pb::Event {
        id: id.into(),
        source: "security-test".into(),
        r#type: "nachricht.gds.uebermittlungschriftgutobjekte.0005005".into(),
        subject: format!("case-{id}"),
        sender: sender.into(),
        recipients: vec![recipient.into()],
        data: br#"{"x":1}"#.to_vec().into(),
        data_content_type: "application/json".into(),
        ..Default::default()
    }
}

async fn publish(channel: &Channel, topic: &str, event: pb::Event) -> Result<pb::PublishResponse, tonic::Status> {
    justizbus_e2e::publish(channel, topic, event).await
}

async fn ingest_end(channel: &Channel) -> u64 {
    let info = justizbus_e2e::admin(channel.clone())
        .describe_topic(pb::DescribeTopicRequest { topic: "xjustiz.ingest".into() })
        .await
        .expect("describe ingest")
        .into_inner();
    info.partition_info.iter().map(|p| p.end_offset).sum()
}

/// Waits until the server log holds `needle` at least `times` times (refusals are logged
/// asynchronously, after the client has seen its error).
async fn logged_times(server: &TestServer, needle: &str, times: usize) -> bool {
    for _ in 0..100 {
        if server.process.log().matches(needle).count() >= times {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn logged(server: &TestServer, needle: &str) -> bool {
    logged_times(server, needle, 1).await
}

/// Certificates for the example directory's participants and `extra` ids under `pki`, and a
/// server with mTLS that reads the participants directory `directory`.
fn mtls_server(pki: &Path, directory: &Path, extra: &[&str]) -> TestServer {
    let args = CertsArgs {
        out: pki.to_path_buf(),
        directory: Some(example_directory()),
        participants: extra.iter().map(|id| id.to_string()).collect(),
        hosts: vec!["localhost".into(), "127.0.0.1".into()],
        days: 30,
    };
    certs::run(&args).expect("certs");
    let (server_cert, server_key) = certs::paths(pki, "server");
    let p = |p: &Path| p.display().to_string();
    TestServer::start(&[
        "--directory",
        &p(directory),
        "--tls-cert",
        &p(&server_cert),
        "--tls-key",
        &p(&server_key),
        "--tls-client-ca",
        &p(&certs::paths(pki, "ca").0),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_identities_and_authorization() {
    let directory = Directory::load(&example_directory()).expect("example directory");
    let work = tempfile::tempdir().expect("tempdir");
    let pki = work.path().join("pki");
    // The server reads a copy of the example directory, which the test changes later.
    let live_directory = work.path().join("directory.toml");
    std::fs::copy(example_directory(), &live_directory).expect("copy the directory");
    let server = mtls_server(&pki, &live_directory, &["DE.Justiz.unknown.1"]);
    // A certificate from the right CA that has expired, and one from a CA the server does not know.
    let bayern = court(&directory, "9D0000");
    let ca = Authority::load(&certs::paths(&pki, "ca").0, &certs::paths(&pki, "ca").1).expect("load CA");
    certs::write_issued(&pki, "expired", &ca.participant(&bayern, Validity::expired()).expect("expired cert")).expect("write");
    let foreign = work.path().join("foreign");
    certs::run(&CertsArgs {
        out: foreign.clone(),
        participants: vec![bayern.clone()],
        directory: None,
        hosts: vec!["localhost".into()],
        days: 30,
    })
    .expect("foreign CA");
    let p = |p: PathBuf| p.display().to_string();
    let bw = court(&directory, "9B0000");
    let (auditor, admin_id) = (with_role(&directory, "auditor"), with_role(&directory, "admin"));
    let as_bayern = channel(&server, &tls(&pki, &pki, &bayern)).await;
    let as_bw = channel(&server, &tls(&pki, &pki, &bw)).await;

    // Publishing as oneself is routed; the recipient reads its mailbox and the sender gets the receipt.
    publish(&as_bayern, "xjustiz.ingest", xjustiz_event("ok-1", "court:9D0000", "court:9B0000")).await.expect("own sender accepted");
    let mut inbox = Subscriber::simple(&as_bw, &mailbox_topic(&bw), "inbox", 10).await;
    let d = inbox.next(ARRIVES).await.expect("delivered to the recipient");
    assert_eq!(d.event.as_ref().map(|e| e.id.as_str()), Some("ok-1"));
    inbox.ack(&[d.delivery_id]).await;
    let mut receipts = Subscriber::simple(&as_bayern, &mailbox_topic(&bayern), "inbox", 10).await;
    let r = receipts.next(ARRIVES).await.expect("receipt for the sender");
    assert_eq!(r.event.as_ref().map(|e| e.r#type.as_str()), Some("justizbus.receipt"));

    // A spoofed sender: PERMISSION_DENIED, unary and in a batch, and nothing stored.
    let before = ingest_end(&as_bayern).await;
    let err =
        publish(&as_bayern, "xjustiz.ingest", xjustiz_event("spoof-1", "court:9B0000", "court:9D0000")).await.expect_err("spoofed sender");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(err.message().contains("court:9B0000"), "{err}");
    let batch = vec![
        pb::PublishRequest { topic: "xjustiz.ingest".into(), event: Some(xjustiz_event("b-1", "court:9D0000", "court:9B0000")) },
        pb::PublishRequest { topic: "xjustiz.ingest".into(), event: Some(xjustiz_event("b-2", "other:Testsender", "court:9B0000")) },
    ];
    let err = justizbus_e2e::publisher(as_bayern.clone()).publish_batch(tokio_stream::iter(batch)).await.expect_err("spoofed batch");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    let err = publish(&as_bayern, "xjustiz.ingest", xjustiz_event("nosender", "", "court:9B0000")).await.expect_err("no sender");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert_eq!(ingest_end(&as_bayern).await, before, "refused publishes store nothing");
    assert!(logged(&server, "call refused: permission denied").await);
    assert!(server.process.log().contains(&bayern), "the refusal names the participant");

    // Reading another participant's mailbox.
    let init = pb::SubscribeInit { topic: mailbox_topic(&bw), group: "peek".into(), max_unacked: 1, ..Default::default() };
    let err = Subscriber::open(&as_bayern, init).await.err().expect("foreign mailbox refused");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");

    // Replay and admin calls need roles.
    let replay = |ch: &Channel| {
        let mut client = pb::replayer_client::ReplayerClient::new(ch.clone());
        async move { client.replay(pb::ReplayRequest { topic: "xjustiz.ingest".into(), ..Default::default() }).await.map(|_| ()) }
    };
    assert_eq!(replay(&as_bayern).await.expect_err("replay without role").code(), Code::PermissionDenied);
    let as_auditor = channel(&server, &tls(&pki, &pki, &auditor)).await;
    replay(&as_auditor).await.expect("the auditor replays");
    // The audit calls, too: exports and trails for auditors and admins only.
    let export = |ch: &Channel| {
        let mut client = pb::auditor_client::AuditorClient::new(ch.clone());
        async move {
            let request = pb::ExportRequest { topic: "xjustiz.ingest".into(), partition: 0, ..Default::default() };
            client.export(request).await.map(|_| ())
        }
    };
    assert_eq!(export(&as_bayern).await.expect_err("export without role").code(), Code::PermissionDenied);
    export(&as_auditor).await.expect("the auditor exports");
    let mut auditor_calls = pb::auditor_client::AuditorClient::new(as_bayern.clone());
    let trail = auditor_calls.trail(pb::TrailRequest { event_id: "x".into(), since: None }).await;
    assert_eq!(trail.expect_err("trail without role").code(), Code::PermissionDenied);
    let topics = auditor_calls.topics(pb::ListTopicsRequest {}).await;
    assert_eq!(topics.expect_err("audit topics without role").code(), Code::PermissionDenied);
    let mut admin = justizbus_e2e::admin(as_bayern.clone());
    assert_eq!(admin.list_topics(pb::ListTopicsRequest {}).await.expect_err("list without role").code(), Code::PermissionDenied);
    let create = pb::CreateTopicRequest { topic: "made-by".into(), partitions: 1, ..Default::default() };
    let mut auditor_admin = justizbus_e2e::admin(as_auditor.clone());
    auditor_admin.list_topics(pb::ListTopicsRequest {}).await.expect("the auditor lists");
    assert_eq!(auditor_admin.create_topic(create.clone()).await.expect_err("auditor creates").code(), Code::PermissionDenied);
    let retention = pb::SetRetentionRequest { topic: "xjustiz.ingest".into(), retention_ms: Some(1), retention_bytes: None };
    let refused = auditor_admin.set_retention(retention).await.expect_err("auditor changes retention");
    assert_eq!(refused.code(), Code::PermissionDenied);
    let as_admin = channel(&server, &tls(&pki, &pki, &admin_id)).await;
    justizbus_e2e::admin(as_admin).create_topic(create).await.expect("the admin creates");

    // A certificate for an id the directory does not know: UNAUTHENTICATED.
    let stranger = channel(&server, &tls(&pki, &pki, "DE.Justiz.unknown.1")).await;
    let err = publish(&stranger, "xjustiz.ingest", xjustiz_event("x", "court:9D0000", "court:9B0000")).await.expect_err("unknown id");
    assert_eq!(err.code(), Code::Unauthenticated, "{err}");

    // Expired, foreign-CA and missing client certificates never get past the handshake.
    let expired = channel(&server, &tls(&pki, &pki, "expired")).await;
    let err = publish(&expired, "xjustiz.ingest", xjustiz_event("x", "court:9D0000", "court:9B0000")).await.expect_err("expired cert");
    // No HTTP/2 connection comes about, so there is no gRPC status from the server: the
    // client sees a transport error (the alert, a broken pipe or a cancelled call, depending
    // on timing), and the server's log says why.
    assert!(!matches!(err.code(), Code::PermissionDenied | Code::Unauthenticated | Code::Ok), "{err:?}");
    assert!(logged(&server, "certificate expired").await, "the expired certificate's refusal is logged:\n{}", server.process.log());
    let foreign_ch = channel(&server, &tls(&pki, &foreign, &bayern)).await;
    let err = publish(&foreign_ch, "xjustiz.ingest", xjustiz_event("x", "court:9D0000", "court:9B0000")).await.expect_err("foreign CA");
    assert!(!matches!(err.code(), Code::PermissionDenied | Code::Unauthenticated | Code::Ok), "{err:?}");
    assert!(logged(&server, "UnknownIssuer").await, "the foreign certificate's refusal is logged:\n{}", server.process.log());
    let anonymous = channel(&server, &ClientTls { tls_ca: Some(certs::paths(&pki, "ca").0), ..Default::default() }).await;
    assert!(publish(&anonymous, "xjustiz.ingest", xjustiz_event("x", "court:9D0000", "court:9B0000")).await.is_err());
    let plain = channel(&server, &ClientTls::default()).await;
    assert!(
        publish(&plain, "xjustiz.ingest", xjustiz_event("x", "court:9D0000", "court:9B0000")).await.is_err(),
        "plain HTTP/2 is refused"
    );
    assert!(logged_times(&server, "TLS connection refused", 4).await, "{}", server.process.log());

    // The outbound adapter reads its own mailbox over mTLS (the delivery acknowledged above is
    // gone; a second one arrives).
    publish(&as_bayern, "xjustiz.ingest", xjustiz_event("ok-2", "court:9D0000", "court:9B0000")).await.expect("second event");
    inbox.close().await;
    let out = work.path().join("bw-inbox");
    let (cert, key) = certs::paths(&pki, &bw);
    let args: Vec<String> = [
        "adapter",
        "outbound",
        "--server",
        &server.url(),
        "--participant",
        &bw,
        "--group",
        "inbox",
        "--out",
        &p(out.clone()),
        "--max",
        "1",
        "--tls-ca",
        &p(certs::paths(&pki, "ca").0),
        "--tls-cert",
        &p(cert),
        "--tls-key",
        &p(key),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut adapter = spawn(&args);
    assert!(wait_exit(&mut adapter, Duration::from_secs(60)).success(), "the outbound adapter delivers over mTLS");
    assert!(files_below(&out).keys().any(|k| k.ends_with("justizbus-event.json")), "{:?}", files_below(&out).keys());

    // A participant removed from the directory is shut out while the server runs.
    let text = std::fs::read_to_string(&live_directory).expect("directory");
    let kept: Vec<&str> = text.split("[[participant]]").filter(|block| !block.contains(&bayern)).collect();
    std::fs::write(&live_directory, kept.join("[[participant]]")).expect("rewrite the directory");
    let mut shut_out = None;
    for _ in 0..100 {
        match publish(&as_bayern, "xjustiz.ingest", xjustiz_event("after-removal", "court:9D0000", "court:9B0000")).await {
            Err(e) if e.code() == Code::Unauthenticated => {
                shut_out = Some(e);
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(shut_out.is_some(), "a removed participant must be refused once the directory is reloaded");
}

#[test]
fn without_tls_the_server_refuses_to_listen_beyond_loopback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let out = run_cli(
        &["serve", "--listen", "0.0.0.0:0", "--data-dir", &data.display().to_string()].iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        None,
    );
    assert!(!out.ok, "serve must fail");
    assert!(out.stderr.contains("loopback"), "{}", out.stderr);
    assert!(!data.exists(), "nothing is created");
}

/// The example directory, a temporary directory (kept while the guard lives) with certificates
/// for its participants under `pki`, and a server with mTLS on it.
fn example_mtls_server() -> (Directory, tempfile::TempDir, PathBuf, TestServer) {
    let directory = Directory::load(&example_directory()).expect("example directory");
    let work = tempfile::tempdir().expect("tempdir");
    let pki = work.path().join("pki");
    let server = mtls_server(&pki, &example_directory(), &[]);
    (directory, work, pki, server)
}

/// Downloads a blob; the status when refused.
async fn download(channel: &Channel, sha256: &str) -> Result<Vec<u8>, tonic::Status> {
    let mut blobs = pb::blobs_client::BlobsClient::new(channel.clone());
    let mut stream = blobs.download(pb::DownloadRequest { sha256: sha256.into() }).await?.into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await? {
        out.extend_from_slice(&chunk.chunk);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_is_read_by_its_uploader_the_recipients_of_its_events_and_auditors_only() {
    let (directory, _work, pki, server) = example_mtls_server();
    let (bayern, bw, bund) = (court(&directory, "9D0000"), court(&directory, "9B0000"), court(&directory, "9A0000"));
    let as_bayern = channel(&server, &tls(&pki, &pki, &bayern)).await;
    let as_bw = channel(&server, &tls(&pki, &pki, &bw)).await;
    let as_bund = channel(&server, &tls(&pki, &pki, &bund)).await;
    let as_auditor = channel(&server, &tls(&pki, &pki, &with_role(&directory, "auditor"))).await;

    let content = b"Schriftsatz vom 26.11.2026, Anlage K1".to_vec();
    let attachment = justizbus_xjustiz::client::upload(&as_bayern, "anlage-k1.txt", "text/plain", content.clone()).await.expect("upload");
    assert_eq!(download(&as_bayern, &attachment.sha256).await.expect("the uploader reads it"), content);
    // Knowing the hash is not enough: not to read it, nor to attach it to an event of one's own
    // (whose recipients would be let in).
    for ch in [&as_bw, &as_bund] {
        assert_eq!(download(ch, &attachment.sha256).await.expect_err("not granted").code(), Code::PermissionDenied);
        let stat = pb::blobs_client::BlobsClient::new(ch.clone()).stat(pb::DownloadRequest { sha256: attachment.sha256.clone() }).await;
        assert_eq!(stat.expect_err("not granted").code(), Code::PermissionDenied);
    }
    let mut stolen = xjustiz_event("steal-1", "court:9A0000", "court:9A0000");
    stolen.attachments = vec![attachment.clone()];
    let err = publish(&as_bund, "xjustiz.ingest", stolen).await.expect_err("attaching a blob one may not read");
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    // A blob nobody stored is refused alike: a refusal tells nothing about what is stored.
    assert_eq!(download(&as_bund, &"0".repeat(64)).await.expect_err("unknown").code(), Code::PermissionDenied);
    assert_eq!(download(&as_bund, "not-a-hash").await.expect_err("bad input").code(), Code::InvalidArgument);

    // Sent to Baden-Württemberg, the document is BW's to read once it is delivered.
    let mut event = xjustiz_event("with-doc-1", "court:9D0000", "court:9B0000");
    event.attachments = vec![attachment.clone()];
    publish(&as_bayern, "xjustiz.ingest", event).await.expect("the uploader attaches it");
    let mut inbox = Subscriber::simple(&as_bw, &mailbox_topic(&bw), "inbox", 10).await;
    let delivered = inbox.next(ARRIVES).await.expect("delivered");
    assert_eq!(delivered.event.as_ref().map(|e| e.attachments.clone()), Some(vec![attachment.clone()]));
    assert_eq!(download(&as_bw, &attachment.sha256).await.expect("the recipient reads it"), content);
    assert_eq!(download(&as_auditor, &attachment.sha256).await.expect("an auditor reads every blob"), content);
    assert_eq!(download(&as_bund, &attachment.sha256).await.expect_err("still not granted").code(), Code::PermissionDenied);
    assert!(logged(&server, "may read only blobs it uploaded or that came with its deliveries").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_runs_its_own_mailbox_groups_and_reads_their_dead_letters_but_no_others() {
    let (directory, _work, pki, server) = example_mtls_server();
    let (bayern, bw) = (court(&directory, "9D0000"), court(&directory, "9B0000"));
    let as_bayern = channel(&server, &tls(&pki, &pki, &bayern)).await;
    let as_bw = channel(&server, &tls(&pki, &pki, &bw)).await;
    publish(&as_bayern, "xjustiz.ingest", xjustiz_event("poison-1", "court:9D0000", "court:9B0000")).await.expect("publish");
    // BW's application gives up on the delivery: after one attempt it is a dead letter.
    let init = pb::SubscribeInit { topic: mailbox_topic(&bw), group: "app".into(), max_unacked: 1, max_attempts: 1, ..Default::default() };
    let mut app = Subscriber::open(&as_bw, init).await.expect("own mailbox");
    let d = app.next(ARRIVES).await.expect("delivered");
    app.nack(&[d.delivery_id]).await;
    let dead_letters = format!("{}.app.dlq", mailbox_topic(&bw));
    let mut dlq = Subscriber::simple(&as_bw, &dead_letters, "review", 10).await;
    let dead = dlq.next(ARRIVES).await.expect("the dead letter, to its mailbox's owner");
    assert_eq!(dead.event.as_ref().map(|e| e.id.as_str()), Some("poison-1"));
    // The owner runs its mailbox's groups: describes them, lists dead letters and quarantined
    // cases, and lets a case flow on; another participant may do none of it.
    let (topic, group) = (mailbox_topic(&bw), "app".to_string());
    let (mut bw_admin, mut bayern_admin) = (justizbus_e2e::admin(as_bw.clone()), justizbus_e2e::admin(as_bayern.clone()));
    // The case is quarantined just after its dead letter is stored.
    let started = std::time::Instant::now();
    loop {
        let described = bw_admin.describe_group(pb::DescribeGroupRequest { topic: topic.clone(), group: group.clone() }).await;
        if described.expect("own group").get_ref().quarantined_keys == 1 {
            break;
        }
        assert!(started.elapsed() < ARRIVES, "the case was not quarantined");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listed = pb::ListDeadLettersRequest { topic: topic.clone(), group: group.clone(), max: 10 };
    assert_eq!(bw_admin.list_dead_letters(listed.clone()).await.expect("own dead letters").get_ref().records.len(), 1);
    let quarantine = pb::ListQuarantineRequest { topic: topic.clone(), group: group.clone() };
    let keys = bw_admin.list_quarantine(quarantine.clone()).await.expect("own quarantine").into_inner().keys;
    assert_eq!(keys.len(), 1);
    let skip = pb::QuarantineActionRequest { topic: topic.clone(), group: group.clone(), key: keys[0].key.clone() };
    let denied = [
        bayern_admin.describe_group(pb::DescribeGroupRequest { topic: topic.clone(), group: group.clone() }).await.map(|_| ()),
        bayern_admin.list_dead_letters(listed).await.map(|_| ()),
        bayern_admin.list_quarantine(quarantine).await.map(|_| ()),
        bayern_admin.skip_quarantine(skip.clone()).await.map(|_| ()),
    ];
    for refused in denied {
        assert_eq!(refused.expect_err("not its mailbox").code(), Code::PermissionDenied);
    }
    bw_admin.skip_quarantine(skip).await.expect("the owner lets the case flow on");
    // Nobody else's: neither another participant's dead letters nor a topic shaped like them.
    for topic in [dead_letters.clone(), format!("{}.app.dlq", mailbox_topic(&bayern)).replace(&bayern, &format!("{bayern}x"))] {
        let init = pb::SubscribeInit { topic, group: "peek".into(), max_unacked: 1, ..Default::default() };
        let err = Subscriber::open(&as_bayern, init).await.err().expect("refused");
        assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    }
}

/// End offsets of the bus's own topics the embedded log and Kafka both show.
async fn reserved_ends(admin: &Channel) -> Vec<Vec<u64>> {
    let mut ends = Vec::new();
    for topic in ["justizbus.mailboxes", "justizbus.audit"] {
        let info = justizbus_e2e::admin(admin.clone()).describe_topic(pb::DescribeTopicRequest { topic: topic.into() }).await;
        ends.push(info.expect(topic).into_inner().partition_info.iter().map(|p| p.end_offset).collect());
    }
    ends
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_s_own_topics_take_nothing_from_clients() {
    let (directory, _work, pki, mut server) = example_mtls_server();
    let (bayern, bw) = (court(&directory, "9D0000"), court(&directory, "9B0000"));
    let as_bayern = channel(&server, &tls(&pki, &pki, &bayern)).await;
    let as_admin = channel(&server, &tls(&pki, &pki, &with_role(&directory, "admin"))).await;
    publish(&as_bayern, "xjustiz.ingest", xjustiz_event("first-1", "court:9D0000", "court:9B0000")).await.expect("publish");
    let mut inbox = Subscriber::simple(&channel(&server, &tls(&pki, &pki, &bw)).await, &mailbox_topic(&bw), "inbox", 10).await;
    let first = inbox.next(ARRIVES).await.expect("routed");
    inbox.ack(&[first.delivery_id]).await;
    inbox.close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (before, ingest_before) = (reserved_ends(&as_admin).await, ingest_end(&as_admin).await);

    // The mailbox store (an event there would stop the next start), the journal (it would
    // forge the audit trail) and, on Kafka, the bus's state topic (it would forge positions and
    // blob grants): refused to every client, an admin too.
    for ch in [&as_bayern, &as_admin] {
        for topic in ["justizbus.mailboxes", "justizbus.audit", "__justizbus_state"] {
            let err = publish(ch, topic, xjustiz_event("forged-1", "court:9D0000", "court:9B0000")).await.expect_err(topic);
            assert_eq!(err.code(), Code::InvalidArgument, "{topic}: {err}");
            assert!(err.message().contains("reserved"), "{topic}: {err}");
        }
    }
    let batch = vec![
        pb::PublishRequest { topic: "xjustiz.ingest".into(), event: Some(xjustiz_event("batch-1", "court:9D0000", "court:9B0000")) },
        pb::PublishRequest { topic: "justizbus.audit".into(), event: Some(xjustiz_event("batch-2", "court:9D0000", "court:9B0000")) },
    ];
    let err = justizbus_e2e::publisher(as_bayern.clone()).publish_batch(tokio_stream::iter(batch)).await.expect_err("batch");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("events[1].topic"), "{err}");
    let mut admin = justizbus_e2e::admin(as_admin.clone());
    for topic in ["justizbus.extra", "__extra"] {
        let err = admin.create_topic(pb::CreateTopicRequest { topic: topic.into(), partitions: 1, ..Default::default() }).await;
        assert_eq!(err.expect_err(topic).code(), Code::InvalidArgument);
    }
    let shorten = pb::SetRetentionRequest { topic: "justizbus.audit".into(), retention_ms: Some(1000), retention_bytes: None };
    assert_eq!(admin.set_retention(shorten).await.expect_err("the journal's retention").code(), Code::InvalidArgument);
    assert_eq!(reserved_ends(&as_admin).await, before, "nothing stored in the bus's own topics");
    assert_eq!(ingest_end(&as_admin).await, ingest_before, "nothing of the refused batch stored");

    // It starts again and routes as before.
    server.process.stop().expect("stop");
    server.process.restart().expect("the server starts again");
    let as_bayern = channel(&server, &tls(&pki, &pki, &bayern)).await;
    publish(&as_bayern, "xjustiz.ingest", xjustiz_event("after-1", "court:9D0000", "court:9B0000")).await.expect("publish");
    let mut inbox = Subscriber::simple(&channel(&server, &tls(&pki, &pki, &bw)).await, &mailbox_topic(&bw), "inbox", 10).await;
    let after = inbox.next(ARRIVES).await.expect("routed after the restart");
    assert_eq!(after.event.as_ref().map(|e| e.id.as_str()), Some("after-1"));
}
