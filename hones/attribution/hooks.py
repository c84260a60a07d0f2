"""Read-only forward hooks on the FFN intermediate activation z (context managers).

z = act(W_gate x) * (W_up x) is the input of each FFN's ``down_proj``; a forward
pre-hook on ``down_proj`` sees it for every position, in forward and in
``generate``. These hooks never change z (interventions live in
``hones.interventions``); they hand z to a callback, which may reduce it on the
spot so that nothing of size [batch, seq, ffn] is kept.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor


def down_projection(adapter: Any, layer: int) -> torch.nn.Linear:
    """The ``down_proj`` linear of decoder layer ``layer`` (weight ``[hidden, ffn]``)."""
    return adapter.mlp(layer).down_proj


@contextmanager
def observe_ffn_activations(
    adapter: Any, fn: Callable[[int, Tensor], None], layers: Iterable[int] | None = None
) -> Iterator[None]:
    """Call ``fn(layer, z)`` with z ``[rows, seq, ffn]`` at every forward of the chosen layers.

    The hooks are removed on exit, also when the body raises.
    """
    chosen = range(adapter.num_layers) if layers is None else sorted(set(int(l) for l in layers))
    handles = []
    try:
        for layer in chosen:

            def hook(module: torch.nn.Module, args: tuple[Tensor, ...], layer: int = layer) -> None:
                fn(layer, args[0])

            handles.append(down_projection(adapter, layer).register_forward_pre_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def track_activations_for_grad(
    adapter: Any, layers: Iterable[int] | None = None
) -> Iterator[dict[int, Tensor]]:
    """Yield ``{layer: z [rows, seq, ffn]}`` as nodes of the autograd graph.

    Use ``torch.autograd.grad(objective, list(kept.values()))`` afterwards: the
    gradients are total derivatives (every downstream path included), and no
    parameter ``.grad`` is touched. When z does not require grad (frozen weights),
    the hook substitutes an equal leaf tensor that does, which leaves the forward
    values unchanged. Needs autograd: call outside ``torch.inference_mode`` with
    grad enabled.
    """
    kept: dict[int, Tensor] = {}
    chosen = range(adapter.num_layers) if layers is None else sorted(set(int(l) for l in layers))
    handles = []
    try:
        for layer in chosen:

            def hook(module: torch.nn.Module, args: tuple[Tensor, ...], layer: int = layer) -> tuple[Tensor, ...] | None:
                z = args[0]
                if not z.requires_grad:
                    z = z.detach().requires_grad_(True)
                    kept[layer] = z
                    return (z, *args[1:])
                kept[layer] = z
                return None

            handles.append(down_projection(adapter, layer).register_forward_pre_hook(hook))
        yield kept
    finally:
        for handle in handles:
            handle.remove()
