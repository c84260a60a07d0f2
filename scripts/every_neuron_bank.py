"""Write a neuron bank holding every FFN neuron of a model: §5 steering with the most freedom.

Steering with this bank (``train.py compare --model.bank <it>``) lets every neuron's scale
train. It shows what the §5 objective gains on a task when the bank is not the limit (a
smaller bank can still do better on the test split, by fitting the dev split less):

    python scripts/every_neuron_bank.py --model models/toy-llava --out runs/steering/toy-llava-all/bank_all.json
    python train.py compare --config configs/steering/toy_llava_vqa.yaml \\
        --model.bank runs/steering/toy-llava-all/bank_all.json --compare.methods "[base, hones]" \\
        --model.output_dir runs/steering/toy-llava-all/vqa --compare.output_dir runs/steering/toy-llava-all/vqa/compare

The bank has the ``[{"layer", "neuron", "score", "rank"}]`` layout (scores null).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hones.attribution.bank import whole_layer_bank, write_bank  # noqa: E402
from hones.models import check_local_model  # noqa: E402


def model_sizes(model: str) -> tuple[int, int]:
    """(decoder layers, FFN width) from the model's config, without loading the weights."""
    from transformers import AutoConfig

    check_local_model(model)
    text = AutoConfig.from_pretrained(model).get_text_config()  # what VLMAdapter.text_config reads
    return int(text.num_hidden_layers), int(text.intermediate_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="every_neuron_bank.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local model directory or hub id")
    parser.add_argument("--out", required=True, type=Path, help="bank JSON to write")
    args = parser.parse_args(argv)
    num_layers, ffn_width = model_sizes(args.model)
    path = write_bank(args.out, whole_layer_bank(range(num_layers), ffn_width))
    print(f"{args.model}: {num_layers} layers x {ffn_width} neurons = {num_layers * ffn_width} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
