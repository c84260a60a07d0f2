"""Driver of the cross-task analyses of one model (HONES_METHOD §4 "Paper analyses").

Takes the four tasks' neuron banks of one model and writes, into ONE run directory
(layout: ``hones.analysis.report``):

==========================  =====================================  ==========================
analysis                    figures (PNG + TensorBoard image)      tables (JSON + markdown)
==========================  =====================================  ==========================
layer preference            ``layer_preference``                   ``layer_counts``
overlap groups              ``overlap_groups``                     ``overlap_groups``
Jaccard between tasks       ``jaccard``                            ``jaccard``
cross-ablation (test split) ``cross_ablation``                     ``cross_ablation``
logit lens                  ``logit_lens_<task>_<k>``              ``logit_lens``
==========================  =====================================  ==========================

plus ``analysis.json`` (what was run, on which banks, and where every artifact is).

Banks: ``<banks>/<task>/bank_<bank_name>.json`` for each task (the layout ``analyze.py``
writes under ``runs/analyze/<model>/``), or explicit ``bank_files: {task: path}``.

CLI (jsonargparse; the function's type hints are the config schema)::

    python -m hones.analysis.run --config configs/analysis/toy_llava.yaml [--data.limit 8 ...]
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hones import io
from hones.analysis.cross_ablation import cross_ablation, plot_cross_ablation
from hones.analysis.layer_preference import layer_counts, layer_counts_table, plot_layer_preference
from hones.analysis.logit_lens import lens_rows, plot_logit_lens, token_label, top_delta_tokens
from hones.analysis.logit_lens import logit_lens as compute_logit_lens  # `logit_lens` names the config below
from hones.analysis.overlap import (
    OverlapGroup,
    jaccard_matrix,
    jaccard_table,
    neuron_set,
    overlap_groups,
    overlap_table,
    plot_jaccard,
    plot_overlap_groups,
)
from hones.analysis.report import AnalysisReport
from hones.attribution.bank import BankEntry, BankError, bank_to_layer_dict, read_bank
from hones.attribution.settings import make_datamodule
from hones.choices import TASKS, DType, MetricMode, SettingsError

logger = logging.getLogger("hones.analysis")

LENS_MASKS = ("bank", "specific")


@dataclass
class DataConfig:
    """The held-out split the cross-ablation and the logit lens read (HONES_METHOD §4: test).

    limit: images per task (None: the whole split); task_limits overrides it per task
    (retrieval items are 1 + n_neg candidates per image, so it usually gets fewer images).
    n_neg: retrieval negatives per image (§1: 49).
    lenient: skip and count bad records instead of stopping (as ``analyze.py``'s ``data.lenient``);
    num_workers: data-loading workers; cache_dir: the parsed-annotation cache (None: none).
    """

    dataset: str = "coco_unified"
    annotation_file: str = "toyworld_data/coco/unified.json"
    image_root: str | None = "toyworld_data/coco/images"
    split: str = "test"
    split_file: str | None = "toyworld_data/splits/test.json"
    limit: int | None = None
    task_limits: dict[str, int] = field(default_factory=dict)
    batch_size: int = 8
    seed: int = 0
    n_neg: int = 49
    lenient: bool = False
    num_workers: int = 0
    cache_dir: str | None = None


@dataclass
class EvaluationConfig:
    """How the cross-ablation scores a task (as evaluation and masking verification do).

    skip_empty_groups: an empty group masks nothing (drop 0 by definition): do not run it.
    """

    enabled: bool = True
    metric_mode: MetricMode = "paper"
    max_new_tokens: int = 24
    skip_empty_groups: bool = True


@dataclass
class LogitLensConfig:
    """Which examples and which mask the logit lens shows.

    examples_per_task: the first k test items of each task (retrieval: positive candidates).
    mask: "bank" (the task's whole selected set) or "specific" (its task-specific group).
    """

    enabled: bool = True
    examples_per_task: int = 1
    top_k: int = 5
    mask: str = "bank"


# -- banks ----------------------------------------------------------------------------------
def bank_paths(
    banks: str | Path | None, tasks: Sequence[str], bank_name: str = "hones", bank_files: dict[str, str] | None = None
) -> dict[str, Path]:
    """task -> bank file: ``bank_files[task]`` if given, else ``<banks>/<task>/bank_<bank_name>.json``."""
    paths: dict[str, Path] = {}
    for task in tasks:
        if bank_files and task in bank_files:
            paths[task] = Path(bank_files[task])
        elif banks is not None:
            paths[task] = Path(banks) / task / f"bank_{bank_name}.json"
        else:
            raise BankError(f"no bank for task {task!r}: give `banks` (a run root) or `bank_files`")
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise BankError(f"neuron bank(s) not found: {', '.join(missing)} (run `analyze.py` for these tasks first)")
    return paths


def load_banks(paths: dict[str, Path], num_layers: int, ffn_width: int) -> dict[str, list[BankEntry]]:
    """Read and validate every task's bank against the model's shape."""
    return {task: read_bank(path, num_layers, ffn_width) for task, path in paths.items()}


# -- data -----------------------------------------------------------------------------------
def split_datamodule(adapter: Any, task: str, data: DataConfig) -> Any:
    """A set-up ``HonesDataModule`` of ``task`` on ``data``'s split, encoding with the adapter."""
    limit = data.task_limits.get(task, data.limit)
    module = make_datamodule(data, task, data.split, split_file=data.split_file, limit=limit, n_neg=data.n_neg)
    module.setup("test")
    module.set_encoder(adapter.encode)
    return module


# -- the analyses ---------------------------------------------------------------------------
def _markdown_cell(text: str) -> str:
    """Text safe inside a markdown table cell or inline code span (no pipes, one line)."""
    return text.replace("|", "\\|").replace("\n", " ↵ ")


def _lens_examples(module: Any, task: str, count: int) -> list[int]:
    """Indices of the first ``count`` items (retrieval: positive candidates only)."""
    indices = [i for i, item in enumerate(module.items) if task != "retrieval" or item.label == 1]
    return indices[:count]


def _lens_mask(task: str, banks: dict[str, list[BankEntry]], groups: Sequence[OverlapGroup], mask: str) -> dict[int, Any]:
    if mask == "bank":
        return bank_to_layer_dict(banks[task])
    specific = next(g for g in groups if g.tasks == (task,))
    return specific.layer_dict()


def run_logit_lens(
    adapter: Any,
    modules: dict[str, Any],
    banks: dict[str, list[BankEntry]],
    groups: Sequence[OverlapGroup],
    config: LogitLensConfig,
    report: AnalysisReport,
) -> dict[str, Any]:
    """Logit lens of each task's chosen examples under the configured mask; figures + table."""
    examples: list[dict[str, Any]] = []
    markdown: list[str] = [f"# Logit lens: top-{config.top_k} tokens of Δlogit = baseline − masked per layer\n"]
    for task, module in modules.items():
        neurons = _lens_mask(task, banks, groups, config.mask)
        mask_size = sum(int(ids.numel()) for ids in neurons.values())
        for k, index in enumerate(_lens_examples(module, task, config.examples_per_task)):
            item = module.dataset[index]
            batch = module.collate()([item])
            lens = compute_logit_lens(adapter, batch, neurons)
            values, ids = top_delta_tokens(lens.delta[0], config.top_k)  # [L, k]
            rows = lens_rows(adapter.tokenizer, values, ids)
            base_top = int(lens.baseline[0, -1].argmax())
            masked_top = int(lens.masked[0, -1].argmax())
            example = {
                "task": task,
                "uid": item.uid,
                "prompt": item.prompt,
                "target": item.target,
                "mask": config.mask,
                "mask_size": mask_size,
                "next_token_base": token_label(adapter.tokenizer, base_top),
                "next_token_masked": token_label(adapter.tokenizer, masked_top),
                "layers": rows,
            }
            examples.append(example)
            name = f"logit_lens_{task}_{k}"
            title = (
                f"{task} · {item.uid}\nmask: {config.mask} ({mask_size} neurons) · next token "
                f"{example['next_token_base']!r} → {example['next_token_masked']!r} when masked"
            )
            report.add_figure(name, plot_logit_lens(rows, title=title))
            markdown.append(
                f"\n## {task} · `{item.uid}`\n\nprompt: `{_markdown_cell(item.prompt)}` · target: "
                f"`{_markdown_cell(item.target)}` · mask: {config.mask} ({mask_size} neurons) · next token "
                f"`{_markdown_cell(example['next_token_base'])}` → `{_markdown_cell(example['next_token_masked'])}`\n\n"
            )
            table_rows = [
                [f"L{layer}", *(f"{_markdown_cell(c['token'])} ({c['delta']:+.3g})" for c in row)]
                for layer, row in enumerate(rows)
            ]
            markdown.append(io.markdown_table(["layer", *(f"#{r + 1}" for r in range(len(rows[0])))], table_rows))
    data = {"top_k": config.top_k, "mask": config.mask, "examples": examples}
    report.add_table("logit_lens", data, "".join(markdown))
    return data


def run_cross_task_analysis(
    model: str = "models/toy-llava",
    banks: str | None = None,
    tasks: list[str] = list(TASKS),
    data: DataConfig = DataConfig(),
    out_dir: str | None = None,
    bank_name: str = "hones",
    bank_files: dict[str, str] | None = None,
    evaluation: EvaluationConfig = EvaluationConfig(),
    logit_lens: LogitLensConfig = LogitLensConfig(),
    dtype: DType = "fp32",
    device: str = "cpu",
    tensorboard: bool = True,
    adapter: Any = None,
) -> dict[str, Any]:
    """Run every cross-task analysis of one model and write them into ``out_dir``.

    Args:
        model: hub id or directory of the VLM (ignored for loading when ``adapter`` is given).
        banks: run root holding ``<task>/bank_<bank_name>.json`` (e.g. ``runs/analyze/toy-llava``).
        tasks: the tasks compared (the paper's four by default; at least one).
        data: the test split to score (cross-ablation) and take lens examples from.
        out_dir: the run directory (default ``runs/analysis/<model name>``).
        bank_name: which bank of each task (``hones``, or a baseline's name).
        bank_files: task -> bank file, overriding ``banks``.
        evaluation: cross-ablation scoring; logit_lens: lens examples and mask.
        dtype, device: how to load ``model``.
        tensorboard: also write TensorBoard images/text (PNG/JSON/markdown are always written).
        adapter: a ready ``VLMAdapter`` (tests, notebooks) instead of loading ``model``.

    Returns the summary also written as ``<out_dir>/analysis.json``.
    """
    if not tasks:
        raise ValueError("give at least one task")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; expected some of {TASKS}")
    if logit_lens.mask not in LENS_MASKS:
        raise ValueError(f"logit_lens.mask must be one of {LENS_MASKS}; got {logit_lens.mask!r}")
    started = time.perf_counter()
    if adapter is None:
        from hones.models import load_adapter

        adapter = load_adapter(model, dtype=dtype, device=device)
    adapter.model.eval()
    model_name = adapter.name or Path(model).name
    out = io.make_output_dir(Path(out_dir) if out_dir is not None else Path("runs/analysis") / model_name)
    paths = bank_paths(banks, tasks, bank_name, bank_files)
    task_banks = load_banks(paths, adapter.num_layers, adapter.ffn_width)
    timings: dict[str, float] = {}
    modules = {task: split_datamodule(adapter, task, data) for task in tasks}  # bad data stops here, before any output

    with AnalysisReport(out, tensorboard=tensorboard) as report:
        # layer preference
        counts = layer_counts(task_banks, adapter.num_layers)
        report.add_table("layer_counts", *layer_counts_table(tasks, counts))
        report.add_figure("layer_preference", plot_layer_preference(tasks, counts, f"Layer preference · {model_name}"))

        # overlap groups and Jaccard
        sets = {task: neuron_set(task_banks[task]) for task in tasks}
        groups = overlap_groups(sets)
        union_size = len(set().union(*sets.values()))
        report.add_table("overlap_groups", *overlap_table(groups, union_size))
        report.add_figure("overlap_groups", plot_overlap_groups(groups, f"Overlap groups · {model_name}"))
        jaccard = jaccard_matrix(sets)
        report.add_table("jaccard", *jaccard_table(tasks, jaccard))
        report.add_figure(
            "jaccard",
            plot_jaccard(tasks, jaccard, [len(sets[t]) for t in tasks], f"Jaccard of selected sets · {model_name}"),
        )

        ablation_summary: dict[str, Any] | None = None
        if evaluation.enabled:
            tick = time.perf_counter()
            result = cross_ablation(
                adapter,
                {task: module.test_dataloader() for task, module in modules.items()},
                groups,
                metric_mode=evaluation.metric_mode,
                max_new_tokens=evaluation.max_new_tokens,
                skip_empty=evaluation.skip_empty_groups,
            )
            timings["cross_ablation_s"] = time.perf_counter() - tick
            ablation_summary = {**result.to_json(), "metric_mode": evaluation.metric_mode, "split": data.split}
            report.add_table("cross_ablation", ablation_summary, result.markdown())
            report.add_figure(
                "cross_ablation", plot_cross_ablation(result, f"Cross-ablation on {data.split} · {model_name}")
            )
            logger.info("cross-ablation: %d groups x %d tasks in %.1fs", len(groups), len(tasks), timings["cross_ablation_s"])

        if logit_lens.enabled:
            tick = time.perf_counter()
            run_logit_lens(adapter, modules, task_banks, groups, logit_lens, report)
            timings["logit_lens_s"] = time.perf_counter() - tick

        summary = {
            "model": model_name,
            "model_path": str(model),
            "tasks": list(tasks),
            "bank_name": bank_name,
            "bank_files": {task: str(path) for task, path in paths.items()},
            "num_layers": adapter.num_layers,
            "ffn_width": adapter.ffn_width,
            "bank_sizes": {task: len(entries) for task, entries in task_banks.items()},
            "union_size": union_size,
            "data": asdict(data),
            "evaluation": asdict(evaluation),
            "logit_lens": asdict(logit_lens),
            "figures": dict(report.figures),
            "tables": dict(report.tables),
            "tensorboard": "tensorboard" if tensorboard else None,
            "timings_s": {**timings, "total_s": time.perf_counter() - started},
        }
    io.write_json(out / "analysis.json", _finite(summary))
    logger.info("analysis of %s written to %s", model_name, out)
    return summary


def _finite(obj: Any) -> Any:
    """Replace NaN/inf floats by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# -- CLI ------------------------------------------------------------------------------------
def build_parser() -> Any:
    """The jsonargparse parser of :func:`run_cross_task_analysis` (``--config`` YAML + flags)."""
    from jsonargparse import ActionConfigFile

    from hones.cli_parsing import ArgumentParser

    parser = ArgumentParser(
        prog="python -m hones.analysis.run",
        description="Cross-task analyses (layer preference, overlap, cross-ablation, logit lens) of one model's banks.",
    )
    parser.add_argument("--config", action=ActionConfigFile, help="YAML config (see configs/analysis/)")
    parser.add_function_arguments(run_cross_task_analysis, skip={"adapter"})
    return parser


def run_from_namespace(parser: Any, config: Any) -> dict[str, Any]:
    """Run the analysis from a namespace parsed by :func:`build_parser`, also a subcommand's
    namespace (``parsed.analysis``), instantiated already (``parser.instantiate(parsed)``) or not."""
    instantiated = isinstance(getattr(config, "data", None), DataConfig)
    init = dict(vars(config if instantiated else parser.instantiate(config)))  # top-level keys
    init.pop("config", None)
    init.pop("__path__", None)
    return run_cross_task_analysis(**init)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hones.analysis.run --config configs/analysis/toy_llava.yaml``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = build_parser()
    config = parser.parse_args(list(argv) if argv is not None else None)
    from hones.data.errors import DataError
    from hones.models.registry import ModelError

    try:
        summary = run_from_namespace(parser, config)
    except (BankError, DataError, ModelError, SettingsError, io.OutputError) as error:  # bad data, banks or model folder: named, in one line
        print(f"hones.analysis.run: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(summary['figures'])} figures and {len(summary['tables'])} tables")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
