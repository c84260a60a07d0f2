"""HONES evaluation (HONES_METHOD §1): one VLM on one task's split, on 1..N processes.

    python evaluate.py test --config configs/toy/eval.yaml                    # toy LLaVA, vqa, toy test split
    python evaluate.py test --config configs/toy/eval.yaml --model.task ocr   # ocr | caption | retrieval
    python evaluate.py validate --config configs/toy/eval.yaml --data.split dev --data.split_file toyworld_data/splits/dev.json
    torchrun --nproc_per_node=2 evaluate.py test --config configs/toy/eval.yaml   # 2 processes, same metric

``validate`` / ``test`` are LightningCLI subcommands over ``hones.evaluation.EvalModule`` +
``hones.data.datamodule.HonesDataModule`` (``python evaluate.py test --help`` lists every
option); with no subcommand, ``test`` is run. ``model.task`` is linked to ``data.task``
(give it once, under ``model``). The run directory (``model.output_dir``) receives
``metrics_<stage>.json`` (both metric modes, the headline mode named),
``predictions_<stage>.jsonl`` (one row per item, merged over processes) and, with the
configs' TensorBoard logger, the scalars and the resolved ``config.yaml``. ``{task}``,
``{dataset}`` and ``{split}`` in ``model.output_dir`` and in the logger's ``save_dir`` are
filled in from the config, so ``--model.task ocr`` writes to the ocr run directory.

Distributed runs (docs/distributed.md): the datamodule shards evaluation items without
duplicates, metrics synchronise at epoch end. Under ``torchrun`` the trainer's
``devices`` / ``num_nodes`` are taken from the launcher when the config's do not match
its world size.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from jsonargparse import Namespace, lazy_instance
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.loggers import TensorBoardLogger

from hones.run_defaults import HonesCLI
from hones.sigterm import sigterm_exit_status

SUBCOMMANDS = ("validate", "test")
DEFAULT_SUBCOMMAND = "test"
# Every evaluation loader shards itself without duplicates (HonesDataModule), so Lightning's
# padding DistributedSampler is switched off; it would keep ours anyway (docs/distributed.md).
TRAINER_DEFAULTS: dict[str, Any] = {"use_distributed_sampler": False, "enable_checkpointing": False}


def launcher_topology(environ: dict[str, str] | None = None) -> tuple[int, int] | None:
    """``(devices per node, nodes)`` of a ``torchrun`` launch, or None when not launched by torchrun."""
    env = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" not in env or "LOCAL_WORLD_SIZE" not in env or "WORLD_SIZE" not in env:
        return None
    local, world = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])
    if local < 1 or world % local:
        return None
    return local, world // local


def _fill(template: Any, fields: dict[str, str]) -> Any:
    """``template.format(**fields)`` for strings that name a field; anything else unchanged."""
    if not isinstance(template, str) or "{" not in template:
        return template
    return template.format(**fields)


class EvalCLI(HonesCLI):
    """LightningCLI with the ``validate`` / ``test`` subcommands, the task link and run-directory fields."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Only the evaluation subcommands of ``LightningCLI``."""
        return {name: {"model", "dataloaders", "datamodule"} for name in SUBCOMMANDS}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.task", "data.task")
        parser.set_defaults({f"trainer.{key}": value for key, value in TRAINER_DEFAULTS.items()})
        parser.set_defaults(
            {"trainer.logger": lazy_instance(TensorBoardLogger, save_dir="runs/eval", name="tb", default_hp_metric=False)}
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        fields = {"task": config.model.task, "dataset": config.data.dataset, "split": config.data.split}
        config.model.output_dir = _fill(config.model.output_dir, fields)
        logger = config.trainer.logger
        if isinstance(logger, Namespace) and isinstance(logger.get("init_args"), Namespace):
            for key in ("save_dir", "root_dir"):
                if key in logger.init_args:
                    logger.init_args[key] = _fill(logger.init_args[key], fields)
        topology = launcher_topology()
        if topology is not None:
            self._match_launcher(config.trainer, *topology)

    @staticmethod
    def _match_launcher(trainer: Namespace, devices: int, num_nodes: int) -> None:
        """Set ``devices`` / ``num_nodes`` to torchrun's when the config's product differs from its world size."""
        devices_set = str(trainer.devices)  # Lightning's type is int | str | list: "--trainer.devices 1" parses as "1"
        configured = int(devices_set) if devices_set.isdigit() else None
        if configured is not None and configured * int(trainer.num_nodes) == devices * num_nodes:
            return
        if os.environ.get("RANK", "0") == "0":
            print(
                f"evaluate.py: launched by torchrun with {num_nodes} node(s) x {devices} process(es); "
                f"using trainer.devices={devices} trainer.num_nodes={num_nodes}",
                file=sys.stderr,
            )
        trainer.devices, trainer.num_nodes = devices, num_nodes


def _silence_known_warnings() -> None:
    """Drop three warnings that do not apply to evaluation runs."""
    # the evaluated VLM stays in eval mode on purpose
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # the logged metrics are already synchronised (torchmetrics), so sync_dist would add nothing
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(validate|test)/")
    # args may differ from sys.argv (the default subcommand, in-process calls)
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")


class ConfigReader(EvalCLI):
    """Parses an evaluation config, fills the run-directory fields, instantiates nothing (tests)."""

    def instantiate_classes(self) -> None:
        self.config_init = None


def read_config(args: list[str]) -> Namespace:
    """The resolved config of ``["--config", path, "--model.task", "ocr", ...]`` (no subcommand)."""
    from hones.data.datamodule import HonesDataModule
    from hones.evaluation import EvalModule

    _silence_known_warnings()
    reader = ConfigReader(EvalModule, HonesDataModule, args=args, run=False, save_config_callback=None)
    return reader.config


def _summary(module: Any) -> str | None:
    """One line with the headline metric and where the artifacts went (None before a run)."""
    results = getattr(module, "results", None)
    if not results:
        return None
    others = ", ".join(f"{name} {value:.4f}" for name, value in results["metrics"].items())
    run_dir = module.run_dir()
    where = f" -> {run_dir}" if run_dir is not None else ""
    return (
        f"evaluate.py: {results['task']} {results['stage']} metric ({results['headline_mode']}) = "
        f"{results['metric']:.4f} [{others}] over {results['num_items']} items on {results['world_size']} "
        f"process(es){where}"
    )


def with_default_subcommand(args: list[str]) -> list[str]:
    """``args`` with ``test`` in front when they start with an option (``evaluate.py --config x``)."""
    if not args:
        return [DEFAULT_SUBCOMMAND, "--help"]
    if args[0].startswith("-") and args[0] not in ("-h", "--help", "--version"):
        return [DEFAULT_SUBCOMMAND, *args]
    return args


def main(argv: list[str] | None = None) -> EvalCLI:
    """Run one subcommand (default ``test``); ``argv`` defaults to the command line."""
    args = with_default_subcommand(list(sys.argv[1:] if argv is None else argv))
    _silence_known_warnings()
    from hones.data.datamodule import HonesDataModule
    from hones.evaluation import EvalModule

    from hones.attribution.bank import BankError
    from hones.choices import SettingsError
    from hones.data.errors import DataError
    from hones.io import OutputError
    from hones.models.registry import ModelError

    try:
        with sigterm_exit_status():  # a SIGTERM stop exits 143, not 0
            cli = EvalCLI(EvalModule, HonesDataModule, args=args, save_config_kwargs={"overwrite": True})
    except (BankError, DataError, ModelError, OutputError, SettingsError) as error:  # bad data, scales, model, settings or output folder: one line
        sys.exit(f"evaluate.py: {error}")
    line = _summary(cli.model)
    if line is not None and cli.trainer.is_global_zero:
        print(line)
    return cli


if __name__ == "__main__":
    main()
