//! Hashes used by the format (all XXH3 with seed 0, see docs/FORMAT.md §Hashes).

use xxhash_rust::xxh3::xxh3_64;

/// Content address of a record: XXH3-64 of the token ids as little-endian int32.
pub fn token_hash(input_ids: &[i32]) -> u64 {
    xxh3_64(as_le_bytes_i32(input_ids).as_ref())
}

/// Hash of a key's canonical byte encoding (see [`crate::record::Key::encode`]).
pub fn key_hash(encoded_key: &[u8]) -> u64 {
    xxh3_64(encoded_key)
}

/// Whole-file checksum written to the manifest: `"xxh3-128:" + 32 lowercase hex digits`.
pub fn file_checksum(bytes: &[u8]) -> String {
    parts_checksum(&[bytes])
}

/// [`file_checksum`] of the concatenation of `parts`, without concatenating them.
pub fn parts_checksum(parts: &[&[u8]]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    parts.iter().for_each(|p| h.update(p));
    format!("xxh3-128:{:032x}", h.digest128())
}

/// Region checksum of format version 2 (shard tables and header, the manifest's seal): XXH3-64,
/// seed 0.
pub fn region_checksum(bytes: &[u8]) -> u64 {
    xxh3_64(bytes)
}

fn as_le_bytes_i32(v: &[i32]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        // SAFETY: i32 has no padding and any byte pattern is a valid u8; the slice covers
        // exactly the memory of `v`, which outlives the returned borrow.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v))
        })
    } else {
        std::borrow::Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}
