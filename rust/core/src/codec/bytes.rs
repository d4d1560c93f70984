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

#[cold]
#[inline(never)]
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
    #[inline]
    pub fn varint(&mut self) -> Result<u64> {
        if let Some(&b) = self.buf.get(self.pos) {
            if b < 0x80 {
                self.pos += 1;
                return Ok(u64::from(b));
            }
        }
        self.varint_slow()
    }

    #[cold]
    fn varint_slow(&mut self) -> Result<u64> {
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
            return Err(Error::corrupt(format!(
                "{what} = {v} exceeds its limit {max}"
            )));
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
    /// `n` int32 words stored as 4 byte planes.
    pub fn planes_i32(&mut self, n: usize, what: &str, out: &mut Vec<i32>) -> Result<()> {
        let p = self.planes(n, what)?;
        out.clear();
        out.extend((0..n).map(|i| p.get(i) as i32));
        Ok(())
    }
    /// `n` words stored as 4 byte planes, for random access.
    pub fn planes(&mut self, n: usize, what: &str) -> Result<Planes<'a>> {
        let bytes = self.take(n.checked_mul(4).ok_or_else(|| short(what))?, what)?;
        let (p0, rest) = bytes.split_at(n);
        let (p1, rest) = rest.split_at(n);
        let (p2, p3) = rest.split_at(n);
        Ok(Planes { p0, p1, p2, p3 })
    }
}

/// `n` 4-byte words stored as 4 byte planes (least significant plane first).
#[derive(Clone, Copy)]
pub struct Planes<'a> {
    p0: &'a [u8],
    p1: &'a [u8],
    p2: &'a [u8],
    p3: &'a [u8],
}

impl Planes<'_> {
    pub fn len(&self) -> usize {
        self.p0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.p0.is_empty()
    }
    /// Word `i` (panics past the end).
    #[inline(always)]
    pub fn get(&self, i: usize) -> u32 {
        u32::from_le_bytes([self.p0[i], self.p1[i], self.p2[i], self.p3[i]])
    }
    /// `out[i] = f(word start + i)` for every slot of `out`.
    #[inline]
    pub fn map_into<T>(&self, start: usize, out: &mut [T], f: impl Fn(u32) -> T) {
        let n = out.len();
        let (p0, p1) = (&self.p0[start..start + n], &self.p1[start..start + n]);
        let (p2, p3) = (&self.p2[start..start + n], &self.p3[start..start + n]);
        for (i, o) in out.iter_mut().enumerate() {
            *o = f(u32::from_le_bytes([p0[i], p1[i], p2[i], p3[i]]));
        }
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
}

/// Numbers below this are one symbol byte; larger ones are a bucket symbol plus extra bits.
pub const DIRECT: u64 = 192;

/// Bucketed numbers (like DEFLATE's length codes): a value `v < 192` is the symbol byte `v`;
/// otherwise, with `w = v − 192` and `b` = the bit length of `w + 1` (1..=63), the symbol byte is
/// `192 + b` and the low `b − 1` bits of `w + 1` (below its leading 1) are appended to a bit
/// stream, least significant bit first. Symbols are entropy-coded by zstd; the extra bits are
/// close to uniform and stored raw.
#[derive(Default)]
pub struct NumWriter {
    pub symbols: Vec<u8>,
    pub bits: Vec<u8>,
    acc: u64,
    nacc: u32,
}

impl NumWriter {
    #[inline]
    pub fn put(&mut self, v: u64) {
        if v < DIRECT {
            self.symbols.push(v as u8);
            return;
        }
        let w = v - DIRECT + 1;
        let b = 64 - w.leading_zeros();
        self.symbols.push((DIRECT as u32 + b) as u8);
        self.put_bits(w & !(1u64 << (b - 1)), b - 1);
    }
    #[inline]
    fn put_bits(&mut self, mut v: u64, mut n: u32) {
        while n > 0 {
            let take = n.min(64 - self.nacc).min(32);
            self.acc |= (v & ((1u64 << take) - 1)) << self.nacc;
            self.nacc += take;
            v >>= take;
            n -= take;
            while self.nacc >= 8 {
                self.bits.push(self.acc as u8);
                self.acc >>= 8;
                self.nacc -= 8;
            }
        }
    }
    /// Flush the last partial byte (zero-padded). Call once, after the last `put`.
    pub fn finish(&mut self) {
        if self.nacc > 0 {
            self.bits.push(self.acc as u8);
            self.acc = 0;
            self.nacc = 0;
        }
    }
    pub fn clear(&mut self) {
        self.symbols.clear();
        self.bits.clear();
        self.acc = 0;
        self.nacc = 0;
    }
}

/// Reader for [`NumWriter`] output. Extra bits come from a 64-bit buffer refilled 7 bytes at
/// a time, so a bucketed value costs a few instructions.
pub struct NumReader<'a> {
    symbols: &'a [u8],
    pos: usize,
    bits: &'a [u8],
    byte_pos: usize,
    acc: u64,
    nacc: u32,
    what: &'static str,
}

impl<'a> NumReader<'a> {
    pub fn new(symbols: &'a [u8], bits: &'a [u8], what: &'static str) -> Self {
        Self {
            symbols,
            pos: 0,
            bits,
            byte_pos: 0,
            acc: 0,
            nacc: 0,
            what,
        }
    }

    #[inline(always)]
    fn refill(&mut self) {
        if let Some(chunk) = self.bits.get(self.byte_pos..self.byte_pos + 8) {
            let w = u64::from_le_bytes(chunk.try_into().unwrap());
            self.acc |= w << self.nacc;
            let take = (63 - self.nacc) / 8;
            self.byte_pos += take as usize;
            self.nacc += take * 8;
        } else {
            while self.nacc <= 56 && self.byte_pos < self.bits.len() {
                self.acc |= u64::from(self.bits[self.byte_pos]) << self.nacc;
                self.byte_pos += 1;
                self.nacc += 8;
            }
        }
    }

    #[inline(always)]
    fn take_bits(&mut self, n: u32) -> Result<u64> {
        if self.nacc < n {
            self.refill();
            if self.nacc < n {
                return Err(short(self.what));
            }
        }
        let v = self.acc & ((1u64 << n) - 1);
        self.acc >>= n;
        self.nacc -= n;
        Ok(v)
    }

    #[inline(always)]
    pub fn get(&mut self) -> Result<u64> {
        let Some(&sym) = self.symbols.get(self.pos) else {
            return Err(short(self.what));
        };
        self.pos += 1;
        if u64::from(sym) < DIRECT {
            return Ok(u64::from(sym));
        }
        let b = u32::from(sym) - DIRECT as u32;
        if b == 0 || b > 57 {
            return self.get_wide(sym);
        }
        let n = b - 1;
        let v = if n == 0 { 0 } else { self.take_bits(n)? };
        Ok(((1u64 << n) | v) + DIRECT - 1)
    }

    #[cold]
    #[inline(never)]
    fn get_wide(&mut self, sym: u8) -> Result<u64> {
        let b = u32::from(sym) - DIRECT as u32;
        if b == 0 || b > 63 {
            return Err(Error::corrupt(format!(
                "{}: invalid bucket symbol {sym}",
                self.what
            )));
        }
        let n = b - 1;
        let lo = self.take_bits(32)?;
        let hi = self.take_bits(n - 32)?;
        Ok(((1u64 << n) | (hi << 32) | lo) + DIRECT - 1)
    }

    /// True when every symbol was consumed and only zero padding (< 8 bits) is left.
    pub fn finished(&self) -> bool {
        let left = (self.bits.len() - self.byte_pos) * 8 + self.nacc as usize;
        self.pos == self.symbols.len()
            && left < 8
            && self.acc == 0
            && self.byte_pos == self.bits.len()
    }
}

#[cfg(test)]
mod num_tests {
    use super::*;

    #[test]
    fn num_roundtrip() {
        let vals = [
            0u64,
            5,
            191,
            192,
            193,
            255,
            256,
            1000,
            65_535,
            1 << 40,
            u64::MAX / 4,
        ];
        let mut w = NumWriter::default();
        vals.iter().for_each(|&v| w.put(v));
        w.finish();
        let mut r = NumReader::new(&w.symbols, &w.bits, "t");
        for &v in &vals {
            assert_eq!(r.get().unwrap(), v);
        }
        assert!(r.finished());
    }
}
