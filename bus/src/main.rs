//! The `justizbus` binary: parses the command line and hands over to [`justizbus::cli`].

// mimalloc instead of glibc malloc: the XJustiz translation allocates many small strings and
// maps; measured with `justizbus xjustiz bench` side by side (README, section "Speed").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    allocator::keep_freed_memory_longer();
    justizbus::memory::set_release(allocator::release_freed_memory);
    justizbus::cli::main()
}

/// How long mimalloc keeps freed memory before it returns it to the system, and returning it
/// at once where a thread goes idle ([`justizbus::memory`]).
mod allocator {
    use std::os::raw::{c_int, c_long};

    /// `mi_option_purge_delay` in mimalloc 2.x's `mi_option_e` (include/mimalloc.h).
    const PURGE_DELAY: c_int = 15;
    /// mimalloc's own default.
    #[cfg(test)]
    const DEFAULT_PURGE_DELAY_MS: c_long = 10;
    /// Ours: 25 ms. With 10 ms the pages that 5 KB events and write batches pass through went
    /// back to the system and were faulted in again, 1.4-2.2 page faults per routed delivery;
    /// 25 ms halves them for about 4% of CPU and about 13 MiB more peak memory. A second
    /// (as mimalloc 3 does) saves a little more CPU for 80-250 MiB more (README, Configuration).
    const PURGE_DELAY_MS: c_long = 25;

    extern "C" {
        #[cfg(test)]
        fn mi_option_get(option: c_int) -> c_long;
        fn mi_option_set(option: c_int, value: c_long);
        fn mi_collect(force: bool);
    }

    /// Returns the calling thread's freed memory to the system now, purge delay or not
    /// (`mi_collect(true)`: frees what other threads handed back, then purges every free
    /// span of the thread's segments). What idle threads would otherwise keep resident.
    #[allow(unsafe_code)]
    pub fn release_freed_memory() {
        // SAFETY: `mi_collect` acts on the calling thread's own heap and may be called at
        // any time from any thread (mimalloc.h); it takes no pointers.
        unsafe { mi_collect(true) }
    }

    /// Sets the purge delay unless the operator chose one with `MIMALLOC_PURGE_DELAY`.
    pub fn keep_freed_memory_longer() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            set(PURGE_DELAY_MS);
        }
    }

    #[allow(unsafe_code)]
    fn set(ms: c_long) {
        // SAFETY: mimalloc options are plain integers that mimalloc reads atomically; setting
        // one has no other precondition (mimalloc.h: `mi_option_set`).
        unsafe { mi_option_set(PURGE_DELAY, ms) }
    }

    #[allow(unsafe_code)]
    #[cfg(test)]
    fn get() -> c_long {
        // SAFETY: as in `set`.
        unsafe { mi_option_get(PURGE_DELAY) }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Resident memory of this process, in bytes.
        fn resident() -> u64 {
            let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
            let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).expect("resident pages in statm");
            pages * 4096
        }

        #[test]
        fn releasing_returns_what_the_thread_freed() {
            std::thread::spawn(|| {
                let blocks: Vec<Vec<u8>> = (0..65_536).map(|i| vec![i as u8; 1024]).collect();
                let held = resident();
                drop(blocks);
                release_freed_memory();
                let released = held.saturating_sub(resident());
                // 64 MiB were freed; other tests of this binary allocate a little meanwhile.
                assert!(released >= 32 << 20, "only {} KiB of 64 MiB returned", released >> 10);
            })
            .join()
            .expect("the test thread ran");
        }

        #[test]
        fn the_purge_delay_is_raised_from_mimallocs_default() {
            if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
                return; // the operator's value stands; nothing of ours to check
            }
            // 10 is the purge delay's default, not that of the options beside it (1 and 0):
            // the index names the right option.
            assert_eq!(get(), DEFAULT_PURGE_DELAY_MS);
            keep_freed_memory_longer();
            assert_eq!(get(), PURGE_DELAY_MS);
        }
    }
}
