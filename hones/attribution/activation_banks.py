"""AP / MA / APE neuron selections at the HONES budget (the activation-statistics baselines).

The statistics come from the discovery pass of ``NeuronAttributor`` (the same base
forward as the write-in contributions; ``ActivationStatisticsCollector``) and are stored
in each task's ``importance.safetensors`` as ``stat_activation_probability`` and
``stat_mean_activation`` ``[L, I]``. Counted positions: every non-padding prompt position
(chat template, image tokens and the question), never a target token.

- AP (activation probability): for task t, the neurons with the highest fraction of
  counted positions with z > 0.
- MA (mean activation): the neurons with the highest mean z over those positions.
- APE (activation-probability entropy, LAPE-style; ``baselines.ape_selection``): needs
  the AP of all four tasks; p_t = AP_t / Σ AP over tasks, entropy −Σ p ln p; for task t the
  lowest-entropy neurons among those whose AP is highest on t.

Every selection takes exactly as many neurons as the task's HONES bank (the global top
``top_ratio``), fewer only when too few neurons are eligible (APE).
"""

from __future__ import annotations

import os
from typing import Mapping

from torch import Tensor

from hones.attribution.bank import BankEntry, load_matrices
from hones.attribution.baselines import ape_selection, select_top_neurons
from hones.attribution.settings import TASKS

AP_KEY = "stat_activation_probability"


def statistic_banks(statistics: Mapping[str, Tensor], budget: int) -> dict[str, list[BankEntry]]:
    """AP and MA selections of one task.

    Args:
        statistics: ``NeuronAttribution.activation_statistics`` (``activation_probability``,
            ``mean_activation`` ``[L, I]``).
        budget: number of neurons (the HONES bank's size).

    Returns ``{"ap": entries, "ma": entries}``.
    """
    missing = [k for k in ("activation_probability", "mean_activation") if k not in statistics]
    if missing:
        raise ValueError(f"activation statistics lack {missing}; run the neuron pass with activation_statistics=True")
    return {
        "ap": select_top_neurons(statistics["activation_probability"], count=budget),
        "ma": select_top_neurons(statistics["mean_activation"], count=budget),
    }


def load_activation_probability(importance_file: str | os.PathLike) -> Tensor:
    """AP ``[L, I]`` of one task from its ``importance.safetensors``."""
    matrices = load_matrices(importance_file)
    if AP_KEY not in matrices:
        raise ValueError(f"{importance_file}: no {AP_KEY} (the neuron pass ran without activation statistics)")
    return matrices[AP_KEY]


def ape_banks(activation_probability: Mapping[str, Tensor], budgets: Mapping[str, int]) -> dict[str, list[BankEntry]]:
    """APE selections of every task from the four tasks' AP ``[L, I]``.

    Args:
        activation_probability: task -> AP, all of ``TASKS`` (the entropy is over the four tasks).
        budgets: task -> number of neurons (each task's HONES budget).
    """
    missing = [t for t in TASKS if t not in activation_probability]
    if missing:
        raise ValueError(f"APE needs the AP statistics of all four tasks; missing {missing}")
    shapes = {tuple(activation_probability[t].shape) for t in TASKS}
    if len(shapes) != 1:
        raise ValueError(f"AP matrices of the four tasks differ in shape: {sorted(shapes)}")
    ordered = {t: activation_probability[t] for t in TASKS}
    return ape_selection(ordered, {t: int(budgets[t]) for t in TASKS})
