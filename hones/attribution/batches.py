"""Encoded batches for attribution: re-encoding from TaskItems when a pass needs another form.

A datamodule batch is a dict with ``items`` (the ``TaskItem`` list) and the adapter's
encoding of them. Teacher-forced passes need ``labels`` (prompt + target); generation
needs a prompt-only encoding. These helpers return the batch unchanged when it is
already in the needed form and re-encode it from ``items`` otherwise.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor


def move_to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Tensors moved to ``device``; other entries (items) untouched."""
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def encode_items(adapter: Any, items: Sequence[Any], with_targets: bool) -> dict[str, Any]:
    """``adapter.encode`` of TaskItems (prompt + target when ``with_targets``), ``items`` kept, on the model's device."""
    from hones.data.records import load_image

    images = [load_image(item) for item in items]
    prompts = [item.prompt for item in items]
    targets = [item.target for item in items] if with_targets else None
    batch: dict[str, Any] = dict(adapter.encode(images, prompts, targets))
    batch["items"] = list(items)
    return move_to_device(batch, adapter.device)


def _items(batch: Mapping[str, Any], need: str) -> Sequence[Any]:
    items = batch.get("items")
    if not items:
        raise ValueError(f"the batch has no {need} and no `items` to re-encode it from")
    return items


def ensure_targets(adapter: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """A teacher-forcing batch (with ``labels``): ``batch`` itself or a re-encoding of its items."""
    if "labels" in batch:
        return move_to_device(batch, adapter.device)
    return encode_items(adapter, _items(batch, "labels"), with_targets=True)


def ensure_prompt_only(adapter: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """A prompt-only batch (for ``generate``): ``batch`` itself or a re-encoding of its items."""
    if "labels" not in batch and "input_ids" in batch:
        return move_to_device(batch, adapter.device)
    return encode_items(adapter, _items(batch, "a prompt-only encoding"), with_targets=False)


def ensure_encoded(adapter: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """Any encoding: ``batch`` itself when it has ``input_ids``, else a prompt-only encoding of its items."""
    if "input_ids" in batch:
        return move_to_device(batch, adapter.device)
    return encode_items(adapter, _items(batch, "input_ids"), with_targets=False)


def batch_size(batch: Mapping[str, Any]) -> int:
    """Rows of an encoded batch."""
    return int(batch["input_ids"].shape[0])
