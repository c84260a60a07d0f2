"""Progress bars that show in a log file too.

Lightning 2.6 draws its default progress bar with Rich when Rich is installed. Rich draws
nothing while its output is not a terminal (a batch job's log, ``> run.log``): the bar
appears once, finished, when the pass ends. So a 30-minute attribution pass under SLURM
shows no progress at all. When stdout is not a terminal we give the Trainer Lightning's
``TQDMProgressBar`` instead, refreshed every ``REFRESH_BATCHES`` batches, so that
``tail -f run.log`` shows how far a pass is. On a terminal nothing changes.

- ``log_progress_bar``: the callbacks to add to a Trainer built in code.
- ``ProgressCLI``: a ``LightningCLI`` that does the same for its Trainer.
"""

from __future__ import annotations

import sys
from typing import IO, Any, Sequence

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI

REFRESH_BATCHES = 10


def log_progress_bar(callbacks: Sequence[Any] | None, enabled: bool | None, stream: IO[str] | None = None) -> list[Callback]:
    """``[TQDMProgressBar(refresh_rate=REFRESH_BATCHES)]`` when ``stream`` (default stdout) is not a
    terminal, else ``[]``; also ``[]`` when the bar is disabled (``enabled is False``) or ``callbacks``
    already hold a progress bar (the user's choice stands)."""
    stream = sys.stdout if stream is None else stream
    if enabled is False or any(isinstance(c, ProgressBar) for c in callbacks or []):
        return []
    is_terminal = getattr(stream, "isatty", None)
    if is_terminal is not None and is_terminal():
        return []
    return [TQDMProgressBar(refresh_rate=REFRESH_BATCHES)]


class ProgressCLI(LightningCLI):
    """``LightningCLI`` whose Trainer gets ``log_progress_bar``'s bar when stdout is not a terminal."""

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The usual Trainer, plus a log-file progress bar where Rich would draw nothing."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config.get("trainer") or {}
        callbacks = kwargs.get("callbacks", trainer_config.get("callbacks"))
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        enabled = kwargs.get("enable_progress_bar", trainer_config.get("enable_progress_bar"))
        extra = log_progress_bar(callbacks, enabled)
        if extra:
            kwargs["callbacks"] = [*callbacks, *extra]
        return super().instantiate_trainer(**kwargs)
