"""Resident memory of a long CPU masking pass with and without ``HeapTrim`` (``hones/heap.py``).

    python benchmarks/heap_growth.py                                  # toy Qwen2.5-VL, retrieval, 40 images
    python benchmarks/heap_growth.py --config configs/analyze/toy_llava.yaml --images 40

Each setting runs in its own process: the masking pass of ``analyze.py``'s mask stage
(``TaskRun.mask_test_split``) on the run's retrieval test split, ``--images`` images x 50
candidates, masking the run's HONES bank and ``--draws`` random draws in one pass (as
``scripts/random_spread.py`` does). Printed per setting: resident memory (RSS) at the
start of the pass and every ``--every`` batches, the peak RSS of the process, and the
wall time. "off" gives the Trainer a ``HeapTrim`` that never fires (the user's own
``HeapTrim`` replaces the default one); "on" is the default (every 10 batches).
Needs a finished ``analyze.py all`` run of the config (the banks). The growth without
trimming depends on the allocator's history, so it varies between runs and machines.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb() -> int:
    """This process's resident memory in whole MiB."""
    from hones.heap import resident_mib

    return int(resident_mib())


def worker(config: str, images: int, draws: int, trim: bool, every: int) -> None:
    """One masking pass; prints ``rss <batch> <MiB>`` lines and a ``peak`` / ``wall`` line."""
    from lightning.pytorch.callbacks import Callback

    from hones.attribution.bank import read_bank
    from hones.attribution.pipeline import finished_neurons_run, run_script_parser
    from hones.heap import HeapTrim

    class Report(Callback):
        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):  # type: ignore[no-untyped-def]
            if batch_idx % every == 0:
                print(f"  batch {batch_idx:5d}: rss {rss_mb()} MiB", flush=True)

    parser = run_script_parser("heap_growth.py", "")
    args = ["--config", config, "--task", "retrieval", "--test.limit", str(images), "--trainer.enable_progress_bar", "false"]
    run = finished_neurons_run(parser, parser.parse_args(args), "heap_growth.py")
    if run is None:
        sys.exit(1)
    run.extra_callbacks = [Report()] + ([] if trim else [HeapTrim(every_n_batches=10**9)])
    banks = {"hones": read_bank(run.run_dir / "bank_hones.json")}
    banks.update(run.random_draws(banks["hones"], draws))
    start = time.perf_counter()
    run.mask_test_split(banks, "heap_growth", f"{len(banks)} selections, HeapTrim {'on' if trim else 'off'}")
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"  end: rss {rss_mb()} MiB, peak {peak} MiB, wall {wall:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/analyze/toy_qwen2_5_vl.yaml")
    parser.add_argument("--images", type=int, default=40, help="retrieval test images (50 candidates each)")
    parser.add_argument("--draws", type=int, default=9, help="random draws masked beside HONES in the same pass")
    parser.add_argument("--every", type=int, default=30, help="print RSS every this many batches")
    parser.add_argument("--worker", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.config, args.images, args.draws, args.worker == "on", args.every)
        return
    for setting in ("off", "on"):
        print(f"HeapTrim {setting}: {args.config}, retrieval, {args.images} images, HONES + {args.draws} draws", flush=True)
        command = [sys.executable, __file__, "--worker", setting, "--config", args.config, "--images", str(args.images),
                   "--draws", str(args.draws), "--every", str(args.every)]  # fmt: skip
        done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        print(done.stdout, end="", flush=True)
        if done.returncode != 0:
            last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no error output"
            sys.exit(f"heap_growth.py: the '{setting}' worker failed (rc {done.returncode}): {last}")


if __name__ == "__main__":
    main()
