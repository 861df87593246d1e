//! The README walk-through, run with the real binary: topics, publish, subscribe, replay,
//! groups, and clear errors with a non-zero exit on bad input.

use std::time::Duration;

use justizbus_e2e::{run_cli, TestServer};

#[test]
fn walk_through() {
    let server = TestServer::start(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let created = server.cli(&["topics", "create", "--topic", "ingest", "--partitions", "4"]);
    assert!(created.ok, "{}", created.stderr);
    assert_eq!(created.json_lines()[0]["partitions"], 4);

    let file = dir.path().join("filing.json");
    std::fs::write(&file, r#"{"court":"AG Köln","aktenzeichen":"12 C 345/26"}"#).expect("write");
    let f = file.to_str().expect("utf8");
    let mut published = Vec::new();
    for i in 0..3 {
        let id = format!("evt-{i}");
        let out = server.cli(&["publish", "--topic", "ingest", "--key", "AG-Koeln/12C345-26", "--type", "test.filing", "--id", &id, f]);
        assert!(out.ok, "{}", out.stderr);
        let r = &out.json_lines()[0];
        assert_eq!(r["id"], id.as_str());
        published.push((r["partition"].as_u64().expect("partition"), r["offset"].as_u64().expect("offset")));
    }
    assert!(published.iter().all(|(p, _)| *p == published[0].0), "one key, one partition");
    assert_eq!(published.iter().map(|(_, o)| *o).collect::<Vec<_>>(), [0, 1, 2]);

    // Publishing the same id again stores nothing new.
    let again = server.cli(&["publish", "--topic", "ingest", "--key", "AG-Koeln/12C345-26", "--id", "evt-0", f]);
    assert!(again.ok);
    assert_eq!(again.json_lines()[0]["duplicate"], true);
    assert_eq!(again.json_lines()[0]["offset"], 0);

    // Standard input, and a payload that is not JSON.
    let stdin = run_cli(
        &["publish".into(), "--server".into(), server.url(), "--topic".into(), "ingest".into(), "--key".into(), "other".into(), "-".into()],
        Some(b"plain text"),
    );
    assert!(stdin.ok, "{}", stdin.stderr);

    let sub = server.cli(&["subscribe", "--topic", "ingest", "--group", "court", "--max", "2", "--timeout", "10"]);
    assert!(sub.ok, "{}", sub.stderr);
    let lines = sub.json_lines();
    assert_eq!(lines.len(), 2);
    for key in ["topic", "partition", "offset", "key", "id", "type", "time", "attempt", "data"] {
        assert!(lines[0].get(key).is_some(), "subscribe prints {key}: {}", lines[0]);
    }
    // The rest of the group's events, then nothing: printed events were acknowledged.
    let rest = server.cli(&["subscribe", "--topic", "ingest", "--group", "court", "--timeout", "2"]);
    assert!(rest.ok, "{}", rest.stderr);
    let mut ids: Vec<String> = lines.iter().chain(rest.json_lines().iter()).map(|l| l["id"].as_str().expect("id").to_string()).collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "no event twice");
    let plain = rest.json_lines().into_iter().chain(lines).find(|l| l["key"] == "other").expect("stdin event");
    assert_eq!(plain["data"], "plain text");

    let replay = server.cli(&["replay", "--topic", "ingest", "--partition", &published[0].0.to_string(), "--from-offset", "1"]);
    assert!(replay.ok, "{}", replay.stderr);
    let r = replay.json_lines();
    assert_eq!(r.iter().map(|l| l["offset"].as_u64().expect("offset")).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(r[0]["data"]["aktenzeichen"], "12 C 345/26");
    let bounded = server.cli(&["replay", "--topic", "ingest", "--partition", &published[0].0.to_string(), "--to-offset", "1"]);
    assert_eq!(bounded.json_lines().len(), 1);
    let by_time = server.cli(&["replay", "--topic", "ingest", "--from-time", "2000-01-01T00:00:00Z"]);
    assert_eq!(by_time.json_lines().len(), 4);

    let groups = server.cli(&["groups", "describe", "--topic", "ingest", "--group", "court"]);
    assert!(groups.ok, "{}", groups.stderr);
    let g = &groups.json_lines()[0];
    assert!(g["partitions"].as_array().expect("partitions").iter().all(|p| p["lag"] == 0), "{g}");
    let topics = server.cli(&["topics", "list"]);
    assert!(topics.json_lines().iter().any(|t| t["topic"] == "ingest"));
}

#[test]
fn bad_input_exits_non_zero_with_a_clear_error() {
    let server = TestServer::start(&[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("e.json");
    std::fs::write(&file, "{}").expect("write");
    let f = file.to_str().expect("utf8");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["publish", "--topic", "missing", "--key", "k", f], "does not exist"),
        (vec!["publish", "--topic", "missing", "--key", "k", "/no/such/file"], "cannot read"),
        (vec!["subscribe", "--topic", "missing", "--group", "g", "--timeout", "1"], "does not exist"),
        (vec!["replay", "--topic", "missing"], "does not exist"),
        (vec!["topics", "create", "--topic", "bad/name", "--partitions", "1"], "topic"),
        (vec!["replay", "--topic", "missing", "--from-time", "yesterday"], "RFC 3339"),
    ];
    for (args, needle) in cases {
        let out = server.cli(&args);
        assert!(!out.ok, "{args:?} must fail");
        assert!(out.stderr.contains(needle), "{args:?}: stderr {:?} should mention {needle:?}", out.stderr);
    }
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").expect("write");
    assert!(server.cli(&["topics", "create", "--topic", "t", "--partitions", "1"]).ok);
    let out = server.cli(&["publish", "--topic", "t", "--key", "k", empty.to_str().expect("utf8")]);
    assert!(!out.ok && out.stderr.contains("empty"), "{}", out.stderr);
    let down = run_cli(&["topics".into(), "list".into(), "--server".into(), "http://127.0.0.1:1".into()], None);
    assert!(!down.ok && down.stderr.contains("cannot connect"), "{}", down.stderr);
    let port = justizbus_e2e::process::free_port().expect("port");
    let twice = run_cli(
        &[
            "serve".into(),
            "--data-dir".into(),
            server.process.data_dir.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ],
        None,
    );
    assert!(!twice.ok && twice.stderr.contains("another justizbus"), "a second server on one data directory: {}", twice.stderr);
    let bad_config = dir.path().join("bad.toml");
    std::fs::write(&bad_config, "bogus_key = 1\n").expect("write");
    let out = run_cli(&["serve".into(), "--config".into(), bad_config.to_str().expect("utf8").into()], None);
    assert!(!out.ok && out.stderr.contains("bogus_key"), "{}", out.stderr);
}

/// A benchmark that fails half-way (here: its server refuses the configuration) removes the
/// data directory it made, as one that completes does: a large-log run leaves gigabytes.
#[test]
fn a_failed_benchmark_leaves_no_data_behind() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("server.toml");
    std::fs::write(&config, "no_such_setting = 1\n").expect("write config");
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir(&scratch).expect("scratch dir");
    for bench in [&["bench"][..], &["bench", "routing", "--participants", "100", "--cases", "10"]] {
        let out = std::process::Command::new(justizbus_e2e::binary())
            .args(bench)
            .arg("--server-config")
            .arg(&config)
            .env("TMPDIR", &scratch)
            .output()
            .expect("run the benchmark");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("no_such_setting"), "{bench:?}: {stderr}");
        let left: Vec<_> = std::fs::read_dir(&scratch).expect("read scratch").flatten().map(|e| e.path()).collect();
        assert!(left.is_empty(), "{bench:?} left {left:?}");
    }
}

/// The stored range and retention of a topic, through the CLI.
fn described(server: &TestServer, topic: &str) -> serde_json::Value {
    let out = server.cli(&["topics", "describe", "--topic", topic]);
    assert!(out.ok, "{}", out.stderr);
    out.json_lines().remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_s_retention_can_be_changed_and_old_segments_then_go() {
    // Small segments, retention checked every 100 ms.
    let config = "[log_settings]\nsegment_bytes = 4096\nmax_event_bytes = 3000\nretention_check_ms = 100\n";
    let mut server = TestServer::start_configured(config, &[]);
    assert!(server.cli(&["topics", "create", "--topic", "filings", "--partitions", "1"]).ok);
    let channel = server.channel().await;
    for i in 0..40 {
        let e = justizbus_e2e::event(&format!("old-{i}"), "case", &"x".repeat(500));
        justizbus_e2e::publish(&channel, "filings", e).await.expect("publish");
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for i in 0..3 {
        justizbus_e2e::publish(&channel, "filings", justizbus_e2e::event(&format!("new-{i}"), "case", "{}")).await.expect("publish");
    }
    assert_eq!(described(&server, "filings")["offsets"][0]["start"], 0, "a topic without retention keeps everything");

    // Bad input: a clear error, nothing changed.
    for (args, needle) in [
        (vec!["topics", "set-retention", "--topic", "missing", "--retention-ms", "1000"], "does not exist"),
        (vec!["topics", "set-retention", "--topic", "filings"], "give --retention-ms"),
    ] {
        let out = server.cli(&args);
        assert!(!out.ok && out.stderr.contains(needle), "{args:?}: {}", out.stderr);
    }
    assert_eq!(described(&server, "filings")["retention_ms"], 0);

    let changed = server.cli(&["topics", "set-retention", "--topic", "filings", "--retention-ms", "1000"]);
    assert!(changed.ok, "{}", changed.stderr);
    assert_eq!(
        (changed.json_lines()[0]["retention_ms"].as_u64(), changed.json_lines()[0]["retention_bytes"].as_u64()),
        (Some(1000), Some(0))
    );
    // The segments of the 40 old events go at the next check; the newest stay.
    let started = std::time::Instant::now();
    let start = loop {
        let start = described(&server, "filings")["offsets"][0]["start"].as_u64().expect("start");
        if start > 0 {
            break start;
        }
        assert!(started.elapsed() < justizbus_e2e::ARRIVES, "old segments stayed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(start <= 40, "start {start}: the new events stay");
    assert_eq!(described(&server, "filings")["offsets"][0]["end"], 43);

    // Only the size: the time stays. Both survive a restart.
    let sized = server.cli(&["topics", "set-retention", "--topic", "filings", "--retention-bytes", "1000000"]);
    assert!(sized.ok, "{}", sized.stderr);
    server.process.stop().expect("stop");
    server.process.restart().expect("restart");
    let after = described(&server, "filings");
    assert_eq!((after["retention_ms"].as_u64(), after["retention_bytes"].as_u64()), (Some(1000), Some(1_000_000)));
}
