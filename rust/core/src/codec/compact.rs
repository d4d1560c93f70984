//! The compact codec (docs/FORMAT.md §Compact rows).
//!
//! Per row, the entries are sorted by (codebook index, id rank): log-probs descending, ties by
//! the id's rank in the shard's id table (a token-frequency prior: frequent ids have small
//! ranks). Values are coded as the first index plus non-negative increments; ids as ranks, the
//! first of each run of equal index absolute, the following ones as gaps. Ids are lossless;
//! values carry the codebook's documented error; escaped values are stored exactly.

use super::bytes::{put_stream, put_varint, Cursor, SmallReader, SmallWriter};
use super::Codec;
use crate::error::{Error, Result};
use crate::record::Record;

/// The id table of a shard: ids in decreasing order of frequency. Rank `r < M` is the id
/// `id_of_rank[r]`; any other id `x` has rank `M + x`.
pub struct IdTable {
    pub id_of_rank: Vec<u32>,
    rank_of_id: Vec<u32>,
}

impl IdTable {
    /// Build from the stored table of a shard (`M` distinct ids below `vocab_size`).
    pub fn from_stored(id_of_rank: Vec<u32>, vocab_size: usize) -> Result<Self> {
        let m = id_of_rank.len() as u32;
        let mut rank_of_id: Vec<u32> = (0..vocab_size as u32).map(|x| m + x).collect();
        for (r, &id) in id_of_rank.iter().enumerate() {
            let slot = rank_of_id
                .get_mut(id as usize)
                .ok_or_else(|| Error::corrupt(format!("id table entry {id} is outside the vocabulary")))?;
            if *slot != m + id {
                return Err(Error::corrupt(format!("id table lists id {id} twice")));
            }
            *slot = r as u32;
        }
        Ok(Self { id_of_rank, rank_of_id })
    }

    /// Build from id frequency counts (`counts[id]`): every id seen at least once, most frequent
    /// first, ties by smaller id.
    pub fn from_counts(counts: &[u64]) -> Self {
        let mut seen: Vec<u32> = (0..counts.len() as u32).filter(|&i| counts[i as usize] > 0).collect();
        seen.sort_unstable_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
        Self::from_stored(seen, counts.len()).expect("ids from counts are distinct and in range")
    }

    #[inline]
    pub fn rank(&self, id: u32) -> u32 {
        self.rank_of_id[id as usize]
    }

    #[inline]
    pub fn id(&self, rank: u64) -> Option<u32> {
        let m = self.id_of_rank.len() as u64;
        if rank < m {
            Some(self.id_of_rank[rank as usize])
        } else {
            let id = rank - m;
            (id < self.rank_of_id.len() as u64).then_some(id as u32)
        }
    }
}

#[derive(Default)]
pub(super) struct EncodeScratch {
    nvalid: Vec<u8>,
    vfirst_lo: Vec<u8>,
    vfirst_hi: Vec<u8>,
    vinc: SmallWriter,
    rank: SmallWriter,
    label_pos: Vec<u8>,
    label_val: Vec<u8>,
    label_rank: Vec<u8>,
    exact_values: Vec<u8>,
    entries: Vec<u64>,
}

pub(super) fn encode_rows(codec: &Codec, raw: &mut Vec<u8>, rec: &Record, s: &mut EncodeScratch) -> Result<()> {
    let cb = codec.codebook.as_ref().expect("compact codec has a codebook");
    let table = codec.ids.as_ref().expect("compact codec has an id table");
    let k = codec.top_k;
    let esc = cb.escape();
    s.nvalid.clear();
    s.vfirst_lo.clear();
    s.vfirst_hi.clear();
    s.vinc.clear();
    s.rank.clear();
    s.label_pos.clear();
    s.label_val.clear();
    s.label_rank.clear();
    s.exact_values.clear();
    let mut full = true;
    let mut sup_t = rec.labels.iter().enumerate().skip(1).filter(|(_, &l)| l != crate::record::IGNORE_INDEX);
    for r in 0..rec.n_supervised() {
        let ids = &rec.topk_ids[r * k..(r + 1) * k];
        let lps = &rec.topk_logprobs[r * k..(r + 1) * k];
        let n = ids.iter().position(|&x| x == -1).unwrap_or(k);
        full &= n == k;
        put_varint(&mut s.nvalid, n as u64);
        s.entries.clear();
        for j in 0..n {
            let q = cb.quantize(lps[j]);
            let rank = table.rank(ids[j] as u32);
            // low 32 bits: position j (to find the exact value of escaped entries)
            s.entries.push((u64::from(q) << 42) | (u64::from(rank) << 10) | j as u64);
        }
        s.entries.sort_unstable();
        let label = rec.labels[sup_t.next().expect("rows match supervised positions").0];
        let label_rank = table.rank(label as u32);
        let mut label_pos = 0u64;
        let mut prev_q = u32::MAX;
        let mut prev_rank = 0u64;
        for (i, &e) in s.entries.iter().enumerate() {
            let q = (e >> 42) as u32;
            let rank = (e >> 10) & 0xffff_ffff;
            let j = (e & 0x3ff) as usize;
            if i == 0 {
                s.vfirst_lo.push(q as u8);
                s.vfirst_hi.push((q >> 8) as u8);
            } else {
                s.vinc.put(u64::from(q - prev_q));
            }
            if q == prev_q {
                s.rank.put(rank - prev_rank - 1);
            } else {
                s.rank.put(rank);
            }
            if q == esc {
                s.exact_values.extend_from_slice(&lps[j].to_le_bytes());
            }
            if rank == u64::from(label_rank) {
                label_pos = i as u64 + 1;
            }
            prev_q = q;
            prev_rank = rank;
        }
        put_varint(&mut s.label_pos, label_pos);
        if label_pos == 0 {
            let q = cb.quantize(rec.label_logprobs[r]);
            put_varint(&mut s.label_val, u64::from(q));
            if q == esc {
                s.exact_values.extend_from_slice(&rec.label_logprobs[r].to_le_bytes());
            }
        }
        put_varint(&mut s.label_rank, rec.label_ranks[r] as u64);
    }
    raw.push(u8::from(full));
    put_stream(raw, if full { &[] } else { &s.nvalid });
    for stream in [
        &s.vfirst_lo,
        &s.vfirst_hi,
        &s.vinc.bytes,
        &s.vinc.escapes,
        &s.rank.bytes,
        &s.rank.escapes,
        &s.label_pos,
        &s.label_val,
        &s.label_rank,
        &s.exact_values,
    ] {
        put_stream(raw, stream);
    }
    Ok(())
}

pub(super) fn decode_rows(codec: &Codec, c: &mut Cursor<'_>, rec: &mut Record, s: usize) -> Result<()> {
    let cb = codec.codebook.as_ref().expect("compact codec has a codebook");
    let table = codec.ids.as_ref().expect("compact codec has an id table");
    let k = codec.top_k;
    let esc = cb.escape();
    let full = match c.take(1, "the row flags")?[0] {
        0 => false,
        1 => true,
        f => return Err(Error::corrupt(format!("unknown row flags {f}"))),
    };
    let mut nvalid = Cursor::new(c.stream("nvalid")?);
    let vfirst_lo = c.stream("vfirst_lo")?;
    let vfirst_hi = c.stream("vfirst_hi")?;
    let vinc_b = c.stream("vinc")?;
    let vinc_e = c.stream("vinc escapes")?;
    let rank_b = c.stream("ranks")?;
    let rank_e = c.stream("rank escapes")?;
    let mut label_pos = Cursor::new(c.stream("label_pos")?);
    let mut label_val = Cursor::new(c.stream("label_val")?);
    let mut label_rank = Cursor::new(c.stream("label_rank")?);
    let mut exact = Cursor::new(c.stream("exact values")?);
    let mut vinc = SmallReader::new(vinc_b, vinc_e, "vinc");
    let mut ranks = SmallReader::new(rank_b, rank_e, "ranks");
    let mut ids = vec![-1i32; s * k];
    let mut lps = vec![f32::NEG_INFINITY; s * k];
    let mut label_lps = Vec::with_capacity(s);
    let mut label_ranks = Vec::with_capacity(s);
    let levels = &cb.levels;
    let mut first = 0usize;
    let value = |q: u64, exact: &mut Cursor<'_>| -> Result<f32> {
        if q < u64::from(esc) {
            Ok(levels[q as usize])
        } else if q == u64::from(esc) {
            Ok(f32::from_le_bytes(exact.take(4, "exact values")?.try_into().unwrap()))
        } else {
            Err(Error::corrupt(format!("codebook index {q} is past the escape index {esc}")))
        }
    };
    for r in 0..s {
        let n = if full { k } else { nvalid.count("nvalid", k)? };
        let row_ids = &mut ids[r * k..r * k + n];
        let row_lps = &mut lps[r * k..r * k + n];
        let mut q = 0u64;
        let mut rank = 0u64;
        for i in 0..n {
            let prev_q = q;
            if i == 0 {
                let (lo, hi) = match (vfirst_lo.get(first), vfirst_hi.get(first)) {
                    (Some(&lo), Some(&hi)) => (lo, hi),
                    _ => return Err(Error::corrupt("frame ends inside vfirst")),
                };
                first += 1;
                q = u64::from(lo) | (u64::from(hi) << 8);
            } else {
                q += vinc.get()?;
            }
            rank = if i > 0 && q == prev_q { rank + 1 + ranks.get()? } else { ranks.get()? };
            row_ids[i] = table
                .id(rank)
                .ok_or_else(|| Error::corrupt(format!("id rank {rank} is outside the vocabulary")))?
                as i32;
            row_lps[i] = value(q, &mut exact)?;
        }
        let pos = label_pos.count("label_pos", n)?;
        label_lps.push(if pos > 0 {
            lps[r * k + pos - 1]
        } else {
            value(label_val.varint()?, &mut exact)?
        });
        label_ranks.push(
            i32::try_from(label_rank.varint()?).map_err(|_| Error::corrupt("label rank overflows int32"))?,
        );
    }
    if first != vfirst_lo.len()
        || first != vfirst_hi.len()
        || !vinc.finished()
        || !ranks.finished()
        || !nvalid.is_empty()
        || !label_pos.is_empty()
        || !label_val.is_empty()
        || !label_rank.is_empty()
        || !exact.is_empty()
    {
        return Err(Error::corrupt("a compact stream has bytes left over"));
    }
    rec.topk_ids = ids;
    rec.topk_logprobs = lps;
    rec.label_logprobs = label_lps;
    rec.label_ranks = label_ranks;
    Ok(())
}
