//! `target_sft._core`: thin PyO3 bindings over `target-sft-core`.
//!
//! Heavy work runs with the GIL released (`py.detach`). Core errors become the Python classes
//! of `target_sft.errors` (one family under `CacheError`), looked up by kind.

mod batch;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use numpy::ndarray::Array2;
use numpy::{PyArray1, PyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple, PyType};
use rayon::prelude::*;
use target_sft_core as core;
use target_sft_core::{CodecKind, ErrorKind, Key, Record};

fn err(e: core::Error) -> PyErr {
    let name = match e.kind {
        ErrorKind::Input => "CacheInputError",
        ErrorKind::Format => "CacheFormatError",
        ErrorKind::Version => "CacheVersionError",
        ErrorKind::Corruption => "CacheCorruptionError",
        ErrorKind::KeyNotFound => "CacheKeyError",
        ErrorKind::Mismatch => "CacheMismatchError",
        ErrorKind::Io => "CacheIOError",
        ErrorKind::Locked => "CacheLockedError",
    };
    Python::attach(|py| {
        let cls = py
            .import("target_sft.errors")
            .and_then(|m| m.getattr(name))
            .and_then(|c| c.cast_into::<PyType>().map_err(Into::into));
        match cls {
            Ok(cls) => PyErr::from_type(cls, e.message),
            Err(_) => PyRuntimeError::new_err(e.message),
        }
    })
}

fn key_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Key> {
    if let Ok(s) = obj.extract::<String>() {
        return Ok(Key::Str(s));
    }
    if let Ok(i) = obj.extract::<i64>() {
        return Ok(Key::Int(i));
    }
    Err(err(core::Error::input(format!(
        "a key must be an int (fitting in int64) or a str, not {}",
        obj.get_type().name()?
    ))))
}

fn key_to_py<'py>(py: Python<'py>, key: &Key) -> PyResult<Bound<'py, PyAny>> {
    Ok(match key {
        Key::Int(i) => i.into_pyobject(py)?.into_any(),
        Key::Str(s) => s.into_pyobject(py)?.into_any(),
    })
}

/// A contiguous array of the expected rank, copied into a Vec (one memcpy).
fn take<T: numpy::Element + Copy>(
    name: &str,
    a: &PyReadonlyArrayDyn<'_, T>,
    ndim: usize,
) -> PyResult<Vec<T>> {
    if a.ndim() != ndim {
        return Err(err(core::Error::input(format!(
            "{name} must have {ndim} dimension(s), got shape {:?}",
            a.shape()
        ))));
    }
    match a.as_slice() {
        Ok(s) => Ok(s.to_vec()),
        Err(_) => Ok(a.as_array().iter().copied().collect()),
    }
}

fn record_to_py<'py>(py: Python<'py>, r: Record, k: usize) -> PyResult<Bound<'py, PyTuple>> {
    let s = r.label_logprobs.len();
    let ids = Array2::from_shape_vec((s, k), r.topk_ids).expect("decoded shape");
    let lps = Array2::from_shape_vec((s, k), r.topk_logprobs).expect("decoded shape");
    PyTuple::new(
        py,
        [
            key_to_py(py, &r.key)?,
            PyArray1::from_vec(py, r.input_ids).into_any(),
            PyArray1::from_vec(py, r.labels).into_any(),
            PyArray2::from_owned_array(py, ids).into_any(),
            PyArray2::from_owned_array(py, lps).into_any(),
            PyArray1::from_vec(py, r.label_logprobs).into_any(),
            PyArray1::from_vec(py, r.label_ranks).into_any(),
        ],
    )
}

/// A rayon pool owned by the current process. rayon's global pool must not be used after
/// `fork()` (DataLoader workers fork): its threads do not exist in the child, and the first
/// parallel call would wait for them forever. A child that finds a pool made by another pid
/// builds its own and leaks the parent's (dropping it would signal threads that are not there).
fn process_pool(threads: usize) -> core::Result<Arc<rayon::ThreadPool>> {
    static POOL: Mutex<Option<(u32, usize, Arc<rayon::ThreadPool>)>> = Mutex::new(None);
    let pid = std::process::id();
    let mut g = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((p, n, pool)) = g.as_ref() {
        if *p == pid && *n == threads {
            return Ok(pool.clone());
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("tsft-decode-{i}"))
        .build()
        .map_err(|e| {
            core::Error::new(ErrorKind::Io, format!("cannot start decode threads: {e}"))
        })?;
    if let Some(old) = g.replace((pid, threads, Arc::new(pool))) {
        if old.0 != pid {
            std::mem::forget(old);
        }
    }
    Ok(g.as_ref().expect("just set").2.clone())
}

/// Native cache writer; see `target_sft.CacheWriter` for the documented Python API.
#[pyclass(module = "target_sft._core", name = "CacheWriter")]
struct PyCacheWriter {
    inner: Option<core::CacheWriter>,
    top_k: usize,
}

#[pymethods]
impl PyCacheWriter {
    #[new]
    #[pyo3(signature = (path, *, top_k, vocab_size, codec, zstd_level, shard_bytes, threads, temperature,
        tokenizer_json, teacher_json, shard_prefix, prior_records, append, sqrt_step, tail_step, floor,
        max_mean_kl=None, manifest_name=core::manifest::MANIFEST_NAME.to_string(), wait_s=0.0, role="teacher"))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        top_k: usize,
        vocab_size: usize,
        codec: &str,
        zstd_level: i32,
        shard_bytes: u64,
        threads: usize,
        temperature: f64,
        tokenizer_json: &str,
        teacher_json: &str,
        shard_prefix: String,
        prior_records: usize,
        append: bool,
        sqrt_step: Option<f64>,
        tail_step: Option<f64>,
        floor: f64,
        max_mean_kl: Option<f64>,
        manifest_name: String,
        wait_s: f64,
        role: &str,
    ) -> PyResult<Self> {
        let parse = |what: &str, s: &str| {
            serde_json::from_str(s)
                .map_err(|e| err(core::Error::input(format!("{what} is not JSON: {e}"))))
        };
        let mut opts = core::WriterOptions::new(top_k, vocab_size);
        opts.codec = CodecKind::parse(codec).map_err(err)?;
        opts.zstd_level = zstd_level;
        opts.shard_bytes = shard_bytes;
        opts.threads = threads;
        opts.temperature = temperature;
        opts.tokenizer = parse("tokenizer", tokenizer_json)?;
        opts.teacher = parse("teacher", teacher_json)?;
        opts.role = core::Role::parse(role, "role").map_err(err)?;
        opts.shard_prefix = shard_prefix;
        opts.manifest_name = manifest_name;
        opts.prior_records = prior_records;
        opts.append = append;
        opts.lock_wait = core::lock::LockWait::from_secs(wait_s).map_err(err)?;
        // a budget: the codebook ladder, one rung chosen per record; none: one fixed codebook
        // (steps not given: the fixed defaults)
        let fixed = core::CodebookParams::default();
        opts.ladder = match max_mean_kl {
            Some(b) => core::codec::LadderParams::budget(b, floor),
            None => core::codec::LadderParams::fixed(core::CodebookParams {
                sqrt_step: sqrt_step.unwrap_or(fixed.sqrt_step),
                tail_step: tail_step.unwrap_or(fixed.tail_step),
                floor,
            }),
        };
        opts.created_by = format!("target-sft {}", env!("CARGO_PKG_VERSION"));
        let w = py
            .detach(|| core::CacheWriter::create(&path, opts))
            .map_err(err)?;
        Ok(Self {
            inner: Some(w),
            top_k,
        })
    }

    /// `entropy`: the teacher's entropy (nats) of each supervised row, for the manifest's
    /// statistics only (not stored per record).
    #[pyo3(signature = (key, input_ids, labels, topk_ids, topk_logprobs, label_logprobs,
        label_ranks, entropy=None))]
    #[allow(clippy::too_many_arguments)]
    fn add(
        &mut self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        input_ids: PyReadonlyArrayDyn<'_, i32>,
        labels: PyReadonlyArrayDyn<'_, i32>,
        topk_ids: PyReadonlyArrayDyn<'_, i32>,
        topk_logprobs: PyReadonlyArrayDyn<'_, f32>,
        label_logprobs: PyReadonlyArrayDyn<'_, f32>,
        label_ranks: PyReadonlyArrayDyn<'_, i32>,
        entropy: Option<PyReadonlyArrayDyn<'_, f64>>,
    ) -> PyResult<()> {
        let k = self.top_k;
        for (name, shape) in [
            ("topk_ids", topk_ids.shape()),
            ("topk_logprobs", topk_logprobs.shape()),
        ] {
            if shape.len() == 2 && shape[1] != k {
                return Err(err(core::Error::input(format!(
                    "{name} has shape {shape:?} but the cache stores top_k = {k} entries per row"
                ))));
            }
        }
        let rec = Record {
            key: key_from_py(key)?,
            input_ids: take("input_ids", &input_ids, 1)?,
            labels: take("labels", &labels, 1)?,
            topk_ids: take("topk_ids", &topk_ids, 2)?,
            topk_logprobs: take("topk_logprobs", &topk_logprobs, 2)?,
            label_logprobs: take("label_logprobs", &label_logprobs, 1)?,
            label_ranks: take("label_ranks", &label_ranks, 1)?,
        };
        let entropy = entropy.map(|e| take("entropy", &e, 1)).transpose()?;
        let w = self
            .inner
            .as_mut()
            .ok_or_else(|| err(core::Error::input("add() on a closed CacheWriter")))?;
        py.detach(|| w.add_with_entropy(rec, entropy.as_deref()))
            .map_err(err)
    }

    fn __contains__(&self, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let key = key_from_py(key)?;
        Ok(self.inner.as_ref().is_some_and(|w| w.contains(&key)))
    }

    #[getter]
    fn num_records(&self) -> u64 {
        self.inner.as_ref().map_or(0, |w| w.num_records())
    }

    /// Finish the cache; returns the manifest as JSON. `complete=False` keeps every record
    /// added but leaves the manifest marked incomplete (used when the caller hit an error).
    #[pyo3(signature = (complete=true))]
    fn close(&mut self, py: Python<'_>, complete: bool) -> PyResult<String> {
        let mut w = self
            .inner
            .take()
            .ok_or_else(|| err(core::Error::input("close() called twice")))?;
        let m = py.detach(|| w.finish(complete)).map_err(err)?;
        Ok(serde_json::to_string(&m).expect("manifest serialises"))
    }

    /// Remove the records of `keys` from the committed shards (rewriting each shard that holds
    /// one, crash-safely); returns how many were removed. Only before the first `add`.
    fn drop_keys(&mut self, py: Python<'_>, keys: Vec<Bound<'_, PyAny>>) -> PyResult<u64> {
        let keys = keys
            .iter()
            .map(key_from_py)
            .collect::<PyResult<Vec<Key>>>()?;
        let w = self
            .inner
            .as_mut()
            .ok_or_else(|| err(core::Error::input("drop_keys() on a closed CacheWriter")))?;
        py.detach(|| w.drop_keys(&keys)).map_err(err)
    }

    /// Stop without finishing: committed shards stay, the manifest stays marked incomplete.
    fn abort(&mut self, py: Python<'_>) {
        if let Some(w) = self.inner.take() {
            py.detach(|| drop(w));
        }
    }
}

/// Native cache reader; see `target_sft.TeacherCache` for the documented Python API.
#[pyclass(module = "target_sft._core", name = "TeacherCache", frozen)]
struct PyTeacherCache {
    inner: core::TeacherCache,
}

#[pymethods]
impl PyTeacherCache {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| core::TeacherCache::open(&path)).map_err(err)?;
        Ok(Self { inner })
    }

    fn __len__(&self) -> usize {
        self.inner.len() as usize
    }

    fn manifest_json(&self) -> String {
        serde_json::to_string(&self.inner.manifest).expect("manifest serialises")
    }

    #[pyo3(signature = (key, input_ids=None))]
    fn get<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
        input_ids: Option<PyReadonlyArrayDyn<'py, i32>>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let key = key_from_py(key)?;
        let ids = input_ids.map(|a| take("input_ids", &a, 1)).transpose()?;
        let r = py
            .detach(|| self.inner.get(&key, ids.as_deref()))
            .map_err(err)?;
        record_to_py(py, r, self.inner.manifest.top_k)
    }

    fn get_at<'py>(&self, py: Python<'py>, position: u64) -> PyResult<Bound<'py, PyTuple>> {
        let r = py.detach(|| self.inner.get_at(position)).map_err(err)?;
        record_to_py(py, r, self.inner.manifest.top_k)
    }

    /// Decode many records in parallel (GIL released); `threads` = 0 uses all cores.
    #[pyo3(signature = (positions, threads=0))]
    fn get_many_at<'py>(
        &self,
        py: Python<'py>,
        positions: Vec<u64>,
        threads: usize,
    ) -> PyResult<Vec<Bound<'py, PyTuple>>> {
        let recs: Vec<Record> = py
            .detach(|| {
                if threads == 1 || positions.len() < 2 {
                    return positions.iter().map(|&p| self.inner.get_at(p)).collect();
                }
                let pool = process_pool(threads)?;
                pool.install(|| {
                    positions
                        .par_iter()
                        .map(|&p| self.inner.get_at(p))
                        .collect::<core::Result<Vec<_>>>()
                })
            })
            .map_err(err)?;
        let k = self.inner.manifest.top_k;
        recs.into_iter().map(|r| record_to_py(py, r, k)).collect()
    }

    fn key_at<'py>(&self, py: Python<'py>, position: u64) -> PyResult<Bound<'py, PyAny>> {
        let k = self.inner.key_at(position).map_err(err)?;
        key_to_py(py, &k)
    }

    /// Keys of positions [start, stop).
    fn keys_range<'py>(
        &self,
        py: Python<'py>,
        start: u64,
        stop: u64,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let stop = stop.min(self.inner.len());
        (start..stop)
            .map(|p| {
                self.inner
                    .key_at(p)
                    .map_err(err)
                    .and_then(|k| key_to_py(py, &k))
            })
            .collect()
    }

    /// The positions in this cache of the keys at `positions` of `other` (one bulk lookup,
    /// GIL released): `-1` where this cache lacks the key.
    fn positions_matching<'py>(
        &self,
        py: Python<'py>,
        other: &Bound<'py, PyTeacherCache>,
        positions: Vec<u64>,
    ) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let other = &other.get().inner;
        let out = py
            .detach(|| -> core::Result<Vec<i64>> {
                positions
                    .iter()
                    .map(|&p| {
                        let key = other.key_at(p)?;
                        match self.inner.position(&key) {
                            Ok(q) => Ok(q as i64),
                            Err(e) if e.kind == ErrorKind::KeyNotFound => Ok(-1),
                            Err(e) => Err(e),
                        }
                    })
                    .collect()
            })
            .map_err(err)?;
        Ok(PyArray1::from_vec(py, out))
    }

    /// The key hashes of positions `start..stop` (one native pass, GIL released).
    fn key_hashes<'py>(
        &self,
        py: Python<'py>,
        start: u64,
        stop: u64,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let out = py
            .detach(|| self.inner.key_hashes(start, stop))
            .map_err(err)?;
        Ok(PyArray1::from_vec(py, out))
    }

    fn position(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<u64> {
        let key = key_from_py(key)?;
        py.detach(|| self.inner.position(&key)).map_err(err)
    }

    fn __contains__(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        let Ok(key) = key_from_py(key) else {
            return Ok(false);
        };
        match py.detach(|| self.inner.position(&key)) {
            Ok(_) => Ok(true),
            Err(e) if e.kind == ErrorKind::KeyNotFound => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    /// Check every checksum and frame; `progress(shard_index, records)` is called per shard.
    #[pyo3(signature = (progress=None))]
    fn verify(&self, py: Python<'_>, progress: Option<Py<PyAny>>) -> PyResult<u64> {
        let mut cb_err: Option<PyErr> = None;
        let n = py
            .detach(|| {
                self.inner.verify(|s, n| {
                    if let Some(cb) = &progress {
                        Python::attach(|py| {
                            if let Err(e) = cb.call1(py, (s, n)) {
                                cb_err.get_or_insert(e);
                            }
                        });
                    }
                })
            })
            .map_err(err)?;
        match cb_err {
            Some(e) => Err(e),
            None => Ok(n),
        }
    }
}

/// Merge the per-writer manifests `parts` of the cache at `path` into its `manifest.json`;
/// returns the merged manifest as JSON.
/// Take and release at once the locks a writer of `shard_prefix`/`manifest_name` in `path` would
/// hold: a build calls it before its teacher loads, so a contested directory is refused at start.
#[pyfunction]
#[pyo3(signature = (path, shard_prefix, manifest_name, wait_s=0.0))]
fn check_writer_locks(
    py: Python<'_>,
    path: PathBuf,
    shard_prefix: String,
    manifest_name: String,
    wait_s: f64,
) -> PyResult<()> {
    let wait = core::lock::LockWait::from_secs(wait_s).map_err(err)?;
    py.detach(|| {
        std::fs::create_dir_all(&path).map_err(|e| core::Error::io("cannot create", &path, e))?;
        core::lock::writer_locks(&path, &shard_prefix, &manifest_name, wait).map(drop)
    })
    .map_err(err)
}

/// Holds the directory's manifest lock while it merges (`wait_s` as for a writer).
#[pyfunction]
#[pyo3(signature = (path, parts, complete, wait_s=0.0))]
fn merge_manifests(
    py: Python<'_>,
    path: PathBuf,
    parts: Vec<String>,
    complete: bool,
    wait_s: f64,
) -> PyResult<String> {
    let wait = core::lock::LockWait::from_secs(wait_s).map_err(err)?;
    let m = py
        .detach(|| {
            let _locks = core::lock::manifest_locks(&path, wait)?;
            core::Manifest::merge(&path, &parts, complete)
        })
        .map_err(err)?;
    Ok(serde_json::to_string(&m).expect("manifest serialises"))
}

/// Re-seal the manifest file `name` of the cache at `path` after a deliberate edit: every check
/// but its `manifest_checksum` applies, then it is stored sealed; returns it as JSON.
#[pyfunction]
#[pyo3(signature = (path, name="manifest.json".to_string()))]
fn reseal_manifest(py: Python<'_>, path: PathBuf, name: String) -> PyResult<String> {
    let m = py
        .detach(|| core::Manifest::reseal(&path, &name))
        .map_err(err)?;
    Ok(serde_json::to_string(&m).expect("manifest serialises"))
}

/// Parse and validate the manifest file content `data` (shown as `shown` in errors) exactly as a
/// local open does (its `manifest_checksum`, format, version, fields, shard entries and totals;
/// docs/FORMAT.md §1): the one manifest validator. Returns the parsed manifest as JSON.
#[pyfunction]
fn parse_manifest(data: &[u8], shown: &str) -> PyResult<String> {
    let m = core::Manifest::from_bytes(data, shown, true).map_err(err)?;
    Ok(serde_json::to_string(&m).expect("manifest serialises"))
}

/// The bytes of a manifest file holding the manifest `manifest_json` (JSON text), sealed with
/// its `manifest_checksum` (any `manifest_checksum` in the input is replaced).
#[pyfunction]
fn seal_manifest<'py>(py: Python<'py>, manifest_json: &str) -> PyResult<Bound<'py, PyBytes>> {
    let m = core::Manifest::from_bytes(manifest_json.as_bytes(), "the manifest given", false)
        .map_err(err)?;
    Ok(PyBytes::new(py, &m.to_bytes()))
}

/// XXH3-64 of int32 token ids as little-endian bytes: a record's `token_hash` (FORMAT.md §7).
#[pyfunction]
fn token_hash(ids: PyReadonlyArrayDyn<'_, i32>) -> PyResult<u64> {
    let v = take("ids", &ids, 1)?;
    Ok(core::hash::token_hash(&v))
}

/// XXH3-128 of a contiguous byte array, as 32 lowercase hex digits (GIL released).
#[pyfunction]
fn xxh3_128(py: Python<'_>, data: PyReadonlyArrayDyn<'_, u8>) -> PyResult<String> {
    let bytes = data.as_slice().map_err(|_| {
        err(core::Error::input(
            "xxh3_128 needs a contiguous uint8 array",
        ))
    })?;
    Ok(py.detach(|| format!("{:032x}", xxhash_rust::xxh3::xxh3_128(bytes))))
}

/// The records listed by the per-writer manifests `manifests` of the cache at `path`: (keys,
/// token hashes, labels hashes, supervised counts, part index), arrays in manifest order.
#[pyfunction]
#[pyo3(signature = (path, manifests, labels=true, threads=0))]
#[allow(clippy::type_complexity)]
fn scan_parts<'py>(
    py: Python<'py>,
    path: PathBuf,
    manifests: Vec<String>,
    labels: bool,
    threads: usize,
) -> PyResult<(
    Vec<Bound<'py, PyAny>>,
    Bound<'py, PyArray1<u64>>,
    Bound<'py, PyArray1<u64>>,
    Bound<'py, PyArray1<u64>>,
    Bound<'py, PyArray1<u32>>,
)> {
    let idx = py
        .detach(|| {
            let n = if threads == 0 {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            } else {
                threads
            };
            process_pool(n)?.install(|| core::resume::scan_parts(&path, &manifests, labels))
        })
        .map_err(err)?;
    let keys = idx
        .keys
        .iter()
        .map(|k| key_to_py(py, k))
        .collect::<PyResult<Vec<_>>>()?;
    Ok((
        keys,
        PyArray1::from_vec(py, idx.token_hash),
        PyArray1::from_vec(py, idx.labels_hash),
        PyArray1::from_vec(py, idx.n_supervised),
        PyArray1::from_vec(py, idx.part),
    ))
}

/// One shard's key tables read by byte ranges (a remote cache's key index): the Python side
/// fetches the ranges this asks for; the parsing and verification are the core's
/// (`shard::ShardKeyTables`). Errors name the shard as `shown`.
#[pyclass(module = "target_sft._core", name = "ShardKeyTables", frozen)]
struct PyShardKeyTables {
    inner: core::shard::ShardKeyTables,
    shown: String,
}

impl PyShardKeyTables {
    fn at(&self, e: core::Error) -> PyErr {
        err(e.at(format!("shard {}", self.shown)))
    }
}

/// `(file offset, bytes)` pieces, read by Python, for the core (no copy).
fn file_pieces<'a>(pieces: &'a [(usize, Bound<'_, PyBytes>)]) -> core::shard::FilePieces<'a> {
    core::shard::FilePieces::new(pieces.iter().map(|(at, b)| (*at, b.as_bytes())).collect())
}

#[pymethods]
impl PyShardKeyTables {
    /// Where the header of a shard of `file_len` bytes ends (`8 + N`), from its first 8 bytes.
    #[staticmethod]
    fn header_end(prefix: &[u8], file_len: usize, shown: &str) -> PyResult<usize> {
        core::container::header_end(prefix, file_len)
            .map_err(|e| err(e.at(format!("shard {shown}"))))
    }

    /// Parse the header `head` (the file's first `header_end` bytes) of a shard of `file_len`
    /// bytes that the manifest says holds `records` records.
    #[new]
    fn new(head: &[u8], file_len: usize, records: usize, shown: String) -> PyResult<Self> {
        core::shard::ShardKeyTables::parse(head, file_len, Some(records))
            .map(|inner| Self {
                inner,
                shown: shown.clone(),
            })
            .map_err(|e| err(e.at(format!("shard {shown}"))))
    }

    /// The `(start, end)` byte ranges of the file that `key_hashes` (or, `keys` true, `keys`)
    /// needs.
    fn ranges(&self, keys: bool) -> Vec<(usize, usize)> {
        self.inner
            .ranges(keys)
            .into_iter()
            .map(|r| (r.start, r.end))
            .collect()
    }

    /// The verified key hashes, from `pieces` (`(file offset, bytes)`) holding `ranges(False)`.
    fn key_hashes<'py>(
        &self,
        py: Python<'py>,
        pieces: Vec<(usize, Bound<'py, PyBytes>)>,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let pieces = file_pieces(&pieces);
        let out = py
            .detach(|| self.inner.key_hashes(&pieces))
            .map_err(|e| self.at(e))?;
        Ok(PyArray1::from_vec(py, out))
    }

    /// The keys of records `which` (indices in the shard), from `pieces` holding
    /// `ranges(True)`.
    fn keys<'py>(
        &self,
        py: Python<'py>,
        pieces: Vec<(usize, Bound<'py, PyBytes>)>,
        which: Vec<usize>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let keys = self
            .inner
            .keys(&file_pieces(&pieces), &which)
            .map_err(|e| self.at(e))?;
        keys.iter().map(|k| key_to_py(py, k)).collect()
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("FORMAT_VERSION", core::manifest::FORMAT_VERSION)?;
    m.add("CACHE_ROLES", core::Role::NAMES.to_vec())?;
    m.add_class::<PyCacheWriter>()?;
    m.add_class::<PyTeacherCache>()?;
    m.add_class::<PyShardKeyTables>()?;
    m.add_function(wrap_pyfunction!(merge_manifests, m)?)?;
    m.add_function(wrap_pyfunction!(token_hash, m)?)?;
    m.add_function(wrap_pyfunction!(xxh3_128, m)?)?;
    m.add_function(wrap_pyfunction!(scan_parts, m)?)?;
    m.add_function(wrap_pyfunction!(check_writer_locks, m)?)?;
    m.add_function(wrap_pyfunction!(reseal_manifest, m)?)?;
    m.add_function(wrap_pyfunction!(parse_manifest, m)?)?;
    m.add_function(wrap_pyfunction!(seal_manifest, m)?)?;
    batch::register(m)?;
    Ok(())
}
