//! One segment: an append-only `.log` file of batches and its sparse `.index`.
//!
//! Index entries (16 bytes each: `u32` offset relative to the segment base, `u32` file position,
//! `i64` largest timestamp of all records *before* that position) point at batch starts, one
//! per `index_interval_bytes` of log. The index of the active segment is rebuilt on recovery;
//! a sealed segment's index is synced when the segment is rolled.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;

use super::format::{self, BadBatch, BatchHeader, BATCH_HEADER};
use crate::log::StoredRecord;
use crate::{Error, Result};

/// Size of one index entry on disk.
pub const INDEX_ENTRY: usize = 16;

/// A sparse index entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Offset of the batch at `position`, relative to the segment base.
    pub rel_offset: u32,
    /// File position of a batch start.
    pub position: u32,
    /// Largest timestamp of the records before `position` (i64::MIN if none).
    pub max_ts_before: i64,
}

impl IndexEntry {
    fn encode(&self) -> [u8; INDEX_ENTRY] {
        let mut b = [0u8; INDEX_ENTRY];
        b[0..4].copy_from_slice(&self.rel_offset.to_le_bytes());
        b[4..8].copy_from_slice(&self.position.to_le_bytes());
        b[8..16].copy_from_slice(&self.max_ts_before.to_le_bytes());
        b
    }
    fn decode(b: &[u8]) -> Self {
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&b[8..16]);
        IndexEntry {
            rel_offset: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            position: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            max_ts_before: i64::from_le_bytes(ts),
        }
    }
}

/// What recovery found at the end of the active segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// File position where valid data ends.
    pub valid_bytes: u64,
    /// Bytes cut off.
    pub truncated_bytes: u64,
    /// Why the batch at `valid_bytes` was rejected.
    pub reason: String,
}

/// Limits of one read across segments.
#[derive(Debug, Clone, Copy)]
pub struct ReadBudget {
    /// Exclusive end offset (the high watermark).
    pub upto: u64,
    /// Most records.
    pub max_records: usize,
    /// About this many bytes at most (at least one record is returned).
    pub max_bytes: usize,
    /// Bytes read so far.
    pub bytes_read: usize,
    /// Values may share the cached batch's buffer instead of being copies: for records the
    /// reader drops soon (a copy lets a record kept long, such as one waiting in a delivery
    /// buffer, not pin its whole batch).
    pub share: bool,
}

/// A segment of a partition.
#[derive(Debug)]
pub struct Segment {
    /// Unique among the segments this process opened (the read cache's key).
    uid: u64,
    /// Offset of the first record.
    pub base_offset: u64,
    /// Path of the `.log` file.
    pub log_path: PathBuf,
    /// Path of the `.index` file.
    pub index_path: PathBuf,
    /// Path of the `.ids` file (dedup id hashes, see `dedup`).
    pub ids_path: PathBuf,
    file: File,
    /// Sparse index, in memory; only the partition writer appends to it.
    index: RwLock<Vec<IndexEntry>>,
    size: AtomicU64,
    next_offset: AtomicU64,
    max_ts: AtomicI64,
}

/// Source of [`Segment::uid`].
static NEXT_SEGMENT_UID: AtomicU64 = AtomicU64::new(0);

/// Recently written or read batches, checked and kept whole, shared by the partitions of one log.
///
/// Many readers of one batch are the rule for the mailbox store (every mailbox reads its own
/// records out of the router's batches) and for several groups on one topic: without the
/// cache, each read of one record reads and checks its whole batch again. The writer puts each
/// batch in as it commits it, since its first readers (the router, a mailbox's group) follow at
/// once. First in, first out, bounded in bytes; a batch never changes once durable, so entries
/// need no invalidation.
#[derive(Debug)]
pub struct BatchCache {
    capacity: usize,
    inner: Mutex<CacheInner>,
    spares: Arc<Spares>,
}

/// Emptied batch buffers for the next batches. Without them the allocator hands an old batch's
/// memory back to the system and the next batch faults fresh memory in (zeroing a 2 MiB page
/// where transparent huge pages back it). A cached batch hands its buffer in when its last
/// reader lets go of it: readers often hold a batch past its eviction. At most
/// [`SPARE_BUFFERS`], together a quarter of the cache; the largest are kept, as they fault most.
#[derive(Debug)]
struct Spares {
    max_bytes: usize,
    buffers: Mutex<Vec<Vec<u8>>>,
}

impl Spares {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        self.buffers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn keep(&self, buffer: Vec<u8>) {
        if buffer.capacity() == 0 || buffer.capacity() > self.max_bytes {
            return;
        }
        let mut spare = self.lock();
        spare.push(buffer);
        let mut held: usize = spare.iter().map(Vec::capacity).sum();
        while spare.len() > SPARE_BUFFERS || held > self.max_bytes {
            let smallest = (0..spare.len()).min_by_key(|&i| spare[i].capacity()).unwrap_or(0);
            held -= spare.swap_remove(smallest).capacity();
        }
    }

    /// A spare buffer of at least `len` bytes and at most twice as many (at most 128 KiB for
    /// batches under 64 KiB), emptied.
    fn take(&self, len: usize) -> Option<Vec<u8>> {
        let mut spare = self.lock();
        let i = spare.iter().position(|b| b.capacity() >= len && b.capacity() <= 2 * len.max(64 * 1024))?;
        let mut b = spare.swap_remove(i);
        b.clear();
        Some(b)
    }
}

/// A whole batch and where each of its records starts, so that a read of one record in the
/// middle need not walk the records before it.
#[derive(Debug)]
pub struct CachedBatch {
    bytes: Vec<u8>,
    starts: Vec<u32>,
    /// Where the buffer goes when the batch is dropped.
    spares: Arc<Spares>,
}

impl Drop for CachedBatch {
    fn drop(&mut self) {
        self.spares.keep(std::mem::take(&mut self.bytes));
    }
}

/// A record's value inside a cached batch, handed out without a copy.
struct SharedValue {
    batch: Arc<CachedBatch>,
    range: std::ops::Range<usize>,
}

impl AsRef<[u8]> for SharedValue {
    fn as_ref(&self) -> &[u8] {
        &self.batch.bytes[self.range.clone()]
    }
}

impl CachedBatch {
    /// Indexes a whole, checked batch of `cache`; fails when its records do not fit it.
    fn new(cache: &BatchCache, header: &BatchHeader, bytes: Vec<u8>) -> std::result::Result<CachedBatch, BadBatch> {
        match format::record_starts(header, &bytes) {
            Ok(starts) => Ok(CachedBatch { bytes, starts, spares: cache.spares.clone() }),
            Err(bad) => {
                cache.recycle(bytes);
                Err(bad)
            }
        }
    }
}

#[derive(Debug, Default)]
struct CacheInner {
    /// (segment uid, position) -> the batch.
    batches: crate::FastMap<(u64, u64), Arc<CachedBatch>>,
    /// Insertion order, for eviction.
    order: VecDeque<(u64, u64)>,
    /// Allocated bytes of the batches held.
    bytes: usize,
}

/// Most spare buffers kept.
const SPARE_BUFFERS: usize = 16;

impl BatchCache {
    /// A cache of at most `capacity` bytes (0: no caching).
    pub fn new(capacity: usize) -> Self {
        let spares = Arc::new(Spares { max_bytes: capacity / 4, buffers: Mutex::default() });
        BatchCache { capacity, inner: Mutex::new(CacheInner::default()), spares }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, key: (u64, u64)) -> Option<Arc<CachedBatch>> {
        self.lock().batches.get(&key).cloned()
    }

    /// Whether a batch of `len` bytes would be kept.
    pub fn keeps(&self, len: usize) -> bool {
        len <= self.capacity / 4
    }

    /// An empty buffer for a batch of `len` bytes: a spare one that fits ([`Spares::take`]),
    /// or a new one.
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        self.spares.take(len).unwrap_or_else(|| Vec::with_capacity(len))
    }

    /// Takes back a buffer that was not cached.
    pub fn recycle(&self, buffer: Vec<u8>) {
        self.spares.keep(buffer);
    }

    fn put(&self, key: (u64, u64), batch: Arc<CachedBatch>) {
        if !self.keeps(batch.bytes.capacity()) {
            return;
        }
        let mut evicted = Vec::new();
        let mut c = self.lock();
        if c.batches.contains_key(&key) {
            return;
        }
        c.bytes += batch.bytes.capacity();
        c.batches.insert(key, batch);
        c.order.push_back(key);
        while c.bytes > self.capacity {
            let Some(old) = c.order.pop_front() else { break };
            if let Some(b) = c.batches.remove(&old) {
                c.bytes -= b.bytes.capacity();
                // Dropped outside the lock: the last holder's drop hands the buffer on.
                evicted.push(b);
            }
        }
        drop(c);
        drop(evicted);
    }
}

fn io<'a>(path: &'a Path, what: &'a str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    // The context is formatted only on failure: reads call this on every batch.
    move |e| Error::io(format!("{what} {}", path.display()), e)
}

/// File name stem of a segment: the zero-padded base offset.
pub fn segment_stem(base_offset: u64) -> String {
    format!("{base_offset:020}")
}

impl Segment {
    fn paths(dir: &Path, base_offset: u64) -> (PathBuf, PathBuf, PathBuf) {
        let stem = segment_stem(base_offset);
        (dir.join(format!("{stem}.log")), dir.join(format!("{stem}.index")), dir.join(format!("{stem}.ids")))
    }

    /// Creates an empty segment (files included); returns it with its index and ids files.
    pub fn create(dir: &Path, base_offset: u64) -> Result<(Segment, File, File)> {
        let (log_path, index_path, ids_path) = Self::paths(dir, base_offset);
        for path in [&log_path, &index_path, &ids_path] {
            OpenOptions::new().write(true).create(true).truncate(true).open(path).map_err(io(path, "creating"))?;
        }
        sync_dir(dir)?;
        let seg = Self::open_file(dir, base_offset)?;
        let (index_file, ids_file) = seg.append_files()?;
        Ok((seg, index_file, ids_file))
    }

    /// The index and ids files, opened for appending (only the partition writer appends).
    fn append_files(&self) -> Result<(File, File)> {
        let open = |path: &Path| OpenOptions::new().append(true).open(path).map_err(io(path, "opening"));
        Ok((open(&self.index_path)?, open(&self.ids_path)?))
    }

    fn open_file(dir: &Path, base_offset: u64) -> Result<Segment> {
        let (log_path, index_path, ids_path) = Self::paths(dir, base_offset);
        let file = OpenOptions::new().read(true).write(true).open(&log_path).map_err(io(&log_path, "opening"))?;
        let size = file.metadata().map_err(io(&log_path, "reading metadata of"))?.len();
        Ok(Segment {
            uid: NEXT_SEGMENT_UID.fetch_add(1, Ordering::Relaxed),
            base_offset,
            log_path,
            index_path,
            ids_path,
            file,
            index: RwLock::new(Vec::new()),
            size: AtomicU64::new(size),
            next_offset: AtomicU64::new(base_offset),
            max_ts: AtomicI64::new(i64::MIN),
        })
    }

    /// Opens a sealed segment: trusts its synced index and reads only the batches after the
    /// last index entry (to learn the end offset and largest timestamp). A missing or damaged
    /// index is rebuilt by a scan.
    pub fn open_sealed(dir: &Path, base_offset: u64, interval: u64) -> Result<Segment> {
        let seg = Self::open_file(dir, base_offset)?;
        let size = seg.size();
        let loaded = std::fs::read(&seg.index_path).ok().and_then(|bytes| {
            if bytes.len() % INDEX_ENTRY != 0 {
                return None;
            }
            let entries: Vec<IndexEntry> = bytes.chunks_exact(INDEX_ENTRY).map(IndexEntry::decode).collect();
            let sane = entries.windows(2).all(|w| w[0].position < w[1].position && w[0].rel_offset < w[1].rel_offset)
                && entries.last().map_or(size == 0, |e| u64::from(e.position) < size)
                && entries.first().is_none_or(|e| e.position == 0 && e.rel_offset == 0);
            sane.then_some(entries)
        });
        match loaded {
            Some(entries) => {
                let (pos, mut max_ts) = entries.last().map_or((0, i64::MIN), |e| (u64::from(e.position), e.max_ts_before));
                let mut next = entries.last().map_or(base_offset, |e| base_offset + u64::from(e.rel_offset));
                let (end, bad) = seg.scan(pos, next, false, |_, h, _| {
                    next = h.next_offset();
                    max_ts = max_ts.max(h.max_timestamp_ms);
                })?;
                if let Some(bad) = bad {
                    return Err(Error::Corrupt {
                        path: seg.log_path.display().to_string(),
                        reason: format!("sealed segment at byte {end}: {bad}"),
                    });
                }
                *seg.index.write().unwrap_or_else(|e| e.into_inner()) = entries;
                seg.next_offset.store(next, Ordering::Release);
                seg.max_ts.store(max_ts, Ordering::Release);
                let ids_len = std::fs::metadata(&seg.ids_path).map(|m| m.len()).unwrap_or(u64::MAX);
                if ids_len != (next - base_offset) * 8 {
                    tracing::warn!(segment = %seg.log_path.display(), "dedup ids missing or incomplete; rebuilding");
                    return Self::rebuild_sealed(seg, interval);
                }
                Ok(seg)
            }
            None => {
                tracing::warn!(segment = %seg.log_path.display(), "index missing or damaged; rebuilding");
                Self::rebuild_sealed(seg, interval)
            }
        }
    }

    /// Rebuilds index and ids of a sealed segment; a bad batch in it is corruption, not a tail.
    fn rebuild_sealed(seg: Segment, interval: u64) -> Result<Segment> {
        Ok(Self::recover_opened(seg, interval, false)?.0)
    }

    /// Opens the active segment: checks every batch's CRC, truncates a torn tail, rebuilds the
    /// index and the ids sidecar. Returns the segment, its index and ids files for appending,
    /// and what was cut off, if anything.
    pub fn recover(dir: &Path, base_offset: u64, interval: u64) -> Result<(Segment, File, File, Option<TornTail>)> {
        let seg = Self::open_file(dir, base_offset)?;
        let (seg, torn) = Self::recover_opened(seg, interval, true)?;
        let (index_file, ids_file) = seg.append_files()?;
        Ok((seg, index_file, ids_file, torn))
    }

    /// Scans every batch with its CRC and rewrites index and ids files. A bad batch is a torn
    /// tail that is cut off when `cut_tail` (the active segment); in a sealed segment it is
    /// corruption, reported without changing the file.
    fn recover_opened(seg: Segment, interval: u64, cut_tail: bool) -> Result<(Segment, Option<TornTail>)> {
        let mut entries = Vec::new();
        let mut next = seg.base_offset;
        let mut max_ts = i64::MIN;
        let mut since_index = u64::MAX;
        let mut ids = Vec::new();
        let (end, bad) = seg.scan(0, seg.base_offset, true, |pos, h, batch| {
            if let Some(batch) = batch {
                for r in format::records(h, batch).flatten() {
                    ids.extend_from_slice(&super::dedup::id_hash(r.id).to_le_bytes());
                }
            }
            if since_index >= interval {
                entries.push(IndexEntry {
                    rel_offset: (h.base_offset - seg.base_offset) as u32,
                    position: pos as u32,
                    max_ts_before: max_ts,
                });
                since_index = 0;
            }
            since_index += h.total_len;
            next = h.next_offset();
            max_ts = max_ts.max(h.max_timestamp_ms);
        })?;
        let size = seg.size();
        if let Some(BadBatch::Version(format::OLD_VERSION)) = bad {
            return Err(Error::Corrupt {
                path: seg.log_path.display().to_string(),
                reason: format!(
                    "written by an older justizbus (format version {}, without the hash chain); this build reads version {} only: replay the old data into a new data directory",
                    format::OLD_VERSION,
                    format::VERSION
                ),
            });
        }
        let torn = if end < size {
            let reason = bad.map_or_else(|| "unexpected data".to_string(), |b| b.to_string());
            if !cut_tail {
                return Err(Error::Corrupt {
                    path: seg.log_path.display().to_string(),
                    reason: format!("sealed segment at byte {end}: {reason}"),
                });
            }
            seg.file.set_len(end).map_err(io(&seg.log_path, "truncating"))?;
            seg.file.sync_all().map_err(io(&seg.log_path, "syncing"))?;
            Some(TornTail { valid_bytes: end, truncated_bytes: size - end, reason })
        } else {
            None
        };
        let mut bytes = Vec::with_capacity(entries.len() * INDEX_ENTRY);
        for e in &entries {
            bytes.extend_from_slice(&e.encode());
        }
        std::fs::write(&seg.index_path, &bytes).map_err(io(&seg.index_path, "writing"))?;
        std::fs::write(&seg.ids_path, &ids).map_err(io(&seg.ids_path, "writing"))?;
        seg.size.store(end, Ordering::Release);
        seg.next_offset.store(next, Ordering::Release);
        seg.max_ts.store(max_ts, Ordering::Release);
        *seg.index.write().unwrap_or_else(|e| e.into_inner()) = entries;
        Ok((seg, torn))
    }

    /// Walks batch headers from `pos`; with `crc`, also checks each batch whole. Stops at the
    /// first bad batch or at the end. Returns the position after the last good batch and the
    /// reason it stopped early, if it did.
    fn scan(
        &self,
        mut pos: u64,
        first_offset: u64,
        crc: bool,
        mut visit: impl FnMut(u64, &BatchHeader, Option<&[u8]>),
    ) -> Result<(u64, Option<BadBatch>)> {
        let size = self.size();
        let mut expected = first_offset;
        let mut header = [0u8; BATCH_HEADER];
        let mut buf = Vec::new();
        while pos < size {
            if size - pos < BATCH_HEADER as u64 {
                return Ok((pos, Some(BadBatch::Short)));
            }
            self.file.read_exact_at(&mut header, pos).map_err(io(&self.log_path, "reading"))?;
            let h = match format::decode_header(&header) {
                Ok(h) => h,
                Err(bad) => return Ok((pos, Some(bad))),
            };
            if pos + h.total_len > size {
                return Ok((pos, Some(BadBatch::Short)));
            }
            if h.base_offset != expected {
                return Ok((pos, Some(BadBatch::Malformed(format!("base offset {} where {expected} was expected", h.base_offset)))));
            }
            if crc {
                buf.resize(h.total_len as usize, 0);
                self.file.read_exact_at(&mut buf, pos).map_err(io(&self.log_path, "reading"))?;
                if let Err(bad) = format::check_crc(&h, &buf) {
                    return Ok((pos, Some(bad)));
                }
            }
            visit(pos, &h, crc.then_some(&buf[..]));
            expected = h.next_offset();
            pos += h.total_len;
        }
        Ok((pos, None))
    }

    /// Bytes of valid data.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Offset after the last record.
    pub fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    /// Largest record timestamp (i64::MIN when empty).
    pub fn max_timestamp(&self) -> i64 {
        self.max_ts.load(Ordering::Acquire)
    }

    /// Writes an encoded batch at the end. Not visible to readers until [`Segment::commit`].
    pub fn write_batch(&self, bytes: &[u8]) -> Result<u64> {
        let pos = self.size();
        self.file.write_all_at(bytes, pos).map_err(io(&self.log_path, "writing"))?;
        Ok(pos)
    }

    /// Hands a batch just committed at `pos` to the read cache (when it keeps batches that big).
    pub fn cache_written(&self, cache: &BatchCache, pos: u64, header: &BatchHeader, bytes: Vec<u8>) {
        if !cache.keeps(bytes.capacity()) {
            cache.recycle(bytes);
        } else if let Ok(batch) = CachedBatch::new(cache, header, bytes) {
            cache.put((self.uid, pos), Arc::new(batch));
        }
    }

    /// Makes written data durable (`fdatasync`).
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(io(&self.log_path, "syncing"))
    }

    /// Drops `[from, to)` of the file from the OS page cache. Only for synced data: the kernel
    /// does not drop dirty pages. A failure only leaves the pages cached.
    pub fn drop_cached(&self, from: u64, to: u64) {
        let Some(len) = std::num::NonZeroU64::new(to.saturating_sub(from)) else { return };
        if let Err(e) = rustix::fs::fadvise(&self.file, from, Some(len), rustix::fs::Advice::DontNeed) {
            tracing::debug!(segment = %self.log_path.display(), from, to, error = %e, "dropping written pages from the page cache failed");
        }
    }

    /// Cuts the file back to its committed size after a failed write.
    pub fn discard_uncommitted(&self) {
        let _ = self.file.set_len(self.size());
    }

    /// Publishes a synced batch: size, end offset, largest timestamp and (maybe) an index entry.
    /// Cannot fail: the batch is durable, so from here on it is part of the log.
    pub fn commit(&self, pos: u64, len: u64, next_offset: u64, max_ts: i64, index: Option<(&mut File, u64)>) {
        if let Some((index_file, base)) = index {
            let entry =
                IndexEntry { rel_offset: (base - self.base_offset) as u32, position: pos as u32, max_ts_before: self.max_timestamp() };
            // The data is durable already; a lost index entry only makes reads scan further, and
            // a damaged index file is rebuilt when the segment is opened.
            if let Err(e) = index_file.write_all(&entry.encode()) {
                tracing::warn!(index = %self.index_path.display(), error = %e, "writing an index entry failed");
            }
            self.index.write().unwrap_or_else(|e| e.into_inner()).push(entry);
        }
        self.size.store(pos + len, Ordering::Release);
        self.max_ts.fetch_max(max_ts, Ordering::AcqRel);
        self.next_offset.store(next_offset, Ordering::Release);
    }

    /// The id hashes of the segment's records, in offset order (from the `.ids` sidecar).
    pub fn load_ids(&self) -> Result<Vec<u64>> {
        let bytes = std::fs::read(&self.ids_path).map_err(io(&self.ids_path, "reading"))?;
        Ok(bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default())).collect())
    }

    /// File position of the last index entry.
    pub fn last_index_position(&self) -> Option<u64> {
        self.index.read().unwrap_or_else(|e| e.into_inner()).last().map(|e| u64::from(e.position))
    }

    /// Index entry at or before `offset`.
    fn floor_entry(&self, offset: u64) -> (u64, i64) {
        let rel = offset.saturating_sub(self.base_offset);
        let index = self.index.read().unwrap_or_else(|e| e.into_inner());
        let i = index.partition_point(|e| u64::from(e.rel_offset) <= rel);
        if i == 0 {
            (0, i64::MIN)
        } else {
            (u64::from(index[i - 1].position), index[i - 1].max_ts_before)
        }
    }

    /// Reads records with offsets in `[from, budget.upto)` into `out` until the budget is spent.
    /// Returns false when the budget stopped it.
    pub fn read(
        &self,
        partition: u32,
        from: u64,
        budget: &mut ReadBudget,
        cache: &BatchCache,
        out: &mut Vec<StoredRecord>,
    ) -> Result<bool> {
        let ReadBudget { upto, max_records, max_bytes, .. } = *budget;
        let (mut pos, _) = self.floor_entry(from);
        let size = self.size();
        let mut header = [0u8; BATCH_HEADER];
        while pos < size {
            // A cached batch needs no read at all, not even of its header (many mailboxes
            // read their records out of the same few batches).
            let cached = cache.get((self.uid, pos));
            let h = match &cached {
                Some(batch) => format::decode_header(&batch.bytes),
                None => {
                    self.file.read_exact_at(&mut header, pos).map_err(io(&self.log_path, "reading"))?;
                    format::decode_header(&header)
                }
            }
            .map_err(|b| self.corrupt(pos, b))?;
            if h.base_offset >= upto {
                return Ok(true);
            }
            if h.next_offset() > from {
                let batch = match cached {
                    Some(batch) => batch,
                    None => {
                        let mut buf = cache.buffer(h.total_len as usize);
                        buf.resize(h.total_len as usize, 0);
                        self.file.read_exact_at(&mut buf, pos).map_err(io(&self.log_path, "reading"))?;
                        format::check_crc(&h, &buf).map_err(|b| self.corrupt(pos, b))?;
                        let batch = Arc::new(CachedBatch::new(cache, &h, buf).map_err(|b| self.corrupt(pos, b))?);
                        cache.put((self.uid, pos), batch.clone());
                        batch
                    }
                };
                let skip = from.saturating_sub(h.base_offset) as usize;
                let shared = |value: &[u8]| {
                    // `value` lies in `batch.bytes`: where it starts there.
                    let start = value.as_ptr() as usize - batch.bytes.as_ptr() as usize;
                    Bytes::from_owner(SharedValue { batch: batch.clone(), range: start..start + value.len() })
                };
                format::decode_records_at(
                    &h,
                    &batch.bytes,
                    batch.starts.get(skip).map(|&at| (skip, at as usize)),
                    partition,
                    from,
                    max_records.saturating_sub(out.len()),
                    if budget.share { &shared } else { &Bytes::copy_from_slice },
                    out,
                )
                .map_err(|b| self.corrupt(pos, b))?;
                while out.last().is_some_and(|r| r.offset >= upto) {
                    out.pop();
                }
                budget.bytes_read += h.total_len as usize;
                if !out.is_empty() && (out.len() >= max_records || budget.bytes_read >= max_bytes) {
                    out.truncate(max_records.max(1));
                    return Ok(false);
                }
            }
            pos += h.total_len;
        }
        Ok(true)
    }

    /// The first offset in this segment with a timestamp at or after `ts`, if any.
    pub fn offset_for_time(&self, partition: u32, ts: i64) -> Result<Option<u64>> {
        if self.max_timestamp() < ts {
            return Ok(None);
        }
        // The last index entry all of whose predecessors are older than ts.
        let start = {
            let index = self.index.read().unwrap_or_else(|e| e.into_inner());
            let i = index.partition_point(|e| e.max_ts_before < ts);
            if i == 0 {
                0
            } else {
                u64::from(index[i - 1].position)
            }
        };
        let size = self.size();
        let mut pos = start;
        let mut header = [0u8; BATCH_HEADER];
        while pos < size {
            self.file.read_exact_at(&mut header, pos).map_err(io(&self.log_path, "reading"))?;
            let h = format::decode_header(&header).map_err(|b| self.corrupt(pos, b))?;
            if h.max_timestamp_ms >= ts {
                let mut buf = vec![0u8; h.total_len as usize];
                self.file.read_exact_at(&mut buf, pos).map_err(io(&self.log_path, "reading"))?;
                let mut recs = Vec::new();
                format::decode_records(&h, &buf, partition, 0, usize::MAX, &mut recs).map_err(|b| self.corrupt(pos, b))?;
                if let Some(r) = recs.iter().find(|r| r.timestamp_ms >= ts) {
                    return Ok(Some(r.offset));
                }
            }
            pos += h.total_len;
        }
        Ok(None)
    }

    /// The chain value stored in the header of the segment's first batch; None when empty.
    pub fn first_chain_before(&self) -> Result<Option<crate::audit::chain::ChainHash>> {
        if self.size() < BATCH_HEADER as u64 {
            return Ok(None);
        }
        let mut header = [0u8; BATCH_HEADER];
        self.file.read_exact_at(&mut header, 0).map_err(io(&self.log_path, "reading"))?;
        Ok(Some(format::decode_header(&header).map_err(|b| self.corrupt(0, b))?.chain_before))
    }

    fn corrupt(&self, pos: u64, bad: BadBatch) -> Error {
        Error::Corrupt { path: self.log_path.display().to_string(), reason: format!("batch at byte {pos}: {bad}") }
    }

    /// Deletes the segment's files (the open handle keeps serving readers that still hold it).
    pub fn delete_files(&self) -> Result<()> {
        std::fs::remove_file(&self.log_path).map_err(io(&self.log_path, "deleting"))?;
        let _ = std::fs::remove_file(&self.index_path);
        let _ = std::fs::remove_file(&self.ids_path);
        Ok(())
    }
}

/// Syncs a directory so that created or deleted files survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir, "syncing directory"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::NewRecord;

    fn batch(base: u64, value_len: usize) -> (BatchHeader, Vec<u8>) {
        let r = NewRecord { id: format!("r{base}"), key: bytes::Bytes::new(), timestamp_ms: 1, value: vec![7u8; value_len].into() };
        let mut buf = Vec::new();
        format::encode_batch(&mut buf, base, &[&r], None);
        (format::decode_header(&buf).expect("header"), buf)
    }

    #[test]
    fn the_cache_stays_within_its_bytes_and_hands_evicted_buffers_on() {
        let cache = BatchCache::new(64 * 1024);
        for i in 0..20u64 {
            let (h, b) = batch(i, 8 * 1024);
            cache.put((1, i), Arc::new(CachedBatch::new(&cache, &h, b).expect("batch")));
            assert!(cache.lock().bytes <= 64 * 1024);
        }
        // The oldest are gone, the newest are there.
        assert!(cache.get((1, 0)).is_none());
        assert!(cache.get((1, 19)).is_some());
        // An evicted batch's buffer serves the next batch of about its size, emptied.
        let spare = cache.spares.lock().len();
        assert!(spare > 0);
        let reused = cache.buffer(8 * 1024);
        assert!(reused.is_empty() && reused.capacity() >= 8 * 1024);
        assert_eq!(cache.spares.lock().len(), spare - 1);
        assert!(cache.spares.lock().iter().map(Vec::capacity).sum::<usize>() <= 16 * 1024);
        // A buffer far larger than asked for is not handed out for a small batch.
        let cache = BatchCache::new(4 << 20);
        cache.recycle(Vec::with_capacity(512 * 1024));
        assert!(cache.buffer(1000).capacity() < 512 * 1024);
        assert!(cache.buffer(300 * 1024).capacity() >= 512 * 1024);
    }

    #[test]
    fn a_batch_evicted_while_read_hands_its_buffer_on_when_the_reader_lets_go() {
        let cache = BatchCache::new(16 << 20);
        let (h, b) = batch(0, 600 * 1024);
        cache.put((1, 0), Arc::new(CachedBatch::new(&cache, &h, b).expect("batch")));
        let reader = cache.get((1, 0)).expect("cached");
        for i in 1..30u64 {
            let (h, b) = batch(i, 600 * 1024);
            cache.put((1, i), Arc::new(CachedBatch::new(&cache, &h, b).expect("batch")));
        }
        assert!(cache.get((1, 0)).is_none(), "evicted");
        let before = cache.spares.lock().len();
        drop(reader);
        assert_eq!(cache.spares.lock().len(), before + 1, "the last reader's drop hands the buffer in");
        assert!(cache.buffer(600 * 1024).capacity() >= 600 * 1024);
    }

    #[test]
    fn spares_keep_the_largest_buffers_within_their_bounds() {
        let spares = Spares { max_bytes: 1 << 20, buffers: Mutex::default() };
        for _ in 0..40 {
            spares.keep(Vec::with_capacity(1024));
        }
        spares.keep(Vec::with_capacity(512 * 1024));
        spares.keep(Vec::with_capacity(2 << 20)); // more than all spares together may hold
        let held: Vec<usize> = spares.lock().iter().map(Vec::capacity).collect();
        assert!(held.len() <= SPARE_BUFFERS && held.iter().sum::<usize>() <= 1 << 20, "{held:?}");
        assert!(held.contains(&(512 * 1024)), "a large buffer displaces small ones: {held:?}");
        assert!(spares.take(400 * 1024).is_some_and(|b| b.capacity() == 512 * 1024));
    }
}
