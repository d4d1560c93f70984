//! Shards: building one in memory and committing it atomically, and reading one through a
//! read-only memory map (docs/FORMAT.md §Shard).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::{json, Value};

use crate::codec::{Codebook, Codec, CodecKind, IdTable, LadderParams};
use crate::container::{encode_header, parse_header, Dtype, Header, TensorOut};
use crate::error::{Error, ErrorKind, Result};
use crate::fsutil::write_atomic;
use crate::hash;
use crate::manifest::{ShardEntry, CHECKSUMMED_VERSION, FORMAT_VERSION, LADDER_VERSION};
use crate::record::{Key, Record};

pub const SHARD_FORMAT: &str = "target-sft-shard";
/// Columns of the `record_index` tensor.
pub const INDEX_COLS: usize = 5;
/// The tensor (U64 `[K]`) and the metadata field (its entries' region names, comma-separated)
/// of a shard's region checksums (format version 2, docs/FORMAT.md §7).
pub const CHECKSUMS: &str = "checksums";
/// Metadata of a compact shard with a codebook ladder (version 3): `[[rung, levels], …]`, the
/// rungs whose tables the `codebook` tensor holds, in order (docs/FORMAT.md §2, §5.1).
pub const CODEBOOK_RUNGS: &str = "codebook_rungs";
/// The name of `checksums[0]`: XXH3-64 of the file's first `8 + N` bytes (length and header).
pub const HEADER_REGION: &str = "header";

/// Largest token count of one record a reader accepts (batch positions are 32-bit).
pub const MAX_RECORD_TOKENS: u64 = 1 << 30;
/// Most bytes a zstd frame can decode to per byte of frame (a block of >= 4 bytes, RLE, yields
/// at most 128 KiB).
const MAX_ZSTD_RATIO: u64 = 1 << 15;

/// What the reader needs to know about a record without decoding it.
#[derive(Debug, Clone)]
pub struct IndexRow {
    pub frame: Range<u64>,
    pub n_tokens: u64,
    pub n_supervised: u64,
    pub token_hash: u64,
}

/// An encoded record on its way into a shard.
pub struct EncodedRecord {
    pub key: Vec<u8>,
    pub key_hash: u64,
    pub n_tokens: u64,
    pub n_supervised: u64,
    pub token_hash: u64,
    pub frame: Vec<u8>,
    /// The codebook rungs of a compact frame with rung bytes (docs/FORMAT.md §5.1).
    pub rungs: Option<[u8; 2]>,
}

impl EncodedRecord {
    pub fn new(rec: &Record, frame: Vec<u8>) -> Self {
        let key = rec.key.encode();
        Self {
            key_hash: hash::key_hash(&key),
            key,
            n_tokens: rec.n_tokens() as u64,
            n_supervised: rec.n_supervised() as u64,
            token_hash: hash::token_hash(&rec.input_ids),
            frame,
            rungs: None,
        }
    }
}

/// Codec description stored in every shard (and in the manifest): the zstd level, plus the
/// codebook ladder for the compact codec (`legacy`: the fixed parameters of format versions 1–2,
/// whose frames carry no rung byte).
pub fn codec_params_json(zstd_level: i32, ladder: Option<&LadderParams>, legacy: bool) -> Value {
    match ladder {
        Some(l) if legacy => {
            let p = l.rung(0);
            json!({
                "zstd_level": zstd_level,
                "sqrt_step": p.sqrt_step,
                "tail_step": p.tail_step,
                "floor": p.floor,
            })
        }
        Some(l) => l.to_json(zstd_level),
        None => json!({ "zstd_level": zstd_level }),
    }
}

/// Accumulates records for one shard in memory.
#[derive(Default)]
pub struct ShardBuilder {
    index: Vec<u64>,
    key_hash: Vec<u64>,
    key_offsets: Vec<u64>,
    key_bytes: Vec<u8>,
    payload: Vec<u8>,
    tokens: u64,
    supervised: u64,
    /// The codebook rungs of the compact records pushed (their tables are written at commit).
    pub rungs: BTreeSet<u8>,
    /// Extra `__metadata__` entries (e.g. `replaces`, written by a shard rewrite).
    pub metadata: BTreeMap<String, String>,
}

fn le_bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

impl ShardBuilder {
    pub fn len(&self) -> usize {
        self.key_hash.len()
    }
    pub fn is_empty(&self) -> bool {
        self.key_hash.is_empty()
    }
    pub fn payload_bytes(&self) -> usize {
        self.payload.len()
    }

    pub fn push(&mut self, r: EncodedRecord) {
        if self.key_offsets.is_empty() {
            self.key_offsets.push(0);
        }
        let start = self.payload.len() as u64;
        self.payload.extend_from_slice(&r.frame);
        self.index.extend_from_slice(&[
            start,
            r.frame.len() as u64,
            r.n_tokens,
            r.n_supervised,
            r.token_hash,
        ]);
        self.key_hash.push(r.key_hash);
        self.key_bytes.extend_from_slice(&r.key);
        self.key_offsets.push(self.key_bytes.len() as u64);
        self.tokens += r.n_tokens;
        self.supervised += r.n_supervised;
        self.rungs.extend(r.rungs.into_iter().flatten());
    }

    /// Write the shard to `dir/file` atomically and describe it for the manifest.
    pub fn commit(self, dir: &Path, file: &str, codec: &Codec) -> Result<ShardEntry> {
        let n = self.len();
        let key_offsets = if self.key_offsets.is_empty() {
            vec![0]
        } else {
            self.key_offsets
        };
        let index = le_bytes(&self.index, u64::to_le_bytes);
        let key_hash = le_bytes(&self.key_hash, u64::to_le_bytes);
        let key_offsets_b = le_bytes(&key_offsets, u64::to_le_bytes);
        // compact: the tables of the rungs used (of rung 0 in a legacy shard), in rung order
        let rungs: Vec<u8> = if codec.rung_byte {
            self.rungs.iter().copied().collect()
        } else {
            vec![0]
        };
        let mut rung_sizes: Vec<[usize; 2]> = Vec::new();
        let (codebook, id_table) = match &codec.ids {
            Some(ids) => {
                let mut levels: Vec<f32> = Vec::new();
                for &j in &rungs {
                    let cb = codec.codebook(usize::from(j))?;
                    levels.extend_from_slice(&cb.levels);
                    rung_sizes.push([usize::from(j), cb.levels.len()]);
                }
                (
                    Some(le_bytes(&levels, f32::to_le_bytes)),
                    Some(le_bytes(&ids.id_of_rank, u32::to_le_bytes)),
                )
            }
            None => (None, None),
        };
        // The checksummed regions (docs/FORMAT.md §7), in tensor order; entry 0 of the
        // `checksums` tensor is the header's, filled in once the header is encoded.
        let mut regions: Vec<(&str, &[u8])> = vec![
            ("record_index", &index),
            ("key_hash", &key_hash),
            ("key_offsets", &key_offsets_b),
        ];
        if let (Some(cb), Some(ids)) = (&codebook, &id_table) {
            regions.push(("codebook", cb));
            regions.push(("id_table", ids));
        }
        regions.push(("key_bytes", &self.key_bytes));
        let mut sums = vec![0u64];
        sums.extend(regions.iter().map(|(_, b)| hash::region_checksum(b)));
        let names: Vec<&str> = std::iter::once(HEADER_REGION)
            .chain(regions.iter().map(|(n, _)| *n))
            .collect();
        let placeholder = vec![0u8; 8 * sums.len()];
        let mut tensors = vec![
            TensorOut {
                name: "record_index",
                dtype: Dtype::U64,
                shape: vec![n, INDEX_COLS],
                data: &index,
            },
            TensorOut {
                name: "key_hash",
                dtype: Dtype::U64,
                shape: vec![n],
                data: &key_hash,
            },
            TensorOut {
                name: "key_offsets",
                dtype: Dtype::U64,
                shape: vec![n + 1],
                data: &key_offsets_b,
            },
            TensorOut {
                name: CHECKSUMS,
                dtype: Dtype::U64,
                shape: vec![sums.len()],
                data: &placeholder,
            },
        ];
        if let (Some(cb), Some(ids)) = (&codebook, &id_table) {
            tensors.push(TensorOut {
                name: "codebook",
                dtype: Dtype::F32,
                shape: vec![cb.len() / 4],
                data: cb,
            });
            tensors.push(TensorOut {
                name: "id_table",
                dtype: Dtype::U32,
                shape: vec![ids.len() / 4],
                data: ids,
            });
        }
        tensors.push(TensorOut {
            name: "key_bytes",
            dtype: Dtype::U8,
            shape: vec![self.key_bytes.len()],
            data: &self.key_bytes,
        });
        tensors.push(TensorOut {
            name: "payload",
            dtype: Dtype::U8,
            shape: vec![self.payload.len()],
            data: &self.payload,
        });
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), SHARD_FORMAT.to_string());
        let legacy = codec.ids.is_some() && !codec.rung_byte;
        let version = if legacy {
            LADDER_VERSION - 1
        } else {
            FORMAT_VERSION
        };
        meta.insert("format_version".to_string(), version.to_string());
        meta.insert("codec".to_string(), codec.kind.name().to_string());
        meta.insert(
            "codec_params".to_string(),
            codec_params_json(codec.zstd_level, codec.ladder.as_ref(), legacy).to_string(),
        );
        if codec.rung_byte {
            meta.insert(
                CODEBOOK_RUNGS.to_string(),
                serde_json::to_string(&rung_sizes).expect("plain numbers"),
            );
        }
        meta.insert("top_k".to_string(), codec.top_k.to_string());
        meta.insert("vocab_size".to_string(), codec.vocab_size.to_string());
        meta.insert("records".to_string(), n.to_string());
        for (k, v) in &self.metadata {
            meta.entry(k.clone()).or_insert_with(|| v.clone());
        }
        meta.insert(CHECKSUMS.to_string(), names.join(","));
        let header = encode_header(&tensors, &meta)?;
        sums[0] = hash::region_checksum(&header);
        let sums_b = le_bytes(&sums, u64::to_le_bytes);
        let mut parts: Vec<&[u8]> = vec![&header];
        parts.extend(tensors.iter().map(|t| {
            if t.name == CHECKSUMS {
                &sums_b[..]
            } else {
                t.data
            }
        }));
        let bytes: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let checksum = hash::parts_checksum(&parts);
        write_atomic(&dir.join(file), &parts)?;
        Ok(ShardEntry {
            file: file.to_string(),
            records: n as u64,
            bytes,
            checksum,
            tokens: self.tokens,
            supervised: self.supervised,
            stats: None,
        })
    }
}

/// A shard opened for reading.
pub struct ShardReader {
    pub path: PathBuf,
    mmap: Mmap,
    header: Header,
    pub codec: Codec,
    /// Whether the shard carries region checksums (format version 2), all verified at open; a
    /// version-1 shard has only the manifest's whole-file checksum, which `verify` checks.
    pub checksummed: bool,
    n: usize,
    // file offsets of the hot tensors (validated at open)
    index_at: usize,
    key_hash_at: usize,
    key_offsets_at: usize,
    key_bytes_at: usize,
    payload_at: usize,
}

fn meta<'a>(h: &'a Header, key: &str) -> Result<&'a str> {
    h.metadata
        .get(key)
        .map(String::as_str)
        .ok_or_else(|| Error::format(format!("shard metadata has no {key:?}")))
}

fn meta_usize(h: &Header, key: &str) -> Result<usize> {
    meta(h, key)?
        .parse()
        .map_err(|_| Error::format(format!("shard metadata {key:?} is not an integer")))
}

/// The bytes of a shard file a reader holds: all of them (a memory map) or the pieces a ranged
/// reader fetched (a remote cache's key index, [`ShardKeyTables`]), each with its file offset.
pub struct FilePieces<'a> {
    pieces: Vec<(usize, &'a [u8])>,
}

impl<'a> FilePieces<'a> {
    /// The whole file.
    pub fn whole(bytes: &'a [u8]) -> Self {
        Self {
            pieces: vec![(0, bytes)],
        }
    }

    /// Pieces of the file: `(offset in the file, bytes)`.
    pub fn new(pieces: Vec<(usize, &'a [u8])>) -> Self {
        Self { pieces }
    }

    /// The bytes of `range` (of the file), which one piece must hold.
    pub fn get(&self, range: Range<usize>) -> Result<&'a [u8]> {
        self.pieces
            .iter()
            .find(|(at, b)| *at <= range.start && range.end <= at + b.len())
            .map(|(at, b)| &b[range.start - at..range.end - at])
            .ok_or_else(|| {
                Error::input(format!(
                    "internal: bytes {}..{} of the shard were not read (read: {:?})",
                    range.start,
                    range.end,
                    self.pieces
                        .iter()
                        .map(|(at, b)| *at..at + b.len())
                        .collect::<Vec<_>>()
                ))
            })
    }
}

/// Verify a shard's region checksums (docs/FORMAT.md §7): the header first (which covers the
/// `checksums` tensor's description and the region list), then the tables `only` names (every
/// table a reader uses when `None`). Returns false for a version-1 shard, which has none.
fn check_regions(bytes: &FilePieces<'_>, h: &Header, only: Option<&[&str]>) -> Result<bool> {
    let version = h
        .metadata
        .get("format_version")
        .and_then(|v| v.parse::<u32>().ok());
    let newer = version.is_some_and(|v| v > FORMAT_VERSION);
    let fail = |what: String| {
        if newer {
            Error::new(
                ErrorKind::Version,
                format!(
                    "written with shard format version {}, newer than {FORMAT_VERSION} ({what} under this version's rules: if you expected no newer version, the file is damaged); upgrade target-sft",
                    version.unwrap_or_default()
                ),
            )
        } else {
            Error::corrupt(format!(
                "{what}; the file is damaged — restore it or rebuild the cache"
            ))
        }
    };
    let Some(t) = h.tensors.get(CHECKSUMS) else {
        if version.is_some_and(|v| (CHECKSUMMED_VERSION..=FORMAT_VERSION).contains(&v)) {
            return Err(fail(format!(
                "region {CHECKSUMS} is missing (format version {} requires it)",
                version.unwrap_or_default()
            )));
        }
        return Ok(false);
    };
    if t.dtype != Dtype::U64 || t.shape.len() != 1 || t.shape[0] == 0 {
        return Err(fail(format!(
            "region {CHECKSUMS}: the tensor is not U64 [K >= 1]"
        )));
    }
    let sums: Vec<u64> = bytes
        .get(t.range.clone())?
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let header_sum = hash::region_checksum(bytes.get(0..h.data_start)?);
    if header_sum != sums[0] {
        return Err(fail(format!(
            "region {HEADER_REGION} (header length, tensor table and __metadata__) fails its checksum (stored {:016x}, computed {header_sum:016x})",
            sums[0]
        )));
    }
    // The header is now trusted: its region list must name every table exactly once.
    let names: Vec<&str> = h
        .metadata
        .get(CHECKSUMS)
        .map(|s| s.split(',').collect())
        .unwrap_or_default();
    let mut want: Vec<&str> = h
        .tensors
        .keys()
        .map(String::as_str)
        .filter(|n| *n != CHECKSUMS && *n != "payload")
        .collect();
    let mut listed: Vec<&str> = names.iter().skip(1).copied().collect();
    want.sort_unstable();
    listed.sort_unstable();
    if names.len() != sums.len() || names.first() != Some(&HEADER_REGION) || want != listed {
        return Err(Error::format(format!(
            "region {CHECKSUMS}: metadata {CHECKSUMS:?} = {:?} does not name the header and every table but the payload once, in the {} entries of the tensor",
            names.join(","),
            sums.len()
        )));
    }
    for (name, &stored) in names.iter().zip(&sums).skip(1) {
        if only.is_some_and(|o| !o.contains(name)) {
            continue;
        }
        let got = hash::region_checksum(bytes.get(h.tensors[*name].range.clone())?);
        if got != stored {
            return Err(fail(format!(
                "region {name} fails its checksum (stored {stored:016x}, computed {got:016x})"
            )));
        }
    }
    Ok(true)
}

/// Check a tensor's dtype, shape and alignment.
fn check_tensor(h: &Header, name: &str, dtype: Dtype, shape: &[usize]) -> Result<()> {
    let t = h
        .tensors
        .get(name)
        .ok_or_else(|| Error::format(format!("tensor {name:?} is missing")))?;
    if t.dtype != dtype || t.shape != shape {
        return Err(Error::corrupt(format!(
            "tensor {name:?} is {:?}{:?}, expected {:?}{shape:?}",
            t.dtype, t.shape, dtype
        )));
    }
    if t.range.start % dtype.size() != 0 {
        return Err(Error::corrupt(format!("tensor {name:?} is not aligned")));
    }
    Ok(())
}

/// The file range of a vector (rank-1 tensor) of `dtype`.
fn vector_range(h: &Header, name: &str, dtype: Dtype) -> Result<Range<usize>> {
    let t = h
        .tensors
        .get(name)
        .ok_or_else(|| Error::format(format!("tensor {name:?} is missing")))?;
    if t.dtype != dtype || t.shape.len() != 1 {
        return Err(Error::corrupt(format!(
            "tensor {name:?} has the wrong dtype or rank"
        )));
    }
    Ok(t.range.clone())
}

/// The checks of a shard's header that every reader of its records' keys makes (after its
/// region checksums, docs/FORMAT.md §7): the format and its version, and the dtype, shape and
/// alignment of `key_hash`, `key_offsets` and `key_bytes`. Returns the shard's record count.
fn check_key_tables(h: &Header) -> Result<usize> {
    if meta(h, "format")? != SHARD_FORMAT {
        return Err(Error::format(
            "not a target-sft shard (metadata \"format\" differs)",
        ));
    }
    let version: u32 = meta(h, "format_version")?
        .parse()
        .map_err(|_| Error::format("format_version is not an integer"))?;
    if version > FORMAT_VERSION {
        return Err(Error::new(
            ErrorKind::Version,
            format!("written with shard format version {version}, newer than {FORMAT_VERSION}; upgrade target-sft"),
        ));
    }
    let n = meta_usize(h, "records")?;
    check_tensor(h, "key_hash", Dtype::U64, &[n])?;
    check_tensor(h, "key_offsets", Dtype::U64, &[n + 1])?;
    vector_range(h, "key_bytes", Dtype::U8)?;
    Ok(n)
}

/// Check a `key_offsets` table (its bytes) against `key_bytes` (`key_len` bytes): it starts at
/// 0 and never decreases nor passes the end, so every key lies inside `key_bytes`.
fn check_key_offsets(key_offsets: &[u8], key_len: usize) -> Result<()> {
    let at = |i: usize| u64::from_le_bytes(key_offsets[8 * i..8 * i + 8].try_into().unwrap());
    let mut prev_key_end = 0;
    for i in 0..(key_offsets.len() / 8).saturating_sub(1) {
        let (a, b) = (at(i), at(i + 1));
        if a != prev_key_end || b < a || b > key_len as u64 {
            return Err(Error::corrupt(format!(
                "record {i}: its key lies outside key_bytes"
            )));
        }
        prev_key_end = b;
    }
    Ok(())
}

/// Tables less than this many bytes apart are read in one request by [`ShardKeyTables::ranges`].
const COALESCE_GAP: usize = 64 << 10;

/// One shard's key tables (`key_hash`; `key_offsets` and `key_bytes` for its keys), for a
/// reader that fetches byte ranges of the file instead of holding it (a remote cache's key
/// index): the file's first 8 bytes give the header's length ([`crate::container::header_end`]), the header gives
/// the [`ranges`](Self::ranges) to read, and the tables are verified by the same code as a
/// [`ShardReader`]'s (header and key-table checks, region checksums, key offsets) before use.
pub struct ShardKeyTables {
    head: Vec<u8>,
    header: Header,
    records: Option<usize>,
}

impl ShardKeyTables {
    /// Parse the header `head` (the file's first `8 + N` bytes, [`crate::container::header_end`]) of a shard of
    /// `file_len` bytes holding `records` records (the manifest's count, if known). Nothing in
    /// it is trusted yet: it is verified, by its checksum, with the tables.
    pub fn parse(head: &[u8], file_len: usize, records: Option<usize>) -> Result<Self> {
        let header = parse_header(head, file_len)?;
        Ok(Self {
            head: head[..header.data_start].to_vec(),
            header,
            records,
        })
    }

    /// The byte ranges of the file (`start..end`) that [`key_hashes`](Self::key_hashes)
    /// (`keys` false) or [`keys`](Self::keys) (`keys` true) need, tables less than 64 KiB
    /// apart coalesced into one range.
    pub fn ranges(&self, keys: bool) -> Vec<Range<usize>> {
        let names: &[&str] = if keys {
            &["key_offsets", "key_bytes", CHECKSUMS]
        } else {
            &["key_hash", CHECKSUMS]
        };
        let mut r: Vec<Range<usize>> = names
            .iter()
            .filter_map(|n| self.header.tensors.get(*n).map(|t| t.range.clone()))
            .collect();
        r.sort_unstable_by_key(|x| x.start);
        let mut out: Vec<Range<usize>> = Vec::new();
        for x in r {
            match out.last_mut() {
                Some(l) if x.start <= l.end + COALESCE_GAP => l.end = l.end.max(x.end),
                _ => out.push(x),
            }
        }
        out
    }

    /// Verify the header (its checksum, then the key-table checks and the manifest's record
    /// count) and the tables `names`, whose bytes `pieces` holds; returns the record count.
    fn check(&self, pieces: &FilePieces<'_>, names: &[&str]) -> Result<usize> {
        let mut all = vec![(0, &self.head[..])];
        all.extend(pieces.pieces.iter().copied());
        check_regions(&FilePieces::new(all), &self.header, Some(names))?;
        let n = check_key_tables(&self.header)?;
        if let Some(want) = self.records.filter(|&w| w != n) {
            return Err(Error::corrupt(format!(
                "the shard holds {n} records but the manifest lists {want}; it was replaced or the manifest is damaged"
            )));
        }
        Ok(n)
    }

    /// The verified `key_hash` table (XXH3-64 of each record's encoded key), from `pieces` of
    /// the file holding [`ranges(false)`](Self::ranges).
    pub fn key_hashes(&self, pieces: &FilePieces<'_>) -> Result<Vec<u64>> {
        self.check(pieces, &["key_hash"])?;
        let b = pieces.get(self.header.tensors["key_hash"].range.clone())?;
        Ok(b.chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }

    /// The keys of records `which` (indices in this shard), from verified `key_offsets` and
    /// `key_bytes` tables in `pieces` (holding [`ranges(true)`](Self::ranges)).
    pub fn keys(&self, pieces: &FilePieces<'_>, which: &[usize]) -> Result<Vec<Key>> {
        let n = self.check(pieces, &["key_offsets", "key_bytes"])?;
        let offsets = pieces.get(self.header.tensors["key_offsets"].range.clone())?;
        let bytes = pieces.get(self.header.tensors["key_bytes"].range.clone())?;
        check_key_offsets(offsets, bytes.len())?;
        let at = |i: usize| u64::from_le_bytes(offsets[8 * i..8 * i + 8].try_into().unwrap());
        which
            .iter()
            .map(|&i| {
                if i >= n {
                    return Err(Error::input(format!(
                        "record {i} is out of range: the shard has {n} records"
                    )));
                }
                Key::decode(&bytes[at(i) as usize..at(i + 1) as usize])
                    .map_err(|e| e.at(format!("record {i}")))
            })
            .collect()
    }
}

/// Recompute the region checksums of the shard file `bytes` in place over its current content:
/// what a writer that wrote exactly these bytes would have stored (docs/FORMAT.md §7). For tests
/// and fuzz targets that damage a shard and must reach the checks behind the checksums; a
/// version-1 shard (no `checksums` tensor) is left as it is.
pub fn reseal_checksums(bytes: &mut [u8]) -> Result<()> {
    let h = parse_header(bytes, bytes.len())?;
    let Some(t) = h.tensors.get(CHECKSUMS) else {
        return Ok(());
    };
    let names: Vec<&str> = h
        .metadata
        .get(CHECKSUMS)
        .map(|s| s.split(',').collect())
        .unwrap_or_default();
    if t.dtype != Dtype::U64 || t.shape != [names.len()] || names.first() != Some(&HEADER_REGION) {
        return Err(Error::format(
            "the checksums tensor does not match its region list",
        ));
    }
    let mut sums = vec![hash::region_checksum(&bytes[..h.data_start])];
    for name in &names[1..] {
        let r = h
            .tensors
            .get(*name)
            .ok_or_else(|| Error::format(format!("region {name} is not a tensor")))?;
        sums.push(hash::region_checksum(&bytes[r.range.clone()]));
    }
    bytes[t.range.clone()].copy_from_slice(&le_bytes(&sums, u64::to_le_bytes));
    Ok(())
}

impl ShardReader {
    /// Open and validate a shard. `expect_bytes` is the size the manifest recorded.
    pub fn open(path: &Path, expect_bytes: Option<u64>) -> Result<Self> {
        Self::open_inner(path, expect_bytes).map_err(|e| e.at(format!("shard {}", path.display())))
    }

    fn open_inner(path: &Path, expect_bytes: Option<u64>) -> Result<Self> {
        let file = File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::corrupt("the file is missing; restore it or rebuild the cache")
            } else {
                Error::io("cannot open", path, e)
            }
        })?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("cannot stat", path, e))?
            .len();
        if let Some(want) = expect_bytes {
            if len != want {
                return Err(Error::corrupt(format!(
                    "the file has {len} bytes but the manifest recorded {want}; it is truncated or was replaced"
                )));
            }
        }
        // SAFETY: the map is read-only and private to this process. Cache files are written
        // once (to a temp name, then renamed) and never modified in place; a process that
        // truncates a mapped shard behind our back violates the cache's contract, as with any
        // mmap-based reader. Every read from the map is bounds-checked against `len`.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("cannot map", path, e))?;
        let header = parse_header(&mmap, mmap.len())?;
        // Before anything in the header or a table is trusted (docs/FORMAT.md §7, §8).
        let checksummed = check_regions(&FilePieces::whole(&mmap), &header, None)?;
        let n = check_key_tables(&header)?;
        let kind =
            CodecKind::parse(meta(&header, "codec")?).map_err(|e| Error::format(e.message))?;
        let top_k = meta_usize(&header, "top_k")?;
        let vocab = meta_usize(&header, "vocab_size")?;
        if top_k == 0 || top_k > 1024 || vocab == 0 || vocab > (1 << 31) {
            return Err(Error::format(format!(
                "top_k {top_k} / vocab_size {vocab} are out of range"
            )));
        }
        let params: Value = serde_json::from_str(meta(&header, "codec_params")?)
            .map_err(|_| Error::format("codec_params is not JSON"))?;
        let zstd_level = params
            .get("zstd_level")
            .and_then(Value::as_i64)
            .unwrap_or(3) as i32;
        let mut reader = Self {
            path: path.to_path_buf(),
            mmap,
            header,
            codec: Codec::exact(top_k, vocab, zstd_level),
            checksummed,
            n,
            index_at: 0,
            key_hash_at: 0,
            key_offsets_at: 0,
            key_bytes_at: 0,
            payload_at: 0,
        };
        check_tensor(&reader.header, "record_index", Dtype::U64, &[n, INDEX_COLS])?;
        reader.tensor("payload", Dtype::U8)?;
        let at = |name: &str| reader.header.tensors[name].range.start;
        (reader.index_at, reader.key_hash_at, reader.key_offsets_at) =
            (at("record_index"), at("key_hash"), at("key_offsets"));
        (reader.key_bytes_at, reader.payload_at) = (at("key_bytes"), at("payload"));
        if kind == CodecKind::Compact {
            let (ladder, rung_byte) = LadderParams::from_json(&params)?;
            let levels: Vec<f32> = reader
                .tensor("codebook", Dtype::F32)?
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let ids: Vec<u32> = reader
                .tensor("id_table", Dtype::U32)?
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let mut codebooks: Vec<Option<Codebook>> = (0..ladder.rungs()).map(|_| None).collect();
            if rung_byte {
                let sizes: Vec<[usize; 2]> =
                    serde_json::from_str(meta(&reader.header, CODEBOOK_RUNGS)?).map_err(|_| {
                        Error::format(format!(
                            "{CODEBOOK_RUNGS} is not a list of [rung, levels] pairs"
                        ))
                    })?;
                let mut at = 0usize;
                for [j, len] in sizes {
                    let end = at.saturating_add(len);
                    let (Some(slot), Some(table)) = (codebooks.get_mut(j), levels.get(at..end))
                    else {
                        return Err(Error::corrupt(format!(
                            "{CODEBOOK_RUNGS} lists rung {j} ({len} levels) outside the ladder's {} rungs or the codebook's {} levels",
                            ladder.rungs(),
                            levels.len()
                        )));
                    };
                    if slot.is_some() {
                        return Err(Error::corrupt(format!(
                            "{CODEBOOK_RUNGS} lists rung {j} twice"
                        )));
                    }
                    *slot = Some(Codebook::from_stored(ladder.rung(j), table.to_vec())?);
                    at = end;
                }
                if at != levels.len() {
                    return Err(Error::corrupt(format!(
                        "the codebook holds {} levels but {CODEBOOK_RUNGS} accounts for {at}",
                        levels.len()
                    )));
                }
            } else {
                codebooks[0] = Some(Codebook::from_stored(ladder.rung(0), levels)?);
            }
            reader.codec = Codec::compact(
                top_k,
                vocab,
                zstd_level,
                ladder,
                codebooks,
                rung_byte,
                IdTable::from_stored(ids, vocab)?,
            );
        }
        // validate the index once so later lookups can trust it
        let payload_len = reader.tensor("payload", Dtype::U8)?.len() as u64;
        for i in 0..n {
            let row = reader.index_row(i);
            if row.frame.end > payload_len || row.frame.start > row.frame.end {
                return Err(Error::corrupt(format!(
                    "record {i}: its frame lies outside the payload"
                )));
            }
        }
        let h = &reader.header;
        check_key_offsets(
            &reader.mmap[h.tensors["key_offsets"].range.clone()],
            h.tensors["key_bytes"].range.len(),
        )?;
        Ok(reader)
    }

    fn tensor(&self, name: &str, dtype: Dtype) -> Result<&[u8]> {
        Ok(&self.mmap[vector_range(&self.header, name, dtype)?])
    }

    #[inline]
    fn u64_at(&self, tensor_at: usize, i: usize) -> u64 {
        let off = tensor_at + 8 * i;
        u64::from_le_bytes(self.mmap[off..off + 8].try_into().unwrap())
    }

    pub fn len(&self) -> usize {
        self.n
    }
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    #[inline]
    pub fn index_row(&self, i: usize) -> IndexRow {
        let base = i * INDEX_COLS;
        let g = |c| self.u64_at(self.index_at, base + c);
        let (start, len) = (g(0), g(1));
        IndexRow {
            frame: start..start.saturating_add(len),
            n_tokens: g(2),
            n_supervised: g(3),
            token_hash: g(4),
        }
    }

    pub fn key_hash(&self, i: usize) -> u64 {
        self.u64_at(self.key_hash_at, i)
    }

    pub fn key_bytes(&self, i: usize) -> &[u8] {
        let (a, b) = (
            self.u64_at(self.key_offsets_at, i) as usize,
            self.u64_at(self.key_offsets_at, i + 1) as usize,
        );
        &self.mmap[self.key_bytes_at + a..self.key_bytes_at + b]
    }

    pub fn key(&self, i: usize) -> Result<Key> {
        Key::decode(self.key_bytes(i))
            .map_err(|e| e.at(format!("shard {}, record {i}", self.path.display())))
    }

    pub fn frame(&self, i: usize) -> &[u8] {
        let r = self.index_row(i).frame;
        &self.mmap[self.payload_at + r.start as usize..self.payload_at + r.end as usize]
    }

    /// Decode record `i`.
    pub fn decode(&self, i: usize) -> Result<Record> {
        let row = self.checked_row(i)?;
        let key = self.key(i)?;
        self.codec
            .decode(
                self.frame(i),
                key,
                row.n_tokens as usize,
                row.n_supervised as usize,
            )
            .map_err(|e| e.at(format!("shard {}, record {i}", self.path.display())))
    }

    /// Row `i` of the record index, checked before anything is sized by it: `n_tokens` in
    /// `1..=MAX_RECORD_TOKENS`, `n_supervised < n_tokens`, and both consistent with the content
    /// size the record's zstd frame declares in its header (which is itself bounded by the
    /// frame's length: a zstd block of at least 4 bytes yields at most 128 KiB). A damaged index
    /// (a flipped token count) is a corruption error naming the shard, the record and the field,
    /// never an allocation sized by the damaged value.
    pub fn checked_row(&self, i: usize) -> Result<IndexRow> {
        self.checked_row_inner(i)
            .map_err(|e| e.at(format!("shard {}, record {i}", self.path.display())))
    }

    fn checked_row_inner(&self, i: usize) -> Result<IndexRow> {
        if i >= self.n {
            return Err(Error::input(format!(
                "record {i} is out of range: the shard has {} records",
                self.n
            )));
        }
        let row = self.index_row(i);
        let (t, s) = (row.n_tokens, row.n_supervised);
        if t == 0 || t > MAX_RECORD_TOKENS {
            return Err(Error::corrupt(format!(
                "record_index field n_tokens = {t} is outside 1..={MAX_RECORD_TOKENS}; the index is damaged — restore the shard or rebuild the cache"
            )));
        }
        if s >= t {
            return Err(Error::corrupt(format!(
                "record_index field n_supervised = {s} is not below n_tokens = {t} (position 0 is never supervised); the index is damaged"
            )));
        }
        let frame = self.frame(i);
        let declared = match zstd::zstd_safe::get_frame_content_size(frame) {
            Ok(Some(n)) => n,
            _ => {
                return Err(Error::corrupt(format!(
                    "record_index fields offset/length ({}..{}) do not point at a zstd frame with a content size",
                    row.frame.start, row.frame.end
                )))
            }
        };
        if declared > (frame.len() as u64).saturating_mul(MAX_ZSTD_RATIO) {
            return Err(Error::corrupt(format!(
                "the frame declares {declared} decoded bytes, more than its {} bytes can hold; the payload or the index field length is damaged",
                frame.len()
            )));
        }
        // The tokens section alone takes 4 bytes per token plus the mask bit.
        let min_raw = t
            .saturating_mul(4)
            .saturating_add(t.div_ceil(8))
            .saturating_add(3);
        if min_raw > declared {
            return Err(Error::corrupt(format!(
                "record_index field n_tokens = {t} needs at least {min_raw} decoded bytes but the frame declares {declared}; the index is damaged"
            )));
        }
        let cap = self.codec.max_raw_size(t as usize, s as usize) as u64;
        if declared > cap {
            return Err(Error::corrupt(format!(
                "the frame declares {declared} decoded bytes, more than the {cap} a record of n_tokens = {t} / n_supervised = {s} (record_index) can need; the frame header or the index is damaged"
            )));
        }
        Ok(row)
    }

    /// The whole mapped file (for checksums).
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.header.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::header_end;

    /// The bytes of a shard of `keys` (frames are arbitrary bytes: the key tables never look
    /// at them), and the reader of it.
    fn shard(keys: &[Key]) -> (ShardReader, Vec<u8>) {
        // a fresh directory per call (tests run in parallel)
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tsft-keytables-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut b = ShardBuilder::default();
        for (i, k) in keys.iter().enumerate() {
            let key = k.encode();
            b.push(EncodedRecord {
                key_hash: hash::key_hash(&key),
                key,
                n_tokens: 2,
                n_supervised: 1,
                token_hash: i as u64,
                frame: vec![i as u8; 16],
                rungs: None,
            });
        }
        b.commit(&dir, "s.safetensors", &Codec::exact(4, 100, 1))
            .unwrap();
        let path = dir.join("s.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        let reader = ShardReader::open(&path, Some(bytes.len() as u64)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap(); // the map stays valid
        (reader, bytes)
    }

    /// What a ranged reader does: the header, then only the ranges the tables need.
    fn read(bytes: &[u8], records: usize, which: Option<&[usize]>) -> Result<(Vec<u64>, Vec<Key>)> {
        let end = header_end(&bytes[..8], bytes.len())?;
        let t = ShardKeyTables::parse(&bytes[..end], bytes.len(), Some(records))?;
        let fetch = |keys| {
            FilePieces::new(
                t.ranges(keys)
                    .into_iter()
                    .map(|r| (r.start, &bytes[r]))
                    .collect(),
            )
        };
        let hashes = t.key_hashes(&fetch(false))?;
        let keys = match which {
            Some(w) => t.keys(&fetch(true), w)?,
            None => vec![],
        };
        Ok((hashes, keys))
    }

    fn keys() -> Vec<Key> {
        (0..5)
            .map(Key::Int)
            .chain(["a", "bé"].map(|s| Key::Str(s.into())))
            .collect()
    }

    #[test]
    fn key_tables_match_the_reader_without_the_payload() {
        let keys = keys();
        let (r, bytes) = shard(&keys);
        let (hashes, got) = read(&bytes, keys.len(), Some(&[6, 0, 5])).unwrap();
        assert_eq!(
            hashes,
            (0..r.len()).map(|i| r.key_hash(i)).collect::<Vec<_>>()
        );
        assert_eq!(got, vec![keys[6].clone(), keys[0].clone(), keys[5].clone()]);
        let end = header_end(&bytes[..8], bytes.len()).unwrap();
        let t = ShardKeyTables::parse(&bytes[..end], bytes.len(), None).unwrap();
        let payload = t.header.tensors["payload"].range.clone();
        for r in t.ranges(false).into_iter().chain(t.ranges(true)) {
            assert!(
                r.end <= payload.start || r.start >= payload.end,
                "{r:?} reads the payload"
            );
        }
    }

    /// The error of reading the shard of [`keys`] with the first byte of `region` flipped
    /// (`"header"`: a byte of its JSON, inside the metadata's "target-sft-shard").
    fn damaged(region: &str, which: Option<&[usize]>) -> Error {
        let keys = keys();
        let (_, mut bytes) = shard(&keys);
        let h = parse_header(&bytes, bytes.len()).unwrap();
        let at = match region {
            HEADER_REGION => {
                let json = &bytes[..h.data_start];
                let f = SHARD_FORMAT.as_bytes();
                json.windows(f.len()).position(|w| w == f).unwrap() + 3
            }
            name => h.tensors[name].range.start,
        };
        bytes[at] ^= 0x01;
        read(&bytes, keys.len(), which).unwrap_err()
    }

    #[test]
    fn a_damaged_table_or_header_is_a_corruption_naming_the_region() {
        for (region, which) in [
            ("key_hash", None),
            ("key_offsets", Some(&[1usize][..])),
            ("key_bytes", Some(&[1][..])),
            (HEADER_REGION, None),
        ] {
            let e = damaged(region, which);
            assert_eq!(e.kind, ErrorKind::Corruption, "{e}");
            assert!(e.message.contains(&format!("region {region} ")), "{e}");
        }
        // key_bytes are not read for the hashes: damaged, they do not stop them
        let keys = keys();
        let (_, mut bytes) = shard(&keys);
        let h = parse_header(&bytes, bytes.len()).unwrap();
        bytes[h.tensors["key_bytes"].range.start] ^= 1;
        assert!(read(&bytes, keys.len(), None).is_ok());
    }

    #[test]
    fn a_truncated_header_or_another_record_count_is_refused() {
        let keys = keys();
        let (_, bytes) = shard(&keys);
        let e = read(&bytes[..bytes.len() - 1], keys.len(), None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corruption, "{e}");
        let e = header_end(&(u64::MAX / 2).to_le_bytes(), bytes.len()).unwrap_err();
        assert!(e.message.contains("does not fit"), "{e}");
        let e = read(&bytes, keys.len() + 1, None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Corruption, "{e}");
        assert!(e.message.contains("the manifest lists 8"), "{e}");
        // a range the caller did not read is its bug, named
        let end = header_end(&bytes[..8], bytes.len()).unwrap();
        let t = ShardKeyTables::parse(&bytes[..end], bytes.len(), None).unwrap();
        let e = t.key_hashes(&FilePieces::new(vec![])).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Input, "{e}");
    }
}
