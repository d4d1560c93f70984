"""``target_sft.config``: a run's loss as ``TrainingArguments`` fields (docs/HF.md, "Config-driven
runs").

The command line, a JSON file and a YAML file parsed by ``HfArgumentParser`` give the trainer the
same loss object (type and every parameter) as the Python call; the trainer's ``loss=`` and the
config's; the knobs of ``TrainingArguments``/``SFTConfig`` that the Q-target loss would ignore
(label smoothing against HF's own ``LabelSmoother``, TRL's ``loss_type``, Liger,
``average_tokens_across_devices`` against ``Trainer.compute_loss`` with two simulated
processes); the reserved fields; and the doc's YAML + script, run as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import yaml  # transformers' HfArgumentParser needs it
from accelerate import Accelerator
from transformers import HfArgumentParser, LlamaForCausalLM, Trainer, TrainingArguments

from batch_reference import write_reference_cache, write_sample_cache
from build_helpers import save_tiny_llama
from target_sft import TargetSFTCollator, TeacherCache, TeacherCacheDataset
from target_sft import losses as L
from target_sft.config import (
    PRESET_PARAMETERS,
    TargetSFTArguments,
    TargetSFTConfig,
    resolve_loss,
)
from target_sft.hf import TargetSFTTrainer
from target_sft.losses.qtarget import LOSS_OPTIONS

K, V, N = 8, 256, 8
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "cache"
    return write_sample_cache(path, N, seed=3, k=K, vocab=V, lengths=(6, 16))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("cfg") / "llama", vocab=V)


@pytest.fixture(scope="module")
def model(model_dir):
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


BASE = dict(use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0)


def config(tmp_path, cls=TargetSFTConfig, **kw):
    return cls(output_dir=str(tmp_path / "out"), **BASE, **kw)


def reference_of(cache):
    """A reference cache of the same samples, beside ``cache`` (made once): iw-SFT, SFT+KL and
    ASFT need one to construct a trainer."""
    path = Path(cache.path).parent / "reference"
    if not path.exists():
        write_reference_cache(path, cache, seed=4, k=K)
    return TeacherCache(path)


def trainer_loss(model, cache, args, **kw):
    ds = TeacherCacheDataset(cache, reference=reference_of(cache))
    return TargetSFTTrainer(model, args, train_dataset=ds, **kw).loss_fn


def state(loss: Any) -> tuple[type, dict[str, Any]]:
    """A loss object's type and every parameter (its attributes; trust and residual by repr)."""
    attrs = {k: v for k, v in vars(loss).items() if not k.startswith("_") and k != "training"}
    return type(loss), {
        **attrs,
        "gamma": repr(loss.gamma),
        "residual": repr(loss.residual),
    }


# ---------------------------------------------------------------------------------- fields


def test_the_fields_are_every_presets_parameters():
    own = {n for cls in L.PRESETS.values() for n in cls.parameter_names() if n not in LOSS_OPTIONS}
    assert set(PRESET_PARAMETERS) == own
    names = {f for f in TargetSFTArguments.__dataclass_fields__}
    assert set(PRESET_PARAMETERS) <= names
    extra = {"loss", "loss_kwargs", "label_in_support", "impl", "fused_linear"}
    assert names == set(PRESET_PARAMETERS) | extra
    assert names <= set(TargetSFTConfig.__dataclass_fields__)
    assert issubclass(TargetSFTConfig, TrainingArguments)


def test_import_does_not_import_trl():
    code = (
        "import sys, target_sft, target_sft.config; "
        "assert 'trl' not in sys.modules, 'trl imported'; "
        "assert 'TargetSFTConfig' in dir(target_sft); "
        "c = target_sft.config.TargetSFTTRLConfig; assert 'trl' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------- parsing

# (command line, the same as a dict for JSON/YAML, the Python call)
CASES = [
    (
        ["--loss", "target_sft", "--eta", "0.2", "--loss_kwargs", '{"chunk_elements": 4096}'],
        {"loss": "target_sft", "eta": 0.2, "loss_kwargs": {"chunk_elements": 4096}},
        lambda: L.TargetSFT(eta=0.2, chunk_elements=4096),
    ),
    (
        ["--loss", "target_sft", "--tail", "model"],
        {"loss": "target_sft", "tail": "model"},
        lambda: L.TargetSFT(tail="model"),
    ),
    (
        ["--loss", "hybrid_kd", "--lam", "0.7", "--renormalize", "false", "--impl", "torch"],
        {"loss": "hybrid_kd", "lam": 0.7, "renormalize": False, "impl": "torch"},
        lambda: L.HybridKD(lam=0.7, renormalize=False, impl="torch"),
    ),
    (
        ["--loss", "iw_sft", "--clip", "0", "16", "--length_normalize", "true"],
        {"loss": "iw_sft", "clip": [0, 16], "length_normalize": True},
        lambda: L.IwSFT(clip=(0.0, 16.0), length_normalize=True),
    ),
    (
        ["--loss", "profit", "--tau", "0.3", "--inclusive", "true"],
        {"loss": "profit", "tau": 0.3, "inclusive": True},
        lambda: L.ProFiT(0.3, inclusive=True),
    ),
    ([], {}, lambda: L.TargetSFT()),
]


@pytest.mark.parametrize("how", ["cli", "json", "yaml"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: CASES[i][1].get("loss", "none"))
def test_parsed_run_gives_the_python_loss(how, case, cache, model, tmp_path):
    argv, mapping, python = CASES[case]
    parser = HfArgumentParser(TargetSFTConfig)
    common = {"output_dir": str(tmp_path / "out"), **BASE}
    if how == "cli":
        cli = ["--output_dir", common["output_dir"], "--use_cpu", "true", "--report_to", "none"]
        (args,) = parser.parse_args_into_dataclasses(args=cli + argv)
    else:
        path = tmp_path / f"run.{how}"
        data = {**common, **mapping}
        path.write_text(json.dumps(data) if how == "json" else yaml.safe_dump(data))
        read = parser.parse_json_file if how == "json" else parser.parse_yaml_file
        (args,) = read(str(path))
    assert isinstance(args, TargetSFTConfig)
    got = trainer_loss(model, cache, args)
    assert state(got) == state(python())


def test_trl_config_carries_the_same_fields(cache, model, tmp_path):
    trl = pytest.importorskip("trl")
    from target_sft.config import TargetSFTTRLConfig

    assert issubclass(TargetSFTTRLConfig, trl.SFTConfig)
    assert issubclass(TargetSFTTRLConfig, TargetSFTArguments)
    parser = HfArgumentParser(TargetSFTTRLConfig)
    argv = ["--output_dir", str(tmp_path / "o"), "--use_cpu", "true", "--report_to", "none"]
    (args,) = parser.parse_args_into_dataclasses(
        args=[*argv, "--loss", "kd", "--renormalize", "false"]
    )
    got = trainer_loss(model, cache, args)
    assert state(got) == state(L.KD(renormalize=False))
    import pickle  # the Trainer saves its args with torch.save in every checkpoint

    assert type(pickle.loads(pickle.dumps(args))) is TargetSFTTRLConfig


# ---------------------------------------------------------------------------------- errors


def test_a_parameter_of_another_preset_is_an_error_naming_the_preset(tmp_path):
    with pytest.raises(ValueError, match=r"loss='sft' \(SFT\) has no parameter 'eta'; its param"):
        config(tmp_path, loss="sft", eta=0.2)
    with pytest.raises(
        ValueError, match=r"\(TargetSFT\) has no parameter 'etta'.*eta, tail, ignore"
    ):
        config(tmp_path, loss_kwargs={"etta": 0.2})
    with pytest.raises(ValueError, match=r"eta is given twice.*eta=0\.2.*eta=0\.5"):
        config(tmp_path, eta=0.2, loss_kwargs={"eta": 0.5})
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        config(tmp_path, loss="nope")
    with pytest.raises(ValueError, match="loss_kwargs is not a JSON object"):
        config(tmp_path, loss_kwargs="{eta: 1}")
    with pytest.raises(ValueError, match="impl = 'cuda'"):
        config(tmp_path, impl="cuda")
    with pytest.raises(ValueError, match=r"clip = \[1\.0\]: give two numbers"):
        config(tmp_path, loss="iw_sft", clip=[1.0])


def test_trainer_loss_and_config_loss(cache, model, tmp_path):
    args = config(tmp_path, loss="dft")
    assert type(trainer_loss(model, cache, args)) is L.DFT
    assert type(trainer_loss(model, cache, args, loss="DFT")) is L.DFT  # the same preset
    with pytest.raises(
        ValueError, match=r"two losses: the trainer's loss='kd' and the config's loss='dft'"
    ):
        trainer_loss(model, cache, args, loss="kd")
    with pytest.raises(ValueError, match="two losses"):
        trainer_loss(model, cache, args, loss=L.DFT())
    # parameters from both sides merge; a key set twice must agree
    args = config(tmp_path, eta=0.2)
    got = trainer_loss(model, cache, args, loss_kwargs={"chunk_elements": 64})
    assert state(got) == state(L.TargetSFT(eta=0.2, chunk_elements=64))
    with pytest.raises(ValueError, match=r"eta is given twice.*eta=0\.2 \(the config\).*eta=0\.5"):
        trainer_loss(model, cache, args, loss_kwargs={"eta": 0.5})
    # config parameters cannot configure a callable
    with pytest.raises(ValueError, match="apply to a preset name, but the loss is the callable"):
        trainer_loss(model, cache, args, loss=L.TargetSFT())
    # no loss anywhere: TARGET-SFT with its defaults
    plain = TrainingArguments(output_dir=str(tmp_path / "p"), **BASE)
    assert state(trainer_loss(model, cache, plain)) == state(L.TargetSFT())


def test_label_in_support_field_reaches_the_default_collator(cache, model, tmp_path):
    ds = TeacherCacheDataset(cache)
    assert TargetSFTConfig.__dataclass_fields__["label_in_support"].default is True
    for value in (True, False):
        trainer = TargetSFTTrainer(
            model, config(tmp_path, label_in_support=value), train_dataset=ds
        )
        assert isinstance(trainer.data_collator, TargetSFTCollator)
        assert trainer.data_collator.label_in_support is value
        width = cache.top_k + int(value)
        assert trainer.data_collator([ds[0], ds[1]])["teacher_ids"].shape[-1] == width
    # a plain TrainingArguments has no such field: the collator's default (the label in)
    plain = TrainingArguments(output_dir=str(tmp_path / "p"), **BASE)
    assert TargetSFTTrainer(model, plain, train_dataset=ds).data_collator.label_in_support is True
    # the command line turns it off
    cli = ["--output_dir", str(tmp_path / "o"), "--use_cpu", "true", "--report_to", "none"]
    (parsed,) = HfArgumentParser(TargetSFTConfig).parse_args_into_dataclasses(
        args=[*cli, "--label_in_support", "false"]
    )
    assert parsed.label_in_support is False
    with pytest.raises(ValueError, match=r"label_in_support must be True or False, got 'yes'"):
        config(tmp_path, label_in_support="yes")
    # a given collator must agree with the config, else an error naming both
    mine = TargetSFTCollator(cache, pad_token_id=0, label_in_support=False)
    with pytest.raises(
        ValueError,
        match=r"args\.label_in_support=True but the data_collator's label_in_support=False",
    ):
        TargetSFTTrainer(model, config(tmp_path), train_dataset=ds, data_collator=mine)
    with pytest.raises(ValueError, match=r"args\.label_in_support=False but the data_collator's"):
        TargetSFTTrainer(
            model,
            config(tmp_path, label_in_support=False),
            train_dataset=ds,
            data_collator=TargetSFTCollator(cache, pad_token_id=0),
        )
    same = config(tmp_path, label_in_support=False)
    assert TargetSFTTrainer(model, same, train_dataset=ds, data_collator=mine).data_collator is mine


def test_fused_linear_field(cache, model, tmp_path):
    args = config(tmp_path, fused_linear=True)
    ds = TeacherCacheDataset(cache)
    assert TargetSFTTrainer(model, args, train_dataset=ds).fused_linear is True
    assert TargetSFTTrainer(model, config(tmp_path), train_dataset=ds).fused_linear is False
    assert TargetSFTTrainer(
        model, config(tmp_path), train_dataset=ds, fused_linear=True
    ).fused_linear
    with pytest.raises(ValueError, match=r"fused_linear=False was given.*args\.fused_linear=True"):
        TargetSFTTrainer(model, args, train_dataset=ds, fused_linear=False)
    with pytest.raises(TypeError, match="fused_linear=True needs a Q-target loss"):
        TargetSFTTrainer(model, args, train_dataset=ds, loss=lambda *a, **k: None)


# ---------------------------------------------------------------------------------- knobs


def _batch(cache, n=4):
    ds = TeacherCacheDataset(cache)
    return TargetSFTCollator(cache, pad_token_id=0)([ds[i] for i in range(n)])


def _hf_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


@pytest.mark.parametrize("args_cls", [TrainingArguments, TargetSFTConfig])
def test_label_smoothing_factor_is_hf_label_smoothing(args_cls, cache, model, tmp_path):
    args = config(tmp_path, args_cls, label_smoothing_factor=0.1)
    ours = TargetSFTTrainer(model, args, train_dataset=TeacherCacheDataset(cache))
    assert state(ours.loss_fn) == state(L.LabelSmoothing(0.1))
    assert state(trainer_loss(model, cache, args, loss="sft")) == state(L.LabelSmoothing(0.1))
    batch = _batch(cache)
    hf = Trainer(model, args)
    assert hf.label_smoother is not None
    n = torch.tensor(int((batch["labels"][:, 1:] != -100).sum()) * 2)
    for num in (None, n):
        got = ours.compute_loss(model, batch, num_items_in_batch=num)
        want = hf.compute_loss(model, _hf_inputs(batch), num_items_in_batch=num)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_label_smoothing_factor_with_another_loss_is_an_error(cache, model, tmp_path):
    with pytest.raises(ValueError, match=r"label_smoothing_factor=0\.1 .*loss='target_sft'"):
        config(tmp_path, loss="target_sft", label_smoothing_factor=0.1)
    plain = config(tmp_path, TrainingArguments, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing_factor=0\.1 .*loss='kd'"):
        trainer_loss(model, cache, plain, loss="kd")


def test_trl_loss_type(tmp_path):
    pytest.importorskip("trl")
    from target_sft.config import TargetSFTTRLConfig

    args = config(tmp_path, TargetSFTTRLConfig, loss_type="dft")
    assert resolve_loss(args) == ("dft", {})
    assert (
        resolve_loss(config(tmp_path, TargetSFTTRLConfig, loss_type="dft", loss="dft"))[0] == "dft"
    )
    assert resolve_loss(config(tmp_path, TargetSFTTRLConfig, loss="kd"))[0] == "kd"  # nll
    with pytest.raises(ValueError, match=r"loss_type='dft'\) conflicts with loss='kd'"):
        config(tmp_path, TargetSFTTRLConfig, loss_type="dft", loss="kd")


def test_use_liger_kernel_is_an_error(cache, model, tmp_path):
    with pytest.raises(
        ValueError, match=r"use_liger_kernel=True.*impl='triton'.*fused_linear=True"
    ):
        config(tmp_path, use_liger_kernel=True)
    plain = config(tmp_path, TrainingArguments, use_liger_kernel=True)
    with pytest.raises(ValueError, match="use_liger_kernel=True"):
        trainer_loss(model, cache, plain)
    layers_only = config(
        tmp_path,
        TrainingArguments,
        use_liger_kernel=True,
        liger_kernel_config={"fused_linear_cross_entropy": False},
    )
    assert resolve_loss(layers_only) == (None, {})


@pytest.mark.parametrize("average", [True, False])
def test_average_tokens_across_devices_agrees_with_hf(average, cache, model, tmp_path, monkeypatch):
    """Two data-parallel processes, simulated: HF multiplies the loss by 2 exactly when
    ``average_tokens_across_devices`` (num_items_in_batch then counts both ranks); so do we."""
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    args = config(tmp_path, TrainingArguments, average_tokens_across_devices=average)
    ours = TargetSFTTrainer(model, args, train_dataset=TeacherCacheDataset(cache), loss="sft")
    hf = Trainer(model, args)
    assert hf.model_accepts_loss_kwargs
    batch = _batch(cache)
    n = torch.tensor(2 * int((batch["labels"][:, 1:] != -100).sum()))
    got = ours.compute_loss(model, batch, num_items_in_batch=n)
    want = hf.compute_loss(model, _hf_inputs(batch), num_items_in_batch=n)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    single = model(**_hf_inputs(batch)).loss / 2  # the mean over this rank's half of the tokens
    torch.testing.assert_close(got, single * (2 if average else 1), rtol=1e-6, atol=0)


class PlainLM(torch.nn.Module):
    """A causal LM that is not a transformers model (HF cannot tell its loss shifts labels)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(V, V)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return {"logits": self.emb(input_ids)}


def test_num_items_in_batch_counts_shifted_labels_for_any_model(cache, tmp_path):
    args = config(tmp_path, TrainingArguments)
    trainer = TargetSFTTrainer(
        PlainLM(), args, train_dataset=TeacherCacheDataset(cache), loss="sft"
    )
    batch = _batch(cache)
    batch["labels"][:, 0] = batch["input_ids"][:, 0]  # position 0 is never a prediction target
    got = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    assert int(got) == int((batch["labels"][:, 1:] != -100).sum())


# ---------------------------------------------------------------------------------- the doc


def _doc_blocks() -> tuple[str, str]:
    text = (ROOT / "docs" / "HF.md").read_text()
    section = text.split("## Config-driven runs", 1)[1].split("\n## ", 1)[0]
    (run,) = re.findall(r"```yaml\n(.*?)```", section, re.S)
    (script,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return run, script


def test_the_docs_config_example_runs_as_written(cache, model_dir, tmp_path, monkeypatch):
    run, script = _doc_blocks()
    data = yaml.safe_load(run)
    assert data["loss"] == "target_sft" and data["eta"] == 0.2
    # the doc's file, pointed at the tiny model and cache, one step on the CPU
    data.update(
        model=str(model_dir),
        cache=str(cache.path),
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=1,
        **BASE,
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setattr(sys, "argv", ["train.py", str(path)])
    scope: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(script, "docs/HF.md", "exec"), scope)
    trainer = scope["trainer"]
    assert trainer.state.global_step == 1
    assert state(trainer.loss_fn) == state(L.TargetSFT(eta=0.2))
    # and the same run from the command line
    argv = ["train.py", "--model", str(model_dir), "--cache", str(cache.path)]
    argv += ["--output_dir", str(tmp_path / "o2"), "--loss", "target_sft", "--eta", "0.2"]
    monkeypatch.setattr(sys, "argv", argv)
    parse_only = script.split("tok = ")[0]
    scope = {"__name__": "__main__"}
    exec(compile(parse_only, "docs/HF.md", "exec"), scope)
    assert resolve_loss(scope["config"]) == ("target_sft", {"eta": 0.2})


def test_a_hyperparameter_search_trial_sets_the_loss(cache, model, tmp_path):
    """HF's hyperparameter_search writes a trial's values onto ``args``; the loss follows."""
    from transformers.trainer_utils import HPSearchBackend

    trainer = TargetSFTTrainer(
        model, config(tmp_path, eta=0.2), train_dataset=TeacherCacheDataset(cache)
    )
    trainer.hp_search_backend = HPSearchBackend.RAY  # its trials are plain dicts
    trainer._hp_search_setup({"eta": 0.8})
    assert state(trainer.loss_fn) == state(L.TargetSFT(eta=0.8))
    with pytest.raises(ValueError, match=r"\(HybridKD\) has no parameter 'eta'"):
        trainer._hp_search_setup({"loss": "hybrid_kd", "lam": 0.3})  # eta is still set
    trainer = TargetSFTTrainer(model, config(tmp_path), train_dataset=TeacherCacheDataset(cache))
    trainer.hp_search_backend = HPSearchBackend.RAY
    trainer._hp_search_setup({"loss": "hybrid_kd", "lam": 0.3})
    assert state(trainer.loss_fn) == state(L.HybridKD(lam=0.3))
