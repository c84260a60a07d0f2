"""HONES attribution: critical heads (§2), head-conditioned neurons (§3), baselines and masking (§4).

The math lives in plain functions and accumulators (one file per concern); the
Lightning callbacks in ``callbacks.py`` only wire them to loops, logging and files.

- ``stats``: running-sum torchmetrics accumulators (distributed-safe).
- ``rerun``: exact reruns of layers ≥ l from cached layer inputs.
- ``write_in``: u_y target directions and write-in contributions c = z · ⟨W_down, u_y⟩.
- ``heads``: head utilities (teacher-forced / metric), Δ scores, ``HeadLocalizer``.
- ``neurons``: c̄, c̄^h, importance, ``NeuronAttributor``.
- ``baselines``: random / activation / write-in / gradient×activation selections, AP/MA/APE.
- ``bank``: neuron banks, head lists and score matrices on disk.
- ``callbacks``: ``HeadLocalizationCallback``, ``NeuronAttributionCallback``,
  ``MaskingVerificationCallback`` (also importable from ``hones.attribution``, loaded on first use).
- ``batches``: the callbacks' batch contract; ``encode_items(adapter, items, with_targets)``.
- ``checkpoint``: mid-split checkpoints of the callbacks' accumulators (resume a pass).
- ``activation_banks``: AP / MA / APE selections at the HONES budget.
- ``settings``, ``run_state``, ``reports``, ``pipeline``: the ``analyze.py`` run — config
  schema and stage fingerprints, ``state.json``, masking reports and the cross-task
  table, and the stages as ``trainer.predict`` passes (docs/attribution.md).
"""

from typing import Any

from hones.attribution.bank import (
    BankEntry,
    BankError,
    as_bank,
    bank_to_layer_dict,
    load_head_scores,
    read_bank,
    read_head_list,
    save_head_scores,
    validate_bank,
    write_bank,
    write_head_list,
)
from hones.attribution.baselines import ape_selection, random_selection, select_top_neurons
from hones.attribution.heads import HeadLocalizer, HeadScores, head_score_agreement
from hones.attribution.neurons import NeuronAttribution, NeuronAttributor, head_conditioned_importance
from hones.attribution.batches import encode_items
from hones.attribution.write_in import idf_from_items, item_target_directions, write_in_contributions

# the callbacks import Lightning: loaded on first use (``from hones.attribution import HeadLocalizationCallback``)
_LAZY = {
    name: "hones.attribution.callbacks"
    for name in ("HeadLocalizationCallback", "NeuronAttributionCallback", "MaskingVerificationCallback")
}

__all__ = [
    "BankEntry",
    "BankError",
    "HeadLocalizationCallback",
    "HeadLocalizer",
    "HeadScores",
    "MaskingVerificationCallback",
    "NeuronAttribution",
    "NeuronAttributionCallback",
    "NeuronAttributor",
    "ape_selection",
    "as_bank",
    "bank_to_layer_dict",
    "encode_items",
    "head_conditioned_importance",
    "head_score_agreement",
    "idf_from_items",
    "item_target_directions",
    "load_head_scores",
    "random_selection",
    "read_bank",
    "read_head_list",
    "save_head_scores",
    "select_top_neurons",
    "validate_bank",
    "write_bank",
    "write_head_list",
    "write_in_contributions",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hones.attribution' has no attribute {name!r}")
