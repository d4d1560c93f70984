//! Record codecs (docs/FORMAT.md §Frames).
//!
//! A record is encoded into one zstd frame (with content size and content checksum). The
//! decompressed frame is: `varint n_tokens ‖ varint n_supervised ‖ tokens section ‖ rows section`.
//! The tokens section is shared by all codecs; the rows section (teacher top-k, label log-probs
//! and ranks) is codec-specific: [`exact`] stores float32 bit patterns, [`compact`] quantises.

pub mod bytes;
pub mod codebook;
pub mod compact;
pub mod exact;

use std::cell::RefCell;
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::record::{Key, Record, IGNORE_INDEX};
use bytes::{put_planes_u32, put_varint, Cursor};
pub use codebook::{Codebook, CodebookParams, LadderParams, DEFAULT_MAX_MEAN_KL};
pub use compact::IdTable;

/// Which codec a cache uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodecKind {
    Exact,
    Compact,
}

impl CodecKind {
    pub fn name(self) -> &'static str {
        match self {
            CodecKind::Exact => "exact",
            CodecKind::Compact => "compact",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "exact" => Ok(CodecKind::Exact),
            "compact" => Ok(CodecKind::Compact),
            other => Err(Error::input(format!(
                "unknown codec {other:?}; use \"compact\" (default, quantised log-probs) or \"exact\" (bit-for-bit)"
            ))),
        }
    }
}

/// A ready-to-use codec: the kind plus the tables it needs.
pub struct Codec {
    pub kind: CodecKind,
    pub top_k: usize,
    pub vocab_size: usize,
    pub zstd_level: i32,
    /// Compact only: the codebook parameters, one rung per codebook (docs/FORMAT.md §5.1).
    pub ladder: Option<LadderParams>,
    /// Compact only: the codebook of each rung this codec holds (a shard reader: the rungs its
    /// shard stores; a writer: each rung, built when first used).
    pub codebooks: Vec<OnceLock<Codebook>>,
    /// Whether a missing rung is built from the ladder (a writer) or absent (a shard reader).
    build_rungs: bool,
    /// Compact only: whether a frame's rows section starts with its rung (format version 3).
    pub rung_byte: bool,
    /// Compact only.
    pub ids: Option<IdTable>,
}

/// Reusable buffers of one encoding thread.
#[derive(Default)]
pub struct EncodeScratch {
    raw: Vec<u8>,
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
    /// A streaming context for frames cut into blocks.
    cctx: Option<(i32, zstd::zstd_safe::CCtx<'static>)>,
    /// Offsets in the decompressed frame where a zstd block should start (increasing).
    cuts: Vec<usize>,
    compact: compact::EncodeScratch,
}

/// Compress `raw` into one zstd frame (content size and checksum included) whose blocks start at
/// the offsets `cuts` (increasing; zstd may split blocks further), by flushing the stream there.
fn compress_with_cuts(
    raw: &[u8],
    cuts: &[usize],
    level: i32,
    slot: &mut Option<(i32, zstd::zstd_safe::CCtx<'static>)>,
) -> Result<Vec<u8>> {
    use zstd::zstd_safe::{
        zstd_sys::ZSTD_EndDirective, CCtx, CParameter, InBuffer, OutBuffer, ResetDirective,
    };
    let fail = |what: &str, code: usize| {
        Error::input(format!(
            "zstd {what} failed: {}",
            zstd::zstd_safe::get_error_name(code)
        ))
    };
    if slot.as_ref().is_none_or(|(l, _)| *l != level) {
        let mut c = CCtx::create();
        for p in [
            CParameter::CompressionLevel(level),
            CParameter::ChecksumFlag(true),
            CParameter::ContentSizeFlag(true),
        ] {
            c.set_parameter(p).map_err(|e| fail("parameter", e))?;
        }
        *slot = Some((level, c));
    }
    let cctx = &mut slot.as_mut().expect("just set").1;
    cctx.reset(ResetDirective::SessionOnly)
        .map_err(|e| fail("reset", e))?;
    cctx.set_pledged_src_size(Some(raw.len() as u64))
        .map_err(|e| fail("pledged size", e))?;
    let mut out: Vec<u8> =
        Vec::with_capacity(zstd::zstd_safe::compress_bound(raw.len()) + 64 * (cuts.len() + 2));
    let mut ob = OutBuffer::around(&mut out);
    let mut start = 0usize;
    for end in cuts.iter().copied().chain(std::iter::once(raw.len())) {
        let last = end == raw.len();
        let dir = if last {
            ZSTD_EndDirective::ZSTD_e_end
        } else {
            ZSTD_EndDirective::ZSTD_e_flush
        };
        let mut ib = InBuffer::around(&raw[start..end]);
        loop {
            let left = cctx
                .compress_stream2(&mut ob, &mut ib, dir)
                .map_err(|e| fail("compression", e))?;
            if left == 0 && ib.pos() == end - start {
                break;
            }
            if ob.pos() == ob.capacity() {
                return Err(Error::input("zstd output exceeded its bound"));
            }
        }
        start = end;
    }
    Ok(out)
}

thread_local! {
    static SCRATCH: RefCell<DecodeScratch> = RefCell::new(DecodeScratch::default());
}

/// Reusable buffers of one decoding thread: a zstd context and the decompressed frame.
#[derive(Default)]
pub struct DecodeScratch {
    dctx: Option<zstd::bulk::Decompressor<'static>>,
    raw: Vec<u8>,
}

impl EncodeScratch {
    /// After a compact [`Codec::encode`]: the rungs the record was encoded with, and each row's
    /// kept mass and codec KL as encoded.
    pub fn compact_costs(&self) -> (compact::Rungs, &[compact::RowCost]) {
        (self.compact.rungs, &self.compact.costs)
    }
}

impl DecodeScratch {
    /// Run `f` with this thread's decode scratch (one per thread, kept across calls).
    pub fn with_thread_local<R>(f: impl FnOnce(&mut DecodeScratch) -> R) -> R {
        SCRATCH.with(|s| f(&mut s.borrow_mut()))
    }
}

/// Where a decoder writes teacher rows. Lets a caller decode straight into its own buffers: a
/// [`Record`]'s vectors, or the rows of a batch tensor (`crate::batch`).
pub trait RowSink {
    /// The slots of row `r` (`k` ids and `k` log-probs, all of which the decoder writes, padding
    /// included) and the ids of row `r - 1` as written (empty for `r = 0`). Rows are requested in
    /// increasing order; the exact codec makes two passes (ids, then log-probs).
    fn row(&mut self, r: usize) -> (&[i32], &mut [i32], &mut [f32]);
    /// Row `r`'s label log-prob and rank, once the row's ids and log-probs are written.
    fn label(&mut self, r: usize, logprob: f32, rank: i32);
}

/// A [`RowSink`] over `Record`-style row-major vectors of `s * k` entries.
struct VecRows<'a> {
    k: usize,
    ids: &'a mut [i32],
    lps: &'a mut [f32],
    label_lps: &'a mut [f32],
    label_ranks: &'a mut [i32],
}

impl RowSink for VecRows<'_> {
    #[inline]
    fn row(&mut self, r: usize) -> (&[i32], &mut [i32], &mut [f32]) {
        let k = self.k;
        let (done, rest) = self.ids.split_at_mut(r * k);
        let prev = if r == 0 {
            &[][..]
        } else {
            &done[(r - 1) * k..]
        };
        (prev, &mut rest[..k], &mut self.lps[r * k..(r + 1) * k])
    }
    #[inline]
    fn label(&mut self, r: usize, logprob: f32, rank: i32) {
        self.label_lps[r] = logprob;
        self.label_ranks[r] = rank;
    }
}

/// One frame being decoded: its header is checked; the tokens section, then the rows section,
/// are read with [`Frame::tokens`] and [`Frame::rows`].
pub struct Frame<'a> {
    codec: &'a Codec,
    c: Cursor<'a>,
    t: usize,
    s: usize,
    tokens_read: bool,
}

impl Codec {
    pub fn exact(top_k: usize, vocab_size: usize, zstd_level: i32) -> Self {
        Self {
            kind: CodecKind::Exact,
            top_k,
            vocab_size,
            zstd_level,
            ladder: None,
            codebooks: Vec::new(),
            build_rungs: false,
            rung_byte: false,
            ids: None,
        }
    }

    /// A compact codec holding the codebooks `codebooks[j]` of the ladder's rungs (`None` for
    /// rungs it cannot decode); `rung_byte` as in [`Codec::rung_byte`].
    pub fn compact(
        top_k: usize,
        vocab_size: usize,
        zstd_level: i32,
        ladder: LadderParams,
        codebooks: Vec<Option<Codebook>>,
        rung_byte: bool,
        ids: IdTable,
    ) -> Self {
        let codebooks = codebooks
            .into_iter()
            .map(|c| {
                let cell = OnceLock::new();
                if let Some(c) = c {
                    let _ = cell.set(c);
                }
                cell
            })
            .collect();
        Self {
            kind: CodecKind::Compact,
            top_k,
            vocab_size,
            zstd_level,
            ladder: Some(ladder),
            codebooks,
            build_rungs: false,
            rung_byte,
            ids: Some(ids),
        }
    }

    /// A writer's compact codec: every rung of `ladder` (each codebook built when first used;
    /// the ladder must be valid: [`LadderParams::validate`] and every rung's codebook buildable).
    pub fn compact_writer(
        top_k: usize,
        vocab_size: usize,
        zstd_level: i32,
        ladder: LadderParams,
        ids: IdTable,
    ) -> Self {
        let rungs = ladder.rungs();
        let mut c = Self::compact(
            top_k,
            vocab_size,
            zstd_level,
            ladder,
            (0..rungs).map(|_| None).collect(),
            true,
            ids,
        );
        c.build_rungs = true;
        c
    }

    /// Whether this codec holds (or, a writer, can build) the codebook of `rung`.
    pub fn has_rung(&self, rung: usize) -> bool {
        self.codebooks
            .get(rung)
            .is_some_and(|c| self.build_rungs || c.get().is_some())
    }

    /// The codebook of rung `rung` (an error naming the rung when this codec does not hold it).
    pub fn codebook(&self, rung: usize) -> Result<&Codebook> {
        let missing = || {
            Error::corrupt(format!(
                "a record uses codebook rung {rung}, which its shard does not store"
            ))
        };
        let cell = self.codebooks.get(rung).ok_or_else(missing)?;
        match (cell.get(), self.build_rungs, &self.ladder) {
            (Some(cb), _, _) => Ok(cb),
            (None, true, Some(ladder)) => Ok(cell.get_or_init(|| {
                Codebook::new(ladder.rung(rung)).expect("a writer's ladder is validated")
            })),
            _ => Err(missing()),
        }
    }

    /// Encode a validated record into one zstd frame.
    pub fn encode(&self, rec: &Record, scratch: &mut EncodeScratch) -> Result<Vec<u8>> {
        let raw = &mut scratch.raw;
        raw.clear();
        put_varint(raw, rec.n_tokens() as u64);
        put_varint(raw, rec.n_supervised() as u64);
        let at = raw.len();
        put_tokens(raw, &rec.input_ids, &rec.labels);
        // compact: each byte plane of the input ids starts a zstd block of its own (the planes'
        // statistics differ: the low byte is near uniform, the high ones mostly zero)
        let t = rec.n_tokens();
        let cuts = &mut scratch.cuts;
        cuts.clear();
        if t >= compact::BLOCK_CUT_BYTES {
            cuts.extend((1..=4).map(|p| at + p * t));
        }
        match self.kind {
            CodecKind::Exact => {
                // every byte plane of the rows starts a block too (sign/exponent bytes and
                // mantissa bytes have nothing in common)
                let start = raw.len();
                exact::encode_rows(raw, rec);
                let nk = rec.topk_ids.len();
                if nk >= compact::BLOCK_CUT_BYTES {
                    cuts.extend((0..8).map(|p| start + p * nk));
                }
            }
            CodecKind::Compact => compact::encode_rows(self, raw, rec, &mut scratch.compact, cuts)?,
        }
        if !cuts.is_empty() {
            return compress_with_cuts(raw, cuts, self.zstd_level, &mut scratch.cctx);
        }
        if scratch
            .zstd
            .as_ref()
            .is_none_or(|(l, _)| *l != self.zstd_level)
        {
            let mut c = zstd::bulk::Compressor::new(self.zstd_level)
                .map_err(|e| Error::input(format!("zstd level {}: {e}", self.zstd_level)))?;
            c.include_checksum(true).expect("zstd parameter");
            c.include_contentsize(true).expect("zstd parameter");
            scratch.zstd = Some((self.zstd_level, c));
        }
        let c = &mut scratch.zstd.as_mut().expect("just set").1;
        c.compress(raw)
            .map_err(|e| Error::input(format!("zstd compression failed: {e}")))
    }

    /// Upper bound on a decoded frame's size, used to refuse absurd content sizes.
    pub(crate) fn max_raw_size(&self, n_tokens: usize, n_sup: usize) -> usize {
        n_tokens
            .saturating_mul(14)
            .saturating_add(n_sup.saturating_mul(self.top_k * 24 + 48))
            .saturating_add(64)
    }

    /// Decompress `frame` into `scratch` and check its header. `n_tokens`/`n_sup` come from the
    /// shard index and are cross-checked.
    pub fn open_frame<'a>(
        &'a self,
        frame: &[u8],
        n_tokens: usize,
        n_sup: usize,
        scratch: &'a mut DecodeScratch,
    ) -> Result<Frame<'a>> {
        let cap = self.max_raw_size(n_tokens, n_sup);
        let size = match zstd::zstd_safe::get_frame_content_size(frame) {
            Ok(Some(n)) if n as usize <= cap => n as usize,
            Ok(Some(n)) => {
                return Err(Error::corrupt(format!(
                    "frame declares {n} decoded bytes, more than the {cap} a record of {n_tokens} tokens can need"
                )))
            }
            _ => return Err(Error::corrupt("payload bytes are not a zstd frame with a content size")),
        };
        if scratch.dctx.is_none() {
            scratch.dctx = Some(
                zstd::bulk::Decompressor::new()
                    .map_err(|e| Error::corrupt(format!("zstd: {e}")))?,
            );
        }
        let raw = &mut scratch.raw;
        raw.clear();
        raw.reserve(size);
        let got = scratch
            .dctx
            .as_mut()
            .expect("just set")
            .decompress_to_buffer(frame, raw)
            .map_err(|e| {
                Error::corrupt(format!(
                    "zstd frame does not decode ({e}); the payload is damaged"
                ))
            })?;
        if got != size {
            return Err(Error::corrupt(
                "zstd frame decoded to a different size than it declares",
            ));
        }
        let raw: &'a [u8] = &scratch.raw;
        self.parse_raw(raw, n_tokens, n_sup)
    }

    /// Check the header of an already decompressed frame (`raw`) against the shard index's
    /// `n_tokens`/`n_sup` and return it ready for [`Frame::tokens`] and [`Frame::rows`]. Every
    /// read is bounds-checked: arbitrary bytes give an error, never a panic.
    pub fn parse_raw<'a>(
        &'a self,
        raw: &'a [u8],
        n_tokens: usize,
        n_sup: usize,
    ) -> Result<Frame<'a>> {
        let mut c = Cursor::new(raw);
        let t = c.count("n_tokens", usize::MAX)?;
        let s = c.count("n_supervised", usize::MAX)?;
        if s > t || t.saturating_mul(4) > raw.len() {
            return Err(Error::corrupt(format!(
                "frame claims {t} tokens and {s} rows, more than its {} bytes can hold",
                raw.len()
            )));
        }
        if t != n_tokens || s != n_sup {
            return Err(Error::corrupt(format!(
                "frame holds {t} tokens / {s} supervised rows but the shard index says {n_tokens} / {n_sup}"
            )));
        }
        Ok(Frame {
            codec: self,
            c,
            t,
            s,
            tokens_read: false,
        })
    }

    /// Decode one frame into a [`Record`].
    pub fn decode(&self, frame: &[u8], key: Key, n_tokens: usize, n_sup: usize) -> Result<Record> {
        DecodeScratch::with_thread_local(|scratch| {
            let mut f = self.open_frame(frame, n_tokens, n_sup, scratch)?;
            let (k, s) = (self.top_k, n_sup);
            let mut rec = Record {
                key,
                input_ids: Vec::new(),
                labels: Vec::new(),
                topk_ids: vec![0; s * k],
                topk_logprobs: vec![0.0; s * k],
                label_logprobs: vec![0.0; s],
                label_ranks: vec![0; s],
            };
            f.tokens(&mut rec.input_ids, &mut rec.labels)?;
            let mut sink = VecRows {
                k,
                ids: &mut rec.topk_ids,
                lps: &mut rec.topk_logprobs,
                label_lps: &mut rec.label_logprobs,
                label_ranks: &mut rec.label_ranks,
            };
            f.rows(&rec.labels, s, &mut sink)?;
            Ok(rec)
        })
    }
}

impl Frame<'_> {
    pub fn n_tokens(&self) -> usize {
        self.t
    }
    pub fn n_supervised(&self) -> usize {
        self.s
    }

    /// Decode the tokens section into `input_ids` and `labels` (cleared first).
    pub fn tokens(&mut self, input_ids: &mut Vec<i32>, labels: &mut Vec<i32>) -> Result<()> {
        get_tokens(
            &mut self.c,
            self.t,
            self.codec.vocab_size,
            input_ids,
            labels,
        )?;
        let sup = crate::record::count_supervised(labels);
        if sup != self.s {
            return Err(Error::corrupt(format!(
                "labels mark {sup} supervised positions but the frame has {} rows",
                self.s
            )));
        }
        self.tokens_read = true;
        Ok(())
    }

    /// Decode the rows section after [`Frame::tokens`] (`labels` are the labels it produced):
    /// the first `rows` rows go to `sink`. With `rows = n_supervised` the whole frame is read and
    /// checked to the last byte; with fewer, decoding stops early (a truncated sample: the frame's
    /// zstd checksum has still covered every byte).
    pub fn rows<S: RowSink>(mut self, labels: &[i32], rows: usize, sink: &mut S) -> Result<()> {
        assert!(self.tokens_read, "Frame::rows before Frame::tokens");
        assert!(rows <= self.s, "more rows requested than the frame holds");
        match self.codec.kind {
            CodecKind::Exact => exact::decode_rows(self.codec, &mut self.c, self.s, rows, sink)?,
            CodecKind::Compact => {
                compact::decode_rows(self.codec, &mut self.c, labels, self.s, rows, sink)?
            }
        }
        if rows == self.s && !self.c.is_empty() {
            return Err(Error::corrupt(
                "frame has bytes left over after the last section",
            ));
        }
        Ok(())
    }
}

/// Tokens section: input ids as 4 byte planes; the supervision mask as a bitmap (bit `t` of
/// byte `t / 8`, least significant first, set when `labels[t] != -100`); then the exceptions:
/// varint count, then per exception varint position and u32 LE label, for supervised positions
/// whose label differs from `input_ids[t]`.
fn put_tokens(raw: &mut Vec<u8>, input_ids: &[i32], labels: &[i32]) {
    put_planes_u32(raw, input_ids.iter().map(|&x| x as u32));
    let base = raw.len();
    raw.resize(base + input_ids.len().div_ceil(8), 0);
    let mut exceptions = Vec::new();
    for (t, (&l, &x)) in labels.iter().zip(input_ids).enumerate() {
        if l != IGNORE_INDEX {
            raw[base + t / 8] |= 1 << (t % 8);
            if l != x {
                exceptions.push((t, l));
            }
        }
    }
    put_varint(raw, exceptions.len() as u64);
    for (t, l) in exceptions {
        put_varint(raw, t as u64);
        raw.extend_from_slice(&(l as u32).to_le_bytes());
    }
}

fn get_tokens(
    c: &mut Cursor<'_>,
    t: usize,
    vocab: usize,
    input_ids: &mut Vec<i32>,
    labels: &mut Vec<i32>,
) -> Result<()> {
    c.planes_i32(t, "input_ids", input_ids)?;
    if let Some(&bad) = input_ids.iter().find(|&&w| w as u32 as usize >= vocab) {
        return Err(Error::corrupt(format!(
            "decoded token id {} is outside the vocabulary",
            bad as u32
        )));
    }
    let mask = c.take(t.div_ceil(8), "the supervision mask")?;
    labels.clear();
    labels.extend(input_ids.iter().enumerate().map(|(i, &x)| {
        if mask[i / 8] >> (i % 8) & 1 == 1 {
            x
        } else {
            IGNORE_INDEX
        }
    }));
    let n_exc = c.count("label exception count", t)?;
    for _ in 0..n_exc {
        let pos = c.count("label exception position", t.saturating_sub(1))?;
        let v = u32::from_le_bytes(c.take(4, "a label exception")?.try_into().unwrap());
        if labels[pos] == IGNORE_INDEX || v as usize >= vocab {
            return Err(Error::corrupt(
                "a label exception is at an unsupervised position or outside the vocabulary",
            ));
        }
        labels[pos] = v as i32;
    }
    Ok(())
}
