//! The one checker behind `audit verify` (offline and online) and `audit check-export`: fed a
//! partition's records in order and its checkpoints, it recomputes the chain and names the
//! first offset where anything differs.

use serde::Serialize;

use super::chain::{self, hex, ChainHash, GENESIS};
use super::checkpoint::{Checkpoint, TrustedKeys};

/// Something that does not match, at an offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// The offset where it differs.
    pub offset: u64,
    /// What differs.
    pub what: String,
}

/// The result of checking one partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionReport {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// First offset checked.
    pub start: u64,
    /// Offset after the last record checked.
    pub end: u64,
    /// Records checked.
    pub records: u64,
    /// Bytes of records checked (ids, keys, values).
    pub bytes: u64,
    /// Checkpoints whose signature and value were checked.
    pub checkpoints_checked: u64,
    /// Checkpoints before the stored range (removed by retention; signature checked only).
    pub checkpoints_before_start: u64,
    /// The last offset a checked checkpoint covers.
    pub signed_through: Option<u64>,
    /// Records after the last checkpoint (not yet signed).
    pub unsigned_tail: u64,
    /// The chain value after the last record.
    pub chain: String,
    /// Everything that differs, by offset; the first is the first difference.
    pub findings: Vec<Finding>,
    /// Remarks that are not failures (e.g. a torn tail that was never acknowledged).
    pub notes: Vec<String>,
}

impl PartitionReport {
    /// True when nothing differs.
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }

    /// One line of text.
    pub fn line(&self) -> String {
        match self.findings.first() {
            None => format!(
                "ok    {}/{}: offsets {}..{} ({} records), {} checkpoints checked, signed through {}{}",
                self.topic,
                self.partition,
                self.start,
                self.end,
                self.records,
                self.checkpoints_checked,
                self.signed_through.map_or("nothing".into(), |o| o.to_string()),
                if self.unsigned_tail > 0 { format!(", {} records not yet signed", self.unsigned_tail) } else { String::new() }
            ),
            Some(f) => format!(
                "FAIL  {}/{} at offset {}: {}{}",
                self.topic,
                self.partition,
                f.offset,
                f.what,
                if self.findings.len() > 1 { format!(" (and {} more findings)", self.findings.len() - 1) } else { String::new() }
            ),
        }
    }
}

/// Checks one partition.
pub struct PartitionCheck {
    report: PartitionReport,
    /// Checkpoints with a valid signature, ascending, not yet reached.
    pending: std::collections::VecDeque<Checkpoint>,
    running: ChainHash,
    next: u64,
    /// After the first record-level difference the chain is meaningless: stop comparing.
    broken: bool,
}

impl PartitionCheck {
    /// Starts checking `topic`/`partition` at `start`, the chain value before being
    /// `chain_before`, against `checkpoints` signed by one of `keys`.
    pub fn new(
        topic: &str,
        partition: u32,
        keys: &TrustedKeys,
        mut checkpoints: Vec<Checkpoint>,
        start: u64,
        chain_before: ChainHash,
    ) -> Self {
        let mut report = PartitionReport {
            topic: topic.to_string(),
            partition,
            start,
            end: start,
            records: 0,
            bytes: 0,
            checkpoints_checked: 0,
            checkpoints_before_start: 0,
            signed_through: None,
            unsigned_tail: 0,
            chain: hex(&chain_before),
            findings: Vec::new(),
            notes: Vec::new(),
        };
        checkpoints.sort_by_key(|c| c.offset);
        let mut pending = std::collections::VecDeque::new();
        for cp in checkpoints {
            if cp.topic != topic || cp.partition != partition {
                report.findings.push(Finding {
                    offset: cp.offset,
                    what: format!("checkpoint stored with {topic}/{partition} names {}/{}", cp.topic, cp.partition),
                });
            } else if let Err(why) = keys.check(&cp) {
                report.findings.push(Finding { offset: cp.offset, what: format!("checkpoint signed at {} ms: {why}", cp.time_ms) });
            } else if cp.offset + 1 < start {
                report.checkpoints_before_start += 1;
            } else if cp.offset + 1 == start {
                // Covers exactly what precedes the range: compare with the chain value before.
                if cp.chain_hash() != Some(chain_before) {
                    report.findings.push(Finding {
                        offset: cp.offset,
                        what: format!(
                            "checkpoint says h = {}, the stored chain value before offset {start} is {}",
                            cp.chain,
                            hex(&chain_before)
                        ),
                    });
                } else {
                    report.checkpoints_checked += 1;
                    report.signed_through = Some(cp.offset);
                }
            } else {
                pending.push_back(cp);
            }
        }
        PartitionCheck { report, pending, running: chain_before, next: start, broken: false }
    }

    /// The offset expected next.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    /// Records a difference found by the caller (e.g. a damaged batch).
    pub fn fail(&mut self, offset: u64, what: impl Into<String>) {
        self.report.findings.push(Finding { offset, what: what.into() });
        self.broken = true;
    }

    /// Records a difference that leaves the records' chain intact (e.g. an unreadable
    /// checkpoint line): checking goes on.
    pub fn finding(&mut self, offset: u64, what: impl Into<String>) {
        self.report.findings.push(Finding { offset, what: what.into() });
    }

    /// Records a remark that is not a failure.
    pub fn note(&mut self, note: impl Into<String>) {
        self.report.notes.push(note.into());
    }

    /// True once a record-level difference was found.
    pub fn broken(&self) -> bool {
        self.broken
    }

    /// The next record, with the chain value stored with it (None where none is stored).
    pub fn record(&mut self, offset: u64, timestamp_ms: i64, id: &[u8], key: &[u8], value: &[u8], stored: Option<ChainHash>) {
        self.report.bytes += (id.len() + key.len() + value.len()) as u64;
        self.digest(offset, &chain::record_digest(timestamp_ms, id, key, value), stored);
    }

    /// The next record given by its digest only (an export's proof beyond its range).
    pub fn digest(&mut self, offset: u64, digest: &ChainHash, stored: Option<ChainHash>) {
        self.report.records += 1;
        if self.broken {
            return;
        }
        if offset != self.next {
            let what = if offset > self.next {
                format!("records {}..{} are missing (the next stored record has offset {offset})", self.next, offset)
            } else {
                format!("record with offset {offset} where offset {} was expected (reordered or duplicated)", self.next)
            };
            self.fail(self.next, what);
            return;
        }
        let computed = chain::link(&self.running, offset, digest);
        if let Some(stored) = stored {
            if stored == GENESIS {
                self.fail(offset, "record has no chain value (appended with hash_chain = false)");
                return;
            }
            if stored != computed {
                self.fail(
                    offset,
                    format!(
                        "record does not match the chain: stored h = {}, recomputed h = {} (the record was altered, or one before it removed or reordered)",
                        hex(&stored),
                        hex(&computed)
                    ),
                );
                return;
            }
        }
        self.running = computed;
        self.next = offset + 1;
        self.report.end = self.next;
        while self.pending.front().is_some_and(|c| c.offset <= offset) {
            let Some(cp) = self.pending.pop_front() else { break };
            if cp.offset < offset {
                continue; // cannot happen with dense offsets; an earlier mismatch stopped us
            }
            if cp.chain_hash() != Some(computed) {
                self.fail(
                    offset,
                    format!("checkpoint signed at {} ms says h = {}, the records give h = {}", cp.time_ms, cp.chain, hex(&computed)),
                );
                return;
            }
            self.report.checkpoints_checked += 1;
            self.report.signed_through = Some(offset);
        }
    }

    /// The chain value after the records so far.
    pub fn chain(&self) -> ChainHash {
        self.running
    }

    /// Ends the check at the end of the stored records. With `require_signed`, records after
    /// the last checkpoint count as a failure (an export must be covered entirely).
    pub fn finish(mut self, require_signed: bool) -> PartitionReport {
        if !self.broken {
            if let Some(cp) = self.pending.front() {
                let what = format!(
                    "the log ends at offset {} but a checkpoint signed at {} ms covers up to offset {}: records {}..={} are missing (tail truncated)",
                    self.next, cp.time_ms, cp.offset, self.next, cp.offset
                );
                self.report.findings.push(Finding { offset: self.next, what });
            }
        }
        let signed_end = self.report.signed_through.map_or(self.report.start, |o| o + 1);
        self.report.unsigned_tail = self.report.end.saturating_sub(signed_end);
        if require_signed && self.report.unsigned_tail > 0 && !self.broken {
            self.report.findings.push(Finding {
                offset: signed_end,
                what: format!("records {signed_end}..{} are not covered by any signed checkpoint", self.report.end),
            });
        }
        self.report.chain = hex(&self.running);
        self.report.findings.sort_by_key(|f| f.offset);
        self.report
    }
}

/// The result of checking many partitions.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// True when every partition matched.
    pub ok: bool,
    /// The trusted keys, hex.
    pub keys: Vec<String>,
    /// Records checked in all.
    pub records: u64,
    /// Bytes of log read.
    pub bytes: u64,
    /// Seconds it took.
    pub seconds: f64,
    /// Per partition.
    pub partitions: Vec<PartitionReport>,
}

impl VerifyReport {
    /// Collects partition reports.
    pub fn new(keys: &TrustedKeys, partitions: Vec<PartitionReport>, bytes: u64, seconds: f64) -> Self {
        VerifyReport {
            ok: partitions.iter().all(|p| p.ok()),
            keys: keys.0.iter().map(|k| k.hex()).collect(),
            records: partitions.iter().map(|p| p.records).sum(),
            bytes,
            seconds,
            partitions,
        }
    }

    /// Human-readable lines.
    pub fn text(&self) -> String {
        let mut out: String = self.partitions.iter().map(|p| p.line() + "\n").collect();
        for p in &self.partitions {
            for n in &p.notes {
                out.push_str(&format!("note  {}/{}: {n}\n", p.topic, p.partition));
            }
        }
        let failed = self.partitions.iter().filter(|p| !p.ok()).count();
        out.push_str(&format!(
            "{}: {} partitions, {} records, {:.1} MB in {:.2} s, trusted key {}{}\n",
            if self.ok { "VERIFIED" } else { "FAILED" },
            self.partitions.len(),
            self.records,
            self.bytes as f64 / 1e6,
            self.seconds,
            self.keys.join(", "),
            if failed > 0 { format!(", {failed} partitions differ") } else { String::new() }
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::checkpoint::Signer;
    use super::*;

    struct Rec {
        offset: u64,
        value: Vec<u8>,
    }

    fn records(n: u64) -> Vec<Rec> {
        (0..n).map(|offset| Rec { offset, value: format!("v{offset}").into_bytes() }).collect()
    }

    fn chains(recs: &[Rec]) -> Vec<ChainHash> {
        let mut h = GENESIS;
        recs.iter()
            .map(|r| {
                h = chain::next(&h, r.offset, 0, b"id", b"k", &r.value);
                h
            })
            .collect()
    }

    fn check(recs: &[Rec], stored: &[ChainHash], cps: Vec<Checkpoint>, key: super::super::checkpoint::PublicKey) -> PartitionReport {
        let mut c = PartitionCheck::new("t", 0, &key.into(), cps, 0, GENESIS);
        for (r, s) in recs.iter().zip(stored) {
            c.record(r.offset, 0, b"id", b"k", &r.value, Some(*s));
        }
        c.finish(false)
    }

    #[test]
    fn names_the_offset_of_each_kind_of_tampering() {
        let dir = tempfile::tempdir().expect("tempdir");
        let signer = Signer::generate(&dir.path().join("k")).expect("key");
        let key = signer.public_key();
        let recs = records(10);
        let good = chains(&recs);
        let cps = vec![signer.sign("t", 0, 4, &good[4], 1), signer.sign("t", 0, 9, &good[9], 2)];
        let ok = check(&recs, &good, cps.clone(), key);
        assert!(ok.ok(), "{:?}", ok.findings);
        assert_eq!((ok.checkpoints_checked, ok.signed_through, ok.unsigned_tail), (2, Some(9), 0));

        let mut altered = records(10);
        altered[6].value[0] ^= 1;
        assert_eq!(check(&altered, &good, cps.clone(), key).findings[0].offset, 6);

        let mut removed = records(10);
        removed.remove(3);
        let mut removed_chains = good.clone();
        removed_chains.remove(3);
        assert_eq!(check(&removed, &removed_chains, cps.clone(), key).findings[0].offset, 3);

        let mut swapped = records(10);
        swapped.swap(2, 3);
        swapped[2].offset = 2;
        swapped[3].offset = 3;
        assert_eq!(check(&swapped, &good, cps.clone(), key).findings[0].offset, 2);

        // Rewriting every stored chain value along with the record is caught by the checkpoint.
        let mut rewritten = records(10);
        rewritten[2].value = b"forged".to_vec();
        let forged = chains(&rewritten);
        assert_eq!(check(&rewritten, &forged, cps.clone(), key).findings[0].offset, 4);

        let truncated = check(&recs[..7], &good[..7], cps.clone(), key);
        assert_eq!(truncated.findings[0].offset, 7, "{:?}", truncated.findings);

        let other = Signer::generate(&dir.path().join("o")).expect("key");
        let replaced = vec![cps[0].clone(), other.sign("t", 0, 9, &good[9], 2)];
        assert_eq!(check(&recs, &good, replaced, key).findings[0].offset, 9);
    }
}
