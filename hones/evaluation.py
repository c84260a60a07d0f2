"""Evaluation of a VLM on one HONES task, as a LightningModule (HONES_METHOD §1).

``trainer.validate`` / ``trainer.test`` run batched greedy generation (vqa, ocr,
caption) or Yes/No scoring (retrieval: logit(Yes) - logit(No) at the next token)
on 1..N devices. Metrics are torchmetrics objects in both modes ("paper" and
"official"), synchronised across processes at epoch end. Items are served by an
unrepeated distributed sampler (see ``HonesDataModule``), so no padding duplicate is
ever counted and a 2-process run gives the metric of a 1-process run.

No collective runs inside a step (ranks may run unequal batch counts): the metrics
synchronise in ``compute`` and the per-item rows are gathered once, at epoch end.
``output_dir`` may name ``{task}``, ``{dataset}`` and ``{split}`` (filled from the task
and the datamodule), so one config serves every task (``evaluate.py``).

Hooks implemented: ``configure_model`` (loads the adapter inside each process),
``setup`` (hands the adapter's encoder to the datamodule), ``on_*_epoch_start``
(reset metrics), ``*_step``, ``on_*_epoch_end`` (compute, log, write artifacts).

With a run directory, each pass keeps a prediction journal there while it runs
(``<run_dir>/.journal_<stage>/``, ``hones.prediction_journal``): rerunning an interrupted
``evaluate.py`` command predicts only the batches the stopped pass had not finished.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from lightning.pytorch.trainer.states import TrainerFn

from hones import io
from hones.adapter_host import AdapterHost, trainer_datamodule
from hones.attribution.settings import model_identity
from hones.choices import METRIC_MODES, TASKS, DType, MetricMode, SettingsError, Task
from hones.metrics import build_metric, group_ids, postprocess_generation
from hones.prediction_journal import PredictionJournal
from hones.run_defaults import stage_loaders
from hones.steering.fingerprint import UNUSED_DATA_KEYS, UNUSED_MODEL_KEYS, data_files, without


def retrieval_margin(adapter: Any, batch: dict[str, Any]) -> torch.Tensor:
    """logit(" Yes") - logit(" No") at the next token after the prompt: [batch]."""
    yes_id, no_id = adapter.answer_token_ids(["Yes", "No"])
    logits = adapter.next_token_logits(batch).float()
    return logits[:, yes_id] - logits[:, no_id]


def gather_objects(local: list[Any]) -> list[Any]:
    """All processes' lists concatenated (rank order); the local list when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(local)
    gathered: list[list[Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return [row for part in gathered for row in (part or [])]


def summarize_epoch(
    metrics: Any, local_rows: list[dict[str, Any]], task: str, model: str, stage: str, headline_mode: str, **extra: Any
) -> tuple[dict[str, float], list[dict[str, Any]], dict[str, Any]]:
    """Finish a scoring epoch: compute every mode's (synchronised) metric, gather the rows.

    Returns ``(values per mode, every process's rows sorted by uid, results dict)``; the
    results dict is what ``metrics_<stage>.json`` holds (``extra`` keys are added at the end).
    """
    values = {mode: float(metric.compute()) for mode, metric in metrics.items()}
    rows = sorted(gather_objects(local_rows), key=lambda r: r["uid"])
    results = {
        "task": task,
        "model": model,
        "stage": stage,
        "headline_mode": headline_mode,
        "metric": values[headline_mode],
        "metrics": {metrics[mode].name: values[mode] for mode in METRIC_MODES},
        "num_items": len(rows),
        **extra,
    }
    return values, rows, results


def skipped_items(trainer: Any) -> dict[str, Any]:
    """The datamodule's count of skipped bad items (lenient loading), for the results file:
    ``{"skipped": {"total": n, "reasons": {reason: count}}}``, or nothing without a report."""
    skips = getattr(getattr(trainer, "datamodule", None), "skips", None) if trainer is not None else None
    if skips is None or not hasattr(skips, "reasons"):
        return {}
    return {"skipped": skips.to_json()}


class TaskScorer:
    """Runs one task on an encoded batch and feeds the metrics.

    Shared by evaluation, masking verification and steering so that every stage
    scores a task the same way. ``predict(adapter, batch)`` returns per-item rows.
    """

    def __init__(self, task: str, max_new_tokens: int = 24) -> None:
        if task not in TASKS:
            raise SettingsError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
        self.task = task
        self.max_new_tokens = max_new_tokens

    def predict(self, adapter: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """One row per item: uid, prediction (text) or score (retrieval margin), references."""
        items = batch["items"]
        if self.task == "retrieval":
            margins = retrieval_margin(adapter, batch).tolist()
            return [
                {"uid": it.uid, "group": it.group, "label": int(it.label), "score": float(m)}
                for it, m in zip(items, margins)
            ]
        texts = adapter.generate(batch, max_new_tokens=self.max_new_tokens)
        return [
            {"uid": it.uid, "prediction": postprocess_generation(t), "references": list(it.references)}
            for it, t in zip(items, texts)
        ]

    def update(self, metric: Any, rows: Sequence[dict[str, Any]]) -> None:
        """Feed predicted rows to a metric built by ``build_metric(self.task, mode)``."""
        if not rows:
            return
        if self.task == "retrieval":
            metric.update(
                torch.tensor([r["score"] for r in rows], dtype=torch.float32),
                torch.tensor([r["label"] for r in rows], dtype=torch.long),
                group_ids([r["group"] for r in rows]),
            )
        else:
            metric.update([r["prediction"] for r in rows], [r["references"] for r in rows])


class EpochScoring:
    """Validation and test epochs that score a task on a LightningModule (mixin).

    The module provides ``metrics`` (mode -> metric), ``scorer`` (``TaskScorer``), ``adapter``
    and ``_end(tag)`` (compute, log, write); this mixin resets the metrics at each epoch
    start, scores every batch with ``_predict_rows`` and names the epochs:
    ``validation_tag`` for validation, ``test_tag()`` for test.

    A module that also gives ``journal_directory(tag)`` and ``journal_identity(tag)`` keeps a
    ``PredictionJournal`` of each validate / test pass outside a fit: a rerun of an interrupted
    pass predicts only the batches the journal lacks (``hones.prediction_journal``).
    """

    validation_tag = "validate"
    metrics: Any
    scorer: TaskScorer
    adapter: Any
    _rows: list[dict[str, Any]]
    _journal: PredictionJournal | None = None

    def test_tag(self) -> str:
        return "test"

    def journal_directory(self, tag: str) -> Path | None:
        """Where the pass ``tag`` keeps its prediction journal (None: no journal)."""
        return None

    def journal_identity(self, tag: str) -> dict[str, Any]:
        """What the rows of pass ``tag`` depend on (JSON data; ``journal_identity``); a journal written
        for another is not read."""
        return journal_identity(self, tag)

    def _predict_rows(self, batch: dict[str, Any]) -> list[dict[str, Any]]:
        """One prediction row per item of ``batch`` (override to change how the model runs)."""
        return self.scorer.predict(self.adapter, batch)

    def _end(self, stage: str) -> None:
        raise NotImplementedError

    def _start(self, tag: str) -> None:
        for metric in self.metrics.values():
            metric.reset()
        self._rows = []
        self._journal = None
        trainer = self.trainer if self._trainer is not None else None  # type: ignore[attr-defined]
        if trainer is None or trainer.sanity_checking or trainer.state.fn == TrainerFn.FITTING:
            return
        if trainer.datamodule is None:  # loaders passed directly: nothing identifies the data
            return
        directory = self.journal_directory(tag)
        if directory is None:
            return
        self._journal = PredictionJournal(directory, self.journal_identity(tag), rank=trainer.global_rank)
        found = self._journal.open()
        if found and trainer.is_global_zero:
            cut = f"; {self._journal.dropped} incomplete last line(s) dropped" if self._journal.dropped else ""
            print(f"{tag}: {found} predictions of an interrupted pass found in {directory}; their batches are not run again{cut}", flush=True)

    def _step(self, batch: dict[str, Any]) -> None:
        journal = self._journal
        rows = journal.lookup([item.uid for item in batch["items"]]) if journal is not None else None
        if rows is None:
            rows = self._predict_rows(batch)
            if journal is not None:
                journal.append(rows)
        for metric in self.metrics.values():
            self.scorer.update(metric, rows)
        self._rows.extend(rows)

    def _finish(self, tag: str) -> None:
        self._end(tag)
        if self._journal is not None:  # the results are written: the journal is done with
            self._journal.close()
            trainer = self.trainer  # type: ignore[attr-defined]
            if not _ran_every_batch(trainer):  # limit_*_batches / fast_dev_run: the full pass still needs it
                if trainer.is_global_zero:
                    print(f"{tag}: a limited pass; the prediction journal in {self._journal.directory} is kept for the full pass", flush=True)
            elif trainer.is_global_zero:
                self._journal.remove()
            self._journal = None

    def on_validation_epoch_start(self) -> None:
        self._start(self.validation_tag)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish(self.validation_tag)

    def on_test_epoch_start(self) -> None:
        self._start(self.test_tag())

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch)

    def on_test_epoch_end(self) -> None:
        self._finish(self.test_tag())


def _ran_every_batch(trainer: Any) -> bool:
    """Whether the running validate / test pass covers every batch of its loaders (no
    ``limit_*_batches`` or ``fast_dev_run`` cut)."""
    counts = trainer.num_test_batches if trainer.testing else trainer.num_val_batches
    for count, loader in zip(counts, stage_loaders(trainer, "test" if trainer.testing else "validate")):
        if hasattr(loader, "__len__") and count < len(loader):
            return False
    return True


def parameter_digest(module: nn.Module, samples: int = 4096) -> str:
    """SHA-256 over every parameter's and buffer's name, shape and dtype and up to ``samples``
    evenly spaced values (all of them for the toy models and the scales; a sample of
    ``samples`` values of each larger weight)."""
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        flat = tensor.detach().reshape(-1)
        if flat.numel() > samples:
            flat = flat[torch.linspace(0, flat.numel() - 1, samples, device=flat.device).long()]
        digest.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        digest.update(flat.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def journal_identity(module: Any, tag: str) -> dict[str, Any]:
    """What the prediction rows of pass ``tag`` of ``module`` (``EvalModule`` / ``SteeringModule``)
    depend on: its hyperparameters less where results go and the headline mode; a digest of a
    local model folder (processor and tokenizer files too) and of the module's parameters and
    buffers as they are now (the weights, whatever loaded them, and any scales: the module's
    own and those a ``NeuronSteeringCallback`` attached); the trainer's precision and
    accelerator; the datamodule's hyperparameters less its worker count, with digests of its
    annotation and split files; the tag. Images are identified by their paths."""
    hparams = without(dict(module.hparams), (*UNUSED_MODEL_KEYS, "metric_mode"))
    data = dict(getattr(trainer_datamodule(module), "hparams", {}) or {})
    trainer = module.trainer
    return {
        "tag": tag,
        "module": type(module).__name__,
        "hparams": hparams,
        "model_identity": model_identity(str(module.hparams.model)),
        "parameters": parameter_digest(module),
        "trainer": {"precision": str(trainer.precision), "accelerator": type(trainer.accelerator).__name__},
        "data": without(data, UNUSED_DATA_KEYS),
        "data_files": data_files(data),
    }


class EvalModule(AdapterHost, EpochScoring, L.LightningModule):
    """Evaluate a model (hub id or local directory) on one task.

    Args:
        model: hub id or local directory of a supported VLM (see ``hones.models``).
        task: vqa | ocr | caption | retrieval.
        metric_mode: the mode reported as the headline metric ("paper" or "official");
            both modes are always computed and logged, each under its own name.
        dtype: fp32 | bf16 | fp16.
        max_new_tokens: greedy generation budget (HONES_METHOD §1 default 24).
        output_dir: where ``metrics_{stage}.json`` and ``predictions_{stage}.jsonl`` go
            (``{task}``, ``{dataset}``, ``{split}`` are filled in; see ``run_dir``).
        adapter_factory: optional callable returning a ready adapter (tests, notebooks).
    """

    def __init__(
        self,
        model: str = "models/toy-llava",
        task: Task = "vqa",
        metric_mode: MetricMode = "paper",
        dtype: DType = "fp32",
        max_new_tokens: int = 24,
        output_dir: str | None = None,
        trust_remote_code: bool = False,
        adapter_factory: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        if metric_mode not in METRIC_MODES:
            raise SettingsError(f"metric_mode must be one of {METRIC_MODES}; got {metric_mode!r}")
        self.save_hyperparameters(ignore=["adapter_factory"])
        self.scorer = TaskScorer(task, max_new_tokens)
        self.metrics = nn.ModuleDict({mode: build_metric(task, mode) for mode in METRIC_MODES})
        self._adapter_factory = adapter_factory
        self.adapter: Any = None
        self._rows: list[dict[str, Any]] = []
        self.results: dict[str, Any] = {}

    def journal_directory(self, tag: str) -> Path | None:
        out = self.run_dir()
        return None if out is None else out / f".journal_{tag}"

    def run_dir(self) -> Path | None:
        """``output_dir`` with ``{task}``, ``{dataset}`` and ``{split}`` filled in (None without one)."""
        if not self.hparams.output_dir:
            return None
        data = getattr(trainer_datamodule(self), "hparams", {}) or {}
        fields = {"task": self.hparams.task, "dataset": data.get("dataset", "data"), "split": data.get("split", "eval")}
        return Path(str(self.hparams.output_dir).format(**fields))

    # -- loop ------------------------------------------------------------------
    def _end(self, stage: str) -> None:
        task = self.hparams.task
        world_size = self.trainer.world_size if self._trainer is not None else 1
        values, rows, self.results = summarize_epoch(
            self.metrics, self._rows, task, self.hparams.model, stage, self.hparams.metric_mode, world_size=world_size,
            **skipped_items(self._trainer),
        )  # fmt: skip
        for mode, value in values.items():
            # every process holds the synchronised value: no further reduction needed
            self.log(f"{stage}/{task}/{self.metrics[mode].name}", value, rank_zero_only=False, sync_dist=False)
        out = self.run_dir()
        if out is not None and self.global_rank == 0:
            io.write_json(out / f"metrics_{stage}.json", self.results)
            io.write_jsonl(out / f"predictions_{stage}.jsonl", rows)
