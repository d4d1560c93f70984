//! Re-encode an exact cache with the compact codec and report bytes per supervised token, KL of
//! the decoded top-k against the original, and single-thread encode/decode speed.
//! Usage: cargo run --release -p target-sft-core --example tune_compact -- EXACT_CACHE OUT_DIR
//!        [max_mean_kl | sqrt_step:tail_step] [id_table_size zstd_level]
use std::time::Instant;

use target_sft_core::codec::LadderParams;
use target_sft_core::{
    CacheWriter, CodebookParams, CodecKind, Record, TeacherCache, WriterOptions,
};

fn kl(orig: &Record, dec: &Record, k: usize) -> (f64, usize) {
    let mut total = 0.0;
    for r in 0..orig.n_supervised() {
        let row = |rec: &Record| {
            let mut v: Vec<(i32, f64)> = (0..k)
                .map(|j| {
                    (
                        rec.topk_ids[r * k + j],
                        f64::from(rec.topk_logprobs[r * k + j]),
                    )
                })
                .filter(|x| x.0 >= 0)
                .collect();
            v.sort_by_key(|x| x.0);
            v
        };
        let (p, q) = (row(orig), row(dec));
        assert_eq!(
            p.iter().map(|x| x.0).collect::<Vec<_>>(),
            q.iter().map(|x| x.0).collect::<Vec<_>>()
        );
        let lse = |v: &[(i32, f64)]| {
            let m = v.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
            m + v.iter().map(|x| (x.1 - m).exp()).sum::<f64>().ln()
        };
        let (lp, lq) = (lse(&p), lse(&q));
        for (a, b) in p.iter().zip(&q) {
            let pa = (a.1 - lp).exp();
            if pa > 0.0 {
                total += pa * ((a.1 - lp) - (b.1 - lq));
            }
        }
    }
    (total, orig.n_supervised())
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let src = TeacherCache::open(std::path::Path::new(&a[1])).unwrap();
    let out = std::path::Path::new(&a[2]);
    let _ = std::fs::remove_dir_all(out);
    let f = |i: usize, d: f64| a.get(i).map_or(d, |s| s.parse().unwrap());
    let recs: Vec<Record> = (0..src.len()).map(|p| src.get_at(p).unwrap()).collect();
    let k = src.manifest.top_k;
    let mut o = WriterOptions::new(k, src.manifest.vocab_size);
    o.codec = CodecKind::Compact;
    o.ladder = match a.get(3).and_then(|s| s.split_once(':')) {
        Some((h, t)) => LadderParams::fixed(CodebookParams {
            sqrt_step: h.parse().unwrap(),
            tail_step: t.parse().unwrap(),
            floor: -48.0,
        }),
        None => LadderParams::budget(f(3, 1e-4), -48.0),
    };
    o.id_table_size = f(4, 8192.0) as usize;
    o.zstd_level = f(5, 3.0) as i32;
    o.threads = 1;
    let sup: usize = recs.iter().map(Record::n_supervised).sum();
    let t0 = Instant::now();
    let mut w = CacheWriter::create(out, o).unwrap();
    for r in &recs {
        w.add(r.clone()).unwrap();
    }
    w.close().unwrap();
    let enc = t0.elapsed().as_secs_f64();
    let c = TeacherCache::open(out).unwrap();
    let bytes: u64 = c.manifest.shards.iter().map(|s| s.bytes).sum();
    let t0 = Instant::now();
    let reps = 3;
    let mut dec = Vec::new();
    for _ in 0..reps {
        dec = (0..c.len())
            .map(|p| c.get_at(p).unwrap())
            .collect::<Vec<_>>();
    }
    let dt = t0.elapsed().as_secs_f64() / reps as f64;
    let (mut tk, mut n) = (0.0, 0);
    for (o, d) in recs.iter().zip(&dec) {
        let (x, m) = kl(o, d, k);
        tk += x;
        n += m;
    }
    println!(
        "bytes/tok {:.1}  meanKL {:.2e}  enc {:.0}k tok/s (wall, 1 encoder)  dec {:.0}k tok/s/core",
        bytes as f64 / sup as f64,
        tk / n as f64,
        sup as f64 / enc / 1e3,
        sup as f64 / dt / 1e3
    );
}
