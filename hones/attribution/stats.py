"""Running-sum accumulators for attribution, as torchmetrics ``Metric`` objects.

Every state is a sum (``dist_reduce_fx="sum"``), so memory does not grow with the
number of items and ``compute()`` gives, in every process, the statistic of the
whole split across all processes (torchmetrics synchronises the sums).

- ``RunningMean``: mean of a fixed-shape tensor, e.g. the write-in contribution
  c̄ ``[L, I]`` (HONES_METHOD §3).
- ``StackedRunningMean``: K running means in one state ``[K, *shape]`` with one
  count per slot, e.g. c̄^h for the K heads of H* (HONES_METHOD §3).
- ``HeadUtilityAccumulator``: mean utility of the unmodified model and of the model
  with each head intervention, for decomposable utilities (per-item averages, such
  as the teacher-forced log-probability); Δ = baseline − intervened (§2).
- ``ActivationStatistics``: per-neuron activation probability (AP), mean activation
  (MA) and mean |activation|, the inputs of the activation-magnitude and LAPE-style
  (APE) baselines.

Sums are kept in float64 by default (exact enough for thousands of items); pass
``dtype=torch.float32`` on devices without float64 support.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric


class RunningMean(Metric):
    """Mean of ``[*shape]`` tensors over items, as a sum and a count.

    Args:
        shape: shape of one item's value, e.g. ``(num_layers, ffn_width)``.
        dtype: dtype of the sums.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    total: Tensor
    count: Tensor

    def __init__(self, shape: Sequence[int], dtype: torch.dtype = torch.float64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.shape = tuple(int(s) for s in shape)
        self.add_state("total", torch.zeros(self.shape, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=dtype), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:  # type: ignore[override]
        """Add items. values: ``[n, *shape]`` (n items)."""
        if tuple(values.shape[1:]) != self.shape:
            raise ValueError(f"RunningMean expects values of shape [n, {list(self.shape)}]; got {list(values.shape)}")
        self.total += values.detach().to(device=self.total.device, dtype=self.total.dtype).sum(dim=0)
        self.count += values.shape[0]

    def compute(self) -> Tensor:
        """The mean ``[*shape]``; raises if nothing was added."""
        if float(self.count) == 0:
            raise ValueError("RunningMean.compute() called before any update")
        return self.total / self.count


class StackedRunningMean(Metric):
    """K independent running means of ``[*shape]`` tensors in one ``[K, *shape]`` state.

    Used for c̄^h, one slot per head of H*. Each slot has its own count, so slots may
    receive different numbers of items.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    total: Tensor
    count: Tensor

    def __init__(
        self, num_slots: int, shape: Sequence[int], dtype: torch.dtype = torch.float64, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.num_slots = int(num_slots)
        self.shape = tuple(int(s) for s in shape)
        self.add_state("total", torch.zeros((self.num_slots, *self.shape), dtype=dtype), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(self.num_slots, dtype=dtype), dist_reduce_fx="sum")

    def update(self, slots: Tensor, values: Tensor) -> None:  # type: ignore[override]
        """Add one item per row. slots: ``[n]`` slot index per row; values: ``[n, *shape]``."""
        if tuple(values.shape[1:]) != self.shape or slots.shape != values.shape[:1]:
            raise ValueError(
                f"StackedRunningMean expects slots [n] and values [n, {list(self.shape)}]; "
                f"got {list(slots.shape)} and {list(values.shape)}"
            )
        slots = slots.to(device=self.total.device, dtype=torch.long)
        self.total.index_add_(0, slots, values.detach().to(device=self.total.device, dtype=self.total.dtype))
        self.count.index_add_(0, slots, torch.ones_like(slots, dtype=self.count.dtype))

    def compute(self) -> Tensor:
        """Means ``[K, *shape]``; a slot that never received an item raises."""
        if bool((self.count == 0).any()):
            empty = torch.nonzero(self.count == 0).flatten().tolist()
            raise ValueError(f"StackedRunningMean slots {empty} received no item")
        view = (self.num_slots,) + (1,) * len(self.shape)
        return self.total / self.count.view(view)


class HeadUtilityAccumulator(Metric):
    """Sums of per-item utilities, without and with each head intervention (HONES_METHOD §2).

    ``compute()`` returns a dict: ``baseline`` (scalar mean utility of the unmodified
    model), ``intervened`` ``[L, H]`` (mean utility with I_(l,h); NaN for heads never
    evaluated), ``delta`` ``[L, H]`` = baseline − intervened (NaN where not evaluated),
    ``count`` ``[L, H]`` (items per head) and ``baseline_count``.
    Only valid for utilities whose split value is the mean of per-item values.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    baseline_sum: Tensor
    baseline_count: Tensor
    intervened_sum: Tensor
    intervened_count: Tensor

    def __init__(self, num_layers: int, num_heads: int, dtype: torch.dtype = torch.float64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_layers, self.num_heads = int(num_layers), int(num_heads)
        shape = (self.num_layers, self.num_heads)
        self.add_state("baseline_sum", torch.zeros((), dtype=dtype), dist_reduce_fx="sum")
        self.add_state("baseline_count", torch.zeros((), dtype=dtype), dist_reduce_fx="sum")
        self.add_state("intervened_sum", torch.zeros(shape, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("intervened_count", torch.zeros(shape, dtype=dtype), dist_reduce_fx="sum")

    def update(  # type: ignore[override]
        self,
        baseline: Tensor | None = None,
        heads: Sequence[tuple[int, int]] = (),
        intervened: Tensor | None = None,
    ) -> None:
        """Add utilities.

        Args:
            baseline: ``[b]`` per-item utilities of the unmodified model (or None).
            heads: the n heads of ``intervened``'s first axis.
            intervened: ``[n, b]`` per-item utilities with head ``heads[k]`` intervened.
        """
        if baseline is not None:
            self.baseline_sum += baseline.detach().to(device=self.baseline_sum.device, dtype=self.baseline_sum.dtype).sum()
            self.baseline_count += baseline.numel()
        if not heads:
            return
        if intervened is None or intervened.shape[0] != len(heads):
            raise ValueError(f"intervened must be [n_heads={len(heads)}, batch]; got {None if intervened is None else list(intervened.shape)}")
        index = torch.tensor([l * self.num_heads + h for l, h in heads], device=self.intervened_sum.device)
        values = intervened.detach().to(device=self.intervened_sum.device, dtype=self.intervened_sum.dtype)
        self.intervened_sum.view(-1).index_add_(0, index, values.sum(dim=1))
        counts = torch.full((len(heads),), values.shape[1], dtype=self.intervened_count.dtype, device=index.device)
        self.intervened_count.view(-1).index_add_(0, index, counts)

    def compute(self) -> dict[str, Tensor]:
        if float(self.baseline_count) == 0:
            raise ValueError("HeadUtilityAccumulator: no baseline utility was added")
        baseline = self.baseline_sum / self.baseline_count
        intervened = torch.where(
            self.intervened_count > 0,
            self.intervened_sum / self.intervened_count.clamp_min(1),
            torch.full_like(self.intervened_sum, float("nan")),
        )
        return {
            "baseline": baseline,
            "intervened": intervened,
            "delta": baseline - intervened,
            "count": self.intervened_count.clone(),
            "baseline_count": self.baseline_count.clone(),
        }


class ActivationStatistics(Metric):
    """Per-neuron activation statistics ``[L, I]`` over counted positions.

    Which positions count is the caller's choice (see
    ``hones.attribution.baselines.ActivationStatisticsCollector``): each update adds,
    per neuron, the number of counted positions with z > 0, the sum of z and the sum
    of |z|, plus the number of counted positions.

    ``compute()`` returns ``activation_probability`` (AP, fraction of positions with
    z > 0), ``mean_activation`` (MA) and ``mean_abs_activation``, each ``[L, I]``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    positive_count: Tensor
    activation_sum: Tensor
    abs_activation_sum: Tensor
    position_count: Tensor

    def __init__(self, num_layers: int, ffn_width: int, dtype: torch.dtype = torch.float64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        shape = (int(num_layers), int(ffn_width))
        self.shape = shape
        for name in ("positive_count", "activation_sum", "abs_activation_sum"):
            self.add_state(name, torch.zeros(shape, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("position_count", torch.zeros((), dtype=dtype), dist_reduce_fx="sum")

    def update(  # type: ignore[override]
        self, positive_count: Tensor, activation_sum: Tensor, abs_activation_sum: Tensor, position_count: int | Tensor
    ) -> None:
        """Add pre-reduced sums, each ``[L, I]`` (position_count: scalar)."""
        for name, value in (
            ("positive_count", positive_count),
            ("activation_sum", activation_sum),
            ("abs_activation_sum", abs_activation_sum),
        ):
            if tuple(value.shape) != self.shape:
                raise ValueError(f"ActivationStatistics.{name} must be {list(self.shape)}; got {list(value.shape)}")
            state = getattr(self, name)
            state += value.detach().to(device=state.device, dtype=state.dtype)
        self.position_count += float(position_count)

    def compute(self) -> dict[str, Tensor]:
        if float(self.position_count) == 0:
            raise ValueError("ActivationStatistics.compute() called before any update")
        n = self.position_count
        return {
            "activation_probability": self.positive_count / n,
            "mean_activation": self.activation_sum / n,
            "mean_abs_activation": self.abs_activation_sum / n,
            "position_count": n.clone(),
        }
