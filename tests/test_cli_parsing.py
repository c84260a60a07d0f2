"""Every entry point stops bad settings in one line: parse errors without the usage dump, YAML
errors naming the file and line, no option abbreviations, and bounds (limits) before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hones.cli_parsing import config_paths, one_line, yaml_problem
from tests.test_analyze_cli import load_cli
from tests.test_steering import load_train_py

ROOT = Path(__file__).resolve().parents[1]
STEERING = ROOT / "configs" / "steering" / "toy_llava_vqa.yaml"
ANALYZE = ROOT / "configs" / "analyze" / "toy_llava.yaml"


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("Seed set")]
    assert len(err) == 1, err
    assert "usage:" not in err[0]
    return err[0]


@pytest.fixture
def bank(tmp_path: Path) -> Path:
    path = tmp_path / "bank.json"
    path.write_text(json.dumps([{"layer": 0, "neuron": 1, "score": 1.0, "rank": 1}]))
    return path


def test_config_paths_and_yaml_problems(tmp_path: Path) -> None:
    assert config_paths(["fit", "--config", "a.yaml", "-c", "b.yaml", "--config=c.yaml", "--x", "d"]) == ["a.yaml", "b.yaml", "c.yaml"]
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  task: vqa\n  bank: [1,\n")
    assert yaml_problem(str(broken)).startswith("not valid YAML:") and "line 4" in yaml_problem(str(broken))
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    assert "holds a list" in yaml_problem(str(listed))
    assert yaml_problem(str(ANALYZE)) is None and yaml_problem(str(tmp_path / "missing.yaml")) is None
    assert one_line("a\n\n  b\n") == "a; b"


def test_analyze_py_parse_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli = load_cli()
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: models/toy-llava\nheads: {top_k: 4\n")
    with pytest.raises(SystemExit) as info:
        cli.main(["heads", "--config", str(broken)])
    line = one_error_line(capsys)
    assert info.value.code == 2 and str(broken) in line and "not valid YAML" in line and "line 3" in line
    with pytest.raises(SystemExit):
        cli.main(["heads", "--config", str(ANALYZE), "--wrongkey", "3"])
    assert "unrecognized arguments: --wrongkey 3 (options: analyze.py heads --help)" in one_error_line(capsys)


def test_an_abbreviated_option_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """jsonargparse took ``--neurons.top_rat`` for ``--neurons.top_ratio``."""
    with pytest.raises(SystemExit):
        load_cli().main(["neurons", "--config", str(ANALYZE), "--neurons.top_rat", "0.05"])
    assert "unrecognized arguments: --neurons.top_rat" in one_error_line(capsys)
    with pytest.raises(SystemExit):
        load_train_py().main(["fit", "--config", str(STEERING), "--model.max_new_token", "5"])
    assert "unrecognized arguments: --model.max_new_token" in one_error_line(capsys)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        (["--data.limit", "0"], "data.limit must be >= 1"),
        (["--compare.test_limit", "0"], "compare.test_limit must be >= 1"),
        (["--compare.dev_limit", "-2"], "compare.dev_limit must be >= 1"),
        (["--compare.test_split_file", "null"], "compare.test_split_file is required"),
    ],
)
def test_train_py_names_a_setting_out_of_bounds(bank: Path, tmp_path: Path, override: list[str], named: str) -> None:
    """These were ValueError tracebacks from LightningCLI's instantiation (a limit of 0 had loaded the whole split)."""
    command = "fit" if override[0].startswith("--data") else "compare"
    argv = [command, "--config", str(STEERING), "--model.bank", str(bank), "--model.output_dir", str(tmp_path / "fit"),
            "--compare.output_dir", str(tmp_path / "compare"), *override]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        load_train_py().main(argv)
    message = str(info.value.code)
    assert message.startswith("train.py: ") and named in message and "\n" not in message

