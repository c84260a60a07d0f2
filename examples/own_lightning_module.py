"""HONES's callbacks in a Lightning project of your own (HONES_METHOD §2-5).

    python examples/own_lightning_module.py                                      # toy LLaVA, vqa
    python examples/own_lightning_module.py --model models/toy-qwen2_5_vl --task ocr --limit 100

``MyVLM`` below stands for your module: it loads a Hugging Face VLM its own way and exposes it
as ``.adapter`` (``hones.models.wrap_model``); that is all the callbacks need. Its loaders yield
``{"items": [TaskItem, ...]}`` and the callbacks encode what they need from the items. Four
passes, one callback each:

1. ``trainer.validate`` on discovery items with ``HeadLocalizationCallback``: head scores, H*;
2. ``trainer.validate`` again with ``NeuronAttributionCallback``: neuron importance, the HONES
   bank and the baseline banks at the same budget;
3. ``trainer.test`` on test items with ``MaskingVerificationCallback``: each bank masked;
4. ``trainer.fit`` on dev items with ``NeuronSteeringCallback``: one scale per HONES neuron,
   with the §5 loss computed in ``MyVLM.training_step``; the scales are exported.

It prints H*, the masking table and the learned scales, and writes the callbacks' files under
``--out``. Run it from the repository root (about 15 s on 2 CPU cores): it uses the shipped toy
model and the toy world in ``toyworld_data`` (generated there if absent). To use the learned
scales at inference: ``with hones.steering.apply_scales(adapter, "<out>/scales/scales.safetensors"):``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForImageTextToText, AutoProcessor

from hones.attribution.callbacks import HeadLocalizationCallback, MaskingVerificationCallback, NeuronAttributionCallback
from hones.attribution.bank import bank_to_layer_dict
from hones.attribution.batches import encode_items
from hones.data.datamodule import HonesDataModule
from hones.data.records import TaskItem
from hones.models import wrap_model
from hones.steering import NeuronSteeringCallback


DEFAULT_WORLD = "toyworld_data"


class MyVLM(L.LightningModule):
    """Your module: any VLM of a supported architecture, exposed as ``.adapter``."""

    def __init__(self, model_path: str, lr: float = 5e-2) -> None:
        super().__init__()
        self.model_path, self.lr = model_path, lr
        self.adapter: Any = None

    def configure_model(self) -> None:
        if self.adapter is None:
            model = AutoModelForImageTextToText.from_pretrained(self.model_path).eval()
            self.adapter = wrap_model(model, AutoProcessor.from_pretrained(self.model_path))
            self.vlm = model  # a submodule, so that Lightning moves it to the device

    def train(self, mode: bool = True) -> MyVLM:
        """Lightning puts the module in training mode for fit; the frozen VLM stays in eval mode
        (no dropout: §5's teacher is the same model with the scaling off)."""
        super().train(mode)
        if self.adapter is not None:
            self.adapter.model.eval()
        return self

    # Your own evaluation steps would go here; the callbacks do their work in the batch-end hooks.
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        return None

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        return None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """§5: cross-entropy on the targets + β KL to the unscaled model + λ mean(s²)."""
        encoded = encode_items(self.adapter, batch["items"], with_targets=True)
        return self.steering.objective(self, encoded).outputs()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # NeuronSteeringCallback has frozen the VLM and attached the scales as `neuron_scaler`
        return torch.optim.AdamW(self.neuron_scaler.parameters(), lr=self.lr, weight_decay=0.0)  # §5: only λ·mean(s²)


def items(world: str, task: str, split: str, limit: int, training: bool = False) -> list[TaskItem]:
    """``limit`` items of one toy-world split (HonesDataModule's loaders and task views)."""
    data = HonesDataModule(
        dataset="coco_unified", annotation_file=f"{world}/coco/unified.json", image_root=f"{world}/coco/images",
        task=task, split=split, split_file=f"{world}/splits/{split}.json", limit=limit, training=training,
        toy_world={"dir": world} if world == DEFAULT_WORLD else None,  # the default world is made on first use
    )  # fmt: skip
    data.prepare_data()
    data.setup()
    assert data.items is not None
    return data.items


def loader(task_items: list[TaskItem], shuffle: bool = False) -> DataLoader:
    return DataLoader(task_items, batch_size=8, shuffle=shuffle, collate_fn=lambda batch: {"items": list(batch)})


def trainer(out: Path, callback: L.Callback, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, callbacks=[callback], default_root_dir=str(out), logger=False,
        enable_checkpointing=False, enable_model_summary=False, **kwargs,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/toy-llava", help="a local model folder (or hub id) of a supported architecture")
    parser.add_argument("--task", default="vqa", choices=["vqa", "ocr", "caption", "retrieval"])
    parser.add_argument("--limit", type=int, default=48, help="images per split (discovery, test, dev)")
    parser.add_argument("--epochs", type=int, default=2, help="steering epochs")
    parser.add_argument("--world", default=DEFAULT_WORLD, help=f"a toy world's folder ({DEFAULT_WORLD}: generated if absent)")
    parser.add_argument("--out", default="runs/examples/own_lightning_module")
    args = parser.parse_args(argv)
    out = Path(args.out)
    L.seed_everything(0, verbose=False)
    module = MyVLM(args.model)
    discovery = loader(items(args.world, args.task, "discovery", args.limit))

    # §2, teacher-forced utility, with its agreement with the paper's metric utility measured in the same pass
    heads = HeadLocalizationCallback(task=args.task, top_k=4, compare_utility="metric", output_dir=out)
    trainer(out, heads).validate(module, discovery, verbose=False)
    print(f"H* (layer, head): {heads.top_heads}")

    neurons = NeuronAttributionCallback(heads=heads, task=args.task, top_ratio=0.01, output_dir=out)  # §3
    trainer(out, neurons).validate(module, discovery, verbose=False)
    print(f"HONES bank: {len(neurons.bank)} neurons; baselines: {', '.join(sorted(neurons.banks))}")

    masking = MaskingVerificationCallback(banks=neurons, task=args.task, stages=("test",), output_dir=out)  # §4
    trainer(out, masking).test(module, loader(items(args.world, args.task, "test", args.limit)), verbose=False)
    results = masking.results
    print(f"{results['metric']} on {args.limit} test images, unmasked: {results['base']:.4f}")
    for name, row in results["banks"].items():
        drop = "n/a (unmasked metric is 0)" if row["relative_drop"] is None else f"{row['relative_drop']:.2f}%"
        print(f"  masked {name:>10}: {row['masked']:.4f} (relative drop {drop})")

    # §5: the callback attaches the scales to the module; MyVLM.training_step uses its objective
    module.steering = NeuronSteeringCallback(bank_to_layer_dict(neurons.bank), export_dir=out / "scales")
    dev = loader(items(args.world, args.task, "dev", args.limit, training=True), shuffle=True)
    trainer(out, module.steering, max_epochs=args.epochs, gradient_clip_val=1.0).fit(module, dev)
    scales = module.steering.scaler.s.detach()
    print(f"learned {scales.numel()} scales: mean |s| {scales.abs().mean():.4f}, max |s| {scales.abs().max():.4f}")
    print(f"files: {out}/ (heads.json, importance.safetensors, bank_*.json, masking.json, scales/scales.json)")


if __name__ == "__main__":
    main()
