"""Learned neuron scales: statistics, export / import, and inference with them (HONES_METHOD §5).

A ``NeuronScaler`` holds s (one value per selected neuron); layer l's FFN activation
becomes z * (1 + m * s). Two file formats, both written atomically (``hones.io``):

- JSON, a list in the scaler's order (layers ascending):
  ``[{"layer": 2, "neuron": 17, "scale": 0.31, "factor": 1.31}, ...]`` where ``scale`` is
  s and ``factor`` = 1 + s is informative (ignored on import);
- safetensors: the scaler's ``state_dict()`` (``s [n]`` float32 and ``index_<layer> [n_l]``).

``apply_scales(adapter, path)`` is the context manager for inference with learned scales.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hones import io
from hones.attribution.bank import BankError
from hones.interventions import NeuronScaler, scale_neurons
from hones.steering.selection import validate_neurons

DEFAULT_SCALE_BOUND = 1.5  # §5: s clamped to [-1.5, 1.5] after each optimiser step
NONZERO_THRESHOLD = 1e-3  # |s| above which a neuron counts as steered (factor differs from 1 by > 0.1%)
FORMAT = "hones-steering-scales/1"


@contextmanager
def float32_default() -> Iterator[None]:
    """New tensors default to float32 inside the block (Lightning's "bf16-true" makes them bf16
    while the model is configured; s must not be rounded to bf16 on creation)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# -- statistics ------------------------------------------------------------------------------
def scale_statistics(s: Tensor, threshold: float = NONZERO_THRESHOLD) -> dict[str, float]:
    """mean |s|, max |s| and the fraction of neurons with |s| > threshold. s: ``[n]``."""
    magnitude = s.detach().float().abs()
    if magnitude.numel() == 0:
        return {"scale_abs_mean": 0.0, "scale_abs_max": 0.0, "scale_nonzero_frac": 0.0}
    return {
        "scale_abs_mean": float(magnitude.mean()),
        "scale_abs_max": float(magnitude.max()),
        "scale_nonzero_frac": float((magnitude > threshold).float().mean()),
    }


# -- export ----------------------------------------------------------------------------------
def scales_to_rows(scaler: NeuronScaler) -> list[dict[str, Any]]:
    """``[{"layer", "neuron", "scale", "factor"}]`` in the scaler's order."""
    rows: list[dict[str, Any]] = []
    for layer in scaler.layers:
        values = scaler.values(layer).detach().float().cpu().tolist()
        for neuron, value in zip(scaler.indices(layer).tolist(), values):
            rows.append({"layer": int(layer), "neuron": int(neuron), "scale": value, "factor": 1.0 + value})
    return rows


def save_scales(scaler: NeuronScaler, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the scales to ``path``: ``.json`` or ``.safetensors`` (by suffix), atomically."""
    path = Path(path)
    if path.suffix == ".json":
        return io.write_json(path, scales_to_rows(scaler))
    if path.suffix == ".safetensors":
        state = {key: value.detach().cpu() for key, value in scaler.state_dict().items()}
        state["s"] = state["s"].float()
        meta = {"format": FORMAT, **{str(k): str(v) for k, v in (metadata or {}).items()}}
        return io.save_tensors(path, state, meta)
    raise ValueError(f"{path}: scales are saved as .json or .safetensors")


def export_scales(
    scaler: NeuronScaler, directory: str | os.PathLike, stem: str = "scales", metadata: Mapping[str, Any] | None = None
) -> dict[str, Path]:
    """Both formats: ``<directory>/<stem>.json`` and ``<directory>/<stem>.safetensors``."""
    directory = Path(directory)
    return {
        "json": save_scales(scaler, directory / f"{stem}.json"),
        "safetensors": save_scales(scaler, directory / f"{stem}.safetensors", metadata),
    }


# -- import ----------------------------------------------------------------------------------
def _int_field(row: Any, key: str, k: int, source: str) -> int:
    value = row.get(key) if isinstance(row, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BankError(f"{source}: entry {k} needs an integer {key!r}; got {row!r}")
    return value


def scaler_from_rows(rows: Any, source: str = "scales") -> NeuronScaler:
    """A scaler from the JSON rows (order kept within each layer)."""
    if not isinstance(rows, list) or not rows:
        raise BankError(f"{source}: a scales file is a non-empty list of {{layer, neuron, scale}} entries")
    neurons: dict[int, list[int]] = {}
    values: dict[int, list[float]] = {}
    for k, row in enumerate(rows):
        layer, neuron = _int_field(row, "layer", k, source), _int_field(row, "neuron", k, source)
        scale = row.get("scale")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise BankError(f"{source}: entry {k} (layer {layer} neuron {neuron}) needs a finite 'scale'; got {scale!r}")
        neurons.setdefault(layer, []).append(neuron)
        values.setdefault(layer, []).append(float(scale))
    with float32_default():
        scaler = NeuronScaler(validate_neurons(neurons, source=source))
    with torch.no_grad():
        for layer in scaler.layers:
            scaler.values(layer).copy_(torch.tensor(values[layer], dtype=scaler.s.dtype))
    return scaler


def _checked_scales_state(state: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """``state`` if it is a well-formed scales file (``s`` ``[n]`` finite; ``index_<layer>``
    ``[n_layer]`` integer, a valid selection (``validate_neurons``), n in all), else
    ``BankError`` naming ``path``."""
    if "s" not in state or not any(key.startswith("index_") for key in state):
        raise BankError(f"{path}: not a scales file (needs 's' and 'index_<layer>' tensors)")
    extra = sorted(key for key in state if key != "s" and not key.startswith("index_"))
    if extra:
        raise BankError(f"{path}: unexpected tensor(s) {extra} in a scales file")
    s = state["s"]
    if s.ndim != 1 or not s.is_floating_point():
        raise BankError(f"{path}: 's' must be a 1-D float tensor; got {s.dtype} of shape {list(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise BankError(f"{path}: 's' holds {int((~torch.isfinite(s)).sum())} non-finite value(s)")
    neurons: dict[int, Tensor] = {}
    for key in sorted(k for k in state if k.startswith("index_")):
        layer = key[len("index_") :]
        if not layer.isdigit():
            raise BankError(f"{path}: tensor {key!r} does not name a layer (expected index_<layer>)")
        index = state[key]
        if index.ndim != 1 or index.is_floating_point() or index.dtype == torch.bool or index.numel() == 0:
            raise BankError(f"{path}: {key!r} must be a non-empty 1-D integer tensor; got {index.dtype} of shape {list(index.shape)}")
        neurons[int(layer)] = index
    validate_neurons(neurons, source=str(path))  # duplicates, negative ids: the check the JSON rows get
    total = sum(index.numel() for index in neurons.values())
    if total != s.numel():
        raise BankError(f"{path}: 's' has {s.numel()} values but the index tensors select {total} neurons")
    return state


def is_scales_file(path: str | os.PathLike) -> bool:
    """True for an exported scales file (``.safetensors``, or JSON rows with a ``scale``), which
    a neuron bank (JSON rows with ``layer`` / ``neuron`` / ``score``) is not."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == ".safetensors":
        return True
    try:
        rows = io.read_json(path)
    except ValueError:  # malformed: left to the bank reader, whose error names the file
        return False
    return isinstance(rows, list) and bool(rows) and isinstance(rows[0], dict) and "scale" in rows[0]


def load_scales(
    path: str | os.PathLike, num_layers: int | None = None, ffn_width: int | None = None
) -> NeuronScaler:
    """Read scales saved by :func:`save_scales` (JSON or safetensors), validated against the
    model when its sizes are given. Raises ``BankError`` (one line) on a misfit."""
    path = Path(path)
    if not path.is_file():
        raise BankError(f"{path}: scales file not found")
    if path.suffix == ".json":
        try:
            rows = io.read_json(path)
        except ValueError as error:  # malformed JSON (named)
            raise BankError(str(error)) from None
        scaler = scaler_from_rows(rows, str(path))
    elif path.suffix == ".safetensors":
        try:
            tensors = io.load_tensors(path)
        except ValueError as error:  # damaged or cut short (named)
            raise BankError(str(error)) from None
        state = _checked_scales_state(tensors, path)
        with float32_default():
            scaler = NeuronScaler.from_state_dict(state)
    else:
        raise BankError(f"{path}: scales are read from .json or .safetensors")
    validate_neurons(scaler.neurons, num_layers, ffn_width, str(path))
    return scaler.float()


@contextmanager
def apply_scales(adapter: Any, scales: str | os.PathLike | NeuronScaler) -> Iterator[NeuronScaler]:
    """Inference with learned scales: ``with apply_scales(adapter, "scales.json"): adapter.generate(...)``.

    ``scales`` is a path (JSON or safetensors) or a ``NeuronScaler``; it is checked against
    the adapter's sizes and moved to its device. The hooks are removed on exit.
    """
    if isinstance(scales, NeuronScaler):
        scaler = scales
        validate_neurons(scaler.neurons, adapter.num_layers, adapter.ffn_width, "scaler")
    else:
        scaler = load_scales(scales, adapter.num_layers, adapter.ffn_width)
    scaler.to(adapter.device)
    with scale_neurons(adapter, scaler):
        yield scaler
