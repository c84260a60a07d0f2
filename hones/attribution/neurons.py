"""Head-conditioned neuron attribution (HONES_METHOD §3).

    c̄      = mean over discovery items of c[l, i] = z_i · ⟨W_down^l[:, i], u_y⟩
    c̄^h    = the same mean with head h's mean replacement I_h applied (h ∈ H*, Δ_h > 0)
    Imp    = Σ_h Δ_h · max(c̄ − c̄^h, 0) / Σ_h Δ_h     (fallback: c̄ if no Δ_h > 0)
    bank   = global top ``top_ratio`` (default 1 %) of the L × I neurons by Imp

c̄^h equals c̄ below the head's layer l, so only layers ≥ l are recomputed: one base
forward per batch caches every layer's input, then each head's rerun starts at its
layer (``hones.attribution.rerun``), several heads per rerun via ``row_heads``.

The same base forward also feeds the baselines' statistics (mean |z|, optional AP/MA,
optional gradient × activation), see ``hones.attribution.baselines``.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric

from hones.attribution.bank import BankEntry
from hones.attribution.baselines import (
    ActivationStatisticsCollector,
    gradient_times_activation,
    random_selection,
    select_top_neurons,
)
from hones.attribution.batches import batch_size, ensure_encoded, ensure_targets
from hones.attribution.heads import Head, intervened_chunks, row_head_list
from hones.attribution.rerun import base_hidden_states, capture_layer_inputs, run_layers_from
from hones.attribution.stats import ActivationStatistics, RunningMean, StackedRunningMean
from hones.attribution.write_in import (
    down_projection_weights,
    item_target_directions,
    label_token_ids,
    projected_directions,
    stack_layers,
    target_directions,
    write_in,
)
from hones.interventions import capture_ffn_activations


# -- the formula --------------------------------------------------------------------------------
def head_conditioned_importance(mean_contribution: Tensor, head_means: Tensor, head_deltas: Tensor) -> Tensor:
    """Imp ``[L, I]`` = Σ_h Δ_h max(c̄ − c̄^h, 0) / Σ_h Δ_h over heads with Δ_h > 0.

    Args:
        mean_contribution: c̄ ``[L, I]``.
        head_means: c̄^h ``[K, L, I]`` (one per head, same order as ``head_deltas``).
        head_deltas: Δ_h ``[K]``; heads with Δ_h ≤ 0 (or NaN) are ignored.

    Returns c̄ itself (a copy) when no head has Δ_h > 0.
    """
    deltas = head_deltas.detach().double().flatten()
    if head_means.shape[0] != deltas.shape[0]:
        raise ValueError(f"{head_means.shape[0]} head means for {deltas.shape[0]} deltas")
    positive = torch.nonzero(deltas > 0).flatten().tolist()  # NaN > 0 is False
    if not positive:
        return mean_contribution.detach().double().clone()
    base = mean_contribution.detach().double()
    total = torch.zeros_like(base)
    for k in positive:
        total += deltas[k] * (base - head_means[k].double()).clamp_min(0)
    return total / deltas[positive].sum()


def positive_heads(heads: Sequence[Head], deltas: Sequence[float] | Tensor) -> tuple[list[Head], Tensor]:
    """The heads of H* with Δ > 0 and their Δ ``[K']``."""
    values = torch.as_tensor(deltas, dtype=torch.float64).flatten()
    keep = [k for k in range(len(heads)) if bool(values[k] > 0)]
    return [(int(heads[k][0]), int(heads[k][1])) for k in keep], values[keep]


# -- results -------------------------------------------------------------------------------------
@dataclass
class NeuronAttribution:
    """Result of the attribution pass (all on CPU, float64).

    importance: Imp ``[L, I]``; mean_contribution: c̄ ``[L, I]``;
    head_means: c̄^h ``[K, L, I]`` for ``heads`` (Δ > 0 only), with c̄ copied below each head's layer;
    head_deltas: ``[K]``; baselines: name -> score ``[L, I]`` (activation, write_in, grad_x_act);
    activation_statistics: AP / MA / mean |z| ``[L, I]`` when collected; num_items.
    """

    importance: Tensor
    mean_contribution: Tensor
    head_means: Tensor
    heads: list[Head]
    head_deltas: Tensor
    baselines: dict[str, Tensor] = field(default_factory=dict)
    activation_statistics: dict[str, Tensor] = field(default_factory=dict)
    num_items: int = 0

    def select(self, top_ratio: float = 0.01, count: int | None = None) -> list[BankEntry]:
        """The HONES neuron bank: global top ``top_ratio`` of Imp (HONES_METHOD §3)."""
        return select_top_neurons(self.importance, count=count, top_ratio=top_ratio)

    def baseline_banks(self, reference: Sequence[BankEntry], seed: int = 0) -> dict[str, list[BankEntry]]:
        """Baseline selections at the same budget as ``reference`` (random: same per-layer counts)."""
        ffn_width = self.importance.shape[1]
        banks = {"random": random_selection(neurons_per_layer_list(reference, self.importance.shape[0]), ffn_width, seed)}
        for name, scores in self.baselines.items():
            banks[name] = select_top_neurons(scores, count=len(reference))
        return banks


def neurons_per_layer_list(entries: Sequence[BankEntry], num_layers: int) -> list[int]:
    counts = [0] * num_layers
    for entry in entries:
        counts[entry.layer] += 1
    return counts


# -- the accumulating pass -------------------------------------------------------------------------
class NeuronAttributor(nn.Module):
    """Accumulates c̄, c̄^h and the baselines' statistics over discovery batches.

    Args:
        num_layers, ffn_width: the language model's L and I.
        heads: H* (e.g. ``HeadScores.top_heads(k)``); deltas: their Δ. Heads with Δ ≤ 0 are skipped.
        task: the task (retrieval uses the "Yes"/"No" answer token; captions the IDF).
        idf: caption IDF ``[vocab]`` (``hones.attribution.write_in.idf_from_items``) or None.
        rows_per_forward: max rows (items × heads) per rerun.
        activation_statistics: also accumulate AP / MA over prompt positions.
        gradient_baseline: also accumulate gradient × activation (a backward per batch).
        dtype: dtype of the running sums.
    """

    def __init__(
        self,
        num_layers: int,
        ffn_width: int,
        heads: Sequence[Head],
        deltas: Sequence[float] | Tensor,
        task: str,
        idf: Tensor | None = None,
        rows_per_forward: int = 64,
        activation_statistics: bool = False,
        gradient_baseline: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if len(heads) != len(torch.as_tensor(deltas).flatten()):
            raise ValueError(f"{len(heads)} heads but {len(torch.as_tensor(deltas).flatten())} deltas")
        self.num_layers, self.ffn_width, self.task = int(num_layers), int(ffn_width), task
        self.heads, deltas_kept = positive_heads(heads, deltas)
        if len(self.heads) < len(heads):
            from lightning.pytorch.utilities import rank_zero_warn

            fallback = "; none is left, so Imp falls back to c̄ (the write-in baseline)" if not self.heads else ""
            rank_zero_warn(
                f"{task}: {len(heads) - len(self.heads)} of {len(heads)} heads have Δ ≤ 0 (or NaN) and do not "
                f"condition the neuron importance (§3){fallback}"
            )
        self.register_buffer("head_deltas", deltas_kept, persistent=False)
        self.idf = idf
        self.rows_per_forward = int(rows_per_forward)
        shape = (self.num_layers, self.ffn_width)
        self.mean_contribution = RunningMean(shape, dtype=dtype)
        self.mean_abs_activation = RunningMean(shape, dtype=dtype)
        self.head_means = StackedRunningMean(max(1, len(self.heads)), shape, dtype=dtype)
        self.gradient = RunningMean(shape, dtype=dtype) if gradient_baseline else None
        self.statistics = ActivationStatistics(*shape, dtype=dtype) if activation_statistics else None
        self.item_count = SumMetric()

    def target_dirs(self, adapter: Any, batch: Mapping[str, Any]) -> Tensor:
        """u_y ``[b, hidden]``: from the items when present, else from ``labels`` (special tokens dropped)."""
        items = batch.get("items")
        if items:
            return item_target_directions(adapter, items, self.idf)
        if "labels" not in batch:
            raise ValueError("the batch has neither `items` nor `labels` to define the target direction")
        special = getattr(adapter.tokenizer, "all_special_ids", []) or []
        return target_directions(adapter.unembedding(), label_token_ids(batch["labels"], special))

    @torch.no_grad()
    def update(self, adapter: Any, batch: Mapping[str, Any]) -> None:
        """One discovery batch: base forward (c, |z|, AP/MA), one rerun per chunk of heads."""
        batch = ensure_encoded(adapter, batch)
        size = batch_size(batch)
        positions = batch["prompt_last_index"]
        all_layers = list(range(self.num_layers))
        projections = projected_directions(down_projection_weights(adapter), self.target_dirs(adapter, batch))
        start_layers = sorted({l for l, _ in self.heads})
        with ExitStack() as stack:
            record = stack.enter_context(capture_layer_inputs(adapter, layers=start_layers))
            captured = stack.enter_context(capture_ffn_activations(adapter, all_layers, positions=positions))
            if self.statistics is not None:
                stack.enter_context(ActivationStatisticsCollector(self.statistics).observe(adapter, batch))
            base_hidden_states(adapter, batch)
        z = stack_layers(captured, all_layers)  # [b, L, I]
        self.mean_contribution.update(write_in(z, projections.to(z.device)))
        self.mean_abs_activation.update(z.abs())
        self.item_count.update(float(size))
        slot = {head: k for k, head in enumerate(self.heads)}
        for layer, chunk in intervened_chunks(adapter, batch, self.heads, self.rows_per_forward):
            repeats = len(chunk)
            later = list(range(layer, self.num_layers))
            with capture_ffn_activations(adapter, later, positions=positions.repeat_interleave(repeats)) as captured_h:
                run_layers_from(adapter, record, layer, repeats=repeats)
            z_h = stack_layers(captured_h, later)  # [b * R, L - l, I]
            values = torch.zeros(size * repeats, self.num_layers, self.ffn_width, device=z_h.device)
            values[:, layer:] = write_in(z_h, projections[:, layer:].repeat_interleave(repeats, dim=0).to(z_h.device))
            slots = torch.tensor([slot[head] for head in row_head_list(chunk, size)], device=z_h.device)
            self.head_means.update(slots, values)
        if self.gradient is not None:
            self.gradient.update(gradient_times_activation(adapter, ensure_targets(adapter, batch), self.task))

    def compute(self) -> NeuronAttribution:
        """Means over all items seen (all processes), importance and baseline scores."""
        mean = self.mean_contribution.compute().double().cpu()
        if self.heads:
            stacked = self.head_means.compute().double().cpu()
            for k, (layer, _) in enumerate(self.heads):
                stacked[k, :layer] = mean[:layer]  # I_h cannot change layers below its own
        else:
            stacked = torch.zeros(0, *mean.shape, dtype=torch.float64)
        deltas = self.head_deltas.double().cpu()
        baselines = {"activation": self.mean_abs_activation.compute().double().cpu(), "write_in": mean}
        if self.gradient is not None:
            baselines["grad_x_act"] = self.gradient.compute().double().cpu()
        statistics = {}
        if self.statistics is not None:
            statistics = {k: v.double().cpu() for k, v in self.statistics.compute().items()}
        return NeuronAttribution(
            importance=head_conditioned_importance(mean, stacked, deltas),
            mean_contribution=mean,
            head_means=stacked,
            heads=list(self.heads),
            head_deltas=deltas,
            baselines=baselines,
            activation_statistics=statistics,
            num_items=int(self.item_count.compute()),
        )

    def reset(self) -> None:
        for metric in (
            self.mean_contribution, self.mean_abs_activation, self.head_means, self.gradient, self.statistics, self.item_count
        ):
            if metric is not None:
                metric.reset()
