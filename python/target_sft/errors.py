"""The cache's exceptions: one family under :class:`CacheError`.

The native module raises these classes (looked up here by name), so ``except CacheError`` catches
every cache failure, and each subclass also derives from the built-in exception a caller would
expect (``ValueError`` for bad input, ``KeyError`` for a missing key, ``OSError`` for I/O).
"""

from __future__ import annotations


class CacheError(Exception):
    """Base class of every error raised by the teacher cache."""


class CacheInputError(CacheError, ValueError):
    """Bad arguments: shapes, dtypes, ids outside the vocabulary, NaN log-probs, duplicate keys."""


class CacheFormatError(CacheError):
    """The directory or file is not a target-sft cache (or its header is not one)."""


class CacheVersionError(CacheFormatError):
    """The cache was written by a newer format version than this library reads."""


class CacheCorruptionError(CacheError):
    """A checksum mismatch, a truncated or missing shard, or a frame that does not decode."""


class CacheKeyError(CacheError, KeyError):
    """The key (or position) is not in the cache."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class CacheMismatchError(CacheError, ValueError):
    """The cache does not match what the caller has: other token ids, teacher, tokenizer, codec."""


class CacheIOError(CacheError, OSError):
    """An operating-system I/O failure while reading or writing the cache."""


class CacheLockedError(CacheIOError):
    """Another writer (pid@host named in the message) holds the lock of the files this writer
    needs; wait for it (``wait=True`` or a timeout) or write elsewhere (docs/FORMAT.md §6)."""


class BuildError(CacheError, RuntimeError):
    """A rank of a multi-rank cache build failed (the message names it); re-running resumes."""


__all__ = [
    "BuildError",
    "CacheCorruptionError",
    "CacheError",
    "CacheFormatError",
    "CacheIOError",
    "CacheInputError",
    "CacheKeyError",
    "CacheLockedError",
    "CacheMismatchError",
    "CacheVersionError",
]
