//! What a cache's top-k kept and what its codec cost: per-shard fidelity statistics
//! (docs/FORMAT.md §Statistics). Informational only: no reader decision depends on them.
//!
//! Everything is stored as sums, counts, extremes and a fixed histogram, so the statistics of a
//! cache are the [`Fidelity::absorb`] fold of its shards' (in manifest order), however the
//! shards were written: one writer, an append, or several ranks joined by
//! [`crate::Manifest::merge`].

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::codec::compact;
use crate::error::{Error, Result};
use crate::record::{supervised_labels, Record};

/// Bins of the kept-mass histogram: bin `b` counts the rows whose kept mass `m` has
/// `floor(100·m) = b` (`m < 0` counts in bin 0, `m ≥ 0.99` in bin 99), a resolution of 0.01.
pub const KEPT_MASS_BINS: usize = 100;

/// The histogram bin of a kept mass (see [`KEPT_MASS_BINS`]).
#[inline]
pub fn kept_mass_bin(m: f64) -> usize {
    let b = (m * KEPT_MASS_BINS as f64).floor();
    if b.is_nan() || b < 0.0 {
        0
    } else {
        (b as usize).min(KEPT_MASS_BINS - 1)
    }
}

/// Fidelity statistics of a set of supervised rows (a record, a shard or a whole cache).
///
/// A row's *kept mass* is `Σ exp(topk_logprobs)` over its non-padding entries (the teacher
/// probability its top-k holds; log-probs are over the full vocabulary); the label is *in the
/// top-k* when its id is one of the row's ids; the *entropy* is the teacher's full-vocabulary
/// entropy in nats, known only to the producer of the record (the builder); the *codec KL* of
/// a `compact` row is `KL(exact ‖ decoded)` of its top-k log-probs, both renormalised over the
/// row's entries, measured when the row is encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fidelity {
    /// Supervised rows counted.
    pub rows: u64,
    /// Sum of the rows' kept masses.
    pub kept_mass_sum: f64,
    /// Smallest kept mass (absent when `rows = 0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_mass_min: Option<f64>,
    /// Rows per kept-mass bin (see [`KEPT_MASS_BINS`]), stored sparse: `{"bin": rows}`.
    #[serde(
        serialize_with = "ser_hist",
        deserialize_with = "de_hist",
        default = "empty_hist"
    )]
    pub kept_mass_hist: Vec<u64>,
    /// Rows whose label id is among the row's top-k ids.
    pub label_in_topk: u64,
    /// Rows whose teacher entropy was given, and the sum of those entropies (nats).
    #[serde(default)]
    pub entropy_rows: u64,
    #[serde(default)]
    pub entropy_sum: f64,
    /// Rows whose codec KL was measured (the `compact` codec; 0 for `exact`, which is lossless),
    /// their sum and their largest KL (nats).
    #[serde(default)]
    pub codec_kl_rows: u64,
    #[serde(default)]
    pub codec_kl_sum: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub codec_kl_max: Option<f64>,
}

fn empty_hist() -> Vec<u64> {
    vec![0; KEPT_MASS_BINS]
}

fn ser_hist<S: Serializer>(h: &[u64], s: S) -> std::result::Result<S::Ok, S::Error> {
    let sparse: BTreeMap<usize, u64> = h
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(b, &n)| (b, n))
        .collect();
    sparse.serialize(s)
}

fn de_hist<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<u64>, D::Error> {
    let sparse = BTreeMap::<usize, u64>::deserialize(d)?;
    let mut h = empty_hist();
    for (b, n) in sparse {
        if b >= KEPT_MASS_BINS {
            return Err(serde::de::Error::custom(format!(
                "kept_mass_hist bin {b} is outside 0..{KEPT_MASS_BINS}"
            )));
        }
        h[b] = n;
    }
    Ok(h)
}

impl Default for Fidelity {
    fn default() -> Self {
        Self {
            rows: 0,
            kept_mass_sum: 0.0,
            kept_mass_min: None,
            kept_mass_hist: empty_hist(),
            label_in_topk: 0,
            entropy_rows: 0,
            entropy_sum: 0.0,
            codec_kl_rows: 0,
            codec_kl_sum: 0.0,
            codec_kl_max: None,
        }
    }
}

fn min_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

impl Fidelity {
    /// Add `other`'s rows to these (sums add, extremes combine, histograms add).
    pub fn absorb(&mut self, other: &Fidelity) {
        self.rows += other.rows;
        self.kept_mass_sum += other.kept_mass_sum;
        self.kept_mass_min = min_opt(self.kept_mass_min, other.kept_mass_min);
        for (a, b) in self.kept_mass_hist.iter_mut().zip(&other.kept_mass_hist) {
            *a += b;
        }
        self.label_in_topk += other.label_in_topk;
        self.entropy_rows += other.entropy_rows;
        self.entropy_sum += other.entropy_sum;
        self.codec_kl_rows += other.codec_kl_rows;
        self.codec_kl_sum += other.codec_kl_sum;
        self.codec_kl_max = max_opt(self.codec_kl_max, other.codec_kl_max);
    }

    /// The fold of the given statistics in order; `None` when there are none.
    pub fn fold<'a>(parts: impl IntoIterator<Item = &'a Fidelity>) -> Option<Fidelity> {
        let mut out: Option<Fidelity> = None;
        for p in parts {
            out.get_or_insert_with(Fidelity::default).absorb(p);
        }
        out
    }

    /// The statistics of one validated record. `costs` are the compact encoder's per-row kept
    /// masses and codec KLs ([`crate::codec::EncodeScratch::compact_costs`]; `None` for the exact
    /// codec, which is lossless); `entropy_sum` is the sum of its rows' teacher entropies when
    /// the producer gave them (see [`entropy_sum`]).
    pub fn of_record(
        rec: &Record,
        top_k: usize,
        costs: Option<&[compact::RowCost]>,
        entropy_sum: Option<f64>,
    ) -> Fidelity {
        let k = top_k;
        let mut f = Fidelity::default();
        for (r, label) in supervised_labels(&rec.labels).enumerate() {
            let ids = &rec.topk_ids[r * k..(r + 1) * k];
            let lps = &rec.topk_logprobs[r * k..(r + 1) * k];
            let n = ids.iter().position(|&x| x == -1).unwrap_or(k);
            let mass = match costs {
                Some(c) => c[r].mass,
                None => lps[..n]
                    .iter()
                    .filter(|&&a| a != f32::NEG_INFINITY)
                    .map(|&a| f64::from(a).exp())
                    .sum(),
            };
            f.rows += 1;
            f.kept_mass_sum += mass;
            f.kept_mass_min = min_opt(f.kept_mass_min, Some(mass));
            f.kept_mass_hist[kept_mass_bin(mass)] += 1;
            f.label_in_topk += u64::from(ids[..n].contains(&label));
            if let Some(c) = costs {
                let kl = c[r].kl;
                f.codec_kl_rows += 1;
                f.codec_kl_sum += kl;
                f.codec_kl_max = max_opt(f.codec_kl_max, Some(kl));
            }
        }
        if let Some(e) = entropy_sum {
            f.entropy_rows = f.rows;
            f.entropy_sum = e;
        }
        f
    }
}

/// Largest accepted excess of an entropy over `ln(vocab_size)` or below 0 (fp32 rounding).
const ENTROPY_SLACK: f64 = 1e-3;

/// Check the per-row teacher entropies given with `rec` and return their sum: one finite value
/// in `[0, ln(vocab_size)]` (nats) per supervised row.
pub fn entropy_sum(rec: &Record, vocab_size: usize, entropy: &[f64]) -> Result<f64> {
    let s = rec.n_supervised();
    if entropy.len() != s {
        return Err(Error::input(format!(
            "record {}: entropy has {} entries but the record has {s} supervised rows; give one teacher entropy per row",
            rec.key,
            entropy.len()
        )));
    }
    let hi = (vocab_size as f64).ln() + ENTROPY_SLACK;
    let mut sum = 0.0;
    for (r, &e) in entropy.iter().enumerate() {
        if !(e.is_finite() && (-ENTROPY_SLACK..=hi).contains(&e)) {
            return Err(Error::input(format!(
                "record {}: entropy[{r}] = {e} is not an entropy in nats over a vocabulary of {vocab_size} (it must lie in [0, ln {vocab_size} = {:.4}])",
                rec.key,
                hi - ENTROPY_SLACK
            )));
        }
        sum += e;
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_cover_the_unit_interval() {
        assert_eq!(kept_mass_bin(-0.5), 0);
        assert_eq!(kept_mass_bin(0.0), 0);
        assert_eq!(kept_mass_bin(0.0099), 0);
        assert_eq!(kept_mass_bin(0.01), 1);
        assert_eq!(kept_mass_bin(0.935), 93);
        assert_eq!(kept_mass_bin(1.0), 99);
        assert_eq!(kept_mass_bin(1.0004), 99);
        assert_eq!(kept_mass_bin(f64::NAN), 0);
    }

    #[test]
    fn json_round_trip_is_exact_and_sparse() {
        let mut f = Fidelity {
            rows: 3,
            kept_mass_sum: 0.1 + 0.2 + 0.7,
            kept_mass_min: Some(0.1),
            label_in_topk: 2,
            entropy_rows: 3,
            entropy_sum: std::f64::consts::PI,
            codec_kl_rows: 3,
            codec_kl_sum: 1.234_567_890_123e-5,
            codec_kl_max: Some(9.87e-6),
            ..Fidelity::default()
        };
        f.kept_mass_hist[10] = 1;
        f.kept_mass_hist[20] = 1;
        f.kept_mass_hist[70] = 1;
        let s = serde_json::to_string(&f).unwrap();
        assert!(
            s.contains(r#""kept_mass_hist":{"10":1,"20":1,"70":1}"#),
            "{s}"
        );
        let back: Fidelity = serde_json::from_str(&s).unwrap();
        assert_eq!(back, f);
        let bad = s.replace(r#""70":1"#, r#""100":1"#);
        assert!(serde_json::from_str::<Fidelity>(&bad).is_err());
    }

    #[test]
    fn codec_kl_matches_the_direct_formula() {
        use crate::codec::{Codebook, CodebookParams};
        let cb = Codebook::new(CodebookParams::default()).unwrap();
        let lps = [-0.05f32, -3.1, -4.7, -9.3, -60.0, f32::NEG_INFINITY];
        let lse = |v: &[f64]| {
            let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m + v.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
        };
        let a: Vec<f64> = lps[..5].iter().map(|&x| f64::from(x)).collect();
        let b: Vec<f64> = lps[..5].iter().map(|&x| f64::from(cb.decoded(x))).collect();
        let (za, zb) = (lse(&a), lse(&b));
        let direct: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - za).exp() * ((x - za) - (y - zb)))
            .sum();
        let kl = compact::row_kl(&cb, &lps);
        assert!(
            kl > 0.0 && (kl - direct).abs() <= 1e-12 + 1e-9 * direct,
            "{kl} vs {direct}"
        );
        assert_eq!(cb.decoded(-60.0), -60.0); // escaped: exact
        assert_eq!(compact::row_kl(&cb, &[f32::NEG_INFINITY]), 0.0);
        assert_eq!(compact::row_kl(&cb, &[]), 0.0);
    }

    #[test]
    fn fold_combines_sums_extremes_and_histograms() {
        let a = Fidelity {
            rows: 2,
            kept_mass_sum: 1.5,
            kept_mass_min: Some(0.6),
            label_in_topk: 1,
            codec_kl_rows: 2,
            codec_kl_sum: 2e-5,
            codec_kl_max: Some(1.5e-5),
            ..Fidelity::default()
        };
        let b = Fidelity {
            rows: 1,
            kept_mass_sum: 0.4,
            kept_mass_min: Some(0.4),
            label_in_topk: 1,
            entropy_rows: 1,
            entropy_sum: 2.0,
            ..Fidelity::default()
        };
        let f = Fidelity::fold([&a, &b]).unwrap();
        assert_eq!(f.rows, 3);
        assert_eq!(f.kept_mass_sum, 1.9);
        assert_eq!(f.kept_mass_min, Some(0.4));
        assert_eq!(f.label_in_topk, 2);
        assert_eq!((f.entropy_rows, f.entropy_sum), (1, 2.0));
        assert_eq!((f.codec_kl_rows, f.codec_kl_max), (2, Some(1.5e-5)));
        assert!(Fidelity::fold([]).is_none());
    }
}
