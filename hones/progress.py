"""Progress bars that show in a log file too.

Lightning 2.6 draws its default progress bar with Rich when Rich is installed. Rich draws
nothing while its output is not a terminal (a batch job's log, ``> run.log``): the bar
appears once, finished, when the pass ends. So a 30-minute attribution pass under SLURM
shows no progress at all. When stdout is not a terminal we give the Trainer Lightning's
``TQDMProgressBar`` instead, refreshed every ``REFRESH_BATCHES`` batches, so that
``tail -f run.log`` shows how far a pass is. On a terminal nothing changes.

``log_progress_bar`` gives the callback to add; ``hones.run_defaults`` adds it to every
Trainer that hones builds.
"""

from __future__ import annotations

import sys
from typing import IO, Any, Sequence

from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar

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
