"""Cross-task analyses (HONES_METHOD §4): overlap groups, Jaccard, layer counts,
cross-ablation, logit lens, and the driver's PNG + TensorBoard + JSON/markdown outputs."""

from __future__ import annotations

import dataclasses

import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from hones import io
from hones.analysis.cross_ablation import cross_ablation, masked_metrics
from hones.attribution.reports import relative_drop
from hones.analysis.layer_preference import layer_counts, layer_counts_table
from hones.analysis.logit_lens import lens_logits, logit_lens, residual_stream, token_label, top_delta_tokens
from hones.analysis.overlap import OverlapGroup, jaccard_matrix, neuron_set, overlap_groups
from hones.analysis.run import (
    DataConfig,
    EvaluationConfig,
    LogitLensConfig,
    build_parser,
    main,
    run_cross_task_analysis,
    split_datamodule,
)
from hones.attribution.bank import BankEntry, BankError, write_bank
from hones.data.toyworld import ToyWorldConfig, generate_world
from hones.models import save_pretrained

TASKS = ["vqa", "ocr", "caption", "retrieval"]
REPO = Path(__file__).resolve().parents[1]


def bank(neurons: list[tuple[int, int]]) -> list[BankEntry]:
    return [BankEntry(layer, neuron, float(len(neurons) - k), k) for k, (layer, neuron) in enumerate(neurons)]


# Hand-made banks: (1, 3) is general, (0, 2) vqa+ocr, (0, 1) vqa+retrieval, (2, 5) ocr only,
# (3, 0) caption only, (1, 7) ocr+caption+retrieval.
HAND = {
    "vqa": bank([(0, 1), (0, 2), (1, 3)]),
    "ocr": bank([(0, 2), (1, 3), (2, 5), (1, 7)]),
    "caption": bank([(1, 3), (3, 0), (1, 7)]),
    "retrieval": bank([(1, 3), (0, 1), (1, 7)]),
}


# -- overlap -------------------------------------------------------------------------------------
def test_overlap_groups_exact_membership() -> None:
    sets = {task: neuron_set(entries) for task, entries in HAND.items()}
    groups = overlap_groups(sets)
    by_name = {g.name: g for g in groups}
    assert len(groups) == 15
    assert [g.kind for g in groups].count("task-specific") == 4
    assert [g.kind for g in groups].count("pair") == 6
    assert [g.kind for g in groups].count("triple") == 4
    assert [g.kind for g in groups].count("general") == 1
    union = set().union(*sets.values())
    assert sum(g.size for g in groups) == len(union) == 6
    assert by_name["vqa+ocr+caption+retrieval"].neurons == {(1, 3)}
    assert by_name["vqa+ocr"].neurons == {(0, 2)}
    assert by_name["vqa+retrieval"].neurons == {(0, 1)}
    assert by_name["ocr"].neurons == {(2, 5)}
    assert by_name["caption"].neurons == {(3, 0)}
    assert by_name["ocr+caption+retrieval"].neurons == {(1, 7)}
    assert by_name["vqa"].size == 0 and by_name["caption+retrieval"].size == 0
    # groups are disjoint
    seen: set[tuple[int, int]] = set()
    for group in groups:
        assert not (group.neurons & seen)
        seen |= group.neurons
    layer_dict = by_name["ocr+caption+retrieval"].layer_dict()
    assert list(layer_dict) == [1] and layer_dict[1].tolist() == [7]


def test_jaccard_hand_case() -> None:
    sets = {task: neuron_set(entries) for task, entries in HAND.items()}
    matrix = jaccard_matrix(sets)
    assert matrix.shape == (4, 4)
    assert torch.allclose(matrix.diagonal(), torch.ones(4, dtype=torch.float64))
    # vqa {01, 02, 13} vs ocr {02, 13, 25, 17}: 2 shared of 5
    assert matrix[0, 1].item() == pytest.approx(2 / 5)
    # caption {13, 30, 17} vs retrieval {13, 01, 17}: 2 of 4
    assert matrix[2, 3].item() == pytest.approx(2 / 4)
    assert torch.equal(matrix, matrix.T)
    assert math.isnan(jaccard_matrix({"a": set(), "b": set()})[0, 1].item())


def test_layer_counts_and_table() -> None:
    counts = layer_counts(HAND, num_layers=4)
    assert counts.tolist() == [[2, 1, 0, 0], [1, 2, 1, 0], [0, 2, 0, 1], [1, 2, 0, 0]]
    data, markdown = layer_counts_table(TASKS, counts)
    assert data["counts"]["ocr"] == [1, 2, 1, 0] and data["totals"]["ocr"] == 4
    assert markdown.splitlines()[0] == "| layer | vqa | ocr | caption | retrieval |"
    assert markdown.splitlines()[-1] == "| total | 3 | 4 | 3 | 3 |"


def test_relative_drop() -> None:
    assert relative_drop(0.5, 0.4) == pytest.approx(20.0)
    assert relative_drop(-0.5, -0.6) == pytest.approx(20.0)
    assert relative_drop(0.5, 0.6) == pytest.approx(-20.0)
    assert relative_drop(0.0, 0.3) is None


# -- data + model fixtures -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, ToyWorldConfig(seed=0, n_train=0, n_discovery=0, n_dev=0, n_test=3, n_ood=0))
    return out


def tiny_data(world: Path) -> DataConfig:
    return DataConfig(
        annotation_file=str(world / "coco/unified.json"),
        image_root=str(world / "coco/images"),
        split_file=str(world / "splits/test.json"),
        limit=2,
        n_neg=3,
        batch_size=8,
    )


def random_banks(num_layers: int, ffn_width: int, seed: int = 0) -> dict[str, list[BankEntry]]:
    """Four banks of 6 neurons: a shared general neuron, a vqa+retrieval pair, the rest random."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randperm(num_layers * ffn_width, generator=generator)[:20].tolist()
    neurons = [(p // ffn_width, p % ffn_width) for p in picks]
    general, pair = neurons[0], neurons[1]
    own = {task: neurons[2 + 4 * t : 6 + 4 * t] for t, task in enumerate(TASKS)}
    return {
        task: bank([general, *([pair] if task in ("vqa", "retrieval") else []), *own[task]])
        for task in TASKS
    }


# -- cross-ablation ----------------------------------------------------------------------------------
def test_cross_ablation_drop_per_group_and_task(tiny_llava, world: Path) -> None:
    adapter = tiny_llava
    data = tiny_data(world)
    modules = {task: split_datamodule(adapter, task, data) for task in ("retrieval", "vqa")}
    banks = random_banks(adapter.num_layers, adapter.ffn_width)
    sets = {task: neuron_set(banks[task]) for task in modules}
    groups = overlap_groups(sets)  # retrieval, vqa, retrieval+vqa (pair + general neuron)
    empty = OverlapGroup(("retrieval", "vqa"), frozenset(), "pair")
    batches = {task: list(module.test_dataloader()) for task, module in modules.items()}
    result = cross_ablation(adapter, batches, [*groups, empty], max_new_tokens=4, skip_empty=False)
    assert result.relative_drop.shape == (len(groups) + 1, 2)
    assert result.masked.shape == (len(groups) + 1, 2)
    assert result.num_items == {"retrieval": 2 * (1 + 3), "vqa": 2}
    base_retrieval = float(result.base[0])
    assert base_retrieval > 0  # NDCG@5 over 4 candidates always ranks the positive in the top 5
    for g in range(len(groups) + 1):
        drop = float(result.relative_drop[g, 0])
        assert math.isfinite(drop)
        for t in range(2):
            base, masked = float(result.base[t]), float(result.masked[g, t])
            if base == 0:
                assert math.isnan(float(result.relative_drop[g, t]))
            else:
                assert float(result.relative_drop[g, t]) == pytest.approx(100.0 * (base - masked) / abs(base))
    # the empty group, actually run (skip_empty=False): nothing masked, exactly no drop
    assert float(result.masked[-1, 0]) == base_retrieval
    assert float(result.relative_drop[-1, 0]) == 0.0
    assert result.skipped == [False] * (len(groups) + 1)
    # ... and skipped (skip_empty=True): recorded as base, drop 0
    skipped = cross_ablation(adapter, {"retrieval": batches["retrieval"]}, [empty], max_new_tokens=4)
    assert skipped.skipped == [True] and float(skipped.relative_drop[0, 0]) == 0.0
    # JSON / markdown forms
    as_json = result.to_json()
    assert [row["group"] for row in as_json["groups"]] == [*(g.name for g in groups), "retrieval+vqa"]
    assert result.markdown().count("\n") == len(groups) + 1 + 3


def test_masked_metrics_applies_the_mask(tiny_llava, world: Path) -> None:
    """A mask changes the scored outputs (Yes/No margins); an empty mask changes nothing."""
    adapter = tiny_llava
    module = split_datamodule(adapter, "retrieval", tiny_data(world))
    everything = {layer: torch.arange(adapter.ffn_width) for layer in range(adapter.num_layers)}
    rows: dict[str, list[dict]] = {}
    masks = {"all": everything, "none": {}}
    values, count = masked_metrics(adapter, module.test_dataloader(), "retrieval", masks, rows_out=rows)
    assert count == 8 and set(rows) == {"base", "all", "none"}
    assert values["none"] == values["base"]
    assert [r["score"] for r in rows["none"]] == [r["score"] for r in rows["base"]]
    assert [r["score"] for r in rows["all"]] != [r["score"] for r in rows["base"]]
    with pytest.raises(ValueError, match="reserved"):
        masked_metrics(adapter, [], "retrieval", {"base": {}})


# -- logit lens --------------------------------------------------------------------------------------
def test_logit_lens_shapes_and_zero_delta(adapter, make_image) -> None:
    batch = adapter.encode([make_image(0), make_image(1)], ["What colour is the square?", "Describe the image."])
    num_layers, vocab = adapter.num_layers, adapter.unembedding().shape[0]
    nothing = logit_lens(adapter, batch, {})
    assert nothing.baseline.shape == nothing.masked.shape == (2, num_layers, vocab)
    assert torch.equal(nothing.delta, torch.zeros_like(nothing.delta))
    # the last layer's lens is the model's own next-token logits
    assert torch.allclose(nothing.baseline[:, -1], nothing.model_logits, atol=1e-4)
    masked_layer = num_layers - 2
    lens = logit_lens(adapter, batch, {masked_layer: torch.arange(0, adapter.ffn_width, 3)})
    delta = lens.delta
    assert torch.equal(delta[:, :masked_layer], torch.zeros_like(delta[:, :masked_layer]))
    assert delta[:, masked_layer:].abs().amax() > 0
    values, ids = top_delta_tokens(delta[0], k=5)
    assert values.shape == ids.shape == (num_layers, 5)
    assert torch.equal(values, delta[0].gather(-1, ids))
    hidden, _ = residual_stream(adapter, adapter.encode([make_image(0)], ["Describe the image."]))
    assert hidden.shape == (1, num_layers, adapter.hidden_size)
    assert lens_logits(adapter, hidden).shape == (1, num_layers, vocab)


class FakeTokenizer:
    texts = {1: " yes", 2: "\x06", 3: "\ufffd", 4: " ", 5: "", 6: "a|b\n"}
    raw = {3: "<0xE2>", 5: ""}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.texts[ids[0]]

    def convert_ids_to_tokens(self, token_id: int) -> str:
        return self.raw[token_id]


def test_token_label_is_printable() -> None:
    labels = [token_label(FakeTokenizer(), i) for i in range(1, 7)]
    assert labels == ["␣yes", "\\x06", "<0xE2>", "␣", "<5>", "a|b↵"]


# -- driver: every figure as PNG + TensorBoard image, every table as JSON + markdown -------------------
def event_image_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    accumulator.Reload()
    return set(accumulator.Tags()["images"])


def write_banks(root: Path, banks: dict[str, list[BankEntry]]) -> Path:
    for task, entries in banks.items():
        write_bank(root / task / "bank_hones.json", entries)
    return root


def test_run_writes_every_figure_and_table(tiny_llava, world: Path, tmp_path: Path) -> None:
    adapter = tiny_llava
    root = write_banks(tmp_path / "analyze", random_banks(adapter.num_layers, adapter.ffn_width))
    out = tmp_path / "analysis"
    summary = run_cross_task_analysis(
        model="tiny-llava",
        banks=str(root),
        tasks=TASKS,
        data=tiny_data(world),
        out_dir=str(out),
        evaluation=EvaluationConfig(max_new_tokens=3),
        logit_lens=LogitLensConfig(examples_per_task=1, top_k=3),
        adapter=adapter,
    )
    expected_figures = {
        "layer_preference",
        "overlap_groups",
        "jaccard",
        "cross_ablation",
        *(f"logit_lens_{task}_0" for task in TASKS),
    }
    assert set(summary["figures"]) == expected_figures
    for name in expected_figures:
        with Image.open(out / "figures" / f"{name}.png") as image:
            assert image.format == "PNG" and image.size[0] > 100
    assert event_image_tags(out / "tensorboard") == {f"figures/{name}" for name in expected_figures}
    expected_tables = {"layer_counts", "overlap_groups", "jaccard", "cross_ablation", "logit_lens"}
    assert set(summary["tables"]) == expected_tables
    for name in expected_tables:
        assert io.read_json(out / "tables" / f"{name}.json")
        assert (out / "tables" / f"{name}.md").read_text().lstrip().startswith(("|", "#"))
    ablation = io.read_json(out / "tables" / "cross_ablation.json")
    nonempty = [g for g in io.read_json(out / "tables" / "overlap_groups.json")["groups"] if g["size"] > 0]
    assert {g["group"] for g in nonempty} == {
        "vqa", "ocr", "caption", "retrieval", "vqa+retrieval", "vqa+ocr+caption+retrieval"
    }  # fmt: skip
    assert len(ablation["groups"]) == 15 and set(ablation["groups"][0]["relative_drop"]) == set(TASKS)
    lens = io.read_json(out / "tables" / "logit_lens.json")
    assert [e["task"] for e in lens["examples"]] == TASKS
    assert all(len(e["layers"]) == adapter.num_layers and len(e["layers"][0]) == 3 for e in lens["examples"])
    assert io.read_json(out / "analysis.json")["union_size"] == 1 + 1 + 4 * 4
    # a rerun replaces the event file instead of adding a second one
    run_cross_task_analysis(
        banks=str(root), tasks=["vqa"], data=tiny_data(world), out_dir=str(out),
        evaluation=EvaluationConfig(enabled=False), logit_lens=LogitLensConfig(enabled=False), adapter=adapter,
    )  # fmt: skip
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    # ... and its results: no cross-ablation or lens output of the first run stays beside the second's
    assert not (out / "tables" / "cross_ablation.json").exists() and not (out / "figures" / "logit_lens_vqa_0.png").exists()
    assert io.read_json(out / "analysis.json")["tasks"] == ["vqa"]
    # bad data stops a rerun before anything of the folder's last run is touched
    from hones.data.errors import DataError

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2")
    with pytest.raises(DataError, match="broken.json"):
        run_cross_task_analysis(
            banks=str(root), tasks=["vqa"], data=dataclasses.replace(tiny_data(world), annotation_file=str(broken)),
            out_dir=str(out), adapter=adapter,
        )  # fmt: skip
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_missing_bank_names_the_file(tiny_llava, tmp_path: Path) -> None:
    with pytest.raises(BankError, match="vqa/bank_hones.json"):
        run_cross_task_analysis(banks=str(tmp_path), tasks=["vqa"], out_dir=str(tmp_path / "o"), adapter=tiny_llava)


# -- configs + CLI ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((REPO / "configs" / "analysis").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path: Path) -> None:
    parser = build_parser()
    config = parser.instantiate(parser.parse_args(["--config", str(path)]))
    assert isinstance(config.data, DataConfig) and config.data.split == "test"
    assert set(config.tasks) == set(TASKS)
    assert config.banks and config.out_dir and Path(config.model).name in config.out_dir


def test_cli_runs_from_yaml(tiny_llava, world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = save_pretrained(tiny_llava.model, tiny_llava.processor, tmp_path / "model")
    root = write_banks(tmp_path / "analyze", random_banks(tiny_llava.num_layers, tiny_llava.ffn_width, seed=1))
    data = tiny_data(world)
    config = tmp_path / "analysis.yaml"
    config.write_text(
        f"model: {model_dir}\nbanks: {root}\ntasks: [vqa, caption]\nout_dir: {tmp_path / 'out'}\n"
        f"data:\n  annotation_file: {data.annotation_file}\n  image_root: {data.image_root}\n"
        f"  split_file: {data.split_file}\n  limit: 1\n"
        "evaluation:\n  max_new_tokens: 2\nlogit_lens:\n  mask: specific\n"
    )
    assert main(["--config", str(config), "--logit_lens.top_k", "2"]) == 0
    summary = io.read_json(tmp_path / "out" / "analysis.json")
    assert summary["tasks"] == ["vqa", "caption"] and summary["logit_lens"]["top_k"] == 2
    assert summary["data"]["limit"] == 1 and "cross_ablation" in summary["figures"]
    # a bank of another model: one line and status 2, no traceback
    bad = tmp_path / "bad_banks"
    shutil.copytree(root, bad)
    (bad / "vqa" / "bank_hones.json").write_text('[{"layer": 9, "neuron": 0, "score": 1.0, "rank": 0}]')
    assert main(["--config", str(config), "--banks", str(bad)]) == 2
    assert "layer 9 out of range" in capsys.readouterr().err


def test_hooks_as_a_jsonargparse_subcommand(monkeypatch: pytest.MonkeyPatch) -> None:
    """How ``analyze.py analysis`` wires it: ``add_subcommand("analysis", build_parser())`` and
    ``run_from_namespace``, with the namespace instantiated by the outer parser or not."""
    from jsonargparse import ArgumentParser

    import hones.analysis.run as run

    outer = ArgumentParser(prog="analyze.py")
    outer.add_subcommands(dest="command").add_subcommand("analysis", build_parser())
    config = str(REPO / "configs" / "analysis" / "toy_llava.yaml")
    parsed = outer.parse_args(["analysis", "--config", config, "--data.limit", "3", "--tasks", "[vqa, ocr]"])
    sub = build_parser()
    monkeypatch.setattr(run, "run_cross_task_analysis", lambda **kwargs: kwargs)
    for namespace in (parsed.analysis, outer.instantiate(parsed).analysis):
        kwargs = run.run_from_namespace(sub, namespace)
        assert isinstance(kwargs["data"], DataConfig) and kwargs["data"].limit == 3
        assert isinstance(kwargs["logit_lens"], LogitLensConfig) and kwargs["tasks"] == ["vqa", "ocr"]
        assert "config" not in kwargs


def test_analyze_py_exposes_the_analysis_subcommand() -> None:
    """`analyze.py analysis --config ...` parses the shipped analysis configs."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("analyze_cli", root / "analyze.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("toy_llava", "toy_qwen2_5_vl"):
        parsed = module.build_parser().parse_args(["analysis", "--config", str(root / "configs" / "analysis" / f"{name}.yaml")])
        assert parsed.command == "analysis"
        assert parsed.analysis.model == f"models/toy-{name.removeprefix('toy_')}"


def test_an_output_folder_that_cannot_be_written_is_named(tiny_llava, world: Path, tmp_path: Path) -> None:
    from hones.io import OutputError

    taken = tmp_path / "taken"
    taken.write_text("a file")
    root = write_banks(tmp_path / "analyze", random_banks(tiny_llava.num_layers, tiny_llava.ffn_width))
    with pytest.raises(OutputError, match=rf"{taken / 'out'}: cannot write results there"):
        run_cross_task_analysis(banks=str(root), tasks=["vqa"], data=tiny_data(world), out_dir=str(taken / "out"), adapter=tiny_llava)
