"""Tests of hones.metrics and hones.text_normalization.

Expected values are worked out by hand from the definitions (arithmetic in comments).
The answer lists below are copied verbatim from the real samples in
shared/data/coco_unified_sample.json (VQA v2 answers, keyed by COCO image id) and
shared/data/textvqa_sample.json (keyed by question id); ``test_inlined_answers_are_real``
checks that when the samples are present.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from shared_samples import SHARED_DATA

from hones.metrics import (
    ANLS,
    BLEU4,
    MODES,
    NDCG,
    TASKS,
    VQAAccuracy,
    anls,
    bleu4_statistics,
    build_metric,
    corpus_bleu4,
    group_ids,
    ndcg_at_k,
    postprocess_generation,
    vqa_accuracy,
)
from hones.text_normalization import (
    levenshtein,
    normalize_anls_official,
    normalize_anls_paper,
    normalize_vqa_official,
    normalize_vqa_paper,
    tokenize_bleu_paper,
    tokenize_ptb_coco,
)

# --------------------------------------------------------------------------- data


def _load_sample(name: str) -> list[dict[str, Any]]:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"shared/data/{name} not available")
    return json.loads(path.read_text())["data"]


# VQA v2 all_answers from coco_unified_sample.json, by image_id
VQA_REAL: dict[int, list[str]] = {
    # "Type of shoes the man is wearing?"
    158362: ["loafer", "sneakers", "dress shoes", "leather", "sneakers", "leather",
             "sneakers", "sneakers", "sneakers", "sneakers"],
    # "Which way are the cars allowed to go?"
    265814: ["forward", "straight", "one way", "one way", "forward", "right", "forward",
             "forward", "one way", "forward"],
    # "What building is in the image?"
    206416: ["unknown", "clock tower", "clock tower", "clocktower", "old one", "tower",
             "statue", "clock tower", "tower", "clock tower"],
    # "What are the home team's colors?"
    306240: ["gray", "red and white", "red and white", "red", "red, white", "red", "red white",
             "red white", "white and red", "red and white"],
    # "What is the date on the poster?"
    345417: ["july 4th 2009", "july 4th 2009", "july, 4 2009", "july 4, 2009", "july 4th 2009",
             "july 4 2009", "july 4th, 2009", "july 4th 2009", "july 4, 2009", "july 4th 2009"],
    # "What sport are these two men prepared to play?"
    362118: ["none", "eating", "basketball", "eating", "frisbee", "no sport", "eating",
             "competitive eating", "none", "table"],
}

# TextVQA answers from textvqa_sample.json, by question_id
TEXTVQA_REAL: dict[int, list[str]] = {
    34602: ["nous les gosses", "dakota", "clos culombu", "dakota digital", "dakota", "dakota",
            "dakota digital", "dakota digital", "dakota", "dakota"],
    34605: ["bowmore ", "bowmore", "bowmore", "bowmore", "bowmore", "bowmore", "bowmore",
            "bowmore islay", "dowmore islay", "bowmore islay"],
    34606: ["10 years", "10 year", "10 years", "10 years ", "10 years", "10 years", "10 years",
            "10 years", "martial arts", "10"],
    34613: ["hersheys", "hershey's", "hersheys", "hershey's", "hershey's", "hershey's",
            "hershey's", "hershey's", "hershey's", "hershey's"],
    34614: ["bud light", "bud light", "bud light", "bud light", "all 2 liters", "bud light",
            "bud light", "bud light", "bud light", "bud light"],
    34630: ["dumbledore", "dumbledore", "dumbledore", "dumbledore", "dumbledore", "dumbledore",
            "dumbledore", "dumbledore", "look& storng dumbledore", "dumbledore"],
}


def test_inlined_answers_are_real() -> None:
    coco = {x["image_id"]: x["vqa"]["all_answers"] for x in _load_sample("coco_unified_sample.json")}
    textvqa = {x["question_id"]: x["answers"] for x in _load_sample("textvqa_sample.json")}
    for image_id, answers in VQA_REAL.items():
        assert coco[image_id] == answers
    for qid, answers in TEXTVQA_REAL.items():
        assert textvqa[qid] == answers


# --------------------------------------------------------------------------- helpers


def test_postprocess_generation() -> None:
    assert postprocess_generation("Answer: yes") == "yes"
    assert postprocess_generation("  assistant:  A:Two dogs\nThe image shows two dogs.") == "Two dogs"
    assert postprocess_generation("CAPTION : A cat on a mat.\n") == "A cat on a mat."
    assert postprocess_generation("A cat on a mat.") == "A cat on a mat."  # no colon: text
    assert postprocess_generation("Answer:\n\nstop sign\nmore") == "stop sign"
    assert postprocess_generation("") == ""


def test_vqa_normalisations() -> None:
    assert normalize_vqa_paper("Answer: answer:  The T-shirt,  don't!") == "the tshirt dont"
    # official: punctuation next to a space is deleted, else replaced by a space
    assert normalize_vqa_official("red, white") == "red white"
    assert normalize_vqa_official("green/yellow") == "green yellow"
    assert normalize_vqa_official("t-shirt and shorts") == "t shirt and shorts"
    # a digit-comma-digit anywhere deletes the punctuation instead
    assert normalize_vqa_official("100,978") == "100978"
    assert normalize_vqa_official("1,5") == "15"
    # periods: removed unless a digit follows
    assert normalize_vqa_official("3.82") == "3.82"
    assert normalize_vqa_official(".89") == ".89"
    assert normalize_vqa_official("Yes.") == "yes"
    assert normalize_vqa_official("1.") == "1"
    # apostrophe, colon and other symbols are kept
    assert normalize_vqa_official("10:07") == "10:07"
    assert normalize_vqa_official("$3.82") == "$3.82"
    assert normalize_vqa_official("king's cross") == "king's cross"
    # articles, number words (none -> 0), contractions
    assert normalize_vqa_official("The two dogs") == "2 dogs"
    assert normalize_vqa_official("an apple and a pear") == "apple and pear"
    assert normalize_vqa_official("None") == "0"
    assert normalize_vqa_official("ten") == "10"
    assert normalize_vqa_official("dont know") == "don't know"
    assert normalize_vqa_official("whats that") == "what's that"
    assert normalize_vqa_official("couldnt've") == "couldn't've"
    assert normalize_vqa_official("its dark") == "its dark"  # "its" is a word
    assert normalize_vqa_official("  on\tthe\nstreet ") == "on street"


# --------------------------------------------------------------------------- VQA


def test_vqa_paper_several_references() -> None:
    refs = VQA_REAL[158362]  # sneakers x6, leather x2, loafer x1, dress shoes x1
    assert vqa_accuracy("Sneakers.", refs, "paper") == 1.0  # min(6/3, 1)
    assert vqa_accuracy("leather", refs, "paper") == pytest.approx(2 / 3)  # 2/3
    assert vqa_accuracy("Answer: loafer", refs, "paper") == pytest.approx(1 / 3)
    assert vqa_accuracy("boots", refs, "paper") == 0.0
    # paper mode keeps articles and number words: no match
    assert vqa_accuracy("1 way", VQA_REAL[265814], "paper") == 0.0  # "one way" != "1 way"
    assert vqa_accuracy("One way.", VQA_REAL[265814], "paper") == 1.0  # 3 matches: min(3/3, 1)
    assert vqa_accuracy("The clock tower", VQA_REAL[206416], "paper") == 0.0
    # "red, white" and "red white" both normalise to "red white": 3 matches -> 1
    assert vqa_accuracy("Red, white", VQA_REAL[306240], "paper") == 1.0


def test_vqa_paper_single_reference_containment() -> None:
    assert vqa_accuracy("No.", ["no"], "paper") == 1.0  # exact after normalisation
    assert vqa_accuracy("Yes, it is.", ["yes"], "paper") == 1.0  # contains "yes"
    assert vqa_accuracy("a red double decker bus", ["double decker"], "paper") == 1.0
    assert vqa_accuracy("snow", ["no"], "paper") == 0.0  # whole words only
    assert vqa_accuracy("yes", ["yes it is"], "paper") == 0.0  # reference not in prediction
    assert vqa_accuracy("", ["?"], "paper") == 1.0  # both normalise to ""
    assert vqa_accuracy("cat", ["?"], "paper") == 0.0  # an empty reference contains nothing


def test_vqa_official_leave_one_out_on_real_answers() -> None:
    # With m of the 10 answers matching, leaving out one of the m matching answers leaves
    # m-1 matches, leaving out another one leaves m:
    #   acc = [m * min((m-1)/3, 1) + (10-m) * min(m/3, 1)] / 10
    # m=1: (1*0 + 9*1/3)/10 = 0.3      m=2: (2*1/3 + 8*2/3)/10 = 0.6
    # m=3: (3*2/3 + 7*1)/10 = 0.9      m=4: (4*1 + 6*1)/10 = 1.0
    sneakers = VQA_REAL[158362]
    assert vqa_accuracy("sneakers", sneakers, "official") == pytest.approx(1.0)  # m=6
    assert vqa_accuracy("leather", sneakers, "official") == pytest.approx(0.6)  # m=2
    assert vqa_accuracy("Loafer.", sneakers, "official") == pytest.approx(0.3)  # m=1
    # number word -> digit, article and period removed: "1 way" = "one way" x3 -> m=3
    assert vqa_accuracy("1 way", VQA_REAL[265814], "official") == pytest.approx(0.9)
    assert vqa_accuracy("A one way.", VQA_REAL[265814], "official") == pytest.approx(0.9)
    # article removed: "clock tower" x4 ("clocktower" differs) -> m=4
    assert vqa_accuracy("The clock tower", VQA_REAL[206416], "official") == pytest.approx(1.0)
    # comma next to a space deleted: "red, white" + "red white" x2 -> m=3
    assert vqa_accuracy("Red, white", VQA_REAL[306240], "official") == pytest.approx(0.9)
    # "july, 4 2009", "july 4, 2009" x2, "july 4 2009" -> m=4
    assert vqa_accuracy("July 4, 2009", VQA_REAL[345417], "official") == pytest.approx(1.0)
    # "none" -> "0": "zero" matches the two "none" -> m=2
    assert vqa_accuracy("zero", VQA_REAL[362118], "official") == pytest.approx(0.6)
    # one reference: exact match of the processed strings
    assert vqa_accuracy("Two.", ["2"], "official") == 1.0
    assert vqa_accuracy("two dogs", ["2"], "official") == 0.0


def test_vqa_metric_mean_and_keep_mask() -> None:
    preds = ["leather", "1 way", "The clock tower", "padding duplicate"]
    refs = [VQA_REAL[158362], VQA_REAL[265814], VQA_REAL[206416], VQA_REAL[206416]]
    official = VQAAccuracy("official")
    official.update(preds, refs, keep=[True, True, True, False])
    assert official.compute().item() == pytest.approx((0.6 + 0.9 + 1.0) / 3)
    paper = VQAAccuracy("paper")
    paper.update(preds[:3], refs[:3])  # 2/3, 0, 0
    assert paper.compute().item() == pytest.approx((2 / 3) / 3)
    assert paper.mode == "paper" and paper.name == "vqa_accuracy/paper"
    assert official.name == "vqa_accuracy/official"
    # generations are post-processed by default
    fresh = VQAAccuracy("official")
    fresh.update(["Assistant: Answer: 1 way\nbecause of the sign"], [VQA_REAL[265814]])
    assert fresh.compute().item() == pytest.approx(0.9)
    with warnings.catch_warnings():  # torchmetrics warns about compute before update
        warnings.simplefilter("ignore", UserWarning)
        assert math.isnan(VQAAccuracy().compute().item())  # nothing seen


# --------------------------------------------------------------------------- ANLS


def test_levenshtein() -> None:
    assert levenshtein("", "") == 0
    assert levenshtein("abc", "") == 3
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("10 yrs", "10 years") == 2  # insert "e", "a"
    assert levenshtein("10 yrs", "10 year") == 3  # r->e, s->a, insert r


def test_anls_normalisations() -> None:
    assert normalize_anls_paper(" Bud Light! ") == "budlight"
    assert normalize_anls_official(" Bud Light! ") == "bud light!"


def test_anls_paper_vs_official_on_textvqa() -> None:
    # 34602: paper uses only the first gold "nous les gosses" -> "nouslesgosses" (13) vs
    # "dakotadigital" (13): lev >= 7 so NL >= 0.5 -> 0; official: gold "dakota digital" -> 1
    assert anls("Dakota Digital", TEXTVQA_REAL[34602], "paper") == 0.0
    assert anls("Dakota Digital", TEXTVQA_REAL[34602], "official") == 1.0
    # 34606: paper "10yrs" vs "10years": lev 2 / 7 -> 1 - 2/7 = 5/7
    # official max over golds: "10 years" lev 2 / 8 -> 0.75; "10 year" 3/7 -> 4/7;
    # "10" 4/6 >= 0.5 -> 0  => 0.75
    assert anls("10 yrs", TEXTVQA_REAL[34606], "paper") == pytest.approx(5 / 7)
    assert anls("10 yrs", TEXTVQA_REAL[34606], "official") == pytest.approx(0.75)
    # 34614 (space sensitivity): paper "budlight" == "budlight" -> 1;
    # official "budlight" vs "bud light": lev 1 / 9 -> 8/9
    assert anls("budlight", TEXTVQA_REAL[34614], "paper") == 1.0
    assert anls("budlight", TEXTVQA_REAL[34614], "official") == pytest.approx(8 / 9)
    # 34605: first gold "bowmore " -> "bowmore" (7) vs "bowmoreislay" (12): lev 5/12 ->
    # 7/12; official: "bowmore islay" is a gold -> 1
    assert anls("Bowmore Islay", TEXTVQA_REAL[34605], "paper") == pytest.approx(7 / 12)
    assert anls("Bowmore Islay", TEXTVQA_REAL[34605], "official") == 1.0
    # 34630: punctuation kept officially: "dumbledore." vs "dumbledore" lev 1/11 -> 10/11
    assert anls("Dumbledore.", TEXTVQA_REAL[34630], "paper") == 1.0
    assert anls("Dumbledore.", TEXTVQA_REAL[34630], "official") == pytest.approx(10 / 11)
    # 34613: "hershey's" -> paper "hersheys" == first gold; official: "hershey's" is a gold
    assert anls("Hershey's", TEXTVQA_REAL[34613], "paper") == 1.0
    assert anls("Hershey's", TEXTVQA_REAL[34613], "official") == 1.0


def test_anls_threshold() -> None:
    assert anls("ab", ["ac"], "official") == 0.0  # NL = 1/2 is not < 0.5
    assert anls("abc", ["abd"], "official") == pytest.approx(2 / 3)  # NL = 1/3
    assert anls("abc", ["abd"], "official", threshold=0.3) == 0.0
    assert anls("", [""], "official") == 1.0  # both empty: NL = 0


def test_anls_metric() -> None:
    preds = ["Dakota Digital", "10 yrs", "budlight"]
    refs = [TEXTVQA_REAL[34602], TEXTVQA_REAL[34606], TEXTVQA_REAL[34614]]
    paper, official = ANLS("paper"), ANLS("official")
    for metric in (paper, official):
        metric.update(preds[:2], refs[:2])
        metric.update(preds[2:], refs[2:])
    assert paper.compute().item() == pytest.approx((0 + 5 / 7 + 1) / 3)
    assert official.compute().item() == pytest.approx((1 + 0.75 + 8 / 9) / 3)
    assert official.name == "anls/official"
    with pytest.raises(ValueError, match="threshold"):
        ANLS(threshold=0.0)


# --------------------------------------------------------------------------- BLEU


def test_bleu_tokenisers() -> None:
    assert tokenize_bleu_paper("A T-shirt, don't!") == ["a", "t", "shirt", "don", "t"]
    assert tokenize_ptb_coco("A T-shirt, don't!") == ["a", "t-shirt", "do", "n't"]
    # expected strings below are what the COCO evaluation's Java PTBTokenizer (lowercased,
    # then its punctuation deletion) produced for these inputs
    java = {
        "A man's T-shirt (red) and [blue] {x} jeans.":
            "a man 's t-shirt -lrb- red -rrb- and -lsb- blue -rsb- -lcb- x -rcb- jeans",
        "Don't can't won't cannot it's dogs' gonna I'm we're they've you'll he'd":
            "do n't ca n't wo n't can not it 's dogs gon na i 'm we 're they 've you 'll he 'd",
        "green/yellow 1/2 a*b 3.82 $3.82 1,000 10:07 50% & AT&T a.m. U.S. Mr. Smith":
            "green/yellow 1/2 a * b 3.82 $ 3.82 1,000 10:07 50 % & at&t a.m. u.s. mr. smith",
        'A street sign that says "Sex St," along with a $350 penalty':
            "a street sign that says sex st along with a $ 350 penalty",
        "Three images: a refrigerator, a woman's face; and a door...":
            "three images a refrigerator a woman 's face and a door",
        "A wooden street sign showing \"Franklin St. and 3rd Ave.\"":
            "a wooden street sign showing franklin st. and 3rd ave.",
        "The shape of a T.": "the shape of a t",
        "Washington D.C.": "washington d.c.",
        "e-mail -5 5- .89 wow!! a--b": "e-mail -5 5 .89 wow !! a b",
    }
    for text, expected in java.items():
        assert " ".join(tokenize_ptb_coco(text)) == expected, text


def test_bleu_hand_computed() -> None:
    hyp = "The cat sat on the mat."
    refs = ["the cat is on the mat", "There is a cat on the mat"]
    # unigrams: the x2 (max ref count 2), cat, sat (0), on, mat -> 5/6
    # bigrams: the cat, on the, the mat match; cat sat, sat on do not -> 3/5
    # trigrams: only "on the mat" -> 1/4;  4-grams: none -> 0/3
    # closest reference length to 6: 6 (ref 1)
    stats = bleu4_statistics(hyp, refs, "paper")
    assert stats.matches == (5, 3, 1, 0) and stats.totals == (6, 5, 4, 3)
    assert (stats.hyp_len, stats.ref_len) == (6, 6)
    assert corpus_bleu4([hyp], [refs], "paper") == 0.0  # p4 = 0
    # add-one smoothing on orders 2-4: (5/6 * 4/6 * 2/5 * 1/4)^(1/4) = (1/18)^(1/4), BP = 1
    assert corpus_bleu4([hyp], [refs], "paper", smooth=True) == pytest.approx(18 ** -0.25)
    # COCO constants: p4 = (0 + 1e-15) / (3 + 1e-9) instead of 0
    coco = (5 / 6 * 3 / 5 * 1 / 4 * 1e-15 / 3) ** 0.25
    assert corpus_bleu4([hyp], [refs], "official") == pytest.approx(coco, rel=1e-6)


def test_bleu_corpus_level_and_brevity_penalty() -> None:
    # "the cat is on the mat" (6) vs "the cat is on the mat now" (7): all n-grams match,
    # BP = exp(1 - 7/6)
    a = ("the cat is on the mat", ["the cat is on the mat now"])
    assert corpus_bleu4([a[0]], [a[1]], "paper") == pytest.approx(math.exp(-1 / 6))
    assert corpus_bleu4([a[0]], [a[1]], "official") == pytest.approx(math.exp(-1 / 6))
    # adding "a dog" / ["a dog"]: matches = totals = (8, 6, 4, 3), hyp 8, ref 7 + 2 = 9
    # -> corpus BLEU = exp(1 - 9/8), not the mean of the two sentence scores
    b = ("a dog", ["a dog"])
    for mode in MODES:
        metric = BLEU4(mode)
        metric.update([a[0]], [a[1]])
        metric.update([b[0], "ignored padding"], [b[1], ["x"]], keep=torch.tensor([True, False]))
        assert metric.matches.tolist() == [8, 6, 4, 3] and metric.totals.tolist() == [8, 6, 4, 3]
        assert metric.compute().item() == pytest.approx(math.exp(-1 / 8))
        assert metric.name == f"bleu4/{mode}"
    # closest reference length, ties to the shorter: hyp 3 tokens, refs of 2 and 4 -> 2
    assert bleu4_statistics("a b c", ["a b", "a b c d"]).ref_len == 2
    # max_references keeps the first ones
    m = BLEU4("paper", max_references=1)
    m.update(["a b c d"], [["x y", "a b c d"]])
    assert m.compute().item() == 0.0


def _coco_pairs(n: int) -> tuple[list[str], list[list[str]]]:
    """Real COCO captions: reference 0 as hypothesis, references 1-4 as references."""
    items = [x for x in _load_sample("coco_unified_sample.json") if len(x["captions"]) >= 5][:n]
    hyps = [x["captions"][0]["caption"] for x in items]
    refs = [[c["caption"] for c in x["captions"][1:5]] for x in items]
    return hyps, refs


def test_bleu_paper_matches_sacrebleu_on_coco_captions() -> None:
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = _coco_pairs(400)

    def joined(text: str) -> str:
        return " ".join(tokenize_bleu_paper(text))

    ref_streams = [[joined(r[j]) for r in refs] for j in range(4)]
    for smooth, method in ((False, "none"), (True, "add-k")):
        expected = sacrebleu.corpus_bleu(
            [joined(h) for h in hyps], ref_streams, tokenize="none", smooth_method=method,
            smooth_value=1 if smooth else None, force=True,
        ).score / 100
        assert corpus_bleu4(hyps, refs, "paper", smooth=smooth) == pytest.approx(expected, abs=1e-9)
    # the official arithmetic differs from Papineni only by the 1e-15 / 1e-9 constants
    ptb = [[" ".join(tokenize_ptb_coco(r[j])) for r in refs] for j in range(4)]
    expected = sacrebleu.corpus_bleu(
        [" ".join(tokenize_ptb_coco(h)) for h in hyps], ptb, tokenize="none",
        smooth_method="none", force=True,
    ).score / 100
    assert corpus_bleu4(hyps, refs, "official") == pytest.approx(expected, abs=1e-6)


def test_bleu_paper_matches_nltk_on_coco_captions() -> None:
    bleu_score = pytest.importorskip("nltk.translate.bleu_score")
    hyps, refs = _coco_pairs(400)
    expected = bleu_score.corpus_bleu(
        [[tokenize_bleu_paper(r) for r in rs] for rs in refs], [tokenize_bleu_paper(h) for h in hyps]
    )
    assert corpus_bleu4(hyps, refs, "paper") == pytest.approx(expected, abs=1e-9)


def test_bleu_official_matches_coco_scorer() -> None:
    """Optional: needs ``pycocoevalcap`` (not a project dependency)."""
    bleu_mod = pytest.importorskip("pycocoevalcap.bleu.bleu")
    hyps, refs = _coco_pairs(400)
    gts = {i: [" ".join(tokenize_ptb_coco(r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(tokenize_ptb_coco(h))] for i, h in enumerate(hyps)}
    scores, _ = bleu_mod.Bleu(4).compute_score(gts, res, verbose=0)
    assert corpus_bleu4(hyps, refs, "official") == pytest.approx(scores[3], abs=1e-12)


@pytest.mark.slow
def test_ptb_tokenizer_matches_coco_java_tokenizer() -> None:
    """Optional: needs ``pycocoevalcap`` and java; compares all captions of the sample."""
    tok_mod = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    if shutil.which("java") is None:
        pytest.skip("java not available")
    captions = [c["caption"] for x in _load_sample("coco_unified_sample.json") for c in x["captions"]]
    java = tok_mod.PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    same = sum(" ".join(tokenize_ptb_coco(c)) == java[i][0] for i, c in enumerate(captions))
    assert same / len(captions) >= 0.999


# --------------------------------------------------------------------------- NDCG


def _one_positive_at(rank: int, n: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.arange(n, 0, -1, dtype=torch.float32)  # strictly decreasing
    labels = torch.zeros(n, dtype=torch.long)
    labels[rank - 1] = 1
    return scores, labels


def test_ndcg_hand_cases() -> None:
    # one positive: IDCG@5 = 1/log2(2) = 1; DCG = 1/log2(rank + 1) if rank <= 5 else 0
    assert ndcg_at_k(*_one_positive_at(1), k=5) == pytest.approx(1.0)
    assert ndcg_at_k(*_one_positive_at(2), k=5) == pytest.approx(1 / math.log2(3))  # 0.6309
    assert ndcg_at_k(*_one_positive_at(3), k=5) == pytest.approx(0.5)  # 1/log2(4)
    assert ndcg_at_k(*_one_positive_at(6), k=5) == 0.0
    # two positives at ranks 1 and 3: (1 + 1/2) / (1 + 1/log2 3) = 0.91972
    s = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    assert ndcg_at_k(s, torch.tensor([1, 0, 1, 0, 0]), k=5) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))
    # no positive -> None
    assert ndcg_at_k(s, torch.zeros(5), k=5) is None


def test_ndcg_ties_are_averaged() -> None:
    # positive tied with a negative at the top: each gets 1/2 of (1 + 1/log2 3) = 0.81546
    s = torch.tensor([2.0, 2.0, 1.0, 0.0])
    assert ndcg_at_k(s, torch.tensor([1, 0, 0, 0]), k=5) == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert ndcg_at_k(s, torch.tensor([0, 1, 0, 0]), k=5) == pytest.approx((1 + 1 / math.log2(3)) / 2)
    # 50 equal scores, 1 positive: (1/50) * sum_{r=1..5} 1/log2(r+1) = 2.94846 / 50
    flat = torch.zeros(50)
    labels = torch.zeros(50)
    labels[17] = 1
    expected = sum(1 / math.log2(r + 1) for r in range(1, 6)) / 50
    assert ndcg_at_k(flat, labels, k=5) == pytest.approx(expected)
    assert expected == pytest.approx(0.058969, abs=1e-6)


def test_ndcg_metric_groups_and_order_invariance() -> None:
    # group 10: positive at rank 1 -> 1; group 20: rank 3 -> 0.5; group 30: rank 6 -> 0
    rows = []
    for gid, rank in ((10, 1), (20, 3), (30, 6)):
        s, lab = _one_positive_at(rank, n=8)
        rows += [(float(a), int(b), gid) for a, b in zip(s, lab, strict=True)]
    random.Random(0).shuffle(rows)
    metric = NDCG(k=5)
    for start in range(0, len(rows), 5):  # groups split across batches
        chunk = rows[start : start + 5]
        metric.update(
            torch.tensor([r[0] for r in chunk]), torch.tensor([r[1] for r in chunk]),
            torch.tensor([r[2] for r in chunk]),
        )
    assert metric.compute().item() == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    assert metric.name == "ndcg_at_5/paper"
    # a group without positive: neg -> 0, skip -> left out, pos -> 1, error -> raises
    for action, expected in (("neg", 0.5), ("skip", 1.0), ("pos", 1.0)):
        m = NDCG(k=5, empty_target_action=action)
        m.update(torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([1, 0, 0, 0]), torch.tensor([1, 1, 2, 2]))
        assert m.compute().item() == pytest.approx(expected)
    m = NDCG(k=5, empty_target_action="error")
    m.update(torch.tensor([1.0]), torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(ValueError, match="no relevant"):
        m.compute()


def test_ndcg_matches_torchmetrics_with_ties() -> None:
    from torchmetrics.retrieval import RetrievalNormalizedDCG

    gen = torch.Generator().manual_seed(0)
    groups = torch.arange(40).repeat_interleave(50)
    scores = torch.randint(0, 6, (2000,), generator=gen).float()  # many ties
    labels = torch.zeros(2000, dtype=torch.long)
    labels[torch.arange(40) * 50 + torch.randint(0, 50, (40,), generator=gen)] = 1
    ours = NDCG(k=5)
    ours.update(scores, labels, groups)
    ref = RetrievalNormalizedDCG(top_k=5)
    ref.update(scores, labels, indexes=groups)
    assert ours.compute().item() == pytest.approx(ref.compute().item(), abs=1e-6)


def test_ndcg_merges_per_batch_states() -> None:
    """Many small updates keep each state's list short (one tensor per batch would cost
    ~2 KB of memory each) and give the value of one update with everything."""
    gen = torch.Generator().manual_seed(1)
    groups = torch.arange(100).repeat_interleave(10)
    scores = torch.rand(1000, generator=gen)
    labels = (torch.rand(1000, generator=gen) < 0.2).long()
    whole = NDCG(k=5)
    whole.update(scores, labels, groups)
    batched = NDCG(k=5)
    for start in range(0, 1000, 4):  # 250 updates
        batched.update(scores[start : start + 4], labels[start : start + 4], groups[start : start + 4])
    for name in ("scores", "labels", "groups"):
        assert len(getattr(batched, name)) < batched.merge_after
        assert torch.equal(torch.cat(getattr(batched, name)), torch.cat(getattr(whole, name)))
    assert batched.compute().item() == whole.compute().item()
    unmerged = NDCG(k=5, merge_after=None)
    for start in range(0, 1000, 4):
        unmerged.update(scores[start : start + 4], labels[start : start + 4], groups[start : start + 4])
    assert len(unmerged.scores) == 250 and unmerged.compute().item() == whole.compute().item()
    with pytest.raises(ValueError, match="merge_after"):
        NDCG(merge_after=0)


def test_ndcg_input_checks_and_group_ids() -> None:
    metric = NDCG()
    with pytest.raises(TypeError, match="integer"):
        metric.update(torch.zeros(2), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="size"):
        metric.update(torch.zeros(2), torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        metric.update(torch.tensor([float("nan")]), torch.tensor([1]), torch.tensor([0]))
    ids = group_ids(["coco:1", "coco:2", "coco:1", 7])
    assert ids.dtype == torch.long and ids[0] == ids[2] and ids[0] != ids[1] and ids[3] == 7
    assert group_ids(["coco:1"]).item() == ids[0].item()  # stable


# --------------------------------------------------------------------------- modes / factory


def test_build_metric_and_modes() -> None:
    expected = {"vqa": VQAAccuracy, "ocr": ANLS, "caption": BLEU4, "retrieval": NDCG}
    assert set(expected) == set(TASKS)
    for task, cls in expected.items():
        for mode in MODES:
            metric = build_metric(task, mode)
            assert type(metric) is cls and metric.mode == mode
            assert metric.name.endswith(f"/{mode}")
    assert build_metric("retrieval").k == 5
    with pytest.raises(ValueError, match="allowed tasks: vqa, ocr, caption, retrieval"):
        build_metric("detection")
    with pytest.raises(ValueError, match="allowed modes: paper, official"):
        build_metric("vqa", "strict")
    for cls in (VQAAccuracy, ANLS, BLEU4, NDCG):
        with pytest.raises(ValueError, match="allowed modes"):
            cls(mode="Paper")
    with pytest.raises(ValueError, match="paper mode"):
        BLEU4("official", smooth=True)


def test_mode_mismatch_and_bad_inputs() -> None:
    paper, official = VQAAccuracy("paper"), VQAAccuracy("official")
    paper.update(["2"], [["2"]])
    official.update(["2"], [["2"]])
    with pytest.raises(ValueError, match="modes differ"):
        paper.merge_state(official)
    other = VQAAccuracy("paper")
    other.update(["3"], [["2"]])
    paper.merge_state(other)
    assert paper.compute().item() == pytest.approx(0.5)
    with pytest.raises(TypeError, match="wrap it"):
        paper.update(["2"], ["2"])  # references must be lists of strings
    with pytest.raises(ValueError, match="reference lists"):
        paper.update(["2", "3"], [["2"]])
    with pytest.raises(ValueError, match="no reference"):
        paper.update(["2"], [[]])
    with pytest.raises(ValueError, match="keep"):
        paper.update(["2"], [["2"]], keep=[True, False])


def test_forward_returns_batch_value() -> None:
    metric = VQAAccuracy("official")
    batch = metric(["leather"], [VQA_REAL[158362]])
    assert batch.item() == pytest.approx(0.6)
    metric(["sneakers"], [VQA_REAL[158362]])
    assert metric.compute().item() == pytest.approx(0.8)


# --------------------------------------------------------------------------- distributed


def _dist_inputs() -> dict[str, Any]:
    vqa_preds = ["leather", "1 way", "The clock tower", "Red, white", "zero"]
    vqa_refs = [VQA_REAL[k] for k in (158362, 265814, 206416, 306240, 362118)]
    ocr_preds = ["Dakota Digital", "10 yrs", "budlight", "Bowmore Islay", "Dumbledore."]
    ocr_refs = [TEXTVQA_REAL[k] for k in (34602, 34606, 34614, 34605, 34630)]
    cap_preds = ["a man sits on a bench with his laptop", "two dogs play in the snow.",
                 "a red bus on the street", "The cat is on the mat", "a plate of food"]
    cap_refs = [["A man sitting on a bench with a laptop computer.", "a man on his lap top on a bench"],
                ["Two dogs playing in the snow", "dogs running through snow"],
                ["A red double decker bus driving down a street.", "a bus on a city street"],
                ["the cat is on the mat now"], ["A plate topped with meat and vegetables."]]
    gen = torch.Generator().manual_seed(1)
    groups = torch.arange(6).repeat_interleave(7)
    scores = torch.randint(0, 4, (42,), generator=gen).float()  # with ties
    labels = torch.zeros(42, dtype=torch.long)
    labels[torch.arange(6) * 7 + torch.randint(0, 7, (6,), generator=gen)] = 1
    return {"vqa": (vqa_preds, vqa_refs), "ocr": (ocr_preds, ocr_refs),
            "caption": (cap_preds, cap_refs), "retrieval": (scores, labels, groups)}


def _dist_metrics() -> dict[str, Any]:
    return {f"{task}/{mode}": build_metric(task, mode) for task in TASKS for mode in MODES}


def _feed(metrics: dict[str, Any], inputs: dict[str, Any], shard: Sequence[int],
          keep: Sequence[bool] | None = None) -> None:
    for key, metric in metrics.items():
        task = key.split("/")[0]
        if task == "retrieval":
            s, lab, g = inputs[task]
            rows = [i % len(s) for i in shard]
            metric.update(s[rows], lab[rows], g[rows], keep=keep)
        else:
            preds, refs = inputs[task]
            rows = [i % len(preds) for i in shard]
            metric.update([preds[i] for i in rows], [refs[i] for i in rows], keep=keep)


def _dist_worker(rank: int, world_size: int, init_file: str, out_dir: str, inputs: dict[str, Any]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metrics = _dist_metrics()
        for task, data in inputs.items():
            n = len(data[0])
            # interleaved shards like a DistributedSampler; the last rank is padded with a
            # duplicate of item 0 that is masked out with keep=False
            shard = list(range(rank, n, world_size))
            keep = [True] * len(shard)
            if rank == world_size - 1 and n % world_size:
                shard.append(0)
                keep.append(False)
            _feed({k: m for k, m in metrics.items() if k.startswith(task + "/")}, inputs, shard, keep)
        values = {k: float(m.compute()) for k, m in metrics.items()}
        # NDCG where one process saw nothing at all
        lonely = NDCG(k=5)
        if rank == 0:
            s, lab, g = inputs["retrieval"]
            lonely.update(s, lab, g)
        with warnings.catch_warnings():  # rank 1 never called update
            warnings.simplefilter("ignore", UserWarning)
            values["retrieval/only-rank-0"] = float(lonely.compute())
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(values))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_sync_matches_single_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    inputs = _dist_inputs()
    single = _dist_metrics()
    for task, data in inputs.items():
        _feed({k: m for k, m in single.items() if k.startswith(task + "/")}, inputs, range(len(data[0])))
    expected = {k: float(m.compute()) for k, m in single.items()}
    expected["retrieval/only-rank-0"] = expected["retrieval/paper"]
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path), inputs), nprocs=2, join=True)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (rank, key)
