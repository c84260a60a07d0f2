"""Critical head localization (HONES_METHOD §2).

Head score Δ_(l,h) = P(θ) − P(θ with I_(l,h)) over the discovery split, with I_(l,h)
the mean replacement of head h at layer l's o_proj input
(``hones.interventions.mean_replace_heads``). Two utilities P:

- ``"metric"`` (the paper's): the task metric itself — greedy generation scored by
  VQA accuracy / ANLS / corpus BLEU-4 (vqa, ocr, caption), or NDCG@5 of the Yes−No
  margin (retrieval). One torchmetrics metric per head accumulates the whole split, so
  corpus-level metrics (BLEU-4, NDCG over groups) are exact.
- ``"teacher_forced"`` (fast alternative): per item, the mean log-probability of the
  target tokens; for retrieval the Yes−No margin logit(Yes) − logit(No) at the next
  token, sign-flipped for items whose target is "No". P is the mean over items.

Exact speed-ups (each tested against the plain computation):
1. items are batched;
2. several heads per forward: each item is replicated once per head and
   ``row_heads`` intervenes one head per row;
3. a head at layer l reruns only layers l..L-1 from the cached input of layer l
   (``hones.attribution.rerun``) — teacher-forced utility and the retrieval margin;
   generation always runs the full model;
4. running sums (``HeadUtilityAccumulator`` / torchmetrics metric states).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric

from hones.attribution.batches import batch_size, ensure_prompt_only, ensure_targets
from hones.attribution.rerun import (
    base_hidden_states,
    capture_layer_inputs,
    output_logits,
    replicate_batch,
    run_layers_from,
)
from hones.attribution.stats import HeadUtilityAccumulator
from hones.choices import UTILITIES
from hones.interventions import mean_replace_heads

Head = tuple[int, int]
# HONES_METHOD §2: |H*| for the paper's 7B models
DEFAULT_TOP_K = {"llava": 30, "qwen2_5_vl": 25}


# -- results ----------------------------------------------------------------------------
@dataclass
class HeadScores:
    """Head localization result.

    delta: Δ ``[L, H]`` = baseline − intervened (NaN for heads not evaluated).
    intervened: P with I_(l,h) ``[L, H]``.
    baseline: P of the unmodified model.
    utility: "teacher_forced" | "metric"; task: the task; num_items: items seen.
    """

    delta: Tensor
    intervened: Tensor
    baseline: float
    utility: str = "teacher_forced"
    task: str = ""
    num_items: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.delta.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.delta.shape[1])

    def ranked_heads(self) -> list[Head]:
        """Every evaluated head by Δ, descending (ties: lower layer, then lower head first)."""
        flat = self.delta.flatten().double()
        finite = torch.isfinite(flat)
        order = torch.sort(torch.where(finite, flat, torch.tensor(-math.inf, dtype=flat.dtype)), descending=True, stable=True).indices
        return [divmod(int(i), self.num_heads) for i in order.tolist() if bool(finite[i])]

    def top_heads(self, k: int) -> list[Head]:
        """H*: the top-k heads by Δ (k >= 1)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"|H*| (top_k) must be a whole number >= 1; got {k!r}")
        return self.ranked_heads()[:k]


def head_score_agreement(first: HeadScores, second: HeadScores, k: int) -> dict[str, float]:
    """Agreement of two head rankings (e.g. teacher-forced vs metric utility).

    Returns Spearman's rank correlation of Δ over heads evaluated by both, and the
    overlap |top-k ∩ top-k| / k of their H*.
    """
    a, b = first.delta.flatten().double(), second.delta.flatten().double()
    both = torch.isfinite(a) & torch.isfinite(b)
    spearman = _spearman(a[both], b[both]) if int(both.sum()) > 1 else float("nan")
    top_a, top_b = set(first.top_heads(k)), set(second.top_heads(k))
    return {"spearman": spearman, "top_k_overlap": len(top_a & top_b) / max(k, 1), "k": float(k)}


def _average_ranks(x: Tensor) -> Tensor:
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for value in torch.unique(x):  # ties share their mean rank
        tied = x == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def _spearman(a: Tensor, b: Tensor) -> float:
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else float("nan")


# -- candidate heads ---------------------------------------------------------------------
def candidate_heads(num_layers: int, num_heads: int, layers: Sequence[int] | None = None) -> list[Head]:
    """All (layer, head) pairs of the chosen layers (default all), layer-major."""
    chosen = range(num_layers) if layers is None else sorted(set(layers))
    return [(l, h) for l in chosen for h in range(num_heads)]


def heads_by_layer(heads: Sequence[Head], per_chunk: int) -> Iterator[tuple[int, list[Head]]]:
    """(layer, chunk) groups: heads of one layer, at most ``per_chunk`` per chunk, in layer order."""
    layers: dict[int, list[Head]] = {}
    for head in heads:
        layers.setdefault(int(head[0]), []).append((int(head[0]), int(head[1])))
    for layer in sorted(layers):
        group = layers[layer]
        for start in range(0, len(group), max(1, per_chunk)):
            yield layer, group[start : start + max(1, per_chunk)]


def row_head_list(chunk: Sequence[Head], num_items: int) -> list[Head]:
    """row_heads for ``num_items`` items each replicated ``len(chunk)`` times (item-major)."""
    return [head for _ in range(num_items) for head in chunk]


def intervened_chunks(
    adapter: Any, batch: Mapping[str, Any], heads: Sequence[Head], rows_per_forward: int
) -> Iterator[tuple[int, list[Head]]]:
    """``heads_by_layer`` chunks sized to ``rows_per_forward``, each yielded inside its intervention.

    While the caller handles ``(layer, chunk)``, ``mean_replace_heads`` is active with
    ``row_heads`` for ``batch`` replicated ``len(chunk)`` times (row i·k + j: item i, head
    chunk[j]), so the caller's forwards of that replicated batch (or of a rerun from
    layer ``layer``) see one head intervened per row (speed-up 2).
    """
    size = batch_size(batch)
    for layer, chunk in heads_by_layer(heads, max(1, rows_per_forward // size)):
        with mean_replace_heads(adapter, row_heads=row_head_list(chunk, size)):
            yield layer, chunk


# -- teacher-forced utility --------------------------------------------------------------
def _margin_signs(batch: Mapping[str, Any], rows: int, device: torch.device) -> Tensor:
    items = batch.get("items") or []
    signs = [-1.0 if str(getattr(item, "target", "Yes")).strip().lower() == "no" else 1.0 for item in items]
    return torch.tensor(signs or [1.0] * rows, device=device)


def target_log_prob_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean log p(target token) per row: logits ``[rows, seq, vocab]``, labels ``[rows, seq]`` -> ``[rows]``.

    The plain reference: position t predicts labels[t + 1]; -100 labels are ignored.
    """
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != -100
    picked = log_probs.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    return (picked * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def target_log_prob(adapter: Any, normed_hidden: Tensor, labels: Tensor) -> Tensor:
    """Mean log p(target token) per row from final-norm hidden states ``[rows, seq, hidden]``.

    Applies the lm_head only at the positions that predict a target token, so no
    ``[rows, seq, vocab]`` tensor is built. Equals ``target_log_prob_from_logits``.
    """
    targets = labels[:, 1:].to(normed_hidden.device)
    mask = targets != -100
    rows, positions = torch.nonzero(mask, as_tuple=True)
    logits = output_logits(adapter, normed_hidden[rows, positions]).float()  # [n_tokens, vocab]
    picked = torch.log_softmax(logits, dim=-1).gather(-1, targets[rows, positions][:, None])[:, 0]
    sums = torch.zeros(labels.shape[0], device=picked.device, dtype=picked.dtype).index_add_(0, rows, picked)
    return sums / mask.sum(-1).clamp_min(1).to(sums.dtype)


def yes_no_margin(adapter: Any, next_token_logits: Tensor) -> Tensor:
    """logit(Yes) − logit(No) ``[rows]`` from next-token logits ``[rows, vocab]``."""
    yes_id, no_id = adapter.answer_token_ids(["Yes", "No"])
    logits = next_token_logits.float()
    return logits[:, yes_id] - logits[:, no_id]


def margin_gap(margins: Tensor, positive: Tensor) -> Tensor:
    """Mean Yes−No margin of the positives minus that of the negatives (retrieval's
    teacher-forced reading of a ranking): margins ``[rows]``, positive ``[rows]`` bool."""
    return margins[positive].mean() - margins[~positive].mean()


def teacher_forced_measure(task: str) -> str:
    """What the teacher-forced score of ``task`` is, in words (for reports)."""
    if task == "retrieval":
        return "margin gap (positive − negative logit(Yes) − logit(No))"
    return "mean log p(target token) (nats)"


def _prompt_last_hidden(normed_hidden: Tensor, batch: Mapping[str, Any]) -> Tensor:
    last = batch["prompt_last_index"].to(normed_hidden.device)
    rows = torch.arange(normed_hidden.shape[0], device=normed_hidden.device)
    return normed_hidden[rows, last]


def teacher_forced_utility(adapter: Any, normed_hidden: Tensor, batch: Mapping[str, Any], task: str) -> Tensor:
    """Per-row teacher-forced utility ``[rows]`` from final-norm hidden states ``[rows, seq, hidden]``.

    Retrieval: the Yes−No margin at ``prompt_last_index`` (negated where the target is
    "No"); other tasks: mean log-probability of the ``labels`` tokens.
    """
    if task == "retrieval":
        logits = output_logits(adapter, _prompt_last_hidden(normed_hidden, batch))
        return yes_no_margin(adapter, logits) * _margin_signs(batch, normed_hidden.shape[0], logits.device)
    return target_log_prob(adapter, normed_hidden, batch["labels"])


def teacher_forced_utility_from_logits(adapter: Any, logits: Tensor, batch: Mapping[str, Any], task: str) -> Tensor:
    """The plain reference of ``teacher_forced_utility`` from full logits ``[rows, seq, vocab]``."""
    if task == "retrieval":
        last = batch["prompt_last_index"].to(logits.device)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return yes_no_margin(adapter, logits[rows, last]) * _margin_signs(batch, logits.shape[0], logits.device)
    return target_log_prob_from_logits(logits, batch["labels"].to(logits.device))


def _metadata(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a batch the utilities read (small; cheap to replicate)."""
    return {key: batch[key] for key in ("labels", "prompt_last_index", "items", "input_ids") if key in batch}


@torch.no_grad()
def teacher_forced_head_utilities(
    adapter: Any,
    batch: Mapping[str, Any],
    heads: Sequence[Head],
    task: str,
    rows_per_forward: int = 64,
    rerun: bool = True,
) -> tuple[Tensor, Tensor]:
    """Teacher-forced utilities of one batch without and with each head intervention.

    Args:
        batch: encoded with targets (``labels``, ``prompt_last_index``).
        heads: the heads to evaluate (n of them).
        rows_per_forward: max rows (items × heads) per forward.
        rerun: rerun only layers ≥ l from the cached layer input (speed-up 3); False runs
            the whole model on the replicated batch (speed-ups 1, 2 only).

    Returns ``(baseline [b], intervened [n, b])``, rows of ``intervened`` in ``heads`` order.
    """
    size = batch_size(batch)
    meta = _metadata(batch)
    layers = sorted({int(l) for l, _ in heads})
    with capture_layer_inputs(adapter, layers=layers if rerun else []) as record:
        hidden = base_hidden_states(adapter, batch)
    baseline = teacher_forced_utility(adapter, hidden, meta, task)
    position = {(int(l), int(h)): k for k, (l, h) in enumerate(heads)}
    intervened = torch.empty(len(heads), size, device=baseline.device, dtype=baseline.dtype)
    for layer, chunk in intervened_chunks(adapter, batch, heads, rows_per_forward):
        repeats = len(chunk)
        if rerun:
            hidden = run_layers_from(adapter, record, layer, repeats=repeats)
        else:
            hidden = base_hidden_states(adapter, replicate_batch(batch, repeats))
        values = teacher_forced_utility(adapter, hidden, replicate_batch(meta, repeats), task)
        values = values.view(size, repeats).T  # [heads in chunk, items]
        for k, head in enumerate(chunk):
            intervened[position[head]] = values[k]
    return baseline, intervened


# -- metric utility ----------------------------------------------------------------------
def _head_key(head: Head | None) -> str:
    return "baseline" if head is None else f"L{head[0]}H{head[1]}"


def _metric_rows(scorer: Any, adapter: Any, batch: Mapping[str, Any], margins: Tensor | None) -> list[dict[str, Any]]:
    """TaskScorer-style rows for a (possibly replicated) batch; margins given for retrieval."""
    if margins is None:
        return scorer.predict(adapter, dict(batch))
    return [
        {"uid": item.uid, "group": item.group, "label": int(item.label), "score": float(m)}
        for item, m in zip(batch["items"], margins.tolist())
    ]


@torch.no_grad()
def metric_head_rows(
    adapter: Any,
    batch: Mapping[str, Any],
    heads: Sequence[Head],
    scorer: Any,
    rows_per_forward: int = 64,
    rerun: bool = True,
) -> dict[Head | None, list[dict[str, Any]]]:
    """Scored rows (see ``hones.evaluation.TaskScorer``) per head (None: the unmodified model).

    vqa/ocr/caption: greedy generation of the replicated prompt-only batch with
    ``row_heads`` (speed-ups 1, 2). Retrieval: the Yes−No margin at the next token, from
    the rerun of layers ≥ l when ``rerun`` (speed-up 3).
    """
    out: dict[Head | None, list[dict[str, Any]]] = {}
    retrieval = scorer.task == "retrieval"
    record = None
    if retrieval:
        layers = sorted({int(l) for l, _ in heads}) if rerun else []
        with capture_layer_inputs(adapter, layers=layers) as record:
            hidden = base_hidden_states(adapter, batch)
        margins = yes_no_margin(adapter, output_logits(adapter, _prompt_last_hidden(hidden, batch)))
        out[None] = _metric_rows(scorer, adapter, batch, margins)
    else:
        out[None] = _metric_rows(scorer, adapter, batch, None)
    for layer, chunk in intervened_chunks(adapter, batch, heads, rows_per_forward):
        repeats = len(chunk)
        replicated = replicate_batch(batch, repeats)
        if retrieval and rerun:
            hidden = run_layers_from(adapter, record, layer, repeats=repeats)
        elif retrieval:
            hidden = base_hidden_states(adapter, replicated)
        if retrieval:
            logits = output_logits(adapter, _prompt_last_hidden(hidden, replicated))
            rows = _metric_rows(scorer, adapter, replicated, yes_no_margin(adapter, logits))
        else:
            rows = _metric_rows(scorer, adapter, replicated, None)
        for k, head in enumerate(chunk):
            out[head] = rows[k::repeats]
    return out


class MetricHeadAccumulator(nn.Module):
    """One task metric (``build_metric(task, mode)``) for the unmodified model and per head.

    Each metric accumulates its own rows over the split and synchronises across
    processes in ``compute`` (torchmetrics), so corpus-level metrics are exact.
    """

    def __init__(self, task: str, heads: Sequence[Head], num_layers: int, num_heads: int, mode: str = "paper") -> None:
        super().__init__()
        from hones.evaluation import TaskScorer
        from hones.metrics import build_metric

        self.scorer = TaskScorer(task)
        self.heads = [(int(l), int(h)) for l, h in heads]
        self.num_layers, self.num_heads = int(num_layers), int(num_heads)
        self.metrics = nn.ModuleDict({_head_key(None): build_metric(task, mode)})
        for head in self.heads:
            self.metrics[_head_key(head)] = build_metric(task, mode)

    def update(self, rows_by_head: Mapping[Head | None, Sequence[dict[str, Any]]]) -> None:
        for head, rows in rows_by_head.items():
            self.scorer.update(self.metrics[_head_key(head)], list(rows))

    def compute(self) -> dict[str, Tensor]:
        baseline = torch.as_tensor(self.metrics[_head_key(None)].compute(), dtype=torch.float64).cpu()
        intervened = torch.full((self.num_layers, self.num_heads), float("nan"), dtype=torch.float64)
        for head in self.heads:
            intervened[head] = float(self.metrics[_head_key(head)].compute())
        return {"baseline": baseline, "intervened": intervened, "delta": baseline - intervened}

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()


# -- the accumulating localizer ----------------------------------------------------------
def check_heads(heads: Sequence[Head], num_layers: int, num_heads: int) -> None:
    """Raise ``ValueError`` (one line) for the first head outside ``num_layers`` x ``num_heads``."""
    for layer, head in heads:
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise ValueError(f"head ({layer}, {head}) out of range for {num_layers} layers x {num_heads} heads")


class HeadLocalizer(nn.Module):
    """Accumulates head scores over batches of the discovery split (HONES_METHOD §2).

    Args:
        num_layers, num_heads: the language model's L and H.
        task: vqa | ocr | caption | retrieval.
        utility: "teacher_forced" (default, fast) or "metric" (the paper's).
        heads: candidate heads (default: all L × H).
        rows_per_forward: max rows (items × heads) in one forward / generate call.
        rerun: use the layer-l rerun (teacher-forced and retrieval).
        metric_mode: the metrics' mode ("paper" | "official") for ``utility="metric"``.
        max_new_tokens: generation budget for ``utility="metric"`` (§1 default 24).

    ``update(adapter, batch)`` takes a datamodule batch (re-encoded from its items when it
    lacks the needed form); ``compute()`` returns ``HeadScores`` (synchronised across
    processes).
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        task: str,
        utility: str = "teacher_forced",
        heads: Sequence[Head] | None = None,
        rows_per_forward: int = 64,
        rerun: bool = True,
        metric_mode: str = "paper",
        max_new_tokens: int = 24,
    ) -> None:
        super().__init__()
        if utility not in UTILITIES:
            raise ValueError(f"utility must be one of {UTILITIES}; got {utility!r}")
        self.num_layers, self.num_heads = int(num_layers), int(num_heads)
        self.task, self.utility = task, utility
        self.heads = [(int(l), int(h)) for l, h in heads] if heads is not None else candidate_heads(num_layers, num_heads)
        check_heads(self.heads, num_layers, num_heads)
        self.rows_per_forward, self.rerun = int(rows_per_forward), bool(rerun)
        self.max_new_tokens = int(max_new_tokens)
        self.sums = HeadUtilityAccumulator(num_layers, num_heads) if utility == "teacher_forced" else None
        self.metrics = (
            MetricHeadAccumulator(task, self.heads, num_layers, num_heads, metric_mode) if utility == "metric" else None
        )
        if self.metrics is not None:
            self.metrics.scorer.max_new_tokens = self.max_new_tokens
        self.item_count = SumMetric()

    @torch.no_grad()
    def update(self, adapter: Any, batch: Mapping[str, Any]) -> None:
        """Score one batch for the unmodified model and every candidate head."""
        if self.sums is not None:
            batch = ensure_targets(adapter, batch)
            baseline, intervened = teacher_forced_head_utilities(
                adapter, batch, self.heads, self.task, self.rows_per_forward, self.rerun
            )
            self.sums.update(baseline, self.heads, intervened)
        else:
            assert self.metrics is not None
            batch = ensure_prompt_only(adapter, batch)
            self.metrics.update(
                metric_head_rows(adapter, batch, self.heads, self.metrics.scorer, self.rows_per_forward, self.rerun)
            )
        self.item_count.update(float(batch_size(batch)))

    def compute(self) -> HeadScores:
        """HeadScores of everything seen so far (all processes)."""
        values = self.sums.compute() if self.sums is not None else self.metrics.compute()  # type: ignore[union-attr]
        num_items = int(self.item_count.compute())
        return HeadScores(
            delta=values["delta"].detach().cpu().double(),
            intervened=values["intervened"].detach().cpu().double(),
            baseline=float(values["baseline"]),
            utility=self.utility,
            task=self.task,
            num_items=num_items,
        )

    def reset(self) -> None:
        if self.sums is not None:
            self.sums.reset()
        if self.metrics is not None:
            self.metrics.reset()
        self.item_count.reset()
