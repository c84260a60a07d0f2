"""``PredictionJournal``: the rows an evaluation pass has predicted so far, so that a rerun of an
interrupted pass predicts only the rest.

A test pass of a 7B model over 3,000 images generates for tens of minutes; a preemption in
it used to lose the whole pass. While a pass runs, each process appends the prediction rows
of every batch (``TaskScorer.predict``: uid, prediction and references, or the retrieval
score) to ``<directory>/rank<k>.jsonl`` and flushes it. The first line of each file is the
pass's identity (JSON data, ``hones.evaluation.journal_identity``: the module's settings, a
digest of the model folder and of the module's parameters and buffers, scales included, the
trainer's precision and accelerator, the data settings with digests of the annotation and
split files, the stage). A rerun reads every file whose identity equals its own, whatever
the process count that wrote it, and takes a batch's rows from there when it holds every
item of the batch; the model runs on the other batches. The metrics are fed the same rows in
the same order either way, so the result equals an uninterrupted pass with those settings.
Once the pass's results are written the directory is removed, unless the pass was cut short
by ``limit_*_batches`` or ``fast_dev_run``: then it is kept for the full pass. Not in the identity: the image
files' contents (paths only), and what a callback of the user's own does to the model
without parameters or buffers of its own.

A kill while a line is written leaves a partial last line: it is dropped, and counted in
the message that reports the reuse. Rows are kept by uid; uids are unique within a split.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import IO, Any, Sequence

from hones.data.errors import DataError
from hones.io import make_output_dir


class PredictionJournal:
    """The journal of one evaluation pass in ``directory``, for process ``rank``."""

    def __init__(self, directory: str | os.PathLike, identity: Any, rank: int = 0) -> None:
        self.directory = Path(directory)
        self.identity = json.loads(json.dumps(identity, sort_keys=True, default=str))
        self.rank = rank
        self.rows: dict[str, dict[str, Any]] = {}
        self.dropped = 0  # partial last lines skipped while reading
        self.reused = 0  # batches whose rows came from the journal in this pass
        self._handle: IO[str] | None = None

    @property
    def path(self) -> Path:
        return self.directory / f"rank{self.rank}.jsonl"

    def open(self) -> int:
        """Read every file of the directory written for this identity (other identities are left
        alone and not read); start this process's own file. Returns the number of rows read."""
        own: list[dict[str, Any]] = []
        for file in sorted(self.directory.glob("rank*.jsonl")):
            rows = self._read(file)
            if rows is None:
                continue
            for row in rows:
                self.rows[str(row["uid"])] = row
            if file == self.path:
                own = rows
        make_output_dir(self.directory)  # OutputError (one line) where the run folder cannot be written
        # rewritten whole (identity and the rows kept), so that a partial last line is not followed by new ones
        partial = self.path.with_name(f".{self.path.name}.partial")
        with open(partial, "w", encoding="utf-8") as handle:
            handle.write(json.dumps({"identity": self.identity}, sort_keys=True) + "\n")
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in own)
        os.replace(partial, self.path)
        self._handle = open(self.path, "a", encoding="utf-8")
        return len(self.rows)

    def _read(self, file: Path) -> list[dict[str, Any]] | None:
        """The rows of ``file`` if its first line is this identity (None otherwise)."""
        with open(file, encoding="utf-8") as handle:
            lines = handle.read().split("\n")
        try:
            header = json.loads(lines[0])
        except json.JSONDecodeError:
            return None
        if not isinstance(header, dict) or header.get("identity") != self.identity:
            return None
        body = lines[1:]
        if body and body[-1] == "":
            body.pop()  # the newline after the last full line
        rows = []
        for number, line in enumerate(body, start=2):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if number != len(body) + 1:
                    raise DataError(  # the entry points print it in one line
                        file, f"line {number} is not JSON (only the last line may be cut short); remove "
                        f"{self.directory} to predict the pass again"
                    ) from None
                self.dropped += 1  # the last line, cut short by a kill
        return rows

    def lookup(self, uids: Sequence[str]) -> list[dict[str, Any]] | None:
        """The journal's rows for every uid of a batch, or None when any is missing."""
        if not uids or any(uid not in self.rows for uid in uids):
            return None
        self.reused += 1
        return [self.rows[uid] for uid in uids]

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Record a predicted batch's rows (flushed to the operating system at once)."""
        if self._handle is None:
            raise RuntimeError("PredictionJournal.append before open()")
        self._handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        self._handle.flush()
        for row in rows:
            self.rows[str(row["uid"])] = row

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def remove(self) -> None:
        """Close, and delete the directory (the pass's results are written)."""
        self.close()
        if self.directory.is_dir():
            shutil.rmtree(self.directory)


__all__ = ["PredictionJournal"]
