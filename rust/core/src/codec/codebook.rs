//! The compact codec's value quantiser (docs/FORMAT.md §Codebook).
//!
//! A log-prob `u <= 0` is mapped to the index of the nearest level of a fixed, decreasing table.
//! Near probability 1 the levels are uniform in `sqrt(p)` with step `sqrt_step` (the
//! Fisher-information metric of a categorical distribution is uniform in `sqrt(p)`, so every
//! entry costs about the same KL: `KL ≈ 2·Σ Δsqrt(p)²`); below the point where that spacing
//! reaches `tail_step` nats the levels are uniform in log space, down to `floor`. Values below
//! the last level by more than half a step, and `-inf`, are "escaped" and stored exactly.
//! The table itself is written into every shard, so a reader never recomputes it.

use crate::error::{Error, Result};

/// Parameters of the codebook (stored in the shard metadata and the manifest).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CodebookParams {
    /// Step of the levels in `sqrt(p)` space.
    pub sqrt_step: f64,
    /// Step of the levels in log space (nats) in the tail.
    pub tail_step: f64,
    /// Lowest level (nats); lower values are stored exactly.
    pub floor: f64,
}

impl Default for CodebookParams {
    fn default() -> Self {
        Self {
            sqrt_step: 2.5e-3,
            tail_step: 2.5,
            floor: -48.0,
        }
    }
}

impl CodebookParams {
    pub fn validate(&self) -> Result<()> {
        let ok = self.sqrt_step > 1e-5
            && self.sqrt_step <= 0.1
            && self.tail_step >= 1e-3
            && self.tail_step <= 8.0
            && self.floor <= -1.0
            && self.floor >= -200.0;
        if ok {
            Ok(())
        } else {
            Err(Error::input(format!(
                "compact codec parameters {self:?} are out of range: need 1e-5 < sqrt_step <= 0.1, 1e-3 <= tail_step <= 8, -200 <= floor <= -1"
            )))
        }
    }
}

/// Index returned for values that are stored exactly.
pub struct Codebook {
    pub params: CodebookParams,
    /// Decreasing reconstruction levels; `levels[0] == 0.0`.
    pub levels: Vec<f32>,
    /// `thresholds[n]` separates level `n` from level `n + 1` (decreasing).
    thresholds: Vec<f32>,
    /// Values below this are escaped.
    escape_below: f32,
    /// For negative floats, the level of the largest value sharing the top 16 bits.
    start: Vec<u16>,
    /// `exp(levels[n])` in float64 (the decoded probabilities, for the codec's KL statistics).
    exp_levels: Vec<f64>,
}

impl Codebook {
    pub fn new(params: CodebookParams) -> Result<Self> {
        params.validate()?;
        let h = params.sqrt_step;
        let boundary = 2.0 * h / params.tail_step; // sqrt(p) where the sqrt spacing reaches tail_step
        let mut levels: Vec<f64> = Vec::new();
        let mut n = 0usize;
        loop {
            let r = 1.0 - n as f64 * h;
            if r < boundary.max(h) {
                break;
            }
            levels.push(2.0 * r.ln());
            n += 1;
        }
        let mut u = *levels.last().unwrap();
        while u - params.tail_step >= params.floor {
            u -= params.tail_step;
            levels.push(u);
        }
        let escape_below = (u - 0.5 * params.tail_step) as f32;
        let levels: Vec<f32> = levels.iter().map(|&x| x as f32).collect();
        if levels.len() > 65_000 || levels.windows(2).any(|w| w[1] >= w[0]) {
            return Err(Error::input(format!(
                "compact codec parameters {params:?} give levels that are not distinct in float32"
            )));
        }
        let thresholds: Vec<f32> = levels
            .windows(2)
            .map(|w| ((f64::from(w[0]) + f64::from(w[1])) / 2.0) as f32)
            .collect();
        Self::from_levels(params, levels, thresholds, escape_below)
    }

    /// Rebuild a codebook from a stored table (reader side).
    pub fn from_stored(params: CodebookParams, levels: Vec<f32>) -> Result<Self> {
        if levels.is_empty()
            || levels.len() > 65_000
            || levels[0] != 0.0
            || levels.iter().any(|x| !x.is_finite())
            || levels.windows(2).any(|w| w[1] >= w[0])
        {
            return Err(Error::corrupt(
                "the stored codebook is not a decreasing table of finite levels starting at 0",
            ));
        }
        let thresholds: Vec<f32> = levels
            .windows(2)
            .map(|w| ((f64::from(w[0]) + f64::from(w[1])) / 2.0) as f32)
            .collect();
        let escape_below = (f64::from(*levels.last().unwrap()) - 0.5 * params.tail_step) as f32;
        Self::from_levels(params, levels, thresholds, escape_below)
    }

    fn from_levels(
        params: CodebookParams,
        levels: Vec<f32>,
        thresholds: Vec<f32>,
        escape_below: f32,
    ) -> Result<Self> {
        let mut cb = Self {
            params,
            levels,
            thresholds,
            escape_below,
            start: Vec::new(),
            exp_levels: Vec::new(),
        };
        cb.exp_levels = cb.levels.iter().map(|&l| f64::from(l).exp()).collect();
        cb.start = (0u32..0x8000)
            .map(|key| {
                let hi = f32::from_bits(0x8000_0000 | (key << 16));
                if hi.is_nan() || hi < cb.escape_below {
                    (cb.levels.len() - 1) as u16
                } else {
                    cb.quantize_slow(hi) as u16
                }
            })
            .collect();
        Ok(cb)
    }

    /// Number of regular levels; the escape index equals this number.
    #[inline]
    pub fn escape(&self) -> u32 {
        self.levels.len() as u32
    }

    fn quantize_slow(&self, u: f32) -> u32 {
        // first n with u >= thresholds[n]; thresholds are decreasing
        self.thresholds.partition_point(|&t| u < t) as u32
    }

    /// Index of the level nearest to `u`, or [`Codebook::escape`] for values stored exactly.
    #[inline]
    pub fn quantize(&self, u: f32) -> u32 {
        if u >= 0.0 {
            return 0;
        }
        if u < self.escape_below || u.is_nan() {
            return self.escape();
        }
        let key = ((u.to_bits() >> 16) & 0x7fff) as usize;
        let mut n = self.start[key] as usize;
        let last = self.thresholds.len();
        while n < last && u < self.thresholds[n] {
            n += 1;
        }
        n as u32
    }

    /// The value a decoder reconstructs for `u`: its level, or `u` itself when escaped.
    #[inline]
    pub fn decoded(&self, u: f32) -> f32 {
        match self.levels.get(self.quantize(u) as usize) {
            Some(&level) => level,
            None => u,
        }
    }

    /// The decoded value of `u` and its exponential, both in float64; `None` when `u` is
    /// escaped (decoded exactly).
    #[inline]
    pub fn decoded_exp(&self, u: f32) -> Option<(f64, f64)> {
        let q = self.quantize(u) as usize;
        Some((f64::from(*self.levels.get(q)?), self.exp_levels[q]))
    }

    /// Largest decoding error |decoded − original| for any value that maps to level `n`.
    pub fn max_error(&self, n: usize) -> f32 {
        let up = if n == 0 {
            0.0
        } else {
            self.thresholds[n - 1] - self.levels[n]
        };
        let down = if n + 1 < self.levels.len() {
            self.levels[n] - self.thresholds[n]
        } else {
            (self.levels[n] - self.escape_below).max(0.0)
        };
        up.max(down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_matches_nearest_level() {
        let cb = Codebook::new(CodebookParams::default()).unwrap();
        let mut u = 0.0f32;
        while u > -60.0 {
            let q = cb.quantize(u);
            if q == cb.escape() {
                assert!(u < cb.escape_below);
            } else {
                let n = q as usize;
                let err = (cb.levels[n] - u).abs();
                // no other level is strictly nearer
                for (m, &l) in cb.levels.iter().enumerate() {
                    assert!((l - u).abs() >= err - 1e-6, "u={u} q={n} better={m}");
                }
                assert!(err <= cb.max_error(n) + 1e-6);
            }
            u -= 0.000_37;
        }
        assert_eq!(cb.quantize(f32::NEG_INFINITY), cb.escape());
        assert_eq!(cb.quantize(0.0), 0);
        assert_eq!(cb.quantize(5e-4), 0);
    }
}
