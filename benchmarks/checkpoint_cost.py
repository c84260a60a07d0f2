"""Cost of one mid-split accumulator checkpoint as a retrieval masking pass goes on.

    python benchmarks/checkpoint_cost.py                           # 11 NDCG@5 metrics, batches of 16 candidates
    python benchmarks/checkpoint_cost.py --at 100 1000 3000 --metrics 11 --batch 16
    python benchmarks/checkpoint_cost.py --smoke                   # tiny sizes (the test suite runs this)

A masking pass over retrieval keeps one NDCG@k metric per selection: 9 in ``analyze.py``'s
mask stage (base and 8 methods), 11 in a ``scripts/random_spread.py`` pass with 8 draws (base,
HONES, the seeded random bank, 8 draws; the default here). Each metric's candidates are list
states that gain one element per batch, and ``AccumulatorCheckpoint`` writes every metric
state every ``checkpoint_every_n_batches`` batches (10 in the toy configs). This script feeds
synthetic batches into metrics that keep one tensor per batch (``merge_after=None``; NDCG
now merges its lists every 64 batches by default, which also bounds the first layout) and,
after ``--at`` batches, times ``save_metric_states`` with the list states written element
by element (the layout before) and concatenated into one tensor per state (the layout
now): the median of ``--repeats`` writes, the file size and the number of
tensors in it. It also checks that both files restore to metrics whose ``compute()`` equals
the original's, and after one more batch still does.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hones.attribution.checkpoint import read_metric_states, restore_metric_states, save_metric_states  # noqa: E402
from hones.metrics import build_metric  # noqa: E402


def feed(metrics: nn.ModuleDict, batch: int, step: int, generator: torch.Generator) -> None:
    """One batch of ``batch`` candidates (50 per image, 1 positive) into every metric."""
    for metric in metrics.values():
        scores = torch.randn(batch, generator=generator)
        item = torch.arange(step * batch, (step + 1) * batch)
        metric.update(scores, (item % 50 == 0).long(), item // 50)


def time_save(path: Path, metrics: nn.ModuleDict, concatenate: bool, repeats: int) -> float:
    """Median seconds of ``repeats`` checkpoint writes."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        save_metric_states(path, {"masking": metrics}, {"batches": 0}, concatenate_lists=concatenate)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def check_restore(path: Path, metrics: nn.ModuleDict, make: Callable[[], nn.Module], batch: int, step: int) -> None:
    """The file at ``path`` restores to metrics equal to ``metrics``, before and after one more batch."""
    restored = nn.ModuleDict({name: make() for name in metrics})
    tensors, layout, _ = read_metric_states(path)
    restore_metric_states({"masking": restored}, tensors, layout)
    original = copy.deepcopy(metrics)
    for when in ("restored", "after one more batch"):
        for name in metrics:
            if float(restored[name].compute()) != float(original[name].compute()):
                raise AssertionError(f"{path.name}: {name} differs from the original ({when})")
        feed(restored, batch, step, torch.Generator().manual_seed(step))
        feed(original, batch, step, torch.Generator().manual_seed(step))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--at", type=int, nargs="+", default=[100, 1000, 3000], help="batches fed before each timing")
    parser.add_argument("--metrics", type=int, default=11, help="NDCG metrics (selections) in the pass (random_spread.py with 8 draws: 11)")
    parser.add_argument("--batch", type=int, default=16, help="candidates per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: --at 5 20 --metrics 3 --repeats 1")
    args = parser.parse_args(argv)
    if args.smoke:
        args.at, args.metrics, args.repeats = [5, 20], 3, 1
    torch.manual_seed(0)

    def make() -> nn.Module:
        # Unmerged per-batch lists, as before NDCG merged them every 64 batches (its
        # ``merge_after``): the worst case for the element-by-element layout.
        return build_metric("retrieval", "paper", merge_after=None)

    metrics = nn.ModuleDict({f"selection{i}": make() for i in range(args.metrics)})
    generator = torch.Generator().manual_seed(0)
    fed = 0
    print(f"{args.metrics} NDCG@5 metrics, {args.batch} candidates per batch, median of {args.repeats} writes")
    print("batches | element by element: s, MiB, tensors | concatenated: s, MiB, tensors | speed-up")
    with tempfile.TemporaryDirectory() as tmp:
        for target in sorted(args.at):
            while fed < target:
                feed(metrics, args.batch, fed, generator)
                fed += 1
            row = []
            for concatenate in (False, True):
                path = Path(tmp) / f"{'cat' if concatenate else 'elements'}.safetensors"
                seconds = time_save(path, metrics, concatenate, args.repeats)
                check_restore(path, metrics, make, args.batch, fed)
                tensors = len(read_metric_states(path)[0])
                row.append((seconds, path.stat().st_size / 2**20, tensors))
            (t_old, mib_old, n_old), (t_new, mib_new, n_new) = row
            print(
                f"{fed:7d} | {t_old:8.3f} s {mib_old:7.2f} MiB {n_old:7d} | "
                f"{t_new:8.3f} s {mib_new:7.2f} MiB {n_new:5d} | {t_old / t_new:6.1f}x"
            )
    print("restored metrics equal the originals (both layouts, before and after one more batch)")


if __name__ == "__main__":
    main()
