"""Training the embedded offline default: tiny VLMs of the real architectures on the toy world.

``ToyVLMModule`` builds a LLaVA-1.5-style (``LlavaForConditionalGeneration``) or a
Qwen2.5-VL-style (``Qwen2_5_VLForConditionalGeneration``) model from scratch, with a
byte-level BPE tokenizer trained on the toy world's text, and trains every weight on
the four tasks at once (teacher-forced cross-entropy on the target tokens).
``ToyWorldTrainData`` serves the mixed-task training items of the toy world's
``train`` split and a teacher-forced ``dev`` subset for validation.

Rebuild from scratch (see configs/toy/pretrain/*.yaml)::

    python -m hones.training.toy_models fit --config configs/toy/pretrain/llava.yaml

Hooks implemented: ``configure_model`` (tokenizer + model, once), ``training_step``,
``validation_step`` (per-task dev loss), ``configure_optimizers`` (AdamW + one-cycle),
``on_train_end`` (atomic ``save_pretrained`` of model, tokenizer and processor).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader

from hones.data.datamodule import TaskCollate, TaskItemDataset
from hones.data.formats import load_records
from hones.data.tasks import TASKS, build_task_items, training_items
from hones.data.toyworld import ToyWorldConfig, ensure_world, toy_corpus
from hones.losses import target_cross_entropy

ARCHS = ("llava", "qwen2_5_vl")


class ToyWorldTrainData(L.LightningDataModule):
    """Mixed-task training items from a toy world (generated on first use).

    Args:
        world_dir: the toy world folder; written with ``world`` settings if absent.
        tasks: the tasks to mix (default all four).
        batch_size, num_workers, seed: loader settings.
        train_negatives: retrieval negatives ("No") per positive ("Yes") in training.
        dev_limit: dev images used for the validation loss.
        task_repeats: how many times each task's training items enter an epoch
            (oversampling, e.g. ``{"ocr": 3}``); tasks not named enter once.
    """

    def __init__(
        self,
        world_dir: str = "toyworld_data",
        world: dict[str, Any] | None = None,
        tasks: tuple[str, ...] = TASKS,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        train_negatives: int = 2,
        dev_limit: int = 64,
        task_repeats: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self._encoder = None
        self.train_items: list = []
        self.dev_sets: list[TaskItemDataset] = []

    def set_encoder(self, encoder: Any) -> None:
        self._encoder = encoder

    def prepare_data(self) -> None:
        ensure_world(self.hparams.world_dir, ToyWorldConfig(**(self.hparams.world or {})))

    def _records(self, split: str, limit: int | None = None) -> list:
        root = Path(self.hparams.world_dir)
        return load_records(
            "coco_unified",
            root / "coco" / "unified.json",
            root / "coco" / "images",
            split_file=root / "splits" / f"{split}.json",
            limit=limit,
            seed=self.hparams.seed,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_items:
            return
        hp = self.hparams
        train = self._records("train")
        repeats = hp.task_repeats or {}
        unknown = sorted(set(repeats) - set(hp.tasks))
        if unknown:
            raise ValueError(f"data.task_repeats names tasks not trained here: {unknown}; tasks are {list(hp.tasks)}")
        for task in hp.tasks:
            items = training_items(train, task, seed=hp.seed, train_negatives=hp.train_negatives)
            self.train_items += items * int(repeats.get(task, 1))
        dev = self._records("dev", hp.dev_limit)
        self.dev_sets = [
            TaskItemDataset(build_task_items(dev, task, "dev", training=True, seed=hp.seed, train_negatives=1))
            for task in hp.tasks
        ]

    def _collate(self) -> TaskCollate:
        if self._encoder is None:
            raise RuntimeError("ToyWorldTrainData: no encoder; the module calls set_encoder in setup()")
        return TaskCollate(self._encoder, with_targets=True)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            TaskItemDataset(self.train_items),
            batch_size=self.hparams.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=self.hparams.num_workers,
            collate_fn=self._collate(),
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(ds, batch_size=self.hparams.batch_size, collate_fn=self._collate()) for ds in self.dev_sets
        ]


class ToyVLMModule(L.LightningModule):
    """A tiny VLM of a real architecture, trained from scratch on the toy world.

    Args:
        arch: "llava" or "qwen2_5_vl".
        world_dir: toy world folder (for the tokenizer corpus).
        output_dir: where the trained model, tokenizer and processor are saved.
        vocab_size: BPE vocabulary size of the locally trained tokenizer.
        model: keyword arguments of ``build_tiny_llava`` / ``build_tiny_qwen2_5_vl``.
        init_from: continue from a saved model directory (a second training phase)
            instead of building a new model; ``vocab_size``, ``model``, ``seed`` and
            ``world_dir`` (the tokenizer comes with the saved model) are then unused.
        lr, weight_decay, pct_start: AdamW with a one-cycle schedule.
        seed: weight initialisation seed.
        activation_l1: weight of an L1 penalty on what the FFN neurons write, added to the
            cross-entropy: |z_i| · ‖W_down[:, i]‖ for every neuron i (z: the input of each
            layer's down_proj), averaged over neurons, layers and non-padding positions. The
            ‖W_down[:, i]‖ factor stops the model from evading it by shrinking z and growing
            W_down. It makes activations sparse, as they are in large LMs. 0 (the shipped
            models) trains without it.
    """

    def __init__(
        self,
        arch: str = "llava",
        world_dir: str = "toyworld_data",
        output_dir: str = "models/toy-llava",
        vocab_size: int = 1024,
        model: dict[str, Any] | None = None,
        lr: float = 5e-4,  # 2e-3 trains models that ignore their images (README, "What it took")
        weight_decay: float = 0.01,
        pct_start: float = 0.05,
        seed: int = 0,
        init_from: str | None = None,
        activation_l1: float = 0.0,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}; got {arch!r}")
        if activation_l1 < 0:
            raise ValueError(f"activation_l1 must be >= 0; got {activation_l1}")
        self.save_hyperparameters()
        self.adapter: Any = None
        self.task_names: tuple[str, ...] = TASKS

    def configure_model(self) -> None:
        if self.adapter is not None:
            return
        from hones.models import build_tiny_llava, build_tiny_qwen2_5_vl, train_tokenizer, wrap_model

        hp = self.hparams
        if hp.init_from:
            from hones.models import load_adapter

            self.adapter = load_adapter(hp.init_from)
            if self.adapter.model.config.model_type != hp.arch:
                raise ValueError(f"init_from {hp.init_from} holds a {self.adapter.model.config.model_type} model, not {hp.arch}")
            self.vlm = self.adapter.model
            return
        tokenizer = train_tokenizer(toy_corpus(hp.world_dir), vocab_size=hp.vocab_size, arch=hp.arch)
        build = build_tiny_llava if hp.arch == "llava" else build_tiny_qwen2_5_vl
        model, processor = build(tokenizer=tokenizer, seed=hp.seed, **(hp.model or {}))
        self.adapter = wrap_model(model, processor, name=f"toy-{hp.arch}")
        self.vlm = self.adapter.model

    def setup(self, stage: str) -> None:
        self.configure_model()
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            self.task_names = tuple(getattr(datamodule.hparams, "tasks", TASKS))
            datamodule.set_encoder(self.adapter.encode)

    def on_fit_start(self) -> None:
        self.vlm.train()  # the builders hand over models in eval mode

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return target_cross_entropy(self.adapter.forward(batch), batch["labels"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        size = len(batch["items"])
        if not self.hparams.activation_l1:
            loss = self._loss(batch)
            self.log("train/loss", loss, prog_bar=True, batch_size=size)
            return loss
        from hones.interventions import capture_ffn_activations

        with capture_ffn_activations(self.adapter, detach=False) as z:
            ce = self._loss(batch)
        norms = {layer: self.adapter.mlp(layer).down_proj.weight.norm(dim=0) for layer in z}
        l1 = mean_abs_activation(z, batch["attention_mask"], norms)
        self.log_dict({"train/loss": ce, "train/activation_l1": l1}, prog_bar=True, batch_size=size)
        return ce + self.hparams.activation_l1 * l1

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.task_names[dataloader_idx]
        self.log(f"val/loss_{task}", self._loss(batch), batch_size=len(batch["items"]), add_dataloader_idx=False)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for n, p in self.vlm.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in self.vlm.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr
        )
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=hp.lr, total_steps=int(self.trainer.estimated_stepping_batches), pct_start=hp.pct_start
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_end(self) -> None:
        if self.global_rank == 0:
            save_model_atomically(self.adapter, self.hparams.output_dir)


def mean_abs_activation(z: dict[int, torch.Tensor], attention_mask: torch.Tensor, weights: dict[int, torch.Tensor]) -> torch.Tensor:
    """mean |z_i| · w_i over layers, neurons i and the non-padding positions.

    z: layer -> [batch, seq, ffn]; attention_mask [batch, seq]; weights: layer -> [ffn]
    (‖W_down[:, i]‖ in training)."""
    keep = attention_mask.to(torch.bool)
    per_layer = [(layer_z.abs()[keep] * weights[layer]).mean() for layer, layer_z in z.items()]  # [positions, ffn] each
    return torch.stack(per_layer).mean()


def save_model_atomically(adapter: Any, output_dir: str | os.PathLike) -> Path:
    """``save_pretrained`` into a sibling temporary folder, then swap it into place."""
    from hones.models import save_pretrained

    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is meant to be shared
    try:
        save_pretrained(adapter.model, adapter.processor, tmp)
        for file in tmp.iterdir():  # transformers writes its weight shards as 0600
            file.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def main() -> None:
    """LightningCLI over ``ToyVLMModule`` + ``ToyWorldTrainData`` (fit / validate)."""
    from hones.run_defaults import HonesCLI

    HonesCLI(ToyVLMModule, ToyWorldTrainData, seed_everything_default=0, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
