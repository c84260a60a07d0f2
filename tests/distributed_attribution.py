"""Run the attribution callbacks (HONES_METHOD §2-3) over a HonesDataModule on 1..N processes.

    python tests/distributed_attribution.py --model DIR --world DIR --out DIR              # 1 process
    torchrun --nproc_per_node=2 tests/distributed_attribution.py --model DIR --world DIR --out DIR

``trainer.validate`` runs ``HeadLocalizationCallback`` (teacher-forced utility, all heads),
then ``trainer.test`` runs ``NeuronAttributionCallback`` on its H*, both over the discovery
split with ``EvalModule`` as the host of the adapter. Under torchrun the trainer takes the
launcher's topology (DDP over gloo on CPU) and the datamodule shards the items without
duplicates. Writes ``head_scores.safetensors`` and ``importance.safetensors`` to ``--out``.
Used by tests/test_distributed.py as a stand-in for ``analyze.py``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L
import torch

from hones.attribution.callbacks import HeadLocalizationCallback, NeuronAttributionCallback
from hones.data.datamodule import HonesDataModule
from hones.evaluation import EvalModule


def topology() -> tuple[int, int]:
    """``(processes per node, nodes)`` from torchrun's environment; ``(1, 1)`` without it."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return local, max(1, world // max(1, local))


def run(model: str, world: str, out: str, task: str = "vqa", batch_size: int = 2, top_k: int = 3, cache_dir: str | None = None) -> None:
    """Head localization then neuron attribution; artifacts in ``out`` (global rank 0)."""
    devices, num_nodes = topology()
    root = Path(world)
    data = HonesDataModule(
        "coco_unified",
        str(root / "coco" / "unified.json"),
        task,
        "discovery",
        image_root=str(root / "coco" / "images"),
        split_file=str(root / "splits" / "discovery.json"),
        batch_size=batch_size,
        cache_dir=cache_dir,
    )
    heads = HeadLocalizationCallback(task=task, top_k=top_k, stages=("validate",), output_dir=out)
    neurons = NeuronAttributionCallback(heads=heads, top_k=top_k, task=task, stages=("test",), output_dir=out)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if devices * num_nodes > 1 else "auto",
        use_distributed_sampler=False,
        callbacks=[heads, neurons],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    module = EvalModule(model=model, task=task, max_new_tokens=1)
    trainer.validate(module, datamodule=data, verbose=False)
    trainer.test(module, datamodule=data, verbose=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--world", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", default="vqa")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run(args.model, args.world, args.out, args.task, args.batch_size, args.top_k, args.cache_dir)


if __name__ == "__main__":
    main()
