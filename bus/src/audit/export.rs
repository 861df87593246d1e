//! The proof export: a range of one partition with everything needed to check it offline.
//!
//! A file of JSON lines (`justizbus replay --with-proof`), each one of:
//!
//! ```text
//! {"range":{"topic":..,"partition":..,"from":..,"to":..,"chain_before":HEX}}   first line
//! {"record":{"offset":..,"timestamp_ms":..,"id":..,"key_base64":..,"value_base64":..,"chain":HEX}}
//! {"digest":{"offset":..,"digest":HEX,"chain":HEX}}     records after the range, up to the
//!                                                      checkpoint that covers it: digest only
//! {"checkpoint":{...}}                                 signed checkpoints within the export
//! ```
//!
//! `justizbus audit check-export FILE --key PUBKEY` recomputes the chain from `chain_before`
//! through every record and digest and requires a checkpoint, signed by the key, whose value
//! matches at or after the last record of the range: then no record of the range can have been
//! altered, removed, inserted or reordered since that checkpoint was signed.

use std::io::BufRead;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::chain::{unhex, ChainHash};
use super::checkpoint::{Checkpoint, TrustedKeys};
use super::verify::{PartitionCheck, PartitionReport};
use crate::{Error, Result};

/// The range header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRange {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// First offset of the range.
    pub from: u64,
    /// Offset after the range.
    pub to: u64,
    /// h(from - 1), hex.
    pub chain_before: String,
}

/// One record of the range, whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRecord {
    /// Offset.
    pub offset: u64,
    /// Log timestamp.
    pub timestamp_ms: i64,
    /// Record id (the event id).
    pub id: String,
    /// Key, base64.
    pub key_base64: String,
    /// Stored value (the encoded envelope), base64.
    pub value_base64: String,
    /// h(offset), hex.
    pub chain: String,
}

/// A record after the range, by its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportDigest {
    /// Offset.
    pub offset: u64,
    /// The record's digest, hex.
    pub digest: String,
    /// h(offset), hex.
    pub chain: String,
}

/// One line of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportLine {
    /// The range header.
    Range(ExportRange),
    /// A record.
    Record(ExportRecord),
    /// A record beyond the range.
    Digest(ExportDigest),
    /// A signed checkpoint.
    Checkpoint(Checkpoint),
}

fn hash(field: &str, text: &str) -> Result<ChainHash> {
    unhex(text).ok_or_else(|| Error::invalid(field, "not 64 hex digits"))
}

fn b64(field: &str, text: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(text).map_err(|e| Error::invalid(field, e.to_string()))
}

/// Checks an export line by line: the range header first, then the checkpoints, then the
/// records and digests in offset order.
pub struct ExportCheck {
    keys: TrustedKeys,
    range: Option<ExportRange>,
    checkpoints: Vec<Checkpoint>,
    check: Option<PartitionCheck>,
    last_in_range: Option<u64>,
    /// Bytes of record fields seen.
    pub bytes: u64,
}

impl ExportCheck {
    /// A check against the trusted keys.
    pub fn new(keys: TrustedKeys) -> Self {
        ExportCheck { keys, range: None, checkpoints: Vec::new(), check: None, last_in_range: None, bytes: 0 }
    }

    fn started(&mut self) -> Result<&mut PartitionCheck> {
        if self.check.is_none() {
            let range =
                self.range.as_ref().ok_or_else(|| Error::invalid("export", "the first line must be the range header {\"range\":{...}}"))?;
            let before = hash("chain_before", &range.chain_before)?;
            let mut check =
                PartitionCheck::new(&range.topic, range.partition, &self.keys, std::mem::take(&mut self.checkpoints), range.from, before);
            if range.from == 0 && before != super::chain::GENESIS {
                check.fail(0, "the chain before offset 0 must be all zeros");
            }
            self.check = Some(check);
        }
        self.check.as_mut().ok_or_else(|| Error::Internal("export check not started".into()))
    }

    /// Takes the next line.
    pub fn line(&mut self, line: ExportLine) -> Result<()> {
        match line {
            ExportLine::Range(r) => {
                if self.range.is_some() {
                    return Err(Error::invalid("export", "more than one range header"));
                }
                self.range = Some(r);
            }
            ExportLine::Checkpoint(c) => {
                if self.range.is_none() || self.check.is_some() {
                    return Err(Error::invalid("export", "checkpoints must follow the range header and precede the records"));
                }
                self.checkpoints.push(c);
            }
            ExportLine::Record(r) => {
                let (from, to) = self.range.as_ref().map_or((0, 0), |g| (g.from, g.to));
                let (k, v) = (b64("key_base64", &r.key_base64)?, b64("value_base64", &r.value_base64)?);
                let stored = hash("chain", &r.chain)?;
                self.bytes += (r.id.len() + k.len() + v.len()) as u64;
                let check = self.started()?;
                if r.offset < from || r.offset >= to {
                    check.fail(r.offset, format!("record {} lies outside the exported range {from}..{to}", r.offset));
                } else {
                    check.record(r.offset, r.timestamp_ms, r.id.as_bytes(), &k, &v, Some(stored));
                    self.last_in_range = Some(r.offset);
                }
            }
            ExportLine::Digest(d) => {
                let to = self.range.as_ref().map_or(0, |g| g.to);
                let (digest, stored) = (hash("digest", &d.digest)?, hash("chain", &d.chain)?);
                let check = self.started()?;
                if d.offset < to {
                    check.fail(d.offset, format!("record {} of the range is given by its digest only", d.offset));
                } else {
                    check.digest(d.offset, &digest, Some(stored));
                }
            }
        }
        Ok(())
    }

    /// Ends the check. With `require_signed`, the end of the range must be covered by a
    /// checkpoint (an auditor's export); without, records not yet signed are only reported.
    pub fn finish(mut self, require_signed: bool) -> Result<PartitionReport> {
        let (from, to) = self.range.as_ref().map_or((0, 0), |g| (g.from, g.to));
        let last_in_range = self.last_in_range;
        let check = self.started()?;
        let expected_last = to.checked_sub(1).filter(|l| *l >= from);
        if last_in_range != expected_last && !check.broken() {
            let at = last_in_range.map_or(from, |o| o + 1);
            check.fail(at, format!("the range {from}..{to} is not complete: records from {at} are missing"));
        }
        let Some(check) = self.check.take() else { return Err(Error::Internal("export check not started".into())) };
        let mut report = check.finish(false);
        if require_signed && report.ok() && expected_last.is_some_and(|l| report.signed_through.is_none_or(|s| s < l)) {
            report.findings.push(super::verify::Finding {
                offset: report.signed_through.map_or(from, |s| s + 1),
                what: "no checkpoint signed by the key covers the end of the range".into(),
            });
        }
        Ok(report)
    }
}

/// Checks an export file read from `input` against the trusted keys; the end of its range
/// must be signed. A file that is not an export at all is an error.
pub fn check_export(input: impl BufRead, keys: TrustedKeys) -> Result<PartitionReport> {
    let mut check = ExportCheck::new(keys);
    for (n, line) in input.lines().enumerate() {
        let line = line.map_err(|e| Error::io("reading the export", e))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: ExportLine = serde_json::from_str(&line).map_err(|e| Error::invalid("export", format!("line {}: {e}", n + 1)))?;
        check.line(parsed)?;
    }
    check.finish(true)
}
