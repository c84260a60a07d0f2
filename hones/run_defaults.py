"""What every Trainer that hones builds gets besides the user's callbacks.

- a progress bar that shows in a log file too (``hones.progress.log_progress_bar``);
- ``HeapTrim`` (``hones.heap``), which keeps a long CPU pass's resident memory flat;
- ``StopOnSigterm`` (``hones.sigterm``), which lets SIGTERM stop a predict pass.

``default_callbacks`` is for Trainers built in code (``analyze.py`` and the scripts,
``train.py compare``); ``HonesCLI`` is the ``LightningCLI`` of ``evaluate.py``,
``train.py`` and the toy-model trainer. A user's own instance of any of them stands.
"""

from __future__ import annotations

from typing import Any, Sequence

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI

from hones.heap import HeapTrim
from hones.progress import log_progress_bar
from hones.sigterm import StopOnSigterm


def default_callbacks(callbacks: Sequence[Any] | None, enable_progress_bar: bool | None) -> list[Callback]:
    """The callbacks to append to ``callbacks``: ``HeapTrim()`` and ``StopOnSigterm()`` unless
    ``callbacks`` hold one, and ``log_progress_bar``'s bar."""
    callbacks = list(callbacks or [])
    extra: list[Callback] = [
        default() for default in (HeapTrim, StopOnSigterm) if not any(isinstance(c, default) for c in callbacks)
    ]
    return extra + log_progress_bar(callbacks, enable_progress_bar)


class HonesCLI(LightningCLI):
    """``LightningCLI`` whose Trainer also gets ``default_callbacks``."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The usual Trainer, plus ``default_callbacks``."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config.get("trainer") or {}
        callbacks = kwargs.get("callbacks", trainer_config.get("callbacks"))
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        enabled = kwargs.get("enable_progress_bar", trainer_config.get("enable_progress_bar"))
        kwargs["callbacks"] = [*callbacks, *default_callbacks(callbacks, enabled)]
        return super().instantiate_trainer(**kwargs)
