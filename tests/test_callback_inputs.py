"""What a user's own Lightning project hands the callbacks: batches, banks, head files, IDF,
samplers, processors. Each form the docstrings name works; anything else stops with one line
that says what to give instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, DistributedSampler

from hones.attribution.bank import BankEntry, BankError, save_head_scores, write_bank, write_head_list
from hones.attribution.batches import encode_items
from hones.attribution.callbacks import (
    HeadLocalizationCallback,
    MaskingVerificationCallback,
    NeuronAttributionCallback,
    _heads_and_deltas,
    check_unrepeated_loaders,
)
from hones.attribution.heads import HeadScores
from hones.attribution.write_in import idf_from_items
from hones.data.records import TaskItem
from hones.models import VLMAdapter, wrap_model
from hones.steering import NeuronSteeringCallback

pytestmark = pytest.mark.usefixtures("one_thread")
QA = [("what color is the square?", "red"), ("how many circles?", "two"), ("is there a triangle?", "no")]


class Host(L.LightningModule):
    """A user's module: it exposes the VLM as `.adapter`; its steps do nothing of HONES'."""

    def __init__(self, adapter: VLMAdapter) -> None:
        super().__init__()
        self.adapter = adapter

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        return None

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        return None


def run(callback: L.Callback, adapter: VLMAdapter, batches: list[dict[str, Any]], stage: str = "validate") -> None:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[callback], enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    loader = DataLoader(batches, batch_size=None)
    getattr(trainer, stage)(Host(adapter), loader, verbose=False)


def vqa_items(make_image) -> list[TaskItem]:
    return [
        TaskItem(uid=f"mine:{k}:vqa", task="vqa", image=make_image(seed=k), prompt=q, target=a, references=[a])
        for k, (q, a) in enumerate(QA)
    ]


def own_encoding(adapter: VLMAdapter, items: list[TaskItem]) -> dict[str, Any]:
    """How a Hugging Face pipeline of the user's encodes: prompt + answer, ``labels = input_ids``
    (the prompt counts as target), no ``prompt_last_index``."""
    batch = encode_items(adapter, items, with_targets=True)
    del batch["prompt_last_index"]
    batch["labels"] = batch["input_ids"].clone()
    return batch


def test_an_encoding_of_the_users_own_is_not_read(tiny_llava: VLMAdapter, make_image) -> None:
    """With ``items`` present, the head utility and the neuron scores come from the adapter's
    encoding of them, whatever else the batch holds (``labels = input_ids`` used to turn the
    utility into the prompt's log-probability, and the neuron callback failed with a KeyError)."""
    items = vqa_items(make_image)
    heads = [(l, h) for l in range(4) for h in range(2)]
    relabelled = encode_items(tiny_llava, items, with_targets=True)  # the adapter's encoding, labels replaced
    relabelled["labels"] = relabelled["input_ids"].clone()
    results = []
    for batch in ({"items": items}, own_encoding(tiny_llava, items), relabelled):
        head_cb = HeadLocalizationCallback(heads=heads, top_k=3, rows_per_forward=16)
        run(head_cb, tiny_llava, [batch])
        neuron_cb = NeuronAttributionCallback(heads=head_cb, rows_per_forward=8, activation_statistics=False)
        run(neuron_cb, tiny_llava, [batch])
        results.append((head_cb.scores, neuron_cb.result))
    (plain_heads, plain_neurons), *others = results
    for own_heads, own_neurons in others:
        assert plain_heads.baseline == pytest.approx(own_heads.baseline, abs=1e-6)
        torch.testing.assert_close(own_heads.delta, plain_heads.delta, equal_nan=True)
        torch.testing.assert_close(own_neurons.importance, plain_neurons.importance)


def test_batches_without_task_items_are_named(tiny_llava: VLMAdapter, make_image) -> None:
    items = vqa_items(make_image)
    as_dicts = [{"uid": item.uid, "task": item.task, "prompt": item.prompt} for item in items]
    with pytest.raises(TypeError, match=r"batch\['items'\]\[0\] is a dict, not a hones.data.TaskItem"):
        run(HeadLocalizationCallback(), tiny_llava, [{"items": as_dicts}])
    with pytest.raises(TypeError, match=r"is a dict, not a hones.data.TaskItem"):
        run(HeadLocalizationCallback(task="vqa"), tiny_llava, [{"items": as_dicts}])
    bare = own_encoding(tiny_llava, items)
    del bare["items"]
    with pytest.raises(ValueError, match=r"not the adapter's encoding with `labels` .* and has no `items`"):
        run(HeadLocalizationCallback(task="vqa"), tiny_llava, [bare])


def test_masking_banks_in_every_documented_form(tiny_llava: VLMAdapter, make_image, tmp_path: Path) -> None:
    """Entries, a selection {layer: ids}, (layer, neuron) pairs, a file and the folder of bank files
    mask the same neurons; a bank that does not fit the model is refused with its name."""
    items = vqa_items(make_image)[:2]
    entries = [BankEntry(layer, n, 1.0, k) for k, (layer, n) in enumerate((l, n) for l in (0, 1) for n in range(60))]
    folder = tmp_path / "neurons"
    write_bank(folder / "bank_hones.json", entries)
    write_bank(folder / "bank_random.json", entries[:5])
    forms = {
        "entries": entries,
        "selection": {0: torch.arange(60), 1: list(range(60))},
        "pairs": [(e.layer, e.neuron) for e in entries],
        "file": str(folder / "bank_hones.json"),
    }
    callback = MaskingVerificationCallback(banks=forms, max_new_tokens=3)
    run(callback, tiny_llava, [{"items": items}], stage="test")
    masked = {name: row["masked"] for name, row in callback.results["banks"].items()}
    assert len(set(masked.values())) == 1 and {row["num_neurons"] for row in callback.results["banks"].values()} == {120}
    from_folder = MaskingVerificationCallback(banks=folder, max_new_tokens=3)
    run(from_folder, tiny_llava, [{"items": items}], stage="test")
    assert set(from_folder.results["banks"]) == {"hones", "random"}
    assert from_folder.results["banks"]["hones"]["masked"] == masked["file"]
    with pytest.raises(BankError, match=r"banks\['wide'\]: layer 9 out of range \[0, 4\)"):
        run(MaskingVerificationCallback(banks={"wide": {9: [0]}}), tiny_llava, [{"items": items}], stage="test")
    with pytest.raises(BankError, match=r"banks\['odd'\]: entry 0 must be a BankEntry or a \(layer, neuron\) pair"):
        run(MaskingVerificationCallback(banks={"odd": [(1, 2, 3)]}), tiny_llava, [{"items": items}], stage="test")
    with pytest.raises(BankError, match=r"no bank_<name>.json files"):
        run(MaskingVerificationCallback(banks=tmp_path), tiny_llava, [{"items": items}], stage="test")


def test_heads_json_gives_the_same_heads_as_head_scores(tmp_path: Path) -> None:
    """The head callback writes heads.json and head_scores.safetensors; either gives H* and Δ."""
    delta = torch.tensor([[0.5, -0.1, 0.2], [0.05, 0.9, -0.3]])
    scores = HeadScores(delta=delta, intervened=1.0 - delta, baseline=1.0, utility="teacher_forced", task="vqa", num_items=4)
    save_head_scores(tmp_path / "head_scores.safetensors", scores)
    write_head_list(tmp_path / "heads.json", scores)
    for k in (None, 2, 4):
        from_json = _heads_and_deltas(str(tmp_path / "heads.json"), k, default_k=3)
        assert from_json == _heads_and_deltas(tmp_path / "head_scores.safetensors", k, default_k=3)
    assert _heads_and_deltas(str(tmp_path / "heads.json"), 2)[0] == [(1, 1), (0, 0)]
    listing = json.loads((tmp_path / "heads.json").read_text())
    (tmp_path / "heads.json").write_text(json.dumps({**listing, "top_k": 2}))  # as analyze.py records its |H*|
    assert _heads_and_deltas(str(tmp_path / "heads.json"), None, default_k=3)[0] == [(1, 1), (0, 0)]


def test_caption_idf_from_items_without_a_datamodule(tiny_llava: VLMAdapter, make_image) -> None:
    captions = [
        TaskItem(uid=f"mine:{k}:caption", task="caption", image=make_image(seed=k), prompt="Describe the image in one sentence.",
                 target=refs[0], references=refs)  # fmt: skip
        for k, refs in enumerate([["a red square", "a square"], ["two blue circles", "circles on grey"]])
    ]
    callback = NeuronAttributionCallback(heads=[(0, 0, 1.0)], idf=captions)
    callback._device = torch.device("cpu")
    torch.testing.assert_close(callback._resolve_idf(None, tiny_llava, "caption"), idf_from_items(tiny_llava, captions))
    assert callback._resolve_idf(None, tiny_llava, "vqa") is None  # only captions are weighted
    auto = NeuronAttributionCallback(heads=[(0, 0, 1.0)])
    with pytest.raises(ValueError, match="without a datamodule pass idf=<the discovery split's caption TaskItems>"):
        auto._resolve_idf(SimpleNamespace(datamodule=None), tiny_llava, "caption")


def test_a_sampler_that_repeats_or_drops_items_is_refused() -> None:
    """Lightning's validate / test DistributedSampler pads 5 items to 6 on 2 processes; the repeated
    item would count twice. An unrepeated sampler (hones', or Lightning's predict) passes."""
    data = list(range(5))

    def trainer_with(sampler: Any) -> Any:
        return SimpleNamespace(world_size=2, val_dataloaders=DataLoader(data, sampler=sampler), test_dataloaders=None)

    padded = DistributedSampler(data, num_replicas=2, rank=0, shuffle=False)
    with pytest.raises(ValueError, match=r"DistributedSampler spreads 5 items over 2 processes as 6 \(repeats 1\)"):
        check_unrepeated_loaders(trainer_with(padded), "validate", "HeadLocalizationCallback")
    dropped = DistributedSampler(data, num_replicas=2, rank=0, shuffle=False, drop_last=True)
    with pytest.raises(ValueError, match=r"as 4 \(drops 1\)"):
        check_unrepeated_loaders(trainer_with(dropped), "validate", "HeadLocalizationCallback")
    check_unrepeated_loaders(trainer_with(UnrepeatedDistributedSampler(data, num_replicas=2, rank=0, shuffle=False)), "validate", "x")
    check_unrepeated_loaders(SimpleNamespace(world_size=1), "validate", "x")  # one process: nothing to check


def test_a_loader_that_gives_every_process_all_items_is_refused() -> None:
    """A loader built before the process group exists gets evaluation_sampler's None, i.e. a SequentialSampler:
    under Trainer(use_distributed_sampler=False) every process then scored every item (helper audit: NDCG 0.55 -> 0.29)."""
    from torch.utils.data import BatchSampler, SequentialSampler

    from hones.data.datamodule import evaluation_sampler

    data = list(range(5))
    assert evaluation_sampler(data) is None  # no process group here
    loaders = {
        "sequential": DataLoader(data, sampler=evaluation_sampler(data)),
        "shuffled": DataLoader(data, shuffle=True),
        "own batch sampler": DataLoader(data, batch_sampler=type("Mine", (BatchSampler,), {})(SequentialSampler(data), 2, False)),
    }
    for name, loader in loaders.items():
        trainer = SimpleNamespace(world_size=2, val_dataloaders=None, test_dataloaders=loader)
        with pytest.raises(ValueError, match="gives each of the 2 processes all 5 items, which would count 2 times; build the loader once"):
            check_unrepeated_loaders(trainer, "test", "MaskingVerificationCallback")
    sharded = DataLoader(data, sampler=UnrepeatedDistributedSampler(data, num_replicas=2, rank=1, shuffle=False))
    check_unrepeated_loaders(SimpleNamespace(world_size=2, test_dataloaders=sharded), "test", "x")
    batched = BatchSampler(UnrepeatedDistributedSampler(data, num_replicas=2, rank=1, shuffle=False), 2, False)
    check_unrepeated_loaders(SimpleNamespace(world_size=2, test_dataloaders=DataLoader(data, batch_sampler=batched)), "test", "x")


def test_a_second_steering_callback_says_how_to_go_on(tiny_llava: VLMAdapter) -> None:
    host = Host(tiny_llava)
    first = NeuronSteeringCallback({1: [0, 1]})
    first.attach(host)
    first.detach()
    assert host.neuron_scaler is first.scaler  # kept on the module (its state_dict holds s)
    with pytest.raises(ValueError, match=r"already holds an earlier NeuronSteeringCallback's scaler; .*NeuronSteeringCallback\(module.neuron_scaler\)"):
        NeuronSteeringCallback({1: [2]}).attach(host)
    again = NeuronSteeringCallback(host.neuron_scaler)  # the way on that the message names
    again.attach(host)
    again.detach()


def test_wrap_model_names_the_processor_to_use(tiny_qwen2_5_vl: VLMAdapter) -> None:
    with pytest.raises(TypeError, match=r"load it with hones.models.load_processor"):
        wrap_model(tiny_qwen2_5_vl.model, tiny_qwen2_5_vl.tokenizer)


@pytest.mark.parametrize("name", ["toy-llava", "toy-qwen2_5_vl"])
def test_load_processor_gives_what_wrap_model_takes(name: str) -> None:
    from transformers import AutoModelForImageTextToText

    from hones.models import load_processor

    folder = Path(__file__).resolve().parents[1] / "models" / name
    adapter = wrap_model(AutoModelForImageTextToText.from_pretrained(folder), load_processor(str(folder)))
    assert adapter.num_layers == 4 and adapter.processor.image_processor is not None


def test_head_scores_file_keeps_the_head_passes_top_k(tiny_llava: VLMAdapter, make_image, tmp_path: Path) -> None:
    """head_scores.safetensors records |H*|: started from it, the neuron callback used the architecture default (30)."""
    from hones.attribution.bank import stored_top_k

    items = vqa_items(make_image)
    heads = HeadLocalizationCallback(task="vqa", top_k=3, compare_utility="metric", output_dir=tmp_path)
    run(heads, tiny_llava, [{"items": items}])
    path = tmp_path / "head_scores.safetensors"
    assert stored_top_k(path) == 3
    from_file, _, _ = _heads_and_deltas(path, None)
    from_json, _, _ = _heads_and_deltas(tmp_path / "heads.json", None)
    assert from_file == from_json == heads.top_heads and len(from_file) == 3
    assert len(_heads_and_deltas(path, 5)[0]) == 5  # an explicit top_k still wins


def test_top_k_and_task_settings_are_checked() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="top_k"):
            HeadLocalizationCallback(top_k=bad, compare_utility="metric")
        with pytest.raises(ValueError, match="top_k"):
            NeuronAttributionCallback(heads=[(0, 0, 1.0)], top_k=bad)
    scores = HeadScores(torch.ones(2, 2), torch.zeros(2, 2), 1.0, "teacher_forced", "vqa", 3)
    with pytest.raises(ValueError, match=r"\|H\*\| \(top_k\) must be a whole number >= 1; got -1"):
        scores.top_heads(-1)  # [:-1] had taken all heads but one
    for cls, kwargs in ((HeadLocalizationCallback, {"compare_utility": "metric"}), (NeuronAttributionCallback, {"heads": [(0, 0, 1.0)]}),
                        (MaskingVerificationCallback, {"banks": {"x": [(0, 1)]}})):  # fmt: skip
        with pytest.raises(ValueError, match="task must be one of vqa, ocr, caption, retrieval or None; got 'VQA'"):
            cls(task="VQA", **kwargs)


def test_batches_of_another_task_or_layout_are_refused(tiny_llava: VLMAdapter, make_image) -> None:
    items = vqa_items(make_image)
    with pytest.raises(ValueError, match="the batch holds vqa items, and the callback is set for ocr"):
        run(HeadLocalizationCallback(task="ocr", compare_utility="metric"), tiny_llava, [{"items": items}])
    with pytest.raises(ValueError, match="the batch holds vqa items, and the callback is set for caption"):
        run(MaskingVerificationCallback(banks={"x": [(0, 1)]}, task="caption"), tiny_llava, [{"items": items}], stage="test")
    caption = TaskItem(uid="mine:9:caption", task="caption", image=make_image(seed=9), prompt="Describe.", target="a dog", references=["a dog"])
    with pytest.raises(ValueError, match=r"several tasks \(caption, vqa\)"):
        run(HeadLocalizationCallback(compare_utility="metric"), tiny_llava, [{"items": [*items, caption]}])
    with pytest.raises(ValueError, match="a batch must be a mapping with 'items'.*got a list"):
        run(HeadLocalizationCallback(task="vqa", compare_utility="metric"), tiny_llava, [items])


def test_head_sources_are_checked(tiny_llava: VLMAdapter, make_image, tmp_path: Path) -> None:
    items = vqa_items(make_image)
    with pytest.raises(ValueError, match=r"entry 0 must be a \(layer, head, Δ\) triple"):
        run(NeuronAttributionCallback(heads=[(0, 0)], task="vqa", idf=None), tiny_llava, [{"items": items}])
    with pytest.raises(ValueError, match="H\\* is empty"):
        run(NeuronAttributionCallback(heads=[], task="vqa", idf=None), tiny_llava, [{"items": items}])
    heads = HeadLocalizationCallback(task="vqa", top_k=2, compare_utility="metric", output_dir=tmp_path)
    run(heads, tiny_llava, [{"items": items}])
    for source in (heads, tmp_path / "heads.json", tmp_path / "head_scores.safetensors"):
        with pytest.raises(BankError, match="the heads come from a vqa head pass, and this callback attributes ocr"):
            run(NeuronAttributionCallback(heads=source, task="ocr", idf=None), tiny_llava, [{"items": items}])


def test_no_positive_head_is_said_and_the_metadata_is_json(tiny_llava: VLMAdapter, make_image, tmp_path: Path) -> None:
    from safetensors import safe_open

    items = vqa_items(make_image)
    with pytest.warns(UserWarning, match="none is left, so Imp falls back to c̄"):
        run(NeuronAttributionCallback(heads=[(0, 0, -1.0), (1, 1, 0.0)], task="vqa", idf=None, output_dir=tmp_path), tiny_llava, [{"items": items}])
    positive = NeuronAttributionCallback(heads=[(0, 0, 0.5), (1, 1, 0.25)], task="vqa", idf=None, output_dir=tmp_path)
    run(positive, tiny_llava, [{"items": items}])
    with safe_open(str(tmp_path / "importance.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["heads"]) == [[0, 0], [1, 1]] and json.loads(meta["head_deltas"]) == [0.5, 0.25]
