"""Distributed evaluation and attribution count every item once: N processes = 1 process.

Each case runs one process in-process as the reference, then launches ``torchrun`` as a
subprocess (gloo on CPU; never ``strategy="ddp"`` inside pytest, which would relaunch
pytest). Item counts are odd, so a padding ``DistributedSampler`` would count an item twice:
the vqa case is built so that this duplicate would change the accuracy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eval_fixtures import (
    REPO,
    answer_with_model_predictions,
    eval_args,
    free_port,
    load_evaluate,
    read_run,
    save_tiny_llava,
    subprocess_env,
    write_tiny_world,
)
from hones.attribution.bank import load_head_scores

LAUNCH_TIMEOUT_S = 300
N_TEST = 5  # odd: rank 0 gets 3 items, rank 1 gets 2
N_DISCOVERY = 5


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny model dir and a tiny toy world where the model is right on test vqa items 0 and 2."""
    root = tmp_path_factory.mktemp("distributed")
    model_dir = save_tiny_llava(root / "model")
    world = write_tiny_world(root / "world", n_discovery=N_DISCOVERY, n_test=N_TEST)
    cache = root / "hf_cache"
    accuracy, padded_accuracy = answer_with_model_predictions(world, model_dir, cache, indices=(0, 2))
    return {"root": root, "model": model_dir, "world": world, "cache": cache,
            "accuracy": accuracy, "padded_accuracy": padded_accuracy}  # fmt: skip


def torchrun(args: list[str], nproc: int = 2, nnodes: int = 1, node_rank: int = 0, port: int | None = None) -> list[str]:
    """``python -m torch.distributed.run`` command line (static rendezvous on 127.0.0.1)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={nproc}", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
        "--master_addr=127.0.0.1", f"--master_port={port or free_port()}",
        *args,
    ]  # fmt: skip


def launch(command: list[str]) -> None:
    done = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"


def reference(setting: dict, task: str, batch_size: int) -> tuple[dict, list[dict]]:
    """The 1-process run (in this process)."""
    out = setting["root"] / f"one_{task}_{batch_size}"
    load_evaluate().main(eval_args(setting["model"], setting["world"], out, task, batch_size, setting["cache"]))
    return read_run(out)


def assert_same_run(one: tuple[dict, list[dict]], many: tuple[dict, list[dict]], world_size: int, items: int) -> None:
    (metrics_1, rows_1), (metrics_n, rows_n) = one, many
    assert metrics_1["num_items"] == metrics_n["num_items"] == items
    assert metrics_1["world_size"] == 1 and metrics_n["world_size"] == world_size
    uids = [row["uid"] for row in rows_n]
    assert len(uids) == len(set(uids)) == items, "an item was counted twice or missed"
    assert uids == [row["uid"] for row in rows_1]
    assert set(metrics_n["metrics"]) == set(metrics_1["metrics"]) and len(metrics_1["metrics"]) == 2
    for name, value in metrics_1["metrics"].items():
        assert metrics_n["metrics"][name] == pytest.approx(value, abs=1e-6), name
    assert metrics_n["headline_mode"] == "paper" and metrics_n["metric"] == pytest.approx(metrics_1["metric"], abs=1e-6)


@pytest.mark.slow
def test_two_processes_generation_equal_one_process(setting: dict) -> None:
    """vqa (greedy generation), batch 1: ranks run 3 and 2 batches; the accuracy is the 1-process one."""
    assert setting["accuracy"] != setting["padded_accuracy"], "the world must make a duplicate visible"
    one = reference(setting, "vqa", batch_size=1)
    assert one[0]["metric"] == pytest.approx(setting["accuracy"])
    out = setting["root"] / "two_vqa"
    args = eval_args(setting["model"], setting["world"], out, "vqa", 1, setting["cache"])
    launch(torchrun(["evaluate.py", *args]))  # devices / num_nodes taken from torchrun by evaluate.py
    two = read_run(out)
    assert_same_run(one, two, world_size=2, items=N_TEST)
    assert [r["prediction"] for r in two[1]] == [r["prediction"] for r in one[1]]
    assert two[0]["metric"] == pytest.approx(setting["accuracy"]) != setting["padded_accuracy"]
    assert list((out / "tb").rglob("events.out.tfevents.*")), "TensorBoard scalars were not written"


@pytest.mark.slow
def test_a_stopped_two_process_pass_finishes_on_one_process(setting: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """vqa, batch 1, 2 processes stopped by SIGTERM after each rank's first batch: the rerun on one
    process reads both ranks' prediction journals, runs the model on the 3 other items only and
    writes the 1-process run's metrics and predictions."""
    import os

    import hones.evaluation as evaluation

    one = reference(setting, "vqa", batch_size=1)
    out = setting["root"] / "stopped_vqa"
    args = eval_args(setting["model"], setting["world"], out, "vqa", 1, setting["cache"])
    stop = ["--trainer.callbacks+=test_prediction_journal.StopAfter", "--trainer.callbacks.stop", "0"]
    env = {**subprocess_env(), "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), subprocess_env().get("PYTHONPATH", "")])}
    done = subprocess.run(torchrun(["evaluate.py", *args, *stop]), cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert done.returncode != 0 and not (out / "metrics_test.json").exists(), done.stderr[-3000:]
    assert sorted(p.name for p in (out / ".journal_test").glob("rank*.jsonl")) == ["rank0.jsonl", "rank1.jsonl"]
    predicted: list[int] = []
    plain_predict = evaluation.TaskScorer.predict
    monkeypatch.setattr(evaluation.TaskScorer, "predict", lambda self, a, b: predicted.append(1) or plain_predict(self, a, b))
    load_evaluate().main(args)
    assert len(predicted) == N_TEST - 2
    assert_same_run(one, read_run(out), world_size=1, items=N_TEST)
    assert read_run(out)[1] == one[1] and not (out / ".journal_test").exists()


@pytest.mark.slow
def test_two_processes_retrieval_equal_one_process(setting: dict) -> None:
    """retrieval (Yes-No margin, NDCG@5 over groups), 15 candidates in batches of 2: ranks run 4 and 4 batches
    of unequal sizes (8 and 7 items); NDCG and every score are the 1-process ones."""
    items = N_TEST * 3  # 1 positive + 2 negatives per image
    one = reference(setting, "retrieval", batch_size=2)
    out = setting["root"] / "two_retrieval"
    args = eval_args(setting["model"], setting["world"], out, "retrieval", 2, setting["cache"])
    launch(torchrun(["evaluate.py", *args, "--trainer.devices", "2"]))
    two = read_run(out)
    assert_same_run(one, two, world_size=2, items=items)
    for a, b in zip(one[1], two[1], strict=True):
        assert (a["group"], a["label"]) == (b["group"], b["label"])
        assert b["score"] == pytest.approx(a["score"], abs=1e-5)


@pytest.mark.slow
def test_simulated_two_node_run_equals_one_process(setting: dict) -> None:
    """Two torchrun agents on 127.0.0.1 (--nnodes=2, node ranks 0 and 1, one process each)."""
    one = reference(setting, "vqa", batch_size=2)
    out = setting["root"] / "two_nodes_vqa"
    args = eval_args(setting["model"], setting["world"], out, "vqa", 2, setting["cache"])
    args += ["--trainer.devices", "1", "--trainer.num_nodes", "2"]
    port = free_port()
    commands = [torchrun(["evaluate.py", *args], nproc=1, nnodes=2, node_rank=rank, port=port) for rank in (0, 1)]
    env = subprocess_env()
    nodes = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=LAUNCH_TIMEOUT_S))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.communicate()
    for node, (stdout, stderr) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, f"{stdout[-2000:]}\n{stderr[-4000:]}"
    two = read_run(out)
    assert_same_run(one, two, world_size=2, items=N_TEST)
    assert two[0]["metric"] == pytest.approx(setting["accuracy"])


@pytest.mark.slow
def test_two_process_attribution_equals_one_process(setting: dict) -> None:
    """Head scores (§2) and neuron importances (§3) of 2 processes equal the 1-process ones within 1e-5."""
    from distributed_attribution import run

    common = ["--model", str(setting["model"]), "--world", str(setting["world"]), "--cache-dir", str(setting["cache"])]
    one, two = setting["root"] / "attribution_one", setting["root"] / "attribution_two"
    run(str(setting["model"]), str(setting["world"]), str(one), cache_dir=str(setting["cache"]))
    launch(torchrun(["tests/distributed_attribution.py", *common, "--out", str(two)]))
    scores_1, scores_2 = load_head_scores(one / "head_scores.safetensors"), load_head_scores(two / "head_scores.safetensors")
    assert scores_1.num_items == scores_2.num_items == N_DISCOVERY
    assert torch.isfinite(scores_1.delta).all()
    torch.testing.assert_close(scores_2.delta, scores_1.delta, atol=1e-5, rtol=0)
    assert scores_2.baseline == pytest.approx(scores_1.baseline, abs=1e-5)
    assert scores_2.top_heads(3) == scores_1.top_heads(3)
    matrices_1, matrices_2 = load_file(str(one / "importance.safetensors")), load_file(str(two / "importance.safetensors"))
    assert set(matrices_1) == set(matrices_2)
    for name in ("importance", "mean_contribution", "baseline_activation"):
        torch.testing.assert_close(matrices_2[name], matrices_1[name], atol=1e-5, rtol=0, msg=name)
    assert float(matrices_1["importance"].abs().sum()) > 0


def test_evaluation_sampler_shards_without_duplicates(setting: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank r of W gets items r, r + W, ...: 5 items on 2 ranks -> 3 + 2, never a padding duplicate."""
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    from hones.data import datamodule

    data = datamodule.HonesDataModule(
        "coco_unified", str(setting["world"] / "coco/unified.json"), "vqa", "test",
        image_root=str(setting["world"] / "coco/images"), split_file=str(setting["world"] / "splits/test.json"),
        cache_dir=str(setting["cache"]),
    )  # fmt: skip
    data.setup()
    data.set_encoder(lambda images, prompts, targets=None: {})
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(datamodule, "distributed_world", lambda rank=rank: (2, rank))
        for loader in (data.val_dataloader(), data.test_dataloader(), data.predict_dataloader()):
            assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
        shards.append(list(data.test_dataloader().sampler))
        assert data.train_dataloader().batch_sampler.sampler.__class__.__name__ == "RandomSampler"  # Lightning shards training
    assert shards == [[0, 2, 4], [1, 3]]
    monkeypatch.setattr(datamodule, "distributed_world", lambda: (1, 0))
    assert data.test_dataloader().sampler.__class__.__name__ == "SequentialSampler"
    monkeypatch.setattr(datamodule, "distributed_world", lambda: (8, 0))
    with pytest.raises(ValueError, match="5 evaluation item"):
        data.test_dataloader()
