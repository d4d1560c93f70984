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

use crate::error::{Error, Result};
use crate::record::{Key, Record, IGNORE_INDEX};
use bytes::{put_planes_u32, put_varint, Cursor};
pub use codebook::{Codebook, CodebookParams};
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
    /// Compact only.
    pub codebook: Option<Codebook>,
    /// Compact only.
    pub ids: Option<IdTable>,
}

/// Reusable buffers of one encoding thread.
#[derive(Default)]
pub struct EncodeScratch {
    raw: Vec<u8>,
    zstd: Option<(i32, zstd::bulk::Compressor<'static>)>,
    compact: compact::EncodeScratch,
}

thread_local! {
    static DCTX: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    static RAW: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl Codec {
    pub fn exact(top_k: usize, vocab_size: usize, zstd_level: i32) -> Self {
        Self {
            kind: CodecKind::Exact,
            top_k,
            vocab_size,
            zstd_level,
            codebook: None,
            ids: None,
        }
    }

    pub fn compact(
        top_k: usize,
        vocab_size: usize,
        zstd_level: i32,
        codebook: Codebook,
        ids: IdTable,
    ) -> Self {
        Self {
            kind: CodecKind::Compact,
            top_k,
            vocab_size,
            zstd_level,
            codebook: Some(codebook),
            ids: Some(ids),
        }
    }

    /// Encode a validated record into one zstd frame.
    pub fn encode(&self, rec: &Record, scratch: &mut EncodeScratch) -> Result<Vec<u8>> {
        let raw = &mut scratch.raw;
        raw.clear();
        put_varint(raw, rec.n_tokens() as u64);
        put_varint(raw, rec.n_supervised() as u64);
        put_tokens(raw, &rec.input_ids, &rec.labels);
        match self.kind {
            CodecKind::Exact => exact::encode_rows(raw, rec),
            CodecKind::Compact => compact::encode_rows(self, raw, rec, &mut scratch.compact)?,
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
    fn max_raw_size(&self, n_tokens: usize, n_sup: usize) -> usize {
        n_tokens
            .saturating_mul(14)
            .saturating_add(n_sup.saturating_mul(self.top_k * 24 + 48))
            .saturating_add(64)
    }

    /// Decode one frame. `n_tokens`/`n_sup` come from the shard index and are cross-checked.
    pub fn decode(&self, frame: &[u8], key: Key, n_tokens: usize, n_sup: usize) -> Result<Record> {
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
        DCTX.with(|d| {
            RAW.with(|r| {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = Some(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| Error::corrupt(format!("zstd: {e}")))?,
                    );
                }
                let mut raw = r.borrow_mut();
                raw.clear();
                raw.reserve(size);
                let got = d
                    .as_mut()
                    .unwrap()
                    .decompress_to_buffer(frame, &mut *raw)
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
                self.decode_raw(&raw, key, n_tokens, n_sup)
            })
        })
    }

    fn decode_raw(&self, raw: &[u8], key: Key, n_tokens: usize, n_sup: usize) -> Result<Record> {
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
        let (input_ids, labels) = get_tokens(&mut c, t, self.vocab_size)?;
        let sup = crate::record::count_supervised(&labels);
        if sup != s {
            return Err(Error::corrupt(format!(
                "labels mark {sup} supervised positions but the frame has {s} rows"
            )));
        }
        let mut rec = Record {
            key,
            input_ids,
            labels,
            topk_ids: Vec::new(),
            topk_logprobs: Vec::new(),
            label_logprobs: Vec::new(),
            label_ranks: Vec::new(),
        };
        match self.kind {
            CodecKind::Exact => exact::decode_rows(self, &mut c, &mut rec, s)?,
            CodecKind::Compact => compact::decode_rows(self, &mut c, &mut rec, s)?,
        }
        if !c.is_empty() {
            return Err(Error::corrupt(
                "frame has bytes left over after the last section",
            ));
        }
        Ok(rec)
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

fn get_tokens(c: &mut Cursor<'_>, t: usize, vocab: usize) -> Result<(Vec<i32>, Vec<i32>)> {
    let mut words = Vec::new();
    c.planes_u32(t, "input_ids", &mut words)?;
    if let Some(&bad) = words.iter().find(|&&w| w as usize >= vocab) {
        return Err(Error::corrupt(format!(
            "decoded token id {bad} is outside the vocabulary"
        )));
    }
    let input_ids: Vec<i32> = words.iter().map(|&w| w as i32).collect();
    let mask = c.take(t.div_ceil(8), "the supervision mask")?;
    let mut labels: Vec<i32> = (0..t)
        .map(|i| {
            if mask[i / 8] >> (i % 8) & 1 == 1 {
                input_ids[i]
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
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
    Ok((input_ids, labels))
}
