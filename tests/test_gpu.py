"""GPU checks (marker ``gpu``; skipped where torch sees no CUDA device).

    pytest -m gpu          # on a machine with a CUDA GPU (scripts/gpu_checks.sh runs this)

- The attribution callbacks under ``Trainer(accelerator="gpu")`` reproduce the plain CPU
  accumulators (§2 head scores, §3 importances), with TF32 off so both sides are fp32.
- The same under ``strategy="ddp"`` on one GPU: the NCCL back end and the process-reduced
  states on the CUDA device.
- Steering (§5) trains under ``precision="bf16-mixed"``: s stays float32 on the GPU, stays
  clamped, moves, and no model weight changes.

Each test builds its own tiny adapter: the session's shared ones (tests/conftest.py) stay on
the CPU for the other test files.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
from test_callbacks import CANDIDATES, ShapesModule, encoded_loader, make_items, plain_accumulators
from test_steering import MaxScaleProbe, loader, selection, toy_batch, trainer, write_selection

from hones.attribution.callbacks import HeadLocalizationCallback, NeuronAttributionCallback
from hones.attribution.heads import HeadScores
from hones.models import VLMAdapter, build_tiny_llava, wrap_model
from hones.steering.module import SteeringModule

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def exact_fp32() -> Iterator[None]:
    """TF32 off (matmuls and cuDNN convolutions) for the test, restored after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def private_llava() -> VLMAdapter:
    """The conftest tiny LLaVA (seed 0), as a private copy that may move to the GPU."""
    return wrap_model(*build_tiny_llava(seed=0), name="tiny-llava")


class DeviceProbe(L.Callback):
    """Records the device type of the module's first parameter at every batch end.

    Lightning moves the module back to the CPU when ``fit`` / ``validate`` end, so where
    the work ran is read during the run.
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def _record(self, pl_module: L.LightningModule) -> None:
        self.seen.add(next(pl_module.parameters()).device.type)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._record(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._record(pl_module)


def gpu_trainer(**kwargs: Any) -> L.Trainer:
    """test_steering's quiet Trainer on one GPU, with validation batches on (``validate`` runs them)."""
    return trainer(**{"accelerator": "gpu", "limit_val_batches": 1.0, **kwargs})


def cpu_references(items: list) -> tuple[HeadScores, torch.Tensor]:
    """test_callbacks' plain CPU accumulators: §2 head scores and the §3 importance ``[layers, ffn]``.

    Computed before any GPU run: once a NCCL process group is up, torchmetrics would try to
    reduce these CPU states over it.
    """
    heads, neurons = plain_accumulators(private_llava(), items)
    return heads, neurons.importance


def check_callbacks_on_gpu(make_image: Any, tmp_path: Path, **trainer_kwargs: Any) -> None:
    items = make_items(make_image)
    expected, want = cpu_references(items)
    adapter = private_llava()
    module = ShapesModule(adapter)
    heads_cb = HeadLocalizationCallback(heads=CANDIDATES, top_k=3, rows_per_forward=16, output_dir=tmp_path / "out")
    probe = DeviceProbe()
    gpu_trainer(callbacks=[heads_cb, probe], **trainer_kwargs).validate(module, encoded_loader(adapter, items, with_targets=True), verbose=False)
    assert probe.seen == {"cuda"}
    assert heads_cb.scores is not None
    torch.testing.assert_close(heads_cb.scores.delta.cpu(), expected.delta, atol=1e-5, rtol=1e-4, equal_nan=True)
    assert heads_cb.top_heads == expected.top_heads(3)

    neurons_cb = NeuronAttributionCallback(heads=heads_cb, rows_per_forward=8, output_dir=tmp_path / "out")
    probe = DeviceProbe()
    gpu_trainer(callbacks=[neurons_cb, probe], **trainer_kwargs).validate(module, encoded_loader(adapter, items, with_targets=False), verbose=False)
    assert probe.seen == {"cuda"}
    assert neurons_cb.result is not None
    got = neurons_cb.result.importance.cpu()
    torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-3)


def test_attribution_callbacks_on_gpu_match_cpu(make_image: Any, tmp_path: Path) -> None:
    check_callbacks_on_gpu(make_image, tmp_path)


def test_steering_trains_under_bf16_mixed(make_image: Any, tmp_path: Path) -> None:
    adapter = private_llava()
    batch = toy_batch(adapter, make_image, n=2)
    bank = write_selection(tmp_path / "bank.json", selection(adapter, per_layer=4))
    module = SteeringModule(model="tiny", task="vqa", bank=str(bank), lr=0.5, min_lr_ratio=1.0, adapter_factory=lambda: adapter)
    weights = {name: p.detach().clone() for name, p in adapter.model.named_parameters()}
    probe, where = MaxScaleProbe(), DeviceProbe()
    run = gpu_trainer(precision="bf16-mixed", max_steps=4, limit_val_batches=0, callbacks=[probe, where])
    run.fit(module, train_dataloaders=loader(batch, 4))

    assert where.seen == {"cuda"}  # s is the module's only parameter outside the frozen VLM; all moved together
    assert module.scaler.s.dtype == torch.float32
    assert 0.0 < max(probe.seen) <= 1.5 + 1e-6  # moved, and clamped after each step
    assert all(torch.isfinite(run.logged_metrics[k]) for k in ("train/ce_step", "train/kl_step", "train/l2_step"))
    for name, parameter in adapter.model.named_parameters():
        assert torch.equal(parameter.detach().cpu(), weights[name]), name


def test_ddp_nccl_one_gpu_matches_cpu(make_image: Any, tmp_path: Path) -> None:
    """Last in the file: Lightning leaves the NCCL process group up; the test takes it down."""
    try:
        check_callbacks_on_gpu(make_image, tmp_path, strategy="ddp")
        assert dist.is_initialized() and dist.get_backend() == "nccl"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
