//! Byte-level building blocks of the codecs: LEB128 varints, byte planes, length-prefixed
//! streams and a bounds-checked cursor (docs/FORMAT.md §Primitives).

use crate::error::{Error, Result};

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Append `values` (4-byte little-endian words) as 4 byte planes: all least-significant bytes
/// first, then all second bytes, and so on.
pub fn put_planes_u32(out: &mut Vec<u8>, values: impl ExactSizeIterator<Item = u32> + Clone) {
    let n = values.len();
    let base = out.len();
    out.resize(base + 4 * n, 0);
    let (p0, rest) = out[base..].split_at_mut(n);
    let (p1, rest) = rest.split_at_mut(n);
    let (p2, p3) = rest.split_at_mut(n);
    for (i, v) in values.enumerate() {
        let b = v.to_le_bytes();
        p0[i] = b[0];
        p1[i] = b[1];
        p2[i] = b[2];
        p3[i] = b[3];
    }
}

/// Append a stream: varint length, then its bytes.
pub fn put_stream(out: &mut Vec<u8>, stream: &[u8]) {
    put_varint(out, stream.len() as u64);
    out.extend_from_slice(stream);
}

/// A bounds-checked reader over a decoded frame. Every read fails with a corruption error
/// instead of panicking.
pub struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn short(what: &str) -> Error {
    Error::corrupt(format!("frame ends inside {what}"))
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }
    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }
    pub fn varint(&mut self) -> Result<u64> {
        let mut v: u64 = 0;
        let mut shift = 0u32;
        loop {
            let b = *self.buf.get(self.pos).ok_or_else(|| short("a varint"))?;
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err(Error::corrupt("varint overflows 64 bits"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
            shift += 7;
            if shift > 63 {
                return Err(Error::corrupt("varint overflows 64 bits"));
            }
        }
    }
    /// A varint that must fit in `usize` and be at most `max`.
    pub fn count(&mut self, what: &str, max: usize) -> Result<usize> {
        let v = self.varint()?;
        if v > max as u64 {
            return Err(Error::corrupt(format!("{what} = {v} exceeds its limit {max}")));
        }
        Ok(v as usize)
    }
    pub fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or_else(|| short(what))?;
        let s = self.buf.get(self.pos..end).ok_or_else(|| short(what))?;
        self.pos = end;
        Ok(s)
    }
    /// A length-prefixed stream.
    pub fn stream(&mut self, what: &str) -> Result<&'a [u8]> {
        let n = self.count(what, self.buf.len())?;
        self.take(n, what)
    }
    /// `n` words stored as 4 byte planes.
    pub fn planes_u32(&mut self, n: usize, what: &str, out: &mut Vec<u32>) -> Result<()> {
        let bytes = self.take(n.checked_mul(4).ok_or_else(|| short(what))?, what)?;
        let (p0, rest) = bytes.split_at(n);
        let (p1, rest) = rest.split_at(n);
        let (p2, p3) = rest.split_at(n);
        out.clear();
        out.extend((0..n).map(|i| u32::from_le_bytes([p0[i], p1[i], p2[i], p3[i]])));
        Ok(())
    }
}

/// A stream of small numbers: each value < 255 is one byte; larger values are the byte 255
/// followed, in a separate escape stream, by the varint of `value - 255`.
#[derive(Default)]
pub struct SmallWriter {
    pub bytes: Vec<u8>,
    pub escapes: Vec<u8>,
}

impl SmallWriter {
    #[inline]
    pub fn put(&mut self, v: u64) {
        if v < 255 {
            self.bytes.push(v as u8);
        } else {
            self.bytes.push(255);
            put_varint(&mut self.escapes, v - 255);
        }
    }
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.escapes.clear();
    }
}

/// Reader for [`SmallWriter`] output.
pub struct SmallReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    escapes: Cursor<'a>,
    what: &'static str,
}

impl<'a> SmallReader<'a> {
    pub fn new(bytes: &'a [u8], escapes: &'a [u8], what: &'static str) -> Self {
        Self {
            bytes,
            pos: 0,
            escapes: Cursor::new(escapes),
            what,
        }
    }
    #[inline]
    pub fn get(&mut self) -> Result<u64> {
        let b = *self.bytes.get(self.pos).ok_or_else(|| short(self.what))?;
        self.pos += 1;
        if b < 255 {
            Ok(u64::from(b))
        } else {
            Ok(self.escapes.varint()? + 255)
        }
    }
    /// True when every byte and escape was consumed (a frame with left-over bytes is corrupt).
    pub fn finished(&self) -> bool {
        self.pos == self.bytes.len() && self.escapes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_roundtrip() {
        let vals = [0u64, 1, 127, 128, 300, 1 << 35, u64::MAX];
        let mut out = Vec::new();
        for &v in &vals {
            put_varint(&mut out, v);
        }
        let mut c = Cursor::new(&out);
        for &v in &vals {
            assert_eq!(c.varint().unwrap(), v);
        }
        assert!(c.is_empty());
        assert!(Cursor::new(&[0x80]).varint().is_err());
    }

    #[test]
    fn small_roundtrip() {
        let mut w = SmallWriter::default();
        let vals = [0u64, 254, 255, 256, 100_000];
        vals.iter().for_each(|&v| w.put(v));
        let mut r = SmallReader::new(&w.bytes, &w.escapes, "test");
        for &v in &vals {
            assert_eq!(r.get().unwrap(), v);
        }
        assert!(r.finished());
    }
}
