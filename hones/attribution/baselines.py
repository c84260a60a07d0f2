"""Neuron-identification baselines at the HONES budget (HONES_METHOD §4), and AP / MA / APE.

Scores ``[L, I]`` (higher = selected first), then ``select_top_neurons`` at the same count
as the HONES selection:

- ``random``: random neurons with the same per-layer counts as a reference selection
  (seeded; ``random_selection``).
- ``activation``: mean |z| at the last prompt position over the discovery split.
- ``write_in``: c̄, the write-in contribution without head conditioning.
- ``grad_x_act``: mean over items of z · ∂U/∂z at the last prompt position, U the
  teacher-forced utility (mean log-probability of the target tokens, or the signed
  Yes−No margin for retrieval) — the gradient includes every downstream path. Needs
  autograd: ``gradient_times_activation`` switches inference mode off locally and
  clones the inputs, so it also runs inside a Trainer with ``inference_mode=True``
  (but the Trainer must not wrap the call in ``torch.no_grad`` — validation loops
  under ``inference_mode=False`` do, and ``torch.enable_grad`` here undoes it).

Activation statistics (``ActivationStatisticsCollector``), accumulated in the same base
forward as the write-in pass. Counted positions: every non-padding position of the
prompt, i.e. ``attention_mask == 1`` and index ≤ ``prompt_last_index`` (image tokens
and chat template included; target tokens of teacher-forced batches excluded).
- AP: fraction of counted positions with z > 0; MA: mean z over them.
- APE (LAPE-style, ``ape_selection``): per neuron, p_t = AP_t / Σ_t' AP_t' over tasks and
  entropy −Σ p_t ln p_t; for task t, among neurons whose AP is highest on t, the
  lowest-entropy ones are selected (ties: higher AP_t first).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from hones.attribution.bank import BankEntry, neurons_per_layer
from hones.attribution.hooks import observe_ffn_activations, track_activations_for_grad
from hones.attribution.stats import ActivationStatistics


# -- selection helpers ------------------------------------------------------------------------
def budget_from_ratio(num_layers: int, ffn_width: int, top_ratio: float) -> int:
    """Number of neurons in the global top ``top_ratio`` of L × I (rounded, at least 1)."""
    if not 0 < top_ratio <= 1:
        raise ValueError(f"top_ratio must be in (0, 1]; got {top_ratio}")
    return max(1, int(round(top_ratio * num_layers * ffn_width)))


def select_top_neurons(scores: Tensor, count: int | None = None, top_ratio: float | None = 0.01) -> list[BankEntry]:
    """The ``count`` highest-scoring neurons of ``scores`` ``[L, I]`` (or the top ``top_ratio``).

    Global ranking across layers; ties broken by (layer, neuron) order; NaN never selected.
    """
    num_layers, ffn_width = scores.shape
    if count is None:
        if top_ratio is None:
            raise ValueError("give count or top_ratio")
        count = budget_from_ratio(num_layers, ffn_width, top_ratio)
    flat = scores.detach().flatten().double().cpu()
    finite = torch.isfinite(flat)
    count = min(int(count), int(finite.sum()))
    order = torch.sort(torch.where(finite, flat, torch.tensor(-math.inf, dtype=flat.dtype)), descending=True, stable=True).indices[:count]
    return [
        BankEntry(layer=int(i) // ffn_width, neuron=int(i) % ffn_width, score=float(flat[i]), rank=rank)
        for rank, i in enumerate(order.tolist())
    ]


def random_selection(
    per_layer_counts: Sequence[int] | Tensor | Sequence[BankEntry], ffn_width: int, seed: int = 0
) -> list[BankEntry]:
    """Random neurons with given per-layer counts (or the counts of a reference selection).

    Seeded with a local generator (global RNG untouched); scores are NaN, ranks follow layer order.
    """
    if len(per_layer_counts) and isinstance(per_layer_counts[0], BankEntry):  # type: ignore[index]
        entries = list(per_layer_counts)  # type: ignore[arg-type]
        num_layers = max(e.layer for e in entries) + 1
        counts = neurons_per_layer(entries, num_layers).tolist()
    else:
        counts = [int(c) for c in (per_layer_counts.tolist() if isinstance(per_layer_counts, Tensor) else per_layer_counts)]
    generator = torch.Generator().manual_seed(int(seed))
    out: list[BankEntry] = []
    for layer, count in enumerate(counts):
        if count > ffn_width:
            raise ValueError(f"layer {layer}: {count} neurons requested but the FFN has {ffn_width}")
        picked = torch.randperm(ffn_width, generator=generator)[:count].sort().values
        out.extend(BankEntry(layer, int(n), float("nan"), len(out) + k) for k, n in enumerate(picked.tolist()))
    return out


# -- activation statistics ----------------------------------------------------------------------
def counted_positions(attention_mask: Tensor, prompt_last_index: Tensor) -> Tensor:
    """Bool ``[batch, seq]``: non-padding prompt positions (index ≤ prompt_last_index)."""
    seq = attention_mask.shape[1]
    upto = torch.arange(seq, device=attention_mask.device)[None, :] <= prompt_last_index.to(attention_mask.device)[:, None]
    return (attention_mask != 0) & upto


class ActivationStatisticsCollector:
    """Reduces z over counted positions inside the FFN hooks and feeds ``ActivationStatistics``.

    Use as ``with collector.observe(adapter, batch): forward...``; nothing of size
    ``[batch, seq, ffn]`` is kept. Only the first forward per layer in the block counts.
    """

    def __init__(self, statistics: ActivationStatistics) -> None:
        self.statistics = statistics

    @contextmanager
    def observe(self, adapter: Any, batch: Mapping[str, Any]) -> Iterator[None]:
        mask = counted_positions(batch["attention_mask"], batch["prompt_last_index"])
        num_layers, ffn_width = self.statistics.shape
        sums = {
            name: torch.zeros(num_layers, ffn_width, dtype=torch.float64)
            for name in ("positive_count", "activation_sum", "abs_activation_sum")
        }
        seen: set[int] = set()

        def reduce(layer: int, z: Tensor) -> None:
            if layer in seen:
                return
            seen.add(layer)
            weights = mask.to(device=z.device, dtype=torch.float32)[..., None]  # [b, s, 1]
            zf = z.detach().float()
            sums["positive_count"][layer] = ((zf > 0).float() * weights).sum(dim=(0, 1)).double().cpu()
            sums["activation_sum"][layer] = (zf * weights).sum(dim=(0, 1)).double().cpu()
            sums["abs_activation_sum"][layer] = (zf.abs() * weights).sum(dim=(0, 1)).double().cpu()

        with observe_ffn_activations(adapter, reduce):
            yield
        if seen:
            self.statistics.update(
                sums["positive_count"], sums["activation_sum"], sums["abs_activation_sum"], int(mask.sum())
            )


def ape_selection(
    activation_probability: Mapping[str, Tensor], count: int | Mapping[str, int], min_probability: float = 0.0
) -> dict[str, list[BankEntry]]:
    """LAPE-style task-specific neurons from per-task AP ``[L, I]`` (see the module docstring).

    Args:
        activation_probability: task -> AP ``[L, I]``.
        count: neurons per task (an int or task -> int).
        min_probability: neurons whose AP on their task is below this are not eligible.

    Neurons with AP = 0 on every task are never selected. Scores are the negated entropy.
    """
    tasks = list(activation_probability)
    stacked = torch.stack([activation_probability[t].double() for t in tasks])  # [T, L, I]
    total = stacked.sum(0)
    p = stacked / total.clamp_min(1e-300)
    entropy = -(torch.where(p > 0, p * p.log(), torch.zeros_like(p))).sum(0)  # [L, I]
    best = stacked.argmax(0)
    out: dict[str, list[BankEntry]] = {}
    for k, task in enumerate(tasks):
        budget = count[task] if isinstance(count, Mapping) else int(count)
        eligible = (best == k) & (total > 0) & (stacked[k] >= min_probability)
        # order: lowest entropy, then highest AP on the task
        key_entropy = torch.where(eligible, entropy, torch.full_like(entropy, math.inf)).flatten()
        key_ap = stacked[k].flatten()
        order = sorted(
            (i for i in torch.nonzero(eligible.flatten()).flatten().tolist()),
            key=lambda i: (float(key_entropy[i]), -float(key_ap[i]), i),
        )[:budget]
        width = stacked.shape[-1]
        out[task] = [
            BankEntry(layer=i // width, neuron=i % width, score=-float(key_entropy[i]), rank=r) for r, i in enumerate(order)
        ]
    return out


# -- gradient x activation -----------------------------------------------------------------------
def gradient_times_activation(adapter: Any, batch: Mapping[str, Any], task: str) -> Tensor:
    """z · ∂U/∂z at the last prompt position: ``[batch, L, I]`` (U: teacher-forced utility per item).

    ``batch`` must carry ``labels`` (``hones.attribution.batches.ensure_targets``). Runs
    with autograd even inside ``torch.inference_mode`` / ``no_grad``; parameters' ``.grad``
    are not touched (``torch.autograd.grad`` w.r.t. z only).
    """
    from hones.attribution.heads import teacher_forced_utility
    from hones.attribution.rerun import base_hidden_states

    with torch.inference_mode(False), torch.enable_grad():
        local = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in batch.items()}
        layers = list(range(adapter.num_layers))
        with track_activations_for_grad(adapter, layers) as kept:
            hidden = base_hidden_states(adapter, local)
        utility = teacher_forced_utility(adapter, hidden, local, task)  # [b]; rows are independent
        grads = torch.autograd.grad(utility.sum(), [kept[l] for l in layers])
        last = local["prompt_last_index"].to(hidden.device)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        values = [(kept[l][rows, last].float() * g[rows, last].float()).detach() for l, g in zip(layers, grads)]
    return torch.stack(values, dim=1)
