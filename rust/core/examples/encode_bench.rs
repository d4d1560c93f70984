//! Encode every record of a cache with the compact codec on one thread, several times, and
//! report supervised tokens/s (codec only: no validation, no I/O).
//! Usage: cargo run --release -p target-sft-core --example encode_bench -- CACHE [REPEATS] [MAX_MEAN_KL] [ZSTD_LEVEL]
use std::time::Instant;

use target_sft_core::codec::{Codec, EncodeScratch, IdTable, LadderParams};
use target_sft_core::{Record, TeacherCache};

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let src = TeacherCache::open(std::path::Path::new(&a[1])).unwrap();
    let reps: usize = a.get(2).map_or(3, |s| s.parse().unwrap());
    let recs: Vec<Record> = (0..src.len()).map(|p| src.get_at(p).unwrap()).collect();
    let (k, v) = (src.manifest.top_k, src.manifest.vocab_size);
    let mut counts = vec![0u64; v];
    recs.iter()
        .flat_map(|r| r.topk_ids.iter())
        .filter(|&&x| x >= 0)
        .for_each(|&x| counts[x as usize] += 1);
    let budget: f64 = a.get(3).map_or(1e-4, |s| s.parse().unwrap());
    let level: i32 = a.get(4).map_or(3, |s| s.parse().unwrap());
    let codec = Codec::compact_writer(
        k,
        v,
        level,
        LadderParams::budget(budget, -48.0),
        IdTable::from_counts(&counts, 8192),
    );
    let mut scratch = EncodeScratch::default();
    let sup: usize = recs.iter().map(Record::n_supervised).sum();
    let t0 = Instant::now();
    let mut bytes = 0;
    for _ in 0..reps {
        for r in &recs {
            bytes += codec.encode(r, &mut scratch).unwrap().len();
        }
    }
    let s = t0.elapsed().as_secs_f64();
    println!(
        "{:.0} supervised tokens/s ({:.1} B/tok)",
        (sup * reps) as f64 / s,
        bytes as f64 / (sup * reps) as f64
    );
}
