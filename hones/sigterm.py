"""Stop a predict pass on SIGTERM, as Lightning's fit and evaluation loops do.

Lightning 2.6 takes SIGTERM over (``trainer.received_sigterm``) and its fit, validation
and test loops stop on it, but its predict loop never checks the flag, so ``kill <pid>``
or ``timeout`` did not stop an ``analyze.py`` pass (every attribution and masking pass is
a predict pass). ``StopOnSigterm`` raises Lightning's ``SIGTERMException`` with exit code
143 (128 + SIGTERM) after the batch in flight; callbacks get ``on_exception`` as with the
other loops, and the run resumes from its last mid-split checkpoint.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

EXIT_CODE = 128 + int(signal.SIGTERM)


class StopOnSigterm(Callback):
    """Raises ``SIGTERMException(143)`` after a predict batch once the Trainer has received SIGTERM."""

    def on_predict_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if getattr(trainer, "received_sigterm", False):
            raise SIGTERMException(EXIT_CODE)


@contextmanager
def sigterm_exit_status() -> Iterator[None]:
    """Exit with 143 when SIGTERM stopped a Trainer run inside the block.

    Lightning's fit, validation and test loops stop on SIGTERM by raising ``SIGTERMException()``,
    a ``SystemExit`` without a code, so ``train.py fit`` or ``evaluate.py`` cut off by a
    preemption exited 0, as if it had finished. The command lines wrap their work in this.
    """
    try:
        yield
    except SIGTERMException as stop:
        if stop.code in (None, 0):
            raise SIGTERMException(EXIT_CODE) from stop
        raise
