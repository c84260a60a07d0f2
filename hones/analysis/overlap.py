"""Overlap of the tasks' selected neurons (HONES_METHOD §4 "Paper analyses").

A neuron is a ``(layer, neuron)`` pair. For each non-empty subset S of the tasks, the
*exact-membership group* of S holds the neurons selected by every task in S and by no
task outside S. With four tasks that gives 15 disjoint groups: 4 task-specific (|S| = 1),
6 pairs, 4 triples and 1 general group (all four); their sizes sum to the size of the
union of the tasks' sets. ``jaccard_matrix`` compares the tasks' full sets pairwise:
J(A, B) = |A ∩ B| / |A ∪ B|.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from hones import io
from hones.analysis.report import new_figure
from hones.attribution.bank import BankEntry

Neuron = tuple[int, int]  # (layer, neuron index)


@dataclass(frozen=True)
class OverlapGroup:
    """Neurons selected by exactly the tasks in ``tasks`` (an exact-membership group)."""

    tasks: tuple[str, ...]
    neurons: frozenset[Neuron]
    kind: str  # "task-specific" | "pair" | "triple" | "general" | "<k>-way"

    @property
    def name(self) -> str:
        """``"vqa"``, ``"vqa+ocr"``, ... (tasks in the analysis' task order)."""
        return "+".join(self.tasks)

    @property
    def size(self) -> int:
        return len(self.neurons)

    def layer_dict(self) -> dict[int, Tensor]:
        """layer -> sorted LongTensor of neuron ids, the form ``zero_neurons`` takes."""
        layers: dict[int, list[int]] = {}
        for layer, neuron in self.neurons:
            layers.setdefault(layer, []).append(neuron)
        return {layer: torch.tensor(sorted(ids), dtype=torch.long) for layer, ids in sorted(layers.items())}


def neuron_set(entries: Sequence[BankEntry]) -> frozenset[Neuron]:
    """The bank's neurons as a set of ``(layer, neuron)``."""
    return frozenset((entry.layer, entry.neuron) for entry in entries)


def group_kind(group_size: int, num_tasks: int) -> str:
    """Name of a group by how many tasks it has: task-specific, pair, triple, general."""
    if group_size == num_tasks and num_tasks > 1:
        return "general"
    return {1: "task-specific", 2: "pair", 3: "triple"}.get(group_size, f"{group_size}-way")


def overlap_groups(sets: Mapping[str, frozenset[Neuron] | set[Neuron]]) -> list[OverlapGroup]:
    """All 2^T − 1 exact-membership groups, ordered by number of tasks, then by the order of
    ``sets`` (``itertools.combinations`` order). Empty groups are included (size 0).

    sets: task -> that task's selected neurons.
    """
    tasks = list(sets)
    membership: dict[Neuron, tuple[str, ...]] = {}
    for neuron in set().union(*sets.values()):
        membership[neuron] = tuple(task for task in tasks if neuron in sets[task])
    by_members: dict[tuple[str, ...], set[Neuron]] = {}
    for neuron, members in membership.items():
        by_members.setdefault(members, set()).add(neuron)
    groups = []
    for size in range(1, len(tasks) + 1):
        for subset in combinations(tasks, size):
            groups.append(OverlapGroup(subset, frozenset(by_members.get(subset, set())), group_kind(size, len(tasks))))
    return groups


def jaccard_matrix(sets: Mapping[str, frozenset[Neuron] | set[Neuron]]) -> Tensor:
    """Pairwise Jaccard index of the tasks' sets: ``[T, T]`` float64, NaN where both are empty."""
    tasks = list(sets)
    matrix = torch.full((len(tasks), len(tasks)), float("nan"), dtype=torch.float64)
    for i, a in enumerate(tasks):
        for j, b in enumerate(tasks):
            union = len(sets[a] | sets[b])
            if union:
                matrix[i, j] = len(sets[a] & sets[b]) / union
    return matrix


# -- tables ---------------------------------------------------------------------------------
def overlap_table(groups: Sequence[OverlapGroup], union_size: int) -> tuple[dict[str, Any], str]:
    """JSON ``{"union_size", "groups": [{"group", "tasks", "kind", "size", "neurons": [[l, i], ...]}]}``
    and a markdown table of the group sizes."""
    data = {
        "union_size": union_size,
        "groups": [
            {
                "group": g.name,
                "tasks": list(g.tasks),
                "kind": g.kind,
                "size": g.size,
                "neurons": [list(n) for n in sorted(g.neurons)],
            }
            for g in groups
        ],
    }
    rows: list[list[Any]] = [[g.name, g.kind, g.size] for g in groups]
    rows.append(["(union)", "", union_size])
    return data, io.markdown_table(["group", "kind", "neurons"], rows)


def jaccard_table(tasks: Sequence[str], matrix: Tensor) -> tuple[dict[str, Any], str]:
    """JSON ``{"tasks", "jaccard": [[...]]}`` (NaN as null) and a markdown matrix. matrix: ``[T, T]``."""
    values = [[None if v != v else float(v) for v in row] for row in matrix.tolist()]
    rows = [[task, *(float(v) for v in matrix[i].tolist())] for i, task in enumerate(tasks)]
    return {"tasks": list(tasks), "jaccard": values}, io.markdown_table(["", *tasks], rows, float_format="{:.3f}")


# -- figures --------------------------------------------------------------------------------
def plot_overlap_groups(groups: Sequence[OverlapGroup], title: str = "") -> Figure:
    """Bar chart of the exact-membership group sizes, coloured by kind."""
    colours = {"task-specific": "tab:blue", "pair": "tab:orange", "triple": "tab:green", "general": "tab:red"}
    figure = new_figure(max(5.0, 0.45 * len(groups) + 2.0), 3.8)
    axes = figure.add_subplot()
    positions = list(range(len(groups)))
    bars = axes.bar(positions, [g.size for g in groups], color=[colours.get(g.kind, "tab:gray") for g in groups])
    axes.bar_label(bars, fontsize="x-small")
    axes.set_xticks(positions, [g.name for g in groups], rotation=45, ha="right", fontsize="small")
    axes.set_ylabel("neurons (exact membership)")
    axes.set_title(title or "Overlap groups of the selected neurons")
    seen: dict[str, Any] = {}
    for bar, group in zip(bars, groups):
        seen.setdefault(group.kind, bar)
    axes.legend(list(seen.values()), list(seen), fontsize="small")
    axes.grid(axis="y", alpha=0.3)
    return figure


def plot_jaccard(tasks: Sequence[str], matrix: Tensor, sizes: Sequence[int] | None = None, title: str = "") -> Figure:
    """Heat map of the ``[T, T]`` Jaccard matrix, values written in the cells.

    The diagonal (always 1) is greyed out and shows the set size when ``sizes`` is given, so
    the colour scale (0 .. the largest off-diagonal value) resolves the overlaps.
    """
    num_tasks = len(tasks)
    off_diagonal = ~torch.eye(num_tasks, dtype=torch.bool)
    finite = matrix[off_diagonal & ~matrix.isnan()]
    vmax = max(float(finite.max()) if finite.numel() else 0.0, 0.05)
    shown = np.ma.masked_array(matrix.numpy(), mask=~off_diagonal.numpy())
    colours = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    figure = new_figure(1.0 * num_tasks + 2.2, 0.9 * num_tasks + 1.4)
    axes = figure.add_subplot()
    image = axes.imshow(shown, vmin=0.0, vmax=vmax, cmap=colours)
    positions = list(range(num_tasks))
    axes.set_xticks(positions, list(tasks), rotation=30, ha="right")
    axes.set_yticks(positions, list(tasks))
    for i in positions:
        for j in positions:
            value = float(matrix[i, j])
            if i == j:
                text, colour = (f"n={sizes[i]}" if sizes is not None else "1"), "black"
            else:
                text = "n/a" if value != value else f"{value:.2f}"
                colour = "white" if value != value or value < 0.6 * vmax else "black"
            axes.text(j, i, text, ha="center", va="center", color=colour, fontsize="small")
    axes.set_title(title or "Jaccard index of the tasks' selected sets")
    figure.colorbar(image, ax=axes, shrink=0.8, label="|A ∩ B| / |A ∪ B|")
    return figure
