"""One build: :func:`build_teacher_cache` checks its arguments into a :class:`BuildOptions`,
finds this process's rank (:mod:`.dist`) and runs this rank's share (:class:`_RankBuild`) in steps
that every rank runs in the same order, meeting the others between them; rank 0 then merges the
per-rank manifests."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from target_sft import _core
from target_sft.builder.dist import Dist, dist_context, sync_errors
from target_sft.builder.inputs import Scan, read_batches, scan_source
from target_sft.builder.plan import plan_ranks
from target_sft.builder.resume import check_directory, rank_files, resume_state
from target_sft.builder.teacher import PendingBatch, TeacherRunner, check_ids_fit, collate
from target_sft.cache import DEFAULT_MAX_MEAN_KL, CacheInfo, CacheWriter, merge_manifests
from target_sft.checks import check_int, check_role, check_wait
from target_sft.errors import CacheInputError
from target_sft.fingerprint import tokenizer_fingerprint
from target_sft.models import load_teacher, load_tokenizer, teacher_fingerprint
from target_sft.sft_data import SFTSource, Truncation

__all__ = ["BuildOptions", "BuildResult", "BuildStats", "build_teacher_cache"]


@dataclass
class BuildStats:
    """What one rank did (returned on :attr:`BuildResult.stats`, printed at the end)."""

    rank: int = 0
    world_size: int = 1
    records_added: int = 0
    records_skipped: int = 0
    records_replaced: int = 0  # dropped because their data changed (rebuild_changed=True)
    tokens: int = 0
    supervised: int = 0
    batches: int = 0
    seconds: float = 0.0
    teacher_seconds: float = 0.0  # forward + log-softmax/top-k on the device

    @property
    def overhead_fraction(self) -> float:
        """Fraction of wall time not spent in the teacher (the pipeline's cost)."""
        return 1.0 - self.teacher_seconds / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        tps = self.supervised / self.seconds if self.seconds > 0 else 0.0
        return (
            f"rank {self.rank}/{self.world_size}: {self.records_added:,} records added "
            f"({self.records_skipped:,} already cached"
            + (f", {self.records_replaced:,} replaced" if self.records_replaced else "")
            + f"), {self.tokens:,} tokens "
            f"({self.supervised:,} supervised) in {self.batches:,} batches, {self.seconds:.1f} s "
            f"({tps:,.0f} supervised tok/s); teacher {self.teacher_seconds:.1f} s, "
            f"other {100 * self.overhead_fraction:.1f}%"
        )


@dataclass
class BuildResult:
    """The cache (its :class:`CacheInfo`, read after the merge) and this rank's statistics."""

    info: CacheInfo
    stats: BuildStats
    all_stats: list[BuildStats] = field(default_factory=list)


@dataclass(frozen=True)
class BuildOptions:
    """The settings of one build: :func:`build_teacher_cache`'s keywords (documented there),
    checked once, shared by every step of a rank's share."""

    # what is cached
    top_k: int
    temperature: float
    codec: Literal["compact", "exact"]
    # the rows (SFTSource)
    id_field: str | None
    max_length: int | None
    truncation: Truncation
    # the plan
    batch_tokens: int
    max_batch_size: int
    window: int
    # the teacher
    dtype: Any
    device: str | None
    padding_side: Literal["right", "left"]
    pad_token_id: int | None
    chunk_bytes: int
    # the writer
    shard_size: int | str
    writer_threads: int
    wait: bool | float
    # the run
    progress: bool | None
    on_batch: Callable[[BuildStats], None] | None
    rebuild_changed: bool
    # what the cached model is to a training run (the manifest's role, docs/FORMAT.md §1)
    role: Literal["teacher", "reference"] = "teacher"
    # the compact codec's fidelity budget (docs/FORMAT.md §5.1)
    max_mean_kl: float = DEFAULT_MAX_MEAN_KL

    def __post_init__(self) -> None:
        check_role("role", self.role)
        for name in ("top_k", "batch_tokens", "max_batch_size", "window"):
            check_int(name, getattr(self, name), 1)
        t = self.temperature
        if not (isinstance(t, (int, float)) and t > 0):
            raise CacheInputError(f"temperature = {t} must be a positive number")
        object.__setattr__(self, "temperature", float(t))
        if self.role == "reference" and t != 1.0:
            # said before the model runs: a training run refuses it in the reference slot
            warnings.warn(
                f"building a reference cache at temperature {t:g}: the reference-model terms "
                "read it as π_ref, the model's softmax at temperature 1, so the reference slot "
                "refuses it (allow_role_mismatch=True accepts it); build it at temperature 1 "
                "unless a tempered reference is what you mean",
                stacklevel=4,  # the caller of build_teacher_cache
            )
        if self.padding_side not in ("right", "left"):
            raise CacheInputError(
                f'padding_side must be "right" or "left", got {self.padding_side!r}'
            )


class _RankBuild:
    """One rank's share of a build, in steps that every rank runs in the same order:
    :meth:`prepare` (read and plan the dataset, load the teacher, reopen this rank's part),
    :meth:`check` (compare the dataset with every part), :meth:`drop` (remove changed records
    from this rank's part, for a rebuild), :meth:`run` (the teacher and the writer)."""

    def __init__(
        self, teacher: Any, tokenizer: Any, dataset: Any, out: Path, dist: Dist, opts: BuildOptions
    ) -> None:
        self.teacher = teacher
        self.tokenizer = tokenizer
        self.dataset = dataset  # as given (read through an SFTSource by prepare)
        self.out = out
        self.dist = dist
        self.opts = opts
        self.stats = BuildStats(rank=dist.rank, world_size=dist.world)
        self.writer: CacheWriter | None = None
        self.cached: set[int | str] = set()
        self.drops: list[int | str] = []
        self.n_changed = 0
        self.prefix, self.manifest_name = rank_files(self.dist.rank, self.dist.world)

    def open_writer(self, vocab_size: int) -> CacheWriter:
        self.writer = CacheWriter(
            self.out,
            top_k=self.opts.top_k,
            vocab_size=vocab_size,
            codec=self.opts.codec,
            temperature=self.opts.temperature,
            tokenizer=self.tok_fp,
            teacher=self.teacher_fp,
            mode="append",
            shard_size=self.opts.shard_size,
            threads=self.opts.writer_threads,
            shard_prefix=self.prefix,
            manifest_name=self.manifest_name,
            wait=self.opts.wait,
            role=self.opts.role,
            max_mean_kl=self.opts.max_mean_kl,
        )
        return self.writer

    def prepare(self) -> None:
        out, dist = self.out, self.dist
        check_directory(out, dist.world)
        tok = load_tokenizer(self.teacher, self.tokenizer)
        # The data first (the tokenizer is cheap, a teacher takes minutes to load): every rank
        # reads the whole dataset once, checking every key and row and tokenising every row for
        # the plan (which deals batches to ranks by their size) and the resume check.
        self.source = SFTSource(
            self.dataset,
            tok,
            id_field=self.opts.id_field,
            max_length=self.opts.max_length,
            truncation=self.opts.truncation,
        )
        self.scan = scan_source(self.source)
        plan = plan_ranks(
            self.scan.lengths,
            self.opts.window,
            self.opts.batch_tokens,
            self.opts.max_batch_size,
            dist.world,
        )
        self.batches = plan[dist.rank]
        # refuse (or wait) before the teacher loads if another live writer owns this rank's
        # files; the writer takes the same locks for good when it opens
        _core.check_writer_locks(
            str(out), self.prefix, self.manifest_name, check_wait(self.opts.wait)
        )
        model = load_teacher(
            self.teacher, dtype=self.opts.dtype, device=self.opts.device, local_rank=dist.local_rank
        )
        self.runner = TeacherRunner(
            model, self.opts.top_k, self.opts.temperature, self.opts.chunk_bytes
        )
        check_ids_fit(self.scan, self.runner)
        self.teacher_fp = teacher_fingerprint(model)
        self.tok_fp = tokenizer_fingerprint(tok)
        pad = self.opts.pad_token_id
        self.pad_id = int(pad if pad is not None else getattr(tok, "pad_token_id", None) or 0)
        existing = out / self.manifest_name
        shards = sorted(out.glob(f"{self.prefix}-*.safetensors"))
        if existing.exists() or shards:  # reopen this rank's part (settings checked there)
            if self.teacher_fp.get("kind") == "callable":
                warnings.warn(
                    f"{out}: resuming a build whose teacher is a plain callable "
                    f"({self.teacher_fp.get('name')}): it has no weights or config to fingerprint, "
                    "so nothing checks that it is the same teacher as before; pass a "
                    "transformers model (identified by its weights) to have it checked",
                    stacklevel=2,
                )
            vocab = json.loads(existing.read_text())["vocab_size"] if existing.exists() else None
            if vocab is None:  # shards but no manifest yet: peek at a shard's metadata
                from safetensors import safe_open

                with safe_open(str(shards[0]), "np") as f:
                    vocab = int(f.metadata()["vocab_size"])
            self.open_writer(vocab)

    def check(self) -> None:
        _check_ranks_agree(self.dist, self.scan)
        self.cached, self.drops, self.n_changed = resume_state(
            self.out, self.dist.world, self.dist.rank, self.scan, self.opts.rebuild_changed
        )

    def drop(self) -> None:
        if not self.drops:
            return
        assert self.writer is not None  # this rank's part holds them
        # The merged manifest lists the shards about to be replaced: remove it first, so that no
        # reader ever sees a manifest naming a deleted file (the merge writes it again).
        (self.out / "manifest.json").unlink(missing_ok=True)
        self.stats.records_replaced = self.writer.drop(self.drops)

    def abort(self) -> None:
        if self.writer is not None and not self.writer.closed:
            try:
                self.writer.close(complete=False)
            except Exception:
                pass  # the original exception is the one to report

    def run(self) -> None:
        from tqdm.auto import tqdm

        runner, stats, out, dist = self.runner, self.stats, self.out, self.dist
        cached = self.cached
        bar = tqdm(
            total=sum(len(b) for b in self.batches),
            unit="rec",
            desc=f"teacher cache (rank {dist.rank}/{dist.world})"
            if dist.world > 1
            else "teacher cache",
            disable=not _show_progress(self.opts.progress, dist),
            dynamic_ncols=True,
        )
        t_start = time.perf_counter()
        last_postfix = 0.0
        pending: PendingBatch | None = None

        def done(key: int | str) -> bool:
            return key in cached or (self.writer is not None and key in self.writer)

        def finish(p: PendingBatch) -> None:
            nonlocal last_postfix
            stats.teacher_seconds += p.teacher_seconds()
            writer = self.writer or self.open_writer(runner.output_vocab())
            ids, lp, lab, rk = (x.numpy() for x in (p.ids, p.lp, p.lab, p.rank))
            ent = None if p.entropy is None else p.entropy.numpy()
            row = 0
            for it, c in zip(p.batch.items, p.batch.counts, strict=False):
                if not done(it.key):
                    writer.add(
                        it.key,
                        it.input_ids,
                        it.labels,
                        ids[row : row + c],
                        lp[row : row + c],
                        lab[row : row + c],
                        rk[row : row + c],
                        entropy=None if ent is None else ent[row : row + c],
                    )
                    stats.records_added += 1
                    stats.tokens += len(it.input_ids)
                    stats.supervised += c
                else:
                    stats.records_skipped += 1
                row += c
            stats.batches += 1
            stats.seconds = time.perf_counter() - t_start
            bar.update(len(p.batch.items))
            now = time.perf_counter()
            if now - last_postfix > 2.0:
                last_postfix = now
                bpt = _bytes_per_token(out, self.manifest_name)
                bar.set_postfix(
                    tok_s=f"{stats.supervised / max(stats.seconds, 1e-9):,.0f}",
                    B_tok="-" if bpt is None else f"{bpt:.1f}",
                )
            if self.opts.on_batch is not None:
                self.opts.on_batch(stats)

        try:
            for batch_items in read_batches(self.source, self.scan, self.batches):
                if all(done(it.key) for it in batch_items):
                    stats.records_skipped += len(batch_items)
                    bar.update(len(batch_items))
                    continue
                submitted = runner.submit(collate(batch_items, self.pad_id, self.opts.padding_side))
                if pending is not None:
                    finish(pending)
                pending = submitted
            if pending is not None:
                finish(pending)
                pending = None
            # a rank with nothing to do still writes its (empty) part
            writer = self.writer or self.open_writer(runner.output_vocab())
            writer.close(complete=True)
        finally:
            stats.seconds = time.perf_counter() - t_start
            bar.close()


def build_teacher_cache(
    teacher: Any,
    dataset: Iterable[Any] | Sequence[Any] | str | os.PathLike[str],
    path: str | os.PathLike[str],
    *,
    top_k: int = 64,
    temperature: float = 1.0,
    codec: Literal["compact", "exact"] = "compact",
    batch_tokens: int = 16_384,
    max_batch_size: int = 256,
    window: int = 4096,
    tokenizer: Any = None,
    dtype: Any = None,
    device: str | None = None,
    id_field: str | None = "id",
    max_length: int | None = None,
    truncation: Truncation = "keep_start",
    padding_side: Literal["right", "left"] = "right",
    pad_token_id: int | None = None,
    shard_size: int | str = "256MiB",
    writer_threads: int = 0,
    chunk_bytes: int = 1 << 30,
    progress: bool | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    dist_timeout: timedelta = timedelta(hours=12),
    on_batch: Callable[[BuildStats], None] | None = None,
    rebuild_changed: bool = False,
    wait: bool | float = False,
    role: Literal["teacher", "reference"] = "teacher",
    max_mean_kl: float = DEFAULT_MAX_MEAN_KL,
) -> BuildResult:
    """Cache a teacher's top-``k`` log-probs for every sample of ``dataset`` in ``path``.

    Args:
        teacher: a ``transformers`` causal LM, a model directory or hub name (loaded with
            ``AutoModelForCausalLM``), or any callable ``f(input_ids, attention_mask=...)``
            returning logits ``[B, T, V]`` (or an object with ``.logits``).
        dataset: rows in any format of :func:`~target_sft.tokenize_sft` (``input_ids`` and
            optionally ``labels``, ``messages``, ``prompt``/``completion``,
            ``prompt``/``response``, ``text``): a list or any sequence or iterable of dicts, a
            ``datasets.Dataset`` or ``IterableDataset``, a generator (read into memory first),
            or a ``.jsonl``/``.parquet`` path or ``save_to_disk`` directory. Every row's key and
            schema are checked, and the first rows tokenised, before the teacher loads
            (:class:`~target_sft.sft_data.SFTSource`).
        path: the cache directory. If it holds a build, the build resumes: samples whose key
            is cached are skipped when their token ids and labels equal the cached record's,
            and are an error (:class:`CacheMismatchError`) when they differ.
        top_k, temperature, codec: what is cached (see :class:`~target_sft.cache.CacheWriter`).
        max_mean_kl: the compact codec's fidelity budget, mean codec KL per row in nats (see
            :class:`~target_sft.cache.CacheWriter`; a setting a resumed build must keep).
        batch_tokens: padded tokens per teacher batch; ``max_batch_size`` caps samples per batch.
        window: samples per planning window (sorted by length inside); its batches are dealt
            to the ranks.
        tokenizer: tokenises text rows and is recorded in the manifest (fingerprint); a path
            or object, loaded from the teacher's directory when not given.
        id_field: the row field holding the record key (an int or a str; rows without it are
            keyed by their sample index). Keys must be unique: a duplicate is an error naming
            both samples. ``None`` keys every record by its sample index.
        max_length, truncation: keep at most ``max_length`` tokens per row, the first
            (``"keep_start"``) or the last (``"keep_end"``).
        dtype, device: for a teacher given by path (default: bfloat16 on this rank's GPU, float32
            on CPU).
        padding_side: where batches are padded (``position_ids`` are passed so both agree).
        chunk_bytes: largest float32 ``rows × vocab`` block formed at once on the device.
        progress: show a tqdm bar (default: on rank 0 when stderr is a terminal or in notebooks).
        rank, world_size: override ``torch.distributed`` / ``RANK``/``WORLD_SIZE``.
        on_batch: called after every batch handed to the writer (for monitoring and tests).
        rebuild_changed: on resume, drop the cached records whose sample changed (other token
            ids or labels under the same key) and compute them again, instead of raising.
        wait: when another live process writes this rank's files in ``path`` (another build, or
            a :class:`~target_sft.cache.CacheWriter` of ``manifest.json``): ``False`` raises
            :class:`CacheLockedError` once the data is checked (before the teacher loads),
            naming it; ``True`` waits; a number waits at most that many seconds
            (docs/FORMAT.md §6).
        role: what the cached model is to a training run, recorded in the manifest:
            ``"teacher"`` (the model the student learns from) or ``"reference"`` (a frozen
            model, e.g. the student's base, whose rows feed SFT+KL/ASFT anchors and iw-SFT
            weights: ``TargetSFTCollator(teacher, reference=...)``, docs/DATA.md). A resumed
            build must keep it.

    Returns:
        :class:`BuildResult` with the merged cache's :class:`CacheInfo` and this rank's stats.

    Raises:
        CacheInputError: bad input (a duplicate key, a row in no known format, a turn without
            content, ...), naming the row (``path:line`` for JSONL) and the field; raised
            before the teacher loads.
        CacheMismatchError: ``path`` holds a build with other settings (names the field), or
            records whose sample changed (names them; see ``rebuild_changed``).
        BuildError: another rank failed (every rank raises; re-run to resume).
    """
    opts = BuildOptions(
        top_k=top_k,
        temperature=temperature,
        codec=codec,
        id_field=id_field,
        max_length=max_length,
        truncation=truncation,
        batch_tokens=batch_tokens,
        max_batch_size=max_batch_size,
        window=window,
        dtype=dtype,
        device=device,
        padding_side=padding_side,
        pad_token_id=pad_token_id,
        chunk_bytes=chunk_bytes,
        shard_size=shard_size,
        writer_threads=writer_threads,
        wait=wait,
        progress=progress,
        on_batch=on_batch,
        rebuild_changed=rebuild_changed,
        role=role,
        max_mean_kl=max_mean_kl,
    )
    out = Path(path)
    dist = dist_context(rank, world_size, dist_timeout)
    job = _RankBuild(teacher, tokenizer, dataset, out, dist, opts)
    stats = job.stats
    error: BaseException | None = None
    # Every rank runs the same steps and meets the others between them (the resume check reads
    # every rank's part, so all writers must have opened theirs first; records dropped for a
    # rebuild must be gone from every part before any rank writes their replacements).
    steps = (job.prepare, job.check, job.drop, job.run)
    for i, step in enumerate(steps):
        if error is None:
            try:
                step()
            except BaseException as e:  # report to the other ranks before raising
                error = e
        if i < len(steps) - 1:
            error = sync_errors(dist, error, out)
    if error is not None:
        job.abort()
    try:
        error = sync_errors(dist, error, out)
        all_stats = dist.all_gather(stats)
        if error is not None:
            raise error
        if dist.rank == 0:
            parts = [rank_files(r, dist.world)[1] for r in range(dist.world)]
            info = merge_manifests(out, parts, complete=True, wait=wait)
        dist.barrier()
        if dist.rank != 0:
            info = CacheInfo.from_manifest(out, json.loads((out / "manifest.json").read_text()))
        if dist.rank == 0 and _show_progress(progress, dist):
            for s in all_stats:
                print(s.summary(), file=sys.stderr)
            print(
                f"cache {out}: {info.records:,} records, {info.supervised_tokens:,} supervised "
                f"tokens, {info.bytes_per_token:.1f} bytes/token, {len(info.shards)} shards",
                file=sys.stderr,
            )
        return BuildResult(info, stats, all_stats)
    finally:
        dist.close()


def _show_progress(progress: bool | None, dist: Dist) -> bool:
    if progress is None:
        return dist.rank == 0 and sys.stderr.isatty()
    return bool(progress) and dist.rank == 0


def _bytes_per_token(out: Path, manifest_name: str) -> float | None:
    try:
        m = json.loads((out / manifest_name).read_text())
    except (OSError, ValueError):
        return None
    sup = m.get("num_supervised", 0)
    return sum(s["bytes"] for s in m.get("shards", [])) / sup if sup else None


def _check_ranks_agree(dist: Dist, scan: Scan) -> None:
    """Every rank read the same dataset (each takes its share of a plan of the whole): a rank
    given other data (another file, another order, a per-rank shuffle) would write records of
    samples no other rank planned and leave others out."""
    seen = dist.all_gather((len(scan), scan.digest()))
    differ = [r for r, d in enumerate(seen) if d != seen[0]]
    if differ:
        raise CacheInputError(
            "the ranks read different datasets: "
            + "; ".join(
                f"rank {r}: {n:,} samples, digest {d[:12]}" for r, (n, d) in enumerate(seen)
            )
            + ". Every rank must be given the same samples in the same order (the same file, no "
            "per-rank sharding or shuffling: the build deals the work to the ranks itself)"
        )
