//! The per-partition hash chain (DESIGN.md section 8).
//!
//! ```text
//! digest(n) = SHA-256( i64 timestamp_ms | u32 len | id | u32 len | key | u32 len | value )
//! h(n)      = SHA-256( h(n-1) | u64 offset | digest(n) )      h(-1) = 32 zero bytes
//! ```
//!
//! All integers little endian. The canonical bytes of record n are `u64 offset | digest(n)`:
//! the offset makes removal and reordering visible, and hashing the record's fields first lets
//! an export prove records outside its range by their digest alone, without their contents.
//! Both backends compute the same values from the same records.

use sha2::{Digest, Sha256};

/// A chain value.
pub type ChainHash = [u8; 32];

/// The chain value before offset 0.
pub const GENESIS: ChainHash = [0u8; 32];

/// The digest of one record's fields.
pub fn record_digest(timestamp_ms: i64, id: &[u8], key: &[u8], value: &[u8]) -> ChainHash {
    let mut h = Sha256::new();
    h.update(timestamp_ms.to_le_bytes());
    for part in [id, key, value] {
        h.update((part.len() as u32).to_le_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// The chain value of the record at `offset` whose digest is `digest`, following `prev`.
pub fn link(prev: &ChainHash, offset: u64, digest: &ChainHash) -> ChainHash {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(offset.to_le_bytes());
    h.update(digest);
    h.finalize().into()
}

/// `link` of a whole record.
pub fn next(prev: &ChainHash, offset: u64, timestamp_ms: i64, id: &[u8], key: &[u8], value: &[u8]) -> ChainHash {
    link(prev, offset, &record_digest(timestamp_ms, id, key, value))
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses hex into exactly `N` bytes.
pub fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.trim();
    if text.len() != N * 2 || !text.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&text[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_and_the_order_change_the_chain() {
        let a = next(&GENESIS, 0, 1, b"id", b"k", b"v");
        assert_ne!(a, next(&GENESIS, 0, 2, b"id", b"k", b"v"));
        assert_ne!(a, next(&GENESIS, 1, 1, b"id", b"k", b"v"));
        assert_ne!(a, next(&GENESIS, 0, 1, b"id", b"k", b"w"));
        // Field boundaries are part of the digest: moving a byte from key to value differs.
        assert_ne!(record_digest(1, b"i", b"kv", b""), record_digest(1, b"i", b"k", b"v"));
        let b = next(&a, 1, 1, b"id2", b"k", b"v");
        let swapped = next(&next(&GENESIS, 0, 1, b"id2", b"k", b"v"), 1, 1, b"id", b"k", b"v");
        assert_ne!(b, swapped);
        assert_eq!(unhex::<32>(&hex(&b)), Some(b));
        assert_eq!(unhex::<32>("zz"), None);
    }
}
