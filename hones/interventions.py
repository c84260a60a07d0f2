"""Interventions on the language model, as context managers (HONES_METHOD §2, §4, §5).

Each context manager registers forward hooks on the language model's modules (never the
vision tower) and removes them on exit, also when the body raises. They act in plain
forward passes and in `generate` (with a KV cache each step's hooks see only the new
positions, which is what an intervention "at every position" needs).

Notation: z [batch, seq, ffn] is the FFN intermediate activation act(gate x) * (up x),
the input of `down_proj`; the input of `o_proj` is [batch, seq, H * d_h], head h being the
slice [h * d_h, (h + 1) * d_h).

Several contexts compose. Hooks on the same module run in the order the contexts were
entered, so an inner `capture_ffn_activations` sees z after an outer `zero_neurons`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from hones.models.base import VLMAdapter

Head = tuple[int, int]
PreHook = Callable[[nn.Module, tuple[Any, ...]], Any]


@contextmanager
def _hooks_removed_on_exit() -> Iterator[list[RemovableHandle]]:
    """Yield a list to put hook handles in; every handle is removed on exit."""
    handles: list[RemovableHandle] = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def _check_layer(adapter: VLMAdapter, layer: int) -> int:
    if not 0 <= int(layer) < adapter.num_layers:
        raise IndexError(f"layer {layer} out of range [0, {adapter.num_layers})")
    return int(layer)


def _check_head(adapter: VLMAdapter, head: Head) -> Head:
    layer, index = head
    if not 0 <= int(index) < adapter.num_heads:
        raise IndexError(f"head {index} out of range [0, {adapter.num_heads})")
    return _check_layer(adapter, layer), int(index)


def _replace_input(args: tuple[Any, ...], new: Tensor) -> tuple[Any, ...]:
    return (new, *args[1:])


# --------------------------------------------------------------- head mean replacement
def mean_replace_slices(x: Tensor, mask: Tensor, num_heads: int) -> Tensor:
    """Replace masked heads' slices by the mean of the other heads' slices.

    x: [batch, seq, H * d_h] (o_proj input); mask: [H] or [batch, H] bool. Every replaced
    slice uses the original values of the other H - 1 heads at the same position.
    Returns a new tensor of x's shape.
    """
    batch, seq, width = x.shape
    heads = x.view(batch, seq, num_heads, width // num_heads)
    exact = heads.float()
    others_mean = ((exact.sum(dim=2, keepdim=True) - exact) / (num_heads - 1)).to(x.dtype)
    mask = mask.to(x.device)
    mask = mask[None, None, :, None] if mask.dim() == 1 else mask[:, None, :, None]
    return torch.where(mask, others_mean, heads).reshape(batch, seq, width)


@contextmanager
def mean_replace_heads(
    adapter: VLMAdapter,
    heads: Sequence[Head] | None = None,
    row_heads: Sequence[Head | None] | None = None,
) -> Iterator[None]:
    """Intervention I_(l,h): at the input of layer l's o_proj, head h's d_h-slice becomes
    the mean of the other heads' slices, at every position (HONES_METHOD §2).

    heads: (layer, head) pairs applied to every row; or
    row_heads: one (layer, head) or None per batch row (a None row is untouched); the
    batch must then have exactly len(row_heads) rows.
    """
    if (heads is None) == (row_heads is None):
        raise ValueError("give exactly one of `heads` or `row_heads`")
    num_heads = adapter.num_heads
    if num_heads < 2:
        raise ValueError("mean replacement needs at least 2 heads per layer")
    masks: dict[int, Tensor] = {}
    if heads is not None:
        for head in heads:
            layer, index = _check_head(adapter, head)
            masks.setdefault(layer, torch.zeros(num_heads, dtype=torch.bool))[index] = True
    else:
        rows = len(row_heads)
        for row, head in enumerate(row_heads):
            if head is None:
                continue
            layer, index = _check_head(adapter, head)
            masks.setdefault(layer, torch.zeros(rows, num_heads, dtype=torch.bool))[row, index] = True

    def make_hook(mask: Tensor) -> PreHook:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            if mask.dim() == 2 and x.shape[0] != mask.shape[0]:
                raise ValueError(f"row_heads has {mask.shape[0]} rows but the batch has {x.shape[0]}")
            return _replace_input(args, mean_replace_slices(x, mask, num_heads))

        return hook

    with _hooks_removed_on_exit() as handles:
        for layer, mask in masks.items():
            handles.append(adapter.attn_out_proj(layer).register_forward_pre_hook(make_hook(mask)))
        yield


# ------------------------------------------------------------------- neuron masking
def _as_index(indices: Tensor | Sequence[int]) -> Tensor:
    return torch.as_tensor(indices, dtype=torch.long).flatten()


@contextmanager
def zero_neurons(adapter: VLMAdapter, neurons: Mapping[int, Tensor | Sequence[int]]) -> Iterator[None]:
    """Set z_i = 0 for the given neurons at every position (HONES_METHOD §4).

    neurons: layer -> LongTensor of neuron indices in [0, ffn_width).
    """
    with _hooks_removed_on_exit() as handles:
        for layer, indices in neurons.items():
            index = _as_index(indices)
            if index.numel() == 0:
                continue

            def hook(module: nn.Module, args: tuple[Any, ...], index: Tensor = index) -> tuple[Any, ...]:
                z = args[0]
                return _replace_input(args, z.index_fill(-1, index.to(z.device), 0.0))

            handles.append(adapter.mlp(_check_layer(adapter, layer)).down_proj.register_forward_pre_hook(hook))
        yield


# ------------------------------------------------------------------- neuron scaling
class NeuronScaler(nn.Module):
    """Learnable per-neuron scales s for a fixed neuron selection (HONES_METHOD §5).

    With `scale_neurons`, layer l's z becomes z * (1 + m * s): selected neurons are scaled
    by (1 + s_i), the others untouched. `s` (one vector over all selected neurons, layers in
    ascending order, each layer's indices in the given order) starts at `init` (0: no
    change). Buffers `index_<layer>` hold the indices, so `state_dict()` is the full export.
    A cast of the module to a half type (`.to(torch.bfloat16)`, `.half()`, Lightning's
    `precision="bf16-true"`) leaves s in its own dtype: optimiser steps of 5e-4 would round away
    in bf16, and the scaling computes in float32 anyway. Device moves apply as usual.
    """

    def __init__(self, neurons: Mapping[int, Tensor | Sequence[int]], init: float = 0.0) -> None:
        super().__init__()
        self.layers: list[int] = sorted(int(layer) for layer in neurons)
        self._slices: dict[int, slice] = {}
        start = 0
        for layer in self.layers:
            index = _as_index(neurons[layer])
            if index.unique().numel() != index.numel():
                raise ValueError(f"layer {layer}: duplicate neuron indices")
            self.register_buffer(f"index_{layer}", index)
            self._slices[layer] = slice(start, start + index.numel())
            start += index.numel()
        self.s = nn.Parameter(torch.full((start,), float(init)))
        self.enabled = True

    def _apply(self, fn: Any, recurse: bool = True) -> NeuronScaler:
        dtype = self.s.dtype
        super()._apply(fn, recurse)
        if self.s.dtype != dtype and self.s.dtype in (torch.bfloat16, torch.float16):
            self.s.data = self.s.data.to(dtype)  # in place: the same Parameter, before any optimiser or DDP wrap
        return self

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor]) -> NeuronScaler:
        """Rebuild a scaler (selection and values) from its `state_dict()`."""
        neurons = {int(key[len("index_") :]): value for key, value in state.items() if key.startswith("index_")}
        scaler = cls(neurons)
        scaler.load_state_dict(state)
        return scaler

    @property
    def num_neurons(self) -> int:
        return self.s.numel()

    @property
    def neurons(self) -> dict[int, Tensor]:
        """layer -> LongTensor of selected neuron indices."""
        return {layer: self.indices(layer) for layer in self.layers}

    def indices(self, layer: int) -> Tensor:
        """Selected neuron indices of `layer`: [n_l]."""
        return getattr(self, f"index_{layer}")

    def values(self, layer: int) -> Tensor:
        """The slice of s for `layer`: [n_l] (a view, differentiable)."""
        return self.s[self._slices[layer]]

    def scale(self, layer: int, z: Tensor) -> Tensor:
        """z [..., ffn] -> z * (1 + m * s) for `layer` (z unchanged when disabled)."""
        if not self.enabled or layer not in self._slices:
            return z
        index = self.indices(layer).to(z.device)
        scale = self.values(layer).to(device=z.device, dtype=torch.float32)
        delta = (z.index_select(-1, index).float() * scale).to(z.dtype)
        return z.index_add(-1, index, delta)

    @contextmanager
    def disabled(self) -> Iterator[NeuronScaler]:
        """Switch scaling off inside the block (e.g. for the KL teacher on the same model)."""
        previous = self.enabled
        self.enabled = False
        try:
            yield self
        finally:
            self.enabled = previous

    @torch.no_grad()
    def clamp_(self, low: float, high: float) -> NeuronScaler:
        """Clamp s in place to [low, high] (after each optimiser step)."""
        self.s.clamp_(low, high)
        return self

    def extra_repr(self) -> str:
        counts = {layer: self.indices(layer).numel() for layer in self.layers}
        return f"neurons={self.num_neurons}, per_layer={counts}, enabled={self.enabled}"


@contextmanager
def scale_neurons(adapter: VLMAdapter, scaler: NeuronScaler) -> Iterator[NeuronScaler]:
    """Apply z <- z * (1 + m * s) on every layer of `scaler` (differentiable w.r.t. scaler.s).
    Toggle with `scaler.enabled` or `with scaler.disabled():` inside the block. The same scaler
    on the same model twice at once (it would scale twice) is a ``ValueError``."""
    hooked_on: set[int] = scaler.__dict__.setdefault("_hooked_on", set())
    if id(adapter.model) in hooked_on:
        raise ValueError(
            "these neuron scales already scale this model (e.g. a NeuronSteeringCallback in the running stage); "
            "applying them again would scale twice"
        )
    hooked_on.add(id(adapter.model))
    try:
        with _hooks_removed_on_exit() as handles:
            for layer in scaler.layers:

                def hook(module: nn.Module, args: tuple[Any, ...], layer: int = layer) -> tuple[Any, ...]:
                    return _replace_input(args, scaler.scale(layer, args[0]))

                handles.append(adapter.mlp(_check_layer(adapter, layer)).down_proj.register_forward_pre_hook(hook))
            yield scaler
    finally:
        hooked_on.discard(id(adapter.model))


# ---------------------------------------------------------------------- capturing
_CACHE_KEYS = ("cache", "past_key_values", "past_key_value")


def _cached_length(kwargs: Mapping[str, Any], layer: int) -> int:
    """Tokens of `layer` already in the KV cache a decoder layer receives (0: a fresh pass)."""
    for key in _CACHE_KEYS:
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length(layer))
    return 0


@contextmanager
def capture_ffn_activations(
    adapter: VLMAdapter,
    layers: Sequence[int] | None = None,
    positions: Tensor | None = None,
    detach: bool = True,
) -> Iterator[dict[int, Tensor]]:
    """Record z (the input of down_proj) of `layers` (default all).

    Yields a dict layer -> tensor, filled by the forward passes inside the block:
    positions None: z [batch, seq, ffn] of the whole sequence;
    positions [batch] (LongTensor of sequence indices, e.g. `prompt_last_index`):
    z[b, positions[b]] -> [batch, ffn].
    A pass without KV cache (a forward, a rerun of some layers) replaces what a layer held.
    Under `generate` the cached steps are stitched together: positions index the full
    sequence (prompt + generated) and the full capture grows along seq; rows whose
    position is never reached stay 0.
    """
    chosen = list(range(adapter.num_layers)) if layers is None else [_check_layer(adapter, l) for l in layers]
    captured: dict[int, Tensor] = {}
    start: dict[int, int] = {}  # layer -> sequence index of the chunk being processed

    def make_cache_hook(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            start[layer] = _cached_length(kwargs, layer)
            if start[layer] == 0:
                captured.pop(layer, None)

        return hook

    def make_hook(layer: int) -> PreHook:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            z = args[0].detach() if detach else args[0]
            previous = captured.get(layer)
            if positions is None:
                captured[layer] = z if previous is None else torch.cat([previous, z], dim=1)
                return
            where = positions.to(z.device) - start.get(layer, 0)
            if where.shape[0] != z.shape[0]:
                raise ValueError(f"positions has {where.shape[0]} rows but the batch has {z.shape[0]}")
            inside = (where >= 0) & (where < z.shape[1])
            rows = torch.arange(z.shape[0], device=z.device)
            picked = z[rows, where.clamp(0, z.shape[1] - 1)]  # [batch, ffn]
            if previous is None:
                previous = torch.zeros_like(picked)
            captured[layer] = torch.where(inside[:, None], picked, previous)

        return hook

    layer_modules = adapter.decoder_layers()
    with _hooks_removed_on_exit() as handles:
        for layer in chosen:
            handles.append(
                layer_modules[layer].register_forward_pre_hook(make_cache_hook(layer), with_kwargs=True)
            )
            handles.append(adapter.mlp(layer).down_proj.register_forward_pre_hook(make_hook(layer)))
        yield captured
