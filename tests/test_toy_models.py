"""The embedded offline default: the rebuild lowers the loss; the shipped models are competent.

The competence thresholds are the ones the README reports (issue "Embedded offline
default"): VQA accuracy >= 0.6, OCR ANLS >= 0.5, caption BLEU-4 >= 0.25, retrieval
NDCG@5 >= 0.6, measured by the project's own evaluation code (paper mode) on a subset
of the toy world's held-out test split (the training split never overlaps it).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from hones.data.datamodule import HonesDataModule
from hones.data.toyworld import ToyWorldConfig, generate_world
from hones.evaluation import EvalModule
from hones.losses import target_cross_entropy
from hones.training.toy_models import ToyVLMModule, ToyWorldTrainData

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"llava": ROOT / "models" / "toy-llava", "qwen2_5_vl": ROOT / "models" / "toy-qwen2_5_vl"}
THRESHOLDS = {"vqa": 0.6, "ocr": 0.5, "caption": 0.25, "retrieval": 0.6}
TEST_IMAGES = 60
SHIPPED_CASES = [(arch, task) for arch in ("llava", "qwen2_5_vl") for task in ("vqa", "ocr", "caption", "retrieval")]


@pytest.fixture(scope="module")
def small_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train/dev/test images of the default world (same seed and size, fewer images)."""
    out = tmp_path_factory.mktemp("toyworld")
    generate_world(out, ToyWorldConfig(n_train=48, n_discovery=0, n_dev=8, n_test=TEST_IMAGES, n_ood=0))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_short_rebuild_lowers_the_loss(small_world: Path, tmp_path: Path, arch: str) -> None:
    tiny = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}
    module = ToyVLMModule(arch=arch, world_dir=str(small_world), output_dir=str(tmp_path / "model"),
                          vocab_size=400, model=tiny, lr=3e-3)  # fmt: skip
    data = ToyWorldTrainData(world_dir=str(small_world), batch_size=16, dev_limit=4,
                             world={"n_train": 48, "n_discovery": 0, "n_dev": 8, "n_test": TEST_IMAGES, "n_ood": 0})  # fmt: skip
    module.configure_model()
    data.set_encoder(module.adapter.encode)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        before = target_cross_entropy(module.adapter.forward(batch), batch["labels"]).item()
    trainer = L.Trainer(max_steps=12, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(module, datamodule=data)
    module.adapter.model.eval()
    with torch.no_grad():
        after = target_cross_entropy(module.adapter.forward(batch), batch["labels"]).item()
    assert after < before - 0.5, (before, after)
    assert (tmp_path / "model" / "model.safetensors").exists()


def _evaluate(model_dir: Path, world: Path, task: str) -> float:
    data = HonesDataModule(
        dataset="coco_unified",
        annotation_file=str(world / "coco" / "unified.json"),
        image_root=str(world / "coco" / "images"),
        split_file=str(world / "splits" / "test.json"),
        task=task,
        split="test",
        batch_size=50,
    )
    module = EvalModule(model=str(model_dir), task=task)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.test(module, datamodule=data, verbose=False)
    return module.results["metric"]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "task"), SHIPPED_CASES)
def test_shipped_model_meets_threshold(small_world: Path, arch: str, task: str) -> None:
    if not (SHIPPED[arch] / "config.json").exists():
        pytest.fail(f"shipped model missing: {SHIPPED[arch]} (rebuild: configs/toy/pretrain/{arch}.yaml)")
    value = _evaluate(SHIPPED[arch], small_world, task)
    assert value >= THRESHOLDS[task], f"{arch} {task}: {value:.3f} < {THRESHOLDS[task]}"


def test_activation_l1_penalty(small_world: Path, tmp_path: Path) -> None:
    """activation_l1 adds λ · mean |z_i| · ‖W_down[:, i]‖ to the cross-entropy, and only then."""
    from hones.interventions import capture_ffn_activations
    from hones.training.toy_models import mean_abs_activation

    tiny = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 48}
    kwargs = dict(arch="llava", world_dir=str(small_world), output_dir=str(tmp_path / "m"), vocab_size=400, model=tiny)
    plain, sparse = ToyVLMModule(**kwargs), ToyVLMModule(**kwargs, activation_l1=2.0)
    with pytest.raises(ValueError, match="activation_l1"):
        ToyVLMModule(**kwargs, activation_l1=-1.0)
    data = ToyWorldTrainData(world_dir=str(small_world), batch_size=4, dev_limit=2,
                             world={"n_train": 48, "n_discovery": 0, "n_dev": 8, "n_test": TEST_IMAGES, "n_ood": 0})  # fmt: skip
    for module in (plain, sparse):
        module.configure_model()
        module.log_dict = module.log = lambda *args, **kw: None  # no trainer attached
    data.set_encoder(plain.adapter.encode)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        ce = target_cross_entropy(plain.adapter.forward(batch), batch["labels"])
        assert torch.allclose(plain.training_step(batch, 0), ce)
        with capture_ffn_activations(plain.adapter) as z:
            plain.adapter.forward(batch)
        keep = batch["attention_mask"].bool()
        by_hand = torch.stack([
            (z[l].abs()[keep] * plain.adapter.mlp(l).down_proj.weight.norm(dim=0)).mean() for l in z
        ]).mean()  # fmt: skip
        assert by_hand > 0
        weights = {l: plain.adapter.mlp(l).down_proj.weight.norm(dim=0) for l in z}
        assert torch.allclose(mean_abs_activation(z, batch["attention_mask"], weights), by_hand)
        assert torch.allclose(sparse.training_step(batch, 0), ce + 2.0 * by_hand, atol=1e-6)
