"""``state.json``: which stages of a run folder are finished, and with which settings.

Layout::

    {"version": 1, "model_name": "toy-llava", "task": "vqa",
     "config": {... the last invocation's full settings ...},
     "stages": {"heads":       {"fingerprint": {...}, "finished_at": "...", "info": {...}},
                "neurons":     {...},
                "ape":         {...},
                "mask/hones":  {"fingerprint": {...}, "finished_at": "...", "info": {<masking row>}},
                ...}}

A stage counts as done only when its stored fingerprint equals the current one
(``hones.attribution.settings.stage_fingerprint``); a different one is a
``StageMismatchError`` naming the differing settings, unless the caller forgets the
stage first (``--overwrite``). The file is written atomically after each stage, on
global rank 0 only.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Iterable

from hones import io
from hones.attribution.settings import align_to_stored, fingerprint_differences

STATE_VERSION = 1


class AnalysisError(RuntimeError):
    """A run that cannot go on as asked (one-line message for the command line)."""


class StageMismatchError(AnalysisError):
    """A finished stage was computed with other settings than the ones asked for now."""


def downstream(stage: str) -> list[str]:
    """Stage-name prefixes that depend on ``stage`` (itself included)."""
    order = {"heads": ["heads", "neurons", "ape", "mask/"], "neurons": ["neurons", "ape", "mask/"], "ape": ["ape", "mask/ape"]}
    if stage in order:
        return order[stage]
    return [stage]


# Recorded, but not compared: settings that cannot change a finished stage's result. ``lenient``
# changes which items load only where strict loading stops with an error, so a stage finished in
# either mode holds the items the other would load (a run stopped by a strict error resumes with
# --data.lenient true, as that error suggests, without recomputing the stages it finished).
NOT_COMPARED = ("lenient",)


def _compared(fingerprint: Any) -> Any:
    """``fingerprint`` without the ``NOT_COMPARED`` keys, at any depth."""
    if isinstance(fingerprint, dict):
        return {key: _compared(value) for key, value in fingerprint.items() if key not in NOT_COMPARED}
    if isinstance(fingerprint, list):
        return [_compared(value) for value in fingerprint]
    return fingerprint


class RunState:
    """The ``state.json`` of one run folder (``<output_root>/<model>/<task>/``)."""

    def __init__(
        self,
        path: str | os.PathLike,
        model_name: str = "",
        task: str = "",
        remedy: str = "rerun with --overwrite to recompute it and everything that depends on it",
    ) -> None:
        self.path = Path(path)
        self.remedy = remedy  # the end of the mismatch message
        self.data: dict[str, Any] = {"version": STATE_VERSION, "model_name": model_name, "task": task, "config": {}, "stages": {}}
        if self.path.is_file():
            remedy = "remove it (or the run folder) to recompute the run's stages"
            try:
                loaded = io.read_json(self.path)
            except ValueError as error:  # malformed JSON: the message names the file, line and column
                raise AnalysisError(f"{error}; {remedy}") from None
            if not isinstance(loaded, dict) or loaded.get("version") != STATE_VERSION or "stages" not in loaded:
                raise AnalysisError(f"{self.path}: not a state file of this version; {remedy}")
            self.data = loaded

    @property
    def stages(self) -> dict[str, Any]:
        return self.data["stages"]

    def record(self, stage: str) -> dict[str, Any] | None:
        """The stored record of ``stage`` (None when not finished)."""
        return self.stages.get(stage)

    def is_done(self, stage: str, fingerprint: dict[str, Any]) -> bool:
        """True when ``stage`` finished with ``fingerprint``; raises ``StageMismatchError`` if with another."""
        record = self.record(stage)
        if record is None:
            return False
        stored = record.get("fingerprint")
        fingerprint = align_to_stored(stored, fingerprint)
        if _compared(stored) != _compared(fingerprint):
            differences = fingerprint_differences(_compared(stored), _compared(fingerprint))
            shown = "; ".join(differences[:6]) + (f"; ... ({len(differences)} in all)" if len(differences) > 6 else "")
            raise StageMismatchError(
                f"{self.path}: stage {stage!r} was computed with other settings ({shown}). "
                f"Restore those settings to reuse it, or {self.remedy}."
            )
        return True

    def forget(self, stages: Iterable[str]) -> list[str]:
        """Drop the records of ``stages`` and of every stage that depends on them; returns the dropped names."""
        prefixes = [prefix for stage in stages for prefix in downstream(stage)]
        dropped = [name for name in self.stages if any(name == p or (p.endswith("/") and name.startswith(p)) for p in prefixes)]
        for name in dropped:
            del self.stages[name]
        return dropped

    def mark_done(self, stage: str, fingerprint: dict[str, Any], info: dict[str, Any] | None = None) -> None:
        """Record ``stage`` as finished (call ``save`` to write)."""
        self.stages[stage] = {
            "fingerprint": fingerprint,
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "info": dict(info or {}),
        }

    def set_config(self, config: dict[str, Any]) -> None:
        self.data["config"] = config

    def save(self) -> Path:
        """Write the file atomically."""
        return io.write_json(self.path, self.data)
