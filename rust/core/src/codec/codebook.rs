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

/// Mean codec KL per record that a writer keeps below by default (nats; docs/FORMAT.md §5.1).
pub const DEFAULT_MAX_MEAN_KL: f64 = 1e-4;

/// `2^(i/16)` for `i = 0..16`, as float64 literals (so every machine builds the same ladder).
const SIXTEENTHS: [f64; 16] = [
    1.0,
    1.0442737824274138,
    1.0905077326652577,
    1.1387886347566916,
    1.189207115002721,
    1.241857812073484,
    1.2968395546510096,
    1.3542555469368927,
    std::f64::consts::SQRT_2,
    1.4768261459394993,
    1.5422108254079407,
    1.6104903319492543,
    1.681792830507429,
    1.7562521603732995,
    1.8340080864093424,
    1.9152065613971474,
];

/// Rungs of the budget ladder: `sqrt_step = 2.5e-3 · 2^((j − 74)/16)`, `j = 0..128`.
pub const BUDGET_RUNGS: usize = 128;
/// The budget ladder's rung whose codebook is format version 2's fixed default (`sqrt_step`
/// 2.5e-3, `tail_step` 2.5), where a writer first measures a record's KL.
const START_RUNG: usize = 74;

/// The compact codec's codebooks, one per *rung* (docs/FORMAT.md §5.1): rung `j` is the codebook
/// of `(sqrt_steps[j], tail_steps[j], floor)`. With a budget (`max_mean_kl`) the writer encodes
/// each record with the coarsest rung whose measured mean KL stays within it; without, the
/// ladder has one rung (fixed parameters).
#[derive(Debug, Clone, PartialEq)]
pub struct LadderParams {
    pub sqrt_steps: Vec<f64>,
    pub tail_steps: Vec<f64>,
    pub floor: f64,
    pub max_mean_kl: Option<f64>,
}

impl LadderParams {
    /// The budget ladder: `sqrt_step = 2.5e-3 · 2^((j − 74)/16)` (1.01e-4 to 2.48e-2) and
    /// `tail_step = min(1000 · sqrt_step, 8)`, `j = 0..128`: rung 74 is the fixed default of
    /// format version 2, and each rung costs about 2^(1/8) times the KL of the one below.
    pub fn budget(max_mean_kl: f64, floor: f64) -> Self {
        let sqrt_steps: Vec<f64> = (0..BUDGET_RUNGS)
            .map(|j| {
                // 2^((j − 74)/16) = c[(j − 74) mod 16] · 2^((j − 74) div 16), both exact
                let e = j as i32 - START_RUNG as i32;
                2.5e-3 * SIXTEENTHS[e.rem_euclid(16) as usize] * 2f64.powi(e.div_euclid(16))
            })
            .collect();
        let tail_steps = sqrt_steps.iter().map(|h| (1000.0 * h).min(8.0)).collect();
        Self {
            sqrt_steps,
            tail_steps,
            floor,
            max_mean_kl: Some(max_mean_kl),
        }
    }

    /// One rung: fixed codebook parameters, no budget.
    pub fn fixed(p: CodebookParams) -> Self {
        Self {
            sqrt_steps: vec![p.sqrt_step],
            tail_steps: vec![p.tail_step],
            floor: p.floor,
            max_mean_kl: None,
        }
    }

    pub fn rungs(&self) -> usize {
        self.sqrt_steps.len()
    }

    pub fn rung(&self, j: usize) -> CodebookParams {
        CodebookParams {
            sqrt_step: self.sqrt_steps[j],
            tail_step: self.tail_steps[j],
            floor: self.floor,
        }
    }

    /// The rung where a writer first measures a record (the budget ladder's rung nearest the
    /// fixed default; rung 0 of a one-rung ladder).
    pub fn start_rung(&self) -> usize {
        START_RUNG.min(self.rungs() - 1)
    }

    pub fn validate(&self) -> Result<()> {
        let n = self.sqrt_steps.len();
        if n == 0 || n > 255 || self.tail_steps.len() != n {
            return Err(Error::input(format!(
                "compact codec ladder needs 1 to 255 rungs with one sqrt_step and one tail_step each (got {n} and {})",
                self.tail_steps.len()
            )));
        }
        if let Some(b) = self.max_mean_kl {
            if !(b.is_finite() && (1e-9..=1.0).contains(&b)) {
                return Err(Error::input(format!(
                    "max_mean_kl = {b} is out of range: give a mean codec KL per row in nats between 1e-9 and 1 (1e-4 is the default), or codec=\"exact\" for bit-for-bit log-probs"
                )));
            }
        }
        (0..n).try_for_each(|j| self.rung(j).validate())
    }

    /// The `codec_params` entries of a ladder (docs/FORMAT.md §1).
    pub fn to_json(&self, zstd_level: i32) -> serde_json::Value {
        serde_json::json!({
            "zstd_level": zstd_level,
            "max_mean_kl": self.max_mean_kl,
            "floor": self.floor,
            "sqrt_steps": self.sqrt_steps,
            "tail_steps": self.tail_steps,
        })
    }

    /// Parse `codec_params` of a compact cache: a ladder (format version 3), or the fixed
    /// `sqrt_step`/`tail_step`/`floor` of versions 1–2 as a one-rung ladder; the flag says
    /// whether frames carry a rung byte (only ladders do).
    pub fn from_json(params: &serde_json::Value) -> Result<(Self, bool)> {
        let num = |k: &str| {
            params
                .get(k)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| Error::format(format!("codec_params has no number {k}")))
        };
        let list = |k: &str| -> Result<Vec<f64>> {
            params
                .get(k)
                .and_then(serde_json::Value::as_array)
                .ok_or_else(|| Error::format(format!("codec_params has no list {k}")))?
                .iter()
                .map(|v| {
                    v.as_f64().ok_or_else(|| {
                        Error::format(format!("codec_params {k} holds a non-number"))
                    })
                })
                .collect()
        };
        let (ladder, rung_byte) = if params.get("sqrt_steps").is_some() {
            let max_mean_kl = match params.get("max_mean_kl") {
                None | Some(serde_json::Value::Null) => None,
                Some(v) => Some(v.as_f64().ok_or_else(|| {
                    Error::format("codec_params max_mean_kl is not a number or null")
                })?),
            };
            let l = Self {
                sqrt_steps: list("sqrt_steps")?,
                tail_steps: list("tail_steps")?,
                floor: num("floor")?,
                max_mean_kl,
            };
            (l, true)
        } else {
            let p = CodebookParams {
                sqrt_step: num("sqrt_step")?,
                tail_step: num("tail_step")?,
                floor: num("floor")?,
            };
            (Self::fixed(p), false)
        };
        ladder
            .validate()
            .map_err(|e| Error::format(format!("codec_params: {}", e.message)))?;
        Ok((ladder, rung_byte))
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

    /// `exp(levels[n])` in float64.
    #[inline]
    pub fn exp_level(&self, n: usize) -> f64 {
        self.exp_levels[n]
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
    fn every_rung_of_the_budget_ladder_builds_and_rungs_grow() {
        for floor in [-1.0, -48.0, -200.0] {
            let l = LadderParams::budget(1e-4, floor);
            l.validate().unwrap();
            assert_eq!(l.rungs(), BUDGET_RUNGS);
            for j in 0..l.rungs() {
                let cb = Codebook::new(l.rung(j)).unwrap();
                assert_eq!(cb.levels[0], 0.0);
            }
            for w in l.sqrt_steps.windows(2) {
                assert!((w[1] / w[0] - 2f64.powf(1.0 / 16.0)).abs() < 1e-12);
            }
            // the start rung is format version 2's default codebook, exactly
            assert_eq!(
                l.rung(l.start_rung()),
                CodebookParams {
                    floor,
                    ..Default::default()
                }
            );
            assert_eq!(l.sqrt_steps[START_RUNG + 16], 5e-3);
        }
        let (back, rung_byte) =
            LadderParams::from_json(&LadderParams::budget(3e-5, -48.0).to_json(3)).unwrap();
        assert!(rung_byte);
        assert_eq!(back, LadderParams::budget(3e-5, -48.0));
    }

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
