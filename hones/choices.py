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


class SettingsError(ValueError):
    """A setting that cannot work (a bound, a combination); ``str(err)`` is one line naming the
    setting. Every entry point prints it as one line, before a model is loaded."""


def check_limit(name: str, value: int | None) -> int | None:
    """``value`` when it is a count limit (>= 1) or None (no limit); otherwise a SettingsError naming ``name``."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SettingsError(f"{name} must be >= 1 or null (the whole split); got {value!r}")
    return value


__all__ = [
    "DTYPE_NAMES",
    "DType",
    "METRIC_MODES",
    "MetricMode",
    "SettingsError",
    "TASKS",
    "Task",
    "UTILITIES",
    "Utility",
    "check_limit",
]
