"""What steering needs from a LightningModule, and how it freezes the model.

Protocol (``SteerableModule``): the module exposes its model as a ``VLMAdapter``
(``hones.models``) — either an ``adapter`` attribute or a ``get_adapter()`` method. The
adapter gives the Hugging Face decoder's FFNs (``adapter.mlp(l).down_proj``) that the
neuron scales act on. If neither is available yet, ``configure_model()`` is called once
(Lightning requires that hook to be idempotent) and the lookup is retried.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class AdapterProvider(Protocol):
    """A module that hands out its VLMAdapter on request."""

    def get_adapter(self) -> Any: ...


class SteerableModule(Protocol):
    """A module with a VLMAdapter attribute (``None`` until ``configure_model`` ran)."""

    adapter: Any


def resolve_adapter(module: nn.Module, configure: bool = True) -> Any:
    """The module's VLMAdapter: ``module.get_adapter()`` or ``module.adapter``.

    With ``configure`` and no adapter yet, ``module.configure_model()`` is called first.
    Raises ``AttributeError`` naming the protocol when none is found.
    """
    for attempt in range(2):
        getter = getattr(module, "get_adapter", None)
        adapter = getter() if callable(getter) else getattr(module, "adapter", None)
        if adapter is not None:
            return adapter
        if attempt == 0 and configure and callable(getattr(module, "configure_model", None)):
            module.configure_model()
    raise AttributeError(
        f"{type(module).__name__} exposes no model to steer: give it an `adapter` attribute "
        "(a hones.models.VLMAdapter) or a `get_adapter()` method"
    )


def freeze_parameters(module: nn.Module, keep: Iterable[nn.Parameter] = ()) -> dict[str, bool]:
    """Set ``requires_grad=False`` on every parameter of ``module`` except those in ``keep``.

    Returns the previous flags (name -> requires_grad) for :func:`restore_requires_grad`.
    """
    kept = {id(p) for p in keep}
    previous: dict[str, bool] = {}
    for name, parameter in module.named_parameters():
        previous[name] = parameter.requires_grad
        if id(parameter) not in kept:
            parameter.requires_grad_(False)
    return previous


def restore_requires_grad(module: nn.Module, previous: dict[str, bool]) -> None:
    """Undo :func:`freeze_parameters` (parameters it did not see are left alone)."""
    for name, parameter in module.named_parameters():
        if name in previous:
            parameter.requires_grad_(previous[name])
