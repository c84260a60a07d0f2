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


def test_file_digests_are_compared_where_recorded(tmp_path: Path) -> None:
    """A data file regenerated at the same path is another input; a record made before the
    digests were recorded (no ``data_files``) is reused as it was."""
    from hones.attribution.run_state import StageMismatchError

    state = RunState(tmp_path / "state.json", "toy", "vqa")
    state.mark_done("heads", {"data": {"seed": 0}, "discovery": {"limit": None}})
    now = {"data": {"seed": 0, "data_files": {"annotation_file": "a1"}}, "discovery": {"limit": None, "data_files": {"split_file": "s1"}}}
    assert state.is_done("heads", now)
    state.mark_done("heads", now)
    assert state.is_done("heads", now)
    changed = {**now, "discovery": {"limit": None, "data_files": {"split_file": "s2"}}}
    with pytest.raises(StageMismatchError, match=r"discovery.data_files.split_file: 's1' -> 's2'"):
        state.is_done("heads", changed)
    with pytest.raises(StageMismatchError, match=r"data.seed: 0 -> 1"):  # other keys absent from a record still count
        state.is_done("heads", {**now, "data": {"seed": 1, "data_files": {"annotation_file": "a1"}}})


def test_file_digest_follows_the_file(tmp_path: Path) -> None:
    from hones.io import file_digest

    path = tmp_path / "split.json"
    assert file_digest(path) is None and file_digest(None) is None
    path.write_text("[1, 2, 3]")
    first = file_digest(path)
    assert first == file_digest(str(path)) and len(first) == 64
    path.write_text("[1, 2]")
    assert file_digest(path) != first
