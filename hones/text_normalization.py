"""Answer / caption text processing used by :mod:`hones.metrics`.

Everything here is a pure ``str -> str`` (or ``str -> list[str]``) function, written
from the definitions in ``shared/HONES_METHOD.md`` §1 and from the public descriptions
of the VQA challenge, ST-VQA/DocVQA ANLS and COCO caption evaluation protocols (see
``docs/metrics.md``). No third-party evaluation code is used at run time.

Contents
--------
- :func:`postprocess_generation`: the paper's clean-up of a generated answer.
- :func:`normalize_vqa_paper` / :func:`normalize_vqa_official`: VQA answer processing.
- :func:`normalize_anls_paper` / :func:`normalize_anls_official`: ANLS string processing.
- :func:`levenshtein`: edit distance (insert / delete / substitute, unit costs).
- :func:`tokenize_bleu_paper` / :func:`tokenize_ptb_coco`: BLEU tokenisers.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "GENERATION_PREFIXES",
    "postprocess_generation",
    "normalize_vqa_paper",
    "normalize_vqa_official",
    "normalize_anls_paper",
    "normalize_anls_official",
    "levenshtein",
    "tokenize_bleu_paper",
    "tokenize_ptb_coco",
    "COCO_REMOVED_PUNCTUATION",
]

# ---------------------------------------------------------------------------
# Generation post-processing (HONES_METHOD §1)
# ---------------------------------------------------------------------------

#: Role / field prefixes stripped from the start of a generation (case-insensitive).
GENERATION_PREFIXES: Final[tuple[str, ...]] = ("answer", "a", "assistant", "caption")

_GENERATION_PREFIX_RE: Final = re.compile(
    r"^\s*(?:" + "|".join(GENERATION_PREFIXES) + r")\s*:", flags=re.IGNORECASE
)


def postprocess_generation(text: str) -> str:
    """Clean a generated answer as the paper does before scoring.

    Leading whitespace is removed, then any number of leading ``Answer:``, ``A:``,
    ``Assistant:`` or ``Caption:`` prefixes (case-insensitive, optional spaces before
    the colon), then the first non-empty line is kept and stripped.

    >>> postprocess_generation("Assistant: Answer: Two dogs\\nThe image shows")
    'Two dogs'
    >>> postprocess_generation("A cat on a mat.")  # "A" without a colon is text
    'A cat on a mat.'
    """
    out = text
    while True:
        stripped = _GENERATION_PREFIX_RE.sub("", out, count=1)
        if stripped == out:
            break
        out = stripped
    for line in out.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


# ---------------------------------------------------------------------------
# VQA, paper mode
# ---------------------------------------------------------------------------

_ANSWER_PREFIX_RE: Final = re.compile(r"^\s*answer\s*:", flags=re.IGNORECASE)


def normalize_vqa_paper(text: str) -> str:
    """Paper VQA normalisation (HONES_METHOD §1).

    Lowercase; strip any number of leading ``answer:`` prefixes; delete every character
    that is neither alphanumeric nor whitespace (``"t-shirt" -> "tshirt"``,
    ``"don't" -> "dont"``, ``"10:07" -> "1007"``); collapse runs of whitespace to one
    space and strip.
    """
    out = text.lower()
    while True:
        stripped = _ANSWER_PREFIX_RE.sub("", out, count=1)
        if stripped == out:
            break
        out = stripped
    out = "".join(ch for ch in out if ch.isalnum() or ch.isspace())
    return " ".join(out.split())


# ---------------------------------------------------------------------------
# VQA, official (VQA challenge) answer processing
# ---------------------------------------------------------------------------

#: Characters handled by the punctuation rule. Apostrophe and colon are kept on
#: purpose (possessives, times such as 2:50); the period has its own rule; other
#: symbols ($ % & # * ~ ^ |) are left untouched, as in the challenge's evaluation.
VQA_PUNCTUATION: Final[str] = ";/[]\"{}()=+\\_-><@`,?!"

_DIGIT_COMMA_DIGIT_RE: Final = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT_RE: Final = re.compile(r"\.(?!\d)")

#: Number words mapped to digits ("none" -> "0" as the challenge does).
VQA_NUMBER_WORDS: Final[dict[str, str]] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

VQA_ARTICLES: Final[frozenset[str]] = frozenset({"a", "an", "the"})

# Standard English contractions (with their apostrophes). The lookup table below maps
# every spelling with one or more apostrophes missing to the full form.
_CONTRACTIONS: Final[tuple[str, ...]] = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't",
    "doesn't", "don't", "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've",
    "he'll", "he's", "how'd", "how'll", "how's", "i'd", "i'd've", "i'll", "i'm", "i've",
    "isn't", "it'd", "it'd've", "it'll", "it's", "let's", "ma'am", "mightn't",
    "mightn't've", "might've", "mustn't", "must've", "needn't", "not've", "o'clock",
    "oughtn't", "shan't", "she'd", "she'd've", "she'll", "she's", "should've",
    "shouldn't", "shouldn't've", "somebody'd", "somebody'd've", "somebody'll",
    "somebody's", "someone'd", "someone'd've", "someone'll", "someone's",
    "something'd", "something'd've", "something'll", "something's", "that'd",
    "that'd've", "that'll", "that's", "there'd", "there'd've", "there'll", "there're",
    "there's", "they'd", "they'd've", "they'll", "they're", "they've", "wasn't",
    "we'd", "we'd've", "we'll", "we're", "we've", "weren't", "what'll", "what're",
    "what's", "what've", "when's", "where'd", "where's", "where've", "who'd",
    "who'd've", "who'll", "who're", "who's", "who've", "why'd", "why'll", "why're",
    "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'd've",
    "you'd", "you'd've", "you'll", "you're", "you've",
)

#: Apostrophe-less spellings that are ordinary English words: never "repaired".
_NOT_A_CONTRACTION: Final[frozenset[str]] = frozenset(
    {"its", "well", "were", "wed", "hell", "shell", "ill", "id", "lets", "shed", "whore"}
)


def _contraction_table() -> dict[str, str]:
    """Map each contraction spelled with missing apostrophes to its full form."""
    table: dict[str, str] = {}
    for full in _CONTRACTIONS:
        parts = full.split("'")
        n_gaps = len(parts) - 1
        # every subset of apostrophes dropped, except "none dropped"
        for mask in range(1, 2**n_gaps):
            spelled = parts[0]
            for gap in range(n_gaps):
                spelled += ("" if mask >> gap & 1 else "'") + parts[gap + 1]
            if spelled not in _NOT_A_CONTRACTION:
                table[spelled] = full
    return table


VQA_CONTRACTIONS: Final[dict[str, str]] = _contraction_table()


def _vqa_punctuation(text: str) -> str:
    """Punctuation rule of the VQA challenge answer processing.

    For each character ``p`` of :data:`VQA_PUNCTUATION`: if ``p`` touches a space
    somewhere in the (input) answer, or the answer contains a digit-comma-digit
    pattern such as ``100,978``, every ``p`` is deleted; otherwise every ``p`` is
    replaced by a space. Afterwards every period that is not followed by a digit is
    deleted (so decimals like ``3.82`` and ``.89`` survive, ``"1."`` becomes ``"1"``).
    """
    has_digit_comma = _DIGIT_COMMA_DIGIT_RE.search(text) is not None
    out = text
    for p in VQA_PUNCTUATION:
        if p not in out:
            continue
        delete = has_digit_comma or (p + " ") in text or (" " + p) in text
        out = out.replace(p, "" if delete else " ")
    return _PERIOD_NOT_BEFORE_DIGIT_RE.sub("", out)


def normalize_vqa_official(text: str) -> str:
    """VQA challenge answer processing, applied to predictions and to ground truths.

    1. newlines / tabs -> spaces, strip, lowercase;
    2. punctuation rule (:func:`_vqa_punctuation`);
    3. per word: number words ``none, zero .. ten`` -> digits, articles ``a an the``
       dropped, missing apostrophes of contractions restored (``dont -> don't``,
       ``whats -> what's``; see :data:`VQA_CONTRACTIONS`);
    4. words joined by single spaces.

    >>> normalize_vqa_official("The two dogs.")
    '2 dogs'
    >>> normalize_vqa_official("100,978")
    '100978'
    """
    out = text.replace("\n", " ").replace("\t", " ").strip().lower()
    out = _vqa_punctuation(out)
    words: list[str] = []
    for word in out.split():
        word = VQA_NUMBER_WORDS.get(word, word)
        if word in VQA_ARTICLES:
            continue
        words.append(VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)


# ---------------------------------------------------------------------------
# ANLS
# ---------------------------------------------------------------------------


def normalize_anls_paper(text: str) -> str:
    """Paper ANLS processing: lowercase, keep alphanumerics only (spaces removed)."""
    return "".join(ch for ch in text.lower() if ch.isalnum())


def normalize_anls_official(text: str) -> str:
    """ST-VQA / DocVQA ANLS processing: strip leading/trailing whitespace, lowercase.

    Inner whitespace and punctuation are kept (the comparison is space-sensitive).
    """
    return text.strip().lower()


def levenshtein(a: str, b: str) -> int:
    """Levenshtein distance with unit costs for insertion, deletion and substitution."""
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete ca
                    current[j - 1] + 1,  # insert cb
                    previous[j - 1] + (ca != cb),  # substitute (or keep)
                )
            )
        previous = current
    return previous[-1]


# ---------------------------------------------------------------------------
# BLEU tokenisers
# ---------------------------------------------------------------------------

_ALNUM_RUN_RE: Final = re.compile(r"[^\W_]+")


def tokenize_bleu_paper(text: str) -> list[str]:
    """Paper BLEU tokens: lowercase, split on whitespace and punctuation.

    A token is a maximal run of alphanumeric characters; everything else separates
    tokens and is dropped (``"A T-shirt, don't" -> ["a", "t", "shirt", "don", "t"]``).
    """
    return _ALNUM_RUN_RE.findall(text.lower())


#: Tokens the COCO caption evaluation deletes after PTB tokenisation. Note that with
#: lowercasing the bracket tokens become ``-lrb-`` etc., which are *not* deleted.
COCO_REMOVED_PUNCTUATION: Final[frozenset[str]] = frozenset(
    {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
     "-", "--", "...", ";"}
)

_UNICODE_TO_ASCII: Final = str.maketrans(
    {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2026": "...",
     "\u2014": "--", "\u2013": "--", "\u00a0": " "}
)
_BRACKET_TOKENS: Final[dict[str, str]] = {
    "(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
}
_PTB_SPLIT_WORDS: Final[dict[str, tuple[str, str]]] = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "gimme": ("gim", "me"),
    "lemme": ("lem", "me"),
}
_PTB_CLITICS: Final[tuple[str, ...]] = ("n't", "'s", "'re", "'ve", "'ll", "'d", "'m")
_PTB_ABBREVIATIONS: Final[str] = "mr|mrs|ms|dr|st|ave|blvd|jr|sr|vs|etc|mt|ft|inc|ltd|corp|prof"
_L = r"[^\W\d_]"  # one letter (unicode aware)
_PTB_TOKEN_RE: Final = re.compile(
    "|".join(
        [
            # dotted abbreviations: u.s. a.m. d.c. ph.d.; a single letter + period
            # unless it ends the text (then the period is the full stop)
            rf"(?<!\w){_L}+\.(?:{_L}\.)+(?!\w)",
            rf"(?<!\w){_L}\.(?!\s*$)(?!\w)",
            # numbers written with a leading period (.89)
            r"(?<!\w)\.\d+(?!\w)",
            # common abbreviations keep their period; "no." only before a number
            rf"(?<!\w)(?:{_PTB_ABBREVIATIONS})\.(?!\w)",
            r"(?<!\w)no\.(?=\s*\d)",
            # words: internal hyphen / slash / ampersand / period, apostrophe between
            # letters (o'clock), comma or colon between digits (1,000 10:07); an
            # optional leading minus before a digit (-5)
            rf"(?:(?<!\w)-(?=\d))?\w+(?:(?:[-/&.]|(?<={_L})'(?={_L})|(?<=\d)[,:](?=\d))\w+)*",
            # clitics left after a non-letter (50's) and after quotes
            r"'(?:s|re|ve|ll|d|m)(?!\w)",
            # runs of . ! ? - form one token (..., !!, --); other symbols one by one
            r"\.+|!+|\?+|-+",
            r"[^\w\s]",
        ]
    )
)


def _split_ptb_word(token: str) -> list[str]:
    """Split PTB clitics (``don't -> do n't``, ``man's -> man 's``) and a few fused words."""
    if token in _PTB_SPLIT_WORDS:
        return list(_PTB_SPLIT_WORDS[token])
    for clitic in _PTB_CLITICS:
        if token.endswith(clitic) and len(token) > len(clitic):
            return [token[: -len(clitic)], clitic]
    return [token]


def tokenize_ptb_coco(text: str) -> list[str]:
    """PTB-style tokenisation as the COCO caption evaluation applies it, in Python.

    Mirrors what the COCO evaluation's Stanford PTBTokenizer (run lowercased) followed
    by its punctuation deletion produces on caption-like text: punctuation split off and
    the tokens in :data:`COCO_REMOVED_PUNCTUATION` deleted; clitics split
    (``don't -> do n't``, ``it's -> it 's``, ``can't -> ca n't``); hyphenated and
    slashed words, numbers like ``3.82``, ``1,000``, ``10:07`` and dotted abbreviations
    (``u.s.``, ``st.``) kept whole; brackets mapped to ``-lrb-``-style tokens (which
    the COCO deletion list, written in upper case, does not delete). It is an
    approximation of the Java tokenizer; ``docs/metrics.md`` reports its agreement on
    real COCO captions.
    """
    lowered = text.translate(_UNICODE_TO_ASCII).lower()
    tokens: list[str] = []
    for match in _PTB_TOKEN_RE.finditer(lowered):
        token = match.group(0)
        if token in _BRACKET_TOKENS:
            tokens.append(_BRACKET_TOKENS[token])
            continue
        starts_number = token[0] in "-." and len(token) > 1 and token[1].isdigit()
        if not (token[0].isalnum() or starts_number):
            # punctuation run (or clitic like "'s" after a number)
            if (
                token in COCO_REMOVED_PUNCTUATION
                or set(token) <= {"."}
                or set(token) <= {'"', "'", "`"}
            ):
                continue
            tokens.append(token)
            continue
        tokens.extend(_split_ptb_word(token))
    return tokens
