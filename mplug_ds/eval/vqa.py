"""The official VQA accuracy (dataset_formats.md §5.1), written from its specification.

Per question: answers are cleaned (newlines/tabs → spaces, outer spaces stripped). Only when the ten human answers
are not all identical are the answers and the prediction normalised: punctuation (removed next to a space or when
the answer contains a digit-comma-digit, else replaced by a space; a period is removed unless a digit follows),
then lower-cased words with number words → digits, articles dropped and apostrophe-less contractions restored.
Each human answer in turn is left out; the prediction scores min(#matching others / 3, 1); the question's accuracy
is the mean over the ten. Reported in percent, overall and per answer type.

Video QA (MSRVTT-QA, MSVD-QA) has one answer per question and is scored by exact match (``exact_match``), as
mPLUG and ALPRO score it, through the same per-type report.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Callable, Sequence

PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its period)
_MAX_PERIODS = 32  # the server passes re.UNICODE (= 32) as the count of its period substitution
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
# Contractions the server restores when written without (one of) their apostrophes. Its table also lists "I"
# forms ("Im", "Ive", "Id've") in capitals, which never match lower-cased words, and "let's"/"she's" only as
# themselves; so none of those is restored here either.
CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've "
    "needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've "
    "why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're "
    "you've").split()


def _contraction_table() -> dict[str, str]:
    """Spelling without one apostrophe (the only one, or any one of several) → the contraction."""
    table = {}
    for word in CONTRACTIONS:
        for i in (i for i, c in enumerate(word) if c == "'"):
            table[word[:i] + word[i + 1:]] = word
    table["somebody'd"] = "somebodyd"  # the server's table has this one entry backwards; kept for equal scores
    return table


CONTRACTION_TABLE = _contraction_table()


def normalize_punctuation(text: str) -> str:
    """The server's punctuation step (each rule decided on the original text)."""
    glue = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        out = out.replace(mark, "" if glue or f"{mark} " in text or f" {mark}" in text else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def normalize_words(text: str) -> str:
    """Lower-case words; number words → digits; articles dropped; contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTION_TABLE.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """Both normalisation steps (what the server applies when the human answers disagree)."""
    return normalize_words(normalize_punctuation(_clean(text)))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def question_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official accuracy of one prediction against the human answers (ten in VQA v2), in [0, 1]."""
    if not human_answers:
        raise ValueError("a question needs at least one human answer to be scored")
    pred, humans = _clean(prediction), [_clean(a) for a in human_answers]
    if len(set(humans)) > 1:
        humans = [normalize_words(normalize_punctuation(a)) for a in humans]
        pred = normalize_words(normalize_punctuation(pred))
    matches = sum(h == pred for h in humans)
    # Leaving out answer i: the others match (matches − [answer i matches]) times.
    return sum(min(1.0, (matches - (h == pred)) / 3) for h in humans) / len(humans)


def clean_answer(text: str) -> str:
    """Lower case, single spaces, no outer spaces."""
    return " ".join(text.lower().split())


def exact_match(prediction: str, human_answers: Sequence[str]) -> float:
    """1.0 when the prediction is one of the answers (compared by ``clean_answer``), else 0.0."""
    return float(clean_answer(prediction) in {clean_answer(a) for a in human_answers})


def vqa_accuracy(predictions: Sequence[dict[str, Any]],
                 score: Callable[[str, Sequence[str]], float] = question_accuracy) -> dict[str, float]:
    """``acc`` (percent) over predictions carrying ``answer`` and ``human_answers``, ``acc/<answer type>`` per
    ``answer_type`` (when given) and ``num_scored``; each question scored by ``score`` (the official VQA accuracy,
    or ``exact_match``). Predictions without human answers are not scored."""
    scored = [p for p in predictions if p.get("human_answers")]
    if not scored:
        return {"num_scored": 0.0}
    by_type: dict[str, list[float]] = defaultdict(list)
    total = []
    for p in scored:
        acc = score(p["answer"], p["human_answers"])
        total.append(acc)
        if p.get("answer_type"):
            by_type[str(p["answer_type"])].append(acc)
    metrics = {"acc": 100.0 * sum(total) / len(total), "num_scored": float(len(total))}
    for kind, accs in sorted(by_type.items()):
        metrics[f"acc/{kind}"] = 100.0 * sum(accs) / len(accs)
    return metrics
