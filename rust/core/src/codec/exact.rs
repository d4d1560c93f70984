//! The exact codec: rows stored as float32/int32 bit patterns in byte planes; decodes
//! bit-for-bit (docs/FORMAT.md §Exact rows).

use super::bytes::{put_planes_u32, Cursor};
use super::Codec;
use crate::error::{Error, Result};
use crate::record::Record;

pub(super) fn encode_rows(raw: &mut Vec<u8>, rec: &Record) {
    put_planes_u32(raw, rec.topk_ids.iter().map(|&x| x as u32));
    put_planes_u32(raw, rec.topk_logprobs.iter().map(|x| x.to_bits()));
    put_planes_u32(raw, rec.label_logprobs.iter().map(|x| x.to_bits()));
    put_planes_u32(raw, rec.label_ranks.iter().map(|&x| x as u32));
}

pub(super) fn decode_rows(
    codec: &Codec,
    c: &mut Cursor<'_>,
    rec: &mut Record,
    s: usize,
) -> Result<()> {
    let n = s * codec.top_k;
    let mut w = Vec::new();
    c.planes_u32(n, "topk_ids", &mut w)?;
    let v = codec.vocab_size as i64;
    if w.iter().any(|&x| {
        let id = i64::from(x as i32);
        (id < 0 && id != -1) || id >= v
    }) {
        return Err(Error::corrupt(
            "a decoded top-k id is outside the vocabulary",
        ));
    }
    rec.topk_ids = w.iter().map(|&x| x as i32).collect();
    c.planes_u32(n, "topk_logprobs", &mut w)?;
    rec.topk_logprobs = w.iter().map(|&x| f32::from_bits(x)).collect();
    c.planes_u32(s, "label_logprobs", &mut w)?;
    rec.label_logprobs = w.iter().map(|&x| f32::from_bits(x)).collect();
    c.planes_u32(s, "label_ranks", &mut w)?;
    rec.label_ranks = w.iter().map(|&x| x as i32).collect();
    Ok(())
}
