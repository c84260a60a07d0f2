"""Task views of hones.data.tasks: prompts, OCR box, retrieval negatives, IDF."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from PIL import Image

from shared_samples import COCO_SAMPLE, TEXTVQA_SAMPLE

from hones.data.errors import DataError
from hones.data.formats import load_coco_unified, load_textvqa
from hones.data.images import draw_ocr_box
from hones.data.records import OCRAnnotation, OCRTaskItem, QAPair, SourceRecord, TaskItem, load_image, materialize
from hones.data.tasks import (
    build_task_items,
    caption_idf,
    caption_token_sets,
    task_prompt,
    training_items,
    word_set,
)

needs_samples = pytest.mark.skipif(not COCO_SAMPLE.is_file(), reason="shared/data samples not present")


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> list[SourceRecord]:
    if not COCO_SAMPLE.is_file():
        pytest.skip("shared/data samples not present")
    return load_coco_unified(COCO_SAMPLE, lenient=True, cache_dir=tmp_path_factory.mktemp("hf_cache"))


def caption_record(image_id: str, captions: list[str]) -> SourceRecord:
    return SourceRecord("toy", "toy.json", image_id, f"{image_id}.png", captions=captions)


def test_prompts_are_the_papers() -> None:
    vqa = "Question: What is it?\nAnswer the question with a short phrase."
    assert task_prompt("vqa", question="What is it?") == vqa
    assert task_prompt("ocr") == "Transcribe the text inside the blue box.\nOutput text only."
    assert task_prompt("caption") == "Describe the image in one sentence."
    assert task_prompt("retrieval", caption="A dog.") == (
        "Candidate: A dog.\nDoes the candidate correctly describe the image?\nAnswer exactly Yes or No."
    )
    with pytest.raises(ValueError):
        task_prompt("detection")


@needs_samples
def test_vqa_ocr_caption_items(coco: list[SourceRecord]) -> None:
    record = coco[0]
    vqa = build_task_items(coco[:3], "vqa")[0]
    assert vqa == TaskItem(
        uid="coco_unified:158362:vqa",
        task="vqa",
        image=record.image,
        prompt="Question: Type of shoes the man is wearing?\nAnswer the question with a short phrase.",
        target="sneakers",
        references=record.qa.answers,
        group="158362",
    )
    ocr = build_task_items(coco[:3], "ocr")[0]
    assert isinstance(ocr, OCRTaskItem) and ocr.box == (263.5, 26.0, 44.0, 20.5) and ocr.target == "RMF"
    caption = build_task_items(coco[:3], "caption")[0]
    assert caption.target in record.captions and caption.references == record.captions
    assert build_task_items(list(reversed(coco[:3])), "caption")[-1] == caption  # per-item seed


@needs_samples
def test_question_datasets(tmp_path: Path) -> None:
    records = load_textvqa(TEXTVQA_SAMPLE, cache_dir=tmp_path)[:2]
    items = build_task_items(records, "ocr")  # TextVQA is the OOD set for OCR: no box, its question
    assert not isinstance(items[0], OCRTaskItem)
    assert items[0].prompt == task_prompt("vqa", question="what is the brand of this camera?")
    assert items[0].uid == "textvqa:003a8ae2ef43b901:ocr:q34602" and items[0].target == "dakota"
    with pytest.raises(DataError) as info:
        build_task_items(records, "caption")
    assert "captions" in str(info.value)


def test_draw_ocr_box(tmp_path: Path) -> None:
    gray = (128, 128, 128)
    path = tmp_path / "img.png"
    Image.new("RGB", (64, 64), gray).save(path)
    bbox = (10.0, 20.0, 30.0, 12.0)
    record = SourceRecord("toy", "toy.json", "1", str(path), ocr=OCRAnnotation("STOP", bbox))
    item = build_task_items([record], "ocr")[0]
    img = load_image(item)
    blue = (0, 0, 255)
    assert img.getpixel((9, 25)) == blue and img.getpixel((40, 25)) == blue  # left / right edges
    assert img.getpixel((20, 19)) == blue and img.getpixel((20, 32)) == blue  # top / bottom edges
    assert img.getpixel((10, 20)) == gray and img.getpixel((39, 31)) == gray  # the box's inside is untouched
    assert img.getpixel((8, 25)) == gray and img.getpixel((20, 33)) == gray
    plain = materialize(item)
    assert type(plain) is TaskItem and plain.image.getpixel((9, 25)) == blue
    original = Image.new("RGB", (64, 64), gray)
    draw_ocr_box(original, bbox)
    assert original.getpixel((9, 25)) == gray  # input not modified


def test_ocr_box_follows_a_resized_image_file(tmp_path: Path) -> None:
    """The box is in the annotation's pixels (image_info 128x128); a half-size copy of the image gets
    it at half scale, not clipped away. A box that misses the image is a one-line DataError."""
    gray, blue = (128, 128, 128), (0, 0, 255)
    path = tmp_path / "img.png"
    Image.new("RGB", (64, 64), gray).save(path)
    record = SourceRecord("toy", "toy.json", "1", str(path), ocr=OCRAnnotation("STOP", (80.0, 40.0, 40.0, 20.0), (128, 128)))
    img = load_image(build_task_items([record], "ocr")[0])
    assert img.getpixel((39, 25)) == blue and img.getpixel((60, 19)) == blue  # left and top edges of (40, 20, 20, 10)
    assert img.getpixel((45, 25)) == gray
    record.ocr = OCRAnnotation("STOP", (80.0, 40.0, 40.0, 20.0))  # no annotated size: nothing to scale by
    with pytest.raises(DataError, match=r"item toy:1:ocr: OCR box \[80.0, 40.0, 40.0, 20.0\] lies outside the 64x64 image"):
        load_image(build_task_items([record], "ocr")[0])
    import warnings

    from hones.data import records

    records._WARNED_RESIZED.clear()
    record.ocr = OCRAnnotation("STOP", (10.0, 10.0, 20.0, 10.0), (129, 127))  # a resize rounded by a pixel: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(build_task_items([record], "ocr")[0])
    record.ocr = OCRAnnotation("STOP", (10.0, 10.0, 20.0, 10.0), (128, 64))  # stretched, or a crop: sizes cannot tell, so it is said
    with pytest.warns(UserWarning, match=r"image file is 64x64, annotated as 128x64: another aspect ratio \(x0.5 wide, x1 high\).*scaled per axis"):
        stretched = load_image(build_task_items([record], "ocr")[0])
    assert stretched.getpixel((4, 15)) == blue  # the box scaled per axis: x 10 -> 5, y 10 -> 10 (left edge at x 5, the border 2 px)
    records._WARNED_RESIZED.clear()


def test_retrieval_items_and_hard_negatives() -> None:
    rng = random.Random(0)
    colours, things = ["red", "green", "blue", "white"], ["dog", "cat", "car", "ball", "tree"]
    records = [
        caption_record(str(i), [f"a {rng.choice(colours)} {rng.choice(things)} near a {rng.choice(things)} {j}"
                                for j in range(3)])  # fmt: skip
        for i in range(30)
    ]
    items = build_task_items(records, "retrieval", n_neg=10)
    assert len(items) == 30 * 11
    by_group: dict[str, list[TaskItem]] = {}
    for item in items:
        by_group.setdefault(item.group, []).append(item)
    pool = [(r.image_id, c) for r in records for c in r.captions]
    for record in records:
        group = by_group[record.image_id]
        assert sorted(i.label for i in group) == [0] * 10 + [1]
        assert [i.uid for i in group] == [f"toy:{record.image_id}:retrieval:cand{k}" for k in range(11)]
        positive = next(i for i in group if i.label == 1)
        caption = positive.prompt.split("\n")[0].removeprefix("Candidate: ")
        assert caption in record.captions and positive.target == "Yes"
        negatives = [i.prompt.split("\n")[0].removeprefix("Candidate: ") for i in group if i.label == 0]
        assert not set(negatives) & set(record.captions) and len(set(negatives)) == 10
        # the pool (90) is below 50 x n_neg, so every caption was a candidate: the kept ones overlap most
        others = {c for o, c in pool if o != record.image_id and c not in record.captions}
        overlap = sorted((len(word_set(c) & word_set(caption)) for c in others), reverse=True)
        assert sorted((len(word_set(n) & word_set(caption)) for n in negatives), reverse=True) == overlap[:10]


def test_retrieval_default_is_one_positive_and_49_negatives() -> None:
    records = [caption_record(str(i), [f"photo {i} of a thing", f"thing {i} seen again"]) for i in range(30)]
    items = build_task_items(records, "retrieval")  # §1: NDCG@5 over 1 positive + 49 negatives
    for record in records:
        group = [i for i in items if i.group == record.image_id]
        assert len(group) == 50 and sum(i.label for i in group) == 1


def test_retrieval_independent_of_order_and_sharding() -> None:
    records = [caption_record(str(i), [f"caption {i} about thing {i % 7}", f"another {i % 5} words"])
               for i in range(40)]  # fmt: skip
    reference = {i.uid: i for i in build_task_items(records, "retrieval", n_neg=8, seed=3)}
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    assert {i.uid: i for i in build_task_items(shuffled, "retrieval", n_neg=8, seed=3)} == reference
    # two "workers" each build the view from their own record order and keep their shard
    shards = {}
    for rank, order in enumerate((records, shuffled)):
        view = build_task_items(order, "retrieval", n_neg=8, seed=3)
        shards.update({i.uid: i for i in view if int(i.group) % 2 == rank})
    assert shards == reference
    assert {i.uid: i for i in build_task_items(records, "retrieval", n_neg=8, seed=4)} != reference


def test_training_items() -> None:
    records = [caption_record(str(i), [f"a thing number {i}", f"thing {i} again"]) for i in range(20)]
    train = training_items(records, "retrieval", n_neg=6)
    evaluation = build_task_items(records, "retrieval", n_neg=6)
    assert len(train) == 20 * 5
    for group in {i.group for i in train}:
        targets = sorted(i.target for i in train if i.group == group)
        assert targets == ["No"] * 4 + ["Yes"]
        eval_prompts = {i.prompt for i in evaluation if i.group == group}
        assert {i.prompt for i in train if i.group == group} <= eval_prompts
    assert build_task_items(records, "retrieval", "train", n_neg=6) == train  # split "train" -> training items
    qa = SourceRecord("toy", "t.json", "1", "1.png", qa=QAPair("1", "Q?", "yes", ["yes", "no"]))
    assert training_items([qa], "vqa")[0].target == "yes"


def test_caption_idf_hand_case() -> None:
    idf = caption_idf([{1, 2}, {2, 3}, [2, 2]])
    assert idf[2] == pytest.approx(1.0)  # in every set: ln(4/4) + 1
    assert idf[1] == pytest.approx(math.log(2) + 1) and idf[3] == pytest.approx(math.log(2) + 1)
    vocabulary = {"a": 0, "dog": 1, "cat": 2}
    sets = caption_token_sets(["a dog", "a cat", "a dog a dog"], lambda text: [vocabulary[w] for w in text.split()])
    assert sets == [{0, 1}, {0, 2}, {0, 1}]
    idf = caption_idf(sets)
    assert idf[0] == pytest.approx(1.0) and idf[1] == pytest.approx(math.log(4 / 3) + 1)
    assert idf[2] == pytest.approx(math.log(2) + 1)


def test_references_are_the_first_five_captions(coco: list[SourceRecord], caplog: pytest.LogCaptureFixture) -> None:
    """§1: up to 5 reference captions. A few images of the real COCO sample have 6; their caption
    and retrieval items use the first 5 (target and positive drawn from them), and the log counts them."""
    records = [record for record in coco if record.captions]
    six = [record for record in records if len(record.captions) > 5]
    assert six, "the real sample has images with more than 5 captions"
    with caplog.at_level("INFO", logger="hones.data"):
        captions = build_task_items(six, "caption")
    assert f"caption: {len(six)} of {len(six)} images have more than 5 captions" in caplog.text
    for record, item in zip(six, captions):
        assert item.references == record.captions[:5] and item.target in record.captions[:5]
    retrieval = build_task_items(records, "retrieval")
    owners = {record.image_id: record.captions for record in six}
    for item in retrieval:
        if item.group in owners:
            assert item.references == owners[item.group][:5]
            if item.label:
                assert item.prompt.splitlines()[0].removeprefix("Candidate: ") in owners[item.group][:5]
            else:  # a negative is never one of the image's own captions, the sixth included
                assert item.prompt.splitlines()[0].removeprefix("Candidate: ") not in owners[item.group]
