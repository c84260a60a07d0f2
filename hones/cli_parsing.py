"""Command-line parsers whose errors are one line.

jsonargparse (and LightningCLI on top of it) prints the whole usage, often 100+ lines,
before a parse error, names a YAML syntax error's file ``<unicode string>`` and accepts
any unambiguous prefix of an option (``--model.max_new_token`` sets ``max_new_tokens``).
The parsers here print ``PROG: error: MESSAGE (options: PROG --help)`` instead, name the
config file and its line for a YAML error before parsing, and take options only in full.
``ArgumentParser`` serves ``analyze.py`` and ``hones.analysis.run``; ``LightningParser``
is the ``parser_class`` of ``train.py`` and ``evaluate.py`` (``hones.run_defaults.HonesCLI``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import jsonargparse
import yaml
from lightning.pytorch.cli import LightningArgumentParser

CONFIG_OPTIONS = ("--config", "-c")


def one_line(text: object) -> str:
    """``text`` on one line: its lines joined by ``; `` (blank lines dropped)."""
    return "; ".join(line.strip() for line in str(text).splitlines() if line.strip())


def config_paths(args: Sequence[str]) -> list[str]:
    """The config files named in ``args`` (``--config PATH``, ``--config=PATH``, ``-c PATH``)."""
    paths = []
    for k, arg in enumerate(args):
        if arg in CONFIG_OPTIONS and k + 1 < len(args):
            paths.append(args[k + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def yaml_problem(path: str) -> str | None:
    """Why the config file at ``path`` is not a YAML mapping (one line), or None when it is one
    or is not a file (the parser then reads the option as a YAML string or names the missing file)."""
    file = Path(path)
    if not file.is_file():
        return None
    try:
        content = yaml.safe_load(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        return f"not UTF-8 text ({error.reason} at byte {error.start})"
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or one_line(error)
        return f"not valid YAML: {problem}{where}"
    if content is not None and not isinstance(content, dict):
        return f"a config must be a mapping of settings; this file holds a {type(content).__name__}"
    return None


class OneLineErrors:
    """Mixin for a jsonargparse parser: one-line errors, config files checked first, no abbreviations."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        """jsonargparse's ``parse_args``, after each ``--config`` file is checked to be a YAML mapping."""
        given = sys.argv[1:] if args is None else list(args)
        for path in config_paths(given):
            problem = yaml_problem(path)
            if problem:
                self.error(f"{path}: {problem}")
        return super().parse_args(given, *rest, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Exit 2 with ``PROG: error: MESSAGE (options: PROG --help)`` on stderr; jsonargparse's own
        behaviour when the parser does not exit on errors (a raised ``ArgumentError``)."""
        if not getattr(self, "exit_on_error", True):
            super().error(message, ex)  # type: ignore[misc]
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {one_line(message)} (options: {prog} --help)\n")
        sys.exit(2)


class ArgumentParser(OneLineErrors, jsonargparse.ArgumentParser):
    """``jsonargparse.ArgumentParser`` with :class:`OneLineErrors`."""


class LightningParser(OneLineErrors, LightningArgumentParser):
    """``LightningArgumentParser`` with :class:`OneLineErrors` (``LightningCLI(parser_class=...)``)."""
