"""Artifact I/O: safetensors files are byte-identical for identical content, and readable."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
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


def test_damaged_safetensors_and_json_files_are_named(tmp_path: Path) -> None:
    """A cut-short safetensors file, a scales file or a bank with malformed JSON: one line naming the file."""
    from hones.attribution.bank import BankError, read_bank
    from hones.interventions import NeuronScaler
    from hones.steering.scales import load_scales, save_scales

    path = save_scales(NeuronScaler({0: torch.tensor([1, 2])}), tmp_path / "scales.safetensors")
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match=rf"{path}: not a readable safetensors file"):
        io.load_tensors(path)
    with pytest.raises(BankError, match=rf"{path}: not a readable safetensors file"):
        load_scales(path)
    for name in ("scales.json", "bank.json"):
        (tmp_path / name).write_text('[{"layer": 0,')
    with pytest.raises(BankError, match=r"scales.json: malformed JSON at line 1"):
        load_scales(tmp_path / "scales.json")
    with pytest.raises(BankError, match=r"bank.json: malformed JSON at line 1"):
        read_bank(tmp_path / "bank.json")


def test_an_output_folder_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    taken = tmp_path / "a_file"
    taken.write_text("x")
    with pytest.raises(io.OutputError, match=rf"{taken / 'runs'}: cannot write results there"):
        io.make_output_dir(taken / "runs")
    assert io.make_output_dir(tmp_path / "new" / "runs").is_dir() and not list((tmp_path / "new" / "runs").iterdir())


def test_limited_names() -> None:
    assert io.limited_name("ffn_dependence", None) == "ffn_dependence.json"
    assert io.limited_name("ffn_dependence", 100) == "ffn_dependence_limit100.json"
    assert io.limited_name("x", 3, ".md") == "x_limit3.md"
