"""Masking reports (HONES_METHOD §4): one task's ``masking.json`` / ``masking.md`` and the
cross-task table (methods × tasks, relative drop) that goes in the README.

``masking.json``::

    {"task": "vqa", "split": "test", "metric": "VQAAccuracy", "metric_mode": "paper",
     "num_items": 300,
     "methods": {"hones": {"base": 0.61, "masked": 0.20, "drop": 0.41,
                           "relative_drop": 67.2, "num_neurons": 14}, ...}}

relative_drop = 100 · (P − P_masked) / |P| (None when P = 0). Each row carries its own
base P: rows finished in different passes each measured the unmasked model on the same
items (greedy decoding makes it the same number).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from hones import io
from hones.attribution.settings import METHODS, TASKS

METHOD_LABELS = {
    "hones": "HONES",
    "random": "Random (same per-layer counts)",
    "activation": "Activation magnitude",
    "write_in": "Write-in c̄ (no heads)",
    "grad_x_act": "Gradient × activation",
    "ap": "AP",
    "ma": "MA",
    "ape": "APE",
}


def relative_drop(base: float, masked: float) -> float | None:
    """HONES_METHOD §4's relative drop 100 · (P − P_masked) / |P| in %; None when P = 0 or not finite."""
    if base == 0:
        return None
    relative = 100.0 * (base - masked) / abs(base)
    return relative if math.isfinite(relative) else None


def masking_row(base: float, masked: float, num_neurons: int) -> dict[str, Any]:
    """One method's row: base, masked, drop = base − masked, relative drop in %, neurons."""
    return {
        "base": base,
        "masked": masked,
        "drop": base - masked,
        "relative_drop": relative_drop(base, masked),
        "num_neurons": int(num_neurons),
    }


def mean_and_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of repeated draws (sd 0 for fewer than two)."""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, sd


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def masking_markdown(report: Mapping[str, Any]) -> str:
    """A markdown table of one task's ``masking.json`` content."""
    lines = [
        f"Masking on the {report.get('split', 'test')} split: task {report['task']}, metric {report.get('metric', '')} "
        f"({report.get('metric_mode', 'paper')}), {report.get('num_items', '?')} items.",
        "",
    ]
    header = ["method", "neurons", "base", "masked", "drop", "relative drop (%)"]
    rows = [
        [METHOD_LABELS.get(name, name), row["num_neurons"], _fmt(row["base"]), _fmt(row["masked"]), _fmt(row["drop"]),
         _fmt(row["relative_drop"], 2)]
        for name, row in report["methods"].items()
    ]  # fmt: skip
    return "\n".join(lines) + "\n" + io.markdown_table(header, rows)


def write_masking_report(run_dir: str | os.PathLike, report: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``masking.json`` and ``masking.md`` (atomic)."""
    run_dir = Path(run_dir)
    return io.write_json(run_dir / "masking.json", dict(report)), io.write_text(run_dir / "masking.md", masking_markdown(report))


# -- the cross-task table -------------------------------------------------------------------
ROW_NUMBERS = {"base": False, "masked": False, "drop": True, "relative_drop": True}  # field -> may be null (where present)


def read_masking_report(path: str | os.PathLike) -> dict[str, Any]:
    """A ``masking.json``'s content, checked: a one-line ValueError names the file, the method and
    the field that is not what ``write_masking_report`` writes: ``methods`` a mapping of rows, each
    with a number ``base``; where present, ``masked`` a number, ``drop`` / ``relative_drop`` numbers
    or null, ``num_neurons`` an integer."""
    report = io.read_json(path)
    if not isinstance(report, dict):
        raise ValueError(f"{path}: expected a JSON object (a masking report), got {type(report).__name__}")
    methods = report.get("methods")
    if not isinstance(methods, dict):
        raise ValueError(f"{path}: field 'methods' must be an object of method -> row, got {type(methods).__name__}")
    for method, row in methods.items():
        if not isinstance(row, dict):
            raise ValueError(f"{path}: methods.{method} must be an object, got {type(row).__name__}")
        for field, nullable in ROW_NUMBERS.items():
            if field not in row and field != "base":
                continue
            value = row.get(field)
            if (value is None and nullable) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
                continue
            raise ValueError(f"{path}: methods.{method}.{field} must be a number{' or null' if nullable else ''}, got {value!r}")
        neurons = row.get("num_neurons")
        if neurons is not None and (isinstance(neurons, bool) or not isinstance(neurons, int)):
            raise ValueError(f"{path}: methods.{method}.num_neurons must be an integer, got {neurons!r}")
    return report


def collect_masking(runs_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """task -> ``masking.json`` content for every ``<runs_dir>/<task>/masking.json`` (tasks in §1 order)."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such run folder (expected <output_root>/<model_name>)")
    found = {task: read_masking_report(root / task / "masking.json") for task in TASKS if (root / task / "masking.json").is_file()}
    if not found:
        models = sorted(p.parent.parent.name for p in root.glob("*/*/masking.json") if p.parent.name in TASKS)
        if models:  # the output root, not one model's folder
            raise FileNotFoundError(f"{root}: holds the runs of {', '.join(sorted(set(models)))}; give one, e.g. --runs {root / models[0]}")
        raise FileNotFoundError(f"{root}: no <task>/masking.json below it; run `analyze.py all` first")
    return found


def masking_table(reports: Mapping[str, Mapping[str, Any]], methods: Sequence[str] | None = None) -> dict[str, Any]:
    """Relative drops (%) as ``{"tasks", "base": {task: P}, "rows": {method: {task: drop, "average": mean}}}``.

    The average is over the tasks where the method has a value (None when it has none);
    ``num_tasks`` in each row says how many that is.
    """
    tasks = [t for t in TASKS if t in reports] + [t for t in reports if t not in TASKS]
    present = {name for report in reports.values() for name in report.get("methods", {})}
    order = list(methods) if methods is not None else [m for m in METHODS if m in present] + sorted(present - set(METHODS))
    rows: dict[str, dict[str, Any]] = {}
    for method in order:
        values: dict[str, Any] = {}
        for task in tasks:
            row = reports[task].get("methods", {}).get(method)
            values[task] = None if row is None else row.get("relative_drop")
        known = [v for v in values.values() if v is not None]
        values["average"] = sum(known) / len(known) if known else None
        values["num_tasks"] = len(known)
        rows[method] = values
    base = {}
    for task in tasks:
        bases = [row["base"] for row in reports[task].get("methods", {}).values()]
        base[task] = bases[0] if bases else None
    metrics = {task: reports[task].get("metric") for task in tasks}
    items = {task: reports[task].get("num_items") for task in tasks}
    neurons = {task: (reports[task].get("methods", {}).get("hones") or {}).get("num_neurons") for task in tasks}
    return {
        "tasks": tasks, "metric": metrics, "num_items": items, "base": base, "hones_neurons": neurons, "rows": rows,
        "missing_tasks": [t for t in TASKS if t not in reports],  # no masking.json: not in the averages
        "methods_without_results": [m for m in order if rows[m]["num_tasks"] == 0],
    }  # fmt: skip


def masking_table_gaps(table: Mapping[str, Any]) -> list[str]:
    """What the table lacks, one sentence each (for its note and the CLI's stderr)."""
    gaps = []
    if table.get("missing_tasks"):
        gaps.append(f"no masking.json for {', '.join(table['missing_tasks'])}; averages cover the tasks shown")
    if table.get("methods_without_results"):
        gaps.append(f"no results for method(s) {', '.join(table['methods_without_results'])} in any task")
    return gaps


def masking_table_markdown(table: Mapping[str, Any], title: str = "") -> str:
    """Markdown: methods as rows, tasks as columns (relative drop %, higher = the neurons matter more)."""
    tasks = table["tasks"]
    header = ["method", *tasks, "average"]
    rows = [[METHOD_LABELS.get(m, m), *(_fmt(v[t], 1) for t in tasks), _fmt(v["average"], 1)] for m, v in table["rows"].items()]
    base_row = ["unmasked metric", *(_fmt(table["base"][t], 3) for t in tasks), ""]
    budgets = ", ".join(f"{t} {table['hones_neurons'][t]}" for t in tasks)
    metrics = ", ".join(f"{t} {table['metric'][t]}" for t in tasks)
    note = (
        "Relative drop 100·(P − P_masked)/|P| (%) on the test split when the selected neurons are set to 0; "
        f"neurons per selection (HONES budget): {budgets}; metrics: {metrics}."
    )
    note += "".join(f" Note: {gap}." for gap in masking_table_gaps(table))
    heading = f"{title}\n\n" if title else ""
    return heading + io.markdown_table(header, [base_row, *rows]) + "\n" + note + "\n"


def write_masking_table(runs_dir: str | os.PathLike, methods: Sequence[str] | None = None) -> tuple[dict[str, Any], str]:
    """Collect every task's masking.json under ``runs_dir``; write ``masking_table.{json,md}`` there."""
    root = Path(runs_dir)
    table = masking_table(collect_masking(root), methods)
    markdown = masking_table_markdown(table, f"Masking verification (HONES_METHOD §4): {root.name}")
    io.write_json(root / "masking_table.json", table)
    io.write_text(root / "masking_table.md", markdown)
    return table, markdown
