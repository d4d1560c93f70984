"""The demo's task: order a list of numbers by their hundreds, from imperfect demonstrations.

A prompt is ``<s> n_1 … n_L <sort>`` with ``L`` distinct numbers drawn from ``0..M-1`` (each number
is one token, so the vocabulary has over a thousand tokens and top-64 truncation is real). An
answer is the same numbers, each once, in non-decreasing order of their **bucket**
``n // bucket_width`` (the hundreds digit for ``bucket_width = 100``), then ``</s>``. Numbers of the
same bucket may come in any order, so most prompts have several right answers; fully sorted
order is always one of them. The answer is checkable (:meth:`SortTask.check`).

Three data sources, mirroring the paper's setting (§4, §6, App. F):

* **pre-training** (:meth:`SortTask.samples` with ``ties="sorted"``): the canonical answer, fully
  sorted. The student base and the teacher learn the skill from it (the base for a few steps,
  the teacher — the "instruct" model of the same base — for many more), so the base has a useful
  prior that already solves part of the task, and the teacher is stronger but not perfect;
* **demonstrations** (``ties="shuffle"``, ``noise > 0``): numbers of the same bucket in an
  arbitrary order (a right answer, but not the one the prior prefers: non-unique tokens), and a
  share ``noise`` of them with a **slip**: two neighbours of different buckets swapped (a wrong
  answer that looks almost right);
* **clean demonstrations** (``ties="shuffle"``, ``noise = 0``): the same demonstrations without the
  slips (the control row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from target_sft.cache import IGNORE_INDEX

PAD, BOS, EOS, SORT = 0, 1, 2, 3
N_SPECIAL = 8  # ids 0..7 are special; number v is token N_SPECIAL + v

Ties = Literal["sorted", "shuffle"]


@dataclass(frozen=True)
class SortTask:
    """Lists of ``length`` distinct numbers from ``0..max_number-1``, to be ordered by
    ``n // bucket_width`` (``bucket_width = 1``: plain sorting, one right answer)."""

    max_number: int = 1000
    length: int = 5
    bucket_width: int = 100

    def __post_init__(self) -> None:
        if not 2 <= self.length <= self.max_number:
            raise ValueError(f"length must be in [2, max_number], got {self.length}")
        if not 1 <= self.bucket_width <= self.max_number:
            raise ValueError(f"bucket_width must be in [1, max_number], got {self.bucket_width}")

    @property
    def vocab_size(self) -> int:
        return N_SPECIAL + self.max_number

    @property
    def prompt_length(self) -> int:
        return self.length + 2

    @property
    def answer_length(self) -> int:
        """Generated tokens: the ``length`` numbers and ``</s>``."""
        return self.length + 1

    @property
    def seq_length(self) -> int:
        return self.prompt_length + self.answer_length

    def numbers(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``[n, length]`` lists of distinct numbers."""
        keys = rng.random((n, self.max_number))
        return np.argpartition(keys, self.length, axis=1)[:, : self.length].astype(np.int64)

    def encode(self, nums: np.ndarray, answer: np.ndarray) -> np.ndarray:
        """Token ids ``[n, seq_length]`` of prompts ``nums`` followed by ``answer`` and ``</s>``."""
        n = nums.shape[0]
        ids = np.empty((n, self.seq_length), dtype=np.int64)
        ids[:, 0] = BOS
        ids[:, 1 : 1 + self.length] = N_SPECIAL + nums
        ids[:, self.prompt_length - 1] = SORT
        ids[:, self.prompt_length : self.prompt_length + self.length] = N_SPECIAL + answer
        ids[:, -1] = EOS
        return ids

    def order(self, nums: np.ndarray, rng: np.random.Generator, ties: Ties) -> np.ndarray:
        """Right answers for ``nums``: by bucket, ties fully sorted (``"sorted"``: the canonical
        answer) or in a uniformly random order (``"shuffle"``)."""
        if ties == "sorted":
            return np.sort(nums, axis=1)
        if ties != "shuffle":
            raise ValueError(f"ties must be 'sorted' or 'shuffle', got {ties!r}")
        tiebreak = rng.random(nums.shape)
        idx = np.lexsort((tiebreak, nums // self.bucket_width), axis=1)
        return np.take_along_axis(nums, idx, axis=1)

    def samples(
        self, n: int, seed: int, *, noise: float = 0.0, ties: Ties = "sorted"
    ) -> list[dict]:
        """Training samples: dicts with ``id``, ``input_ids``, ``labels`` (prompt masked),
        ``noisy`` (the answer has a slip) and ``unique`` (the prompt has one right answer).

        With probability ``noise`` a sample's answer gets a slip: two neighbours of *different*
        buckets swapped (so the answer is wrong); a sample whose numbers all share one bucket
        cannot slip and stays right. ``noise`` and ``ties`` draw from their own streams, so the
        clean and noisy demonstrations of one seed are the same prompts and tie orders."""
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        rng = np.random.default_rng(seed)
        nums = self.numbers(rng, n)
        answer = self.order(nums, np.random.default_rng([seed, 1]), ties)
        noisy = np.zeros(n, dtype=bool)
        slip = np.random.default_rng([seed, 2])
        draws = slip.random(n) < noise
        picks = slip.random(n)
        buckets = answer // self.bucket_width
        for i in np.flatnonzero(draws):
            can = np.flatnonzero(buckets[i, :-1] != buckets[i, 1:])
            if can.size:
                j = int(can[int(picks[i] * can.size)])
                answer[i, j], answer[i, j + 1] = answer[i, j + 1], answer[i, j]
                noisy[i] = True
        b = nums // self.bucket_width
        unique = np.array([len(set(r.tolist())) == self.length for r in b])
        ids = self.encode(nums, answer)
        labels = ids.copy()
        labels[:, : self.prompt_length] = IGNORE_INDEX
        return [
            {
                "id": f"{seed}-{i}",
                "input_ids": ids[i].tolist(),
                "labels": labels[i].tolist(),
                "noisy": bool(noisy[i]),
                "unique": bool(unique[i]),
            }
            for i in range(n)
        ]

    def prompts(self, n: int, seed: int) -> np.ndarray:
        """Evaluation prompts ``[n, prompt_length]`` (check answers with :meth:`check`)."""
        rng = np.random.default_rng(seed)
        nums = self.numbers(rng, n)
        return self.encode(nums, np.sort(nums, axis=1))[:, : self.prompt_length]

    def check(self, prompts: np.ndarray, outputs: np.ndarray) -> np.ndarray:
        """Whether each generated answer is right: ``outputs`` ``[n, answer_length]`` token ids
        (for ``prompts`` ``[n, prompt_length]``) must be the prompt's numbers, each once, in
        non-decreasing bucket order, then ``</s>``. Returns a bool array ``[n]``."""
        parts = self.check_parts(prompts, outputs)
        return parts["numbers"] & parts["ordered"] & parts["eos"]

    def check_parts(self, prompts: np.ndarray, outputs: np.ndarray) -> dict[str, np.ndarray]:
        """The three conditions of :meth:`check`, each a bool array ``[n]``: ``numbers`` (the
        prompt's numbers, each once), ``ordered`` (non-decreasing buckets) and ``eos``. An answer
        with ``numbers`` and ``eos`` but not ``ordered`` is the kind of error a slip is."""
        if outputs.shape != (prompts.shape[0], self.answer_length):
            raise ValueError(
                f"outputs must be [{prompts.shape[0]}, {self.answer_length}], got {outputs.shape}"
            )
        nums = np.sort(prompts[:, 1 : 1 + self.length], axis=1)
        out = outputs[:, : self.length]
        b = (out - N_SPECIAL) // self.bucket_width
        return {
            "numbers": (np.sort(out, axis=1) == nums).all(axis=1),
            "ordered": (np.diff(b, axis=1) >= 0).all(axis=1),
            "eos": outputs[:, self.length] == EOS,
        }
