"""HONES attribution (HONES_METHOD §2-4): critical heads, neuron importance, baselines, masking.

    python analyze.py all     --config configs/analyze/toy_llava.yaml              # every task, every stage
    python analyze.py all     --config configs/analyze/toy_llava.yaml --task ocr   # one task
    python analyze.py heads   --config configs/analyze/toy_llava.yaml --task vqa   # §2 only (discovery split)
    python analyze.py neurons --config configs/analyze/toy_llava.yaml --task vqa   # §3 + baselines (discovery)
    python analyze.py mask    --config configs/analyze/toy_llava.yaml --task vqa   # §4 (test split)
    python analyze.py table   --runs runs/analyze/toy-llava                        # methods × tasks table
    python analyze.py analysis --config configs/analysis/toy_llava.yaml            # cross-task analyses (§4)

Any setting can be overridden on the command line (``--heads.top_k 8``,
``--neurons.top_ratio 0.02``, ``--tasks vqa,ocr``); ``python analyze.py all --help``
lists them. Results go to ``<output_root>/<model_name>/<task>/`` (see
``hones.attribution.pipeline``); finished stages are recorded in its ``state.json`` and
skipped on a rerun with the same settings (other settings: an error; ``--overwrite``
recomputes). APE needs all four tasks' statistics, so its masking row appears once the
four tasks have run.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from jsonargparse import ActionConfigFile

from hones.attribution.settings import AnalyzeConfig
from hones.cli_parsing import ArgumentParser

STAGE_COMMANDS = {
    "all": "heads and neurons on the discovery split, APE, masking on the test split",
    "heads": "critical head localization (§2) on the discovery split",
    "neurons": "head-conditioned neuron attribution and baselines (§3) on the discovery split",
    "mask": "masking verification of every selection (§4) on the test split",
}


def build_parser() -> ArgumentParser:
    """The ``analyze.py`` parser: one subcommand per stage plus ``table``."""
    parser = ArgumentParser(prog="analyze.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subcommands(dest="command")
    for name, help_text in STAGE_COMMANDS.items():
        sub = ArgumentParser(description=help_text)
        sub.add_argument("--config", action=ActionConfigFile, help="YAML config (configs/analyze/*.yaml)")
        sub.add_class_arguments(AnalyzeConfig, None, fail_untyped=True)
        commands.add_subcommand(name, sub, help=help_text)
    table = ArgumentParser(description="collect <runs>/<task>/masking.json into one methods × tasks table")
    table.add_argument("--runs", required=True, help="a model's run folder, e.g. runs/analyze/toy-llava")
    table.add_argument("--methods", type=list[str] | None, default=None, help="rows, in order (default: all found)")
    commands.add_subcommand("table", table, help="methods × tasks relative-drop table (markdown + JSON)")
    from hones.analysis.run import build_parser as analysis_parser

    commands.add_subcommand(
        "analysis", analysis_parser(), help="cross-task analyses: layer preference, overlap, cross-ablation, logit lens"
    )
    return parser


def expand_bare_flags(argv: list[str], flags: tuple[str, ...] = ("--overwrite",)) -> list[str]:
    """``--overwrite`` alone means ``--overwrite true`` (jsonargparse wants a value for booleans)."""
    out: list[str] = []
    for k, arg in enumerate(argv):
        out.append(arg)
        following = argv[k + 1] if k + 1 < len(argv) else None
        if arg in flags and (following is None or following.startswith("--")):
            out.append("true")
    return out


def config_from(namespace: Any) -> AnalyzeConfig:
    """An ``AnalyzeConfig`` from a parsed (and instantiated) subcommand namespace."""
    return AnalyzeConfig.from_namespace(namespace)


def main(argv: list[str] | None = None) -> int:
    """Run one command; ``argv`` defaults to the command line. Returns the exit status."""
    from hones.attribution.bank import BankError
    from hones.attribution.run_state import AnalysisError
    from hones.data.errors import DataError

    parser = build_parser()
    parsed = parser.parse_args(expand_bare_flags(sys.argv[1:] if argv is None else list(argv)))
    command = parsed.command
    if command == "table":
        from hones.attribution.reports import masking_table_gaps, write_masking_table

        try:
            table, markdown = write_masking_table(parsed.table.runs, parsed.table.methods)
        except (FileNotFoundError, ValueError) as error:  # ValueError: a malformed masking.json (named)
            print(f"analyze.py table: {error}", file=sys.stderr)
            return 2
        for gap in masking_table_gaps(table):
            print(f"analyze.py table: {gap}", file=sys.stderr)
        print(markdown)
        return 0
    from hones.choices import SettingsError
    from hones.io import OutputError
    from hones.models.registry import ModelError

    if command == "analysis":
        from hones.analysis.run import build_parser as analysis_parser
        from hones.analysis.run import run_from_namespace

        try:
            run_from_namespace(analysis_parser(), parsed.analysis)
        except (BankError, DataError, ModelError, OutputError) as error:  # named, in one line
            print(f"analyze.py analysis: {error}", file=sys.stderr)
            return 2
        return 0

    from hones.attribution.pipeline import run_analysis

    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"predict returned None")  # AttributionModule's steps do nothing
    try:
        config = config_from(parser.instantiate(parsed)[command])
    except ValueError as error:  # settings that cannot work (AnalyzeConfig.validate)
        parser.error(f"{command}: {error}")
    try:
        outcomes = run_analysis(config, command)
    except (AnalysisError, BankError, DataError, ModelError, OutputError, SettingsError) as error:
        print(f"analyze.py {command}: {error}", file=sys.stderr)
        return 2
    pending = [o for o in outcomes if o.status == "pending"]
    if pending:
        print("analyze.py: pending — " + "; ".join(f"{o.task}/{o.stage}: {o.detail}" for o in pending), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
