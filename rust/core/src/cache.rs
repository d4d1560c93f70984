//! Reading a cache directory (docs/FORMAT.md §Reading).
//!
//! Opening reads only the manifest. Shards are memory-mapped on first use. Records are found by
//! global position (O(log shards)) or by key (O(1) through a hash map built, on first use, from
//! the shards' `key_hash` tensors: 8 bytes read per record).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::error::{Error, ErrorKind, Result};
use crate::hash;
use crate::manifest::Manifest;
use crate::record::{Key, Record};
use crate::shard::ShardReader;

pub struct TeacherCache {
    pub dir: PathBuf,
    pub manifest: Manifest,
    shards: Vec<OnceLock<std::result::Result<Arc<ShardReader>, Error>>>,
    /// `starts[i]` = global position of shard i's first record; last entry = total.
    starts: Vec<u64>,
    keys: OnceLock<std::result::Result<KeyMap, Error>>,
}

#[derive(Default)]
struct KeyMap {
    by_hash: HashMap<u64, u64>,
    /// Positions of keys whose 64-bit hash collides with another key's.
    collisions: HashMap<Vec<u8>, u64>,
}

impl TeacherCache {
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::load(dir)?;
        let mut starts = Vec::with_capacity(manifest.shards.len() + 1);
        let mut acc = 0u64;
        for s in &manifest.shards {
            starts.push(acc);
            acc += s.records;
        }
        starts.push(acc);
        Ok(Self {
            dir: dir.to_path_buf(),
            shards: (0..manifest.shards.len())
                .map(|_| OnceLock::new())
                .collect(),
            manifest,
            starts,
            keys: OnceLock::new(),
        })
    }

    pub fn len(&self) -> u64 {
        *self.starts.last().unwrap()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn num_shards(&self) -> usize {
        self.shards.len()
    }

    /// The reader of shard `i`, opened (and validated) on first use.
    pub fn shard(&self, i: usize) -> Result<Arc<ShardReader>> {
        let entry = &self.manifest.shards[i];
        self.shards[i]
            .get_or_init(|| {
                let r = ShardReader::open(&self.dir.join(&entry.file), Some(entry.bytes))?;
                if r.len() as u64 != entry.records
                    || r.codec.top_k != self.manifest.top_k
                    || r.codec.vocab_size != self.manifest.vocab_size
                    || r.codec.kind.name() != self.manifest.codec
                {
                    return Err(Error::corrupt(format!(
                        "shard {}: its records/top_k/vocab_size/codec differ from the manifest's; the file belongs to another cache",
                        entry.file
                    )));
                }
                Ok(Arc::new(r))
            })
            .clone()
    }

    /// (shard, record within shard) of a global position.
    pub fn locate(&self, pos: u64) -> Result<(usize, usize)> {
        if pos >= self.len() {
            return Err(Error::new(
                ErrorKind::KeyNotFound,
                format!(
                    "position {pos} is out of range: the cache has {} records",
                    self.len()
                ),
            ));
        }
        let s = self.starts.partition_point(|&st| st <= pos) - 1;
        Ok((s, (pos - self.starts[s]) as usize))
    }

    pub fn get_at(&self, pos: u64) -> Result<Record> {
        let (s, i) = self.locate(pos)?;
        self.shard(s)?.decode(i)
    }

    /// Key of the record at a global position.
    pub fn key_at(&self, pos: u64) -> Result<Key> {
        let (s, i) = self.locate(pos)?;
        self.shard(s)?.key(i)
    }

    /// The key hashes (XXH3-64 of the encoded keys, verified with each shard's region
    /// checksums when it opens) of positions `start..stop` (`stop` clamped to the length).
    pub fn key_hashes(&self, start: u64, stop: u64) -> Result<Vec<u64>> {
        let stop = stop.min(self.len());
        let mut out = Vec::with_capacity(stop.saturating_sub(start) as usize);
        let mut pos = start;
        while pos < stop {
            let (s, i) = self.locate(pos)?;
            let r = self.shard(s)?;
            let end = r.len().min(i + (stop - pos) as usize);
            out.extend((i..end).map(|j| r.key_hash(j)));
            pos += (end - i) as u64;
        }
        Ok(out)
    }

    fn key_map(&self) -> Result<&KeyMap> {
        self.keys
            .get_or_init(|| {
                let mut m = KeyMap::default();
                m.by_hash.reserve(self.len() as usize);
                for s in 0..self.num_shards() {
                    let r = self.shard(s)?;
                    for i in 0..r.len() {
                        let pos = self.starts[s] + i as u64;
                        let h = r.key_hash(i);
                        if hash::key_hash(r.key_bytes(i)) != h {
                            return Err(Error::corrupt(format!(
                                "shard {}, record {i}: the key does not match its stored hash",
                                self.manifest.shards[s].file
                            )));
                        }
                        if let Some(&other) = m.by_hash.get(&h) {
                            let (os, oi) = self.locate(other)?;
                            if self.shard(os)?.key_bytes(oi) == r.key_bytes(i) {
                                return Err(Error::corrupt(format!(
                                    "key {} appears twice in the cache (shards {} and {})",
                                    r.key(i)?,
                                    self.manifest.shards[os].file,
                                    self.manifest.shards[s].file
                                )));
                            }
                            m.collisions.insert(r.key_bytes(i).to_vec(), pos);
                        } else {
                            m.by_hash.insert(h, pos);
                        }
                    }
                }
                Ok(m)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Global position of a key.
    pub fn position(&self, key: &Key) -> Result<u64> {
        let enc = key.encode();
        let m = self.key_map()?;
        if let Some(&p) = m.collisions.get(&enc) {
            return Ok(p);
        }
        if let Some(&p) = m.by_hash.get(&hash::key_hash(&enc)) {
            let (s, i) = self.locate(p)?;
            if self.shard(s)?.key_bytes(i) == enc.as_slice() {
                return Ok(p);
            }
        }
        Err(Error::new(
            ErrorKind::KeyNotFound,
            format!("key {key} is not in the cache at {}", self.dir.display()),
        ))
    }

    /// Decode the record of `key`. With `input_ids`, check first that the cached record was
    /// built from exactly these tokens.
    pub fn get(&self, key: &Key, input_ids: Option<&[i32]>) -> Result<Record> {
        let pos = self.position(key)?;
        let (s, i) = self.locate(pos)?;
        let shard = self.shard(s)?;
        if let Some(ids) = input_ids {
            let row = shard.index_row(i);
            if row.token_hash != hash::token_hash(ids) {
                // the error path only: decode the record to say how the ids differ
                let cached = shard.decode(i)?.input_ids;
                let why = crate::record::describe_ids(
                    "the ids given",
                    ids,
                    &cached,
                    &self.dir.display().to_string(),
                );
                return Err(Error::mismatch(format!("key {key}: {why}")));
            }
        }
        shard.decode(i)
    }

    /// Check every shard: size, checksum, header, and that every record decodes. Returns the
    /// number of records checked.
    pub fn verify(&self, mut progress: impl FnMut(usize, u64)) -> Result<u64> {
        let mut n = 0;
        for (s, entry) in self.manifest.shards.iter().enumerate() {
            let r = ShardReader::open(&self.dir.join(&entry.file), Some(entry.bytes))?;
            let sum = hash::file_checksum(r.bytes());
            if sum != entry.checksum {
                return Err(Error::corrupt(format!(
                    "shard {}: checksum {sum} differs from the manifest's {}; the file is damaged — restore it or rebuild the cache",
                    entry.file, entry.checksum
                )));
            }
            if r.len() as u64 != entry.records {
                return Err(Error::corrupt(format!(
                    "shard {}: holds {} records, the manifest says {}",
                    entry.file,
                    r.len(),
                    entry.records
                )));
            }
            let mut stamp = crate::record::Stamp::default();
            for i in 0..r.len() {
                let rec = r.decode(i)?;
                // the writer's rules (FORMAT.md §3) hold for every decoded record
                rec.validate(self.manifest.vocab_size, self.manifest.top_k, &mut stamp)
                    .map_err(|e| {
                        Error::corrupt(format!(
                            "shard {}, record {i} decodes to an invalid record: {}",
                            entry.file, e.message
                        ))
                    })?;
                if hash::token_hash(&rec.input_ids) != r.index_row(i).token_hash {
                    return Err(Error::corrupt(format!(
                        "shard {}, record {i}: decoded tokens do not match the stored token hash",
                        entry.file
                    )));
                }
                n += 1;
            }
            progress(s, r.len() as u64);
        }
        self.key_map()?;
        Ok(n)
    }
}
