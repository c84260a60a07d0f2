"""``analyze.py`` end to end on a tiny model and a 20-image toy world (HONES_METHOD §2-4).

- ``all`` over the four tasks writes every artifact (heads, scores, importance, the eight
  banks, masking.json/md, state.json, TensorBoard events); AP / MA / APE have HONES' budget;
- a rerun skips every finished stage and leaves the artifacts byte-identical;
- other settings for a finished stage are a clear error; ``--overwrite`` recomputes;
- ``table`` collects the four tasks into one methods × tasks table;
- a pass interrupted mid-split resumes from its checkpoint to byte-identical artifacts;
- every shipped configs/analyze/*.yaml parses.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from hones.attribution.bank import read_bank
from hones.attribution.checkpoint import AccumulatorCheckpoint
from hones.attribution.pipeline import run_analysis
from hones.attribution.settings import METHODS, TASKS, AnalyzeConfig, DataSettings, SplitSettings
from hones.data.toyworld import ToyWorldConfig, generate_world
from hones.models import VLMAdapter, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "analyze" / "toy_llava.yaml"
# 20 images: 4 train, 8 discovery, 8 test
WORLD = ToyWorldConfig(seed=0, n_train=4, n_discovery=8, n_dev=0, n_test=8, n_ood=0)
STAGE_FILES = ("heads.json", "head_scores.safetensors", "importance.safetensors", "masking.json", "masking.md")


def load_script(path: Path, name: str) -> Any:
    """A script of the repository (not a package module), imported as ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_cli() -> Any:
    return load_script(ROOT / "analyze.py", "analyze_cli")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, WORLD, force=True)
    return out


@pytest.fixture(scope="module")
def model_dir(tiny_llava: VLMAdapter, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_pretrained(tiny_llava.model, tiny_llava.processor, tmp_path_factory.mktemp("model") / "tiny-llava")


def cli_args(command: str, world: Path, model_dir: Path, out: Path, *extra: str) -> list[str]:
    """The shipped toy config, pointed at the tiny world and model, with small budgets."""
    return [
        command, "--config", str(CONFIG),
        "--model", str(model_dir), "--model_name", "tiny", "--output_root", str(out),
        "--data.annotation_file", str(world / "coco" / "unified.json"), "--data.image_root", str(world / "coco" / "images"),
        "--data.batch_size", "4",
        "--discovery.split_file", str(world / "splits" / "discovery.json"),
        "--test.split_file", str(world / "splits" / "test.json"), "--test.retrieval_negatives", "5",
        "--heads.retrieval_negatives", "3", "--heads.max_new_tokens", "3", "--masking.max_new_tokens", "3",
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]  # fmt: skip


def contents(path: Path) -> Any:
    """A file's bytes; for safetensors, each tensor's bytes and the metadata (whose key order the writer does not fix)."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    return metadata, {name: (str(t.dtype), tuple(t.shape), t.numpy().tobytes()) for name, t in sorted(tensors.items())}


def snapshot(run_root: Path) -> dict[str, Any]:
    """Every task's artifacts, exactly (state.json and TensorBoard events excluded: timestamps)."""
    return {
        str(path.relative_to(run_root)): contents(path)
        for path in sorted(run_root.glob("*/**/*"))
        if path.is_file() and "tensorboard" not in path.parts and path.name != "state.json"
    }


@pytest.fixture(scope="module")
def full_run(world: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``analyze.py all`` over the four tasks, run once for the module."""
    out = tmp_path_factory.mktemp("runs")
    cli = load_cli()
    assert cli.main(cli_args("all", world, model_dir, out, "--tasks", "vqa,ocr,caption,retrieval")) == 0
    return {"cli": cli, "out": out, "root": out / "tiny", "snapshot": snapshot(out / "tiny")}


# -- end to end ------------------------------------------------------------------------------
def test_all_writes_every_artifact(full_run: dict[str, Any], tiny_llava: VLMAdapter) -> None:
    num_layers, num_heads, ffn = tiny_llava.num_layers, tiny_llava.num_heads, tiny_llava.ffn_width
    budget = round(0.01 * num_layers * ffn)  # §3 top 1%
    for task in TASKS:
        run = full_run["root"] / task
        for name in STAGE_FILES:
            assert (run / name).is_file(), f"{task}: {name} missing"
        heads = json.loads((run / "heads.json").read_text())
        assert heads["top_k"] == 4 and len(heads["selected"]) == 4 and heads["utility"] == "teacher_forced"
        assert {"delta", "intervened"} <= set(heads["heads"][0]) and "baseline" in heads
        scores = load_file(str(run / "head_scores.safetensors"))
        assert scores["delta"].shape == (num_layers, num_heads)
        assert (run / "head_agreement.json").is_file()  # §2: fast utility vs the metric
        matrices = load_file(str(run / "importance.safetensors"))
        assert matrices["importance"].shape == (num_layers, ffn)
        banks = {m: read_bank(run / f"bank_{m}.json", num_layers, ffn) for m in METHODS}
        assert {m: len(b) for m, b in banks.items()} == {m: budget for m in METHODS}  # AP/MA/APE at HONES' budget
        masking = json.loads((run / "masking.json").read_text())
        assert masking["task"] == task and masking["split"] == "test" and list(masking["methods"]) == list(METHODS)
        for row in masking["methods"].values():
            assert row["num_neurons"] == budget
            assert row["drop"] == pytest.approx(row["base"] - row["masked"])
            if row["base"] != 0:
                assert row["relative_drop"] == pytest.approx(100 * (row["base"] - row["masked"]) / abs(row["base"]))
        assert "| HONES |" in (run / "masking.md").read_text()
        state = json.loads((run / "state.json").read_text())
        assert {"heads", "neurons", "ape", *(f"mask/{m}" for m in METHODS)} <= set(state["stages"])
        assert not (run / "partial").exists()  # checkpoints removed once a pass finished

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def tags(stage: str) -> dict[str, list[str]]:  # one TensorBoard run per stage
        folder = full_run["root"] / "vqa" / "tensorboard" / stage
        return EventAccumulator(str(folder), size_guidance={"images": 0, "histograms": 0}).Reload().Tags()

    assert "attribution/vqa/head_delta" in tags("heads")["images"]
    assert "attribution/vqa/neurons_per_layer" in tags("neurons")["images"]
    assert "attribution/vqa/importance" in tags("neurons")["histograms"]
    assert "masking/vqa/hones/masked" in tags("mask")["scalars"]


def test_ape_selects_task_specific_neurons(full_run: dict[str, Any]) -> None:
    """APE banks: each neuron's AP is highest on the task it was selected for; the sets are disjoint."""
    probabilities = {t: load_file(str(full_run["root"] / t / "importance.safetensors"))["stat_activation_probability"] for t in TASKS}
    stacked = torch.stack([probabilities[t] for t in TASKS])
    chosen: set[tuple[int, int]] = set()
    for k, task in enumerate(TASKS):
        for entry in read_bank(full_run["root"] / task / "bank_ape.json"):
            assert int(stacked[:, entry.layer, entry.neuron].argmax()) == k
            chosen.add((entry.layer, entry.neuron))
    assert len(chosen) == sum(len(read_bank(full_run["root"] / t / "bank_ape.json")) for t in TASKS)


def test_rerun_skips_finished_stages(full_run: dict[str, Any], world: Path, model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    args = cli_args("all", world, model_dir, full_run["out"], "--tasks", "vqa,ocr,caption,retrieval")
    assert full_run["cli"].main(args) == 0
    err = capsys.readouterr().err
    assert ": ran" not in err and err.count(": skipped") >= 4 * len(TASKS)
    assert snapshot(full_run["root"]) == full_run["snapshot"]


def test_table_collects_the_four_tasks(full_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert full_run["cli"].main(["table", "--runs", str(full_run["root"])]) == 0
    printed = capsys.readouterr().out
    table = json.loads((full_run["root"] / "masking_table.json").read_text())
    assert table["tasks"] == list(TASKS) and list(table["rows"]) == list(METHODS)
    for method, row in table["rows"].items():
        values = [row[t] for t in TASKS if row[t] is not None]
        assert row["average"] == (pytest.approx(sum(values) / len(values)) if values else None)
    assert "| HONES |" in printed and "average" in printed
    assert (full_run["root"] / "masking_table.md").read_text() in printed + "\n"
    # the output root instead of a model's folder: the message names the model folders there
    assert full_run["cli"].main(["table", "--runs", str(full_run["out"])]) == 2
    assert f"holds the runs of tiny; give one, e.g. --runs {full_run['root']}" in capsys.readouterr().err


def test_changed_settings_are_an_error_and_overwrite_recomputes(
    full_run: dict[str, Any], world: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs"
    shutil.copytree(full_run["out"], out)
    cli = full_run["cli"]
    capsys.readouterr()
    assert cli.main(cli_args("all", world, model_dir, out, "--task", "vqa", "--heads.top_k", "3")) == 2
    err = capsys.readouterr().err
    assert "stage 'heads' was computed with other settings (heads.top_k: 4 -> 3)" in err and "--overwrite" in err
    assert snapshot(out / "tiny") == full_run["snapshot"]  # nothing touched

    # masking settings only: heads and neurons stay valid, every mask stage is recomputed
    extra = ("--task", "vqa", "--masking.methods", "[hones,random]", "--masking.max_new_tokens", "2")
    assert cli.main(cli_args("mask", world, model_dir, out, *extra)) == 2
    # a forgotten stage leaves no stale file behind: masking.json disappears until recomputed
    assert cli.main(cli_args("neurons", world, model_dir, out, "--task", "caption", "--overwrite")) == 0
    assert not (out / "tiny" / "caption" / "masking.json").exists() and not (out / "tiny" / "caption" / "bank_ape.json").exists()
    assert cli.main(cli_args("mask", world, model_dir, out, *extra, "--overwrite", "true")) == 0
    masking = json.loads((out / "tiny" / "vqa" / "masking.json").read_text())
    assert list(masking["methods"]) == ["hones", "random"]
    # TensorBoard: the recomputed stage's curves replace the old ones; the other stages' stay
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = out / "tiny" / "vqa" / "tensorboard"
    mask_events = EventAccumulator(str(board / "mask")).Reload()
    assert [e.value for e in mask_events.Scalars("masking/vqa/hones/masked")] == pytest.approx([masking["methods"]["hones"]["masked"]])
    assert "masking/vqa/activation/masked" not in mask_events.Tags()["scalars"]
    assert (board / "heads").is_dir() and (board / "neurons").is_dir()
    assert (out / "tiny" / "vqa" / "heads.json").read_bytes() == full_run["snapshot"]["vqa/heads.json"]

    capsys.readouterr()
    assert cli.main(cli_args("all", world, model_dir, out, "--task", "vqa", "--heads.top_k", "3", "--overwrite")) == 0
    assert json.loads((out / "tiny" / "vqa" / "heads.json").read_text())["top_k"] == 3
    # the other tasks were computed with K = 4: APE (entropy over the four tasks) waits for them
    assert "the neuron stage of ocr, caption, retrieval used other settings" in capsys.readouterr().err
    assert "ape" not in json.loads((out / "tiny" / "vqa" / "masking.json").read_text())["methods"]
    state = json.loads((out / "tiny" / "vqa" / "state.json").read_text())
    assert state["stages"]["heads"]["fingerprint"]["heads"]["top_k"] == 3


def test_a_changed_model_directory_is_not_reused(
    world: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Results are tied to the model's contents, not only its path (a retrained model is a mismatch)."""
    model = shutil.copytree(model_dir, tmp_path / "model")
    cli = load_cli()
    args = cli_args("heads", world, model, tmp_path / "runs", "--task", "vqa", "--heads.compare_utility", "null")
    assert cli.main(args) == 0
    with open(model / "generation_config.json", "a", encoding="utf-8") as handle:
        handle.write("\n")  # same model, different bytes: counts as another model
    capsys.readouterr()
    assert cli.main(args) == 2
    assert "model_identity" in capsys.readouterr().err


# -- mid-split resume --------------------------------------------------------------------------
class Interrupt(L.Callback):
    """Raises after ``after`` batches of the pass whose checkpoint file stem is ``stage``."""

    def __init__(self, stage: str, after: int) -> None:
        self.stage, self.after = stage, after
        self.resumed_from: dict[str, int] = {}

    @staticmethod
    def _checkpoint(trainer: L.Trainer) -> AccumulatorCheckpoint:
        return next(cb for cb in trainer.callbacks if isinstance(cb, AccumulatorCheckpoint))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        checkpoint = self._checkpoint(trainer)
        self.resumed_from[checkpoint.stem.name] = checkpoint.resumed_from
        if checkpoint.stem.name == self.stage and batch_idx + 1 == self.after:
            raise RuntimeError(f"interrupted {self.stage} after {self.after} batches")


def small_config(world: Path, out: Path, **overrides: Any) -> AnalyzeConfig:
    settings: dict[str, Any] = dict(
        model="tiny-llava",
        model_name="tiny",
        task="caption",
        output_root=str(out),
        checkpoint_every_n_batches=1,
        data=DataSettings(annotation_file=str(world / "coco" / "unified.json"), image_root=str(world / "coco" / "images"), batch_size=2),
        discovery=SplitSettings("discovery", str(world / "splits" / "discovery.json"), None, 0),
        test=SplitSettings("test", str(world / "splits" / "test.json"), None, 5),
    )
    settings.update(overrides)
    config = AnalyzeConfig(**settings)
    config.heads.top_k = 3
    config.masking.methods = ["hones", "random", "write_in"]
    config.masking.max_new_tokens = 3
    config.trainer.enable_progress_bar = False
    return config


def test_interrupted_passes_resume_to_identical_artifacts(world: Path, tiny_llava: VLMAdapter, tmp_path: Path) -> None:
    """Heads, neurons and masking each interrupted after 2 of 4 batches, then resumed: same bytes."""
    factory = lambda: tiny_llava  # noqa: E731
    reference = small_config(world, tmp_path / "reference")
    run_analysis(reference, "all", adapter_factory=factory)

    config = small_config(world, tmp_path / "resumed")
    run_dir = config.run_dir("caption")
    resumed: dict[str, int] = {}
    for stage in ("heads", "neurons", "mask"):
        interrupt = Interrupt(stage, after=2)
        with pytest.raises(RuntimeError, match=f"interrupted {stage}"):
            run_analysis(config, "all", extra_callbacks=[interrupt], adapter_factory=factory)
        assert (run_dir / "partial" / f"{stage}.rank0.safetensors").is_file()
        resumed.update(interrupt.resumed_from)
    watcher = Interrupt("none", after=0)
    outcomes = run_analysis(config, "all", extra_callbacks=[watcher], adapter_factory=factory)
    resumed.update(watcher.resumed_from)
    assert resumed == {"heads": 2, "neurons": 2, "mask": 2}  # each pass went on from its checkpoint
    assert [(o.stage, o.status) for o in outcomes] == [("heads", "skipped"), ("neurons", "skipped"), ("mask", "ran")]
    assert snapshot(tmp_path / "resumed" / "tiny") == snapshot(tmp_path / "reference" / "tiny")


class Terminate(L.Callback):
    """Sends this process SIGTERM at the end of batch ``at`` of the pass whose checkpoint stem is ``stage``."""

    def __init__(self, stage: str, at: int) -> None:
        self.stage, self.at = stage, at

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        import os
        import signal

        if Interrupt._checkpoint(trainer).stem.name == self.stage and batch_idx == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.usefixtures("sigterm_restored")
def test_sigterm_saves_the_batches_seen_and_the_pass_resumes(world: Path, tiny_llava: VLMAdapter, tmp_path: Path) -> None:
    """A SIGTERM in batch 2 of 4 of the neuron pass, with no periodic checkpoint due (period 100):
    the pass stops with exit code 143 after writing a checkpoint of the 2 batches seen, and the
    rerun resumes from it to the artifacts of an uninterrupted run, byte for byte."""
    from hones.attribution.checkpoint import read_metric_states

    factory = lambda: tiny_llava  # noqa: E731
    reference = small_config(world, tmp_path / "reference", checkpoint_every_n_batches=100)
    run_analysis(reference, "all", adapter_factory=factory)

    config = small_config(world, tmp_path / "resumed", checkpoint_every_n_batches=100)
    partial = config.run_dir("caption") / "partial" / "neurons.rank0.safetensors"
    with pytest.raises(SystemExit) as stopped:
        run_analysis(config, "all", extra_callbacks=[Terminate("neurons", at=1)], adapter_factory=factory)
    assert stopped.value.code == 143
    assert read_metric_states(partial)[2]["batches"] == 2
    watcher = Interrupt("none", after=0)
    outcomes = run_analysis(config, "all", extra_callbacks=[watcher], adapter_factory=factory)
    assert watcher.resumed_from["neurons"] == 2
    assert [(o.stage, o.status) for o in outcomes] == [("heads", "skipped"), ("neurons", "ran"), ("mask", "ran")]
    assert snapshot(tmp_path / "resumed" / "tiny") == snapshot(tmp_path / "reference" / "tiny")
    assert not partial.exists()


class SummingTarget(L.Callback):
    """A stand-in attribution callback: sums its validation / test batches into one metric."""

    def __init__(self) -> None:
        from torchmetrics.aggregation import SumMetric

        self.total, self.skip_batches = SumMetric(), 0

    def accumulators(self) -> dict[str, Any]:
        return {"total": self.total}

    def _add(self, batch: Any, batch_idx: int) -> None:
        if batch_idx >= self.skip_batches:
            self.total.update(batch[0].sum())

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self._add(batch, batch_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
        self._add(batch, batch_idx)


@pytest.mark.usefixtures("sigterm_restored")
@pytest.mark.parametrize("entry", ["fit", "validate", "test"])
def test_sigterm_in_validation_and_test_loops_saves_the_batches_seen(entry: str, tmp_path: Path) -> None:
    """Lightning's own evaluation loops stop on SIGTERM after a batch; the checkpoint then holds
    exactly those batches, in validation inside ``fit`` too (its own loop, not ``validate``'s)."""
    import os
    import signal

    from torch.utils.data import DataLoader, TensorDataset

    from hones.attribution.checkpoint import read_metric_states

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer(batch[0]).sum()

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            return None

        def test_step(self, batch: Any, batch_idx: int) -> None:
            return None

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Kill(L.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # type: ignore[no-untyped-def]
            if batch_idx == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        on_test_batch_end = on_validation_batch_end

    loader = DataLoader(TensorDataset(torch.arange(8.0).view(-1, 1)), batch_size=1)  # batch i holds the value i
    target = SummingTarget()
    checkpoint = AccumulatorCheckpoint(target, tmp_path / "partial" / "sums", every_n_batches=100)
    trainer = L.Trainer(
        accelerator="cpu", callbacks=[target, checkpoint, Kill()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_train_batches=1, max_epochs=1,
    )  # fmt: skip
    with pytest.raises(SystemExit):
        if entry == "fit":
            trainer.fit(Module(), loader, loader)
        else:
            getattr(trainer, entry)(Module(), loader)
    tensors, _, meta = read_metric_states(checkpoint.file(0))
    assert meta["batches"] == 3
    assert [float(value) for value in tensors.values()] == [0.0 + 1.0 + 2.0]


def test_a_checkpointed_pass_takes_one_dataloader(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    class Module(L.LightningModule):
        def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            return None

    loader = DataLoader(TensorDataset(torch.arange(4.0).view(-1, 1)), batch_size=1)
    target = SummingTarget()
    checkpoint = AccumulatorCheckpoint(target, tmp_path / "sums", every_n_batches=1)
    trainer = L.Trainer(accelerator="cpu", callbacks=[target, checkpoint], logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="one dataloader; this test pass has 2"):
        trainer.test(Module(), [loader, loader])


def test_sigterm_inside_a_batch_saves_nothing_inconsistent(tmp_path: Path) -> None:
    """If the stop comes before the checkpoint's own batch-end hook (StopOnSigterm placed before it),
    the sums may hold a batch the count does not: nothing is written, with a warning."""
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    target = SimpleNamespace(accumulators=lambda: {})
    checkpoint = AccumulatorCheckpoint(target, tmp_path / "partial" / "neurons", every_n_batches=100)
    progress = SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(processed=4)))
    trainer = SimpleNamespace(predict_loop=progress, global_rank=0, world_size=1)
    checkpoint._in_pass, checkpoint._seen = "predict", 3  # batch 4 stepped, its hooks cut short
    with pytest.warns(UserWarning, match="stopped by SIGTERM inside batch 4"):
        checkpoint.on_exception(trainer, None, SIGTERMException(143))  # type: ignore[arg-type]
    assert not checkpoint.file(0).exists()
    checkpoint.on_exception(trainer, None, RuntimeError("not a SIGTERM"))  # type: ignore[arg-type]
    assert not checkpoint.file(0).exists()


def test_metric_states_round_trip_with_list_states(tmp_path: Path) -> None:
    """Tensor states (VQA accuracy) and list states (NDCG's candidates) survive a checkpoint."""
    from hones.attribution.checkpoint import read_metric_states, restore_metric_states, save_metric_states
    from hones.metrics import build_metric, group_ids

    def fresh() -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict({"ndcg": build_metric("retrieval", "paper"), "vqa": build_metric("vqa", "paper")})

    def feed(metrics: torch.nn.ModuleDict, group: str, answer: str) -> None:
        metrics["ndcg"].update(torch.tensor([0.3, 0.1, 0.9]), torch.tensor([1, 0, 0]), group_ids([group] * 3))
        metrics["vqa"].update([answer], [["red"]])

    original = fresh()
    feed(original, "a", "red")
    save_metric_states(tmp_path / "partial.rank0.safetensors", {"metrics": original}, {"batches": 1})
    restored = fresh()
    tensors, layout, meta = read_metric_states(tmp_path / "partial.rank0.safetensors")
    restore_metric_states({"metrics": restored}, tensors, layout)
    assert meta == {"batches": 1}
    for metrics in (original, restored):
        feed(metrics, "b", "blue")
    for name in ("ndcg", "vqa"):
        assert float(restored[name].compute()) == float(original[name].compute())
    with pytest.raises(ValueError, match="checkpoint holds metrics"):
        restore_metric_states({"other": fresh()}, tensors, layout)


def test_list_states_are_checkpointed_as_one_tensor_each(tmp_path: Path) -> None:
    """NDCG's list states gain one element per batch; the checkpoint holds one tensor per state
    whatever the number of batches, restores to the same metric, and the element-by-element
    layout (files written before) and lists that cannot be concatenated still round-trip."""
    from torchmetrics import Metric

    from hones.attribution.checkpoint import read_metric_states, restore_metric_states, save_metric_states
    from hones.metrics import build_metric

    class Ragged(Metric):
        """List states that stay element by element: "rows" differ past dim 0; "per_update"
        is not reduced by "cat", so its elements may mean something one by one."""

        def __init__(self) -> None:
            super().__init__()
            self.add_state("rows", default=[], dist_reduce_fx="cat")
            self.add_state("per_update", default=[], dist_reduce_fx=None)

        def update(self, width: int) -> None:
            self.rows.append(torch.full((2, width), float(width)))
            self.per_update.append(torch.tensor([float(width), 1.0]))

        def compute(self) -> torch.Tensor:
            return torch.stack([row.sum() for row in self.rows]).sum() + len(self.per_update)

    def fresh() -> torch.nn.ModuleDict:
        return torch.nn.ModuleDict({"ndcg": build_metric("retrieval", "paper"), "ragged": Ragged()})

    def feed(metrics: torch.nn.ModuleDict, batch: int) -> None:
        generator = torch.Generator().manual_seed(batch)
        metrics["ndcg"].update(torch.randn(6, generator=generator), torch.tensor([1, 0, 0, 1, 0, 0]), torch.tensor([2 * batch] * 3 + [2 * batch + 1] * 3))
        metrics["ragged"].update(batch + 1)

    original = fresh()
    for batch in range(7):
        feed(original, batch)
    for concatenate in (True, False):
        file = tmp_path / f"partial_{concatenate}.rank0.safetensors"
        save_metric_states(file, {"m": original}, {"batches": 7}, concatenate_lists=concatenate)
        tensors, layout, _ = read_metric_states(file)
        ndcg_keys = sorted(key for key in tensors if key.startswith("m.ndcg/"))
        if concatenate:
            assert ndcg_keys == ["m.ndcg/groups", "m.ndcg/labels", "m.ndcg/scores"]
            assert layout["m.ndcg"]["states"] == {"scores": "cat", "labels": "cat", "groups": "cat"}
            assert tensors["m.ndcg/scores"].shape == (42,)
        else:
            assert len(ndcg_keys) == 3 * 7
        assert layout["m.ragged"]["states"] == {"rows": 7, "per_update": 7}  # element by element in both layouts
        restored = fresh()
        restore_metric_states({"m": restored}, tensors, layout)
        assert len(restored["ndcg"].scores) == (1 if concatenate else 7)
        expected = fresh()
        for batch in range(9):
            feed(expected, batch)
        for batch in (7, 8):  # the pass goes on after the resume
            feed(restored, batch)
        for name in ("ndcg", "ragged"):
            assert float(restored[name].compute()) == float(expected[name].compute())


def test_shipped_configs_parse() -> None:
    cli = load_cli()
    parser = cli.build_parser()
    for path in sorted((ROOT / "configs" / "analyze").glob("*.yaml")):
        parsed = parser.parse_args(["all", "--config", str(path)])
        config = cli.config_from(parser.instantiate(parsed)["all"])
        assert config.task_list() == list(TASKS), path
        assert config.neurons.top_ratio == 0.01, path  # §3 default
        assert config.test.split == "test" and config.discovery.split == "discovery", path
        assert set(config.masking.methods) == set(METHODS), path


@pytest.mark.slow
def test_command_line_entry_point(world: Path, model_dir: Path, tmp_path: Path) -> None:
    """The script itself, as a user runs it: one task, then the table."""
    args = cli_args("all", world, model_dir, tmp_path, "--task", "vqa", "--masking.methods", "[hones,random]")
    done = subprocess.run([sys.executable, str(ROOT / "analyze.py"), *args], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny/vqa mask: ran" in done.stderr
    table = subprocess.run(
        [sys.executable, str(ROOT / "analyze.py"), "table", "--runs", str(tmp_path / "tiny")], capture_output=True, text=True, timeout=300
    )
    assert table.returncode == 0 and "| HONES |" in table.stdout


def test_random_spread_script(full_run: dict[str, Any], world: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``scripts/random_spread.py``: HONES and N random draws masked in one pass, consistent with masking.json."""
    out = tmp_path / "runs"
    shutil.copytree(full_run["out"], out)
    script = load_script(ROOT / "scripts" / "random_spread.py", "random_spread")
    args = cli_args("all", world, model_dir, out, "--task", "ocr")[1:]  # its parser has no subcommand
    assert script.main([*args, "--draws", "3"]) == 0
    spread = json.loads((out / "tiny" / "ocr" / "random_spread.json").read_text())
    masking = json.loads((out / "tiny" / "ocr" / "masking.json").read_text())
    assert spread["base"] == pytest.approx(masking["methods"]["hones"]["base"])
    assert spread["hones"]["masked"] == pytest.approx(masking["methods"]["hones"]["masked"])  # same bank, same items
    draws = spread["random"]["draws"]
    assert [d["seed"] for d in draws] == [1, 2, 3] and spread["num_draws"] == 3
    masked = [d["masked"] for d in draws]
    assert spread["random"]["mean_masked"] == pytest.approx(sum(masked) / 3)
    assert spread["hones_beats"] == sum(spread["hones"]["masked"] < m for m in masked)
    assert "HONES drops more than" in capsys.readouterr().out
    # other settings than the run's neurons stage: a clear error, nothing written
    (out / "tiny" / "ocr" / "random_spread.json").unlink()
    assert script.main([*args, "--draws", "3", "--neurons.top_ratio", "0.05"]) == 2
    assert "neurons.top_ratio: 0.01 -> 0.05" in capsys.readouterr().err
    assert not (out / "tiny" / "ocr" / "random_spread.json").exists()

    # --test_world: the same banks on the test split of a bigger world with the same settings
    bigger, other = tmp_path / "bigger", tmp_path / "other"
    generate_world(bigger, dataclasses.replace(WORLD, n_train=0, n_test=16), force=True)
    generate_world(other, dataclasses.replace(WORLD, seed=1, n_train=0, n_test=16), force=True)
    assert script.main([*args, "--draws", "2", "--test_world", str(bigger)]) == 0
    wide = json.loads((out / "tiny" / "ocr" / "random_spread_bigger.json").read_text())
    assert wide["test_world"] == str(bigger) and wide["num_items"] > masking["num_items"]
    assert [d["seed"] for d in wide["random"]["draws"]] == [1, 2] and not (out / "tiny" / "ocr" / "random_spread.json").exists()
    assert wide["seeded_random"]["seed"] == 0 and "seeded_random" not in spread
    capsys.readouterr()
    assert script.main([*args, "--draws", "2", "--test_world", str(other)]) == 2
    assert "generated with other settings than the run's world {'seed': (0, 1)}" in capsys.readouterr().err


def test_script_pass_resumes_after_an_interruption(full_run: dict[str, Any], world: Path, model_dir: Path, tmp_path: Path) -> None:
    """The scripts' masking pass (``TaskRun.mask_test_split``) is checkpointed like the stages':
    interrupted after one batch, the same call goes on from there to the same results; other
    banks start over."""
    from hones.attribution.bank import read_bank
    from hones.attribution.pipeline import finished_neurons_run, run_script_parser

    out = tmp_path / "runs"
    shutil.copytree(full_run["out"], out)
    args = cli_args("all", world, model_dir, out, "--task", "ocr", "--checkpoint_every_n_batches", "1")[1:]
    parser = run_script_parser("probe", "")

    def masked(callbacks: list[L.Callback], draws: int = 2) -> dict[str, Any] | None:
        run = finished_neurons_run(parser, parser.parse_args(args), "probe")
        assert run is not None
        run.extra_callbacks = callbacks
        banks = {"hones": read_bank(run.run_dir / "bank_hones.json")}
        banks.update(run.random_draws(banks["hones"], draws))
        return run.mask_test_split(banks, "probe", "test")[0]

    reference = masked([])
    partial = out / "tiny" / "ocr" / "partial" / "probe.rank0.safetensors"
    assert not partial.exists()  # removed once the pass is done
    with pytest.raises(RuntimeError, match="interrupted probe after 1 batches"):
        masked([Interrupt("probe", after=1)])
    assert partial.is_file()
    watcher = Interrupt("none", after=0)
    assert masked([watcher]) == reference
    assert watcher.resumed_from == {"probe": 1} and not partial.exists()
    with pytest.raises(RuntimeError, match="interrupted probe"):
        masked([Interrupt("probe", after=1)])
    watcher = Interrupt("none", after=0)
    masked([watcher], draws=3)  # other banks: the checkpoint is not theirs
    assert watcher.resumed_from == {"probe": 0}


def test_teacher_forced_masking_script(
    full_run: dict[str, Any], world: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``scripts/teacher_forced_masking.py``: every bank of the run plus random draws; the metric agrees with masking.json."""
    out = tmp_path / "runs"
    shutil.copytree(full_run["out"], out)
    script = load_script(ROOT / "scripts" / "teacher_forced_masking.py", "teacher_forced_masking")
    args = cli_args("all", world, model_dir, out, "--task", "vqa")[1:]
    assert script.main([*args, "--draws", "2"]) == 0
    result = json.loads((out / "tiny" / "vqa" / "teacher_forced_masking.json").read_text())
    masking = json.loads((out / "tiny" / "vqa" / "masking.json").read_text())
    assert result["measure"].startswith("mean log p") and result["score_base"] < 0
    assert set(result["selections"]) == set(masking["methods"]) | {"random_seed1", "random_seed2"}
    for method, row in masking["methods"].items():  # same banks, same items: the same masked metric
        assert result["selections"][method]["metric_masked"] == pytest.approx(row["masked"]), method
    for row in result["selections"].values():
        assert row["score_drop"] == pytest.approx(result["score_base"] - row["score_masked"])
    draws = result["random_draws"]
    assert draws["num_draws"] == 3  # the two draws and the run's own random bank
    drops = [result["selections"][name]["score_drop"] for name in ("random_seed1", "random_seed2", "random")]
    assert draws["mean_score_drop"] == pytest.approx(sum(drops) / 3)
    assert draws["hones_beats"] == sum(result["selections"]["hones"]["score_drop"] > d for d in drops)
    assert "random draws: score drop" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main([*args, "--draws", "-1"])
    # other settings than the run's: the way on is the run's settings or analyze.py, not a flag the script lacks
    assert script.main([*args, "--heads.top_k", "2"]) == 2
    err = capsys.readouterr().err
    assert "heads.top_k" in err and "give this script the run's settings" in err and "rerun with --overwrite" not in err
    with pytest.raises(SystemExit):
        script.main([*args, "--overwrite", "true"])


def test_ffn_dependence_script(
    full_run: dict[str, Any], world: Path, model_dir: Path, tiny_llava: VLMAdapter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``scripts/ffn_dependence.py``: every layer's whole FFN masked, then all layers, on the run's test items."""
    script = load_script(ROOT / "scripts" / "ffn_dependence.py", "ffn_dependence")
    out = tmp_path / "runs"
    args = cli_args("all", world, model_dir, out, "--task", "retrieval")[1:]  # NDCG > 0 even for an untrained model
    assert script.main(args) == 0
    result = json.loads((out / "tiny" / "retrieval" / "ffn_dependence.json").read_text())
    masking = json.loads((full_run["root"] / "retrieval" / "masking.json").read_text())
    assert result["base"] == pytest.approx(masking["methods"]["hones"]["base"])  # same test items, same model
    layers, width = tiny_llava.num_layers, tiny_llava.ffn_width
    assert list(result["masks"]) == [f"layer{l}" for l in range(layers)] + ["all_layers"]
    for name, row in result["masks"].items():
        assert row["num_neurons"] == (layers * width if name == "all_layers" else width), name
        assert row["relative_drop"] == pytest.approx(100 * (result["base"] - row["masked"]) / abs(result["base"]))
    assert "all_layers (" in capsys.readouterr().out
    before = (out / "tiny" / "retrieval" / "ffn_dependence.json").read_bytes()
    assert script.main([*args, "--test.limit", "1"]) == 0  # a quick limited rerun: its own file
    limited = json.loads((out / "tiny" / "retrieval" / "ffn_dependence_limit1.json").read_text())
    assert limited["test_limit"] == 1 and limited["num_items"] < result["num_items"]
    assert (out / "tiny" / "retrieval" / "ffn_dependence.json").read_bytes() == before


def test_every_neuron_bank_script(model_dir: Path, tiny_llava: VLMAdapter, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = load_script(ROOT / "scripts" / "every_neuron_bank.py", "every_neuron_bank")
    assert script.main(["--model", str(model_dir), "--out", str(tmp_path / "all.json")]) == 0
    entries = read_bank(tmp_path / "all.json", tiny_llava.num_layers, tiny_llava.ffn_width)
    assert {(e.layer, e.neuron) for e in entries} == {
        (l, i) for l in range(tiny_llava.num_layers) for i in range(tiny_llava.ffn_width)
    }
    assert f"= {tiny_llava.num_layers * tiny_llava.ffn_width} ->" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        script.main(["--model", str(tmp_path / "models" / "missing"), "--out", str(tmp_path / "x.json")])


def test_random_spread_summary() -> None:
    script = load_script(ROOT / "scripts" / "random_spread.py", "random_spread")
    draws = [{"seed": 1, "masked": 0.5}, {"seed": 2, "masked": 0.7}, {"seed": 3, "masked": 0.6}]
    summary = script.spread_summary(0.8, 0.6, draws)
    assert summary["random"]["mean_masked"] == pytest.approx(0.6)
    assert summary["random"]["sd_masked"] == pytest.approx(0.1)
    assert summary["hones"]["relative_drop"] == pytest.approx(25.0)
    assert (summary["hones_beats"], summary["ties"]) == (1, 1)


def test_bank_write_in_script(full_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """``scripts/bank_write_in.py``: one row per selection; the write-in selection (top c̄) has the largest mean c̄."""
    script = load_script(ROOT / "scripts" / "bank_write_in.py", "bank_write_in")
    rows = {method: (count, mean, negative) for method, count, mean, negative in script.bank_write_in(full_run["root"] / "vqa")}
    assert set(rows) == set(METHODS)
    top = rows["write_in"][1]
    assert all(mean <= top + 1e-12 for _, mean, _ in rows.values())
    # by hand: c̄ of each bank's neurons, read straight from the run's importance.safetensors
    run = full_run["root"] / "vqa"
    mean_contribution = load_file(str(run / "importance.safetensors"))["mean_contribution"].double()
    layers, ffn = mean_contribution.shape
    for method in METHODS:
        bank = read_bank(run / f"bank_{method}.json", layers, ffn)
        values = mean_contribution[[e.layer for e in bank], [e.neuron for e in bank]]
        expected = (len(bank), float(values.mean()), float((values < 0).double().mean()))
        assert rows[method] == pytest.approx(expected, rel=1e-12, abs=1e-15), method
    negatives = [negative for _, _, negative in rows.values()]
    assert rows["write_in"][2] == 0.0 and max(negatives) > 0.0  # some selection writes against the target
    assert script.main([str(run)]) == 0
    assert "| tiny/vqa | hones |" in capsys.readouterr().out
    assert script.main([str(full_run["root"])]) == 2  # not a run folder


def test_overlapping_discovery_and_test_splits_stop_the_run(
    world: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Neurons found on images of the test split would be verified on them: one line, nothing run."""
    cli = load_cli()
    args = cli_args("all", world, model_dir, tmp_path / "runs", "--task", "vqa", "--test.split_file", str(world / "splits" / "discovery.json"))
    assert cli.main(args) == 2
    assert "the discovery and test splits are the same file" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_bad_test_item_stops_all_before_the_discovery_stages(
    world: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``all`` loads the test split first: a strict load error there costs no heads or neurons pass."""
    records = json.loads((world / "coco" / "unified.json").read_text())
    test_ids = set(json.loads((world / "splits" / "test.json").read_text()))
    bad = next(record for record in records["data"] if record["image_id"] in test_ids and record.get("vqa"))
    bad["vqa"]["question"] = ""
    annotations = tmp_path / "unified.json"
    annotations.write_text(json.dumps(records))
    cli = load_cli()
    args = cli_args("all", world, model_dir, tmp_path / "runs", "--task", "vqa", "--data.annotation_file", str(annotations),
                    "--data.image_root", str(world / "coco" / "images"))  # fmt: skip
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert str(bad["image_id"]) in err and "heads (§2)" not in err
    assert not (tmp_path / "runs" / "tiny" / "vqa" / "state.json").exists()
    # the way on the error names: the item is skipped, and masking.json counts it
    assert cli.main([*args, "--data.lenient", "true", "--masking.methods", "[hones]"]) == 0
    masking = json.loads((tmp_path / "runs" / "tiny" / "vqa" / "masking.json").read_text())
    assert masking["skipped"] == {"total": 1, "reasons": {"vqa.question: empty question": 1}}, masking.get("skipped")


def test_a_regenerated_split_file_is_another_setting(world: Path, tmp_path: Path) -> None:
    """Stage fingerprints hold the annotation and split files' digests: the same path with other
    contents does not reuse a finished stage."""
    from hones.attribution.settings import fingerprint_differences, stage_fingerprint

    split = tmp_path / "test.json"
    shutil.copy(world / "splits" / "test.json", split)
    config = small_config(world, tmp_path / "runs", test=SplitSettings("test", str(split), None, 5))
    before = stage_fingerprint(config, "vqa", "mask/hones")
    assert before == stage_fingerprint(config, "vqa", "mask/hones")
    split.write_text(json.dumps(json.loads(split.read_text())[1:]))
    assert fingerprint_differences(before, stage_fingerprint(config, "vqa", "mask/hones"))[0].startswith("test.data_files.split_file: ")
    assert stage_fingerprint(config, "vqa", "neurons") == {k: v for k, v in before.items() if k not in ("method", "test", "masking")}


def test_a_bank_edited_after_its_stage_is_not_masked(
    full_run: dict[str, Any], world: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """masking.json must describe the selections the run made: a bank file changed since the
    neurons stage wrote it stops ``mask`` with one line (the unchanged copy is skipped as done)."""
    out = tmp_path / "runs"
    shutil.copytree(full_run["root"], out / "tiny")
    cli = full_run["cli"]
    args = cli_args("mask", world, model_dir, out, "--task", "vqa")
    assert cli.main(args) == 0 and "already done" in capsys.readouterr().err
    bank = out / "tiny" / "vqa" / "bank_activation.json"
    original = bank.read_bytes()
    bank.write_text(json.dumps({"0": [1, 2], "3": [5]}))
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"{bank}: changed since the neurons stage wrote it" in err and "--overwrite" in err
    bank.write_bytes(original)  # restored: accepted again; then the APE bank, recorded by its own stage
    assert cli.main(args) == 0
    capsys.readouterr()
    ape = out / "tiny" / "vqa" / "bank_ape.json"
    ape.write_text(json.dumps({"0": [1]}))
    assert cli.main(args) == 2
    assert f"{ape}: changed since the APE stage wrote it" in capsys.readouterr().err


def test_an_output_root_that_cannot_be_written_stops_the_run_first(
    world: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No pass runs whose results could not be kept."""
    taken = tmp_path / "runs"
    taken.write_text("a file, not a folder")
    assert load_cli().main(cli_args("all", world, model_dir, taken, "--task", "vqa")) == 2
    err = capsys.readouterr().err
    assert f"{taken / 'tiny' / 'vqa'}: cannot write results there" in err and "heads (§2)" not in err


def test_stage_by_stage_on_a_fresh_toy_world(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``heads`` generates the toy world (its data files did not exist when its fingerprint was
    taken); ``neurons`` then reuses that stage instead of finding other digests."""
    world = tmp_path / "toyworld_data"
    toy = json.dumps({"dir": str(world), "n_train": 0, "n_discovery": 4, "n_dev": 0, "n_test": 2, "n_ood": 0})
    args = ["--config", str(CONFIG), "--model", str(model_dir), "--model_name", "tiny", "--output_root", str(tmp_path / "runs"),
            "--task", "vqa", "--data.toy_world", toy, "--data.annotation_file", str(world / "coco" / "unified.json"),
            "--data.image_root", str(world / "coco" / "images"), "--discovery.split_file", str(world / "splits" / "discovery.json"),
            "--test.split_file", str(world / "splits" / "test.json"), "--heads.max_new_tokens", "3",
            "--trainer.enable_progress_bar", "false"]  # fmt: skip
    cli = load_cli()
    assert cli.main(["heads", *args]) == 0 and (world / "coco" / "unified.json").is_file()
    assert cli.main(["neurons", *args]) == 0, capsys.readouterr().err
    state = json.loads((tmp_path / "runs" / "tiny" / "vqa" / "state.json").read_text())
    assert state["stages"]["neurons"]["fingerprint"]["data"]["data_files"]["annotation_file"] is not None


@pytest.mark.parametrize("field", ["discovery", "test"])
@pytest.mark.parametrize("limit", [0, -3])
def test_a_limit_below_one_is_refused(field: str, limit: int) -> None:
    """0 or a negative limit used to load the whole split."""
    from hones.data.datamodule import HonesDataModule

    config = AnalyzeConfig()
    with pytest.raises(ValueError, match=rf"{field}.limit must be >= 1"):
        dataclasses.replace(config, **{field: dataclasses.replace(getattr(config, field), limit=limit)})
    with pytest.raises(ValueError, match="limit must be >= 1"):
        HonesDataModule("coco_unified", "a.json", "vqa", limit=limit)


def test_a_broken_model_folder_stops_analyze_in_one_line(
    world: Path, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    (broken / "config.json").unlink()
    assert load_cli().main(cli_args("heads", world, broken, tmp_path / "runs", "--task", "vqa")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"analyze.py heads: {broken}: cannot load the model: "), err[-3:]
