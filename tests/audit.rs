//! Audit end to end: a real server signs checkpoints; `audit verify` finds and names every kind
//! of tampering with the stored files; exports prove a range to an auditor without the bus;
//! the journal tells the life of an event.

use std::path::{Path, PathBuf};
use std::time::Duration;

use justizbus::audit::chain::{ChainHash, GENESIS};
use justizbus::log::embedded::format;
use justizbus::log::NewRecord;
use justizbus_e2e::{copy_dir, event, kafka_backend, publish, publisher, run_cli, Subscriber, TestServer};
use justizbus_proto::v1 as pb;

/// A server that signs checkpoints with a fresh key; returns it with the key file and its
/// public key.
fn signing_server(dir: &Path) -> (TestServer, PathBuf, String) {
    signing_server_every(dir, 100, 200)
}

/// [`signing_server`] with checkpoints every `records` records or `interval_ms`.
fn signing_server_every(dir: &Path, records: u64, interval_ms: u64) -> (TestServer, PathBuf, String) {
    let key = dir.join("signing.pem");
    let made = run_cli(&["audit".into(), "keygen".into(), "--out".into(), key.display().to_string()], None);
    assert!(made.ok, "{}", made.stderr);
    let public = made.json_lines()[0]["public_key"].as_str().expect("public key").to_string();
    let config =
        format!("[audit]\nsigning_key = \"{}\"\ncheckpoint_records = {records}\ncheckpoint_interval_ms = {interval_ms}\n", key.display());
    (TestServer::start_configured(&config, &[]), key, public)
}

/// Publishes `n` events to partition 0 of a one-partition topic, in batches of 25.
async fn fill(server: &TestServer, topic: &str, n: usize) {
    fill_from(server, topic, 0, n).await;
}

/// Publishes events `first..first + n` (creating the topic with the first ones).
async fn fill_from(server: &TestServer, topic: &str, first: usize, n: usize) {
    if first == 0 {
        server.create_topic(topic, 1).await;
    }
    let channel = server.channel().await;
    for chunk in (first..first + n).collect::<Vec<_>>().chunks(25) {
        let requests: Vec<pb::PublishRequest> = chunk
            .iter()
            .map(|i| pb::PublishRequest {
                topic: topic.into(),
                event: Some(event(&format!("evt-{i:05}"), &format!("case-{}", i % 7), &format!("{{\"marker\":\"payload-{i:05}\"}}"))),
            })
            .collect();
        publisher(channel.clone()).publish_batch(tokio_stream::iter(requests)).await.expect("publish batch");
    }
}

fn verify(data_dir: &Path, key: &str) -> (bool, serde_json::Value) {
    let out = run_cli(
        &[
            "audit".into(),
            "verify".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--key".into(),
            key.into(),
            "--json".into(),
        ],
        None,
    );
    let report: serde_json::Value =
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| panic!("report: {e}: {}{}", out.stdout, out.stderr));
    (out.ok, report)
}

/// The first finding of the partition of `topic`: (offset, what).
fn first_finding(report: &serde_json::Value, topic: &str) -> (u64, String) {
    let p = report["partitions"].as_array().expect("partitions").iter().find(|p| p["topic"] == topic).expect("partition reported");
    let f = &p["findings"][0];
    (f["offset"].as_u64().unwrap_or_else(|| panic!("no finding: {p}")), f["what"].as_str().unwrap_or_default().to_string())
}

/// The single segment file of partition 0.
fn segment(data_dir: &Path, topic: &str) -> PathBuf {
    let dir = data_dir.join("log").join(topic).join("0");
    let mut logs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("list")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    assert_eq!(logs.len(), 1);
    logs.remove(0)
}

/// A stored record as an attacker who rewrites the file sees it.
#[derive(Clone)]
struct Rec {
    record: NewRecord,
    chain: ChainHash,
}

fn read_records(path: &Path) -> Vec<Rec> {
    let bytes = std::fs::read(path).expect("read segment");
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let h = format::decode_header(&bytes[pos..]).expect("header");
        for r in format::records(&h, &bytes[pos..pos + h.total_len as usize]) {
            let r = r.expect("record");
            let record = NewRecord {
                id: String::from_utf8(r.id.to_vec()).expect("id"),
                key: r.key.to_vec().into(),
                timestamp_ms: r.timestamp_ms,
                value: r.value.to_vec().into(),
            };
            out.push(Rec { record, chain: r.chain });
        }
        pos += h.total_len as usize;
    }
    out
}

/// Rewrites the segment with well-formed batches of 10 records (valid CRCs), offsets from 0,
/// each batch header carrying the stored chain value of the record before it.
fn write_records(path: &Path, recs: &[Rec]) {
    let mut out = Vec::new();
    for (i, batch) in recs.chunks(10).enumerate() {
        let base = (i * 10) as u64;
        let before = if i == 0 { GENESIS } else { recs[i * 10 - 1].chain };
        format::write_batch(&mut out, base, &before, batch.iter().map(|r| (&r.record, &r.chain)));
    }
    std::fs::write(path, out).expect("write segment");
}

#[tokio::test]
async fn verify_names_the_offset_of_every_kind_of_tampering() {
    if kafka_backend().is_some() {
        return; // offline verification reads the embedded log's files
    }
    let work = tempfile::tempdir().expect("tempdir");
    let (mut server, _, key) = signing_server(work.path());
    let data = server.dir.path().join("data");
    // A hundred records at a time, each hundred signed before the next: three checkpoints
    // whatever the pace of publishing.
    for hundred in 1..=3u64 {
        fill_from(&server, "court", (hundred as usize - 1) * 100, 100).await;
        let file = data.join("log").join("court").join("0").join(justizbus::audit::checkpoint::CHECKPOINT_FILE);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !std::fs::read_to_string(&file).unwrap_or_default().lines().any(|l| l.contains(&format!("\"offset\":{}", hundred * 100 - 1)))
        {
            assert!(std::time::Instant::now() < deadline, "no checkpoint at {}", hundred * 100 - 1);
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    server.process.stop().expect("graceful stop signs the tail");
    let (ok, report) = verify(&data, &key);
    assert!(ok, "an untouched log verifies: {report}");
    let court = report["partitions"].as_array().expect("partitions").iter().find(|p| p["topic"] == "court").expect("court").clone();
    assert_eq!(court["records"], 300);
    assert_eq!(court["signed_through"], 299, "{court}");
    assert!(court["checkpoints_checked"].as_u64().expect("count") >= 3, "every 100 records: {court}");

    // Another key does not verify the same log.
    let other = tempfile::tempdir().expect("tempdir");
    let made = run_cli(&["audit".into(), "keygen".into(), "--out".into(), other.path().join("k.pem").display().to_string()], None);
    let other_key = made.json_lines()[0]["public_key"].as_str().expect("key").to_string();
    assert!(!verify(&data, &other_key).0);

    let case = |name: &str, tamper: &dyn Fn(&Path)| -> (u64, String) {
        let copy = work.path().join(name);
        copy_dir(&data, &copy);
        tamper(&copy);
        let (ok, report) = verify(&copy, &key);
        assert!(!ok, "{name}: verification must fail: {report}");
        first_finding(&report, "court")
    };

    // One flipped byte inside the payload of record 123 (the CRC no longer matches either).
    let (at, what) = case("flip", &|d| {
        let path = segment(d, "court");
        let mut bytes = std::fs::read(&path).expect("read");
        let marker = b"payload-00123";
        let pos = bytes.windows(marker.len()).position(|w| w == marker).expect("marker");
        bytes[pos + marker.len() - 1] ^= 0x01;
        std::fs::write(&path, bytes).expect("write");
    });
    assert_eq!(at, 123, "{what}");

    // The re-encoding itself is faithful: an unchanged rewrite verifies.
    let same = work.path().join("same");
    copy_dir(&data, &same);
    let path = segment(&same, "court");
    write_records(&path, &read_records(&path));
    assert!(verify(&same, &key).0, "rewriting unchanged records keeps the log valid");

    // Record 57 removed and the later ones renumbered, with valid CRCs.
    let (at, what) = case("delete", &|d| {
        let path = segment(d, "court");
        let mut recs = read_records(&path);
        recs.remove(57);
        write_records(&path, &recs);
    });
    assert_eq!(at, 57, "{what}");

    // An interrupted append (half a batch at the end) is what a crash leaves: not a failure.
    let torn = work.path().join("torn");
    copy_dir(&data, &torn);
    let path = segment(&torn, "court");
    let bytes = std::fs::read(&path).expect("read");
    let mut longer = bytes.clone();
    longer.extend_from_slice(&bytes[..100]);
    std::fs::write(&path, longer).expect("write");
    let (ok, report) = verify(&torn, &key);
    assert!(ok, "a torn tail is not tampering: {report}");
    assert!(report["partitions"].to_string().contains("torn tail"), "{report}");

    // Records 80 and 81 swapped.
    let (at, what) = case("swap", &|d| {
        let path = segment(d, "court");
        let mut recs = read_records(&path);
        recs.swap(80, 81);
        write_records(&path, &recs);
    });
    assert_eq!(at, 80, "{what}");

    // The last 15 records cut off at a batch boundary: only the signed checkpoint can tell.
    let (at, what) = case("truncate", &|d| {
        let path = segment(d, "court");
        let mut recs = read_records(&path);
        recs.truncate(285);
        write_records(&path, &recs);
    });
    assert_eq!(at, 285, "{what}");
    assert!(what.contains("truncated"), "{what}");

    // A record altered and every chain value after it recomputed: the next checkpoint (signed
    // every 100 records) catches it.
    let (at, what) = case("forged-chain", &|d| {
        let path = segment(d, "court");
        let mut recs = read_records(&path);
        recs[140].record.value = b"{\"marker\":\"forged\"}".to_vec().into();
        let mut h = GENESIS;
        for (i, r) in recs.iter_mut().enumerate() {
            h = justizbus::audit::chain::next(&h, i as u64, r.record.timestamp_ms, r.record.id.as_bytes(), &r.record.key, &r.record.value);
            r.chain = h;
        }
        write_records(&path, &recs);
    });
    assert!((140..300).contains(&at), "a checkpoint after the forged record names it: {at} {what}");
    assert!(what.contains("checkpoint"), "{what}");

    // The last checkpoint replaced by one signed with another key.
    let (at, what) = case("checkpoint", &|d| {
        let file = d.join("log/court/0/checkpoints.jsonl");
        let text = std::fs::read_to_string(&file).expect("checkpoints");
        let mut lines: Vec<String> = text.lines().map(String::from).collect();
        let last: serde_json::Value = serde_json::from_str(lines.last().expect("a checkpoint")).expect("json");
        let forger = justizbus::audit::checkpoint::Signer::generate(&d.join("forger.pem")).expect("key");
        let chain = justizbus::audit::chain::unhex::<32>(last["chain"].as_str().expect("chain")).expect("hex");
        let forged = forger.sign("court", 0, last["offset"].as_u64().expect("offset"), &chain, last["time_ms"].as_i64().expect("time"));
        *lines.last_mut().expect("last") = serde_json::to_string(&forged).expect("json");
        std::fs::write(&file, lines.join("\n") + "\n").expect("write");
    });
    assert_eq!(at, 299, "{what}");
    assert!(what.contains("signature"), "{what}");
}

#[tokio::test]
async fn an_export_proves_its_range_and_an_edited_export_fails() {
    let work = tempfile::tempdir().expect("tempdir");
    let (server, key_file, key) = signing_server(work.path());
    fill(&server, "filings", 120).await;
    let export = work.path().join("export.jsonl");
    let e = export.display().to_string();
    let out = server.cli(&[
        "replay",
        "--topic",
        "filings",
        "--partition",
        "0",
        "--from-offset",
        "40",
        "--to-offset",
        "60",
        "--with-proof",
        "--output",
        &e,
    ]);
    assert!(out.ok, "{}", out.stderr);
    let text = std::fs::read_to_string(&export).expect("export");
    assert_eq!(text.lines().filter(|l| l.starts_with("{\"record\"")).count(), 20);
    let check = run_cli(&["audit".into(), "check-export".into(), e.clone(), "--key".into(), key.clone()], None);
    assert!(check.ok, "{}{}", check.stdout, check.stderr);

    // The key as printed by the server and from the key file are the same.
    let from_server = server.cli(&["audit", "key"]);
    assert_eq!(from_server.stdout.trim(), key, "{}", from_server.stderr);
    let from_file = run_cli(&["audit".into(), "key".into(), "--signing-key".into(), key_file.display().to_string()], None);
    assert_eq!(from_file.stdout.trim(), key);

    // One event's payload edited.
    let edited: Vec<String> = text
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("json");
            if v["record"]["offset"] == 47 {
                v["record"]["value_base64"] = serde_json::Value::String("ZWRpdGVk".into());
            }
            serde_json::to_string(&v).expect("json")
        })
        .collect();
    let bad = work.path().join("edited.jsonl");
    std::fs::write(&bad, edited.join("\n")).expect("write");
    let check =
        run_cli(&["audit".into(), "check-export".into(), bad.display().to_string(), "--key".into(), key.clone(), "--json".into()], None);
    assert!(!check.ok, "an edited export must fail");
    let report: serde_json::Value = serde_json::from_str(check.stdout.trim()).expect("report");
    assert_eq!(report["findings"][0]["offset"], 47, "{report}");

    // A record dropped from the export.
    let dropped: Vec<&str> = text.lines().filter(|l| !l.contains("\"offset\":52,")).collect();
    std::fs::write(&bad, dropped.join("\n")).expect("write");
    let check =
        run_cli(&["audit".into(), "check-export".into(), bad.display().to_string(), "--key".into(), key.clone(), "--json".into()], None);
    assert!(!check.ok);

    // Online verification through the server, with the trusted key only.
    let online = server.cli(&["audit", "verify", "--key", &key, "--json"]);
    assert!(online.ok, "{}{}", online.stdout, online.stderr);
    let report: serde_json::Value = serde_json::from_str(online.stdout.trim()).expect("report");
    let filings = report["partitions"].as_array().expect("partitions").iter().find(|p| p["topic"] == "filings").expect("filings").clone();
    assert_eq!(filings["records"], 120, "{filings}");
    assert!(filings["signed_through"].as_u64().is_some(), "{filings}");
}

#[tokio::test]
async fn the_trail_tells_the_life_of_an_event() {
    let server = TestServer::start(&[]);
    server.create_topic("letters", 2).await;
    let channel = server.channel().await;
    publish(&channel, "letters", event("trail-1", "case-9", "{}")).await.expect("publish");
    let mut sub = Subscriber::simple(&channel, "letters", "court", 10).await;
    let first = sub.next(Duration::from_secs(10)).await.expect("first delivery");
    sub.nack(&[first.delivery_id]).await;
    let second = sub.next(Duration::from_secs(20)).await.expect("redelivery");
    assert_eq!(second.attempt, 2);
    sub.ack(&[second.delivery_id]).await;
    sub.close().await;

    let mut kinds = Vec::new();
    for _ in 0..100 {
        let out = server.cli(&["audit", "trail", "--event", "trail-1", "--json"]);
        kinds = out.json_lines().iter().map(|l| l["kind"].as_str().unwrap_or_default().to_string()).collect();
        if kinds.iter().any(|k| k == "acknowledged") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(kinds, ["published", "delivered", "nacked", "delivered", "acknowledged"]);
    let out = server.cli(&["audit", "trail", "--event", "trail-1", "--json"]);
    let lines = out.json_lines();
    assert_eq!(lines[3]["attempt"], 2);
    assert_eq!(lines[1]["group"], "court");
    assert!(!server.cli(&["audit", "trail", "--event", "never-published"]).ok);
    // From a time on: everything since the start, nothing since a time to come.
    let all = server.cli(&["audit", "trail", "--event", "trail-1", "--since", "0", "--json"]);
    assert_eq!(all.json_lines().len(), 5, "{}", all.stderr);
    assert!(!server.cli(&["audit", "trail", "--event", "trail-1", "--since", "2999-01-01T00:00:00Z"]).ok);

    // A poison event: dead-lettered after its only attempt, then skipped by an admin.
    publish(&channel, "letters", event("trail-2", "case-poison", "{}")).await.expect("publish");
    let init =
        pb::SubscribeInit { topic: "letters".into(), group: "strict".into(), max_unacked: 10, max_attempts: 1, ..Default::default() };
    let mut strict = Subscriber::open(&channel, init).await.expect("subscribe");
    let poison = strict.take(2, Duration::from_secs(10)).await.into_iter().find(|d| d.event.as_ref().is_some_and(|e| e.id == "trail-2"));
    let poison = poison.expect("the poison event is delivered");
    strict.nack(&[poison.delivery_id]).await;
    let mut skipped = false;
    for _ in 0..100 {
        if server.cli(&["quarantine", "skip", "--topic", "letters", "--group", "strict", "--key", "case-poison"]).ok {
            skipped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(skipped, "the key was quarantined and could be skipped");
    strict.close().await;
    for _ in 0..100 {
        let out = server.cli(&["audit", "trail", "--event", "trail-2", "--json"]);
        let lines = out.json_lines();
        let strict_kinds: Vec<&str> = lines
            .iter()
            .filter(|l| l["group"] == "strict" || l["kind"] == "published")
            .map(|l| l["kind"].as_str().unwrap_or_default())
            .collect();
        if strict_kinds.contains(&"quarantine_skipped") {
            assert_eq!(strict_kinds, ["published", "delivered", "nacked", "dead_lettered", "quarantine_skipped"]);
            let text = server.cli(&["audit", "trail", "--event", "trail-2"]);
            assert!(text.stdout.contains("dead_lettered") && text.stdout.contains("letters.strict.dlq"), "{}", text.stdout);
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the poison event's trail never showed the skip");
}

#[tokio::test]
async fn a_log_killed_while_publishing_and_signing_still_verifies() {
    if kafka_backend().is_some() {
        return; // offline verification reads the embedded log's files
    }
    let work = tempfile::tempdir().expect("tempdir");
    let (mut server, _, key) = signing_server(work.path());
    server.create_topic("filings", 2).await;
    let mut acked = 0usize;
    for round in 0..4u64 {
        let channel = server.channel().await;
        let publishing = tokio::spawn(async move {
            let mut done = 0usize;
            for b in 0u64.. {
                let requests: Vec<pb::PublishRequest> = (0..20)
                    .map(|i| pb::PublishRequest {
                        topic: "filings".into(),
                        event: Some(event(&format!("r{round}-b{b}-{i}"), &format!("case-{}", i % 5), "{\"x\":1}")),
                    })
                    .collect();
                match publisher(channel.clone()).publish_batch(tokio_stream::iter(requests)).await {
                    Ok(_) => done += 20,
                    Err(_) => break,
                }
            }
            done
        });
        tokio::time::sleep(Duration::from_millis(150 + 97 * round)).await;
        server.process.kill9();
        acked += publishing.await.expect("publisher");
        server.process.restart().expect("restart after kill -9");
    }
    assert!(acked > 0);
    // Online, and offline after a clean stop (which signs the tail).
    let online = server.cli(&["audit", "verify", "--key", &key, "--topic", "filings"]);
    assert!(online.ok, "{}{}", online.stdout, online.stderr);
    server.process.stop().expect("stop");
    let (ok, report) = verify(&server.dir.path().join("data"), &key);
    assert!(ok, "{report}");
    let stored: u64 = report["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .filter(|p| p["topic"] == "filings")
        .map(|p| p["records"].as_u64().unwrap_or(0))
        .sum();
    assert!(stored as usize >= acked, "every acknowledged event is stored and verified: {stored} < {acked}");
}

#[tokio::test]
async fn a_proof_of_records_no_checkpoint_covers_yet_is_signed_on_the_spot() {
    let work = tempfile::tempdir().expect("tempdir");
    // No periodic checkpoint within the test's life.
    let (server, key_file, key) = signing_server_every(work.path(), 1_000_000, 3_600_000);
    fill(&server, "recent", 30).await;
    let export = work.path().join("proof.jsonl");
    let e = export.display().to_string();
    let out = server.cli(&["replay", "--topic", "recent", "--partition", "0", "--from-offset", "10", "--with-proof", "--output", &e]);
    assert!(out.ok, "{}", out.stderr);
    let text = std::fs::read_to_string(&export).expect("export");
    let checkpoints: Vec<serde_json::Value> =
        text.lines().filter(|l| l.starts_with("{\"checkpoint\"")).map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(checkpoints.len(), 1, "{text}");
    assert_eq!(checkpoints[0]["checkpoint"]["offset"], 29);
    let check = run_cli(&["audit".into(), "check-export".into(), e, "--key".into(), key.clone()], None);
    assert!(check.ok, "{}{}", check.stdout, check.stderr);

    // The public key from a server configuration's signing key.
    let config = work.path().join("audit.toml");
    std::fs::write(&config, format!("[audit]\nsigning_key = \"{}\"\n", key_file.display())).expect("write");
    let from_config = run_cli(&["audit".into(), "key".into(), "--config".into(), config.display().to_string()], None);
    assert_eq!(from_config.stdout.trim(), key, "{}", from_config.stderr);
}
