"""Where the real annotation samples live (``shared/data`` of the workplace, not in the repo).

``coco_unified_sample.json`` (the paper's unified COCO format) and ``textvqa_sample.json``
(TextVQA's release format) are looked for in ``$HONES_SHARED_DIR/data``, then in the
``shared/`` folder beside the repository, then in ``/work/shared`` (the team's layout, for a
clone made elsewhere, e.g. in /tmp). Tests that need them skip when none has them.
"""

from __future__ import annotations

import os
from pathlib import Path


def shared_data_dir() -> Path | None:
    """The first ``<shared>/data`` folder that exists, or None."""
    candidates = [os.environ.get("HONES_SHARED_DIR"), Path(__file__).resolve().parents[2] / "shared", "/work/shared"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "data").is_dir():
            return Path(candidate) / "data"
    return None


SHARED_DATA = shared_data_dir() or Path("shared/data")  # a path that does not exist: the tests skip
COCO_SAMPLE = SHARED_DATA / "coco_unified_sample.json"
TEXTVQA_SAMPLE = SHARED_DATA / "textvqa_sample.json"
