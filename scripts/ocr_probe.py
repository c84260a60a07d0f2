"""OCR learnability probe: train a fresh toy LLaVA on OCR only and print the dev loss.

    python scripts/ocr_probe.py --placement grid --lr 5e-4 --steps 300   # ~3 min on one core

Scenes are drawn in memory with the toy world's own renderer (8000 training and 128 dev
images, 64 px, one word plate each, blue box drawn), with the plate's corner placed
``free`` (any pixel, as the first toy world did), on the 8-px patch ``grid`` (the toy
world now), or at the ``center``. The dev loss is the target cross-entropy in nats per
token; chance (a uniform guess among the 40 words, then the end token) is log(40) / 2 =
1.84. The README's "What it took" quotes these runs.
"""

from __future__ import annotations

import argparse
import random

import lightning as L
import torch
from torch.utils.data import DataLoader

from hones.data import toyworld as tw
from hones.data.datamodule import TaskCollate
from hones.data.images import draw_ocr_box
from hones.data.records import OCRTaskItem
from hones.data.tasks import task_prompt
from hones.losses import target_cross_entropy
from hones.models import build_tiny_llava, train_tokenizer, wrap_model

SIZE = 64


def ocr_items(n: int, seed: int, placement: str) -> list[OCRTaskItem]:
    """``n`` OCR items with their boxed images in memory."""
    rng, items = random.Random(seed), []
    for index in range(n):
        background = rng.choice(sorted(tw.COCO_BACKGROUNDS))
        scene = tw.Scene(SIZE, background, tw.COCO_BACKGROUNDS[background], "plain")
        tw._place_plate(rng, scene, rng.choice(tw.WORDS), 0.17)  # on the grid (the toy world's rule)
        x, y, w, h = scene.plate
        if placement == "free":
            x, y = rng.randint(2, SIZE - w - 2), rng.randint(2, SIZE - h - 2)
        elif placement == "center":
            x, y = (SIZE - w) // 2, (SIZE - h) // 2
        scene.plate = (x, y, w, h)
        scene.plate_colors = rng.choice(tw.COCO_PLATES)
        tw._populate(rng, scene, rng.choice((1, 2, 3)), 0.5, 1)
        image = draw_ocr_box(tw.render_scene(scene, index), scene.plate)
        items.append(OCRTaskItem(uid=f"probe{seed}:{index}", task="ocr", image=image, prompt=task_prompt("ocr"),
                                 target=scene.word, references=[scene.word]))  # fmt: skip
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--placement", choices=("free", "grid", "center"), default="grid")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    L.seed_everything(args.seed)
    tokenizer = train_tokenizer(list(tw.WORDS) + [task_prompt("ocr")] * 4, vocab_size=400, arch="llava")
    model, processor = build_tiny_llava(tokenizer=tokenizer, seed=args.seed)
    adapter = wrap_model(model, processor, name="probe-llava")
    collate = TaskCollate(adapter.encode, with_targets=True)
    train = DataLoader(ocr_items(8000, 1, args.placement), batch_size=32, shuffle=True, collate_fn=collate)
    dev = collate(ocr_items(128, 2, args.placement))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    step = 0
    while step < args.steps:
        for batch in train:
            model.train()
            loss = target_cross_entropy(adapter.forward(batch), batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step % 50 == 0 or step == args.steps:
                model.eval()
                with torch.no_grad():
                    dev_loss = target_cross_entropy(adapter.forward(dev), dev["labels"]).item()
                print(f"step {step:4d}  train {loss.item():.3f}  dev {dev_loss:.3f}  (chance 1.84)", flush=True)
            if step == args.steps:
                break


if __name__ == "__main__":
    main()
