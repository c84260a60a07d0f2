"""How HONES compares with many random selections of the same per-layer counts (§4).

The masking table's "Random" row is one seeded draw (``neurons.baseline_seed``); one draw
says little when a masked metric moves by a few items. This script masks the test split
with the run's HONES bank and with ``--draws`` further random banks (seeds
``baseline_seed + 1 ..``; each keeps HONES's neurons-per-layer counts) in one pass, and
writes ``<run>/<task>/random_spread.json``: every draw's masked metric, their mean and
standard deviation, and how many draws HONES beats (drops the metric more than).

    python scripts/random_spread.py --config configs/analyze/toy_llava.yaml --task vqa --draws 8
    python scripts/random_spread.py --config configs/analyze/toy_llava.yaml --task retrieval \\
        --draws 8 --test.limit 100          # retrieval: 50 candidates per image, so a subset

A 300-image test split moves a masked metric by a few items, so the verdict can be noise.
``--test_world DIR`` measures the same banks on the test split of a bigger toy world made
with the run's world settings (its first test images are the run's):

    python -m hones.data.toyworld --out runs/toyworld_test3000 --n-train 0 --n-dev 0 --n-test 3000 --n-ood 10
    python scripts/random_spread.py --config configs/analyze/toy_llava.yaml --task ocr \\
        --test_world runs/toyworld_test3000   # -> <run>/<task>/random_spread_toyworld_test3000.json

The run's neurons stage must have run (``analyze.py neurons``) with the same settings
(``--model_name``, ``--neurons.top_ratio``, ...). Nothing in the run's ``state.json`` or
``masking.json`` changes. The pass is checkpointed every ``--checkpoint_every_n_batches``
batches to ``<run>/<task>/partial/random_spread``: after an interruption, the same command
goes on from there.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hones import io  # noqa: E402
from hones.attribution.bank import read_bank  # noqa: E402
from hones.attribution.pipeline import finished_neurons_run, run_script_parser  # noqa: E402
from hones.attribution.reports import mean_and_sd, relative_drop  # noqa: E402


def build_parser() -> Any:
    parser = run_script_parser("random_spread.py", __doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=8, help="random banks besides the run's own bank_random.json")
    parser.add_argument(
        "--test_world", type=str, default=None,
        help="mask the test split of this toy world instead (made with the run's world settings but more test images)",
    )  # fmt: skip
    return parser


# toy world settings that decide what image `index` of a split looks like (the counts do not)
WORLD_CONTENT_KEYS = ("seed", "image_size", "word_prob")


def with_test_world(config: Any, world_dir: str) -> Any:
    """``config`` with its test split taken from toy world ``world_dir``, which must have been
    generated with the run's world settings (``WORLD_CONTENT_KEYS``): image ``k`` of its test
    split is then image ``k`` of the run's, and the discovery split (where the banks came
    from) is image-disjoint from it. Raises ``ValueError`` (one line) otherwise."""
    from hones import io

    world = Path(world_dir)
    manifest_path = world / "toyworld.json"
    own_path = Path(config.data.annotation_file).parents[1] / "toyworld.json"
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path}: not found (--test_world must be a finished toy world)")
    if not own_path.is_file():
        raise ValueError(f"{own_path}: not found (--test_world needs the run's data to be a toy world)")
    manifest = io.read_json(manifest_path)
    theirs, ours = manifest["config"], io.read_json(own_path)["config"]
    differ = {k: (ours.get(k), theirs.get(k)) for k in WORLD_CONTENT_KEYS if ours.get(k) != theirs.get(k)}
    if differ:
        raise ValueError(f"{manifest_path}: generated with other settings than the run's world {differ} (run, --test_world)")
    files = manifest["files"]["coco"]
    data = dataclasses.replace(
        config.data, annotation_file=str(world / files["annotation_file"]), image_root=str(world / files["image_root"]), toy_world=None
    )
    test = dataclasses.replace(config.test, split_file=str(world / files["splits"]["test"]))
    return dataclasses.replace(config, data=data, test=test)


def spread_summary(base: float, hones: float, draws: list[dict[str, float]]) -> dict[str, object]:
    """Mean / sd of the random draws' masked metric and HONES's place among them."""
    masked = [d["masked"] for d in draws]
    mean, sd = mean_and_sd(masked)

    return {
        "base": base,
        "hones": {"masked": hones, "relative_drop": relative_drop(base, hones)},
        "random": {
            "mean_masked": mean,
            "sd_masked": sd,
            "mean_relative_drop": relative_drop(base, mean),
            "sd_relative_drop": 100.0 * sd / abs(base) if base != 0 else None,
            "draws": draws,
        },
        # "beats": HONES leaves a lower metric than the draw (drops it more); ties counted apart
        "hones_beats": sum(hones < m for m in masked),
        "ties": sum(hones == m for m in masked),
        "num_draws": len(masked),
    }


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parsed = parser.parse_args(argv)
    if parsed.draws < 1:
        parser.error("--draws must be at least 1")
    run = finished_neurons_run(parser, parsed, "random_spread.py")  # the bank must come from these very settings
    if run is None:
        return 2
    out_stem = "random_spread"
    if parsed.test_world:
        try:
            run.config = with_test_world(run.config, parsed.test_world)
        except ValueError as error:
            print(f"random_spread.py: {error}", file=sys.stderr)
            return 2
        out_stem = f"random_spread_{Path(parsed.test_world).name}"
    config, task, adapter = run.config, run.task, run.module.adapter
    hones_bank = read_bank(run.run_dir / "bank_hones.json", adapter.num_layers, adapter.ffn_width)
    banks = {"hones": hones_bank, **run.random_draws(hones_bank, parsed.draws)}
    if parsed.test_world:  # masking.json has the run's own random row on the run's test split, not on this one
        banks["random"] = read_bank(run.run_dir / "bank_random.json", adapter.num_layers, adapter.ffn_width)
    seeds = [config.neurons.baseline_seed + k for k in range(1, parsed.draws + 1)]
    what = f"{len(hones_bank)} neurons, HONES + {len(seeds)} random draws (seeds {seeds[0]}..{seeds[-1]})"
    results, head = run.mask_test_split(banks, "random_spread", what)
    if results is None:  # not rank 0
        return 0
    draws = [{"seed": s, "masked": results["banks"][f"random_seed{s}"]["masked"]} for s in seeds]
    summary = {
        **head,
        **({"test_world": parsed.test_world} if parsed.test_world else {}),
        "num_neurons": len(hones_bank),
        **spread_summary(results["base"], results["banks"]["hones"]["masked"], draws),
    }
    if parsed.test_world:  # the masking table's "Random" row (seed neurons.baseline_seed), on this test split
        masked = results["banks"]["random"]["masked"]
        base = results["base"]
        summary["seeded_random"] = {
            "seed": config.neurons.baseline_seed, "masked": masked,
            "relative_drop": relative_drop(base, masked),
        }  # fmt: skip
    out = io.write_json(run.run_dir / io.limited_name(out_stem, config.test.limit), summary)
    rnd = summary["random"]

    def percent(value: float | None) -> str:
        return "n/a (base 0)" if value is None else f"{value:.1f}"

    print(
        f"{config.name()}/{task}: base {summary['base']:.4f}; HONES {summary['hones']['masked']:.4f} "
        f"({percent(summary['hones']['relative_drop'])}% drop); random {rnd['mean_masked']:.4f} ± {rnd['sd_masked']:.4f} "
        f"({percent(rnd['mean_relative_drop'])} ± {percent(rnd['sd_relative_drop'])}% drop, {len(draws)} draws); "
        f"HONES drops more than {summary['hones_beats']} of {len(draws)} draws ({summary['ties']} ties) -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
