//! Training batches built straight from cached records (docs/DATA.md §Batch layout).
//!
//! A batch is planned first ([`BatchPlan::new`]: serial and cheap, it reads only shard indexes,
//! checks token hashes and decides where every sample goes), then filled
//! ([`BatchPlan::fill`]): the output buffers are cut into disjoint pieces, one per sample and
//! one per padding tail, and the pieces are filled in parallel. A cached sample is decoded
//! directly into its piece of the teacher tensors (no intermediate [`crate::Record`]).
//!
//! Alignment (the loss library's contract, HF causal-LM convention): `labels[b, t]` is the token
//! predicted from position `t - 1`; `teacher_*[b, t, :]` is the teacher's top-k for predicting
//! `labels[b, t]`, i.e. record row `r` lands at the position of the record's `r`-th supervised
//! token `t >= 1`. Each sample's first position gets label `-100` (nothing in the sample
//! predicts it: in a packed row the previous token belongs to another sample), so
//! `labels[b, t] != -100` exactly where a teacher row was placed.
//!
//! A cached sample may carry a [`Reference`]: the same sample's record in a second cache (a
//! reference model's). Its rows are placed exactly like the teacher's, into the `reference_*`
//! tensors, by the same row machinery ([`PlacedRows`]); the plan checks that the two records
//! are one sample (key, token hash, token and supervised counts), the fill that their labels
//! are equal. `sequence_ids[b, t]` says which item each position belongs to (`-1`: padding).

use std::cell::RefCell;
use std::sync::Arc;

use rayon::prelude::*;

use crate::cache::TeacherCache;
use crate::codec::{DecodeScratch, Frame, RowSink};
use crate::error::{Error, ErrorKind, Result};
use crate::hash;
use crate::record::{count_supervised, describe_ids, describe_labels, Key, IGNORE_INDEX};
use crate::shard::ShardReader;

/// A record that has already been decoded (borrowed arrays, as [`crate::Record`] holds them).
pub struct RecordView<'a> {
    pub key: Key,
    pub input_ids: &'a [i32],
    pub labels: &'a [i32],
    /// `[S, top_k]` row-major.
    pub topk_ids: &'a [i32],
    pub topk_logprobs: &'a [f32],
    pub label_logprobs: &'a [f32],
    pub top_k: usize,
}

/// The same sample's record in a reference cache (see the module docs).
#[derive(Clone, Copy)]
pub struct Reference<'a> {
    pub cache: &'a TeacherCache,
    pub position: u64,
}

/// One sample of a batch.
pub enum Source<'a> {
    /// The record at a global position of a cache. With `input_ids`, the record's stored token
    /// hash must match them; with `labels`, the record's labels must equal them
    /// ([`crate::ErrorKind::Mismatch`] otherwise, saying how they differ: see [`describe_ids`]
    /// and [`describe_labels`]).
    Cached {
        cache: &'a TeacherCache,
        position: u64,
        input_ids: Option<&'a [i32]>,
        labels: Option<&'a [i32]>,
        /// The sample's record in a reference cache: either every sample of a batch has one
        /// or none has.
        reference: Option<Reference<'a>>,
    },
    /// A record already in memory.
    Decoded(RecordView<'a>),
}

/// How samples are laid out in the batch.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// `false`: one sample per row, padded on the right. `true`: samples packed into rows of
    /// `max_length` tokens, greedy first-fit in the given order.
    pub packing: bool,
    /// Samples longer than this are truncated (teacher rows with them). Required for packing.
    pub max_length: Option<usize>,
    /// Pad every row to `max_length` instead of the longest row (`padding="max_length"`).
    pub pad_to_max_length: bool,
    /// Round the row length up to a multiple of this (1: no rounding).
    pub pad_to_multiple_of: usize,
    /// `input_ids` value of padding positions.
    pub pad_token_id: i64,
    /// Add one teacher column (width `top_k + 1`): the label token with its cached log-prob
    /// when the label is not among the row's entries, `-1`/`-inf` otherwise. On by default: a
    /// label outside the top-k then gets the residual weight the paper's full-vocabulary
    /// formula gives it instead of none (docs/LOSSES.md).
    pub label_in_support: bool,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            packing: false,
            max_length: None,
            pad_to_max_length: false,
            pad_to_multiple_of: 1,
            pad_token_id: 0,
            label_in_support: true,
        }
    }
}

/// `v` as a count of at least 1, else an input error naming the argument `name` and the value.
fn at_least_one(name: &str, v: i128) -> Result<usize> {
    if v < 1 {
        return Err(Error::input(format!("{name} = {v} must be >= 1")));
    }
    usize::try_from(v).map_err(|_| Error::input(format!("{name} = {v} is too large")))
}

impl BatchOptions {
    /// The options from the arguments of `build_batch` / `TargetSFTCollator` (`padding` is
    /// `"longest"` or `"max_length"`), checked by [`BatchOptions::check`]. Errors name the
    /// argument as the caller spelled it.
    pub fn from_args(
        packing: bool,
        max_length: Option<i64>,
        padding: &str,
        pad_to_multiple_of: i64,
        pad_token_id: i64,
        label_in_support: bool,
    ) -> Result<Self> {
        let pad_to_max_length = match padding {
            "longest" => false,
            "max_length" => true,
            other => {
                return Err(Error::input(format!(
                    "padding must be \"longest\" or \"max_length\", got {other:?}"
                )))
            }
        };
        let opts = Self {
            packing,
            max_length: max_length
                .map(|v| at_least_one("max_length", v.into()))
                .transpose()?,
            pad_to_max_length,
            pad_to_multiple_of: at_least_one("pad_to_multiple_of", pad_to_multiple_of.into())?,
            pad_token_id,
            label_in_support,
        };
        opts.check()?;
        Ok(opts)
    }

    /// The rules of a batch layout, the one place they are checked (every batch plan checks its
    /// options here): `max_length` and `pad_to_multiple_of` at least 1, and `max_length` given
    /// for packing and for padding to `max_length`.
    pub fn check(&self) -> Result<()> {
        if let Some(m) = self.max_length {
            at_least_one("max_length", m as i128)?;
        }
        at_least_one("pad_to_multiple_of", self.pad_to_multiple_of as i128)?;
        if self.max_length.is_none() {
            if self.packing {
                return Err(Error::input(
                    "packing=True needs max_length: samples are packed into rows of max_length tokens",
                ));
            }
            if self.pad_to_max_length {
                return Err(Error::input("padding=\"max_length\" needs max_length"));
            }
        }
        Ok(())
    }
}

/// Where one sample goes: `len` tokens at `offset` in row `row`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub item: usize,
    pub row: usize,
    pub offset: usize,
    pub len: usize,
}

/// A located record: its shard and index there.
struct Located {
    shard: Arc<ShardReader>,
    index: usize,
}

enum Resolved {
    Shard {
        shard: Arc<ShardReader>,
        index: usize,
        n_sup: usize,
        /// The reference record (checked to be the same sample).
        reference: Option<Located>,
    },
    Decoded,
}

/// A planned batch: its shape and where every sample goes.
pub struct BatchPlan {
    /// Rows `B`.
    pub rows: usize,
    /// Tokens per row `L`.
    pub len: usize,
    /// Entries per teacher row stored in the caches (`K`).
    pub top_k: usize,
    /// Teacher columns in the batch: `K`, or `K + 1` with `label_in_support`.
    pub width: usize,
    /// Entries per row of the reference cache (`Kr`); `None`: the batch has no reference.
    pub reference_top_k: Option<usize>,
    /// Reference columns: `Kr`, or `Kr + 1` with `label_in_support` (0 without a reference).
    pub reference_width: usize,
    pub packing: bool,
    /// In flat (row-major) order.
    pub placements: Vec<Placement>,
    /// Packed layout: offsets of the segments in the flattened `[B * L]` tokens (every sample
    /// is a segment, and so is every row's padding tail), `B * L` last.
    pub cu_seqlens: Vec<i32>,
    /// Packed layout: the longest segment.
    pub max_seqlen: usize,
    opts: BatchOptions,
    resolved: Vec<Resolved>,
}

/// The output buffers of a batch, each exactly as long as [`BatchPlan`] says (`B * L`, or
/// `B * L * width` for the teacher tensors). Every element is written.
pub struct BatchBuffers<'a> {
    pub input_ids: &'a mut [i64],
    /// Padded layout only (`None` in the packed layout).
    pub attention_mask: Option<&'a mut [i64]>,
    pub labels: &'a mut [i64],
    /// Packed layout only (`None` in the padded layout).
    pub position_ids: Option<&'a mut [i64]>,
    pub teacher_ids: &'a mut [i32],
    pub teacher_logprobs: &'a mut [f32],
    /// `B * L`: the item each position belongs to, `-1` at padding.
    pub sequence_ids: &'a mut [i64],
    /// Exactly when the plan has a reference.
    pub reference: Option<ReferenceBuffers<'a>>,
}

/// The reference tensors of a batch: `B * L * reference_width` rows and `B * L` label
/// log-probs (`0.0` where unsupervised).
pub struct ReferenceBuffers<'a> {
    pub ids: &'a mut [i32],
    pub logprobs: &'a mut [f32],
    pub label_logprobs: &'a mut [f32],
}

fn item_err(i: usize, key: Option<&Key>, e: Error) -> Error {
    match key {
        Some(k) => e.at(format_args!("batch item {i} (key {k})")),
        None => e.at(format_args!("batch item {i}")),
    }
}

impl BatchPlan {
    /// Check the samples and options and lay the batch out. Reads shard indexes only.
    pub fn new(sources: &[Source<'_>], opts: &BatchOptions) -> Result<Self> {
        if sources.is_empty() {
            return Err(Error::input("a batch needs at least one sample"));
        }
        opts.check()?;
        let max_len = opts.max_length.unwrap_or(usize::MAX);
        let mut top_k: Option<(usize, usize)> = None; // (k, item that set it)
        let mut vocab: Option<(usize, usize)> = None;
        // (Kr, item that set it) and whether item 0 has a reference (all or none must)
        let mut ref_k: Option<(usize, usize)> = None;
        let has_ref = matches!(
            sources[0],
            Source::Cached {
                reference: Some(_),
                ..
            }
        );
        let mut resolved = Vec::with_capacity(sources.len());
        let mut lens = Vec::with_capacity(sources.len());
        for (i, src) in sources.iter().enumerate() {
            let (k, n_tokens) = match src {
                Source::Cached {
                    cache,
                    position,
                    input_ids,
                    labels,
                    reference,
                } => {
                    if reference.is_some() != has_ref {
                        return Err(item_err(i, None, mixed_references(i, has_ref)));
                    }
                    let (s, index) = cache.locate(*position).map_err(|e| item_err(i, None, e))?;
                    let shard = cache.shard(s).map_err(|e| item_err(i, None, e))?;
                    // checked before the batch is sized by it
                    let row = shard.checked_row(index).map_err(|e| item_err(i, None, e))?;
                    if let Some(ids) = input_ids {
                        if hash::token_hash(ids) != row.token_hash {
                            // the error path only: decode the cached tokens to say how they differ
                            let key = shard.key(index)?;
                            let (cached, _) = decode_tokens(&shard, index, &row)
                                .map_err(|e| item_err(i, Some(&key), e))?;
                            let why = describe_ids(
                                "the batch's ids",
                                ids,
                                &cached,
                                &cache.dir.display().to_string(),
                            );
                            return Err(item_err(i, Some(&key), Error::mismatch(why)));
                        }
                    }
                    if let Some(l) = labels {
                        let n = input_ids.map_or(row.n_tokens as usize, <[i32]>::len);
                        if l.len() != n {
                            let key = shard.key(index)?;
                            return Err(item_err(
                                i,
                                Some(&key),
                                Error::input(format!(
                                    "labels has {} entries but the sample has {n} tokens",
                                    l.len()
                                )),
                            ));
                        }
                    }
                    let v = cache.manifest.vocab_size;
                    match vocab {
                        Some((v0, j)) if v0 != v => {
                            return Err(item_err(i, None, Error::mismatch(format!(
                                "its cache ({}) has vocab_size {v} but batch item {j} comes from a cache with vocab_size {v0}; a batch mixes records of one teacher/tokenizer only",
                                cache.dir.display()
                            ))))
                        }
                        None => vocab = Some((v, i)),
                        _ => {}
                    }
                    let reference = match reference {
                        None => None,
                        Some(r) => {
                            let located = resolve_reference(cache, &shard, index, &row, r)
                                .map_err(|e| item_err(i, shard.key(index).ok().as_ref(), e))?;
                            let kr = r.cache.manifest.top_k;
                            match ref_k {
                                Some((k0, j)) if k0 != kr => {
                                    return Err(item_err(i, None, Error::mismatch(format!(
                                        "its reference cache ({}) has top_k = {kr} but batch item {j}'s has {k0}; a batch needs one reference top_k",
                                        r.cache.dir.display()
                                    ))))
                                }
                                None => ref_k = Some((kr, i)),
                                _ => {}
                            }
                            Some(located)
                        }
                    };
                    resolved.push(Resolved::Shard {
                        shard: shard.clone(),
                        index,
                        n_sup: row.n_supervised as usize,
                        reference,
                    });
                    (cache.manifest.top_k, row.n_tokens as usize)
                }
                Source::Decoded(r) => {
                    if has_ref {
                        return Err(item_err(i, Some(&r.key), mixed_references(i, has_ref)));
                    }
                    check_view(r).map_err(|e| item_err(i, Some(&r.key), e))?;
                    resolved.push(Resolved::Decoded);
                    (r.top_k, r.input_ids.len())
                }
            };
            match top_k {
                Some((k0, j)) if k0 != k => {
                    return Err(item_err(i, None, Error::mismatch(format!(
                        "it has top_k = {k} teacher entries per row but batch item {j} has {k0}; a batch needs one top_k"
                    ))))
                }
                None => top_k = Some((k, i)),
                _ => {}
            }
            if n_tokens == 0 {
                return Err(item_err(
                    i,
                    None,
                    Error::corrupt("the record has no tokens"),
                ));
            }
            lens.push(n_tokens.min(max_len));
        }
        let top_k = top_k.expect("non-empty").0;
        let width = top_k + usize::from(opts.label_in_support);
        let reference_top_k = ref_k.map(|(k, _)| k);
        let reference_width = reference_top_k.map_or(0, |k| k + usize::from(opts.label_in_support));
        // rows and placements
        let mut placements = Vec::with_capacity(sources.len());
        let (rows, longest) = if opts.packing {
            let mut fill: Vec<usize> = Vec::new();
            let mut per_row: Vec<Vec<Placement>> = Vec::new();
            for (item, &len) in lens.iter().enumerate() {
                let row = match fill.iter().position(|&f| f + len <= max_len) {
                    Some(r) => r,
                    None => {
                        fill.push(0);
                        per_row.push(Vec::new());
                        fill.len() - 1
                    }
                };
                per_row[row].push(Placement {
                    item,
                    row,
                    offset: fill[row],
                    len,
                });
                fill[row] += len;
            }
            placements.extend(per_row.into_iter().flatten());
            (fill.len(), fill.into_iter().max().unwrap_or(0))
        } else {
            for (item, &len) in lens.iter().enumerate() {
                placements.push(Placement {
                    item,
                    row: item,
                    offset: 0,
                    len,
                });
            }
            (lens.len(), lens.iter().copied().max().unwrap_or(0))
        };
        let base = if opts.pad_to_max_length {
            max_len
        } else {
            longest
        };
        let len = base
            .checked_next_multiple_of(opts.pad_to_multiple_of)
            .ok_or_else(|| Error::input("the padded length overflows"))?;
        let elements = rows
            .checked_mul(len)
            .and_then(|n| n.checked_mul(width.max(reference_width)));
        if elements.is_none_or(|n| n > isize::MAX as usize / 8) {
            return Err(Error::input(format!(
                "a batch of {rows} x {len} tokens x {width} teacher entries is too large"
            )));
        }
        let mut plan = Self {
            rows,
            len,
            top_k,
            width,
            reference_top_k,
            reference_width,
            packing: opts.packing,
            placements,
            cu_seqlens: Vec::new(),
            max_seqlen: 0,
            opts: opts.clone(),
            resolved,
        };
        if opts.packing {
            let flat = rows * len;
            if flat > i32::MAX as usize {
                return Err(Error::input(format!(
                    "a packed batch of {rows} x {len} tokens does not fit int32 cu_seqlens"
                )));
            }
            plan.cu_seqlens.push(0);
            let mut p = 0;
            for row in 0..rows {
                let start = row * len;
                let mut end = start;
                while p < plan.placements.len() && plan.placements[p].row == row {
                    end = start + plan.placements[p].offset + plan.placements[p].len;
                    plan.max_seqlen = plan.max_seqlen.max(plan.placements[p].len);
                    plan.cu_seqlens.push(end as i32);
                    p += 1;
                }
                if end < start + len {
                    plan.max_seqlen = plan.max_seqlen.max(start + len - end);
                    plan.cu_seqlens.push((start + len) as i32);
                }
            }
        }
        Ok(plan)
    }

    /// Elements of the token tensors (`B * L`).
    pub fn tokens(&self) -> usize {
        self.rows * self.len
    }

    /// Elements of the teacher tensors (`B * L * width`).
    pub fn teacher_elements(&self) -> usize {
        self.rows * self.len * self.width
    }

    /// Elements of the reference row tensors (`B * L * reference_width`; 0 without a
    /// reference).
    pub fn reference_elements(&self) -> usize {
        self.rows * self.len * self.reference_width
    }

    /// Fill `out` (every element is written) and return the number of supervised positions
    /// (teacher rows) in the batch. `parallel` fills the pieces with rayon (call it inside the
    /// pool to use); otherwise everything runs on the calling thread. `sources` must be the
    /// slice the plan was made from.
    pub fn fill(
        &self,
        sources: &[Source<'_>],
        out: BatchBuffers<'_>,
        parallel: bool,
    ) -> Result<usize> {
        assert_eq!(
            sources.len(),
            self.resolved.len(),
            "sources of another plan"
        );
        let (n, nt) = (self.tokens(), self.teacher_elements());
        let check = |name: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(Error::input(format!(
                    "output buffer {name} has {got} elements, the batch needs {want}"
                )))
            }
        };
        check("input_ids", out.input_ids.len(), n)?;
        check("labels", out.labels.len(), n)?;
        check("teacher_ids", out.teacher_ids.len(), nt)?;
        check("teacher_logprobs", out.teacher_logprobs.len(), nt)?;
        check("sequence_ids", out.sequence_ids.len(), n)?;
        if out.reference.is_some() != self.reference_top_k.is_some() {
            return Err(Error::input(if out.reference.is_some() {
                "reference output buffers given for a batch without a reference"
            } else {
                "the batch has a reference: it needs the reference output buffers"
            }));
        }
        if let Some(r) = &out.reference {
            let nr = self.reference_elements();
            check("reference_ids", r.ids.len(), nr)?;
            check("reference_logprobs", r.logprobs.len(), nr)?;
            check("reference_label_logprobs", r.label_logprobs.len(), n)?;
        }
        if self.packing != out.position_ids.is_some()
            || self.packing == out.attention_mask.is_some()
        {
            return Err(Error::input(
                "the packed layout has position_ids and no attention_mask; the padded layout the reverse",
            ));
        }
        if let Some(m) = &out.attention_mask {
            check("attention_mask", m.len(), n)?;
        }
        if let Some(p) = &out.position_ids {
            check("position_ids", p.len(), n)?;
        }
        // Pieces in flat order: each row's samples, then its padding tail.
        let mut spans: Vec<(Option<usize>, usize)> = Vec::with_capacity(self.placements.len() * 2);
        let mut p = 0;
        for row in 0..self.rows {
            let mut used = 0;
            while p < self.placements.len() && self.placements[p].row == row {
                spans.push((Some(p), self.placements[p].len));
                used += self.placements[p].len;
                p += 1;
            }
            if used < self.len {
                spans.push((None, self.len - used));
            }
        }
        let w = self.width;
        let ids = carve(out.input_ids, spans.iter().map(|s| s.1));
        let labels = carve(out.labels, spans.iter().map(|s| s.1));
        let tids = carve(out.teacher_ids, spans.iter().map(|s| s.1 * w));
        let tlps = carve(out.teacher_logprobs, spans.iter().map(|s| s.1 * w));
        let mut mask = out
            .attention_mask
            .map(|m| carve(m, spans.iter().map(|s| s.1)).into_iter());
        let mut pos = out
            .position_ids
            .map(|m| carve(m, spans.iter().map(|s| s.1)).into_iter());
        let seq = carve(out.sequence_ids, spans.iter().map(|s| s.1));
        let wr = self.reference_width;
        let mut reference = out.reference.map(|r| {
            let ids = carve(r.ids, spans.iter().map(|s| s.1 * wr));
            let lps = carve(r.logprobs, spans.iter().map(|s| s.1 * wr));
            let lab = carve(r.label_logprobs, spans.iter().map(|s| s.1));
            ids.into_iter()
                .zip(lps)
                .zip(lab)
                .map(|((ids, lps), label_lps)| RowsOut {
                    ids,
                    lps,
                    label_lps: Some(label_lps),
                })
        });
        let pieces: Vec<Piece<'_>> = spans
            .iter()
            .zip(ids)
            .zip(labels)
            .zip(tids.into_iter().zip(tlps))
            .zip(seq)
            .map(
                |((((&(place, _), ids), labels), (tids, tlps)), seq)| Piece {
                    place,
                    ids,
                    labels,
                    mask: mask.as_mut().map(|m| m.next().expect("one per span")),
                    pos: pos.as_mut().map(|m| m.next().expect("one per span")),
                    seq,
                    teacher: RowsOut {
                        ids: tids,
                        lps: tlps,
                        label_lps: None,
                    },
                    reference: reference.as_mut().map(|r| r.next().expect("one per span")),
                },
            )
            .collect();
        let results: Vec<Result<usize>> = if parallel {
            pieces
                .into_par_iter()
                .with_max_len(1)
                .map(|pc| self.fill_piece(sources, pc))
                .collect()
        } else {
            pieces
                .into_iter()
                .map(|pc| self.fill_piece(sources, pc))
                .collect()
        };
        // the first failing sample in batch order, whichever thread met it first
        results.into_iter().sum()
    }

    fn fill_piece(&self, sources: &[Source<'_>], mut pc: Piece<'_>) -> Result<usize> {
        let Some(p) = pc.place else {
            pc.ids.fill(self.opts.pad_token_id);
            pc.labels.fill(i64::from(IGNORE_INDEX));
            if let Some(m) = pc.mask {
                m.fill(0);
            }
            if let Some(pos) = pc.pos {
                // the padding tail is a segment of its own (see `cu_seqlens`)
                pos.iter_mut().enumerate().for_each(|(j, x)| *x = j as i64);
            }
            pc.seq.fill(-1);
            pc.teacher.fill_unsupervised(&[], pc.ids.len(), self.width);
            if let Some(mut r) = pc.reference {
                r.fill_unsupervised(&[], pc.ids.len(), self.reference_width);
            }
            return Ok(0);
        };
        let item = self.placements[p].item;
        pc.seq.fill(item as i64);
        match (&sources[item], &self.resolved[item]) {
            (
                src,
                Resolved::Shard {
                    shard,
                    index,
                    n_sup,
                    reference,
                },
            ) => self
                .fill_cached(src, shard, *index, *n_sup, reference.as_ref(), pc)
                .map_err(|e| item_err(item, shard.key(*index).ok().as_ref(), e)),
            (Source::Decoded(r), _) => Ok(self.fill_decoded(r, pc)),
            (Source::Cached { .. }, Resolved::Decoded) => unreachable!("resolved from sources"),
        }
    }

    /// A cached sample: its tokens, its teacher rows and (with a reference) the reference
    /// record's rows, each decoded by [`open_record`] and placed by [`BatchPlan::place_rows`].
    fn fill_cached(
        &self,
        src: &Source<'_>,
        shard: &ShardReader,
        index: usize,
        n_sup: usize,
        reference: Option<&Located>,
        pc: Piece<'_>,
    ) -> Result<usize> {
        let Source::Cached {
            cache,
            labels: given,
            reference: ref_src,
            ..
        } = src
        else {
            unreachable!("resolved from a cached source")
        };
        // a label mismatch is about the sample, not where its record is stored
        let at = |e: Error, shard: &ShardReader, index: usize| {
            if e.kind == ErrorKind::Mismatch {
                e
            } else {
                e.at(format_args!(
                    "shard {}, record {index}",
                    shard.path.display()
                ))
            }
        };
        TOKENS.with(|tok| {
            let tok = &mut *tok.borrow_mut();
            DecodeScratch::with_thread_local(|scratch| {
                let n = pc.ids.len();
                let f = open_record(shard, index, n_sup, scratch, &mut tok.ids, &mut tok.labels)
                    .map_err(|e| at(e, shard, index))?;
                if let Some(given) = given {
                    if *given != &tok.labels[..] {
                        return Err(Error::mismatch(describe_labels(given, &tok.labels)));
                    }
                }
                supervised_positions(&tok.labels[..n], &mut tok.pos);
                self.write_tokens(
                    &tok.ids[..n],
                    &tok.labels,
                    pc.ids,
                    pc.labels,
                    pc.mask,
                    pc.pos,
                );
                self.place_rows(f, &tok.labels, &tok.pos, self.top_k, pc.teacher)
                    .map_err(|e| at(e, shard, index))?;
                if let (Some(loc), Some(r), Some(out)) = (reference, ref_src, pc.reference) {
                    let (rs, ri) = (&loc.shard, loc.index);
                    let f = open_record(
                        rs,
                        ri,
                        n_sup,
                        scratch,
                        &mut tok.ref_ids,
                        &mut tok.ref_labels,
                    )
                    .map_err(|e| at(e, rs, ri).at("the reference record"))?;
                    if tok.ref_labels != tok.labels {
                        return Err(Error::mismatch(describe_reference(
                            "labels",
                            &tok.labels,
                            &tok.ref_labels,
                            cache,
                            r.cache,
                        )));
                    }
                    self.place_rows(f, &tok.ref_labels, &tok.pos, r.cache.manifest.top_k, out)
                        .map_err(|e| at(e, rs, ri).at("the reference record"))?;
                }
                Ok(tok.pos.len())
            })
        })
    }

    fn fill_decoded(&self, r: &RecordView<'_>, mut pc: Piece<'_>) -> usize {
        let n = pc.ids.len();
        let k = self.top_k;
        TOKENS.with(|tok| {
            let pos = &mut tok.borrow_mut().pos;
            supervised_positions(&r.labels[..n], pos);
            self.write_tokens(
                &r.input_ids[..n],
                r.labels,
                pc.ids,
                pc.labels,
                pc.mask,
                pc.pos,
            );
            pc.teacher.fill_unsupervised(pos, n, self.width);
            let mut sink = self.sink(r.labels, pos, k, pc.teacher);
            for row in 0..pos.len() {
                let (_, ids, lps) = sink.row(row);
                ids.copy_from_slice(&r.topk_ids[row * k..(row + 1) * k]);
                lps.copy_from_slice(&r.topk_logprobs[row * k..(row + 1) * k]);
                sink.label(row, r.label_logprobs[row], 0);
            }
            pos.len()
        })
    }

    /// Write a sample's tokens (`ids` = its first `n` tokens), its labels (`-100` at its first
    /// position) and mask or position ids.
    fn write_tokens(
        &self,
        ids: &[i32],
        labels: &[i32],
        out_ids: &mut [i64],
        out_labels: &mut [i64],
        mask: Option<&mut [i64]>,
        pos: Option<&mut [i64]>,
    ) {
        let n = ids.len();
        for (o, &x) in out_ids.iter_mut().zip(ids) {
            *o = i64::from(x);
        }
        out_labels[0] = i64::from(IGNORE_INDEX);
        for (o, &x) in out_labels[1..].iter_mut().zip(&labels[1..n]) {
            *o = i64::from(x);
        }
        if let Some(m) = mask {
            m.fill(1);
        }
        if let Some(p) = pos {
            p.iter_mut().enumerate().for_each(|(j, x)| *x = j as i64);
        }
    }

    /// The one way rows of a record reach a batch tensor (teacher or reference): `-1`/`-inf`
    /// (and label log-prob `0.0`) at the positions of the piece without a row, then the frame's
    /// first `pos.len()` rows of `k` entries at `pos`, with the label column.
    fn place_rows(
        &self,
        f: Frame<'_>,
        labels: &[i32],
        pos: &[u32],
        k: usize,
        mut out: RowsOut<'_>,
    ) -> Result<()> {
        let w = k + usize::from(self.opts.label_in_support);
        let n = out.ids.len() / w;
        out.fill_unsupervised(pos, n, w);
        let mut sink = self.sink(labels, pos, k, out);
        f.rows(labels, pos.len(), &mut sink)
    }

    fn sink<'a>(
        &self,
        labels: &'a [i32],
        pos: &'a [u32],
        k: usize,
        out: RowsOut<'a>,
    ) -> PlacedRows<'a> {
        PlacedRows {
            k,
            w: k + usize::from(self.opts.label_in_support),
            ids: out.ids,
            lps: out.lps,
            label_lps: out.label_lps,
            pos,
            labels,
            label_in_support: self.opts.label_in_support,
        }
    }
}

/// Whether a batch has references is decided by its item 0; item `i` disagrees.
fn mixed_references(i: usize, has_ref: bool) -> Error {
    Error::input(if has_ref {
        format!("batch item 0 has a reference record but item {i} has none; the items of a batch all have a reference or none has")
    } else {
        format!("batch item {i} has a reference record but item 0 has none; the items of a batch all have a reference or none has")
    })
}

/// Locate the reference record `r` of the record `index` of `shard` (in `cache`, index row
/// `row`) and check that it is the same sample: the same key, token hash and token and
/// supervised counts (its labels are compared when the batch is filled).
fn resolve_reference(
    cache: &TeacherCache,
    shard: &ShardReader,
    index: usize,
    row: &crate::shard::IndexRow,
    r: &Reference<'_>,
) -> Result<Located> {
    let (s, ri) = r
        .cache
        .locate(r.position)
        .map_err(|e| e.at("its reference"))?;
    let rs = r.cache.shard(s).map_err(|e| e.at("its reference"))?;
    let rrow = rs.checked_row(ri).map_err(|e| e.at("its reference"))?;
    if r.cache.manifest.vocab_size != cache.manifest.vocab_size {
        return Err(Error::mismatch(format!(
            "the reference cache ({}) has vocab_size {} but the teacher cache ({}) has {}; a reference must share the teacher's tokenizer",
            r.cache.dir.display(),
            r.cache.manifest.vocab_size,
            cache.dir.display(),
            cache.manifest.vocab_size
        )));
    }
    let (key, rkey) = (shard.key(index)?, rs.key(ri)?);
    if key != rkey {
        return Err(Error::mismatch(format!(
            "the reference record at position {} of {} has key {rkey}, not the teacher record's key {key}; pair records by key",
            r.position,
            r.cache.dir.display()
        )));
    }
    if rrow.token_hash != row.token_hash || rrow.n_tokens != row.n_tokens {
        let (a, _) = decode_tokens(shard, index, row)?;
        let (b, _) = decode_tokens(&rs, ri, &rrow).map_err(|e| e.at("its reference"))?;
        return Err(Error::mismatch(describe_reference(
            "tokens", &a, &b, cache, r.cache,
        )));
    }
    if rrow.n_supervised != row.n_supervised {
        return Err(Error::mismatch(format!(
            "the reference record has {} supervised tokens but the teacher record has {} (teacher cache {}, reference cache {}); both caches must be built from the same rows",
            rrow.n_supervised,
            row.n_supervised,
            cache.dir.display(),
            r.cache.dir.display()
        )));
    }
    Ok(Located {
        shard: rs,
        index: ri,
    })
}

/// How a reference record's `what` (tokens or labels) differ from the teacher record's: the
/// first differing position, both caches named.
fn describe_reference(
    what: &str,
    teacher: &[i32],
    reference: &[i32],
    cache: &TeacherCache,
    ref_cache: &TeacherCache,
) -> String {
    let t = teacher
        .iter()
        .zip(reference)
        .take_while(|(a, b)| a == b)
        .count();
    let show = |v: Option<&i32>| v.map_or("(end)".to_string(), i32::to_string);
    format!(
        "the reference record's {what} differ from the teacher record's at position {t} (teacher {}, reference {}; {} vs {} entries; teacher cache {}, reference cache {}): both caches must be built from the same rows (same tokenizer, chat template, truncation and supervision)",
        show(teacher.get(t)),
        show(reference.get(t)),
        teacher.len(),
        reference.len(),
        cache.dir.display(),
        ref_cache.dir.display()
    )
}

/// Open record `index` of `shard` and decode its tokens into `ids`/`labels`; its rows are
/// next in the returned frame.
fn open_record<'a>(
    shard: &'a ShardReader,
    index: usize,
    n_sup: usize,
    scratch: &'a mut DecodeScratch,
    ids: &mut Vec<i32>,
    labels: &mut Vec<i32>,
) -> Result<Frame<'a>> {
    let n_tokens = shard.index_row(index).n_tokens as usize;
    let mut f = shard
        .codec
        .open_frame(shard.frame(index), n_tokens, n_sup, scratch)?;
    f.tokens(ids, labels)?;
    Ok(f)
}

/// Decode a record's `(input_ids, labels)` (the tokens section only).
fn decode_tokens(
    shard: &ShardReader,
    index: usize,
    row: &crate::shard::IndexRow,
) -> Result<(Vec<i32>, Vec<i32>)> {
    let (nt, ns) = (row.n_tokens as usize, row.n_supervised as usize);
    DecodeScratch::with_thread_local(|scratch| {
        let mut f = shard
            .codec
            .open_frame(shard.frame(index), nt, ns, scratch)?;
        let (mut ids, mut labels) = (Vec::new(), Vec::new());
        f.tokens(&mut ids, &mut labels)?;
        Ok((ids, labels))
    })
}

/// Shapes of an in-memory record: what the batch builder relies on (full validation is the
/// writer's job).
fn check_view(r: &RecordView<'_>) -> Result<()> {
    let t = r.input_ids.len();
    if r.labels.len() != t {
        return Err(Error::input(format!(
            "labels has {} entries but input_ids has {t}",
            r.labels.len()
        )));
    }
    if r.top_k == 0 {
        return Err(Error::input("top_k must be >= 1"));
    }
    let s = count_supervised(r.labels);
    if r.topk_ids.len() != s * r.top_k
        || r.topk_logprobs.len() != s * r.top_k
        || r.label_logprobs.len() != s
    {
        return Err(Error::input(format!(
            "topk_ids/topk_logprobs/label_logprobs have {}/{}/{} entries but the labels mark {s} supervised positions t >= 1: expected [{s}, {k}], [{s}, {k}], [{s}]",
            r.topk_ids.len(),
            r.topk_logprobs.len(),
            r.label_logprobs.len(),
            k = r.top_k
        )));
    }
    Ok(())
}

/// One disjoint piece of the output: a sample (`place`) or a row's padding tail (`None`).
struct Piece<'a> {
    place: Option<usize>,
    ids: &'a mut [i64],
    labels: &'a mut [i64],
    mask: Option<&'a mut [i64]>,
    pos: Option<&'a mut [i64]>,
    seq: &'a mut [i64],
    teacher: RowsOut<'a>,
    reference: Option<RowsOut<'a>>,
}

/// A piece of one model's row tensors (`ids`/`lps`: `n * width`) and, for the reference, of its
/// label log-probs (`n`).
struct RowsOut<'a> {
    ids: &'a mut [i32],
    lps: &'a mut [f32],
    label_lps: Option<&'a mut [f32]>,
}

impl RowsOut<'_> {
    /// `-1`/`-inf` (label log-prob `0.0`) at every one of the piece's `n` positions that gets
    /// no row (`pos`: the positions that do, increasing).
    fn fill_unsupervised(&mut self, pos: &[u32], n: usize, w: usize) {
        let mut start = 0usize;
        for &t in pos.iter().chain(std::iter::once(&(n as u32))) {
            let t = t as usize;
            if t > start {
                self.ids[start * w..t * w].fill(-1);
                self.lps[start * w..t * w].fill(f32::NEG_INFINITY);
                if let Some(l) = self.label_lps.as_deref_mut() {
                    l[start..t].fill(0.0);
                }
            }
            start = t + 1;
        }
    }
}

/// Cut `buf` into consecutive slices of the given lengths, which must tile it exactly: every
/// element of an output buffer belongs to exactly one piece, and every piece is written whole.
fn carve<T>(mut buf: &mut [T], lens: impl Iterator<Item = usize>) -> Vec<&mut [T]> {
    let mut out = Vec::new();
    for n in lens {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(n);
        out.push(head);
        buf = tail;
    }
    assert!(buf.is_empty(), "the pieces do not tile the output buffer");
    out
}

#[derive(Default)]
struct TokenScratch {
    ids: Vec<i32>,
    labels: Vec<i32>,
    pos: Vec<u32>,
    ref_ids: Vec<i32>,
    ref_labels: Vec<i32>,
}

thread_local! {
    static TOKENS: RefCell<TokenScratch> = RefCell::new(TokenScratch::default());
}

/// Positions `t >= 1` with a label, in increasing order (the record's row `r` is `pos[r]`).
fn supervised_positions(labels: &[i32], pos: &mut Vec<u32>) {
    pos.clear();
    pos.extend(
        labels
            .iter()
            .enumerate()
            .skip(1)
            .filter(|&(_, &l)| l != IGNORE_INDEX)
            .map(|(t, _)| t as u32),
    );
}

/// Rows of one sample inside the batch's teacher tensors: row `r` at position `pos[r]`, `k`
/// decoded entries then (with `label_in_support`) the label column.
struct PlacedRows<'a> {
    k: usize,
    w: usize,
    ids: &'a mut [i32],
    lps: &'a mut [f32],
    /// Where the rows' label log-probs go (indexed by position), if anywhere.
    label_lps: Option<&'a mut [f32]>,
    pos: &'a [u32],
    labels: &'a [i32],
    label_in_support: bool,
}

impl RowSink for PlacedRows<'_> {
    #[inline]
    fn row(&mut self, r: usize) -> (&[i32], &mut [i32], &mut [f32]) {
        let (k, w) = (self.k, self.w);
        let at = self.pos[r] as usize * w;
        let (head, tail) = self.ids.split_at_mut(at);
        let prev = if r == 0 {
            &[][..]
        } else {
            let p = self.pos[r - 1] as usize * w;
            &head[p..p + k]
        };
        (prev, &mut tail[..k], &mut self.lps[at..at + k])
    }

    #[inline]
    fn label(&mut self, r: usize, logprob: f32, _rank: i32) {
        let t = self.pos[r] as usize;
        if let Some(l) = self.label_lps.as_deref_mut() {
            l[t] = logprob;
        }
        if !self.label_in_support {
            return;
        }
        let at = t * self.w;
        let label = self.labels[t];
        let present = self.ids[at..at + self.k].contains(&label);
        let (id, lp) = if present {
            (-1, f32::NEG_INFINITY)
        } else {
            (label, logprob)
        };
        self.ids[at + self.k] = id;
        self.lps[at + self.k] = lp;
    }
}
