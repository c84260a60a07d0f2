"""Masking read finer than the metric: every selection's effect on a teacher-forced score (§4, §2).

The §4 metric moves only when a greedy answer flips (or, for retrieval, a ranking
changes); a competent model can lose confidence under masking without changing a single
answer. This script masks the test split with each of the run's banks (the
``masking.methods`` whose ``bank_<method>.json`` exists) and with ``--draws`` further
random banks (HONES's per-layer counts, seeds ``baseline_seed + 1 ..``), and measures,
besides the metric, the teacher-forced score of §2's fast utility on the same items:

- vqa / ocr / caption: the mean log-probability of the target tokens (nats; the caption
  target is the item's one seeded reference);
- retrieval: the margin gap, mean logit(Yes) − logit(No) of the positives minus that of
  the negatives (a score NDCG@5 is a step function of).

It writes ``<run>/<task>/teacher_forced_masking.json`` and prints one line per selection.

    python scripts/teacher_forced_masking.py --config configs/analyze/toy_llava.yaml --task ocr
    python scripts/teacher_forced_masking.py --config configs/analyze/toy_llava.yaml --task retrieval --test.limit 100

The run's neurons stage must have run with the same settings. Nothing in ``state.json``
or ``masking.json`` changes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hones import io  # noqa: E402
from hones.attribution.bank import read_bank  # noqa: E402
from hones.attribution.pipeline import finished_neurons_run, run_script_parser  # noqa: E402
from hones.attribution.reports import mean_and_sd  # noqa: E402


def build_parser() -> Any:
    parser = run_script_parser("teacher_forced_masking.py", __doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=4, help="random banks besides the run's own bank_random.json (0: none)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parsed = parser.parse_args(argv)
    if parsed.draws < 0:
        parser.error("--draws must be 0 or more")
    run = finished_neurons_run(parser, parsed, "teacher_forced_masking.py")  # banks from these very settings
    if run is None:
        return 2
    config, task, adapter = run.config, run.task, run.module.adapter
    banks = {
        method: read_bank(run.run_dir / f"bank_{method}.json", adapter.num_layers, adapter.ffn_width)
        for method in config.masking.methods
        if (run.run_dir / f"bank_{method}.json").is_file()
    }
    missing = [m for m in config.masking.methods if m not in banks]
    draws = run.random_draws(banks["hones"], parsed.draws)
    banks.update(draws)
    what = f"{len(banks)} selections ({', '.join(banks)}), metric and teacher-forced score"
    if missing:
        what += f"; no bank for {', '.join(missing)} (skipped)"
    results, head = run.mask_test_split(banks, "teacher_forced_masking", what, target_logprob=True)
    if results is None:  # not rank 0
        return 0
    scored = results["teacher_forced"]
    rows = {
        name: {
            "num_neurons": len(bank),
            "metric_masked": results["banks"][name]["masked"],
            "metric_relative_drop": results["banks"][name]["relative_drop"],
            "score_masked": scored["banks"][name]["masked"],
            "score_drop": scored["banks"][name]["drop"],
        }
        for name, bank in banks.items()
    }
    summary = {**head, "measure": scored["measure"], "metric_base": results["base"], "score_base": scored["base"],
               "skipped_methods": missing, "selections": rows}  # fmt: skip
    if draws:
        drops = [rows[name]["score_drop"] for name in draws] + ([rows["random"]["score_drop"]] if "random" in rows else [])
        mean, sd = mean_and_sd(drops)
        summary["random_draws"] = {"num_draws": len(drops), "mean_score_drop": mean, "sd_score_drop": sd,
                                   "hones_beats": sum(rows["hones"]["score_drop"] > d for d in drops)}  # fmt: skip
    path = io.write_json(run.run_dir / io.limited_name("teacher_forced_masking", config.test.limit), summary)
    print(f"{config.name()}/{task}: metric base {results['base']:.4f}; {scored['measure']} base {scored['base']:.4f}")
    for name, row in rows.items():
        relative = row["metric_relative_drop"]
        print(
            f"  {name:<16} {row['num_neurons']:>4} neurons  metric {row['metric_masked']:.4f} "
            f"({'n/a' if relative is None else f'{relative:.1f}'}% drop)  score {row['score_masked']:.4f} (drop {row['score_drop']:+.4f})"
        )
    if draws:
        spread = summary["random_draws"]
        print(f"  random draws: score drop {spread['mean_score_drop']:+.4f} ± {spread['sd_score_drop']:.4f}; "
              f"HONES drops it more than {spread['hones_beats']} of {spread['num_draws']} -> {path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
