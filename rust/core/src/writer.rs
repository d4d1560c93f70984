//! The cache writer (docs/FORMAT.md §Writing).
//!
//! `add` validates a record on the caller's thread, then hands it to a pool of encoder threads;
//! a committer thread puts encoded records back in `add` order, rolls shards at a size limit,
//! writes each shard atomically and rewrites the manifest after every shard, so a crash loses at
//! most the records of the shard being filled, and never leaves a file a reader would accept
//! half-written. The compact codec first buffers `prior_records` records to learn the id table.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Receiver, Sender};
use serde_json::Value;
use xxhash_rust::xxh3::xxh3_128;

use crate::codec::{Codec, CodecKind, EncodeScratch, IdTable, LadderParams, DEFAULT_MAX_MEAN_KL};
use crate::error::{Error, ErrorKind, Result};
use crate::fsutil::TMP_PREFIX;
use crate::lock::{writer_locks, Lock, LockWait};
use crate::manifest::{Manifest, Role, ShardEntry, CACHE_FORMAT, FORMAT_VERSION, MANIFEST_NAME};
use crate::record::{Record, Stamp};
use crate::shard::{codec_params_json, EncodedRecord, ShardBuilder, ShardReader};
use crate::stats::Fidelity;

/// Everything that configures a writer.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub codec: CodecKind,
    pub top_k: usize,
    pub vocab_size: usize,
    pub zstd_level: i32,
    /// The compact codec's codebooks: a budget ladder (the default, `max_mean_kl` 1e-4) or one
    /// fixed rung (docs/FORMAT.md §5.1).
    pub ladder: LadderParams,
    /// A shard is committed once its payload reaches this many bytes.
    pub shard_bytes: u64,
    /// Encoder threads (0 = one per available core).
    pub threads: usize,
    pub temperature: f64,
    pub tokenizer: Value,
    pub teacher: Value,
    /// The manifest's `role` (what the cached model is to a training run).
    pub role: Role,
    /// Shard files are named `{prefix}-{n:06}.safetensors`.
    pub shard_prefix: String,
    /// The manifest file this writer keeps (`manifest.json`; several writers building one
    /// cache each keep their own, merged by [`Manifest::merge`]).
    pub manifest_name: String,
    /// Records buffered to learn the compact codec's id table.
    pub prior_records: usize,
    /// Largest id table (the most frequent ids of the buffered records).
    pub id_table_size: usize,
    /// Add to an existing cache instead of requiring an empty directory.
    pub append: bool,
    pub created_by: String,
    /// What to do when another writer holds this writer's locks (`crate::lock`).
    pub lock_wait: LockWait,
    /// Compact: write frames without a rung byte, with the ladder's one fixed codebook (set
    /// when appending to a cache of format version 1–2; docs/FORMAT.md §5.1).
    pub legacy_codebook: bool,
}

impl WriterOptions {
    pub fn new(top_k: usize, vocab_size: usize) -> Self {
        Self {
            codec: CodecKind::Compact,
            top_k,
            vocab_size,
            zstd_level: 3,
            ladder: LadderParams::budget(DEFAULT_MAX_MEAN_KL, -48.0),
            shard_bytes: 256 << 20,
            threads: 0,
            temperature: 1.0,
            tokenizer: Value::Object(Default::default()),
            teacher: Value::Object(Default::default()),
            role: Role::Teacher,
            shard_prefix: "shard".into(),
            manifest_name: MANIFEST_NAME.into(),
            prior_records: 64,
            id_table_size: 8192,
            append: false,
            created_by: format!("target-sft-core {}", env!("CARGO_PKG_VERSION")),
            lock_wait: LockWait::No,
            legacy_codebook: false,
        }
    }
}

/// A record on its way to the encoders, with the sum of its rows' teacher entropies if given.
type Job = (u64, Record, Option<f64>);
/// An encoded record and its statistics ([`Fidelity::of_record`]).
type Done = (u64, EncodedRecord, Fidelity);

struct Pipeline {
    jobs: Option<Sender<Job>>,
    encoders: Vec<JoinHandle<()>>,
    committer: Option<JoinHandle<Result<Manifest>>>,
}

/// Writes a cache directory. Call [`CacheWriter::close`] to finish it.
pub struct CacheWriter {
    dir: PathBuf,
    opts: WriterOptions,
    base: Manifest,
    next_shard: u64,
    stamp: Stamp,
    seen: HashSet<u128>,
    pending: Vec<(Record, Option<f64>)>,
    pipeline: Option<Pipeline>,
    error: Arc<Mutex<Option<Error>>>,
    seq: u64,
    closed: bool,
    /// Held until the writer finishes (or is dropped): see `crate::lock`.
    locks: Vec<Lock>,
}

fn first_error(slot: &Mutex<Option<Error>>, e: Error) {
    let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
    if g.is_none() {
        *g = Some(e);
    }
}

fn compare(field: &str, cached: &Value, ours: &Value) -> Result<()> {
    if cached != ours {
        return Err(Error::mismatch(format!(
            "cannot append: {} (the cache's vs this writer's); write to a new directory or use the cache's settings",
            crate::manifest::first_difference(field, cached, ours)
        )));
    }
    Ok(())
}

impl CacheWriter {
    pub fn create(dir: &Path, mut opts: WriterOptions) -> Result<Self> {
        if opts.top_k == 0 || opts.top_k > 256 {
            return Err(Error::input(format!(
                "top_k = {} must be between 1 and 256",
                opts.top_k
            )));
        }
        if opts.vocab_size == 0 || opts.vocab_size > (1 << 31) {
            return Err(Error::input(format!(
                "vocab_size = {} must be between 1 and 2^31",
                opts.vocab_size
            )));
        }
        if opts.top_k > opts.vocab_size {
            return Err(Error::input(format!(
                "top_k = {} is larger than vocab_size = {}",
                opts.top_k, opts.vocab_size
            )));
        }
        if !(opts.temperature.is_finite() && opts.temperature > 0.0) {
            return Err(Error::input(format!(
                "temperature = {} must be a positive number",
                opts.temperature
            )));
        }
        if !(-7..=22).contains(&opts.zstd_level) {
            return Err(Error::input(format!(
                "zstd_level = {} must be in [-7, 22]",
                opts.zstd_level
            )));
        }
        if opts.shard_prefix.is_empty()
            || opts.shard_prefix.starts_with('.')
            || !opts
                .shard_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            return Err(Error::input(format!(
                "shard_prefix {:?} must be non-empty ASCII letters, digits, '-' or '_'",
                opts.shard_prefix
            )));
        }
        let mn = &opts.manifest_name;
        if !(mn.starts_with("manifest")
            && mn.ends_with(".json")
            && mn
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
        {
            return Err(Error::input(format!(
                "manifest_name {mn:?} must look like manifest[-_.A-Za-z0-9]*.json"
            )));
        }
        opts.ladder.validate()?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io("cannot create", dir, e))?;
        // Before anything is read or cleaned up: no other live writer owns these files.
        let locks = writer_locks(dir, &opts.shard_prefix, &opts.manifest_name, opts.lock_wait)?;
        let codec_params = match opts.codec {
            CodecKind::Exact => codec_params_json(opts.zstd_level, None, false),
            CodecKind::Compact => {
                // fixed steps must give a valid codebook (the budget ladder's rungs all do: a
                // unit test of codebook.rs builds them)
                if opts.ladder.max_mean_kl.is_none() {
                    for j in 0..opts.ladder.rungs() {
                        crate::codec::Codebook::new(opts.ladder.rung(j))?;
                    }
                }
                codec_params_json(opts.zstd_level, Some(&opts.ladder), false)
            }
        };
        let mut base = Manifest {
            format: CACHE_FORMAT.into(),
            format_version: FORMAT_VERSION,
            codec: opts.codec.name().into(),
            codec_params,
            top_k: opts.top_k,
            vocab_size: opts.vocab_size,
            temperature: opts.temperature,
            tokenizer: opts.tokenizer.clone(),
            teacher: opts.teacher.clone(),
            complete: false,
            num_records: 0,
            num_tokens: 0,
            num_supervised: 0,
            shards: Vec::new(),
            created_by: opts.created_by.clone(),
            stats: None,
            role: opts.role,
        };
        let mut seen = HashSet::new();
        let has_manifest = dir.join(&opts.manifest_name).exists();
        let any_shard = !list_orphans(dir, &[], None)?.is_empty();
        if !opts.append && (has_manifest || any_shard || dir.join(MANIFEST_NAME).exists()) {
            return Err(Error::input(format!(
                "{} already holds a cache; pass mode=\"append\" to add records to it, or choose an empty directory",
                dir.display()
            )));
        }
        if has_manifest {
            let old = Manifest::load_named(dir, &opts.manifest_name)?;
            if old.codec == "compact"
                && opts.codec == CodecKind::Compact
                && old.codec_params.get("sqrt_steps").is_none()
            {
                // a compact cache of format version 1–2: keep its one fixed codebook, and
                // frames without a rung byte (docs/FORMAT.md §5.1)
                let (ladder, _) = LadderParams::from_json(&old.codec_params)?;
                base.codec_params = codec_params_json(opts.zstd_level, Some(&ladder), true);
                opts.ladder = ladder;
                opts.legacy_codebook = true;
            }
            for ((field, cached), (_, ours)) in old.settings().iter().zip(base.settings().iter()) {
                compare(field, cached, ours)?;
            }
            base.shards = old.shards;
            base.created_by = old.created_by;
        }
        // Remove temp files of dead writers, finish interrupted shard rewrites, adopt shards
        // committed after the last manifest.
        remove_stale_tmp(dir, &opts.shard_prefix, &opts.manifest_name)?;
        finish_rewrites(dir, &mut base, &opts.shard_prefix, &opts.manifest_name)?;
        let known: Vec<String> = base.shards.iter().map(|s| s.file.clone()).collect();
        // Only shards with this writer's prefix: other writers of a multi-writer build own theirs.
        for file in list_orphans(dir, &known, Some(&opts.shard_prefix))? {
            let entry = adopt(dir, &file, &base)?;
            base.shards.push(entry);
        }
        for s in &base.shards {
            let r = ShardReader::open(&dir.join(&s.file), Some(s.bytes))?;
            for i in 0..r.len() {
                seen.insert(xxh3_128(r.key_bytes(i)));
            }
        }
        base.recount();
        let next_shard = base
            .shards
            .iter()
            .filter_map(|s| shard_number(&s.file, &opts.shard_prefix))
            .max()
            .map_or(0, |n| n + 1);
        if !base.shards.is_empty() {
            base.store_named(dir, &opts.manifest_name)?;
        }
        let w = Self {
            dir: dir.to_path_buf(),
            opts,
            base,
            next_shard,
            stamp: Stamp::default(),
            seen,
            pending: Vec::new(),
            pipeline: None,
            error: Arc::new(Mutex::new(None)),
            seq: 0,
            closed: false,
            locks,
        };
        Ok(w)
    }

    /// Records already in the cache when this writer opened it (append mode) plus those added.
    pub fn num_records(&self) -> u64 {
        self.base.num_records + self.seq + self.pending.len() as u64
    }

    /// Whether a key is already in the cache or was added to this writer.
    pub fn contains(&self, key: &crate::record::Key) -> bool {
        self.seen.contains(&xxh3_128(&key.encode()))
    }

    fn check_error(&self) -> Result<()> {
        let g = self.error.lock().unwrap_or_else(|p| p.into_inner());
        match &*g {
            Some(e) => Err(Error::new(
                e.kind,
                format!("the writer failed earlier: {}", e.message),
            )),
            None => Ok(()),
        }
    }

    /// Validate and queue one record. Blocks while the encoders are behind.
    pub fn add(&mut self, rec: Record) -> Result<()> {
        self.add_with_entropy(rec, None)
    }

    /// [`CacheWriter::add`], with the teacher's full-vocabulary entropy (nats) of each
    /// supervised row: used for the manifest's statistics only ([`Fidelity`]), not stored.
    pub fn add_with_entropy(&mut self, rec: Record, entropy: Option<&[f64]>) -> Result<()> {
        if self.closed {
            return Err(Error::input("add() on a closed CacheWriter"));
        }
        self.check_error()?;
        rec.validate(self.opts.vocab_size, self.opts.top_k, &mut self.stamp)?;
        let entropy = entropy
            .map(|e| crate::stats::entropy_sum(&rec, self.opts.vocab_size, e))
            .transpose()?;
        let kh = xxh3_128(&rec.key.encode());
        if !self.seen.insert(kh) {
            return Err(Error::input(format!(
                "duplicate key {}: the cache already holds a record with this key; keys must be unique",
                rec.key
            )));
        }
        if self.pipeline.is_none() && self.opts.codec == CodecKind::Exact {
            self.start_pipeline();
        }
        if self.pipeline.is_none() {
            self.pending.push((rec, entropy));
            if self.pending.len() >= self.opts.prior_records.max(1) {
                self.start_compact();
                self.flush_pending()?;
            }
            return Ok(());
        }
        self.dispatch(rec, entropy)
    }

    fn dispatch(&mut self, rec: Record, entropy: Option<f64>) -> Result<()> {
        let seq = self.seq;
        self.seq += 1;
        let tx = self
            .pipeline
            .as_ref()
            .and_then(|p| p.jobs.as_ref())
            .expect("pipeline running");
        if tx.send((seq, rec, entropy)).is_err() {
            self.check_error()?;
            return Err(Error::new(
                ErrorKind::Io,
                "the writer's threads stopped unexpectedly",
            ));
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<()> {
        for (rec, entropy) in std::mem::take(&mut self.pending) {
            self.dispatch(rec, entropy)?;
        }
        Ok(())
    }

    /// Start the encoder and committer threads (lazily, at the first record or at close, so that
    /// [`CacheWriter::drop_keys`] can still rewrite committed shards before).
    fn start_pipeline(&mut self) {
        match self.opts.codec {
            CodecKind::Exact => {
                let codec =
                    Codec::exact(self.opts.top_k, self.opts.vocab_size, self.opts.zstd_level);
                self.start(codec);
            }
            CodecKind::Compact => self.start_compact(),
        }
    }

    fn start_compact(&mut self) {
        let mut counts = vec![0u64; self.opts.vocab_size];
        for (r, _) in &self.pending {
            for &id in r.topk_ids.iter().filter(|&&x| x >= 0) {
                counts[id as usize] += 1;
            }
        }
        let mut codec = Codec::compact_writer(
            self.opts.top_k,
            self.opts.vocab_size,
            self.opts.zstd_level,
            self.opts.ladder.clone(),
            IdTable::from_counts(&counts, self.opts.id_table_size),
        );
        codec.rung_byte = !self.opts.legacy_codebook;
        self.start(codec);
    }

    fn start(&mut self, codec: Codec) {
        let codec = Arc::new(codec);
        let threads = if self.opts.threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            self.opts.threads
        };
        let (job_tx, job_rx) = bounded::<Job>(threads * 4);
        let (done_tx, done_rx) = bounded::<Done>(threads * 4);
        let encoders = (0..threads)
            .map(|i| {
                let (rx, tx, codec, err) = (
                    job_rx.clone(),
                    done_tx.clone(),
                    codec.clone(),
                    self.error.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("tsft-encode-{i}"))
                    .spawn(move || encoder_loop(rx, tx, &codec, &err))
                    .expect("spawn encoder thread")
            })
            .collect();
        drop(done_tx);
        let committer = {
            let (dir, base, err) = (self.dir.clone(), self.base.clone(), self.error.clone());
            let (prefix, manifest_name, shard_bytes, next) = (
                self.opts.shard_prefix.clone(),
                self.opts.manifest_name.clone(),
                self.opts.shard_bytes,
                self.next_shard,
            );
            std::thread::Builder::new()
                .name("tsft-commit".into())
                .spawn(move || {
                    let target = CommitTarget {
                        dir: &dir,
                        prefix: &prefix,
                        manifest_name: &manifest_name,
                        shard_bytes,
                    };
                    let r = commit_loop(done_rx, &target, base, &codec, next);
                    if let Err(e) = &r {
                        first_error(&err, e.clone());
                    }
                    r
                })
                .expect("spawn committer thread")
        };
        self.pipeline = Some(Pipeline {
            jobs: Some(job_tx),
            encoders,
            committer: Some(committer),
        });
    }

    /// Encode what is queued, commit the last shard and mark the manifest complete.
    pub fn close(&mut self) -> Result<Manifest> {
        self.finish(true)
    }

    /// Encode what is queued and commit the last shard. With `complete = false` (the caller
    /// stopped on an error) the manifest stays marked incomplete: every record added is kept,
    /// and the cache can be appended to.
    pub fn finish(&mut self, complete: bool) -> Result<Manifest> {
        if self.closed {
            return Err(Error::input("close() called twice"));
        }
        self.closed = true;
        if self.pipeline.is_none() {
            self.start_pipeline();
            self.flush_pending()?;
        }
        let mut p = self.pipeline.take().expect("pipeline");
        drop(p.jobs.take());
        // a panicked encoder drops its record without an error: never report such a close as
        // a success (the manifest stays incomplete)
        let panicked = p.encoders.drain(..).any(|h| h.join().is_err());
        let committed = p.committer.take().expect("committer").join();
        self.check_error()?;
        if panicked {
            return Err(Error::new(
                ErrorKind::Io,
                "an encoder thread panicked; records added since the last committed shard may be missing — the manifest stays incomplete: append them again",
            ));
        }
        let mut m = match committed {
            Ok(r) => r?,
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Io,
                    "the writer's commit thread panicked",
                ))
            }
        };
        m.complete = complete;
        m.store_named(&self.dir, &self.opts.manifest_name)?;
        self.locks.clear();
        Ok(m)
    }
}

impl Drop for CacheWriter {
    fn drop(&mut self) {
        // Not closed (an exception, or the process unwinding): stop the threads. Shards already
        // committed stay; the manifest stays marked incomplete so the cache can be appended to.
        if let Some(mut p) = self.pipeline.take() {
            drop(p.jobs.take());
            for h in p.encoders.drain(..) {
                let _ = h.join();
            }
            if let Some(h) = p.committer.take() {
                let _ = h.join();
            }
        }
    }
}

fn encoder_loop(rx: Receiver<Job>, tx: Sender<Done>, codec: &Codec, err: &Mutex<Option<Error>>) {
    let mut scratch = EncodeScratch::default();
    for (seq, rec, entropy) in rx {
        match codec.encode(&rec, &mut scratch) {
            Ok(frame) => {
                let (rungs, costs) = match codec.kind {
                    CodecKind::Compact => {
                        let (rungs, costs) = scratch.compact_costs();
                        (Some([rungs.a, rungs.b]), Some(costs))
                    }
                    CodecKind::Exact => (None, None),
                };
                let stats = Fidelity::of_record(&rec, codec.top_k, costs, entropy);
                let mut enc = EncodedRecord::new(&rec, frame);
                enc.rungs = rungs;
                if tx.send((seq, enc, stats)).is_err() {
                    return;
                }
            }
            Err(e) => {
                first_error(err, e.at(format!("record {}", rec.key)));
                return;
            }
        }
    }
}

/// Where and how the committer writes shards.
struct CommitTarget<'a> {
    dir: &'a Path,
    prefix: &'a str,
    manifest_name: &'a str,
    shard_bytes: u64,
}

fn commit_loop(
    rx: Receiver<Done>,
    t: &CommitTarget<'_>,
    mut manifest: Manifest,
    codec: &Codec,
    mut next_shard: u64,
) -> Result<Manifest> {
    let mut reorder: BTreeMap<u64, (EncodedRecord, Fidelity)> = BTreeMap::new();
    let mut want = 0u64;
    let mut shard = ShardBuilder::default();
    // the statistics of the shard being filled, absorbed in record order
    let mut shard_stats = Fidelity::default();
    let commit = |shard: ShardBuilder,
                  stats: Fidelity,
                  manifest: &mut Manifest,
                  next_shard: &mut u64|
     -> Result<()> {
        let file = format!("{}-{:06}.safetensors", t.prefix, *next_shard);
        *next_shard += 1;
        let mut entry = shard.commit(t.dir, &file, codec)?;
        entry.stats = Some(stats);
        manifest.shards.push(entry);
        manifest.recount();
        manifest.store_named(t.dir, t.manifest_name)
    };
    for (seq, rec, stats) in rx {
        reorder.insert(seq, (rec, stats));
        while let Some((rec, stats)) = reorder.remove(&want) {
            want += 1;
            shard.push(rec);
            shard_stats.absorb(&stats);
            if shard.payload_bytes() as u64 >= t.shard_bytes {
                commit(
                    std::mem::take(&mut shard),
                    std::mem::take(&mut shard_stats),
                    &mut manifest,
                    &mut next_shard,
                )?;
            }
        }
    }
    if !reorder.is_empty() {
        return Err(Error::new(
            ErrorKind::Io,
            "an encoder thread stopped before finishing its records",
        ));
    }
    if !shard.is_empty() {
        commit(shard, shard_stats, &mut manifest, &mut next_shard)?;
    }
    Ok(manifest)
}

fn shard_number(file: &str, prefix: &str) -> Option<u64> {
    file.strip_prefix(prefix)?
        .strip_prefix('-')?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

/// Shard files of `dir` not in `known` (only those named `{prefix}-NNNNNN.safetensors` when a
/// prefix is given).
fn list_orphans(dir: &Path, known: &[String], prefix: Option<&str>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io("cannot list", dir, e)),
    };
    for ent in rd {
        let ent = ent.map_err(|e| Error::io("cannot list", dir, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        let ours = prefix.is_none_or(|p| shard_number(&name, p).is_some());
        if name.ends_with(".safetensors")
            && !name.starts_with('.')
            && !known.contains(&name)
            && ours
        {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Delete the temp files (`.tmp-{pid}-{name}`) a dead writer left for this writer's own files:
/// its shards (`{prefix}-…`) and its manifest. Other writers of the same directory (the other
/// ranks of a build) may be writing theirs right now; no live writer owns these names, since this
/// one holds their locks (`crate::lock`).
fn remove_stale_tmp(dir: &Path, prefix: &str, manifest_name: &str) -> Result<()> {
    for ent in std::fs::read_dir(dir)
        .map_err(|e| Error::io("cannot list", dir, e))?
        .flatten()
    {
        let file = ent.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(TMP_PREFIX) else {
            continue;
        };
        let name = rest.split_once('-').map_or("", |(_pid, name)| name);
        if name == manifest_name || shard_number(name, prefix).is_some() {
            let _ = std::fs::remove_file(ent.path());
        }
    }
    Ok(())
}

/// Describe a complete shard file that the manifest does not list yet.
fn adopt(dir: &Path, file: &str, base: &Manifest) -> Result<ShardEntry> {
    let path = dir.join(file);
    let r = ShardReader::open(&path, None)?;
    let md = r.metadata();
    let same = md.get("codec").map(String::as_str) == Some(base.codec.as_str())
        && md.get("top_k") == Some(&base.top_k.to_string())
        && md.get("vocab_size") == Some(&base.vocab_size.to_string());
    if !same {
        return Err(Error::mismatch(format!(
            "{} is a shard of another cache (codec/top_k/vocab_size differ); move it away",
            path.display()
        )));
    }
    let (mut tokens, mut supervised) = (0, 0);
    for i in 0..r.len() {
        let row = r.checked_row(i)?;
        tokens += row.n_tokens;
        supervised += row.n_supervised;
    }
    Ok(ShardEntry {
        file: file.to_string(),
        records: r.len() as u64,
        bytes: r.bytes().len() as u64,
        checksum: crate::hash::file_checksum(r.bytes()),
        tokens,
        supervised,
        stats: None, // the entropies and exact values behind the statistics are gone
    })
}

// ---------------------------------------------------------------------------------------------
// Dropping records (a rebuild of records whose data changed) and its crash recovery.

/// Shard metadata naming the shard file a rewritten shard replaces (docs/FORMAT.md §6).
pub const REPLACES: &str = "replaces";

impl CacheWriter {
    /// Remove the records of `keys` from this writer's committed shards (keys it does not hold
    /// are ignored); returns how many were removed. Must be called before the first `add`.
    ///
    /// Each shard holding a dropped key is rewritten: the raw frames of its other records are
    /// copied (no decoding) into a new shard whose metadata names the old one (`replaces`),
    /// committed atomically; then the manifest lists the new shard in the old one's place; then
    /// the old file is deleted. After a crash at any point, [`CacheWriter::create`] in append mode
    /// completes the step (an orphan that replaces a listed shard takes its place; a file that a
    /// shard replaces is deleted), so every kept record is listed exactly once.
    pub fn drop_keys(&mut self, keys: &[crate::record::Key]) -> Result<u64> {
        if self.closed || self.pipeline.is_some() || !self.pending.is_empty() || self.seq > 0 {
            return Err(Error::input(
                "drop_keys() must be called before the first add() of a writer",
            ));
        }
        let doomed: HashSet<Vec<u8>> = keys.iter().map(crate::record::Key::encode).collect();
        let mut dropped = 0u64;
        for idx in 0..self.base.shards.len() {
            let entry = self.base.shards[idx].clone();
            let old_path = self.dir.join(&entry.file);
            let r = ShardReader::open(&old_path, Some(entry.bytes))?;
            let hit: Vec<usize> = (0..r.len())
                .filter(|&i| doomed.contains(r.key_bytes(i)))
                .collect();
            if hit.is_empty() {
                continue;
            }
            let mut b = ShardBuilder::default();
            // the rewritten shard keeps every codebook rung the old one stored
            b.rungs.extend(
                (0..r.codec.codebooks.len())
                    .filter(|&j| r.codec.has_rung(j))
                    .map(|j| j as u8),
            );
            let mut h = hit.iter().peekable();
            for i in 0..r.len() {
                if h.peek() == Some(&&i) {
                    h.next();
                    continue;
                }
                let row = r.index_row(i);
                b.push(EncodedRecord {
                    key: r.key_bytes(i).to_vec(),
                    key_hash: r.key_hash(i),
                    n_tokens: row.n_tokens,
                    n_supervised: row.n_supervised,
                    token_hash: row.token_hash,
                    frame: r.frame(i).to_vec(),
                    rungs: None,
                });
            }
            b.metadata.insert(REPLACES.into(), entry.file.clone());
            let file = format!(
                "{}-{:06}.safetensors",
                self.opts.shard_prefix, self.next_shard
            );
            self.next_shard += 1;
            let new_entry = b.commit(&self.dir, &file, &r.codec)?;
            fault_point("rewrite:shard-committed");
            self.base.shards[idx] = new_entry;
            self.base.recount();
            self.base.store_named(&self.dir, &self.opts.manifest_name)?;
            fault_point("rewrite:manifest-stored");
            for &i in &hit {
                self.seen.remove(&xxh3_128(r.key_bytes(i)));
            }
            dropped += hit.len() as u64;
            drop(r);
            remove_if_present(&old_path)?;
            crate::fsutil::sync_dir(&self.dir)?;
        }
        Ok(dropped)
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io("cannot delete", path, e))
        }
        _ => Ok(()),
    }
}

/// Complete the shard rewrites a dead writer left half done (see [`CacheWriter::drop_keys`]):
/// an orphan shard (this prefix, not listed) that `replaces` a listed shard takes that shard's
/// place in the manifest (stored at once); then every unlisted file that a listed or orphan
/// shard `replaces` is deleted, so that it is never adopted as an orphan.
fn finish_rewrites(
    dir: &Path,
    base: &mut Manifest,
    prefix: &str,
    manifest_name: &str,
) -> Result<()> {
    let listed = |b: &Manifest| b.shards.iter().map(|s| s.file.clone()).collect::<Vec<_>>();
    let orphans = list_orphans(dir, &listed(base), Some(prefix))?;
    let replaces = |file: &str, bytes: Option<u64>| -> Result<Option<String>> {
        let r = ShardReader::open(&dir.join(file), bytes)?;
        Ok(r.metadata().get(REPLACES).cloned())
    };
    let mut rolled = false;
    let mut retired = Vec::new();
    for file in &orphans {
        if let Some(old) = replaces(file, None)? {
            if let Some(pos) = base.shards.iter().position(|s| s.file == old) {
                base.shards[pos] = adopt(dir, file, base)?;
                rolled = true;
            }
            retired.push(old);
        }
    }
    if rolled {
        base.recount();
        base.store_named(dir, manifest_name)?;
    }
    for s in &base.shards {
        if let Some(old) = replaces(&s.file, Some(s.bytes))? {
            retired.push(old);
        }
    }
    let now = listed(base);
    for old in retired {
        if !now.contains(&old) && shard_number(&old, prefix).is_some() {
            remove_if_present(&dir.join(&old))?;
        }
    }
    Ok(())
}

/// Fault injection for crash tests: when the environment variable `TARGET_SFT_FAULT` is `name`
/// (or `name@N`: the N-th time this point is reached in this process), the process kills itself
/// with SIGKILL here, as `kill -9` would.
pub fn fault_point(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static HITS: AtomicU64 = AtomicU64::new(0);
    let Ok(spec) = std::env::var("TARGET_SFT_FAULT") else {
        return;
    };
    let (point, nth) = match spec.split_once('@') {
        Some((p, n)) => (p.to_string(), n.parse::<u64>().unwrap_or(1)),
        None => (spec, 1),
    };
    if point == name && HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        #[cfg(unix)]
        // SAFETY: raise() only sends a signal to this process; SIGKILL cannot be handled.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
        std::process::abort();
    }
}
