//! `build_batch`: the batch builder of `target_sft_core::batch` for Python (the engine of
//! `target_sft.TargetSFTCollator`; layout in docs/DATA.md).
//!
//! One call plans the batch (shard indexes only), takes or allocates the output arrays with the
//! GIL held, then decodes and places every sample with the GIL released, in parallel over
//! samples on the per-process pool.

use numpy::{Element, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2};
use numpy::{PyArray1, PyArrayDescrMethods, PyReadwriteArrayDyn, PyUntypedArrayMethods};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PySlice, PyTuple};
use target_sft_core as core;
use target_sft_core::{
    BatchBuffers, BatchOptions, BatchPlan, RecordView, Reference, ReferenceBuffers, Source,
};

use crate::{err, key_from_py, process_pool, PyTeacherCache};

/// A sample as passed from Python, holding the borrows its slices come from.
enum Item<'py> {
    Cached {
        cache: Bound<'py, PyTeacherCache>,
        position: u64,
        input_ids: Option<PyReadonlyArray1<'py, i32>>,
        labels: Option<PyReadonlyArray1<'py, i32>>,
        reference: Option<(Bound<'py, PyTeacherCache>, u64)>,
    },
    Decoded {
        key: core::Key,
        input_ids: PyReadonlyArray1<'py, i32>,
        labels: PyReadonlyArray1<'py, i32>,
        topk_ids: PyReadonlyArray2<'py, i32>,
        topk_logprobs: PyReadonlyArray2<'py, f32>,
        label_logprobs: PyReadonlyArray1<'py, f32>,
    },
}

fn input_err(msg: String) -> PyErr {
    err(core::Error::input(msg))
}

fn array<'py, T: Element, D: numpy::ndarray::Dimension>(
    i: usize,
    name: &str,
    obj: &Bound<'py, PyAny>,
) -> PyResult<numpy::PyReadonlyArray<'py, T, D>> {
    let a = obj
        .cast::<numpy::PyArray<T, D>>()
        .map_err(|_| {
            let what = obj
                .getattr("dtype")
                .map(|d| format!("dtype {d}"))
                .unwrap_or_else(|_| format!("type {}", obj.get_type()));
            input_err(format!(
                "batch item {i}: {name} must be a {}-D {} numpy array, got {what}{}",
                D::NDIM.unwrap_or(0),
                std::any::type_name::<T>()
                    .replace("i32", "int32")
                    .replace("f32", "float32"),
                obj.getattr("shape")
                    .map(|s| format!(" of shape {s}"))
                    .unwrap_or_default()
            ))
        })?
        .readonly();
    if !a.is_c_contiguous() {
        return Err(input_err(format!(
            "batch item {i}: {name} must be C-contiguous (use numpy.ascontiguousarray)"
        )));
    }
    Ok(a)
}

fn parse_item<'py>(i: usize, obj: &Bound<'py, PyAny>) -> PyResult<Item<'py>> {
    let t = obj.cast::<PyTuple>().map_err(|_| {
        input_err(format!(
            "batch item {i}: expected a (cache, position[, input_ids[, labels]]) or a record tuple, got {}",
            obj.get_type()
        ))
    })?;
    let first = t.get_item(0)?;
    if let Ok(cache) = first.cast::<PyTeacherCache>() {
        if !(2..=4).contains(&t.len()) {
            return Err(input_err(format!(
                "batch item {i}: a cached sample is (cache, position[, input_ids[, labels]]), got {} fields",
                t.len()
            )));
        }
        let position: u64 = t.get_item(1)?.extract().map_err(|_| {
            input_err(format!(
                "batch item {i}: the position must be a non-negative int"
            ))
        })?;
        let optional = |at: usize, name: &str| -> PyResult<Option<PyReadonlyArray1<'py, i32>>> {
            match t.get_item(at) {
                Ok(x) if !x.is_none() => Ok(Some(array::<i32, _>(i, name, &x)?)),
                _ => Ok(None),
            }
        };
        return Ok(Item::Cached {
            cache: cache.clone(),
            position,
            input_ids: optional(2, "input_ids")?,
            labels: optional(3, "labels")?,
            reference: None,
        });
    }
    if t.len() != 7 {
        return Err(input_err(format!(
            "batch item {i}: a record is (key, input_ids, labels, topk_ids, topk_logprobs, label_logprobs, label_ranks), got {} fields",
            t.len()
        )));
    }
    Ok(Item::Decoded {
        key: key_from_py(&first)?,
        input_ids: array(i, "input_ids", &t.get_item(1)?)?,
        labels: array(i, "labels", &t.get_item(2)?)?,
        topk_ids: array(i, "topk_ids", &t.get_item(3)?)?,
        topk_logprobs: array(i, "topk_logprobs", &t.get_item(4)?)?,
        label_logprobs: array(i, "label_logprobs", &t.get_item(5)?)?,
    })
}

/// Attach `references[i]` (a `(cache, position)` tuple) to the cached item `i`.
fn attach_references<'py>(
    items: &mut [Item<'py>],
    references: &[Bound<'py, PyAny>],
) -> PyResult<()> {
    if references.len() != items.len() {
        return Err(input_err(format!(
            "references has {} entries but there are {} items: one (cache, position) per item",
            references.len(),
            items.len()
        )));
    }
    for (i, (item, r)) in items.iter_mut().zip(references).enumerate() {
        let bad = || {
            input_err(format!(
                "references[{i}] must be a (cache, position) tuple, got {}",
                r.get_type()
            ))
        };
        let t = r.cast::<PyTuple>().map_err(|_| bad())?;
        if t.len() != 2 {
            return Err(bad());
        }
        let cache = t
            .get_item(0)?
            .cast_into::<PyTeacherCache>()
            .map_err(|_| bad())?;
        let position: u64 = t.get_item(1)?.extract().map_err(|_| {
            input_err(format!(
                "references[{i}]: the position must be a non-negative int"
            ))
        })?;
        match item {
            Item::Cached { reference, .. } => *reference = Some((cache, position)),
            Item::Decoded { .. } => {
                return Err(input_err(format!(
                    "batch item {i} is a decoded record: only (cache, position) items can have a reference record"
                )))
            }
        }
    }
    Ok(())
}

fn source<'a>(item: &'a Item<'_>) -> Source<'a> {
    let s = |a: &'a PyReadonlyArray1<'_, i32>| a.as_slice().expect("checked contiguous");
    match item {
        Item::Cached {
            cache,
            position,
            input_ids,
            labels,
            reference,
        } => Source::Cached {
            cache: &cache.get().inner,
            position: *position,
            input_ids: input_ids.as_ref().map(s),
            labels: labels.as_ref().map(s),
            reference: reference.as_ref().map(|(c, p)| Reference {
                cache: &c.get().inner,
                position: *p,
            }),
        },
        Item::Decoded {
            key,
            input_ids,
            labels,
            topk_ids,
            topk_logprobs,
            label_logprobs,
        } => Source::Decoded(RecordView {
            key: key.clone(),
            input_ids: s(input_ids),
            labels: s(labels),
            topk_ids: topk_ids.as_slice().expect("checked contiguous"),
            topk_logprobs: topk_logprobs.as_slice().expect("checked contiguous"),
            label_logprobs: label_logprobs.as_slice().expect("checked contiguous"),
            top_k: topk_ids.shape()[1],
        }),
    }
}

/// The output array `name` of `shape`: new, or (with `out`) a view of the first elements of
/// the caller's buffer `out[name]` (a dict) or of `out(name, shape, dtype)` (a callable).
fn output<'py, T: Element>(
    py: Python<'py>,
    out: Option<&Bound<'py, PyAny>>,
    name: &str,
    shape: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let n: usize = shape.iter().product();
    let dtype = numpy::dtype::<T>(py);
    let given = match out {
        None => None,
        Some(o) => match o.cast::<PyDict>() {
            Ok(d) => d.get_item(name)?,
            Err(_) if o.is_callable() => {
                Some(o.call1((name, PyTuple::new(py, shape)?, dtype.to_string()))?)
            }
            Err(_) => {
                return Err(input_err(format!(
                "out must be a dict of arrays or a callable (name, shape, dtype) -> array, got {}",
                o.get_type()
            )))
            }
        },
    };
    let Some(buf) = given else {
        // `numpy.empty`, not `zeros`: the builder writes every element (`BatchPlan::fill` checks
        // that the pieces it writes tile each buffer), and calloc would clear the memory first
        // (≈10% of the build time for recycled heap memory).
        let empty = intern!(py, "empty");
        let arr = py
            .import(intern!(py, "numpy"))?
            .getattr(empty)?
            .call1((PyTuple::new(py, shape)?, dtype))?;
        return Ok(arr.cast_into::<PyArrayDyn<T>>()?);
    };
    let arr = buf.cast::<numpy::PyUntypedArray>().map_err(|_| {
        input_err(format!(
            "out['{name}'] must be a numpy array (for a torch tensor pass tensor.numpy()), got {}",
            buf.get_type()
        ))
    })?;
    if !arr.dtype().is_equiv_to(&dtype) {
        return Err(input_err(format!(
            "out['{name}'] has dtype {} but {name} is {dtype}",
            arr.dtype()
        )));
    }
    if !arr.is_c_contiguous() {
        return Err(input_err(format!("out['{name}'] must be C-contiguous")));
    }
    if arr.len() < n {
        return Err(input_err(format!(
            "out['{name}'] holds {} elements but this batch needs {n} ({name} of shape {shape:?}); allocate it for the largest batch",
            arr.len()
        )));
    }
    let view = buf
        .call_method1("reshape", (-1,))?
        .get_item(PySlice::new(py, 0, n as isize, 1))?
        .call_method1("reshape", (PyTuple::new(py, shape)?,))?;
    Ok(view.cast_into::<PyArrayDyn<T>>()?)
}

fn writable<'py, T: Element>(
    name: &str,
    a: &Bound<'py, PyArrayDyn<T>>,
) -> PyResult<PyReadwriteArrayDyn<'py, T>> {
    a.try_readwrite().map_err(|e| {
        input_err(format!(
            "out['{name}'] cannot be written ({e}): it is read-only or overlaps another output buffer"
        ))
    })
}

/// Build a training batch from cached samples (see `target_sft.build_batch`). `items` are
/// `(cache, position)` / `(cache, position, input_ids)` tuples or record tuples as
/// `TeacherCache.get` returns them; `out` optionally gives the output buffers: a dict of arrays
/// (views of their first elements are filled) or a callable `(name, shape, dtype) -> array`.
#[pyfunction]
#[pyo3(signature = (items, *, packing=false, max_length=None, padding="longest",
    pad_to_multiple_of=1, pad_token_id=0, label_in_support=true, threads=0, out=None,
    references=None))]
#[allow(clippy::too_many_arguments)]
fn build_batch<'py>(
    py: Python<'py>,
    items: Vec<Bound<'py, PyAny>>,
    packing: bool,
    max_length: Option<i64>,
    padding: &str,
    pad_to_multiple_of: i64,
    pad_token_id: i64,
    label_in_support: bool,
    threads: usize,
    out: Option<Bound<'py, PyAny>>,
    references: Option<Vec<Bound<'py, PyAny>>>,
) -> PyResult<Bound<'py, PyDict>> {
    let opts = BatchOptions::from_args(
        packing,
        max_length,
        padding,
        pad_to_multiple_of,
        pad_token_id,
        label_in_support,
    )
    .map_err(err)?;
    let mut items = items
        .iter()
        .enumerate()
        .map(|(i, obj)| parse_item(i, obj))
        .collect::<PyResult<Vec<_>>>()?;
    if let Some(r) = &references {
        attach_references(&mut items, r)?;
    }
    let sources: Vec<Source<'_>> = items.iter().map(source).collect();
    let plan = py.detach(|| BatchPlan::new(&sources, &opts)).map_err(err)?;
    let out = out.as_ref();
    let tok = [plan.rows, plan.len];
    let teach = [plan.rows, plan.len, plan.width];
    let input_ids = output::<i64>(py, out, "input_ids", &tok)?;
    let labels = output::<i64>(py, out, "labels", &tok)?;
    let side = output::<i64>(
        py,
        out,
        if packing {
            "position_ids"
        } else {
            "attention_mask"
        },
        &tok,
    )?;
    let teacher_ids = output::<i32>(py, out, "teacher_ids", &teach)?;
    let teacher_logprobs = output::<f32>(py, out, "teacher_logprobs", &teach)?;
    let sequence_ids = output::<i64>(py, out, "sequence_ids", &tok)?;
    let reference = match plan.reference_top_k {
        None => None,
        Some(_) => {
            let shape = [plan.rows, plan.len, plan.reference_width];
            Some((
                output::<i32>(py, out, "reference_ids", &shape)?,
                output::<f32>(py, out, "reference_logprobs", &shape)?,
                output::<f32>(py, out, "reference_label_logprobs", &tok)?,
            ))
        }
    };
    {
        let mut w_ids = writable("input_ids", &input_ids)?;
        let mut w_labels = writable("labels", &labels)?;
        let mut w_side = writable(
            if packing {
                "position_ids"
            } else {
                "attention_mask"
            },
            &side,
        )?;
        let mut w_tids = writable("teacher_ids", &teacher_ids)?;
        let mut w_tlps = writable("teacher_logprobs", &teacher_logprobs)?;
        let mut w_seq = writable("sequence_ids", &sequence_ids)?;
        let mut w_ref = match &reference {
            None => None,
            Some((ids, lps, lab)) => Some((
                writable("reference_ids", ids)?,
                writable("reference_logprobs", lps)?,
                writable("reference_label_logprobs", lab)?,
            )),
        };
        let side_slice = w_side.as_slice_mut().expect("contiguous");
        let (attention_mask, position_ids) = if packing {
            (None, Some(side_slice))
        } else {
            (Some(side_slice), None)
        };
        let bufs = BatchBuffers {
            input_ids: w_ids.as_slice_mut().expect("contiguous"),
            attention_mask,
            labels: w_labels.as_slice_mut().expect("contiguous"),
            position_ids,
            teacher_ids: w_tids.as_slice_mut().expect("contiguous"),
            teacher_logprobs: w_tlps.as_slice_mut().expect("contiguous"),
            sequence_ids: w_seq.as_slice_mut().expect("contiguous"),
            reference: w_ref.as_mut().map(|(ids, lps, lab)| ReferenceBuffers {
                ids: ids.as_slice_mut().expect("contiguous"),
                logprobs: lps.as_slice_mut().expect("contiguous"),
                label_logprobs: lab.as_slice_mut().expect("contiguous"),
            }),
        };
        py.detach(|| {
            if threads == 1 || plan.placements.len() < 2 {
                plan.fill(&sources, bufs, false)
            } else {
                let pool = process_pool(threads)?;
                pool.install(|| plan.fill(&sources, bufs, true))
            }
        })
        .map_err(err)?;
    }
    let d = PyDict::new(py);
    d.set_item("input_ids", input_ids)?;
    if packing {
        d.set_item("position_ids", side)?;
    } else {
        d.set_item("attention_mask", side)?;
    }
    d.set_item("labels", labels)?;
    d.set_item("teacher_ids", teacher_ids)?;
    d.set_item("teacher_logprobs", teacher_logprobs)?;
    if let Some((ids, lps, lab)) = reference {
        d.set_item("reference_ids", ids)?;
        d.set_item("reference_logprobs", lps)?;
        d.set_item("reference_label_logprobs", lab)?;
    }
    d.set_item("sequence_ids", sequence_ids)?;
    if packing {
        d.set_item("cu_seqlens", PyArray1::from_slice(py, &plan.cu_seqlens))?;
        d.set_item("max_seqlen", plan.max_seqlen)?;
    }
    Ok(d)
}

/// Check batch options as `build_batch` does (the collator checks its options once, when made,
/// instead of on the first batch in a DataLoader worker).
#[pyfunction]
#[pyo3(signature = (*, packing=false, max_length=None, padding="longest", pad_to_multiple_of=1))]
fn check_batch_options(
    packing: bool,
    max_length: Option<i64>,
    padding: &str,
    pad_to_multiple_of: i64,
) -> PyResult<()> {
    BatchOptions::from_args(packing, max_length, padding, pad_to_multiple_of, 0, false)
        .map(|_| ())
        .map_err(err)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(build_batch, m)?)?;
    m.add_function(wrap_pyfunction!(check_batch_options, m)?)
}
