"""The steering methods compared in HONES_METHOD §5, as overrides of ``SteeringModule``.

| name          | label         | neurons                     | s                                        |
|---------------|---------------|-----------------------------|------------------------------------------|
| ``base``        | Base          | none                        | (no steering)                            |
| ``fixed_amp``   | Fixed-Amp     | the bank                    | 1.0 (every neuron x2), not trained       |
| ``grid_search`` | Grid-Search   | the bank                    | factor - 1, factor chosen on dev from    |
|               |               |                             | {0.5, 0.75, 1.0, 1.25, 1.5, 2.0}         |
| ``rand_neuron`` | RandNeuron    | random, same per-layer counts | trained like HONES                     |
| ``hones_no_kl`` | HONES w/o KL  | the bank                    | trained with β = 0                       |
| ``hones``       | HONES         | the bank                    | trained (CE + β KL + λ L2)               |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GRID_FACTORS: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # §5 Grid-Search candidates


@dataclass(frozen=True)
class SteeringMethod:
    """One row of the §5 comparison.

    ``overrides`` are ``SteeringModule`` arguments; ``train`` says whether s is learned on
    the dev split; ``grid`` lists the uniform factors searched on dev (s = factor - 1).
    """

    name: str
    label: str
    train: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: tuple[float, ...] = ()


METHODS: dict[str, SteeringMethod] = {
    method.name: method
    for method in (
        SteeringMethod("base", "Base", overrides={"steer": False}),
        SteeringMethod("fixed_amp", "Fixed-Amp", overrides={"init_scale": 1.0}),
        SteeringMethod("grid_search", "Grid-Search", grid=GRID_FACTORS),
        SteeringMethod("rand_neuron", "RandNeuron", train=True, overrides={"random_neurons": True}),
        SteeringMethod("hones_no_kl", "HONES w/o KL", train=True, overrides={"beta": 0.0}),
        SteeringMethod("hones", "HONES", train=True),
    )
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> SteeringMethod:
    """The method called ``name``; a ValueError lists the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown steering method {name!r}; expected one of {', '.join(METHOD_NAMES)}")
    return METHODS[name]


def factor_to_scale(factor: float) -> float:
    """A uniform multiplicative factor as s (z * factor = z * (1 + s))."""
    return float(factor) - 1.0
