//! The log conformance suite, written once and run against every backend.
//!
//! Each check takes a factory that opens the backend on the same storage; a check that needs a
//! restart closes its log and opens it again through the factory. Topic names are unique per
//! check so the checks can share one storage.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;

use super::{Cursor, GroupConfig, Log, NewRecord, Quarantine, TopicConfig};
use crate::partitioner::partition_for_key;
use crate::Error;

fn record(id: &str, key: &str, ts: i64) -> NewRecord {
    NewRecord { id: id.into(), key: Bytes::copy_from_slice(key.as_bytes()), timestamp_ms: ts, value: Bytes::from(format!("value of {id}")) }
}

/// The retention `topics` sets on a topic created without.
const CHANGED_RETENTION_MS: u64 = 86_400_000;

fn config(partitions: u32) -> TopicConfig {
    TopicConfig { partitions, retention_ms: 0, retention_bytes: 0 }
}

/// Runs every check in sequence (`retention_changes`: see [`topics`]).
pub async fn run_all<F, Fut>(open: F, retention_changes: bool)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Log>>,
{
    let log = open().await;
    topics(&*log, retention_changes).await;
    append_read_in_order(&*log).await;
    idempotent_append(&*log).await;
    read_limits_and_ranges(&*log).await;
    offset_for_time(&*log).await;
    watch_end(&*log).await;
    group_state(&*log).await;
    blob_grants(&*log).await;
    hash_chain(&log).await;
    log.close().await.expect("close");
    drop(log);
    let log = open().await;
    survives_restart(&*log, retention_changes).await;
    log.close().await.expect("close");
}

/// Create, list, describe, change retention; duplicate and invalid creation; unknown topic.
/// `retention_changes`: whether the backend can change a topic's retention (a broker without
/// AlterConfigs cannot; then the call must fail and change nothing).
pub async fn topics(log: &dyn Log, retention_changes: bool) {
    let info = log.create_topic("conf-topics", config(3)).await.expect("create");
    assert_eq!(info.config.partitions, 3);
    assert_eq!(info.partitions.len(), 3);
    assert!(matches!(log.create_topic("conf-topics", config(3)).await, Err(Error::TopicExists { partitions: 3, .. })));
    assert!(matches!(log.create_topic("conf-topics", config(5)).await, Err(Error::TopicExists { .. })));
    assert!(matches!(log.create_topic("bad/name", config(1)).await, Err(Error::InvalidArgument { .. })));
    assert!(matches!(log.create_topic("zero-partitions", config(0)).await, Err(Error::InvalidArgument { .. })));
    assert!(log.list_topics().await.expect("list").iter().any(|t| t.name == "conf-topics"));
    assert_eq!(log.describe_topic("conf-topics").await.expect("describe").config.partitions, 3);
    assert!(matches!(log.describe_topic("nope").await, Err(Error::UnknownTopic(_))));
    assert_eq!(log.partition_count("conf-topics").await.expect("partition count"), 3);
    assert!(matches!(log.partition_count("nope").await, Err(Error::UnknownTopic(_))));
    assert!(matches!(log.append("nope", vec![record("a", "k", 1)]).await, Err(Error::UnknownTopic(_))));
    assert!(matches!(log.read("conf-topics", 7, 0, 10, 1 << 20).await, Err(Error::UnknownPartition { .. })));
    assert!(matches!(log.set_retention("nope", 1, 0).await, Err(Error::UnknownTopic(_))));
    match log.set_retention("conf-topics", CHANGED_RETENTION_MS, 0).await {
        Ok(changed) => {
            assert!(retention_changes, "this backend was expected to refuse changing retention");
            let c = changed.config;
            assert_eq!((c.partitions, c.retention_ms, c.retention_bytes), (3, CHANGED_RETENTION_MS, 0));
            assert_eq!(log.describe_topic("conf-topics").await.expect("describe").config.retention_ms, CHANGED_RETENTION_MS);
            assert!(!log.keeps_everything("conf-topics").await.expect("keeps everything"));
        }
        Err(e) => {
            assert!(!retention_changes, "changing retention failed: {e}");
            assert!(matches!(e, Error::Unavailable(_)), "a refused change says why: {e}");
            assert_eq!(
                log.describe_topic("conf-topics").await.expect("describe").config.retention_ms,
                0,
                "a refused change changes nothing"
            );
            assert!(log.keeps_everything("conf-topics").await.expect("keeps everything"));
        }
    }
}

/// Records land in the murmur2 partition of their key, with dense offsets, in order per key.
pub async fn append_read_in_order(log: &dyn Log) {
    log.create_topic("conf-order", config(4)).await.expect("create");
    let keys = ["AG-Berlin/1", "LG-Koeln/2", "OLG-Hamm/3", "AG-Muenchen/4", "AG-Bonn/5"];
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); 4];
    for round in 0..20 {
        let batch: Vec<NewRecord> = keys.iter().map(|k| record(&format!("{k}-{round}"), k, round)).collect();
        let results = log.append("conf-order", batch.clone()).await.expect("append");
        for (r, a) in batch.iter().zip(&results) {
            assert!(!a.duplicate);
            assert_eq!(a.partition, partition_for_key(&r.key, 4));
            assert_eq!(a.offset, expected[a.partition as usize].len() as u64, "dense offsets");
            expected[a.partition as usize].push(r.id.clone());
        }
    }
    for (p, ids) in expected.iter().enumerate() {
        let recs = log.read("conf-order", p as u32, 0, 10_000, 1 << 30).await.expect("read");
        let got: Vec<&String> = recs.iter().map(|r| &r.id).collect();
        assert_eq!(got, ids.iter().collect::<Vec<_>>());
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.offset, i as u64);
            assert_eq!(r.partition, p as u32);
            assert_eq!(r.value, Bytes::from(format!("value of {}", r.id)));
        }
        let offs = log.offsets("conf-order", p as u32).await.expect("offsets");
        assert_eq!((offs.start, offs.end), (0, ids.len() as u64));
    }
}

/// The same id appended twice (in one call, or in two) is stored once.
pub async fn idempotent_append(log: &dyn Log) {
    log.create_topic("conf-dedup", config(2)).await.expect("create");
    let first = log.append("conf-dedup", vec![record("evt-1", "k1", 1)]).await.expect("append")[0];
    let again = log.append("conf-dedup", vec![record("evt-1", "k1", 2)]).await.expect("append")[0];
    assert!(again.duplicate);
    assert_eq!((again.partition, again.offset), (first.partition, first.offset));
    let both = log.append("conf-dedup", vec![record("evt-2", "k1", 3), record("evt-2", "k1", 3)]).await.expect("append");
    assert!(!both[0].duplicate && both[1].duplicate);
    assert_eq!(both[0].offset, both[1].offset);
    let stored = log.read("conf-dedup", first.partition, 0, 100, 1 << 20).await.expect("read");
    assert_eq!(stored.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["evt-1", "evt-2"]);
}

/// Reading from the middle, with limits, past the end.
pub async fn read_limits_and_ranges(log: &dyn Log) {
    log.create_topic("conf-read", config(1)).await.expect("create");
    for i in 0..50 {
        log.append("conf-read", vec![record(&format!("r{i}"), "k", i)]).await.expect("append");
    }
    let mid = log.read("conf-read", 0, 20, 5, 1 << 20).await.expect("read");
    assert_eq!(mid.iter().map(|r| r.offset).collect::<Vec<_>>(), [20, 21, 22, 23, 24]);
    assert!(log.read("conf-read", 0, 50, 5, 1 << 20).await.expect("read").is_empty());
    assert!(log.read("conf-read", 0, 500, 5, 1 << 20).await.expect("read").is_empty());
    let one = log.read("conf-read", 0, 0, 100, 1).await.expect("read");
    assert!(!one.is_empty(), "a byte limit below one record still returns a record");
}

/// Time lookup finds the first record at or after a time.
pub async fn offset_for_time(log: &dyn Log) {
    log.create_topic("conf-time", config(1)).await.expect("create");
    for i in 0..30 {
        log.append("conf-time", vec![record(&format!("t{i}"), "k", 1_000 + i * 10)]).await.expect("append");
    }
    assert_eq!(log.offset_for_time("conf-time", 0, 0).await.expect("time"), 0);
    assert_eq!(log.offset_for_time("conf-time", 0, 1_100).await.expect("time"), 10);
    assert_eq!(log.offset_for_time("conf-time", 0, 1_105).await.expect("time"), 11);
    assert_eq!(log.offset_for_time("conf-time", 0, 99_999).await.expect("time"), 30);
}

/// The high-watermark watch moves after an append.
pub async fn watch_end(log: &dyn Log) {
    log.create_topic("conf-watch", config(1)).await.expect("create");
    let mut rx = log.watch_end("conf-watch", 0).expect("watch");
    assert_eq!(*rx.borrow_and_update(), 0);
    log.append("conf-watch", vec![record("w1", "k", 1)]).await.expect("append");
    tokio::time::timeout(std::time::Duration::from_secs(10), rx.changed()).await.expect("in time").expect("changed");
    assert_eq!(*rx.borrow(), 1);
}

/// Cursors and quarantine entries are stored, listed and removed.
pub async fn group_state(log: &dyn Log) {
    let c = Cursor { committed: 3, scanned: 9, unacked: vec![3, 5, 8], attempts: vec![(3, 2)] };
    log.store_cursors("conf-order", "g1", &[(0, c.clone()), (1, Cursor::default())]).await.expect("store");
    assert_eq!(log.load_cursor("conf-order", "g1", 0).await.expect("load"), Some(c));
    assert_eq!(log.load_cursor("conf-order", "g1", 2).await.expect("load"), None);
    assert!(log.list_groups().await.expect("groups").contains(&("conf-order".to_string(), "g1".to_string())));
    let q = Quarantine { key: b"case-9".to_vec(), partition: 1, offset: 4, event_id: "e9".into(), attempts: 5, since_ms: 77 };
    log.put_quarantine("conf-order", "g1", &q).await.expect("put");
    assert_eq!(log.list_quarantine("conf-order", "g1").await.expect("list"), vec![q.clone()]);
    assert!(log.list_quarantine("conf-order", "g2").await.expect("list").is_empty());
    assert_eq!(log.remove_quarantine("conf-order", "g1", b"case-9").await.expect("remove"), Some(q.clone()));
    log.put_quarantine("conf-order", "g1", &q).await.expect("put");
    assert_eq!(log.load_group_config("conf-order", "g1").await.expect("load"), None);
    let config = GroupConfig { max_attempts: Some(7), ack_deadline_ms: Some(900), ..GroupConfig::default() };
    log.store_group_config("conf-order", "g1", &config).await.expect("store");
    assert_eq!(log.load_group_config("conf-order", "g1").await.expect("load"), Some(config));
}

/// The blob a grant names is granted to its participant only.
pub async fn blob_grants(log: &dyn Log) {
    let (doc, other) = ("ab".repeat(32), "cd".repeat(32));
    assert!(!log.blob_granted(&doc, "DE.Justiz.p1.1").await.expect("granted?"));
    log.grant_blobs(&[]).await.expect("nothing to grant");
    log.grant_blobs(&[(doc.clone(), "DE.Justiz.p1.1".into()), (doc.clone(), "DE.Justiz.p2.1".into())]).await.expect("grant");
    assert!(log.blob_granted(&doc, "DE.Justiz.p1.1").await.expect("granted?"));
    assert!(log.blob_granted(&doc, "DE.Justiz.p2.1").await.expect("granted?"));
    assert!(!log.blob_granted(&doc, "DE.Justiz.p3.1").await.expect("granted?"), "granted to its participants only");
    assert!(!log.blob_granted(&other, "DE.Justiz.p1.1").await.expect("granted?"), "a grant names one blob");
}

/// After close and reopen: topics (with changed retention), blob grants, records, dedup ids, cursors, quarantine and group settings are all there,
/// and offsets continue.
pub async fn survives_restart(log: &dyn Log, retention_changes: bool) {
    let topic = log.describe_topic("conf-topics").await.expect("describe").config;
    let retention = if retention_changes { CHANGED_RETENTION_MS } else { 0 };
    assert_eq!((topic.partitions, topic.retention_ms), (3, retention), "a changed retention survives a restart");
    let recs = log.read("conf-read", 0, 0, 1000, 1 << 30).await.expect("read");
    assert_eq!(recs.len(), 50);
    let next = log.append("conf-read", vec![record("r-after", "k", 99)]).await.expect("append")[0];
    assert_eq!(next.offset, 50);
    let dup = log.append("conf-dedup", vec![record("evt-1", "k1", 5)]).await.expect("append")[0];
    assert!(dup.duplicate, "dedup ids survive a restart");
    assert!(log.blob_granted(&"ab".repeat(32), "DE.Justiz.p2.1").await.expect("granted?"), "blob grants survive a restart");
    assert!(!log.blob_granted(&"ab".repeat(32), "DE.Justiz.p3.1").await.expect("granted?"));
    assert_eq!(log.load_cursor("conf-order", "g1", 0).await.expect("load").map(|c| c.committed), Some(3));
    assert_eq!(log.list_quarantine("conf-order", "g1").await.expect("list").len(), 1);
    assert_eq!(log.load_group_config("conf-order", "g1").await.expect("load").and_then(|c| c.max_attempts), Some(7));
}

/// The hash chain of a partition is the same on every backend (stored or computed), the chain
/// before any offset is known, and checkpoints are stored and listed in offset order.
pub async fn hash_chain(log: &Arc<dyn Log>) {
    use crate::audit::chain::{self, GENESIS};
    log.create_topic("conf-chain", config(1)).await.expect("create");
    let records: Vec<NewRecord> = (0..50).map(|i| record(&format!("chain-{i}"), &format!("k{}", i % 3), 1000 + i)).collect();
    for part in records.chunks(7) {
        log.append("conf-chain", part.to_vec()).await.expect("append");
    }
    let mut expected = Vec::new();
    let mut h = GENESIS;
    for (i, r) in records.iter().enumerate() {
        h = chain::next(&h, i as u64, r.timestamp_ms, r.id.as_bytes(), &r.key, &r.value);
        expected.push(h);
    }
    let chains = crate::audit::Chains::new(log.clone());
    let read = chains.read("conf-chain", 0, 0, 100, 1 << 20).await.expect("read chained");
    assert_eq!(read.iter().map(|(_, h)| *h).collect::<Vec<_>>(), expected);
    // From the middle, and from a fresh reader that must find its own way.
    let fresh = crate::audit::Chains::new(log.clone());
    assert_eq!(fresh.before("conf-chain", 0, 20).await.expect("before"), expected[19]);
    assert_eq!(fresh.before("conf-chain", 0, 0).await.expect("before 0"), GENESIS);
    let middle = fresh.read("conf-chain", 0, 33, 5, 1 << 20).await.expect("middle");
    assert_eq!(middle.iter().map(|(_, h)| *h).collect::<Vec<_>>(), expected[33..38].to_vec());

    let dir = tempfile::tempdir().expect("tempdir");
    let signer = crate::audit::checkpoint::Signer::generate(&dir.path().join("key.pem")).expect("key");
    let later = signer.sign("conf-chain", 0, 40, &expected[40], 2);
    let earlier = signer.sign("conf-chain", 0, 9, &expected[9], 1);
    log.put_checkpoint(&later).await.expect("put");
    log.put_checkpoint(&earlier).await.expect("put");
    assert_eq!(log.list_checkpoints("conf-chain", 0).await.expect("list"), vec![earlier, later.clone()]);
    // A reader without a stored chain starts from the checkpoint nearest below.
    let anchored = crate::audit::Chains::new(log.clone());
    assert_eq!(anchored.before("conf-chain", 0, 45).await.expect("anchored"), expected[44]);
    later.check_signature(&signer.public_key()).expect("signature");
}
