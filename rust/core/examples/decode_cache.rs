//! Decode every record of a cache several times and report supervised tokens/s (one thread).
//! Usage: cargo run --release -p target-sft-core --example decode_cache -- CACHE_DIR [REPEATS]
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::Path::new(args.get(1).expect("cache dir"));
    let reps: usize = args.get(2).map_or(3, |s| s.parse().unwrap());
    let c = target_sft_core::TeacherCache::open(dir).unwrap();
    let mut sup = 0u64;
    let t0 = Instant::now();
    for _ in 0..reps {
        for p in 0..c.len() {
            sup += c.get_at(p).unwrap().n_supervised() as u64;
        }
    }
    let s = t0.elapsed().as_secs_f64();
    println!(
        "{} supervised tokens/s ({} records x {reps}, {s:.3} s)",
        (sup as f64 / s) as u64,
        c.len()
    );
}
