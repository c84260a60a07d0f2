"""Data errors and the skip report used by the loaders' lenient mode.

Strict mode (the default everywhere) raises :class:`DataError` at the first bad item,
with a one-line message naming the file, the item and the field. Lenient mode skips
the item instead and counts it in a :class:`SkipReport`, whose summary is logged:
items are never dropped silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from os import PathLike

logger = logging.getLogger("hones.data")


def _one_line(text: object) -> str:
    """Collapse ``text`` onto a single line (newlines become visible ``\\n``)."""
    return str(text).replace("\r", "\\r").replace("\n", "\\n")


def _reason_of(error: DataError) -> str:
    """A short, item-independent reason: the field plus the problem up to its details."""
    problem = error.problem
    for mark in (":", " (", ", got"):
        problem = problem.split(mark, 1)[0]
    return f"{error.field}: {problem}" if error.field else problem


class DataError(ValueError):
    """Bad input data; ``str(err)`` is one line: ``FILE [item ITEM] [field 'FIELD']: PROBLEM``.

    Attributes ``file``, ``item``, ``field`` and ``problem`` hold the parts. ``DataError(message)``
    alone, as torch rebuilds an error raised in a DataLoader worker, keeps the message's last line
    (the worker's one-line error) as ``problem``.
    """

    def __init__(
        self,
        file: str | PathLike[str],
        problem: str | None = None,
        item: object | None = None,
        field: str | None = None,
    ) -> None:
        if problem is None:  # rebuilt from its message alone: torch re-raises a DataLoader worker's error so
            line = str(file).strip().splitlines()[-1] if str(file).strip() else ""
            self.file, self.item, self.field = "", None, None
            self.problem = _one_line(line.split("DataError: ", 1)[-1])  # the worker's one line, traceback dropped
            super().__init__(self.problem)
            return
        self.file = str(file)
        self.item = None if item is None else _one_line(item)
        self.field = field
        self.problem = _one_line(problem)
        parts = [self.file]
        if self.item is not None:
            parts.append(f"item {self.item}")
        if field is not None:
            parts.append(f"field '{field}'")
        super().__init__(_one_line(" ".join(parts) + ": " + self.problem))


class SkipReport:
    """Counts the items a lenient loader skipped, by reason.

    ``add(err)`` records one skipped item; ``summary()`` is a one-line account;
    ``log()`` writes it as a warning on the ``hones.data`` logger (shown on stderr
    even when logging is not configured).
    """

    def __init__(self, source: str = "") -> None:
        self.source = source
        self.reasons: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def add(self, error: DataError | str, reason: str | None = None, count: int = 1) -> None:
        """Count ``count`` skipped item(s) under ``reason`` (default: the error's field and problem)."""
        if isinstance(error, DataError):
            key = reason or _reason_of(error)
            self.examples.setdefault(key, str(error))
        else:
            key = reason or _one_line(error)
        self.reasons[key] += count

    @property
    def total(self) -> int:
        """Number of skipped items."""
        return sum(self.reasons.values())

    def __len__(self) -> int:
        return self.total

    def merge(self, other: SkipReport) -> None:
        """Add another report's counts to this one."""
        self.reasons.update(other.reasons)
        for key, example in other.examples.items():
            self.examples.setdefault(key, example)

    def to_json(self) -> dict[str, object]:
        """``{"total": n, "reasons": {reason: count}}`` (most frequent first), for results files."""
        return {"total": int(self.total), "reasons": dict(self.reasons.most_common())}

    def summary(self) -> str:
        """One line: ``skipped N items from SOURCE: 2 x reason; 1 x reason``."""
        where = f" from {self.source}" if self.source else ""
        if not self.total:
            return f"skipped 0 items{where}"
        detail = "; ".join(f"{count} x {reason}" for reason, count in self.reasons.most_common())
        return _one_line(f"skipped {self.total} item(s){where}: {detail}")

    def log(self, level: int = logging.WARNING) -> None:
        """Log the summary (and one example message per reason) if anything was skipped."""
        if not self.total:
            return
        logger.log(level, self.summary())
        for example in self.examples.values():
            logger.log(level, "  e.g. %s", example)
