//! The compact codec (docs/FORMAT.md §Compact rows).
//!
//! A row's ids are coded against what the decoder already knows: a flag says whether the label
//! (known from the tokens section) is in the row; a bitmask says which ids of the previous row
//! recur (neighbouring positions share much of their tails); the remaining ids are one sorted
//! set of ranks in the shard's id table (a token-frequency prior: frequent ids have small ranks),
//! coded as the first rank then gaps (a set costs about log2(n!) bits less than a sequence).
//! Each entry's value follows as a codebook index, in decoded order: label, shared ids (in the
//! previous row's order), new ids (by rank). Ids are lossless; values carry the codebook's
//! documented error; escaped values are stored exactly.

use super::bytes::{put_stream, put_varint, Cursor, NumReader, NumWriter};
use super::{Codec, RowSink};
use crate::error::{Error, Result};
use crate::record::{supervised_labels, Record};

/// The id table of a shard: ids in decreasing order of frequency. Rank `r < M` is the id
/// `id_of_rank[r]`; any other id `x` has rank `M + x`.
pub struct IdTable {
    pub id_of_rank: Vec<u32>,
    /// Encoder side (tables of at most 65,534 ids): rank, or `u16::MAX` for ids not listed.
    rank_of_id: Vec<u16>,
    vocab_size: usize,
    /// Unique per table built (encoders cache a per-thread copy of the ranks keyed by it).
    uid: u64,
}

/// Source of [`IdTable`] uids.
static NEXT_TABLE_UID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_uid() -> u64 {
    NEXT_TABLE_UID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl IdTable {
    /// Build from the stored table of a shard (`M` distinct ids below `vocab_size`). Readers
    /// need only `id_of_rank`; duplicates are found with a bitset.
    pub fn from_stored(id_of_rank: Vec<u32>, vocab_size: usize) -> Result<Self> {
        // sorted copy rather than a vocabulary-sized bitset: memory bounded by the table read
        let mut sorted = id_of_rank.clone();
        sorted.sort_unstable();
        if let Some(&id) = sorted.last().filter(|&&id| id as usize >= vocab_size) {
            return Err(Error::corrupt(format!(
                "id table entry {id} is outside the vocabulary"
            )));
        }
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::corrupt(format!("id table lists id {} twice", w[0])));
        }
        Ok(Self {
            id_of_rank,
            rank_of_id: Vec::new(),
            vocab_size,
            uid: next_uid(),
        })
    }

    /// Build from id frequency counts (`counts[id]`): the `max_len` (<= 65,534) most frequent ids
    /// seen at least twice, most frequent first, ties by smaller id. The cap keeps the table
    /// (read for every decoded entry) resident in the CPU cache.
    pub fn from_counts(counts: &[u64], max_len: usize) -> Self {
        let mut seen: Vec<u32> = (0..counts.len() as u32)
            .filter(|&i| counts[i as usize] > 1)
            .collect();
        seen.sort_unstable_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
        seen.truncate(max_len.min(u16::MAX as usize - 1));
        let mut rank_of_id = vec![u16::MAX; counts.len()];
        for (r, &id) in seen.iter().enumerate() {
            rank_of_id[id as usize] = r as u16;
        }
        Self {
            id_of_rank: seen,
            rank_of_id,
            vocab_size: counts.len(),
            uid: next_uid(),
        }
    }

    /// Rank of a valid id (tables built by [`IdTable::from_counts`] only).
    #[inline]
    pub fn rank(&self, id: u32) -> u32 {
        match self.rank_of_id[id as usize] {
            u16::MAX => self.id_of_rank.len() as u32 + id,
            r => u32::from(r),
        }
    }

    #[inline(always)]
    pub fn id(&self, rank: u64) -> Option<u32> {
        let m = self.id_of_rank.len() as u64;
        if rank < m {
            Some(self.id_of_rank[rank as usize])
        } else {
            let id = rank - m;
            (id < self.vocab_size as u64).then_some(id as u32)
        }
    }
}

/// The compact codec's id table and k.
fn parts(codec: &Codec) -> (&IdTable, usize) {
    let table = codec.ids.as_ref().expect("compact codec has an id table");
    (table, codec.top_k)
}

/// A row's kept mass (`Σ exp` of its log-probs) and its codec KL at the rung its record was
/// encoded with, measured by the encoder.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RowCost {
    pub mass: f64,
    pub kl: f64,
}

#[derive(Default)]
pub(super) struct EncodeScratch {
    nvalid: Vec<u8>,
    row_flags: Vec<u8>,
    share_mask: Vec<u8>,
    rank: NumWriter,
    value: NumWriter,
    label_value: NumWriter,
    label_rank: Vec<u8>,
    exact_values: Vec<u8>,
    /// Per id: the low 32 bits are its stamp (`>> 8 == gen` marks the current row's ids; the
    /// low 8 bits hold the column), the high 32 bits its rank in the id table `slots_uid` (one
    /// random access per id for both).
    slots: Vec<u64>,
    slots_uid: u64,
    gen: u32,
    new_ranks: Vec<u64>,
    /// The previous row in decoded order (ids) and the current one being built.
    prev: Vec<i32>,
    cur: Vec<i32>,
    /// `exp` of every entry's log-prob (row-major, `k` per row; 0 past a row's entries).
    exps: Vec<f64>,
    /// Per row (stride `k`): the input column of each entry, in decoded order.
    order: Vec<u8>,
    /// Per row: its valid entries (those before the first padding id).
    counts: Vec<u16>,
    /// Each entry's codebook index (stride `k`, input columns) at the finest rung measured so
    /// far and at the next coarser one, with the rows' costs there.
    q_fine: Vec<u16>,
    q_coarse: Vec<u16>,
    fine_costs: Vec<RowCost>,
    coarse_costs: Vec<RowCost>,
    /// Per row, its mass and KL at `rung` (the last rung measured).
    pub(super) costs: Vec<RowCost>,
    pub(super) rungs: Rungs,
}

/// Small-number code of a codebook index: `L − q` (so the many tail levels are small numbers and
/// the escape index `L` is 0).
#[inline]
fn value_code(q: u32, esc: u32) -> u64 {
    u64::from(esc - q)
}

/// The stamp half of an encoder slot (see `EncodeScratch::slots`).
const STAMP_BITS: u64 = 0xffff_ffff;

#[inline(always)]
fn set_stamp(slots: &mut [u64], id: i32, stamp: u32) {
    let v = &mut slots[id as usize];
    *v = (*v & !STAMP_BITS) | u64::from(stamp);
}

/// Hint the CPU to load `slots[id]` (a no-op for ids outside the slots, e.g. padding).
#[inline(always)]
fn prefetch(slots: &[u64], id: i32) {
    #[cfg(target_arch = "x86_64")]
    if let Some(v) = slots.get(id as usize) {
        // SAFETY: prefetching has no observable effect besides the cache; the address is valid.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                (v as *const u64).cast::<i8>(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (slots, id);
}

/// Valid entries of a row: those before the first padding id.
#[inline]
fn valid(ids: &[i32]) -> usize {
    ids.iter().position(|&x| x == -1).unwrap_or(ids.len())
}

/// Mean KL per row of every `stride`-th row of `rec` under codebook `cb` (the exps are in
/// `s.exps`): a cheap estimate of the record's KL at that codebook.
fn sample_kl(
    cb: &super::Codebook,
    rec: &Record,
    k: usize,
    s: &EncodeScratch,
    stride: usize,
) -> f64 {
    let (mut sum, mut rows) = (0.0, 0usize);
    for r in (0..rec.n_supervised()).step_by(stride) {
        let n = usize::from(s.counts[r]);
        let mut acc = RowKl::default();
        for (&a, &ea) in rec.topk_logprobs[r * k..r * k + n]
            .iter()
            .zip(&s.exps[r * k..r * k + n])
        {
            if a != f32::NEG_INFINITY {
                acc.push(cb, a, ea);
            }
        }
        sum += acc.kl();
        rows += 1;
    }
    if rows == 0 {
        0.0
    } else {
        sum / rows as f64
    }
}

/// The codebook rung to try first (docs/FORMAT.md §5.1): rung 0 of a fixed ladder; with a
/// budget, the coarsest rung whose KL over a sample of about 32 of the record's rows (every
/// `stride`-th) is within it: from the start rung, the `KL ∝ step²` law gives a first guess, then
/// the sample is walked one rung at a time to where it crosses the budget (the KL does not follow
/// the law exactly: the log-space tail and entries near probability 1 jump between rungs).
fn predict_rung(codec: &Codec, rec: &Record, s: &EncodeScratch) -> Result<usize> {
    let ladder = codec.ladder.as_ref().expect("compact codec has a ladder");
    let Some(budget) = ladder.max_mean_kl else {
        return Ok(0);
    };
    let (k, last) = (codec.top_k, ladder.rungs() - 1);
    let stride = (rec.n_supervised() / 32).max(1);
    let sample = |j: usize| -> Result<f64> { Ok(sample_kl(codec.codebook(j)?, rec, k, s, stride)) };
    let j0 = ladder.start_rung();
    let kl0 = sample(j0)?;
    if kl0 <= 0.0 {
        return Ok(last);
    }
    // KL ∝ step² and the step grows 2^(1/16) per rung: 8 rungs per doubling of the KL
    let mut j = (j0 as f64 + 8.0 * (budget / kl0).log2())
        .floor()
        .clamp(0.0, last as f64) as usize;
    if sample(j)? > budget {
        while j > 0 {
            j -= 1;
            if sample(j)? <= budget {
                break;
            }
        }
    } else {
        while j < last && sample(j + 1)? <= budget {
            j += 1;
        }
    }
    Ok(j)
}

/// The ids of every row (rung-independent): `nvalid`, `row_flags`, `share_mask`, the rank
/// numbers and `label_rank`; `s.order` keeps, per row (stride `k`), the input column of each
/// entry in decoded order, which the values pass follows. Returns whether every row is full.
fn ids_pass(codec: &Codec, rec: &Record, s: &mut EncodeScratch) -> bool {
    let (table, k) = parts(codec);
    for v in [
        &mut s.nvalid,
        &mut s.row_flags,
        &mut s.share_mask,
        &mut s.label_rank,
    ] {
        v.clear();
    }
    s.rank.clear();
    s.prev.clear();
    s.order.clear();
    s.order.resize(rec.topk_ids.len(), 0);
    if s.slots_uid != table.uid {
        s.slots = (0..codec.vocab_size as u32)
            .map(|id| u64::from(table.rank(id)) << 32)
            .collect();
        s.slots_uid = table.uid;
        s.gen = 0;
    }

    let mut full = true;
    let mut row_labels = supervised_labels(&rec.labels);
    for r in 0..rec.n_supervised() {
        let ids = &rec.topk_ids[r * k..(r + 1) * k];
        let n = usize::from(s.counts[r]);
        full &= n == k;
        put_varint(&mut s.nvalid, n as u64);
        // `stamp[id] = gen << 8 | column` marks the current row's ids (one random access per id;
        // k <= 256); a placed id is marked `(gen - 1) << 8`. Generations wrap at 2^24.
        s.gen += 1;
        if s.gen >= 1 << 24 {
            s.slots.iter_mut().for_each(|x| *x &= !STAMP_BITS);
            s.gen = 2;
        }
        let gen = s.gen;
        // the next row's slots are mostly cold (new ids): fetch them while this row is coded
        if let Some(next) = rec.topk_ids.get((r + 1) * k..(r + 2) * k) {
            for &id in next {
                prefetch(&s.slots, id);
            }
        }
        for (j, &id) in ids[..n].iter().enumerate() {
            set_stamp(&mut s.slots, id, (gen << 8) | j as u32);
        }
        let label = row_labels.next().expect("rows match supervised positions");
        let label_st = s.slots[label as usize] as u32;
        let label_in = label_st >> 8 == gen;
        s.row_flags.push(u8::from(label_in));
        // Decoded order: the label (if present), the shared ids in the previous row's order,
        // then the new ids by rank; `cols` keeps each placed entry's input column.
        s.cur.clear();
        let cols = &mut s.order[r * k..(r + 1) * k];
        let mut placed = 0usize;
        if label_in {
            s.cur.push(label);
            cols[0] = label_st as u8;
            placed = 1;
            set_stamp(&mut s.slots, label, (gen - 1) << 8);
        }
        let mut byte = 0u8;
        for (j, &id) in s.prev.iter().enumerate() {
            let st = s.slots[id as usize] as u32;
            if st >> 8 == gen {
                byte |= 1 << (j % 8);
                s.cur.push(id);
                cols[placed] = st as u8;
                placed += 1;
                set_stamp(&mut s.slots, id, (gen - 1) << 8);
            }
            if j % 8 == 7 || j + 1 == s.prev.len() {
                s.share_mask.push(byte);
                byte = 0;
            }
        }
        s.new_ranks.clear();
        for (j, &id) in ids[..n].iter().enumerate() {
            let v = s.slots[id as usize];
            if (v as u32) >> 8 == gen {
                s.new_ranks.push(((v >> 32) << 8) | j as u64);
            }
        }
        s.new_ranks.sort_unstable();
        let mut prev_rank = 0u64;
        for (i, &e) in s.new_ranks.iter().enumerate() {
            let (rank, j) = (e >> 8, (e & 0xff) as usize);
            s.rank.put(if i == 0 { rank } else { rank - prev_rank - 1 });
            prev_rank = rank;
            s.cur.push(ids[j]);
            cols[placed] = j as u8;
            placed += 1;
        }
        put_varint(&mut s.label_rank, rec.label_ranks[r] as u64);
        std::mem::swap(&mut s.prev, &mut s.cur);
    }
    s.rank.finish();
    full
}

/// The values of every row, in decoded order (`s.order`), from the codebook indices the KL
/// passes stored: rows `r < split` take `q_coarse` (codebook `cbs.0`), the others `q_fine`
/// (`cbs.1`); per row the label's index, then the other entries' codes, escaped values stored
/// exactly. The rows' costs go to `s.costs` (from the passes: nothing is quantised twice);
/// returns their sum, in row order.
fn values_pass(
    cbs: (&super::Codebook, &super::Codebook),
    split: usize,
    rec: &Record,
    k: usize,
    s: &mut EncodeScratch,
) -> f64 {
    s.value.clear();
    s.label_value.clear();
    s.exact_values.clear();
    s.costs.clear();
    let mut sum = 0.0;
    for r in 0..rec.n_supervised() {
        let (cb, qs, cost) = if r < split {
            (cbs.0, &s.q_coarse, s.coarse_costs[r])
        } else {
            (cbs.1, &s.q_fine, s.fine_costs[r])
        };
        let esc = cb.escape();
        let lps = &rec.topk_logprobs[r * k..(r + 1) * k];
        let qs = &qs[r * k..(r + 1) * k];
        let order = &s.order[r * k..(r + 1) * k];
        let n = usize::from(s.counts[r]);
        let label_in = s.row_flags[r] == 1;
        // the label's value (index q: small for likely labels), then the other entries' (L - q)
        let (label_lp, q) = if label_in {
            let j = usize::from(order[0]);
            (lps[j], u32::from(qs[j]))
        } else {
            let lp = rec.label_logprobs[r];
            (lp, cb.quantize(lp))
        };
        s.label_value.put(u64::from(q));
        if q == esc {
            s.exact_values.extend_from_slice(&label_lp.to_le_bytes());
        }
        for &j in &order[usize::from(label_in)..n] {
            let q = u32::from(qs[usize::from(j)]);
            s.value.put(value_code(q, esc));
            if q == esc {
                s.exact_values
                    .extend_from_slice(&lps[usize::from(j)].to_le_bytes());
            }
        }
        sum += cost.kl;
        s.costs.push(cost);
    }
    s.value.finish();
    s.label_value.finish();
    sum
}

/// Each row's kept mass and KL with codebook `cb` into `out`, each entry's codebook index into
/// `qs` (stride `k`, input columns; nothing coded); returns the sum of the rows' KLs.
fn kl_pass(
    cb: &super::Codebook,
    rec: &Record,
    k: usize,
    (exps, counts): (&[f64], &[u16]),
    out: &mut Vec<RowCost>,
    qs: &mut Vec<u16>,
) -> f64 {
    out.clear();
    qs.resize(rec.topk_logprobs.len(), 0);
    let mut sum = 0.0;
    for r in 0..rec.n_supervised() {
        let lps = &rec.topk_logprobs[r * k..(r + 1) * k];
        let exps = &exps[r * k..(r + 1) * k];
        let row_qs = &mut qs[r * k..(r + 1) * k];
        let n = usize::from(counts[r]);
        let mut acc = RowKl::default();
        for ((&a, &ea), q_out) in lps[..n].iter().zip(&exps[..n]).zip(&mut row_qs[..n]) {
            let q = cb.quantize(a);
            // L <= 65,000 (codebook.rs), so the escape index fits 16 bits
            *q_out = q as u16;
            acc.push_index(cb, q, a, ea);
        }
        let kl = acc.kl();
        sum += kl;
        out.push(RowCost { mass: acc.mass, kl });
    }
    sum
}

/// The codebooks of a record (docs/FORMAT.md §5.1): rows `r < split` use rung `a`, the others
/// rung `b`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rungs {
    pub a: u8,
    pub b: u8,
    pub split: usize,
}

/// Choose the record's rungs and leave its values, coded with them, in the value streams (and
/// their per-row costs in `s.costs`). A fixed ladder: rung 0. With a budget `B`: the coarsest
/// rung `f` whose mean KL over the record's rows is within `B` (from the predicted rung, one rung
/// finer while over, one rung coarser while the next still fits), then the longest prefix of
/// rows that can take the next coarser rung `f + 1` with the record's mean KL still within `B`.
fn choose_rungs(codec: &Codec, rec: &Record, s: &mut EncodeScratch) -> Result<Rungs> {
    let (k, rows) = (codec.top_k, rec.n_supervised());
    let ladder = codec.ladder.as_ref().expect("compact codec has a ladder");
    // one KL pass at a rung: its costs and indices into the `fine` or the `coarse` buffers
    fn pass(
        codec: &Codec,
        j: usize,
        rec: &Record,
        s: &mut EncodeScratch,
        coarse: bool,
    ) -> Result<f64> {
        let cb = codec.codebook(j)?;
        let (costs, qs) = if coarse {
            (&mut s.coarse_costs, &mut s.q_coarse)
        } else {
            (&mut s.fine_costs, &mut s.q_fine)
        };
        Ok(kl_pass(
            cb,
            rec,
            codec.top_k,
            (&s.exps, &s.counts),
            costs,
            qs,
        ))
    }
    fn swap(s: &mut EncodeScratch) {
        std::mem::swap(&mut s.fine_costs, &mut s.coarse_costs);
        std::mem::swap(&mut s.q_fine, &mut s.q_coarse);
    }
    let Some(budget) = ladder.max_mean_kl.filter(|_| rows > 0) else {
        // a fixed ladder: rung 0; no rows: name the start rung, which the shard's other
        // records likely use
        let j = if rows == 0 { ladder.start_rung() } else { 0 };
        pass(codec, j, rec, s, false)?;
        let cb = codec.codebook(j)?;
        values_pass((cb, cb), 0, rec, k, s);
        return Ok(Rungs {
            a: j as u8,
            b: j as u8,
            split: if rows == 0 { 0 } else { rows },
        });
    };
    let limit = budget * rows as f64;
    let last = ladder.rungs() - 1;
    let mut fine = predict_rung(codec, rec, s)?;
    let mut sum = pass(codec, fine, rec, s, false)?;
    let mut coarse = false;
    while sum > limit {
        if fine == 0 {
            return Err(Error::input(format!(
                "record {}: the finest compact codebook (sqrt_step {:.3e}) still costs a mean KL of {:.3e} nats per row, above max_mean_kl = {budget:.3e}; give a larger max_mean_kl, or codec=\"exact\" to store log-probs bit for bit",
                rec.key,
                ladder.sqrt_steps[0],
                sum / rows as f64
            )));
        }
        swap(s);
        coarse = true;
        fine -= 1;
        sum = pass(codec, fine, rec, s, false)?;
    }
    while !coarse && fine < last {
        if pass(codec, fine + 1, rec, s, true)? <= limit {
            fine += 1;
            swap(s);
        } else {
            coarse = true;
        }
    }
    // the longest prefix of rows at the coarser rung that keeps the sum within the limit
    let mut split = 0usize;
    if coarse {
        let mut total = sum_kl(&s.fine_costs);
        for r in 0..rows {
            total += s.coarse_costs[r].kl - s.fine_costs[r].kl;
            if total <= limit {
                split = r + 1;
            }
        }
        // float rounding can put the mixed sum, taken in row order, just over: fewer rows
        let mixed = |split: usize| -> f64 {
            let (c, f) = (&s.coarse_costs[..split], &s.fine_costs[split..]);
            c.iter().chain(f).map(|c| c.kl).sum()
        };
        while split > 0 && mixed(split) > limit {
            split -= 1;
        }
    }
    let a = if split > 0 { fine + 1 } else { fine };
    let (ca, cb) = (codec.codebook(a)?, codec.codebook(fine)?);
    values_pass((ca, cb), split, rec, k, s);
    Ok(Rungs {
        a: a as u8,
        b: fine as u8,
        split,
    })
}

fn sum_kl(costs: &[RowCost]) -> f64 {
    costs.iter().map(|c| c.kl).sum()
}

/// Append the rows section of `rec` to `raw`; the offsets where a zstd block should start are
/// appended to `cuts`.
pub(super) fn encode_rows(
    codec: &Codec,
    raw: &mut Vec<u8>,
    rec: &Record,
    s: &mut EncodeScratch,
    cuts: &mut Vec<usize>,
) -> Result<()> {
    let k = codec.top_k;
    // one exp per entry: the kept mass and the codec's KL
    s.exps.clear();
    s.exps.resize(rec.topk_logprobs.len(), 0.0);
    s.counts.clear();
    for (r, ids) in rec.topk_ids.chunks_exact(k).enumerate() {
        let n = valid(ids);
        s.counts.push(n as u16);
        for (e, &a) in s.exps[r * k..r * k + n]
            .iter_mut()
            .zip(&rec.topk_logprobs[r * k..r * k + n])
        {
            *e = f64::from(a).exp();
        }
    }
    let full = ids_pass(codec, rec, s);
    s.rungs = choose_rungs(codec, rec, s)?;
    if codec.rung_byte {
        raw.push(s.rungs.a);
        raw.push(s.rungs.b);
        put_varint(raw, s.rungs.split as u64);
    }
    raw.push(u8::from(full));
    put_stream(raw, if full { &[] } else { &s.nvalid });
    for stream in [
        &s.row_flags,
        &s.share_mask,
        &s.rank.symbols,
        &s.rank.bits,
        &s.value.symbols,
        &s.value.bits,
        &s.label_value.symbols,
        &s.label_value.bits,
        &s.label_rank,
        &s.exact_values,
    ] {
        // a large stream starts a zstd block of its own, so that it gets its own entropy
        // tables instead of sharing one with streams of another alphabet (docs/FORMAT.md §4;
        // 7% fewer bytes on the synthetic family, 5% on text-lm, benches/RESULTS.md)
        if stream.len() >= BLOCK_CUT_BYTES {
            cuts.push(raw.len());
        }
        put_stream(raw, stream);
    }
    Ok(())
}

/// Streams at least this long start a zstd block of their own.
pub(super) const BLOCK_CUT_BYTES: usize = 64;

/// What one row's quantisation costs: accumulates, entry by entry, the sums behind
/// `KL(exact ‖ decoded)` of the row's log-probs, both renormalised over the row.
#[derive(Default)]
pub struct RowKl {
    /// `Z = Σ e^a` over the exact log-probs `a` (the row's kept mass).
    pub mass: f64,
    cross: f64,
    diff: f64,
}

impl RowKl {
    /// Add one entry: its exact log-prob `a` (finite) and `ea = exp(a)` (the caller has it).
    #[inline]
    pub fn push(&mut self, cb: &super::Codebook, a: f32, ea: f64) {
        self.mass += ea;
        if let Some((b, eb)) = cb.decoded_exp(a) {
            self.cross += ea * (f64::from(a) - b);
            self.diff += eb - ea;
        }
    }

    /// Add one entry whose codebook index `q` the caller has (the escape index: exact).
    #[inline]
    pub fn push_index(&mut self, cb: &super::Codebook, q: u32, a: f32, ea: f64) {
        self.mass += ea;
        if let Some(&b) = cb.levels.get(q as usize) {
            self.cross += ea * (f64::from(a) - f64::from(b));
            self.diff += cb.exp_level(q as usize) - ea;
        }
    }

    /// `KL = Σ p̂·(a − b) + ln(1 + D/Z)` with `D = Σ (e^b − e^a)`: the ratio of the decoded to
    /// the exact normaliser, as `ln_1p` of the small difference (no cancellation); 0 for a row
    /// without mass.
    pub fn kl(&self) -> f64 {
        if self.mass <= 0.0 {
            return 0.0;
        }
        (self.cross / self.mass + (self.diff / self.mass).ln_1p()).max(0.0)
    }
}

/// `KL(exact ‖ decoded)` in nats of one row's log-probs `lps` (its non-padding entries), both
/// renormalised over the row: what the codebook's quantisation costs the row's distribution.
pub fn row_kl(cb: &super::Codebook, lps: &[f32]) -> f64 {
    let mut acc = RowKl::default();
    for &a in lps.iter().filter(|&&a| a != f32::NEG_INFINITY) {
        acc.push(cb, a, f64::from(a).exp());
    }
    acc.kl()
}

/// Decode the first `rows` of the `s` rows into `sink`. `labels` are the record's labels (the
/// label of row `r` is the `r`-th supervised one). With `rows < s` decoding stops after row
/// `rows - 1` and the streams' left-over check is skipped.
pub(super) fn decode_rows<S: RowSink>(
    codec: &Codec,
    c: &mut Cursor<'_>,
    labels: &[i32],
    s: usize,
    rows: usize,
    sink: &mut S,
) -> Result<()> {
    let (table, k) = parts(codec);
    // the record's codebooks: rows r < split use `cb_a`, the others `cb_b` (§5.1)
    let (cb_a, cb_b, split) = if codec.rung_byte {
        let ab = c.take(2, "the codebook rungs")?;
        let (a, b) = (usize::from(ab[0]), usize::from(ab[1]));
        let split = c.count("the rung split", s)?;
        (codec.codebook(a)?, codec.codebook(b)?, split)
    } else {
        let cb = codec.codebook(0)?;
        (cb, cb, s)
    };
    let full = match c.take(1, "the row flags")?[0] {
        0 => false,
        1 => true,
        f => return Err(Error::corrupt(format!("unknown row flags {f}"))),
    };
    let mut nvalid = Cursor::new(c.stream("nvalid")?);
    let row_flags = c.stream("row_flags")?;
    let share_mask = c.stream("share_mask")?;
    let mut ranks = NumReader::new(c.stream("ranks")?, c.stream("rank bits")?, "ranks");
    let mut values = NumReader::new(c.stream("values")?, c.stream("value bits")?, "values");
    let mut label_values = NumReader::new(
        c.stream("label values")?,
        c.stream("label value bits")?,
        "label values",
    );
    let mut label_rank = Cursor::new(c.stream("label_rank")?);
    let mut exact = Cursor::new(c.stream("exact values")?);
    if row_flags.len() != s {
        return Err(Error::corrupt(format!(
            "row_flags has {} bytes for {s} rows",
            row_flags.len()
        )));
    }
    let (esc_a, esc_b) = (u64::from(cb_a.escape()), u64::from(cb_b.escape()));
    #[inline(always)]
    fn value(levels: &[f32], esc: u64, code: u64, exact: &mut Cursor<'_>) -> Result<f32> {
        match levels.get(esc.wrapping_sub(code) as usize) {
            Some(&v) if code != 0 => Ok(v),
            _ => value_slow(esc, code, exact),
        }
    }
    #[cold]
    fn value_slow(esc: u64, code: u64, exact: &mut Cursor<'_>) -> Result<f32> {
        if code == 0 {
            Ok(f32::from_le_bytes(
                exact.take(4, "exact values")?.try_into().unwrap(),
            ))
        } else {
            Err(Error::corrupt(format!(
                "value code {code} is past the codebook's {esc} levels"
            )))
        }
    }
    let mut mask_pos = 0usize;
    let mut prev_n = 0usize;
    let mut row_labels = supervised_labels(labels);
    for (r, &flag) in row_flags[..rows].iter().enumerate() {
        let (levels, esc) = if r < split {
            (&cb_a.levels[..], esc_a)
        } else {
            (&cb_b.levels[..], esc_b)
        };
        let n = if full { k } else { nvalid.count("nvalid", k)? };
        let label = row_labels
            .next()
            .ok_or_else(|| Error::corrupt("more rows than supervised labels"))?;
        let label_in = match flag {
            0 => false,
            1 => true,
            f => return Err(Error::corrupt(format!("row {r}: unknown row flags {f}"))),
        };
        let (prev, row_ids_k, row_lps_k) = sink.row(r);
        let row_ids = &mut row_ids_k[..n];
        let mut i = 0usize;
        if label_in {
            if n == 0 {
                return Err(Error::corrupt(format!(
                    "row {r}: label flagged present in an empty row"
                )));
            }
            row_ids[0] = label;
            i = 1;
        }
        if r > 0 {
            let prev = &prev[..prev_n];
            let nbytes = prev_n.div_ceil(8);
            let mask = share_mask
                .get(mask_pos..mask_pos + nbytes)
                .ok_or_else(|| Error::corrupt("frame ends inside share_mask"))?;
            mask_pos += nbytes;
            for (bi, &b) in mask.iter().enumerate() {
                let mut bits = b;
                while bits != 0 {
                    let j = bi * 8 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let (Some(&id), true) = (prev.get(j), i < n) else {
                        return Err(Error::corrupt(format!(
                            "row {r}: share_mask selects more ids than the row holds"
                        )));
                    };
                    row_ids[i] = id;
                    i += 1;
                }
            }
        }
        let mut rank = 0u64;
        for (m, slot) in row_ids[i..].iter_mut().enumerate() {
            let g = ranks.get()?;
            rank = if m == 0 {
                g
            } else {
                rank.saturating_add(g).saturating_add(1)
            };
            *slot = match table.id(rank) {
                Some(id) => id as i32,
                None => {
                    return Err(Error::corrupt(format!(
                        "id rank {rank} is outside the vocabulary"
                    )))
                }
            };
        }
        row_ids_k[n..].fill(-1);
        let lq = label_values.get()?;
        let label_lp = value(levels, esc, esc.wrapping_sub(lq), &mut exact)?;
        let (row_lps, pad) = row_lps_k.split_at_mut(n);
        pad.fill(f32::NEG_INFINITY);
        if label_in {
            row_lps[0] = label_lp;
        }
        for v in row_lps[usize::from(label_in)..].iter_mut() {
            *v = value(levels, esc, values.get()?, &mut exact)?;
        }
        let rank = i32::try_from(label_rank.varint()?)
            .map_err(|_| Error::corrupt("label rank overflows int32"))?;
        sink.label(r, label_lp, rank);
        prev_n = n;
    }
    if rows == s
        && (mask_pos != share_mask.len()
            || !ranks.finished()
            || !values.finished()
            || !nvalid.is_empty()
            || !label_values.finished()
            || !label_rank.is_empty()
            || !exact.is_empty())
    {
        return Err(Error::corrupt("a compact stream has bytes left over"));
    }
    Ok(())
}
