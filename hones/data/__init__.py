"""HONES data layer: source formats, task views, the toy world, and the datamodule.

``HonesDataModule`` and ``TaskItemDataset`` are imported lazily (they pull in Lightning)
and are left out of ``__all__`` so that ``from hones.data import *`` stays light.
"""

from __future__ import annotations

from typing import Any

from hones.data.errors import DataError, SkipReport
from hones.data.formats import (
    DATASETS,
    load_coco_unified,
    load_flickr30k,
    load_gqa,
    load_records,
    load_textvqa,
    read_split_ids,
)
from hones.data.images import draw_ocr_box
from hones.data.records import OCRAnnotation, OCRTaskItem, QAPair, SourceRecord, TaskItem, load_image, materialize
from hones.data.tasks import (
    PROMPTS,
    TASKS,
    build_task_items,
    caption_idf,
    caption_token_sets,
    task_prompt,
    training_items,
)

_LAZY = {"HonesDataModule": "hones.data.datamodule", "TaskItemDataset": "hones.data.datamodule"}

__all__ = [
    "DATASETS",
    "PROMPTS",
    "TASKS",
    "DataError",
    "OCRAnnotation",
    "OCRTaskItem",
    "QAPair",
    "SkipReport",
    "SourceRecord",
    "TaskItem",
    "build_task_items",
    "caption_idf",
    "caption_token_sets",
    "draw_ocr_box",
    "load_coco_unified",
    "load_flickr30k",
    "load_gqa",
    "load_image",
    "load_records",
    "load_textvqa",
    "materialize",
    "read_split_ids",
    "task_prompt",
    "training_items",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hones.data' has no attribute {name!r}")
