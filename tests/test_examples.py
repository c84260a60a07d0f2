"""The scripts in ``examples/`` run as a user runs them (tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_own_lightning_module_example(tmp_path: Path) -> None:
    """HONES's four callbacks on a module defined in the example: heads, neurons, masking, steering."""
    from hones.data.toyworld import ToyWorldConfig, generate_world

    world = tmp_path / "world"
    generate_world(world, ToyWorldConfig(n_train=4, n_discovery=6, n_dev=6, n_test=6, n_ood=2))
    out = tmp_path / "out"
    command = [sys.executable, "examples/own_lightning_module.py", "--world", str(world), "--limit", "6", "--epochs", "1", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "H* (layer, head): [(" in done.stdout and "HONES bank: 14 neurons" in done.stdout
    assert "masked      hones:" in done.stdout and "learned 14 scales" in done.stdout
    heads = json.loads((out / "heads.json").read_text())
    assert len(heads["heads"]) == 16 and heads["num_items"] == 6
    masking = json.loads((out / "masking.json").read_text())
    assert set(masking["banks"]) == {"hones", "random", "activation", "write_in"}
    scales = json.loads((out / "scales" / "scales.json").read_text())
    assert len(scales) == 14 and any(row["scale"] != 0.0 for row in scales)
