"""Encoded batches for attribution: re-encoding from TaskItems when a pass needs another form.

The batch contract of the callbacks: a dict with ``items``, a list of ``hones.data.TaskItem``
(``{"items": [...]}`` alone is enough), optionally with the adapter's encoding of them
(``adapter.encode(images, prompts, targets)``: ``input_ids``, ``attention_mask``, the pixel
inputs, ``prompt_last_index`` and, with targets, ``labels`` on the target tokens only), as
``HonesDataModule`` makes. Teacher-forced passes need the encoding with ``labels``;
generation needs a prompt-only one. These helpers return the batch unchanged when it is
already the adapter's encoding in the needed form (it has ``prompt_last_index``, which only
the adapter writes, and ``labels`` only on the target tokens) and re-encode it from ``items``
otherwise, so with ``items`` in the batch an encoding of the user's own (e.g.
``labels = input_ids``, which would count the prompt as target) is never read.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from hones.models.base import IGNORE_INDEX


def move_to_device(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Tensors moved to ``device``; other entries (items) untouched."""
    return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}


def encode_items(adapter: Any, items: Sequence[Any], with_targets: bool) -> dict[str, Any]:
    """``adapter.encode`` of TaskItems (prompt + target when ``with_targets``), ``items`` kept, on the model's device."""
    from hones.data.records import load_image

    items = check_items(items)
    images = [load_image(item) for item in items]
    prompts = [item.prompt for item in items]
    targets = [item.target for item in items] if with_targets else None
    batch: dict[str, Any] = dict(adapter.encode(images, prompts, targets))
    batch["items"] = list(items)
    return move_to_device(batch, adapter.device)


def check_items(items: Any) -> Sequence[Any]:
    """``items`` if it is a non-empty list of ``hones.data.TaskItem``; a one-line error otherwise."""
    from hones.data.records import TaskItem

    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)) or not items:
        raise ValueError(f"batch['items'] must be a non-empty list of hones.data.TaskItem; got {type(items).__name__}")
    for k, item in enumerate(items):
        if not isinstance(item, TaskItem):
            raise TypeError(
                f"batch['items'][{k}] is a {type(item).__name__}, not a hones.data.TaskItem (fields uid, task, image, "
                "prompt, target, references; retrieval also group and label)"
            )
    return items


def _items(batch: Mapping[str, Any], need: str) -> Sequence[Any]:
    items = batch.get("items")
    if items is None:
        raise ValueError(
            f"the batch is not the adapter's encoding{need} (no `prompt_last_index`: make it with "
            "`adapter.encode(images, prompts, targets)`) and has no `items` (hones.data.TaskItem) to encode it from"
        )
    return check_items(items)


def _adapter_encoded(batch: Mapping[str, Any]) -> bool:
    """Whether ``batch`` is the adapter's encoding (``prompt_last_index`` is written by ``adapter.encode`` only)."""
    return "input_ids" in batch and "prompt_last_index" in batch


def _labels_on_targets_only(batch: Mapping[str, Any]) -> bool:
    """Whether ``labels`` is -100 up to ``prompt_last_index`` in every row, as the adapter writes it
    (labels put on the prompt too, e.g. ``labels = input_ids``, are not the adapter's)."""
    labels = batch["labels"]
    positions = torch.arange(labels.shape[1], device=labels.device)[None, :]
    prompt = positions <= batch["prompt_last_index"].to(labels.device)[:, None]
    return not bool((labels[prompt] != IGNORE_INDEX).any())


def ensure_targets(adapter: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """A teacher-forcing batch (the adapter's encoding with ``labels`` on the target tokens only):
    ``batch`` itself or a re-encoding of its items."""
    if "labels" in batch and _adapter_encoded(batch) and _labels_on_targets_only(batch):
        return move_to_device(batch, adapter.device)
    return encode_items(adapter, _items(batch, " with `labels` on the target tokens only"), with_targets=True)


def ensure_prompt_only(adapter: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """A prompt-only batch (for ``generate``): ``batch`` itself or a re-encoding of its items."""
    if "labels" not in batch and _adapter_encoded(batch):
        return move_to_device(batch, adapter.device)
    return encode_items(adapter, _items(batch, " without `labels`"), with_targets=False)


def ensure_encoded(adapter: Any, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter's encoding, with or without targets: ``batch`` itself, else a prompt-only encoding of its items."""
    if _adapter_encoded(batch):
        return move_to_device(batch, adapter.device)
    return encode_items(adapter, _items(batch, ""), with_targets=False)


def batch_size(batch: Mapping[str, Any]) -> int:
    """Rows of an encoded batch."""
    return int(batch["input_ids"].shape[0])
