"""The toy world: determinism, subset regeneration, splits, formats, CLI, corpus."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from hones.data.formats import load_coco_unified, load_flickr30k, load_gqa, load_textvqa
from hones.data.tasks import task_prompt
from hones.data.toyworld import (
    COCO_SPLITS,
    LOCK_NAME,
    WORDS,
    ToyWorldConfig,
    coco_item,
    generate_world,
    main,
    toy_corpus,
)

TINY = ToyWorldConfig(seed=0, n_train=5, n_discovery=4, n_dev=3, n_test=4, n_ood=5)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "hf_cache" not in p.parts and p.name != LOCK_NAME
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, TINY)
    return out


def test_same_seed_identical_bytes(world: Path, tmp_path: Path) -> None:
    generate_world(tmp_path / "again", TINY)
    assert tree_digest(world) == tree_digest(tmp_path / "again")
    generate_world(tmp_path / "other", ToyWorldConfig(seed=1, n_train=5, n_discovery=4, n_dev=3, n_test=4, n_ood=5))
    other = tree_digest(tmp_path / "other")
    assert other.keys() == tree_digest(world).keys() and other != tree_digest(world)


def test_subset_regenerates_identically(world: Path, tmp_path: Path) -> None:
    bigger = ToyWorldConfig(seed=0, n_train=7, n_discovery=6, n_dev=3, n_test=4, n_ood=7)
    generate_world(tmp_path / "big", bigger)
    small, big = tree_digest(world), tree_digest(tmp_path / "big")
    images = [name for name in small if name.endswith(".png")]
    assert images and all(small[name] == big[name] for name in images)
    img, record = coco_item("test", 2, TINY)
    on_disk = (world / "coco/images" / record["image_info"]["file_name"]).read_bytes()
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    assert buffer.getvalue() == on_disk
    records = {r["image_id"]: r for r in json.loads((world / "coco/unified.json").read_text())["data"]}
    assert records[record["image_id"]] == record


def test_splits_are_disjoint_and_complete(world: Path) -> None:
    data = json.loads((world / "coco/unified.json").read_text())["data"]
    splits = {s: json.loads((world / f"splits/{s}.json").read_text()) for s in COCO_SPLITS}
    assert [len(splits[s]) for s in COCO_SPLITS] == [5, 4, 3, 4]
    all_ids = [i for s in COCO_SPLITS for i in splits[s]]
    assert len(all_ids) == len(set(all_ids)) == len(data)
    assert set(all_ids) == {r["image_id"] for r in data}


def test_records_look_like_the_real_format(world: Path) -> None:
    sample_keys = {"image_id", "image_info", "image_path", "vqa", "captions", "ocr", "retrieval"}
    for record in json.loads((world / "coco/unified.json").read_text())["data"]:
        assert set(record) == sample_keys
        vqa = record["vqa"]
        assert len(vqa["all_answers"]) == 10 and Counter(vqa["all_answers"])[vqa["answer"]] >= 6
        assert {"question_id", "question", "question_type", "answer_type"} <= set(vqa)
        captions = [c["caption"] for c in record["captions"]]
        assert len(captions) == len(set(captions)) == 5 and record["retrieval"] == record["captions"]
        size = record["image_info"]["width"]
        img = Image.open(world / "coco/images" / record["image_info"]["file_name"])
        assert img.size == (size, size) == (64, 64)
        assert (0, 0, 255) not in {c for _, c in img.convert("RGB").getcolors(1 << 16)}  # no blue in the images
        if record["ocr"] is not None:
            x, y, w, h = record["ocr"]["bbox"]
            assert record["ocr"]["text"] in WORDS and 0 < x and x + w < size and 0 < y and y + h < size
            assert x % (size // 8) == 0 and y % (size // 8) == 0  # plates on the patch grid (toyworld._place_plate)
            plate = img.convert("L").crop((x, y, x + w, y + h))
            assert plate.getextrema()[1] - plate.getextrema()[0] > 150  # the word is drawn: ink on plate


def test_every_set_loads_through_the_real_loaders(world: Path, tmp_path: Path) -> None:
    for split in COCO_SPLITS:
        records = load_coco_unified(world / "coco/unified.json", world / "coco/images", verify_images=True,
                                    split_file=world / f"splits/{split}.json", cache_dir=tmp_path)  # fmt: skip
        assert len(records) == TINY.count(split)
    gqa = load_gqa(world / "gqa/questions.json", world / "gqa/images", verify_images=True)
    assert len(gqa) >= TINY.n_ood and all(r.qa.answer for r in gqa)
    assert any("left of" in r.qa.question or "right of" in r.qa.question for r in gqa)
    textvqa = load_textvqa(world / "textvqa/textvqa.json", world / "textvqa/images",
                           verify_images=True, cache_dir=tmp_path)  # fmt: skip
    assert len(textvqa) == TINY.n_ood and all(r.qa.answer.upper() in WORDS for r in textvqa)
    flickr = load_flickr30k(world / "flickr30k/flickr_annotations_30k.csv", world / "flickr30k/images",
                            verify_images=True, cache_dir=tmp_path)  # fmt: skip
    assert len(flickr) == TINY.n_ood and all(len(r.captions) == 5 for r in flickr)


def test_image_size_128() -> None:
    img, record = coco_item("train", 0, ToyWorldConfig(image_size=128))
    assert img.size == (128, 128) and record["image_info"]["width"] == 128
    with pytest.raises(ValueError):
        ToyWorldConfig(image_size=32)


def test_cli_refuses_non_empty_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "w"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = ["--out", str(out), "--n-train", "2", "--n-discovery", "1", "--n-dev", "1", "--n-test", "1", "--n-ood", "1"]
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err and not (out / "coco").exists()
    assert main([*args, "--force"]) == 0
    assert (out / "keep.txt").exists() and (out / "toyworld.json").is_file()
    assert len(list((out / "coco/images").iterdir())) == 5


def test_if_missing_processes_take_turns(world: Path, tmp_path: Path) -> None:
    """Two `--if-missing` runs started together: one generates, the other waits and reuses it."""
    out = tmp_path / "shared"
    args = ["-m", "hones.data.toyworld", "--out", str(out), "--n-train", "5", "--n-discovery", "4",
            "--n-dev", "3", "--n-test", "4", "--n-ood", "5", "--if-missing"]  # fmt: skip
    procs = [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err.decode() for _, err in results]
    assert sum(b"generating the toy world" in err for _, err in results) == 1
    assert tree_digest(out) == tree_digest(world)
    other = ["--out", str(out), "--seed", "3", "--if-missing"]
    assert main(other) == 2  # same folder, other settings: refused, nothing rewritten
    assert tree_digest(out) == tree_digest(world)


def test_toy_corpus(world: Path) -> None:
    corpus = toy_corpus(world)
    assert corpus == toy_corpus(world) and len(corpus) == len(set(corpus))
    strings = set(corpus)
    assert set(WORDS) <= strings and {"Yes", "No", task_prompt("ocr"), task_prompt("caption")} <= strings
    for record in json.loads((world / "coco/unified.json").read_text())["data"]:
        assert task_prompt("vqa", question=record["vqa"]["question"]) in strings
        assert set(record["vqa"]["all_answers"]) <= strings
        assert all(c["caption"] in strings for c in record["captions"])
    in_memory = set(toy_corpus(config=TINY))
    assert in_memory == strings  # the same world, generated without images


def test_ensure_world_reads_a_read_only_world(world: Path, tmp_path: Path) -> None:
    """A finished world needs no lock file, so a read-only copy still loads."""
    import shutil
    import stat

    from hones.data.toyworld import ensure_world

    copy = tmp_path / "ro"
    shutil.copytree(world, copy)
    copy.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert ensure_world(copy, TINY)["counts"]["coco"]["test"] == TINY.n_test
        assert not (copy / LOCK_NAME).exists()
    finally:
        copy.chmod(stat.S_IRWXU)
