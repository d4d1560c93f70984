//! Decode every record of a cache on one thread, several times, and report supervised tokens/s
//! (the codec and the shard reader only: no Python).
//! Usage: cargo run --release -p target-sft-core --example decode_bench -- CACHE [REPEATS]
use std::time::Instant;

use target_sft_core::TeacherCache;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let c = TeacherCache::open(std::path::Path::new(&a[1])).unwrap();
    let reps: usize = a.get(2).map_or(5, |s| s.parse().unwrap());
    let sup = c.manifest.num_supervised;
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t0 = Instant::now();
        for p in 0..c.len() {
            std::hint::black_box(c.get_at(p).unwrap());
        }
        best = best.min(t0.elapsed().as_secs_f64());
    }
    println!("{:.0} supervised tokens/s", sup as f64 / best);
}
