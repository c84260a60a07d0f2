"""The methods x tasks masking table: what it lacks is said, not hidden."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hones.attribution.reports import masking_table, masking_table_gaps, write_masking_table


def report(base: float, drops: dict[str, float]) -> dict:
    return {"metric": "m", "num_items": 10, "methods": {m: {"base": base, "relative_drop": d, "num_neurons": 14} for m, d in drops.items()}}


def test_missing_tasks_and_methods_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reports = {"vqa": report(0.5, {"hones": 2.0, "random": 1.0}), "ocr": report(0.9, {"hones": 4.0, "random": 0.0})}
    table = masking_table(reports, ["hones", "random", "ape"])
    assert table["missing_tasks"] == ["caption", "retrieval"]
    assert table["methods_without_results"] == ["ape"]
    assert table["rows"]["hones"]["average"] == 3.0 and table["rows"]["hones"]["num_tasks"] == 2
    assert masking_table_gaps(table) == [
        "no masking.json for caption, retrieval; averages cover the tasks shown",
        "no results for method(s) ape in any task",
    ]
    complete = masking_table({t: report(1.0, {"hones": 1.0}) for t in ("vqa", "ocr", "caption", "retrieval")})
    assert masking_table_gaps(complete) == []

    for task, content in reports.items():
        (tmp_path / task).mkdir()
        (tmp_path / task / "masking.json").write_text(json.dumps(content))
    _, markdown = write_masking_table(tmp_path)
    assert "Note: no masking.json for caption, retrieval" in markdown
    import analyze

    assert analyze.main(["table", "--runs", str(tmp_path)]) == 0
    assert "analyze.py table: no masking.json for caption, retrieval" in capsys.readouterr().err


def test_malformed_masking_json_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import analyze

    (tmp_path / "vqa").mkdir()
    (tmp_path / "vqa" / "masking.json").write_text("{")
    assert analyze.main(["table", "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("analyze.py table: ") and "vqa/masking.json: malformed JSON" in err


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ({"methods": ["hones"]}, "field 'methods' must be an object"),
        ({"methods": {"hones": None}}, "methods.hones must be an object"),
        ({"methods": {"hones": {"base": 0.5, "relative_drop": "2%"}}}, "methods.hones.relative_drop must be a number or null, got '2%'"),
        ({"methods": {"hones": {"relative_drop": 2.0}}}, "methods.hones.base must be a number, got None"),
        ({"methods": {"hones": {"base": 0.5, "masked": None}}}, "methods.hones.masked must be a number, got None"),
        ({"methods": {"hones": {"base": 0.5, "num_neurons": 1.5}}}, "methods.hones.num_neurons must be an integer"),
    ],
)
def test_a_masking_json_of_wrong_types_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: dict, named: str) -> None:
    """A hand-edited masking.json used to end the table in a traceback (TypeError / AttributeError)."""
    import analyze

    (tmp_path / "vqa").mkdir()
    (tmp_path / "vqa" / "masking.json").write_text(json.dumps({"metric": "m", **edit}))
    assert analyze.main(["table", "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "vqa/masking.json: " in err and named in err
