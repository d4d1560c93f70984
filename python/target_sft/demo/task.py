"""The demo's task: sort a list of numbers, with imperfect demonstrations.

A prompt is ``<s> n_1 … n_L <sort>`` with ``L`` distinct numbers drawn from ``0..M-1`` (each number
is one token, so the vocabulary has over a thousand tokens and top-64 truncation is real); the
answer is the numbers in increasing order followed by ``</s>``. The answer is checkable (exact
match), and every step has exactly one right token, so a model that knows the task puts its mass
there.

Demonstrations are imperfect the way real ones are: with probability ``noise`` a demonstration
swaps two neighbouring numbers of its answer (a plausible slip, not random garbage). Training on
them with plain SFT imitates the slips; a teacher that knows the task assigns them low probability,
which is what Q-target losses can use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from target_sft.cache import IGNORE_INDEX

PAD, BOS, EOS, SORT = 0, 1, 2, 3
N_SPECIAL = 8  # ids 0..7 are special; number v is token N_SPECIAL + v


@dataclass(frozen=True)
class SortTask:
    """Lists of ``length`` distinct numbers from ``0..max_number-1``."""

    max_number: int = 1000
    length: int = 6

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + self.max_number

    @property
    def prompt_length(self) -> int:
        return self.length + 2

    @property
    def seq_length(self) -> int:
        return self.prompt_length + self.length + 1

    def numbers(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``[n, length]`` lists of distinct numbers."""
        keys = rng.random((n, self.max_number))
        return np.argpartition(keys, self.length, axis=1)[:, : self.length].astype(np.int64)

    def encode(self, nums: np.ndarray, answer: np.ndarray) -> np.ndarray:
        """Token ids ``[n, seq_length]`` of prompts ``nums`` followed by ``answer``."""
        n = nums.shape[0]
        ids = np.empty((n, self.seq_length), dtype=np.int64)
        ids[:, 0] = BOS
        ids[:, 1 : 1 + self.length] = N_SPECIAL + nums
        ids[:, self.prompt_length - 1] = SORT
        ids[:, self.prompt_length : self.prompt_length + self.length] = N_SPECIAL + answer
        ids[:, -1] = EOS
        return ids

    def samples(self, n: int, seed: int, noise: float = 0.0) -> list[dict]:
        """Demonstrations: dicts with ``id``, ``input_ids``, ``labels`` (prompt masked) and
        ``noisy`` (whether the answer has a slip)."""
        rng = np.random.default_rng(seed)
        nums = self.numbers(rng, n)
        answer = np.sort(nums, axis=1)
        noisy = rng.random(n) < noise
        for i in np.flatnonzero(noisy):
            j = int(rng.integers(0, self.length - 1))
            answer[i, j], answer[i, j + 1] = answer[i, j + 1], answer[i, j]
        ids = self.encode(nums, answer)
        labels = ids.copy()
        labels[:, : self.prompt_length] = IGNORE_INDEX
        return [
            {
                "id": f"{seed}-{i}",
                "input_ids": ids[i].tolist(),
                "labels": labels[i].tolist(),
                "noisy": bool(noisy[i]),
            }
            for i in range(n)
        ]

    def prompts(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Evaluation prompts ``[n, prompt_length]`` and the right answers ``[n, length + 1]``."""
        rng = np.random.default_rng(seed)
        nums = self.numbers(rng, n)
        ids = self.encode(nums, np.sort(nums, axis=1))
        return ids[:, : self.prompt_length], ids[:, self.prompt_length :]
