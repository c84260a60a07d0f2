"""Evaluate the toy models on every task of the toy world's test split (paper and official modes).

    python scripts/eval_toy_models.py [--models models/toy-llava models/toy-qwen2_5_vl] [--limit N]

Prints a markdown table and writes runs/toy_eval/summary.{json,md}.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L

from hones import io
from hones.data.datamodule import HonesDataModule
from hones.evaluation import EvalModule

TASKS = ("vqa", "ocr", "caption", "retrieval")


def evaluate(model: str, world: Path, task: str, limit: int | None) -> dict:
    data = HonesDataModule(
        dataset="coco_unified",
        annotation_file=str(world / "coco" / "unified.json"),
        image_root=str(world / "coco" / "images"),
        split_file=str(world / "splits" / "test.json"),
        task=task,
        split="test",
        limit=limit,
        batch_size=50,
        toy_world={"dir": str(world)},  # generated on first use
    )
    module = EvalModule(model=model, task=task)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, datamodule=data, verbose=False)
    return module.results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["models/toy-llava", "models/toy-qwen2_5_vl"])
    parser.add_argument("--world", default="toyworld_data")
    parser.add_argument("--limit", type=int, default=None, help="test images per task (default: all)")
    parser.add_argument("--out", default="runs/toy_eval")
    args = parser.parse_args()
    rows, results = [], {}
    for model in args.models:
        for task in TASKS:
            res = evaluate(model, Path(args.world), task, args.limit)
            results[f"{Path(model).name}/{task}"] = res
            rows.append([Path(model).name, task, *res["metrics"].items(), res["num_items"]])
            print(Path(model).name, task, res["metrics"], flush=True)
    table = io.markdown_table(
        ["model", "task", "metric (paper)", "metric (official)", "items"],
        [[r[0], r[1], f"{r[2][0]} = {r[2][1]:.3f}", f"{r[3][0]} = {r[3][1]:.3f}", r[4]] for r in rows],
    )
    print(table)
    io.write_json(Path(args.out) / "summary.json", results)
    io.write_text(Path(args.out) / "summary.md", table)


if __name__ == "__main__":
    main()
