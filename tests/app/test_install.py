"""Installing target-sft as a user would (README, "Install in your own environment"): a fresh
``python -m venv``, then ``pip install <repository>`` (not editable) with the base dependencies
only. pip fetches the maturin PEP 517 backend from PyPI (or pip's cache) and builds the wheel,
compiling the Rust crates. The installed package then writes a cache with ``CacheWriter`` and its
``target-sft`` console script inspects and verifies it, from a directory outside the checkout.

Slow, marked so. The wheel is built in the checkout's own cargo target directory (``target/``,
or ``CARGO_TARGET_DIR`` if set), where ``maturin develop --release`` (``.ci/setup``, run by ``make
test`` before pytest) has already compiled the same crates with the same settings: cargo then
only relinks, and the test takes about 20 s (venv, pip, packaging). From a cold ``target/`` the
whole release build runs first: about 2.5 CPU-minutes, 4.5 minutes of wall time measured on the
shared 2-core VM under load. A ``target/`` last built by plain ``cargo build`` (without maturin's
environment) makes it recompile the pyo3 crates (about 1 CPU-minute).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_record

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    """The caller's environment without anything that would let the venv see the checkout's
    package or another environment's (``CARGO_TARGET_DIR``, if set, is kept: see above)."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
    }


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(args)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with target-sft installed from the repository."""
    work = tmp_path_factory.mktemp("install")
    env_dir = work / "venv"
    _run([sys.executable, "-m", "venv", str(env_dir)], cwd=work)
    py = env_dir / "bin" / "python"
    _run([str(py), "-m", "pip", "install", str(ROOT)], cwd=work, timeout=1800)
    return env_dir


def test_install_from_the_repository_into_a_fresh_venv(venv, tmp_path):
    py, cli = venv / "bin" / "python", venv / "bin" / "target-sft"
    # the installed package (not the checkout's) with its native module, and the base
    # dependencies only: the cache tools need neither torch nor transformers
    probe = _run(
        [
            str(py),
            "-c",
            "import json, importlib.util, target_sft, target_sft._core as c;"
            "print(json.dumps({'pkg': target_sft.__file__, 'core': c.__file__,"
            " 'version': target_sft.__version__, 'core_version': c.__version__,"
            " 'torch': importlib.util.find_spec('torch') is not None}))",
        ],
        cwd=tmp_path,
    )
    info = json.loads(probe.stdout)
    site = str(venv / "lib")
    assert info["pkg"].startswith(site) and info["core"].startswith(site), info
    assert not info["torch"]
    assert info["version"] == info["core_version"] == "0.1.0"
    # a cache written by the installed CacheWriter (records generated here, entropy given)
    rng = np.random.default_rng(5)
    recs = [make_record(i if i % 2 else f"doc-{i}", rng) for i in range(6)]
    arrays = {f"{i}_{k}": v for i, r in enumerate(recs) for k, v in r.items() if k != "key"}
    np.savez(tmp_path / "recs.npz", **arrays)
    script = tmp_path / "write.py"
    script.write_text(
        "import numpy as np, sys\n"
        "from target_sft import CacheWriter\n"
        "a = np.load(sys.argv[1])\n"
        "keys = " + repr([r["key"] for r in recs]) + "\n"
        "fields = ['input_ids', 'labels', 'topk_ids', 'topk_logprobs', 'label_logprobs',"
        " 'label_ranks']\n"
        "with CacheWriter(sys.argv[2], top_k=8, vocab_size=1000, teacher={'name': 'tiny'}) as w:\n"
        "    for i, key in enumerate(keys):\n"
        "        r = {f: a[f'{i}_{f}'] for f in fields}\n"
        "        w.add(key, **r, entropy=np.full(r['label_logprobs'].size, 0.75))\n"
    )
    cache = tmp_path / "cache"
    _run([str(py), str(script), str(tmp_path / "recs.npz"), str(cache)], cwd=tmp_path)
    out = _run([str(cli), "cache", "inspect", str(cache)], cwd=tmp_path).stdout
    assert "records        6" in out and '"name": "tiny"' in out
    assert "key='doc-0'" in out and "statistics" not in out
    out = _run([str(cli), "cache", "inspect", str(cache), "--stats"], cwd=tmp_path).stdout
    lp = np.concatenate([r["topk_logprobs"] for r in recs]).astype(np.float64)
    mass = np.exp(lp).sum(1)
    assert f"kept mass    mean {mass.mean():.4f}" in out
    assert "entropy      mean 0.7500 nats" in out and "codec KL     mean " in out
    out = _run([str(cli), "cache", "verify", "-q", str(cache)], cwd=tmp_path).stdout
    assert "OK: 6 records in 1 shard(s) verified" in out
    # what needs an extra says which one, instead of a traceback
    p = subprocess.run(
        [str(cli), "cache", "inspect", str(cache), "--tokenizer", str(tmp_path)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert "decoding needs transformers (pip install 'target-sft[hf]')" in p.stderr
