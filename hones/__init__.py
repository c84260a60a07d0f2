"""HONES: head-oriented neuron explanation and steering for vision-language models.

Pipeline (one sub-package per stage, see HONES_METHOD.md):
data -> models (adapters) -> interventions -> attribution -> steering -> analysis.
"""

__version__ = "0.1.0"
