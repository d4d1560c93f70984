//! The shard container: a valid safetensors file (docs/FORMAT.md §Container).
//!
//! Layout: `u64 LE header_len` ‖ `header_len` bytes of JSON (padded with spaces to a multiple of
//! 8) ‖ the data buffer. The JSON maps tensor names to `{"dtype", "shape", "data_offsets"}` and
//! carries string metadata under `"__metadata__"`. Tensors are stored contiguously, in the order
//! given, with no gaps, so `safetensors.safe_open` accepts the file.

use std::collections::BTreeMap;
use std::ops::Range;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Upper bound on the header size we accept (safetensors uses the same 100 MB limit).
pub const MAX_HEADER: u64 = 100_000_000;

/// Element types used by the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    U8,
    U32,
    U64,
    I32,
    F32,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::U8 => "U8",
            Dtype::U32 => "U32",
            Dtype::U64 => "U64",
            Dtype::I32 => "I32",
            Dtype::F32 => "F32",
        }
    }
    pub fn size(self) -> usize {
        match self {
            Dtype::U8 => 1,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 4,
            Dtype::U64 => 8,
        }
    }
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "U8" => Dtype::U8,
            "U32" => Dtype::U32,
            "U64" => Dtype::U64,
            "I32" => Dtype::I32,
            "F32" => Dtype::F32,
            _ => return None,
        })
    }
}

/// A tensor to be written: name, dtype, shape and its little-endian bytes.
pub struct TensorOut<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// Serialise the header (length prefix + padded JSON) for `tensors` and `metadata`. The data
/// buffer is the concatenation of the tensors' bytes in the same order.
pub fn encode_header(
    tensors: &[TensorOut<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<Vec<u8>> {
    let mut obj = Map::new();
    let meta: Map<String, Value> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    obj.insert("__metadata__".into(), Value::Object(meta));
    let mut offset = 0usize;
    for t in tensors {
        let expect = t.shape.iter().product::<usize>() * t.dtype.size();
        if expect != t.data.len() {
            return Err(Error::input(format!(
                "internal: tensor {} has {} bytes but shape {:?} of {} needs {expect}",
                t.name,
                t.data.len(),
                t.shape,
                t.dtype.name()
            )));
        }
        let mut desc = Map::new();
        desc.insert("dtype".into(), Value::String(t.dtype.name().into()));
        desc.insert("shape".into(), Value::from(t.shape.clone()));
        desc.insert(
            "data_offsets".into(),
            Value::from(vec![offset, offset + t.data.len()]),
        );
        obj.insert(t.name.to_string(), Value::Object(desc));
        offset += t.data.len();
    }
    let mut json = serde_json::to_vec(&Value::Object(obj)).expect("JSON of strings and numbers");
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Where one tensor lives inside a parsed file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the whole file (not the data buffer).
    pub range: Range<usize>,
}

/// The parsed header of a container.
#[derive(Debug, Clone)]
pub struct Header {
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    /// Offset of the data buffer in the file.
    pub data_start: usize,
}

/// Where the header of a container of `file_len` bytes ends (`8 + N`: the data buffer's offset),
/// read from its first 8 bytes (`prefix`: at least those), checked to fit the file.
pub fn header_end(prefix: &[u8], file_len: usize) -> Result<usize> {
    if prefix.len() < 8 || file_len < 8 {
        return Err(Error::corrupt(format!(
            "file is {file_len} bytes long, shorter than the 8-byte header length; the file is truncated"
        )));
    }
    let n = u64::from_le_bytes(prefix[..8].try_into().unwrap());
    if n > MAX_HEADER || n as usize > file_len - 8 {
        return Err(Error::corrupt(format!(
            "header length {n} does not fit in a file of {file_len} bytes; the file is truncated or not a shard"
        )));
    }
    Ok(8 + n as usize)
}

/// Parse and validate the header of a container of `file_len` bytes whose first bytes are
/// `head` (at least the whole header must be present). Every tensor range is checked to lie
/// inside the file and to match its dtype and shape; tensors must tile the data buffer exactly.
pub fn parse_header(head: &[u8], file_len: usize) -> Result<Header> {
    let data_start = header_end(head, file_len)?;
    if data_start > head.len() {
        return Err(Error::input(format!(
            "internal: the header ends at byte {data_start}, only {} bytes were read",
            head.len()
        )));
    }
    let value: Value = serde_json::from_slice(&head[8..data_start]).map_err(|e| {
        Error::corrupt(format!(
            "header is not valid JSON ({e}); the file is damaged or not a shard"
        ))
    })?;
    let obj = value
        .as_object()
        .ok_or_else(|| Error::corrupt("header is not a JSON object"))?;
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    let data_len = file_len - data_start;
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (name, desc) in obj {
        if name == "__metadata__" {
            let m = desc
                .as_object()
                .ok_or_else(|| Error::corrupt("__metadata__ is not an object"))?;
            for (k, v) in m {
                let s = v
                    .as_str()
                    .ok_or_else(|| Error::corrupt(format!("__metadata__.{k} is not a string")))?;
                metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let bad = |what: &str| Error::corrupt(format!("tensor {name}: {what}"));
        let d = desc
            .as_object()
            .ok_or_else(|| bad("description is not an object"))?;
        let dtype = d
            .get("dtype")
            .and_then(Value::as_str)
            .and_then(Dtype::parse)
            .ok_or_else(|| bad("missing or unsupported dtype"))?;
        let shape: Vec<usize> = d
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("missing shape"))?
            .iter()
            .map(|x| x.as_u64().map(|x| x as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("shape is not a list of non-negative integers"))?;
        let offs = d
            .get("data_offsets")
            .and_then(Value::as_array)
            .filter(|a| a.len() == 2)
            .ok_or_else(|| bad("missing data_offsets"))?;
        let (a, b) = match (offs[0].as_u64(), offs[1].as_u64()) {
            (Some(a), Some(b)) if a <= b => (a as usize, b as usize),
            _ => return Err(bad("data_offsets are not an increasing pair")),
        };
        if b > data_len {
            return Err(bad(&format!(
                "data ends at byte {b} of the data buffer but the buffer has {data_len} bytes; the file is truncated"
            )));
        }
        let numel = shape
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x))
            .and_then(|x| x.checked_mul(dtype.size()))
            .ok_or_else(|| bad("shape overflows"))?;
        if numel != b - a {
            return Err(bad(&format!(
                "shape {shape:?} of {} needs {numel} bytes but data_offsets span {}",
                dtype.name(),
                b - a
            )));
        }
        spans.push((a, b));
        tensors.insert(
            name.clone(),
            TensorInfo {
                dtype,
                shape,
                range: data_start + a..data_start + b,
            },
        );
    }
    spans.sort_unstable();
    let mut end = 0usize;
    for (a, b) in spans {
        if a != end {
            return Err(Error::corrupt(format!(
                "tensor data is not contiguous (gap or overlap at byte {a} of the data buffer)"
            )));
        }
        end = b;
    }
    if end != data_len {
        return Err(Error::corrupt(format!(
            "tensors cover {end} bytes but the data buffer has {data_len}; the file has trailing bytes or is truncated"
        )));
    }
    Ok(Header {
        tensors,
        metadata,
        data_start,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_header() {
        let a = [1u8, 2, 3];
        let b = 7u64.to_le_bytes();
        let tensors = [
            TensorOut {
                name: "b",
                dtype: Dtype::U64,
                shape: vec![1],
                data: &b,
            },
            TensorOut {
                name: "a",
                dtype: Dtype::U8,
                shape: vec![3],
                data: &a,
            },
        ];
        let mut meta = BTreeMap::new();
        meta.insert("k".to_string(), "v".to_string());
        let mut file = encode_header(&tensors, &meta).unwrap();
        assert_eq!(file.len() % 8, 0);
        file.extend_from_slice(&b);
        file.extend_from_slice(&a);
        let h = parse_header(&file, file.len()).unwrap();
        assert_eq!(h.metadata["k"], "v");
        assert_eq!(&file[h.tensors["a"].range.clone()], &a);
        assert_eq!(&file[h.tensors["b"].range.clone()], &b);
        // truncation is detected
        assert!(parse_header(&file[..file.len() - 1], file.len() - 1).is_err());
    }
}
