"""Logit lens of a neuron mask (HONES_METHOD §4 "Paper analyses").

What is computed, exactly, for a prompt-only batch (``adapter.encode(images, prompts)``)
and a set of neurons to mask:

1. Residual stream: h_l ``[b, hidden]`` is the output of decoder layer l (after its
   attention and FFN blocks and their residual additions) at position
   ``prompt_last_index`` — the last prompt position, whose logits predict the first answer
   token — for every layer l = 0 .. L−1, read by forward hooks on the decoder layers.
2. Lens logits: ℓ_l = U · norm(h_l) (+ the lm_head bias if the model has one), ``[b, V]``,
   with norm the language model's final normalisation (``language_model.norm``) and U the
   unembedding ``[V, hidden]``. For the last layer this is the model's own next-token
   logits (checked and stored as ``model_logits``).
3. The same forward pass again under ``zero_neurons(adapter, neurons)`` (z_i = 0 for the
   masked neurons at every position) gives ℓ_l^masked.
4. Δ_l = ℓ_l − ℓ_l^masked (baseline − masked), ``[b, L, V]``. Its largest entries per
   layer are the tokens the masked neurons push up the most by that depth; layers below
   the first masked layer have Δ = 0 exactly (nothing upstream changed). Per layer, Δ
   ranks tokens exactly as the change of log-probabilities would: the two differ by one
   constant (the change of the log-normaliser), which also shifts every value of a row.

``plot_logit_lens`` draws, for one example, a grid: rows = layers, columns = the top-k
tokens by Δ at that layer, each cell the token and coloured by its Δ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

from hones.analysis.report import new_figure
from hones.attribution.batches import ensure_prompt_only
from hones.interventions import zero_neurons

# |Δ| at or below this is treated as "no change" (cells drawn blank in the grid).
ZERO_DELTA = 1e-6


def final_norm(adapter: Any) -> nn.Module:
    """The language model's final normalisation (applied before the lm_head)."""
    norm = getattr(adapter.language_model, "norm", None)
    if not isinstance(norm, nn.Module):
        raise AttributeError(f"{type(adapter.language_model).__name__} has no final `norm` module for the logit lens")
    return norm


def _layer_output(output: Any) -> Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def residual_stream(adapter: Any, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """Every decoder layer's output at ``prompt_last_index`` and the model's next-token logits.

    batch: a prompt-only encoded batch of b rows. Interventions active around the call apply.
    Returns (h ``[b, L, hidden]`` in the model dtype, model logits ``[b, V]`` float32).
    """
    positions = batch["prompt_last_index"].to(adapter.device)
    rows = torch.arange(positions.shape[0], device=adapter.device)
    captured: dict[int, Tensor] = {}

    def make_hook(layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            captured[layer] = _layer_output(output)[rows, positions].detach()

        return hook

    layers = adapter.decoder_layers()
    handles = [module.register_forward_hook(make_hook(l)) for l, module in enumerate(layers)]
    try:
        logits = adapter.next_token_logits(batch).float()
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([captured[l] for l in range(len(layers))], dim=1), logits


def lens_logits(adapter: Any, hidden: Tensor) -> Tensor:
    """ℓ = U · norm(h) (+ lm_head bias): hidden ``[..., hidden]`` -> logits ``[..., V]`` float32."""
    head = adapter.model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return F.linear(final_norm(adapter)(hidden), adapter.unembedding(), bias).float()


@dataclass
class LogitLens:
    """Lens logits of a batch with and without a mask.

    baseline, masked: ``[b, L, V]``; model_logits: the unmodified model's next-token logits ``[b, V]``.
    """

    baseline: Tensor
    masked: Tensor
    model_logits: Tensor

    @property
    def delta(self) -> Tensor:
        """Δ = baseline − masked: ``[b, L, V]``."""
        return self.baseline - self.masked


@torch.no_grad()
def logit_lens(adapter: Any, batch: Mapping[str, Any], neurons: Mapping[int, Tensor]) -> LogitLens:
    """Lens logits of ``batch`` for the model as it is and with ``neurons`` zeroed (module docstring).

    neurons: layer -> LongTensor of neuron ids (an empty mapping masks nothing: Δ = 0).
    """
    batch = ensure_prompt_only(adapter, batch)
    hidden, model_logits = residual_stream(adapter, batch)
    with zero_neurons(adapter, neurons):
        hidden_masked, _ = residual_stream(adapter, batch)
    return LogitLens(lens_logits(adapter, hidden), lens_logits(adapter, hidden_masked), model_logits)


def top_delta_tokens(delta: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest Δ per layer: delta ``[..., V]`` -> (values ``[..., k]``, token ids ``[..., k]``)."""
    k = min(k, delta.shape[-1])
    values, ids = torch.topk(delta, k, dim=-1)
    return values, ids


def token_label(tokenizer: Any, token_id: int) -> str:
    """A printable label of one token: its decoded text with a leading space shown as ␣, a
    newline as ↵, other unprintable characters escaped (``\\x06``); the raw vocabulary
    entry when decoding gives nothing or an incomplete byte sequence."""
    text = tokenizer.decode([int(token_id)], skip_special_tokens=False)
    if not text or "\ufffd" in text:
        raw = tokenizer.convert_ids_to_tokens(int(token_id))
        text = raw if isinstance(raw, str) and raw else text
    text = text.replace("\n", "↵").replace("\t", "⇥")
    if not text.strip():
        text = text.replace(" ", "␣")
    elif text.startswith(" "):
        text = "␣" + text[1:]
    # other control / unprintable characters (byte tokens) as escapes, e.g. \x06
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return text if text else f"<{int(token_id)}>"


def lens_rows(
    tokenizer: Any, values: Tensor, ids: Tensor
) -> list[list[dict[str, Any]]]:
    """JSON rows of one example: per layer, ``[{"token", "id", "delta"}, ...]``.

    values, ids: ``[L, k]`` from :func:`top_delta_tokens`.
    """
    return [
        [
            {"token": token_label(tokenizer, int(token_id)), "id": int(token_id), "delta": float(value)}
            for value, token_id in zip(values[layer].tolist(), ids[layer].tolist())
        ]
        for layer in range(values.shape[0])
    ]


def plot_logit_lens(rows: Sequence[Sequence[Mapping[str, Any]]], title: str = "") -> Figure:
    """Grid for one example: rows = decoder layers (last layer on top), columns = top-k
    tokens by Δlogit at that layer; each cell shows the token and Δ, coloured by Δ.
    Cells with |Δ| ≤ ``ZERO_DELTA`` (layers the mask cannot reach) are drawn as "·".

    rows: ``[L][k]`` dicts as returned by :func:`lens_rows`.
    """
    num_layers = len(rows)
    k = max((len(r) for r in rows), default=0)
    values = torch.zeros(num_layers, max(k, 1))
    for layer, row in enumerate(rows):
        for rank, cell in enumerate(row):
            values[layer, rank] = float(cell["delta"])
    figure = new_figure(1.25 * max(k, 1) + 2.0, 0.42 * num_layers + 1.4)
    axes = figure.add_subplot()
    bound = float(values.abs().max()) or 1.0
    image = axes.imshow(values.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", origin="lower")
    for layer, row in enumerate(rows):
        for rank, cell in enumerate(row):
            delta = float(cell["delta"])
            text = "·" if abs(delta) <= ZERO_DELTA else f"{cell['token'][:10]}\n{delta:+.3g}"
            colour = "white" if abs(delta) > 0.6 * bound else "black"
            axes.text(rank, layer, text, ha="center", va="center", fontsize=7, color=colour)
    axes.set_xticks(list(range(k)), [f"#{r + 1}" for r in range(k)])
    axes.set_yticks(list(range(num_layers)), [f"L{l}" for l in range(num_layers)])
    axes.set_xlabel("top tokens by Δlogit = baseline − masked")
    axes.set_ylabel("decoder layer (residual stream output)")
    axes.set_title(title or "Logit lens of the mask", fontsize="small")
    figure.colorbar(image, ax=axes, shrink=0.8, label="Δlogit")
    return figure
