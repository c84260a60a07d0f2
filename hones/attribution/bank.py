"""Attribution artifacts: neuron banks, head lists, score matrices.

Neuron bank (JSON), our layout: a list ranked by score,
``[{"layer": 3, "neuron": 117, "score": 0.42, "rank": 0}, ...]``.
``read_bank`` also accepts the per-layer layout ``{"<layer>": [neuron ids ...]}``
(scores unknown: NaN; ranks follow layer then listed order). The HONES authors'
released files use per-layer lists; their exact schema cannot be verified offline,
so that reader is deliberately tolerant (string or int layer keys, a list of ints per
layer) and strict about everything else.

Head list (JSON): ``{"task", "utility", "baseline", "num_items", "heads": [{"layer",
"head", "delta", "intervened", "rank"}, ...]}``.
Matrices (safetensors): head scores ``delta``/``intervened`` ``[L, H]`` (+ ``baseline``
scalar), importance and friends ``[L, I]``.

Every writer is atomic (``hones.io``: temporary file + ``os.replace``); no pickle.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from hones import io


class BankError(ValueError):
    """A neuron bank or head list that does not fit the model (one-line message)."""


@dataclass(frozen=True)
class BankEntry:
    """One selected neuron: ``layer``, ``neuron`` (index in [0, ffn_width)), ``score``, ``rank`` (0 = best)."""

    layer: int
    neuron: int
    score: float
    rank: int

    def to_json(self) -> dict[str, Any]:
        score = None if math.isnan(self.score) else float(self.score)
        return {"layer": self.layer, "neuron": self.neuron, "score": score, "rank": self.rank}


# -- validation ------------------------------------------------------------------------
def validate_bank(
    entries: Sequence[BankEntry], num_layers: int | None = None, ffn_width: int | None = None, source: str = "bank"
) -> list[BankEntry]:
    """Check a bank against the model; raise ``BankError`` with a one-line message.

    Errors: empty bank; layer outside [0, num_layers); neuron outside [0, ffn_width);
    the same (layer, neuron) twice.
    """
    if not entries:
        raise BankError(f"{source}: empty neuron bank")
    seen: set[tuple[int, int]] = set()
    for entry in entries:
        if entry.layer < 0 or (num_layers is not None and entry.layer >= num_layers):
            allowed = f"out of range [0, {num_layers})" if num_layers is not None else "must be >= 0"
            raise BankError(f"{source}: layer {entry.layer} {allowed} (neuron {entry.neuron})")
        if entry.neuron < 0 or (ffn_width is not None and entry.neuron >= ffn_width):
            allowed = f"out of range [0, {ffn_width})" if ffn_width is not None else "must be >= 0"
            raise BankError(f"{source}: neuron {entry.neuron} of layer {entry.layer} {allowed}")
        key = (entry.layer, entry.neuron)
        if key in seen:
            raise BankError(f"{source}: duplicate entry layer {entry.layer} neuron {entry.neuron}")
        seen.add(key)
    return list(entries)


def _as_int(value: Any, what: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, str)):
        raise BankError(f"{source}: {what} must be an integer; got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise BankError(f"{source}: {what} must be an integer; got {value!r}") from None


def _as_score(value: Any, what: str, source: str) -> float:
    """A bank entry's score: a number, or null (NaN: the released format has no scores)."""
    if value is None:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BankError(f"{source}: {what} must be a number or null; got {value!r}")
    return float(value)


def parse_bank(data: Any, source: str = "bank") -> list[BankEntry]:
    """Entries from either JSON layout (see the module docstring), sorted by rank."""
    entries: list[BankEntry] = []
    if isinstance(data, list):
        for k, row in enumerate(data):
            if not isinstance(row, Mapping) or "layer" not in row or "neuron" not in row:
                raise BankError(f"{source}: entry {k} must be an object with 'layer' and 'neuron'; got {row!r}")
            entries.append(
                BankEntry(
                    layer=_as_int(row["layer"], f"entry {k} layer", source),
                    neuron=_as_int(row["neuron"], f"entry {k} neuron", source),
                    score=_as_score(row.get("score"), f"entry {k} score", source),
                    rank=_as_int(row.get("rank", k), f"entry {k} rank", source),
                )
            )
        return sorted(entries, key=lambda e: e.rank)
    if isinstance(data, Mapping):
        rank = 0
        for key in sorted(data, key=lambda k: _as_int(k, f"layer key {k!r}", source)):
            layer = _as_int(key, f"layer key {key!r}", source)
            neurons = data[key]
            if not isinstance(neurons, list):
                raise BankError(f"{source}: layer {key!r} must map to a list of neuron ids; got {type(neurons).__name__}")
            for neuron in neurons:
                entries.append(BankEntry(layer, _as_int(neuron, f"layer {layer} neuron", source), float("nan"), rank))
                rank += 1
        return entries
    raise BankError(f"{source}: a neuron bank is a list of entries or a {{layer: [neurons]}} object; got {type(data).__name__}")


def _id_list(ids: Any) -> Any:
    """A layer's neuron ids as a flat list: lists as they are (each id checked by ``parse_bank``);
    tensors, arrays, ranges, tuples and single ids flattened (float ids stay floats, so they are
    refused, not truncated); anything else as it is, for ``parse_bank`` to name."""
    if isinstance(ids, list):
        return ids
    try:
        return torch.as_tensor(ids).flatten().tolist()
    except (TypeError, ValueError, RuntimeError):
        return ids


def as_bank(bank: Any, num_layers: int | None = None, ffn_width: int | None = None, source: str = "bank") -> list[BankEntry]:
    """A validated bank from any form a user holds: ``BankEntry`` list, a bank JSON path (either
    layout), a selection ``{layer: neuron ids}`` (lists or tensors, as ``zero_neurons`` and
    ``NeuronSteeringCallback`` take) or ``(layer, neuron)`` pairs (ranks in the given order)."""
    if isinstance(bank, (str, os.PathLike)):
        if Path(bank).is_dir():
            raise BankError(f"{bank}: a directory, not a bank file (e.g. {Path(bank) / 'bank_hones.json'})")
        return read_bank(bank, num_layers, ffn_width)
    if isinstance(bank, Mapping):
        entries = parse_bank({key: _id_list(ids) for key, ids in bank.items()}, source)
    elif isinstance(bank, Iterable) and not isinstance(bank, (bytes, Tensor)):
        entries = []
        for k, row in enumerate(bank):
            if isinstance(row, BankEntry):
                entries.append(row)
            elif isinstance(row, (tuple, list)) and len(row) == 2:
                entries.append(BankEntry(_as_int(row[0], f"entry {k} layer", source), _as_int(row[1], f"entry {k} neuron", source), float("nan"), k))
            else:
                raise BankError(f"{source}: entry {k} must be a BankEntry or a (layer, neuron) pair; got {row!r}")
    else:
        raise BankError(
            f"{source}: a bank is a list of BankEntry or (layer, neuron) pairs, a {{layer: neuron ids}} selection "
            f"or a bank JSON path; got {type(bank).__name__}"
        )
    return validate_bank(entries, num_layers, ffn_width, source)


# -- neuron bank I/O -----------------------------------------------------------------------
def write_bank(path: str | os.PathLike, entries: Sequence[BankEntry]) -> Path:
    """Write a bank (list layout, ranked) atomically."""
    validate_bank(entries, source=str(path))
    return io.write_json(path, [e.to_json() for e in sorted(entries, key=lambda e: e.rank)])


def read_bank(path: str | os.PathLike, num_layers: int | None = None, ffn_width: int | None = None) -> list[BankEntry]:
    """Read and validate a bank in either layout; raises ``BankError`` (one line) on misfit."""
    try:
        data = io.read_json(path)
    except FileNotFoundError:
        raise BankError(f"{path}: neuron bank file not found") from None
    except ValueError as error:  # malformed JSON: hones.io names the file, line and column
        raise BankError(str(error)) from None
    return validate_bank(parse_bank(data, str(path)), num_layers, ffn_width, str(path))


def whole_layer_bank(layers: Iterable[int], ffn_width: int) -> list[BankEntry]:
    """Every neuron of the given layers (scores NaN, ranks in layer order): whole-FFN masks and
    steering with every scale free (``scripts/ffn_dependence.py``, ``scripts/every_neuron_bank.py``)."""
    cells = [(layer, neuron) for layer in layers for neuron in range(ffn_width)]
    return [BankEntry(layer, neuron, float("nan"), rank) for rank, (layer, neuron) in enumerate(cells)]


def bank_to_layer_dict(entries: Iterable[BankEntry]) -> dict[int, Tensor]:
    """layer -> LongTensor of neuron ids (sorted), the form ``zero_neurons`` takes."""
    layers: dict[int, list[int]] = {}
    for entry in entries:
        layers.setdefault(entry.layer, []).append(entry.neuron)
    return {layer: torch.tensor(sorted(ids), dtype=torch.long) for layer, ids in sorted(layers.items())}


def neurons_per_layer(entries: Iterable[BankEntry], num_layers: int) -> Tensor:
    """Number of selected neurons in each layer: ``[L]`` (layer preference, HONES_METHOD §4)."""
    counts = torch.zeros(num_layers, dtype=torch.long)
    for entry in entries:
        counts[entry.layer] += 1
    return counts


def bank_mask(entries: Iterable[BankEntry], num_layers: int, ffn_width: int) -> Tensor:
    """Boolean ``[L, I]`` mask of the selected neurons."""
    mask = torch.zeros(num_layers, ffn_width, dtype=torch.bool)
    for entry in entries:
        mask[entry.layer, entry.neuron] = True
    return mask


# -- matrices ------------------------------------------------------------------------------
def save_matrices(path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, Any] | None = None) -> Path:
    """Save named matrices (e.g. importance ``[L, I]``) as safetensors; metadata values become strings."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    # clones: safetensors refuses entries that share memory (e.g. c̄ is also the write-in baseline)
    return io.save_tensors(path, {name: t.detach().clone() for name, t in tensors.items()}, meta)


def load_matrices(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load every tensor of a safetensors file (CPU); a damaged or cut-short file is a one-line
    ``AnalysisError`` naming it and the way on."""
    from hones.attribution.run_state import AnalysisError

    try:
        return io.load_tensors(path)
    except ValueError as error:
        raise AnalysisError(f"{error}; recompute the stage that wrote it (analyze.py ... --overwrite true)") from None


def save_head_scores(path: str | os.PathLike, scores: Any, top_k: int | None = None) -> Path:
    """HeadScores -> safetensors: ``delta``, ``intervened`` ``[L, H]`` and ``baseline`` (scalar);
    ``top_k``: |H*| of the run, kept in the metadata (``stored_top_k``)."""
    meta = {"task": scores.task, "utility": scores.utility, "num_items": scores.num_items}
    if top_k is not None:
        meta["top_k"] = int(top_k)
    return save_matrices(
        path,
        {"delta": scores.delta, "intervened": scores.intervened, "baseline": torch.tensor(scores.baseline, dtype=torch.float64)},
        meta,
    )


def stored_top_k(path: str | os.PathLike) -> int | None:
    """|H*| recorded in a ``head_scores.safetensors`` by the head callback (None in files without it)."""
    value = io.tensors_metadata(path).get("top_k")
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise BankError(f"{path}: metadata top_k must be a whole number >= 1; got {value!r}")
    return int(value)


def load_head_scores(path: str | os.PathLike) -> Any:
    """Inverse of ``save_head_scores``."""
    from hones.attribution.heads import HeadScores

    path = Path(path)
    if not path.is_file():
        raise BankError(f"{path}: head scores file not found")
    tensors = load_matrices(path)
    meta = io.tensors_metadata(path)
    missing = sorted({"delta", "intervened", "baseline"} - set(tensors)) + sorted({"utility", "task", "num_items"} - set(meta))
    if missing:
        raise BankError(f"{path}: not a head scores file (lacks {', '.join(missing)})")
    delta, intervened = tensors["delta"], tensors["intervened"]
    if delta.ndim != 2 or intervened.shape != delta.shape or tensors["baseline"].numel() != 1:
        raise BankError(
            f"{path}: delta and intervened must be [layers, heads] of one shape and baseline a scalar; got "
            f"{list(delta.shape)}, {list(intervened.shape)}, {list(tensors['baseline'].shape)}"
        )
    if not meta["num_items"].isdigit():
        raise BankError(f"{path}: metadata num_items must be a whole number; got {meta['num_items']!r}")
    return HeadScores(
        delta=delta,
        intervened=intervened,
        baseline=float(tensors["baseline"]),
        utility=meta["utility"],
        task=meta["task"],
        num_items=int(meta["num_items"]),
    )


def write_head_list(
    path: str | os.PathLike, scores: Any, top_k: int | None = None, selected: Sequence[tuple[int, int]] | None = None
) -> Path:
    """The ranked head list as JSON (all evaluated heads, or the top ``top_k``); with ``selected``
    (H*), also ``"top_k": len(selected)`` and ``"selected"``."""
    ranked = scores.ranked_heads()
    if top_k is not None:
        ranked = ranked[:top_k]
    heads = [
        {
            "layer": l,
            "head": h,
            "delta": float(scores.delta[l, h]),
            "intervened": float(scores.intervened[l, h]),
            "rank": rank,
        }
        for rank, (l, h) in enumerate(ranked)
    ]
    listing: dict[str, Any] = {
        "task": scores.task,
        "utility": scores.utility,
        "baseline": float(scores.baseline),
        "num_items": int(scores.num_items),
        "heads": heads,
    }
    if selected is not None:
        listing.update(top_k=len(selected), selected=[[int(l), int(h)] for l, h in selected])
    return io.write_json(path, listing)


def read_head_list(
    path: str | os.PathLike, num_layers: int | None = None, num_heads: int | None = None
) -> list[dict[str, Any]]:
    """The ``heads`` rows of a head list, validated (ranges, duplicates, required keys)."""
    data = io.read_json(path)
    rows = data.get("heads") if isinstance(data, Mapping) else None
    if not isinstance(rows, list) or not rows:
        raise BankError(f"{path}: a head list needs a non-empty 'heads' array")
    seen: set[tuple[int, int]] = set()
    for k, row in enumerate(rows):
        if not isinstance(row, Mapping) or not {"layer", "head", "delta"} <= set(row):
            raise BankError(f"{path}: head entry {k} needs 'layer', 'head' and 'delta'")
        layer, head = _as_int(row["layer"], "layer", str(path)), _as_int(row["head"], "head", str(path))
        if layer < 0 or (num_layers is not None and layer >= num_layers):
            raise BankError(f"{path}: head entry {k}: layer {layer} out of range [0, {num_layers})")
        if head < 0 or (num_heads is not None and head >= num_heads):
            raise BankError(f"{path}: head entry {k}: head {head} out of range [0, {num_heads})")
        if (layer, head) in seen:
            raise BankError(f"{path}: duplicate head layer {layer} head {head}")
        seen.add((layer, head))
    return list(rows)
