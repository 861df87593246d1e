//! Faults with real processes: `kill -9` of the server while publishing and consuming, and a
//! segment file cut in the middle of a record.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use justizbus_e2e::{admin, event, publish, Subscriber, TestServer};
use justizbus_proto::v1 as pb;
use tokio::sync::watch;

/// What the clients observed across all server lifetimes.
#[derive(Default)]
struct Observed {
    /// Next sequence number to publish per key (a failed publish is retried with the same id).
    next_seq: BTreeMap<String, u64>,
    /// Publishes the server acknowledged: id -> (key, seq).
    acked_publishes: BTreeMap<String, (String, u64)>,
    /// Deliveries the subscriber received, in order: (id, key, seq).
    received: Vec<(String, String, u64)>,
    /// Ids whose ack the subscriber sent.
    acks_sent: BTreeSet<String>,
}

fn parse(id: &str) -> (String, u64) {
    let (key, seq) = id.rsplit_once('#').expect("id is key#seq");
    (key.to_string(), seq.parse().expect("seq"))
}

async fn publisher(url: String, keys: Vec<String>, seen: Arc<Mutex<Observed>>, mut stop: watch::Receiver<bool>) {
    let Ok(ch) = justizbus::cli::connect(&url).await else { return };
    while !*stop.borrow_and_update() {
        for key in &keys {
            let seq = *seen.lock().expect("lock").next_seq.entry(key.clone()).or_default();
            let id = format!("{key}#{seq}");
            match publish(&ch, "cases", event(&id, key, &id)).await {
                Ok(_) => {
                    let mut s = seen.lock().expect("lock");
                    s.acked_publishes.insert(id, (key.clone(), seq));
                    s.next_seq.insert(key.clone(), seq + 1);
                }
                Err(_) => return, // the server is gone; retry the same id next time
            }
        }
    }
}

async fn subscriber(url: String, seen: Arc<Mutex<Observed>>, mut stop: watch::Receiver<bool>, idle: Duration) {
    let Ok(ch) = justizbus::cli::connect(&url).await else { return };
    let init = pb::SubscribeInit { topic: "cases".into(), group: "court".into(), max_unacked: 20, ..Default::default() };
    let Ok(mut sub) = Subscriber::open(&ch, init).await else { return };
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            msg = sub.next_message(idle) => {
                let Some(Ok(pb::subscribe_response::Response::Delivery(d))) = msg else { return };
                let id = d.event.as_ref().map(|e| e.id.clone()).unwrap_or_default();
                let (key, seq) = parse(&id);
                seen.lock().expect("lock").received.push((id.clone(), key, seq));
                sub.ack(&[d.delivery_id]).await;
                seen.lock().expect("lock").acks_sent.insert(id);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_publishing_and_consuming_loses_nothing_acknowledged() {
    let mut server = TestServer::start(&[]);
    server.create_topic("cases", 4).await;
    let seen = Arc::new(Mutex::new(Observed::default()));
    let keys: Vec<String> = (0..16).map(|i| format!("case-{i}")).collect();
    let mut received_before_last_kill = 0;
    for cycle in 0..4 {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for chunk in keys.chunks(2) {
            tasks.push(tokio::spawn(publisher(server.url(), chunk.to_vec(), seen.clone(), stop_rx.clone())));
        }
        tasks.push(tokio::spawn(subscriber(server.url(), seen.clone(), stop_rx.clone(), Duration::from_secs(30))));
        tokio::time::sleep(Duration::from_millis(1200 + 300 * cycle)).await;
        // SIGKILL in the middle of everything: no flush, no goodbye.
        server.process.kill9();
        let _ = stop_tx.send(true);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
        received_before_last_kill = seen.lock().expect("lock").received.len();
        server.process.restart().expect("restart after kill -9");
    }
    assert!(server.process.log().contains("justizbus listening"));

    // Drain the group after the last restart.
    let (_stop_tx, stop_rx) = watch::channel(false);
    subscriber(server.url(), seen.clone(), stop_rx, Duration::from_secs(3)).await;

    let seen = std::mem::take(&mut *seen.lock().expect("lock"));
    assert!(seen.acked_publishes.len() > 100, "the test published something ({})", seen.acked_publishes.len());

    // 1. Every acknowledged publish is stored, once, in order per key.
    let ch = server.channel().await;
    let mut replay = pb::replayer_client::ReplayerClient::new(ch.clone());
    let mut stream = replay.replay(pb::ReplayRequest { topic: "cases".into(), ..Default::default() }).await.expect("replay").into_inner();
    let mut stored: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut stored_ids = BTreeSet::new();
    while let Some(r) = stream.message().await.expect("replay stream") {
        let id = r.event.expect("event").id;
        let (key, seq) = parse(&id);
        assert_eq!(r.key, key);
        assert!(stored_ids.insert(id.clone()), "{id} stored twice");
        stored.entry(key).or_default().push(seq);
    }
    for (id, (key, seq)) in &seen.acked_publishes {
        assert!(stored.get(key).is_some_and(|s| s.contains(seq)), "acknowledged publish {id} lost");
    }
    for (key, seqs) in &stored {
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "order of {key} in the log: {seqs:?}");
    }

    // 2. Every stored event was delivered; whatever was not acknowledged came again.
    let delivered: BTreeSet<&String> = seen.received.iter().map(|(id, _, _)| id).collect();
    for id in &stored_ids {
        assert!(delivered.contains(id), "stored event {id} never delivered");
    }
    let after: BTreeSet<&String> = seen.received[received_before_last_kill..].iter().map(|(id, _, _)| id).collect();
    for (id, _, _) in &seen.received[..received_before_last_kill] {
        assert!(seen.acks_sent.contains(id) || after.contains(id), "{id} was received but not acknowledged, and not delivered again");
    }

    // 3. Per key, delivery after the last restart is in order.
    let mut last: BTreeMap<&String, u64> = BTreeMap::new();
    for (_, key, seq) in &seen.received[received_before_last_kill..] {
        if let Some(prev) = last.insert(key, *seq) {
            assert!(*seq > prev, "{key}: {seq} delivered after {prev}");
        }
    }
    let g = admin(ch)
        .describe_group(pb::DescribeGroupRequest { topic: "cases".into(), group: "court".into() })
        .await
        .expect("group")
        .into_inner();
    assert!(g.partitions.iter().all(|p| p.lag == 0), "group drained: {g:?}");
    let _ = &mut server;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_cut_mid_record_recovers_to_the_last_whole_record() {
    let mut server = TestServer::start(&[]);
    server.create_topic("t", 1).await;
    let ch = server.channel().await;
    for i in 0..10 {
        publish(&ch, "t", event(&format!("e{i}"), "case", &format!("payload number {i} {}", "x".repeat(200)))).await.expect("publish");
    }
    server.process.kill9();
    let segment = server.process.data_dir.join("log/t/0/00000000000000000000.log");
    let len = std::fs::metadata(&segment).expect("segment").len();
    // Cut in the middle of the last record.
    std::fs::OpenOptions::new().write(true).open(&segment).expect("open").set_len(len - 120).expect("cut");
    server.process.restart().expect("restart");
    let log = server.process.log();
    assert!(log.contains("truncated torn tail"), "recovery is reported: {log}");
    assert!(log.contains("next_offset=9"), "reports where the log ends: {log}");

    let ch = server.channel().await;
    let mut replay = pb::replayer_client::ReplayerClient::new(ch.clone());
    let mut stream = replay.replay(pb::ReplayRequest { topic: "t".into(), ..Default::default() }).await.expect("replay").into_inner();
    let mut ids = Vec::new();
    while let Some(r) = stream.message().await.expect("stream") {
        ids.push(r.event.expect("event").id);
    }
    assert_eq!(ids, (0..9).map(|i| format!("e{i}")).collect::<Vec<_>>());
    // The cut-off id is free again, and the log goes on from the recovered end.
    let r = publish(&ch, "t", event("e9", "case", "again")).await.expect("publish");
    assert_eq!((r.offset, r.duplicate), (9, false));

    // A flipped byte in the last batch is caught by its CRC the same way.
    server.process.kill9();
    let bytes = std::fs::read(&segment).expect("read");
    let mut damaged = bytes.clone();
    let at = damaged.len() - 3;
    damaged[at] ^= 0xff;
    std::fs::write(&segment, damaged).expect("write");
    server.process.restart().expect("restart");
    assert!(server.process.log().contains("CRC mismatch"));
    let info =
        admin(server.channel().await).describe_topic(pb::DescribeTopicRequest { topic: "t".into() }).await.expect("describe").into_inner();
    assert_eq!(info.partition_info[0].end_offset, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_with_subscribers_connected_and_keeps_their_position() {
    let mut server = TestServer::start(&[]);
    server.create_topic("t", 2).await;
    let ch = server.channel().await;
    for i in 0..6 {
        publish(&ch, "t", event(&format!("e{i}"), &format!("case-{}", i % 3), "x")).await.expect("publish");
    }
    let mut sub = Subscriber::simple(&ch, "t", "g", 10).await;
    let mut acked = 0;
    while acked < 3 {
        let d = sub.next(Duration::from_secs(15)).await.expect("delivery");
        sub.ack(&[d.delivery_id]).await;
        acked += 1;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The subscriber stays connected; SIGTERM must still stop the server promptly.
    server.process.stop().expect("clean stop within the deadline");
    assert!(server.process.log().contains("stopped"), "{}", server.process.log());
    // What the client had buffered may still come, then the stream ends (or the connection).
    let mut buffered = 0;
    loop {
        match sub.next_message(Duration::from_secs(5)).await {
            Some(Ok(pb::subscribe_response::Response::Delivery(_))) => buffered += 1,
            Some(Ok(_)) => {}
            None | Some(Err(_)) => break,
        }
        assert!(buffered <= 3, "no new deliveries after the shutdown");
    }
    server.process.restart().expect("restart");
    let ch = server.channel().await;
    let g = admin(ch.clone())
        .describe_group(pb::DescribeGroupRequest { topic: "t".into(), group: "g".into() })
        .await
        .expect("group")
        .into_inner();
    let lag: u64 = g.partitions.iter().map(|p| p.lag).sum();
    assert_eq!(lag, 3, "the three acknowledged events stay acknowledged across a clean restart: {g:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_and_group_settings_survive_kill_9_so_a_poison_event_still_ends_in_the_dead_letter_topic() {
    let mut server = TestServer::start(&[]);
    server.create_topic("t", 1).await;
    let ch = server.channel().await;
    publish(&ch, "t", event("poison", "case", "P")).await.expect("publish");
    let init = || pb::SubscribeInit {
        topic: "t".into(),
        group: "g".into(),
        max_unacked: 5,
        max_attempts: 3,
        min_backoff_ms: 20,
        ..Default::default()
    };
    let mut sub = Subscriber::open(&ch, init()).await.expect("subscribe");
    for expected in [1, 2] {
        let d = sub.next(Duration::from_secs(15)).await.expect("delivery");
        assert_eq!(d.attempt, expected);
        if expected == 1 {
            sub.nack(&[d.delivery_id]).await;
        }
    }
    // Attempt 2 is held (as by a consumer that crashes on it); the bus is killed too, after
    // the group has stored its position (every commit_interval_ms, 1 s by default).
    tokio::time::sleep(Duration::from_millis(1600)).await;
    server.process.kill9();
    drop(sub);
    server.process.restart().expect("restart");
    let ch = server.channel().await;
    // Settings given by the first subscriber (max_attempts 3) are stored with the group.
    let plain = pb::SubscribeInit { topic: "t".into(), group: "g".into(), max_unacked: 5, ..Default::default() };
    let mut sub = Subscriber::open(&ch, plain).await.expect("subscribe again");
    let d = sub.next(Duration::from_secs(15)).await.expect("redelivery");
    assert_eq!(d.attempt, 3, "the attempt count survived the crash");
    sub.nack(&[d.delivery_id]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let q = admin(ch)
        .list_quarantine(pb::ListQuarantineRequest { topic: "t".into(), group: "g".into() })
        .await
        .expect("quarantine")
        .into_inner();
    assert_eq!(q.keys.len(), 1, "after max_attempts the case is quarantined");
}
