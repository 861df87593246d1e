//! XJustiz end to end: the `xjustiz` commands, and the inbound and outbound adapter processes
//! against a real server, with the real samples of `../shared/xjustiz`, bad input, and `kill -9`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use justizbus_e2e::{copy_dir, drop_item, files_below, run_cli, shared_xjustiz, spawn, wait_exit, xjustiz_samples, TestServer};

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn replayed_ids(server: &TestServer, topic: &str) -> Vec<String> {
    let out = server.cli(&["replay", "--topic", topic]);
    assert!(out.ok, "{}", out.stderr);
    out.json_lines().iter().map(|l| l["id"].as_str().expect("id").to_string()).collect()
}

fn inbound_args(server: &TestServer, watch: &Path, extra: &[&str]) -> Vec<String> {
    let mut a = args(&["adapter", "inbound", "--server", &server.url(), "--watch", &watch.display().to_string(), "--poll-ms", "50"]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn xjustiz_commands_validate_translate_and_convert_back() {
    let samples = xjustiz_samples();
    let valid: Vec<&PathBuf> = samples.iter().filter(|(_, v)| *v).map(|(p, _)| p).collect();
    let invalid: Vec<&PathBuf> = samples.iter().filter(|(_, v)| !*v).map(|(p, _)| p).collect();
    // Without --xsd-dir the committed schemas/ are used.
    for p in &valid {
        let out = run_cli(&args(&["xjustiz", "validate", &p.display().to_string()]), None);
        assert!(out.ok && out.stdout.trim() == "valid", "{}: {} {}", p.display(), out.stdout, out.stderr);
    }
    for p in &invalid {
        let out = run_cli(&args(&["xjustiz", "validate", &p.display().to_string()]), None);
        assert!(!out.ok, "{} passed", p.display());
        let first = out.stdout.lines().next().unwrap_or_default();
        // FILE:LINE: ... with the element path or the reason.
        let rest = first.strip_prefix(&format!("{}:", p.display())).unwrap_or_else(|| panic!("{first}"));
        assert!(rest.split(':').next().is_some_and(|l| l.parse::<usize>().is_ok()), "{first}");
    }
    let sample = shared_xjustiz().join("samples/XJV-Viewer-for-XJustiz/xjustiz_nachricht_v3_2.xml");
    let invalid_line = run_cli(&args(&["xjustiz", "validate", &sample.display().to_string()]), None);
    assert!(invalid_line.stdout.contains("identifikation"), "{}", invalid_line.stdout);

    // translate -> to-xml -> validate, for every valid sample; the XML is equivalent.
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, p) in valid.iter().enumerate() {
        let out = run_cli(&args(&["xjustiz", "translate", &p.display().to_string()]), None);
        assert!(out.ok, "{}: {}", p.display(), out.stderr);
        let event: serde_json::Value = serde_json::from_str(&out.stdout).expect("event JSON");
        for field in ["id", "type", "schema_version", "subject", "data", "metadata"] {
            assert!(!event[field].is_null(), "{}: no {field}", p.display());
        }
        let json_path = dir.path().join(format!("{i}.json"));
        std::fs::write(&json_path, &out.stdout).expect("write");
        let xml = run_cli(&args(&["xjustiz", "to-xml", &json_path.display().to_string()]), None);
        assert!(xml.ok, "{}: {}", p.display(), xml.stderr);
        let xml_path = dir.path().join(format!("{i}.xml"));
        std::fs::write(&xml_path, &xml.stdout).expect("write");
        let again = run_cli(&args(&["xjustiz", "translate", &xml_path.display().to_string()]), None);
        let again: serde_json::Value = serde_json::from_str(&again.stdout).expect("event JSON");
        assert_eq!(again["data"], event["data"], "{}", p.display());
        assert_eq!(again["metadata"], event["metadata"], "{}", p.display());
    }
    // JSON that breaks its schema is refused by to-xml, naming the place.
    let broken = r#"{"type":"nachricht.gds.basisnachricht.0005006","schema_version":"3.6.2","data":{"nachrichtenkopf":{"@xjustizVersion":"3.6.2","erstellungszeitpunkt":"gestern"}}}"#;
    let out = run_cli(&args(&["xjustiz", "to-xml", "-"]), Some(broken.as_bytes()));
    assert!(!out.ok && out.stderr.contains("erstellungszeitpunkt"), "{}", out.stderr);

    // The 3.6 header yields the routing metadata.
    let toolbox = shared_xjustiz().join("samples/XJustiz_Toolbox/nachricht.gds.basisnachricht.0005006.xml");
    let out = run_cli(&args(&["xjustiz", "translate", &toolbox.display().to_string()]), None);
    let event: serde_json::Value = serde_json::from_str(&out.stdout).expect("event JSON");
    assert_eq!(event["sender"], "court:M1710S");
    assert_eq!(event["recipients"][0], "court:U6389");
    assert_eq!(event["metadata"]["recipients"][0]["list_version"], "3.6");
    assert_eq!(event["metadata"]["recipient_case"], "iW");
    assert_eq!(event["time"], "3711-04-03T22:08:17.000Z");
    // 2.x header: free-text sender, court recipient, both Aktenzeichen, proceeding.
    let v24 = shared_xjustiz().join("samples/XJV-Viewer-for-XJustiz/xjustiz_nachricht_v2_4.xml");
    let out = run_cli(&args(&["xjustiz", "translate", &v24.display().to_string()]), None);
    let event: serde_json::Value = serde_json::from_str(&out.stdout).expect("event JSON");
    let m = &event["metadata"];
    assert_eq!(m["sender"][0]["text"], "Testsender");
    assert_eq!(m["recipients"][0]["code"], "9D0000");
    assert_eq!(m["sender_case"], "Testaktenzeichen Sender");
    assert_eq!(m["message_id"], "5558aeab-4b75-44db-80e5-7219da4751a2");
    assert_eq!(m["proceeding_cases"][0]["number"], "12345BG1234567 987654321");
    assert_eq!(event["subject"], "court:9D0000|12345BG1234567 987654321");
    // 3.2 header: auswahl_absender / auswahl_empfaenger and the foreign message id of an EEB.
    let eeb = shared_xjustiz().join("samples/XJV-Viewer-for-XJustiz/eeb1_v3_2.xml");
    let out = run_cli(&args(&["xjustiz", "translate", &eeb.display().to_string()]), None);
    let event: serde_json::Value = serde_json::from_str(&out.stdout).expect("event JSON");
    assert!(event["metadata"]["foreign_message_id"].is_string(), "{}", event["metadata"]);
    assert!(!event["sender"].as_str().unwrap_or_default().is_empty(), "{}", event["metadata"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_and_outbound_carry_files_and_egvp_folders_byte_for_byte() {
    let server = TestServer::start(&[]);
    let work = tempfile::tempdir().expect("tempdir");
    let (watch, inbox) = (work.path().join("drop"), work.path().join("inbox"));
    std::fs::create_dir_all(&watch).expect("mkdir");
    let samples = xjustiz_samples();
    let mut expected_valid = BTreeSet::new();
    let mut expected_rejected = BTreeSet::new();
    // Distinct messages: two samples are byte-identical copies and are published once.
    let mut distinct = BTreeSet::new();
    for (i, (path, valid)) in samples.iter().enumerate() {
        if path.components().any(|c| c.as_os_str() == "EGVP-Enterprise-Receiver") {
            continue;
        }
        let name = format!("{i:02}-{}", path.file_name().expect("name").to_string_lossy());
        drop_item(&watch, &name, |tmp| {
            std::fs::copy(path, tmp).expect("copy");
        });
        if *valid {
            distinct.insert(std::fs::read(path).expect("sample"));
            expected_valid.insert(name);
        } else {
            expected_rejected.insert(name);
        }
    }
    let egvp = shared_xjustiz().join("samples/EGVP-Enterprise-Receiver");
    let mut folders = Vec::new();
    for name in ["Testnachricht_1", "Testnachricht_xjustiz321", "TestnachrichtEeb_1"] {
        drop_item(&watch, name, |tmp| copy_dir(&egvp.join(name), tmp));
        expected_valid.insert(name.to_string());
        distinct.insert(std::fs::read(egvp.join(name).join("attachments/xjustiz_nachricht.xml")).expect("message"));
        folders.push(name);
    }
    let mut inbound = spawn(&inbound_args(&server, &watch, &["--once"]));
    assert!(wait_exit(&mut inbound, Duration::from_secs(60)).success());

    let listed = |d: &str| -> BTreeSet<String> {
        std::fs::read_dir(watch.join(d)).expect("dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
    };
    assert_eq!(listed("done"), expected_valid);
    let rejected = listed("rejected");
    for name in &expected_rejected {
        assert!(rejected.contains(name), "{name} not rejected");
        let report = std::fs::read_to_string(watch.join("rejected").join(format!("{name}.error.txt"))).expect("report");
        assert!(report.contains("line "), "{name}: {report}");
    }
    assert_eq!(rejected.len(), expected_rejected.len() * 2);
    let ids = replayed_ids(&server, "xjustiz.ingest");
    assert_eq!(ids.len(), distinct.len());

    // Dropping the same files again publishes nothing new (the event id comes from the content).
    drop_item(&watch, "Testnachricht_1", |tmp| copy_dir(&egvp.join("Testnachricht_1"), tmp));
    let mut again = spawn(&inbound_args(&server, &watch, &["--once"]));
    assert!(wait_exit(&mut again, Duration::from_secs(30)).success());
    assert_eq!(replayed_ids(&server, "xjustiz.ingest").len(), distinct.len());

    // Outbound writes every message into the inbox; EGVP folders come back byte for byte.
    let mut outbound = spawn(&args(&[
        "adapter",
        "outbound",
        "--server",
        &server.url(),
        "--participant",
        "land-a",
        "--group",
        "inbox-a",
        "--out",
        &inbox.display().to_string(),
        "--topic",
        "xjustiz.ingest",
        "--max",
        &distinct.len().to_string(),
    ]));
    assert!(wait_exit(&mut outbound, Duration::from_secs(60)).success());
    let delivered: Vec<PathBuf> = std::fs::read_dir(&inbox).expect("inbox").flatten().map(|e| e.path()).collect();
    assert_eq!(delivered.len(), distinct.len());
    for name in folders {
        let original = files_below(&egvp.join(name));
        let copy = delivered
            .iter()
            .map(|d| files_below(d))
            .find(|f| f.get("attachments/xjustiz_nachricht.xml") == original.get("attachments/xjustiz_nachricht.xml"))
            .unwrap_or_else(|| panic!("{name} not delivered"));
        for (rel, bytes) in &original {
            assert_eq!(copy.get(rel), Some(bytes), "{name}/{rel} differs");
        }
    }
}

#[test]
fn bad_input_is_rejected_with_a_located_report() {
    let server = TestServer::start(&[]);
    let work = tempfile::tempdir().expect("tempdir");
    let watch = work.path().join("drop");
    std::fs::create_dir_all(&watch).expect("mkdir");
    let valid =
        std::fs::read_to_string(shared_xjustiz().join("samples/XJustiz_Toolbox/nachricht.gds.basisnachricht.0005006.xml")).expect("sample");
    let deep = format!("<a>{}</a>", "<b>".repeat(300) + &"</b>".repeat(300));
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed.xml", "<tns:nachricht xmlns:tns=\"http://www.xjustiz.de\"><unclosed></tns:nachricht>".into(), "not well-formed"),
        ("doctype.xml", "<!DOCTYPE x [<!ENTITY e SYSTEM \"file:///etc/passwd\">]><x>&e;</x>".into(), "DOCTYPE"),
        ("namespace.xml", valid.replace("http://www.xjustiz.de", "urn:not-xjustiz"), "not in http://www.xjustiz.de"),
        ("version.xml", valid.replace("xjustizVersion=\"3.6.2\"", "xjustizVersion=\"9.1.0\""), "9.1.0"),
        ("type.xml", valid.replace("nachricht.gds.basisnachricht.0005006", "nachricht.gds.gibtesnicht.0005999"), "not a message"),
        ("facet.xml", valid.replace("3711-04-03T22:08:17Z", "3711-13-03T22:08:17Z"), "dateTime"),
        (
            "missing.xml",
            valid.replace("<tns:erstellungszeitpunkt>3711-04-03T22:08:17Z</tns:erstellungszeitpunkt>", ""),
            "erstellungszeitpunkt",
        ),
        ("deep.xml", deep, "deeper"),
        ("big.xml", format!("{}<!--{}-->", valid, "x".repeat(300_000)), "limit"),
        ("empty.xml", String::new(), "no root"),
    ];
    for (name, content, _) in &cases {
        drop_item(&watch, name, |tmp| std::fs::write(tmp, content).expect("write"));
    }
    std::fs::create_dir_all(watch.join("folder-without-message")).expect("mkdir");
    let mut inbound = spawn(&inbound_args(&server, &watch, &["--once", "--max-document-bytes", "200000"]));
    let status = wait_exit(&mut inbound, Duration::from_secs(60));
    assert!(status.success());
    for (name, _, expected) in &cases {
        let report = std::fs::read_to_string(watch.join("rejected").join(format!("{name}.error.txt")))
            .unwrap_or_else(|e| panic!("{name}: no report ({e})"));
        assert!(report.contains(expected), "{name}: expected {expected:?} in\n{report}");
        assert!(watch.join("rejected").join(name).is_file(), "{name} not moved");
    }
    assert!(watch.join("rejected/folder-without-message.error.txt").is_file());
    let out = server.cli(&["replay", "--topic", "xjustiz.ingest"]);
    assert!(out.ok && out.stdout.trim().is_empty(), "bad input was published: {}", out.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_either_adapter_loses_nothing_and_publishes_nothing_twice() {
    let server = TestServer::start(&[]);
    let work = tempfile::tempdir().expect("tempdir");
    let (watch, inbox) = (work.path().join("drop"), work.path().join("inbox"));
    std::fs::create_dir_all(&watch).expect("mkdir");
    // 120 distinct valid messages: each sample with a numbered comment appended.
    let valid: Vec<PathBuf> = xjustiz_samples().into_iter().filter(|(_, v)| *v).map(|(p, _)| p).collect();
    let total = 120;
    for i in 0..total {
        let content = std::fs::read(&valid[i % valid.len()]).expect("sample");
        drop_item(&watch, &format!("m{i:03}.xml"), |tmp| {
            let mut c = content.clone();
            c.extend_from_slice(format!("\n<!-- copy {i} -->\n").as_bytes());
            std::fs::write(tmp, c).expect("write");
        });
    }
    // Kill the inbound adapter a few times while it works, then let it finish.
    for round in 0..3 {
        let mut inbound = spawn(&inbound_args(&server, &watch, &[]));
        std::thread::sleep(Duration::from_millis(300 + 200 * round));
        inbound.kill().expect("kill -9");
        let _ = inbound.wait();
    }
    let mut inbound = spawn(&inbound_args(&server, &watch, &["--once"]));
    assert!(wait_exit(&mut inbound, Duration::from_secs(120)).success());
    let done = std::fs::read_dir(watch.join("done")).expect("done").count();
    assert_eq!(done, total, "every item ends in done/");
    let ids = replayed_ids(&server, "xjustiz.ingest");
    let unique: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), total, "every item published");
    assert_eq!(ids.len(), total, "no item published twice");

    // Kill the outbound adapter while it writes, then let it finish: every message once, whole.
    let outbound_args = |max: Option<usize>| -> Vec<String> {
        let mut a = args(&[
            "adapter",
            "outbound",
            "--server",
            &server.url(),
            "--participant",
            "p",
            "--group",
            "inbox",
            "--out",
            &inbox.display().to_string(),
            "--topic",
            "xjustiz.ingest",
            "--max-unacked",
            "4",
        ]);
        if let Some(m) = max {
            a.extend(args(&["--max", &m.to_string()]));
        }
        a
    };
    for round in 0..2 {
        let mut outbound = spawn(&outbound_args(None));
        std::thread::sleep(Duration::from_millis(400 + 300 * round));
        outbound.kill().expect("kill -9");
        let _ = outbound.wait();
    }
    // Then let it run until the inbox holds every message.
    let mut outbound = spawn(&outbound_args(None));
    let count = || std::fs::read_dir(&inbox).map(|d| d.flatten().filter(|e| !e.file_name().to_string_lossy().starts_with('.')).count());
    let start = Instant::now();
    while count().unwrap_or(0) < total {
        assert!(start.elapsed() < Duration::from_secs(120), "inbox has {:?} of {total}", count());
        std::thread::sleep(Duration::from_millis(100));
    }
    outbound.kill().expect("stop");
    let _ = outbound.wait();
    let folders: Vec<PathBuf> = std::fs::read_dir(&inbox).expect("inbox").flatten().map(|e| e.path()).collect();
    assert!(folders.iter().all(|f| !f.file_name().expect("name").to_string_lossy().starts_with(".tmp-")), "half-written folder left");
    let names: BTreeSet<String> = folders.iter().map(|f| f.file_name().expect("name").to_string_lossy().into_owned()).collect();
    assert_eq!(names, ids.iter().cloned().collect::<BTreeSet<_>>(), "every published message is in the inbox once");
    for f in &folders {
        let files = files_below(f);
        let xml = files.iter().find(|(k, _)| k.ends_with(".xml")).map(|(_, v)| v).expect("message file");
        assert!(String::from_utf8_lossy(xml).contains("<!-- copy "), "{}: not an original", f.display());
        assert!(files.contains_key("justizbus-event.json"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_are_verified_on_upload_and_download() {
    use justizbus_proto::v1 as pb;
    let config_dir = tempfile::tempdir().expect("tempdir");
    let config = config_dir.path().join("server.toml");
    std::fs::write(&config, "max_blob_bytes = 300000\n").expect("config");
    let server = TestServer::start(&["--config", &config.display().to_string()]);
    let channel = server.channel().await;
    let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let stored =
        justizbus_xjustiz::client::upload(&channel, "akte/dokument.pdf", "application/pdf", content.clone()).await.expect("upload");
    assert_eq!(stored.size, content.len() as u64);
    assert_eq!(stored.sha256, justizbus_xjustiz::event::sha256_hex(&content));
    assert_eq!(justizbus_xjustiz::client::download(&channel, &stored).await.expect("download"), content);

    let mut blobs = pb::blobs_client::BlobsClient::new(channel.clone());
    let upload = |header: pb::UploadHeader, chunks: Vec<Vec<u8>>| {
        let mut parts = vec![pb::UploadRequest { part: Some(pb::upload_request::Part::Header(header)) }];
        parts.extend(chunks.into_iter().map(|c| pb::UploadRequest { part: Some(pb::upload_request::Part::Chunk(c)) }));
        tokio_stream::iter(parts)
    };
    // A wrong expected hash, a wrong size, and too much content are refused and store nothing.
    let wrong = pb::UploadHeader { sha256: "ab".repeat(32), ..Default::default() };
    let status = blobs.upload(upload(wrong, vec![b"abc".to_vec()])).await.expect_err("hash mismatch");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = blobs.stat(pb::DownloadRequest { sha256: "ab".repeat(32) }).await.expect_err("not stored");
    assert_eq!(status.code(), tonic::Code::NotFound);
    let sized = pb::UploadHeader { size: 4, ..Default::default() };
    assert_eq!(blobs.upload(upload(sized, vec![b"abc".to_vec()])).await.expect_err("size").code(), tonic::Code::InvalidArgument);
    let big = blobs.upload(upload(pb::UploadHeader::default(), vec![vec![0; 200_000], vec![0; 200_000]])).await.expect_err("too big");
    assert_eq!(big.code(), tonic::Code::ResourceExhausted);
    let tmp = server.dir.path().join("data/blobs/tmp");
    assert_eq!(std::fs::read_dir(&tmp).expect("tmp").count(), 0, "refused uploads leave no files");

    // An event may only reference stored blobs, with their size.
    let mut e = justizbus_e2e::event("with-blob", "case-1", "{}");
    e.attachments.push(pb::Attachment { sha256: "cd".repeat(32), size: 1, name: "x".into(), media_type: String::new() });
    server.create_topic("docs", 1).await;
    let status = justizbus_e2e::publish(&channel, "docs", e.clone()).await.expect_err("missing blob");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    e.attachments[0] = pb::Attachment { size: 1, ..stored.clone() };
    let status = justizbus_e2e::publish(&channel, "docs", e.clone()).await.expect_err("wrong size");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    e.attachments[0] = stored.clone();
    justizbus_e2e::publish(&channel, "docs", e).await.expect("stored blob");

    // A stored blob damaged on disk is reported as DATA_LOSS on download.
    let path = server.dir.path().join("data/blobs/sha256").join(&stored.sha256[..2]).join(&stored.sha256);
    let mut bytes = std::fs::read(&path).expect("blob file");
    bytes[1000] ^= 0xff;
    std::fs::write(&path, bytes).expect("damage");
    let mut stream = blobs.download(pb::DownloadRequest { sha256: stored.sha256.clone() }).await.expect("starts").into_inner();
    let mut outcome = Ok(());
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => break,
            Err(s) => {
                outcome = Err(s);
                break;
            }
        }
    }
    assert_eq!(outcome.expect_err("damaged").code(), tonic::Code::DataLoss);
}

#[test]
fn items_count_only_once_complete() {
    let server = TestServer::start(&[]);
    let work = tempfile::tempdir().expect("tempdir");
    let watch = work.path().join("drop");
    std::fs::create_dir_all(&watch).expect("mkdir");
    let sample = shared_xjustiz().join("samples/XJV-Viewer-for-XJustiz/eeb1_v3_2.xml");
    let mut inbound = spawn(&inbound_args(&server, &watch, &["--lock-file", "export.log"]));
    // Still being written: a `.part` name, and a folder while the EGVP receiver holds its lock.
    std::fs::copy(&sample, watch.join(".eeb.xml.part")).expect("copy");
    std::fs::write(watch.join("export.log"), "copying").expect("lock");
    copy_dir(&shared_xjustiz().join("samples/EGVP-Enterprise-Receiver/TestnachrichtEeb_1"), &watch.join("TestnachrichtEeb_1"));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(watch.join(".eeb.xml.part").exists() && watch.join("TestnachrichtEeb_1").exists(), "an incomplete item was taken");
    assert!(replayed_ids(&server, "xjustiz.ingest").is_empty());
    // Complete: the lock goes away and the file is renamed.
    std::fs::remove_file(watch.join("export.log")).expect("unlock");
    std::fs::rename(watch.join(".eeb.xml.part"), watch.join("eeb.xml")).expect("rename");
    let start = Instant::now();
    while !(watch.join("done/eeb.xml").exists() && watch.join("done/TestnachrichtEeb_1").exists()) {
        assert!(start.elapsed() < Duration::from_secs(30), "items not published");
        std::thread::sleep(Duration::from_millis(50));
    }
    inbound.kill().expect("stop");
    let _ = inbound.wait();
    assert_eq!(replayed_ids(&server, "xjustiz.ingest").len(), 2);
}
