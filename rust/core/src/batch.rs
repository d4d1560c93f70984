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

use std::cell::RefCell;
use std::sync::Arc;

use rayon::prelude::*;

use crate::cache::TeacherCache;
use crate::codec::{DecodeScratch, RowSink};
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

enum Resolved {
    Shard {
        shard: Arc<ShardReader>,
        index: usize,
        n_sup: usize,
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
        let mut resolved = Vec::with_capacity(sources.len());
        let mut lens = Vec::with_capacity(sources.len());
        for (i, src) in sources.iter().enumerate() {
            let (k, n_tokens) = match src {
                Source::Cached {
                    cache,
                    position,
                    input_ids,
                    labels,
                } => {
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
                    resolved.push(Resolved::Shard {
                        shard: shard.clone(),
                        index,
                        n_sup: row.n_supervised as usize,
                    });
                    (cache.manifest.top_k, row.n_tokens as usize)
                }
                Source::Decoded(r) => {
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
        let elements = rows.checked_mul(len).and_then(|n| n.checked_mul(width));
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
        let pieces: Vec<Piece<'_>> = spans
            .iter()
            .zip(ids)
            .zip(labels)
            .zip(tids.into_iter().zip(tlps))
            .map(|(((&(place, _), ids), labels), (tids, tlps))| Piece {
                place,
                ids,
                labels,
                mask: mask.as_mut().map(|m| m.next().expect("one per span")),
                pos: pos.as_mut().map(|m| m.next().expect("one per span")),
                tids,
                tlps,
            })
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

    fn fill_piece(&self, sources: &[Source<'_>], pc: Piece<'_>) -> Result<usize> {
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
            pc.tids.fill(-1);
            pc.tlps.fill(f32::NEG_INFINITY);
            return Ok(0);
        };
        let place = self.placements[p];
        let item = place.item;
        match (&sources[item], &self.resolved[item]) {
            (
                _,
                Resolved::Shard {
                    shard,
                    index,
                    n_sup,
                },
            ) => self
                .fill_cached(shard, *index, *n_sup, given_labels(&sources[item]), pc)
                .map_err(|e| {
                    let key = shard.key(*index).ok();
                    // a label mismatch is about the sample, not where its record is stored
                    let e = if e.kind == ErrorKind::Mismatch {
                        e
                    } else {
                        e.at(format_args!(
                            "shard {}, record {index}",
                            shard.path.display()
                        ))
                    };
                    item_err(item, key.as_ref(), e)
                }),
            (Source::Decoded(r), _) => Ok(self.fill_decoded(r, pc)),
            (Source::Cached { .. }, Resolved::Decoded) => unreachable!("resolved from sources"),
        }
    }

    fn fill_cached(
        &self,
        shard: &ShardReader,
        index: usize,
        n_sup: usize,
        labels: Option<&[i32]>,
        pc: Piece<'_>,
    ) -> Result<usize> {
        let n_tokens = shard.index_row(index).n_tokens as usize;
        let frame = shard.frame(index);
        TOKENS.with(|tok| {
            let tok = &mut *tok.borrow_mut();
            DecodeScratch::with_thread_local(|scratch| {
                let mut f = shard.codec.open_frame(frame, n_tokens, n_sup, scratch)?;
                f.tokens(&mut tok.ids, &mut tok.labels)?;
                if let Some(given) = labels {
                    if given != &tok.labels[..] {
                        return Err(Error::mismatch(describe_labels(given, &tok.labels)));
                    }
                }
                let n = pc.ids.len();
                supervised_positions(&tok.labels[..n], &mut tok.pos);
                let mut sink = self.write_sample(&tok.ids[..n], &tok.labels, &tok.pos, pc);
                f.rows(&tok.labels, tok.pos.len(), &mut sink)?;
                Ok(tok.pos.len())
            })
        })
    }

    fn fill_decoded(&self, r: &RecordView<'_>, pc: Piece<'_>) -> usize {
        let n = pc.ids.len();
        let k = self.top_k;
        TOKENS.with(|tok| {
            let pos = &mut tok.borrow_mut().pos;
            supervised_positions(&r.labels[..n], pos);
            let mut sink = self.write_sample(&r.input_ids[..n], r.labels, pos, pc);
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
    /// position), mask or position ids, and `-1`/`-inf` at the positions without a teacher row;
    /// return the sink for the teacher rows at `pos`.
    fn write_sample<'a>(
        &self,
        ids: &[i32],
        labels: &'a [i32],
        pos: &'a [u32],
        pc: Piece<'a>,
    ) -> PlacedRows<'a> {
        let n = ids.len();
        for (o, &x) in pc.ids.iter_mut().zip(ids) {
            *o = i64::from(x);
        }
        pc.labels[0] = i64::from(IGNORE_INDEX);
        for (o, &x) in pc.labels[1..].iter_mut().zip(&labels[1..n]) {
            *o = i64::from(x);
        }
        if let Some(m) = pc.mask {
            m.fill(1);
        }
        if let Some(p) = pc.pos {
            p.iter_mut().enumerate().for_each(|(j, x)| *x = j as i64);
        }
        let w = self.width;
        fill_unsupervised(pos, n, w, pc.tids, pc.tlps);
        PlacedRows {
            k: self.top_k,
            w,
            ids: pc.tids,
            lps: pc.tlps,
            pos,
            labels,
            label_in_support: self.opts.label_in_support,
        }
    }
}

/// The labels a cached source was given to check (`None`: not checked).
fn given_labels<'a>(src: &Source<'a>) -> Option<&'a [i32]> {
    match src {
        Source::Cached { labels, .. } => *labels,
        Source::Decoded(_) => None,
    }
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
    tids: &'a mut [i32],
    tlps: &'a mut [f32],
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

/// `-1`/`-inf` at every position of the piece that gets no teacher row.
fn fill_unsupervised(pos: &[u32], n: usize, w: usize, ids: &mut [i32], lps: &mut [f32]) {
    let mut start = 0usize;
    for &t in pos.iter().chain(std::iter::once(&(n as u32))) {
        let t = t as usize;
        if t > start {
            ids[start * w..t * w].fill(-1);
            lps[start * w..t * w].fill(f32::NEG_INFINITY);
        }
        start = t + 1;
    }
}

/// Rows of one sample inside the batch's teacher tensors: row `r` at position `pos[r]`, `k`
/// decoded entries then (with `label_in_support`) the label column.
struct PlacedRows<'a> {
    k: usize,
    w: usize,
    ids: &'a mut [i32],
    lps: &'a mut [f32],
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
        if !self.label_in_support {
            return;
        }
        let t = self.pos[r] as usize;
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
