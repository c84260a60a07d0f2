"""HONES steering by sparse neuron scaling (HONES_METHOD §5).

- ``objective``: the loss (CE + β·KL(p_original ‖ p_scaled) + λ·mean(s²)) as plain functions;
- ``selection``: which neurons (bank files, validation, RandNeuron);
- ``scales``: statistics, JSON / safetensors export and import, ``apply_scales`` for inference;
- ``protocol``: what a LightningModule must expose (``adapter`` or ``get_adapter()``);
- ``callback``: ``NeuronSteeringCallback`` for any such module;
- ``module``: ``SteeringModule``, the default module of ``train.py``;
- ``methods`` / ``compare``: the §5 methods and their comparison table;
- ``cli``: the LightningCLI of ``train.py``.

Lightning-dependent classes are imported lazily, so the plain functions stay light.
"""

from __future__ import annotations

from typing import Any

from hones.steering.objective import (
    SteeringLoss,
    scale_l2,
    steering_objective,
    target_cross_entropy,
    target_kl,
    target_logits,
)
from hones.steering.scales import apply_scales, export_scales, load_scales, save_scales, scale_statistics
from hones.steering.selection import random_neurons_like, read_neurons, validate_neurons

_LAZY = {
    "NeuronSteeringCallback": "hones.steering.callback",
    "SteeringModule": "hones.steering.module",
    "SteeringCLI": "hones.steering.cli",
    "run_comparison": "hones.steering.compare",
}

__all__ = [
    "SteeringLoss",
    "apply_scales",
    "export_scales",
    "load_scales",
    "random_neurons_like",
    "read_neurons",
    "save_scales",
    "scale_l2",
    "scale_statistics",
    "steering_objective",
    "target_cross_entropy",
    "target_kl",
    "target_logits",
    "validate_neurons",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hones.steering' has no attribute {name!r}")
