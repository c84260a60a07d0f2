"""The HONES attribution pipeline on Lightning (``analyze.py``): §2 heads -> §3 neurons -> APE -> §4 masking.

Each stage is one ``trainer.predict`` pass of ``AttributionModule`` (it only holds the
VLM; its steps do nothing) with the attribution callbacks of
``hones.attribution.callbacks`` doing the work; this module picks the split, wires the
callbacks and writes the run folder. ``predict`` serves every item exactly once even on
several devices (an unrepeated sampler), and the callbacks' accumulators are summed
across processes.

Run folder ``<output_root>/<model_name>/<task>/``:

- ``heads.json``, ``head_scores.safetensors`` (Δ and intervened utility ``[L, H]``),
  ``head_agreement.json`` when a second utility is compared — discovery split (§2);
- ``importance.safetensors`` (Imp, c̄, baseline scores, AP/MA statistics ``[L, I]``),
  ``bank_<method>.json`` for hones, random, activation, write_in, grad_x_act, ap, ma
  (and ape once all four tasks have statistics) — discovery split (§3);
- ``masking.json`` / ``masking.md`` — test split (§4);
- ``state.json`` (finished stages and their settings; see ``run_state``),
  ``partial/`` (mid-split accumulator checkpoints while a pass runs),
  ``tensorboard/{heads,neurons,mask}/`` (head heat map, importance histogram, neurons per layer,
  masking scalars and table; one TensorBoard run per stage).

Stages already recorded in ``state.json`` with the same settings are skipped; other
settings are an error unless ``overwrite`` (then the stage and everything that depends
on it is recomputed).
"""

from __future__ import annotations

import math
import shutil
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from hones import io
from hones.adapter_host import AdapterHost
from hones.attribution.activation_banks import ape_banks, load_activation_probability, statistic_banks
from hones.attribution.bank import BankEntry, load_head_scores, neurons_per_layer, read_bank, write_bank
from hones.attribution.callbacks import (
    HeadLocalizationCallback,
    MaskingVerificationCallback,
    NeuronAttributionCallback,
    neurons_per_layer_figure,
)
from hones.attribution.checkpoint import AccumulatorCheckpoint
from hones.attribution.heads import DEFAULT_TOP_K, HeadScores
from hones.attribution.reports import masking_markdown, masking_row, write_masking_report
from hones.attribution.run_state import AnalysisError, RunState, StageMismatchError
from hones.attribution.settings import (
    METHODS,
    TASKS,
    AnalyzeConfig,
    SplitSettings,
    heads_retrieval_negatives,
    make_datamodule,
    model_identity,
    stage_fingerprint,
)
from hones.data.formats import check_disjoint_splits
from hones.data.tasks import N_NEGATIVES
from hones.run_defaults import default_callbacks

COMMANDS = ("all", "heads", "neurons", "mask")


# -- the module -------------------------------------------------------------------------------
class AttributionModule(AdapterHost, L.LightningModule):
    """Holds the VLM (``.adapter``) for the attribution callbacks; its steps do nothing.

    Hooks: ``configure_model`` and ``setup`` from :class:`~hones.adapter_host.AdapterHost` (load
    the adapter once per process, hand its encoder to the datamodule), ``predict_step`` (no-op).

    Args:
        model: hub id or local directory; dtype: fp32 | bf16 | fp16.
        adapter_factory: optional callable returning a ready adapter (tests, notebooks).
    """

    def __init__(
        self,
        model: str,
        dtype: str = "fp32",
        trust_remote_code: bool = False,
        adapter_factory: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["adapter_factory"])
        self._adapter_factory = adapter_factory
        self.adapter: Any = None

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        return None


# -- helpers ----------------------------------------------------------------------------------
def run_script_parser(prog: str, description: str) -> Any:
    """The ``jsonargparse`` parser of a script that works on one analyze run: ``--config``
    (an analyze YAML) and every ``AnalyzeConfig`` field, as ``analyze.py`` takes them, less
    ``overwrite`` (a script reads a finished run; ``analyze.py`` recomputes one)."""
    from jsonargparse import ActionConfigFile

    from hones.cli_parsing import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", action=ActionConfigFile, help="the analyze YAML config of the run (configs/analyze/*.yaml)")
    parser.add_class_arguments(AnalyzeConfig, None, fail_untyped=True, skip={"overwrite"})
    return parser


def finished_neurons_run(parser: Any, parsed: Any, prog: str) -> TaskRun | None:
    """``single_task_run`` for a script that reads the run's banks: the model loaded, or None
    (after one line on stderr) when the neurons stage has not finished with these settings."""
    run = single_task_run(parser, parsed)
    try:
        run.require_neurons()
    except AnalysisError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return None
    run.module.configure_model()
    return run


def single_task_run(parser: Any, parsed: Any) -> TaskRun:
    """The ``TaskRun`` a script works on: its parsed ``AnalyzeConfig`` must name one task
    (``--task``), else ``parser.error``. The model is not loaded yet."""
    config = AnalyzeConfig.from_namespace(parser.instantiate(parsed))
    tasks = config.task_list()
    if len(tasks) != 1:
        parser.error(f"give one task with --task (the config lists {', '.join(tasks)})")
    module = AttributionModule(config.model, config.dtype, config.trust_remote_code)
    run = TaskRun(config, tasks[0], module, identity=model_identity(config.model))
    run.state.remedy = "give this script the run's settings, or recompute the run with these (`analyze.py all ... --overwrite true`)"
    return run


def is_global_zero() -> bool:
    """Whether this process writes the run folder (rank 0, or no distributed run)."""
    return int(getattr(rank_zero_only, "rank", 0)) == 0


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def say(message: str) -> None:
    """A progress line on stderr (rank 0)."""
    if is_global_zero():
        print(f"[analyze] {message}", file=sys.stderr, flush=True)


def build_datamodule(
    config: AnalyzeConfig,
    task: str,
    split: SplitSettings,
    with_targets: bool,
    ranking: bool | None = None,
    retrieval_negatives: int | None = None,
) -> Any:
    """The ``HonesDataModule`` of ``task`` on ``split`` (set up: ``.items`` is filled).

    Retrieval items (``retrieval_negatives`` defaults to the split's): with ``ranking``
    (default: any split but discovery) the positive and that many hard negatives of each
    image, labelled for NDCG (§1); without, the positive with target "Yes" (§3) plus that
    many of the hard negatives, sampled, with target "No".
    """
    ranking = split.split != "discovery" if ranking is None else ranking
    negatives = split.retrieval_negatives if retrieval_negatives is None else int(retrieval_negatives)
    module = make_datamodule(
        config.data,
        task,
        split.split,
        split_file=split.split_file,
        limit=split.limit,
        training=not ranking,
        with_targets=with_targets,
        n_neg=negatives if ranking else (N_NEGATIVES if negatives else 1),  # positives only: no pool to rank
        train_negatives=negatives,
    )
    module.prepare_data()  # generates the toy world when data.toy_world asks for it and it is absent
    module.setup("predict")
    if not module.items:
        raise AnalysisError(f"{task} on the {split.split} split has no item ({split.split_file})")
    return module


def skipped_on_load(datamodule: Any) -> dict[str, Any]:
    """``{"skipped": {"total", "reasons"}}`` when lenient loading skipped bad items of ``datamodule``, else ``{}``."""
    skips = getattr(datamodule, "skips", None)
    if skips is None or not skips.total:
        return {}
    return {"skipped": skips.to_json()}


@dataclass
class StageOutcome:
    """What happened to one stage: ``status`` is "ran", "skipped" (already done) or "pending"."""

    task: str
    stage: str
    status: str
    detail: str = ""


# -- one run folder ---------------------------------------------------------------------------
class TaskRun:
    """The stages of one (model, task) run folder.

    Args:
        config: the run's settings; task: its task.
        module: the shared ``AttributionModule`` (the model is loaded once for all tasks).
        extra_callbacks: added to every Trainer (after the attribution callbacks).
        identity: ``settings.model_identity`` of the model (part of every stage's fingerprint).
    """

    def __init__(
        self,
        config: AnalyzeConfig,
        task: str,
        module: AttributionModule,
        extra_callbacks: Sequence[Callback] = (),
        identity: str | None = None,
    ) -> None:
        self.config, self.task, self.module, self.identity = config, task, module, identity
        self.extra_callbacks = list(extra_callbacks)
        self.run_dir = config.run_dir(task)
        self.partial_dir = self.run_dir / "partial"
        self.state = RunState(self.run_dir / "state.json", config.name(), task)
        self.outcomes: list[StageOutcome] = []
        self._head_scores: HeadScores | None = None

    # plumbing
    def require_neurons(self) -> None:
        """Raise ``AnalysisError`` unless the neurons stage finished with this run's settings
        (so its banks belong to them)."""
        if not self.state.is_done("neurons", self.fingerprint("neurons")) or not (self.run_dir / "bank_hones.json").is_file():
            raise AnalysisError(f"{self.run_dir}: no finished neurons stage; run `analyze.py neurons` with these settings first")

    def random_draws(self, reference: Sequence[BankEntry], draws: int) -> dict[str, list[BankEntry]]:
        """``random_seed<s>`` -> random neurons with ``reference``'s per-layer counts, for seeds
        ``baseline_seed + 1 .. baseline_seed + draws`` (the run's own ``random`` bank is seed
        ``baseline_seed``). Needs the model loaded (``module.configure_model()``)."""
        from hones.attribution.baselines import random_selection

        first = self.config.neurons.baseline_seed + 1
        width = self.module.adapter.ffn_width
        return {f"random_seed{s}": random_selection(reference, width, seed=s) for s in range(first, first + draws)}

    def fingerprint(self, stage: str) -> dict[str, Any]:
        return stage_fingerprint(self.config, self.task, stage, self.identity)

    def save_state(self) -> None:
        if is_global_zero():
            self.state.set_config(self.config.to_dict())
            self.state.save()

    def note(self, stage: str, status: str, detail: str = "") -> None:
        self.outcomes.append(StageOutcome(self.task, stage, status, detail))
        say(f"{self.config.name()}/{self.task} {stage}: {status}{' — ' + detail if detail else ''}")

    def logger(self, stage: str) -> TensorBoardLogger:
        """The TensorBoard logger of one stage (``<run>/tensorboard/<heads|neurons|mask>``: a run per
        stage, removed when the stage is recomputed, so no stale curve stays beside a new one)."""
        return TensorBoardLogger(str(self.run_dir / "tensorboard"), name="", version=stage, default_hp_metric=False)

    def mask_test_split(
        self, banks: Mapping[str, Sequence[BankEntry]], label: str, what: str, target_logprob: bool = False
    ) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """Mask the test split with ``banks`` in one predict pass, outside the run's stages.

        For scripts that measure more selections than the mask stage's (random draws,
        whole layers): no state is recorded and no TensorBoard scalars are written. Returns
        the masking callback's ``results`` (None on ranks other than 0) and the head of a
        summary JSON (task, metric, mode, split, item count, limit); ``label`` and ``what``
        make the one progress line on stderr. ``target_logprob``: the callback's teacher-forced
        scores too. Like the stages' passes, the pass is checkpointed every
        ``checkpoint_every_n_batches`` batches to ``partial/<label>``: rerun the same command
        after an interruption and it goes on from there (same banks, split and settings).
        """
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r"predict returned None")
        datamodule = build_datamodule(self.config, self.task, self.config.test, with_targets=False)
        print(f"[{label}] {self.config.name()}/{self.task}: {len(datamodule.items)} test items, {what}", file=sys.stderr)
        masking = self.config.masking
        callback = MaskingVerificationCallback(
            banks=dict(banks), task=self.task, metric_mode=masking.metric_mode, max_new_tokens=masking.max_new_tokens,
            stages=("predict",), target_logprob=target_logprob,
        )  # fmt: skip
        fingerprint = {
            **self.fingerprint("mask/hones"),  # model, data, discovery, neurons, test split, masking settings
            "method": None,
            "label": label,
            "banks": {name: [[entry.layer, entry.neuron] for entry in entries] for name, entries in banks.items()},
            "target_logprob": target_logprob,
        }
        trainer = self.run_pass(callback, datamodule, label, fingerprint, logger=False)
        if not trainer.is_global_zero:
            return None, {}
        head = {
            "task": self.task, "metric": callback.results["metric"], "metric_mode": masking.metric_mode,
            "split": self.config.test.split, "num_items": len(datamodule.items), "test_limit": self.config.test.limit,
        }  # fmt: skip
        return callback.results, head

    def trainer(self, callbacks: Sequence[Callback], logger: Any) -> L.Trainer:
        """A predict-only Trainer from the run's trainer settings (``logger``: a logger, or ``False``: none)."""
        settings = self.config.trainer
        callbacks = [*callbacks, *self.extra_callbacks]
        return L.Trainer(
            accelerator=settings.accelerator,
            devices=settings.devices,
            strategy=settings.strategy,
            num_nodes=settings.num_nodes,
            precision=settings.precision,
            logger=logger,
            callbacks=[*callbacks, *default_callbacks(callbacks, settings.enable_progress_bar)],
            enable_progress_bar=settings.enable_progress_bar,
            enable_model_summary=False,
            enable_checkpointing=False,
        )

    def run_pass(self, callback: Any, datamodule: Any, stage: str, fingerprint: dict[str, Any], logger: Any = None) -> L.Trainer:
        """One ``trainer.predict`` pass with ``callback`` and its mid-split checkpoint; ``logger`` defaults
        to the stage's TensorBoard logger (``False``: none)."""
        checkpoint = AccumulatorCheckpoint(
            callback, self.partial_dir / stage.replace("/", "_"), self.config.checkpoint_every_n_batches, fingerprint
        )
        trainer = self.trainer([callback, checkpoint], logger=self.logger(stage) if logger is None else logger)
        trainer.predict(self.module, datamodule=datamodule, return_predictions=False)
        barrier()
        if is_global_zero():
            checkpoint.clear()
            if self.partial_dir.is_dir() and not any(self.partial_dir.iterdir()):
                self.partial_dir.rmdir()
        return trainer

    def top_k(self) -> int:
        """|H*|: the configured K, else §2's default for the architecture, capped at L·H."""
        adapter = self.module.adapter
        total = adapter.num_layers * adapter.num_heads
        k = self.config.heads.top_k or DEFAULT_TOP_K.get(getattr(adapter, "model_type", ""), 30)
        return min(int(k), total)

    def forget(self, stages: Sequence[str]) -> None:
        """``--overwrite``: drop the records of ``stages`` and their dependants, and partial checkpoints.

        Every process forgets (so that all of them run the same stages); rank 0 writes.
        """
        dropped = self.state.forget(stages)
        if not is_global_zero():
            return
        folders = {name.split("/")[0] for name in dropped}  # "mask/<method>" -> mask
        for folder in [""] if "heads" in folders else sorted(folders):  # every stage depends on heads
            shutil.rmtree(self.run_dir / "tensorboard" / folder, ignore_errors=True)
        shutil.rmtree(self.partial_dir, ignore_errors=True)
        if "ape" in dropped:
            (self.run_dir / "bank_ape.json").unlink(missing_ok=True)
        if any(name.startswith("mask/") for name in dropped):  # no stale rows in the reports
            if self.masking_report() is None:
                for name in ("masking.json", "masking.md"):
                    (self.run_dir / name).unlink(missing_ok=True)
            else:
                self.write_masking(log=False)
        if dropped:
            say(f"{self.config.name()}/{self.task}: --overwrite, recomputing {', '.join(dropped)}")
            self.save_state()

    # §2
    def heads(self) -> None:
        fingerprint = self.fingerprint("heads")
        if self.state.is_done("heads", fingerprint):
            self.note("heads", "skipped", "already done")
            return
        settings = self.config.heads
        compare_utility = settings.compare_utility
        negatives = heads_retrieval_negatives(self.config)
        if self.task == "retrieval" and negatives == 0 and "metric" in (settings.utility, compare_utility):
            if settings.utility == "metric":
                raise AnalysisError(
                    "the metric utility of retrieval is NDCG@5 over each image's candidates; give "
                    "heads.retrieval_negatives > 0 (e.g. 49) or use utility teacher_forced"
                )
            say(f"{self.config.name()}/retrieval heads: no negatives, so no NDCG to compare with (heads.retrieval_negatives)")
            compare_utility = None
        ranking = self.task == "retrieval" and negatives > 0
        datamodule = build_datamodule(
            self.config, self.task, self.config.discovery, with_targets=settings.utility == "teacher_forced",
            ranking=ranking, retrieval_negatives=negatives,
        )
        k = self.top_k()
        say(f"{self.config.name()}/{self.task} heads (§2): {len(datamodule.items)} discovery items, utility {settings.utility}, K={k}")
        with warnings.catch_warnings():
            if compare_utility != settings.compare_utility:  # dropped above, with the reason said
                warnings.filterwarnings("ignore", message="HeadLocalizationCallback: utility='teacher_forced' without")
            callback = HeadLocalizationCallback(
                task=self.task,
                utility=settings.utility,
                top_k=k,
                rows_per_forward=settings.rows_per_forward,
                rerun=settings.rerun,
                metric_mode=settings.metric_mode,
                max_new_tokens=settings.max_new_tokens,
                compare_utility=compare_utility,
                stages=("predict",),
                output_dir=self.run_dir,
            )
        self.run_pass(callback, datamodule, "heads", fingerprint)
        scores = callback.scores
        assert scores is not None
        self._head_scores = scores
        info = {"num_items": scores.num_items, "baseline": scores.baseline, "top_heads": [[l, h] for l, h in callback.top_heads]}
        if callback.agreement:
            info["agreement"] = {name: (value if math.isfinite(value) else None) for name, value in callback.agreement.items()}
        self.state.mark_done("heads", fingerprint, info)
        self.save_state()
        self.note("heads", "ran", f"H* = {info['top_heads']}")

    def head_scores(self) -> HeadScores:
        if self._head_scores is None:
            self._head_scores = load_head_scores(self.run_dir / "head_scores.safetensors")
        return self._head_scores

    # §3
    def neurons(self) -> None:
        fingerprint = self.fingerprint("neurons")
        if self.state.is_done("neurons", fingerprint):
            self.note("neurons", "skipped", "already done")
            return
        if not self.state.is_done("heads", self.fingerprint("heads")):
            raise AnalysisError(f"{self.run_dir}: the heads stage has not run; run `analyze.py heads` (or `all`) first")
        settings = self.config.neurons
        datamodule = build_datamodule(self.config, self.task, self.config.discovery, with_targets=False)
        say(f"{self.config.name()}/{self.task} neurons (§3): {len(datamodule.items)} discovery items, top_ratio {settings.top_ratio}")
        callback = NeuronAttributionCallback(
            heads=self.head_scores(),
            top_k=self.top_k(),
            top_ratio=settings.top_ratio,
            task=self.task,
            idf="auto" if settings.caption_idf else None,
            rows_per_forward=settings.rows_per_forward,
            activation_statistics=True,
            gradient_baseline=settings.gradient_baseline,
            baseline_seed=settings.baseline_seed,
            stages=("predict",),
            output_dir=self.run_dir,
        )
        trainer = self.run_pass(callback, datamodule, "neurons", fingerprint)
        assert callback.result is not None
        extra = statistic_banks(callback.result.activation_statistics, len(callback.bank))
        banks = {**callback.banks, **extra}
        num_layers = callback.result.importance.shape[0]
        if is_global_zero():
            for name, entries in extra.items():
                write_bank(self.run_dir / f"bank_{name}.json", entries)
            counts = {name: neurons_per_layer(entries, num_layers) for name, entries in banks.items()}
            for logger in trainer.loggers:
                experiment = getattr(logger, "experiment", None)
                if experiment is not None and hasattr(experiment, "add_figure"):
                    title = f"{self.task}: neurons per layer, every selection ({len(callback.bank)} each)"
                    experiment.add_figure(f"attribution/{self.task}/neurons_per_layer_all", neurons_per_layer_figure(counts, title))
                    experiment.flush()
        barrier()
        info = {
            "num_items": callback.result.num_items,
            "num_neurons": len(callback.bank),
            "heads": [[l, h] for l, h in callback.result.heads],
            "neurons_per_layer": {name: neurons_per_layer(entries, num_layers).tolist() for name, entries in banks.items()},
            "bank_digests": {name: io.file_digest(self.run_dir / f"bank_{name}.json") for name in banks},
        }
        self.state.mark_done("neurons", fingerprint, info)
        self.save_state()
        self.note("neurons", "ran", f"{len(callback.bank)} neurons per selection")

    # APE (all four tasks)
    def ape(self, banks: dict[str, list[BankEntry]] | None, reason: str = "") -> None:
        """Record this task's APE bank (``banks``: every task's APE selection; None: not computable, ``reason`` says why)."""
        fingerprint = self.fingerprint("ape")
        if self.state.is_done("ape", fingerprint):
            self.note("ape", "skipped", "already done")
            return
        if banks is None:
            self.note("ape", "pending", f"{reason} (run `analyze.py all --tasks vqa,ocr,caption,retrieval`)")
            return
        if is_global_zero():
            write_bank(self.run_dir / "bank_ape.json", banks[self.task])
        barrier()
        digest = io.file_digest(self.run_dir / "bank_ape.json")
        self.state.mark_done("ape", fingerprint, {"num_neurons": len(banks[self.task]), "bank_digests": {"ape": digest}})
        self.save_state()
        self.note("ape", "ran", f"{len(banks[self.task])} neurons")

    # §4
    def mask(self) -> None:
        methods = list(self.config.masking.methods)
        if not self.state.is_done("neurons", self.fingerprint("neurons")):
            raise AnalysisError(f"{self.run_dir}: the neurons stage has not run; run `analyze.py neurons` (or `all`) first")
        pending: list[str] = []
        for method in methods:
            self.check_bank_unchanged(method)
            if self.state.is_done(f"mask/{method}", self.fingerprint(f"mask/{method}")):
                continue
            if method == "ape" and self.state.record("ape") is None:
                self.note("mask/ape", "pending", "no APE bank yet")
                continue
            if not (self.run_dir / f"bank_{method}.json").is_file():
                raise AnalysisError(f"{self.run_dir / f'bank_{method}.json'}: missing; rerun the neurons stage with --overwrite")
            pending.append(method)
        done = [m for m in methods if m not in pending and self.state.record(f"mask/{m}") is not None]
        if done:
            self.note("mask", "skipped", f"already done: {', '.join(done)}")
        if pending:
            self._mask_pass(pending)
        self.write_masking(log=bool(pending))

    def check_bank_unchanged(self, method: str) -> None:
        """``AnalysisError`` when ``bank_<method>.json`` is not the file its stage wrote (edited or
        replaced since): masking it would report a selection the run did not make. Records made
        before the digests were kept are not checked."""
        record = self.state.record("ape" if method == "ape" else "neurons") or {}
        recorded = record.get("info", {}).get("bank_digests", {}).get(method)
        path = self.run_dir / f"bank_{method}.json"
        if recorded is not None and path.is_file() and io.file_digest(path) != recorded:
            stage = "APE" if method == "ape" else "neurons"
            raise AnalysisError(
                f"{path}: changed since the {stage} stage wrote it; restore it, or recompute the banks with "
                f"`analyze.py neurons --overwrite` (to mask a selection of your own: scripts/, TaskRun.mask_test_split)"
            )

    def _mask_pass(self, methods: Sequence[str]) -> None:
        settings = self.config.masking
        datamodule = build_datamodule(self.config, self.task, self.config.test, with_targets=False)
        say(f"{self.config.name()}/{self.task} masking (§4): {len(datamodule.items)} test items, methods {', '.join(methods)}")
        adapter = self.module.adapter
        banks = {m: read_bank(self.run_dir / f"bank_{m}.json", adapter.num_layers, adapter.ffn_width) for m in methods}
        callback = MaskingVerificationCallback(
            banks=banks,
            task=self.task,
            metric_mode=settings.metric_mode,
            max_new_tokens=settings.max_new_tokens,
            stages=("predict",),
        )
        pass_fingerprint = {"methods": list(methods), **{m: self.fingerprint(f"mask/{m}") for m in methods}}
        self.run_pass(callback, datamodule, "mask", pass_fingerprint)
        results = callback.results
        for method in methods:
            row = masking_row(results["base"], results["banks"][method]["masked"], results["banks"][method]["num_neurons"])
            info = {**row, "metric": results["metric"], "num_items": len(datamodule.items), **skipped_on_load(datamodule)}
            self.state.mark_done(f"mask/{method}", self.fingerprint(f"mask/{method}"), info)
        self.save_state()
        self.note("mask", "ran", ", ".join(f"{m} {results['banks'][m]['masked']:.4f}" for m in methods) + f" (base {results['base']:.4f})")

    def masking_report(self) -> dict[str, Any] | None:
        """``masking.json``'s content from the finished mask stages (None when there is none)."""
        rows: dict[str, Any] = {}
        metric, num_items, skipped = "", 0, None
        for method in self.config.masking.methods:
            record = self.state.record(f"mask/{method}")
            if record is None:
                continue
            info = dict(record["info"])
            metric, num_items = info.pop("metric", metric), info.pop("num_items", num_items)
            skipped = info.pop("skipped", skipped)
            rows[method] = info
        if not rows:
            return None
        return {
            "task": self.task,
            "split": self.config.test.split,
            "metric": metric,
            "metric_mode": self.config.masking.metric_mode,
            "num_items": num_items,
            **({"skipped": skipped} if skipped else {}),  # bad test items skipped by lenient loading
            "methods": rows,
        }

    def write_masking(self, log: bool = True) -> None:
        """Write ``masking.json`` / ``masking.md`` (and, with ``log``, the table as TensorBoard text)."""
        report = self.masking_report()
        if report is None or not is_global_zero():
            return
        write_masking_report(self.run_dir, report)
        if not log:
            return
        logger = self.logger("mask")
        logger.experiment.add_text(f"masking/{self.task}", masking_markdown(report))
        logger.finalize("success")


# -- the whole run ----------------------------------------------------------------------------
def compute_ape(
    config: AnalyzeConfig, runs: dict[str, TaskRun], identity: str | None = None
) -> tuple[dict[str, list[BankEntry]] | None, str]:
    """Every task's APE bank when all four tasks' neuron stages are done with these settings.

    Returns ``(banks, "")``, or ``(None, reason)`` naming the tasks that are missing or
    were computed with other settings (APE then stays pending; it is not an error for
    the tasks being run).
    """
    missing, different = [], []
    for task in TASKS:
        run = runs.get(task)
        state = run.state if run is not None else RunState(config.run_dir(task) / "state.json")
        try:
            if not state.is_done("neurons", stage_fingerprint(config, task, "neurons", identity)):
                missing.append(task)
        except StageMismatchError:
            different.append(task)
    if missing or different:
        parts = [f"no neuron stage yet for {', '.join(missing)}"] if missing else []
        parts += [f"the neuron stage of {', '.join(different)} used other settings"] if different else []
        return None, "APE needs the four tasks' neuron stages with these settings: " + "; ".join(parts)
    probabilities, budgets = {}, {}
    for task in TASKS:
        run_dir = config.run_dir(task)
        probabilities[task] = load_activation_probability(run_dir / "importance.safetensors")
        budgets[task] = len(read_bank(run_dir / "bank_hones.json"))
    return ape_banks(probabilities, budgets), ""


def run_analysis(
    config: AnalyzeConfig,
    command: str = "all",
    extra_callbacks: Sequence[Callback] = (),
    adapter_factory: Callable[[], Any] | None = None,
) -> list[StageOutcome]:
    """Run ``command`` ("all", "heads", "neurons", "mask") for every task of ``config``.

    ``all``: heads and neurons per task, then APE (once the four tasks have statistics),
    then masking per task. ``mask`` also records APE banks when it can. Returns what
    happened to each stage.
    """
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {COMMANDS}; got {command!r}")
    check_disjoint_splits({"discovery": config.discovery.split_file, "test": config.test.split_file})
    tasks = config.task_list()
    for task in tasks:  # every process: a folder that cannot be written stops the run now, not after its first pass
        io.make_output_dir(config.run_dir(task))
    if command == "all":
        for task in tasks:  # a bad test item stops the run now (before --overwrite forgets anything), not after the discovery stages
            build_datamodule(config, task, config.test, with_targets=False)
    identity = model_identity(config.model)
    module = AttributionModule(config.model, config.dtype, config.trust_remote_code, adapter_factory)
    module.configure_model()
    runs = {task: TaskRun(config, task, module, extra_callbacks, identity) for task in tasks}
    if config.overwrite:
        first = {"all": ["heads"], "heads": ["heads"], "neurons": ["neurons"], "mask": ["mask/", "ape"]}[command]
        for run in runs.values():
            run.forget(first)
    barrier()
    for run in runs.values():
        if command in ("all", "heads"):
            run.heads()
        if command in ("all", "neurons"):
            run.neurons()
    if command in ("all", "mask"):
        if "ape" in config.masking.methods:
            banks, reason = compute_ape(config, runs, identity)
            for run in runs.values():
                run.ape(banks, reason)
        for run in runs.values():
            run.mask()
    return [outcome for run in runs.values() for outcome in run.outcomes]


__all__ = [
    "AttributionModule",
    "COMMANDS",
    "METHODS",
    "StageOutcome",
    "TaskRun",
    "build_datamodule",
    "compute_ape",
    "run_analysis",
]
