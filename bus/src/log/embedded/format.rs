//! On-disk format of a record batch (all integers little endian).
//!
//! ```text
//! batch header (72 bytes)
//!   0  u32  length      bytes after this field (header rest + records)
//!   4  u32  crc32c      over bytes [8, 4 + length)
//!   9  u8   flags       0
//!  10  u16  reserved
//!  12  u64  base_offset
//!  20  u32  record_count
//!  24  i64  first_timestamp_ms
//!  32  i64  max_timestamp_ms
//!   8  u8   version     2
//!  40  [32] chain       the hash chain value before this batch, h(base_offset - 1)
//! record (repeated record_count times)
//!   u32 offset_delta | i64 timestamp_ms | u16 id_len | u32 key_len | u32 value_len | [32] chain
//!   | id | key | value
//! ```
//!
//! `chain` is the record's value of the per-partition hash chain ([`crate::audit::chain`]),
//! computed on append; all zeros when the log was opened without the chain (`hash_chain =
//! false`, for measuring its cost only).
//!
//! A batch is the unit of a group commit and of recovery: it is written whole and synced, and a
//! batch whose length or CRC does not check out marks the torn tail.

use bytes::Bytes;

use crate::audit::chain::{self, ChainHash, GENESIS};
use crate::log::{NewRecord, StoredRecord};

/// Size of the batch header.
pub const BATCH_HEADER: usize = 72;
/// Size of a record's fixed fields.
pub const RECORD_HEADER: usize = 54;
/// Format version written.
pub const VERSION: u8 = 2;
/// The format before the hash chain (no chain values): never read, never cut off as a torn tail.
pub const OLD_VERSION: u8 = 1;

/// The decoded fixed part of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Total size of the batch on disk, header included.
    pub total_len: u64,
    /// Stored CRC.
    pub crc: u32,
    /// Offset of the first record.
    pub base_offset: u64,
    /// Number of records.
    pub record_count: u32,
    /// Timestamp of the first record.
    pub first_timestamp_ms: i64,
    /// Largest record timestamp.
    pub max_timestamp_ms: i64,
    /// The chain value before the batch.
    pub chain_before: ChainHash,
}

impl BatchHeader {
    /// Offset after the last record.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }
}

/// Encoded size of one record.
pub fn record_size(r: &NewRecord) -> usize {
    RECORD_HEADER + r.id.len() + r.key.len() + r.value.len()
}

/// Encodes records as one batch starting at `base_offset`, appending to `out`. With `chain`
/// (the value before the batch) it stores each record's chain value and returns the last one;
/// without, it stores zeros.
pub fn encode_batch(out: &mut Vec<u8>, base_offset: u64, records: &[&NewRecord], chain: Option<ChainHash>) -> Option<ChainHash> {
    let mut chains = Vec::with_capacity(records.len());
    let mut running = chain;
    for (i, r) in records.iter().enumerate() {
        running = running.map(|prev| chain::next(&prev, base_offset + i as u64, r.timestamp_ms, r.id.as_bytes(), &r.key, &r.value));
        chains.push(running.unwrap_or(GENESIS));
    }
    write_batch(out, base_offset, &chain.unwrap_or(GENESIS), records.iter().copied().zip(chains.iter()));
    running
}

/// Writes one batch with the chain values given (the record at `base_offset + i` is the i-th).
pub fn write_batch<'a>(
    out: &mut Vec<u8>,
    base_offset: u64,
    chain_before: &ChainHash,
    records: impl Iterator<Item = (&'a NewRecord, &'a ChainHash)> + Clone,
) {
    let start = out.len();
    let first_ts = records.clone().next().map(|(r, _)| r.timestamp_ms).unwrap_or(0);
    let max_ts = records.clone().map(|(r, _)| r.timestamp_ms).max().unwrap_or(0);
    let count = records.clone().count();
    out.extend_from_slice(&[0u8; 8]); // length and crc, patched below
    out.push(VERSION);
    out.push(0);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&base_offset.to_le_bytes());
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out.extend_from_slice(&first_ts.to_le_bytes());
    out.extend_from_slice(&max_ts.to_le_bytes());
    out.extend_from_slice(chain_before);
    for (i, (r, chain)) in records.enumerate() {
        out.extend_from_slice(&(i as u32).to_le_bytes());
        out.extend_from_slice(&r.timestamp_ms.to_le_bytes());
        out.extend_from_slice(&(r.id.len() as u16).to_le_bytes());
        out.extend_from_slice(&(r.key.len() as u32).to_le_bytes());
        out.extend_from_slice(&(r.value.len() as u32).to_le_bytes());
        out.extend_from_slice(chain);
        out.extend_from_slice(r.id.as_bytes());
        out.extend_from_slice(&r.key);
        out.extend_from_slice(&r.value);
    }
    let length = (out.len() - start - 4) as u32;
    out[start..start + 4].copy_from_slice(&length.to_le_bytes());
    let crc = crc32c::crc32c(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Why bytes are not a valid batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadBatch {
    /// Fewer bytes than the header or the declared length.
    Short,
    /// Header fields impossible (length, count).
    Malformed(String),
    /// A format version this build does not read.
    Version(u8),
    /// CRC mismatch.
    Crc {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
}

impl std::fmt::Display for BadBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadBatch::Short => write!(f, "incomplete batch"),
            BadBatch::Malformed(m) => write!(f, "malformed batch header: {m}"),
            BadBatch::Version(v) => write!(f, "unknown batch format version {v}"),
            BadBatch::Crc { stored, computed } => write!(f, "CRC mismatch (stored {stored:08x}, computed {computed:08x})"),
        }
    }
}

/// Decodes a batch header from at least [`BATCH_HEADER`] bytes (no CRC check).
pub fn decode_header(b: &[u8]) -> Result<BatchHeader, BadBatch> {
    if b.len() < BATCH_HEADER {
        return Err(BadBatch::Short);
    }
    let length = u64::from(u32_at(b, 0));
    if length < (BATCH_HEADER - 4) as u64 {
        return Err(BadBatch::Malformed(format!("length {length} smaller than a header")));
    }
    if b[8] != VERSION {
        return Err(BadBatch::Version(b[8]));
    }
    let record_count = u32_at(b, 20);
    if record_count == 0 || u64::from(record_count) * RECORD_HEADER as u64 > length {
        return Err(BadBatch::Malformed(format!("record count {record_count} does not fit length {length}")));
    }
    Ok(BatchHeader {
        total_len: length + 4,
        crc: u32_at(b, 4),
        base_offset: u64_at(b, 12),
        record_count,
        first_timestamp_ms: u64_at(b, 24) as i64,
        max_timestamp_ms: u64_at(b, 32) as i64,
        chain_before: b[40..72].try_into().unwrap_or(GENESIS),
    })
}

/// Checks the CRC of a whole batch.
pub fn check_crc(header: &BatchHeader, batch: &[u8]) -> Result<(), BadBatch> {
    if (batch.len() as u64) < header.total_len {
        return Err(BadBatch::Short);
    }
    let computed = crc32c::crc32c(&batch[8..header.total_len as usize]);
    if computed != header.crc {
        return Err(BadBatch::Crc { stored: header.crc, computed });
    }
    Ok(())
}

/// One record of a batch, borrowed from the batch bytes.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    /// Offset (base offset plus delta).
    pub offset: u64,
    /// Milliseconds since the epoch.
    pub timestamp_ms: i64,
    /// Id bytes.
    pub id: &'a [u8],
    /// Key bytes.
    pub key: &'a [u8],
    /// Value bytes.
    pub value: &'a [u8],
    /// The stored chain value.
    pub chain: ChainHash,
}

/// Walks the records of a whole, CRC-checked batch in offset order, stopping at the first
/// record that does not fit in the batch.
pub fn records<'a>(header: &BatchHeader, batch: &'a [u8]) -> impl Iterator<Item = Result<RecordView<'a>, BadBatch>> + 'a {
    records_from(header, batch, 0, BATCH_HEADER)
}

/// Like [`records`], from the `index`-th record, which starts at byte `at` of the batch.
fn records_from<'a>(
    header: &BatchHeader,
    batch: &'a [u8],
    index: u32,
    mut at: usize,
) -> impl Iterator<Item = Result<RecordView<'a>, BadBatch>> + 'a {
    let (base, end, count) = (header.base_offset, (header.total_len as usize).min(batch.len()), header.record_count);
    let mut failed = false;
    (index.min(count)..count).map_while(move |_| {
        if failed {
            return None;
        }
        if at + RECORD_HEADER > end {
            failed = true;
            return Some(Err(BadBatch::Malformed("record header past batch end".into())));
        }
        let delta = u64::from(u32_at(batch, at));
        let timestamp_ms = u64_at(batch, at + 4) as i64;
        let id_len = u16::from_le_bytes([batch[at + 12], batch[at + 13]]) as usize;
        let key_len = u32_at(batch, at + 14) as usize;
        let value_len = u32_at(batch, at + 18) as usize;
        let chain: ChainHash = batch[at + 22..at + 54].try_into().unwrap_or(GENESIS);
        let body = at + RECORD_HEADER;
        let stop = body + id_len + key_len + value_len;
        if stop > end {
            failed = true;
            return Some(Err(BadBatch::Malformed("record body past batch end".into())));
        }
        at = stop;
        Some(Ok(RecordView {
            offset: base + delta,
            timestamp_ms,
            id: &batch[body..body + id_len],
            key: &batch[body + id_len..body + id_len + key_len],
            value: &batch[body + id_len + key_len..stop],
            chain,
        }))
    })
}

/// Where each record of a whole, CRC-checked batch starts (byte positions in the batch).
pub fn record_starts(header: &BatchHeader, batch: &[u8]) -> Result<Vec<u32>, BadBatch> {
    let mut starts = Vec::with_capacity(header.record_count as usize);
    let mut at = BATCH_HEADER;
    for r in records(header, batch) {
        let r = r?;
        starts.push(at as u32);
        at += RECORD_HEADER + r.id.len() + r.key.len() + r.value.len();
    }
    Ok(starts)
}

/// Decodes the records of a whole, CRC-checked batch, keeping those at or after `from`, at most
/// `max` of them.
pub fn decode_records(
    header: &BatchHeader,
    batch: &[u8],
    partition: u32,
    from: u64,
    max: usize,
    out: &mut Vec<StoredRecord>,
) -> Result<(), BadBatch> {
    decode_records_at(header, batch, None, partition, from, max, &Bytes::copy_from_slice, out)
}

/// [`decode_records`] starting at a known record: `start` is (its index in the batch, its byte
/// position), from [`record_starts`]. `value` makes a record's value out of its bytes in
/// `batch` (a copy, or a share of the batch's buffer).
#[allow(clippy::too_many_arguments)]
pub fn decode_records_at(
    header: &BatchHeader,
    batch: &[u8],
    start: Option<(usize, usize)>,
    partition: u32,
    from: u64,
    max: usize,
    value: &dyn Fn(&[u8]) -> Bytes,
    out: &mut Vec<StoredRecord>,
) -> Result<(), BadBatch> {
    let limit = out.len().saturating_add(max);
    let (index, at) = start.unwrap_or((0, BATCH_HEADER));
    for r in records_from(header, batch, index as u32, at) {
        let r = r?;
        if out.len() >= limit {
            break;
        }
        if r.offset >= from {
            out.push(StoredRecord {
                partition,
                offset: r.offset,
                timestamp_ms: r.timestamp_ms,
                id: String::from_utf8_lossy(r.id).into_owned(),
                key: Bytes::copy_from_slice(r.key),
                value: value(r.value),
                chain: (r.chain != GENESIS).then_some(r.chain),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(id: &str, key: &[u8], value: &[u8], ts: i64) -> NewRecord {
        NewRecord { id: id.into(), key: Bytes::copy_from_slice(key), timestamp_ms: ts, value: Bytes::copy_from_slice(value) }
    }

    proptest! {
        #[test]
        fn roundtrip(records in proptest::collection::vec(("[a-z0-9-]{1,20}", proptest::collection::vec(any::<u8>(), 0..40),
                        proptest::collection::vec(any::<u8>(), 0..200), any::<i64>()), 1..20),
                     base in 0u64..1_000_000) {
            let recs: Vec<NewRecord> = records.iter().map(|(i, k, v, t)| rec(i, k, v, *t)).collect();
            let refs: Vec<&NewRecord> = recs.iter().collect();
            let mut buf = Vec::new();
            let last = encode_batch(&mut buf, base, &refs, Some(GENESIS));
            let header = decode_header(&buf).expect("header");
            prop_assert_eq!(header.total_len as usize, buf.len());
            check_crc(&header, &buf).expect("crc");
            let mut out = Vec::new();
            decode_records(&header, &buf, 3, 0, usize::MAX, &mut out).expect("records");
            prop_assert_eq!(out.len(), recs.len());
            for (i, (o, r)) in out.iter().zip(&recs).enumerate() {
                prop_assert_eq!(o.offset, base + i as u64);
                prop_assert_eq!(&o.id, &r.id);
                prop_assert_eq!(&o.key, &r.key);
                prop_assert_eq!(&o.value, &r.value);
                prop_assert_eq!(o.timestamp_ms, r.timestamp_ms);
            }
            // Each record carries its chain value, the last one is returned.
            let mut h = GENESIS;
            for o in &out {
                h = chain::next(&h, o.offset, o.timestamp_ms, o.id.as_bytes(), &o.key, &o.value);
                prop_assert_eq!(o.chain, Some(h));
            }
            prop_assert_eq!(last, Some(h));
            // Starting at a record's known position reads the same as walking up to it.
            let starts = record_starts(&header, &buf).expect("starts");
            prop_assert_eq!(starts.len(), recs.len());
            for (skip, &at) in starts.iter().enumerate() {
                let mut direct = Vec::new();
                decode_records_at(&header, &buf, Some((skip, at as usize)), 3, base + skip as u64, 2, &Bytes::copy_from_slice, &mut direct).expect("direct");
                prop_assert_eq!(&direct[..], &out[skip..(skip + 2).min(out.len())]);
            }
            // Any single flipped byte after the length field is caught.
            let at = 4 + (base as usize % (buf.len() - 4));
            let mut bad = buf.clone();
            bad[at] ^= 0x5a;
            let caught = match decode_header(&bad) { Err(_) => true, Ok(h) => check_crc(&h, &bad).is_err() };
            prop_assert!(caught);
        }
    }
}
