"""Loaders for the four source formats, each returning validated :class:`SourceRecord` lists.

Formats (HONES_METHOD §6):
- ``coco_unified``: ``{"data": [{image_id, image_info{file_name,...}, image_path?, vqa{...},
  captions[{caption}], ocr{text, bbox[x,y,w,h]}}]}``; image = ``image_root/file_name``,
  falling back to ``image_path`` (a relative one is relative to the annotation file).
- ``gqa``: questions JSON ``{qid: {"imageId", "question", "answer", "fullAnswer", ...}}``;
  image = ``image_root/{imageId}.jpg`` (or ``.png``).
- ``textvqa``: the release JSON ``{"dataset_name": "textvqa", "data": [{question, image_id,
  answers[10], question_id, ...}]}``; image = ``image_root/{image_id}.jpg`` (or ``.png``).
- ``flickr30k``: the public CSV (``raw`` = JSON list of captions, ``sentids``, ``split``,
  ``filename``, ``img_id``) or the Karpathy JSON ``{"images": [{filename, imgid, split,
  sentences[{raw}]}]}``; image = ``image_root/filename``.

Tables are read with HF ``datasets`` (``load_dataset("json"|"csv")``, cached in
``cache_dir``, works with ``HF_DATASETS_OFFLINE=1``). When Arrow cannot build a table
(malformed JSON, a field with mixed types), the file is re-read with the standard library
so the error names the exact line or item. GQA's file is one object keyed by question id,
not a table, so it is read with the standard library directly.

Common options: ``image_root`` (None: do not touch image files, records hold the nominal
path), ``split_file`` (JSON list of image ids to keep), ``limit`` + ``seed`` (seeded
subsample, kept in file order), ``lenient`` (skip and count bad items instead of raising),
``verify_images`` (decode every selected image), ``skips`` (a SkipReport to add to).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hones.choices import TASKS
from hones.data.errors import DataError, SkipReport, logger
from hones.data.images import verify_image
from hones.data.records import OCRAnnotation, QAPair, SourceRecord
from hones.data.rng import stable_rng

DATASETS = ("coco_unified", "gqa", "textvqa", "flickr30k")
IMAGE_EXTENSIONS = (".jpg", ".png")

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' progress bars, and its download-count ping (a HEAD request to
    ``s3.amazonaws.com`` with a 3 s timeout on every ``load_dataset``, local files included), for
    the duration, restoring the previous state: reading local annotations makes no network call."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    was_counting = datasets.config.HF_UPDATE_DOWNLOAD_COUNTS
    datasets.disable_progress_bars()
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = was_counting
        if not was_disabled:
            datasets.enable_progress_bars()


def read_json(path: PathLike) -> Any:
    """``json.load`` with one-line DataErrors for a missing file or malformed JSON."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError as err:
        raise DataError(path, "file not found") from err
    except json.JSONDecodeError as err:
        raise DataError(path, f"malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    except UnicodeDecodeError as err:
        raise DataError(path, f"not UTF-8 text ({err.reason} at byte {err.start})") from err


def _json_field(path: Path, data: Any, field: str) -> list[Any]:
    if not isinstance(data, dict):
        raise DataError(path, f"top level must be a JSON object with a '{field}' list, got {type(data).__name__}")
    if field not in data:
        raise DataError(path, f"top-level field '{field}' is missing", field=field)
    rows = data[field]
    if not isinstance(rows, list):
        raise DataError(path, f"must be a list, got {type(rows).__name__}", field=field)
    return rows


def read_json_rows(path: PathLike, field: str, cache_dir: PathLike | None = None) -> list[Any]:
    """The list under top-level ``field`` of a JSON file, read through HF ``datasets``.

    Missing keys come back as ``None``. Falls back to the standard library (rows as in the
    file) when Arrow cannot tabulate the file, so that errors can point at the item.
    """
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        with _quiet_datasets():
            table = load_dataset(
                "json",
                data_files=str(path),
                field=field,
                split="train",
                cache_dir=None if cache_dir is None else str(cache_dir),
            )
        return table.to_list()
    except (DatasetGenerationError, ValueError) as err:
        # Arrow could not build a table (bad JSON, mixed types, no rows): the standard
        # library reads the file as it is, so the checks below can name the bad item.
        logger.debug("datasets could not tabulate %s (%s); reading it with json", path, err)
        return _json_field(path, read_json(path), field)


def read_csv_rows(path: PathLike, cache_dir: PathLike | None = None) -> list[dict[str, Any]]:
    """Rows of a CSV file as dicts of strings (empty cells are ``None``), read through HF ``datasets``.

    Every column is read as text, exactly as written: no type inference (an id ``007``
    stays ``"007"``, not 7) and no NA guessing (a cell ``NA`` stays ``"NA"``).
    """
    from datasets import Features, Value, load_dataset
    from datasets.exceptions import DatasetGenerationError

    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    with open(path, encoding="utf-8-sig", newline="") as handle:  # -sig: a byte-order mark is not part of the first name
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise DataError(path, "empty CSV file (no header row)")
        for row in reader:  # pandas would shift the columns of such rows (or drop their extra cells) without a word
            if len(row) > len(header):
                raise DataError(
                    path, f"line {reader.line_num}: {len(row)} cells for the header's {len(header)} columns "
                    "(an unquoted comma in a caption, or a trailing comma?)"
                )
    if len(set(header)) != len(header):
        raise DataError(path, f"CSV header repeats a column name: {header}")
    try:
        with _quiet_datasets():
            table = load_dataset(
                "csv",
                data_files=str(path),
                split="train",
                cache_dir=None if cache_dir is None else str(cache_dir),
                features=Features({name: Value("string") for name in header}),
                keep_default_na=False,
            )
        rows = table.to_list()
    except (DatasetGenerationError, ValueError) as err:
        logger.debug("datasets could not tabulate %s (%s); reading it with csv", path, err)
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.DictReader(handle))
    return [{k: (v if v != "" else None) for k, v in row.items()} for row in rows]


def read_split_ids(path: PathLike) -> set[str]:
    """Image ids of a split file: a JSON list of ids (ints or strings), returned as strings."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(path, f"a split file must be a JSON list of image ids, got {type(data).__name__}")
    ids: set[str] = set()
    for index, value in enumerate(data):
        if not isinstance(value, (int, str)) or isinstance(value, bool) or value == "":
            raise DataError(path, f"image id must be an int or a non-empty string, got {value!r}", item=f"#{index}")
        ids.add(str(value))
    return ids


def check_disjoint_splits(split_files: Mapping[str, PathLike | None]) -> None:
    """A one-line ``DataError`` when two of the named split files share image ids (§1: the
    discovery / dev / test splits are image-disjoint; an overlap would measure a selection or a
    steering on the images it was found or trained on). Missing names (None) and files that do
    not exist (the loader reports them) are not checked."""
    named = [(name, Path(path)) for name, path in split_files.items() if path is not None and Path(path).is_file()]
    ids = {name: read_split_ids(path) for name, path in named}
    for k, (first, first_path) in enumerate(named):
        for second, second_path in named[k + 1 :]:
            shared = ids[first] & ids[second]
            if not shared:
                continue
            if first_path.resolve() == second_path.resolve():
                raise DataError(second_path, f"the {first} and {second} splits are the same file; the splits must be image-disjoint")
            example = ", ".join(sorted(shared)[:3])
            raise DataError(
                second_path,
                f"{len(shared)} image id(s) of the {second} split are also in the {first} split {first_path} "
                f"(e.g. {example}); the splits must be image-disjoint",
            )


def _with_lenient_hint(error: DataError) -> DataError:
    """A bad item's error in strict mode, with the way on: lenient mode skips and counts such items."""
    hint = "; to skip and count such items, load leniently (--data.lenient true)"
    return DataError(error.file, error.problem + hint, error.item, error.field)


# --------------------------------------------------------------------------- validation


class _OutsideSplit(Exception):
    """Raised by :meth:`_Item.set_image_id` for an item whose image is not in the split file."""


class _Item:
    """Error context for one raw item: the file and a label such as ``#3 image_id=42``.

    ``key`` is the item's key in its file when the file is keyed (GQA's question id).
    """

    def __init__(self, file: Path, label: str, key: str | None = None, split_ids: set[str] | None = None) -> None:
        self.file = file
        self.label = label
        self.key = key
        self.image_id: str | None = None
        self._split_ids = split_ids

    def set_image_id(self, value: Any, field: str) -> str:
        """Validate and remember the item's image id; items outside the split stop here."""
        self.image_id = self.identifier(value, field)
        if self._split_ids is not None and self.image_id not in self._split_ids:
            raise _OutsideSplit(self.image_id)
        return self.image_id

    def error(self, field: str, problem: str) -> DataError:
        return DataError(self.file, problem, item=self.label, field=field)

    def mapping(self, value: Any, field: str) -> dict[str, Any]:
        if value is None:
            raise self.error(field, "missing or null")
        if not isinstance(value, dict):
            raise self.error(field, f"must be an object, got {type(value).__name__}")
        return value

    def text(self, value: Any, field: str) -> str:
        """A non-empty (after stripping) string, returned stripped."""
        if value is None:
            raise self.error(field, "missing or null")
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {type(value).__name__} {value!r}")
        if not value.strip():
            raise self.error(field, f"empty {field.rsplit('.', 1)[-1]} ({value!r})")
        return value.strip()

    def texts(self, value: Any, field: str, key: str | None = None) -> list[str]:
        """A non-empty list of non-empty strings (or of objects holding one under ``key``)."""
        if value is None:
            raise self.error(field, "missing or null")
        if not isinstance(value, list):
            raise self.error(field, f"must be a list, got {type(value).__name__}")
        if not value:
            raise self.error(field, "empty list")
        out = []
        for index, entry in enumerate(value):
            if key is not None and isinstance(entry, dict):
                out.append(self.text(entry.get(key), f"{field}[{index}].{key}"))
            else:
                out.append(self.text(entry, f"{field}[{index}]"))
        return out

    def identifier(self, value: Any, field: str) -> str:
        if value is None:
            raise self.error(field, "missing or null")
        if isinstance(value, float) and value.is_integer():
            if abs(value) > 2**53:  # not every integer this large is a float: the id may already have changed
                raise self.error(
                    field, f"{value!r} is a float beyond 2**53, where floats skip integers (a float elsewhere in the column "
                    "makes the table reader read every id as one): write the ids as integers or strings"
                )
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, str)) or str(value).strip() == "":
            raise self.error(field, f"must be an int or a non-empty string, got {value!r}")
        return str(value).strip()

    def bbox(self, value: Any, field: str, size: tuple[int, int] | None) -> tuple[float, float, float, float]:
        """``[x, y, w, h]``: 4 finite numbers, w and h > 0, overlapping the image if its size is known."""
        if value is None:
            raise self.error(field, "missing or null")
        if not isinstance(value, (list, tuple)) or len(value) != 4:
            raise self.error(field, f"must be [x, y, w, h], got {value!r}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
            raise self.error(field, f"must hold 4 finite numbers, got {value!r}")
        x, y, w, h = (float(v) for v in value)
        if w <= 0 or h <= 0:
            raise self.error(field, f"width and height must be > 0, got {value!r}")
        if size is not None:
            width, height = size
            if x >= width or y >= height or x + w <= 0 or y + h <= 0:
                raise self.error(field, f"box {value!r} lies outside the {width}x{height} image")
        return (x, y, w, h)


def majority_answer(answers: Sequence[str]) -> str:
    """The most frequent answer (ties: the one seen first)."""
    counts = Counter(answers)
    return max(answers, key=lambda a: (counts[a], -answers.index(a)))


def majority_first(answers: Sequence[str]) -> list[str]:
    """``answers`` with one occurrence of the majority answer moved to the front (the others in
    order, none dropped): the first reference is the item's target, which paper-mode ANLS
    scores against (docs/metrics.md); VQA accuracy counts matches, so the order is moot there."""
    target = majority_answer(answers)
    rest = list(answers)
    rest.remove(target)
    return [target, *rest]


@dataclass
class _Parsed:
    index: int
    item: _Item
    record: SourceRecord
    candidates: list[str]  # image files to try, in order


def _in_dir(base: Path, name: str) -> str:
    return str(Path(name) if os.path.isabs(name) else base / name)


def _stem_candidates(image_root: PathLike | None, stem: str) -> list[str]:
    if image_root is None:
        return [stem + IMAGE_EXTENSIONS[0]]
    return [str(Path(image_root) / (stem + ext)) for ext in IMAGE_EXTENSIONS]


def _collect(
    path: Path,
    rows: Iterable[tuple[int, str, Any, str | None]],
    parse: Callable[[Any, _Item], tuple[SourceRecord, list[str]] | None],
    *,
    split_file: PathLike | None,
    limit: int | None,
    seed: int,
    lenient: bool,
    check_images: bool,
    verify_images: bool,
    skips: SkipReport | None,
    unique_key: Callable[[SourceRecord], str],
    check_boxes: bool = False,
) -> list[SourceRecord]:
    """Validate rows, filter by split, subsample, check images (and, with ``check_boxes``, that each
    OCR box falls on its image file): the pipeline every loader shares."""
    report = SkipReport(str(path))
    split_ids = read_split_ids(split_file) if split_file is not None else None
    parsed: list[_Parsed] = []
    seen: dict[str, str] = {}
    seen_images: set[str] = set()
    n_rows = 0
    skipped_ids: set[str] = set()
    for index, label, raw, file_key in rows:
        n_rows += 1
        item = _Item(path, label, file_key, split_ids)
        try:
            if not isinstance(raw, dict):
                raise item.error("(item)", f"must be an object, got {type(raw).__name__}")
            result = parse(raw, item)
            if result is None:
                continue
            record, candidates = result
            key = unique_key(record)
            if key in seen:
                raise item.error("image_id" if key == record.image_id else "question_id",
                                 f"duplicate id (first seen at {seen[key]})")
            seen[key] = item.label
        except _OutsideSplit:
            continue
        except DataError as err:
            if not lenient:
                raise _with_lenient_hint(err) from None
            report.add(err)
            if item.image_id is not None:
                skipped_ids.add(item.image_id)
            continue
        seen_images.add(record.image_id)
        parsed.append(_Parsed(index, item, record, candidates))
    if n_rows == 0:
        raise DataError(path, "contains no items")
    if split_ids is not None:
        absent = sorted(split_ids - seen_images - skipped_ids)
        if absent and not lenient:
            raise DataError(split_file, f"{len(absent)} image id(s) not found in {path}, e.g. {absent[:3]}")
        if absent:
            report.add(f"split id not found in annotations ({split_file})", count=len(absent))

    order = list(range(len(parsed)))
    if limit is not None and 0 < limit < len(parsed):
        stable_rng(seed, "subsample").shuffle(order)
    chosen: list[_Parsed] = []
    for position in order:
        if limit is not None and 0 < limit <= len(chosen):
            break
        entry = parsed[position]
        try:
            if check_images:
                entry.record.image = _find_image(entry, verify_images)
            if check_boxes:
                _check_ocr_box(entry)
        except DataError as err:
            if not lenient:
                raise _with_lenient_hint(err) from None
            report.add(err, reason=None if err.field == "ocr.bbox" else "image: missing or unreadable")
            continue
        chosen.append(entry)
    if not chosen and split_ids is not None and not split_ids:
        raise DataError(split_file, "an empty split: the list holds no image id")
    if not chosen and split_ids is not None and not parsed and not report.total:
        raise DataError(split_file, f"none of its {len(split_ids)} image id(s) has an item of this task in {path}")
    if not chosen:
        raise DataError(path, f"no usable items ({report.summary()})")
    report.log()
    if skips is not None:
        skips.merge(report)
    chosen.sort(key=lambda entry: entry.index)
    return [entry.record for entry in chosen]


def _find_image(entry: _Parsed, verify: bool) -> str:
    for candidate in entry.candidates:
        if os.path.isfile(candidate):
            if verify:
                verify_image(candidate, item=entry.item.label)
            return candidate
    tried = " or ".join(entry.candidates)
    raise entry.item.error("image", f"image file not found: {tried}")


def _check_ocr_box(entry: _Parsed) -> None:
    """An ``ocr.bbox`` error when the record's OCR box misses its image file (read from the file's
    header; a file of another size than the annotation's gets the box scaled, see ``scaled_box``,
    with a warning when its aspect ratio differs: ``resize_problem``)."""
    from PIL import Image

    from hones.data.records import box_problem, resize_problem, scaled_box, warn_resized

    ocr = entry.record.ocr
    if ocr is None:
        return
    found = [path for path in (entry.record.image, *entry.candidates) if os.path.isfile(path)]
    if not found:
        return  # no image file at hand (the loader does not touch images): checked when one is loaded
    try:
        with Image.open(found[0]) as image:
            size = image.size
    except OSError:
        return  # unreadable: named when the image is loaded (or by verify_images)
    resized = resize_problem(ocr.image_size, size)
    if resized is not None:
        warn_resized(resized, found[0])
    if scaled_box(ocr.bbox, ocr.image_size, size) is None:
        raise entry.item.error("ocr.bbox", box_problem(ocr.bbox, ocr.image_size, size) + f": {found[0]}")


# --------------------------------------------------------------------------- loaders


def load_coco_unified(
    path: PathLike,
    image_root: PathLike | None = None,
    *,
    tasks: Sequence[str] = TASKS,
    split_file: PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    lenient: bool = False,
    verify_images: bool = False,
    cache_dir: PathLike | None = None,
    skips: SkipReport | None = None,
) -> list[SourceRecord]:
    """Load the unified COCO JSON (one record per image).

    ``tasks`` names the annotations that must be valid: ``vqa`` needs ``vqa.question`` and
    ``vqa.answer`` (``all_answers`` optional), ``caption``/``retrieval`` need ``captions``
    (or ``retrieval``), ``ocr`` needs a valid ``ocr`` when present: ``ocr: null`` (or
    absent) means the image has no text instance, and the OCR view leaves it out (counted in
    a warning).
    Annotations of tasks not asked for are kept when valid and dropped (``None``) if not.
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; expected some of {TASKS}")
    path = Path(path)
    rows = read_json_rows(path, "data", cache_dir)
    base = path.parent

    def parse(raw: dict[str, Any], item: _Item) -> tuple[SourceRecord, list[str]]:
        info = raw.get("image_info")
        if info is not None and not isinstance(info, dict):
            raise item.error("image_info", f"must be an object, got {type(info).__name__}")
        info = info or {}
        image_id = item.set_image_id(raw.get("image_id", info.get("id")), "image_id")
        item.label = f"{item.label} image_id={image_id}"
        size = _image_size(info)
        file_name, image_path = info.get("file_name"), raw.get("image_path")
        if not (isinstance(file_name, str) and file_name.strip()) and not (
            isinstance(image_path, str) and image_path.strip()
        ):
            raise item.error("image_info.file_name", "missing (and no image_path to fall back on)")
        candidates = []
        if image_root is not None and isinstance(file_name, str) and file_name.strip():
            candidates.append(str(Path(image_root) / file_name.strip()))
        if isinstance(image_path, str) and image_path.strip():
            candidates.append(_in_dir(base, image_path.strip()))
        if not candidates:
            candidates.append(_in_dir(base, file_name.strip()))
        record = SourceRecord("coco_unified", str(path), image_id, candidates[0])
        record.qa = _optional(lambda: _coco_qa(raw, item, image_id), "vqa" in tasks)
        needs_captions = bool({"caption", "retrieval"} & set(tasks))
        record.captions = _optional(lambda: _coco_captions(raw, item), needs_captions) or []
        record.ocr = _optional(lambda: _coco_ocr(raw, item, size), "ocr" in tasks)
        return record, candidates

    return _collect(
        path,
        ((i, f"#{i}", row, None) for i, row in enumerate(rows)),
        parse,
        split_file=split_file,
        limit=limit,
        seed=seed,
        lenient=lenient,
        check_images=image_root is not None or verify_images,
        verify_images=verify_images,
        skips=skips,
        unique_key=lambda record: record.image_id,
        check_boxes="ocr" in tasks,
    )


def _optional(build: Callable[[], Any], required: bool) -> Any:
    """``build()``; when the annotation is not required, a DataError yields ``None`` instead."""
    if required:
        return build()
    try:
        return build()
    except DataError:
        return None


def _image_size(info: dict[str, Any]) -> tuple[int, int] | None:
    width, height = info.get("width"), info.get("height")
    if isinstance(width, (int, float)) and isinstance(height, (int, float)) and width > 0 and height > 0:
        return int(width), int(height)
    return None


def _coco_qa(raw: dict[str, Any], item: _Item, image_id: str) -> QAPair:
    vqa = item.mapping(raw.get("vqa"), "vqa")
    question = item.text(vqa.get("question"), "vqa.question")
    answer = item.text(vqa.get("answer"), "vqa.answer")
    answers = [answer]
    if vqa.get("all_answers") is not None:
        answers = item.texts(vqa.get("all_answers"), "vqa.all_answers")
    qid = vqa.get("question_id")
    question_id = image_id if qid is None else item.identifier(qid, "vqa.question_id")
    return QAPair(question_id, question, answer, answers)


def _coco_captions(raw: dict[str, Any], item: _Item) -> list[str]:
    if raw.get("captions") is not None or raw.get("retrieval") is None:
        return item.texts(raw.get("captions"), "captions", key="caption")
    return item.texts(raw.get("retrieval"), "retrieval", key="caption")


def _coco_ocr(raw: dict[str, Any], item: _Item, size: tuple[int, int] | None) -> OCRAnnotation | None:
    ocr = raw.get("ocr")
    if ocr is None:
        return None
    ocr = item.mapping(ocr, "ocr")
    return OCRAnnotation(item.text(ocr.get("text"), "ocr.text"), item.bbox(ocr.get("bbox"), "ocr.bbox", size), size)


def _load_questions(
    source: str,
    path: Path,
    rows: Iterable[tuple[int, str, Any, str | None]],
    parse_question: Callable[[dict[str, Any], _Item], tuple[str, QAPair]],
    image_root: PathLike | None,
    *,
    verify_images: bool,
    **options: Any,
) -> list[SourceRecord]:
    """``_collect`` for a per-question source (GQA, TextVQA): one record per question.

    ``parse_question`` validates a row into (image id, its ``QAPair``); the record's
    image is the id's stem under ``image_root``. ``options``: the other ``_collect``
    arguments (split_file, limit, seed, lenient, skips).
    """

    def parse(raw: dict[str, Any], item: _Item) -> tuple[SourceRecord, list[str]]:
        image_id, qa = parse_question(raw, item)
        candidates = _stem_candidates(image_root, image_id)
        record = SourceRecord(source, str(path), image_id, candidates[0], per_question=True)
        record.qa = qa
        return record, candidates

    return _collect(
        path,
        rows,
        parse,
        check_images=image_root is not None or verify_images,
        verify_images=verify_images,
        unique_key=lambda record: record.key,
        **options,
    )


def load_gqa(
    path: PathLike,
    image_root: PathLike | None = None,
    *,
    split_file: PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    lenient: bool = False,
    verify_images: bool = False,
    skips: SkipReport | None = None,
) -> list[SourceRecord]:
    """Load a GQA questions file ``{qid: {imageId, question, answer, fullAnswer, ...}}`` (one record per question)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(path, f"a GQA questions file is a JSON object keyed by question id, got {type(data).__name__}")

    def parse_question(raw: dict[str, Any], item: _Item) -> tuple[str, QAPair]:
        image_id = item.set_image_id(raw.get("imageId"), "imageId")
        question = item.text(raw.get("question"), "question")
        answer = item.text(raw.get("answer"), "answer")
        return image_id, QAPair(str(item.key), question, answer, [answer])

    labelled = ((i, f"qid={qid}", row, qid) for i, (qid, row) in enumerate(data.items()))
    return _load_questions(
        "gqa", path, labelled, parse_question, image_root,
        split_file=split_file, limit=limit, seed=seed, lenient=lenient, verify_images=verify_images, skips=skips,
    )


def load_textvqa(
    path: PathLike,
    image_root: PathLike | None = None,
    *,
    split_file: PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    lenient: bool = False,
    verify_images: bool = False,
    cache_dir: PathLike | None = None,
    skips: SkipReport | None = None,
) -> list[SourceRecord]:
    """Load a TextVQA release JSON (one record per question; target = the majority answer, also
    the first of the references, followed by the other answers in file order)."""
    path = Path(path)
    rows = read_json_rows(path, "data", cache_dir)

    def parse_question(raw: dict[str, Any], item: _Item) -> tuple[str, QAPair]:
        question_id = item.identifier(raw.get("question_id"), "question_id")
        item.label = f"{item.label} question_id={question_id}"
        image_id = item.set_image_id(raw.get("image_id"), "image_id")
        question = item.text(raw.get("question"), "question")
        answers = item.texts(raw.get("answers"), "answers")
        return image_id, QAPair(question_id, question, majority_answer(answers), majority_first(answers))

    labelled = ((i, f"#{i}", row, None) for i, row in enumerate(rows))
    return _load_questions(
        "textvqa", path, labelled, parse_question, image_root,
        split_file=split_file, limit=limit, seed=seed, lenient=lenient, verify_images=verify_images, skips=skips,
    )


def load_flickr30k(
    path: PathLike,
    image_root: PathLike | None = None,
    *,
    source_split: str | None = None,
    split_file: PathLike | None = None,
    limit: int | None = None,
    seed: int = 0,
    lenient: bool = False,
    verify_images: bool = False,
    cache_dir: PathLike | None = None,
    skips: SkipReport | None = None,
) -> list[SourceRecord]:
    """Load Flickr30k captions from the public CSV (``.csv``) or the Karpathy JSON (``.json``).

    The image id is ``img_id`` (CSV) / ``imgid`` (JSON), else the file name's stem.
    ``source_split`` keeps only rows whose own ``split`` column equals it.
    """
    path = Path(path)
    karpathy = path.suffix.lower() == ".json"
    if karpathy:
        rows = read_json_rows(path, "images", cache_dir)
        labelled = ((i, f"#{i}", row, None) for i, row in enumerate(rows))
    else:
        rows = read_csv_rows(path, cache_dir)
        labelled = ((i, f"row {i + 1}", row, None) for i, row in enumerate(rows))
        missing = {"raw", "filename"} - (set(rows[0]) if rows else set())
        if rows and missing:
            raise DataError(path, f"CSV header lacks column(s) {sorted(missing)}", field=sorted(missing)[0])

    def parse(raw: dict[str, Any], item: _Item) -> tuple[SourceRecord, list[str]] | None:
        split = raw.get("split")
        if source_split is not None and split != source_split:
            return None
        filename = item.text(raw.get("filename"), "filename")
        id_field = "imgid" if karpathy else "img_id"
        raw_id = raw.get(id_field)
        image_id = item.set_image_id(Path(filename).stem if raw_id is None else raw_id, id_field)
        item.label = f"{item.label} {id_field}={image_id}"
        if karpathy:
            captions = item.texts(raw.get("sentences"), "sentences", key="raw")
        else:
            captions = item.texts(_json_cell(raw.get("raw"), item, "raw"), "raw")
            if raw.get("sentids") is not None:
                sentids = _json_cell(raw.get("sentids"), item, "sentids")
                if not isinstance(sentids, list) or len(sentids) != len(captions):
                    raise item.error("sentids", f"must be a JSON list with one id per caption, got {sentids!r}")
        candidates = [str(Path(image_root) / filename)] if image_root is not None else [filename]
        record = SourceRecord("flickr30k", str(path), image_id, candidates[0], split=str(split or ""))
        record.captions = captions
        return record, candidates

    return _collect(
        path,
        labelled,
        parse,
        split_file=split_file,
        limit=limit,
        seed=seed,
        lenient=lenient,
        check_images=image_root is not None or verify_images,
        verify_images=verify_images,
        skips=skips,
        unique_key=lambda record: record.image_id,
    )


def _json_cell(value: Any, item: _Item, field: str) -> Any:
    if value is None:
        raise item.error(field, "missing or empty")
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise item.error(field, f"not valid JSON ({err.msg} at column {err.colno}): {value[:60]!r}") from err


LOADERS: dict[str, Callable[..., list[SourceRecord]]] = {
    "coco_unified": load_coco_unified,
    "gqa": load_gqa,
    "textvqa": load_textvqa,
    "flickr30k": load_flickr30k,
}


def load_records(
    dataset: str, path: PathLike, image_root: PathLike | None = None, **options: Any
) -> list[SourceRecord]:
    """Dispatch to the loader of ``dataset`` (one of :data:`DATASETS`)."""
    if dataset not in LOADERS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    return LOADERS[dataset](path, image_root, **options)
