//! Storing a consumer's positions off its hot path.
//!
//! A stored position must never get ahead of the delivery journal entries it reflects, so
//! storing one first waits for the journal to be durable. A group or the router that waited
//! for that in its own loop stopped delivering (routing) for a journal sync each time it
//! stored its positions. The [`PositionWriter`] task does the waiting and storing instead:
//! its owner hands over positions and goes on; positions handed over later replace earlier
//! ones of the same partition; a failed store (or a journal that stays behind) is retried
//! with whatever is newest. [`PositionWriter::sync`] waits until everything handed over is
//! stored, for the moments the owner must know (a partition given up, shutdown).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::audit::journal::Journal;
use crate::log::{Cursor, Log};

/// How long storing positions waits for the delivery journal before trying again later.
const JOURNAL_WAIT: Duration = Duration::from_secs(5);
/// Pause before a failed store is tried again (when nothing newer arrives first).
const RETRY: Duration = Duration::from_secs(1);

enum Msg {
    /// Positions, and whether the owner journaled anything since it last handed some over.
    Store(Vec<(u32, Cursor)>, bool),
    Sync(oneshot::Sender<bool>),
}

/// Hands positions of one (topic, group) to a task that stores them once the journal is
/// durable. Dropping it lets the task store what it holds and end.
pub struct PositionWriter {
    tx: mpsc::UnboundedSender<Msg>,
    task: tokio::task::JoinHandle<()>,
}

impl PositionWriter {
    /// Starts the task for `group` on `topic`.
    pub fn start(log: Arc<dyn Log>, topic: String, group: String, journal: Option<Journal>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(log, topic, group, journal, rx));
        PositionWriter { tx, task }
    }

    /// Hands over positions to store; returns at once. `journaled`: the owner recorded journal
    /// entries since it last handed over positions, so these wait for the journal; without
    /// any (a group just loaded), they are stored at once, not after the journal's next write.
    pub fn store(&self, cursors: Vec<(u32, Cursor)>, journaled: bool) {
        if !cursors.is_empty() || journaled {
            let _ = self.tx.send(Msg::Store(cursors, journaled));
        }
    }

    /// Waits until every position handed over is stored; false when one could not be (it
    /// stays queued and is tried again).
    pub async fn sync(&self) -> bool {
        let (done, stored) = oneshot::channel();
        if self.tx.send(Msg::Sync(done)).is_err() {
            return false;
        }
        stored.await.unwrap_or(false)
    }

    /// Stores what was handed over (one attempt) and stops the task.
    pub async fn close(self) {
        let PositionWriter { tx, task } = self;
        drop(tx);
        let _ = task.await;
    }
}

async fn run(log: Arc<dyn Log>, topic: String, group: String, journal: Option<Journal>, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut pending: BTreeMap<u32, Cursor> = BTreeMap::new();
    // Journal entries recorded before the pending positions may not be durable yet.
    let mut journal_behind = false;
    let mut open = true;
    while open || !pending.is_empty() {
        // Idle: wait for work. Holding positions that failed: retry after a pause.
        let first = if pending.is_empty() {
            rx.recv().await
        } else {
            match tokio::time::timeout(RETRY, rx.recv()).await {
                Ok(msg) => msg,
                Err(_) => {
                    store(&*log, &topic, &group, journal.as_ref(), &mut journal_behind, &mut pending).await;
                    continue;
                }
            }
        };
        let mut waiting = Vec::new();
        let mut next = first;
        if next.is_none() {
            open = false;
        }
        while let Some(msg) = next.take() {
            match msg {
                Msg::Store(cursors, journaled) => {
                    pending.extend(cursors);
                    journal_behind |= journaled;
                }
                Msg::Sync(done) => waiting.push(done),
            }
            next = rx.try_recv().ok();
        }
        let stored = pending.is_empty() || store(&*log, &topic, &group, journal.as_ref(), &mut journal_behind, &mut pending).await;
        for done in waiting {
            let _ = done.send(stored);
        }
        if !open {
            // One last attempt made: a position that could not be stored means redelivery after
            // a restart, never a skipped event.
            break;
        }
    }
}

/// Waits for the journal when it may be behind, then stores `pending` (emptied on success).
async fn store(
    log: &dyn Log,
    topic: &str,
    group: &str,
    journal: Option<&Journal>,
    journal_behind: &mut bool,
    pending: &mut BTreeMap<u32, Cursor>,
) -> bool {
    if let (Some(journal), true) = (journal, *journal_behind) {
        if tokio::time::timeout(JOURNAL_WAIT, journal.flush()).await.is_err() {
            tracing::warn!(topic, group, "the delivery journal is behind; positions are stored later");
            return false;
        }
        *journal_behind = false;
    }
    let cursors: Vec<(u32, Cursor)> = pending.iter().map(|(p, c)| (*p, c.clone())).collect();
    match log.store_cursors(topic, group, &cursors).await {
        Ok(()) => {
            pending.clear();
            true
        }
        Err(e) => {
            tracing::error!(topic, group, error = %e, "storing positions failed; will retry");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::journal::{trail, Entry, Kind};
    use crate::config::LogSettings;
    use crate::log::embedded::EmbeddedLog;
    use crate::log::TopicConfig;

    fn at(offset: u64) -> Cursor {
        Cursor { committed: offset, scanned: offset, unacked: Vec::new(), attempts: Vec::new() }
    }

    #[tokio::test]
    async fn later_positions_win_and_sync_waits_until_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir.path(), LogSettings::default()).await.expect("open"));
        log.create_topic("t", TopicConfig { partitions: 2, retention_ms: 0, retention_bytes: 0 }).await.expect("topic");
        let writer = PositionWriter::start(log.clone(), "t".into(), "g".into(), None);
        writer.store(vec![(0, at(5)), (1, at(7))], false);
        writer.store(vec![(0, at(9))], false);
        assert!(writer.sync().await);
        assert_eq!(log.load_cursor("t", "g", 0).await.expect("load").map(|c| c.committed), Some(9));
        assert_eq!(log.load_cursor("t", "g", 1).await.expect("load").map(|c| c.committed), Some(7));
        writer.store(vec![(1, at(11))], false);
        writer.close().await;
        assert_eq!(log.load_cursor("t", "g", 1).await.expect("load").map(|c| c.committed), Some(11));
    }

    #[tokio::test]
    async fn positions_are_stored_only_after_the_journal_entries_before_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log: Arc<dyn Log> = Arc::new(EmbeddedLog::open(dir.path(), LogSettings::default()).await.expect("open"));
        log.create_topic("t", TopicConfig { partitions: 1, retention_ms: 0, retention_bytes: 0 }).await.expect("topic");
        let journal = Journal::start(log.clone()).await.expect("journal");
        let writer = PositionWriter::start(log.clone(), "t".into(), "g".into(), Some(journal.clone()));
        // On this single-threaded runtime the journal writer has not run yet when the
        // position is handed over: the position writer must wait for it.
        journal.record(Entry::now(Kind::Acknowledged, "t", 0, 4, "g", "e4"));
        writer.store(vec![(0, at(5))], true);
        assert!(writer.sync().await);
        assert_eq!(log.load_cursor("t", "g", 0).await.expect("load").map(|c| c.committed), Some(5));
        assert_eq!(trail(log.as_ref(), "e4", None).await.expect("trail").len(), 1, "the journal entry is stored first");
    }
}
