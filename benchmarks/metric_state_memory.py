"""Resident memory of NDCG@5's candidate states over a long retrieval masking pass.

    python benchmarks/metric_state_memory.py                      # 11 metrics, 3,125 batches of 16 candidates
    python benchmarks/metric_state_memory.py --batches 938 --metrics 9
    python benchmarks/metric_state_memory.py --smoke               # tiny sizes (the test suite runs this)

``scripts/random_spread.py --task retrieval --test.limit 1000`` masks 11 selections over
50,000 candidates in one pass: 3,125 batches of 16, one NDCG@5 metric per selection, each
holding three "cat" list states (scores, labels, groups). Kept as one tensor per batch,
those lists hold 103,125 small tensors by the end, and each costs far more memory than its
16 values. NDCG now concatenates a list once it holds ``merge_after`` (64) tensors. Each
setting runs in its own process and feeds the same synthetic batches; printed: resident
memory (RSS) at the start and every ``--every`` batches, the tensors the states hold, the
seconds spent feeding, and whether both settings compute the same NDCG@5.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def worker(merge: bool, metrics: int, batches: int, batch: int, every: int) -> None:
    """Feeds ``batches`` batches into ``metrics`` NDCG@5 metrics; prints RSS lines and the values."""
    from hones.heap import resident_mib, trim_heap
    from hones.metrics import NDCG

    torch.set_num_threads(1)
    selections = [NDCG(k=5, merge_after=64 if merge else None) for _ in range(metrics)]
    generator = torch.Generator().manual_seed(0)
    gc.collect()
    trim_heap()  # as HeapTrim does in a pass: what remains is what the states hold
    print(f"  batch {0:5d}: rss {resident_mib():7.1f} MiB", flush=True)
    seconds = 0.0
    for step in range(batches):
        item = torch.arange(step * batch, (step + 1) * batch)
        labels = (item % 50 == 0).long()
        for metric in selections:
            scores = torch.randn(batch, generator=generator)
            start = time.perf_counter()
            metric.update(scores, labels, item // 50)
            seconds += time.perf_counter() - start
        if (step + 1) % every == 0 or step + 1 == batches:
            trim_heap()
            held = sum(len(getattr(m, name)) for m in selections for name in ("scores", "labels", "groups"))
            print(f"  batch {step + 1:5d}: rss {resident_mib():7.1f} MiB, {held:6d} tensors held", flush=True)
    values = [float(m.compute()) for m in selections]
    print(f"  update time {seconds:.2f} s; ndcg {' '.join(f'{v:.12f}' for v in values)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metrics", type=int, default=11, help="NDCG metrics (selections; random_spread.py with 8 draws: 11)")
    parser.add_argument("--batches", type=int, default=3125)
    parser.add_argument("--batch", type=int, default=16, help="candidates per batch")
    parser.add_argument("--every", type=int, default=625, help="print RSS every this many batches")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: --metrics 2 --batches 200 --every 100")
    parser.add_argument("--worker", choices=["merged", "unmerged"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.metrics, args.batches, args.every = 2, 200, 100
    if args.worker is not None:
        worker(args.worker == "merged", args.metrics, args.batches, args.batch, args.every)
        return
    values = {}
    for setting in ("unmerged", "merged"):
        label = "one tensor per batch (merge_after=None)" if setting == "unmerged" else "merged every 64 batches (default)"
        print(f"{setting}: {label}; {args.metrics} metrics x {args.batches} batches x {args.batch} candidates", flush=True)
        command = [sys.executable, __file__, "--worker", setting, "--metrics", str(args.metrics), "--batches", str(args.batches),
                   "--batch", str(args.batch), "--every", str(args.every)]  # fmt: skip
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        print(done.stdout, end="", flush=True)
        if done.returncode != 0:
            sys.exit(f"metric_state_memory.py: the '{setting}' worker failed (rc {done.returncode}): {done.stderr[-500:]}")
        values[setting] = done.stdout.rsplit("ndcg ", 1)[1].split()
    print(f"same NDCG@5 in both settings: {values['unmerged'] == values['merged']}")


if __name__ == "__main__":
    main()
