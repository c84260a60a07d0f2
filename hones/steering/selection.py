"""Which neurons steering scales (HONES_METHOD §3 selection -> §5 mask m).

A selection is ``{layer: LongTensor of neuron ids}``. It comes from a neuron bank JSON
(``hones.attribution.bank``: ``[{"layer", "neuron", "score", "rank"}]``) or is given
directly; RandNeuron (§5) draws random neurons with the same per-layer counts.

Every misfit is a ``BankError`` with one line naming the source (the file) and the
offending entry, raised before any training starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hones.attribution.bank import BankEntry, BankError, as_bank, bank_to_layer_dict, read_bank, validate_bank
from hones.attribution.baselines import random_selection

Neurons = dict[int, Tensor]


def entries_from_neurons(neurons: Mapping[int, Tensor | Sequence[int]]) -> list[BankEntry]:
    """A selection as bank entries (scores unknown), in layer then listed order."""
    entries: list[BankEntry] = []
    for layer in sorted(neurons, key=int):
        for neuron in torch.as_tensor(neurons[layer], dtype=torch.long).flatten().tolist():
            entries.append(BankEntry(int(layer), int(neuron), float("nan"), len(entries)))
    return entries


def validate_neurons(
    neurons: Mapping[int, Tensor | Sequence[int]],
    num_layers: int | None = None,
    ffn_width: int | None = None,
    source: str = "neurons",
) -> Neurons:
    """Check a selection (non-empty, in range, no duplicates) and return it as LongTensors.

    Raises ``BankError``: ``"<source>: layer 9 out of range [0, 4) (neuron 3)"``.
    """
    validate_bank(entries_from_neurons(neurons), num_layers, ffn_width, source)
    return {int(layer): torch.as_tensor(ids, dtype=torch.long).flatten() for layer, ids in sorted(neurons.items())}


def selection_from(neurons: Any, source: str = "neurons") -> Neurons:
    """A selection from what a user holds: ``{layer: neuron ids}`` (lists or tensors of
    integers), a list of ``BankEntry`` or ``(layer, neuron)`` pairs; neuron order kept within
    each layer. Non-integer ids (``3.7``, ``True``) and other forms are a one-line ``BankError``."""
    if hasattr(neurons, "banks") and not isinstance(neurons, Mapping):  # e.g. a NeuronAttributionCallback
        raise BankError(
            f"{source}: got a {type(neurons).__name__}; pass its banks['hones'] once its stage has run, "
            "or the bank file it wrote (<output_dir>/bank_hones.json)"
        )
    entries = as_bank(neurons, source=source)
    layers: dict[int, list[int]] = {}
    for entry in entries:
        layers.setdefault(entry.layer, []).append(entry.neuron)
    return validate_neurons(layers, source=source)


# ``read_bank`` itself now gives every problem (also malformed JSON) as a one-line ``BankError``;
# the name stays for code that imported it from here.
read_bank_entries = read_bank


def read_neurons(
    path: str | os.PathLike, num_layers: int | None = None, ffn_width: int | None = None
) -> Neurons:
    """The selection stored in a neuron bank file, validated against the model when sizes are given."""
    return bank_to_layer_dict(read_bank(path, num_layers, ffn_width))


def random_neurons_like(neurons: Mapping[int, Tensor], ffn_width: int, seed: int = 0) -> Neurons:
    """RandNeuron (§5): random neurons with the same per-layer counts, seeded (local generator)."""
    counts = [0] * (max(neurons) + 1)
    for layer, ids in neurons.items():
        counts[layer] = int(torch.as_tensor(ids).numel())
    return bank_to_layer_dict(random_selection(counts, ffn_width, seed))


def neuron_counts(neurons: Mapping[int, Tensor]) -> dict[int, int]:
    """layer -> number of selected neurons."""
    return {int(layer): int(torch.as_tensor(ids).numel()) for layer, ids in sorted(neurons.items())}


__all__ = [
    "BankError",
    "Neurons",
    "entries_from_neurons",
    "neuron_counts",
    "random_neurons_like",
    "read_bank_entries",
    "read_neurons",
    "selection_from",
    "validate_neurons",
]
