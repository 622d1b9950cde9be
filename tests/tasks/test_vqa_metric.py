"""The official VQA accuracy against scores computed by hand from its definition (dataset_formats.md §5.1):
answers normalised only when the humans disagree; min(#other humans matching / 3, 1) averaged over the ten
leave-one-out subsets."""
import pytest

from mplug_ds.eval.vqa import normalize_answer, question_accuracy, vqa_accuracy

# (prediction, the ten human answers, hand-computed accuracy)
CASES = [
    # unanimous humans: raw strings compared, no normalisation at all
    ("yes", ["yes"] * 10, 1.0),
    ("\tyes\n", ["yes"] * 10, 1.0),  # newline/tab cleaning always happens
    ("two", ["2"] * 10, 0.0),  # number words are not mapped when the humans agree
    ("yes.", ["yes"] * 10, 0.0),
    # numbers as words: 2 × "2" (after mapping), 8 × "3": out a "2" → 1/3, out a "3" → 2/3
    ("2", ["two", "two"] + ["3"] * 8, (2 * 1 / 3 + 8 * 2 / 3) / 10),
    ("none", ["0"] * 3 + ["no"] * 7, (3 * 2 / 3 + 7 * 1) / 10),
    # articles
    ("the dog", ["a dog"] * 3 + ["dog"] * 2 + ["cat"] * 5, 1.0),  # 5 matches: every subset keeps >= 3
    ("dog", ["a dog"] + ["cat"] * 9, (0 + 9 * 1 / 3) / 10),
    # punctuation: '!' glued to a word becomes a space; a trailing period goes; "3.5" keeps its period
    ("yes!", ["yes", "yes"] + ["no"] * 8, (2 * 1 / 3 + 8 * 2 / 3) / 10),
    ("5.", ["5"] + ["6"] * 9, 0.3),
    ("3.5", ["3.5"] * 3 + ["4"] * 7, (3 * 2 / 3 + 7) / 10),
    ("t-shirt", ["t shirt"] * 3 + ["shirt"] * 7, 0.9),
    ("1,000", ["1000", "1000"] + ["many"] * 8, 0.6),  # digit,digit: every mark is deleted, not spaced
    ("red,blue", ["red blue"] + ["green"] * 9, 0.3),
    # contractions written without the apostrophe are restored
    ("dont know", ["don't know"] * 3 + ["no"] * 7, 0.9),
    ("im not sure", ["i'm not sure"] * 3 + ["no"] * 7, 0.0),  # the server never restores the "I" forms
    # disagreeing annotators
    ("red", ["red"] * 4 + ["dark red"] * 3 + ["maroon"] * 3, 1.0),
    ("maroon", ["red"] * 4 + ["dark red"] * 3 + ["maroon"] * 3, 0.9),
    ("dark red", ["red"] * 4 + ["dark red"] * 3 + ["maroon"] * 3, 0.9),
    ("blue", ["red"] * 4 + ["dark red"] * 3 + ["maroon"] * 3, 0.0),
    ("red", ["red"] * 2 + ["blue"] * 2 + ["green"] * 6, (2 * 1 / 3 + 8 * 2 / 3) / 10),
]


@pytest.mark.parametrize("prediction,humans,expected", CASES)
def test_question_accuracy_equals_the_hand_computed_official_score(prediction, humans, expected):
    assert question_accuracy(prediction, humans) == pytest.approx(expected, abs=1e-12)


def test_normalisation_steps():
    assert normalize_answer("The Two Dogs!") == "2 dogs"
    assert normalize_answer("a (big) cat") == "big cat"
    assert normalize_answer("wont") == "won't" and normalize_answer("couldnt've") == "couldn't've"
    assert normalize_answer("yes ; no") == "yes no"


def test_overall_and_per_answer_type_accuracy_in_percent():
    preds = [{"answer": "yes", "human_answers": ["yes"] * 10, "answer_type": "yes/no"},
             {"answer": "2", "human_answers": ["two", "two"] + ["3"] * 8, "answer_type": "number"},
             {"answer": "blue", "human_answers": ["red"] * 10, "answer_type": "other"},
             {"answer": "x", "human_answers": [], "answer_type": "other"}]  # test-dev style: not scored
    metrics = vqa_accuracy(preds)
    assert metrics["num_scored"] == 3
    assert metrics["acc"] == pytest.approx(100 * (1 + 0.6) / 3)
    assert metrics["acc/yes/no"] == 100 and metrics["acc/number"] == pytest.approx(60) and metrics["acc/other"] == 0
