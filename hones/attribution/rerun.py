"""Exact partial reruns of the language model from a cached layer input (speed-up (3)).

An intervention at layer l (a head's mean replacement, HONES_METHOD §2) cannot change
anything below l. So one base forward records, for every decoder layer, the hidden
states entering it and the keyword arguments the text model passed to it (causal +
padding mask, rotary ``position_embeddings``, ``position_ids``; Qwen2.5-VL's mrope
positions are already folded into ``position_embeddings``). Rerunning layers
l..L-1, the final norm and the unembedding from that cache reproduces the full
forward exactly (same modules, same inputs, same arguments).

Recording the arguments with a ``forward_pre_hook(with_kwargs=True)`` on each layer,
rather than rebuilding masks and rotary embeddings, keeps this correct for every text
model that calls its layers as ``layer(hidden_states, **kwargs)`` (Llama, Qwen2,
Qwen2.5-VL in transformers 5; layers with per-layer masks such as sliding windows
included, since every layer's own arguments are kept). The KV cache is dropped
(``cache=None``, ``use_cache=False``): a rerun must never append to it.

Rows can be replicated (``repeats``) so that one rerun evaluates several
interventions per item (speed-up (2)): row ``item * repeats + r`` is copy ``r`` of
``item`` (``repeat_interleave`` order), the order ``row_heads`` must follow.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

# keys whose tensors carry the batch on a known axis, counted from the end
# (position_ids: [..., batch, seq]; cos/sin: [..., batch, seq, dim]; masks: [batch, ...])
_BATCH_AXIS_FROM_END = {"position_ids": 2, "position_embeddings": 3}
_CACHE_KEYS = ("cache", "past_key_values", "past_key_value")


@dataclass
class LayerInputs:
    """What each decoder layer received in one base forward.

    hidden: ``{layer: [batch, seq, hidden]}`` for the layers asked for.
    kwargs: ``{layer: dict}`` the keyword arguments of every layer (tensors shared, not copied).
    batch_size: rows of the base forward.
    """

    hidden: dict[int, Tensor] = field(default_factory=dict)
    kwargs: dict[int, dict[str, Any]] = field(default_factory=dict)
    batch_size: int = 0


def _text_model(adapter: Any) -> nn.Module:
    """The module that owns the decoder layers (``.layers``) and the final norm (``.norm``)."""
    layers = adapter.decoder_layers()
    first = layers[0]
    for module in adapter.model.modules():
        container = getattr(module, "layers", None)
        if isinstance(container, nn.ModuleList) and len(container) == len(layers) and container[0] is first:
            if not isinstance(getattr(module, "norm", None), nn.Module):
                raise AttributeError(f"{type(module).__name__} has decoder layers but no final `.norm`")
            return module
    raise AttributeError("could not find the text model that owns the adapter's decoder layers")


def final_norm(adapter: Any) -> nn.Module:
    """The language model's final norm (applied after the last decoder layer)."""
    return _text_model(adapter).norm


def output_logits(adapter: Any, normed_hidden: Tensor) -> Tensor:
    """Logits ``[..., vocab]`` from final-norm outputs ``[..., hidden]`` (the model's lm_head)."""
    head = adapter.model.get_output_embeddings()
    return head(normed_hidden)


def model_inputs(adapter: Any, batch: Mapping[str, Any]) -> dict[str, Tensor]:
    """The HF model's keyword inputs for an encoded batch, exactly as ``adapter.forward`` builds them.

    ``adapter.model_inputs`` drops the adapter's bookkeeping keys (labels,
    prompt_last_index, non-tensors), moves tensors to the model's device and casts pixel
    inputs; ``adapter.position_ids`` adds explicit positions where the adapter uses them
    (LLaVA: counted from each row's first real token).
    """
    inputs = adapter.model_inputs(dict(batch))
    position_ids = adapter.position_ids(inputs)
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    return inputs


def base_hidden_states(adapter: Any, batch: Mapping[str, Any]) -> Tensor:
    """Final-norm hidden states ``[batch, seq, hidden]`` of the unmodified forward, no KV cache.

    Runs the VLM without its lm_head (``adapter.model.model``), so no ``[batch, seq, vocab]``
    tensor is built; ``output_logits`` of the result equals ``adapter.forward(batch)``.
    Interventions active around the call apply as usual.
    """
    inner = getattr(adapter.model, "model", None)
    if inner is None:
        raise AttributeError(f"{type(adapter.model).__name__} has no inner `.model` (vision + text) to run")
    outputs = inner(**model_inputs(adapter, batch), use_cache=False)
    return outputs.last_hidden_state


@contextmanager
def capture_layer_inputs(adapter: Any, layers: Iterable[int] | None = None) -> Iterator[LayerInputs]:
    """Record the inputs of decoder layers during the forward run inside the block.

    Args:
        layers: layers whose incoming hidden states are kept (default all). The keyword
            arguments are kept for every layer (they are shared tensors, no copies).

    Yields a ``LayerInputs`` filled by the first forward call made in the block.
    Hooks are removed on exit.
    """
    keep = set(range(adapter.num_layers) if layers is None else (int(l) for l in layers))
    record = LayerInputs()
    handles = []

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if index in record.kwargs:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                record.batch_size = hidden.shape[0]
            if index in keep:
                record.hidden[index] = hidden.detach()
            kept = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            for key in _CACHE_KEYS:
                if key in kept:
                    kept[key] = None
            if "use_cache" in kept:
                kept["use_cache"] = False
            record.kwargs[index] = kept

        return hook

    try:
        for index, layer in enumerate(adapter.decoder_layers()):
            handles.append(layer.register_forward_pre_hook(make_hook(index), with_kwargs=True))
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _repeat_tensor(tensor: Tensor, axis: int, batch_size: int, repeats: int, name: str) -> Tensor:
    size = tensor.shape[axis]
    if size == batch_size:
        return tensor.repeat_interleave(repeats, dim=axis)
    if size == 1:
        return tensor  # broadcast over the batch
    raise ValueError(f"layer argument {name!r} has {size} rows on its batch axis; expected {batch_size} or 1")


def repeat_layer_kwargs(kwargs: Mapping[str, Any], batch_size: int, repeats: int) -> dict[str, Any]:
    """Replicate every batch-shaped argument ``repeats`` times per row (``repeat_interleave``)."""
    if repeats == 1:
        return dict(kwargs)
    out: dict[str, Any] = {}
    for name, value in kwargs.items():
        if isinstance(value, Tensor) and value.dim() > 0:
            from_end = _BATCH_AXIS_FROM_END.get(name)
            axis = 0 if from_end is None else value.dim() - from_end
            out[name] = _repeat_tensor(value, axis, batch_size, repeats, name)
        elif isinstance(value, tuple) and value and all(isinstance(v, Tensor) for v in value):
            from_end = _BATCH_AXIS_FROM_END.get(name, None)
            out[name] = tuple(
                _repeat_tensor(v, 0 if from_end is None else v.dim() - from_end, batch_size, repeats, name)
                for v in value
            )
        elif isinstance(value, dict):
            raise TypeError(f"layer argument {name!r} is a dict; per-layer arguments were expected")
        else:
            out[name] = value
    return out


def run_layers_from(
    adapter: Any,
    inputs: LayerInputs,
    start: int,
    repeats: int = 1,
    hidden: Tensor | None = None,
) -> Tensor:
    """Run decoder layers ``start..L-1`` and the final norm from the cached input of ``start``.

    Args:
        inputs: the record of ``capture_layer_inputs`` (must hold ``hidden[start]``).
        start: first layer to run.
        repeats: copies of each row (row ``item * repeats + r``).
        hidden: optional replacement for the input of ``start`` ``[batch * repeats, seq, hidden]``.

    Returns the final-norm output ``[batch * repeats, seq, hidden]``; interventions active
    around this call (hooks on the layers' submodules) apply as in a full forward.
    """
    if hidden is None:
        if start not in inputs.hidden:
            raise KeyError(f"layer {start}'s input was not captured (captured: {sorted(inputs.hidden)})")
        hidden = inputs.hidden[start]
        if repeats > 1:
            hidden = hidden.repeat_interleave(repeats, dim=0)
    layers = adapter.decoder_layers()
    for index in range(start, len(layers)):
        kwargs = repeat_layer_kwargs(inputs.kwargs[index], inputs.batch_size, repeats)
        hidden = layers[index](hidden, **kwargs)
        if isinstance(hidden, tuple):
            hidden = hidden[0]
    return final_norm(adapter)(hidden)


def replicate_batch(batch: Mapping[str, Any], repeats: int) -> dict[str, Any]:
    """An encoded batch with each item repeated ``repeats`` times (row ``item * repeats + r``).

    Row-aligned tensors (first axis = batch size) are repeated with ``repeat_interleave``;
    lists (``items``) likewise. Qwen-style flattened pixel patches (``pixel_values``
    ``[sum of patches, dim]`` with ``image_grid_thw`` ``[images, 3]``, one image per item)
    are repeated image by image. Anything else raises.
    """
    if repeats == 1:
        return dict(batch)
    size = int(batch["input_ids"].shape[0])
    out: dict[str, Any] = {}
    grid = batch.get("image_grid_thw")
    for key, value in batch.items():
        if isinstance(value, Tensor) and key == "pixel_values" and grid is not None and value.shape[0] != size:
            if grid.shape[0] != size:
                raise ValueError(f"replicate_batch supports one image per item; image_grid_thw has {grid.shape[0]} rows for {size} items")
            chunks = torch.split(value, grid.prod(dim=-1).tolist(), dim=0)
            out[key] = torch.cat([chunk for chunk in chunks for _ in range(repeats)], dim=0)
        elif isinstance(value, Tensor) and value.dim() > 0:
            if value.shape[0] != size:
                raise ValueError(f"replicate_batch: {key!r} has {value.shape[0]} rows for {size} items")
            out[key] = value.repeat_interleave(repeats, dim=0)
        elif isinstance(value, (list, tuple)):
            if len(value) != size:
                raise ValueError(f"replicate_batch: {key!r} has {len(value)} entries for {size} items")
            out[key] = [v for v in value for _ in range(repeats)]
        else:
            out[key] = value
    return out
