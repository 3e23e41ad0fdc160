"""Metric tests. Expected values are computed by hand from the rules, and the `OFFICIAL_*` tables hold
outputs of the official VQA evaluation script (GT-Vision-Lab/VQA, run separately; not part of this
repository) on the same inputs."""

import math

import pytest

from defocus_mllm.evaluation import (
    MME_COGNITION,
    MME_PERCEPTION,
    can_infer,
    circular_shift,
    easy_vqa_scores,
    extract_sqa_letter,
    gqa_accuracy,
    mmbench_circular_accuracy,
    mme_scores,
    normalize_answer,
    parse_yes_no_mme,
    parse_yes_no_pope,
    pope_metrics,
    vqa_accuracy,
)

# ------------------------------------------------------------------ normalisation

# input -> output of the official processPunctuation + processDigitArticle
OFFICIAL_NORMALIZATION = [
    ("Two.", "2"),
    ("two", "2"),
    ("a dog", "dog"),
    ("the dog", "dog"),
    ("A Dog", "dog"),
    ("an apple", "apple"),
    ("isn't", "isn't"),
    ("isnt", "isn't"),
    ("dont", "don't"),
    ("1,000", "1000"),
    ("1,000,000", "1000000"),
    ("1,000 dogs!", "1000 dogs"),  # digit-comma-digit anywhere: every punctuation mark is deleted
    ("$1,000", "$1000"),
    ("1 , 000", "1 000"),
    ("3.5", "3.5"),
    ("3.5.", "3.5"),
    ("4.0", "4.0"),
    ("5.", "5"),  # the look-behind in the official period rule is a no-op
    (".5", ".5"),
    ("..5", ".5"),
    ("a.b", "ab"),
    ("U.S.A.", "usa"),
    ("Mr. Smith", "mr smith"),
    ("yes,", "yes"),
    ("Yes", "yes"),
    ("no!", "no"),
    ("No.", "no"),
    ("none", "0"),
    ("none of them", "0 of them"),
    ("zero", "0"),
    ("ten.", "10"),
    ("eleven", "eleven"),
    ("one hundred", "1 hundred"),
    ("one,two", "1 2"),  # no digits around the comma: it becomes a space
    ("1,2", "12"),
    ("the one", "1"),
    ("t-shirt", "t shirt"),
    ("left-hand side", "left hand side"),
    ("red, white", "red white"),
    ("red , white", "red white"),
    ("e-mail", "e mail"),
    ("back_pack", "back pack"),
    ("(a)", ""),
    ("(b) dog", "b dog"),
    ("[cat]", "cat"),
    ('"quoted"', "quoted"),
    ("a/b", "b"),  # "a" becomes a separate word, then an article
    ("a=b", "b"),
    ("@home", "home"),
    ("c++", "c"),
    ("c#", "c#"),
    ("50%", "50%"),
    ("3:00", "3:00"),
    ("it's", "it's"),
    ("its", "its"),
    ("Im", "im"),  # the table's capitalised keys never match after lower-casing
    ("somebody'd", "somebodyd"),
    ("ow's'at", "'ow's'at"),
    ("yall", "y'all"),
    ("dog's", "dog's"),
    ("  spaced   out  ", "spaced out"),
    ("new\nline", "new line"),
    ("tab\there", "tab here"),
    ("...", ""),
    ("?", ""),
    ("", ""),
    ("x" + "." * 8, "x"),
    ("x" + "." * 40, "x" + "." * 8),  # the official call deletes at most 32 periods
]


@pytest.mark.parametrize("text,expected", OFFICIAL_NORMALIZATION)
def test_normalize_answer_matches_official(text, expected):
    assert normalize_answer(text) == expected


def test_normalisation_edge_cases_of_the_issue():
    assert normalize_answer("Two.") == normalize_answer("2")
    assert normalize_answer("a dog") == normalize_answer("dog")
    assert normalize_answer("isn't") == normalize_answer("isnt")
    assert normalize_answer("1,000") == "1000"
    assert normalize_answer("3.5") == "3.5" != normalize_answer("35")
    assert normalize_answer("yes,") == "yes"


@pytest.mark.parametrize("text", [t for t, _ in OFFICIAL_NORMALIZATION if len(t) < 30])
def test_normalisation_is_idempotent_on_edge_cases(text):
    # the benchmarks post-process answers with it before the official scoring normalises again
    once = normalize_answer(text)
    assert normalize_answer(once) == once


# ------------------------------------------------------------------ VQA accuracy


@pytest.mark.parametrize("k,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out_table(k, expected):
    # k of 10 annotators gave the prediction: (k*min(1,(k-1)/3) + (10-k)*min(1,k/3)) / 10
    answers = ["cat"] * k + [f"other{i}" for i in range(10 - k)]
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_normalises_when_answers_differ():
    assert vqa_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("a dog", ["dog"] * 4 + ["cat"] * 6) == pytest.approx(1.0)
    assert vqa_accuracy("isnt", ["isn't"] * 2 + ["no"] * 8) == pytest.approx(0.6)
    assert vqa_accuracy("1,000", ["1000"] * 3 + ["a lot"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("yes,", ["yes"] * 9 + ["no"]) == pytest.approx(1.0)
    assert vqa_accuracy("3.5", ["3.5"] + ["35"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("35", ["3.5"] + ["35"] * 9) == pytest.approx(1.0)


def test_vqa_accuracy_compares_raw_strings_when_all_answers_agree():
    # official behaviour: no punctuation / case / number processing when the 10 answers are identical
    assert vqa_accuracy("Two.", ["2"] * 10) == 0.0
    assert vqa_accuracy("Yes", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes,", ["yes"] * 10) == 0.0
    assert vqa_accuracy(" yes\n", ["yes"] * 10) == 1.0  # whitespace is always cleaned
    assert vqa_accuracy(normalize_answer("Two."), ["2"] * 10) == 1.0


def test_vqa_accuracy_single_reference_and_errors():
    assert vqa_accuracy("dog", ["dog"]) == 0.0  # nothing left after leaving the only answer out
    assert vqa_accuracy("dog", ["dog"] * 10) == 1.0
    with pytest.raises(ValueError):
        vqa_accuracy("dog", [])


# (prediction, answers, accuracy of the official script)
OFFICIAL_ACCURACY = [
    ("Two.", ["2"] * 10, 0.0),
    ("Two.", ["2"] * 4 + ["other"] * 6, 1.0),
    ("t-shirt", ["t shirt", "x", "y", "z"] + ["w"] * 6, 0.3),
    ("1,000 dogs!", ["1000 dogs"] * 2 + ["cat", "dog"] * 4, 0.6),
    ("(b) dog", ["b dog"] * 3 + ["(b) dog"] + ["v"] * 6, 1.0),
    ("U.S.A.", ["usa"] * 3 + ["U.S.A."] + ["v"] * 6, 1.0),
    ("Mr. Smith", ["mr smith"] * 10, 0.0),
    ("none", ["0", "0", "none", "zero"] + ["1"] * 6, 1.0),
    ("x" + "." * 40, ["x"] * 4 + ["y"] * 6, 0.0),
]


@pytest.mark.parametrize("prediction,answers,expected", OFFICIAL_ACCURACY)
def test_vqa_accuracy_matches_official(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


# ------------------------------------------------------------------ GQA / easy-VQA


def test_gqa_accuracy():
    assert gqa_accuracy("Yes.", "yes") == 1.0
    assert gqa_accuracy(" left ", "left") == 0.0  # convert_gqa_for_eval.py does not strip spaces
    assert gqa_accuracy("Left", "left") == 1.0
    assert gqa_accuracy("the left", "left") == 0.0
    assert gqa_accuracy("t shirt", "t-shirt") == 0.0


def test_easy_vqa_scores():
    assert easy_vqa_scores("red", "red") == {"exact_match": 1.0, "vqa_accuracy": 1.0}
    # normalised exact match accepts case and punctuation; the official VQA rule with a unanimous
    # reference does not
    assert easy_vqa_scores("Red.", "red") == {"exact_match": 1.0, "vqa_accuracy": 0.0}
    assert easy_vqa_scores("a circle", "circle")["exact_match"] == 1.0
    assert easy_vqa_scores("blue", "red") == {"exact_match": 0.0, "vqa_accuracy": 0.0}


# ------------------------------------------------------------------ POPE


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("no, there is none", "no"),
        ("No, there is not.", "no"),
        ("There is not a dog", "no"),
        ("Yes. No dogs were harmed.", "yes"),  # only the first sentence counts
        ("Nope", "yes"),  # LLaVA's rule: anything without no/No/not is a yes
        ("Not really", "yes"),
        ("", "yes"),
    ],
)
def test_parse_yes_no_pope(text, expected):
    assert parse_yes_no_pope(text) == expected


def test_pope_metrics_hand_computed():
    preds = ["Yes", "No, there is not.", "yes.", "There is a dog.", "not sure", "No"]
    labels = ["yes", "no", "no", "yes", "yes", "no"]
    # parsed: y n y y n n -> TP 2 (0, 3), FP 1 (2), TN 2 (1, 5), FN 1 (4)
    m = pope_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 2, 1)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(0.5)


def test_pope_metrics_degenerate():
    m = pope_metrics(["no", "no"], ["yes", "no"])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5
    m = pope_metrics(["yes", "yes", "yes", "no"], ["yes", "yes", "no", "no"])
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1.0
    assert m["f1"] == pytest.approx(0.8) and m["yes_ratio"] == 0.75
    with pytest.raises(ValueError):
        pope_metrics(["yes"], [])


# ------------------------------------------------------------------ ScienceQA


@pytest.mark.parametrize(
    "text,n,expected",
    [
        ("B", 4, "B"),
        (" B\n", 4, None),  # eval_science_qa.py does not strip (LLaVA's generation has already)
        ("B. cat", 4, "B"),
        ("B.", 4, None),  # LLaVA's rule: a bare "B." is not accepted
        ("(B)", 4, None),
        ("The answer is C.", 4, "C"),
        ("I think The answer is C. Yes", 4, "C"),
        ("The answer is C. The answer is D.", 4, None),
        ("E", 3, None),  # beyond this question's choices
        ("E", 5, "E"),
        ("cat", 4, None),
    ],
)
def test_extract_sqa_letter(text, n, expected):
    assert extract_sqa_letter(text, n) == expected


# ------------------------------------------------------------------ MME


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Yes", "yes"),
        ("no", "no"),
        ("Yes, it is.", "yes"),
        ("No, it isn't", "no"),
        ("nope", "no"),
        ("not sure", "no"),
        ("know", "no"),  # "no" within the first four characters
        ("Definitely yes", "other"),
        ("", "other"),
    ],
)
def test_parse_yes_no_mme(text, expected):
    assert parse_yes_no_mme(text) == expected


def test_mme_scores_hand_computed():
    records = [
        # existence (perception): image 1 both right, image 2 one right -> acc 75, acc+ 50
        {"category": "existence", "image": "1", "prediction": "Yes", "answer": "Yes"},
        {"category": "existence", "image": "1", "prediction": "No", "answer": "No"},
        {"category": "existence", "image": "2", "prediction": "Yes", "answer": "Yes"},
        {"category": "existence", "image": "2", "prediction": "Yes", "answer": "No"},
        # OCR (perception): one image, both right -> 200
        {"category": "OCR", "image": "3", "prediction": "yes.", "answer": "Yes"},
        {"category": "OCR", "image": "3", "prediction": "no", "answer": "No"},
        # code_reasoning (cognition): one image, one right -> acc 50, acc+ 0
        {"category": "code_reasoning", "image": "4", "prediction": "maybe", "answer": "Yes"},
        {"category": "code_reasoning", "image": "4", "prediction": "No", "answer": "No"},
    ]
    s = mme_scores(records)
    assert s["subtasks"]["existence"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0, "count": 4}
    assert s["subtasks"]["OCR"]["score"] == 200.0
    assert s["subtasks"]["code_reasoning"]["score"] == 50.0
    assert s["perception"] == 325.0
    assert s["cognition"] == 50.0
    assert s["unknown_subtasks"] == []


def test_mme_subtask_lists():
    assert len(MME_PERCEPTION) == 10 and len(MME_COGNITION) == 4
    assert not set(MME_PERCEPTION) & set(MME_COGNITION)


# ------------------------------------------------------------------ MMBench

OPTIONS = {"A": "cat", "B": "dog", "C": "bird"}


@pytest.mark.parametrize(
    "text,expected",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(B) dog", "B"),
        ("The answer is B", "B"),
        ("A dog", "A"),  # a standalone "A" reads as the letter, as in the official rule
        ("dog", "B"),  # no letter: the option text decides
        ("Bird!", "C"),
        ("cat or dog", None),
        ("A or B", None),
        ("D", None),  # not an option of this question
        ("fish", None),
    ],
)
def test_can_infer(text, expected):
    assert can_infer(text, dict(OPTIONS)) == expected


def test_circular_shift_matches_llava_rotation():
    opts = ["o0", "o1", "o2", "o3"]
    assert circular_shift(opts, 0) == opts
    assert circular_shift(opts, 1) == ["o1", "o2", "o3", "o0"]
    assert circular_shift(opts, 3) == ["o3", "o0", "o1", "o2"]


def test_mmbench_circular_accuracy():
    records = [{"index": 1 + r * 1_000_000, "correct": True, "category": "x"} for r in range(4)]
    records += [{"index": 2, "correct": True, "category": "x"},
                {"index": 1_000_002, "correct": False, "category": "x"}]
    records += [{"index": 3 + r * 1_000_000, "correct": r != 0, "category": "y"} for r in range(3)]
    m = mmbench_circular_accuracy(records)
    assert m["questions"] == 3
    assert m["circular"] == pytest.approx(100 / 3)
    assert m["vanilla"] == pytest.approx(200 / 3)
    assert m["per_category"] == {"x": 50.0, "y": 0.0}
    assert math.isclose(mmbench_circular_accuracy([])["circular"], 0.0)
