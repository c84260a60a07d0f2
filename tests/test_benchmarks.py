"""The benchmark scripts still run and their optimised paths still agree with the straightforward loop.

Smoke runs only (tiny sizes, a few items): no figure is checked here; the figures live in
``benchmarks/README.md`` and come from the scripts' own output.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=ROOT, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_bench_attribution_smoke() -> None:
    out = run(
        "benchmarks/bench_attribution.py", "--model", "tiny", "--items", "2", "--batch-size", "2", "--rows-per-forward", "8",
        "--metric-items", "1", "--max-new-tokens", "2", "--memory-items", "4", "8",
    )  # fmt: skip
    assert "# machine:" in out and "device cpu" in out
    # every stage compares the two paths: heads (teacher-forced), heads (metric), neurons
    assert out.count("outputs allclose") == 3 and "allclose (atol 1e-4): True" in out and "allclose (atol 1e-6): True" in out
    assert "outputs allclose (atol 1e-4 x max|Imp|" in out and out.count("): True") >= 3
    assert out.count("counted GFLOP per item: straightforward") == 3
    assert "peak RSS 8 vs 4 items:" in out


@pytest.mark.slow
def test_bench_gpu_7b_smoke() -> None:
    out = run("benchmarks/bench_gpu_7b.py", "--smoke")
    assert "heads (§2)" in out and "neurons (§3)" in out


def test_checkpoint_cost_smoke() -> None:
    """Both checkpoint layouts restore to equal metrics; the concatenated one holds 3 tensors per NDCG metric."""
    out = run("benchmarks/checkpoint_cost.py", "--smoke")
    rows = [line.split("|") for line in out.splitlines() if "|" in line and line.split("|")[0].strip().isdigit()]
    assert [int(row[0]) for row in rows] == [5, 20]
    assert [int(row[1].split()[-1]) for row in rows] == [3 * 3 * 5, 3 * 3 * 20]  # element by element: grows
    assert [int(row[2].split()[-1]) for row in rows] == [3 * 3, 3 * 3]  # concatenated: 3 metrics x 3 states
    assert "restored metrics equal the originals" in out


def test_metric_state_memory_smoke() -> None:
    """Merged states hold fewer tensors than one per batch and compute the same NDCG@5."""
    out = run("benchmarks/metric_state_memory.py", "--smoke")
    held = [int(line.split(",")[-1].split()[0]) for line in out.splitlines() if "tensors held" in line]
    assert held[:2] == [2 * 3 * 100, 2 * 3 * 200]  # one tensor per batch: grows
    assert all(count < 2 * 3 * 64 for count in held[2:]) and len(held) == 4  # merged every 64 batches
    assert "same NDCG@5 in both settings: True" in out


def test_bench_attribution_refuses_cuda_without_a_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_attribution.py", "--device", "cuda", "--skip-speed", "--memory-items"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=ENV,
    )  # fmt: skip
    assert done.returncode != 0 and "--device cuda: no CUDA device" in done.stderr


def test_sdpa_flop_formula_counts_grouped_key_value_heads() -> None:
    """The benchmarks' SDPA formula: torch's own count with equal heads, and GQA as repeated KV heads."""
    from test_analyze_cli import load_script
    from torch.utils.flop_counter import sdpa_flop_count

    sdpa_flops = load_script(ROOT / "benchmarks" / "bench_attribution.py", "bench_attribution").sdpa_flops

    assert sdpa_flops((2, 8, 5, 16), (2, 8, 7, 16), (2, 8, 7, 16)) == sdpa_flop_count((2, 8, 5, 16), (2, 8, 7, 16), (2, 8, 7, 16))
    # 28 query heads over 4 KV heads (Qwen2.5-VL-7B) cost what 28 repeated KV heads cost
    grouped = sdpa_flops((1, 28, 9, 128), (1, 4, 9, 128), (1, 4, 9, 128))
    assert grouped == sdpa_flop_count((1, 28, 9, 128), (1, 28, 9, 128), (1, 28, 9, 128)) == 2 * 2 * 28 * 9 * 9 * 128
