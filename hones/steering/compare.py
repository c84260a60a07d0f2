"""The §5 comparison: every steering method on one task, in-distribution and OOD.

    python -m hones.steering.compare --config configs/steering/toy_llava_vqa.yaml
    python train.py compare --config configs/steering/toy_llava_vqa.yaml --compare.methods '[base, hones]'

The config is the one ``train.py fit`` uses (``hones.steering.cli``); its ``compare:``
section names the test split, the OOD set (GQA for vqa, TextVQA for ocr, Flickr30k for
caption and retrieval) and the output folder. Per method (``hones.steering.methods``):

- Base, Fixed-Amp: evaluated as they are;
- Grid-Search: each uniform factor evaluated on dev, the best one (ties: the factor
  closest to 1) evaluated on test and OOD;
- RandNeuron, HONES w/o KL, HONES: trained on the dev split's training items (the
  configured trainer: 2 epochs, accumulation 4, clip 1.0 by default; no per-epoch
  validation), then evaluated; their scales are saved. The fit keeps a resume checkpoint,
  ``<output_dir>/<method>/checkpoints/last.ckpt`` (``hones.steering.resume``).

Writes ``<output_dir>/summary.json`` and ``summary.md`` (one row per method: test and OOD
metric), and per method ``<output_dir>/<method>/`` (metrics, predictions, scales) and
TensorBoard logs under ``<output_dir>/tb/<method>``. The model is loaded once and shared.

Resuming: each method's row is recorded in ``<output_dir>/state.json`` as soon as it is
finished, with the settings it depends on (``method_fingerprint``), and so is each finished
evaluation pass of a method not finished yet (Grid-Search's dev pass per factor, test, OOD).
Rerunning the same command skips the finished methods and passes and runs the rest; a pass
interrupted midway predicts only the batches it had not finished (its prediction journal,
``<output_dir>/<method>/.journal_<test|ood>``, Grid-Search's under ``dev_x<factor>/``;
``hones.prediction_journal``). A trained method's fit continues from its last checkpoint
(every ``compare.checkpoint_every_n_steps`` optimiser steps, each epoch's last batch, and
the state after the last optimiser step when the fit stops) to the scales an uninterrupted
fit gives, when the checkpoint was written with the method's current settings (its
fingerprint is stored in the checkpoint); otherwise the fit starts over. The checkpoint is removed once the method's row is recorded. A finished method whose
settings have changed since stops the run with one line naming them; ``--compare.overwrite
true`` recomputes the listed methods instead.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from hones import io
from hones.attribution.pipeline import is_global_zero
from hones.attribution.run_state import AnalysisError, RunState
from hones.attribution.settings import matches_stored, model_identity
from hones.choices import SettingsError, check_limit
from hones.data.datamodule import HonesDataModule
from hones.data.formats import check_disjoint_splits
from hones.run_defaults import default_callbacks
from hones.steering.cli import ConfigReader, read_config
from hones.steering.fingerprint import (
    PROCESS_TRAINER_KEYS,
    STEERING_MODEL_KEYS,
    TRAINING_MODEL_KEYS,
    TRAINING_TRAINER_KEYS,
    UNUSED_DATA_KEYS,
    UNUSED_MODEL_KEYS,
    UNUSED_TRAINER_KEYS,
    data_files,
    file_digest,
    jsonable,
    normalised_paths,
    plain,
)
from hones.steering.methods import SteeringMethod, factor_to_scale, get_method
from hones.steering.module import SteeringModule
from hones.steering.resume import LAST, FitCheckpoint

# HonesDataModule arguments an OOD set inherits from the in-distribution data config.
_SHARED_DATA_KEYS = ("batch_size", "num_workers", "seed", "n_neg", "lenient", "verify_images")
# methods whose neurons or scales a scales file would override (model.scales)
SCALES_CLASH = ("fixed_amp", "grid_search", "rand_neuron")
# compare settings no method's row depends on (``hones.steering.fingerprint`` has the others).
_UNUSED_COMPARE_KEYS = ("output_dir", "methods", "overwrite", "checkpoint_every_n_steps")


class SharedAdapter:
    """Loads the model once; every method's module gets the same (frozen) adapter."""

    def __init__(self, load: Callable[[], Any]) -> None:
        self._load = load
        self._adapter: Any = None

    def __call__(self) -> Any:
        if self._adapter is None:
            self._adapter = self._load()
        return self._adapter


class Comparison:
    """Runs the methods of one parsed steering config (see the module docstring)."""

    def __init__(self, reader: ConfigReader, adapter_factory: Callable[[], Any] | None = None) -> None:
        self.reader = reader
        self.config = reader.config
        self.settings = plain(self.config.compare)
        self.model_args = plain(self.config.model)
        self.model_args.pop("adapter_factory", None)
        self.data_args = plain(self.config.data)
        if self.settings.get("test_split_file") is None:
            raise SettingsError("compare.test_split_file is required: the methods are compared on the test split (§5)")
        check_disjoint_splits({"dev": self.dev_split_file(), "test": self.settings["test_split_file"]})
        for key in ("dev_limit", "test_limit"):
            check_limit(f"compare.{key}", self.settings.get(key))
        check_limit("compare.ood.limit", (self.settings.get("ood") or {}).get("limit"))
        if (self.settings.get("checkpoint_every_n_steps") or 0) < 0:
            raise SettingsError(f"compare.checkpoint_every_n_steps must be >= 0; got {self.settings['checkpoint_every_n_steps']}")
        factors = self.settings.get("grid_factors") or []
        if not factors or any(not isinstance(f, (int, float)) or isinstance(f, bool) or f <= 0 for f in factors):
            raise SettingsError(f"compare.grid_factors must be a non-empty list of positive factors; got {factors!r}")
        self.grid_factors = tuple(float(f) for f in factors)
        if self.model_args.get("scales") is not None:
            clash = [name for name in self.settings["methods"] if name in SCALES_CLASH]
            if clash:
                raise SettingsError(
                    f"model.scales ({self.model_args['scales']}) sets the scaled neurons and their scales, which "
                    f"{', '.join(clash)} would choose themselves; drop model.scales or those methods"
                )
        self.output_dir = io.make_output_dir(self.settings["output_dir"])
        self.adapter = SharedAdapter(adapter_factory or self._load_adapter)
        self.seed = self.config.get("seed_everything")
        self.state = RunState(
            self.output_dir / "state.json", model_name=str(self.model_args["model"]), task=str(self.model_args["task"]),
            remedy=(
                "rerun with --compare.overwrite true to recompute it (that recomputes every method in "
                "--compare.methods; list only this one to keep the others)"
            ),
        )

    @cached_property
    def model_identity(self) -> str | None:
        """``model_identity`` of the model folder, read once for every method's fingerprint."""
        return model_identity(str(self.model_args["model"]))

    def method_fingerprint(self, name: str) -> dict[str, Any]:
        """The settings a method's row depends on (JSON data, paths normalised): the model
        arguments with the method's overrides (and a digest of a local model folder), the bank
        and scales files' contents where the method steers, data, trainer, the comparison's
        splits, seed. Settings the method does not use are left out (a trained method's
        schedule and process count for Base, Fixed-Amp and Grid-Search; the bank for Base; the
        factors for all but Grid-Search), so changing them does not invalidate its row."""
        method = get_method(name)
        model = {k: v for k, v in {**self.model_args, **method.overrides}.items() if k not in UNUSED_MODEL_KEYS}
        trainer = {k: v for k, v in plain(self.config.trainer).items() if k not in UNUSED_TRAINER_KEYS}
        compare = {k: v for k, v in self.settings.items() if k not in _UNUSED_COMPARE_KEYS}
        steers = model.get("steer", True)
        if not method.train:
            model = {k: v for k, v in model.items() if k not in TRAINING_MODEL_KEYS}
            trainer = {k: v for k, v in trainer.items() if k not in TRAINING_TRAINER_KEYS + PROCESS_TRAINER_KEYS}
        if not steers:
            model = {k: v for k, v in model.items() if k not in STEERING_MODEL_KEYS}
        if not method.grid:
            compare = {k: v for k, v in compare.items() if k not in ("grid_factors", "dev_limit")}
            if not method.train:
                compare.pop("dev_split_file", None)
        return jsonable(
            normalised_paths(
                {
                    "method": name,
                    "model": model,
                    "model_identity": self.model_identity,
                    "bank_digest": file_digest(model.get("bank")) if steers else None,
                    "scales_digest": file_digest(model.get("scales")) if steers else None,
                    "data": {k: v for k, v in self.data_args.items() if k not in UNUSED_DATA_KEYS},
                    "data_files": self.data_files(compare),
                    "trainer": trainer,
                    "compare": compare,
                    "seed": self.seed,
                }
            )
        )

    def data_files(self, compare: dict[str, Any]) -> dict[str, Any]:
        """Digests of the data files a row depends on: the data section's annotation and split
        files (the dev split where the method uses it), the test split file and the OOD set's
        files, as far as ``compare`` (the row's compare settings) names them."""
        files: dict[str, Any] = {"data": data_files(self.data_args)}
        for key in ("dev_split_file", "test_split_file"):
            if key in compare:
                files[key] = file_digest(compare[key])
        if compare.get("ood"):
            files["ood"] = data_files(dict(compare["ood"]))
        return files

    # -- building blocks ------------------------------------------------------------------
    def _load_adapter(self) -> Any:
        from hones.models import load_adapter

        args = self.model_args
        return load_adapter(args["model"], dtype=args["dtype"], trust_remote_code=args["trust_remote_code"])

    def module(self, method: SteeringMethod, **overrides: Any) -> SteeringModule:
        """The config's SteeringModule with the method's (and the caller's) overrides, on the shared model."""
        return SteeringModule(**{**self.model_args, **method.overrides, **overrides}, adapter_factory=self.adapter)

    def datamodule(self, **overrides: Any) -> HonesDataModule:
        """The config's in-distribution datamodule with overrides (split, split file, training, limit)."""
        return HonesDataModule(**{**self.data_args, **overrides})

    def ood_datamodule(self) -> HonesDataModule | None:
        """The task's OOD set (``compare.ood``), batched like the in-distribution data."""
        if not self.settings.get("ood"):
            return None
        shared = {key: self.data_args[key] for key in _SHARED_DATA_KEYS if key in self.data_args}
        task = self.model_args["task"]
        return HonesDataModule(**{**shared, "task": task, "split": "test", "training": False, **self.settings["ood"]})

    def trainer(self, name: str, fit: bool = False) -> L.Trainer:
        """A fresh trainer from the config (its own TensorBoard version; for a fit, the
        method's ``FitCheckpoint`` instead of Lightning's checkpoints)."""
        init = self.reader.parser.instantiate(self.config)
        kwargs = dict(init["trainer"])
        kwargs["logger"] = TensorBoardLogger(
            save_dir=str(self.output_dir), name="tb", version=name, default_hp_metric=False
        )
        kwargs["enable_checkpointing"] = False  # the scales are exported instead
        callbacks = kwargs.get("callbacks") or []
        kwargs["callbacks"] = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        kwargs["callbacks"] += default_callbacks(kwargs["callbacks"], kwargs.get("enable_progress_bar"))
        if fit:  # §5 trains a fixed schedule; evaluation follows the fit
            kwargs["limit_val_batches"] = 0
            kwargs["num_sanity_val_steps"] = 0
            kwargs["callbacks"] = [c for c in kwargs["callbacks"] if not isinstance(c, FitCheckpoint)]
            kwargs["callbacks"].append(self.fit_checkpoint(name))
        return L.Trainer(**kwargs)

    def checkpoint_dir(self, name: str) -> Path:
        """Where method ``name``'s fit keeps its resume checkpoint."""
        return self.output_dir / name / "checkpoints"

    def fit_checkpoint(self, name: str) -> FitCheckpoint:
        """The resume checkpoint of method ``name``'s fit, tagged with the method's fingerprint."""
        every = int(self.settings.get("checkpoint_every_n_steps") or 0)
        return FitCheckpoint(self.checkpoint_dir(name), every_n_steps=every, tag=self.method_fingerprint(name))

    def resumable_fit(self, name: str, fingerprint: dict[str, Any]) -> str | None:
        """The checkpoint to resume method ``name``'s fit from: its last one, if it was written with
        ``fingerprint`` (the method's current settings); otherwise None (the fit starts over and
        overwrites it)."""
        path = self.checkpoint_dir(name) / LAST
        if not path.is_file():
            return None
        if matches_stored(FitCheckpoint.read_tag(path), fingerprint):
            return str(path)
        if is_global_zero():
            print(f"compare: {name}: {path} was written with other settings; the fit starts over", flush=True)
        return None

    def _seed(self) -> None:
        if isinstance(self.seed, int) and not isinstance(self.seed, bool):
            L.seed_everything(self.seed, workers=True, verbose=False)

    def _clear_logs(self, name: str, factor: float | None = None) -> None:
        """Remove the TensorBoard logs of an earlier, unfinished (or overwritten) attempt at a method,
        so that a rerun's curves do not continue the old ones (rank 0; ``tb/<name>``, ``tb/<name>_x*``;
        with ``factor``, only that Grid-Search factor's ``tb/<name>_x<factor>``)."""
        if not is_global_zero():
            return
        tb = self.output_dir / "tb"
        folders = [tb / f"{name}_x{factor}"] if factor is not None else [tb / name, *tb.glob(f"{name}_x*")]
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    # -- the run ---------------------------------------------------------------------------
    def evaluation_pass(self, name: str, key: str, fingerprint: dict[str, Any], run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The results of one evaluation pass of method ``name`` (``key``: ``dev_x<factor>``, ``test``,
        ``ood``): ``run()``'s, recorded in ``state.json`` as ``pass/<name>/<key>`` with the method's
        fingerprint, or those recorded by an earlier, interrupted run with the same fingerprint.
        So a rerun repeats no finished pass of an unfinished method; the records are dropped once
        its row is recorded."""
        stage = f"pass/{name}/{key}"
        record = self.state.record(stage)
        if record is not None and matches_stored(record.get("fingerprint"), fingerprint):
            if is_global_zero():
                print(f"compare: {name}: the {key} pass finished in an earlier run ({self.state.path}); reused", flush=True)
            return dict(record["info"])
        results = run()
        self.state.mark_done(stage, fingerprint, results)
        if is_global_zero():
            self.state.save()
        return results

    def has_passes(self, name: str, fingerprint: dict[str, Any]) -> bool:
        """Whether an earlier run of method ``name`` with ``fingerprint`` recorded a finished pass."""
        prefix = f"pass/{name}/"
        return any(
            stage.startswith(prefix) and matches_stored(record.get("fingerprint"), fingerprint) for stage, record in self.state.stages.items()
        )

    def grid_search(self, method: SteeringMethod, dev: HonesDataModule, fingerprint: dict[str, Any]) -> tuple[float, dict[float, float]]:
        """Evaluate every uniform factor on dev; the best (ties: closest to 1) and all scores."""

        def score(factor: float) -> dict[str, Any]:
            out = self.output_dir / method.name / f"dev_x{factor}"  # not the config's model.output_dir (a fit's)
            candidate = self.module(method, init_scale=factor_to_scale(factor), output_dir=str(out))
            self._clear_logs(method.name, factor)  # an interrupted attempt's curves: not continued
            self.trainer(f"{method.name}_x{factor}").validate(candidate, datamodule=dev, verbose=False)
            return {"metric": candidate.results["metric"]}

        scores = {f: self.evaluation_pass(method.name, f"dev_x{f}", fingerprint, lambda f=f: score(f))["metric"] for f in method.grid}
        best = max(method.grid, key=lambda f: (scores[f], -abs(f - 1.0)))
        return best, scores

    def dev_split_file(self) -> str | None:
        """The dev split the methods train and choose on: ``compare.dev_split_file``, else ``data.split_file``."""
        return self.settings.get("dev_split_file") or self.data_args.get("split_file")

    def run(self) -> dict[str, Any]:
        settings = self.settings
        dev_split = self.dev_split_file()
        dev_limit = self.data_args.get("limit") if settings.get("dev_limit") is None else settings["dev_limit"]
        dev_train = self.datamodule(split="dev", split_file=dev_split, training=True)
        dev_eval = self.datamodule(split="dev", split_file=dev_split, training=False, limit=dev_limit)
        test = self.datamodule(
            split="test", split_file=settings["test_split_file"], training=False, limit=settings.get("test_limit")
        )
        ood = self.ood_datamodule()

        stages = {name: f"method/{name}" for name in settings["methods"]}
        fingerprints = {name: self.method_fingerprint(name) for name in settings["methods"]}
        if settings.get("overwrite"):
            self.state.forget([*stages.values(), *(f"pass/{name}/" for name in stages)])
            if is_global_zero():
                self.state.save()  # a crash before a method ends must not bring its old row back
                for journal in [j for name in stages for j in (self.output_dir / name).glob("**/.journal_*")]:
                    shutil.rmtree(journal)  # recompute means predict again
        # every listed method's record is checked before any work: a mismatch stops the run now
        finished = {name for name in settings["methods"] if self.state.is_done(stages[name], fingerprints[name])}
        rows = []
        for name in settings["methods"]:
            method = get_method(name)
            if method.grid:
                method = dataclasses.replace(method, grid=self.grid_factors)  # compare.grid_factors
            fingerprint = fingerprints[name]
            if name in finished:
                if is_global_zero():
                    print(f"compare: {name} already finished ({self.state.path}); skipped", flush=True)
                rows.append(self.state.record(stages[name])["info"])
                continue
            resume = self.resumable_fit(name, fingerprint) if method.train else None
            # passes of an earlier fit, which starts over now: dropped before the new fit's first checkpoint
            if method.train and resume is None and self.state.forget([f"pass/{name}/"]) and is_global_zero():
                self.state.save()
            if resume is None and not self.has_passes(name, fingerprint):
                self._clear_logs(name)
            elif resume is not None and is_global_zero():
                print(f"compare: {name}: resuming the fit from {resume}", flush=True)
            row: dict[str, Any] = {"method": name, "label": method.label, "trained": method.train}
            overrides: dict[str, Any] = {}
            if method.grid:
                best, scores = self.grid_search(method, dev_eval, fingerprint)
                overrides["init_scale"] = factor_to_scale(best)
                row.update(factor=best, dev={str(f): v for f, v in scores.items()})
            module = self.module(method, output_dir=str(self.output_dir / name), **overrides)
            if method.train:
                self._seed()
                trainer = self.trainer(name, fit=True)
                trainer.fit(module, datamodule=dev_train, ckpt_path=resume, weights_only=True)
                row["scales"] = {kind: str(path) for kind, path in module.exported.items()}
            evaluator = self.trainer(name)

            def evaluate(tag: str, data: HonesDataModule) -> dict[str, Any]:
                module.eval_tag = tag
                evaluator.test(module, datamodule=data, verbose=False)
                return {"metric": module.results["metric"], "metric_name": module.results["metric_name"]}

            tested = self.evaluation_pass(name, "test", fingerprint, lambda: evaluate("test", test))
            row["test"], row["metric_name"] = tested["metric"], tested["metric_name"]
            if ood is not None:
                row["ood"] = self.evaluation_pass(name, "ood", fingerprint, lambda: evaluate("ood", ood))["metric"]
            rows.append(row)
            self.state.forget([f"pass/{name}/"])
            self.state.mark_done(stages[name], fingerprint, row)
            if is_global_zero():
                self.state.save()
                if method.train:  # the row and the scales are kept; the resume checkpoint is done with
                    shutil.rmtree(self.checkpoint_dir(name), ignore_errors=True)

        summary = {
            "task": self.model_args["task"],
            "model": self.model_args["model"],
            "metric": rows[0]["metric_name"] if rows else None,
            "metric_mode": self.model_args["metric_mode"],
            "test_split_file": settings["test_split_file"],
            "ood_dataset": (settings.get("ood") or {}).get("dataset"),
            "methods": rows,
        }
        if is_global_zero():
            io.write_json(self.output_dir / "summary.json", summary)
            io.write_text(self.output_dir / "summary.md", summary_markdown(summary))
            print(f"compare: the table of {len(rows)} methods is in {self.output_dir / 'summary.md'} (and summary.json)", flush=True)
        return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    """The comparison as a markdown table (one row per method)."""
    metric = summary.get("metric") or "metric"
    ood = summary.get("ood_dataset")
    header = ["Method", f"test {metric}"] + ([f"OOD {ood} {metric}"] if ood else []) + ["notes"]
    table = []
    for row in summary["methods"]:
        notes = []
        if "factor" in row:
            notes.append(f"factor x{row['factor']} chosen on dev")
        if row.get("trained"):
            notes.append("trained on dev")
        cells = [row["label"], float(row["test"])] + ([float(row["ood"])] if ood else []) + ["; ".join(notes)]
        table.append(cells)
    title = f"# Steering comparison (HONES_METHOD §5): {summary['task']} on {summary['model']}\n\n"
    return title + io.markdown_table(header, table)


def run_comparison(args: list[str], adapter_factory: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Parse a steering config (``["--config", path, overrides...]``) and run the comparison."""
    return Comparison(read_config(args), adapter_factory).run()


def main(argv: list[str] | None = None) -> None:
    run_comparison(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    from hones.attribution.bank import BankError

    try:
        main()
    except (BankError, AnalysisError, SettingsError) as error:
        sys.exit(f"hones.steering.compare: {error}")
