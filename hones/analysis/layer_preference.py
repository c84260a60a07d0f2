"""Layer preference (HONES_METHOD §4 "Paper analyses"): how many of each task's selected
neurons sit in each decoder layer, one curve per task.

Plain functions: ``layer_counts`` (banks -> ``[T, L]`` counts), ``layer_counts_table``
(JSON + markdown) and ``plot_layer_preference`` (a matplotlib figure).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from hones import io
from hones.analysis.report import new_figure
from hones.attribution.bank import BankEntry, neurons_per_layer


def layer_counts(banks: Mapping[str, Sequence[BankEntry]], num_layers: int) -> Tensor:
    """Selected neurons per layer per task: ``[T, L]`` (long), rows in ``banks``' order."""
    if not banks:
        return torch.zeros(0, num_layers, dtype=torch.long)
    return torch.stack([neurons_per_layer(entries, num_layers) for entries in banks.values()])


def layer_counts_table(tasks: Sequence[str], counts: Tensor) -> tuple[dict[str, Any], str]:
    """JSON data ``{"tasks", "num_layers", "counts": {task: [L]}, "totals": {task: n}}`` and a
    markdown table (one row per layer, one column per task, plus a total row).

    counts: ``[T, L]`` as returned by :func:`layer_counts`.
    """
    num_layers = int(counts.shape[1])
    data = {
        "tasks": list(tasks),
        "num_layers": num_layers,
        "counts": {task: counts[t].tolist() for t, task in enumerate(tasks)},
        "totals": {task: int(counts[t].sum()) for t, task in enumerate(tasks)},
    }
    rows: list[list[Any]] = [[layer, *(int(counts[t, layer]) for t in range(len(tasks)))] for layer in range(num_layers)]
    rows.append(["total", *(int(counts[t].sum()) for t in range(len(tasks)))])
    return data, io.markdown_table(["layer", *tasks], rows)


def plot_layer_preference(tasks: Sequence[str], counts: Tensor, title: str = "") -> Figure:
    """Line plot: x = decoder layer, y = number of selected neurons, one line per task.

    counts: ``[T, L]``.
    """
    num_layers = int(counts.shape[1])
    figure = new_figure(max(5.0, 0.22 * num_layers + 3.0), 3.6)
    axes = figure.add_subplot()
    layers = list(range(num_layers))
    for t, task in enumerate(tasks):
        axes.plot(layers, counts[t].tolist(), marker="o", markersize=3, label=f"{task} (n={int(counts[t].sum())})")
    axes.set_xlabel("decoder layer")
    axes.set_ylabel("selected neurons")
    axes.set_title(title or "Layer preference of the selected neurons")
    axes.set_xticks(layers if num_layers <= 16 else layers[:: max(1, num_layers // 16)])
    axes.set_ylim(bottom=0)
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return figure
