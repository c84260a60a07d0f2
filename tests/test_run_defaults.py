"""What every hones Trainer gets (``hones.run_defaults``): a progress bar that shows in log
files (``hones.progress``) and heap trimming (``hones.heap``)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar

import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

import hones.heap
from hones.heap import HeapTrim, trim_heap
from hones.progress import REFRESH_BATCHES, log_progress_bar
from hones.run_defaults import default_callbacks


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


def test_cli_writes_progress_to_a_log_file_and_trims_the_heap(tmp_path: Path) -> None:
    """``HonesCLI`` with stdout to a file: the TQDM bar's lines are in the file (Rich writes none
    mid-pass), and the Trainer has one ``HeapTrim``."""
    repo = Path(__file__).resolve().parents[1]
    script = (
        "import sys\n"
        "from hones.run_defaults import HonesCLI\n"
        "from lightning.pytorch.demos.boring_classes import BoringModel, BoringDataModule\n"
        "cli = HonesCLI(BoringModel, BoringDataModule, args=['validate', '--trainer.logger', 'false',"
        " '--trainer.limit_val_batches', '30', '--trainer.accelerator', 'cpu'])\n"
        "heap = sum(type(c).__name__ == 'HeapTrim' for c in cli.trainer.callbacks)\n"
        "print('bar:', type(cli.trainer.progress_bar_callback).__name__, 'heap:', heap)\n"
    )
    log = tmp_path / "run.log"
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, timeout=120,
            env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
    text = log.read_text()
    assert done.returncode == 0, text[-2000:]
    assert "bar: TQDMProgressBar heap: 1" in text
    assert f"{REFRESH_BATCHES}/30" in text.replace(" ", "")  # an intermediate refresh, not only the end


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_trim_heap_runs_on_linux() -> None:
    assert trim_heap() is True


def test_heap_trim_every_n_batches_in_every_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(hones.heap, "trim_heap", lambda: calls.append(1) or True)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[HeapTrim(every_n_batches=4)], max_epochs=1, limit_train_batches=9, limit_val_batches=8,
        limit_predict_batches=12, num_sanity_val_steps=0,
    )  # fmt: skip
    model = BoringModel()
    trainer.fit(model)
    assert len(calls) == 2 + 2  # train batches 4 and 8, validation batches 4 and 8
    trainer.predict(model, return_predictions=False)
    assert len(calls) == 4 + 3
    with pytest.raises(ValueError, match="every_n_batches must be >= 1"):
        HeapTrim(every_n_batches=0)


def test_default_callbacks_keep_the_users_own() -> None:
    file = io.StringIO()
    added = default_callbacks([], True)
    assert sum(isinstance(c, HeapTrim) for c in added) == 1
    own = HeapTrim(every_n_batches=1000)
    assert not any(isinstance(c, HeapTrim) for c in default_callbacks([own], True))
    assert log_progress_bar([], False, stream=file) == [] and not any(
        isinstance(c, ProgressBar) for c in default_callbacks([], False)
    )


@pytest.mark.usefixtures("sigterm_restored")
def test_sigterm_stops_a_predict_pass() -> None:
    """Lightning's predict loop ignores SIGTERM; with ``StopOnSigterm`` the pass ends after the batch
    in flight, exit code 143, and callbacks get ``on_exception``."""
    import os
    import signal

    from lightning.pytorch.callbacks import Callback

    from hones.sigterm import EXIT_CODE, StopOnSigterm

    class Terminate(Callback):
        def __init__(self) -> None:
            self.seen: list[int] = []
            self.exception: BaseException | None = None

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):  # type: ignore[no-untyped-def]
            self.seen.append(batch_idx)
            if batch_idx == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        def on_exception(self, trainer, pl_module, exception):  # type: ignore[no-untyped-def]
            self.exception = exception

    for stop, expected_batches in ((False, 20), (True, 3)):
        terminate = Terminate()
        callbacks = [terminate, *([StopOnSigterm()] if stop else [])]
        trainer = L.Trainer(
            accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=callbacks, limit_predict_batches=20,
        )  # fmt: skip
        if stop:
            with pytest.raises(SystemExit) as exited:
                trainer.predict(BoringModel(), return_predictions=False)
            assert exited.value.code == EXIT_CODE == 143
            assert isinstance(terminate.exception, SystemExit)
        else:
            trainer.predict(BoringModel(), return_predictions=False)  # Lightning alone runs on
            assert trainer.received_sigterm
        assert terminate.seen == list(range(expected_batches))
    assert any(isinstance(c, StopOnSigterm) for c in default_callbacks([], True))
    assert not any(isinstance(c, StopOnSigterm) for c in default_callbacks([StopOnSigterm()], True))


def test_sigterm_exit_status_gives_143() -> None:
    """Lightning's fit / validate / test stop on SIGTERM with a code-less SystemExit (status 0)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from hones.sigterm import sigterm_exit_status

    with pytest.raises(SystemExit) as stopped, sigterm_exit_status():
        raise SIGTERMException()
    assert stopped.value.code == 143
    with pytest.raises(SystemExit) as other, sigterm_exit_status():
        raise SystemExit(2)
    assert other.value.code == 2


def test_a_job_launched_as_several_processes_with_a_one_process_trainer_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun / srun start N copies; with trainer.devices x num_nodes = 1 each would run the whole
    job and write the same files (Lightning does not check devices: 1)."""
    from types import SimpleNamespace

    from hones.run_defaults import LaunchCheck, launched_processes

    assert launched_processes({"TORCHELASTIC_RUN_ID": "1", "WORLD_SIZE": "4"}) == 4
    assert launched_processes({"SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8"}) == 8
    assert launched_processes({"WORLD_SIZE": "4"}) == 1 and launched_processes({"SLURM_NTASKS": "8"}) == 1  # no launcher step
    for name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    LaunchCheck().setup(SimpleNamespace(world_size=1), None, "test")  # no launcher: fine
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    LaunchCheck().setup(SimpleNamespace(world_size=2), None, "test")  # the Trainer runs the 2 processes
    with pytest.raises(SystemExit, match=r"launched as 2 processes \(torchrun / srun\), but the Trainer runs 1"):
        LaunchCheck().setup(SimpleNamespace(world_size=1), None, "test")
