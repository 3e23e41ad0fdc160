"""Each benchmark's scoring, rule by rule, against the official script it follows (docs/evaluation.md has
the table). Every expected value below was derived by hand from reading the official code named in the
comment, at the version named there, not from this project's output:

* LLaVA: haotian-liu/LLaVA at c121f04 (2024-05-12): llava/eval/m4c_evaluator.py (EvalAIAnswerProcessor,
  TextVQAAccuracyEvaluator), scripts/convert_{vqav2,vizwiz}_for_submission.py, scripts/convert_gqa_for_eval.py,
  llava/eval/eval_science_qa.py; playground/data/eval/MME/convert_answer_to_mme.py and the released answer
  files at 32cebc3.
* GQA's eval.py (the official script LLaVA's Evaluation.md links): `predicted == gold`, balanced questions,
  binary = structural type other than "query".
* MME: eval_tool/calculation.py of BradyFU/Awesome-Multimodal-Large-Language-Models (Evaluation branch,
  tools/eval_tool.zip).
* lmms-eval v0.3.0 (754640a): tasks/mme (prompt), tasks/vizwiz_vqa (val score, submission names).
* VLMEvalKit v0.2 (e4e0263): vlmeval/utils/matching_util.py (can_infer*), vlmeval/dataset/utils/
  multiple_choice.py (mcq_circular_eval, prefetch_circular_group, report_acc).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from defocus_mllm.data.easy_vqa import easy_vqa_question_kind
from defocus_mllm.evaluation import (
    SHORT_ANSWER,
    BenchmarkDataError,
    Sample,
    can_infer,
    evalai_answer,
    evalai_vqa_accuracy,
    get_benchmark,
    normalize_answer,
    vqa_accuracy,
)
from defocus_mllm.evaluation.sources import PathImage
from evaluation_fixtures import (
    gqa_llava,
    hf_image,
    mme_hf,
    mme_llava,
    png_bytes,
    vizwiz_llava,
    vqav2_llava,
    write_parquet,
)

NO_IMAGE = PathImage(Path("unused.png"))


def _samples(bench, rows):
    """Samples built directly (no files): rows of (question_id, prompt text, answers, meta)."""
    return [Sample(qid, text, NO_IMAGE, answers, dict(meta)) for qid, text, answers, meta in rows]


# ------------------------------------------------------------------ EvalAI answer processor

# (raw output, EvalAIAnswerProcessor()(raw)): m4c_evaluator.py, derived step by step:
# word_tokenize (lower, delete "," and "?", "'s" -> " 's", strip) -> \n \t -> " " and strip ->
# process_punctuation (per mark: next to a space -> deleted, else -> space; then periods not before
# a digit, at most 32) -> process_digit_article (number words, articles, contractions)
EVALAI = [
    ("What's", "what 's"),  # the possessive becomes its own word; no contraction joins it back
    ("it's", "it 's"),
    ("The dog's bone.", "dog 's bone"),  # "the" is an article; the final period goes
    ("red,white", "redwhite"),  # commas are deleted by word_tokenize, not turned into spaces
    ("Red, white", "red white"),
    ("one, two", "1 2"),
    ("1,000", "1000"),
    ("Is it?", "is it"),  # "?" is deleted by word_tokenize
    ("Two.", "2"),
    ("None", "0"),
    ("isnt", "isn't"),
    ("t-shirt", "t shirt"),  # "-" touches no space: replaced by a space
    ("x - y", "x y"),  # " -" is in the text: deleted
    ("(a) dog", "dog"),  # "(" -> space, ")" (followed by a space) deleted, then "a" is an article
    ("U.S.A.", "usa"),
    ("3.5", "3.5"),
    ("Yes\n", "yes"),
    ("x" + "." * 40, "x" + "." * 8),  # re.UNICODE passed as `count`: 32 periods at most
    # LLaVA's released VizWiz answers (answers/llava-v1.5-13b.jsonl) and their upload file, lines 0, 4, 36
    ("Black", "black"),
    ("Half and half", "half and half"),
    ("6:00", "6:00"),
]


@pytest.mark.parametrize("raw,expected", EVALAI)
def test_evalai_answer_follows_m4c_evaluator(raw, expected):
    assert evalai_answer(raw) == expected


def test_evalai_and_vqa_tool_processors_differ_where_the_issue_says():
    # the VQA tool (vqaEval.py processPunctuation + processDigitArticle) keeps "what's" whole and turns
    # an isolated comma into a space
    assert normalize_answer("What's") == "what's" and evalai_answer("What's") == "what 's"
    assert normalize_answer("red,white") == "red white" and evalai_answer("red,white") == "redwhite"


# ------------------------------------------------------------------ TextVQA: TextVQAAccuracyEvaluator


def test_textvqa_accuracy_normalises_all_ten_answers():
    # _compute_answer_scores processes every human answer; the VQA tool would compare raw strings here
    assert evalai_vqa_accuracy("stop", ["STOP"] * 10) == 1.0
    assert vqa_accuracy("stop", ["STOP"] * 10) == 0.0
    assert evalai_vqa_accuracy("Stop.", ["stop!"] * 10) == 1.0
    # 3 of 10 match after processing: each of the 3 sees 2 others (2/3), each of the 7 sees 3 (1) -> 0.9
    assert evalai_vqa_accuracy("coca cola", ["Coca-Cola"] * 3 + ["coke"] * 7) == pytest.approx(0.9)
    assert evalai_vqa_accuracy("Coca Cola's", ["Coca-Cola"] * 3 + ["coke"] * 7) == 0.0  # "coca cola 's"
    assert evalai_vqa_accuracy("a", ["b"] * 10) == 0.0


def test_textvqa_benchmark_scores_with_m4c_evaluator():
    bench = get_benchmark("textvqa")
    samples = _samples(bench, [(1, "q", ["STOP"] * 10, {}), (2, "q", ["Coca-Cola"] * 3 + ["coke"] * 7, {}),
                               (3, "q", ["acme"] * 10, {})])
    m = bench.score(samples, {1: "stop", 2: "Coca Cola", 3: "ACME."})
    assert m["accuracy"] == pytest.approx(100 * (1.0 + 0.9 + 1.0) / 3)
    assert "per_answer_type" not in m  # TextVQA 0.5.1 files carry no type


# ------------------------------------------------------------------ VQAv2: EvalAI processing, then vqaEval.py


def test_vqav2_scores_the_submitted_answer_with_the_vqa_tool():
    bench = get_benchmark("vqav2")
    rows = [
        # ten identical answers: vqaEval compares raw strings; LLaVA submits "what 's" -> 0
        (1, "q", ["what's"] * 10, {"answer_type": "other", "question_type": "what is"}),
        # answers differ: vqaEval processes both sides; "redwhite" matches nobody -> 0
        (2, "q", ["red white"] * 4 + ["red"] * 6, {"answer_type": "other", "question_type": "what color"}),
        # "Two." is submitted as "2", equal to the raw "2" -> 1
        (3, "q", ["2"] * 10, {"answer_type": "number", "question_type": "how many"}),
        # "Red, White" is submitted as "red white": 4 annotators -> 1
        (4, "q", ["red white"] * 4 + ["red"] * 6, {"answer_type": "other", "question_type": "what color"}),
    ]
    m = bench.score(_samples(bench, rows), {1: "What's", 2: "red,white", 3: "Two.", 4: "Red, White"})
    assert m["accuracy"] == pytest.approx(50.0)
    assert m["per_answer_type"] == {"number": 100.0, "other": pytest.approx(100 / 3)}
    assert m["per_question_type"] == {"how many": 100.0, "what color": 50.0, "what is": 0.0}


def test_vqav2_submission_follows_convert_vqav2_for_submission(tmp_path):
    # one entry per line of llava_vqav2_mscoco_test2015.jsonl, in its order; "" where not answered
    bench = get_benchmark("vqav2")
    samples = bench.load(**vqav2_llava(tmp_path)["kwargs"])
    sub = bench.submission(samples, {100: "What's", 101: "red,white", 102: "Two."}, None)
    assert sub == [{"question_id": 100, "answer": "what 's"}, {"question_id": 101, "answer": "redwhite"},
                   {"question_id": 102, "answer": "2"}, {"question_id": 999, "answer": ""}]


def test_vqav2_lmms_lab_submission_has_no_padding(tmp_path):
    d = tmp_path / "VQAv2"
    write_parquet(d / "data" / "test-00000-of-00001.parquet",
             [{"question_id": 7 + i, "question": "What?", "image": hf_image(i), "answers": None} for i in range(2)])
    bench = get_benchmark("vqav2")
    samples = bench.load(data=d)
    assert bench.split == "test"
    assert bench.submission(samples, {7: "Dog's", 8: "No."}, d) == [{"question_id": 7, "answer": "dog 's"},
                                                                     {"question_id": 8, "answer": "no"}]


# ------------------------------------------------------------------ VizWiz


def test_vizwiz_llava_submission_follows_convert_vizwiz_for_submission(tmp_path):
    bench = get_benchmark("vizwiz")
    samples = bench.load(**vizwiz_llava(tmp_path)["kwargs"])
    sub = bench.submission(samples, {0: "Black", 1: "Unanswerable", 2: "red,white"}, None)
    assert sub == [{"image": "VizWiz_test_00000000.jpg", "answer": "black"},
                   {"image": "VizWiz_test_00000001.jpg", "answer": "unanswerable"},
                   {"image": "VizWiz_test_00000002.jpg", "answer": "redwhite"}]


def test_vizwiz_lmms_lab_submission_names_images_with_jpg(tmp_path):
    # lmms-eval vizwiz_vqa_process_results: "image": f"{doc['question_id']}.jpg"
    d = tmp_path / "VizWiz-VQA"
    write_parquet(d / "data" / "test-00000-of-00001.parquet",
             [{"question_id": f"VizWiz_test_{i:08d}", "question": "What is this?", "image": hf_image(i),
               "answers": None, "category": None} for i in range(2)])
    bench = get_benchmark("vizwiz")
    samples = bench.load(data=d)
    assert bench.split == "test" and all(s.answers is None for s in samples)
    assert bench.submission(samples, {s.question_id: "What's" for s in samples}, d) == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "what 's"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "what 's"}]


def test_vizwiz_val_scores_as_lmms_eval():
    # vizwiz_vqa_process_results: EvalAI processing of the output and of every answer, leave-one-out
    bench = get_benchmark("vizwiz")
    rows = [(1, "q", ["Unanswerable"] * 10, {"answer_type": "unanswerable"}),
            (2, "q", ["blue"] * 2 + ["unanswerable"] * 8, {"answer_type": "other"}),
            (3, "q", ["yes"] * 10, {"answer_type": "yes/no"})]
    m = bench.score(_samples(bench, rows), {1: "unanswerable.", 2: "Blue", 3: "No"})
    assert m["accuracy"] == pytest.approx(100 * (1.0 + 0.6 + 0.0) / 3)
    assert m["per_answer_type"] == {"other": pytest.approx(60.0), "unanswerable": 100.0, "yes/no": 0.0}


# ------------------------------------------------------------------ GQA


@pytest.mark.parametrize(
    "output,correct",
    [
        ("Yes.", True),  # rstrip('.') then lower
        ("Left..", True),
        ("LEFT", True),
        ("yes .", False),  # "yes " keeps its space
        ("yes. ", False),  # the period is not last: nothing removed
        (" left", False),
        ("the left", False),
    ],
)
def test_gqa_follows_convert_gqa_for_eval_and_exact_match(output, correct):
    bench = get_benchmark("gqa")
    answer = "left" if "left" in output.lower() else "yes"
    s = _samples(bench, [(1, "q", [answer], {"structural": "query", "semantic": "rel", "balanced": True})])
    assert bench.score(s, {1: output})["accuracy"] == (100.0 if correct else 0.0)


def test_gqa_types_binary_open_and_balanced_questions_only():
    bench = get_benchmark("gqa")
    rows = [
        (1, "q", ["yes"], {"structural": "verify", "semantic": "attr", "balanced": True}),
        (2, "q", ["no"], {"structural": "logical", "semantic": "obj", "balanced": True}),
        (3, "q", ["left"], {"structural": "query", "semantic": "rel", "balanced": True}),
        (4, "q", ["red"], {"structural": "query", "semantic": "attr", "balanced": True}),
        (5, "q", ["cat"], {"structural": "query", "semantic": "cat", "balanced": False}),  # eval.py skips it
    ]
    m = bench.score(_samples(bench, rows), {1: "Yes", 2: "yes", 3: "left.", 4: "blue", 5: "cat"})
    assert m["num_scored"] == 4 and m["accuracy"] == 50.0
    assert m["binary"] == 50.0 and m["open"] == 50.0
    assert m["per_structural_type"] == {"logical": 0.0, "query": 50.0, "verify": 100.0}
    assert m["per_semantic_type"] == {"attr": 50.0, "obj": 0.0, "rel": 100.0}


def test_gqa_llava_layout_reads_types(tmp_path):
    bench = get_benchmark("gqa")
    samples = bench.load(**gqa_llava(tmp_path)["kwargs"])
    m = bench.score(samples, {s.question_id: s.answers[0] for s in samples})
    assert m["accuracy"] == 100.0 and m["per_structural_type"] == {"verify": 100.0} and m["binary"] == 100.0


def test_gqa_lmms_lab_configurations_as_published(tmp_path):
    d = tmp_path / "GQA"
    for tier, color in (("testdev_balanced", 0), ("testdev_all", 1)):
        write_parquet(d / f"{tier}_instructions" / "testdev-00000-of-00001.parquet",
                 [{"id": f"{tier}{i}", "imageId": "n0", "question": f"Q{i}?", "answer": "yes", "isBalanced": True,
                   "types": {"structural": "verify", "semantic": "obj", "detailed": "existC"}} for i in range(2)])
        # the same image id in both image configurations, different pixels: the pairing must follow the tier
        write_parquet(d / f"{tier}_images" / "testdev-00000-of-00001.parquet", [{"id": "n0", "image": hf_image(color)}])
    with pytest.raises(BenchmarkDataError, match=r"several GQA question splits \['testdev_all_instructions/testdev', "
                                                 r"'testdev_balanced_instructions/testdev'\]"):
        get_benchmark("gqa").load(data=d)
    with pytest.raises(BenchmarkDataError, match=r"--split 'testdev' matches several"):
        get_benchmark("gqa").load(data=d, split="testdev")
    with pytest.raises(BenchmarkDataError, match=r"no GQA question split 'val_balanced_instructions'; available splits"):
        get_benchmark("gqa").load(data=d, split="val_balanced_instructions")
    bench = get_benchmark("gqa")
    balanced = bench.load(data=d, split="testdev_balanced_instructions")
    assert bench.split == "testdev_balanced_instructions/testdev" and [s.question_id for s in balanced] == [
        "testdev_balanced0", "testdev_balanced1"]
    every = get_benchmark("gqa").load(data=d, split="testdev_all_instructions")
    assert balanced[0].load_image().getpixel((5, 5)) != every[0].load_image().getpixel((5, 5))


# ------------------------------------------------------------------ ScienceQA: eval_science_qa.py


def test_scienceqa_scoring_follows_eval_science_qa():
    bench = get_benchmark("scienceqa")
    outputs = {
        1: ("A", True),  # pred_text in options
        2: ("B.", False),  # too short for the "X. " rule, no "The answer is": FAILED
        3: ("B. dog", True),  # pred_text[1:3] == ". "
        4: ("The answer is A.", True),
        5: ("The answer is A", False),  # the pattern needs one more character after the letter
        6: ("The answer is Ab", True),  # ... any character: "." is unescaped
        7: ("The answer is B. The answer is B.", False),  # two matches: FAILED
        8: (" A", False),  # not stripped
        9: ("a", False),  # letters are upper-case
        10: ("C", False),  # beyond this question's two choices: get_pred_idx gives -1
        11: ("(A)", False),
    }
    answers = {1: "A", 2: "B", 3: "B", 4: "A", 5: "A", 6: "A", 7: "B", 8: "A", 9: "A", 10: "C", 11: "A"}
    rows = [(qid, "q", [answers[qid]], {"num_choices": 2 if qid == 10 else 4}) for qid in outputs]
    for qid, (out, right) in outputs.items():
        m = bench.score(_samples(bench, [rows[qid - 1]]), {qid: out})
        assert m["accuracy"] == (100.0 if right else 0.0), out
    m = bench.score(_samples(bench, rows), {qid: out for qid, (out, _) in outputs.items()})
    assert m["accuracy"] == pytest.approx(100 * 4 / 11) and m["unparsed"] == 7


# ------------------------------------------------------------------ easy-VQA (the project's own rule)

EASY = [
    # (question, answer, output, normalised exact match, VQA tool soft accuracy with 10 x answer)
    ("what color is the shape?", "red", "Red.", 1, 0),
    ("what is the color of the circle?", "blue", "green", 0, 0),
    ("what shape is in the image?", "circle", "the circle", 1, 0),
    ("what is the red shape?", "triangle", "triangle", 1, 1),
    ("is there a red shape?", "yes", "Yes", 1, 0),
    ("is no blue shape present?", "no", "yes", 0, 0),
    ("is there a circle?", "no", "no", 1, 1),
    ("does the image contain a triangle?", "yes", "no", 0, 0),
]


def test_easy_vqa_question_kinds():
    kinds = [easy_vqa_question_kind(q, a) for q, a, *_ in EASY]
    assert kinds == ["open colour", "open colour", "open shape", "open shape",
                     "yes/no colour", "yes/no colour", "yes/no shape", "yes/no shape"]


def test_easy_vqa_headline_and_kinds_hand_computed():
    bench = get_benchmark("easy-vqa")
    samples = _samples(bench, [(i, q, [a], {"kind": easy_vqa_question_kind(q, a)})
                               for i, (q, a, *_) in enumerate(EASY)])
    m = bench.score(samples, {i: out for i, (_, _, out, *_) in enumerate(EASY)})
    assert m["accuracy"] == 62.5  # 5 of 8
    assert m["per_kind"] == {"open colour": 50.0, "open shape": 100.0, "yes/no colour": 50.0, "yes/no shape": 50.0}
    assert list(m["per_kind"]) == ["open colour", "open shape", "yes/no colour", "yes/no shape"]
    assert m["vqa_accuracy"] == 25.0  # 2 of 8: raw matches only
    assert bench.headline_values(m) == {"easy-VQA": 62.5}


def test_easy_vqa_kinds_of_the_test_split():
    samples = get_benchmark("easy-vqa").load(check_images=False)
    counts = {}
    for s in samples:
        counts[s.meta["kind"]] = counts.get(s.meta["kind"], 0) + 1
    assert counts == {"open colour": 1280, "open shape": 1257, "yes/no colour": 5201, "yes/no shape": 1935}


# ------------------------------------------------------------------ MME


def test_mme_llava_layout_finds_answers_as_convert_answer_to_mme(tmp_path):
    bench = get_benchmark("mme")
    samples = bench.load(**mme_llava(tmp_path)["kwargs"])
    # the prompt is the file's (no " Please answer yes or no."); the answer comes from the release's
    # txt, found with one space, or two (code_reasoning's file here)
    assert samples[0].prompt == f"Is this artwork A?\n{SHORT_ANSWER}"
    assert [s.answers[0] for s in samples] == ["Yes", "No", "Yes", "No"]
    assert [s.meta["image_key"] for s in samples] == ["artwork/10002"] * 2 + ["code_reasoning/0020"] * 2
    outputs = ["Yes", "No, it is not", "y", "No"]
    m = bench.score(samples, {s.question_id: o for s, o in zip(samples, outputs)})
    # calculation.py: "no, it is not"[:4] holds "no"; "y" is "other" (lmms-eval's parser would say yes)
    assert m["subtasks"]["artwork"] == {"acc": 100.0, "acc_plus": 100.0, "score": 200.0, "count": 2}
    assert m["subtasks"]["code_reasoning"] == {"acc": 50.0, "acc_plus": 0.0, "score": 50.0, "count": 2}
    assert (m["perception"], m["cognition"]) == (200.0, 50.0)


def test_mme_llava_layout_names_a_missing_answer(tmp_path):
    fx = mme_llava(tmp_path)
    txt = fx["kwargs"]["data"] / "MME_Benchmark_release_version" / "code_reasoning" / "0020.txt"
    txt.write_text(txt.read_text().replace("B?  Please", "C?  Please"))
    with pytest.raises(BenchmarkDataError, match=r"llava_mme\.jsonl:4: no answer for question 'code_reasoning/0020\.png'"):
        get_benchmark("mme").load(**fx["kwargs"])


def test_mme_lmms_lab_prompt_is_lmms_eval_s(tmp_path):
    # mme_doc_to_text: question.strip().replace(" Please answer yes or no.", "") + post_prompt
    d = tmp_path / "MME"
    rows = [{"question_id": "scene/1.jpg", "image": hf_image(0), "category": "scene", "answer": a,
             "question": q} for q, a in (("Is this a beach? Please answer yes or no.", "Yes"),
                                         ("Is this a forest?  Please answer yes or no.", "No"))]
    write_parquet(d / "data" / "test-00000-of-00001.parquet", rows)
    samples = get_benchmark("mme").load(data=d)
    assert samples[0].prompt == f"Is this a beach?\n{SHORT_ANSWER}"
    assert samples[1].prompt == f"Is this a forest? \n{SHORT_ANSWER}"  # one of the two spaces stays


def test_mme_lmms_lab_scores_with_calculation_py(tmp_path):
    bench = get_benchmark("mme")
    samples = bench.load(**mme_hf(tmp_path)["kwargs"])  # existence x2 images, numerical_calculation x1
    outputs = ["Yes.", "No", "yes", "Yes", "nope", "No"]
    m = bench.score(samples, {s.question_id: o for s, o in zip(samples, outputs)})
    # existence: image 0 both right, image 1 one right -> 75 + 50; numerical: "nope" -> no, wrong for
    # "Yes"; "No" right -> 50 + 0
    assert m["subtasks"]["existence"]["score"] == 125.0 and m["subtasks"]["numerical_calculation"]["score"] == 50.0
    assert (m["perception"], m["cognition"]) == (125.0, 50.0)


# ------------------------------------------------------------------ MMBench: VLMEvalKit v0.2

OPTS = {"A": "cat", "B": "dog", "C": "bird"}


@pytest.mark.parametrize(
    "output,expected",
    [
        ("B", "B"),
        ("B. dog", "B"),
        ("(B)", "B"),  # "(" and ")" become spaces
        ("A dog", "A"),  # one letter among the words (the VERBOSE quantifier check is off by default)
        ("bird, B", "B"),  # a letter wins over the option text
        ("A or B", None),  # two letters -> can_infer_text: no option text in it
        ("I said A, then B: a dog", "B"),  # two letters -> fallback to the text: only "dog" occurs
        ("A B dog", "B"),
        ("cat or dog", None),  # no letter, two option texts
        ("Dog!", "B"),  # no letter: the text, case-insensitively
        ("b", None),  # letters are case-sensitive; "b" contains no option text
        ("The answer is D", None),  # D is not a choice of this question
        ("Z", "Z"),  # no letter but a "Z" word
        ("Cannot determine the answer. B", "Z"),  # a refusal is "Z" whatever follows
        ("Failed to obtain answer via API. dog", "B"),  # can_infer_option gives up; the text decides
    ],
)
def test_can_infer_follows_vlmevalkit(output, expected):
    assert can_infer(output, dict(OPTS)) == expected


MMB_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
# an official-style file: originals 0 and 1, their circular copies at + k * 1,000,000 (options rotated,
# answer moved), and a copy whose original row is absent
MMB_ROWS = [
    [0, "Colour?", "nan", "red", "green", "blue", "yellow", "A", "color", "", "s", "perception", "nan", "dev"],
    [1, "Shape?", "Look.", "circle", "square", "nan", "nan", "B", "shape", "", "s", "perception", "nan", "dev"],
    [1000000, "Colour?", "nan", "green", "blue", "yellow", "red", "D", "color", "", "s", "perception", "nan", "dev"],
    [1000001, "Shape?", "Look.", "square", "circle", "nan", "nan", "A", "shape", "", "s", "perception", "nan", "dev"],
    [2000000, "Colour?", "nan", "blue", "yellow", "red", "green", "C", "color", "", "s", "perception", "nan", "dev"],
    [3000000, "Colour?", "nan", "yellow", "red", "green", "blue", "B", "color", "", "s", "perception", "nan", "dev"],
    [1000007, "Orphan?", "nan", "x", "y", "nan", "nan", "A", "misc", "", "s", "reasoning", "nan", "dev"],
]
MMB_OUTPUTS = {0: "A", 1000000: "D. red", 2000000: "The answer is red", 3000000: "B",  # group 0: all right
               1: "B", 1000001: "Cannot determine the answer, A",  # group 1: a refusal in one copy
               1000007: "A"}  # right, but its group has no original row: not scored


def _mmbench_tsv(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(MMB_HEADER)]
    for i, row in enumerate(MMB_ROWS):
        row = list(row)
        row[9] = base64.b64encode(png_bytes(i)).decode()
        lines.append("\t".join(str(x) for x in row))
    (d / "mmbench_dev_20230712.tsv").write_text("\n".join(lines) + "\n")
    return {"data": d}


def _mmbench_parquet(d: Path) -> dict:
    rows = [dict(zip(MMB_HEADER, row), image=hf_image(i)) for i, row in enumerate(MMB_ROWS)]
    for r in rows:
        r["L2-category"] = r.pop("l2-category")
        for k in ("hint", "C", "D", "comment"):
            r[k] = None if r[k] == "nan" else r[k]
    write_parquet(d / "en" / "dev-00000-of-00001.parquet", rows)
    return {"data": d, "split": "en/dev"}


@pytest.mark.parametrize("layout", [_mmbench_tsv, _mmbench_parquet])
def test_mmbench_file_with_copies_is_asked_once_per_row(layout, tmp_path):
    bench = get_benchmark("mmbench")
    samples = bench.load(**layout(tmp_path / "mmb"))
    assert [s.question_id for s in samples] == [r[0] for r in MMB_ROWS]  # no rotation: one call per row
    by_id = {s.question_id: s for s in samples}
    assert by_id[1000000].prompt == f"Colour?\nA. green\nB. blue\nC. yellow\nD. red\n{bench.instruction}"
    assert by_id[1000001].prompt.startswith("Look.\nShape?\nA. square\nB. circle\nAnswer")
    m = bench.score(samples, MMB_OUTPUTS)
    # mcq_circular_eval: groups by index % 1e6 with an original row; hit = every row of the group right
    assert m["questions"] == 2 and m["circular"] == 50.0 and m["vanilla"] == 100.0
    assert m["per_category"] == {"color": 100.0, "shape": 0.0}
    assert m["per_l2_category"] == {"perception": 50.0}
    assert m["num_rows"] == 7
    # --limit counts questions and keeps every copy of them, wherever it is in the file
    limited = get_benchmark("mmbench").load(**layout(tmp_path / "mmb2"), limit=1)
    assert [s.question_id for s in limited] == [0, 1000000, 2000000, 3000000]


def test_mmbench_file_without_copies_is_rotated_and_scored_the_same_way(tmp_path):
    d = tmp_path / "mmb"
    d.mkdir()
    lines = ["\t".join(MMB_HEADER)]
    for i, row in enumerate(MMB_ROWS[:2]):
        row = list(row)
        row[9] = base64.b64encode(png_bytes(i)).decode()
        lines.append("\t".join(str(x) for x in row))
    (d / "mmbench_dev_20230712.tsv").write_text("\n".join(lines) + "\n")
    bench = get_benchmark("mmbench")
    samples = bench.load(data=d)
    # the copies made here are those of the official file above (same options, same answers)
    assert [s.question_id for s in samples] == [0, 1000000, 2000000, 3000000, 1, 1000001]
    official = {r[0]: r for r in MMB_ROWS}
    for s in samples:
        r = official[s.question_id]
        assert s.meta["options"] == {k: v for k, v in zip("ABCD", r[3:7]) if v != "nan"} and s.answers == [r[7]]
    m = bench.score(samples, MMB_OUTPUTS)
    assert m["questions"] == 2 and m["circular"] == 50.0 and m["vanilla"] == 100.0


# ------------------------------------------------------------------ lmms-lab split names


def test_published_split_names_and_errors(tmp_path):
    d = tmp_path / "ScienceQA"
    for config in ("ScienceQA-IMG", "ScienceQA-FULL"):
        for split in ("test", "validation"):
            write_parquet(d / config / f"{split}-00000-of-00001.parquet",
                     [{"image": hf_image(0), "question": "Which?", "choices": ["x", "y"], "answer": 0, "hint": ""}])
    with pytest.raises(BenchmarkDataError, match=r"several splits \['ScienceQA-FULL/test', 'ScienceQA-FULL/validation', "
                                                 r"'ScienceQA-IMG/test', 'ScienceQA-IMG/validation'\]"):
        get_benchmark("scienceqa").load(data=d)
    with pytest.raises(BenchmarkDataError, match=r"--split 'ScienceQA-IMG' matches several splits "
                                                 r"\['ScienceQA-IMG/test', 'ScienceQA-IMG/validation'\]"):
        get_benchmark("scienceqa").load(data=d, split="ScienceQA-IMG")
    with pytest.raises(BenchmarkDataError, match=r"no split 'train'; available splits: \['ScienceQA-FULL/test'"):
        get_benchmark("scienceqa").load(data=d, split="train")
    bench = get_benchmark("scienceqa")
    assert len(bench.load(data=d, split="ScienceQA-IMG/test")) == 1 and bench.split == "ScienceQA-IMG/test"


def test_results_markdown_holds_the_breakdowns():
    from defocus_mllm.evaluation import results_markdown

    bench = get_benchmark("easy-vqa")
    samples = _samples(bench, [(i, q, [a], {"kind": easy_vqa_question_kind(q, a)}) for i, (q, a, *_) in enumerate(EASY)])
    metrics = bench.score(samples, {i: out for i, (_, _, out, *_) in enumerate(EASY)})
    text = results_markdown({"model": "m", "benchmark": "easy-vqa", "split": "test", "num_questions": 8,
                             "headline": bench.headline_values(metrics), "metrics": metrics})
    assert "| m | easy-vqa | test | 8 | 62.50 |" in text
    assert "| kind | accuracy |\n|---|---|\n| open colour | 50.00 |\n| open shape | 100.00 |\n" \
           "| yes/no colour | 50.00 |\n| yes/no shape | 50.00 |" in text
    json.dumps(metrics)  # metrics.json holds them too
