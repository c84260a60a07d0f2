r"""HONES steering (HONES_METHOD §5): learn a sparse scale per selected FFN neuron.

    python train.py fit      --config configs/steering/toy_llava_vqa.yaml
    python train.py validate --config configs/steering/toy_llava_vqa.yaml --model.scales runs/.../scales.safetensors
    python train.py test     --config configs/steering/toy_llava_vqa.yaml --model.scales runs/.../scales.safetensors \
                             --data.split test --data.split_file toyworld_data/splits/test.json --data.training false
    python train.py compare  --config configs/steering/toy_llava_vqa.yaml   # all §5 methods, test + OOD table

``fit`` / ``validate`` / ``test`` are LightningCLI subcommands over ``SteeringModule`` +
``HonesDataModule`` (``python train.py fit --help`` lists every option). ``compare`` is
``python -m hones.steering.compare`` (see that module). A neuron bank or scales file that
does not fit the model stops the run with one line naming the file and the entry; so does
``--ckpt_path`` with a checkpoint written with other settings, and bad data (the file,
item and field; overlapping dev and test splits).
"""

from __future__ import annotations

import sys
import warnings

from hones.attribution.bank import BankError
from hones.attribution.run_state import AnalysisError
from hones.choices import SettingsError
from hones.data.errors import DataError
from hones.data.resumable import LoaderLayoutError
from hones.io import OutputError
from hones.models.registry import ModelError
from hones.sigterm import sigterm_exit_status
from hones.steering.resume import ResumeSettingsError


def main(argv: list[str] | None = None) -> None:
    """Run one command; ``argv`` defaults to the command line."""
    args = sys.argv[1:] if argv is None else argv
    # The frozen VLM stays in eval mode on purpose (no dropout in teacher or student).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    try:
        with sigterm_exit_status():  # a SIGTERM stop exits 143, not 0
            if args[:1] in (["-h"], ["--help"]):
                print(__doc__)  # lists ``compare``, which is not a LightningCLI subcommand
            if args and args[0] == "compare":
                from hones.steering.compare import main as compare_main

                try:
                    compare_main(args[1:])
                except AnalysisError as error:  # a finished method computed with other settings
                    sys.exit(f"train.py compare: {error}")
                return
            from hones.data.datamodule import HonesDataModule
            from hones.steering.cli import SteeringCLI
            from hones.steering.module import SteeringModule

            # a run without a logger writes config.yaml to the working folder: let the next one overwrite it
            SteeringCLI(SteeringModule, HonesDataModule, args=argv, save_config_kwargs={"overwrite": True})
    except (BankError, DataError, ModelError, OutputError, ResumeSettingsError, SettingsError) as error:
        sys.exit(f"train.py: {error}")
    except LoaderLayoutError as error:  # e.g. requeued onto another GPU count under devices: auto
        sys.exit(f"train.py: {error} (the --ckpt_path given, else <model.output_dir>/checkpoints/last.ckpt, which fit resumes by itself)")


if __name__ == "__main__":
    main()
