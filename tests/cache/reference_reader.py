"""An independent reader of the target-sft teacher cache, written from ``docs/FORMAT.md`` alone.

It uses only ``json``, ``safetensors`` (to prove every shard is a valid safetensors file and to read
its tensors and metadata), ``zstandard``, ``xxhash`` and ``numpy``; nothing from ``target_sft``.
Clarity comes first: frames are parsed with a byte cursor and the compact rows are decoded with a
plain per-entry loop that follows the pseudo-code of FORMAT.md §5.3 line by line; only the byte
planes are vectorised with numpy.

Public functions:

* :func:`read_manifest` — ``manifest.json`` as a dict, validated, its seal verified (§1).
* :class:`RefShard` — one shard: container checks (§2), region checksums of the header and every
  table (§7, format version 2), keys (§3), frame decoding (§4, §5).
* :func:`read_cache` — every record in global order, as dicts of numpy arrays.
* :func:`verify_checksums` — file sizes and XXH3-128 checksums of every shard (§7).
* :func:`build_codebook` — the codebook a writer builds from ``codec_params`` (§5.1).
* :func:`read_numbers` — a (``X_sym``, ``X_bits``) pair of number streams (§5.3).

Every violation of the format raises :class:`RefFormatError` (or a subclass) naming the file and,
where there is one, the record.

Where FORMAT.md leaves a reader's duty implicit, this reader is strict and says so:

* §2 lists the tensors "in this order" but binds only writers: only the tiling (no gap, no
  overlap) is enforced. The writer's order is exposed as ``RefShard.tensor_order``.
* §2: a shard whose metadata (``codec``, ``codec_params`` once parsed, ``top_k``,
  ``vocab_size``) disagrees with the manifest is rejected (the Rust reader does not check this).
* §5.1: a codebook that is empty, not strictly decreasing from 0, or longer than 65000 levels,
  and §5.2: an id table with repeated ids or ids ``>= V``, are rejected.
* §5.3: a ``row_flags`` byte other than 0 or 1, a row flagged as holding its label with no valid
  entry, a row not flagged although its label is among its decoded ids, repeated ids in a row
  (§3: "distinct ids per row"), a number symbol 192 (bit length 0), a non-zero padding bit, and a
  label rank that does not fit the int32 ``label_ranks`` are all rejected as corruption. (The
  Rust reader accepts a repeated id and an unflagged label; see the tests.)
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
import zstandard
from safetensors import safe_open

FORMAT = "target-sft-cache"
SHARD_FORMAT = "target-sft-shard"
FORMAT_VERSION = 3
CHECKSUMMED_VERSION = 2  # §7: manifests and shards from this version on carry region checksums
MANIFEST_CHECKSUM = "manifest_checksum"
IGNORE_INDEX = -100
CODECS = ("exact", "compact")

# §2: tensor order in the data buffer, with dtype and numpy dtype.
_DTYPES = {
    "U8": np.dtype("<u1"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
    "F32": np.dtype("<f4"),
}
_TENSORS = {
    "exact": [
        ("record_index", "U64"),
        ("key_hash", "U64"),
        ("key_offsets", "U64"),
        ("checksums", "U64"),
        ("key_bytes", "U8"),
        ("payload", "U8"),
    ],
    "compact": [
        ("record_index", "U64"),
        ("key_hash", "U64"),
        ("key_offsets", "U64"),
        ("checksums", "U64"),
        ("codebook", "F32"),
        ("id_table", "U32"),
        ("key_bytes", "U8"),
        ("payload", "U8"),
    ],
}

# §5.3: the streams of a compact rows section, in order.
_COMPACT_STREAMS = (
    "nvalid",
    "row_flags",
    "share_mask",
    "rank_sym",
    "rank_bits",
    "value_sym",
    "value_bits",
    "label_sym",
    "label_bits",
    "label_rank",
    "exact_values",
)
# §5.3 number streams: symbols below NUMBER_LITERALS are the value itself; 192 + b (b = 1..63)
# announces a value of bit length b after subtracting 191.
NUMBER_LITERALS = 192
MAX_LEVELS = 65000  # §5.1: 1 <= L <= 65000

RECORD_FIELDS = (
    "key",
    "input_ids",
    "labels",
    "topk_ids",
    "topk_logprobs",
    "label_logprobs",
    "label_ranks",
)


class RefFormatError(Exception):
    """The bytes do not follow FORMAT.md."""


class RefVersionError(RefFormatError):
    """``format_version`` is newer than this reader (§1)."""


class RefCorruptionError(RefFormatError):
    """A size, checksum, hash or frame does not match (§8)."""


# --------------------------------------------------------------------------------------------
# Hashes and keys (§3, §7)


def token_hash(input_ids: np.ndarray) -> int:
    """XXH3-64 (seed 0) of ``input_ids`` as little-endian int32 bytes."""
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(input_ids, dtype="<i4").tobytes())


def encode_key(key: int | str) -> bytes:
    """``b"i"`` + int64 LE, or ``b"s"`` + UTF-8."""
    if isinstance(key, str):
        return b"s" + key.encode("utf-8")
    return b"i" + struct.pack("<q", key)


def decode_key(raw: bytes) -> int | str:
    if raw[:1] == b"i":
        if len(raw) != 9:
            raise RefFormatError(f"int key of {len(raw)} bytes (expected 9)")
        return struct.unpack("<q", raw[1:])[0]
    if raw[:1] == b"s":
        try:
            return raw[1:].decode("utf-8")
        except UnicodeDecodeError as e:
            raise RefFormatError(f"str key is not UTF-8: {e}") from e
    raise RefFormatError(f"key with unknown tag {raw[:1]!r}")


# --------------------------------------------------------------------------------------------
# Byte-level helpers


class Cursor:
    """Sequential reader over bytes; every read checks bounds."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def fail(self, msg: str) -> RefCorruptionError:
        return RefCorruptionError(f"{self.what}: {msg}")

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise self.fail(f"needs {n} bytes at offset {self.pos}, {self.remaining} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def varint(self) -> int:
        """Unsigned LEB128, at most 10 bytes."""
        value = 0
        for i in range(10):
            b = self.u8()
            value |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if value >= 1 << 64:
                    raise self.fail("varint overflows 64 bits")
                return value
        raise self.fail("varint longer than 10 bytes")

    def stream(self) -> bytes:
        """``varint byte_length`` + bytes (§5.3)."""
        return self.take(self.varint())

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos

    def done(self) -> bool:
        return self.pos == len(self.data)

    def expect_done(self, section: str) -> None:
        if not self.done():
            raise self.fail(f"{self.remaining} left-over bytes after {section}")


def byte_planes(raw: bytes, n: int) -> np.ndarray:
    """Decode ``4·n`` bytes of byte planes (§4.1.1) into ``n`` uint32 words."""
    if len(raw) != 4 * n:
        raise RefCorruptionError(f"byte planes of {len(raw)} bytes for {n} words")
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(4, n).astype(np.uint32)
    return planes[0] | (planes[1] << 8) | (planes[2] << 16) | (planes[3] << 24)


class BitReader:
    """The bit stream of a number-stream pair (§5.3): bit ``i`` is bit ``i % 8`` of byte ``i / 8``."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0  # in bits
        self.what = what

    def read(self, nbits: int) -> int:
        if nbits == 0:
            return 0
        end = self.pos + nbits
        if end > 8 * len(self.data):
            raise RefCorruptionError(f"{self.what}: bit stream exhausted")
        chunk = int.from_bytes(self.data[self.pos // 8 : (end + 7) // 8], "little")
        value = (chunk >> (self.pos % 8)) & ((1 << nbits) - 1)
        self.pos = end
        return value

    def expect_done(self) -> None:
        """Only the zero padding to a whole byte may be left."""
        if (self.pos + 7) // 8 != len(self.data):
            raise RefCorruptionError(
                f"{self.what}: {len(self.data) - (self.pos + 7) // 8} left-over bytes"
            )
        if self.pos % 8 and self.data[-1] >> (self.pos % 8):
            raise RefCorruptionError(f"{self.what}: padding bits are not zero")


def read_numbers(sym: bytes, bits: bytes, what: str) -> list[int]:
    """Decode a number-stream pair (``X_sym``, ``X_bits``) of §5.3: a symbol ``v < 192`` is the
    value ``v``; a symbol ``192 + b`` (``1 <= b <= 63``) is followed by ``b - 1`` bits ``extra``
    and means ``((1 << (b - 1)) | extra) + 191``. Both streams are consumed exactly."""
    reader = BitReader(bits, what + "_bits")
    out = []
    for s in sym:
        if s < NUMBER_LITERALS:
            out.append(s)
            continue
        b = s - NUMBER_LITERALS
        if b == 0:
            raise RefCorruptionError(f"{what}_sym: symbol {s} (bit length 0) is not a number")
        out.append(((1 << (b - 1)) | reader.read(b - 1)) + NUMBER_LITERALS - 1)
    reader.expect_done()
    return out


def varints(data: bytes, what: str) -> list[int]:
    """A stream made only of varints, read to its end."""
    cur = Cursor(data, what)
    out = []
    while not cur.done():
        out.append(cur.varint())
    return out


class Queue:
    """Consume a list front to back; reading past the end or leaving values is corruption."""

    def __init__(self, values: list[Any], what: str) -> None:
        self.values = values
        self.i = 0
        self.what = what

    def next(self) -> Any:
        if self.i >= len(self.values):
            raise RefCorruptionError(f"stream {self.what} exhausted")
        v = self.values[self.i]
        self.i += 1
        return v

    def expect_done(self) -> None:
        if self.i != len(self.values):
            raise RefCorruptionError(
                f"stream {self.what}: {len(self.values) - self.i} values left over"
            )


# --------------------------------------------------------------------------------------------
# Codebook (§5.1)


def build_codebook(sqrt_step: float, tail_step: float, floor: float) -> np.ndarray:
    """The writer's codebook from ``codec_params``: float64 arithmetic, cast to float32."""
    h, s = float(sqrt_step), float(tail_step)
    levels = []
    n = 0
    while 1.0 - n * h >= max(2 * h / s, h):
        levels.append(2.0 * math.log(1.0 - n * h))
        n += 1
    u = levels[-1]
    while u - s >= floor:
        u -= s
        levels.append(u)
    return np.array(levels, dtype=np.float64).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Manifest (§1)


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and validate ``manifest.json`` of the cache directory ``path``."""
    mpath = Path(path) / "manifest.json"
    try:
        raw = mpath.read_bytes()
        m = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RefFormatError(f"{mpath}: cannot read manifest: {e}") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise RefFormatError(f"{mpath}: not a {FORMAT} manifest")
    version = m.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RefFormatError(f"{mpath}: bad format_version {version!r}")
    if version > FORMAT_VERSION:
        raise RefVersionError(f"{mpath}: format_version {version} > {FORMAT_VERSION}")
    # §1: the seal. XXH3-64 of the bytes before the last occurrence of '"manifest_checksum"'.
    if MANIFEST_CHECKSUM in m or version >= CHECKSUMMED_VERSION:
        stored = m.get(MANIFEST_CHECKSUM)
        at = raw.rfind(b'"' + MANIFEST_CHECKSUM.encode() + b'"')
        digits = stored[len("xxh3-64:") :] if isinstance(stored, str) else ""
        if (
            at < 0
            or not stored.startswith("xxh3-64:")
            or len(digits) != 16
            or any(ch not in "0123456789abcdef" for ch in digits)
        ):
            raise RefCorruptionError(f"{mpath}: manifest_checksum missing or malformed")
        if xxhash.xxh3_64_hexdigest(raw[:at]) != digits:
            raise RefCorruptionError(f"{mpath}: manifest_checksum does not match")
    if m.get("codec") not in CODECS:
        raise RefFormatError(f"{mpath}: unknown codec {m.get('codec')!r}")
    params = m.get("codec_params")
    need = {"zstd_level"}
    if m["codec"] == "compact" and isinstance(params, dict):
        # §5.1: a ladder (version 3) or one fixed codebook (versions 1-2)
        ladder = {"sqrt_steps", "tail_steps", "floor", "max_mean_kl"}
        need |= ladder if "sqrt_steps" in params else {"sqrt_step", "tail_step", "floor"}
    if not isinstance(params, dict) or not need <= params.keys():
        raise RefFormatError(f"{mpath}: codec_params {params!r} lacks {sorted(need)}")
    if not (isinstance(m.get("top_k"), int) and 1 <= m["top_k"] <= 256):
        raise RefFormatError(f"{mpath}: top_k {m.get('top_k')!r} not in 1..256")
    if not (isinstance(m.get("vocab_size"), int) and m["vocab_size"] >= 1):
        raise RefFormatError(f"{mpath}: bad vocab_size {m.get('vocab_size')!r}")
    for name in ("temperature", "tokenizer", "teacher", "complete"):
        if name not in m:
            raise RefFormatError(f"{mpath}: missing field {name!r}")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise RefFormatError(f"{mpath}: shards is not an array")
    for s in shards:
        f = s.get("file")
        if not isinstance(f, str) or not f or "/" in f or "\\" in f or f in (".", ".."):
            raise RefFormatError(f"{mpath}: shard file {f!r} is not a plain file name")
        if f.startswith(".tmp-"):
            raise RefFormatError(f"{mpath}: shard file {f!r} is a temporary file")
        c = s.get("checksum", "")
        hexpart = c[len("xxh3-128:") :]
        if not (
            c.startswith("xxh3-128:")
            and len(hexpart) == 32
            and all(ch in "0123456789abcdef" for ch in hexpart)
        ):
            raise RefFormatError(f"{mpath}: shard {f}: bad checksum {c!r}")
    for total, part in (
        ("num_records", "records"),
        ("num_tokens", "tokens"),
        ("num_supervised", "supervised"),
    ):
        if m.get(total) != sum(s[part] for s in shards):
            raise RefFormatError(
                f"{mpath}: {total} = {m.get(total)} is not the sum of shards' {part}"
            )
    if len({s["file"] for s in shards}) != len(shards):
        raise RefFormatError(f"{mpath}: a shard file is listed twice")
    return m


# --------------------------------------------------------------------------------------------
# Shard (§2)


class RefShard:
    """One shard file. ``manifest`` gives the cache-wide settings, ``entry`` its manifest entry
    (size, record count); both optional for a shard read on its own (then taken from metadata)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: dict[str, Any] | None = None,
        entry: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.name = self.path.name
        size = self.path.stat().st_size
        if entry is not None and entry["bytes"] != size:
            raise RefCorruptionError(f"{self.name}: size {size} != manifest's {entry['bytes']}")

        # The container by hand (§2): u64 N | JSON header padded to 8 | data buffer.
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise RefCorruptionError(f"{self.name}: shorter than 8 bytes")
            (n,) = struct.unpack("<Q", head)
            if n % 8 or 8 + n > size:
                raise RefCorruptionError(f"{self.name}: header length {n} (file {size} bytes)")
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise RefCorruptionError(f"{self.name}: header does not parse: {e}") from e
        data_len = size - 8 - n
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise RefCorruptionError(f"{self.name}: __metadata__ missing or not all strings")
        if meta.get("format") != SHARD_FORMAT:
            raise RefFormatError(f"{self.name}: metadata format {meta.get('format')!r}")
        if meta.get("format_version") not in ("1", "2", "3"):
            if meta.get("format_version", "").isdigit() and int(meta["format_version"]) > 3:
                raise RefVersionError(f"{self.name}: format_version {meta['format_version']}")
            raise RefFormatError(f"{self.name}: format_version {meta.get('format_version')!r}")
        self.format_version = int(meta["format_version"])
        self.codec = meta.get("codec")
        if self.codec not in CODECS:
            raise RefFormatError(f"{self.name}: unknown codec {self.codec!r}")
        try:
            self.codec_params = json.loads(meta["codec_params"])
            self.top_k = int(meta["top_k"])
            self.vocab_size = int(meta["vocab_size"])
            self.num_records = int(meta["records"])
        except (KeyError, ValueError) as e:
            raise RefFormatError(f"{self.name}: bad metadata {meta!r}: {e}") from e
        if manifest is not None:
            for field in ("codec", "codec_params", "top_k", "vocab_size"):
                if getattr(self, field) != manifest[field]:
                    raise RefFormatError(
                        f"{self.name}: metadata {field} = {getattr(self, field)!r}, "
                        f"manifest says {manifest[field]!r}"
                    )
        if entry is not None and entry["records"] != self.num_records:
            raise RefFormatError(
                f"{self.name}: {self.num_records} records, manifest says {entry['records']}"
            )

        # Tensors (the names and dtypes of §2) tile the data buffer: no gap, no overlap. §2 lists
        # the order writers use; §8 only asks readers for the tiling, and a shard re-saved by the
        # safetensors library (which orders tensors by alignment, then name) is still valid, so
        # the order is recorded in ``tensor_order`` but not enforced.
        order = [
            (t, d) for t, d in _TENSORS[self.codec] if t != "checksums" or self.format_version >= 2
        ]
        if set(header) != {t for t, _ in order}:
            raise RefCorruptionError(
                f"{self.name}: tensors {sorted(header)}, expected {[t for t, _ in order]}"
            )
        pos = 0
        self.tensor_order = sorted(header, key=lambda t: tuple(header[t]["data_offsets"]))
        for tname in self.tensor_order:
            info = header[tname]
            dtype = dict(order)[tname]
            begin, end = info["data_offsets"]
            count = math.prod(info["shape"])
            if (
                info["dtype"] != dtype
                or begin != pos
                or end - begin != count * _DTYPES[dtype].itemsize
            ):
                raise RefCorruptionError(
                    f"{self.name}: tensor {tname} {info} does not tile at {pos}"
                )
            pos = end
        if pos != data_len:
            raise RefCorruptionError(f"{self.name}: tensors cover {pos} of {data_len} data bytes")
        r = self.num_records
        shapes = {"record_index": [r, 5], "key_hash": [r], "key_offsets": [r + 1]}
        for tname, shape in shapes.items():
            if header[tname]["shape"] != shape:
                raise RefCorruptionError(f"{self.name}: {tname} shape {header[tname]['shape']}")
        for tname in ("key_bytes", "payload", "codebook", "id_table"):
            if tname in header and len(header[tname]["shape"]) != 1:
                raise RefCorruptionError(f"{self.name}: {tname} is not 1-D")

        # §7: region checksums (version 2): the header, then every table but the payload.
        if self.format_version >= CHECKSUMMED_VERSION:
            if header["checksums"]["shape"] != [len(order) - 1]:
                raise RefCorruptionError(f"{self.name}: checksums shape {header['checksums']}")
            names = meta.get("checksums", "").split(",")
            if names[0] != "header" or sorted(names[1:]) != sorted(
                t for t, _ in order if t not in ("checksums", "payload")
            ):
                raise RefCorruptionError(f"{self.name}: metadata checksums = {names}")
            with open(self.path, "rb") as f:
                whole = f.read()
            begin, end = header["checksums"]["data_offsets"]
            sums = np.frombuffer(whole[8 + n + begin : 8 + n + end], dtype="<u8")
            for i, region in enumerate(names):
                if region == "header":
                    part = whole[: 8 + n]
                else:
                    b, e = header[region]["data_offsets"]
                    part = whole[8 + n + b : 8 + n + e]
                if xxhash.xxh3_64_intdigest(part) != int(sums[i]):
                    raise RefCorruptionError(f"{self.name}: region {region} fails its checksum")

        # Now through the safetensors library: it must accept the file and agree with us.
        with safe_open(str(self.path), framework="numpy") as st:
            if set(st.keys()) != set(header) or st.metadata() != meta:
                raise RefCorruptionError(f"{self.name}: safetensors sees another file")
            t = {name: st.get_tensor(name) for name in st.keys()}
        for tname, dtype in order:
            if t[tname].dtype != _DTYPES[dtype] or list(t[tname].shape) != header[tname]["shape"]:
                raise RefCorruptionError(f"{self.name}: safetensors reads {tname} differently")
        self.record_index = t["record_index"]
        self.key_hash = t["key_hash"]
        self.key_offsets = t["key_offsets"]
        self.key_bytes = t["key_bytes"].tobytes()
        self.payload = t["payload"].tobytes()
        if self.codec == "compact":
            self.id_table = t["id_table"]
            # §5.1: with a ladder (codec_params sqrt_steps) the codebook tensor holds the tables
            # of the rungs listed in codebook_rungs, in order, and every frame names its rung;
            # otherwise it is one table and frames carry no rung byte.
            self.rung_byte = "sqrt_steps" in self.codec_params
            cb = t["codebook"]
            if self.rung_byte:
                # §2: a JSON list of [rung, levels] pairs of integers
                try:
                    listed = json.loads(meta["codebook_rungs"])
                except (KeyError, ValueError) as e:
                    raise RefFormatError(f"{self.name}: bad codebook_rungs: {e}") from e
                if not isinstance(listed, list) or not all(
                    isinstance(pair, list) and len(pair) == 2 and all(type(x) is int for x in pair)
                    for pair in listed
                ):
                    raise RefFormatError(
                        f"{self.name}: codebook_rungs {meta['codebook_rungs']!r} is not a list "
                        "of [rung, levels] pairs of integers"
                    )
                pairs = [(j, n) for j, n in listed]
                rungs = len(self.codec_params["sqrt_steps"])
                self.codebooks: dict[int, np.ndarray] = {}
                at = 0
                for j, n in pairs:
                    if not 0 <= j < rungs or j in self.codebooks or n < 1:
                        raise RefCorruptionError(f"{self.name}: codebook_rungs entry [{j}, {n}]")
                    self.codebooks[j] = cb[at : at + n]
                    at += n
                if at != len(cb):
                    raise RefCorruptionError(
                        f"{self.name}: codebook_rungs accounts for {at} of {len(cb)} levels"
                    )
            else:
                self.codebooks = {0: cb}
            for table in self.codebooks.values():
                if (
                    len(table) == 0
                    or table[0] != 0
                    or not np.all(table[1:] < table[:-1])
                    or not np.all(np.isfinite(table))  # §5.1: finite levels
                ):
                    raise RefCorruptionError(
                        f"{self.name}: codebook not strictly decreasing from 0 through finite "
                        "levels"
                    )
                if len(table) > MAX_LEVELS:  # §5.1: 1 <= L <= 65000
                    raise RefCorruptionError(f"{self.name}: codebook of {len(table)} levels")
            if len(self.id_table) and int(self.id_table.max()) >= self.vocab_size:
                raise RefCorruptionError(f"{self.name}: id_table holds ids >= vocab_size")
            if len(np.unique(self.id_table)) != len(self.id_table):
                raise RefCorruptionError(f"{self.name}: id_table ids not distinct")

        # Index: frames inside the payload (compared without uint64 wrap-around).
        ri = self.record_index
        for i in range(r):
            off, length = int(ri[i, 0]), int(ri[i, 1])
            if off + length > len(self.payload):
                raise RefCorruptionError(f"{self.name}: record {i}: frame outside payload")
            if int(ri[i, 2]) < 1:
                raise RefCorruptionError(f"{self.name}: record {i}: n_tokens = 0")

        # Keys (§3).
        ko = self.key_offsets
        if ko[0] != 0 or np.any(ko[1:] < ko[:-1]) or ko[-1] != len(self.key_bytes):
            raise RefCorruptionError(f"{self.name}: key_offsets do not tile key_bytes")
        self.keys: list[int | str] = []
        for i in range(r):
            raw = self.key_bytes[int(ko[i]) : int(ko[i + 1])]
            if xxhash.xxh3_64_intdigest(raw) != int(self.key_hash[i]):
                raise RefCorruptionError(f"{self.name}: record {i}: key_hash mismatch")
            self.keys.append(decode_key(raw))

    def __len__(self) -> int:
        return self.num_records

    def frame(self, i: int) -> bytes:
        """Decompressed raw frame of record ``i`` (§4)."""
        off, length = int(self.record_index[i, 0]), int(self.record_index[i, 1])
        comp = self.payload[off : off + length]
        where = f"{self.name}: record {i}"
        try:
            params = zstandard.get_frame_parameters(comp)
            if params.content_size == zstandard.CONTENTSIZE_UNKNOWN or not params.has_checksum:
                raise RefCorruptionError(f"{where}: zstd frame lacks content size or checksum")
            # One frame, exactly: left-over compressed bytes are an error; the checksum is checked.
            raw = zstandard.ZstdDecompressor().decompress(comp, allow_extra_data=False)
        except zstandard.ZstdError as e:
            raise RefCorruptionError(f"{where}: zstd: {e}") from e
        return raw

    def record(self, i: int, check_token_hash: bool = True) -> dict[str, Any]:
        """Decode record ``i`` of this shard into a dict of numpy arrays."""
        if not 0 <= i < self.num_records:
            raise IndexError(i)
        where = f"{self.name}: record {i}"
        _, _, n_tokens, n_supervised, thash = (int(x) for x in self.record_index[i])
        cur = Cursor(self.frame(i), where)
        t_len, s_len = cur.varint(), cur.varint()
        if (t_len, s_len) != (n_tokens, n_supervised):
            raise RefCorruptionError(
                f"{where}: frame T, S = {t_len}, {s_len}; index says {n_tokens}, {n_supervised}"
            )
        rec: dict[str, Any] = {"key": self.keys[i]}
        rec.update(decode_tokens(cur, t_len, s_len, self.vocab_size))
        if check_token_hash and token_hash(rec["input_ids"]) != thash:
            raise RefCorruptionError(f"{where}: token_hash mismatch")
        if self.codec == "exact":
            rows = decode_exact_rows(cur, s_len, self.top_k)
        else:
            row_labels = rec["labels"][1:][rec["labels"][1:] != IGNORE_INDEX]
            rows = decode_compact_rows(
                cur,
                row_labels,
                self.top_k,
                self.vocab_size,
                self.codebooks,
                self.rung_byte,
                self.id_table,
            )
        cur.expect_done("the rows section")
        rec.update(rows)
        ids = rec["topk_ids"]
        if np.any(ids >= self.vocab_size) or np.any(ids < -1):
            raise RefCorruptionError(f"{where}: top-k id outside [0, V) and not padding")
        return rec


# --------------------------------------------------------------------------------------------
# Frames (§4)


def decode_tokens(cur: Cursor, t_len: int, s_len: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Tokens section (§4.1): input_ids byte planes, supervision mask, label exceptions."""
    input_ids = byte_planes(cur.take(4 * t_len), t_len)
    if np.any(input_ids >= vocab_size):
        raise cur.fail("input id >= vocab_size")
    input_ids = input_ids.view(np.int32)

    mask_bytes = np.frombuffer(cur.take((t_len + 7) // 8), dtype=np.uint8)
    bits = np.unpackbits(mask_bytes, bitorder="little")
    if np.any(bits[t_len:]):
        raise cur.fail("supervision mask has bits set past T")
    mask = bits[:t_len].astype(bool)
    if int(mask[1:].sum()) != s_len:
        raise cur.fail(f"mask has {int(mask[1:].sum())} supervised positions t >= 1, S = {s_len}")

    labels = np.where(mask, input_ids, np.int32(IGNORE_INDEX)).astype(np.int32)
    for _ in range(cur.varint()):
        t, label = cur.varint(), cur.u32()
        if t >= t_len or not mask[t]:
            raise cur.fail(f"label exception at unsupervised or out-of-range position {t}")
        if label >= vocab_size:
            raise cur.fail(f"label exception {label} >= vocab_size")
        labels[t] = label
    return {"input_ids": input_ids, "labels": labels}


def decode_exact_rows(cur: Cursor, s_len: int, k: int) -> dict[str, np.ndarray]:
    """Exact rows (§4.2): four byte-plane arrays, bit patterns."""
    ids = byte_planes(cur.take(4 * s_len * k), s_len * k).view(np.int32).reshape(s_len, k)
    lps = byte_planes(cur.take(4 * s_len * k), s_len * k).view(np.float32).reshape(s_len, k)
    label_lps = byte_planes(cur.take(4 * s_len), s_len).view(np.float32)
    label_ranks = byte_planes(cur.take(4 * s_len), s_len).view(np.int32)
    return {
        "topk_ids": ids,
        "topk_logprobs": lps,
        "label_logprobs": label_lps,
        "label_ranks": label_ranks,
    }


def decode_compact_rows(
    cur: Cursor,
    row_labels: np.ndarray,
    k: int,
    vocab_size: int,
    codebooks: dict[int, np.ndarray],
    rung_byte: bool,
    id_table: np.ndarray,
) -> dict[str, np.ndarray]:
    """Compact rows (§5.3), following the document's pseudo-code. ``row_labels[r]`` is the label
    of row ``r`` (``labels[t]`` at the row's position, from the tokens section); ``codebooks``
    the shard's tables by rung, ``rung_byte`` whether the section starts with its rungs and
    split (§5.1, §5.3: rows ``r < split`` use rung ``a``, the others rung ``b``)."""
    s_len = len(row_labels)
    if rung_byte:
        rung_a, rung_b, split = cur.u8(), cur.u8(), cur.varint()
        if split > s_len:
            raise cur.fail(f"rung split {split} > S = {s_len}")
    else:
        rung_a = rung_b = 0
        split = s_len
    for rung in (rung_a, rung_b):
        if rung not in codebooks:
            raise cur.fail(f"codebook rung {rung} is not stored in the shard")
    m = len(id_table)
    flags = cur.u8()
    if flags & ~1:
        raise cur.fail(f"compact flags {flags:#x} has reserved bits set")
    st = {name: cur.stream() for name in _COMPACT_STREAMS}
    what = cur.what

    if flags & 1:
        if st["nvalid"]:
            raise cur.fail("nvalid stream not empty although every row is full")
        nvalid = Queue([k] * s_len, "nvalid")
    else:
        nvalid = Queue(varints(st["nvalid"], what + ": nvalid"), "nvalid")
    row_flags = st["row_flags"]
    if len(row_flags) != s_len:
        raise cur.fail(f"row_flags holds {len(row_flags)} bytes for S = {s_len} rows")
    share = Cursor(st["share_mask"], what + ": share_mask")
    rank_q = Queue(read_numbers(st["rank_sym"], st["rank_bits"], what + ": rank"), "rank")
    value_q = Queue(read_numbers(st["value_sym"], st["value_bits"], what + ": value"), "value")
    label_q = Queue(read_numbers(st["label_sym"], st["label_bits"], what + ": label"), "label")
    label_rank = Queue(varints(st["label_rank"], what + ": label_rank"), "label_rank")
    if len(st["exact_values"]) % 4:
        raise cur.fail("exact_values is not a whole number of float32")
    exact_values = Queue(list(np.frombuffer(st["exact_values"], dtype="<f4")), "exact_values")

    ids = np.full((s_len, k), -1, dtype=np.int32)
    lps = np.full((s_len, k), -np.inf, dtype=np.float32)
    label_lps = np.zeros(s_len, dtype=np.float32)
    label_ranks = np.zeros(s_len, dtype=np.int32)
    prev: list[int] = []  # the previous row's ids, in decoded order
    for r in range(s_len):
        where = f"row {r}"
        n = nvalid.next()
        if n > k:
            raise cur.fail(f"{where}: nvalid {n} > k = {k}")
        flag = row_flags[r]
        if flag > 1:
            raise cur.fail(f"{where}: row_flags byte {flag} is neither 0 nor 1")
        label = int(row_labels[r])
        row: list[int] = []
        # ids: the label, then the shared entries of the previous row, then the new ids.
        if flag:
            if n == 0:
                raise cur.fail(f"{where}: flagged as holding its label but has no entry")
            row.append(label)
        if r >= 1:
            mask = np.unpackbits(
                np.frombuffer(share.take((len(prev) + 7) // 8), dtype=np.uint8), bitorder="little"
            )
            if np.any(mask[len(prev) :]):
                raise cur.fail(f"{where}: share_mask bit past the previous row's {len(prev)}")
            for j in np.flatnonzero(mask).tolist():
                if len(row) >= n:
                    raise cur.fail(f"{where}: more shared entries than nvalid {n}")
                row.append(prev[j])
        rank = 0
        for i in range(n - len(row)):
            g = rank_q.next()
            rank = g if i == 0 else rank + 1 + g
            ident = int(id_table[rank]) if rank < m else rank - m
            if ident >= vocab_size:
                raise cur.fail(f"{where}: id {ident} (rank {rank}) >= vocab_size")
            row.append(ident)
        if len(set(row)) != n:
            raise cur.fail(f"{where}: repeated id")
        if not flag and label in row:
            raise cur.fail(f"{where}: label {label} among the ids but row_flags is 0")
        ids[r, :n] = row

        # values, with the row's codebook: the label's (which is also its entry's), then each
        # remaining entry's.
        levels = codebooks[rung_a if r < split else rung_b]
        n_levels = len(levels)

        def value_of(
            q: int, where: str = where, levels: np.ndarray = levels, n_levels: int = n_levels
        ) -> np.float32:
            if q < n_levels:
                return levels[q]
            if q == n_levels:
                return exact_values.next()
            raise cur.fail(f"{where}: codebook index {q} > L = {n_levels}")

        label_lps[r] = value_of(label_q.next())
        if flag:
            lps[r, 0] = label_lps[r]
        for e in range(flag, n):
            c = value_q.next()
            if c > n_levels:
                raise cur.fail(f"{where}: codebook code {c} > L = {n_levels}")
            lps[r, e] = value_of(n_levels - c)
        lr = label_rank.next()
        if lr >= 1 << 31:
            raise cur.fail(f"{where}: label rank {lr} does not fit int32")
        label_ranks[r] = lr
        prev = row
    share.expect_done("share_mask")
    for qu in (nvalid, rank_q, value_q, label_q, label_rank, exact_values):
        qu.expect_done()
    return {
        "topk_ids": ids,
        "topk_logprobs": lps,
        "label_logprobs": label_lps,
        "label_ranks": label_ranks,
    }


# --------------------------------------------------------------------------------------------
# Whole cache


def open_shards(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[RefShard]]:
    """The manifest and its shards, in manifest order (unlisted and ``.tmp-`` files ignored)."""
    m = read_manifest(path)
    shards = [RefShard(Path(path) / e["file"], m, e) for e in m["shards"]]
    return m, shards


def read_cache(path: str | os.PathLike[str], check_token_hash: bool = True) -> list[dict[str, Any]]:
    """Every record of the cache in global order (§1), as dicts with keys :data:`RECORD_FIELDS`."""
    m, shards = open_shards(path)
    out: list[dict[str, Any]] = []
    for shard, entry in zip(shards, m["shards"], strict=True):
        recs = [shard.record(i, check_token_hash) for i in range(len(shard))]
        tokens = sum(len(r["input_ids"]) for r in recs)
        supervised = sum(len(r["label_ranks"]) for r in recs)
        if (tokens, supervised) != (entry["tokens"], entry["supervised"]):
            raise RefCorruptionError(
                f"{shard.name}: holds {tokens} tokens / {supervised} supervised, "
                f"manifest says {entry['tokens']} / {entry['supervised']}"
            )
        out.extend(recs)
    keys = [r["key"] for r in out]
    if len(set(keys)) != len(keys):
        raise RefCorruptionError(f"{path}: keys are not unique")
    return out


def verify_checksums(path: str | os.PathLike[str]) -> int:
    """Check every listed shard's size and XXH3-128 checksum (§7). Returns the shard count."""
    m = read_manifest(path)
    for e in m["shards"]:
        f = Path(path) / e["file"]
        data = f.read_bytes()
        if len(data) != e["bytes"]:
            raise RefCorruptionError(f"{e['file']}: size {len(data)} != manifest's {e['bytes']}")
        digest = "xxh3-128:" + xxhash.xxh3_128_hexdigest(data)
        if digest != e["checksum"]:
            raise RefCorruptionError(
                f"{e['file']}: checksum {digest} != manifest's {e['checksum']}"
            )
    return len(m["shards"])
