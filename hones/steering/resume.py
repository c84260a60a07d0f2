"""``FitCheckpoint``: the one resume checkpoint of a steering fit, written atomically.

A §5 fit of a 7B model runs for hours (2 epochs over up to 2000 dev images, 10 000 items
for retrieval). ``FitCheckpoint`` keeps ``<dirpath>/last.ckpt`` up to date so that
``fit(ckpt_path=<dirpath>/last.ckpt)`` (``train.py fit --ckpt_path ...``; ``train.py
compare`` does it by itself) continues where the fit stopped and ends with the scales
an uninterrupted fit gives. It is written

- every ``every_n_steps`` optimiser steps and after the last batch of each training epoch;
- when the fit stops on an exception during training: SIGTERM (preemption, ``scancel``,
  ``timeout``; Lightning stops after the batch in flight), Ctrl+C, or an error. What is
  written then is the state after the last optimiser step, which rank 0 keeps in host
  memory (``keep_step_state``): mid-way through an accumulation window the summed
  gradients are part of no checkpoint, so the resume trains that window's batches again,
  in the same order, and ends with the same scales.

The file is a Lightning checkpoint: only the scales ``s`` of the model (``SteeringModule``
checkpoints its scaler alone), the optimiser and schedule, the loops' progress and the
training loader's position (``hones.data.resumable``). It is written to a temporary name
and renamed, so a kill during the write leaves the previous one whole. It is a local
resume file, not an artifact to share (the scales are exported as JSON and safetensors);
``train.py compare`` loads it with ``weights_only=True``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from hones.attribution.settings import align_to_stored, fingerprint_differences

LAST = "last.ckpt"
TAG_KEY = "hones_fit_tag"  # JSON text of FitCheckpoint.tag


class ResumeSettingsError(ValueError):
    """A resume from a checkpoint written with other settings (the message names them)."""


def _processed(trainer: Trainer) -> int:
    """The batches of the current epoch the fit loop has processed."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


class FitCheckpoint(Callback):
    """Keeps ``<dirpath>/last.ckpt`` (see the module docstring); ``every_n_steps`` 0 writes
    only at epoch ends and when the fit stops. ``tag`` (JSON data, e.g. the settings the fit
    depends on) is stored in the checkpoint, for ``read_tag`` to check before resuming.
    ``keep_step_state``: rank 0 serialises the checkpoint after every optimiser step into host
    memory, to write it if the fit stops before the next save. That is cheap for a steering
    fit (the scales and their optimiser state); turn it off for a module whose checkpoint is
    large, and a stop then writes only at a step boundary, and only on SIGTERM."""

    def __init__(self, dirpath: str | Path, every_n_steps: int = 50, tag: Any = None, keep_step_state: bool = True) -> None:
        if every_n_steps < 0:
            raise ValueError(f"FitCheckpoint: every_n_steps must be >= 0, got {every_n_steps}")
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.tag = tag
        self.keep_step_state = keep_step_state
        self._saved_at: tuple[int, int] | None = None  # (epoch, processed batches) of this fit's last save
        self._step_state: tuple[tuple[int, int], bytes] | None = None  # rank 0: (position, checkpoint) after the last step
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
        if not self._at_step_boundary(trainer):
            return
        step = trainer.global_step
        last = _processed(trainer) == trainer.num_training_batches
        periodic = self.every_n_steps and step and step % self.every_n_steps == 0
        if last or periodic:
            self.save(trainer)
        elif self.keep_step_state and trainer.is_global_zero and self._unsafe_alone(trainer) is None:
            buffer = io.BytesIO()  # serialised now: the live optimiser state changes in place at the next step
            torch.save(trainer._checkpoint_connector.dump_checkpoint(weights_only=False), buffer)
            self._step_state = (self._position(trainer), buffer.getvalue())

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
        self._saved_at = self._step_state = None
        resumed_from = trainer.ckpt_path
        self._resumed = bool(resumed_from) and self.path.is_file() and os.path.samefile(str(resumed_from), self.path)
        if not self._resumed and trainer.is_global_zero and self.path.is_file():
            self.path.unlink()
            rank_zero_info(f"FitCheckpoint: removed {self.path}, left by an earlier fit")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING or not self._started:
            return
        sigterm = isinstance(exception, SIGTERMException)
        what = "SIGTERM" if sigterm else type(exception).__name__
        processed = _processed(trainer)
        epoch_ended = processed == trainer.num_training_batches  # saved at its last batch; may count as ended now
        kept = self.keep_step_state and self._unsafe_alone(trainer) is None  # rank 0 kept every step's state
        if self._write_step_state(trainer):
            if trainer.training:
                rank_zero_info(f"FitCheckpoint: {what}; saved the state after the last optimiser step: {self._last_saved()}")
        elif kept and trainer.training and (self._saved_at is not None or self._resumed):
            rank_zero_info(f"FitCheckpoint: {what}; no optimiser step since the last save: {self._last_saved()}")
        elif sigterm and trainer.training and self._at_step_boundary(trainer) and not epoch_ended:
            unsafe = self._unsafe_alone(trainer)
            if unsafe is None:  # keep_step_state off: the state now is a step's
                self.save(trainer, collective=False)
            else:
                rank_zero_warn(f"FitCheckpoint: SIGTERM save skipped: {unsafe} ({self._last_saved()})")
        elif trainer.training and not epoch_ended and (sigterm or not kept or self._saved_at is None):
            rank_zero_warn(
                f"FitCheckpoint: {what} after batch {processed} of epoch {trainer.current_epoch}; nothing saved "
                f"({self._last_saved()})"
            )
        if not trainer.training:  # validation inside the fit (or its sanity check)
            if self._saved_at == self._position(trainer) and processed:
                then = "continues the training after this validation, without running it again"
            else:
                then = "starts from the last checkpoint"
            rank_zero_warn(
                f"FitCheckpoint: {what} during validation in epoch {trainer.current_epoch}; a resume {then} "
                f"({self._last_saved()})"
            )

    def _write_step_state(self, trainer: Trainer) -> bool:
        """Rank 0: write the state kept after the last optimiser step, if it is newer than the
        last save (alone, no collective: see ``save``). True when written."""
        if self._step_state is None or not trainer.is_global_zero:
            return False
        position, data = self._step_state
        self._step_state = None
        if position == self._saved_at:
            return False
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)  # this process's own bytes
        self._write(trainer, partial=lambda path: trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path))
        self._saved_at = position
        return True

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

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """A resume from a checkpoint whose tag differs from this fit's stops here, naming the
        settings that differ (the scales would be those of neither setting)."""
        if self.tag is None:
            return
        if TAG_KEY not in checkpoint:
            rank_zero_warn(f"FitCheckpoint: {trainer.ckpt_path} carries no settings tag; resuming without checking them")
            return
        saved = json.loads(checkpoint[TAG_KEY])
        tag = align_to_stored(saved, self.tag)
        if saved is not None and saved != tag:
            raise ResumeSettingsError(
                f"{trainer.ckpt_path} was written by a fit with other settings (stored -> now: "
                f"{'; '.join(fingerprint_differences(saved, tag))}); "
                "resume with those settings, or start over without --ckpt_path"
            )

    @staticmethod
    def read_tag(path: str | Path) -> Any:
        """The ``tag`` stored in checkpoint ``path`` (None when it has none); loaded with
        ``weights_only=True``."""
        return FitCheckpoint.tag_of(torch.load(path, map_location="cpu", weights_only=True))

    @staticmethod
    def tag_of(checkpoint: dict[str, Any]) -> Any:
        """The ``tag`` stored in a loaded checkpoint (None when it has none)."""
        return json.loads(checkpoint[TAG_KEY]) if TAG_KEY in checkpoint else None

    @staticmethod
    def _at_step_boundary(trainer: Trainer) -> bool:
        """True when the batches trained so far this epoch have all reached an optimiser step."""
        processed = _processed(trainer)
        return processed % trainer.accumulate_grad_batches == 0 or processed == trainer.num_training_batches

    @staticmethod
    def _position(trainer: Trainer) -> tuple[int, int]:
        """(epoch, batches of it processed): what a checkpoint written now resumes from."""
        return trainer.current_epoch, _processed(trainer)

    def save(self, trainer: Trainer, collective: bool = True) -> None:
        """Write ``last.ckpt`` atomically, once per position. ``collective``: every rank calls this
        at the same batch (Lightning's save, which ends with a barrier; rank 0 writes); otherwise
        rank 0 writes alone, without any collective (a SIGTERM reaches ranks at different batches,
        and a barrier there could wait forever). Under DDP rank 0's state is every rank's."""
        position = self._position(trainer)
        if position == self._saved_at:
            return
        if collective:
            self._write(trainer, partial=lambda path: trainer.save_checkpoint(path, weights_only=False), collective=True)
        else:
            # Trainer.save_checkpoint without its barrier (a sharded strategy would need every rank here)
            self._write(trainer, partial=lambda path: trainer.strategy.checkpoint_io.save_checkpoint(
                trainer._checkpoint_connector.dump_checkpoint(weights_only=False), path))  # fmt: skip
        self._saved_at = position
        self._step_state = None

    def _write(self, trainer: Trainer, partial: Callable[[Path], None], collective: bool = False) -> None:
        """``partial(path)`` writes the checkpoint to a temporary name, which rank 0 renames to
        ``last.ckpt``: a kill while writing leaves the previous one whole. ``collective``: every
        rank calls ``partial`` (``Trainer.save_checkpoint``, which ends with a barrier), else rank 0 alone."""
        path = self.dirpath / f".{LAST}.partial"
        if trainer.is_global_zero:
            self.dirpath.mkdir(parents=True, exist_ok=True)
        if collective or trainer.is_global_zero:
            partial(path)
        if trainer.is_global_zero:
            os.replace(path, self.path)


__all__ = ["FitCheckpoint", "LAST", "ResumeSettingsError"]
