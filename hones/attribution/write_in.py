"""Write-in contribution of FFN neurons toward the target (HONES_METHOD §3, "DVP").

For an item with target y, at the last prompt position:

    u_y    = normalise(Σ_t w_t U[t])      over y's tokens (special tokens dropped, ≤ 128)
    c[l,i] = z[l,i] · ⟨W_down^l[:, i], u_y⟩

with U the unembedding ``[vocab, hidden]``, w_t = 1 except for captions, where w_t is
the smoothed IDF of token t over the discovery split's caption token sets:
idf(t) = ln((n + 1) / (df(t) + 1)) + 1. The sum runs over token occurrences (a token
that occurs twice counts twice).

Everything is vectorised over the batch: directions ``[batch, hidden]``, projections
``W_down^T u_y`` ``[batch, L, I]``, activations ``[batch, L, I]``.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, ContextManager, Iterable, Sequence

import torch
from torch import Tensor

from hones.interventions import capture_ffn_activations

MAX_TARGET_TOKENS = 128


# -- target tokens and weights ------------------------------------------------------
def target_text(item: Any) -> str:
    """The text whose tokens define u_y: the references joined for captions, else ``item.target``."""
    if getattr(item, "task", "") == "caption" and getattr(item, "references", None):
        return " ".join(item.references)
    return item.target


def target_token_ids(adapter: Any, texts: Sequence[str], max_tokens: int | None = MAX_TARGET_TOKENS) -> list[list[int]]:
    """Per text, the ids of its tokens as the model emits them after the generation prompt
    (``adapter.emitted_token_ids``: the tokens teacher forcing trains), special tokens
    dropped, truncated to ``max_tokens`` (None: all)."""
    special = set(getattr(adapter.tokenizer, "all_special_ids", []) or [])
    rows = [[t for t in ids if t not in special] for ids in adapter.emitted_token_ids(list(texts))]
    return rows if max_tokens is None else [row[:max_tokens] for row in rows]


def label_token_ids(labels: Tensor, special_ids: Iterable[int], max_tokens: int = MAX_TARGET_TOKENS) -> list[list[int]]:
    """Per row, the target tokens of teacher-forcing ``labels`` ``[batch, seq]`` (-100 and specials dropped)."""
    special = set(int(s) for s in special_ids)
    rows = []
    for row in labels.tolist():
        rows.append([t for t in row if t != -100 and t not in special][:max_tokens])
    return rows


def caption_idf(token_sets: Iterable[Iterable[int]], vocab_size: int) -> Tensor:
    """Smoothed IDF ``[vocab]`` over documents' token sets: ln((n+1)/(df+1)) + 1.

    token_sets: one iterable of token ids per discovery item (duplicates ignored).
    Tokens never seen get ln(n+1) + 1.
    """
    df = torch.zeros(vocab_size, dtype=torch.float64)
    n = 0
    for tokens in token_sets:
        unique = torch.tensor(sorted(set(int(t) for t in tokens)), dtype=torch.long)
        if unique.numel():
            df.index_add_(0, unique, torch.ones(unique.numel(), dtype=torch.float64))
        n += 1
    return (torch.log((n + 1) / (df + 1)) + 1).to(torch.float32)


def target_directions(
    unembedding: Tensor, token_ids: Sequence[Sequence[int]], token_weights: Tensor | None = None
) -> Tensor:
    """u_y for each item: ``[batch, hidden]``, unit norm.

    Args:
        unembedding: U ``[vocab, hidden]``.
        token_ids: per item, the target token ids (already filtered/truncated).
        token_weights: optional ``[vocab]`` weights w_t (caption IDF); default w_t = 1.
    """
    if any(len(ids) == 0 for ids in token_ids):
        empty = [k for k, ids in enumerate(token_ids) if len(ids) == 0]
        raise ValueError(f"items {empty} have no target token after dropping special tokens")
    length = max(len(ids) for ids in token_ids)
    device = unembedding.device
    ids = torch.zeros(len(token_ids), length, dtype=torch.long, device=device)
    weights = torch.zeros(len(token_ids), length, dtype=torch.float32, device=device)
    for row, row_ids in enumerate(token_ids):
        ids[row, : len(row_ids)] = torch.tensor(list(row_ids), dtype=torch.long, device=device)
        weights[row, : len(row_ids)] = 1.0
    if token_weights is not None:
        weights = weights * token_weights.to(device=device, dtype=torch.float32)[ids]
    summed = torch.einsum("bt,btd->bd", weights, unembedding[ids].float())
    return summed / summed.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def item_target_directions(
    adapter: Any, items: Sequence[Any], idf: Tensor | None = None, max_tokens: int = MAX_TARGET_TOKENS
) -> Tensor:
    """u_y ``[batch, hidden]`` for TaskItems (HONES_METHOD §3).

    The tokens are the target's as the model emits them after the generation prompt
    (``target_token_ids``). Captions: the references joined, IDF-weighted when ``idf`` is
    given. Retrieval: the first token of the item's answer ("Yes"/"No", as
    ``adapter.answer_token_ids`` gives it), matching the Yes-No margin. Others: the target.
    """
    token_ids = target_token_ids(adapter, [target_text(item) for item in items], max_tokens)
    for row, item in zip(token_ids, items):
        if getattr(item, "task", "") == "retrieval":
            del row[1:]
    is_caption = torch.tensor([getattr(item, "task", "") == "caption" for item in items])
    unembedding = adapter.unembedding()
    plain = target_directions(unembedding, token_ids)
    if idf is None or not bool(is_caption.any()):
        return plain
    weighted = target_directions(unembedding, token_ids, idf)
    return torch.where(is_caption.to(plain.device)[:, None], weighted, plain)


# -- write-in contribution ------------------------------------------------------------
def down_projection_weights(adapter: Any, layers: Sequence[int] | None = None) -> list[Tensor]:
    """W_down of each layer, ``[hidden, ffn]`` (the ``down_proj`` weight, not copied)."""
    chosen = range(adapter.num_layers) if layers is None else layers
    return [adapter.mlp(l).down_proj.weight for l in chosen]


def projected_directions(down_weights: Sequence[Tensor], directions: Tensor) -> Tensor:
    """W_down^T u_y per layer: ``[batch, L, I]`` from L weights ``[hidden, I]`` and ``[batch, hidden]``.

    Computed in float32 whatever the model's dtype (one layer's weight is upcast at a time).
    """
    return torch.stack([directions.float() @ w.float() for w in down_weights], dim=1)


def write_in(activations: Tensor, projections: Tensor) -> Tensor:
    """c = z · ⟨W_down[:, i], u_y⟩, elementwise: ``[batch, L, I]`` × ``[batch, L, I]``."""
    return activations.float() * projections.float()


def stack_layers(captured: dict[int, Tensor], layers: Sequence[int]) -> Tensor:
    """``{layer: [batch, I]}`` -> ``[batch, len(layers), I]`` (float32)."""
    return torch.stack([captured[l].float() for l in layers], dim=1)


def write_in_contributions(
    adapter: Any,
    batch: dict[str, Any],
    target_dirs: Tensor,
    interventions: Sequence[ContextManager[Any]] | None = None,
) -> Tensor:
    """c ``[batch, L, I]`` at each item's last prompt position, with a full forward.

    Args:
        batch: encoded batch with ``prompt_last_index`` ``[batch]``.
        target_dirs: u_y ``[batch, hidden]`` (``item_target_directions``).
        interventions: context managers entered around the forward (e.g.
            ``mean_replace_heads(adapter, [(l, h)])``), in order.
    """
    from hones.attribution.rerun import base_hidden_states

    positions = batch["prompt_last_index"]
    layers = list(range(adapter.num_layers))
    with ExitStack() as stack:
        for manager in interventions or ():
            stack.enter_context(manager)
        captured = stack.enter_context(capture_ffn_activations(adapter, layers, positions=positions))
        base_hidden_states(adapter, batch)
    z = stack_layers(captured, layers)
    projections = projected_directions(down_projection_weights(adapter), target_dirs)
    return write_in(z, projections.to(z.device))


def idf_from_items(adapter: Any, items: Iterable[Any]) -> Tensor:
    """Caption IDF ``[vocab]`` over the discovery split's caption token sets.

    Each caption item is one document: the token set of its caption target (the references
    joined), tokenized as u_y takes it (``target_token_ids``: as the model emits it, special
    tokens dropped; untruncated). The same tokens as u_y's, so every token u_y weights has its
    own document frequency; a reference tokenized alone would give another id to a word that
    follows a space in the joined text (byte-level BPE: "A" vs " A").
    """
    captions = [target_text(item) for item in items if getattr(item, "task", "") == "caption"]
    sets = target_token_ids(adapter, captions, None) if captions else []
    vocab = int(adapter.unembedding().shape[0])
    return caption_idf(sets, vocab)


__all__ = [
    "MAX_TARGET_TOKENS",
    "caption_idf",
    "down_projection_weights",
    "idf_from_items",
    "item_target_directions",
    "label_token_ids",
    "projected_directions",
    "stack_layers",
    "target_directions",
    "target_text",
    "target_token_ids",
    "write_in",
    "write_in_contributions",
]
