"""Task views: :class:`SourceRecord` lists -> :class:`TaskItem` lists (HONES_METHOD §1, §3, §5).

- prompts: exactly the paper's table (:data:`PROMPTS`, :func:`task_prompt`);
- ``vqa``: target = the answer, references = all answers;
- ``ocr``: target = the text; the image gets a blue box around the text's bbox when loaded
  (:class:`OCRTaskItem`, :func:`draw_ocr_box`). Question-only records (TextVQA, the OOD set
  for OCR) have no box: they use the VQA prompt with their question and answers;
- ``caption``: target = one seeded-random reference, references = all of them (an image's
  first ``MAX_CAPTIONS`` = 5 captions, §1; a few COCO images have more, which are counted in the log);
- ``retrieval``: per image 1 positive (a seeded-random one of those references) + ``n_neg`` hard negatives
  (of ~50 x n_neg sampled captions of other images, those with the largest word overlap
  with the positive), shuffled, scored as one NDCG group. Training items instead give the
  positive ("Yes") and ``train_negatives`` sampled hard negatives ("No").

Every random choice of an item comes from a stream seeded by ``(seed, image id)`` and the
candidate pool is taken in a canonical order, so an item is the same whatever the order of
the records, the sharding, or the number of workers.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from hones.choices import TASKS
from hones.data.errors import DataError
from hones.data.images import draw_ocr_box
from hones.data.records import OCRTaskItem, SourceRecord, TaskItem
from hones.data.rng import stable_rng, stable_seed

__all__ = [
    "PROMPTS",
    "TASKS",
    "CaptionPool",
    "build_task_items",
    "caption_idf",
    "caption_token_sets",
    "draw_ocr_box",
    "hard_negatives",
    "task_prompt",
    "training_items",
    "word_set",
]

logger = logging.getLogger("hones.data")


# HONES_METHOD §1 table: user-turn text, without any chat template.
PROMPTS: dict[str, str] = {
    "vqa": "Question: {question}\nAnswer the question with a short phrase.",
    "ocr": "Transcribe the text inside the blue box.\nOutput text only.",
    "caption": "Describe the image in one sentence.",
    "retrieval": "Candidate: {caption}\nDoes the candidate correctly describe the image?\nAnswer exactly Yes or No.",
}

N_NEGATIVES = 49  # §1: NDCG@5 over 1 positive + 49 negatives
CANDIDATES_PER_NEGATIVE = 50  # §1: sample ~50 x n_neg candidates
TRAIN_NEGATIVES = 4  # §5: positive -> "Yes" plus 4 sampled negatives -> "No"
MAX_CAPTIONS = 5  # §1 / §6: an image's reference captions are (up to) its first 5

_WORD = re.compile(r"[a-z0-9]+")


def task_prompt(task: str, question: str = "", caption: str = "") -> str:
    """The paper's prompt for ``task`` (``question`` for vqa, ``caption`` for retrieval)."""
    if task not in PROMPTS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return PROMPTS[task].format(question=question, caption=caption)


def word_set(text: str) -> frozenset[str]:
    """Lowercased alphanumeric words of ``text`` (the unit of caption word overlap)."""
    return frozenset(_WORD.findall(text.lower()))


def _norm(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


# --------------------------------------------------------------------------- retrieval


class CaptionPool:
    """All captions of a view in canonical order (image id, then caption index).

    Holds, per caption, its owner image, its normalised text and its distinct word ids
    (a ``[n_captions, max_words]`` matrix padded with -1) for vectorised overlaps.
    """

    def __init__(self, entries: Sequence[tuple[str, str]]) -> None:
        self.texts = [text for _, text in entries]
        self.owners = [owner for owner, _ in entries]
        self.normalised = [_norm(text) for text in self.texts]
        self.vocabulary: dict[str, int] = {}
        word_ids = [
            [self.vocabulary.setdefault(word, len(self.vocabulary)) for word in sorted(word_set(text))]
            for text in self.texts
        ]
        width = max((len(ids) for ids in word_ids), default=0)
        self.word_ids = np.full((len(word_ids), max(width, 1)), -1, dtype=np.int64)
        for row, ids in enumerate(word_ids):
            self.word_ids[row, : len(ids)] = ids

    @classmethod
    def from_records(cls, records: Sequence[SourceRecord]) -> CaptionPool:
        entries = sorted((r.image_id, i, c) for r in records for i, c in enumerate(r.captions))
        return cls([(owner, text) for owner, _, text in entries])

    def __len__(self) -> int:
        return len(self.texts)

    def overlaps(self, text: str, rows: np.ndarray) -> np.ndarray:
        """Number of distinct words of ``text`` in each caption of ``rows``."""
        hit = np.zeros(len(self.vocabulary) + 1, dtype=np.int64)  # last slot: the -1 padding
        for word in word_set(text):
            if word in self.vocabulary:
                hit[self.vocabulary[word]] = 1
        return hit[self.word_ids[rows]].sum(axis=1)


def hard_negatives(
    positive: str,
    references: Sequence[str],
    image_id: str,
    pool: CaptionPool,
    rng: np.random.Generator,
    n_neg: int = N_NEGATIVES,
    n_candidates: int | None = None,
) -> list[str]:
    """``n_neg`` captions of other images with the largest word overlap with ``positive``.

    ``n_candidates`` (default 50 x n_neg) are sampled from ``pool`` with ``rng``; captions of
    ``image_id`` itself or equal (after normalisation) to one of its ``references`` are
    excluded, duplicates are kept once, ties keep the sampling order.
    """
    n_candidates = CANDIDATES_PER_NEGATIVE * n_neg if n_candidates is None else n_candidates
    sampled = rng.choice(len(pool), size=min(len(pool), n_candidates), replace=False)
    ranking = sampled[np.argsort(-pool.overlaps(positive, sampled), kind="stable")]
    excluded = {_norm(r) for r in references}
    negatives: list[str] = []
    for index in ranking.tolist():
        if pool.owners[index] == image_id or pool.normalised[index] in excluded:
            continue
        excluded.add(pool.normalised[index])
        negatives.append(pool.texts[index])
        if len(negatives) == n_neg:
            break
    return negatives


def _retrieval_items(
    records: Sequence[SourceRecord], seed: int, n_neg: int, training: bool, train_negatives: int
) -> list[TaskItem]:
    pool = CaptionPool.from_records(records)
    items: list[TaskItem] = []
    short = 0
    for record in records:
        rng = np.random.default_rng(stable_seed(seed, record.image_id, "retrieval"))
        references = _references(record)
        positive = references[int(rng.integers(len(references)))]
        negatives = hard_negatives(positive, record.captions, record.image_id, pool, rng, n_neg)  # none of its own captions
        short += len(negatives) < n_neg
        if training:
            keep = rng.choice(len(negatives), size=min(train_negatives, len(negatives)), replace=False)
            negatives = [negatives[i] for i in keep.tolist()]
        candidates = [(positive, 1)] + [(n, 0) for n in negatives]
        candidates = [candidates[i] for i in rng.permutation(len(candidates)).tolist()]
        for k, (caption, label) in enumerate(candidates):
            items.append(
                TaskItem(
                    uid=f"{record.dataset}:{record.image_id}:retrieval:cand{k}",
                    task="retrieval",
                    image=record.image,
                    prompt=task_prompt("retrieval", caption=caption),
                    target="Yes" if label else "No",
                    references=list(references),
                    group=record.image_id,
                    label=label,
                )
            )
    if short:
        logger.warning(
            "retrieval: %d of %d images got fewer than %d negatives (small caption pool)", short, len(records), n_neg
        )
    return items


# --------------------------------------------------------------------------- other tasks


def _uid(record: SourceRecord, task: str) -> str:
    uid = f"{record.dataset}:{record.image_id}:{task}"
    return f"{uid}:q{record.qa.question_id}" if record.per_question and record.qa is not None else uid


def _need(record: SourceRecord, task: str, what: str) -> DataError:
    return DataError(record.source, f"record has no {what}, needed by the {task} task", item=record.key, field=what)


def _qa_item(record: SourceRecord, task: str) -> TaskItem:
    if record.qa is None:
        raise _need(record, task, "vqa")
    return TaskItem(
        uid=_uid(record, task),
        task=task,
        image=record.image,
        prompt=task_prompt("vqa", question=record.qa.question),
        target=record.qa.answer,
        references=list(record.qa.answers),
        group=record.image_id,
    )


def _ocr_items(records: Sequence[SourceRecord]) -> list[TaskItem]:
    items: list[TaskItem] = []
    no_text = 0
    for record in records:
        if record.ocr is not None:
            items.append(
                OCRTaskItem(
                    uid=_uid(record, "ocr"),
                    task="ocr",
                    image=record.image,
                    prompt=task_prompt("ocr"),
                    target=record.ocr.text,
                    references=[record.ocr.text],
                    group=record.image_id,
                    box=record.ocr.bbox,
                    box_image_size=record.ocr.image_size,
                )
            )
        elif record.qa is not None and record.per_question:
            items.append(_qa_item(record, "ocr"))  # TextVQA: reading questions, no box
        else:
            no_text += 1
    if no_text:
        logger.warning("ocr: %d of %d images have no text instance (ocr null): no ocr item for them", no_text, len(records))
    return items


def _caption_item(record: SourceRecord, seed: int) -> TaskItem:
    if not record.captions:
        raise _need(record, "caption", "captions")
    return TaskItem(
        uid=_uid(record, "caption"),
        task="caption",
        image=record.image,
        prompt=task_prompt("caption"),
        target=stable_rng(seed, record.image_id, "caption").choice(_references(record)),
        references=_references(record),
        group=record.image_id,
    )


def _references(record: SourceRecord) -> list[str]:
    """An image's reference captions: its first ``MAX_CAPTIONS`` (§1: up to 5; a few COCO images have 6 or 7)."""
    return list(record.captions[:MAX_CAPTIONS])


def _caption_records(records: Sequence[SourceRecord], task: str) -> list[SourceRecord]:
    """One record per image (question datasets repeat images), each with captions."""
    by_image: dict[str, SourceRecord] = {}
    for record in records:
        if not record.captions:
            raise _need(record, task, "captions")
        by_image.setdefault(record.image_id, record)
    more = sum(len(record.captions) > MAX_CAPTIONS for record in by_image.values())
    if more:
        logger.warning("%s: %d of %d images have more than %d captions: their first %d are the references", task, more, len(by_image), MAX_CAPTIONS, MAX_CAPTIONS)
    return list(by_image.values())


def build_task_items(
    records: Sequence[SourceRecord],
    task: str,
    split: str = "test",
    *,
    training: bool | None = None,
    seed: int = 0,
    n_neg: int = N_NEGATIVES,
    train_negatives: int = TRAIN_NEGATIVES,
) -> list[TaskItem]:
    """The ``task`` view of ``records``.

    ``split`` names the HONES split the records form; ``training`` defaults to
    ``split == "train"`` and switches retrieval to training items (positive + sampled
    negatives, HONES_METHOD §5); the other tasks' items are the same either way.
    Records lacking the task's annotation raise :class:`DataError` (OCR: records with
    ``ocr: null`` are left out and counted in an info log).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    training = split == "train" if training is None else training
    if task == "vqa":
        return [_qa_item(r, "vqa") for r in records]
    if task == "ocr":
        return _ocr_items(records)
    if task == "caption":
        return [_caption_item(r, seed) for r in _caption_records(records, task)]
    return _retrieval_items(_caption_records(records, task), seed, n_neg, training, train_negatives)


def training_items(
    records: Sequence[SourceRecord],
    task: str,
    *,
    seed: int = 0,
    n_neg: int = N_NEGATIVES,
    train_negatives: int = TRAIN_NEGATIVES,
) -> list[TaskItem]:
    """Steering / training items (HONES_METHOD §5): vqa answer, ocr text, one random reference
    caption, retrieval positive -> "Yes" + ``train_negatives`` sampled hard negatives -> "No"."""
    return build_task_items(
        records, task, split="train", training=True, seed=seed, n_neg=n_neg, train_negatives=train_negatives
    )


# --------------------------------------------------------------------------- caption IDF


def caption_token_sets(captions: Iterable[str], tokenize: Callable[[str], Sequence[int]]) -> list[set[int]]:
    """One token-id set per caption; ``tokenize`` is the model adapter's tokenizer (text -> ids)."""
    return [set(tokenize(caption)) for caption in captions]


def caption_idf(token_sets: Iterable[Iterable[int]]) -> dict[int, float]:
    """Smoothed IDF over caption token sets (HONES_METHOD §3): idf(t) = ln((n+1)/(df(t)+1)) + 1.

    Tokens absent from every set are not in the dict; their value would be ln(n+1) + 1.
    """
    df: Counter[int] = Counter()
    n = 0
    for tokens in token_sets:
        n += 1
        df.update(set(tokens))
    return {token: math.log((n + 1) / (count + 1)) + 1.0 for token, count in df.items()}
