"""scripts/compare_runs.py: two analyze runs compared on heads, matrices, banks and masking."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_analyze_cli import ROOT, load_script

from hones import io
from hones.attribution.bank import BankEntry, write_bank

compare_runs = load_script(ROOT / "scripts" / "compare_runs.py", "compare_runs")


def write_run(root: Path, importance: torch.Tensor, bank: list[tuple[int, int, float]], masked: float) -> Path:
    """A one-task run folder ``root/tiny/vqa`` with the files analyze.py writes."""
    task = root / "tiny" / "vqa"
    heads = [{"layer": 0, "head": 1, "delta": 0.5}, {"layer": 1, "head": 0, "delta": 0.2}, {"layer": 0, "head": 0, "delta": 0.1}]
    io.write_json(task / "heads.json", {"heads": heads, "selected": [[0, 1], [1, 0]], "top_k": 2})
    io.save_tensors(task / "importance.safetensors", {"importance": importance})
    write_bank(task / "bank_hones.json", [BankEntry(layer, neuron, score, rank) for rank, (layer, neuron, score) in enumerate(bank)])
    io.write_json(task / "masking.json", {"methods": {"hones": {"base": 0.7, "masked": masked}}})
    return root / "tiny"


def test_identical_runs_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    importance = torch.arange(8.0).reshape(2, 4)
    bank = [(1, 3, 7.0), (1, 2, 6.0)]
    a = write_run(tmp_path / "a", importance, bank, 0.6)
    b = write_run(tmp_path / "b", importance.clone(), bank, 0.6)
    assert compare_runs.main([str(a), str(b), "--check"]) == 0
    out = capsys.readouterr().out
    assert "H* equal [(0, 1), (1, 0)]" in out and "bank_hones.json: same neurons, same order" in out
    assert "masking.json: identical" in out and "verdict: agree" in out


def test_differences_are_named_and_fail_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    importance = torch.arange(8.0).reshape(2, 4)
    a = write_run(tmp_path / "a", importance, [(1, 3, 7.0), (1, 2, 6.0)], 0.6)
    b = write_run(tmp_path / "b", importance + 0.07, [(1, 3, 7.0), (0, 1, 5.9999)], 0.55)  # relative 0.01; one swap at the cut-off
    assert compare_runs.main([str(a), str(b)]) == 0  # reporting only
    assert compare_runs.main([str(a), str(b), "--check"]) == 1
    out = capsys.readouterr().out
    assert "1 differ: A only L1/2 (6); B only L0/1 (5.9999); A's last score 6" in out
    assert "relative 0.01  <- over --rtol" in out
    assert "masking hones: masked 0.6000 vs 0.5500 (B-A -0.0500)" in out
    assert compare_runs.main([str(a), str(b), "--check", "--rtol", "0.02"]) == 1  # the bank still differs
    capsys.readouterr()
    io.write_json(b / "vqa" / "masking.json", {"methods": {"hones": {"base": 0.7, "masked": 0.55}, "random": {"base": 0.7, "masked": 0.7}}})
    compare_runs.main([str(a), str(b)])
    assert "masking random: in B only" in capsys.readouterr().out


def test_missing_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_run(tmp_path / "a", torch.ones(2, 4), [(0, 0, 1.0)], 0.6)
    with pytest.raises(SystemExit):
        compare_runs.main([str(a), str(tmp_path / "nowhere")])
    assert "nowhere: not a folder" in capsys.readouterr().err


def test_malformed_file_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_run(tmp_path / "a", torch.ones(2, 4), [(0, 0, 1.0)], 0.6)
    b = write_run(tmp_path / "b", torch.ones(2, 4), [(0, 0, 1.0)], 0.6)
    (b / "vqa" / "bank_hones.json").write_text('[{"layer": 0}]')
    with pytest.raises(SystemExit) as exited:
        compare_runs.main([str(a), str(b)])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bank_hones.json" in err and "'neuron'" in err


def test_a_masking_json_of_wrong_types_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_run(tmp_path / "a", torch.ones(2, 4), [(0, 0, 1.0)], 0.6)
    b = write_run(tmp_path / "b", torch.ones(2, 4), [(0, 0, 1.0)], 0.6)
    io.write_json(b / "vqa" / "masking.json", {"methods": {"hones": {"base": 0.7, "masked": None}}})
    with pytest.raises(SystemExit) as exited:
        compare_runs.main([str(a), str(b)])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "masking.json: methods.hones.masked must be a number, got None" in err
