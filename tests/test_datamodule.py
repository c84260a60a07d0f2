"""HonesDataModule on a tiny toy world, with a fake encoder standing in for the model adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from hones.data.datamodule import HonesDataModule, TaskItemDataset
from hones.data.records import TaskItem
from hones.data.toyworld import ToyWorldConfig, generate_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, ToyWorldConfig(n_train=6, n_discovery=5, n_dev=4, n_test=6, n_ood=4))
    return out


class FakeEncoder:
    """Records its calls; returns tensors shaped like an adapter's ``encode``."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Image.Image], list[str], list[str] | None]] = []

    def __call__(self, images: list[Image.Image], prompts: list[str], targets: list[str] | None = None) -> dict:
        self.calls.append((images, prompts, targets))
        b = len(prompts)
        return {
            "input_ids": torch.ones(b, 5, dtype=torch.long),
            "attention_mask": torch.ones(b, 5, dtype=torch.long),
            "pixel_values": torch.zeros(b, 3, 8, 8),
            "prompt_last_index": torch.full((b,), 4),
        }


def module(world: Path, task: str, split: str, **kwargs: object) -> HonesDataModule:
    return HonesDataModule(
        "coco_unified",
        str(world / "coco/unified.json"),
        task,
        split,
        image_root=str(world / "coco/images"),
        split_file=str(world / f"splits/{split}.json"),
        batch_size=4,
        cache_dir=str(world / "hf_cache"),
        **kwargs,
    )


def test_collate_with_fake_encoder(world: Path) -> None:
    dm = module(world, "ocr", "test")
    dm.setup("test")
    with pytest.raises(RuntimeError, match="set_encoder"):
        dm.test_dataloader()
    encoder = FakeEncoder()
    dm.set_encoder(encoder)
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "prompt_last_index", "items"}
    items = batch["items"]
    assert all(type(i) is TaskItem and isinstance(i.image, Image.Image) and i.image.mode == "RGB" for i in items)
    images, prompts, targets = encoder.calls[0]
    assert targets is None and prompts == [i.prompt for i in items] and images == [i.image for i in items]
    bbox = [int(v) for v in next(r for r in dm.records if r.ocr).ocr.bbox]
    assert items[0].image.getpixel((bbox[0] - 1, bbox[1] + bbox[3] // 2)) == (0, 0, 255)


def test_training_split_passes_targets(world: Path) -> None:
    dm = module(world, "retrieval", "train", n_neg=5)
    encoder = FakeEncoder()
    dm.set_encoder(encoder)
    dm.setup("fit")
    assert len(dm.items) == 6 * 5  # positive + 4 training negatives per image
    batch = next(iter(dm.train_dataloader()))
    assert encoder.calls[0][2] == [i.target for i in batch["items"]]
    assert {i.target for i in dm.items} == {"Yes", "No"}


def test_limit_and_dataset(world: Path) -> None:
    dm = module(world, "vqa", "dev", limit=2, seed=1)
    dm.setup()
    assert len(dm.items) == 2 and len(TaskItemDataset(dm.items)) == 2
    with pytest.raises(ValueError, match="unknown task"):
        HonesDataModule("coco_unified", "x.json", "detection")
