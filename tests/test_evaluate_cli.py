"""``evaluate.py``: every shipped evaluation / trainer config parses, the task switch moves the
data and the run directory, and a run from a clean checkout (no toy world yet) writes the
metrics (both modes, headline mode named), the predictions and TensorBoard scalars."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from eval_fixtures import MAX_NEW_TOKENS, REPO, load_evaluate, save_tiny_llava

EVAL_CONFIGS = sorted((REPO / "configs" / "toy").glob("eval*.yaml")) + sorted((REPO / "configs" / "eval").glob("*.yaml"))
TRAINER_CONFIGS = sorted((REPO / "configs" / "trainer").glob("*.yaml"))
OOD_DATA = sorted((REPO / "configs" / "eval" / "data").glob("*.yaml"))
HUB_IDS = {"llava-1.5-7b.yaml": "llava-hf/llava-1.5-7b-hf", "qwen2.5-vl-7b.yaml": "Qwen/Qwen2.5-VL-7B-Instruct"}


@pytest.fixture(scope="module")
def evaluate():
    return load_evaluate()


def test_shipped_configs_are_found() -> None:
    names = {path.name for path in EVAL_CONFIGS}
    assert {"eval.yaml", "eval_qwen2_5_vl.yaml", "llava-1.5-7b.yaml", "qwen2.5-vl-7b.yaml"} <= names
    assert {"eval_ood_gqa.yaml", "eval_ood_textvqa.yaml", "eval_ood_flickr30k.yaml"} <= names
    assert {path.name for path in OOD_DATA} == {"gqa.yaml", "textvqa.yaml", "flickr30k.yaml"}
    assert any(path.name.startswith("slurm_") for path in TRAINER_CONFIGS)


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_eval_config_parses(evaluate, path: Path) -> None:
    config = evaluate.read_config(["--config", str(path)])
    assert config.data.task == config.model.task
    assert config.trainer.use_distributed_sampler is False
    run_dir = config.model.output_dir
    assert "{" not in run_dir and run_dir.endswith(f"{config.data.dataset}-{config.data.split}/{config.model.task}")
    assert config.trainer.logger.init_args.save_dir == run_dir
    if path.name in HUB_IDS:  # the paper's models: bf16 on several GPUs over NCCL
        assert config.model.model == HUB_IDS[path.name] and config.model.dtype == "bf16"
        assert config.trainer.accelerator == "gpu" and config.trainer.devices > 1
        assert config.trainer.strategy.init_args.process_group_backend == "nccl"
    else:  # toy: CPU, generated on first use
        assert config.trainer.accelerator == "cpu" and config.data.toy_world == {"dir": "toyworld_data"}
        assert config.data.annotation_file.startswith("toyworld_data/")


def test_task_switch_moves_data_and_run_dir(evaluate) -> None:
    config = evaluate.read_config(["--config", str(REPO / "configs/toy/eval.yaml"), "--model.task", "ocr"])
    assert config.model.task == config.data.task == "ocr"
    assert config.model.output_dir == "runs/eval/toy-llava/coco_unified-test/ocr"
    assert config.trainer.logger.init_args.save_dir == config.model.output_dir


@pytest.mark.parametrize("path", OOD_DATA, ids=lambda p: p.name)
def test_ood_data_sections_replace_the_dataset(evaluate, path: Path) -> None:
    task = {"gqa.yaml": "vqa", "textvqa.yaml": "ocr", "flickr30k.yaml": "retrieval"}[path.name]
    args = ["--config", str(REPO / "configs/eval/llava-1.5-7b.yaml"), "--model.task", task, "--data", str(path)]
    config = evaluate.read_config(args)
    assert config.data.dataset == path.stem and config.data.split_file is None and config.data.task == task
    assert config.model.output_dir == f"runs/eval/llava-1.5-7b/{path.stem}-test/{task}"
    assert config.data.batch_size == 16  # the model config's loader settings are kept


def _analyze_parser():
    spec = importlib.util.spec_from_file_location("hones_analyze_script", REPO / "analyze.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


@pytest.mark.parametrize("path", TRAINER_CONFIGS, ids=lambda p: p.name)
def test_trainer_configs_fit_both_entry_points(evaluate, path: Path) -> None:
    config = evaluate.read_config(["--config", str(REPO / "configs/toy/eval.yaml"), "--trainer", str(path)])
    assert config.trainer.num_nodes >= 1 and config.trainer.use_distributed_sampler is False
    if not (REPO / "analyze.py").exists():
        pytest.skip("analyze.py is not in this checkout")
    parsed = _analyze_parser().parse_args(["all", "--config", str(REPO / "configs/analyze/toy_llava.yaml"), "--trainer", str(path)])
    assert parsed.all.trainer.devices == config.trainer.devices
    assert parsed.all.trainer.num_nodes == config.trainer.num_nodes


def test_launcher_topology(evaluate) -> None:
    assert evaluate.launcher_topology({}) is None
    env = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}
    assert evaluate.launcher_topology(env) == (4, 2)
    assert evaluate.launcher_topology({**env, "WORLD_SIZE": "6"}) is None


@pytest.mark.parametrize("devices, quiet", [(1, True), ("1", True), ("auto", False), (2, False)])
def test_match_launcher_keeps_a_matching_config_quietly(evaluate, capsys: pytest.CaptureFixture[str], devices: object, quiet: bool) -> None:
    """``--trainer.devices 1`` parses as the string "1": it matches a 1-process-per-node torchrun too."""
    from jsonargparse import Namespace

    trainer = Namespace(devices=devices, num_nodes=2)
    evaluate.EvalCLI._match_launcher(trainer, 1, 2)
    assert (trainer.devices, trainer.num_nodes) in ((1, 2), ("1", 2))
    assert ("launched by torchrun" not in capsys.readouterr().err) == quiet


def test_default_subcommand(evaluate) -> None:
    assert evaluate.with_default_subcommand(["--config", "x.yaml"]) == ["test", "--config", "x.yaml"]
    assert evaluate.with_default_subcommand(["validate", "--config", "x.yaml"]) == ["validate", "--config", "x.yaml"]
    assert evaluate.with_default_subcommand(["--help"]) == ["--help"]
    assert evaluate.with_default_subcommand([]) == ["test", "--help"]


def test_run_from_a_clean_checkout(evaluate, tmp_path: Path) -> None:
    """No toy world yet: prepare_data generates it (small settings), then the run writes its artifacts."""
    model_dir = save_tiny_llava(tmp_path / "model")
    world = tmp_path / "toyworld_data"
    toy_world = {"dir": str(world), "n_train": 0, "n_discovery": 0, "n_dev": 0, "n_test": 3, "n_ood": 0}
    out = tmp_path / "runs" / "{dataset}-{split}" / "{task}"
    evaluate.main([  # no subcommand: test
        "--config", str(REPO / "configs/toy/eval.yaml"),
        "--model.model", str(model_dir),
        "--model.task", "ocr",
        "--model.max_new_tokens", str(MAX_NEW_TOKENS),
        "--model.output_dir", str(out),
        "--data.toy_world", json.dumps(toy_world),
        "--data.annotation_file", str(world / "coco/unified.json"),
        "--data.image_root", str(world / "coco/images"),
        "--data.split_file", str(world / "splits/test.json"),
        "--data.cache_dir", str(tmp_path / "hf_cache"),
        "--trainer.logger.init_args.save_dir", str(out),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ])  # fmt: skip
    assert (world / "toyworld.json").exists()
    run_dir = tmp_path / "runs" / "coco_unified-test" / "ocr"
    metrics = json.loads((run_dir / "metrics_test.json").read_text())
    assert metrics["task"] == "ocr" and metrics["headline_mode"] == "paper" and metrics["num_items"] == 3
    assert set(metrics["metrics"]) == {"anls/paper", "anls/official"}
    assert metrics["metric"] == metrics["metrics"]["anls/paper"]
    rows = [json.loads(line) for line in (run_dir / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all({"uid", "prediction", "references"} <= set(row) for row in rows)
    events = list((run_dir / "tb").rglob("events.out.tfevents.*"))
    assert events and list((run_dir / "tb").rglob("config.yaml"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"test/ocr/anls/paper", "test/ocr/anls/official"} <= set(tags)


def test_bad_data_is_one_line_or_counted_in_the_results(evaluate, tmp_path: Path) -> None:
    """Strict: a bad item stops the run with one line naming it and the lenient way on. Lenient: the
    item is skipped and the count is in metrics_test.json beside the metric."""
    from eval_fixtures import eval_args, write_tiny_world

    world = write_tiny_world(tmp_path / "world", n_discovery=1, n_test=3)
    annotation = world / "coco" / "unified.json"
    data = json.loads(annotation.read_text())
    test_ids = {str(i) for i in json.loads((world / "splits" / "test.json").read_text())}
    bad = next(row for row in data["data"] if str(row["image_id"]) in test_ids)
    bad["vqa"]["answer"] = " "
    annotation.write_text(json.dumps(data))
    model_dir = save_tiny_llava(tmp_path / "model")
    args = eval_args(model_dir, world, tmp_path / "out", "vqa", 2, tmp_path / "cache")
    with pytest.raises(SystemExit) as stop:
        evaluate.main(args)
    message = str(stop.value.code)
    assert message.startswith("evaluate.py: ") and "\n" not in message
    assert f"image_id={bad['image_id']}" in message and "vqa.answer" in message and "--data.lenient true" in message
    evaluate.main([*args, "--data.lenient", "true"])
    results = json.loads((tmp_path / "out" / "metrics_test.json").read_text())
    assert results["num_items"] == 2 and results["skipped"] == {"total": 1, "reasons": {"vqa.answer: empty answer": 1}}


@pytest.mark.parametrize("damage", ["no weights", "cut-short weights", "no config", "malformed config"])
def test_a_broken_model_folder_is_one_line(evaluate, tmp_path: Path, damage: str) -> None:
    """A model folder with a missing or damaged file stops the run with one line naming the folder."""
    from eval_fixtures import eval_args, write_tiny_world

    world = write_tiny_world(tmp_path / "world", n_discovery=1, n_test=2)
    model_dir = save_tiny_llava(tmp_path / "model")
    if damage == "no weights":
        (model_dir / "model.safetensors").unlink()
    elif damage == "cut-short weights":
        with open(model_dir / "model.safetensors", "r+b") as handle:
            handle.truncate(100)
    elif damage == "no config":
        (model_dir / "config.json").unlink()
    else:
        (model_dir / "config.json").write_text('{"model_type": "llava",')
    with pytest.raises(SystemExit) as stop:
        evaluate.main(eval_args(model_dir, world, tmp_path / "out", "vqa", 2, tmp_path / "cache"))
    message = str(stop.value.code)
    assert message.startswith(f"evaluate.py: {model_dir}: cannot load the model: ") and "\n" not in message, message


@pytest.mark.parametrize("flag, value", [("--model.dtype", "fp64"), ("--model.task", "vqa2"), ("--model.metric_mode", "strict")])
def test_a_wrong_choice_is_refused_while_parsing(evaluate, capsys: pytest.CaptureFixture[str], flag: str, value: str) -> None:
    """hones/choices.py: refused by the parser (before a model loads), naming the value."""
    with pytest.raises(SystemExit):
        evaluate.read_config(["--config", str(REPO / "configs/toy/eval.yaml"), flag, value])
    assert value in capsys.readouterr().err
