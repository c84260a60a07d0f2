"""Lightning callbacks for HONES attribution (HONES_METHOD §2-4), usable on any LightningModule.

Protocol: the callback needs a ``VLMAdapter``. It takes ``pl_module.adapter`` (any module
that exposes its Hugging Face decoder through an adapter attribute, e.g.
``hones.models.wrap_model(model, processor)``), or calls the ``adapter_factory(pl_module)``
it was given. A batch is a dict with ``items``, a list of ``hones.data.TaskItem``;
``{"items": [...]}`` is enough. The adapter's encoding of them (``HonesDataModule``'s
batches) is used when present; any other encoding in the batch is ignored and the items
re-encoded (``hones.attribution.batches``). On several processes, run the callbacks in
``predict``, or give validate / test loaders a sampler that does not repeat items
(``check_unrepeated_loaders``).

Design: thin callbacks over the plain accumulators.
- ``on_{stage}_epoch_start``: build a fresh accumulator on the module's device;
- ``on_{stage}_batch_end``: feed it the batch (extra forwards of our own; the module's
  own ``*_step`` is untouched and its outputs are ignored);
- ``on_{stage}_epoch_end``: ``compute()`` (every process takes part: torchmetrics
  sums are synchronised), keep the result on the callback (``.scores``, ``.result``,
  ``.results``), then on global rank 0 only write the artifacts and log to the
  loggers (TensorBoard: figures and histograms).
Stages: any of "validate", "test", "predict" (``stages=``); "validate" also runs inside
``fit``. Sanity-check batches are skipped. No collective runs inside a batch hook, so
``predict``'s unequal per-rank batch counts are fine.

Chain: ``HeadLocalizationCallback`` -> ``NeuronAttributionCallback(heads=<that callback>)``
-> ``MaskingVerificationCallback(banks=<that callback>)``; each may also start from files.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import RandomSampler, SequentialSampler

from hones.attribution.bank import (
    BankEntry,
    BankError,
    as_bank,
    bank_to_layer_dict,
    load_head_scores,
    neurons_per_layer,
    read_head_list,
    save_head_scores,
    save_matrices,
    stored_top_k,
    write_bank,
    write_head_list,
)
from hones.attribution.batches import check_items, ensure_prompt_only, ensure_targets
from hones.attribution.heads import (
    DEFAULT_TOP_K,
    HeadLocalizer,
    HeadScores,
    check_heads,
    head_score_agreement,
    teacher_forced_measure,
)
from hones.attribution.neurons import NeuronAttribution, NeuronAttributor
from hones.attribution.reports import relative_drop
from hones.attribution.write_in import idf_from_items
from hones.choices import TASKS
from hones.run_defaults import stage_loaders

AdapterFactory = Callable[[L.LightningModule], Any]
STAGES = ("validate", "test", "predict")
_HOOK_STAGE = {"validation": "validate", "test": "test", "predict": "predict"}


def resolve_adapter(pl_module: L.LightningModule, adapter_factory: AdapterFactory | None = None) -> Any:
    """The module's VLMAdapter: ``adapter_factory(pl_module)`` if given, else ``pl_module.adapter``
    (on one device: see :func:`check_one_device`)."""
    adapter = adapter_factory(pl_module) if adapter_factory is not None else getattr(pl_module, "adapter", None)
    if adapter is None:
        raise AttributeError(
            f"{type(pl_module).__name__} has no `.adapter`; expose the VLMAdapter as `adapter` "
            "or pass adapter_factory=... to the callback"
        )
    check_one_device(adapter)
    return adapter


def check_one_device(adapter: Any) -> None:
    """A one-line ValueError when the model is spread over several devices (``device_map``): the
    attribution passes combine every layer's weights and activations in one tensor, and one
    process per GPU (DDP) is how they scale."""
    placed = getattr(getattr(adapter, "model", None), "hf_device_map", None) or {}
    devices = sorted({str(device) for device in placed.values()})
    if len(devices) > 1:
        raise ValueError(
            f"the attribution callbacks need the model on one device; its device_map spreads it over {', '.join(devices)}: "
            "load it without device_map and run one process per GPU (DDP, docs/distributed.md)"
        )


def _finite_or_none(value: float) -> float | None:
    """JSON-safe number: NaN / inf become None (strict JSON has no NaN)."""
    return float(value) if math.isfinite(value) else None


def _batch_task(batch: Mapping[str, Any]) -> str | None:
    """The task of the batch's ``items`` (None without items); items that are not TaskItems, or of
    several tasks, are an error."""
    items = batch.get("items") if isinstance(batch, Mapping) else None
    if items is None:
        return None
    tasks = sorted({item.task for item in check_items(items)})
    if len(tasks) > 1:
        raise ValueError(f"a batch holds items of several tasks ({', '.join(tasks)}); the callbacks take one task per pass")
    return tasks[0]


def _check_task(owner: str, task: str | None) -> None:
    """A one-line ValueError for a ``task`` argument that is not one of §1's."""
    if task is not None and task not in TASKS:
        raise ValueError(f"{owner}: task must be one of {', '.join(TASKS)} or None; got {task!r}")


def _check_top_k(owner: str, top_k: int | None) -> None:
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{owner}: top_k (|H*|) must be a whole number >= 1 or None; got {top_k!r}")


def check_unrepeated_loaders(trainer: L.Trainer, stage: str, owner: str) -> None:
    """A one-line ``ValueError`` when a loader of ``stage`` would repeat or drop items across processes.

    Lightning gives validate / test loaders a ``DistributedSampler``, which pads the split
    with repeated items to a multiple of the process count: the repeats would count twice in
    the statistics, which would then differ from a 1-process run's. ``predict`` and the
    hones datamodule shard without repeats.
    """
    if trainer.world_size <= 1:
        return
    for loader in stage_loaders(trainer, stage):
        sampler = getattr(loader, "sampler", None)
        batch_sampler = getattr(loader, "batch_sampler", None)
        if getattr(batch_sampler, "sampler", None) is not None:
            sampler = batch_sampler.sampler  # the index sampler the batches come from (a given batch_sampler's own)
        if type(sampler) in (SequentialSampler, RandomSampler):
            size = len(sampler)
            raise ValueError(
                f"{owner}: the {stage} loader's {type(sampler).__name__} gives each of the {trainer.world_size} processes "
                f"all {size} items, which would count {trainer.world_size} times; build the loader once the process group "
                "exists (in a LightningDataModule's *_dataloader hook: evaluation_sampler returns None before it) with "
                "sampler=hones.data.datamodule.evaluation_sampler(dataset) and Trainer(use_distributed_sampler=False), "
                "or run the callback in trainer.predict (stages=('predict',))"
            )
        total, dataset = getattr(sampler, "total_size", None), getattr(sampler, "dataset", None)
        if total is None or not hasattr(dataset, "__len__") or total == len(dataset):
            continue
        size = len(dataset)
        change = f"repeats {total - size}" if total > size else f"drops {size - total}"
        raise ValueError(
            f"{owner}: the {stage} loader's {type(sampler).__name__} spreads {size} items over {trainer.world_size} "
            f"processes as {total} ({change}), so the result would differ from a 1-process run; give the loader "
            "a sampler that neither repeats nor drops (hones.data.datamodule.evaluation_sampler(dataset), with "
            "Trainer(use_distributed_sampler=False)), or run the callback in trainer.predict (stages=('predict',))"
        )


# -- logging (rank 0) -----------------------------------------------------------------------
def _experiments(trainer: L.Trainer, method: str) -> list[Any]:
    """Logger back-ends (e.g. TensorBoard's SummaryWriter) that have ``method``."""
    found = []
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if experiment is not None and hasattr(experiment, method):
            found.append(experiment)
    return found


def _log_scalars(trainer: L.Trainer, values: Mapping[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(dict(values), step=trainer.global_step)


def head_heatmap_figure(delta: Tensor, title: str = "head score Δ") -> Any:
    """A matplotlib figure of Δ ``[L, H]`` (layers on y, heads on x)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(3.0, 0.25 * delta.shape[1] + 1.5), max(2.5, 0.2 * delta.shape[0] + 1.0)))
    image = axis.imshow(delta.float().numpy(), aspect="auto", cmap="coolwarm", origin="lower")
    axis.set_xlabel("head")
    axis.set_ylabel("layer")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, label="Δ utility")
    figure.tight_layout()
    return figure


def neurons_per_layer_figure(counts: Mapping[str, Tensor], title: str = "selected neurons per layer") -> Any:
    """A matplotlib figure with one curve per selection (layer preference, HONES_METHOD §4)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(6, 3.2))
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "v", "D", "x", "+", "*"]
    for k, (name, values) in enumerate(counts.items()):  # selections with equal counts (random) stay visible
        axis.plot(range(len(values)), values.tolist(), linestyle=styles[k % 4], marker=markers[k % 8], label=name, alpha=0.8)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel("layer")
    axis.set_ylabel("neurons")
    axis.set_title(title)
    axis.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    figure.tight_layout()
    return figure


# -- base ---------------------------------------------------------------------------------------
class _AttributionCallback(Callback):
    """Wires ``_start`` / ``_batch`` / ``_end`` to the hooks of the chosen stages."""

    def __init__(
        self,
        stages: Sequence[str] = ("validate",),
        adapter_factory: AdapterFactory | None = None,
        output_dir: str | os.PathLike | None = None,
    ) -> None:
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"stages must be among {STAGES}; got {unknown}")
        self.stages = tuple(stages)
        self.adapter_factory = adapter_factory
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self._active = False
        # batches with a smaller index are ignored: reset to 0 at each epoch start, then set
        # by a resume (``hones.attribution.checkpoint``: their sums were restored instead)
        self.skip_batches = 0

    # subclasses implement these three
    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def _batch(self, trainer: L.Trainer, pl_module: L.LightningModule, adapter: Any, batch: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def _end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        raise NotImplementedError

    def _on_start(self, hook: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = _HOOK_STAGE[hook] in self.stages and not trainer.sanity_checking
        self.skip_batches = 0
        if self._active:
            check_unrepeated_loaders(trainer, _HOOK_STAGE[hook], type(self).__name__)
            self._start(trainer, pl_module)

    def _on_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int | None = None) -> None:
        if self._active and (batch_idx is None or batch_idx >= self.skip_batches):
            self._check_batch(batch)
            self._batch(trainer, pl_module, resolve_adapter(pl_module, self.adapter_factory), batch)

    def _check_batch(self, batch: Any) -> None:
        """One-line errors for a batch that is not a mapping, or whose items are of another task than the callback's."""
        owner = type(self).__name__
        if not isinstance(batch, Mapping):
            raise ValueError(
                f"{owner}: a batch must be a mapping with 'items' (a list of TaskItems) and/or the adapter's encoding; "
                f"got a {type(batch).__name__} (collate the items as {{'items': [...]}})"
            )
        task, own = _batch_task(batch), getattr(self, "task", None)
        if task is not None and own is not None and task != own:
            raise ValueError(f"{owner}: the batch holds {task} items, and the callback is set for {own}")

    def _on_end(self, hook: str, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active:
            self._active = False
            self._end(trainer, pl_module, _HOOK_STAGE[hook])

    def accumulators(self) -> dict[str, torch.nn.Module]:
        """The running accumulators of the current epoch (name -> module of torchmetrics states).

        Empty before the first batch of a lazily built callback. Used to checkpoint and
        restore a partly processed split (``hones.attribution.checkpoint``).
        """
        return {}

    # Lightning hooks
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._on_start("validation", trainer, pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self._on_batch(trainer, pl_module, batch, batch_idx)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._on_end("validation", trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._on_start("test", trainer, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self._on_batch(trainer, pl_module, batch, batch_idx)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._on_end("test", trainer, pl_module)

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._on_start("predict", trainer, pl_module)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self._on_batch(trainer, pl_module, batch, batch_idx)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._on_end("predict", trainer, pl_module)


# -- §2 -----------------------------------------------------------------------------------------
class HeadLocalizationCallback(_AttributionCallback):
    """Critical head localization over the stage's batches (HONES_METHOD §2).

    Args:
        task: the task; None takes it from the first batch's items.
        utility: "teacher_forced" (default, fast) | "metric" (the paper's: generation / NDCG).
        top_k: |H*|; None uses the architecture default (LLaVA 30, Qwen2.5-VL 25) capped at L·H.
        heads: candidate heads (default all); rows_per_forward, rerun, metric_mode,
            max_new_tokens: see ``HeadLocalizer``.
        compare_utility: a second utility computed in the same pass (e.g. "metric" beside
            "teacher_forced"); its agreement with the first (Spearman over heads, top-k
            overlap; HONES_METHOD §2 asks for it when the fast utility is used) is kept in
            ``.agreement``, logged and written to ``head_agreement.json``.
        output_dir: where ``head_scores.safetensors`` and ``heads.json`` go (rank 0).

    After the epoch: ``.scores`` (``HeadScores``), ``.top_heads`` (H*), and with
    ``compare_utility`` also ``.compare_scores`` and ``.agreement``.
    """

    def __init__(
        self,
        task: str | None = None,
        utility: str = "teacher_forced",
        top_k: int | None = None,
        heads: Sequence[tuple[int, int]] | None = None,
        rows_per_forward: int = 64,
        rerun: bool = True,
        metric_mode: str = "paper",
        max_new_tokens: int = 24,
        compare_utility: str | None = None,
        stages: Sequence[str] = ("validate",),
        adapter_factory: AdapterFactory | None = None,
        output_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(stages, adapter_factory, output_dir)
        _check_task("HeadLocalizationCallback", task)
        _check_top_k("HeadLocalizationCallback", top_k)
        if compare_utility is not None and compare_utility == utility:
            raise ValueError(f"compare_utility must differ from utility ({utility!r})")
        if utility == "teacher_forced" and compare_utility is None:
            rank_zero_warn(
                "HeadLocalizationCallback: utility='teacher_forced' without compare_utility; §2 takes the teacher-forced "
                "utility in place of the metric only with their agreement measured and reported: set compare_utility='metric'",
                category=UserWarning,
            )
        self.compare_utility = compare_utility
        self.compare_localizer: HeadLocalizer | None = None
        self.compare_scores: HeadScores | None = None
        self.agreement: dict[str, float] = {}
        self.task, self.utility, self.top_k = task, utility, top_k
        self._task_arg = task
        self.heads = heads
        self.options = dict(rows_per_forward=rows_per_forward, rerun=rerun, metric_mode=metric_mode, max_new_tokens=max_new_tokens)
        self.localizer: HeadLocalizer | None = None
        self.scores: HeadScores | None = None
        self.top_heads: list[tuple[int, int]] = []
        self._device: torch.device | None = None

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.localizer = None
        self._device = pl_module.device
        self.task = self._task_arg
        if self.task is not None:  # else built on the first batch, once the task is known
            self._build(resolve_adapter(pl_module, self.adapter_factory), self.task)

    def accumulators(self) -> dict[str, torch.nn.Module]:
        found = {"localizer": self.localizer, "compare_localizer": self.compare_localizer}
        return {name: module for name, module in found.items() if module is not None}

    def _build(self, adapter: Any, task: str) -> None:
        self.task = task
        self.localizer = HeadLocalizer(
            adapter.num_layers, adapter.num_heads, task, self.utility, self.heads, **self.options
        ).to(self._device)
        if self.compare_utility is not None:
            self.compare_localizer = HeadLocalizer(
                adapter.num_layers, adapter.num_heads, task, self.compare_utility, self.heads, **self.options
            ).to(self._device)
        self._model_type = getattr(adapter, "model_type", "")
        self._shape = (adapter.num_layers, adapter.num_heads)

    def _batch(self, trainer: L.Trainer, pl_module: L.LightningModule, adapter: Any, batch: Mapping[str, Any]) -> None:
        if self.localizer is None:
            task = _batch_task(batch)
            if task is None:
                raise ValueError("HeadLocalizationCallback: give task=... (the batch has no items to read it from)")
            self._build(adapter, task)
        assert self.localizer is not None
        self.localizer.update(adapter, batch)
        if self.compare_localizer is not None:
            self.compare_localizer.update(adapter, batch)

    def _end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.localizer is None:
            raise RuntimeError("HeadLocalizationCallback: the epoch had no batch")
        self.scores = self.localizer.compute()
        layers, heads = self._shape
        k = self.top_k if self.top_k is not None else min(DEFAULT_TOP_K.get(self._model_type, 30), layers * heads)
        self.top_heads = self.scores.top_heads(k)
        if self.compare_localizer is not None:
            self.compare_scores = self.compare_localizer.compute()
            self.agreement = head_score_agreement(self.scores, self.compare_scores, k)
        if not trainer.is_global_zero:
            return
        if self.output_dir is not None:
            save_head_scores(self.output_dir / "head_scores.safetensors", self.scores, top_k=len(self.top_heads) or None)
            write_head_list(self.output_dir / "heads.json", self.scores, selected=self.top_heads)
            if self.compare_scores is not None:
                save_head_scores(self.output_dir / f"head_scores_{self.compare_utility}.safetensors", self.compare_scores)
                from hones import io

                io.write_json(
                    self.output_dir / "head_agreement.json",
                    {
                        "utility": self.utility,
                        "compare_utility": self.compare_utility,
                        **{name: _finite_or_none(value) for name, value in self.agreement.items()},
                    },
                )
        scalars = {f"attribution/{self.task}/head_baseline_utility": self.scores.baseline}
        scalars.update({f"attribution/{self.task}/head_agreement/{name}": value for name, value in self.agreement.items()})
        _log_scalars(trainer, scalars)
        for experiment in _experiments(trainer, "add_figure"):
            experiment.add_figure(
                f"attribution/{self.task}/head_delta",
                head_heatmap_figure(torch.nan_to_num(self.scores.delta), f"{self.task}: Δ ({self.scores.utility})"),
                global_step=trainer.global_step,
            )


# -- §3 -----------------------------------------------------------------------------------------
HeadSource = HeadScores | HeadLocalizationCallback | str | os.PathLike | Sequence[tuple[int, int, float]]


def _heads_and_deltas(
    source: HeadSource, top_k: int | None, default_k: int = 30
) -> tuple[list[tuple[int, int]], list[float], str | None]:
    """H*, Δ and the task of the head pass they come from (None where the source does not say),
    from HeadScores, a finished HeadLocalizationCallback, a ``head_scores.safetensors`` or
    ``heads.json`` file (the callback writes both, each with its |H*|) or (l, h, Δ) triples."""
    if isinstance(source, HeadLocalizationCallback):
        if source.scores is None:
            raise RuntimeError("the HeadLocalizationCallback has not produced scores yet (run its stage first)")
        heads = source.top_heads if top_k is None else source.scores.top_heads(top_k)
        return heads, [float(source.scores.delta[h]) for h in heads], source.scores.task
    if isinstance(source, (str, os.PathLike)) and Path(source).suffix == ".json":  # a heads.json head list
        from hones import io

        rows = read_head_list(source)
        if all("rank" in row for row in rows):
            rows = sorted(rows, key=lambda row: int(row["rank"]))
        else:
            rows = sorted(rows, key=lambda row: -float(row["delta"]))
        data = io.read_json(source)
        stored, task = data.get("top_k"), data.get("task")  # the head callback records its |H*| and task
        rows = rows[: top_k if top_k is not None else stored if isinstance(stored, int) else default_k]
        heads = [(int(r["layer"]), int(r["head"])) for r in rows]
        return heads, [float(r["delta"]) for r in rows], task if isinstance(task, str) else None
    if isinstance(source, (str, os.PathLike)):  # a head_scores.safetensors
        scores = load_head_scores(source)  # checked first: a missing or damaged file is one line
        stored = stored_top_k(source)
        heads = scores.top_heads(top_k if top_k is not None else stored if stored is not None else default_k)
        return heads, [float(scores.delta[h]) for h in heads], scores.task
    if isinstance(source, HeadScores):
        heads = source.top_heads(top_k if top_k is not None else default_k)
        return heads, [float(source.delta[h]) for h in heads], source.task
    triples = list(source)
    for k, triple in enumerate(triples):
        if isinstance(triple, (str, bytes)) or not isinstance(triple, Sequence) or len(triple) != 3:
            raise ValueError(f"heads: entry {k} must be a (layer, head, Δ) triple (Δ weighs the head, §3); got {triple!r}")
    return [(int(l), int(h)) for l, h, _ in triples], [float(d) for _, _, d in triples], None


class NeuronAttributionCallback(_AttributionCallback):
    """Head-conditioned neuron attribution and the baseline selections (HONES_METHOD §3-4).

    Args:
        heads: H* — a ``HeadLocalizationCallback`` (run before), ``HeadScores``, a
            ``head_scores.safetensors`` or ``heads.json`` path (its output files), or
            (layer, head, Δ) triples.
        top_k: |H*| when ``heads`` holds all scores (None: the callback's own H*, or the
            ``top_k`` that the head callback records in its ``heads.json``, else the architecture
            default: LLaVA 30, Qwen2.5-VL 25, others 30).
        top_ratio: budget, the global top fraction of L × I (§3 default 0.01).
        task: None reads it from the first batch.
        idf: caption weights (§3): "auto" computes the IDF from ``trainer.datamodule.items``
            (the discovery split; each caption item's joined references one document); a list of the discovery
            split's caption ``TaskItem``s does the same without a datamodule; or a ``[vocab]``
            tensor (``hones.attribution.write_in.idf_from_items(adapter, items)``); None: w_t = 1.
            Only captions use it.
        activation_statistics: also accumulate AP / MA (prompt positions).
        gradient_baseline: also accumulate gradient × activation (a backward per batch).
        baseline_seed: seed of the random baseline.
        output_dir: ``importance.safetensors``, ``bank_hones.json``, ``bank_<baseline>.json``.

    After the epoch: ``.result`` (``NeuronAttribution``), ``.bank`` (HONES) and ``.banks``
    (HONES + baselines, name -> entries).
    """

    def __init__(
        self,
        heads: HeadSource,
        top_k: int | None = None,
        top_ratio: float = 0.01,
        task: str | None = None,
        idf: Tensor | str | Sequence[Any] | None = "auto",
        rows_per_forward: int = 64,
        activation_statistics: bool = True,
        gradient_baseline: bool = False,
        baseline_seed: int = 0,
        stages: Sequence[str] = ("validate",),
        adapter_factory: AdapterFactory | None = None,
        output_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__(stages, adapter_factory, output_dir)
        _check_task("NeuronAttributionCallback", task)
        _check_top_k("NeuronAttributionCallback", top_k)
        self.head_source, self.top_k, self.top_ratio = heads, top_k, top_ratio
        self.task, self.idf = task, idf
        self._task_arg = task
        self.rows_per_forward = rows_per_forward
        self.activation_statistics, self.gradient_baseline = activation_statistics, gradient_baseline
        self.baseline_seed = baseline_seed
        self.attributor: NeuronAttributor | None = None
        self.result: NeuronAttribution | None = None
        self.bank: list[BankEntry] = []
        self.banks: dict[str, list[BankEntry]] = {}
        self._device: torch.device | None = None

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.attributor = None
        self._device = pl_module.device
        self.task = self._task_arg
        if self.task is not None:  # else built on the first batch, once the task is known
            self._build(trainer, resolve_adapter(pl_module, self.adapter_factory), self.task)

    def accumulators(self) -> dict[str, torch.nn.Module]:
        return {} if self.attributor is None else {"attributor": self.attributor}

    def _build(self, trainer: L.Trainer, adapter: Any, task: str) -> None:
        self.task = task
        default_k = DEFAULT_TOP_K.get(getattr(adapter, "model_type", ""), 30)
        heads, deltas, source_task = _heads_and_deltas(self.head_source, self.top_k, default_k)
        if not heads:
            raise ValueError("NeuronAttributionCallback: H* is empty; §3 conditions the importance on at least one head")
        if source_task is not None and source_task != task:
            raise BankError(
                f"H*: the heads come from a {source_task} head pass, and this callback attributes {task}; "
                "pass them as (layer, head, Δ) triples to use them anyway"
            )
        try:
            check_heads(heads, adapter.num_layers, adapter.num_heads)
        except ValueError as error:  # H* comes from outside (a file, triples): name it as bad input
            raise BankError(f"H*: {error} (head scores of another model?)") from None
        self.attributor = NeuronAttributor(
            adapter.num_layers,
            adapter.ffn_width,
            heads,
            deltas,
            task,
            idf=self._resolve_idf(trainer, adapter, task),
            rows_per_forward=self.rows_per_forward,
            activation_statistics=self.activation_statistics,
            gradient_baseline=self.gradient_baseline,
        ).to(self._device)

    def _resolve_idf(self, trainer: L.Trainer, adapter: Any, task: str) -> Tensor | None:
        if isinstance(self.idf, Tensor) or self.idf is None:
            return self.idf
        if isinstance(self.idf, str) and self.idf != "auto" or not isinstance(self.idf, (str, Sequence)):
            raise ValueError(f"idf must be 'auto', a list of TaskItems, a [vocab] tensor or None; got {self.idf!r}")
        if task != "caption":
            return None
        if isinstance(self.idf, str):
            items = getattr(getattr(trainer, "datamodule", None), "items", None)
            if not items:
                raise ValueError(
                    "idf='auto' needs trainer.datamodule.items (the discovery split); without a datamodule pass "
                    "idf=<the discovery split's caption TaskItems>, a [vocab] tensor, or None"
                )
        else:
            items = check_items(self.idf)
        return idf_from_items(adapter, items).to(self._device)

    def _batch(self, trainer: L.Trainer, pl_module: L.LightningModule, adapter: Any, batch: Mapping[str, Any]) -> None:
        if self.attributor is None:
            task = _batch_task(batch)
            if task is None:
                raise ValueError("NeuronAttributionCallback: give task=... (the batch has no items to read it from)")
            self._build(trainer, adapter, task)
        assert self.attributor is not None
        self.attributor.update(adapter, batch)

    def _end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.attributor is None:
            raise RuntimeError("NeuronAttributionCallback: the epoch had no batch")
        self.result = self.attributor.compute()
        self.bank = self.result.select(self.top_ratio)
        self.banks = {"hones": self.bank, **self.result.baseline_banks(self.bank, self.baseline_seed)}
        if not trainer.is_global_zero:
            return
        result = self.result
        num_layers = result.importance.shape[0]
        if self.output_dir is not None:
            matrices = {"importance": result.importance, "mean_contribution": result.mean_contribution}
            matrices.update({f"baseline_{k}": v for k, v in result.baselines.items()})
            matrices.update({f"stat_{k}": v for k, v in result.activation_statistics.items() if v.dim() == 2})
            meta = {
                "task": self.task, "num_items": result.num_items,
                "heads": json.dumps([list(head) for head in result.heads]), "head_deltas": json.dumps(result.head_deltas.tolist()),
            }  # fmt: skip
            save_matrices(self.output_dir / "importance.safetensors", matrices, meta)
            for name, entries in self.banks.items():
                write_bank(self.output_dir / f"bank_{name}.json", entries)
        counts = {name: neurons_per_layer(entries, num_layers) for name, entries in self.banks.items()}
        _log_scalars(trainer, {f"attribution/{self.task}/neurons_selected": float(len(self.bank))})
        for experiment in _experiments(trainer, "add_histogram"):
            experiment.add_histogram(f"attribution/{self.task}/importance", result.importance.float().flatten(), trainer.global_step)
        for experiment in _experiments(trainer, "add_figure"):
            experiment.add_figure(
                f"attribution/{self.task}/neurons_per_layer",
                neurons_per_layer_figure(counts, f"{self.task}: selected neurons per layer ({len(self.bank)} per selection)"),
                global_step=trainer.global_step,
            )


# -- §4 -----------------------------------------------------------------------------------------
BankSource = Mapping[str, Any] | NeuronAttributionCallback | str | os.PathLike


class MaskingVerificationCallback(_AttributionCallback):
    """Causal verification by masking on the held-out split (HONES_METHOD §4).

    For every batch: the task metric of the unmodified model and, per bank, with
    ``zero_neurons`` on the bank's neurons (every position, prompt and generated tokens).

    Args:
        banks: name -> bank (``BankEntry`` list, bank JSON path, ``{layer: neuron ids}`` or
            ``(layer, neuron)`` pairs; checked against the model), a finished
            ``NeuronAttributionCallback`` (its HONES bank and baselines), or the folder it wrote
            (every ``bank_<name>.json`` in it).
        task: None reads it from the first batch.
        metric_mode: "paper" | "official"; max_new_tokens: generation budget (§1: 24).
        target_logprob: also measure a teacher-forced score with and without each bank (not
            in §4; a finer reading than the metric, which moves only when a greedy answer
            flips): vqa / ocr / caption, the mean log-probability of the item's target
            tokens (nats; caption: its one seeded reference); retrieval, the margin gap:
            the mean logit(Yes) − logit(No) of the positives minus that of the negatives.
        output_dir: ``masking.json``.

    After the epoch ``.results``: ``{"task", "metric", "base", "banks": {name: {"masked",
    "drop", "relative_drop", "num_neurons"}}}`` with relative_drop = 100 (P − P_masked) / |P|
    (None when P = 0); with ``target_logprob`` also ``"teacher_forced": {"measure", "base",
    "banks": {name: {"masked", "drop"}}}`` (drop = base − masked).
    """

    def __init__(
        self,
        banks: BankSource,
        task: str | None = None,
        metric_mode: str = "paper",
        max_new_tokens: int = 24,
        stages: Sequence[str] = ("test",),
        adapter_factory: AdapterFactory | None = None,
        output_dir: str | os.PathLike | None = None,
        target_logprob: bool = False,
    ) -> None:
        super().__init__(stages, adapter_factory, output_dir)
        _check_task("MaskingVerificationCallback", task)
        self.bank_source, self.task = banks, task
        self._task_arg = task
        self.metric_mode, self.max_new_tokens = metric_mode, max_new_tokens
        self.target_logprob = target_logprob
        self.metrics: torch.nn.ModuleDict | None = None
        self.scores: torch.nn.ModuleDict | None = None  # teacher-forced means (target_logprob)
        self.layer_dicts: dict[str, dict[int, Tensor]] = {}
        self.results: dict[str, Any] = {}
        self._device: torch.device | None = None

    def _resolve_banks(self, adapter: Any) -> dict[str, list[BankEntry]]:
        source = self.bank_source
        if isinstance(source, NeuronAttributionCallback):
            if not source.banks:
                raise RuntimeError("the NeuronAttributionCallback has no banks yet (run its stage first)")
            return dict(source.banks)
        if isinstance(source, (str, os.PathLike)):  # a NeuronAttributionCallback's output_dir
            files = sorted(Path(source).glob("bank_*.json")) if Path(source).is_dir() else []
            if not files:
                raise BankError(f"{source}: no bank_<name>.json files (a NeuronAttributionCallback's output_dir)")
            source = {file.stem[len("bank_"):]: file for file in files}
        if not isinstance(source, Mapping):
            raise BankError(
                "MaskingVerificationCallback: banks must be a mapping name -> bank, a NeuronAttributionCallback or "
                f"its output folder; got {type(source).__name__}"
            )
        return {
            name: as_bank(bank, adapter.num_layers, adapter.ffn_width, source=f"banks[{name!r}]")
            for name, bank in source.items()
        }

    def accumulators(self) -> dict[str, torch.nn.Module]:
        found = {} if self.metrics is None else {"metrics": self.metrics}
        if self.scores is not None:
            found["scores"] = self.scores
        return found

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.metrics = self.scores = None
        self._device = pl_module.device
        self.task = self._task_arg
        if self.task is not None:  # else built on the first batch, once the task is known
            self._build(resolve_adapter(pl_module, self.adapter_factory), self.task)

    def _build(self, adapter: Any, task: str) -> None:
        from hones.evaluation import TaskScorer
        from hones.metrics import build_metric

        self.task = task
        self.scorer = TaskScorer(task, self.max_new_tokens)
        banks = self._resolve_banks(adapter)
        self.num_neurons = {name: len(entries) for name, entries in banks.items()}
        self.layer_dicts = {name: bank_to_layer_dict(entries) for name, entries in banks.items()}
        names = ["base", *banks]
        self.metrics = torch.nn.ModuleDict({name: build_metric(task, self.metric_mode) for name in names}).to(self._device)
        if self.target_logprob:
            from torchmetrics import MeanMetric

            parts = ("positive", "negative") if task == "retrieval" else ("target",)
            keys = [f"{name}__{part}" for name in names for part in parts]
            self.scores = torch.nn.ModuleDict({key: MeanMetric() for key in keys}).to(self._device)

    def _predict(self, name: str, adapter: Any, prompt_batch: Mapping[str, Any], target_batch: Any) -> None:
        """Score one selection (already applied) on a batch: the metric and, with
        ``target_logprob``, the teacher-forced score (retrieval: from the metric's own margins)."""
        from hones.attribution.heads import target_log_prob_from_logits

        assert self.metrics is not None
        rows = self.scorer.predict(adapter, prompt_batch)
        self.scorer.update(self.metrics[name], rows)
        if self.scores is None:
            return
        if self.task != "retrieval":
            logits = adapter.forward(target_batch)
            self.scores[f"{name}__target"].update(target_log_prob_from_logits(logits, target_batch["labels"]))
            return
        margins = torch.tensor([row["score"] for row in rows], dtype=torch.float32, device=self._device)
        positive = torch.tensor([row["label"] == 1 for row in rows], device=self._device)
        if bool(positive.any()):
            self.scores[f"{name}__positive"].update(margins[positive])
        if bool((~positive).any()):
            self.scores[f"{name}__negative"].update(margins[~positive])

    def _score(self, name: str) -> float:
        assert self.scores is not None
        if self.task != "retrieval":
            return float(self.scores[f"{name}__target"].compute())
        return float(self.scores[f"{name}__positive"].compute() - self.scores[f"{name}__negative"].compute())

    def _batch(self, trainer: L.Trainer, pl_module: L.LightningModule, adapter: Any, batch: Mapping[str, Any]) -> None:
        from hones.interventions import zero_neurons

        if self.metrics is None:
            task = _batch_task(batch)
            if task is None:
                raise ValueError("MaskingVerificationCallback: give task=... (the batch has no items to read it from)")
            self._build(adapter, task)
        assert self.metrics is not None
        prompt_batch = ensure_prompt_only(adapter, batch)
        target_batch = None
        if self.scores is not None and self.task != "retrieval":
            target_batch = ensure_targets(adapter, batch)
        with torch.no_grad():
            self._predict("base", adapter, prompt_batch, target_batch)
            for name, neurons in self.layer_dicts.items():
                with zero_neurons(adapter, neurons):
                    self._predict(name, adapter, prompt_batch, target_batch)

    def _end(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.metrics is None:
            raise RuntimeError("MaskingVerificationCallback: the epoch had no batch")
        values = {name: float(metric.compute()) for name, metric in self.metrics.items()}
        base = values["base"]
        banks = {}
        for name in self.layer_dicts:
            drop = base - values[name]
            banks[name] = {
                "masked": values[name],
                "drop": drop,
                "relative_drop": relative_drop(base, values[name]),
                "num_neurons": self.num_neurons[name],
            }
        self.results = {"task": self.task, "metric": self.metrics["base"].__class__.__name__, "base": base, "banks": banks}
        if self.scores is not None:
            scored = {name: self._score(name) for name in ["base", *self.layer_dicts]}
            self.results["teacher_forced"] = {
                "measure": teacher_forced_measure(self.task),
                "base": scored["base"],
                "banks": {name: {"masked": scored[name], "drop": scored["base"] - scored[name]} for name in self.layer_dicts},
            }
        if not trainer.is_global_zero:
            return
        if self.output_dir is not None:
            from hones import io

            io.write_json(self.output_dir / "masking.json", self.results)
        scalars = {f"masking/{self.task}/base": base}
        for name, row in banks.items():
            scalars[f"masking/{self.task}/{name}/masked"] = row["masked"]
            if row["relative_drop"] is not None:
                scalars[f"masking/{self.task}/{name}/relative_drop"] = row["relative_drop"]
        _log_scalars(trainer, scalars)
