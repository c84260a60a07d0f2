"""Data records: the loaders' validated :class:`SourceRecord` and the pipeline's :class:`TaskItem`.

``TaskItem`` is the contract of docs/INTERFACES.md. ``OCRTaskItem`` is a ``TaskItem``
that still carries the OCR box to draw, so the blue rectangle is drawn lazily, when the
image is loaded (:func:`load_image` / :func:`materialize`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image

from hones.data.images import draw_ocr_box, open_image


@dataclass
class TaskItem:
    """One model input: image + prompt (user text only) + target, for one task."""

    uid: str  # unique per item, stable: f"{dataset}:{image_id}:{task}[:cand{k}]"
    task: str  # "vqa" | "ocr" | "caption" | "retrieval"
    image: Image.Image | str  # a PIL image (RGB) or a path; `load_image()` resolves it
    prompt: str  # user text only (HONES_METHOD §1 table), no chat template
    target: str  # training / teacher-forcing target
    references: list[str]  # what the metric compares against
    group: str = ""  # retrieval: query image id (NDCG groups); else image id
    label: int = 0  # retrieval: 1 for the positive candidate, 0 for negatives


@dataclass
class OCRTaskItem(TaskItem):
    """An OCR ``TaskItem`` whose image gets a blue box drawn at ``box`` ([x, y, w, h]) when loaded.

    ``box_image_size``: the (width, height) the annotation gives the image, which ``box`` is in;
    an image file of another size (a resized copy) gets the box scaled to it.
    """

    box: tuple[float, float, float, float] | None = None
    box_image_size: tuple[int, int] | None = None


@dataclass
class QAPair:
    """A question with its answers (``answer`` is the training target, ``answers`` the metric's)."""

    question_id: str
    question: str
    answer: str
    answers: list[str]


@dataclass
class OCRAnnotation:
    """One text instance: its transcription and box ``[x, y, w, h]`` in the pixels of an image of
    ``image_size`` (width, height) as the annotation gives it (None: not given)."""

    text: str
    bbox: tuple[float, float, float, float]
    image_size: tuple[int, int] | None = None


@dataclass
class SourceRecord:
    """One validated annotation, as returned by every loader in ``hones.data.formats``.

    Image-level datasets (COCO unified, Flickr30k) give one record per image; question
    datasets (GQA, TextVQA) one per question, with ``qa.question_id`` set.
    """

    dataset: str  # "coco_unified" | "gqa" | "textvqa" | "flickr30k"
    source: str  # annotation file it came from (for error messages)
    image_id: str
    image: str  # resolved image path (nominal path when images are not resolved)
    qa: QAPair | None = None
    captions: list[str] = field(default_factory=list)
    ocr: OCRAnnotation | None = None
    split: str = ""  # the source's own split tag (Flickr30k), else ""
    per_question: bool = False  # True for question datasets: several records per image

    @property
    def key(self) -> str:
        """Unique key of the record: the image id, plus the question id for question datasets."""
        if self.per_question and self.qa is not None:
            return f"{self.image_id}:q{self.qa.question_id}"
        return self.image_id


def load_image(item_or_path: TaskItem | Image.Image | str | os.PathLike[str]) -> Image.Image:
    """Resolve an image to an RGB PIL image.

    Accepts a ``TaskItem`` (its ``image``; an :class:`OCRTaskItem` gets its blue box
    drawn), a PIL image, or a path. A missing or corrupt file raises
    :class:`~hones.data.errors.DataError` naming the file (and the item's uid).
    """
    if isinstance(item_or_path, TaskItem):
        item = item_or_path
        img = _resolve(item.image, item.uid)
        box = getattr(item, "box", None)
        if box is None:
            return img
        return draw_ocr_box(img, fit_box(box, getattr(item, "box_image_size", None), img.size, item))
    return _resolve(item_or_path, None)


def scaled_box(
    box: tuple[float, float, float, float], annotated: tuple[int, int] | None, actual: tuple[int, int]
) -> tuple[float, float, float, float] | None:
    """``box`` (in the pixels of an image of the ``annotated`` size) in those of the image file as it
    is (``actual``): scaled when the two differ (a resized copy); None when it misses the image."""
    x, y, w, h = box
    if annotated is not None and tuple(annotated) != tuple(actual):
        sx, sy = actual[0] / annotated[0], actual[1] / annotated[1]
        x, y, w, h = x * sx, y * sy, w * sx, h * sy
    if x >= actual[0] or y >= actual[1] or x + w <= 0 or y + h <= 0:
        return None
    return (x, y, w, h)


def resize_problem(annotated: tuple[int, int] | None, actual: tuple[int, int]) -> str | None:
    """Why an image file of size ``actual`` may not be a plain resized copy of the ``annotated``
    image (its aspect ratio differs beyond rounding), else None. Sizes cannot tell a stretched
    copy, where the per-axis scaling of ``scaled_box`` is right, from a crop or another image,
    where the box lands on other pixels than the annotator marked: ``warn_resized`` says so."""
    if annotated is None or tuple(annotated) == tuple(actual):
        return None
    sx, sy = actual[0] / annotated[0], actual[1] / annotated[1]
    rounding = 1.0 / min(actual) + 1.0 / min(annotated)  # one pixel either way
    if abs(sx / sy - 1.0) <= 0.01 + rounding:
        return None
    return (
        f"the image file is {actual[0]}x{actual[1]}, annotated as {annotated[0]}x{annotated[1]}: another aspect ratio "
        f"(x{sx:.3g} wide, x{sy:.3g} high)"
    )


_WARNED_RESIZED: list[str] = []


def warn_resized(problem: str, where: str) -> None:
    """Warn once per process that OCR boxes are scaled per axis onto image files of another aspect
    ratio than annotated (``problem`` / ``where``: the first such file)."""
    if _WARNED_RESIZED:
        return
    _WARNED_RESIZED.append(where)
    import warnings

    warnings.warn(
        f"{where}: {problem}; its OCR box (and any other such file's; this warning is shown once) is scaled per axis, "
        "which is right for a stretched copy of the annotated image and wrong for a crop or another image",
        UserWarning,
        stacklevel=2,
    )


def box_problem(box: Sequence[float], annotated: tuple[int, int] | None, actual: tuple[int, int]) -> str:
    """The one-line problem of a box that misses its image file."""
    sizes = "the annotation gives no image size" if annotated is None else f"annotated as {annotated[0]}x{annotated[1]}"
    return f"OCR box {list(box)} lies outside the {actual[0]}x{actual[1]} image file ({sizes})"


def fit_box(
    box: tuple[float, float, float, float], annotated: tuple[int, int] | None, actual: tuple[int, int], item: TaskItem
) -> tuple[float, float, float, float]:
    """``scaled_box``, or a ``DataError`` naming the item when the box misses the image (the loaders
    check this when they load annotations with images; this catches items built otherwise)."""
    from hones.data.errors import DataError

    resized = resize_problem(annotated, actual)
    if resized is not None:
        warn_resized(resized, f"{item.image} (item {item.uid})")
    fitted = scaled_box(box, annotated, actual)
    if fitted is None:
        raise DataError(str(item.image), box_problem(box, annotated, actual), item=item.uid)
    return fitted


def _resolve(image: Image.Image | str | os.PathLike[str], uid: str | None) -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, Path, os.PathLike)):
        from hones.data.errors import DataError

        try:
            return open_image(image, item=uid)
        except DataError as error:  # found while batching: loading checked the file's presence only
            hint = "; --data.verify_images true decodes every image at load time (with --data.lenient true, skipping and counting bad ones)"
            raise DataError(error.file, error.problem + hint, error.item, error.field) from None
    raise TypeError(f"cannot load an image from {type(image).__name__}")


def materialize(item: TaskItem) -> TaskItem:
    """A plain ``TaskItem`` copy of ``item`` with its image loaded (and OCR box drawn)."""
    values = {f.name: getattr(item, f.name) for f in dataclasses.fields(TaskItem)}
    values["image"] = load_image(item)
    return TaskItem(**values)
