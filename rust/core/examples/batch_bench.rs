//! Build padded batches from a cache on one thread, two ways, and report supervised tokens/s:
//! decoding each record straight into the batch tensors (what `BatchPlan::fill` does), and the
//! per-record round trip (decode into a `Record`'s vectors, then copy them into the batch).
//! Usage: cargo run --release -p target-sft-core --example batch_bench -- CACHE_DIR [BATCH] [REPEATS]
use std::time::Instant;

use target_sft_core::{BatchBuffers, BatchOptions, BatchPlan, RecordView, Source, TeacherCache};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::Path::new(args.get(1).expect("cache dir"));
    let batch: u64 = args.get(2).map_or(16, |s| s.parse().unwrap());
    let reps: usize = args.get(3).map_or(5, |s| s.parse().unwrap());
    let cache = TeacherCache::open(dir).unwrap();
    let opts = BatchOptions::default();
    let batches: Vec<Vec<u64>> = (0..cache.len() / batch)
        .map(|b| (b * batch..(b + 1) * batch).collect())
        .collect();
    let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    let (mut tids, mut tlps) = (Vec::new(), Vec::new());
    let mut seq = Vec::new();
    let mut run = |round_trip: bool| -> (f64, usize) {
        let mut best = f64::INFINITY;
        let mut sup = 0;
        for _ in 0..reps {
            sup = 0;
            let t0 = Instant::now();
            for positions in &batches {
                let recs: Vec<_> = if round_trip {
                    positions
                        .iter()
                        .map(|&p| cache.get_at(p).unwrap())
                        .collect()
                } else {
                    Vec::new()
                };
                let sources: Vec<Source<'_>> = if round_trip {
                    recs.iter()
                        .map(|r| {
                            Source::Decoded(RecordView {
                                key: r.key.clone(),
                                input_ids: &r.input_ids,
                                labels: &r.labels,
                                topk_ids: &r.topk_ids,
                                topk_logprobs: &r.topk_logprobs,
                                label_logprobs: &r.label_logprobs,
                                top_k: cache.manifest.top_k,
                            })
                        })
                        .collect()
                } else {
                    positions
                        .iter()
                        .map(|&p| Source::Cached {
                            cache: &cache,
                            position: p,
                            input_ids: None,
                            labels: None,
                            reference: None,
                        })
                        .collect()
                };
                let plan = BatchPlan::new(&sources, &opts).unwrap();
                let (n, nt) = (plan.tokens(), plan.teacher_elements());
                ids.resize(n, 0i64);
                mask.resize(n, 0i64);
                labels.resize(n, 0i64);
                seq.resize(n, 0i64);
                tids.resize(nt, 0i32);
                tlps.resize(nt, 0f32);
                let out = BatchBuffers {
                    input_ids: &mut ids[..n],
                    attention_mask: Some(&mut mask[..n]),
                    labels: &mut labels[..n],
                    position_ids: None,
                    teacher_ids: &mut tids[..nt],
                    teacher_logprobs: &mut tlps[..nt],
                    sequence_ids: &mut seq[..n],
                    reference: None,
                };
                sup += plan.fill(&sources, out, false).unwrap();
            }
            best = best.min(t0.elapsed().as_secs_f64());
        }
        (best, sup)
    };
    let (direct, sup) = run(false);
    let (round_trip, _) = run(true);
    println!(
        "{} batches of {batch}, {sup} supervised tokens, best of {reps}:\n  direct into the batch: {:.0} supervised tokens/s\n  Record round trip:     {:.0} supervised tokens/s ({:.2}x the time)",
        batches.len(),
        sup as f64 / direct,
        sup as f64 / round_trip,
        round_trip / direct
    );
}
