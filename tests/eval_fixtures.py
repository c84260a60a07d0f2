"""Helpers shared by the evaluation CLI and distributed tests: a tiny model directory, a tiny
toy world, ``evaluate.py`` loaded as a module, and the arguments of one evaluation run."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path
from types import ModuleType

import torch

from hones.data.toyworld import ToyWorldConfig, generate_world

REPO = Path(__file__).resolve().parents[1]
EVAL_CONFIG = REPO / "configs" / "toy" / "eval.yaml"
MAX_NEW_TOKENS = 4


def save_tiny_llava(directory: Path) -> Path:
    """A ~1M-parameter random LLaVA (seed 0) saved where ``load_adapter`` can read it."""
    from hones.models import build_tiny_llava, save_pretrained

    model, processor = build_tiny_llava(seed=0)
    return save_pretrained(model, processor, directory)


def write_tiny_world(directory: Path, n_discovery: int = 5, n_test: int = 5) -> Path:
    """A toy world with only discovery and test images (odd counts by default)."""
    config = ToyWorldConfig(n_train=0, n_discovery=n_discovery, n_dev=0, n_test=n_test, n_ood=0)
    generate_world(directory, config)
    return directory


def data_args(world: Path, cache_dir: Path, split: str = "test") -> list[str]:
    """``--data.*`` overrides pointing the shipped toy config at ``world``."""
    return [
        "--data.annotation_file", str(world / "coco" / "unified.json"),
        "--data.image_root", str(world / "coco" / "images"),
        "--data.split", split,
        "--data.split_file", str(world / "splits" / f"{split}.json"),
        "--data.cache_dir", str(cache_dir),
        "--data.toy_world", "null",
    ]  # fmt: skip


def eval_args(
    model_dir: Path, world: Path, out: Path, task: str, batch_size: int, cache_dir: Path, extra: list[str] | None = None
) -> list[str]:
    """``evaluate.py test`` arguments: the shipped toy config, the tiny model and world, quiet trainer."""
    return [
        "test",
        "--config", str(EVAL_CONFIG),
        "--model.model", str(model_dir),
        "--model.task", task,
        "--model.max_new_tokens", str(MAX_NEW_TOKENS),
        "--model.output_dir", str(out),
        *data_args(world, cache_dir),
        "--data.batch_size", str(batch_size),
        "--data.n_neg", "2",
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        *(extra or []),
    ]  # fmt: skip


def load_evaluate() -> ModuleType:
    """The repository's ``evaluate.py`` as a module (it is a script at the root, not a package)."""
    spec = importlib.util.spec_from_file_location("hones_evaluate_script", REPO / "evaluate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def subprocess_env() -> dict[str, str]:
    """Environment of the launched processes: one thread each, offline, quiet."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    return env


def read_run(out: Path, stage: str = "test") -> tuple[dict, list[dict]]:
    """``(metrics, predictions)`` written by one evaluation run."""
    metrics = json.loads((out / f"metrics_{stage}.json").read_text())
    rows = [json.loads(line) for line in (out / f"predictions_{stage}.jsonl").read_text().splitlines()]
    return metrics, rows


def _image_id(row: dict) -> str:
    return row["uid"].split(":")[1]


@torch.no_grad()
def answer_with_model_predictions(
    world: Path, model_dir: Path, cache_dir: Path, indices: tuple[int, ...]
) -> tuple[float, float]:
    """Make the tiny random model right on the test vqa items at ``indices`` and wrong elsewhere.

    The answers of those items are replaced by the model's own greedy predictions (batch 1,
    ``MAX_NEW_TOKENS``). Returns ``(accuracy, accuracy with item 0 counted twice)``: the
    second is what a padding distributed sampler would report on 2 processes for an odd count.
    """
    from hones.attribution.batches import encode_items
    from hones.data.datamodule import HonesDataModule
    from hones.evaluation import TaskScorer
    from hones.metrics import VQAAccuracy
    from hones.models import load_adapter

    adapter = load_adapter(str(model_dir))
    data = HonesDataModule(
        "coco_unified", str(world / "coco" / "unified.json"), "vqa", "test",
        image_root=str(world / "coco" / "images"), split_file=str(world / "splits" / "test.json"),
        cache_dir=str(cache_dir / "before_rewrite"),
    )  # fmt: skip
    data.setup()
    scorer = TaskScorer("vqa", MAX_NEW_TOKENS)
    rows = [scorer.predict(adapter, encode_items(adapter, [data.dataset[i]], False))[0] for i in range(len(data.dataset))]
    answers = {}
    for index in indices:
        if not rows[index]["prediction"].strip():
            raise AssertionError(f"the tiny model's prediction for item {index} is empty; pick other items")
        answers[_image_id(rows[index])] = rows[index]["prediction"]
    path = world / "coco" / "unified.json"
    annotation = json.loads(path.read_text())
    for record in annotation["data"]:
        answer = answers.get(str(record["image_id"]))
        if answer is not None:
            record["vqa"]["answer"] = answer
            record["vqa"]["all_answers"] = [answer] * len(record["vqa"]["all_answers"])
    path.write_text(json.dumps(annotation))

    def accuracy(chosen: list[dict]) -> float:
        metric = VQAAccuracy("paper")
        references = [[answers[_image_id(r)]] * 10 if _image_id(r) in answers else r["references"] for r in chosen]
        metric.update([r["prediction"] for r in chosen], references)
        return float(metric.compute())

    return accuracy(rows), accuracy(rows + rows[:1])
