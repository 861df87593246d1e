//! The mailbox index as a file: written when the bus shuts down cleanly, read at the next start,
//! so that start reads only the store records written after it instead of the whole store
//! (as Kafka's clean-shutdown marker spares it the log recovery).
//!
//! A cache: a file that does not check out (format, checksum, partition count, hasher, an id
//! window smaller than today's, or a store that no longer holds the records the file ends with,
//! or has deleted records written after it) is ignored, and the index is rebuilt from the whole
//! store. A file from an earlier clean shutdown stays valid after later writes and crashes: the
//! start reads the records after it.
//!
//! Layout (little endian): magic, version, hasher seed and check value, id window, per store
//! partition its [`StorePartition`] and the id of its last record indexed, the mailboxes (name,
//! start, entries), the ids; then a CRC32C of everything before.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::io::{BufRead, Read, Write};
use std::path::Path;

use bytes::BufMut;

use super::{Index, Mailbox, StorePartition};
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"JBMBXIDX";
const VERSION: u32 = 1;

/// What the hasher of a seed gives for a fixed input: a file whose value differs was hashed
/// otherwise (another version of the hash function) and its ids would not be found.
pub(super) fn hasher_check(index: &Index) -> u64 {
    index.hasher.hash_one(("justizbus", "mailbox index"))
}

/// Writes the index to `path` whole or not at all (a temporary file, synced, renamed, and the
/// directory synced), streaming: the index may be large. `last_ids`: per store partition, the
/// id of the record before its end. Returns the bytes written.
pub(super) fn write(path: &Path, index: &Index, last_ids: &[String]) -> Result<u64> {
    let tmp = path.with_extension("tmp");
    let io = |what: &str, e: std::io::Error| Error::io(format!("{what} {}", tmp.display()), e);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let file = std::fs::File::create(&tmp).map_err(|e| io("creating", e))?;
    let mut w = Staged { file: std::io::BufWriter::new(file), buf: Vec::with_capacity(STAGE_BYTES), crc: 0, written: 0 };
    w.buf.put_slice(MAGIC);
    w.buf.put_u32_le(VERSION);
    w.buf.put_u64_le(index.seed);
    w.buf.put_u64_le(hasher_check(index));
    w.buf.put_u64_le(index.id_window);
    w.buf.put_u32_le(index.store.len() as u32);
    for (store, last_id) in index.store.iter().zip(last_ids) {
        for v in [store.start, store.end, store.records, store.ids_forgotten] {
            w.buf.put_u64_le(v);
        }
        w.buf.put_u32_le(store.marks.len() as u32);
        for &(before, offset) in &store.marks {
            w.buf.put_u64_le(before);
            w.buf.put_u64_le(offset);
        }
        put_text(&mut w.buf, last_id);
    }
    // Mailboxes that never held a record are left out, as the store leaves them out of a
    // rebuild from it (a reader made them known; the directory knows them anyway).
    let held = || index.mailboxes.iter().filter(|(_, mb)| mb.start > 0 || !mb.entries.is_empty());
    w.buf.put_u64_le(held().count() as u64);
    for (name, mb) in held() {
        put_text(&mut w.buf, name);
        w.buf.put_u64_le(mb.start);
        w.buf.put_u64_le(mb.entries.len() as u64);
        for &(offset, timestamp_ms) in &mb.entries {
            w.buf.put_u64_le(offset);
            w.buf.put_i64_le(timestamp_ms);
            w.flush_if_full().map_err(|e| io("writing", e))?;
        }
    }
    w.buf.put_u64_le(index.ids.len() as u64);
    for shard in 0..crate::sharded::SHARDS {
        for &(h, position) in index.ids.shard_at(shard).iter() {
            w.buf.put_u64_le(h);
            w.buf.put_u64_le(position);
            w.flush_if_full().map_err(|e| io("writing", e))?;
        }
    }
    w.stage().map_err(|e| io("writing", e))?;
    let crc = w.crc;
    w.file.write_all(&crc.to_le_bytes()).map_err(|e| io("writing", e))?;
    let file = w.file.into_inner().map_err(|e| io("writing", e.into_error()))?;
    file.sync_all().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("renaming", e))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(format!("syncing {}", dir.display()), e))?;
    }
    Ok(w.written + 4)
}

/// Bytes gathered before they are checksummed and written.
const STAGE_BYTES: usize = 1 << 20;

/// A file written through a staging buffer, with the CRC32C of everything staged.
struct Staged {
    file: std::io::BufWriter<std::fs::File>,
    buf: Vec<u8>,
    crc: u32,
    written: u64,
}

impl Staged {
    fn flush_if_full(&mut self) -> std::io::Result<()> {
        if self.buf.len() >= STAGE_BYTES {
            self.stage()?;
        }
        Ok(())
    }

    fn stage(&mut self) -> std::io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, &self.buf);
        self.file.write_all(&self.buf)?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }
}

fn put_text(b: &mut Vec<u8>, text: &str) {
    b.put_u32_le(text.len() as u32);
    b.put_slice(text.as_bytes());
}

/// The index the file at `path` holds (without end marks, which the cursor store keeps) and
/// the id of each store partition's last record indexed, for an index of `id_window` over
/// `partitions` store partitions. Read as a stream; the checksum is checked at the end.
pub(super) fn read(path: &Path, partitions: u32, id_window: u64) -> Result<(Index, Vec<String>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
    let mut r = Reader { file: std::io::BufReader::new(file), crc: 0 };
    if r.take(8)? != MAGIC || r.u32()? != VERSION {
        return Err(unusable("not an index file of this version"));
    }
    let seed = r.u64()?;
    let mut index = Index::seeded(seed, id_window);
    if r.u64()? != hasher_check(&index) {
        return Err(unusable("ids hashed otherwise"));
    }
    // A smaller window forgot ids the log's dedup window may still hold.
    if r.u64()? < id_window {
        return Err(unusable("id window smaller than configured"));
    }
    if r.u32()? != partitions {
        return Err(unusable("store partitions differ"));
    }
    let mut last_ids = Vec::with_capacity(partitions as usize);
    for _ in 0..partitions {
        let (start, end, records, ids_forgotten) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
        let marks = (0..r.u32()?).map(|_| Ok((r.u64()?, r.u64()?))).collect::<Result<VecDeque<_>>>()?;
        index.store.push(StorePartition { start, end, records, marks, ids_forgotten });
        last_ids.push(r.text()?);
    }
    for _ in 0..r.u64()? {
        let name = r.text()?;
        let mut mb = Mailbox::starting_at(r.u64()?);
        let count = r.u64()?;
        r.pairs(count, |offset, timestamp_ms| mb.entries.push((offset, timestamp_ms as i64)))?;
        mb.end.send_replace(mb.next_seq());
        index.mailboxes.insert(name, mb);
    }
    let count = r.u64()?;
    r.pairs(count, |h, position| {
        index.ids.shard_mut(h).insert_unique(h, (h, position), |&(h, _)| h);
    })?;
    let computed = r.crc;
    if r.u32()? != computed {
        return Err(unusable("checksum"));
    }
    if r.file.fill_buf().map_err(|e| Error::io("reading the mailbox index file", e))?.is_empty() {
        Ok((index, last_ids))
    } else {
        Err(unusable("trailing bytes"))
    }
}

fn unusable(why: &str) -> Error {
    Error::State(format!("mailbox index file unusable: {why}"))
}

/// Reads what [`write`] wrote, with the CRC32C of everything read.
struct Reader {
    file: std::io::BufReader<std::fs::File>,
    crc: u32,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut bytes = vec![0; n];
        self.fill(&mut bytes)?;
        Ok(bytes)
    }

    fn fill(&mut self, bytes: &mut [u8]) -> Result<()> {
        self.file.read_exact(bytes).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => unusable("truncated"),
            _ => Error::io("reading the mailbox index file", e),
        })?;
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        Ok(())
    }

    fn u32(&mut self) -> Result<u32> {
        let mut b = [0; 4];
        self.fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads `count` pairs of u64, a block at a time (a count from a damaged file must not
    /// allocate before the checksum fails).
    fn pairs(&mut self, count: u64, mut each: impl FnMut(u64, u64)) -> Result<()> {
        const BLOCK: u64 = 64 * 1024;
        let mut block = Vec::new();
        let mut left = count;
        while left > 0 {
            let n = left.min(BLOCK);
            block.resize(n as usize * 16, 0);
            self.fill(&mut block)?;
            for pair in block.chunks_exact(16) {
                let (a, b) = pair.split_at(8);
                each(u64::from_le_bytes(a.try_into().expect("8 bytes")), u64::from_le_bytes(b.try_into().expect("8 bytes")));
            }
            left -= n;
        }
        Ok(())
    }

    fn text(&mut self) -> Result<String> {
        let len = self.u32()? as usize;
        if len > 1 << 16 {
            return Err(unusable("text too long"));
        }
        String::from_utf8(self.take(len)?).map_err(|_| unusable("text"))
    }
}
