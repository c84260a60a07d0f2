"""What the selected neurons write toward the target in the intact model (HONES_METHOD §3).

For each run folder ``<output_root>/<model>/<task>/`` and each selection ``bank_<method>.json``
in it, prints the mean write-in contribution c̄ of the selected neurons (from the run's
``importance.safetensors``, key ``mean_contribution``: c̄ over the discovery split) and the
fraction with c̄ < 0, i.e. neurons that, on average, write *against* the target. HONES ranks
by the positive part of c̄ − c̄^h, so it can select such neurons; zeroing them removes
nothing the intact model uses for the target.

    python scripts/bank_write_in.py runs/analyze/toy-llava-5pct/vqa runs/analyze/toy-qwen2_5_vl-5pct/vqa
    python scripts/bank_write_in.py runs/analyze/toy-llava-5pct/*   # every task of a model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hones.attribution.bank import load_matrices, read_bank  # noqa: E402


def bank_write_in(run_dir: Path) -> list[tuple[str, int, float, float]]:
    """``(method, neurons, mean c̄, fraction with c̄ < 0)`` per ``bank_<method>.json`` of ``run_dir``."""
    matrices_path = run_dir / "importance.safetensors"
    if not matrices_path.is_file():
        raise FileNotFoundError(f"{matrices_path}: missing; run `analyze.py neurons` for this run first")
    matrices = load_matrices(matrices_path)
    if "mean_contribution" not in matrices:
        raise KeyError(f"{matrices_path}: no 'mean_contribution' matrix (found: {', '.join(sorted(matrices))})")
    mean = matrices["mean_contribution"].double()
    rows = []
    for path in sorted(run_dir.glob("bank_*.json")):
        bank = read_bank(path, mean.shape[0], mean.shape[1])
        if not bank:
            continue
        values = [float(mean[entry.layer, entry.neuron]) for entry in bank]
        rows.append((path.stem.removeprefix("bank_"), len(values), sum(values) / len(values), sum(v < 0 for v in values) / len(values)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders <output_root>/<model>/<task>")
    args = parser.parse_args(argv)
    print("| run | selection | neurons | mean c̄ | c̄ < 0 |\n|---|---|---:|---:|---:|")
    for run_dir in args.runs:
        if not run_dir.is_dir() or not (run_dir / "importance.safetensors").is_file():
            print(f"bank_write_in.py: {run_dir}: not a run folder with importance.safetensors", file=sys.stderr)
            return 2
        for method, count, mean, negative in bank_write_in(run_dir):
            print(f"| {run_dir.parent.name}/{run_dir.name} | {method} | {count} | {mean:.4f} | {100 * negative:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
