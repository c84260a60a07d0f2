"""The steering objective of HONES (HONES_METHOD §5), as plain functions on tensors.

    loss = CE(target tokens) + β · KL(p_original ‖ p_scaled)(target positions) + λ · mean(s²)

p_scaled is the model with the neuron scales applied (z <- z * (1 + m * s)); p_original is
the *same* model with scaling switched off (``scaler.disabled()``), run under
``torch.no_grad()``: no second copy of the model exists. Defaults β = 0.05, λ = 1e-5.

Shapes: logits ``[batch, positions, vocab]``, labels ``[batch, positions]`` with
``IGNORE_INDEX`` (-100) where a position predicts no target token, s ``[n_selected]``.
A position t's logits predict token t + 1; :func:`target_logits` does that alignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from hones.losses import IGNORE_INDEX

DEFAULT_BETA = 0.05  # §5: weight of KL(p_original ‖ p_scaled)
DEFAULT_L2_WEIGHT = 1e-5  # §5: λ, weight of mean(s_selected²)


def target_logits(adapter: Any, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """Forward the adapter's model on a teacher-forcing batch and keep only what the loss needs.

    batch: ``adapter.encode(images, prompts, targets)`` output (``labels [b, s]``,
    ``prompt_last_index [b]``, left padding, so targets sit at the end of every row).
    Only the last ``k + 1`` positions' logits are computed (``logits_to_keep``), k being
    the longest target in the batch.

    Returns ``logits [b, k, vocab]`` (position j predicts ``labels[:, j]``) and
    ``labels [b, k]`` (``IGNORE_INDEX`` outside each row's target).
    """
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("target_logits needs a teacher-forcing batch with `labels` (encode with targets)")
    seq_len = labels.shape[1]
    first = int(batch["prompt_last_index"].min())  # earliest position that predicts a target token
    keep = seq_len - first
    if keep < 2:
        raise ValueError("the batch has no target tokens (prompt_last_index is the last position)")
    logits = adapter.forward(batch, logits_to_keep=keep)  # [b, keep, vocab]
    return logits[:, :-1], labels[:, first + 1 :].to(logits.device)


def target_mask(labels: Tensor) -> Tensor:
    """Bool ``[b, k]``: positions that predict a target token."""
    return labels != IGNORE_INDEX


def target_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the target tokens (float32). logits ``[b, k, V]``, labels ``[b, k]`` -> scalar."""
    if not bool(target_mask(labels).any()):
        raise ValueError("no target tokens in the batch (every label is IGNORE_INDEX)")
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


def target_kl(original_logits: Tensor, scaled_logits: Tensor, labels: Tensor) -> Tensor:
    """KL(p_original ‖ p_scaled) = Σ_v p_o (log p_o − log p_s), averaged over the target positions.

    original_logits, scaled_logits: ``[b, k, V]`` (the original ones carry no gradient);
    labels ``[b, k]`` select the target positions. Returns a float32 scalar ≥ 0.
    """
    mask = target_mask(labels)
    log_original = F.log_softmax(original_logits.float(), dim=-1)
    log_scaled = F.log_softmax(scaled_logits.float(), dim=-1)
    per_position = F.kl_div(log_scaled, log_original, log_target=True, reduction="none").sum(-1)  # [b, k]
    return per_position[mask].mean()


def scale_l2(s: Tensor) -> Tensor:
    """mean(s²) over the selected neurons' scales: s ``[n]`` -> scalar (0 for an empty s)."""
    if s.numel() == 0:
        return s.new_zeros((), dtype=torch.float32)
    return s.float().pow(2).mean()


@dataclass
class SteeringLoss:
    """The objective and its parts (scalars). ``kl`` is None when β = 0 (the teacher is not run)."""

    total: Tensor
    ce: Tensor
    l2: Tensor
    kl: Tensor | None = None

    def outputs(self) -> dict[str, Tensor]:
        """A ``training_step`` return value: ``loss`` (with gradient) and detached parts."""
        out = {"loss": self.total, "ce": self.ce.detach(), "l2": self.l2.detach()}
        if self.kl is not None:
            out["kl"] = self.kl.detach()
        return out

    def parts(self) -> dict[str, float]:
        """The parts as floats (for logs and tests)."""
        return {key: float(value.detach()) for key, value in self.outputs().items()}


def combine(ce: Tensor, kl: Tensor | None, l2: Tensor, beta: float, l2_weight: float) -> SteeringLoss:
    """CE + β · KL + λ · L2 (the KL term is left out when ``kl`` is None)."""
    total = ce + l2_weight * l2.to(ce.device)
    if kl is not None:
        total = total + beta * kl
    return SteeringLoss(total=total, ce=ce, l2=l2, kl=kl)


def steering_objective(
    adapter: Any,
    scaler: Any,
    batch: Mapping[str, Any],
    beta: float = DEFAULT_BETA,
    l2_weight: float = DEFAULT_L2_WEIGHT,
) -> SteeringLoss:
    """The §5 loss of one teacher-forcing batch.

    ``scaler`` (a ``NeuronScaler``) must already act on ``adapter`` (inside
    ``scale_neurons(adapter, scaler)`` or with a ``NeuronSteeringCallback`` attached).
    The scaled forward keeps its graph (gradient w.r.t. ``scaler.s``); the original
    forward runs with scaling off under ``torch.no_grad()``, only when β > 0.
    """
    scaled, labels = target_logits(adapter, batch)
    ce = target_cross_entropy(scaled, labels)
    kl = None
    if beta > 0:
        with torch.no_grad(), scaler.disabled():
            original, _ = target_logits(adapter, batch)
        kl = target_kl(original, scaled, labels)
    return combine(ce, kl, scale_l2(scaler.s), beta, l2_weight)
