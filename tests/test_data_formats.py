"""Loaders of hones.data.formats on the real samples, toy-world files and handcrafted bad input."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from shared_samples import COCO_SAMPLE, TEXTVQA_SAMPLE

from hones.data.errors import DataError, SkipReport
from hones.data.formats import (
    load_coco_unified,
    load_flickr30k,
    load_gqa,
    load_records,
    load_textvqa,
    read_split_ids,
)
from hones.data.records import load_image
from hones.data.toyworld import ToyWorldConfig, generate_world

needs_samples = pytest.mark.skipif(not COCO_SAMPLE.is_file(), reason="shared/data samples not present")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf_cache")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, ToyWorldConfig(n_train=4, n_discovery=4, n_dev=3, n_test=4, n_ood=6))
    return out


def assert_one_line(err: DataError, *parts: str) -> None:
    message = str(err)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def write_coco(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps({"data": rows}))
    return path


def coco_row(image_id: int, **changes: object) -> dict:
    row = {
        "image_id": image_id,
        "image_info": {"file_name": f"{image_id}.png", "id": image_id, "height": 64, "width": 64},
        "vqa": {"question_id": image_id, "question": "What color?", "answer": "red", "all_answers": ["red"] * 10},
        "captions": [{"caption_id": 1, "caption": "A red circle."}, {"caption_id": 2, "caption": "A circle."}],
        "ocr": {"text": "STOP", "bbox": [4, 4, 20, 10]},
    }
    for key, value in changes.items():
        head, _, tail = key.partition(".")
        if tail:
            row[head] = dict(row[head], **{tail: value})
            if value is ...:
                del row[head][tail]
        elif value is ...:
            del row[head]
        else:
            row[head] = value
    return row


# ----------------------------------------------------------------- real samples


@needs_samples
def test_coco_sample_strict_names_the_bad_item(cache: Path) -> None:
    with pytest.raises(DataError) as info:
        load_coco_unified(COCO_SAMPLE, cache_dir=cache)
    assert_one_line(info.value, str(COCO_SAMPLE), "#922", "image_id=491229", "'ocr.text'", "empty text")


@needs_samples
def test_coco_sample_lenient_counts_the_skip(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    skips = SkipReport()
    with caplog.at_level(logging.WARNING, logger="hones.data"):
        records = load_coco_unified(COCO_SAMPLE, cache_dir=cache, lenient=True, skips=skips)
    assert len(records) == 1332 and skips.total == 1
    assert "1 x ocr.text: empty text" in skips.summary() and "\n" not in skips.summary()
    assert any("skipped 1 item" in r.message for r in caplog.records)


@needs_samples
def test_coco_sample_fields(cache: Path) -> None:
    records = load_coco_unified(COCO_SAMPLE, cache_dir=cache, tasks=("vqa", "caption"))
    assert len(records) == 1333
    first = records[0]
    assert first.image_id == "158362" and first.qa is not None
    assert first.qa.question == "Type of shoes the man is wearing?" and first.qa.answer == "sneakers"
    assert len(first.qa.answers) == 10 and len(first.captions) == 5
    assert first.image.endswith("COCO_train2014_000000158362.jpg")  # image_path fallback, not opened
    assert first.ocr is not None and first.ocr.bbox == (263.5, 26.0, 44.0, 20.5) and first.ocr.text == "RMF"


@needs_samples
def test_coco_sample_limit_seed_and_split_file(cache: Path, tmp_path: Path) -> None:
    a = load_coco_unified(COCO_SAMPLE, cache_dir=cache, tasks=("vqa",), limit=20, seed=3)
    b = load_coco_unified(COCO_SAMPLE, cache_dir=cache, tasks=("vqa",), limit=20, seed=3)
    c = load_coco_unified(COCO_SAMPLE, cache_dir=cache, tasks=("vqa",), limit=20, seed=4)
    assert [r.image_id for r in a] == [r.image_id for r in b] != [r.image_id for r in c]
    order = {r.image_id: i for i, r in enumerate(load_coco_unified(COCO_SAMPLE, cache_dir=cache, tasks=("vqa",)))}
    assert [order[r.image_id] for r in a] == sorted(order[r.image_id] for r in a)  # file order kept
    split = tmp_path / "split.json"
    split.write_text(json.dumps([158362, "143797"]))
    assert read_split_ids(split) == {"158362", "143797"}
    kept = load_coco_unified(COCO_SAMPLE, cache_dir=cache, split_file=split)
    assert [r.image_id for r in kept] == ["158362", "143797"]
    split.write_text(json.dumps([158362, 1]))
    with pytest.raises(DataError) as info:
        load_coco_unified(COCO_SAMPLE, cache_dir=cache, tasks=("vqa",), split_file=split)
    assert_one_line(info.value, str(split), "not found")
    skips = SkipReport()
    assert len(load_coco_unified(COCO_SAMPLE, cache_dir=cache, split_file=split, lenient=True, skips=skips)) == 1
    assert skips.total == 1
    split.write_text("[]")  # the split file is at fault, not the annotations
    with pytest.raises(DataError) as info:
        load_coco_unified(COCO_SAMPLE, cache_dir=cache, split_file=split)
    assert_one_line(info.value, str(split), "an empty split")


@needs_samples
def test_textvqa_sample(cache: Path) -> None:
    records = load_textvqa(TEXTVQA_SAMPLE, cache_dir=cache)
    assert len(records) == 300
    first = records[0]
    assert first.image_id == "003a8ae2ef43b901" and first.qa is not None and first.qa.question_id == "34602"
    assert first.qa.answer == "dakota" and len(first.qa.answers) == 10
    assert first.image == "003a8ae2ef43b901.jpg" and first.per_question


@needs_samples
def test_textvqa_target_is_the_first_reference(cache: Path) -> None:
    """Paper-mode ANLS scores against the first reference: that must be the target the model is
    trained toward (the majority answer), not annotator 1's answer (different on 78 of the 300 sample questions)."""
    from hones.metrics import anls

    raw = {str(row["question_id"]): row["answers"] for row in json.loads(TEXTVQA_SAMPLE.read_text())["data"]}
    records = load_textvqa(TEXTVQA_SAMPLE, cache_dir=cache)
    moved = 0
    for record in records:
        answers = raw[record.qa.question_id]
        assert record.qa.answers[0] == record.qa.answer and sorted(record.qa.answers) == sorted(a.strip() for a in answers)
        assert anls(record.qa.answer, record.qa.answers, "paper") == 1.0
        moved += answers[0].strip() != record.qa.answer
    assert moved > 0


@needs_samples
def test_loads_with_hf_offline(tmp_path: Path) -> None:
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    code = (
        "from hones.data.formats import load_textvqa; "
        f"print(len(load_textvqa({str(TEXTVQA_SAMPLE)!r}, cache_dir={str(tmp_path)!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert out.stdout.strip() == "300"


# ----------------------------------------------------------------- toy-world files


def test_toy_sets_load_with_images(world: Path, cache: Path) -> None:
    gqa = load_gqa(world / "gqa/questions.json", world / "gqa/images", verify_images=True)
    n_questions = len(json.loads((world / "gqa/questions.json").read_text()))
    assert len(gqa) == n_questions and all(Path(r.image).is_file() for r in gqa)
    flickr = load_flickr30k(world / "flickr30k/flickr_annotations_30k.csv", world / "flickr30k/images", cache_dir=cache)
    assert len(flickr) == 6 and all(len(r.captions) == 5 and Path(r.image).is_file() for r in flickr)
    textvqa = load_records("textvqa", world / "textvqa/textvqa.json", world / "textvqa/images", cache_dir=cache)
    assert len(textvqa) == 6 and all(r.image.endswith(".png") for r in textvqa)


def test_flickr_csv_and_karpathy_json(tmp_path: Path, cache: Path) -> None:
    csv_path = tmp_path / "flickr_annotations_30k.csv"
    rows = [
        ['["Two dogs, one \\"big\\" cat.", "A b c."]', "[10, 11]", "train", "1000.jpg", "0"],
        ['["Only one."]', "[12]", "test", "1001.jpg", "1"],
    ]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["raw", "sentids", "split", "filename", "img_id"])
        writer.writerows(rows)
    records = load_flickr30k(csv_path, cache_dir=cache)
    assert [r.image_id for r in records] == ["0", "1"]
    assert records[0].captions == ['Two dogs, one "big" cat.', "A b c."] and records[0].split == "train"
    assert [r.image_id for r in load_flickr30k(csv_path, source_split="test", cache_dir=cache)] == ["1"]

    # ids are kept as written: no numeric inference ("007" is not 7), no NA guessing
    odd = tmp_path / "odd_ids.csv"
    with open(odd, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["raw", "sentids", "split", "filename", "img_id"])
        writer.writerows([['["A."]', "[1]", "test", "a.jpg", "007"], ['["B."]', "[2]", "test", "b.jpg", "NA"]])
    assert [r.image_id for r in load_flickr30k(odd, cache_dir=cache)] == ["007", "NA"]
    bom = tmp_path / "bom.csv"  # as spreadsheet programs save it
    bom.write_bytes(b"\xef\xbb\xbf" + odd.read_bytes())
    assert [r.captions for r in load_flickr30k(bom, cache_dir=cache)] == [["A."], ["B."]]
    extra = tmp_path / "extra_cell.csv"  # an unquoted comma shifts a row by one cell: it used to load with the cell dropped
    extra.write_text('raw,sentids,split,filename,img_id\n"[""A.""]",[1],test,a.jpg,7\n"[""B.""]",[2],test,b.jpg,8,oops\n')
    with pytest.raises(DataError, match=r"extra_cell.csv: line 3: 6 cells for the header's 5 columns"):
        load_flickr30k(extra, cache_dir=cache)
    shifted = tmp_path / "every_row_extra.csv"  # every row one cell too many: pandas took the first column as the index
    shifted.write_text('raw,sentids,split,filename,img_id\n"[""A.""]",[1],test,a.jpg,7,oops\n')
    with pytest.raises(DataError, match=r"every_row_extra.csv: line 2: 6 cells for the header's 5 columns"):
        load_flickr30k(shifted, cache_dir=cache)

    karpathy = tmp_path / "dataset_flickr30k.json"
    karpathy.write_text(json.dumps({"images": [
        {"filename": "1000.jpg", "imgid": 0, "split": "train", "sentences": [{"raw": "A dog."}, {"raw": "Dog."}]},
        {"filename": "1001.jpg", "imgid": 1, "split": "val", "sentences": [{"raw": "A cat."}]},
    ]}))  # fmt: skip
    records = load_flickr30k(karpathy, cache_dir=cache)
    assert [r.captions for r in records] == [["A dog.", "Dog."], ["A cat."]]
    assert load_flickr30k(karpathy, source_split="val", cache_dir=cache)[0].image_id == "1"


# ----------------------------------------------------------------- errors


def test_malformed_json(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"data": [{"image_id": 1},\n {"image_id": 2,, }]}')
    with pytest.raises(DataError) as info:
        load_coco_unified(path, cache_dir=cache)
    assert_one_line(info.value, str(path), "malformed JSON at line 2")
    gqa = tmp_path / "q.json"
    gqa.write_text("{")
    with pytest.raises(DataError) as info:
        load_gqa(gqa)
    assert_one_line(info.value, str(gqa), "malformed JSON")


@pytest.mark.parametrize(
    ("changes", "field", "problem"),
    [
        ({"vqa.answer": ...}, "'vqa.answer'", "missing"),
        ({"vqa.answer": "  "}, "'vqa.answer'", "empty answer"),
        ({"vqa.all_answers": ["red", ""]}, "'vqa.all_answers[1]'", "empty"),
        ({"captions": [{"caption": "ok"}, {"caption": ""}]}, "'captions[1].caption'", "empty caption"),
        ({"ocr.text": ""}, "'ocr.text'", "empty text"),
        ({"ocr.bbox": [1, 2, 0, 5]}, "'ocr.bbox'", "width and height must be > 0"),
        ({"ocr.bbox": [70, 2, 5, 5]}, "'ocr.bbox'", "outside the 64x64 image"),
        ({"ocr.bbox": [1, 2, 3]}, "'ocr.bbox'", "must be [x, y, w, h]"),
        ({"image_info": {"id": 7}}, "'image_info.file_name'", "missing"),
    ],
)
def test_bad_field_is_named(tmp_path: Path, cache: Path, changes: dict, field: str, problem: str) -> None:
    path = write_coco(tmp_path / "ann.json", [coco_row(1), coco_row(7, **changes)])
    with pytest.raises(DataError) as info:
        load_coco_unified(path, cache_dir=cache)
    assert_one_line(info.value, str(path), "item #1 image_id=7", field, problem)


def test_mixed_types_fall_back_to_item_errors(tmp_path: Path, cache: Path) -> None:
    path = write_coco(tmp_path / "ann.json", [coco_row(1), coco_row(2, vqa="not an object")])
    with pytest.raises(DataError) as info:
        load_coco_unified(path, cache_dir=cache)
    assert_one_line(info.value, str(path), "item #1 image_id=2", "'vqa'", "must be an object")


def test_other_formats_name_item_and_field(tmp_path: Path, cache: Path) -> None:
    gqa = tmp_path / "questions.json"
    gqa.write_text(json.dumps({"q1": {"imageId": "n1", "question": "Q?", "answer": "yes"},
                               "q2": {"question": "Q?", "answer": "no"}}))  # fmt: skip
    with pytest.raises(DataError) as info:
        load_gqa(gqa)
    assert_one_line(info.value, str(gqa), "qid=q2", "'imageId'", "missing")
    textvqa = tmp_path / "textvqa.json"
    textvqa.write_text(json.dumps({"data": [{"question": "what?", "image_id": "ab", "question_id": 5, "answers": []}]}))
    with pytest.raises(DataError) as info:
        load_textvqa(textvqa, cache_dir=cache)
    assert_one_line(info.value, str(textvqa), "question_id=5", "'answers'", "empty list")
    big = tmp_path / "textvqa_big_ids.json"  # one float id makes the reader take the column as floats: 12345678901234567 -> ...568
    rows = [{"question": "what?", "image_id": "ab", "question_id": 12345678901234567, "answers": ["x"]},
            {"question": "what?", "image_id": "cd", "question_id": 5.5, "answers": ["y"]}]  # fmt: skip
    big.write_text(json.dumps({"data": rows}))
    with pytest.raises(DataError, match="'question_id'.*a float beyond 2\\*\\*53"):
        load_textvqa(big, cache_dir=cache)
    csv_path = tmp_path / "f.csv"
    header = "raw,sentids,split,filename,img_id\n"
    csv_path.write_text(header + '"[""ok""]","[1]",test,a.jpg,1\n"[""unclosed","[2]",test,b.jpg,2\n')
    with pytest.raises(DataError) as info:
        load_flickr30k(csv_path, cache_dir=cache)
    assert_one_line(info.value, str(csv_path), "row 2 img_id=2", "'raw'", "not valid JSON")


def test_missing_and_corrupt_images(tmp_path: Path, cache: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    path = write_coco(tmp_path / "ann.json", [coco_row(1), coco_row(2)])
    Image.new("RGB", (64, 64)).save(images / "1.png")
    with pytest.raises(DataError) as info:
        load_coco_unified(path, images, cache_dir=cache)
    assert_one_line(info.value, str(path), "image_id=2", "'image'", "not found", str(images / "2.png"))
    (images / "2.png").write_bytes(b"not a png")
    assert len(load_coco_unified(path, images, cache_dir=cache)) == 2  # existence only
    with pytest.raises(DataError) as info:
        load_coco_unified(path, images, cache_dir=cache, verify_images=True)
    assert_one_line(info.value, str(images / "2.png"), "cannot decode image")
    with pytest.raises(DataError) as info:
        load_image(images / "2.png")  # found while batching: the message names the load-time check
    assert_one_line(info.value, str(images / "2.png"), "--data.verify_images true decodes every image at load time")
    with pytest.raises(DataError) as info:
        load_image(images / "3.png")
    assert_one_line(info.value, str(images / "3.png"), "not found")


def test_lenient_skips_are_counted(tmp_path: Path, cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [coco_row(1), coco_row(2, **{"vqa.answer": ""}), coco_row(3), coco_row(4, captions=[]), coco_row(1)]
    path = write_coco(tmp_path / "ann.json", rows)
    skips = SkipReport()
    with caplog.at_level(logging.WARNING, logger="hones.data"):
        records = load_coco_unified(path, cache_dir=cache, lenient=True, skips=skips)
    assert [r.image_id for r in records] == ["1", "3"]
    assert skips.total == 3
    summary = skips.summary()
    assert "vqa.answer: empty answer" in summary and "captions: empty list" in summary and "duplicate" in summary
    assert "skipped 3 item(s)" in caplog.text
    with pytest.raises(DataError):
        load_coco_unified(path, cache_dir=cache)
    empty = write_coco(tmp_path / "empty.json", [])
    with pytest.raises(DataError) as info:
        load_coco_unified(empty, cache_dir=cache, lenient=True)
    assert_one_line(info.value, str(empty), "no items")


def test_overlapping_splits_are_refused(tmp_path: Path) -> None:
    """§1: discovery / dev / test are image-disjoint; a shared image is named before any work."""
    from hones.data.formats import check_disjoint_splits

    (tmp_path / "dev.json").write_text(json.dumps([1, 2, 3]))
    (tmp_path / "test.json").write_text(json.dumps(["3", 4, 5]))
    (tmp_path / "other.json").write_text(json.dumps([6]))
    with pytest.raises(DataError) as info:
        check_disjoint_splits({"dev": tmp_path / "dev.json", "test": tmp_path / "test.json"})
    assert_one_line(info.value, str(tmp_path / "test.json"), "1 image id(s) of the test split are also in the dev split", "e.g. 3")
    with pytest.raises(DataError, match="the discovery and test splits are the same file"):
        check_disjoint_splits({"discovery": tmp_path / "dev.json", "test": tmp_path / "dev.json"})
    check_disjoint_splits({"dev": tmp_path / "dev.json", "test": tmp_path / "other.json", "none": None})
    check_disjoint_splits({"dev": tmp_path / "dev.json", "test": tmp_path / "missing.json"})  # the loader names it


def test_a_strict_error_names_the_lenient_way_on(tmp_path: Path, cache: Path) -> None:
    path = write_coco(tmp_path / "ann.json", [coco_row(1), coco_row(7, **{"ocr.text": " "})])
    with pytest.raises(DataError, match=r"empty text \(' '\); to skip and count such items, load leniently \(--data.lenient true\)"):
        load_coco_unified(path, cache_dir=cache)


def test_reading_annotations_makes_no_network_call(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``datasets`` pings s3.amazonaws.com on every load_dataset unless told not to; local files need no network."""
    import datasets.load

    calls: list[str] = []

    class Session:
        def head(self, url: str, **kwargs: Any) -> None:
            calls.append(url)

    monkeypatch.setattr(datasets.load, "get_session", lambda: Session())
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    datasets.load.increase_load_count("json")  # the ping, as datasets makes it
    assert len(calls) == 1
    path = write_coco(tmp_path / "ann.json", [coco_row(1), coco_row(7)])
    assert len(load_coco_unified(path, cache_dir=cache)) == 2
    assert len(calls) == 1 and datasets.config.HF_UPDATE_DOWNLOAD_COUNTS is True  # no ping; the setting restored


def test_an_ocr_box_that_misses_its_image_file_is_named_at_load(tmp_path: Path, cache: Path) -> None:
    """The box is checked against the image file when annotations are loaded with images (before any
    worker process): scaled for a resized file, an ocr.bbox error when it still misses it."""
    images = tmp_path / "images"
    images.mkdir()
    for image_id, size in ((1, (32, 32)), (7, (32, 32))):  # half-size copies of the annotated 64x64 images
        Image.new("RGB", size).save(images / f"{image_id}.png")
    rows = [coco_row(1, **{"ocr.bbox": [40, 40, 20, 10]}), coco_row(7, **{"ocr.bbox": [40, 40, 20, 10]})]
    rows[1]["image_info"] = {"file_name": "7.png", "id": 7}  # no annotated size: the box stays at 40, 40
    path = write_coco(tmp_path / "ann.json", rows)
    with pytest.raises(DataError) as info:
        load_coco_unified(path, images, cache_dir=cache)
    assert_one_line(info.value, "image_id=7", "'ocr.bbox'", "lies outside the 32x32 image file (the annotation gives no image size)", "--data.lenient true")
    skips = SkipReport()
    records = load_coco_unified(path, images, cache_dir=cache, lenient=True, skips=skips)
    assert [r.image_id for r in records] == ["1"] and skips.total == 1 and "ocr.bbox" in skips.summary()
    assert len(load_coco_unified(path, images, cache_dir=cache, tasks=("vqa",))) == 2  # other tasks do not read boxes
    for row in rows:  # no image_root: the images are found through image_path, relative to the annotation file
        row["image_path"] = f"images/{row['image_id']}.png"
    with pytest.raises(DataError, match=r"image_id=7 field 'ocr.bbox': OCR box .* lies outside the 32x32 image file"):
        load_coco_unified(write_coco(tmp_path / "ann_paths.json", rows), cache_dir=cache)
    from hones.data import records as image_records

    image_records._WARNED_RESIZED.clear()
    Image.new("RGB", (32, 16)).save(images / "1.png")  # a crop of the annotated 64x64 image, or a stretched copy: said once
    with pytest.warns(UserWarning, match=r"1.png: the image file is 32x16, annotated as 64x64: another aspect ratio .* shown once"):
        assert len(load_coco_unified(write_coco(tmp_path / "ann_crop.json", rows[:1]), cache_dir=cache)) == 1
    image_records._WARNED_RESIZED.clear()


def test_a_data_error_in_a_loader_worker_stays_one_line() -> None:
    """torch rebuilds a worker's exception from its traceback text; DataError keeps the one line."""
    from torch.utils.data import DataLoader

    loader = DataLoader(BadItems(), batch_size=1, num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    assert str(info.value) == "img.png item u1: cannot read the image" and info.value.problem == str(info.value)


class BadItems:
    """A dataset whose item raises a DataError (in a worker process)."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Any:
        raise DataError("img.png", "cannot read the image", item="u1")
