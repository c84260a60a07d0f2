"""What every Trainer that hones builds gets besides the user's callbacks.

- a progress bar that shows in a log file too (``hones.progress.log_progress_bar``);
- ``HeapTrim`` (``hones.heap``), which keeps a long CPU pass's resident memory flat;
- ``StopOnSigterm`` (``hones.sigterm``), which lets SIGTERM stop a predict pass;
- ``LaunchCheck``, which stops a job launched as N processes whose Trainer runs 1.

``default_callbacks`` is for Trainers built in code (``analyze.py`` and the scripts,
``train.py compare``); ``HonesCLI`` is the ``LightningCLI`` of ``evaluate.py``,
``train.py`` and the toy-model trainer. A user's own instance of any of them stands.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI

from hones.cli_parsing import LightningParser
from hones.heap import HeapTrim
from hones.progress import log_progress_bar
from hones.sigterm import StopOnSigterm


def stage_loaders(trainer: Trainer, stage: str) -> list[Any]:
    """The loaders of the running ``stage`` ("validate", "test" or "predict"), as a list in
    Lightning's order (one loader, a list, or the values of a dict of loaders); [] without any."""
    loaders = getattr(trainer, {"validate": "val_dataloaders", "test": "test_dataloaders", "predict": "predict_dataloaders"}[stage])
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def launched_processes(environ: Mapping[str, str] | None = None) -> int:
    """How many processes a launcher started for this job: ``torchrun``'s ``WORLD_SIZE``, or an
    ``srun`` step's ``SLURM_STEP_NUM_TASKS``; 1 without a launcher."""
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in env and env.get("WORLD_SIZE", "").isdigit():
        return int(env["WORLD_SIZE"])
    if env.get("SLURM_STEP_NUM_TASKS", "").isdigit():
        return int(env["SLURM_STEP_NUM_TASKS"])
    return 1


class LaunchCheck(Callback):
    """Stops a job that a launcher started as N processes while its Trainer runs 1 (Lightning does not
    check ``devices: 1``): each process would run the whole job and write the same files."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        launched = launched_processes()
        if launched > 1 and trainer.world_size == 1:
            raise SystemExit(
                f"launched as {launched} processes (torchrun / srun), but the Trainer runs 1 "
                "(trainer.devices x trainer.num_nodes = 1), so each process would run the whole job: set "
                "--trainer.devices <processes per node> and --trainer.num_nodes <nodes> (--trainer.strategy ddp), "
                "or launch 1 process"
            )


def default_callbacks(callbacks: Sequence[Any] | None, enable_progress_bar: bool | None) -> list[Callback]:
    """The callbacks to append to ``callbacks``: ``HeapTrim()``, ``StopOnSigterm()`` and
    ``LaunchCheck()`` unless ``callbacks`` hold one, and ``log_progress_bar``'s bar."""
    callbacks = list(callbacks or [])
    extra: list[Callback] = [
        default() for default in (HeapTrim, StopOnSigterm, LaunchCheck) if not any(isinstance(c, default) for c in callbacks)
    ]
    return extra + log_progress_bar(callbacks, enable_progress_bar)


class HonesCLI(LightningCLI):
    """``LightningCLI`` whose Trainer also gets ``default_callbacks``, and whose parse errors are
    one line (``hones.cli_parsing.LightningParser``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", LightningParser)
        super().__init__(*args, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The usual Trainer, plus ``default_callbacks``."""
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        trainer_config = config.get("trainer") or {}
        callbacks = kwargs.get("callbacks", trainer_config.get("callbacks"))
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        enabled = kwargs.get("enable_progress_bar", trainer_config.get("enable_progress_bar"))
        kwargs["callbacks"] = [*callbacks, *default_callbacks(callbacks, enabled)]
        return super().instantiate_trainer(**kwargs)
