"""The sample order of an epoch: a pure function of (shard record counts, ``seed``, epoch,
``shuffle``, ``shuffle_block_size``), independent of numpy's generator algorithms.

Shards are ordered by a splitmix64 hash and the concatenated records cut into blocks of
``shuffle_block_size``, each permuted by a keyed Feistel network: no array of a block's size is
ever built and any position is computed in O(1) (docs/STREAMING.md §Order).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["EpochOrder", "feistel", "hash_key", "mix64", "permutation"]

_U64 = np.uint64


def mix64(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser, a bijection of uint64 (vectorised, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _U64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def hash_key(*parts: int) -> np.uint64:
    """A 64-bit hash of a tuple of non-negative integers."""
    h = np.zeros(1, dtype=np.uint64)
    for p in parts:
        h = mix64(h ^ mix64(np.array([p & 0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64)))
    return h[0]


def permutation(n: int, key: np.uint64) -> npt.NDArray[np.int64]:
    """A pseudo-random permutation of ``range(n)``: argsort of distinct 64-bit hashes."""
    keys = mix64(np.arange(n, dtype=np.uint64) ^ key)  # distinct: mix64 is a bijection
    return np.argsort(keys, kind="stable").astype(np.int64)


_ROUNDS = 4  # Feistel rounds (4 rounds of a good round function: a strong pseudo-random perm)


def feistel(x: npt.NDArray[np.uint64], n: int, keys: list[npt.NDArray[np.uint64]]) -> Any:
    """A keyed bijection of ``[0, n)`` applied to ``x`` (per-element round keys): a balanced
    Feistel network on the smallest even number of bits covering ``n``, cycle-walked back into
    ``[0, n)`` (the domain is < 4n, so under 4 walks are expected)."""
    bits = max(2, (n - 1).bit_length())
    half = (bits + 1) // 2
    mask, sh = _U64((1 << half) - 1), _U64(half)
    x = x.copy()
    todo = np.arange(x.shape[0])
    while todo.size:
        lo, hi = x[todo] & mask, x[todo] >> sh
        ks = [k[todo] for k in keys]
        for k in ks:
            lo, hi = hi ^ (mix64(lo ^ k) & mask), lo
        y = (hi << sh) | lo
        x[todo] = y
        todo = todo[y >= _U64(n)]
    return x


class EpochOrder:
    """The sample order of one epoch: order index ``k`` in ``[0, N)`` -> global record position.

    Shards are permuted (an argsort, O(shards)); the concatenated records are cut into blocks
    of ``block_size`` and block ``b`` is permuted by a keyed bijection (Feistel network), so a
    position is computed in O(1) for any ``k`` and nothing of size ``block_size`` is stored.
    """

    def __init__(
        self,
        shard_records: npt.NDArray[np.int64],
        *,
        seed: int,
        epoch: int,
        shuffle: bool,
        block_size: int,
    ) -> None:
        self.shuffle = shuffle
        self.block_size = block_size
        self.seed, self.epoch = seed, epoch
        self.starts = np.concatenate([[0], np.cumsum(shard_records)]).astype(np.int64)
        self.n = int(self.starts[-1])
        if shuffle:
            self.shard_perm = permutation(len(shard_records), hash_key(seed, epoch, 0))
            self.perm_starts = np.concatenate(
                [[0], np.cumsum(shard_records[self.shard_perm])]
            ).astype(np.int64)
            self._round_keys = [hash_key(seed, epoch, 1, r) for r in range(_ROUNDS)]

    def _within_blocks(self, k: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Shuffle ``k`` within its block: block ``b``'s indices map to a permutation of them."""
        b = self.block_size
        blocks = k // b
        out = np.empty_like(k)
        last = (self.n - 1) // b if self.n else 0
        for sel, size in ((blocks < last, b), (blocks == last, self.n - last * b)):
            if not sel.any():
                continue
            blk = blocks[sel].astype(np.uint64)
            keys = [mix64(blk ^ rk) for rk in self._round_keys]  # per-block round keys
            within = feistel((k[sel] - blocks[sel] * b).astype(np.uint64), size, keys)
            out[sel] = blocks[sel] * b + within.astype(np.int64)
        return out

    def positions(self, k: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """Global record positions of order indices ``k`` (1-d, values in ``[0, N)``)."""
        if not self.shuffle:
            return k.astype(np.int64, copy=True)
        u = self._within_blocks(k)  # index in the concatenation of the permuted shards
        s = np.searchsorted(self.perm_starts, u, side="right") - 1
        shard = self.shard_perm[s]
        return self.starts[shard] + (u - self.perm_starts[s])
