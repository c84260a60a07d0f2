"""Compare two analyze.py runs of the same model: heads, score matrices, banks, masking.

    python scripts/compare_runs.py runs/analyze/toy-llava /tmp/gpu/analyze/toy-llava
    python scripts/compare_runs.py RUN_A RUN_B --tasks vqa ocr --check --rtol 1e-5

RUN_A and RUN_B are ``<output_root>/<model_name>`` folders, e.g. a CPU and a GPU run, or a
1-process and a 2-process run. For each task found in both, it prints:

- heads: whether H* and the full ranking agree (``heads.json``);
- each score matrix in both (``head_scores*.safetensors``, ``importance.safetensors``): the
  largest absolute difference, relative to the largest absolute value in RUN_A;
- each neuron bank (``bank_*.json``): the same neurons in the same order, the same set in
  another order, or which neurons differ, with their scores, so that a swap at the cut-off
  between two near-equal scores can be told from a real disagreement;
- masking (``masking.json``): each method's masked metric in both runs.

A file present in one run only is reported, not skipped. With ``--check`` the exit status is
1 when H* or a bank's set differs, or a matrix's relative difference exceeds ``--rtol``;
otherwise the script only reports.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hones import io  # noqa: E402
from hones.attribution.bank import BankEntry, read_bank  # noqa: E402
from hones.attribution.reports import read_masking_report  # noqa: E402


def head_order(run: Path) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """``(H*, full ranking)`` of a task folder's ``heads.json``, as (layer, head) pairs."""
    data = io.read_json(run / "heads.json")
    try:
        ranking = [(int(h["layer"]), int(h["head"])) for h in data["heads"]]
        selected = [(int(layer), int(head)) for layer, head in data["selected"]]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{run / 'heads.json'}: expected 'heads' [{{layer, head, ...}}] and 'selected' [[layer, head]] ({error!r})") from None
    return selected, ranking


def matrix_differences(a: Path, b: Path) -> list[tuple[str, float, float]]:
    """``(name, max |a - b|, max |a|)`` for every tensor in both files (NaN where shapes differ)."""
    ta, tb = io.load_tensors(a), io.load_tensors(b)
    rows = []
    for name in sorted(set(ta) | set(tb)):
        if name not in ta or name not in tb:
            rows.append((f"{name} (in {'A' if name in ta else 'B'} only)", math.nan, math.nan))
        elif ta[name].shape != tb[name].shape:
            rows.append((f"{name} (shapes {list(ta[name].shape)} vs {list(tb[name].shape)})", math.nan, math.nan))
        else:
            x, y = ta[name].double(), tb[name].double()
            both = x.isfinite() & y.isfinite()
            if not bool((x.isfinite() == y.isfinite()).all()):
                rows.append((f"{name} (non-finite entries differ)", math.nan, math.nan))
                continue
            diff = float((x - y)[both].abs().max()) if bool(both.any()) else 0.0
            scale = float(x[both].abs().max()) if bool(both.any()) else 0.0
            rows.append((name, diff, scale))
    return rows


def bank_difference(a: list[BankEntry], b: list[BankEntry]) -> tuple[str, bool]:
    """A one-line verdict on two banks and whether their sets of neurons agree."""
    ka, kb = [(e.layer, e.neuron) for e in a], [(e.layer, e.neuron) for e in b]
    if ka == kb:
        return "same neurons, same order", True
    set_a, set_b = set(ka), set(kb)
    if set_a == set_b:
        return "same neurons, another order", True
    only_a = [e for e, key in zip(a, ka) if key not in set_b]
    only_b = [e for e, key in zip(b, kb) if key not in set_a]
    last_a = a[-1].score if a else math.nan

    def show(entries: list[BankEntry]) -> str:
        return ", ".join(f"L{e.layer}/{e.neuron} ({e.score:.6g})" for e in entries)

    return f"{len(only_a)} differ: A only {show(only_a)}; B only {show(only_b)}; A's last score {last_a:.6g}", False


def compare_task(a: Path, b: Path, rtol: float) -> bool:
    """Print the comparison of one task's folders; True when nothing fails ``--check``."""
    ok = True
    if (a / "heads.json").is_file() and (b / "heads.json").is_file():
        (sel_a, rank_a), (sel_b, rank_b) = head_order(a), head_order(b)
        same_set = set(sel_a) == set(sel_b)
        ok &= same_set
        print(f"  heads: H* {'equal' if sel_a == sel_b else 'same set' if same_set else 'DIFFER'} {sel_a}"
              + ("" if same_set else f" vs {sel_b}") + f"; full ranking {'equal' if rank_a == rank_b else 'differs'}")  # fmt: skip
    else:
        print(f"  heads: heads.json in {'neither' if not (a / 'heads.json').is_file() and not (b / 'heads.json').is_file() else 'one run only'}")
    for name in sorted({p.name for p in a.glob("*.safetensors")} | {p.name for p in b.glob("*.safetensors")}):
        if not (a / name).is_file() or not (b / name).is_file():
            print(f"  {name}: in {'A' if (a / name).is_file() else 'B'} only")
            continue
        for tensor, diff, scale in matrix_differences(a / name, b / name):
            relative = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
            bad = math.isnan(diff) or relative > rtol
            ok &= not bad
            print(f"  {name}:{tensor}: max |A-B| {diff:.3g}, max |A| {scale:.3g}, relative {relative:.3g}" + ("  <- over --rtol" if bad else ""))
    for name in sorted({p.name for p in a.glob("bank_*.json")} | {p.name for p in b.glob("bank_*.json")}):
        if not (a / name).is_file() or not (b / name).is_file():
            print(f"  {name}: in {'A' if (a / name).is_file() else 'B'} only")
            continue
        verdict, same = bank_difference(read_bank(a / name), read_bank(b / name))
        ok &= same
        print(f"  {name}: {verdict}")
    if (a / "masking.json").is_file() and (b / "masking.json").is_file():
        ma, mb = read_masking_report(a / "masking.json"), read_masking_report(b / "masking.json")
        if ma == mb:
            print("  masking.json: identical")
        else:
            rows_a, rows_b = ma.get("methods", {}), mb.get("methods", {})
            for method in sorted(set(rows_a) | set(rows_b)):
                if method not in rows_a or method not in rows_b:
                    print(f"  masking {method}: in {'A' if method in rows_a else 'B'} only")
                    continue
                xa, xb = rows_a[method].get("masked", math.nan), rows_b[method].get("masked", math.nan)
                print(f"  masking {method}: masked {xa:.4f} vs {xb:.4f} (B-A {xb - xa:+.4f})")
    elif (a / "masking.json").is_file() or (b / "masking.json").is_file():
        print(f"  masking.json: in {'A' if (a / 'masking.json').is_file() else 'B'} only")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path, help="<output_root>/<model_name> of the first run")
    parser.add_argument("run_b", type=Path, help="<output_root>/<model_name> of the second run")
    parser.add_argument("--tasks", nargs="+", default=None, help="default: every task folder found in both")
    parser.add_argument("--rtol", type=float, default=1e-3, help="--check: largest relative matrix difference allowed")
    parser.add_argument("--check", action="store_true", help="exit 1 when H*, a bank's set or a matrix (over --rtol) differs")
    args = parser.parse_args(argv)
    for run in (args.run_a, args.run_b):
        if not run.is_dir():
            parser.error(f"{run}: not a folder (give <output_root>/<model_name>, e.g. runs/analyze/toy-llava)")
    found_a = {p.name for p in args.run_a.iterdir() if p.is_dir()}
    found_b = {p.name for p in args.run_b.iterdir() if p.is_dir()}
    tasks = args.tasks or sorted(found_a & found_b)
    for task in sorted((found_a ^ found_b) - set(tasks)):
        print(f"{task}: in {'A' if task in found_a else 'B'} only")
    if not tasks:
        parser.error(f"no task folder in both {args.run_a} and {args.run_b}")
    ok = True
    for task in tasks:
        if task not in found_a or task not in found_b:
            parser.error(f"task {task}: no folder {args.run_a / task if task not in found_a else args.run_b / task}")
        print(f"{task}:")
        try:
            ok &= compare_task(args.run_a / task, args.run_b / task, args.rtol)
        except ValueError as error:  # malformed heads.json / bank / JSON: the message names the file
            parser.exit(2, f"compare_runs.py: {error}\n")
    print(f"verdict: {'agree' if ok else 'DIFFER'} (H*, bank sets, matrices within relative {args.rtol:g})")
    return 1 if (args.check and not ok) else 0


if __name__ == "__main__":
    sys.exit(main())
