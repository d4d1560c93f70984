//! Fuzzing by property tests: arbitrary bytes given to the shard reader and to each codec's
//! decoder (raw frames straight into the frame decoder, and zstd-wrapped frames) never make it
//! panic or read out of bounds, and never make it allocate more than a bound proportional to the
//! input: it returns a value or an error.
//!
//! Budget: `TSFT_FUZZ_CASES` executions in all, split evenly over the five arbitrary-bytes
//! targets (default 2,500: a few seconds, as CI runs it). The 10M-execution run recorded in
//! benches/RESULTS.md is `TSFT_FUZZ_CASES=10000000 cargo test --release -p target-sft-core
//! --test fuzz`.
mod common;

use common::{record, Rng};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use target_sft_core::codec::bytes::Cursor;
use target_sft_core::codec::{Codec, DecodeScratch, RowSink};
use target_sft_core::shard::{reseal_checksums, ShardReader};

use target_sft_core::{CacheWriter, CodecKind, Key, TeacherCache, WriterOptions};

// ---- allocation accounting (per thread: proptest tests run on several threads) -------------

struct Counting;

thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn account(add: usize, sub: usize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get().saturating_add(add).saturating_sub(sub);
        l.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: forwards to the system allocator; the bookkeeping touches only const thread-locals.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        account(l.size(), 0);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        account(0, l.size());
        System.dealloc(p, l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        account(l.size(), 0);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        account(new, l.size());
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Run `f` and fail if it allocated more than `limit` bytes beyond what was live before.
fn bounded<R>(limit: usize, what: &str, f: impl FnOnce() -> R) -> R {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(Cell::get) - base;
    assert!(
        peak <= limit,
        "{what}: allocated {peak} bytes for an input allowing {limit}"
    );
    r
}

/// Executions per arbitrary-bytes target.
fn cases() -> u32 {
    let total: u64 = std::env::var("TSFT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_500);
    (total / 5).clamp(1, u32::MAX as u64) as u32
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

fn unique() -> u64 {
    UNIQUE.fetch_add(1, Ordering::Relaxed)
}

fn sample_shard(codec: CodecKind) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!(
        "tsft-fuzz-{}-{}-{}",
        std::process::id(),
        codec.name(),
        unique()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let mut o = WriterOptions::new(8, 500);
    o.codec = codec;
    o.threads = 1;
    o.prior_records = 2;
    let mut w = CacheWriter::create(&dir, o).unwrap();
    let mut rng = Rng::new(11);
    for i in 0..6 {
        w.add(record(&mut rng, Key::Int(i), 500, 8, 5 + i as usize * 3))
            .unwrap();
    }
    w.close().unwrap();
    let c = TeacherCache::open(&dir).unwrap();
    let bytes = std::fs::read(dir.join(&c.manifest.shards[0].file)).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

/// Read every record of the shard `bytes`, as damaged and, when its header still parses, with its
/// region checksums recomputed over the damage (the checks behind the checksums: a writer that
/// wrote these bytes).
fn exercise(bytes: &[u8], tag: u64) {
    let path = std::env::temp_dir().join(format!(
        "tsft-fuzz-case-{}-{tag}-{}.safetensors",
        std::process::id(),
        unique()
    ));
    let mut resealed = bytes.to_vec();
    let resealed = reseal_checksums(&mut resealed).ok().map(|_| resealed);
    for b in std::iter::once(bytes).chain(resealed.as_deref()) {
        std::fs::write(&path, b).unwrap();
        if let Ok(r) = ShardReader::open(&path, None) {
            for i in 0..r.len() {
                let _ = r.decode(i);
                let _ = r.key(i);
            }
        }
    }
    let _ = std::fs::remove_file(&path);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn mutated_compact_shards_never_panic(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6), cut in any::<usize>(), truncate in any::<bool>()) {
        let mut bytes = sample_shard(CodecKind::Compact);
        for (pos, val) in flips {
            let n = bytes.len();
            bytes[pos % n] ^= val | 1;
        }
        if truncate {
            let n = bytes.len();
            bytes.truncate(cut % n);
        }
        exercise(&bytes, 1);
    }

    #[test]
    fn mutated_exact_shards_never_panic(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
        let mut bytes = sample_shard(CodecKind::Exact);
        for (pos, val) in flips {
            let n = bytes.len();
            bytes[pos % n] ^= val | 1;
        }
        exercise(&bytes, 2);
    }
}

#[test]
fn every_single_byte_flip_in_the_payload_region_is_safe() {
    let clean = sample_shard(CodecKind::Compact);
    let mut rng = Rng::new(5);
    for _ in 0..200 {
        let mut b = clean.clone();
        let pos = rng.below(b.len() as u64) as usize;
        b[pos] ^= 1 << rng.below(8);
        exercise(&b, 3);
    }
}

// ---- arbitrary bytes into the shard reader and each codec's decoders ------------------------

/// Valid material to mutate: a shard of each codec, its reader (for the codec tables) and the
/// decompressed frames of its records with their (n_tokens, n_supervised).
struct Fixture {
    shard: Vec<u8>,
    reader: ShardReader,
    raw: Vec<(Vec<u8>, usize, usize)>,
}

fn fixture(codec: CodecKind) -> &'static Fixture {
    static F: [OnceLock<Fixture>; 2] = [OnceLock::new(), OnceLock::new()];
    F[usize::from(codec == CodecKind::Compact)].get_or_init(|| {
        let shard = sample_shard(codec);
        let path = std::env::temp_dir().join(format!(
            "tsft-fuzz-fixture-{}-{}.safetensors",
            std::process::id(),
            codec.name()
        ));
        std::fs::write(&path, &shard).unwrap();
        let reader = ShardReader::open(&path, None).unwrap();
        let _ = std::fs::remove_file(&path); // the map stays valid
        let raw = (0..reader.len())
            .map(|i| {
                let row = reader.checked_row(i).unwrap();
                let raw = zstd::decode_all(reader.frame(i)).unwrap();
                (raw, row.n_tokens as usize, row.n_supervised as usize)
            })
            .collect();
        Fixture { shard, reader, raw }
    })
}

/// Rows written into plain vectors, sized from the frame's (already checked) header.
struct Rows {
    k: usize,
    ids: Vec<i32>,
    lps: Vec<f32>,
}

impl RowSink for Rows {
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
    fn label(&mut self, _r: usize, _logprob: f32, _rank: i32) {}
}

/// The (n_tokens, n_supervised) a raw frame claims (what a matching index row would say).
fn claimed(raw: &[u8]) -> (usize, usize) {
    let mut c = Cursor::new(raw);
    let t = c.varint().unwrap_or(0).min(1 << 24) as usize;
    let s = c.varint().unwrap_or(0).min(1 << 24) as usize;
    (t, s)
}

/// Decode a raw frame to the end (a value or an error, never a panic).
fn decode_raw(codec: &Codec, raw: &[u8], t: usize, s: usize) -> bool {
    let Ok(mut f) = codec.parse_raw(raw, t, s) else {
        return false;
    };
    let (mut ids, mut labels) = (Vec::new(), Vec::new());
    if f.tokens(&mut ids, &mut labels).is_err() {
        return false;
    }
    let k = codec.top_k;
    let mut rows = Rows {
        k,
        ids: vec![0; s * k],
        lps: vec![0.0; s * k],
    };
    f.rows(&labels, s, &mut rows).is_ok()
}

/// Decode a zstd frame to the end through the reader's path (`open_frame`).
fn decode_zstd(codec: &Codec, frame: &[u8], t: usize, s: usize) -> bool {
    let mut scratch = DecodeScratch::default();
    let Ok(mut f) = codec.open_frame(frame, t, s, &mut scratch) else {
        return false;
    };
    let (mut ids, mut labels) = (Vec::new(), Vec::new());
    if f.tokens(&mut ids, &mut labels).is_err() {
        return false;
    }
    let k = codec.top_k;
    let mut rows = Rows {
        k,
        ids: vec![0; s * k],
        lps: vec![0.0; s * k],
    };
    f.rows(&labels, s, &mut rows).is_ok()
}

/// Input bytes: arbitrary (`base = None`), or a valid item with bytes overwritten or spliced in.
fn mutate(valid: &[u8], mode: u8, at: usize, data: &[u8]) -> Vec<u8> {
    match mode % 4 {
        0 => data.to_vec(),
        1 => {
            let mut b = valid.to_vec();
            for (j, &x) in data.iter().enumerate().take(8) {
                let n = b.len().max(1);
                if let Some(y) = b.get_mut((at.wrapping_add(j * 7919)) % n) {
                    *y ^= x | 1;
                }
            }
            b
        }
        2 => {
            let mut b = valid.to_vec();
            let a = at % (b.len() + 1);
            let end = (a + data.len()).min(b.len());
            b.splice(a..end, data.iter().copied());
            b
        }
        _ => {
            let mut b = valid.to_vec();
            b.truncate(at % (b.len() + 1));
            b.extend_from_slice(data);
            b
        }
    }
}

const MIB: usize = 1 << 20;

fn fuzz_frames(
    codec: CodecKind,
    zstd_wrapped: bool,
    which: usize,
    mode: u8,
    at: usize,
    data: &[u8],
) {
    let fx = fixture(codec);
    let (valid, t0, s0) = &fx.raw[which % fx.raw.len()];
    let codec = &fx.reader.codec;
    let raw = mutate(valid, mode, at, data);
    let (t, s) = if mode % 2 == 0 {
        claimed(&raw)
    } else {
        (*t0, *s0)
    };
    if zstd_wrapped {
        let frame = zstd::bulk::compress(&raw, 1).unwrap();
        // the frame is bounded by the decoder's cap for (t, s): about 50 bytes per entry
        let limit = 16 * MIB + 64 * (t + s * codec.top_k) + 64 * raw.len();
        let ok = bounded(limit, "zstd frame", || decode_zstd(codec, &frame, t, s));
        if mode % 4 == 1 && data.is_empty() {
            assert!(ok, "an unmodified frame decodes");
        }
        bounded(limit, "arbitrary zstd bytes", || {
            decode_zstd(codec, data, t, s)
        });
    } else {
        let limit = 16 * MIB + 64 * raw.len();
        bounded(limit, "raw frame", || decode_raw(codec, &raw, t, s));
    }
}

fn shard_case_path() -> std::path::PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        std::path::PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let tid =
        format!("{:?}", std::thread::current().id()).replace(|c: char| !c.is_ascii_digit(), "");
    base.join(format!(
        "tsft-fuzz-shard-{}-{tid}.safetensors",
        std::process::id()
    ))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_into_the_shard_reader(compact in any::<bool>(), mode in any::<u8>(), at in any::<usize>(), data in prop::collection::vec(any::<u8>(), 0..512)) {
        let fx = fixture(if compact { CodecKind::Compact } else { CodecKind::Exact });
        let mut bytes = mutate(&fx.shard, mode, at, &data);
        if at % 2 == 1 {
            // half the cases past the region checksums, as if a writer had written these bytes
            let _ = reseal_checksums(&mut bytes);
        }
        let path = shard_case_path();
        std::fs::write(&path, &bytes).unwrap();
        // a reader's memory is bounded by the file it maps (index, tables) plus a record's frame
        bounded(16 * MIB + 64 * bytes.len(), "shard", || {
            if let Ok(r) = ShardReader::open(&path, None) {
                for i in 0..r.len() {
                    let _ = r.checked_row(i);
                    let _ = r.decode(i);
                    let _ = r.key(i);
                }
            }
        });
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn arbitrary_bytes_into_the_exact_frame_decoder(which in any::<usize>(), mode in any::<u8>(), at in any::<usize>(), data in prop::collection::vec(any::<u8>(), 0..256)) {
        fuzz_frames(CodecKind::Exact, false, which, mode, at, &data);
    }

    #[test]
    fn arbitrary_bytes_into_the_compact_frame_decoder(which in any::<usize>(), mode in any::<u8>(), at in any::<usize>(), data in prop::collection::vec(any::<u8>(), 0..256)) {
        fuzz_frames(CodecKind::Compact, false, which, mode, at, &data);
    }

    #[test]
    fn arbitrary_zstd_frames_into_the_exact_decoder(which in any::<usize>(), mode in any::<u8>(), at in any::<usize>(), data in prop::collection::vec(any::<u8>(), 0..256)) {
        fuzz_frames(CodecKind::Exact, true, which, mode, at, &data);
    }

    #[test]
    fn arbitrary_zstd_frames_into_the_compact_decoder(which in any::<usize>(), mode in any::<u8>(), at in any::<usize>(), data in prop::collection::vec(any::<u8>(), 0..256)) {
        fuzz_frames(CodecKind::Compact, true, which, mode, at, &data);
    }
}

#[test]
fn a_damaged_token_count_in_the_index_is_refused_before_anything_is_sized_by_it() {
    let fx = fixture(CodecKind::Compact);
    // record_index is the first tensor; find row 2's n_tokens by its value
    let row = fx.reader.checked_row(2).unwrap();
    let path = shard_case_path().with_extension("index.safetensors");
    for (field, col, bad) in [
        ("n_tokens", 2usize, 1u64 << 40),
        ("n_tokens", 2, row.n_tokens * 5 + 1000),
        ("n_supervised", 3, row.n_tokens),
    ] {
        let mut b = fx.shard.clone();
        let want = match col {
            2 => row.n_tokens,
            _ => row.n_supervised,
        };
        // the header is 8 bytes of length + JSON; the index follows at the first 8-aligned offset
        let hlen = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let at = 8 + hlen + (2 * 5 + col) * 8;
        assert_eq!(u64::from_le_bytes(b[at..at + 8].try_into().unwrap()), want);
        b[at..at + 8].copy_from_slice(&bad.to_le_bytes());
        // as a writer that wrote this index would have: past the region checksums
        reseal_checksums(&mut b).unwrap();
        std::fs::write(&path, &b).unwrap();
        let r = ShardReader::open(&path, None).unwrap();
        let e = bounded(4 * MIB, field, || r.decode(2)).unwrap_err();
        assert!(
            e.message.contains("record 2") && e.message.contains(field),
            "{field}: {e}"
        );
        assert!(r.decode(1).is_ok());
    }
    let _ = std::fs::remove_file(&path);
}
