//! Returning freed memory to the system from threads that have gone idle.
//!
//! The binary's allocator (mimalloc) gives a thread's freed pages back to the system only
//! later, when that same thread frees again in the same segment after the purge delay. A
//! thread that goes quiet after a burst (a runtime worker that parks, a blocking thread that
//! wrote a batch) keeps them resident, and even busy threads keep many long past the delay:
//! `justizbus bench --large-log-gb 5` peaked at 362-417 MiB of RSS where heaptrack counted at
//! most 188 MiB of live heap. The allocator is chosen by the binary, so the binary registers
//! how to release ([`set_release`]); the library says when: [`release_if_due`], called as a
//! runtime worker parks and after each partition write, at most once per interval and
//! thread. Released pages that are used again are faulted in again: the interval trades
//! memory for CPU (README, Configuration).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// How the process returns a thread's freed memory; set once by the binary.
static RELEASE: OnceLock<fn()> = OnceLock::new();

/// Least time between two releases on one thread, in milliseconds; 0 = never, until a
/// long-running command (`serve`, `adapter`) sets it.
static INTERVAL_MS: AtomicU64 = AtomicU64::new(0);

/// The default of the server's `memory_release_interval_ms`, and the adapters' interval.
pub const DEFAULT_INTERVAL_MS: u64 = 100;

thread_local! {
    /// When this thread last released.
    static LAST_RELEASE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Registers how freed memory is returned (the binary's allocator knows). Later calls are
/// ignored.
pub fn set_release(release: fn()) {
    let _ = RELEASE.set(release);
}

/// Sets the least interval between two releases on a thread (0 turns releasing off).
pub fn set_interval_ms(ms: u64) {
    INTERVAL_MS.store(ms, Ordering::Relaxed);
}

/// Returns this thread's freed memory if the interval has passed since it last did. Meant
/// for moments after which the thread may sleep: releasing costs a walk over the thread's
/// heap, and memory released is faulted in again when used.
pub fn release_if_due() {
    release_every(INTERVAL_MS.load(Ordering::Relaxed));
}

/// [`release_if_due`] with the interval given.
fn release_every(interval: u64) {
    if interval == 0 {
        return;
    }
    let Some(release) = RELEASE.get() else { return };
    let now = Instant::now();
    let due = LAST_RELEASE.with(|last| match last.get() {
        Some(at) if now.duration_since(at).as_millis() < u128::from(interval) => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Releases on this thread (other tests' threads may release too).
        static RELEASES: Cell<usize> = const { Cell::new(0) };
    }

    fn count_release() {
        RELEASES.with(|n| n.set(n.get() + 1));
    }

    /// Releases when a fresh thread asks a hundred times with `interval`.
    fn releases_on_a_fresh_thread(interval: u64) -> usize {
        std::thread::spawn(move || {
            (0..100).for_each(|_| release_every(interval));
            RELEASES.with(Cell::get)
        })
        .join()
        .expect("the releasing thread ran")
    }

    #[test]
    fn releases_at_most_once_per_interval_and_thread_and_never_at_zero() {
        set_release(count_release);
        assert_eq!(releases_on_a_fresh_thread(60_000), 1, "a hundred calls within the interval release once");
        assert_eq!(releases_on_a_fresh_thread(60_000), 1, "the interval is per thread");
        assert_eq!(releases_on_a_fresh_thread(0), 0, "an interval of 0 turns releasing off");
        let released = std::thread::spawn(|| {
            release_every(1);
            std::thread::sleep(std::time::Duration::from_millis(5));
            release_every(1);
            RELEASES.with(Cell::get)
        });
        assert_eq!(released.join().expect("the releasing thread ran"), 2, "again once the interval has passed");
    }
}
