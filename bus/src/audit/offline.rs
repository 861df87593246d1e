//! `justizbus audit verify --data-dir DIR`: checks an embedded log straight from its files,
//! read-only (on a copy, or beside a running bus): every batch, every record's chain value, and
//! every checkpoint.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::chain::GENESIS;
use super::checkpoint::{parse_checkpoint_lines, TrustedKeys, CHECKPOINT_FILE};
use super::verify::{PartitionCheck, PartitionReport, VerifyReport};
use crate::log::embedded::format;
use crate::{Error, Result};

/// A partition directory found under `DIR/log`.
struct PartitionDir {
    topic: String,
    partition: u32,
    dir: PathBuf,
}

fn io(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let context = format!("{what} {}", path.display());
    move |e| Error::io(context, e)
}

fn partition_dirs(data_dir: &Path, topic_filter: Option<&str>) -> Result<Vec<PartitionDir>> {
    let log_dir = data_dir.join("log");
    if !log_dir.is_dir() {
        return Err(Error::invalid("data-dir", format!("{} holds no embedded log (no log/ directory)", data_dir.display())));
    }
    let mut out = Vec::new();
    for topic in std::fs::read_dir(&log_dir).map_err(io(&log_dir, "listing"))? {
        let topic = topic.map_err(io(&log_dir, "listing"))?;
        let Ok(name) = topic.file_name().into_string() else { continue };
        if topic_filter.is_some_and(|t| t != name) || !topic.path().is_dir() {
            continue;
        }
        for p in std::fs::read_dir(topic.path()).map_err(io(&topic.path(), "listing"))? {
            let p = p.map_err(io(&topic.path(), "listing"))?;
            if let Some(partition) = p.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                out.push(PartitionDir { topic: name.clone(), partition, dir: p.path() });
            }
        }
    }
    out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(out)
}

/// Verifies every partition under `data_dir` (or of one topic) against the trusted keys, one
/// partition at a time per core.
pub fn verify_data_dir(data_dir: &Path, topic: Option<&str>, keys: &TrustedKeys) -> Result<VerifyReport> {
    let started = Instant::now();
    let dirs = partition_dirs(data_dir, topic)?;
    if let Some(t) = topic {
        if dirs.is_empty() {
            return Err(Error::UnknownTopic(t.to_string()));
        }
    }
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).min(dirs.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<Result<(usize, PartitionReport, u64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(d) = dirs.get(i) else { break };
                        done.push(verify_partition(d, keys).map(|(r, b)| (i, r, b)));
                    }
                    done
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|_| vec![Err(Error::Internal("a verification worker panicked".into()))]))
            .collect()
    });
    let mut reports = Vec::with_capacity(dirs.len());
    let mut bytes = 0;
    for r in results {
        let (i, report, b) = r?;
        reports.push((i, report));
        bytes += b;
    }
    reports.sort_by_key(|(i, _)| *i);
    Ok(VerifyReport::new(keys, reports.into_iter().map(|(_, r)| r).collect(), bytes, started.elapsed().as_secs_f64()))
}

/// Checks one partition directory; returns the report and the bytes of log read.
fn verify_partition(d: &PartitionDir, keys: &TrustedKeys) -> Result<(PartitionReport, u64)> {
    let cp_path = d.dir.join(CHECKPOINT_FILE);
    let (checkpoints, bad_lines) = match std::fs::read_to_string(&cp_path) {
        Ok(text) => parse_checkpoint_lines(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), Vec::new()),
        Err(e) => return Err(Error::io(format!("reading {}", cp_path.display()), e)),
    };
    // Segments are listed after the checkpoints are read: beside a running bus, every record a
    // checkpoint covers is then in a listed segment.
    let mut segments: Vec<(u64, PathBuf)> = std::fs::read_dir(&d.dir)
        .map_err(io(&d.dir, "listing"))?
        .filter_map(|e| {
            let e = e.ok()?;
            let base = e.file_name().to_str()?.strip_suffix(".log")?.parse().ok()?;
            Some((base, e.path()))
        })
        .collect();
    segments.sort();
    // The stored range starts at the first segment; its first batch says the chain before it.
    let mut start = segments.first().map_or(0, |s| s.0);
    let mut chain_before = GENESIS;
    if let Some((_, path)) = segments.first() {
        let mut header = [0u8; format::BATCH_HEADER];
        let mut file = std::fs::File::open(path).map_err(io(path, "opening"))?;
        // Before offset 0 the chain is all zeros whatever a header says.
        if file.read_exact(&mut header).is_ok() {
            if let Ok(h) = format::decode_header(&header) {
                start = h.base_offset;
                chain_before = if start == 0 { GENESIS } else { h.chain_before };
            }
        }
    }
    let mut check = PartitionCheck::new(&d.topic, d.partition, keys, checkpoints, start, chain_before);
    for (line, error) in bad_lines {
        check.finding(0, format!("{} line {line} is not a checkpoint (a checkpoint altered or damaged): {error}", cp_path.display()));
    }
    let mut total = 0u64;
    let mut buf = Vec::new();
    let last = segments.len().saturating_sub(1);
    for (i, (base, path)) in segments.iter().enumerate() {
        if *base != check.next_offset() && !check.broken() {
            let what = format!("segment {} starts at offset {base}, expected {}", path.display(), check.next_offset());
            check.fail(check.next_offset().min(*base), what);
        }
        total += check_segment(&mut check, path, &mut buf, i == last)?;
        if check.broken() {
            break;
        }
    }
    Ok((check.finish(false), total))
}

/// Reads as much of `buf` as the file holds; returns how many bytes.
fn read_full(file: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// Feeds the batches of one segment file into the check, one batch in memory at a time;
/// returns the bytes read.
fn check_segment(check: &mut PartitionCheck, path: &Path, buf: &mut Vec<u8>, is_last: bool) -> Result<u64> {
    let mut file = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path).map_err(io(path, "opening"))?);
    let mut pos = 0u64;
    loop {
        let at = check.next_offset();
        buf.resize(format::BATCH_HEADER, 0);
        let got = read_full(&mut file, buf).map_err(io(path, "reading"))?;
        if got == 0 {
            return Ok(pos);
        }
        let torn = |check: &mut PartitionCheck, have: u64| {
            // An append cut short by a crash: never acknowledged, recovery removes it.
            check.note(format!("{}: torn tail of {have} bytes at byte {pos} ignored (never acknowledged)", path.display()));
        };
        let header = match format::decode_header(&buf[..got]) {
            Ok(h) => h,
            // As recovery does: in the active segment, what does not start a whole batch is the
            // end of an interrupted append (a later checkpoint would show it was more).
            Err(format::BadBatch::Short | format::BadBatch::Malformed(_)) if is_last => {
                let rest = std::fs::metadata(path).map_or(got as u64, |m| m.len().saturating_sub(pos));
                torn(check, rest);
                return Ok(pos + rest);
            }
            Err(e) => {
                check.fail(at, format!("{} byte {pos}: {e}", path.display()));
                return Ok(pos + got as u64);
            }
        };
        buf.resize(header.total_len as usize, 0);
        let body = read_full(&mut file, &mut buf[format::BATCH_HEADER..]).map_err(io(path, "reading"))?;
        let have = (format::BATCH_HEADER + body) as u64;
        if have < header.total_len {
            if is_last {
                torn(check, have);
            } else {
                check.fail(at, format!("{} byte {pos}: batch of {} bytes runs past the file end", path.display(), header.total_len));
            }
            return Ok(pos + have);
        }
        let batch = &buf[..];
        if header.chain_before != check.chain() && header.base_offset == at {
            check.fail(
                at,
                format!(
                    "batch header at byte {pos} of {} says the chain before is {}, the records before give {}",
                    path.display(),
                    super::chain::hex(&header.chain_before),
                    super::chain::hex(&check.chain())
                ),
            );
            return Ok(pos + have);
        }
        let crc = format::check_crc(&header, batch).err();
        // Records are checked one by one even when the CRC fails, so that the finding names
        // the altered record rather than its batch.
        let mut decoded = 0u32;
        for r in format::records(&header, batch) {
            match r {
                Ok(r) => check.record(r.offset, r.timestamp_ms, r.id, r.key, r.value, Some(r.chain)),
                Err(e) => {
                    check.fail(check.next_offset(), format!("{} byte {pos}: {e}", path.display()));
                    return Ok(pos + have);
                }
            }
            decoded += 1;
            if check.broken() {
                return Ok(pos + have);
            }
        }
        if let Some(bad) = crc {
            check.fail(at, format!("batch at byte {pos} of {} (offsets {at}..{}): {bad}", path.display(), at + u64::from(decoded)));
            return Ok(pos + have);
        }
        pos += have;
    }
}
