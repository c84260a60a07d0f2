"""The steering command line: ``LightningCLI`` over ``SteeringModule`` + ``HonesDataModule``.

One YAML per (model, task) serves every command:

- ``trainer`` / ``model`` / ``data``: the usual LightningCLI sections; ``model.task`` is
  linked to ``data.task`` (give it once, under ``model``);
- ``compare``: the §5 comparison's extra inputs (:class:`CompareSettings`), ignored by
  ``fit`` / ``validate`` / ``test``.

Trainer defaults are the paper's (HONES_METHOD §5): 2 epochs, gradient accumulation 4,
gradient-norm clip 1.0; the logger is TensorBoard with ``default_hp_metric=False``.
``fit`` keeps a resume checkpoint, ``<model.output_dir>/checkpoints/last.ckpt``
(``hones.steering.resume``): ``train.py fit --config ... --ckpt_path <that file>``
continues an interrupted fit to the scales an uninterrupted one gives, and so does the same
``fit`` command run again (a requeued job) when the checkpoint was written with its settings. The checkpoint is
tagged with the fit's settings (``hones.steering.fingerprint.fit_fingerprint``); a resume
with other settings stops with one line naming them. Lightning's own
epoch-end checkpoints (under the TensorBoard version folder) are restored by Lightning
without the training loader's position, so a resume from one of them is not exact.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from jsonargparse import lazy_instance

from hones.io import make_output_dir
from hones.run_defaults import HonesCLI
from hones.attribution.settings import fingerprint_differences, matches_stored
from hones.steering.fingerprint import fit_fingerprint, jsonable, plain, without
from hones.steering.resume import FitCheckpoint, ResumeSettingsError
from hones.steering.methods import GRID_FACTORS, METHOD_NAMES

# §5: 2 epochs, gradient accumulation 4, gradient-norm clip 1.0.
TRAINER_DEFAULTS: dict[str, Any] = {
    "max_epochs": 2,
    "accumulate_grad_batches": 4,
    "gradient_clip_val": 1.0,
    "gradient_clip_algorithm": "norm",
}

# train.py fit's resume checkpoint period (optimiser steps); a checkpoint holds s, not the VLM.
FIT_CHECKPOINT_EVERY_N_STEPS = 10


@dataclass
class CompareSettings:
    """The ``compare:`` section of a steering config (HONES_METHOD §5 comparison).

    Args:
        output_dir: summary (``summary.json``, ``summary.md``), per-method scales and logs.
        methods: which of ``hones.steering.methods.METHOD_NAMES`` to run, in order.
        grid_factors: Grid-Search candidates (uniform factor, s = factor - 1).
        dev_split_file: dev split (training and Grid-Search selection); default ``data.split_file``.
        dev_limit: at most this many dev records for the Grid-Search selection (None: ``data.limit``,
            the dev records the trained methods train on).
        test_split_file: in-distribution test split (required).
        test_limit: at most this many test records (None: all).
        ood: ``HonesDataModule`` arguments of the task's OOD set (``dataset``,
            ``annotation_file``, ``image_root``, ``limit``, ...); None skips OOD.
        checkpoint_every_n_steps: a trained method keeps ``<output_dir>/<method>/checkpoints/last.ckpt``
            every this many optimiser steps, after each epoch's last batch, and (the state after
            the last optimiser step) when the fit stops on SIGTERM, Ctrl+C or an error
            (``hones.steering.resume``); a rerun resumes an interrupted fit from it. 0: only at
            epoch ends and when the fit stops.
        overwrite: recompute the listed methods even where ``<output_dir>/state.json``
            records them as finished (otherwise they are skipped, and a finished method
            whose settings changed since is an error).
    """

    output_dir: str = "runs/steering/compare"
    methods: list[str] = field(default_factory=lambda: list(METHOD_NAMES))
    grid_factors: list[float] = field(default_factory=lambda: list(GRID_FACTORS))
    dev_split_file: str | None = None
    dev_limit: int | None = None
    test_split_file: str | None = None
    test_limit: int | None = None
    ood: dict[str, Any] | None = None
    checkpoint_every_n_steps: int = 10
    overwrite: bool = False


class SteeringCLI(HonesCLI):
    """LightningCLI with the §5 defaults, the task link and the ``compare`` section."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.task", "data.task")
        parser.add_class_arguments(CompareSettings, "compare")
        parser.set_defaults({f"trainer.{key}": value for key, value in TRAINER_DEFAULTS.items()})
        parser.set_defaults(
            {
                "trainer.logger": lazy_instance(
                    TensorBoardLogger, save_dir="runs/steering", name="tb", default_hp_metric=False
                )
            }
        )


    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        self._model_given = plain(self.config[subcommand].model) if subcommand else None
        if subcommand == "fit":
            self._resume_a_stopped_fit()

    def _resume_a_stopped_fit(self) -> None:
        """``fit`` without ``--ckpt_path``: when ``<model.output_dir>/checkpoints/last.ckpt`` was written
        by a fit with these settings (its tag), resume from it, so that the same command resubmitted
        after a preemption or a time limit goes on instead of starting over. A checkpoint of other
        settings is left to ``FitCheckpoint``, which replaces it."""
        config = self.config.fit
        directory = config.model.get("output_dir")
        if config.get("ckpt_path") or not directory:
            return
        path = Path(directory) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            return
        import torch

        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        tag = fit_fingerprint(plain(config.model), plain(config.data), plain(config.trainer), config.get("seed_everything"))
        if not matches_stored(FitCheckpoint.tag_of(checkpoint), tag):
            return
        # the model settings LightningCLI would take from the checkpoint (``_parse_ckpt_path``) must be
        # the given ones: the tag leaves some out (output_dir, stats_threshold)
        stored = without(dict(checkpoint.get("hyper_parameters") or {}), ("adapter_factory", "_instantiator", "_class_path"))
        given = {key: self._model_given.get(key) for key in stored}
        if fingerprint_differences(jsonable(stored), jsonable(given), "model"):
            return
        config.ckpt_path = str(path)
        if _fit_finished(checkpoint, config.trainer.get("max_epochs"), config.trainer.get("max_steps")):
            rank_zero_info(
                f"train.py fit: {path} holds a finished fit with these settings: its scales are exported again, "
                "without training (remove it to train from scratch)"
            )
        else:
            rank_zero_info(f"train.py fit: resuming the stopped fit from {path} (same settings; remove it to train from scratch)")

    def before_instantiate_classes(self) -> None:
        """With ``--ckpt_path``, LightningCLI replaces the ``model`` settings by those stored in the
        checkpoint (its ``hyper_parameters``), silently. A given setting that the checkpoint
        overrides stops the run here instead, naming it."""
        super().before_instantiate_classes()
        subcommand = self.config.get("subcommand")
        if not subcommand or self._model_given is None or not self.config[subcommand].get("ckpt_path"):
            return
        stored, given = (jsonable(without(m, ("adapter_factory",))) for m in (plain(self.config[subcommand].model), self._model_given))
        differences = fingerprint_differences(stored, given, "model")
        if differences:
            if subcommand == "fit":
                remedy = "resume with the stored settings, or start over without --ckpt_path"
            else:
                remedy = f"rerun with the stored settings, or {subcommand} the fit's exported scales with --model.scales instead of --ckpt_path"
            raise ResumeSettingsError(
                f"{self.config[subcommand].ckpt_path} holds other model settings, which LightningCLI would use instead of "
                f"the given ones (stored -> given: {'; '.join(differences)}); {remedy}"
            )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The usual Trainer; for ``fit``, also a ``FitCheckpoint`` in ``<model.output_dir>/checkpoints``
        (every ``FIT_CHECKPOINT_EVERY_N_STEPS`` optimiser steps, each epoch's last batch, and the
        state after the last optimiser step when the fit stops: SIGTERM, Ctrl+C, an error)
        unless the config has one, so ``--ckpt_path <output_dir>/checkpoints/last.ckpt`` resumes."""
        trainer = super().instantiate_trainer(**kwargs)
        directory = getattr(self.model, "hparams", {}).get("output_dir")
        if self.subcommand == "fit" and directory and not any(isinstance(c, FitCheckpoint) for c in trainer.callbacks):
            config = self.config[self.subcommand]
            tag = fit_fingerprint(plain(config.model), plain(config.data), plain(config.trainer), config.get("seed_everything"))
            make_output_dir(Path(directory) / "checkpoints")  # every process: a folder that cannot be written stops the fit now
            trainer.callbacks.append(FitCheckpoint(Path(directory) / "checkpoints", FIT_CHECKPOINT_EVERY_N_STEPS, tag=tag))
        return trainer


def _fit_finished(checkpoint: dict[str, Any], max_epochs: Any, max_steps: Any) -> bool:
    """Whether a ``FitCheckpoint`` was saved at the end of an epoch-bounded fit's last epoch (its
    training loader's saved position: the epoch ended). False when that cannot be told."""
    if not isinstance(max_epochs, int) or max_epochs < 1 or (isinstance(max_steps, int) and max_steps > 0):
        return False
    loaders = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader") or [{}]
    position = loaders[0] if isinstance(loaders, list) and loaders and isinstance(loaders[0], dict) else {}
    return checkpoint.get("epoch") == max_epochs - 1 and bool(position.get("epoch_done"))


class ConfigReader(SteeringCLI):
    """Parses a steering config without instantiating anything (``.parser``, ``.config``)."""

    def instantiate_classes(self) -> None:
        self.config_init = None


def read_config(args: list[str]) -> ConfigReader:
    """Parse ``["--config", path, "--model.beta", "0", ...]`` into a :class:`ConfigReader`."""
    from hones.data.datamodule import HonesDataModule
    from hones.steering.module import SteeringModule

    with warnings.catch_warnings():  # `args` is deliberate here, whatever sys.argv holds
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return ConfigReader(SteeringModule, HonesDataModule, args=args, run=False, save_config_callback=None)
