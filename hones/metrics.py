"""Task metrics of HONES (HONES_METHOD §1), each in a "paper" and an "official" mode.

Every metric is a :class:`torchmetrics.Metric` whose states are sums (or, for NDCG,
concatenated per-item tensors), so ``compute()`` synchronises across processes.

=============  ==================  ===============================================
task           metric              ``update`` signature
=============  ==================  ===============================================
``vqa``        :class:`VQAAccuracy` ``update(predictions, references, keep=None)``
``ocr``        :class:`ANLS`        ``update(predictions, references, keep=None)``
``caption``    :class:`BLEU4`       ``update(predictions, references, keep=None)``
``retrieval``  :class:`NDCG`        ``update(scores, labels, groups, keep=None)``
=============  ==================  ===============================================

``predictions`` is a list of generated strings, ``references`` a list (one per
prediction) of lists of reference strings. ``keep`` is an optional boolean mask, one per
item: items with ``keep=False`` are ignored. Use it in distributed evaluation to drop
the duplicated items a padding distributed sampler adds (alternatively, filter before
calling ``update``). The text metrics apply :func:`postprocess_generation` to the
predictions first (``postprocess=False`` turns that off).

The differences between the modes are tabulated in ``docs/metrics.md``.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from hones.choices import METRIC_MODES, TASKS
from hones.text_normalization import (
    levenshtein,
    normalize_anls_official,
    normalize_anls_paper,
    normalize_vqa_official,
    normalize_vqa_paper,
    postprocess_generation,
    tokenize_bleu_paper,
    tokenize_ptb_coco,
)

__all__ = [
    "MODES",
    "TASKS",
    "Mode",
    "VQAAccuracy",
    "ANLS",
    "BLEU4",
    "NDCG",
    "BleuStatistics",
    "build_metric",
    "postprocess_generation",
    "vqa_accuracy",
    "anls",
    "bleu4_statistics",
    "bleu4_from_statistics",
    "corpus_bleu4",
    "ndcg_at_k",
    "group_ids",
]

Mode = Literal["paper", "official"]
MODES: tuple[str, ...] = METRIC_MODES

KeepMask = Sequence[bool] | Tensor | None

# Constants of the COCO caption evaluation's BLEU scorer (official mode).
COCO_BLEU_TINY: float = 1e-15
COCO_BLEU_SMALL: float = 1e-9
BLEU_MAX_ORDER: int = 4


# ---------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown metric mode {mode!r}; allowed modes: {', '.join(MODES)}")
    return mode


def _keep_indices(n: int, keep: KeepMask) -> list[int]:
    """Indices of the items to score, from an optional boolean mask of length ``n``."""
    if keep is None:
        return list(range(n))
    mask = keep.tolist() if isinstance(keep, Tensor) else list(keep)
    if len(mask) != n:
        raise ValueError(f"keep has {len(mask)} entries for {n} items")
    return [i for i, k in enumerate(mask) if bool(k)]


def _check_text_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(predictions, str):
        raise TypeError("predictions must be a list of strings, not one string")
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference lists"
        )
    for i, refs in enumerate(references):
        if isinstance(refs, str):
            raise TypeError(
                "references must be a list of lists of strings (one list per prediction); "
                f"item {i} is a bare string: wrap it as [{refs!r}]"
            )
        if len(refs) == 0:
            raise ValueError(f"item {i} has no reference")


# ---------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------


class _ModeMetric(Metric):
    """A metric with a ``mode`` ("paper" | "official") and a ``name`` for logging."""

    is_differentiable: ClassVar[bool] = False
    higher_is_better: ClassVar[bool] = True
    full_state_update: ClassVar[bool] = False
    plot_lower_bound: ClassVar[float] = 0.0
    plot_upper_bound: ClassVar[float] = 1.0
    #: short metric name; ``name`` is ``f"{metric_name}/{mode}"``
    metric_name: ClassVar[str] = ""

    def __init__(self, mode: str = "paper", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._mode = _check_mode(mode)

    @property
    def mode(self) -> str:
        """``"paper"`` or ``"official"``."""
        return self._mode

    @property
    def name(self) -> str:
        """Logging name, e.g. ``"vqa_accuracy/paper"``."""
        return f"{self.metric_name}/{self._mode}"

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Merge another instance's state; refuses an instance of another mode."""
        if isinstance(incoming_state, _ModeMetric) and incoming_state.mode != self.mode:
            raise ValueError(
                f"cannot merge a {incoming_state.name} state into {self.name}: modes differ"
            )
        super().merge_state(incoming_state)

    def extra_repr(self) -> str:
        return f"mode={self._mode!r}"


class _MeanScoreMetric(_ModeMetric):
    """Mean of a per-item score; states: ``score_sum`` (float64) and ``total``."""

    score_sum: Tensor
    total: Tensor

    def __init__(self, mode: str = "paper", postprocess: bool = True, **kwargs: Any) -> None:
        super().__init__(mode=mode, **kwargs)
        self.postprocess = postprocess
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _score(self, prediction: str, references: Sequence[str]) -> float:
        raise NotImplementedError

    def update(
        self,
        predictions: Sequence[str],
        references: Sequence[Sequence[str]],
        keep: KeepMask = None,
    ) -> None:
        """Score each prediction against its references and accumulate.

        Args:
            predictions: generated strings, one per item.
            references: the reference strings of each item (a list per item).
            keep: optional boolean mask; items with ``False`` are ignored.
        """
        _check_text_inputs(predictions, references)
        scores = []
        for i in _keep_indices(len(predictions), keep):
            pred = postprocess_generation(predictions[i]) if self.postprocess else predictions[i]
            scores.append(self._score(pred, references[i]))
        self.score_sum += math.fsum(scores)
        self.total += len(scores)

    def compute(self) -> Tensor:
        """Mean score over all items seen (NaN when no item was seen)."""
        if int(self.total) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.score_sum.device)
        return self.score_sum / self.total


# ---------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------


def vqa_accuracy(prediction: str, references: Sequence[str], mode: str = "paper") -> float:
    """VQA accuracy of one prediction (no generation post-processing applied here).

    paper:
        answers normalised by :func:`~hones.text_normalization.normalize_vqa_paper`;
        with several references ``min(#exact matches / 3, 1)``; with one reference 1.0
        if the normalised prediction equals it or contains it as a whole-word
        sequence (``"yes it is"`` contains ``"yes"``; ``"snow"`` does not contain
        ``"no"``), else 0.0.
    official:
        answers processed by :func:`~hones.text_normalization.normalize_vqa_official`
        (VQA challenge processing, applied to prediction and references); with N >= 2
        references the mean over the N leave-one-out subsets of N-1 references of
        ``min(#matches / 3, 1)``; with one reference the exact match of the processed
        strings.
    """
    _check_mode(mode)
    if isinstance(references, str) or len(references) == 0:
        raise ValueError("references must be a non-empty list of strings")
    if mode == "paper":
        pred = normalize_vqa_paper(prediction)
        refs = [normalize_vqa_paper(r) for r in references]
        if len(refs) == 1:
            ref = refs[0]
            if pred == ref:
                return 1.0
            return float(bool(ref) and f" {ref} " in f" {pred} ")
        return min(sum(r == pred for r in refs) / 3.0, 1.0)
    pred = normalize_vqa_official(prediction)
    matches = [normalize_vqa_official(r) == pred for r in references]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    # leaving out reference i leaves total - matches[i] matching answers
    return math.fsum(min((total - m) / 3.0, 1.0) for m in matches) / len(matches)


class VQAAccuracy(_MeanScoreMetric):
    """VQA accuracy averaged over items (see :func:`vqa_accuracy` for both modes).

    Args:
        mode: ``"paper"`` or ``"official"``.
        postprocess: apply :func:`postprocess_generation` to predictions first.
        kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).
    """

    metric_name: ClassVar[str] = "vqa_accuracy"

    def _score(self, prediction: str, references: Sequence[str]) -> float:
        return vqa_accuracy(prediction, references, self.mode)


# ---------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------


def _nls(a: str, b: str, threshold: float) -> float:
    longest = max(len(a), len(b))
    nl = levenshtein(a, b) / longest if longest else 0.0
    return 1.0 - nl if nl < threshold else 0.0


def anls(
    prediction: str, references: Sequence[str], mode: str = "paper", threshold: float = 0.5
) -> float:
    """Average-normalised-Levenshtein-similarity score of one prediction.

    ``NL(a, b) = lev(a, b) / max(len a, len b)`` (0 when both are empty); the score
    against one gold string is ``1 - NL`` if ``NL < threshold`` else 0.

    paper:
        strings lowercased and reduced to their alphanumeric characters (spaces
        removed); scored against the first reference only.
    official (ST-VQA / DocVQA):
        strings lowercased and stripped of leading/trailing whitespace, inner spaces
        and punctuation kept; the maximum over all references.
    """
    _check_mode(mode)
    if isinstance(references, str) or len(references) == 0:
        raise ValueError("references must be a non-empty list of strings")
    if mode == "paper":
        return _nls(normalize_anls_paper(prediction), normalize_anls_paper(references[0]), threshold)
    pred = normalize_anls_official(prediction)
    return max(_nls(pred, normalize_anls_official(r), threshold) for r in references)


class ANLS(_MeanScoreMetric):
    """ANLS averaged over items (see :func:`anls` for both modes).

    Args:
        mode: ``"paper"`` or ``"official"``.
        threshold: NL at or above which an answer scores 0 (default 0.5).
        postprocess: apply :func:`postprocess_generation` to predictions first.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    metric_name: ClassVar[str] = "anls"

    def __init__(
        self, mode: str = "paper", threshold: float = 0.5, postprocess: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(mode=mode, postprocess=postprocess, **kwargs)
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold

    def _score(self, prediction: str, references: Sequence[str]) -> float:
        return anls(prediction, references, self.mode, self.threshold)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, threshold={self.threshold}"


# ---------------------------------------------------------------------------
# BLEU-4
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BleuStatistics:
    """Sufficient statistics of corpus BLEU for one or more segments.

    ``matches[n-1]`` / ``totals[n-1]``: clipped matching n-grams / n-grams in the
    hypothesis; ``hyp_len``: hypothesis tokens; ``ref_len``: length of the reference
    closest in length to the hypothesis (ties: the shorter one).
    """

    matches: tuple[int, ...]
    totals: tuple[int, ...]
    hyp_len: int
    ref_len: int


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _tokenizer(mode: str) -> Callable[[str], list[str]]:
    return tokenize_bleu_paper if _check_mode(mode) == "paper" else tokenize_ptb_coco


def bleu4_statistics(
    prediction: str,
    references: Sequence[str],
    mode: str = "paper",
    max_order: int = BLEU_MAX_ORDER,
) -> BleuStatistics:
    """Clipped n-gram counts and lengths of one hypothesis against its references.

    Tokenisation: paper mode :func:`~hones.text_normalization.tokenize_bleu_paper`;
    official mode :func:`~hones.text_normalization.tokenize_ptb_coco`.
    """
    if isinstance(references, str) or len(references) == 0:
        raise ValueError("references must be a non-empty list of strings")
    tokenize = _tokenizer(mode)
    hyp = tokenize(prediction)
    refs = [tokenize(r) for r in references]
    matches: list[int] = []
    totals: list[int] = []
    for n in range(1, max_order + 1):
        hyp_counts = _ngrams(hyp, n)
        max_ref: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            max_ref |= _ngrams(ref, n)  # element-wise maximum
        matches.append(sum(min(c, max_ref[g]) for g, c in hyp_counts.items()))
        totals.append(max(len(hyp) - n + 1, 0))
    ref_len = min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]
    return BleuStatistics(tuple(matches), tuple(totals), len(hyp), ref_len)


def bleu4_from_statistics(
    matches: Sequence[float],
    totals: Sequence[float],
    hyp_len: float,
    ref_len: float,
    mode: str = "paper",
    smooth: bool = False,
) -> float:
    """Corpus BLEU from summed statistics (uniform weights over the orders given).

    paper:
        Papineni et al. (2002): ``BP * exp(mean_n log(matches_n / totals_n))`` with
        ``BP = 1`` if ``hyp_len > ref_len`` else ``exp(1 - ref_len / hyp_len)``; 0 if
        some order has no match. ``smooth=True`` adds 1 to the matches and totals of
        orders n >= 2 (Lin & Och 2004; sacrebleu's ``add-k`` with k=1).
    official:
        the COCO caption scorer: ``prod_n ((matches_n + 1e-15) / (totals_n + 1e-9))``
        to the power ``1/N``, times ``exp(1 - 1/ratio)`` when
        ``ratio = (hyp_len + 1e-15) / (ref_len + 1e-9) < 1``. The constants make a
        zero-match order give a tiny positive score instead of 0.
    """
    _check_mode(mode)
    order = len(matches)
    if mode == "official":
        if smooth:
            raise ValueError("smooth is only available in paper mode")
        log_p = sum(
            math.log((float(m) + COCO_BLEU_TINY) / (float(t) + COCO_BLEU_SMALL))
            for m, t in zip(matches, totals, strict=True)
        )
        score = math.exp(log_p / order)
        ratio = (float(hyp_len) + COCO_BLEU_TINY) / (float(ref_len) + COCO_BLEU_SMALL)
        if ratio < 1.0:
            score *= math.exp(1.0 - 1.0 / ratio)
        return score
    num = [float(m) for m in matches]
    den = [float(t) for t in totals]
    if smooth:
        num = [m + (n > 0) for n, m in enumerate(num)]
        den = [t + (n > 0) for n, t in enumerate(den)]
    if hyp_len <= 0 or any(t <= 0 for t in den) or any(m <= 0 for m in num):
        return 0.0
    log_p = math.fsum(math.log(m / t) for m, t in zip(num, den, strict=True)) / order
    bp = 1.0 if hyp_len > ref_len else math.exp(1.0 - float(ref_len) / float(hyp_len))
    return bp * math.exp(log_p)


def corpus_bleu4(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    mode: str = "paper",
    smooth: bool = False,
) -> float:
    """Corpus BLEU-4 of a list of predictions (convenience wrapper around :class:`BLEU4`)."""
    metric = BLEU4(mode=mode, smooth=smooth, postprocess=False)
    metric.update(predictions, references)
    return float(metric.compute())


class BLEU4(_ModeMetric):
    """Corpus BLEU-4 (see :func:`bleu4_from_statistics` for both modes).

    States are the summed clipped matches and n-gram totals per order and the summed
    hypothesis / closest-reference lengths, so distributed synchronisation is a sum.

    Args:
        mode: ``"paper"`` (alphanumeric-run tokens, Papineni BLEU) or ``"official"``
            (PTB-style tokens, COCO scorer arithmetic).
        smooth: paper mode only: add-one smoothing of orders 2-4.
        max_references: use at most this many references per item (``None``: all).
        postprocess: apply :func:`postprocess_generation` to predictions first.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    metric_name: ClassVar[str] = "bleu4"
    matches: Tensor
    totals: Tensor
    hyp_len: Tensor
    ref_len: Tensor

    def __init__(
        self,
        mode: str = "paper",
        smooth: bool = False,
        max_references: int | None = None,
        postprocess: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(mode=mode, **kwargs)
        if smooth and self.mode == "official":
            raise ValueError("smooth is only available in paper mode (the COCO scorer has none)")
        if max_references is not None and max_references < 1:
            raise ValueError(f"max_references must be >= 1 or None, got {max_references}")
        self.smooth = smooth
        self.max_references = max_references
        self.postprocess = postprocess
        zeros = torch.zeros(BLEU_MAX_ORDER, dtype=torch.long)
        self.add_state("matches", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("totals", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("hyp_len", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("ref_len", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        predictions: Sequence[str],
        references: Sequence[Sequence[str]],
        keep: KeepMask = None,
    ) -> None:
        """Accumulate the BLEU statistics of each prediction against its references."""
        _check_text_inputs(predictions, references)
        matches = [0] * BLEU_MAX_ORDER
        totals = [0] * BLEU_MAX_ORDER
        hyp_len = ref_len = 0
        for i in _keep_indices(len(predictions), keep):
            pred = postprocess_generation(predictions[i]) if self.postprocess else predictions[i]
            refs = list(references[i])[: self.max_references]
            stats = bleu4_statistics(pred, refs, self.mode)
            matches = [a + b for a, b in zip(matches, stats.matches, strict=True)]
            totals = [a + b for a, b in zip(totals, stats.totals, strict=True)]
            hyp_len += stats.hyp_len
            ref_len += stats.ref_len
        self.matches += torch.tensor(matches, dtype=torch.long, device=self.matches.device)
        self.totals += torch.tensor(totals, dtype=torch.long, device=self.totals.device)
        self.hyp_len += hyp_len
        self.ref_len += ref_len

    def compute(self) -> Tensor:
        """Corpus BLEU-4 of everything seen (0 when nothing was seen)."""
        score = bleu4_from_statistics(
            self.matches.tolist(),
            self.totals.tolist(),
            int(self.hyp_len),
            int(self.ref_len),
            mode=self.mode,
            smooth=self.smooth,
        )
        return torch.tensor(score, dtype=torch.float64, device=self.matches.device)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, smooth={self.smooth}, max_references={self.max_references}"


# ---------------------------------------------------------------------------
# NDCG@k
# ---------------------------------------------------------------------------

EmptyTargetAction = Literal["neg", "pos", "skip", "error"]


def ndcg_at_k(scores: Tensor, labels: Tensor, k: int = 5) -> float | None:
    """NDCG@k of one group (query); ``None`` when the group has no relevant item.

    ``DCG@k = sum_{rank r <= k} label_r / log2(r + 1)`` over the items ranked by
    descending score, ``IDCG@k`` the same for the ideal order. Ties are averaged: the
    items of a block of equal scores share the block's positions, each receiving the
    block's mean label (the expected DCG under a random order of the tie), so the
    value does not depend on the order in which items were given (or gathered).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    s = scores.detach().to(torch.float64).flatten()
    r = labels.detach().to(torch.float64).flatten()
    n = s.numel()
    discount = 1.0 / torch.log2(torch.arange(n, dtype=torch.float64, device=s.device) + 2.0)
    discount[k:] = 0.0
    ideal = torch.sort(r, descending=True).values
    idcg = float((ideal * discount).sum())
    if idcg <= 0.0:
        return None
    order = torch.argsort(s, descending=True, stable=True)
    s_sorted, r_sorted = s[order], r[order]
    _, inverse, counts = torch.unique_consecutive(s_sorted, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0)
    cum_discount = torch.cat([discount.new_zeros(1), torch.cumsum(discount, 0)])
    block_discount = cum_discount[ends] - cum_discount[ends - counts]
    block_gain = torch.zeros(counts.numel(), dtype=torch.float64, device=s.device)
    block_gain.scatter_add_(0, inverse, r_sorted)
    dcg = float((block_gain / counts * block_discount).sum())
    return dcg / idcg


def group_ids(keys: Sequence[str | int]) -> Tensor:
    """Stable int64 ids for group keys, identical in every process.

    Integers are kept; strings are hashed (BLAKE2b, 62 bits) so that, e.g., the
    ``TaskItem.group`` strings of a retrieval item can be passed to :class:`NDCG`.
    """
    out = []
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise TypeError(f"group keys must be str or int, got {type(key).__name__}")
        if isinstance(key, int):
            out.append(key)
        else:
            digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
            out.append(int.from_bytes(digest, "little") & ((1 << 62) - 1))
    return torch.tensor(out, dtype=torch.long)


class NDCG(_ModeMetric):
    """Mean over groups of NDCG@k with (binary) relevance labels; the same in both modes.

    ``update(scores, labels, groups)`` takes one score, relevance label (0/1; larger
    integers act as graded gains) and group id per candidate; the candidates of one
    group may arrive in any batches and on any processes. States are concatenated
    across processes; ``compute`` groups items by id and averages :func:`ndcg_at_k`.
    Ties are averaged (see :func:`ndcg_at_k`).

    Args:
        k: cut-off (default 5).
        mode: ``"paper"`` or ``"official"`` (no difference; kept for a uniform API).
        empty_target_action: a group without relevant item scores 0 (``"neg"``,
            default), 1 (``"pos"``), is left out (``"skip"``) or raises (``"error"``).
        merge_after: ``update`` concatenates each state's list of per-batch tensors into
            one once it holds this many (None: never). Each small tensor costs memory
            beside its values: unmerged, 11 metrics fed 3,125 batches of 16 candidates
            grew the process by 63.5 MiB against 19.1 MiB merged
            (``benchmarks/metric_state_memory.py``). Only ``update`` merges: states
            built up by ``forward`` calls are lists of one tensor per call.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    scores: list[Tensor] | Tensor
    labels: list[Tensor] | Tensor
    groups: list[Tensor] | Tensor
    _STATE_DTYPES: ClassVar[dict[str, torch.dtype]] = {
        "scores": torch.float64,
        "labels": torch.float64,
        "groups": torch.long,
    }

    def __init__(
        self,
        k: int = 5,
        mode: str = "paper",
        empty_target_action: EmptyTargetAction = "neg",
        merge_after: int | None = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(mode=mode, **kwargs)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if merge_after is not None and (isinstance(merge_after, bool) or not isinstance(merge_after, int) or merge_after < 1):
            raise ValueError(f"merge_after must be a positive integer or None, got {merge_after!r}")
        if empty_target_action not in ("neg", "pos", "skip", "error"):
            raise ValueError(
                f"unknown empty_target_action {empty_target_action!r}; "
                "allowed: neg, pos, skip, error"
            )
        self.k = k
        self.empty_target_action = empty_target_action
        self.merge_after = merge_after
        for state in self._STATE_DTYPES:
            self.add_state(state, default=[], dist_reduce_fx="cat")

    @property
    def metric_name(self) -> str:  # type: ignore[override]
        return f"ndcg_at_{self.k}"

    def update(
        self,
        scores: Tensor | Sequence[float],
        labels: Tensor | Sequence[int],
        groups: Tensor | Sequence[int],
        keep: KeepMask = None,
    ) -> None:
        """Add candidates: ``scores`` [n] float, ``labels`` [n] 0/1, ``groups`` [n] int ids."""
        s = torch.as_tensor(scores).detach().flatten()
        r = torch.as_tensor(labels).detach().flatten()
        g = torch.as_tensor(groups).detach().flatten()
        if not (s.numel() == r.numel() == g.numel()):
            raise ValueError(
                f"scores, labels, groups differ in size: {s.numel()}, {r.numel()}, {g.numel()}"
            )
        if g.is_floating_point() or g.dtype == torch.bool:
            raise TypeError("groups must be integer ids (see hones.metrics.group_ids)")
        if torch.isnan(s.to(torch.float64)).any():
            raise ValueError("scores contain NaN")
        if (r < 0).any():
            raise ValueError("labels must be >= 0")
        if keep is not None:
            idx = torch.tensor(_keep_indices(s.numel(), keep), dtype=torch.long)
            s, r, g = s.cpu()[idx], r.cpu()[idx], g.cpu()[idx]
        for name, value in (("scores", s), ("labels", r), ("groups", g)):
            pieces = getattr(self, name)
            pieces.append(value.to(device=self.device, dtype=self._STATE_DTYPES[name]))
            if self.merge_after is not None and len(pieces) >= self.merge_after:
                # A one-element list is a valid "cat" state: torchmetrics makes the
                # same before a sync.
                setattr(self, name, [torch.cat(pieces)])

    def _sync_dist(
        self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None
    ) -> None:
        # A process that saw no candidate would otherwise contribute an empty tensor of
        # the default float dtype, mismatching the other processes' float64 / int64.
        for name, dtype in self._STATE_DTYPES.items():
            value = getattr(self, name)
            if isinstance(value, list) and len(value) == 0:
                setattr(self, name, [torch.zeros(0, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)

    def compute(self) -> Tensor:
        """Mean NDCG@k over groups (NaN when no group was seen / all skipped)."""
        scores = dim_zero_cat(self.scores).to(torch.float64).cpu()
        labels = dim_zero_cat(self.labels).to(torch.float64).cpu()
        groups = dim_zero_cat(self.groups).to(torch.long).cpu()
        values: list[float] = []
        if groups.numel() > 0:
            order = torch.argsort(groups, stable=True)
            _, counts = torch.unique_consecutive(groups[order], return_counts=True)
            for idx in torch.split(order, counts.tolist()):
                value = ndcg_at_k(scores[idx], labels[idx], self.k)
                if value is None:
                    if self.empty_target_action == "error":
                        raise ValueError("a group has no relevant candidate")
                    if self.empty_target_action == "skip":
                        continue
                    value = 1.0 if self.empty_target_action == "pos" else 0.0
                values.append(value)
        mean = math.fsum(values) / len(values) if values else float("nan")
        return torch.tensor(mean, dtype=torch.float64, device=self.device)

    def extra_repr(self) -> str:
        return f"k={self.k}, mode={self.mode!r}, empty_target_action={self.empty_target_action!r}"


# ---------------------------------------------------------------------------
# factory
# ---------------------------------------------------------------------------


def build_metric(task: str, mode: str = "paper", **kwargs: Any) -> _ModeMetric:
    """The metric of a HONES task: vqa -> VQAAccuracy, ocr -> ANLS, caption -> BLEU4,
    retrieval -> NDCG(k=5). Extra keyword arguments go to the metric's constructor."""
    _check_mode(mode)
    if task == "vqa":
        return VQAAccuracy(mode=mode, **kwargs)
    if task == "ocr":
        return ANLS(mode=mode, **kwargs)
    if task == "caption":
        return BLEU4(mode=mode, **kwargs)
    if task == "retrieval":
        kwargs.setdefault("k", 5)
        return NDCG(mode=mode, **kwargs)
    raise ValueError(f"unknown task {task!r}; allowed tasks: {', '.join(TASKS)}")
