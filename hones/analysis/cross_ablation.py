"""Cross-ablation of the overlap groups (HONES_METHOD §4 "Paper analyses").

For every overlap group (``hones.analysis.overlap``) and every task t: the task metric
P_t of the unmodified model and P_t with ``zero_neurons`` on the group's neurons (z_i = 0
at every position, prompt and generated tokens), on the held-out test split, and the
relative drop 100 · (P_t − P_t,masked) / |P_t| (NaN when P_t = 0). Every task is scored
exactly as evaluation and masking verification score it (``hones.evaluation.TaskScorer``
+ ``hones.metrics.build_metric``).

Each batch is encoded once and run ``1 + #groups`` times (base, then each mask), so a
DataLoader can be passed as it is. Single process: for multi-GPU masking of one bank use
``MaskingVerificationCallback`` under a Trainer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor
from tqdm import tqdm

from hones import io
from hones.analysis.overlap import OverlapGroup
from hones.analysis.report import new_figure
from hones.attribution.batches import ensure_prompt_only
from hones.attribution.reports import relative_drop
from hones.evaluation import TaskScorer
from hones.interventions import zero_neurons
from hones.metrics import build_metric

Batch = Mapping[str, Any]
LayerNeurons = Mapping[int, Tensor]


def _relative_drop_or_nan(base: float, masked: float) -> float:
    """``reports.relative_drop`` as a tensor entry: NaN where it is undefined (P = 0)."""
    relative = relative_drop(base, masked)
    return float("nan") if relative is None else relative


@torch.no_grad()
def masked_metrics(
    adapter: Any,
    batches: Iterable[Batch],
    task: str,
    masks: Mapping[str, LayerNeurons],
    metric_mode: str = "paper",
    max_new_tokens: int = 24,
    rows_out: dict[str, list[dict[str, Any]]] | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], int]:
    """The task metric of the model as it is (``"base"``) and under each mask.

    batches: encoded batches of ``task`` (``input_ids``, pixels, ``"items"``), e.g. a
        ``HonesDataModule.test_dataloader()``; batches with targets are re-encoded prompt-only.
    masks: name -> {layer: LongTensor of neuron ids}; an empty dict masks nothing.
    rows_out: if given, filled with name -> the per-item rows of ``TaskScorer.predict``
        (predictions, or retrieval margins) for inspection.
    progress: a progress bar over the batches (stderr).
    Returns ({"base": P, name: P_masked, ...}, number of items scored).
    """
    if "base" in masks:
        raise ValueError("'base' is reserved for the unmasked model; rename that mask")
    scorer = TaskScorer(task, max_new_tokens)
    metrics = {name: build_metric(task, metric_mode) for name in ("base", *masks)}
    num_items = 0
    total = len(batches) if isinstance(batches, Sized) else None
    for batch in tqdm(batches, desc=f"{task}: base + {len(masks)} masks", total=total, unit="batch", disable=not progress, leave=False):
        batch = ensure_prompt_only(adapter, batch)
        num_items += int(batch["input_ids"].shape[0])
        for name in metrics:
            with zero_neurons(adapter, masks.get(name, {})):
                rows = scorer.predict(adapter, batch)
            scorer.update(metrics[name], rows)
            if rows_out is not None:
                rows_out.setdefault(name, []).extend(rows)
    if num_items == 0:
        raise ValueError(f"masked_metrics: no {task} items to score")
    return {name: float(metric.compute()) for name, metric in metrics.items()}, num_items


@dataclass
class CrossAblation:
    """Result of :func:`cross_ablation`.

    tasks: T task names; groups: G group names; sizes: neurons per group ``[G]``;
    base: P_t ``[T]``; masked: P_t with group g masked ``[G, T]``;
    relative_drop: ``[G, T]`` in percent (NaN where P_t = 0);
    skipped: per group, True when it was empty and not evaluated (masked = base);
    num_items: items scored per task.
    """

    tasks: list[str]
    groups: list[str]
    sizes: list[int]
    base: Tensor
    masked: Tensor
    relative_drop: Tensor
    skipped: list[bool]
    num_items: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict; NaN becomes null."""

        def clean(value: float) -> float | None:
            return None if math.isnan(value) else float(value)

        return {
            "tasks": self.tasks,
            "num_items": self.num_items,
            "base": {task: clean(float(self.base[t])) for t, task in enumerate(self.tasks)},
            "groups": [
                {
                    "group": group,
                    "size": self.sizes[g],
                    "skipped_empty": self.skipped[g],
                    "masked": {task: clean(float(self.masked[g, t])) for t, task in enumerate(self.tasks)},
                    "relative_drop": {task: clean(float(self.relative_drop[g, t])) for t, task in enumerate(self.tasks)},
                }
                for g, group in enumerate(self.groups)
            ],
        }

    def markdown(self) -> str:
        """Relative drops (%) per group (rows) and task (columns), plus the base metric row."""
        rows: list[list[Any]] = [["(base metric)", "", *(float(v) for v in self.base.tolist())]]
        for g, group in enumerate(self.groups):
            rows.append([group, self.sizes[g], *(float(v) for v in self.relative_drop[g].tolist())])
        return io.markdown_table(["group", "neurons", *(f"{t} drop %" for t in self.tasks)], rows, float_format="{:.2f}")


def cross_ablation(
    adapter: Any,
    batches_by_task: Mapping[str, Iterable[Batch]],
    groups: Sequence[OverlapGroup],
    metric_mode: str = "paper",
    max_new_tokens: int = 24,
    skip_empty: bool = True,
    progress: bool = True,
) -> CrossAblation:
    """Mask each group and measure every task's relative drop (see the module docstring).

    batches_by_task: task -> its test batches (iterated once per task).
    skip_empty: an empty group masks nothing, so its masked metric is the base metric and
        its drop 0 by definition; True records that without running it, False runs it.
    """
    tasks = list(batches_by_task)
    evaluated = [g for g in groups if g.size > 0 or not skip_empty]
    masks = {g.name: g.layer_dict() for g in evaluated}
    base = torch.zeros(len(tasks), dtype=torch.float64)
    masked = torch.zeros(len(groups), len(tasks), dtype=torch.float64)
    num_items: dict[str, int] = {}
    for t, task in enumerate(tasks):
        values, num_items[task] = masked_metrics(
            adapter, batches_by_task[task], task, masks, metric_mode, max_new_tokens, progress=progress
        )
        base[t] = values["base"]
        for g, group in enumerate(groups):
            masked[g, t] = values.get(group.name, values["base"])
    drops = torch.tensor(
        [[_relative_drop_or_nan(float(base[t]), float(masked[g, t])) for t in range(len(tasks))] for g in range(len(groups))],
        dtype=torch.float64,
    ).reshape(len(groups), len(tasks))
    return CrossAblation(
        tasks=tasks,
        groups=[g.name for g in groups],
        sizes=[g.size for g in groups],
        base=base,
        masked=masked,
        relative_drop=drops,
        skipped=[g.name not in masks for g in groups],
        num_items=num_items,
    )


def plot_cross_ablation(result: CrossAblation, title: str = "", hide_empty: bool = True) -> Figure:
    """Grouped bar chart: x = overlap group (with its size), one bar per task = that task's
    relative drop (%) when the group is masked, its value written on it (up to 40 bars).
    NaN drops (P_t = 0) are drawn as 0 and marked "n/a"; empty groups are left out when
    ``hide_empty``."""
    shown = [g for g in range(len(result.groups)) if result.sizes[g] > 0 or not hide_empty]
    num_tasks = len(result.tasks)
    width = 0.8 / max(1, num_tasks)
    figure = new_figure(max(5.5, 0.28 * len(shown) * num_tasks + 2.5), 4.2)
    axes = figure.add_subplot()
    for t, task in enumerate(result.tasks):
        xs = [k + (t - (num_tasks - 1) / 2) * width for k in range(len(shown))]
        values = [float(result.relative_drop[g, t]) for g in shown]
        bars = axes.bar(xs, [0.0 if math.isnan(v) else v for v in values], width, label=f"{task} (P={float(result.base[t]):.3f})")
        for bar, value in zip(bars, values):
            if math.isnan(value):
                axes.annotate("n/a", (bar.get_x() + bar.get_width() / 2, 0), ha="center", va="bottom", fontsize="xx-small")
            elif len(shown) * num_tasks <= 40:  # values on the bars while they stay readable
                axes.annotate(
                    f"{value:.1f}",
                    (bar.get_x() + bar.get_width() / 2, value),
                    ha="center",
                    va="bottom" if value >= 0 else "top",
                    fontsize="xx-small",
                )
    axes.axhline(0.0, color="black", linewidth=0.8)
    labels = [f"{result.groups[g]}\n(n={result.sizes[g]})" for g in shown]
    axes.set_xticks(list(range(len(shown))), labels, rotation=45, ha="right", fontsize="small")
    axes.set_ylabel("relative drop (%)")
    axes.set_title((title or "Cross-ablation: masking each overlap group") + "\nrelative drop = 100·(P − P_masked)/|P|", fontsize="medium")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize="small", title="task (base metric)", title_fontsize="small")
    if not shown:
        axes.text(0.5, 0.5, "every overlap group is empty", ha="center", va="center", transform=axes.transAxes)
    return figure
