//! Property test: a shard with arbitrary bytes flipped, truncated or extended never makes the
//! reader panic or read out of bounds; it returns a value or an error.
mod common;

use common::{record, Rng};
use proptest::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use target_sft_core::shard::ShardReader;

use target_sft_core::{CacheWriter, CodecKind, Key, TeacherCache, WriterOptions};

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique() -> u64 {
    UNIQUE.fetch_add(1, Ordering::Relaxed)
}

fn sample_shard(codec: CodecKind) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!(
        "tsft-fuzz-{}-{}-{}",
        std::process::id(),
        codec.name(),
        unique()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let mut o = WriterOptions::new(8, 500);
    o.codec = codec;
    o.threads = 1;
    o.prior_records = 2;
    let mut w = CacheWriter::create(&dir, o).unwrap();
    let mut rng = Rng::new(11);
    for i in 0..6 {
        w.add(record(&mut rng, Key::Int(i), 500, 8, 5 + i as usize * 3))
            .unwrap();
    }
    w.close().unwrap();
    let c = TeacherCache::open(&dir).unwrap();
    let bytes = std::fs::read(dir.join(&c.manifest.shards[0].file)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

fn exercise(bytes: &[u8], tag: u64) {
    let path = std::env::temp_dir().join(format!(
        "tsft-fuzz-case-{}-{tag}-{}.safetensors",
        std::process::id(),
        unique()
    ));
    std::fs::write(&path, bytes).unwrap();
    if let Ok(r) = ShardReader::open(&path, None) {
        for i in 0..r.len() {
            let _ = r.decode(i);
            let _ = r.key(i);
        }
    }
    let _ = std::fs::remove_file(&path);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn mutated_compact_shards_never_panic(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>(), truncate in any::<bool>()) {
        let mut bytes = sample_shard(CodecKind::Compact);
        for (pos, val) in flips {
            let n = bytes.len();
            bytes[pos % n] ^= val | 1;
        }
        if truncate {
            let n = bytes.len();
            bytes.truncate(cut % n);
        }
        exercise(&bytes, 1);
    }

    #[test]
    fn mutated_exact_shards_never_panic(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let mut bytes = sample_shard(CodecKind::Exact);
        for (pos, val) in flips {
            let n = bytes.len();
            bytes[pos % n] ^= val | 1;
        }
        exercise(&bytes, 2);
    }
}

#[test]
fn every_single_byte_flip_in_the_payload_region_is_safe() {
    let clean = sample_shard(CodecKind::Compact);
    let mut rng = Rng::new(5);
    for _ in 0..200 {
        let mut b = clean.clone();
        let pos = rng.below(b.len() as u64) as usize;
        b[pos] ^= 1 << rng.below(8);
        exercise(&b, 3);
    }
}
