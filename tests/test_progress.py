"""Progress bars in log files (``hones.progress``): TQDM where Rich would draw nothing."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

from hones.progress import REFRESH_BATCHES, log_progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_log_progress_bar_only_off_a_terminal() -> None:
    (bar,) = log_progress_bar([], True, stream=io.StringIO())
    assert isinstance(bar, TQDMProgressBar) and bar.refresh_rate == REFRESH_BATCHES
    assert log_progress_bar([], None, stream=io.StringIO()) != []  # Lightning's default is on
    assert log_progress_bar([], True, stream=_Terminal()) == []
    assert log_progress_bar([], False, stream=io.StringIO()) == []
    assert log_progress_bar([RichProgressBar()], True, stream=io.StringIO()) == []  # the user's bar stands


def test_trainer_with_the_log_bar_has_one_progress_bar() -> None:
    callbacks = log_progress_bar([], True, stream=io.StringIO())
    trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=callbacks, enable_checkpointing=False)
    bars = [c for c in trainer.callbacks if isinstance(c, ProgressBar)]
    assert len(bars) == 1 and type(bars[0]) is TQDMProgressBar


def test_evaluate_cli_writes_progress_to_a_log_file(tmp_path: Path) -> None:
    """``evaluate.py`` with stdout to a file: the TQDM bar's lines are in the file (Rich writes none mid-pass)."""
    repo = Path(__file__).resolve().parents[1]
    script = (
        "import sys\n"
        "from hones.progress import ProgressCLI\n"
        "from lightning.pytorch.demos.boring_classes import BoringModel, BoringDataModule\n"
        "cli = ProgressCLI(BoringModel, BoringDataModule, args=['validate', '--trainer.logger', 'false',"
        " '--trainer.limit_val_batches', '30', '--trainer.accelerator', 'cpu'])\n"
        "print('bar:', type(cli.trainer.progress_bar_callback).__name__)\n"
    )
    log = tmp_path / "run.log"
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, timeout=120,
            env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    assert "bar: TQDMProgressBar" in text
    assert f"{REFRESH_BATCHES}/30" in text.replace(" ", "")  # an intermediate refresh, not only the end
