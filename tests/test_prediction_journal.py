"""``PredictionJournal`` and its use by evaluation passes: an ``evaluate.py`` test pass stopped
by SIGTERM, rerun, predicts only the batches it had not finished and writes the metrics and
predictions of an uninterrupted pass."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest

from eval_fixtures import eval_args, load_evaluate, read_run, save_tiny_llava, write_tiny_world
from hones.prediction_journal import PredictionJournal

ROWS = [{"uid": f"coco:{k}:vqa", "prediction": f"answer {k}", "references": ["a", "b"]} for k in range(5)]


def test_journal_reads_its_own_identity_from_every_rank(tmp_path: Path) -> None:
    first = PredictionJournal(tmp_path / "j", {"model": "m", "tag": "test"}, rank=0)
    assert first.open() == 0
    first.append(ROWS[:2])
    second = PredictionJournal(tmp_path / "j", {"model": "m", "tag": "test"}, rank=1)
    second.open()
    second.append(ROWS[2:3])
    first.close(), second.close()
    again = PredictionJournal(tmp_path / "j", {"tag": "test", "model": "m"}, rank=0)  # key order does not matter
    assert again.open() == 3 and again.rows == {row["uid"]: row for row in ROWS[:3]}
    assert again.lookup([ROWS[0]["uid"], ROWS[2]["uid"]]) == [ROWS[0], ROWS[2]]
    assert again.lookup([ROWS[0]["uid"], ROWS[3]["uid"]]) is None and again.reused == 1
    again.close()
    other = PredictionJournal(tmp_path / "j", {"model": "another", "tag": "test"}, rank=0)
    assert other.open() == 0  # written for another identity: not read (and this rank's file restarts)
    other.close()
    assert PredictionJournal(tmp_path / "j", {"model": "m", "tag": "test"}, rank=1).open() == 1  # rank 1's file kept


def test_journal_drops_a_cut_last_line_and_refuses_a_corrupt_one(tmp_path: Path) -> None:
    journal = PredictionJournal(tmp_path / "j", {"model": "m"})
    journal.open()
    journal.append(ROWS[:2])
    journal.close()
    with open(journal.path, "a", encoding="utf-8") as handle:
        handle.write('{"uid": "coco:9:vqa", "predic')  # a kill in the middle of a line
    again = PredictionJournal(tmp_path / "j", {"model": "m"})
    assert again.open() == 2 and again.dropped == 1
    again.append(ROWS[2:3])  # follows a whole line: the cut one was not kept
    again.close()
    assert PredictionJournal(tmp_path / "j", {"model": "m"}).open() == 3
    lines = journal.path.read_text().splitlines()
    journal.path.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    from hones.data.errors import DataError  # the entry points print it in one line

    with pytest.raises(DataError, match=r"rank0.jsonl: line 2 is not JSON"):
        PredictionJournal(tmp_path / "j", {"model": "m"}).open()


class StopAfter(L.Callback):
    """SIGTERM after test batch ``stop`` (0-based)."""

    def __init__(self, stop: int) -> None:
        self.stop = stop

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.stop:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["vqa", "retrieval"])
def test_evaluate_rerun_predicts_only_the_unfinished_batches(
    tmp_path: Path, sigterm_restored: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], task: str
) -> None:
    """7 test images, batch 2 (retrieval: 3 candidates per image): stopped after 2 batches, a rerun
    limited to 3 batches predicts the third only and keeps the journal, and the full rerun runs the
    model on the other batches only and writes the uninterrupted pass's results."""
    import hones.evaluation as evaluation

    evaluate = load_evaluate()
    model_dir = save_tiny_llava(tmp_path / "model")
    world = write_tiny_world(tmp_path / "world", n_discovery=1, n_test=7)
    predicted: list[int] = []
    plain_predict = evaluation.TaskScorer.predict

    def counted(self: Any, adapter: Any, batch: dict[str, Any]) -> list[dict[str, Any]]:
        predicted.append(len(batch["items"]))
        return plain_predict(self, adapter, batch)

    monkeypatch.setattr(evaluation.TaskScorer, "predict", counted)

    def run(out: Path, *extra: str) -> int:
        predicted.clear()
        evaluate.main(eval_args(model_dir, world, out, task, 2, tmp_path / "cache", list(extra)))
        return len(predicted)

    whole = run(tmp_path / "whole")
    assert whole == (4 if task == "vqa" else 11)  # 7 items, or 7 x 3 candidates, in batches of 2
    stop = ["--trainer.callbacks+=test_prediction_journal.StopAfter", "--trainer.callbacks.stop", "1"]
    with pytest.raises(SystemExit):
        run(tmp_path / "out", *stop)
    journal = tmp_path / "out" / ".journal_test"
    assert len(predicted) == 2 and (journal / "rank0.jsonl").is_file() and not (tmp_path / "out" / "metrics_test.json").exists()
    capsys.readouterr()
    copy = tmp_path / "copy"  # the stopped run's folder, rerun at another precision: nothing reused
    shutil.copytree(tmp_path / "out", copy)
    assert run(copy, "--trainer.precision", "bf16-true") == whole and "interrupted pass" not in capsys.readouterr().out
    # a pass limited to 3 batches reuses the first 2, predicts the third and keeps the journal for the full pass
    assert run(tmp_path / "out", "--trainer.limit_test_batches", "3") == 1
    assert f"a limited pass; the prediction journal in {journal} is kept" in capsys.readouterr().out
    assert (journal / "rank0.jsonl").is_file()
    assert run(tmp_path / "out") == whole - 3
    assert f"predictions of an interrupted pass found in {journal}" in capsys.readouterr().out
    (metrics, rows), (whole_metrics, whole_rows) = read_run(tmp_path / "out"), read_run(tmp_path / "whole")
    assert rows == whole_rows and metrics["metrics"] == whole_metrics["metrics"] and metrics["num_items"] == whole_metrics["num_items"]
    assert not journal.exists()
