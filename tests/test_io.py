"""Artifact I/O: safetensors files are byte-identical for identical content, and readable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from hones import io


def test_safetensors_bytes_do_not_depend_on_metadata_order(tmp_path: Path) -> None:
    tensors = {"delta": torch.arange(12.0).view(3, 4), "baseline": torch.tensor(0.5, dtype=torch.float64)}
    metadata = {f"key{k}": str(k) for k in (7, 3, 9, 1, 5, 0, 8)}
    blobs = []
    for k in range(6):  # each save builds a new hash map in the safetensors library
        path = io.save_tensors(tmp_path / f"a{k}.safetensors", tensors, dict(reversed(metadata.items())) if k % 2 else metadata)
        blobs.append(path.read_bytes())
    assert all(blob == blobs[0] for blob in blobs)
    size = int.from_bytes(blobs[0][:8], "little")
    assert size % 8 == 0
    assert list(json.loads(blobs[0][8 : 8 + size])["__metadata__"]) == sorted(metadata)
    loaded = io.load_tensors(tmp_path / "a0.safetensors")
    assert all(torch.equal(loaded[name], tensors[name]) for name in tensors)
    with safe_open(str(tmp_path / "a0.safetensors"), "pt") as handle:
        assert handle.metadata() == metadata


def test_atomic_writes_leave_shareable_files(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    path = io.write_json(tmp_path / "out.json", {"a": 1})
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open(path, "w") would make it, not mkstemp's 0600
    assert io.read_json(path) == {"a": 1}
