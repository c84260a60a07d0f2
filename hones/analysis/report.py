"""Where the analyses' outputs go: one run directory, every figure as PNG *and* as a
TensorBoard image, every table as JSON *and* markdown (also as TensorBoard text).

Layout under ``out_dir``::

    figures/<name>.png          one PNG per figure
    tables/<name>.json          the table's data (self-describing JSON)
    tables/<name>.md            the same table rendered as GitHub markdown
    tensorboard/events.out.*    images under tag ``figures/<name>``, tables under ``tables/<name>``

Figures are ``matplotlib.figure.Figure`` objects built without pyplot, so nothing here
changes the process's matplotlib backend (PNG rendering goes through Agg). Every file is
written atomically (``hones.io``); a rerun first removes the previous run's figures, tables,
``analysis.json`` and event files, so the folder never mixes two runs (TensorBoard shows one).
"""

from __future__ import annotations

import io as _bytes_io
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from hones import io

FIGURE_DPI = 120


def new_figure(width: float, height: float) -> Figure:
    """A pyplot-free figure of ``width`` x ``height`` inches with a constrained layout."""
    return Figure(figsize=(width, height), layout="constrained")


def figure_png_bytes(figure: Figure, dpi: int = FIGURE_DPI) -> bytes:
    """The figure rendered as PNG bytes (Agg)."""
    buffer = _bytes_io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class AnalysisReport:
    """Writes figures and tables of one analysis run (see the module docstring).

    Use as a context manager (or call :meth:`close`) so the TensorBoard writer is flushed.
    ``figures`` / ``tables`` record what was written: name -> path(s) relative to ``out_dir``.
    """

    def __init__(self, out_dir: str | os.PathLike[str], tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # a rerun replaces the folder's results: none of an earlier run stays beside a new (or failed) one
        stale = [*self.out_dir.glob("figures/*.png"), *self.out_dir.glob("tables/*.json"), *self.out_dir.glob("tables/*.md")]
        for old in [*stale, self.out_dir / "analysis.json"]:
            old.unlink(missing_ok=True)
        self.figures: dict[str, str] = {}
        self.tables: dict[str, dict[str, str]] = {}
        self.writer: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self.out_dir / "tensorboard"
            if log_dir.is_dir():
                for old in log_dir.glob("events.out.tfevents.*"):
                    old.unlink()
            self.writer = SummaryWriter(log_dir=str(log_dir))

    # -- figures -----------------------------------------------------------------------
    def add_figure(self, name: str, figure: Figure) -> Path:
        """Save ``figure`` as ``figures/<name>.png`` and as TensorBoard image ``figures/<name>``."""
        png = figure_png_bytes(figure)
        path = io.write_bytes(self.out_dir / "figures" / f"{name}.png", png)
        if self.writer is not None:  # the very pixels of the PNG (rendered once), as an RGB image
            with Image.open(_bytes_io.BytesIO(png)) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"figures/{name}", pixels, global_step=0, dataformats="HWC")
        self.figures[name] = str(path.relative_to(self.out_dir))
        return path

    # -- tables ------------------------------------------------------------------------
    def add_table(self, name: str, data: Any, markdown: str) -> tuple[Path, Path]:
        """Write ``tables/<name>.json`` (``data``) and ``tables/<name>.md`` (``markdown``);
        the markdown also goes to TensorBoard as text ``tables/<name>``."""
        json_path = io.write_json(self.out_dir / "tables" / f"{name}.json", data)
        md_path = io.write_text(self.out_dir / "tables" / f"{name}.md", markdown)
        if self.writer is not None:
            self.writer.add_text(f"tables/{name}", markdown, global_step=0)
        self.tables[name] = {
            "json": str(json_path.relative_to(self.out_dir)),
            "markdown": str(md_path.relative_to(self.out_dir)),
        }
        return json_path, md_path

    # -- lifetime ----------------------------------------------------------------------
    def close(self) -> None:
        """Flush and close the TensorBoard writer (idempotent)."""
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None

    def __enter__(self) -> AnalysisReport:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
