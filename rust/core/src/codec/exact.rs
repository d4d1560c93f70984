//! The exact codec: rows stored as float32/int32 bit patterns in byte planes; decodes
//! bit-for-bit (docs/FORMAT.md §Exact rows).

use super::bytes::{put_planes_u32, Cursor};
use super::{Codec, RowSink};
use crate::error::{Error, Result};
use crate::record::Record;

pub(super) fn encode_rows(raw: &mut Vec<u8>, rec: &Record) {
    put_planes_u32(raw, rec.topk_ids.iter().map(|&x| x as u32));
    put_planes_u32(raw, rec.topk_logprobs.iter().map(|x| x.to_bits()));
    put_planes_u32(raw, rec.label_logprobs.iter().map(|x| x.to_bits()));
    put_planes_u32(raw, rec.label_ranks.iter().map(|&x| x as u32));
}

/// Decode the first `rows` of the `s` rows into `sink` (all four plane arrays are consumed).
pub(super) fn decode_rows<S: RowSink>(
    codec: &Codec,
    c: &mut Cursor<'_>,
    s: usize,
    rows: usize,
    sink: &mut S,
) -> Result<()> {
    let k = codec.top_k;
    let n = s * k;
    let ids = c.planes(n, "topk_ids")?;
    let lps = c.planes(n, "topk_logprobs")?;
    let label_lps = c.planes(s, "label_logprobs")?;
    let label_ranks = c.planes(s, "label_ranks")?;
    let v = codec.vocab_size as i64;
    for r in 0..rows {
        let (_, row_ids, _) = sink.row(r);
        ids.map_into(r * k, row_ids, |x| x as i32);
        if row_ids.iter().any(|&x| {
            let id = i64::from(x);
            (id < 0 && id != -1) || id >= v
        }) {
            return Err(Error::corrupt(
                "a decoded top-k id is outside the vocabulary",
            ));
        }
    }
    for r in 0..rows {
        let (_, _, row_lps) = sink.row(r);
        lps.map_into(r * k, row_lps, f32::from_bits);
    }
    for r in 0..rows {
        sink.label(
            r,
            f32::from_bits(label_lps.get(r)),
            label_ranks.get(r) as i32,
        );
    }
    Ok(())
}
