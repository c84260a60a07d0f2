"""Mid-split checkpoints of the attribution accumulators, to resume an interrupted pass.

Every accumulator of the attribution callbacks is a torchmetrics ``Metric`` whose states
are running sums (tensors; list states for a few metrics). ``save_metric_states`` writes
the states of every ``Metric`` inside a module to safetensors (no pickle, atomic),
``load_metric_states`` puts them back. Because the sums are restored exactly and the
remaining batches are added in the same order, a resumed pass gives bit-identical sums.

``AccumulatorCheckpoint`` wires this to a loop: placed *after* an attribution callback
in the Trainer's callback list, it

- ``on_*_epoch_start``: if ``<path stem>.rank<r>.safetensors`` exists and was written
  for the same fingerprint and world size, restores the callback's accumulators from it
  and sets ``callback.skip_batches`` so that the batches already summed are ignored;
- ``on_*_batch_end``: every ``every_n_batches`` batches writes this rank's local
  states (no collective: ranks save independently);
- ``on_exception``: a SIGTERM stop (``SIGTERMException``: ``hones.sigterm.StopOnSigterm``
  in a predict pass, exit code 143; Lightning itself in validation and test) ends the pass
  between two batches, so the states then hold exactly the batches seen; they are written at
  once, and a resume loses no batch, whatever the period (unless it is 0: no checkpoints).
  A cluster's preemption notice is a SIGTERM.

One dataloader per pass: the batch counts are per dataloader (``batch_idx``), so a pass
with several is refused.

Files are per rank (each rank's sums are local until ``compute`` synchronises them),
so a resume needs the same world size; otherwise the partial state is discarded with a
warning and the pass starts over. ``clear()`` removes the files once the stage is done.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from hones import io
from hones.attribution.settings import matches_stored

_LAYOUT_KEY = "layout"


# -- plain functions ------------------------------------------------------------------------
def metric_modules(root: nn.Module, prefix: str = "") -> dict[str, Metric]:
    """Every torchmetrics ``Metric`` inside ``root`` (itself included), by dotted path."""
    found: dict[str, Metric] = {}
    for name, module in root.named_modules():
        if isinstance(module, Metric):
            found[".".join(part for part in (prefix, name) if part)] = module
    return found


def collect_metric_states(
    roots: dict[str, nn.Module], concatenate_lists: bool = True
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The states of every Metric under ``roots`` as flat tensors plus a JSON layout.

    Returns ``(tensors, layout)``: tensor states under ``"<path>/<state>"``; a list state
    reduced by ``"cat"`` (``dist_reduce_fx="cat"``) whose elements share dtype and trailing
    shape, concatenated along dim 0 under ``"<path>/<state>"`` and restored as a one-element
    list (torchmetrics does the same to such states before it syncs them across processes,
    so a metric must already accept it); any other list state element by element under
    ``"<path>/<state>/<i>"``. ``layout`` maps each metric path to ``{"update_count": n,
    "states": {state: "tensor" | "cat" | number of list elements}}``.

    Concatenating matters for long passes: a list state (NDCG's candidates) gains one element
    per batch, and writing those one by one made every checkpoint cost time proportional to
    the batches so far (7.1 s instead of 0.65 s at batch 3,125 of a pass with 11 NDCG metrics;
    ``benchmarks/checkpoint_cost.py``).
    ``concatenate_lists=False`` writes every list state element by element (the layout
    before; kept for that benchmark).
    """
    tensors: dict[str, Tensor] = {}
    layout: dict[str, Any] = {}
    for root_name, root in roots.items():
        for path, metric in metric_modules(root, root_name).items():
            states: dict[str, Any] = {}
            for state in metric._defaults:  # noqa: SLF001 - torchmetrics' registry of add_state names
                value = getattr(metric, state)
                if isinstance(value, Tensor):
                    tensors[f"{path}/{state}"] = value.detach().cpu().clone()
                    states[state] = "tensor"
                elif isinstance(value, list):
                    elements = [torch.as_tensor(element).detach() for element in value]
                    if concatenate_lists and metric._reductions.get(state) is dim_zero_cat and _concatenable(elements):  # noqa: SLF001
                        tensors[f"{path}/{state}"] = dim_zero_cat(elements).cpu()
                        states[state] = "cat"
                    else:
                        for k, element in enumerate(elements):
                            tensors[f"{path}/{state}/{k}"] = element.cpu().clone()
                        states[state] = len(elements)
                else:
                    raise TypeError(f"{path}.{state}: cannot checkpoint a {type(value).__name__} metric state")
            layout[path] = {"update_count": int(metric._update_count), "states": states}  # noqa: SLF001
    return tensors, layout


def _concatenable(elements: list[Tensor]) -> bool:
    """True when ``elements`` (at least one) share dtype, device and shape past dim 0 (0-d counts as ``[1]``,
    as in ``dim_zero_cat``)."""
    if not elements:
        return False
    first = elements[0]
    tail = tuple(first.shape[1:]) if first.dim() else ()
    return all(
        e.dtype == first.dtype and e.device == first.device and (tuple(e.shape[1:]) if e.dim() else ()) == tail
        for e in elements
    )


def restore_metric_states(roots: dict[str, nn.Module], tensors: dict[str, Tensor], layout: dict[str, Any]) -> None:
    """Inverse of ``collect_metric_states``: the layouts must match metric for metric."""
    metrics = {path: metric for name, root in roots.items() for path, metric in metric_modules(root, name).items()}
    if set(metrics) != set(layout):
        raise ValueError(f"checkpoint holds metrics {sorted(layout)}, the accumulators have {sorted(metrics)}")
    for path, metric in metrics.items():
        entry = layout[path]
        if set(entry["states"]) != set(metric._defaults):  # noqa: SLF001
            raise ValueError(f"{path}: checkpoint states {sorted(entry['states'])} != {sorted(metric._defaults)}")  # noqa: SLF001
        for state, kind in entry["states"].items():
            current = getattr(metric, state)
            if kind == "tensor":
                saved = tensors[f"{path}/{state}"]
                if saved.shape != current.shape or saved.dtype != current.dtype:
                    raise ValueError(f"{path}.{state}: checkpoint {saved.dtype}{list(saved.shape)} != {current.dtype}{list(current.shape)}")
                setattr(metric, state, saved.to(current.device))
            elif kind == "cat":  # one element holding every row: what dim_zero_cat would give
                setattr(metric, state, [tensors[f"{path}/{state}"].to(metric.device)])
            else:
                device = metric.device
                setattr(metric, state, [tensors[f"{path}/{state}/{k}"].to(device) for k in range(int(kind))])
        metric._update_count = int(entry["update_count"])  # noqa: SLF001
        metric._computed = None  # noqa: SLF001


def save_metric_states(
    path: str | os.PathLike, roots: dict[str, nn.Module], metadata: dict[str, Any], concatenate_lists: bool = True
) -> Path:
    """Write the states of every Metric under ``roots`` and ``metadata`` (JSON-able) atomically
    (``concatenate_lists``: see ``collect_metric_states``)."""
    tensors, layout = collect_metric_states(roots, concatenate_lists)
    meta = {key: json.dumps(value) for key, value in metadata.items()}
    meta[_LAYOUT_KEY] = json.dumps(layout)
    return io.save_tensors(path, tensors, meta)


def read_metric_states(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """``(tensors, layout, metadata)`` of a file written by ``save_metric_states``."""
    meta = {key: json.loads(value) for key, value in io.tensors_metadata(path).items()}
    layout = meta.pop(_LAYOUT_KEY, {})
    return io.load_tensors(path), layout, meta


# -- the callback -----------------------------------------------------------------------------
class AccumulatorCheckpoint(Callback):
    """Periodic per-rank checkpoints of an attribution callback's accumulators (see module docstring).

    Args:
        target: the attribution callback (``HeadLocalizationCallback`` /
            ``NeuronAttributionCallback`` / ``MaskingVerificationCallback``); must come
            before this callback in the Trainer's list.
        path: file stem, e.g. ``run_dir/partial/neurons`` (``.rank<r>.safetensors`` is appended).
        every_n_batches: checkpoint period in batches (per rank); 0 disables saving
            (an existing checkpoint is still restored).
        fingerprint: anything JSON-able that identifies the computation (the stage's
            settings); a checkpoint written for another fingerprint is discarded.
    """

    def __init__(self, target: Any, path: str | os.PathLike, every_n_batches: int, fingerprint: Any = None) -> None:
        if every_n_batches < 0:
            raise ValueError(f"every_n_batches must be >= 0; got {every_n_batches}")
        self.target = target
        self.stem = Path(path)
        self.every_n_batches = int(every_n_batches)
        self.fingerprint = json.loads(json.dumps(fingerprint))
        self.resumed_from = 0
        self._seen = 0
        self._saved = 0  # batches held by the file on disk
        self._in_pass: str | None = None  # the loop between its epoch start and end: "predict", "test", "validation"

    def file(self, rank: int) -> Path:
        """This stem's checkpoint file of process ``rank``."""
        return self.stem.with_name(f"{self.stem.name}.rank{rank}.safetensors")

    def clear(self, world_size: int | None = None) -> None:
        """Remove every rank's file (all ``rank*`` files of the stem when ``world_size`` is None)."""
        if world_size is None:
            files = list(self.stem.parent.glob(f"{self.stem.name}.rank*.safetensors")) if self.stem.parent.is_dir() else []
        else:
            files = [self.file(rank) for rank in range(world_size)]
        for file in files:
            file.unlink(missing_ok=True)

    # hooks
    def _target_active(self) -> bool:
        return bool(getattr(self.target, "_active", True))

    def _start(self, trainer: L.Trainer, loop: str) -> None:
        self.resumed_from = self._seen = self._saved = 0
        self._in_pass = None
        if not self._target_active():
            return
        self._in_pass = loop
        loaders = len(self._loop(trainer).max_batches)
        if loaders > 1:
            raise ValueError(f"AccumulatorCheckpoint counts the batches of one dataloader; this {loop} pass has {loaders}")
        file = self.file(trainer.global_rank)
        if not file.is_file():
            return
        tensors, layout, meta = read_metric_states(file)
        if not matches_stored(meta.get("fingerprint"), self.fingerprint) or meta.get("world_size") != trainer.world_size:
            rank_zero_warn(f"{file}: written for other settings or another world size; starting the pass over")
            return
        roots = self.target.accumulators()
        if not roots:
            raise RuntimeError(f"{type(self.target).__name__} has no accumulator at epoch start; give it task=...")
        restore_metric_states(roots, tensors, layout)
        self.resumed_from = self._seen = self._saved = int(meta["batches"])
        self.target.skip_batches = self.resumed_from
        rank_zero_info(f"hones: resuming from {file.name} after {self.resumed_from} batches")

    def _save(self, trainer: L.Trainer) -> None:
        metadata = {"batches": self._seen, "world_size": trainer.world_size, "fingerprint": self.fingerprint}
        save_metric_states(self.file(trainer.global_rank), self.target.accumulators(), metadata)
        self._saved = self._seen

    def _batch_end(self, trainer: L.Trainer, batch_idx: int) -> None:
        if batch_idx < self.resumed_from or not self._target_active():
            return
        self._seen = batch_idx + 1
        if self.every_n_batches and self._seen % self.every_n_batches == 0:
            self._save(trainer)

    def _loop(self, trainer: L.Trainer) -> Any:
        """Lightning's loop of the pass in progress (``self._in_pass`` is set)."""
        if self._in_pass == "predict":
            return trainer.predict_loop
        if self._in_pass == "test":
            return trainer.test_loop
        fitting = trainer.state.fn == TrainerFn.FITTING  # fit sets `validating` too, so ask the entry point
        return trainer.fit_loop.epoch_loop.val_loop if fitting else trainer.validate_loop

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """On a SIGTERM stop within the pass, write the batches summed so far (see the module docstring)."""
        if not isinstance(exception, SIGTERMException) or self._in_pass is None or not self.every_n_batches:
            return
        if self._seen <= self._saved:
            return
        stepped = int(self._loop(trainer).batch_progress.current.processed)  # batches whose step has run
        if stepped != self._seen:  # stopped inside a batch's hooks, before this callback's: the sums may hold it
            warnings.warn(
                f"[rank {trainer.global_rank}] {self.file(trainer.global_rank)}: stopped by SIGTERM inside batch "
                f"{stepped} (checkpoint at {self._seen}); the batches since the last checkpoint ({self._saved}) are "
                "not saved. Put StopOnSigterm after AccumulatorCheckpoint in the Trainer's callbacks",
                stacklevel=2,
            )
            return
        self._save(trainer)
        print(f"hones: SIGTERM: saved {self.file(trainer.global_rank).name} after {self._seen} batches", file=sys.stderr)

    def _end(self) -> None:
        self._in_pass = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._start(trainer, "validation")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        if not trainer.sanity_checking:
            self._batch_end(trainer, batch_idx)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._end()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, "test")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self._batch_end(trainer, batch_idx)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end()

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, "predict")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self._batch_end(trainer, batch_idx)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end()
