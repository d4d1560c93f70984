"""The hand-written stub python/target_sft/_core.pyi matches the native module, signatures included.

``mypy.stubtest`` imports ``target_sft._core`` and compares it with the stub: every class, method,
property and function on both sides, each parameter's name, kind (positional-only, keyword-only)
and default, ``@final`` on classes that cannot be subclassed, and the module's ``__all__``. No
allowlist is needed. The stub is checked from a copy in a package of its own: mypy would otherwise
analyse ``target_sft/__init__.py``, whose type-checking imports pull in torch and transformers
(about a CPU-minute instead of a few seconds).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import target_sft

pytest.importorskip("mypy.stubtest", reason="mypy is a test dependency (.ci/setup installs it)")

STUB = Path(__file__).resolve().parents[2] / "python" / "target_sft" / "_core.pyi"


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One mypy cache for the module: the numpy stubs are analysed once (a few seconds)."""
    return tmp_path_factory.mktemp("mypy-cache")


def stubtest(stub_text: str, work: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    """Run ``mypy.stubtest target_sft._core`` with ``stub_text`` as the stub; the runtime module
    is the one these tests import."""
    stubs = work / "stubs" / "target_sft"
    stubs.mkdir(parents=True)
    (stubs / "__init__.py").write_text("")
    (stubs / "_core.pyi").write_text(stub_text)
    config = work / "mypy.ini"
    # stubtest turns incremental mode off; the config file turns it back on so that the cache
    # is reused between the runs of this module.
    config.write_text(f"[mypy]\nincremental = True\ncache_dir = {cache}\n")
    runtime = str(Path(target_sft.__file__).resolve().parents[1])
    path = [runtime, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = dict(os.environ, MYPYPATH=str(work / "stubs"), PYTHONPATH=os.pathsep.join(path))
    cmd = [sys.executable, "-m", "mypy.stubtest", "target_sft._core", "--concise"]
    cmd += ["--mypy-config-file", str(config)]
    # cwd: an empty directory, so that the runtime import cannot find the stub copy
    run_dir = work / "run"
    run_dir.mkdir()
    return subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True, timeout=600)


def test_stub_matches_the_native_module(tmp_path: Path, mypy_cache: Path) -> None:
    p = stubtest(STUB.read_text(), tmp_path, mypy_cache)
    assert p.returncode == 0, (
        f"stubtest: _core.pyi differs from target_sft._core:\n{p.stdout}{p.stderr}"
    )


def test_stubtest_catches_a_drifted_stub(tmp_path: Path, mypy_cache: Path) -> None:
    """The check bites: a renamed parameter, a missing method and a wrong default all fail."""
    edits = {
        "        top_k: int,\n": "        topk: int,\n",
        "    def abort(self) -> None: ...\n": "",
        "threads: int = 0) -> list[_RawRecord]": "threads: int = 1) -> list[_RawRecord]",
    }
    text = STUB.read_text()
    for old, new in edits.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    p = stubtest(text, tmp_path, mypy_cache)
    assert p.returncode == 1, p.stdout + p.stderr
    for expected in (
        'CacheWriter.__new__ is inconsistent, stub does not have parameter "top_k"',
        "CacheWriter.abort is not present in stub",
        'TeacherCache.get_many_at is inconsistent, runtime parameter "threads" has a default '
        "value of 0, which is different from stub parameter default 1",
    ):
        assert expected in p.stdout, p.stdout
