"""Steering (HONES_METHOD §5): objective, scaler wiring, export/import, bank checks, training.

The session's tiny adapters (tests/conftest.py) are shared with other test files, so every
test that freezes weights or registers hooks restores the model afterwards (``steerable``).
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from hones.attribution.bank import BankEntry, BankError, write_bank
from hones.interventions import NeuronScaler, scale_neurons
from hones.models import VLMAdapter, build_tiny_llava, wrap_model
from hones.steering.callback import NeuronSteeringCallback
from hones.steering.methods import GRID_FACTORS, METHODS, factor_to_scale
from hones.steering.module import SteeringModule, cosine_decay_factor
from hones.steering.objective import scale_l2, steering_objective, target_cross_entropy, target_kl, target_logits
from hones.steering.protocol import freeze_parameters, resolve_adapter
from hones.steering.scales import apply_scales, load_scales, save_scales, scale_statistics, scales_to_rows
from hones.steering.selection import random_neurons_like

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "steering"
PROMPT = "Question: what colour is the shape?\nAnswer the question with a short phrase."


# -- fixtures ---------------------------------------------------------------------------------
def _down_proj_hooks(adapter: VLMAdapter) -> int:
    return sum(len(adapter.mlp(l).down_proj._forward_pre_hooks) for l in range(adapter.num_layers))


@pytest.fixture
def steerable(adapter: VLMAdapter) -> Iterator[VLMAdapter]:
    """The parametrised tiny adapter, restored (requires_grad, grads, hooks) after the test."""
    flags = {name: p.requires_grad for name, p in adapter.model.named_parameters()}
    hooks = _down_proj_hooks(adapter)
    yield adapter
    for name, parameter in adapter.model.named_parameters():
        parameter.requires_grad_(flags[name])
        parameter.grad = None
    adapter.model.eval()
    assert _down_proj_hooks(adapter) == hooks, "a steering hook was left on the shared model"


@pytest.fixture
def llava(tiny_llava: VLMAdapter) -> Iterator[VLMAdapter]:
    """The tiny LLaVA, restored after the test (for the Trainer tests, one architecture is enough)."""
    flags = {name: p.requires_grad for name, p in tiny_llava.model.named_parameters()}
    yield tiny_llava
    for name, parameter in tiny_llava.model.named_parameters():
        parameter.requires_grad_(flags[name])
        parameter.grad = None
    tiny_llava.model.eval()
    assert _down_proj_hooks(tiny_llava) == 0


def toy_batch(adapter: VLMAdapter, make_image: Callable[..., Image.Image], n: int = 4) -> dict[str, Any]:
    images = [make_image(seed) for seed in range(n)]
    targets = ["red", "a blue square", "two", "green circle"][:n]
    return adapter.encode(images, [PROMPT] * n, targets)


def selection(adapter: VLMAdapter, per_layer: int = 16) -> dict[int, torch.Tensor]:
    step = adapter.ffn_width // per_layer
    return {layer: torch.arange(0, step * per_layer, step) for layer in range(adapter.num_layers)}


def write_selection(path: Path, neurons: dict[int, torch.Tensor]) -> Path:
    entries = [BankEntry(l, int(n), 1.0, 0) for l, ids in neurons.items() for n in ids]
    return write_bank(path, [BankEntry(e.layer, e.neuron, e.score, k) for k, e in enumerate(entries)])


def load_train_py() -> Any:
    """``train.py`` as a module (its ``main(argv)`` runs in this process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_cli", Path(__file__).resolve().parents[1] / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trainer(**kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(**options)


def loader(batch: dict[str, Any], repeats: int) -> DataLoader:
    return DataLoader([batch] * repeats, batch_size=None, collate_fn=lambda b: b)


# -- objective and wiring ---------------------------------------------------------------------
def test_only_scales_get_gradients(steerable: VLMAdapter, make_image: Callable[..., Image.Image]) -> None:
    batch = toy_batch(steerable, make_image)
    freeze_parameters(steerable.model)
    scaler = NeuronScaler(selection(steerable))
    with scale_neurons(steerable, scaler):
        loss = steering_objective(steerable, scaler, batch)
        loss.total.backward()
    assert all(not p.requires_grad and p.grad is None for p in steerable.model.parameters())
    assert scaler.s.grad is not None and scaler.s.grad.shape == scaler.s.shape
    assert float(scaler.s.grad.abs().sum()) > 0


def test_teacher_is_the_same_model_without_scaling(steerable: VLMAdapter, make_image: Callable[..., Image.Image]) -> None:
    batch = toy_batch(steerable, make_image)
    freeze_parameters(steerable.model)
    base, labels = target_logits(steerable, batch)
    scaler = NeuronScaler(selection(steerable))
    optimizer = torch.optim.AdamW([scaler.s], lr=0.5)
    with scale_neurons(steerable, scaler):
        first = steering_objective(steerable, scaler, batch)
        assert first.parts()["kl"] == 0.0  # s = 0: the scaled model is the original one
        first.total.backward()
        optimizer.step()
        second = steering_objective(steerable, scaler, batch)
        assert second.parts()["kl"] > 0.0
        with torch.no_grad(), scaler.disabled():
            teacher, _ = target_logits(steerable, batch)
    assert torch.equal(teacher, base)  # scaling off = the unsteered model, no second copy
    assert float(target_kl(base, base, labels)) == 0.0


def test_kl_is_original_to_scaled_on_target_positions_only() -> None:
    # §5: KL(p_original ‖ p_scaled), averaged over the positions that predict a target token
    original = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1.0, -3.0, 0.5]]])
    scaled = torch.tensor([[[0.0, 1.0, 0.0], [5.0, -5.0, 0.0], [-1.0, 2.0, 0.0]]])
    labels = torch.tensor([[4, -100, 1]])  # the middle position predicts no target token
    p_o, p_s = original.softmax(-1), scaled.softmax(-1)
    per_position = (p_o * (p_o.log() - p_s.log())).sum(-1)[0]
    reverse = (p_s * (p_s.log() - p_o.log())).sum(-1)[0]
    assert float((reverse[0] + reverse[2]) / 2) != pytest.approx(float((per_position[0] + per_position[2]) / 2), rel=1e-3)
    assert float(target_kl(original, scaled, labels)) == pytest.approx(float((per_position[0] + per_position[2]) / 2), rel=1e-5)


def test_objective_is_ce_plus_beta_kl_plus_lambda_mean_square(
    steerable: VLMAdapter, make_image: Callable[..., Image.Image]
) -> None:
    batch = toy_batch(steerable, make_image)
    freeze_parameters(steerable.model)
    scaler = NeuronScaler(selection(steerable))
    with torch.no_grad():
        scaler.s.copy_(torch.linspace(-1.0, 1.5, scaler.num_neurons))
    assert float(scale_l2(scaler.s)) == pytest.approx(float((scaler.s.detach() ** 2).sum()) / scaler.num_neurons)
    with scale_neurons(steerable, scaler):
        loss = steering_objective(steerable, scaler, batch, beta=50.0, l2_weight=0.2)  # β large: β·KL is visible in the total
        with torch.no_grad():
            scaled, labels = target_logits(steerable, batch)
            with scaler.disabled():
                original, _ = target_logits(steerable, batch)
    parts = loss.parts()
    assert parts["ce"] == pytest.approx(float(target_cross_entropy(scaled, labels)), rel=1e-5)
    assert parts["kl"] == pytest.approx(float(target_kl(original, scaled, labels)), rel=1e-4) and parts["kl"] > 0
    assert parts["l2"] == pytest.approx(float(scale_l2(scaler.s)), rel=1e-6)
    assert 50.0 * parts["kl"] > 1e-4 * parts["ce"]
    assert parts["loss"] == pytest.approx(parts["ce"] + 50.0 * parts["kl"] + 0.2 * parts["l2"], rel=1e-6)


def test_zero_scales_equal_base_logits(steerable: VLMAdapter, make_image: Callable[..., Image.Image]) -> None:
    batch = toy_batch(steerable, make_image)
    with torch.no_grad():
        base = steerable.forward(batch)
        with scale_neurons(steerable, NeuronScaler(selection(steerable))):
            steered = steerable.forward(batch)
    assert torch.equal(steered, base)


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_export_import_round_trip(
    steerable: VLMAdapter, make_image: Callable[..., Image.Image], tmp_path: Path, suffix: str
) -> None:
    batch = toy_batch(steerable, make_image, n=2)
    scaler = NeuronScaler(selection(steerable))
    with torch.no_grad():
        scaler.s.copy_(torch.linspace(-1.5, 1.5, scaler.num_neurons))
        with scale_neurons(steerable, scaler):
            expected = steerable.forward(batch)
    path = save_scales(scaler, tmp_path / f"scales{suffix}")
    loaded = load_scales(path, steerable.num_layers, steerable.ffn_width)
    assert torch.equal(loaded.s, scaler.s.detach()) and loaded.layers == scaler.layers
    with torch.no_grad(), apply_scales(steerable, path):
        actual = steerable.forward(batch)
    assert torch.equal(actual, expected)
    row = scales_to_rows(scaler)[0]
    assert set(row) == {"layer", "neuron", "scale", "factor"} and row["factor"] == pytest.approx(1 + row["scale"])


def test_scales_load_exactly_under_a_bf16_default_dtype(tmp_path: Path) -> None:
    scaler = NeuronScaler({1: torch.tensor([4, 2]), 3: torch.tensor([0])})
    with torch.no_grad():
        scaler.s.copy_(torch.tensor([0.123456, -1.000123, 0.000321]))
    for suffix in (".json", ".safetensors"):
        path = save_scales(scaler, tmp_path / f"scales{suffix}")
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # as inside configure_model under precision="bf16-true"
        try:
            loaded = load_scales(path)
        finally:
            torch.set_default_dtype(previous)
        assert loaded.s.dtype == torch.float32 and torch.equal(loaded.s, scaler.s.detach())


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"s": torch.tensor([0.1, float("nan")]), "index_1": torch.tensor([4, 2])}, r"'s' holds 1 non-finite value"),
        ({"s": torch.tensor([0.1]), "index_1": torch.tensor([4, 2])}, r"'s' has 1 values but the index tensors select 2"),
        ({"s": torch.tensor([0.1, 0.2]), "index_x": torch.tensor([4, 2])}, r"tensor 'index_x' does not name a layer"),
        ({"s": torch.tensor([0.1, 0.2]), "index_1": torch.tensor([4, 4])}, r"duplicate entry layer 1 neuron 4"),
        ({"s": torch.tensor([0.1]), "index_1": torch.tensor([0.5])}, r"'index_1' must be a non-empty 1-D integer tensor"),
        ({"s": torch.tensor([0.1]), "index_1": torch.tensor([3]), "w": torch.ones(1)}, r"unexpected tensor\(s\) \['w'\]"),
    ],
)
def test_bad_safetensors_scales_name_the_file(tmp_path: Path, tensors: dict[str, torch.Tensor], message: str) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "bad_scales.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(BankError, match=rf"bad_scales\.safetensors: {message}") as info:
        load_scales(path)
    assert "\n" not in str(info.value)


def test_scale_statistics() -> None:
    stats = scale_statistics(torch.tensor([0.0, 0.5, -1.0, 0.0]))
    assert stats == {"scale_abs_mean": 0.375, "scale_abs_max": 1.0, "scale_nonzero_frac": 0.5}


# -- bank validation --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([BankEntry(9, 3, 1.0, 0)], r"bad\.json: layer 9 out of range \[0, 4\) \(neuron 3\)"),
        ([BankEntry(1, 5000, 1.0, 0)], r"bad\.json: neuron 5000 of layer 1 out of range \[0, 352\)"),
    ],
)
def test_bank_out_of_range_stops_before_training(
    llava: VLMAdapter, tmp_path: Path, entries: list[BankEntry], message: str
) -> None:
    path = write_bank(tmp_path / "bad.json", entries)
    module = SteeringModule(model="tiny", task="vqa", bank=str(path), adapter_factory=lambda: llava)
    with pytest.raises(BankError, match=message):
        module.configure_model()
    callback = NeuronSteeringCallback(str(path))
    host = SteeringModule(model="tiny", task="vqa", steer=False, adapter_factory=lambda: llava)
    with pytest.raises(BankError, match=message):
        callback.setup(trainer(), host, "fit")
    assert getattr(host, "neuron_scaler", None) is None  # nothing attached on failure


def test_empty_bank_is_rejected_at_construction(tmp_path: Path) -> None:
    path = tmp_path / "empty.json"
    path.write_text("[]")
    with pytest.raises(BankError, match=r"empty\.json: empty neuron bank"):
        SteeringModule(model="tiny", task="vqa", bank=str(path))
    with pytest.raises(BankError, match=r"empty\.json: empty neuron bank"):
        NeuronSteeringCallback(str(path))


def test_scales_with_random_neurons_or_init_scale_is_rejected(toy_run: dict[str, Path], tmp_path: Path) -> None:
    """A scales file fixes the neurons and their scales: RandNeuron's random neurons and an init_scale
    would be ignored, so the module and a comparison with such methods refuse it before any work."""
    from hones.steering.compare import run_comparison

    scales = tmp_path / "scales.json"
    scales.write_text(json.dumps([{"layer": 0, "neuron": 1, "scale": 0.3}]))
    for bad in ({"random_neurons": True}, {"init_scale": 1.0}):
        with pytest.raises(ValueError, match=r"scales\.json\) gives the neurons and their starting scales"):
            SteeringModule(model="tiny", task="vqa", scales=str(scales), **bad)
    args = ["--config", str(toy_run["config"]), "--model.scales", str(scales), "--compare.output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=r"model\.scales \(.*scales\.json\) .* which fixed_amp, rand_neuron would choose"):
        run_comparison([*args, "--compare.methods", "[base, fixed_amp, rand_neuron, hones]"], adapter_factory=lambda: None)
    assert not (tmp_path / "out").exists()


# -- training with Lightning -----------------------------------------------------------------
def test_fit_lowers_ce_clamps_and_exports(
    llava: VLMAdapter, make_image: Callable[..., Image.Image], tmp_path: Path
) -> None:
    batch = toy_batch(llava, make_image)
    bank = write_selection(tmp_path / "bank.json", selection(llava, per_layer=32))
    # the random tiny model is close to uniform: a large lr makes 8 steps' effect visible
    module = SteeringModule(
        model="tiny", task="vqa", bank=str(bank), lr=0.3, output_dir=str(tmp_path / "out"), adapter_factory=lambda: llava
    )
    module.configure_model()
    with torch.no_grad(), module.steering():
        before = steering_objective(llava, module.scaler, batch).parts()["ce"]

    probe = MaxScaleProbe()
    trainer(max_steps=8, accumulate_grad_batches=2, gradient_clip_val=1.0, callbacks=[probe]).fit(
        module, train_dataloaders=loader(batch, 16)
    )
    with torch.no_grad(), module.steering():
        after = steering_objective(llava, module.scaler, batch).parts()["ce"]
    assert after < before - 0.05
    assert all(p.grad is None for p in llava.model.parameters())
    assert len(probe.seen) == 16 and max(probe.seen) <= module.hparams.scale_bound  # 8 steps x accumulation 2
    assert set(module.exported) == {"json", "safetensors"}
    assert torch.equal(load_scales(module.exported["json"]).s, module.scaler.s.detach())


class MaxScaleProbe(L.Callback):
    """Records max |s| of ``pl_module.<attribute>`` after every training batch."""

    def __init__(self, attribute: str = "scaler") -> None:
        self.attribute = attribute
        self.seen: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, *args: Any) -> None:
        self.seen.append(float(getattr(pl_module, self.attribute).s.abs().max()))


def test_clamp_after_each_optimizer_step(llava: VLMAdapter, make_image: Callable[..., Image.Image], tmp_path: Path) -> None:
    batch = toy_batch(llava, make_image, n=2)
    bank = write_selection(tmp_path / "bank.json", selection(llava, per_layer=4))
    # lr 10: one AdamW step moves every s by ~10, far outside [-1.5, 1.5]
    module = SteeringModule(model="tiny", task="vqa", bank=str(bank), lr=10.0, min_lr_ratio=1.0, adapter_factory=lambda: llava)
    probe = MaxScaleProbe()
    trainer(max_steps=3, gradient_clip_val=None, callbacks=[probe]).fit(module, train_dataloaders=loader(batch, 3))
    assert probe.seen == pytest.approx([1.5, 1.5, 1.5])


def test_scales_stay_float32_when_the_model_is_cast(tmp_path: Path) -> None:
    model, processor = build_tiny_llava(seed=1, num_layers=2)
    adapter = wrap_model(model, processor)  # a private copy: the cast below must not touch the shared one
    bank = write_selection(tmp_path / "bank.json", {0: torch.tensor([1, 2]), 1: torch.tensor([3])})
    module = SteeringModule(model="tiny", task="vqa", bank=str(bank), adapter_factory=lambda: adapter)
    module.configure_model()
    module.to(torch.bfloat16)  # what precision="bf16-true" does
    assert adapter.model.dtype == torch.bfloat16 and module.scaler.s.dtype == torch.float32


# -- the callback on a module of our own ------------------------------------------------------
class TinyTeacherForcing(L.LightningModule):
    """A user module: it owns a VLMAdapter and trains whatever requires grad on the §5 loss."""

    def __init__(self, adapter: VLMAdapter) -> None:
        super().__init__()
        self.adapter = adapter
        self.vlm = adapter.model

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        return steering_objective(self.adapter, self.neuron_scaler, batch).outputs()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=0.5)


def test_callback_steers_a_custom_module(llava: VLMAdapter, make_image: Callable[..., Image.Image], tmp_path: Path) -> None:
    batch = toy_batch(llava, make_image, n=2)
    with torch.no_grad():
        base = llava.forward(batch)
    weights = {name: p.detach().clone() for name, p in llava.model.named_parameters()}
    module = TinyTeacherForcing(llava)
    callback = NeuronSteeringCallback(selection(llava, per_layer=8), export_dir=tmp_path / "scales")
    probe = MaxScaleProbe("neuron_scaler")
    run = trainer(max_steps=4, callbacks=[callback, probe], log_every_n_steps=1)
    run.fit(module, train_dataloaders=loader(batch, 4))

    assert module.neuron_scaler is callback.scaler
    assert all(torch.equal(p, weights[name]) for name, p in llava.model.named_parameters())
    assert max(probe.seen) == pytest.approx(1.5)  # lr 0.5 for 4 steps overshoots; clamped after each step
    logged = set(run.logged_metrics)
    assert {"steer/scale_abs_mean", "steer/scale_abs_max", "steer/scale_nonzero_frac", "steer/ce", "steer/kl", "steer/l2"} <= logged
    assert (tmp_path / "scales" / "scales.json").is_file() and (tmp_path / "scales" / "scales.safetensors").is_file()
    with torch.no_grad():  # teardown removed the hooks: the model is the base model again
        assert torch.equal(llava.forward(batch), base)
    assert all(p.requires_grad for p in llava.model.parameters())  # flags restored


class NoOptimiser(TinyTeacherForcing):
    def configure_optimizers(self) -> None:
        return None


class ScheduledWithoutScales(TinyTeacherForcing):
    """An optimiser over a stand-in parameter, with a scheduler: s cannot be added to it."""

    def __init__(self, adapter: VLMAdapter) -> None:
        super().__init__(adapter)
        self.extra = torch.nn.Parameter(torch.zeros(1))

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW([self.extra], lr=0.1)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)}


class FailAt(L.Callback):
    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        raise RuntimeError("failed by the test")


@pytest.mark.parametrize(
    "module_class, message",
    [(NoOptimiser, "configures no optimiser: nothing trains the neuron scales"), (ScheduledWithoutScales, "has an LR scheduler")],
)
def test_callback_refuses_a_fit_that_would_not_train_the_scales(
    llava: VLMAdapter, make_image: Callable[..., Image.Image], module_class: type, message: str
) -> None:
    """No optimiser (Lightning would step a stand-in and export zeros) or an optimiser without s
    whose scheduler cannot take a new group: one line, and the model left unhooked."""
    batch = toy_batch(llava, make_image, n=2)
    callback = NeuronSteeringCallback(selection(llava, per_layer=8))
    with pytest.raises(RuntimeError, match=message):
        trainer(max_steps=2, callbacks=[callback]).fit(module_class(llava), train_dataloaders=loader(batch, 2))
    assert _down_proj_hooks(llava) == 0 and all(p.requires_grad for p in llava.model.parameters())


def test_a_failed_fit_leaves_the_model_unsteered(llava: VLMAdapter, make_image: Callable[..., Image.Image]) -> None:
    """Lightning skips teardown when a stage raises: the callback unhooks on the exception."""
    batch = toy_batch(llava, make_image, n=2)
    with torch.no_grad():
        base = llava.forward(batch)
    callback = NeuronSteeringCallback(selection(llava, per_layer=8), init_scale=1.0)
    with pytest.raises(RuntimeError, match="failed by the test"):
        trainer(max_steps=2, callbacks=[callback, FailAt()]).fit(TinyTeacherForcing(llava), train_dataloaders=loader(batch, 2))
    assert _down_proj_hooks(llava) == 0 and all(p.requires_grad for p in llava.model.parameters())
    with torch.no_grad():
        assert torch.equal(llava.forward(batch), base)


def test_callback_keeps_the_scales_float32_under_bf16_true(make_image: Callable[..., Image.Image]) -> None:
    own = wrap_model(*build_tiny_llava(seed=0))  # bf16-true casts the model: not the shared one
    batch = toy_batch(own, make_image, n=2)
    callback = NeuronSteeringCallback(selection(own, per_layer=8))
    module = TinyTeacherForcing(own)
    trainer(max_steps=2, callbacks=[callback], precision="bf16-true").fit(module, train_dataloaders=loader(batch, 2))
    assert own.model.dtype == torch.bfloat16
    assert callback.scaler.s.dtype == torch.float32 and module.neuron_scaler.s is callback.scaler.s
    assert callback.scaler.s.abs().sum() > 0  # it trained


def test_callback_takes_every_bank_form_and_learned_scales(llava: VLMAdapter, tmp_path: Path) -> None:
    """The forms the masking callback takes; non-integer ids are refused, not truncated; an
    exported scales file is evaluated with its values, not read as a bank of zeros."""
    pairs = [(1, 5), (1, 3), (2, 7)]
    expected = {1: [5, 3], 2: [7]}
    entries = [BankEntry(layer, neuron, 0.5, k) for k, (layer, neuron) in enumerate(pairs)]
    bank = write_bank(tmp_path / "bank.json", entries)
    import numpy as np

    forms = (pairs, entries, {1: [5, 3], 2: torch.tensor([7])}, {"1": [5, 3], "2": [7]}, {1: np.array([5, 3]), 2: torch.tensor(7)},
             {1: [np.int64(5), np.int64(3)], 2: range(7, 8)}, {1: (5, 3), 2: 7})  # fmt: skip
    for form in forms:
        got = NeuronSteeringCallback(form).scaler.neurons
        assert {layer: ids.tolist() for layer, ids in got.items()} == expected, form
    assert {k: v.tolist() for k, v in NeuronSteeringCallback(bank).scaler.neurons.items()} == {1: [3, 5], 2: [7]}
    for bad, message in [({1: [3.7]}, r"neurons: layer 1 neuron must be an integer; got 3.7"),
                         ({1: [True, 5]}, r"must be an integer; got True"),
                         ({1: [-2]}, r"neuron -2 of layer 1 must be >= 0"),
                         (tmp_path, r"a directory; give a neuron bank file")]:  # fmt: skip
        with pytest.raises(BankError, match=message):
            NeuronSteeringCallback(bad)
    scaler = NeuronScaler({1: torch.tensor([5, 3]), 2: torch.tensor([7])})
    with torch.no_grad():
        scaler.s.copy_(torch.tensor([0.25, -0.5, 1.0]))
    for name in ("scales.json", "scales.safetensors"):
        save_scales(scaler, tmp_path / name)
        loaded = NeuronSteeringCallback(tmp_path / name).scaler
        assert torch.equal(loaded.s, scaler.s) and {k: v.tolist() for k, v in loaded.neurons.items()} == expected
        with pytest.raises(BankError, match="a scales file sets s itself"):
            NeuronSteeringCallback(tmp_path / name, init_scale=1.0)


def test_adapter_protocol() -> None:
    class Provider(torch.nn.Module):
        def get_adapter(self) -> str:
            return "adapter"

    class Lazy(torch.nn.Module):
        adapter = None

        def configure_model(self) -> None:
            self.adapter = "built"

    assert resolve_adapter(Provider()) == "adapter"
    assert resolve_adapter(Lazy()) == "built"
    with pytest.raises(AttributeError, match="get_adapter"):
        resolve_adapter(torch.nn.Linear(2, 2))


# -- methods, schedule and configs ------------------------------------------------------------
def test_methods_and_schedule() -> None:
    assert list(METHODS) == ["base", "fixed_amp", "grid_search", "rand_neuron", "hones_no_kl", "hones"]
    assert METHODS["fixed_amp"].overrides == {"init_scale": 1.0}  # x2.0
    assert METHODS["hones_no_kl"].overrides == {"beta": 0.0} and METHODS["hones"].train
    assert [factor_to_scale(f) for f in GRID_FACTORS] == [-0.5, -0.25, 0.0, 0.25, 0.5, 1.0]
    assert cosine_decay_factor(0, 10) == 1.0 and cosine_decay_factor(10, 10) == pytest.approx(0.1)
    assert cosine_decay_factor(5, 10) == pytest.approx(0.55)


def test_fixed_amp_doubles_every_selected_neuron(llava: VLMAdapter, tmp_path: Path) -> None:
    neurons = selection(llava, per_layer=4)
    bank = write_selection(tmp_path / "bank.json", neurons)
    module = SteeringModule(model="tiny", task="vqa", bank=str(bank), adapter_factory=lambda: llava, **METHODS["fixed_amp"].overrides)
    module.configure_model()
    z = torch.rand(2, 3, llava.ffn_width) + 0.5
    scaled = module.scaler.scale(1, z)
    index = neurons[1]
    torch.testing.assert_close(scaled[..., index], 2.0 * z[..., index])  # §5: x2.0, i.e. 1 + s = 2
    others = torch.ones(llava.ffn_width, dtype=torch.bool)
    others[index] = False
    assert torch.equal(scaled[..., others], z[..., others])


def test_grid_search_keeps_the_best_dev_factor_ties_closest_to_one(tmp_path: Path) -> None:
    from hones.steering.compare import Comparison

    comparison = Comparison.__new__(Comparison)  # grid_search needs only evaluation_pass here
    comparison.output_dir = tmp_path
    method = METHODS["grid_search"]
    for dev, best in [
        ({0.5: 0.1, 0.75: 0.2, 1.0: 0.3, 1.25: 0.6, 1.5: 0.4, 2.0: 0.5}, 1.25),
        ({0.5: 0.7, 0.75: 0.2, 1.0: 0.3, 1.25: 0.7, 1.5: 0.4, 2.0: 0.7}, 1.25),  # tie: closest to x1
    ]:
        comparison.evaluation_pass = lambda name, key, fingerprint, run, dev=dev: {"metric": dev[float(key.removeprefix("dev_x"))]}
        chosen, scores = comparison.grid_search(method, dev=None, fingerprint={})
        assert chosen == best and scores == dev


def test_grid_search_factor_is_chosen_on_the_dev_split() -> None:
    from types import SimpleNamespace

    from hones.steering.compare import Comparison

    class Chosen(Exception):
        pass

    comparison = Comparison.__new__(Comparison)
    comparison.settings = {"methods": ["grid_search"], "dev_split_file": "dev.json", "test_split_file": "test.json"}
    comparison.data_args = {}
    comparison.grid_factors = GRID_FACTORS
    comparison.datamodule = lambda **kwargs: kwargs
    comparison.ood_datamodule = lambda: {"split": "ood"}
    comparison.method_fingerprint = lambda name: {}
    comparison.state = SimpleNamespace(is_done=lambda stage, fingerprint: False)
    comparison.has_passes = lambda name, fingerprint: True
    searched = []

    def grid_search(method: Any, data: Any, fingerprint: Any) -> None:
        searched.append(data)
        raise Chosen

    comparison.grid_search = grid_search
    with pytest.raises(Chosen):
        comparison.run()
    assert searched == [{"split": "dev", "split_file": "dev.json", "training": False, "limit": None}]


def test_random_neurons_keep_per_layer_counts() -> None:
    neurons = {0: torch.tensor([1, 2, 3]), 2: torch.tensor([7])}
    drawn = random_neurons_like(neurons, ffn_width=64, seed=3)
    assert {l: len(ids) for l, ids in drawn.items()} == {0: 3, 2: 1}
    again = random_neurons_like(neurons, ffn_width=64, seed=3)
    assert all(torch.equal(drawn[l], again[l]) for l in drawn)


def test_shipped_configs_parse_with_paper_defaults() -> None:
    from hones.steering.cli import read_config

    paths = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(paths) == 16
    ood = {"vqa": "gqa", "ocr": "textvqa", "caption": "flickr30k", "retrieval": "flickr30k"}
    parser = read_config(["--config", str(paths[0])]).parser  # building the parser is the slow part
    for path in paths:
        config = parser.parse_args(["--config", str(path)])
        model, trainer_config = config.model, config.trainer
        assert config.data.task == model.task, path.name
        # the toy configs scale lr and epochs to a 200-image dev split (README, "Steering"); the rest is §5
        lr, epochs = (5e-2, 4) if path.name.startswith("toy_") else (5e-4, 2)
        assert (model.beta, model.l2_weight, model.lr, model.min_lr_ratio, model.scale_bound) == (0.05, 1e-5, lr, 0.1, 1.5)
        assert (trainer_config.max_epochs, trainer_config.accumulate_grad_batches, trainer_config.gradient_clip_val) == (epochs, 4, 1.0)
        assert trainer_config.logger.init_args.default_hp_metric is False
        assert config.compare.ood["dataset"] == ood[model.task]
        if not path.name.startswith("toy_"):
            assert (trainer_config.devices, trainer_config.strategy, trainer_config.precision) == (4, "ddp", "bf16-true")
            assert model.dtype == "bf16"


# -- end to end on a tiny toy world (slow) ----------------------------------------------------
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny toy world, a saved tiny LLaVA, its bank and a config derived from the shipped one."""
    from hones.data.toyworld import ToyWorldConfig, generate_world
    from hones.models import save_pretrained

    root = tmp_path_factory.mktemp("steering_e2e")
    generate_world(root / "world", ToyWorldConfig(n_train=4, n_discovery=4, n_dev=4, n_test=4, n_ood=4))
    model, processor = build_tiny_llava(seed=0)
    save_pretrained(model, processor, root / "model")
    adapter = wrap_model(model, processor)
    bank = write_selection(root / "bank.json", selection(adapter, per_layer=8))
    text = (CONFIG_DIR / "toy_llava_vqa.yaml").read_text()
    for old, new in [
        ("models/toy-llava", str(root / "model")),
        ("runs/analyze/toy-llava/vqa/bank_hones.json", str(bank)),
        ("toyworld_data", str(root / "world")),
        ("runs/steering", str(root / "runs")),
    ]:
        text = text.replace(old, new)
    config = root / "config.yaml"
    config.write_text(text)
    return {"root": root, "config": config, "bank": bank}


FAST_TRAINER = [
    "--model.max_new_tokens", "4",
    "--data.batch_size", "2",
    "--trainer.max_epochs", "1",
    "--trainer.accumulate_grad_batches", "1",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


@pytest.mark.slow
def test_compare_writes_the_method_table(toy_run: dict[str, Path]) -> None:
    from hones.steering.compare import run_comparison

    model, processor = build_tiny_llava(seed=0)
    summary = run_comparison(
        ["--config", str(toy_run["config"]), *FAST_TRAINER], adapter_factory=lambda: wrap_model(model, processor)
    )
    out = toy_run["root"] / "runs" / "toy-llava" / "vqa" / "compare"
    assert [row["label"] for row in summary["methods"]] == [m.label for m in METHODS.values()]
    assert summary["ood_dataset"] == "gqa" and summary["metric"] == "vqa_accuracy/paper"
    assert all(math.isfinite(row["test"]) and math.isfinite(row["ood"]) for row in summary["methods"])
    assert summary["methods"][2]["factor"] in GRID_FACTORS
    assert (out / "summary.json").is_file() and "| HONES w/o KL |" in (out / "summary.md").read_text()
    for name in ("rand_neuron", "hones_no_kl", "hones"):
        assert (out / name / "scales.safetensors").is_file()
    rand = load_scales(out / "rand_neuron" / "scales.json")
    hones = load_scales(out / "hones" / "scales.json")
    assert {l: len(v) for l, v in rand.neurons.items()} == {l: len(v) for l, v in hones.neurons.items()}
    assert any(not torch.equal(rand.indices(l), hones.indices(l)) for l in hones.layers)


@pytest.mark.slow
def test_compare_resumes_finished_methods(toy_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A rerun skips the methods state.json records as finished, recomputes an unfinished one to
    the same row, stops on a finished method whose settings changed, and --compare.overwrite
    recomputes."""
    from hones.attribution.run_state import AnalysisError
    from hones.steering.compare import run_comparison

    model, processor = build_tiny_llava(seed=0)
    out = tmp_path / "compare"
    args = ["--config", str(toy_run["config"]), *FAST_TRAINER, "--compare.output_dir", str(out), "--compare.methods", "[base, hones]"]

    def no_model() -> VLMAdapter:
        raise AssertionError("the model was loaded although every method had finished")

    first = run_comparison(args, adapter_factory=lambda: wrap_model(model, processor))
    assert run_comparison(args, adapter_factory=no_model) == first
    assert capsys.readouterr().out.count("already finished") == 2

    state = json.loads((out / "state.json").read_text())
    assert set(state["stages"]) == {"method/base", "method/hones"}
    del state["stages"]["method/hones"]  # as if stopped while training hones
    (out / "state.json").write_text(json.dumps(state))
    scales = (out / "hones" / "scales.safetensors").read_bytes()
    (out / "hones" / "scales.safetensors").unlink()
    logs = sorted((out / "tb" / "hones").glob("events.*"))
    resumed = run_comparison(args, adapter_factory=lambda: wrap_model(model, processor))
    assert capsys.readouterr().out.count("already finished") == 1
    assert resumed == first and (out / "hones" / "scales.safetensors").read_bytes() == scales  # seeded: the same row
    assert sorted((out / "tb" / "hones").glob("events.*")) != logs  # the earlier attempt's logs are gone,
    assert len(list((out / "tb" / "hones").glob("events.*"))) == len(logs)  # not added to

    # the same split file written another way is the same setting
    same = [a.replace("/splits/", "/./splits/") if a.endswith("test.json") else a for a in args]
    assert run_comparison(same, adapter_factory=no_model) == first
    # β is a training setting: Base keeps its row, HONES does not; checked before any work (no model loaded)
    with pytest.raises(AnalysisError, match=r"'method/hones' was computed with other settings \(model.beta: 0.05 -> 0.1\).*--compare.overwrite true"):
        run_comparison([*args, "--model.beta", "0.1"], adapter_factory=no_model)
    import subprocess
    import sys

    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), "compare", *args, "--model.beta", "0.1"]
    refused = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith(f"train.py compare: {out / 'state.json'}: stage 'method/hones'") and "model.beta: 0.05 -> 0.1" in last
    run_comparison([*args, "--model.beta", "0.1", "--compare.overwrite", "true", "--compare.methods", "[hones]"],
                   adapter_factory=lambda: wrap_model(model, processor))  # fmt: skip
    stages = json.loads((out / "state.json").read_text())["stages"]
    assert stages["method/hones"]["fingerprint"]["model"]["beta"] == 0.1
    assert stages["method/base"] == state["stages"]["method/base"]  # untouched
    # --compare.overwrite forgets on disk at once: a run that fails midway leaves no stale row to reuse
    with pytest.raises(AssertionError, match="the model was loaded"):
        run_comparison([*args, "--compare.overwrite", "true", "--compare.methods", "[base]"], adapter_factory=no_model)
    assert "method/base" not in json.loads((out / "state.json").read_text())["stages"]


@pytest.mark.slow
def test_compare_on_two_processes_resumes(toy_run: dict[str, Path], tmp_path: Path) -> None:
    """torchrun, 2 processes (gloo): Base equals the 1-process row; a rerun skips both methods
    (reported once); the process count does not invalidate Base's row, but does HONES' (its
    global batch doubled)."""
    import subprocess
    import sys

    from eval_fixtures import free_port, subprocess_env

    from hones.attribution.run_state import AnalysisError
    from hones.steering.compare import run_comparison

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "compare"
    args = ["--config", str(toy_run["config"]), *FAST_TRAINER, "--compare.output_dir", str(out)]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(repo / "train.py"), "compare", *args,
           "--trainer", str(repo / "configs/trainer/ddp_cpu.yaml"), "--compare.methods", "[base, hones]"]  # fmt: skip

    def launch() -> str:
        done = subprocess.run(two, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    launch()
    rows = {row["method"]: row for row in json.loads((out / "summary.json").read_text())["methods"]}
    one = run_comparison([*args, "--compare.output_dir", str(tmp_path / "one"), "--compare.methods", "[base]"])
    assert one["methods"][0]["test"] == rows["base"]["test"] and one["methods"][0]["ood"] == rows["base"]["ood"]
    assert launch().count("already finished") == 2  # rank 0 only
    assert run_comparison([*args, "--compare.methods", "[base]"])["methods"][0] == rows["base"]  # 1 process: kept
    with pytest.raises(AnalysisError, match=r"'method/hones' .*trainer.devices: 2 -> 1"):
        run_comparison([*args, "--compare.methods", "[base, hones]"])


@pytest.mark.slow
def test_train_py_fit_test_and_bank_error(toy_run: dict[str, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    config = str(toy_run["config"])

    def train(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(repo / "train.py"), *args]
        return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)

    fitted = train("fit", "--config", config, *FAST_TRAINER)
    assert fitted.returncode == 0, fitted.stderr[-2000:]
    run_dir = toy_run["root"] / "runs" / "toy-llava" / "vqa"
    assert (run_dir / "scales.json").is_file() and (run_dir / "metrics_val.json").is_file()
    tested = train(
        "test", "--config", config, *FAST_TRAINER,
        "--model.scales", str(run_dir / "scales.safetensors"),
        "--data.split", "test", "--data.split_file", str(toy_run["root"] / "world/splits/test.json"),
        "--data.training", "false",
    )  # fmt: skip
    assert tested.returncode == 0, tested.stderr[-2000:]
    assert "test/vqa/vqa_accuracy/paper" in tested.stdout

    bad = write_bank(tmp_path / "bad_bank.json", [BankEntry(9, 3, 1.0, 0)])
    failed = train("fit", "--config", config, *FAST_TRAINER, "--model.bank", str(bad))
    assert failed.returncode != 0
    assert failed.stderr.strip().splitlines()[-1] == f"train.py: {bad}: layer 9 out of range [0, 4) (neuron 3)"

    helped = train("--help")
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "python train.py compare" in helped.stdout and "{fit,validate,test,predict}" in helped.stdout


@pytest.mark.parametrize("task", ["vqa", "retrieval"])
def test_steering_test_likelihood_script(toy_run: dict[str, Path], tmp_path: Path, task: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``scripts/steering_test_likelihood.py``: zero scales change nothing, non-zero scales move the score."""
    import importlib.util
    import json

    from hones.steering.scales import scaler_from_rows

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("steering_test_likelihood", repo / "scripts" / "steering_test_likelihood.py")
    script = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(script)
    compare = tmp_path / "compare"
    for method, value in (("hones", 1.5), ("rand_neuron", 0.0)):
        rows = [{"layer": layer, "neuron": n, "scale": value} for layer in range(4) for n in range(40)]
        (compare / method).mkdir(parents=True)
        save_scales(scaler_from_rows(rows), compare / method / "scales.json")
    args = ["--model", str(toy_run["root"] / "model"), "--task", task, "--compare_dir", str(compare),
            "--world", str(toy_run["root"] / "world")]  # fmt: skip
    assert script.main(args) == 0
    result = json.loads((compare / "test_likelihood.json").read_text())
    assert result["missing_methods"] == ["hones_no_kl"] and "hones_no_kl" in capsys.readouterr().out
    assert result["methods"]["rand_neuron"]["change"] == 0.0  # s = 0: z * (1 + 0) = z
    assert result["methods"]["hones"]["change"] != 0.0
    assert result["methods"]["hones"]["change"] == pytest.approx(result["methods"]["hones"]["score"] - result["base"])
    # 4 test images; retrieval: each with its positive and the negatives the tiny caption pool allows
    assert result["num_items"] == 4 if task == "vqa" else result["num_items"] > 4
    with pytest.raises(SystemExit):
        script.main([*args, "--methods", "fixed_amp"])  # no scales for it: a clear error


@pytest.mark.slow
def test_compare_resumes_an_interrupted_fit(
    toy_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigterm_restored: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """SIGTERM during HONES' second epoch: the rerun continues the fit from its checkpoint to the
    row and scales of an uninterrupted comparison; a checkpoint written with other settings is
    not resumed."""
    from test_fit_resume import Seen, StopAt

    from hones.steering.compare import Comparison, run_comparison

    model, processor = build_tiny_llava(seed=0)
    schedule = [*FAST_TRAINER, "--trainer.max_epochs", "2", "--compare.methods", "[hones]", "--compare.checkpoint_every_n_steps", "0"]
    args = ["--config", str(toy_run["config"]), *schedule]
    whole = run_comparison([*args, "--compare.output_dir", str(tmp_path / "whole")], adapter_factory=lambda: wrap_model(model, processor))

    out = tmp_path / "stopped"
    plain_trainer = Comparison.trainer

    fit_callbacks: list[L.Callback] = [StopAt(epoch=1, batch=0)]

    def trainer_with_callbacks(self: Comparison, name: str, fit: bool = False) -> L.Trainer:
        built = plain_trainer(self, name, fit)
        if fit:
            built.callbacks.extend(fit_callbacks)
        return built

    monkeypatch.setattr(Comparison, "trainer", trainer_with_callbacks)
    with pytest.raises(SystemExit):
        run_comparison([*args, "--compare.output_dir", str(out)], adapter_factory=lambda: wrap_model(model, processor))
    checkpoint = out / "hones" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file() and not (out / "summary.json").exists()
    saved = torch.load(checkpoint, weights_only=True)
    assert (saved["epoch"], saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches"]) == (1, 1)
    fit_callbacks.clear()

    stale = tmp_path / "stale"  # the same checkpoint under settings it was not written with: not resumed
    (stale / "hones" / "checkpoints").mkdir(parents=True)
    (stale / "hones" / "checkpoints" / "last.ckpt").write_bytes(checkpoint.read_bytes())
    other = run_comparison([*args, "--compare.output_dir", str(stale), "--model.beta", "0.1"],
                           adapter_factory=lambda: wrap_model(model, processor))  # fmt: skip
    assert "was written with other settings; the fit starts over" in capsys.readouterr().out

    fit_callbacks[:] = [seen := Seen()]
    resumed = run_comparison([*args, "--compare.output_dir", str(out)], adapter_factory=lambda: wrap_model(model, processor))
    assert f"hones: resuming the fit from {checkpoint}" in capsys.readouterr().out
    assert len(seen.uids) == 1  # 2 epochs x 2 batches, 3 of them trained before the stop
    assert [{k: v for k, v in row.items() if k != "scales"} for row in resumed["methods"]] == [
        {k: v for k, v in row.items() if k != "scales"} for row in whole["methods"]
    ]
    assert torch.equal(load_scales(out / "hones" / "scales.json").s, load_scales(tmp_path / "whole" / "hones" / "scales.json").s)
    assert not (out / "hones" / "checkpoints").exists()  # removed once the method's row is recorded
    assert other["methods"][0]["test"] is not None


class StopInTest(L.Callback):
    """SIGTERM to this process after the first test batch."""

    def on_test_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_compare_stopped_after_the_fit_does_not_train_again(
    toy_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigterm_restored: None
) -> None:
    """SIGTERM in HONES' test pass, after its fit: the rerun restores the finished fit from its
    checkpoint (no batch trained again), exports the same scales and gives the uninterrupted row."""
    from test_fit_resume import Seen

    from hones.steering.compare import Comparison, run_comparison

    model, processor = build_tiny_llava(seed=0)
    schedule = [*FAST_TRAINER, "--trainer.max_epochs", "2", "--compare.methods", "[hones]", "--compare.checkpoint_every_n_steps", "0"]
    args = ["--config", str(toy_run["config"]), *schedule]
    whole = run_comparison([*args, "--compare.output_dir", str(tmp_path / "whole")], adapter_factory=lambda: wrap_model(model, processor))

    plain_trainer = Comparison.trainer
    extra: dict[bool, list[L.Callback]] = {True: [], False: [StopInTest()]}

    def trainer_with_callbacks(self: Comparison, name: str, fit: bool = False) -> L.Trainer:
        built = plain_trainer(self, name, fit)
        built.callbacks.extend(extra[fit])
        return built

    monkeypatch.setattr(Comparison, "trainer", trainer_with_callbacks)
    out = tmp_path / "stopped"
    with pytest.raises(SystemExit):
        run_comparison([*args, "--compare.output_dir", str(out)], adapter_factory=lambda: wrap_model(model, processor))
    assert (out / "hones" / "checkpoints" / "last.ckpt").is_file() and not (out / "summary.json").exists()
    extra.update({True: [seen := Seen()], False: []})
    resumed = run_comparison([*args, "--compare.output_dir", str(out)], adapter_factory=lambda: wrap_model(model, processor))
    assert seen.uids == []
    assert [{k: v for k, v in row.items() if k != "scales"} for row in resumed["methods"]] == [
        {k: v for k, v in row.items() if k != "scales"} for row in whole["methods"]
    ]
    assert torch.equal(load_scales(out / "hones" / "scales.json").s, load_scales(tmp_path / "whole" / "hones" / "scales.json").s)


class Passes(L.Callback):
    """Counts the evaluation passes it sees (by eval tag), and sends SIGTERM in pass ``stop_at``
    (1-based, over every pass it is attached to) after its first batch."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at, self.seen = stop_at, []

    def _start(self, kind: str) -> None:
        self.seen.append(kind)

    def on_validation_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._start("dev")

    def on_test_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._start(pl_module.eval_tag)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._stop()

    def on_test_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._stop()

    def _stop(self) -> None:
        if len(self.seen) == self.stop_at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_compare_repeats_no_finished_pass(
    toy_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigterm_restored: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Grid-Search stopped in its third factor's dev pass, then HONES stopped in its OOD pass: each
    rerun repeats only the passes that had not finished, and the rows equal an uninterrupted run's."""
    from hones.steering.compare import Comparison, run_comparison

    model, processor = build_tiny_llava(seed=0)
    methods = ["--compare.methods", "[grid_search, hones]", "--compare.grid_factors", "[0.5, 1.0, 1.5, 2.0]"]
    args = ["--config", str(toy_run["config"]), *FAST_TRAINER, *methods]
    whole = run_comparison([*args, "--compare.output_dir", str(tmp_path / "whole")], adapter_factory=lambda: wrap_model(model, processor))

    plain_trainer = Comparison.trainer
    passes = Passes()

    def trainer_with_callbacks(self: Comparison, name: str, fit: bool = False) -> L.Trainer:
        built = plain_trainer(self, name, fit)
        if not fit:
            built.callbacks.append(passes)
        return built

    monkeypatch.setattr(Comparison, "trainer", trainer_with_callbacks)
    out = ["--compare.output_dir", str(tmp_path / "stopped")]
    runs = [(3, ["dev", "dev", "dev"]), (6, ["dev", "dev", "test", "ood", "test", "ood"]), (None, ["ood"])]
    for stop_at, expected in runs:
        passes.stop_at, passes.seen = stop_at, []
        capsys.readouterr()
        if stop_at is None:
            resumed = run_comparison([*args, *out], adapter_factory=lambda: wrap_model(model, processor))
        else:
            with pytest.raises(SystemExit):
                run_comparison([*args, *out], adapter_factory=lambda: wrap_model(model, processor))
        assert passes.seen == expected
        printed = capsys.readouterr().out
        if stop_at == 6:  # the interrupted third factor's dev pass: its first batch is not run again
            assert f"val: 2 predictions of an interrupted pass found in {tmp_path / 'stopped' / 'grid_search' / 'dev_x1.5' / '.journal_val'}" in printed
    assert f"ood: 2 predictions of an interrupted pass found in {tmp_path / 'stopped' / 'hones' / '.journal_ood'}" in printed
    assert resumed["methods"] == [{**row, "scales": resumed["methods"][k].get("scales")} if "scales" in row else row
                                  for k, row in enumerate(whole["methods"])]  # fmt: skip
    assert sorted(p.parent.name for p in (tmp_path / "whole" / "grid_search").glob("dev_x*/metrics_val.json")) == [
        "dev_x0.5", "dev_x1.0", "dev_x1.5", "dev_x2.0"]  # fmt: skip
    state = json.loads((tmp_path / "stopped" / "state.json").read_text())
    assert sorted(state["stages"]) == ["method/grid_search", "method/hones"]  # the pass records are dropped


@pytest.mark.slow
def test_train_py_fit_resumes_from_its_checkpoint(toy_run: dict[str, Path], tmp_path: Path) -> None:
    """``train.py fit`` stopped by SIGTERM in its second epoch, then rerun with ``--ckpt_path``, or
    the same command again: the scales of an uninterrupted ``train.py fit``; a rerun with another
    setting is refused."""
    import os
    import subprocess
    import sys

    from eval_fixtures import subprocess_env

    repo = Path(__file__).resolve().parents[1]
    env = {**subprocess_env(), "PYTHONPATH": os.pathsep.join([str(repo / "tests"), subprocess_env().get("PYTHONPATH", "")])}

    def fit(out: Path, *extra: str, subcommand: str = "fit") -> subprocess.CompletedProcess[str]:
        command = [sys.executable, str(repo / "train.py"), subcommand, "--config", str(toy_run["config"]), *FAST_TRAINER,
                   "--trainer.max_epochs", "2", "--model.output_dir", str(out), *extra]  # fmt: skip
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    whole = fit(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-2000:]
    stop = ["--trainer.callbacks+=test_fit_resume.StopAt", "--trainer.callbacks.epoch", "1", "--trainer.callbacks.batch", "0"]
    stopped = fit(tmp_path / "run", *stop)
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert stopped.returncode == 143 and checkpoint.is_file(), stopped.stderr[-2000:]
    assert not (tmp_path / "run" / "scales.json").exists()
    resumed = fit(tmp_path / "run", "--ckpt_path", str(checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Restored all states from the checkpoint" in resumed.stderr
    assert torch.equal(load_scales(tmp_path / "run" / "scales.json").s, load_scales(tmp_path / "whole" / "scales.json").s)
    # the same command resubmitted (a requeued job: no --ckpt_path) resumes a checkpoint of its settings
    assert fit(tmp_path / "again", *stop).returncode == 143
    again = fit(tmp_path / "again")
    assert again.returncode == 0 and "resuming the stopped fit from" in again.stderr, again.stderr[-2000:]
    assert "Restored all states from the checkpoint" in again.stderr
    assert torch.equal(load_scales(tmp_path / "again" / "scales.json").s, load_scales(tmp_path / "whole" / "scales.json").s)
    # the same command once more, after the fit finished: said so, nothing trained, the same scales
    done = fit(tmp_path / "again")
    assert done.returncode == 0 and "holds a finished fit with these settings" in done.stderr, done.stderr[-2000:]
    assert torch.equal(load_scales(tmp_path / "again" / "scales.json").s, load_scales(tmp_path / "whole" / "scales.json").s)
    # a setting the checkpoint's tag leaves out, but LightningCLI would take from it: trained afresh, not refused
    assert fit(tmp_path / "fresh", *stop).returncode == 143
    fresh = fit(tmp_path / "fresh", "--model.stats_threshold", "0.2")
    assert fresh.returncode == 0 and "resuming the stopped fit" not in fresh.stderr, fresh.stderr[-2000:]
    assert "left by an earlier fit" in fresh.stderr
    stopped = fit(tmp_path / "other", *stop)
    checkpoint = tmp_path / "other" / "checkpoints" / "last.ckpt"
    assert stopped.returncode == 143 and checkpoint.is_file(), stopped.stderr[-2000:]
    # another setting: refused, with one line naming it (LightningCLI would take the model's from the checkpoint)
    other = fit(tmp_path / "other", "--ckpt_path", str(checkpoint), "--model.lr", "0.5")
    assert other.returncode == 1 and "holds other model settings, which LightningCLI would use instead of the given ones " \
        "(stored -> given: model.lr: 0.05 -> 0.5); resume with" in other.stderr.splitlines()[-1], other.stderr[-2000:]
    tested = fit(tmp_path / "other", "--ckpt_path", str(checkpoint), "--model.max_new_tokens", "8", subcommand="test")
    assert tested.returncode == 1 and "test the fit's exported scales with --model.scales" in tested.stderr.splitlines()[-1]
    other = fit(tmp_path / "other", "--ckpt_path", str(checkpoint), "--trainer.gradient_clip_val", "0.5")
    assert other.returncode == 1 and "was written by a fit with other settings (stored -> now: trainer.gradient_clip_val: 1.0 -> 0.5)" \
        in other.stderr.splitlines()[-1], other.stderr[-2000:]


def test_regenerated_data_files_change_the_fit_tag_and_the_rows(toy_run: dict[str, Path], tmp_path: Path) -> None:
    """A split file rewritten at the same path is another input: a fit's resume tag holds the
    dev split's digest, each compared method's row the test split's too."""
    import shutil

    from hones.steering.cli import read_config
    from hones.steering.compare import Comparison
    from hones.steering.fingerprint import fit_fingerprint, plain

    world = toy_run["root"] / "world"
    dev, test = tmp_path / "dev.json", tmp_path / "test.json"
    shutil.copy(world / "splits" / "dev.json", dev)
    shutil.copy(world / "splits" / "test.json", test)
    args = ["--config", str(toy_run["config"]), "--data.split_file", str(dev), "--compare.test_split_file", str(test),
            "--compare.output_dir", str(tmp_path / "compare")]  # fmt: skip

    def tags() -> tuple[Any, Any]:
        reader = read_config(args)
        config = reader.config
        fit = fit_fingerprint(plain(config.model), plain(config.data), plain(config.trainer), config.get("seed_everything"))
        return fit, Comparison(reader).method_fingerprint("hones")

    fit, row = tags()
    assert tags() == (fit, row)
    test.write_text(json.dumps(json.loads(test.read_text())[1:]))
    fit_now, row_now = tags()
    assert fit_now == fit and row_now != row  # the test split: the rows, not the fit
    dev.write_text(json.dumps(json.loads(dev.read_text())[1:]))
    fit_dev, row_dev = tags()
    assert fit_dev["data_files"]["split_file"] != fit["data_files"]["split_file"] and row_dev != row_now
    # the dev split given to compare, and the OOD set's annotation file, are the rows' inputs too
    compare_dev = tmp_path / "compare_dev.json"
    shutil.copy(dev, compare_dev)
    ood = tmp_path / "gqa.json"
    shutil.copy(world / "gqa" / "questions.json", ood)
    args += ["--compare.dev_split_file", str(compare_dev), "--compare.ood.annotation_file", str(ood)]
    _, before = tags()
    compare_dev.write_text(json.dumps(json.loads(compare_dev.read_text())[1:]))
    _, after_dev = tags()
    ood.write_text(ood.read_text() + "\n")
    _, after_ood = tags()
    assert before != after_dev != after_ood


def test_train_py_names_a_loader_layout_change_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume onto another process count (a requeue under ``devices: auto``) ends in one line, not a traceback."""
    import hones.steering.cli
    from hones.data.resumable import LoaderLayoutError

    train = load_train_py()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise LoaderLayoutError("ResumableLoader.load_state_dict: the checkpoint's training loader had other processes: 1 -> 2")

    monkeypatch.setattr(hones.steering.cli, "SteeringCLI", refuse)
    with pytest.raises(SystemExit) as info:
        train.main(["fit", "--config", "x.yaml"])
    message = str(info.value.code)
    assert message.startswith("train.py: ResumableLoader") and "processes: 1 -> 2" in message and "\n" not in message
    assert "checkpoints/last.ckpt" in message


def test_the_same_scales_cannot_scale_a_model_twice(steerable: VLMAdapter) -> None:
    scaler = NeuronScaler(selection(steerable, per_layer=4))
    with scale_neurons(steerable, scaler):
        with pytest.raises(ValueError, match="already scale this model"), apply_scales(steerable, scaler):
            pass
    with apply_scales(steerable, scaler):  # released on exit: usable again
        pass


def test_train_py_fit_checks_its_output_folder_before_training(toy_run: dict[str, Path], tmp_path: Path) -> None:
    train = load_train_py()
    taken = tmp_path / "taken"
    taken.write_text("a file")
    with pytest.raises(SystemExit) as info:
        train.main(["fit", "--config", str(toy_run["config"]), *FAST_TRAINER, "--model.output_dir", str(taken / "fit")])
    message = str(info.value.code)
    assert message == f"train.py: {taken / 'fit' / 'checkpoints'}: cannot write results there (Not a directory)", message


def test_train_py_names_a_broken_model_folder(toy_run: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    train = load_train_py()
    broken = tmp_path / "model"
    shutil.copytree(toy_run["root"] / "model", broken)
    (broken / "config.json").unlink()
    with pytest.raises(SystemExit) as info:
        train.main(["fit", "--config", str(toy_run["config"]), *FAST_TRAINER, "--model.model", str(broken),
                    "--model.output_dir", str(tmp_path / "fit")])  # fmt: skip
    message = str(info.value.code)
    assert message.startswith(f"train.py: {broken}: cannot load the model: ") and "\n" not in message, message


def test_compare_reuses_a_pass_recorded_before_the_digests(toy_run: dict[str, Path], tmp_path: Path) -> None:
    """An interrupted comparison from before the data digests: its finished passes are reused, not rerun."""
    from hones.steering.cli import read_config
    from hones.steering.compare import Comparison

    comparison = Comparison(read_config(["--config", str(toy_run["config"]), "--compare.output_dir", str(tmp_path / "c")]))
    fingerprint = comparison.method_fingerprint("hones")
    old = {k: v for k, v in fingerprint.items() if k != "data_files"}
    comparison.state.mark_done("pass/hones/test", old, {"metric": 0.5})

    def rerun() -> dict[str, Any]:
        raise AssertionError("the recorded pass was run again")

    assert comparison.has_passes("hones", fingerprint)
    assert comparison.evaluation_pass("hones", "test", fingerprint, rerun) == {"metric": 0.5}
