"""How much a task depends on the FFN neurons at all: whole-layer FFN masking on the test split.

Masks every neuron of one layer's FFN (z = 0 at every position, as in §4), for each layer in
turn and then all layers at once, and reports the metric's relative drop. It shows where a
task's FFN computation sits, as a reference for the §4 selections: a selection drawn from
layers whose whole FFN costs the task little is unlikely to cost it much. It is not a strict
bound: masking effects do not add up (masking every layer can remove less than masking one).

    python scripts/ffn_dependence.py --config configs/analyze/toy_llava.yaml --task ocr
    python scripts/ffn_dependence.py --config configs/analyze/toy_llava.yaml --task retrieval --test.limit 100

Writes ``<output_root>/<model_name>/<task>/ffn_dependence.json`` (with ``--test.limit N``,
``ffn_dependence_limitN.json``; nothing else in the run changes) and prints one line per mask.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hones import io  # noqa: E402
from hones.attribution.bank import BankEntry, whole_layer_bank  # noqa: E402
from hones.attribution.pipeline import run_script_parser, single_task_run  # noqa: E402


def build_parser() -> Any:
    return run_script_parser("ffn_dependence.py", __doc__.split("\n\n")[0])


def layer_banks(num_layers: int, ffn_width: int) -> dict[str, list[BankEntry]]:
    """``layer<l>``: every neuron of layer l; ``all_layers``: every neuron of the model."""
    banks = {f"layer{l}": whole_layer_bank([l], ffn_width) for l in range(num_layers)}
    banks["all_layers"] = whole_layer_bank(range(num_layers), ffn_width)
    return banks


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    run = single_task_run(parser, parser.parse_args(argv))
    config, task = run.config, run.task
    run.module.configure_model()
    banks = layer_banks(run.module.adapter.num_layers, run.module.adapter.ffn_width)
    results, head = run.mask_test_split(banks, "ffn_dependence", f"masks: {', '.join(banks)}")
    if results is None:  # not rank 0
        return 0
    summary = {
        **head,
        "base": results["base"],
        "masks": results["banks"],
    }
    out = run.run_dir / io.limited_name("ffn_dependence", config.test.limit)
    io.write_json(out, summary)
    for name, row in summary["masks"].items():
        drop = row.get("relative_drop")
        drop_text = "n/a" if drop is None else f"{drop:.1f}%"
        print(f"{config.name()}/{task} {name:>10} ({row['num_neurons']} neurons): {results['base']:.4f} -> {row['masked']:.4f} ({drop_text} drop)")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
