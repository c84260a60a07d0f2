"""Learned steering scales read teacher-forced on the test split: does the likelihood move?

``train.py compare`` reports the §1 metric, which moves only when a greedy answer flips.
This script loads the scales a compare run exported (``<compare_dir>/<method>/scales.json``)
and measures, on the toy world's (or any unified-COCO) test split, the teacher-forced
score with and without them: for vqa / ocr / caption the mean log-probability of the
target tokens (nats; caption: the item's one seeded reference), for retrieval the margin
gap (mean logit(Yes) − logit(No) of the positives minus that of the negatives, 1 + 49
candidates per image). It writes ``<compare_dir>/test_likelihood.json`` (with ``--limit N``,
``test_likelihood_limitN.json``).

    python scripts/steering_test_likelihood.py --model models/toy-llava --task vqa \\
        --compare_dir runs/steering/toy-llava/vqa/compare
    python scripts/steering_test_likelihood.py --model models/toy-llava --task retrieval --limit 100 \\
        --compare_dir runs/steering/toy-llava/retrieval/compare
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hones import io  # noqa: E402
from hones.attribution.batches import encode_items  # noqa: E402
from hones.attribution.heads import margin_gap, target_log_prob_from_logits, teacher_forced_measure  # noqa: E402
from hones.data.formats import load_coco_unified  # noqa: E402
from hones.data.tasks import TASKS, build_task_items  # noqa: E402
from hones.evaluation import retrieval_margin  # noqa: E402
from hones.models import load_adapter  # noqa: E402
from hones.steering.scales import apply_scales  # noqa: E402

METHODS = ("hones", "hones_no_kl", "rand_neuron")  # the trained methods, which export scales


def teacher_forced_score(adapter: Any, items: Sequence[Any], task: str, batch_size: int = 32) -> float:
    """Mean log p(target tokens) over ``items`` (nats), or for retrieval the margin gap."""
    values, labels = [], []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            if task == "retrieval":
                batch = encode_items(adapter, chunk, with_targets=False)
                values.append(retrieval_margin(adapter, batch).cpu())  # the score NDCG@5 ranks by
                labels += [int(item.label) for item in chunk]
            else:
                batch = encode_items(adapter, chunk, with_targets=True)
                values.append(target_log_prob_from_logits(adapter.forward(batch), batch["labels"]).float().cpu())
    scores = torch.cat(values)
    if task != "retrieval":
        return float(scores.mean())
    return float(margin_gap(scores, torch.tensor(labels) == 1))


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="steering_test_likelihood.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the model the scales were learned on (local directory)")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--compare_dir", required=True, type=Path, help="a train.py compare output folder")
    parser.add_argument("--world", default="toyworld_data", type=Path, help="unified COCO folder: coco/unified.json, coco/images, splits/test.json")
    parser.add_argument("--limit", type=positive_int, default=None, help="test images (default all)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), help="methods whose scales to read (missing ones are reported)")
    parser.add_argument("--batch_size", type=int, default=32)
    args = parser.parse_args(argv)

    found = {m: args.compare_dir / m / "scales.json" for m in args.methods if (args.compare_dir / m / "scales.json").is_file()}
    missing = [m for m in args.methods if m not in found]
    if not found:
        parser.error(f"{args.compare_dir}: no <method>/scales.json for any of {', '.join(args.methods)}")
    records = load_coco_unified(args.world / "coco" / "unified.json", args.world / "coco" / "images",
                                split_file=args.world / "splits" / "test.json", limit=args.limit)  # fmt: skip
    items = build_task_items(records, args.task, "test")
    adapter = load_adapter(args.model)
    base = teacher_forced_score(adapter, items, args.task, args.batch_size)
    rows = {}
    for method, path in found.items():
        with apply_scales(adapter, path):
            rows[method] = {"score": teacher_forced_score(adapter, items, args.task, args.batch_size), "scales": str(path)}
        rows[method]["change"] = rows[method]["score"] - base
    measure = teacher_forced_measure(args.task)
    summary = {"model": args.model, "task": args.task, "split": "test", "num_items": len(items), "limit": args.limit,
               "measure": measure, "base": base, "methods": rows, "missing_methods": missing}  # fmt: skip
    out = io.write_json(args.compare_dir / io.limited_name("test_likelihood", args.limit), summary)
    changes = ", ".join(f"{m} {row['change']:+.4f}" for m, row in rows.items())
    skipped = f" (no scales for {', '.join(missing)})" if missing else ""
    print(f"{args.task}: {measure} on {len(items)} test items, base {base:.4f}; change with scales: {changes}{skipped} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
