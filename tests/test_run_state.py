"""``state.json`` of an analyze run: unreadable or foreign files get a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest

from hones.attribution.run_state import AnalysisError, RunState


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"version": 1, "stages": {', r"malformed JSON at line 1"),
        ('{"stages": {}}', r"not a state file of this version"),
        ("[1, 2]", r"not a state file of this version"),
    ],
)
def test_bad_state_file_is_one_line_and_names_it(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(AnalysisError, match=message) as info:
        RunState(path, "toy", "vqa")
    assert str(path) in str(info.value) and "\n" not in str(info.value) and "remove it" in str(info.value)


def test_state_round_trip(tmp_path: Path) -> None:
    state = RunState(tmp_path / "state.json", "toy", "vqa")
    state.set_config({"seed": 0})
    state.save()
    again = RunState(tmp_path / "state.json")
    assert again.data["model_name"] == "toy" and again.data["config"] == {"seed": 0} and again.stages == {}


def test_lenient_loading_does_not_invalidate_a_finished_stage(tmp_path: Path) -> None:
    """A strict run stopped by a bad item, rerun with --data.lenient true as the error says, keeps the
    stages it finished (lenient changes the items only where strict loading fails); other data
    settings still do not match."""
    from hones.attribution.run_state import StageMismatchError

    state = RunState(tmp_path / "state.json", "toy", "vqa")
    state.mark_done("heads", {"data": {"seed": 0, "lenient": False}, "heads": {"top_k": 4}})
    assert state.is_done("heads", {"data": {"seed": 0, "lenient": True}, "heads": {"top_k": 4}})
    with pytest.raises(StageMismatchError, match=r"data.seed: 0 -> 1"):
        state.is_done("heads", {"data": {"seed": 1, "lenient": True}, "heads": {"top_k": 4}})
