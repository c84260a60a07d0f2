"""Does a model read its images? Teacher-forced target loss with the right images vs shuffled ones.

    python scripts/image_reliance.py models/toy-llava [--split dev] [--limit 64]

For each task, the mean target cross-entropy (nats per target token) of ``--limit``
images of the toy world's split, once as is and once with every item paired with the
next item's image (a cyclic shift of ``pixel_values`` by one image). A model that
ignores the image gives the same loss both ways; the gap is what the image is worth.
Prints a markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from hones import io
from hones.data.datamodule import TaskCollate
from hones.data.formats import load_records
from hones.data.records import materialize
from hones.data.tasks import build_task_items
from hones.losses import target_cross_entropy
from hones.models import load_adapter

TASKS = ("vqa", "ocr", "caption", "retrieval")


def shift_images(batch: dict, rows: int) -> dict:
    """``batch`` with item ``i`` given item ``i - 1``'s image (pixel tensors of one image per item)."""
    out = dict(batch)
    pixels = batch["pixel_values"]
    step = pixels.shape[0] // rows  # LLaVA: 1 row per image; Qwen2.5-VL: its patches per image
    out["pixel_values"] = pixels.roll(step, 0)
    return out


@torch.no_grad()
def reliance(model: str, world: Path, split: str, limit: int) -> list[list]:
    adapter = load_adapter(model)
    records = load_records("coco_unified", world / "coco" / "unified.json", world / "coco" / "images",
                           split_file=world / "splits" / f"{split}.json", limit=limit)  # fmt: skip
    collate = TaskCollate(adapter.encode, with_targets=True)
    rows = []
    for task in TASKS:
        # materialize: load each image (and draw the OCR box), as the datamodule does
        items = [materialize(item) for item in build_task_items(records, task, split, training=True, train_negatives=1)]
        batch = collate(items)
        if "image_grid_thw" in batch and len(set(map(tuple, batch["image_grid_thw"].tolist()))) != 1:
            raise ValueError(f"{task}: images of different sizes; the shift needs one patch count per image")
        true = target_cross_entropy(adapter.forward(batch), batch["labels"]).item()
        shifted = target_cross_entropy(adapter.forward(shift_images(batch, len(items))), batch["labels"]).item()
        rows.append([Path(model).name, task, len(items), f"{true:.3f}", f"{shifted:.3f}", f"{shifted - true:+.3f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--world", default="toyworld_data")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--limit", type=int, default=64, help="images (retrieval: 2 items per image)")
    args = parser.parse_args()
    rows = [row for model in args.models for row in reliance(model, Path(args.world), args.split, args.limit)]
    print(io.markdown_table(["model", "task", "items", "loss, right images", "loss, shifted images", "gap"], rows))


if __name__ == "__main__":
    main()
