"""The fixed choices of HONES settings, once: as ``Literal`` types for the command-line
signatures (jsonargparse then refuses any other value while parsing, in one line, before a
model is loaded) and as tuples for code that checks or iterates them."""

from __future__ import annotations

from typing import Literal, get_args

Task = Literal["vqa", "ocr", "caption", "retrieval"]  # the four tasks of HONES_METHOD §1
MetricMode = Literal["paper", "official"]  # docs/metrics.md
DType = Literal["fp32", "bf16", "fp16"]  # how a model is loaded
Utility = Literal["teacher_forced", "metric"]  # the head utility of §2

TASKS: tuple[str, ...] = get_args(Task)
METRIC_MODES: tuple[str, ...] = get_args(MetricMode)
DTYPE_NAMES: tuple[str, ...] = get_args(DType)
UTILITIES: tuple[str, ...] = get_args(Utility)

__all__ = ["DTYPE_NAMES", "DType", "METRIC_MODES", "MetricMode", "TASKS", "Task", "UTILITIES", "Utility"]
