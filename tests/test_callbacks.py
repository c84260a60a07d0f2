"""The attribution callbacks on a LightningModule defined here (not part of hones).

The module only exposes `.adapter`; its own steps do something unrelated. The callbacks
must reproduce the plain accumulators, write their artifacts, and log to TensorBoard.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from hones.attribution.bank import BankEntry, BankError, load_head_scores, read_bank, write_bank
from hones.attribution.batches import encode_items
from hones.attribution.callbacks import (
    HeadLocalizationCallback,
    MaskingVerificationCallback,
    NeuronAttributionCallback,
    resolve_adapter,
)
from hones.attribution.heads import HeadLocalizer, HeadScores
from hones.attribution.neurons import NeuronAttribution, NeuronAttributor
from hones.data.records import TaskItem
from hones.models import VLMAdapter

QA = [
    ("what color is the square?", "red"),
    ("how many circles?", "two"),
    ("is there a triangle?", "no"),
    ("what shape is blue?", "a circle"),
]
CANDIDATES = [(l, h) for l in range(4) for h in range(4)]


pytestmark = pytest.mark.usefixtures("one_thread")


class ShapesModule(L.LightningModule):
    """Any module: it exposes its VLM as `.adapter`; its steps compute an unrelated loss."""

    def __init__(self, adapter: VLMAdapter | None = None) -> None:
        super().__init__()
        self._given = adapter
        self.adapter: VLMAdapter | None = None

    def configure_model(self) -> None:
        if self.adapter is not None:
            return
        if self._given is None:  # built inside each spawned process
            from hones.models import build_tiny_llava, wrap_model

            self._given = wrap_model(*build_tiny_llava(seed=0))
        self.adapter = self._given
        self.vlm = self.adapter.model

    def _step(self, batch: dict[str, Any]) -> torch.Tensor:
        return torch.tensor(float(len(batch["items"])))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch)


def items_only(items: list[TaskItem]) -> dict[str, Any]:
    """Collate without encoding: the callbacks re-encode from items."""
    return {"items": list(items)}


def make_items(make_image) -> list[TaskItem]:
    return [
        TaskItem(uid=f"toy:{k}:vqa", task="vqa", image=make_image(seed=k), prompt=q, target=a, references=[a])
        for k, (q, a) in enumerate(QA)
    ]


def encoded_loader(adapter: VLMAdapter, items: list[TaskItem], with_targets: bool) -> DataLoader:
    def collate(batch_items: list[TaskItem]) -> dict[str, Any]:
        return encode_items(adapter, batch_items, with_targets)

    return DataLoader(items, batch_size=2, collate_fn=collate)


def trainer(tmp_path: Path, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(tmp_path / "tb"), name="", version="run", default_hp_metric=False),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        **kwargs,
    )


def plain_accumulators(adapter: VLMAdapter, items: list[TaskItem]) -> tuple[HeadScores, NeuronAttribution]:
    """The §2 head scores over CANDIDATES and the §3 result for their top 3, without Lightning
    (batches of 2, teacher-forced for §2, prompt-only for §3): what the callbacks must reproduce."""
    plain = HeadLocalizer(4, 4, "vqa", heads=CANDIDATES, rows_per_forward=16)
    for start in range(0, len(items), 2):
        plain.update(adapter, encode_items(adapter, items[start : start + 2], with_targets=True))
    heads = plain.compute()
    deltas = [float(heads.delta[h]) for h in heads.top_heads(3)]
    attributor = NeuronAttributor(4, adapter.ffn_width, heads.top_heads(3), deltas, "vqa", rows_per_forward=8)
    for start in range(0, len(items), 2):
        attributor.update(adapter, encode_items(adapter, items[start : start + 2], with_targets=False))
    return heads, attributor.compute()


def test_callback_chain_equals_plain_accumulators(tiny_llava: VLMAdapter, make_image, tmp_path: Path) -> None:
    items = make_items(make_image)
    module = ShapesModule(tiny_llava)
    out = tmp_path / "out"
    heads_cb = HeadLocalizationCallback(heads=CANDIDATES, top_k=3, rows_per_forward=16, output_dir=out)
    trainer(tmp_path, [heads_cb]).validate(module, encoded_loader(tiny_llava, items, with_targets=True), verbose=False)

    expected, result = plain_accumulators(tiny_llava, items)
    assert heads_cb.task == "vqa" and heads_cb.scores is not None
    torch.testing.assert_close(heads_cb.scores.delta, expected.delta, equal_nan=True)
    assert heads_cb.top_heads == expected.top_heads(3)
    on_disk = load_head_scores(out / "head_scores.safetensors")
    torch.testing.assert_close(on_disk.delta, expected.delta, equal_nan=True)
    assert json.loads((out / "heads.json").read_text())["heads"][0]["layer"] == expected.top_heads(1)[0][0]

    # §3 from the head callback; prompt-only batches this time (labels are not needed)
    neurons_cb = NeuronAttributionCallback(heads=heads_cb, rows_per_forward=8, gradient_baseline=True, output_dir=out)
    trainer(tmp_path, [neurons_cb]).validate(module, encoded_loader(tiny_llava, items, with_targets=False), verbose=False)
    assert neurons_cb.result is not None
    torch.testing.assert_close(neurons_cb.result.importance, result.importance)
    assert [(e.layer, e.neuron) for e in neurons_cb.bank] == [(e.layer, e.neuron) for e in result.select(0.01)]
    assert set(neurons_cb.banks) == {"hones", "random", "activation", "write_in", "grad_x_act"}
    assert all(len(bank) == len(neurons_cb.bank) for bank in neurons_cb.banks.values())
    for name in neurons_cb.banks:
        assert read_bank(out / f"bank_{name}.json", 4, tiny_llava.ffn_width)
    assert (out / "importance.safetensors").is_file()
    assert "stat_activation_probability" in load_file(str(out / "importance.safetensors"))

    # §4 from the neuron callback, in trainer.test
    masking_cb = MaskingVerificationCallback(banks=neurons_cb, max_new_tokens=4, output_dir=out)
    trainer(tmp_path, [masking_cb]).test(module, encoded_loader(tiny_llava, items, with_targets=False), verbose=False)
    results = json.loads((out / "masking.json").read_text())
    assert results == json.loads(json.dumps(masking_cb.results))
    assert set(results["banks"]) == set(neurons_cb.banks)
    for row in results["banks"].values():
        assert row["drop"] == pytest.approx(results["base"] - row["masked"])

    # TensorBoard got the heat map, the histogram, the per-layer figure and scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "run"), size_guidance={"images": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    assert "attribution/vqa/head_delta" in tags["images"]
    assert "attribution/vqa/neurons_per_layer" in tags["images"]
    assert "attribution/vqa/importance" in tags["histograms"]
    assert "masking/vqa/hones/masked" in tags["scalars"]


def test_masking_callback_with_bank_files_and_factory(tiny_qwen2_5_vl: VLMAdapter, make_image, tmp_path: Path) -> None:
    """An adapter factory instead of `.adapter`; banks from JSON files; items re-encoded; predict; retrieval."""
    prompt = "Candidate: {}\nDoes the candidate correctly describe the image?\nAnswer exactly Yes or No."
    items = [  # the positive (k = 2) is the model's last candidate: NDCG@5 = 1 / log2(4), not 1 as reversed
        TaskItem(uid=f"toy:0:retrieval:cand{k}", task="retrieval", image=make_image(seed=0), prompt=prompt.format(c),
                 target="Yes" if k == 2 else "No", references=[], group="0", label=int(k == 2))
        for k, c in enumerate(["a red square", "two dogs", "a boat at sea"])
    ]
    path = write_bank(tmp_path / "bank.json", [BankEntry(1, n, 1.0, n) for n in range(40)])
    holder = torch.nn.Module()
    holder.vlm = tiny_qwen2_5_vl.model

    class Plain(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.holder = holder

        def predict_step(self, batch: dict[str, Any], batch_idx: int) -> int:
            return len(batch["items"])

    masking_cb = MaskingVerificationCallback(
        banks={"mine": str(path), "empty_layer": [BankEntry(3, 0, 1.0, 0)]},
        stages=("predict",),
        adapter_factory=lambda module: tiny_qwen2_5_vl,
        target_logprob=True,
    )
    trainer(tmp_path, [masking_cb]).predict(Plain(), DataLoader(items, batch_size=2, collate_fn=items_only))
    results = masking_cb.results
    assert results["task"] == "retrieval" and set(results["banks"]) == {"mine", "empty_layer"}
    assert results["banks"]["mine"]["num_neurons"] == 40
    from hones.attribution.batches import encode_items
    from hones.attribution.heads import yes_no_margin
    from hones.interventions import zero_neurons

    def yes_no_margins(neurons: dict[int, list[int]] | None) -> torch.Tensor:
        batch = encode_items(tiny_qwen2_5_vl, items, with_targets=False)
        with torch.no_grad(), zero_neurons(tiny_qwen2_5_vl, neurons or {}):
            return yes_no_margin(tiny_qwen2_5_vl, tiny_qwen2_5_vl.next_token_logits(batch))

    def ndcg(neurons: dict[int, list[int]] | None) -> float:
        """NDCG@5 of the one group by hand: the positive (item 2) ranked by its Yes-No margin, IDCG = 1."""
        margins = yes_no_margins(neurons)
        negatives = margins[:2]
        assert (negatives - margins[2]).abs().min() > 1e-3  # no (near-)tie: the rank is well defined
        rank = 1 + int((negatives > margins[2]).sum())
        return 1.0 / math.log2(rank + 1)

    def margin_gap(neurons: dict[int, list[int]] | None) -> float:
        margins = yes_no_margins(neurons)
        return float(margins[2] - margins[:2].mean())

    base = results["base"]
    assert base == pytest.approx(ndcg(None), abs=1e-9)  # NDCG@5 with one positive among 3 candidates
    assert results["banks"]["mine"]["masked"] == pytest.approx(ndcg({1: list(range(40))}), abs=1e-9)
    assert results["banks"]["empty_layer"]["masked"] == pytest.approx(ndcg({3: [0]}), abs=1e-9)
    for row in results["banks"].values():
        assert row["relative_drop"] == pytest.approx(100.0 * (base - row["masked"]) / base)
    # the teacher-forced reading: positive margin minus the negatives' mean margin, by hand
    scored = results["teacher_forced"]
    assert scored["measure"].startswith("margin gap")
    assert scored["base"] == pytest.approx(margin_gap(None), abs=1e-4)
    assert scored["banks"]["mine"]["masked"] == pytest.approx(margin_gap({1: list(range(40))}), abs=1e-4)
    assert scored["banks"]["mine"]["drop"] == pytest.approx(scored["base"] - scored["banks"]["mine"]["masked"])
    assert scored["banks"]["mine"]["drop"] != 0.0  # 40 neurons of layer 1 move the margins


def test_masking_callback_target_logprob(tiny_llava: VLMAdapter, make_image, tmp_path: Path) -> None:
    """target_logprob on a generation task: the mean log p(target) with and without the bank, by hand."""
    from hones.attribution.batches import encode_items
    from hones.attribution.heads import target_log_prob_from_logits
    from hones.interventions import zero_neurons

    items = make_items(make_image)
    bank = [BankEntry(layer, n, 1.0, n) for layer in (2, 3) for n in range(30)]
    callback = MaskingVerificationCallback(banks={"b": bank}, max_new_tokens=3, stages=("predict",), target_logprob=True)
    trainer(tmp_path, [callback]).predict(ShapesModule(tiny_llava), DataLoader(items, batch_size=2, collate_fn=items_only))

    def mean_log_prob(neurons: dict[int, list[int]]) -> float:
        values = []
        for start in range(0, len(items), 2):
            batch = encode_items(tiny_llava, items[start : start + 2], with_targets=True)
            with torch.no_grad(), zero_neurons(tiny_llava, neurons):
                values.append(target_log_prob_from_logits(tiny_llava.forward(batch), batch["labels"]))
        return float(torch.cat(values).mean())

    scored = callback.results["teacher_forced"]
    assert scored["measure"].startswith("mean log p")
    assert scored["base"] == pytest.approx(mean_log_prob({}), abs=1e-5)
    masked = mean_log_prob({2: list(range(30)), 3: list(range(30))})
    assert scored["banks"]["b"]["masked"] == pytest.approx(masked, abs=1e-5)
    assert masked != pytest.approx(scored["base"], abs=1e-6)
    plain = MaskingVerificationCallback(banks={"b": bank}, max_new_tokens=3, stages=("predict",))
    trainer(tmp_path, [plain]).predict(ShapesModule(tiny_llava), DataLoader(items, batch_size=2, collate_fn=items_only))
    assert "teacher_forced" not in plain.results and plain.results["banks"] == callback.results["banks"]


def test_heads_of_another_model_are_refused(tiny_llava: VLMAdapter, make_image, tmp_path: Path) -> None:
    """H* from a bigger model (layer 7 of a 4-layer one) stops with one line before any batch runs."""
    items = make_items(make_image)[:2]
    neurons_cb = NeuronAttributionCallback(heads=[(0, 1, 0.5), (7, 2, 0.3)], task="vqa")
    with pytest.raises(BankError, match=r"H\*: head \(7, 2\) out of range for 4 layers x 4 heads \(head scores of another model\?\)"):
        trainer(tmp_path, [neurons_cb]).validate(ShapesModule(tiny_llava), encoded_loader(tiny_llava, items, False), verbose=False)


def test_callbacks_explain_a_missing_adapter() -> None:
    with pytest.raises(AttributeError, match="expose the VLMAdapter as `adapter`"):
        resolve_adapter(L.LightningModule())
    with pytest.raises(ValueError, match="stages must be among"):
        HeadLocalizationCallback(stages=("fit",))


def test_teacher_forced_heads_without_agreement_warn() -> None:
    """§2 allows the teacher-forced utility only with its agreement with the metric utility reported."""
    import warnings

    with pytest.warns(UserWarning, match="set compare_utility='metric'"):
        HeadLocalizationCallback(utility="teacher_forced")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HeadLocalizationCallback(utility="teacher_forced", compare_utility="metric")
        HeadLocalizationCallback(utility="metric")


def test_callbacks_refuse_a_model_spread_over_devices(tiny_llava: VLMAdapter) -> None:
    """With device_map sharding, write-in scoring would mix tensors of several GPUs (a device-mismatch traceback)."""
    module = L.LightningModule()
    module.adapter = tiny_llava
    assert resolve_adapter(module) is tiny_llava
    tiny_llava.model.hf_device_map = {"model.language_model.layers.0": 0, "model.language_model.layers.1": 1}
    try:
        with pytest.raises(ValueError, match="device_map spreads it over 0, 1: load it without device_map"):
            resolve_adapter(module)
        tiny_llava.model.hf_device_map = {"": 0}  # the whole model on one device: fine
        assert resolve_adapter(module) is tiny_llava
    finally:
        del tiny_llava.model.hf_device_map


def test_metric_utility_with_agreement_inside_fit(tiny_llava: VLMAdapter, make_image, tmp_path: Path) -> None:
    """utility="metric" + teacher-forced agreement, in validation inside fit: sanity check skipped."""
    items = make_items(make_image)[:2]

    class Fitting(ShapesModule):
        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            return self.dummy.sum() * 0

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD([self.dummy], lr=0.0)

    module = Fitting(tiny_llava)
    module.dummy = torch.nn.Parameter(torch.zeros(1))
    heads = [(0, 1), (1, 0), (3, 1)]  # on these, the two utilities' top-2 share one head
    callback = HeadLocalizationCallback(
        utility="metric", compare_utility="teacher_forced", heads=heads, top_k=2,
        max_new_tokens=3, output_dir=tmp_path / "out",
    )
    loader = DataLoader(items, batch_size=2, collate_fn=items_only)
    trainer(tmp_path, [callback], max_epochs=1, num_sanity_val_steps=1, limit_train_batches=1).fit(module, loader, loader)
    assert callback.scores is not None and callback.scores.num_items == 2
    assert callback.scores.utility == "metric"
    assert callback.compare_scores is not None and callback.compare_scores.utility == "teacher_forced"

    # the agreement by hand from the two score matrices: Δ on the evaluated heads, top-2 by Δ
    # (ties: lower layer, then lower head), Spearman of average ranks (NaN when one side is constant)
    def top(delta: torch.Tensor) -> list[tuple[int, int]]:
        return sorted(heads, key=lambda head: (-float(delta[head]), head))[:2]

    def ranks(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([(x < v).sum() + ((x == v).sum() - 1) / 2 for v in x]).double()

    first, second = ([float(s.delta[head]) for head in heads] for s in (callback.scores, callback.compare_scores))
    assert all(math.isfinite(v) for v in first + second)
    ra, rb = ranks(torch.tensor(first)), ranks(torch.tensor(second))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    norm = float(ra.norm() * rb.norm())
    overlap = len(set(top(callback.scores.delta)) & set(top(callback.compare_scores.delta))) / 2
    expected = {"spearman": float((ra * rb).sum()) / norm if norm > 0 else math.nan, "top_k_overlap": overlap, "k": 2.0}
    assert callback.top_heads == top(callback.scores.delta)
    assert callback.agreement == pytest.approx(expected, nan_ok=True)
    written = json.loads((tmp_path / "out" / "head_agreement.json").read_text())
    assert written == pytest.approx(
        {"utility": "metric", "compare_utility": "teacher_forced",
         **{name: None if math.isnan(value) else value for name, value in expected.items()}}
    )


SPAWN_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import lightning as L
    from torch.utils.data import DataLoader
    sys.path.insert(0, {tests!r})
    from test_callbacks import ShapesModule, items_only, make_items, CANDIDATES
    from hones.attribution.callbacks import HeadLocalizationCallback, NeuronAttributionCallback

    def image(seed, size=(64, 64)):
        import numpy as np
        from PIL import Image
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))

    if __name__ == "__main__":
        torch.set_num_threads(1)
        devices = int(sys.argv[1]); out = sys.argv[2]
        items = make_items(image)
        loader = DataLoader(items, batch_size=1, collate_fn=items_only)
        kwargs = dict(accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
        if devices > 1:
            kwargs["strategy"] = "ddp_spawn"
        heads = HeadLocalizationCallback(heads=CANDIDATES, top_k=3, output_dir=out)
        L.Trainer(callbacks=[heads], **kwargs).validate(ShapesModule(), loader, verbose=False)
        neurons = NeuronAttributionCallback(heads=out + "/head_scores.safetensors", top_k=3, output_dir=out)
        L.Trainer(callbacks=[neurons], **kwargs).validate(ShapesModule(), loader, verbose=False)
    """
)


@pytest.mark.slow
def test_two_process_ddp_spawn_reproduces_single_process(tmp_path: Path) -> None:
    """Sums reduce across processes: a 2-process ddp_spawn run writes the 1-process artifacts."""
    script = tmp_path / "run_attribution.py"
    script.write_text(SPAWN_SCRIPT.format(tests=str(Path(__file__).parent)))
    for devices in (1, 2):
        done = subprocess.run(
            [sys.executable, str(script), str(devices), str(tmp_path / f"out{devices}")],
            capture_output=True, text=True, timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    one = load_head_scores(tmp_path / "out1" / "head_scores.safetensors")
    two = load_head_scores(tmp_path / "out2" / "head_scores.safetensors")
    assert one.num_items == two.num_items == 4
    torch.testing.assert_close(two.delta, one.delta, atol=1e-5, rtol=0, equal_nan=True)
    a = load_file(str(tmp_path / "out1" / "importance.safetensors"))
    b = load_file(str(tmp_path / "out2" / "importance.safetensors"))
    torch.testing.assert_close(b["importance"], a["importance"], atol=1e-6, rtol=1e-4)
    assert [(e.layer, e.neuron) for e in read_bank(tmp_path / "out1" / "bank_hones.json")] == [
        (e.layer, e.neuron) for e in read_bank(tmp_path / "out2" / "bank_hones.json")
    ]
