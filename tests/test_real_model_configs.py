"""The real-model configs (LLaVA-1.5-7B, Qwen2.5-VL-7B) run end to end, on CPU.

``benchmarks/bench_gpu_7b.py --smoke --save DIR`` writes a random model of the real class
with tiny sizes (the ``--save`` without ``--smoke`` writes the 7B shapes that
``scripts/gpu_checks.sh`` (STEPS=real7b) runs on a GPU). Here the shipped 7B configs
(``configs/analyze/*-7b.yaml``, ``configs/steering/llava-1.5-7b_vqa.yaml``) are pointed at
that folder and a tiny toy world, with only the hardware and the sizes overridden, so that
a setting of those configs that no longer parses or runs is caught without a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from eval_fixtures import subprocess_env

from hones.data.toyworld import ToyWorldConfig, generate_world

ROOT = Path(__file__).resolve().parents[1]
WORLD = ToyWorldConfig(seed=0, n_train=0, n_discovery=4, n_dev=4, n_test=4, n_ood=3)
CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]

pytestmark = pytest.mark.slow


def run(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=subprocess_env()
    )
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, WORLD, force=True)
    return out


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``random_model(arch)``: the smoke-size random model folder of ``arch``, written once per module."""
    folders: dict[str, Path] = {}

    def folder(arch: str) -> Path:
        if arch not in folders:
            out = tmp_path_factory.mktemp(arch) / "model"
            run(str(ROOT / "benchmarks/bench_gpu_7b.py"), "--smoke", "--arch", arch, "--save", str(out), cwd=out.parent)
            folders[arch] = out
        return folders[arch]

    return folder


def toy_data_args(world: Path) -> list[str]:
    return [
        "--data.annotation_file", str(world / "coco" / "unified.json"),
        "--data.image_root", str(world / "coco" / "images"), "--data.num_workers", "0",
    ]  # fmt: skip


@pytest.mark.parametrize(("arch", "config"), [("llava", "llava-1.5-7b"), ("qwen2_5_vl", "qwen2.5-vl-7b")])
def test_analyze_config_runs_on_a_random_model_of_the_class(
    arch: str, config: str, world: Path, random_model: Callable[[str], Path], tmp_path: Path
) -> None:
    model = random_model(arch)
    architectures = json.loads((model / "config.json").read_text())["architectures"]
    assert architectures == [{"llava": "LlavaForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}[arch]]
    out = run(
        str(ROOT / "analyze.py"), "all", "--config", str(ROOT / "configs/analyze" / f"{config}.yaml"),
        "--model", str(model), "--model_name", "random", "--tasks", "[vqa]", *toy_data_args(world),
        "--discovery.split_file", str(world / "splits/discovery.json"), "--discovery.limit", "4",
        "--test.split_file", str(world / "splits/test.json"), "--test.limit", "4",
        "--heads.utility", "teacher_forced", "--heads.max_new_tokens", "2", "--masking.max_new_tokens", "2",
        *CPU, "--trainer.enable_progress_bar", "false", "--output_root", str(tmp_path / "runs"),
        cwd=tmp_path,
    )  # fmt: skip
    run_dir = tmp_path / "runs" / "random" / "vqa"
    assert "vqa mask: ran" in out
    bank = json.loads((run_dir / "bank_hones.json").read_text())
    assert len(bank) == 14  # the config's 1% of the smoke model's 4 x 352 neurons
    heads = json.loads((run_dir / "heads.json").read_text())
    assert heads["top_k"] == 16 and len(heads["selected"]) == 16  # |H*| = 30 or 25, capped at 4 x 4 heads
    masking = json.loads((run_dir / "masking.json").read_text())
    assert {"hones", "random", "activation", "write_in", "grad_x_act"} <= set(masking["methods"])


def test_steering_config_compares_on_a_random_llava(world: Path, random_model: Callable[[str], Path], tmp_path: Path) -> None:
    model = random_model("llava")
    bank = tmp_path / "bank.json"
    bank.write_text(json.dumps([{"layer": 1, "neuron": 5, "score": 1.0, "rank": 0}, {"layer": 3, "neuron": 7, "score": 0.5, "rank": 1}]))
    steer = tmp_path / "steer"
    run(
        str(ROOT / "train.py"), "compare", "--config", str(ROOT / "configs/steering/llava-1.5-7b_vqa.yaml"),
        "--model.model", str(model), "--model.bank", str(bank), "--model.max_new_tokens", "2",
        "--model.output_dir", str(steer), "--trainer.logger.init_args.save_dir", str(steer),
        *toy_data_args(world), "--data.split_file", str(world / "splits/dev.json"), "--data.limit", "4",
        *CPU, "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
        "--compare.output_dir", str(steer / "compare"), "--compare.methods", "[base, hones]",
        "--compare.test_split_file", str(world / "splits/test.json"), "--compare.test_limit", "4",
        "--compare.ood.annotation_file", str(world / "gqa/questions.json"),
        "--compare.ood.image_root", str(world / "gqa/images"), "--compare.ood.limit", "3",
        cwd=tmp_path,
    )  # fmt: skip
    summary = json.loads((steer / "compare" / "summary.json").read_text())
    assert [row["method"] for row in summary["methods"]] == ["base", "hones"]
    assert all(isinstance(row["test"], float) and isinstance(row["ood"], float) for row in summary["methods"])
    scales = json.loads((steer / "compare" / "hones" / "scales.json").read_text())
    assert [(entry["layer"], entry["neuron"]) for entry in scales] == [(1, 5), (3, 7)]
