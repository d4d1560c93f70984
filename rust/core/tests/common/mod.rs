//! Shared helpers for the integration tests: a tiny deterministic RNG and record generator.
#![allow(dead_code)]

use target_sft_core::{Key, Record};

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A record with every feature the format has: prompt prefix, label exceptions, padding,
/// -inf and very negative values, labels inside and outside the support.
pub fn record(rng: &mut Rng, key: Key, vocab: usize, k: usize, t: usize) -> Record {
    let input_ids: Vec<i32> = (0..t).map(|_| rng.below(vocab as u64) as i32).collect();
    let prompt = t / 3;
    let mut labels: Vec<i32> = input_ids
        .iter()
        .enumerate()
        .map(|(i, &x)| if i < prompt || i == 0 { -100 } else { x })
        .collect();
    if t > 4 && rng.below(2) == 0 {
        labels[t - 1] = ((input_ids[t - 1] as u64 + 1) % vocab as u64) as i32; // exception
    }
    let (topk_ids, topk_logprobs, label_logprobs, label_ranks) = rows(rng, &labels, vocab, k);
    Record {
        key,
        input_ids,
        labels,
        topk_ids,
        topk_logprobs,
        label_logprobs,
        label_ranks,
    }
}

/// Random teacher rows `(topk_ids, topk_logprobs, label_logprobs, label_ranks)` of `k` entries
/// for the supervised positions of `labels` (a record's row fields).
#[allow(clippy::type_complexity)]
pub fn rows(
    rng: &mut Rng,
    labels: &[i32],
    vocab: usize,
    k: usize,
) -> (Vec<i32>, Vec<f32>, Vec<f32>, Vec<i32>) {
    let t = labels.len();
    let sup: Vec<usize> = (1..t).filter(|&i| labels[i] != -100).collect();
    let mut topk_ids = Vec::new();
    let mut topk_lps = Vec::new();
    let mut label_lps = Vec::new();
    let mut label_ranks = Vec::new();
    for &pos in &sup {
        let n = if rng.below(7) == 0 { k / 2 } else { k };
        let mut ids: Vec<i32> = Vec::new();
        let label = labels[pos];
        if rng.below(3) != 0 {
            ids.push(label);
        }
        while ids.len() < n {
            let c = if rng.below(2) == 0 {
                rng.below(64.min(vocab as u64))
            } else {
                rng.below(vocab as u64)
            } as i32;
            if !ids.contains(&c) {
                ids.push(c);
            }
        }
        let mut lps: Vec<f32> = (0..n)
            .map(|j| -(j as f32) * (0.05 + rng.unit() as f32 * 2.0))
            .collect();
        lps[0] = -(rng.unit() as f32) * 0.1;
        if n > 3 && rng.below(5) == 0 {
            lps[n - 1] = f32::NEG_INFINITY;
        }
        if n > 3 && rng.below(5) == 0 {
            lps[n - 2] = -60.0 - rng.unit() as f32;
        }
        let (ll, lr) = match ids.iter().position(|&x| x == label) {
            Some(j) => (lps[j], j as i32),
            None => (-30.0 - rng.unit() as f32, k as i32 + rng.below(1000) as i32),
        };
        ids.resize(k, -1);
        lps.resize(k, f32::NEG_INFINITY);
        topk_ids.extend(ids);
        topk_lps.extend(lps);
        label_lps.push(ll);
        label_ranks.push(lr);
    }
    (topk_ids, topk_lps, label_lps, label_ranks)
}
