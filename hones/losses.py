"""Token-level losses on teacher-forced batches (labels = -100 outside the target)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def shifted_targets(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Align next-token predictions with labels.

    Args:
        logits: [batch, seq, vocab]; labels: [batch, seq] with -100 off the target.
    Returns:
        (logits [batch, seq-1, vocab], labels [batch, seq-1], mask [batch, seq-1] bool).
    """
    logits = logits[:, :-1]
    labels = labels[:, 1:].to(logits.device)
    return logits, labels, labels != IGNORE_INDEX


def target_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy averaged over all target tokens of the batch (a scalar)."""
    logits, labels, _ = shifted_targets(logits, labels)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
