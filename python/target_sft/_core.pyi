# Type stubs for the native module target_sft._core (rust/python/src/lib.rs). Checked against the
# module, signatures included, by mypy.stubtest in tests/bindings/test_core_stub.py.
# PyO3 constructors are `__new__` (the runtime `__init__` is object's); a default that PyO3 cannot
# render in the text signature (a Rust expression, not a literal) is written `= ...` here.
from collections.abc import Callable
from typing import Any, final

import numpy as np
import numpy.typing as npt
from typing_extensions import Self

__all__ = [
    "CACHE_ROLES",
    "FORMAT_VERSION",
    "CacheWriter",
    "ShardKeyTables",
    "TeacherCache",
    "__version__",
    "build_batch",
    "check_batch_options",
    "check_writer_locks",
    "merge_manifests",
    "parse_manifest",
    "reseal_manifest",
    "scan_parts",
    "seal_manifest",
    "token_hash",
    "xxh3_128",
]

__version__: str
FORMAT_VERSION: int
CACHE_ROLES: list[str]  # the manifest's "role" values (core::manifest::Role::NAMES)

# stub-only alias (private: no runtime counterpart)
_RawRecord = tuple[
    int | str,
    npt.NDArray[np.int32],
    npt.NDArray[np.int32],
    npt.NDArray[np.int32],
    npt.NDArray[np.float32],
    npt.NDArray[np.float32],
    npt.NDArray[np.int32],
]

@final
class CacheWriter:
    def __new__(
        cls,
        path: str,
        *,
        top_k: int,
        vocab_size: int,
        codec: str,
        zstd_level: int,
        shard_bytes: int,
        threads: int,
        temperature: float,
        tokenizer_json: str,
        teacher_json: str,
        shard_prefix: str,
        prior_records: int,
        append: bool,
        sqrt_step: float | None,
        tail_step: float | None,
        floor: float,
        max_mean_kl: float | None = None,
        manifest_name: str = ...,  # "manifest.json" (core::manifest::MANIFEST_NAME)
        wait_s: float = 0.0,
        role: str = "teacher",
    ) -> Self: ...
    def add(
        self,
        key: int | str,
        input_ids: npt.NDArray[np.int32],
        labels: npt.NDArray[np.int32],
        topk_ids: npt.NDArray[np.int32],
        topk_logprobs: npt.NDArray[np.float32],
        label_logprobs: npt.NDArray[np.float32],
        label_ranks: npt.NDArray[np.int32],
        entropy: npt.NDArray[np.float64] | None = None,
    ) -> None: ...
    def __contains__(self, key: Any, /) -> bool: ...
    @property
    def num_records(self) -> int: ...
    def close(self, complete: bool = True) -> str: ...
    def drop_keys(self, keys: list[int | str]) -> int: ...
    def abort(self) -> None: ...

@final
class TeacherCache:
    def __new__(cls, path: str) -> Self: ...
    def __len__(self) -> int: ...
    def manifest_json(self) -> str: ...
    def get(self, key: int | str, input_ids: npt.NDArray[np.int32] | None = None) -> _RawRecord: ...
    def get_at(self, position: int) -> _RawRecord: ...
    def get_many_at(self, positions: list[int], threads: int = 0) -> list[_RawRecord]: ...
    def key_at(self, position: int) -> int | str: ...
    def keys_range(self, start: int, stop: int) -> list[int | str]: ...
    def positions_matching(
        self, other: TeacherCache, positions: list[int]
    ) -> npt.NDArray[np.int64]: ...  # -1: key not in self
    def key_hashes(self, start: int, stop: int) -> npt.NDArray[np.uint64]: ...
    def position(self, key: int | str) -> int: ...
    def __contains__(self, key: Any, /) -> bool: ...
    def verify(self, progress: Callable[[int, int], Any] | None = None) -> int: ...

@final
class ShardKeyTables:
    @staticmethod
    def header_end(prefix: bytes, file_len: int, shown: str) -> int: ...
    def __new__(cls, head: bytes, file_len: int, records: int, shown: str) -> Self: ...
    def ranges(self, keys: bool) -> list[tuple[int, int]]: ...
    def key_hashes(self, pieces: list[tuple[int, bytes]]) -> npt.NDArray[np.uint64]: ...
    def keys(self, pieces: list[tuple[int, bytes]], which: list[int]) -> list[int | str]: ...

def merge_manifests(path: str, parts: list[str], complete: bool, wait_s: float = 0.0) -> str: ...
def check_writer_locks(
    path: str, shard_prefix: str, manifest_name: str, wait_s: float = 0.0
) -> None: ...
def token_hash(ids: npt.NDArray[np.int32]) -> int: ...
def xxh3_128(data: npt.NDArray[np.uint8]) -> str: ...
def scan_parts(
    path: str, manifests: list[str], labels: bool = True, threads: int = 0
) -> tuple[
    list[int | str],
    npt.NDArray[np.uint64],
    npt.NDArray[np.uint64],
    npt.NDArray[np.uint64],
    npt.NDArray[np.uint32],
]: ...
def reseal_manifest(path: str, name: str = ...) -> str: ...  # name: "manifest.json"
def parse_manifest(data: bytes, shown: str) -> str: ...
def seal_manifest(manifest_json: str) -> bytes: ...

# rust/python/src/batch.rs; items are (TeacherCache, position[, input_ids[, labels]]) or _RawRecord
# tuples (input_ids checked against the record's token hash, labels against its labels)
def build_batch(
    items: list[tuple[Any, ...]],
    *,
    packing: bool = False,
    max_length: int | None = None,
    padding: str = "longest",
    pad_to_multiple_of: int = 1,
    pad_token_id: int = 0,
    label_in_support: bool = True,
    threads: int = 0,
    out: dict[str, npt.NDArray[Any]]
    | Callable[[str, tuple[int, ...], str], npt.NDArray[Any]]
    | None = None,
    references: list[tuple[TeacherCache, int]] | None = None,  # one (cache, position) per item
) -> dict[str, Any]: ...
def check_batch_options(
    *,
    packing: bool = False,
    max_length: int | None = None,
    padding: str = "longest",
    pad_to_multiple_of: int = 1,
) -> None: ...
