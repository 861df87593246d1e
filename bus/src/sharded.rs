//! Hash tables split into shards by hash, so that growing never moves every entry at once.
//!
//! A hashbrown table doubles when full and moves all its entries within that one insert. The
//! mailbox store's id index did so at 229,376 entries (100,000 routed events and their
//! receipts, then 15,000 more) while holding the index lock: 3.5-19 ms in which no mailbox
//! append could finish, and the events routed meanwhile arrived 25-50 ms late (`bench
//! routing`, latency phase, at 7.34 s in 8 of 12 runs). Split into [`SHARDS`] tables,
//! each doubles on its own, moving a 64th of the entries; the shards fill evenly, so their
//! doublings come one after another, spread over a few percent of growth.

use hashbrown::HashTable;

/// Number of shards.
pub const SHARDS: usize = 64;

/// The shard of a hash: the top bits of its product with an odd constant, which depend on all
/// of its bits. hashbrown picks buckets from a hash's low bits and tags them with its top seven,
/// so those must keep varying within a shard, also for hashes whose halves are related: the
/// log's id hash is two CRCs of the id, which differ by a constant for ids of one length.
/// Taking bits 32-37 as the shard fixed the low six bits of such hashes within a shard: every
/// probe of a shard started at one in 64 of its buckets.
fn shard_of(hash: u64) -> usize {
    (hash.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - SHARDS.trailing_zeros())) as usize
}

/// Entries of type `T` found by a 64-bit hash, in [`SHARDS`] hashbrown tables. Callers work on
/// the shard of a hash with hashbrown's own API, passing the same hash.
#[derive(Debug)]
pub struct ShardedTable<T> {
    shards: Box<[HashTable<T>]>,
}

impl<T> Default for ShardedTable<T> {
    fn default() -> Self {
        ShardedTable { shards: (0..SHARDS).map(|_| HashTable::new()).collect() }
    }
}

impl<T> ShardedTable<T> {
    /// The table holding the entries of `hash`.
    pub fn shard(&self, hash: u64) -> &HashTable<T> {
        &self.shards[shard_of(hash)]
    }

    /// The table holding the entries of `hash`, to change.
    pub fn shard_mut(&mut self, hash: u64) -> &mut HashTable<T> {
        &mut self.shards[shard_of(hash)]
    }

    /// Shard number `i` (below [`SHARDS`]), to read a shard at a time.
    pub fn shard_at(&self, i: usize) -> &HashTable<T> {
        &self.shards[i]
    }

    /// Shard number `i` (below [`SHARDS`]), for work done a shard at a time.
    pub fn shard_at_mut(&mut self, i: usize) -> &mut HashTable<T> {
        &mut self.shards[i]
    }

    /// Entries in all shards.
    pub fn len(&self) -> usize {
        self.shards.iter().map(HashTable::len).sum()
    }

    /// True when no shard holds an entry.
    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(HashTable::is_empty)
    }

    /// Entries all shards can hold without growing.
    pub fn capacity(&self) -> usize {
        self.shards.iter().map(HashTable::capacity).sum()
    }

    /// Removes every entry (keeping the memory).
    pub fn clear(&mut self) {
        self.shards.iter_mut().for_each(HashTable::clear);
    }

    /// Gives back the memory of shards filled to less than a quarter (of `least / SHARDS`
    /// entries at least, so small shards are left alone), rehashing their entries with `hasher`.
    pub fn shrink_sparse(&mut self, least: usize, hasher: impl Fn(&T) -> u64) {
        for shard in self.shards.iter_mut() {
            if shard.capacity() > 4 * shard.len().max(least / SHARDS) {
                shard.shrink_to_fit(&hasher);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hashes spread like a real hash's (a 64-bit mix of the counter).
    fn hash(i: u64) -> u64 {
        let mut x = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    fn insert(table: &mut ShardedTable<(u64, u64)>, i: u64) {
        let h = hash(i);
        table.shard_mut(h).insert_unique(h, (h, i), |&(h, _)| h);
    }

    fn find(table: &ShardedTable<(u64, u64)>, i: u64) -> Option<u64> {
        let h = hash(i);
        table.shard(h).find(h, |&(k, _)| k == h).map(|&(_, v)| v)
    }

    #[test]
    fn finds_what_was_inserted_and_counts_over_all_shards() {
        let mut table = ShardedTable::default();
        assert!(table.is_empty());
        (0..10_000).for_each(|i| insert(&mut table, i));
        assert_eq!(table.len(), 10_000);
        assert!(table.capacity() >= 10_000);
        assert!((0..10_000).all(|i| find(&table, i) == Some(i)));
        assert_eq!(find(&table, 10_000), None);
        table.clear();
        assert!(table.is_empty() && find(&table, 1).is_none());
    }

    #[test]
    fn growing_moves_a_shard_at_a_time_not_every_entry() {
        let mut table = ShardedTable::default();
        let (mut capacity, mut largest_move) = (0, 0);
        for i in 0..200_000 {
            insert(&mut table, i);
            let now = table.capacity();
            if now != capacity {
                // Entries moved by this insert: those of the shard that grew.
                largest_move = largest_move.max(table.shard(hash(i)).len());
                capacity = now;
            }
        }
        // One table would have moved 114,688 entries at once at its last doubling; a shard
        // holds about 3,100 of the 200,000.
        assert!(largest_move < 12_500, "a growth moved {largest_move} entries");
    }

    #[test]
    fn within_a_shard_the_bucket_bits_still_vary_when_the_halves_of_the_hash_are_related() {
        // Like the log's id hash: the low half is the high half xor a constant.
        let related = |a: u64| (a << 32) | (a ^ 0x5bd1_e995);
        for shard in [0, 17, 63] {
            let low_bits: std::collections::HashSet<u64> =
                (0..1_000_000u64).map(|i| related(hash(i) >> 32)).filter(|&h| shard_of(h) == shard).map(|h| h & 63).collect();
            assert_eq!(low_bits.len(), 64, "shard {shard}: only {} of 64 low-bit patterns", low_bits.len());
        }
    }

    #[test]
    fn sparse_shards_give_memory_back_and_keep_their_entries() {
        let mut table = ShardedTable::default();
        (0..50_000).for_each(|i| insert(&mut table, i));
        let full = table.capacity();
        for i in 100..50_000 {
            let h = hash(i);
            table.shard_mut(h).find_entry(h, |&(k, _)| k == h).expect("present").remove();
        }
        table.shrink_sparse(1024, |&(h, _)| h);
        assert!(table.capacity() < full / 4, "capacity {} of {full}", table.capacity());
        assert!((0..100).all(|i| find(&table, i) == Some(i)));
    }
}
