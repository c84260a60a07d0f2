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
  ``MaskingVerificationCallback``.
- ``checkpoint``: mid-split checkpoints of the callbacks' accumulators (resume a pass).
- ``activation_banks``: AP / MA / APE selections at the HONES budget.
- ``settings``, ``run_state``, ``reports``, ``pipeline``: the ``analyze.py`` run — config
  schema and stage fingerprints, ``state.json``, masking reports and the cross-task
  table, and the stages as ``trainer.predict`` passes (docs/attribution.md).
"""

from hones.attribution.bank import (
    BankEntry,
    BankError,
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
from hones.attribution.write_in import item_target_directions, write_in_contributions

__all__ = [
    "BankEntry",
    "BankError",
    "HeadLocalizer",
    "HeadScores",
    "NeuronAttribution",
    "NeuronAttributor",
    "ape_selection",
    "bank_to_layer_dict",
    "head_conditioned_importance",
    "head_score_agreement",
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
