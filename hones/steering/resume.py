"""``FitCheckpoint``: the one resume checkpoint of a steering fit, written atomically.

A §5 fit of a 7B model runs for hours (2 epochs over up to 2000 dev images, 10 000 items
for retrieval). ``FitCheckpoint`` keeps ``<dirpath>/last.ckpt`` up to date so that
``fit(ckpt_path=<dirpath>/last.ckpt)`` (``train.py fit --ckpt_path ...``; ``train.py
compare`` does it by itself) continues where the fit stopped and ends with the scales
an uninterrupted fit gives. It is written

- every ``every_n_steps`` optimiser steps and after the last batch of each training epoch;
- when SIGTERM stops the fit (preemption, ``scancel``, ``timeout``; Lightning stops
  after the batch in flight), if no gradient is being accumulated then. Mid-way through
  an accumulation window the summed gradients are not part of any checkpoint, so nothing
  is written and the resume starts from the last periodic checkpoint (a warning says so).

The file is a Lightning checkpoint: only the scales ``s`` of the model (``SteeringModule``
checkpoints its scaler alone), the optimiser and schedule, the loops' progress and the
training loader's position (``hones.data.resumable``). It is written to a temporary name
and renamed, so a kill during the write leaves the previous one whole. It is a local
resume file, not an artifact to share (the scales are exported as JSON and safetensors);
``train.py compare`` loads it with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

LAST = "last.ckpt"
TAG_KEY = "hones_fit_tag"  # JSON text of FitCheckpoint.tag


def _processed(trainer: Trainer) -> int:
    """The batches of the current epoch the fit loop has processed."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


class FitCheckpoint(Callback):
    """Keeps ``<dirpath>/last.ckpt`` (see the module docstring); ``every_n_steps`` 0 writes
    only at epoch ends and on SIGTERM. ``tag`` (JSON data, e.g. the settings the fit depends
    on) is stored in the checkpoint, for ``read_tag`` to check before resuming."""

    def __init__(self, dirpath: str | Path, every_n_steps: int = 50, tag: Any = None) -> None:
        if every_n_steps < 0:
            raise ValueError(f"FitCheckpoint: every_n_steps must be >= 0, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.tag = tag
        self._saved_at: tuple[int, int] | None = None  # (epoch, processed batches) of this fit's last save
        self._resumed = False  # this fit started from self.path
        self._started = False  # _start has run for the current fit

    @property
    def path(self) -> Path:
        """Where the checkpoint is kept: ``<dirpath>/last.ckpt``."""
        return self.dirpath / LAST

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The epoch's end is saved here, at its last batch, not in on_train_epoch_end: Lightning
        # restores an epoch it counts as finished without the loader's state, and the next
        # epoch's order would then not be the one an uninterrupted fit draws.
        step = trainer.global_step
        last = _processed(trainer) == trainer.num_training_batches
        periodic = self.every_n_steps and step and step % self.every_n_steps == 0
        if (last or periodic) and self._at_step_boundary(trainer):
            self.save(trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = False

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer)

    def _start(self, trainer: Trainer) -> None:
        """Once per fit, after any checkpoint has been restored (the sanity check, else the training).
        A fit not resumed from this folder's checkpoint makes it stale: it is removed, so that a
        stop before this fit's first save leaves nothing to resume by mistake."""
        if self._started:
            return
        self._started = True
        self._saved_at = None
        resumed_from = trainer.ckpt_path
        self._resumed = bool(resumed_from) and self.path.is_file() and os.path.samefile(str(resumed_from), self.path)
        if not self._resumed and trainer.is_global_zero and self.path.is_file():
            self.path.unlink()
            rank_zero_info(f"FitCheckpoint: removed {self.path}, left by an earlier fit")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        processed = _processed(trainer)
        if not trainer.training:  # validation inside the fit (or its sanity check)
            if self._saved_at == (trainer.current_epoch, processed) and processed:
                then = "continues the training after this validation, without running it again"
            else:
                then = "starts from the last checkpoint"
            rank_zero_warn(
                f"FitCheckpoint: SIGTERM during validation in epoch {trainer.current_epoch}; nothing saved, a resume "
                f"{then} ({self._last_saved()})"
            )
            return
        if processed == trainer.num_training_batches:
            return  # the epoch's last batch was saved in on_train_batch_end; the epoch may count as ended now
        if self._at_step_boundary(trainer):
            unsafe = self._unsafe_alone(trainer)
            if unsafe is None:
                self.save(trainer, collective=False)
            else:
                rank_zero_warn(f"FitCheckpoint: SIGTERM save skipped: {unsafe} ({self._last_saved()})")
            return
        rank_zero_warn(
            f"FitCheckpoint: SIGTERM came after batch {processed} of epoch {trainer.current_epoch}, inside an "
            f"accumulation window of {trainer.accumulate_grad_batches} batches; nothing saved ({self._last_saved()})"
        )

    @staticmethod
    def _unsafe_alone(trainer: Trainer) -> str | None:
        """Why rank 0 cannot write a checkpoint alone here (None: it can). A sharded strategy or
        optimiser gathers state from every rank, and an asynchronous writer would still be
        writing when the file is renamed."""
        strategy = trainer.strategy
        if type(strategy) not in (SingleDeviceStrategy, DDPStrategy):
            return f"{type(strategy).__name__} may gather state from every rank"
        if any(hasattr(optimizer, "consolidate_state_dict") for optimizer in trainer.optimizers):
            return "a sharded optimiser gathers state from every rank"
        if isinstance(strategy.checkpoint_io, AsyncCheckpointIO):
            return "an asynchronous checkpoint writer"
        return None

    def _last_saved(self) -> str:
        """Where a resume would start from, in words."""
        if self._saved_at is not None:
            epoch, batches = self._saved_at
            return f"{self.path} holds epoch {epoch} after batch {batches}"
        if self._resumed:
            return f"{self.path} is still the checkpoint this fit resumed from"
        return "this fit has saved no checkpoint yet, so a rerun starts over"

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[TAG_KEY] = json.dumps(self.tag, sort_keys=True)

    @staticmethod
    def read_tag(path: str | Path) -> Any:
        """The ``tag`` stored in checkpoint ``path`` (None when it has none); loaded with
        ``weights_only=True``."""
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        return json.loads(checkpoint[TAG_KEY]) if TAG_KEY in checkpoint else None

    @staticmethod
    def _at_step_boundary(trainer: Trainer) -> bool:
        """True when the batches trained so far this epoch have all reached an optimiser step."""
        processed = _processed(trainer)
        return processed % trainer.accumulate_grad_batches == 0 or processed == trainer.num_training_batches

    def save(self, trainer: Trainer, collective: bool = True) -> None:
        """Write ``last.ckpt`` atomically, once per position. ``collective``: every rank calls this
        at the same batch (Lightning's save, which ends with a barrier; rank 0 writes); otherwise
        rank 0 writes alone, without any collective (a SIGTERM reaches ranks at different batches,
        and a barrier there could wait forever). Under DDP rank 0's state is every rank's."""
        position = (trainer.current_epoch, _processed(trainer))
        if position == self._saved_at:
            return
        partial = self.dirpath / f".{LAST}.partial"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        if collective:
            trainer.save_checkpoint(partial, weights_only=False)  # ends with a barrier: complete on rank 0
        elif trainer.is_global_zero:
            # Trainer.save_checkpoint without its barrier (a sharded strategy would need every rank here)
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, partial)
        if trainer.is_global_zero:
            os.replace(partial, self.path)
        self._saved_at = position


__all__ = ["FitCheckpoint", "LAST"]
