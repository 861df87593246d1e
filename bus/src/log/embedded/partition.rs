//! One partition: its segments, its high watermark, and the writer task that group-commits.
//!
//! Appends go through a channel to one writer task per partition. The writer takes every job
//! that is waiting, assigns offsets, drops ids already stored (dedup), writes all fresh records
//! as one batch, `fdatasync`s once, and only then raises the high watermark and answers the
//! jobs. Readers never see records above the high watermark, so nothing a consumer sees can be
//! lost by a crash.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio::sync::{mpsc, oneshot, watch};

use super::dedup::{id_hash, DedupIndex};
use super::format;
use super::segment::{self, BatchCache, ReadBudget, Segment, TornTail};
use crate::audit::chain::{ChainHash, GENESIS};
use crate::audit::checkpoint::{parse_checkpoint_lines, Checkpoint, CHECKPOINT_FILE};
use crate::config::LogSettings;
use crate::event::now_ms;
use crate::log::{Appended, NewRecord, StoredRecord};
use crate::{Error, Result};

/// A request to the writer task.
struct AppendJob {
    records: Vec<NewRecord>,
    reply: oneshot::Sender<Result<Vec<Appended>>>,
}

/// Messages to the writer task.
enum WriterMsg {
    Append(AppendJob),
    /// Stop, dropping the writer's state (its handle on the state store), then answer.
    Close(oneshot::Sender<()>),
}

/// A group commit (write and `fdatasync`) longer than this is logged as a warning.
const SLOW_COMMIT: std::time::Duration = std::time::Duration::from_millis(50);

/// State shared by the writer, readers and retention.
#[derive(Debug)]
pub struct Partition {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub id: u32,
    dir: PathBuf,
    /// Segments in offset order; the last is active. Readers clone the `Arc`s they need, so
    /// retention can drop a segment while a read of it finishes.
    segments: RwLock<Vec<Arc<Segment>>>,
    /// High watermark: the offset after the last durable record.
    end: watch::Sender<u64>,
    /// Jobs for the writer task.
    writer: mpsc::Sender<WriterMsg>,
    /// Recently read batches of the whole log.
    cache: Arc<BatchCache>,
    /// Serializes checkpoint appends.
    checkpoint_lock: std::sync::Mutex<()>,
}

/// What only the writer task touches.
struct WriterState {
    index_file: File,
    ids_file: File,
    since_index: u64,
    settings: LogSettings,
    dedup: DedupIndex,
    /// The chain value of the last stored record (None: appending without the chain).
    chain: Option<ChainHash>,
    /// Drop-behind (`page_cache_window_bytes`): from this position on, the active segment's
    /// written pages may still be in the page cache.
    cached_from: u64,
    /// Bytes of the segments this writer rolled away from: the log position of the active
    /// segment's start, counted from where the writer began.
    rolled_bytes: u64,
    /// Segments before the active one whose tails may still be cached: (segment, where the
    /// cached tail begins, the log position of its end).
    cached_tails: std::collections::VecDeque<(Arc<Segment>, u64, u64)>,
    /// Synced ranges to drop from the page cache once the commit is acknowledged (off the
    /// appenders' path: a drop of 8 MiB took about half a millisecond).
    page_drops: Vec<(Arc<Segment>, u64, u64)>,
}

impl WriterState {
    /// Queues the drop of written pages more than the window behind `end` (the active
    /// segment's size) from the page cache, at least an eighth of the window at a time. Why: a
    /// log that only grows takes fresh memory for every page it writes while the machine has
    /// free memory, and on a virtual machine that gives free memory back to its host, that
    /// fresh memory is what makes writing slow (the copy into the page cache then cost a
    /// quarter of a core at 100 MB/s, see README "Measured figures"); dropped pages are reused
    /// by the next writes.
    fn drop_behind(&mut self, active: &Arc<Segment>, end: u64) {
        let window = self.settings.page_cache_window_bytes;
        if window == 0 {
            return;
        }
        let head = self.rolled_bytes + end;
        while let Some((segment, from, tail_end)) = self.cached_tails.pop_front() {
            if head - tail_end < window {
                self.cached_tails.push_front((segment, from, tail_end));
                break;
            }
            let to = segment.size();
            self.page_drops.push((segment, from, to));
        }
        if end >= window && end - window >= self.cached_from + (window / 8).max(1) {
            self.page_drops.push((active.clone(), self.cached_from, end - window));
            self.cached_from = end - window;
        }
    }

    /// The writer moved on from `previous` to a new segment: its cached tail is dropped once
    /// it lies a window behind.
    fn rolled(&mut self, previous: Arc<Segment>) {
        let size = previous.size();
        if self.settings.page_cache_window_bytes > 0 {
            self.cached_tails.push_back((previous, self.cached_from, self.rolled_bytes + size));
        }
        self.rolled_bytes += size;
        self.cached_from = 0;
    }
}

impl Partition {
    /// Opens (or creates) a partition directory, recovering its active segment.
    pub fn open(topic: &str, id: u32, dir: &Path, settings: &LogSettings, cache: Arc<BatchCache>) -> Result<Arc<Partition>> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let mut bases: Vec<u64> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(format!("listing {}", dir.display()), e))?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        bases.sort_unstable();
        let interval = settings.index_interval_bytes;
        let mut segments = Vec::with_capacity(bases.len().max(1));
        for &base in bases.iter().take(bases.len().saturating_sub(1)) {
            segments.push(Arc::new(Segment::open_sealed(dir, base, interval)?));
        }
        let (active, index_file, ids_file) = match bases.last() {
            Some(&base) => {
                let (seg, index_file, ids_file, torn) = Segment::recover(dir, base, interval)?;
                if let Some(TornTail { valid_bytes, truncated_bytes, reason }) = torn {
                    tracing::warn!(topic, partition = id, segment = %seg.log_path.display(), valid_bytes, truncated_bytes,
                        next_offset = seg.next_offset(), %reason, "recovered: truncated torn tail to the last whole batch");
                }
                (seg, index_file, ids_file)
            }
            None => Segment::create(dir, 0)?,
        };
        let since_index = active.last_index_position().map_or(u64::MAX, |pos| active.size() - pos);
        segments.push(Arc::new(active));
        for pair in segments.windows(2) {
            if pair[0].next_offset() != pair[1].base_offset {
                return Err(Error::Corrupt {
                    path: pair[1].log_path.display().to_string(),
                    reason: format!(
                        "segment starts at offset {} but the previous one ends at {}",
                        pair[1].base_offset,
                        pair[0].next_offset()
                    ),
                });
            }
        }
        let end_offset = segments.last().map_or(0, |s| s.next_offset());
        let (end, _) = watch::channel(end_offset);
        let (tx, rx) = mpsc::channel(1024);
        let partition = Arc::new(Partition {
            topic: topic.to_string(),
            id,
            dir: dir.to_path_buf(),
            segments: RwLock::new(segments),
            end,
            writer: tx,
            cache,
            checkpoint_lock: std::sync::Mutex::new(()),
        });
        let dedup = partition.load_dedup(settings)?;
        let chain = if settings.hash_chain { Some(partition.chain_before(partition.end_offset())?) } else { None };
        let state = WriterState {
            index_file,
            ids_file,
            since_index,
            settings: settings.clone(),
            dedup,
            chain,
            cached_from: 0,
            rolled_bytes: 0,
            cached_tails: Default::default(),
            page_drops: Vec::new(),
        };
        tokio::spawn(run_writer(Arc::downgrade(&partition), state, rx));
        Ok(partition)
    }

    /// Loads the ids of the newest segments that are still within the dedup window.
    fn load_dedup(&self, settings: &LogSettings) -> Result<DedupIndex> {
        let segments = self.segments();
        let now = now_ms();
        let cutoff = now.saturating_sub(settings.dedup_window_ms.min(i64::MAX as u64) as i64);
        let mut chosen = Vec::new();
        let mut count = 0usize;
        // A segment's last append time is its file's modification time.
        let appended_at = |seg: &Segment| {
            std::fs::metadata(&seg.log_path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(now, |d| d.as_millis() as i64)
        };
        for seg in segments.iter().rev() {
            if settings.dedup_window_ms == 0 || count >= settings.dedup_max_ids || appended_at(seg) < cutoff {
                break;
            }
            count += (seg.next_offset() - seg.base_offset) as usize;
            chosen.push(seg.clone());
        }
        let first = chosen.last().map_or(self.end_offset(), |s| s.base_offset);
        let mut dedup = DedupIndex::new(settings.dedup_window_ms, settings.dedup_max_ids, first);
        for seg in chosen.iter().rev() {
            // An id is kept while its segment's last append is in the window.
            dedup.record(seg.base_offset, &seg.load_ids()?, appended_at(seg));
        }
        dedup.expire(now);
        Ok(dedup)
    }

    /// The chain value before `offset`, h(offset - 1): stored with the record before it, or in
    /// the header of the first stored batch when `offset` is the log start.
    pub fn chain_before(&self, offset: u64) -> Result<ChainHash> {
        if offset == 0 {
            return Ok(GENESIS);
        }
        if offset > self.start_offset() {
            return match self.read(offset - 1, 1, 1, false)?.as_slice() {
                [r] if r.offset == offset - 1 => Ok(r.chain.unwrap_or(GENESIS)),
                _ => Err(Error::OffsetOutOfRange { partition: self.id, offset, start: self.start_offset(), end: self.end_offset() }),
            };
        }
        let first = self.segments().first().cloned().ok_or(Error::ShuttingDown)?;
        Ok(first.first_chain_before()?.unwrap_or(GENESIS))
    }

    /// Appends a checkpoint to the partition's checkpoint file and syncs it.
    pub fn append_checkpoint(&self, checkpoint: &Checkpoint) -> Result<()> {
        let path = self.dir.join(CHECKPOINT_FILE);
        let mut line = serde_json::to_vec(checkpoint).map_err(|e| Error::Internal(format!("encoding a checkpoint: {e}")))?;
        line.push(b'\n');
        let _serial = self.checkpoint_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // A line cut short by a crash is removed first, so the new one starts a line of its own.
        let len = file.metadata().map_err(|e| Error::io(format!("reading {}", path.display()), e))?.len();
        if len > 0 {
            let mut last = [0u8];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut last, len - 1)
                .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
            if last[0] != b'\n' {
                let text = std::fs::read(&path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
                let keep = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                tracing::warn!(file = %path.display(), cut_bytes = text.len() - keep, "removing an incomplete checkpoint line");
                file.set_len(keep as u64).map_err(|e| Error::io(format!("truncating {}", path.display()), e))?;
            }
        }
        file.write_all(&line).and_then(|()| file.sync_data()).map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }

    /// The partition's checkpoints, ascending by offset.
    pub fn checkpoints(&self) -> Result<Vec<Checkpoint>> {
        let path = self.dir.join(CHECKPOINT_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
        };
        let (mut good, bad) = parse_checkpoint_lines(&text);
        for (line, error) in bad {
            tracing::warn!(file = %path.display(), line, error, "unreadable checkpoint line skipped");
        }
        good.sort_by_key(|c| c.offset);
        Ok(good)
    }

    /// Appends records durably (group commit).
    pub async fn append(&self, records: Vec<NewRecord>) -> Result<Vec<Appended>> {
        let (reply, rx) = oneshot::channel();
        self.writer.send(WriterMsg::Append(AppendJob { records, reply })).await.map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Stops the writer after the appends queued before this call; later appends fail.
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.writer.send(WriterMsg::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Confirms a dedup hash hit: the record at `offset` is still stored and has this id (an id
    /// is remembered only while its record is stored).
    fn record_has_id(&self, offset: u64, id: &str) -> bool {
        matches!(self.read(offset, 1, 1, false).as_deref(), Ok([r]) if r.offset == offset && r.id == id)
    }

    /// The high watermark.
    pub fn end_offset(&self) -> u64 {
        *self.end.borrow()
    }

    /// The first stored offset.
    pub fn start_offset(&self) -> u64 {
        self.segments.read().unwrap_or_else(|e| e.into_inner()).first().map_or(0, |s| s.base_offset)
    }

    /// A receiver of high-watermark changes.
    pub fn watch_end(&self) -> watch::Receiver<u64> {
        self.end.subscribe()
    }

    fn segments(&self) -> Vec<Arc<Segment>> {
        self.segments.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads from `from` up to the high watermark within the limits.
    pub fn read(&self, from: u64, max_records: usize, max_bytes: usize, share: bool) -> Result<Vec<StoredRecord>> {
        let upto = self.end_offset();
        let segments = self.segments();
        let from = from.max(segments.first().map_or(0, |s| s.base_offset));
        let mut out = Vec::new();
        if from >= upto || max_records == 0 {
            return Ok(out);
        }
        let first = segments.partition_point(|s| s.base_offset <= from).saturating_sub(1);
        let mut budget = ReadBudget { upto, max_records, max_bytes, bytes_read: 0, share };
        for seg in &segments[first..] {
            if seg.base_offset >= upto || !seg.read(self.id, from, &mut budget, &self.cache, &mut out)? {
                break;
            }
        }
        Ok(out)
    }

    /// The first offset at or after a time.
    pub fn offset_for_time(&self, ts: i64) -> Result<u64> {
        for seg in self.segments() {
            if let Some(off) = seg.offset_for_time(self.id, ts)? {
                return Ok(off.min(self.end_offset()));
            }
        }
        Ok(self.end_offset())
    }

    /// Deletes sealed segments older than `retention_ms` or beyond `retention_bytes`.
    pub fn apply_retention(&self, retention_ms: u64, retention_bytes: u64, now_ms: i64) -> Result<usize> {
        let mut removed = Vec::new();
        {
            let mut segments = self.segments.write().unwrap_or_else(|e| e.into_inner());
            let mut total: u64 = segments.iter().map(|s| s.size()).sum();
            while segments.len() > 1 {
                // The active segment's first batch carries the chain value before it; while it
                // has none, the last sealed segment stays.
                if segments.len() == 2 && segments[1].size() == 0 {
                    break;
                }
                let first = &segments[0];
                let too_old = retention_ms > 0 && first.max_timestamp() < now_ms.saturating_sub(retention_ms as i64);
                let too_big = retention_bytes > 0 && total.saturating_sub(first.size()) >= retention_bytes;
                if !(too_old || too_big) {
                    break;
                }
                total -= first.size();
                removed.push(segments.remove(0));
            }
        }
        for seg in &removed {
            tracing::info!(topic = %self.topic, partition = self.id, segment = %seg.log_path.display(), "retention: deleted segment");
            seg.delete_files()?;
        }
        if !removed.is_empty() {
            segment::sync_dir(&self.dir)?;
        }
        Ok(removed.len())
    }
}

async fn run_writer(partition: std::sync::Weak<Partition>, mut state: WriterState, mut rx: mpsc::Receiver<WriterMsg>) {
    let mut closing = None;
    while let Some(msg) = rx.recv().await {
        let first = match msg {
            WriterMsg::Append(job) => job,
            WriterMsg::Close(done) => {
                closing = Some(done);
                break;
            }
        };
        let mut bytes: usize = first.records.iter().map(format::record_size).sum();
        let mut jobs = vec![first];
        while bytes < state.settings.max_batch_bytes && closing.is_none() {
            match rx.try_recv() {
                Ok(WriterMsg::Append(job)) => {
                    bytes += job.records.iter().map(format::record_size).sum::<usize>();
                    jobs.push(job);
                }
                Ok(WriterMsg::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
        }
        // The writer holds the partition weakly, so dropping the last handle ends it.
        let Some(p) = partition.upgrade() else { return };
        let (topic, id) = (p.topic.clone(), p.id);
        let joined = tokio::task::spawn_blocking(move || {
            let result = write_jobs(&p, &mut state, &jobs);
            // Blocking threads may sleep for long after a write.
            crate::memory::release_if_due();
            (state, jobs, result)
        })
        .await;
        let Ok((s, jobs, result)) = joined else {
            tracing::error!(topic, partition = id, "partition writer panicked; partition stops accepting appends");
            return;
        };
        state = s;
        match result {
            Ok(results) => {
                for (job, res) in jobs.into_iter().zip(results) {
                    let _ = job.reply.send(Ok(res));
                }
            }
            Err(err) => {
                tracing::error!(topic, partition = id, error = %err, "append failed; nothing of this batch was acknowledged");
                let message = err.to_string();
                for job in jobs {
                    let _ = job.reply.send(Err(Error::io("appending", std::io::Error::other(message.clone()))));
                }
            }
        }
        let page_drops = std::mem::take(&mut state.page_drops);
        if !page_drops.is_empty() {
            tokio::task::spawn_blocking(move || page_drops.into_iter().for_each(|(segment, from, to)| segment.drop_cached(from, to)));
        }
        if closing.is_some() {
            break;
        }
    }
    rx.close();
    drop(state);
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// One group commit: dedup, encode, roll if needed, write, sync, publish, record ids.
fn write_jobs(p: &Partition, st: &mut WriterState, jobs: &[AppendJob]) -> Result<Vec<Vec<Appended>>> {
    let mut active = p.segments.read().unwrap_or_else(|e| e.into_inner()).last().cloned().ok_or(Error::ShuttingDown)?;
    let base = active.next_offset();
    let mut next = base;
    let record_count = jobs.iter().map(|j| j.records.len()).sum();
    let mut fresh: Vec<&NewRecord> = Vec::with_capacity(record_count);
    let mut in_batch: crate::FastMap<&str, u64> = crate::FastMap::with_capacity_and_hasher(record_count, Default::default());
    let mut hashes = Vec::with_capacity(record_count);
    let mut results = Vec::with_capacity(jobs.len());
    for job in jobs {
        let mut res = Vec::with_capacity(job.records.len());
        for r in &job.records {
            let hash = id_hash(r.id.as_bytes());
            let stored = match in_batch.get(r.id.as_str()) {
                Some(&offset) => Some(offset),
                None => st.dedup.candidate(hash).filter(|&offset| p.record_has_id(offset, &r.id)),
            };
            match stored {
                Some(offset) => res.push(Appended { partition: p.id, offset, duplicate: true }),
                None => {
                    in_batch.insert(&r.id, next);
                    res.push(Appended { partition: p.id, offset: next, duplicate: false });
                    fresh.push(r);
                    hashes.push(hash);
                    next += 1;
                }
            }
        }
        results.push(res);
    }
    if fresh.is_empty() {
        return Ok(results);
    }
    // After the write the buffer moves into the read cache.
    let mut buf = p.cache.buffer(format::BATCH_HEADER + fresh.iter().map(|r| format::record_size(r)).sum::<usize>());
    let chain = format::encode_batch(&mut buf, base, &fresh, st.chain);
    let len = buf.len() as u64;
    if active.size() > 0 && active.size() + len > st.settings.segment_bytes {
        st.index_file.sync_all().map_err(|e| Error::io(format!("syncing {}", active.index_path.display()), e))?;
        st.ids_file.sync_all().map_err(|e| Error::io(format!("syncing {}", active.ids_path.display()), e))?;
        let (seg, index_file, ids_file) = Segment::create(&p.dir, base)?;
        tracing::info!(topic = %p.topic, partition = p.id, base_offset = base, "rolled to a new segment");
        st.rolled(std::mem::replace(&mut active, Arc::new(seg)));
        p.segments.write().unwrap_or_else(|e| e.into_inner()).push(active.clone());
        st.index_file = index_file;
        st.ids_file = ids_file;
        st.since_index = u64::MAX;
    }
    let started = std::time::Instant::now();
    let pos = active.write_batch(&buf).and_then(|pos| active.sync().map(|()| pos));
    let took = started.elapsed();
    tracing::trace!(topic = %p.topic, partition = p.id, jobs = jobs.len(), records = fresh.len(), bytes = len, sync_us = took.as_micros() as u64, "group commit");
    if took >= SLOW_COMMIT {
        // Appends, deliveries and acknowledgements wait for it: this is what a tail latency
        // spike looks like when the disk stalls (every partition's sync at once).
        tracing::warn!(topic = %p.topic, partition = p.id, ms = took.as_millis() as u64, bytes = len, "slow group commit: writing and syncing took long");
    }
    let pos = match pos {
        Ok(pos) => pos,
        Err(e) => {
            active.discard_uncommitted();
            return Err(e);
        }
    };
    let max_ts = fresh.iter().map(|r| r.timestamp_ms).max().unwrap_or(i64::MIN);
    let add_index = st.since_index >= st.settings.index_interval_bytes;
    active.commit(pos, len, next, max_ts, add_index.then_some((&mut st.index_file, base)));
    st.since_index = if add_index { len } else { st.since_index + len };
    st.chain = chain;
    st.drop_behind(&active, pos + len);
    // Cached before the end moves: the readers it wakes find the batch in memory.
    match format::decode_header(&buf) {
        Ok(header) => active.cache_written(&p.cache, pos, &header, buf),
        Err(_) => p.cache.recycle(buf),
    }
    p.end.send_replace(next);
    // The sidecar is not synced, and a failed write is not fatal: opening the segment rebuilds a
    // sidecar whose length does not match from the records.
    let bytes: Vec<u8> = hashes.iter().flat_map(|h| h.to_le_bytes()).collect();
    if let Err(e) = st.ids_file.write_all(&bytes) {
        tracing::warn!(ids = %active.ids_path.display(), error = %e, "writing dedup ids failed");
    }
    st.dedup.record(base, &hashes, now_ms());
    Ok(results)
}
